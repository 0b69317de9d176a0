//! Typed codes of the engine: the journal's action names, job kinds and the engine's own refusal
//! rules. They stay enums through the engine and become strings only in the journal and on the
//! wire, each through one `as_str`/`code`; the strings are the journal's (old journals verify).

/// What a journal event records: the call, or the engine's own step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Start,
    SubmitJob,
    /// The write-ahead record of an admitted job (not terminal: its `SubmitJob` ends it).
    AdmitJob,
    GetJob,
    FetchResult,
    CancelJob,
    ExplainJob,
    ListDatasets,
    ListEvents,
    GetCheckpoint,
    GetInclusionProof,
    GetConsistencyProof,
    ExportJournal,
    QueryEvents,
    UploadModule,
    ApproveModule,
    RejectModule,
    ListModules,
    SubmitTemplate,
    ApproveTemplate,
    ListTemplates,
    SeedTemplates,
    AddConsent,
    RevokeConsent,
    ListConsents,
    SeedConsents,
    GetBudgets,
    RefreshBudget,
    WhoAmI,
    ListGrants,
}

impl Action {
    pub const ALL: [Action; 30] = [
        Action::Start,
        Action::SubmitJob,
        Action::AdmitJob,
        Action::GetJob,
        Action::FetchResult,
        Action::CancelJob,
        Action::ExplainJob,
        Action::ListDatasets,
        Action::ListEvents,
        Action::GetCheckpoint,
        Action::GetInclusionProof,
        Action::GetConsistencyProof,
        Action::ExportJournal,
        Action::QueryEvents,
        Action::UploadModule,
        Action::ApproveModule,
        Action::RejectModule,
        Action::ListModules,
        Action::SubmitTemplate,
        Action::ApproveTemplate,
        Action::ListTemplates,
        Action::SeedTemplates,
        Action::AddConsent,
        Action::RevokeConsent,
        Action::ListConsents,
        Action::SeedConsents,
        Action::GetBudgets,
        Action::RefreshBudget,
        Action::WhoAmI,
        Action::ListGrants,
    ];

    /// The name the journal records.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Start => "Start",
            Action::SubmitJob => "SubmitJob",
            Action::AdmitJob => "AdmitJob",
            Action::GetJob => "GetJob",
            Action::FetchResult => "FetchResult",
            Action::CancelJob => "CancelJob",
            Action::ExplainJob => "ExplainJob",
            Action::ListDatasets => "ListDatasets",
            Action::ListEvents => "ListEvents",
            Action::GetCheckpoint => "GetCheckpoint",
            Action::GetInclusionProof => "GetInclusionProof",
            Action::GetConsistencyProof => "GetConsistencyProof",
            Action::ExportJournal => "ExportJournal",
            Action::QueryEvents => "QueryEvents",
            Action::UploadModule => "UploadModule",
            Action::ApproveModule => "ApproveModule",
            Action::RejectModule => "RejectModule",
            Action::ListModules => "ListModules",
            Action::SubmitTemplate => "SubmitTemplate",
            Action::ApproveTemplate => "ApproveTemplate",
            Action::ListTemplates => "ListTemplates",
            Action::SeedTemplates => "SeedTemplates",
            Action::AddConsent => "AddConsent",
            Action::RevokeConsent => "RevokeConsent",
            Action::ListConsents => "ListConsents",
            Action::SeedConsents => "SeedConsents",
            Action::GetBudgets => "GetBudgets",
            Action::RefreshBudget => "RefreshBudget",
            Action::WhoAmI => "WhoAmI",
            Action::ListGrants => "ListGrants",
        }
    }
}

/// The kind of a job (or of the governance call about one), as the journal records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    Sql,
    Wasm,
    Template,
    /// An auditor's or owner's SQL over the journal.
    AuditSql,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Sql => "sql",
            JobKind::Wasm => "wasm",
            JobKind::Template => "template",
            JobKind::AuditSql => "audit_sql",
        }
    }
}

/// The engine's own refusal and failure rules, beside the guard's [`sandbox_sql::Rule`], the
/// registry's [`sandbox_policy::Refusal`] and the errors of the other crates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineRule {
    /// A malformed argument of a governance call.
    InvalidArgument,
    WasmManifest,
    ModuleScopeNotGranted,
    ModuleExists,
    ContractInvalid,
    InputNotApproved,
    ModeNotGranted,
    ProofOutOfRange,
    AuditSql,
    AuditSqlFunction,
    AuditSqlTooManyRows,
    AuditSqlResultTooLarge,
    AuditSqlTimeout,
    DifferencingMemoryFull,
    TemplateInvalid,
    TemplateParameters,
    ServerBusy,
    TooManyJobs,
    BudgetExhausted,
    DpEpsilonNotAllowed,
    DpNotGranted,
}

impl EngineRule {
    pub const ALL: [EngineRule; 21] = [
        EngineRule::InvalidArgument,
        EngineRule::WasmManifest,
        EngineRule::ModuleScopeNotGranted,
        EngineRule::ModuleExists,
        EngineRule::ContractInvalid,
        EngineRule::InputNotApproved,
        EngineRule::ModeNotGranted,
        EngineRule::ProofOutOfRange,
        EngineRule::AuditSql,
        EngineRule::AuditSqlFunction,
        EngineRule::AuditSqlTooManyRows,
        EngineRule::AuditSqlResultTooLarge,
        EngineRule::AuditSqlTimeout,
        EngineRule::DifferencingMemoryFull,
        EngineRule::TemplateInvalid,
        EngineRule::TemplateParameters,
        EngineRule::ServerBusy,
        EngineRule::TooManyJobs,
        EngineRule::BudgetExhausted,
        EngineRule::DpEpsilonNotAllowed,
        EngineRule::DpNotGranted,
    ];

    /// The code the journal and the caller see.
    pub fn code(self) -> &'static str {
        match self {
            EngineRule::InvalidArgument => "invalid-argument",
            EngineRule::WasmManifest => "wasm-manifest",
            EngineRule::ModuleScopeNotGranted => "module-scope-not-granted",
            EngineRule::ModuleExists => "module-exists",
            EngineRule::ContractInvalid => "contract-invalid",
            EngineRule::InputNotApproved => "input-not-approved",
            // The guard's code for the same refusal: a caller reads one code for it.
            EngineRule::ModeNotGranted => sandbox_sql::Rule::ModeNotGranted.code(),
            EngineRule::ProofOutOfRange => "proof-out-of-range",
            EngineRule::AuditSql => "audit-sql",
            EngineRule::AuditSqlFunction => "audit-sql-function",
            EngineRule::AuditSqlTooManyRows => "audit-sql-too-many-rows",
            EngineRule::AuditSqlResultTooLarge => "audit-sql-result-too-large",
            EngineRule::AuditSqlTimeout => "audit-sql-timeout",
            EngineRule::DifferencingMemoryFull => "differencing-memory-full",
            EngineRule::TemplateInvalid => "template-invalid",
            EngineRule::TemplateParameters => "template-parameters",
            EngineRule::ServerBusy => "server-busy",
            EngineRule::TooManyJobs => "too-many-jobs",
            EngineRule::BudgetExhausted => "budget-exhausted",
            EngineRule::DpEpsilonNotAllowed => "dp-epsilon-not-allowed",
            EngineRule::DpNotGranted => sandbox_sql::Rule::DpNotGranted.code(),
        }
    }
}

impl std::fmt::Display for EngineRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn every_code_is_distinct_and_in_all() {
        let actions: HashSet<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(actions.len(), Action::ALL.len());
        let rules: HashSet<&str> = EngineRule::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(rules.len(), EngineRule::ALL.len());
    }
}

//! The engine: wires the stages of the pipeline for every request, SQL or WASM, and knows
//! nothing of gRPC.
//!
//! ```text
//! authenticate -> admit -> plan -> execute -> release -> record -> deliver
//!   (server)      grants   guard    DataFusion   gate     journal   JobResult
//! ```
//!
//! [`Engine`] is a thin façade over parts that own their state: the recorder (the journal),
//! governance (the registry of modules, templates, approvals, consents, runs and budgets), the
//! job table, the answer store and the differencing memory. Job kinds live in `jobs/` (exact SQL,
//! differential privacy, code, template runs), governance calls in `governance/`, listings and
//! the auditor's calls apart; shared types in `types.rs`, typed codes in `codes.rs`.
//!
//! Each stage takes the previous stage's output type: [`sandbox_sql::PlannedQuery`] only comes from
//! the guard (which also decides, once, whether the release is exact or under differential
//! privacy, and gives the gate's inputs), a sealed [`sandbox_sql::Executed`] from execution, whose
//! rows leave it only through the gate, [`sandbox_release::Released`] only from the gate, and a
//! [`JobResult`] (the only thing delivery can send) only from a `Released` plus the journal's
//! receipt [`sandbox_audit::Appended`]. So a result cannot reach a client without passing the
//! gate and being durably recorded first.
//!
//! Every request produces exactly one terminal audit event. A request's event is a
//! `recorder::Pending` handle from the moment the engine takes the request up; every way of
//! ending it (`allow`, `refuse`, `conclude`, `record`) consumes it, and a handle dropped
//! unconsumed still writes its event, as abandoned (`request-abandoned`). A job's `AdmitJob`
//! event, with any run or budget it spends, is durable before it executes; its terminal event is
//! written when it ends (released, denied, failed or cancelled).
//!
//! Governance changes are journal records, applied to the registry only once their event is
//! durable and replayed from the journal at start. Uploaded modules are stored by hash under
//! `<data-dir>/modules/`; an approval without a contract gets the default scoring contract (the
//! privacy unit as key, a score of 0-1000 and a grade A-E); a template submission is accepted only
//! if every dataset it reads is granted to the submitter in template mode with at least the
//! grant's `min_units` (or, for scoring, an allowed purpose with a contract keyed on the privacy
//! unit); its SQL meets the guard when it runs.

mod admission;
mod answers;
mod audit;
mod audit_sql;
mod codes;
mod differencing;
mod directory;
mod engine;
mod error;
mod governance;
mod jobs;
mod listings;
mod metrics;
mod recorder;
mod secret;
mod types;

pub use audit::{ConsistencyAnswer, InclusionAnswer};
pub use audit_sql::AuditQueryResult;
pub use codes::{Action, EngineRule, JobKind};
pub use engine::Engine;
pub use error::{EngineError, ErrorKind, Result};
pub use governance::budgets::BudgetView;
pub use governance::consents::{ConsentStatus, ConsentView};
pub use governance::modules::{ApprovalRequest, ModuleView};
pub use governance::registry::AwaitingOwner;
pub use governance::templates::TemplateView;
pub use metrics::EngineMetrics;
pub use recorder::{ABANDONED_RULE, decision_of};
pub use sandbox_audit::{
    AuditEvent, BundleSource, Checkpoint, Decision, JournalOptions, StoredEvent,
};
pub use sandbox_policy::{
    Approval, Consent, ConsentKey, Contract, TemplateApproval, TemplateDefinition, TemplateOutput,
    TemplateRecord,
};
pub use sandbox_release::dp::NoiseReport;
pub use sandbox_sql::SqlLimits;
pub use sandbox_wasm::WasmLimits;
pub use types::{
    ColumnView, DatasetView, DpOutcome, DpRequest, EngineConfig, Explanation, GrantView, Identity,
    JobResult, JobSnapshot, JobSpec, JobState, ReleaseOutcome, RequestContext, TemplateSeed,
};

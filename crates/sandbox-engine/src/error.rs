//! Errors of the engine, each with a stable code and a kind that the server maps to a status.

use std::time::Duration;

use sandbox_audit::AuditError;
use sandbox_policy::Refusal;
use sandbox_sql::SqlError;

use crate::codes::EngineRule;

/// What a refused client is told to wait before retrying: most jobs take tens of milliseconds,
/// some up to the query time limit, so a short, fixed hint (clients add their own backoff).
pub const RETRY_AFTER: Duration = Duration::from_millis(250);

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How a client should read an error; the server maps each kind to one gRPC code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Refused by policy.
    Denied,
    /// The request itself is malformed (bad SQL, unknown column).
    Invalid,
    NotFound,
    /// The caller may not act on this object.
    PermissionDenied,
    /// Memory, rows or time ran out.
    ResourceExhausted,
    Cancelled,
    /// The audit journal cannot record (a write or sync failed): fail-stop, nothing more is
    /// released until the server is restarted.
    Unavailable,
    /// Anything else; details are logged, not shown.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Sql(#[from] SqlError),
    #[error("job `{0}` not found")]
    JobNotFound(String),
    #[error("job `{0}` belongs to another principal")]
    NotJobOwner(String),
    #[error("your roles do not allow {0}")]
    RoleNotPermitted(&'static str),
    /// The job ended without a result; carries its recorded rule and message.
    #[error("{message}")]
    JobEnded {
        code: &'static str,
        message: String,
        kind: ErrorKind,
    },
    #[error("cannot release the result: {0}")]
    Release(#[from] sandbox_release::ReleaseError),
    #[error("audit journal unavailable: {0}")]
    Audit(#[from] AuditError),
    #[error("engine setup failed: {0}")]
    Setup(String),
    /// Refused by a rule outside the SQL guard (approvals, consents, a code job's scope).
    #[error("{message}")]
    Denied { rule: EngineRule, message: String },
    /// The request is malformed (a bad contract, an invalid module).
    #[error("{message}")]
    Invalid { rule: EngineRule, message: String },
    /// A module may not run: the registry's refusal (approvals, expiry, runs).
    #[error("{0}")]
    ModuleRefused(Refusal),
    /// A template may not run: the registry's refusal.
    #[error("{0}")]
    TemplateRefused(Refusal),
    /// An audit query's text fails the SQL text limits.
    #[error("{0}")]
    AuditSqlText(SqlError),
    #[error("{0}")]
    NotFound(String),
    /// The caller's org may not act on this object (another owner's module, another consumer's
    /// consent).
    #[error("{0}")]
    NotPermitted(String),
    #[error("{0}")]
    Wasm(#[from] sandbox_wasm::WasmError),
    /// Every guest slot is taken; the job is refused rather than queued.
    #[error("{0} code jobs are already running; try again later")]
    Busy(usize),
    /// The client stopped waiting (cancelled, deadline, disconnect); its job was cancelled.
    #[error("the client went away; its job was cancelled")]
    ClientGone,
    /// A job whose execution waits for its result to be asked for was not asked for in time.
    #[error("nobody asked for the result within {0} s; the query was not run")]
    NotFetched(u64),
    /// Refused by an admission limit before anything ran; the client may retry after the hint.
    #[error("{message}")]
    Throttled {
        rule: EngineRule,
        message: String,
        retry_after: std::time::Duration,
    },
    /// A code job's guest failed; its logs and work units are journaled.
    #[error("{}", .0.error.public_message())]
    Guest(Box<sandbox_wasm::GuestFailure>),
    /// A code job's guest ran to its end, and what came after refused its output (the contract):
    /// the error is the refusal's, and the guest's logs and work units are journaled with it.
    #[error("{error}")]
    AfterGuest {
        error: Box<EngineError>,
        logs: Vec<String>,
        work_units: u64,
    },
}

impl EngineError {
    /// Stable code: the rule that denied, or the error's own code. Every code is a typed one's
    /// string (a rule, a refusal, another crate's error), written nowhere else.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Sql(e) | EngineError::AuditSqlText(e) => e.code(),
            EngineError::JobNotFound(_) => "job-not-found",
            EngineError::NotJobOwner(_) => "not-job-owner",
            EngineError::RoleNotPermitted(_) => "role-not-permitted",
            EngineError::JobEnded { code, .. } => code,
            EngineError::Release(e) => e.code(),
            EngineError::Audit(e) => e.code(),
            EngineError::Setup(_) => "engine-setup",
            EngineError::Denied { rule, .. }
            | EngineError::Invalid { rule, .. }
            | EngineError::Throttled { rule, .. } => rule.code(),
            EngineError::ModuleRefused(refusal) => refusal.code(),
            EngineError::TemplateRefused(refusal) => refusal.template_code(),
            EngineError::NotFound(_) => "not-found",
            EngineError::NotPermitted(_) => "not-permitted",
            EngineError::Wasm(e) => e.code(),
            EngineError::Guest(failure) => failure.error.code(),
            EngineError::AfterGuest { error, .. } => error.code(),
            EngineError::Busy(_) => "wasm-busy",
            EngineError::ClientGone => "client-disconnected",
            EngineError::NotFetched(_) => "not-fetched",
        }
    }

    /// A malformed argument of a governance call.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        EngineError::Invalid {
            rule: EngineRule::InvalidArgument,
            message: message.into(),
        }
    }

    /// A refusal by one of the engine's own rules.
    pub(crate) fn denied(rule: EngineRule, message: impl Into<String>) -> Self {
        EngineError::Denied {
            rule,
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Sql(e) => sql_kind(e),
            EngineError::JobNotFound(_) => ErrorKind::NotFound,
            EngineError::NotJobOwner(_) | EngineError::RoleNotPermitted(_) => {
                ErrorKind::PermissionDenied
            }
            EngineError::JobEnded { kind, .. } => *kind,
            EngineError::Release(sandbox_release::ReleaseError::TooManyRows { .. }) => {
                ErrorKind::ResourceExhausted
            }
            EngineError::Release(sandbox_release::ReleaseError::ContractViolation(_)) => {
                ErrorKind::Denied
            }
            EngineError::Audit(AuditError::Stopped | AuditError::Io { .. }) => {
                ErrorKind::Unavailable
            }
            EngineError::Release(_) | EngineError::Audit(_) | EngineError::Setup(_) => {
                ErrorKind::Internal
            }
            EngineError::Denied { .. }
            | EngineError::ModuleRefused(_)
            | EngineError::TemplateRefused(_) => ErrorKind::Denied,
            EngineError::Invalid { .. } | EngineError::AuditSqlText(_) => ErrorKind::Invalid,
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::NotPermitted(_) => ErrorKind::PermissionDenied,
            EngineError::Wasm(e) => wasm_kind(e),
            EngineError::Guest(failure) => wasm_kind(&failure.error),
            EngineError::AfterGuest { error, .. } => error.kind(),
            EngineError::Busy(_) | EngineError::Throttled { .. } => ErrorKind::ResourceExhausted,
            EngineError::ClientGone | EngineError::NotFetched(_) => ErrorKind::Cancelled,
        }
    }

    /// How long a client should wait before retrying, for refusals by a limit.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            EngineError::Throttled { retry_after, .. } => Some(*retry_after),
            EngineError::Busy(_) => Some(RETRY_AFTER),
            _ => None,
        }
    }
}

pub(crate) fn sql_kind(e: &SqlError) -> ErrorKind {
    match e {
        SqlError::Denied(_) => ErrorKind::Denied,
        SqlError::Syntax(_) | SqlError::Plan(_) => ErrorKind::Invalid,
        SqlError::ResourcesExhausted(_) | SqlError::TimeLimit(_) => ErrorKind::ResourceExhausted,
        SqlError::Cancelled => ErrorKind::Cancelled,
        SqlError::Execution(_) | SqlError::Dataset { .. } => ErrorKind::Internal,
    }
}

pub(crate) fn wasm_kind(e: &sandbox_wasm::WasmError) -> ErrorKind {
    use sandbox_wasm::WasmError;
    match e {
        WasmError::LimitExceeded { .. } => ErrorKind::ResourceExhausted,
        WasmError::Cancelled => ErrorKind::Cancelled,
        // Approved bytes that changed on disk are refused like an unapproved module.
        WasmError::ModuleChanged => ErrorKind::Denied,
        WasmError::Internal(_) => ErrorKind::Internal,
        // The module or what it did is at fault: a failed job, shown to its submitter.
        _ => ErrorKind::Invalid,
    }
}

impl From<datafusion::arrow::error::ArrowError> for EngineError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        EngineError::Setup(format!("arrow: {e}"))
    }
}

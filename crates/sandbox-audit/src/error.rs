//! Errors of the audit journal.

use std::path::PathBuf;

pub type Result<T, E = AuditError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("journal I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The journal is corrupt before its tail; the server refuses to start on it.
    #[error("journal {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// Another process holds the journal.
    #[error("journal {0} is locked by another process")]
    Locked(PathBuf),
    /// An earlier write or sync failed: nothing more is appended (fail-stop).
    #[error("journal stopped after a failed write or sync; no further event can be recorded")]
    Stopped,
    #[error("cannot encode audit event: {0}")]
    Encode(#[from] serde_json::Error),
}

impl AuditError {
    /// Stable code, shown to clients.
    pub fn code(&self) -> &'static str {
        match self {
            AuditError::Io { .. } => "audit-io",
            AuditError::Corrupt { .. } => "audit-corrupt",
            AuditError::Locked(_) => "audit-locked",
            AuditError::Stopped => "audit-stopped",
            AuditError::Encode(_) => "audit-encode",
        }
    }
}

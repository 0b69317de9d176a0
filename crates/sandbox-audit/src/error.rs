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
    #[error(
        "journal {0} is locked by another process (another sandboxd on the same data dir?): stop \
         it, or start this one with --data-dir DIR"
    )]
    Locked(PathBuf),
    /// An earlier write or sync failed: nothing more is appended (fail-stop).
    #[error("journal stopped after a failed write or sync; no further event can be recorded")]
    Stopped,
    #[error("cannot encode audit event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The journal holds fewer records than its last signed checkpoint: it was rolled back or
    /// truncated. The server refuses to start on it.
    #[error(
        "journal {path} holds {records} records but its last signed checkpoint covers {checkpoint}: \
         it was rolled back or truncated"
    )]
    Rollback {
        path: PathBuf,
        records: u64,
        checkpoint: u64,
    },
    /// The signing key is missing, malformed or does not match its public half.
    #[error("journal signing key: {0}")]
    Key(String),
    /// A proof or root for sizes the journal does not hold.
    #[error("{0}")]
    Proof(#[from] crate::merkle::ProofError),
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
            AuditError::Rollback { .. } => "audit-rollback",
            AuditError::Key(_) => "audit-key",
            AuditError::Proof(_) => "audit-proof",
        }
    }
}

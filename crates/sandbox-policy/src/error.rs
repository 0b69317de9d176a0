//! Errors of policy loading. Each names the file and line it comes from.

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A policy file or directory could not be read.
    #[error("cannot read policy {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key, a missing field or a value of the wrong type.
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    /// The TOML is well formed but the policy it states is not acceptable.
    #[error("{file}:{line}: {message}")]
    Invalid {
        file: String,
        line: usize,
        message: String,
    },
    /// A policy directory holds no policy file.
    #[error("no policy files (*.toml) in {0}")]
    Empty(PathBuf),
}

impl PolicyError {
    /// Stable code of the error, shown to clients and recorded in the journal.
    pub fn code(&self) -> &'static str {
        match self {
            PolicyError::Io { .. } => "policy-io",
            PolicyError::Syntax { .. } => "policy-syntax",
            PolicyError::Invalid { .. } => "policy-invalid",
            PolicyError::Empty(_) => "policy-empty",
        }
    }
}

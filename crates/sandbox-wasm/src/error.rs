//! Errors of the code sandbox. Each names the limit or the rule it enforces; none carries data.

/// A limit of the sandbox, named in errors and in the audit journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The deterministic work budget (wasmtime fuel).
    Fuel,
    /// Wall-clock time (epoch deadline).
    WallTime,
    /// Linear memory size.
    Memory,
    /// Table elements.
    Table,
    /// The guest's call stack.
    Stack,
    /// Bytes the guest may emit.
    OutputBytes,
    /// Rows the guest may emit.
    OutputRows,
    /// Batches (emit calls) the guest may make.
    OutputBatches,
    /// Log lines or bytes.
    Log,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Limit::Fuel => "fuel",
            Limit::WallTime => "wall-time",
            Limit::Memory => "memory",
            Limit::Table => "table",
            Limit::Stack => "stack",
            Limit::OutputBytes => "output-bytes",
            Limit::OutputRows => "output-rows",
            Limit::OutputBatches => "output-batches",
            Limit::Log => "log",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// Not a valid core WebAssembly module.
    #[error("malformed module: {0}")]
    Malformed(String),
    /// An import outside the sandbox ABI (WASI or anything else).
    #[error(
        "forbidden import `{module}.{name}`: only the `sandbox` host functions may be imported"
    )]
    ForbiddenImport { module: String, name: String },
    /// A sandbox import whose type is not the ABI's.
    #[error("import `sandbox.{name}` has the wrong type; expected {expected}")]
    ImportType { name: String, expected: String },
    /// The module lacks an export of the ABI.
    #[error("the module must export {0}")]
    MissingExport(&'static str),
    /// The module's manifest section is absent or invalid.
    #[error("manifest: {0}")]
    Manifest(String),
    /// A resource limit was hit.
    #[error("{} limit exceeded: {detail}", limit.name())]
    LimitExceeded { limit: Limit, detail: String },
    /// The guest trapped (unreachable, out-of-bounds access, division by zero, ...).
    #[error("the guest trapped: {0}")]
    Trap(String),
    /// The guest broke the ABI (bad pointer, calls out of order, malformed output).
    #[error("the guest broke the ABI: {0}")]
    Abi(String),
    /// The entry point returned a non-zero status.
    #[error("the guest reported failure (status {0})")]
    GuestFailed(i32),
    /// The stored bytes no longer hash to the approved SHA-256.
    #[error("the stored module no longer matches its approved hash")]
    ModuleChanged,
    #[error("cancelled")]
    Cancelled,
    /// The sandbox itself failed (not the guest's fault).
    #[error("sandbox error: {0}")]
    Internal(String),
}

impl WasmError {
    /// A stable code for clients and the journal.
    pub fn code(&self) -> &'static str {
        match self {
            WasmError::Malformed(_) => "wasm-malformed",
            WasmError::ForbiddenImport { .. } | WasmError::ImportType { .. } => {
                "wasm-forbidden-import"
            }
            WasmError::MissingExport(_) => "wasm-missing-export",
            WasmError::Manifest(_) => "wasm-manifest",
            WasmError::LimitExceeded { .. } => "wasm-limit",
            WasmError::Trap(_) => "wasm-trap",
            WasmError::Abi(_) => "wasm-abi",
            WasmError::GuestFailed(_) => "wasm-guest-failed",
            WasmError::ModuleChanged => "module-changed",
            WasmError::Cancelled => "cancelled",
            WasmError::Internal(_) => "internal",
        }
    }

    /// The message for the job's submitter: nothing the guest chose (a status, a size it asked
    /// for, what it wrote) may reach the client, since a guest could encode data in it. The full
    /// message goes to the audit journal.
    pub fn public_message(&self) -> String {
        match self {
            WasmError::LimitExceeded { limit, .. } => format!("{} limit exceeded", limit.name()),
            WasmError::Trap(_) => "the guest trapped".into(),
            WasmError::Abi(_) => "the guest broke the ABI".into(),
            WasmError::GuestFailed(_) => "the guest reported failure".into(),
            other => other.to_string(),
        }
    }

    /// Whether the module itself is unacceptable (refused at upload).
    pub fn is_invalid_module(&self) -> bool {
        matches!(
            self,
            WasmError::Malformed(_)
                | WasmError::ForbiddenImport { .. }
                | WasmError::ImportType { .. }
                | WasmError::MissingExport(_)
                | WasmError::Manifest(_)
        )
    }

    pub(crate) fn limit(limit: Limit, detail: impl Into<String>) -> Self {
        WasmError::LimitExceeded {
            limit,
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = WasmError> = std::result::Result<T, E>;

/// Why the host stopped a guest: raised inside wasmtime as an error and recovered after the call.
#[derive(Debug)]
pub(crate) struct Abort(pub WasmError);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Abort {}

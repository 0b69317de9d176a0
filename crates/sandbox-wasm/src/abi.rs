//! The guest ABI as data: names and types of the host imports and the exports, and the manifest.

use wasmtime::ValType;

/// The one import module a guest may use.
pub const IMPORT_MODULE: &str = "sandbox";
/// The exported entry point: `run(params_len: i32) -> i32`.
pub const ENTRY: &str = "run";
/// The exported linear memory the host reads and writes.
pub const MEMORY: &str = "memory";
/// The custom section holding the module's manifest (JSON).
pub const MANIFEST_SECTION: &str = "sandbox.manifest";
/// The custom section holding the module's input query (UTF-8 SQL): part of the bytes the
/// owners approve by hash, so the input cannot change at run time without a new approval.
pub const INPUT_SECTION: &str = "sandbox.input";
/// Longest input query a module may declare, in bytes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// A host import: name, parameter types, result types.
pub struct HostImport {
    pub name: &'static str,
    pub params: &'static [ValType],
    pub results: &'static [ValType],
}

/// Every host function of the ABI. A module importing anything else is refused.
pub const HOST_IMPORTS: &[HostImport] = &[
    HostImport {
        name: "input_next",
        params: &[],
        results: &[ValType::I64],
    },
    HostImport {
        name: "input_read",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I32],
    },
    HostImport {
        name: "params_read",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I32],
    },
    HostImport {
        name: "output_emit",
        params: &[ValType::I32, ValType::I32],
        results: &[ValType::I32],
    },
    HostImport {
        name: "log",
        params: &[ValType::I32, ValType::I32],
        results: &[],
    },
];

impl HostImport {
    pub fn signature(&self) -> String {
        let list = |types: &[ValType]| {
            types
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!("({}) -> ({})", list(self.params), list(self.results))
    }
}

/// What a module declares about itself in its `sandbox.manifest` section. The declaration is part
/// of the bytes the owners approve by hash, so it cannot change without a new approval.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// A human-readable name.
    pub name: String,
    /// The purpose the module serves; consents are given per purpose.
    pub purpose: String,
    /// The columns its input query may read, as `dataset.column`.
    pub input: Vec<String>,
}

//! The wasmtime engine, module inspection and caching, and one guest run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use ring::digest;
use wasmtime::wasmparser::{Parser, Payload};
use wasmtime::{
    Config, Engine, ExternType, InstancePre, Linker, Module, OptLevel, Store, Trap, UpdateDeadline,
    ValType,
};

use crate::abi::{self, HOST_IMPORTS, Manifest};
use crate::error::{Abort, Limit, Result, WasmError};
use crate::host::{self, HostState};

/// Limits of one guest run. Every one is enforced by the host, none by the guest.
#[derive(Debug, Clone)]
pub struct WasmLimits {
    /// Deterministic work budget (wasmtime fuel units; about one per instruction).
    pub fuel: u64,
    /// Wall-clock limit, enforced with epoch interruption.
    pub wall_time: Duration,
    /// Largest linear memory, in bytes.
    pub memory_bytes: usize,
    /// Most table elements.
    pub table_elements: usize,
    /// Largest WebAssembly stack, in bytes.
    pub stack_bytes: usize,
    /// Most output bytes (sum of the IPC streams the guest emits).
    pub max_output_bytes: usize,
    /// Most output rows.
    pub max_output_rows: usize,
    /// Most `output_emit` calls.
    pub max_output_batches: usize,
    /// Most log lines; one more fails the run.
    pub max_log_lines: usize,
    /// Longest log line kept; longer lines are cut.
    pub max_log_line_bytes: usize,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits {
            fuel: 200_000_000_000,
            wall_time: Duration::from_secs(60),
            memory_bytes: 512 << 20,
            table_elements: 10_000,
            stack_bytes: 512 << 10,
            max_output_bytes: 64 << 20,
            max_output_rows: 2_000_000,
            max_output_batches: 10_000,
            max_log_lines: 100,
            max_log_line_bytes: 512,
        }
    }
}

/// What a run produced: output batches (not yet released), logs for the journal, work done.
#[derive(Debug)]
pub struct GuestOutput {
    /// The schema of the output; `None` when the guest emitted nothing.
    pub schema: Option<SchemaRef>,
    pub batches: Vec<RecordBatch>,
    /// Guest log lines, for the audit journal only.
    pub logs: Vec<String>,
    /// Fuel consumed: the deterministic work units of the run.
    pub work_units: u64,
    pub input_rows: u64,
    pub duration: Duration,
}

/// A run that failed, with what the guest logged and the work it did until then (for the
/// journal).
#[derive(Debug)]
pub struct GuestFailure {
    pub error: WasmError,
    pub logs: Vec<String>,
    pub work_units: u64,
}

impl std::fmt::Display for GuestFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for GuestFailure {}

impl From<WasmError> for GuestFailure {
    fn from(error: WasmError) -> Self {
        GuestFailure {
            error,
            logs: Vec::new(),
            work_units: 0,
        }
    }
}

/// A module that passed inspection.
#[derive(Debug, Clone)]
pub struct InspectedModule {
    pub sha256: String,
    pub size: usize,
    pub manifest: Manifest,
    /// The input query of its `sandbox.input` section, when it declares one.
    pub input_query: Option<String>,
    /// Time spent compiling (zero when it came from the cache).
    pub compile_time: Duration,
}

/// The code sandbox. One per process: it owns the compiler, the compiled-module cache and the
/// epoch ticker thread.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    limits: WasmLimits,
    cache: Mutex<HashMap<String, InstancePre<HostState>>>,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for WasmRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmRuntime")
            .field("limits", &self.limits)
            .finish()
    }
}

/// How often the epoch advances: the granularity of the wall-clock limit and of cancellation.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Most columns a manifest may declare.
const MAX_MANIFEST_COLUMNS: usize = 256;
/// Compiled modules kept; beyond it the cache is cleared (recompiling is correct, just slower).
const CACHE_ENTRIES: usize = 64;

impl WasmRuntime {
    pub fn new(limits: WasmLimits) -> Result<Self> {
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.stack_bytes)
            // Core WebAssembly only: the crate is built without the threads, component-model,
            // GC and WASI features, so modules needing them fail validation.
            .cranelift_opt_level(OptLevel::Speed);
        let engine = Engine::new(&config).map_err(|e| WasmError::Internal(e.to_string()))?;
        let linker = host::linker(&engine)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| WasmError::Internal(format!("cannot start the epoch ticker: {e}")))?;
        }
        Ok(WasmRuntime {
            engine,
            linker,
            limits,
            cache: Mutex::new(HashMap::new()),
            ticker_stop,
        })
    }

    pub fn limits(&self) -> &WasmLimits {
        &self.limits
    }

    /// Validates and compiles a module, checks its imports and exports against the ABI, reads its
    /// manifest, and caches the compiled code by SHA-256. Refused modules are not cached.
    pub fn inspect(&self, bytes: &[u8]) -> Result<InspectedModule> {
        let sha256 = sha256_hex(bytes);
        let manifest = read_manifest(bytes)?;
        let input_query = read_input(bytes)?;
        let started = Instant::now();
        let cached = self.cached(&sha256).is_some();
        if !cached {
            let pre = self.compile(bytes)?;
            self.store_cache(&sha256, pre);
        }
        Ok(InspectedModule {
            sha256,
            size: bytes.len(),
            manifest,
            input_query,
            compile_time: if cached {
                Duration::ZERO
            } else {
                started.elapsed()
            },
        })
    }

    fn cached(&self, sha256: &str) -> Option<InstancePre<HostState>> {
        self.cache
            .lock()
            .expect("module cache lock is never poisoned")
            .get(sha256)
            .cloned()
    }

    fn store_cache(&self, sha256: &str, pre: InstancePre<HostState>) {
        let mut cache = self
            .cache
            .lock()
            .expect("module cache lock is never poisoned");
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(sha256.to_string(), pre);
    }

    fn compile(&self, bytes: &[u8]) -> Result<InstancePre<HostState>> {
        if !bytes.starts_with(b"\0asm") {
            return Err(WasmError::Malformed(
                "not a WebAssembly binary (missing the `\\0asm` header)".into(),
            ));
        }
        let module = Module::from_binary(&self.engine, bytes)
            .map_err(|e| WasmError::Malformed(root_message(&e)))?;
        check_imports(&module)?;
        check_exports(&module)?;
        self.linker
            .instantiate_pre(&module)
            .map_err(|e| WasmError::Internal(root_message(&e)))
    }

    /// Runs a module over input batches. Blocking: call it from a blocking thread (the engine uses
    /// `spawn_blocking`), never on an async worker. `bytes` are used only on a cache miss and must
    /// hash to `sha256`.
    pub fn run(
        &self,
        sha256: &str,
        bytes: impl FnOnce() -> Result<Vec<u8>>,
        input: Vec<RecordBatch>,
        params: &[u8],
        cancel: Arc<AtomicBool>,
    ) -> Result<GuestOutput, GuestFailure> {
        let started = Instant::now();
        let pre = match self.cached(sha256) {
            Some(pre) => pre,
            None => {
                let bytes = bytes()?;
                if sha256_hex(&bytes) != sha256 {
                    return Err(WasmError::ModuleChanged.into());
                }
                let pre = self.compile(&bytes)?;
                self.store_cache(sha256, pre.clone());
                pre
            }
        };
        let input_rows = input.iter().map(|b| b.num_rows() as u64).sum();
        let state = HostState::new(&self.limits, input, params.to_vec());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store
            .set_fuel(self.limits.fuel)
            .map_err(|e| WasmError::Internal(e.to_string()))?;
        let deadline = started + self.limits.wall_time;
        let wall_time = self.limits.wall_time;
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |_| {
            if cancel.load(Ordering::Relaxed) {
                return Err(wasmtime::Error::new(Abort(WasmError::Cancelled)));
            }
            if Instant::now() >= deadline {
                return Err(wasmtime::Error::new(Abort(WasmError::limit(
                    Limit::WallTime,
                    format!("the guest ran longer than {} ms", wall_time.as_millis()),
                ))));
            }
            Ok(UpdateDeadline::Continue(1))
        });

        // The start function (if any) runs inside `instantiate`, under the same limits.
        let outcome = pre.instantiate(&mut store).and_then(|instance| {
            let run = instance.get_typed_func::<i32, i32>(&mut store, abi::ENTRY)?;
            run.call(&mut store, params.len() as i32)
        });
        let work_units = self.limits.fuel - store.get_fuel().unwrap_or(0);
        let failure = match outcome {
            Ok(0) => None,
            Ok(status) => Some(WasmError::GuestFailed(status)),
            Err(e) => Some(classify(e, store.data())),
        };
        let state = store.into_data();
        if let Some(error) = failure {
            return Err(GuestFailure {
                error,
                logs: state.logs.lines,
                work_units,
            });
        }
        let (schema, batches) = state.output.finish();
        Ok(GuestOutput {
            schema,
            batches,
            logs: state.logs.lines,
            work_units,
            input_rows,
            duration: started.elapsed(),
        })
    }
}

impl Drop for WasmRuntime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

/// The `sandbox.manifest` custom section, parsed. Exactly one is required.
fn read_manifest(bytes: &[u8]) -> Result<Manifest> {
    let mut found = None;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| WasmError::Malformed(e.message().to_string()))?;
        if let Payload::CustomSection(section) = payload
            && section.name() == abi::MANIFEST_SECTION
        {
            if found.is_some() {
                return Err(WasmError::Manifest(format!(
                    "more than one `{}` section",
                    abi::MANIFEST_SECTION
                )));
            }
            found = Some(section.data().to_vec());
        }
    }
    let data = found.ok_or_else(|| {
        WasmError::Manifest(format!(
            "the module has no `{}` custom section declaring its name, purpose and input",
            abi::MANIFEST_SECTION
        ))
    })?;
    let manifest: Manifest = serde_json::from_slice(&data)
        .map_err(|e| WasmError::Manifest(format!("invalid JSON: {e}")))?;
    // The manifest ends up in the journal and in every listing: keep it short and plain.
    let plain = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ' '))
    };
    if !plain(&manifest.name, 64) {
        return Err(WasmError::Manifest(
            "`name` must be 1-64 letters, digits, spaces, `_`, `-` or `.`".into(),
        ));
    }
    if !plain(&manifest.purpose, 64) || manifest.purpose.contains(['.', ' ']) {
        return Err(WasmError::Manifest(
            "`purpose` must be 1-64 letters, digits, `_` or `-`".into(),
        ));
    }
    if manifest.input.is_empty() || manifest.input.len() > MAX_MANIFEST_COLUMNS {
        return Err(WasmError::Manifest(format!(
            "`input` must list 1 to {MAX_MANIFEST_COLUMNS} columns"
        )));
    }
    if let Some(bad) = manifest
        .input
        .iter()
        .find(|c| !plain(c, 129) || c.contains(' ') || c.matches('.').count() != 1)
    {
        return Err(WasmError::Manifest(format!(
            "input `{}` is not of the form dataset.column",
            bad.chars().take(64).collect::<String>()
        )));
    }
    Ok(manifest)
}

/// The `sandbox.input` custom section: at most one, UTF-8, bounded.
fn read_input(bytes: &[u8]) -> Result<Option<String>> {
    let mut found: Option<String> = None;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| WasmError::Malformed(e.message().to_string()))?;
        if let Payload::CustomSection(section) = payload
            && section.name() == abi::INPUT_SECTION
        {
            if found.is_some() {
                return Err(WasmError::Manifest(format!(
                    "more than one `{}` section",
                    abi::INPUT_SECTION
                )));
            }
            if section.data().len() > abi::MAX_INPUT_BYTES {
                return Err(WasmError::Manifest(format!(
                    "the input query is longer than {} bytes",
                    abi::MAX_INPUT_BYTES
                )));
            }
            let text = std::str::from_utf8(section.data())
                .map_err(|_| WasmError::Manifest("the input query is not UTF-8".into()))?;
            if text.trim().is_empty() {
                return Err(WasmError::Manifest("the input query is empty".into()));
            }
            found = Some(text.to_string());
        }
    }
    Ok(found)
}

fn check_imports(module: &Module) -> Result<()> {
    for import in module.imports() {
        let forbidden = || WasmError::ForbiddenImport {
            module: import.module().to_string(),
            name: import.name().to_string(),
        };
        if import.module() != abi::IMPORT_MODULE {
            return Err(forbidden());
        }
        let Some(expected) = HOST_IMPORTS.iter().find(|h| h.name == import.name()) else {
            return Err(forbidden());
        };
        let ExternType::Func(func) = import.ty() else {
            return Err(forbidden());
        };
        let same = func.params().len() == expected.params.len()
            && func.results().len() == expected.results.len()
            && func
                .params()
                .zip(expected.params)
                .all(|(a, b)| ValType::eq(&a, b))
            && func
                .results()
                .zip(expected.results)
                .all(|(a, b)| ValType::eq(&a, b));
        if !same {
            return Err(WasmError::ImportType {
                name: import.name().to_string(),
                expected: expected.signature(),
            });
        }
    }
    Ok(())
}

fn check_exports(module: &Module) -> Result<()> {
    let entry = module.get_export(abi::ENTRY);
    let entry_ok = matches!(
        entry,
        Some(ExternType::Func(ref f))
            if f.params().len() == 1
                && f.results().len() == 1
                && f.params().all(|p| matches!(p, ValType::I32))
                && f.results().all(|r| matches!(r, ValType::I32))
    );
    if !entry_ok {
        return Err(WasmError::MissingExport("`run: (i32) -> i32`"));
    }
    if !matches!(module.get_export(abi::MEMORY), Some(ExternType::Memory(_))) {
        return Err(WasmError::MissingExport("a linear memory named `memory`"));
    }
    Ok(())
}

/// Maps what wasmtime returned to the sandbox's error: the host's own aborts first, then the
/// limiter's record, then traps.
fn classify(error: wasmtime::Error, state: &HostState) -> WasmError {
    let error = match error.downcast::<Abort>() {
        Ok(Abort(inner)) => return inner,
        Err(other) => other,
    };
    if let Some(hit) = state.limiter.hit() {
        return hit;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => WasmError::limit(Limit::Fuel, "the guest used up its work budget"),
        Some(Trap::StackOverflow) => {
            WasmError::limit(Limit::Stack, "the guest's call stack overflowed")
        }
        Some(Trap::Interrupt) => WasmError::limit(Limit::WallTime, "the guest was interrupted"),
        Some(trap) => WasmError::Trap(trap.to_string()),
        None => WasmError::Trap(root_message(&error)),
    }
}

fn root_message(error: &wasmtime::Error) -> String {
    error.root_cause().to_string()
}

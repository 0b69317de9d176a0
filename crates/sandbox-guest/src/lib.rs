//! SDK for writing sandbox WASM jobs in safe Rust.
//!
//! A job is a function from parameters to `Result<(), GuestError>` that reads typed input
//! batches, emits output batches and logs. [`entry!`] exports it as the ABI's `run` function,
//! [`manifest!`] embeds the `sandbox.manifest` section that declares the job's purpose and
//! input columns, and [`input!`] the `sandbox.input` section with the input query itself:
//!
//! ```ignore
//! sandbox_guest::manifest!(r#"{"name":"demo","purpose":"credit_assessment","input":["tax_monthly.credit_code"]}"#);
//! sandbox_guest::input!("SELECT credit_code FROM tax_monthly");
//! sandbox_guest::entry!(job);
//!
//! fn job(_params: &[u8]) -> Result<(), sandbox_guest::GuestError> {
//!     for batch in sandbox_guest::input() {
//!         let batch = batch?;
//!         sandbox_guest::log(&format!("{} rows", batch.num_rows()));
//!         sandbox_guest::emit(&batch)?;
//!     }
//!     Ok(())
//! }
//! ```
//!
//! The ABI itself (imports, exports, batch encoding) is documented in the `sandbox-wasm` crate and
//! in `crates/sandbox-wasm/GUEST_ABI.md`. On targets other than `wasm32` the host functions do not
//! exist: the encoding helpers ([`decode`], [`encode`]) still work, so a job's model can be tested
//! and benchmarked natively.
//!
//! The `unsafe` of the ABI (the import block, `#[no_mangle]`, `#[link_section]`) lives in this
//! crate and its macros: it is the one crate (with the example that uses its macros) that denies
//! `unsafe_code` instead of forbidding it. Its Arrow is `arrow-array`, `arrow-schema`,
//! `arrow-buffer` and `arrow-ipc` without default features (the host's version, without compute
//! kernels, so guests stay small); it never depends on tokio, DataFusion, wasmtime or the wire
//! (checked by `.ci/run`). `.cargo/config.toml` sets one codegen unit, SIMD128 and stripped names
//! for the wasm32 target only.
//!
//! `examples/credit-scoring` is the bank's scorecard built on it (a logistic model over revenue and
//! VAT trends, headcount growth, social-insurance arrears, provident-fund coverage, court cases,
//! the dishonest-debtor flag and penalties, mapped to 0-1000 points and grades A-E), with its input
//! query (`INPUT_QUERY`); the benchmark runs the same `score_batch` natively. The model brings its
//! own `ln`, so a score is bit-for-bit the same natively and in the sandbox (and does not pay for
//! the software `libm` inside WebAssembly).

use std::fmt;
use std::sync::Arc;

pub use arrow_array;
pub use arrow_array::RecordBatch;
pub use arrow_schema;

/// An error inside a job; its message is logged and the run fails.
#[derive(Debug)]
pub struct GuestError(pub String);

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GuestError {}

impl From<arrow_schema::ArrowError> for GuestError {
    fn from(e: arrow_schema::ArrowError) -> Self {
        GuestError(e.to_string())
    }
}

impl GuestError {
    pub fn new(message: impl Into<String>) -> Self {
        GuestError(message.into())
    }
}

/// Decodes one Arrow IPC stream holding one batch (the form input batches take).
pub fn decode(bytes: Vec<u8>) -> Result<RecordBatch, GuestError> {
    let buffer = arrow_buffer::Buffer::from_vec(bytes);
    let mut decoder = arrow_ipc::reader::StreamDecoder::new();
    let mut buffer = buffer;
    let mut found = None;
    while !buffer.is_empty() {
        if let Some(batch) = decoder.decode(&mut buffer)? {
            if found.is_some() {
                return Err(GuestError::new("more than one batch in an input stream"));
            }
            found = Some(batch);
        }
    }
    decoder.finish()?;
    found.ok_or_else(|| GuestError::new("input stream without a batch"))
}

/// Encodes batches (sharing one schema) as one Arrow IPC stream (the form output takes).
pub fn encode(batches: &[RecordBatch]) -> Result<Vec<u8>, GuestError> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .ok_or_else(|| GuestError::new("nothing to encode"))?;
    let mut writer = arrow_ipc::writer::StreamWriter::try_new(Vec::new(), &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    Ok(writer.into_inner()?)
}

/// Builds a batch from named columns, for output.
pub fn batch(columns: Vec<(&str, arrow_array::ArrayRef)>) -> Result<RecordBatch, GuestError> {
    let fields: Vec<arrow_schema::Field> = columns
        .iter()
        .map(|(name, array)| arrow_schema::Field::new(*name, array.data_type().clone(), false))
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(arrow_schema::Schema::new(fields)),
        columns.into_iter().map(|(_, a)| a).collect(),
    )?)
}

#[cfg(target_arch = "wasm32")]
mod host {
    #[allow(unsafe_code)]
    #[link(wasm_import_module = "sandbox")]
    unsafe extern "C" {
        pub fn input_next() -> i64;
        pub fn input_read(ptr: i32, len: i32) -> i32;
        pub fn params_read(ptr: i32, len: i32) -> i32;
        pub fn output_emit(ptr: i32, len: i32) -> i32;
        pub fn log(ptr: i32, len: i32);
    }
}

/// The job's input, batch by batch, pulled from the host.
#[derive(Debug, Default)]
pub struct Input {
    done: bool,
}

/// The input batches of this run.
pub fn input() -> Input {
    Input::default()
}

impl Iterator for Input {
    type Item = Result<RecordBatch, GuestError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match next_input_bytes() {
            Some(bytes) => Some(decode(bytes)),
            None => {
                self.done = true;
                None
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
fn next_input_bytes() -> Option<Vec<u8>> {
    // SAFETY: the host functions only read and write inside the buffer we pass, whose length
    // we give; the host checks the range against our memory as well.
    let len = unsafe { host::input_next() };
    if len < 0 {
        return None;
    }
    // Not zeroed first: the host fills it (batches are large, and this is the hot path).
    let mut buffer: Vec<u8> = Vec::with_capacity(len as usize);
    let copied = unsafe { host::input_read(buffer.as_mut_ptr() as i32, len as i32) };
    // SAFETY: the host wrote `copied` bytes, at most `len` (it traps the guest otherwise), at the
    // start of the buffer's allocation.
    unsafe { buffer.set_len(copied.clamp(0, len as i32) as usize) };
    Some(buffer)
}

#[cfg(not(target_arch = "wasm32"))]
fn next_input_bytes() -> Option<Vec<u8>> {
    None
}

/// Hands output batches to the host (one IPC stream per call; all calls share a schema).
pub fn emit_all(batches: &[RecordBatch]) -> Result<(), GuestError> {
    let bytes = encode(batches)?;
    emit_bytes(&bytes)
}

/// Hands one output batch to the host.
pub fn emit(batch: &RecordBatch) -> Result<(), GuestError> {
    emit_all(std::slice::from_ref(batch))
}

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
fn emit_bytes(bytes: &[u8]) -> Result<(), GuestError> {
    // SAFETY: the host reads `len` bytes at `ptr`, inside our memory.
    let status = unsafe { host::output_emit(bytes.as_ptr() as i32, bytes.len() as i32) };
    if status == 0 {
        Ok(())
    } else {
        Err(GuestError(format!("output refused (status {status})")))
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn emit_bytes(_bytes: &[u8]) -> Result<(), GuestError> {
    Err(GuestError::new("no sandbox host outside wasm32"))
}

/// Writes one log line to the audit journal (never to the client); the host cuts long lines and
/// fails runs that log too much.
pub fn log(line: &str) {
    #[cfg(target_arch = "wasm32")]
    #[allow(unsafe_code)]
    // SAFETY: the host reads `len` bytes at `ptr`, inside our memory.
    unsafe {
        host::log(line.as_ptr() as i32, line.len() as i32)
    };
    #[cfg(not(target_arch = "wasm32"))]
    let _ = line;
}

/// The job parameters (JSON by convention), as passed to the job.
#[doc(hidden)]
#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
pub fn __params(len: i32) -> Vec<u8> {
    let mut buffer = vec![0u8; len.max(0) as usize];
    if len > 0 {
        // SAFETY: the host writes at most `len` bytes into our buffer.
        let copied = unsafe { host::params_read(buffer.as_mut_ptr() as i32, len) };
        buffer.truncate(copied.max(0) as usize);
    }
    buffer
}

/// Outside the sandbox there are no parameters.
#[doc(hidden)]
#[cfg(not(target_arch = "wasm32"))]
pub fn __params(_len: i32) -> Vec<u8> {
    Vec::new()
}

/// Runs a job function as the entry point: reads the parameters, logs an error and returns a
/// non-zero status on failure.
#[doc(hidden)]
pub fn __run(params_len: i32, job: fn(&[u8]) -> Result<(), GuestError>) -> i32 {
    let params = __params(params_len);
    match job(&params) {
        Ok(()) => 0,
        Err(error) => {
            log(&format!("job failed: {error}"));
            1
        }
    }
}

/// Exports `job: fn(&[u8]) -> Result<(), GuestError>` as the ABI's `run` entry point.
#[macro_export]
macro_rules! entry {
    ($job:path) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn run(params_len: i32) -> i32 {
            $crate::__run(params_len, $job)
        }

        // Elsewhere the job is not exported, but it is still the job: keep it type-checked and
        // used, so native builds (tests, benchmarks) compile it without warnings.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(&[u8]) -> Result<(), $crate::GuestError> = $job;
    };
}

/// Embeds the `sandbox.input` custom section: the job's input query (a string literal, or
/// `include_str!` of a `.sql` file). It is part of the module's bytes, so the owners approve the
/// query with the code, and every run reads exactly it.
#[macro_export]
macro_rules! input {
    ($sql:expr) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        #[unsafe(link_section = "sandbox.input")]
        #[used]
        static __SANDBOX_INPUT: [u8; $sql.len()] = {
            let bytes = $sql.as_bytes();
            let mut out = [0u8; $sql.len()];
            let mut i = 0;
            while i < bytes.len() {
                out[i] = bytes[i];
                i += 1;
            }
            out
        };
    };
}

/// Embeds the `sandbox.manifest` custom section: a JSON string literal with `name`, `purpose` and
/// `input` (the `dataset.column`s the job's input query may read).
#[macro_export]
macro_rules! manifest {
    ($json:expr) => {
        #[cfg(target_arch = "wasm32")]
        #[allow(unsafe_code)]
        #[unsafe(link_section = "sandbox.manifest")]
        #[used]
        static __SANDBOX_MANIFEST: [u8; $json.len()] = {
            let bytes = $json.as_bytes();
            let mut out = [0u8; $json.len()];
            let mut i = 0;
            while i < bytes.len() {
                out[i] = bytes[i];
                i += 1;
            }
            out
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Int64Array, StringArray};

    #[test]
    fn encode_then_decode_round_trips() {
        let batch = batch(vec![
            ("key", Arc::new(StringArray::from(vec!["a", "b"])) as _),
            ("score", Arc::new(Int64Array::from(vec![1, 2])) as _),
        ])
        .unwrap();
        let bytes = encode(std::slice::from_ref(&batch)).unwrap();
        assert_eq!(decode(bytes).unwrap(), batch);
    }

    #[test]
    fn decode_refuses_garbage() {
        assert!(decode(b"not arrow".to_vec()).is_err());
    }
}

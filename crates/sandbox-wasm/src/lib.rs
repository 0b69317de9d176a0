//! The code sandbox: approved WebAssembly modules run over sensitive rows in wasmtime, with no
//! ambient authority, and hand their output to the host for the release gate.
//!
//! # Guest ABI
//!
//! This is the whole contract between the sandbox and a guest; any language that compiles to a
//! core WebAssembly module can target it (`crates/sandbox-wasm/GUEST_ABI.md` says the same, with
//! examples in the text format and in Rust).
//!
//! * **Module**: a core WebAssembly module (`wasm32-unknown-unknown`; no WASI, no components, no
//!   threads). Its only imports are the host functions below, under the module name `sandbox`;
//!   a module importing anything else (a WASI function, a memory, a global) is refused at upload.
//! * **Exports**: `memory` (the linear memory the host reads and writes) and
//!   `run(params_len: i32) -> i32`, the entry point. `0` means success; any other value fails the
//!   job with that status.
//! * **Manifest**: one custom section named `sandbox.manifest` holding JSON
//!   `{"name": "...", "purpose": "...", "input": ["dataset.column", ...]}`: what the module is,
//!   the purpose consents must cover, and the columns its input may read. It is part of the
//!   hashed bytes, so owners approve the declaration together with the code.
//! * **Batches** cross the boundary as Arrow IPC *stream* bytes. Every input batch arrives as a
//!   self-contained stream (schema message, one record batch, end marker); strings arrive as
//!   `Utf8`. Every emit is a self-contained stream of one or more batches; all emits of a run
//!   share one schema.
//!
//! | import (`sandbox.`) | type | meaning |
//! |---|---|---|
//! | `input_next` | `() -> i64` | advance to the next input batch; its size in bytes, or `-1` at the end |
//! | `input_read` | `(ptr: i32, len: i32) -> i32` | copy the current batch to `ptr` (`len` must be at least its size); bytes copied |
//! | `params_read` | `(ptr: i32, len: i32) -> i32` | copy the job parameters (`len` as passed to `run`); bytes copied |
//! | `output_emit` | `(ptr: i32, len: i32) -> i32` | hand over an IPC stream of output batches; `0` |
//! | `log` | `(ptr: i32, len: i32)` | one UTF-8 log line, cut at the line limit; for the audit journal only |
//!
//! A pointer or length outside the guest's memory, a read before `input_next`, or output that is
//! not a readable IPC stream traps the guest (`wasm-abi`).
//!
//! # Limits
//!
//! Every run gets a fresh store and instance, with fuel (a deterministic work budget, reported as
//! work units), an epoch deadline (wall time, checked every 5 ms, also used for cancellation), a
//! resource limiter (one memory, bounded bytes; bounded table elements), a small WebAssembly stack,
//! and caps on output bytes, rows and emits and on log lines. Host work done for the guest
//! (copying batches) is charged as fuel too. Compiled modules are cached by SHA-256.
//! [`WasmRuntime::run`] blocks: callers run it on a blocking thread so a runaway guest never
//! occupies an async worker.
//!
//! # Upload and run
//!
//! The runtime is wasmtime with Cranelift and without WASI, the component model, threads or GC.
//! [`WasmRuntime::inspect`] (at upload) validates and compiles the module, checks its imports
//! (module, name and type) and exports, reads the manifest and caches the `InstancePre` by SHA-256.
//! [`WasmRuntime::run`] gives every job a fresh `Store` and instance: fuel (work units), an epoch
//! deadline (a ticker thread advances the epoch every 5 ms; the callback checks the wall-clock
//! deadline and the cancellation flag), a `ResourceLimiter` (one memory, bounded bytes and table
//! elements, recording which limit refused), a small `max_wasm_stack`, and caps on output bytes,
//! rows, emits and log lines. Host copies are charged as fuel. A module's input query lives in a
//! [`INPUT_SECTION`] custom section (the guest SDK's `input!`), so owners approve it with the
//! bytes.
//!
//! [`untrusted_ipc`] checks Arrow IPC from outside the host (guest output, Flight SQL parameter
//! batches) before any reader sees it. Arrow's reader still panics on some forged headers (an
//! unknown type, a short validity buffer), so guest output is decoded under `catch_unwind`, and
//! Flight parameter messages are never decoded (`ipc_message_rows` reads the row count from the
//! checked header).
//!
//! # Codes
//!
//! | code | meaning |
//! |---|---|
//! | `wasm-malformed`, `wasm-forbidden-import`, `wasm-missing-export`, `wasm-manifest` | upload: not a valid module of the ABI |
//! | `wasm-limit` | a run hit a limit; the message names it (`fuel`, `wall-time`, `memory`, `table`, `stack`, `output-bytes`, `output-rows`, `output-batches`, `log`) |
//! | `wasm-trap`, `wasm-abi`, `wasm-guest-failed` | the guest trapped, broke the ABI, or returned a failure status |
//! | `module-changed` | the stored bytes no longer hash to the approved SHA-256 |
//!
//! None carries data; client messages for guest failures are fixed texts, the details go to the
//! journal.

mod abi;
mod error;
mod host;
mod runtime;
pub mod untrusted_ipc;

pub use abi::{
    ENTRY, HOST_IMPORTS, HostImport, IMPORT_MODULE, INPUT_SECTION, MANIFEST_SECTION,
    MAX_INPUT_BYTES, MEMORY, Manifest,
};
pub use error::{Limit, Result, WasmError};
pub use runtime::{
    GuestFailure, GuestOutput, InspectedModule, WasmLimits, WasmRuntime, sha256_hex,
};

//! The audit journal: every access to the sandbox is recorded here before its result is delivered.
//!
//! Layout of `<data-dir>/audit/journal.log`: an 8-byte magic header, then one frame per record:
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32 of payload | payload (JSON AuditEvent) | 32-byte chain hash
//! ```
//!
//! The chain hash of record *n* is `SHA-256(chain hash of record n-1 || payload n)`, starting from 32
//! zero bytes, so altering, deleting or reordering any record breaks every later hash. The CRC lets a
//! reader tell a torn write from a complete record.
//!
//! Key types:
//! - [`Journal`]: opens (repairing a torn tail, refusing corruption in the middle), appends with
//!   group commit (one `fdatasync` for every batch of concurrent appends) and reads committed events.
//! - [`AuditEvent`] and [`Decision`]: what is recorded.
//! - [`verify_file`]: the offline check behind `sandbox audit verify`, which needs no server.
//!
//! Fail-stop: if a write or `fdatasync` fails, the journal refuses every later append, so the server
//! can release nothing further rather than release without a durable record.

pub mod checkpoint;
mod error;
mod event;
mod frame;
mod journal;
pub mod merkle;
mod verify;

pub use checkpoint::{Checkpoint, write_durable};
pub use error::{AuditError, Result};
pub use event::{AuditEvent, Decision, StoredEvent};
pub use journal::{
    AppendObserver, Appended, BundleSource, JOURNAL_FILE, Journal, JournalOptions, OpenReport,
};
pub use verify::{BundleReport, VerifyFailure, VerifyReport, verify_bundle, verify_file};

//! The audit journal: every access to the sandbox is recorded here before its result is delivered.
//!
//! Layout of `<data-dir>/audit/journal.log`: an 8-byte magic header (`SBXJRNL1`), then one frame
//! per record:
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32 of payload | payload (JSON AuditEvent) | 32-byte chain hash
//! ```
//!
//! The chain hash of record *n* is `SHA-256(chain hash of record n-1 || payload n)`, starting from
//! 32 zero bytes, so altering, deleting or reordering any record breaks every later hash. The CRC
//! lets a reader tell a torn write from a complete record.
//!
//! Key types:
//! - [`Journal`]: opens (repairing a torn tail, refusing corruption in the middle), appends with
//!   group commit (one `fdatasync` for every batch of concurrent appends) and reads committed
//!   events.
//! - [`AuditEvent`] and [`Decision`]: what is recorded.
//! - [`verify_file`]: the offline check behind `sandbox audit verify`, which needs no server.
//!
//! Fail-stop: if a write or `fdatasync` fails, the journal refuses every later append, so the
//! server can release nothing further rather than release without a durable record.
//!
//! # Writer
//!
//! One writer thread takes appends from a channel and commits whatever has queued with one `write`
//! and one `fdatasync`. Opening repairs a torn tail (an incomplete last frame, or zeros) and
//! refuses anything else: a bad checksum, chain hash or sequence anywhere is corruption. A failed
//! write or sync, or a failed checkpoint write, stops the journal for good (`audit-stopped`). The
//! file is locked while open; the last `Journal` handle's drop joins the writer, which signs a last
//! checkpoint. The Merkle tree is updated before a record's offset is visible, so anything readable
//! is provable. [`write_durable`] (temporary file, fsync, rename, fsync of the folder) is shared
//! with the engine for modules and secrets.
//!
//! # Merkle tree and checkpoints
//!
//! `merkle.rs` is RFC 6962/9162. `MerkleTree` keeps every complete perfect subtree (about two
//! hashes per record), not the leaves, so roots, inclusion and consistency proofs of any past size
//! cost O(log² n); the verifiers share no code with the generators. Tested against the Certificate
//! Transparency vectors and on every proof of every size up to 512.
//!
//! `checkpoint.rs`: an Ed25519 key (ring) created at the journal's first open; a public key without
//! its private key refuses to open rather than start a new key. The writer signs a [`Checkpoint`]
//! (origin derived from the public key, tree size, root, RFC 3339 time) every
//! `JournalOptions::checkpoint_every` records (1,000), within `checkpoint_interval` (1 s) of the
//! first record none covers, on request, and at clean shutdown; the signed bytes are a fixed text,
//! not JSON. Opening refuses a journal shorter than its newest signed checkpoint (`audit-rollback`)
//! or whose first records do not have that checkpoint's root (a rewrite); older checkpoints are the
//! offline verifier's to check, so a start does not grow with the journal's age.
//!
//! # Verification
//!
//! `verify.rs`: `walk` (framing, CRC and chain in one sequential pass; then each record's event
//! decoding, dense sequence and leaf hash split across the cores) serves [`Journal::open`],
//! [`verify_file`] and [`verify_bundle`], the offline check of an exported bundle (`journal.log`,
//! `checkpoints.log`, `journal.pub`): every checkpoint's signature and recomputed root, the newest
//! covering every record, and optionally consistency with a checkpoint the auditor kept (which
//! catches a truncated journal re-signed with the real key). [`Journal::bundle_source`] signs a
//! fresh checkpoint and names the file prefixes an export copies.

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

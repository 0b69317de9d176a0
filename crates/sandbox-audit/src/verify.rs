//! Walking and verifying a journal file: the same check serves the server at start (which repairs a
//! torn tail and refuses anything else) and `sandbox audit verify` (which accepts nothing).

use std::path::Path;

use crate::error::{AuditError, Result};
use crate::event::AuditEvent;
use crate::frame::{self, HASH_LEN, MAGIC, Scanned};

/// What a walk over the whole file found.
#[derive(Debug)]
pub(crate) struct Walk {
    /// Byte offset of every valid record, in order.
    pub offsets: Vec<u64>,
    /// Chain hash after the last valid record.
    pub last_hash: [u8; HASH_LEN],
    /// Sequence number of the last valid record (0 when there is none).
    pub last_seq: u64,
    /// Bytes up to the end of the last valid record.
    pub valid_len: u64,
    /// The first problem, if any.
    pub problem: Option<VerifyFailure>,
}

/// The first bad record of a journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyFailure {
    /// 1-based position of the bad record in the file.
    pub record: u64,
    /// Byte offset where it starts.
    pub offset: u64,
    pub reason: String,
    /// A write cut short at the end of the file, which the server repairs by truncation.
    pub torn_tail: bool,
}

impl std::fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record {} at byte {}: {}",
            self.record, self.offset, self.reason
        )
    }
}

/// A journal that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// Hex chain hash of the last record: every earlier record is committed to by it.
    pub head_hash: String,
}

pub(crate) fn walk(bytes: &[u8]) -> Walk {
    let mut walk = Walk {
        offsets: Vec::new(),
        last_hash: [0u8; HASH_LEN],
        last_seq: 0,
        valid_len: 0,
        problem: None,
    };
    if bytes.len() < MAGIC.len() {
        if MAGIC.starts_with(bytes) {
            // A crash while creating the file: nothing was ever committed.
            walk.problem = (!bytes.is_empty()).then(|| VerifyFailure {
                record: 0,
                offset: 0,
                reason: "incomplete header (torn write)".into(),
                torn_tail: true,
            });
        } else {
            walk.problem = Some(failure(0, 0, "not a journal (bad header)", false));
        }
        return walk;
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        walk.problem = Some(failure(0, 0, "not a journal (bad header)", false));
        return walk;
    }
    let mut offset = MAGIC.len();
    walk.valid_len = offset as u64;
    let mut record = 0u64;
    loop {
        record += 1;
        let (payload, stored_hash, len) = match frame::scan(&bytes[offset..]) {
            Scanned::End => break,
            Scanned::TornTail => {
                walk.problem = Some(failure(
                    record,
                    offset,
                    "incomplete record at the end of the journal (torn write or truncation)",
                    true,
                ));
                break;
            }
            Scanned::Corrupt(reason) => {
                walk.problem = Some(failure(record, offset, reason, false));
                break;
            }
            Scanned::Frame {
                payload,
                stored_hash,
                len,
            } => (payload, stored_hash, len),
        };
        let expected_hash = frame::chain(&walk.last_hash, payload);
        if expected_hash != stored_hash {
            walk.problem = Some(failure(
                record,
                offset,
                "chain hash mismatch (a record was altered, deleted or reordered)",
                false,
            ));
            break;
        }
        let event: AuditEvent = match serde_json::from_slice(payload) {
            Ok(event) => event,
            Err(_) => {
                walk.problem = Some(failure(
                    record,
                    offset,
                    "payload is not a valid event",
                    false,
                ));
                break;
            }
        };
        if event.seq != walk.last_seq + 1 {
            walk.problem = Some(failure(
                record,
                offset,
                &format!(
                    "sequence {} where {} was expected (a record was deleted or reordered)",
                    event.seq,
                    walk.last_seq + 1
                ),
                false,
            ));
            break;
        }
        walk.offsets.push(offset as u64);
        walk.last_hash = stored_hash;
        walk.last_seq = event.seq;
        offset += len;
        walk.valid_len = offset as u64;
    }
    walk
}

fn failure(record: u64, offset: usize, reason: &str, torn_tail: bool) -> VerifyFailure {
    VerifyFailure {
        record,
        offset: offset as u64,
        reason: reason.to_string(),
        torn_tail,
    }
}

/// Verifies a journal file offline: framing, checksums, the hash chain and the sequence. Any
/// problem, a torn tail included, is a failure naming the first bad record.
pub fn verify_file(path: &Path) -> Result<Result<VerifyReport, VerifyFailure>> {
    let bytes = std::fs::read(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let walk = walk(&bytes);
    Ok(match walk.problem {
        Some(problem) => Err(problem),
        None => Ok(VerifyReport {
            records: walk.offsets.len() as u64,
            head_hash: hex::encode(walk.last_hash),
        }),
    })
}

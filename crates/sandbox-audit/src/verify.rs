//! Walking and verifying a journal file: the same check serves the server at start (which repairs a
//! torn tail and refuses anything else) and `sandbox audit verify` (which accepts nothing).

use std::path::Path;

use crate::checkpoint::{
    CHECKPOINTS_FILE, Checkpoint, PUBLIC_KEY_FILE, read_checkpoints, read_public_key,
};
use crate::error::{AuditError, Result};
use crate::event::AuditEvent;
use crate::frame::{self, HASH_LEN, MAGIC, Scanned};
use crate::merkle::{self, Hash, MerkleTree};

/// What a walk over the whole file found.
#[derive(Debug)]
pub(crate) struct Walk {
    /// Byte offset of every valid record, in order.
    pub offsets: Vec<u64>,
    /// The Merkle leaf hash of every valid record.
    pub leaves: Vec<Hash>,
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
        leaves: Vec::new(),
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
    // First pass, in order (the chain is sequential): framing, checksum, chain hash. It stops at
    // the first bad frame.
    let mut offset = MAGIC.len();
    let mut frames: Vec<(usize, &[u8], [u8; HASH_LEN], usize)> = Vec::new();
    let mut chain = [0u8; HASH_LEN];
    let mut frame_problem = None;
    loop {
        let record = frames.len() as u64 + 1;
        let (payload, stored_hash, len) = match frame::scan(&bytes[offset..]) {
            Scanned::End => break,
            Scanned::TornTail => {
                frame_problem = Some(failure(
                    record,
                    offset,
                    "incomplete record at the end of the journal (torn write or truncation)",
                    true,
                ));
                break;
            }
            Scanned::Corrupt(reason) => {
                frame_problem = Some(failure(record, offset, reason, false));
                break;
            }
            Scanned::Frame {
                payload,
                stored_hash,
                len,
            } => (payload, stored_hash, len),
        };
        if frame::chain(&chain, payload) != stored_hash {
            frame_problem = Some(failure(
                record,
                offset,
                "chain hash mismatch (a record was altered, deleted or reordered)",
                false,
            ));
            break;
        }
        chain = stored_hash;
        frames.push((offset, payload, stored_hash, len));
        offset += len;
    }

    // Second pass, independent per record, so split across the cores: each payload is an event
    // with the next sequence number, and its Merkle leaf.
    let checked = check_records(&frames);
    let good = checked
        .iter()
        .position(Option::is_none)
        .unwrap_or(checked.len());
    walk.problem = if good < frames.len() {
        let (at, payload, _, _) = frames[good];
        let reason = match serde_json::from_slice::<AuditEvent>(payload) {
            Err(_) => "payload is not a valid event".to_string(),
            Ok(event) => format!(
                "sequence {} where {} was expected (a record was deleted or reordered)",
                event.seq,
                good + 1
            ),
        };
        Some(failure(good as u64 + 1, at, &reason, false))
    } else {
        frame_problem
    };
    walk.valid_len = match good {
        0 => MAGIC.len() as u64,
        n => (frames[n - 1].0 + frames[n - 1].3) as u64,
    };
    walk.offsets = frames[..good].iter().map(|f| f.0 as u64).collect();
    walk.leaves = checked[..good]
        .iter()
        .map(|l| l.expect("checked"))
        .collect();
    walk.last_seq = good as u64;
    walk.last_hash = match good {
        0 => [0u8; HASH_LEN],
        n => frames[n - 1].2,
    };
    walk
}

/// For each frame: its leaf hash when its payload is an event with the sequence number of its
/// position, else `None`. Runs on every core.
fn check_records(frames: &[(usize, &[u8], [u8; HASH_LEN], usize)]) -> Vec<Option<Hash>> {
    let check = |first: usize, part: &[(usize, &[u8], [u8; HASH_LEN], usize)]| {
        part.iter()
            .enumerate()
            .map(|(i, (_, payload, _, _))| {
                let event: AuditEvent = serde_json::from_slice(payload).ok()?;
                (event.seq == (first + i) as u64 + 1).then(|| merkle::leaf_hash(payload))
            })
            .collect::<Vec<_>>()
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads < 2 || frames.len() < 4096 {
        return check(0, frames);
    }
    let size = frames.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = frames
            .chunks(size)
            .enumerate()
            .map(|(i, part)| scope.spawn(move || check(i * size, part)))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a record check never panics"))
            .collect()
    })
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

/// A bundle that verified: every record, every checkpoint, and the trusted checkpoint if given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleReport {
    pub records: u64,
    pub checkpoints: u64,
    /// The newest checkpoint (covering every record when the whole journal had to be signed).
    pub latest: Option<Checkpoint>,
    /// Size of the trusted checkpoint the bundle was shown consistent with.
    pub trusted_size: Option<u64>,
}

/// Verifies an exported bundle offline, with no server and no private key: each record's
/// framing, checksum, chain hash and sequence; the Merkle root recomputed for every checkpoint,
/// each signed by the bundle's public key, the newest covering every record; and, given a
/// checkpoint the auditor kept earlier, that the bundle extends it (same key, a consistency
/// proof from it to the newest checkpoint). Any problem is a failure naming the first bad record
/// (or the checkpoint, for problems of signatures and roots). `whole` requires the newest
/// checkpoint to cover every record, as it does in an export; without it (a live data dir),
/// records written since the newest checkpoint are checked by their chain only.
pub fn verify_bundle(
    dir: &Path,
    trusted: Option<&Checkpoint>,
    whole: bool,
) -> Result<Result<BundleReport, VerifyFailure>> {
    let public_key = read_public_key(&dir.join(PUBLIC_KEY_FILE))?;
    let journal_path = dir.join(crate::journal::JOURNAL_FILE);
    let bytes = std::fs::read(&journal_path).map_err(|source| AuditError::Io {
        path: journal_path.clone(),
        source,
    })?;
    let walk = walk(&bytes);
    if let Some(problem) = walk.problem {
        return Ok(Err(problem));
    }
    let records = walk.offsets.len() as u64;
    let mut tree = MerkleTree::new();
    for leaf in &walk.leaves {
        tree.push(*leaf);
    }
    let fail = |record: u64, reason: String| VerifyFailure {
        record,
        offset: walk
            .offsets
            .get(record.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(bytes.len() as u64),
        reason,
        torn_tail: false,
    };
    let (checkpoints, _, problem) = read_checkpoints(&dir.join(CHECKPOINTS_FILE))?;
    if let Some(problem) = problem {
        return Ok(Err(fail(records, problem)));
    }
    let mut previous: Option<&Checkpoint> = None;
    for (i, checkpoint) in checkpoints.iter().enumerate() {
        let n = i + 1;
        if !checkpoint.verify(&public_key) {
            return Ok(Err(fail(
                checkpoint.size.min(records),
                format!("checkpoint {n} is not signed by the bundle's key"),
            )));
        }
        if checkpoint.size > records {
            return Ok(Err(fail(
                records + 1,
                format!(
                    "checkpoint {n} covers {} records but the bundle holds {records}: records \
                     were deleted or the journal truncated",
                    checkpoint.size
                ),
            )));
        }
        if previous.is_some_and(|p| checkpoint.size < p.size) {
            return Ok(Err(fail(
                checkpoint.size,
                format!("checkpoint {n} is smaller than the one before it"),
            )));
        }
        if Some(tree.root(checkpoint.size)?) != checkpoint.root_hash() {
            return Ok(Err(fail(
                checkpoint.size,
                format!(
                    "the first {} records do not have the root signed in checkpoint {n}: \
                     records were altered",
                    checkpoint.size
                ),
            )));
        }
        previous = Some(checkpoint);
    }
    let latest = checkpoints.last().cloned();
    let covered = latest.as_ref().map_or(0, |c| c.size);
    if whole && latest.is_none() {
        return Ok(Err(fail(
            records,
            "the bundle has no signed checkpoint".into(),
        )));
    }
    if whole && covered != records {
        return Ok(Err(fail(
            covered + 1,
            format!(
                "{} records after the last signed checkpoint",
                records - covered
            ),
        )));
    }
    let mut trusted_size = None;
    if let Some(trusted) = trusted {
        if !trusted.verify(&public_key) {
            return Ok(Err(fail(
                0,
                "the trusted checkpoint is not signed by the bundle's key".into(),
            )));
        }
        if trusted.size > records {
            return Ok(Err(fail(
                records + 1,
                format!(
                    "the trusted checkpoint covers {} records but the bundle holds {records}: \
                     the journal was rolled back",
                    trusted.size
                ),
            )));
        }
        // Proven against the newest signed root, or the recomputed one of every record when
        // none is signed yet.
        let (size, root) = match &latest {
            Some(latest) => (latest.size.max(trusted.size), latest.root_hash()),
            None => (records, Some(tree.root(records)?)),
        };
        let root = if size == covered {
            root
        } else {
            Some(tree.root(size)?)
        };
        let proof = tree.consistency_proof(trusted.size, size)?;
        let consistent = match (trusted.root_hash(), root) {
            (Some(old), Some(new)) => {
                merkle::verify_consistency(trusted.size, size, &old, &new, &proof)
            }
            _ => false,
        };
        if !consistent {
            return Ok(Err(fail(
                trusted.size,
                format!(
                    "the bundle is not consistent with the trusted checkpoint of {} records: \
                     its history was rewritten (a fork)",
                    trusted.size
                ),
            )));
        }
        trusted_size = Some(trusted.size);
    }
    Ok(Ok(BundleReport {
        records,
        checkpoints: checkpoints.len() as u64,
        latest,
        trusted_size,
    }))
}

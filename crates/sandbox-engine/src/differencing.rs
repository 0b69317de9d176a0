//! The differencing memory of exact releases: per consumer org, the unit sketch of every row
//! released to it (`sandbox_release::differencing`), persisted so the defense survives restarts.
//!
//! One file per org under `<data-dir>/differencing/`: the magic `SBXDIF01`, the unit-hash probe
//! of the build that wrote it (8 bytes), then fixed-size sketches. A release holds its org's lock
//! from the gate's check until its sketches are appended and synced, so two concurrent queries
//! of one org cannot each pass against a memory that lacks the other; sketches are durable
//! before the release is recorded and published (a crash in between remembers a row never
//! delivered: more suppression, never less). A torn last record is dropped at load.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest;
use sandbox_release::differencing::{SKETCH_BYTES, Sketch, decode, encode};
use tokio::io::AsyncWriteExt;

use crate::error::{EngineError, Result};

const MAGIC: &[u8; 8] = b"SBXDIF01";
const HEADER: usize = 16;

/// One org's remembered sketches and its file.
pub(crate) struct OrgMemory {
    path: PathBuf,
    sketches: Vec<Sketch>,
    /// A digest of every remembered sketch: a row with exactly the units of one remembered
    /// already adds nothing to compare against, so repeated queries do not grow the memory.
    known: HashSet<[u8; 16]>,
}

/// A digest of a sketch's cells.
fn fingerprint(encoded: &[u8]) -> [u8; 16] {
    let digest = digest::digest(&digest::SHA256, encoded);
    digest.as_ref()[..16].try_into().expect("16 bytes")
}

impl OrgMemory {
    pub(crate) fn sketches(&self) -> &[Sketch] {
        &self.sketches
    }

    /// Appends and syncs the sketches of a release, then remembers them.
    pub(crate) async fn remember(&mut self, released: &[Sketch]) -> Result<()> {
        if released.is_empty() {
            return Ok(());
        }
        let io = |e: std::io::Error| {
            EngineError::Setup(format!("cannot write {}: {e}", self.path.display()))
        };
        let mut fresh = Vec::new();
        let mut fingerprints = Vec::new();
        let mut encoded_new = Vec::new();
        for sketch in released {
            let encoded = encode(&sketch.cells);
            let print = fingerprint(&encoded);
            if self.known.contains(&print) || fingerprints.contains(&print) {
                continue;
            }
            fingerprints.push(print);
            fresh.push(sketch.clone());
            encoded_new.push(encoded);
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(fresh.len() * SKETCH_BYTES + HEADER);
        if !tokio::fs::try_exists(&self.path).await.map_err(io)? {
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&sandbox_sql::sketch::hash_probe().to_le_bytes());
        }
        for encoded in &encoded_new {
            bytes.extend_from_slice(encoded);
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(io)?;
        file.write_all(&bytes).await.map_err(io)?;
        file.sync_data().await.map_err(io)?;
        self.sketches.extend(fresh);
        self.known.extend(fingerprints);
        Ok(())
    }
}

/// Every org's memory, loaded at start.
pub(crate) struct DifferencingMemory {
    dir: PathBuf,
    orgs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<OrgMemory>>>>,
}

fn file_name(org: &str) -> String {
    let digest = digest::digest(&digest::SHA256, org.as_bytes());
    format!("{}.sketches", hex::encode(&digest.as_ref()[..16]))
}

impl DifferencingMemory {
    /// Opens the folder, reading every org's file; a file of another unit hash, or not a
    /// memory file at all, refuses the start.
    pub(crate) fn open(data_dir: &Path) -> Result<Self> {
        let dir = data_dir.join("differencing");
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Setup(format!("cannot create {}: {e}", dir.display())))?;
        Ok(DifferencingMemory {
            dir,
            orgs: Mutex::new(HashMap::new()),
        })
    }

    /// The memory of one org (read from its file on first use).
    pub(crate) fn org(&self, org: &str) -> Result<Arc<tokio::sync::Mutex<OrgMemory>>> {
        let mut orgs = self.orgs.lock().expect("memory lock is never poisoned");
        if let Some(memory) = orgs.get(org) {
            return Ok(memory.clone());
        }
        let path = self.dir.join(file_name(org));
        let (sketches, known) = load(&path)?;
        let memory = Arc::new(tokio::sync::Mutex::new(OrgMemory {
            path,
            sketches,
            known,
        }));
        orgs.insert(org.to_string(), memory.clone());
        Ok(memory)
    }
}

fn load(path: &Path) -> Result<(Vec<Sketch>, HashSet<[u8; 16]>)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Vec::new(), HashSet::new()));
        }
        Err(e) => {
            return Err(EngineError::Setup(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(EngineError::Setup(format!(
            "{} is not a differencing memory file",
            path.display()
        )));
    }
    let probe = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if probe != sandbox_sql::sketch::hash_probe() {
        return Err(EngineError::Setup(format!(
            "{} was written by a build with another unit hash; its sketches cannot be compared",
            path.display()
        )));
    }
    // A torn last record (a crash mid-append, before anything was released) is dropped.
    let mut sketches = Vec::new();
    let mut known = HashSet::new();
    for chunk in bytes[HEADER..].chunks_exact(SKETCH_BYTES) {
        if let Some(sketch) = decode(chunk)
            && known.insert(fingerprint(chunk))
        {
            sketches.push(sketch);
        }
    }
    Ok((sketches, known))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_release::differencing::insert_one;

    fn sketch(units: std::ops::Range<u64>) -> Sketch {
        let mut sketch = Sketch::default();
        for unit in units {
            insert_one(&mut sketch.cells, unit.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        sketch
    }

    /// A row with exactly the units of a remembered one is not remembered twice, in memory or
    /// on disk, also across a reload; different rows are.
    #[tokio::test]
    async fn repeated_rows_do_not_grow_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        let memory = DifferencingMemory::open(dir.path()).unwrap();
        let org = memory.org("bank").unwrap();
        let (a, b) = (sketch(0..20), sketch(5..30));
        org.lock()
            .await
            .remember(&[a.clone(), a.clone(), b.clone()])
            .await
            .unwrap();
        org.lock()
            .await
            .remember(&[b.clone(), a.clone()])
            .await
            .unwrap();
        assert_eq!(org.lock().await.sketches(), &[a.clone(), b.clone()]);
        let reopened = DifferencingMemory::open(dir.path()).unwrap();
        let org = reopened.org("bank").unwrap();
        assert_eq!(org.lock().await.sketches(), &[a, b]);
    }
}

//! The differencing memory of exact releases: per consumer org, the unit sketch of every row
//! released to it (`sandbox_release::differencing`), persisted so the defense survives restarts.
//!
//! One file per org under `<data-dir>/differencing/`: the magic `SBXDIF01`, the unit-hash probe
//! of the build that wrote it (8 bytes), then fixed-size sketches. A release holds its org's lock
//! from the gate's check until its sketches are appended and synced, so two concurrent queries
//! of one org cannot each pass against a memory that lacks the other; sketches are durable
//! before the release is recorded and published (a crash in between remembers a row never
//! delivered: more suppression, never less). A torn last record is dropped at load.

use std::collections::HashMap;
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
        let mut bytes = Vec::with_capacity(released.len() * SKETCH_BYTES + HEADER);
        if !tokio::fs::try_exists(&self.path).await.map_err(io)? {
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&sandbox_sql::sketch::hash_probe().to_le_bytes());
        }
        for sketch in released {
            bytes.extend_from_slice(&encode(&sketch.cells));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(io)?;
        file.write_all(&bytes).await.map_err(io)?;
        file.sync_data().await.map_err(io)?;
        self.sketches.extend_from_slice(released);
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
        let sketches = load(&path)?;
        let memory = Arc::new(tokio::sync::Mutex::new(OrgMemory { path, sketches }));
        orgs.insert(org.to_string(), memory.clone());
        Ok(memory)
    }
}

fn load(path: &Path) -> Result<Vec<Sketch>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
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
    Ok(bytes[HEADER..]
        .chunks_exact(SKETCH_BYTES)
        .filter_map(decode)
        .collect())
}

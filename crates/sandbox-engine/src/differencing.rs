//! The differencing memory of exact releases: per consumer org, the sketch of every row released
//! to it (`sandbox_release::differencing`), persisted so the defense survives restarts, indexed so
//! that a release does not compare a new row with all of history, and bounded.
//!
//! A release is checked against the memories of **every** org, not only its own: two consumer
//! orgs that pool their answers (one asks for a group, the other for the group without one
//! enterprise) are refused as one org would be. Each org's rows count against its own capacity,
//! so one org filling its memory does not refuse another's releases.
//!
//! **What is kept and what is forgotten.** An org's memory keeps every row released to it within
//! the retention window (90 days by default), up to a capacity (20,000 rows by default). A row is
//! forgotten only when it is older than the window: after that an attacker can difference
//! against it. A release that would exceed the capacity is refused (`differencing-memory-full`)
//! until old rows age out; nothing is forgotten early, so flooding the memory cannot erase it.
//!
//! **Index.** Two rows that differ in fewer than `min_units` units (identical included) differ in
//! at most `min_units - 1` cells of each partition of their sketches. So when a new row has at
//! least `min_units` non-empty cells in the first partition, any such remembered row shares one of
//! them exactly: the memory indexes every remembered row by the content of its first partition's
//! non-empty cells, and compares a new row only with the rows sharing a cell. A new row with
//! fewer non-empty cells (a row of few units) is compared with the remembered rows that are small
//! enough to be near it, kept in buckets by their count of non-empty cells.
//!
//! Each remembered row also keeps the sources it was released from (a digest of the query's
//! aggregate input and grouping, `GatePolicy::source`): an identical row from one of them is
//! released again, one from another source is withheld.
//!
//! One file per org under `<data-dir>/differencing/`: the magic `SBXDIF02`, the unit-hash probe
//! of the build that wrote it (8 bytes), then records of a release time (seconds since the epoch,
//! 8 bytes), a source (8 bytes) and a sketch. A release holds the release lock (one for all orgs)
//! from the gate's check until its sketches are appended and synced, so two concurrent queries
//! cannot each pass against a memory that lacks the other; sketches are durable before the release is recorded and
//! published (a crash in between remembers a row never delivered: more withholding, never less).
//! A torn last record is dropped at load; expired records are dropped then too, and the file is
//! rewritten when most of it has expired.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest;
use sandbox_release::differencing::{Cell, PARTITION_CELLS, SKETCH_BYTES, Sketch, decode, encode};
use sandbox_release::{Identical, Remembered, is_near};
use tokio::io::AsyncWriteExt;

use crate::codes::EngineRule;
use crate::error::{EngineError, Result};

const MAGIC: &[u8; 8] = b"SBXDIF02";
const HEADER: usize = 16;
const RECORD: usize = 8 + 8 + SKETCH_BYTES;

/// How long and how much an org's memory keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DifferencingLimits {
    /// Most rows remembered per org within the retention window.
    pub capacity: usize,
    /// How long a released row is remembered, in seconds.
    pub retention_secs: u64,
}

impl Default for DifferencingLimits {
    fn default() -> Self {
        DifferencingLimits {
            capacity: 20_000,
            retention_secs: 90 * 24 * 3600,
        }
    }
}

/// One remembered row.
struct Entry {
    at: u64,
    sketch: Sketch,
    /// The sources it was released from.
    sources: Vec<u64>,
}

/// One org's remembered sketches, their index and their file.
pub(crate) struct OrgMemory {
    path: PathBuf,
    limits: DifferencingLimits,
    entries: Vec<Entry>,
    /// (cell index in the first partition, cell content) -> entries with that cell.
    index: HashMap<(u8, u64), Vec<u32>>,
    /// Entries by their count of non-empty cells in the first partition.
    buckets: Vec<Vec<u32>>,
    /// Digests of every remembered sketch, to its entry: a row identical to a remembered one is
    /// kept once, with the sources it came from.
    known: HashMap<[u8; 16], u32>,
}

/// A digest of a sketch's cells.
fn fingerprint(encoded: &[u8]) -> [u8; 16] {
    let digest = digest::digest(&digest::SHA256, encoded);
    digest.as_ref()[..16].try_into().expect("16 bytes")
}

fn cell_key(cell: &Cell) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    cell.hash(&mut hasher);
    hasher.finish()
}

fn non_empty(cell: &Cell) -> bool {
    *cell != Cell::default()
}

/// The first partition's non-empty cells of a sketch, with their positions.
fn first_partition(sketch: &Sketch) -> impl Iterator<Item = (usize, &Cell)> {
    sketch.cells[..PARTITION_CELLS]
        .iter()
        .enumerate()
        .filter(|(_, c)| non_empty(c))
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl OrgMemory {
    fn empty(path: PathBuf, limits: DifferencingLimits) -> Self {
        OrgMemory {
            path,
            limits,
            entries: Vec::new(),
            index: HashMap::new(),
            buckets: vec![Vec::new(); PARTITION_CELLS + 1],
            known: HashMap::new(),
        }
    }

    /// How many rows are remembered now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds a row, or a source to the identical row already remembered.
    fn add(&mut self, at: u64, source: u64, sketch: Sketch, print: [u8; 16]) {
        if let Some(&id) = self.known.get(&print) {
            let entry = &mut self.entries[id as usize];
            if !entry.sources.contains(&source) {
                entry.sources.push(source);
            }
            return;
        }
        let id = u32::try_from(self.entries.len()).expect("capacity fits u32");
        let mut cells = 0;
        for (position, cell) in first_partition(&sketch) {
            self.index
                .entry((position as u8, cell_key(cell)))
                .or_default()
                .push(id);
            cells += 1;
        }
        self.buckets[cells].push(id);
        self.known.insert(print, id);
        self.entries.push(Entry {
            at,
            sketch,
            sources: vec![source],
        });
    }

    /// The entries that could be within `min_units` units of `sketch` (see the module docs);
    /// every other entry is proven far without being read.
    fn candidates(&self, sketch: &Sketch, min_units: u64) -> Vec<u32> {
        let near_cells = usize::try_from(min_units.saturating_sub(1)).unwrap_or(usize::MAX);
        let cells: Vec<(usize, &Cell)> = first_partition(sketch).collect();
        let mut found: Vec<u32> = Vec::new();
        if cells.len() > near_cells {
            for (position, cell) in cells {
                if let Some(ids) = self.index.get(&(position as u8, cell_key(cell))) {
                    found.extend(ids);
                }
            }
        } else {
            // Few cells: a near entry may share none of them, but has at most as many non-empty
            // cells as this row plus the differing ones.
            let most = (cells.len() + near_cells).min(PARTITION_CELLS);
            for bucket in &self.buckets[..=most] {
                found.extend(bucket);
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Appends and syncs the sketches of a release from `source`, then remembers them. Refused,
    /// with nothing written, when they would not fit within the capacity.
    pub(crate) async fn remember(&mut self, released: &[Sketch], source: u64) -> Result<()> {
        if released.is_empty() {
            return Ok(());
        }
        let io = |e: std::io::Error| {
            EngineError::Setup(format!("cannot write {}: {e}", self.path.display()))
        };
        let at = now_secs();
        let mut fresh = Vec::new();
        for sketch in released {
            let encoded = encode(&sketch.cells);
            let print = fingerprint(&encoded);
            let known = self
                .known
                .get(&print)
                .is_some_and(|&id| self.entries[id as usize].sources.contains(&source));
            if known || fresh.iter().any(|(p, _, _)| *p == print) {
                continue;
            }
            fresh.push((print, sketch.clone(), encoded));
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let new_rows = fresh
            .iter()
            .filter(|(print, _, _)| !self.known.contains_key(print))
            .count();
        if self.entries.len() + new_rows > self.limits.capacity {
            return Err(EngineError::Denied {
                rule: EngineRule::DifferencingMemoryFull,
                message: format!(
                    "your org's exact releases of the last {} days fill its differencing memory \
                     ({} rows); exact answers resume as older releases age out (differential \
                     privacy is not affected)",
                    self.limits.retention_secs / 86_400,
                    self.limits.capacity
                ),
            });
        }
        let mut bytes = Vec::with_capacity(fresh.len() * RECORD + HEADER);
        if !tokio::fs::try_exists(&self.path).await.map_err(io)? {
            bytes.extend_from_slice(MAGIC);
            bytes.extend_from_slice(&sandbox_sql::sketch::hash_probe().to_le_bytes());
        }
        for (_, _, encoded) in &fresh {
            bytes.extend_from_slice(&at.to_le_bytes());
            bytes.extend_from_slice(&source.to_le_bytes());
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
        for (print, sketch, _) in fresh {
            self.add(at, source, sketch, print);
        }
        Ok(())
    }
}

impl Remembered for OrgMemory {
    fn near(&self, sketch: &Sketch, min_units: u64, identical: Identical) -> bool {
        self.candidates(sketch, min_units).into_iter().any(|id| {
            let entry = &self.entries[id as usize];
            is_near(sketch, &entry.sketch, &entry.sources, min_units, identical)
        })
    }
}

/// Every org's memory, by file name, loaded at first use.
pub(crate) struct DifferencingMemory {
    dir: PathBuf,
    limits: DifferencingLimits,
    orgs: Mutex<HashMap<String, Arc<tokio::sync::Mutex<OrgMemory>>>>,
    /// Held from a release's check against every memory until its rows are remembered.
    release: Arc<tokio::sync::Mutex<()>>,
}

/// Every org's memory, locked for one release: it is checked against all of them and remembered
/// in its own.
pub(crate) struct Everyone {
    _release: tokio::sync::OwnedMutexGuard<()>,
    memories: Vec<tokio::sync::OwnedMutexGuard<OrgMemory>>,
    own: usize,
}

impl Everyone {
    /// Remembers released rows in the releasing org's memory.
    pub(crate) async fn remember(&mut self, released: &[Sketch], source: u64) -> Result<()> {
        self.memories[self.own].remember(released, source).await
    }
}

impl Remembered for Everyone {
    fn near(&self, sketch: &Sketch, min_units: u64, identical: Identical) -> bool {
        self.memories
            .iter()
            .any(|memory| memory.near(sketch, min_units, identical))
    }
}

fn file_name(org: &str) -> String {
    let digest = digest::digest(&digest::SHA256, org.as_bytes());
    format!("{}.sketches", hex::encode(&digest.as_ref()[..16]))
}

impl DifferencingMemory {
    pub(crate) fn open(data_dir: &Path, limits: DifferencingLimits) -> Result<Self> {
        let dir = data_dir.join("differencing");
        std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Setup(format!("cannot create {}: {e}", dir.display())))?;
        Ok(DifferencingMemory {
            dir,
            limits,
            orgs: Mutex::new(HashMap::new()),
            release: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The memory kept in one file (read on first use).
    fn file(&self, name: &str) -> Result<Arc<tokio::sync::Mutex<OrgMemory>>> {
        let mut orgs = self.orgs.lock().expect("memory lock is never poisoned");
        if let Some(memory) = orgs.get(name) {
            return Ok(memory.clone());
        }
        let memory = Arc::new(tokio::sync::Mutex::new(load(
            self.dir.join(name),
            self.limits,
        )?));
        orgs.insert(name.to_string(), memory.clone());
        Ok(memory)
    }

    /// The memory of one org (read from its file on first use).
    #[cfg(test)]
    pub(crate) fn org(&self, org: &str) -> Result<Arc<tokio::sync::Mutex<OrgMemory>>> {
        self.file(&file_name(org))
    }

    /// Every org's memory, for one release by `org`: the release lock, then each memory (every
    /// file of the directory, and `org`'s own even before it has one).
    pub(crate) async fn everyone(&self, org: &str) -> Result<Everyone> {
        let release = self.release.clone().lock_owned().await;
        let own_name = file_name(org);
        let mut names = vec![own_name.clone()];
        let list = |e: std::io::Error| {
            EngineError::Setup(format!("cannot list {}: {e}", self.dir.display()))
        };
        for entry in std::fs::read_dir(&self.dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".sketches") && name != own_name {
                names.push(name);
            }
        }
        let mut memories = Vec::with_capacity(names.len());
        for name in &names {
            memories.push(self.file(name)?.lock_owned().await);
        }
        Ok(Everyone {
            _release: release,
            memories,
            own: 0,
        })
    }
}

/// Reads an org's file: a file of another unit hash, or not a memory file at all, refuses the
/// start; a torn last record and expired records are dropped (the file rewritten without them
/// when they are most of it).
fn load(path: PathBuf, limits: DifferencingLimits) -> Result<OrgMemory> {
    let mut memory = OrgMemory::empty(path, limits);
    let bytes = match std::fs::read(&memory.path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(memory),
        Err(e) => {
            return Err(EngineError::Setup(format!(
                "cannot read {}: {e}",
                memory.path.display()
            )));
        }
    };
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(EngineError::Setup(format!(
            "{} is not a differencing memory file (of this version)",
            memory.path.display()
        )));
    }
    let probe = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if probe != sandbox_sql::sketch::hash_probe() {
        return Err(EngineError::Setup(format!(
            "{} was written by a build with another unit hash; its sketches cannot be compared",
            memory.path.display()
        )));
    }
    let oldest = now_secs().saturating_sub(limits.retention_secs);
    let mut records = 0;
    for chunk in bytes[HEADER..].chunks_exact(RECORD) {
        records += 1;
        let at = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
        let source = u64::from_le_bytes(chunk[8..16].try_into().expect("8 bytes"));
        let encoded = &chunk[16..];
        if at < oldest {
            continue;
        }
        if let Some(sketch) = decode(encoded) {
            memory.add(at, source, sketch, fingerprint(encoded));
        }
    }
    let kept_records: usize = memory.entries.iter().map(|e| e.sources.len()).sum();
    if records > 2 * kept_records.max(1) {
        let mut kept = Vec::with_capacity(HEADER + kept_records * RECORD);
        kept.extend_from_slice(&bytes[..HEADER]);
        for entry in &memory.entries {
            for source in &entry.sources {
                kept.extend_from_slice(&entry.at.to_le_bytes());
                kept.extend_from_slice(&source.to_le_bytes());
                kept.extend_from_slice(&encode(&entry.sketch.cells));
            }
        }
        sandbox_audit::write_durable(&memory.path, &kept, false).map_err(|e| {
            EngineError::Setup(format!("cannot rewrite {}: {e}", memory.path.display()))
        })?;
    }
    Ok(memory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandbox_release::differencing::{insert_one, row_identity};

    fn sketch(units: std::ops::Range<u64>) -> Sketch {
        let mut sketch = Sketch::default();
        for unit in units {
            let hash = unit.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            insert_one(&mut sketch.cells, hash, row_identity(hash, 0));
        }
        sketch
    }

    fn limits() -> DifferencingLimits {
        DifferencingLimits::default()
    }

    /// A release is checked against what every org was released, also after a restart, and
    /// remembered in its own org's memory only.
    #[tokio::test]
    async fn a_release_is_checked_against_every_org() {
        let dir = tempfile::tempdir().unwrap();
        let memory = DifferencingMemory::open(dir.path(), limits()).unwrap();
        let group = sketch(0..40);
        let without_one = sketch(0..39);
        let mut analyst = memory.everyone("analytics").await.unwrap();
        assert!(!analyst.near(&without_one, 10, Identical::Far));
        analyst
            .remember(std::slice::from_ref(&group), 1)
            .await
            .unwrap();
        drop(analyst);
        let bank = memory.everyone("bank_demo").await.unwrap();
        assert!(
            bank.near(&without_one, 10, Identical::Far),
            "the analyst's row"
        );
        assert_eq!(bank.memories[bank.own].len(), 0);
        drop(bank);
        let reopened = DifferencingMemory::open(dir.path(), limits()).unwrap();
        let bank = reopened.everyone("bank_demo").await.unwrap();
        assert!(
            bank.near(&without_one, 10, Identical::Far),
            "after a restart"
        );
        assert!(!bank.near(&sketch(100..140), 10, Identical::Far));
    }

    /// A row with exactly the units of a remembered one is not remembered twice, in memory or
    /// on disk, also across a reload; different rows are.
    #[tokio::test]
    async fn repeated_rows_do_not_grow_the_memory() {
        let dir = tempfile::tempdir().unwrap();
        let memory = DifferencingMemory::open(dir.path(), limits()).unwrap();
        let org = memory.org("bank").unwrap();
        let (a, b) = (sketch(0..20), sketch(5..30));
        org.lock()
            .await
            .remember(&[a.clone(), a.clone(), b.clone()], 1)
            .await
            .unwrap();
        org.lock()
            .await
            .remember(&[b.clone(), a.clone()], 1)
            .await
            .unwrap();
        assert_eq!(org.lock().await.len(), 2);
        let reopened = DifferencingMemory::open(dir.path(), limits()).unwrap();
        let org = reopened.org("bank").unwrap();
        assert_eq!(org.lock().await.len(), 2);
    }

    /// The index finds every near row a full scan finds, for large and small rows alike.
    #[tokio::test]
    async fn the_index_misses_no_near_row() {
        let dir = tempfile::tempdir().unwrap();
        let memory = DifferencingMemory::open(dir.path(), limits()).unwrap();
        let org = memory.org("analytics").unwrap();
        let mut remembered = Vec::new();
        for i in 0..300u64 {
            let size = 10 + (i * 37) % 400;
            remembered.push(sketch(i * 1_000..i * 1_000 + size));
        }
        org.lock().await.remember(&remembered, 1).await.unwrap();
        let org = org.lock().await;
        let full: Vec<(Sketch, u64)> = remembered.iter().map(|s| (s.clone(), 1)).collect();
        let identical = Identical::Near { except_source: 2 };
        for (i, base) in remembered.iter().enumerate().step_by(7) {
            let start = i as u64 * 1_000;
            let size = 10 + (i as u64 * 37) % 400;
            for probe in [
                sketch(start..start + size),           // identical
                sketch(start + 1..start + size),       // one unit less
                sketch(start..start + size + 3),       // three more
                sketch(start + 500..start + 500 + 40), // far
            ] {
                let expected = full.near(&probe, 10, identical);
                assert_eq!(org.near(&probe, 10, identical), expected, "row {i}");
            }
            assert!(org.near(base, 10, identical));
            // From the source it was released from, an identical row is not near.
            assert!(!org.near(base, 10, Identical::Near { except_source: 1 }));
        }
    }

    /// Past the capacity a release is refused whole; old rows age out at load.
    #[tokio::test]
    async fn the_memory_is_bounded_and_forgets_only_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let small = DifferencingLimits {
            capacity: 3,
            retention_secs: 3600,
        };
        let memory = DifferencingMemory::open(dir.path(), small).unwrap();
        let org = memory.org("bank").unwrap();
        let rows: Vec<Sketch> = (0..4).map(|i| sketch(i * 100..i * 100 + 20)).collect();
        org.lock().await.remember(&rows[..2], 1).await.unwrap();
        let refused = org.lock().await.remember(&rows[2..], 1).await;
        assert!(matches!(
            refused,
            Err(EngineError::Denied {
                rule: EngineRule::DifferencingMemoryFull,
                ..
            })
        ));
        assert_eq!(
            org.lock().await.len(),
            2,
            "nothing of a refused release is kept"
        );
        // Age the file's records past the window: a reload forgets them.
        let path = dir.path().join("differencing").join(file_name("bank"));
        let mut bytes = std::fs::read(&path).unwrap();
        for record in 0..2 {
            let at = HEADER + record * RECORD;
            bytes[at..at + 8].copy_from_slice(&1u64.to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let reopened = DifferencingMemory::open(dir.path(), small).unwrap();
        assert_eq!(reopened.org("bank").unwrap().lock().await.len(), 0);
    }
}

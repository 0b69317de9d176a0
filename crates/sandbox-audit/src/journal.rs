//! The journal writer: one thread owns the file, commits appends in groups, keeps the Merkle
//! tree and writes signed checkpoints.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;

use crate::checkpoint::{
    CHECKPOINTS_FILE, Checkpoint, CheckpointLog, PUBLIC_KEY_FILE, Signer, read_checkpoints,
};
use crate::error::{AuditError, Result};
use crate::event::{AuditEvent, StoredEvent};
use crate::frame::{self, HASH_LEN, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use crate::merkle::{self, Hash, MerkleTree};
use crate::verify::walk;

/// File name of the journal inside its folder.
pub const JOURNAL_FILE: &str = "journal.log";

/// Most appends committed by one `fdatasync`.
const MAX_GROUP: usize = 4096;

/// How the journal commits and checkpoints.
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// A signed checkpoint after at most this many new records...
    pub checkpoint_every: u64,
    /// ...or this long after the first record it does not cover yet, and at clean shutdown.
    pub checkpoint_interval: Duration,
    /// Commit concurrent appends with one `fdatasync` (on), or one per record (off: only for
    /// measuring what group commit gains).
    pub group_commit: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(1),
            group_commit: true,
        }
    }
}

/// The files of an export, each to be copied up to `len` bytes, and the checkpoint that
/// covers them all.
#[derive(Debug, Clone)]
pub struct BundleSource {
    pub checkpoint: Checkpoint,
    /// (name in the bundle, file, bytes to copy from its start).
    pub files: Vec<(String, PathBuf, u64)>,
}

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub chain_hash: String,
}

/// What opening the journal found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub records: u64,
    /// Bytes of an incomplete tail record that were cut off, if any.
    pub truncated_bytes: u64,
}

struct Request {
    event: AuditEvent,
    reply: oneshot::Sender<Result<Appended>>,
}

enum Command {
    Append(Box<Request>),
    /// Sign a checkpoint of everything committed now (even if nothing is new).
    Checkpoint(oneshot::Sender<Result<Checkpoint>>),
}

struct Shared {
    path: PathBuf,
    /// Bytes of the file that hold committed (synced) records; readers stop here.
    committed_len: AtomicU64,
    /// Byte offset of each committed record; index `seq - 1`.
    offsets: Mutex<Vec<u64>>,
    /// The Merkle tree over committed records.
    tree: Mutex<MerkleTree>,
    /// The newest checkpoint, and the length of `checkpoints.log` through it.
    latest: Mutex<Option<(Checkpoint, u64)>>,
    public_key: Vec<u8>,
    stopped: AtomicBool,
    /// Told how long each durable append took (the server's metrics), once set.
    append_observer: OnceLock<AppendObserver>,
}

/// Called with the time an append took, from the call until the record was durable.
pub type AppendObserver = Box<dyn Fn(Duration) + Send + Sync>;

/// A lock whose holders never panic while holding it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("journal locks are never poisoned by a panic while held")
}

/// The writer thread and the channel to it. Dropping the last handle closes the channel and
/// waits for the thread (which signs a last checkpoint), so the file (and its lock) is released
/// when the journal is gone.
struct WriterHandle {
    sender: Option<mpsc::Sender<Command>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The append-only audit journal. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Journal {
    writer: Arc<WriterHandle>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.shared.path)
            .finish()
    }
}

impl Journal {
    /// Opens or creates `<dir>/journal.log` with the default options.
    pub fn open(dir: &Path) -> Result<(Journal, OpenReport)> {
        Journal::open_with(dir, JournalOptions::default())
    }

    /// Opens or creates `<dir>/journal.log` and its signing key. A torn tail is truncated;
    /// corruption anywhere else refuses to open, because appending after it would bury it, and
    /// so does a journal shorter than its last signed checkpoint or differing from it (a
    /// rollback or a rewrite).
    pub fn open_with(dir: &Path, options: JournalOptions) -> Result<(Journal, OpenReport)> {
        std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        let path = dir.join(JOURNAL_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| io(&path, source))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked(path)),
            Err(std::fs::TryLockError::Error(source)) => return Err(io(&path, source)),
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|source| io(&path, source))?;

        let walked = walk(&bytes);
        let mut truncated_bytes = 0;
        if let Some(problem) = &walked.problem {
            if !problem.torn_tail {
                return Err(AuditError::Corrupt {
                    path,
                    reason: problem.to_string(),
                });
            }
            truncated_bytes = bytes.len() as u64 - walked.valid_len;
            tracing::warn!(
                journal = %path.display(),
                truncated_bytes,
                "repairing torn journal tail: {problem}"
            );
        }
        let records = walked.offsets.len() as u64;
        let mut tree = MerkleTree::new();
        for leaf in &walked.leaves {
            tree.push(*leaf);
        }
        let signer = Signer::load_or_create(dir)?;
        let public_key = signer.public_key();
        let checkpoints_path = dir.join(CHECKPOINTS_FILE);
        let (checkpoints, checkpoints_len, problem) = read_checkpoints(&checkpoints_path)?;
        let corrupt = |reason: String| AuditError::Corrupt {
            path: checkpoints_path.clone(),
            reason,
        };
        if let Some(problem) = problem {
            return Err(corrupt(problem));
        }
        // The newest checkpoint covers the most: a journal shorter than it was rolled back, one
        // whose prefix has another root was rewritten. (Every earlier checkpoint is checked by
        // the offline verifier; checking each at every start would grow with the journal's age.)
        if let Some(checkpoint) = checkpoints.last() {
            if !checkpoint.verify(&public_key) {
                return Err(corrupt(format!(
                    "checkpoint {} is not signed by this journal's key",
                    checkpoints.len()
                )));
            }
            if checkpoint.size > records {
                return Err(AuditError::Rollback {
                    path,
                    records,
                    checkpoint: checkpoint.size,
                });
            }
            if Some(tree.root(checkpoint.size)?) != checkpoint.root_hash() {
                return Err(AuditError::Corrupt {
                    path,
                    reason: format!(
                        "its first {} records differ from its newest signed checkpoint",
                        checkpoint.size
                    ),
                });
            }
        }
        // Only now, with nothing refused, is anything on disk changed.
        let mut valid_len = walked.valid_len;
        if valid_len < MAGIC.len() as u64 {
            file.set_len(0).map_err(|source| io(&path, source))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|source| io(&path, source))?;
            file.write_all(MAGIC).map_err(|source| io(&path, source))?;
            valid_len = MAGIC.len() as u64;
        } else if truncated_bytes > 0 {
            file.set_len(valid_len)
                .map_err(|source| io(&path, source))?;
        }
        file.sync_all().map_err(|source| io(&path, source))?;
        if let Some(parent) = path.parent() {
            // Make the file's creation itself durable.
            if let Ok(folder) = File::open(parent) {
                let _ = folder.sync_all();
            }
        }
        file.seek(SeekFrom::Start(valid_len))
            .map_err(|source| io(&path, source))?;

        let log = CheckpointLog::open(&checkpoints_path, checkpoints_len)?;
        let covered = checkpoints.last().map_or(0, |c| c.size);
        let latest = checkpoints.last().cloned().map(|c| (c, checkpoints_len));

        let report = OpenReport {
            records,
            truncated_bytes,
        };
        let shared = Arc::new(Shared {
            path: path.clone(),
            committed_len: AtomicU64::new(valid_len),
            offsets: Mutex::new(walked.offsets),
            tree: Mutex::new(tree),
            latest: Mutex::new(latest),
            public_key,
            stopped: AtomicBool::new(false),
            append_observer: OnceLock::new(),
        });
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            file,
            shared: shared.clone(),
            last_seq: walked.last_seq,
            last_hash: walked.last_hash,
            len: valid_len,
            signer,
            log,
            checkpoints_len,
            covered,
            uncovered_since: (records > covered).then(Instant::now),
            options,
        };
        let thread = std::thread::Builder::new()
            .name("audit-journal".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| io(&path, source))?;
        let writer = Arc::new(WriterHandle {
            sender: Some(sender),
            thread: Some(thread),
        });
        Ok((Journal { writer, shared }, report))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Appends an event and waits until it is durable. Returns its sequence number.
    pub async fn append(&self, event: AuditEvent) -> Result<Appended> {
        let started = Instant::now();
        let (reply, receive) = oneshot::channel();
        self.submit(Command::Append(Box::new(Request { event, reply })))?;
        let appended = receive.await.map_err(|_| AuditError::Stopped)?;
        if let Some(observe) = self.shared.append_observer.get() {
            observe(started.elapsed());
        }
        appended
    }

    /// Sets the function told how long each append took (group commit included). Only the
    /// first call takes effect.
    pub fn observe_appends(&self, observer: AppendObserver) {
        let _ = self.shared.append_observer.set(observer);
    }

    /// [`Journal::append`] for callers outside an async runtime.
    pub fn append_blocking(&self, event: AuditEvent) -> Result<Appended> {
        let (reply, receive) = oneshot::channel();
        self.submit(Command::Append(Box::new(Request { event, reply })))?;
        receive.blocking_recv().map_err(|_| AuditError::Stopped)?
    }

    /// Signs and durably writes a checkpoint of every record committed so far.
    pub async fn checkpoint_now(&self) -> Result<Checkpoint> {
        let (reply, receive) = oneshot::channel();
        self.submit(Command::Checkpoint(reply))?;
        receive.await.map_err(|_| AuditError::Stopped)?
    }

    fn submit(&self, command: Command) -> Result<()> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(AuditError::Stopped);
        }
        self.writer
            .sender
            .as_ref()
            .ok_or(AuditError::Stopped)?
            .send(command)
            .map_err(|_| AuditError::Stopped)
    }

    /// The newest signed checkpoint, if one was written.
    pub fn latest_checkpoint(&self) -> Option<Checkpoint> {
        lock(&self.shared.latest).as_ref().map(|(c, _)| c.clone())
    }

    /// The Ed25519 public key that signs the checkpoints.
    pub fn public_key(&self) -> Vec<u8> {
        self.shared.public_key.clone()
    }

    /// The Merkle root of the first `size` records.
    pub fn root(&self, size: u64) -> Result<Hash> {
        Ok(lock(&self.shared.tree).root(size)?)
    }

    /// The inclusion proof of record `seq` in the tree of the first `size` records, with the
    /// record's payload (its leaf is `SHA-256(0x00 || payload)`).
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<(Vec<u8>, Vec<Hash>)> {
        if seq == 0 || seq > size {
            return Err(merkle::ProofError(format!(
                "record {seq} is not in a tree of {size} records"
            ))
            .into());
        }
        let proof = lock(&self.shared.tree).inclusion_proof(seq - 1, size)?;
        let payload = self.payload(seq)?;
        Ok((payload, proof))
    }

    /// The consistency proof between the trees of the first `first` and `second` records.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>> {
        Ok(lock(&self.shared.tree).consistency_proof(first, second)?)
    }

    /// A fresh checkpoint and the files an auditor's bundle needs, each up to what that
    /// checkpoint covers: the journal's records, the checkpoints through it, the public key.
    pub async fn bundle_source(&self) -> Result<BundleSource> {
        self.checkpoint_now().await?;
        // The newest checkpoint (this one, or a later one written meanwhile) and the prefixes of
        // both files it covers, taken together so the bundle is one consistent cut.
        let (checkpoint, checkpoints_len) = lock(&self.shared.latest)
            .clone()
            .ok_or(AuditError::Stopped)?;
        let journal_len = {
            let offsets = lock(&self.shared.offsets);
            match offsets.get(checkpoint.size as usize) {
                Some(&next) => next,
                None => self.shared.committed_len.load(Ordering::Acquire),
            }
        };
        let dir = self.shared.path.parent().unwrap_or(Path::new("."));
        let public = dir.join(PUBLIC_KEY_FILE);
        let public_len = std::fs::metadata(&public)
            .map_err(|source| io(&public, source))?
            .len();
        Ok(BundleSource {
            checkpoint,
            files: vec![
                (JOURNAL_FILE.into(), self.shared.path.clone(), journal_len),
                (
                    CHECKPOINTS_FILE.into(),
                    dir.join(CHECKPOINTS_FILE),
                    checkpoints_len,
                ),
                (PUBLIC_KEY_FILE.into(), public, public_len),
            ],
        })
    }

    /// Writes a bundle into `out` (created if missing): see [`Journal::bundle_source`].
    pub async fn export_to(&self, out: &Path) -> Result<Checkpoint> {
        let source = self.bundle_source().await?;
        std::fs::create_dir_all(out).map_err(|source| io(out, source))?;
        for (name, path, len) in &source.files {
            let mut bytes = Vec::new();
            File::open(path)
                .map_err(|source| io(path, source))?
                .take(*len)
                .read_to_end(&mut bytes)
                .map_err(|source| io(path, source))?;
            let target = out.join(name);
            std::fs::write(&target, &bytes).map_err(|source| io(&target, source))?;
        }
        Ok(source.checkpoint)
    }

    /// The payload bytes of committed record `seq`.
    fn payload(&self, seq: u64) -> Result<Vec<u8>> {
        let (start, end) = {
            let offsets = lock(&self.shared.offsets);
            let index = seq as usize - 1;
            let start = *offsets
                .get(index)
                .ok_or_else(|| merkle::ProofError(format!("record {seq} is not committed")))?;
            let end = offsets
                .get(index + 1)
                .copied()
                .unwrap_or_else(|| self.shared.committed_len.load(Ordering::Acquire));
            (start, end)
        };
        let bytes = self.read_range(start, end)?;
        match frame::scan(&bytes) {
            frame::Scanned::Frame { payload, .. } => Ok(payload.to_vec()),
            _ => Err(AuditError::Corrupt {
                path: self.shared.path.clone(),
                reason: "committed record changed on disk".into(),
            }),
        }
    }

    fn read_range(&self, start: u64, end: u64) -> Result<Vec<u8>> {
        let path = &self.shared.path;
        let mut file = File::open(path).map_err(|source| io(path, source))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|source| io(path, source))?;
        let mut bytes = vec![0u8; (end - start) as usize];
        file.read_exact(&mut bytes)
            .map_err(|source| io(path, source))?;
        Ok(bytes)
    }

    /// Whether an earlier failure stopped the journal.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Sequence number of the newest committed event (0 when empty).
    pub fn last_seq(&self) -> u64 {
        lock(&self.shared.offsets).len() as u64
    }

    /// Committed events with `seq >= from_seq`, at most `limit` of them.
    pub fn read(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>> {
        let (start, end) = {
            let offsets = lock(&self.shared.offsets);
            let first = from_seq.max(1) as usize - 1;
            if first >= offsets.len() || limit == 0 {
                return Ok(Vec::new());
            }
            let last = first.saturating_add(limit).min(offsets.len());
            let end = if last < offsets.len() {
                offsets[last]
            } else {
                self.shared.committed_len.load(Ordering::Acquire)
            };
            (offsets[first], end)
        };
        let path = &self.shared.path;
        let bytes = self.read_range(start, end)?;
        let mut events = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let corrupt = |reason: &str| AuditError::Corrupt {
                path: path.clone(),
                reason: reason.to_string(),
            };
            match frame::scan(rest) {
                frame::Scanned::Frame {
                    payload,
                    stored_hash,
                    len,
                } => {
                    let event: AuditEvent = serde_json::from_slice(payload)
                        .map_err(|_| corrupt("committed record does not decode"))?;
                    events.push(StoredEvent {
                        event,
                        chain_hash: hex::encode(stored_hash),
                    });
                    rest = &rest[len..];
                }
                _ => return Err(corrupt("committed record changed on disk")),
            }
        }
        Ok(events)
    }

    /// The newest `limit` committed events.
    pub fn tail(&self, limit: usize) -> Result<Vec<StoredEvent>> {
        let last = self.last_seq();
        self.read(last.saturating_sub(limit as u64) + 1, limit)
    }
}

struct Writer {
    file: File,
    shared: Arc<Shared>,
    last_seq: u64,
    last_hash: [u8; HASH_LEN],
    len: u64,
    signer: Signer,
    log: CheckpointLog,
    /// Length of `checkpoints.log`.
    checkpoints_len: u64,
    /// Records the newest checkpoint covers.
    covered: u64,
    /// When the oldest record no checkpoint covers was committed.
    uncovered_since: Option<Instant>,
    options: JournalOptions,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Command>) {
        let max_group = if self.options.group_commit {
            MAX_GROUP
        } else {
            1
        };
        loop {
            let wait = match self.uncovered_since {
                Some(since) => self
                    .options
                    .checkpoint_interval
                    .saturating_sub(since.elapsed()),
                None => Duration::from_secs(3600),
            };
            let first = match receiver.recv_timeout(wait) {
                Ok(command) => command,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.checkpoint_if_due();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut group = Vec::new();
            let mut asked = Vec::new();
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append(request) => group.push(*request),
                    Command::Checkpoint(reply) => asked.push(reply),
                }
                if group.len() < max_group {
                    next = receiver.try_recv().ok();
                }
            }
            if !group.is_empty() {
                self.commit(group);
            }
            for reply in asked {
                let _ = reply.send(self.checkpoint());
            }
            self.checkpoint_if_due();
        }
        // Clean shutdown: every committed record is covered by a signed checkpoint.
        if self.covered < self.last_seq {
            let _ = self.checkpoint();
        }
    }

    fn checkpoint_if_due(&mut self) {
        let Some(since) = self.uncovered_since else {
            return;
        };
        if self.last_seq - self.covered >= self.options.checkpoint_every
            || since.elapsed() >= self.options.checkpoint_interval
        {
            let _ = self.checkpoint();
        }
    }

    /// Signs the tree of every committed record and appends the checkpoint durably. A failure
    /// stops the journal like a failed append: its durability can no longer be vouched for.
    fn checkpoint(&mut self) -> Result<Checkpoint> {
        if self.shared.stopped.load(Ordering::Acquire) {
            // Nothing more will be signed: no timer either, or the writer would spin on it.
            self.uncovered_since = None;
            return Err(AuditError::Stopped);
        }
        let size = self.last_seq;
        let root = lock(&self.shared.tree).root(size)?;
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let checkpoint = self.signer.sign(size, &root, time);
        if let Err(error) = self.log.append(&checkpoint) {
            tracing::error!(journal = %self.shared.path.display(), %error, "checkpoint write failed; stopping");
            self.shared.stopped.store(true, Ordering::Release);
            self.uncovered_since = None;
            return Err(error);
        }
        self.checkpoints_len += checkpoint.to_line().len() as u64;
        self.covered = size;
        self.uncovered_since = None;
        *lock(&self.shared.latest) = Some((checkpoint.clone(), self.checkpoints_len));
        Ok(checkpoint)
    }

    fn commit(&mut self, group: Vec<Request>) {
        if self.shared.stopped.load(Ordering::Acquire) {
            for request in group {
                let _ = request.reply.send(Err(AuditError::Stopped));
            }
            return;
        }
        let mut buffer = Vec::new();
        let mut seq = self.last_seq;
        let mut hash = self.last_hash;
        let mut offsets = Vec::with_capacity(group.len());
        let mut leaves = Vec::with_capacity(group.len());
        let mut outcomes = Vec::with_capacity(group.len());
        let time = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        for request in group {
            let mut event = request.event;
            event.seq = seq + 1;
            event.time = time.clone();
            let payload = match serde_json::to_vec(&event) {
                Ok(p) if p.len() <= MAX_PAYLOAD => p,
                Ok(_) => {
                    let _ = request.reply.send(Err(AuditError::Corrupt {
                        path: self.shared.path.clone(),
                        reason: "event larger than a journal record may be".into(),
                    }));
                    continue;
                }
                Err(e) => {
                    let _ = request.reply.send(Err(AuditError::Encode(e)));
                    continue;
                }
            };
            seq += 1;
            offsets.push(self.len + buffer.len() as u64);
            leaves.push(merkle::leaf_hash(&payload));
            hash = frame::encode(&mut buffer, &hash, &payload);
            outcomes.push((
                request.reply,
                Appended {
                    seq,
                    chain_hash: hex::encode(hash),
                },
            ));
        }
        if outcomes.is_empty() {
            return;
        }
        debug_assert!(buffer.len() >= HEADER_LEN);
        let written = self
            .file
            .write_all(&buffer)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.last_seq = seq;
                self.last_hash = hash;
                self.len += buffer.len() as u64;
                {
                    // Tree first: a reader that sees a record's offset can also prove it.
                    let mut tree = lock(&self.shared.tree);
                    for leaf in leaves {
                        tree.push(leaf);
                    }
                }
                {
                    // Offsets and length change together: a reader holding the lock sees where
                    // the last record it can see ends.
                    let mut committed = lock(&self.shared.offsets);
                    committed.extend(offsets);
                    self.shared.committed_len.store(self.len, Ordering::Release);
                }
                self.uncovered_since.get_or_insert_with(Instant::now);
                for (reply, appended) in outcomes {
                    let _ = reply.send(Ok(appended));
                }
            }
            Err(source) => {
                // Fail-stop: the file's state is unknown, so nothing more may be recorded or
                // released. A restart repairs a torn tail or refuses a corrupt journal.
                tracing::error!(journal = %self.shared.path.display(), error = %source, "journal write failed; stopping");
                self.shared.stopped.store(true, Ordering::Release);
                for (reply, _) in outcomes {
                    let _ = reply.send(Err(AuditError::Stopped));
                }
            }
        }
    }
}

fn io(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

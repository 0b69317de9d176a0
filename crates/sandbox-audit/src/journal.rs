//! The journal writer: one thread owns the file and commits appends in groups.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::SystemTime;

use tokio::sync::oneshot;

use crate::error::{AuditError, Result};
use crate::event::{AuditEvent, StoredEvent};
use crate::frame::{self, HASH_LEN, HEADER_LEN, MAGIC, MAX_PAYLOAD};
use crate::verify::walk;

/// File name of the journal inside its folder.
pub const JOURNAL_FILE: &str = "journal.log";

/// Most appends committed by one `fdatasync`.
const MAX_GROUP: usize = 4096;

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

struct Shared {
    path: PathBuf,
    /// Bytes of the file that hold committed (synced) records; readers stop here.
    committed_len: AtomicU64,
    /// Byte offset of each committed record; index `seq - 1`.
    offsets: Mutex<Vec<u64>>,
    stopped: AtomicBool,
}

/// The writer thread and the channel to it. Dropping the last handle closes the channel and
/// waits for the thread, so the file (and its lock) is released when the journal is gone.
struct WriterHandle {
    sender: Option<mpsc::Sender<Request>>,
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
    /// Opens or creates `<dir>/journal.log`. A torn tail is truncated; corruption anywhere else
    /// refuses to open, because appending after it would bury it.
    pub fn open(dir: &Path) -> Result<(Journal, OpenReport)> {
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

        let report = OpenReport {
            records: walked.offsets.len() as u64,
            truncated_bytes,
        };
        let shared = Arc::new(Shared {
            path: path.clone(),
            committed_len: AtomicU64::new(valid_len),
            offsets: Mutex::new(walked.offsets),
            stopped: AtomicBool::new(false),
        });
        let (sender, receiver) = mpsc::channel();
        let writer = Writer {
            file,
            shared: shared.clone(),
            last_seq: walked.last_seq,
            last_hash: walked.last_hash,
            len: valid_len,
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
        let (reply, receive) = oneshot::channel();
        self.submit(event, reply)?;
        receive.await.map_err(|_| AuditError::Stopped)?
    }

    /// [`Journal::append`] for callers outside an async runtime.
    pub fn append_blocking(&self, event: AuditEvent) -> Result<Appended> {
        let (reply, receive) = oneshot::channel();
        self.submit(event, reply)?;
        receive.blocking_recv().map_err(|_| AuditError::Stopped)?
    }

    fn submit(&self, event: AuditEvent, reply: oneshot::Sender<Result<Appended>>) -> Result<()> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(AuditError::Stopped);
        }
        self.writer
            .sender
            .as_ref()
            .ok_or(AuditError::Stopped)?
            .send(Request { event, reply })
            .map_err(|_| AuditError::Stopped)
    }

    /// Whether an earlier failure stopped the journal.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// Sequence number of the newest committed event (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.shared
            .offsets
            .lock()
            .expect("offsets lock is never poisoned by a panic while held")
            .len() as u64
    }

    /// Committed events with `seq >= from_seq`, at most `limit` of them.
    pub fn read(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>> {
        let (start, end) = {
            let offsets = self
                .shared
                .offsets
                .lock()
                .expect("offsets lock is never poisoned by a panic while held");
            let first = from_seq.max(1) as usize - 1;
            if first >= offsets.len() || limit == 0 {
                return Ok(Vec::new());
            }
            let last = (first + limit).min(offsets.len());
            let end = if last < offsets.len() {
                offsets[last]
            } else {
                self.shared.committed_len.load(Ordering::Acquire)
            };
            (offsets[first], end)
        };
        let path = &self.shared.path;
        let mut file = File::open(path).map_err(|source| io(path, source))?;
        file.seek(SeekFrom::Start(start))
            .map_err(|source| io(path, source))?;
        let mut bytes = vec![0u8; (end - start) as usize];
        file.read_exact(&mut bytes)
            .map_err(|source| io(path, source))?;
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
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Request>) {
        while let Ok(first) = receiver.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match receiver.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            self.commit(group);
        }
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
                self.shared
                    .offsets
                    .lock()
                    .expect("offsets lock is never poisoned by a panic while held")
                    .extend(offsets);
                self.shared.committed_len.store(self.len, Ordering::Release);
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

//! Signed checkpoints: the journal's Ed25519 key signs (origin, tree size, root hash, time), so a
//! checkpoint an auditor keeps pins every record up to its size. The key is created at the
//! journal's first start (`journal.key`, PKCS#8, mode 0600) with its public half beside it
//! (`journal.pub`, hex); checkpoints are appended to `checkpoints.log`, one JSON line each,
//! and each line is durable before the journal goes on.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::error::{AuditError, Result};
use crate::merkle::Hash;

/// The private key, inside the journal's folder.
pub const KEY_FILE: &str = "journal.key";
/// The public key (hex of the raw 32 bytes), for auditors.
pub const PUBLIC_KEY_FILE: &str = "journal.pub";
/// Every checkpoint written, oldest first, one JSON object per line.
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";

/// A signed statement of the journal's size and Merkle root at one time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Names the journal: `sandboxd journal <first 16 hex digits of SHA-256(public key)>`.
    pub origin: String,
    /// Records covered: the tree of the first `size` records.
    pub size: u64,
    /// Hex RFC 6962 root of that tree.
    pub root: String,
    /// RFC 3339 UTC time of signing.
    pub time: String,
    /// Hex Ed25519 signature over [`Checkpoint::signed_text`].
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes signed: a versioned, line-oriented text, so no JSON canonicalization is
    /// involved in verification.
    pub fn signed_text(origin: &str, size: u64, root: &str, time: &str) -> String {
        format!("sandbox journal checkpoint v1\n{origin}\n{size}\n{root}\n{time}\n")
    }

    /// The root as bytes; `None` if the hex is malformed.
    pub fn root_hash(&self) -> Option<Hash> {
        hex::decode(&self.root).ok()?.try_into().ok()
    }

    /// Whether the signature is this key's over this checkpoint.
    pub fn verify(&self, public_key: &[u8]) -> bool {
        let Ok(signature) = hex::decode(&self.signature) else {
            return false;
        };
        let text = Self::signed_text(&self.origin, self.size, &self.root, &self.time);
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(text.as_bytes(), &signature)
            .is_ok()
            && self.origin == origin_of(public_key)
    }

    /// One line of `checkpoints.log`, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a checkpoint always serializes");
        line.push('\n');
        line
    }

    pub fn from_json(text: &str) -> std::result::Result<Checkpoint, String> {
        serde_json::from_str(text.trim()).map_err(|e| format!("not a checkpoint: {e}"))
    }
}

/// The journal's name, derived from its public key so a checkpoint cannot be passed off as
/// another journal's.
pub fn origin_of(public_key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
    format!("sandboxd journal {}", &hex::encode(digest.as_ref())[..16])
}

/// The signing key of a journal.
pub(crate) struct Signer {
    key_pair: Ed25519KeyPair,
    origin: String,
}

impl Signer {
    /// Loads `journal.key` from `dir`, or creates it (and `journal.pub`) when neither exists.
    /// A public key without its private key, or one that does not match it, is an error: a
    /// new key would silently orphan every checkpoint auditors hold.
    pub(crate) fn load_or_create(dir: &Path) -> Result<Signer> {
        let key_path = dir.join(KEY_FILE);
        let public_path = dir.join(PUBLIC_KEY_FILE);
        let pkcs8 = match std::fs::read(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if public_path.exists() {
                    return Err(AuditError::Key(format!(
                        "{} exists but {} does not; refusing to create a new signing key",
                        public_path.display(),
                        key_path.display()
                    )));
                }
                let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| AuditError::Key("no secure randomness for the key".into()))?;
                write_durable(&key_path, document.as_ref(), true)
                    .map_err(|source| io(&key_path, source))?;
                document.as_ref().to_vec()
            }
            Err(source) => return Err(io(&key_path, source)),
        };
        let key_pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| {
            AuditError::Key(format!("{} is not an Ed25519 key", key_path.display()))
        })?;
        let public_hex = hex::encode(key_pair.public_key().as_ref());
        match std::fs::read_to_string(&public_path) {
            Ok(text) if text.trim() == public_hex => {}
            Ok(_) => {
                return Err(AuditError::Key(format!(
                    "{} does not match {}",
                    public_path.display(),
                    key_path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                write_durable(&public_path, format!("{public_hex}\n").as_bytes(), false)
                    .map_err(|source| io(&public_path, source))?;
            }
            Err(source) => return Err(io(&public_path, source)),
        }
        let origin = origin_of(key_pair.public_key().as_ref());
        Ok(Signer { key_pair, origin })
    }

    pub(crate) fn public_key(&self) -> Vec<u8> {
        self.key_pair.public_key().as_ref().to_vec()
    }

    pub(crate) fn sign(&self, size: u64, root: &Hash, time: String) -> Checkpoint {
        let root = hex::encode(root);
        let text = Checkpoint::signed_text(&self.origin, size, &root, &time);
        let signature = hex::encode(self.key_pair.sign(text.as_bytes()).as_ref());
        Checkpoint {
            origin: self.origin.clone(),
            size,
            root,
            time,
            signature,
        }
    }
}

/// Reads a public key file (hex).
pub fn read_public_key(path: &Path) -> Result<Vec<u8>> {
    let text = std::fs::read_to_string(path).map_err(|source| io(path, source))?;
    let key = hex::decode(text.trim())
        .map_err(|_| AuditError::Key(format!("{} is not a hex public key", path.display())))?;
    if key.len() != 32 {
        return Err(AuditError::Key(format!(
            "{} is not an Ed25519 public key",
            path.display()
        )));
    }
    Ok(key)
}

/// The checkpoints of a `checkpoints.log`, and the length of its valid prefix. A last line cut
/// short (no newline) is a torn write; any other bad line is corruption.
pub(crate) fn read_checkpoints(path: &Path) -> Result<(Vec<Checkpoint>, u64, Option<String>)> {
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0, None)),
        Err(source) => return Err(io(path, source)),
    };
    let mut checkpoints = Vec::new();
    let mut valid = 0usize;
    let mut rest = &text[..];
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            // A torn last line.
            return Ok((checkpoints, valid as u64, None));
        };
        let line = std::str::from_utf8(&rest[..end])
            .map_err(|_| "a checkpoint line is not UTF-8".to_string())
            .and_then(Checkpoint::from_json);
        match line {
            Ok(checkpoint) => checkpoints.push(checkpoint),
            Err(reason) => {
                return Ok((
                    checkpoints.clone(),
                    valid as u64,
                    Some(format!("checkpoint {}: {reason}", checkpoints.len() + 1)),
                ));
            }
        }
        valid += end + 1;
        rest = &rest[end + 1..];
    }
    Ok((checkpoints, valid as u64, None))
}

/// Appends checkpoints to `checkpoints.log`, each durable before `append` returns.
pub(crate) struct CheckpointLog {
    file: File,
    path: PathBuf,
}

impl CheckpointLog {
    /// Opens the log, cutting a torn last line.
    pub(crate) fn open(path: &Path, valid_len: u64) -> Result<CheckpointLog> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| io(path, source))?;
        if file.metadata().map_err(|source| io(path, source))?.len() > valid_len {
            file.set_len(valid_len).map_err(|source| io(path, source))?;
            file.sync_all().map_err(|source| io(path, source))?;
        }
        Ok(CheckpointLog {
            file,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn append(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        self.file
            .write_all(checkpoint.to_line().as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|source| io(&self.path, source))
    }
}

/// Writes a small file durably (temporary file, fsync, rename, fsync of the folder), so a crash
/// leaves either the old file or the new one; `private` restricts it to its owner. Shared with
/// the engine's secrets and stored modules.
pub fn write_durable(target: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temporary = target.as_os_str().to_owned();
    temporary.push(".tmp");
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, target)?;
    File::open(dir)?.sync_all()
}

fn io(path: &Path, source: std::io::Error) -> AuditError {
    AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

//! Durable small files: the server's pseudonym secret and stored modules are written with the
//! same discipline (temporary file, fsync, rename, fsync of the folder), so a crash leaves either
//! the old file or the new one.

use std::io::Write;
use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{EngineError, Result};

/// Bytes of the pseudonym secret.
const SECRET_BYTES: usize = 32;

/// Writes `bytes` to `target` durably; `private` restricts the file to its owner.
pub(crate) fn write_durable(target: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temporary = target.as_os_str().to_owned();
    temporary.push(".tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, target)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The server's pseudonym secret, created at first start under `<data>/secrets/`. Pseudonyms are
/// stable as long as this file is: losing it re-keys every consumer's tokens.
pub(crate) fn pseudonym_secret(data_dir: &Path) -> Result<Vec<u8>> {
    let path = data_dir.join("secrets").join("pseudonym.key");
    let setup = |m: String| EngineError::Setup(format!("pseudonym secret {}: {m}", path.display()));
    match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == SECRET_BYTES => Ok(bytes),
        Ok(bytes) => Err(setup(format!(
            "holds {} bytes, expected {SECRET_BYTES}; refusing to re-key the pseudonyms",
            bytes.len()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = vec![0u8; SECRET_BYTES];
            SystemRandom::new()
                .fill(&mut bytes)
                .map_err(|_| setup("no secure randomness".into()))?;
            write_durable(&path, &bytes, true).map_err(|e| setup(e.to_string()))?;
            Ok(bytes)
        }
        Err(e) => Err(setup(e.to_string())),
    }
}

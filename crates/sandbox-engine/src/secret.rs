//! The server's pseudonym secret; it and stored modules are written with the journal's
//! [`sandbox_audit::write_durable`] (temporary file, fsync, rename, fsync of the folder).

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};

use crate::error::{EngineError, Result};

/// Bytes of the pseudonym secret.
const SECRET_BYTES: usize = 32;

pub(crate) use sandbox_audit::write_durable;

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

//! Runnable examples of the data sandbox live beside this file; run one with
//! `cargo run -p sandbox-examples --example <name>`.

use std::path::Path;

use anyhow::Context;

/// The bearer token a demo data dir holds for a principal (`credentials/NAME.token`).
pub fn demo_token(data_dir: &Path, name: &str) -> anyhow::Result<String> {
    let path = data_dir.join(format!("credentials/{name}.token"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_string())
}

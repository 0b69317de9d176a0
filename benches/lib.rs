//! Shared setup of the benchmarks: demo data at benchmark scale, cached between runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Demo data at `scale` under `target/bench-data/scale-<scale>`, generated on first use.
pub fn bench_data(scale: f64) -> anyhow::Result<PathBuf> {
    let dir = target_dir()
        .join("bench-data")
        .join(format!("scale-{scale}"));
    // The marker names the generator's data version, so data of an older layout is regenerated.
    let marker = dir.join(format!("complete-v{}", sandbox_demo::DATA_VERSION));
    if !marker.exists() {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        eprintln!("generating demo data at scale {scale} in {}", dir.display());
        let summary = sandbox_demo::generate(&dir, &sandbox_demo::DemoConfig::scaled(scale))?;
        for (table, rows) in &summary.tables {
            eprintln!("  {table}: {rows} rows");
        }
        std::fs::write(&marker, b"")?;
    }
    Ok(dir)
}

/// The repository's policies.
pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// The median of timed samples.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The build's target dir (`CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

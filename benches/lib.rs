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

/// The benchmark scale: `SANDBOX_BENCH_SCALE`, else 11 (about 5.2 million `tax_monthly` rows).
pub fn bench_scale() -> f64 {
    std::env::var("SANDBOX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11.0)
}

/// A fresh data dir for one engine over the shared benchmark data: its journal starts empty but
/// the data is generated once. Dataset sources are resolved against this folder, so it links to
/// the data.
pub fn engine_dir(data: &Path) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::os::unix::fs::symlink(data.join("datasets"), dir.path().join("datasets"))?;
    Ok(dir)
}

/// The demo analyst, as the benchmarks submit jobs.
pub fn analyst_context() -> sandbox_engine::RequestContext {
    sandbox_engine::RequestContext {
        principal: sandbox_policy::Principal {
            id: "analyst".into(),
            org: "analytics".into(),
            roles: std::collections::BTreeSet::from([sandbox_policy::PrincipalRole::Analyst]),
        },
        request_id: "bench".into(),
    }
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

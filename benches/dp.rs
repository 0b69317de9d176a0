//! A query under differential privacy against the same query exact, through the same engine on
//! the same data (about 5.2 million `tax_monthly` rows at scale 11), interleaved; and, when
//! `SANDBOX_BENCH_SMARTNOISE=1`, the same query and privacy parameters in SmartNoise SQL (`pip
//! install smartnoise-sql pandas pyarrow`) over the same Parquet files, as an outside reference.
//!
//! `cargo bench -p sandbox-benches --bench dp` (`SANDBOX_BENCH_SCALE`, `SANDBOX_BENCH_ROUNDS`).
//!
//! It also times the differencing defense's check of new rows against a consumer org's memory of
//! released rows (a linear scan of sketches), at 100,000 remembered rows.
//!
//! Every DP run asks for a slightly different epsilon, so that none is answered from the cache;
//! the analyst's grant on `tax_monthly` is marked exact (for the exact path) and its budget
//! raised, for the benchmark only.

use std::process::Command;
use std::time::{Duration, Instant};

use sandbox_benches::median;
use sandbox_engine::{DpRequest, Engine, EngineConfig, JobSpec};

/// The query of `benches/smartnoise_dp.py` too (without the schema prefix SmartNoise needs).
const QUERY: &str = "SELECT tax_credit_rating, COUNT(*) AS n, SUM(vat_paid) AS vat \
                     FROM tax_monthly GROUP BY tax_credit_rating";

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("SANDBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let data = sandbox_benches::bench_data(sandbox_benches::bench_scale())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let journal_dir = sandbox_benches::engine_dir(&data)?;
    let sources: Vec<(String, String)> =
        sandbox_policy::read_dir_sources(&sandbox_benches::policies_dir())?
            .into_iter()
            .map(|(name, text)| {
                let text = if name.ends_with("tax_bureau.toml") {
                    // The exact path needs a grant its owner marked exact (ad-hoc SQL on L3
                    // data is answered under differential privacy otherwise).
                    text.replace(
                        "principal = \"analyst\"\n[grant.aggregate]\n",
                        "principal = \"analyst\"\n[grant.aggregate]\nexact = true\n",
                    )
                    .replace("budget_epsilon = 50.0", "budget_epsilon = 1000000.0")
                    .replace("budget_delta = 1e-5", "budget_delta = 9e-4")
                } else {
                    text
                };
                (name, text)
            })
            .collect();
    let policy = sandbox_policy::load_sources(&sources)?;
    let engine = runtime.block_on(Engine::start(EngineConfig::new(
        journal_dir.path().to_path_buf(),
        policy,
    )))?;
    let ctx = sandbox_benches::analyst_context();
    let run = |dp: Option<DpRequest>| -> Duration {
        runtime.block_on(async {
            let start = Instant::now();
            let job = engine
                .submit(
                    &ctx,
                    JobSpec::Sql {
                        query: QUERY.to_string(),
                        dp,
                    },
                )
                .await
                .expect("allowed");
            let result = engine
                .wait_result(&ctx, &job.job_id)
                .await
                .expect("released");
            assert!(result.outcome().rows_released > 0);
            assert_eq!(result.outcome().dp.is_some(), dp.is_some());
            start.elapsed()
        })
    };
    // Warm the caches of both paths.
    run(None);
    run(Some(DpRequest { epsilon: Some(1.0) }));
    let (mut exact, mut private) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        exact.push(run(None));
        let epsilon = 1.0 - (round as f64 + 1.0) * 1e-9;
        private.push(run(Some(DpRequest {
            epsilon: Some(epsilon),
        })));
    }
    let (exact, private) = (median(exact), median(private));
    println!("query: {QUERY}");
    println!(
        "median of {rounds} interleaved runs: exact {exact:.1?}, differential privacy \
         {private:.1?}, ratio DP / exact {:.3}",
        private.as_secs_f64() / exact.as_secs_f64()
    );

    differencing_scan();

    if std::env::var_os("SANDBOX_BENCH_SMARTNOISE").is_some() {
        let script = sandbox_benches::policies_dir().join("../benches/smartnoise_dp.py");
        let output = Command::new("python3")
            .arg(&script)
            .arg(data.join("datasets/tax_monthly"))
            .arg(rounds.to_string())
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "SmartNoise SQL failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        print!("{text}");
        let seconds: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("smartnoise_median_seconds "))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no median in SmartNoise's output"))?;
        println!(
            "ratio sandbox DP / SmartNoise SQL (same query, epsilon 1, delta 1e-7, bounds and \
             contribution limits): {:.3}",
            private.as_secs_f64() / seconds
        );
    }
    Ok(())
}

/// The gate's differencing check of 100 new rows against 100,000 remembered ones, each covering
/// 50 to 549 units (far apart: the common case, proven on the first partition).
fn differencing_scan() {
    use sandbox_release::differencing::{Sketch, insert_one, is_differencing, row_identity};
    let sketch = |seed: u64, units: u64| {
        let mut s = Sketch::default();
        for u in 0..units {
            let hash = (seed << 20 | u).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            insert_one(&mut s.cells, hash, row_identity(hash, 0));
        }
        s
    };
    let remembered: Vec<Sketch> = (0..100_000u64).map(|i| sketch(i, 50 + i % 500)).collect();
    let new: Vec<Sketch> = (0..100u64)
        .map(|i| sketch(1_000_000 + i, 50 + i % 500))
        .collect();
    let start = Instant::now();
    let withheld = new
        .iter()
        .filter(|s| is_differencing(s, &remembered, 10))
        .count();
    let elapsed = start.elapsed();
    println!(
        "differencing check: 100 new rows against 100,000 remembered in {elapsed:.1?} \
         ({:.0} ns per comparison; {withheld} withheld)",
        elapsed.as_nanos() as f64 / 10_000_000.0
    );
}

//! The sandbox path (session, guard, rewrite with the hidden unit count, execution, release gate,
//! IPC encoding, SHA-256 and a durable audit append) against raw DataFusion on the same aggregate
//! queries over the same Parquet files, at a scale of at least 5 million rows: two over one
//! dataset and a join of three departments' datasets.
//!
//! Criterion reports each path; then both are run interleaved in one loop and the ratio of the
//! medians is printed, since absolute times drift on shared machines.
//!
//! `cargo bench -p sandbox-benches --bench sandbox_vs_raw` (set `SANDBOX_BENCH_SCALE` to change
//! the scale; 11 gives about 5.2 million `tax_monthly` rows).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
use sandbox_benches::median;
use sandbox_engine::{Engine, EngineConfig, JobSpec, RequestContext};

const QUERIES: [(&str, &str); 3] = [
    (
        "monthly_by_rating",
        "SELECT month, tax_credit_rating, COUNT(*) AS n, SUM(vat_paid) AS vat, \
         AVG(revenue_declared) AS revenue FROM tax_monthly GROUP BY month, tax_credit_rating",
    ),
    (
        "filtered_by_rating",
        "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS enterprises, SUM(vat_paid) AS vat \
         FROM tax_monthly WHERE month >= '2024-01' GROUP BY tax_credit_rating",
    ),
    (
        // Three departments joined on the privacy unit (tax, social insurance, the register):
        // one unit class, so the query's own distinct count is the threshold's count.
        "three_table_join",
        "SELECT e.industry, COUNT(DISTINCT t.credit_code) AS enterprises, SUM(t.vat_paid) AS vat, \
         AVG(s.insured_headcount) AS headcount \
         FROM tax_monthly t \
         JOIN social_insurance_monthly s ON t.credit_code = s.credit_code AND t.month = s.month \
         JOIN enterprises e ON t.credit_code = e.credit_code \
         GROUP BY e.industry",
    ),
];

struct Paths {
    runtime: tokio::runtime::Runtime,
    engine: Arc<Engine>,
    raw: SessionContext,
    ctx: RequestContext,
    _journal_dir: tempfile::TempDir,
}

impl Paths {
    fn sandbox(&self, sql: &str) -> u64 {
        self.runtime.block_on(async {
            let job = self
                .engine
                .submit(
                    &self.ctx,
                    JobSpec::Sql {
                        dp: None,
                        query: sql.to_string(),
                    },
                )
                .await
                .expect("allowed");
            let result = self
                .engine
                .wait_result(&self.ctx, &job.job_id)
                .await
                .expect("released");
            result.outcome().rows_released
        })
    }

    fn raw(&self, sql: &str) -> u64 {
        self.runtime.block_on(async {
            let batches = self
                .raw
                .sql(sql)
                .await
                .expect("plans")
                .collect()
                .await
                .expect("runs");
            batches.iter().map(|b| b.num_rows() as u64).sum()
        })
    }
}

fn setup() -> anyhow::Result<Paths> {
    let data = sandbox_benches::bench_data(sandbox_benches::bench_scale())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let journal_dir = sandbox_benches::engine_dir(&data)?;
    let policy = sandbox_policy::load_dir(&sandbox_benches::policies_dir())?;
    let engine = runtime.block_on(Engine::start(EngineConfig::new(
        journal_dir.path().to_path_buf(),
        policy,
    )))?;
    let partitions = std::thread::available_parallelism().map_or(2, |n| n.get());
    let raw =
        SessionContext::new_with_config(SessionConfig::new().with_target_partitions(partitions));
    for table in ["tax_monthly", "social_insurance_monthly", "enterprises"] {
        runtime.block_on(
            raw.register_parquet(
                table,
                data.join("datasets")
                    .join(table)
                    .to_str()
                    .expect("utf8 path"),
                ParquetReadOptions::default(),
            ),
        )?;
    }
    let rows: u64 = runtime.block_on(async {
        let batches = raw
            .sql("SELECT COUNT(*) FROM tax_monthly")
            .await?
            .collect()
            .await?;
        let count = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Int64Array>()
            .expect("count is Int64")
            .value(0);
        anyhow::Ok(count as u64)
    })?;
    eprintln!("tax_monthly: {rows} rows");
    anyhow::ensure!(
        rows >= 5_000_000,
        "benchmark needs at least 5 million rows, got {rows}"
    );
    let ctx = sandbox_benches::analyst_context();
    Ok(Paths {
        runtime,
        engine,
        raw,
        ctx,
        _journal_dir: journal_dir,
    })
}

fn main() -> anyhow::Result<()> {
    let paths = setup()?;
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();
    for (name, sql) in QUERIES {
        // Same answer size on both paths: nothing is suppressed at this scale.
        assert_eq!(
            paths.sandbox(sql),
            paths.raw(sql),
            "{name}: row counts differ"
        );
        let mut group = criterion.benchmark_group(name);
        group.bench_function("raw_datafusion", |b| b.iter(|| paths.raw(sql)));
        group.bench_function("sandbox", |b| b.iter(|| paths.sandbox(sql)));
        group.finish();
    }
    criterion.final_summary();

    // Interleaved runs: both paths see the same machine conditions.
    let rounds: usize = std::env::var("SANDBOX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    println!("\nratio sandbox / raw DataFusion, median of {rounds} interleaved runs:");
    for (name, sql) in QUERIES {
        let (mut raw, mut sandbox) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let start = Instant::now();
            paths.raw(sql);
            raw.push(start.elapsed());
            let start = Instant::now();
            paths.sandbox(sql);
            sandbox.push(start.elapsed());
        }
        let (raw, sandbox) = (median(raw), median(sandbox));
        println!(
            "  {name:<20} raw {:>8.1} ms   sandbox {:>8.1} ms   ratio {:.3}",
            raw.as_secs_f64() * 1e3,
            sandbox.as_secs_f64() * 1e3,
            sandbox.as_secs_f64() / raw.as_secs_f64()
        );
    }
    Ok(())
}

//! How useful the README tour's answers are under differential privacy, at the demo's default
//! scale (20,000 enterprises) and epsilon (1 per query), with the demo policies as shipped: for
//! every released value, its 95% interval as the summary states it, and the exact answer over
//! the raw Parquet files (no clamping, no contribution bounds), so that both the noise and what
//! the bounds cut show.
//!
//! `cargo bench -p sandbox-benches --bench dp_accuracy` (`SANDBOX_ACCURACY_SCALE` for another
//! scale). It checks the targets of the tour: counts within 5% for groups of 500 enterprises or
//! more, sums and averages within 10% for groups of 2,000 or more (the interval's half-width
//! against the value), and no impossible value (a negative sum or average of a measure that
//! cannot be negative); it exits with an error when one is missed.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use sandbox_engine::{Engine, EngineConfig, JobSpec};

/// What a released column is, for the targets.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Sum,
    Avg,
}

struct Question {
    what: &'static str,
    sql: &'static str,
    columns: &'static [(&'static str, Kind)],
    /// Per group key: the distinct enterprises behind it.
    units: &'static str,
}

const QUESTIONS: &[Question] = &[
    Question {
        what: "enterprises and average monthly VAT per tax rating",
        sql: "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS enterprises, \
              AVG(vat_paid) AS avg_vat FROM tax_monthly GROUP BY tax_credit_rating \
              ORDER BY tax_credit_rating",
        columns: &[("enterprises", Kind::Count), ("avg_vat", Kind::Avg)],
        units: "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) FROM tax_monthly GROUP BY 1",
    },
    Question {
        what: "enterprises and average registered capital per size class",
        sql: "SELECT size_class, COUNT(*) AS enterprises, AVG(registered_capital) AS avg_capital \
              FROM enterprises GROUP BY size_class ORDER BY size_class",
        columns: &[("enterprises", Kind::Count), ("avg_capital", Kind::Avg)],
        units: "SELECT size_class, COUNT(DISTINCT credit_code) FROM enterprises GROUP BY 1",
    },
    Question {
        what: "VAT and social insurance contributions per industry, three departments",
        sql: "SELECT e.industry, COUNT(DISTINCT t.credit_code) AS enterprises, \
              SUM(t.vat_paid) AS vat, SUM(s.contribution_amount) AS contributions FROM tax_monthly t \
              JOIN social_insurance_monthly s ON t.credit_code = s.credit_code AND t.month = s.month \
              JOIN enterprises e ON e.credit_code = t.credit_code GROUP BY e.industry \
              ORDER BY e.industry",
        columns: &[
            ("enterprises", Kind::Count),
            ("vat", Kind::Sum),
            ("contributions", Kind::Sum),
        ],
        units: "SELECT e.industry, COUNT(DISTINCT t.credit_code) FROM tax_monthly t \
                JOIN social_insurance_monthly s ON t.credit_code = s.credit_code AND t.month = s.month \
                JOIN enterprises e ON e.credit_code = t.credit_code GROUP BY 1",
    },
    Question {
        what: "enterprises in court and the average L4 amount in dispute per kind of case",
        sql: "SELECT case_type, COUNT(DISTINCT credit_code) AS enterprises, AVG(amount) AS \
              avg_amount FROM court_cases GROUP BY case_type ORDER BY case_type",
        columns: &[("enterprises", Kind::Count), ("avg_amount", Kind::Avg)],
        units: "SELECT case_type, COUNT(DISTINCT credit_code) FROM court_cases GROUP BY 1",
    },
];

/// Rows by their first column, as text, with the other columns as numbers.
fn by_key(batches: &[RecordBatch]) -> anyhow::Result<BTreeMap<String, Vec<f64>>> {
    let mut rows = BTreeMap::new();
    for batch in batches {
        let key = cast(batch.column(0), &DataType::Utf8)?;
        let values: Vec<_> = (1..batch.num_columns())
            .map(|i| cast(batch.column(i), &DataType::Float64))
            .collect::<Result<_, _>>()?;
        for row in 0..batch.num_rows() {
            let key = key.as_string::<i32>();
            let name = if key.is_null(row) {
                "(null)".to_string()
            } else {
                key.value(row).to_string()
            };
            let numbers = values
                .iter()
                .map(|v| {
                    let v = v.as_primitive::<arrow::datatypes::Float64Type>();
                    if v.is_null(row) {
                        f64::NAN
                    } else {
                        v.value(row)
                    }
                })
                .collect();
            rows.insert(name, numbers);
        }
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let scale: f64 = std::env::var("SANDBOX_ACCURACY_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let data = sandbox_benches::bench_data(scale)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let journal_dir = sandbox_benches::engine_dir(&data)?;
    let policy = sandbox_policy::load_dir(&sandbox_benches::policies_dir())?;
    let engine = runtime.block_on(Engine::start(EngineConfig::new(
        journal_dir.path().to_path_buf(),
        policy,
    )))?;
    let raw = SessionContext::new();
    runtime.block_on(async {
        for table in sandbox_demo::TABLES {
            let path = data.join("datasets").join(table);
            raw.register_parquet(
                table,
                path.to_str().expect("utf8 path"),
                ParquetReadOptions::default(),
            )
            .await?;
        }
        anyhow::Ok(())
    })?;
    let ctx = sandbox_benches::analyst_context();
    let mut missed = Vec::new();
    println!(
        "demo scale {scale}, the analyst, epsilon 1 per query; value ±95% half-width [exact over \
         the raw files]"
    );
    for question in QUESTIONS {
        let (released, report) = runtime.block_on(async {
            let job = engine
                .submit(
                    &ctx,
                    JobSpec::Sql {
                        query: question.sql.to_string(),
                        dp: None,
                    },
                )
                .await?;
            let result = engine.wait_result(&ctx, &job.job_id).await?;
            let reader = arrow::ipc::reader::StreamReader::try_new(result.ipc_stream(), None)?;
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            let report =
                result.outcome().dp.clone().ok_or_else(|| {
                    anyhow::anyhow!("`{}` was not answered under DP", question.sql)
                })?;
            anyhow::Ok((batches, report))
        })?;
        let truth = runtime.block_on(async {
            let frame = raw.sql(question.sql).await?;
            anyhow::Ok(by_key(&frame.collect().await?)?)
        })?;
        let units = runtime.block_on(async {
            let frame = raw.sql(question.units).await?;
            anyhow::Ok(by_key(&frame.collect().await?)?)
        })?;
        let released_rows = by_key(&released)?;
        println!(
            "\n{} (epsilon spent {:.2})",
            question.what, report.epsilon_spent
        );
        println!(
            "  {}",
            question
                .sql
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        );
        for (row_index, (key, values)) in released_rows.iter().enumerate() {
            let group_units = units.get(key).map_or(0.0, |u| u[0]);
            let mut line = format!("  {key:<22} {group_units:>6} enterprises");
            for (i, (name, kind)) in question.columns.iter().enumerate() {
                let value = values[i];
                let noise = report
                    .columns
                    .iter()
                    .find(|c| c.column == *name)
                    .ok_or_else(|| anyhow::anyhow!("no noise reported for `{name}`"))?;
                // Rows come back in the order of the key; so does `by_key`.
                let half = noise
                    .rows
                    .get(row_index)
                    .copied()
                    .unwrap_or(noise.accuracy_95);
                let exact = truth.get(key).map_or(0.0, |t| t[i]);
                let relative = half / value.abs().max(f64::MIN_POSITIVE);
                line.push_str(&format!(
                    " | {name} {value:.0} ±{half:.0} ({:.1}%) [exact {exact:.0}, off {:.1}%]",
                    100.0 * relative,
                    100.0 * (value - exact).abs() / exact.abs().max(f64::MIN_POSITIVE)
                ));
                let target = match kind {
                    Kind::Count => (group_units >= 500.0).then_some(0.05),
                    Kind::Sum | Kind::Avg => (group_units >= 2000.0).then_some(0.10),
                };
                if let Some(target) = target
                    && relative > target
                {
                    missed.push(format!(
                        "{}: {key} {name} ±{:.1}% (target {:.0}%)",
                        question.what,
                        100.0 * relative,
                        100.0 * target
                    ));
                }
                if *kind != Kind::Count && value < 0.0 {
                    missed.push(format!("{}: {key} {name} is negative", question.what));
                }
            }
            println!("{line}");
        }
    }
    if missed.is_empty() {
        println!("\nevery target met");
        Ok(())
    } else {
        anyhow::bail!("targets missed:\n{}", missed.join("\n"))
    }
}

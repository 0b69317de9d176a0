//! A reconstruction attack in the style of Dinur and Nissim (2003): a small table with one secret
//! bit per person, many counts over random subsets of people, and a least-squares solve that
//! rounds each person's estimate to a bit. Against exact answers (raw DataFusion, no protection)
//! it recovers every bit, which shows the attack works; through the sandbox, where the secret is
//! an L4 measure answered only under differential privacy, its accuracy stays near the baseline
//! of guessing the majority bit.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use sandbox_engine::{Engine, EngineConfig, JobSpec, RequestContext};
use sandbox_policy::{Principal, PrincipalRole};

const PEOPLE: usize = 200;
const QUERIES: usize = 600;

const POLICY: &str = r#"
org = "survey_office"

[[dataset]]
id = "survey"
description = "One secret bit per person"
source = ["datasets/survey"]
privacy_unit = "person_id"

[dataset.dp]
total_epsilon = 10.0
total_delta = 1e-5

[[dataset.column]]
name = "person_id"
level = "L3"
role = "identifier"

[[dataset.column]]
name = "seat"
level = "L1"
role = "dimension"

[[dataset.column]]
name = "secret"
level = "L4"
role = "measure"
bounds = [0, 1]

[[grant]]
dataset = "survey"
principal = "analyst"
[grant.aggregate]
min_units = 10
[grant.aggregate.dp]
epsilon = 0.01
delta = 1e-7
budget_epsilon = 10.0
budget_delta = 1e-5
"#;

/// A small deterministic generator (xorshift64*): the attack's subsets and the secrets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn coin(&mut self) -> bool {
        self.next() >> 63 == 1
    }
}

fn write_table(dir: &std::path::Path, secrets: &[i64]) {
    let folder = dir.join("datasets/survey");
    std::fs::create_dir_all(&folder).expect("dataset folder");
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, false),
        Field::new("seat", DataType::Int64, false),
        Field::new("secret", DataType::Int64, false),
    ]));
    let ids: Vec<String> = (0..secrets.len()).map(|i| format!("P{i:05}")).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(Int64Array::from_iter_values(0..secrets.len() as i64)),
            Arc::new(Int64Array::from(secrets.to_vec())),
        ],
    )
    .expect("batch");
    let file = std::fs::File::create(folder.join("part-0.parquet")).expect("parquet file");
    let mut writer = ArrowWriter::try_new(file, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
}

fn subset_query(seats: &[usize]) -> String {
    let list: Vec<String> = seats.iter().map(|s| s.to_string()).collect();
    format!(
        "SELECT SUM(secret) AS s FROM survey WHERE seat IN ({})",
        list.join(", ")
    )
}

/// The one value of a one-row, one-column answer (a sum: integer or float).
fn scalar(batches: &[RecordBatch]) -> f64 {
    let column = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .expect("one row")
        .column(0);
    if let Some(v) = column.as_any().downcast_ref::<Float64Array>() {
        v.value(0)
    } else if let Some(v) = column.as_any().downcast_ref::<Int64Array>() {
        if v.is_null(0) { 0.0 } else { v.value(0) as f64 }
    } else {
        panic!("unexpected sum type {}", column.data_type())
    }
}

/// Least squares by the normal equations (A^T A) x = A^T b, Gaussian elimination with partial
/// pivoting; then each estimate rounded to a bit.
fn reconstruct(subsets: &[Vec<usize>], answers: &[f64]) -> Vec<i64> {
    let n = PEOPLE;
    let mut m = vec![vec![0.0f64; n + 1]; n];
    for (subset, answer) in subsets.iter().zip(answers) {
        for &i in subset {
            for &j in subset {
                m[i][j] += 1.0;
            }
            m[i][n] += answer;
        }
    }
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|a, b| m[*a][col].abs().total_cmp(&m[*b][col].abs()))
            .expect("rows");
        m.swap(col, pivot);
        let p = m[col][col];
        assert!(p.abs() > 1e-9, "singular system");
        let pivot_row = m[col].clone();
        for (row, values) in m.iter_mut().enumerate() {
            let factor = values[col] / p;
            if row != col && factor != 0.0 {
                for (value, pivot_value) in values[col..].iter_mut().zip(&pivot_row[col..]) {
                    *value -= factor * pivot_value;
                }
            }
        }
    }
    (0..n)
        .map(|i| i64::from(m[i][n] / m[i][i] >= 0.5))
        .collect()
}

fn accuracy(guess: &[i64], truth: &[i64]) -> f64 {
    guess.iter().zip(truth).filter(|(g, t)| g == t).count() as f64 / truth.len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconstruction_succeeds_on_exact_answers_and_fails_under_dp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let secrets: Vec<i64> = (0..PEOPLE).map(|_| i64::from(rng.coin())).collect();
    write_table(dir.path(), &secrets);
    let subsets: Vec<Vec<usize>> = (0..QUERIES)
        .map(|_| (0..PEOPLE).filter(|_| rng.coin()).collect())
        .collect();
    let ones = secrets.iter().sum::<i64>() as f64 / PEOPLE as f64;
    let baseline = ones.max(1.0 - ones);

    // No protection: raw DataFusion answers every subset count exactly.
    let raw = SessionContext::new();
    raw.register_parquet(
        "survey",
        dir.path().join("datasets/survey").to_str().expect("utf8"),
        ParquetReadOptions::default(),
    )
    .await
    .expect("raw table");
    let mut exact = Vec::with_capacity(QUERIES);
    for subset in &subsets {
        let batches = raw
            .sql(&subset_query(subset))
            .await
            .expect("raw plan")
            .collect()
            .await
            .expect("raw run");
        exact.push(scalar(&batches));
    }
    let raw_accuracy = accuracy(&reconstruct(&subsets, &exact), &secrets);

    // The sandbox: the same queries, answered under differential privacy (epsilon 0.01 each,
    // 6 in total of a budget of 10).
    let policy = sandbox_policy::load_sources(&[("survey.toml".into(), POLICY.to_string())])
        .expect("policy");
    let engine = Engine::start(EngineConfig::new(dir.path().to_path_buf(), policy))
        .await
        .expect("engine");
    let ctx = RequestContext {
        principal: Principal {
            id: "analyst".into(),
            org: "analytics".into(),
            roles: BTreeSet::from([PrincipalRole::Analyst]),
        },
        request_id: "reconstruction".into(),
    };
    let mut noisy = Vec::with_capacity(QUERIES);
    for subset in &subsets {
        let job = engine
            .submit(
                &ctx,
                JobSpec::Sql {
                    query: subset_query(subset),
                    dp: None,
                },
            )
            .await
            .expect("admitted under DP");
        let result = engine
            .wait_result(&ctx, &job.job_id)
            .await
            .expect("released");
        assert!(result.outcome().dp.is_some(), "an L4 sum is never exact");
        let reader =
            arrow::ipc::reader::StreamReader::try_new(result.ipc_stream(), None).expect("ipc");
        let batches: Vec<RecordBatch> = reader.map(|b| b.expect("batch")).collect();
        noisy.push(scalar(&batches));
    }
    let dp_accuracy = accuracy(&reconstruct(&subsets, &noisy), &secrets);
    eprintln!(
        "reconstruction of {PEOPLE} secret bits from {QUERIES} subset sums: exact answers \
         {raw_accuracy:.3}, under DP {dp_accuracy:.3}, majority-guess baseline {baseline:.3}"
    );
    assert!(
        raw_accuracy >= 0.99,
        "the attack must work without protection: {raw_accuracy}"
    );
    assert!(
        dp_accuracy <= baseline + 0.15,
        "under DP the attack must stay near the baseline {baseline}: {dp_accuracy}"
    );
}

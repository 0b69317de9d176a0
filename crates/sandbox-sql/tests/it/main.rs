//! Integration tests of the SQL path over generated demo data: the guard's rewrite returns the same
//! numbers as the raw engine, and the hidden unit count is right.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::UInt64Type;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use sandbox_policy::{Mode, PolicySet, Principal, PrincipalRole};
use sandbox_sql::{
    CancellationToken, GrantedDataset, PseudonymKey, SqlEngine, SqlLimits, UNITS_COLUMN,
};

/// The repository's policies with every aggregate grant marked exact where the dataset allows
/// it (an L3 dataset with a row key): these tests check the exact guard and rewrite.
fn policies() -> PolicySet {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    let mut policy = sandbox_policy::load_dir(&dir).expect("repository policies load");
    policy.mark_exact_where_allowed();
    policy
}

/// The analyst's pseudonym key, under a test secret.
fn key() -> PseudonymKey {
    PseudonymKey::derive(b"test secret", "analytics")
}

fn analyst() -> Principal {
    Principal {
        id: "analyst".into(),
        org: "analytics".into(),
        roles: BTreeSet::from([PrincipalRole::Analyst]),
    }
}

/// Demo data for `enterprises` enterprises in a fresh folder, and an engine over it.
async fn engine_over_demo(
    enterprises: usize,
    limits: SqlLimits,
) -> (tempfile::TempDir, PolicySet, SqlEngine) {
    let dir = tempfile::tempdir().expect("tempdir");
    sandbox_demo::generate(
        dir.path(),
        &sandbox_demo::DemoConfig {
            enterprises,
            ..Default::default()
        },
    )
    .expect("demo data");
    let policy = policies();
    let engine = SqlEngine::new(&policy, dir.path(), limits)
        .await
        .expect("engine");
    (dir, policy, engine)
}

fn sorted_rows(batches: &[RecordBatch], columns: usize) -> Vec<String> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = (0..columns)
                .map(|c| {
                    datafusion::arrow::util::display::array_value_to_string(batch.column(c), row)
                        .expect("displayable")
                })
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

mod order;
mod rows;

#[tokio::test]
async fn rewritten_aggregate_matches_raw_engine_and_counts_units() {
    let (dir, policy, engine) = engine_over_demo(800, SqlLimits::default()).await;
    let grants = GrantedDataset::all_for(&policy, &analyst());
    let sql = "SELECT industry, COUNT(*) AS n, SUM(registered_capital) AS capital, \
               COUNT(DISTINCT credit_code) AS units FROM enterprises \
               WHERE status = 'active' GROUP BY industry ORDER BY industry";
    let planned = engine
        .plan(sql, &grants, &key(), Mode::Aggregate)
        .await
        .expect("allowed");
    assert_eq!(planned.guarded().min_units, 10);
    let executed = engine
        .execute(planned, CancellationToken::new())
        .await
        .expect("runs");
    let units_index = executed
        .schema()
        .index_of(UNITS_COLUMN)
        .expect("hidden column");

    // The query counts distinct units itself, so the hidden count is that exact count.
    let mut exact_units = BTreeMap::new();
    for batch in executed.batches() {
        let groups = batch.column(0).as_string_view();
        let exact = batch
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let hidden = batch.column(units_index).as_primitive::<UInt64Type>();
        for row in 0..batch.num_rows() {
            assert_eq!(hidden.value(row), exact.value(row) as u64);
            exact_units.insert(groups.value(row).to_string(), exact.value(row) as u64);
        }
    }

    // Without it, the capped counter gives min(distinct units, 10) per group.
    let capped_sql = "SELECT industry, COUNT(*) AS n FROM enterprises WHERE status = 'active' \
                      GROUP BY industry";
    let planned = engine
        .plan(capped_sql, &grants, &key(), Mode::Aggregate)
        .await
        .expect("allowed");
    let capped_run = engine
        .execute(planned, CancellationToken::new())
        .await
        .expect("runs");
    let units_index = capped_run
        .schema()
        .index_of(UNITS_COLUMN)
        .expect("hidden column");
    let mut groups_seen = 0;
    for batch in capped_run.batches() {
        let groups = batch.column(0).as_string_view();
        let capped = batch.column(units_index).as_primitive::<UInt64Type>();
        for row in 0..batch.num_rows() {
            let exact = exact_units[groups.value(row)];
            assert_eq!(capped.value(row), exact.min(10));
            groups_seen += 1;
        }
    }
    assert_eq!(groups_seen, exact_units.len());
    assert!(exact_units.values().any(|&u| u < 10) && exact_units.values().any(|&u| u > 10));

    let raw = SessionContext::new();
    raw.register_parquet(
        "enterprises",
        dir.path()
            .join("datasets/enterprises")
            .to_str()
            .expect("utf8 path"),
        ParquetReadOptions::default(),
    )
    .await
    .expect("raw table");
    let expected = raw
        .sql(sql)
        .await
        .expect("raw plan")
        .collect()
        .await
        .expect("raw run");
    assert_eq!(
        sorted_rows(executed.batches(), 4),
        sorted_rows(&expected, 4)
    );
}

#[tokio::test]
async fn cancelled_query_stops_with_cancelled() {
    let (_dir, policy, engine) = engine_over_demo(200, SqlLimits::default()).await;
    let planned = engine
        .plan(
            "SELECT month, SUM(vat_paid) FROM tax_monthly GROUP BY month",
            &GrantedDataset::all_for(&policy, &analyst()),
            &key(),
            Mode::Aggregate,
        )
        .await
        .expect("allowed");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let error = engine
        .execute(planned, cancel)
        .await
        .expect_err("cancelled");
    assert_eq!(error.code(), "cancelled");
}

#[tokio::test]
async fn query_text_over_the_limit_is_denied_before_parsing() {
    let limits = SqlLimits {
        max_query_bytes: 100,
        ..SqlLimits::default()
    };
    let (_dir, policy, engine) = engine_over_demo(50, limits).await;
    let long = format!(
        "SELECT COUNT(*) FROM enterprises WHERE industry IN ({})",
        "'C', ".repeat(40) + "'F'"
    );
    let error = engine
        .plan(
            &long,
            &GrantedDataset::all_for(&policy, &analyst()),
            &key(),
            Mode::Aggregate,
        )
        .await
        .expect_err("too long");
    assert_eq!(error.code(), "query-too-long");
}

/// Hostile query shapes are refused by the limits checked before the guard and the optimizer
/// walk them, with `query-too-complex`, on a worker thread's ordinary stack.
#[tokio::test]
async fn oversized_plans_are_refused_before_the_guard() {
    let (_dir, policy, engine) = engine_over_demo(
        50,
        SqlLimits {
            max_query_bytes: 4 << 20,
            ..SqlLimits::default()
        },
    )
    .await;
    let chain = |terms: usize| {
        format!(
            "SELECT industry, SUM({}) AS s FROM tax_monthly t JOIN enterprises e \
             ON t.credit_code = e.credit_code GROUP BY industry",
            vec!["vat_paid"; terms].join(" + ")
        )
    };
    let nested = |levels: usize| {
        let mut sql =
            "SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry".to_string();
        for _ in 0..levels {
            sql = format!("SELECT industry, SUM(n) AS n FROM ({sql}) GROUP BY industry");
        }
        sql
    };
    let or_chain = |terms: usize| {
        format!(
            "SELECT industry, COUNT(*) AS n FROM enterprises WHERE {} GROUP BY industry",
            (0..terms)
                .map(|i| format!("city = 'c{i}'"))
                .collect::<Vec<_>>()
                .join(" OR ")
        )
    };
    let in_list = |n: usize| {
        format!(
            "SELECT industry, COUNT(*) AS n FROM enterprises WHERE city IN ({}) GROUP BY industry",
            (0..n)
                .map(|i| format!("'c{i}'"))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("2,000-term chain", chain(2000), "query-too-complex"),
        ("20,000-term chain", chain(20_000), "query-too-complex"),
        ("100 nested subqueries", nested(100), "query-too-complex"),
        ("IN list of 100,000", in_list(100_000), "query-too-complex"),
        (
            "deep parentheses",
            format!(
                "SELECT industry, COUNT(*) AS n FROM enterprises WHERE {}city = 'x'{} GROUP BY industry",
                "(".repeat(5000),
                ")".repeat(5000)
            ),
            "query-too-complex",
        ),
        ("2,000-term OR chain", or_chain(2000), "query-too-complex"),
        ("a 60-term OR chain", or_chain(60), "allow"),
        ("a short IN list", in_list(500), "allow"),
    ];
    for (name, sql, expected) in cases {
        let outcome = match engine
            .plan(
                &sql,
                &GrantedDataset::all_for(&policy, &analyst()),
                &key(),
                Mode::Aggregate,
            )
            .await
        {
            Ok(_) => "allow".to_string(),
            Err(error) => error.code().to_string(),
        };
        assert_eq!(outcome, expected, "{name}");
    }
}

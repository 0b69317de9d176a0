//! Row mode: the input query of a code job, checked against the module's approved scope.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sandbox_sql::{CancellationToken, RowScope, SqlEngine, SqlLimits};

use crate::{engine_over_demo, key};

/// Every enterprise of the demo in `dir`: the tests' scopes see them all as consented.
async fn everyone(dir: &std::path::Path) -> std::collections::HashSet<String> {
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet(
        "enterprises",
        dir.join("datasets/enterprises").to_str().unwrap(),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    let batches = ctx
        .sql("SELECT credit_code FROM enterprises")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut units = std::collections::HashSet::new();
    for batch in batches {
        let codes = datafusion::arrow::compute::cast(
            batch.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        let codes = codes
            .as_any()
            .downcast_ref::<datafusion::arrow::array::StringArray>()
            .unwrap();
        units.extend(codes.iter().flatten().map(str::to_string));
    }
    units
}

/// A scope covering these `dataset.column`s, every enterprise consenting.
async fn scope(
    dir: &std::path::Path,
    policy: &sandbox_policy::PolicySet,
    columns: &[&str],
) -> RowScope {
    let consented = Arc::new(everyone(dir).await);
    let mut datasets: HashMap<String, (Arc<sandbox_policy::DatasetPolicy>, BTreeSet<String>)> =
        HashMap::new();
    for column in columns {
        let (dataset, name) = column.split_once('.').unwrap();
        datasets
            .entry(dataset.to_string())
            .or_insert_with(|| (Arc::new(policy.datasets[dataset].clone()), BTreeSet::new()))
            .1
            .insert(name.to_string());
    }
    RowScope {
        datasets,
        consented,
    }
}

const SCOPE: &[&str] = &[
    "enterprises.credit_code",
    "enterprises.industry",
    "tax_monthly.credit_code",
    "tax_monthly.month",
    "tax_monthly.vat_paid",
    "social_insurance_monthly.credit_code",
    "social_insurance_monthly.arrears",
    "court_cases.credit_code",
    "court_cases.role",
];

#[tokio::test]
async fn row_mode_allows_per_entity_features_and_denies_the_rest() {
    let (dir, policy, engine) = engine_over_demo(200, SqlLimits::default()).await;
    let scope = scope(dir.path(), &policy, SCOPE).await;
    // (query, expected: "allow" or the rule code)
    let cases: &[(&str, &str)] = &[
        ("SELECT credit_code, vat_paid FROM tax_monthly", "allow"),
        (
            "SELECT t.credit_code, SUM(CASE WHEN t.month >= '2024-01' THEN t.vat_paid ELSE 0 END) AS v, \
             COUNT(*) AS n FROM tax_monthly t GROUP BY t.credit_code",
            "allow",
        ),
        (
            "SELECT e.credit_code, e.industry, t.v, COALESCE(c.n, 0) AS cases FROM enterprises e \
             JOIN (SELECT credit_code, SUM(vat_paid) AS v FROM tax_monthly GROUP BY credit_code) t \
               ON e.credit_code = t.credit_code \
             LEFT JOIN (SELECT credit_code, COUNT(*) AS n FROM court_cases WHERE role = 'defendant' \
                        GROUP BY credit_code) c ON e.credit_code = c.credit_code",
            "allow",
        ),
        // Outside the approved columns or datasets.
        (
            "SELECT credit_code, revenue_declared FROM tax_monthly",
            "column-not-approved",
        ),
        (
            "SELECT credit_code, amount FROM court_cases",
            "column-not-approved",
        ),
        ("SELECT * FROM tax_monthly", "column-not-approved"),
        (
            "SELECT credit_code FROM housing_fund_monthly",
            "dataset-not-granted",
        ),
        // Hidden columns are not even in the catalog.
        ("SELECT credit_code, legal_rep FROM enterprises", "sql-plan"),
        // Visible, but outside the approved scope.
        (
            "SELECT credit_code, name FROM enterprises",
            "column-not-approved",
        ),
        // Joins only on the privacy unit of both sides.
        (
            "SELECT t.credit_code FROM tax_monthly t JOIN enterprises e ON t.month = e.industry",
            "join-key-not-allowed",
        ),
        (
            "SELECT t.credit_code FROM tax_monthly t JOIN enterprises e \
             ON t.credit_code = e.credit_code AND t.vat_paid > 10",
            "join-condition-not-allowed",
        ),
        (
            "SELECT t.credit_code FROM tax_monthly t FULL JOIN enterprises e \
             ON t.credit_code = e.credit_code",
            "join-type-not-allowed",
        ),
        (
            "SELECT t.credit_code FROM tax_monthly t CROSS JOIN enterprises e",
            "cross-join",
        ),
        // Aggregates are per entity, and the output keeps the entity.
        (
            "SELECT industry, COUNT(*) FROM enterprises GROUP BY industry",
            "privacy-unit-unavailable",
        ),
        (
            "SELECT vat_paid FROM tax_monthly",
            "privacy-unit-unavailable",
        ),
        // Other shapes and expressions stay denied.
        (
            "SELECT credit_code FROM tax_monthly UNION ALL SELECT credit_code FROM enterprises",
            "plan-node-not-allowed",
        ),
        (
            "SELECT credit_code FROM tax_monthly LIMIT 5",
            "plan-node-not-allowed",
        ),
        (
            "SELECT credit_code, CAST(month AS INT) FROM tax_monthly",
            "expression-not-allowed",
        ),
        (
            "SELECT credit_code, ROW_NUMBER() OVER (ORDER BY vat_paid) FROM tax_monthly",
            "plan-node-not-allowed",
        ),
        (
            "SELECT credit_code FROM tax_monthly WHERE credit_code IN (SELECT credit_code FROM enterprises)",
            "subquery-not-allowed",
        ),
        (
            "SELECT credit_code, vat_paid AS __sandbox_units FROM tax_monthly",
            "reserved-name",
        ),
        ("DELETE FROM tax_monthly", "statement-not-query"),
    ];
    let mut failures = Vec::new();
    for (query, expected) in cases {
        let got = match engine.plan_rows(query, &scope, &key()).await {
            Ok(_) => "allow".to_string(),
            Err(e) => e.code().to_string(),
        };
        if got != *expected {
            failures.push(format!("{query}\n  expected {expected}, got {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn row_mode_input_carries_the_unit_and_runs() {
    let (dir, policy, engine) = engine_over_demo(200, SqlLimits::default()).await;
    let scope = scope(dir.path(), &policy, SCOPE).await;
    let planned = engine
        .plan_rows(
            "SELECT SUM(vat_paid) AS v, credit_code FROM tax_monthly GROUP BY credit_code",
            &scope,
            &key(),
        )
        .await
        .expect("allowed");
    assert_eq!(planned.guarded().key_index, 1);
    assert!(
        planned
            .guarded()
            .columns
            .contains(&"tax_monthly.vat_paid".to_string())
    );
    let executed = engine
        .execute_rows(planned, CancellationToken::new())
        .await
        .expect("runs");
    let rows: usize = executed.batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, 200, "one row per enterprise");
}

/// `(credit_code, case token)` pairs of every court case, read through the masked catalog.
async fn case_tokens(engine: &sandbox_sql::SqlEngine, scope: &RowScope, org: &str) -> Vec<String> {
    let key = sandbox_sql::PseudonymKey::derive(b"test secret", org);
    let planned = engine
        .plan_rows("SELECT credit_code, case_id FROM court_cases", scope, &key)
        .await
        .expect("allowed");
    let executed = engine
        .execute_rows(planned, CancellationToken::new())
        .await
        .expect("runs");
    crate::sorted_rows(&executed.batches, 2)
}

#[tokio::test]
async fn pseudonyms_are_stable_per_consumer_and_unlinkable_across_consumers() {
    let (dir, policy, engine) = engine_over_demo(300, SqlLimits::default()).await;
    let scope = scope(
        dir.path(),
        &policy,
        &["court_cases.credit_code", "court_cases.case_id"],
    )
    .await;
    let bank = case_tokens(&engine, &scope, "bank_demo").await;
    assert_eq!(bank, case_tokens(&engine, &scope, "bank_demo").await);
    let other = case_tokens(&engine, &scope, "other_bank").await;
    assert_eq!(bank.len(), other.len());
    let tokens = |rows: &[String]| -> BTreeSet<String> {
        rows.iter()
            .map(|r| r.split('|').nth(1).unwrap().to_string())
            .collect()
    };
    let (a, b) = (tokens(&bank), tokens(&other));
    assert!(a.is_disjoint(&b), "no token is shared across consumers");
    // One token per case (no collisions), and never the raw case number.
    let raw = datafusion::prelude::SessionContext::new();
    let path = dir.path().join("datasets/court_cases");
    raw.register_parquet(
        "court_cases",
        path.to_str().unwrap(),
        datafusion::prelude::ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    let cases = raw
        .sql("SELECT case_id FROM court_cases")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let raw_ids: BTreeSet<String> = crate::sorted_rows(&cases, 1).into_iter().collect();
    assert_eq!(a.len(), raw_ids.len());
    assert!(a.is_disjoint(&raw_ids));
    assert!(
        a.iter()
            .all(|t| t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()))
    );
}

async fn run_rows(engine: &SqlEngine, scope: &RowScope, query: &str) -> sandbox_sql::ExecutedRows {
    let planned = engine
        .plan_rows(query, scope, &key())
        .await
        .expect("a row-mode query is allowed");
    engine
        .execute_rows(planned, CancellationToken::new())
        .await
        .expect("the query completes")
}

/// A sort of more rows than the query's memory pool holds spills to the spill folder and
/// completes with every row in order; without a spill folder's room it fails cleanly.
#[tokio::test]
async fn a_large_sort_spills_under_a_pool_smaller_than_its_input() {
    let spill = tempfile::tempdir().expect("spill dir");
    let limits = SqlLimits {
        job_memory_bytes: 4 << 20,
        memory_pool_bytes: 64 << 20,
        spill_dir: Some(spill.path().join("spill")),
        // One partition: a second one (the consent filter is parallelized) would split the
        // small pool between two sorts and their merge.
        target_partitions: 1,
        ..SqlLimits::default()
    };
    let (dir, policy, engine) = engine_over_demo(3000, limits).await;
    let scope = scope(dir.path(), &policy, SCOPE).await;
    let query = "SELECT credit_code, month, vat_paid FROM tax_monthly ORDER BY vat_paid, credit_code, month";
    let executed = run_rows(&engine, &scope, query).await;
    let unbounded = SqlEngine::new(&policy, dir.path(), SqlLimits::default())
        .await
        .expect("engine");
    let in_memory = run_rows(&unbounded, &scope, query).await;
    assert_eq!(in_memory.spilled_bytes, 0, "the default pool holds it");
    let input_bytes: usize = executed
        .batches
        .iter()
        .map(|b| b.get_array_memory_size())
        .sum();
    assert!(
        input_bytes > 4 << 20,
        "the input ({input_bytes} bytes) is larger than the pool"
    );
    assert!(executed.spilled_bytes > 0, "the sort spilled");
    // The same rows in the same order as sorted in memory (one table, whatever the batches).
    let render = |batches: &[datafusion::arrow::array::RecordBatch]| {
        datafusion::arrow::util::pretty::pretty_format_batches(batches)
            .expect("printable")
            .to_string()
    };
    assert_eq!(render(&executed.batches), render(&in_memory.batches));
    // In order.
    let mut last = f64::MIN;
    for batch in &executed.batches {
        let column = batch
            .column(2)
            .as_any()
            .downcast_ref::<datafusion::arrow::array::Float64Array>()
            .expect("vat_paid is a float");
        for value in column.iter().flatten() {
            assert!(value >= last);
            last = value;
        }
    }
}

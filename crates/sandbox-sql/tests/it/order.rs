//! Row order: a query without `ORDER BY` comes back sorted by its output columns, left to right,
//! the same every run; one with `ORDER BY` keeps its own order; under differential privacy the
//! sort names the group keys only (the statistics are noised after the plan).

use datafusion::logical_expr::{Expr, LogicalPlan};
use sandbox_policy::Mode;
use sandbox_sql::{CancellationToken, GrantedDataset, SqlLimits};

use super::{analyst, engine_over_demo, key};

/// The released rows of `sql` as text, one vector of cells per row, and the released IPC bytes.
async fn released(
    engine: &sandbox_sql::SqlEngine,
    grants: &std::collections::HashMap<String, GrantedDataset>,
    sql: &str,
) -> (Vec<Vec<String>>, Vec<u8>) {
    let planned = engine
        .plan(sql, grants, &key(), Mode::Aggregate)
        .await
        .expect("allowed");
    let gate = planned.gate_policy(100_000, None);
    let executed = engine
        .execute(planned, CancellationToken::new())
        .await
        .expect("runs");
    let released = executed
        .release(&gate, &Vec::new())
        .expect("released by the gate");
    let mut rows = Vec::new();
    for batch in released.batches() {
        for row in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|column| {
                        datafusion::arrow::util::display::array_value_to_string(column, row)
                            .expect("displayable")
                    })
                    .collect(),
            );
        }
    }
    (rows, released.to_ipc_stream().expect("encodes"))
}

#[tokio::test]
async fn unordered_results_come_sorted_and_order_by_is_kept() {
    let (_dir, policy, engine) = engine_over_demo(800, SqlLimits::default()).await;
    let grants = GrantedDataset::all_for(&policy, &analyst());

    let unordered = "SELECT industry, status, COUNT(*) AS n FROM enterprises \
                     GROUP BY industry, status";
    let (first, first_bytes) = released(&engine, &grants, unordered).await;
    assert!(first.len() > 3, "enough groups to have an order: {first:?}");
    let keys = |rows: &[Vec<String>]| -> Vec<(String, String)> {
        rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect()
    };
    let mut sorted = keys(&first);
    sorted.sort();
    assert_eq!(keys(&first), sorted, "sorted by industry, then status");
    // Asked again, the same rows in the same order: the same bytes, so the same SHA-256.
    for _ in 0..3 {
        let (again, again_bytes) = released(&engine, &grants, unordered).await;
        assert_eq!(again, first);
        assert_eq!(again_bytes, first_bytes);
    }

    // An explicit ORDER BY is kept, even against the default order.
    let ordered = "SELECT industry, status, COUNT(*) AS n FROM enterprises \
                   GROUP BY industry, status ORDER BY industry DESC, status DESC";
    let (descending, _) = released(&engine, &grants, ordered).await;
    let mut expected = keys(&first);
    expected.reverse();
    assert_eq!(keys(&descending), expected);

    // A LIMIT takes the first rows of that order: the same rows every time.
    let limited = format!("{unordered} LIMIT 3");
    let (top, _) = released(&engine, &grants, &limited).await;
    assert_eq!(top, first[..3].to_vec());
}

/// Under differential privacy the default order is by the group keys alone: the plan's top
/// sort names no statistic, whose true values the noise hides.
#[tokio::test]
async fn private_results_are_sorted_by_their_group_keys_only() {
    let (_dir, policy, engine) = engine_over_demo(200, SqlLimits::default()).await;
    let grants = GrantedDataset::all_for(&policy, &analyst());
    let planned = engine
        .plan(
            "SELECT case_type, COUNT(*) AS cases, SUM(amount) AS amount FROM court_cases \
             GROUP BY case_type",
            &grants,
            &key(),
            Mode::Aggregate,
        )
        .await
        .expect("allowed under differential privacy");
    assert!(planned.guarded().dp.is_some(), "L4 amounts are private");
    let LogicalPlan::Sort(sort) = &planned.guarded().plan else {
        panic!("no sort on top:\n{}", planned.display_plan());
    };
    let names: Vec<String> = sort
        .expr
        .iter()
        .map(|e| match &e.expr {
            Expr::Column(column) => column.name.clone(),
            other => panic!("a sort by an expression: {other}"),
        })
        .collect();
    assert_eq!(names, ["case_type"]);
}

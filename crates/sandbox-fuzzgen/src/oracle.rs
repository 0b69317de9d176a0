//! The guard's oracle: a query the plan guard admits must run into a result the release gate
//! accepts, with the hidden columns the gate needs, and the gate must release exactly the rows
//! that cover enough privacy units (checked here independently of the gate's own code).

use std::collections::HashMap;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{SchemaRef, UInt64Type};
use sandbox_policy::{Mode, PolicySet, Principal, PrincipalRole};
use sandbox_release::dp::plan_noise;
use sandbox_release::{GatePolicy, HAVING_COLUMN, HIDDEN_PREFIX, UNITS_COLUMN};
use sandbox_sql::{CancellationToken, GrantedDataset, PseudonymKey, SqlEngine, SqlLimits};

/// What became of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Refused at planning, with the rule or error code.
    Refused(String),
    /// Admitted, then failed while running (time limit, a data-dependent error).
    Failed(String),
    /// Admitted and released this many rows.
    Released(u64),
}

/// An engine over a small demo data set, the demo policies, and the analyst's grants.
pub struct GuardOracle {
    _dir: tempfile::TempDir,
    engine: SqlEngine,
    granted: HashMap<String, GrantedDataset>,
    key: PseudonymKey,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for GuardOracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardOracle").finish_non_exhaustive()
    }
}

/// The demo analyst, whose grants the oracle checks.
pub fn analyst() -> Principal {
    Principal {
        id: "analyst".into(),
        org: "analytics".into(),
        roles: [PrincipalRole::Analyst].into(),
    }
}

/// The repository's demo policies.
/// The demo policies with every grant exact where allowed: the oracle checks the exact guard
/// and gate (DP is checked where the data is L4).
pub fn demo_policy() -> PolicySet {
    let mut policy = sandbox_policy::load_sources(&crate::policy::demo_sources())
        .expect("the repository's policies load");
    policy.mark_exact_where_allowed();
    policy
}

impl GuardOracle {
    /// Demo data for `enterprises` enterprises in a temporary folder.
    pub fn new(enterprises: usize) -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        sandbox_demo::generate(
            dir.path(),
            &sandbox_demo::DemoConfig {
                enterprises,
                ..Default::default()
            },
        )
        .expect("demo data");
        let policy = demo_policy();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let limits = SqlLimits {
            time_limit: Duration::from_secs(5),
            memory_pool_bytes: 256 << 20,
            job_memory_bytes: 128 << 20,
            target_partitions: 1,
            ..SqlLimits::default()
        };
        let engine = runtime
            .block_on(SqlEngine::new(&policy, dir.path(), limits))
            .expect("engine");
        let granted = GrantedDataset::all_for(&policy, &analyst());
        GuardOracle {
            _dir: dir,
            engine,
            granted,
            key: PseudonymKey::derive(b"fuzz secret", "analytics"),
            runtime,
        }
    }

    /// Plans, runs and releases `sql`, panicking when the guard admitted something the gate
    /// cannot or does not release as it must.
    pub fn check(&self, sql: &str) -> Verdict {
        self.runtime.block_on(self.check_async(sql))
    }

    async fn check_async(&self, sql: &str) -> Verdict {
        let planned = match self
            .engine
            .plan(sql, &self.granted, &self.key, Mode::Aggregate)
            .await
        {
            Ok(planned) => planned,
            Err(error) => return Verdict::Refused(error.code().to_string()),
        };
        let gate = planned.gate_policy(1_000_000, None);
        // What clients are told before the query runs (Flight SQL's schemas) must be what the
        // gate then releases.
        let announced = planned
            .released_schema()
            .unwrap_or_else(|e| panic!("no released schema for an admitted query ({e}): {sql}"));
        if let Some(dp) = planned.guarded().dp.clone() {
            return self
                .check_private(sql, planned, dp, &gate, &announced)
                .await;
        }
        assert!(
            gate.min_units >= 2,
            "admitted with k = {}: {sql}",
            gate.min_units
        );
        let executed = match self.engine.execute(planned, CancellationToken::new()).await {
            Ok(executed) => executed,
            Err(error) => return failed(sql, &error),
        };
        let schema = executed.schema().clone();
        let units = schema
            .index_of(UNITS_COLUMN)
            .unwrap_or_else(|_| panic!("admitted without a unit count: {sql}"));
        let having = schema.index_of(HAVING_COLUMN).ok();
        // The rows that may be released: enough units, and the HAVING predicate holds.
        let mut eligible = 0u64;
        let mut total = 0u64;
        for batch in executed.batches() {
            let counts = batch.column(units).as_primitive::<UInt64Type>();
            let kept = having.map(|i| batch.column(i).as_boolean().clone());
            for row in 0..batch.num_rows() {
                total += 1;
                let having_holds = kept
                    .as_ref()
                    .is_none_or(|k| k.is_valid(row) && k.value(row));
                if !counts.is_null(row) && counts.value(row) >= gate.min_units && having_holds {
                    eligible += 1;
                }
            }
        }
        let released = executed
            .release(&gate, &Vec::<(_, u64)>::new())
            .unwrap_or_else(|e| panic!("the gate refused what the guard admitted ({e}): {sql}"));
        for field in released.schema().fields() {
            assert!(
                !field.name().starts_with(HIDDEN_PREFIX),
                "hidden column {} released: {sql}",
                field.name()
            );
        }
        assert_eq!(
            released.schema(),
            &announced,
            "the release's schema differs from the one announced: {sql}"
        );
        let summary = released.summary();
        let expected = (eligible as usize)
            .saturating_sub(gate.skip)
            .min(gate.fetch.unwrap_or(usize::MAX)) as u64;
        // Every releasable row is released, but one withheld as the complement of suppressed
        // cells of fewer than `min_units` units together (fresh memory: nothing else withholds).
        assert!(
            summary.rows_released <= expected
                && summary.rows_released + summary.rows_differencing.min(1) >= expected,
            "released {} rows, withheld {}, of {expected} with at least {} units (of {total}): \
             {sql}",
            summary.rows_released,
            summary.rows_differencing,
            gate.min_units
        );
        Verdict::Released(summary.rows_released)
    }

    /// A query admitted under differential privacy: the noisy release must succeed on what the
    /// rewrite computed, show no hidden column, and show at most the groups it computed.
    async fn check_private(
        &self,
        sql: &str,
        planned: sandbox_sql::PlannedQuery,
        dp: sandbox_sql::DpGuarded,
        gate: &GatePolicy,
        announced: &SchemaRef,
    ) -> Verdict {
        let noise = match plan_noise(&dp.spec, dp.mode.epsilon, dp.mode.delta) {
            Ok(noise) => noise,
            Err(error) => return Verdict::Refused(error.code().to_string()),
        };
        let executed = match self.engine.execute(planned, CancellationToken::new()).await {
            Ok(executed) => executed,
            Err(error) => return failed(sql, &error),
        };
        let groups: usize = executed.batches().iter().map(|b| b.num_rows()).sum();
        let (released, _) = executed
            .release_dp(&noise, gate)
            .unwrap_or_else(|e| panic!("the DP gate refused what the guard admitted ({e}): {sql}"));
        for field in released.schema().fields() {
            assert!(
                !field.name().starts_with(HIDDEN_PREFIX),
                "hidden column {} released under DP: {sql}",
                field.name()
            );
        }
        assert_eq!(
            released.schema(),
            announced,
            "the DP release's schema differs from the one announced: {sql}"
        );
        let rows = released.summary().rows_released;
        assert!(
            rows as usize <= groups.max(1),
            "more rows than groups under DP: {sql}"
        );
        Verdict::Released(rows)
    }
}

/// An admitted query that failed while running. Limits (time, memory) and refusals from the
/// optimized plan are fine; an execution error is a finding: whether it happens depends on the
/// data, a side channel the guard must close.
fn failed(sql: &str, error: &sandbox_sql::SqlError) -> Verdict {
    assert!(
        !matches!(error, sandbox_sql::SqlError::Execution(_)),
        "an admitted query failed on the data ({error}): {sql}"
    );
    Verdict::Failed(error.code().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::{Schema, query};
    use arbitrary::Unstructured;

    /// A few hundred generated queries through the oracle: some are released, many refused,
    /// none breaks the contract between guard and gate.
    #[test]
    fn generated_queries_keep_the_guard_gate_contract() {
        let oracle = GuardOracle::new(120);
        let schema = Schema::granted(&demo_policy(), &analyst());
        let mut released = 0;
        let mut refused = std::collections::BTreeMap::<String, usize>::new();
        for seed in 0..300u32 {
            let bytes: Vec<u8> = (0..200u32)
                .map(|i| {
                    (seed
                        .wrapping_mul(2_246_822_519)
                        .wrapping_add(i.wrapping_mul(3_266_489_917))
                        >> 11) as u8
                })
                .collect();
            let sql = query(&mut Unstructured::new(&bytes), &schema).expect("a query");
            match oracle.check(&sql) {
                Verdict::Released(_) => released += 1,
                Verdict::Refused(rule) => *refused.entry(rule).or_default() += 1,
                Verdict::Failed(rule) => *refused.entry(rule).or_default() += 1,
            }
        }
        // The guard is strict: most random queries are refused, a few percent released (23 of
        // these 300); both sides are what the oracle needs.
        assert!(
            released >= 15,
            "only {released} released; refused: {refused:?}"
        );
        assert!(refused.len() >= 10, "few distinct refusals: {refused:?}");
    }

    /// The oracle itself notices a release that breaks the contract: a query whose rows are
    /// all released is counted right, and known denials are refused.
    #[test]
    fn oracle_verdicts_on_known_queries() {
        let oracle = GuardOracle::new(120);
        // Text converted to numbers by type coercion: refused from the plan, not failed on the
        // data (the oracle's first finding).
        for sql in [
            "SELECT COUNT(*) AS n FROM court_cases t0 WHERE round(t0.case_type) = 9018",
            "SELECT COUNT(*) AS n FROM social_insurance_monthly WHERE month IN (56364)",
        ] {
            let verdict = oracle.check(sql);
            assert!(
                !matches!(verdict, Verdict::Released(_)),
                "{sql}: {verdict:?}"
            );
        }
        assert_eq!(
            oracle
                .check("SELECT COUNT(*) AS n FROM social_insurance_monthly WHERE month IN (56364)"),
            Verdict::Failed("cast-may-fail".into())
        );
        assert!(matches!(
            oracle.check("SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry"),
            Verdict::Released(n) if n > 0
        ));
        assert_eq!(
            oracle.check("SELECT credit_code FROM enterprises"),
            Verdict::Refused("identifier-output".into())
        );
        assert_eq!(
            oracle.check("SELECT COUNT(*) FROM enterprises a, tax_monthly b"),
            Verdict::Refused("cross-join".into())
        );
    }
}

//! The SQL path of the sandbox: plan and execute.
//!
//! [`SqlEngine::plan`] parses one query in a fresh DataFusion session whose catalog holds only the
//! caller's granted datasets, refuses anything but `SELECT`, and hands the `LogicalPlan` to
//! [`guard`]. The guard walks the plan (never the SQL text), tracks which source columns flow into
//! each expression, enforces the roles of the policy and rewrites the aggregate to carry a hidden,
//! capped count of distinct privacy units per group ([`units::CappedUnits`]).
//!
//! [`SqlEngine::plan_rows`] plans the input query of a code job through the same parser and the
//! row-mode guard ([`guard_rows`]): only the module's approved columns, per-entity aggregates and
//! equi-joins on the privacy unit; its rows go to the guest only. [`SqlEngine::plan_with`] and
//! [`SqlEngine::plan_rows_with`] bind an approved template's `$name` parameters into the plan
//! before the guard sees it.
//!
//! [`SqlEngine::execute`] runs the rewritten plan under a shared memory pool (operators spill
//! beyond it), a time limit, a row cap and a cancellation token, and returns [`Executed`]: batches
//! that still carry the hidden column and must pass the release gate before anything leaves.
//!
//! A query without `ORDER BY` is answered in one order (`order.rs`): each guard puts a sort on
//! top of its plan, by the output columns the caller gets unchanged (every visible output of an
//! exact answer, the group keys under differential privacy, every column in row mode), left to
//! right. The gate keeps that order, so the same question gives the same rows in the same order,
//! the same `LIMIT` rows and the same SHA-256. A parse error reads `syntax error: Expected: ...,
//! found: ... at Line: 1, Column: 8` ([`syntax_error`]).
//!
//! # Sessions and scans
//!
//! `SqlEngine` opens every dataset once as a `ListingTable` whose schema is only the visible
//! columns (hidden data is never read), with no statistics, pruning, page indexes, bloom filters or
//! dynamic filters: each would make a scan read less because of what the data holds, which a
//! query's duration shows. `full_scan.rs` adds sentinel rows to the build sides of joins and drains
//! every partition an operator did not read to the end; hash joins collect their build side whole
//! (`CollectLeft`, no repartitioned joins), so no partition of a build side is empty either. Each
//! job gets a clone of one prebuilt `SessionState` (functions, config, runtime) with a fresh
//! catalog holding only the granted tables. A dataset with masked columns is registered per job as
//! a `MaskedTable` (`masks.rs`), keyed by a secret the engine creates at first start under
//! `<data-dir>/secrets/pseudonym.key` (0600) and the consumer's org; a dataset read by a code job
//! or a scoring template as a `ConsentedTable` (`consent.rs`).
//!
//! # Limits (`limits.rs`)
//!
//! Before parsing: the text's length (`--max-query-bytes`), its token count (`--max-plan-nodes`)
//! and, per parenthesis level, the operators chained since the last comma, parenthesis or clause
//! keyword (`--max-expr-depth`): planning, naming and dropping `a + b + ...` recurse once per
//! operator, so a 2,000-term chain would overflow the stack. During parsing: the parser's recursion
//! limit (`--sql-recursion-limit`). After planning, before the guard: plan nodes plus expression
//! nodes, and expression depth (`query-too-complex`). While running: a `JobMemoryPool` per query, a
//! `FairSpillPool` of the per-query size whose every reservation also counts against the shared
//! `FairSpillPool`, so sorts, aggregates and joins spill (to `<data-dir>/tmp/spill`, emptied at
//! start, capped by `--spill-limit-mib`) when either says no. Queries execute on a second tokio
//! runtime owned by `SqlEngine`, never on the runtime that answers calls and writes the journal, so
//! a query's time limit and cancellation abort its task while every other call is still served. An
//! aborted task is awaited (up to 5 s) until it is dropped, so a job that has ended no longer holds
//! memory of the shared pool. `casts.rs` checks the optimized plan: a cast type coercion added that
//! could fail on some value is `cast-may-fail`, decided from types alone.
//!
//! # The exact guard (`guard.rs`)
//!
//! Joins: inner or left, conditions a conjunction of equalities between plain columns, anchored on
//! a join role (the privacy unit or a `join_key` on both sides; extra equalities between dimensions
//! are allowed), and one side a single dataset whose row key the join columns cover
//! (`join-copies-rows` otherwise: the other side's rows would be copied; exact aggregates of copied
//! values are refused too). *Unit classes* are a union-find over table scans: a join equating the
//! privacy units of two scans merges their classes, a join through a join key does not. The rewrite
//! counts capped distinct units once per class and releases a row only if the least count reaches
//! the threshold. When the query itself computes `COUNT(DISTINCT <unit>)`, the rewrite uses that
//! exact count (a second aggregate would stop DataFusion from planning it as a two-phase group-by).
//! An aggregate over an aggregating derived table is guarded in two steps (see `guard.rs`);
//! `HAVING` becomes the hidden `HAVING_COLUMN`.
//!
//! Every exact rewrite also adds a hidden `__sandbox_sketch` column (`sketch.rs`): per group, the
//! invertible Bloom lookup table of its rows keyed by unit (`sandbox_unit_sketch` over the unit
//! columns of the scans that drive the rows, then the row-key columns of the datasets no join
//! copies, hashed as a set of values so a one-to-one join changes no identity; nested aggregates
//! sum their inner rows' sketches with `sandbox_sketch_sum`). `Guarded::source`, a digest of the
//! aggregate's input and grouping, tells the gate whether a row answers the same question as a
//! remembered one. Exact plans also refuse expressions that could fail on some value
//! (`expression-may-fail`) and need every dataset's row key at the aggregate
//! (`row-key-unavailable`). Beyond integer division and `CAST`, scalar functions are allowed only
//! in forms that cannot raise (constant substring bounds and counts, known date units on date
//! columns; `abs` is not allowed): a failure that happens only when some row reaches the call would
//! tell whether any row did. Floating-point division, division by a non-zero constant and
//! `TRY_CAST` are allowed.
//!
//! # The DP guard (`dp.rs`)
//!
//! `guard` picks it when the caller asks, when a grant requires it, when a dataset read is of level
//! L3 or above and its grant is not exact, or when an exact plan hits `level-cap` and every dataset
//! read offers DP. Contribution bounds are the grants' (the larger for a join), or one row per unit
//! and group where the row keys are covered by the unit and the group keys, one group where every
//! key is constant per unit. Public-domain groupings join onto `VALUES` of every combination (at
//! most 10,000). `Guarded::dp` carries the `DpSpec` (outputs, statistics, public groups) for the
//! gate.
//!
//! # Guard rules
//!
//! Each denial carries one of these stable codes ([`Rule`]):
//!
//! | rule | meaning |
//! |---|---|
//! | `statement-not-query` | not a single `SELECT` (DDL, DML, `COPY`, `SET`, `EXPLAIN`, `SHOW`, ...) |
//! | `query-too-long` | the text exceeds `--max-query-bytes` |
//! | `query-too-complex` | more tokens or plan nodes than `--max-plan-nodes`, an operator chain or expression deeper than `--max-expr-depth`, nesting past `--sql-recursion-limit` |
//! | `cast-may-fail` | the optimized plan converts data values in a way that could fail on some rows |
//! | `dataset-not-granted` | a table that is not a dataset granted to the caller (same answer whether it exists or not) |
//! | `mode-not-granted` | the dataset is granted, but not in aggregate mode |
//! | `aggregate-required` | the query would release rows |
//! | `plan-node-not-allowed` | window, `UNION`, `DISTINCT`, `LIMIT` inside a subquery, ... |
//! | `cross-join` | a join without condition (`CROSS JOIN`, `FROM a, b`) |
//! | `join-type-not-allowed` | right, full, semi or anti joins |
//! | `join-condition-not-allowed` | a condition other than a conjunction of equalities of plain columns of each side |
//! | `join-key-not-allowed` | a join not anchored on the unit or a join key, or on a measure, masked or mixed-role column |
//! | `join-key-outside-join` | a join key output, grouped, compared, aggregated or used in an expression |
//! | `masked-value-in-expression` | a masked token (partial mask, pseudonym) compared or transformed |
//! | `measure-filter-not-granted` | a range filter on a measure the grant does not list in `filter_measures` |
//! | `null-extended-aggregated` | exact SQL: an aggregate of a value from the null-extended side of a left join |
//! | `filtered-measure-aggregated` | exact ad-hoc SQL: `SUM`, `AVG`, `MIN` or `MAX` of a measure a range filter of the query also compares |
//! | `nested-aggregate-not-supported` | an aggregate over aggregated rows in a shape the guard cannot prove (a limit inside, an aggregate below a join or in an expression) |
//! | `having-not-supported` | more than one filter over aggregated rows |
//! | `identifier-output`, `identifier-grouped`, `identifier-in-expression` | the privacy unit outside `COUNT(DISTINCT unit)` |
//! | `measure-outside-aggregate` | a measure in the output, grouping or a filter |
//! | `aggregate-argument-not-plain` | an aggregate over an expression (`SUM(CASE ...)`) |
//! | `function-not-allowed` | an aggregate outside the grant (`MIN`, `MAX` by default, `ARRAY_AGG`, ...) |
//! | `distinct-not-allowed` | `DISTINCT` on anything but the unit or a dimension |
//! | `aggregate-modifier-not-allowed` | `FILTER (WHERE ...)` or `ORDER BY` inside an aggregate |
//! | `expression-not-allowed`, `scalar-function-not-allowed`, `subquery-not-allowed` | outside the allow-lists |
//! | `level-cap` | a column whose level forbids ad-hoc SQL |
//! | `reserved-name` | an output named `__sandbox_*` |
//! | `limit-not-constant` | `LIMIT`/`OFFSET` that is not a constant |
//! | `privacy-unit-unavailable` | the unit does not reach the aggregate (or, in row mode, the output or a per-entity aggregate) |
//! | `column-not-approved` | row mode: a column the module's approvals do not list |
//! | `dp-not-granted` | differential privacy asked for or needed, and a dataset read does not offer it |
//! | `dp-not-supported` | a shape DP does not cover: `MIN`/`MAX`, `HAVING`, order by an aggregate, expressions over aggregates, nested aggregates, joins through a join key, `COUNT(DISTINCT)` of anything but the unit |
//! | `dp-bounds-missing` | `SUM`/`AVG` under DP of a measure without declared `bounds` |
//! | `join-copies-rows` | a join of many rows to many, or an exact aggregate of the values (or `COUNT(*)`) of rows a join copies |
//! | `row-key-unavailable` | an exact answer over a dataset without a declared row key, or whose row key does not reach the aggregate |
//! | `expression-may-fail` | an expression that could raise on some values (integer `/` or `%` by a non-literal, 0 or -1; decimal arithmetic; out-of-range literal arguments) |
//!
//! Execution errors other than these (which may quote values) reach the client as one uniform
//! `execution-failed` with a fixed text; `time-limit` and cancellation are errors of their own.

mod casts;
pub mod consent;
mod dp;
mod error;
mod full_scan;
mod guard;
mod limits;
pub mod masks;
mod order;
mod rows;
mod session;
pub mod sketch;
pub mod units;

pub use error::{Denial, Result, Rule, SqlError, syntax_error};
pub use guard::{
    DpGuarded, GrantedDataset, Guarded, HAVING_COLUMN, HIDDEN_PREFIX, UNITS_COLUMN, guard,
};
pub use masks::PseudonymKey;
pub use rows::{GuardedRows, RowScope, guard_rows};
pub use session::{
    Executed, ExecutedRows, PlannedQuery, PlannedRows, SqlEngine, SqlLimits, placeholder_values,
};
pub use tokio_util::sync::CancellationToken;

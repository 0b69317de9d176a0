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
//! equi-joins on the privacy unit; its rows go to the guest only.
//!
//! [`SqlEngine::execute`] runs the rewritten plan under a shared memory pool (operators spill beyond
//! it), a time limit, a row cap and a cancellation token, and returns [`Executed`]: batches that
//! still carry the hidden column and must pass the release gate before anything leaves.

mod casts;
pub mod consent;
mod dp;
mod error;
mod full_scan;
mod guard;
mod limits;
pub mod masks;
mod rows;
mod session;
pub mod sketch;
pub mod units;

pub use error::{Denial, Result, Rule, SqlError};
pub use guard::{
    DpGuarded, GrantedDataset, Guarded, HAVING_COLUMN, HIDDEN_PREFIX, UNITS_COLUMN, guard,
};
pub use masks::PseudonymKey;
pub use rows::{GuardedRows, RowScope, guard_rows};
pub use session::{
    Executed, ExecutedRows, PlannedQuery, PlannedRows, SqlEngine, SqlLimits, placeholder_values,
};
pub use tokio_util::sync::CancellationToken;

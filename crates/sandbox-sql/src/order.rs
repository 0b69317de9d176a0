//! The order of a result whose query gives none. DataFusion returns rows in whatever order its
//! partitions finish, which changes from run to run: the same question would come back in
//! another order, with another SHA-256 in the journal and another set of rows under a `LIMIT`.
//! A query without `ORDER BY` is answered sorted by its output columns, left to right (the group
//! keys come first in practice), ascending, nulls last.
//!
//! The sort sits on top of the guarded plan, so the gate sees the rows in that order and keeps it
//! (it filters, and applies `OFFSET`/`LIMIT` to the sorted rows). It sorts only by values the
//! caller is released unchanged, so the order tells nothing the rows do not: every visible output
//! of an exact answer, the group keys of one under differential privacy (its statistics are noised
//! at the gate, after the plan: an order by their true values would tell what the noise hides).
//! Rows of an exact answer that tie on every sort column are identical to the caller.

use datafusion::common::Column;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, SortExpr};

use crate::error::SqlError;
use crate::guard::rewrite_error;

/// `plan` sorted by those of its output columns `sort_by` accepts (by name), in output order. A
/// plan without such a column is returned as it is.
pub(crate) fn sorted_by_outputs(
    plan: LogicalPlan,
    sort_by: impl Fn(&str) -> bool,
) -> Result<LogicalPlan, SqlError> {
    let keys: Vec<SortExpr> = plan
        .schema()
        .iter()
        .filter(|(_, field)| sort_by(field.name()))
        .map(|(qualifier, field)| {
            SortExpr::new(
                Expr::Column(Column::new(qualifier.cloned(), field.name())),
                true,
                false,
            )
        })
        .collect();
    if keys.is_empty() {
        return Ok(plan);
    }
    LogicalPlanBuilder::from(plan)
        .sort(keys)
        .and_then(|builder| builder.build())
        .map_err(rewrite_error)
}

/// Whether a plan orders its output: a sort among the nodes that pass rows through unchanged
/// in number and order above the rest (projections, aliases, filters and limits).
pub(crate) fn is_ordered(plan: &LogicalPlan) -> bool {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Sort(_) => return true,
            LogicalPlan::Projection(_)
            | LogicalPlan::SubqueryAlias(_)
            | LogicalPlan::Filter(_)
            | LogicalPlan::Limit(_) => match node.inputs().as_slice() {
                [input] => node = input,
                _ => return false,
            },
            _ => return false,
        }
    }
}

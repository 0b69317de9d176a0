//! Conversions that could fail on the data, found in the optimized plan before it runs.
//!
//! The guard checks the plan as written; type coercion adds casts afterwards (`month IN (5)`
//! compares text with a number by converting every row's text, `round(case_type)` converts text
//! to a float). Such a cast raises an error as soon as one row reaching it does not convert, so
//! whether a query fails would depend on rows the gate never shows: a side channel around the
//! threshold (found by the guard's fuzz oracle). A cast of a data value is allowed only where it
//! cannot fail; everything else is refused from the plan alone, before any data is read.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan};

use crate::error::{Denial, Result, Rule, SqlError};

/// Refuses a plan holding a cast of a data value that could fail.
pub(crate) fn refuse_failing_casts(plan: &LogicalPlan) -> Result<()> {
    let mut refusal: Option<String> = None;
    plan.apply_with_subqueries(|node| {
        let schema = input_schema(node);
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                if let Expr::Cast(cast) = e
                    && !matches!(cast.expr.as_ref(), Expr::Literal(..))
                {
                    let from = schema
                        .as_ref()
                        .and_then(|s| cast.expr.get_type(s.as_ref()).ok());
                    let safe = from
                        .as_ref()
                        .is_some_and(|from| cast_cannot_fail(from, cast.field.data_type()));
                    if !safe {
                        refusal = Some(format!(
                            "converting {} to {} could fail on some rows, and whether the query \
                             fails would depend on data the gate does not show; compare values \
                             of the same type (e.g. quote numbers compared with text columns)",
                            from.map_or("a value".to_string(), |t| format!("{t}")),
                            cast.field.data_type()
                        ));
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(if refusal.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })
    .map_err(|e| SqlError::Plan(e.to_string()))?;
    match refusal {
        Some(message) => Err(Denial::new(Rule::CastMayFail, message).into()),
        None => Ok(()),
    }
}

/// The schema a node's expressions refer to: its inputs' together, or a scan's source.
fn input_schema(node: &LogicalPlan) -> Option<DFSchemaRef> {
    if let LogicalPlan::TableScan(scan) = node {
        return DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())
            .ok()
            .map(std::sync::Arc::new);
    }
    let inputs = node.inputs();
    let (first, rest) = inputs.split_first()?;
    let mut schema = first.schema().as_ref().clone();
    for input in rest {
        schema.merge(input.schema());
    }
    Some(std::sync::Arc::new(schema))
}

fn is_text(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Whether converting any value of `from` to `to` always succeeds.
pub(crate) fn cast_cannot_fail(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to || is_text(to) || matches!(from, Null) {
        return true;
    }
    match (from, to) {
        (Dictionary(_, value), to) => cast_cannot_fail(value, to),
        (Boolean, Int8 | Int16 | Int32 | Int64 | Float32 | Float64) => true,
        // Widening integers.
        (Int8, Int16 | Int32 | Int64) | (Int16, Int32 | Int64) | (Int32, Int64) => true,
        (UInt8, UInt16 | UInt32 | UInt64 | Int16 | Int32 | Int64) => true,
        (UInt16, UInt32 | UInt64 | Int32 | Int64) | (UInt32, UInt64 | Int64) => true,
        // Every integer and float has a (possibly rounded) double.
        (Int8 | Int16 | Int32 | Int64 | UInt8 | UInt16 | UInt32 | UInt64 | Float32, Float64) => {
            true
        }
        (Int8 | Int16 | UInt8 | UInt16, Float32) => true,
        // Dates into timestamps (the demo's and any realistic date is in range).
        (Date32, Date64 | Timestamp(_, _)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_conversions_that_cannot_fail_pass() {
        use DataType::*;
        let safe = [
            (Int32, Int64),
            (Int64, Float64),
            (Utf8, Utf8View),
            (Float64, Utf8),
            (
                Date32,
                Timestamp(datafusion::arrow::datatypes::TimeUnit::Nanosecond, None),
            ),
            (Null, Int64),
        ];
        for (from, to) in safe {
            assert!(cast_cannot_fail(&from, &to), "{from} -> {to}");
        }
        let unsafe_ = [
            (Utf8, Int64),
            (Utf8View, Float64),
            (Utf8, Date32),
            (Float64, Int64),
            (Int64, Int32),
            (Int64, UInt64),
        ];
        for (from, to) in unsafe_ {
            assert!(!cast_cannot_fail(&from, &to), "{from} -> {to}");
        }
    }
}

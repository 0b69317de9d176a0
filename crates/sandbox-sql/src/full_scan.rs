//! Every scan a query starts is read to its end, whatever the operators above it decide: a
//! query's duration must not tell what the filtered rows held.
//!
//! DataFusion stops early where the data lets it: a hash join whose build side came out empty
//! (say, the one enterprise a filter on the register picks out, or none) never reads its probe
//! side, so a query over 480,000 tax rows answers in a tenth of the time when the filter matched
//! nothing. The caller sees no rows of it either way, but the time alone answers "does an
//! enterprise with these properties exist?", one bit per query, and a binary search turns bits into
//! values. So every leaf of the physical plan is wrapped in a [`FullScanExec`] that records which
//! of its partitions were read to the end; once the query's own stream is done, [`drain`] reads
//! the others, on as many tasks as there are partitions, before the result goes to the gate.
//! (Pruning by statistics, page indexes, bloom filters and dynamic filters, the other ways a scan
//! reads less because of what the data holds, are off in the session config.)
//!
//! Draining the probe side reads it, but does not hash and look up its rows: a join whose build
//! side held the one enterprise a filter picked still took hundreds of milliseconds longer than
//! one whose build side was empty, over every monthly table joined. So before a plan runs,
//! [`sentinel_joins`] adds to the sides of every inner or left join one sentinel row (keys and
//! values set to their type's default) with a marker that joins too and that no real row has, so
//! the sentinel matches nothing: no build side is ever empty, every join probes every row of its
//! other side, and the result is the same.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Expr, Filter, Join, JoinType, LogicalPlan, LogicalPlanBuilder, Projection, Union, lit,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::{StreamExt, TryStreamExt};

/// The session settings under which no operator does less work because of what the data holds:
/// no statistics (which would also steer the plan by a column's minimum and maximum), no pruning
/// by statistics, page indexes or bloom filters, no dynamic filters; and hash joins that build one
/// table for all partitions (`CollectLeft`), so the sentinel row is in every partition's build
/// side (with partitioned joins, a partition whose build side is empty skips its probe rows).
pub(crate) fn no_data_shortcuts(options: &mut datafusion::config::ConfigOptions) {
    options.execution.collect_statistics = false;
    options.execution.parquet.pruning = false;
    options.execution.parquet.enable_page_index = false;
    options.execution.parquet.bloom_filter_on_read = false;
    options.execution.parquet.pushdown_filters = false;
    options.optimizer.enable_dynamic_filter_pushdown = false;
    options.optimizer.enable_join_dynamic_filter_pushdown = false;
    options.optimizer.enable_topk_dynamic_filter_pushdown = false;
    options.optimizer.enable_aggregate_dynamic_filter_pushdown = false;
    options.optimizer.repartition_joins = false;
}

/// A leaf of the plan, with a flag per partition: set once the partition's stream ended.
#[derive(Debug)]
pub(crate) struct FullScanExec {
    input: Arc<dyn ExecutionPlan>,
    finished: Arc<Vec<AtomicBool>>,
}

impl FullScanExec {
    fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        let partitions = input.properties().output_partitioning().partition_count();
        FullScanExec {
            input,
            finished: Arc::new((0..partitions).map(|_| AtomicBool::new(false)).collect()),
        }
    }
}

impl DisplayAs for FullScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FullScanExec")
    }
}

impl ExecutionPlan for FullScanExec {
    fn name(&self) -> &str {
        "FullScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(FullScanExec::new(children.swap_remove(0))))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let stream = self.input.execute(partition, context)?;
        let schema = stream.schema();
        let finished = self.finished.clone();
        let end = futures::stream::once(async move {
            if let Some(flag) = finished.get(partition) {
                flag.store(true, Ordering::Release);
            }
            None
        })
        .filter_map(futures::future::ready);
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.chain(end),
        )))
    }
}

/// Wraps every leaf of `plan` in a [`FullScanExec`], collected into `scans`.
pub(crate) fn wrap_scans(
    plan: Arc<dyn ExecutionPlan>,
    scans: &mut Vec<Arc<FullScanExec>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let children: Vec<Arc<dyn ExecutionPlan>> = plan.children().into_iter().cloned().collect();
    if children.is_empty() {
        let scan = Arc::new(FullScanExec::new(plan));
        scans.push(scan.clone());
        return Ok(scan);
    }
    let children = children
        .into_iter()
        .map(|child| wrap_scans(child, scans))
        .collect::<Result<Vec<_>>>()?;
    // The wrapper has its input's properties: the parent's are unchanged.
    plan.replace_children(
        children,
        ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep),
    )
}

/// Adds a sentinel row to the sides of every inner or left equi-join whose emptiness would end
/// it early (both of an inner join, the left of a left join), each side with a marker column
/// that joins too: 0 on the real rows, 1 on the left sentinel, 2 on the right one, so a sentinel
/// matches nothing. A left join's unmatched left sentinel is filtered out above it, by a
/// predicate over both sides' markers (which no optimizer can push below the join).
pub(crate) fn sentinel_joins(plan: LogicalPlan) -> Result<LogicalPlan> {
    let mut joins = 0usize;
    plan.transform_up(|node| {
        let LogicalPlan::Join(join) = &node else {
            return Ok(Transformed::no(node));
        };
        if !matches!(join.join_type, JoinType::Inner | JoinType::Left) || join.on.is_empty() {
            return Ok(Transformed::no(node));
        }
        joins += 1;
        let (left_marker, right_marker) = (
            format!("__sandbox_sentinel_{joins}_l"),
            format!("__sandbox_sentinel_{joins}_r"),
        );
        let inner = join.join_type == JoinType::Inner;
        let left = with_sentinel(join.left.as_ref().clone(), &left_marker, Some(1))?;
        let right = with_sentinel(
            join.right.as_ref().clone(),
            &right_marker,
            inner.then_some(2),
        )?;
        let marker = |name: &str| Expr::Column(Column::new_unqualified(name));
        let mut on = join.on.clone();
        on.push((marker(&left_marker), marker(&right_marker)));
        let mut plan = LogicalPlan::Join(Join::try_new(
            Arc::new(left),
            Arc::new(right),
            on,
            join.filter.clone(),
            join.join_type,
            join.join_constraint,
            join.null_equality,
            join.null_aware,
        )?);
        if !inner {
            // `CASE`, not `coalesce`: the plan is past the optimizer, which rewrites the latter.
            let right = datafusion::logical_expr::when(marker(&right_marker).is_null(), lit(0i64))
                .otherwise(marker(&right_marker))?;
            let unmatched_sentinel = marker(&left_marker) + right;
            plan = LogicalPlan::Filter(Filter::try_new(
                unmatched_sentinel.eq(lit(0i64)),
                Arc::new(plan),
            )?);
        }
        let columns = join
            .schema
            .iter()
            .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())))
            .collect();
        let restored =
            Projection::try_new_with_schema(columns, Arc::new(plan), join.schema.clone())?;
        Ok(Transformed::yes(LogicalPlan::Projection(restored)))
    })
    .map(|t| t.data)
}

/// `side` with an integer `marker` column (0), and with `sentinel` one more row: every column at
/// its type's default, the marker that value. Its columns keep their names and qualifiers.
fn with_sentinel(side: LogicalPlan, marker: &str, sentinel: Option<i64>) -> Result<LogicalPlan> {
    let schema = side.schema().clone();
    let Some(value) = sentinel else {
        let mut columns: Vec<Expr> = schema
            .iter()
            .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())))
            .collect();
        columns.push(lit(0i64).alias(marker));
        return LogicalPlanBuilder::from(side).project(columns)?.build();
    };
    // The union goes by position under names of its own: a side of several tables may hold the
    // same name twice (`e.credit_code`, `t.credit_code`), which a union would rename.
    let slot = |i: usize| format!("__sandbox_slot_{i}");
    let width = schema.fields().len();
    let mut columns: Vec<Expr> = schema
        .iter()
        .enumerate()
        .map(|(i, (qualifier, field))| {
            Expr::Column(Column::new(qualifier.cloned(), field.name())).alias(slot(i))
        })
        .collect();
    columns.push(lit(0i64).alias(slot(width)));
    let real = LogicalPlanBuilder::from(side).project(columns)?.build()?;
    let mut row = Vec::with_capacity(width + 1);
    for (i, field) in schema.fields().iter().enumerate() {
        // The field's metadata too, or the union would drop it and a parent that compares
        // schemas would see another field.
        let metadata = (!field.metadata().is_empty())
            .then(|| datafusion::common::metadata::FieldMetadata::new_from_field(field));
        row.push(Expr::Literal(placeholder(field.data_type())?, metadata).alias(slot(i)));
    }
    row.push(lit(value).alias(slot(width)));
    let sentinel = LogicalPlanBuilder::empty(true).project(row)?.build()?;
    let union = LogicalPlan::Union(Union::try_new(vec![Arc::new(real), Arc::new(sentinel)])?);
    let mut restore: Vec<Expr> = schema
        .iter()
        .enumerate()
        .map(|(i, (qualifier, field))| {
            Expr::Column(Column::new_unqualified(slot(i)))
                .alias_qualified(qualifier.cloned(), field.name())
        })
        .collect();
    restore.push(Expr::Column(Column::new_unqualified(slot(width))).alias(marker));
    LogicalPlanBuilder::from(union).project(restore)?.build()
}

/// A sentinel's value in a column: the type's default for the types a dataset holds (so a
/// column that cannot be null stays so), a typed null for anything else.
fn placeholder(data_type: &DataType) -> Result<ScalarValue> {
    if data_type.is_primitive()
        || matches!(
            data_type,
            DataType::Boolean
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
        )
    {
        ScalarValue::new_default(data_type)
    } else {
        ScalarValue::try_from(data_type)
    }
}

/// Reads every partition of `scans` that the query did not read to its end, in parallel;
/// returns the rows it read.
pub(crate) async fn drain(scans: &[Arc<FullScanExec>], context: Arc<TaskContext>) -> Result<usize> {
    let mut reads = Vec::new();
    for scan in scans {
        for (partition, flag) in scan.finished.iter().enumerate() {
            if !flag.load(Ordering::Acquire) {
                let stream = scan.input.execute(partition, context.clone())?;
                reads.push(tokio::spawn(
                    stream.try_fold(
                        0usize,
                        |rows, batch| async move { Ok(rows + batch.num_rows()) },
                    ),
                ));
            }
        }
    }
    let mut rows = 0;
    for read in reads {
        rows += read.await.map_err(|e| {
            datafusion::common::DataFusionError::Execution(format!("a scan's drain failed: {e}"))
        })??;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    /// A hash join whose build side is empty reads its probe side anyway: every scan is drained.
    #[tokio::test]
    async fn an_empty_build_side_does_not_skip_the_probe_side() {
        let dir = tempfile::tempdir().unwrap();
        // The sandbox's settings, on two partitions.
        let mut config = datafusion::prelude::SessionConfig::new().with_target_partitions(2);
        no_data_shortcuts(config.options_mut());
        let ctx = SessionContext::new_with_config(config);
        for (name, rows) in [("small", 10), ("large", 50_000)] {
            let path = dir.path().join(format!("{name}.parquet"));
            ctx.sql(&format!(
                "COPY (SELECT value AS k, value AS v FROM generate_series(1, {rows})) TO '{}'",
                path.display()
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
            ctx.register_parquet(name, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
        }
        let plan = ctx
            .sql("SELECT COUNT(*) FROM small s JOIN large l ON s.k = l.k WHERE s.v < 0")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let mut scans = Vec::new();
        let plan = wrap_scans(plan, &mut scans).unwrap();
        assert!(scans.len() >= 2, "{scans:?}");
        datafusion::physical_plan::collect(plan, ctx.task_ctx())
            .await
            .unwrap();
        let unread = |scans: &[Arc<FullScanExec>]| {
            scans
                .iter()
                .flat_map(|s| s.finished.iter())
                .filter(|f| !f.load(Ordering::Acquire))
                .count()
        };
        assert!(
            unread(&scans) > 0,
            "the join skipped nothing: the test proves nothing"
        );
        let drained = drain(&scans, ctx.task_ctx()).await.unwrap();
        assert_eq!(drained, 50_000, "the probe side, read in full");

        // With sentinels, the join probes every row: nothing is left to drain, and the answers
        // (inner and left, matching rows or none) are those of the plain plan.
        for sql in [
            "SELECT COUNT(*) AS n, SUM(l.v) AS v FROM small s JOIN large l ON s.k = l.k WHERE s.v < 0",
            "SELECT COUNT(*) AS n, SUM(l.v) AS v FROM small s JOIN large l ON s.k = l.k WHERE s.v < 5",
            "SELECT s.k, l.v FROM small s LEFT JOIN large l ON s.k = l.k AND l.v > 3 ORDER BY s.k",
            "SELECT COUNT(*) AS n FROM large l LEFT JOIN small s ON s.k = l.k WHERE l.v < 0",
            // A side of two tables, with the same names twice.
            "SELECT COUNT(*) AS n, SUM(l2.v) AS v FROM small s JOIN large l ON s.k = l.k \
             JOIN large l2 ON l2.k = l.k WHERE s.v < 3",
            "SELECT COUNT(*) AS n FROM small s JOIN large l ON s.k = l.k \
             LEFT JOIN large l2 ON l2.k = l.k AND l2.v > 100 WHERE s.v < 0",
        ] {
            let frame = ctx.sql(sql).await.unwrap();
            let plain = frame.clone().collect().await.unwrap();
            let (state, logical) = frame.into_parts();
            let logical = state.optimize(&logical).unwrap();
            let padded = sentinel_joins(logical).unwrap();
            // As the engine runs it: the physical planner alone (`create_physical_plan` of the
            // state would optimize the plan again and undo the sentinels).
            let physical = state
                .query_planner()
                .create_physical_plan(&padded, &state)
                .await
                .unwrap();
            let shown = datafusion::physical_plan::displayable(physical.as_ref())
                .indent(true)
                .to_string();
            // One build table for all partitions: each holds the sentinel.
            assert!(
                !shown.contains("mode=Partitioned"),
                "{sql}: a partitioned join\n{shown}"
            );
            let mut scans = Vec::new();
            let physical = wrap_scans(physical, &mut scans).unwrap();
            let physical_for_display = physical.clone();
            let answer = datafusion::physical_plan::collect(physical, ctx.task_ctx())
                .await
                .unwrap();
            assert_eq!(
                datafusion::arrow::util::pretty::pretty_format_batches(&answer)
                    .unwrap()
                    .to_string(),
                datafusion::arrow::util::pretty::pretty_format_batches(&plain)
                    .unwrap()
                    .to_string(),
                "{sql}"
            );
            assert_eq!(
                unread(&scans),
                0,
                "{sql}: every side read to its end\n{}",
                datafusion::physical_plan::displayable(physical_for_display.as_ref()).indent(true)
            );
        }
    }
}

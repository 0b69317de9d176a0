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

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::common::Result;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::{StreamExt, TryStreamExt};

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
        let ctx = SessionContext::new();
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
    }
}

//! Ad hoc SQL under differential privacy: the epsilon asked for (within the grant's), the
//! noise plan, the answer cache (an identical question gets the answer already released, at no
//! cost, *whoever asks it*: asking again, or from another org, cannot average the noise away),
//! otherwise the budget check and debit under the registry lock, recorded with the job's
//! admission and never refunded. The budget ledger itself is governance
//! ([`crate::governance::budgets`]).

use std::sync::Arc;

use sandbox_policy::Record;
use sandbox_release::plan_noise;
use sandbox_sql::{DpGuarded, PlannedQuery};
use tracing::Instrument;

use crate::admission::Submission;
use crate::answers::{CachedAnswer, question_key};
use crate::codes::EngineRule;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::governance::registry::record_value;
use crate::recorder::Pending;
use crate::types::{DpOutcome, JobSnapshot, Produced, RequestContext};

/// The text a DP job's terminal event carries.
pub(crate) fn journal_note(dp: &DpOutcome) -> String {
    let columns: Vec<String> = dp
        .columns
        .iter()
        .filter(|c| c.scale > 0.0)
        .map(|c| {
            format!(
                "{} scale {:.4} (95% ±{:.4})",
                c.column, c.scale, c.accuracy_95
            )
        })
        .collect();
    format!(
        "differential privacy: epsilon {} delta {:e}{}; remaining epsilon {} delta {:e}; {}",
        dp.epsilon_spent,
        dp.delta_spent,
        if dp.cached { " (cached answer)" } else { "" },
        dp.epsilon_remaining,
        dp.delta_remaining,
        columns.join(", ")
    )
}

/// The least epsilon a query may ask for, as a share of its grant's epsilon per query.
pub const MIN_EPSILON_SHARE: f64 = 0.1;

impl Engine {
    /// Admits a query the guard planned under differential privacy (`guarded`, the guard's one
    /// decision): the epsilon asked for
    /// (within the grant's), the noise plan, a cached answer if the same query was answered,
    /// otherwise the budget check and debit under the registry lock, recorded with the job's
    /// admission.
    pub(crate) async fn submit_dp(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: Pending,
        started: Submission,
        planned: PlannedQuery,
        guarded: DpGuarded,
        requested: Option<f64>,
    ) -> Result<JobSnapshot> {
        event.datasets = planned.guarded().datasets.clone();
        event.columns = planned.guarded().columns.clone();
        // At least a tenth of the grant's: a query at a vanishing epsilon answers nothing worth
        // having and costs nothing, so whatever else it shows (its duration, its refusals) would
        // come for free, thousands of times over.
        let least = guarded.mode.epsilon * MIN_EPSILON_SHARE;
        let epsilon = match requested {
            None => guarded.mode.epsilon,
            Some(e) if e.is_finite() && e >= least && e <= guarded.mode.epsilon => e,
            Some(e) => {
                let error = EngineError::denied(
                    EngineRule::DpEpsilonNotAllowed,
                    format!(
                        "epsilon {e} is not allowed: your grant allows from {least} to {} per \
                         query",
                        guarded.mode.epsilon
                    ),
                );
                return event.refuse_after(started.elapsed(), error).await;
            }
        };
        let noise = match plan_noise(&guarded.spec, epsilon, guarded.mode.delta) {
            Ok(noise) => noise,
            Err(error) => return event.refuse_after(started.elapsed(), error.into()).await,
        };
        let org = ctx.principal.org.clone();
        // The same question gets the same noisy answer whoever asks, unless its answer shows the
        // asking org's own pseudonyms.
        let scope = if self.reads_pseudonyms(&planned.guarded().columns) {
            org.as_str()
        } else {
            ""
        };
        let key = question_key(
            "dp",
            scope,
            &planned.display_plan(),
            // The spec names the outputs (aliases included); the gate applies OFFSET and LIMIT.
            &format!(
                "{:?}\0{}\0{}\0{}\0{:?}",
                guarded.spec,
                epsilon.to_bits(),
                guarded.mode.delta.to_bits(),
                planned.guarded().skip,
                planned.guarded().fetch
            ),
        );
        let datasets = planned.guarded().datasets.clone();

        if let Some(cached) = self.answers.get(&key).await
            && let Some(report) = &cached.report
        {
            let (epsilon_remaining, delta_remaining) =
                match self.governance.remaining(ctx, &datasets, 0.0, 0.0) {
                    Ok(left) => left,
                    Err(error) => return event.refuse_after(started.elapsed(), error).await,
                };
            let dp = DpOutcome {
                epsilon_spent: 0.0,
                delta_spent: 0.0,
                epsilon_remaining,
                delta_remaining,
                cached: true,
                columns: report.columns.clone(),
            };
            event.message = format!("the answer already released by job {}", cached.job_id);
            return self
                .spawn_job(ctx, event, started, move |_, _| async move {
                    Ok(Produced {
                        dp: Some(dp),
                        ..Produced::sql(cached.released, 0)
                    })
                })
                .await;
        }

        // Check and debit under one lock: concurrent queries cannot both take the last of a
        // budget. The record goes into the job's admission, durable before it executes.
        let debit = Record::BudgetDebit {
            org: org.clone(),
            datasets: datasets.clone(),
            epsilon: noise.epsilon,
            delta: noise.delta,
        };
        let remaining = {
            let mut registry = self.governance.registry();
            let remaining =
                self.governance
                    .remaining_in(&registry, ctx, &datasets, noise.epsilon, noise.delta);
            if remaining.is_ok() {
                registry.apply(debit.clone());
            }
            remaining
        };
        let (epsilon_remaining, delta_remaining) = match remaining {
            Ok(left) => left,
            Err(error) => return event.refuse_after(started.elapsed(), error).await,
        };
        self.metrics
            .budget_spent(&org, &datasets, noise.epsilon, noise.delta);
        event.record = Some(record_value(&debit));
        let job_id = event.job_id.clone();
        let gate = planned.gate_policy(self.config.max_release_rows, None);
        self.spawn_job(ctx, event, started, move |engine, cancel| async move {
            let executed = engine
                .sql
                .execute(planned, cancel)
                .instrument(tracing::info_span!("execute"))
                .await?;
            let release_span = tracing::info_span!("release").entered();
            let rows_scanned = executed.rows_scanned();
            let (released, report) = executed.release_dp(&noise, &gate)?;
            drop(release_span);
            engine
                .answers
                .put(
                    key,
                    CachedAnswer {
                        released: released.clone(),
                        report: Some(report.clone()),
                        job_id,
                    },
                )
                .await;
            Ok(Produced {
                dp: Some(DpOutcome {
                    epsilon_spent: report.epsilon,
                    delta_spent: report.delta,
                    epsilon_remaining,
                    delta_remaining,
                    cached: false,
                    columns: report.columns,
                }),
                ..Produced::sql(released, rows_scanned)
            })
        })
        .await
    }

    /// Whether any of these columns (`dataset.column`) is a per-org pseudonym: an answer that
    /// shows them is the asking org's alone.
    fn reads_pseudonyms(&self, columns: &[String]) -> bool {
        columns.iter().any(|column| {
            column.split_once('.').is_some_and(|(dataset, name)| {
                self.datasets
                    .get(dataset)
                    .and_then(|d| d.column(name))
                    .is_some_and(|c| c.mask == Some(sandbox_policy::Mask::Pseudonym))
            })
        })
    }
}

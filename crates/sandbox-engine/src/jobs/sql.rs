//! Ad hoc SQL jobs: planning through the guard, then either the exact path (the gate with its
//! unit threshold and the differencing memory; this file) or differential privacy
//! ([`super::dp`]), decided once by the guard.

use std::sync::Arc;
use std::time::Instant;

use sandbox_policy::Mode;
use sandbox_sql::{CancellationToken, PlannedQuery, SqlError};
use tracing::Instrument;

use crate::admission::Submission;
use crate::engine::Engine;
use crate::error::Result;
use crate::recorder::Pending;
use crate::types::{DpRequest, Explanation, JobSnapshot, Produced, RequestContext};

fn mode_of(dp: Option<DpRequest>) -> Mode {
    if dp.is_some() {
        Mode::Private
    } else {
        Mode::Aggregate
    }
}

impl Engine {
    /// Plans an ad hoc query; the guard's decision (exact or private) sends it on its way.
    pub(crate) async fn submit_sql(
        self: &Arc<Self>,
        ctx: &RequestContext,
        event: Pending,
        started: Submission,
        query: String,
        dp: Option<DpRequest>,
    ) -> Result<JobSnapshot> {
        let granted = self.granted(&ctx.principal);
        let planned = match self
            .sql
            .plan(
                &query,
                &granted,
                &self.pseudonym_key(&ctx.principal),
                mode_of(dp),
            )
            .instrument(tracing::info_span!("plan"))
            .await
        {
            Ok(planned) => planned,
            Err(error) => {
                tracing::info!(job = %event.job_id, rule = error.code(), "job refused at planning");
                return event.refuse_after(started.elapsed(), error.into()).await;
            }
        };
        let released_schema = match planned.released_schema() {
            Ok(schema) => schema,
            Err(error) => return event.refuse_after(started.elapsed(), error.into()).await,
        };
        let snapshot = match planned.guarded().dp.clone() {
            Some(private) => {
                let epsilon = dp.and_then(|d| d.epsilon);
                self.submit_dp(ctx, event, started, planned, private, epsilon)
                    .await?
            }
            None => self.spawn_aggregate(ctx, event, started, planned).await?,
        };
        Ok(JobSnapshot {
            released_schema: Some(released_schema),
            ..snapshot
        })
    }

    /// The decision on an ad hoc query, and under differential privacy the noise it would get.
    pub(crate) async fn explain_sql(
        &self,
        ctx: &RequestContext,
        event: Pending,
        query: &str,
        dp: Option<DpRequest>,
    ) -> Result<Explanation> {
        let granted = self.granted(&ctx.principal);
        let key = self.pseudonym_key(&ctx.principal);
        let planned = self
            .sql
            .plan(query, &granted, &key, mode_of(dp))
            .await
            .and_then(|planned| Ok((planned.released_schema()?, planned)));
        let explanation = match planned {
            Ok((released_schema, planned)) => {
                let guarded = planned.guarded();
                // Under differential privacy: the noise the query would get at the grant's
                // epsilon, before anything is spent.
                let noise = guarded.dp.as_ref().map(|dp| {
                    sandbox_release::plan_noise(&dp.spec, dp.mode.epsilon, dp.mode.delta)
                        .map(|plan| plan.report())
                });
                let (epsilon, accuracy) = match noise {
                    Some(Ok(report)) => (report.epsilon, report.columns),
                    _ => (0.0, Vec::new()),
                };
                Ok(Explanation {
                    allowed: true,
                    rule: "",
                    message: match &guarded.dp {
                        None => "allowed, exact: rows covering fewer than min_units privacy \
                                 units, and rows whose input rows were (nearly) all released to \
                                 your org before, are withheld"
                            .into(),
                        Some(dp) => format!(
                            "allowed under differential privacy: epsilon {} per query (spent \
                             once; an identical question asked again, by anyone, gets the same \
                             answer), {}",
                            dp.mode.epsilon,
                            if dp.spec.public_groups {
                                "every group of the keys' public values shown"
                            } else if dp.spec.grouped {
                                "groups shown only if their noisy unit count passes a threshold"
                            } else {
                                "one row"
                            }
                        ),
                    },
                    datasets: guarded.datasets.clone(),
                    columns: guarded.columns.clone(),
                    min_units: guarded.min_units,
                    plan: planned.display_plan(),
                    released_schema: Some(released_schema),
                    epsilon,
                    accuracy,
                })
            }
            Err(SqlError::Denied(denial)) => {
                Ok(Explanation::denied(denial.rule.code(), denial.message))
            }
            Err(other) => Err(other.into()),
        };
        event.explained(explanation).await
    }

    /// Spawns a guarded aggregate query (ad hoc or a template's) as a job, its event naming
    /// what the guard found it reads.
    pub(crate) async fn spawn_aggregate(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: Pending,
        started: Submission,
        planned: PlannedQuery,
    ) -> Result<JobSnapshot> {
        event.datasets = planned.guarded().datasets.clone();
        event.columns = planned.guarded().columns.clone();
        event.min_units = planned.guarded().min_units;
        let org = ctx.principal.org.clone();
        self.spawn_job(ctx, event, started, move |engine, cancel| async move {
            engine.run_sql(&org, planned, cancel).await
        })
        .await
    }

    /// Execute and release for an exact SQL job of a consumer org (ad hoc on an exact grant, or an
    /// approved template). An identical question asked before is answered from the store: the
    /// same rows, at no cost, and without the differencing defense withholding what was already
    /// released. Otherwise the rows pass the gate against the differencing memory of every org
    /// (pooling two orgs' answers subtracts no better than one org's), and the org's memory
    /// remembers what is released, durably, before the release is recorded. The gate's work
    /// counts against the query's time limit; the release lock is taken only after the query ran.
    pub(crate) async fn run_sql(
        &self,
        org: &str,
        planned: PlannedQuery,
        cancel: CancellationToken,
    ) -> Result<Produced> {
        let started = Instant::now();
        let key = crate::answers::question_key(
            "exact",
            org,
            &planned.display_plan(),
            &format!(
                "{}\0{}\0{:?}",
                planned.guarded().min_units,
                planned.guarded().skip,
                planned.guarded().fetch
            ),
        );
        if let Some(stored) = self.answers.get(&key).await {
            return Ok(Produced {
                stored: true,
                ..Produced::sql(stored.released, 0)
            });
        }
        self.sql.check_row_keys(&planned.guarded().datasets).await?;
        let gate = planned.gate_policy(
            self.config.max_release_rows,
            Some(started + self.sql.limits().time_limit),
        );
        let executed = self
            .sql
            .execute(planned, cancel)
            .instrument(tracing::info_span!("execute"))
            .await?;
        let rows_scanned = executed.rows_scanned();
        if executed.spilled_bytes() > 0 {
            tracing::info!(bytes = executed.spilled_bytes(), "query spilled to disk");
        }
        let lock = gate
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        // Checked against what every org was released, remembered in this org's memory.
        let mut memory = tokio::time::timeout(lock, self.differencing.everyone(org))
            .await
            .map_err(|_| SqlError::TimeLimit(self.sql.limits().time_limit.as_millis() as u64))??;
        let released = {
            let _release = tracing::info_span!("release").entered();
            executed.release(&gate, &memory)?
        };
        memory.remember(released.sketches(), gate.source).await?;
        drop(memory);
        self.answers
            .put(
                key,
                crate::answers::CachedAnswer::exact(released.clone(), String::new()),
            )
            .await;
        Ok(Produced::sql(released, rows_scanned))
    }
}

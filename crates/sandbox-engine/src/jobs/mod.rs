//! Jobs: the table of jobs and their lifecycle (admit, run in the background, record then
//! publish the end, status, wait, cancel), and one module per job kind. A kind plans and admits
//! its job, then hands [`Engine::spawn_job`] the work that executes and releases it.
//!
//! - [`sql`]: ad hoc SQL, exact (gate, unit threshold, differencing memory);
//! - [`dp`]: ad hoc SQL under differential privacy (noise plan, budget debit, answer cache);
//! - [`code`]: WASM code jobs (approvals, consent-filtered input, guest, contract gate);
//! - [`template`]: runs of approved templates.

pub(crate) mod code;
pub(crate) mod dp;
pub(crate) mod sql;
pub(crate) mod table;
pub(crate) mod template;

use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::digest;
use sandbox_audit::Decision;
use sandbox_sql::{CancellationToken, SqlError};
use tokio::sync::watch;
use tracing::Instrument;

use crate::admission::Submission;
use crate::codes::Action;
use crate::engine::Engine;
use crate::error::{EngineError, ErrorKind, Result};
use crate::jobs::table::Job;
use crate::recorder::Pending;
use crate::types::{JobResult, JobSnapshot, JobState, Produced, RequestContext};

impl Engine {
    /// Jobs admitted and not yet ended (each holds a slot of the admission limits).
    pub fn running_jobs(&self) -> usize {
        self.jobs.running()
    }

    /// For a stop: cancels every running job and waits (at most `grace`) until each has
    /// recorded its end, so no admitted job is left without a terminal event.
    pub async fn stop_jobs(&self, grace: Duration) {
        for job in self.jobs.unfinished() {
            job.cancel.cancel();
        }
        let deadline = Instant::now() + grace;
        while self.running_jobs() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Records the job's admission durably (write-ahead: the spec, what it reads, and a run it
    /// counts against a limit, before anything executes, so a crash never refunds a run), then
    /// registers the job and runs `work` (execute and release) in the background, then records
    /// and publishes its end.
    pub(crate) async fn spawn_job<F, Fut>(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: Pending,
        started: Submission,
        work: F,
    ) -> Result<JobSnapshot>
    where
        F: FnOnce(Arc<Engine>, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Produced>> + Send + 'static,
    {
        if let Err(error) = event.admit("admitted; executing").await {
            return event.refuse_after(started.elapsed(), error).await;
        }
        let job_id = event.job_id.clone();
        let (state, _) = watch::channel(JobSnapshot::running(&job_id));
        let job = Arc::new(Job {
            owner: ctx.principal.id.clone(),
            created: Instant::now(),
            cancel: CancellationToken::new(),
            start: started.deferred.then(CancellationToken::new),
            state,
        });
        self.jobs.insert(job_id.clone(), job.clone());
        let engine = self.clone();
        let span = tracing::info_span!("job", id = %job_id, principal = %ctx.principal.id);
        let unclaimed = self.sql.limits().time_limit;
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let outcome = match &job.start {
                    None => work(engine.clone(), job.cancel.clone()).await,
                    Some(start) => tokio::select! {
                        () = start.cancelled() => work(engine.clone(), job.cancel.clone()).await,
                        () = job.cancel.cancelled() => Err(SqlError::Cancelled.into()),
                        () = tokio::time::sleep(unclaimed) => {
                            Err(EngineError::NotFetched(unclaimed.as_secs()))
                        }
                    },
                };
                let snapshot = engine.finish(outcome, event, started).await;
                job.state.send_replace(snapshot);
            },
            span,
        ));
        Ok(JobSnapshot::running(&job_id))
    }

    /// Record and publish: the job's terminal event is durable before the snapshot (and so the
    /// result) is published.
    async fn finish(
        &self,
        outcome: Result<Produced>,
        mut event: Pending,
        started: Submission,
    ) -> JobSnapshot {
        let job_id = event.job_id.clone();
        let outcome = outcome.and_then(|produced| {
            let ipc = produced.released.to_ipc_stream()?;
            let sha = hex::encode(digest::digest(&digest::SHA256, &ipc));
            Ok((produced, ipc, sha))
        });
        event.duration_ms = started.elapsed().as_millis() as u64;
        // Every job ends on the next multiple of the quantum since its admission: what the data
        // made a query do (a scan's few rows more or less after `full_scan`) hides below it.
        let quantum = self.config.response_quantum.as_nanos();
        if quantum > 0 {
            let elapsed = started.elapsed().as_nanos();
            let wait = quantum - elapsed % quantum;
            tokio::time::sleep(Duration::from_nanos(wait as u64)).await;
        }
        match outcome {
            Ok((mut produced, ipc, sha)) => {
                let summary = produced.released.summary();
                event.decision = Decision::Allow;
                event.rows_scanned = produced.rows_scanned;
                event.rows_released = summary.rows_released;
                event.rows_suppressed = summary.rows_suppressed;
                event.result_sha256 = sha.clone();
                event.work_units = produced.work_units;
                if let Some(dp) = &produced.dp {
                    event.epsilon_spent = dp.epsilon_spent;
                    event.message = crate::jobs::dp::journal_note(dp);
                }
                if summary.rows_differencing > 0 {
                    event.message = format!(
                        "differencing: withheld {} rows whose input rows are those of a row \
                         released to the org before, or differ from them in fewer than {} units, \
                         or that complement suppressed cells",
                        summary.rows_differencing, summary.min_units
                    );
                }
                event.guest_log = std::mem::take(&mut produced.guest_log);
                if produced.code_job {
                    event.message = format!(
                        "withheld {} input rows of entities without consent; dropped {} output \
                         rows for entities without consent",
                        produced.rows_withheld, summary.rows_suppressed
                    );
                }
                if produced.stored {
                    event.message = "the answer of an identical earlier question (or run), \
                                     from the store"
                        .into();
                }
                let (kind, org) = (event.kind.clone(), event.org.clone());
                match event
                    .allow()
                    .instrument(tracing::info_span!("record"))
                    .await
                {
                    Ok(receipt) => {
                        self.metrics.job_ended(
                            &kind,
                            Decision::Allow,
                            started.elapsed(),
                            &org,
                            summary.rows_released,
                            summary.rows_suppressed,
                        );
                        let result = JobResult::new(produced, ipc, sha, &receipt);
                        tracing::info!(
                            released = summary.rows_released,
                            suppressed = summary.rows_suppressed,
                            seq = receipt.seq,
                            "job released"
                        );
                        JobSnapshot {
                            result: Some(Arc::new(result)),
                            ..JobSnapshot::ended(&job_id, JobState::Succeeded, "", "")
                        }
                    }
                    Err(error) => {
                        // No durable record, no release.
                        tracing::error!(%error, "cannot record the release; result discarded");
                        JobSnapshot {
                            error: Some(ErrorKind::Unavailable),
                            ..JobSnapshot::ended(
                                &job_id,
                                JobState::Failed,
                                error.code(),
                                "the audit journal is unavailable; nothing was released",
                            )
                        }
                    }
                }
            }
            Err(error) => {
                let state = match error.kind() {
                    ErrorKind::Cancelled => JobState::Cancelled,
                    ErrorKind::Denied => JobState::Denied,
                    _ => JobState::Failed,
                };
                if let EngineError::Sql(SqlError::Execution(detail)) = &error {
                    // Details may hold data values: logged for operators, never sent or journaled.
                    tracing::warn!(detail = %detail, "job execution failed");
                }
                event.note_error(&error);
                let decision = event.decision;
                if let EngineError::Guest(failure) = &error {
                    // The guest's logs, work and the details of its failure (which it controls:
                    // a status, a size it asked for) go to the journal, never to the client.
                    event.guest_log = failure.logs.clone();
                    event.work_units = failure.work_units;
                    event.message = failure.error.to_string();
                }
                if let EngineError::AfterGuest {
                    logs, work_units, ..
                } = &error
                {
                    event.guest_log = logs.clone();
                    event.work_units = *work_units;
                }
                let snapshot = JobSnapshot {
                    error: Some(error.kind()),
                    ..JobSnapshot::ended(&job_id, state, error.code(), error.to_string())
                };
                let (kind, org) = (event.kind.clone(), event.org.clone());
                if let Err(audit) = event.record().await {
                    tracing::error!(error = %audit, "cannot record the job's end");
                }
                self.metrics
                    .job_ended(&kind, decision, started.elapsed(), &org, 0, 0);
                snapshot
            }
        }
    }

    /// One of the caller's jobs. Another principal's job is refused like a missing permission.
    fn job(&self, ctx: &RequestContext, job_id: &str) -> Result<Arc<Job>> {
        self.jobs.get(&ctx.principal.id, job_id)
    }

    /// The current state of one of the caller's jobs.
    pub async fn job_status(&self, ctx: &RequestContext, job_id: &str) -> Result<JobSnapshot> {
        let outcome = self.job(ctx, job_id).map(|job| job.state.borrow().clone());
        let mut event = self.recorder.begin(ctx, Action::GetJob);
        event.job_id = job_id.to_string();
        event.conclude(outcome).await
    }

    /// Waits until the job ends and returns its result, or the reason it has none. The job's own
    /// terminal event (the release) is already durable; this delivery is recorded too.
    pub async fn wait_result(&self, ctx: &RequestContext, job_id: &str) -> Result<Arc<JobResult>> {
        self.wait_result_watched(ctx, job_id, &CancellationToken::new())
            .await
    }

    /// [`Engine::wait_result`] for a client that may go away: when `client_gone` fires before
    /// the job ends, the job is cancelled (nobody waits for its result) and the call is recorded
    /// as cancelled (`client-disconnected`).
    pub async fn wait_result_watched(
        &self,
        ctx: &RequestContext,
        job_id: &str,
        client_gone: &CancellationToken,
    ) -> Result<Arc<JobResult>> {
        // Asking for the result starts a deferred job.
        if let Ok(job) = self.job(ctx, job_id)
            && let Some(start) = &job.start
        {
            start.cancel();
        }
        let waited = tokio::select! {
            waited = self.wait_terminal(ctx, job_id) => waited,
            () = client_gone.cancelled() => {
                if let Ok(job) = self.job(ctx, job_id) {
                    job.cancel.cancel();
                }
                Err(EngineError::ClientGone)
            }
        };
        let outcome = waited.and_then(|snapshot| match (snapshot.state, snapshot.result) {
            (JobState::Succeeded, Some(result)) => Ok(result),
            (state, _) => Err(EngineError::JobEnded {
                code: snapshot.rule,
                message: snapshot.message,
                kind: snapshot.error.unwrap_or(match state {
                    JobState::Cancelled => ErrorKind::Cancelled,
                    JobState::Denied => ErrorKind::Denied,
                    _ => ErrorKind::Internal,
                }),
            }),
        });
        let mut event = self.recorder.begin(ctx, Action::FetchResult);
        event.job_id = job_id.to_string();
        if let Ok(result) = &outcome {
            event.rows_released = result.outcome().rows_released;
            event.result_sha256 = result.outcome().result_sha256.clone();
        }
        event.conclude(outcome).await
    }

    async fn wait_terminal(&self, ctx: &RequestContext, job_id: &str) -> Result<JobSnapshot> {
        let job = self.job(ctx, job_id)?;
        let mut receiver = job.state.subscribe();
        let snapshot = receiver
            .wait_for(|s| s.state.is_terminal())
            .await
            .map_err(|_| EngineError::JobNotFound(job_id.to_string()))?
            .clone();
        Ok(snapshot)
    }

    /// Cancels one of the caller's jobs and waits for it to end; the job records its own
    /// terminal event, and this call one more.
    pub async fn cancel(&self, ctx: &RequestContext, job_id: &str) -> Result<JobSnapshot> {
        if let Ok(job) = self.job(ctx, job_id) {
            job.cancel.cancel();
        }
        let outcome = self.wait_terminal(ctx, job_id).await;
        let mut event = self.recorder.begin(ctx, Action::CancelJob);
        event.job_id = job_id.to_string();
        event.conclude(outcome).await
    }
}

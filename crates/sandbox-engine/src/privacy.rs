//! Differential privacy in the engine: the budget ledger, the answer cache, budget views and
//! renewals.
//!
//! The ledger is the registry's: `BudgetDebit` records (in a job's `AdmitJob` event, durable
//! before the query executes) and `BudgetRefreshed` records (an owner's explicit renewal), folded
//! at start like approvals and runs. A debit is checked and applied under the registry lock, so
//! concurrent queries cannot overspend, and it is never refunded: a job that fails or a server
//! that crashes after admission keeps it spent.
//!
//! Budgets hold twice: per consumer org and dataset (what the grant allows the org), and per
//! dataset over every consumer together (`[dataset.dp]` totals): a second organisation asking
//! the same questions does not bring a second budget to spend on the same enterprises.
//!
//! An identical question (same rewritten plan, outputs, limit and epsilon) gets the answer
//! already released, at no cost, *whoever asks it*: asking again, or from another org, cannot
//! average the noise away. (A question over a per-org pseudonym is keyed by the org too: its
//! answer shows that org's pseudonyms.) Answers are kept in memory and on disk
//! (`<data-dir>/dp-answers/`), so this holds across restarts. Exact answers are stored the same
//! way, per org.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ring::digest;
use sandbox_audit::AuditEvent;
use sandbox_policy::{BudgetSpent, DpMode, PrincipalRole, Record};
use sandbox_release::dp::{DpReport, plan_noise, release_dp};
use sandbox_release::{GatePolicy, Released};
use sandbox_sql::PlannedQuery;
use tracing::Instrument;

use crate::admission::Submission;
use crate::error::{EngineError, Result};
use crate::jobs::{DpOutcome, Engine, JobSnapshot, Produced, RequestContext};
use crate::modules::record_value;

/// Most answers kept in memory; beyond it the memory starts afresh (they stay on disk).
const MAX_CACHED_ANSWERS: usize = 10_000;

#[derive(Clone)]
pub(crate) struct CachedAnswer {
    pub(crate) released: Released,
    /// The noise of an answer under differential privacy; `None` for an exact one.
    report: Option<DpReport>,
    job_id: String,
}

impl CachedAnswer {
    /// An exact answer to store.
    pub(crate) fn exact(released: Released, job_id: String) -> Self {
        CachedAnswer {
            released,
            report: None,
            job_id,
        }
    }
}

/// What is stored beside an answer's Arrow bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    report: Option<DpReport>,
    job_id: String,
}

/// The key of a question in the answer store: its kind, the org it is scoped to (empty for a
/// question under differential privacy that reads no per-org pseudonym), the rewritten plan, and
/// whatever else decides the answer.
pub(crate) fn question_key(kind: &str, org: &str, plan: &str, extra: &str) -> String {
    hex::encode(digest::digest(
        &digest::SHA256,
        format!("{kind}\0{org}\0{plan}\0{extra}").as_bytes(),
    ))
}

/// Released DP answers by (consumer org, plan digest): in memory, and under
/// `<data-dir>/dp-answers/<key>.arrow` (the released IPC stream) with `<key>.json` (the noise
/// report and the job that paid), written durably, so they outlive a restart.
pub(crate) struct AnswerCache {
    dir: PathBuf,
    answers: Mutex<HashMap<String, CachedAnswer>>,
}

impl AnswerCache {
    pub(crate) fn new(data_dir: &Path) -> Self {
        AnswerCache {
            dir: data_dir.join("dp-answers"),
            answers: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Option<CachedAnswer> {
        if let Some(answer) = self.lock().get(key).cloned() {
            return Some(answer);
        }
        let ipc = tokio::fs::read(self.dir.join(format!("{key}.arrow")))
            .await
            .ok()?;
        let meta = tokio::fs::read(self.dir.join(format!("{key}.json")))
            .await
            .ok()?;
        let stored: StoredAnswer = match serde_json::from_slice(&meta) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, key, "unreadable stored DP answer; answering afresh");
                return None;
            }
        };
        let released = match sandbox_release::dp::reload_answer(&ipc) {
            Ok(released) => released,
            Err(error) => {
                tracing::warn!(%error, key, "unreadable stored DP answer; answering afresh");
                return None;
            }
        };
        let answer = CachedAnswer {
            released,
            report: stored.report,
            job_id: stored.job_id,
        };
        self.remember(key.to_string(), answer.clone());
        Some(answer)
    }

    /// Stores an answer: the Arrow bytes, then its report (an answer without its report is not
    /// read back). A failed write only means a repeat is answered afresh, and paid.
    pub(crate) async fn put(&self, key: String, answer: CachedAnswer) {
        let stored = StoredAnswer {
            report: answer.report.clone(),
            job_id: answer.job_id.clone(),
        };
        let written = match (answer.released.to_ipc_stream(), serde_json::to_vec(&stored)) {
            (Ok(ipc), Ok(meta)) => {
                let (arrow, json) = (
                    self.dir.join(format!("{key}.arrow")),
                    self.dir.join(format!("{key}.json")),
                );
                tokio::task::spawn_blocking(move || {
                    crate::secret::write_durable(&arrow, &ipc, false)?;
                    crate::secret::write_durable(&json, &meta, false)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        if let Err(error) = written {
            tracing::warn!(%error, "cannot store a DP answer; a repeat will be answered afresh");
        }
        self.remember(key, answer);
    }

    fn remember(&self, key: String, answer: CachedAnswer) {
        let mut answers = self.lock();
        if answers.len() >= MAX_CACHED_ANSWERS {
            answers.clear();
        }
        answers.insert(key, answer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedAnswer>> {
        self.answers
            .lock()
            .expect("answer cache lock is never poisoned")
    }
}

/// A consumer org's budget on one dataset, as a caller may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    pub org: String,
    pub dataset: String,
    /// The total the caller's grant allows; `None` where the viewer is not that consumer (an
    /// owner or an auditor sees what was spent, each consumer's grant says how much it may).
    pub epsilon_budget: Option<f64>,
    pub delta_budget: Option<f64>,
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    pub queries: u64,
    pub refreshes: u64,
}

impl BudgetView {
    /// What `org` spent on `dataset`, with the totals of the caller's own grant when it has one.
    fn new(org: &str, dataset: &str, spent: BudgetSpent, budget: Option<&DpMode>) -> Self {
        BudgetView {
            org: org.to_string(),
            dataset: dataset.to_string(),
            epsilon_budget: budget.map(|b| b.budget_epsilon),
            delta_budget: budget.map(|b| b.budget_delta),
            epsilon_spent: spent.epsilon,
            delta_spent: spent.delta,
            queries: spent.queries,
            refreshes: spent.refreshes,
        }
    }
}

fn denied(code: &'static str, message: impl Into<String>) -> EngineError {
    EngineError::Denied {
        code,
        message: message.into(),
    }
}

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
    /// Admits a query the guard planned under differential privacy: the epsilon asked for
    /// (within the grant's), the noise plan, a cached answer if the same query was answered,
    /// otherwise the budget check and debit under the registry lock, recorded with the job's
    /// admission.
    pub(crate) async fn submit_dp(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: AuditEvent,
        started: Submission,
        planned: PlannedQuery,
        requested: Option<f64>,
    ) -> Result<JobSnapshot> {
        let guarded = planned
            .guarded
            .dp
            .clone()
            .expect("submit_dp takes a plan under differential privacy");
        event.datasets = planned.guarded.datasets.clone();
        event.columns = planned.guarded.columns.clone();
        // At least a tenth of the grant's: a query at a vanishing epsilon answers nothing worth
        // having and costs nothing, so whatever else it shows (its duration, its refusals) would
        // come for free, thousands of times over.
        let least = guarded.mode.epsilon * MIN_EPSILON_SHARE;
        let epsilon = match requested {
            None => guarded.mode.epsilon,
            Some(e) if e.is_finite() && e >= least && e <= guarded.mode.epsilon => e,
            Some(e) => {
                let error = denied(
                    "dp-epsilon-not-allowed",
                    format!(
                        "epsilon {e} is not allowed: your grant allows from {least} to {} per \
                         query",
                        guarded.mode.epsilon
                    ),
                );
                return self.refuse_job(event, started, error).await;
            }
        };
        let noise = match plan_noise(&guarded.spec, epsilon, guarded.mode.delta) {
            Ok(noise) => noise,
            Err(error) => return self.refuse_job(event, started, error.into()).await,
        };
        let org = ctx.principal.org.clone();
        // The same question gets the same noisy answer whoever asks, unless its answer shows the
        // asking org's own pseudonyms.
        let scope = if self.reads_pseudonyms(&planned.guarded.columns) {
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
                planned.guarded.skip,
                planned.guarded.fetch
            ),
        );
        let datasets = planned.guarded.datasets.clone();

        if let Some(cached) = self.answers.get(&key).await
            && let Some(report) = &cached.report
        {
            let (epsilon_remaining, delta_remaining) = self.remaining(ctx, &datasets, 0.0, 0.0)?;
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
            let mut registry = self.registry();
            let remaining =
                self.remaining_in(&registry, ctx, &datasets, noise.epsilon, noise.delta);
            if remaining.is_ok() {
                registry.apply(debit.clone());
            }
            remaining
        };
        let (epsilon_remaining, delta_remaining) = match remaining {
            Ok(left) => left,
            Err(error) => return self.refuse_job(event, started, error).await,
        };
        self.metrics
            .budget_spent(&org, &datasets, noise.epsilon, noise.delta);
        event.record = Some(record_value(&debit));
        let job_id = event.job_id.clone();
        let gate = GatePolicy {
            min_units: 0,
            skip: planned.guarded.skip,
            fetch: planned.guarded.fetch,
            max_rows: self.config.max_release_rows,
            deadline: None,
            source: 0,
        };
        self.spawn_job(ctx, event, started, move |engine, cancel| async move {
            let executed = engine
                .sql
                .execute(planned, cancel)
                .instrument(tracing::info_span!("execute"))
                .await?;
            let release_span = tracing::info_span!("release").entered();
            let (released, report) = release_dp(executed.schema, executed.batches, &noise, &gate)?;
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
                ..Produced::sql(released, executed.rows_scanned)
            })
        })
        .await
    }

    /// What the caller's org would have left on the dataset with the least left after spending
    /// `epsilon` and `delta` on each of `datasets`; refused if any would go below zero.
    fn remaining(
        &self,
        ctx: &RequestContext,
        datasets: &[String],
        epsilon: f64,
        delta: f64,
    ) -> Result<(f64, f64)> {
        let registry = self.registry();
        self.remaining_in(&registry, ctx, datasets, epsilon, delta)
    }

    fn remaining_in(
        &self,
        registry: &sandbox_policy::Registry,
        ctx: &RequestContext,
        datasets: &[String],
        epsilon: f64,
        delta: f64,
    ) -> Result<(f64, f64)> {
        let mut left = (f64::INFINITY, f64::INFINITY);
        for dataset in datasets {
            let budget = self
                .policy
                .aggregate_mode(&ctx.principal, dataset)
                .and_then(|m| m.dp)
                .ok_or_else(|| {
                    denied(
                        "dp-not-granted",
                        format!("dataset `{dataset}` offers you no differential privacy budget"),
                    )
                })?;
            let spent = registry.budget_spent(&ctx.principal.org, dataset);
            let epsilon_left = budget.budget_epsilon - spent.epsilon - epsilon;
            let delta_left = budget.budget_delta - spent.delta - delta;
            // A relative tolerance for the sum of floating-point debits, never more.
            if epsilon_left < -1e-9 * budget.budget_epsilon
                || delta_left < -1e-9 * budget.budget_delta
            {
                return Err(denied(
                    "budget-exhausted",
                    format!(
                        "the privacy budget of your org on `{dataset}` does not cover this query: \
                         spent epsilon {:.6} of {}, delta {:e} of {:e}; this query needs epsilon \
                         {epsilon:.6}, delta {delta:e}",
                        spent.epsilon, budget.budget_epsilon, spent.delta, budget.budget_delta
                    ),
                ));
            }
            // The dataset's total over every consumer: what all orgs spent together.
            let total = self
                .datasets
                .get(dataset)
                .and_then(|d| d.dp_total)
                .ok_or_else(|| {
                    denied(
                        "dp-not-granted",
                        format!("dataset `{dataset}` sets no total privacy budget"),
                    )
                })?;
            let all = registry.total_spent(dataset);
            let total_epsilon_left = total.epsilon - all.epsilon - epsilon;
            let total_delta_left = total.delta - all.delta - delta;
            if total_epsilon_left < -1e-9 * total.epsilon || total_delta_left < -1e-9 * total.delta
            {
                return Err(denied(
                    "budget-exhausted",
                    format!(
                        "the total privacy budget of `{dataset}` over every consumer does not \
                         cover this query: all orgs together spent epsilon {:.6} of {}; the \
                         owner may renew it",
                        all.epsilon, total.epsilon
                    ),
                ));
            }
            let epsilon_left = epsilon_left.min(total_epsilon_left);
            let delta_left = delta_left.min(total_delta_left);
            left = (
                left.0.min(epsilon_left.max(0.0)),
                left.1.min(delta_left.max(0.0)),
            );
        }
        Ok(left)
    }

    /// The budgets a caller may see: a consumer its org's on every dataset granted to it under
    /// differential privacy; an owner what every consumer org spent on its datasets; an auditor
    /// every ledger entry. Recorded like every call.
    pub async fn budgets(&self, ctx: &RequestContext) -> Result<Vec<BudgetView>> {
        let event = Self::event(ctx, "GetBudgets");
        let principal = &ctx.principal;
        let mut views = Vec::new();
        let mut seen = BTreeSet::new();
        {
            let registry = self.registry();
            for dataset in self.policy.granted_datasets(principal) {
                let Some(dp) = self
                    .policy
                    .aggregate_mode(principal, &dataset.id)
                    .and_then(|m| m.dp)
                else {
                    continue;
                };
                let spent = registry.budget_spent(&principal.org, &dataset.id);
                seen.insert((principal.org.clone(), dataset.id.clone()));
                views.push(BudgetView::new(
                    &principal.org,
                    &dataset.id,
                    spent,
                    Some(&dp),
                ));
            }
            let owned: BTreeSet<String> = self
                .policy
                .owned_datasets(principal)
                .map(|d| d.id.clone())
                .collect();
            let auditor = principal.roles.contains(&PrincipalRole::Auditor);
            for ((org, dataset), spent) in registry.budgets() {
                if (auditor || owned.contains(dataset))
                    && !seen.contains(&(org.clone(), dataset.clone()))
                {
                    views.push(BudgetView::new(org, dataset, *spent, None));
                }
            }
            // Each dataset's total over all consumers (org `*`), with the owner's bound; every
            // consumer sees the totals of the datasets it may query under differential privacy.
            for (id, dataset) in self.datasets.iter() {
                let Some(total) = dataset.dp_total else {
                    continue;
                };
                let consumer = seen.iter().any(|(_, d)| d == id);
                if auditor || owned.contains(id) || consumer {
                    let spent = registry.total_spent(id);
                    views.push(BudgetView {
                        epsilon_budget: Some(total.epsilon),
                        delta_budget: Some(total.delta),
                        ..BudgetView::new(sandbox_policy::ALL_ORGS, id, spent, None)
                    });
                }
            }
        }
        self.journal.append(event).await?;
        Ok(views)
    }

    /// Renews a consumer org's budget on a dataset: only the dataset's owner may, with a
    /// reason, and the renewal is a journal record (nothing renews by itself).
    pub async fn refresh_budget(
        &self,
        ctx: &RequestContext,
        org: &str,
        dataset: &str,
        reason: &str,
    ) -> Result<BudgetView> {
        let mut event = Self::event(ctx, "RefreshBudget");
        event.datasets = vec![dataset.to_string()];
        let outcome = (|| {
            let owner = self
                .owner_of(dataset)
                .ok_or_else(|| EngineError::NotFound(format!("dataset `{dataset}` not found")))?;
            if owner != ctx.principal.org || !ctx.principal.roles.contains(&PrincipalRole::Owner) {
                return Err(EngineError::NotPermitted(format!(
                    "only the owner of `{dataset}` may renew budgets on it"
                )));
            }
            if org.is_empty() || reason.trim().is_empty() {
                return Err(crate::modules::invalid(
                    "a renewal names the consumer org (or `*` for the dataset's total over all \
                     consumers) and gives a reason",
                ));
            }
            Ok((
                (),
                Some(Record::BudgetRefreshed {
                    org: org.to_string(),
                    dataset: dataset.to_string(),
                    by: ctx.principal.id.clone(),
                    reason: reason.to_string(),
                }),
            ))
        })();
        event.message = format!("renew the budget of `{org}` on `{dataset}`: {reason}");
        self.conclude(event, outcome).await?;
        let spent = if org == sandbox_policy::ALL_ORGS {
            self.registry().total_spent(dataset)
        } else {
            self.registry().budget_spent(org, dataset)
        };
        Ok(BudgetView::new(org, dataset, spent, None))
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

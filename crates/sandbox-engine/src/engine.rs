//! The engine: a thin façade over the parts that own the state. It starts them, holds them, and
//! routes each public call to the part that serves it; the job kinds are in [`crate::jobs`],
//! governance in [`crate::governance`], listings in [`crate::listings`], the auditor's calls in
//! [`crate::audit`] and [`crate::audit_sql`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sandbox_audit::{Appended, AuditEvent, Decision, Journal};
use sandbox_policy::{ConsentKey, DatasetPolicy, PolicySet, Principal};
use sandbox_sql::{GrantedDataset, PseudonymKey, SqlEngine};
use sandbox_wasm::WasmRuntime;

use crate::admission::Submission;
use crate::codes::Action;
use crate::error::{EngineError, Result};
use crate::governance::budgets::BudgetView;
use crate::governance::consents::ConsentView;
use crate::governance::modules::{ApprovalRequest, ModuleView};
use crate::governance::registry::{Governance, replay};
use crate::governance::templates::TemplateView;
use crate::jobs::table::JobTable;
use crate::recorder::{Recorder, decision_of};
use crate::types::{EngineConfig, Explanation, JobSnapshot, JobSpec, RequestContext};

/// The running sandbox, minus the wire.
pub struct Engine {
    pub(crate) policy: Arc<PolicySet>,
    /// Each dataset's policy, shared by every job that is granted it.
    pub(crate) datasets: HashMap<String, Arc<DatasetPolicy>>,
    pub(crate) sql: Arc<SqlEngine>,
    pub(crate) wasm: Arc<WasmRuntime>,
    /// Modules, templates, approvals, consents, runs and budgets, rebuilt from the journal.
    pub(crate) governance: Governance,
    /// One permit per guest allowed to run at once.
    pub(crate) guest_slots: Arc<tokio::sync::Semaphore>,
    /// Jobs: admission slots, and every job until it is pruned.
    pub(crate) jobs: JobTable,
    /// Every request's terminal event goes through it.
    pub(crate) recorder: Recorder,
    /// Per consumer org, the unit sketches of every row released to it exactly.
    pub(crate) differencing: crate::differencing::DifferencingMemory,
    /// Released answers by question: under differential privacy (shared by every org that asks
    /// it), and exact ones per org; an identical question gets the stored answer.
    pub(crate) answers: crate::answers::AnswerCache,
    /// The server secret the pseudonym keys of consumers derive from.
    pseudonym_secret: Vec<u8>,
    pub(crate) metrics: crate::metrics::EngineMetrics,
    pub(crate) config: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.config.data_dir)
            .field("journal", self.recorder.journal())
            .finish()
    }
}

impl Engine {
    /// Opens the journal (repairing a torn tail) and every dataset of the policy, rebuilds the
    /// registry from the journal, and records the start.
    pub async fn start(mut config: EngineConfig) -> Result<Arc<Engine>> {
        let (journal, report) =
            Journal::open_with(&config.data_dir.join("audit"), config.journal.clone())?;
        if report.truncated_bytes > 0 {
            tracing::warn!(
                bytes = report.truncated_bytes,
                "truncated a torn journal tail"
            );
        }
        let sql = SqlEngine::new(&config.policy, &config.data_dir, config.sql_limits.clone())
            .await
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let wasm = WasmRuntime::new(config.wasm_limits.clone())
            .map_err(|e| EngineError::Setup(e.to_string()))?;
        let registry = replay(&journal)?;
        let pseudonym_secret = crate::secret::pseudonym_secret(&config.data_dir)?;
        // The engine keeps the policy once, outside its copy of the configuration.
        let policy = Arc::new(std::mem::take(&mut config.policy));
        let datasets = policy
            .datasets
            .iter()
            .map(|(id, dataset)| (id.clone(), Arc::new(dataset.clone())))
            .collect();
        let metrics = crate::metrics::EngineMetrics::default();
        let observed = metrics.clone();
        journal.observe_appends(Box::new(move |elapsed| observed.journal_appended(elapsed)));
        let engine = Arc::new(Engine {
            governance: Governance::new(
                policy.clone(),
                registry,
                config.data_dir.join("modules"),
                config.max_module_bytes,
            ),
            policy,
            datasets,
            sql: Arc::new(sql),
            wasm: Arc::new(wasm),
            guest_slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_guests.max(1),
            )),
            jobs: JobTable::new(
                config.max_running_jobs,
                config.max_jobs_per_principal,
                config.job_retention,
                config.max_retained_jobs,
            ),
            recorder: Recorder::new(journal),
            differencing: crate::differencing::DifferencingMemory::open(
                &config.data_dir,
                config.differencing,
            )?,
            answers: crate::answers::AnswerCache::new(&config.data_dir),
            pseudonym_secret,
            metrics,
            config,
        });
        let mut started = engine.recorder.begin_system(Action::Start);
        started.datasets = engine.policy.datasets.keys().cloned().collect();
        started.message = format!(
            "started with {} datasets and {} grants (policy sha256 {}); repaired {} torn bytes",
            engine.policy.datasets.len(),
            engine.policy.grants.len(),
            if engine.config.policy_digest.is_empty() {
                "not given"
            } else {
                &engine.config.policy_digest
            },
            report.truncated_bytes
        );
        started.allow().await?;
        if let Some(seed) = engine.config.consent_seed.clone() {
            engine
                .governance
                .seed_consents(&engine.recorder, &seed)
                .await?;
        }
        if let Some(seed) = engine.config.template_seed.clone() {
            engine
                .governance
                .seed_templates(&engine.recorder, &engine.sql, &seed)
                .await?;
        }
        Ok(engine)
    }

    pub fn journal(&self) -> &Journal {
        self.recorder.journal()
    }

    /// The engine's metrics, with the jobs-in-flight gauge brought up to date (for a scrape).
    pub fn metrics(&self) -> &crate::metrics::EngineMetrics {
        self.metrics.set_jobs_in_flight(self.jobs.running());
        &self.metrics
    }

    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    pub(crate) fn granted(&self, principal: &Principal) -> HashMap<String, GrantedDataset> {
        self.policy
            .granted_datasets(principal)
            .map(|d| {
                (
                    d.id.clone(),
                    GrantedDataset {
                        policy: self.datasets[&d.id].clone(),
                        aggregate: self.policy.aggregate_mode(principal, &d.id),
                    },
                )
            })
            .collect()
    }

    /// The pseudonym key of the caller's org: masked pseudonyms are stable per consumer org and
    /// unlinkable across orgs.
    pub(crate) fn pseudonym_key(&self, principal: &Principal) -> PseudonymKey {
        PseudonymKey::derive(&self.pseudonym_secret, &principal.org)
    }

    /// Records the terminal event of a request that was refused before reaching the engine:
    /// bad credentials or a role that does not allow the call. The server names the call.
    pub async fn record_refusal(
        &self,
        action: &str,
        request_id: &str,
        principal: Option<&Principal>,
        decision: Decision,
        rule: &str,
        message: &str,
    ) -> Result<Appended> {
        let mut event = self.recorder.begin_named(AuditEvent {
            action: action.to_string(),
            principal: principal.map(|p| p.id.clone()).unwrap_or_default(),
            org: principal.map(|p| p.org.clone()).unwrap_or_default(),
            request_id: request_id.to_string(),
            ..AuditEvent::default()
        });
        event.decision = decision;
        event.rule = rule.to_string();
        event.message = message.to_string();
        event.record().await
    }

    /// Records the terminal event of a request whose credentials were refused. No principal was
    /// established, so the event's principal field names what the caller presented instead
    /// (`token:<hash prefix>`, `cert:<name>`, never a secret; the server describes it) and its
    /// org is empty; `message` says why it was refused.
    pub async fn record_unauthenticated(
        &self,
        action: &str,
        request_id: &str,
        presented: &str,
        rule: &str,
        message: &str,
    ) -> Result<Appended> {
        let mut event = self.recorder.begin_named(AuditEvent {
            action: action.to_string(),
            principal: presented.to_string(),
            request_id: request_id.to_string(),
            ..AuditEvent::default()
        });
        event.decision = Decision::Unauthenticated;
        event.rule = rule.to_string();
        event.message = message.to_string();
        event.record().await
    }

    /// Records the terminal event of a call that reads nothing and decides nothing beyond the
    /// caller's credentials and roles (a Flight SQL handshake, its server information, a
    /// prepared statement closed, the description of a catalog listing).
    pub async fn record_call(&self, ctx: &RequestContext, action: &str) -> Result<()> {
        let event = self.recorder.begin_named(AuditEvent {
            action: action.to_string(),
            principal: ctx.principal.id.clone(),
            org: ctx.principal.org.clone(),
            request_id: ctx.request_id.clone(),
            ..AuditEvent::default()
        });
        event.allow().await?;
        Ok(())
    }

    /// Admits and plans a job, records a denial, or starts it in the background.
    pub async fn submit(
        self: &Arc<Self>,
        ctx: &RequestContext,
        spec: JobSpec,
    ) -> Result<JobSnapshot> {
        self.submit_with(ctx, spec, false).await
    }

    /// [`Engine::submit`] for a job that executes only when its result is first asked for
    /// ([`Engine::wait_result`]; Flight SQL's `DoGet`): admission, planning, the guard and any
    /// budget debit happen now, the query runs then. A job not asked for within the query time
    /// limit ends cancelled (`not-fetched`) without running.
    pub async fn submit_deferred(
        self: &Arc<Self>,
        ctx: &RequestContext,
        spec: JobSpec,
    ) -> Result<JobSnapshot> {
        self.submit_with(ctx, spec, true).await
    }

    /// Takes a job slot (a job over the limits is refused before anything is planned, reserved
    /// or debited), then hands the job to its kind.
    async fn submit_with(
        self: &Arc<Self>,
        ctx: &RequestContext,
        spec: JobSpec,
        deferred: bool,
    ) -> Result<JobSnapshot> {
        let mut event = self.recorder.begin(ctx, Action::SubmitJob);
        event.job_id = uuid::Uuid::new_v4().to_string();
        event.set_kind(spec.kind());
        event.query = spec.audit_text();
        let kind = event.kind.clone();
        let started = match self.jobs.slots.acquire(&ctx.principal.id) {
            Ok(slot) => Submission::new(slot, deferred),
            Err(error) => return event.refuse_after(Duration::ZERO, error).await,
        };
        let submitted = std::time::Instant::now();
        let submission = match spec {
            JobSpec::Sql { query, dp } => self.submit_sql(ctx, event, started, query, dp).await,
            JobSpec::Wasm {
                module_sha256,
                input_query,
                parameters,
            } => {
                self.submit_wasm(ctx, event, started, module_sha256, input_query, parameters)
                    .await
            }
            JobSpec::Template { name, params } => {
                self.submit_template_run(ctx, event, started, name, params)
                    .await
            }
        };
        // A job refused at submission (by the guard, a rule, its budget) never reaches
        // `finish`, which observes every admitted job's end: its recorded end is observed here,
        // so that the job metrics show denials. A throttled job was never decided on; the
        // request counts show it.
        if let Err(error) = &submission {
            let decision = decision_of(error);
            if decision != Decision::Throttle {
                self.metrics.job_ended(
                    &kind,
                    decision,
                    submitted.elapsed(),
                    &ctx.principal.org,
                    0,
                    0,
                );
            }
        }
        submission
    }

    /// The decision on a job without running it. Recorded like any other access.
    pub async fn explain(&self, ctx: &RequestContext, spec: JobSpec) -> Result<Explanation> {
        let mut event = self.recorder.begin(ctx, Action::ExplainJob);
        event.set_kind(spec.kind());
        event.query = spec.audit_text();
        match spec {
            JobSpec::Sql { query, dp } => self.explain_sql(ctx, event, &query, dp).await,
            JobSpec::Wasm {
                module_sha256,
                input_query,
                ..
            } => {
                self.explain_wasm(ctx, event, &module_sha256, &input_query)
                    .await
            }
            JobSpec::Template { name, params } => {
                self.explain_template(ctx, event, &name, &params).await
            }
        }
    }

    // Governance: each call goes to the part that owns the registry, with the recorder (and the
    // runtime or the SQL engine where a check needs one) passed as values.

    /// A consumer uploads a module: a valid module of the ABI whose manifest declares columns the
    /// consumer's grants allow in wasm mode for the declared purpose; it waits for every owner's
    /// approval.
    pub async fn upload_module(&self, ctx: &RequestContext, bytes: Vec<u8>) -> Result<ModuleView> {
        self.governance
            .upload_module(&self.recorder, &self.wasm, ctx, bytes)
            .await
    }

    /// An owner approves a module for the owner's datasets among its declared input.
    pub async fn approve_module(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        request: ApprovalRequest,
    ) -> Result<ModuleView> {
        self.governance
            .approve_module(&self.recorder, ctx, sha256, request)
            .await
    }

    /// An owner rejects a module (withdrawing the org's approval, if any).
    pub async fn reject_module(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        reason: &str,
    ) -> Result<ModuleView> {
        self.governance
            .reject_module(&self.recorder, ctx, sha256, reason)
            .await
    }

    /// Modules the caller may see.
    pub async fn list_modules(&self, ctx: &RequestContext) -> Result<Vec<ModuleView>> {
        self.governance.list_modules(&self.recorder, ctx).await
    }

    /// A consumer submits a template; it waits for every owner's approval.
    pub async fn submit_template(&self, ctx: &RequestContext, text: &str) -> Result<TemplateView> {
        self.governance
            .submit_template(&self.recorder, &self.sql, ctx, text)
            .await
    }

    /// An owner approves a template for a number of runs and days.
    pub async fn approve_template(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        max_runs: u64,
        valid_days: u64,
    ) -> Result<TemplateView> {
        self.governance
            .approve_template(&self.recorder, ctx, sha256, max_runs, valid_days)
            .await
    }

    /// Templates the caller submitted, or, for an owner, those reading its datasets.
    pub async fn list_templates(&self, ctx: &RequestContext) -> Result<Vec<TemplateView>> {
        self.governance.list_templates(&self.recorder, ctx).await
    }

    /// Records an enterprise's consent to a consumer org for a purpose (admins).
    pub async fn add_consent(
        &self,
        ctx: &RequestContext,
        key: ConsentKey,
        valid_days: u64,
    ) -> Result<ConsentView> {
        self.governance
            .add_consent(&self.recorder, ctx, key, valid_days)
            .await
    }

    /// Revokes a consent: admins any, a consumer those given to its own org.
    pub async fn revoke_consent(&self, ctx: &RequestContext, key: ConsentKey) -> Result<()> {
        self.governance
            .revoke_consent(&self.recorder, ctx, key)
            .await
    }

    /// Consents in force or expired, with their status: admins all (or one consumer org's), a
    /// consumer its own.
    pub async fn list_consents(
        &self,
        ctx: &RequestContext,
        consumer_org: Option<String>,
    ) -> Result<Vec<ConsentView>> {
        self.governance
            .list_consents(&self.recorder, ctx, consumer_org)
            .await
    }

    /// Differential-privacy budgets the caller may see. `directory` is every principal with
    /// credentials (the server's): which consumer orgs an owner's grants reach.
    pub async fn budgets(
        &self,
        ctx: &RequestContext,
        directory: &[Principal],
    ) -> Result<Vec<BudgetView>> {
        self.governance
            .budgets(&self.recorder, ctx, directory)
            .await
    }

    /// An owner renews a consumer org's budget on its dataset, with a reason.
    pub async fn refresh_budget(
        &self,
        ctx: &RequestContext,
        org: &str,
        dataset: &str,
        reason: &str,
        directory: &[Principal],
    ) -> Result<BudgetView> {
        self.governance
            .refresh_budget(&self.recorder, ctx, org, dataset, reason, directory)
            .await
    }
}

//! The engine: jobs, their stages, their audit events, and the read-only calls.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use ring::digest;
use sandbox_audit::{Appended, AuditEvent, Decision, Journal, JournalOptions};
use sandbox_policy::{DatasetPolicy, Mode, PolicySet, Principal, Registry};
use sandbox_release::dp::NoiseReport;
use sandbox_release::{GatePolicy, Released, release};
use sandbox_sql::{
    CancellationToken, GrantedDataset, PlannedQuery, PseudonymKey, SqlEngine, SqlError, SqlLimits,
};
use sandbox_wasm::{WasmLimits, WasmRuntime};
use tokio::sync::watch;
use tracing::Instrument;

use crate::admission::Submission;
use crate::error::{EngineError, ErrorKind, Result};
use crate::templates::TemplateSeed;

/// What the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    pub policy: PolicySet,
    pub sql_limits: SqlLimits,
    /// Most rows one job may release.
    pub max_release_rows: usize,
    /// How long a finished job's result stays fetchable.
    pub job_retention: Duration,
    /// Most finished jobs kept in memory; the oldest are dropped first.
    pub max_retained_jobs: usize,
    /// Limits of every code job.
    pub wasm_limits: WasmLimits,
    /// Largest module accepted at upload, in bytes.
    pub max_module_bytes: usize,
    /// Parquet files of consents to load into the journal once (the demo `consents` table).
    pub consent_seed: Option<PathBuf>,
    /// Templates to submit and have approved once at start (the demo's).
    pub template_seed: Option<TemplateSeed>,
    /// A fingerprint of the policy files, recorded in the start event.
    pub policy_digest: String,
    /// How the audit journal commits and signs checkpoints.
    pub journal: JournalOptions,
    /// Most guests running at once; more code jobs are refused (`wasm-busy`), not queued.
    pub max_concurrent_guests: usize,
    /// Most jobs admitted and not yet ended, in total and per principal; more are refused
    /// (`server-busy`, `too-many-jobs`) with a retry hint, not queued.
    pub max_running_jobs: usize,
    pub max_jobs_per_principal: usize,
    /// How long and how much each consumer org's differencing memory keeps.
    pub differencing: crate::differencing::DifferencingLimits,
    /// A job ends at a multiple of this since it was admitted (zero: as soon as it is done), so
    /// its duration tells a caller little of the work its data took.
    pub response_quantum: Duration,
}

impl EngineConfig {
    pub fn new(data_dir: PathBuf, policy: PolicySet) -> Self {
        EngineConfig {
            data_dir,
            policy,
            sql_limits: SqlLimits::default(),
            max_release_rows: 100_000,
            job_retention: Duration::from_secs(3600),
            max_retained_jobs: 10_000,
            wasm_limits: WasmLimits::default(),
            max_module_bytes: 32 << 20,
            consent_seed: None,
            template_seed: None,
            policy_digest: String::new(),
            journal: JournalOptions::default(),
            // One core stays free for SQL and the service itself.
            max_concurrent_guests: std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1),
            max_running_jobs: 64,
            max_jobs_per_principal: 8,
            differencing: crate::differencing::DifferencingLimits::default(),
            response_quantum: Duration::from_millis(50),
        }
    }
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub principal: Principal,
    pub request_id: String,
}

/// A job as submitted. Domain type: the server converts the wire type into it.
#[derive(Debug, Clone)]
pub enum JobSpec {
    Sql {
        query: String,
        /// Run under differential privacy (also the default where a grant requires it or the
        /// query reads an L4 measure).
        dp: Option<DpRequest>,
    },
    Wasm {
        module_sha256: String,
        input_query: String,
        parameters: Vec<u8>,
    },
    /// An approved template, run by name with its parameters.
    Template {
        name: String,
        params: BTreeMap<String, String>,
    },
}

/// A caller's request to run an ad-hoc query under differential privacy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DpRequest {
    /// The epsilon to spend; the grant's per-query epsilon when `None` (and never more).
    pub epsilon: Option<f64>,
}

impl JobSpec {
    fn kind(&self) -> &'static str {
        match self {
            JobSpec::Sql { .. } => "sql",
            JobSpec::Wasm { .. } => "wasm",
            JobSpec::Template { .. } => "template",
        }
    }

    fn audit_text(&self) -> String {
        match self {
            JobSpec::Sql { query, dp: None } => query.clone(),
            JobSpec::Sql {
                query,
                dp: Some(request),
            } => match request.epsilon {
                Some(epsilon) => format!("[dp epsilon={epsilon}] {query}"),
                None => format!("[dp] {query}"),
            },
            JobSpec::Wasm {
                module_sha256,
                input_query,
                parameters,
            } => {
                // Parameters are the guest's bytes: shown as text when they are text.
                let parameters = match std::str::from_utf8(parameters) {
                    Ok(text) => text.to_string(),
                    Err(_) => format!("hex:{}", hex::encode(parameters)),
                };
                format!("module {module_sha256}; input: {input_query}; parameters: {parameters}")
            }
            JobSpec::Template { name, params } => {
                let params: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("template {name}({})", params.join(", "))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded,
    Denied,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        self != JobState::Running
    }
}

/// What the release produced, as the caller is told. The journal records more (rows
/// suppressed, withheld, scanned): every exact figure of the data beyond the released values is
/// a channel (a suppressed count bisected with a range filter, a scanned count that tells whether
/// a join side was empty), so the caller gets none of them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReleaseOutcome {
    pub rows_released: u64,
    /// The threshold that applied (a policy figure, not a data figure).
    pub min_units: u64,
    pub result_sha256: String,
    pub audit_seq: u64,
    /// Set for a release under differential privacy.
    pub dp: Option<DpOutcome>,
    /// The answer is a repeat of an earlier identical exact question's, from the store.
    pub stored: bool,
}

/// What a release under differential privacy spent, what remains, and how noisy it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DpOutcome {
    /// Spent by this query (0 for a cached answer).
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    /// What the caller's org has left, on the dataset with the least left.
    pub epsilon_remaining: f64,
    pub delta_remaining: f64,
    /// The answer is a repeat of an earlier identical query's, at no cost.
    pub cached: bool,
    /// Noise scale and 95% interval half-width per output column.
    pub columns: Vec<NoiseReport>,
}

/// A released result whose audit event is durable: the only thing delivery may send.
#[derive(Debug)]
pub struct JobResult {
    ipc_stream: Vec<u8>,
    /// The same rows decoded, for deliveries that stream Arrow batches (Flight) rather than bytes.
    schema: SchemaRef,
    batches: Vec<arrow::array::RecordBatch>,
    outcome: ReleaseOutcome,
}

impl JobResult {
    /// Only built from a gate output and the journal's receipt for it.
    /// What the caller learns is `outcome`: the released rows' count, digest and sequence, the
    /// threshold, and for differential privacy the noise; nothing else of the data.
    fn new(produced: Produced, ipc_stream: Vec<u8>, sha256: String, receipt: &Appended) -> Self {
        let summary = produced.released.summary();
        let outcome = ReleaseOutcome {
            rows_released: summary.rows_released,
            min_units: if produced.dp.is_some() || produced.code_job {
                0
            } else {
                summary.min_units
            },
            result_sha256: sha256,
            audit_seq: receipt.seq,
            dp: produced.dp,
            stored: produced.stored,
        };
        JobResult {
            ipc_stream,
            schema: produced.released.schema().clone(),
            batches: produced.released.batches().to_vec(),
            outcome,
        }
    }

    /// The released rows' schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The released rows as Arrow batches (the rows `ipc_stream` encodes).
    pub fn batches(&self) -> &[arrow::array::RecordBatch] {
        &self.batches
    }

    /// The released rows as Arrow IPC stream bytes.
    pub fn ipc_stream(&self) -> &[u8] {
        &self.ipc_stream
    }

    pub fn outcome(&self) -> &ReleaseOutcome {
        &self.outcome
    }
}

/// What a job's execute and release stages produced, before it is recorded.
#[derive(Debug)]
pub(crate) struct Produced {
    pub(crate) released: Released,
    pub(crate) rows_scanned: u64,
    pub(crate) work_units: u64,
    pub(crate) rows_withheld: u64,
    pub(crate) guest_log: Vec<String>,
    /// A WASM job: its figures go to the journal, not to the caller.
    pub(crate) code_job: bool,
    /// A release under differential privacy.
    pub(crate) dp: Option<DpOutcome>,
    /// An earlier identical question's answer, from the store.
    pub(crate) stored: bool,
}

impl Produced {
    pub(crate) fn sql(released: Released, rows_scanned: u64) -> Self {
        Produced {
            released,
            rows_scanned,
            work_units: 0,
            rows_withheld: 0,
            guest_log: Vec::new(),
            code_job: false,
            dp: None,
            stored: false,
        }
    }
}

/// The state of a job as its submitter sees it.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub job_id: String,
    pub state: JobState,
    pub rule: String,
    pub message: String,
    /// How the job's error reads, once it ended without a result.
    pub error: Option<ErrorKind>,
    pub result: Option<Arc<JobResult>>,
    /// The schema its release will have, when known at submission (SQL jobs): what Flight SQL
    /// clients are told before the rows exist.
    pub released_schema: Option<SchemaRef>,
}

impl JobSnapshot {
    fn running(job_id: &str) -> Self {
        JobSnapshot {
            job_id: job_id.to_string(),
            state: JobState::Running,
            rule: String::new(),
            message: String::new(),
            error: None,
            result: None,
            released_schema: None,
        }
    }

    fn ended(
        job_id: &str,
        state: JobState,
        rule: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        JobSnapshot {
            job_id: job_id.to_string(),
            state,
            rule: rule.into(),
            message: message.into(),
            error: None,
            result: None,
            released_schema: None,
        }
    }
}

struct Job {
    owner: String,
    created: Instant,
    cancel: CancellationToken,
    /// For a deferred job: fired when its result is first asked for, which starts it.
    start: Option<CancellationToken>,
    state: watch::Sender<JobSnapshot>,
}

/// The decision on a job without running it.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub allowed: bool,
    pub rule: String,
    pub message: String,
    pub datasets: Vec<String>,
    pub columns: Vec<String>,
    pub min_units: u64,
    pub plan: String,
    /// For an allowed SQL query: the schema its release will have.
    pub released_schema: Option<SchemaRef>,
    /// Under differential privacy: what the query would spend, and how noisy each output would
    /// be, before anything is spent.
    pub epsilon: f64,
    pub accuracy: Vec<NoiseReport>,
}

impl Explanation {
    /// A refusal: the rule and why.
    pub(crate) fn denied(rule: impl Into<String>, message: impl Into<String>) -> Self {
        Explanation {
            allowed: false,
            rule: rule.into(),
            message: message.into(),
            datasets: Vec::new(),
            columns: Vec::new(),
            min_units: 0,
            plan: String::new(),
            released_schema: None,
            epsilon: 0.0,
            accuracy: Vec::new(),
        }
    }
}

/// A dataset as a caller may see it: schema, roles, levels and the caller's modes. Never rows.
#[derive(Debug, Clone)]
pub struct DatasetView {
    pub id: String,
    pub owner: String,
    pub description: String,
    pub privacy_unit: String,
    pub columns: Vec<ColumnView>,
    pub modes: Vec<String>,
    pub min_units: u64,
    pub functions: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ColumnView {
    pub name: String,
    pub data_type: String,
    pub level: String,
    pub role: String,
    pub description: String,
}

/// The running sandbox, minus the wire.
pub struct Engine {
    pub(crate) policy: Arc<PolicySet>,
    /// Each dataset's policy, shared by every job that is granted it.
    pub(crate) datasets: HashMap<String, Arc<DatasetPolicy>>,
    pub(crate) sql: Arc<SqlEngine>,
    pub(crate) wasm: Arc<WasmRuntime>,
    /// Modules, approvals, consents and runs, rebuilt from the journal at start.
    pub(crate) registry: Mutex<Registry>,
    /// One permit per guest allowed to run at once.
    pub(crate) guest_slots: Arc<tokio::sync::Semaphore>,
    /// Jobs admitted and not yet ended.
    job_slots: crate::admission::JobSlots,
    pub(crate) journal: Journal,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Per consumer org, the unit sketches of every row released to it exactly.
    pub(crate) differencing: crate::differencing::DifferencingMemory,
    /// Released answers by question: under differential privacy (shared by every org that asks
    /// it), and exact ones per org; an identical question gets the stored answer.
    pub(crate) answers: crate::privacy::AnswerCache,
    /// The server secret the pseudonym keys of consumers derive from.
    pseudonym_secret: Vec<u8>,
    pub(crate) metrics: crate::metrics::EngineMetrics,
    pub(crate) config: EngineConfig,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.config.data_dir)
            .field("journal", &self.journal)
            .finish()
    }
}

impl Engine {
    /// Opens the journal (repairing a torn tail) and every dataset of the policy, and records
    /// the start.
    pub async fn start(mut config: EngineConfig) -> Result<Arc<Engine>> {
        if sandbox_sql::UNITS_COLUMN != sandbox_release::UNITS_COLUMN
            || sandbox_sql::HAVING_COLUMN != sandbox_release::HAVING_COLUMN
            || sandbox_sql::HIDDEN_PREFIX != sandbox_release::HIDDEN_PREFIX
        {
            return Err(EngineError::Setup(
                "guard and gate disagree on the hidden column names".into(),
            ));
        }
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
        let registry = crate::modules::replay(&journal)?;
        let pseudonym_secret = crate::secret::pseudonym_secret(&config.data_dir)?;
        // The engine keeps the policy once, outside its copy of the configuration.
        let policy = Arc::new(std::mem::take(&mut config.policy));
        let datasets = policy
            .datasets
            .iter()
            .map(|(id, dataset)| (id.clone(), Arc::new(dataset.clone())))
            .collect();
        let engine = Arc::new(Engine {
            policy,
            datasets,
            sql: Arc::new(sql),
            wasm: Arc::new(wasm),
            registry: Mutex::new(registry),
            guest_slots: Arc::new(tokio::sync::Semaphore::new(
                config.max_concurrent_guests.max(1),
            )),
            job_slots: crate::admission::JobSlots::new(
                config.max_running_jobs,
                config.max_jobs_per_principal,
            ),
            journal,
            jobs: Mutex::new(HashMap::new()),
            differencing: crate::differencing::DifferencingMemory::open(
                &config.data_dir,
                config.differencing,
            )?,
            answers: crate::privacy::AnswerCache::new(&config.data_dir),
            pseudonym_secret,
            metrics: crate::metrics::EngineMetrics::default(),
            config,
        });
        let metrics = engine.metrics.clone();
        engine
            .journal
            .observe_appends(Box::new(move |elapsed| metrics.journal_appended(elapsed)));
        engine
            .journal
            .append(AuditEvent {
                action: "Start".into(),
                principal: "sandboxd".into(),
                request_id: uuid::Uuid::new_v4().to_string(),
                datasets: engine.policy.datasets.keys().cloned().collect(),
                decision: Decision::Allow,
                message: format!(
                    "started with {} datasets and {} grants (policy sha256 {}); repaired {} \
                     torn bytes",
                    engine.policy.datasets.len(),
                    engine.policy.grants.len(),
                    if engine.config.policy_digest.is_empty() {
                        "not given"
                    } else {
                        &engine.config.policy_digest
                    },
                    report.truncated_bytes
                ),
                ..AuditEvent::default()
            })
            .await?;
        if let Some(seed) = engine.config.consent_seed.clone() {
            engine.seed_consents(&seed).await?;
        }
        if let Some(seed) = engine.config.template_seed.clone() {
            engine.seed_templates(&seed).await?;
        }
        Ok(engine)
    }

    /// Jobs admitted and not yet ended (each holds a slot of the admission limits).
    pub fn running_jobs(&self) -> usize {
        self.job_slots.running()
    }

    /// For a stop: cancels every running job and waits (at most `grace`) until each has
    /// recorded its end, so no admitted job is left without a terminal event.
    pub async fn stop_jobs(&self, grace: Duration) {
        let running: Vec<Arc<Job>> = self
            .jobs
            .lock()
            .expect("jobs lock is never poisoned")
            .values()
            .filter(|job| !job.state.borrow().state.is_terminal())
            .cloned()
            .collect();
        for job in &running {
            job.cancel.cancel();
        }
        let deadline = Instant::now() + grace;
        while self.running_jobs() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The engine's metrics, with the jobs-in-flight gauge brought up to date (for a scrape).
    pub fn metrics(&self) -> &crate::metrics::EngineMetrics {
        self.metrics.set_jobs_in_flight(self.running_jobs());
        &self.metrics
    }

    pub fn policy(&self) -> &PolicySet {
        &self.policy
    }

    fn granted(&self, principal: &Principal) -> HashMap<String, GrantedDataset> {
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

    pub(crate) fn event(ctx: &RequestContext, action: &str) -> AuditEvent {
        AuditEvent {
            action: action.to_string(),
            principal: ctx.principal.id.clone(),
            org: ctx.principal.org.clone(),
            request_id: ctx.request_id.clone(),
            ..AuditEvent::default()
        }
    }

    /// Records the terminal event of a request that was refused before reaching the engine:
    /// bad credentials or a role that does not allow the call.
    pub async fn record_refusal(
        &self,
        action: &str,
        request_id: &str,
        principal: Option<&Principal>,
        decision: Decision,
        rule: &str,
        message: &str,
    ) -> Result<Appended> {
        let event = AuditEvent {
            action: action.to_string(),
            principal: principal.map(|p| p.id.clone()).unwrap_or_default(),
            org: principal.map(|p| p.org.clone()).unwrap_or_default(),
            request_id: request_id.to_string(),
            decision,
            rule: rule.to_string(),
            message: message.to_string(),
            ..AuditEvent::default()
        };
        Ok(self.journal.append(event).await?)
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

    async fn submit_with(
        self: &Arc<Self>,
        ctx: &RequestContext,
        spec: JobSpec,
        deferred: bool,
    ) -> Result<JobSnapshot> {
        let job_id = uuid::Uuid::new_v4().to_string();
        let mut event = Self::event(ctx, "SubmitJob");
        event.job_id = job_id.clone();
        event.kind = spec.kind().to_string();
        event.query = spec.audit_text();
        // A slot first: a job over the limits is refused before anything is planned, reserved
        // or debited.
        let started = match self.job_slots.acquire(&ctx.principal.id) {
            Ok(slot) => Submission::new(slot, deferred),
            Err(error) => return self.refuse(event, Duration::ZERO, error).await,
        };

        let (query, dp) = match spec {
            JobSpec::Sql { query, dp } => (query, dp),
            JobSpec::Wasm {
                module_sha256,
                input_query,
                parameters,
            } => {
                return self
                    .submit_wasm(ctx, event, started, module_sha256, input_query, parameters)
                    .await;
            }
            JobSpec::Template { name, params } => {
                return self
                    .submit_template_run(ctx, event, started, name, params)
                    .await;
            }
        };

        let granted = self.granted(&ctx.principal);
        let mode = if dp.is_some() {
            Mode::Private
        } else {
            Mode::Aggregate
        };
        let planned = match self
            .sql
            .plan(&query, &granted, &self.pseudonym_key(&ctx.principal), mode)
            .instrument(tracing::info_span!("plan"))
            .await
        {
            Ok(planned) => planned,
            Err(error) => {
                event.decision = if matches!(error, SqlError::Denied(_)) {
                    Decision::Deny
                } else {
                    Decision::Fail
                };
                event.rule = error.code().to_string();
                event.message = error.to_string();
                event.duration_ms = started.elapsed().as_millis() as u64;
                self.journal.append(event).await?;
                tracing::info!(job = %job_id, rule = error.code(), "job refused at planning");
                return Err(error.into());
            }
        };
        let released_schema = match planned.released_schema() {
            Ok(schema) => schema,
            Err(error) => return self.refuse_job(event, started, error.into()).await,
        };
        let snapshot = if planned.guarded.dp.is_some() {
            let epsilon = dp.and_then(|d| d.epsilon);
            self.submit_dp(ctx, event, started, planned, epsilon)
                .await?
        } else {
            self.spawn_aggregate(ctx, event, started, planned).await?
        };
        Ok(JobSnapshot {
            released_schema: Some(released_schema),
            ..snapshot
        })
    }

    /// Spawns a guarded aggregate query (ad hoc or a template's) as a job, its event naming
    /// what the guard found it reads.
    pub(crate) async fn spawn_aggregate(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: AuditEvent,
        started: Submission,
        planned: PlannedQuery,
    ) -> Result<JobSnapshot> {
        event.datasets = planned.guarded.datasets.clone();
        event.columns = planned.guarded.columns.clone();
        event.min_units = planned.guarded.min_units;
        let org = ctx.principal.org.clone();
        self.spawn_job(ctx, event, started, move |engine, cancel| async move {
            engine.run_sql(&org, planned, cancel).await
        })
        .await
    }

    /// Records the job's admission durably (write-ahead: the spec, what it reads, and a run it
    /// counts against a limit, before anything executes, so a crash never refunds a run), then
    /// registers the job and runs `work` (execute and release) in the background, then records
    /// and publishes its end.
    pub(crate) async fn spawn_job<F, Fut>(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: AuditEvent,
        started: Submission,
        work: F,
    ) -> Result<JobSnapshot>
    where
        F: FnOnce(Arc<Engine>, CancellationToken) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Produced>> + Send + 'static,
    {
        let admitted = AuditEvent {
            action: "AdmitJob".into(),
            message: "admitted; executing".into(),
            record: event.record.take(),
            ..event.clone()
        };
        self.journal.append(admitted).await?;
        let job_id = event.job_id.clone();
        self.prune_jobs();
        let (state, _) = watch::channel(JobSnapshot::running(&job_id));
        let job = Arc::new(Job {
            owner: ctx.principal.id.clone(),
            created: Instant::now(),
            cancel: CancellationToken::new(),
            start: started.deferred.then(CancellationToken::new),
            state,
        });
        self.jobs
            .lock()
            .expect("jobs lock is never poisoned")
            .insert(job_id.clone(), job.clone());
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
        let key = crate::privacy::question_key(
            "exact",
            org,
            &planned.display_plan(),
            &format!(
                "{}\0{}\0{:?}",
                planned.guarded.min_units, planned.guarded.skip, planned.guarded.fetch
            ),
        );
        if let Some(stored) = self.answers.get(&key).await {
            return Ok(Produced {
                stored: true,
                ..Produced::sql(stored.released, 0)
            });
        }
        self.sql.check_row_keys(&planned.guarded.datasets).await?;
        let gate = GatePolicy {
            min_units: planned.guarded.min_units,
            skip: planned.guarded.skip,
            fetch: planned.guarded.fetch,
            max_rows: self.config.max_release_rows,
            deadline: Some(started + self.sql.limits().time_limit),
            source: planned.guarded.source,
        };
        let executed = self
            .sql
            .execute(planned, cancel)
            .instrument(tracing::info_span!("execute"))
            .await?;
        let rows_scanned = executed.rows_scanned;
        if executed.spilled_bytes > 0 {
            tracing::info!(bytes = executed.spilled_bytes, "query spilled to disk");
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
            release(executed.schema, executed.batches, &gate, &memory)?
        };
        memory.remember(released.sketches(), gate.source).await?;
        drop(memory);
        self.answers
            .put(
                key,
                crate::privacy::CachedAnswer::exact(released.clone(), String::new()),
            )
            .await;
        Ok(Produced::sql(released, rows_scanned))
    }

    /// Record and publish: the job's terminal event is durable before the snapshot (and so the
    /// result) is published.
    async fn finish(
        &self,
        outcome: Result<Produced>,
        mut event: AuditEvent,
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
                    event.message = crate::privacy::journal_note(dp);
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
                match self
                    .journal
                    .append(event)
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
                let (decision, state) = match error.kind() {
                    ErrorKind::Cancelled => (Decision::Cancel, JobState::Cancelled),
                    ErrorKind::Denied => (Decision::Deny, JobState::Denied),
                    _ => (Decision::Fail, JobState::Failed),
                };
                if let EngineError::Sql(SqlError::Execution(detail)) = &error {
                    // Details may hold data values: logged for operators, never sent or journaled.
                    tracing::warn!(detail = %detail, "job execution failed");
                }
                event.decision = decision;
                event.rule = error.code();
                event.message = error.to_string();
                if let EngineError::Guest(failure) = &error {
                    // The guest's logs, work and the details of its failure (which it controls:
                    // a status, a size it asked for) go to the journal, never to the client.
                    event.guest_log = failure.logs.clone();
                    event.work_units = failure.work_units;
                    event.message = failure.error.to_string();
                }
                let snapshot = JobSnapshot {
                    error: Some(error.kind()),
                    ..JobSnapshot::ended(&job_id, state, error.code(), error.to_string())
                };
                let (kind, org) = (event.kind.clone(), event.org.clone());
                if let Err(audit) = self.journal.append(event).await {
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
        let job = self
            .jobs
            .lock()
            .expect("jobs lock is never poisoned")
            .get(job_id)
            .cloned()
            .ok_or_else(|| EngineError::JobNotFound(job_id.to_string()))?;
        if job.owner != ctx.principal.id {
            return Err(EngineError::NotJobOwner(job_id.to_string()));
        }
        Ok(job)
    }

    /// Records the one terminal event of a call on a job, whatever its outcome, before the
    /// outcome is returned.
    async fn record_job_call<T>(&self, mut event: AuditEvent, outcome: &Result<T>) -> Result<()> {
        if let Err(error) = outcome {
            event.decision = match error.kind() {
                ErrorKind::PermissionDenied => Decision::PermissionDenied,
                ErrorKind::Denied => Decision::Deny,
                ErrorKind::Cancelled => Decision::Cancel,
                _ => Decision::Fail,
            };
            event.rule = error.code();
        }
        self.journal.append(event).await?;
        Ok(())
    }

    /// The current state of one of the caller's jobs.
    pub async fn job_status(&self, ctx: &RequestContext, job_id: &str) -> Result<JobSnapshot> {
        let outcome = self.job(ctx, job_id).map(|job| job.state.borrow().clone());
        let mut event = Self::event(ctx, "GetJob");
        event.job_id = job_id.to_string();
        self.record_job_call(event, &outcome).await?;
        outcome
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
        let mut event = Self::event(ctx, "FetchResult");
        event.job_id = job_id.to_string();
        if let Ok(result) = &outcome {
            event.rows_released = result.outcome.rows_released;
            event.result_sha256 = result.outcome.result_sha256.clone();
        }
        self.record_job_call(event, &outcome).await?;
        outcome
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
        let mut event = Self::event(ctx, "CancelJob");
        event.job_id = job_id.to_string();
        self.record_job_call(event, &outcome).await?;
        outcome
    }

    /// The decision on a job without running it. Recorded like any other access.
    pub async fn explain(&self, ctx: &RequestContext, spec: JobSpec) -> Result<Explanation> {
        let mut event = Self::event(ctx, "ExplainJob");
        event.kind = spec.kind().to_string();
        event.query = spec.audit_text();
        let (query, mode) = match spec {
            JobSpec::Sql { query, dp } => (
                query,
                if dp.is_some() {
                    Mode::Private
                } else {
                    Mode::Aggregate
                },
            ),
            JobSpec::Wasm {
                module_sha256,
                input_query,
                ..
            } => {
                return self
                    .explain_wasm(ctx, event, &module_sha256, &input_query)
                    .await;
            }
            JobSpec::Template { name, params } => {
                return self.explain_template(ctx, event, &name, &params).await;
            }
        };
        let granted = self.granted(&ctx.principal);
        let key = self.pseudonym_key(&ctx.principal);
        let planned = self
            .sql
            .plan(&query, &granted, &key, mode)
            .await
            .and_then(|planned| Ok((planned.released_schema()?, planned)));
        let explanation = match planned {
            Ok((released_schema, planned)) => {
                // Under differential privacy: the noise the query would get at the grant's
                // epsilon, before anything is spent.
                let noise = planned.guarded.dp.as_ref().map(|dp| {
                    sandbox_release::plan_noise(&dp.spec, dp.mode.epsilon, dp.mode.delta)
                        .map(|plan| plan.report())
                });
                let (epsilon, accuracy) = match noise {
                    Some(Ok(report)) => (report.epsilon, report.columns),
                    _ => (0.0, Vec::new()),
                };
                Explanation {
                    allowed: true,
                    rule: String::new(),
                    message: match &planned.guarded.dp {
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
                    datasets: planned.guarded.datasets.clone(),
                    columns: planned.guarded.columns.clone(),
                    min_units: planned.guarded.min_units,
                    plan: planned.display_plan(),
                    released_schema: Some(released_schema),
                    epsilon,
                    accuracy,
                }
            }
            Err(SqlError::Denied(denial)) => {
                Explanation::denied(denial.rule.code(), denial.message)
            }
            Err(other) => {
                event.decision = Decision::Fail;
                event.rule = other.code().to_string();
                event.message = other.to_string();
                self.journal.append(event).await?;
                return Err(other.into());
            }
        };
        self.record_explanation(event, explanation).await
    }

    /// Records the terminal event of an explanation that was decided (allowed or denied) or
    /// could not be (any other error, returned to the caller).
    pub(crate) async fn conclude_explanation(
        &self,
        mut event: AuditEvent,
        outcome: Result<Explanation>,
    ) -> Result<Explanation> {
        let explanation = match outcome {
            Ok(explanation) => explanation,
            Err(error) if error.kind() == ErrorKind::Denied => {
                Explanation::denied(error.code(), error.to_string())
            }
            Err(error) => {
                event.decision = Decision::Fail;
                event.rule = error.code();
                event.message = error.to_string();
                self.journal.append(event).await?;
                return Err(error);
            }
        };
        self.record_explanation(event, explanation).await
    }

    /// Records a job refused before it started (at admission or planning) as its terminal event,
    /// and returns the refusal.
    pub(crate) async fn refuse_job<T>(
        &self,
        event: AuditEvent,
        started: Submission,
        error: EngineError,
    ) -> Result<T> {
        self.refuse(event, started.elapsed(), error).await
    }

    /// Records a refused submission's terminal event (after `elapsed`) and returns the error.
    async fn refuse<T>(
        &self,
        mut event: AuditEvent,
        elapsed: Duration,
        error: EngineError,
    ) -> Result<T> {
        event.decision = match &error {
            _ if error.kind() == ErrorKind::Denied => Decision::Deny,
            EngineError::Busy(_) | EngineError::Throttled { .. } => Decision::Throttle,
            _ => Decision::Fail,
        };
        event.rule = error.code();
        event.message = error.to_string();
        event.duration_ms = elapsed.as_millis() as u64;
        self.journal.append(event).await?;
        Err(error)
    }

    /// Records an explanation's decision as the `ExplainJob` call's terminal event.
    pub(crate) async fn record_explanation(
        &self,
        mut event: AuditEvent,
        explanation: Explanation,
    ) -> Result<Explanation> {
        event.decision = if explanation.allowed {
            Decision::Allow
        } else {
            Decision::Deny
        };
        event.rule = explanation.rule.clone();
        event.datasets = explanation.datasets.clone();
        event.columns = explanation.columns.clone();
        self.journal.append(event).await?;
        Ok(explanation)
    }

    /// Records the terminal event of a call that reads nothing and decides nothing beyond the
    /// caller's credentials and roles (a Flight SQL handshake, its server information, a
    /// prepared statement closed, the description of a catalog listing).
    pub async fn record_call(&self, ctx: &RequestContext, action: &str) -> Result<()> {
        self.journal.append(Self::event(ctx, action)).await?;
        Ok(())
    }

    /// The datasets the caller can query with SQL (an aggregate grant), each with the schema it
    /// sees: what SQL clients list as tables. Recorded as `ListDatasets`, naming them.
    pub async fn sql_catalog(&self, ctx: &RequestContext) -> Result<Vec<(String, SchemaRef)>> {
        let tables: Vec<(String, SchemaRef)> = self
            .granted(&ctx.principal)
            .into_iter()
            .filter(|(_, granted)| granted.aggregate.is_some())
            .filter_map(|(id, _)| self.sql.visible_schema(&id).map(|schema| (id, schema)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let mut event = Self::event(ctx, "ListDatasets");
        event.datasets = tables.iter().map(|(id, _)| id.clone()).collect();
        self.journal.append(event).await?;
        Ok(tables)
    }

    /// Datasets the caller may use (and, for owners, the ones their org owns): never rows.
    pub async fn list_datasets(&self, ctx: &RequestContext) -> Result<Vec<DatasetView>> {
        let principal = &ctx.principal;
        let mut views: Vec<DatasetView> = Vec::new();
        for dataset in self.policy.granted_datasets(principal) {
            let schema = self.sql.visible_schema(&dataset.id);
            let columns = dataset
                .visible_columns()
                .map(|c| ColumnView {
                    name: c.name.clone(),
                    data_type: schema
                        .as_ref()
                        .and_then(|s| {
                            s.field_with_name(&c.name)
                                .ok()
                                .map(|f| f.data_type().to_string())
                        })
                        .unwrap_or_default(),
                    level: c.level.as_str().into(),
                    role: c.role.as_str().into(),
                    description: c.description.clone(),
                })
                .collect();
            let mode = self.policy.aggregate_mode(principal, &dataset.id);
            views.push(DatasetView {
                id: dataset.id.clone(),
                owner: dataset.owner.clone(),
                description: dataset.description.clone(),
                privacy_unit: dataset.privacy_unit.clone(),
                columns,
                modes: mode
                    .iter()
                    .map(|_| "aggregate".to_string())
                    .chain(
                        self.policy
                            .wasm_mode(principal, &dataset.id)
                            .map(|_| "wasm".to_string()),
                    )
                    .collect(),
                min_units: mode.as_ref().map_or(0, |m| m.min_units),
                functions: mode
                    .iter()
                    .flat_map(|m| m.functions.iter().map(|f| f.as_str().to_string()))
                    .collect(),
            });
        }
        // Owners see their own datasets in full, hidden columns included, without any mode.
        for dataset in self.policy.owned_datasets(principal) {
            if views.iter().any(|v| v.id == dataset.id) {
                continue;
            }
            views.push(DatasetView {
                id: dataset.id.clone(),
                owner: dataset.owner.clone(),
                description: dataset.description.clone(),
                privacy_unit: dataset.privacy_unit.clone(),
                columns: dataset
                    .columns
                    .iter()
                    .map(|c| ColumnView {
                        name: c.name.clone(),
                        data_type: String::new(),
                        level: c.level.as_str().into(),
                        role: c.role.as_str().into(),
                        description: c.description.clone(),
                    })
                    .collect(),
                modes: Vec::new(),
                min_units: 0,
                functions: Vec::new(),
            });
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        let mut event = Self::event(ctx, "ListDatasets");
        event.datasets = views.iter().map(|v| v.id.clone()).collect();
        self.journal.append(event).await?;
        Ok(views)
    }

    fn prune_jobs(&self) {
        let mut jobs = self.jobs.lock().expect("jobs lock is never poisoned");
        let retention = self.config.job_retention;
        jobs.retain(|_, job| {
            !(job.state.borrow().state.is_terminal() && job.created.elapsed() > retention)
        });
        if jobs.len() >= self.config.max_retained_jobs {
            let mut finished: Vec<(Instant, String)> = jobs
                .iter()
                .filter(|(_, j)| j.state.borrow().state.is_terminal())
                .map(|(id, j)| (j.created, id.clone()))
                .collect();
            finished.sort();
            let excess = jobs.len() + 1 - self.config.max_retained_jobs;
            for (_, id) in finished.into_iter().take(excess) {
                jobs.remove(&id);
            }
        }
    }
}

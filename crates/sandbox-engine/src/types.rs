//! Types shared by the engine's parts and its callers: the configuration, the caller of a
//! request, a job's spec, state, result and explanation, and the dataset views. No behaviour
//! beyond building and reading them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use sandbox_audit::{Appended, JournalOptions};
use sandbox_policy::{PolicySet, Principal};
use sandbox_release::Released;
use sandbox_release::dp::NoiseReport;
use sandbox_sql::SqlLimits;
use sandbox_wasm::WasmLimits;

use crate::codes::JobKind;
use crate::error::ErrorKind;

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
    pub(crate) fn kind(&self) -> JobKind {
        match self {
            JobSpec::Sql { .. } => JobKind::Sql,
            JobSpec::Wasm { .. } => JobKind::Wasm,
            JobSpec::Template { .. } => JobKind::Template,
        }
    }

    pub(crate) fn audit_text(&self) -> String {
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
    pub(crate) fn new(
        produced: Produced,
        ipc_stream: Vec<u8>,
        sha256: String,
        receipt: &Appended,
    ) -> Self {
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
    /// The code it ended with (empty while running or released).
    pub rule: &'static str,
    pub message: String,
    /// How the job's error reads, once it ended without a result.
    pub error: Option<ErrorKind>,
    pub result: Option<Arc<JobResult>>,
    /// The schema its release will have, when known at submission (SQL jobs): what Flight SQL
    /// clients are told before the rows exist.
    pub released_schema: Option<SchemaRef>,
}

impl JobSnapshot {
    pub(crate) fn running(job_id: &str) -> Self {
        JobSnapshot {
            job_id: job_id.to_string(),
            state: JobState::Running,
            rule: "",
            message: String::new(),
            error: None,
            result: None,
            released_schema: None,
        }
    }

    pub(crate) fn ended(
        job_id: &str,
        state: JobState,
        rule: &'static str,
        message: impl Into<String>,
    ) -> Self {
        JobSnapshot {
            job_id: job_id.to_string(),
            state,
            rule,
            message: message.into(),
            error: None,
            result: None,
            released_schema: None,
        }
    }
}

/// The decision on a job without running it.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub allowed: bool,
    /// The rule that refuses it (empty when allowed).
    pub rule: &'static str,
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
    pub(crate) fn denied(rule: &'static str, message: impl Into<String>) -> Self {
        Explanation {
            allowed: false,
            rule,
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

/// One grant as a caller may see it: a dataset, the consumer org it reaches (one view per org a
/// grant reaches) with the org's logins it applies to, and what it allows. Policy, never data.
#[derive(Debug, Clone, PartialEq)]
pub struct GrantView {
    pub dataset: String,
    /// The org that owns the dataset (and gave the grant).
    pub owner: String,
    /// The consumer org; empty when the grant reaches no principal with credentials and names
    /// no org.
    pub consumer_org: String,
    /// The org's logins the grant applies to (all of them for an org grant).
    pub consumer_logins: Vec<String>,
    /// `aggregate`, `template`, `wasm`.
    pub modes: Vec<String>,
    /// Aggregate mode: distinct units per released row (0 without it).
    pub min_units: u64,
    pub functions: Vec<String>,
    /// Ad-hoc SQL is answered exactly, not under differential privacy.
    pub exact: bool,
    /// Differential privacy (0 where the grant offers none): per query, the org's budget, the
    /// dataset's total over every consumer.
    pub epsilon: f64,
    pub budget_epsilon: f64,
    pub total_epsilon: f64,
    /// The wasm mode's column ceiling; empty for every visible column.
    pub columns: Vec<String>,
}

/// What the engine tells a caller about itself (the server adds its credentials and calls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The datasets the caller's org owns, in id order.
    pub owns: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ColumnView {
    pub name: String,
    pub data_type: String,
    pub level: String,
    pub role: String,
    pub description: String,
}

/// Templates loaded once at start, as the demo's are: each `*.toml` of `dir` is submitted as
/// `consumer` (whose grants it must fit) and approved by every owner of the data it reads. The
/// approvals name the seed, not a person, as approver (`demo-seed`), and every seeded event's
/// request id starts with `demo-seed`, so an auditor can tell them from an owner's own.
#[derive(Debug, Clone)]
pub struct TemplateSeed {
    pub dir: PathBuf,
    pub consumer: Principal,
    pub max_runs: u64,
    pub valid_days: u64,
}

//! The tonic services: wire types in, engine calls, wire types out.

use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sandbox_engine::{
    ApprovalRequest, BudgetView, Consent, ConsentKey, Decision, DpRequest, Engine, JobSnapshot,
    JobSpec, JobState, ModuleView, ReleaseOutcome, RequestContext, TemplateOutput, TemplateView,
};
use sandbox_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Rpc, required_roles};
use crate::detach::ClientGone;
use crate::metrics::CallOrg;
use crate::status::{self, status_of};
use crate::unhandled::Admitted;

/// Bytes of Arrow IPC per streamed message.
const CHUNK_BYTES: usize = 1 << 20;
/// Most events one ListEvents call returns.
const MAX_EVENTS: usize = 10_000;

/// Requests per second a principal may make, on average and in a burst.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Authentication, rate limits and authorization shared by every service.
#[derive(Clone)]
pub struct Gatekeeper {
    engine: Arc<Engine>,
    authenticator: Arc<Authenticator>,
    /// One token bucket per principal id (bounded: principals come from the credentials file).
    rates: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for Gatekeeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gatekeeper")
            .field("engine", &self.engine)
            .finish()
    }
}

impl Gatekeeper {
    pub fn new(engine: Arc<Engine>, authenticator: Arc<Authenticator>, rate: RateLimit) -> Self {
        let per_second = NonZeroU32::new(rate.per_second.max(1)).expect("at least 1");
        let burst = NonZeroU32::new(rate.burst.max(rate.per_second).max(1)).expect("at least 1");
        Gatekeeper {
            engine,
            authenticator,
            rates: Arc::new(RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            )),
        }
    }

    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Authenticates the caller, applies its rate limit and checks the RPC's roles. A refusal
    /// is recorded in the journal before it is answered.
    pub(crate) async fn admit<T>(
        &self,
        request: &Request<T>,
        rpc: Rpc,
    ) -> Result<RequestContext, Status> {
        // Whatever is decided below is journaled here, not by the layer that records calls no
        // handler took.
        if let Some(admitted) = request.extensions().get::<Admitted>() {
            admitted.mark();
        }
        let request_id = status::request_id_of(request.metadata().as_ref());
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        // rustls verified the chain to the local CA before the request got here.
        let certificates = request.peer_certs();
        let leaf = certificates
            .as_ref()
            .and_then(|certs| certs.first())
            .map(|c| c.as_ref());
        let principal = match self.authenticator.authenticate_request(authorization, leaf) {
            Ok(principal) => principal,
            Err(failure) => {
                self.record(
                    rpc,
                    &request_id,
                    None,
                    Decision::Unauthenticated,
                    failure.code(),
                )
                .await?;
                return Err(status::unauthenticated(failure, &request_id));
            }
        };
        // The metrics count the call under its caller's org.
        if let Some(org) = request.extensions().get::<CallOrg>() {
            org.set(&principal.org);
        }
        if let Err(not_until) = self.rates.check_key(&principal.id) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            self.record(
                rpc,
                &request_id,
                Some(&principal),
                Decision::Throttle,
                "rate-limited",
            )
            .await?;
            return Err(status::rate_limited(wait, &request_id));
        }
        if !principal.has_any_role(required_roles(rpc)) {
            self.record(
                rpc,
                &request_id,
                Some(&principal),
                Decision::PermissionDenied,
                "role-not-permitted",
            )
            .await?;
            return Err(status::not_permitted(rpc.name(), &request_id));
        }
        tracing::debug!(method = rpc.name(), principal = %principal.id, request_id = %request_id, "admitted");
        Ok(RequestContext {
            principal,
            request_id,
        })
    }

    /// Refuses an admitted request that is malformed (`INVALID_ARGUMENT` with `code`), after
    /// recording its terminal event: every admitted call ends in the journal, refusals included.
    pub(crate) async fn reject(
        &self,
        rpc: Rpc,
        ctx: &RequestContext,
        code: &str,
        message: &str,
    ) -> Status {
        match self
            .record(
                rpc,
                &ctx.request_id,
                Some(&ctx.principal),
                Decision::Fail,
                code,
            )
            .await
        {
            Ok(()) => status::invalid(code, message, &ctx.request_id),
            Err(unrecorded) => unrecorded,
        }
    }

    async fn record(
        &self,
        rpc: Rpc,
        request_id: &str,
        principal: Option<&sandbox_policy::Principal>,
        decision: Decision,
        rule: &str,
    ) -> Result<(), Status> {
        self.engine
            .record_refusal(rpc.name(), request_id, principal, decision, rule, "")
            .await
            .map(|_| ())
            .map_err(|e| status_of(&e, request_id))
    }
}

/// `sandbox.v1.Sandbox`.
#[derive(Debug, Clone)]
pub struct SandboxService {
    gate: Gatekeeper,
}

impl SandboxService {
    pub fn new(gate: Gatekeeper) -> Self {
        SandboxService { gate }
    }
}

fn template(view: TemplateView) -> pb::Template {
    let definition = view.record.definition;
    let (mode, min_units, contract_json) = match &definition.output {
        TemplateOutput::Aggregate { min_units } => ("aggregate", *min_units, String::new()),
        TemplateOutput::Scoring { contract } => (
            "scoring",
            0,
            serde_json::to_string(contract).unwrap_or_default(),
        ),
    };
    pb::Template {
        sha256: view.record.sha256,
        name: definition.name,
        description: definition.description,
        sql: definition.sql,
        mode: mode.into(),
        min_units,
        contract_json,
        params: definition
            .params
            .iter()
            .map(|p| pb::TemplateParam {
                name: p.name.clone(),
                r#type: format!("{:?}", p.kind).to_lowercase(),
            })
            .collect(),
        datasets: view.record.datasets,
        org: view.record.org,
        submitted_by: view.record.submitted_by,
        state: view.state,
        reason: view.reason,
        approvals: view
            .approvals
            .into_iter()
            .map(|a| pb::TemplateApproval {
                org: a.org,
                approved_by: a.approved_by,
                datasets: a.datasets,
                max_runs: a.max_runs,
                expires_at: a.expires_at,
            })
            .collect(),
        runs: view.runs,
        runs_left: view.runs_left,
    }
}

/// The engine's job spec for the wire's; a request without one is rejected (and journaled).
async fn job_spec(
    gate: &Gatekeeper,
    rpc: Rpc,
    ctx: &RequestContext,
    spec: Option<pb::JobSpec>,
) -> Result<JobSpec, Status> {
    match spec.and_then(|s| s.kind) {
        Some(pb::job_spec::Kind::Sql(sql)) => Ok(JobSpec::Sql {
            query: sql.query,
            dp: (sql.differential_privacy || sql.epsilon.is_some_and(|e| e != 0.0)).then_some(
                DpRequest {
                    epsilon: sql.epsilon.filter(|e| *e != 0.0),
                },
            ),
        }),
        Some(pb::job_spec::Kind::Wasm(wasm)) => Ok(JobSpec::Wasm {
            module_sha256: wasm.module_sha256,
            input_query: wasm.input_query,
            parameters: wasm.parameters,
        }),
        Some(pb::job_spec::Kind::Template(template)) => Ok(JobSpec::Template {
            name: template.name,
            params: template.params.into_iter().collect(),
        }),
        None => Err(gate
            .reject(rpc, ctx, "missing-job-spec", "the request has no job spec")
            .await),
    }
}

fn job_state(state: JobState) -> pb::JobState {
    match state {
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Denied => pb::JobState::Denied,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn summary(outcome: &ReleaseOutcome) -> pb::ReleaseSummary {
    pb::ReleaseSummary {
        rows_released: outcome.rows_released,
        // Counts of suppressed, withheld and scanned rows are exact figures of the data: they
        // go to the journal, never to the caller (the fields stay for wire compatibility).
        rows_suppressed: 0,
        rows_differencing: 0,
        rows_scanned: 0,
        min_units: outcome.min_units,
        result_sha256: outcome.result_sha256.clone(),
        audit_seq: outcome.audit_seq,
        stored: outcome.stored,
        dp: outcome.dp.as_ref().map(|dp| pb::DpSummary {
            epsilon_spent: dp.epsilon_spent,
            delta_spent: dp.delta_spent,
            epsilon_remaining: dp.epsilon_remaining,
            delta_remaining: dp.delta_remaining,
            cached: dp.cached,
            columns: noise_columns(&dp.columns),
        }),
    }
}

fn budget(view: BudgetView) -> pb::Budget {
    pb::Budget {
        org: view.org,
        dataset: view.dataset,
        epsilon_budget: view.epsilon_budget,
        delta_budget: view.delta_budget,
        epsilon_spent: view.epsilon_spent,
        delta_spent: view.delta_spent,
        queries: view.queries,
        refreshes: view.refreshes,
    }
}

fn job_status(snapshot: &JobSnapshot) -> pb::JobStatus {
    pb::JobStatus {
        job_id: snapshot.job_id.clone(),
        state: job_state(snapshot.state) as i32,
        rule: snapshot.rule.to_string(),
        message: snapshot.message.clone(),
        summary: snapshot.result.as_ref().map(|r| summary(r.outcome())),
    }
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<pb::FetchResultResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::sandbox_server::Sandbox for SandboxService {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::SubmitJob).await?;
        let spec = job_spec(&self.gate, Rpc::SubmitJob, &ctx, request.into_inner().spec).await?;
        let snapshot = self
            .gate
            .engine
            .submit(&ctx, spec)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: snapshot.job_id,
            state: job_state(snapshot.state) as i32,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let ctx = self.gate.admit(&request, Rpc::GetJob).await?;
        let snapshot = self
            .gate
            .engine
            .job_status(&ctx, &request.get_ref().job_id)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(job_status(&snapshot)))
    }

    type FetchResultStream = FetchStream;

    async fn fetch_result(
        &self,
        request: Request<pb::FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let ctx = self.gate.admit(&request, Rpc::FetchResult).await?;
        let gone = ClientGone::of(&request);
        let result = self
            .gate
            .engine
            .wait_result_watched(&ctx, &request.get_ref().job_id, &gone)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        // The job's terminal event is durable: `wait_result` only returns results whose release
        // the journal acknowledged.
        let mut messages: Vec<Result<pb::FetchResultResponse, Status>> = result
            .ipc_stream()
            .chunks(CHUNK_BYTES)
            .map(|chunk| {
                Ok(pb::FetchResultResponse {
                    part: Some(pb::fetch_result_response::Part::ArrowIpc(chunk.to_vec())),
                })
            })
            .collect();
        messages.push(Ok(pb::FetchResultResponse {
            part: Some(pb::fetch_result_response::Part::Summary(summary(
                result.outcome(),
            ))),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let ctx = self.gate.admit(&request, Rpc::CancelJob).await?;
        let snapshot = self
            .gate
            .engine
            .cancel(&ctx, &request.get_ref().job_id)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(job_status(&snapshot)))
    }

    async fn get_budgets(
        &self,
        request: Request<pb::GetBudgetsRequest>,
    ) -> Result<Response<pb::GetBudgetsResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::GetBudgets).await?;
        let views = self
            .gate
            .engine
            .budgets(&ctx)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::GetBudgetsResponse {
            budgets: views.into_iter().map(budget).collect(),
        }))
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ListDatasets).await?;
        let views = self
            .gate
            .engine
            .list_datasets(&ctx)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        let datasets = views
            .into_iter()
            .map(|v| pb::Dataset {
                id: v.id,
                owner: v.owner,
                description: v.description,
                privacy_unit: v.privacy_unit,
                columns: v
                    .columns
                    .into_iter()
                    .map(|c| pb::Column {
                        name: c.name,
                        data_type: c.data_type,
                        level: c.level,
                        role: c.role,
                        description: c.description,
                    })
                    .collect(),
                modes: v.modes,
                min_units: v.min_units,
                functions: v.functions,
            })
            .collect();
        Ok(Response::new(pb::ListDatasetsResponse { datasets }))
    }

    async fn explain_job(
        &self,
        request: Request<pb::ExplainJobRequest>,
    ) -> Result<Response<pb::ExplainJobResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ExplainJob).await?;
        let spec = job_spec(&self.gate, Rpc::ExplainJob, &ctx, request.into_inner().spec).await?;
        let explanation = self
            .gate
            .engine
            .explain(&ctx, spec)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::ExplainJobResponse {
            decision: if explanation.allowed { "allow" } else { "deny" }.into(),
            rule: explanation.rule.to_string(),
            message: explanation.message,
            datasets: explanation.datasets,
            columns: explanation.columns,
            min_units: explanation.min_units,
            plan: explanation.plan,
            epsilon: explanation.epsilon,
            accuracy: noise_columns(&explanation.accuracy),
        }))
    }
}

/// `sandbox.v1.Audit`.
#[derive(Debug, Clone)]
pub struct AuditService {
    gate: Gatekeeper,
}

impl AuditService {
    pub fn new(gate: Gatekeeper) -> Self {
        AuditService { gate }
    }
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ListEvents).await?;
        let query = request.into_inner();
        let limit = match query.limit {
            0 => 100,
            n => (n as usize).min(MAX_EVENTS),
        };
        let (events, last_seq) = self
            .gate
            .engine
            .list_events(&ctx, query.from_seq, limit, query.tail)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        let events = events
            .into_iter()
            .map(|stored| {
                let e = stored.event;
                pb::AuditEvent {
                    seq: e.seq,
                    time: e.time,
                    action: e.action,
                    principal: e.principal,
                    org: e.org,
                    request_id: e.request_id,
                    job_id: e.job_id,
                    kind: e.kind,
                    query: e.query,
                    datasets: e.datasets,
                    columns: e.columns,
                    decision: e.decision.as_str().into(),
                    rule: e.rule,
                    message: e.message,
                    rows_scanned: e.rows_scanned,
                    rows_released: e.rows_released,
                    rows_suppressed: e.rows_suppressed,
                    epsilon_spent: e.epsilon_spent,
                    result_sha256: e.result_sha256,
                    chain_hash: stored.chain_hash,
                    work_units: e.work_units,
                    guest_log: e.guest_log,
                    record_json: e.record.map(|r| r.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::ListEventsResponse { events, last_seq }))
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::SignedCheckpoint>, Status> {
        let ctx = self.gate.admit(&request, Rpc::GetCheckpoint).await?;
        let checkpoint = self
            .gate
            .engine
            .checkpoint(&ctx, request.get_ref().fresh)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(self.signed(checkpoint)))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProof>, Status> {
        let ctx = self.gate.admit(&request, Rpc::GetInclusionProof).await?;
        let query = request.into_inner();
        let answer = self
            .gate
            .engine
            .inclusion_proof(&ctx, query.seq, query.tree_size)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::InclusionProof {
            seq: answer.seq,
            tree_size: answer.tree_size,
            record: answer.record,
            hashes: answer.hashes.iter().map(hex::encode).collect(),
            root: hex::encode(answer.root),
            checkpoint: answer.checkpoint.map(|c| self.signed(c)),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProof>, Status> {
        let ctx = self.gate.admit(&request, Rpc::GetConsistencyProof).await?;
        let query = request.into_inner();
        let answer = self
            .gate
            .engine
            .consistency_proof(&ctx, query.first, query.second)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::ConsistencyProof {
            first: answer.first,
            second: answer.second,
            hashes: answer.hashes.iter().map(hex::encode).collect(),
            first_root: hex::encode(answer.first_root),
            second_root: hex::encode(answer.second_root),
            checkpoint: answer.checkpoint.map(|c| self.signed(c)),
        }))
    }

    type ExportJournalStream = ExportStream;

    async fn export_journal(
        &self,
        request: Request<pb::ExportJournalRequest>,
    ) -> Result<Response<Self::ExportJournalStream>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ExportJournal).await?;
        let source = self
            .gate
            .engine
            .export_journal(&ctx)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        // Files are read chunk by chunk as the client takes them, so a large journal is never
        // held in memory whole; a read error ends the stream with an error.
        let state = ExportState {
            files: source.files.into(),
            current: None,
            request_id: ctx.request_id.clone(),
        };
        let chunks = futures::stream::unfold(state, |mut state| async move {
            use tokio::io::AsyncReadExt;
            loop {
                if state.current.is_none() {
                    let (name, path, len) = state.files.pop_front()?;
                    match tokio::fs::File::open(&path).await {
                        Ok(file) => state.current = Some((name, file.take(len))),
                        Err(e) => return Some((Err(state.failed(&e)), state)),
                    }
                }
                let (name, file) = state.current.as_mut()?;
                let mut buffer = vec![0u8; CHUNK_BYTES];
                match file.read(&mut buffer).await {
                    Ok(0) => state.current = None,
                    Ok(n) => {
                        buffer.truncate(n);
                        let chunk = pb::ExportChunk {
                            file: name.clone(),
                            data: buffer,
                        };
                        return Some((Ok(chunk), state));
                    }
                    Err(e) => return Some((Err(state.failed(&e)), state)),
                }
            }
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::QueryEvents).await?;
        let result = self
            .gate
            .engine
            .audit_sql(&ctx, &request.get_ref().sql)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::QueryEventsResponse {
            arrow_ipc: result.ipc,
            rows: result.rows,
            events: result.events,
        }))
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

/// Where an export stream is: the files still to send and the one being sent.
struct ExportState {
    files: std::collections::VecDeque<(String, std::path::PathBuf, u64)>,
    current: Option<(String, tokio::io::Take<tokio::fs::File>)>,
    request_id: String,
}

impl ExportState {
    /// Ends the stream after an I/O error; the details go to the log, not the client.
    fn failed(&mut self, error: &std::io::Error) -> Status {
        tracing::error!(request_id = %self.request_id, %error, "journal export failed");
        self.files.clear();
        self.current = None;
        Status::internal(format!("export failed (request {})", self.request_id))
    }
}

impl AuditService {
    fn signed(&self, checkpoint: sandbox_engine::Checkpoint) -> pb::SignedCheckpoint {
        pb::SignedCheckpoint {
            json: checkpoint.to_line().trim_end().to_string(),
            origin: checkpoint.origin,
            tree_size: checkpoint.size,
            root: checkpoint.root,
            time: checkpoint.time,
            signature: checkpoint.signature,
            public_key: hex::encode(self.gate.engine.journal().public_key()),
        }
    }
}

/// `sandbox.v1.Governance`.
#[derive(Debug, Clone)]
pub struct GovernanceService {
    gate: Gatekeeper,
}

impl GovernanceService {
    pub fn new(gate: Gatekeeper) -> Self {
        GovernanceService { gate }
    }
}

fn module(view: ModuleView) -> pb::Module {
    let record = view.record;
    pb::Module {
        sha256: record.sha256,
        name: record.name,
        purpose: record.purpose,
        input: record.input,
        input_query: record.input_query,
        org: record.org,
        uploaded_by: record.uploaded_by,
        size: record.size,
        state: view.state,
        reason: view.reason,
        approvals: view
            .approvals
            .into_iter()
            .map(|a| pb::ModuleApproval {
                org: a.org,
                approved_by: a.approved_by,
                datasets: a.datasets,
                columns: a.columns,
                contract_json: serde_json::to_string(&a.contract).unwrap_or_default(),
                max_runs: a.max_runs,
                expires_at: a.expires_at,
            })
            .collect(),
        runs: view.runs,
        runs_left: view.runs_left,
    }
}

fn consent(c: Consent) -> pb::ConsentRecord {
    pb::ConsentRecord {
        unit: c.key.unit,
        consumer_org: c.key.consumer_org,
        purpose: c.key.purpose,
        granted_at: c.granted_at,
        expires_at: c.expires_at,
    }
}

#[tonic::async_trait]
impl pb::governance_server::Governance for GovernanceService {
    async fn upload_module(
        &self,
        request: Request<pb::UploadModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        let ctx = self.gate.admit(&request, Rpc::UploadModule).await?;
        let view = self
            .gate
            .engine
            .upload_module(&ctx, request.into_inner().wasm)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(module(view)))
    }

    async fn approve_module(
        &self,
        request: Request<pb::ApproveModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ApproveModule).await?;
        let r = request.into_inner();
        let approval = ApprovalRequest {
            contract_toml: Some(r.contract_toml).filter(|t| !t.trim().is_empty()),
            max_runs: r.max_runs,
            valid_days: r.valid_days,
            columns: Some(r.columns).filter(|c| !c.is_empty()),
        };
        let view = self
            .gate
            .engine
            .approve_module(&ctx, &r.sha256, approval)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(module(view)))
    }

    async fn submit_template(
        &self,
        request: Request<pb::SubmitTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let ctx = self.gate.admit(&request, Rpc::SubmitTemplate).await?;
        let view = self
            .gate
            .engine
            .submit_template(&ctx, &request.into_inner().definition_toml)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(template(view)))
    }

    async fn approve_template(
        &self,
        request: Request<pb::ApproveTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ApproveTemplate).await?;
        let r = request.into_inner();
        let view = self
            .gate
            .engine
            .approve_template(&ctx, &r.sha256, r.max_runs, r.valid_days)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(template(view)))
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ListTemplates).await?;
        let views = self
            .gate
            .engine
            .list_templates(&ctx)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates: views.into_iter().map(template).collect(),
        }))
    }

    async fn refresh_budget(
        &self,
        request: Request<pb::RefreshBudgetRequest>,
    ) -> Result<Response<pb::Budget>, Status> {
        let ctx = self.gate.admit(&request, Rpc::RefreshBudget).await?;
        let r = request.into_inner();
        let view = self
            .gate
            .engine
            .refresh_budget(&ctx, &r.org, &r.dataset, &r.reason)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(budget(view)))
    }

    async fn reject_module(
        &self,
        request: Request<pb::RejectModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        let ctx = self.gate.admit(&request, Rpc::RejectModule).await?;
        let r = request.into_inner();
        let view = self
            .gate
            .engine
            .reject_module(&ctx, &r.sha256, &r.reason)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(module(view)))
    }

    async fn list_modules(
        &self,
        request: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ListModules).await?;
        let views = self
            .gate
            .engine
            .list_modules(&ctx)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::ListModulesResponse {
            modules: views.into_iter().map(module).collect(),
        }))
    }

    async fn add_consent(
        &self,
        request: Request<pb::AddConsentRequest>,
    ) -> Result<Response<pb::ConsentRecord>, Status> {
        let ctx = self.gate.admit(&request, Rpc::AddConsent).await?;
        let r = request.into_inner();
        let key = ConsentKey {
            unit: r.unit,
            consumer_org: r.consumer_org,
            purpose: r.purpose,
        };
        let added = self
            .gate
            .engine
            .add_consent(&ctx, key, r.valid_days)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(consent(added)))
    }

    async fn revoke_consent(
        &self,
        request: Request<pb::RevokeConsentRequest>,
    ) -> Result<Response<pb::RevokeConsentResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::RevokeConsent).await?;
        let r = request.into_inner();
        let key = ConsentKey {
            unit: r.unit,
            consumer_org: r.consumer_org,
            purpose: r.purpose,
        };
        self.gate
            .engine
            .revoke_consent(&ctx, key)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::RevokeConsentResponse {}))
    }

    async fn list_consents(
        &self,
        request: Request<pb::ListConsentsRequest>,
    ) -> Result<Response<pb::ListConsentsResponse>, Status> {
        let ctx = self.gate.admit(&request, Rpc::ListConsents).await?;
        let org = Some(request.into_inner().consumer_org).filter(|o| !o.is_empty());
        let consents = self
            .gate
            .engine
            .list_consents(&ctx, org)
            .await
            .map_err(|e| status_of(&e, &ctx.request_id))?;
        Ok(Response::new(pb::ListConsentsResponse {
            consents: consents.into_iter().map(consent).collect(),
        }))
    }
}

/// The noise of each released column, on the wire.
fn noise_columns(reports: &[sandbox_engine::NoiseReport]) -> Vec<pb::NoiseColumn> {
    reports
        .iter()
        .map(|c| pb::NoiseColumn {
            column: c.column.clone(),
            scale: c.scale,
            accuracy_95: c.accuracy_95,
            rows_95: c.rows.clone(),
        })
        .collect()
}

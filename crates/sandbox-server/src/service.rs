//! The tonic services: wire types in, engine calls, wire types out. Each handler is one
//! [`Gatekeeper::serve`]: the RPC it is admitted as, its engine call, and the mapping of the
//! answer to the wire.

use std::pin::Pin;

use futures::Stream;
use sandbox_engine::{
    ApprovalRequest, AwaitingOwner, BudgetView, ConsentKey, ConsentView, DpRequest, GrantView,
    JobSnapshot, JobSpec, JobState, ModuleView, ReleaseOutcome, TemplateOutput, TemplateView,
};
use sandbox_policy::{Principal, PrincipalRole};
use sandbox_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::{Rpc, required_roles};
use crate::detach::ClientGone;
use crate::gatekeeper::CallError;
// Where the gatekeeper lived before it had a module of its own.
pub use crate::gatekeeper::{Gatekeeper, RateLimit};

/// Bytes of Arrow IPC per streamed message.
const CHUNK_BYTES: usize = 1 << 20;
/// Most events one ListEvents call returns.
const MAX_EVENTS: usize = 10_000;

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

/// Every principal with credentials (id, org, roles; never a token): the engine knows orgs, the
/// server knows who logs in for them.
fn directory(gate: &Gatekeeper) -> Vec<Principal> {
    let authenticator = gate.authenticator();
    authenticator
        .principal_ids()
        .iter()
        .filter_map(|id| authenticator.principal_named(id))
        .collect()
}

/// The owners a pending module or template waits for, each with the logins of its org that may
/// approve (its owners).
fn awaiting(owners: Vec<AwaitingOwner>, directory: &[Principal]) -> Vec<pb::Awaiting> {
    owners
        .into_iter()
        .map(|owner| pb::Awaiting {
            logins: directory
                .iter()
                .filter(|p| p.org == owner.org && p.roles.contains(&PrincipalRole::Owner))
                .map(|p| p.id.clone())
                .collect(),
            org: owner.org,
            datasets: owner.datasets,
        })
        .collect()
}

fn template(view: TemplateView, directory: &[Principal]) -> pb::Template {
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
                r#type: p.kind.as_str().into(),
                domain: p.domain_in_words(),
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
        awaiting: awaiting(view.awaiting, directory),
    }
}

/// The engine's job spec for the wire's; a request without one is rejected (and journaled).
fn job_spec(spec: Option<pb::JobSpec>) -> Result<JobSpec, CallError> {
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
        None => Err(CallError::Invalid {
            code: "missing-job-spec",
            message: "the request has no job spec",
        }),
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
        self.gate
            .serve(request, Rpc::SubmitJob, |call| async move {
                let spec = job_spec(call.message.spec)?;
                let snapshot = call.engine.submit(&call.ctx, spec).await?;
                Ok(Response::new(pb::SubmitJobResponse {
                    job_id: snapshot.job_id,
                    state: job_state(snapshot.state) as i32,
                }))
            })
            .await
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.gate
            .serve(request, Rpc::GetJob, |call| async move {
                let snapshot = call
                    .engine
                    .job_status(&call.ctx, &call.message.job_id)
                    .await?;
                Ok(Response::new(job_status(&snapshot)))
            })
            .await
    }

    type FetchResultStream = FetchStream;

    async fn fetch_result(
        &self,
        request: Request<pb::FetchResultRequest>,
    ) -> Result<Response<Self::FetchResultStream>, Status> {
        let gone = ClientGone::of(&request);
        self.gate
            .serve(request, Rpc::FetchResult, |call| async move {
                let result = call
                    .engine
                    .wait_result_watched(&call.ctx, &call.message.job_id, &gone)
                    .await?;
                // The job's terminal event is durable: `wait_result` only returns results whose
                // release the journal acknowledged.
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
                let stream: FetchStream = Box::pin(futures::stream::iter(messages));
                Ok(Response::new(stream))
            })
            .await
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        self.gate
            .serve(request, Rpc::CancelJob, |call| async move {
                let snapshot = call.engine.cancel(&call.ctx, &call.message.job_id).await?;
                Ok(Response::new(job_status(&snapshot)))
            })
            .await
    }

    async fn get_budgets(
        &self,
        request: Request<pb::GetBudgetsRequest>,
    ) -> Result<Response<pb::GetBudgetsResponse>, Status> {
        self.gate
            .serve(request, Rpc::GetBudgets, |call| async move {
                let views = call
                    .engine
                    .budgets(&call.ctx, &directory(&self.gate))
                    .await?;
                Ok(Response::new(pb::GetBudgetsResponse {
                    budgets: views.into_iter().map(budget).collect(),
                }))
            })
            .await
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        self.gate
            .serve(request, Rpc::ListDatasets, |call| async move {
                let views = call.engine.list_datasets(&call.ctx).await?;
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
            })
            .await
    }

    async fn explain_job(
        &self,
        request: Request<pb::ExplainJobRequest>,
    ) -> Result<Response<pb::ExplainJobResponse>, Status> {
        self.gate
            .serve(request, Rpc::ExplainJob, |call| async move {
                let spec = job_spec(call.message.spec)?;
                let explanation = call.engine.explain(&call.ctx, spec).await?;
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
            })
            .await
    }

    async fn who_am_i(
        &self,
        request: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        // What the call presented, read before the gatekeeper takes the request: admitted, it
        // is what authenticated the caller.
        let presented = Presented::of(&request);
        self.gate
            .serve(request, Rpc::WhoAmI, |call| async move {
                let identity = call.engine.who_am_i(&call.ctx).await?;
                let principal = call.ctx.principal;
                let (credential, expires_at) = presented.describe(&self.gate);
                Ok(Response::new(pb::WhoAmIResponse {
                    may_call: Rpc::ALL
                        .into_iter()
                        .filter(|rpc| principal.has_any_role(required_roles(*rpc)))
                        .map(|rpc| rpc.name().to_string())
                        .collect(),
                    roles: principal
                        .roles
                        .iter()
                        .map(|r| r.as_str().to_string())
                        .collect(),
                    principal: principal.id,
                    org: principal.org,
                    credential: credential.into(),
                    expires_at,
                    owns: identity.owns,
                }))
            })
            .await
    }

    async fn list_grants(
        &self,
        request: Request<pb::ListGrantsRequest>,
    ) -> Result<Response<pb::ListGrantsResponse>, Status> {
        self.gate
            .serve(request, Rpc::ListGrants, |call| async move {
                let views = call
                    .engine
                    .list_grants(&call.ctx, &directory(&self.gate))
                    .await?;
                Ok(Response::new(pb::ListGrantsResponse {
                    grants: views.into_iter().map(grant).collect(),
                }))
            })
            .await
    }
}

fn grant(view: GrantView) -> pb::Grant {
    pb::Grant {
        dataset: view.dataset,
        owner: view.owner,
        consumer_org: view.consumer_org,
        consumer_logins: view.consumer_logins,
        modes: view.modes,
        min_units: view.min_units,
        functions: view.functions,
        exact: view.exact,
        epsilon: view.epsilon,
        budget_epsilon: view.budget_epsilon,
        total_epsilon: view.total_epsilon,
        columns: view.columns,
    }
}

/// The credentials a call presented: its `authorization` value and its client certificate.
struct Presented {
    authorization: Option<String>,
    certificate: Option<Vec<u8>>,
}

impl Presented {
    /// Read as the gatekeeper reads them.
    fn of<T>(request: &Request<T>) -> Self {
        Presented {
            authorization: request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            certificate: request
                .peer_certs()
                .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec())),
        }
    }

    /// How an admitted call authenticated (`token`, `certificate` or `token+certificate`: a
    /// certificate alone authenticates, a token beside it must name the same principal), and
    /// when the first of its credentials expires (Unix seconds; 0 when none does).
    fn describe(&self, gate: &Gatekeeper) -> (&'static str, u64) {
        let token = self.authorization.as_deref().map(|value| {
            gate.authenticator()
                .token_expires_at(value)
                .map(unix_seconds)
        });
        let certificate = self.certificate.as_deref().map(certificate_expires_at);
        let kind = match (&token, &certificate) {
            (Some(_), Some(_)) => "token+certificate",
            (None, Some(_)) => "certificate",
            _ => "token",
        };
        let expires_at = [token.flatten(), certificate.flatten()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(0);
        (kind, expires_at)
    }
}

fn unix_seconds(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// When a client certificate stops being valid (Unix seconds); `None` for one that does not
/// parse (rustls verified it, so it does).
fn certificate_expires_at(der: &[u8]) -> Option<u64> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    u64::try_from(certificate.validity().not_after.timestamp()).ok()
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
        self.gate
            .serve(request, Rpc::ListEvents, |call| async move {
                let query = call.message;
                let limit = match query.limit {
                    0 => 100,
                    n => (n as usize).min(MAX_EVENTS),
                };
                let (events, last_seq) = call
                    .engine
                    .list_events(&call.ctx, query.from_seq, limit, query.tail)
                    .await?;
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
            })
            .await
    }

    async fn get_checkpoint(
        &self,
        request: Request<pb::GetCheckpointRequest>,
    ) -> Result<Response<pb::SignedCheckpoint>, Status> {
        self.gate
            .serve(request, Rpc::GetCheckpoint, |call| async move {
                let checkpoint = call
                    .engine
                    .checkpoint(&call.ctx, call.message.fresh)
                    .await?;
                Ok(Response::new(self.signed(checkpoint)))
            })
            .await
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::InclusionProof>, Status> {
        self.gate
            .serve(request, Rpc::GetInclusionProof, |call| async move {
                let query = call.message;
                let answer = call
                    .engine
                    .inclusion_proof(&call.ctx, query.seq, query.tree_size)
                    .await?;
                Ok(Response::new(pb::InclusionProof {
                    seq: answer.seq,
                    tree_size: answer.tree_size,
                    record: answer.record,
                    hashes: answer.hashes.iter().map(hex::encode).collect(),
                    root: hex::encode(answer.root),
                    checkpoint: answer.checkpoint.map(|c| self.signed(c)),
                }))
            })
            .await
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::ConsistencyProof>, Status> {
        self.gate
            .serve(request, Rpc::GetConsistencyProof, |call| async move {
                let query = call.message;
                let answer = call
                    .engine
                    .consistency_proof(&call.ctx, query.first, query.second)
                    .await?;
                Ok(Response::new(pb::ConsistencyProof {
                    first: answer.first,
                    second: answer.second,
                    hashes: answer.hashes.iter().map(hex::encode).collect(),
                    first_root: hex::encode(answer.first_root),
                    second_root: hex::encode(answer.second_root),
                    checkpoint: answer.checkpoint.map(|c| self.signed(c)),
                }))
            })
            .await
    }

    type ExportJournalStream = ExportStream;

    async fn export_journal(
        &self,
        request: Request<pb::ExportJournalRequest>,
    ) -> Result<Response<Self::ExportJournalStream>, Status> {
        self.gate
            .serve(request, Rpc::ExportJournal, |call| async move {
                let source = call.engine.export_journal(&call.ctx).await?;
                // Files are read chunk by chunk as the client takes them, so a large journal is
                // never held in memory whole; a read error ends the stream with an error.
                let state = ExportState {
                    files: source.files.into(),
                    current: None,
                    request_id: call.ctx.request_id,
                };
                let chunks: ExportStream = Box::pin(futures::stream::unfold(state, export_chunk));
                Ok(Response::new(chunks))
            })
            .await
    }

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        self.gate
            .serve(request, Rpc::QueryEvents, |call| async move {
                let result = call.engine.audit_sql(&call.ctx, &call.message.sql).await?;
                Ok(Response::new(pb::QueryEventsResponse {
                    arrow_ipc: result.ipc,
                    rows: result.rows,
                    events: result.events,
                }))
            })
            .await
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportChunk, Status>> + Send>>;

/// Where an export stream is: the files still to send and the one being sent.
struct ExportState {
    files: std::collections::VecDeque<(String, std::path::PathBuf, u64)>,
    current: Option<(String, tokio::io::Take<tokio::fs::File>)>,
    request_id: String,
}

/// The next chunk of an export, opening the next file when one is done; `None` after the last.
async fn export_chunk(
    mut state: ExportState,
) -> Option<(Result<pb::ExportChunk, Status>, ExportState)> {
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
            public_key: hex::encode(self.gate.engine().journal().public_key()),
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

fn module(view: ModuleView, directory: &[Principal]) -> pb::Module {
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
        awaiting: awaiting(view.awaiting, directory),
    }
}

fn consent(view: ConsentView) -> pb::ConsentRecord {
    let c = view.consent;
    pb::ConsentRecord {
        unit: c.key.unit,
        consumer_org: c.key.consumer_org,
        purpose: c.key.purpose,
        granted_at: c.granted_at,
        expires_at: c.expires_at,
        status: view.status.as_str().into(),
    }
}

#[tonic::async_trait]
impl pb::governance_server::Governance for GovernanceService {
    async fn upload_module(
        &self,
        request: Request<pb::UploadModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        self.gate
            .serve(request, Rpc::UploadModule, |call| async move {
                let view = call
                    .engine
                    .upload_module(&call.ctx, call.message.wasm)
                    .await?;
                Ok(Response::new(module(view, &directory(&self.gate))))
            })
            .await
    }

    async fn approve_module(
        &self,
        request: Request<pb::ApproveModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        self.gate
            .serve(request, Rpc::ApproveModule, |call| async move {
                let r = call.message;
                let approval = ApprovalRequest {
                    contract_toml: Some(r.contract_toml).filter(|t| !t.trim().is_empty()),
                    max_runs: r.max_runs,
                    valid_days: r.valid_days,
                    columns: Some(r.columns).filter(|c| !c.is_empty()),
                };
                let view = call
                    .engine
                    .approve_module(&call.ctx, &r.sha256, approval)
                    .await?;
                Ok(Response::new(module(view, &directory(&self.gate))))
            })
            .await
    }

    async fn submit_template(
        &self,
        request: Request<pb::SubmitTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        self.gate
            .serve(request, Rpc::SubmitTemplate, |call| async move {
                let view = call
                    .engine
                    .submit_template(&call.ctx, &call.message.definition_toml)
                    .await?;
                Ok(Response::new(template(view, &directory(&self.gate))))
            })
            .await
    }

    async fn approve_template(
        &self,
        request: Request<pb::ApproveTemplateRequest>,
    ) -> Result<Response<pb::Template>, Status> {
        self.gate
            .serve(request, Rpc::ApproveTemplate, |call| async move {
                let r = call.message;
                let view = call
                    .engine
                    .approve_template(&call.ctx, &r.sha256, r.max_runs, r.valid_days)
                    .await?;
                Ok(Response::new(template(view, &directory(&self.gate))))
            })
            .await
    }

    async fn list_templates(
        &self,
        request: Request<pb::ListTemplatesRequest>,
    ) -> Result<Response<pb::ListTemplatesResponse>, Status> {
        self.gate
            .serve(request, Rpc::ListTemplates, |call| async move {
                let views = call.engine.list_templates(&call.ctx).await?;
                Ok(Response::new(pb::ListTemplatesResponse {
                    templates: {
                        let directory = directory(&self.gate);
                        views
                            .into_iter()
                            .map(|view| template(view, &directory))
                            .collect()
                    },
                }))
            })
            .await
    }

    async fn refresh_budget(
        &self,
        request: Request<pb::RefreshBudgetRequest>,
    ) -> Result<Response<pb::Budget>, Status> {
        self.gate
            .serve(request, Rpc::RefreshBudget, |call| async move {
                let r = call.message;
                let view = call
                    .engine
                    .refresh_budget(
                        &call.ctx,
                        &r.org,
                        &r.dataset,
                        &r.reason,
                        &directory(&self.gate),
                    )
                    .await?;
                Ok(Response::new(budget(view)))
            })
            .await
    }

    async fn reject_module(
        &self,
        request: Request<pb::RejectModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        self.gate
            .serve(request, Rpc::RejectModule, |call| async move {
                let r = call.message;
                let view = call
                    .engine
                    .reject_module(&call.ctx, &r.sha256, &r.reason)
                    .await?;
                Ok(Response::new(module(view, &directory(&self.gate))))
            })
            .await
    }

    async fn list_modules(
        &self,
        request: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        self.gate
            .serve(request, Rpc::ListModules, |call| async move {
                let views = call.engine.list_modules(&call.ctx).await?;
                Ok(Response::new(pb::ListModulesResponse {
                    modules: {
                        let directory = directory(&self.gate);
                        views
                            .into_iter()
                            .map(|view| module(view, &directory))
                            .collect()
                    },
                }))
            })
            .await
    }

    async fn add_consent(
        &self,
        request: Request<pb::AddConsentRequest>,
    ) -> Result<Response<pb::ConsentRecord>, Status> {
        self.gate
            .serve(request, Rpc::AddConsent, |call| async move {
                let r = call.message;
                let key = ConsentKey {
                    unit: r.unit,
                    consumer_org: r.consumer_org,
                    purpose: r.purpose,
                };
                let added = call
                    .engine
                    .add_consent(&call.ctx, key, r.valid_days)
                    .await?;
                Ok(Response::new(consent(added)))
            })
            .await
    }

    async fn revoke_consent(
        &self,
        request: Request<pb::RevokeConsentRequest>,
    ) -> Result<Response<pb::RevokeConsentResponse>, Status> {
        self.gate
            .serve(request, Rpc::RevokeConsent, |call| async move {
                let r = call.message;
                let key = ConsentKey {
                    unit: r.unit,
                    consumer_org: r.consumer_org,
                    purpose: r.purpose,
                };
                call.engine.revoke_consent(&call.ctx, key).await?;
                Ok(Response::new(pb::RevokeConsentResponse {}))
            })
            .await
    }

    async fn list_consents(
        &self,
        request: Request<pb::ListConsentsRequest>,
    ) -> Result<Response<pb::ListConsentsResponse>, Status> {
        self.gate
            .serve(request, Rpc::ListConsents, |call| async move {
                let org = Some(call.message.consumer_org).filter(|o| !o.is_empty());
                let consents = call.engine.list_consents(&call.ctx, org).await?;
                Ok(Response::new(pb::ListConsentsResponse {
                    consents: consents.into_iter().map(consent).collect(),
                }))
            })
            .await
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

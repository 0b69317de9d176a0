//! A gRPC client of the data sandbox, acting as one principal: the library behind the `sandbox`
//! binary, also used by the end-to-end tests so both talk to the server the same way.
//!
//! [`Client::sql`] submits a query, fetches the released Arrow IPC stream and its release summary,
//! and decodes the batches. Errors are the server's `tonic::Status`, whose message and
//! `x-sandbox-rule` metadata name the rule that applied.
//!
//! [`Client`] connects with a token (or, over TLS, a client certificate) and covers every call: SQL
//! and WASM jobs, explain, list datasets, events, modules (upload, approve, reject, list),
//! consents, templates, budgets, checkpoints, proofs, exports and audit SQL. The binary, the
//! examples and the end-to-end tests all use it.
//!
//! The binary's commands: `whoami`, `datasets [NAME..]`, `grants`, `sql`, `explain`,
//! `audit tail|checkpoint|prove|export|sql`, `audit verify [--bundle DIR] [--trusted-checkpoint
//! FILE]` (offline: no server, no private key), `policy check`, `module
//! upload|show|approve|reject|list`, `wasm run`, `consent add|revoke|list`, `template
//! submit|show|approve|list|run`, `budget show|refresh`, `completions`. Every one prints through
//! [`output`]. Exit codes: 0 success, 1 audit verification failed, 2 usage, 3 denied, 4
//! unauthenticated or not permitted, 5 other.

pub mod output;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use sandbox_proto::v1 as pb;
use sandbox_proto::v1::audit_client::AuditClient;
use sandbox_proto::v1::governance_client::GovernanceClient;
use sandbox_proto::v1::sandbox_client::SandboxClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Metadata key with the stable code of the rule or error.
pub const RULE_HEADER: &str = "x-sandbox-rule";
/// Metadata key with how long to wait before retrying, in milliseconds.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid server address `{0}`")]
    Address(String),
    /// The connection or its TLS handshake failed; `hint` says what it means and what fixes it.
    #[error("cannot connect to {address}: {hint}")]
    Transport {
        address: String,
        hint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the token contains characters not allowed in a header")]
    Token,
    #[error("cannot read {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no credentials: a token, a client certificate, or both")]
    NoCredentials,
}

/// TLS for a connection: the CA to trust and, for mTLS, the client's certificate and key (PEM).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The data dir's CA and the named principal's client certificate (`tls/` of a server's
    /// data dir).
    pub fn in_data_dir(data_dir: &std::path::Path, principal: &str) -> Self {
        let tls = data_dir.join("tls");
        TlsFiles {
            ca: Some(tls.join("ca.pem")),
            cert: Some(tls.join("clients").join(format!("{principal}.pem"))),
            key: Some(tls.join("clients").join(format!("{principal}.key"))),
        }
    }

    /// The tonic TLS configuration of these files: the CA to trust, and the client identity.
    pub fn client_config(&self) -> Result<ClientTlsConfig, ConnectError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ConnectError::File {
                path: path.display().to_string(),
                source,
            })
        };
        // The server's certificate names `localhost` and the loopback addresses.
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(config)
    }
}

/// What a failed connection means and the option that fixes it, read from the error's chain
/// (tonic reports every cause as `transport error`).
pub fn transport_hint(
    address: &str,
    tls: Option<&TlsFiles>,
    error: &(dyn std::error::Error + 'static),
) -> String {
    let mut causes = Vec::new();
    let mut kinds = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = next {
        causes.push(e.to_string());
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
            if let Some(inner) = io.get_ref() {
                causes.push(inner.to_string());
            }
        }
        next = e.source();
    }
    // Each layer repeats its source's text: keep each cause once.
    let mut seen: Vec<&str> = Vec::new();
    for cause in &causes {
        if !seen.iter().any(|s| s.contains(cause.as_str())) {
            seen.push(cause);
        }
    }
    let all = seen.join(": ");
    let has = |needle: &str| all.contains(needle);
    let https = address.starts_with("https://");
    let has_ca = tls.is_some_and(|t| t.ca.is_some());
    let has_cert = tls.is_some_and(|t| t.cert.is_some());
    let hint = if kinds.contains(&std::io::ErrorKind::ConnectionRefused)
        || has("Connection refused")
    {
        "nothing is listening there (connection refused): start `sandboxd`, or point the CLI at \
         the address it prints (`--addr http://HOST:PORT` or SANDBOX_ADDR; `sandboxd --listen \
         HOST:PORT` picks the server's)"
            .to_string()
    } else if has("UnknownIssuer") || has("unknown issuer") {
        if has_ca {
            "the server's certificate is not signed by the CA given with --ca: use the server's \
             CA (`<data-dir>/tls/ca.pem`)"
                .to_string()
        } else {
            "the server's certificate is not signed by a CA this client trusts: pass the \
             server's CA with --ca <data-dir>/tls/ca.pem (or --as NAME with --data-dir \
             pointing at the server's data dir)"
                .to_string()
        }
    } else if has("NotValidForName") || has("not valid for name") {
        "the server's certificate does not name this host: connect by a name it holds \
         (`localhost`, `127.0.0.1`), or start sandboxd with --tls-name HOST"
            .to_string()
    } else if https && (has("InvalidContentType") || has("corrupt message") || has("wrong version"))
    {
        format!(
            "the server does not speak TLS at this address: use {}",
            address.replacen("https://", "http://", 1)
        )
    } else if has("private key") || has("KeyMismatch") || has("key does not match") {
        "the --key does not belong to the --cert: give the key written beside that certificate"
            .to_string()
    } else if https && (has("CertificateRequired") || has("BadCertificate") || has("UnknownCA")) {
        if has_cert {
            "the server refused the client certificate: use one issued by the server's CA \
             (`<data-dir>/tls/clients/NAME.pem` and `.key`)"
                .to_string()
        } else {
            "the server wants a client certificate or a token: use --as NAME, or --cert F \
             --key F"
                .to_string()
        }
    } else if !https && speaks_tls(address) {
        format!(
            "the server answered plaintext HTTP/2 with a TLS alert: it expects TLS, use {} with \
             --ca <data-dir>/tls/ca.pem (or --as NAME)",
            address.replacen("http://", "https://", 1)
        )
    } else if !https
        && (has("h2 protocol error")
            || has("connection reset")
            || has("Connection reset")
            || has("broken pipe")
            || has("Broken pipe")
            || has("connection closed")
            || has("unexpected end of file"))
    {
        "the server closed the plaintext connection: is this the sandbox's address, and does \
         it expect TLS (then use https:// with --ca)?"
            .to_string()
    } else if has("dns error") || has("failed to lookup") {
        "the host name does not resolve: check --addr / SANDBOX_ADDR".to_string()
    } else if has("timed out") {
        "the connection timed out: check the address and that the server is reachable".to_string()
    } else {
        "check --addr (or SANDBOX_ADDR), and for https:// --ca, --cert and --key".to_string()
    };
    format!("{hint} [{all}]")
}

/// Whether the server at a plaintext address answers the HTTP/2 preface with a TLS alert
/// record (content type 21, version 3.x): then it expects TLS. A short blocking probe, made only
/// to explain a failed call.
fn speaks_tls(address: &str) -> bool {
    use std::io::{Read as _, Write as _};
    use std::net::ToSocketAddrs as _;
    let Some(authority) = address
        .strip_prefix("http://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
    else {
        return false;
    };
    let Some(socket) = authority.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let timeout = std::time::Duration::from_secs(2);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&socket, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    if stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).is_ok() && head == [0x15, 0x03]
}

/// Largest message to or from the governance service (an uploaded module).
const MAX_MODULE_MESSAGE: usize = 17 * 1024 * 1024;

/// Largest message from the audit service: an audit SQL result of up to 64 MiB, and its
/// framing.
const MAX_AUDIT_MESSAGE: usize = 65 * 1024 * 1024;

/// A released result.
#[derive(Debug, Clone)]
pub struct SqlResult {
    pub job_id: String,
    pub batches: Vec<RecordBatch>,
    pub summary: pb::ReleaseSummary,
}

/// A connection to the sandbox, authenticated as one principal.
#[derive(Debug, Clone)]
pub struct Client {
    pub sandbox: SandboxClient<Channel>,
    pub audit: AuditClient<Channel>,
    pub governance: GovernanceClient<Channel>,
    authorization: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Client {
    /// A plaintext or TLS connection (by the address's scheme) with a bearer token.
    pub async fn connect(address: &str, token: &str) -> Result<Self, ConnectError> {
        Self::connect_with(address, Some(token), None).await
    }

    /// A connection with a bearer token, TLS (with a client certificate for mTLS), or both. An
    /// `https://` address without `tls` trusts the system's roots.
    pub async fn connect_with(
        address: &str,
        token: Option<&str>,
        tls: Option<&TlsFiles>,
    ) -> Result<Self, ConnectError> {
        let authorization = token
            .map(|token| format!("Bearer {token}").parse())
            .transpose()
            .map_err(|_| ConnectError::Token)?;
        let has_certificate = tls.is_some_and(|t| t.cert.is_some() && t.key.is_some());
        if authorization.is_none() && !has_certificate {
            return Err(ConnectError::NoCredentials);
        }
        let mut endpoint = Channel::from_shared(address.to_string())
            .map_err(|_| ConnectError::Address(address.to_string()))?;
        let transport = |source: tonic::transport::Error| ConnectError::Transport {
            address: address.to_string(),
            hint: transport_hint(address, tls, &source),
            source,
        };
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.client_config()?)
                .map_err(transport)?;
        }
        let channel = endpoint.connect().await.map_err(transport)?;
        Ok(Client {
            sandbox: SandboxClient::new(channel.clone()),
            // Audit SQL results are larger than tonic's default 4 MiB message.
            audit: AuditClient::new(channel.clone()).max_decoding_message_size(MAX_AUDIT_MESSAGE),
            // Modules can be larger than tonic's default 4 MiB message.
            governance: GovernanceClient::new(channel)
                .max_encoding_message_size(MAX_MODULE_MESSAGE)
                .max_decoding_message_size(MAX_MODULE_MESSAGE),
            authorization,
        })
    }

    /// A request carrying this client's credentials.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        request
    }

    pub fn sql_spec(query: &str) -> pb::JobSpec {
        pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                query: query.to_string(),
                differential_privacy: false,
                epsilon: None,
            })),
        }
    }

    /// A query to run under differential privacy, spending `epsilon` (the grant's when `None`).
    pub fn dp_spec(query: &str, epsilon: Option<f64>) -> pb::JobSpec {
        pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                query: query.to_string(),
                differential_privacy: true,
                epsilon,
            })),
        }
    }

    pub fn wasm_spec(module_sha256: &str, input_query: &str, parameters: &[u8]) -> pb::JobSpec {
        pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Wasm(pb::WasmJob {
                module_sha256: module_sha256.to_string(),
                input_query: input_query.to_string(),
                parameters: parameters.to_vec(),
            })),
        }
    }

    /// Submits a job and returns its id without waiting for it.
    pub async fn submit(&mut self, spec: pb::JobSpec) -> Result<String, tonic::Status> {
        let request = self.request(pb::SubmitJobRequest {
            spec: Some(spec),
            label: String::new(),
        });
        Ok(self.sandbox.submit_job(request).await?.into_inner().job_id)
    }

    /// The state of one of this principal's jobs.
    pub async fn job_status(&mut self, job_id: &str) -> Result<pb::JobStatus, tonic::Status> {
        let request = self.request(pb::GetJobRequest {
            job_id: job_id.to_string(),
        });
        Ok(self.sandbox.get_job(request).await?.into_inner())
    }

    /// Cancels one of this principal's jobs and returns its final state.
    pub async fn cancel(&mut self, job_id: &str) -> Result<pb::JobStatus, tonic::Status> {
        let request = self.request(pb::CancelJobRequest {
            job_id: job_id.to_string(),
        });
        Ok(self.sandbox.cancel_job(request).await?.into_inner())
    }

    /// Submits a query and returns its job id without waiting for it.
    pub async fn submit_sql(&mut self, query: &str) -> Result<String, tonic::Status> {
        self.submit(Self::sql_spec(query)).await
    }

    /// Submits a query, waits for its release and decodes it.
    pub async fn sql(&mut self, query: &str) -> Result<SqlResult, tonic::Status> {
        self.run(Self::sql_spec(query)).await
    }

    /// Runs an approved module over its input query; waits for the release and decodes it.
    pub async fn wasm(
        &mut self,
        module_sha256: &str,
        input_query: &str,
        parameters: &[u8],
    ) -> Result<SqlResult, tonic::Status> {
        self.run(Self::wasm_spec(module_sha256, input_query, parameters))
            .await
    }

    /// Submits a job, waits for its release and decodes it.
    pub async fn run(&mut self, spec: pb::JobSpec) -> Result<SqlResult, tonic::Status> {
        let job_id = self.submit(spec).await?;
        self.fetch(job_id).await
    }

    /// Waits for a job's release and decodes it.
    pub async fn fetch(&mut self, job_id: String) -> Result<SqlResult, tonic::Status> {
        let mut stream = self
            .sandbox
            .fetch_result(self.request(pb::FetchResultRequest {
                job_id: job_id.clone(),
            }))
            .await?
            .into_inner();
        let mut bytes = Vec::new();
        let mut summary = None;
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(pb::fetch_result_response::Part::ArrowIpc(chunk)) => bytes.extend(chunk),
                Some(pb::fetch_result_response::Part::Summary(s)) => summary = Some(s),
                None => {}
            }
        }
        let summary = summary
            .ok_or_else(|| tonic::Status::data_loss("the server sent no release summary"))?;
        Ok(SqlResult {
            job_id,
            batches: decode(&bytes)?,
            summary,
        })
    }

    pub async fn explain(&mut self, query: &str) -> Result<pb::ExplainJobResponse, tonic::Status> {
        self.explain_spec(Self::sql_spec(query)).await
    }

    pub async fn explain_spec(
        &mut self,
        spec: pb::JobSpec,
    ) -> Result<pb::ExplainJobResponse, tonic::Status> {
        let request = self.request(pb::ExplainJobRequest { spec: Some(spec) });
        Ok(self.sandbox.explain_job(request).await?.into_inner())
    }

    /// Uploads a module (consumers); returns it with its hash and state.
    pub async fn upload_module(&mut self, wasm: Vec<u8>) -> Result<pb::Module, tonic::Status> {
        let request = self.request(pb::UploadModuleRequest { wasm });
        Ok(self.governance.upload_module(request).await?.into_inner())
    }

    /// Approves a module for the caller's datasets (owners).
    pub async fn approve_module(
        &mut self,
        approval: pb::ApproveModuleRequest,
    ) -> Result<pb::Module, tonic::Status> {
        let request = self.request(approval);
        Ok(self.governance.approve_module(request).await?.into_inner())
    }

    pub async fn reject_module(
        &mut self,
        sha256: &str,
        reason: &str,
    ) -> Result<pb::Module, tonic::Status> {
        let request = self.request(pb::RejectModuleRequest {
            sha256: sha256.to_string(),
            reason: reason.to_string(),
        });
        Ok(self.governance.reject_module(request).await?.into_inner())
    }

    /// Submits a SQL template (TOML) for the owners' approval.
    pub async fn submit_template(
        &mut self,
        definition_toml: &str,
    ) -> Result<pb::Template, tonic::Status> {
        let request = self.request(pb::SubmitTemplateRequest {
            definition_toml: definition_toml.to_string(),
        });
        Ok(self.governance.submit_template(request).await?.into_inner())
    }

    /// Approves a template's hash for the caller's datasets (owners).
    pub async fn approve_template(
        &mut self,
        sha256: &str,
        max_runs: u64,
        valid_days: u64,
    ) -> Result<pb::Template, tonic::Status> {
        let request = self.request(pb::ApproveTemplateRequest {
            sha256: sha256.to_string(),
            max_runs,
            valid_days,
        });
        Ok(self
            .governance
            .approve_template(request)
            .await?
            .into_inner())
    }

    pub async fn templates(&mut self) -> Result<Vec<pb::Template>, tonic::Status> {
        let request = self.request(pb::ListTemplatesRequest {});
        Ok(self
            .governance
            .list_templates(request)
            .await?
            .into_inner()
            .templates)
    }

    /// Runs an approved template by name and fetches what it released.
    pub async fn template(
        &mut self,
        name: &str,
        params: std::collections::BTreeMap<String, String>,
    ) -> Result<SqlResult, tonic::Status> {
        self.run(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Template(pb::TemplateJob {
                name: name.to_string(),
                params,
            })),
        })
        .await
    }

    pub async fn modules(&mut self) -> Result<Vec<pb::Module>, tonic::Status> {
        let request = self.request(pb::ListModulesRequest {});
        Ok(self
            .governance
            .list_modules(request)
            .await?
            .into_inner()
            .modules)
    }

    pub async fn add_consent(
        &mut self,
        consent: pb::AddConsentRequest,
    ) -> Result<pb::ConsentRecord, tonic::Status> {
        let request = self.request(consent);
        Ok(self.governance.add_consent(request).await?.into_inner())
    }

    pub async fn revoke_consent(
        &mut self,
        consent: pb::RevokeConsentRequest,
    ) -> Result<(), tonic::Status> {
        let request = self.request(consent);
        self.governance.revoke_consent(request).await?;
        Ok(())
    }

    pub async fn consents(
        &mut self,
        consumer_org: &str,
    ) -> Result<Vec<pb::ConsentRecord>, tonic::Status> {
        let request = self.request(pb::ListConsentsRequest {
            consumer_org: consumer_org.to_string(),
        });
        Ok(self
            .governance
            .list_consents(request)
            .await?
            .into_inner()
            .consents)
    }

    /// The privacy budgets the caller may see.
    pub async fn budgets(&mut self) -> Result<Vec<pb::Budget>, tonic::Status> {
        let request = self.request(pb::GetBudgetsRequest {});
        Ok(self
            .sandbox
            .get_budgets(request)
            .await?
            .into_inner()
            .budgets)
    }

    /// Renews a consumer org's budget on one of the caller's datasets.
    pub async fn refresh_budget(
        &mut self,
        org: &str,
        dataset: &str,
        reason: &str,
    ) -> Result<pb::Budget, tonic::Status> {
        let request = self.request(pb::RefreshBudgetRequest {
            org: org.to_string(),
            dataset: dataset.to_string(),
            reason: reason.to_string(),
        });
        Ok(self.governance.refresh_budget(request).await?.into_inner())
    }

    pub async fn datasets(&mut self) -> Result<Vec<pb::Dataset>, tonic::Status> {
        let request = self.request(pb::ListDatasetsRequest {});
        Ok(self
            .sandbox
            .list_datasets(request)
            .await?
            .into_inner()
            .datasets)
    }

    /// Journal events (auditor only): the newest `limit` with `tail`, else from `from_seq` on.
    pub async fn events(
        &mut self,
        from_seq: u64,
        limit: u32,
        tail: bool,
    ) -> Result<Vec<pb::AuditEvent>, tonic::Status> {
        let request = self.request(pb::ListEventsRequest {
            from_seq,
            limit,
            tail,
        });
        Ok(self.audit.list_events(request).await?.into_inner().events)
    }

    /// The newest signed checkpoint, or a fresh one (auditor only).
    pub async fn checkpoint(&mut self, fresh: bool) -> Result<pb::SignedCheckpoint, tonic::Status> {
        let request = self.request(pb::GetCheckpointRequest { fresh });
        Ok(self.audit.get_checkpoint(request).await?.into_inner())
    }

    /// The inclusion proof of record `seq` (tree size 0: a fresh checkpoint's).
    pub async fn inclusion_proof(
        &mut self,
        seq: u64,
        tree_size: u64,
    ) -> Result<pb::InclusionProof, tonic::Status> {
        let request = self.request(pb::GetInclusionProofRequest { seq, tree_size });
        Ok(self.audit.get_inclusion_proof(request).await?.into_inner())
    }

    /// The consistency proof between two tree sizes (second 0: a fresh checkpoint's).
    pub async fn consistency_proof(
        &mut self,
        first: u64,
        second: u64,
    ) -> Result<pb::ConsistencyProof, tonic::Status> {
        let request = self.request(pb::GetConsistencyProofRequest { first, second });
        Ok(self
            .audit
            .get_consistency_proof(request)
            .await?
            .into_inner())
    }

    /// Read-only SQL over the journal's `events` table (auditors: every event; owners: the
    /// events that touched their datasets).
    pub async fn audit_sql(
        &mut self,
        sql: &str,
    ) -> Result<(Vec<RecordBatch>, pb::QueryEventsResponse), tonic::Status> {
        let request = self.request(pb::QueryEventsRequest {
            sql: sql.to_string(),
        });
        let response = self.audit.query_events(request).await?.into_inner();
        Ok((decode(&response.arrow_ipc)?, response))
    }

    /// Writes an exported bundle into `out` (created if missing); returns its checkpoint's size
    /// and the bytes written per file. Nothing is left half-written under a file's name: each
    /// file is written to a temporary name and renamed when complete.
    pub async fn export_journal(
        &mut self,
        out: &std::path::Path,
    ) -> Result<Vec<(String, u64)>, ExportError> {
        self.export_journal_with_progress(out, |_| {}).await
    }

    /// [`Client::export_journal`], calling `progress` with the bytes written so far after each
    /// chunk (for a progress line).
    pub async fn export_journal_with_progress(
        &mut self,
        out: &std::path::Path,
        mut progress: impl FnMut(u64),
    ) -> Result<Vec<(String, u64)>, ExportError> {
        use futures::StreamExt;
        use std::io::Write;
        std::fs::create_dir_all(out)?;
        let request = self.request(pb::ExportJournalRequest {});
        let mut stream = self.audit.export_journal(request).await?.into_inner();
        let mut written: Vec<(String, u64)> = Vec::new();
        let mut current: Option<(String, std::fs::File)> = None;
        let finish = |name: &str, file: std::fs::File| -> std::io::Result<()> {
            file.sync_all()?;
            std::fs::rename(out.join(format!("{name}.part")), out.join(name))
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let name = bundle_file_name(&chunk.file)?;
            if current.as_ref().is_none_or(|(n, _)| *n != name) {
                if let Some((done, file)) = current.take() {
                    finish(&done, file)?;
                }
                if written.iter().any(|(n, _)| *n == name) {
                    return Err(ExportError::Protocol(format!("`{name}` sent twice")));
                }
                let file = std::fs::File::create(out.join(format!("{name}.part")))?;
                current = Some((name.clone(), file));
                written.push((name, 0));
            }
            let (_, file) = current.as_mut().expect("set above");
            file.write_all(&chunk.data)?;
            written.last_mut().expect("pushed above").1 += chunk.data.len() as u64;
            progress(written.iter().map(|(_, n)| n).sum());
        }
        if let Some((done, file)) = current.take() {
            finish(&done, file)?;
        }
        Ok(written)
    }

    /// Who the caller is: principal, org, roles, the credential this call used and when it
    /// expires, the calls its roles allow and the datasets its org owns.
    pub async fn who_am_i(&mut self) -> Result<pb::WhoAmIResponse, tonic::Status> {
        let request = self.request(pb::WhoAmIRequest {});
        Ok(self.sandbox.who_am_i(request).await?.into_inner())
    }

    /// The grants the caller may see: on its org's datasets (owner), all (auditor), or its
    /// org's own (consumer, analyst).
    pub async fn grants(&mut self) -> Result<Vec<pb::Grant>, tonic::Status> {
        let request = self.request(pb::ListGrantsRequest {});
        Ok(self.sandbox.list_grants(request).await?.into_inner().grants)
    }
}

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("cannot write the bundle: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server sent a bad bundle: {0}")]
    Protocol(String),
}

/// Bundle files are plain names the server chose; anything that could leave the folder is
/// refused.
fn bundle_file_name(name: &str) -> Result<String, ExportError> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        && !name.starts_with('.');
    if plain {
        Ok(name.to_string())
    } else {
        Err(ExportError::Protocol(format!("bad file name `{name}`")))
    }
}

/// Hex SHA-256 of a module's bytes: the hash the sandbox knows it by.
/// A module with a `sandbox.input` custom section holding `query` appended: the input query the
/// owners approve with the module's bytes (what the guest SDK's `input!` embeds, for modules
/// built without it). The section changes the bytes, so the module's SHA-256 changes too.
pub fn with_input_section(wasm: Vec<u8>, query: &str) -> Vec<u8> {
    fn leb128(out: &mut Vec<u8>, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"sandbox.input";
    let mut payload = Vec::with_capacity(name.len() + query.len() + 2);
    leb128(&mut payload, name.len() as u64);
    payload.extend_from_slice(name);
    payload.extend_from_slice(query.as_bytes());
    let mut out = wasm;
    // Custom section: id 0, its size, then the name and the bytes.
    out.push(0);
    leb128(&mut out, payload.len() as u64);
    out.extend(payload);
    out
}

pub fn module_sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

/// Decodes one Arrow IPC stream.
pub fn decode(bytes: &[u8]) -> Result<Vec<RecordBatch>, tonic::Status> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None).map_err(|e| {
        tonic::Status::data_loss(format!("the result is not an Arrow IPC stream: {e}"))
    })?;
    let schema = reader.schema();
    let batches = reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tonic::Status::data_loss(format!("cannot decode the result: {e}")))?;
    // An empty result keeps its columns: one empty batch of the stream's schema.
    if batches.is_empty() {
        return Ok(vec![RecordBatch::new_empty(schema)]);
    }
    Ok(batches)
}

/// How long the server asks to wait before retrying (on `RESOURCE_EXHAUSTED`), if it says.
pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    status
        .metadata()
        .get(RETRY_AFTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .map(std::time::Duration::from_millis)
}

/// The stable rule code a status carries, or an empty string.
pub fn rule_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(RULE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

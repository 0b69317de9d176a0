//! Shared fixtures of the end-to-end tests: a real server on an ephemeral loopback port over a
//! freshly generated demo data dir, and a client that talks to it through the real gRPC stubs.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use sandbox_proto::v1 as pb;
use sandbox_proto::v1::audit_client::AuditClient;
use sandbox_proto::v1::sandbox_client::SandboxClient;
use sandbox_server::{RunningServer, ServerConfig};
use tonic::transport::Channel;

/// The repository's policy directory.
pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// Demo scale used by the tests: 1,000 enterprises, enough for groups above and below k = 10.
pub const TEST_SCALE: f64 = 0.05;

/// A server over its own temporary data dir; dropped with the test.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: RunningServer,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let mut config = ServerConfig::for_tests(data_dir);
        config.policies = Some(policies_dir());
        config.demo_scale = TEST_SCALE;
        let server = sandbox_server::start(config).await?;
        Ok(TestServer { dir, server })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The demo token of a principal, as written at first start.
    pub fn token(&self, name: &str) -> String {
        std::fs::read_to_string(self.data_dir().join("credentials").join(format!("{name}.token")))
            .expect("demo token exists")
            .trim()
            .to_string()
    }

    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        Client::connect(&self.url(), &self.token(name)).await
    }
}

/// A gRPC client acting as one principal.
pub struct Client {
    pub sandbox: SandboxClient<Channel>,
    pub audit: AuditClient<Channel>,
    token: String,
}

impl Client {
    pub async fn connect(url: &str, token: &str) -> anyhow::Result<Self> {
        let channel = Channel::from_shared(url.to_string())?.connect().await?;
        Ok(Client {
            sandbox: SandboxClient::new(channel.clone()),
            audit: AuditClient::new(channel),
            token: token.to_string(),
        })
    }

    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    pub fn sql_spec(query: &str) -> pb::JobSpec {
        pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Sql(pb::SqlJob {
                query: query.to_string(),
            })),
        }
    }

    /// Submits a query and fetches its released result.
    pub async fn sql(
        &mut self,
        query: &str,
    ) -> Result<(Vec<RecordBatch>, pb::ReleaseSummary), tonic::Status> {
        let submitted = self
            .sandbox
            .submit_job(self.request(pb::SubmitJobRequest {
                spec: Some(Self::sql_spec(query)),
                label: String::new(),
            }))
            .await?
            .into_inner();
        let mut stream = self
            .sandbox
            .fetch_result(self.request(pb::FetchResultRequest {
                job_id: submitted.job_id,
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
        let summary = summary.ok_or_else(|| tonic::Status::internal("no summary"))?;
        let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok((batches, summary))
    }

    /// The newest `n` journal events (auditor only).
    pub async fn tail(&mut self, n: u32) -> Result<Vec<pb::AuditEvent>, tonic::Status> {
        Ok(self
            .audit
            .list_events(self.request(pb::ListEventsRequest {
                from_seq: 0,
                limit: n,
                tail: true,
            }))
            .await?
            .into_inner()
            .events)
    }

    /// Every journal event, in order (auditor only).
    pub async fn all_events(&mut self) -> Result<Vec<pb::AuditEvent>, tonic::Status> {
        Ok(self
            .audit
            .list_events(self.request(pb::ListEventsRequest {
                from_seq: 1,
                limit: 10_000,
                tail: false,
            }))
            .await?
            .into_inner()
            .events)
    }
}

/// The stable rule code a status carries.
pub fn rule_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get("x-sandbox-rule")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Rows of batches rendered as sorted `a|b|c` strings, for order-insensitive comparison.
pub fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|c| {
                    arrow::util::display::array_value_to_string(c, row).expect("displayable")
                })
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

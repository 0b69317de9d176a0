//! The server's own integration tests: a real `sandboxd` (in this process, or the binary) on an
//! ephemeral loopback port over a freshly generated small demo, driven through the generated gRPC
//! and Flight clients. What each module pins: `refusals.rs`, credential refusals (their messages
//! and how the journal names what was presented); `flight_actions.rs`, Flight actions outside
//! Flight SQL (`CloseSession`, unknown ones); `job_metrics.rs`, the job histogram's outcomes;
//! `startup.rs`, a second server on the same data dir or port.

mod flight_actions;
mod job_metrics;
mod refusals;
mod startup;

use std::path::{Path, PathBuf};

use sandbox_proto::v1 as pb;
use sandbox_proto::v1::audit_client::AuditClient;
use sandbox_server::{RunningServer, ServerConfig};
use tonic::transport::Channel;

/// Small: these tests need the demo's principals and tables, not its statistics.
const SCALE: f64 = 0.02;

/// A server over its own temporary data dir.
struct Server {
    dir: tempfile::TempDir,
    running: RunningServer,
}

impl Server {
    async fn start(configure: impl FnOnce(&mut ServerConfig)) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = ServerConfig::for_tests(dir.path().join("data"));
        config.demo_scale = SCALE;
        // The repository's policies, as every test of the workspace uses them.
        config.policies = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies"));
        configure(&mut config);
        let running = sandbox_server::start(config).await.expect("server starts");
        Server { dir, running }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A demo principal's token, as written at first start.
    fn token(&self, name: &str) -> String {
        std::fs::read_to_string(self.data_dir().join(format!("credentials/{name}.token")))
            .expect("demo token")
            .trim()
            .to_string()
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.running.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connects")
    }

    /// The journal's events with this request id, as the auditor reads them.
    async fn events_of(&self, request_id: &str) -> Vec<pb::AuditEvent> {
        let mut audit = AuditClient::new(self.channel().await);
        let events = audit
            .list_events(request(
                pb::ListEventsRequest {
                    from_seq: 0,
                    limit: 10_000,
                    tail: false,
                },
                Some(&format!("Bearer {}", self.token("auditor"))),
                &uuid::Uuid::new_v4().to_string(),
            ))
            .await
            .expect("the auditor reads the journal")
            .into_inner()
            .events;
        events
            .into_iter()
            .filter(|e| e.request_id == request_id)
            .collect()
    }

    async fn stop(self) {
        self.running.shutdown().await.expect("shutdown");
    }
}

/// A request with a request id and, when given, an `authorization` header.
fn request<T>(message: T, authorization: Option<&str>, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("x-request-id", request_id.parse().expect("ascii"));
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.parse().expect("ascii"));
    }
    request
}

/// `GET /metrics` over plain HTTP/1.1 (blocking, off the runtime's threads): the body.
async fn scrape(address: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("answer");
        let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    })
    .await
    .expect("joined")
}

/// The value of one sample of a scrape (`name{labels}`), if present.
fn sample(scrape: &str, key: &str) -> Option<f64> {
    scrape
        .lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == key)
        .and_then(|(_, value)| value.parse().ok())
}

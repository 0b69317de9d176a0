//! The sandbox service: tonic services over the engine, authentication, configuration and the
//! first-start demo bootstrap. Binary: `sandboxd`.
//!
//! This is the only crate that knows gRPC and prost types: [`service`] converts wire types to the
//! engine's domain types and back, and [`status::status_of`] is the one place where engine errors
//! become `tonic::Status` codes. [`auth`] turns `authorization: Bearer <token>` metadata into a
//! [`sandbox_policy::Principal`] and holds the table of roles each RPC requires;
//! [`gatekeeper`] is the stage every call passes first (authentication, rate limits, roles, the
//! journaling of refusals) and the one skeleton each handler is written in. [`flight`] serves
//! Arrow Flight SQL on the same address, through the same gatekeeper and engine calls;
//! [`metrics`] counts every call and serves Prometheus text on `--metrics-listen`.
//!
//! # A call's way in
//!
//! [`start`] binds its addresses (a port in use is reported before anything slow happens),
//! prepares the data dir ([`bootstrap::prepare`]: its lock, one server per data dir, then the demo
//! on first start), starts the engine and serves the native services and Flight SQL on one
//! address, behind three layers, outermost first:
//! [`detach::DetachLayer`] (every call runs in a task of its own, so a client that goes away cannot
//! cut a call short between two steps; dropping the call fires its `ClientGone` token), the
//! metrics layer, and [`unhandled::JournalUnhandledLayer`] (journals calls no handler saw). Each
//! handler first calls the gatekeeper's `admit`: authentication, the per-principal rate limit
//! (`governor`), the role check ([`auth::required_roles`]); each refusal is journaled before it is
//! answered. [`RunningServer::shutdown`] stops accepting calls and has the engine end every running
//! job (each records its end) before the journal closes.
//!
//! # Credentials (`auth.rs`, `tls.rs`)
//!
//! Tokens are stored as SHA-256 with an optional expiry in `<data-dir>/credentials/`; a client
//! certificate names its principal in the subject's common name; both at once are accepted only
//! when they agree; the deny list `credentials/revoked.toml` is re-read whenever it changes, and
//! everyone is refused while it does not parse. Flight SQL clients may send basic credentials
//! (user = principal, password = its token; padded or not). At first start, or the first `--tls`
//! start, `tls.rs` creates a local CA, a server certificate and a client certificate per principal
//! under `<data-dir>/tls/`, staged and renamed into place; client certificates are optional, so
//! tokens work over TLS too. Plaintext on a non-loopback address needs `--insecure-plaintext`
//! (when a proxy in front terminates TLS).
//!
//! # Errors (`status.rs`)
//!
//! [`status::status_of`] maps the engine's `ErrorKind` to a gRPC code; every status says
//! `[rule] message (request id)` and carries the rule in `x-sandbox-rule` metadata; limits add
//! `retry-after-ms` and a `google.rpc.RetryInfo` detail; internal errors say only `internal error`
//! (details go to the log).
//!
//! # Configuration and bootstrap
//!
//! `config.rs`: every limit is a flag of [`ServerConfig`]. `bootstrap.rs`: on an empty data dir,
//! the demo data, the demo policies (the repository's `policies/`, compiled in) and demo
//! credentials. The demo templates approved for the bank are `examples/templates/`, compiled in;
//! the server hands the engine a `TemplateSeed` on the demo's first start only, so approvals on the
//! owners' behalf never come from a folder found in a data dir.
//!
//! # Flight SQL (`flight.rs`)
//!
//! Each Flight call has its row in the roles table (`FlightSql.*`) and maps to one engine call (the
//! table is in [`flight`]'s docs). A prepared statement's handle is the query text, so nothing is
//! held between calls and the query is checked again when it runs; bound parameter values are
//! refused (their batches checked by `sandbox_wasm::untrusted_ipc` and never decoded). Commands the
//! sandbox does not serve (updates, ingest, keys, Substrait, transactions) are answered
//! `UNIMPLEMENTED` by `arrow-flight` before any handler runs and journaled by `unhandled.rs`.
//!
//! # Metrics (`metrics.rs`)
//!
//! Every call (native and Flight) is counted by method, caller's org and gRPC status in a layer
//! inside the detach layer; the gatekeeper fills the org. `--metrics-listen` serves those counts
//! plus the engine's `EngineMetrics` as OpenMetrics text on a small hyper server, holding the
//! engine weakly so a stop releases it.

pub mod auth;
pub mod bootstrap;
pub mod config;
pub mod detach;
pub mod flight;
pub mod gatekeeper;
pub mod metrics;
pub mod service;
pub mod status;
pub mod tls;
pub mod unhandled;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arrow_flight::flight_service_server::FlightServiceServer;
use sandbox_engine::{Engine, EngineConfig, TemplateSeed};
use sandbox_proto::v1::audit_server::AuditServer;
use sandbox_proto::v1::governance_server::GovernanceServer;
use sandbox_proto::v1::sandbox_server::SandboxServer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::ServerConfig;

/// How long a stop waits for jobs and calls to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Largest header block of a call (metadata: credentials, request id, deadline).
const MAX_HEADER_BYTES: u32 = 16 * 1024;

/// A server running in the background, for `sandboxd` and for tests.
#[derive(Debug)]
pub struct RunningServer {
    /// The address it listens on (the real port when started on port 0).
    pub addr: SocketAddr,
    /// Where Prometheus metrics are served, when `--metrics-listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    shutdown: Option<oneshot::Sender<()>>,
    stop_metrics: CancellationToken,
    handle: JoinHandle<Result<(), tonic::transport::Error>>,
    /// The data dir's lock; the last field, so it is released after the engine (and its
    /// journal) when the server is dropped.
    _data_dir_lock: bootstrap::DataDirLock,
}

impl RunningServer {
    /// Stops accepting requests, cancels running jobs (each records its end), lets running
    /// calls finish, and returns once the engine is released (its journal closed), so a new
    /// server can open the same data dir.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.stop_metrics.cancel();
        self.engine.stop_jobs(SHUTDOWN_GRACE).await;
        self.handle.await.context("server task panicked")??;
        // Calls still finishing in their own tasks hold the engine a moment longer.
        let deadline = std::time::Instant::now() + SHUTDOWN_GRACE;
        while Arc::strong_count(&self.engine) > 1 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Waits until the server ends by itself (it only does on a transport error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("server task panicked")??;
        Ok(())
    }
}

/// Binds the listen addresses, prepares the data dir (generating the demo on first start), opens
/// the engine and starts serving on `config.listen`. The addresses are bound first, before the
/// data dir is touched, so a port in use is reported at once and leaves nothing behind; the data
/// dir's lock comes next, before anything slow.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    config.check_transport()?;
    // A port in use is most likely another sandboxd's: the error says how to start this one
    // elsewhere and point the CLI at it.
    let scheme = if config.tls { "https" } else { "http" };
    let listener = bind(
        config.listen,
        "--listen",
        &format!(
            "{} is already in use (another sandboxd?): choose another with --listen ADDR and \
             point the CLI at it with --addr {scheme}://ADDR or SANDBOX_ADDR",
            config.listen
        ),
    )
    .await?;
    let metrics_listener = match config.metrics_listen {
        Some(address) => Some(
            bind(
                address,
                "--metrics-listen",
                &format!("{address} is already in use: choose another with --metrics-listen ADDR"),
            )
            .await?,
        ),
        None => None,
    };
    let prepared = bootstrap::prepare(&config)?;
    let mut engine_config = EngineConfig::new(config.data_dir.clone(), prepared.policy);
    engine_config.policy_digest = prepared.policy_digest;
    engine_config.journal = config.journal_options();
    engine_config.sql_limits = config.sql_limits();
    engine_config.wasm_limits = config.wasm_limits();
    engine_config.max_module_bytes = config.max_module_bytes();
    if config.wasm_max_concurrent > 0 {
        engine_config.max_concurrent_guests = config.wasm_max_concurrent;
    }
    engine_config.max_running_jobs = config.max_jobs.max(1);
    engine_config.response_quantum = std::time::Duration::from_millis(config.response_quantum_ms);
    engine_config.max_jobs_per_principal = config.max_jobs_per_principal.max(1);
    // The demo consents are loaded into the journal once (the engine keeps a marker).
    let seed = config.data_dir.join("datasets/consents");
    engine_config.consent_seed = seed.is_dir().then_some(seed);
    // The demo templates are approved for the demo bank (for a year of daily use) on the first
    // start only: approvals on the owners' behalf never come from a folder found in a data dir.
    let templates = config.data_dir.join(bootstrap::DEMO_TEMPLATES_DIR);
    if prepared.created_demo && templates.is_dir() {
        match prepared
            .authenticator
            .principal_named(bootstrap::DEMO_TEMPLATE_CONSUMER)
        {
            Some(consumer) => {
                engine_config.template_seed = Some(TemplateSeed {
                    dir: templates,
                    consumer,
                    max_runs: 1000,
                    valid_days: 365,
                });
            }
            None => tracing::warn!(
                "no principal `{}`: the demo templates are not approved",
                bootstrap::DEMO_TEMPLATE_CONSUMER
            ),
        }
    }
    let engine = Engine::start(engine_config)
        .await
        .context("cannot start the engine")?;
    let authenticator = Arc::new(prepared.authenticator);
    let gate = gatekeeper::Gatekeeper::new(
        engine.clone(),
        authenticator,
        gatekeeper::RateLimit {
            per_second: config.rate_limit,
            burst: config.rate_burst,
        },
    );

    let addr = listener.local_addr()?;
    let sandbox = service::SandboxService::new(gate.clone());
    let audit = service::AuditService::new(gate.clone());
    let governance = service::GovernanceService::new(gate.clone());
    let flight = flight::FlightSql::new(gate)?;
    let server_metrics = metrics::ServerMetrics::new(&engine);
    let (shutdown, shutdown_signal) = oneshot::channel::<()>();
    // Slow or vanished clients: a connection whose peer stops answering pings is closed, and
    // headers are bounded (metadata is read before any message limit applies).
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(config.max_streams_per_connection.max(1))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(MAX_HEADER_BYTES);
    if config.tls {
        builder = builder
            .tls_config(tls::server_config(&config.data_dir)?)
            .context("invalid TLS configuration")?;
    }
    let max_request = config.max_request_bytes();
    // Detach outermost: the count is taken inside the call's own task, so a call whose client
    // left is still counted.
    let router = builder
        .layer(detach::DetachLayer)
        .layer(server_metrics.layer())
        .layer(unhandled::JournalUnhandledLayer::new(engine.clone()))
        .add_service(SandboxServer::new(sandbox).max_decoding_message_size(max_request))
        .add_service(AuditServer::new(audit).max_decoding_message_size(max_request))
        .add_service(
            GovernanceServer::new(governance)
                .max_decoding_message_size(config.max_module_bytes() + max_request),
        )
        .add_service(FlightServiceServer::new(flight).max_decoding_message_size(max_request));
    // Last, once nothing else can fail: a failed start leaves no metrics server behind.
    let stop_metrics = CancellationToken::new();
    let metrics_addr = match metrics_listener {
        Some(listener) => {
            let bound = listener.local_addr()?;
            tokio::spawn(metrics::serve(
                listener,
                server_metrics.clone(),
                Arc::downgrade(&engine),
                stop_metrics.clone(),
            ));
            tracing::info!(address = %bound, "serving metrics at /metrics");
            Some(bound)
        }
        None => None,
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let handle = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = shutdown_signal.await;
    }));
    Ok(RunningServer {
        addr,
        metrics_addr,
        engine,
        shutdown: Some(shutdown),
        stop_metrics,
        handle,
        _data_dir_lock: prepared.lock,
    })
}

/// Binds `address`, given by `flag`; `in_use` is the error when another process holds it.
async fn bind(
    address: SocketAddr,
    flag: &str,
    in_use: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(anyhow::anyhow!("{in_use}")),
        Err(e) => Err(e).with_context(|| format!("cannot listen on {address} ({flag})")),
    }
}

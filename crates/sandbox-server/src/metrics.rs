//! Prometheus metrics: request counts by method, caller's org and status code (counted by a
//! layer around every call, the native services and Flight SQL alike), the engine's figures
//! ([`sandbox_engine::EngineMetrics`]), served as text on `--metrics-listen` (off by default).
//!
//! The org is learned during the call: the layer puts an empty [`CallOrg`] slot in the request's
//! extensions and the gatekeeper fills it once the caller is authenticated (unauthenticated
//! calls count under `org="none"`). The status is read where gRPC puts it: the response headers
//! for an immediate error, the trailers at the end of the body otherwise; a body dropped before
//! its trailers (the client went away mid-stream) counts as `CANCELLED`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sandbox_engine::Engine;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;

/// Label value for calls whose caller was never authenticated.
const NO_ORG: &str = "none";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `service/Method`, e.g. `sandbox.v1.Sandbox/SubmitJob`.
    pub method: String,
    pub org: String,
    /// The gRPC status code, e.g. `OK`, `FAILED_PRECONDITION`.
    pub code: String,
}

/// The org of the call's caller, once authenticated. In the request's extensions.
#[derive(Debug, Clone, Default)]
pub struct CallOrg(Arc<OnceLock<String>>);

impl CallOrg {
    pub fn set(&self, org: &str) {
        let _ = self.0.set(org.to_string());
    }
}

/// The server's metrics registry: request counts plus the engine's metrics.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    requests: Family<RequestLabels, Counter>,
    registry: Arc<Registry>,
}

impl ServerMetrics {
    pub fn new(engine: &Engine) -> Self {
        let mut registry = Registry::with_prefix("sandbox");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Calls answered, by method, the caller's org and gRPC status code",
            requests.clone(),
        );
        engine.metrics().register(&mut registry);
        ServerMetrics {
            requests,
            registry: Arc::new(registry),
        }
    }

    /// The layer that counts every call.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer {
            requests: self.requests.clone(),
        }
    }

    /// The current values, in the OpenMetrics text format Prometheus scrapes.
    pub fn render(&self, engine: &Engine) -> String {
        // Brings the in-flight gauge up to date.
        let _ = engine.metrics();
        let mut text = String::new();
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode the metrics");
        }
        text
    }
}

/// Counts each call by method, org and status; see the module documentation.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    requests: Family<RequestLabels, Counter>,
}

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            requests: self.requests.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    requests: Family<RequestLabels, Counter>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Counted<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Body + Send + 'static,
{
    type Response = http::Response<CountedBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let org = CallOrg::default();
        request.extensions_mut().insert(org.clone());
        let method = method_label(request.uri().path());
        let call = self.inner.call(request);
        let requests = self.requests.clone();
        Box::pin(async move {
            let response = call.await?;
            let mut tally = Tally {
                requests,
                method,
                org,
                counted: false,
            };
            // An error answered at once carries its status in the headers ("trailers-only").
            if let Some(code) = response.headers().get("grpc-status") {
                tally.count(code.as_bytes());
            }
            Ok(response.map(|body| CountedBody {
                inner: Box::pin(body),
                tally,
            }))
        })
    }
}

/// The services this server answers, and Flight's methods (the native ones are in the roles
/// table).
const NATIVE_SERVICES: [&str; 3] = [
    "sandbox.v1.Sandbox",
    "sandbox.v1.Audit",
    "sandbox.v1.Governance",
];
pub(crate) const FLIGHT_SERVICE: &str = "arrow.flight.protocol.FlightService";
const FLIGHT_METHODS: [&str; 10] = [
    "Handshake",
    "ListFlights",
    "GetFlightInfo",
    "PollFlightInfo",
    "GetSchema",
    "DoGet",
    "DoPut",
    "DoExchange",
    "DoAction",
    "ListActions",
];

/// The method label of a call: `service/Method` for the methods this server has, `other` for
/// any other path, so that a client cannot grow the label set (and the memory) at will.
pub(crate) fn method_label(path: &str) -> String {
    let known = path
        .trim_start_matches('/')
        .split_once('/')
        .filter(|(service, method)| {
            (NATIVE_SERVICES.contains(service)
                && crate::auth::Rpc::ALL
                    .iter()
                    .any(|rpc| rpc.name() == *method))
                || (*service == FLIGHT_SERVICE && FLIGHT_METHODS.contains(method))
        });
    match known {
        Some((service, method)) => format!("{service}/{method}"),
        None => "other".to_string(),
    }
}

/// One call's count, taken once.
struct Tally {
    requests: Family<RequestLabels, Counter>,
    method: String,
    org: CallOrg,
    counted: bool,
}

impl Tally {
    fn count(&mut self, status: &[u8]) {
        if self.counted {
            return;
        }
        self.counted = true;
        let code = tonic::Code::from_bytes(status);
        self.requests
            .get_or_create(&RequestLabels {
                method: std::mem::take(&mut self.method),
                org: self
                    .org
                    .0
                    .get()
                    .cloned()
                    .unwrap_or_else(|| NO_ORG.to_string()),
                code: code_name(code).to_string(),
            })
            .inc();
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        // The body went away before its trailers: the client left mid-answer.
        self.count(b"1");
    }
}

/// A response body that reads the status from the trailers as they pass.
pub struct CountedBody<B> {
    inner: Pin<Box<B>>,
    tally: Tally,
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(self.inner.as_mut().poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status"))
        {
            self.tally.count(code.as_bytes());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The canonical name of a gRPC status code, as Prometheus labels usually carry it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Serves `GET /metrics` over HTTP/1.1 on `listener` until `stop` fires. Holds the engine
/// weakly, so that a stopped server's engine is released.
pub async fn serve(
    listener: TcpListener,
    metrics: ServerMetrics,
    engine: Weak<Engine>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics: cannot accept a connection");
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        let engine = engine.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let answer = answer(&request, &metrics, &engine);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = connection => {
                    if let Err(error) = served {
                        tracing::debug!(%error, %peer, "metrics: connection ended");
                    }
                }
                () = stop.cancelled() => {}
            }
        });
    }
}

fn answer(
    request: &http::Request<hyper::body::Incoming>,
    metrics: &ServerMetrics,
    engine: &Weak<Engine>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: http::StatusCode, content_type: &'static str, body: String| {
        let mut response = http::Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    };
    if request.uri().path() != "/metrics" {
        return reply(
            http::StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; metrics are at /metrics\n".into(),
        );
    }
    if request.method() != http::Method::GET {
        return reply(
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".into(),
        );
    }
    match engine.upgrade() {
        Some(engine) => reply(
            http::StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(&engine),
        ),
        None => reply(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "the server is stopping\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_methods_the_server_has_are_labels() {
        for (path, label) in [
            (
                "/sandbox.v1.Sandbox/SubmitJob",
                "sandbox.v1.Sandbox/SubmitJob",
            ),
            (
                "/sandbox.v1.Audit/QueryEvents",
                "sandbox.v1.Audit/QueryEvents",
            ),
            (
                "/arrow.flight.protocol.FlightService/DoGet",
                "arrow.flight.protocol.FlightService/DoGet",
            ),
            ("/sandbox.v1.Sandbox/Made-up-1234", "other"),
            ("/sandbox.v1.Elsewhere/SubmitJob", "other"),
            ("/arrow.flight.protocol.FlightService/SubmitJob", "other"),
            ("/", "other"),
            ("", "other"),
        ] {
            assert_eq!(method_label(path), label, "{path}");
        }
    }
}

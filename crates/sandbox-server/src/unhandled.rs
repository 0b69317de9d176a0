//! Calls no handler saw are journaled too. Flight SQL's dispatch answers some requests before
//! any of our code runs (an undecodable ticket or action body, an unknown command, `ListActions`,
//! methods Flight SQL leaves unimplemented), and the router answers paths this server does not
//! serve: a layer around every call puts an [`Admitted`] mark in the request, the gatekeeper sets
//! it when it admits or refuses the call (and journals it), and the layer records every call
//! still unmarked once its answer's status is known, before the answer leaves.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use sandbox_audit::Decision;
use sandbox_engine::Engine;
use tonic::codegen::http;

use crate::metrics::{FLIGHT_SERVICE, code_name, method_label};
use crate::status::request_id_of;

/// Set once the gatekeeper has taken the call (and journaled whatever it decided).
#[derive(Debug, Clone, Default)]
pub struct Admitted(Arc<AtomicBool>);

impl Admitted {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_marked(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
pub struct JournalUnhandledLayer {
    engine: Arc<Engine>,
}

impl JournalUnhandledLayer {
    pub fn new(engine: Arc<Engine>) -> Self {
        JournalUnhandledLayer { engine }
    }
}

impl<S> tower_layer::Layer<S> for JournalUnhandledLayer {
    type Service = JournalUnhandled<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JournalUnhandled {
            inner,
            engine: self.engine.clone(),
        }
    }
}

#[derive(Clone)]
pub struct JournalUnhandled<S> {
    inner: S,
    engine: Arc<Engine>,
}

/// The journal's action for a path: `Flight<Method>` for Flight's methods, the method for the
/// native services', `Unknown` for anything else (a client cannot make up action names).
fn action_of(path: &str) -> String {
    match method_label(path).split_once('/') {
        Some((service, method)) if service == FLIGHT_SERVICE => format!("Flight{method}"),
        Some((_, method)) => method.to_string(),
        None => "Unknown".to_string(),
    }
}

impl<S, B, R> tower_service::Service<http::Request<B>> for JournalUnhandled<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let admitted = Admitted::default();
        request.extensions_mut().insert(admitted.clone());
        let action = action_of(request.uri().path());
        let request_id = request_id_of(request.headers());
        let engine = self.engine.clone();
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            if !admitted.is_marked() {
                // An answer refused at once carries its status in the headers; one that streams
                // (`ListActions`) is an answer.
                let code = response
                    .headers()
                    .get("grpc-status")
                    .map_or(tonic::Code::Ok, |code| {
                        tonic::Code::from_bytes(code.as_bytes())
                    });
                let (decision, rule) = match code {
                    tonic::Code::Ok => (Decision::Allow, String::new()),
                    code => (
                        Decision::Fail,
                        code_name(code).to_ascii_lowercase().replace('_', "-"),
                    ),
                };
                if let Err(error) = engine
                    .record_refusal(&action, &request_id, None, decision, &rule, "")
                    .await
                {
                    tracing::error!(%request_id, %action, %error, "cannot journal an unhandled call");
                }
            }
            Ok(response)
        })
    }
}

//! Calls run to their end even when the client goes away, and learn that it did.
//!
//! When a client cancels a call, its deadline passes or its connection drops, the server drops
//! the call's future. A handler dropped between two steps could leave a request without its
//! terminal audit event, or a job without anyone waiting for it. So every call runs in a task of
//! its own ([`DetachLayer`]); the future the server may drop only waits for that task, and
//! dropping it fires the call's [`ClientGone`] token, which long waits (`FetchResult`) watch.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::CancellationToken;
use tonic::codegen::http;

/// Fired when the client stopped waiting for the call (cancel, deadline, disconnect). In the
/// request's extensions.
#[derive(Debug, Clone, Default)]
pub struct ClientGone(pub CancellationToken);

impl ClientGone {
    /// The call's token; one that never fires outside the layer (unit tests call handlers
    /// directly).
    pub fn of<T>(request: &tonic::Request<T>) -> CancellationToken {
        request
            .extensions()
            .get::<ClientGone>()
            .map(|gone| gone.0.clone())
            .unwrap_or_default()
    }
}

/// Runs each call in its own task; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct DetachLayer;

impl<S> tower_layer::Layer<S> for DetachLayer {
    type Service = Detach<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Detach { inner }
    }
}

#[derive(Debug, Clone)]
pub struct Detach<S> {
    inner: S,
}

/// Fires the token when dropped before [`FireOnDrop::disarm`].
struct FireOnDrop(Option<CancellationToken>);

impl FireOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for FireOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower_service::Service<http::Request<B>> for Detach<S>
where
    S: tower_service::Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let gone = ClientGone::default();
        request.extensions_mut().insert(gone.clone());
        let call = self.inner.call(request);
        let task = tokio::spawn(call);
        Box::pin(async move {
            let mut fire = FireOnDrop(Some(gone.0));
            let outcome = task.await;
            fire.disarm();
            match outcome {
                Ok(result) => result.map_err(Into::into),
                Err(join) => Err(format!("call task ended abnormally: {join}").into()),
            }
        })
    }
}

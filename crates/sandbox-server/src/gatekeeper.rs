//! The authenticate stage every call goes through before the engine sees it: credentials, the
//! role table, per-principal rate limits, and the journaling of every refusal.
//!
//! Handlers reach the engine only through [`Gatekeeper::serve`]: it admits the call, hands the
//! handler an admitted [`Call`] (the engine, the caller's context and the request's message), and
//! turns how the handler ended ([`CallError`]) into the answer's status. That one skeleton is what
//! keeps the journal's promise that every call ends in exactly one terminal event: a refusal at
//! admission is recorded here, an engine call records its own end, and a malformed request the
//! engine never saw is recorded here before it is answered.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sandbox_engine::{Decision, Engine, EngineError, RequestContext};
use tonic::{Request, Status};

use crate::auth::{self, Authenticator, Rpc, required_roles};
use crate::metrics::CallOrg;
use crate::status::{self, status_of};
use crate::unhandled::Admitted;

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

/// An admitted call, as its handler sees it.
#[derive(Debug)]
pub(crate) struct Call<'g, M> {
    pub engine: &'g Arc<Engine>,
    /// Who is calling, and the request id every journal record and status of the call carries.
    pub ctx: RequestContext,
    /// The request's message.
    pub message: M,
}

/// How an admitted call ends without its answer. Each variant says who journals the call's end,
/// so that the call has exactly one terminal event whichever way it ends.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The engine refused or failed, and recorded the call's end itself.
    Engine(EngineError),
    /// A malformed request the engine never saw: recorded here (`Fail`, with `code` as its
    /// rule) and answered `INVALID_ARGUMENT`.
    Invalid {
        code: &'static str,
        message: &'static str,
    },
    /// An answer already decided after the engine recorded the call (an explanation's denial,
    /// an internal error building the answer): sent as it is.
    Answered(Status),
}

impl From<EngineError> for CallError {
    fn from(error: EngineError) -> Self {
        CallError::Engine(error)
    }
}

impl From<Status> for CallError {
    fn from(status: Status) -> Self {
        CallError::Answered(status)
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

    /// The credentials the calls are checked against: who has them, for the answers that name
    /// logins (`WhoAmI`, `ListGrants`, owners' budgets, the owners a module awaits).
    pub(crate) fn authenticator(&self) -> &Arc<Authenticator> {
        &self.authenticator
    }

    /// The skeleton of every handler: admits `request` for `rpc` (a refusal is journaled and
    /// answered here, and `handle` never runs), then runs `handle` on the admitted call and maps
    /// how it ended to the answer's status.
    pub(crate) async fn serve<'g, M, T, F, Fut>(
        &'g self,
        request: Request<M>,
        rpc: Rpc,
        handle: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(Call<'g, M>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let ctx = self.admit(&request, rpc).await?;
        // The handler owns its context; this copy maps its errors once it has ended.
        let call = Call {
            engine: &self.engine,
            ctx: ctx.clone(),
            message: request.into_inner(),
        };
        match handle(call).await {
            Ok(answer) => Ok(answer),
            Err(CallError::Engine(error)) => Err(status_of(&error, &ctx.request_id)),
            Err(CallError::Invalid { code, message }) => {
                Err(self.reject(rpc, &ctx, code, message).await)
            }
            Err(CallError::Answered(status)) => Err(status),
        }
    }

    /// Authenticates the caller, applies its rate limit and checks the RPC's roles. A refusal
    /// is recorded in the journal before it is answered.
    async fn admit<T>(&self, request: &Request<T>, rpc: Rpc) -> Result<RequestContext, Status> {
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
                // No principal was established: the journal records what was presented (hash
                // prefixes and certificate names, never a secret) and why it was refused.
                self.engine
                    .record_unauthenticated(
                        rpc.name(),
                        &request_id,
                        &auth::presented(authorization, leaf),
                        failure.code(),
                        &failure.to_string(),
                    )
                    .await
                    .map_err(|e| status_of(&e, &request_id))?;
                return Err(status::unauthenticated(&failure, &request_id));
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
                &principal,
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
                &principal,
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
    async fn reject(&self, rpc: Rpc, ctx: &RequestContext, code: &str, message: &str) -> Status {
        match self
            .record(rpc, &ctx.request_id, &ctx.principal, Decision::Fail, code)
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
        principal: &sandbox_policy::Principal,
        decision: Decision,
        rule: &str,
    ) -> Result<(), Status> {
        self.engine
            .record_refusal(rpc.name(), request_id, Some(principal), decision, rule, "")
            .await
            .map(|_| ())
            .map_err(|e| status_of(&e, request_id))
    }
}

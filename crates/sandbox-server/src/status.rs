//! The one place where errors become gRPC statuses.

use sandbox_engine::{EngineError, ErrorKind};
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::AuthFailure;

/// Metadata key carrying the stable rule or error code.
pub const RULE_HEADER: &str = "x-sandbox-rule";
/// Metadata key carrying how long to wait before retrying, in milliseconds.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";
/// Metadata key carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The request id of a call: the client's, when it sent a UUID (to find its calls in the
/// journal), else a fresh one.
pub fn request_id_of(headers: &tonic::codegen::http::HeaderMap) -> String {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .unwrap_or_else(uuid::Uuid::new_v4)
        .to_string()
}

/// Maps an engine error to a status. The message names the rule and the request id; internal
/// errors say only that, since their details may hold paths or data (they go to the log).
pub fn status_of(error: &EngineError, request_id: &str) -> Status {
    let code = match error.kind() {
        ErrorKind::Denied => Code::FailedPrecondition,
        ErrorKind::Invalid => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Internal => Code::Internal,
    };
    let message = match error.kind() {
        ErrorKind::Internal => {
            tracing::error!(request_id, %error, "internal error");
            "internal error".to_string()
        }
        // The cause (a path, an OS error) is for operators; the client learns what it means.
        ErrorKind::Unavailable => {
            tracing::error!(request_id, %error, "audit journal unavailable");
            "the audit journal cannot record (a write or sync failed, for example on a full \
             disk): nothing is released until the server is repaired and restarted"
                .to_string()
        }
        _ => error.to_string(),
    };
    let status = with_headers(code, error.code(), &message, request_id);
    match error.retry_after() {
        Some(wait) => with_retry_hint(status, wait),
        None => status,
    }
}

/// A request over its principal's rate limit.
pub fn rate_limited(wait: Duration, request_id: &str) -> Status {
    let status = with_headers(
        Code::ResourceExhausted,
        "rate-limited",
        &format!("too many requests; retry in {} ms", wait.as_millis().max(1)),
        request_id,
    );
    with_retry_hint(status, wait)
}

/// Adds the standard `google.rpc.RetryInfo` detail, and the same delay in milliseconds as the
/// `retry-after-ms` header for clients that do not decode details.
fn with_retry_hint(status: Status, wait: Duration) -> Status {
    let mut hinted = Status::with_error_details(
        status.code(),
        status.message(),
        ErrorDetails::with_retry_info(Some(wait)),
    );
    *hinted.metadata_mut() = status.metadata().clone();
    if let Ok(value) = wait.as_millis().max(1).to_string().parse() {
        hinted.metadata_mut().insert(RETRY_AFTER_HEADER, value);
    }
    hinted
}

/// Refused credentials: the rule, and what was wrong with what the caller presented and what
/// fixes it (each [`AuthFailure`] names only what the caller presented).
pub fn unauthenticated(failure: &AuthFailure, request_id: &str) -> Status {
    with_headers(
        Code::Unauthenticated,
        failure.code(),
        &failure.to_string(),
        request_id,
    )
}

pub fn not_permitted(rpc_name: &str, request_id: &str) -> Status {
    with_headers(
        Code::PermissionDenied,
        "role-not-permitted",
        &format!("your roles do not allow {rpc_name}"),
        request_id,
    )
}

/// A query the guard refused, decided without an engine error (an explanation's verdict).
pub fn denied(rule: &str, message: &str, request_id: &str) -> Status {
    with_headers(Code::FailedPrecondition, rule, message, request_id)
}

pub fn invalid(code: &str, message: &str, request_id: &str) -> Status {
    with_headers(Code::InvalidArgument, code, message, request_id)
}

fn with_headers(code: Code, rule: &str, message: &str, request_id: &str) -> Status {
    let mut status = Status::new(code, format!("[{rule}] {message} (request {request_id})"));
    if let Ok(value) = rule.parse() {
        status.metadata_mut().insert(RULE_HEADER, value);
    }
    if let Ok(value) = request_id.parse() {
        status.metadata_mut().insert(REQUEST_ID_HEADER, value);
    }
    status
}

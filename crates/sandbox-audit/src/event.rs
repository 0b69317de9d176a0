//! The audit event: one record of the journal.

use serde::{Deserialize, Serialize};

/// Outcome recorded for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Allowed; for jobs: ran and released through the gate.
    #[default]
    Allow,
    /// Refused by policy; `rule` names the rule.
    Deny,
    /// Admitted but failed while running.
    Fail,
    /// Cancelled by its submitter.
    Cancel,
    /// Missing, malformed or unknown credentials.
    Unauthenticated,
    /// Authenticated, but the principal's roles do not allow the call.
    PermissionDenied,
    /// Refused by a rate, concurrency or admission limit before anything ran; `rule` names the
    /// limit. The client may retry later.
    Throttle,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Fail => "fail",
            Decision::Cancel => "cancel",
            Decision::Unauthenticated => "unauthenticated",
            Decision::PermissionDenied => "permission_denied",
            Decision::Throttle => "throttle",
        }
    }
}

/// The fields of DESIGN.md section 7 that apply to the request. `seq` and `time` are assigned by the
/// journal when the event is appended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub time: String,
    /// The RPC or action, e.g. `SubmitJob`.
    pub action: String,
    pub principal: String,
    pub org: String,
    pub request_id: String,
    #[serde(default)]
    pub job_id: String,
    /// `sql`, `wasm` or empty.
    #[serde(default)]
    pub kind: String,
    /// Query text or module hash.
    #[serde(default)]
    pub query: String,
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Columns touched, as `dataset.column`.
    #[serde(default)]
    pub columns: Vec<String>,
    pub decision: Decision,
    #[serde(default)]
    pub rule: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub rows_scanned: u64,
    #[serde(default)]
    pub rows_released: u64,
    #[serde(default)]
    pub rows_suppressed: u64,
    #[serde(default)]
    pub min_units: u64,
    #[serde(default)]
    pub epsilon_spent: f64,
    /// SHA-256 (hex) of the released Arrow IPC bytes.
    #[serde(default)]
    pub result_sha256: String,
    #[serde(default)]
    pub duration_ms: u64,
    /// For code jobs: the deterministic work units (fuel) the guest used.
    #[serde(default)]
    pub work_units: u64,
    /// For code jobs: the guest's log lines, bounded by the sandbox. Never sent to the client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_log: Vec<String>,
    /// A state change this event carries (module upload, approval, consent, run): the journal is
    /// the system of record for that state, which is rebuilt from these at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
}

/// An event read back from the journal, with its chain hash.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub event: AuditEvent,
    /// Hex SHA-256 chain hash of this record.
    pub chain_hash: String,
}

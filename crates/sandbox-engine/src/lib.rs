//! The job manager: wires the stages of the pipeline for every request, SQL or WASM, and knows
//! nothing of gRPC.
//!
//! ```text
//! authenticate -> admit -> plan -> execute -> release -> record -> deliver
//!   (server)      grants   guard    DataFusion   gate     journal   JobResult
//! ```
//!
//! Each stage takes the previous stage's output type: [`sandbox_sql::PlannedQuery`] only comes from
//! the guard, [`sandbox_sql::Executed`] from execution, [`sandbox_release::Released`] only from the
//! gate, and a [`JobResult`] (the only thing delivery can send) only from a `Released` plus the
//! journal's receipt [`sandbox_audit::Appended`]. So a result cannot reach a client without passing
//! the gate and being durably recorded first.
//!
//! Every request produces exactly one terminal audit event: a job's is written when it ends
//! (released, denied, failed or cancelled), after an `AdmitJob` event made durable before it
//! executed; other calls record theirs before answering.

mod admission;
mod audit;
mod audit_sql;
mod differencing;
mod error;
mod jobs;
mod metrics;
mod modules;
mod privacy;
mod secret;
mod templates;

pub use audit::{ConsistencyAnswer, InclusionAnswer};
pub use audit_sql::AuditQueryResult;
pub use error::{EngineError, ErrorKind, Result};
pub use jobs::{
    ColumnView, DatasetView, DpOutcome, DpRequest, Engine, EngineConfig, Explanation, JobResult,
    JobSnapshot, JobSpec, JobState, ReleaseOutcome, RequestContext,
};
pub use metrics::EngineMetrics;
pub use modules::{ApprovalRequest, ModuleView};
pub use privacy::BudgetView;
pub use sandbox_audit::{
    AuditEvent, BundleSource, Checkpoint, Decision, JournalOptions, StoredEvent,
};
pub use sandbox_policy::{
    Approval, Consent, ConsentKey, Contract, TemplateApproval, TemplateDefinition, TemplateOutput,
    TemplateRecord,
};
pub use sandbox_release::dp::NoiseReport;
pub use sandbox_sql::SqlLimits;
pub use sandbox_wasm::WasmLimits;
pub use templates::{TemplateSeed, TemplateView};

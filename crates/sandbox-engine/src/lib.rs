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
mod answers;
mod audit;
mod audit_sql;
mod codes;
mod differencing;
mod engine;
mod error;
mod governance;
mod jobs;
mod listings;
mod metrics;
mod recorder;
mod secret;
mod types;

pub use audit::{ConsistencyAnswer, InclusionAnswer};
pub use audit_sql::AuditQueryResult;
pub use codes::{Action, EngineRule, JobKind};
pub use engine::Engine;
pub use error::{EngineError, ErrorKind, Result};
pub use governance::budgets::BudgetView;
pub use governance::modules::{ApprovalRequest, ModuleView};
pub use governance::templates::TemplateView;
pub use metrics::EngineMetrics;
pub use recorder::{ABANDONED_RULE, decision_of};
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
pub use types::{
    ColumnView, DatasetView, DpOutcome, DpRequest, EngineConfig, Explanation, JobResult,
    JobSnapshot, JobSpec, JobState, ReleaseOutcome, RequestContext, TemplateSeed,
};

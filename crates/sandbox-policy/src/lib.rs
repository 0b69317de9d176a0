//! The policy model of the data sandbox: datasets with per-column levels and roles, grants of modes
//! to principals, and the decisions derived from them.
//!
//! This crate is pure on purpose: it knows nothing of tokio, tonic, DataFusion or wasmtime, so the
//! rules can be read, tested and fuzzed on their own. The stages that enforce the rules (the plan
//! guard in `sandbox-sql`, the release gate in `sandbox-release`) take their parameters from here.
//!
//! Key types:
//! - [`PolicySet`]: every dataset and grant, loaded strictly from TOML by [`load_dir`] or
//!   [`load_sources`]; errors name the file and line.
//! - [`DatasetPolicy`] / [`ColumnPolicy`]: a dataset, its privacy unit and its columns with
//!   [`Level`] and [`Role`]. A column that is not listed is hidden.
//! - [`Grant`] and [`AggregateMode`]: what a principal, an org or a role may do with a dataset.
//! - [`Principal`]: an authenticated caller (id, org, roles).
//! - [`Registry`] and its [`Record`]s: uploaded modules, owners' approvals with output
//!   [`Contract`]s, rejections, consents, SQL templates ([`TemplateDefinition`]) and their
//!   approvals, and runs, folded from the audit journal.

mod error;
mod load;
mod model;
mod records;
mod templates;

pub use error::{PolicyError, Result};
pub use load::{load_dir, load_sources, read_dir_sources};
pub use model::{
    AggregateFunction, AggregateMode, ColumnPolicy, DatasetPolicy, DpMode, DpTotal, Grant, Grantee,
    Level, Location, Mask, Mode, PolicySet, Principal, PrincipalRole, Role, TemplateMode, WasmMode,
};
pub use records::{
    ALL_ORGS, Approval, BudgetSpent, Consent, ConsentKey, Contract, ContractField, Effective,
    EffectiveTemplate, FieldKind, MAX_CONTRACT_FIELDS, ModuleRecord, Record, Refusal, Registry,
    Rejection,
};
pub use templates::{
    MAX_PARAM_BYTES, MAX_TEMPLATE_PARAMS, MIN_SCORING_STEP_MONTHS, ParamKind, ParamValue,
    TemplateApproval, TemplateDefinition, TemplateOutput, TemplateParam, TemplateRecord,
};

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
//!
//! # Policy files
//!
//! A policy file is one department's policy: `org = "..."`, the datasets it owns, the grants it
//! gives. A department can only grant what it owns. Loading is strict: unknown keys, missing
//! fields, unknown levels, roles or functions, a privacy unit that is not a declared identifier,
//! sources that leave the data dir, grants to unknown or foreign datasets are errors naming file
//! and line.
//!
//! Column roles: `identifier`, `join_key`, `dimension`, `measure`, `masked` (with a declared
//! [`Mask`]) and `hidden`; undeclared columns are hidden. A measure may declare `bounds = [low,
//! high]`: under differential privacy its values are clamped into them and the noise is scaled to
//! them. A dimension may declare its public `domain` (under DP a query grouped by such columns
//! shows every combination, with noise, without partition selection) and `constant_per_unit`
//! (grouping by it puts each unit in one group). A dataset declares its `row_key` (exact answers
//! need it) and `[dataset.dp]` `total_epsilon`/`total_delta`, what every consumer org together may
//! spend (required when a grant offers DP).
//!
//! Grants give modes:
//! - `[grant.aggregate]`: ad-hoc aggregate SQL; optional `filter_measures` (the measures that may
//!   be range-filtered) and `expression_arguments` (allows `SUM(CASE ...)`); `exact = true` asks
//!   for exact answers on L3 data.
//! - `[grant.aggregate.dp]` ([`DpMode`]): per-query `epsilon` and `delta`, total `budget_epsilon`
//!   and `budget_delta` per consumer org, `max_rows_per_unit`, `max_groups_per_unit`, `required`.
//! - `[grant.template]`: approved templates, with a `min_units` floor and the `purposes` scoring
//!   templates may serve.
//! - `[grant.wasm]`: approved code may read the dataset's rows for the listed `purposes`, within an
//!   optional `columns` ceiling.
//!
//! [`DatasetPolicy::level`] is the highest level of a column a consumer can use. From L3 up, ad-hoc
//! SQL is answered under differential privacy unless the grant says `exact = true`, which the
//! loader refuses on L4 data and without a row key (an L3 grant needs one or the other).
//!
//! # Level caps
//!
//! The table lives in code as [`Level::allows_role`] and [`Level::allows_mode`].
//!
//! | level | roles allowed | ad-hoc aggregate SQL | approved template | approved code |
//! |---|---|---|---|---|
//! | L1 public | all | yes | yes | yes |
//! | L2 internal | all | yes | yes | yes |
//! | L3 sensitive | `identifier`, `join_key`, `measure`, `masked`, `hidden` (never a clear `dimension`) | under differential privacy, or exact where the owner marks the grant so | yes | yes |
//! | L4 highly sensitive | `measure`, `hidden` | only under differential privacy | yes | yes |
//!
//! A policy declaring a column with a role its level does not allow, or a grant listing an L4
//! measure in `filter_measures`, is refused at load with the reason. A query using an L4 column in
//! exact ad-hoc SQL is denied with `level-cap`, and runs under differential privacy instead when
//! every dataset it reads offers it to the caller (`Mode::Private`, which `Level::allows_mode`
//! allows for L4).
//!
//! # Templates and run-time records
//!
//! `templates.rs`: a [`TemplateDefinition`] is TOML (name, SQL with `$name` placeholders, typed
//! parameters, its own mode: aggregate with `min_units`, or scoring with a contract), hashed with
//! the submitting org over its canonical JSON, so one consumer's approvals never cover another's
//! identical submission. Parameters declare a domain (`values`, `min`/`max`, or months
//! `from`/`to`/`step_months`; a scoring template's months step by at least 12).
//!
//! `records.rs`: [`ModuleRecord`], [`Approval`] with its output [`Contract`], [`Rejection`],
//! [`Consent`], the [`Record`] enum the journal stores, and the [`Registry`] that folds them.
//! [`Registry::effective`] decides whether a module may run: every owner of every dataset in the
//! module's declared input approved it, no rejection, not expired, runs left, all owners'
//! contracts identical; [`Registry::effective_template`] does the same for the newest template of
//! a name (one `check_approvals` serves both). [`Registry::consented`] lists the entities that
//! consented to a consumer for a purpose. Budgets: `BudgetDebit` records add a DP query's epsilon
//! and delta to (consumer org, dataset), and [`ALL_ORGS`] for the dataset's total; a
//! `BudgetRefreshed` record (an owner's renewal) sets them back to zero
//! ([`Registry::budget_spent`]).
//!
//! Refusal codes ([`Refusal`]): `module-not-approved` (unknown module, another org's, or an
//! owner's approval missing), `module-rejected`, `approval-expired`, `runs-exhausted`,
//! `contracts-differ`, `template-not-approved`.

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
    MAX_PARAM_BYTES, MAX_TEMPLATE_PARAMS, MIN_SCORING_STEP_MONTHS, ParamError, ParamKind,
    ParamValue, TemplateApproval, TemplateDefinition, TemplateOutput, TemplateParam,
    TemplateRecord,
};

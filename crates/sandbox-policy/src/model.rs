//! The policy model: datasets, columns, levels, roles, grants and principals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Where a policy item was declared, for error messages and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// Sensitivity grade of a column (分级). The level caps the roles a column may take and the modes
/// it may be used in. The table, enforced at load ([`Level::allows_role`]) and by the guard
/// ([`Level::allows_mode`]):
///
/// | level | roles                                                   | ad-hoc aggregate | template | wasm |
/// |-------|---------------------------------------------------------|------------------|----------|------|
/// | L1    | any                                                     | yes              | yes      | yes  |
/// | L2    | any                                                     | yes              | yes      | yes  |
/// | L3    | identifier, join_key, measure, masked, hidden           | yes              | yes      | yes  |
/// | L4    | measure, hidden                                         | only under DP    | yes      | yes  |
///
/// L3 values are never shown in the clear: not as a dimension, only masked or aggregated. L4
/// values reach ad-hoc SQL only under differential privacy ([`Mode::Private`]), and otherwise
/// only owner-approved templates and code, whose every run the owner scoped.
///
/// A dataset's level is the highest level of its visible columns ([`DatasetPolicy::level`]). Ad-hoc
/// SQL over a dataset of level L3 or above is answered under differential privacy unless its
/// owner marks the grant exact ([`AggregateMode::exact`]), which an L4 dataset cannot be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Public.
    L1,
    /// Internal.
    L2,
    /// Sensitive.
    L3,
    /// Highly sensitive.
    L4,
}

/// The ways a column can be used, for the level caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Ad-hoc aggregate SQL.
    Aggregate,
    /// An owner-approved SQL template.
    Template,
    /// Owner-approved code.
    Wasm,
    /// Ad-hoc aggregate SQL under differential privacy: noisy answers, debited from a budget.
    Private,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Aggregate => "ad-hoc aggregate SQL",
            Mode::Template => "an approved template",
            Mode::Wasm => "approved code",
            Mode::Private => "ad-hoc aggregate SQL under differential privacy",
        }
    }
}

impl Level {
    pub const ALL: [Level; 4] = [Level::L1, Level::L2, Level::L3, Level::L4];

    /// Whether a column of this level may take this role (the level-cap table above).
    pub fn allows_role(self, role: Role) -> bool {
        match self {
            Level::L1 | Level::L2 => true,
            Level::L3 => role != Role::Dimension,
            Level::L4 => matches!(role, Role::Measure | Role::Hidden),
        }
    }

    /// Whether a column of this level may be used in this mode (the level-cap table above).
    pub fn allows_mode(self, mode: Mode) -> bool {
        self != Level::L4 || mode != Mode::Aggregate
    }

    /// Why [`Level::allows_role`] refuses, for the loader's message.
    pub fn role_cap_reason(self) -> &'static str {
        match self {
            Level::L1 | Level::L2 => "",
            Level::L3 => "L3 values are never shown in the clear: mask or aggregate them",
            Level::L4 => "L4 columns may only be measures or hidden",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::L1 => "L1",
            Level::L2 => "L2",
            Level::L3 => "L3",
            Level::L4 => "L4",
        }
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "L1" => Ok(Level::L1),
            "L2" => Ok(Level::L2),
            "L3" => Ok(Level::L3),
            "L4" => Ok(Level::L4),
            other => Err(format!(
                "unknown level `{other}` (expected L1, L2, L3 or L4)"
            )),
        }
    }
}

/// What the plan guard allows a column to be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The privacy unit: never output, grouped on or compared; only `COUNT(DISTINCT ...)` and
    /// equi-joins with the privacy unit of another dataset or a join key.
    Identifier,
    /// Only in equi-join conditions: never output, never compared to literals.
    JoinKey,
    /// May be output, grouped by and filtered on.
    Dimension,
    /// Only as the plain argument of an allowed aggregate function.
    Measure,
    /// Seen only through its declared [`Mask`]: the consumer's catalog holds the transformed value.
    Masked,
    /// Unusable: not even visible in the consumer's catalog.
    Hidden,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Identifier,
        Role::JoinKey,
        Role::Dimension,
        Role::Measure,
        Role::Masked,
        Role::Hidden,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Identifier => "identifier",
            Role::JoinKey => "join_key",
            Role::Dimension => "dimension",
            Role::Measure => "measure",
            Role::Masked => "masked",
            Role::Hidden => "hidden",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown role `{s}` (expected one of {})",
                    Role::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}

/// The desensitization (脱敏) of a masked column. The engine applies it below the consumer's
/// catalog, so a query can only ever read the transformed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mask {
    /// Keep the first `keep_first` and last `keep_last` characters, replace the rest by `*`.
    Partial { keep_first: u32, keep_last: u32 },
    /// A keyed pseudonym: HMAC-SHA256 under a key derived from the server secret and the
    /// consumer's org. Stable per consumer, unlinkable across consumers.
    Pseudonym,
    /// A number generalized to the lower bound of its bucket of this width.
    Bucket { width: u64 },
    /// A date (or `YYYY-MM...` text) generalized to its year, as `YYYY`.
    Year,
    /// A date (or `YYYY-MM...` text) generalized to its month, as `YYYY-MM`.
    Month,
}

impl Mask {
    /// Generalizations keep a coarse version of the value: comparing it to a literal reveals
    /// only the coarse value, so the guard allows it. Partial masks and pseudonyms are tokens.
    pub fn is_generalization(self) -> bool {
        matches!(self, Mask::Bucket { .. } | Mask::Year | Mask::Month)
    }

    pub fn describe(self) -> String {
        match self {
            Mask::Partial {
                keep_first,
                keep_last,
            } => format!("partial (keep first {keep_first}, last {keep_last})"),
            Mask::Pseudonym => "pseudonym (HMAC-SHA256 per consumer org)".to_string(),
            Mask::Bucket { width } => format!("bucket of width {width}"),
            Mask::Year => "year".to_string(),
            Mask::Month => "month".to_string(),
        }
    }
}

/// One declared column of a dataset.
#[derive(Debug, Clone)]
pub struct ColumnPolicy {
    pub name: String,
    pub level: Level,
    pub role: Role,
    /// The transform of a [`Role::Masked`] column; `None` for every other role.
    pub mask: Option<Mask>,
    /// Declared range of a measure, `(low, high)`: under differential privacy every value is
    /// clamped into it, and the noise is scaled to it. A measure without bounds cannot be
    /// summed or averaged under differential privacy.
    pub bounds: Option<(f64, f64)>,
    /// The values a dimension can take, declared public by the owner (the five tax ratings, the
    /// kinds of court case): under differential privacy a query grouped by such columns shows
    /// every value, with noise, without spending on choosing which groups to show; rows with
    /// other values are left out. Empty when not declared.
    pub domain: Vec<String>,
    /// Every row of one privacy unit holds the same value (an enterprise's rating, its industry):
    /// grouping by such columns puts each unit in one group, so differential privacy needs no
    /// budget for a unit spread over several groups. Declared by the owner; the plan still
    /// bounds every unit to one group when a query relies on it, so a wrong declaration costs
    /// accuracy, never privacy.
    pub constant_per_unit: bool,
    pub description: String,
    pub location: Location,
}

/// The most values a dimension's public domain may list.
pub const MAX_DOMAIN_VALUES: usize = 1_000;

/// A dataset, owned by one department, with its privacy unit and declared columns.
#[derive(Debug, Clone)]
pub struct DatasetPolicy {
    pub id: String,
    /// The owning department's org id.
    pub owner: String,
    pub description: String,
    /// Parquet files or folders, relative to the data dir.
    pub source: Vec<String>,
    /// The column whose distinct values are the protected entities.
    pub privacy_unit: String,
    pub columns: Vec<ColumnPolicy>,
    /// Columns whose values identify one row (`credit_code` and `month` in a monthly table).
    /// Exact answers need it: the differencing defense tells rows apart by it, and a join onto a
    /// side unique on its join columns does not copy the other side's rows. The engine checks
    /// that it holds before the first exact query reads the dataset.
    pub row_key: Vec<String>,
    /// What differential privacy may spend on this dataset over every consumer together: each
    /// privacy unit loses at most this much, however many organisations ask.
    pub dp_total: Option<DpTotal>,
    pub location: Location,
}

/// The owner's total privacy budget of a dataset, over all consumers (`[dataset.dp]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpTotal {
    pub epsilon: f64,
    pub delta: f64,
}

impl DatasetPolicy {
    /// The declared column of that name. Undeclared columns are hidden.
    pub fn column(&self, name: &str) -> Option<&ColumnPolicy> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The role of a column; undeclared columns are [`Role::Hidden`].
    pub fn role_of(&self, name: &str) -> Role {
        self.column(name).map_or(Role::Hidden, |c| c.role)
    }

    /// Columns a consumer may see in the catalog: every declared column that is not hidden.
    pub fn visible_columns(&self) -> impl Iterator<Item = &ColumnPolicy> {
        self.columns.iter().filter(|c| c.role != Role::Hidden)
    }

    /// The dataset's level: the highest level of a column a consumer can use. Hidden columns are
    /// never read, so they do not raise it.
    pub fn level(&self) -> Level {
        self.visible_columns()
            .map(|c| c.level)
            .max()
            .unwrap_or(Level::L1)
    }

    /// Whether ad-hoc SQL on this dataset is answered under differential privacy unless the
    /// grant is marked exact: datasets of level L3 and above.
    pub fn private_by_default(&self) -> bool {
        self.level() >= Level::L3
    }
}

/// The aggregate functions a grant can allow, by their policy names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AggregateFunction {
    /// `COUNT(*)` and `COUNT(column)`.
    Count,
    /// `COUNT(DISTINCT column)`.
    CountDistinct,
    Sum,
    Avg,
    /// Extremes single out entities; allowed only where a grant says so.
    Min,
    Max,
}

impl AggregateFunction {
    pub const ALL: [AggregateFunction; 6] = [
        AggregateFunction::Count,
        AggregateFunction::CountDistinct,
        AggregateFunction::Sum,
        AggregateFunction::Avg,
        AggregateFunction::Min,
        AggregateFunction::Max,
    ];

    /// The functions a grant allows when it does not list any.
    pub const DEFAULT: [AggregateFunction; 4] = [
        AggregateFunction::Count,
        AggregateFunction::CountDistinct,
        AggregateFunction::Sum,
        AggregateFunction::Avg,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AggregateFunction::Count => "count",
            AggregateFunction::CountDistinct => "count_distinct",
            AggregateFunction::Sum => "sum",
            AggregateFunction::Avg => "avg",
            AggregateFunction::Min => "min",
            AggregateFunction::Max => "max",
        }
    }
}

impl FromStr for AggregateFunction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AggregateFunction::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown aggregate function `{s}` (expected one of {})",
                    AggregateFunction::ALL.map(|f| f.as_str()).join(", ")
                )
            })
    }
}

/// Differential privacy for ad-hoc aggregates (`[grant.aggregate.dp]`): what one query may
/// spend, what a consumer org may spend in total on the dataset, and how much one privacy unit
/// may contribute.
#[derive(Debug, Clone, PartialEq)]
pub struct DpMode {
    /// Epsilon of one query (the default, and the most a caller may ask for).
    pub epsilon: f64,
    /// Delta of one query: the chance that partition selection reveals a group of few units.
    pub delta: f64,
    /// Total epsilon a consumer org may spend on the dataset.
    pub budget_epsilon: f64,
    /// Total delta a consumer org may spend on the dataset.
    pub budget_delta: f64,
    /// Rows of one unit counted per group; a unit's further rows are not counted.
    pub max_rows_per_unit: u64,
    /// Groups one unit may contribute to; a unit in more groups is kept in as many chosen at
    /// random.
    pub max_groups_per_unit: u64,
    /// Every ad-hoc query on the dataset runs under differential privacy, not only those that
    /// read L4 measures or ask for it.
    pub required: bool,
}

impl DpMode {
    /// The mode of a query over both datasets: the least epsilon, delta and budgets, and the
    /// larger contribution bounds. The bounds decide how much of each unit's data is counted,
    /// and the noise is scaled to them, so larger ones cost accuracy, never privacy; the smaller
    /// would cut a join to the rows of the dataset with fewest per unit (tax months joined to the
    /// register's one row per enterprise would keep one month of each enterprise).
    pub fn joined(&self, other: &DpMode) -> DpMode {
        DpMode {
            epsilon: self.epsilon.min(other.epsilon),
            delta: self.delta.min(other.delta),
            budget_epsilon: self.budget_epsilon.min(other.budget_epsilon),
            budget_delta: self.budget_delta.min(other.budget_delta),
            max_rows_per_unit: self.max_rows_per_unit.max(other.max_rows_per_unit),
            max_groups_per_unit: self.max_groups_per_unit.max(other.max_groups_per_unit),
            required: self.required || other.required,
        }
    }
}

/// Mode `aggregate`: ad-hoc aggregate SQL whose every output row covers at least `min_units`
/// distinct privacy units.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateMode {
    pub min_units: u64,
    pub functions: BTreeSet<AggregateFunction>,
    /// Measures that may be compared to constants in `WHERE` (range filters). None by default:
    /// a narrow range on a measure singles out the entity with that value.
    pub filter_measures: BTreeSet<String>,
    /// Whether aggregate arguments may be expressions (`SUM(CASE WHEN ... THEN m END)`) rather
    /// than plain columns. Off by default: such an argument smuggles a predicate into a sum.
    pub expression_arguments: bool,
    /// The owner answers this grantee's ad-hoc SQL exactly (under the threshold and the
    /// differencing defense) although the dataset's level calls for differential privacy by
    /// default. Only L3 datasets with a row key may be marked so; L1 and L2 are exact anyway.
    pub exact: bool,
    /// Differential privacy, when the grant offers it (and required for L4 measures).
    pub dp: Option<DpMode>,
}

impl AggregateMode {
    /// Whether ad-hoc SQL under this mode is answered exactly (by the threshold) rather than
    /// under differential privacy: not when the grant requires privacy, nor on a dataset whose
    /// level calls for it (L3 and up) unless the owner marked the grant exact. A query reading an
    /// L4 measure still runs under differential privacy (the level cap), whatever this says.
    pub fn answers_exactly(&self, dataset: &DatasetPolicy) -> bool {
        let required = self.dp.as_ref().is_some_and(|dp| dp.required);
        !required && (self.exact || !dataset.private_by_default())
    }

    /// The stricter of two modes: the larger threshold and the functions both allow. Used when
    /// several grants apply to the same caller, so that adding a grant can never loosen another.
    pub fn strictest(&self, other: &AggregateMode) -> AggregateMode {
        AggregateMode {
            min_units: self.min_units.max(other.min_units),
            functions: self
                .functions
                .intersection(&other.functions)
                .copied()
                .collect(),
            filter_measures: self
                .filter_measures
                .intersection(&other.filter_measures)
                .cloned()
                .collect(),
            expression_arguments: self.expression_arguments && other.expression_arguments,
            // Exact only where every grant that applies says so.
            exact: self.exact && other.exact,
            // A grant without differential privacy does not take it away from one that has it:
            // whichever applies, its parameters are those of a query over both (`DpMode::joined`).
            dp: match (&self.dp, &other.dp) {
                (Some(a), Some(b)) => Some(a.joined(b)),
                (a, b) => a.clone().or_else(|| b.clone()),
            },
        }
    }
}

/// Mode `template`: the grantee may run owner-approved SQL templates over the dataset. Each
/// template's own mode (aggregate with its `min_units`, or scoring) is bound to its hash; the
/// grant sets the floor and the purposes scoring templates may serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateMode {
    /// The least `min_units` an aggregate template over this dataset may declare.
    pub min_units: u64,
    /// Purposes a scoring template may serve (none: aggregate templates only).
    pub purposes: BTreeSet<String>,
}

impl TemplateMode {
    /// The stricter of two modes: the larger floor, the purposes both allow.
    pub fn strictest(&self, other: &TemplateMode) -> TemplateMode {
        TemplateMode {
            min_units: self.min_units.max(other.min_units),
            purposes: self
                .purposes
                .intersection(&other.purposes)
                .cloned()
                .collect(),
        }
    }
}

/// Who a grant is given to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    Principal(String),
    Org(String),
    Role(PrincipalRole),
}

impl Grantee {
    pub fn matches(&self, principal: &Principal) -> bool {
        match self {
            Grantee::Principal(id) => *id == principal.id,
            Grantee::Org(org) => *org == principal.org,
            Grantee::Role(role) => principal.roles.contains(role),
        }
    }
}

/// A grant of modes on one dataset, given by the dataset's owner.
#[derive(Debug, Clone)]
pub struct Grant {
    pub dataset: String,
    pub grantee: Grantee,
    pub aggregate: Option<AggregateMode>,
    pub template: Option<TemplateMode>,
    pub wasm: Option<WasmMode>,
    pub location: Location,
}

/// Mode `wasm`: owner-approved code may read the dataset's rows inside the sandbox, for these
/// purposes, and only these columns (all visible ones when unset). Which module, which columns
/// exactly, the output contract and the run limits are set by each approval, within this ceiling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmMode {
    pub purposes: BTreeSet<String>,
    pub columns: Option<BTreeSet<String>>,
}

impl WasmMode {
    /// The stricter of two modes: the purposes and columns both allow.
    pub fn strictest(&self, other: &WasmMode) -> WasmMode {
        WasmMode {
            purposes: self
                .purposes
                .intersection(&other.purposes)
                .cloned()
                .collect(),
            columns: match (&self.columns, &other.columns) {
                (None, None) => None,
                (Some(c), None) | (None, Some(c)) => Some(c.clone()),
                (Some(a), Some(b)) => Some(a.intersection(b).cloned().collect()),
            },
        }
    }

    /// Whether the mode lets code read this column for this purpose.
    pub fn allows(&self, column: &str, purpose: &str) -> bool {
        self.purposes.contains(purpose) && self.columns.as_ref().is_none_or(|c| c.contains(column))
    }
}

/// Roles of principals; each RPC requires one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PrincipalRole {
    /// Runs ad-hoc aggregate SQL.
    Analyst,
    /// A data consumer such as a bank: aggregate SQL, later scoring jobs.
    Consumer,
    /// A data-owning department.
    Owner,
    /// Reads the audit journal; never data.
    Auditor,
    /// Operates the service; never data.
    Admin,
}

impl PrincipalRole {
    pub const ALL: [PrincipalRole; 5] = [
        PrincipalRole::Analyst,
        PrincipalRole::Consumer,
        PrincipalRole::Owner,
        PrincipalRole::Auditor,
        PrincipalRole::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalRole::Analyst => "analyst",
            PrincipalRole::Consumer => "consumer",
            PrincipalRole::Owner => "owner",
            PrincipalRole::Auditor => "auditor",
            PrincipalRole::Admin => "admin",
        }
    }
}

impl FromStr for PrincipalRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PrincipalRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown principal role `{s}` (expected one of {})",
                    PrincipalRole::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}

/// An authenticated caller. Only the authentication layer creates these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub org: String,
    pub roles: BTreeSet<PrincipalRole>,
}

impl Principal {
    pub fn has_any_role(&self, roles: &[PrincipalRole]) -> bool {
        roles.iter().any(|r| self.roles.contains(r))
    }
}

/// Every dataset and grant in force.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    pub datasets: BTreeMap<String, DatasetPolicy>,
    pub grants: Vec<Grant>,
}

impl PolicySet {
    pub fn dataset(&self, id: &str) -> Option<&DatasetPolicy> {
        self.datasets.get(id)
    }

    /// The aggregate mode the principal holds on a dataset, or `None` when no grant gives it.
    /// Where several grants apply, the strictest combination wins.
    pub fn aggregate_mode(&self, principal: &Principal, dataset: &str) -> Option<AggregateMode> {
        self.grants
            .iter()
            .filter(|g| g.dataset == dataset && g.grantee.matches(principal))
            .filter_map(|g| g.aggregate.as_ref())
            .fold(None, |acc: Option<AggregateMode>, mode| match acc {
                None => Some(mode.clone()),
                Some(prev) => Some(prev.strictest(mode)),
            })
    }

    /// The template mode the principal holds on a dataset; the strictest combination where
    /// several grants apply.
    pub fn template_mode(&self, principal: &Principal, dataset: &str) -> Option<TemplateMode> {
        self.grants
            .iter()
            .filter(|g| g.dataset == dataset && g.grantee.matches(principal))
            .filter_map(|g| g.template.as_ref())
            .fold(None, |acc: Option<TemplateMode>, mode| match acc {
                None => Some(mode.clone()),
                Some(prev) => Some(prev.strictest(mode)),
            })
    }

    /// The wasm mode the principal (or its org) holds on a dataset; the strictest combination
    /// where several grants apply.
    pub fn wasm_mode(&self, principal: &Principal, dataset: &str) -> Option<WasmMode> {
        self.grants
            .iter()
            .filter(|g| g.dataset == dataset && g.grantee.matches(principal))
            .filter_map(|g| g.wasm.as_ref())
            .fold(None, |acc: Option<WasmMode>, mode| match acc {
                None => Some(mode.clone()),
                Some(prev) => Some(prev.strictest(mode)),
            })
    }

    /// Datasets the principal holds any mode on, in id order. A dataset without a grant is
    /// invisible to everyone but its owner.
    pub fn granted_datasets<'a>(
        &'a self,
        principal: &'a Principal,
    ) -> impl Iterator<Item = &'a DatasetPolicy> + 'a {
        self.datasets.values().filter(move |d| {
            self.grants
                .iter()
                .any(|g| g.dataset == d.id && g.grantee.matches(principal))
        })
    }

    /// Marks every aggregate grant exact where its dataset allows it (below L4, with a row key):
    /// the policy as it would be if every owner chose exact answers. The suites that exercise the
    /// exact guard and gate (the SQL tests, the fuzz oracle, the policy suite, the adversary's
    /// exact profile) run against it.
    pub fn mark_exact_where_allowed(&mut self) {
        for grant in &mut self.grants {
            let allowed = self
                .datasets
                .get(&grant.dataset)
                .is_some_and(|d| d.level() < Level::L4 && !d.row_key.is_empty());
            if let Some(mode) = grant.aggregate.as_mut()
                && allowed
            {
                mode.exact = true;
            }
        }
    }

    /// Datasets owned by the principal's org, when the principal has the owner role.
    pub fn owned_datasets<'a>(
        &'a self,
        principal: &'a Principal,
    ) -> impl Iterator<Item = &'a DatasetPolicy> + 'a {
        let is_owner = principal.roles.contains(&PrincipalRole::Owner);
        self.datasets_of_org(&principal.org)
            .filter(move |_| is_owner)
    }

    /// Datasets whose owner is `org`, whatever the role of whoever asks.
    pub fn datasets_of_org<'a>(
        &'a self,
        org: &'a str,
    ) -> impl Iterator<Item = &'a DatasetPolicy> + 'a {
        self.datasets.values().filter(move |d| d.owner == org)
    }
}

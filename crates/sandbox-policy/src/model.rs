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
/// it may be used in; see [`Level::allows_role`] and [`Level::allows_ad_hoc_aggregate`].
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

impl Level {
    /// The level-cap table. L4 values may never be shown or grouped on: an L4 column is either
    /// hidden or a measure that only differential privacy or approved code may touch.
    pub fn allows_role(self, role: Role) -> bool {
        match self {
            Level::L1 | Level::L2 | Level::L3 => true,
            Level::L4 => matches!(role, Role::Measure | Role::Hidden),
        }
    }

    /// Whether a column of this level may be used in ad-hoc aggregate SQL without differential
    /// privacy. L4 needs DP or approved code, neither of which is an ad-hoc aggregate.
    pub fn allows_ad_hoc_aggregate(self) -> bool {
        self != Level::L4
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
    /// The privacy unit: never output, grouped on or compared; only `COUNT(DISTINCT ...)`.
    Identifier,
    /// May be output, grouped by and filtered on.
    Dimension,
    /// Only as the plain argument of an allowed aggregate function.
    Measure,
    /// Unusable: not even visible in the consumer's catalog.
    Hidden,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Identifier => "identifier",
            Role::Dimension => "dimension",
            Role::Measure => "measure",
            Role::Hidden => "hidden",
        }
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "identifier" => Ok(Role::Identifier),
            "dimension" => Ok(Role::Dimension),
            "measure" => Ok(Role::Measure),
            "hidden" => Ok(Role::Hidden),
            other => Err(format!(
                "unknown role `{other}` (expected identifier, dimension, measure or hidden)"
            )),
        }
    }
}

/// One declared column of a dataset.
#[derive(Debug, Clone)]
pub struct ColumnPolicy {
    pub name: String,
    pub level: Level,
    pub role: Role,
    pub description: String,
    pub location: Location,
}

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
    pub location: Location,
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

/// Mode `aggregate`: ad-hoc aggregate SQL whose every output row covers at least `min_units`
/// distinct privacy units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregateMode {
    pub min_units: u64,
    pub functions: BTreeSet<AggregateFunction>,
}

impl AggregateMode {
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

    /// Datasets owned by the principal's org, when the principal has the owner role.
    pub fn owned_datasets<'a>(
        &'a self,
        principal: &'a Principal,
    ) -> impl Iterator<Item = &'a DatasetPolicy> + 'a {
        let is_owner = principal.roles.contains(&PrincipalRole::Owner);
        self.datasets
            .values()
            .filter(move |d| is_owner && d.owner == principal.org)
    }
}

//! Records that change while the sandbox runs: uploaded modules, owners' approvals with their
//! output contracts, rejections, consents and runs. They are written to the audit journal (the
//! system of record) and folded into a [`Registry`] at start, so nothing here is lost on restart.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use crate::templates::{TemplateApproval, TemplateRecord};

/// The constraint on one output column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FieldKind {
    /// A 64-bit integer in `min..=max`.
    Int { min: i64, max: i64 },
    /// A finite 64-bit float in `min..=max`, rounded by the gate to `decimals` places so that
    /// low-order bits cannot carry data.
    Float { min: f64, max: f64, decimals: u32 },
    /// A string from a fixed list.
    Enum { values: Vec<String> },
}

/// One output column of a contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContractField {
    pub name: String,
    #[serde(flatten)]
    pub kind: FieldKind,
}

/// The output contract of an approval, enforced by the release gate on a guest's output: the
/// exact schema `key` (Utf8) followed by `fields`, one row per entity keyed by the privacy unit,
/// only entities consented to the consumer for `purpose`, every value within its bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    pub purpose: String,
    /// The output column holding the privacy unit (e.g. `credit_code`).
    pub key: String,
    pub fields: Vec<ContractField>,
    /// Most rows one run may release.
    pub max_rows: u64,
}

/// TOML form of a contract (`sandbox module approve --contract FILE`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContract {
    purpose: String,
    key: String,
    #[serde(default = "default_max_rows")]
    max_rows: u64,
    field: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    min: Option<toml::Value>,
    max: Option<toml::Value>,
    decimals: Option<u32>,
    values: Option<Vec<String>>,
}

impl RawField {
    fn into_field(self) -> Result<ContractField, String> {
        let name = self.name;
        let int = |v: &Option<toml::Value>, what: &str| match v {
            Some(toml::Value::Integer(i)) => Ok(*i),
            _ => Err(format!("field `{name}`: `{what}` must be an integer")),
        };
        let float = |v: &Option<toml::Value>, what: &str| match v {
            Some(toml::Value::Integer(i)) => Ok(*i as f64),
            Some(toml::Value::Float(f)) => Ok(*f),
            _ => Err(format!("field `{name}`: `{what}` must be a number")),
        };
        let kind = match self.kind.as_str() {
            "int" if self.decimals.is_none() && self.values.is_none() => FieldKind::Int {
                min: int(&self.min, "min")?,
                max: int(&self.max, "max")?,
            },
            "float" if self.values.is_none() => FieldKind::Float {
                min: float(&self.min, "min")?,
                max: float(&self.max, "max")?,
                decimals: self
                    .decimals
                    .ok_or_else(|| format!("field `{name}`: a float needs `decimals`"))?,
            },
            "enum" if self.min.is_none() && self.max.is_none() && self.decimals.is_none() => {
                FieldKind::Enum {
                    values: self
                        .values
                        .ok_or_else(|| format!("field `{name}`: an enum needs `values`"))?,
                }
            }
            "int" | "float" | "enum" => {
                return Err(format!(
                    "field `{name}`: int takes min and max; float takes min, max and decimals; \
                     enum takes values"
                ));
            }
            other => {
                return Err(format!(
                    "field `{name}`: unknown type `{other}` (expected int, float or enum)"
                ));
            }
        };
        Ok(ContractField { name, kind })
    }
}

fn default_max_rows() -> u64 {
    1_000_000
}

/// Most fields a contract may declare: outputs stay narrow, so a module cannot smuggle raw values
/// out through wide rows.
pub const MAX_CONTRACT_FIELDS: usize = 8;
/// Most values an enum field may list.
pub const MAX_ENUM_VALUES: usize = 64;

impl Contract {
    /// The scoring contract used when an owner approves without one: an integer score 0-1000 and
    /// a grade A-E per entity.
    pub fn default_scoring(key: &str, purpose: &str) -> Contract {
        Contract {
            purpose: purpose.to_string(),
            key: key.to_string(),
            fields: vec![
                ContractField {
                    name: "score".into(),
                    kind: FieldKind::Int { min: 0, max: 1000 },
                },
                ContractField {
                    name: "grade".into(),
                    kind: FieldKind::Enum {
                        values: ["A", "B", "C", "D", "E"].map(String::from).to_vec(),
                    },
                },
            ],
            max_rows: default_max_rows(),
        }
    }

    /// Parses and validates a contract written in TOML.
    pub fn from_toml(text: &str) -> Result<Contract, String> {
        let raw: RawContract = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let contract = Contract {
            purpose: raw.purpose,
            key: raw.key,
            fields: raw
                .field
                .into_iter()
                .map(RawField::into_field)
                .collect::<Result<_, _>>()?,
            max_rows: raw.max_rows,
        };
        contract.validate()?;
        Ok(contract)
    }

    /// The checks that make a contract enforceable: named fields, distinct names, sane bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.purpose.trim().is_empty() || self.key.trim().is_empty() {
            return Err("a contract names a purpose and a key column".into());
        }
        if self.fields.is_empty() || self.fields.len() > MAX_CONTRACT_FIELDS {
            return Err(format!(
                "a contract declares 1 to {MAX_CONTRACT_FIELDS} fields besides the key"
            ));
        }
        if self.max_rows == 0 {
            return Err("max_rows must be positive".into());
        }
        let mut names = BTreeSet::from([self.key.as_str()]);
        for field in &self.fields {
            if !names.insert(field.name.as_str()) {
                return Err(format!("field `{}` is declared twice", field.name));
            }
            match &field.kind {
                FieldKind::Int { min, max } if min > max => {
                    return Err(format!("field `{}`: min exceeds max", field.name));
                }
                FieldKind::Float { min, max, decimals } => {
                    if !(min.is_finite() && max.is_finite() && min <= max) {
                        return Err(format!("field `{}`: bounds must be finite", field.name));
                    }
                    if *decimals > 6 {
                        return Err(format!("field `{}`: at most 6 decimals", field.name));
                    }
                }
                FieldKind::Enum { values } => {
                    if values.is_empty() || values.len() > MAX_ENUM_VALUES {
                        return Err(format!(
                            "field `{}`: 1 to {MAX_ENUM_VALUES} values",
                            field.name
                        ));
                    }
                }
                FieldKind::Int { .. } => {}
            }
        }
        Ok(())
    }
}

/// A module as uploaded: its hash and what its manifest declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub sha256: String,
    pub name: String,
    pub purpose: String,
    /// Columns its input may read, as `dataset.column`.
    pub input: Vec<String>,
    /// The input query it declares (its `sandbox.input` section): what every run reads, part
    /// of the bytes the owners approve. Empty for a module recorded before inputs were bound,
    /// which cannot run.
    #[serde(default)]
    pub input_query: String,
    /// The consumer org that uploaded it; approvals are for this org only.
    pub org: String,
    pub uploaded_by: String,
    pub size: u64,
    pub uploaded_at: u64,
}

impl ModuleRecord {
    /// Datasets the declared input reads.
    pub fn datasets(&self) -> BTreeSet<String> {
        self.input
            .iter()
            .filter_map(|c| c.split_once('.').map(|(d, _)| d.to_string()))
            .collect()
    }
}

/// One owner's approval of a module, for the owner's datasets among its declared input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    pub sha256: String,
    /// The approving owner org.
    pub org: String,
    pub approved_by: String,
    /// The owner's datasets it covers.
    pub datasets: Vec<String>,
    /// The columns of those datasets the module may read, as `dataset.column`.
    pub columns: Vec<String>,
    pub contract: Contract,
    pub max_runs: u64,
    /// Unix seconds.
    pub expires_at: u64,
    pub approved_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub sha256: String,
    pub org: String,
    pub rejected_by: String,
    pub reason: String,
}

/// Which enterprise (privacy unit value) authorized which consumer org, for what purpose, when.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConsentKey {
    pub unit: String,
    pub consumer_org: String,
    pub purpose: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    #[serde(flatten)]
    pub key: ConsentKey,
    /// Unix seconds.
    pub granted_at: u64,
    pub expires_at: u64,
}

impl Consent {
    /// Whether the consent covers runs at `now`: granted, and not yet expired. The one test both
    /// the runs ([`Registry::consented`]) and the listings' status use.
    pub fn in_force(&self, now: u64) -> bool {
        self.granted_at <= now && now < self.expires_at
    }
}

/// A state change, as stored in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    ModuleUploaded(ModuleRecord),
    ModuleApproved(Approval),
    ModuleRejected(Rejection),
    ConsentAdded(Consent),
    ConsentRevoked {
        key: ConsentKey,
        revoked_at: u64,
    },
    /// A run of a module was admitted (counted against the approvals' run limits).
    ModuleRun {
        sha256: String,
    },
    /// Seed data (e.g. the demo consents) was loaded completely; it is not loaded again.
    SeedLoaded {
        source: String,
        count: u64,
    },
    TemplateSubmitted(TemplateRecord),
    TemplateApproved(TemplateApproval),
    TemplateRun {
        sha256: String,
    },
    /// A query under differential privacy was admitted: its epsilon and delta are spent on
    /// every dataset it reads, for the consumer org. Recorded before it executes, so a crash
    /// never refunds a debit.
    BudgetDebit {
        org: String,
        datasets: Vec<String>,
        epsilon: f64,
        delta: f64,
    },
    /// A dataset's owner renewed a consumer org's budget on it (or, with `org` [`ALL_ORGS`], the
    /// dataset's total over all consumers): what was spent before counts no more. Never
    /// automatic: every renewal is one of these, with who and why.
    BudgetRefreshed {
        org: String,
        dataset: String,
        by: String,
        reason: String,
    },
}

/// The `org` of a renewal of a dataset's total over every consumer.
pub const ALL_ORGS: &str = "*";

/// What a consumer org has spent of its privacy budget on one dataset since its last renewal.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BudgetSpent {
    pub epsilon: f64,
    pub delta: f64,
    /// Queries debited.
    pub queries: u64,
    /// Renewals so far.
    pub refreshes: u64,
}

/// Why a module may not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownModule,
    UnknownTemplate {
        name: String,
    },
    /// Uploaded by another org: approvals are for the uploader's org only.
    NotYours,
    Rejected {
        org: String,
        reason: String,
    },
    /// Owners whose approval is missing.
    AwaitingApproval {
        orgs: Vec<String>,
    },
    Expired {
        org: String,
    },
    RunsExhausted {
        max_runs: u64,
    },
    /// Owners approved different contracts; nothing can be enforced until they agree.
    ContractsDiffer,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::UnknownModule => write!(f, "no module with that hash was uploaded"),
            Refusal::UnknownTemplate { name } => {
                write!(f, "your org has submitted no template named `{name}`")
            }
            Refusal::NotYours => write!(f, "the module was uploaded and approved for another org"),
            Refusal::Rejected { org, reason } => write!(f, "rejected by `{org}`: {reason}"),
            Refusal::AwaitingApproval { orgs } => {
                write!(f, "awaiting approval by the owners: {}", orgs.join(", "))
            }
            Refusal::Expired { org } => write!(f, "the approval by `{org}` has expired"),
            Refusal::RunsExhausted { max_runs } => {
                write!(f, "the approved {max_runs} runs are used up")
            }
            Refusal::ContractsDiffer => {
                write!(f, "the owners approved different output contracts")
            }
        }
    }
}

impl Refusal {
    /// Stable rule code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::UnknownModule | Refusal::NotYours | Refusal::AwaitingApproval { .. } => {
                "module-not-approved"
            }
            Refusal::UnknownTemplate { .. } => "template-not-approved",
            Refusal::Rejected { .. } => "module-rejected",
            Refusal::Expired { .. } => "approval-expired",
            Refusal::RunsExhausted { .. } => "runs-exhausted",
            Refusal::ContractsDiffer => "contracts-differ",
        }
    }

    /// The code of a refusal to run a template.
    pub fn template_code(&self) -> &'static str {
        match self {
            Refusal::UnknownModule
            | Refusal::NotYours
            | Refusal::AwaitingApproval { .. }
            | Refusal::UnknownTemplate { .. } => "template-not-approved",
            other => other.code(),
        }
    }
}

/// What the approval check needs of a module's or a template's approvals.
trait OwnerApproval {
    fn org(&self) -> &str;
    fn covers(&self, dataset: &str) -> bool;
    fn expires_at(&self) -> u64;
    fn max_runs(&self) -> u64;
}

/// Both approval types carry the same four fields under the same names.
macro_rules! owner_approval {
    ($($approval:ty),*) => {$(
        impl OwnerApproval for $approval {
            fn org(&self) -> &str {
                &self.org
            }
            fn covers(&self, dataset: &str) -> bool {
                self.datasets.iter().any(|d| d == dataset)
            }
            fn expires_at(&self) -> u64 {
                self.expires_at
            }
            fn max_runs(&self) -> u64 {
                self.max_runs
            }
        }
    )*};
}

owner_approval!(Approval, TemplateApproval);

/// The approvals that let an artifact reading `datasets` run now: every dataset's owner approved
/// it for that dataset, none of those approvals expired, and runs are left under the smallest
/// limit. Returns the approvals used (one per owner) and the runs left.
fn check_approvals<A: OwnerApproval>(
    datasets: impl IntoIterator<Item = String>,
    approvals: Option<&BTreeMap<String, A>>,
    owner_of: impl Fn(&str) -> Option<String>,
    now: u64,
    runs: u64,
) -> Result<(Vec<&A>, u64), Refusal> {
    let (used, missing) = sort_approvals(datasets, approvals, owner_of);
    if !missing.is_empty() {
        return Err(Refusal::AwaitingApproval {
            orgs: missing.into_keys().collect(),
        });
    }
    if let Some(expired) = used.iter().find(|a| a.expires_at() <= now) {
        return Err(Refusal::Expired {
            org: expired.org().to_string(),
        });
    }
    // Reading no dataset means no owner could approve: never runnable.
    if used.is_empty() {
        return Err(Refusal::AwaitingApproval { orgs: Vec::new() });
    }
    let max_runs = used.iter().map(|a| a.max_runs()).min().unwrap_or(0);
    if runs >= max_runs {
        return Err(Refusal::RunsExhausted { max_runs });
    }
    Ok((used, max_runs - runs))
}

/// The approvals an artifact reading `datasets` has (one per owner org), and the owner orgs whose
/// approval is missing, each with its datasets among `datasets`. A dataset the policy no longer
/// knows has no owner who could approve it: it is missing under `(owner of <dataset>)`.
fn sort_approvals<A: OwnerApproval>(
    datasets: impl IntoIterator<Item = String>,
    approvals: Option<&BTreeMap<String, A>>,
    owner_of: impl Fn(&str) -> Option<String>,
) -> (Vec<&A>, BTreeMap<String, BTreeSet<String>>) {
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut used: Vec<&A> = Vec::new();
    for dataset in datasets {
        let owner = owner_of(&dataset).unwrap_or_else(|| format!("(owner of {dataset})"));
        match approvals
            .and_then(|a| a.get(&owner))
            .filter(|a| a.covers(&dataset))
        {
            Some(approval) => {
                if !used.iter().any(|u| u.org() == approval.org()) {
                    used.push(approval);
                }
            }
            None => {
                missing.entry(owner).or_default().insert(dataset);
            }
        }
    }
    (used, missing)
}

/// A template that may run now, and how many runs are left.
#[derive(Debug, Clone, PartialEq)]
pub struct EffectiveTemplate {
    pub template: TemplateRecord,
    pub runs_left: u64,
}

/// What a module may do now: the combination of every owner's approval.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub module: ModuleRecord,
    pub contract: Contract,
    /// Columns the input may read: the union of the owners' approved columns.
    pub columns: BTreeSet<String>,
    pub runs_left: u64,
}

/// Modules, approvals and consents, folded from the journal's records.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    modules: BTreeMap<String, ModuleRecord>,
    /// sha256 -> owner org -> latest approval.
    approvals: BTreeMap<String, BTreeMap<String, Approval>>,
    rejections: BTreeMap<String, BTreeMap<String, Rejection>>,
    runs: BTreeMap<String, u64>,
    consents: BTreeMap<ConsentKey, Consent>,
    seeded: BTreeSet<String>,
    templates: BTreeMap<String, TemplateRecord>,
    /// The newest submission of each (org, name).
    template_names: BTreeMap<(String, String), String>,
    template_approvals: BTreeMap<String, BTreeMap<String, TemplateApproval>>,
    template_runs: BTreeMap<String, u64>,
    /// (consumer org, dataset) -> budget spent since the last renewal.
    budgets: BTreeMap<(String, String), BudgetSpent>,
    /// Dataset -> what every consumer together spent since the last renewal of its total.
    totals: BTreeMap<String, BudgetSpent>,
}

impl Registry {
    /// Applies one record. Records are applied in journal order; a later approval by the same
    /// owner replaces the earlier one (and clears that owner's rejection), a later rejection
    /// withdraws that owner's approval.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::ModuleUploaded(module) => {
                self.modules.entry(module.sha256.clone()).or_insert(module);
            }
            Record::ModuleApproved(approval) => {
                if let Some(r) = self.rejections.get_mut(&approval.sha256) {
                    r.remove(&approval.org);
                }
                self.approvals
                    .entry(approval.sha256.clone())
                    .or_default()
                    .insert(approval.org.clone(), approval);
            }
            Record::ModuleRejected(rejection) => {
                if let Some(a) = self.approvals.get_mut(&rejection.sha256) {
                    a.remove(&rejection.org);
                }
                self.rejections
                    .entry(rejection.sha256.clone())
                    .or_default()
                    .insert(rejection.org.clone(), rejection);
            }
            Record::ConsentAdded(consent) => {
                self.consents.insert(consent.key.clone(), consent);
            }
            Record::ConsentRevoked { key, .. } => {
                self.consents.remove(&key);
            }
            Record::ModuleRun { sha256 } => *self.runs.entry(sha256).or_default() += 1,
            Record::SeedLoaded { source, .. } => {
                self.seeded.insert(source);
            }
            Record::TemplateSubmitted(template) => {
                self.template_names.insert(
                    (template.org.clone(), template.definition.name.clone()),
                    template.sha256.clone(),
                );
                self.templates
                    .entry(template.sha256.clone())
                    .or_insert(template);
            }
            Record::TemplateApproved(approval) => {
                self.template_approvals
                    .entry(approval.sha256.clone())
                    .or_default()
                    .insert(approval.org.clone(), approval);
            }
            Record::TemplateRun { sha256 } => *self.template_runs.entry(sha256).or_default() += 1,
            Record::BudgetDebit {
                org,
                datasets,
                epsilon,
                delta,
            } => {
                for dataset in datasets {
                    for spent in [
                        self.budgets
                            .entry((org.clone(), dataset.clone()))
                            .or_default(),
                        self.totals.entry(dataset).or_default(),
                    ] {
                        spent.epsilon += epsilon;
                        spent.delta += delta;
                        spent.queries += 1;
                    }
                }
            }
            Record::BudgetRefreshed { org, dataset, .. } => {
                let spent = if org == ALL_ORGS {
                    self.totals.entry(dataset).or_default()
                } else {
                    self.budgets.entry((org, dataset)).or_default()
                };
                *spent = BudgetSpent {
                    refreshes: spent.refreshes + 1,
                    ..BudgetSpent::default()
                };
            }
        }
    }

    /// What `org` has spent on `dataset` since the last renewal.
    pub fn budget_spent(&self, org: &str, dataset: &str) -> BudgetSpent {
        self.budgets
            .get(&(org.to_string(), dataset.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// What every consumer together has spent on `dataset` since the last renewal of its total.
    pub fn total_spent(&self, dataset: &str) -> BudgetSpent {
        self.totals.get(dataset).copied().unwrap_or_default()
    }

    /// Every (consumer org, dataset) with a debit or a renewal.
    pub fn budgets(&self) -> impl Iterator<Item = (&(String, String), &BudgetSpent)> {
        self.budgets.iter()
    }

    pub fn template(&self, sha256: &str) -> Option<&TemplateRecord> {
        self.templates.get(sha256)
    }

    /// Every submitted template; a name resubmitted with other content is a new template, and
    /// running by name picks the newest.
    pub fn templates(&self) -> impl Iterator<Item = &TemplateRecord> {
        self.templates.values()
    }

    pub fn template_approvals(&self, sha256: &str) -> impl Iterator<Item = &TemplateApproval> {
        self.template_approvals
            .get(sha256)
            .into_iter()
            .flat_map(|a| a.values())
    }

    pub fn template_runs(&self, sha256: &str) -> u64 {
        self.template_runs.get(sha256).copied().unwrap_or(0)
    }

    /// The owner orgs whose approval a template still lacks, each with its datasets the template
    /// reads (empty for an unknown template, or one every owner approved).
    pub fn template_awaiting(
        &self,
        sha256: &str,
        owner_of: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, BTreeSet<String>> {
        let Some(template) = self.templates.get(sha256) else {
            return BTreeMap::new();
        };
        sort_approvals(
            template.datasets.iter().cloned(),
            self.template_approvals.get(sha256),
            owner_of,
        )
        .1
    }

    /// The owner orgs whose approval a module still lacks, each with its datasets among the
    /// module's declared input (empty for an unknown module, or one every owner approved).
    pub fn module_awaiting(
        &self,
        sha256: &str,
        owner_of: impl Fn(&str) -> Option<String>,
    ) -> BTreeMap<String, BTreeSet<String>> {
        let Some(module) = self.modules.get(sha256) else {
            return BTreeMap::new();
        };
        sort_approvals(module.datasets(), self.approvals.get(sha256), owner_of).1
    }

    /// The newest template of that name submitted by `org`, if every owner of the data it reads
    /// approved it, no approval expired and runs are left.
    pub fn effective_template(
        &self,
        org: &str,
        name: &str,
        now: u64,
        owner_of: impl Fn(&str) -> Option<String>,
    ) -> Result<EffectiveTemplate, Refusal> {
        let template = self
            .template_names
            .get(&(org.to_string(), name.to_string()))
            .and_then(|sha| self.templates.get(sha))
            .ok_or_else(|| Refusal::UnknownTemplate {
                name: name.to_string(),
            })?;
        if template.org != org {
            return Err(Refusal::NotYours);
        }
        let (_, runs_left) = check_approvals(
            template.datasets.iter().cloned(),
            self.template_approvals.get(&template.sha256),
            owner_of,
            now,
            self.template_runs(&template.sha256),
        )?;
        Ok(EffectiveTemplate {
            template: template.clone(),
            runs_left,
        })
    }

    pub fn module(&self, sha256: &str) -> Option<&ModuleRecord> {
        self.modules.get(sha256)
    }

    pub fn modules(&self) -> impl Iterator<Item = &ModuleRecord> {
        self.modules.values()
    }

    pub fn approvals(&self, sha256: &str) -> impl Iterator<Item = &Approval> {
        self.approvals
            .get(sha256)
            .into_iter()
            .flat_map(|a| a.values())
    }

    pub fn rejections(&self, sha256: &str) -> impl Iterator<Item = &Rejection> {
        self.rejections
            .get(sha256)
            .into_iter()
            .flat_map(|r| r.values())
    }

    pub fn runs(&self, sha256: &str) -> u64 {
        self.runs.get(sha256).copied().unwrap_or(0)
    }

    /// Whether the module may run for `org` now, given the owners of its declared datasets
    /// (`owner_of`), and with what contract and columns. Fails closed: a dataset whose owner is
    /// unknown can never be approved.
    pub fn effective(
        &self,
        sha256: &str,
        org: &str,
        now: u64,
        owner_of: impl Fn(&str) -> Option<String>,
    ) -> Result<Effective, Refusal> {
        let module = self.modules.get(sha256).ok_or(Refusal::UnknownModule)?;
        if module.org != org {
            return Err(Refusal::NotYours);
        }
        if let Some(rejection) = self.rejections(sha256).next() {
            return Err(Refusal::Rejected {
                org: rejection.org.clone(),
                reason: rejection.reason.clone(),
            });
        }
        let (used, runs_left) = check_approvals(
            module.datasets(),
            self.approvals.get(sha256),
            owner_of,
            now,
            self.runs(sha256),
        )?;
        let contract = used[0].contract.clone();
        if used.iter().any(|a| a.contract != contract) {
            return Err(Refusal::ContractsDiffer);
        }
        Ok(Effective {
            module: module.clone(),
            contract,
            columns: used
                .iter()
                .flat_map(|a| a.columns.iter().cloned())
                .collect(),
            runs_left,
        })
    }

    /// Units consented to `consumer_org` for `purpose` and valid at `now`.
    pub fn consented(&self, consumer_org: &str, purpose: &str, now: u64) -> HashSet<String> {
        self.consents
            .values()
            .filter(|c| {
                c.key.consumer_org == consumer_org && c.key.purpose == purpose && c.in_force(now)
            })
            .map(|c| c.key.unit.clone())
            .collect()
    }

    pub fn consent(&self, key: &ConsentKey) -> Option<&Consent> {
        self.consents.get(key)
    }

    /// Consents, optionally only those given to one consumer org.
    pub fn consents<'a>(
        &'a self,
        consumer_org: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Consent> {
        self.consents
            .values()
            .filter(move |c| consumer_org.is_none_or(|o| c.key.consumer_org == o))
    }

    /// Whether a seed source was loaded completely.
    pub fn is_seeded(&self, source: &str) -> bool {
        self.seeded.contains(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> ModuleRecord {
        ModuleRecord {
            sha256: "abc".into(),
            name: "m".into(),
            purpose: "credit_assessment".into(),
            input: vec!["tax.credit_code".into(), "court.credit_code".into()],
            input_query: "SELECT credit_code FROM tax".into(),
            org: "bank".into(),
            uploaded_by: "bank".into(),
            size: 1,
            uploaded_at: 0,
        }
    }

    fn approval(org: &str, dataset: &str, expires_at: u64, max_runs: u64) -> Approval {
        Approval {
            sha256: "abc".into(),
            org: org.into(),
            approved_by: org.into(),
            datasets: vec![dataset.into()],
            columns: vec![format!("{dataset}.credit_code")],
            contract: Contract::default_scoring("credit_code", "credit_assessment"),
            max_runs,
            expires_at,
            approved_at: 0,
        }
    }

    fn owner(dataset: &str) -> Option<String> {
        Some(format!("{dataset}_owner"))
    }

    #[test]
    fn every_owner_must_approve_and_limits_apply() {
        let mut r = Registry::default();
        assert_eq!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::UnknownModule)
        );
        r.apply(Record::ModuleUploaded(module()));
        assert_eq!(
            r.effective("abc", "other", 10, owner),
            Err(Refusal::NotYours)
        );
        assert!(matches!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::AwaitingApproval { orgs }) if orgs.len() == 2
        ));
        let awaiting = |r: &Registry| -> Vec<(String, Vec<String>)> {
            r.module_awaiting("abc", owner)
                .into_iter()
                .map(|(org, datasets)| (org, datasets.into_iter().collect()))
                .collect()
        };
        assert_eq!(
            awaiting(&r),
            [
                ("court_owner".to_string(), vec!["court".to_string()]),
                ("tax_owner".to_string(), vec!["tax".to_string()])
            ]
        );
        r.apply(Record::ModuleApproved(approval("tax_owner", "tax", 100, 2)));
        assert_eq!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::AwaitingApproval {
                orgs: vec!["court_owner".into()]
            })
        );
        assert_eq!(
            awaiting(&r),
            [("court_owner".to_string(), vec!["court".to_string()])]
        );
        r.apply(Record::ModuleApproved(approval(
            "court_owner",
            "court",
            50,
            5,
        )));
        assert!(awaiting(&r).is_empty());
        let effective = r.effective("abc", "bank", 10, owner).unwrap();
        assert_eq!(effective.runs_left, 2);
        assert_eq!(effective.columns.len(), 2);
        assert_eq!(
            r.effective("abc", "bank", 50, owner),
            Err(Refusal::Expired {
                org: "court_owner".into()
            })
        );
        r.apply(Record::ModuleRun {
            sha256: "abc".into(),
        });
        r.apply(Record::ModuleRun {
            sha256: "abc".into(),
        });
        assert_eq!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::RunsExhausted { max_runs: 2 })
        );
    }

    #[test]
    fn rejection_withdraws_and_contracts_must_agree() {
        let mut r = Registry::default();
        r.apply(Record::ModuleUploaded(module()));
        r.apply(Record::ModuleApproved(approval("tax_owner", "tax", 100, 2)));
        let mut other = approval("court_owner", "court", 100, 2);
        other.contract.max_rows = 5;
        r.apply(Record::ModuleApproved(other));
        assert_eq!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::ContractsDiffer)
        );
        r.apply(Record::ModuleRejected(Rejection {
            sha256: "abc".into(),
            org: "court_owner".into(),
            rejected_by: "c".into(),
            reason: "no".into(),
        }));
        assert!(matches!(
            r.effective("abc", "bank", 10, owner),
            Err(Refusal::Rejected { .. })
        ));
    }

    #[test]
    fn consents_respect_purpose_expiry_and_revocation() {
        let mut r = Registry::default();
        let key = ConsentKey {
            unit: "u1".into(),
            consumer_org: "bank".into(),
            purpose: "credit_assessment".into(),
        };
        r.apply(Record::ConsentAdded(Consent {
            key: key.clone(),
            granted_at: 10,
            expires_at: 20,
        }));
        assert!(r.consented("bank", "credit_assessment", 15).contains("u1"));
        assert!(r.consented("bank", "marketing", 15).is_empty());
        assert!(r.consented("bank", "credit_assessment", 20).is_empty());
        assert!(r.consented("other", "credit_assessment", 15).is_empty());
        // The listings' status reads the same test: before, during and after.
        let consent = r.consent(&key).expect("added");
        assert_eq!(
            [9, 10, 19, 20].map(|now| consent.in_force(now)),
            [false, true, true, false]
        );
        r.apply(Record::ConsentRevoked {
            key,
            revoked_at: 16,
        });
        assert!(r.consented("bank", "credit_assessment", 15).is_empty());
    }

    #[test]
    fn contracts_parse_strictly() {
        let good = r#"
purpose = "credit_assessment"
key = "credit_code"
[[field]]
name = "score"
type = "int"
min = 0
max = 1000
[[field]]
name = "pd"
type = "float"
min = 0.0
max = 1.0
decimals = 3
"#;
        let contract = Contract::from_toml(good).unwrap();
        assert_eq!(contract.fields.len(), 2);
        for bad in [
            good.replace("max = 1000", "max = -1"),
            good.replace("name = \"pd\"", "name = \"score\""),
            good.replace("decimals = 3", "decimals = 3\nextra = 1"),
            good.replace("type = \"int\"", "type = \"blob\""),
            good.replace("decimals = 3", "decimals = 9"),
        ] {
            assert!(Contract::from_toml(&bad).is_err(), "{bad}");
        }
    }

    fn template(org: &str, sha256: &str) -> TemplateRecord {
        TemplateRecord {
            sha256: sha256.into(),
            definition: crate::templates::TemplateDefinition {
                name: "t".into(),
                description: String::new(),
                sql: "SELECT COUNT(*) FROM tax".into(),
                params: Vec::new(),
                output: crate::templates::TemplateOutput::Aggregate { min_units: 10 },
            },
            datasets: vec!["tax".into()],
            org: org.into(),
            submitted_by: org.into(),
            submitted_at: 0,
        }
    }

    #[test]
    fn template_approvals_bind_to_the_submitting_org() {
        let mut r = Registry::default();
        r.apply(Record::TemplateSubmitted(template("bank_a", "s1")));
        r.apply(Record::TemplateApproved(TemplateApproval {
            sha256: "s1".into(),
            org: "tax_owner".into(),
            approved_by: "tax_owner".into(),
            datasets: vec!["tax".into()],
            max_runs: 1,
            expires_at: 100,
            approved_at: 0,
        }));
        assert_eq!(
            r.effective_template("bank_a", "t", 10, owner)
                .map(|e| e.runs_left),
            Ok(1)
        );
        // Another org never runs it, by name or by submitting a record with the same hash.
        assert!(matches!(
            r.effective_template("bank_b", "t", 10, owner),
            Err(Refusal::UnknownTemplate { .. })
        ));
        r.apply(Record::TemplateSubmitted(template("bank_b", "s1")));
        assert_eq!(
            r.effective_template("bank_b", "t", 10, owner),
            Err(Refusal::NotYours)
        );
        r.apply(Record::TemplateRun {
            sha256: "s1".into(),
        });
        assert_eq!(
            r.effective_template("bank_a", "t", 10, owner),
            Err(Refusal::RunsExhausted { max_runs: 1 })
        );
    }
}

//! Strict loading of policy files. An unknown key, a missing field, an unknown level or role, a
//! column the dataset does not declare, or a grant to an unknown dataset is an error naming the file
//! and line.
//!
//! A policy file is one department's policy: `org = "..."`, the datasets it owns (`[[dataset]]`
//! with `[[dataset.column]]`) and the grants it gives on them (`[[grant]]`). A department can only
//! grant what it owns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{PolicyError, Result};
use crate::model::{
    AggregateFunction, AggregateMode, ColumnPolicy, DatasetPolicy, DpMode, DpTotal, Grant, Grantee,
    Level, Location, MAX_DOMAIN_VALUES, Mask, Mode, PolicySet, PrincipalRole, Role, TemplateMode,
    WasmMode,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    org: Spanned<String>,
    #[serde(default)]
    dataset: Vec<Spanned<RawDataset>>,
    #[serde(default)]
    grant: Vec<Spanned<RawGrant>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    id: Spanned<String>,
    #[serde(default)]
    description: String,
    source: Spanned<Vec<String>>,
    privacy_unit: Spanned<String>,
    /// The columns that identify a row (exact answers need it).
    row_key: Option<Spanned<Vec<String>>>,
    /// The owner's total privacy budget over every consumer.
    dp: Option<Spanned<RawDpTotal>>,
    column: Vec<Spanned<RawColumn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDpTotal {
    total_epsilon: f64,
    total_delta: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawColumn {
    name: Spanned<String>,
    level: Spanned<String>,
    role: Spanned<String>,
    /// The transform of a masked column: `partial`, `pseudonym`, `bucket`, `year` or `month`.
    mask: Option<Spanned<String>>,
    keep_first: Option<u32>,
    keep_last: Option<u32>,
    width: Option<Spanned<i64>>,
    /// `[low, high]` of a measure, for clamping under differential privacy.
    bounds: Option<Spanned<Vec<f64>>>,
    /// Every row of a unit holds the same value.
    #[serde(default)]
    constant_per_unit: bool,
    /// The public list of a dimension's values.
    domain: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGrant {
    dataset: Spanned<String>,
    principal: Option<String>,
    org: Option<String>,
    role: Option<Spanned<String>>,
    aggregate: Option<Spanned<RawAggregate>>,
    template: Option<Spanned<RawTemplate>>,
    wasm: Option<Spanned<RawWasm>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    min_units: Spanned<i64>,
    #[serde(default)]
    purposes: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWasm {
    purposes: Spanned<Vec<String>>,
    columns: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAggregate {
    min_units: Spanned<i64>,
    functions: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    filter_measures: Vec<Spanned<String>>,
    #[serde(default)]
    expression_arguments: bool,
    #[serde(default)]
    exact: Option<Spanned<bool>>,
    dp: Option<Spanned<RawDp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDp {
    epsilon: f64,
    delta: f64,
    budget_epsilon: f64,
    budget_delta: f64,
    #[serde(default = "one")]
    max_rows_per_unit: i64,
    #[serde(default = "one")]
    max_groups_per_unit: i64,
    #[serde(default)]
    required: bool,
}

fn one() -> i64 {
    1
}

/// Loads every `*.toml` file of a directory, in name order.
pub fn load_dir(dir: &Path) -> Result<PolicySet> {
    load_sources(&read_dir_sources(dir)?)
}

/// The (path, text) of every `*.toml` file of a directory, in name order: what [`load_dir`]
/// loads, for callers that also fingerprint it.
pub fn read_dir_sources(dir: &Path) -> Result<Vec<(String, String)>> {
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "toml") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(PolicyError::Empty(dir.to_path_buf()));
    }
    paths.sort();
    let mut sources = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Io {
            path: path.clone(),
            source,
        })?;
        sources.push((path.display().to_string(), text));
    }
    Ok(sources)
}

/// Loads policy files given as (name, text) pairs; the name is used in error messages.
pub fn load_sources(sources: &[(String, String)]) -> Result<PolicySet> {
    let mut parsed = Vec::with_capacity(sources.len());
    for (name, text) in sources {
        let raw: RawFile = toml::from_str(text).map_err(|e| PolicyError::Syntax {
            file: name.clone(),
            line: e.span().map_or(1, |s| line_of(text, s.start)),
            message: e.message().to_string(),
        })?;
        parsed.push((name.as_str(), text.as_str(), raw));
    }

    let mut set = PolicySet::default();
    // Datasets first, from every file, so that grants can be checked against all of them.
    for (file, text, raw) in &parsed {
        let at = |offset: usize| Location {
            file: file.to_string(),
            line: line_of(text, offset),
        };
        check_identifier(raw.org.get_ref(), "org", &at(raw.org.span().start))?;
        for dataset in &raw.dataset {
            let dataset_policy = build_dataset(raw.org.get_ref(), dataset, &at)?;
            if let Some(previous) = set.datasets.get(&dataset_policy.id) {
                return Err(invalid(
                    &dataset_policy.location,
                    format!(
                        "dataset `{}` is already declared at {}",
                        dataset_policy.id, previous.location
                    ),
                ));
            }
            set.datasets
                .insert(dataset_policy.id.clone(), dataset_policy);
        }
    }
    for (file, text, raw) in &parsed {
        let at = |offset: usize| Location {
            file: file.to_string(),
            line: line_of(text, offset),
        };
        for grant in &raw.grant {
            let grant = build_grant(raw.org.get_ref(), grant, &set.datasets, &at)?;
            set.grants.push(grant);
        }
    }
    // A dataset any grant offers differential privacy on has a total over all consumers: without
    // one, every new consumer org would bring a fresh budget to spend on the same enterprises.
    for grant in &set.grants {
        let offers_dp = grant.aggregate.as_ref().is_some_and(|m| m.dp.is_some());
        let dataset = &set.datasets[&grant.dataset];
        if offers_dp && dataset.dp_total.is_none() {
            return Err(invalid(
                &dataset.location,
                format!(
                    "dataset `{}` is offered under differential privacy (grant at line {}) but \
                     sets no total over all consumers: add `[dataset.dp]` with `total_epsilon` \
                     and `total_delta`",
                    dataset.id, grant.location.line
                ),
            ));
        }
    }
    Ok(set)
}

fn build_dataset(
    org: &str,
    raw: &Spanned<RawDataset>,
    at: &dyn Fn(usize) -> Location,
) -> Result<DatasetPolicy> {
    let location = at(raw.span().start);
    let raw = raw.get_ref();
    let id = raw.id.get_ref().clone();
    check_identifier(&id, "dataset id", &at(raw.id.span().start))?;
    let source_location = at(raw.source.span().start);
    if raw.source.get_ref().is_empty() {
        return Err(invalid(
            &source_location,
            format!("dataset `{id}` has no source"),
        ));
    }
    for source in raw.source.get_ref() {
        let path = Path::new(source);
        let escapes = path.is_absolute()
            || path
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)));
        if source.is_empty() || escapes {
            return Err(invalid(
                &source_location,
                format!(
                    "dataset `{id}`: source `{source}` must be a relative path inside the data dir"
                ),
            ));
        }
    }

    let mut columns: Vec<ColumnPolicy> = Vec::with_capacity(raw.column.len());
    for column in &raw.column {
        let column_location = at(column.span().start);
        let column = column.get_ref();
        let name = column.name.get_ref().clone();
        check_identifier(&name, "column name", &column_location)?;
        if let Some(previous) = columns.iter().find(|c| c.name == name) {
            return Err(invalid(
                &column_location,
                format!(
                    "column `{name}` of dataset `{id}` is already declared at line {}",
                    previous.location.line
                ),
            ));
        }
        let level: Level = column
            .level
            .get_ref()
            .parse()
            .map_err(|m| invalid(&at(column.level.span().start), m))?;
        let role: Role = column
            .role
            .get_ref()
            .parse()
            .map_err(|m| invalid(&at(column.role.span().start), m))?;
        if !level.allows_role(role) {
            return Err(invalid(
                &at(column.role.span().start),
                format!(
                    "column `{name}` of dataset `{id}`: level {} does not allow role `{}` ({})",
                    level.as_str(),
                    role.as_str(),
                    level.role_cap_reason()
                ),
            ));
        }
        let mask = build_mask(column, role, &name, &column_location, at)?;
        let bounds = match &column.bounds {
            None => None,
            Some(bounds) => {
                let location = at(bounds.span().start);
                if role != Role::Measure {
                    return Err(invalid(
                        &location,
                        format!("column `{name}`: only a measure has `bounds`"),
                    ));
                }
                match bounds.get_ref().as_slice() {
                    &[low, high] if low.is_finite() && high.is_finite() && low < high => {
                        Some((low, high))
                    }
                    _ => {
                        return Err(invalid(
                            &location,
                            format!(
                                "column `{name}`: bounds are `[low, high]`, two finite numbers \
                                 with low < high"
                            ),
                        ));
                    }
                }
            }
        };
        if column.constant_per_unit && matches!(role, Role::Identifier | Role::Hidden) {
            return Err(invalid(
                &column_location,
                format!(
                    "column `{name}`: `constant_per_unit` describes a column a query can group \
                     by, not the privacy unit or a hidden column"
                ),
            ));
        }
        let domain = match &column.domain {
            None => Vec::new(),
            Some(values) => {
                let location = at(values.span().start);
                let values = values.get_ref();
                let distinct: BTreeSet<&String> = values.iter().collect();
                if role != Role::Dimension {
                    return Err(invalid(
                        &location,
                        format!("column `{name}`: only a dimension has a public `domain`"),
                    ));
                }
                if values.is_empty()
                    || values.len() > MAX_DOMAIN_VALUES
                    || distinct.len() != values.len()
                {
                    return Err(invalid(
                        &location,
                        format!(
                            "column `{name}`: a domain lists 1 to {MAX_DOMAIN_VALUES} distinct \
                             values"
                        ),
                    ));
                }
                values.clone()
            }
        };
        columns.push(ColumnPolicy {
            name,
            level,
            role,
            mask,
            bounds,
            domain,
            constant_per_unit: column.constant_per_unit,
            description: column.description.clone(),
            location: column_location,
        });
    }

    let unit = raw.privacy_unit.get_ref();
    let unit_location = at(raw.privacy_unit.span().start);
    match columns.iter().find(|c| &c.name == unit) {
        None => {
            return Err(invalid(
                &unit_location,
                format!("dataset `{id}`: privacy unit `{unit}` is not a declared column"),
            ));
        }
        Some(c) if c.role != Role::Identifier => {
            return Err(invalid(
                &unit_location,
                format!(
                    "dataset `{id}`: privacy unit `{unit}` must have role `identifier`, not `{}`",
                    c.role.as_str()
                ),
            ));
        }
        Some(_) => {}
    }
    if let Some(other) = columns
        .iter()
        .find(|c| c.role == Role::Identifier && &c.name != unit)
    {
        return Err(invalid(
            &other.location,
            format!(
                "dataset `{id}`: column `{}` has role `identifier` but only the privacy unit \
                 `{unit}` may",
                other.name
            ),
        ));
    }

    let row_key = match &raw.row_key {
        None => Vec::new(),
        Some(key) => {
            let key_location = at(key.span().start);
            if key.get_ref().is_empty() {
                return Err(invalid(
                    &key_location,
                    format!("dataset `{id}`: row_key names no column"),
                ));
            }
            for name in key.get_ref() {
                let usable = columns
                    .iter()
                    .find(|c| &c.name == name)
                    .is_some_and(|c| !matches!(c.role, Role::Hidden | Role::Measure));
                if !usable {
                    return Err(invalid(
                        &key_location,
                        format!(
                            "dataset `{id}`: row_key column `{name}` must be a declared column \
                             that is neither hidden nor a measure"
                        ),
                    ));
                }
            }
            key.get_ref().clone()
        }
    };
    let dp_total = match &raw.dp {
        None => None,
        Some(total) => {
            let total_location = at(total.span().start);
            let total = total.get_ref();
            if !(total.total_epsilon.is_finite() && total.total_epsilon > 0.0) {
                return Err(invalid(
                    &total_location,
                    format!(
                        "dataset `{id}`: dp.total_epsilon must be a positive finite number, got {}",
                        total.total_epsilon
                    ),
                ));
            }
            if !(total.total_delta.is_finite()
                && total.total_delta > 0.0
                && total.total_delta < 1e-3)
            {
                return Err(invalid(
                    &total_location,
                    format!(
                        "dataset `{id}`: dp.total_delta must be above 0 and below 0.001, got {}",
                        total.total_delta
                    ),
                ));
            }
            Some(DpTotal {
                epsilon: total.total_epsilon,
                delta: total.total_delta,
            })
        }
    };

    Ok(DatasetPolicy {
        id,
        owner: org.to_string(),
        description: raw.description.clone(),
        source: raw.source.get_ref().clone(),
        privacy_unit: unit.clone(),
        columns,
        row_key,
        dp_total,
        location,
    })
}

/// The transform of a masked column; the mask keys are refused on any other role.
fn build_mask(
    column: &RawColumn,
    role: Role,
    name: &str,
    location: &Location,
    at: &dyn Fn(usize) -> Location,
) -> Result<Option<Mask>> {
    let Some(kind) = &column.mask else {
        if role == Role::Masked {
            return Err(invalid(
                location,
                format!(
                    "masked column `{name}` needs `mask` (partial, pseudonym, bucket, year or month)"
                ),
            ));
        }
        if column.keep_first.is_some() || column.keep_last.is_some() || column.width.is_some() {
            return Err(invalid(
                location,
                format!("column `{name}`: keep_first, keep_last and width belong to a `mask`"),
            ));
        }
        return Ok(None);
    };
    let mask_location = at(kind.span().start);
    if role != Role::Masked {
        return Err(invalid(
            &mask_location,
            format!(
                "column `{name}` has a mask but role `{}`; use role `masked`",
                role.as_str()
            ),
        ));
    }
    let partial = column.keep_first.is_some() || column.keep_last.is_some();
    let mask = match kind.get_ref().as_str() {
        "partial" if column.width.is_none() => {
            let keep_first = column.keep_first.unwrap_or(0);
            let keep_last = column.keep_last.unwrap_or(0);
            if keep_first + keep_last == 0 || keep_first + keep_last > 8 {
                return Err(invalid(
                    &mask_location,
                    format!(
                        "column `{name}`: a partial mask keeps 1 to 8 characters in all \
                         (keep_first + keep_last)"
                    ),
                ));
            }
            Mask::Partial {
                keep_first,
                keep_last,
            }
        }
        "bucket" if !partial => {
            let width = column.width.as_ref().ok_or_else(|| {
                invalid(
                    &mask_location,
                    format!("column `{name}`: a bucket mask needs a positive `width`"),
                )
            })?;
            let value = *width.get_ref();
            if value <= 0 {
                return Err(invalid(
                    &at(width.span().start),
                    format!("column `{name}`: bucket width must be positive, got {value}"),
                ));
            }
            Mask::Bucket {
                width: value.unsigned_abs(),
            }
        }
        "pseudonym" | "year" | "month" if !partial && column.width.is_none() => {
            match kind.get_ref().as_str() {
                "pseudonym" => Mask::Pseudonym,
                "year" => Mask::Year,
                _ => Mask::Month,
            }
        }
        "partial" | "bucket" | "pseudonym" | "year" | "month" => {
            return Err(invalid(
                &mask_location,
                format!(
                    "column `{name}`: keep_first/keep_last go with `partial`, width with \
                     `bucket`; pseudonym, year and month take no parameter"
                ),
            ));
        }
        other => {
            return Err(invalid(
                &mask_location,
                format!(
                    "column `{name}`: unknown mask `{other}` (expected partial, pseudonym, \
                     bucket, year or month)"
                ),
            ));
        }
    };
    Ok(Some(mask))
}

fn build_grant(
    org: &str,
    raw: &Spanned<RawGrant>,
    datasets: &BTreeMap<String, DatasetPolicy>,
    at: &dyn Fn(usize) -> Location,
) -> Result<Grant> {
    let location = at(raw.span().start);
    let raw = raw.get_ref();
    let dataset_id = raw.dataset.get_ref();
    let dataset_location = at(raw.dataset.span().start);
    let Some(dataset) = datasets.get(dataset_id) else {
        return Err(invalid(
            &dataset_location,
            format!("grant to unknown dataset `{dataset_id}`"),
        ));
    };
    if dataset.owner != org {
        return Err(invalid(
            &dataset_location,
            format!(
                "grant on dataset `{dataset_id}` owned by `{}`: only the owning org `{}` may grant it",
                dataset.owner, dataset.owner
            ),
        ));
    }

    let grantee = match (&raw.principal, &raw.org, &raw.role) {
        (Some(p), None, None) => Grantee::Principal(p.clone()),
        (None, Some(o), None) => Grantee::Org(o.clone()),
        (None, None, Some(r)) => Grantee::Role(
            r.get_ref()
                .parse::<PrincipalRole>()
                .map_err(|m| invalid(&at(r.span().start), m))?,
        ),
        _ => {
            return Err(invalid(
                &location,
                "a grant names exactly one of `principal`, `org` or `role`".to_string(),
            ));
        }
    };

    let aggregate = match &raw.aggregate {
        None => None,
        Some(mode) => {
            let mode_location = at(mode.span().start);
            let mode = mode.get_ref();
            let min_units = checked_min_units(&mode.min_units, at)?;
            let functions: BTreeSet<AggregateFunction> = match &mode.functions {
                None => AggregateFunction::DEFAULT.into_iter().collect(),
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for name in list {
                        set.insert(
                            name.get_ref()
                                .parse::<AggregateFunction>()
                                .map_err(|m| invalid(&at(name.span().start), m))?,
                        );
                    }
                    set
                }
            };
            if functions.is_empty() {
                return Err(invalid(
                    &mode_location,
                    "aggregate mode allows no function".to_string(),
                ));
            }
            let mut filter_measures = BTreeSet::new();
            for name in &mode.filter_measures {
                let column = dataset.column(name.get_ref());
                let reason = match column {
                    None => Some(format!(
                        "`{}` is not a column of `{dataset_id}`",
                        name.get_ref()
                    )),
                    Some(c) if c.role != Role::Measure => Some(format!(
                        "`{}` is a {}, not a measure",
                        c.name,
                        c.role.as_str()
                    )),
                    Some(c) if !c.level.allows_mode(Mode::Aggregate) => Some(format!(
                        "measure `{}` is {}: the level allows no use in {}, so no filter on it",
                        c.name,
                        c.level.as_str(),
                        Mode::Aggregate.as_str()
                    )),
                    Some(_) => None,
                };
                if let Some(reason) = reason {
                    return Err(invalid(&at(name.span().start), reason));
                }
                filter_measures.insert(name.get_ref().clone());
            }
            let dp = match &mode.dp {
                None => None,
                Some(dp) => Some(dp_mode(dp.get_ref(), &at(dp.span().start))?),
            };
            let exact = match &mode.exact {
                Some(exact) if *exact.get_ref() => {
                    let exact_location = at(exact.span().start);
                    if dataset.level() >= Level::L4 {
                        return Err(invalid(
                            &exact_location,
                            format!(
                                "dataset `{dataset_id}` is L4: its ad-hoc answers are always \
                                 differentially private, a grant cannot make them exact"
                            ),
                        ));
                    }
                    if dataset.row_key.is_empty() {
                        return Err(invalid(
                            &exact_location,
                            format!(
                                "an exact grant needs the dataset's `row_key`: the differencing \
                                 defense of exact answers tells rows of `{dataset_id}` apart by it"
                            ),
                        ));
                    }
                    true
                }
                _ => false,
            };
            if dataset.private_by_default() && !exact && dp.is_none() {
                return Err(invalid(
                    &mode_location,
                    format!(
                        "dataset `{dataset_id}` is {}: ad-hoc SQL on it is answered under \
                         differential privacy unless the grant is exact; add \
                         `[grant.aggregate.dp]`, or `exact = true` if you accept exact answers \
                         to freely chosen questions (see README, What the sandbox promises)",
                        dataset.level().as_str()
                    ),
                ));
            }
            Some(AggregateMode {
                min_units,
                functions,
                filter_measures,
                expression_arguments: mode.expression_arguments,
                exact,
                dp,
            })
        }
    };
    let wasm = match &raw.wasm {
        None => None,
        Some(mode) => {
            let mode = mode.get_ref();
            let purposes: BTreeSet<String> = mode.purposes.get_ref().iter().cloned().collect();
            if purposes.is_empty() {
                return Err(invalid(
                    &at(mode.purposes.span().start),
                    "wasm mode names no purpose".to_string(),
                ));
            }
            for purpose in &purposes {
                check_identifier(purpose, "purpose", &at(mode.purposes.span().start))?;
            }
            let columns = match &mode.columns {
                None => None,
                Some(list) => {
                    let mut set = BTreeSet::new();
                    for name in list {
                        let visible = dataset
                            .column(name.get_ref())
                            .is_some_and(|c| c.role != Role::Hidden);
                        if !visible {
                            return Err(invalid(
                                &at(name.span().start),
                                format!(
                                    "`{}` is not a visible column of `{dataset_id}`",
                                    name.get_ref()
                                ),
                            ));
                        }
                        set.insert(name.get_ref().clone());
                    }
                    Some(set)
                }
            };
            Some(WasmMode { purposes, columns })
        }
    };
    let template = match &raw.template {
        None => None,
        Some(mode) => {
            let mode = mode.get_ref();
            let min_units = checked_min_units(&mode.min_units, at)?;
            let mut purposes = BTreeSet::new();
            for purpose in &mode.purposes {
                check_identifier(purpose.get_ref(), "purpose", &at(purpose.span().start))?;
                purposes.insert(purpose.get_ref().clone());
            }
            Some(TemplateMode {
                min_units,
                purposes,
            })
        }
    };
    if aggregate.is_none() && template.is_none() && wasm.is_none() {
        return Err(invalid(
            &location,
            format!(
                "grant on `{dataset_id}` gives no mode (expected `[grant.aggregate]`, \
                 `[grant.template]` or `[grant.wasm]`)"
            ),
        ));
    }

    Ok(Grant {
        dataset: dataset_id.clone(),
        grantee,
        aggregate,
        template,
        wasm,
        location,
    })
}

/// A mode's threshold: at least 2 distinct units per released row.
/// Checks `[grant.aggregate.dp]`: positive, finite privacy parameters, a per-query spend within
/// the budget, and contribution bounds of at least one.
fn dp_mode(raw: &RawDp, location: &Location) -> Result<DpMode> {
    let positive = |name: &str, value: f64| {
        if value.is_finite() && value > 0.0 {
            Ok(value)
        } else {
            Err(invalid(
                location,
                format!("dp.{name} must be a positive finite number, got {value}"),
            ))
        }
    };
    let probability = |name: &str, value: f64| {
        if value.is_finite() && value > 0.0 && value < 1e-3 {
            Ok(value)
        } else {
            Err(invalid(
                location,
                format!("dp.{name} must be above 0 and below 0.001, got {value}"),
            ))
        }
    };
    let count = |name: &str, value: i64| {
        u64::try_from(value)
            .ok()
            .filter(|v| (1..=1_000_000).contains(v))
            .ok_or_else(|| {
                invalid(
                    location,
                    format!("dp.{name} must be between 1 and 1000000, got {value}"),
                )
            })
    };
    let mode = DpMode {
        epsilon: positive("epsilon", raw.epsilon)?,
        delta: probability("delta", raw.delta)?,
        budget_epsilon: positive("budget_epsilon", raw.budget_epsilon)?,
        budget_delta: probability("budget_delta", raw.budget_delta)?,
        max_rows_per_unit: count("max_rows_per_unit", raw.max_rows_per_unit)?,
        max_groups_per_unit: count("max_groups_per_unit", raw.max_groups_per_unit)?,
        required: raw.required,
    };
    if mode.epsilon > mode.budget_epsilon || mode.delta > mode.budget_delta {
        return Err(invalid(
            location,
            "one query's epsilon and delta must fit in the budget".to_string(),
        ));
    }
    Ok(mode)
}

fn checked_min_units(value: &Spanned<i64>, at: &dyn Fn(usize) -> Location) -> Result<u64> {
    let min_units = *value.get_ref();
    u64::try_from(min_units)
        .ok()
        .filter(|k| *k >= 2)
        .ok_or_else(|| {
            invalid(
                &at(value.span().start),
                format!("min_units must be at least 2, got {min_units}"),
            )
        })
}

/// Ids and names are lowercase ASCII identifiers, so they can be used as SQL names unquoted and
/// cannot smuggle path separators or quotes.
fn check_identifier(value: &str, what: &str, location: &Location) -> Result<()> {
    let mut chars = value.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid && value.len() <= 64 {
        Ok(())
    } else {
        Err(invalid(
            location,
            format!(
                "{what} `{value}` must be a lowercase identifier ([a-z][a-z0-9_]*, at most 64)"
            ),
        ))
    }
}

fn invalid(location: &Location, message: String) -> PolicyError {
    PolicyError::Invalid {
        file: location.file.clone(),
        line: location.line,
        message,
    }
}

/// 1-based line number of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

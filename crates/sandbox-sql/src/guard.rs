//! The plan guard: walks a DataFusion `LogicalPlan` (never the SQL text), tracks which source
//! columns flow into every expression, enforces the column roles of the policy, and rewrites the
//! aggregate to carry the hidden count of distinct privacy units per group.
//!
//! The accepted shape, outermost first:
//!
//! ```text
//! Query := [Limit] (Sort | Projection | SubqueryAlias | Filter)*  Aggregate  (Input | Query)
//! Input := (Filter | Projection | SubqueryAlias)* (TableScan | Join(Input, Input))
//! ```
//!
//! An aggregate over another aggregate query (a derived table or CTE that aggregates) is
//! guarded in two steps: the inner query on its own, with its rows that would not pass the gate
//! filtered out inside the plan (too few units, or failing its `HAVING`); then the outer aggregate
//! over those releasable values only, its row count being the largest of the inner rows it
//! covers. A limit inside the inner query is denied: it would decide which groups the outer
//! query sees.
//!
//! Joins are inner or left equi-joins anchored on a join role: the privacy unit of both sides (the
//! same entity) or a declared join key. The guard keeps *unit classes*: scans whose privacy units
//! were equated by a join are one class, counted once (so an enterprise in many joined rows counts
//! once); scans joined through a join key stay separate classes, and every class must reach the
//! threshold on its own (a join can never change which entity is counted).
//!
//! A filter over aggregated rows (`HAVING`, or a `WHERE` over an aggregating derived table) is
//! not run as a filter: the rewrite turns it into a hidden boolean column [`HAVING_COLUMN`], and
//! the gate drops rows whose predicate is not true *after* counting the suppressed ones. Run as a
//! filter, it would decide which small groups reach the gate, so the count of suppressed rows
//! would answer the predicate about groups that are never released.
//!
//! Everything else is denied with the rule that explains why. The guard is an allow-list: a plan
//! node, expression kind or function it does not know is denied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::NullEquality;
use datafusion::common::{Column, DFSchema, ScalarValue, TableReference};
use datafusion::functions_aggregate::expr_fn::max;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, AggregateUDF, AggregateUDFImpl, Between, BinaryExpr, Expr, ExprSchemable, FetchType,
    Filter, Join, JoinType, Limit, LogicalPlan, Operator, Projection, SkipType, Sort,
    SubqueryAlias, TableScan, try_cast, when,
};
use sandbox_policy::{
    AggregateFunction as Allowed, AggregateMode, DatasetPolicy, DpMode, Level, Mask, Mode, Role,
};
use sandbox_release::DpSpec;

use crate::error::{Denial, Rule, SqlError};
use crate::sketch::UnitSketch;
use crate::units::CappedUnits;
pub use sandbox_release::differencing::SKETCH_COLUMN;

/// The hidden columns' names are the gate's, declared once there: the unit count, the `HAVING`
/// predicate per aggregated row (applied by the gate after suppression, see [`guard`]) and the
/// prefix reserved for them.
pub use sandbox_release::{HAVING_COLUMN, HIDDEN_PREFIX, UNITS_COLUMN};

/// Scalar functions allowed on dimensions and on aggregated outputs. Anything else is denied.
const SCALAR_FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
    "substr",
    "left",
    "right",
    "character_length",
    "length",
    "btrim",
    "ltrim",
    "rtrim",
    "concat",
    "starts_with",
    "coalesce",
    "date_part",
    "date_trunc",
    "round",
    "floor",
    "ceil",
];

/// A dataset as the guard sees it for one caller: its policy and the caller's aggregate mode.
#[derive(Debug, Clone)]
pub struct GrantedDataset {
    pub policy: Arc<DatasetPolicy>,
    pub aggregate: Option<AggregateMode>,
}

impl GrantedDataset {
    /// Every dataset the policy grants `principal`, by id. (The engine builds the same map over
    /// the dataset policies it shares between jobs.)
    pub fn all_for(
        policy: &sandbox_policy::PolicySet,
        principal: &sandbox_policy::Principal,
    ) -> HashMap<String, GrantedDataset> {
        policy
            .granted_datasets(principal)
            .map(|d| {
                (
                    d.id.clone(),
                    GrantedDataset {
                        policy: Arc::new(d.clone()),
                        aggregate: policy.aggregate_mode(principal, &d.id),
                    },
                )
            })
            .collect()
    }
}

/// The guard's verdict on an allowed query: the rewritten plan and what the gate must enforce.
#[derive(Debug, Clone)]
pub struct Guarded {
    /// The plan with the hidden unit count added; its output has [`UNITS_COLUMN`] last.
    pub plan: LogicalPlan,
    pub min_units: u64,
    /// The query's `OFFSET`, applied by the gate after suppression.
    pub skip: usize,
    /// The query's `LIMIT`, applied by the gate after suppression.
    pub fetch: Option<usize>,
    pub datasets: Vec<String>,
    /// Columns touched, as `dataset.column`.
    pub columns: Vec<String>,
    /// Set when the query runs under differential privacy: what the gate must noise, and the
    /// combined parameters of the grants. Then `min_units` is 0: partition selection decides
    /// which groups show.
    pub dp: Option<DpGuarded>,
    /// A digest of where the released rows come from: the aggregate's input and grouping (the
    /// gate releases a row identical to one released from the same source again).
    pub source: u64,
}

/// A digest of an aggregate's input plan and grouping: two queries with the same one group the
/// same input rows into the same groups, whatever their aggregate functions, `HAVING`, order or
/// limit.
fn row_source(aggregate: &Aggregate) -> u64 {
    let text = format!(
        "{}\0{:?}",
        aggregate.input.display_indent(),
        aggregate.group_expr
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    u64::from_le_bytes(digest.as_ref()[..8].try_into().expect("8 bytes"))
}

/// A query under differential privacy, as the guard found it.
#[derive(Debug, Clone)]
pub struct DpGuarded {
    pub spec: DpSpec,
    pub mode: DpMode,
}

/// Where a value in the plan comes from.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) dataset: Arc<str>,
    pub(crate) column: Arc<str>,
    pub(crate) role: Role,
    pub(crate) level: Level,
    pub(crate) mask: Option<Mask>,
    pub(crate) is_unit: bool,
    /// Which table scan of the plan it comes from (a dataset scanned twice has two).
    pub(crate) scan: usize,
}

impl Source {
    /// A masked token (partial mask or pseudonym), as opposed to a generalized value.
    fn is_token(&self) -> bool {
        self.role == Role::Masked && !self.mask.is_some_and(Mask::is_generalization)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Lineage {
    /// Exactly one source column, unmodified (aliases and subquery aliases keep a column plain).
    Plain(Source),
    /// An expression over these source columns (none: a constant).
    Derived(Vec<Source>),
}

impl Lineage {
    /// Whether this is the privacy unit itself, unmodified.
    pub(crate) fn is_plain_unit(&self) -> bool {
        matches!(self, Lineage::Plain(source) if source.is_unit)
    }

    pub(crate) fn sources(&self) -> Vec<&Source> {
        match self {
            Lineage::Plain(s) => vec![s],
            Lineage::Derived(v) => v.iter().collect(),
        }
    }
}

/// How a row-level expression is used, for the rule that names a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Use {
    Filter,
    Group,
    Derive,
}

pub(crate) struct Guard<'a> {
    pub(crate) granted: &'a HashMap<String, GrantedDataset>,
    /// Ad-hoc SQL, under differential privacy or not, or an approved template: decides what the
    /// level caps allow.
    pub(crate) context: Mode,
    pub(crate) datasets: BTreeSet<String>,
    pub(crate) columns: BTreeSet<String>,
    /// The aggregate mode of each dataset scanned.
    pub(crate) modes: BTreeMap<String, AggregateMode>,
    /// Union-find over table scans: scans whose privacy units a join equated share a root.
    pub(crate) unit_parent: Vec<usize>,
    /// The dataset of every table scan, by scan index.
    pub(crate) scans: Vec<Arc<DatasetPolicy>>,
    /// Scans whose rows a join may copy (the other side is not unique on the join columns).
    pub(crate) copied: Vec<bool>,
    /// Scans a join looks up: the side unique on the join columns (the right one when both
    /// are), whose row is a function of the other side's. A joined row is one row of the scans
    /// that are not lookups.
    pub(crate) lookup: Vec<bool>,
    /// Scans on the null-extended side of an outer join: their columns are null where nothing
    /// matched.
    pub(crate) null_extended: Vec<bool>,
    /// Measures (`dataset.column`) a granted range filter compares anywhere in the query: their
    /// value is known, within the range, for every row the filter keeps.
    pub(crate) filtered_measures: BTreeSet<String>,
}

impl<'a> Guard<'a> {
    pub(crate) fn new(granted: &'a HashMap<String, GrantedDataset>, context: Mode) -> Self {
        Guard {
            granted,
            context,
            datasets: BTreeSet::new(),
            columns: BTreeSet::new(),
            modes: BTreeMap::new(),
            unit_parent: Vec::new(),
            scans: Vec::new(),
            copied: Vec::new(),
            lookup: Vec::new(),
            null_extended: Vec::new(),
            filtered_measures: BTreeSet::new(),
        }
    }

    /// Whether the answer is exact (ad-hoc on an exact grant, or an approved template): then
    /// rows a join copies may not feed aggregated values, and the differencing defense needs
    /// every dataset's row key.
    pub(crate) fn exact(&self) -> bool {
        self.context != Mode::Private
    }
}

/// Checks a plan against the caller's grants and rewrites it for the release gate. `context` is
/// [`Mode::Aggregate`] for ad-hoc SQL, [`Mode::Private`] for ad-hoc SQL the caller asks to run
/// under differential privacy, and [`Mode::Template`] for an owner-approved template, whose
/// grants the engine builds from the template's approval.
///
/// Ad-hoc SQL runs under differential privacy when the caller asks, when a grant of a dataset it
/// reads requires it, or when it reads a measure whose level allows ad-hoc use only under
/// differential privacy (L4) and every dataset it reads offers it. Otherwise it is exact, under
/// the threshold.
pub fn guard(
    plan: &LogicalPlan,
    granted: &HashMap<String, GrantedDataset>,
    context: Mode,
) -> Result<Guarded, SqlError> {
    if !matches!(context, Mode::Aggregate | Mode::Private) {
        return guard_exact(plan, granted, context);
    }
    let scanned = crate::dp::scanned(plan, granted);
    let offered = !scanned.is_empty() && scanned.iter().all(|g| g.dp_offered().is_some());
    // Why this query is answered under differential privacy, if it is.
    let reason = if context == Mode::Private {
        Some("you asked for differential privacy".to_string())
    } else {
        scanned.iter().find_map(|g| g.privacy_reason())
    };
    if let Some(reason) = reason {
        if !offered {
            return Err(deny(
                Rule::DpNotGranted,
                format!(
                    "{reason}, but not every dataset the query reads offers differential privacy \
                     to you"
                ),
            ));
        }
        return crate::dp::guard_dp(plan, granted);
    }
    match guard_exact(plan, granted, Mode::Aggregate) {
        Err(SqlError::Denied(denial)) if denial.rule == Rule::LevelCap && offered => {
            crate::dp::guard_dp(plan, granted)
        }
        other => other,
    }
}

impl GrantedDataset {
    /// The differential privacy this grant offers its holder, if any.
    pub(crate) fn dp_offered(&self) -> Option<&DpMode> {
        self.aggregate.as_ref().and_then(|m| m.dp.as_ref())
    }

    /// Why ad-hoc SQL over this dataset is answered under differential privacy, if it must be:
    /// the grant requires it, or the dataset's level calls for it and the owner did not mark the
    /// grant exact.
    pub(crate) fn privacy_reason(&self) -> Option<String> {
        let mode = self.aggregate.as_ref()?;
        // The decision is the policy's; what follows only says why.
        if mode.answers_exactly(&self.policy) {
            return None;
        }
        if mode.dp.as_ref().is_some_and(|dp| dp.required) {
            return Some(format!(
                "your grant on `{}` requires differential privacy",
                self.policy.id
            ));
        }
        Some(format!(
            "`{}` is {}: ad-hoc SQL on it is answered under differential privacy",
            self.policy.id,
            self.policy.level().as_str()
        ))
    }
}

/// The exact guard: the threshold on distinct units, no noise.
fn guard_exact(
    plan: &LogicalPlan,
    granted: &HashMap<String, GrantedDataset>,
    context: Mode,
) -> Result<Guarded, SqlError> {
    let mut guard = Guard::new(granted, context);
    // Anywhere in the plan, not only in its output: an inner column named like the hidden unit
    // count could otherwise be mistaken for it after the rewrite.
    if uses_reserved_name(plan) {
        return Err(deny(
            Rule::ReservedName,
            format!("names starting with `{HIDDEN_PREFIX}` are reserved"),
        ));
    }

    // Walk down from the root to the aggregate, remembering the nodes above it.
    let mut chain: Vec<&LogicalPlan> = Vec::new();
    let mut node = plan;
    let aggregate = loop {
        match node {
            LogicalPlan::Aggregate(aggregate) => break aggregate,
            LogicalPlan::Limit(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Projection(_)
            | LogicalPlan::SubqueryAlias(_) => {
                chain.push(node);
                node = single_input(node)?;
            }
            LogicalPlan::Filter(filter) => {
                if !contains_aggregate(&filter.input) {
                    return Err(guard.no_aggregate(plan));
                }
                if chain.iter().any(|n| matches!(n, LogicalPlan::Filter(_))) {
                    return Err(deny(
                        Rule::HavingNotSupported,
                        "only one filter over aggregated rows is supported",
                    ));
                }
                chain.push(node);
                node = &filter.input;
            }
            LogicalPlan::TableScan(_) | LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => {
                return Err(guard.no_aggregate(plan));
            }
            other => return Err(node_denial(other)),
        }
    };

    // Every node above the aggregate only sees aggregated values; check the expression kinds.
    let mut skip = 0;
    let mut fetch = None;
    for (position, node) in chain.iter().enumerate() {
        match node {
            LogicalPlan::Projection(projection) => {
                for expr in &projection.expr {
                    post_aggregate_expr(expr, projection.input.schema())?;
                }
            }
            LogicalPlan::Sort(sort) => {
                if sort.fetch.is_some() {
                    return Err(deny(Rule::PlanNodeNotAllowed, "a sort with a fetch limit"));
                }
                for sort_expr in &sort.expr {
                    post_aggregate_expr(&sort_expr.expr, sort.input.schema())?;
                }
            }
            LogicalPlan::Limit(limit) => {
                if position != 0 {
                    return Err(deny(
                        Rule::PlanNodeNotAllowed,
                        "LIMIT/OFFSET is only allowed on the outermost query",
                    ));
                }
                (skip, fetch) = limit_values(limit)?;
            }
            LogicalPlan::Filter(filter) => {
                post_aggregate_expr(&filter.predicate, filter.input.schema())?;
            }
            LogicalPlan::SubqueryAlias(_) => {}
            other => return Err(node_denial(other)),
        }
    }

    let (mut rewritten, min_units) = if contains_aggregate(&aggregate.input) {
        guard.aggregate_over_aggregate(aggregate)?
    } else {
        guard.aggregate_over_rows(aggregate)?
    };
    let mut having = false;
    for node in chain.iter().rev() {
        rewritten = match node {
            LogicalPlan::Projection(projection) => {
                let mut exprs = projection.expr.clone();
                exprs.push(Expr::Column(Column::new_unqualified(UNITS_COLUMN)));
                exprs.push(Expr::Column(Column::new_unqualified(SKETCH_COLUMN)));
                if having {
                    exprs.push(Expr::Column(Column::new_unqualified(HAVING_COLUMN)));
                }
                LogicalPlan::Projection(
                    Projection::try_new(exprs, Arc::new(rewritten)).map_err(rewrite_error)?,
                )
            }
            // Every column passes, plus the predicate as a hidden column for the gate.
            LogicalPlan::Filter(filter) => {
                let mut exprs = columns_of(rewritten.schema());
                exprs.push(filter.predicate.clone().alias(HAVING_COLUMN));
                having = true;
                LogicalPlan::Projection(
                    Projection::try_new(exprs, Arc::new(rewritten)).map_err(rewrite_error)?,
                )
            }
            LogicalPlan::Sort(sort) => LogicalPlan::Sort(Sort {
                expr: sort.expr.clone(),
                input: Arc::new(rewritten),
                fetch: None,
            }),
            LogicalPlan::SubqueryAlias(alias) => LogicalPlan::SubqueryAlias(
                SubqueryAlias::try_new(Arc::new(rewritten), alias.alias.clone())
                    .map_err(rewrite_error)?,
            ),
            // The gate applies LIMIT/OFFSET after suppression.
            LogicalPlan::Limit(_) => rewritten,
            other => return Err(node_denial(other)),
        };
    }
    // No ORDER BY: the rows come sorted by what the caller sees of them (`order.rs`).
    if !crate::order::is_ordered(plan) {
        rewritten = crate::order::sorted_by_outputs(rewritten, |name| {
            !sandbox_release::is_hidden_name(name)
        })?;
    }

    Ok(Guarded {
        plan: rewritten,
        min_units,
        skip,
        fetch,
        datasets: guard.datasets.into_iter().collect(),
        columns: guard.columns.into_iter().collect(),
        dp: None,
        source: row_source(aggregate),
    })
}

/// A call of one of the sandbox's own aggregates (never registered in a session, so only the
/// rewrite can call them).
fn udaf_call(function: impl AggregateUDFImpl + 'static, args: Vec<Expr>) -> Expr {
    Expr::AggregateFunction(AggregateFunction::new_udf(
        Arc::new(AggregateUDF::new_from_impl(function)),
        args,
        false,
        None,
        vec![],
        None,
    ))
}

/// A query's `OFFSET` and `LIMIT`, which must be constants (the gate applies them).
pub(crate) fn limit_values(limit: &Limit) -> Result<(usize, Option<usize>), SqlError> {
    let skip = match limit.get_skip_type() {
        Ok(SkipType::Literal(n)) => n,
        _ => return Err(deny(Rule::LimitNotConstant, "OFFSET must be a constant")),
    };
    let fetch = match limit.get_fetch_type() {
        Ok(FetchType::Literal(n)) => n,
        _ => return Err(deny(Rule::LimitNotConstant, "LIMIT must be a constant")),
    };
    Ok((skip, fetch))
}

/// A column expression for every column of a schema, qualifiers kept.
pub(crate) fn columns_of(schema: &DFSchema) -> Vec<Expr> {
    schema
        .iter()
        .map(|(qualifier, field)| Expr::Column(Column::new(qualifier.cloned(), field.name())))
        .collect()
}

/// Whether a table reference points into the session's only schema (`datafusion.public`), where
/// the granted datasets are registered. Anything else is not a granted dataset.
pub(crate) fn is_default_qualifier(reference: &TableReference) -> bool {
    matches!(
        (reference.catalog(), reference.schema()),
        (None | Some("datafusion"), None | Some("public"))
    )
}

/// The lineage of every column a table scan outputs: each a plain source column. Hidden columns
/// are not in the catalog's schema, so one here means the plan was not built from it: denied.
pub(crate) fn scan_lineage(
    scan: &TableScan,
    dataset: &Arc<str>,
    policy: &DatasetPolicy,
    scan_index: usize,
) -> Result<Vec<Lineage>, SqlError> {
    scan.projected_schema
        .fields()
        .iter()
        .map(|field| {
            let column = policy
                .column(field.name())
                .filter(|c| c.role != Role::Hidden)
                .ok_or_else(|| {
                    deny(
                        Rule::PlanNodeNotAllowed,
                        format!("column `{}` of `{dataset}` is hidden", field.name()),
                    )
                })?;
            Ok(Lineage::Plain(Source {
                dataset: dataset.clone(),
                column: Arc::from(column.name.as_str()),
                role: column.role,
                level: column.level,
                mask: column.mask,
                is_unit: column.name == policy.privacy_unit,
                scan: scan_index,
            }))
        })
        .collect()
}

/// The lineage of a column of `schema`, whose columns have `lineage` in order.
pub(crate) fn lineage_of(
    column: &Column,
    schema: &DFSchema,
    lineage: &[Lineage],
) -> Result<Lineage, SqlError> {
    let index = schema
        .index_of_column(column)
        .map_err(|e| SqlError::Plan(e.to_string()))?;
    lineage
        .get(index)
        .cloned()
        .ok_or_else(|| SqlError::Plan(format!("column `{column}` has no lineage")))
}

pub(crate) fn deny(rule: Rule, message: impl Into<String>) -> SqlError {
    SqlError::Denied(Denial::new(rule, message))
}

pub(crate) fn rewrite_error(e: datafusion::error::DataFusionError) -> SqlError {
    // Fail closed: a plan the rewrite cannot rebuild is not run.
    SqlError::Plan(format!("cannot add the hidden unit count: {e}"))
}

pub(crate) fn single_input(node: &LogicalPlan) -> Result<&LogicalPlan, SqlError> {
    match node.inputs().as_slice() {
        [input] => Ok(input),
        _ => Err(node_denial(node)),
    }
}

pub(crate) fn uses_reserved_name(plan: &LogicalPlan) -> bool {
    plan.schema()
        .fields()
        .iter()
        .any(|f| f.name().starts_with(HIDDEN_PREFIX))
        || plan.inputs().into_iter().any(uses_reserved_name)
}

pub(crate) fn contains_aggregate(plan: &LogicalPlan) -> bool {
    matches!(plan, LogicalPlan::Aggregate(_)) || plan.inputs().into_iter().any(contains_aggregate)
}

/// The denial for a plan node outside the accepted shape.
pub(crate) fn node_denial(node: &LogicalPlan) -> SqlError {
    match node {
        LogicalPlan::Join(_) => deny(
            Rule::PlanNodeNotAllowed,
            "joins are only allowed below the aggregate, over rows of granted datasets",
        ),
        LogicalPlan::Aggregate(_) => deny(
            Rule::NestedAggregateNotSupported,
            "an aggregate is only allowed over rows, or directly over one aggregated derived table",
        ),
        LogicalPlan::Window(_) => {
            deny(Rule::PlanNodeNotAllowed, "window functions are not allowed")
        }
        LogicalPlan::Union(_) => deny(Rule::PlanNodeNotAllowed, "UNION is not allowed"),
        LogicalPlan::Distinct(_) => deny(
            Rule::PlanNodeNotAllowed,
            "SELECT DISTINCT is not allowed; use GROUP BY",
        ),
        LogicalPlan::Limit(_) | LogicalPlan::Sort(_) => deny(
            Rule::PlanNodeNotAllowed,
            "ORDER BY and LIMIT are only allowed over aggregated output",
        ),
        LogicalPlan::Subquery(_) => deny(Rule::SubqueryNotAllowed, "subqueries are not allowed"),
        LogicalPlan::Statement(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Copy(_)
        | LogicalPlan::Explain(_)
        | LogicalPlan::Analyze(_)
        | LogicalPlan::DescribeTable(_) => {
            deny(Rule::StatementNotQuery, "only SELECT queries are allowed")
        }
        LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => deny(
            Rule::AggregateRequired,
            "the query must aggregate a granted dataset",
        ),
        other => deny(
            Rule::PlanNodeNotAllowed,
            format!("plan node `{}` is not allowed", node_name(other)),
        ),
    }
}

fn node_name(node: &LogicalPlan) -> String {
    let display = node.display().to_string();
    display
        .split(|c: char| c == ':' || c.is_whitespace())
        .next()
        .unwrap_or("unknown")
        .to_string()
}

impl Guard<'_> {
    /// An aggregate over rows of granted datasets: checks its input, groups and aggregates, and
    /// adds the hidden count of distinct privacy units per group. Returns the rewritten aggregate
    /// and the threshold.
    fn aggregate_over_rows(
        &mut self,
        aggregate: &Aggregate,
    ) -> Result<(LogicalPlan, u64), SqlError> {
        let input_lineage = self.below(&aggregate.input)?;
        let mode = self.combined_mode()?;
        let input_schema = aggregate.input.schema();
        no_grouping_sets(aggregate)?;
        for expr in &aggregate.group_expr {
            self.row_expr(expr, input_schema, &input_lineage, Use::Group)?;
        }
        for expr in &aggregate.aggr_expr {
            self.aggregate_expr(expr, input_schema, &input_lineage, &mode)?;
        }

        // The rewrite: count distinct privacy units per group and unit class, and carry the least
        // count to the output.
        let mut class_columns: BTreeMap<usize, usize> = BTreeMap::new();
        for root in self.unit_roots() {
            let index = input_lineage
                .iter()
                .position(|l| matches!(l, Lineage::Plain(s) if s.is_unit && self.root(s.scan) == root))
                .ok_or_else(|| {
                    deny(
                        Rule::PrivacyUnitUnavailable,
                        "the privacy unit of every dataset must reach the aggregate; derived tables \
                         that drop it are not supported",
                    )
                })?;
            class_columns.insert(root, index);
        }
        let unit_columns: Vec<Expr> = class_columns
            .values()
            .map(|&index| {
                if let Lineage::Plain(source) = &input_lineage[index] {
                    self.columns
                        .insert(format!("{}.{}", source.dataset, source.column));
                }
                let (qualifier, field) = input_schema.qualified_field(index);
                Expr::Column(Column::new(qualifier.cloned(), field.name()))
            })
            .collect();
        let existing_exact_count = match unit_columns.len() {
            1 => aggregate
                .aggr_expr
                .iter()
                .position(|expr| counts_distinct_units(expr, input_schema, &input_lineage)),
            _ => None,
        };
        let capped = |column: Expr| udaf_call(CappedUnits::new(mode.min_units), vec![column]);
        // Every row also carries the sketch of its input rows, for the differencing defense:
        // each row by its unit and its identity, under the unit classes of the datasets no join
        // looks up (a left join onto the register on the unit is a class of its own in exact
        // answers; sketched too, it would put each row in twice and make a release look new).
        let driving: BTreeSet<usize> = (0..self.scans.len())
            .filter(|&scan| !self.lookup[scan])
            .map(|scan| self.root(scan))
            .collect();
        let mut sketch_args: Vec<Expr> = class_columns
            .iter()
            .zip(&unit_columns)
            .filter(|((root, _), _)| driving.is_empty() || driving.contains(root))
            .map(|(_, column)| column.clone())
            .collect();
        let sketch_units = sketch_args.len();
        sketch_args.extend(self.row_key_columns(input_schema, &input_lineage)?);
        let sketch = udaf_call(UnitSketch::units(sketch_units), sketch_args).alias(SKETCH_COLUMN);
        // The query's aggregate with more aggregates beside its own.
        let with_aggregates = |aggr_expr: Vec<Expr>| {
            Aggregate::try_new(
                aggregate.input.clone(),
                aggregate.group_expr.clone(),
                aggr_expr,
            )
            .map(LogicalPlan::Aggregate)
            .map_err(rewrite_error)
        };
        let rewritten = match existing_exact_count {
            // The query already counts distinct units exactly: the hidden count is that column.
            // Adding the capped counter beside it would also stop DataFusion from planning the
            // `COUNT(DISTINCT)` as a two-phase group-by, which is much slower.
            Some(index) => {
                let mut aggr_expr = aggregate.aggr_expr.clone();
                aggr_expr.push(sketch);
                let plan = with_aggregates(aggr_expr)?;
                let schema = plan.schema().clone();
                let mut exprs = columns_of(&schema);
                let (qualifier, field) = schema.qualified_field(aggregate.group_expr.len() + index);
                // A count is never negative; `try_cast` because the plan check refuses casts
                // that could fail on data, and cannot know this one does not.
                exprs.push(
                    try_cast(
                        Expr::Column(Column::new(qualifier.cloned(), field.name())),
                        DataType::UInt64,
                    )
                    .alias(UNITS_COLUMN),
                );
                LogicalPlan::Projection(
                    Projection::try_new(exprs, Arc::new(plan)).map_err(rewrite_error)?,
                )
            }
            None if unit_columns.len() == 1 => {
                let mut aggr_expr = aggregate.aggr_expr.clone();
                aggr_expr.push(capped(unit_columns[0].clone()).alias(UNITS_COLUMN));
                aggr_expr.push(sketch);
                with_aggregates(aggr_expr)?
            }
            // Several unit classes: one capped count each, and the least of them is the row's count,
            // so the row is released only if every class reaches the threshold.
            None => {
                let mut aggr_expr = aggregate.aggr_expr.clone();
                aggr_expr.push(sketch);
                let mut counts = Vec::new();
                for (i, column) in unit_columns.iter().enumerate() {
                    let name = format!("{UNITS_COLUMN}_{i}");
                    aggr_expr.push(capped(column.clone()).alias(&name));
                    counts.push(Expr::Column(Column::new_unqualified(name)));
                }
                let plan = with_aggregates(aggr_expr)?;
                let schema = plan.schema().clone();
                let mut exprs = columns_of(&schema);
                exprs.truncate(exprs.len() - counts.len());
                let mut least = counts[0].clone();
                for count in &counts[1..] {
                    least = when(count.clone().lt(least.clone()), count.clone())
                        .otherwise(least)
                        .map_err(rewrite_error)?;
                }
                exprs.push(least.alias(UNITS_COLUMN));
                LogicalPlan::Projection(
                    Projection::try_new(exprs, Arc::new(plan)).map_err(rewrite_error)?,
                )
            }
        };
        Ok((rewritten, mode.min_units))
    }

    /// An aggregate over the rows of another aggregate query (a derived table or CTE that
    /// aggregates). The inner query is guarded on its own; its rows that would not pass the gate
    /// (fewer than `min_units` units, or failing its `HAVING`) are filtered out *inside* the plan,
    /// so the outer query only ever sees releasable values. Each outer row then covers at least
    /// one released inner row, so it carries the largest unit count among them.
    fn aggregate_over_aggregate(
        &mut self,
        aggregate: &Aggregate,
    ) -> Result<(LogicalPlan, u64), SqlError> {
        // A limit would decide which inner groups the outer query sees, after an order the
        // outer query does not show; the gate could not account for the groups it cut.
        let limited = |node: &LogicalPlan| {
            matches!(node, LogicalPlan::Limit(_))
                || matches!(node, LogicalPlan::Sort(sort) if sort.fetch.is_some())
        };
        let mut node = aggregate.input.as_ref();
        while !matches!(node, LogicalPlan::Aggregate(_)) {
            if limited(node) {
                return Err(deny(
                    Rule::NestedAggregateNotSupported,
                    "LIMIT/OFFSET inside an aggregated derived table is not supported",
                ));
            }
            match node.inputs().as_slice() {
                [input] => node = input,
                _ => break,
            }
        }
        let inner = guard_exact(&aggregate.input, self.granted, self.context)?;
        if inner.skip != 0 || inner.fetch.is_some() {
            return Err(deny(
                Rule::NestedAggregateNotSupported,
                "LIMIT/OFFSET inside an aggregated derived table is not supported",
            ));
        }
        self.datasets.extend(inner.datasets.iter().cloned());
        self.columns.extend(inner.columns);
        let input_schema = aggregate.input.schema();
        no_grouping_sets(aggregate)?;
        for expr in &aggregate.group_expr {
            post_aggregate_expr(expr, input_schema)?;
        }
        // The outer functions follow the grant too: an outer MIN or MAX picks one inner row's
        // value, which the grant's functions may not allow.
        let functions = inner
            .datasets
            .iter()
            .filter_map(|d| self.granted.get(d).and_then(|g| g.aggregate.clone()))
            .reduce(|a, b| a.strictest(&b))
            .map(|m| m.functions)
            .unwrap_or_default();
        for expr in &aggregate.aggr_expr {
            outer_aggregate_expr(expr, input_schema, &functions)?;
        }
        let units = || Expr::Column(Column::new_unqualified(UNITS_COLUMN));
        let mut releasable = units().gt_eq(Expr::Literal(
            ScalarValue::UInt64(Some(inner.min_units)),
            None,
        ));
        if inner
            .plan
            .schema()
            .has_column_with_unqualified_name(HAVING_COLUMN)
        {
            releasable =
                releasable.and(Expr::Column(Column::new_unqualified(HAVING_COLUMN)).is_true());
        }
        let released = LogicalPlan::Filter(
            Filter::try_new(releasable, Arc::new(inner.plan)).map_err(rewrite_error)?,
        );
        let sketch = || Expr::Column(Column::new_unqualified(SKETCH_COLUMN));
        let mut exprs = columns_of(input_schema);
        exprs.push(units());
        exprs.push(sketch());
        let released = LogicalPlan::Projection(
            Projection::try_new(exprs, Arc::new(released)).map_err(rewrite_error)?,
        );
        let mut aggr_expr = aggregate.aggr_expr.clone();
        aggr_expr.push(max(units()).alias(UNITS_COLUMN));
        // An outer row covers the union of its inner rows' units: sketches add.
        aggr_expr.push(udaf_call(UnitSketch::sum(), vec![sketch()]).alias(SKETCH_COLUMN));
        let rewritten = LogicalPlan::Aggregate(
            Aggregate::try_new(Arc::new(released), aggregate.group_expr.clone(), aggr_expr)
                .map_err(rewrite_error)?,
        );
        Ok((rewritten, inner.min_units))
    }

    /// The row key columns at the aggregate's input, for the sketch: an exact answer tells its
    /// input rows apart by them. Those of the datasets no join looks up: every join pairs a row
    /// with at most one row of a side unique on its join columns, so a joined row is one row of
    /// the others, whatever lookups (inner or left, onto its own keys or others) a query adds;
    /// and the sketch hashes the key values as a set, so a one-to-one join of two such datasets
    /// on the same keys changes nothing. Every dataset must declare a row key, which must
    /// reach the aggregate; else an exact answer is refused. (Under differential privacy there
    /// is no sketch.)
    fn row_key_columns(
        &mut self,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<Vec<Expr>, SqlError> {
        let mut columns = Vec::new();
        let all_lookups = self.lookup.iter().all(|l| *l);
        for (scan, policy) in self.scans.clone().iter().enumerate() {
            if policy.row_key.is_empty() {
                return Err(deny(
                    Rule::RowKeyUnavailable,
                    format!(
                        "`{}` declares no row key, which exact answers need (the differencing \
                         defense tells input rows apart by it); ask for differential privacy",
                        policy.id
                    ),
                ));
            }
            for key in &policy.row_key {
                // The column itself, or for the privacy unit, the unit of a scan an inner join
                // equated it with (the same value on every joined row).
                let is_unit = *key == policy.privacy_unit;
                let index = lineage
                    .iter()
                    .position(|l| {
                        matches!(l, Lineage::Plain(s) if s.scan == scan && s.column.as_ref() == key)
                    })
                    .or_else(|| {
                        lineage.iter().position(|l| {
                            matches!(l, Lineage::Plain(s)
                                if is_unit && s.is_unit && !self.null_extended[s.scan]
                                    && self.root(s.scan) == self.root(scan))
                        })
                    })
                    .ok_or_else(|| {
                        deny(
                            Rule::RowKeyUnavailable,
                            format!(
                                "`{}.{key}` (its row key) must reach the aggregate: do not \
                                 project it away in a derived table",
                                policy.id
                            ),
                        )
                    })?;
                self.columns.insert(format!("{}.{key}", policy.id));
                if self.lookup[scan] && !all_lookups {
                    continue;
                }
                let (qualifier, field) = schema.qualified_field(index);
                columns.push(Expr::Column(Column::new(qualifier.cloned(), field.name())));
            }
        }
        Ok(columns)
    }

    /// Lineage of every output column of a node below the aggregate.
    pub(crate) fn below(&mut self, node: &LogicalPlan) -> Result<Vec<Lineage>, SqlError> {
        match node {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let known_qualifier = is_default_qualifier(&scan.table_name);
                let granted = self
                    .granted
                    .get(name)
                    .filter(|_| known_qualifier)
                    .ok_or_else(|| {
                        deny(
                            Rule::DatasetNotGranted,
                            format!("`{}` is not a dataset granted to you", scan.table_name),
                        )
                    })?;
                let Some(mode) = granted.aggregate.clone() else {
                    return Err(deny(
                        Rule::ModeNotGranted,
                        format!("dataset `{name}` is not granted to you in aggregate mode"),
                    ));
                };
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(deny(Rule::PlanNodeNotAllowed, "pre-filtered table scans"));
                }
                self.modes.insert(name.to_string(), mode);
                self.datasets.insert(name.to_string());
                let index = self.unit_parent.len();
                self.unit_parent.push(index);
                self.scans.push(granted.policy.clone());
                self.copied.push(false);
                self.lookup.push(false);
                self.null_extended.push(false);
                scan_lineage(scan, &Arc::from(name), &granted.policy, index)
            }
            LogicalPlan::Filter(filter) => {
                let lineage = self.below(&filter.input)?;
                self.filter_expr(&filter.predicate, filter.input.schema(), &lineage)?;
                Ok(lineage)
            }
            LogicalPlan::SubqueryAlias(alias) => self.below(&alias.input),
            LogicalPlan::Projection(projection) => {
                let lineage = self.below(&projection.input)?;
                let schema = projection.input.schema();
                let mut out = Vec::with_capacity(projection.expr.len());
                for expr in &projection.expr {
                    out.push(self.row_expr(expr, schema, &lineage, Use::Derive)?);
                }
                Ok(out)
            }
            LogicalPlan::Join(join) => {
                let first = self.scans.len();
                let left = self.below(&join.left)?;
                let middle = self.scans.len();
                let right = self.below(&join.right)?;
                let end = self.scans.len();
                self.join(join, &left, &right, first..middle, middle..end)?;
                // Inner and left joins output the left columns, then the right ones.
                Ok(left.into_iter().chain(right).collect())
            }
            LogicalPlan::Values(_) | LogicalPlan::EmptyRelation(_) => Err(deny(
                Rule::PlanNodeNotAllowed,
                "only granted datasets can be read: no VALUES lists or constant relations",
            )),
            other => Err(node_denial(other)),
        }
    }

    /// Checks a join's roles: anchored on a join role. An inner join equating the privacy units
    /// of both sides merges their unit classes; a left join does not in exact answers (its
    /// null-extended side is counted over the rows that matched, as a class of its own). A side
    /// that is not unique on its join columns copies the other side's rows.
    fn join(
        &mut self,
        join: &Join,
        left: &[Lineage],
        right: &[Lineage],
        left_scans: std::ops::Range<usize>,
        right_scans: std::ops::Range<usize>,
    ) -> Result<(), SqlError> {
        let mut anchored = false;
        let pairs = join_equalities(join, left, right)?;
        // Under differential privacy a left join on the unit is still the same entity on both
        // sides: one class, whose contributions the rewrite bounds per unit of the preserved side.
        let merges = join.join_type == JoinType::Inner || !self.exact();
        for (l, r) in &pairs {
            for source in [l, r] {
                self.columns
                    .insert(format!("{}.{}", source.dataset, source.column));
            }
            let join_role = |s: &Source| matches!(s.role, Role::Identifier | Role::JoinKey);
            if join_role(l) && join_role(r) {
                anchored = true;
                // The same entity on both sides: the privacy units, of one name.
                if l.is_unit && r.is_unit && l.column == r.column && merges {
                    self.merge_units(l.scan, r.scan);
                }
            } else if l.role == Role::Dimension && r.role == Role::Dimension {
                // An extra equality on dimensions (say, the same month) says no more than the
                // same comparison in WHERE would.
            } else {
                let wrong = if join_role(l) { r } else { l };
                return Err(deny(
                    Rule::JoinKeyNotAllowed,
                    format!(
                        "`{}.{}` is a {} and cannot be joined on; joins match the privacy unit or \
                         a declared join key (extra equalities between dimensions are allowed)",
                        wrong.dataset,
                        wrong.column,
                        wrong.role.as_str()
                    ),
                ));
            }
        }
        if !anchored {
            return Err(deny(
                Rule::JoinKeyNotAllowed,
                "a join must match the privacy unit or a declared join key of both sides",
            ));
        }
        let left_keys: Vec<&Source> = pairs.iter().map(|(l, _)| l).collect();
        let right_keys: Vec<&Source> = pairs.iter().map(|(_, r)| r).collect();
        let (left_unique, right_unique) = (
            self.unique_on(&left_scans, &left_keys),
            self.unique_on(&right_scans, &right_keys),
        );
        // Many rows to many: one enterprise's rows would multiply (24 months joined to 24
        // months is 576 rows, four times over 331,776), and with them the work the query does,
        // which its duration shows whatever the release hides.
        if !left_unique && !right_unique {
            return Err(deny(
                Rule::JoinCopiesRows,
                "a join must pair each row with at most one row of one side: join onto a single \
                 dataset on all of its row key (the register on `credit_code`, a monthly table on \
                 `credit_code` and `month`)",
            ));
        }
        if !right_unique {
            for scan in left_scans.clone() {
                self.copied[scan] = true;
            }
        }
        let looked_up = if right_unique {
            right_scans.clone()
        } else {
            left_scans.clone()
        };
        for scan in looked_up {
            self.lookup[scan] = true;
        }
        if !left_unique {
            for scan in right_scans.clone() {
                self.copied[scan] = true;
            }
        }
        if join.join_type == JoinType::Left {
            for scan in right_scans {
                self.null_extended[scan] = true;
            }
        }
        Ok(())
    }

    /// Whether a join side has at most one row per value of its join columns: a single scan
    /// whose declared row key the join columns cover (the engine checks the key holds before an
    /// exact query runs).
    fn unique_on(&self, scans: &std::ops::Range<usize>, keys: &[&Source]) -> bool {
        if scans.len() != 1 {
            return false;
        }
        let policy = &self.scans[scans.start];
        !policy.row_key.is_empty()
            && policy.row_key.iter().all(|column| {
                keys.iter()
                    .any(|k| k.scan == scans.start && k.column.as_ref() == column)
            })
    }

    pub(crate) fn root(&self, mut scan: usize) -> usize {
        while self.unit_parent[scan] != scan {
            scan = self.unit_parent[scan];
        }
        scan
    }

    fn merge_units(&mut self, a: usize, b: usize) {
        let (a, b) = (self.root(a), self.root(b));
        self.unit_parent[b.max(a)] = a.min(b);
    }

    /// The distinct unit classes of the scans, by root.
    pub(crate) fn unit_roots(&self) -> BTreeSet<usize> {
        (0..self.unit_parent.len()).map(|s| self.root(s)).collect()
    }

    /// The strictest combination of the modes of every dataset scanned: the largest threshold
    /// and the functions all allow.
    pub(crate) fn combined_mode(&self) -> Result<AggregateMode, SqlError> {
        self.modes
            .values()
            .cloned()
            .reduce(|a, b| a.strictest(&b))
            .ok_or_else(|| {
                deny(
                    Rule::AggregateRequired,
                    "the query must aggregate a dataset",
                )
            })
    }

    /// The denial for a query without an aggregate: the most specific rule that explains why its
    /// rows cannot be released.
    pub(crate) fn no_aggregate(&mut self, plan: &LogicalPlan) -> SqlError {
        let mut sources = Vec::new();
        raw_sources(plan, self.granted, &mut sources);
        if sources.iter().any(|(_, role)| *role == Role::Identifier) {
            deny(
                Rule::IdentifierOutput,
                "the privacy unit may never be output; the query must aggregate",
            )
        } else if sources.iter().any(|(_, role)| *role == Role::Measure) {
            deny(
                Rule::MeasureOutsideAggregate,
                "measures may only be output inside an allowed aggregate function",
            )
        } else {
            deny(
                Rule::AggregateRequired,
                "the query must aggregate a granted dataset (GROUP BY or an aggregate function)",
            )
        }
    }

    pub(crate) fn lookup(
        &mut self,
        column: &Column,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<Lineage, SqlError> {
        let found = lineage_of(column, schema, lineage)?;
        for source in found.sources() {
            self.columns
                .insert(format!("{}.{}", source.dataset, source.column));
        }
        Ok(found)
    }

    /// Checks a `WHERE` predicate. Conjunctions, disjunctions and negations are taken apart so
    /// that a granted range filter on a measure can sit beside ordinary dimension filters.
    fn filter_expr(
        &mut self,
        expr: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<(), SqlError> {
        match expr {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And | Operator::Or,
                right,
            }) => {
                self.filter_expr(left, schema, lineage)?;
                self.filter_expr(right, schema, lineage)
            }
            Expr::Not(inner) => self.filter_expr(inner, schema, lineage),
            Expr::BinaryExpr(BinaryExpr { left, op, right })
                if matches!(
                    op,
                    Operator::Eq
                        | Operator::NotEq
                        | Operator::Lt
                        | Operator::LtEq
                        | Operator::Gt
                        | Operator::GtEq
                ) && (is_constant(left) || is_constant(right)) =>
            {
                let subject = if is_constant(left) { right } else { left };
                if self.measure_range(subject, schema, lineage)? {
                    Ok(())
                } else {
                    self.row_expr(expr, schema, lineage, Use::Filter).map(drop)
                }
            }
            Expr::Between(Between {
                expr: subject,
                low,
                high,
                ..
            }) if is_constant(low) && is_constant(high) => {
                if self.measure_range(subject, schema, lineage)? {
                    Ok(())
                } else {
                    self.row_expr(expr, schema, lineage, Use::Filter).map(drop)
                }
            }
            _ => self.row_expr(expr, schema, lineage, Use::Filter).map(drop),
        }
    }

    /// Whether `subject` is a plain measure compared to a constant under a grant that lists it in
    /// `filter_measures` (then the comparison is allowed). A plain measure the grant does not
    /// list is denied here, with the rule that names the grant option.
    fn measure_range(
        &mut self,
        subject: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<bool, SqlError> {
        let Expr::Column(column) = strip_alias(subject) else {
            return Ok(false);
        };
        let Lineage::Plain(source) = self.lookup(column, schema, lineage)? else {
            return Ok(false);
        };
        if source.role != Role::Measure {
            return Ok(false);
        }
        self.check_level(&source)?;
        let granted = self
            .modes
            .get(source.dataset.as_ref())
            .is_some_and(|m| m.filter_measures.contains(source.column.as_ref()));
        if granted {
            self.filtered_measures
                .insert(format!("{}.{}", source.dataset, source.column));
            Ok(true)
        } else {
            Err(deny(
                Rule::MeasureFilterNotGranted,
                format!(
                    "range filters on measure `{}.{}` are not in your grant (`filter_measures`)",
                    source.dataset, source.column
                ),
            ))
        }
    }

    /// Checks a row-level expression (below the aggregate) and returns its lineage.
    pub(crate) fn row_expr(
        &mut self,
        expr: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
        use_: Use,
    ) -> Result<Lineage, SqlError> {
        let result = match expr {
            Expr::Column(column) => self.lookup(column, schema, lineage)?,
            Expr::Alias(alias) => self.row_expr(&alias.expr, schema, lineage, use_)?,
            Expr::Literal(..) => Lineage::Derived(Vec::new()),
            _ => {
                // Roles first: touching the privacy unit or a measure is the more fundamental
                // reason to refuse than the kind of expression that touches it.
                let mut sources = Vec::new();
                for column in expr.column_refs() {
                    let found = self.lookup(column, schema, lineage)?;
                    sources.extend(found.sources().into_iter().cloned());
                }
                self.check_derived_sources(&sources, false)?;
                for child in allowed_children(expr, schema)? {
                    self.row_expr(child, schema, lineage, Use::Derive)?;
                }
                Lineage::Derived(sources)
            }
        };
        // A plain column passes through a projection whatever its role; the aggregate or the
        // output decides. Filters and groupings use the value itself.
        if use_ != Use::Derive {
            for source in result.sources() {
                self.check_level(source)?;
                match (source.role, use_) {
                    (Role::Identifier, Use::Group) => {
                        return Err(deny(
                            Rule::IdentifierGrouped,
                            format!("the privacy unit `{}` may not be grouped on", source.column),
                        ));
                    }
                    (Role::Identifier, _) => {
                        return Err(deny(
                            Rule::IdentifierInExpression,
                            format!(
                                "the privacy unit `{}` may not be compared to values or used in expressions",
                                source.column
                            ),
                        ));
                    }
                    (Role::JoinKey, _) => return Err(join_key_denial(source)),
                    (Role::Measure, _) => {
                        return Err(deny(
                            Rule::MeasureOutsideAggregate,
                            format!(
                                "measure `{}` may only be used as the argument of an allowed aggregate",
                                source.column
                            ),
                        ));
                    }
                    (Role::Masked, Use::Filter) if source.is_token() => {
                        return Err(masked_denial(source));
                    }
                    _ => {}
                }
            }
        }
        Ok(result)
    }

    pub(crate) fn aggregate_expr(
        &mut self,
        expr: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
        mode: &AggregateMode,
    ) -> Result<(), SqlError> {
        let function = match expr {
            Expr::Alias(alias) => return self.aggregate_expr(&alias.expr, schema, lineage, mode),
            Expr::AggregateFunction(function) => function,
            _ => {
                return Err(deny(
                    Rule::ExpressionNotAllowed,
                    "only aggregate function calls are allowed in the aggregate",
                ));
            }
        };
        let params = &function.params;
        let name = function.func.name().to_ascii_lowercase();
        if params.filter.is_some() || !params.order_by.is_empty() {
            return Err(deny(
                Rule::AggregateModifierNotAllowed,
                format!("FILTER and ORDER BY inside `{name}` are not allowed"),
            ));
        }
        let kind = aggregate_kind(&name, params.distinct)?;
        if !mode.functions.contains(&kind) {
            return Err(deny(
                Rule::FunctionNotAllowed,
                format!("aggregate `{}` is not allowed by your grant", kind.as_str()),
            ));
        }
        if params.distinct && kind != Allowed::CountDistinct {
            return Err(deny(
                Rule::DistinctNotAllowed,
                format!("DISTINCT inside `{name}` is not allowed"),
            ));
        }
        let [argument] = params.args.as_slice() else {
            return Err(deny(
                Rule::AggregateArgumentNotPlain,
                format!("`{name}` must take exactly one argument"),
            ));
        };
        let argument = strip_alias(argument);
        if let Expr::Literal(..) = argument {
            // COUNT(*) is planned as COUNT(1); a constant reveals nothing but the row count,
            // which must count rows of a dataset no join copies.
            if kind == Allowed::Count && self.exact() && self.copied.iter().all(|c| *c) {
                return Err(deny(
                    Rule::JoinCopiesRows,
                    "COUNT(*) would count copies of rows: every side of a join here has several \
                     rows per join key; join onto a side unique on its join columns (its row key)",
                ));
            }
            return if kind == Allowed::Count {
                Ok(())
            } else {
                Err(deny(
                    Rule::AggregateArgumentNotPlain,
                    format!("`{name}` must aggregate a column"),
                ))
            };
        }
        let Expr::Column(column) = argument else {
            return self.argument_expr(&name, kind, argument, schema, lineage);
        };
        let source = match self.lookup(column, schema, lineage)? {
            Lineage::Plain(source) => source,
            Lineage::Derived(sources) => {
                self.check_derived_sources(&sources, false)?;
                return Err(deny(
                    Rule::AggregateArgumentNotPlain,
                    format!("`{name}` must aggregate a plain column, not a derived one"),
                ));
            }
        };
        self.check_level(&source)?;
        if matches!(kind, Allowed::Sum | Allowed::Avg)
            && schema
                .qualified_field_from_column(column)
                .is_ok_and(|(_, f)| is_decimal(f.data_type()))
        {
            // Decimal sums and averages raise on overflow: whether they do depends on the data.
            return Err(deny(
                Rule::ExpressionMayFail,
                format!(
                    "`{name}` of the decimal column `{}` can fail on overflow depending on the \
                     data",
                    source.column
                ),
            ));
        }
        if source.role == Role::Measure && kind != Allowed::Count {
            self.check_filtered_measure(&name, &source)?;
        }
        self.check_null_extended(&name, &source)?;
        // A value from rows a join copies would count once per copy: a one-to-many join onto
        // it (a self-join, say) scales or shifts it at will.
        if self.exact() && kind != Allowed::CountDistinct && self.copied[source.scan] {
            return Err(copied_denial(&name, &source));
        }
        match (source.role, kind) {
            (Role::Identifier, Allowed::CountDistinct) if source.is_unit => Ok(()),
            (Role::Identifier, _) => Err(deny(
                Rule::IdentifierInExpression,
                format!(
                    "the privacy unit `{}` may only be used in COUNT(DISTINCT ...)",
                    source.column
                ),
            )),
            (Role::JoinKey, _) => Err(join_key_denial(&source)),
            (Role::Measure, Allowed::CountDistinct) => Err(deny(
                Rule::DistinctNotAllowed,
                format!(
                    "COUNT(DISTINCT) of measure `{}` is not allowed",
                    source.column
                ),
            )),
            (Role::Measure | Role::Dimension | Role::Masked, _) => Ok(()),
            (Role::Hidden, _) => Err(deny(
                Rule::PlanNodeNotAllowed,
                format!("column `{}` is hidden", source.column),
            )),
        }
    }

    /// An aggregate argument that is an expression (`SUM(CASE WHEN d = 'x' THEN m END)`):
    /// allowed only where every dataset it reads grants `expression_arguments`, and then over
    /// measures, dimensions and generalized values only, with `CASE` allowed.
    fn argument_expr(
        &mut self,
        name: &str,
        kind: Allowed,
        argument: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<(), SqlError> {
        let mut sources = Vec::new();
        for referenced in argument.column_refs() {
            let found = self.lookup(referenced, schema, lineage)?;
            sources.extend(found.sources().into_iter().cloned());
        }
        // An identifier, join key or token hidden in the expression gets its own rule; measures
        // are what the argument aggregates.
        self.check_derived_sources(&sources, true)?;
        if let Some(source) = sources.iter().find(|s| self.exact() && self.copied[s.scan]) {
            return Err(copied_denial(name, source));
        }
        if kind != Allowed::Count {
            for source in sources.iter().filter(|s| s.role == Role::Measure) {
                self.check_filtered_measure(name, source)?;
            }
        }
        for source in &sources {
            self.check_null_extended(name, source)?;
        }
        let granted = !sources.is_empty()
            && sources.iter().all(|s| {
                self.modes
                    .get(s.dataset.as_ref())
                    .is_some_and(|m| m.expression_arguments)
            });
        if !granted || kind == Allowed::CountDistinct {
            return Err(deny(
                Rule::AggregateArgumentNotPlain,
                format!(
                    "`{name}` must aggregate a plain column, not an expression (predicates \
                     smuggled into aggregates are refused unless the grant sets \
                     `expression_arguments`)"
                ),
            ));
        }
        check_argument_kinds(argument, schema)
    }

    /// An exact answer may not aggregate the value of a measure a range filter also compares:
    /// `WHERE capital = 1000000 OR <one enterprise's public traits>` keeps 63 enterprises of
    /// a known capital and the target, enough for the threshold, and their sum minus 63 million
    /// is the target's capital. (Counting such rows is fine: the differencing defense covers
    /// who is counted; under differential privacy the noise covers both. A template's filters
    /// are the reviewed text, with approved values.)
    fn check_filtered_measure(&self, function: &str, source: &Source) -> Result<(), SqlError> {
        let key = format!("{}.{}", source.dataset, source.column);
        if self.context == Mode::Aggregate && self.filtered_measures.contains(&key) {
            return Err(deny(
                Rule::FilteredMeasureAggregated,
                format!(
                    "`{function}` of `{key}` with a range filter on it: the filter fixes the \
                     value of every row it keeps but the few it wants to single out; in an exact \
                     answer, filter on one measure and aggregate others, or count"
                ),
            ));
        }
        Ok(())
    }

    /// An exact answer may not aggregate values of the null-extended side of a left join: the
    /// rows that feed such an aggregate are the matched ones, while the differencing defense
    /// compares all the rows of the preserved side. Two answers whose preserved rows differ by
    /// hundreds, and whose matched rows by one enterprise, subtract to its value. (A count of
    /// rows counts the preserved side, which the defense sees; an inner join aggregates the
    /// matched rows and compares those.)
    fn check_null_extended(&self, function: &str, source: &Source) -> Result<(), SqlError> {
        if self.exact() && self.null_extended[source.scan] {
            return Err(deny(
                Rule::NullExtendedAggregated,
                format!(
                    "`{function}` of `{}.{}`, on the side of a left join that can be null: in an \
                     exact answer aggregate it over an inner join",
                    source.dataset, source.column
                ),
            ));
        }
        Ok(())
    }

    fn check_level(&self, source: &Source) -> Result<(), SqlError> {
        if source.level.allows_mode(self.context) {
            Ok(())
        } else {
            Err(deny(
                Rule::LevelCap,
                format!(
                    "column `{}.{}` is {}: it needs differential privacy, an approved template \
                     or approved code, not {}",
                    source.dataset,
                    source.column,
                    source.level.as_str(),
                    self.context.as_str()
                ),
            ))
        }
    }

    /// Identifiers, join keys, masked tokens and (unless `measures_allowed`, inside an aggregate
    /// argument) measures may not enter row-level expressions; columns above the level cap may
    /// not be used at all.
    fn check_derived_sources(
        &self,
        sources: &[Source],
        measures_allowed: bool,
    ) -> Result<(), SqlError> {
        for source in sources {
            self.check_level(source)?;
            match source.role {
                Role::Identifier => {
                    return Err(deny(
                        Rule::IdentifierInExpression,
                        format!(
                            "the privacy unit `{}` may not be compared to values or used in expressions",
                            source.column
                        ),
                    ));
                }
                Role::JoinKey => return Err(join_key_denial(source)),
                Role::Measure if measures_allowed => {}
                Role::Measure => {
                    return Err(deny(
                        Rule::MeasureOutsideAggregate,
                        format!(
                            "measure `{}` may only be used as the plain argument of an allowed aggregate",
                            source.column
                        ),
                    ));
                }
                Role::Masked if source.is_token() => return Err(masked_denial(source)),
                Role::Masked | Role::Dimension | Role::Hidden => {}
            }
        }
        Ok(())
    }
}

/// The column equalities of a join, as (left source, right source), for both guards. Refuses
/// cross joins, join types other than inner and left, NULL-matching keys, conditions other than
/// a conjunction of equalities, and keys that are not plain columns of their side. Which roles
/// may be joined is each guard's decision.
pub(crate) fn join_equalities(
    join: &Join,
    left: &[Lineage],
    right: &[Lineage],
) -> Result<Vec<(Source, Source)>, SqlError> {
    if join.on.is_empty() && join.filter.is_none() {
        return Err(deny(
            Rule::CrossJoin,
            "joins need a condition: write `JOIN ... ON` on the privacy unit or a join key",
        ));
    }
    if !matches!(join.join_type, JoinType::Inner | JoinType::Left) {
        return Err(deny(
            Rule::JoinTypeNotAllowed,
            format!(
                "{} joins are not allowed; use an inner or left join",
                join.join_type
            ),
        ));
    }
    if join.null_equality != NullEquality::NullEqualsNothing {
        return Err(deny(
            Rule::JoinConditionNotAllowed,
            "join keys must not match NULL to NULL",
        ));
    }
    let (left_schema, right_schema) = (join.left.schema(), join.right.schema());
    let side = |expr: &Expr, schema: &DFSchema, lineage: &[Lineage]| match strip_alias(expr) {
        Expr::Column(column) if schema.has_column(column) => {
            match lineage_of(column, schema, lineage)? {
                Lineage::Plain(source) => Ok(source),
                Lineage::Derived(_) => Err(deny(
                    Rule::JoinConditionNotAllowed,
                    "join keys must be plain columns, not derived ones",
                )),
            }
        }
        Expr::Column(_) => Err(deny(
            Rule::JoinConditionNotAllowed,
            "each join equality must compare a column of one side with a column of the other",
        )),
        _ => Err(deny(
            Rule::JoinConditionNotAllowed,
            "join keys must be plain columns, not expressions",
        )),
    };
    // The SQL planner puts `ON` conditions in the filter, `USING` ones in `on`.
    let mut pairs = Vec::new();
    for (l, r) in &join.on {
        pairs.push((side(l, left_schema, left)?, side(r, right_schema, right)?));
    }
    if let Some(filter) = &join.filter {
        for conjunct in split_conjunction(filter) {
            let Expr::BinaryExpr(BinaryExpr {
                left: a,
                op: Operator::Eq,
                right: b,
            }) = conjunct
            else {
                return Err(deny(
                    Rule::JoinConditionNotAllowed,
                    "join conditions must be equalities of columns joined by AND",
                ));
            };
            // Orient each equality as (left side, right side).
            let a_on_left = matches!(strip_alias(a), Expr::Column(c) if left_schema.has_column(c));
            let (a, b) = if a_on_left { (a, b) } else { (b, a) };
            pairs.push((side(a, left_schema, left)?, side(b, right_schema, right)?));
        }
    }
    Ok(pairs)
}

fn copied_denial(function: &str, source: &Source) -> SqlError {
    deny(
        Rule::JoinCopiesRows,
        format!(
            "`{function}` of `{}.{}` would count rows a join copies (the other side has several \
             rows per join key); aggregate values of the side that is not copied, or ask for \
             differential privacy",
            source.dataset, source.column
        ),
    )
}

fn join_key_denial(source: &Source) -> SqlError {
    deny(
        Rule::JoinKeyOutsideJoin,
        format!(
            "`{}.{}` is a join key: it may only appear in an equi-join condition",
            source.dataset, source.column
        ),
    )
}

fn masked_denial(source: &Source) -> SqlError {
    deny(
        Rule::MaskedValueInExpression,
        format!(
            "`{}.{}` is masked ({}): it may be output and grouped on, not compared or transformed",
            source.dataset,
            source.column,
            source.mask.map_or_else(String::new, Mask::describe)
        ),
    )
}

/// The expression kinds of an aggregate argument under `expression_arguments`: the row-level
/// allow-list with `CASE`.
fn check_argument_kinds(expr: &Expr, schema: &DFSchema) -> Result<(), SqlError> {
    match expr {
        Expr::Column(_) | Expr::Literal(..) => Ok(()),
        Expr::Alias(alias) => check_argument_kinds(&alias.expr, schema),
        other => {
            for child in expression_children(other, schema, true)? {
                check_argument_kinds(child, schema)?;
            }
            Ok(())
        }
    }
}

/// Whether an aggregate expression is exactly `COUNT(DISTINCT <privacy unit>)`, with no filter.
fn counts_distinct_units(expr: &Expr, schema: &DFSchema, lineage: &[Lineage]) -> bool {
    let Expr::AggregateFunction(function) = strip_alias(expr) else {
        return false;
    };
    let params = &function.params;
    if !function.func.name().eq_ignore_ascii_case("count")
        || !params.distinct
        || params.filter.is_some()
        || !params.order_by.is_empty()
    {
        return false;
    }
    match params.args.as_slice() {
        [Expr::Column(column)] => schema
            .index_of_column(column)
            .ok()
            .and_then(|i| lineage.get(i))
            .is_some_and(Lineage::is_plain_unit),
        _ => false,
    }
}

pub(crate) fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => strip_alias(&alias.expr),
        other => other,
    }
}

/// The children of an expression kind the guard allows, or the denial for any other kind.
fn allowed_children<'e>(expr: &'e Expr, schema: &DFSchema) -> Result<Vec<&'e Expr>, SqlError> {
    expression_children(expr, schema, false)
}

/// The children of an allowed expression kind. `CASE` is allowed only in row mode (a code job's
/// input, which never leaves the sandbox): in released aggregates it would smuggle predicates.
pub(crate) fn expression_children<'e>(
    expr: &'e Expr,
    schema: &DFSchema,
    case_allowed: bool,
) -> Result<Vec<&'e Expr>, SqlError> {
    Ok(match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            if !allowed_operator(*op) {
                return Err(deny(
                    Rule::ExpressionNotAllowed,
                    format!("operator `{op}` is not allowed"),
                ));
            }
            if matches!(op, Operator::Divide | Operator::Modulo)
                && !division_cannot_fail(expr, right, schema)
            {
                // Integer division by zero raises an error, and so does i64::MIN / -1; whether
                // it does would depend on the data (including groups the gate later
                // suppresses): a side channel.
                return Err(deny(
                    Rule::ExpressionMayFail,
                    "integer division or modulo by a data value or by -1 can fail depending on \
                     the data; divide floating-point values, or by another non-zero constant",
                ));
            }
            if matches!(
                op,
                Operator::Plus
                    | Operator::Minus
                    | Operator::Multiply
                    | Operator::Divide
                    | Operator::Modulo
            ) && [left.as_ref(), right.as_ref(), expr]
                .iter()
                .any(|e| e.get_type(schema).is_ok_and(|t| is_decimal(&t)))
            {
                // Integer arithmetic wraps; decimal arithmetic raises on overflow.
                return Err(deny(
                    Rule::ExpressionMayFail,
                    "decimal arithmetic can fail on overflow depending on the data; TRY_CAST \
                     to DOUBLE first",
                ));
            }
            vec![left.as_ref(), right.as_ref()]
        }
        Expr::Like(like) if like.escape_char.is_none() => {
            vec![like.expr.as_ref(), like.pattern.as_ref()]
        }
        Expr::Not(e)
        | Expr::IsNull(e)
        | Expr::IsNotNull(e)
        | Expr::IsTrue(e)
        | Expr::IsFalse(e)
        | Expr::IsUnknown(e)
        | Expr::IsNotTrue(e)
        | Expr::IsNotFalse(e)
        | Expr::IsNotUnknown(e)
        | Expr::Negative(e) => vec![e.as_ref()],
        Expr::Between(between) => vec![
            between.expr.as_ref(),
            between.low.as_ref(),
            between.high.as_ref(),
        ],
        Expr::Cast(cast) => {
            if !is_constant(&cast.expr) {
                // CAST raises on values it cannot convert, so its errors depend on the data.
                return Err(deny(
                    Rule::ExpressionNotAllowed,
                    "CAST of a data value can fail depending on the data; use TRY_CAST",
                ));
            }
            vec![cast.expr.as_ref()]
        }
        Expr::TryCast(cast) => vec![cast.expr.as_ref()],
        Expr::InList(in_list) => {
            let mut children = vec![in_list.expr.as_ref()];
            children.extend(in_list.list.iter());
            children
        }
        Expr::ScalarFunction(function) => {
            let name = function.func.name();
            if !SCALAR_FUNCTIONS.contains(&name) {
                return Err(deny(
                    Rule::ScalarFunctionNotAllowed,
                    format!("function `{name}` is not allowed"),
                ));
            }
            if let Some(reason) = may_fail(name, &function.args, schema) {
                return Err(deny(
                    Rule::ExpressionMayFail,
                    format!(
                        "`{name}` {reason}: an error would depend on the data (on whether any \
                         row reaches it)"
                    ),
                ));
            }
            function.args.iter().collect()
        }
        Expr::Case(case) if case_allowed => {
            let mut children: Vec<&Expr> = case.expr.iter().map(|e| e.as_ref()).collect();
            for (when, then) in &case.when_then_expr {
                children.push(when.as_ref());
                children.push(then.as_ref());
            }
            children.extend(case.else_expr.iter().map(|e| e.as_ref()));
            children
        }
        Expr::Case(_) => {
            return Err(deny(
                Rule::ExpressionNotAllowed,
                "CASE is not allowed (data-dependent branches)",
            ));
        }
        Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::ScalarSubquery(_)
        | Expr::SetComparison(_) => {
            return Err(deny(Rule::SubqueryNotAllowed, "subqueries are not allowed"));
        }
        Expr::WindowFunction(_) => {
            return Err(deny(
                Rule::PlanNodeNotAllowed,
                "window functions are not allowed",
            ));
        }
        Expr::AggregateFunction(_) => {
            return Err(deny(
                Rule::NestedAggregateNotSupported,
                "aggregate functions are only allowed in the select list of an aggregate query",
            ));
        }
        other => {
            return Err(deny(
                Rule::ExpressionNotAllowed,
                format!("expression `{}` is not allowed", expr_kind(other)),
            ));
        }
    })
}

/// Whether an expression is a constant: literals, possibly cast or negated.
/// Date parts and truncation units `date_part` and `date_trunc` accept.
const DATE_UNITS: &[&str] = &[
    "year", "quarter", "month", "week", "day", "hour", "minute", "second", "dow", "doy",
];

/// The largest magnitude a literal count or position may have: far beyond any text the
/// datasets hold, far below the values where the functions' own arithmetic overflows.
const LITERAL_ARGUMENT_LIMIT: i64 = 1 << 31;

/// Why a call of an allowed scalar function could raise an error at run time, if it could: only
/// forms that cannot fail on any value are allowed, so that whether a query fails never depends
/// on the data (a call that fails on every row still tells whether any row reached it). Every
/// literal count, position or precision is range-checked.
fn may_fail(name: &str, args: &[Expr], schema: &DFSchema) -> Option<&'static str> {
    let literal = |e: &Expr| match strip_alias(e) {
        Expr::Literal(value, _) => Some(value.clone()),
        _ => None,
    };
    let integer = |e: &Expr| {
        literal(e).and_then(|v| match v {
            ScalarValue::Int64(Some(n)) => Some(n),
            ScalarValue::Int32(Some(n)) => Some(i64::from(n)),
            ScalarValue::Int16(Some(n)) => Some(i64::from(n)),
            ScalarValue::Int8(Some(n)) => Some(i64::from(n)),
            ScalarValue::UInt32(Some(n)) => Some(i64::from(n)),
            ScalarValue::UInt16(Some(n)) => Some(i64::from(n)),
            ScalarValue::UInt8(Some(n)) => Some(i64::from(n)),
            ScalarValue::UInt64(Some(n)) => i64::try_from(n).ok(),
            _ => None,
        })
    };
    let within =
        |e: &Expr, low: i64, high: i64| integer(e).is_some_and(|n| (low..=high).contains(&n));
    let floating = |e: &Expr| e.get_type(schema).is_ok_and(|t| t.is_floating());
    let limit = LITERAL_ARGUMENT_LIMIT;
    match name {
        "substr" => (!(args.get(1).is_some_and(|a| within(a, -limit, limit))
            && args.get(2).is_none_or(|a| within(a, 0, limit))))
        .then_some("takes a constant start within ±2^31 and a constant length from 0 to 2^31"),
        "left" | "right" => (!args.get(1).is_some_and(|a| within(a, -limit, limit)))
            .then_some("takes a constant count within ±2^31"),
        // Rounding integers and decimals checks for overflow; floating point cannot overflow.
        "round" => (!(args.first().is_some_and(floating)
            && args.get(1).is_none_or(|a| within(a, -30, 30))))
        .then_some("rounds floating-point values only, to a constant from -30 to 30 places"),
        "floor" | "ceil" => (!args.first().is_some_and(floating))
            .then_some("takes floating-point values only (integers need no rounding)"),
        "date_part" | "date_trunc" => {
            let known = args
                .first()
                .and_then(literal)
                .is_some_and(|unit| match unit {
                    ScalarValue::Utf8(Some(u)) | ScalarValue::LargeUtf8(Some(u)) => {
                        DATE_UNITS.contains(&u.to_ascii_lowercase().as_str())
                    }
                    _ => false,
                });
            // A text argument is parsed as a timestamp, row by row: it fails on text that is not.
            let temporal = args.get(1).is_some_and(|a| {
                a.get_type(schema).is_ok_and(|t| {
                    matches!(
                        t,
                        DataType::Date32 | DataType::Date64 | DataType::Timestamp(..)
                    )
                })
            });
            (!known || !temporal).then_some(
                "takes a constant unit it knows (year, quarter, month, ...) and a date or \
                 timestamp column",
            )
        }
        _ => None,
    }
}

fn is_decimal(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Decimal32(..)
            | DataType::Decimal64(..)
            | DataType::Decimal128(..)
            | DataType::Decimal256(..)
    )
}

fn is_constant(expr: &Expr) -> bool {
    match expr {
        Expr::Literal(..) => true,
        Expr::Cast(cast) => is_constant(&cast.expr),
        Expr::TryCast(cast) => is_constant(&cast.expr),
        Expr::Negative(inner)
        | Expr::Alias(datafusion::logical_expr::expr::Alias { expr: inner, .. }) => {
            is_constant(inner)
        }
        _ => false,
    }
}

/// A division or modulo cannot raise an error when its result is floating point (IEEE 754 gives
/// infinities and NaN) or when it divides integers by a literal other than 0 and -1 (the least
/// integer divided by -1 overflows).
fn division_cannot_fail(division: &Expr, divisor: &Expr, schema: &DFSchema) -> bool {
    let floating = division.get_type(schema).is_ok_and(|t| t.is_floating());
    let safe_literal = match strip_alias(divisor) {
        Expr::Literal(value, _) => {
            let data_type = value.data_type();
            !value.is_null()
                && data_type.is_integer()
                && ScalarValue::new_zero(&data_type).is_ok_and(|zero| zero != *value)
                && ScalarValue::new_negative_one(&data_type).map_or(true, |minus| minus != *value)
        }
        _ => false,
    };
    floating || safe_literal
}

fn expr_kind(expr: &Expr) -> &str {
    expr.variant_name()
}

fn allowed_operator(op: Operator) -> bool {
    use Operator::*;
    matches!(
        op,
        Eq | NotEq
            | Lt
            | LtEq
            | Gt
            | GtEq
            | Plus
            | Minus
            | Multiply
            | Divide
            | Modulo
            | And
            | Or
            | IsDistinctFrom
            | IsNotDistinctFrom
            | StringConcat
    )
}

pub(crate) fn no_grouping_sets(aggregate: &Aggregate) -> Result<(), SqlError> {
    if aggregate
        .group_expr
        .iter()
        .any(|e| matches!(e, Expr::GroupingSet(_)))
    {
        return Err(deny(
            Rule::ExpressionNotAllowed,
            "GROUPING SETS, ROLLUP and CUBE are not supported",
        ));
    }
    Ok(())
}

/// An aggregate over released rows of an inner aggregate: one of the functions the grant allows,
/// without modifiers, over expressions of the inner query's output columns.
fn outer_aggregate_expr(
    expr: &Expr,
    schema: &DFSchema,
    functions: &BTreeSet<Allowed>,
) -> Result<(), SqlError> {
    let function = match expr {
        Expr::Alias(alias) => return outer_aggregate_expr(&alias.expr, schema, functions),
        Expr::AggregateFunction(function) => function,
        _ => {
            return Err(deny(
                Rule::ExpressionNotAllowed,
                "only aggregate function calls are allowed in the aggregate",
            ));
        }
    };
    let name = function.func.name().to_ascii_lowercase();
    let params = &function.params;
    if params.filter.is_some() || !params.order_by.is_empty() {
        return Err(deny(
            Rule::AggregateModifierNotAllowed,
            format!("FILTER and ORDER BY inside `{name}` are not allowed"),
        ));
    }
    let kind = aggregate_kind(&name, params.distinct)?;
    if !functions.contains(&kind) {
        return Err(deny(
            Rule::FunctionNotAllowed,
            format!("aggregate `{}` is not allowed by your grant", kind.as_str()),
        ));
    }
    for argument in &params.args {
        post_aggregate_expr(argument, schema)?;
    }
    Ok(())
}

/// Expressions over aggregated values (above the aggregate): the same expression kinds, over
/// columns that are group keys or allowed aggregates.
pub(crate) fn post_aggregate_expr(expr: &Expr, schema: &DFSchema) -> Result<(), SqlError> {
    match expr {
        Expr::Column(_) | Expr::Literal(..) => Ok(()),
        Expr::Alias(alias) => post_aggregate_expr(&alias.expr, schema),
        other => {
            for child in allowed_children(other, schema)? {
                post_aggregate_expr(child, schema)?;
            }
            Ok(())
        }
    }
}

/// Source columns (and roles) reaching the output of a plan without aggregate, for the most
/// specific denial. Best effort: nodes it does not know contribute nothing.
fn raw_sources(
    plan: &LogicalPlan,
    granted: &HashMap<String, GrantedDataset>,
    out: &mut Vec<(String, Role)>,
) {
    match plan {
        LogicalPlan::TableScan(scan) => {
            if let Some(dataset) = granted.get(scan.table_name.table()) {
                for field in scan.projected_schema.fields() {
                    out.push((field.name().clone(), dataset.policy.role_of(field.name())));
                }
            }
        }
        LogicalPlan::Projection(projection) => {
            let mut inner = Vec::new();
            raw_sources(&projection.input, granted, &mut inner);
            let schema = projection.input.schema();
            // One entry per output column: the most sensitive role among its inputs.
            for expr in &projection.expr {
                let mut role = Role::Dimension;
                for column in expr.column_refs() {
                    if let Ok(index) = schema.index_of_column(column)
                        && let Some((_, found)) = inner.get(index)
                    {
                        role = match (role, *found) {
                            (Role::Identifier, _) | (_, Role::Identifier) => Role::Identifier,
                            (Role::Measure, _) | (_, Role::Measure) => Role::Measure,
                            (current, _) => current,
                        };
                    }
                }
                out.push((expr.schema_name().to_string(), role));
            }
        }
        other => {
            for input in other.inputs() {
                raw_sources(input, granted, out);
            }
        }
    }
}

/// The policy's name for an aggregate call, or `function-not-allowed`.
fn aggregate_kind(name: &str, distinct: bool) -> Result<Allowed, SqlError> {
    Ok(match (name, distinct) {
        ("count", false) => Allowed::Count,
        ("count", true) => Allowed::CountDistinct,
        ("sum", _) => Allowed::Sum,
        ("avg", _) => Allowed::Avg,
        ("min", _) => Allowed::Min,
        ("max", _) => Allowed::Max,
        _ => {
            return Err(deny(
                Rule::FunctionNotAllowed,
                format!("aggregate function `{name}` is not allowed"),
            ));
        }
    })
}

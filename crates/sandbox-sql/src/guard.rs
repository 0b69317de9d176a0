//! The plan guard: walks a DataFusion `LogicalPlan` (never the SQL text), tracks which source
//! columns flow into every expression, enforces the column roles of the policy, and rewrites the
//! aggregate to carry the hidden count of distinct privacy units per group.
//!
//! The accepted shape, outermost first:
//!
//! ```text
//! [Limit] (Sort | Projection | SubqueryAlias | Filter)*  Aggregate  (Filter | Projection | SubqueryAlias)*  TableScan
//! ```
//!
//! A filter over aggregated rows (`HAVING`, or a `WHERE` over an aggregating derived table) is
//! not run as a filter: the rewrite turns it into a hidden boolean column [`HAVING_COLUMN`], and
//! the gate drops rows whose predicate is not true *after* counting the suppressed ones. Run as a
//! filter, it would decide which small groups reach the gate, so the count of suppressed rows
//! would answer the predicate about groups that are never released.
//!
//! Everything else is denied with the rule that explains why. The guard is an allow-list: a plan
//! node, expression kind or function it does not know is denied.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, DFSchema, ScalarValue, TableReference};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{
    Aggregate, AggregateUDF, BinaryExpr, Expr, ExprSchemable, FetchType, LogicalPlan, Operator,
    Projection, SkipType, Sort, SubqueryAlias, TableScan, cast,
};
use sandbox_policy::{AggregateFunction as Allowed, AggregateMode, DatasetPolicy, Level, Role};

use crate::error::{Denial, Rule, SqlError};
use crate::units::CappedUnits;

/// Prefix and name of the hidden unit-count column. They match `sandbox-release`'s constants; the
/// engine checks that at start so the two cannot drift.
pub const HIDDEN_PREFIX: &str = "__sandbox_";
pub const UNITS_COLUMN: &str = "__sandbox_units";
/// Hidden column carrying a `HAVING` predicate per aggregated row, for the gate to apply after
/// suppression (see [`guard`]).
pub const HAVING_COLUMN: &str = "__sandbox_having";

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
    "abs",
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
}

/// Where a value in the plan comes from.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub(crate) dataset: Arc<str>,
    pub(crate) column: Arc<str>,
    pub(crate) role: Role,
    pub(crate) level: Level,
    pub(crate) is_unit: bool,
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
enum Use {
    Filter,
    Group,
    Derive,
}

struct Guard<'a> {
    granted: &'a HashMap<String, GrantedDataset>,
    datasets: BTreeSet<String>,
    columns: BTreeSet<String>,
    /// The aggregate mode of the (single) dataset scanned.
    mode: Option<AggregateMode>,
}

/// Checks a plan against the caller's grants and rewrites it for the release gate.
pub fn guard(
    plan: &LogicalPlan,
    granted: &HashMap<String, GrantedDataset>,
) -> Result<Guarded, SqlError> {
    let mut guard = Guard {
        granted,
        datasets: BTreeSet::new(),
        columns: BTreeSet::new(),
        mode: None,
    };
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

    let (input_lineage, _) = guard.below(&aggregate.input)?;
    let mode = guard
        .mode
        .clone()
        .expect("below() sets the mode whenever it returns Ok");
    let input_schema = aggregate.input.schema();
    for expr in &aggregate.group_expr {
        if matches!(expr, Expr::GroupingSet(_)) {
            return Err(deny(
                Rule::ExpressionNotAllowed,
                "GROUPING SETS, ROLLUP and CUBE are not supported",
            ));
        }
        guard.row_expr(expr, input_schema, &input_lineage, Use::Group)?;
    }
    for expr in &aggregate.aggr_expr {
        guard.aggregate_expr(expr, input_schema, &input_lineage, &mode)?;
    }

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
                skip = match limit.get_skip_type() {
                    Ok(SkipType::Literal(n)) => n,
                    _ => return Err(deny(Rule::LimitNotConstant, "OFFSET must be a constant")),
                };
                fetch = match limit.get_fetch_type() {
                    Ok(FetchType::Literal(n)) => n,
                    _ => return Err(deny(Rule::LimitNotConstant, "LIMIT must be a constant")),
                };
            }
            LogicalPlan::Filter(filter) => {
                post_aggregate_expr(&filter.predicate, filter.input.schema())?;
            }
            LogicalPlan::SubqueryAlias(_) => {}
            other => return Err(node_denial(other)),
        }
    }

    // The rewrite: count distinct privacy units per group, and carry the count to the output.
    let unit_index = input_lineage
        .iter()
        .position(Lineage::is_plain_unit)
        .ok_or_else(|| {
            deny(
                Rule::PrivacyUnitUnavailable,
                "the privacy unit column must reach the aggregate; derived tables that drop it \
                 are not supported",
            )
        })?;
    let (qualifier, field) = input_schema.qualified_field(unit_index);
    let unit_column = Expr::Column(Column::new(qualifier.cloned(), field.name()));
    if let Lineage::Plain(source) = &input_lineage[unit_index] {
        guard
            .columns
            .insert(format!("{}.{}", source.dataset, source.column));
    }
    let existing_exact_count = aggregate
        .aggr_expr
        .iter()
        .position(|expr| counts_distinct_units(expr, input_schema, &input_lineage));
    let mut rewritten = match existing_exact_count {
        // The query already counts distinct units exactly: the hidden count is that column.
        // Adding the capped counter beside it would also stop DataFusion from planning the
        // `COUNT(DISTINCT)` as a two-phase group-by, which is much slower.
        Some(index) => {
            let plan = LogicalPlan::Aggregate(aggregate.clone());
            let schema = plan.schema().clone();
            let mut exprs: Vec<Expr> = schema
                .iter()
                .map(|(qualifier, field)| {
                    Expr::Column(Column::new(qualifier.cloned(), field.name()))
                })
                .collect();
            let (qualifier, field) = schema.qualified_field(aggregate.group_expr.len() + index);
            exprs.push(
                cast(
                    Expr::Column(Column::new(qualifier.cloned(), field.name())),
                    DataType::UInt64,
                )
                .alias(UNITS_COLUMN),
            );
            LogicalPlan::Projection(
                Projection::try_new(exprs, Arc::new(plan)).map_err(rewrite_error)?,
            )
        }
        None => {
            let units = Expr::AggregateFunction(AggregateFunction::new_udf(
                Arc::new(AggregateUDF::new_from_impl(CappedUnits::new(
                    mode.min_units,
                ))),
                vec![unit_column],
                false,
                None,
                vec![],
                None,
            ))
            .alias(UNITS_COLUMN);
            let mut aggr_expr = aggregate.aggr_expr.clone();
            aggr_expr.push(units);
            LogicalPlan::Aggregate(
                Aggregate::try_new(
                    aggregate.input.clone(),
                    aggregate.group_expr.clone(),
                    aggr_expr,
                )
                .map_err(rewrite_error)?,
            )
        }
    };
    let mut having = false;
    for node in chain.iter().rev() {
        rewritten = match node {
            LogicalPlan::Projection(projection) => {
                let mut exprs = projection.expr.clone();
                exprs.push(Expr::Column(Column::new_unqualified(UNITS_COLUMN)));
                if having {
                    exprs.push(Expr::Column(Column::new_unqualified(HAVING_COLUMN)));
                }
                LogicalPlan::Projection(
                    Projection::try_new(exprs, Arc::new(rewritten)).map_err(rewrite_error)?,
                )
            }
            // Every column passes, plus the predicate as a hidden column for the gate.
            LogicalPlan::Filter(filter) => {
                let mut exprs: Vec<Expr> = rewritten
                    .schema()
                    .iter()
                    .map(|(qualifier, field)| {
                        Expr::Column(Column::new(qualifier.cloned(), field.name()))
                    })
                    .collect();
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

    Ok(Guarded {
        plan: rewritten,
        min_units: mode.min_units,
        skip,
        fetch,
        datasets: guard.datasets.into_iter().collect(),
        columns: guard.columns.into_iter().collect(),
    })
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
                is_unit: column.name == policy.privacy_unit,
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

fn rewrite_error(e: datafusion::error::DataFusionError) -> SqlError {
    // Fail closed: a plan the rewrite cannot rebuild is not run.
    SqlError::Plan(format!("cannot add the hidden unit count: {e}"))
}

fn single_input(node: &LogicalPlan) -> Result<&LogicalPlan, SqlError> {
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

fn contains_aggregate(plan: &LogicalPlan) -> bool {
    matches!(plan, LogicalPlan::Aggregate(_)) || plan.inputs().into_iter().any(contains_aggregate)
}

/// The denial for a plan node outside the accepted shape.
pub(crate) fn node_denial(node: &LogicalPlan) -> SqlError {
    match node {
        LogicalPlan::Join(_) => deny(Rule::JoinNotSupported, "joins are not supported yet"),
        LogicalPlan::Aggregate(_) => deny(
            Rule::NestedAggregateNotSupported,
            "aggregates over aggregates are not supported yet",
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
    /// Lineage of every output column of a node below the aggregate, and the dataset scanned.
    fn below(&mut self, node: &LogicalPlan) -> Result<(Vec<Lineage>, Arc<str>), SqlError> {
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
                if self.mode.is_some() {
                    return Err(deny(Rule::JoinNotSupported, "only one dataset per query"));
                }
                self.mode = Some(mode);
                self.datasets.insert(name.to_string());
                let dataset: Arc<str> = Arc::from(name);
                let lineage = scan_lineage(scan, &dataset, &granted.policy)?;
                Ok((lineage, dataset))
            }
            LogicalPlan::Filter(filter) => {
                let (lineage, dataset) = self.below(&filter.input)?;
                self.row_expr(
                    &filter.predicate,
                    filter.input.schema(),
                    &lineage,
                    Use::Filter,
                )?;
                Ok((lineage, dataset))
            }
            LogicalPlan::SubqueryAlias(alias) => self.below(&alias.input),
            LogicalPlan::Projection(projection) => {
                let (lineage, dataset) = self.below(&projection.input)?;
                let schema = projection.input.schema();
                let mut out = Vec::with_capacity(projection.expr.len());
                for expr in &projection.expr {
                    out.push(self.row_expr(expr, schema, &lineage, Use::Derive)?);
                }
                Ok((out, dataset))
            }
            other => Err(node_denial(other)),
        }
    }

    /// The denial for a query without an aggregate: the most specific rule that explains why its
    /// rows cannot be released.
    fn no_aggregate(&mut self, plan: &LogicalPlan) -> SqlError {
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

    fn lookup(
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

    /// Checks a row-level expression (below the aggregate) and returns its lineage.
    fn row_expr(
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
                check_derived_sources(&sources)?;
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
                check_level(source)?;
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
                    (Role::Measure, _) => {
                        return Err(deny(
                            Rule::MeasureOutsideAggregate,
                            format!(
                                "measure `{}` may only be used as the argument of an allowed aggregate",
                                source.column
                            ),
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(result)
    }

    fn aggregate_expr(
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
        let kind = match (name.as_str(), params.distinct) {
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
        };
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
            // COUNT(*) is planned as COUNT(1); a constant reveals nothing but the row count.
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
            // An identifier hidden in the expression gets its own, more specific rule.
            for referenced in argument.column_refs() {
                let found = self.lookup(referenced, schema, lineage)?;
                if let Some(unit) = found.sources().iter().find(|s| s.role == Role::Identifier) {
                    return Err(deny(
                        Rule::IdentifierInExpression,
                        format!(
                            "the privacy unit `{}` may not be used in expressions",
                            unit.column
                        ),
                    ));
                }
            }
            return Err(deny(
                Rule::AggregateArgumentNotPlain,
                format!(
                    "`{name}` must aggregate a plain column, not an expression (predicates smuggled into aggregates are refused)"
                ),
            ));
        };
        let source = match self.lookup(column, schema, lineage)? {
            Lineage::Plain(source) => source,
            Lineage::Derived(sources) => {
                check_derived_sources(&sources)?;
                return Err(deny(
                    Rule::AggregateArgumentNotPlain,
                    format!("`{name}` must aggregate a plain column, not a derived one"),
                ));
            }
        };
        check_level(&source)?;
        match (source.role, kind) {
            (Role::Identifier, Allowed::CountDistinct) if source.is_unit => Ok(()),
            (Role::Identifier, _) => Err(deny(
                Rule::IdentifierInExpression,
                format!(
                    "the privacy unit `{}` may only be used in COUNT(DISTINCT ...)",
                    source.column
                ),
            )),
            (Role::Measure, Allowed::CountDistinct) => Err(deny(
                Rule::DistinctNotAllowed,
                format!(
                    "COUNT(DISTINCT) of measure `{}` is not allowed",
                    source.column
                ),
            )),
            (Role::Measure | Role::Dimension, _) => Ok(()),
            (Role::Hidden, _) => Err(deny(
                Rule::PlanNodeNotAllowed,
                format!("column `{}` is hidden", source.column),
            )),
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

fn check_level(source: &Source) -> Result<(), SqlError> {
    if source.level.allows_ad_hoc_aggregate() {
        Ok(())
    } else {
        Err(deny(
            Rule::LevelCap,
            format!(
                "column `{}.{}` is {}: it needs differential privacy or approved code, not ad-hoc SQL",
                source.dataset,
                source.column,
                source.level.as_str()
            ),
        ))
    }
}

/// Identifiers and measures may not enter expressions; L4 columns may not be used at all.
fn check_derived_sources(sources: &[Source]) -> Result<(), SqlError> {
    for source in sources {
        check_level(source)?;
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
            Role::Measure => {
                return Err(deny(
                    Rule::MeasureOutsideAggregate,
                    format!(
                        "measure `{}` may only be used as the plain argument of an allowed aggregate",
                        source.column
                    ),
                ));
            }
            Role::Dimension | Role::Hidden => {}
        }
    }
    Ok(())
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
                // Integer division by zero raises an error; whether it does would depend on the
                // data (including rows the gate later suppresses): a side channel.
                return Err(deny(
                    Rule::ExpressionNotAllowed,
                    "integer division by a data value can fail depending on the data; divide \
                     floating-point values or by a non-zero constant",
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
/// infinities and NaN) or when it divides by a non-zero numeric literal.
fn division_cannot_fail(division: &Expr, divisor: &Expr, schema: &DFSchema) -> bool {
    let floating = division.get_type(schema).is_ok_and(|t| t.is_floating());
    let nonzero_literal = match strip_alias(divisor) {
        Expr::Literal(value, _) => {
            !value.is_null()
                && value.data_type().is_numeric()
                && ScalarValue::new_zero(&value.data_type()).is_ok_and(|zero| zero != *value)
        }
        _ => false,
    };
    floating || nonzero_literal
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

/// Expressions over aggregated values (above the aggregate): the same expression kinds, over
/// columns that are group keys or allowed aggregates.
fn post_aggregate_expr(expr: &Expr, schema: &DFSchema) -> Result<(), SqlError> {
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

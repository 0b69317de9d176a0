//! The plan guard under differential privacy: the same checks as the exact guard (roles, level
//! caps with L4 measures allowed, joins, functions of the grant), then a rewrite that bounds what
//! one privacy unit can contribute, so that the gate can add noise scaled to that bound.
//!
//! The accepted shape is `[Limit] [Sort over group keys] Projection Aggregate Input`, the
//! aggregates `COUNT(*)`, `COUNT(column)`, `COUNT(DISTINCT <privacy unit>)`, and `SUM`/`AVG` of a
//! measure with declared bounds; one unit class (joins on the privacy unit only). The rewrite:
//!
//! ```text
//! Projection(keys under the query's names, __sandbox_dp_<i>..., __sandbox_units)
//!   Aggregate(group by keys: SUM(contribution_i), COUNT(*) AS units)     -- per group
//!     Filter(rank <= max_groups_per_unit)                                 -- only if grouped
//!       Window(ROW_NUMBER() OVER (PARTITION BY unit ORDER BY random()) AS rank)
//!         Projection(unit, keys, contribution_i)                         -- bounded per unit
//!           Aggregate(group by unit, keys: COUNT(*), COUNT(x), SUM(clamp(x)))
//!             Input
//! ```
//!
//! A unit's contribution to a group: its row count capped at `max_rows_per_unit`; for a sum, its
//! mean of clamped values times that capped count (so a sum and the count beside it stay
//! consistent, and `AVG` is not biased by the cap). A unit in more than `max_groups_per_unit`
//! groups keeps as many, chosen at random. Nothing here depends on the values other units hold.
//!
//! When every group key is a dimension whose owner declared its values public (`domain`), the
//! per-group aggregate is joined onto the list of every combination of them (`VALUES ... LEFT
//! JOIN`): each shows, an empty one with zero figures to be noised, rows with other keys are
//! left out, and the gate needs no partition selection. The order and number of output rows then
//! depend on the policy alone.

use std::collections::HashMap;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, ScalarValue};
use datafusion::functions::math::expr_fn::random;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    Aggregate, Expr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder, SortExpr, cast,
    lit, when,
};
use sandbox_policy::{AggregateFunction as Allowed, Mode, Role};
use sandbox_release::dp::{DpOutput, DpSpec, DpStat, stat_column};

use crate::error::{Rule, SqlError};
use crate::guard::{
    DpGuarded, GrantedDataset, Guard, Guarded, Lineage, UNITS_COLUMN, Use, contains_aggregate,
    deny, no_grouping_sets, rewrite_error, single_input, strip_alias, uses_reserved_name,
};

/// The grant of every table the plan scans that is a dataset granted to the caller (unknown
/// tables are the guard's to refuse).
pub(crate) fn scanned<'g>(
    plan: &LogicalPlan,
    granted: &'g HashMap<String, GrantedDataset>,
) -> Vec<&'g GrantedDataset> {
    let mut scans = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let Some(grant) = granted.get(scan.table_name.table())
        {
            scans.push(grant);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    scans
}

fn unsupported(message: impl Into<String>) -> SqlError {
    deny(Rule::DpNotSupported, message)
}

/// A statistic the plan computes per group, before noise, and the input column it reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stat {
    /// Rows of the group (`COUNT(*)`).
    Rows,
    /// Non-null values of input column `i`.
    Values(usize),
    /// Distinct units (ungrouped `COUNT(DISTINCT unit)`).
    Units,
    /// Sum of input column `i`, clamped to the bounds.
    Sum(usize, f64, f64),
}

pub(crate) fn guard_dp(
    plan: &LogicalPlan,
    granted: &HashMap<String, GrantedDataset>,
) -> Result<Guarded, SqlError> {
    if uses_reserved_name(plan) {
        return Err(deny(
            Rule::ReservedName,
            format!(
                "names starting with `{}` are reserved",
                crate::guard::HIDDEN_PREFIX
            ),
        ));
    }
    // A query without an aggregate would release rows: the most specific rule that says why.
    if !contains_aggregate(plan) {
        return Err(Guard::new(granted, Mode::Private).no_aggregate(plan));
    }
    // [Limit] [Sort] Projection Aggregate, nothing else above the aggregate.
    let mut node = plan;
    let mut limit = None;
    let mut sort = None;
    if let LogicalPlan::Limit(l) = node {
        limit = Some(l);
        node = single_input(node)?;
    }
    if let LogicalPlan::Sort(s) = node {
        if s.fetch.is_some() {
            return Err(unsupported("a sort with a fetch limit"));
        }
        sort = Some(s);
        node = single_input(node)?;
    }
    let LogicalPlan::Projection(projection) = node else {
        return Err(unsupported(
            "under differential privacy the query must be SELECT <group keys and aggregates> \
             FROM ... [WHERE ...] [GROUP BY ...] [ORDER BY <group keys>] [LIMIT n]; HAVING, \
             derived tables over aggregates and ordering by aggregates are not supported",
        ));
    };
    let LogicalPlan::Aggregate(aggregate) = projection.input.as_ref() else {
        return Err(unsupported(
            "under differential privacy the projection must sit right over the aggregate (no \
             HAVING, no ORDER BY on a value that is not output)",
        ));
    };
    if contains_aggregate(&aggregate.input) {
        return Err(unsupported(
            "aggregates over aggregated rows are not supported under differential privacy",
        ));
    }

    let mut guard = Guard::new(granted, Mode::Private);
    let lineage = guard.below(&aggregate.input)?;
    let mode = guard.combined_mode()?;
    let dp = mode.dp.clone().ok_or_else(|| {
        deny(
            Rule::DpNotGranted,
            "not every dataset the query reads offers differential privacy to you",
        )
    })?;
    let input_schema = aggregate.input.schema();
    no_grouping_sets(aggregate)?;
    for expr in &aggregate.group_expr {
        guard.row_expr(expr, input_schema, &lineage, Use::Group)?;
    }
    let roots = guard.unit_roots();
    if roots.len() != 1 {
        return Err(unsupported(
            "under differential privacy every dataset must be joined on the same privacy unit",
        ));
    }
    let root = *roots.iter().next().expect("one root");
    // The unit of a scan no outer join null-extends: every row has one, and for a left join on
    // the unit it is the same entity as the other side's where they matched.
    let unit_index = lineage
        .iter()
        .position(|l| {
            matches!(l, Lineage::Plain(s)
                if s.is_unit && guard.root(s.scan) == root && !guard.null_extended[s.scan])
        })
        .ok_or_else(|| {
            deny(
                Rule::PrivacyUnitUnavailable,
                "the privacy unit must reach the aggregate",
            )
        })?;
    if let Lineage::Plain(source) = &lineage[unit_index] {
        guard
            .columns
            .insert(format!("{}.{}", source.dataset, source.column));
    }

    // Classify every aggregate; the exact guard's checks first (grant functions, roles, levels).
    let grouped = !aggregate.group_expr.is_empty();
    let public = public_groups(&guard, aggregate, &lineage);
    let mut stats: Vec<Stat> = Vec::new();
    let mut stat_of = |stat: Stat| -> usize {
        match stats.iter().position(|s| *s == stat) {
            Some(i) => i,
            None => {
                stats.push(stat);
                stats.len() - 1
            }
        }
    };
    // Per aggregate expression: how its output is derived.
    enum Agg {
        Count(usize),
        Units(Option<usize>),
        Sum(usize),
        Avg(usize, usize, f64, f64),
    }
    let mut aggs = Vec::with_capacity(aggregate.aggr_expr.len());
    for expr in &aggregate.aggr_expr {
        guard.aggregate_expr(expr, input_schema, &lineage, &mode)?;
        let Expr::AggregateFunction(function) = strip_alias(expr) else {
            return Err(unsupported("only aggregate function calls"));
        };
        let name = function.func.name().to_ascii_lowercase();
        let [argument] = function.params.args.as_slice() else {
            return Err(unsupported(format!("`{name}` must take one argument")));
        };
        let column = match strip_alias(argument) {
            Expr::Literal(..) => None,
            Expr::Column(column) => Some(input_schema.index_of_column(column).map_err(|_| {
                unsupported("the aggregate argument must be a column of the input")
            })?),
            _ => {
                return Err(unsupported(
                    "aggregate arguments must be plain columns under differential privacy",
                ));
            }
        };
        let bounds = |index: usize| -> Result<(f64, f64), SqlError> {
            match &lineage[index] {
                Lineage::Plain(source) if source.role == Role::Measure => {
                    let policy = &granted[source.dataset.as_ref()].policy;
                    policy
                        .column(&source.column)
                        .and_then(|c| c.bounds)
                        .ok_or_else(|| {
                            deny(
                                Rule::DpBoundsMissing,
                                format!(
                                    "measure `{}.{}` has no declared bounds, which differential \
                                     privacy needs to clamp and scale its noise",
                                    source.dataset, source.column
                                ),
                            )
                        })
                }
                _ => Err(deny(
                    Rule::DpBoundsMissing,
                    format!("`{name}` under differential privacy must aggregate a bounded measure"),
                )),
            }
        };
        let kind = match (name.as_str(), function.params.distinct) {
            ("count", false) => Allowed::Count,
            ("count", true) => Allowed::CountDistinct,
            ("sum", false) => Allowed::Sum,
            ("avg", false) => Allowed::Avg,
            _ => {
                return Err(unsupported(format!(
                    "`{name}` is not supported under differential privacy (COUNT, COUNT(DISTINCT \
                     <privacy unit>), SUM and AVG of bounded measures are)"
                )));
            }
        };
        aggs.push(match (kind, column) {
            (Allowed::Count, None) => Agg::Count(stat_of(Stat::Rows)),
            (Allowed::Count, Some(i)) if !input_schema.field(i).is_nullable() => {
                Agg::Count(stat_of(Stat::Rows))
            }
            (Allowed::Count, Some(i)) => Agg::Count(stat_of(Stat::Values(i))),
            (Allowed::CountDistinct, Some(i)) if i == unit_index => {
                // Grouped, the selection's noisy unit count serves; public groups have none.
                Agg::Units((!grouped || public.is_some()).then(|| stat_of(Stat::Units)))
            }
            (Allowed::CountDistinct, _) => {
                return Err(unsupported(
                    "under differential privacy COUNT(DISTINCT) counts the privacy unit only",
                ));
            }
            (Allowed::Sum, Some(i)) => {
                let (low, high) = bounds(i)?;
                Agg::Sum(stat_of(Stat::Sum(i, low, high)))
            }
            (Allowed::Avg, Some(i)) => {
                let (low, high) = bounds(i)?;
                let sum = stat_of(Stat::Sum(i, low, high));
                // Over a column that cannot be null the average's count is `COUNT(*)`: one
                // noisy count serves both when the query asks for it too.
                let count = if input_schema.field(i).is_nullable() {
                    Stat::Values(i)
                } else {
                    Stat::Rows
                };
                Agg::Avg(sum, stat_of(count), low, high)
            }
            _ => return Err(unsupported(format!("`{name}` must aggregate a column"))),
        });
    }

    // The outputs, in the projection's order: group keys or aggregates, by plain reference.
    let keys = aggregate.group_expr.len();
    let aggregate_schema = aggregate.schema.clone();
    let mut outputs = Vec::with_capacity(projection.expr.len());
    let mut key_outputs = Vec::new();
    for (position, expr) in projection.expr.iter().enumerate() {
        let Expr::Column(column) = strip_alias(expr) else {
            return Err(unsupported(
                "under differential privacy the output must be the group keys and the aggregates \
                 themselves (noise is added after the query; arithmetic on them can be done on \
                 the released values)",
            ));
        };
        let index = aggregate_schema
            .index_of_column(column)
            .map_err(|_| unsupported("an output that is not a group key or an aggregate"))?;
        let (qualifier, field) = projection.schema.qualified_field(position);
        let name = field.name().clone();
        outputs.push(if index < keys {
            key_outputs.push((index, qualifier.cloned(), name.clone()));
            DpOutput::Key { name }
        } else {
            match aggs[index - keys] {
                Agg::Count(stat) => DpOutput::Count { name, stat },
                Agg::Units(stat) => DpOutput::Units { name, stat },
                Agg::Sum(stat) => DpOutput::Sum { name, stat },
                Agg::Avg(sum, count, low, high) => DpOutput::Avg {
                    name,
                    sum,
                    count,
                    low,
                    high,
                },
            }
        });
    }
    if let Some(sort) = sort {
        for sort_expr in &sort.expr {
            let is_key = matches!(&sort_expr.expr, Expr::Column(c)
                if key_outputs.iter().any(|(_, q, n)| n == &c.name && (c.relation.is_none() || c.relation == *q)));
            if !is_key {
                return Err(unsupported(
                    "under differential privacy ORDER BY may name output group keys only (an \
                     order by exact aggregates would tell what the noise hides)",
                ));
            }
        }
    }
    let (skip, fetch) = match limit {
        None => (0, None),
        Some(limit) => crate::guard::limit_values(limit)?,
    };

    // Contribution bounds for this query: the grant's, or tighter where the data's declared
    // shape makes them so without cutting anything (the plan enforces them either way).
    let (max_rows, max_groups) = contribution_bounds(&guard, aggregate, &lineage, &dp);
    let rewritten = rewrite(
        aggregate,
        unit_index,
        &stats,
        &key_outputs,
        (max_rows, max_groups),
        public.as_deref(),
    )?;
    let every_key_output = (0..keys).all(|k| key_outputs.iter().any(|(i, _, _)| *i == k));
    let rewritten = match sort {
        // No ORDER BY: sorted by the group keys, the only outputs released without noise
        // (`order.rs`).
        None => crate::order::sorted_by_outputs(rewritten, |name| {
            key_outputs.iter().any(|(_, _, key)| key == name)
        })?,
        Some(sort) => LogicalPlanBuilder::from(rewritten)
            .sort(sort.expr.clone())
            .and_then(|b| b.build())
            .map_err(rewrite_error)?,
    };
    let spec = DpSpec {
        outputs,
        stats: stats
            .iter()
            .map(|s| match *s {
                Stat::Rows | Stat::Values(_) => DpStat::Count,
                Stat::Units => DpStat::Units,
                Stat::Sum(_, low, high) => DpStat::Sum { low, high },
            })
            .collect(),
        grouped,
        public_groups: public.is_some(),
        max_rows_per_unit: max_rows,
        max_groups_per_unit: max_groups,
        // Sorted by the group keys in the plan when every one is an output; else the gate
        // sorts the released values.
        sort_released: sort.is_none() && !every_key_output,
    };
    Ok(Guarded {
        plan: rewritten,
        min_units: 0,
        skip,
        fetch,
        datasets: guard.datasets.into_iter().collect(),
        columns: guard.columns.into_iter().collect(),
        dp: Some(DpGuarded { spec, mode: dp }),
        source: 0,
    })
}

/// The most rows one unit adds to one group, and the most groups it adds to, for this query.
///
/// - Rows: one where every dataset's row key is covered by its unit and the group keys (a
///   monthly table grouped by month, the register anywhere); else the grant's bound.
/// - Groups: one where every group key is a plain column that is constant per unit (declared,
///   or of a dataset with one row per unit); else the grant's bound.
///
/// Tighter bounds mean less noise; the rewrite enforces whichever is used, so a wrong
/// declaration in a policy costs accuracy (rows or groups cut), never privacy.
fn contribution_bounds(
    guard: &Guard,
    aggregate: &Aggregate,
    lineage: &[Lineage],
    dp: &sandbox_policy::DpMode,
) -> (u64, u64) {
    let schema = aggregate.input.schema();
    let keys: Vec<Option<crate::guard::Source>> = aggregate
        .group_expr
        .iter()
        .map(|expr| match strip_alias(expr) {
            Expr::Column(column) => {
                schema
                    .index_of_column(column)
                    .ok()
                    .and_then(|i| match &lineage[i] {
                        Lineage::Plain(source) => Some(source.clone()),
                        Lineage::Derived(_) => None,
                    })
            }
            _ => None,
        })
        .collect();
    let one_row_per_unit = |scan: usize| {
        let policy = &guard.scans[scan];
        !policy.row_key.is_empty() && policy.row_key.iter().all(|k| *k == policy.privacy_unit)
    };
    let rows_covered = (0..guard.scans.len()).all(|scan| {
        let policy = &guard.scans[scan];
        !policy.row_key.is_empty()
            && policy.row_key.iter().all(|column| {
                *column == policy.privacy_unit
                    || keys
                        .iter()
                        .flatten()
                        .any(|k| k.scan == scan && k.column.as_ref() == column.as_str())
            })
    });
    let constant = keys.iter().all(|key| {
        key.as_ref().is_some_and(|source| {
            one_row_per_unit(source.scan)
                || guard.scans[source.scan]
                    .column(&source.column)
                    .is_some_and(|c| c.constant_per_unit)
        })
    });
    let rows = if rows_covered {
        1
    } else {
        dp.max_rows_per_unit
    };
    let groups = if constant { 1 } else { dp.max_groups_per_unit };
    (
        rows.min(dp.max_rows_per_unit),
        groups.min(dp.max_groups_per_unit),
    )
}

fn column(name: &str) -> Expr {
    Expr::Column(Column::new_unqualified(name))
}

const UNIT: &str = "__sandbox_dp_unit";
const RANK: &str = "__sandbox_dp_rank";

fn key(i: usize) -> String {
    format!("__sandbox_dp_key_{i}")
}

fn raw(i: usize) -> String {
    format!("__sandbox_dp_raw_{i}")
}

fn contribution(i: usize) -> String {
    format!("__sandbox_dp_unit_{i}")
}

/// The most groups a query over public domains may list (their product); beyond it the groups
/// are chosen by partition selection as for any other keys.
pub const MAX_PUBLIC_GROUPS: usize = 10_000;

/// Every group key's public domain, when each is a plain dimension column that declares one and
/// their product is at most [`MAX_PUBLIC_GROUPS`].
fn public_groups(
    guard: &Guard,
    aggregate: &Aggregate,
    lineage: &[Lineage],
) -> Option<Vec<Vec<String>>> {
    if aggregate.group_expr.is_empty() {
        return None;
    }
    let schema = aggregate.input.schema();
    let mut domains = Vec::with_capacity(aggregate.group_expr.len());
    let mut product = 1usize;
    for expr in &aggregate.group_expr {
        let Expr::Column(column) = strip_alias(expr) else {
            return None;
        };
        let Lineage::Plain(source) = &lineage[schema.index_of_column(column).ok()?] else {
            return None;
        };
        let policy = guard.scans[source.scan].column(&source.column)?;
        if policy.role != Role::Dimension || policy.domain.is_empty() {
            return None;
        }
        product = product.checked_mul(policy.domain.len())?;
        if product > MAX_PUBLIC_GROUPS {
            return None;
        }
        domains.push(policy.domain.clone());
    }
    Some(domains)
}

/// Every combination of the domains, the first key's values outermost.
fn combinations(domains: &[Vec<String>]) -> Vec<Vec<String>> {
    domains.iter().fold(vec![Vec::new()], |rows, domain| {
        rows.iter()
            .flat_map(|row| {
                domain.iter().map(move |value| {
                    let mut row = row.clone();
                    row.push(value.clone());
                    row
                })
            })
            .collect()
    })
}

fn public_key(i: usize) -> String {
    format!("__sandbox_dp_public_{i}")
}

fn text_key(i: usize) -> String {
    format!("__sandbox_dp_text_{i}")
}

/// The contribution-bounding rewrite (see the module docs).
fn rewrite(
    aggregate: &Aggregate,
    unit_index: usize,
    stats: &[Stat],
    key_outputs: &[(usize, Option<datafusion::common::TableReference>, String)],
    (max_rows, max_groups): (u64, u64),
    public: Option<&[Vec<String>]>,
) -> Result<LogicalPlan, SqlError> {
    let input_schema = aggregate.input.schema();
    let input_column = |i: usize| {
        let (qualifier, field) = input_schema.qualified_field(i);
        Expr::Column(Column::new(qualifier.cloned(), field.name()))
    };
    let rows = lit(ScalarValue::Int64(Some(max_rows as i64)));
    let as_float = |e: Expr| cast(e, DataType::Float64);

    // Per (unit, group): the raw figures.
    let mut group = vec![input_column(unit_index).alias(UNIT)];
    for (i, expr) in aggregate.group_expr.iter().enumerate() {
        group.push(strip_alias(expr).clone().alias(key(i)));
    }
    let mut raw_aggr = Vec::new();
    let mut raw_names: HashMap<String, Expr> = HashMap::new();
    let mut raw_of = |name: String, expr: Expr| -> Expr {
        if !raw_names.contains_key(&name) {
            raw_aggr.push(expr.alias(&name));
            raw_names.insert(name.clone(), column(&name));
        }
        column(&name)
    };
    let mut bounded = vec![column(UNIT)];
    bounded.extend((0..aggregate.group_expr.len()).map(|i| column(&key(i))));
    let capped = |n: Expr| {
        when(n.clone().gt(rows.clone()), rows.clone())
            .otherwise(n)
            .map_err(rewrite_error)
    };
    for (i, stat) in stats.iter().enumerate() {
        let expr = match *stat {
            Stat::Rows => capped(raw_of("__sandbox_dp_rows".into(), count(lit(1i64))))?,
            Stat::Values(c) => capped(raw_of(raw(c), count(input_column(c))))?,
            Stat::Units => lit(1i64),
            Stat::Sum(c, low, high) => {
                let n = raw_of(raw(c), count(input_column(c)));
                let value = as_float(input_column(c));
                let clamped = when(value.clone().lt(lit(low)), lit(low))
                    .when(value.clone().gt(lit(high)), lit(high))
                    .otherwise(value)
                    .map_err(rewrite_error)?;
                let s = raw_of(format!("__sandbox_dp_sum_{c}"), sum(clamped));
                // The unit's mean times its capped count: consistent with the count beside it.
                let bound = max_rows as f64 * low.abs().max(high.abs());
                let scaled = as_float(s) * as_float(capped(n.clone())?) / as_float(n.clone());
                when(n.eq(lit(0i64)), lit(0.0))
                    .when(scaled.clone().gt(lit(bound)), lit(bound))
                    .when(scaled.clone().lt(lit(-bound)), lit(-bound))
                    .otherwise(scaled)
                    .map_err(rewrite_error)?
            }
        };
        bounded.push(expr.alias(contribution(i)));
    }
    if raw_aggr.is_empty() {
        // Only unit counts: the per-unit aggregate still needs one function.
        raw_aggr.push(count(lit(1i64)).alias("__sandbox_dp_rows"));
    }
    let mut builder = LogicalPlanBuilder::from(aggregate.input.as_ref().clone())
        .aggregate(group, raw_aggr)
        .and_then(|b| b.project(bounded))
        .map_err(rewrite_error)?;
    if !aggregate.group_expr.is_empty() {
        let rank = row_number()
            .partition_by(vec![column(UNIT)])
            .order_by(vec![SortExpr::new(random(), true, false)])
            .build()
            .map_err(rewrite_error)?
            .alias(RANK);
        builder = builder
            .window(vec![rank])
            .and_then(|b| b.filter(column(RANK).lt_eq(lit(max_groups))))
            .map_err(rewrite_error)?;
    }
    let mut per_group = Vec::new();
    for i in 0..stats.len() {
        per_group.push(sum(column(&contribution(i))).alias(stat_column(i)));
    }
    per_group.push(count(lit(1i64)).alias(UNITS_COLUMN));
    let keys: Vec<Expr> = (0..aggregate.group_expr.len())
        .map(|i| column(&key(i)))
        .collect();
    let mut builder = builder.aggregate(keys, per_group).map_err(rewrite_error)?;
    let mut key_of: Vec<Expr> = (0..aggregate.group_expr.len())
        .map(|i| column(&key(i)))
        .collect();
    if let Some(domains) = public {
        // Every combination of the public values, each matched to its group (if any) by the
        // keys' text: a group with no rows gets null figures, which the gate reads as zero.
        let types: Vec<DataType> = (0..domains.len())
            .map(|i| {
                builder
                    .schema()
                    .field_with_unqualified_name(&key(i))
                    .map(|f| f.data_type().clone())
                    .map_err(rewrite_error)
            })
            .collect::<Result<_, _>>()?;
        let rows: Vec<Vec<Expr>> = combinations(domains)
            .into_iter()
            .map(|row| row.into_iter().map(lit).collect())
            .collect();
        let values = LogicalPlanBuilder::values(rows)
            .and_then(|b| {
                b.project(
                    (0..domains.len())
                        .map(|i| column(&format!("column{}", i + 1)).alias(public_key(i)))
                        .collect::<Vec<_>>(),
                )
            })
            .map_err(rewrite_error)?;
        let mut text = vec![];
        for i in 0..domains.len() {
            text.push(cast(column(&key(i)), DataType::Utf8).alias(text_key(i)));
        }
        text.extend((0..stats.len()).map(|i| column(&stat_column(i))));
        text.push(column(UNITS_COLUMN));
        let groups = builder
            .project(text)
            .and_then(|b| b.build())
            .map_err(rewrite_error)?;
        builder = values
            .join(
                groups,
                JoinType::Left,
                (
                    (0..domains.len())
                        .map(|i| Column::new_unqualified(public_key(i)))
                        .collect::<Vec<_>>(),
                    (0..domains.len())
                        .map(|i| Column::new_unqualified(text_key(i)))
                        .collect::<Vec<_>>(),
                ),
                None,
            )
            .map_err(rewrite_error)?;
        key_of = types
            .into_iter()
            .enumerate()
            .map(|(i, t)| cast(column(&public_key(i)), t))
            .collect();
    }
    let mut output: Vec<Expr> = key_outputs
        .iter()
        .map(|(i, qualifier, name)| key_of[*i].clone().alias_qualified(qualifier.clone(), name))
        .collect();
    output.extend((0..stats.len()).map(|i| column(&stat_column(i))));
    output.push(column(UNITS_COLUMN));
    builder
        .project(output)
        .and_then(|b| b.build())
        .map_err(rewrite_error)
}

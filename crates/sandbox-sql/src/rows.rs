//! The plan guard in row mode: the input query of a code job. Its rows flow only into the guest,
//! never to a client, so identifiers may be output and rows need not be aggregated; what the
//! guard enforces is the module's approved scope.
//!
//! - Only datasets and columns the module's approvals list (`column-not-approved` otherwise);
//!   hidden columns never.
//! - Plan nodes: scans, filters, projections, aliases, sorts, aggregates grouped by the privacy
//!   unit (per-entity features), and inner or left equi-joins that match the privacy unit of both
//!   sides (the scoring model joins tax, social insurance, provident fund, court and penalty data
//!   per enterprise). Unions, windows, limits, `VALUES` and subquery expressions are denied.
//! - Expressions: the allow-list of the aggregate guard, with `CASE` added; still no expression
//!   whose errors depend on the data (casts of data values, integer division by data values or
//!   -1, literal arguments out of range), since an error is something the consumer sees; and the
//!   privacy unit is never compared or computed with.
//! - The output must carry the privacy unit, so that the engine can keep only consented entities
//!   before the guest sees a row.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use datafusion::common::DFSchema;
use datafusion::logical_expr::{Expr, LogicalPlan};
use sandbox_policy::DatasetPolicy;

use crate::error::{Rule, SqlError};
use crate::guard::{
    HIDDEN_PREFIX, Lineage, Source, deny, expression_children, is_default_qualifier,
    join_equalities, lineage_of, node_denial, scan_lineage, strip_alias, uses_reserved_name,
};

/// What a code job's input may read: per dataset, its policy and the approved columns; and the
/// entities whose rows it may see at all (consented to the consumer for the purpose; the scan
/// keeps no other row). The default scope sees nothing.
#[derive(Debug, Clone, Default)]
pub struct RowScope {
    pub datasets: HashMap<String, (Arc<DatasetPolicy>, BTreeSet<String>)>,
    pub consented: crate::consent::ConsentSet,
}

/// An input query that passed the row-mode guard.
#[derive(Debug, Clone)]
pub struct GuardedRows {
    pub plan: LogicalPlan,
    pub datasets: Vec<String>,
    /// Columns read, as `dataset.column`.
    pub columns: Vec<String>,
    /// Index of the output column holding the privacy unit.
    pub key_index: usize,
}

struct RowGuard<'a> {
    scope: &'a RowScope,
    datasets: BTreeSet<String>,
    columns: BTreeSet<String>,
    /// Visible columns the approval does not list, as `dataset.column`: a scan exposes them (the
    /// unoptimized plan scans every visible column), but any use of one is denied.
    unapproved: BTreeSet<String>,
    /// Table scans seen so far.
    scans: usize,
}

/// Checks a code job's input plan against its approved scope.
pub fn guard_rows(plan: &LogicalPlan, scope: &RowScope) -> Result<GuardedRows, SqlError> {
    if uses_reserved_name(plan) {
        return Err(deny(
            Rule::ReservedName,
            format!("names starting with `{HIDDEN_PREFIX}` are reserved"),
        ));
    }
    let mut guard = RowGuard {
        scope,
        datasets: BTreeSet::new(),
        columns: BTreeSet::new(),
        unapproved: BTreeSet::new(),
        scans: 0,
    };
    let lineage = guard.walk(plan)?;
    let key_index = lineage
        .iter()
        .position(Lineage::is_plain_unit)
        .ok_or_else(|| {
            deny(
                Rule::PrivacyUnitUnavailable,
                "the input must output the privacy unit, so rows can be matched to consents",
            )
        })?;
    // No ORDER BY: the rows come sorted by their columns (`order.rs`), so a scoring template
    // releases, and a guest reads, the same rows in the same order every run.
    let plan = if crate::order::is_ordered(plan) {
        plan.clone()
    } else {
        crate::order::sorted_by_outputs(plan.clone(), |_| true)?
    };
    Ok(GuardedRows {
        plan,
        datasets: guard.datasets.into_iter().collect(),
        columns: guard.columns.into_iter().collect(),
        key_index,
    })
}

impl RowGuard<'_> {
    fn walk(&mut self, node: &LogicalPlan) -> Result<Vec<Lineage>, SqlError> {
        match node {
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let (policy, approved) = self
                    .scope
                    .datasets
                    .get(name)
                    .filter(|_| is_default_qualifier(&scan.table_name))
                    .ok_or_else(|| {
                        deny(
                            Rule::DatasetNotGranted,
                            format!(
                                "`{}` is not in the module's approved input",
                                scan.table_name
                            ),
                        )
                    })?;
                if !scan.filters.is_empty() || scan.fetch.is_some() {
                    return Err(deny(Rule::PlanNodeNotAllowed, "pre-filtered table scans"));
                }
                self.datasets.insert(name.to_string());
                let dataset: Arc<str> = Arc::from(name);
                let lineage = scan_lineage(scan, &dataset, policy, self.scans)?;
                self.scans += 1;
                for source in lineage.iter().flat_map(Lineage::sources) {
                    if !approved.contains(source.column.as_ref()) {
                        self.unapproved.insert(format!("{name}.{}", source.column));
                    }
                }
                Ok(lineage)
            }
            LogicalPlan::SubqueryAlias(alias) => self.walk(&alias.input),
            LogicalPlan::Filter(filter) => {
                let lineage = self.walk(&filter.input)?;
                self.expr(&filter.predicate, filter.input.schema(), &lineage)?;
                Ok(lineage)
            }
            LogicalPlan::Projection(projection) => {
                let lineage = self.walk(&projection.input)?;
                let schema = projection.input.schema();
                projection
                    .expr
                    .iter()
                    .map(|e| self.expr(e, schema, &lineage))
                    .collect()
            }
            LogicalPlan::Sort(sort) if sort.fetch.is_none() => {
                let lineage = self.walk(&sort.input)?;
                for sort_expr in &sort.expr {
                    self.expr(&sort_expr.expr, sort.input.schema(), &lineage)?;
                }
                Ok(lineage)
            }
            LogicalPlan::Join(join) => {
                let left = self.walk(&join.left)?;
                let right = self.walk(&join.right)?;
                let mut on_unit = false;
                for (l, r) in join_equalities(join, &left, &right)? {
                    self.used(&l)?;
                    self.used(&r)?;
                    // The same entity on both sides: both privacy units, of one name.
                    on_unit |= l.is_unit && r.is_unit && l.column == r.column;
                }
                if !on_unit {
                    return Err(deny(
                        Rule::JoinKeyNotAllowed,
                        "a code job's input joins match the privacy unit of both sides",
                    ));
                }
                Ok(left.into_iter().chain(right).collect())
            }
            LogicalPlan::Aggregate(aggregate) => {
                let input = self.walk(&aggregate.input)?;
                let schema = aggregate.input.schema();
                let mut lineage = Vec::new();
                for expr in &aggregate.group_expr {
                    if matches!(expr, Expr::GroupingSet(_)) {
                        return Err(deny(
                            Rule::ExpressionNotAllowed,
                            "GROUPING SETS, ROLLUP and CUBE are not supported",
                        ));
                    }
                    lineage.push(self.expr(expr, schema, &input)?);
                }
                if !lineage.iter().any(Lineage::is_plain_unit) {
                    return Err(deny(
                        Rule::PrivacyUnitUnavailable,
                        "aggregates in a code job's input must group by the privacy unit \
                         (one row of features per entity)",
                    ));
                }
                for expr in &aggregate.aggr_expr {
                    lineage.push(self.aggregate(expr, schema, &input)?);
                }
                Ok(lineage)
            }
            other => Err(node_denial(other)),
        }
    }

    fn lookup(
        &mut self,
        column: &datafusion::common::Column,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<Lineage, SqlError> {
        let found = lineage_of(column, schema, lineage)?;
        for source in found.sources() {
            self.used(source)?;
        }
        Ok(found)
    }

    /// Records a use of a source column, or denies it when the approval does not list it.
    fn used(&mut self, source: &Source) -> Result<(), SqlError> {
        let name = format!("{}.{}", source.dataset, source.column);
        if self.unapproved.contains(&name) {
            return Err(deny(
                Rule::ColumnNotApproved,
                format!("column `{name}` is not approved for this module"),
            ));
        }
        self.columns.insert(name);
        Ok(())
    }

    /// A row expression's lineage, after checking its kind.
    fn expr(
        &mut self,
        expr: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<Lineage, SqlError> {
        match expr {
            Expr::Column(column) => self.lookup(column, schema, lineage),
            Expr::Alias(alias) => self.expr(&alias.expr, schema, lineage),
            Expr::Literal(..) => Ok(Lineage::Derived(Vec::new())),
            _ => {
                let mut sources = Vec::new();
                for child in expression_children(expr, schema, true)? {
                    let found = self.expr(child, schema, lineage)?;
                    sources.extend(found.sources().into_iter().cloned());
                }
                // The unit may be output, grouped and joined on, never compared or computed
                // with: `credit_code = '...'` in an input would single out an entity, and with
                // an error that depends on its row, answer a question about it.
                if let Some(unit) = sources.iter().find(|s| s.is_unit) {
                    return Err(deny(
                        Rule::IdentifierInExpression,
                        format!(
                            "the privacy unit `{}` may be output, grouped and joined on, not \
                             compared or used in expressions",
                            unit.column
                        ),
                    ));
                }
                Ok(Lineage::Derived(sources))
            }
        }
    }

    fn aggregate(
        &mut self,
        expr: &Expr,
        schema: &DFSchema,
        lineage: &[Lineage],
    ) -> Result<Lineage, SqlError> {
        let Expr::AggregateFunction(function) = strip_alias(expr) else {
            return Err(deny(
                Rule::ExpressionNotAllowed,
                "only aggregate function calls are allowed in the aggregate",
            ));
        };
        let name = function.func.name().to_ascii_lowercase();
        if !matches!(name.as_str(), "count" | "sum" | "avg" | "min" | "max") {
            return Err(deny(
                Rule::FunctionNotAllowed,
                format!("aggregate function `{name}` is not allowed"),
            ));
        }
        let params = &function.params;
        if params.filter.is_some() || !params.order_by.is_empty() {
            return Err(deny(
                Rule::AggregateModifierNotAllowed,
                format!("FILTER and ORDER BY inside `{name}` are not allowed"),
            ));
        }
        let mut sources = Vec::new();
        for argument in &params.args {
            let found = self.expr(argument, schema, lineage)?;
            sources.extend(found.sources().into_iter().cloned());
        }
        Ok(Lineage::Derived(sources))
    }
}

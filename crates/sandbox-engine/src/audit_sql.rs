//! SQL for auditors: read-only SQL over the journal, exposed as one Arrow table `events`. An
//! auditor sees every event; a data owner only the events that touched its datasets (and no
//! guest logs). The session holds nothing but that table and refuses DDL, DML (`COPY`
//! included) and statements, so a query can neither reach files nor change anything.
//!
//! Privileged is not unlimited: the call's admission is journaled (durably) before the query
//! runs, so even a query that brought the process down would leave its trace; functions come
//! from an allow-list, and those that build values of a size their argument asks for (`lpad`,
//! `rpad`) only with a literal size of at most [`MAX_BUILT_CHARS`]. A memory pool bounds what
//! operators hold, not the strings a function allocates row by row: one `lpad(x, 2^31)` asked for
//! hundreds of gigabytes, nested `repeat` or `replace` multiply a value's size, and a
//! `concat` (or `||`) of a long column with itself thousands of times adds up. So every value a
//! query computes has an upper bound on its size, derived from the plan and the widest value of
//! each column (`check_sizes`), and a query whose bound passes [`MAX_VALUE_BYTES`] (or twice the
//! widest column) is refused before it runs, as is one whose rows (every column of a node's
//! output together) could pass twice the larger of that and the table's widest row. Batches hold
//! as many rows as fit [`BATCH_BYTES`] at that row bound (at most [`BATCH_ROWS`]), so no node
//! allocates much more than that at once; and the result, encoded as it streams, stops at
//! [`MAX_RESULT_BYTES`] (a query that repeats a 1 MiB value on 100,000 rows would otherwise build
//! a reply of a hundred gigabytes).

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Builder, ListBuilder, RecordBatch, StringBuilder, UInt64Builder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use futures::StreamExt;
use sandbox_audit::AuditEvent;
use sandbox_policy::PrincipalRole;
use sandbox_sql::{CancellationToken, SqlError};

use crate::codes::{Action, EngineRule, JobKind};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::types::RequestContext;

/// Most rows an audit query may return.
const MAX_ROWS: usize = 100_000;
/// Most characters a padding function may build per value.
pub const MAX_BUILT_CHARS: i64 = 1024;
/// The largest value (bytes) an audit query may compute, unless a column holds larger ones
/// (then twice the widest).
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Most rows per batch of the `events` table and of every operator.
const BATCH_ROWS: usize = 512;
/// What one batch may take at the query's row bound: fewer rows per batch when rows can be
/// large.
const BATCH_BYTES: usize = 64 << 20;
/// Largest encoded result of an audit query, in bytes.
pub const MAX_RESULT_BYTES: usize = 64 << 20;

/// Scalar functions an audit query may call: text, dates, numbers, lists, conditionals. None
/// of them reads a file, and none builds a value larger than its arguments together (`replace`
/// is not here: its replacement multiplies a value's size, and nested calls multiply it again
/// until an allocation aborts the process).
const AUDIT_SCALAR_FUNCTIONS: &[&str] = &[
    "lower",
    "upper",
    "substr",
    "substring",
    "left",
    "right",
    "length",
    "character_length",
    "char_length",
    "octet_length",
    "btrim",
    "ltrim",
    "rtrim",
    "trim",
    "concat",
    "concat_ws",
    "starts_with",
    "ends_with",
    "strpos",
    "split_part",
    "coalesce",
    "nullif",
    "date_part",
    "date_trunc",
    "to_timestamp",
    "to_date",
    "round",
    "floor",
    "ceil",
    "abs",
    "array_length",
    "array_has",
    "array_has_any",
    "array_has_all",
    "array_element",
    "cardinality",
    "md5",
    "sha256",
    "regexp_like",
    "like",
    "ilike",
    "isnan",
    "greatest",
    "least",
    "get_field",
];

/// Functions that build a value of a size their second argument asks for.
const SIZED_FUNCTIONS: &[&str] = &["lpad", "rpad"];

/// Aggregate functions an audit query may call (window functions none).
const AUDIT_AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "first_value",
    "last_value",
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "median",
    "stddev",
    "var",
    "approx_distinct",
    "approx_percentile_cont",
];

/// Refuses an audit query plan that calls a function outside the allow-lists, or a sizing
/// function without a small literal size.
fn check_functions(plan: &datafusion::logical_expr::LogicalPlan) -> Result<()> {
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::logical_expr::Expr;
    let refuse = |message: String| EngineError::Invalid {
        rule: EngineRule::AuditSqlFunction,
        message,
    };
    let mut problem: Option<EngineError> = None;
    let _ = plan.apply_with_subqueries(|node| {
        for expr in node.expressions() {
            let _ = expr.apply(|e| {
                let verdict = match e {
                    Expr::ScalarFunction(f) => {
                        let name = f.func.name().to_ascii_lowercase();
                        if SIZED_FUNCTIONS.contains(&name.as_str()) {
                            let size = f.args.get(1).and_then(|a| match a {
                                Expr::Literal(v, _) => {
                                    v.cast_to(&DataType::Int64).ok().and_then(|v| match v {
                                        datafusion::common::ScalarValue::Int64(n) => n,
                                        _ => None,
                                    })
                                }
                                _ => None,
                            });
                            match size {
                                Some(n) if (0..=MAX_BUILT_CHARS).contains(&n) => None,
                                _ => Some(refuse(format!(
                                    "`{name}` takes a literal size of at most {MAX_BUILT_CHARS} \
                                     in audit SQL"
                                ))),
                            }
                        } else if AUDIT_SCALAR_FUNCTIONS.contains(&name.as_str()) {
                            None
                        } else {
                            Some(refuse(format!(
                                "function `{name}` is not allowed in audit SQL"
                            )))
                        }
                    }
                    Expr::AggregateFunction(f) => {
                        let name = f.func.name().to_ascii_lowercase();
                        (!AUDIT_AGGREGATES.contains(&name.as_str())).then(|| {
                            refuse(format!("aggregate `{name}` is not allowed in audit SQL"))
                        })
                    }
                    // A window holds its whole partition, outside the query's memory pool: a
                    // fresh attacker's `max(concat(a.query, b.query)) OVER ()` over a self-join
                    // held gigabytes until an allocation failed.
                    Expr::WindowFunction(w) => Some(refuse(format!(
                        "window functions (`{}`) are not allowed in audit SQL",
                        w.fun.name().to_ascii_lowercase()
                    ))),
                    _ => None,
                };
                match verdict {
                    Some(error) => {
                        problem.get_or_insert(error);
                        Ok(TreeNodeRecursion::Stop)
                    }
                    None => Ok(TreeNodeRecursion::Continue),
                }
            });
        }
        Ok(if problem.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    problem.map_or(Ok(()), Err)
}
/// The widest value (bytes) of every column of the `events` table: text by its longest value,
/// lists by their longest row, numbers as printed.
fn column_widths(batches: &[RecordBatch]) -> HashMap<String, usize> {
    use datafusion::arrow::array::{Array, AsArray};
    let schema = schema();
    let mut widths: HashMap<String, usize> = schema
        .fields()
        .iter()
        .map(|f| (f.name().clone(), NUMBER_WIDTH))
        .collect();
    for batch in batches {
        for (i, field) in schema.fields().iter().enumerate() {
            let column = batch.column(i);
            let widest = match field.data_type() {
                DataType::Utf8 => {
                    let text = column.as_string::<i32>();
                    (0..text.len())
                        .filter(|&r| text.is_valid(r))
                        .map(|r| text.value(r).len())
                        .max()
                        .unwrap_or(0)
                }
                DataType::List(_) => {
                    let list = column.as_list::<i32>();
                    let offsets = list.value_offsets();
                    let values = list.values().as_string::<i32>();
                    let value_offsets = values.value_offsets();
                    (0..list.len())
                        .map(|r| {
                            let (from, to) = (offsets[r] as usize, offsets[r + 1] as usize);
                            (value_offsets[to] - value_offsets[from]) as usize + 8 * (to - from)
                        })
                        .max()
                        .unwrap_or(0)
                }
                _ => NUMBER_WIDTH,
            };
            let entry = widths.entry(field.name().clone()).or_insert(0);
            *entry = (*entry).max(widest);
        }
    }
    widths
}

/// What a number, a date or a boolean takes printed, at most.
const NUMBER_WIDTH: usize = 64;

/// The bound of a scanned column: a column of `events` its widest value; a number of a table
/// function (`generate_series`) a number's; anything else, what any value may take.
fn field_bound(field: &Field, widths: &HashMap<String, usize>, limit: usize) -> usize {
    match widths.get(field.name()) {
        Some(width) => *width,
        None if field.data_type().is_primitive() || *field.data_type() == DataType::Boolean => {
            NUMBER_WIDTH
        }
        None => limit,
    }
}

/// Refuses a plan that could compute a value larger than `limit` bytes, and returns an upper
/// bound of each of its output columns, by position: a column of `events` its widest value, a
/// `VALUES` list its longest literal, a literal its length, `concat` and `||` the sum of their
/// arguments, `lpad`/`rpad` four bytes a character of their literal size, `lower`/`upper` three
/// times their argument, any other expression the largest of its parts. A plan node it does not
/// know (a recursive query, an unnest) is refused: what cannot be bounded does not run.
fn check_sizes(
    plan: &datafusion::logical_expr::LogicalPlan,
    widths: &HashMap<String, usize>,
    limit: usize,
    row_limit: usize,
) -> Result<Vec<usize>> {
    use datafusion::logical_expr::LogicalPlan;
    let refuse = |message: String| EngineError::Invalid {
        rule: EngineRule::AuditSqlFunction,
        message,
    };
    // Subqueries in expressions are plans of their own, checked the same way.
    let mut failed = None;
    let _ = plan.apply_subqueries(|subquery| {
        if let Err(error) = check_sizes(subquery, widths, limit, row_limit) {
            failed.get_or_insert(error);
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    if let Some(error) = failed {
        return Err(error);
    }
    let inputs: Vec<Vec<usize>> = plan
        .inputs()
        .into_iter()
        .map(|input| check_sizes(input, widths, limit, row_limit))
        .collect::<Result<_>>()?;
    // The bounds of the columns a node's expressions read: its inputs' side by side (a join's
    // are its left's then its right's).
    let below: Vec<usize> = match plan {
        // A scan's own expressions (filters pushed into it) read the table's columns.
        LogicalPlan::TableScan(scan) => scan
            .source
            .schema()
            .fields()
            .iter()
            .map(|f| field_bound(f, widths, limit))
            .collect(),
        _ => inputs.iter().flatten().copied().collect(),
    };
    let bound = |expr: &datafusion::logical_expr::Expr| -> Result<usize> {
        let size = value_bound(expr, plan, &below, limit);
        if size > limit {
            return Err(refuse(format!(
                "the query could build values of up to {size} bytes (at most {limit} in audit \
                 SQL): fewer concatenations, or shorter paddings"
            )));
        }
        Ok(size)
    };
    for expr in plan.expressions() {
        bound(&expr)?;
    }
    let first = || inputs.first().cloned().unwrap_or_default();
    let out = match plan {
        LogicalPlan::TableScan(scan) => scan
            .projected_schema
            .fields()
            .iter()
            .map(|f| field_bound(f, widths, limit))
            .collect(),
        LogicalPlan::Projection(p) => p.expr.iter().map(&bound).collect::<Result<_>>()?,
        LogicalPlan::Aggregate(a) => a
            .group_expr
            .iter()
            .chain(&a.aggr_expr)
            .map(&bound)
            .collect::<Result<_>>()?,
        LogicalPlan::Values(values) => {
            let mut out = vec![0usize; values.schema.fields().len()];
            for row in &values.values {
                for (i, expr) in row.iter().enumerate() {
                    out[i] = out[i].max(bound(expr)?);
                }
            }
            out
        }
        LogicalPlan::Join(_) => below,
        LogicalPlan::Union(_) => {
            let mut out = first();
            for input in &inputs {
                for (slot, size) in out.iter_mut().zip(input) {
                    *slot = (*slot).max(*size);
                }
            }
            out
        }
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::SubqueryAlias(_)
        | LogicalPlan::Distinct(_)
        | LogicalPlan::Repartition(_)
        | LogicalPlan::Subquery(_) => first(),
        LogicalPlan::EmptyRelation(_) => Vec::new(),
        other => {
            return Err(refuse(format!(
                "`{}` is not supported in audit SQL",
                other.display()
            )));
        }
    };
    let row: usize = out.iter().fold(0, |sum, size| sum.saturating_add(*size));
    if row > row_limit {
        return Err(refuse(format!(
            "the query could build rows of up to {row} bytes (at most {row_limit} in audit SQL): \
             fewer or narrower columns"
        )));
    }
    Ok(out)
}

/// An upper bound of the bytes one value of `expr` takes, over `plan`'s input columns with the
/// bounds `below` (by position in the inputs' schemas side by side); a column it cannot place
/// gets `limit`.
fn value_bound(
    expr: &datafusion::logical_expr::Expr,
    plan: &datafusion::logical_expr::LogicalPlan,
    below: &[usize],
    limit: usize,
) -> usize {
    use datafusion::common::tree_node::TreeNode;
    use datafusion::logical_expr::{Expr, Operator};
    let of = |e: &Expr| value_bound(e, plan, below, limit);
    let largest = |bounds: Vec<usize>| bounds.into_iter().max().unwrap_or(0).max(NUMBER_WIDTH);
    match expr {
        Expr::Alias(alias) => of(&alias.expr),
        Expr::Column(column) => {
            let mut position = None;
            let mut offset = 0;
            if let datafusion::logical_expr::LogicalPlan::TableScan(scan) = plan {
                position = scan.source.schema().index_of(column.name()).ok();
            }
            for input in plan.inputs() {
                if position.is_some() {
                    break;
                }
                if let Ok(i) = input.schema().index_of_column(column) {
                    position = Some(offset + i);
                    break;
                }
                offset += input.schema().fields().len();
            }
            position
                .and_then(|i| below.get(i).copied())
                .unwrap_or(limit)
        }
        Expr::Literal(value, _) => value.to_string().len().max(NUMBER_WIDTH),
        Expr::ScalarFunction(f) => {
            let args: Vec<usize> = f.args.iter().map(of).collect();
            match f.func.name().to_ascii_lowercase().as_str() {
                "concat" | "concat_ws" => args
                    .iter()
                    .fold(0usize, |a, b| a.saturating_add(*b))
                    // concat_ws repeats its separator between every two arguments.
                    .saturating_add(
                        args.first()
                            .copied()
                            .unwrap_or(0)
                            .saturating_mul(args.len()),
                    ),
                "lpad" | "rpad" => 4 * MAX_BUILT_CHARS as usize,
                "lower" | "upper" => largest(args).saturating_mul(3),
                _ => largest(args),
            }
        }
        Expr::BinaryExpr(binary) if binary.op == Operator::StringConcat => {
            of(&binary.left).saturating_add(of(&binary.right))
        }
        other => {
            let mut bounds = Vec::new();
            let _ = other.apply_children(|child| {
                bounds.push(of(child));
                Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
            });
            largest(bounds)
        }
    }
}

/// Events read from the journal per step.
const PAGE: usize = 10_000;

/// The answer to an audit query.
#[derive(Debug, Clone)]
pub struct AuditQueryResult {
    /// Arrow IPC stream of the rows.
    pub ipc: Vec<u8>,
    pub rows: u64,
    /// Events the caller's `events` table held.
    pub events: u64,
}

/// The `events` table's columns, one per field of an audit event.
fn schema() -> SchemaRef {
    let text = |name: &str| Field::new(name, DataType::Utf8, false);
    let number = |name: &str| Field::new(name, DataType::UInt64, false);
    let list = |name: &str| {
        Field::new(
            name,
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        )
    };
    Arc::new(Schema::new(vec![
        number("seq"),
        text("time"),
        text("action"),
        text("principal"),
        text("org"),
        text("request_id"),
        text("job_id"),
        text("kind"),
        text("query"),
        list("datasets"),
        list("columns"),
        text("decision"),
        text("rule"),
        text("message"),
        number("rows_scanned"),
        number("rows_released"),
        number("rows_suppressed"),
        number("min_units"),
        Field::new("epsilon_spent", DataType::Float64, false),
        text("result_sha256"),
        number("duration_ms"),
        number("work_units"),
        list("guest_log"),
        Field::new("record", DataType::Utf8, true),
    ]))
}

/// One batch of events in the `events` schema.
fn batch(events: &[AuditEvent], with_guest_log: bool) -> Result<RecordBatch> {
    let texts = |f: fn(&AuditEvent) -> &str| -> ArrayRef {
        let mut b = StringBuilder::new();
        for e in events {
            b.append_value(f(e));
        }
        Arc::new(b.finish())
    };
    let numbers = |f: fn(&AuditEvent) -> u64| -> ArrayRef {
        let mut b = UInt64Builder::new();
        for e in events {
            b.append_value(f(e));
        }
        Arc::new(b.finish())
    };
    let lists = |f: &dyn Fn(&AuditEvent) -> &[String]| -> ArrayRef {
        let mut b = ListBuilder::new(StringBuilder::new());
        for e in events {
            for value in f(e) {
                b.values().append_value(value);
            }
            b.append(true);
        }
        Arc::new(b.finish())
    };
    let mut epsilon = Float64Builder::new();
    let mut record = StringBuilder::new();
    for e in events {
        epsilon.append_value(e.epsilon_spent);
        record.append_option(e.record.as_ref().map(|r| r.to_string()));
    }
    let no_log: &[String] = &[];
    let columns: Vec<ArrayRef> = vec![
        numbers(|e| e.seq),
        texts(|e| &e.time),
        texts(|e| &e.action),
        texts(|e| &e.principal),
        texts(|e| &e.org),
        texts(|e| &e.request_id),
        texts(|e| &e.job_id),
        texts(|e| &e.kind),
        texts(|e| &e.query),
        lists(&|e| &e.datasets),
        lists(&|e| &e.columns),
        texts(|e| e.decision.as_str()),
        texts(|e| &e.rule),
        texts(|e| &e.message),
        numbers(|e| e.rows_scanned),
        numbers(|e| e.rows_released),
        numbers(|e| e.rows_suppressed),
        numbers(|e| e.min_units),
        Arc::new(epsilon.finish()),
        texts(|e| &e.result_sha256),
        numbers(|e| e.duration_ms),
        numbers(|e| e.work_units),
        lists(&|e| if with_guest_log { &e.guest_log } else { no_log }),
        Arc::new(record.finish()),
    ];
    RecordBatch::try_new(schema(), columns)
        .map_err(|e| EngineError::Setup(format!("cannot build the events table: {e}")))
}

impl Engine {
    /// Runs read-only SQL over the journal's events for an auditor (every event) or a data owner
    /// (the events that touched its datasets). The call is recorded with its query text.
    pub async fn audit_sql(&self, ctx: &RequestContext, sql: &str) -> Result<AuditQueryResult> {
        let mut event = self.recorder.begin(ctx, Action::QueryEvents);
        event.set_kind(JobKind::AuditSql);
        event.query = sql.to_string();
        // Write-ahead: the call is on record before it runs, whatever becomes of it.
        if let Err(error) = event.admit("audit query admitted; running").await {
            return event.refuse(error).await;
        }
        let outcome = self.run_audit_sql(ctx, sql).await;
        if let Ok(result) = &outcome {
            event.rows_released = result.rows;
            event.message = format!("{} rows over {} events", result.rows, result.events);
        }
        event.conclude(outcome).await
    }

    async fn run_audit_sql(&self, ctx: &RequestContext, sql: &str) -> Result<AuditQueryResult> {
        let roles = &ctx.principal.roles;
        let auditor = roles.contains(&PrincipalRole::Auditor);
        if !auditor && !roles.contains(&PrincipalRole::Owner) {
            return Err(EngineError::RoleNotPermitted("QueryEvents"));
        }
        // The same text limits as any query: length, tokens and nesting, before parsing.
        if let Err(error) = self.sql.check_text(sql) {
            return Err(EngineError::AuditSqlText(error));
        }
        // The owner's datasets, fixed before reading: an owner sees an event when it names one.
        let owned: Vec<String> = self
            .policy
            .datasets_of_org(&ctx.principal.org)
            .map(|d| d.id.clone())
            .collect();
        let mut batches = Vec::new();
        let mut events = 0u64;
        let mut from = 1;
        loop {
            let page = self.recorder.journal().read(from, PAGE)?;
            let Some(last) = page.last() else { break };
            from = last.event.seq + 1;
            let visible: Vec<AuditEvent> = page
                .into_iter()
                .map(|stored| stored.event)
                .filter(|e| auditor || e.datasets.iter().any(|d| owned.contains(d)))
                .map(|e| if auditor { e } else { owners_view(e, &owned) })
                .collect();
            events += visible.len() as u64;
            for chunk in visible.chunks(BATCH_ROWS) {
                batches.push(batch(chunk, auditor)?);
            }
        }
        // A parse error reads as one (`syntax error: Expected: ...`), not as DataFusion's
        // `Debug` form of it.
        let invalid = |e: datafusion::error::DataFusionError| EngineError::Invalid {
            rule: EngineRule::AuditSql,
            message: sandbox_sql::syntax_error(&e).unwrap_or_else(|| e.message().to_string()),
        };
        let widths = column_widths(&batches);
        let limit = widths
            .values()
            .copied()
            .max()
            .unwrap_or(0)
            .saturating_mul(2)
            .max(MAX_VALUE_BYTES);
        let table_row: usize = widths.values().sum();
        let row_limit = table_row.max(MAX_VALUE_BYTES).saturating_mul(2);
        let batch_rows = (BATCH_BYTES / row_limit).clamp(1, BATCH_ROWS);
        // A projection makes one output row per input row, batch by batch: the table's own
        // batches are as small as any operator's.
        let batches: Vec<RecordBatch> = batches
            .iter()
            .flat_map(|batch| {
                (0..batch.num_rows())
                    .step_by(batch_rows)
                    .map(move |at| batch.slice(at, batch_rows.min(batch.num_rows() - at)))
            })
            .collect();
        let table = MemTable::try_new(schema(), vec![batches]).map_err(invalid)?;
        // Bounded like any query: its own memory pool, the parser's recursion limit, and run on
        // the query threads under the time limit, never on the threads that serve calls.
        let context = self
            .sql
            .scratch_session(vec![("events".to_string(), Arc::new(table))])?;
        {
            // Batches sized to the row bound bound what one node allocates at once; no recursive
            // queries (a value could double each round, past any bound the plan shows).
            let state = context.state_ref();
            let mut state = state.write();
            let options = state.config_mut().options_mut();
            options.execution.batch_size =
                datafusion::common::config::ConfigNonZeroUsize::try_new(batch_rows)
                    .map_err(|e| EngineError::Setup(format!("audit batch size: {e}")))?;
            options.execution.enable_recursive_ctes = false;
        }
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let sql = sql.to_string();
        let run = async move {
            let frame = context
                .sql_with_options(&sql, options)
                .await
                .map_err(invalid)?;
            check_functions(frame.logical_plan())?;
            check_sizes(frame.logical_plan(), &widths, limit, row_limit)?;
            let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
            let mut stream = frame.execute_stream().await.map_err(invalid)?;
            // Encoded as it comes, so the reply's size is known before the next batch is asked
            // for: a query stops where its result would pass what a reply may carry.
            let encode = |e: datafusion::arrow::error::ArrowError| {
                EngineError::Setup(format!("cannot encode the audit result: {e}"))
            };
            let mut ipc = Vec::new();
            let mut rows = 0usize;
            {
                let mut writer = StreamWriter::try_new(&mut ipc, &schema).map_err(encode)?;
                while let Some(batch) = stream.next().await {
                    let batch = batch.map_err(invalid)?;
                    rows += batch.num_rows();
                    if rows > MAX_ROWS {
                        return Err(EngineError::Invalid {
                            rule: EngineRule::AuditSqlTooManyRows,
                            message: format!(
                                "the result has more than {MAX_ROWS} rows; add a LIMIT"
                            ),
                        });
                    }
                    writer.write(&batch).map_err(encode)?;
                    if writer.get_ref().len() > MAX_RESULT_BYTES {
                        return Err(EngineError::Invalid {
                            rule: EngineRule::AuditSqlResultTooLarge,
                            message: format!(
                                "the result takes more than {} MiB; select fewer or shorter \
                                 values, or add a LIMIT",
                                MAX_RESULT_BYTES >> 20
                            ),
                        });
                    }
                }
                writer.finish().map_err(encode)?;
            }
            Ok::<_, EngineError>((ipc, rows))
        };
        let (ipc, rows) = match self.sql.run_bounded(run, CancellationToken::new()).await {
            Ok(outcome) => outcome?,
            Err(SqlError::TimeLimit(ms)) => {
                return Err(EngineError::Invalid {
                    rule: EngineRule::AuditSqlTimeout,
                    message: format!("the query ran longer than {} s", ms / 1000),
                });
            }
            Err(error) => return Err(error.into()),
        };
        Ok(AuditQueryResult {
            ipc,
            rows: rows as u64,
            events,
        })
    }
}

/// An event as a data owner reads it: of the datasets and columns it names, the owner's only (a
/// consumer's dataset listing names every department's datasets granted to it; another owner's
/// are not this owner's to see). Found in the fresh-attacker round of issue 18.
fn owners_view(mut event: AuditEvent, owned: &[String]) -> AuditEvent {
    event.datasets.retain(|d| owned.contains(d));
    event.columns.retain(|c| {
        c.split_once('.')
            .is_some_and(|(dataset, _)| owned.iter().any(|d| d == dataset))
    });
    event
}

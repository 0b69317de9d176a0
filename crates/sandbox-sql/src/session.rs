//! The SQL engine: one DataFusion session per job whose catalog holds only the caller's granted
//! datasets, planning through the guard, and bounded execution.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList,
    MemorySchemaProvider, SchemaProvider, TableProvider,
};
use datafusion::common::config::ConfigNonZeroUsize;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::FairSpillPool;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::{ExecutionPlan, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use datafusion::sql::sqlparser::parser::ParserError;
use futures::StreamExt;
use sandbox_policy::{DatasetPolicy, PolicySet};
use sandbox_release::GatePolicy;
use tokio_util::sync::CancellationToken;

use datafusion::common::ScalarValue;
use sandbox_policy::{Mask, Mode, ParamValue};

use crate::error::{Denial, Result, Rule, SqlError};
use crate::guard::{GrantedDataset, Guarded, guard, is_default_qualifier};
use crate::limits::JobMemoryPool;
use crate::masks::{self, MaskedTable, PseudonymKey};
use crate::rows::{GuardedRows, RowScope, guard_rows};

/// A template's bound parameters as the values of its `$name` placeholders.
pub fn placeholder_values(
    bound: impl IntoIterator<Item = (String, ParamValue)>,
) -> HashMap<String, ScalarValue> {
    bound
        .into_iter()
        .map(|(name, value)| {
            let value = match value {
                ParamValue::Int(i) => ScalarValue::Int64(Some(i)),
                ParamValue::Float(f) => ScalarValue::Float64(Some(f)),
                ParamValue::String(s) => ScalarValue::Utf8(Some(s)),
            };
            (name, value)
        })
        .collect()
}

/// Limits of the SQL path.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    /// Longest query text accepted, in bytes.
    pub max_query_bytes: usize,
    /// Deepest nesting the parser follows (subqueries, parentheses, nested expressions).
    pub parser_recursion_limit: usize,
    /// Most nodes (plan nodes plus expression nodes) a query's plan may have.
    pub max_plan_nodes: usize,
    /// Deepest expression tree a query's plan may hold (a chain `a + b + ...` of n terms is n
    /// deep).
    pub max_expr_depth: usize,
    /// Memory all running queries may use together; operators spill to disk beyond it.
    pub memory_pool_bytes: usize,
    /// Memory one query may use; its operators spill to disk beyond it (or beyond its fair share
    /// of the total pool, whichever comes first).
    pub job_memory_bytes: usize,
    /// Where sorts and aggregates spill; `None`: the operating system's temporary folder.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Most bytes all spill files together may take.
    pub max_spill_bytes: u64,
    /// Wall-clock limit per query.
    pub time_limit: Duration,
    /// Most rows a query may produce before the gate; beyond it the job fails.
    pub max_result_rows: usize,
    /// Parallelism of one query.
    pub target_partitions: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            max_query_bytes: 64 * 1024,
            parser_recursion_limit: 64,
            max_plan_nodes: 20_000,
            max_expr_depth: 256,
            memory_pool_bytes: 2 << 30,
            job_memory_bytes: 1 << 30,
            spill_dir: None,
            max_spill_bytes: 16 << 30,
            time_limit: Duration::from_secs(60),
            max_result_rows: 1_000_000,
            target_partitions: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// A query that passed the guard, with the session it was planned in.
pub struct PlannedQuery {
    context: SessionContext,
    guarded: Guarded,
}

impl std::fmt::Debug for PlannedQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedQuery")
            .field("guarded", &self.guarded)
            .finish()
    }
}

/// A code job's input query that passed the row-mode guard, with its session.
pub struct PlannedRows {
    context: SessionContext,
    guarded: GuardedRows,
}

impl PlannedRows {
    /// What the row-mode guard found the input reads.
    pub fn guarded(&self) -> &GuardedRows {
        &self.guarded
    }
}

impl std::fmt::Debug for PlannedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlannedRows")
            .field("guarded", &self.guarded)
            .finish()
    }
}

/// The output of a guarded query, still carrying the hidden columns. Sealed: only execution
/// builds it, and its rows leave it only through the release gate ([`Executed::release`],
/// [`Executed::release_dp`]); the rest is read-only.
#[derive(Debug)]
pub struct Executed {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    rows_scanned: u64,
    spilled_bytes: u64,
    /// Planned under differential privacy: only [`Executed::release_dp`] may release it, and
    /// only an exact plan [`Executed::release`].
    private: bool,
}

impl Executed {
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The rows as executed, hidden columns included (for checks of the gate, not for release).
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }

    /// Rows the query's scans read (for the journal).
    pub fn rows_scanned(&self) -> u64 {
        self.rows_scanned
    }

    /// Bytes the query's sorts, aggregates and joins spilled to disk under its memory limit.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    /// The exact release: the gate with its unit threshold and the differencing memory.
    pub fn release(
        self,
        gate: &GatePolicy,
        memory: &dyn sandbox_release::Remembered,
    ) -> std::result::Result<sandbox_release::Released, sandbox_release::ReleaseError> {
        if self.private {
            return Err(sandbox_release::ReleaseError::WrongGate(
                "a query planned under differential privacy goes through the DP gate",
            ));
        }
        sandbox_release::release(self.schema, self.batches, gate, memory)
    }

    /// The release under differential privacy, with the noise planned at admission.
    pub fn release_dp(
        self,
        noise: &sandbox_release::NoisePlan,
        gate: &GatePolicy,
    ) -> std::result::Result<
        (sandbox_release::Released, sandbox_release::DpReport),
        sandbox_release::ReleaseError,
    > {
        if !self.private {
            return Err(sandbox_release::ReleaseError::WrongGate(
                "an exact query goes through the exact gate",
            ));
        }
        sandbox_release::release_dp(self.schema, self.batches, noise, gate)
    }
}

/// A code job's input rows as executed: they go to the guest, never to a caller.
#[derive(Debug)]
pub struct ExecutedRows {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows_scanned: u64,
    /// Bytes the query's sorts and joins spilled to disk under its memory limit.
    pub spilled_bytes: u64,
}

/// Planning and execution of SQL jobs.
pub struct SqlEngine {
    /// Configuration, runtime and functions, built once. Each job gets a clone with a catalog of
    /// its own: rebuilding the function registry per job would cost more than the query planning.
    base_state: SessionState,
    tables: HashMap<String, Arc<dyn TableProvider>>,
    /// Masked columns per dataset, in the table's column order; datasets without any are absent.
    masked: HashMap<String, Vec<(String, Mask)>>,
    /// The privacy unit of every dataset, for the consent filter of row-mode scans.
    units: HashMap<String, String>,
    /// The declared row key of every dataset that has one.
    row_keys: HashMap<String, Vec<String>>,
    /// Whether each declared row key holds in the data, checked before the first exact query
    /// reads the dataset (the guard trusts it to tell a join that copies rows from one that
    /// does not, and the differencing defense to tell rows apart).
    row_keys_checked: tokio::sync::Mutex<HashMap<String, bool>>,
    limits: SqlLimits,
    executor: Executor,
}

impl std::fmt::Debug for SqlEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlEngine")
            .field("tables", &self.tables.keys().collect::<Vec<_>>())
            .field("limits", &self.limits)
            .finish()
    }
}

impl SqlEngine {
    /// Opens every dataset of the policy over its Parquet files under `data_dir`. Each table
    /// exposes only the declared, non-hidden columns, so hidden data is never even read. A
    /// declared column missing from the files is an error naming the policy file and line.
    pub async fn new(policy: &PolicySet, data_dir: &Path, limits: SqlLimits) -> Result<Self> {
        let mut disk =
            DiskManagerBuilder::default().with_max_temp_directory_size(limits.max_spill_bytes);
        if let Some(dir) = &limits.spill_dir {
            // Files of a previous run that ended without cleaning up are of no use.
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(|e| {
                    SqlError::Plan(format!(
                        "cannot clear the spill folder {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            std::fs::create_dir_all(dir).map_err(|e| {
                SqlError::Plan(format!(
                    "cannot create the spill folder {}: {e}",
                    dir.display()
                ))
            })?;
            disk = disk.with_mode(DiskManagerMode::Directories(vec![dir.clone()]));
        }
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(FairSpillPool::new(limits.memory_pool_bytes)))
            .with_disk_manager_builder(disk)
            .build_arc()
            .map_err(|e| SqlError::Plan(format!("cannot create runtime: {e}")))?;
        let mut config = SessionConfig::new()
            .with_information_schema(false)
            .with_target_partitions(limits.target_partitions.max(1));
        // The memory a sort sets aside for merging its spill files (10 MiB by default) must fit
        // the query's pool, or a small pool fails the sort instead of spilling it.
        config.options_mut().execution.sort_spill_reservation_bytes =
            (limits.job_memory_bytes / 8).min(10 << 20);
        // No reading less because of what the data holds: statistics, page indexes and bloom
        // filters would skip row groups by the values in them, dynamic filters would skip rows by
        // what a join's other side or a top-k found, and statistics would steer the plan (which
        // side a join builds) by a column's minimum and maximum, all of which a query's duration
        // shows. Every scan reads its files in full (see `full_scan` for operators that stop).
        crate::full_scan::no_data_shortcuts(config.options_mut());
        config.options_mut().sql_parser.recursion_limit =
            ConfigNonZeroUsize::try_new(limits.parser_recursion_limit.max(1))
                .map_err(|e| SqlError::Plan(format!("invalid recursion limit: {e}")))?;
        let base_state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .build();
        let mut tables = HashMap::new();
        let mut masked = HashMap::new();
        let mut units = HashMap::new();
        let mut row_keys = HashMap::new();
        for dataset in policy.datasets.values() {
            units.insert(dataset.id.clone(), dataset.privacy_unit.clone());
            if !dataset.row_key.is_empty() {
                row_keys.insert(dataset.id.clone(), dataset.row_key.clone());
            }
            let provider = open_dataset(&base_state, dataset, data_dir).await?;
            tables.insert(dataset.id.clone(), provider);
            let masks: Vec<(String, Mask)> = dataset
                .columns
                .iter()
                .filter_map(|c| c.mask.map(|m| (c.name.clone(), m)))
                .collect();
            if !masks.is_empty() {
                masked.insert(dataset.id.clone(), masks);
            }
        }
        Ok(SqlEngine {
            base_state,
            tables,
            masked,
            units,
            row_keys,
            row_keys_checked: tokio::sync::Mutex::new(HashMap::new()),
            executor: Executor::new(limits.target_partitions)?,
            limits,
        })
    }

    pub fn limits(&self) -> &SqlLimits {
        &self.limits
    }

    /// Refuses an exact query over a dataset whose declared row key does not hold in its data
    /// (two rows with the same key). Checked once per dataset, on first use, with a query of
    /// its own under the usual limits.
    pub async fn check_row_keys(&self, datasets: &[String]) -> Result<()> {
        let mut checked = self.row_keys_checked.lock().await;
        for id in datasets {
            let holds = match checked.get(id) {
                Some(holds) => *holds,
                None => {
                    let holds = self.row_key_holds(id).await?;
                    if !holds {
                        tracing::error!(dataset = %id, "the declared row key does not hold");
                    }
                    checked.insert(id.clone(), holds);
                    holds
                }
            };
            if !holds {
                return Err(Denial::new(
                    Rule::RowKeyUnavailable,
                    format!(
                        "the row key declared for `{id}` does not hold in its data; exact \
                         answers over it are refused until its owner corrects the policy"
                    ),
                )
                .into());
            }
        }
        Ok(())
    }

    async fn row_key_holds(&self, id: &str) -> Result<bool> {
        let (Some(key), Some(table)) = (self.row_keys.get(id), self.tables.get(id)) else {
            return Ok(false);
        };
        let columns = key
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let context = self.scratch_session(vec![("rows".into(), table.clone())])?;
        let sql = format!(
            "SELECT COUNT(*) AS duplicated FROM (SELECT {columns} FROM rows GROUP BY {columns} \
             HAVING COUNT(*) > 1) d"
        );
        let frame = context
            .sql(&sql)
            .await
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        let batches = self
            .run_bounded(
                async move { frame.collect().await },
                CancellationToken::new(),
            )
            .await?
            .map_err(|e| SqlError::Execution(e.to_string()))?;
        let duplicated = batches.first().filter(|b| b.num_rows() == 1).and_then(|b| {
            datafusion::arrow::compute::cast(
                b.column(0),
                &datafusion::arrow::datatypes::DataType::Int64,
            )
            .ok()
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<datafusion::arrow::array::Int64Array>()
                    .map(|a| a.value(0))
            })
        });
        Ok(duplicated == Some(0))
    }

    /// The schema a consumer sees for a dataset: its visible columns.
    pub fn visible_schema(&self, dataset: &str) -> Option<SchemaRef> {
        self.tables.get(dataset).map(|t| t.schema())
    }

    /// A fresh session whose catalog holds only the given datasets, masked for this consumer, and
    /// when `consented` is given, holding only the rows of those entities.
    fn session<'a>(
        &self,
        ids: impl Iterator<Item = &'a String>,
        key: &PseudonymKey,
        consented: Option<&crate::consent::ConsentSet>,
    ) -> Result<SessionContext> {
        let schema = MemorySchemaProvider::new();
        for id in ids {
            if let Some(table) = self.tables.get(id) {
                let mut table: Arc<dyn TableProvider> = match self.masked.get(id) {
                    Some(masks) => Arc::new(
                        MaskedTable::new(table.clone(), masks, key)
                            .map_err(|e| SqlError::Plan(format!("cannot mask `{id}`: {e}")))?,
                    ),
                    None => table.clone(),
                };
                if let Some(consented) = consented {
                    let unit = self
                        .units
                        .get(id)
                        .ok_or_else(|| SqlError::Plan(format!("`{id}` has no privacy unit")))?;
                    table = Arc::new(crate::consent::ConsentedTable::new(
                        table,
                        unit,
                        consented.clone(),
                    ));
                }
                schema
                    .register_table(id.clone(), table)
                    .map_err(|e| SqlError::Plan(format!("cannot register `{id}`: {e}")))?;
            }
        }
        self.bounded_context(schema)
    }

    /// A session whose catalog holds only `tables`, under the same limits as a query: its own
    /// memory pool within the shared one, the spill folder, the parser's recursion limit. For
    /// SQL over in-memory tables the engine builds itself (the journal's events); run its work
    /// with [`SqlEngine::run_bounded`] after [`SqlEngine::check_text`].
    pub fn scratch_session(
        &self,
        tables: Vec<(String, Arc<dyn TableProvider>)>,
    ) -> Result<SessionContext> {
        let schema = MemorySchemaProvider::new();
        for (name, table) in tables {
            schema
                .register_table(name.clone(), table)
                .map_err(|e| SqlError::Plan(format!("cannot register `{name}`: {e}")))?;
        }
        self.bounded_context(schema)
    }

    /// A session over one schema of tables, with the job's own memory pool.
    fn bounded_context(&self, schema: MemorySchemaProvider) -> Result<SessionContext> {
        let catalog = MemoryCatalogProvider::new();
        catalog
            .register_schema("public", Arc::new(schema))
            .map_err(|e| SqlError::Plan(format!("cannot create the job's catalog: {e}")))?;
        let catalogs = MemoryCatalogProviderList::new();
        catalogs.register_catalog("datafusion".to_string(), Arc::new(catalog));
        // The job's own memory pool: bounded by the per-job limit and by the shared total.
        let shared = self.base_state.runtime_env();
        let runtime = Arc::new(RuntimeEnv {
            memory_pool: Arc::new(JobMemoryPool::new(
                self.limits.job_memory_bytes,
                shared.memory_pool.clone(),
            )),
            disk_manager: shared.disk_manager.clone(),
            cache_manager: shared.cache_manager.clone(),
            object_store_registry: shared.object_store_registry.clone(),
        });
        let mut state = SessionStateBuilder::new_from_existing(self.base_state.clone())
            .with_runtime_env(runtime)
            .build();
        state.register_catalog_list(Arc::new(catalogs));
        Ok(SessionContext::new_with_state(state))
    }

    /// Parses and plans a query, then passes it through the guard. Reads no data.
    pub async fn plan(
        &self,
        sql: &str,
        granted: &HashMap<String, GrantedDataset>,
        key: &PseudonymKey,
        mode: Mode,
    ) -> Result<PlannedQuery> {
        self.plan_with(sql, granted, key, mode, &HashMap::new())
            .await
    }

    /// [`SqlEngine::plan`] for an approved template: `$name` placeholders are bound to `params`
    /// before the guard sees the plan, so the guard checks the query as it will run.
    pub async fn plan_with(
        &self,
        sql: &str,
        granted: &HashMap<String, GrantedDataset>,
        key: &PseudonymKey,
        mode: Mode,
        params: &HashMap<String, ScalarValue>,
    ) -> Result<PlannedQuery> {
        let (context, plan) = self
            .logical_plan(sql, granted.keys(), key, None, params, |t| {
                granted.contains_key(t)
            })
            .await?;
        let guarded = guard(&plan, granted, mode)?;
        Ok(PlannedQuery { context, guarded })
    }

    /// Plans the input query of a code job and passes it through the row-mode guard, within the
    /// module's approved scope. Reads no data.
    pub async fn plan_rows(
        &self,
        sql: &str,
        scope: &RowScope,
        key: &PseudonymKey,
    ) -> Result<PlannedRows> {
        self.plan_rows_with(sql, scope, key, &HashMap::new()).await
    }

    /// [`SqlEngine::plan_rows`] with `$name` placeholders bound to `params` (scoring templates).
    pub async fn plan_rows_with(
        &self,
        sql: &str,
        scope: &RowScope,
        key: &PseudonymKey,
        params: &HashMap<String, ScalarValue>,
    ) -> Result<PlannedRows> {
        let (context, plan) = self
            .logical_plan(
                sql,
                scope.datasets.keys(),
                key,
                Some(&scope.consented),
                params,
                |t| scope.datasets.contains_key(t),
            )
            .await?;
        let guarded = guard_rows(&plan, scope)?;
        Ok(PlannedRows { context, guarded })
    }

    /// Parse, statement-kind check, table check and planning, shared by both modes.
    async fn logical_plan<'a>(
        &self,
        sql: &str,
        catalog: impl Iterator<Item = &'a String>,
        key: &PseudonymKey,
        consented: Option<&crate::consent::ConsentSet>,
        params: &HashMap<String, ScalarValue>,
        known: impl Fn(&str) -> bool,
    ) -> Result<(SessionContext, LogicalPlan)> {
        self.check_text(sql)?;
        let context = self.session(catalog, key, consented)?;
        let state = context.state();
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state
            .sql_to_statement(sql, &dialect)
            .map_err(|e| parse_error(&e, self.limits.parser_recursion_limit))?;
        let is_query = matches!(&statement, DfStatement::Statement(s) if matches!(s.as_ref(), SqlStatement::Query(_)));
        if !is_query {
            return Err(Denial::new(
                Rule::StatementNotQuery,
                "only SELECT queries are allowed (no DDL, DML, COPY, SET, EXPLAIN or SHOW)",
            )
            .into());
        }
        let references = state
            .resolve_table_references(&statement)
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        for reference in &references {
            let default_qualifier = is_default_qualifier(reference);
            if !default_qualifier || !known(reference.table()) {
                // The same answer whether or not such a table exists.
                return Err(Denial::new(
                    Rule::DatasetNotGranted,
                    format!("`{reference}` is not a dataset granted to you"),
                )
                .into());
            }
        }
        let mut plan = state
            .statement_to_plan(statement)
            .await
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        if !params.is_empty() {
            plan = plan
                .with_param_values(params.clone())
                .map_err(|e| SqlError::Plan(root_message(&e)))?;
        }
        crate::limits::check_plan_size(&plan, &self.limits)?;
        Ok((context, plan))
    }

    /// The limits checked on the text, before it is parsed: its length, its tokens and how
    /// deep its expressions could nest.
    pub fn check_text(&self, sql: &str) -> Result<()> {
        if sql.len() > self.limits.max_query_bytes {
            return Err(Denial::new(
                Rule::QueryTooLong,
                format!(
                    "query text is {} bytes; the limit is {}",
                    sql.len(),
                    self.limits.max_query_bytes
                ),
            )
            .into());
        }
        crate::limits::check_tokens(sql, &self.limits)
    }

    /// The tables a query names (CTE names excluded), without planning it: what a template
    /// reads, for its approvals.
    pub fn tables_of(&self, sql: &str) -> Result<Vec<String>> {
        self.check_text(sql)?;
        let state = &self.base_state;
        let dialect = state.config().options().sql_parser.dialect;
        let statement = state
            .sql_to_statement(sql, &dialect)
            .map_err(|e| parse_error(&e, self.limits.parser_recursion_limit))?;
        let references = state
            .resolve_table_references(&statement)
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        let mut tables: Vec<String> = Vec::new();
        for reference in references {
            if !is_default_qualifier(&reference) {
                return Err(Denial::new(
                    Rule::DatasetNotGranted,
                    format!("`{reference}` is not a dataset"),
                )
                .into());
            }
            let table = reference.table().to_string();
            if !tables.contains(&table) {
                tables.push(table);
            }
        }
        tables.sort();
        Ok(tables)
    }

    /// Runs a planned query under the memory pool, the time limit and the row cap.
    pub async fn execute(
        &self,
        planned: PlannedQuery,
        cancel: CancellationToken,
    ) -> Result<Executed> {
        let private = planned.guarded.dp.is_some();
        let executed = self
            .run_plan(&planned.context, &planned.guarded.plan, cancel)
            .await?;
        Ok(Executed {
            private,
            ..executed
        })
    }

    /// Runs a code job's input query under the same limits. The rows go to the guest only.
    pub async fn execute_rows(
        &self,
        planned: PlannedRows,
        cancel: CancellationToken,
    ) -> Result<ExecutedRows> {
        let executed = self
            .run_plan(&planned.context, &planned.guarded.plan, cancel)
            .await?;
        Ok(ExecutedRows {
            schema: executed.schema,
            batches: executed.batches,
            rows_scanned: executed.rows_scanned,
            spilled_bytes: executed.spilled_bytes,
        })
    }

    async fn run_plan(
        &self,
        context: &SessionContext,
        plan: &LogicalPlan,
        cancel: CancellationToken,
    ) -> Result<Executed> {
        let max_rows = self.limits.max_result_rows;
        let state = context.state();
        // Analysis and optimization read no data: their errors are about the plan.
        let optimized = state
            .optimize(plan)
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        // After type coercion: the casts it added are visible now, before any data is read.
        crate::casts::refuse_failing_casts(&optimized)?;
        // No join may end early on an empty side (see `full_scan`). After the optimizer, which
        // would push the sentinels' filter below the joins.
        let optimized = crate::full_scan::sentinel_joins(optimized)
            .map_err(|e| SqlError::Plan(root_message(&e)))?;
        let task_ctx = context.task_ctx();
        let work = async move {
            let physical = state
                .query_planner()
                .create_physical_plan(&optimized, &state)
                .await
                .map_err(execution_error)?;
            // Every scan read to its end (see `full_scan`): the query's duration must not say
            // whether an operator could stop early because of what the data held.
            let mut scans = Vec::new();
            let physical =
                crate::full_scan::wrap_scans(physical, &mut scans).map_err(execution_error)?;
            let schema = physical.schema();
            let mut stream =
                execute_stream(physical.clone(), task_ctx.clone()).map_err(execution_error)?;
            let mut batches = Vec::new();
            let mut rows = 0usize;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(execution_error)?;
                rows += batch.num_rows();
                if rows > max_rows {
                    return Err(SqlError::ResourcesExhausted(format!(
                        "result exceeds {max_rows} rows before release"
                    )));
                }
                batches.push(batch);
                // A yield point per batch, so an abort is seen promptly.
                tokio::task::consume_budget().await;
            }
            drop(stream);
            crate::full_scan::drain(&scans, task_ctx)
                .await
                .map_err(execution_error)?;
            Ok(Executed {
                schema,
                batches,
                rows_scanned: rows_scanned(physical.as_ref()),
                spilled_bytes: spilled_bytes(physical.as_ref()),
                private: false,
            })
        };
        self.run_bounded(work, cancel).await?
    }

    /// Runs `work` on the query threads: a query's CPU-bound operators never hold the threads
    /// that answer calls, run timers and write the journal. Past the time limit or on `cancel`,
    /// the work is aborted.
    pub async fn run_bounded<F>(&self, work: F, cancel: CancellationToken) -> Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let time_limit = self.limits.time_limit;
        let mut task = self.executor.spawn(work);
        let stopped = tokio::select! {
            biased;
            () = cancel.cancelled() => SqlError::Cancelled,
            () = tokio::time::sleep(time_limit) => {
                SqlError::TimeLimit(time_limit.as_millis() as u64)
            }
            joined = &mut task => return joined.map_err(|e| {
                SqlError::Execution(format!("the query's task ended abnormally: {e}"))
            }),
        };
        // An abort takes effect at the task's next yield; until then it holds its memory. Wait
        // (briefly) for it to be dropped, so that a job that has ended no longer holds any of
        // the shared pool the next query needs.
        task.abort();
        if tokio::time::timeout(ABORT_GRACE, &mut task).await.is_err() {
            tracing::warn!("an aborted query is still unwinding");
        }
        Err(stopped)
    }
}

/// How long a stopped query's task is given to unwind and release its memory.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// The threads queries execute on, apart from the runtime that serves calls. Shut down in the
/// background when the engine is dropped (possibly from async code, where a runtime may not be
/// dropped in place).
struct Executor {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Executor {
    fn new(threads: usize) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("sandbox-sql")
            .enable_time()
            .build()
            .map_err(|e| SqlError::Plan(format!("cannot start the query threads: {e}")))?;
        Ok(Executor {
            runtime: Some(runtime),
        })
    }

    fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the engine")
            .spawn(work)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl PlannedQuery {
    /// What the guard decided: the rewritten plan, what it reads, its threshold, and whether it
    /// is released exactly or under differential privacy (`dp`), decided once here.
    pub fn guarded(&self) -> &Guarded {
        &self.guarded
    }

    /// The gate's inputs, from the guard's decision: the threshold, `OFFSET`/`LIMIT` and the
    /// rows' source (none under differential privacy, where partition selection decides), with
    /// the server's row cap and the query's deadline.
    pub fn gate_policy(&self, max_rows: usize, deadline: Option<std::time::Instant>) -> GatePolicy {
        let private = self.guarded.dp.is_some();
        GatePolicy {
            min_units: if private { 0 } else { self.guarded.min_units },
            skip: self.guarded.skip,
            fetch: self.guarded.fetch,
            max_rows,
            deadline,
            source: if private { 0 } else { self.guarded.source },
        }
    }

    /// The schema its release will have (hidden columns gone, or the noisy outputs under
    /// differential privacy), known before it runs.
    pub fn released_schema(&self) -> Result<SchemaRef> {
        let plan_schema = self.guarded.plan.schema().as_arrow();
        sandbox_release::released_schema(plan_schema, self.guarded.dp.as_ref().map(|d| &d.spec))
            .map_err(|e| SqlError::Plan(format!("cannot derive the released schema: {e}")))
    }

    /// The rewritten plan, as shown by `explain`.
    pub fn display_plan(&self) -> String {
        self.guarded.plan.display_indent().to_string()
    }
}

async fn open_dataset(
    state: &SessionState,
    dataset: &DatasetPolicy,
    data_dir: &Path,
) -> Result<Arc<dyn TableProvider>> {
    let fail = |message: String| SqlError::Dataset {
        dataset: dataset.id.clone(),
        location: dataset.location.to_string(),
        message,
    };
    let mut urls = Vec::new();
    for source in &dataset.source {
        let path = data_dir.join(source);
        if !path.exists() {
            return Err(fail(format!(
                "source `{source}` does not exist in the data dir"
            )));
        }
        let mut text = path.to_string_lossy().into_owned();
        if path.is_dir() && !text.ends_with('/') {
            text.push('/');
        }
        urls.push(
            ListingTableUrl::parse(&text).map_err(|e| fail(format!("source `{source}`: {e}")))?,
        );
    }
    // The session's Parquet options and statistics settings (no pruning and no statistics: see
    // where the session is configured).
    let format = ParquetFormat::new().with_options(state.table_options().parquet.clone());
    let options = ListingOptions::new(Arc::new(format)).with_file_extension(".parquet");
    let file_schema = options.infer_schema(state, &urls[0]).await.map_err(|e| {
        fail(format!(
            "cannot read the schema of its Parquet files: {}",
            root_message(&e)
        ))
    })?;
    let mut fields = Vec::new();
    for column in &dataset.columns {
        let Ok(field) = file_schema.field_with_name(&column.name) else {
            return Err(SqlError::Dataset {
                dataset: dataset.id.clone(),
                location: column.location.to_string(),
                message: format!(
                    "declared column `{}` is not in the dataset's files",
                    column.name
                ),
            });
        };
        if let Some(mask) = column.mask
            && !masks::supports(mask, field.data_type())
        {
            return Err(SqlError::Dataset {
                dataset: dataset.id.clone(),
                location: column.location.to_string(),
                message: format!(
                    "mask `{}` does not apply to column `{}` of type {}",
                    mask.describe(),
                    column.name,
                    field.data_type()
                ),
            });
        }
        if column.role != sandbox_policy::Role::Hidden {
            fields.push(field.clone());
        }
    }
    let visible = Arc::new(Schema::new(fields));
    let config = ListingTableConfig::new_with_multi_paths(urls)
        .with_listing_options(options)
        .with_schema(visible);
    let table = ListingTable::try_new(config)
        .map_err(|e| fail(root_message(&e)))?
        .with_cache(state.runtime_env().cache_manager.get_file_statistic_cache());
    Ok(Arc::new(table))
}

/// Rows read from the sources: the output of every leaf of the physical plan.
fn rows_scanned(plan: &dyn ExecutionPlan) -> u64 {
    if plan.children().is_empty() {
        return plan.metrics().and_then(|m| m.output_rows()).unwrap_or(0) as u64;
    }
    plan.children()
        .into_iter()
        .map(|c| rows_scanned(c.as_ref()))
        .sum()
}

/// A parse error; running into the recursion limit is a refusal by a limit, not bad syntax.
fn parse_error(error: &DataFusionError, limit: usize) -> SqlError {
    if let DataFusionError::SQL(parser, _) = error.find_root()
        && matches!(parser.as_ref(), ParserError::RecursionLimitExceeded)
    {
        return Denial::new(
            Rule::QueryTooComplex,
            format!("the query nests deeper than the parser's limit of {limit} levels"),
        )
        .into();
    }
    SqlError::Syntax(
        crate::error::syntax_error(error)
            .unwrap_or_else(|| format!("invalid SQL: {}", root_message(error))),
    )
}

/// Bytes spilled by every operator of the physical plan.
fn spilled_bytes(plan: &dyn ExecutionPlan) -> u64 {
    let own = plan.metrics().and_then(|m| m.spilled_bytes()).unwrap_or(0) as u64;
    own + plan
        .children()
        .into_iter()
        .map(|c| spilled_bytes(c.as_ref()))
        .sum::<u64>()
}

fn root_message(error: &DataFusionError) -> String {
    error.find_root().to_string()
}

fn execution_error(error: DataFusionError) -> SqlError {
    match error.find_root() {
        DataFusionError::ResourcesExhausted(message) => {
            SqlError::ResourcesExhausted(message.clone())
        }
        root => SqlError::Execution(root.to_string()),
    }
}

//! The release gate: the one way a result leaves the sandbox, for SQL and WASM jobs alike.
//!
//! The execute stage hands the gate Arrow batches that still carry hidden columns added by the
//! plan guard's rewrite: [`UNITS_COLUMN`] holds, per output row, how many distinct privacy units
//! contributed to it (capped at the threshold, which is all the gate needs to know). The gate
//!
//! 1. refuses input without the hidden unit count (fail closed: a plan that lost it is not
//!    released at all); a null count is zero units;
//! 2. suppresses every row below `min_units` and counts it; then drops rows whose hidden
//!    [`HAVING_COLUMN`] (the query's filter over aggregated rows, when it has one) is not true,
//!    without counting them, so that the suppressed count never depends on that filter;
//! 3. applies the query's `OFFSET`/`LIMIT` *after* suppression, so a limit cannot be used to learn
//!    which rows would have been suppressed;
//!    A row that passed the threshold is also suppressed when its units differ from those of a
//!    row released to the same consumer org by an earlier query in fewer than `min_units` units
//!    (the differencing defense, [`differencing`]), counted apart;
//! 4. strips every hidden column (any name starting with [`HIDDEN_PREFIX`]).
//!
//! Code jobs pass [`release_contract`] instead: the approval's output contract (exact schema, one
//! row per entity, bounded values) and consent (rows for other entities are dropped and counted).
//! Under differential privacy, [`release_dp`] (see [`dp`]) replaces the threshold with partition
//! selection and noise.
//!
//! The result is a [`Released`], which only these functions can build (and `dp::reload_answer`,
//! which reads back an answer this gate released before, for the engine's answer store): the
//! delivery stage takes a `Released`, so no code path can send rows that did not pass the gate.
//! [`released_schema`] is the gate's own answer to "what schema will this plan release", used to
//! announce a schema before a query runs (Flight SQL; the fuzz oracle checks it equals the
//! released one).
//!
//! This crate depends on Arrow and, for the noise, OpenDP; never on DataFusion (checked by
//! `.ci/run`): the gate must serve code jobs too.
//!
//! # Differencing (`differencing.rs`)
//!
//! The sketch: 192 cells in three partitions of 64; each cell a row count, a sum of unit keys, a
//! sum of check values and a sum of row identities modulo 2^64, so sketches add and subtract.
//! `Sketch::difference` proves two rows at least `min_units` apart when one partition has that many
//! differing cells (each unit touches one cell per partition), else lists the differing units by
//! peeling; units whose rows changed count as differing; what cannot be proven far is treated as
//! near. [`is_near`]: a row is withheld when a remembered row is 1 to `min_units - 1` units away,
//! or has exactly its rows but came from another question (another `GatePolicy::source`). The gate
//! also withholds the smallest released row while what the query hides covers 1 to `min_units - 1`
//! units (complementary suppression), checks the sum of its released rows against the memory too,
//! and runs its work under the query's deadline (`time-limit`). The memory itself (per org,
//! durable, bounded) is the engine's.
//!
//! # Differential privacy (`dp.rs`)
//!
//! [`plan_noise`] fixes a query's mechanisms before it runs (the epsilon split by weight: a sum
//! three shares, a count and the partition selection one; none for selection over public groups;
//! each scale calibrated until OpenDP's privacy map says it fits its share; the least threshold
//! whose delta fits), so the budget is debited with their exact cost. [`release_dp`] rebuilds them
//! (OpenDP measurements cannot cross threads), keeps the groups whose noisy unit count passes the
//! threshold (all, for public groups), adds noise to every statistic and post-processes. Under DP
//! the summary tells no exact figure (groups not shown, rows scanned).
//!
//! # Codes
//!
//! [`ReleaseError::code`]: `contract-violation` (a guest's output breaks its contract: nothing is
//! released), `time-limit` (the gate's work past the query's deadline), `release-too-many-rows`,
//! `release-dp`, and `release-missing-unit-count`, `release-missing-sketch`,
//! `release-hidden-column-type`, `release-schema-mismatch` (a plan that lost what the gate needs:
//! nothing is released).

mod contract;
pub mod differencing;
pub mod dp;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryArray, BooleanArray, RecordBatch, UInt64Array};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Schema, SchemaRef};
use arrow::ipc::writer::StreamWriter;

pub use contract::{ContractGate, contract_schema, release_contract};
pub use dp::{DpOutput, DpReport, DpSpec, DpStat, NoisePlan, plan_noise, release_dp};

/// Prefix of every column the sandbox adds for its own checks. Users may not name columns so.
pub const HIDDEN_PREFIX: &str = "__sandbox_";
/// Hidden column with the (capped) count of distinct privacy units behind an output row.
pub const UNITS_COLUMN: &str = "__sandbox_units";
/// Hidden boolean column with the query's `HAVING` predicate per row, applied after suppression.
pub const HAVING_COLUMN: &str = "__sandbox_having";

/// Why the gate refused to release anything.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("result lacks the hidden unit count column; nothing is released")]
    MissingUnitCount,
    #[error("hidden unit count column has type {0}, expected UInt64; nothing is released")]
    UnitCountType(DataType),
    #[error("result lacks the hidden unit sketch (or it is malformed); nothing is released")]
    MissingSketch,
    #[error("hidden HAVING column has type {0}, expected Boolean; nothing is released")]
    HavingType(DataType),
    #[error("batch schema differs from the result schema; nothing is released")]
    SchemaMismatch,
    #[error("result exceeds the release limit of {limit} rows")]
    TooManyRows { limit: usize },
    #[error("the release did not finish within the query's time limit; nothing is released")]
    TimeLimit,
    #[error("output breaks the approved contract: {0}; nothing is released")]
    ContractViolation(String),
    #[error("differential privacy: {0}; nothing is released")]
    Dp(String),
    #[error("cannot process result batches: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// A result brought to a gate of another kind than its plan's (exact or private).
    #[error("{0}; nothing is released")]
    WrongGate(&'static str),
}

impl ReleaseError {
    /// Stable code, shown to clients and recorded in the journal.
    pub fn code(&self) -> &'static str {
        match self {
            ReleaseError::MissingUnitCount => "release-missing-unit-count",
            ReleaseError::MissingSketch => "release-missing-sketch",
            ReleaseError::UnitCountType(_) | ReleaseError::HavingType(_) => {
                "release-hidden-column-type"
            }
            ReleaseError::SchemaMismatch => "release-schema-mismatch",
            ReleaseError::TooManyRows { .. } => "release-too-many-rows",
            ReleaseError::TimeLimit => "time-limit",
            ReleaseError::ContractViolation(_) => "contract-violation",
            ReleaseError::Dp(_) => "release-dp",
            ReleaseError::Arrow(_) => "release-arrow",
            ReleaseError::WrongGate(_) => "release-wrong-gate",
        }
    }
}

pub type Result<T, E = ReleaseError> = std::result::Result<T, E>;

/// What the gate enforces for one job.
#[derive(Debug, Clone)]
pub struct GatePolicy {
    /// Distinct privacy units every released row must cover.
    pub min_units: u64,
    /// Rows to skip after suppression (the query's `OFFSET`).
    pub skip: usize,
    /// Most rows to release after suppression (the query's `LIMIT`).
    pub fetch: Option<usize>,
    /// Hard cap on released rows; above it nothing is released.
    pub max_rows: usize,
    /// When the job's time is up: the gate's own work counts against the query's limit.
    pub deadline: Option<std::time::Instant>,
    /// A digest of where the rows come from (the aggregate's input and grouping, not its
    /// functions or anything above it): a row identical to one released from the same source
    /// says nothing new whatever the data, so it is released again; identical rows from another
    /// source are a coincidence of the data, and withheld.
    pub source: u64,
}

/// What the caller is told about the release, and what the journal records besides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseSummary {
    pub rows_released: u64,
    /// Rows below the threshold.
    pub rows_suppressed: u64,
    /// Rows at or above the threshold withheld by the differencing defense, or as complements of
    /// suppressed ones.
    pub rows_differencing: u64,
    pub min_units: u64,
}

/// How the gate compares a new row with what was released before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identical {
    /// An identical row is near (withheld), unless it was released from this source.
    Near { except_source: u64 },
    /// An identical row is not near (the sum of a query's rows against a remembered total).
    Far,
}

/// What a consumer org was released before, as the gate asks it (the engine keeps it indexed;
/// a vector of (sketch, source) pairs is searched in full).
pub trait Remembered {
    /// Whether a remembered row's input rows differ from `sketch`'s in fewer than `min_units`
    /// units, or are identical to them as `identical` says.
    fn near(&self, sketch: &differencing::Sketch, min_units: u64, identical: Identical) -> bool;
}

/// Whether a remembered row (its sketch, the sources it was released from) is near `sketch`.
pub fn is_near(
    sketch: &differencing::Sketch,
    remembered: &differencing::Sketch,
    sources: &[u64],
    min_units: u64,
    identical: Identical,
) -> bool {
    match sketch.difference(remembered, min_units) {
        differencing::Difference::None => match identical {
            Identical::Near { except_source } => !sources.contains(&except_source),
            Identical::Far => false,
        },
        other => other.is_differencing(min_units),
    }
}

impl Remembered for Vec<(differencing::Sketch, u64)> {
    fn near(&self, sketch: &differencing::Sketch, min_units: u64, identical: Identical) -> bool {
        self.iter().any(|(other, source)| {
            is_near(
                sketch,
                other,
                std::slice::from_ref(source),
                min_units,
                identical,
            )
        })
    }
}

/// Rebuilds the columns whose buffers can hold values of rows that are not in the batch: null
/// slots are emptied (a `take` with a null index leaves another row's value under one). A filter
/// or a `take` keeps a view array's (`Utf8View`, `BinaryView`) data buffers whole and a dictionary
/// array's whole dictionary, and the IPC writer sends every buffer and the whole dictionary: the
/// values of suppressed rows would travel in the released bytes. View arrays are garbage-collected
/// (`gc`: only the values their views reference), dictionaries rebuilt from the values present;
/// a nested column that holds either is refused (fail closed: the gate never releases one today).
pub fn compact(batch: RecordBatch) -> Result<RecordBatch> {
    let columns = batch
        .columns()
        .iter()
        .map(compact_column)
        .collect::<Result<Vec<_>>>()?;
    let options = arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        batch.schema(),
        columns,
        &options,
    )?)
}

fn compact_column(column: &ArrayRef) -> Result<ArrayRef> {
    use arrow::array::AsArray;
    // Under a null slot a `take` (a null index) or a join leaves another row's value or view:
    // the slots are rebuilt empty, from a null array, before anything else.
    let zeroed;
    let column = if column.null_count() > 0 {
        let valid = arrow::compute::is_not_null(column)?;
        let nulls = arrow::array::new_null_array(column.data_type(), column.len());
        zeroed = arrow::compute::kernels::zip::zip(&valid, column, &nulls)?;
        &zeroed
    } else {
        column
    };
    Ok(match column.data_type() {
        DataType::Utf8View => Arc::new(column.as_string_view().gc()),
        DataType::BinaryView => Arc::new(column.as_binary_view().gc()),
        DataType::Dictionary(_, values) => {
            // Through the values and back: the new dictionary holds only the values present.
            let plain = arrow::compute::cast(column, values)?;
            arrow::compute::cast(&compact_column(&plain)?, column.data_type())?
        }
        other if holds_shared_buffers(other) => {
            return Err(ReleaseError::Arrow(
                arrow::error::ArrowError::InvalidArgumentError(format!(
                    "cannot release a nested column of type {other}"
                )),
            ));
        }
        _ => column.clone(),
    })
}

/// Whether a type is, or nests, a view or a dictionary type.
fn holds_shared_buffers(data_type: &DataType) -> bool {
    match data_type {
        DataType::Utf8View
        | DataType::BinaryView
        | DataType::Dictionary(..)
        | DataType::ListView(_)
        | DataType::LargeListView(_) => true,
        DataType::List(field)
        | DataType::LargeList(field)
        | DataType::FixedSizeList(field, _)
        | DataType::Map(field, _) => holds_shared_buffers(field.data_type()),
        DataType::Struct(fields) => fields.iter().any(|f| holds_shared_buffers(f.data_type())),
        DataType::Union(fields, _) => fields
            .iter()
            .any(|(_, f)| holds_shared_buffers(f.data_type())),
        DataType::RunEndEncoded(_, values) => holds_shared_buffers(values.data_type()),
        _ => false,
    }
}

/// A result that passed the gate. Only [`release`] and [`release_contract`] construct it.
#[derive(Debug, Clone)]
pub struct Released {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    summary: ReleaseSummary,
    /// The sketches the consumer org's memory must keep: each released row's and, when a query
    /// released several, their sum (exact releases).
    sketches: Vec<differencing::Sketch>,
}

impl Released {
    /// The one constructor: every column is compacted first (see [`compact`]), so the released
    /// batches, their IPC bytes and anything streamed from them hold the released rows' values
    /// and nothing else.
    pub(crate) fn new(
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        summary: ReleaseSummary,
        sketches: Vec<differencing::Sketch>,
    ) -> Result<Self> {
        let batches = batches
            .into_iter()
            .map(compact)
            .collect::<Result<Vec<_>>>()?;
        Ok(Released {
            schema,
            batches,
            summary,
            sketches,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }
    pub fn summary(&self) -> ReleaseSummary {
        self.summary
    }
    /// The sketches the consumer org's differencing memory must remember once the release is
    /// recorded.
    pub fn sketches(&self) -> &[differencing::Sketch] {
        &self.sketches
    }

    /// The released rows as one Arrow IPC stream (schema, batches, end marker): the exact bytes
    /// whose SHA-256 the journal records and the client receives.
    pub fn to_ipc_stream(&self) -> Result<Vec<u8>> {
        let mut buffer = Vec::new();
        {
            let mut writer = StreamWriter::try_new(&mut buffer, &self.schema)?;
            for batch in &self.batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Ok(buffer)
    }
}

/// One output row over the threshold, as the gate weighs it.
struct Candidate {
    batch: usize,
    row: usize,
    sketch: differencing::Sketch,
    /// Still to be released.
    released: bool,
}

/// Passes a result through the gate. `remembered` is what was released to the same consumer org
/// before (its differencing memory).
///
/// In order: rows below `min_units` are suppressed; rows near a remembered one are withheld;
/// the query's `HAVING`, then `OFFSET` and `LIMIT`, apply to what remains; if everything not
/// released covers between one and `min_units - 1` units, the smallest released row is withheld
/// too (complementary suppression: a total minus the released rows would otherwise be the
/// value of those few); the same when the released rows sum to within a few units of a
/// remembered row. Hidden columns are stripped.
pub fn release(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    policy: &GatePolicy,
    remembered: &dyn Remembered,
) -> Result<Released> {
    let units_index = schema
        .index_of(UNITS_COLUMN)
        .map_err(|_| ReleaseError::MissingUnitCount)?;
    let units_type = schema.field(units_index).data_type();
    if units_type != &DataType::UInt64 {
        return Err(ReleaseError::UnitCountType(units_type.clone()));
    }
    let having_index = match schema.index_of(HAVING_COLUMN) {
        Ok(index) => {
            let having_type = schema.field(index).data_type();
            if having_type != &DataType::Boolean {
                return Err(ReleaseError::HavingType(having_type.clone()));
            }
            Some(index)
        }
        Err(_) => None,
    };
    let sketch_index = schema
        .index_of(differencing::SKETCH_COLUMN)
        .map_err(|_| ReleaseError::MissingSketch)?;
    if schema.field(sketch_index).data_type() != &DataType::Binary {
        return Err(ReleaseError::MissingSketch);
    }
    let visible = visible_columns(&schema);
    let out_schema = Arc::new(schema.project(&visible)?);
    let min_units = policy.min_units;
    let mut summary = ReleaseSummary {
        min_units,
        ..ReleaseSummary::default()
    };
    let on_time = || {
        policy
            .deadline
            .is_none_or(|deadline| std::time::Instant::now() <= deadline)
    };

    // Everything the caller will not see, summed: the suppressed cells and, below, every row
    // withheld for another reason.
    let mut hidden = differencing::Sketch::default();
    let mut candidates: Vec<Candidate> = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        if batch.schema().fields() != schema.fields() {
            return Err(ReleaseError::SchemaMismatch);
        }
        if !on_time() {
            return Err(ReleaseError::TimeLimit);
        }
        let units = batch
            .column(units_index)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| {
                ReleaseError::UnitCountType(batch.column(units_index).data_type().clone())
            })?;
        let sketches = batch
            .column(sketch_index)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or(ReleaseError::MissingSketch)?;
        let having = match having_index {
            None => None,
            Some(index) => Some(
                batch
                    .column(index)
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        ReleaseError::HavingType(batch.column(index).data_type().clone())
                    })?,
            ),
        };
        for row in 0..batch.num_rows() {
            let sketch = (!sketches.is_null(row))
                .then(|| differencing::decode(sketches.value(row)))
                .flatten()
                .ok_or(ReleaseError::MissingSketch)?;
            // A null count means the guard could not count: zero units, suppressed.
            if units.is_null(row) || units.value(row) < min_units {
                summary.rows_suppressed += 1;
                differencing::add(&mut hidden.cells, &sketch.cells);
                continue;
            }
            // The differencing defense, before the query's HAVING, so that what it withholds
            // does not depend on that filter either.
            let identical = Identical::Near {
                except_source: policy.source,
            };
            if remembered.near(&sketch, min_units, identical) {
                summary.rows_differencing += 1;
                differencing::add(&mut hidden.cells, &sketch.cells);
                continue;
            }
            // The query's own filter over aggregated rows: a row it rejects is not part of the
            // answer, and is not counted.
            let kept = having.is_none_or(|h| h.is_valid(row) && h.value(row));
            if !kept {
                differencing::add(&mut hidden.cells, &sketch.cells);
                continue;
            }
            candidates.push(Candidate {
                batch: b,
                row,
                sketch,
                released: true,
            });
        }
    }

    // OFFSET and LIMIT, after suppression: a limit cannot tell which rows were suppressed.
    let fetch = policy.fetch.unwrap_or(usize::MAX);
    for (position, candidate) in candidates.iter_mut().enumerate() {
        let inside = position >= policy.skip && position - policy.skip < fetch;
        if !inside {
            candidate.released = false;
            differencing::add(&mut hidden.cells, &candidate.sketch.cells);
        }
    }

    // Complementary suppression: what is not shown must cover no unit or at least `min_units`,
    // or a total minus the released rows gives away the few. Each released row covers
    // `min_units` units of its own (groups are disjoint), so withholding one is enough; the loop
    // only guards the unprovable case.
    while hidden_is_small(&hidden, min_units) {
        if !on_time() {
            return Err(ReleaseError::TimeLimit);
        }
        let Some(smallest) = smallest_released(&candidates) else {
            break;
        };
        candidates[smallest].released = false;
        summary.rows_differencing += 1;
        let cells = candidates[smallest].sketch.cells;
        differencing::add(&mut hidden.cells, &cells);
    }
    // The released rows' sum against what was released before: a remembered total that this
    // query's rows sum to within a few units of would give away what it does not show.
    let mut total = released_sum(&candidates);
    while let Some(sum) = &total {
        if !on_time() {
            return Err(ReleaseError::TimeLimit);
        }
        if !remembered.near(sum, min_units, Identical::Far) {
            break;
        }
        let Some(smallest) = smallest_released(&candidates) else {
            break;
        };
        candidates[smallest].released = false;
        summary.rows_differencing += 1;
        total = released_sum(&candidates);
    }

    let mut released = Vec::new();
    let mut sketches = Vec::new();
    for (b, batch) in batches.iter().enumerate() {
        let keep: BooleanArray = {
            let mut mask = vec![false; batch.num_rows()];
            for candidate in candidates.iter().filter(|c| c.batch == b && c.released) {
                mask[candidate.row] = true;
            }
            mask.into_iter().map(Some).collect()
        };
        if keep.true_count() == 0 {
            continue;
        }
        summary.rows_released += keep.true_count() as u64;
        if summary.rows_released > policy.max_rows as u64 {
            return Err(ReleaseError::TooManyRows {
                limit: policy.max_rows,
            });
        }
        released.push(filter_record_batch(batch, &keep)?.project(&visible)?);
    }
    for candidate in candidates.into_iter().filter(|c| c.released) {
        sketches.push(candidate.sketch);
    }
    if let Some(sum) = total {
        sketches.push(sum);
    }
    Released::new(out_schema, released, summary, sketches)
}

/// Whether the rows not shown cover between one and `min_units - 1` units (or cannot be proven
/// to cover none or enough: fail closed).
fn hidden_is_small(hidden: &differencing::Sketch, min_units: u64) -> bool {
    match hidden.difference(&differencing::Sketch::default(), min_units) {
        differencing::Difference::None => false,
        other => other.is_differencing(min_units),
    }
}

/// The released candidate with the fewest input rows.
fn smallest_released(candidates: &[Candidate]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.released)
        .min_by_key(|(_, c)| {
            c.sketch.cells[..differencing::PARTITION_CELLS]
                .iter()
                .map(|cell| cell.count)
                .sum::<i64>()
        })
        .map(|(i, _)| i)
}

/// The sum of the released rows' sketches, when there are two or more (one row is its own sum).
fn released_sum(candidates: &[Candidate]) -> Option<differencing::Sketch> {
    if candidates.iter().filter(|c| c.released).count() < 2 {
        return None;
    }
    let mut sum = differencing::Sketch::default();
    for candidate in candidates.iter().filter(|c| c.released) {
        differencing::add(&mut sum.cells, &candidate.sketch.cells);
    }
    Some(sum)
}

/// The columns of a plan's output that a release keeps: every one not hidden.
fn visible_columns(schema: &Schema) -> Vec<usize> {
    schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.name().starts_with(HIDDEN_PREFIX))
        .map(|(i, _)| i)
        .collect()
}

/// The schema a query's release will have, from its plan's output schema alone (before it runs):
/// the visible columns for an exact release, the noisy outputs for one under differential
/// privacy. The gate builds its output with the same functions, so the two cannot disagree;
/// clients (Flight SQL) are told this schema before the rows exist.
pub fn released_schema(plan_schema: &Schema, dp: Option<&DpSpec>) -> Result<SchemaRef> {
    match dp {
        None => Ok(Arc::new(
            plan_schema.project(&visible_columns(plan_schema))?,
        )),
        Some(spec) => Ok(Arc::new(Schema::new(
            spec.outputs
                .iter()
                .map(|output| output.field(plan_schema))
                .collect::<Result<Vec<_>>>()?,
        ))),
    }
}

/// Whether a column name is reserved for the sandbox's hidden columns.
pub fn is_hidden_name(name: &str) -> bool {
    name.starts_with(HIDDEN_PREFIX)
}

/// Builds a `UInt64` array, for tests and for guests that report unit counts.
pub fn unit_counts(values: &[u64]) -> ArrayRef {
    Arc::new(UInt64Array::from(values.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    /// A sketch of the units `range` (one row each).
    fn sketch_of(range: std::ops::Range<u64>) -> differencing::Sketch {
        let mut sketch = differencing::Sketch::default();
        for unit in range {
            let hash = unit.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            differencing::insert_one(&mut sketch.cells, hash, differencing::row_identity(hash, 0));
        }
        sketch
    }

    fn sketch_column(sketches: &[differencing::Sketch]) -> ArrayRef {
        Arc::new(BinaryArray::from_iter_values(
            sketches.iter().map(|s| differencing::encode(&s.cells)),
        ))
    }

    /// Disjoint unit sets, as many units per row as its count says.
    fn disjoint(units: &[u64]) -> ArrayRef {
        let sketches: Vec<_> = units
            .iter()
            .enumerate()
            .map(|(i, &n)| sketch_of(i as u64 * 1000..i as u64 * 1000 + n))
            .collect();
        sketch_column(&sketches)
    }

    fn sketch_field() -> Field {
        Field::new(differencing::SKETCH_COLUMN, DataType::Binary, false)
    }

    fn batch(groups: &[&str], counts: &[i64], units: &[u64]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("industry", DataType::Utf8, false),
            Field::new("n", DataType::Int64, false),
            Field::new(UNITS_COLUMN, DataType::UInt64, false),
            sketch_field(),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(groups.to_vec())),
                Arc::new(Int64Array::from(counts.to_vec())),
                unit_counts(units),
                disjoint(units),
            ],
        )
        .expect("valid batch");
        (schema, batch)
    }

    fn nothing() -> Vec<(differencing::Sketch, u64)> {
        Vec::new()
    }

    /// Rows remembered as released from another source than the tests' queries.
    fn remembered(sketches: &[differencing::Sketch]) -> Vec<(differencing::Sketch, u64)> {
        sketches.iter().map(|s| (s.clone(), 99)).collect()
    }

    fn keyed(
        keys: &[&str],
        units: &[u64],
        sketches: &[differencing::Sketch],
    ) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new(UNITS_COLUMN, DataType::UInt64, false),
            sketch_field(),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                unit_counts(units),
                sketch_column(sketches),
            ],
        )
        .unwrap();
        (schema, batch)
    }

    /// A suppressed group's key must not travel in the released bytes: a filter keeps a view
    /// array's data buffers whole and the IPC writer sends them, so without compaction the key
    /// of a suppressed row (longer than a view's 12 inline bytes) is in the stream.
    #[test]
    fn suppressed_values_are_not_in_the_released_bytes() {
        // Four groups large enough and one of two units; complementary suppression may withhold
        // one more: whatever is withheld must be absent from the bytes, whatever is released there.
        let keys = [
            "INDUSTRY-GROUP-KEY-NUMBER-0",
            "INDUSTRY-GROUP-KEY-NUMBER-1",
            "INDUSTRY-GROUP-KEY-NUMBER-2",
            "INDUSTRY-GROUP-KEY-NUMBER-3",
            "SUPPRESSED-ENTERPRISE-GROUP-KEY",
        ];
        let cities = [
            "CITY-NAME-OF-GROUP-NUMBER-0",
            "CITY-NAME-OF-GROUP-NUMBER-1",
            "CITY-NAME-OF-GROUP-NUMBER-2",
            "CITY-NAME-OF-GROUP-NUMBER-3",
            "SUPPRESSED-CITY-NAME-000004",
        ];
        let units = [50, 60, 70, 80, 2];
        let schema = Arc::new(Schema::new(vec![
            Field::new("industry", DataType::Utf8View, false),
            Field::new(
                "city",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                false,
            ),
            Field::new(UNITS_COLUMN, DataType::UInt64, false),
            sketch_field(),
        ]));
        let city_column: arrow::array::DictionaryArray<arrow::datatypes::Int32Type> =
            cities.into_iter().collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(arrow::array::StringViewArray::from(keys.to_vec())),
                Arc::new(city_column),
                unit_counts(&units),
                disjoint(&units),
            ],
        )
        .expect("valid batch");
        let policy = GatePolicy {
            min_units: 10,
            skip: 0,
            fetch: None,
            max_rows: 100,
            deadline: None,
            source: 1,
        };
        let released = release(schema, vec![batch], &policy, &nothing()).expect("released");
        let shown: Vec<String> = released
            .batches()
            .iter()
            .flat_map(|b| {
                let column = arrow::compute::cast(b.column(0), &DataType::Utf8).expect("casts");
                let column = column.as_any().downcast_ref::<StringArray>().expect("text");
                column
                    .iter()
                    .flatten()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(!shown.is_empty(), "some groups are released");
        assert!(!shown.iter().any(|k| k.starts_with("SUPPRESSED")));
        let bytes = released.to_ipc_stream().expect("encodes");
        let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
        for (key, city) in keys.iter().zip(cities) {
            let released_row = shown.iter().any(|k| k == key);
            assert_eq!(contains(key), released_row, "{key} in the bytes");
            assert_eq!(contains(city), released_row, "{city} in the bytes");
        }
    }

    /// A null slot released empty: the value a kernel left under it does not travel.
    #[test]
    fn values_under_null_slots_are_not_in_the_bytes() {
        let secret: i64 = 0x5EC2_E7AB_CDEF_1234;
        let values = arrow::buffer::ScalarBuffer::from(vec![7_i64, secret]);
        let nulls = arrow::buffer::NullBuffer::from(vec![true, false]);
        let measure = Int64Array::new(values, Some(nulls));
        let text = arrow::array::StringViewArray::from(vec![
            Some("A-RELEASED-VALUE-OF-THIRTY"),
            Some("A-VALUE-UNDER-A-NULL-SLOT-X"),
        ]);
        let text_nulls = arrow::buffer::NullBuffer::from(vec![true, false]);
        let text = arrow::array::StringViewArray::new(
            text.views().clone(),
            text.data_buffers().to_vec(),
            Some(text_nulls),
        );
        let schema = Arc::new(Schema::new(vec![
            Field::new("v", DataType::Int64, true),
            Field::new("t", DataType::Utf8View, true),
        ]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(measure), Arc::new(text)])
            .expect("valid batch");
        let compacted = compact(batch).expect("compacts");
        let mut bytes = Vec::new();
        {
            let mut writer = StreamWriter::try_new(&mut bytes, &compacted.schema()).expect("w");
            writer.write(&compacted).expect("writes");
            writer.finish().expect("finishes");
        }
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"A-RELEASED-VALUE-OF-THIRTY"));
        assert!(!contains(b"A-VALUE-UNDER-A-NULL-SLOT-X"));
        assert!(!contains(&secret.to_le_bytes()));
        assert_eq!(compacted.column(0).null_count(), 1);
    }

    #[test]
    fn rows_near_or_equal_to_released_ones_are_withheld() {
        let released_before = vec![
            sketch_of(0..100),
            sketch_of(1000..1100),
            sketch_of(1000..1103),
        ];
        let sketches = [
            sketch_of(0..99),      // one unit less than a released row: withheld
            sketch_of(0..100),     // the same rows: withheld (its presence would tell)
            sketch_of(50..150),    // 100 units away from every released row: released
            sketch_of(3050..3149), // far from every row: released
            sketch_of(1000..1100), // the same as one released row: withheld
            sketch_of(5000..5030), // far: released
        ];
        let (schema, b) = keyed(
            &["a", "b", "c", "d", "e", "f"],
            &[99, 100, 100, 99, 100, 30],
            &sketches,
        );
        let released = release(
            schema.clone(),
            vec![b.clone()],
            &policy(10),
            &remembered(&released_before),
        )
        .unwrap();
        let summary = released.summary();
        assert_eq!(
            (
                summary.rows_released,
                summary.rows_suppressed,
                summary.rows_differencing
            ),
            (3, 0, 3)
        );
        // The same rows from the same source (the same query below its aggregate, say with
        // another HAVING) are released again: they say nothing new whatever the data.
        let same_source: Vec<_> = released_before.iter().map(|s| (s.clone(), 1)).collect();
        let again = release(schema, vec![b], &policy(10), &same_source).unwrap();
        // a is one unit from a released row, e three units from another: still withheld.
        assert_eq!(again.summary().rows_released, 4);
        // The released rows, then their sum.
        assert_eq!(released.sketches().len(), 4);
        assert_eq!(
            released.sketches()[..3],
            [
                sketches[2].clone(),
                sketches[3].clone(),
                sketches[5].clone()
            ]
        );
    }

    /// A suppressed cell of 4 units beside released ones: a total minus the released rows would
    /// give it away, so one more row is withheld (the smallest).
    #[test]
    fn a_small_suppressed_cell_takes_a_complement_with_it() {
        let sketches = [
            sketch_of(0..910),
            sketch_of(1000..1022),
            sketch_of(2000..2030),
            sketch_of(3000..3004),
        ];
        let (schema, b) = keyed(
            &["active", "suspended", "revoked", "cancelled"],
            &[910, 22, 30, 4],
            &sketches,
        );
        let released = release(schema.clone(), vec![b.clone()], &policy(10), &nothing()).unwrap();
        let summary = released.summary();
        assert_eq!(
            (
                summary.rows_released,
                summary.rows_suppressed,
                summary.rows_differencing
            ),
            (2, 1, 1)
        );
        let keys = released.batches()[0]
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap()
            .iter()
            .flatten()
            .map(str::to_string)
            .collect::<Vec<_>>();
        assert_eq!(
            keys,
            ["active", "revoked"],
            "the smallest released row goes with it"
        );

        // Cells of 12 units suppressed together need no complement.
        let sketches = [
            sketch_of(0..910),
            sketch_of(1000..1006),
            sketch_of(2000..2006),
        ];
        let (schema, b) = keyed(&["a", "b", "c"], &[910, 6, 6], &sketches);
        let released = release(schema, vec![b], &policy(10), &nothing()).unwrap();
        assert_eq!(released.summary().rows_released, 1);
        assert_eq!(released.summary().rows_differencing, 0);
    }

    /// A total released first, then cells that sum to it but for a few units: one more is
    /// withheld; the other order is the near-row check of the total against the cells' sum.
    #[test]
    fn released_rows_do_not_sum_to_within_a_few_units_of_a_remembered_total() {
        let total = sketch_of(0..100);
        let cells = [sketch_of(0..40), sketch_of(40..97)];
        let (schema, b) = keyed(&["x", "y"], &[40, 57], &cells);
        let released = release(
            schema,
            vec![b],
            &policy(10),
            &remembered(std::slice::from_ref(&total)),
        )
        .unwrap();
        assert_eq!(released.summary().rows_released, 1);

        let (schema, b) = keyed(&["x", "y"], &[40, 57], &cells);
        let first = release(schema, vec![b], &policy(10), &nothing()).unwrap();
        assert_eq!(first.summary().rows_released, 2);
        let memory = remembered(first.sketches());
        let (schema, b) = keyed(&["all"], &[100], &[total]);
        let second = release(schema, vec![b], &policy(10), &memory).unwrap();
        assert_eq!(
            second.summary().rows_released,
            0,
            "the total is 3 units from the cells' sum"
        );
    }

    #[test]
    fn a_result_without_sketches_releases_nothing() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            UNITS_COLUMN,
            DataType::UInt64,
            false,
        )]));
        let b = RecordBatch::try_new(schema.clone(), vec![unit_counts(&[50])]).unwrap();
        let err = release(schema, vec![b], &policy(10), &nothing()).expect_err("must refuse");
        assert_eq!(err.code(), "release-missing-sketch");
    }

    fn policy(min_units: u64) -> GatePolicy {
        GatePolicy {
            min_units,
            skip: 0,
            fetch: None,
            max_rows: 1000,
            deadline: None,
            source: 1,
        }
    }

    #[test]
    fn suppresses_small_groups_and_strips_hidden_columns() {
        let (schema, b) = batch(&["A", "C", "F"], &[50, 3, 12], &[10, 3, 9]);
        let released = release(schema, vec![b], &policy(10), &nothing()).expect("released");
        assert_eq!(released.summary().rows_released, 1);
        assert_eq!(released.summary().rows_suppressed, 2);
        assert_eq!(released.schema().fields().len(), 2);
        assert!(released.schema().index_of(UNITS_COLUMN).is_err());
        let groups = released.batches()[0]
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8")
            .value(0)
            .to_string();
        assert_eq!(groups, "A");
    }

    #[test]
    fn having_applies_after_suppression_and_is_not_counted() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("industry", DataType::Utf8, false),
            Field::new(UNITS_COLUMN, DataType::UInt64, false),
            Field::new(HAVING_COLUMN, DataType::Boolean, true),
            sketch_field(),
        ]));
        let batch = |having: Vec<Option<bool>>| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(vec!["A", "B", "C", "D", "E"])),
                    unit_counts(&[20, 3, 30, 2, 12]),
                    Arc::new(BooleanArray::from(having)),
                    disjoint(&[20, 3, 30, 2, 12]),
                ],
            )
            .expect("valid batch")
        };
        // Whatever the predicate says about the small groups B and D, the suppressed count is
        // the same: it cannot be used to learn the predicate on groups never released. E is
        // true everywhere, so B and D together (5 units) always take a complement with them.
        for having in [
            vec![Some(true), Some(true), Some(true), Some(true), Some(true)],
            vec![
                Some(false),
                Some(true),
                Some(false),
                Some(false),
                Some(true),
            ],
            vec![Some(true), Some(false), None, Some(true), Some(true)],
        ] {
            let released =
                release(schema.clone(), vec![batch(having)], &policy(10), &nothing()).unwrap();
            assert_eq!(released.summary().rows_suppressed, 2);
            assert_eq!(
                released.schema().fields().len(),
                1,
                "hidden columns stripped"
            );
        }
    }

    #[test]
    fn refuses_results_without_unit_count() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let b = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1]))])
            .expect("valid batch");
        let err = release(schema, vec![b], &policy(2), &nothing()).expect_err("must refuse");
        assert_eq!(err.code(), "release-missing-unit-count");
    }

    #[test]
    fn limit_applies_after_suppression() {
        // With LIMIT 1 before the gate, the caller would see zero rows and learn the first group
        // is small; after the gate, the first *releasable* row is returned.
        let (schema, b) = batch(&["A", "C", "F"], &[1, 30, 40], &[1, 30, 40]);
        let mut p = policy(10);
        p.fetch = Some(1);
        let released = release(schema, vec![b], &p, &nothing()).expect("released");
        assert_eq!(released.summary().rows_released, 1);
        assert_eq!(released.summary().rows_suppressed, 1);
        let n = released.batches()[0]
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("int64")
            .value(0);
        assert_eq!(n, 30);
    }

    #[test]
    fn row_cap_refuses_everything() {
        let (schema, b) = batch(&["A", "C"], &[10, 10], &[10, 10]);
        let mut p = policy(2);
        p.max_rows = 1;
        assert_eq!(
            release(schema, vec![b], &p, &nothing())
                .expect_err("over cap")
                .code(),
            "release-too-many-rows"
        );
    }

    #[test]
    fn a_gate_past_its_deadline_releases_nothing() {
        let (schema, b) = batch(&["A", "C"], &[10, 10], &[10, 10]);
        let mut p = policy(2);
        p.deadline = Some(std::time::Instant::now() - std::time::Duration::from_secs(1));
        assert_eq!(
            release(schema, vec![b], &p, &nothing())
                .expect_err("late")
                .code(),
            "time-limit"
        );
    }
}

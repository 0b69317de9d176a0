//! The release gate: the one way a result leaves the sandbox, for SQL and WASM jobs alike.
//!
//! The execute stage hands the gate Arrow batches that still carry hidden columns added by the
//! plan guard's rewrite: [`UNITS_COLUMN`] holds, per output row, how many distinct privacy units
//! contributed to it (capped at the threshold, which is all the gate needs to know). The gate
//!
//! 1. refuses input without the hidden unit count (fail closed: a plan that lost it is not
//!    released at all);
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
//!
//! The result is a [`Released`], which only these two functions can build: the delivery stage
//! takes a `Released`, so no code path can send rows that did not pass the gate.

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
    #[error("output breaks the approved contract: {0}; nothing is released")]
    ContractViolation(String),
    #[error("differential privacy: {0}; nothing is released")]
    Dp(String),
    #[error("cannot process result batches: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
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
            ReleaseError::ContractViolation(_) => "contract-violation",
            ReleaseError::Dp(_) => "release-dp",
            ReleaseError::Arrow(_) => "release-arrow",
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
}

/// What the caller is told about the release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReleaseSummary {
    pub rows_released: u64,
    /// Rows below the threshold.
    pub rows_suppressed: u64,
    /// Rows at or above the threshold withheld by the differencing defense.
    pub rows_differencing: u64,
    pub min_units: u64,
}

/// A result that passed the gate. Only [`release`] and [`release_contract`] construct it.
#[derive(Debug, Clone)]
pub struct Released {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    summary: ReleaseSummary,
    /// The unit sketches of the released rows (exact releases), for the consumer org's memory.
    sketches: Vec<differencing::Sketch>,
}

impl Released {
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }
    pub fn batches(&self) -> &[RecordBatch] {
        &self.batches
    }
    pub fn summary(&self) -> ReleaseSummary {
        self.summary
    }
    /// The unit sketches of the released rows: what the consumer org's differencing memory
    /// must remember once the release is recorded.
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

/// Passes a result through the gate. `released_before` holds the sketches of every row released
/// to the same consumer org before (its differencing memory).
pub fn release(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    policy: &GatePolicy,
    released_before: &[differencing::Sketch],
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
    let mut released_sketches = Vec::new();
    let visible = visible_columns(&schema);
    let out_schema = Arc::new(schema.project(&visible)?);

    let mut summary = ReleaseSummary {
        min_units: policy.min_units,
        ..ReleaseSummary::default()
    };
    let mut to_skip = policy.skip;
    let mut remaining = policy.fetch.unwrap_or(usize::MAX);
    let mut released = Vec::new();
    for batch in batches {
        if batch.schema().fields() != schema.fields() {
            return Err(ReleaseError::SchemaMismatch);
        }
        let units = batch
            .column(units_index)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .ok_or_else(|| {
                ReleaseError::UnitCountType(batch.column(units_index).data_type().clone())
            })?;
        // A null count means the guard could not count: treat as zero units, i.e. suppress.
        let covered: BooleanArray = units
            .iter()
            .map(|u| Some(u.unwrap_or(0) >= policy.min_units))
            .collect();
        summary.rows_suppressed += (batch.num_rows() - covered.true_count()) as u64;
        // The differencing defense, over the rows that passed the threshold (before the query's
        // HAVING, so the count does not depend on it either).
        let sketches = batch
            .column(sketch_index)
            .as_any()
            .downcast_ref::<BinaryArray>()
            .ok_or(ReleaseError::MissingSketch)?;
        let mut row_sketches = Vec::with_capacity(batch.num_rows());
        let mut covered_rows = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            // Only rows over the threshold can be released: only theirs are read.
            let mut pass = covered.value(row);
            let sketch = if pass {
                let sketch = (!sketches.is_null(row))
                    .then(|| differencing::decode(sketches.value(row)))
                    .flatten()
                    .ok_or(ReleaseError::MissingSketch)?;
                if differencing::is_differencing(&sketch, released_before, policy.min_units) {
                    pass = false;
                    summary.rows_differencing += 1;
                }
                Some(sketch)
            } else {
                None
            };
            covered_rows.push(Some(pass));
            row_sketches.push(sketch);
        }
        let covered = BooleanArray::from(covered_rows);
        // The query's own filter over aggregated rows applies only to rows that passed: a row it
        // rejects is simply not part of the answer, and is not counted.
        let keep = match having_index {
            None => covered,
            Some(index) => {
                let having = batch
                    .column(index)
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| {
                        ReleaseError::HavingType(batch.column(index).data_type().clone())
                    })?;
                covered
                    .iter()
                    .zip(having.iter())
                    .map(|(c, h)| Some(c == Some(true) && h == Some(true)))
                    .collect()
            }
        };
        if keep.true_count() == 0 || remaining == 0 {
            continue;
        }
        let kept = filter_record_batch(&batch, &keep)?.project(&visible)?;
        let skip_here = to_skip.min(kept.num_rows());
        to_skip -= skip_here;
        let take = (kept.num_rows() - skip_here).min(remaining);
        if take == 0 {
            continue;
        }
        remaining -= take;
        let kept_rows: Vec<usize> = (0..batch.num_rows()).filter(|&r| keep.value(r)).collect();
        for &row in &kept_rows[skip_here..skip_here + take] {
            if let Some(sketch) = row_sketches[row].take() {
                released_sketches.push(sketch);
            }
        }
        summary.rows_released += take as u64;
        if summary.rows_released > policy.max_rows as u64 {
            return Err(ReleaseError::TooManyRows {
                limit: policy.max_rows,
            });
        }
        released.push(kept.slice(skip_here, take));
    }
    Ok(Released {
        schema: out_schema,
        batches: released,
        summary,
        sketches: released_sketches,
    })
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
            differencing::insert(
                &mut sketch.cells,
                unit.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                1,
            );
        }
        sketch
    }

    fn sketch_column(sketches: &[differencing::Sketch]) -> ArrayRef {
        Arc::new(BinaryArray::from_iter_values(
            sketches.iter().map(|s| differencing::encode(&s.cells)),
        ))
    }

    /// Disjoint unit sets of 100 units per row: far apart, never differencing.
    fn disjoint(rows: usize) -> ArrayRef {
        let sketches: Vec<_> = (0..rows as u64)
            .map(|i| sketch_of(i * 1000..i * 1000 + 100))
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
                disjoint(groups.len()),
            ],
        )
        .expect("valid batch");
        (schema, batch)
    }

    #[test]
    fn rows_a_few_units_away_from_released_ones_are_withheld() {
        let released_before = vec![
            sketch_of(0..100),
            sketch_of(1000..1100),
            sketch_of(1000..1103),
        ];
        let sketches = [
            sketch_of(0..99),      // one unit less than a released row: withheld
            sketch_of(0..100),     // the same units: released
            sketch_of(50..150),    // 100 units away from every released row: released
            sketch_of(51..150),    // 1 unit away from the row above, in the same query: released
            sketch_of(1000..1100), // the same as one released row, 3 from another: released
            sketch_of(0..5),       // below the threshold: suppressed, not counted as differencing
        ];
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new(UNITS_COLUMN, DataType::UInt64, false),
            sketch_field(),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c", "d", "e", "f"])),
                unit_counts(&[99, 100, 100, 99, 100, 5]),
                sketch_column(&sketches),
            ],
        )
        .unwrap();
        let released = release(schema, vec![b], &policy(10), &released_before).unwrap();
        let summary = released.summary();
        assert_eq!(
            (
                summary.rows_released,
                summary.rows_suppressed,
                summary.rows_differencing
            ),
            (4, 1, 1)
        );
        assert_eq!(released.sketches(), &sketches[1..5]);
    }

    #[test]
    fn a_result_without_sketches_releases_nothing() {
        let schema = Arc::new(Schema::new(vec![Field::new(
            UNITS_COLUMN,
            DataType::UInt64,
            false,
        )]));
        let b = RecordBatch::try_new(schema.clone(), vec![unit_counts(&[50])]).unwrap();
        let err = release(schema, vec![b], &policy(10), &[]).expect_err("must refuse");
        assert_eq!(err.code(), "release-missing-sketch");
    }

    fn policy(min_units: u64) -> GatePolicy {
        GatePolicy {
            min_units,
            skip: 0,
            fetch: None,
            max_rows: 1000,
        }
    }

    #[test]
    fn suppresses_small_groups_and_strips_hidden_columns() {
        let (schema, b) = batch(&["A", "C", "F"], &[50, 3, 12], &[10, 3, 9]);
        let released = release(schema, vec![b], &policy(10), &[]).expect("released");
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
                    Arc::new(StringArray::from(vec!["A", "B", "C", "D"])),
                    unit_counts(&[20, 3, 30, 2]),
                    Arc::new(BooleanArray::from(having)),
                    disjoint(4),
                ],
            )
            .expect("valid batch")
        };
        // Whatever the predicate says about the small groups B and D, the suppressed count is
        // the same: it cannot be used to learn the predicate on groups never released.
        for having in [
            vec![Some(true), Some(true), Some(true), Some(true)],
            vec![Some(false), Some(true), Some(false), Some(false)],
            vec![Some(true), Some(false), None, Some(true)],
        ] {
            let expected: u64 = [having[0], having[2]]
                .iter()
                .filter(|h| **h == Some(true))
                .count() as u64;
            let released = release(schema.clone(), vec![batch(having)], &policy(10), &[]).unwrap();
            assert_eq!(released.summary().rows_suppressed, 2);
            assert_eq!(released.summary().rows_released, expected);
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
        let err = release(schema, vec![b], &policy(2), &[]).expect_err("must refuse");
        assert_eq!(err.code(), "release-missing-unit-count");
    }

    #[test]
    fn limit_applies_after_suppression() {
        // With LIMIT 1 before the gate, the caller would see zero rows and learn the first group
        // is small; after the gate, the first *releasable* row is returned.
        let (schema, b) = batch(&["A", "C", "F"], &[1, 30, 40], &[1, 30, 40]);
        let mut p = policy(10);
        p.fetch = Some(1);
        let released = release(schema, vec![b], &p, &[]).expect("released");
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
            release(schema, vec![b], &p, &[])
                .expect_err("over cap")
                .code(),
            "release-too-many-rows"
        );
    }
}

//! The gate for code jobs: a guest's output against its approval's output contract and the
//! consents in force.
//!
//! The output must have exactly the contract's schema (the key as `Utf8`, then each field: `int` as
//! `Int64`, `float` as `Float64`, `enum` as `Utf8`), no nulls, at most one row per key and at most
//! `max_rows` rows, and every value within its bounds; otherwise nothing is released. Floats are
//! rounded to the declared decimals, so their low-order bits cannot carry data. Rows whose key is
//! not a consented entity are dropped and counted.

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::compute::filter_record_batch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use sandbox_policy::{Contract, FieldKind};

use crate::{ReleaseError, ReleaseSummary, Released, Result};

/// What the gate enforces on a code job's output.
#[derive(Debug, Clone, Copy)]
pub struct ContractGate<'a> {
    pub contract: &'a Contract,
    /// Privacy units consented to the consumer for the contract's purpose, valid now.
    pub consented: &'a HashSet<String>,
}

/// The exact output schema a contract requires.
pub fn contract_schema(contract: &Contract) -> SchemaRef {
    let mut fields = vec![Field::new(&contract.key, DataType::Utf8, false)];
    for field in &contract.fields {
        let data_type = match field.kind {
            FieldKind::Int { .. } => DataType::Int64,
            FieldKind::Float { .. } => DataType::Float64,
            FieldKind::Enum { .. } => DataType::Utf8,
        };
        fields.push(Field::new(&field.name, data_type, false));
    }
    Arc::new(Schema::new(fields))
}

fn violation(message: impl Into<String>) -> ReleaseError {
    ReleaseError::ContractViolation(message.into())
}

/// Passes a guest's output through the contract and consent checks. `schema` is `None` when the
/// guest emitted nothing.
pub fn release_contract(
    schema: Option<SchemaRef>,
    batches: Vec<RecordBatch>,
    gate: &ContractGate<'_>,
) -> Result<Released> {
    let contract = gate.contract;
    let expected = contract_schema(contract);
    if let Some(schema) = &schema {
        let same = schema.fields().len() == expected.fields().len()
            && schema
                .fields()
                .iter()
                .zip(expected.fields())
                .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
        if !same {
            // Only the contract's schema is named: the guest chose the names it emitted.
            let wanted: Vec<String> = expected
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect();
            return Err(violation(format!(
                "output schema is not the contract's ({})",
                wanted.join(", ")
            )));
        }
    }
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    if total as u64 > contract.max_rows {
        return Err(violation(format!(
            "more output rows than the contract allows ({})",
            contract.max_rows
        )));
    }
    let mut seen: HashSet<String> = HashSet::with_capacity(total);
    let mut summary = ReleaseSummary::default();
    let mut released = Vec::with_capacity(batches.len());
    for batch in batches {
        let types_match = batch.num_columns() == expected.fields().len()
            && batch
                .schema()
                .fields()
                .iter()
                .zip(expected.fields())
                .all(|(a, b)| a.data_type() == b.data_type());
        if !types_match {
            return Err(ReleaseError::SchemaMismatch);
        }
        if let Some(column) = batch.columns().iter().position(|c| c.null_count() > 0) {
            return Err(violation(format!(
                "column `{}` has nulls",
                expected.field(column).name()
            )));
        }
        let keys = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or(ReleaseError::SchemaMismatch)?;
        let mut columns = vec![batch.column(0).clone()];
        for (index, field) in contract.fields.iter().enumerate() {
            let column = batch.column(index + 1);
            columns.push(checked_column(column, &field.name, &field.kind)?);
        }
        let mut keep = Vec::with_capacity(batch.num_rows());
        for key in keys.iter().flatten() {
            if !seen.insert(key.to_string()) {
                return Err(violation(format!(
                    "more than one row for the same `{}`: one row per entity",
                    contract.key
                )));
            }
            keep.push(gate.consented.contains(key));
        }
        let keep = BooleanArray::from(keep);
        let kept = keep.true_count();
        summary.rows_suppressed += (batch.num_rows() - kept) as u64;
        summary.rows_released += kept as u64;
        if kept > 0 {
            let checked = RecordBatch::try_new(expected.clone(), columns)?;
            released.push(filter_record_batch(&checked, &keep)?);
        }
    }
    Released::new(expected, released, summary, Vec::new())
}

/// A field's column, checked against its bounds (floats rounded to their decimals).
fn checked_column(
    column: &arrow::array::ArrayRef,
    name: &str,
    kind: &FieldKind,
) -> Result<arrow::array::ArrayRef> {
    match kind {
        FieldKind::Int { min, max } => {
            let values = column
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or(ReleaseError::SchemaMismatch)?;
            if values.values().iter().any(|v| v < min || v > max) {
                return Err(violation(format!(
                    "field `{name}` has a value outside {min}..={max}"
                )));
            }
            Ok(column.clone())
        }
        FieldKind::Float { min, max, decimals } => {
            let values = column
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or(ReleaseError::SchemaMismatch)?;
            let scale = 10f64.powi(*decimals as i32);
            let mut rounded = Vec::with_capacity(values.len());
            for v in values.values().iter() {
                if !v.is_finite() || v < min || v > max {
                    return Err(violation(format!(
                        "field `{name}` has a value outside {min}..={max}"
                    )));
                }
                // Rounding may step past a bound that is not a multiple of the precision.
                rounded.push(((v * scale).round() / scale).clamp(*min, *max));
            }
            Ok(Arc::new(Float64Array::from(rounded)))
        }
        FieldKind::Enum { values: allowed } => {
            let values = column
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or(ReleaseError::SchemaMismatch)?;
            if values
                .iter()
                .flatten()
                .any(|v| !allowed.iter().any(|a| a == v))
            {
                return Err(violation(format!(
                    "field `{name}` has a value outside its list"
                )));
            }
            Ok(column.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::ArrayRef;
    use sandbox_policy::ContractField;

    fn contract() -> Contract {
        let mut c = Contract::default_scoring("credit_code", "credit_assessment");
        c.fields.push(ContractField {
            name: "pd".into(),
            kind: FieldKind::Float {
                min: 0.0,
                max: 1.0,
                decimals: 2,
            },
        });
        c.max_rows = 10;
        c
    }

    fn output(keys: &[&str], scores: &[i64], grades: &[&str], pds: &[f64]) -> RecordBatch {
        RecordBatch::try_new(
            contract_schema(&contract()),
            vec![
                Arc::new(StringArray::from(keys.to_vec())) as ArrayRef,
                Arc::new(Int64Array::from(scores.to_vec())),
                Arc::new(StringArray::from(grades.to_vec())),
                Arc::new(Float64Array::from(pds.to_vec())),
            ],
        )
        .unwrap()
    }

    fn consented() -> HashSet<String> {
        ["a", "b"].iter().map(|s| s.to_string()).collect()
    }

    fn run(batches: Vec<RecordBatch>) -> Result<Released> {
        let c = contract();
        let consented = consented();
        let schema = batches.first().map(|b| b.schema());
        release_contract(
            schema,
            batches,
            &ContractGate {
                contract: &c,
                consented: &consented,
            },
        )
    }

    #[test]
    fn keeps_consented_rows_and_rounds_floats() {
        let released = run(vec![output(
            &["a", "x", "b"],
            &[10, 20, 30],
            &["A", "B", "C"],
            &[0.123456, 0.5, 0.999],
        )])
        .unwrap();
        assert_eq!(released.summary().rows_released, 2);
        assert_eq!(released.summary().rows_suppressed, 1);
        let pd = released.batches()[0]
            .column(3)
            .as_any()
            .downcast_ref::<Float64Array>()
            .unwrap()
            .value(0);
        assert_eq!(pd, 0.12);
    }

    #[test]
    fn violations_release_nothing() {
        let cases: Vec<(&str, Vec<RecordBatch>)> = vec![
            (
                "score out of range",
                vec![output(&["a"], &[1001], &["A"], &[0.1])],
            ),
            (
                "negative score",
                vec![output(&["a"], &[-1], &["A"], &[0.1])],
            ),
            (
                "grade not listed",
                vec![output(&["a"], &[1], &["Z"], &[0.1])],
            ),
            ("NaN", vec![output(&["a"], &[1], &["A"], &[f64::NAN])]),
            (
                "duplicate key",
                vec![
                    output(&["a"], &[1], &["A"], &[0.1]),
                    output(&["a"], &[2], &["A"], &[0.1]),
                ],
            ),
            (
                "too many rows",
                vec![output(
                    &["a"; 11].map(|_| "k"),
                    &[1; 11],
                    &["A"; 11],
                    &[0.1; 11],
                )],
            ),
        ];
        for (name, batches) in cases {
            let error = run(batches).expect_err(name);
            assert_eq!(error.code(), "contract-violation", "{name}: {error}");
            // Messages never echo values.
            assert!(!error.to_string().contains("1001"), "{name}: {error}");
        }
    }

    #[test]
    fn wrong_schema_is_refused() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("credit_code", DataType::Utf8, false),
            Field::new("revenue", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a"])) as ArrayRef,
                Arc::new(Float64Array::from(vec![1234.5])),
            ],
        )
        .unwrap();
        let c = contract();
        let consented = consented();
        let error = release_contract(
            Some(schema),
            vec![batch],
            &ContractGate {
                contract: &c,
                consented: &consented,
            },
        )
        .unwrap_err();
        assert_eq!(error.code(), "contract-violation");
    }

    #[test]
    fn empty_output_releases_the_contract_schema() {
        let released = run(Vec::new()).unwrap();
        assert_eq!(released.summary().rows_released, 0);
        assert_eq!(released.schema().fields().len(), 4);
    }
}

//! The hidden per-group sketch of units for the differencing defense
//! (`sandbox_release::differencing`): every input row adds its unit to its group's invertible
//! Bloom lookup table, so the gate can tell whether two released rows differ in only a few units.
//!
//! Two aggregates, never registered in a session (only the guard's rewrite adds them):
//! `sandbox_unit_sketch(unit, ..., key, ...)` over rows (one argument per unit class of a join,
//! then the columns of every dataset's row key: a row's identity, so that a unit's rows swapped
//! for others of it still differ) and `sandbox_sketch_sum(sketch)` over the sketches of an inner
//! aggregate's released rows (a nested aggregate's rows cover the union of the inner rows'
//! units, and sketches add).

use std::hash::BuildHasher;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, BooleanArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::hash_utils::create_hashes;
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use sandbox_release::differencing::{
    CELLS, Cell, add, decode, encode, insert, insert_one, row_identity,
};

use crate::units::UNIT_HASH;

/// `sandbox_unit_sketch` (over units) or `sandbox_sketch_sum` (over sketches).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnitSketch {
    signature: Signature,
    /// Sums sketches instead of sketching units.
    merge: bool,
    /// How many leading arguments are units (one per unit class); the rest are row key columns.
    units: usize,
}

impl UnitSketch {
    /// Sketches the rows of its arguments: `units` unit columns (one per unit class), then the
    /// row key columns that identify each input row.
    pub fn units(units: usize) -> Self {
        UnitSketch {
            signature: Signature::variadic_any(Volatility::Immutable),
            merge: false,
            units,
        }
    }

    /// Adds up sketches.
    pub fn sum() -> Self {
        UnitSketch {
            signature: Signature::exact(vec![DataType::Binary], Volatility::Immutable),
            merge: true,
            units: 0,
        }
    }
}

impl AggregateUDFImpl for UnitSketch {
    fn name(&self) -> &str {
        if self.merge {
            "sandbox_sketch_sum"
        } else {
            "sandbox_unit_sketch"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "sketch"),
            DataType::Binary,
            true,
        ))])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(SketchAccumulator {
            merge: self.merge,
            units: self.units,
            cells: vec![Cell::default(); CELLS],
        }))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(SketchGroups {
            merge: self.merge,
            units: self.units,
            cells: Vec::new(),
            hashes: Vec::new(),
            row_hashes: Vec::new(),
        }))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(encode(&[Cell::default(); CELLS]))))
    }
}

/// Adds every row to the cells of its group, once per unit argument (the first `units` of
/// `values`; a null unit adds nothing), with the row's identity: its unit and the remaining
/// arguments, the row key columns, hashed together.
fn add_units(
    cells: &mut [Cell],
    values: &[ArrayRef],
    units: usize,
    group_of: impl Fn(usize) -> usize,
    keep: impl Fn(usize) -> bool,
    hashes: &mut Vec<u64>,
    row_hashes: &mut Vec<u64>,
) -> Result<()> {
    let (unit_arrays, key_arrays) = values.split_at(units.min(values.len()));
    row_identities(
        key_arrays,
        values.first().map_or(0, |a| a.len()),
        row_hashes,
    )?;
    for array in unit_arrays {
        unit_hashes(array, hashes)?;
        // Rows of one unit in one group often come in runs (a dataset stored by unit, then
        // month): a run is added once, with its length and the sum of its rows' identities.
        let nulls = array.logical_nulls();
        let mut run: Option<(usize, u64, i64, u64)> = None;
        for (row, &hash) in hashes.iter().enumerate() {
            if !(nulls.as_ref().is_none_or(|n| n.is_valid(row)) && keep(row)) {
                continue;
            }
            let group = group_of(row);
            let identity = row_identity(hash, row_hashes[row]);
            match &mut run {
                Some((g, h, times, rows)) if *g == group && *h == hash => {
                    *times += 1;
                    *rows = rows.wrapping_add(identity);
                }
                _ => {
                    if let Some((g, h, times, rows)) = run.replace((group, hash, 1, identity)) {
                        add_run(cells, g, h, times, rows);
                    }
                }
            }
        }
        if let Some((g, h, times, rows)) = run {
            add_run(cells, g, h, times, rows);
        }
    }
    Ok(())
}

/// Each row's identity from its key columns, as a set of values: the hash of each value, sorted
/// and without repeats, folded. So the identity of a row does not depend on how a query reached
/// it: the tax row (`credit_code`, `month`) joined one to one to the social insurance row of the
/// same keys, or to the register's row of its `credit_code`, is the tax row alone; a join added
/// only to change every row's identity (and make a release look unlike an earlier one) changes
/// nothing.
fn row_identities(key_arrays: &[ArrayRef], rows: usize, out: &mut Vec<u64>) -> Result<()> {
    out.clear();
    out.resize(rows, 0);
    if key_arrays.is_empty() {
        return Ok(());
    }
    let mut columns = vec![vec![0u64; rows]; key_arrays.len()];
    for (array, hashes) in key_arrays.iter().zip(&mut columns) {
        create_hashes(std::slice::from_ref(array), &ROW_HASH, hashes)?;
    }
    let nulls: Vec<_> = key_arrays.iter().map(|a| a.logical_nulls()).collect();
    let mut values = Vec::with_capacity(key_arrays.len());
    for (row, identity) in out.iter_mut().enumerate() {
        values.clear();
        // A null key (the side of an outer join that matched nothing) adds nothing.
        values.extend(
            columns
                .iter()
                .zip(&nulls)
                .filter(|(_, n)| n.as_ref().is_none_or(|n| n.is_valid(row)))
                .map(|(c, _)| c[row]),
        );
        values.sort_unstable();
        values.dedup();
        *identity = values.iter().fold(0x6a09_e667_f3bc_c908u64, |acc, h| {
            (acc ^ h)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29)
        });
    }
    Ok(())
}

/// The hash of a row's key columns: a seed of its own, so that it is unrelated to unit hashes.
const ROW_HASH: datafusion::common::hash_utils::QualityRandomState =
    datafusion::common::hash_utils::QualityRandomState::with_seed(0x5eed_0002_6a09);

/// The unit hash of every row, as `create_hashes` computes it (for the capped count and the
/// sketch alike). For a string view array a row
/// whose view equals the previous row's (the same bytes: dictionary-encoded Parquet decodes
/// repeated values to identical views) reuses its hash: datasets stored by unit repeat each unit
/// over many consecutive rows, and hashing is most of the sketch's cost.
pub(crate) fn unit_hashes(array: &ArrayRef, hashes: &mut Vec<u64>) -> Result<()> {
    hashes.clear();
    hashes.resize(array.len(), 0);
    let Some(strings) = array.as_string_view_opt() else {
        create_hashes([array], &UNIT_HASH, hashes)?;
        return Ok(());
    };
    let mut previous: Option<(u128, u64)> = None;
    for (row, (hash, &view)) in hashes.iter_mut().zip(strings.views().iter()).enumerate() {
        if strings.is_null(row) {
            continue;
        }
        *hash = match previous {
            Some((v, h)) if v == view => h,
            _ => {
                // Inline values (up to 12 bytes) hash their view, longer ones their bytes.
                let h = if (view as u32) <= 12 {
                    UNIT_HASH.hash_one(view)
                } else {
                    UNIT_HASH.hash_one(strings.value(row).as_bytes())
                };
                previous = Some((view, h));
                h
            }
        };
    }
    Ok(())
}

fn add_run(cells: &mut [Cell], group: usize, hash: u64, times: i64, rows: u64) {
    let cells = &mut cells[group * CELLS..(group + 1) * CELLS];
    if times == 1 {
        insert_one(cells, hash, rows);
    } else {
        insert(cells, hash, times, rows);
    }
}

/// Adds every row's sketch (a binary of the gate's format) to the cells of its group.
fn add_sketches(
    cells: &mut [Cell],
    array: &ArrayRef,
    group_of: impl Fn(usize) -> usize,
    keep: impl Fn(usize) -> bool,
) -> Result<()> {
    let Some(binary) = array.as_binary_opt::<i32>() else {
        return internal_err!("a unit sketch must be Binary");
    };
    for row in 0..binary.len() {
        if binary.is_null(row) || !keep(row) {
            continue;
        }
        let Some(sketch) = decode(binary.value(row)) else {
            return internal_err!("a unit sketch has the wrong size");
        };
        let group = group_of(row);
        add(
            &mut cells[group * CELLS..(group + 1) * CELLS],
            &sketch.cells,
        );
    }
    Ok(())
}

fn binaries(cells: &[Cell]) -> ArrayRef {
    let encoded: Vec<Vec<u8>> = cells.chunks_exact(CELLS).map(encode).collect();
    Arc::new(BinaryArray::from_iter_values(encoded))
}

fn selected(filter: Option<&BooleanArray>) -> impl Fn(usize) -> bool + '_ {
    move |row| filter.is_none_or(|f| f.is_valid(row) && f.value(row))
}

/// Per-group sketches for the hash aggregate, all groups in one vector of cells.
struct SketchGroups {
    merge: bool,
    units: usize,
    cells: Vec<Cell>,
    hashes: Vec<u64>,
    row_hashes: Vec<u64>,
}

impl SketchGroups {
    fn grow(&mut self, groups: usize) {
        if self.cells.len() < groups * CELLS {
            self.cells.resize(groups * CELLS, Cell::default());
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> Vec<Cell> {
        match emit_to {
            EmitTo::All => std::mem::take(&mut self.cells),
            EmitTo::First(n) => self.cells.drain(..n * CELLS).collect(),
        }
    }
}

impl GroupsAccumulator for SketchGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let group_of = |row: usize| group_indices[row];
        if self.merge {
            add_sketches(&mut self.cells, &values[0], group_of, selected(opt_filter))
        } else {
            add_units(
                &mut self.cells,
                values,
                self.units,
                group_of,
                selected(opt_filter),
                &mut self.hashes,
                &mut self.row_hashes,
            )
        }
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        Ok(binaries(&self.take(emit_to)))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![binaries(&self.take(emit_to))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        add_sketches(
            &mut self.cells,
            &values[0],
            |row| group_indices[row],
            |_| true,
        )
    }

    /// Each input row as a group of its own (partial aggregation skipped): its own sketch.
    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let rows = values[0].len();
        let mut cells = vec![Cell::default(); rows * CELLS];
        if self.merge {
            add_sketches(&mut cells, &values[0], |row| row, selected(opt_filter))?;
        } else {
            add_units(
                &mut cells,
                values,
                self.units,
                |row| row,
                selected(opt_filter),
                &mut Vec::new(),
                &mut Vec::new(),
            )?;
        }
        Ok(vec![binaries(&cells)])
    }

    fn size(&self) -> usize {
        self.cells.capacity() * std::mem::size_of::<Cell>()
            + (self.hashes.capacity() + self.row_hashes.capacity()) * 8
    }
}

/// Single-group accumulator, used where the engine does not use the groups accumulator.
#[derive(Debug)]
struct SketchAccumulator {
    merge: bool,
    units: usize,
    cells: Vec<Cell>,
}

impl Accumulator for SketchAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if self.merge {
            add_sketches(&mut self.cells, &values[0], |_| 0, |_| true)
        } else {
            add_units(
                &mut self.cells,
                values,
                self.units,
                |_| 0,
                |_| true,
                &mut Vec::new(),
                &mut Vec::new(),
            )
        }
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(encode(&self.cells))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.cells.capacity() * std::mem::size_of::<Cell>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        add_sketches(&mut self.cells, &states[0], |_| 0, |_| true)
    }
}

/// The unit hash of a fixed text: stored with a consumer org's remembered sketches, so that a
/// build whose unit hash differs (whose sketches could not be compared with the stored ones)
/// refuses them rather than silently forgetting them.
pub fn hash_probe() -> u64 {
    let probe: ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec![
        "sandbox differencing probe",
    ]));
    let mut hashes = vec![0u64; 1];
    if create_hashes([&probe], &UNIT_HASH, &mut hashes).is_err() {
        return 0;
    }
    hashes[0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringViewArray;

    /// A row's identity is the set of its key values: the same whatever order the keys come
    /// in and however often a one-to-one join repeats them; another value makes another row.
    #[test]
    fn row_identities_are_sets_of_key_values() {
        let text = |values: &[&str]| -> ArrayRef {
            Arc::new(datafusion::arrow::array::StringArray::from(values.to_vec()))
        };
        let code = text(&["91450102000000019X", "91450102000000019X"]);
        let month = text(&["2024-05", "2024-06"]);
        let identities = |arrays: &[ArrayRef]| {
            let mut out = Vec::new();
            row_identities(arrays, 2, &mut out).unwrap();
            out
        };
        let alone = identities(&[code.clone(), month.clone()]);
        assert_ne!(alone[0], alone[1], "two months are two rows");
        // Joined one to one on both keys (tax to social insurance), in either order, with the
        // register's key once more: the same identities.
        assert_eq!(
            identities(&[
                month.clone(),
                code.clone(),
                code.clone(),
                month.clone(),
                code.clone()
            ]),
            alone
        );
        // A left join's side that matched nothing adds nothing.
        let nothing: ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec![
            None::<&str>,
            None,
        ]));
        assert_eq!(
            identities(&[code.clone(), month.clone(), nothing.clone(), nothing]),
            alone
        );
        // Another month, another row.
        let other = identities(&[code.clone(), text(&["2024-05", "2024-07"])]);
        assert_eq!(other[0], alone[0]);
        assert_ne!(other[1], alone[1]);
    }

    #[test]
    fn view_hashes_are_those_of_create_hashes() {
        let long = "91450100MA5KXXXXX1";
        let array: ArrayRef = Arc::new(StringViewArray::from(vec![
            Some(long),
            Some(long),
            Some("short"),
            Some("short"),
            None,
            Some("91450100MA5KYYYYY2"),
            Some(long),
        ]));
        let mut expected = vec![0; array.len()];
        create_hashes([&array], &UNIT_HASH, &mut expected).unwrap();
        let mut actual = Vec::new();
        unit_hashes(&array, &mut actual).unwrap();
        for row in 0..array.len() {
            if array.is_valid(row) {
                assert_eq!(actual[row], expected[row], "row {row}");
            }
        }
    }
}

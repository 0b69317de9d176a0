//! The hidden per-group count of distinct privacy units, capped at the release threshold.
//!
//! The release gate only needs to know whether an output row covers at least `min_units` distinct
//! units, so each group tracks at most `cap` distinct unit hashes and then stops: once a group is
//! saturated its rows cost one length check. An exact `COUNT(DISTINCT)` per group would keep every
//! unit of every group and cost far more.
//!
//! Units are tracked by a 64-bit hash. A collision can only merge two units into one, which makes
//! the count smaller, never larger: a collision can suppress a row, never release one wrongly.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, ListArray, UInt32Array, UInt64Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::hash_utils::QualityRandomState;
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

use crate::sketch::unit_hashes;

/// Hash state for units. Fixed, so that partial states from different partitions merge.
pub(crate) const UNIT_HASH: QualityRandomState = QualityRandomState::with_seed(0x5a4e_4442_4f58);

/// The aggregate `sandbox_capped_units(unit)`. It is never registered in a session, so queries
/// cannot call it; only the guard's rewrite adds it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CappedUnits {
    signature: Signature,
    cap: usize,
}

impl CappedUnits {
    pub fn new(cap: u64) -> Self {
        CappedUnits {
            signature: Signature::any(1, Volatility::Immutable),
            // A cap of 0 would report every group as empty and suppress everything: safe, but
            // useless; the policy loader already requires min_units >= 2.
            cap: usize::try_from(cap).unwrap_or(usize::MAX).max(1),
        }
    }
}

impl AggregateUDFImpl for CappedUnits {
    fn name(&self) -> &str {
        "sandbox_capped_units"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new_list(
            format_state_name(args.name, "units"),
            Field::new_list_field(DataType::UInt64, true),
            true,
        ))])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(CappedUnitsAccumulator {
            cap: self.cap,
            units: Vec::new(),
        }))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(CappedUnitsGroups {
            cap: self.cap,
            units: Vec::new(),
            unsaturated: 0,
            hashes: Vec::new(),
        }))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::UInt64(Some(0)))
    }
}

fn insert_capped(set: &mut Vec<u64>, cap: usize, hash: u64) {
    if set.len() < cap && !set.contains(&hash) {
        set.push(hash);
    }
}

fn list_of(sets: Vec<Vec<u64>>) -> ArrayRef {
    let offsets = OffsetBuffer::from_lengths(sets.iter().map(Vec::len));
    let values: UInt64Array = sets.into_iter().flatten().collect();
    Arc::new(ListArray::new(
        Arc::new(Field::new_list_field(DataType::UInt64, true)),
        offsets,
        Arc::new(values),
        None,
    ))
}

fn as_unit_lists(array: &ArrayRef) -> Result<&ListArray> {
    match array.as_list_opt::<i32>() {
        Some(list) if list.value_type() == DataType::UInt64 => Ok(list),
        _ => internal_err!("capped unit state must be List<UInt64>"),
    }
}

/// Per-group state for the hash aggregate.
struct CappedUnitsGroups {
    cap: usize,
    /// Distinct unit hashes seen per group, at most `cap` each.
    units: Vec<Vec<u64>>,
    /// How many groups hold fewer than `cap` units. When it is zero and a batch brings no new
    /// group, the batch can be skipped without looking at a single row.
    unsaturated: usize,
    /// Scratch buffer for the hashes of one batch.
    hashes: Vec<u64>,
}

impl CappedUnitsGroups {
    /// Grows the state to `total_num_groups`; new groups start empty, hence unsaturated.
    fn grow(&mut self, total_num_groups: usize) {
        if total_num_groups > self.units.len() {
            self.unsaturated += total_num_groups - self.units.len();
            self.units.resize_with(total_num_groups, Vec::new);
        }
    }

    /// Adds one unit hash to a group, keeping the unsaturated count right.
    fn insert(&mut self, group: usize, hash: u64) {
        let set = &mut self.units[group];
        if set.len() < self.cap && !set.contains(&hash) {
            set.push(hash);
            if set.len() == self.cap {
                self.unsaturated -= 1;
            }
        }
    }

    /// Removes the emitted groups from the front, keeping the unsaturated count right.
    fn take(&mut self, emit_to: EmitTo) -> Vec<Vec<u64>> {
        let taken = emit_to.take_needed(&mut self.units);
        let cap = self.cap;
        self.unsaturated -= taken.iter().filter(|s| s.len() < cap).count();
        taken
    }
}

impl GroupsAccumulator for CappedUnitsGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        // Once every group is saturated a batch costs nothing: no row is looked at, no hash is
        // computed. This is what keeps the hidden count cheap on large scans.
        if self.unsaturated == 0 {
            return Ok(());
        }
        // Rows whose group still needs units. Small groups that never fill up are common, and
        // their rows are spread over every batch, so only these rows are hashed.
        let cap = self.cap;
        let array = &values[0];
        let rows: Vec<u32> = group_indices
            .iter()
            .enumerate()
            .filter(|&(row, &group)| {
                self.units[group].len() < cap
                    && array.is_valid(row)
                    && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
            })
            .map(|(row, _)| row as u32)
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let mut hashes = std::mem::take(&mut self.hashes);
        if rows.len() * 4 < array.len() {
            let rows = UInt32Array::from(rows);
            let subset = take(array.as_ref(), &rows, None)?;
            unit_hashes(&subset, &mut hashes)?;
            for (position, &row) in rows.values().iter().enumerate() {
                self.insert(group_indices[row as usize], hashes[position]);
            }
        } else {
            unit_hashes(array, &mut hashes)?;
            for &row in &rows {
                self.insert(group_indices[row as usize], hashes[row as usize]);
            }
        }
        self.hashes = hashes;
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let sets = self.take(emit_to);
        let counts: UInt64Array = sets.iter().map(|s| s.len() as u64).collect();
        Ok(Arc::new(counts))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![list_of(self.take(emit_to))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let lists = as_unit_lists(&values[0])?;
        for (row, &group) in group_indices.iter().enumerate() {
            if lists.is_null(row) || self.units[group].len() >= self.cap {
                continue;
            }
            let partial = lists.value(row);
            let partial = partial.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            for hash in partial.iter().flatten() {
                self.insert(group, hash);
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let array = &values[0];
        let mut hashes = Vec::new();
        unit_hashes(array, &mut hashes)?;
        let sets = (0..array.len())
            .map(|row| {
                let filtered = opt_filter.is_some_and(|f| !f.is_valid(row) || !f.value(row));
                if array.is_null(row) || filtered {
                    Vec::new()
                } else {
                    vec![hashes[row]]
                }
            })
            .collect();
        Ok(vec![list_of(sets)])
    }

    fn size(&self) -> usize {
        self.units.capacity() * std::mem::size_of::<Vec<u64>>()
            + self.units.iter().map(|s| s.capacity() * 8).sum::<usize>()
            + self.hashes.capacity() * 8
    }
}

/// Single-group accumulator, used where the engine does not use the groups accumulator.
#[derive(Debug)]
struct CappedUnitsAccumulator {
    cap: usize,
    units: Vec<u64>,
}

impl Accumulator for CappedUnitsAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if self.units.len() >= self.cap {
            return Ok(());
        }
        let array = &values[0];
        let mut hashes = Vec::new();
        unit_hashes(array, &mut hashes)?;
        for (row, hash) in hashes.into_iter().enumerate() {
            if !array.is_null(row) {
                insert_capped(&mut self.units, self.cap, hash);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::UInt64(Some(self.units.len() as u64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.units.capacity() * 8
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = list_of(vec![self.units.clone()]);
        Ok(vec![ScalarValue::try_from_array(&list, 0)?])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = as_unit_lists(&states[0])?;
        for row in 0..lists.len() {
            if lists.is_null(row) {
                continue;
            }
            let partial = lists.value(row);
            let partial = partial.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            for hash in partial.iter().flatten() {
                insert_capped(&mut self.units, self.cap, hash);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    fn groups(cap: usize) -> CappedUnitsGroups {
        CappedUnitsGroups {
            cap,
            units: Vec::new(),
            unsaturated: 0,
            hashes: Vec::new(),
        }
    }

    fn units(values: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(values.to_vec()))
    }

    fn counts(accumulator: &mut CappedUnitsGroups, emit: EmitTo) -> Vec<u64> {
        let array = accumulator.evaluate(emit).expect("evaluates");
        array
            .as_primitive::<datafusion::arrow::datatypes::UInt64Type>()
            .values()
            .to_vec()
    }

    #[test]
    fn counts_distinct_units_per_group_up_to_the_cap() {
        let mut acc = groups(3);
        // Group 0: a, a, b (2 units); group 1: a, b, c, d (capped at 3); nulls are not units.
        let values = units(&[
            Some("a"),
            Some("a"),
            Some("b"),
            Some("a"),
            Some("b"),
            Some("c"),
            Some("d"),
            None,
        ]);
        acc.update_batch(&[values], &[0, 0, 0, 1, 1, 1, 1, 0], None, 2)
            .expect("update");
        assert_eq!(acc.unsaturated, 1);
        assert_eq!(counts(&mut acc, EmitTo::All), vec![2, 3]);
        assert_eq!(acc.unsaturated, 0);
    }

    #[test]
    fn filtered_rows_do_not_count() {
        let mut acc = groups(5);
        let filter = BooleanArray::from(vec![Some(true), Some(false), None]);
        acc.update_batch(
            &[units(&[Some("a"), Some("b"), Some("c")])],
            &[0, 0, 0],
            Some(&filter),
            1,
        )
        .expect("update");
        assert_eq!(counts(&mut acc, EmitTo::All), vec![1]);
    }

    #[test]
    fn saturated_batches_are_skipped_and_new_groups_reopen_work() {
        let mut acc = groups(2);
        acc.update_batch(&[units(&[Some("a"), Some("b")])], &[0, 0], None, 1)
            .expect("update");
        assert_eq!(acc.unsaturated, 0);
        // A new group appears: work resumes for it only.
        acc.update_batch(
            &[units(&[Some("c"), Some("d"), Some("e")])],
            &[0, 1, 1],
            None,
            2,
        )
        .expect("update");
        assert_eq!(counts(&mut acc, EmitTo::All), vec![2, 2]);
    }

    #[test]
    fn partial_emission_keeps_the_bookkeeping_right() {
        let mut acc = groups(2);
        acc.update_batch(
            &[units(&[Some("a"), Some("a"), Some("b"), Some("c")])],
            &[0, 1, 1, 2],
            None,
            3,
        )
        .expect("update");
        assert_eq!(acc.unsaturated, 2);
        assert_eq!(counts(&mut acc, EmitTo::First(2)), vec![1, 2]);
        assert_eq!(acc.unsaturated, 1, "group 2 (now 0) is still open");
        acc.update_batch(&[units(&[Some("d")])], &[0], None, 1)
            .expect("update");
        assert_eq!(acc.unsaturated, 0);
        assert_eq!(counts(&mut acc, EmitTo::All), vec![2]);
    }

    #[test]
    fn partial_states_merge_without_double_counting() {
        let mut left = groups(4);
        left.update_batch(&[units(&[Some("a"), Some("b")])], &[0, 0], None, 1)
            .expect("update");
        let mut right = groups(4);
        right
            .update_batch(&[units(&[Some("b"), Some("c")])], &[0, 0], None, 1)
            .expect("update");
        let mut merged = groups(4);
        for mut partial in [left, right] {
            let state = partial.state(EmitTo::All).expect("state");
            merged.merge_batch(&state, &[0], 1).expect("merge");
        }
        assert_eq!(counts(&mut merged, EmitTo::All), vec![3]);

        // Rows converted straight to state (skipped partial aggregation) merge the same way.
        let direct = groups(4)
            .convert_to_state(&[units(&[Some("a"), None, Some("d")])], None)
            .expect("convert");
        let mut merged = groups(4);
        merged.merge_batch(&direct, &[0, 0, 0], 1).expect("merge");
        assert_eq!(counts(&mut merged, EmitTo::All), vec![2]);
    }

    #[test]
    fn sparse_rows_of_open_groups_are_hashed_alone() {
        // Many rows of a saturated group and a few of an open one: the subset path.
        let mut acc = groups(2);
        let mut values = vec![Some("x"); 40];
        let mut group_indices = vec![0usize; 40];
        acc.update_batch(&[units(&[Some("p"), Some("q")])], &[0, 0], None, 1)
            .expect("saturate group 0");
        values[7] = Some("m");
        values[31] = Some("n");
        group_indices[7] = 1;
        group_indices[31] = 1;
        acc.update_batch(&[units(&values)], &group_indices, None, 2)
            .expect("update");
        assert_eq!(counts(&mut acc, EmitTo::All), vec![2, 2]);
    }
}

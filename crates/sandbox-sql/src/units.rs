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

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, ListArray, UInt64Array};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef};
use datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// Hash state for units. Fixed, so that partial states from different partitions merge.
const UNIT_HASH: QualityRandomState = QualityRandomState::with_seed(0x5a4e_4442_4f58);

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

fn hashes_of(array: &ArrayRef, buffer: &mut Vec<u64>) -> Result<()> {
    buffer.clear();
    buffer.resize(array.len(), 0);
    create_hashes([array], &UNIT_HASH, buffer)?;
    Ok(())
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
    /// Scratch buffer for the hashes of one batch.
    hashes: Vec<u64>,
}

impl GroupsAccumulator for CappedUnitsGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.units.resize_with(total_num_groups, Vec::new);
        let cap = self.cap;
        // Once every group of the batch is saturated the batch costs one check per row and no
        // hashing at all: this is what keeps the hidden count cheap.
        if group_indices.iter().all(|&g| self.units[g].len() >= cap) {
            return Ok(());
        }
        let array = &values[0];
        hashes_of(array, &mut self.hashes)?;
        for (row, &group) in group_indices.iter().enumerate() {
            let set = &mut self.units[group];
            if set.len() >= cap || array.is_null(row) {
                continue;
            }
            if opt_filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                continue;
            }
            insert_capped(set, cap, self.hashes[row]);
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let sets = emit_to.take_needed(&mut self.units);
        let counts: UInt64Array = sets.iter().map(|s| s.len() as u64).collect();
        Ok(Arc::new(counts))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![list_of(emit_to.take_needed(&mut self.units))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.units.resize_with(total_num_groups, Vec::new);
        let lists = as_unit_lists(&values[0])?;
        for (row, &group) in group_indices.iter().enumerate() {
            if lists.is_null(row) || self.units[group].len() >= self.cap {
                continue;
            }
            let partial = lists.value(row);
            let partial = partial.as_primitive::<datafusion::arrow::datatypes::UInt64Type>();
            for hash in partial.iter().flatten() {
                insert_capped(&mut self.units[group], self.cap, hash);
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
        hashes_of(array, &mut hashes)?;
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
        hashes_of(array, &mut hashes)?;
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

//! Differential privacy at the gate: noise is drawn here, in the release stage, with OpenDP's
//! samplers (exact discrete Laplace; floats handled by rounding to a power-of-two grid, so none of
//! the floating-point attacks on textbook samplers apply) over a cryptographic RNG (OpenSSL's),
//! never inside the query or a guest.
//!
//! The plan guard hands the gate, per group, the key columns, one hidden column per statistic
//! (`__sandbox_dp_<i>`: a per-group sum of per-unit contributions the plan already bounded:
//! at most `max_rows_per_unit` rows per unit and group, values clamped to the measure's declared
//! bounds, at most `max_groups_per_unit` groups per unit) and the hidden count of distinct units
//! ([`UNITS_COLUMN`]). The gate then
//!
//! 1. keeps a group only if its unit count plus Laplace noise reaches a threshold chosen so that
//!    a group of few units shows with probability at most `delta` (OpenDP's
//!    `make_laplace_threshold`, the partition selection of Rogers 2023); a query without `GROUP
//!    BY` has one group, which is public and always kept;
//! 2. adds Laplace noise to every statistic of the kept groups, scaled to its sensitivity;
//! 3. derives the outputs, post-processing the noisy values (free of privacy cost) so that none
//!    is impossible: counts are never negative; a sum of a measure whose bounds are non-negative
//!    is never negative (nor positive for non-positive bounds); an average is the noisy sum over
//!    the noisy count, clamped to the bounds, and its interval combines both noises honestly
//!    (each at 97.5%, so the pair holds with at least 95%).
//!
//! The epsilon of a query is split between its statistics and, when it groups, the selection, by
//! weight ([`DpSpec::weight`]): a sum gets three shares to a count's one (a sum's sensitivity is
//! the measure's bound, a count's one row, so even shares would leave sums and averages far
//! noisier than the counts beside them), the selection a count's share ([`SELECTION_WEIGHT`]).
//! What each part costs is read back from the privacy map of the OpenDP measurement that draws
//! it, not from a formula of ours: the spend the journal records is the library's.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat_batches, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use opendp::accuracy::{discrete_laplacian_scale_to_accuracy, laplacian_scale_to_accuracy};
use opendp::core::Measurement;
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{make_laplace, make_laplace_threshold};
use opendp::measures::{Approximate, MaxDivergence};
use opendp::metrics::{AbsoluteDistance, L1Distance, L01InfDistance};

use crate::{GatePolicy, ReleaseError, ReleaseSummary, Released, Result, UNITS_COLUMN};

/// Prefix of the hidden statistic columns: `__sandbox_dp_0`, `__sandbox_dp_1`, ...
pub const DP_STAT_PREFIX: &str = "__sandbox_dp_";

/// The name of statistic `i`'s hidden column.
pub fn stat_column(i: usize) -> String {
    format!("{DP_STAT_PREFIX}{i}")
}

/// One noisy statistic per group, as the plan computed it (already bounded per unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DpStat {
    /// Rows (or non-null values): each unit adds at most `max_rows_per_unit` per group.
    Count,
    /// Distinct units: each unit adds one per group.
    Units,
    /// A sum of values clamped to `[low, high]`: each unit adds at most `max_rows_per_unit`
    /// times the larger bound's magnitude per group.
    Sum { low: f64, high: f64 },
}

/// One output column of a DP query, in the order the query asked for them.
#[derive(Debug, Clone, PartialEq)]
pub enum DpOutput {
    /// A group key, passed as the plan computed it (the column of that name in its output).
    Key { name: String },
    /// `COUNT(*)` or `COUNT(column)`: a noisy count, never below zero.
    Count { name: String, stat: usize },
    /// `COUNT(DISTINCT <privacy unit>)`: under `GROUP BY`, the noisy unit count of the partition
    /// selection itself (no extra cost); otherwise statistic `stat`.
    Units { name: String, stat: Option<usize> },
    /// `SUM(measure)`: a noisy sum.
    Sum { name: String, stat: usize },
    /// `AVG(measure)`: noisy sum over noisy count, clamped to the measure's bounds.
    Avg {
        name: String,
        sum: usize,
        count: usize,
        low: f64,
        high: f64,
    },
}

impl DpOutput {
    /// The released column: a key as the plan typed it, counts as non-negative integers, sums
    /// and averages as floats. No value is null: noise is drawn for every shown group.
    pub fn field(&self, plan_schema: &Schema) -> Result<Field> {
        Ok(match self {
            DpOutput::Key { name } => plan_schema
                .field_with_name(name)
                .map_err(|_| dp_error(format!("the plan lacks the key `{name}`")))?
                .clone(),
            DpOutput::Count { name, .. } | DpOutput::Units { name, .. } => {
                Field::new(name, DataType::Int64, false)
            }
            DpOutput::Sum { name, .. } | DpOutput::Avg { name, .. } => {
                Field::new(name, DataType::Float64, false)
            }
        })
    }

    pub fn name(&self) -> &str {
        match self {
            DpOutput::Key { name }
            | DpOutput::Count { name, .. }
            | DpOutput::Units { name, .. }
            | DpOutput::Sum { name, .. }
            | DpOutput::Avg { name, .. } => name,
        }
    }
}

/// What the guard found a DP query computes, for the gate.
#[derive(Debug, Clone, PartialEq)]
pub struct DpSpec {
    pub outputs: Vec<DpOutput>,
    pub stats: Vec<DpStat>,
    /// Whether the query groups (then partition selection decides which groups show).
    pub grouped: bool,
    /// Whether its groups are every combination of public values (`domain` in the policy): the
    /// plan lists each, so none is chosen by the data and no selection is needed.
    pub public_groups: bool,
    pub max_rows_per_unit: u64,
    pub max_groups_per_unit: u64,
    /// The query neither orders its rows nor outputs every group key, so the plan's order is
    /// the data's (empty groups last, say): the gate sorts the released rows by their released
    /// values, left to right, before OFFSET/LIMIT, so that their order tells nothing the values
    /// do not.
    pub sort_released: bool,
}

impl DpSpec {
    /// Whether partition selection decides which groups show.
    fn selects(&self) -> bool {
        self.grouped && !self.public_groups
    }

    /// How many partitions one unit can change: the groups-per-unit bound when grouped.
    fn partitions_per_unit(&self) -> u64 {
        if self.grouped {
            self.max_groups_per_unit
        } else {
            1
        }
    }

    /// A statistic's weight in the split of a query's epsilon (the selection weighs
    /// [`SELECTION_WEIGHT`]).
    pub fn weight(stat: DpStat) -> f64 {
        match stat {
            DpStat::Count | DpStat::Units => 1.0,
            DpStat::Sum { .. } => 3.0,
        }
    }

    /// The most one unit can change one group's value of a statistic.
    fn per_group_sensitivity(&self, stat: DpStat) -> f64 {
        let rows = self.max_rows_per_unit as f64;
        match stat {
            DpStat::Count => rows,
            DpStat::Units => 1.0,
            DpStat::Sum { low, high } => rows * low.abs().max(high.abs()),
        }
    }
}

/// The partition selection's weight in the split of a query's epsilon, a count's. Its noise
/// decides which groups show, not how exact the shown values are; a smaller share would leave
/// more for the values but raise the threshold (with 24 groups per unit, past the size of a
/// month of a thousand enterprises). Groups over public values need no selection at all.
pub const SELECTION_WEIGHT: f64 = 1.0;

type IntegerNoise =
    Measurement<VectorDomain<AtomDomain<i64>>, L1Distance<i64>, MaxDivergence, Vec<i64>>;
type FloatNoise =
    Measurement<VectorDomain<AtomDomain<f64>>, L1Distance<f64>, MaxDivergence, Vec<f64>>;
type Selection = Measurement<
    MapDomain<AtomDomain<u64>, AtomDomain<i64>>,
    L01InfDistance<AbsoluteDistance<i64>>,
    Approximate<MaxDivergence>,
    HashMap<u64, i64>,
>;

fn integer_noise(scale: f64) -> Result<IntegerNoise> {
    make_laplace(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L1Distance::<i64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)
}

fn float_noise(scale: f64) -> Result<FloatNoise> {
    make_laplace(
        VectorDomain::new(AtomDomain::<f64>::new_non_nan()),
        L1Distance::<f64>::default(),
        scale,
        None,
    )
    .map_err(opendp_error)
}

fn selection_noise(scale: f64, threshold: i64) -> Result<Selection> {
    make_laplace_threshold(
        MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default()),
        L01InfDistance::<AbsoluteDistance<i64>>::default(),
        scale,
        threshold,
        None,
    )
    .map_err(opendp_error)
}

/// The mechanisms of one DP query, fixed before it runs (the budget is debited with their cost
/// at admission) and kept as parameters: OpenDP's measurements are built again, identically, in
/// the release stage (they cannot cross threads).
#[derive(Debug, Clone, PartialEq)]
pub struct NoisePlan {
    spec: DpSpec,
    /// The Laplace scale of each statistic.
    scales: Vec<f64>,
    /// The scale and threshold of the partition selection, when the query groups.
    selection: Option<(f64, i64)>,
    /// What the query spends: the sum of the privacy maps of its mechanisms.
    pub epsilon: f64,
    pub delta: f64,
}

/// The noise of one released column, as the caller is told: the Laplace scale and the
/// half-width of a 95% interval around the true value.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseReport {
    pub column: String,
    pub scale: f64,
    /// Half-width of the 95% interval (0 for a key; for an average, the widest of its rows').
    pub accuracy_95: f64,
    /// For an average, each released row's own half-width (it depends on the row's count), in
    /// the order of the rows; empty where every row has `accuracy_95`.
    #[serde(default)]
    pub rows: Vec<f64>,
}

/// What a DP release spent and how noisy it is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DpReport {
    pub epsilon: f64,
    pub delta: f64,
    pub columns: Vec<NoiseReport>,
}

fn dp_error(message: impl Into<String>) -> ReleaseError {
    ReleaseError::Dp(message.into())
}

fn opendp_error(error: opendp::error::Error) -> ReleaseError {
    // OpenDP's messages name parameters, never data: the inputs of a map are sensitivities.
    ReleaseError::Dp(error.variant.to_string() + ": " + &error.message.unwrap_or_default())
}

/// Chooses every mechanism of a query so that together they spend at most `epsilon` and
/// `delta`, and returns what they spend by OpenDP's privacy maps.
pub fn plan_noise(spec: &DpSpec, epsilon: f64, delta: f64) -> Result<NoisePlan> {
    if !(epsilon.is_finite() && epsilon > 0.0 && delta > 0.0 && delta < 1.0) {
        return Err(dp_error("epsilon must be positive and delta within (0, 1)"));
    }
    if spec.outputs.is_empty() || spec.max_rows_per_unit == 0 || spec.max_groups_per_unit == 0 {
        return Err(dp_error("a DP query needs outputs and contribution bounds"));
    }
    let weights = spec.stats.iter().map(|s| DpSpec::weight(*s)).sum::<f64>()
        + if spec.selects() {
            SELECTION_WEIGHT
        } else {
            0.0
        };
    if weights == 0.0 {
        return Err(dp_error(
            "a DP query must compute a noisy statistic or group",
        ));
    }
    let l0 = spec.partitions_per_unit();
    let mut scales = Vec::with_capacity(spec.stats.len());
    let mut spent = 0.0;
    for &stat in &spec.stats {
        let share = epsilon * DpSpec::weight(stat) / weights;
        let d_in = l0 as f64 * spec.per_group_sensitivity(stat);
        let (scale, cost) = calibrate(share, d_in, |scale| match stat {
            DpStat::Count | DpStat::Units => integer_noise(scale)?
                .map(&(d_in as i64))
                .map_err(opendp_error),
            DpStat::Sum { .. } => float_noise(scale)?.map(&d_in).map_err(opendp_error),
        })?;
        spent += cost;
        scales.push(scale);
    }
    let mut spent_delta = 0.0;
    let selection = if spec.selects() {
        let (scale, threshold, cost, cost_delta) =
            selection(l0, epsilon * SELECTION_WEIGHT / weights, delta)?;
        spent += cost;
        spent_delta += cost_delta;
        Some((scale, threshold))
    } else {
        None
    };
    Ok(NoisePlan {
        spec: spec.clone(),
        scales,
        selection,
        epsilon: spent,
        delta: spent_delta,
    })
}

/// Finds the smallest scale (from `d_in / share` upwards) whose measurement costs at most
/// `share`: OpenDP's map of a float mechanism includes the rounding to its grid, so the
/// textbook scale can cost a little more than its nominal epsilon.
fn calibrate(share: f64, d_in: f64, cost_of: impl Fn(f64) -> Result<f64>) -> Result<(f64, f64)> {
    let mut scale = d_in / share;
    for _ in 0..40 {
        let cost = cost_of(scale)?;
        if cost <= share {
            return Ok((scale, cost));
        }
        scale *= (cost / share).max(1.0 + 1e-6) * (1.0 + 1e-9);
    }
    Err(dp_error(
        "cannot calibrate the noise within the epsilon share",
    ))
}

/// Partition selection: Laplace noise on each group's unit count (scale `l0 / share`), and the
/// least threshold whose privacy map stays within `delta`.
fn selection(l0: u64, share: f64, delta: f64) -> Result<(f64, i64, f64, f64)> {
    let scale = l0 as f64 / share;
    let l0_u32 = u32::try_from(l0).map_err(|_| dp_error("too many groups per unit"))?;
    let d_in = (l0_u32, l0 as i64, 1i64);
    let build = |threshold: i64| -> Result<((), (f64, f64))> {
        let cost = selection_noise(scale, threshold)?
            .map(&d_in)
            .map_err(opendp_error)?;
        Ok(((), cost))
    };
    // The delta of a threshold falls as it rises: search the least one within `delta`.
    let (mut low, mut high) = (1i64, 2i64);
    while build(high)?.1.1 > delta {
        low = high;
        high = high
            .checked_mul(2)
            .filter(|h| *h < (1 << 40))
            .ok_or_else(|| dp_error("no threshold meets delta"))?;
    }
    while low < high {
        let mid = low + (high - low) / 2;
        if build(mid)?.1.1 <= delta {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    let ((), (epsilon, spent_delta)) = build(high)?;
    if epsilon > share * (1.0 + 1e-9) {
        return Err(dp_error("partition selection costs more than its share"));
    }
    Ok((scale, high, epsilon, spent_delta))
}

impl NoisePlan {
    pub fn spec(&self) -> &DpSpec {
        &self.spec
    }

    /// The threshold of the partition selection, when the query groups.
    pub fn threshold(&self) -> Option<i64> {
        self.selection.map(|s| s.1)
    }

    /// The scale of each statistic's noise, in order.
    pub fn scales(&self) -> &[f64] {
        &self.scales
    }

    /// How noisy each output column is. An average's interval depends on its group's count, so
    /// it is given here for a group of `average_rows` rows (`release_dp` gives it for the least
    /// count it released).
    pub fn report_for(&self, average_rows: f64) -> DpReport {
        let accuracy = |i: usize| -> f64 {
            let scale = self.scales[i];
            match self.spec.stats[i] {
                DpStat::Count | DpStat::Units => discrete_laplacian_scale_to_accuracy(scale, 0.05),
                DpStat::Sum { .. } => laplacian_scale_to_accuracy(scale, 0.05),
            }
            .unwrap_or(f64::INFINITY)
        };
        let columns = self
            .spec
            .outputs
            .iter()
            .map(|output| {
                let (scale, accuracy_95) = match output {
                    DpOutput::Key { .. } => (0.0, 0.0),
                    DpOutput::Count { stat, .. }
                    | DpOutput::Sum { stat, .. }
                    | DpOutput::Units {
                        stat: Some(stat), ..
                    } => (self.scales[*stat], accuracy(*stat)),
                    DpOutput::Units { stat: None, .. } => {
                        let scale = self.selection.map_or(0.0, |s| s.0);
                        (
                            scale,
                            discrete_laplacian_scale_to_accuracy(scale, 0.05)
                                .unwrap_or(f64::INFINITY),
                        )
                    }
                    DpOutput::Avg {
                        sum,
                        count,
                        low,
                        high,
                        ..
                    } => (
                        self.scales[*sum],
                        self.average_accuracy(*sum, *count, (*low, *high), average_rows, None),
                    ),
                };
                NoiseReport {
                    column: output.name().to_string(),
                    scale,
                    accuracy_95,
                    rows: Vec::new(),
                }
            })
            .collect();
        DpReport {
            epsilon: self.epsilon,
            delta: self.delta,
            columns,
        }
    }

    /// How noisy each output column is, an average's for a group of 1,000 rows.
    pub fn report(&self) -> DpReport {
        self.report_for(1_000.0)
    }

    /// The half-width of an honest 95% interval of an average whose noisy count is `rows`: the
    /// sum's and the count's noise each within their 97.5% interval (together at least 95%).
    ///
    /// With true sum `S` over `N` rows (average `a`), noises `es` and `ec`, and the noisy
    /// average `â = (S + es) / (N + ec)`, exactly `a - â = (a·ec - es) / (N + ec)`: the
    /// denominator is the noisy count itself, which is released. So `|a - â| <= (|a|·Ec + Es) /
    /// rows`, where `|a|` is at most the bounds' magnitude and, solving for it, at most `|â| +
    /// |a - â|`, which gives `(|â|·Ec + Es) / (rows - Ec)`. The tighter of the two; never wider
    /// than the bounds. Before the query runs (`average` unknown) only the first applies.
    fn average_accuracy(
        &self,
        sum: usize,
        count: usize,
        (low, high): (f64, f64),
        rows: f64,
        average: Option<f64>,
    ) -> f64 {
        let sum_error =
            laplacian_scale_to_accuracy(self.scales[sum], 0.025).unwrap_or(f64::INFINITY);
        let count_error = discrete_laplacian_scale_to_accuracy(self.scales[count], 0.025)
            .unwrap_or(f64::INFINITY);
        let magnitude = low.abs().max(high.abs());
        let mut width = high - low;
        if rows >= 1.0 {
            width = width.min((sum_error + magnitude * count_error) / rows);
        }
        if let Some(average) = average.filter(|a| a.is_finite())
            && rows - count_error >= 1.0
        {
            width = width.min((average.abs() * count_error + sum_error) / (rows - count_error));
        }
        width
    }
}

/// Integer values of a hidden count column (nulls as zero).
fn integers(column: &ArrayRef) -> Result<Vec<i64>> {
    let column = cast(column, &DataType::Int64)?;
    let column = column
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| dp_error("a hidden count column is not an integer"))?;
    Ok(column.iter().map(|v| v.unwrap_or(0)).collect())
}

/// Float values of a hidden sum column (nulls as zero).
fn floats(column: &ArrayRef) -> Result<Vec<f64>> {
    let column = cast(column, &DataType::Float64)?;
    let column = column
        .as_any()
        .downcast_ref::<Float64Array>()
        .ok_or_else(|| dp_error("a hidden sum column is not a number"))?;
    Ok(column
        .iter()
        .map(|v| v.filter(|v| v.is_finite()).unwrap_or(0.0))
        .collect())
}

/// Passes a DP query's per-group statistics through the gate: partition selection, noise,
/// derived outputs, then `OFFSET`/`LIMIT` and the row cap.
pub fn release_dp(
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    plan: &NoisePlan,
    gate: &GatePolicy,
) -> Result<(Released, DpReport)> {
    let spec = &plan.spec;
    for batch in &batches {
        if batch.schema().fields() != schema.fields() {
            return Err(ReleaseError::SchemaMismatch);
        }
    }
    let all = concat_batches(&schema, &batches)?;
    let column = |name: &str| -> Result<&ArrayRef> {
        schema
            .index_of(name)
            .map(|i| all.column(i))
            .map_err(|_| dp_error(format!("the plan lacks the column `{name}`")))
    };
    let units = integers(column(UNITS_COLUMN).map_err(|_| ReleaseError::MissingUnitCount)?)?;

    // 1. Which groups show, and their noisy unit counts.
    let (kept, noisy_units): (Vec<u32>, Vec<i64>) = match &plan.selection {
        Some((scale, threshold)) => {
            let selection = selection_noise(*scale, *threshold)?;
            let counts: HashMap<u64, i64> = units
                .iter()
                .enumerate()
                .map(|(i, u)| (i as u64, *u))
                .collect();
            let mut shown: Vec<(u64, i64)> = selection
                .invoke(&counts)
                .map_err(opendp_error)?
                .into_iter()
                .collect();
            // Rows keep the plan's order (its ORDER BY over keys).
            shown.sort_unstable_by_key(|(i, _)| *i);
            shown.into_iter().map(|(i, u)| (i as u32, u)).unzip()
        }
        // Public groups: the plan listed every combination of public values, in an order the
        // policy fixes; every row shows (the unit counts come from a statistic of their own).
        None if spec.public_groups => (
            (0..all.num_rows() as u32).collect(),
            vec![0; all.num_rows()],
        ),
        None => {
            if all.num_rows() != 1 {
                return Err(dp_error("an ungrouped DP query must yield exactly one row"));
            }
            (vec![0], vec![0])
        }
    };
    let indices = UInt32Array::from(kept.clone());

    // 2. Noise on every statistic of the shown groups.
    let mut noisy: Vec<ArrayRef> = Vec::with_capacity(spec.stats.len());
    for (i, (stat, scale)) in spec.stats.iter().zip(&plan.scales).enumerate() {
        let values = take(column(&stat_column(i))?, &indices, None)?;
        noisy.push(match stat {
            DpStat::Count | DpStat::Units => Arc::new(Int64Array::from(
                integer_noise(*scale)?
                    .invoke(&integers(&values)?)
                    .map_err(opendp_error)?,
            )),
            DpStat::Sum { .. } => Arc::new(Float64Array::from(
                float_noise(*scale)?
                    .invoke(&floats(&values)?)
                    .map_err(opendp_error)?,
            )),
        });
    }
    let ints = |stat: usize| integers(&noisy[stat]);

    // 3. The outputs the query asked for.
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(spec.outputs.len());
    for output in &spec.outputs {
        let name = output.name();
        let array: ArrayRef = match output {
            DpOutput::Key { .. } => {
                let index = schema
                    .index_of(name)
                    .map_err(|_| dp_error(format!("the plan lacks the key `{name}`")))?;
                take(all.column(index), &indices, None)?
            }
            DpOutput::Count { stat, .. }
            | DpOutput::Units {
                stat: Some(stat), ..
            } => {
                let values: Int64Array = ints(*stat)?.into_iter().map(|v| Some(v.max(0))).collect();
                Arc::new(values)
            }
            DpOutput::Units { stat: None, .. } => {
                let values: Int64Array = noisy_units.iter().map(|v| Some((*v).max(0))).collect();
                Arc::new(values)
            }
            DpOutput::Sum { stat, .. } => {
                // A sum of values bounded to one sign has that sign: the noise cannot make it
                // cross zero (post-processing).
                let (low, high) = match spec.stats[*stat] {
                    DpStat::Sum { low, high } => (low, high),
                    _ => (f64::NEG_INFINITY, f64::INFINITY),
                };
                let values: Float64Array = floats(&noisy[*stat])?
                    .into_iter()
                    .map(|v| {
                        Some(if low >= 0.0 {
                            v.max(0.0)
                        } else if high <= 0.0 {
                            v.min(0.0)
                        } else {
                            v
                        })
                    })
                    .collect();
                Arc::new(values)
            }
            DpOutput::Avg {
                sum,
                count,
                low,
                high,
                ..
            } => {
                let sums = floats(&noisy[*sum])?;
                let counts = ints(*count)?;
                let values: Float64Array = sums
                    .iter()
                    .zip(&counts)
                    .map(|(s, c)| Some((s / (*c).max(1) as f64).clamp(*low, *high)))
                    .collect();
                Arc::new(values)
            }
        };
        columns.push(array);
    }
    let out_schema = crate::released_schema(&schema, Some(spec))?;
    let batch = RecordBatch::try_new(out_schema.clone(), columns)?;
    // The released rows' order: the plan's, or their released values' (`sort_released`).
    let order: Vec<usize> = if spec.sort_released && batch.num_rows() > 1 {
        let keys: Vec<arrow::compute::SortColumn> = batch
            .columns()
            .iter()
            .map(|values| arrow::compute::SortColumn {
                values: values.clone(),
                options: Some(arrow::compute::SortOptions {
                    descending: false,
                    nulls_first: false,
                }),
            })
            .collect();
        let indices = arrow::compute::lexsort_to_indices(&keys, None)?;
        indices.values().iter().map(|i| *i as usize).collect()
    } else {
        (0..batch.num_rows()).collect()
    };
    let batch = if spec.sort_released {
        let indices = arrow::array::UInt32Array::from_iter_values(order.iter().map(|i| *i as u32));
        arrow::compute::take_record_batch(&batch, &indices)?
    } else {
        batch
    };

    // An average's error depends on its count: each row's interval with its own noisy count,
    // the column's with the least of them (post-processing of released values, no cost).
    let start = gate.skip.min(batch.num_rows());
    let length = gate
        .fetch
        .unwrap_or(usize::MAX)
        .min(batch.num_rows() - start);
    let mut report = plan.report();
    for (output, noise) in spec.outputs.iter().zip(report.columns.iter_mut()) {
        if let DpOutput::Avg {
            sum,
            count,
            low,
            high,
            ..
        } = output
        {
            let (sums, counts) = (floats(&noisy[*sum])?, ints(*count)?);
            noise.rows = (start..start + length)
                .map(|position| {
                    let i = order[position];
                    let rows = counts[i] as f64;
                    let average = (rows > 0.0).then(|| sums[i] / rows);
                    plan.average_accuracy(*sum, *count, (*low, *high), rows, average)
                })
                .collect();
            noise.accuracy_95 = noise.rows.iter().copied().fold(0.0, f64::max);
        }
    }

    // 4. OFFSET/LIMIT over the shown groups, and the row cap.
    let batch = batch.slice(start, length);
    if batch.num_rows() > gate.max_rows {
        return Err(ReleaseError::TooManyRows {
            limit: gate.max_rows,
        });
    }
    // Under DP the count of groups not shown is not told: it is an exact figure of the data.
    let summary = ReleaseSummary {
        rows_released: batch.num_rows() as u64,
        rows_suppressed: 0,
        rows_differencing: 0,
        min_units: 0,
    };
    let released = Released::new(out_schema, vec![batch], summary, Vec::new())?;
    Ok((released, report))
}

/// A DP answer this gate released before, read back from the engine's answer store (the Arrow
/// IPC stream it released): the same bytes again, no new noise, so that asking an identical
/// question after a restart neither costs budget nor averages noise away.
pub fn reload_answer(ipc: &[u8]) -> Result<Released> {
    let reader = arrow::ipc::reader::StreamReader::try_new(ipc, None)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    if schema
        .fields()
        .iter()
        .any(|f| crate::is_hidden_name(f.name()))
    {
        return Err(dp_error("a stored answer carries hidden columns"));
    }
    let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    Released::new(
        schema,
        batches,
        ReleaseSummary {
            rows_released: rows,
            ..ReleaseSummary::default()
        },
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    //! Statistical tests of the noise, with the real mechanisms: thousands of draws, bounds at
    //! many standard errors (a correct sampler fails them with negligible probability; a sampler
    //! with the wrong scale, a bias or no noise fails them every time).

    use super::*;
    use arrow::array::StringArray;

    fn spec(stats: Vec<DpStat>, outputs: Vec<DpOutput>, grouped: bool) -> DpSpec {
        DpSpec {
            outputs,
            stats,
            grouped,
            public_groups: false,
            max_rows_per_unit: 1,
            max_groups_per_unit: 1,
            sort_released: false,
        }
    }

    fn count_spec() -> DpSpec {
        spec(
            vec![DpStat::Count],
            vec![DpOutput::Count {
                name: "n".into(),
                stat: 0,
            }],
            false,
        )
    }

    /// Mean and variance of samples.
    fn moments(samples: &[f64]) -> (f64, f64) {
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn the_spend_is_the_library_s_and_within_what_was_asked() {
        for (epsilon, stats, grouped) in [
            (1.0, vec![DpStat::Count], false),
            (
                0.1,
                vec![
                    DpStat::Count,
                    DpStat::Sum {
                        low: 0.0,
                        high: 1e6,
                    },
                ],
                false,
            ),
            (
                2.0,
                vec![
                    DpStat::Count,
                    DpStat::Sum {
                        low: -5.0,
                        high: 5.0,
                    },
                ],
                true,
            ),
            (0.5, vec![], true),
        ] {
            let outputs = vec![DpOutput::Key { name: "k".into() }];
            let spec = DpSpec {
                max_rows_per_unit: 3,
                max_groups_per_unit: 2,
                ..spec(stats.clone(), outputs, grouped)
            };
            let plan = plan_noise(&spec, epsilon, 1e-7).unwrap();
            assert!(plan.epsilon <= epsilon * (1.0 + 1e-9), "{plan:?}");
            assert!(
                plan.epsilon >= epsilon * 0.99,
                "spends what it may: {plan:?}"
            );
            assert!(plan.delta <= 1e-7);
            assert_eq!(plan.delta > 0.0, grouped);
            // Every statistic's scale is at least its sensitivity over its share.
            let weights = stats.iter().map(|s| DpSpec::weight(*s)).sum::<f64>()
                + if grouped { SELECTION_WEIGHT } else { 0.0 };
            for (stat, scale) in stats.iter().zip(plan.scales()) {
                let share = epsilon * DpSpec::weight(*stat) / weights;
                let sensitivity =
                    spec.partitions_per_unit() as f64 * spec.per_group_sensitivity(*stat);
                assert!(
                    *scale >= sensitivity / share * 0.999_999,
                    "{stat:?}: {scale}"
                );
            }
        }
        assert!(plan_noise(&count_spec(), 0.0, 1e-7).is_err());
        assert!(plan_noise(&count_spec(), f64::NAN, 1e-7).is_err());
        assert!(plan_noise(&count_spec(), 1.0, 0.0).is_err());
    }

    #[test]
    fn integer_noise_has_the_discrete_laplace_mean_and_variance() {
        for epsilon in [0.5, 1.0, 4.0] {
            let plan = plan_noise(&count_spec(), epsilon, 1e-7).unwrap();
            let scale = plan.scales()[0];
            let n = 40_000;
            let noisy = integer_noise(scale)
                .unwrap()
                .invoke(&vec![1000; n])
                .unwrap();
            let samples: Vec<f64> = noisy.iter().map(|v| (*v - 1000) as f64).collect();
            let (mean, var) = moments(&samples);
            // Discrete Laplace with parameter t: variance 2 e^{-1/t} / (1 - e^{-1/t})^2.
            let q = (-1.0 / scale).exp();
            let expected = 2.0 * q / (1.0 - q).powi(2);
            assert!(
                mean.abs() < 6.0 * (expected / n as f64).sqrt(),
                "eps {epsilon}: mean {mean}"
            );
            assert!(
                (var / expected - 1.0).abs() < 0.08,
                "eps {epsilon}: variance {var}, expected {expected}"
            );
        }
    }

    #[test]
    fn float_noise_has_the_laplace_mean_and_variance() {
        let spec = spec(
            vec![DpStat::Sum {
                low: 0.0,
                high: 100.0,
            }],
            vec![DpOutput::Sum {
                name: "s".into(),
                stat: 0,
            }],
            false,
        );
        let plan = plan_noise(&spec, 1.0, 1e-7).unwrap();
        let scale = plan.scales()[0];
        assert!((scale / 100.0 - 1.0).abs() < 1e-3, "scale {scale}");
        let n = 40_000;
        let noisy = float_noise(scale)
            .unwrap()
            .invoke(&vec![5000.0; n])
            .unwrap();
        let samples: Vec<f64> = noisy.iter().map(|v| v - 5000.0).collect();
        let (mean, var) = moments(&samples);
        let expected = 2.0 * scale * scale;
        assert!(
            mean.abs() < 6.0 * (expected / n as f64).sqrt(),
            "mean {mean}"
        );
        assert!(
            (var / expected - 1.0).abs() < 0.08,
            "variance {var} vs {expected}"
        );
        // No value left the grid: the mechanism rounds to a power of two, never exposes the
        // low bits of the input.
        assert!(noisy.iter().all(|v| v.is_finite()));
    }

    /// One grouped query's per-group input, as the plan hands it to the gate.
    fn grouped_batch(groups: &[(&str, i64)]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new(stat_column(0), DataType::Int64, true),
            Field::new(UNITS_COLUMN, DataType::Int64, false),
        ]));
        let keys = StringArray::from(groups.iter().map(|g| g.0).collect::<Vec<_>>());
        let counts = Int64Array::from(groups.iter().map(|g| g.1).collect::<Vec<_>>());
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(keys), Arc::new(counts.clone()), Arc::new(counts)],
        )
        .unwrap();
        (schema, batch)
    }

    fn gate() -> GatePolicy {
        GatePolicy {
            min_units: 0,
            skip: 0,
            fetch: None,
            max_rows: 1000,
            deadline: None,
            source: 0,
        }
    }

    #[test]
    fn partition_selection_hides_small_groups_and_shows_large_ones() {
        let spec = spec(
            vec![DpStat::Count],
            vec![
                DpOutput::Key { name: "k".into() },
                DpOutput::Count {
                    name: "n".into(),
                    stat: 0,
                },
            ],
            true,
        );
        let plan = plan_noise(&spec, 1.0, 1e-6).unwrap();
        let threshold = plan.threshold().unwrap();
        assert!(threshold > 10, "threshold {threshold}");
        let (schema, batch) = grouped_batch(&[("one", 1), ("large", 10 * threshold)]);
        let mut shown_one = 0;
        for _ in 0..2000 {
            let (released, report) =
                release_dp(schema.clone(), vec![batch.clone()], &plan, &gate()).unwrap();
            let keys = released.batches()[0]
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .iter()
                .map(|k| k.unwrap().to_string())
                .collect::<Vec<_>>();
            assert!(keys.contains(&"large".to_string()));
            shown_one += usize::from(keys.contains(&"one".to_string()));
            assert_eq!(released.summary().rows_suppressed, 0, "not told under DP");
            assert!(report.epsilon <= 1.0 + 1e-9);
        }
        assert_eq!(shown_one, 0, "a one-unit group showed");
    }

    #[test]
    fn differencing_and_tracker_estimates_carry_at_least_the_promised_error() {
        // A tracker attack on a target: q(C OR T) + q(C OR NOT T) - q(ALL), each a noisy count
        // answered under epsilon 1. The estimate's error is the sum of three independent noises:
        // it must be as large as the three queries' noise promises, and the 95% interval each
        // query reports must be honest: at most 5% of single answers fall outside it (fewer for
        // a discrete sampler at a small scale, whose interval bound is conservative), and not so
        // wide that almost none do.
        let plan = plan_noise(&count_spec(), 1.0, 1e-7).unwrap();
        let report = plan.report();
        let accuracy = report.columns[0].accuracy_95;
        let scale = plan.scales()[0];
        let noise = integer_noise(scale).unwrap();
        let (c_or_t, c_or_not_t, all, target) = (5_000i64, 9_000i64, 12_000i64, 2_000i64);
        let trials = 20_000;
        let mut errors = Vec::with_capacity(trials);
        let mut outside = 0;
        for _ in 0..trials {
            let answers = noise.invoke(&vec![c_or_t, c_or_not_t, all]).unwrap();
            outside += usize::from((answers[0] - c_or_t).abs() as f64 > accuracy);
            errors.push((answers[0] + answers[1] - answers[2] - target) as f64);
        }
        let (mean, var) = moments(&errors);
        let q = (-1.0 / scale).exp();
        let single = 2.0 * q / (1.0 - q).powi(2);
        assert!(
            mean.abs() < 6.0 * (3.0 * single / trials as f64).sqrt(),
            "bias {mean}"
        );
        assert!(
            var >= 0.9 * 3.0 * single,
            "error variance {var} below {}",
            3.0 * single
        );
        let rate = outside as f64 / trials as f64;
        assert!(
            (0.01..=0.055).contains(&rate),
            "outside the 95% interval: {rate}"
        );
    }

    /// Regression (fresh-attacker round of issue 18): groups counted without their keys came
    /// back in the plan's order, with the really empty groups last; they are sorted by their
    /// released values, before the LIMIT picks any.
    #[test]
    fn rows_without_their_keys_come_sorted_by_released_values() {
        let spec = DpSpec {
            public_groups: true,
            sort_released: true,
            ..spec(
                vec![DpStat::Count],
                vec![DpOutput::Count {
                    name: "n".into(),
                    stat: 0,
                }],
                true,
            )
        };
        let plan = plan_noise(&spec, 1.0, 1e-7).unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new(stat_column(0), DataType::Int64, true),
            Field::new(UNITS_COLUMN, DataType::Int64, false),
        ]));
        let counts = vec![5000i64, 0, 3000];
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(counts.clone())),
                Arc::new(Int64Array::from(counts)),
            ],
        )
        .unwrap();
        let (released, _) =
            release_dp(schema.clone(), vec![batch.clone()], &plan, &gate()).unwrap();
        let values: Vec<i64> = released.batches()[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .values()
            .to_vec();
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
        assert!(values[0] < 1000 && values[2] > 4000, "{values:?}");
        // The LIMIT takes the first of the sorted rows, not the plan's first.
        let first = GatePolicy {
            fetch: Some(1),
            ..gate()
        };
        let (released, _) = release_dp(schema, vec![batch], &plan, &first).unwrap();
        let value = released.batches()[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .value(0);
        assert!(value < 1000, "{value}");
    }

    #[test]
    fn an_average_s_interval_is_honest_and_tighter_than_the_bounds_allow() {
        // One ungrouped average over 400 rows of mean 300 in bounds [0, 1000]: each release's
        // own interval (from its noisy count and average) must hold the true average at least
        // 95% of the time, and be narrower than the interval that assumes the largest value.
        let spec = spec(
            vec![
                DpStat::Count,
                DpStat::Sum {
                    low: 0.0,
                    high: 1000.0,
                },
            ],
            vec![DpOutput::Avg {
                name: "a".into(),
                sum: 1,
                count: 0,
                low: 0.0,
                high: 1000.0,
            }],
            false,
        );
        let plan = plan_noise(&spec, 1.0, 1e-7).unwrap();
        let (rows, truth) = (400i64, 300.0);
        let schema = Arc::new(Schema::new(vec![
            Field::new(stat_column(0), DataType::Int64, true),
            Field::new(stat_column(1), DataType::Float64, true),
            Field::new(UNITS_COLUMN, DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![rows])),
                Arc::new(Float64Array::from(vec![truth * rows as f64])),
                Arc::new(Int64Array::from(vec![rows])),
            ],
        )
        .unwrap();
        let worst_case = plan.average_accuracy(1, 0, (0.0, 1000.0), rows as f64, None);
        let trials = 4000;
        let (mut outside, mut widths) = (0, 0.0);
        for _ in 0..trials {
            let (released, report) =
                release_dp(schema.clone(), vec![batch.clone()], &plan, &gate()).unwrap();
            let value = released.batches()[0]
                .column(0)
                .as_any()
                .downcast_ref::<Float64Array>()
                .unwrap()
                .value(0);
            let width = report.columns[0].rows[0];
            outside += usize::from((value - truth).abs() > width);
            widths += width;
        }
        let rate = outside as f64 / trials as f64;
        assert!(rate <= 0.05, "outside the 95% interval: {rate}");
        let mean_width = widths / trials as f64;
        assert!(
            mean_width < 0.8 * worst_case,
            "interval {mean_width} against {worst_case} assuming the largest value"
        );
    }

    #[test]
    fn a_gate_without_the_unit_count_or_with_a_changed_schema_releases_nothing() {
        let spec = spec(
            vec![DpStat::Count],
            vec![DpOutput::Count {
                name: "n".into(),
                stat: 0,
            }],
            true,
        );
        let plan = plan_noise(&spec, 1.0, 1e-6).unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            stat_column(0),
            DataType::Int64,
            false,
        )]));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![5]))])
            .unwrap();
        assert!(matches!(
            release_dp(schema, vec![batch.clone()], &plan, &gate()),
            Err(ReleaseError::MissingUnitCount)
        ));
        let (schema, _) = grouped_batch(&[("a", 1)]);
        assert!(matches!(
            release_dp(schema, vec![batch], &plan, &gate()),
            Err(ReleaseError::SchemaMismatch)
        ));
    }
}

//! A credit scorecard for small enterprises, run inside the sandbox as an approved WASM job.
//!
//! Input: one row per enterprise of features computed by the job's input query (see
//! [`INPUT_QUERY`]) from tax, social-insurance, provident-fund, court and market-regulation data.
//! Output: one row per enterprise: `credit_code`, an integer `score` in 0..=1000 and a `grade` in
//! A..E. The release gate checks that contract and keeps only consented enterprises.
//!
//! The model is a logistic regression on the log-odds of default, mapped to points the usual way
//! (600 points at 50:1 good:bad odds, 40 points to double the odds).

use std::sync::Arc;

use sandbox_guest::arrow_array::{
    Array, ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray,
};
use sandbox_guest::arrow_schema::DataType;
use sandbox_guest::{GuestError, batch};

sandbox_guest::manifest!(
    r#"{"name":"credit-scoring","purpose":"credit_assessment","input":["enterprises.credit_code","enterprises.industry","tax_monthly.credit_code","tax_monthly.month","tax_monthly.vat_paid","tax_monthly.revenue_declared","social_insurance_monthly.credit_code","social_insurance_monthly.month","social_insurance_monthly.insured_headcount","social_insurance_monthly.arrears","housing_fund_monthly.credit_code","housing_fund_monthly.month","housing_fund_monthly.employees_covered","court_cases.credit_code","court_cases.role","court_cases.dishonest_debtor","admin_penalties.credit_code"]}"#
);
/// The input query: per-enterprise features, 2024 against 2023. It travels in the module (the
/// `sandbox.input` section), so the owners approve it with the code and no run can change it.
pub const INPUT_QUERY: &str = include_str!("../input.sql");
sandbox_guest::input!(INPUT_QUERY);
sandbox_guest::entry!(job);

/// Per-enterprise features, as the model reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Features {
    pub revenue_recent: f64,
    pub revenue_prior: f64,
    pub vat_recent: f64,
    pub headcount_recent: f64,
    pub headcount_prior: f64,
    pub arrears_months: f64,
    pub covered_recent: f64,
    pub defendant_cases: f64,
    pub dishonest: f64,
    pub penalties: f64,
}

/// Natural logarithm, computed the same way on every platform: `f64::ln` calls the platform's
/// math library (glibc natively, a software port inside WebAssembly), which may differ in the last
/// bits and in speed. A score must reproduce exactly wherever the model runs (the bank validates
/// it natively, the sandbox runs it as WebAssembly), so the model brings its own.
///
/// `x = m * 2^e` with `m` in `[sqrt(1/2), sqrt(2))`; `ln(m) = 2 atanh(s)`, `s = (m - 1)/(m + 1)`,
/// as an odd series in `s` (|s| < 0.172, so nine terms give about 1e-15 relative error).
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return f64::INFINITY;
    }
    let (mut m, mut e) = {
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i64;
        if exponent == 0 {
            // Subnormal: scale into the normal range first.
            let scaled = (x * f64::from_bits(0x4350_0000_0000_0000)).to_bits(); // 2^54
            let exponent = ((scaled >> 52) & 0x7ff) as i64;
            (
                f64::from_bits((scaled & !(0x7ff << 52)) | (1023 << 52)),
                exponent - 1023 - 54,
            )
        } else {
            (
                f64::from_bits((bits & !(0x7ff << 52)) | (1023 << 52)),
                exponent - 1023,
            )
        }
    };
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0
                    + s2 * (1.0 / 9.0
                        + s2 * (1.0 / 11.0
                            + s2 * (1.0 / 13.0 + s2 * (1.0 / 15.0 + s2 * (1.0 / 17.0))))))));
    2.0 * s * series + e as f64 * std::f64::consts::LN_2
}

/// `ln(1 + x)` for the non-negative counts the model takes it of.
fn ln_1p(x: f64) -> f64 {
    ln(1.0 + x)
}

/// Log-odds of default. Months in arrears count as a share of the year: in the demo data, an
/// enterprise in arrears tends to stay so, and twelve months weigh like a few risk signals, not
/// like a default.
pub fn log_odds_of_default(f: &Features) -> f64 {
    let growth = |now: f64, before: f64| ln((now.max(0.0) + 1.0) / (before.max(0.0) + 1.0));
    let revenue_growth = growth(f.revenue_recent, f.revenue_prior).clamp(-2.0, 2.0);
    let headcount_growth = growth(f.headcount_recent, f.headcount_prior).clamp(-2.0, 2.0);
    let vat_ratio = (f.vat_recent / f.revenue_recent.max(1.0)).clamp(0.0, 0.2);
    let coverage = (f.covered_recent / f.headcount_recent.max(1.0)).clamp(0.0, 1.0);
    let size = (ln(f.revenue_recent.max(0.0) + 1.0) - 14.0).clamp(-6.0, 6.0);
    -3.8 - 1.3 * revenue_growth - 0.8 * headcount_growth - 4.0 * vat_ratio
        + 1.4 * (f.arrears_months / 12.0).clamp(0.0, 1.0)
        - 1.0 * coverage
        + 0.45 * ln_1p(f.defendant_cases.max(0.0))
        + 2.2 * f.dishonest.clamp(0.0, 1.0)
        + 0.30 * ln_1p(f.penalties.max(0.0))
        - 0.15 * size
}

/// Points: 600 at 50:1 odds of good, 40 more for every doubling; 0..=1000.
pub fn score(f: &Features) -> i64 {
    const FACTOR: f64 = 40.0 / std::f64::consts::LN_2;
    let offset = 600.0 - FACTOR * ln(50.0);
    let points = offset - FACTOR * log_odds_of_default(f);
    if points.is_nan() {
        return 0;
    }
    points.round().clamp(0.0, 1000.0) as i64
}

pub fn grade(score: i64) -> &'static str {
    match score {
        680.. => "A",
        620..=679 => "B",
        560..=619 => "C",
        480..=559 => "D",
        _ => "E",
    }
}

/// A numeric input column as `f64`, nulls as 0: aggregates of enterprises without cases or
/// penalties arrive as nulls through the outer joins.
fn numbers(batch: &RecordBatch, name: &str) -> Result<Vec<f64>, GuestError> {
    let column = batch
        .column_by_name(name)
        .ok_or_else(|| GuestError::new(format!("input lacks column `{name}`")))?;
    let read = |value: Option<f64>| value.unwrap_or(0.0);
    Ok(match column.data_type() {
        // Without nulls, straight from the values: no per-value null check.
        DataType::Float64 if column.null_count() == 0 => {
            let a = column.as_any().downcast_ref::<Float64Array>().unwrap();
            a.values().to_vec()
        }
        DataType::Int64 if column.null_count() == 0 => {
            let a = column.as_any().downcast_ref::<Int64Array>().unwrap();
            a.values().iter().map(|v| *v as f64).collect()
        }
        DataType::Float64 => {
            let a = column.as_any().downcast_ref::<Float64Array>().unwrap();
            a.iter().map(read).collect()
        }
        DataType::Int64 => {
            let a = column.as_any().downcast_ref::<Int64Array>().unwrap();
            a.iter().map(|v| read(v.map(|v| v as f64))).collect()
        }
        other => {
            return Err(GuestError::new(format!(
                "column `{name}` is {other}, not a number"
            )));
        }
    })
}

/// Scores one batch of feature rows: the whole model, the same natively and in the sandbox.
pub fn score_batch(input: &RecordBatch) -> Result<RecordBatch, GuestError> {
    let codes = input
        .column_by_name("credit_code")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| GuestError::new("input lacks a Utf8 `credit_code` column"))?;
    let column = |name| numbers(input, name);
    let (revenue_recent, revenue_prior, vat_recent) = (
        column("revenue_recent")?,
        column("revenue_prior")?,
        column("vat_recent")?,
    );
    let (headcount_recent, headcount_prior, arrears_months) = (
        column("headcount_recent")?,
        column("headcount_prior")?,
        column("arrears_months")?,
    );
    let (covered_recent, defendant_cases, dishonest, penalties) = (
        column("covered_recent")?,
        column("defendant_cases")?,
        column("dishonest")?,
        column("penalties")?,
    );
    let rows = input.num_rows();
    // Every column cut to `rows` up front, so the loop below indexes without bounds checks.
    let (revenue_recent, revenue_prior, vat_recent) = (
        &revenue_recent[..rows],
        &revenue_prior[..rows],
        &vat_recent[..rows],
    );
    let (headcount_recent, headcount_prior, arrears_months) = (
        &headcount_recent[..rows],
        &headcount_prior[..rows],
        &arrears_months[..rows],
    );
    let (covered_recent, defendant_cases, dishonest, penalties) = (
        &covered_recent[..rows],
        &defendant_cases[..rows],
        &dishonest[..rows],
        &penalties[..rows],
    );
    let mut scores = Vec::with_capacity(rows);
    let mut grades = Vec::with_capacity(rows);
    for i in 0..rows {
        let s = score(&Features {
            revenue_recent: revenue_recent[i],
            revenue_prior: revenue_prior[i],
            vat_recent: vat_recent[i],
            headcount_recent: headcount_recent[i],
            headcount_prior: headcount_prior[i],
            arrears_months: arrears_months[i],
            covered_recent: covered_recent[i],
            defendant_cases: defendant_cases[i],
            dishonest: dishonest[i],
            penalties: penalties[i],
        });
        scores.push(s);
        grades.push(grade(s));
    }
    let keys: ArrayRef = if codes.null_count() == 0 {
        Arc::new(codes.clone())
    } else {
        return Err(GuestError::new("null credit_code in the input"));
    };
    batch(vec![
        ("credit_code", keys),
        ("score", Arc::new(Int64Array::from(scores)) as ArrayRef),
        ("grade", Arc::new(StringArray::from(grades)) as ArrayRef),
    ])
}

/// The job: score every input batch and emit the scores.
fn job(_params: &[u8]) -> Result<(), GuestError> {
    let mut enterprises = 0usize;
    for input in sandbox_guest::input() {
        let input = input?;
        enterprises += input.num_rows();
        sandbox_guest::emit(&score_batch(&input)?)?;
    }
    sandbox_guest::log(&format!("scored {enterprises} enterprises"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Features {
        Features {
            revenue_recent: 5_000_000.0,
            revenue_prior: 4_000_000.0,
            vat_recent: 300_000.0,
            headcount_recent: 40.0,
            headcount_prior: 35.0,
            arrears_months: 0.0,
            covered_recent: 38.0,
            defendant_cases: 0.0,
            dishonest: 0.0,
            penalties: 0.0,
        }
    }

    #[test]
    fn ln_matches_the_platform_closely() {
        let mut x = 1e-310;
        while x < 1e300 {
            let (ours, std) = (ln(x), x.ln());
            assert!(
                (ours - std).abs() <= 1e-12 * std.abs().max(1.0),
                "{x}: {ours} vs {std}"
            );
            x *= 1.37;
        }
        for x in [1.0, 2.0, 0.5, std::f64::consts::E, 1e6, 123_456.789] {
            assert!((ln(x) - x.ln()).abs() < 1e-13, "{x}");
        }
        assert_eq!(ln(1.0), 0.0);
        assert!(ln(-1.0).is_nan() && ln(f64::NAN).is_nan());
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
    }

    #[test]
    fn risk_signals_lower_the_score() {
        let base = score(&healthy());
        let signals: [fn(&mut Features); 5] = [
            |f| f.dishonest = 1.0,
            |f| f.arrears_months = 6.0,
            |f| f.revenue_recent = 1_000_000.0,
            |f| f.defendant_cases = 3.0,
            |f| f.covered_recent = 0.0,
        ];
        for signal in signals {
            let mut f = healthy();
            signal(&mut f);
            assert!(score(&f) < base, "{f:?}");
        }
        assert!((0..=1000).contains(&base));
        assert_eq!(grade(base), "A");
    }

    #[test]
    fn scores_are_bounded_for_extreme_inputs() {
        for f in [
            Features::default(),
            Features {
                dishonest: 1.0,
                arrears_months: 12.0,
                defendant_cases: 1e9,
                penalties: 1e9,
                ..Features::default()
            },
            Features {
                revenue_recent: f64::NAN,
                ..healthy()
            },
            Features {
                revenue_recent: f64::INFINITY,
                ..healthy()
            },
        ] {
            assert!((0..=1000).contains(&score(&f)), "{f:?}");
        }
    }
}

//! Linear reconstruction (class 24): many answers to random subset questions, solved by least
//! squares for every enterprise's value at once (Dinur and Nissim, 2003). Against ad-hoc grants
//! (exact or under differential privacy) and against an approved template run over every value
//! of its parameter.

use std::collections::BTreeMap;

use crate::harness::{Harness, Verdict};

/// A small deterministic generator (xorshift64*) for the random subsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Least squares by the normal equations, Gaussian elimination with partial pivoting; `None`
/// when the system is singular.
fn least_squares(rows: &[Vec<f64>], answers: &[f64]) -> Option<Vec<f64>> {
    let n = rows.first()?.len();
    let mut m = vec![vec![0.0f64; n + 1]; n];
    for (row, answer) in rows.iter().zip(answers) {
        for i in 0..n {
            if row[i] == 0.0 {
                continue;
            }
            for j in 0..n {
                m[i][j] += row[i] * row[j];
            }
            m[i][n] += row[i] * answer;
        }
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|a, b| m[*a][col].abs().total_cmp(&m[*b][col].abs()))?;
        m.swap(col, pivot);
        let p = m[col][col];
        if p.abs() < 1e-9 {
            return None;
        }
        let pivot_row = m[col].clone();
        for (r, values) in m.iter_mut().enumerate() {
            let factor = values[col] / p;
            if r != col && factor != 0.0 {
                for (value, pivot_value) in values[col..].iter_mut().zip(&pivot_row[col..]) {
                    *value -= factor * pivot_value;
                }
            }
        }
    }
    Some((0..n).map(|i| m[i][n] / m[i][i]).collect())
}

pub async fn play(h: &mut Harness) {
    against_ad_hoc(h).await;
    if h.profile == crate::harness::Profile::Demo {
        against_template(h).await;
    }
}

/// The registered capital of every enterprise of one city, from random unions of their public
/// combinations (industry, size, status, year).
async fn against_ad_hoc(h: &mut Harness) {
    let city = h.vars["city"].clone();
    let cells = h
        .truth
        .rows(&format!(
            "SELECT industry, size_class, status, substr(CAST(established AS VARCHAR), 1, 4), \
                    SUM(registered_capital), COUNT(*) \
             FROM enterprises WHERE city = '{city}' GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"
        ))
        .await;
    let cap = if h.full { 120 } else { 60 };
    let cells: Vec<&Vec<String>> = cells.iter().take(cap).collect();
    let n = cells.len();
    let mut rng = Rng(0x5eed_0024_0000_0001);
    let queries = 2 * n;
    let mut rows = Vec::new();
    let mut answers = Vec::new();
    let mut refused = BTreeMap::<String, usize>::new();
    for _ in 0..queries {
        let chosen: Vec<usize> = (0..n).filter(|_| rng.next() >> 63 == 1).collect();
        if chosen.len() < 12 {
            continue;
        }
        let disjunction: Vec<String> = chosen
            .iter()
            .map(|&i| {
                let c = cells[i];
                format!(
                    "(industry = '{}' AND size_class = '{}' AND status = '{}' AND established = '{}')",
                    c[0], c[1], c[2], c[3]
                )
            })
            .collect();
        let sql = format!(
            "SELECT SUM(registered_capital) AS v FROM enterprises WHERE city = '{city}' AND ({})",
            disjunction.join(" OR ")
        );
        match h.sql("analyst", &sql).await {
            Ok(answer) => match answer.value("v") {
                Some(v) => {
                    let mut row = vec![0.0; n];
                    for &i in &chosen {
                        row[i] = 1.0;
                    }
                    rows.push(row);
                    answers.push(v);
                }
                None => *refused.entry("withheld".into()).or_default() += 1,
            },
            Err(rule) => *refused.entry(rule).or_default() += 1,
        }
    }
    let singles: Vec<(usize, f64)> = cells
        .iter()
        .enumerate()
        .filter(|(_, c)| c[5] == "1")
        .map(|(i, c)| (i, c[4].parse().expect("capital")))
        .collect();
    let verdict = match (rows.len() >= n)
        .then(|| least_squares(&rows, &answers))
        .flatten()
    {
        Some(estimate) => {
            let exact = singles
                .iter()
                .filter(|(i, truth)| (estimate[*i] - truth).abs() <= 0.5)
                .count();
            if exact > 0 {
                Verdict::Leak {
                    recovered: format!(
                        "the exact capital of {exact} of {} lone enterprises ({} answers)",
                        singles.len(),
                        rows.len()
                    ),
                    truth: format!("{n} combinations in {city}"),
                }
            } else {
                Verdict::Safe(format!(
                    "{} answers, no exact value; refused {refused:?}",
                    rows.len()
                ))
            }
        }
        None => Verdict::Safe(format!(
            "{} answers for {n} unknowns; refused {refused:?}",
            rows.len()
        )),
    };
    let verdict = h.as_exact_limit(verdict);
    h.record(
        24,
        "least squares over random subsets of one city's enterprises (analyst)",
        verdict,
    );
}

/// The bank's approved aggregate template over every value of its `since` parameter: each
/// group's monthly sums of amounts in dispute by differences, and with them the amount of every
/// case that was alone in its group and month.
async fn against_template(h: &mut Harness) {
    let months: Vec<String> = h
        .truth
        .rows("SELECT DISTINCT filed_month FROM court_cases ORDER BY 1")
        .await
        .into_iter()
        .map(|r| r[0].clone())
        .collect();
    let mut bank = h.client("bank").await;
    // Per (industry, prefecture): the total amount of cases filed since each month.
    let mut since: BTreeMap<(String, String), BTreeMap<String, f64>> = BTreeMap::new();
    let mut refused = 0;
    for month in &months {
        h.sent += 1;
        match bank
            .template(
                "industry_region_risk",
                BTreeMap::from([("since".to_string(), month.clone())]),
            )
            .await
        {
            Ok(result) => {
                for row in result.batches.iter().flat_map(crate::harness::rows_of) {
                    let (Some(industry), Some(prefecture), Some(cases), Some(avg)) = (
                        row.get("industry").map(|c| c.text()),
                        row.get("prefecture").map(|c| c.text()),
                        row.get("cases").and_then(|c| c.num()),
                        row.get("avg_amount_in_dispute").and_then(|c| c.num()),
                    ) else {
                        continue;
                    };
                    since
                        .entry((industry, prefecture))
                        .or_default()
                        .insert(month.clone(), cases * avg);
                }
            }
            Err(_) => refused += 1,
        }
    }
    let lone = h
        .truth
        .rows(
            "SELECT e.industry, substr(e.region_code, 1, 4), c.filed_month, MIN(c.amount) \
             FROM court_cases c JOIN enterprises e ON e.credit_code = c.credit_code \
             GROUP BY 1, 2, 3 HAVING COUNT(*) = 1",
        )
        .await;
    let mut exact = 0;
    for row in &lone {
        let [industry, prefecture, month, amount] = &row[..] else {
            continue;
        };
        let Some(series) = since
            .iter()
            .find(|((i, p), _)| i == industry && p.starts_with(prefecture.as_str()))
            .map(|(_, s)| s)
        else {
            continue;
        };
        let next = months.iter().find(|m| *m > month);
        let (Some(from), Some(after)) = (
            series.get(month),
            next.map_or(Some(&0.0), |n| series.get(n)),
        ) else {
            continue;
        };
        let amount: f64 = amount.parse().expect("amount");
        if (from - after - amount).abs() <= 1.0 {
            exact += 1;
        }
    }
    let verdict = if exact > 0 {
        Verdict::Leak {
            recovered: format!("the amount (L4) of {exact} lone cases"),
            truth: format!("{} group-months with a single case", lone.len()),
        }
    } else {
        Verdict::Safe(format!(
            "{} windows answered, {refused} refused; no lone case recovered",
            months.len() - refused
        ))
    };
    h.record(
        24,
        "an approved template run over every value of its parameter (bank)",
        verdict,
    );
}

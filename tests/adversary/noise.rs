//! Attacks on differential privacy: repeating and rephrasing a noisy question to average the
//! noise away (class 7), and doing so from several organisations at once (class 29). Noise never
//! gives an exact value; what these attacks break, when they do, is the budget the data owner
//! set: more independent answers than the owner's total allows, each enterprise losing more
//! privacy than any ledger shows.

use crate::harness::{Harness, Verdict};

/// Rephrasings of one question about the court's data (L4 amounts: differential privacy only).
/// Each is a different plan, so each would get fresh noise if nothing tied them together.
const REPHRASINGS: &[&str] = &[
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND 1 = 1",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type IN ('contract')",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND role <> 'nobody'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND status <> 'nobody'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND filed_month >= '1900-01'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND filed_month <= '2999-12'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE 'contract' = case_type",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND case_type <> 'x'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND role IN ('plaintiff', 'defendant')",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND status IN ('pending', 'closed', 'enforcement')",
    "SELECT COUNT(*) AS v FROM court_cases c WHERE c.case_type = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE lower(case_type) = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE upper(case_type) = 'CONTRACT'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type LIKE 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type LIKE 'contr%'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE substr(case_type, 1, 8) = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND dishonest_debtor IN (true, false)",
    "SELECT COUNT(*) AS v FROM court_cases WHERE NOT (case_type <> 'contract')",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' OR case_type = 'no such type'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type BETWEEN 'contract' AND 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND filed_month IS NOT NULL",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND role IS NOT NULL",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type = 'contract' AND status IS NOT NULL",
    "SELECT COUNT(*) AS v FROM court_cases WHERE coalesce(case_type, '') = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE btrim(case_type) = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE left(case_type, 8) = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE case_type || '' = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE character_length(case_type) = 8 AND case_type = 'contract'",
    "SELECT COUNT(*) AS v FROM court_cases WHERE starts_with(case_type, 'contract')",
];

/// What the court wrote as the most any enterprise may lose on its data: a total over every
/// consumer where the policy sets one, else the per-consumer budget of its grants (which an owner
/// reads as the bound).
fn owner_total() -> f64 {
    let text = std::fs::read_to_string(sandbox_tests::policies_dir().join("court.toml"))
        .expect("court policy");
    let policy: toml::Value = toml::from_str(&text).expect("court policy parses");
    let dataset = &policy["dataset"][0];
    if let Some(total) = dataset
        .get("dp")
        .and_then(|dp| dp.get("total_epsilon"))
        .and_then(toml::Value::as_float)
    {
        return total;
    }
    policy["grant"]
        .as_array()
        .expect("grants")
        .iter()
        .filter_map(|g| {
            g.get("aggregate")?
                .get("dp")?
                .get("budget_epsilon")?
                .as_float()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Asks every rephrasing, twice, as each of `who`, until refused: the distinct noisy answers
/// and the epsilon they cost.
async fn harvest(h: &mut Harness, who: &[&str]) -> (Vec<f64>, f64) {
    let mut answers = Vec::new();
    let mut spent = 0.0;
    for principal in who {
        for sql in REPHRASINGS.iter().flat_map(|s| [*s, *s]) {
            match h.dp_sql(principal, sql).await {
                Ok(answer) => {
                    if let Some(dp) = answer.summary.as_ref().and_then(|s| s.dp.as_ref()) {
                        spent += dp.epsilon_spent;
                    }
                    if let Some(value) = answer.value("v")
                        && !answers.contains(&value)
                    {
                        answers.push(value);
                    }
                }
                Err(_) => continue,
            }
        }
    }
    (answers, spent)
}

pub async fn play(h: &mut Harness) {
    let truth = h
        .truth
        .value("SELECT COUNT(*) FROM court_cases WHERE case_type = 'contract'")
        .await;
    let total = owner_total();
    let (mut answers, mut spent) = harvest(h, &["analyst"]).await;
    judge(
        h,
        7,
        "the same noisy question repeated and rephrased by one org",
        &answers,
        spent,
        truth,
        total,
    );
    let (theirs, theirs_spent) = harvest(h, &["bank"]).await;
    for value in theirs {
        if !answers.contains(&value) {
            answers.push(value);
        }
    }
    spent += theirs_spent;
    judge(
        h,
        29,
        "the same noisy question from two orgs, averaged",
        &answers,
        spent,
        truth,
        total,
    );
}

fn judge(
    h: &mut Harness,
    class: u8,
    name: &str,
    answers: &[f64],
    spent: f64,
    truth: f64,
    total: f64,
) {
    let average = answers.iter().sum::<f64>() / answers.len().max(1) as f64;
    let verdict = if spent > total * (1.0 + 1e-9) {
        Verdict::Leak {
            recovered: format!(
                "{} independent answers averaging {average:.2} (error {:.2}) for epsilon {spent:.2}",
                answers.len(),
                (average - truth).abs()
            ),
            truth: format!("{truth}; the owner allows epsilon {total} in all"),
        }
    } else {
        Verdict::Safe(format!(
            "{} independent answers, epsilon {spent:.2} of the owner's {total}; average off by {:.2}",
            answers.len(),
            (average - truth).abs()
        ))
    };
    h.record(class, name, verdict);
}

//! Attacks that read one bit per query and binary-search a hidden value with it: data-dependent
//! errors (classes 9 and 20) and the figures of the release summary (class 25).

use crate::harness::{Harness, Profile, Verdict, Via};

/// The registered capital of the demo stays below this (CNY).
const CAPITAL_HIGH: f64 = 4_000_000_000.0;

/// What one answer says, as a bit.
#[derive(Debug, Clone, Copy)]
enum Bit {
    /// The query failed (an error that is not a policy refusal).
    Fails(&'static str, Via),
    /// A group was suppressed or released (it exists).
    Exists,
    /// The only row was withheld (differencing) or the summary says so.
    Withheld,
    /// `rows_scanned` equals the first figure (true) or the second (false).
    Scanned(u64, u64),
}

async fn bit(h: &mut Harness, kind: Bit, sql: &str) -> Result<bool, String> {
    match kind {
        Bit::Fails(who, via) => match h.query(who, via, sql).await {
            Ok(_) => Ok(false),
            Err(rule) if rule.contains("execution-failed") || rule.starts_with("Internal") => {
                Ok(true)
            }
            // A refusal decided before any data is read carries no bit.
            Err(rule) => Err(format!("refused: {rule}")),
        },
        Bit::Exists => {
            let answer = h
                .sql("analyst", sql)
                .await
                .map_err(|r| format!("refused: {r}"))?;
            let summary = answer.summary.clone().unwrap_or_default();
            Ok(summary.rows_suppressed > 0 || !answer.rows.is_empty())
        }
        Bit::Withheld => {
            let answer = h
                .sql("analyst", sql)
                .await
                .map_err(|r| format!("refused: {r}"))?;
            let summary = answer.summary.clone().unwrap_or_default();
            Ok(summary.rows_differencing > 0 || answer.rows.is_empty())
        }
        Bit::Scanned(full, none) => {
            let answer = h
                .sql("analyst", sql)
                .await
                .map_err(|r| format!("refused: {r}"))?;
            match answer.summary.as_ref().map_or(0, |s| s.rows_scanned) {
                scanned if scanned == full => Ok(true),
                scanned if scanned == none => Ok(false),
                _ => Err("rows_scanned took a third value".into()),
            }
        }
    }
}

/// Binary search over `[low, high)` for the largest `k` where the bit of `template` (with `{k}`
/// replaced) is true, in whole units; an error once the oracle stops answering a bit.
async fn search(
    h: &mut Harness,
    mut low: f64,
    mut high: f64,
    template: &str,
    kind: Bit,
) -> Result<f64, String> {
    let ask = |k: f64| template.replace("{k}", &format!("{k:.0}"));
    // The oracle must tell both ends apart, or it says nothing.
    if !bit(h, kind, &ask(low)).await? || bit(h, kind, &ask(high)).await? {
        return Err("the oracle does not separate the ends of the range".into());
    }
    while high - low > 1.0 {
        let mid = ((low + high) / 2.0).floor();
        if bit(h, kind, &ask(mid)).await? {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(low)
}

pub async fn play(h: &mut Harness) {
    let capital = h
        .truth
        .value(&h.fill("SELECT registered_capital FROM enterprises WHERE credit_code = '{cc}'"))
        .await;
    let analyst = Bit::Fails("analyst", Via::Native);

    // 20. A wrapping multiply to i64::MIN, then a checked division by -1: fails only when the
    // suppressed one-enterprise group's capital is at least k.
    let overflow = "((TRY_CAST(SUM(registered_capital) AS BIGINT) + 4611686018427387904 - {k}) \
                    / 4611686018427387904) * (-9223372036854775807 - 1) / -1";
    for (name, shape, kind) in [
        (
            "projection over a suppressed group",
            format!(
                "SELECT COUNT(*) AS n, {overflow} AS o FROM enterprises WHERE {{T}} GROUP BY city"
            ),
            analyst,
        ),
        (
            "HAVING over a suppressed group",
            format!(
                "SELECT city, COUNT(*) AS n FROM enterprises WHERE {{T}} GROUP BY city HAVING {overflow} = 0"
            ),
            analyst,
        ),
        (
            "ORDER BY over a suppressed group",
            format!(
                "SELECT city, COUNT(*) AS n FROM enterprises WHERE {{T}} GROUP BY city ORDER BY {overflow}"
            ),
            analyst,
        ),
        (
            "projection, as the bank over Flight SQL",
            format!(
                "SELECT COUNT(*) AS n, {overflow} AS o FROM enterprises WHERE {{T}} GROUP BY city"
            ),
            Bit::Fails("bank", Via::Flight),
        ),
    ] {
        let template = h.fill(&shape);
        let recovered = search(h, 0.0, CAPITAL_HIGH, &template, kind).await;
        h.judge(
            20,
            format!("i64::MIN / -1 error oracle, {name}"),
            recovered,
            capital,
            0.5,
        );
    }

    // 20. At row level: `substr` with an extreme literal start fails only when a row reaches it.
    let template = h.fill(
        "SELECT COUNT(*) AS n FROM enterprises WHERE {T} AND registered_capital >= {k} AND substr(city, -9223372036854775808, 3) = 'x'",
    );
    let recovered = search(h, 0.0, CAPITAL_HIGH, &template, analyst).await;
    h.judge(
        20,
        "substr with an extreme start, at row level",
        recovered,
        capital,
        0.5,
    );

    // 9. Division by zero inside CASE, and an error message that could echo a value.
    let template = h.fill(
        "SELECT COUNT(*) AS n FROM enterprises WHERE CASE WHEN ({T}) AND registered_capital >= {k} THEN 1 / 0 = 1 ELSE true END",
    );
    let recovered = search(h, 0.0, CAPITAL_HIGH, &template, analyst).await;
    h.judge(
        9,
        "1/0 inside CASE under the target's filter",
        recovered,
        capital,
        0.5,
    );
    let name = h
        .truth
        .rows(&h.fill("SELECT name FROM enterprises WHERE credit_code = '{cc}'"))
        .await[0][0]
        .clone();
    let sql = h.fill("SELECT COUNT(*) AS n FROM enterprises WHERE {T} AND CAST(name AS INT) = 1");
    let echoed = h.sql("analyst", &sql).await;
    let verdict = match &echoed {
        Err(message) if message.contains(&name) => Verdict::Leak {
            recovered: format!("error text `{message}`"),
            truth: name.clone(),
        },
        Err(message) => Verdict::Safe(format!("refused without the value: {message}")),
        Ok(answer) => Verdict::Safe(format!("answered {} rows", answer.rows.len())),
    };
    h.record(9, "an error message that echoes a raw value", verdict);

    timing(h).await;

    // 25. The summary's figures as oracles. Suppressed rows: the target's group exists above k.
    let template = h.fill(
        "SELECT city, COUNT(*) AS n FROM enterprises WHERE {T} AND registered_capital >= {k} GROUP BY city",
    );
    let recovered = search(h, 0.0, CAPITAL_HIGH, &template, Bit::Exists).await;
    h.judge(
        25,
        "rows_suppressed bisects the target's capital",
        recovered,
        capital,
        0.5,
    );

    // Differencing: after the city's total, the total without the target's band is withheld
    // (one enterprise differs) or released (none does).
    let total =
        h.fill("SELECT SUM(registered_capital) AS v FROM enterprises WHERE city = '{city}'");
    let _ = h.sql("analyst", &total).await;
    let template = h.fill(
        "SELECT SUM(registered_capital) AS v FROM enterprises WHERE city = '{city}' AND NOT (({T}) AND registered_capital >= {k})",
    );
    let recovered = search(h, 0.0, CAPITAL_HIGH, &template, Bit::Withheld).await;
    h.judge(
        25,
        "a withheld row (and rows_differencing) bisects the target's capital",
        recovered,
        capital,
        0.5,
    );

    // Rows scanned: an empty join side skips the other side's scan.
    let template = h.fill(
        "SELECT COUNT(*) AS n FROM tax_monthly t JOIN (SELECT credit_code FROM enterprises WHERE {T} AND registered_capital >= {k}) x ON t.credit_code = x.credit_code",
    );
    let scanned = |answer: &Result<crate::harness::Answer, String>| {
        answer
            .as_ref()
            .ok()
            .and_then(|a| a.summary.as_ref())
            .map(|s| s.rows_scanned)
    };
    let matched = h.sql("analyst", &template.replace("{k}", "0")).await;
    let unmatched = h
        .sql(
            "analyst",
            &template.replace("{k}", &format!("{CAPITAL_HIGH:.0}")),
        )
        .await;
    let recovered = match (scanned(&matched), scanned(&unmatched)) {
        (Some(full), Some(none)) if full != none => {
            search(h, 0.0, CAPITAL_HIGH, &template, Bit::Scanned(full, none)).await
        }
        (Some(_), Some(_)) => Err("rows_scanned does not depend on the match".into()),
        _ => Err(format!(
            "refused: {:?} {:?}",
            matched.as_ref().err(),
            unmatched.as_ref().err()
        )),
    };
    h.judge(
        25,
        "rows_scanned bisects the target's capital",
        recovered,
        capital,
        0.5,
    );
}

/// Class 9: Time: joins whose build side is the target alone, or nothing, depending on a guess
/// about a hidden value. A hash join with an empty build side skips its probe side (and, once
/// drained, still skips hashing it), so the right guess took several times longer (found by two
/// fresh attackers). Each guess is asked three times (a
/// nonce makes each a new question); the attack wins when every time of the right guess exceeds
/// every time of the others. Played on the exact-grants profile, where the queries cost no budget
/// (the plans, and so the times, are the same under differential privacy).
async fn timing(h: &mut Harness) {
    if h.profile != Profile::ExactGrants {
        return;
    }
    let truth =
        h.truth
            .rows(&h.fill(
                "SELECT DISTINCT tax_credit_rating FROM tax_monthly WHERE credit_code = '{cc}'",
            ))
            .await[0][0]
            .clone();
    let ratings = ["A", "B", "M", "C", "D"];
    let mut times: Vec<(String, f64)> = Vec::new();
    for round in 0..3 {
        for rating in ratings {
            let sql = h.fill(&format!(
                "SELECT COUNT(DISTINCT e.credit_code) AS n FROM enterprises e \
                 JOIN tax_monthly t ON t.credit_code = e.credit_code \
                 JOIN social_insurance_monthly s ON s.credit_code = t.credit_code AND s.month = t.month \
                 JOIN housing_fund_monthly h ON h.credit_code = t.credit_code AND h.month = t.month \
                 WHERE {{T:e}} AND t.tax_credit_rating = '{rating}' AND e.city <> 'nonce-{round}'"
            ));
            let started = std::time::Instant::now();
            let answer = h.sql("analyst", &sql).await;
            times.push((rating.to_string(), started.elapsed().as_secs_f64()));
            // A probe that did not run measures nothing: a server whose defenses break the
            // query is not safe, it is broken.
            if let Err(rule) = &answer
                && rule.contains("execution-failed")
            {
                h.record(
                    9,
                    "query time of a join whose build side is the target or nothing",
                    Verdict::Leak {
                        recovered: format!("the probe failed to run: {rule}"),
                        truth: "a join over four departments answers".into(),
                    },
                );
                return;
            }
        }
    }
    let right = times
        .iter()
        .filter(|(r, _)| *r == truth)
        .map(|(_, t)| *t)
        .fold(f64::INFINITY, f64::min);
    let others = times
        .iter()
        .filter(|(r, _)| *r != truth)
        .map(|(_, t)| *t)
        .fold(0.0, f64::max);
    let verdict = if right > others {
        Verdict::Leak {
            recovered: format!(
                "rating {truth}: its queries took at least {right:.3}s, every other guess at most {others:.3}s"
            ),
            truth: format!("rating {truth}"),
        }
    } else {
        Verdict::Safe(format!(
            "the right guess's fastest {right:.3}s, the others' slowest {others:.3}s"
        ))
    };
    h.record(
        9,
        "query time of a join whose build side is the target or nothing",
        verdict,
    );
}

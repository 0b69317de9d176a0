//! The data-driven attacks of `cases.toml`: ask the questions, combine the released numbers as
//! the case says, and judge the result against the raw data.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::harness::{Answer, Harness, Profile, Verdict, Via};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Cases {
    case: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    class: u8,
    name: String,
    #[serde(rename = "as", default = "analyst")]
    principal: String,
    #[serde(default)]
    via: Option<String>,
    #[serde(default)]
    profiles: Option<Vec<String>>,
    queries: Vec<String>,
    /// Who asks each query, in order, when not all are asked by `as` (two orgs pooling answers).
    #[serde(default)]
    askers: Vec<String>,
    #[serde(default)]
    recover: Vec<Term>,
    #[serde(default)]
    shows: bool,
    truth: String,
    #[serde(default = "half")]
    tolerance: f64,
    /// On the exact-grants profile, a recovery is the documented limit of exact answers (a
    /// combination of three or more far-apart answers), not a failed defense.
    #[serde(default)]
    exact_limit: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Term {
    q: usize,
    col: String,
    #[serde(default = "one")]
    coef: f64,
    #[serde(default)]
    key: BTreeMap<String, String>,
    #[serde(default)]
    rows: Option<String>,
}

fn analyst() -> String {
    "analyst".into()
}

fn half() -> f64 {
    0.5
}

fn one() -> f64 {
    1.0
}

pub async fn play(h: &mut Harness) {
    let text = include_str!("cases.toml");
    let cases: Cases = toml::from_str(text).expect("cases.toml parses");
    let profile = match h.profile {
        Profile::Demo => "demo",
        Profile::ExactGrants => "exact",
    };
    for case in cases.case {
        if case
            .profiles
            .as_ref()
            .is_some_and(|p| !p.iter().any(|p| p == profile))
        {
            continue;
        }
        play_case(h, &case).await;
    }
}

async fn play_case(h: &mut Harness, case: &Case) {
    let via = match case.via.as_deref() {
        None | Some("native") => Via::Native,
        Some("flight") => Via::Flight,
        Some(other) => panic!("case `{}`: unknown via `{other}`", case.name),
    };
    let truth_sql = h.fill(&case.truth);
    let truth = h.truth.value(&truth_sql).await;
    let mut answers: Vec<Result<Answer, String>> = Vec::new();
    for (i, query) in case.queries.iter().enumerate() {
        let sql = h.fill(query);
        let asker = case.askers.get(i).unwrap_or(&case.principal);
        answers.push(h.query(asker, via, &sql).await);
    }
    let name = format!("{} ({} via {via:?})", case.name, case.principal);
    if case.shows {
        let shown = answers
            .iter()
            .flatten()
            .any(|a| !a.noisy && a.shows_value(truth));
        let verdict = if shown {
            Verdict::Leak {
                recovered: format!("{truth} shown in a released cell"),
                truth: format!("{truth}"),
            }
        } else {
            Verdict::Safe(summarize(&answers))
        };
        h.record(case.class, name, verdict);
        return;
    }
    let mut recovered = 0.0;
    let mut missing = None;
    for term in &case.recover {
        let answer = match &answers[term.q] {
            Ok(answer) => answer,
            Err(rule) => {
                missing = Some(format!("query {} refused: {rule}", term.q));
                break;
            }
        };
        let value = if term.rows.as_deref() == Some("all") {
            Some(answer.sum(&term.col))
        } else if term.key.is_empty() {
            answer.value(&term.col)
        } else {
            let key: Vec<(String, String)> = term
                .key
                .iter()
                .map(|(k, v)| (k.clone(), h.fill(v)))
                .collect();
            let key: Vec<(&str, &str)> =
                key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            answer.value_where(&term.col, &key)
        };
        match value {
            Some(value) => recovered += term.coef * value,
            None => {
                missing = Some(format!(
                    "query {} released no row or value for `{}`",
                    term.q, term.col
                ));
                break;
            }
        }
    }
    let outcome = match missing {
        Some(why) => Err(why),
        None => Ok(recovered),
    };
    let noisy = case
        .recover
        .iter()
        .any(|term| answers[term.q].as_ref().is_ok_and(|a| a.noisy));
    if noisy {
        h.judge_noisy(case.class, name, outcome, truth);
    } else if case.exact_limit {
        let verdict = crate::harness::verdict(outcome, truth, case.tolerance);
        let verdict = h.as_exact_limit(verdict);
        h.record(case.class, name, verdict);
    } else {
        h.judge(case.class, name, outcome, truth, case.tolerance);
    }
}

/// What the answers were, in a few words: refusals by rule, or how many rows.
fn summarize(answers: &[Result<Answer, String>]) -> String {
    answers
        .iter()
        .map(|a| match a {
            Ok(answer) => format!("{} rows, none the truth", answer.rows.len()),
            Err(rule) => format!("refused: {rule}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

//! Attacks through code jobs and approved SQL: a model the owners approved, fed an input the bank
//! crafts (classes 13 and 26), errors in the input about entities that never consented (20),
//! hostile guests (11, 12), approval drift (14), and approved templates run with parameters that
//! narrow their window (30).

use std::collections::{BTreeMap, HashMap};

use sandbox_proto::v1 as pb;
use sandbox_tests::{Client, manifest, suite_guest};

use crate::harness::{Harness, Verdict, refusal};

/// The honest input the module declares: one bounded feature per enterprise.
const HONEST_INPUT: &str =
    "SELECT credit_code, 500 AS score, 'C' AS grade FROM tax_monthly GROUP BY credit_code";

/// The input the suite's guests declare (they read the tax table's privacy unit).
const SUITE_INPUT: &str = "SELECT credit_code FROM tax_monthly";

/// The columns the scoring module declares: what the owners see and approve.
const MODULE_INPUT: &[&str] = &[
    "tax_monthly.credit_code",
    "tax_monthly.month",
    "tax_monthly.vat_paid",
    "enterprises.credit_code",
    "enterprises.city",
    "enterprises.industry",
    "enterprises.size_class",
    "enterprises.status",
    "enterprises.established",
    "enterprises.registered_capital",
];

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// A scoring model in the simplest form: it passes its input rows through as scores, so its
/// output is exactly the features the input query computes. A real model is a function of its
/// features too; this one makes the channel plain. It declares its input query in a
/// `sandbox.input` section, which is part of the bytes the owners approve.
fn scoring_module() -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "sandbox" "input_next" (func $input_next (result i64)))
  (import "sandbox" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (memory (export "memory") 256)
  (@custom "sandbox.manifest" "{manifest}")
  (@custom "sandbox.input" "{input}")
  (func (export "run") (param i32) (result i32)
    (local $len i32)
    (block $done
      (loop $next
        (local.set $len (i32.wrap_i64 (call $input_next)))
        (br_if $done (i32.lt_s (local.get $len) (i32.const 0)))
        (drop (call $input_read (i32.const 1024) (local.get $len)))
        (drop (call $output_emit (i32.const 1024) (local.get $len)))
        (br $next)))
    (i32.const 0)))"#,
        manifest = wat_bytes(manifest(MODULE_INPUT).as_bytes()),
        input = wat_bytes(HONEST_INPUT.as_bytes()),
    );
    wat::parse_str(text).expect("valid scoring module")
}

/// The bank uploads a module and every owner of what it reads approves it.
async fn approved(
    h: &mut Harness,
    wasm: Vec<u8>,
    owners: &[&str],
    max_runs: u64,
) -> Result<String, String> {
    let mut bank = h.client("bank").await;
    let module = bank.upload_module(wasm).await.map_err(|s| refusal(&s))?;
    for owner in owners {
        let mut client = h.client(owner).await;
        client
            .approve_module(pb::ApproveModuleRequest {
                sha256: module.sha256.clone(),
                max_runs,
                valid_days: 30,
                ..Default::default()
            })
            .await
            .map_err(|s| refusal(&s))?;
    }
    Ok(module.sha256)
}

/// A code job's released scores by credit code.
async fn scores(h: &mut Harness, sha: &str, input: &str) -> Result<HashMap<String, f64>, String> {
    h.sent += 1;
    let mut bank = h.client("bank").await;
    let result = bank
        .run(Client::wasm_spec(sha, input, b"{}"))
        .await
        .map_err(|s| refusal(&s))?;
    let mut out = HashMap::new();
    for batch in &result.batches {
        let codes = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)
            .map_err(|e| e.to_string())?;
        let codes = codes
            .as_any()
            .downcast_ref::<arrow::array::StringArray>()
            .ok_or("no codes")?;
        let values = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Float64)
            .map_err(|e| e.to_string())?;
        let values = values
            .as_any()
            .downcast_ref::<arrow::array::Float64Array>()
            .ok_or("no scores")?;
        for row in 0..batch.num_rows() {
            out.insert(codes.value(row).to_string(), values.value(row));
        }
    }
    Ok(out)
}

/// Whether a code job with this input failed on data (not a refusal decided before it ran).
async fn input_fails(h: &mut Harness, sha: &str, input: &str) -> Result<bool, String> {
    match scores(h, sha, input).await {
        Ok(_) => Ok(false),
        Err(rule) if rule.contains("execution-failed") => Ok(true),
        Err(rule) => Err(format!("refused: {rule}")),
    }
}

pub async fn play(h: &mut Harness) {
    let owners = ["owner_tax", "owner_market"];
    let sha = match approved(h, scoring_module(), &owners, 200).await {
        Ok(sha) => sha,
        Err(rule) => {
            h.record(
                26,
                "the approved scoring module",
                Verdict::Safe(format!("not approved: {rule}")),
            );
            return;
        }
    };

    // 13 / 26. The bank writes the input at run time: three digits of VAT per run.
    let truth: BTreeMap<String, f64> = h
        .truth
        .rows(&h.fill(
            "SELECT t.credit_code, t.vat_paid FROM tax_monthly t JOIN consents c \
             ON c.credit_code = t.credit_code WHERE c.consumer_org = 'bank_demo' \
             AND t.month = '{month}'",
        ))
        .await
        .into_iter()
        .map(|row| (row[0].clone(), row[1].parse().expect("vat")))
        .collect();
    let mut recovered: HashMap<String, f64> = HashMap::new();
    let mut refused = None;
    for (place, divisor) in [(1.0, "1"), (1_000.0, "1000"), (1_000_000.0, "1000000")] {
        let input = h.fill(&format!(
            "SELECT credit_code, (TRY_CAST(vat_paid AS BIGINT) / {divisor}) % 1000 AS score, 'A' AS grade \
             FROM tax_monthly WHERE month = '{{month}}'"
        ));
        match scores(h, &sha, &input).await {
            Ok(digits) => {
                for (code, digit) in digits {
                    *recovered.entry(code).or_default() += digit * place;
                }
            }
            Err(rule) => {
                refused = Some(rule);
                break;
            }
        }
    }
    let exact = truth
        .iter()
        .filter(|(code, vat)| {
            recovered
                .get(*code)
                .is_some_and(|r| (r - **vat).abs() < 0.5)
        })
        .count();
    let verdict = if exact > 0 {
        Verdict::Leak {
            recovered: format!("the exact VAT of {exact} consented enterprises"),
            truth: format!(
                "{} consented enterprises filed in {}",
                truth.len(),
                h.vars["month"]
            ),
        }
    } else {
        Verdict::Safe(refused.unwrap_or_else(|| "no exact value among the scores".into()))
    };
    h.record(
        26,
        "an approved model fed a crafted input: digits of VAT as scores",
        verdict,
    );

    // 20 / 26. The input reads rows of enterprises that never consented, with an error that
    // fires only when the target (no consent) has at least k of capital.
    let capital = h
        .truth
        .value(&h.fill("SELECT registered_capital FROM enterprises WHERE credit_code = '{cc}'"))
        .await;
    let template = h.fill(
        "SELECT credit_code, 1 AS score, 'A' AS grade FROM enterprises WHERE {T} AND registered_capital >= {k} AND substr(city, -9223372036854775808, 3) = 'x'",
    );
    let ask = |k: f64| template.replace("{k}", &format!("{k:.0}"));
    let (mut low, mut high) = (0.0f64, 4_000_000_000.0f64);
    let mut outcome: Result<f64, String> = Ok(0.0);
    match (
        input_fails(h, &sha, &ask(low)).await,
        input_fails(h, &sha, &ask(high)).await,
    ) {
        (Ok(true), Ok(false)) => {
            while high - low > 1.0 {
                let mid = ((low + high) / 2.0).floor();
                match input_fails(h, &sha, &ask(mid)).await {
                    Ok(true) => low = mid,
                    Ok(false) => high = mid,
                    Err(why) => {
                        outcome = Err(why);
                        break;
                    }
                }
            }
            if outcome.is_ok() {
                outcome = Ok(low);
            }
        }
        (Err(why), _) | (_, Err(why)) => outcome = Err(why),
        _ => outcome = Err("the error does not depend on the target".into()),
    }
    h.judge(
        20,
        "a code job's input errs on a non-consented enterprise's capital",
        outcome,
        capital,
        0.5,
    );

    // 11. Runaway guests end at their limits and the service keeps answering.
    for guest in ["infinite_loop", "memory_grow_bomb", "deep_recursion"] {
        let outcome = match approved(h, suite_guest(guest), &["owner_tax"], 5).await {
            Ok(sha) => scores(h, &sha, SUITE_INPUT).await.map(|_| ()),
            Err(rule) => Err(rule),
        };
        let alive = h
            .sql(
                "analyst",
                "SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry",
            )
            .await;
        let verdict = match (&outcome, &alive) {
            (Ok(()), _) => Verdict::Leak {
                recovered: "the guest ran to completion".into(),
                truth: "a runaway guest must be stopped".into(),
            },
            (_, Err(rule)) if rule.contains("Unavailable") || rule.contains("transport") => {
                Verdict::Leak {
                    recovered: format!("the service stopped answering: {rule}"),
                    truth: "other requests are served".into(),
                }
            }
            (Err(rule), _) => Verdict::Safe(format!("stopped: {rule}; the service answers")),
        };
        h.record(11, format!("runaway guest `{guest}`"), verdict);
    }

    // 12. Forbidden imports are refused at upload.
    let mut bank = h.client("bank").await;
    h.sent += 1;
    let verdict = match bank.upload_module(suite_guest("wasi_import")).await {
        Ok(module) => Verdict::Leak {
            recovered: format!("a WASI module was accepted as {}", module.sha256),
            truth: "imports outside the ABI are refused".into(),
        },
        Err(status) => Verdict::Safe(format!("refused: {}", refusal(&status))),
    };
    h.record(12, "a module importing WASI", verdict);

    // 14. A module nobody approved, and one past its runs.
    let mut bank = h.client("bank").await;
    let unapproved = bank
        .upload_module(suite_guest("echo"))
        .await
        .map(|m| m.sha256);
    let ran = match unapproved {
        Ok(sha) => scores(h, &sha, SUITE_INPUT).await.is_ok(),
        Err(_) => false,
    };
    h.record(
        14,
        "running a module no owner approved",
        if ran {
            Verdict::Leak {
                recovered: "the unapproved module ran".into(),
                truth: "only approved modules run".into(),
            }
        } else {
            Verdict::Safe("refused".into())
        },
    );
    let limited = approved(h, suite_guest("trap"), &["owner_tax"], 1).await;
    // The trap guest fails when it runs: a second run that gets as far as the guest (or further)
    // was admitted.
    let extra_run = match limited {
        Ok(sha) => {
            let _ = scores(h, &sha, SUITE_INPUT).await;
            let second = scores(h, &sha, SUITE_INPUT).await;
            matches!(second, Err(ref rule) if rule.starts_with("wasm-")) || second.is_ok()
        }
        Err(_) => false,
    };
    h.record(
        14,
        "a second run of a module approved for one",
        if extra_run {
            Verdict::Leak {
                recovered: "the module ran past its approved runs".into(),
                truth: "max_runs = 1".into(),
            }
        } else {
            Verdict::Safe("refused: runs-exhausted".into())
        },
    );

    templates(h).await;
}

/// Class 30: Approved templates with loose parameters.
async fn templates(h: &mut Harness) {
    // The per-enterprise tax features with a one-month window: one month's VAT of every
    // consented enterprise, within the band's 500 CNY.
    let mut bank = h.client("bank").await;
    h.sent += 1;
    let last = "2024-12";
    let result = bank
        .template(
            "tax_features",
            BTreeMap::from([("since".to_string(), last.to_string())]),
        )
        .await;
    let verdict = match result {
        Err(status) => Verdict::Safe(format!("refused: {}", refusal(&status))),
        Ok(result) => {
            let truth: HashMap<String, f64> = h
                .truth
                .rows(&format!(
                    "SELECT credit_code, vat_paid FROM tax_monthly WHERE month = '{last}'"
                ))
                .await
                .into_iter()
                .map(|r| (r[0].clone(), r[1].parse().expect("vat")))
                .collect();
            let mut within = 0;
            let mut rows = 0;
            for batch in &result.batches {
                let answer_rows = crate::harness::rows_of(batch);
                for row in answer_rows {
                    rows += 1;
                    let code = row.get("credit_code").map(|c| c.text()).unwrap_or_default();
                    let band = row.get("vat_band").and_then(|c| c.num());
                    if let (Some(band), Some(vat)) = (band, truth.get(&code))
                        && (band * 1000.0 - vat).abs() <= 500.0
                        && *vat > 1000.0
                    {
                        within += 1;
                    }
                }
            }
            if within > 0 {
                Verdict::Leak {
                    recovered: format!(
                        "one month's VAT within 500 CNY for {within} of {rows} enterprises"
                    ),
                    truth: format!("their VAT in {last}"),
                }
            } else {
                Verdict::Safe(format!("{rows} rows, no one-month value"))
            }
        }
    };
    h.record(
        30,
        "a scoring template run with a one-month window",
        verdict,
    );

    // The aggregate template over two windows a month apart: their difference is the cases
    // filed in that month; where one case was filed in a group, its amount (an L4 value).
    let lone = h
        .truth
        .rows(
            "WITH cases AS (SELECT e.industry AS i, substr(e.region_code, 1, 4) AS p, \
                                   c.filed_month AS m, c.amount AS a, c.credit_code AS u \
                            FROM court_cases c JOIN enterprises e ON e.credit_code = c.credit_code), \
                  lone AS (SELECT i, p, m, MIN(a) AS a FROM cases GROUP BY i, p, m \
                           HAVING COUNT(*) = 1), \
                  later AS (SELECT l.i, l.p, l.m, l.a, COUNT(DISTINCT x.u) AS n FROM lone l \
                            JOIN cases x ON x.i = l.i AND x.p = l.p AND x.m > l.m \
                            GROUP BY l.i, l.p, l.m, l.a) \
             SELECT i, p, m, a FROM later \
             WHERE n >= 25 AND m >= '2023-02' AND m < '2024-12' \
             ORDER BY m DESC, i, p LIMIT 1",
        )
        .await;
    let Some([industry, prefecture, month, amount]) = lone.first().map(|r| &r[..]) else {
        h.record(
            30,
            "aggregate template windows a month apart",
            Verdict::Safe("no lone case".into()),
        );
        return;
    };
    let next = next_month(month);
    let window = |since: String| {
        let mut bank = bank.clone();
        async move {
            bank.template(
                "industry_region_risk",
                BTreeMap::from([("since".to_string(), since)]),
            )
            .await
        }
    };
    h.sent += 2;
    let (first, second) = (window(month.clone()).await, window(next.clone()).await);
    let recovered = match (first, second) {
        (Ok(a), Ok(b)) => {
            let pick = |r: &sandbox_tests::SqlResult| -> Option<f64> {
                r.batches
                    .iter()
                    .flat_map(crate::harness::rows_of)
                    .find_map(|row| {
                        (row.get("industry")?.text() == *industry
                            && row
                                .get("prefecture")?
                                .text()
                                .starts_with(prefecture.as_str()))
                        .then(|| {
                            Some(
                                row.get("cases")?.num()?
                                    * row.get("avg_amount_in_dispute")?.num()?,
                            )
                        })?
                    })
            };
            match (pick(&a), pick(&b)) {
                (Some(x), Some(y)) => Ok(x - y),
                _ => Err("the group is not released in both windows".into()),
            }
        }
        (Err(s), _) | (_, Err(s)) => Err(format!("refused: {}", refusal(&s))),
    };
    let truth: f64 = amount.parse().expect("amount");
    h.judge(
        30,
        "an aggregate template over two windows a month apart: one case's amount",
        recovered,
        truth,
        1.0,
    );
}

fn next_month(month: &str) -> String {
    let (year, m) = month.split_once('-').expect("YYYY-MM");
    let (year, m): (u32, u32) = (year.parse().expect("year"), m.parse().expect("month"));
    if m == 12 {
        format!("{:04}-01", year + 1)
    } else {
        format!("{year:04}-{:02}", m + 1)
    }
}

//! Policy depth end to end: joins across departments counted by entity, join keys that keep
//! their own entities, per-consumer pseudonyms, and approved SQL templates from submission to
//! run limits.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::AsArray;
use sandbox_tests::{TestServer, rule_of, sorted_rows};

use crate::{raw_engine, raw_rows};

/// Rows of the raw query whose (last two) distinct counts both reach `k`, without those counts:
/// what the gate must release for a join whose unit classes are those columns.
async fn raw_released(
    raw: &datafusion::prelude::SessionContext,
    sql: &str,
    counts: usize,
    k: i64,
) -> (Vec<String>, usize) {
    let rows = raw_rows(raw, sql).await;
    let mut released = Vec::new();
    let mut below = 0;
    for row in rows {
        let cells: Vec<&str> = row.split('|').collect();
        let (kept, units) = cells.split_at(cells.len() - counts);
        if units
            .iter()
            .all(|u| u.parse::<i64>().expect("a count") >= k)
        {
            released.push(kept.join("|"));
        } else {
            below += 1;
        }
    }
    released.sort();
    (released, below)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_count_each_enterprise_once_and_never_copy_rows() {
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut analyst = server.client("analyst").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");

    // Three departments joined on the privacy unit and the month (each side unique on them): an
    // enterprise appears in many joined rows (one per month) but counts once.
    let sandbox = "SELECT e.city, e.industry, COUNT(*) AS n FROM tax_monthly t \
                   JOIN social_insurance_monthly s ON t.credit_code = s.credit_code AND t.month = s.month \
                   JOIN enterprises e ON e.credit_code = t.credit_code GROUP BY e.city, e.industry";
    let truth = "SELECT e.city, e.industry, COUNT(*) AS n, COUNT(DISTINCT t.credit_code) AS u \
                 FROM tax_monthly t JOIN social_insurance_monthly s \
                   ON t.credit_code = s.credit_code AND t.month = s.month \
                 JOIN enterprises e ON e.credit_code = t.credit_code GROUP BY e.city, e.industry";
    let (expected, below) = raw_released(&raw, truth, 1, 10).await;
    let many_rows_few_units = raw_rows(&raw, truth)
        .await
        .iter()
        .filter(|r| {
            let cells: Vec<i64> = r
                .rsplitn(3, '|')
                .take(2)
                .map(|c| c.parse().unwrap())
                .collect();
            cells[1] >= 10 && cells[0] < 10
        })
        .count();
    assert!(
        many_rows_few_units > 0 && below > 0,
        "the data must hold groups with at least 10 joined rows but fewer than 10 enterprises"
    );
    let result = analyst.sql(sandbox).await.expect("allowed");
    let released = sorted_rows(&result.batches);
    assert!(
        released.len() + 1 >= expected.len(),
        "at most one complement withheld"
    );
    assert!(
        released.iter().all(|row| expected.contains(row)),
        "{released:?}"
    );
    let event = auditor
        .events(result.summary.audit_seq, 1, false)
        .await
        .expect("journal");
    assert_eq!(event[0].rows_suppressed as usize, below);

    // Joins that copy rows are refused for exact answers: a side not unique on the join columns
    // repeats the other side's rows (a self-join, a month against every month), and a measure of
    // the register repeats once per month it is joined to.
    for sql in [
        "SELECT COUNT(*) FROM tax_monthly t JOIN social_insurance_monthly s ON t.credit_code = s.credit_code",
        "SELECT SUM(t.vat_paid) FROM tax_monthly t JOIN tax_monthly t2 ON t.credit_code = t2.credit_code",
        "SELECT t.month, SUM(e.registered_capital) FROM tax_monthly t JOIN enterprises e ON t.credit_code = e.credit_code GROUP BY t.month",
    ] {
        let status = analyst.sql(sql).await.expect_err(sql);
        assert_eq!(rule_of(&status), "join-copies-rows", "{sql}");
    }

    // The join key itself is never output, grouped or compared.
    for (sql, rule) in [
        (
            "SELECT counterparty_code, COUNT(*) FROM court_cases GROUP BY counterparty_code",
            "join-key-outside-join",
        ),
        (
            "SELECT COUNT(*) FROM court_cases WHERE counterparty_code = '91450100000000001X'",
            "join-key-outside-join",
        ),
        (
            "SELECT COUNT(*) FROM court_cases c JOIN enterprises e ON c.case_type = e.industry",
            "join-key-not-allowed",
        ),
    ] {
        let status = analyst.sql(sql).await.expect_err(sql);
        assert_eq!(rule_of(&status), rule, "{sql}");
    }
}

/// Through a join key the counterparties are entities of their own: a row needs 10 distinct
/// litigants *and* 10 distinct counterparties. (Court data is L4, so ad-hoc SQL on it is noisy;
/// an approved template answers it exactly.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_keys_keep_their_entities() {
    let server = TestServer::start().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut bank = server.client("bank").await.expect("client");
    let text = r#"
name = "sued_industries"
description = "Cases per industry of the counterparty"
mode = "aggregate"
min_units = 10
sql = "SELECT e.industry, COUNT(*) AS cases FROM court_cases c JOIN enterprises e ON c.counterparty_code = e.credit_code GROUP BY e.industry"
"#;
    let submitted = bank.submit_template(text).await.expect("submitted");
    for owner in ["owner_court", "owner_market"] {
        let mut client = server.client(owner).await.expect("client");
        client
            .approve_template(&submitted.sha256, 5, 30)
            .await
            .expect("approved");
    }
    let truth = "SELECT e.industry, COUNT(*) AS cases, COUNT(DISTINCT c.credit_code) AS a, \
                 COUNT(DISTINCT e.credit_code) AS b FROM court_cases c \
                 JOIN enterprises e ON c.counterparty_code = e.credit_code GROUP BY e.industry";
    let (expected, _) = raw_released(&raw, truth, 2, 10).await;
    let result = bank
        .template("sued_industries", BTreeMap::new())
        .await
        .expect("runs");
    let released = sorted_rows(&result.batches);
    assert!(
        released.len() + 1 >= expected.len(),
        "at most one complement withheld"
    );
    assert!(
        released.iter().all(|row| expected.contains(row)),
        "{released:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_show_only_their_transform() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    // Generalized: the year of establishment; grouping still goes through the threshold.
    let result = analyst
        .sql("SELECT established, COUNT(*) AS n FROM enterprises GROUP BY established")
        .await
        .expect("allowed");
    for row in sorted_rows(&result.batches) {
        let year = row.split('|').next().unwrap();
        assert!(
            year.len() == 4 && year.chars().all(|c| c.is_ascii_digit()),
            "{row}"
        );
    }
    // Partial: only the prefecture digits of the region code.
    let result = analyst
        .sql("SELECT region_code, COUNT(*) AS n FROM enterprises GROUP BY region_code")
        .await
        .expect("allowed");
    assert!(!result.batches.is_empty());
    for row in sorted_rows(&result.batches) {
        let code = row.split('|').next().unwrap();
        assert!(code.len() == 6 && code.ends_with("**"), "{row}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_need_every_owner_run_under_their_own_mode_and_run_out() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    // Renamed, so that the demo's pre-approved `industry_region_risk` does not answer for it.
    let text = include_str!("../../examples/templates/industry_region_risk.toml")
        .replace("\"industry_region_risk\"", "\"risk_journey\"");
    let submitted = bank.submit_template(&text).await.expect("submitted");
    assert_eq!(submitted.state, "pending");
    assert_eq!(submitted.datasets, vec!["court_cases", "enterprises"]);
    let params = BTreeMap::from([("since".to_string(), "2023-01".to_string())]);

    let status = bank
        .template("risk_journey", params.clone())
        .await
        .unwrap_err();
    assert_eq!(rule_of(&status), "template-not-approved");
    // Only an owner of a dataset the template reads may approve it.
    let mut tax = server.client("owner_tax").await.expect("client");
    let status = tax
        .approve_template(&submitted.sha256, 2, 30)
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let mut court = server.client("owner_court").await.expect("client");
    let after_court = court
        .approve_template(&submitted.sha256, 2, 30)
        .await
        .expect("approved");
    assert_eq!(after_court.state, "pending");
    assert!(after_court.reason.contains("market_regulation"));
    let status = bank
        .template("risk_journey", params.clone())
        .await
        .unwrap_err();
    assert_eq!(rule_of(&status), "template-not-approved");
    let mut market = server.client("owner_market").await.expect("client");
    let approved = market
        .approve_template(&submitted.sha256, 5, 30)
        .await
        .expect("approved");
    assert_eq!(approved.state, "approved");
    assert_eq!(approved.runs_left, 2, "the smallest limit of all owners");

    // The L4 amount is noisy in ad-hoc SQL, exact in the approved template, whose own
    // threshold (20) applies.
    let adhoc = "SELECT e.industry, AVG(c.amount) FROM enterprises e \
                 JOIN court_cases c ON e.credit_code = c.credit_code GROUP BY e.industry";
    assert!(bank.sql(adhoc).await.expect("noisy").summary.dp.is_some());
    let result = bank
        .template("risk_journey", params.clone())
        .await
        .expect("runs");
    assert!(result.summary.dp.is_none());
    assert_eq!(result.summary.min_units, 20);
    assert!(result.summary.rows_released > 0);
    for batch in &result.batches {
        let enterprises = batch
            .column_by_name("enterprises")
            .expect("column")
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert!(enterprises.values().iter().all(|n| *n >= 20));
    }
    // Parameters are typed and complete.
    let status = bank
        .template("risk_journey", BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(rule_of(&status), "template-parameters");
    bank.template("risk_journey", params.clone())
        .await
        .expect("second run");
    let status = bank.template("risk_journey", params).await.unwrap_err();
    assert_eq!(rule_of(&status), "runs-exhausted");

    // Another consumer cannot run the bank's template.
    let mut analyst = server.client("analyst").await.expect("client");
    let status = analyst
        .template("risk_journey", BTreeMap::new())
        .await
        .unwrap_err();
    assert_eq!(rule_of(&status), "template-not-approved");

    // Submissions, approvals and runs are in the journal.
    let mut auditor = server.client("auditor").await.expect("client");
    let actions: BTreeMap<String, usize> = auditor
        .events(0, 10_000, false)
        .await
        .expect("events")
        .iter()
        .filter(|e| !e.request_id.starts_with("demo-seed"))
        .fold(BTreeMap::new(), |mut m, e| {
            *m.entry(format!("{}:{}", e.action, e.decision)).or_default() += 1;
            m
        });
    assert_eq!(actions.get("SubmitTemplate:allow"), Some(&1), "{actions:?}");
    assert_eq!(
        actions.get("ApproveTemplate:allow"),
        Some(&2),
        "{actions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_templates_release_only_consented_entities_within_the_contract() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    let text = include_str!("../../examples/templates/tax_features.toml")
        .replace("\"tax_features\"", "\"features_journey\"");
    let submitted = bank.submit_template(&text).await.expect("submitted");
    let mut tax = server.client("owner_tax").await.expect("client");
    tax.approve_template(&submitted.sha256, 10, 30)
        .await
        .expect("approved");
    let result = bank
        .template(
            "features_journey",
            BTreeMap::from([("since".to_string(), "2023-01".to_string())]),
        )
        .await
        .expect("runs");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let consented: BTreeSet<String> = bank
        .consents("")
        .await
        .expect("consents")
        .into_iter()
        .filter(|c| c.purpose == "credit_assessment" && c.expires_at > now && c.granted_at <= now)
        .map(|c| c.unit)
        .collect();
    let mut released = BTreeSet::new();
    for batch in &result.batches {
        let keys = batch.column(0).as_string::<i32>();
        released.extend(keys.iter().flatten().map(str::to_string));
        assert_eq!(batch.num_columns(), 3);
    }
    assert!(!released.is_empty());
    assert!(released.is_subset(&consented), "only consented enterprises");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_templates_are_approved_once_at_first_start() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    let listed = bank.templates().await.expect("templates");
    let names: BTreeSet<&str> = listed.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["industry_region_risk", "tax_features"])
    );
    for template in &listed {
        assert_eq!(template.state, "approved", "{}", template.name);
        assert_eq!(template.submitted_by, "bank");
        assert!(
            template
                .approvals
                .iter()
                .all(|a| a.approved_by == "demo-seed")
        );
    }
    let risk = listed
        .iter()
        .find(|t| t.name == "industry_region_risk")
        .expect("listed");
    let owners: BTreeSet<&str> = risk.approvals.iter().map(|a| a.org.as_str()).collect();
    assert_eq!(owners, BTreeSet::from(["court", "market_regulation"]));
    let params = BTreeMap::from([("since".to_string(), "2023-01".to_string())]);
    let result = bank
        .template("industry_region_risk", params.clone())
        .await
        .expect("the demo template runs");
    assert!(result.summary.rows_released > 0);

    // A restart does not seed again.
    let server = server.restart().await.expect("restart");
    let mut bank = server.client("bank").await.expect("client");
    assert_eq!(bank.templates().await.expect("templates").len(), 2);
    let mut auditor = server.client("auditor").await.expect("client");
    let seeds = auditor
        .events(0, 10_000, false)
        .await
        .expect("events")
        .iter()
        .filter(|e| e.action == "SeedTemplates")
        .count();
    assert_eq!(seeds, 1);
    bank.template("industry_region_risk", params)
        .await
        .expect("still approved after the restart");
}

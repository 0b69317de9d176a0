//! Differential privacy through the real server: ad-hoc SQL on sensitive data answered with noise
//! by default, repeats answered from the cache at no cost (whoever asks), rephrasings paid from
//! durable budgets (per org, and per dataset over every org) until they refuse, renewals only by
//! the owner and on the record, and a debit that survives a stop before the answer was fetched.

use sandbox_proto::v1 as pb;
use sandbox_tests::{Client, TestServer, rule_of};

const L4_QUERY: &str = "SELECT case_type, COUNT(*) AS cases, AVG(amount) AS avg_amount \
                        FROM court_cases GROUP BY case_type ORDER BY case_type";

fn dp(summary: &pb::ReleaseSummary) -> &pb::DpSummary {
    summary
        .dp
        .as_ref()
        .expect("released under differential privacy")
}

async fn court_spent(client: &mut Client) -> (f64, u64, u64) {
    let budgets = client.budgets().await.expect("budgets");
    let court = budgets
        .iter()
        .find(|b| b.org == "analytics" && b.dataset == "court_cases")
        .expect("court budget listed");
    (court.epsilon_spent, court.queries, court.refreshes)
}

#[tokio::test]
async fn l4_measures_are_answered_only_under_dp_and_repeats_cost_nothing() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");

    // The L4 amount: not refused (the grant offers DP), answered with noise.
    let first = analyst.sql(L4_QUERY).await.expect("answered under DP");
    let summary = dp(&first.summary);
    assert!(!summary.cached);
    assert!(summary.epsilon_spent > 0.99 && summary.epsilon_spent <= 1.0 + 1e-9);
    // Grouped by public values (the court's declared kinds of case): every kind shows, in the
    // domain's order sorted by the query, and no delta goes to choosing groups.
    assert_eq!(summary.delta_spent, 0.0);
    let kinds: Vec<String> = sandbox_tests::sorted_rows(&first.batches)
        .iter()
        .map(|row| row.split('|').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "contract",
            "intellectual_property",
            "labor",
            "lease",
            "loan"
        ]
    );
    assert!((summary.epsilon_remaining - (20.0 - summary.epsilon_spent)).abs() < 1e-9);
    assert_eq!(
        first.summary.rows_suppressed, 0,
        "no exact figure of the data"
    );
    assert_eq!(first.summary.rows_scanned, 0, "no exact figure of the data");
    let noisy: Vec<&str> = summary
        .columns
        .iter()
        .filter(|c| c.scale > 0.0)
        .map(|c| c.column.as_str())
        .collect();
    assert_eq!(noisy, ["cases", "avg_amount"]);

    // Asked 200 times, the same query gets the same answer: averaging removes no noise, and
    // the budget is not touched.
    for _ in 0..200 {
        let again = analyst.sql(L4_QUERY).await.expect("cached");
        assert!(dp(&again.summary).cached);
        assert_eq!(dp(&again.summary).epsilon_spent, 0.0);
        assert_eq!(again.summary.result_sha256, first.summary.result_sha256);
    }
    assert_eq!(
        court_spent(&mut analyst).await.1,
        1,
        "one debit for 1,001 answers"
    );
    // Another LIMIT is another question (the gate applies it, so the plan alone does not tell).
    let one = analyst
        .sql(&format!("{L4_QUERY} LIMIT 1"))
        .await
        .expect("limited");
    let two = analyst
        .sql(&format!("{L4_QUERY} LIMIT 2"))
        .await
        .expect("limited");
    assert!(!dp(&one.summary).cached && !dp(&two.summary).cached);
    assert!(one.summary.rows_released <= 1 && two.summary.rows_released <= 2);

    // Every ad-hoc question on court data is noisy (an L4 dataset), counts included; a smaller
    // epsilon on request.
    let count = analyst
        .sql("SELECT case_type, COUNT(*) AS n FROM court_cases GROUP BY case_type")
        .await
        .expect("noisy");
    assert!(count.summary.dp.is_some());
    assert_eq!(count.summary.min_units, 0);
    let requested = analyst
        .run(Client::dp_spec(
            "SELECT case_type, COUNT(*) AS n FROM court_cases GROUP BY case_type",
            Some(0.25),
        ))
        .await
        .expect("DP on request");
    assert!((dp(&requested.summary).epsilon_spent - 0.25).abs() < 1e-9);

    // Refused, not clamped: more epsilon than the grant allows, or less than a tenth of it (a
    // near-free query would show its duration and refusals thousands of times over); MIN under
    // DP; no bounds.
    for epsilon in [5.0, 0.05, 1e-6] {
        let status = analyst
            .run(Client::dp_spec(L4_QUERY, Some(epsilon)))
            .await
            .unwrap_err();
        assert_eq!(rule_of(&status), "dp-epsilon-not-allowed", "{epsilon}");
    }
    for (sql, rule) in [
        (
            "SELECT MAX(amount) FROM court_cases",
            "function-not-allowed",
        ),
        (
            "SELECT COUNT(DISTINCT case_type) FROM court_cases",
            "dp-not-supported",
        ),
        (
            "SELECT case_type, AVG(amount) AS a FROM court_cases GROUP BY case_type ORDER BY a",
            "dp-not-supported",
        ),
        (
            "SELECT case_type, AVG(amount) FROM court_cases GROUP BY case_type HAVING COUNT(*) > 5",
            "dp-not-supported",
        ),
        // A join through the counterparty's key: two entities per row, not one unit.
        (
            "SELECT e.industry, COUNT(*) FROM court_cases c JOIN enterprises e \
             ON c.counterparty_code = e.credit_code GROUP BY e.industry",
            "dp-not-supported",
        ),
    ] {
        let status = analyst.run(Client::dp_spec(sql, None)).await.unwrap_err();
        assert_eq!(rule_of(&status), rule, "{sql}");
    }
}

#[tokio::test]
async fn rephrasings_spend_the_budget_until_it_refuses_and_only_the_owner_renews_it() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    // Each rephrasing (another alias) is a new query: the cache does not cover it, the budget
    // pays. 20 of epsilon 1 fit in the budget of 20; the 21st is refused.
    let mut answered = 0;
    let mut refused = None;
    for i in 0..25 {
        let sql =
            format!("SELECT SUM(amount) AS total_{i} FROM court_cases WHERE role = 'defendant'");
        match analyst.sql(&sql).await {
            Ok(result) => {
                answered += 1;
                assert!(!dp(&result.summary).cached);
            }
            Err(status) => {
                refused = Some((i, rule_of(&status)));
                break;
            }
        }
    }
    assert_eq!(answered, 20);
    assert_eq!(refused, Some((20, "budget-exhausted".to_string())));
    let (spent, queries, _) = court_spent(&mut analyst).await;
    assert!(
        (spent - 20.0).abs() < 1e-6 && queries == 20,
        "{spent} {queries}"
    );
    // Cached answers still come (they cost nothing); new ones do not, on any phrasing.
    assert!(
        analyst
            .sql("SELECT SUM(amount) AS total_3 FROM court_cases WHERE role = 'defendant'")
            .await
            .is_ok()
    );
    assert_eq!(
        rule_of(&analyst.sql(L4_QUERY).await.unwrap_err()),
        "budget-exhausted"
    );

    // Only the dataset's owner renews, with a reason, on the record.
    let mut tax = server.client("owner_tax").await.expect("client");
    let status = tax
        .refresh_budget("analytics", "court_cases", "new quarter")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let mut court = server.client("owner_court").await.expect("client");
    let renewed = court
        .refresh_budget("analytics", "court_cases", "new reporting quarter")
        .await
        .expect("renewed");
    assert_eq!((renewed.epsilon_spent, renewed.refreshes), (0.0, 1));
    assert!(analyst.sql(L4_QUERY).await.is_ok());
    let mut auditor = server.client("auditor").await.expect("client");
    let events = auditor.events(0, 10_000, true).await.expect("events");
    let renewal = events
        .iter()
        .find(|e| e.action == "RefreshBudget" && e.decision == "allow")
        .expect("the renewal is journaled");
    assert!(renewal.message.contains("new reporting quarter"));
}

#[tokio::test]
async fn a_debit_survives_a_stop_before_the_answer_is_fetched_and_answers_outlive_restarts() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    // Admitted (the debit is in the durable admission record), never fetched.
    let job = analyst.submit_sql(L4_QUERY).await;
    let job = match job {
        Ok(job) => job,
        Err(status) => panic!("admitted: {status}"),
    };
    assert!(!job.is_empty());
    let server = server.restart().await.expect("restart");
    let mut analyst = server.client("analyst").await.expect("client");
    let (spent, queries, _) = court_spent(&mut analyst).await;
    assert!(
        spent > 0.99 && queries == 1,
        "the debit was refunded: {spent} {queries}"
    );
    // An answer released before a restart is the answer after it: stored, not drawn again.
    let question = "SELECT SUM(amount) AS total FROM court_cases";
    let before = analyst.sql(question).await.expect("answered");
    assert!(!dp(&before.summary).cached);
    let server = server.restart().await.expect("restart");
    let mut analyst = server.client("analyst").await.expect("client");
    let after = analyst.sql(question).await.expect("answered");
    assert!(dp(&after.summary).cached, "the stored answer is reused");
    assert_eq!(after.summary.result_sha256, before.summary.result_sha256);
    assert_eq!(
        court_spent(&mut analyst).await.1,
        2,
        "two questions paid, one repeat free"
    );
}

#[tokio::test]
async fn the_differencing_memory_survives_a_restart_and_is_journaled() {
    // An owner's exact grant: the differencing defense guards exact answers.
    let server = TestServer::start_exact().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let medium = "SELECT COUNT(*) AS n, SUM(registered_capital) AS capital FROM enterprises \
                  WHERE size_class = 'medium'";
    let first = analyst.sql(medium).await.expect("released");
    assert_eq!(first.summary.rows_released, 1);
    let server = server.restart().await.expect("restart");
    let mut analyst = server.client("analyst").await.expect("client");
    // Without the two suspended medium enterprises: the difference would be theirs.
    let second = analyst
        .sql(&format!("{medium} AND status = 'active'"))
        .await
        .expect("answered, with the row withheld");
    assert_eq!(second.summary.rows_released, 0);
    // The same question as before: its stored answer again.
    assert_eq!(
        analyst
            .sql(medium)
            .await
            .expect("released")
            .summary
            .rows_released,
        1
    );
    let mut auditor = server.client("auditor").await.expect("client");
    let events = auditor.events(0, 10_000, true).await.expect("events");
    let withheld = events
        .iter()
        .find(|e| e.job_id == second.job_id && e.action == "SubmitJob")
        .expect("the job's terminal event");
    assert!(
        withheld.message.contains("differencing"),
        "{}",
        withheld.message
    );
}

/// The demo as shipped: ad-hoc SQL on L3 data is answered with noise by default, the same
/// question gets the same answer from every org at no cost, and the dataset's total bounds what
/// all orgs together spend (THREATS class 29: a second org brings no second budget).
#[tokio::test]
async fn l3_data_is_noisy_by_default_and_budgets_hold_across_orgs() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let mut bank = server.client("bank").await.expect("client");
    let question = "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class";
    let first = analyst.sql(question).await.expect("noisy");
    assert!(!dp(&first.summary).cached);
    let other_org = bank.sql(question).await.expect("the same answer");
    assert!(
        dp(&other_org.summary).cached,
        "another org gets the stored answer"
    );
    assert_eq!(dp(&other_org.summary).epsilon_spent, 0.0);
    assert_eq!(other_org.summary.result_sha256, first.summary.result_sha256);

    // Court data: 20 per org, 30 over every org. The analyst spends its 20; the bank then gets
    // 10 before the total refuses it, with its own budget half spent.
    let mut spent = 0.0;
    for i in 0..40 {
        let sql = format!(
            "SELECT COUNT(*) AS n FROM court_cases WHERE filed_month >= '{:04}-01'",
            1990 + i
        );
        match analyst.sql(&sql).await {
            Ok(result) => spent += dp(&result.summary).epsilon_spent,
            Err(status) => {
                assert_eq!(rule_of(&status), "budget-exhausted");
                break;
            }
        }
    }
    assert!((spent - 20.0).abs() < 1e-6, "{spent}");
    let mut bank_spent = 0.0;
    let mut refusal = String::new();
    for i in 0..40 {
        let sql = format!(
            "SELECT COUNT(*) AS n FROM court_cases WHERE filed_month >= '{:04}-02'",
            1990 + i
        );
        match bank.sql(&sql).await {
            Ok(result) => bank_spent += dp(&result.summary).epsilon_spent,
            Err(status) => {
                assert_eq!(rule_of(&status), "budget-exhausted");
                refusal = status.message().to_string();
                break;
            }
        }
    }
    assert!((bank_spent - 10.0).abs() < 1e-6, "{bank_spent}");
    assert!(refusal.contains("every consumer"), "{refusal}");
    // The owner sees the total and what each org spent.
    let mut court = server.client("owner_court").await.expect("client");
    let budgets = court.budgets().await.expect("budgets");
    let total = budgets
        .iter()
        .find(|b| b.org == "*" && b.dataset == "court_cases")
        .expect("the total is listed");
    assert!((total.epsilon_spent - 30.0).abs() < 1e-6);
}

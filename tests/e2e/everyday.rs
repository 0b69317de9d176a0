//! The everyday calls: who one is (`WhoAmI`), the grants one may see (`ListGrants`), owners'
//! view of budgets, consents with their status, a template's parameter domains and the owners it
//! awaits, refused template parameters, and audit SQL syntax errors, through the real client.

use std::collections::BTreeMap;

use sandbox_proto::v1 as pb;
use sandbox_tests::{TestServer, rule_of};
use tonic::Code;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_am_i_grants_and_budgets_follow_the_caller() {
    let server = TestServer::start().await.expect("server");

    // Each principal, as the server sees it: (login, org, roles, may call, may not call, owns).
    type Case<'a> = (
        &'a str,
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
        &'a [&'a str],
    );
    let cases: [Case; 4] = [
        (
            "bank",
            "bank_demo",
            &["consumer"],
            &["SubmitJob", "UploadModule", "WhoAmI", "ListGrants"],
            &["ApproveModule", "ListEvents", "AddConsent"],
            &[],
        ),
        (
            "owner_court",
            "court",
            &["owner"],
            &["ApproveModule", "RefreshBudget", "WhoAmI", "ListGrants"],
            &["SubmitJob", "ListEvents"],
            &["court_cases"],
        ),
        (
            "auditor",
            "audit_office",
            &["auditor"],
            &["ListEvents", "QueryEvents", "WhoAmI", "ListGrants"],
            &["SubmitJob", "ApproveModule"],
            &[],
        ),
        (
            "admin",
            "platform",
            &["admin"],
            &["AddConsent", "WhoAmI"],
            &["ListGrants", "SubmitJob"],
            // The platform's org keeps the consents table.
            &["consents"],
        ),
    ];
    for (login, org, roles, may, may_not, owns) in cases {
        let me = server
            .client(login)
            .await
            .expect("client")
            .who_am_i()
            .await
            .expect("every role may ask");
        assert_eq!((me.principal.as_str(), me.org.as_str()), (login, org));
        assert_eq!(me.roles, roles, "{login}");
        assert_eq!(me.credential, "token", "{login}");
        // The demo's tokens run for a year.
        assert!(
            me.expires_at > now() + 300 * 86_400 && me.expires_at < now() + 400 * 86_400,
            "{login}: {}",
            me.expires_at
        );
        for rpc in may {
            assert!(me.may_call.iter().any(|c| c == rpc), "{login} may {rpc}");
        }
        for rpc in may_not {
            assert!(
                !me.may_call.iter().any(|c| c == rpc),
                "{login} may not {rpc}"
            );
        }
        assert_eq!(me.owns, owns, "{login}");
    }

    // Grants: an owner sees those on its datasets, a consumer its org's, an auditor all.
    let mut court = server.client("owner_court").await.expect("client");
    let on_court = court.grants().await.expect("an owner's grants");
    assert!(
        on_court
            .iter()
            .all(|g| g.dataset == "court_cases" && g.owner == "court")
    );
    let bank_grant = on_court
        .iter()
        .find(|g| g.consumer_org == "bank_demo")
        .expect("the bank's grant on the court's cases");
    assert_eq!(bank_grant.consumer_logins, ["bank"]);
    assert_eq!(bank_grant.modes, ["aggregate", "template", "wasm"]);
    assert_eq!(bank_grant.min_units, 10);
    assert!(!bank_grant.exact, "L4 amounts: differential privacy");
    assert_eq!((bank_grant.epsilon, bank_grant.budget_epsilon), (1.0, 20.0));
    assert!(bank_grant.total_epsilon > 0.0);
    assert!(bank_grant.columns.contains(&"dishonest_debtor".to_string()));
    assert!(
        on_court
            .iter()
            .any(|g| g.consumer_org == "analytics" && g.consumer_logins == ["analyst"])
    );

    let mut bank = server.client("bank").await.expect("client");
    let own = bank.grants().await.expect("a consumer's grants");
    assert!(own.len() > 1);
    assert!(own.iter().all(|g| g.consumer_org == "bank_demo"));
    let mut auditor = server.client("auditor").await.expect("client");
    let all = auditor.grants().await.expect("every grant");
    for grant in own.iter().chain(&on_court) {
        assert!(all.contains(grant), "{grant:?}");
    }
    assert!(all.iter().any(|g| g.consumer_org == "analytics"));
    let mut admin = server.client("admin").await.expect("client");
    let status = admin.grants().await.expect_err("admins see no grants");
    assert_eq!(status.code(), Code::PermissionDenied);

    // Budgets: the owner sees each consumer org's budget on its datasets as the grants set it,
    // before anyone spent, and the dataset's total.
    let budgets = court.budgets().await.expect("an owner's budgets");
    let row = |org: &str| {
        budgets
            .iter()
            .find(|b| b.org == org && b.dataset == "court_cases")
            .unwrap_or_else(|| panic!("a row for {org}: {budgets:#?}"))
            .clone()
    };
    assert_eq!(
        (
            row("bank_demo").epsilon_budget,
            row("bank_demo").delta_budget
        ),
        (Some(20.0), Some(1e-5))
    );
    assert_eq!(row("analytics").epsilon_budget, Some(20.0));
    assert_eq!(
        row("*").epsilon_budget,
        Some(bank_grant.total_epsilon),
        "the dataset's total"
    );
    assert!(budgets.iter().all(|b| b.dataset == "court_cases"));
    let everyone = auditor.budgets().await.expect("an auditor's budgets");
    assert!(
        everyone
            .iter()
            .all(|b| b.epsilon_budget.is_some() && b.delta_budget.is_some()),
        "{everyone:#?}"
    );
    assert!(everyone.iter().any(|b| b.dataset != "court_cases"));

    // Recorded like the other listings.
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    let count = |action: &str, decision: &str| {
        events
            .iter()
            .filter(|e| e.action == action && e.decision == decision)
            .count()
    };
    assert_eq!(count("WhoAmI", "allow"), 4);
    assert_eq!(count("ListGrants", "allow"), 3);
    assert_eq!(count("ListGrants", "permission_denied"), 1);
    assert!(events.iter().any(|e| e.action == "WhoAmI"
        && e.principal == "owner_court"
        && e.datasets == ["court_cases"]));
    server.server.shutdown().await.expect("shutdown");
}

/// A malformed template parameter is refused before anything runs or counts (`InvalidArgument`,
/// naming the parameter, the value and what it must be); a well-formed one outside the approved
/// domain stays the owners' denial. Regression: `--param since=garbage` is refused, not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_parameters_are_checked_before_a_run_counts() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    let runs = |templates: &[pb::Template]| {
        templates
            .iter()
            .find(|t| t.name == "industry_region_risk")
            .expect("the demo template")
            .runs
    };
    let templates = bank.templates().await.expect("templates");
    let risk = templates
        .iter()
        .find(|t| t.name == "industry_region_risk")
        .expect("the demo template");
    assert_eq!(risk.params.len(), 1);
    assert_eq!(risk.params[0].r#type, "month");
    assert_eq!(
        risk.params[0].domain,
        "months from 2023-01 to 2024-10 every 3"
    );
    assert!(risk.awaiting.is_empty(), "approved: it awaits nobody");
    assert_eq!(runs(&templates), 0);

    let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // (parameters, code, words the message must hold)
    let refused: [(BTreeMap<String, String>, Code, &[&str]); 5] = [
        (
            params(&[("since", "garbage")]),
            Code::InvalidArgument,
            &[
                "`since`",
                "`garbage`",
                "a month (YYYY-MM)",
                "months from 2023-01 to 2024-10 every 3",
            ],
        ),
        (
            params(&[("since", "2023-1")]),
            Code::InvalidArgument,
            &["`since`", "`2023-1`", "a month (YYYY-MM)"],
        ),
        (
            params(&[]),
            Code::InvalidArgument,
            &["`since`", "needs a value"],
        ),
        (
            params(&[("since", "2023-01"), ("region", "x")]),
            Code::InvalidArgument,
            &["no parameter `region`"],
        ),
        (
            params(&[("since", "2023-02")]),
            Code::FailedPrecondition,
            &["`since`", "`2023-02`", "outside the domain", "every 3"],
        ),
    ];
    for (values, code, words) in &refused {
        let status = bank
            .template("industry_region_risk", values.clone())
            .await
            .expect_err("refused");
        assert_eq!(status.code(), *code, "{values:?}: {status:?}");
        assert_eq!(rule_of(&status), "template-parameters");
        for word in *words {
            assert!(
                status.message().contains(word),
                "{values:?}: {} lacks {word}",
                status.message()
            );
        }
    }
    assert_eq!(
        runs(&bank.templates().await.expect("templates")),
        0,
        "no refused run is counted"
    );
    bank.template("industry_region_risk", params(&[("since", "2023-01")]))
        .await
        .expect("runs");
    assert_eq!(runs(&bank.templates().await.expect("templates")), 1);

    // Each refusal is journaled, and none was admitted to run.
    let mut auditor = server.client("auditor").await.expect("client");
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    let refusals: Vec<&pb::AuditEvent> = events
        .iter()
        .filter(|e| e.action == "SubmitJob" && e.rule == "template-parameters")
        .collect();
    let decisions: Vec<&str> = refusals.iter().map(|e| e.decision.as_str()).collect();
    assert_eq!(decisions, ["fail", "fail", "fail", "fail", "deny"]);
    let admitted = events
        .iter()
        .filter(|e| e.action == "AdmitJob" && e.kind == "template")
        .count();
    assert_eq!(admitted, 1, "only the run that ran was admitted");
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consents_awaited_owners_and_audit_sql_errors_read_plainly() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");

    // Expired consents stay listed, with their status (the demo has lapsed ones).
    let consents = bank.consents("").await.expect("own consents");
    let status_of = |c: &pb::ConsentRecord| {
        if c.granted_at <= now() && now() < c.expires_at {
            "active"
        } else {
            "expired"
        }
    };
    for consent in &consents {
        assert_eq!(consent.status, status_of(consent), "{consent:?}");
    }
    assert!(consents.iter().any(|c| c.status == "expired"));
    let active = consents
        .iter()
        .find(|c| c.status == "active")
        .expect("an active consent")
        .clone();
    bank.revoke_consent(pb::RevokeConsentRequest {
        unit: active.unit.clone(),
        consumer_org: active.consumer_org.clone(),
        purpose: active.purpose.clone(),
    })
    .await
    .expect("a consumer revokes its own");
    // The journal names the enterprise whose consent was withdrawn.
    let events = auditor.events(0, 20, true).await.expect("journal");
    let revoked = events
        .iter()
        .find(|e| e.action == "RevokeConsent")
        .expect("the revocation");
    assert!(revoked.query.contains(&active.unit), "{revoked:?}");
    assert!(revoked.message.contains(&active.unit), "{revoked:?}");
    let (_, answer) = auditor
        .audit_sql(&format!(
            "SELECT seq FROM events WHERE action = 'RevokeConsent' AND query LIKE '%{}%'",
            active.unit
        ))
        .await
        .expect("audit SQL");
    assert_eq!(answer.rows, 1);

    // A syntax error reads as one.
    let status = auditor
        .audit_sql("SELEC x FROM events")
        .await
        .expect_err("syntax");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains(
            "syntax error: Expected: an SQL statement, found: SELEC at Line: 1, Column: 1"
        ),
        "{}",
        status.message()
    );
    assert!(!status.message().contains("ParserError"));

    // Regression (fresh-attacker round of issue 18): an owner reading a consumer's dataset
    // listing sees its own datasets in it, not every department's granted to that consumer.
    let mut analyst = server.client("analyst").await.expect("client");
    let listed = analyst.datasets().await.expect("datasets");
    assert!(
        listed.len() > 1,
        "the analyst holds grants of several owners"
    );
    let mut owner = server.client("owner_tax").await.expect("client");
    let (batches, answer) = owner
        .audit_sql(
            "SELECT datasets FROM events WHERE action = 'ListDatasets' AND principal = 'analyst'",
        )
        .await
        .expect("audit SQL");
    assert!(answer.rows >= 1);
    for batch in &batches {
        let shown = arrow::util::display::ArrayFormatter::try_new(
            batch.column(0).as_ref(),
            &Default::default(),
        )
        .expect("formatter");
        for row in 0..batch.num_rows() {
            assert_eq!(shown.value(row).to_string(), "[tax_monthly]");
        }
    }

    // A pending template names the owners it awaits, their logins and their datasets.
    let text = include_str!("../../examples/templates/industry_region_risk.toml")
        .replace("\"industry_region_risk\"", "\"risk_awaiting\"");
    let submitted = bank.submit_template(&text).await.expect("submitted");
    let awaiting = |t: &pb::Template| -> Vec<(String, Vec<String>, Vec<String>)> {
        t.awaiting
            .iter()
            .map(|a| (a.org.clone(), a.logins.clone(), a.datasets.clone()))
            .collect()
    };
    let owned = |org: &str, login: &str, dataset: &str| {
        (
            org.to_string(),
            vec![login.to_string()],
            vec![dataset.to_string()],
        )
    };
    assert_eq!(submitted.state, "pending");
    assert_eq!(
        awaiting(&submitted),
        [
            owned("court", "owner_court", "court_cases"),
            owned("market_regulation", "owner_market", "enterprises")
        ]
    );
    let mut court = server.client("owner_court").await.expect("client");
    let approved = court
        .approve_template(&submitted.sha256, 5, 30)
        .await
        .expect("approved");
    assert_eq!(
        awaiting(&approved),
        [owned("market_regulation", "owner_market", "enterprises")]
    );
    let mut market = server.client("owner_market").await.expect("client");
    let listed = market.templates().await.expect("an owner's templates");
    let mine = listed
        .iter()
        .find(|t| t.sha256 == submitted.sha256)
        .expect("reads the owner's dataset");
    assert_eq!(awaiting(mine), awaiting(&approved));
    let approved = market
        .approve_template(&submitted.sha256, 5, 30)
        .await
        .expect("approved");
    assert_eq!(approved.state, "approved");
    assert!(approved.awaiting.is_empty());
    server.server.shutdown().await.expect("shutdown");
}

/// Over TLS, `WhoAmI` says which credential authenticated the call, and the earliest expiry of
/// those presented (the demo's certificates and tokens both run for about a year).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_am_i_names_the_credential_of_the_call() {
    let server = TestServer::start_with(|c| c.tls = true)
        .await
        .expect("server starts with TLS");
    let certificate = server.tls_files("analyst");
    let token = server.token("analyst");
    // (token, certificate, credential named)
    let cases = [
        (Some(token.as_str()), None, "token"),
        (None, Some(&certificate), "certificate"),
        (
            Some(token.as_str()),
            Some(&certificate),
            "token+certificate",
        ),
    ];
    for (token, certificate, credential) in cases {
        let tls = certificate.cloned().unwrap_or(sandbox_tests::TlsFiles {
            ca: server.tls_files("analyst").ca,
            ..Default::default()
        });
        let mut client = sandbox_tests::Client::connect_with(&server.url(), token, Some(&tls))
            .await
            .expect("connect");
        let me = client.who_am_i().await.expect("who am I");
        assert_eq!(me.principal, "analyst", "{credential}");
        assert_eq!(me.credential, credential);
        assert!(
            me.expires_at > now() + 300 * 86_400 && me.expires_at < now() + 400 * 86_400,
            "{credential}: {}",
            me.expires_at
        );
    }
    server.server.shutdown().await.expect("shutdown");
}

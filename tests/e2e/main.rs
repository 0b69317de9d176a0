//! End-to-end tests: the real server on an ephemeral loopback port, driven through the real gRPC
//! client, checked against raw DataFusion over the same Parquet files and against the journal.

mod audit;
mod depth;
mod everyday;
mod flight;
mod hardening;
mod metrics;
mod privacy;
mod reconstruction;
mod wasm;

use std::collections::BTreeMap;

use datafusion::prelude::{ParquetReadOptions, SessionContext};
use sandbox_proto::v1 as pb;
use sandbox_tests::{Client, SqlResult, TestServer, rule_of, sorted_rows};
use tonic::Code;

/// Raw DataFusion over the server's own files: the ground truth for numbers.
async fn raw_engine(server: &TestServer) -> SessionContext {
    let context = SessionContext::new();
    for table in sandbox_demo::TABLES {
        let path = server.data_dir().join("datasets").join(table);
        context
            .register_parquet(
                table,
                path.to_str().expect("utf8 path"),
                ParquetReadOptions::default(),
            )
            .await
            .expect("raw table");
    }
    context
}

async fn raw_rows(context: &SessionContext, sql: &str) -> Vec<String> {
    let batches = context
        .sql(sql)
        .await
        .expect("raw plan")
        .collect()
        .await
        .expect("raw run");
    sorted_rows(&batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_aggregates_match_raw_datafusion() {
    // Exact grants (the demo answers these under differential privacy: see `privacy.rs`).
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut analyst = server.client("analyst").await.expect("client");
    let mut bank = server.client("bank").await.expect("client");
    // The last query asks for the active enterprises per size class: two medium ones are
    // suspended, so after the first query its medium row would subtract to those two. It is
    // withheld by the differencing defense, also from the bank, another org: pooled answers of
    // two orgs subtract as well as one org's.
    let queries = [
        "SELECT size_class, COUNT(*) AS n, SUM(registered_capital) AS capital FROM enterprises GROUP BY size_class",
        "SELECT month, COUNT(DISTINCT credit_code) AS units, SUM(vat_paid) AS vat, AVG(revenue_declared) AS revenue FROM tax_monthly GROUP BY month",
        "SELECT COUNT(*) FROM social_insurance_monthly WHERE month >= '2024-01'",
        "SELECT size_class, COUNT(*) FROM enterprises WHERE status = 'active' GROUP BY size_class ORDER BY size_class",
    ];
    for (i, sql) in queries.into_iter().enumerate() {
        let client = if i == 3 { &mut bank } else { &mut analyst };
        let SqlResult {
            batches, summary, ..
        } = client.sql(sql).await.expect("allowed");
        assert!(summary.dp.is_none(), "{sql}: exact");
        assert_eq!(summary.min_units, 10);
        let mut expected = raw_rows(&raw, sql).await;
        if i == 3 {
            expected.retain(|row| !row.starts_with("medium|"));
        }
        assert_eq!(sorted_rows(&batches), expected, "{sql}");
        // What was suppressed, withheld or scanned is the journal's, never the caller's.
        assert_eq!(
            (
                summary.rows_suppressed,
                summary.rows_differencing,
                summary.rows_scanned
            ),
            (0, 0, 0)
        );
        assert_eq!(summary.result_sha256.len(), 64);
    }
    server.server.shutdown().await.expect("shutdown");
}

/// The journal's record of a release (the auditor's view): what it suppressed and withheld.
async fn release_event(auditor: &mut Client, seq: u64) -> pb::AuditEvent {
    auditor
        .events(seq, 1, false)
        .await
        .expect("journal")
        .into_iter()
        .next()
        .expect("the release's event")
}

/// Runs `SELECT <keys>, COUNT(*) FROM <table> GROUP BY <keys>` through the sandbox and checks it
/// against the raw engine: groups of at least 10 distinct enterprises are released exactly, all
/// others are absent, and the journal counts them (the caller is not told). When the small
/// groups cover fewer than 10 enterprises together, one more group is withheld as their
/// complement. Returns whether some suppressed group had 10 or more rows.
async fn check_suppression(
    analyst: &mut Client,
    auditor: &mut Client,
    raw: &SessionContext,
    table: &str,
    keys: &str,
) -> bool {
    let truth = raw
        .sql(&format!(
            "SELECT {keys}, COUNT(*) AS n, COUNT(DISTINCT credit_code) AS units FROM {table} GROUP BY {keys}"
        ))
        .await
        .expect("raw plan")
        .collect()
        .await
        .expect("raw run");
    let mut expected = BTreeMap::new();
    for row in sorted_rows(&truth) {
        let mut cells: Vec<&str> = row.split('|').collect();
        let units: u64 = cells.pop().expect("units").parse().expect("count");
        let n = cells.pop().expect("n").to_string();
        expected.insert(cells.join("|"), (n, units));
    }
    // The enterprises of all small groups together, as the complement rule counts them.
    let small_units = raw
        .sql(&format!(
            "SELECT COUNT(DISTINCT credit_code) FROM {table} t JOIN \
               (SELECT {keys} FROM {table} GROUP BY {keys} \
                HAVING COUNT(DISTINCT credit_code) < 10) s USING ({keys})"
        ))
        .await
        .expect("raw plan")
        .collect()
        .await
        .expect("raw run");
    let small_units: u64 = sorted_rows(&small_units)[0].parse().expect("count");
    let sql = format!("SELECT {keys}, COUNT(*) AS n FROM {table} GROUP BY {keys}");
    let SqlResult {
        batches, summary, ..
    } = analyst.sql(&sql).await.expect("allowed");
    let released: BTreeMap<String, String> = sorted_rows(&batches)
        .into_iter()
        .map(|row| {
            let (key, n) = row.rsplit_once('|').expect("key and count");
            (key.to_string(), n.to_string())
        })
        .collect();
    let small = expected.values().filter(|(_, units)| *units < 10).count() as u64;
    let large = expected.len() as u64 - small;
    assert!(small > 0, "{sql}: the test data must have small groups");
    let event = release_event(auditor, summary.audit_seq).await;
    assert_eq!(event.rows_suppressed, small, "{sql}");
    let complement = u64::from((1..10).contains(&small_units));
    assert_eq!(
        summary.rows_released,
        large - complement,
        "{sql}: small groups cover {small_units} enterprises"
    );
    assert_eq!(summary.rows_released as usize, released.len(), "{sql}");
    for (key, (n, units)) in &expected {
        if *units >= 10 {
            if let Some(released) = released.get(key) {
                assert_eq!(released, n, "{sql}: group {key} must be released exactly");
            }
        } else {
            assert!(
                !released.contains_key(key),
                "{sql}: group {key} has {units} units"
            );
        }
    }
    expected
        .values()
        .any(|(n, units)| *units < 10 && n.parse::<u64>().expect("count") >= 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_groups_are_suppressed_and_counted_by_units_not_rows() {
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut analyst = server.client("analyst").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");
    let mut many_rows_few_units = false;
    for (table, keys) in [
        ("tax_monthly", "month, tax_credit_rating"),
        ("tax_monthly", "tax_credit_rating"),
        ("enterprises", "city, industry, status"),
        ("enterprises", "size_class, status"),
    ] {
        many_rows_few_units |=
            check_suppression(&mut analyst, &mut auditor, &raw, table, keys).await;
    }
    // The threshold is on distinct enterprises, not rows: a group of many rows from a few
    // enterprises (new enterprises rated M, each with several monthly rows) is suppressed.
    assert!(
        many_rows_few_units,
        "the data must hold a group with many rows but few enterprises"
    );
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_name_their_rule_and_every_request_has_one_terminal_event() {
    let server = TestServer::start_exact().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");
    let mut bank = server.client("bank").await.expect("client");
    let mut stranger = Client::connect(&server.url(), "sbx_not_a_real_token")
        .await
        .expect("client");

    let denied = [
        ("SELECT * FROM enterprises", "identifier-output"),
        (
            "SELECT SUM(vat_paid) FROM tax_monthly WHERE credit_code = 'x'",
            "identifier-in-expression",
        ),
        (
            "SELECT MAX(vat_paid) FROM tax_monthly",
            "function-not-allowed",
        ),
        ("DROP TABLE enterprises", "statement-not-query"),
        ("SELECT COUNT(*) FROM consents", "dataset-not-granted"),
    ];
    for (sql, rule) in denied {
        let status = analyst.sql(sql).await.expect_err("denied");
        assert_eq!(status.code(), Code::FailedPrecondition, "{sql}");
        assert_eq!(rule_of(&status), rule, "{sql}");
        assert!(
            status.message().contains(rule),
            "message names the rule: {}",
            status.message()
        );
        assert!(
            status.message().contains("request "),
            "message carries a request id"
        );
    }
    analyst
        .sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("allowed");
    let status = analyst.sql("SELEKT 1").await.expect_err("syntax");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Bad credentials and wrong roles are refused and recorded.
    let status = stranger
        .sql("SELECT COUNT(*) FROM enterprises")
        .await
        .expect_err("unknown token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = bank
        .events(0, 5, true)
        .await
        .expect_err("a bank may not read the journal");
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = auditor
        .sql("SELECT COUNT(*) FROM enterprises")
        .await
        .expect_err("an auditor may not read data");
    assert_eq!(status.code(), Code::PermissionDenied);

    let events = auditor.events(1, 10_000, false).await.expect("journal");
    let submits: Vec<&pb::AuditEvent> = events.iter().filter(|e| e.action == "SubmitJob").collect();
    // Five denials, one release, one syntax failure, one unauthenticated, one wrong role.
    assert_eq!(submits.len(), 9, "{submits:#?}");
    let by_decision = |d: &str| submits.iter().filter(|e| e.decision == d).count();
    assert_eq!(by_decision("deny"), 5);
    assert_eq!(by_decision("allow"), 1);
    assert_eq!(by_decision("fail"), 1);
    assert_eq!(by_decision("unauthenticated"), 1);
    assert_eq!(by_decision("permission_denied"), 1);
    let mut job_ids: Vec<&str> = submits
        .iter()
        .map(|e| e.job_id.as_str())
        .filter(|j| !j.is_empty())
        .collect();
    let with_jobs = job_ids.len();
    job_ids.sort();
    job_ids.dedup();
    assert_eq!(job_ids.len(), with_jobs, "one terminal event per job");
    for (_, rule) in denied {
        assert!(
            submits
                .iter()
                .any(|e| e.decision == "deny" && e.rule == rule),
            "{rule} recorded"
        );
    }
    let released = submits
        .iter()
        .find(|e| e.decision == "allow")
        .expect("the release");
    assert_eq!(released.datasets, vec!["enterprises".to_string()]);
    assert!(
        released
            .columns
            .contains(&"enterprises.credit_code".to_string())
    );
    assert_eq!(released.result_sha256.len(), 64);
    // Write-ahead: the one admitted job was recorded, with its query, before it ran; refusals
    // at planning never ran and have no admission.
    let admitted: Vec<&pb::AuditEvent> = events.iter().filter(|e| e.action == "AdmitJob").collect();
    assert_eq!(admitted.len(), 1, "{admitted:#?}");
    assert_eq!(admitted[0].job_id, released.job_id);
    assert_eq!(admitted[0].query, released.query);
    assert!(admitted[0].seq < released.seq);
    let listing = events.iter().filter(|e| e.action == "ListEvents").count();
    assert_eq!(
        listing, 1,
        "the failed ListEvents by the bank is the other one"
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == "ListEvents" && e.decision == "permission_denied")
    );

    // Exactly one event per request made above, and the admission of the job that ran: the
    // server's start, nine submissions, one admission, one delivery (FetchResult of the allowed
    // job) and the bank's refused ListEvents; before them,
    // the first start's loading of the demo consents (one event per consent and a closing one)
    // and of the demo templates (submissions, approvals and a closing one, all with request ids
    // of the seed). The auditor's own read is recorded after it returns.
    let seeded = events
        .iter()
        .filter(|e| {
            (e.principal == "sandboxd" && e.action != "Start")
                || e.request_id.starts_with("demo-seed")
        })
        .count();
    assert!(
        events
            .iter()
            .any(|e| e.action == "SeedTemplates" && e.record_json.contains("seed_loaded")),
        "the template seed is closed by its marker"
    );
    assert!(
        events
            .iter()
            .any(|e| e.action == "SeedConsents" && e.record_json.contains("seed_loaded")),
        "the consent seed is closed by its marker"
    );
    assert_eq!(events.len(), 13 + seeded, "{events:#?}");
    assert_eq!(
        events.iter().filter(|e| e.action == "FetchResult").count(),
        1
    );

    // Sequence numbers are dense.
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, i as u64 + 1);
    }
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datasets_show_schemas_and_roles_never_rows() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let datasets = analyst.datasets().await.expect("datasets");
    let ids: Vec<&str> = datasets.iter().map(|d| d.id.as_str()).collect();
    assert!(ids.contains(&"enterprises") && ids.contains(&"tax_monthly"));
    assert!(
        !ids.contains(&"consents"),
        "a dataset without a grant is invisible"
    );
    let enterprises = datasets
        .iter()
        .find(|d| d.id == "enterprises")
        .expect("enterprises");
    assert_eq!(enterprises.privacy_unit, "credit_code");
    assert_eq!(enterprises.min_units, 10);
    assert!(
        enterprises.columns.iter().all(|c| c.name != "legal_rep"),
        "hidden columns are not listed"
    );
    let unit = enterprises
        .columns
        .iter()
        .find(|c| c.name == "credit_code")
        .expect("unit");
    assert_eq!(
        (unit.role.as_str(), unit.level.as_str()),
        ("identifier", "L3")
    );

    let mut owner = server.client("owner_market").await.expect("client");
    let owned = owner.datasets().await.expect("datasets");
    let ids: Vec<&str> = owned.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["admin_penalties", "enterprises"],
        "an owner sees its own datasets"
    );
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_reports_the_decision_without_running() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let allowed = analyst
        .explain("SELECT industry, COUNT(*) FROM enterprises GROUP BY industry")
        .await
        .expect("explain");
    assert_eq!(allowed.decision, "allow");
    assert!(allowed.plan.contains("__sandbox_units"), "{}", allowed.plan);
    let denied = analyst
        .explain("SELECT credit_code, COUNT(*) FROM enterprises GROUP BY credit_code")
        .await
        .expect("explain");
    assert_eq!(
        (denied.decision.as_str(), denied.rule.as_str()),
        ("deny", "identifier-grouped")
    );
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_modules_are_denied_and_jobs_are_private() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.expect("client");
    let request = bank.request(pb::SubmitJobRequest {
        spec: Some(pb::JobSpec {
            kind: Some(pb::job_spec::Kind::Wasm(pb::WasmJob {
                module_sha256: "00".repeat(32),
                input_query: "SELECT 1".into(),
                parameters: Vec::new(),
            })),
        }),
        label: String::new(),
    });
    let status = bank
        .sandbox
        .submit_job(request)
        .await
        .expect_err("no such module");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(rule_of(&status), "module-not-approved");

    let mut analyst = server.client("analyst").await.expect("client");
    let job_id = analyst
        .submit_sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("submitted");
    let request = bank.request(pb::FetchResultRequest {
        job_id: job_id.clone(),
    });
    let status = bank
        .sandbox
        .fetch_result(request)
        .await
        .expect_err("not the bank's job");
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut auditor = server.client("auditor").await.expect("client");
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    assert!(
        events.iter().any(|e| e.action == "FetchResult"
            && e.principal == "bank"
            && e.job_id == job_id
            && e.decision == "permission_denied"),
        "the refused fetch is recorded"
    );
    let request = analyst.request(pb::GetJobRequest { job_id });
    let state = analyst
        .sandbox
        .get_job(request)
        .await
        .expect("status")
        .into_inner()
        .state;
    assert!(
        state == pb::JobState::Running as i32 || state == pb::JobState::Succeeded as i32,
        "state {state}"
    );
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_jobs_end_once_and_are_recorded() {
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    let job_id = analyst
        .submit_sql(
            "SELECT month, tax_credit_rating, SUM(vat_paid) FROM tax_monthly GROUP BY month, tax_credit_rating",
        )
        .await
        .expect("submitted");
    let request = analyst.request(pb::CancelJobRequest {
        job_id: job_id.clone(),
    });
    let status = analyst
        .sandbox
        .cancel_job(request)
        .await
        .expect("cancel")
        .into_inner();
    // The job may have finished before the cancel arrived; either way it ended exactly once.
    let cancelled = status.state == pb::JobState::Cancelled as i32;
    assert!(
        cancelled || status.state == pb::JobState::Succeeded as i32,
        "state {}",
        status.state
    );
    let request = analyst.request(pb::FetchResultRequest {
        job_id: job_id.clone(),
    });
    let fetched = analyst.sandbox.fetch_result(request).await;
    if cancelled {
        assert_eq!(
            fetched.expect_err("nothing to fetch").code(),
            Code::Cancelled
        );
    }

    let mut auditor = server.client("auditor").await.expect("client");
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    let terminal: Vec<_> = events
        .iter()
        .filter(|e| e.action == "SubmitJob" && e.job_id == job_id)
        .collect();
    assert_eq!(terminal.len(), 1, "{terminal:#?}");
    assert_eq!(
        terminal[0].decision,
        if cancelled { "cancel" } else { "allow" }
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "CancelJob" && e.job_id == job_id)
            .count(),
        1
    );
    server.server.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_repairs_a_torn_journal_tail() {
    let server = TestServer::start().await.expect("server");
    let data_dir = server.data_dir();
    let mut analyst = server.client("analyst").await.expect("client");
    analyst
        .sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("allowed");
    let TestServer { dir, server, .. } = server;
    server.shutdown().await.expect("shutdown");

    // A crash in the middle of writing the last record leaves it incomplete.
    let journal = data_dir.join("audit/journal.log");
    let length = std::fs::metadata(&journal).expect("journal").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&journal)
        .expect("open");
    file.set_len(length - 10).expect("truncate");
    drop(file);
    // Checkpoints follow the sync, so none written before that crash covered the torn record:
    // drop the ones the clean shutdown signed after it.
    let records = std::fs::read_to_string(data_dir.join("audit/checkpoints.log"))
        .expect("checkpoints")
        .lines()
        .map(|line| sandbox_audit::Checkpoint::from_json(line).expect("checkpoint"))
        .map(|c| c.size)
        .max()
        .expect("a checkpoint");
    let kept: String = std::fs::read_to_string(data_dir.join("audit/checkpoints.log"))
        .expect("checkpoints")
        .lines()
        .filter(|line| {
            sandbox_audit::Checkpoint::from_json(line)
                .expect("checkpoint")
                .size
                < records
        })
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(data_dir.join("audit/checkpoints.log"), kept).expect("rewrite checkpoints");
    let failure = sandbox_audit::verify_file(&journal)
        .expect("readable")
        .expect_err("a torn tail fails verification");
    assert!(failure.torn_tail, "{failure}");

    // The next start repairs it rather than refusing, and the journal verifies again.
    let mut config = sandbox_server::ServerConfig::for_tests(data_dir.clone());
    config.policies = Some(sandbox_tests::policies_dir());
    let restarted = sandbox_server::start(config)
        .await
        .expect("restart repairs the tail");
    let mut auditor = Client::connect(
        &format!("http://{}", restarted.addr),
        std::fs::read_to_string(data_dir.join("credentials/auditor.token"))
            .expect("token")
            .trim(),
    )
    .await
    .expect("client");
    let events = auditor.events(1, 10_000, false).await.expect("journal");
    let start = events
        .iter()
        .rev()
        .find(|e| e.action == "Start")
        .expect("second start");
    assert!(start.message.contains("repaired"), "{}", start.message);
    // The last record before the crash was the delivery of the result; it is the one cut off.
    assert!(events.iter().any(|e| e.action == "SubmitJob"));
    assert!(
        !events.iter().any(|e| e.action == "FetchResult"),
        "the torn record is gone"
    );
    restarted.shutdown().await.expect("shutdown");
    let report = sandbox_audit::verify_file(&journal)
        .expect("readable")
        .expect("verifies after repair");
    assert_eq!(
        report.records as usize,
        events.len() + 1,
        "events plus this ListEvents"
    );
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_the_built_in_policies() {
    // First start writes the demo policies into the data dir; without them, and without a
    // `policies/` folder in the working directory, the compiled-in demo policies apply.
    let server = TestServer::start().await.expect("server");
    let data_dir = server.data_dir();
    let TestServer { dir, server, .. } = server;
    server.shutdown().await.expect("shutdown");
    std::fs::remove_dir_all(data_dir.join("policies")).expect("remove the policy copy");
    assert!(
        !std::path::Path::new("policies").exists(),
        "tests run from the package dir"
    );
    let config = sandbox_server::ServerConfig::for_tests(data_dir.clone());
    let restarted = sandbox_server::start(config)
        .await
        .expect("starts on built-in policies");
    let token = std::fs::read_to_string(data_dir.join("credentials/analyst.token")).expect("token");
    let mut analyst = Client::connect(&format!("http://{}", restarted.addr), token.trim())
        .await
        .expect("client");
    let datasets = analyst.datasets().await.expect("datasets");
    assert_eq!(datasets.len(), 6, "every granted demo dataset");
    restarted.shutdown().await.expect("shutdown");
    drop(dir);
}

/// A filter over aggregated rows runs after suppression: its answers match the raw engine on the
/// released groups, and the count of suppressed groups does not depend on it (else a HAVING on a
/// small group's aggregate could be answered through that count). The rows come from the same
/// source as the query without it, so the differencing defense releases them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn having_applies_after_suppression() {
    let server = TestServer::start_exact().await.expect("server");
    let raw = raw_engine(&server).await;
    let mut analyst = server.client("analyst").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");
    let base = "SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry";
    let plain = analyst.sql(base).await.expect("allowed");
    let suppressed = release_event(&mut auditor, plain.summary.audit_seq)
        .await
        .rows_suppressed;
    assert!(suppressed > 0, "the demo has small industries");
    for having in [
        "COUNT(*) < 5",
        "COUNT(*) >= 10",
        "SUM(registered_capital) > 0",
        "COUNT(*) < 0",
    ] {
        let sql = format!("{base} HAVING {having}");
        let result = analyst.sql(&sql).await.expect("allowed");
        let event = release_event(&mut auditor, result.summary.audit_seq).await;
        assert_eq!(
            event.rows_suppressed, suppressed,
            "{sql}: the suppressed count is the predicate-free one"
        );
        // The released rows are the plain query's released rows that satisfy the predicate.
        let plain_rows: std::collections::BTreeSet<String> =
            sorted_rows(&plain.batches).into_iter().collect();
        let expected: Vec<String> = raw_rows(&raw, &format!("{sql} AND COUNT(*) >= 10"))
            .await
            .into_iter()
            .filter(|row| plain_rows.contains(row))
            .collect();
        assert_eq!(sorted_rows(&result.batches), expected, "{sql}");
    }
    let small = analyst
        .sql(&format!("{base} HAVING COUNT(*) < 5"))
        .await
        .expect("allowed");
    assert_eq!(small.summary.rows_released, 0);
    server.server.shutdown().await.expect("shutdown");
}

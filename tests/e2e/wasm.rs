//! Code jobs end to end: the bank's journey (upload, denial before approval, approvals by every
//! owner, scores only for consented enterprises, every step journaled), hostile guests contained
//! while the server keeps serving, and state that survives a restart.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arrow::array::{Array, Int64Array, StringArray};
use sandbox_proto::v1 as pb;
use sandbox_tests::{Client, TestServer, emitting_guest, rule_of, scores_ipc, suite_guest};
use tonic::Code;

/// The input the test guests read: per-enterprise features from two owners' datasets.
const INPUT: &str = "SELECT t.credit_code, SUM(t.vat_paid) AS vat, MAX(e.industry) AS industry \
                     FROM tax_monthly t JOIN enterprises e ON t.credit_code = e.credit_code \
                     GROUP BY t.credit_code";
const INPUT_COLUMNS: &[&str] = &[
    "tax_monthly.credit_code",
    "tax_monthly.vat_paid",
    "enterprises.credit_code",
    "enterprises.industry",
];

fn approval(sha256: &str, max_runs: u64) -> pb::ApproveModuleRequest {
    pb::ApproveModuleRequest {
        sha256: sha256.to_string(),
        contract_toml: String::new(),
        max_runs,
        valid_days: 30,
        columns: Vec::new(),
    }
}

/// Consented and non-consented credit codes of the bank, from the bank's own consent list and
/// the data dir.
async fn codes(server: &TestServer, bank: &mut Client) -> (Vec<String>, Vec<String>) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let consents = bank
        .consents("")
        .await
        .expect("the bank lists its consents");
    assert!(!consents.is_empty(), "the demo consents were loaded");
    let valid: BTreeSet<String> = consents
        .iter()
        .filter(|c| c.consumer_org == "bank_demo" && c.granted_at <= now && now < c.expires_at)
        .map(|c| c.unit.clone())
        .collect();
    let all = all_codes(server);
    let others: Vec<String> = all
        .iter()
        .filter(|c| !valid.contains(*c))
        .cloned()
        .collect();
    (valid.into_iter().collect(), others)
}

/// Every enterprise's credit code, read from the server's data dir (the test plays the data
/// owner here, not a client).
fn all_codes(server: &TestServer) -> Vec<String> {
    let dir = server.data_dir().join("datasets/enterprises");
    let mut codes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = std::fs::File::open(entry.unwrap().path()).unwrap();
        let reader =
            datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
                file,
            )
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let column = arrow::compute::cast(
                batch.column_by_name("credit_code").unwrap(),
                &arrow::datatypes::DataType::Utf8,
            )
            .unwrap();
            let column = column.as_any().downcast_ref::<StringArray>().unwrap();
            codes.extend(column.iter().flatten().map(String::from));
        }
    }
    codes
}

fn keys(result: &sandbox_tests::SqlResult) -> Vec<String> {
    let mut keys = Vec::new();
    for batch in &result.batches {
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("utf8 key");
        keys.extend(column.iter().flatten().map(String::from));
    }
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_journey_scores_only_consented_enterprises() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.unwrap();
    let datasets = bank.datasets().await.unwrap();
    let tax = datasets.iter().find(|d| d.id == "tax_monthly").unwrap();
    assert_eq!(tax.modes, vec!["aggregate".to_string(), "wasm".to_string()]);
    let (consented, others) = codes(&server, &mut bank).await;
    // The module scores three consented enterprises and two that never consented.
    let output = scores_ipc(&[
        (&consented[0], 812, "A"),
        (&consented[1], 640, "B"),
        (&consented[2], 455, "E"),
        (&others[0], 700, "A"),
        (&others[1], 300, "E"),
    ]);
    let module = emitting_guest(&output, INPUT_COLUMNS, INPUT);

    // Upload: pending until every owner of its input approves.
    let uploaded = bank.upload_module(module).await.expect("upload");
    assert_eq!(uploaded.state, "pending");
    let sha = uploaded.sha256.clone();
    let denied = bank
        .wasm(&sha, INPUT, b"{}")
        .await
        .expect_err("not approved");
    assert_eq!(denied.code(), Code::FailedPrecondition);
    assert_eq!(rule_of(&denied), "module-not-approved");

    // An owner of none of its datasets cannot approve it; one owner is not enough.
    let mut court = server.client("owner_court").await.unwrap();
    let refused = court.approve_module(approval(&sha, 5)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    let mut tax = server.client("owner_tax").await.unwrap();
    let half = tax
        .approve_module(approval(&sha, 5))
        .await
        .expect("tax approves");
    assert_eq!(half.state, "pending");
    assert!(half.reason.contains("market_regulation"), "{}", half.reason);
    let still = bank.wasm(&sha, INPUT, b"{}").await.unwrap_err();
    assert_eq!(rule_of(&still), "module-not-approved");
    let mut market = server.client("owner_market").await.unwrap();
    let approved = market
        .approve_module(approval(&sha, 5))
        .await
        .expect("market approves");
    assert_eq!(approved.state, "approved");
    assert_eq!(approved.runs_left, 5);

    // Scores come back for consented enterprises only; the others are dropped and counted, and
    // their input rows never reached the guest.
    let result = bank.wasm(&sha, INPUT, b"{}").await.expect("scores");
    let mut expected: Vec<String> = consented[..3].to_vec();
    expected.sort();
    assert_eq!(keys(&result), expected);
    assert_eq!(result.summary.rows_released, 3);
    // The bank learns nothing else of the run: the rows dropped and withheld, the rows read and
    // the work done are for the auditor (checked below), since the guest or the input shaped them.
    assert_eq!(result.summary.rows_suppressed, 0);
    assert_eq!(result.summary.rows_scanned, 0);
    let scores = result.batches[0]
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert!(scores.values().iter().all(|s| (0..=1000).contains(s)));

    // A run reads the input the module declares (the owners approved it with the bytes): any
    // other input is refused, even one within the approved columns (THREATS class 26).
    for input in [
        "SELECT credit_code, revenue_declared FROM tax_monthly",
        "SELECT t.credit_code, SUM(t.vat_paid) AS vat, MAX(e.industry) AS industry \
         FROM tax_monthly t JOIN enterprises e ON t.credit_code = e.credit_code \
         WHERE t.month = '2024-08' GROUP BY t.credit_code",
    ] {
        let other = bank.wasm(&sha, input, b"{}").await.unwrap_err();
        assert_eq!(rule_of(&other), "input-not-approved", "{input}");
    }
    // The same run again (module, parameters and consents unchanged) is the stored output, at
    // no run; an empty input means the declared one.
    let before = bank.modules().await.unwrap();
    let runs_left = before.iter().find(|m| m.sha256 == sha).unwrap().runs_left;
    let repeat = bank.wasm(&sha, "", b"{}").await.expect("stored");
    assert!(repeat.summary.stored);
    assert_eq!(repeat.summary.result_sha256, result.summary.result_sha256);
    let after = bank.modules().await.unwrap();
    assert_eq!(
        after.iter().find(|m| m.sha256 == sha).unwrap().runs_left,
        runs_left,
        "a stored output costs no run"
    );

    // A consent revoked is a score withheld.
    let mut admin = server.client("admin").await.unwrap();
    admin
        .revoke_consent(pb::RevokeConsentRequest {
            unit: consented[0].clone(),
            consumer_org: "bank_demo".into(),
            purpose: "credit_assessment".into(),
        })
        .await
        .expect("revoke");
    let after = bank.wasm(&sha, INPUT, b"{}").await.expect("scores");
    assert_eq!(after.summary.rows_released, 2);
    assert!(!keys(&after).contains(&consented[0]));

    // Every step is in the journal, with the guest's log and work units for the auditor only.
    let mut auditor = server.client("auditor").await.unwrap();
    let events = auditor.events(1, 10_000, false).await.unwrap();
    let find = |action: &str, decision: &str| {
        events
            .iter()
            .filter(|e| e.action == action && e.decision == decision)
            .count()
    };
    assert!(find("UploadModule", "allow") >= 1);
    assert!(find("ApproveModule", "allow") >= 2);
    assert!(find("ApproveModule", "permission_denied") >= 1);
    assert!(find("RevokeConsent", "allow") >= 1);
    let runs: Vec<&pb::AuditEvent> = events
        .iter()
        .filter(|e| e.action == "SubmitJob" && e.kind == "wasm")
        .collect();
    assert!(runs.iter().any(|e| e.rule == "module-not-approved"));
    let released: Vec<&&pb::AuditEvent> = runs
        .iter()
        .filter(|e| e.decision == "allow" && !e.message.contains("from the store"))
        .collect();
    assert_eq!(released.len(), 2);
    assert!(
        runs.iter().any(|e| e.message.contains("from the store")),
        "the stored repeat is journaled too"
    );
    for event in &released {
        assert!(event.query.contains(&sha));
        assert!(event.work_units > 0);
        assert_eq!(event.guest_log, vec!["read all input".to_string()]);
        assert_eq!(event.result_sha256.len(), 64);
        assert!(event.columns.contains(&"tax_monthly.vat_paid".to_string()));
        assert!(event.rows_scanned > 0);
        assert!(event.message.contains("withheld"), "{}", event.message);
    }
    // The first run dropped the two scores of enterprises without consent, the second also the
    // revoked one.
    assert_eq!(released[0].rows_suppressed, 2);
    assert_eq!(released[1].rows_suppressed, 3);
    server.server.shutdown().await.unwrap();
}

/// Uploads a module as the bank and has the tax bureau (the only owner of its input) approve it.
async fn approved(server: &TestServer, module: Vec<u8>, contract: &str) -> String {
    let mut bank = server.client("bank").await.unwrap();
    let sha = bank.upload_module(module).await.expect("upload").sha256;
    let mut tax = server.client("owner_tax").await.unwrap();
    let mut request = approval(&sha, 10);
    request.contract_toml = contract.to_string();
    let approved = tax.approve_module(request).await.expect("approve");
    assert_eq!(approved.state, "approved", "{}", approved.reason);
    sha
}

const TAX_INPUT: &str = "SELECT credit_code FROM tax_monthly";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_guests_are_contained_and_the_server_keeps_serving() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.unwrap();

    // Refused at upload.
    for (name, rule) in [
        ("wasi_import", "wasm-forbidden-import"),
        ("unknown_host_function", "wasm-forbidden-import"),
        ("invalid_code", "wasm-malformed"),
        ("no_manifest", "wasm-manifest"),
    ] {
        let error = bank.upload_module(suite_guest(name)).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{name}");
        assert_eq!(rule_of(&error), rule, "{name}");
    }
    let garbage = bank
        .upload_module(b"MZ not wasm".to_vec())
        .await
        .unwrap_err();
    assert_eq!(rule_of(&garbage), "wasm-malformed");

    // Contained at run time, each with its own error; the server answers SQL after each.
    let (consented, others) = codes(&server, &mut bank).await;
    let cases: Vec<(&str, Vec<u8>, &str, Code, &str)> = vec![
        (
            "infinite loop",
            suite_guest("infinite_loop"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "start never returns",
            suite_guest("start_never_returns"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "memory.grow bomb",
            suite_guest("memory_grow_bomb"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "deep recursion",
            suite_guest("deep_recursion"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "oversized table",
            suite_guest("oversized_table"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "trap",
            suite_guest("trap"),
            "",
            Code::InvalidArgument,
            "wasm-trap",
        ),
        (
            "log flood",
            suite_guest("log_flood"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "emit flood",
            suite_guest("emit_flood"),
            "",
            Code::ResourceExhausted,
            "wasm-limit",
        ),
        (
            "wrong schema (raw values out)",
            emitting_guest(
                &sandbox_tests::ipc(&[raw_rows(&consented[..2])]),
                &["tax_monthly.credit_code"],
                TAX_INPUT,
            ),
            "",
            Code::FailedPrecondition,
            "contract-violation",
        ),
        (
            "score out of range",
            emitting_guest(
                &scores_ipc(&[(&consented[0], 5000, "A")]),
                &["tax_monthly.credit_code"],
                TAX_INPUT,
            ),
            "",
            Code::FailedPrecondition,
            "contract-violation",
        ),
        (
            "grade outside the list",
            emitting_guest(
                &scores_ipc(&[(&consented[0], 500, "AAA")]),
                &["tax_monthly.credit_code"],
                TAX_INPUT,
            ),
            "",
            Code::FailedPrecondition,
            "contract-violation",
        ),
        (
            "two rows for one entity",
            emitting_guest(
                &scores_ipc(&[(&consented[0], 500, "C"), (&consented[0], 900, "A")]),
                &["tax_monthly.credit_code"],
                TAX_INPUT,
            ),
            "",
            Code::FailedPrecondition,
            "contract-violation",
        ),
        (
            "non-zero status",
            suite_guest("guest_failure"),
            "",
            Code::InvalidArgument,
            "wasm-guest-failed",
        ),
        (
            "more rows than the contract allows",
            emitting_guest(
                &scores_ipc(&[
                    (&consented[0], 1, "E"),
                    (&others[0], 2, "E"),
                    (&others[1], 3, "E"),
                ]),
                &["tax_monthly.credit_code"],
                TAX_INPUT,
            ),
            SMALL_CONTRACT,
            Code::FailedPrecondition,
            "contract-violation",
        ),
    ];
    let mut analyst = server.client("analyst").await.unwrap();
    for (name, module, contract, code, rule) in cases {
        let sha = approved(&server, module, contract).await;
        let started = Instant::now();
        let error = bank.wasm(&sha, TAX_INPUT, b"{}").await.expect_err(name);
        assert_eq!(error.code(), code, "{name}: {error:?}");
        assert_eq!(rule_of(&error), rule, "{name}: {error:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name} took {:?}",
            started.elapsed()
        );
        if code == Code::ResourceExhausted {
            assert!(
                error.message().contains("limit exceeded"),
                "{name}: {error:?}"
            );
        }
        // Nothing the guest chose reaches the client: not its status, not a size it asked for,
        // not the names it emitted.
        for leak in ["status", "asked for", "vat_paid", "bytes of memory"] {
            assert!(!error.message().contains(leak), "{name}: {error:?}");
        }
        analyst
            .sql("SELECT COUNT(*) FROM enterprises")
            .await
            .unwrap_or_else(|e| panic!("the server stopped serving after {name}: {e}"));
    }

    // Rows for entities without consent are dropped and counted, not released.
    let sha = approved(
        &server,
        emitting_guest(
            &scores_ipc(&[(&others[0], 700, "A"), (&others[1], 300, "E")]),
            &["tax_monthly.credit_code"],
            TAX_INPUT,
        ),
        "",
    )
    .await;
    let result = bank.wasm(&sha, TAX_INPUT, b"{}").await.expect("runs");
    assert_eq!(result.summary.rows_released, 0);
    // The count of dropped rows is the guest's to choose: the auditor sees it, the bank does not.
    assert_eq!(result.summary.rows_suppressed, 0);
    let mut auditor = server.client("auditor").await.unwrap();
    let events = auditor.events(0, 5, true).await.unwrap();
    let run = events
        .iter()
        .rev()
        .find(|e| e.action == "SubmitJob" && e.query.contains(&sha))
        .expect("the run is journaled");
    assert_eq!(run.rows_suppressed, 2);
    // The failures above left their guest-chosen details in the journal instead.
    let all = auditor.events(1, 10_000, false).await.unwrap();
    assert!(
        all.iter()
            .any(|e| e.rule == "wasm-guest-failed" && e.message.contains("status 7")),
        "the guest's status is journaled"
    );
    server.server.shutdown().await.unwrap();
}

/// A contract allowing two rows.
const SMALL_CONTRACT: &str = r#"
purpose = "credit_assessment"
key = "credit_code"
max_rows = 2
[[field]]
name = "score"
type = "int"
min = 0
max = 1000
[[field]]
name = "grade"
type = "enum"
values = ["A", "B", "C", "D", "E"]
"#;

/// Raw values a module might try to smuggle out: a wide row per entity.
fn raw_rows(codes: &[String]) -> arrow::array::RecordBatch {
    use std::sync::Arc;
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("credit_code", arrow::datatypes::DataType::Utf8, false),
        arrow::datatypes::Field::new("vat_paid", arrow::datatypes::DataType::Float64, false),
    ]));
    arrow::array::RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from_iter_values(codes.iter())),
            Arc::new(arrow::array::Float64Array::from(vec![1234.5; codes.len()])),
        ],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_finishes_promptly_while_a_runaway_guest_runs() {
    let server = TestServer::start().await.expect("server");
    let sha = approved(&server, suite_guest("infinite_loop_wall_time"), "").await;
    let mut bank = server.client("bank").await.unwrap();
    let job = bank
        .submit(Client::wasm_spec(&sha, TAX_INPUT, b"{}"))
        .await
        .expect("the runaway guest is admitted");
    // Let the guest start spinning.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut analyst = server.client("analyst").await.unwrap();
    let started = Instant::now();
    analyst
        .sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("SQL runs beside the guest");
    let took = started.elapsed();
    let status = bank
        .sandbox
        .get_job(bank.request(pb::GetJobRequest {
            job_id: job.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.state,
        pb::JobState::Running as i32,
        "the guest was still running while the query ran"
    );
    assert!(took < Duration::from_secs(2), "the query took {took:?}");
    let error = bank
        .fetch(job)
        .await
        .expect_err("the runaway guest is stopped");
    assert_eq!(error.code(), Code::ResourceExhausted);
    assert!(error.message().contains("wall-time"), "{error:?}");
    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_consents_and_runs_survive_a_restart() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.unwrap();
    let (consented, _) = codes(&server, &mut bank).await;
    let module = emitting_guest(
        &scores_ipc(&[(&consented[0], 500, "C"), (&consented[1], 600, "C")]),
        &["tax_monthly.credit_code"],
        TAX_INPUT,
    );
    let sha = approved(&server, module.clone(), "").await;
    bank.wasm(&sha, TAX_INPUT, b"{}").await.expect("first run");
    // A second approved module, whose stored bytes will be altered while the server is down.
    let other = emitting_guest(
        &scores_ipc(&[(&consented[0], 1, "E")]),
        &["tax_monthly.credit_code"],
        TAX_INPUT,
    );
    let other_sha = approved(&server, other, "").await;
    let stored = server
        .data_dir()
        .join("modules")
        .join(format!("{other_sha}.wasm"));
    let mut admin = server.client("admin").await.unwrap();
    admin
        .revoke_consent(pb::RevokeConsentRequest {
            unit: consented[1].clone(),
            consumer_org: "bank_demo".into(),
            purpose: "credit_assessment".into(),
        })
        .await
        .unwrap();
    let consents_before = bank.consents("").await.unwrap().len();

    // Altered only once the server has stopped: a running server keeps the approved code it
    // compiled, so only a restart reads the file again.
    let server = server
        .restart_with(|| {
            let mut bytes = std::fs::read(&stored).unwrap();
            bytes.extend_from_slice(b"\0\x01x");
            std::fs::write(&stored, bytes).unwrap();
        })
        .await
        .expect("restart");
    let mut bank = server.client("bank").await.unwrap();
    let modules = bank.modules().await.unwrap();
    let module_view = modules
        .iter()
        .find(|m| m.sha256 == sha)
        .expect("module kept");
    assert_eq!(module_view.state, "approved");
    assert_eq!(module_view.runs, 1);
    assert_eq!(module_view.runs_left, 9);
    // The demo consents are not loaded twice, and the revocation holds.
    assert_eq!(bank.consents("").await.unwrap().len(), consents_before);
    let result = bank
        .wasm(&sha, TAX_INPUT, b"{}")
        .await
        .expect("runs after restart");
    assert_eq!(keys(&result), vec![consented[0].clone()]);
    // Approved bytes that changed are denied.
    let changed = bank.wasm(&other_sha, TAX_INPUT, b"{}").await.unwrap_err();
    assert_eq!(changed.code(), Code::FailedPrecondition);
    assert_eq!(rule_of(&changed), "module-changed");
    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_limits_rejections_and_roles_hold() {
    let server = TestServer::start().await.expect("server");
    let mut bank = server.client("bank").await.unwrap();
    let (consented, _) = codes(&server, &mut bank).await;
    let module = emitting_guest(
        &scores_ipc(&[(&consented[0], 1, "E")]),
        &["tax_monthly.credit_code"],
        TAX_INPUT,
    );
    let sha = bank.upload_module(module).await.unwrap().sha256;
    let mut tax = server.client("owner_tax").await.unwrap();
    tax.approve_module(approval(&sha, 1)).await.unwrap();
    bank.wasm(&sha, TAX_INPUT, b"{}")
        .await
        .expect("the one approved run");
    let exhausted = bank.wasm(&sha, TAX_INPUT, b"{}").await.unwrap_err();
    assert_eq!(rule_of(&exhausted), "runs-exhausted");

    // A rejection withdraws the approval.
    tax.approve_module(approval(&sha, 5)).await.unwrap();
    tax.reject_module(&sha, "scores drift").await.unwrap();
    let rejected = bank.wasm(&sha, TAX_INPUT, b"{}").await.unwrap_err();
    assert_eq!(rule_of(&rejected), "module-rejected");

    // Roles: an analyst may not upload; a bank may not approve or add consents; an auditor
    // lists modules but never runs them.
    let mut analyst = server.client("analyst").await.unwrap();
    let error = analyst
        .upload_module(suite_guest("echo"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    let error = bank.approve_module(approval(&sha, 1)).await.unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    let error = bank
        .add_consent(pb::AddConsentRequest {
            unit: "x".into(),
            consumer_org: "bank_demo".into(),
            purpose: "credit_assessment".into(),
            valid_days: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    let mut auditor = server.client("auditor").await.unwrap();
    assert!(!auditor.modules().await.unwrap().is_empty());
    let error = auditor.wasm(&sha, TAX_INPUT, b"{}").await.unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    // A bank lists only its own consents.
    let error = bank.consents("other_bank").await.unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied);
    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_can_be_cancelled() {
    let server = TestServer::start().await.expect("server");
    let sha = approved(&server, suite_guest("infinite_loop_wall_time"), "").await;
    let mut bank = server.client("bank").await.unwrap();
    let job_id = bank
        .submit(Client::wasm_spec(&sha, TAX_INPUT, b"{}"))
        .await
        .expect("admitted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let status = bank
        .sandbox
        .cancel_job(bank.request(pb::CancelJobRequest {
            job_id: job_id.clone(),
        }))
        .await
        .expect("cancelled")
        .into_inner();
    assert_eq!(status.state, pb::JobState::Cancelled as i32);
    // Well before the guest's 3 s wall-time limit: the epoch check saw the cancellation.
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let mut auditor = server.client("auditor").await.unwrap();
    let events = auditor.events(0, 10, true).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.job_id == job_id && e.action == "SubmitJob" && e.decision == "cancel")
    );
    server.server.shutdown().await.unwrap();
}

/// Guests beyond the concurrency limit (1 in tests) are refused at once, not queued, and not
/// counted as runs; a slot frees when its guest ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_beyond_the_limit_are_refused_not_queued() {
    let server = TestServer::start().await.expect("server");
    let sha = approved(&server, suite_guest("infinite_loop_wall_time"), "").await;
    let mut bank = server.client("bank").await.unwrap();
    let first = bank
        .submit(Client::wasm_spec(&sha, TAX_INPUT, b"{}"))
        .await
        .expect("admitted");
    let busy = bank
        .submit(Client::wasm_spec(&sha, TAX_INPUT, b"{}"))
        .await
        .expect_err("no free slot");
    assert_eq!(busy.code(), Code::ResourceExhausted);
    assert_eq!(rule_of(&busy), "wasm-busy");
    bank.sandbox
        .cancel_job(bank.request(pb::CancelJobRequest { job_id: first }))
        .await
        .expect("cancelled");
    let again = bank
        .submit(Client::wasm_spec(&sha, TAX_INPUT, b"{}"))
        .await
        .expect("the slot is free again");
    bank.sandbox
        .cancel_job(bank.request(pb::CancelJobRequest { job_id: again }))
        .await
        .expect("cancelled");
    let module = bank
        .modules()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.sha256 == sha)
        .unwrap();
    assert_eq!(module.runs, 2, "the refused submission is not a run");
    server.server.shutdown().await.unwrap();
}

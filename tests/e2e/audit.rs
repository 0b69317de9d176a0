//! The auditor's journey over gRPC: signed checkpoints, inclusion and consistency proofs checked
//! on the client side against the journal's public key, and an export that verifies offline.

use sandbox_audit::Checkpoint;
use sandbox_audit::merkle::{Hash, leaf_hash, verify_consistency, verify_inclusion};
use sandbox_proto::v1 as pb;
use sandbox_tests::TestServer;
use tonic::Code;

fn hashes(hex_list: &[String]) -> Vec<Hash> {
    hex_list
        .iter()
        .map(|h| hex::decode(h).expect("hex").try_into().expect("32 bytes"))
        .collect()
}

/// The checkpoint as signed, checked against the key the server reports.
fn signed(checkpoint: &pb::SignedCheckpoint) -> Checkpoint {
    let parsed = Checkpoint::from_json(&checkpoint.json).expect("checkpoint json");
    let key = hex::decode(&checkpoint.public_key).expect("hex key");
    assert!(parsed.verify(&key), "signature verifies");
    assert_eq!(parsed.size, checkpoint.tree_size);
    parsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auditors_get_signed_checkpoints_and_proofs_that_verify_client_side() {
    let server = TestServer::start().await.expect("server");
    let mut auditor = server.client("auditor").await.expect("client");
    let first = signed(&auditor.checkpoint(true).await.expect("checkpoint"));
    // The start names the policy every later decision was made under.
    let events = auditor.events(1, 10, false).await.expect("events");
    let start = events.iter().find(|e| e.action == "Start").expect("start");
    let digest = start
        .message
        .split("policy sha256 ")
        .nth(1)
        .and_then(|rest| rest.get(..64))
        .expect("a policy digest");
    assert!(
        digest.chars().all(|c| c.is_ascii_hexdigit()),
        "{}",
        start.message
    );

    let mut analyst = server.client("analyst").await.expect("client");
    analyst
        .sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("allowed");
    let submit_seq = auditor
        .events(0, 10_000, false)
        .await
        .expect("events")
        .iter()
        .rev()
        .find(|e| e.action == "SubmitJob")
        .expect("the job's event")
        .seq;

    // Inclusion of the job's record under a fresh signed root.
    let proof = auditor.inclusion_proof(submit_seq, 0).await.expect("proof");
    let second = signed(proof.checkpoint.as_ref().expect("signed for the proof"));
    assert!(second.size > first.size);
    let record: serde_json::Value = serde_json::from_slice(&proof.record).expect("json");
    assert_eq!(record["action"], "SubmitJob");
    assert!(verify_inclusion(
        &leaf_hash(&proof.record),
        submit_seq - 1,
        second.size,
        &hashes(&proof.hashes),
        &second.root_hash().expect("root"),
    ));
    // The same proof does not vouch for altered bytes.
    let mut altered = proof.record.clone();
    altered[3] ^= 0x01;
    assert!(!verify_inclusion(
        &leaf_hash(&altered),
        submit_seq - 1,
        second.size,
        &hashes(&proof.hashes),
        &second.root_hash().expect("root"),
    ));

    // The later signed tree extends the earlier one.
    let consistency = auditor
        .consistency_proof(first.size, second.size)
        .await
        .expect("consistency");
    assert!(verify_consistency(
        first.size,
        second.size,
        &first.root_hash().expect("root"),
        &second.root_hash().expect("root"),
        &hashes(&consistency.hashes),
    ));

    // Sizes the journal does not hold are the caller's error.
    let status = auditor
        .inclusion_proof(10_000_000, 0)
        .await
        .expect_err("out of range");
    assert_eq!(status.code(), Code::InvalidArgument);

    // An export verifies offline, and extends the first checkpoint.
    let bundle = tempfile::tempdir().expect("tempdir");
    auditor.export_journal(bundle.path()).await.expect("export");
    let report = sandbox_audit::verify_bundle(bundle.path(), Some(&first), true)
        .expect("readable")
        .expect("verifies");
    assert!(report.records >= second.size);
    assert_eq!(report.trusted_size, Some(first.size));

    // None of it is for anyone but auditors.
    for name in ["analyst", "bank", "owner_tax", "admin"] {
        let mut other = server.client(name).await.expect("client");
        assert_eq!(
            other.checkpoint(false).await.expect_err("denied").code(),
            Code::PermissionDenied
        );
        assert_eq!(
            other
                .inclusion_proof(1, 0)
                .await
                .expect_err("denied")
                .code(),
            Code::PermissionDenied
        );
        assert_eq!(
            other
                .consistency_proof(1, 0)
                .await
                .expect_err("denied")
                .code(),
            Code::PermissionDenied
        );
        let out = tempfile::tempdir().expect("tempdir");
        assert!(other.export_journal(out.path()).await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_sql_is_read_only_and_owners_see_only_their_datasets() {
    use datafusion::arrow::array::{Array, AsArray};
    let server = TestServer::start().await.expect("server");
    let mut analyst = server.client("analyst").await.expect("client");
    analyst
        .sql("SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class")
        .await
        .expect("allowed");
    analyst
        .sql("SELECT month, SUM(vat_paid) FROM tax_monthly GROUP BY month")
        .await
        .expect("allowed");

    let mut auditor = server.client("auditor").await.expect("client");
    let (batches, response) = auditor
        .audit_sql(
            "SELECT action, COUNT(*) AS n FROM events WHERE action IN ('SubmitJob', 'AdmitJob') \
             GROUP BY action ORDER BY action",
        )
        .await
        .expect("auditor query");
    let rows = sandbox_tests::sorted_rows(&batches);
    // Two jobs, and this audit query's own admission: on record before it ran.
    assert_eq!(rows, vec!["AdmitJob|3", "SubmitJob|2"], "{rows:?}");
    assert!(response.events > 4);

    // The tax bureau sees the events that named tax_monthly, and nothing else.
    let mut owner = server.client("owner_tax").await.expect("client");
    let (batches, response) = owner
        .audit_sql("SELECT datasets, query, guest_log FROM events")
        .await
        .expect("owner query");
    assert!(
        response.events >= 2 && response.events < 10,
        "{}",
        response.events
    );
    for batch in &batches {
        let datasets = batch.column(0).as_list::<i32>();
        for row in 0..batch.num_rows() {
            let names = datasets.value(row);
            let names = names.as_string::<i32>();
            assert!(
                names.iter().flatten().any(|d| d == "tax_monthly"),
                "an owner sees only its datasets' events"
            );
        }
        assert_eq!(batch.column(2).as_list::<i32>().values().len(), 0);
    }

    // Read-only: no tables, no files, no statements.
    let target = tempfile::tempdir().expect("tempdir");
    let file = target.path().join("leak.csv");
    let writes = [
        "CREATE TABLE copy AS SELECT * FROM events".to_string(),
        format!("COPY (SELECT * FROM events) TO '{}'", file.display()),
        format!(
            "CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '{}'",
            target.path().display()
        ),
        "INSERT INTO events SELECT * FROM events".to_string(),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ];
    for sql in writes {
        let status = auditor.audit_sql(&sql).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{sql}: {status:?}");
    }
    assert!(!file.exists());

    // Not for consumers or analysts; every query is itself recorded.
    for name in ["analyst", "bank", "admin"] {
        let mut other = server.client(name).await.expect("client");
        let status = other
            .audit_sql("SELECT COUNT(*) FROM events")
            .await
            .expect_err("denied");
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let (batches, _) = auditor
        .audit_sql("SELECT principal, decision FROM events WHERE action = 'QueryEvents'")
        .await
        .expect("auditor query");
    let rows = sandbox_tests::sorted_rows(&batches);
    assert!(rows.iter().any(|r| r == "owner_tax|allow"), "{rows:?}");
    assert!(
        rows.iter().filter(|r| r.ends_with("|fail")).count() >= 5,
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r == "bank|permission_denied"),
        "{rows:?}"
    );
}

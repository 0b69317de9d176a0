//! Signed checkpoints and exported bundles: what the journal writes, what `open` refuses, and
//! the offline verifier against every kind of tampering, a fork re-signed with the real key
//! included.

use std::path::Path;
use std::time::Duration;

use sandbox_audit::checkpoint::{CHECKPOINTS_FILE, KEY_FILE, PUBLIC_KEY_FILE, read_public_key};
use sandbox_audit::{
    AuditError, AuditEvent, Checkpoint, Decision, JOURNAL_FILE, Journal, JournalOptions,
    VerifyFailure, verify_bundle,
};

fn event(tag: &str, i: usize) -> AuditEvent {
    AuditEvent {
        action: "SubmitJob".into(),
        principal: "analyst".into(),
        org: "analytics".into(),
        request_id: format!("{tag}-{i}"),
        decision: Decision::Allow,
        ..AuditEvent::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A journal of `n` records, closed (so its last checkpoint covers them all).
fn journal(dir: &Path, tag: &str, n: usize) {
    let (journal, _) = Journal::open(dir).expect("open");
    for i in 0..n {
        journal.append_blocking(event(tag, i)).expect("append");
    }
}

fn export(dir: &Path, out: &Path) -> Checkpoint {
    let (journal, _) = Journal::open(dir).expect("open");
    runtime().block_on(journal.export_to(out)).expect("export")
}

fn failure(bundle: &Path, trusted: Option<&Checkpoint>) -> VerifyFailure {
    verify_bundle(bundle, trusted, true)
        .expect("readable")
        .expect_err("must fail")
}

/// Byte offsets of the records of a journal file (after the 8-byte header).
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        offsets.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += 8 + len + 32;
    }
    offsets
}

#[test]
fn checkpoints_are_signed_every_n_records_and_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let options = JournalOptions {
        checkpoint_every: 10,
        checkpoint_interval: Duration::from_secs(3600),
        ..JournalOptions::default()
    };
    {
        let (journal, _) = Journal::open_with(dir.path(), options).expect("open");
        for i in 0..25 {
            journal.append_blocking(event("a", i)).expect("append");
        }
        let latest = journal.latest_checkpoint().expect("a checkpoint by now");
        assert!(latest.size >= 20, "{latest:?}");
    }
    let key = read_public_key(&dir.path().join(PUBLIC_KEY_FILE)).expect("public key");
    let text = std::fs::read_to_string(dir.path().join(CHECKPOINTS_FILE)).unwrap();
    let checkpoints: Vec<Checkpoint> = text
        .lines()
        .map(|l| Checkpoint::from_json(l).unwrap())
        .collect();
    assert!(checkpoints.len() >= 3);
    assert!(checkpoints.iter().all(|c| c.verify(&key)));
    assert_eq!(checkpoints.last().unwrap().size, 25, "shutdown covers all");
    let mode = std::fs::metadata(dir.path().join(KEY_FILE))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // A checkpoint does not verify under another key, nor with any field changed.
    let mut forged = checkpoints[0].clone();
    forged.size += 1;
    assert!(!forged.verify(&key));
    assert!(!checkpoints[0].verify(&[7u8; 32]));
}

#[test]
fn checkpoints_follow_the_interval() {
    let dir = tempfile::tempdir().unwrap();
    let options = JournalOptions {
        checkpoint_every: 1_000_000,
        checkpoint_interval: Duration::from_millis(50),
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open_with(dir.path(), options).expect("open");
    journal.append_blocking(event("t", 0)).expect("append");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while journal.latest_checkpoint().is_none_or(|c| c.size < 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint after the interval"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_journal_shorter_than_its_last_checkpoint_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "r", 10);
    let path = dir.path().join(JOURNAL_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let offsets = record_offsets(&bytes);
    // A clean cut after record 5: no torn tail, just fewer records than were signed.
    std::fs::write(&path, &bytes[..offsets[5]]).unwrap();
    match Journal::open(dir.path()) {
        Err(AuditError::Rollback {
            records,
            checkpoint,
            ..
        }) => assert_eq!((records, checkpoint), (5, 10)),
        other => panic!("expected a rollback refusal, got {other:?}"),
    }
}

#[test]
fn a_rewritten_journal_refuses_to_open_against_its_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "old", 10);
    let other = tempfile::tempdir().unwrap();
    journal(other.path(), "new", 12);
    // Same length or longer, a valid chain, but not the history that was signed.
    std::fs::copy(
        other.path().join(JOURNAL_FILE),
        dir.path().join(JOURNAL_FILE),
    )
    .unwrap();
    let error = Journal::open(dir.path()).expect_err("must refuse");
    assert!(matches!(error, AuditError::Corrupt { .. }), "{error}");
}

#[test]
fn a_public_key_without_its_private_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "k", 1);
    std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    let error = Journal::open(dir.path()).expect_err("must refuse");
    assert!(matches!(error, AuditError::Key(_)), "{error}");
}

#[test]
fn an_exported_bundle_verifies_offline_and_against_a_kept_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "b", 20);
    let first = tempfile::tempdir().unwrap();
    let kept = export(dir.path(), first.path());
    journal(dir.path(), "c", 7);
    let second = tempfile::tempdir().unwrap();
    let latest = export(dir.path(), second.path());
    assert_eq!((kept.size, latest.size), (20, 27));
    let report = verify_bundle(second.path(), Some(&kept), true)
        .unwrap()
        .expect("verifies");
    assert_eq!(report.records, 27);
    assert_eq!(report.trusted_size, Some(20));
}

/// Rewrites the journal of a bundle.
fn tamper(bundle: &Path, f: impl FnOnce(&mut Vec<u8>, &[usize])) {
    let path = bundle.join(JOURNAL_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let offsets = record_offsets(&bytes);
    f(&mut bytes, &offsets);
    std::fs::write(&path, bytes).unwrap();
}

#[test]
fn tampered_bundles_fail_naming_the_first_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "t", 12);
    let fresh = || {
        let out = tempfile::tempdir().unwrap();
        export(dir.path(), out.path());
        out
    };

    // A flipped byte inside record 4's payload.
    let bundle = fresh();
    tamper(bundle.path(), |bytes, offsets| {
        bytes[offsets[3] + 20] ^= 0x01
    });
    assert_eq!(failure(bundle.path(), None).record, 4);

    // Record 6 deleted.
    let bundle = fresh();
    tamper(bundle.path(), |bytes, offsets| {
        bytes.drain(offsets[5]..offsets[6]);
    });
    assert_eq!(failure(bundle.path(), None).record, 6);

    // Records 2 and 3 swapped.
    let bundle = fresh();
    tamper(bundle.path(), |bytes, offsets| {
        let second = bytes[offsets[1]..offsets[2]].to_vec();
        let third = bytes[offsets[2]..offsets[3]].to_vec();
        let mut swapped = third;
        swapped.extend_from_slice(&second);
        bytes.splice(offsets[1]..offsets[3], swapped);
    });
    assert_eq!(failure(bundle.path(), None).record, 2);

    // Truncated cleanly after record 9: the checkpoint covers more than remains.
    let bundle = fresh();
    tamper(bundle.path(), |bytes, offsets| bytes.truncate(offsets[9]));
    let fail = failure(bundle.path(), None);
    assert_eq!(fail.record, 10);
    assert!(
        fail.reason.contains("deleted or the journal truncated"),
        "{fail}"
    );

    // Truncated mid-record.
    let bundle = fresh();
    tamper(bundle.path(), |bytes, offsets| {
        bytes.truncate(offsets[11] + 5)
    });
    assert_eq!(failure(bundle.path(), None).record, 12);

    // A checkpoint with another root.
    let bundle = fresh();
    let path = bundle.path().join(CHECKPOINTS_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut last = Checkpoint::from_json(lines.last().unwrap()).unwrap();
    last.root = "00".repeat(32);
    *lines.last_mut().unwrap() = last.to_line().trim_end().to_string();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    assert!(failure(bundle.path(), None).reason.contains("not signed"));

    // The untouched bundle verifies.
    let bundle = fresh();
    verify_bundle(bundle.path(), None, true)
        .unwrap()
        .expect("intact");
}

#[test]
fn a_fork_resigned_with_the_real_key_is_caught_by_a_kept_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "f", 20);
    let kept_bundle = tempfile::tempdir().unwrap();
    let kept = export(dir.path(), kept_bundle.path());

    // Whoever holds the key truncates the journal to 10 records, appends other history and
    // signs new checkpoints: a bundle that verifies on its own.
    let fork = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
    let offsets = record_offsets(&bytes);
    std::fs::write(fork.path().join(JOURNAL_FILE), &bytes[..offsets[10]]).unwrap();
    for file in [KEY_FILE, PUBLIC_KEY_FILE] {
        std::fs::copy(dir.path().join(file), fork.path().join(file)).unwrap();
    }
    journal(fork.path(), "forged", 15);
    let forged_bundle = tempfile::tempdir().unwrap();
    let forged = export(fork.path(), forged_bundle.path());
    assert_eq!(forged.size, 25);
    verify_bundle(forged_bundle.path(), None, true)
        .unwrap()
        .expect("a fork verifies on its own");

    let fail = failure(forged_bundle.path(), Some(&kept));
    assert!(fail.reason.contains("fork"), "{fail}");
    // The same key, a checkpoint from the real history: still consistent with the real one.
    journal(dir.path(), "g", 3);
    let real_bundle = tempfile::tempdir().unwrap();
    export(dir.path(), real_bundle.path());
    verify_bundle(real_bundle.path(), Some(&kept), true)
        .unwrap()
        .expect("the real history extends the kept checkpoint");
}

#[test]
fn exports_taken_while_records_and_checkpoints_keep_coming_verify() {
    let dir = tempfile::tempdir().unwrap();
    let options = JournalOptions {
        checkpoint_every: 3,
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open_with(dir.path(), options).expect("open");
    let writer = {
        let journal = journal.clone();
        std::thread::spawn(move || {
            for i in 0..1500 {
                journal.append_blocking(event("w", i)).expect("append");
            }
        })
    };
    let runtime = runtime();
    let mut sizes = Vec::new();
    for _ in 0..8 {
        let out = tempfile::tempdir().unwrap();
        let checkpoint = runtime
            .block_on(journal.export_to(out.path()))
            .expect("export");
        let report = verify_bundle(out.path(), None, true)
            .unwrap()
            .unwrap_or_else(|f| panic!("an export taken under load verifies: {f}"));
        assert_eq!(report.records, checkpoint.size);
        sizes.push(checkpoint.size);
    }
    writer.join().expect("writer");
    assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
}

#[test]
fn a_signed_record_cut_short_is_refused_and_left_as_found() {
    let dir = tempfile::tempdir().unwrap();
    journal(dir.path(), "s", 8);
    let path = dir.path().join(JOURNAL_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let offsets = record_offsets(&bytes);
    // Looks like a torn write, but the checkpoint signed that record: it was complete.
    let cut = &bytes[..offsets[7] + 20];
    std::fs::write(&path, cut).unwrap();
    let error = Journal::open(dir.path()).expect_err("must refuse");
    assert!(matches!(error, AuditError::Rollback { .. }), "{error}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        cut,
        "the evidence is not repaired away"
    );
}

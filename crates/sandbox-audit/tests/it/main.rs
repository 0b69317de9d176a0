//! Journal tests: append and read back, group commit under concurrency, tamper detection by the
//! offline verifier, torn-tail repair at open and refusal of corruption in the middle.

mod bundles;
mod proofs;

use std::path::PathBuf;

use sandbox_audit::{AuditEvent, Decision, JOURNAL_FILE, Journal, verify_file};

fn event(i: usize) -> AuditEvent {
    AuditEvent {
        action: "SubmitJob".into(),
        principal: "analyst".into(),
        org: "analytics".into(),
        request_id: format!("request-{i}"),
        job_id: format!("job-{i}"),
        kind: "sql".into(),
        query: format!("SELECT {i}"),
        decision: Decision::Allow,
        rows_released: i as u64,
        ..AuditEvent::default()
    }
}

/// A journal of `n` events in a fresh folder; returns the folder and the file.
fn journal_with(n: usize) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = Journal::open(dir.path()).expect("open");
        for i in 0..n {
            journal.append_blocking(event(i)).expect("append");
        }
    }
    // Dropping the last handle joined the writer thread: the file is complete and unlocked.
    let path = dir.path().join(JOURNAL_FILE);
    (dir, path)
}

/// Byte offsets of each record, from a clean walk of the file.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut at = 8;
    while at < bytes.len() {
        offsets.push(at);
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        at += 8 + len + 32;
    }
    offsets
}

#[test]
fn appends_are_sequenced_and_read_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, report) = Journal::open(dir.path()).expect("open");
    assert_eq!(report.records, 0);
    for i in 0..5 {
        let appended = journal.append_blocking(event(i)).expect("append");
        assert_eq!(appended.seq, i as u64 + 1);
    }
    let events = journal.read(2, 2).expect("read");
    assert_eq!(
        events.iter().map(|e| e.event.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(events[0].event.job_id, "job-1");
    let tail = journal.tail(2).expect("tail");
    assert_eq!(
        tail.iter().map(|e| e.event.seq).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert!(!tail[0].event.time.is_empty());
}

#[test]
fn concurrent_appends_commit_in_groups_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = Journal::open(dir.path()).expect("open");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seqs = runtime.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..400 {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move { journal.append(event(i)).await }));
        }
        let mut seqs = Vec::new();
        for task in tasks {
            seqs.push(task.await.expect("task").expect("append").seq);
        }
        seqs
    });
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=400).collect::<Vec<u64>>());
    drop(journal);
    let report = verify_file(&dir.path().join(JOURNAL_FILE))
        .expect("readable")
        .expect("verifies");
    assert_eq!(report.records, 400);
}

#[test]
fn intact_journal_verifies() {
    let (_dir, path) = journal_with(10);
    let report = verify_file(&path).expect("readable").expect("verifies");
    assert_eq!(report.records, 10);
    assert_eq!(report.head_hash.len(), 64);
}

#[test]
fn flipped_byte_is_detected_and_named() {
    let (_dir, path) = journal_with(10);
    let mut bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    // Flip a byte inside the payload of the 4th record.
    bytes[offsets[3] + 8 + 5] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let failure = verify_file(&path).expect("readable").expect_err("tampered");
    assert_eq!(failure.record, 4);
    assert!(failure.reason.contains("checksum"), "{failure}");
}

#[test]
fn flipped_chain_hash_is_detected() {
    let (_dir, path) = journal_with(6);
    let mut bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    // The last byte of record 3 is the last byte of its chain hash.
    bytes[offsets[3] - 1] ^= 0x80;
    std::fs::write(&path, &bytes).expect("write");
    let failure = verify_file(&path).expect("readable").expect_err("tampered");
    assert_eq!(failure.record, 3);
    assert!(failure.reason.contains("chain"), "{failure}");
}

#[test]
fn deleted_record_is_detected_and_named() {
    let (_dir, path) = journal_with(10);
    let bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    let mut tampered = bytes[..offsets[4]].to_vec();
    tampered.extend_from_slice(&bytes[offsets[5]..]);
    std::fs::write(&path, &tampered).expect("write");
    let failure = verify_file(&path).expect("readable").expect_err("tampered");
    assert_eq!(
        failure.record, 5,
        "the record after the gap is the first bad one: {failure}"
    );
}

#[test]
fn reordered_records_are_detected() {
    let (_dir, path) = journal_with(6);
    let bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    let mut tampered = bytes[..offsets[2]].to_vec();
    tampered.extend_from_slice(&bytes[offsets[3]..offsets[4]]);
    tampered.extend_from_slice(&bytes[offsets[2]..offsets[3]]);
    tampered.extend_from_slice(&bytes[offsets[4]..]);
    std::fs::write(&path, &tampered).expect("write");
    let failure = verify_file(&path).expect("readable").expect_err("tampered");
    assert_eq!(failure.record, 3);
}

#[test]
fn torn_tail_fails_verification_and_is_repaired_at_open() {
    let (dir, path) = journal_with(8);
    let bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    // Cut the last record in the middle of its payload, as a crash during the write would. A
    // crash then comes before any checkpoint covers that record (checkpoints follow the sync),
    // so the checkpoint that the clean close signed goes too.
    let cut = offsets[7] + 8 + 10;
    std::fs::write(&path, &bytes[..cut]).expect("write");
    std::fs::remove_file(dir.path().join(sandbox_audit::checkpoint::CHECKPOINTS_FILE))
        .expect("checkpoints");
    let failure = verify_file(&path).expect("readable").expect_err("torn");
    assert_eq!(failure.record, 8);
    assert!(failure.torn_tail);

    let (journal, report) =
        Journal::open(dir.path()).expect("a torn tail is repaired, not refused");
    assert_eq!(report.records, 7);
    assert_eq!(report.truncated_bytes, (cut - offsets[7]) as u64);
    let appended = journal
        .append_blocking(event(99))
        .expect("append after repair");
    assert_eq!(appended.seq, 8);
    drop(journal);
    let report = verify_file(&path)
        .expect("readable")
        .expect("verifies after repair");
    assert_eq!(report.records, 8);
}

#[test]
fn corruption_in_the_middle_refuses_to_open() {
    let (dir, path) = journal_with(8);
    let mut bytes = std::fs::read(&path).expect("read");
    let offsets = record_offsets(&bytes);
    bytes[offsets[2] + 8 + 3] ^= 0x10;
    std::fs::write(&path, &bytes).expect("write");
    let error = Journal::open(dir.path()).expect_err("must refuse");
    assert_eq!(error.code(), "audit-corrupt");
    assert!(error.to_string().contains("record 3"), "{error}");
}

#[test]
fn second_writer_is_locked_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_journal, _) = Journal::open(dir.path()).expect("open");
    let error = Journal::open(dir.path()).expect_err("locked");
    assert_eq!(error.code(), "audit-locked");
}

//! The audit journal: appends from 64 concurrent writers with group commit against one
//! `fdatasync` per record, in one run (rates and ratio printed; target: group commit at least
//! 10x), and the offline verification of a journal of one million records (target: under 5
//! seconds).
//!
//! `cargo bench -p sandbox-benches --bench journal` (`SANDBOX_BENCH_JOURNAL_RECORDS` changes the
//! size of the verified journal). Files live under the target dir, on the machine's disk, so the
//! syncs are real.

use std::path::Path;
use std::time::{Duration, Instant};

use sandbox_audit::{AuditEvent, Decision, Journal, JournalOptions, verify_bundle};

const WRITERS: usize = 64;

/// An event of the size a SQL job's terminal record has.
fn event(writer: usize, i: usize) -> AuditEvent {
    AuditEvent {
        action: "SubmitJob".into(),
        principal: "analyst".into(),
        org: "analytics".into(),
        request_id: format!("bench-{writer}-{i}"),
        job_id: format!("{writer:08x}-{i:08x}"),
        kind: "sql".into(),
        query: "SELECT month, tax_credit_rating, COUNT(*) AS n, SUM(vat_paid) AS vat FROM \
                tax_monthly GROUP BY month, tax_credit_rating"
            .into(),
        datasets: vec!["tax_monthly".into()],
        columns: vec![
            "tax_monthly.credit_code".into(),
            "tax_monthly.month".into(),
            "tax_monthly.vat_paid".into(),
        ],
        decision: Decision::Allow,
        rows_scanned: 5_214_464,
        rows_released: 72,
        min_units: 10,
        result_sha256: "ab".repeat(32),
        duration_ms: 90,
        ..AuditEvent::default()
    }
}

/// Records per second with `WRITERS` tasks each appending `per_writer` events.
fn append_rate(dir: &Path, group_commit: bool, per_writer: usize) -> anyhow::Result<f64> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let options = JournalOptions {
        group_commit,
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open_with(dir, options)?;
    let start = Instant::now();
    write_concurrently(&runtime, &journal, per_writer * WRITERS)?;
    let elapsed = start.elapsed();
    Ok((WRITERS * per_writer) as f64 / elapsed.as_secs_f64())
}

/// Appends `records` events from `WRITERS` concurrent tasks, each waiting for its own appends.
fn write_concurrently(
    runtime: &tokio::runtime::Runtime,
    journal: &Journal,
    records: usize,
) -> anyhow::Result<()> {
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let journal = journal.clone();
            tasks.push(tokio::spawn(async move {
                for i in (writer..records).step_by(WRITERS) {
                    journal.append(event(writer, i)).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        anyhow::Ok(())
    })
}

/// A journal of `records` events under `dir`, written once and kept between runs.
fn big_journal(dir: &Path, records: usize) -> anyhow::Result<()> {
    let marker = dir.join("complete");
    if marker.exists() {
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    eprintln!(
        "writing a journal of {records} records in {}",
        dir.display()
    );
    let options = JournalOptions {
        checkpoint_every: 100_000,
        checkpoint_interval: Duration::from_secs(3600),
        ..JournalOptions::default()
    };
    {
        let (journal, _) = Journal::open_with(dir, options)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        write_concurrently(&runtime, &journal, records)?;
    }
    std::fs::write(marker, b"")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let root = sandbox_benches::target_dir()
        .join("bench-data")
        .join("journal");
    std::fs::create_dir_all(&root)?;

    let grouped = tempfile::tempdir_in(&root)?;
    let single = tempfile::tempdir_in(&root)?;
    // Interleaved, so both see the same disk: per-record sync first, then group commit.
    let one_per_record = append_rate(single.path(), false, 10)?;
    let group = append_rate(grouped.path(), true, 200)?;
    println!("appends, {WRITERS} concurrent writers:");
    println!("  one fdatasync per record  {one_per_record:>10.0} records/s");
    println!("  group commit              {group:>10.0} records/s");
    println!(
        "  ratio                     {:>10.1}x",
        group / one_per_record
    );

    let records: usize = std::env::var("SANDBOX_BENCH_JOURNAL_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let big = root.join(format!("records-{records}"));
    big_journal(&big, records)?;
    let bytes = std::fs::metadata(big.join(sandbox_audit::JOURNAL_FILE))?.len();
    let start = Instant::now();
    let report = verify_bundle(&big, None, true)?
        .map_err(|failure| anyhow::anyhow!("the journal does not verify: {failure}"))?;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        report.records as usize == records,
        "records: {}",
        report.records
    );
    println!(
        "offline verification of {} records ({:.0} MiB): {:.2} s",
        report.records,
        bytes as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64()
    );
    Ok(())
}

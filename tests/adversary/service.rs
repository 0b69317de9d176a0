//! Attacks on the service around the data: catalog and engine escapes (class 10), credentials
//! and roles (15), oversized and flooding requests (16), releases without their record (17),
//! journal tampering (18), state that grows with history (28), and resource aborts from the
//! privileged audit SQL (27, played last: on a build that has the bug, it ends the process).

use std::time::{Duration, Instant};

use sandbox_tests::Client;

use crate::harness::{Harness, Verdict, refusal};

/// Whether the service still answers (a listing: it reads no data and spends no budget, which
/// the attacks before it may have exhausted).
async fn alive(h: &mut Harness) -> bool {
    let mut client = h.client("analyst").await;
    let probe = tokio::time::timeout(Duration::from_secs(30), client.datasets()).await;
    if let Ok(Err(status)) = &probe {
        eprintln!("  (liveness probe: {status})");
    }
    matches!(probe, Ok(Ok(_)))
}

pub async fn play(h: &mut Harness) {
    // 10. Escapes from the catalog and the engine.
    let raw_dir = h.server.data_dir().join("datasets/enterprises");
    let legal_rep = h
        .truth
        .rows(&h.fill("SELECT legal_rep FROM enterprises WHERE credit_code = '{cc}'"))
        .await[0][0]
        .clone();
    for (name, sql) in [
        (
            "CREATE TABLE AS",
            "CREATE TABLE copy AS SELECT * FROM enterprises".to_string(),
        ),
        (
            "COPY TO a file",
            "COPY enterprises TO '/tmp/sandbox-escape.csv'".to_string(),
        ),
        (
            "CREATE EXTERNAL TABLE over the raw files",
            format!(
                "CREATE EXTERNAL TABLE raw STORED AS PARQUET LOCATION '{}'",
                raw_dir.display()
            ),
        ),
        (
            "a raw file as a table",
            format!("SELECT legal_rep FROM '{}'", raw_dir.display()),
        ),
        (
            "information_schema",
            "SELECT table_name, column_name FROM information_schema.columns".to_string(),
        ),
        (
            "EXPLAIN ANALYZE",
            "EXPLAIN ANALYZE SELECT legal_rep FROM enterprises".to_string(),
        ),
        (
            "SET a setting",
            "SET datafusion.execution.batch_size = 1".to_string(),
        ),
        ("SHOW ALL", "SHOW ALL".to_string()),
    ] {
        let answer = h.sql("analyst", &sql).await;
        let verdict = match answer {
            Ok(answer) if answer.shows_text(&legal_rep) || answer.shows_text("legal_rep") => {
                Verdict::Leak {
                    recovered: format!("{} rows showing a hidden column", answer.rows.len()),
                    truth: format!("legal_rep is hidden ({legal_rep})"),
                }
            }
            Ok(answer) => Verdict::Leak {
                recovered: format!("answered with {} rows", answer.rows.len()),
                truth: "only SELECT over granted datasets is served".into(),
            },
            Err(rule) => Verdict::Safe(format!("refused: {rule}")),
        };
        h.record(10, name, verdict);
    }

    // 15. Credentials and roles.
    let forged = Client::connect(&h.server.url(), "forged-token-0123456789").await;
    let verdict = match forged {
        Ok(mut client) => match client.datasets().await {
            Ok(datasets) => Verdict::Leak {
                recovered: format!("{} datasets listed", datasets.len()),
                truth: "a forged token is refused".into(),
            },
            Err(status) => Verdict::Safe(format!("refused: {}", refusal(&status))),
        },
        Err(error) => Verdict::Safe(format!("refused: {error}")),
    };
    h.sent += 1;
    h.record(15, "a forged token", verdict);
    let data_as_auditor = h
        .sql(
            "auditor",
            "SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry",
        )
        .await;
    h.record(
        15,
        "the auditor reading data",
        match data_as_auditor {
            Ok(answer) => Verdict::Leak {
                recovered: format!("{} rows", answer.rows.len()),
                truth: "auditors read the journal, not data".into(),
            },
            Err(rule) => Verdict::Safe(format!("refused: {rule}")),
        },
    );
    let mut bank = h.client("bank").await;
    h.sent += 1;
    let journal_as_bank = bank.events(0, 10, true).await;
    h.record(
        15,
        "the bank reading the journal",
        match journal_as_bank {
            Ok(events) => Verdict::Leak {
                recovered: format!("{} events", events.len()),
                truth: "only auditors read the journal".into(),
            },
            Err(status) => Verdict::Safe(format!("refused: {}", refusal(&status))),
        },
    );

    // 16. Oversized and deeply nested text, and a flood of requests.
    let long = format!(
        "SELECT COUNT(*) AS n FROM enterprises WHERE city IN ({})",
        vec!["'x'"; 200_000].join(",")
    );
    let nested = format!(
        "SELECT COUNT(*) AS n FROM enterprises WHERE {}city = 'x'{}",
        "(".repeat(5_000),
        ")".repeat(5_000)
    );
    let _ = h.sql("analyst", &long).await;
    let _ = h.sql("analyst", &nested).await;
    let mut flood = Vec::new();
    for _ in 0..64 {
        let mut client = h.client("analyst").await;
        flood.push(tokio::spawn(async move {
            client
                .sql("SELECT industry, COUNT(*) AS n FROM enterprises GROUP BY industry")
                .await
                .is_ok()
        }));
    }
    h.sent += 64;
    for task in flood {
        let _ = task.await;
    }
    let verdict = if alive(h).await {
        Verdict::Safe("refused or served; the service answers".into())
    } else {
        Verdict::Leak {
            recovered: "the service stopped answering".into(),
            truth: "limits refuse, never crash".into(),
        }
    };
    h.record(
        16,
        "1.6 MB of SQL, 5,000 nested parentheses, 64 concurrent queries",
        verdict,
    );

    // 17. Every release has its durable record, with the digest of what was delivered.
    let released = h
        .sql(
            "analyst",
            "SELECT city, COUNT(*) AS n FROM enterprises GROUP BY city",
        )
        .await;
    let verdict = match released {
        Ok(answer) => {
            let summary = answer.summary.clone().unwrap_or_default();
            let mut auditor = h.client("auditor").await;
            let events = auditor.events(summary.audit_seq, 1, false).await;
            match events.ok().and_then(|e| e.into_iter().next()) {
                Some(event) if event.result_sha256 == summary.result_sha256 => {
                    Verdict::Safe("the journal holds the release and its digest".into())
                }
                other => Verdict::Leak {
                    recovered: format!("a release whose record is {other:?}"),
                    truth: format!("sha256 {}", summary.result_sha256),
                },
            }
        }
        Err(rule) => Verdict::Safe(format!("refused: {rule}")),
    };
    h.record(17, "a release and its journal record", verdict);

    // 18. A flipped byte in an exported journal fails the offline verification.
    let bundle = tempfile::tempdir().expect("tempdir");
    let mut auditor = h.client("auditor").await;
    h.sent += 1;
    let verdict = match auditor.export_journal(bundle.path()).await {
        Ok(_) => {
            let journal = bundle.path().join(sandbox_audit::JOURNAL_FILE);
            let mut bytes = std::fs::read(&journal).expect("exported journal");
            let at = bytes.len() / 2;
            bytes[at] ^= 0x40;
            std::fs::write(&journal, bytes).expect("tampered journal");
            match sandbox_audit::verify_bundle(bundle.path(), None, true) {
                Ok(Ok(report)) => Verdict::Leak {
                    recovered: format!("a tampered bundle verified: {report:?}"),
                    truth: "one flipped byte".into(),
                },
                Ok(Err(failure)) => Verdict::Safe(format!("verification failed: {failure}")),
                Err(error) => Verdict::Safe(format!("verification failed: {error}")),
            }
        }
        Err(error) => Verdict::Safe(format!("export refused: {error}")),
    };
    h.record(18, "a flipped byte in an exported journal", verdict);

    state_growth(h).await;
}

/// Class 28: Many varied exact releases: the org's differencing memory and the time of a release must
/// not grow with history without bound.
async fn state_growth(h: &mut Harness) {
    let queries = if h.full { 2_000 } else { 150 };
    let memory = h.server.data_dir().join("differencing");
    let mut times = Vec::new();
    let mut released = 0;
    for i in 0..queries {
        let sql = format!(
            "SELECT industry, size_class, COUNT(*) AS n FROM enterprises \
             WHERE registered_capital >= {} GROUP BY industry, size_class",
            10_000 * (i + 1)
        );
        let started = Instant::now();
        if h.sql("analyst", &sql).await.is_ok() {
            released += 1;
        }
        times.push(started.elapsed().as_secs_f64());
    }
    let bytes: u64 = std::fs::read_dir(&memory)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    let median = |slice: &[f64]| {
        let mut v = slice.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let window = (queries / 10).max(5);
    let (first, last) = (
        median(&times[..window]),
        median(&times[times.len() - window..]),
    );
    // The documented bound of an org's memory (ARCHITECTURE.md: 20,000 rows of 6,160 bytes and
    // a header); an older build has none.
    let bound = 20_000u64 * 6_160 + 16;
    let verdict = if bytes > bound || last > 5.0 * first.max(0.005) {
        Verdict::Leak {
            recovered: format!(
                "{queries} queries: differencing memory {bytes} bytes, median time {first:.3}s -> {last:.3}s"
            ),
            truth: format!("memory at most {bound} bytes; release time flat"),
        }
    } else {
        Verdict::Safe(format!(
            "{released} of {queries} released; memory {bytes} bytes; median time {first:.3}s -> {last:.3}s"
        ))
    };
    h.record(28, "many varied exact releases by one org", verdict);
}

/// Class 27: Functions with size arguments in the auditors' and owners' SQL. Played last: a build
/// with this bug aborts the whole process, and the harness with it.
pub async fn resource_aborts(h: &mut Harness) {
    // Nested `replace` with a long replacement: each level multiplies the size (20,000^3
    // characters asked for in the end).
    let long = "a".repeat(20_000);
    let nested = format!(
        "SELECT length(replace(replace('{long}', 'a', '{long}'), 'a', '{long}')) AS n FROM events LIMIT 1"
    );
    // A column concatenated with itself thousands of times, row by row.
    let concatenated = format!(
        "SELECT length(concat({})) AS n FROM events",
        vec!["query"; 5_000].join(", ")
    );
    // Found by a reviewer: a long literal from VALUES concatenated over many generated rows, and
    // a recursive query doubling a value each round.
    let values = format!(
        "SELECT max(length(concat({}))) AS n FROM generate_series(1, 100000) g, (VALUES ('{}')) t(v)",
        vec!["v"; 1_000].join(", "),
        "a".repeat(30_000)
    );
    let recursive = "WITH RECURSIVE r(s, n) AS (SELECT query, 1 FROM events UNION ALL \
                     SELECT concat(s, s), n + 1 FROM r WHERE n < 40) SELECT max(length(s)) AS n FROM r";
    // Found by a fresh attacker after the value bound: values within it (a 60 KB query text,
    // concatenated up to 1 MB) on 100,000 generated rows, a reply of gigabytes. The long text
    // comes from a query any consumer may send.
    let long_query = format!(
        "SELECT COUNT(*) AS n FROM enterprises /* {} */",
        "x".repeat(60_000)
    );
    let _ = h.sql("analyst", &long_query).await;
    let many_rows = "SELECT a.query AS v, g.value AS n FROM events a, generate_series(1, 100000) g \
                     WHERE length(a.query) > 60000";
    // And a window, which holds its whole partition outside the memory pool.
    let window = "SELECT max(length(m)) AS n FROM (SELECT max(concat(a.query, b.query)) OVER () AS m \
                  FROM events a, events b WHERE length(a.query) > 50000 AND length(b.query) > 50000) t";
    for (who, sql) in [
        ("auditor", many_rows),
        ("auditor", window),
        ("owner_tax", values.as_str()),
        ("auditor", recursive),
        (
            "owner_tax",
            "SELECT lpad(action, 2147483647, 'x') AS padded FROM events LIMIT 1",
        ),
        (
            "auditor",
            "SELECT repeat(action, 2147483647) AS padded FROM events LIMIT 1",
        ),
        (
            "auditor",
            "SELECT MAX(lpad(query, 2147483647, '中')) AS padded FROM events",
        ),
        ("owner_tax", nested.as_str()),
        // Found by a fresh attacker after the first fix: sizes at most 1,024 each, nested.
        (
            "auditor",
            "SELECT length(repeat(repeat(repeat(substr(action, 1, 1), 1024), 1024), 1000)) AS n FROM events WHERE seq < 32",
        ),
        ("auditor", concatenated.as_str()),
    ] {
        let mut client = h.client(who).await;
        h.sent += 1;
        let outcome = client.audit_sql(sql).await;
        let mut auditor = h.client("auditor").await;
        let recorded = auditor
            .events(0, 20, true)
            .await
            .map(|events| {
                events
                    .iter()
                    .any(|e| e.action == "QueryEvents" && e.query == sql)
            })
            .unwrap_or(false);
        let up = alive(h).await;
        let verdict = match (&outcome, up, recorded) {
            (_, false, _) => Verdict::Leak {
                recovered: "the service died".into(),
                truth: "a query ends within its memory pool".into(),
            },
            (_, true, false) => Verdict::Leak {
                recovered: "the call has no journal event".into(),
                truth: "every call is journaled".into(),
            },
            (Ok((_, response)), true, true) => Verdict::Safe(format!(
                "answered {} bytes; recorded",
                response.arrow_ipc.len()
            )),
            (Err(status), true, true) => {
                Verdict::Safe(format!("refused: {}; recorded", refusal(status)))
            }
        };
        h.record(
            27,
            format!(
                "{who}: gigabytes built in audit SQL ({})",
                sql.chars().take(40).collect::<String>()
            ),
            verdict,
        );
    }
}

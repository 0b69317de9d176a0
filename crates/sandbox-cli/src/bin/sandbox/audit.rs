//! The auditor's commands: read the journal, verify it offline, export it, prove a record, and
//! query it with SQL.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sandbox_cli::output::{Format, Table, Value, rows};
use sandbox_proto::v1 as pb;

use crate::connect::{client, data_dir};
use crate::{Cli, EXIT_OTHER, EXIT_VERIFY_FAILED, Failure, usage};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// The newest events: who did what, the decision and the rule, what was released, a code
    /// job's work units and guest log lines, the state a governance call changed.
    Tail {
        /// How many events (0 prints none).
        #[arg(short = 'n', default_value_t = 20)]
        n: u32,
    },
    /// Verify offline, with no server and no private key: a bundle from `audit export`
    /// (`--bundle`), or the local data dir's journal. Checks every record's framing, checksum,
    /// chain hash and sequence, recomputes the Merkle root for every signed checkpoint and checks
    /// its signature, and with `--trusted-checkpoint` that the journal extends a checkpoint kept
    /// earlier. Exit 1 and the first bad record on any failure; exit 2 when there is nothing to
    /// verify at the path given.
    Verify {
        /// A bundle folder written by `audit export`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// A checkpoint kept earlier (the file `audit checkpoint --out` wrote).
        #[arg(long)]
        trusted_checkpoint: Option<PathBuf>,
    },
    /// Export the journal, its signed checkpoints and public key into a folder, up to a
    /// checkpoint signed for this export.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// The newest signed checkpoint (keep the file `--out` writes for `--trusted-checkpoint`).
    Checkpoint {
        /// Sign a new one covering every record now.
        #[arg(long)]
        fresh: bool,
        /// Also write it to this file, as the one JSON line `verify` reads.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prove that record SEQ is in the journal: fetch its inclusion proof under a fresh signed
    /// checkpoint and check both here.
    Prove { seq: u64 },
    /// Read-only SQL over the journal as the table `events` (auditors: every event; data
    /// owners: the events that touched their datasets).
    Sql {
        /// The query; `-` reads it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        query: Option<String>,
        /// Read the query from this file.
        #[arg(long, short = 'f', value_name = "F")]
        file: Option<PathBuf>,
    },
}

pub async fn run(cli: &Cli, command: &AuditCommand) -> Result<(), Failure> {
    match command {
        AuditCommand::Tail { n } => tail(cli, *n).await,
        AuditCommand::Verify {
            bundle,
            trusted_checkpoint,
        } => verify(cli, bundle.as_deref(), trusted_checkpoint.as_deref()),
        AuditCommand::Export { out } => export(cli, out).await,
        AuditCommand::Checkpoint { fresh, out } => checkpoint(cli, *fresh, out.as_deref()).await,
        AuditCommand::Prove { seq } => prove(cli, *seq).await,
        AuditCommand::Sql { query, file } => {
            let query = crate::jobs::query_text(query.as_deref(), file.as_deref())?;
            audit_sql(cli, &query).await
        }
    }
}

/// A state change's JSON record as `key=value` of its plain fields, for the table.
fn record_summary(json: &str) -> String {
    let Ok(serde_json::Value::Object(fields)) = serde_json::from_str::<serde_json::Value>(json)
    else {
        return json.to_string();
    };
    fields
        .iter()
        .filter_map(|(key, value)| match value {
            serde_json::Value::String(s) if !s.is_empty() => Some(format!("{key}={s}")),
            serde_json::Value::Number(n) => Some(format!("{key}={n}")),
            serde_json::Value::Bool(b) => Some(format!("{key}={b}")),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// What an event is about, in one cell: the query, a code job's work and log, the state change.
fn detail(e: &pb::AuditEvent) -> String {
    let mut parts = Vec::new();
    if !e.query.is_empty() {
        parts.push(e.query.split_whitespace().collect::<Vec<_>>().join(" "));
    }
    if e.work_units > 0 {
        parts.push(format!("work units {}", e.work_units));
    }
    if !e.guest_log.is_empty() {
        parts.push(format!("guest log: {}", e.guest_log.join(" | ")));
    }
    if !e.record_json.is_empty() {
        parts.push(record_summary(&e.record_json));
    }
    if parts.is_empty() && !e.message.is_empty() {
        parts.push(e.message.clone());
    }
    parts.join("; ")
}

/// Every field of an event, and its `detail` in one cell.
fn event_fields(e: &pb::AuditEvent) -> Vec<(&'static str, Value)> {
    vec![
        ("seq", Value::UInt(e.seq)),
        ("time", Value::rfc3339(&e.time)),
        ("action", Value::text(&e.action)),
        ("principal", Value::text(&e.principal)),
        ("org", Value::text(&e.org)),
        ("request_id", Value::text(&e.request_id)),
        ("job_id", Value::text(&e.job_id)),
        ("kind", Value::text(&e.kind)),
        ("query", Value::text(&e.query)),
        ("datasets", Value::List(e.datasets.clone())),
        ("columns", Value::List(e.columns.clone())),
        ("decision", Value::text(&e.decision)),
        ("rule", Value::text(&e.rule)),
        ("message", Value::text(&e.message)),
        ("rows_scanned", Value::UInt(e.rows_scanned)),
        ("rows_released", Value::UInt(e.rows_released)),
        ("rows_suppressed", Value::UInt(e.rows_suppressed)),
        ("epsilon_spent", Value::Float(e.epsilon_spent)),
        ("result_sha256", Value::text(&e.result_sha256)),
        ("work_units", Value::UInt(e.work_units)),
        ("guest_log", Value::List(e.guest_log.clone())),
        (
            "record",
            match serde_json::from_str(&e.record_json) {
                Ok(value) => Value::Json(value),
                Err(_) => Value::text(&e.record_json),
            },
        ),
        ("chain_hash", Value::text(&e.chain_hash)),
        ("detail", Value::text(detail(e))),
    ]
}

async fn tail(cli: &Cli, n: u32) -> Result<(), Failure> {
    let events = if n == 0 {
        Vec::new()
    } else {
        client(cli).await?.events(0, n, true).await?
    };
    // For people, who did what and what it was about; for programs, every field.
    let only: &[&str] = &[
        "seq",
        "time",
        "action",
        "principal",
        "org",
        "decision",
        "rule",
        "rows_released",
        "detail",
    ];
    let only = (cli.format == Format::Table).then_some(only);
    let table = Table::from_records(events.iter().map(event_fields).collect(), only);
    cli.print(&table);
    Ok(())
}

fn verify(cli: &Cli, bundle: Option<&Path>, trusted: Option<&Path>) -> Result<(), Failure> {
    let failed = |message: String| {
        Failure::new(
            EXIT_VERIFY_FAILED,
            format!("journal verification FAILED: {message}"),
        )
    };
    // Nothing to verify at the path given is a mistake of the command, not a tampered journal:
    // exit 2, never the tamper alarm.
    let (dir, whole) = match bundle {
        Some(dir) => (dir.to_path_buf(), true),
        None => (data_dir(cli).join("audit"), false),
    };
    if !dir.is_dir() {
        return Err(usage(match bundle {
            Some(_) => format!(
                "no bundle folder at {}: give the folder `audit export --out` wrote",
                dir.display()
            ),
            None => format!(
                "no journal at {}: give the server's data dir with --data-dir, or a bundle with \
                 --bundle",
                dir.display()
            ),
        }));
    }
    let trusted = match trusted {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage(format!(
                    "cannot read the trusted checkpoint {}: {e}",
                    path.display()
                ))
            })?;
            Some(sandbox_audit::Checkpoint::from_json(&text).map_err(|e| {
                usage(format!(
                    "{} is not a checkpoint (`audit checkpoint --out` writes one): {e}",
                    path.display()
                ))
            })?)
        }
        None => None,
    };
    let report = match sandbox_audit::verify_bundle(&dir, trusted.as_ref(), whole) {
        Ok(Ok(report)) => report,
        Ok(Err(failure)) => return Err(failed(failure.to_string())),
        Err(e) => return Err(failed(e.to_string())),
    };
    let covered = report.latest.as_ref().map_or(0, |c| c.size);
    let latest = report.latest.as_ref();
    cli.print(&Table::record(vec![
        ("journal", Value::text("OK")),
        ("records", Value::UInt(report.records)),
        ("signed_checkpoints", Value::UInt(report.checkpoints)),
        ("newest_checkpoint_covers", Value::UInt(covered)),
        (
            "newest_root",
            latest.map_or(Value::Null, |c| Value::text(&c.root)),
        ),
        (
            "newest_signed_at",
            latest.map_or(Value::Null, |c| Value::rfc3339(&c.time)),
        ),
        (
            "chained_not_signed_yet",
            Value::UInt(report.records.saturating_sub(covered)),
        ),
        (
            "extends_trusted_checkpoint_of",
            report.trusted_size.map_or(Value::Null, Value::UInt),
        ),
    ]));
    Ok(())
}

async fn export(cli: &Cli, out: &Path) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    // A progress line on a terminal (indicatif draws nothing when stderr is not one).
    let progress = indicatif::ProgressBar::new_spinner().with_style(
        indicatif::ProgressStyle::with_template("{spinner} exporting: {binary_bytes} written")
            .expect("a valid template"),
    );
    let written = client
        .export_journal_with_progress(out, |bytes| progress.set_position(bytes))
        .await
        .map_err(|e| match e {
            sandbox_cli::ExportError::Status(status) => Failure::from(status),
            other => Failure::new(EXIT_OTHER, format!("error: {other}")),
        });
    progress.finish_and_clear();
    let mut table = Table::new(&["file", "bytes"]);
    for (name, bytes) in written? {
        table.push(vec![
            Value::text(out.join(name).display().to_string()),
            Value::UInt(bytes),
        ]);
    }
    cli.print(&table);
    eprintln!(
        "verify it with: sandbox audit verify --bundle {}",
        out.display()
    );
    Ok(())
}

async fn checkpoint(cli: &Cli, fresh: bool, out: Option<&Path>) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let checkpoint = client.checkpoint(fresh).await?;
    if let Some(path) = out {
        std::fs::write(path, format!("{}\n", checkpoint.json)).map_err(|e| {
            Failure::new(
                EXIT_OTHER,
                format!("error: cannot write {}: {e}", path.display()),
            )
        })?;
    }
    let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&checkpoint.json)
        .map_err(|e| {
            Failure::new(
                EXIT_OTHER,
                format!("error: the server sent a checkpoint that is not a JSON object: {e}"),
            )
        })?;
    let record: Vec<(&str, Value)> = fields
        .iter()
        .map(|(key, value)| {
            let value = match value {
                serde_json::Value::String(s) if key == "time" => Value::rfc3339(s),
                serde_json::Value::String(s) => Value::text(s),
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .map_or_else(|| Value::Json(value.clone()), Value::UInt),
                other => Value::Json(other.clone()),
            };
            (key.as_str(), value)
        })
        .collect();
    cli.print(&Table::record(record));
    if let Some(path) = out {
        eprintln!(
            "kept in {}; verify a later export against it with --trusted-checkpoint",
            path.display()
        );
    }
    Ok(())
}

async fn audit_sql(cli: &Cli, query: &str) -> Result<(), Failure> {
    let (batches, response) = client(cli).await?.audit_sql(query).await?;
    cli.print(&Table::from_batches(&batches).map_err(anyhow::Error::from)?);
    eprintln!("{} over {} events", rows(response.rows), response.events);
    Ok(())
}

async fn prove(cli: &Cli, seq: u64) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let proof = client.inclusion_proof(seq, 0).await?;
    let failed = |message: &str| {
        Failure::new(
            EXIT_VERIFY_FAILED,
            format!("proof of record {seq} FAILED: {message}"),
        )
    };
    let checkpoint = proof
        .checkpoint
        .as_ref()
        .ok_or_else(|| failed("no signed checkpoint came with the proof"))?;
    let signed = sandbox_audit::Checkpoint::from_json(&checkpoint.json).map_err(|e| failed(&e))?;
    let key = hex::decode(&checkpoint.public_key).map_err(|_| failed("bad public key"))?;
    if !signed.verify(&key) {
        return Err(failed("the checkpoint's signature does not verify"));
    }
    let hashes: Option<Vec<[u8; 32]>> = proof
        .hashes
        .iter()
        .map(|h| hex::decode(h).ok()?.try_into().ok())
        .collect();
    let root = signed.root_hash().ok_or_else(|| failed("bad root"))?;
    let leaf = sandbox_audit::merkle::leaf_hash(&proof.record);
    let included = hashes
        .zip(seq.checked_sub(1))
        .is_some_and(|(hashes, index)| {
            sandbox_audit::merkle::verify_inclusion(&leaf, index, signed.size, &hashes, &root)
        });
    if !included || proof.tree_size != signed.size {
        return Err(failed(
            "the inclusion proof does not verify against the signed root",
        ));
    }
    cli.print(&Table::record(vec![
        ("record", Value::UInt(seq)),
        ("included", Value::text("yes")),
        ("journal_records", Value::UInt(signed.size)),
        ("signed_at", Value::rfc3339(&signed.time)),
        ("root", Value::text(&signed.root)),
        (
            "content",
            Value::text(String::from_utf8_lossy(&proof.record).into_owned()),
        ),
    ]));
    Ok(())
}

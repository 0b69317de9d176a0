//! `sandbox`: the command-line client of the data sandbox.
//!
//! Exit codes: 0 success; 1 audit verification failed; 2 usage error; 3 denied by policy;
//! 4 unauthenticated or not permitted; 5 any other failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use arrow::array::RecordBatch;
use clap::{Parser, Subcommand, ValueEnum};
use sandbox_cli::{Client, ConnectError, TlsFiles};
use sandbox_proto::v1 as pb;

/// Prints a line to stdout. A closed pipe (`sandbox ... | head`) ends output quietly instead of
/// panicking like `println!` would.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

const EXIT_VERIFY_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_DENIED: u8 = 3;
const EXIT_NOT_PERMITTED: u8 = 4;
const EXIT_OTHER: u8 = 5;

#[derive(Debug, Parser)]
#[command(name = "sandbox", version, about = "Client of the data sandbox")]
struct Cli {
    /// Server address.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:50051",
        env = "SANDBOX_ADDR"
    )]
    addr: String,
    /// Act as this principal: reads `<data-dir>/credentials/NAME.token`, and over `https://`
    /// also `<data-dir>/tls/ca.pem` and the client certificate `tls/clients/NAME.{pem,key}`.
    #[arg(
        long = "as",
        global = true,
        value_name = "NAME",
        conflicts_with = "token_file"
    )]
    as_principal: Option<String>,
    /// Read the bearer token from this file.
    #[arg(long, global = true, value_name = "F")]
    token_file: Option<PathBuf>,
    /// TLS: trust this CA certificate (PEM) for the server's certificate.
    #[arg(long, global = true, value_name = "F")]
    ca: Option<PathBuf>,
    /// mTLS: the client certificate (PEM); the principal is the one it names.
    #[arg(long, global = true, value_name = "F", requires = "key")]
    cert: Option<PathBuf>,
    /// mTLS: the client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "F", requires = "cert")]
    key: Option<PathBuf>,
    /// Data dir of a local server (for `--as` and `audit verify`).
    #[arg(long, global = true, default_value = "./sandbox-data")]
    data_dir: PathBuf,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Csv,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the datasets you may use: schemas, roles and levels.
    Datasets,
    /// Run an aggregate query and print the released rows; the release summary goes to stderr.
    Sql {
        query: String,
        /// Run under differential privacy (noisy answers, debited from your org's budget).
        #[arg(long)]
        dp: bool,
        /// The epsilon to spend under differential privacy (implies --dp); default: the grant's.
        #[arg(long)]
        epsilon: Option<f64>,
    },
    /// Show the policy decision for a query without running it.
    Explain { query: String },
    /// Read the audit journal (auditor role).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Validate policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Upload, review and list WASM modules.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Run approved WASM code.
    #[command(subcommand)]
    Wasm(WasmCommand),
    /// Manage consents (admins; consumers list and revoke their own).
    #[command(subcommand)]
    Consent(ConsentCommand),
    /// Submit, approve, list and run approved SQL templates.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Privacy budgets under differential privacy.
    #[command(subcommand)]
    Budget(BudgetCommand),
}

#[derive(Debug, Subcommand)]
enum BudgetCommand {
    /// Show the budgets you may see: your org's, your datasets' (owner), all (auditor).
    Show,
    /// Renew a consumer org's budget on one of your datasets (owner); recorded with the reason.
    Refresh {
        #[arg(long)]
        org: String,
        #[arg(long)]
        dataset: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum TemplateCommand {
    /// Submit a template (TOML) for the owners' approval (consumer, analyst).
    Submit { file: PathBuf },
    /// Approve a template for your datasets among those it reads (owner).
    Approve {
        sha256: String,
        /// Most runs allowed.
        #[arg(long, default_value_t = 100)]
        max_runs: u64,
        /// Days the approval stays valid.
        #[arg(long, default_value_t = 90)]
        valid_days: u64,
    },
    /// List your org's templates, or, as an owner, those reading your datasets.
    List,
    /// Run an approved template by name; print the released rows.
    Run {
        name: String,
        /// A parameter value, `key=value`; repeat for each parameter.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
}

fn parse_param(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("`{text}` is not key=value"))
}

#[derive(Debug, Subcommand)]
enum ModuleCommand {
    /// Upload a module (consumer); prints its SHA-256 and state.
    Upload {
        file: PathBuf,
        /// Attach this input query (a `.sql` file) as the module's `sandbox.input` section, for a
        /// module built without the guest SDK's `input!`. The owners approve it with the bytes.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Approve a module for your datasets among its declared input (owner).
    Approve {
        sha256: String,
        /// Output contract (TOML); default: integer score 0-1000 and grade A-E per entity.
        #[arg(long)]
        contract: Option<PathBuf>,
        /// Most runs allowed.
        #[arg(long, default_value_t = 100)]
        max_runs: u64,
        /// Days the approval stays valid.
        #[arg(long, default_value_t = 90)]
        valid_days: u64,
        /// Allow only these columns (dataset.column, comma separated); default: every declared
        /// column of your datasets.
        #[arg(long, value_delimiter = ',')]
        columns: Vec<String>,
    },
    /// Reject a module, withdrawing your approval (owner).
    Reject {
        sha256: String,
        #[arg(long)]
        reason: String,
    },
    /// List the modules you may see.
    List,
}

#[derive(Debug, Subcommand)]
enum WasmCommand {
    /// Run an approved module (by hash, or by file: its hash is computed locally) over an input
    /// query; print the released rows.
    Run {
        /// SHA-256 of an uploaded module, or the module file.
        module: String,
        /// The input query: empty for the one the module declares (the only one it runs on;
        /// another is refused with `input-not-approved`).
        #[arg(long, default_value = "")]
        input: String,
        /// Job parameters (JSON) passed to the module.
        #[arg(long, default_value = "{}")]
        params: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConsentCommand {
    /// Record an enterprise's consent to a consumer org (admin).
    Add {
        /// The privacy unit value (e.g. a credit code).
        unit: String,
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "credit_assessment")]
        purpose: String,
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
    },
    /// Revoke a consent.
    Revoke {
        unit: String,
        #[arg(long)]
        org: String,
        #[arg(long, default_value = "credit_assessment")]
        purpose: String,
    },
    /// List consents (admins: all or --org; consumers: their own).
    List {
        #[arg(long, default_value = "")]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// The newest events.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        n: u32,
    },
    /// Verify offline, with no server and no private key: a bundle from `audit export`
    /// (`--bundle`), or the local data dir's journal. Checks every record's framing, checksum,
    /// chain hash and sequence, recomputes the Merkle root for every signed checkpoint and checks
    /// its signature, and with `--trusted-checkpoint` that the journal extends a checkpoint kept
    /// earlier. Exit 1 and the first bad record on any failure.
    Verify {
        /// A bundle folder written by `audit export`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// A checkpoint kept earlier (the JSON line printed by `audit checkpoint`).
        #[arg(long)]
        trusted_checkpoint: Option<PathBuf>,
    },
    /// Export the journal, its signed checkpoints and public key into a folder, up to a
    /// checkpoint signed for this export.
    Export {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the newest signed checkpoint as one JSON line (keep it for `--trusted-checkpoint`).
    Checkpoint {
        /// Sign a new one covering every record now.
        #[arg(long)]
        fresh: bool,
        /// Also write it to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prove that record SEQ is in the journal: fetch its inclusion proof under a fresh signed
    /// checkpoint and check both here.
    Prove { seq: u64 },
    /// Read-only SQL over the journal as the table `events` (auditors: every event; data
    /// owners: the events that touched their datasets).
    Sql { query: String },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Load a policy directory strictly and report the first error with file and line.
    Check {
        #[arg(default_value = "policies")]
        dir: PathBuf,
    },
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure {
            code: EXIT_OTHER,
            message: format!("{e:#}"),
        }
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::FailedPrecondition => EXIT_DENIED,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => EXIT_NOT_PERMITTED,
            _ => EXIT_OTHER,
        };
        let retry = sandbox_cli::retry_after(&status)
            .map(|wait| format!(" (the server asks to retry after {} ms)", wait.as_millis()))
            .unwrap_or_default();
        Failure {
            code,
            message: format!("{}: {}{retry}", code_name(status.code()), status.message()),
        }
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::FailedPrecondition => "denied",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "not permitted",
        tonic::Code::InvalidArgument => "invalid request",
        tonic::Code::ResourceExhausted => "resources exhausted",
        tonic::Code::Unavailable => "server unavailable",
        _ => "error",
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(EXIT_OTHER);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Audit(AuditCommand::Verify {
            bundle,
            trusted_checkpoint,
        }) => verify(
            &cli.data_dir,
            bundle.as_deref(),
            trusted_checkpoint.as_deref(),
        ),
        Command::Policy(PolicyCommand::Check { dir }) => policy_check(dir),
        Command::Datasets => datasets(&cli).await,
        Command::Sql { query, dp, epsilon } => sql(&cli, query, *dp, *epsilon).await,
        Command::Explain { query } => explain(&cli, query).await,
        Command::Audit(AuditCommand::Tail { n }) => tail(&cli, *n).await,
        Command::Audit(AuditCommand::Export { out }) => export(&cli, out).await,
        Command::Audit(AuditCommand::Checkpoint { fresh, out }) => {
            checkpoint(&cli, *fresh, out.as_deref()).await
        }
        Command::Audit(AuditCommand::Prove { seq }) => prove(&cli, *seq).await,
        Command::Audit(AuditCommand::Sql { query }) => audit_sql(&cli, query).await,
        Command::Module(command) => module(&cli, command).await,
        Command::Wasm(WasmCommand::Run {
            module,
            input,
            params,
        }) => wasm_run(&cli, module, input, params).await,
        Command::Consent(command) => consent(&cli, command).await,
        Command::Template(command) => template(&cli, command).await,
        Command::Budget(command) => budget(&cli, command).await,
    }
}

/// One owner's approval of a module or a template, in table form.
/// The state lines of a module or a template: why it may not run, each owner's approval (org,
/// approver, datasets, run limit, expiry) and its runs.
fn print_state<'a>(
    reason: &str,
    approvals: impl Iterator<Item = (&'a str, &'a str, &'a [String], u64, u64)>,
    runs: u64,
    runs_left: u64,
) {
    if !reason.is_empty() {
        out!("    reason:  {reason}");
    }
    for (org, by, datasets, max_runs, expires_at) in approvals {
        out!(
            "    approved by {org} ({by}) for {}: {max_runs} runs, expires {expires_at}",
            datasets.join(", ")
        );
    }
    out!("    runs: {runs} (left {runs_left})");
}

fn print_template(t: &pb::Template, format: Format) {
    match format {
        Format::Json => out!(
            "{}",
            serde_json::json!({
                "sha256": t.sha256, "name": t.name, "description": t.description, "sql": t.sql,
                "mode": t.mode, "min_units": t.min_units,
                "contract": serde_json::from_str::<serde_json::Value>(&t.contract_json)
                    .unwrap_or_default(),
                "params": t.params.iter().map(|p| serde_json::json!({
                    "name": p.name, "type": p.r#type,
                })).collect::<Vec<_>>(),
                "datasets": t.datasets, "org": t.org, "submitted_by": t.submitted_by,
                "state": t.state, "reason": t.reason, "runs": t.runs, "runs_left": t.runs_left,
                "approvals": t.approvals.iter().map(|a| serde_json::json!({
                    "org": a.org, "approved_by": a.approved_by, "datasets": a.datasets,
                    "max_runs": a.max_runs, "expires_at": a.expires_at,
                })).collect::<Vec<_>>(),
            })
        ),
        _ => {
            out!(
                "{}  {}  ({}; {}; org {})",
                t.sha256,
                t.name,
                t.state,
                t.mode,
                t.org
            );
            if !t.description.is_empty() {
                out!("    {}", t.description);
            }
            out!("    reads:   {}", t.datasets.join(", "));
            let params: Vec<String> = t
                .params
                .iter()
                .map(|p| format!("{}: {}", p.name, p.r#type))
                .collect();
            out!("    params:  {}", params.join(", "));
            let approvals = t.approvals.iter().map(|a| {
                let datasets: &[String] = &a.datasets;
                (
                    a.org.as_str(),
                    a.approved_by.as_str(),
                    datasets,
                    a.max_runs,
                    a.expires_at,
                )
            });
            print_state(&t.reason, approvals, t.runs, t.runs_left);
        }
    }
}

async fn template(cli: &Cli, command: &TemplateCommand) -> Result<(), Failure> {
    match command {
        TemplateCommand::Submit { file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
            let template = client(cli).await?.submit_template(&text).await?;
            print_template(&template, cli.format);
        }
        TemplateCommand::Approve {
            sha256,
            max_runs,
            valid_days,
        } => {
            let template = client(cli)
                .await?
                .approve_template(sha256, *max_runs, *valid_days)
                .await?;
            print_template(&template, cli.format);
        }
        TemplateCommand::List => {
            for template in client(cli).await?.templates().await? {
                print_template(&template, cli.format);
            }
        }
        TemplateCommand::Run { name, params } => {
            let result = client(cli)
                .await?
                .template(name, params.iter().cloned().collect())
                .await?;
            print_batches(&result.batches, cli.format)?;
            let summary = result.summary;
            eprintln!(
                "released {} rows; job {}; audit seq {}; sha256 {}",
                summary.rows_released, result.job_id, summary.audit_seq, summary.result_sha256
            );
        }
    }
    Ok(())
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_USAGE,
        message: message.into(),
    }
}

fn print_module(m: &pb::Module, format: Format) {
    match format {
        Format::Json => out!(
            "{}",
            serde_json::json!({
                "sha256": m.sha256, "name": m.name, "purpose": m.purpose, "input": m.input,
                "input_query": m.input_query,
                "org": m.org, "uploaded_by": m.uploaded_by, "size": m.size, "state": m.state,
                "reason": m.reason, "runs": m.runs, "runs_left": m.runs_left,
                "approvals": m.approvals.iter().map(|a| serde_json::json!({
                    "org": a.org, "approved_by": a.approved_by, "datasets": a.datasets,
                    "columns": a.columns, "max_runs": a.max_runs, "expires_at": a.expires_at,
                    "contract": serde_json::from_str::<serde_json::Value>(&a.contract_json)
                        .unwrap_or_default(),
                })).collect::<Vec<_>>(),
            })
        ),
        _ => {
            out!(
                "{}  {}  ({}; {} bytes; org {})",
                m.sha256,
                m.name,
                m.state,
                m.size,
                m.org
            );
            out!("    purpose: {}", m.purpose);
            out!("    input:   {}", m.input.join(", "));
            out!(
                "    query:   {}",
                m.input_query
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let approvals = m.approvals.iter().map(|a| {
                let datasets: &[String] = &a.datasets;
                (
                    a.org.as_str(),
                    a.approved_by.as_str(),
                    datasets,
                    a.max_runs,
                    a.expires_at,
                )
            });
            print_state(&m.reason, approvals, m.runs, m.runs_left);
        }
    }
}

async fn module(cli: &Cli, command: &ModuleCommand) -> Result<(), Failure> {
    match command {
        ModuleCommand::Upload { file, input } => {
            let mut bytes = std::fs::read(file)
                .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
            if let Some(path) = input {
                let query = std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
                bytes = sandbox_cli::with_input_section(bytes, &query);
            }
            let module = client(cli).await?.upload_module(bytes).await?;
            print_module(&module, cli.format);
        }
        ModuleCommand::Approve {
            sha256,
            contract,
            max_runs,
            valid_days,
            columns,
        } => {
            let contract_toml = match contract {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?,
                None => String::new(),
            };
            let module = client(cli)
                .await?
                .approve_module(pb::ApproveModuleRequest {
                    sha256: sha256.clone(),
                    contract_toml,
                    max_runs: *max_runs,
                    valid_days: *valid_days,
                    columns: columns.clone(),
                })
                .await?;
            print_module(&module, cli.format);
        }
        ModuleCommand::Reject { sha256, reason } => {
            let module = client(cli).await?.reject_module(sha256, reason).await?;
            print_module(&module, cli.format);
        }
        ModuleCommand::List => {
            for module in client(cli).await?.modules().await? {
                print_module(&module, cli.format);
            }
        }
    }
    Ok(())
}

async fn wasm_run(cli: &Cli, module: &str, input: &str, params: &str) -> Result<(), Failure> {
    serde_json::from_str::<serde_json::Value>(params)
        .map_err(|e| usage(format!("--params is not JSON: {e}")))?;
    let is_hash = module.len() == 64 && module.chars().all(|c| c.is_ascii_hexdigit());
    let sha256 = if is_hash {
        module.to_ascii_lowercase()
    } else {
        let bytes = std::fs::read(module).map_err(|e| {
            usage(format!(
                "`{module}` is neither a SHA-256 nor a readable file: {e}"
            ))
        })?;
        sandbox_cli::module_sha256(&bytes)
    };
    let result = client(cli)
        .await?
        .wasm(&sha256, input, params.as_bytes())
        .await?;
    print_batches(&result.batches, cli.format)?;
    let summary = result.summary;
    // A code job reports only what it released; the rest is in the audit journal.
    eprintln!(
        "released {} rows; job {}; audit seq {}; sha256 {}",
        summary.rows_released, result.job_id, summary.audit_seq, summary.result_sha256
    );
    Ok(())
}

async fn consent(cli: &Cli, command: &ConsentCommand) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let consents = match command {
        ConsentCommand::Add {
            unit,
            org,
            purpose,
            valid_days,
        } => vec![
            client
                .add_consent(pb::AddConsentRequest {
                    unit: unit.clone(),
                    consumer_org: org.clone(),
                    purpose: purpose.clone(),
                    valid_days: *valid_days,
                })
                .await?,
        ],
        ConsentCommand::Revoke { unit, org, purpose } => {
            client
                .revoke_consent(pb::RevokeConsentRequest {
                    unit: unit.clone(),
                    consumer_org: org.clone(),
                    purpose: purpose.clone(),
                })
                .await?;
            out!("revoked");
            return Ok(());
        }
        ConsentCommand::List { org } => client.consents(org).await?,
    };
    match cli.format {
        Format::Json => {
            for c in &consents {
                out!(
                    "{}",
                    serde_json::json!({
                        "unit": c.unit, "consumer_org": c.consumer_org, "purpose": c.purpose,
                        "granted_at": c.granted_at, "expires_at": c.expires_at,
                    })
                );
            }
        }
        _ => {
            out!("unit,consumer_org,purpose,granted_at,expires_at");
            for c in &consents {
                out!(
                    "{},{},{},{},{}",
                    c.unit,
                    c.consumer_org,
                    c.purpose,
                    c.granted_at,
                    c.expires_at
                );
            }
        }
    }
    Ok(())
}

fn verify(data_dir: &Path, bundle: Option<&Path>, trusted: Option<&Path>) -> Result<(), Failure> {
    let failed = |message: String| Failure {
        code: EXIT_VERIFY_FAILED,
        message: format!("journal verification FAILED: {message}"),
    };
    let trusted = match trusted {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
            Some(sandbox_audit::Checkpoint::from_json(&text).map_err(failed)?)
        }
        None => None,
    };
    // A data dir is verified like a bundle of its audit folder, except that records after the
    // newest checkpoint (written since) are allowed there.
    let (dir, whole) = match bundle {
        Some(dir) => (dir.to_path_buf(), true),
        None => (data_dir.join("audit"), false),
    };
    match sandbox_audit::verify_bundle(&dir, trusted.as_ref(), whole) {
        Ok(Ok(report)) => {
            out!(
                "journal OK: {} records, {} signed checkpoints",
                report.records,
                report.checkpoints
            );
            let covered = report.latest.as_ref().map_or(0, |c| c.size);
            if let Some(latest) = &report.latest {
                out!(
                    "the newest checkpoint covers {} records: root {}, signed {}",
                    latest.size,
                    latest.root,
                    latest.time
                );
            }
            if report.records > covered {
                out!(
                    "note: {} records after the newest checkpoint are chained but not signed yet",
                    report.records - covered
                );
            }
            if let Some(size) = report.trusted_size {
                out!("consistent with the trusted checkpoint of {size} records");
            }
            Ok(())
        }
        Ok(Err(failure)) => Err(failed(failure.to_string())),
        Err(e) => Err(failed(e.to_string())),
    }
}

async fn export(cli: &Cli, out: &Path) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let written = client.export_journal(out).await.map_err(|e| match e {
        sandbox_cli::ExportError::Status(status) => Failure::from(status),
        other => Failure {
            code: EXIT_OTHER,
            message: other.to_string(),
        },
    })?;
    for (name, bytes) in written {
        out!("{}: {bytes} bytes", out.join(name).display());
    }
    out!(
        "verify it with: sandbox audit verify --bundle {}",
        out.display()
    );
    Ok(())
}

async fn checkpoint(cli: &Cli, fresh: bool, out: Option<&Path>) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let checkpoint = client.checkpoint(fresh).await?;
    out!("{}", checkpoint.json);
    if let Some(path) = out {
        std::fs::write(path, format!("{}\n", checkpoint.json)).map_err(|e| Failure {
            code: EXIT_OTHER,
            message: format!("cannot write {}: {e}", path.display()),
        })?;
    }
    Ok(())
}

async fn audit_sql(cli: &Cli, query: &str) -> Result<(), Failure> {
    let (batches, response) = client(cli).await?.audit_sql(query).await?;
    if response.rows > 0 {
        print_batches(&batches, cli.format)?;
    }
    eprintln!("{} rows over {} events", response.rows, response.events);
    Ok(())
}

async fn prove(cli: &Cli, seq: u64) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let proof = client.inclusion_proof(seq, 0).await?;
    let failed = |message: &str| Failure {
        code: EXIT_VERIFY_FAILED,
        message: format!("proof of record {seq} FAILED: {message}"),
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
    out!("{}", String::from_utf8_lossy(&proof.record));
    out!(
        "record {seq} is in the journal of {} records signed at {} (root {})",
        signed.size,
        signed.time,
        signed.root
    );
    Ok(())
}

fn policy_check(dir: &Path) -> Result<(), Failure> {
    let policy = sandbox_policy::load_dir(dir).map_err(|e| Failure {
        code: EXIT_OTHER,
        message: format!("policy invalid: {e}"),
    })?;
    out!(
        "policy OK: {} datasets, {} grants in {}",
        policy.datasets.len(),
        policy.grants.len(),
        dir.display()
    );
    Ok(())
}

/// The bearer token the options name, if any.
fn token(cli: &Cli) -> Result<Option<String>, Failure> {
    let from_file = |path: &Path| -> Result<String, Failure> {
        let text = std::fs::read_to_string(path).map_err(|e| Failure {
            code: EXIT_USAGE,
            message: format!("cannot read token file {}: {e}", path.display()),
        })?;
        Ok(text.trim().to_string())
    };
    if let Some(path) = &cli.token_file {
        return from_file(path).map(Some);
    }
    if let Some(name) = &cli.as_principal {
        let path = cli
            .data_dir
            .join("credentials")
            .join(format!("{name}.token"));
        // Over TLS a client certificate may stand in for the token.
        if cli.addr.starts_with("https://") && !path.exists() {
            return Ok(None);
        }
        return from_file(&path).map(Some);
    }
    match std::env::var("SANDBOX_TOKEN") {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        _ => Ok(None),
    }
}

/// The TLS files the options name: `--ca/--cert/--key`, else the data dir's for `--as NAME`
/// over `https://`.
fn tls_files(cli: &Cli) -> Option<TlsFiles> {
    if cli.ca.is_some() || cli.cert.is_some() {
        return Some(TlsFiles {
            ca: cli.ca.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
        });
    }
    if !cli.addr.starts_with("https://") {
        return None;
    }
    let mut files = TlsFiles::default();
    if let Some(name) = &cli.as_principal {
        let found = TlsFiles::in_data_dir(&cli.data_dir, name);
        files.ca = found.ca.filter(|p| p.exists());
        if found.cert.as_ref().is_some_and(|p| p.exists()) {
            files.cert = found.cert;
            files.key = found.key;
        }
    }
    Some(files)
}

/// A client authenticated as the principal the options name.
async fn client(cli: &Cli) -> Result<Client, Failure> {
    let token = token(cli)?;
    let tls = tls_files(cli);
    Client::connect_with(&cli.addr, token.as_deref(), tls.as_ref())
        .await
        .map_err(|e| Failure {
            code: match e {
                ConnectError::Transport { .. } => EXIT_OTHER,
                ConnectError::NoCredentials => EXIT_USAGE,
                ConnectError::Address(_) | ConnectError::Token | ConnectError::File { .. } => {
                    EXIT_USAGE
                }
            },
            message: match e {
                ConnectError::NoCredentials => "no credentials: use --as NAME, --token-file F, \
                    SANDBOX_TOKEN, or --cert F --key F over https://"
                    .to_string(),
                e => e.to_string(),
            },
        })
}

async fn sql(cli: &Cli, query: &str, dp: bool, epsilon: Option<f64>) -> Result<(), Failure> {
    let spec = if dp || epsilon.is_some() {
        sandbox_cli::Client::dp_spec(query, epsilon)
    } else {
        sandbox_cli::Client::sql_spec(query)
    };
    let result = client(cli).await?.run(spec).await?;
    let summary = result.summary;
    if let Some(dp) = &summary.dp {
        // Each noisy value with its 95% interval beside it, in a table; the raw values in CSV
        // and JSON (the intervals on stderr).
        let noise: Vec<(String, f64, Vec<f64>)> = dp
            .columns
            .iter()
            .filter(|c| c.scale > 0.0)
            .map(|c| (c.column.clone(), c.accuracy_95, c.rows_95.clone()))
            .collect();
        if matches!(cli.format, Format::Table) {
            print_batches(&with_intervals(&result.batches, &noise)?, cli.format)?;
        } else {
            print_batches(&result.batches, cli.format)?;
        }
        let noise: Vec<String> = noise
            .iter()
            .map(|(column, accuracy, rows)| {
                if rows.is_empty() {
                    format!("{column} ±{}", round_for_display(*accuracy))
                } else {
                    format!("{column} (per row, beside it)")
                }
            })
            .collect();
        eprintln!(
            "differential privacy: spent epsilon {:.4} delta {}{}; your org has epsilon {:.4} \
             and delta {} left; 95% of values within: {}; {} rows released; job {}; audit \
             seq {}; sha256 {}",
            dp.epsilon_spent,
            short_float(dp.delta_spent),
            if dp.cached {
                " (the same answer as before, at no cost)"
            } else {
                ""
            },
            dp.epsilon_remaining,
            short_float(dp.delta_remaining),
            noise.join(", "),
            summary.rows_released,
            result.job_id,
            summary.audit_seq,
            summary.result_sha256
        );
        return Ok(());
    }
    print_batches(&result.batches, cli.format)?;
    eprintln!(
        "exact: {} rows released{}; rows covering fewer than {} distinct units, and rows near \
         what any org was released before, are withheld without a count; job {}; audit seq {}; \
         sha256 {}",
        summary.rows_released,
        if summary.stored {
            " (the same answer as before, from the store)"
        } else {
            ""
        },
        summary.min_units,
        result.job_id,
        summary.audit_seq,
        summary.result_sha256
    );
    Ok(())
}

/// A number rounded to what its interval makes meaningful: whole numbers above 10, two
/// decimals below.
fn round_for_display(value: f64) -> String {
    if value.abs() >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// The batches with each noisy column rendered as `value ±interval` (a row's own interval where
/// the column has one per row), for the table.
fn with_intervals(
    batches: &[RecordBatch],
    noise: &[(String, f64, Vec<f64>)],
) -> anyhow::Result<Vec<RecordBatch>> {
    use arrow::array::{ArrayRef, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let mut out = Vec::with_capacity(batches.len());
    let mut first_row = 0;
    for batch in batches {
        let schema = batch.schema();
        let mut fields = Vec::new();
        let mut columns: Vec<ArrayRef> = Vec::new();
        for (field, column) in schema.fields().iter().zip(batch.columns()) {
            match noise.iter().find(|(name, _, _)| name == field.name()) {
                Some((_, accuracy, rows)) => {
                    let values = arrow::compute::cast(column, &DataType::Float64)?;
                    let values = values
                        .as_any()
                        .downcast_ref::<arrow::array::Float64Array>()
                        .ok_or_else(|| anyhow::anyhow!("a noisy column is not numeric"))?;
                    let text: StringArray = values
                        .iter()
                        .enumerate()
                        .map(|(row, v)| {
                            let interval = rows.get(first_row + row).copied().unwrap_or(*accuracy);
                            v.map(|v| {
                                format!("{} ±{}", round_for_display(v), round_for_display(interval))
                            })
                        })
                        .collect();
                    fields.push(Field::new(field.name(), DataType::Utf8, true));
                    columns.push(std::sync::Arc::new(text));
                }
                None => {
                    fields.push(field.as_ref().clone());
                    columns.push(column.clone());
                }
            }
        }
        first_row += batch.num_rows();
        out.push(RecordBatch::try_new(
            std::sync::Arc::new(Schema::new(fields)),
            columns,
        )?);
    }
    Ok(out)
}

async fn budget(cli: &Cli, command: &BudgetCommand) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let budgets = match command {
        BudgetCommand::Show => client.budgets().await?,
        BudgetCommand::Refresh {
            org,
            dataset,
            reason,
        } => vec![client.refresh_budget(org, dataset, reason).await?],
    };
    match cli.format {
        Format::Json => {
            let rows: Vec<serde_json::Value> = budgets
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "org": b.org, "dataset": b.dataset,
                        "epsilon_budget": b.epsilon_budget, "delta_budget": b.delta_budget,
                        "epsilon_spent": b.epsilon_spent, "delta_spent": b.delta_spent,
                        "queries": b.queries, "refreshes": b.refreshes,
                    })
                })
                .collect();
            out!("{}", serde_json::Value::Array(rows));
        }
        Format::Table | Format::Csv => {
            out!(
                "org\tdataset\tepsilon spent\tepsilon budget\tdelta spent\tdelta budget\tqueries\trenewals"
            );
            for b in &budgets {
                let total = |v: Option<f64>| v.map_or("-".to_string(), |v| v.to_string());
                out!(
                    "{}\t{}\t{:.4}\t{}\t{}\t{}\t{}\t{}",
                    b.org,
                    b.dataset,
                    b.epsilon_spent,
                    total(b.epsilon_budget),
                    short_float(b.delta_spent),
                    b.delta_budget.map_or("-".to_string(), short_float),
                    b.queries,
                    b.refreshes
                );
            }
        }
    }
    Ok(())
}

fn print_batches(batches: &[RecordBatch], format: Format) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            out!("{}", arrow::util::pretty::pretty_format_batches(batches)?);
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(std::io::stdout());
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(std::io::stdout());
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs)?;
            writer.finish()?;
            out!("");
        }
    }
    Ok(())
}

async fn explain(cli: &Cli, query: &str) -> Result<(), Failure> {
    let explanation = client(cli).await?.explain(query).await?;
    match cli.format {
        Format::Json => out!(
            "{}",
            serde_json::json!({
                "decision": explanation.decision,
                "rule": explanation.rule,
                "message": explanation.message,
                "datasets": explanation.datasets,
                "columns": explanation.columns,
                "min_units": explanation.min_units,
                "plan": explanation.plan,
                "epsilon": explanation.epsilon,
                "accuracy_95": explanation.accuracy.iter().map(|c| serde_json::json!({
                    "column": c.column, "scale": c.scale, "accuracy_95": c.accuracy_95,
                })).collect::<Vec<_>>(),
            })
        ),
        _ => {
            out!("decision: {}", explanation.decision);
            if !explanation.rule.is_empty() {
                out!("rule:     {}", explanation.rule);
            }
            out!("message:  {}", explanation.message);
            if explanation.decision == "allow" {
                out!("datasets: {}", explanation.datasets.join(", "));
                out!("columns:  {}", explanation.columns.join(", "));
                if explanation.accuracy.is_empty() {
                    out!("min_units: {}", explanation.min_units);
                } else {
                    let noise: Vec<String> = explanation
                        .accuracy
                        .iter()
                        .filter(|c| c.scale > 0.0)
                        .map(|c| format!("{} ±{}", c.column, round_for_display(c.accuracy_95)))
                        .collect();
                    out!(
                        "noise:    epsilon {:.4} if it runs; 95% of values within {} (an \
                         average's for a group of 1,000 rows)",
                        explanation.epsilon,
                        noise.join(", ")
                    );
                }
                out!("plan:\n{}", explanation.plan);
            }
        }
    }
    if explanation.decision == "allow" {
        Ok(())
    } else {
        Err(Failure {
            code: EXIT_DENIED,
            message: format!(
                "denied by rule `{}`: {}",
                explanation.rule, explanation.message
            ),
        })
    }
}

async fn datasets(cli: &Cli) -> Result<(), Failure> {
    let datasets = client(cli).await?.datasets().await?;
    match cli.format {
        Format::Json => {
            let list: Vec<_> = datasets
                .iter()
                .map(|d| {
                    serde_json::json!({
                        "id": d.id, "owner": d.owner, "description": d.description,
                        "privacy_unit": d.privacy_unit, "modes": d.modes,
                        "min_units": d.min_units, "functions": d.functions,
                        "columns": d.columns.iter().map(|c| serde_json::json!({
                            "name": c.name, "type": c.data_type, "level": c.level,
                            "role": c.role, "description": c.description,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            out!("{}", serde_json::Value::Array(list));
        }
        Format::Csv => {
            out!("dataset,column,type,level,role");
            for d in &datasets {
                for c in &d.columns {
                    out!("{},{},{},{},{}", d.id, c.name, c.data_type, c.level, c.role);
                }
            }
        }
        Format::Table => {
            for d in &datasets {
                out!(
                    "{}  (owner {}; privacy unit {}; modes {}; min_units {}; functions {})",
                    d.id,
                    d.owner,
                    d.privacy_unit,
                    if d.modes.is_empty() {
                        "-".to_string()
                    } else {
                        d.modes.join(",")
                    },
                    d.min_units,
                    if d.functions.is_empty() {
                        "-".to_string()
                    } else {
                        d.functions.join(",")
                    },
                );
                for c in &d.columns {
                    out!(
                        "    {:<22} {:<10} {:<3} {:<11} {}",
                        c.name,
                        c.data_type,
                        c.level,
                        c.role,
                        c.description
                    );
                }
            }
        }
    }
    Ok(())
}

async fn tail(cli: &Cli, n: u32) -> Result<(), Failure> {
    let events = client(cli).await?.events(0, n, true).await?;
    match cli.format {
        Format::Json => {
            for e in &events {
                out!(
                    "{}",
                    serde_json::json!({
                        "seq": e.seq, "time": e.time, "action": e.action, "principal": e.principal,
                        "org": e.org, "request_id": e.request_id, "job_id": e.job_id, "kind": e.kind,
                        "query": e.query, "datasets": e.datasets, "columns": e.columns,
                        "decision": e.decision, "rule": e.rule, "message": e.message,
                        "rows_scanned": e.rows_scanned, "rows_released": e.rows_released,
                        "rows_suppressed": e.rows_suppressed, "epsilon_spent": e.epsilon_spent,
                        "result_sha256": e.result_sha256, "chain_hash": e.chain_hash,
                    })
                );
            }
        }
        Format::Csv => {
            out!("seq,time,action,principal,decision,rule,job_id,rows_released,rows_suppressed");
            for e in &events {
                out!(
                    "{},{},{},{},{},{},{},{},{}",
                    e.seq,
                    e.time,
                    e.action,
                    e.principal,
                    e.decision,
                    e.rule,
                    e.job_id,
                    e.rows_released,
                    e.rows_suppressed
                );
            }
        }
        Format::Table => {
            out!(
                "{:>6}  {:<24}  {:<12}  {:<12}  {:<17}  {:<26}  {:>8}  {:>10}  query",
                "seq",
                "time",
                "action",
                "principal",
                "decision",
                "rule",
                "released",
                "suppressed"
            );
            for e in &events {
                let query: String = e.query.chars().take(60).collect();
                out!(
                    "{:>6}  {:<24}  {:<12}  {:<12}  {:<17}  {:<26}  {:>8}  {:>10}  {}",
                    e.seq,
                    e.time,
                    e.action,
                    e.principal,
                    e.decision,
                    e.rule,
                    e.rows_released,
                    e.rows_suppressed,
                    query.replace('\n', " ")
                );
            }
        }
    }
    Ok(())
}

/// A small probability as people write it: `0`, `7.0e-8`.
fn short_float(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else {
        format!("{value:.1e}")
    }
}

//! `sandbox`: the command-line client of the data sandbox.
//!
//! Exit codes: 0 success; 1 audit verification failed; 2 usage error (the command, its input or
//! its credentials' files); 3 denied by policy; 4 unauthenticated or not permitted; 5 any other
//! failure (the server or the connection). Every command prints through the one output contract
//! of `sandbox_cli::output` (`--format table|csv|json`).

mod audit;
mod connect;
mod governance;
mod jobs;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};
use sandbox_cli::output::{Format, Style, Table};

const EXIT_VERIFY_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_DENIED: u8 = 3;
const EXIT_NOT_PERMITTED: u8 = 4;
const EXIT_OTHER: u8 = 5;

#[derive(Debug, Parser)]
#[command(name = "sandbox", version, about = "Client of the data sandbox")]
struct Cli {
    /// Server address: http://HOST:PORT, or https:// for a server started with --tls.
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
    /// Data dir of a local server (for `--as` and `audit verify`); default: `./sandbox-data`,
    /// else the nearest `sandbox-data` in a parent folder.
    #[arg(long, global = true, value_name = "DIR", env = "SANDBOX_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Output format: `table` for people, `csv` or `json` (one array of objects) for programs.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Send a token over plaintext `http://` to a host other than this machine (only where a
    /// trusted network or a TLS-terminating proxy protects the path).
    #[arg(long, global = true)]
    insecure_plaintext: bool,
    /// Tables: keep long text whole instead of cutting it at 80 characters.
    #[arg(long, global = true)]
    wide: bool,
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Prints a table in the chosen format to stdout. A closed pipe (`sandbox ... | head`) ends
    /// output quietly.
    fn print(&self, table: &Table) {
        use std::io::Write as _;
        let text = table.render(self.format, Style { wide: self.wide });
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Who you are: principal, org, roles, and the calls you may make.
    Whoami,
    /// The datasets you may use (one row each), or with names the columns of those datasets:
    /// types, levels and roles. Never rows.
    Datasets {
        /// Show the columns of these datasets (`all` for every one).
        names: Vec<String>,
    },
    /// Who may use which data under which grant: your datasets' grants (owner), every grant
    /// (auditor), your org's (consumer).
    Grants,
    /// Run a query and print the released rows; the release summary goes to stderr.
    Sql {
        /// The query; `-` reads it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        query: Option<String>,
        /// Read the query from this file.
        #[arg(long, short = 'f', value_name = "F")]
        file: Option<PathBuf>,
        /// Run under differential privacy (noisy answers, debited from your org's budget).
        #[arg(long)]
        dp: bool,
        /// The epsilon to spend under differential privacy (implies --dp); default: the grant's.
        #[arg(long)]
        epsilon: Option<f64>,
    },
    /// Show the policy decision for a query without running it.
    Explain {
        /// The query; `-` reads it from stdin.
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        query: Option<String>,
        /// Read the query from this file.
        #[arg(long, short = 'f', value_name = "F")]
        file: Option<PathBuf>,
    },
    /// Read and verify the audit journal.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Validate policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Upload, review, approve and list WASM modules.
    #[command(subcommand)]
    Module(governance::ModuleCommand),
    /// Run approved WASM code.
    #[command(subcommand)]
    Wasm(jobs::WasmCommand),
    /// Manage consents (admins; consumers list and revoke their own).
    #[command(subcommand)]
    Consent(governance::ConsentCommand),
    /// Submit, review, approve, list and run approved SQL templates.
    #[command(subcommand)]
    Template(governance::TemplateCommand),
    /// Privacy budgets under differential privacy.
    #[command(subcommand)]
    Budget(governance::BudgetCommand),
    /// Print a shell completion script: `sandbox completions bash > ~/.local/share/bash-completion/completions/sandbox`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
    /// The server's status, when a call failed (a transport failure is explained at the end).
    status: Option<Box<tonic::Status>>,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
            status: None,
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::new(EXIT_OTHER, format!("error: {e:#}"))
    }
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::FailedPrecondition => EXIT_DENIED,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => EXIT_NOT_PERMITTED,
            // The request itself is wrong: a malformed parameter, a query that does not parse.
            tonic::Code::InvalidArgument => EXIT_USAGE,
            _ => EXIT_OTHER,
        };
        let retry = sandbox_cli::retry_after(&status)
            .map(|wait| format!(" (the server asks to retry after {} ms)", wait.as_millis()))
            .unwrap_or_default();
        let message = format!("{}: {}{retry}", code_name(status.code()), status.message());
        Failure {
            code,
            message,
            status: Some(Box::new(status)),
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
        tonic::Code::NotFound => "not found",
        _ => "error",
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::new(EXIT_USAGE, format!("usage: {}", message.into()))
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
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            let failure = connect::explain_transport(&cli, failure);
            eprintln!("{}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    match &cli.command {
        Command::Completions { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(*shell, &mut command, "sandbox", &mut std::io::stdout());
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { dir }) => policy_check(cli, dir),
        Command::Whoami => jobs::whoami(cli).await,
        Command::Datasets { names } => jobs::datasets(cli, names).await,
        Command::Grants => governance::grants(cli).await,
        Command::Sql {
            query,
            file,
            dp,
            epsilon,
        } => {
            let query = jobs::query_text(query.as_deref(), file.as_deref())?;
            jobs::sql(cli, &query, *dp, *epsilon).await
        }
        Command::Explain { query, file } => {
            let query = jobs::query_text(query.as_deref(), file.as_deref())?;
            jobs::explain(cli, &query).await
        }
        Command::Audit(command) => audit::run(cli, command).await,
        Command::Module(command) => governance::module(cli, command).await,
        Command::Wasm(command) => jobs::wasm(cli, command).await,
        Command::Consent(command) => governance::consent(cli, command).await,
        Command::Template(command) => governance::template(cli, command).await,
        Command::Budget(command) => governance::budget(cli, command).await,
    }
}

fn policy_check(cli: &Cli, dir: &std::path::Path) -> Result<(), Failure> {
    if !dir.is_dir() {
        return Err(usage(format!(
            "no policy directory at {}: name the folder of the policy files",
            dir.display()
        )));
    }
    let policy = sandbox_policy::load_dir(dir)
        .map_err(|e| Failure::new(EXIT_OTHER, format!("policy invalid: {e}")))?;
    use sandbox_cli::output::Value;
    cli.print(&Table::record(vec![
        ("policy", Value::text("OK")),
        ("directory", Value::text(dir.display().to_string())),
        ("datasets", Value::UInt(policy.datasets.len() as u64)),
        ("grants", Value::UInt(policy.grants.len() as u64)),
    ]));
    Ok(())
}

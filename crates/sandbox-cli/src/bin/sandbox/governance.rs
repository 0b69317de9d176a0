//! The governance commands: modules and templates (submit, review, approve), consents, budgets
//! and grants. An approval shows what is approved and asks before it takes effect.

use std::io::IsTerminal as _;
use std::path::PathBuf;

use clap::Subcommand;
use sandbox_cli::output::{Format, Style, Table, Value, rows};
use sandbox_proto::v1 as pb;

use crate::connect::client;
use crate::{Cli, EXIT_USAGE, Failure, usage};

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Upload a module (consumer); prints its SHA-256 and state.
    Upload {
        file: PathBuf,
        /// Attach this input query (a `.sql` file) as the module's `sandbox.input` section, for a
        /// module built without the guest SDK's `input!`. The owners approve it with the bytes.
        #[arg(long, value_name = "FILE")]
        input: Option<PathBuf>,
    },
    /// Show one module whole: manifest, input query, approvals, the owners it waits for.
    Show { sha256: String },
    /// Approve a module for your datasets among its declared input (owner): shows what you
    /// approve and asks first (`--yes` for scripts).
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
        /// Approve without asking.
        #[arg(long, short = 'y')]
        yes: bool,
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
pub enum TemplateCommand {
    /// Submit a template (TOML) for the owners' approval (consumer, analyst).
    Submit { file: PathBuf },
    /// Show one template whole (by SHA-256, or by name: the pending version if there is one).
    Show { template: String },
    /// Approve a template for your datasets among those it reads (owner), by SHA-256 or by name
    /// (its pending version): shows what you approve and asks first (`--yes` for scripts).
    Approve {
        template: String,
        /// Most runs allowed.
        #[arg(long, default_value_t = 100)]
        max_runs: u64,
        /// Days the approval stays valid.
        #[arg(long, default_value_t = 90)]
        valid_days: u64,
        /// Approve without asking.
        #[arg(long, short = 'y')]
        yes: bool,
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
pub enum ConsentCommand {
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
    /// List consents with their status (admins: all or --org; consumers: their own). Code jobs
    /// and per-enterprise templates use the active ones only.
    List {
        #[arg(long, default_value = "")]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BudgetCommand {
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

/// `org (login, login)`: an org with the logins that act for it.
fn org_with_logins(org: &str, logins: &[String]) -> String {
    if logins.is_empty() {
        org.to_string()
    } else {
        format!("{org} (login {})", logins.join(", "))
    }
}

fn awaiting(list: &[pb::Awaiting]) -> Value {
    Value::List(
        list.iter()
            .map(|a| org_with_logins(&a.org, &a.logins))
            .collect(),
    )
}

fn json_or_text(text: &str) -> Value {
    match serde_json::from_str(text) {
        Ok(value) => Value::Json(value),
        Err(_) => Value::text(text),
    }
}

fn module_fields(m: &pb::Module) -> Vec<(&'static str, Value)> {
    vec![
        ("sha256", Value::text(&m.sha256)),
        ("name", Value::text(&m.name)),
        ("state", Value::text(&m.state)),
        ("org", Value::text(&m.org)),
        ("uploaded_by", Value::text(&m.uploaded_by)),
        ("size", Value::UInt(m.size)),
        ("purpose", Value::text(&m.purpose)),
        ("input", Value::List(m.input.clone())),
        (
            "input_query",
            Value::text(
                m.input_query
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ),
        ("runs", Value::UInt(m.runs)),
        ("runs_left", Value::UInt(m.runs_left)),
        (
            "approved_by",
            Value::List(
                m.approvals
                    .iter()
                    .map(|a| format!("{} ({})", a.org, a.approved_by))
                    .collect(),
            ),
        ),
        ("awaiting", awaiting(&m.awaiting)),
        ("reason", Value::text(&m.reason)),
        (
            "approvals",
            Value::Json(serde_json::Value::Array(
                m.approvals
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "org": a.org, "approved_by": a.approved_by, "datasets": a.datasets,
                            "columns": a.columns, "max_runs": a.max_runs,
                            "expires_at": utc(a.expires_at),
                            "contract": serde_json::from_str::<serde_json::Value>(&a.contract_json)
                                .unwrap_or_default(),
                        })
                    })
                    .collect(),
            )),
        ),
    ]
}

fn template_fields(t: &pb::Template) -> Vec<(&'static str, Value)> {
    vec![
        ("sha256", Value::text(&t.sha256)),
        ("name", Value::text(&t.name)),
        ("state", Value::text(&t.state)),
        ("mode", Value::text(&t.mode)),
        ("org", Value::text(&t.org)),
        ("submitted_by", Value::text(&t.submitted_by)),
        ("description", Value::text(&t.description)),
        ("datasets", Value::List(t.datasets.clone())),
        (
            "params",
            Value::List(
                t.params
                    .iter()
                    .map(|p| {
                        if p.domain.is_empty() {
                            format!("{}: {}", p.name, p.r#type)
                        } else {
                            format!("{}: {}, {}", p.name, p.r#type, p.domain)
                        }
                    })
                    .collect(),
            ),
        ),
        (
            "min_units",
            if t.mode == "aggregate" {
                Value::UInt(t.min_units)
            } else {
                Value::Null
            },
        ),
        ("contract", json_or_text(&t.contract_json)),
        (
            "sql",
            Value::text(t.sql.split_whitespace().collect::<Vec<_>>().join(" ")),
        ),
        ("runs", Value::UInt(t.runs)),
        ("runs_left", Value::UInt(t.runs_left)),
        (
            "approved_by",
            Value::List(
                t.approvals
                    .iter()
                    .map(|a| format!("{} ({})", a.org, a.approved_by))
                    .collect(),
            ),
        ),
        ("awaiting", awaiting(&t.awaiting)),
        ("reason", Value::text(&t.reason)),
        (
            "approvals",
            Value::Json(serde_json::Value::Array(
                t.approvals
                    .iter()
                    .map(|a| {
                        serde_json::json!({
                            "org": a.org, "approved_by": a.approved_by, "datasets": a.datasets,
                            "max_runs": a.max_runs, "expires_at": utc(a.expires_at),
                        })
                    })
                    .collect(),
            )),
        ),
    ]
}

fn utc(seconds: u64) -> serde_json::Value {
    match Value::time(seconds) {
        Value::Time(t) => chrono::DateTime::from_timestamp(t, 0)
            .map_or(serde_json::Value::Null, |t| {
                serde_json::Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            }),
        _ => serde_json::Value::Null,
    }
}

/// The columns a list shows for people; programs get every field.
const MODULE_TABLE: &[&str] = &[
    "sha256",
    "name",
    "state",
    "org",
    "runs",
    "runs_left",
    "approved_by",
    "awaiting",
    "reason",
];
const TEMPLATE_TABLE: &[&str] = &[
    "sha256",
    "name",
    "state",
    "mode",
    "org",
    "params",
    "runs",
    "runs_left",
    "approved_by",
    "awaiting",
    "reason",
];

/// Items with these fields as a table: every field for programs, `table_columns` for people.
fn items_table<T>(
    cli: &Cli,
    items: &[T],
    fields: fn(&T) -> Vec<(&'static str, Value)>,
    table_columns: &[&str],
) -> Table {
    let only = (cli.format == Format::Table).then_some(table_columns);
    Table::from_records(items.iter().map(fields).collect(), only)
}

/// One module or template: a record for people (every field but the nested approvals), a one-row
/// table for programs.
fn one(cli: &Cli, fields: Vec<(&'static str, Value)>) -> Table {
    if cli.format == Format::Table {
        Table::record(
            fields
                .into_iter()
                .filter(|(n, _)| *n != "approvals")
                .collect(),
        )
    } else {
        let (names, row): (Vec<&str>, Vec<Value>) = fields.into_iter().unzip();
        let mut table = Table::new(&names);
        table.push(row);
        table
    }
}

/// Shows what is about to be approved (on stderr: stdout keeps the command's result) and asks,
/// unless `--yes`. Not at a terminal and without `--yes`, nothing is approved.
fn confirm(what: &str, preview: Table, yes: bool) -> Result<(), Failure> {
    eprint!(
        "You are about to approve {what}:\n{}",
        preview.render(Format::Table, Style { wide: true })
    );
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            EXIT_USAGE,
            "not approved: stdin is not a terminal to ask on; after reading the above, approve \
             with --yes",
        ));
    }
    eprint!("Approve? [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| usage(format!("cannot read the answer: {e}")))?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Failure::new(
            EXIT_USAGE,
            "not approved: the answer was not yes",
        ))
    }
}

/// What to say of an item the caller cannot see: it reads none of the caller's datasets (not
/// permitted, exit 4), or does not exist; the server does not tell which.
fn not_visible(what: &str, list: &str) -> Failure {
    Failure::new(
        crate::EXIT_NOT_PERMITTED,
        format!(
            "not permitted: {what} is not among those you may see: it reads none of your \
             datasets, or there is none (`sandbox {list}` lists yours)"
        ),
    )
}

async fn find_module(
    client: &mut sandbox_cli::Client,
    sha256: &str,
) -> Result<pb::Module, Failure> {
    let sha256 = sha256.to_ascii_lowercase();
    let modules = client.modules().await?;
    modules
        .into_iter()
        .find(|m| m.sha256 == sha256)
        .ok_or_else(|| not_visible(&format!("module {sha256}"), "module list"))
}

pub async fn module(cli: &Cli, command: &ModuleCommand) -> Result<(), Failure> {
    match command {
        ModuleCommand::Upload { file, input } => {
            let mut bytes = std::fs::read(file)
                .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
            if let Some(path) = input {
                let query = std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?;
                bytes = sandbox_cli::with_input_section(bytes, &query);
            }
            let mut client = client(cli).await?;
            // A progress line on a terminal while the module travels and is validated.
            let progress = indicatif::ProgressBar::new_spinner().with_message(format!(
                "uploading {} ({} KiB) and waiting for validation",
                file.display(),
                bytes.len().div_ceil(1024)
            ));
            progress.enable_steady_tick(std::time::Duration::from_millis(120));
            let module = client.upload_module(bytes).await;
            progress.finish_and_clear();
            cli.print(&one(cli, module_fields(&module?)));
        }
        ModuleCommand::Show { sha256 } => {
            let module = find_module(&mut client(cli).await?, sha256).await?;
            cli.print(&one(cli, module_fields(&module)));
        }
        ModuleCommand::Approve {
            sha256,
            contract,
            max_runs,
            valid_days,
            columns,
            yes,
        } => {
            let contract_toml = match contract {
                Some(path) => std::fs::read_to_string(path)
                    .map_err(|e| usage(format!("cannot read {}: {e}", path.display())))?,
                None => String::new(),
            };
            let mut client = client(cli).await?;
            let module = find_module(&mut client, sha256).await?;
            let mut preview: Vec<(&str, Value)> = module_fields(&module)
                .into_iter()
                .filter(|(n, _)| !matches!(*n, "approvals" | "input_query"))
                .collect();
            preview.push(("input_query", Value::text(&module.input_query)));
            preview.push((
                "your_contract",
                Value::text(if contract_toml.is_empty() {
                    "the default scoring contract: an integer score 0-1000 and a grade A-E per \
                     consented enterprise"
                        .to_string()
                } else {
                    contract_toml.clone()
                }),
            ));
            preview.push((
                "your_columns",
                if columns.is_empty() {
                    Value::text("every column of your datasets it declares")
                } else {
                    Value::List(columns.clone())
                },
            ));
            preview.push(("your_max_runs", Value::UInt(*max_runs)));
            preview.push(("your_valid_days", Value::UInt(*valid_days)));
            confirm(
                &format!("module {} ({})", module.name, module.sha256),
                Table::record(preview),
                *yes,
            )?;
            let module = client
                .approve_module(pb::ApproveModuleRequest {
                    sha256: module.sha256.clone(),
                    contract_toml,
                    max_runs: *max_runs,
                    valid_days: *valid_days,
                    columns: columns.clone(),
                })
                .await?;
            cli.print(&one(cli, module_fields(&module)));
        }
        ModuleCommand::Reject { sha256, reason } => {
            let module = client(cli).await?.reject_module(sha256, reason).await?;
            cli.print(&one(cli, module_fields(&module)));
        }
        ModuleCommand::List => {
            let modules = client(cli).await?.modules().await?;
            cli.print(&items_table(cli, &modules, module_fields, MODULE_TABLE));
        }
    }
    Ok(())
}

/// A template by SHA-256, or by name: its pending version, else its only version.
async fn find_template(
    client: &mut sandbox_cli::Client,
    wanted: &str,
) -> Result<pb::Template, Failure> {
    let templates = client.templates().await?;
    let lower = wanted.to_ascii_lowercase();
    if let Some(t) = templates.iter().find(|t| t.sha256 == lower) {
        return Ok(t.clone());
    }
    let named: Vec<&pb::Template> = templates.iter().filter(|t| t.name == wanted).collect();
    let pending: Vec<&pb::Template> = named
        .iter()
        .copied()
        .filter(|t| t.state == "pending")
        .collect();
    match (pending.as_slice(), named.as_slice()) {
        ([one], _) | ([], [one]) => Ok((*one).clone()),
        ([], []) => Err(not_visible(
            &format!("template `{wanted}` (by name or SHA-256)"),
            "template list",
        )),
        (_, _) => Err(usage(format!(
            "`{wanted}` names several versions; give the SHA-256 of one: {}",
            named
                .iter()
                .map(|t| format!("{} ({})", t.sha256, t.state))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

pub async fn template(cli: &Cli, command: &TemplateCommand) -> Result<(), Failure> {
    match command {
        TemplateCommand::Submit { file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
            let template = client(cli).await?.submit_template(&text).await?;
            cli.print(&one(cli, template_fields(&template)));
            if cli.format == Format::Table && !template.awaiting.is_empty() {
                eprintln!(
                    "next: each owner approves it, e.g. `sandbox --as LOGIN template approve {}`",
                    template.name
                );
            }
        }
        TemplateCommand::Show { template } => {
            let template = find_template(&mut client(cli).await?, template).await?;
            cli.print(&one(cli, template_fields(&template)));
        }
        TemplateCommand::Approve {
            template,
            max_runs,
            valid_days,
            yes,
        } => {
            let mut client = client(cli).await?;
            let found = find_template(&mut client, template).await?;
            let mut preview: Vec<(&str, Value)> = template_fields(&found)
                .into_iter()
                .filter(|(n, _)| !matches!(*n, "approvals" | "sql"))
                .collect();
            preview.push(("sql", Value::text(&found.sql)));
            preview.push(("your_max_runs", Value::UInt(*max_runs)));
            preview.push(("your_valid_days", Value::UInt(*valid_days)));
            confirm(
                &format!("template {} ({})", found.name, found.sha256),
                Table::record(preview),
                *yes,
            )?;
            let template = client
                .approve_template(&found.sha256, *max_runs, *valid_days)
                .await?;
            cli.print(&one(cli, template_fields(&template)));
        }
        TemplateCommand::List => {
            let templates = client(cli).await?.templates().await?;
            cli.print(&items_table(
                cli,
                &templates,
                template_fields,
                TEMPLATE_TABLE,
            ));
        }
        TemplateCommand::Run { name, params } => {
            let result = client(cli)
                .await?
                .template(name, params.iter().cloned().collect())
                .await?;
            cli.print(&Table::from_batches(&result.batches).map_err(anyhow::Error::from)?);
            let summary = result.summary;
            eprintln!(
                "released {}; job {}; audit seq {}; sha256 {}",
                rows(summary.rows_released),
                result.job_id,
                summary.audit_seq,
                summary.result_sha256
            );
        }
    }
    Ok(())
}

fn consent_status(c: &pb::ConsentRecord) -> String {
    if !c.status.is_empty() {
        return c.status.clone();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if c.expires_at != 0 && c.expires_at <= now {
        "expired".into()
    } else {
        "active".into()
    }
}

pub async fn consent(cli: &Cli, command: &ConsentCommand) -> Result<(), Failure> {
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
            vec![pb::ConsentRecord {
                unit: unit.clone(),
                consumer_org: org.clone(),
                purpose: purpose.clone(),
                status: "revoked".into(),
                ..Default::default()
            }]
        }
        ConsentCommand::List { org } => client.consents(org).await?,
    };
    let mut table = Table::new(&[
        "unit",
        "consumer_org",
        "purpose",
        "status",
        "granted_at",
        "expires_at",
    ]);
    for c in &consents {
        table.push(vec![
            Value::text(&c.unit),
            Value::text(&c.consumer_org),
            Value::text(&c.purpose),
            Value::text(consent_status(c)),
            Value::time(c.granted_at),
            Value::time(c.expires_at),
        ]);
    }
    cli.print(&table);
    if cli.format == Format::Table && matches!(command, ConsentCommand::List { .. }) {
        let active = consents
            .iter()
            .filter(|c| consent_status(c) == "active")
            .count();
        eprintln!(
            "{} consents: {active} active, {} expired (code jobs and per-enterprise templates \
             read the active ones only)",
            consents.len(),
            consents.len() - active
        );
    }
    Ok(())
}

pub async fn budget(cli: &Cli, command: &BudgetCommand) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let budgets = match command {
        BudgetCommand::Show => client.budgets().await?,
        BudgetCommand::Refresh {
            org,
            dataset,
            reason,
        } => vec![client.refresh_budget(org, dataset, reason).await?],
    };
    let mut table = Table::new(&[
        "org",
        "dataset",
        "epsilon_spent",
        "epsilon_budget",
        "epsilon_left",
        "delta_spent",
        "delta_budget",
        "queries",
        "renewals",
    ]);
    for b in &budgets {
        table.push(vec![
            Value::text(&b.org),
            Value::text(&b.dataset),
            Value::Float(b.epsilon_spent),
            b.epsilon_budget.map_or(Value::Null, Value::Float),
            b.epsilon_budget.map_or(Value::Null, |total| {
                Value::Float((total - b.epsilon_spent).max(0.0))
            }),
            Value::Float(b.delta_spent),
            b.delta_budget.map_or(Value::Null, Value::Float),
            Value::UInt(b.queries),
            Value::UInt(b.refreshes),
        ]);
    }
    cli.print(&table);
    if cli.format == Format::Table {
        eprintln!("org `*`: every consumer org together, against the dataset's total");
    }
    Ok(())
}

pub async fn grants(cli: &Cli) -> Result<(), Failure> {
    let client = client(cli).await?;
    let request = client.request(pb::ListGrantsRequest {});
    let grants = client
        .sandbox
        .clone()
        .list_grants(request)
        .await?
        .into_inner()
        .grants;
    let mut table = Table::new(&[
        "dataset",
        "owner",
        "consumer_org",
        "consumer_logins",
        "modes",
        "exact",
        "min_units",
        "epsilon",
        "budget_epsilon",
        "total_epsilon",
        "functions",
        "columns",
    ]);
    for g in &grants {
        let dp = !g.exact && g.epsilon > 0.0;
        table.push(vec![
            Value::text(&g.dataset),
            Value::text(&g.owner),
            Value::text(&g.consumer_org),
            Value::List(g.consumer_logins.clone()),
            Value::List(g.modes.clone()),
            Value::Bool(g.exact),
            Value::UInt(g.min_units),
            if dp {
                Value::Float(g.epsilon)
            } else {
                Value::Null
            },
            if dp {
                Value::Float(g.budget_epsilon)
            } else {
                Value::Null
            },
            if dp {
                Value::Float(g.total_epsilon)
            } else {
                Value::Null
            },
            Value::List(g.functions.clone()),
            if g.columns.is_empty() {
                Value::text("all")
            } else {
                Value::List(g.columns.clone())
            },
        ]);
    }
    cli.print(&table);
    Ok(())
}

//! The analyst's and the consumer's commands: datasets, SQL, explain and code jobs.

use std::path::Path;

use clap::Subcommand;
use sandbox_cli::output::{Table, Value, rows};
use sandbox_proto::v1 as pb;

use crate::connect::client;
use crate::{Cli, EXIT_DENIED, Failure, usage};

#[derive(Debug, Subcommand)]
pub enum WasmCommand {
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

/// The query of `sql` and `explain`: the argument, stdin for `-`, or the `--file`.
pub fn query_text(query: Option<&str>, file: Option<&Path>) -> Result<String, Failure> {
    let text = match (query, file) {
        (_, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read the query file {}: {e}",
                path.display()
            ))
        })?,
        (Some("-"), None) => std::io::read_to_string(std::io::stdin())
            .map_err(|e| usage(format!("cannot read the query from stdin: {e}")))?,
        (Some(query), None) => query.to_string(),
        (None, None) => return Err(usage("give a query, `-` for stdin, or --file F")),
    };
    if text.trim().is_empty() {
        return Err(usage("the query is empty"));
    }
    Ok(text)
}

/// An Arrow type as people name it.
fn type_name(arrow: &str) -> &str {
    match arrow {
        "Utf8" | "Utf8View" | "LargeUtf8" => "text",
        "Int8" | "Int16" | "Int32" | "Int64" | "UInt8" | "UInt16" | "UInt32" | "UInt64" => {
            "integer"
        }
        "Float16" | "Float32" | "Float64" => "decimal number",
        "Boolean" => "true/false",
        "Date32" | "Date64" => "date",
        other if other.starts_with("Timestamp") => "timestamp",
        other if other.starts_with("Decimal") => "decimal number",
        other => other,
    }
}

pub async fn datasets(cli: &Cli, names: &[String]) -> Result<(), Failure> {
    let mut client = client(cli).await?;
    let datasets = client.datasets().await?;
    // An owner holds no grant on its own datasets: say they are its own, not "no modes".
    let owns: Vec<String> = if datasets.iter().any(|d| d.modes.is_empty()) {
        let request = client.request(pb::WhoAmIRequest {});
        client.sandbox.who_am_i(request).await?.into_inner().owns
    } else {
        Vec::new()
    };
    if names.is_empty() {
        let mut table = Table::new(&[
            "dataset",
            "owner",
            "privacy_unit",
            "your_modes",
            "min_units",
            "functions",
            "columns",
            "description",
        ]);
        for d in &datasets {
            let columns = match cli.format {
                // For programs, the whole schema; for people, how many (`datasets NAME` lists them).
                sandbox_cli::output::Format::Json => Value::Json(serde_json::Value::Array(
                    d.columns
                        .iter()
                        .map(|c| {
                            serde_json::json!({
                                "name": c.name, "type": type_name(&c.data_type),
                                "arrow_type": c.data_type, "level": c.level, "role": c.role,
                                "description": c.description,
                            })
                        })
                        .collect(),
                )),
                _ => Value::UInt(d.columns.len() as u64),
            };
            let modes = if d.modes.is_empty() && owns.contains(&d.id) {
                vec!["owner".to_string()]
            } else {
                d.modes.clone()
            };
            table.push(vec![
                Value::text(&d.id),
                Value::text(&d.owner),
                Value::text(&d.privacy_unit),
                Value::List(modes),
                if d.modes.is_empty() {
                    Value::Null
                } else {
                    Value::UInt(d.min_units)
                },
                Value::List(d.functions.clone()),
                columns,
                Value::text(&d.description),
            ]);
        }
        cli.print(&table);
        if matches!(cli.format, sandbox_cli::output::Format::Table) {
            eprintln!(
                "{}; `sandbox datasets NAME` (or `all`) lists the columns{}",
                datasets_count(datasets.len()),
                if owns.is_empty() {
                    ""
                } else {
                    "; `sandbox grants` shows who may use yours"
                }
            );
        }
        return Ok(());
    }
    let all = names.iter().any(|n| n == "all");
    for name in names.iter().filter(|n| *n != "all") {
        if !datasets.iter().any(|d| &d.id == name) {
            let known: Vec<&str> = datasets.iter().map(|d| d.id.as_str()).collect();
            return Err(usage(format!(
                "no dataset `{name}` among those you may use: {}",
                known.join(", ")
            )));
        }
    }
    let mut table = Table::new(&["dataset", "column", "type", "level", "role", "description"]);
    for d in datasets.iter().filter(|d| all || names.contains(&d.id)) {
        for c in &d.columns {
            table.push(vec![
                Value::text(&d.id),
                Value::text(&c.name),
                Value::text(type_name(&c.data_type)),
                Value::text(&c.level),
                Value::text(&c.role),
                Value::text(&c.description),
            ]);
        }
    }
    cli.print(&table);
    Ok(())
}

fn datasets_count(n: usize) -> String {
    if n == 1 {
        "1 dataset".into()
    } else {
        format!("{n} datasets")
    }
}

/// The release summary's common tail: job, audit sequence, hash of the released bytes.
fn receipt(result: &sandbox_cli::SqlResult) -> String {
    format!(
        "job {}; audit seq {}; sha256 {}",
        result.job_id, result.summary.audit_seq, result.summary.result_sha256
    )
}

pub async fn sql(cli: &Cli, query: &str, dp: bool, epsilon: Option<f64>) -> Result<(), Failure> {
    let spec = if dp || epsilon.is_some() {
        sandbox_cli::Client::dp_spec(query, epsilon)
    } else {
        sandbox_cli::Client::sql_spec(query)
    };
    let result = client(cli).await?.run(spec).await?;
    let mut table = Table::from_batches(&result.batches).map_err(anyhow::Error::from)?;
    let summary = &result.summary;
    // The server orders rows by the query's ORDER BY, else by their columns (`order.rs`).
    let order = " (in the order of the query's ORDER BY, else sorted by their columns)";
    let Some(dp) = &summary.dp else {
        cli.print(&table);
        eprintln!(
            "exact: {} released{order}{}; rows covering fewer than {} distinct units, and rows \
             near what any org was released before, are withheld without a count; {}",
            rows(summary.rows_released),
            if summary.stored {
                " (the same answer as before, from the store)"
            } else {
                ""
            },
            summary.min_units,
            receipt(&result)
        );
        return Ok(());
    };
    // Each noisy value with its 95% interval beside it, in a table; the raw values in CSV and
    // JSON (the intervals on stderr).
    let noisy: Vec<&pb::NoiseColumn> = dp.columns.iter().filter(|c| c.scale > 0.0).collect();
    if matches!(cli.format, sandbox_cli::output::Format::Table) {
        for column in &noisy {
            table.map_column(&column.column, |row, value| {
                let interval = column
                    .rows_95
                    .get(row)
                    .copied()
                    .unwrap_or(column.accuracy_95);
                match value {
                    Value::Int(_) | Value::UInt(_) | Value::Float(_) => {
                        let v = match value {
                            Value::Int(i) => *i as f64,
                            Value::UInt(u) => *u as f64,
                            Value::Float(f) => *f,
                            _ => unreachable!("matched above"),
                        };
                        Value::Text(format!(
                            "{} ±{}",
                            round_for_display(v),
                            round_for_display(interval)
                        ))
                    }
                    other => other.clone(),
                }
            });
        }
    }
    cli.print(&table);
    let noise: Vec<String> = noisy
        .iter()
        .map(|c| {
            if c.rows_95.is_empty() {
                format!("{} ±{}", c.column, round_for_display(c.accuracy_95))
            } else {
                format!("{} (per row, beside it)", c.column)
            }
        })
        .collect();
    eprintln!(
        "differential privacy: spent epsilon {:.4} delta {}{}; your org has epsilon {:.4} and \
         delta {} left; 95% of values within: {}; {} released{order}; {}",
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
        rows(summary.rows_released),
        receipt(&result)
    );
    Ok(())
}

/// A number rounded to what its interval makes meaningful: whole numbers above 10, two
/// decimals below.
pub fn round_for_display(value: f64) -> String {
    if value.abs() >= 10.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// A small probability as people write it: `0`, `7.0e-8`.
pub fn short_float(value: f64) -> String {
    if value == 0.0 {
        "0".into()
    } else {
        format!("{value:.1e}")
    }
}

pub async fn explain(cli: &Cli, query: &str) -> Result<(), Failure> {
    let e = client(cli).await?.explain(query).await?;
    let allowed = e.decision == "allow";
    let noise: Vec<String> = e
        .accuracy
        .iter()
        .filter(|c| c.scale > 0.0)
        .map(|c| format!("{} ±{}", c.column, round_for_display(c.accuracy_95)))
        .collect();
    let accuracy = Value::Json(serde_json::Value::Array(
        e.accuracy
            .iter()
            .map(|c| {
                serde_json::json!({
                    "column": c.column, "scale": c.scale, "accuracy_95": c.accuracy_95,
                })
            })
            .collect(),
    ));
    let mut fields = vec![
        ("decision", Value::text(&e.decision)),
        ("rule", Value::text(&e.rule)),
        ("message", Value::text(&e.message)),
        ("datasets", Value::List(e.datasets.clone())),
        ("columns", Value::List(e.columns.clone())),
        (
            "min_units",
            if allowed && e.accuracy.is_empty() {
                Value::UInt(e.min_units)
            } else {
                Value::Null
            },
        ),
        (
            "epsilon",
            if e.accuracy.is_empty() {
                Value::Null
            } else {
                Value::Float(e.epsilon)
            },
        ),
    ];
    if matches!(cli.format, sandbox_cli::output::Format::Table) {
        if !noise.is_empty() {
            fields.push((
                "noise",
                Value::text(format!(
                    "95% of values within {} (an average's for a group of 1,000 rows)",
                    noise.join(", ")
                )),
            ));
        }
    } else {
        fields.push(("accuracy_95", accuracy));
    }
    fields.push(("plan", Value::text(&e.plan)));
    cli.print(&Table::record(fields));
    if allowed {
        Ok(())
    } else {
        Err(Failure::new(
            EXIT_DENIED,
            format!("denied by rule `{}`: {}", e.rule, e.message),
        ))
    }
}

pub async fn wasm(cli: &Cli, command: &WasmCommand) -> Result<(), Failure> {
    let WasmCommand::Run {
        module,
        input,
        params,
    } = command;
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
    cli.print(&Table::from_batches(&result.batches).map_err(anyhow::Error::from)?);
    // A code job reports only what it released; the rest is in the audit journal.
    eprintln!(
        "released {}; {}",
        rows(result.summary.rows_released),
        receipt(&result)
    );
    Ok(())
}

pub async fn whoami(cli: &Cli) -> Result<(), Failure> {
    let client = client(cli).await?;
    let request = client.request(pb::WhoAmIRequest {});
    let me = client.sandbox.clone().who_am_i(request).await?.into_inner();
    cli.print(&Table::record(vec![
        ("principal", Value::text(&me.principal)),
        ("org", Value::text(&me.org)),
        ("roles", Value::List(me.roles.clone())),
        ("credential", Value::text(&me.credential)),
        ("expires_at", Value::time(me.expires_at)),
        ("owns", Value::List(me.owns.clone())),
        ("may_call", Value::List(me.may_call.clone())),
    ]));
    Ok(())
}

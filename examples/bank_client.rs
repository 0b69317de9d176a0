//! The bank's side of credit scoring, over gRPC: upload the scoring module, wait until the owners
//! of every dataset it reads have approved it, score the enterprises that consented to the bank,
//! print the scores. The bank never sees a tax, social-insurance, provident-fund, court or penalty
//! record: only one bounded score and grade per consented enterprise.
//!
//! Against a running server (owners approve with `sandbox module approve`):
//!
//! ```text
//! cargo build --release -p credit-scoring --target wasm32-unknown-unknown
//! cargo run -p sandbox-examples --example bank_client -- --addr http://127.0.0.1:50051 \
//!     --data-dir ./sandbox-data
//! ```
//!
//! Without `--addr` it starts its own sandbox on a fresh demo data dir and, as a demo only, plays
//! the five owners too, approving with their demo tokens.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow::array::{Array, Int64Array, StringArray};
use sandbox_cli::Client;
use sandbox_proto::v1 as pb;

/// The owners of the datasets the credit model reads, as named in the demo.
const DEMO_OWNERS: [&str; 5] = [
    "owner_market",
    "owner_tax",
    "owner_hrss",
    "owner_fund",
    "owner_court",
];

struct Options {
    addr: Option<String>,
    data_dir: PathBuf,
    module: PathBuf,
    wait: Duration,
}

fn options() -> anyhow::Result<Options> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut options = Options {
        addr: None,
        data_dir: PathBuf::from("./sandbox-data"),
        module: target.join("wasm32-unknown-unknown/release/credit_scoring.wasm"),
        wait: Duration::from_secs(600),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--addr" => options.addr = Some(value()?),
            "--data-dir" => options.data_dir = PathBuf::from(value()?),
            "--module" => options.module = PathBuf::from(value()?),
            "--wait-secs" => options.wait = Duration::from_secs(value()?.parse()?),
            other => anyhow::bail!(
                "unknown argument {other}; usage: bank_client [--addr URL] [--data-dir DIR] \
                 [--module FILE] [--wait-secs N]"
            ),
        }
    }
    Ok(options)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut options = options()?;
    let module = std::fs::read(&options.module).with_context(|| {
        format!(
            "cannot read {}; build it with `cargo build --release -p credit-scoring --target \
             wasm32-unknown-unknown`",
            options.module.display()
        )
    })?;

    // Without a server address: a sandbox of our own, on a fresh demo data dir.
    let mut local = None;
    let addr = match options.addr.clone() {
        Some(addr) => addr,
        None => {
            let dir = tempfile::tempdir()?;
            let mut config = sandbox_server::ServerConfig::for_tests(dir.path().join("data"));
            config.policies = Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
            config.demo_scale = 0.25;
            config.wasm_timeout_secs = 60;
            options.data_dir = config.data_dir.clone();
            let server = sandbox_server::start(config).await?;
            let addr = format!("http://{}", server.addr);
            println!("started a demo sandbox on {addr}");
            local = Some((server, dir));
            addr
        }
    };

    let mut bank = Client::connect(
        &addr,
        &sandbox_examples::demo_token(&options.data_dir, "bank")?,
    )
    .await?;
    let uploaded = bank.upload_module(module).await?;
    println!(
        "uploaded `{}` ({} bytes): sha256 {}, {}",
        uploaded.name, uploaded.size, uploaded.sha256, uploaded.state
    );
    let sha = uploaded.sha256.clone();

    if local.is_some() {
        // Demo only: the owners review and approve the module with their own credentials.
        for owner in DEMO_OWNERS {
            let mut client = Client::connect(
                &addr,
                &sandbox_examples::demo_token(&options.data_dir, owner)?,
            )
            .await?;
            let view = client
                .approve_module(pb::ApproveModuleRequest {
                    sha256: sha.clone(),
                    contract_toml: String::new(),
                    max_runs: 10,
                    valid_days: 30,
                    columns: Vec::new(),
                })
                .await?;
            println!("  {owner} approved: module is {}", view.state);
        }
    }

    // Wait for the owners.
    let started = Instant::now();
    loop {
        let modules = bank.modules().await?;
        let view = modules
            .iter()
            .find(|m| m.sha256 == sha)
            .context("the uploaded module is not listed")?;
        match view.state.as_str() {
            "approved" => break,
            "pending" if started.elapsed() < options.wait => {
                println!("waiting: {}", view.reason);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            state => anyhow::bail!("module is {state}: {}", view.reason),
        }
    }

    let result = bank
        .wasm(&sha, credit_scoring::INPUT_QUERY, br#"{"as_of":"2024-12"}"#)
        .await?;
    let summary = &result.summary;
    // That is all the bank learns of the run: how many scores, and the receipt. Rows read, rows
    // of enterprises without consent and the work done are in the audit journal only.
    println!(
        "\nscored {} consented enterprises; audit seq {}, sha256 {}",
        summary.rows_released, summary.audit_seq, summary.result_sha256
    );
    let mut grades = std::collections::BTreeMap::<String, usize>::new();
    let mut shown = 0;
    println!("\n{:<20} {:>5}  grade", "credit_code", "score");
    for batch in &result.batches {
        let codes = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .context("codes")?;
        let scores = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("scores")?;
        let grade = batch
            .column(2)
            .as_any()
            .downcast_ref::<StringArray>()
            .context("grades")?;
        for row in 0..batch.num_rows() {
            *grades.entry(grade.value(row).to_string()).or_default() += 1;
            if shown < 10 {
                println!(
                    "{:<20} {:>5}  {}",
                    codes.value(row),
                    scores.value(row),
                    grade.value(row)
                );
                shown += 1;
            }
        }
    }
    println!("grades: {grades:?}");
    anyhow::ensure!(
        summary.rows_released > 0,
        "no consented enterprise was scored"
    );

    if let Some((server, _dir)) = local {
        server.shutdown().await?;
    }
    Ok(())
}

//! An analyst's tour, in-process: start the sandbox on a fresh demo data dir on an ephemeral
//! loopback port, then, through the client library, list datasets, run an allowed aggregate, see
//! small groups suppressed, get a query denied with its rule, and read the journal as the auditor.
//!
//! `cargo run -p sandbox-examples --example analyst_tour`

use sandbox_cli::{Client, rule_of};
use sandbox_server::ServerConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("data");
    let mut config = ServerConfig::for_tests(data_dir.clone());
    config.policies = Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies"));
    config.demo_scale = 0.1;
    let server = sandbox_server::start(config).await?;
    let url = format!("http://{}", server.addr);
    let token = |name: &str| -> anyhow::Result<String> {
        Ok(
            std::fs::read_to_string(data_dir.join(format!("credentials/{name}.token")))?
                .trim()
                .to_string(),
        )
    };
    println!("sandbox listening on {url}\n");

    let mut analyst = Client::connect(&url, &token("analyst")?).await?;
    println!("datasets granted to the analyst:");
    for dataset in analyst.datasets().await? {
        println!(
            "  {:<26} owner {:<18} k = {}",
            dataset.id, dataset.owner, dataset.min_units
        );
    }

    let sql = "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS enterprises, \
               AVG(vat_paid) AS avg_vat FROM tax_monthly GROUP BY tax_credit_rating \
               ORDER BY tax_credit_rating";
    let result = analyst.sql(sql).await?;
    println!(
        "\n{sql}\n{}",
        arrow::util::pretty::pretty_format_batches(&result.batches)?
    );
    println!(
        "released {} rows, suppressed {} (fewer than {} enterprises)",
        result.summary.rows_released, result.summary.rows_suppressed, result.summary.min_units
    );

    let sql = "SELECT region_code, industry, COUNT(*) AS n FROM enterprises GROUP BY region_code, industry";
    let result = analyst.sql(sql).await?;
    println!(
        "\n{sql}\nreleased {} rows, suppressed {}",
        result.summary.rows_released, result.summary.rows_suppressed
    );
    anyhow::ensure!(
        result.summary.rows_suppressed > 0,
        "fine groupings must suppress"
    );

    let sql = "SELECT SUM(vat_paid) FROM tax_monthly WHERE credit_code = '91450102000000019X'";
    match analyst.sql(sql).await {
        Ok(_) => anyhow::bail!("targeting one enterprise must be denied"),
        Err(status) => println!(
            "\n{sql}\ndenied by `{}`: {}",
            rule_of(&status),
            status.message()
        ),
    }

    let mut auditor = Client::connect(&url, &token("auditor")?).await?;
    println!("\nthe journal, as the auditor sees it:");
    for event in auditor.events(0, 10, true).await? {
        println!(
            "  #{:<3} {:<12} {:<9} {:<6} {}",
            event.seq, event.action, event.principal, event.decision, event.rule
        );
    }
    server.shutdown().await
}

//! An analyst's tour, in-process: start the sandbox on a fresh demo data dir on an ephemeral
//! loopback port, then, through the client library, list datasets, see what a question would
//! cost before asking it, get a noisy answer with its intervals (the demo's data is sensitive:
//! ad-hoc questions are answered under differential privacy), see small groups left out, get a
//! query denied with its rule, and read the journal as the auditor.
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

    // The demo's data is sensitive (L3 and L4): ad-hoc questions are answered under
    // differential privacy. First what a question would cost and how noisy it would be...
    let sql = "SELECT tax_credit_rating, COUNT(DISTINCT credit_code) AS enterprises, \
               AVG(vat_paid) AS avg_vat FROM tax_monthly GROUP BY tax_credit_rating \
               ORDER BY tax_credit_rating";
    let explained = analyst.explain(sql).await?;
    println!(
        "\n{sql}\nbefore running: epsilon {:.2}; 95% intervals {}",
        explained.epsilon,
        explained
            .accuracy
            .iter()
            .filter(|c| c.scale > 0.0)
            .map(|c| format!("{} ±{:.0}", c.column, c.accuracy_95))
            .collect::<Vec<_>>()
            .join(", ")
    );
    anyhow::ensure!(
        explained.epsilon > 0.0,
        "the demo answers L3 data with noise"
    );
    // ...then the answer, each value with the half-width of its 95% interval.
    let result = analyst.sql(sql).await?;
    println!(
        "{}",
        arrow::util::pretty::pretty_format_batches(&result.batches)?
    );
    let dp = result
        .summary
        .dp
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("an L3 question must be answered with noise"))?;
    println!(
        "released {} rows; spent epsilon {:.2}, {:.2} left; 95% within: {}",
        result.summary.rows_released,
        dp.epsilon_spent,
        dp.epsilon_remaining,
        dp.columns
            .iter()
            .filter(|c| c.scale > 0.0)
            .map(|c| format!("{} ±{:.0}", c.column, c.accuracy_95))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Asked again, the same question is the same answer, at no cost: noise does not average away.
    let again = analyst.sql(sql).await?;
    anyhow::ensure!(
        again.summary.result_sha256 == result.summary.result_sha256,
        "a repeat must be the stored answer"
    );

    // A fine grouping: groups of few enterprises do not show (their noisy count does not pass
    // the threshold), and how many did not is not told.
    let sql = "SELECT region_code, industry, COUNT(*) AS n FROM enterprises GROUP BY region_code, industry";
    let result = analyst.sql(sql).await?;
    println!(
        "\n{sql}\nreleased {} groups (groups of few enterprises are not shown)",
        result.summary.rows_released
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

//! The Prometheus endpoint: scraped after a few calls, its counters say what happened.

use std::collections::BTreeMap;

use sandbox_tests::{Client, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET <path>` over plain HTTP/1.1: the status line and the body.
async fn http_get(address: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("head and body");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The samples of a scrape, by `name{labels}`.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_calls_jobs_rows_budget_and_journal() {
    // Exact grants, so that suppressed rows are counted (the operator's metrics count them; the
    // caller is never told).
    let server = TestServer::start_exact_with(|config| {
        config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await
    .expect("server");
    let address = server.server.metrics_addr.expect("metrics served");

    let mut analyst = server.client("analyst").await.expect("client");
    let mut auditor = server.client("auditor").await.expect("client");
    let mut released = 0;
    let mut suppressed = 0;
    for sql in [
        "SELECT size_class, COUNT(*) FROM enterprises GROUP BY size_class",
        "SELECT tax_credit_rating, COUNT(*) FROM tax_monthly GROUP BY tax_credit_rating",
    ] {
        let result = analyst.sql(sql).await.expect("allowed");
        released += result.summary.rows_released;
        suppressed += auditor
            .events(result.summary.audit_seq, 1, false)
            .await
            .expect("journal")[0]
            .rows_suppressed;
    }
    assert!(suppressed > 0, "one query has a suppressed group");
    analyst
        .sql("SELECT * FROM enterprises")
        .await
        .expect_err("denied");
    // An L4 measure: answered under differential privacy, debiting the analyst's budget.
    let private = analyst
        .sql(
            "SELECT case_type, COUNT(*) AS n, AVG(amount) AS a FROM court_cases GROUP BY case_type",
        )
        .await
        .expect("private");
    let epsilon = private.summary.dp.expect("under DP").epsilon_spent;
    assert!(epsilon > 0.0);
    let mut stranger = Client::connect(&server.url(), "sbx_forged")
        .await
        .expect("client");
    stranger.datasets().await.expect_err("unauthenticated");

    let (status, body) = http_get(address, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let values = samples(&body);
    let value = |key: &str| {
        values
            .get(key)
            .copied()
            .unwrap_or_else(|| panic!("{key} in:\n{body}"))
    };
    let submit = "sandbox.v1.Sandbox/SubmitJob";
    let fetch = "sandbox.v1.Sandbox/FetchResult";
    assert_eq!(
        value(&format!(
            "sandbox_requests_total{{method=\"{submit}\",org=\"analytics\",code=\"OK\"}}"
        )),
        3.0
    );
    assert_eq!(
        value(&format!(
            "sandbox_requests_total{{method=\"{fetch}\",org=\"analytics\",code=\"OK\"}}"
        )),
        3.0
    );
    assert_eq!(
        value(&format!(
            "sandbox_requests_total{{method=\"{submit}\",org=\"analytics\",code=\"FAILED_PRECONDITION\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(
            "sandbox_requests_total{method=\"sandbox.v1.Sandbox/ListDatasets\",org=\"none\",code=\"UNAUTHENTICATED\"}"
        ),
        1.0
    );
    assert_eq!(
        value("sandbox_job_duration_seconds_count{kind=\"sql\",outcome=\"released\"}"),
        3.0
    );
    let private_rows = private.summary.rows_released;
    assert_eq!(
        value("sandbox_rows_released_total{org=\"analytics\"}"),
        (released + private_rows) as f64
    );
    assert_eq!(
        value("sandbox_rows_suppressed_total{org=\"analytics\"}"),
        suppressed as f64
    );
    let spent =
        value("sandbox_privacy_epsilon_spent_total{org=\"analytics\",dataset=\"court_cases\"}");
    assert!((spent - epsilon).abs() < 1e-12, "{spent} vs {epsilon}");
    assert!(value("sandbox_journal_append_seconds_count") >= 10.0);
    assert_eq!(value("sandbox_jobs_in_flight"), 0.0);

    let (status, _) = http_get(address, "/elsewhere").await;
    assert!(status.contains("404"), "{status}");
    server.server.shutdown().await.expect("shutdown");
}

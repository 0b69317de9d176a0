//! Shared fixtures of the end-to-end tests: a real server on an ephemeral loopback port over a
//! freshly generated demo data dir, and a client that talks to it through the real gRPC stubs.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
pub use sandbox_cli::{Client, SqlResult, rule_of};
use sandbox_server::{RunningServer, ServerConfig};

/// The repository's policy directory.
pub fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

/// Demo scale used by the tests: 1,000 enterprises, enough for groups above and below k = 10.
pub const TEST_SCALE: f64 = 0.05;

/// A server over its own temporary data dir; dropped with the test.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: RunningServer,
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data_dir = dir.path().join("data");
        let mut config = ServerConfig::for_tests(data_dir);
        config.policies = Some(policies_dir());
        config.demo_scale = TEST_SCALE;
        let server = sandbox_server::start(config).await?;
        Ok(TestServer { dir, server })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// The demo token of a principal, as written at first start.
    pub fn token(&self, name: &str) -> String {
        std::fs::read_to_string(
            self.data_dir()
                .join("credentials")
                .join(format!("{name}.token")),
        )
        .expect("demo token exists")
        .trim()
        .to_string()
    }

    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.url(), &self.token(name)).await?)
    }
}

/// Rows of batches rendered as sorted `a|b|c` strings, for order-insensitive comparison.
pub fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|c| arrow::util::display::array_value_to_string(c, row).expect("displayable"))
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

//! Shared fixtures of the end-to-end tests: a real server on an ephemeral loopback port over a
//! freshly generated demo data dir, and a client that talks to it through the real gRPC stubs.
//!
//! The package's test targets (declared in `tests/Cargo.toml`), each documented in its own header:
//! - `e2e` (`tests/e2e/`): the real server driven through the real client, checked against raw
//!   DataFusion over the same files and against the journal: DP (`privacy.rs`), a Dinur-Nissim
//!   reconstruction (`reconstruction.rs`), code jobs (`wasm.rs`), credentials, limits and queries
//!   of death (`hardening.rs`), Flight SQL through `arrow-flight`'s client and the Python ADBC
//!   driver (`flight.rs`, `adbc_check.py`; `examples/python/requirements.txt` installed into a
//!   virtual environment under the target dir, once), audit proofs and exports (`audit.rs`),
//!   joins, pseudonyms and templates (`depth.rs`), `/metrics` (`metrics.rs`), the everyday calls
//!   (`everyday.rs`: who one is, grants, budgets, consents, template parameters).
//! - `policy_suite` (`tests/policy_suite/`): data-driven cases, `cases/*.slt`, each allowed case
//!   also run by raw DataFusion; `BLESS=1` rewrites the expected outcomes.
//! - `adversary` (`tests/adversary/`): every threat class 1-30 with variants, against the demo and
//!   a deployment whose grants are marked exact, judged by whether a hidden value was recovered.
//!   Bounded in CI; `ADVERSARY_FULL=1` runs it at the demo's scale.
//! - `tidy` (`tests/tidy.rs`): every crate opens with its docs, `ARCHITECTURE.md` names every crate
//!   and every path it cites exists.

use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
pub use sandbox_cli::{Client, SqlResult, TlsFiles, rule_of};
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
    /// Whether it serves TLS (`url` is then `https://`).
    pub tls: bool,
}

/// The repository's policies with every aggregate grant its dataset allows marked exact (what
/// [`sandbox_policy::PolicySet::mark_exact_where_allowed`] does in memory), written to a
/// temporary folder for a server to load: for tests of the exact path (threshold, differencing,
/// joins) rather than of the demo's differential privacy by default.
pub fn exact_policies() -> anyhow::Result<tempfile::TempDir> {
    let policy = sandbox_policy::load_dir(&policies_dir())?;
    let allowed: Vec<String> = policy
        .datasets
        .values()
        .filter(|d| d.level() < sandbox_policy::Level::L4 && !d.row_key.is_empty())
        .map(|d| d.id.clone())
        .collect();
    let dir = tempfile::tempdir()?;
    for (path, text) in sandbox_policy::read_dir_sources(&policies_dir())? {
        let mut file: toml::Table = toml::from_str(&text)?;
        if let Some(toml::Value::Array(grants)) = file.get_mut("grant") {
            for grant in grants {
                let dataset = grant
                    .get("dataset")
                    .and_then(toml::Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                if let Some(toml::Value::Table(aggregate)) = grant.get_mut("aggregate")
                    && allowed.contains(&dataset)
                {
                    aggregate.insert("exact".into(), toml::Value::Boolean(true));
                }
            }
        }
        let name = Path::new(&path)
            .file_name()
            .expect("a policy file name")
            .to_owned();
        std::fs::write(dir.path().join(name), toml::to_string(&file)?)?;
    }
    Ok(dir)
}

impl TestServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// A server whose grants are exact wherever the datasets' levels allow ([`exact_policies`]).
    pub async fn start_exact() -> anyhow::Result<Self> {
        Self::start_exact_with(|_| {}).await
    }

    /// [`TestServer::start_exact`] with the configuration adjusted.
    pub async fn start_exact_with(
        configure: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        let policies = exact_policies()?;
        let dir = tempfile::tempdir()?;
        // The policies live in the server's own temporary folder, so they outlive the start.
        let copy = dir.path().join("exact-policies");
        std::fs::create_dir_all(&copy)?;
        for entry in std::fs::read_dir(policies.path())? {
            let entry = entry?;
            std::fs::copy(entry.path(), copy.join(entry.file_name()))?;
        }
        Self::start_in(dir, |config| {
            config.policies = Some(copy);
            configure(config);
        })
        .await
    }

    /// A server whose test configuration `configure` adjusts (limits, TLS).
    pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> anyhow::Result<Self> {
        Self::start_in(tempfile::tempdir()?, configure).await
    }

    async fn start_in(
        dir: tempfile::TempDir,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> anyhow::Result<Self> {
        let data_dir = dir.path().join("data");
        let mut config = ServerConfig::for_tests(data_dir);
        config.policies = Some(policies_dir());
        config.demo_scale = TEST_SCALE;
        configure(&mut config);
        let tls = config.tls;
        let server = sandbox_server::start(config).await?;
        Ok(TestServer { dir, server, tls })
    }

    /// Stops the server and starts a new one on the same data dir: what survives is what the
    /// journal and the data dir hold.
    pub async fn restart(self) -> anyhow::Result<Self> {
        self.restart_with(|| {}).await
    }

    /// Like [`TestServer::restart`], running `while_stopped` between the stop and the start.
    pub async fn restart_with(self, while_stopped: impl FnOnce()) -> anyhow::Result<Self> {
        let TestServer { dir, server, tls } = self;
        server.shutdown().await?;
        while_stopped();
        let exact = dir.path().join("exact-policies");
        Self::start_in(dir, |config| {
            config.tls = tls;
            if exact.is_dir() {
                config.policies = Some(exact);
            }
        })
        .await
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        // The server certificate names `localhost`, not the address.
        let host = if self.tls {
            format!("localhost:{}", self.server.addr.port())
        } else {
            self.server.addr.to_string()
        };
        format!("{scheme}://{host}")
    }

    /// The data dir's CA and client certificate of a principal (for a TLS server).
    pub fn tls_files(&self, name: &str) -> TlsFiles {
        TlsFiles::in_data_dir(&self.data_dir(), name)
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

    /// A client with the principal's bearer token (and, over TLS, trusting the local CA
    /// without a client certificate).
    pub async fn client(&self, name: &str) -> anyhow::Result<Client> {
        let tls = self.tls.then(|| TlsFiles {
            ca: self.tls_files(name).ca,
            ..TlsFiles::default()
        });
        Ok(Client::connect_with(&self.url(), Some(&self.token(name)), tls.as_ref()).await?)
    }
}

/// Rows of batches rendered as sorted `a|b|c` strings, for order-insensitive comparison. Floats
/// keep 9 significant digits: partial aggregates merge in whatever order the partitions finish, so
/// their last bits differ from run to run.
pub fn sorted_rows(batches: &[RecordBatch]) -> Vec<String> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|column| cell(column.as_ref(), row))
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

fn cell(column: &dyn arrow::array::Array, row: usize) -> String {
    use arrow::array::AsArray;
    use arrow::datatypes::{DataType, Float32Type, Float64Type};
    if column.is_null(row) {
        return "NULL".to_string();
    }
    match column.data_type() {
        DataType::Float64 => format!("{:.8e}", column.as_primitive::<Float64Type>().value(row)),
        DataType::Float32 => format!("{:.6e}", column.as_primitive::<Float32Type>().value(row)),
        _ => arrow::util::display::array_value_to_string(column, row).expect("displayable"),
    }
}

/// The `sandbox.manifest` JSON of a test module reading these columns.
pub fn manifest(input: &[&str]) -> String {
    format!(
        r#"{{"name":"test-guest","purpose":"credit_assessment","input":[{}]}}"#,
        input
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// Bytes as a WAT string literal.
fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// The input query the hostile suite's guests declare (they read the tax table's unit).
pub const SUITE_INPUT: &str = "SELECT credit_code FROM tax_monthly";

/// A module with a `sandbox.input` custom section holding `query` appended: the input its
/// owners approve with it.
pub fn with_input(wasm: Vec<u8>, query: &str) -> Vec<u8> {
    sandbox_cli::with_input_section(wasm, query)
}

/// A guest that reads its whole input (the `query` it declares), logs how many batches it read,
/// then emits `output` (an Arrow IPC stream) unchanged: what a scoring module does, with the
/// scores fixed by the test.
pub fn emitting_guest(output: &[u8], input: &[&str], query: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "sandbox" "input_next" (func $input_next (result i64)))
  (import "sandbox" "input_read" (func $input_read (param i32 i32) (result i32)))
  (import "sandbox" "output_emit" (func $output_emit (param i32 i32) (result i32)))
  (import "sandbox" "log" (func $log (param i32 i32)))
  (memory (export "memory") 64)
  (data (i32.const 0) "read all input")
  (data (i32.const 65536) "{output}")
  (@custom "sandbox.manifest" "{manifest}")
  (func (export "run") (param i32) (result i32)
    (local $len i32)
    (block $done
      (loop $next
        (local.set $len (i32.wrap_i64 (call $input_next)))
        (br_if $done (i32.lt_s (local.get $len) (i32.const 0)))
        (drop (call $input_read (i32.const 1048576) (local.get $len)))
        (br $next)))
    (call $log (i32.const 0) (i32.const 14))
    (call $output_emit (i32.const 65536) (i32.const {len}))))"#,
        output = wat_bytes(output),
        manifest = wat_bytes(manifest(input).as_bytes()),
        len = output.len(),
    );
    with_input(wat::parse_str(text).expect("valid test guest"), query)
}

/// A guest of the sandbox's hostile suite (`crates/sandbox-wasm/tests/guests/NAME.wat`); each
/// declares `tax_monthly.credit_code` as its input columns and [`SUITE_INPUT`] as its query.
pub fn suite_guest(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/sandbox-wasm/tests/guests")
        .join(format!("{name}.wat"));
    let wasm = wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    with_input(wasm, SUITE_INPUT)
}

/// Scores as the default scoring contract expects them, as one Arrow IPC stream.
pub fn scores_ipc(rows: &[(&str, i64, &str)]) -> Vec<u8> {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("credit_code", DataType::Utf8, false),
        Field::new("score", DataType::Int64, false),
        Field::new("grade", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.2))),
        ],
    )
    .expect("valid batch");
    ipc(&[batch])
}

/// Batches as one Arrow IPC stream.
pub fn ipc(batches: &[RecordBatch]) -> Vec<u8> {
    let mut writer = arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &batches[0].schema())
        .expect("writer");
    for batch in batches {
        writer.write(batch).expect("write");
    }
    writer.finish().expect("finish");
    writer.into_inner().expect("bytes")
}

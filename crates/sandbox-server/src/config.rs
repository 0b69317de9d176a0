//! Configuration of `sandboxd`, from the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sandbox_engine::{JournalOptions, SqlLimits, WasmLimits};

/// `sandboxd`: the data sandbox service.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "sandboxd",
    version,
    about = "Data sandbox: SQL over sensitive data, released only through policy checks, every access audited"
)]
pub struct ServerConfig {
    /// Data dir: datasets, credentials, audit journal. Generated with the demo on first start
    /// when empty or missing.
    #[arg(long, default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Policy directory. Default: `./policies` when present, else the data dir's `policies/`
    /// (written on first start), else the demo policies built into the binary.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Scale of the demo data generated on first start (1 = 20,000 enterprises over 24 months).
    #[arg(long, default_value_t = 1.0)]
    pub demo_scale: f64,
    /// Memory all running queries may use together, in MiB; operators spill beyond it.
    #[arg(long, default_value_t = 2048)]
    pub memory_limit_mib: usize,
    /// Wall-clock limit per query, in seconds.
    #[arg(long, default_value_t = 60)]
    pub query_timeout_secs: u64,
    /// Longest SQL text accepted, in bytes.
    #[arg(long, default_value_t = 65_536)]
    pub max_query_bytes: usize,
    /// Wall-clock limit of a WASM guest, in seconds.
    #[arg(long, default_value_t = 60)]
    pub wasm_timeout_secs: u64,
    /// Work budget of a WASM guest, in millions of fuel units (about one per instruction).
    #[arg(long, default_value_t = 200_000)]
    pub wasm_fuel_millions: u64,
    /// Largest linear memory of a WASM guest, in MiB.
    #[arg(long, default_value_t = 512)]
    pub wasm_memory_mib: usize,
    /// Most WASM guests running at once; more code jobs are refused with RESOURCE_EXHAUSTED.
    /// 0: one less than the CPU cores (at least 1).
    #[arg(long, default_value_t = 0)]
    pub wasm_max_concurrent: usize,
    /// The audit journal signs a checkpoint after at most this many new records...
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// ...or this many milliseconds after the first record no checkpoint covers (and at
    /// shutdown).
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_interval_ms: u64,
}

impl ServerConfig {
    /// Defaults for a data dir, listening on an ephemeral loopback port: for tests.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            listen: "127.0.0.1:0".parse().expect("valid address"),
            policies: None,
            demo_scale: 0.05,
            memory_limit_mib: 512,
            query_timeout_secs: 60,
            max_query_bytes: 65_536,
            // Short, so that runaway guests in tests end quickly.
            wasm_timeout_secs: 3,
            wasm_fuel_millions: 200_000,
            wasm_memory_mib: 512,
            wasm_max_concurrent: 1,
            checkpoint_every: 1000,
            checkpoint_interval_ms: 1000,
        }
    }

    pub fn journal_options(&self) -> JournalOptions {
        JournalOptions {
            checkpoint_every: self.checkpoint_every.max(1),
            checkpoint_interval: Duration::from_millis(self.checkpoint_interval_ms.max(1)),
            ..JournalOptions::default()
        }
    }

    pub fn wasm_limits(&self) -> WasmLimits {
        WasmLimits {
            wall_time: Duration::from_secs(self.wasm_timeout_secs.max(1)),
            fuel: self.wasm_fuel_millions.max(1).saturating_mul(1_000_000),
            memory_bytes: self.wasm_memory_mib.clamp(1, 4096) << 20,
            ..WasmLimits::default()
        }
    }

    pub fn sql_limits(&self) -> SqlLimits {
        SqlLimits {
            memory_pool_bytes: self.memory_limit_mib.max(16) * 1024 * 1024,
            time_limit: Duration::from_secs(self.query_timeout_secs.max(1)),
            max_query_bytes: self.max_query_bytes,
            ..SqlLimits::default()
        }
    }
}

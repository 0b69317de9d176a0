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
    /// when empty or missing (in builds with the `demo` feature, the default).
    #[arg(long, default_value = "./sandbox-data")]
    pub data_dir: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Serve Prometheus metrics (request counts, job durations, rows released, budget spent,
    /// journal latency, jobs in flight) as text on this address, at `/metrics`. Off by default;
    /// the endpoint has no authentication, so bind it where only the monitoring system reaches.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve TLS with the data dir's certificates (`tls/`, generated at first start): clients
    /// authenticate with a client certificate the local CA signed, or a bearer token, or both.
    #[arg(long)]
    pub tls: bool,
    /// Extra DNS name for the server certificate, when it is generated (repeatable).
    #[arg(long = "tls-name", value_name = "NAME")]
    pub tls_names: Vec<String>,
    /// Serve plaintext on a non-loopback address. Without it, such a listen address needs
    /// `--tls`: tokens would cross the network in the clear.
    #[arg(long)]
    pub insecure_plaintext: bool,
    /// Policy directory. Default: `./policies` when present, else the data dir's `policies/`
    /// (written on first start), else the demo policies built into the binary.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Scale of the demo data generated on first start (1 = 20,000 enterprises over 24 months).
    /// Refused by builds without the `demo` feature.
    #[arg(long, default_value_t = 1.0)]
    pub demo_scale: f64,
    /// Largest request message, in KiB (module uploads: --max-module-kib).
    #[arg(long, default_value_t = 4096)]
    pub max_request_kib: usize,
    /// Largest module upload, in KiB.
    #[arg(long, default_value_t = 16384)]
    pub max_module_kib: usize,
    /// Memory all running queries may use together, in MiB; operators spill beyond it.
    #[arg(long, default_value_t = 2048)]
    pub memory_limit_mib: usize,
    /// Memory one query may use, in MiB; its sorts and aggregates spill beyond it.
    #[arg(long, default_value_t = 512)]
    pub job_memory_limit_mib: usize,
    /// Disk all spill files (under `<data-dir>/tmp/spill`) may take together, in MiB.
    #[arg(long, default_value_t = 16384)]
    pub spill_limit_mib: u64,
    /// Wall-clock limit per query, in seconds.
    #[arg(long, default_value_t = 60)]
    pub query_timeout_secs: u64,
    /// Every job ends on a multiple of this many milliseconds after its admission, so that how
    /// long it took tells a caller little of what its data made it do. 0: as soon as it is done.
    #[arg(long, default_value_t = 50)]
    pub response_quantum_ms: u64,
    /// Longest SQL text accepted, in bytes.
    #[arg(long, default_value_t = 65_536)]
    pub max_query_bytes: usize,
    /// Deepest nesting the SQL parser follows (subqueries, parentheses).
    #[arg(long, default_value_t = 64)]
    pub sql_recursion_limit: usize,
    /// Most nodes (plan nodes plus expression terms) a query's plan may have.
    #[arg(long, default_value_t = 20_000)]
    pub max_plan_nodes: usize,
    /// Deepest expression a query may hold (`a + b + ...` of n terms is n deep).
    #[arg(long, default_value_t = 256)]
    pub max_expr_depth: usize,
    /// Most jobs running at once; more are refused with RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, default_value_t = 64)]
    pub max_jobs: usize,
    /// Most jobs one principal may have running at once.
    #[arg(long, default_value_t = 8)]
    pub max_jobs_per_principal: usize,
    /// Requests per second one principal may make on average...
    #[arg(long, default_value_t = 200)]
    pub rate_limit: u32,
    /// ...with bursts of up to this many; more are refused with RESOURCE_EXHAUSTED and a retry
    /// hint.
    #[arg(long, default_value_t = 400)]
    pub rate_burst: u32,
    /// Most concurrent calls on one client connection (HTTP/2 streams).
    #[arg(long, default_value_t = 256)]
    pub max_streams_per_connection: u32,
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
    /// The configuration from the command line; exits on `--help` or a usage error, as clap's
    /// `parse` does. A build without the demo generator refuses the flags that only configure it,
    /// rather than ignore them.
    pub fn from_command_line() -> anyhow::Result<Self> {
        use clap::{CommandFactory, FromArgMatches};
        let mut matches = Self::command().get_matches();
        // Asked before the values are taken out of the matches.
        let demo_flag_given =
            matches.value_source("demo_scale") == Some(clap::parser::ValueSource::CommandLine);
        let config = Self::from_arg_matches_mut(&mut matches)
            .map_err(|e| e.format(&mut Self::command()))
            .unwrap_or_else(|e| e.exit());
        if !cfg!(feature = "demo") && demo_flag_given {
            return Err(crate::bootstrap::without_demo(
                "--demo-scale sets the size of a generated demo",
            ));
        }
        Ok(config)
    }

    /// Defaults for a data dir, listening on an ephemeral loopback port: for tests.
    pub fn for_tests(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            listen: "127.0.0.1:0".parse().expect("valid address"),
            metrics_listen: None,
            tls: false,
            tls_names: Vec::new(),
            insecure_plaintext: false,
            policies: None,
            demo_scale: 0.05,
            max_request_kib: 4096,
            max_module_kib: 16384,
            memory_limit_mib: 512,
            job_memory_limit_mib: 256,
            spill_limit_mib: 4096,
            query_timeout_secs: 60,
            response_quantum_ms: 50,
            max_query_bytes: 65_536,
            sql_recursion_limit: 64,
            max_plan_nodes: 20_000,
            max_expr_depth: 256,
            max_jobs: 64,
            max_jobs_per_principal: 8,
            rate_limit: 1000,
            rate_burst: 2000,
            max_streams_per_connection: 256,
            // Short, so that runaway guests in tests end quickly.
            wasm_timeout_secs: 3,
            wasm_fuel_millions: 200_000,
            wasm_memory_mib: 512,
            wasm_max_concurrent: 1,
            checkpoint_every: 1000,
            checkpoint_interval_ms: 1000,
        }
    }

    /// Refuses listen addresses that would send tokens in the clear over a network.
    pub fn check_transport(&self) -> anyhow::Result<()> {
        if !self.tls && !self.insecure_plaintext && !self.listen.ip().is_loopback() {
            anyhow::bail!(
                "refusing to serve plaintext on {}: use --tls, listen on a loopback address, or \
                 pass --insecure-plaintext if a proxy in front terminates TLS",
                self.listen
            );
        }
        Ok(())
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_kib.max(1) << 10
    }

    pub fn max_module_bytes(&self) -> usize {
        self.max_module_kib.max(1) << 10
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
            memory_pool_bytes: self.memory_limit_mib.max(16) << 20,
            job_memory_bytes: self
                .job_memory_limit_mib
                .clamp(8, self.memory_limit_mib.max(16))
                << 20,
            spill_dir: Some(self.data_dir.join("tmp").join("spill")),
            max_spill_bytes: self.spill_limit_mib.max(1) << 20,
            time_limit: Duration::from_secs(self.query_timeout_secs.max(1)),
            max_query_bytes: self.max_query_bytes,
            parser_recursion_limit: self.sql_recursion_limit.max(1),
            max_plan_nodes: self.max_plan_nodes.max(1),
            max_expr_depth: self.max_expr_depth.max(1),
            ..SqlLimits::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plaintext only on loopback, unless TLS or the operator's explicit override.
    #[test]
    fn plaintext_is_refused_off_loopback() {
        let mut config = ServerConfig::for_tests(PathBuf::from("unused"));
        let cases = [
            ("127.0.0.1:50051", false, false, true),
            ("[::1]:50051", false, false, true),
            ("0.0.0.0:50051", false, false, false),
            ("10.1.2.3:50051", false, false, false),
            ("0.0.0.0:50051", true, false, true),
            ("0.0.0.0:50051", false, true, true),
        ];
        for (listen, tls, insecure, allowed) in cases {
            config.listen = listen.parse().expect("address");
            config.tls = tls;
            config.insecure_plaintext = insecure;
            assert_eq!(
                config.check_transport().is_ok(),
                allowed,
                "{listen} tls={tls} insecure={insecure}"
            );
        }
        config.listen = "0.0.0.0:50051".parse().expect("address");
        config.tls = false;
        config.insecure_plaintext = false;
        let message = config.check_transport().unwrap_err().to_string();
        assert!(message.contains("--tls") && message.contains("--insecure-plaintext"));
    }
}

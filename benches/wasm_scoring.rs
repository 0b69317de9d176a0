//! The credit model inside the sandbox against the same Rust model compiled natively, in one run.
//!
//! Both score the same 1,048,576 enterprises' feature rows (synthetic, seeded, in 8,192-row
//! batches as DataFusion produces them). The native path calls `credit_scoring::score_batch` on
//! each batch; the sandbox path is a full guest run of `credit_scoring.wasm`: a fresh instance
//! with fuel metering and the epoch deadline, every input batch encoded as Arrow IPC and copied
//! into the guest, decoded there, scored, encoded, and decoded and checked by the host. Rounds are
//! interleaved and the ratio of median throughputs is printed, as absolute times drift here. Cold
//! (compile) and warm (cached, instantiate and run over no input) module starts are printed too,
//! and the cost of moving the batches across the boundary alone (a guest that echoes them).
//!
//! `cargo bench -p sandbox-benches --bench wasm_scoring` builds the guest first when it is missing
//! (`cargo build --release -p credit-scoring --target wasm32-unknown-unknown`). Environment:
//! `SANDBOX_BENCH_ROWS` (default 1048576), `SANDBOX_BENCH_ROUNDS` (default 9).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Poisson};
use sandbox_benches::{median, target_dir};
use sandbox_wasm::{WasmLimits, WasmRuntime};

const BATCH_ROWS: usize = 8192;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The compiled guest, built on first use.
fn guest() -> anyhow::Result<PathBuf> {
    let path = target_dir().join("wasm32-unknown-unknown/release/credit_scoring.wasm");
    if !path.exists() {
        eprintln!(
            "building the guest: cargo build --release -p credit-scoring --target wasm32-unknown-unknown"
        );
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "-p",
                "credit-scoring",
                "--target",
                "wasm32-unknown-unknown",
            ])
            .status()?;
        anyhow::ensure!(status.success(), "building the guest failed");
    }
    Ok(path)
}

/// Seeded per-enterprise features with realistic spreads (log-normal revenue, rare risk flags).
fn features(rows: usize) -> Vec<RecordBatch> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20_241_231);
    let revenue = LogNormal::new(14.0, 1.2).expect("valid");
    let cases = Poisson::new(0.3).expect("valid");
    let schema = Arc::new(Schema::new(vec![
        Field::new("credit_code", DataType::Utf8, false),
        Field::new("revenue_recent", DataType::Float64, true),
        Field::new("revenue_prior", DataType::Float64, true),
        Field::new("vat_recent", DataType::Float64, true),
        Field::new("headcount_recent", DataType::Float64, true),
        Field::new("headcount_prior", DataType::Float64, true),
        Field::new("arrears_months", DataType::Int64, true),
        Field::new("covered_recent", DataType::Float64, true),
        Field::new("defendant_cases", DataType::Int64, false),
        Field::new("dishonest", DataType::Int64, false),
        Field::new("penalties", DataType::Int64, false),
    ]));
    let mut batches = Vec::new();
    let mut start = 0;
    while start < rows {
        let n = BATCH_ROWS.min(rows - start);
        let mut columns: Vec<Vec<f64>> = (0..6).map(|_| Vec::with_capacity(n)).collect();
        let mut counts: Vec<Vec<i64>> = (0..4).map(|_| Vec::with_capacity(n)).collect();
        let mut codes = Vec::with_capacity(n);
        for i in start..start + n {
            codes.push(format!("91450100{i:010}"));
            let r: f64 = revenue.sample(&mut rng);
            let growth: f64 = rng.random_range(0.6..1.4);
            let headcount: f64 = (r / 400_000.0).max(1.0).round();
            columns[0].push(r);
            columns[1].push(r / growth);
            columns[2].push(r * rng.random_range(0.0..0.08));
            columns[3].push(headcount);
            columns[4].push((headcount / rng.random_range(0.8..1.2)).round());
            columns[5].push((headcount * rng.random_range(0.0..1.0)).round());
            counts[0].push(if rng.random_bool(0.1) {
                rng.random_range(1..6)
            } else {
                0
            });
            counts[1].push(cases.sample(&mut rng) as i64);
            counts[2].push(i64::from(rng.random_bool(0.02)));
            counts[3].push(cases.sample(&mut rng) as i64);
        }
        let float = |v: &Vec<f64>| Arc::new(Float64Array::from(v.clone())) as ArrayRef;
        let int = |v: &Vec<i64>| Arc::new(Int64Array::from(v.clone())) as ArrayRef;
        batches.push(
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringArray::from(codes)),
                    float(&columns[0]),
                    float(&columns[1]),
                    float(&columns[2]),
                    float(&columns[3]),
                    float(&columns[4]),
                    int(&counts[0]),
                    float(&columns[5]),
                    int(&counts[1]),
                    int(&counts[2]),
                    int(&counts[3]),
                ],
            )
            .expect("valid batch"),
        );
        start += n;
    }
    batches
}

fn main() -> anyhow::Result<()> {
    let rows = env_number("SANDBOX_BENCH_ROWS", 1 << 20);
    let rounds = env_number("SANDBOX_BENCH_ROUNDS", 9).max(1);
    let bytes = std::fs::read(guest()?)?;
    println!(
        "guest: credit_scoring.wasm, {} bytes; {rows} feature rows in {BATCH_ROWS}-row batches",
        bytes.len()
    );
    let input = features(rows);

    let limits = WasmLimits {
        wall_time: Duration::from_secs(600),
        fuel: u64::MAX / 2,
        memory_bytes: 1 << 30,
        max_output_rows: rows + 1,
        max_output_bytes: 1 << 30,
        max_output_batches: rows,
        ..WasmLimits::default()
    };

    // Cold start: validation and compilation by a fresh runtime; warm start: a run of the cached
    // module over no input (new store, instance and memory, entry point, no batches).
    let mut cold = Vec::new();
    for _ in 0..3 {
        let runtime = WasmRuntime::new(limits.clone())?;
        let started = Instant::now();
        runtime.inspect(&bytes)?;
        cold.push(started.elapsed());
    }
    let runtime = WasmRuntime::new(limits)?;
    let sha = runtime.inspect(&bytes)?.sha256;
    let mut warm = Vec::new();
    for _ in 0..20 {
        let started = Instant::now();
        runtime
            .run(
                &sha,
                || unreachable!("cached"),
                Vec::new(),
                b"{}",
                Arc::new(AtomicBool::new(false)),
            )
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        warm.push(started.elapsed());
    }
    println!(
        "module start: cold (compile) {:.1} ms, warm (cached) {:.3} ms; medians",
        median(cold).as_secs_f64() * 1e3,
        median(warm).as_secs_f64() * 1e3
    );

    let mut native_times = Vec::new();
    let mut sandbox_times = Vec::new();
    let mut work_units = 0;
    for round in 0..rounds {
        let started = Instant::now();
        // Like the sandbox, the native path keeps every scored batch: both end holding the result.
        let mut scored = Vec::with_capacity(input.len());
        for batch in &input {
            scored.push(credit_scoring::score_batch(batch).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        native_times.push(started.elapsed());
        let scored: usize = scored.iter().map(|b| b.num_rows()).sum();
        anyhow::ensure!(scored == rows, "native scored {scored} rows");

        let batches = input.clone();
        let started = Instant::now();
        let output = runtime
            .run(
                &sha,
                || unreachable!("cached"),
                batches,
                b"{}",
                Arc::new(AtomicBool::new(false)),
            )
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        sandbox_times.push(started.elapsed());
        let released: usize = output.batches.iter().map(|b| b.num_rows()).sum();
        anyhow::ensure!(released == rows, "the guest scored {released} rows");
        work_units = output.work_units;
        if round == 0 {
            // Same model, same answers.
            let native =
                credit_scoring::score_batch(&input[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(
                output.batches[0] == native,
                "sandbox and native scores differ"
            );
        }
    }
    // Where the sandbox's time goes: the same batches through a guest that only echoes them
    // (host encoding, copies across the boundary, host decoding of the output), and the host's
    // encoding alone.
    let echo = runtime.inspect(&wat::parse_str(ECHO_GUEST)?)?.sha256;
    let mut echo_times = Vec::new();
    for _ in 0..rounds {
        let batches = input.clone();
        let started = Instant::now();
        runtime
            .run(
                &echo,
                || unreachable!("cached"),
                batches,
                b"{}",
                Arc::new(AtomicBool::new(false)),
            )
            .map_err(|f| anyhow::anyhow!("{f}"))?;
        echo_times.push(started.elapsed());
    }
    println!(
        "an echo guest (every input batch across the boundary and back, no work): {:.1} ms",
        median(echo_times).as_secs_f64() * 1e3
    );
    let (native, sandbox) = (median(native_times), median(sandbox_times));
    let throughput = |d: Duration| rows as f64 / d.as_secs_f64();
    println!(
        "native:  {:>8.1} ms  {:>12.0} rows/s",
        native.as_secs_f64() * 1e3,
        throughput(native)
    );
    println!(
        "sandbox: {:>8.1} ms  {:>12.0} rows/s  ({work_units} work units)",
        sandbox.as_secs_f64() * 1e3,
        throughput(sandbox)
    );
    println!(
        "throughput ratio sandbox / native, medians of {rounds} interleaved rounds: {:.3} (target >= 0.5)",
        throughput(sandbox) / throughput(native)
    );
    Ok(())
}

/// The sandbox suite's guest that emits every input batch unchanged.
const ECHO_GUEST: &str = include_str!("../crates/sandbox-wasm/tests/guests/echo.wat");

//! The sandbox against hostile and well-behaved guests. Each guest is a `.wat` file under
//! `tests/guests/` whose header says what must happen:
//!
//! ```text
//! ;; expect: ok | <error code> [<limit>]
//! ;; limits: fuel=N wall_ms=N max_output_rows=N   (optional overrides)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, Int64Array, RecordBatch, StringViewArray};
use arrow::datatypes::{DataType, Field, Schema};
use sandbox_wasm::{WasmError, WasmLimits, WasmRuntime};

fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests")
}

/// Limits small enough that hostile guests hit them in milliseconds.
fn test_limits() -> WasmLimits {
    WasmLimits {
        fuel: 50_000_000,
        wall_time: Duration::from_secs(5),
        memory_bytes: 16 << 20,
        table_elements: 10_000,
        stack_bytes: 256 << 10,
        max_output_bytes: 1 << 20,
        max_output_rows: 100_000,
        max_output_batches: 1_000,
        max_log_lines: 50,
        max_log_line_bytes: 100,
    }
}

fn input() -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("credit_code", DataType::Utf8View, false),
        Field::new("vat_paid", DataType::Float64, false),
        Field::new("months", DataType::Int64, false),
    ]));
    (0..3)
        .map(|b| {
            let codes: Vec<String> = (0..10).map(|i| format!("code-{b}-{i}")).collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringViewArray::from_iter_values(codes)),
                    Arc::new(Float64Array::from_iter_values((0..10).map(|i| i as f64))),
                    Arc::new(Int64Array::from_iter_values(0..10)),
                ],
            )
            .unwrap()
        })
        .collect()
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: String,
    limits: WasmLimits,
}

fn cases() -> Vec<Case> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(guests_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wat"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "the hostile guest suite went missing");
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let header = |key: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!(";; {key}:")))
                    .map(|v| v.trim().to_string())
            };
            let expect = header("expect").unwrap_or_else(|| panic!("{name}: no expect line"));
            let mut limits = test_limits();
            for setting in header("limits").unwrap_or_default().split_whitespace() {
                let (key, value) = setting.split_once('=').unwrap();
                let value: u64 = value.parse().unwrap();
                match key {
                    "fuel" => limits.fuel = value,
                    "wall_ms" => limits.wall_time = Duration::from_millis(value),
                    "max_output_rows" => limits.max_output_rows = value as usize,
                    "max_output_batches" => limits.max_output_batches = value as usize,
                    other => panic!("{name}: unknown limit {other}"),
                }
            }
            let bytes = wat::parse_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            Case {
                name,
                bytes,
                expect,
                limits,
            }
        })
        .collect()
}

/// Inspects (as at upload) and runs one guest; the outcome as `ok` or `code [limit]`.
fn outcome(case: &Case) -> (String, Duration) {
    let runtime = WasmRuntime::new(case.limits.clone()).unwrap();
    let started = Instant::now();
    let describe = |e: &WasmError| match e {
        WasmError::LimitExceeded { limit, .. } => format!("{} {}", e.code(), limit.name()),
        other => other.code().to_string(),
    };
    let inspected = match runtime.inspect(&case.bytes) {
        Ok(inspected) => inspected,
        Err(e) => {
            assert!(e.is_invalid_module(), "{}: {e}", case.name);
            return (describe(&e), started.elapsed());
        }
    };
    let result = runtime.run(
        &inspected.sha256,
        || unreachable!("the module is cached"),
        input(),
        b"{}",
        Arc::new(AtomicBool::new(false)),
    );
    let text = match result.map_err(|f| f.error) {
        Ok(_) => "ok".to_string(),
        Err(e) => {
            // Messages name the limit, never data.
            assert!(!e.to_string().contains("code-"), "{}: {e}", case.name);
            describe(&e)
        }
    };
    (text, started.elapsed())
}

#[test]
fn every_guest_meets_its_expectation() {
    let mut failures = Vec::new();
    for case in cases() {
        let (got, took) = outcome(&case);
        if got != case.expect {
            failures.push(format!(
                "{}: expected `{}`, got `{got}`",
                case.name, case.expect
            ));
        }
        // Contained promptly: no hostile guest outlives its limits by much, and none makes the
        // host work much either (a trusted length prefix once cost seconds and gigabytes).
        assert!(took < Duration::from_secs(5), "{} took {took:?}", case.name);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn echo_guest_round_trips_batches_and_logs() {
    let case = cases().into_iter().find(|c| c.name == "echo").unwrap();
    let runtime = WasmRuntime::new(case.limits.clone()).unwrap();
    let inspected = runtime.inspect(&case.bytes).unwrap();
    assert_eq!(inspected.manifest.purpose, "credit_assessment");
    let output = runtime
        .run(
            &inspected.sha256,
            || unreachable!(),
            input(),
            b"",
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
    assert_eq!(output.batches.len(), 3);
    assert_eq!(output.input_rows, 30);
    let schema = output.schema.unwrap();
    // View types cross the boundary as their plain forms.
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
    assert_eq!(output.logs, vec!["echo started".to_string()]);
    assert!(output.work_units > 0);
}

#[test]
fn work_units_are_deterministic() {
    let case = cases().into_iter().find(|c| c.name == "echo").unwrap();
    let runtime = WasmRuntime::new(case.limits.clone()).unwrap();
    let sha = runtime.inspect(&case.bytes).unwrap().sha256;
    let run = || {
        runtime
            .run(
                &sha,
                || unreachable!(),
                input(),
                b"",
                Arc::new(AtomicBool::new(false)),
            )
            .unwrap()
            .work_units
    };
    assert_eq!(run(), run());
}

#[test]
fn cache_miss_compiles_from_bytes_checked_against_the_hash() {
    let case = cases().into_iter().find(|c| c.name == "echo").unwrap();
    let runtime = WasmRuntime::new(case.limits.clone()).unwrap();
    let sha = sandbox_wasm::sha256_hex(&case.bytes);
    let output = runtime
        .run(
            &sha,
            || Ok(case.bytes.clone()),
            input(),
            b"",
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
    assert_eq!(output.batches.len(), 3);
    // Bytes that do not match the hash (a changed module) are refused.
    let other = WasmRuntime::new(case.limits.clone()).unwrap();
    let mut changed = case.bytes.clone();
    changed.extend_from_slice(b"\0\x01x");
    let refused = other.run(
        &sha,
        || Ok(changed),
        input(),
        b"",
        Arc::new(AtomicBool::new(false)),
    );
    assert!(matches!(refused, Err(f) if matches!(f.error, WasmError::ModuleChanged)));
}

#[test]
fn malformed_bytes_are_refused_at_upload() {
    let runtime = WasmRuntime::new(test_limits()).unwrap();
    for bytes in [
        b"not wasm at all".to_vec(),
        b"\0asm\x01\0\0\0\xff\xff\xff".to_vec(),
        Vec::new(),
    ] {
        let error = runtime.inspect(&bytes).unwrap_err();
        assert!(
            matches!(error.code(), "wasm-malformed" | "wasm-manifest"),
            "{error}"
        );
        assert!(error.is_invalid_module());
    }
}

#[test]
fn cancellation_stops_a_running_guest() {
    let case = cases()
        .into_iter()
        .find(|c| c.name == "infinite_loop_wall_time")
        .unwrap();
    let mut limits = case.limits.clone();
    limits.wall_time = Duration::from_secs(60);
    let runtime = Arc::new(WasmRuntime::new(limits).unwrap());
    let sha = runtime.inspect(&case.bytes).unwrap().sha256;
    let cancel = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let handle = {
        let runtime = runtime.clone();
        let cancel = cancel.clone();
        std::thread::spawn(move || runtime.run(&sha, || unreachable!(), input(), b"", cancel))
    };
    std::thread::sleep(Duration::from_millis(100));
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let result = handle.join().unwrap();
    assert!(
        matches!(&result, Err(f) if matches!(f.error, WasmError::Cancelled)),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

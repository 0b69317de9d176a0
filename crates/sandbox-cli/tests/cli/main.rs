//! The CLI contract: the real `sandbox` binary against a real server on an ephemeral port, checking
//! output and exit codes (0 ok, 1 verification failed, 2 usage, 3 denied, 4 not permitted, 5 other).

mod readme;

use std::path::{Path, PathBuf};
use std::process::Output;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(addr: &str, data_dir: &Path, args: &[&str]) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .arg("--addr")
        .arg(addr)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("SANDBOX_TOKEN")
        .output()
        .expect("the CLI runs");
    Run {
        code: status.code().expect("exited normally"),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// The CLI with only these arguments (no `--addr` or `--data-dir` added), from `cwd`, with
/// `stdin` as its input.
fn run_with(cwd: &Path, stdin: &str, envs: &[(&str, &str)], args: &[&str]) -> Run {
    use std::io::Write as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox"))
        .current_dir(cwd)
        .args(args)
        .env_remove("SANDBOX_TOKEN")
        .env_remove("SANDBOX_ADDR")
        .env_remove("SANDBOX_DATA_DIR")
        .envs(envs.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the CLI starts");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())
        .expect("stdin written");
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("the CLI runs");
    Run {
        code: status.code().expect("exited normally"),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Runs each case (arguments, exit code, text expected in stdout or stderr) in order.
async fn check(addr: &str, data_dir: &Path, cases: &[(Vec<&str>, i32, &str)]) {
    for (args, code, needle) in cases {
        let addr = addr.to_string();
        let data_dir = data_dir.to_path_buf();
        let owned: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let out = tokio::task::spawn_blocking(move || {
            let owned: Vec<&str> = owned.iter().map(String::as_str).collect();
            run(&addr, &data_dir, &owned)
        })
        .await
        .expect("join");
        assert_eq!(
            out.code, *code,
            "{args:?}\nstdout: {}\nstderr: {}",
            out.stdout, out.stderr
        );
        assert!(
            out.stdout.contains(needle) || out.stderr.contains(needle),
            "{args:?}: `{needle}` not in\nstdout: {}\nstderr: {}",
            out.stdout,
            out.stderr
        );
    }
}

fn policies() -> PathBuf {
    repository().join("policies")
}

/// A demo server on an ephemeral port over `data_dir`, with the repository's policies, and its
/// plaintext address.
async fn demo_server(data_dir: &Path) -> (sandbox_server::RunningServer, String) {
    let mut config = sandbox_server::ServerConfig::for_tests(data_dir.to_path_buf());
    config.policies = Some(policies());
    let server = sandbox_server::start(config).await.expect("server");
    let addr = format!("http://{}", server.addr);
    (server, addr)
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let (server, addr) = demo_server(&data_dir).await;

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--as", "analyst", "datasets"], 0, "enterprises"),
        (
            vec!["--as", "analyst", "--format", "csv", "datasets", "all"],
            0,
            "tax_monthly,vat_paid,decimal number,",
        ),
        (
            vec!["--as", "analyst", "datasets", "nonesuch"],
            2,
            "no dataset `nonesuch` among those you may use: ",
        ),
        (
            vec![
                "--as",
                "analyst",
                "sql",
                "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class",
            ],
            0,
            "size_class",
        ),
        (
            vec![
                "--as",
                "bank",
                "--format",
                "json",
                "sql",
                "SELECT month, COUNT(*) AS n FROM tax_monthly GROUP BY month",
            ],
            0,
            "\"month\":\"2024-12\"",
        ),
        (
            vec![
                "--as",
                "analyst",
                "sql",
                "SELECT credit_code FROM enterprises",
            ],
            3,
            "identifier-output",
        ),
        (
            vec![
                "--as",
                "analyst",
                "explain",
                "SELECT MAX(vat_paid) FROM tax_monthly",
            ],
            3,
            "function-not-allowed",
        ),
        (
            vec![
                "--as",
                "analyst",
                "explain",
                "SELECT COUNT(*) FROM tax_monthly",
            ],
            0,
            "__sandbox_units",
        ),
        (
            vec!["--as", "auditor", "audit", "tail", "-n", "5"],
            0,
            "SubmitJob",
        ),
        (vec!["--as", "bank", "audit", "tail"], 4, "not permitted"),
        (
            vec!["--as", "auditor", "sql", "SELECT COUNT(*) FROM enterprises"],
            4,
            "not permitted",
        ),
        // An unknown name lists the names that exist.
        (
            vec!["--as", "nobody", "datasets"],
            2,
            "the principals there are: admin, analyst, auditor, bank",
        ),
        (vec!["datasets"], 2, "no credentials"),
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
        (
            vec!["--as", "analyst", "sql", "SELEKT"],
            2,
            "invalid request",
        ),
        // Differential privacy: the summary tells the spend and what is left; the budget shows.
        (
            vec![
                "--as",
                "analyst",
                "sql",
                "--epsilon",
                "0.5",
                "SELECT COUNT(*) AS n FROM tax_monthly",
            ],
            0,
            "spent epsilon 0.5000",
        ),
        (
            vec![
                "--as",
                "analyst",
                "sql",
                "--epsilon",
                "5",
                "SELECT COUNT(*) AS n FROM tax_monthly",
            ],
            3,
            "dp-epsilon-not-allowed",
        ),
        (
            vec!["--as", "analyst", "--format", "json", "budget", "show"],
            0,
            "\"dataset\":\"tax_monthly\"",
        ),
        (
            vec![
                "--as",
                "analyst",
                "budget",
                "refresh",
                "--org",
                "analytics",
                "--dataset",
                "tax_monthly",
                "--reason",
                "mine",
            ],
            4,
            "not permitted",
        ),
        (
            vec![
                "--as",
                "owner_tax",
                "--format",
                "csv",
                "budget",
                "refresh",
                "--org",
                "analytics",
                "--dataset",
                "tax_monthly",
                "--reason",
                "new quarter",
            ],
            0,
            "analytics,tax_monthly,0,",
        ),
    ];
    check(&addr, &data_dir, &cases).await;

    // The auditor's offline evidence: a kept checkpoint, a proof, an export verified with no
    // server, and the same export against the kept checkpoint.
    let kept = dir.path().join("kept.json");
    let bundle = dir.path().join("bundle");
    let kept_arg = kept.to_str().expect("utf8").to_string();
    let bundle_arg = bundle.to_str().expect("utf8").to_string();
    let missing_arg = dir.path().join("bundel").display().to_string();
    let cases = [
        (
            vec![
                "--as",
                "auditor",
                "audit",
                "checkpoint",
                "--fresh",
                "--out",
                &kept_arg,
            ],
            0,
            "signature:",
        ),
        (
            vec!["--as", "bank", "audit", "checkpoint"],
            4,
            "not permitted",
        ),
        (
            vec!["--as", "auditor", "--format", "json", "audit", "prove", "3"],
            0,
            "\"included\":\"yes\"",
        ),
        (
            vec!["--as", "auditor", "audit", "prove", "999999"],
            2,
            "not in",
        ),
        (
            vec![
                "--as",
                "auditor",
                "audit",
                "sql",
                "SELECT action, COUNT(*) AS n FROM events GROUP BY action ORDER BY action",
            ],
            0,
            "SubmitJob",
        ),
        (
            vec![
                "--as",
                "bank",
                "audit",
                "sql",
                "SELECT COUNT(*) FROM events",
            ],
            4,
            "not permitted",
        ),
        (
            vec!["--as", "bank", "audit", "export", "--out", &bundle_arg],
            4,
            "not permitted",
        ),
        (
            vec!["--as", "auditor", "audit", "export", "--out", &bundle_arg],
            0,
            "journal.log",
        ),
        (
            vec![
                "--format",
                "json",
                "audit",
                "verify",
                "--bundle",
                &bundle_arg,
            ],
            0,
            "\"journal\":\"OK\"",
        ),
        // A mistyped path is a usage error (2), never the tamper alarm (1).
        (
            vec!["audit", "verify", "--bundle", &missing_arg],
            2,
            "no bundle folder at",
        ),
        (
            vec![
                "audit",
                "verify",
                "--bundle",
                &bundle_arg,
                "--trusted-checkpoint",
                &missing_arg,
            ],
            2,
            "cannot read the trusted checkpoint",
        ),
        (
            vec![
                "audit",
                "verify",
                "--bundle",
                &bundle_arg,
                "--trusted-checkpoint",
                &kept_arg,
            ],
            0,
            "extends_trusted_checkpoint_of:",
        ),
    ];
    check(&addr, &data_dir, &cases).await;
    let journal = bundle.join("journal.log");
    let mut bytes = std::fs::read(&journal).expect("bundle journal");
    let last = bytes.len() - 40;
    bytes[last] ^= 0x01;
    std::fs::write(&journal, &bytes).expect("tamper");
    let out = run(
        &addr,
        &data_dir,
        &["audit", "verify", "--bundle", &bundle_arg],
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("FAILED: record"), "{}", out.stderr);

    // A bad token file is an authentication failure (4), not a usage error.
    let bad = dir.path().join("bad.token");
    std::fs::write(&bad, "sbx_0000").expect("write");
    let out = run(
        &addr,
        &data_dir,
        &["--token-file", bad.to_str().expect("utf8"), "datasets"],
    );
    assert_eq!(out.code, 4, "{}", out.stderr);

    server.shutdown().await.expect("shutdown");

    // Offline verification: passes on the intact journal, fails naming the record after tampering.
    let out = run(&addr, &data_dir, &["audit", "verify"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("journal:"), "{}", out.stdout);
    assert!(out.stdout.contains("OK"), "{}", out.stdout);
    let journal = data_dir.join("audit/journal.log");
    let mut bytes = std::fs::read(&journal).expect("journal");
    let first_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let second = 8 + 8 + first_len + 32;
    bytes[second + 8 + 2] ^= 0x20;
    std::fs::write(&journal, &bytes).expect("tamper");
    let out = run(&addr, &data_dir, &["audit", "verify"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(out.stderr.contains("record 2"), "{}", out.stderr);

    // Policy check: the repository's policies pass; a broken one names file and line.
    let out = run(
        &addr,
        &data_dir,
        &["policy", "check", policies().to_str().expect("utf8")],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).expect("mkdir");
    std::fs::write(broken.join("x.toml"), "org = \"tax_bureau\"\nshade = 1\n").expect("write");
    let out = run(
        &addr,
        &data_dir,
        &["policy", "check", broken.to_str().expect("utf8")],
    );
    assert_eq!(out.code, 5);
    assert!(out.stderr.contains("x.toml:2"), "{}", out.stderr);
}

/// A guest of the sandbox's hostile suite, compiled to a file, with the input query it declares
/// (the suite's guests read the tax table's unit).
fn guest_file(dir: &Path, name: &str) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sandbox-wasm/tests/guests")
        .join(format!("{name}.wat"));
    let bytes = sandbox_cli::with_input_section(
        wat::parse_file(&source).expect("valid guest"),
        "SELECT credit_code FROM tax_monthly",
    );
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).expect("write guest");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_code_jobs_and_consents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let (server, addr) = demo_server(&data_dir).await;
    let path = |name: &str| guest_file(dir.path(), name).to_string_lossy().into_owned();
    let (echo, looping, wasi) = (
        path("echo"),
        path("infinite_loop_wall_time"),
        path("wasi_import"),
    );
    let input = "SELECT credit_code FROM tax_monthly";
    let (echo_sha, looping_sha) = (sha(&echo), sha(&looping));

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--as", "bank", "module", "upload", &echo],
            0,
            "pending",
        ),
        (
            vec!["--as", "bank", "module", "upload", &wasi],
            2,
            "wasm-forbidden-import",
        ),
        (
            vec!["--as", "analyst", "module", "upload", &echo],
            4,
            "not permitted",
        ),
        // Not approved yet: denied (3).
        (
            vec!["--as", "bank", "wasm", "run", &echo, "--input", input],
            3,
            "module-not-approved",
        ),
        (
            vec![
                "--as", "bank", "wasm", "run", &echo, "--input", input, "--params", "{",
            ],
            2,
            "not JSON",
        ),
        // An approval shows what is approved and asks; with no terminal to ask on, nothing is
        // approved without --yes.
        (
            vec!["--as", "owner_tax", "module", "approve", &echo_sha],
            2,
            "approve with --yes",
        ),
        (
            vec!["--as", "owner_tax", "module", "approve", &echo_sha],
            2,
            "input_query:",
        ),
        (
            vec!["--as", "owner_tax", "module", "approve", &echo_sha, "--yes"],
            0,
            "approved",
        ),
        (
            vec![
                "--as",
                "owner_court",
                "module",
                "approve",
                &echo_sha,
                "--yes",
            ],
            4,
            "not permitted",
        ),
        // Approved, but echoing raw rows breaks the scoring contract: denied (3).
        (
            vec!["--as", "bank", "wasm", "run", &echo, "--input", input],
            3,
            "contract-violation",
        ),
        (
            vec!["--as", "bank", "module", "upload", &looping],
            0,
            "pending",
        ),
        (
            vec!["--as", "owner_tax", "module", "approve", &looping_sha, "-y"],
            0,
            "approved",
        ),
        // A resource limit: 5, naming the limit.
        (
            vec!["--as", "bank", "wasm", "run", &looping, "--input", input],
            5,
            "wall-time limit exceeded",
        ),
        (vec!["--as", "auditor", "module", "list"], 0, "approved"),
        (
            vec!["--as", "bank", "--format", "csv", "consent", "list"],
            0,
            "bank_demo,credit_assessment,active,",
        ),
        (
            vec![
                "--as",
                "admin",
                "consent",
                "add",
                "91450100MA5KTEST1X",
                "--org",
                "bank_demo",
            ],
            0,
            "91450100MA5KTEST1X",
        ),
        (
            vec![
                "--as",
                "bank",
                "consent",
                "add",
                "91450100MA5KTEST1X",
                "--org",
                "bank_demo",
            ],
            4,
            "not permitted",
        ),
        (
            vec![
                "--as",
                "bank",
                "consent",
                "revoke",
                "91450100MA5KTEST1X",
                "--org",
                "bank_demo",
            ],
            0,
            "revoked",
        ),
        (
            vec![
                "--as",
                "bank",
                "consent",
                "revoke",
                "91450100MA5KTEST1X",
                "--org",
                "bank_demo",
            ],
            5,
            "no such consent",
        ),
    ];
    check(&addr, &data_dir, &cases).await;

    // The auditor sees a code job's work units and the guest's log line, and which enterprise a
    // consent revocation was for.
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--as", "auditor", "--wide", "audit", "tail", "-n", "100"],
            0,
            "work units ",
        ),
        (
            vec!["--as", "auditor", "--wide", "audit", "tail", "-n", "100"],
            0,
            "guest log: ",
        ),
        (
            vec!["--as", "auditor", "--wide", "audit", "tail", "-n", "3"],
            0,
            "91450100MA5KTEST1X",
        ),
    ];
    check(&addr, &data_dir, &cases).await;
    server.shutdown().await.expect("shutdown");
}

/// The output contract's shape: a table for people is not empty, CSV has one header and rows of
/// its width, JSON is one array of objects.
fn assert_shape(format: &str, args: &[&str], stdout: &str) {
    match format {
        "table" => assert!(!stdout.trim().is_empty(), "{args:?}"),
        "csv" => {
            let mut reader = csv::Reader::from_reader(stdout.as_bytes());
            let width = reader.headers().expect("a header line").len();
            assert!(width > 0, "{args:?}");
            for record in reader.records() {
                assert_eq!(record.expect("a CSV row").len(), width, "{args:?}");
            }
        }
        _ => {
            let value: serde_json::Value = serde_json::from_str(stdout)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
            let rows = value.as_array().expect("one JSON array");
            assert!(rows.iter().all(|r| r.is_object()), "{args:?}");
        }
    }
}

/// Every read-only command in every format: a table for people, CSV with one header and rows of
/// its width, JSON as one array of objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_every_command_in_every_format() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let (server, addr) = demo_server(&data_dir).await;
    let policies = policies().display().to_string();
    let commands: Vec<Vec<&str>> = vec![
        vec!["--as", "analyst", "whoami"],
        vec!["--as", "analyst", "datasets"],
        vec!["--as", "analyst", "datasets", "enterprises"],
        vec!["--as", "owner_tax", "grants"],
        vec![
            "--as",
            "analyst",
            "sql",
            "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class",
        ],
        vec![
            "--as",
            "analyst",
            "explain",
            "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class",
        ],
        vec!["--as", "bank", "template", "list"],
        vec!["--as", "bank", "template", "show", "industry_region_risk"],
        vec![
            "--as",
            "bank",
            "template",
            "run",
            "industry_region_risk",
            "--param",
            "since=2023-01",
        ],
        vec!["--as", "auditor", "module", "list"],
        vec!["--as", "bank", "consent", "list"],
        vec!["--as", "analyst", "budget", "show"],
        vec!["--as", "owner_tax", "budget", "show"],
        vec!["--as", "auditor", "audit", "tail", "-n", "5"],
        vec![
            "--as",
            "auditor",
            "audit",
            "sql",
            "SELECT action, COUNT(*) AS n FROM events GROUP BY action",
        ],
        vec!["--as", "auditor", "audit", "checkpoint"],
        vec!["--as", "auditor", "audit", "prove", "2"],
        vec!["policy", "check", &policies],
    ];
    for command in &commands {
        for format in ["table", "csv", "json"] {
            let mut args = vec!["--format", format];
            args.extend(command.iter().copied());
            let out = run(&addr, &data_dir, &args);
            assert_eq!(out.code, 0, "{args:?}\n{}\n{}", out.stdout, out.stderr);
            assert_shape(format, &args, &out.stdout);
        }
    }
    // The commands that change state, once per format (each on its own object).
    let template =
        std::fs::read_to_string(repository().join("examples/templates/industry_region_risk.toml"))
            .expect("example template");
    for format in ["table", "csv", "json"] {
        let unit = format!("91450100MA5K{:0>5}X", format.len());
        let template_file = dir.path().join(format!("{format}.toml"));
        std::fs::write(
            &template_file,
            template.replace("\"industry_region_risk\"", &format!("\"risk_{format}\"")),
        )
        .expect("write");
        let template_arg = template_file.display().to_string();
        let out_dir = dir
            .path()
            .join(format!("bundle-{format}"))
            .display()
            .to_string();
        let name = format!("risk_{format}");
        let commands: Vec<Vec<&str>> = vec![
            vec![
                "--as",
                "admin",
                "consent",
                "add",
                &unit,
                "--org",
                "bank_demo",
            ],
            vec![
                "--as",
                "admin",
                "consent",
                "revoke",
                &unit,
                "--org",
                "bank_demo",
            ],
            vec![
                "--as",
                "owner_tax",
                "budget",
                "refresh",
                "--org",
                "analytics",
                "--dataset",
                "tax_monthly",
                "--reason",
                "a test",
            ],
            vec!["--as", "bank", "template", "submit", &template_arg],
            vec!["--as", "owner_court", "template", "approve", &name, "--yes"],
            vec!["--as", "auditor", "audit", "export", "--out", &out_dir],
            vec!["audit", "verify", "--bundle", &out_dir],
        ];
        for command in &commands {
            let mut args = vec!["--format", format];
            args.extend(command.iter().copied());
            let out = run(&addr, &data_dir, &args);
            assert_eq!(out.code, 0, "{args:?}\n{}\n{}", out.stdout, out.stderr);
            assert_shape(format, &args, &out.stdout);
        }
    }
    // `-n 0` is none; an empty result keeps its header and says so.
    let out = run(
        &addr,
        &data_dir,
        &[
            "--as", "auditor", "--format", "json", "audit", "tail", "-n", "0",
        ],
    );
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "[]\n"),
        "{}",
        out.stderr
    );
    let out = run(
        &addr,
        &data_dir,
        &[
            "--as",
            "auditor",
            "audit",
            "sql",
            "SELECT action FROM events WHERE action = 'nothing'",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("| action |"), "{}", out.stdout);
    assert!(out.stdout.contains("(no rows)"), "{}", out.stdout);
    assert!(out.stderr.contains("0 rows over"), "{}", out.stderr);
    server.shutdown().await.expect("shutdown");
}

/// What a new user trips on, each with the exit code and the text that names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_everyday_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A checkout-like folder: the data dir as `sandbox-data`, and a subfolder to work from.
    let root = dir.path().join("checkout");
    let data_dir = root.join("sandbox-data");
    let sub = root.join("examples").join("deep");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let (server, addr) = demo_server(&data_dir).await;
    let env = [("SANDBOX_ADDR", addr.as_str())];

    // `--as` from a subfolder finds the nearest sandbox-data.
    let out = run_with(&sub, "", &env, &["--as", "analyst", "whoami"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("principal:"), "{}", out.stdout);
    assert!(out.stdout.contains("analyst"), "{}", out.stdout);
    assert!(out.stdout.contains("SubmitJob"), "{}", out.stdout);
    // ...but not one that others may write (its tokens and CA could be planted).
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&data_dir)
            .expect("data dir")
            .permissions();
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let out = run_with(&sub, "", &env, &["--as", "analyst", "whoami"]);
        std::fs::set_permissions(&data_dir, mode).expect("chmod back");
        assert_eq!(out.code, 2, "{}", out.stderr);
    }
    // A token is not sent in clear text to another machine (refused before any connection).
    let out = run_with(
        &sub,
        "",
        &[],
        &[
            "--addr",
            "http://10.0.0.1:50051",
            "--as",
            "analyst",
            "whoami",
        ],
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("refusing to send a token in clear text"),
        "{}",
        out.stderr
    );
    // ...and from elsewhere says where it looked and how to point it.
    let out = run_with(dir.path(), "", &env, &["--as", "analyst", "datasets"]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--data-dir DIR"), "{}", out.stderr);

    // A query from stdin or a file.
    let query = "SELECT size_class, COUNT(*) AS n FROM enterprises GROUP BY size_class";
    let out = run_with(&sub, query, &env, &["--as", "analyst", "sql", "-"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("size_class"), "{}", out.stdout);
    let file = dir.path().join("q.sql");
    std::fs::write(&file, query).expect("write");
    let file_arg = file.display().to_string();
    let out = run_with(
        &sub,
        "",
        &env,
        &["--as", "analyst", "explain", "--file", &file_arg],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("decision:"), "{}", out.stdout);

    // Nothing listening: says so and how to point the CLI elsewhere.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let nowhere = format!("http://127.0.0.1:{closed}");
    let out = run_with(
        &sub,
        "",
        &[],
        &["--addr", &nowhere, "--as", "analyst", "datasets"],
    );
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("connection refused"), "{}", out.stderr);
    assert!(out.stderr.contains("SANDBOX_ADDR"), "{}", out.stderr);
    // TLS to a plaintext server.
    let tls_addr = addr.replacen("http://", "https://", 1);
    let out = run_with(
        &sub,
        "",
        &[],
        &["--addr", &tls_addr, "--as", "analyst", "datasets"],
    );
    assert_eq!(out.code, 5, "{}", out.stderr);
    assert!(out.stderr.contains("does not speak TLS"), "{}", out.stderr);

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        // A malformed template parameter, or a missing one, is a usage error, before any run.
        (
            vec![
                "--as",
                "bank",
                "template",
                "run",
                "industry_region_risk",
                "--param",
                "since=garbage",
            ],
            2,
            "since",
        ),
        (
            vec!["--as", "bank", "template", "run", "industry_region_risk"],
            2,
            "since",
        ),
        // Audit SQL syntax errors read as such.
        (
            vec!["--as", "auditor", "audit", "sql", "SELEKT 1"],
            2,
            "syntax error",
        ),
        // The owner sees who may use its data, and the budgets it set.
        (
            vec!["--as", "owner_tax", "--format", "csv", "grants"],
            0,
            "tax_monthly,tax_bureau,analytics,",
        ),
        (
            vec!["--as", "owner_tax", "--format", "json", "budget", "show"],
            0,
            "\"epsilon_budget\":",
        ),
        (vec!["completions", "bash"], 0, "_sandbox()"),
        (vec!["completions", "zsh"], 0, "#compdef sandbox"),
    ];
    check(&addr, &data_dir, &cases).await;
    let out = run(
        &addr,
        &data_dir,
        &["--as", "auditor", "audit", "sql", "SELEKT 1"],
    );
    assert!(!out.stderr.contains("ParserError("), "{}", out.stderr);
    let out = run(
        &addr,
        &data_dir,
        &["--as", "owner_tax", "--format", "json", "budget", "show"],
    );
    assert!(
        !out.stdout.contains("\"epsilon_budget\":null"),
        "{}",
        out.stdout
    );

    // A template approved by name: the pending version, shown first, with --yes.
    let template = dir.path().join("risk.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/templates/industry_region_risk.toml"),
    )
    .expect("example template")
    .replace("\"industry_region_risk\"", "\"risk_by_prefecture\"");
    std::fs::write(&template, text).expect("write");
    let template_arg = template.display().to_string();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--as", "bank", "template", "submit", &template_arg],
            0,
            "pending",
        ),
        // Pending approvals name the org and the logins that act for it.
        (
            vec![
                "--as",
                "bank",
                "--wide",
                "template",
                "show",
                "risk_by_prefecture",
            ],
            0,
            "court (login owner_court)",
        ),
        (
            vec![
                "--as",
                "owner_court",
                "template",
                "approve",
                "risk_by_prefecture",
            ],
            2,
            "approve with --yes",
        ),
        (
            vec![
                "--as",
                "owner_court",
                "template",
                "approve",
                "risk_by_prefecture",
                "--yes",
                "--max-runs",
                "10",
            ],
            0,
            "sql:",
        ),
    ];
    check(&addr, &data_dir, &cases).await;
    server.shutdown().await.expect("shutdown");
}

fn sha(path: &str) -> String {
    sandbox_cli::module_sha256(&std::fs::read(path).expect("guest file"))
}

/// Over TLS: `--as NAME` finds the CA and NAME's client certificate in the data dir (no token
/// needed), `--ca/--cert/--key` name them, a token works over TLS without a certificate, and a
/// plaintext client or an untrusted server certificate fail with exit code 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut config = sandbox_server::ServerConfig::for_tests(data_dir.clone());
    config.policies = Some(policies());
    config.tls = true;
    let server = sandbox_server::start(config).await.expect("server");
    let https = format!("https://localhost:{}", server.addr.port());
    let tls = data_dir.join("tls");
    let ca = tls.join("ca.pem").display().to_string();
    let cert = tls.join("clients/bank.pem").display().to_string();
    let key = tls.join("clients/bank.key").display().to_string();
    let wrong_key = tls.join("clients/analyst.key").display().to_string();
    let token_file = data_dir
        .join("credentials/analyst.token")
        .display()
        .to_string();
    // `--as` over https uses the certificate: hide the token to show it is not needed.
    std::fs::rename(
        data_dir.join("credentials/auditor.token"),
        dir.path().join("auditor.token"),
    )
    .expect("move the token away");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--as", "analyst", "datasets"], 0, "enterprises"),
        (vec!["--as", "auditor", "audit", "tail", "-n", "1"], 0, ""),
        (
            vec!["--ca", &ca, "--cert", &cert, "--key", &key, "datasets"],
            0,
            "tax_monthly",
        ),
        (
            vec!["--ca", &ca, "--token-file", &token_file, "datasets"],
            0,
            "enterprises",
        ),
        // A certificate names a principal: the bank may not read the journal.
        (
            vec!["--ca", &ca, "--cert", &cert, "--key", &key, "audit", "tail"],
            4,
            "role-not-permitted",
        ),
        // --cert without --key is a usage error.
        (vec!["--ca", &ca, "--cert", &cert, "datasets"], 2, "--key"),
    ];
    check(&https, &data_dir, &cases).await;
    // Plaintext against the TLS port, and TLS without trusting the local CA.
    let http = format!("http://{}", server.addr);
    check(
        &http,
        &data_dir,
        &[(
            vec!["--as", "analyst", "datasets"],
            5,
            "it expects TLS, use https://",
        )],
    )
    .await;
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, std::fs::read(tls.join("server.pem")).unwrap()).unwrap();
    let other = other_ca.display().to_string();
    check(
        &https,
        &data_dir,
        &[
            (
                vec!["--ca", &other, "--token-file", &token_file, "datasets"],
                5,
                "not signed by the CA given with --ca",
            ),
            // --as with a data dir that holds no CA: the system's roots do not know the local CA.
            (
                vec!["--cert", &cert, "--key", &key, "datasets"],
                5,
                "pass the server's CA with --ca",
            ),
            // A key that is not the certificate's.
            (
                vec![
                    "--ca", &ca, "--cert", &cert, "--key", &wrong_key, "datasets",
                ],
                5,
                "the --key does not belong to the --cert",
            ),
            // Plain flags for TLS over http:// are a usage error.
            (
                vec!["--ca", &ca, "--token-file", &token_file, "datasets"],
                0,
                "enterprises",
            ),
        ],
    )
    .await;
    check(
        &http,
        &data_dir,
        &[(
            vec!["--ca", &ca, "--token-file", &token_file, "datasets"],
            2,
            "is plaintext: use https://",
        )],
    )
    .await;
    server.shutdown().await.expect("shutdown");
}

//! The CLI contract: the real `sandbox` binary against a real server on an ephemeral port, checking
//! output and exit codes (0 ok, 1 verification failed, 2 usage, 3 denied, 4 not permitted, 5 other).

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
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut config = sandbox_server::ServerConfig::for_tests(data_dir.clone());
    config.policies = Some(policies());
    let server = sandbox_server::start(config).await.expect("server");
    let addr = format!("http://{}", server.addr);

    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (vec!["--as", "analyst", "datasets"], 0, "enterprises"),
        (
            vec!["--as", "analyst", "--format", "csv", "datasets"],
            0,
            "tax_monthly,vat_paid",
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
        (
            vec!["--as", "nobody", "datasets"],
            2,
            "cannot read token file",
        ),
        (vec!["datasets"], 2, "no credentials"),
        (vec!["frobnicate"], 2, "unrecognized subcommand"),
        (
            vec!["--as", "analyst", "sql", "SELEKT"],
            5,
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
            "analytics\ttax_monthly\t0.0000",
        ),
    ];
    check(&addr, &data_dir, &cases).await;

    // The auditor's offline evidence: a kept checkpoint, a proof, an export verified with no
    // server, and the same export against the kept checkpoint.
    let kept = dir.path().join("kept.json");
    let bundle = dir.path().join("bundle");
    let kept_arg = kept.to_str().expect("utf8").to_string();
    let bundle_arg = bundle.to_str().expect("utf8").to_string();
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
            "\"signature\"",
        ),
        (
            vec!["--as", "bank", "audit", "checkpoint"],
            4,
            "not permitted",
        ),
        (
            vec!["--as", "auditor", "audit", "prove", "3"],
            0,
            "record 3 is in the journal",
        ),
        (
            vec!["--as", "auditor", "audit", "prove", "999999"],
            5,
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
            vec!["audit", "verify", "--bundle", &bundle_arg],
            0,
            "journal OK",
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
            "consistent with the trusted checkpoint",
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
    assert!(out.stdout.contains("journal OK"));
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
    let mut config = sandbox_server::ServerConfig::for_tests(data_dir.clone());
    config.policies = Some(policies());
    let server = sandbox_server::start(config).await.expect("server");
    let addr = format!("http://{}", server.addr);
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
            5,
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
        (
            vec!["--as", "owner_tax", "module", "approve", &echo_sha],
            0,
            "approved",
        ),
        (
            vec!["--as", "owner_court", "module", "approve", &echo_sha],
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
            vec!["--as", "owner_tax", "module", "approve", &looping_sha],
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
            vec!["--as", "bank", "consent", "list"],
            0,
            "bank_demo,credit_assessment",
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
        &[(vec!["--as", "analyst", "datasets"], 5, "")],
    )
    .await;
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, std::fs::read(tls.join("server.pem")).unwrap()).unwrap();
    let other = other_ca.display().to_string();
    check(
        &https,
        &data_dir,
        &[(
            vec!["--ca", &other, "--token-file", &token_file, "datasets"],
            5,
            "",
        )],
    )
    .await;
    server.shutdown().await.expect("shutdown");
}

//! A second `sandboxd` on a data dir or a port already in use stops at once, says which and how
//! to start it elsewhere, exits non-zero and writes nothing (it used to find a port in use only
//! after generating the whole demo, and a data dir in use only as a locked journal).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn sandboxd(data_dir: &Path, listen: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(listen)
        .arg("--demo-scale")
        .arg(crate::SCALE.to_string())
        .env("RUST_LOG", "warn");
    command
}

/// Starts the first server and waits for the address it prints.
fn first(data_dir: &Path) -> (Child, String) {
    let mut child = sandboxd(data_dir, "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sandboxd starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .expect("sandboxd printed its address before exiting")
            .expect("a line");
        if let Some(address) = line.strip_prefix("sandboxd listening on ") {
            break address.trim().to_string();
        }
    };
    (child, address)
}

/// Runs a second server to its end, which must come at once and with a failure.
fn second(data_dir: &Path, listen: &str) -> String {
    let started = Instant::now();
    let Output { status, stderr, .. } = sandboxd(data_dir, listen)
        .stdin(Stdio::null())
        .output()
        .expect("sandboxd runs");
    let stderr = String::from_utf8_lossy(&stderr).into_owned();
    assert!(!status.success(), "a second server must fail: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it fails before anything slow: {:?}",
        started.elapsed()
    );
    stderr
}

/// The names in a folder, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_second_sandboxd_on_a_data_dir_or_port_in_use_stops_at_once_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let (mut running, address) = first(&data_dir);
    let pid = running.id();
    let lock = data_dir.join(sandbox_server::bootstrap::LOCK_FILE);
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock file").trim(),
        pid.to_string()
    );
    let before = listing(&data_dir);

    // The same data dir, another port.
    let stderr = second(&data_dir, "127.0.0.1:0");
    let expected = format!(
        "another sandboxd (pid {pid}) is using {}: stop it, or start this one with --data-dir DIR",
        data_dir.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(listing(&data_dir), before);
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock file").trim(),
        pid.to_string(),
        "the holder's id is left as it was"
    );

    // The same port, a fresh data dir: refused before the demo is generated there.
    let elsewhere = dir.path().join("elsewhere");
    let stderr = second(&elsewhere, &address);
    let expected = format!(
        "{address} is already in use (another sandboxd?): choose another with --listen ADDR and \
         point the CLI at it with --addr http://ADDR or SANDBOX_ADDR"
    );
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(
        !elsewhere.exists(),
        "nothing was written: {:?}",
        listing(&elsewhere)
    );

    running.kill().expect("killed");
    running.wait().expect("reaped");
    // The lock dies with its holder: the next start takes the data dir over.
    let (mut next, _) = first(&data_dir);
    assert_eq!(
        std::fs::read_to_string(&lock).expect("lock file").trim(),
        next.id().to_string()
    );
    next.kill().expect("killed");
    next.wait().expect("reaped");
}

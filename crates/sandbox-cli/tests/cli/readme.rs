//! The README's tour, run as written against a fresh demo sandbox: every `sandbox` command of the
//! sections below, with only the server's address substituted (through `SANDBOX_ADDR`), must
//! exit with the code its comment announces (`exit code N`), else 0. The README cannot drift
//! from the software.

use std::path::Path;

use super::{Run, repository};

/// The README sections whose commands run against the plain demo server (the bank's section
/// needs a module built for wasm32, the TLS section a TLS server: the e2e tests cover those).
const SECTIONS: &[&str] = &[
    "## A short tour with the CLI",
    "## Analyze across departments",
    "## Differential privacy",
    "## Audit the sandbox",
];

/// One command of a README block and the exit code its comment announces.
#[derive(Debug)]
struct Step {
    command: String,
    code: i32,
}

/// The shell commands of the README's `sh` blocks in `SECTIONS`: continuation lines joined,
/// comments and aliases left out.
fn steps(readme: &str) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut section_wanted = false;
    let mut in_block = false;
    let mut comment = String::new();
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("## ") {
            section_wanted = SECTIONS.contains(&line.trim());
            continue;
        }
        if line.starts_with("```") {
            in_block = !in_block && section_wanted && line.trim() == "```sh";
            comment.clear();
            continue;
        }
        if !in_block {
            continue;
        }
        let trimmed = line.trim();
        if trimmed.is_empty() {
            comment.clear();
            continue;
        }
        if trimmed.starts_with('#') {
            comment.push_str(trimmed);
            comment.push(' ');
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let command = std::mem::take(&mut pending);
        if command.starts_with("alias ") {
            continue;
        }
        let code = comment
            .split("exit code ")
            .nth(1)
            .and_then(|rest| rest.chars().next())
            .and_then(|c| c.to_digit(10))
            .map_or(0, |d| d as i32);
        steps.push(Step { command, code });
        // An exit code announced above one command is that command's only.
        comment.clear();
    }
    steps
}

#[test]
fn the_readme_commands_are_parsed() {
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README");
    let steps = steps(&readme);
    assert!(steps.len() > 20, "{steps:#?}");
    assert!(steps.iter().any(|s| s.code == 3), "{steps:#?}");
    assert!(steps.iter().any(|s| s.code == 4), "{steps:#?}");
    assert!(steps.iter().all(|s| !s.command.starts_with('#')));
}

fn run_step(cwd: &Path, addr: &str, command: &str) -> Run {
    let script = format!("sandbox() {{ \"$SANDBOX_BIN\" \"$@\"; }}\nset -o pipefail\n{command}\n");
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .env("SANDBOX_BIN", env!("CARGO_BIN_EXE_sandbox"))
        .env("SANDBOX_ADDR", addr)
        .env_remove("SANDBOX_TOKEN")
        .env_remove("SANDBOX_DATA_DIR")
        .output()
        .expect("bash runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_tour_runs_as_written() {
    let readme = std::fs::read_to_string(repository().join("README.md")).expect("README");
    let steps = steps(&readme);
    // A fresh checkout-like folder: the server's data dir as ./sandbox-data, the repository's
    // policies and examples beside it.
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("sandbox-data");
    for name in ["policies", "examples"] {
        std::os::unix::fs::symlink(
            repository().join(name).canonicalize().expect("exists"),
            dir.path().join(name),
        )
        .expect("symlink");
    }
    let (server, addr) = super::demo_server(&data_dir).await;
    for step in &steps {
        let cwd = dir.path().to_path_buf();
        let (addr, command) = (addr.clone(), step.command.clone());
        let out = tokio::task::spawn_blocking(move || run_step(&cwd, &addr, &command))
            .await
            .expect("join");
        assert_eq!(
            out.code, step.code,
            "README: `{}`\nstdout: {}\nstderr: {}",
            step.command, out.stdout, out.stderr
        );
    }
    server.shutdown().await.expect("shutdown");
}

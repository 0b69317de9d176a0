//! The data-driven policy suite: every file under `policy_suite/cases/` holds queries and the
//! decision the sandbox must reach, in the spirit of sqllogictest. A new attack is a new case, not
//! new Rust.
//!
//! Format: a header line, then the SQL up to the next blank line.
//!
//! ```text
//! # comment
//! query <principal> allow              released, nothing suppressed
//! query <principal> allow suppressed   released, at least one row suppressed by the gate
//! query <principal> deny <rule>        refused by the guard with this rule
//! query <principal> error <code>       refused for another reason (bad SQL, unknown column)
//! ```
//!
//! `BLESS=1 cargo test -p sandbox-tests --test policy_suite` rewrites the headers from the actual
//! outcomes (review the diff before committing it).

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sandbox_engine::{Engine, EngineConfig, ErrorKind, JobSpec, RequestContext};
use sandbox_policy::{Principal, PrincipalRole};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allow { suppressed: bool },
    Deny(String),
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allow { suppressed: false } => write!(f, "allow"),
            Outcome::Allow { suppressed: true } => write!(f, "allow suppressed"),
            Outcome::Deny(rule) => write!(f, "deny {rule}"),
            Outcome::Error(code) => write!(f, "error {code}"),
        }
    }
}

#[derive(Debug)]
struct Case {
    file: PathBuf,
    /// 0-based index of the header line.
    header_line: usize,
    principal: String,
    expected: Outcome,
    sql: String,
}

fn parse_outcome(words: &[&str]) -> Option<Outcome> {
    match words {
        ["allow"] => Some(Outcome::Allow { suppressed: false }),
        ["allow", "suppressed"] => Some(Outcome::Allow { suppressed: true }),
        ["deny", rule] => Some(Outcome::Deny(rule.to_string())),
        ["error", code] => Some(Outcome::Error(code.to_string())),
        _ => None,
    }
}

fn parse_file(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path).expect("case file readable");
    let lines: Vec<&str> = text.lines().collect();
    let mut cases = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let (principal, expected) = match words.as_slice() {
            ["query", principal, rest @ ..] => (
                principal.to_string(),
                parse_outcome(rest).unwrap_or_else(|| {
                    panic!("{}:{}: bad expectation `{line}`", path.display(), i + 1)
                }),
            ),
            _ => panic!(
                "{}:{}: expected a `query` header, got `{line}`",
                path.display(),
                i + 1
            ),
        };
        let header_line = i;
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            sql.push(lines[i]);
            i += 1;
        }
        assert!(
            !sql.is_empty(),
            "{}:{}: case without SQL",
            path.display(),
            header_line + 1
        );
        cases.push(Case {
            file: path.to_path_buf(),
            header_line,
            principal,
            expected,
            sql: sql.join("\n"),
        });
    }
    cases
}

fn principal(name: &str) -> Principal {
    let (org, role) = match name {
        "analyst" => ("analytics", PrincipalRole::Analyst),
        "bank" => ("bank_demo", PrincipalRole::Consumer),
        other => panic!("unknown principal `{other}` in the policy suite"),
    };
    Principal {
        id: name.to_string(),
        org: org.to_string(),
        roles: BTreeSet::from([role]),
    }
}

async fn run_case(engine: &Arc<Engine>, case: &Case) -> Outcome {
    let ctx = RequestContext {
        principal: principal(&case.principal),
        request_id: format!("suite-{}", case.header_line),
    };
    let spec = JobSpec::Sql {
        query: case.sql.clone(),
    };
    let refused = |e: sandbox_engine::EngineError| match e.kind() {
        ErrorKind::Denied => Outcome::Deny(e.code()),
        _ => Outcome::Error(e.code()),
    };
    let snapshot = match engine.submit(&ctx, spec).await {
        Ok(snapshot) => snapshot,
        Err(e) => return refused(e),
    };
    match engine.wait_result(&ctx, &snapshot.job_id).await {
        Ok(result) => Outcome::Allow {
            suppressed: result.outcome().rows_suppressed > 0,
        },
        Err(e) => refused(e),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    sandbox_demo::generate(
        dir.path(),
        &sandbox_demo::DemoConfig::scaled(sandbox_tests::TEST_SCALE),
    )
    .expect("demo data");
    let policy = sandbox_policy::load_dir(&sandbox_tests::policies_dir()).expect("policies");
    let engine = Engine::start(EngineConfig::new(dir.path().to_path_buf(), policy))
        .await
        .expect("engine");

    let cases_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy_suite/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cases_dir)
        .expect("cases dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    let bless = std::env::var_os("BLESS").is_some();

    let mut total = 0;
    let mut failures = Vec::new();
    for file in &files {
        let cases = parse_file(file);
        let mut lines: Vec<String> = std::fs::read_to_string(file)
            .expect("readable")
            .lines()
            .map(str::to_string)
            .collect();
        for case in &cases {
            total += 1;
            let actual = run_case(&engine, case).await;
            if actual != case.expected {
                failures.push(format!(
                    "{}:{}: expected `{}`, got `{}`\n    {}",
                    case.file.display(),
                    case.header_line + 1,
                    case.expected,
                    actual,
                    case.sql.replace('\n', "\n    ")
                ));
                lines[case.header_line] = format!("query {} {}", case.principal, actual);
            }
        }
        if bless {
            std::fs::write(file, lines.join("\n") + "\n").expect("bless writes the case file");
        }
    }
    assert!(
        total >= 150,
        "the policy suite must hold at least 150 cases, has {total}"
    );
    if !bless {
        assert!(
            failures.is_empty(),
            "{} of {total} policy cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

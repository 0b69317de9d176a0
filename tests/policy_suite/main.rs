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
//! query <principal> allow differencing  released, at least one row withheld by the differencing
//!                                      defense (its units nearly those of an earlier release)
//! query <principal> allow dp           released under differential privacy (noisy values)
//! dpquery <principal> <outcome>        the same, with the caller asking for differential privacy
//! ```
//!
//! A `template <principal> <outcome>` case holds `param name=value` lines and then a template's
//! TOML: the principal submits it, every owner of the data it reads approves it for one run, and
//! the principal runs it with those parameters. Submission refusals count as the outcome too.
//!
//! A `code <principal> <outcome>` case holds `input dataset.column` lines, the columns a module's
//! manifest declares, and then the input query the module carries: the principal uploads the
//! module, every owner of the data it declares approves the declared columns for one run, and the
//! principal runs it. Code cases expect refusals only (upload, admission or the row-mode guard of
//! the input query): an allowed code job releases what its guest computes, which raw DataFusion
//! cannot check.
//!
//! Every allowed case is also run by raw DataFusion, with no guard and no gate, over the same
//! files as the consumer sees them (masked columns through the same transform and the consumer's
//! pseudonym key). `allow` must release exactly the raw rows; `allow suppressed` a subset of
//! them: the guard's rewrite never changes a released number, the gate only removes rows. Where
//! the answer is not simply a subset (a `LIMIT` applied after suppression, a scoring template's
//! consent filter), the case states the raw query that computes it after a `----` line, and the
//! released rows must equal that query's rows exactly. `allow differencing` is compared like
//! `allow suppressed`. The cases of a file run in order against one engine (a fresh one per
//! file), each principal being one consumer org, so what earlier cases of the file released, to
//! any org, is part of what the differencing defense sees. An `allow dp` release has noisy values:
//! it must have the raw query's columns and no more groups than raw DataFusion finds (partition
//! selection only hides groups); its noise is tested statistically in `sandbox-release`.
//!
//! Every rule of the guard (`sandbox_sql::Rule::ALL`) must be the actual outcome of at least one
//! case, except the few listed in [`UNREACHABLE_RULES`] with the reason no input can produce them.
//!
//! `BLESS=1 cargo test -p sandbox-tests --test policy_suite` rewrites the headers from the actual
//! outcomes (review the diff before committing it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use sandbox_engine::{
    ApprovalRequest, DpRequest, Engine, EngineConfig, ErrorKind, JobSpec, RequestContext,
};
use sandbox_policy::{PolicySet, Principal, PrincipalRole, TemplateDefinition};
use sandbox_sql::masks::MaskedTable;
use sandbox_sql::{PseudonymKey, Rule, placeholder_values};
use sandbox_tests::sorted_rows;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Allow { suppressed: bool },
    AllowDifferencing,
    AllowDp,
    Deny(String),
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Allow { suppressed: false } => write!(f, "allow"),
            Outcome::Allow { suppressed: true } => write!(f, "allow suppressed"),
            Outcome::AllowDifferencing => write!(f, "allow differencing"),
            Outcome::AllowDp => write!(f, "allow dp"),
            Outcome::Deny(rule) => write!(f, "deny {rule}"),
            Outcome::Error(code) => write!(f, "error {code}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Query,
    DpQuery,
    Template,
    Code,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Query => "query",
            Kind::DpQuery => "dpquery",
            Kind::Template => "template",
            Kind::Code => "code",
        }
    }
}

#[derive(Debug)]
struct Case {
    file: PathBuf,
    /// 0-based index of the header line.
    header_line: usize,
    kind: Kind,
    principal: String,
    expected: Outcome,
    /// The SQL of a query; the TOML of a template; the input query of a code job's module.
    sql: String,
    /// A template run's parameters.
    params: BTreeMap<String, String>,
    /// The columns a code job's module declares, as `dataset.column`.
    inputs: Vec<String>,
    /// The raw query whose rows the release must equal, when not the case's own.
    raw_sql: Option<String>,
}

fn parse_outcome(words: &[&str]) -> Option<Outcome> {
    match words {
        ["allow"] => Some(Outcome::Allow { suppressed: false }),
        ["allow", "suppressed"] => Some(Outcome::Allow { suppressed: true }),
        ["allow", "dp"] => Some(Outcome::AllowDp),
        ["allow", "differencing"] => Some(Outcome::AllowDifferencing),
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
        let (kind, principal, expected) = match words.as_slice() {
            [
                word @ ("query" | "dpquery" | "template" | "code"),
                principal,
                rest @ ..,
            ] => (
                match *word {
                    "query" => Kind::Query,
                    "dpquery" => Kind::DpQuery,
                    "template" => Kind::Template,
                    _ => Kind::Code,
                },
                principal.to_string(),
                parse_outcome(rest).unwrap_or_else(|| {
                    panic!("{}:{}: bad expectation `{line}`", path.display(), i + 1)
                }),
            ),
            _ => panic!(
                "{}:{}: expected a `query`, `dpquery`, `template` or `code` header, got `{line}`",
                path.display(),
                i + 1
            ),
        };
        assert!(
            kind != Kind::Code || matches!(expected, Outcome::Deny(_) | Outcome::Error(_)),
            "{}:{}: a code case expects a refusal (`deny <rule>` or `error <code>`)",
            path.display(),
            i + 1
        );
        let header_line = i;
        i += 1;
        let mut params = BTreeMap::new();
        while kind == Kind::Template && i < lines.len() {
            let Some(param) = lines[i].trim().strip_prefix("param ") else {
                break;
            };
            let (name, value) = param.split_once('=').unwrap_or_else(|| {
                panic!("{}:{}: expected `param name=value`", path.display(), i + 1)
            });
            params.insert(name.trim().to_string(), value.trim().to_string());
            i += 1;
        }
        let mut inputs = Vec::new();
        while kind == Kind::Code && i < lines.len() {
            let Some(input) = lines[i].trim().strip_prefix("input ") else {
                break;
            };
            inputs.push(input.trim().to_string());
            i += 1;
        }
        let mut sql = Vec::new();
        let mut raw_sql: Option<Vec<&str>> = None;
        while i < lines.len() && !lines[i].trim().is_empty() {
            match &mut raw_sql {
                None if lines[i].trim() == "----" => raw_sql = Some(Vec::new()),
                None => sql.push(lines[i]),
                Some(raw) => raw.push(lines[i]),
            }
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
            kind,
            principal,
            expected,
            sql: sql.join("\n"),
            params,
            inputs,
            raw_sql: raw_sql.map(|raw| raw.join("\n")),
        });
    }
    cases
}

/// A suite principal: `analyst` or `bank`, optionally `name@org` to act for a consumer org of
/// its own (a fresh differencing memory and budget, the same grants).
fn principal(spelled: &str) -> Principal {
    let (name, org) = spelled.split_once('@').unwrap_or((spelled, ""));
    let (default_org, role) = match name {
        "analyst" => ("analytics", PrincipalRole::Analyst),
        "bank" => ("bank_demo", PrincipalRole::Consumer),
        other => panic!("unknown principal `{other}` in the policy suite"),
    };
    Principal {
        id: name.to_string(),
        org: if org.is_empty() { default_org } else { org }.to_string(),
        roles: BTreeSet::from([role]),
    }
}

/// An owner of `org`'s datasets, approving what a case submits.
fn owner_context(org: &str, case: &Case) -> RequestContext {
    RequestContext {
        principal: Principal {
            id: format!("owner of {org}"),
            org: org.to_string(),
            roles: BTreeSet::from([PrincipalRole::Owner]),
        },
        request_id: format!("suite-{}-approval", case.header_line),
    }
}

/// What a case produced: its outcome and, when allowed, the released rows.
async fn run_case(engine: &Arc<Engine>, policy: &PolicySet, case: &Case) -> (Outcome, Vec<String>) {
    let ctx = RequestContext {
        principal: principal(&case.principal),
        request_id: format!("suite-{}", case.header_line),
    };
    let refused = |e: sandbox_engine::EngineError| match e.kind() {
        ErrorKind::Denied => Outcome::Deny(e.code().to_string()),
        _ => Outcome::Error(e.code().to_string()),
    };
    let spec = match case.kind {
        Kind::Query => JobSpec::Sql {
            query: case.sql.clone(),
            dp: None,
        },
        Kind::DpQuery => JobSpec::Sql {
            query: case.sql.clone(),
            dp: Some(DpRequest::default()),
        },
        Kind::Template => {
            let view = match engine.submit_template(&ctx, &case.sql).await {
                Ok(view) => view,
                Err(e) => return (refused(e), Vec::new()),
            };
            let owners: BTreeSet<&str> = view
                .record
                .datasets
                .iter()
                .map(|d| policy.datasets[d].owner.as_str())
                .collect();
            for owner in owners {
                engine
                    .approve_template(&owner_context(owner, case), &view.record.sha256, 1, 1)
                    .await
                    .expect("owners approve the suite's templates");
            }
            JobSpec::Template {
                name: view.record.definition.name.clone(),
                params: case.params.clone(),
            }
        }
        Kind::Code => {
            let inputs: Vec<&str> = case.inputs.iter().map(String::as_str).collect();
            // The guest would emit nothing: code cases are refused before it runs.
            let module = sandbox_tests::emitting_guest(&[], &inputs, &case.sql);
            let view = match engine.upload_module(&ctx, module).await {
                Ok(view) => view,
                Err(e) => return (refused(e), Vec::new()),
            };
            let owners: BTreeSet<&str> = view
                .record
                .datasets()
                .iter()
                .map(|d| policy.datasets[d].owner.as_str())
                .collect();
            for owner in owners {
                let approval = ApprovalRequest {
                    contract_toml: None,
                    max_runs: 1,
                    valid_days: 1,
                    // Every column the manifest declares among the owner's datasets.
                    columns: None,
                };
                engine
                    .approve_module(&owner_context(owner, case), &view.record.sha256, approval)
                    .await
                    .expect("owners approve the suite's modules");
            }
            JobSpec::Wasm {
                module_sha256: view.record.sha256.clone(),
                // The input the module declares, as its owners approved it.
                input_query: String::new(),
                parameters: Vec::new(),
            }
        }
    };
    let snapshot = match engine.submit(&ctx, spec).await {
        Ok(snapshot) => snapshot,
        Err(e) => return (refused(e), Vec::new()),
    };
    match engine.wait_result(&ctx, &snapshot.job_id).await {
        Ok(result) => {
            let reader =
                arrow::ipc::reader::StreamReader::try_new(result.ipc_stream(), None).expect("ipc");
            let batches: Vec<RecordBatch> = reader.map(|b| b.expect("ipc batch")).collect();
            // The caller is not told what was suppressed or withheld; the journal is.
            let event = engine
                .journal()
                .read(result.outcome().audit_seq, 1)
                .expect("journal readable")
                .into_iter()
                .next()
                .expect("the release's event")
                .event;
            let outcome = if result.outcome().dp.is_some() {
                Outcome::AllowDp
            } else if event.message.starts_with("differencing:") {
                Outcome::AllowDifferencing
            } else {
                Outcome::Allow {
                    suppressed: event.rows_suppressed > 0,
                }
            };
            (outcome, sorted_rows(&batches))
        }
        Err(e) => (refused(e), Vec::new()),
    }
}

/// Raw DataFusion over the demo files as one consumer org sees them: no guard, no gate, masked
/// columns through the same transform and key as in the sandbox (the transforms themselves are
/// tested on their own in `sandbox-sql`).
async fn raw_context(data_dir: &Path, policy: &PolicySet, org: &str) -> SessionContext {
    let secret =
        std::fs::read(data_dir.join("secrets").join("pseudonym.key")).expect("pseudonym secret");
    let key = PseudonymKey::derive(&secret, org);
    let context = SessionContext::new();
    for dataset in policy.datasets.values() {
        let [source] = dataset.source.as_slice() else {
            panic!("demo dataset `{}` has one source", dataset.id)
        };
        let path = data_dir.join(source);
        context
            .register_parquet(
                &dataset.id,
                path.to_str().expect("utf8 path"),
                ParquetReadOptions::default(),
            )
            .await
            .expect("raw table");
        let masks: Vec<_> = dataset
            .columns
            .iter()
            .filter_map(|c| c.mask.map(|m| (c.name.clone(), m)))
            .collect();
        if !masks.is_empty() {
            let table = context.table_provider(&dataset.id).await.expect("table");
            context.deregister_table(&dataset.id).expect("deregister");
            let masked = MaskedTable::new(table, &masks, &key).expect("masked table");
            context
                .register_table(&dataset.id, Arc::new(masked))
                .expect("register masked");
        }
    }
    context
}

/// The raw rows of a case's raw query, else its own query (a template's SQL), with a template's
/// parameters bound; `Err` with the message when raw DataFusion cannot run it.
async fn raw_rows(context: &SessionContext, case: &Case) -> Result<Vec<String>, String> {
    let frame = match case.kind {
        Kind::Query | Kind::DpQuery => {
            context
                .sql(case.raw_sql.as_ref().unwrap_or(&case.sql))
                .await
        }
        Kind::Template => {
            let definition = TemplateDefinition::from_toml(&case.sql)?;
            let bound = definition.bind(&case.params).map_err(|e| e.to_string())?;
            match context
                .sql(case.raw_sql.as_ref().unwrap_or(&definition.sql))
                .await
            {
                Ok(frame) => frame.with_param_values(placeholder_values(bound)),
                Err(e) => Err(e),
            }
        }
        Kind::Code => return Err("a code job releases its guest's output".to_string()),
    };
    let batches = frame
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(sorted_rows(&batches))
}

/// Whether the released rows are what raw DataFusion computes: all of them for `allow` or a
/// stated raw query, a sub-multiset for `allow suppressed`.
fn matches_raw(released: &[String], raw: &[String], exact: bool) -> bool {
    if exact {
        return released == raw;
    }
    let mut remaining: HashMap<&str, usize> = HashMap::new();
    for row in raw {
        *remaining.entry(row.as_str()).or_default() += 1;
    }
    released
        .iter()
        .all(|row| match remaining.get_mut(row.as_str()) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
}

/// A DP release: no more rows than raw DataFusion finds, each with the raw query's columns.
fn noisy_shape_matches(released: &[String], raw: &[String]) -> bool {
    let columns = |row: &String| row.matches('|').count();
    released.len() <= raw.len()
        && raw
            .first()
            .is_none_or(|first| released.iter().all(|row| columns(row) == columns(first)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    sandbox_demo::generate(
        dir.path(),
        &sandbox_demo::DemoConfig::scaled(sandbox_tests::TEST_SCALE),
    )
    .expect("demo data");
    // Every grant the datasets' levels allow is exact here: the suite checks the exact guard and
    // gate, and differential privacy where the data is L4 or a case asks for it. (The demo as
    // shipped answers ad-hoc SQL on L3 data under differential privacy; the adversary harness
    // and the end-to-end tests play that.)
    let mut policy = sandbox_policy::load_dir(&sandbox_tests::policies_dir()).expect("policies");
    policy.mark_exact_where_allowed();
    // Without the dimensions' public values: a DP release then shows only groups the data has,
    // which the shape check below compares with raw DataFusion. (Grouped by public values, every
    // value shows, absent ones with noisy zeros: the end-to-end privacy tests check that.)
    for dataset in policy.datasets.values_mut() {
        for column in &mut dataset.columns {
            column.domain.clear();
        }
    }
    // One measure without declared bounds, as an owner may load it (`bounds` are optional): no
    // case reads it but the one showing that differential privacy cannot sum it
    // (`dp-bounds-missing`). Every measure of the shipped demo declares its bounds.
    policy
        .datasets
        .get_mut("housing_fund_monthly")
        .and_then(|d| d.columns.iter_mut().find(|c| c.name == "employees_covered"))
        .expect("the demo's housing fund declares employees_covered")
        .bounds = None;
    // One engine per case file, over the same data: the differencing memory is shared by every
    // consumer org, so each file's attacks start from an empty one (within a file, what earlier
    // cases released is part of what the defense sees).
    let engine_for = |name: &str| {
        let engine_dir = dir.path().join("engines").join(name);
        let datasets = dir.path().join("datasets");
        let policy = policy.clone();
        async move {
            std::fs::create_dir_all(&engine_dir).expect("engine dir");
            std::os::unix::fs::symlink(&datasets, engine_dir.join("datasets")).expect("link");
            let mut config = EngineConfig::new(engine_dir.clone(), policy);
            // The demo consents, as the server loads them: scoring templates release
            // consented rows.
            config.consent_seed = Some(datasets.join("consents"));
            let engine = Engine::start(config).await.expect("engine");
            (engine, engine_dir)
        }
    };

    let cases_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy_suite/cases");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cases_dir)
        .expect("cases dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    let bless = std::env::var_os("BLESS").is_some();

    let mut total = 0;
    let mut compared = 0;
    // Every rule some case was actually denied with, and the first case that was.
    let mut produced: BTreeMap<String, String> = BTreeMap::new();
    let mut failures = Vec::new();
    // Kept apart from `failures`: blessing rewrites headers, never released numbers.
    let mut mismatches = Vec::new();
    for file in &files {
        let (engine, engine_dir) =
            engine_for(&file.file_stem().expect("name").to_string_lossy()).await;
        // Per engine: its pseudonym secret is its own.
        let mut raw_contexts: HashMap<String, SessionContext> = HashMap::new();
        let cases = parse_file(file);
        let mut lines: Vec<String> = std::fs::read_to_string(file)
            .expect("readable")
            .lines()
            .map(str::to_string)
            .collect();
        for case in &cases {
            total += 1;
            let (actual, released) = run_case(&engine, &policy, case).await;
            if let Outcome::Deny(rule) = &actual {
                produced
                    .entry(rule.clone())
                    .or_insert_with(|| format!("{}:{}", case.file.display(), case.header_line + 1));
            }
            // A code job's release is its guest's output: code cases expect refusals only.
            if case.kind != Kind::Code
                && matches!(
                    actual,
                    Outcome::Allow { .. } | Outcome::AllowDifferencing | Outcome::AllowDp
                )
            {
                let org = principal(&case.principal).org;
                if !raw_contexts.contains_key(&org) {
                    let context = raw_context(&engine_dir, &policy, &org).await;
                    raw_contexts.insert(org.clone(), context);
                }
                compared += 1;
                let raw = raw_rows(&raw_contexts[&org], case).await;
                let matches = |raw: &Vec<String>| match actual {
                    Outcome::Allow { suppressed } => {
                        matches_raw(&released, raw, !suppressed || case.raw_sql.is_some())
                    }
                    Outcome::AllowDifferencing => matches_raw(&released, raw, false),
                    _ => noisy_shape_matches(&released, raw),
                };
                if !raw.as_ref().is_ok_and(matches) {
                    mismatches.push(format!(
                        "{}:{}: released rows do not match raw DataFusion\n    {}\n    released: {released:?}\n    raw: {raw:?}",
                        case.file.display(),
                        case.header_line + 1,
                        case.sql.replace('\n', "\n    "),
                    ));
                }
            }
            if actual != case.expected {
                failures.push(format!(
                    "{}:{}: expected `{}`, got `{}`\n    {}",
                    case.file.display(),
                    case.header_line + 1,
                    case.expected,
                    actual,
                    case.sql.replace('\n', "\n    ")
                ));
                lines[case.header_line] =
                    format!("{} {} {}", case.kind.word(), case.principal, actual);
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
    eprintln!("policy suite: {total} cases, {compared} allowed ones compared with raw DataFusion");
    assert!(
        compared >= 50,
        "at least 50 allowed cases must be compared with raw DataFusion, were {compared}"
    );
    assert!(
        mismatches.is_empty(),
        "{} allowed cases differ from raw DataFusion:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    if !bless {
        assert!(
            failures.is_empty(),
            "{} of {total} policy cases failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    assert_every_rule_produced(&produced);
}

/// Rules of the guard that no case can produce, each with the reason: the engine never reaches
/// them, whatever the query (the checks stay, as defense in depth). Keep this list to the truth:
/// a rule listed here that a case produces fails the suite.
const UNREACHABLE_RULES: &[(Rule, &str)] = &[
    // The exact guard denies an L4 column in ad-hoc SQL (`Level::allows_mode`), but no query
    // with one reaches it: a dataset with a visible L4 column is L4, and the policy loader
    // refuses both an exact grant on an L4 dataset and an aggregate grant on it without
    // differential privacy. So every ad-hoc query reading an L4 column has a reason for
    // differential privacy and goes to the DP guard (or is refused with `dp-not-granted` when
    // another dataset it reads offers none), whose mode allows L4; templates and code jobs may
    // read L4 columns. (Were it reached, `guard` would answer under DP instead where every
    // dataset read offers it.)
    (
        Rule::LevelCap,
        "an L4 column only ever reaches the DP guard: the policy loader allows no exact grant on \
         an L4 dataset, nor one without differential privacy",
    ),
];

/// Every rule of `Rule::ALL` was the actual outcome of at least one case, or is listed as
/// unreachable (and then of none).
fn assert_every_rule_produced(produced: &BTreeMap<String, String>) {
    let mut missing = Vec::new();
    let mut listed_but_produced = Vec::new();
    for rule in Rule::ALL {
        let unreachable = UNREACHABLE_RULES.iter().find(|(r, _)| *r == rule);
        match (produced.get(rule.code()), unreachable) {
            (None, None) => missing.push(rule.code()),
            (Some(case), Some(_)) => listed_but_produced.push(format!("{} ({case})", rule.code())),
            _ => {}
        }
    }
    for (rule, reason) in UNREACHABLE_RULES {
        eprintln!("policy suite: rule `{rule}` is produced by no case: {reason}");
    }
    eprintln!(
        "policy suite: {} of {} rules produced by a case",
        Rule::ALL
            .iter()
            .filter(|r| produced.contains_key(r.code()))
            .count(),
        Rule::ALL.len()
    );
    assert!(
        missing.is_empty(),
        "rules no case was denied with (add a case that produces each, or list it in \
         UNREACHABLE_RULES with the reason no input can): {missing:?}"
    );
    assert!(
        listed_but_produced.is_empty(),
        "rules listed as unreachable that a case produced (remove them from \
         UNREACHABLE_RULES): {listed_but_produced:?}"
    );
}

//! Policy loading tests. Each file under `invalid/` is a policy that must be refused; its first line
//! says how: `# expect: <code> <line> <text the message contains>`. A new case is a new file.

use std::collections::BTreeSet;
use std::path::Path;

use sandbox_policy::{
    AggregateFunction, PolicyError, Principal, PrincipalRole, load_dir, load_sources,
};

fn other_departments() -> (String, String) {
    // A second department, so that grants on datasets owned by someone else can be checked.
    (
        "market_regulation.toml".to_string(),
        r#"org = "market_regulation"

[[dataset]]
id = "enterprises"
source = ["datasets/enterprises"]
privacy_unit = "credit_code"

[[dataset.column]]
name = "credit_code"
level = "L3"
role = "identifier"
"#
        .to_string(),
    )
}

#[test]
fn invalid_policies_are_refused_with_file_and_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/invalid");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("invalid cases") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an `# expect:` line", path.display()));
        let mut parts = expect.splitn(3, ' ');
        let (code, line, needle) = (
            parts.next().expect("code"),
            parts
                .next()
                .expect("line")
                .parse::<usize>()
                .expect("line number"),
            parts.next().expect("text"),
        );
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        let error = load_sources(&[other_departments(), (name.clone(), text.clone())])
            .expect_err(&format!("{name} must be refused"));
        let (file, actual_line) = match &error {
            PolicyError::Syntax { file, line, .. } | PolicyError::Invalid { file, line, .. } => {
                (file.clone(), *line)
            }
            other => panic!("{name}: unexpected error {other}"),
        };
        assert_eq!(error.code(), code, "{name}: {error}");
        assert_eq!(file, name, "{name}: the error names the file");
        assert_eq!(actual_line, line, "{name}: {error}");
        assert!(
            error.to_string().contains(needle),
            "{name}: `{error}` lacks `{needle}`"
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} invalid cases");
}

#[test]
fn repository_policies_load_and_grant_as_documented() {
    let policy = load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies"))
        .expect("repository policies");
    let analyst = Principal {
        id: "analyst".into(),
        org: "analytics".into(),
        roles: BTreeSet::from([PrincipalRole::Analyst]),
    };
    let mode = policy
        .aggregate_mode(&analyst, "tax_monthly")
        .expect("granted");
    assert_eq!(mode.min_units, 10);
    assert!(!mode.functions.contains(&AggregateFunction::Min));
    assert!(policy.aggregate_mode(&analyst, "consents").is_none());
    let visible: Vec<&str> = policy
        .granted_datasets(&analyst)
        .map(|d| d.id.as_str())
        .collect();
    assert!(!visible.contains(&"consents"));
    let enterprises = policy.dataset("enterprises").expect("declared");
    assert_eq!(
        enterprises.role_of("legal_rep"),
        sandbox_policy::Role::Hidden
    );
    assert_eq!(
        enterprises.role_of("not_declared"),
        sandbox_policy::Role::Hidden
    );
}

#[test]
fn overlapping_grants_combine_to_the_strictest() {
    let text = r#"org = "tax_bureau"

[[dataset]]
id = "tax_monthly"
source = ["datasets/tax_monthly"]
privacy_unit = "credit_code"
row_key = ["credit_code"]

[[dataset.column]]
name = "credit_code"
level = "L3"
role = "identifier"

[[grant]]
dataset = "tax_monthly"
role = "analyst"
[grant.aggregate]
min_units = 5
functions = ["count", "sum", "min"]
exact = true

[[grant]]
dataset = "tax_monthly"
principal = "analyst"
[grant.aggregate]
min_units = 20
functions = ["count", "sum", "avg"]
exact = true
"#;
    let policy = load_sources(&[("t.toml".into(), text.into())]).expect("valid");
    let analyst = Principal {
        id: "analyst".into(),
        org: "x".into(),
        roles: BTreeSet::from([PrincipalRole::Analyst]),
    };
    let mode = policy
        .aggregate_mode(&analyst, "tax_monthly")
        .expect("granted");
    assert_eq!(mode.min_units, 20);
    assert_eq!(
        mode.functions,
        BTreeSet::from([AggregateFunction::Count, AggregateFunction::Sum])
    );
    assert!(mode.exact, "both grants are exact");
    // Exact only where every grant that applies says so.
    let one_exact = text.replacen("exact = true\n", "", 1).replacen(
        "functions = [\"count\", \"sum\", \"min\"]\n",
        "functions = [\"count\", \"sum\", \"min\"]\n[grant.aggregate.dp]\nepsilon = 1.0\ndelta = 1e-7\nbudget_epsilon = 5.0\nbudget_delta = 1e-5\n",
        1,
    ) + "";
    let one_exact = one_exact.replace(
        "row_key = [\"credit_code\"]\n",
        "row_key = [\"credit_code\"]\n\n[dataset.dp]\ntotal_epsilon = 10.0\ntotal_delta = 1e-5\n",
    );
    let policy = load_sources(&[("t.toml".into(), one_exact)]).expect("valid");
    let mode = policy
        .aggregate_mode(&analyst, "tax_monthly")
        .expect("granted");
    assert!(!mode.exact);
    assert!(mode.dp.is_some());
    assert!(policy.dataset("tax_monthly").unwrap().private_by_default());
}

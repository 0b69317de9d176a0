//! Engine tests without the wire: checks the engine makes itself, whatever its caller.

use std::collections::BTreeSet;
use std::path::Path;

use sandbox_engine::{Engine, EngineConfig, ErrorKind, RequestContext};
use sandbox_policy::{Principal, PrincipalRole};

fn context(id: &str, role: PrincipalRole) -> RequestContext {
    RequestContext {
        principal: Principal {
            id: id.into(),
            org: "test".into(),
            roles: BTreeSet::from([role]),
        },
        request_id: format!("{id}-request"),
    }
}

/// The journal is for auditors even when the engine is called without the server's role table.
#[tokio::test]
async fn only_auditors_read_the_journal_and_refusals_are_recorded() {
    let dir = tempfile::tempdir().expect("tempdir");
    sandbox_demo::generate(
        dir.path(),
        &sandbox_demo::DemoConfig {
            enterprises: 50,
            ..Default::default()
        },
    )
    .expect("demo data");
    let policy =
        sandbox_policy::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies"))
            .expect("policies");
    let engine = Engine::start(EngineConfig::new(dir.path().to_path_buf(), policy))
        .await
        .expect("engine");

    let error = engine
        .list_events(&context("analyst", PrincipalRole::Analyst), 1, 100, false)
        .await
        .expect_err("an analyst may not read the journal");
    assert_eq!(error.kind(), ErrorKind::PermissionDenied);
    assert_eq!(error.code(), "role-not-permitted");

    let (events, _) = engine
        .list_events(&context("auditor", PrincipalRole::Auditor), 1, 100, false)
        .await
        .expect("an auditor reads the journal");
    let refusal = events.last().expect("the refusal is recorded");
    assert_eq!(refusal.event.action, "ListEvents");
    assert_eq!(refusal.event.principal, "analyst");
    assert_eq!(
        refusal.event.decision,
        sandbox_engine::Decision::PermissionDenied
    );
}

//! The attack harness: an adversary that starts a demo sandbox of its own, reads the ground truth
//! from the raw Parquet files the sandbox serves, and plays every attack class of THREATS.md
//! (1-30) with several variants each, as an analyst and as a bank, over the native API and Flight
//! SQL. An attack *leaks* when it recovers a hidden value exactly, judged against the raw data (or,
//! for noisy answers, when it obtains more independent answers than the data owner's budget
//! allows); an exit code, a refusal or an error is never the verdict.
//!
//! Two deployments are attacked: the demo as shipped, and the demo with the analyst's grants on
//! the register and the tax data marked exact by their owners (the defenses of exact answers on
//! their own). Attacks are data where they can be (`cases.toml`), code where they search
//! (`oracles.rs`), harvest noise (`noise.rs`), run code (`code.rs`), or solve
//! (`reconstruction.rs`).
//!
//! Bounded by default (1,000 enterprises), as CI runs it. The full run, at the demo's default
//! scale with more queries: `ADVERSARY_FULL=1 cargo test --release -p sandbox-tests --test
//! adversary -- --nocapture`.

mod cases;
mod code;
mod harness;
mod noise;
mod oracles;
mod reconstruction;
mod service;
mod targets;

use harness::{Harness, Profile};

async fn play(profile: Profile) {
    let mut h = Harness::start(profile)
        .await
        .expect("the adversary's sandbox starts");
    eprintln!(
        "adversary: {profile:?}, target {} ({} {} {} {} {}), exact marking accepted: {}",
        h.vars["cc"],
        h.vars["city"],
        h.vars["industry"],
        h.vars["size"],
        h.vars["status"],
        h.vars["year"],
        h.exact_marking
    );
    cases::play(&mut h).await;
    oracles::play(&mut h).await;
    reconstruction::play(&mut h).await;
    if profile == Profile::Demo {
        noise::play(&mut h).await;
        code::play(&mut h).await;
    }
    service::play(&mut h).await;
    service::resource_aborts(&mut h).await;
    h.report_and_assert();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_deployment_gives_the_adversary_nothing() {
    play(Profile::Demo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_grants_keep_their_defenses() {
    play(Profile::ExactGrants).await;
}

//! The policy loader over mutated demo policies and raw text: it loads or refuses with a
//! message, never panics.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use sandbox_fuzzgen::policy::{demo_sources, sources};

static DEMO: OnceLock<Vec<(String, String)>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let demo = DEMO.get_or_init(demo_sources);
    if let Ok(files) = sources(&mut Unstructured::new(data), demo) {
        let _ = sandbox_policy::load_sources(&files);
    }
    // The bytes themselves as one policy file.
    let text = String::from_utf8_lossy(data).into_owned();
    let _ = sandbox_policy::load_sources(&[("fuzz.toml".to_string(), text)]);
});

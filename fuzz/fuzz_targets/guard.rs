//! The plan guard over generated SQL, with the oracle that whatever it admits, the release gate
//! accepts and releases exactly the rows covering enough privacy units.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use sandbox_fuzzgen::oracle::{GuardOracle, analyst, demo_policy};
use sandbox_fuzzgen::sql::{Schema, query};

static ORACLE: OnceLock<(GuardOracle, Schema)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (oracle, schema) = ORACLE.get_or_init(|| {
        (
            GuardOracle::new(120),
            Schema::granted(&demo_policy(), &analyst()),
        )
    });
    if let Ok(sql) = query(&mut Unstructured::new(data), schema) {
        oracle.check(&sql);
    }
});

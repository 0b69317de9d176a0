//! Generators and oracles for fuzzing, kept in normal code so that they are unit-tested and the
//! fuzz targets (`fuzz/`) stay thin: [`sql`] turns fuzz bytes into SQL over the demo schema, and
//! [`oracle::GuardOracle`] checks that whatever the plan guard admits, the release gate accepts;
//! [`policy`] turns fuzz bytes into policy files for the loader.
//!
//! `sql.rs` covers the analyst's datasets and one not granted; joins on units and on other
//! columns, filters, functions, `CASE`, subqueries, `HAVING`, `ORDER BY`, `LIMIT`, derived tables.
//! `oracle.rs` plans, runs and releases (exact or DP) and fails when an admitted query fails on the
//! data, lacks the gate's hidden columns, announces a schema other than the one released, or
//! releases other than exactly the rows whose unit counts reach the threshold. `policy.rs` mutates
//! the demo policies line by line.
//!
//! `fuzz/` is a workspace of its own (nightly, `cargo fuzz`, `libfuzzer-sys`) with the targets
//! `guard`, `policy_loader`, `proto_decode` (every request message decodes or errors, and
//! re-encodes to itself) and `module_validation` (`wasm-smith` modules and raw bytes through the
//! upload check); `.ci/run` runs each briefly with a fixed seed.

pub mod oracle;
pub mod policy;
pub mod sql;

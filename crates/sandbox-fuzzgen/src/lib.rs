//! Generators and oracles for fuzzing, kept in normal code so that they are unit-tested and the
//! fuzz targets (`fuzz/`) stay thin: [`sql`] turns fuzz bytes into SQL over the demo schema, and
//! [`oracle::GuardOracle`] checks that whatever the plan guard admits, the release gate accepts;
//! [`policy`] turns fuzz bytes into policy files for the loader.

pub mod oracle;
pub mod policy;
pub mod sql;

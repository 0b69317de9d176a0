//! Deterministic generator of the inclusive-finance demo datasets.
//!
//! Enterprises in Guangxi with valid unified social credit codes, and the monthly tax, social
//! insurance and housing fund records, court cases, administrative penalties and consents that
//! government departments would hold about them. A hidden risk factor per enterprise drives
//! correlated signals (lower tax ratings, arrears, lawsuits as defendant, penalties, shrinking
//! revenue), so a credit model over the data means something. The same seed gives the same bytes.
//!
//! [`generate`] writes one Parquet file per table under `<dir>/datasets/<table>/`.
//!
//! The generator is a seeded ChaCha (`rand_chacha`, whose output does not change between
//! platforms): credit codes with their GB 32100 check characters, Guangxi division codes, GB/T 4754
//! industries, log-normal revenues and Poisson counts (`rand_distr`).

mod codes;
mod tables;

use std::path::{Path, PathBuf};

pub use codes::{credit_code, is_valid_credit_code};
pub use tables::TABLES;

/// Version of the generated layout; bumped whenever a table gains, loses or changes a column, so
/// that caches of generated data (the benchmarks') know to regenerate. 2: `court_cases` gained
/// `counterparty_code`.
pub const DATA_VERSION: u32 = 2;

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode {table}: {source}")]
    Parquet {
        table: &'static str,
        #[source]
        source: parquet::errors::ParquetError,
    },
    #[error("cannot build {table}: {source}")]
    Arrow {
        table: &'static str,
        #[source]
        source: arrow::error::ArrowError,
    },
    #[error("invalid demo configuration: {0}")]
    Config(&'static str),
}

pub type Result<T, E = DemoError> = std::result::Result<T, E>;

/// Size and seed of the generated data.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Number of enterprises; the monthly tables hold about `enterprises * months` rows each.
    pub enterprises: usize,
    /// Months of history, ending December 2024.
    pub months: u32,
    pub seed: u64,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enterprises: 20_000,
            months: 24,
            seed: 20_241_231,
        }
    }
}

impl DemoConfig {
    /// The default data set scaled by a factor (1 = 20,000 enterprises over 24 months).
    pub fn scaled(scale: f64) -> Self {
        let base = DemoConfig::default();
        DemoConfig {
            enterprises: ((base.enterprises as f64) * scale).round().max(1.0) as usize,
            ..base
        }
    }
}

/// Rows written per table.
#[derive(Debug, Clone, Default)]
pub struct DemoSummary {
    pub tables: Vec<(&'static str, usize)>,
}

impl DemoSummary {
    pub fn rows(&self, table: &str) -> Option<usize> {
        self.tables
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, n)| *n)
    }
}

/// Writes every demo table as Parquet under `<dir>/datasets/<table>/part-0.parquet`.
pub fn generate(dir: &Path, config: &DemoConfig) -> Result<DemoSummary> {
    if config.enterprises == 0 || config.months == 0 || config.months > 120 {
        return Err(DemoError::Config(
            "need at least one enterprise and between 1 and 120 months",
        ));
    }
    tables::write_all(&dir.join("datasets"), config)
}

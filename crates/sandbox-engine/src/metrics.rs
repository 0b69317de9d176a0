//! The engine's figures for operators, as Prometheus metrics: how long jobs take and how they
//! end, rows released and suppressed per consumer org, privacy budget spent, journal append
//! latency and jobs in flight. The server registers them beside its request counts and serves
//! them; nothing here is sent to clients.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sandbox_audit::Decision;

/// How a job ended, by kind (`sql`, `wasm`, `template`) and outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OrgLabels {
    pub org: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    pub org: String,
    pub dataset: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatCounters<L> = Family<L, Counter<f64, AtomicU64>>;

/// Durations from 1 ms to about 65 s (a job's time limit is 60 s by default).
fn job_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The engine's metrics. Clones share the same values.
#[derive(Clone, Debug)]
pub struct EngineMetrics {
    job_seconds: Histograms<JobLabels>,
    rows_released: Family<OrgLabels, Counter>,
    rows_suppressed: Family<OrgLabels, Counter>,
    epsilon_spent: FloatCounters<BudgetLabels>,
    delta_spent: FloatCounters<BudgetLabels>,
    journal_append_seconds: Histogram,
    jobs_in_flight: Gauge,
}

impl Default for EngineMetrics {
    fn default() -> Self {
        EngineMetrics {
            job_seconds: Family::new_with_constructor(job_buckets),
            rows_released: Family::default(),
            rows_suppressed: Family::default(),
            epsilon_spent: Family::default(),
            delta_spent: Family::default(),
            // A group commit is a few milliseconds; from 50 µs to about 3 s.
            journal_append_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            jobs_in_flight: Gauge::default(),
        }
    }
}

impl EngineMetrics {
    /// Adds every metric to `registry` (under the `sandbox_` prefix the server gives it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "job_duration_seconds",
            "Time from a job's submission to its recorded end, by kind and outcome",
            self.job_seconds.clone(),
        );
        registry.register(
            "rows_released",
            "Rows released to consumers, by the consumer's org",
            self.rows_released.clone(),
        );
        registry.register(
            "rows_suppressed",
            "Rows withheld by the release gate (too few units; entities without consent), by \
             the consumer's org",
            self.rows_suppressed.clone(),
        );
        registry.register(
            "privacy_epsilon_spent",
            "Differential-privacy epsilon debited from budgets, by consumer org and dataset",
            self.epsilon_spent.clone(),
        );
        registry.register(
            "privacy_delta_spent",
            "Differential-privacy delta debited from budgets, by consumer org and dataset",
            self.delta_spent.clone(),
        );
        registry.register(
            "journal_append_seconds",
            "Time from an audit append until the record is durable",
            self.journal_append_seconds.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Jobs admitted and not yet ended",
            self.jobs_in_flight.clone(),
        );
    }

    /// A job's recorded end: its duration and what it released.
    pub(crate) fn job_ended(
        &self,
        kind: &str,
        decision: Decision,
        elapsed: Duration,
        org: &str,
        rows_released: u64,
        rows_suppressed: u64,
    ) {
        let outcome = match decision {
            Decision::Allow => "released",
            Decision::Deny => "denied",
            Decision::Cancel => "cancelled",
            _ => "failed",
        };
        self.job_seconds
            .get_or_create(&JobLabels {
                kind: kind.to_string(),
                outcome: outcome.to_string(),
            })
            .observe(elapsed.as_secs_f64());
        let org = OrgLabels {
            org: org.to_string(),
        };
        if rows_released > 0 {
            self.rows_released.get_or_create(&org).inc_by(rows_released);
        }
        if rows_suppressed > 0 {
            self.rows_suppressed
                .get_or_create(&org)
                .inc_by(rows_suppressed);
        }
    }

    /// A budget debit: `epsilon` and `delta` charged to each of `datasets`.
    pub(crate) fn budget_spent(&self, org: &str, datasets: &[String], epsilon: f64, delta: f64) {
        for dataset in datasets {
            let labels = BudgetLabels {
                org: org.to_string(),
                dataset: dataset.clone(),
            };
            self.epsilon_spent.get_or_create(&labels).inc_by(epsilon);
            self.delta_spent.get_or_create(&labels).inc_by(delta);
        }
    }

    pub(crate) fn journal_appended(&self, elapsed: Duration) {
        self.journal_append_seconds.observe(elapsed.as_secs_f64());
    }

    pub(crate) fn set_jobs_in_flight(&self, jobs: usize) {
        self.jobs_in_flight.set(jobs as i64);
    }
}

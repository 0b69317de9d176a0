//! The jobs part's state: admission slots, and every job (its owner, cancellation, start
//! signal and published state) until it is pruned. A leaf: it knows nothing of the engine.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_sql::CancellationToken;
use tokio::sync::watch;

use crate::admission::JobSlots;
use crate::error::{EngineError, Result};
use crate::types::JobSnapshot;

pub(crate) struct Job {
    pub(crate) owner: String,
    pub(crate) created: Instant,
    pub(crate) cancel: CancellationToken,
    /// For a deferred job: fired when its result is first asked for, which starts it.
    pub(crate) start: Option<CancellationToken>,
    pub(crate) state: watch::Sender<JobSnapshot>,
}

/// The jobs part: admission slots, and every job until it is pruned.
pub(crate) struct JobTable {
    /// Jobs admitted and not yet ended.
    pub(crate) slots: JobSlots,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// How long a finished job's result stays fetchable, and how many finished jobs are kept.
    retention: Duration,
    max_retained: usize,
}

impl JobTable {
    pub(crate) fn new(
        max_running: usize,
        max_per_principal: usize,
        retention: Duration,
        max_retained: usize,
    ) -> Self {
        JobTable {
            slots: JobSlots::new(max_running, max_per_principal),
            jobs: Mutex::new(HashMap::new()),
            retention,
            max_retained,
        }
    }

    /// Jobs admitted and not yet ended.
    pub(crate) fn running(&self) -> usize {
        self.slots.running()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().expect("jobs lock is never poisoned")
    }

    pub(crate) fn unfinished(&self) -> Vec<Arc<Job>> {
        self.lock()
            .values()
            .filter(|job| !job.state.borrow().state.is_terminal())
            .cloned()
            .collect()
    }

    /// Registers a job, first dropping finished jobs past their retention (and the oldest
    /// finished ones beyond the most kept).
    pub(crate) fn insert(&self, job_id: String, job: Arc<Job>) {
        let mut jobs = self.lock();
        let retention = self.retention;
        jobs.retain(|_, job| {
            !(job.state.borrow().state.is_terminal() && job.created.elapsed() > retention)
        });
        if jobs.len() >= self.max_retained {
            let mut finished: Vec<(Instant, String)> = jobs
                .iter()
                .filter(|(_, j)| j.state.borrow().state.is_terminal())
                .map(|(id, j)| (j.created, id.clone()))
                .collect();
            finished.sort();
            let excess = jobs.len() + 1 - self.max_retained;
            for (_, id) in finished.into_iter().take(excess) {
                jobs.remove(&id);
            }
        }
        jobs.insert(job_id, job);
    }

    /// One of `principal`'s jobs. Another principal's job is refused like a missing permission.
    pub(crate) fn get(&self, principal: &str, job_id: &str) -> Result<Arc<Job>> {
        let job = self
            .lock()
            .get(job_id)
            .cloned()
            .ok_or_else(|| EngineError::JobNotFound(job_id.to_string()))?;
        if job.owner != principal {
            return Err(EngineError::NotJobOwner(job_id.to_string()));
        }
        Ok(job)
    }
}

//! Job admission: how many jobs may run at once in total and per principal. A job over either
//! limit is refused at once (`RESOURCE_EXHAUSTED` with a retry hint), never queued without bound.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::codes::EngineRule;
use crate::error::{EngineError, RETRY_AFTER};

#[derive(Debug, Default)]
struct Running {
    total: usize,
    by_principal: HashMap<String, usize>,
}

/// The counters of running jobs, shared by every [`JobSlot`].
#[derive(Debug)]
pub(crate) struct JobSlots {
    max_total: usize,
    max_per_principal: usize,
    running: Arc<Mutex<Running>>,
}

impl JobSlots {
    pub(crate) fn new(max_total: usize, max_per_principal: usize) -> Self {
        JobSlots {
            max_total: max_total.max(1),
            max_per_principal: max_per_principal.max(1),
            running: Arc::default(),
        }
    }

    /// A slot for one job of `principal`, held from admission until the job's end is recorded.
    pub(crate) fn acquire(&self, principal: &str) -> Result<JobSlot, EngineError> {
        let mut running = self.running.lock().expect("slots lock is never poisoned");
        if running.total >= self.max_total {
            return Err(EngineError::Throttled {
                rule: EngineRule::ServerBusy,
                message: format!(
                    "the server is running its limit of {} jobs; retry later",
                    self.max_total
                ),
                retry_after: RETRY_AFTER,
            });
        }
        let mine = running.by_principal.get(principal).copied().unwrap_or(0);
        if mine >= self.max_per_principal {
            return Err(EngineError::Throttled {
                rule: EngineRule::TooManyJobs,
                message: format!(
                    "you have {mine} jobs running, the limit per principal; retry when one ends"
                ),
                retry_after: RETRY_AFTER,
            });
        }
        running.total += 1;
        *running
            .by_principal
            .entry(principal.to_string())
            .or_default() += 1;
        Ok(JobSlot {
            running: self.running.clone(),
            principal: principal.to_string(),
        })
    }

    /// Jobs running now.
    pub(crate) fn running(&self) -> usize {
        self.running
            .lock()
            .expect("slots lock is never poisoned")
            .total
    }
}

/// One admitted job's place; released when dropped.
#[derive(Debug)]
pub(crate) struct JobSlot {
    running: Arc<Mutex<Running>>,
    principal: String,
}

impl Drop for JobSlot {
    fn drop(&mut self) {
        let mut running = self.running.lock().expect("slots lock is never poisoned");
        running.total -= 1;
        if let Some(count) = running.by_principal.get_mut(&self.principal) {
            *count -= 1;
            if *count == 0 {
                running.by_principal.remove(&self.principal);
            }
        }
    }
}

/// A submission in progress: when it began and the slot it holds until the job's end is
/// recorded (or it is refused).
#[derive(Debug)]
pub(crate) struct Submission {
    at: Instant,
    _slot: JobSlot,
    /// The job executes only once its result is asked for (Flight SQL's `DoGet`).
    pub(crate) deferred: bool,
}

impl Submission {
    pub(crate) fn new(slot: JobSlot, deferred: bool) -> Self {
        Submission {
            at: Instant::now(),
            _slot: slot,
            deferred,
        }
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.at.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_total_and_per_principal_and_frees_on_drop() {
        let slots = JobSlots::new(3, 2);
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let refused = slots.acquire("a").unwrap_err();
        assert_eq!(refused.code(), "too-many-jobs");
        let _b1 = slots.acquire("b").unwrap();
        assert_eq!(slots.acquire("c").unwrap_err().code(), "server-busy");
        assert_eq!(slots.running(), 3);
        drop(a1);
        assert_eq!(slots.running(), 2);
        let _c1 = slots.acquire("c").unwrap();
        assert_eq!(slots.acquire("a").unwrap_err().code(), "server-busy");
    }
}

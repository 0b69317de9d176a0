//! Governance: what owners, consumers and admins decide about the data's uses, kept apart from
//! the jobs that execute them. Every state change is an audit event carrying a [`Record`];
//! [`replay`] folds them back into the [`Registry`] at start, so the journal is the system of
//! record for modules, templates, approvals, consents, runs and budgets.
//!
//! - [`modules`]: upload, owners' approvals and rejections, listings;
//! - [`templates`]: submission, approvals, listings, the demo's seed;
//! - [`consents`]: add, revoke, list, the demo's seed;
//! - [`budgets`]: differential-privacy budgets: views, renewals, the remaining-budget check.

pub(crate) mod budgets;
pub(crate) mod consents;
pub(crate) mod modules;
pub(crate) mod templates;

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sandbox_audit::Journal;
use sandbox_policy::{PolicySet, PrincipalRole, Record, Registry};

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::recorder::Pending;
use crate::types::RequestContext;

/// Seconds since the Unix epoch.
pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) const DAY: u64 = 86_400;

/// Longest validity of an approval or a consent added through the API.
pub(crate) const MAX_VALID_DAYS: u64 = 5 * 366;

/// Folds every record of the journal into a registry. A record that cannot be read stops the
/// start: state rebuilt from a journal the engine does not understand would be wrong.
pub(crate) fn replay(journal: &Journal) -> Result<Registry> {
    let mut registry = Registry::default();
    let mut from = 1;
    loop {
        let events = journal.read(from, 10_000)?;
        let Some(last) = events.last() else { break };
        from = last.event.seq + 1;
        for stored in events {
            if let Some(value) = stored.event.record {
                let record: Record = serde_json::from_value(value).map_err(|e| {
                    EngineError::Setup(format!(
                        "journal record {} cannot be read: {e}",
                        stored.event.seq
                    ))
                })?;
                registry.apply(record);
            }
        }
    }
    Ok(registry)
}

pub(crate) fn record_value(record: &Record) -> serde_json::Value {
    serde_json::to_value(record).expect("records always serialize")
}

pub(crate) fn require_role(
    ctx: &RequestContext,
    roles: &[PrincipalRole],
    what: &'static str,
) -> Result<()> {
    if ctx.principal.has_any_role(roles) {
        Ok(())
    } else {
        Err(EngineError::RoleNotPermitted(what))
    }
}

/// The governance part: the registry every decision reads, and the policy naming each dataset's
/// owner.
pub(crate) struct Governance {
    policy: Arc<PolicySet>,
    /// Modules, templates, approvals, consents, runs and budgets, rebuilt from the journal.
    registry: Mutex<Registry>,
}

impl Governance {
    pub(crate) fn new(policy: Arc<PolicySet>, registry: Registry) -> Self {
        Governance {
            policy,
            registry: Mutex::new(registry),
        }
    }

    /// The org that owns `dataset`.
    pub(crate) fn owner_of(&self, dataset: &str) -> Option<String> {
        self.policy.dataset(dataset).map(|d| d.owner.clone())
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .expect("registry lock is never poisoned")
    }
}

impl Engine {
    /// Records a governance call's terminal event (with its record when it changed state) and
    /// applies the record, or records the refusal. The record is applied only once it is durable.
    pub(crate) async fn conclude<T>(
        &self,
        mut event: Pending,
        outcome: Result<(T, Option<Record>)>,
    ) -> Result<T> {
        match outcome {
            Ok((value, record)) => {
                event.record = record.as_ref().map(record_value);
                event.allow().await?;
                if let Some(record) = record {
                    self.governance.registry().apply(record);
                }
                Ok(value)
            }
            Err(error) => event.refuse(error).await,
        }
    }
}

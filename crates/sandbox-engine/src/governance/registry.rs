//! The registry as governance keeps it: rebuilt from the journal's records at start, read and
//! changed under one lock; and the small helpers every governance call shares (time, validity,
//! role checks). A leaf: it knows nothing of the engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sandbox_audit::Journal;
use sandbox_policy::{PolicySet, PrincipalRole, Record, Registry};

use crate::error::{EngineError, Result};
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

/// An owner org whose approval a pending module or template still waits for, with its datasets
/// the artifact reads. The engine knows orgs, not logins: the server names who may approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwaitingOwner {
    pub org: String,
    pub datasets: Vec<String>,
}

/// The registry's missing approvals as a view's list, in org order; none unless `pending` (an
/// expired, exhausted, rejected or superseded artifact waits for no approval).
pub(crate) fn awaiting_owners(
    pending: bool,
    missing: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Vec<AwaitingOwner> {
    if !pending {
        return Vec::new();
    }
    missing
        .into_iter()
        .map(|(org, datasets)| AwaitingOwner {
            org,
            datasets: datasets.into_iter().collect(),
        })
        .collect()
}

/// The governance part: the registry every decision reads, and the policy naming each dataset's
/// owner.
pub(crate) struct Governance {
    pub(crate) policy: Arc<PolicySet>,
    /// Where uploaded modules are stored, by hash.
    pub(crate) modules_dir: PathBuf,
    /// Largest module accepted at upload, in bytes.
    pub(crate) max_module_bytes: usize,
    /// Modules, templates, approvals, consents, runs and budgets, rebuilt from the journal.
    registry: Mutex<Registry>,
}

impl Governance {
    pub(crate) fn new(
        policy: Arc<PolicySet>,
        registry: Registry,
        modules_dir: PathBuf,
        max_module_bytes: usize,
    ) -> Self {
        Governance {
            policy,
            modules_dir,
            max_module_bytes,
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

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
pub(crate) mod registry;
pub(crate) mod templates;

use sandbox_policy::Record;

use crate::error::Result;
use crate::governance::registry::Governance;
use crate::governance::registry::record_value;
use crate::recorder::Pending;

impl Governance {
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
                    self.registry().apply(record);
                }
                Ok(value)
            }
            Err(error) => event.refuse(error).await,
        }
    }
}

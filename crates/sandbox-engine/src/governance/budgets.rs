//! Differential-privacy budgets as governance: the ledger is the registry's (`BudgetDebit`
//! records in jobs' `AdmitJob` events, `BudgetRefreshed` records of an owner's explicit renewal),
//! checked per consumer org and dataset and per dataset over every consumer together
//! (`[dataset.dp]` totals: a second organisation asking the same questions does not bring a
//! second budget to spend on the same enterprises). Views for consumers, owners and auditors;
//! an owner's and an auditor's carry each consumer org's budget as its grants set it (which
//! orgs hold which grant, the server's directory of principals says).

use std::collections::BTreeSet;

use sandbox_policy::{BudgetSpent, DpMode, Principal, PrincipalRole, Record};

use crate::codes::{Action, EngineRule};
use crate::directory::{dp_grants, org_budget};
use crate::error::{EngineError, Result};
use crate::governance::registry::Governance;
use crate::recorder::Recorder;
use crate::types::RequestContext;

/// A consumer org's budget on one dataset, as a caller may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    pub org: String,
    pub dataset: String,
    /// The total the org may spend: a consumer's own grant's; for an owner or an auditor, what
    /// the org's grants allow ([`crate::directory::org_budget`]); for `*`, the dataset's total.
    /// `None` where no grant of the org offers differential privacy on the dataset now.
    pub epsilon_budget: Option<f64>,
    pub delta_budget: Option<f64>,
    pub epsilon_spent: f64,
    pub delta_spent: f64,
    pub queries: u64,
    pub refreshes: u64,
}

impl BudgetView {
    /// What `org` spent on `dataset`, against `budget` (epsilon, delta) when one applies.
    fn new(org: &str, dataset: &str, spent: BudgetSpent, budget: Option<(f64, f64)>) -> Self {
        BudgetView {
            org: org.to_string(),
            dataset: dataset.to_string(),
            epsilon_budget: budget.map(|b| b.0),
            delta_budget: budget.map(|b| b.1),
            epsilon_spent: spent.epsilon,
            delta_spent: spent.delta,
            queries: spent.queries,
            refreshes: spent.refreshes,
        }
    }
}

impl Governance {
    /// What the caller's org would have left on the dataset with the least left after spending
    /// `epsilon` and `delta` on each of `datasets`; refused if any would go below zero.
    pub(crate) fn remaining(
        &self,
        ctx: &RequestContext,
        datasets: &[String],
        epsilon: f64,
        delta: f64,
    ) -> Result<(f64, f64)> {
        let registry = self.registry();
        self.remaining_in(&registry, ctx, datasets, epsilon, delta)
    }

    pub(crate) fn remaining_in(
        &self,
        registry: &sandbox_policy::Registry,
        ctx: &RequestContext,
        datasets: &[String],
        epsilon: f64,
        delta: f64,
    ) -> Result<(f64, f64)> {
        let mut left = (f64::INFINITY, f64::INFINITY);
        for dataset in datasets {
            let budget = self
                .policy
                .aggregate_mode(&ctx.principal, dataset)
                .and_then(|m| m.dp)
                .ok_or_else(|| {
                    EngineError::denied(
                        EngineRule::DpNotGranted,
                        format!("dataset `{dataset}` offers you no differential privacy budget"),
                    )
                })?;
            let spent = registry.budget_spent(&ctx.principal.org, dataset);
            let epsilon_left = budget.budget_epsilon - spent.epsilon - epsilon;
            let delta_left = budget.budget_delta - spent.delta - delta;
            // A relative tolerance for the sum of floating-point debits, never more.
            if epsilon_left < -1e-9 * budget.budget_epsilon
                || delta_left < -1e-9 * budget.budget_delta
            {
                return Err(EngineError::denied(
                    EngineRule::BudgetExhausted,
                    format!(
                        "the privacy budget of your org on `{dataset}` does not cover this query: \
                         spent epsilon {:.6} of {}, delta {:e} of {:e}; this query needs epsilon \
                         {epsilon:.6}, delta {delta:e}",
                        spent.epsilon, budget.budget_epsilon, spent.delta, budget.budget_delta
                    ),
                ));
            }
            // The dataset's total over every consumer: what all orgs spent together.
            let total = self
                .policy
                .dataset(dataset)
                .and_then(|d| d.dp_total)
                .ok_or_else(|| {
                    EngineError::denied(
                        EngineRule::DpNotGranted,
                        format!("dataset `{dataset}` sets no total privacy budget"),
                    )
                })?;
            let all = registry.total_spent(dataset);
            let total_epsilon_left = total.epsilon - all.epsilon - epsilon;
            let total_delta_left = total.delta - all.delta - delta;
            if total_epsilon_left < -1e-9 * total.epsilon || total_delta_left < -1e-9 * total.delta
            {
                return Err(EngineError::denied(
                    EngineRule::BudgetExhausted,
                    format!(
                        "the total privacy budget of `{dataset}` over every consumer does not \
                         cover this query: all orgs together spent epsilon {:.6} of {}; the \
                         owner may renew it",
                        all.epsilon, total.epsilon
                    ),
                ));
            }
            let epsilon_left = epsilon_left.min(total_epsilon_left);
            let delta_left = delta_left.min(total_delta_left);
            left = (
                left.0.min(epsilon_left.max(0.0)),
                left.1.min(delta_left.max(0.0)),
            );
        }
        Ok(left)
    }

    /// The budgets a caller may see: a consumer its org's on every dataset granted to it under
    /// differential privacy; an owner every consumer org's on its datasets (each org that spent
    /// or may spend, with what its grants allow); an auditor every one. `directory` is every
    /// principal with credentials: it says which orgs a grant reaches. Recorded like every call.
    pub(crate) async fn budgets(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        directory: &[Principal],
    ) -> Result<Vec<BudgetView>> {
        let event = recorder.begin(ctx, Action::GetBudgets);
        let principal = &ctx.principal;
        let mut views = Vec::new();
        let mut seen = BTreeSet::new();
        {
            let registry = self.registry();
            for dataset in self.policy.granted_datasets(principal) {
                let Some(dp) = self
                    .policy
                    .aggregate_mode(principal, &dataset.id)
                    .and_then(|m| m.dp)
                else {
                    continue;
                };
                let spent = registry.budget_spent(&principal.org, &dataset.id);
                seen.insert((principal.org.clone(), dataset.id.clone()));
                views.push(BudgetView::new(
                    &principal.org,
                    &dataset.id,
                    spent,
                    Some(own_budget(&dp)),
                ));
            }
            let owned: BTreeSet<String> = self
                .policy
                .owned_datasets(principal)
                .map(|d| d.id.clone())
                .collect();
            let auditor = principal.roles.contains(&PrincipalRole::Auditor);
            // Every org that spent (the ledger) or may spend (a grant reaching one of its
            // logins), once, in (org, dataset) order.
            let mut others: Vec<(String, String)> = registry
                .budgets()
                .map(|((org, dataset), _)| (org.clone(), dataset.clone()))
                .chain(dp_grants(&self.policy, directory))
                .filter(|(_, dataset)| auditor || owned.contains(dataset))
                .filter(|pair| !seen.contains(pair))
                .collect();
            others.sort();
            others.dedup();
            for (org, dataset) in others {
                let spent = registry.budget_spent(&org, &dataset);
                let budget = org_budget(&self.policy, &org, &dataset, directory);
                views.push(BudgetView::new(&org, &dataset, spent, budget));
            }
            // Each dataset's total over all consumers (org `*`), with the owner's bound; every
            // consumer sees the totals of the datasets it may query under differential privacy.
            for (id, dataset) in self.policy.datasets.iter() {
                let Some(total) = dataset.dp_total else {
                    continue;
                };
                let consumer = seen.iter().any(|(_, d)| d == id);
                if auditor || owned.contains(id) || consumer {
                    let spent = registry.total_spent(id);
                    views.push(BudgetView::new(
                        sandbox_policy::ALL_ORGS,
                        id,
                        spent,
                        Some((total.epsilon, total.delta)),
                    ));
                }
            }
        }
        event.allow().await?;
        Ok(views)
    }

    /// Renews a consumer org's budget on a dataset: only the dataset's owner may, with a
    /// reason, and the renewal is a journal record (nothing renews by itself).
    pub(crate) async fn refresh_budget(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        org: &str,
        dataset: &str,
        reason: &str,
        directory: &[Principal],
    ) -> Result<BudgetView> {
        let mut event = recorder.begin(ctx, Action::RefreshBudget);
        event.datasets = vec![dataset.to_string()];
        let outcome = (|| {
            let owner = self
                .owner_of(dataset)
                .ok_or_else(|| EngineError::NotFound(format!("dataset `{dataset}` not found")))?;
            if owner != ctx.principal.org || !ctx.principal.roles.contains(&PrincipalRole::Owner) {
                return Err(EngineError::NotPermitted(format!(
                    "only the owner of `{dataset}` may renew budgets on it"
                )));
            }
            if org.is_empty() || reason.trim().is_empty() {
                return Err(EngineError::invalid(
                    "a renewal names the consumer org (or `*` for the dataset's total over all \
                     consumers) and gives a reason",
                ));
            }
            Ok((
                (),
                Some(Record::BudgetRefreshed {
                    org: org.to_string(),
                    dataset: dataset.to_string(),
                    by: ctx.principal.id.clone(),
                    reason: reason.to_string(),
                }),
            ))
        })();
        event.message = format!("renew the budget of `{org}` on `{dataset}`: {reason}");
        self.conclude(event, outcome).await?;
        let (spent, budget) = if org == sandbox_policy::ALL_ORGS {
            let total = self
                .policy
                .dataset(dataset)
                .and_then(|d| d.dp_total)
                .map(|t| (t.epsilon, t.delta));
            (self.registry().total_spent(dataset), total)
        } else {
            let budget = org_budget(&self.policy, org, dataset, directory);
            (self.registry().budget_spent(org, dataset), budget)
        };
        Ok(BudgetView::new(org, dataset, spent, budget))
    }
}

/// A consumer's own budget: its grant's.
fn own_budget(dp: &DpMode) -> (f64, f64) {
    (dp.budget_epsilon, dp.budget_delta)
}

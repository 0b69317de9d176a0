//! Who a grant reaches: the policy names grantees (a principal, an org or a role), the server
//! knows the principals with credentials (the directory, id, org and roles, never tokens). These
//! pure functions join the two for the views that speak of consumer orgs and their logins
//! (`ListGrants`, owners' and auditors' budgets). A leaf: it imports no part of the engine.

use std::collections::BTreeMap;

use sandbox_policy::{DpMode, Grant, Grantee, PolicySet, Principal};

/// The consumer orgs a grant reaches, each with its logins the grant applies to, in org order.
/// A grant that reaches nobody with credentials is still policy: it is listed under the org it
/// names (an org grant), or under no org (`""`) with the principal it names, or none (a role).
pub(crate) fn consumers_of(grant: &Grant, directory: &[Principal]) -> Vec<(String, Vec<String>)> {
    let mut orgs: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for principal in directory.iter().filter(|p| grant.grantee.matches(p)) {
        orgs.entry(principal.org.clone())
            .or_default()
            .push(principal.id.clone());
    }
    if orgs.is_empty() {
        let (org, logins) = match &grant.grantee {
            Grantee::Org(org) => (org.clone(), Vec::new()),
            Grantee::Principal(id) => (String::new(), vec![id.clone()]),
            Grantee::Role(_) => (String::new(), Vec::new()),
        };
        orgs.insert(org, logins);
    }
    orgs.into_iter()
        .map(|(org, mut logins)| {
            logins.sort();
            (org, logins)
        })
        .collect()
}

/// The privacy budget a consumer org's grants give it on a dataset: the budget is the org's (every
/// login spends from one ledger), each login's debits checked against its own grant, so the org
/// may spend up to the largest of its logins' budgets. `None` when no login of the org holds
/// differential privacy on the dataset.
pub(crate) fn org_budget(
    policy: &PolicySet,
    org: &str,
    dataset: &str,
    directory: &[Principal],
) -> Option<(f64, f64)> {
    directory
        .iter()
        .filter(|p| p.org == org)
        .filter_map(|p| policy.aggregate_mode(p, dataset).and_then(|m| m.dp))
        .map(|dp: DpMode| (dp.budget_epsilon, dp.budget_delta))
        .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
}

/// Every (consumer org, dataset) some login of the directory may spend differential privacy on.
pub(crate) fn dp_grants(policy: &PolicySet, directory: &[Principal]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = directory
        .iter()
        .flat_map(|p| {
            policy
                .datasets
                .keys()
                .filter(|d| {
                    policy
                        .aggregate_mode(p, d)
                        .is_some_and(|mode| mode.dp.is_some())
                })
                .map(|d| (p.org.clone(), d.clone()))
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    pairs
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use sandbox_policy::PrincipalRole;

    use super::*;

    fn principal(id: &str, org: &str, role: PrincipalRole) -> Principal {
        Principal {
            id: id.into(),
            org: org.into(),
            roles: BTreeSet::from([role]),
        }
    }

    fn grant(grantee: Grantee) -> Grant {
        Grant {
            dataset: "d".into(),
            grantee,
            aggregate: None,
            template: None,
            wasm: None,
            location: sandbox_policy::Location {
                file: "p.toml".into(),
                line: 1,
            },
        }
    }

    /// Each kind of grantee, reaching logins or nobody: (grantee, the orgs and logins listed).
    #[test]
    fn grants_reach_orgs_and_their_logins() {
        use PrincipalRole::*;
        let directory = [
            principal("bank", "bank_demo", Consumer),
            principal("bank2", "bank_demo", Consumer),
            principal("analyst", "analytics", Analyst),
            principal("owner_tax", "tax_bureau", Owner),
        ];
        // (org, its logins) as a grant reaches them.
        type Reached<'a> = Vec<(&'a str, Vec<&'a str>)>;
        let cases: Vec<(Grantee, Reached)> = vec![
            (
                Grantee::Principal("bank".into()),
                vec![("bank_demo", vec!["bank"])],
            ),
            (
                Grantee::Org("bank_demo".into()),
                vec![("bank_demo", vec!["bank", "bank2"])],
            ),
            (
                Grantee::Role(Consumer),
                vec![("bank_demo", vec!["bank", "bank2"])],
            ),
            (Grantee::Role(Analyst), vec![("analytics", vec!["analyst"])]),
            (Grantee::Org("nobody".into()), vec![("nobody", vec![])]),
            (
                Grantee::Principal("ghost".into()),
                vec![("", vec!["ghost"])],
            ),
            (Grantee::Role(Admin), vec![("", vec![])]),
        ];
        for (grantee, expected) in cases {
            let expected: Vec<(String, Vec<String>)> = expected
                .into_iter()
                .map(|(org, logins)| {
                    (
                        org.to_string(),
                        logins.into_iter().map(String::from).collect(),
                    )
                })
                .collect();
            assert_eq!(
                consumers_of(&grant(grantee.clone()), &directory),
                expected,
                "{grantee:?}"
            );
        }
    }
}

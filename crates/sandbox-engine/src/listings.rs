//! Listings: the datasets a caller may use (schemas, roles, levels, modes; never rows), the SQL
//! catalog Flight SQL clients see, the grants a caller may see, and what the caller's org owns.
//! Each is recorded naming what it showed.

use std::collections::{BTreeMap, BTreeSet};

use arrow::datatypes::SchemaRef;
use sandbox_policy::{Principal, PrincipalRole};

use crate::codes::Action;
use crate::directory::consumers_of;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::types::{ColumnView, DatasetView, GrantView, Identity, RequestContext};

impl Engine {
    /// The datasets the caller can query with SQL (an aggregate grant), each with the schema it
    /// sees: what SQL clients list as tables. Recorded as `ListDatasets`, naming them.
    pub async fn sql_catalog(&self, ctx: &RequestContext) -> Result<Vec<(String, SchemaRef)>> {
        let tables: Vec<(String, SchemaRef)> = self
            .granted(&ctx.principal)
            .into_iter()
            .filter(|(_, granted)| granted.aggregate.is_some())
            .filter_map(|(id, _)| self.sql.visible_schema(&id).map(|schema| (id, schema)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let mut event = self.recorder.begin(ctx, Action::ListDatasets);
        event.datasets = tables.iter().map(|(id, _)| id.clone()).collect();
        event.allow().await?;
        Ok(tables)
    }

    /// Datasets the caller may use (and, for owners, the ones their org owns): never rows.
    pub async fn list_datasets(&self, ctx: &RequestContext) -> Result<Vec<DatasetView>> {
        let principal = &ctx.principal;
        let mut views: Vec<DatasetView> = Vec::new();
        for dataset in self.policy.granted_datasets(principal) {
            let schema = self.sql.visible_schema(&dataset.id);
            let columns = dataset
                .visible_columns()
                .map(|c| ColumnView {
                    name: c.name.clone(),
                    data_type: schema
                        .as_ref()
                        .and_then(|s| {
                            s.field_with_name(&c.name)
                                .ok()
                                .map(|f| f.data_type().to_string())
                        })
                        .unwrap_or_default(),
                    level: c.level.as_str().into(),
                    role: c.role.as_str().into(),
                    description: c.description.clone(),
                })
                .collect();
            let mode = self.policy.aggregate_mode(principal, &dataset.id);
            views.push(DatasetView {
                id: dataset.id.clone(),
                owner: dataset.owner.clone(),
                description: dataset.description.clone(),
                privacy_unit: dataset.privacy_unit.clone(),
                columns,
                modes: mode
                    .iter()
                    .map(|_| "aggregate".to_string())
                    .chain(
                        self.policy
                            .wasm_mode(principal, &dataset.id)
                            .map(|_| "wasm".to_string()),
                    )
                    .collect(),
                min_units: mode.as_ref().map_or(0, |m| m.min_units),
                functions: mode
                    .iter()
                    .flat_map(|m| m.functions.iter().map(|f| f.as_str().to_string()))
                    .collect(),
            });
        }
        // Owners see their own datasets in full, hidden columns included, without any mode.
        for dataset in self.policy.owned_datasets(principal) {
            if views.iter().any(|v| v.id == dataset.id) {
                continue;
            }
            views.push(DatasetView {
                id: dataset.id.clone(),
                owner: dataset.owner.clone(),
                description: dataset.description.clone(),
                privacy_unit: dataset.privacy_unit.clone(),
                columns: dataset
                    .columns
                    .iter()
                    .map(|c| ColumnView {
                        name: c.name.clone(),
                        data_type: String::new(),
                        level: c.level.as_str().into(),
                        role: c.role.as_str().into(),
                        description: c.description.clone(),
                    })
                    .collect(),
                modes: Vec::new(),
                min_units: 0,
                functions: Vec::new(),
            });
        }
        views.sort_by(|a, b| a.id.cmp(&b.id));
        let mut event = self.recorder.begin(ctx, Action::ListDatasets);
        event.datasets = views.iter().map(|v| v.id.clone()).collect();
        event.allow().await?;
        Ok(views)
    }

    /// What the engine knows of the caller: the datasets its org owns. Recorded as `WhoAmI`,
    /// naming them.
    pub async fn who_am_i(&self, ctx: &RequestContext) -> Result<Identity> {
        let owns: Vec<String> = self
            .policy
            .datasets_of_org(&ctx.principal.org)
            .map(|d| d.id.clone())
            .collect();
        let mut event = self.recorder.begin(ctx, Action::WhoAmI);
        event.datasets = owns.clone();
        event.allow().await?;
        Ok(Identity { owns })
    }

    /// The grants the caller may see, one view per grant and consumer org it reaches: an owner
    /// those on its org's datasets, an auditor every one, a consumer or an analyst those that
    /// reach its own org. `directory` is every principal with credentials (the server's), which
    /// says which orgs and logins a grant reaches. Recorded as `ListGrants`, naming the datasets.
    pub async fn list_grants(
        &self,
        ctx: &RequestContext,
        directory: &[Principal],
    ) -> Result<Vec<GrantView>> {
        let mut event = self.recorder.begin(ctx, Action::ListGrants);
        let principal = &ctx.principal;
        let roles = &principal.roles;
        let auditor = roles.contains(&PrincipalRole::Auditor);
        let owner = roles.contains(&PrincipalRole::Owner);
        let consumer =
            roles.contains(&PrincipalRole::Consumer) || roles.contains(&PrincipalRole::Analyst);
        // The engine repeats the role check rather than trust its caller: admins see no grants.
        if !(auditor || owner || consumer) {
            return event
                .refuse(EngineError::RoleNotPermitted("ListGrants"))
                .await;
        }
        let mut views = Vec::new();
        for grant in &self.policy.grants {
            let Some(dataset) = self.policy.dataset(&grant.dataset) else {
                continue;
            };
            let owned = owner && dataset.owner == principal.org;
            for (consumer_org, consumer_logins) in consumers_of(grant, directory) {
                // An org left empty is nobody's own: only auditors and the owner see it.
                let own = consumer && !consumer_org.is_empty() && consumer_org == principal.org;
                if !(auditor || owned || own) {
                    continue;
                }
                let aggregate = grant.aggregate.as_ref();
                let dp = aggregate.and_then(|m| m.dp.as_ref());
                views.push(GrantView {
                    dataset: dataset.id.clone(),
                    owner: dataset.owner.clone(),
                    consumer_org,
                    consumer_logins,
                    modes: [
                        aggregate.map(|_| "aggregate"),
                        grant.template.as_ref().map(|_| "template"),
                        grant.wasm.as_ref().map(|_| "wasm"),
                    ]
                    .into_iter()
                    .flatten()
                    .map(String::from)
                    .collect(),
                    min_units: aggregate.map_or(0, |m| m.min_units),
                    functions: aggregate
                        .iter()
                        .flat_map(|m| m.functions.iter().map(|f| f.as_str().to_string()))
                        .collect(),
                    exact: aggregate.is_some_and(|m| m.answers_exactly(dataset)),
                    epsilon: dp.map_or(0.0, |dp| dp.epsilon),
                    budget_epsilon: dp.map_or(0.0, |dp| dp.budget_epsilon),
                    total_epsilon: dataset.dp_total.map_or(0.0, |t| t.epsilon),
                    columns: grant
                        .wasm
                        .as_ref()
                        .and_then(|w| w.columns.as_ref())
                        .map(|c| c.iter().cloned().collect())
                        .unwrap_or_default(),
                });
            }
        }
        views.sort_by(|a, b| {
            (&a.dataset, &a.consumer_org, &a.consumer_logins).cmp(&(
                &b.dataset,
                &b.consumer_org,
                &b.consumer_logins,
            ))
        });
        event.datasets = views
            .iter()
            .map(|v| v.dataset.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        event.allow().await?;
        Ok(views)
    }
}

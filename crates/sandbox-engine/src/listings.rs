//! Listings: the datasets a caller may use (schemas, roles, levels, modes; never rows), and
//! the SQL catalog Flight SQL clients see. Each is recorded naming what it showed.

use std::collections::BTreeMap;

use arrow::datatypes::SchemaRef;

use crate::codes::Action;
use crate::engine::Engine;
use crate::error::Result;
use crate::types::{ColumnView, DatasetView, RequestContext};

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
}

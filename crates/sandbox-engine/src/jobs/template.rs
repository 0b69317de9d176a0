//! Template runs: a consumer runs an approved template by name; the typed parameters are bound
//! and the query passes the guard and the gate under the template's own mode (an aggregate with
//! its own `min_units`, or scoring for consented entities under a contract) instead of the
//! consumer's ad hoc grant.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use sandbox_policy::{
    AggregateFunction, AggregateMode, EffectiveTemplate, Mode, ParamError, Record, Refusal, Role,
    TemplateOutput,
};
use sandbox_release::{ContractGate, release_contract};
use sandbox_sql::{GrantedDataset, PlannedQuery, PlannedRows, RowScope, placeholder_values};
use tracing::Instrument;

use crate::admission::Submission;
use crate::codes::EngineRule;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::governance::registry::{now, record_value};
use crate::jobs::code::only_consented;
use crate::recorder::Pending;
use crate::types::{Explanation, JobSnapshot, Produced, RequestContext};

/// A template run, planned: an aggregate for the release gate or entity rows for the contract.
enum PlannedRun {
    Aggregate(PlannedQuery),
    Scoring(PlannedRows),
}

impl Engine {
    /// Admission and planning of a run: the approvals, the grants as they stand now, the bound
    /// parameters, and the guard under the template's own mode.
    async fn plan_template_run(
        &self,
        ctx: &RequestContext,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<(EffectiveTemplate, PlannedRun)> {
        let effective = self
            .governance
            .registry()
            .effective_template(&ctx.principal.org, name, now(), |d| {
                self.governance.owner_of(d)
            })
            .map_err(|refusal| refusal_error(&refusal))?;
        let template = &effective.template;
        let bound = template.definition.bind(values).map_err(parameter_error)?;
        let params = placeholder_values(bound);
        let key = self.pseudonym_key(&ctx.principal);
        let planned = match &template.definition.output {
            TemplateOutput::Aggregate { min_units } => {
                let mut granted = HashMap::new();
                for dataset in &template.datasets {
                    let (policy, floor) = self.template_grant(ctx, dataset)?;
                    // The owners reviewed the query text: every function and range filter the
                    // guard can check is allowed; the threshold is the template's.
                    let mode = AggregateMode {
                        min_units: (*min_units).max(floor),
                        functions: AggregateFunction::ALL.into_iter().collect(),
                        filter_measures: policy
                            .columns
                            .iter()
                            .filter(|c| c.role == Role::Measure)
                            .map(|c| c.name.clone())
                            .collect(),
                        expression_arguments: true,
                        exact: true,
                        dp: None,
                    };
                    granted.insert(
                        dataset.clone(),
                        GrantedDataset {
                            policy,
                            aggregate: Some(mode),
                        },
                    );
                }
                PlannedRun::Aggregate(
                    self.sql
                        .plan_with(
                            &template.definition.sql,
                            &granted,
                            &key,
                            Mode::Template,
                            &params,
                        )
                        .await?,
                )
            }
            TemplateOutput::Scoring { contract } => {
                // Only the rows of entities that consented, at the scan: no expression of the
                // template runs on anyone else's row.
                let mut scope = RowScope {
                    consented: Arc::new(self.governance.registry().consented(
                        &ctx.principal.org,
                        &contract.purpose,
                        now(),
                    )),
                    ..RowScope::default()
                };
                for dataset in &template.datasets {
                    let (policy, _) = self.template_grant(ctx, dataset)?;
                    let allowed = self
                        .policy
                        .template_mode(&ctx.principal, dataset)
                        .is_some_and(|m| m.purposes.contains(&contract.purpose));
                    if !allowed {
                        return Err(EngineError::Denied {
                            rule: EngineRule::ModeNotGranted,
                            message: format!(
                                "your template grant on `{dataset}` no longer allows purpose `{}`",
                                contract.purpose
                            ),
                        });
                    }
                    let columns = policy.visible_columns().map(|c| c.name.clone()).collect();
                    scope
                        .datasets
                        .insert(dataset.clone(), (policy.clone(), columns));
                }
                PlannedRun::Scoring(
                    self.sql
                        .plan_rows_with(&template.definition.sql, &scope, &key, &params)
                        .await?,
                )
            }
        };
        Ok((effective, planned))
    }

    /// The dataset's policy and the floor of the caller's template grant on it, as they stand now.
    fn template_grant(
        &self,
        ctx: &RequestContext,
        dataset: &str,
    ) -> Result<(Arc<sandbox_policy::DatasetPolicy>, u64)> {
        let mode = self.policy.template_mode(&ctx.principal, dataset);
        match (mode, self.datasets.get(dataset)) {
            (Some(mode), Some(policy)) => Ok((policy.clone(), mode.min_units)),
            _ => Err(EngineError::Denied {
                rule: EngineRule::ModeNotGranted,
                message: format!(
                    "dataset `{dataset}` is no longer granted to you in template mode"
                ),
            }),
        }
    }

    /// The decision on a template run without running it.
    pub(crate) async fn explain_template(
        &self,
        ctx: &RequestContext,
        event: Pending,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Explanation> {
        let explanation =
            self.plan_template_run(ctx, name, values)
                .await
                .and_then(|(effective, planned)| {
                    let (datasets, columns, min_units, plan, released_schema) = match &planned {
                        PlannedRun::Aggregate(p) => (
                            p.guarded().datasets.clone(),
                            p.guarded().columns.clone(),
                            p.guarded().min_units,
                            p.display_plan(),
                            Some(p.released_schema()?),
                        ),
                        PlannedRun::Scoring(p) => (
                            p.guarded().datasets.clone(),
                            p.guarded().columns.clone(),
                            0,
                            p.guarded().plan.display_indent().to_string(),
                            None,
                        ),
                    };
                    Ok(Explanation {
                        allowed: true,
                        rule: "",
                        message: format!(
                            "allowed: template {} ({} runs left)",
                            effective.template.sha256, effective.runs_left
                        ),
                        datasets,
                        columns,
                        min_units,
                        plan,
                        released_schema,
                        ..Explanation::denied("", "")
                    })
                });
        event.explained(explanation).await
    }

    /// Admits, plans and starts a template run; the run is counted at admission.
    pub(crate) async fn submit_template_run(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: Pending,
        started: Submission,
        name: String,
        values: BTreeMap<String, String>,
    ) -> Result<JobSnapshot> {
        let (effective, planned) = match self
            .plan_template_run(ctx, &name, &values)
            .instrument(tracing::info_span!("plan"))
            .await
        {
            Ok(admitted) => admitted,
            Err(error) => return event.refuse_after(started.elapsed(), error).await,
        };
        let sha256 = effective.template.sha256.clone();
        event.message = format!("template `{name}` ({sha256})");
        // Counted under the lock, so concurrent runs cannot exceed the approved limit.
        let reserved = {
            let mut registry = self.governance.registry();
            let admitted = registry
                .effective_template(&ctx.principal.org, &name, now(), |d| {
                    self.governance.owner_of(d)
                })
                .map_err(|r| refusal_error(&r))
                .and_then(|e| {
                    if e.template.sha256 == sha256 {
                        Ok(())
                    } else {
                        Err(EngineError::invalid(
                            "the template changed while it was admitted; retry",
                        ))
                    }
                });
            if admitted.is_ok() {
                registry.apply(Record::TemplateRun {
                    sha256: sha256.clone(),
                });
            }
            admitted
        };
        if let Err(error) = reserved {
            return event.refuse_after(started.elapsed(), error).await;
        }
        event.record = Some(record_value(&Record::TemplateRun { sha256 }));
        match planned {
            PlannedRun::Aggregate(planned) => {
                self.spawn_aggregate(ctx, event, started, planned).await
            }
            PlannedRun::Scoring(planned) => {
                event.datasets = planned.guarded().datasets.clone();
                event.columns = planned.guarded().columns.clone();
                let TemplateOutput::Scoring { contract } = effective.template.definition.output
                else {
                    unreachable!("a scoring plan comes from a scoring template")
                };
                let consented = Arc::new(self.governance.registry().consented(
                    &ctx.principal.org,
                    &contract.purpose,
                    now(),
                ));
                let key_index = planned.guarded().key_index;
                self.spawn_job(ctx, event, started, move |engine, cancel| async move {
                    let executed = engine
                        .sql
                        .execute_rows(planned, cancel)
                        .instrument(tracing::info_span!("execute"))
                        .await?;
                    let rows_scanned = executed.rows_scanned;
                    let batches = plain_strings(executed.batches)?;
                    let schema = batches.first().map(|b| b.schema());
                    let (rows, rows_withheld) = only_consented(batches, key_index, &consented)?;
                    let _release = tracing::info_span!("release").entered();
                    let released = release_contract(
                        schema,
                        rows,
                        &ContractGate {
                            contract: &contract,
                            consented: &consented,
                        },
                    )?;
                    Ok(Produced {
                        released,
                        rows_scanned,
                        work_units: 0,
                        rows_withheld,
                        guest_log: Vec::new(),
                        code_job: true,
                        dp: None,
                        stored: false,
                    })
                })
                .await
            }
        }
    }
}

/// A refused parameter value: a malformed request (a value not of the declared type, a missing
/// or unknown parameter) is invalid; a well-formed value outside the domain the owners approved
/// is their policy's denial. Both under the one rule, `template-parameters`.
fn parameter_error(error: ParamError) -> EngineError {
    let rule = EngineRule::TemplateParameters;
    let message = error.to_string();
    if error.is_malformed() {
        EngineError::Invalid { rule, message }
    } else {
        EngineError::Denied { rule, message }
    }
}

fn refusal_error(refusal: &Refusal) -> EngineError {
    EngineError::TemplateRefused(refusal.clone())
}

/// String view columns as plain `Utf8`, the contract's string type.
fn plain_strings(batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    batches
        .into_iter()
        .map(|batch| {
            let schema = batch.schema();
            let mut fields = Vec::with_capacity(schema.fields().len());
            let mut columns = Vec::with_capacity(schema.fields().len());
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                if matches!(field.data_type(), DataType::Utf8View | DataType::LargeUtf8) {
                    fields.push(Field::new(
                        field.name(),
                        DataType::Utf8,
                        field.is_nullable(),
                    ));
                    columns.push(cast(column, &DataType::Utf8)?);
                } else {
                    fields.push(field.as_ref().clone());
                    columns.push(column.clone());
                }
            }
            Ok(RecordBatch::try_new(
                Arc::new(Schema::new(fields)),
                columns,
            )?)
        })
        .collect()
}

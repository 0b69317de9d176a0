//! Approved SQL templates: a consumer submits a named, parameterized query; every owner of the
//! data it reads approves its hash with run limits and an expiry; the consumer runs it by name.
//! A run binds the typed parameters and passes the guard and the gate under the template's own
//! mode (an aggregate with its own `min_units`, or scoring for consented entities under a
//! contract) instead of the consumer's ad-hoc grant. Submissions, approvals and runs are journal
//! records, folded into the registry at start like the modules'.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use ring::digest;
use sandbox_audit::AuditEvent;
use sandbox_policy::{
    AggregateFunction, AggregateMode, EffectiveTemplate, Mode, Principal, PrincipalRole, Record,
    Refusal, Registry, Role, TemplateApproval, TemplateDefinition, TemplateOutput, TemplateRecord,
};
use sandbox_release::{ContractGate, release_contract};
use sandbox_sql::{GrantedDataset, PlannedQuery, PlannedRows, RowScope, placeholder_values};
use tracing::Instrument;

use crate::admission::Submission;
use crate::error::{EngineError, Result};
use crate::jobs::{Engine, Explanation, JobSnapshot, Produced, RequestContext};
use crate::modules::{
    DAY, MAX_VALID_DAYS, invalid, now, only_consented, record_value, require_role,
};

/// Templates loaded once at start, as the demo's are: each `*.toml` of `dir` is submitted as
/// `consumer` (whose grants it must fit) and approved by every owner of the data it reads. The
/// approvals name the seed, not a person, as approver (`demo-seed`), and every seeded event's
/// request id starts with `demo-seed`, so an auditor can tell them from an owner's own.
#[derive(Debug, Clone)]
pub struct TemplateSeed {
    pub dir: PathBuf,
    pub consumer: Principal,
    pub max_runs: u64,
    pub valid_days: u64,
}

/// The principal id the seed's submissions and approvals are recorded under.
const SEED_PRINCIPAL: &str = "demo-seed";

/// A template as a caller sees it.
#[derive(Debug, Clone)]
pub struct TemplateView {
    pub record: TemplateRecord,
    /// `approved`, `pending`, `expired` or `exhausted`.
    pub state: String,
    /// Why it cannot run, when it cannot.
    pub reason: String,
    pub approvals: Vec<TemplateApproval>,
    pub runs: u64,
    pub runs_left: u64,
}

/// A template run, planned: an aggregate for the release gate or entity rows for the contract.
enum PlannedRun {
    Aggregate(PlannedQuery),
    Scoring(PlannedRows),
}

impl Engine {
    fn template_view(&self, registry: &Registry, record: &TemplateRecord) -> TemplateView {
        let effective =
            registry.effective_template(&record.org, &record.definition.name, now(), |d| {
                self.owner_of(d)
            });
        // A name resubmitted with other content: the older one can no longer run by name.
        let superseded = effective
            .as_ref()
            .is_ok_and(|e| e.template.sha256 != record.sha256);
        let (state, reason, runs_left) = match &effective {
            _ if superseded => ("superseded", "a newer template has this name".into(), 0),
            Ok(e) => ("approved", String::new(), e.runs_left),
            Err(refusal) => (
                match refusal.template_code() {
                    "approval-expired" => "expired",
                    "runs-exhausted" => "exhausted",
                    _ => "pending",
                },
                refusal.to_string(),
                0,
            ),
        };
        TemplateView {
            record: record.clone(),
            state: state.to_string(),
            reason,
            approvals: registry
                .template_approvals(&record.sha256)
                .cloned()
                .collect(),
            runs: registry.template_runs(&record.sha256),
            runs_left,
        }
    }

    /// Submits a template (TOML). The consumer must hold a template grant on every dataset its
    /// SQL reads, with a floor the template's `min_units` meets, or a purpose its contract serves.
    pub async fn submit_template(&self, ctx: &RequestContext, text: &str) -> Result<TemplateView> {
        let mut event = Self::event(ctx, "SubmitTemplate");
        event.kind = "template".into();
        let outcome = self.check_submission(ctx, text, &mut event);
        let record = self.conclude(event, outcome).await?;
        Ok(self.template_view(&self.registry(), &record))
    }

    fn check_submission(
        &self,
        ctx: &RequestContext,
        text: &str,
        event: &mut AuditEvent,
    ) -> Result<(TemplateRecord, Option<Record>)> {
        require_role(
            ctx,
            &[PrincipalRole::Consumer, PrincipalRole::Analyst],
            "submitting templates",
        )?;
        let definition = TemplateDefinition::from_toml(text).map_err(|m| EngineError::Invalid {
            code: "template-invalid",
            message: m,
        })?;
        event.query = definition.sql.clone();
        let datasets = self.sql.tables_of(&definition.sql)?;
        event.datasets = datasets.clone();
        if datasets.is_empty() {
            return Err(invalid("the template reads no dataset"));
        }
        for dataset in &datasets {
            let Some(mode) = self.policy.template_mode(&ctx.principal, dataset) else {
                return Err(EngineError::Denied {
                    code: "mode-not-granted",
                    message: format!("dataset `{dataset}` is not granted to you in template mode"),
                });
            };
            let fits = match &definition.output {
                TemplateOutput::Aggregate { min_units } => *min_units >= mode.min_units,
                TemplateOutput::Scoring { contract } => mode.purposes.contains(&contract.purpose),
            };
            if !fits {
                return Err(EngineError::Denied {
                    code: "mode-not-granted",
                    message: format!(
                        "your template grant on `{dataset}` needs min_units >= {} for aggregate \
                         templates, and allows scoring only for {:?}",
                        mode.min_units, mode.purposes
                    ),
                });
            }
        }
        if let TemplateOutput::Scoring { contract } = &definition.output {
            let units: BTreeSet<&str> = datasets
                .iter()
                .filter_map(|d| self.policy.dataset(d).map(|p| p.privacy_unit.as_str()))
                .collect();
            if units.len() != 1 || !units.contains(contract.key.as_str()) {
                return Err(invalid(format!(
                    "the contract's key `{}` must be the privacy unit of every dataset read",
                    contract.key
                )));
            }
        }
        let sha256 = hex::encode(digest::digest(
            &digest::SHA256,
            &definition.canonical_bytes(&ctx.principal.org),
        ));
        let record = TemplateRecord {
            sha256,
            definition,
            datasets,
            org: ctx.principal.org.clone(),
            submitted_by: ctx.principal.id.clone(),
            submitted_at: now(),
        };
        event.message = format!("template `{}` ({})", record.definition.name, record.sha256);
        Ok((record.clone(), Some(Record::TemplateSubmitted(record))))
    }

    /// An owner approves a template's hash for the datasets it owns, with run limits and expiry.
    pub async fn approve_template(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        max_runs: u64,
        valid_days: u64,
    ) -> Result<TemplateView> {
        let mut event = Self::event(ctx, "ApproveTemplate");
        event.kind = "template".into();
        event.query = format!("template {sha256}");
        let outcome = (|| {
            require_role(ctx, &[PrincipalRole::Owner], "approving templates")?;
            let record = self.registry().template(sha256).cloned().ok_or_else(|| {
                EngineError::NotFound(format!("template {sha256} was not submitted"))
            })?;
            let owned: Vec<String> = record
                .datasets
                .iter()
                .filter(|d| self.owner_of(d).as_deref() == Some(ctx.principal.org.as_str()))
                .cloned()
                .collect();
            if owned.is_empty() {
                return Err(EngineError::NotPermitted(
                    "your org owns none of the datasets this template reads".into(),
                ));
            }
            if max_runs == 0 {
                return Err(invalid("max_runs must be positive"));
            }
            if valid_days == 0 || valid_days > MAX_VALID_DAYS {
                return Err(invalid(format!(
                    "valid_days must be between 1 and {MAX_VALID_DAYS}"
                )));
            }
            event.datasets = owned.clone();
            let approved_at = now();
            let approval = TemplateApproval {
                sha256: sha256.to_string(),
                org: ctx.principal.org.clone(),
                approved_by: ctx.principal.id.clone(),
                datasets: owned,
                max_runs,
                expires_at: approved_at + valid_days * DAY,
                approved_at,
            };
            event.message = format!("approved for {max_runs} runs over {valid_days} days");
            Ok((record, Some(Record::TemplateApproved(approval))))
        })();
        let record = self.conclude(event, outcome).await?;
        Ok(self.template_view(&self.registry(), &record))
    }

    /// Submits and approves the seed's templates once; a marker record makes it idempotent. A
    /// template the policy in force refuses is skipped with a warning: the seed is a demo
    /// convenience, and a refusal here is the guard working, not a reason to refuse to start.
    pub(crate) async fn seed_templates(&self, seed: &TemplateSeed) -> Result<()> {
        const SOURCE: &str = "templates";
        if self.registry().is_seeded(SOURCE) {
            return Ok(());
        }
        let setup =
            |m: String| EngineError::Setup(format!("template seed {}: {m}", seed.dir.display()));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&seed.dir)
            .map_err(|e| setup(e.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        let request_id = || format!("{SEED_PRINCIPAL}-{}", uuid::Uuid::new_v4());
        let mut seeded = 0u64;
        for file in &files {
            let text = std::fs::read_to_string(file)
                .map_err(|e| setup(format!("{}: {e}", file.display())))?;
            let consumer = RequestContext {
                principal: seed.consumer.clone(),
                request_id: request_id(),
            };
            let view = match self.submit_template(&consumer, &text).await {
                Ok(view) => view,
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "demo template refused");
                    continue;
                }
            };
            let owners: BTreeSet<String> = view
                .record
                .datasets
                .iter()
                .filter_map(|d| self.owner_of(d))
                .collect();
            for owner in owners {
                let approver = RequestContext {
                    principal: Principal {
                        id: SEED_PRINCIPAL.into(),
                        org: owner,
                        roles: BTreeSet::from([PrincipalRole::Owner]),
                    },
                    request_id: request_id(),
                };
                self.approve_template(
                    &approver,
                    &view.record.sha256,
                    seed.max_runs,
                    seed.valid_days,
                )
                .await?;
            }
            seeded += 1;
        }
        let done = Record::SeedLoaded {
            source: SOURCE.into(),
            count: seeded,
        };
        self.journal
            .append(AuditEvent {
                action: "SeedTemplates".into(),
                principal: SEED_PRINCIPAL.into(),
                request_id: request_id(),
                kind: "template".into(),
                message: format!("{seeded} demo templates submitted and approved"),
                record: Some(record_value(&done)),
                ..AuditEvent::default()
            })
            .await?;
        self.registry().apply(done);
        tracing::info!(count = seeded, "demo templates approved");
        Ok(())
    }

    /// Templates the caller submitted (its org's), or, for an owner, those reading its datasets.
    pub async fn list_templates(&self, ctx: &RequestContext) -> Result<Vec<TemplateView>> {
        let event = Self::event(ctx, "ListTemplates");
        let is_owner = ctx.principal.roles.contains(&PrincipalRole::Owner);
        // The registry lock is released before the journal append below.
        let views: Vec<TemplateView> = {
            let registry = self.registry();
            registry
                .templates()
                .filter(|t| {
                    t.org == ctx.principal.org
                        || (is_owner
                            && t.datasets
                                .iter()
                                .any(|d| self.owner_of(d).as_deref() == Some(&ctx.principal.org)))
                })
                .map(|t| self.template_view(&registry, t))
                .collect()
        };
        self.conclude(event, Ok((views, None))).await
    }

    /// Admission and planning of a run: the approvals, the grants as they stand now, the bound
    /// parameters, and the guard under the template's own mode.
    async fn plan_template_run(
        &self,
        ctx: &RequestContext,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<(EffectiveTemplate, PlannedRun)> {
        let effective = self
            .registry()
            .effective_template(&ctx.principal.org, name, now(), |d| self.owner_of(d))
            .map_err(|refusal| refusal_error(&refusal))?;
        let template = &effective.template;
        let bound = template
            .definition
            .bind(values)
            .map_err(|m| EngineError::Invalid {
                code: "template-parameters",
                message: m,
            })?;
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
                    consented: Arc::new(self.registry().consented(
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
                            code: "mode-not-granted",
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
                code: "mode-not-granted",
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
        event: AuditEvent,
        name: &str,
        values: &BTreeMap<String, String>,
    ) -> Result<Explanation> {
        let explanation =
            self.plan_template_run(ctx, name, values)
                .await
                .and_then(|(effective, planned)| {
                    let (datasets, columns, min_units, plan, released_schema) = match &planned {
                        PlannedRun::Aggregate(p) => (
                            p.guarded.datasets.clone(),
                            p.guarded.columns.clone(),
                            p.guarded.min_units,
                            p.display_plan(),
                            Some(p.released_schema()?),
                        ),
                        PlannedRun::Scoring(p) => (
                            p.guarded.datasets.clone(),
                            p.guarded.columns.clone(),
                            0,
                            p.guarded.plan.display_indent().to_string(),
                            None,
                        ),
                    };
                    Ok(Explanation {
                        allowed: true,
                        rule: String::new(),
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
        self.conclude_explanation(event, explanation).await
    }

    /// Admits, plans and starts a template run; the run is counted at admission.
    pub(crate) async fn submit_template_run(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: AuditEvent,
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
            Err(error) => return self.refuse_job(event, started, error).await,
        };
        let sha256 = effective.template.sha256.clone();
        event.message = format!("template `{name}` ({sha256})");
        // Counted under the lock, so concurrent runs cannot exceed the approved limit.
        let reserved = {
            let mut registry = self.registry();
            let admitted = registry
                .effective_template(&ctx.principal.org, &name, now(), |d| self.owner_of(d))
                .map_err(|r| refusal_error(&r))
                .and_then(|e| {
                    if e.template.sha256 == sha256 {
                        Ok(())
                    } else {
                        Err(invalid("the template changed while it was admitted; retry"))
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
            return self.refuse_job(event, started, error).await;
        }
        event.record = Some(record_value(&Record::TemplateRun { sha256 }));
        match planned {
            PlannedRun::Aggregate(planned) => {
                self.spawn_aggregate(ctx, event, started, planned).await
            }
            PlannedRun::Scoring(planned) => {
                event.datasets = planned.guarded.datasets.clone();
                event.columns = planned.guarded.columns.clone();
                let TemplateOutput::Scoring { contract } = effective.template.definition.output
                else {
                    unreachable!("a scoring plan comes from a scoring template")
                };
                let consented = Arc::new(self.registry().consented(
                    &ctx.principal.org,
                    &contract.purpose,
                    now(),
                ));
                let key_index = planned.guarded.key_index;
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

fn refusal_error(refusal: &Refusal) -> EngineError {
    EngineError::Denied {
        code: refusal.template_code(),
        message: refusal.to_string(),
    }
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

//! Templates as governance: a consumer submits a named, parameterized query; every owner of the
//! data it reads approves its hash with run limits and an expiry; listings; the demo's templates
//! seeded once at start. Submissions and approvals are journal records folded into the registry
//! like the modules'. Runs are a job kind ([`crate::jobs::template`]).

use std::collections::BTreeSet;
use std::path::PathBuf;

use ring::digest;
use sandbox_audit::AuditEvent;
use sandbox_policy::{
    Principal, PrincipalRole, Record, Refusal, Registry, TemplateApproval, TemplateDefinition,
    TemplateOutput, TemplateRecord,
};
use sandbox_sql::SqlEngine;

use crate::codes::{Action, EngineRule, JobKind};
use crate::error::{EngineError, Result};
use crate::governance::registry::Governance;
use crate::governance::registry::{
    AwaitingOwner, DAY, MAX_VALID_DAYS, awaiting_owners, now, record_value, require_role,
};
use crate::recorder::Recorder;
use crate::types::{RequestContext, TemplateSeed};

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
    /// The owners whose approval it still waits for (state `pending` only).
    pub awaiting: Vec<AwaitingOwner>,
}

impl Governance {
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
                match refusal {
                    Refusal::Expired { .. } => "expired",
                    Refusal::RunsExhausted { .. } => "exhausted",
                    _ => "pending",
                },
                refusal.to_string(),
                0,
            ),
        };
        let awaiting = awaiting_owners(
            state == "pending",
            registry.template_awaiting(&record.sha256, |d| self.owner_of(d)),
        );
        TemplateView {
            awaiting,
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
    pub(crate) async fn submit_template(
        &self,
        recorder: &Recorder,
        sql: &SqlEngine,
        ctx: &RequestContext,
        text: &str,
    ) -> Result<TemplateView> {
        let mut event = recorder.begin(ctx, Action::SubmitTemplate);
        event.set_kind(JobKind::Template);
        let outcome = self.check_submission(sql, ctx, text, &mut event);
        let record = self.conclude(event, outcome).await?;
        Ok(self.template_view(&self.registry(), &record))
    }

    fn check_submission(
        &self,
        sql: &SqlEngine,
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
            rule: EngineRule::TemplateInvalid,
            message: m,
        })?;
        event.query = definition.sql.clone();
        let datasets = sql.tables_of(&definition.sql)?;
        event.datasets = datasets.clone();
        if datasets.is_empty() {
            return Err(EngineError::invalid("the template reads no dataset"));
        }
        for dataset in &datasets {
            let Some(mode) = self.policy.template_mode(&ctx.principal, dataset) else {
                return Err(EngineError::Denied {
                    rule: EngineRule::ModeNotGranted,
                    message: format!("dataset `{dataset}` is not granted to you in template mode"),
                });
            };
            let fits = match &definition.output {
                TemplateOutput::Aggregate { min_units } => *min_units >= mode.min_units,
                TemplateOutput::Scoring { contract } => mode.purposes.contains(&contract.purpose),
            };
            if !fits {
                return Err(EngineError::Denied {
                    rule: EngineRule::ModeNotGranted,
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
                return Err(EngineError::invalid(format!(
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
    pub(crate) async fn approve_template(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        sha256: &str,
        max_runs: u64,
        valid_days: u64,
    ) -> Result<TemplateView> {
        let mut event = recorder.begin(ctx, Action::ApproveTemplate);
        event.set_kind(JobKind::Template);
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
                return Err(EngineError::invalid("max_runs must be positive"));
            }
            if valid_days == 0 || valid_days > MAX_VALID_DAYS {
                return Err(EngineError::invalid(format!(
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
    pub(crate) async fn seed_templates(
        &self,
        recorder: &Recorder,
        sql: &SqlEngine,
        seed: &TemplateSeed,
    ) -> Result<()> {
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
            let view = match self.submit_template(recorder, sql, &consumer, &text).await {
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
                    recorder,
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
        let mut event = recorder.begin_named(AuditEvent {
            action: Action::SeedTemplates.as_str().into(),
            principal: SEED_PRINCIPAL.into(),
            request_id: request_id(),
            ..AuditEvent::default()
        });
        event.set_kind(JobKind::Template);
        event.message = format!("{seeded} demo templates submitted and approved");
        event.record = Some(record_value(&done));
        event.allow().await?;
        self.registry().apply(done);
        tracing::info!(count = seeded, "demo templates approved");
        Ok(())
    }

    /// Templates the caller submitted (its org's), or, for an owner, those reading its datasets.
    pub(crate) async fn list_templates(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
    ) -> Result<Vec<TemplateView>> {
        let event = recorder.begin(ctx, Action::ListTemplates);
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
}

//! Code jobs and their governance: module upload, owners' approvals and rejections, consents,
//! and the WASM job itself (input in row mode, consent filter, guest, contract gate).
//!
//! Every state change is an audit event carrying a [`Record`]; [`replay`] folds them back into the
//! [`Registry`] at start, so the journal is the system of record for approvals, consents and run
//! counts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::DataType;
use ring::digest;
use sandbox_audit::{AuditEvent, Decision, Journal};
use sandbox_policy::{
    Approval, Consent, ConsentKey, Contract, Effective, ModuleRecord, PrincipalRole, Record,
    Registry, Rejection,
};
use sandbox_release::{ContractGate, release_contract};
use sandbox_sql::{CancellationToken, RowScope};
use tracing::Instrument;

use crate::admission::Submission;
use crate::error::{EngineError, ErrorKind, Result};
use crate::jobs::{Engine, Explanation, JobSnapshot, Produced, RequestContext};

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

/// A module as a caller sees it.
#[derive(Debug, Clone)]
pub struct ModuleView {
    pub record: ModuleRecord,
    /// `approved`, `pending`, `rejected`, `expired` or `exhausted`.
    pub state: String,
    /// Why it may not run, when it may not.
    pub reason: String,
    pub approvals: Vec<Approval>,
    pub runs: u64,
    pub runs_left: u64,
}

/// What an owner approves.
#[derive(Debug, Clone, Default)]
pub struct ApprovalRequest {
    /// Output contract as TOML; `None` for the default scoring contract.
    pub contract_toml: Option<String>,
    pub max_runs: u64,
    pub valid_days: u64,
    /// Columns to allow, as `dataset.column`; `None` for every declared column of the owner's
    /// datasets.
    pub columns: Option<Vec<String>>,
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

pub(crate) fn invalid(message: impl Into<String>) -> EngineError {
    EngineError::Invalid {
        code: "invalid-argument",
        message: message.into(),
    }
}

impl Engine {
    pub(crate) fn owner_of(&self, dataset: &str) -> Option<String> {
        self.policy.dataset(dataset).map(|d| d.owner.clone())
    }

    pub(crate) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry
            .lock()
            .expect("registry lock is never poisoned")
    }

    /// Records a call's terminal event (with its record when it changed state) and applies the
    /// record, or records the refusal. The record is applied only once it is durable.
    pub(crate) async fn conclude<T>(
        &self,
        mut event: AuditEvent,
        outcome: Result<(T, Option<Record>)>,
    ) -> Result<T> {
        match outcome {
            Ok((value, record)) => {
                event.record = record.as_ref().map(record_value);
                self.journal.append(event).await?;
                if let Some(record) = record {
                    self.registry().apply(record);
                }
                Ok(value)
            }
            Err(error) => {
                event.decision = match error.kind() {
                    ErrorKind::PermissionDenied => Decision::PermissionDenied,
                    ErrorKind::Denied => Decision::Deny,
                    _ => Decision::Fail,
                };
                event.rule = error.code();
                event.message = error.to_string();
                self.journal.append(event).await?;
                Err(error)
            }
        }
    }

    fn view(&self, registry: &Registry, module: &ModuleRecord) -> ModuleView {
        let effective =
            registry.effective(&module.sha256, &module.org, now(), |d| self.owner_of(d));
        let (state, reason, runs_left) = match &effective {
            Ok(e) => ("approved", String::new(), e.runs_left),
            Err(refusal) => (
                match refusal.code() {
                    "module-rejected" => "rejected",
                    "approval-expired" => "expired",
                    "runs-exhausted" => "exhausted",
                    _ => "pending",
                },
                refusal.to_string(),
                0,
            ),
        };
        ModuleView {
            record: module.clone(),
            state: state.into(),
            reason,
            approvals: registry.approvals(&module.sha256).cloned().collect(),
            runs: registry.runs(&module.sha256),
            runs_left,
        }
    }

    /// A consumer uploads a module: it must be a valid module of the ABI whose manifest declares
    /// columns the consumer's grants allow in wasm mode for the declared purpose. The bytes are
    /// stored by hash; the module waits for every owner's approval.
    pub async fn upload_module(&self, ctx: &RequestContext, bytes: Vec<u8>) -> Result<ModuleView> {
        let mut event = Self::event(ctx, "UploadModule");
        event.kind = "wasm".into();
        event.query = format!("{} bytes", bytes.len());
        let outcome = self.upload(ctx, bytes, &mut event).await;
        self.conclude(event, outcome).await
    }

    async fn upload(
        &self,
        ctx: &RequestContext,
        bytes: Vec<u8>,
        event: &mut AuditEvent,
    ) -> Result<(ModuleView, Option<Record>)> {
        require_role(ctx, &[PrincipalRole::Consumer], "UploadModule")?;
        if bytes.len() > self.config.max_module_bytes {
            return Err(invalid(format!(
                "module is {} bytes; the limit is {}",
                bytes.len(),
                self.config.max_module_bytes
            )));
        }
        let wasm = self.wasm.clone();
        let (inspected, bytes) = tokio::task::spawn_blocking(move || {
            let inspected = wasm.inspect(&bytes);
            (inspected, bytes)
        })
        .await
        .map_err(|e| EngineError::Setup(format!("module inspection panicked: {e}")))?;
        let inspected = inspected?;
        event.query = format!("module {}", inspected.sha256);
        let manifest = &inspected.manifest;
        // The input is part of what the owners approve: a module declares it in its bytes.
        let input_query = inspected
            .input_query
            .clone()
            .ok_or_else(|| EngineError::Invalid {
                code: "wasm-manifest",
                message: format!(
                    "the module declares no input query: put it in a `{}` custom section (the \
                 guest SDK's `input!`), so that the owners approve what it reads",
                    sandbox_wasm::INPUT_SECTION
                ),
            })?;
        let mut datasets = BTreeSet::new();
        for column in &manifest.input {
            let (dataset, name) = column.split_once('.').ok_or_else(|| {
                invalid(format!(
                    "manifest input `{column}` is not of the form dataset.column"
                ))
            })?;
            let not_granted = || EngineError::Denied {
                code: "module-scope-not-granted",
                message: format!(
                    "your grants do not let code read `{column}` for purpose `{}`",
                    manifest.purpose
                ),
            };
            let policy = self.policy.dataset(dataset).ok_or_else(not_granted)?;
            let visible = policy
                .column(name)
                .is_some_and(|c| c.role != sandbox_policy::Role::Hidden);
            let mode = self.policy.wasm_mode(&ctx.principal, dataset);
            if !visible || !mode.is_some_and(|m| m.allows(name, &manifest.purpose)) {
                return Err(not_granted());
            }
            datasets.insert(dataset.to_string());
        }
        event.datasets = datasets.into_iter().collect();
        event.columns = manifest.input.clone();

        let existing = self.registry().module(&inspected.sha256).cloned();
        if let Some(existing) = existing {
            if existing.org != ctx.principal.org {
                return Err(EngineError::Denied {
                    code: "module-exists",
                    message: "a module with these bytes was uploaded by another org".into(),
                });
            }
            event.message = "already uploaded".into();
            let registry = self.registry();
            return Ok((self.view(&registry, &existing), None));
        }
        store_module(&self.modules_dir(), &inspected.sha256, &bytes).await?;
        let record = ModuleRecord {
            sha256: inspected.sha256.clone(),
            name: manifest.name.clone(),
            purpose: manifest.purpose.clone(),
            input: manifest.input.clone(),
            input_query,
            org: ctx.principal.org.clone(),
            uploaded_by: ctx.principal.id.clone(),
            size: inspected.size as u64,
            uploaded_at: now(),
        };
        event.message = format!(
            "uploaded `{}` ({} bytes, compiled in {} ms)",
            record.name,
            record.size,
            inspected.compile_time.as_millis()
        );
        let view = {
            let mut preview = self.registry().clone();
            preview.apply(Record::ModuleUploaded(record.clone()));
            self.view(&preview, &record)
        };
        Ok((view, Some(Record::ModuleUploaded(record))))
    }

    fn modules_dir(&self) -> std::path::PathBuf {
        self.config.data_dir.join("modules")
    }

    /// An owner approves a module for the owner's datasets among its declared input.
    pub async fn approve_module(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        request: ApprovalRequest,
    ) -> Result<ModuleView> {
        let mut event = Self::event(ctx, "ApproveModule");
        event.kind = "wasm".into();
        event.query = format!("module {sha256}");
        let outcome = self.approve(ctx, sha256, request, &mut event);
        self.conclude(event, outcome).await
    }

    /// The module and the datasets among its input that the caller's org owns.
    fn owned_input(
        &self,
        ctx: &RequestContext,
        sha256: &str,
    ) -> Result<(ModuleRecord, Vec<String>)> {
        require_role(ctx, &[PrincipalRole::Owner], "reviewing modules")?;
        let module =
            self.registry().module(sha256).cloned().ok_or_else(|| {
                EngineError::NotFound(format!("module {sha256} was not uploaded"))
            })?;
        let owned: Vec<String> = module
            .datasets()
            .into_iter()
            .filter(|d| self.owner_of(d).as_deref() == Some(ctx.principal.org.as_str()))
            .collect();
        if owned.is_empty() {
            return Err(EngineError::NotPermitted(
                "your org owns none of the datasets this module reads".into(),
            ));
        }
        Ok((module, owned))
    }

    fn approve(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        request: ApprovalRequest,
        event: &mut AuditEvent,
    ) -> Result<(ModuleView, Option<Record>)> {
        let (module, owned) = self.owned_input(ctx, sha256)?;
        event.datasets = owned.clone();
        let declared: Vec<String> = module
            .input
            .iter()
            .filter(|c| owned.iter().any(|d| c.starts_with(&format!("{d}."))))
            .cloned()
            .collect();
        let columns = match request.columns {
            None => declared,
            Some(columns) => {
                for column in &columns {
                    if !declared.contains(column) {
                        return Err(invalid(format!(
                            "`{column}` is not a declared input of the module among your datasets"
                        )));
                    }
                }
                columns
            }
        };
        event.columns = columns.clone();
        let units: BTreeSet<String> = module
            .datasets()
            .iter()
            .filter_map(|d| self.policy.dataset(d).map(|p| p.privacy_unit.clone()))
            .collect();
        let contract = match &request.contract_toml {
            Some(text) => Contract::from_toml(text).map_err(|m| EngineError::Invalid {
                code: "contract-invalid",
                message: format!("contract: {m}"),
            })?,
            None => {
                let [unit] = units.iter().collect::<Vec<_>>()[..] else {
                    return Err(invalid(
                        "the module's datasets have different privacy units; give a contract",
                    ));
                };
                Contract::default_scoring(unit, &module.purpose)
            }
        };
        if contract.purpose != module.purpose {
            return Err(invalid(format!(
                "the contract's purpose `{}` is not the module's declared purpose `{}`",
                contract.purpose, module.purpose
            )));
        }
        if !units.contains(&contract.key) || units.len() != 1 {
            return Err(invalid(format!(
                "the contract's key `{}` must be the privacy unit of every dataset the module reads",
                contract.key
            )));
        }
        if request.max_runs == 0 {
            return Err(invalid("max_runs must be positive"));
        }
        if request.valid_days == 0 || request.valid_days > MAX_VALID_DAYS {
            return Err(invalid(format!(
                "valid_days must be between 1 and {MAX_VALID_DAYS}"
            )));
        }
        let approved_at = now();
        let approval = Approval {
            sha256: sha256.to_string(),
            org: ctx.principal.org.clone(),
            approved_by: ctx.principal.id.clone(),
            datasets: owned,
            columns,
            contract,
            max_runs: request.max_runs,
            expires_at: approved_at + request.valid_days * DAY,
            approved_at,
        };
        event.message = format!(
            "approved for {} runs over {} days",
            approval.max_runs, request.valid_days
        );
        let record = Record::ModuleApproved(approval);
        let mut preview = self.registry().clone();
        preview.apply(record.clone());
        Ok((self.view(&preview, &module), Some(record)))
    }

    /// An owner rejects a module (withdrawing the org's approval, if any).
    pub async fn reject_module(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        reason: &str,
    ) -> Result<ModuleView> {
        let mut event = Self::event(ctx, "RejectModule");
        event.kind = "wasm".into();
        event.query = format!("module {sha256}");
        let outcome = self.owned_input(ctx, sha256).and_then(|(module, owned)| {
            if reason.trim().is_empty() || reason.len() > 1000 {
                return Err(invalid("give a reason of at most 1000 bytes"));
            }
            event.datasets = owned;
            event.message = reason.to_string();
            let record = Record::ModuleRejected(Rejection {
                sha256: sha256.to_string(),
                org: ctx.principal.org.clone(),
                rejected_by: ctx.principal.id.clone(),
                reason: reason.to_string(),
            });
            let mut preview = self.registry().clone();
            preview.apply(record.clone());
            Ok((self.view(&preview, &module), Some(record)))
        });
        self.conclude(event, outcome).await
    }

    /// Modules the caller may see: a consumer its org's, an owner those reading its datasets,
    /// auditors and admins all.
    pub async fn list_modules(&self, ctx: &RequestContext) -> Result<Vec<ModuleView>> {
        let event = Self::event(ctx, "ListModules");
        let principal = &ctx.principal;
        let views: Vec<ModuleView> = {
            let registry = self.registry();
            registry
                .modules()
                .filter(|m| {
                    principal.has_any_role(&[PrincipalRole::Auditor, PrincipalRole::Admin])
                        || (principal.roles.contains(&PrincipalRole::Consumer)
                            && m.org == principal.org)
                        || (principal.roles.contains(&PrincipalRole::Owner)
                            && m.datasets().iter().any(|d| {
                                self.owner_of(d).as_deref() == Some(principal.org.as_str())
                            }))
                })
                .map(|m| self.view(&registry, m))
                .collect()
        };
        self.conclude(event, Ok((views, None))).await
    }

    /// Records an enterprise's consent to a consumer org for a purpose (admins, on the
    /// enterprise's behalf).
    pub async fn add_consent(
        &self,
        ctx: &RequestContext,
        key: ConsentKey,
        valid_days: u64,
    ) -> Result<Consent> {
        let mut event = Self::event(ctx, "AddConsent");
        event.datasets = vec!["consents".into()];
        event.message = format!("for `{}`, purpose `{}`", key.consumer_org, key.purpose);
        let outcome = (|| {
            require_role(ctx, &[PrincipalRole::Admin], "AddConsent")?;
            check_consent_key(&key)?;
            if valid_days == 0 || valid_days > MAX_VALID_DAYS {
                return Err(invalid(format!(
                    "valid_days must be between 1 and {MAX_VALID_DAYS}"
                )));
            }
            let granted_at = now();
            let consent = Consent {
                key,
                granted_at,
                expires_at: granted_at + valid_days * DAY,
            };
            Ok((consent.clone(), Some(Record::ConsentAdded(consent))))
        })();
        self.conclude(event, outcome).await
    }

    /// Revokes a consent: admins any, a consumer those given to its own org.
    pub async fn revoke_consent(&self, ctx: &RequestContext, key: ConsentKey) -> Result<()> {
        let mut event = Self::event(ctx, "RevokeConsent");
        event.datasets = vec!["consents".into()];
        event.message = format!("for `{}`, purpose `{}`", key.consumer_org, key.purpose);
        let outcome = (|| {
            require_role(
                ctx,
                &[PrincipalRole::Admin, PrincipalRole::Consumer],
                "RevokeConsent",
            )?;
            let is_admin = ctx.principal.roles.contains(&PrincipalRole::Admin);
            if !is_admin && key.consumer_org != ctx.principal.org {
                return Err(EngineError::NotPermitted(
                    "a consumer may only revoke consents given to its own org".into(),
                ));
            }
            if self.registry().consent(&key).is_none() {
                return Err(EngineError::NotFound("no such consent".into()));
            }
            Ok((
                (),
                Some(Record::ConsentRevoked {
                    key,
                    revoked_at: now(),
                }),
            ))
        })();
        self.conclude(event, outcome).await
    }

    /// Consents in force or lapsed (revoked ones are gone): admins see all (or one consumer
    /// org's), a consumer its own org's.
    pub async fn list_consents(
        &self,
        ctx: &RequestContext,
        consumer_org: Option<String>,
    ) -> Result<Vec<Consent>> {
        let mut event = Self::event(ctx, "ListConsents");
        event.datasets = vec!["consents".into()];
        let outcome = (|| {
            require_role(
                ctx,
                &[PrincipalRole::Admin, PrincipalRole::Consumer],
                "ListConsents",
            )?;
            let is_admin = ctx.principal.roles.contains(&PrincipalRole::Admin);
            let org = match (is_admin, consumer_org) {
                (true, filter) => filter,
                (false, Some(other)) if other != ctx.principal.org => {
                    return Err(EngineError::NotPermitted(
                        "a consumer may only list consents given to its own org".into(),
                    ));
                }
                (false, _) => Some(ctx.principal.org.clone()),
            };
            let consents: Vec<Consent> =
                self.registry().consents(org.as_deref()).cloned().collect();
            Ok((consents, None))
        })();
        self.conclude(event, outcome).await
    }

    /// Loads consents from Parquet files into the journal once; a marker record makes it
    /// idempotent across restarts (and across a crash in the middle).
    pub(crate) async fn seed_consents(&self, dir: &Path) -> Result<()> {
        let marker = "consents seeded from the demo data";
        if self.registry().is_seeded("consents") {
            return Ok(());
        }
        let consents = read_consents(dir)?;
        let appends = consents.iter().map(|consent| {
            self.journal.append(AuditEvent {
                action: "AddConsent".into(),
                principal: "sandboxd".into(),
                request_id: uuid::Uuid::new_v4().to_string(),
                datasets: vec!["consents".into()],
                message: "loaded from the demo consents table".into(),
                record: Some(record_value(&Record::ConsentAdded(consent.clone()))),
                ..AuditEvent::default()
            })
        });
        for result in futures::future::join_all(appends).await {
            result?;
        }
        let done = Record::SeedLoaded {
            source: "consents".into(),
            count: consents.len() as u64,
        };
        self.journal
            .append(AuditEvent {
                action: "SeedConsents".into(),
                principal: "sandboxd".into(),
                request_id: uuid::Uuid::new_v4().to_string(),
                datasets: vec!["consents".into()],
                message: format!("{marker}: {}", consents.len()),
                record: Some(record_value(&done)),
                ..AuditEvent::default()
            })
            .await?;
        let mut registry = self.registry();
        for consent in consents {
            registry.apply(Record::ConsentAdded(consent));
        }
        registry.apply(done);
        tracing::info!(count = registry.consents(None).count(), "{marker}");
        Ok(())
    }

    /// Admits a code job: the module's approvals, the grants, and its input: the query the
    /// module declares (the owners approved it with the bytes), which a job may repeat but not
    /// replace. Returns what the run needs: the approvals, the row scope (approved columns, and
    /// only the entities that consented, at the scan) and the input query.
    fn admit_wasm(
        &self,
        ctx: &RequestContext,
        sha256: &str,
        requested_input: &str,
    ) -> Result<(Effective, RowScope, String)> {
        let effective = self
            .registry()
            .effective(sha256, &ctx.principal.org, now(), |d| self.owner_of(d))
            .map_err(|refusal| EngineError::Denied {
                code: refusal.code(),
                message: refusal.to_string(),
            })?;
        let approved_input = self
            .registry()
            .module(sha256)
            .map(|m| m.input_query.clone())
            .unwrap_or_default();
        if approved_input.trim().is_empty() {
            return Err(EngineError::Denied {
                code: "input-not-approved",
                message: "the module declares no input query; upload it again with one, for the \
                          owners to approve"
                    .into(),
            });
        }
        let normalized = |q: &str| q.split_whitespace().collect::<Vec<_>>().join(" ");
        if !requested_input.trim().is_empty()
            && normalized(requested_input) != normalized(&approved_input)
        {
            return Err(EngineError::Denied {
                code: "input-not-approved",
                message: "a code job runs on the input its module declares and the owners \
                          approved; leave the input empty or repeat it exactly"
                    .into(),
            });
        }
        let mut scope = RowScope {
            consented: Arc::new(self.registry().consented(
                &ctx.principal.org,
                &effective.contract.purpose,
                now(),
            )),
            ..RowScope::default()
        };
        for column in &effective.columns {
            let (dataset, name) = column
                .split_once('.')
                .ok_or_else(|| EngineError::Setup(format!("bad approved column `{column}`")))?;
            // The grant may have narrowed since the approval: both must allow the column.
            let allowed = self
                .policy
                .wasm_mode(&ctx.principal, dataset)
                .is_some_and(|m| m.allows(name, &effective.contract.purpose));
            let policy = self
                .datasets
                .get(dataset)
                .filter(|_| allowed)
                .ok_or_else(|| EngineError::Denied {
                    code: "mode-not-granted",
                    message: format!(
                        "your grants no longer let code read `{column}` for purpose `{}`",
                        effective.contract.purpose
                    ),
                })?;
            scope
                .datasets
                .entry(dataset.to_string())
                .or_insert_with(|| (policy.clone(), BTreeSet::new()))
                .1
                .insert(name.to_string());
        }
        Ok((effective, scope, approved_input))
    }

    /// The decision on a code job without running it: approvals, grants and the input query.
    pub(crate) async fn explain_wasm(
        &self,
        ctx: &RequestContext,
        event: AuditEvent,
        sha256: &str,
        input_query: &str,
    ) -> Result<Explanation> {
        let decided = match self.admit_wasm(ctx, sha256, input_query) {
            Ok((effective, scope, input)) => self
                .sql
                .plan_rows(&input, &scope, &self.pseudonym_key(&ctx.principal))
                .await
                .map(|planned| (effective, planned))
                .map_err(EngineError::from),
            Err(error) => Err(error),
        };
        let explanation = decided.map(|(effective, planned)| Explanation {
            allowed: true,
            rule: String::new(),
            message: format!(
                "allowed ({} runs left); the module's approved input reads only the rows of \
                 entities that consented, and the output must meet the approved contract",
                effective.runs_left
            ),
            datasets: planned.guarded.datasets.clone(),
            columns: planned.guarded.columns.clone(),
            min_units: 0,
            plan: planned.guarded.plan.display_indent().to_string(),
            // The approved contract decides a code job's output, not the input query.
            released_schema: None,
            ..Explanation::denied("", "")
        });
        self.conclude_explanation(event, explanation).await
    }

    /// Admits, plans and starts a code job. Denials are recorded as the request's terminal event.
    ///
    /// A run with the same module, parameters and consents as an earlier one gets that run's
    /// stored output, counting no run: the data does not change between them, so repeating a
    /// run can carry nothing new.
    pub(crate) async fn submit_wasm(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: AuditEvent,
        started: Submission,
        sha256: String,
        input_query: String,
        parameters: Vec<u8>,
    ) -> Result<JobSnapshot> {
        let admitted = match self.admit_wasm(ctx, &sha256, &input_query) {
            Ok((effective, scope, input)) => self
                .sql
                .plan_rows(&input, &scope, &self.pseudonym_key(&ctx.principal))
                .instrument(tracing::info_span!("plan"))
                .await
                .map(|planned| (effective, planned, scope.consented))
                .map_err(EngineError::from),
            Err(error) => Err(error),
        };
        let (effective, planned, consented) = match admitted {
            Ok(admitted) => admitted,
            Err(error) => return self.refuse_job(event, started, error).await,
        };
        event.datasets = planned.guarded.datasets.clone();
        event.columns = planned.guarded.columns.clone();
        let key = crate::privacy::question_key(
            "wasm",
            &ctx.principal.org,
            &sha256,
            &format!(
                "{}\0{}",
                hex::encode(&parameters),
                consent_digest(&consented)
            ),
        );
        if let Some(stored) = self.answers.get(&key).await {
            event.message = "the output of an identical earlier run, from the store".into();
            return self
                .spawn_job(ctx, event, started, move |_, _| async move {
                    Ok(Produced {
                        code_job: true,
                        stored: true,
                        ..Produced::sql(stored.released, 0)
                    })
                })
                .await;
        }
        // A slot for the guest, or an immediate refusal: code jobs never queue without bound, and
        // a core stays free for everything else.
        let Ok(slot) = self.guest_slots.clone().try_acquire_owned() else {
            let error = EngineError::Busy(self.config.max_concurrent_guests);
            return self.refuse_job(event, started, error).await;
        };
        // The run is counted at admission (under the lock, so concurrent runs cannot exceed the
        // limit) and recorded with the job's terminal event.
        let reserved = {
            let mut registry = self.registry();
            let admitted =
                registry.effective(&sha256, &ctx.principal.org, now(), |d| self.owner_of(d));
            if admitted.is_ok() {
                registry.apply(Record::ModuleRun {
                    sha256: sha256.clone(),
                });
            }
            admitted
        };
        if let Err(refusal) = reserved {
            let error = EngineError::Denied {
                code: refusal.code(),
                message: refusal.to_string(),
            };
            return self.refuse_job(event, started, error).await;
        }
        event.record = Some(record_value(&Record::ModuleRun {
            sha256: sha256.clone(),
        }));
        let key_index = planned.guarded.key_index;
        self.spawn_job(ctx, event, started, move |engine, cancel| async move {
            // Held until the guest is done.
            let _slot = slot;
            let executed = engine
                .sql
                .execute_rows(planned, cancel.clone())
                .instrument(tracing::info_span!("execute_input"))
                .await?;
            let rows_scanned = executed.rows_scanned;
            // The scan kept only consented entities; this keeps it so whatever the plan did.
            let (input, rows_withheld) = only_consented(executed.batches, key_index, &consented)?;
            let output = engine
                .run_guest(&sha256, input, parameters, cancel)
                .instrument(tracing::info_span!("execute_guest"))
                .await?;
            let _release = tracing::info_span!("release").entered();
            let released = release_contract(
                output.schema,
                output.batches,
                &ContractGate {
                    contract: &effective.contract,
                    consented: &consented,
                },
            )?;
            drop(_release);
            engine
                .answers
                .put(
                    key,
                    crate::privacy::CachedAnswer::exact(released.clone(), String::new()),
                )
                .await;
            Ok(Produced {
                released,
                rows_scanned,
                work_units: output.work_units,
                rows_withheld,
                guest_log: output.logs,
                code_job: true,
                dp: None,
                stored: false,
            })
        })
        .await
    }

    /// Runs the guest on a blocking thread (never an async worker); cancellation reaches it
    /// through the epoch check.
    async fn run_guest(
        &self,
        sha256: &str,
        input: Vec<RecordBatch>,
        parameters: Vec<u8>,
        cancel: CancellationToken,
    ) -> Result<sandbox_wasm::GuestOutput> {
        let flag = Arc::new(AtomicBool::new(false));
        let wasm = self.wasm.clone();
        let path = self.modules_dir().join(format!("{sha256}.wasm"));
        let sha = sha256.to_string();
        let guest_flag = flag.clone();
        let mut handle = tokio::task::spawn_blocking(move || {
            wasm.run(
                &sha,
                || {
                    std::fs::read(&path).map_err(|e| {
                        sandbox_wasm::WasmError::Internal(format!("cannot read the module: {e}"))
                    })
                },
                input,
                &parameters,
                guest_flag,
            )
        });
        let joined = tokio::select! {
            joined = &mut handle => joined,
            () = cancel.cancelled() => {
                flag.store(true, Ordering::Relaxed);
                handle.await
            }
        };
        joined
            .map_err(|e| EngineError::Setup(format!("guest thread failed: {e}")))?
            .map_err(|failure| EngineError::Guest(Box::new(failure)))
    }
}

/// Keeps only input rows whose privacy unit consented: other entities' rows never reach the
/// guest. Returns the rows kept and how many were withheld.
pub(crate) fn only_consented(
    batches: Vec<RecordBatch>,
    key_index: usize,
    consented: &HashSet<String>,
) -> Result<(Vec<RecordBatch>, u64)> {
    let mut kept = Vec::with_capacity(batches.len());
    let mut withheld = 0u64;
    for batch in batches {
        let keys = cast(batch.column(key_index), &DataType::Utf8)?;
        let keys = keys
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| EngineError::Setup("the input key is not a string".into()))?;
        let keep: BooleanArray = keys
            .iter()
            .map(|k| Some(k.is_some_and(|k| consented.contains(k))))
            .collect();
        withheld += (batch.num_rows() - keep.true_count()) as u64;
        if keep.true_count() > 0 {
            kept.push(filter_record_batch(&batch, &keep)?);
        }
    }
    Ok((kept, withheld))
}

/// A digest of a set of consented entities: part of the key of a stored run, so that a consent
/// given or revoked makes the next run a new one.
pub(crate) fn consent_digest(consented: &HashSet<String>) -> String {
    let mut units: Vec<&String> = consented.iter().collect();
    units.sort();
    let mut context = digest::Context::new(&digest::SHA256);
    for unit in units {
        context.update(unit.as_bytes());
        context.update(b"\0");
    }
    hex::encode(context.finish())
}

fn check_consent_key(key: &ConsentKey) -> Result<()> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if valid(&key.unit) && valid(&key.consumer_org) && valid(&key.purpose) {
        Ok(())
    } else {
        Err(invalid(
            "unit, consumer org and purpose are 1-64 letters, digits, `_` or `-`",
        ))
    }
}

/// Writes a module's bytes under its hash, durably.
async fn store_module(dir: &Path, sha256: &str, bytes: &[u8]) -> Result<()> {
    let target = dir.join(format!("{sha256}.wasm"));
    let bytes = bytes.to_vec();
    tokio::task::spawn_blocking(move || crate::secret::write_durable(&target, &bytes, false))
        .await
        .map_err(|e| EngineError::Setup(format!("module store panicked: {e}")))?
        .map_err(|e| EngineError::Setup(format!("cannot store the module: {e}")))
}

/// Consents from the demo `consents` Parquet files (`credit_code`, `consumer_org`, `purpose`,
/// `granted_at`, `expires_at` as dates).
fn read_consents(dir: &Path) -> Result<Vec<Consent>> {
    use datafusion::arrow::array::Date32Array;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let setup = |m: String| EngineError::Setup(format!("consent seed {}: {m}", dir.display()));
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| setup(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    paths.sort();
    let mut consents = BTreeMap::new();
    for path in paths {
        let file = std::fs::File::open(&path).map_err(|e| setup(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| setup(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| setup(e.to_string()))?;
            let text = |name: &str| -> Result<StringArray> {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| setup(format!("no column `{name}`")))?;
                let column = cast(column, &DataType::Utf8)?;
                column
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .cloned()
                    .ok_or_else(|| setup(format!("`{name}` is not text")))
            };
            let date = |name: &str| -> Result<Date32Array> {
                batch
                    .column_by_name(name)
                    .and_then(|c| c.as_any().downcast_ref::<Date32Array>().cloned())
                    .ok_or_else(|| setup(format!("`{name}` is not a date")))
            };
            let (units, orgs, purposes) = (
                text("credit_code")?,
                text("consumer_org")?,
                text("purpose")?,
            );
            let (granted, expires) = (date("granted_at")?, date("expires_at")?);
            for row in 0..batch.num_rows() {
                let seconds = |days: i32| (days.max(0) as u64) * DAY;
                let consent = Consent {
                    key: ConsentKey {
                        unit: units.value(row).to_string(),
                        consumer_org: orgs.value(row).to_string(),
                        purpose: purposes.value(row).to_string(),
                    },
                    granted_at: seconds(granted.value(row)),
                    expires_at: seconds(expires.value(row)),
                };
                consents.insert(consent.key.clone(), consent);
            }
        }
    }
    Ok(consents.into_values().collect())
}

impl From<datafusion::arrow::error::ArrowError> for EngineError {
    fn from(e: datafusion::arrow::error::ArrowError) -> Self {
        EngineError::Setup(format!("arrow: {e}"))
    }
}

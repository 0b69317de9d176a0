//! Modules as governance: a consumer uploads a module (its manifest must fit the consumer's
//! grants for the declared purpose); every owner of a dataset among its declared input approves
//! it (columns, an output contract, run limits, an expiry) or rejects it; listings. Each change
//! is a journal record folded into the registry. Runs are a job kind ([`crate::jobs::code`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use sandbox_audit::AuditEvent;
use sandbox_policy::{
    Approval, Contract, ModuleRecord, PrincipalRole, Record, Refusal, Registry, Rejection,
};
use sandbox_wasm::WasmRuntime;

use crate::codes::{Action, EngineRule, JobKind};
use crate::error::{EngineError, Result};
use crate::governance::registry::Governance;
use crate::governance::registry::{
    AwaitingOwner, DAY, MAX_VALID_DAYS, awaiting_owners, now, require_role,
};
use crate::recorder::Recorder;
use crate::types::RequestContext;

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
    /// The owners whose approval it still waits for (state `pending` only).
    pub awaiting: Vec<AwaitingOwner>,
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

impl Governance {
    fn view(&self, registry: &Registry, module: &ModuleRecord) -> ModuleView {
        let effective =
            registry.effective(&module.sha256, &module.org, now(), |d| self.owner_of(d));
        let (state, reason, runs_left) = match &effective {
            Ok(e) => ("approved", String::new(), e.runs_left),
            Err(refusal) => (
                match refusal {
                    Refusal::Rejected { .. } => "rejected",
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
            registry.module_awaiting(&module.sha256, |d| self.owner_of(d)),
        );
        ModuleView {
            awaiting,
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
    pub(crate) async fn upload_module(
        &self,
        recorder: &Recorder,
        wasm: &Arc<WasmRuntime>,
        ctx: &RequestContext,
        bytes: Vec<u8>,
    ) -> Result<ModuleView> {
        let mut event = recorder.begin(ctx, Action::UploadModule);
        event.set_kind(JobKind::Wasm);
        event.query = format!("{} bytes", bytes.len());
        let outcome = self.upload(wasm, ctx, bytes, &mut event).await;
        self.conclude(event, outcome).await
    }

    async fn upload(
        &self,
        wasm: &Arc<WasmRuntime>,
        ctx: &RequestContext,
        bytes: Vec<u8>,
        event: &mut AuditEvent,
    ) -> Result<(ModuleView, Option<Record>)> {
        require_role(ctx, &[PrincipalRole::Consumer], "UploadModule")?;
        if bytes.len() > self.max_module_bytes {
            return Err(EngineError::invalid(format!(
                "module is {} bytes; the limit is {}",
                bytes.len(),
                self.max_module_bytes
            )));
        }
        let wasm = wasm.clone();
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
                rule: EngineRule::WasmManifest,
                message: format!(
                    "the module declares no input query: put it in a `{}` custom section (the \
                 guest SDK's `input!`), so that the owners approve what it reads",
                    sandbox_wasm::INPUT_SECTION
                ),
            })?;
        let mut datasets = BTreeSet::new();
        for column in &manifest.input {
            let (dataset, name) = column.split_once('.').ok_or_else(|| {
                EngineError::invalid(format!(
                    "manifest input `{column}` is not of the form dataset.column"
                ))
            })?;
            let not_granted = || EngineError::Denied {
                rule: EngineRule::ModuleScopeNotGranted,
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
                    rule: EngineRule::ModuleExists,
                    message: "a module with these bytes was uploaded by another org".into(),
                });
            }
            event.message = "already uploaded".into();
            let registry = self.registry();
            return Ok((self.view(&registry, &existing), None));
        }
        store_module(&self.modules_dir.clone(), &inspected.sha256, &bytes).await?;
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

    /// An owner approves a module for the owner's datasets among its declared input.
    pub(crate) async fn approve_module(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        sha256: &str,
        request: ApprovalRequest,
    ) -> Result<ModuleView> {
        let mut event = recorder.begin(ctx, Action::ApproveModule);
        event.set_kind(JobKind::Wasm);
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
                        return Err(EngineError::invalid(format!(
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
                rule: EngineRule::ContractInvalid,
                message: format!("contract: {m}"),
            })?,
            None => {
                let [unit] = units.iter().collect::<Vec<_>>()[..] else {
                    return Err(EngineError::invalid(
                        "the module's datasets have different privacy units; give a contract",
                    ));
                };
                Contract::default_scoring(unit, &module.purpose)
            }
        };
        if contract.purpose != module.purpose {
            return Err(EngineError::invalid(format!(
                "the contract's purpose `{}` is not the module's declared purpose `{}`",
                contract.purpose, module.purpose
            )));
        }
        if !units.contains(&contract.key) || units.len() != 1 {
            return Err(EngineError::invalid(format!(
                "the contract's key `{}` must be the privacy unit of every dataset the module reads",
                contract.key
            )));
        }
        if request.max_runs == 0 {
            return Err(EngineError::invalid("max_runs must be positive"));
        }
        if request.valid_days == 0 || request.valid_days > MAX_VALID_DAYS {
            return Err(EngineError::invalid(format!(
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
    pub(crate) async fn reject_module(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        sha256: &str,
        reason: &str,
    ) -> Result<ModuleView> {
        let mut event = recorder.begin(ctx, Action::RejectModule);
        event.set_kind(JobKind::Wasm);
        event.query = format!("module {sha256}");
        let outcome = self.owned_input(ctx, sha256).and_then(|(module, owned)| {
            if reason.trim().is_empty() || reason.len() > 1000 {
                return Err(EngineError::invalid("give a reason of at most 1000 bytes"));
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
    pub(crate) async fn list_modules(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
    ) -> Result<Vec<ModuleView>> {
        let event = recorder.begin(ctx, Action::ListModules);
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

//! Code jobs: a WASM module the owners approved runs on its approved input (row mode, only the
//! entities that consented, at the scan), in a guest with fuel, memory and time limits, and its
//! output passes the approved contract's gate.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use datafusion::arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::DataType;
use ring::digest;
use sandbox_policy::{Effective, Record};
use sandbox_release::{ContractGate, release_contract};
use sandbox_sql::{CancellationToken, RowScope};
use tracing::Instrument;

use crate::admission::Submission;
use crate::codes::EngineRule;
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::governance::registry::{now, record_value};
use crate::recorder::Pending;
use crate::types::{Explanation, JobSnapshot, Produced, RequestContext};

impl Engine {
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
            .governance
            .registry()
            .effective(sha256, &ctx.principal.org, now(), |d| {
                self.governance.owner_of(d)
            })
            .map_err(EngineError::ModuleRefused)?;
        let approved_input = self
            .governance
            .registry()
            .module(sha256)
            .map(|m| m.input_query.clone())
            .unwrap_or_default();
        if approved_input.trim().is_empty() {
            return Err(EngineError::Denied {
                rule: EngineRule::InputNotApproved,
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
                rule: EngineRule::InputNotApproved,
                message: "a code job runs on the input its module declares and the owners \
                          approved; leave the input empty or repeat it exactly"
                    .into(),
            });
        }
        let mut scope = RowScope {
            consented: Arc::new(self.governance.registry().consented(
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
                    rule: EngineRule::ModeNotGranted,
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
        event: Pending,
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
            rule: "",
            message: format!(
                "allowed ({} runs left); the module's approved input reads only the rows of \
                 entities that consented, and the output must meet the approved contract",
                effective.runs_left
            ),
            datasets: planned.guarded().datasets.clone(),
            columns: planned.guarded().columns.clone(),
            min_units: 0,
            plan: planned.guarded().plan.display_indent().to_string(),
            // The approved contract decides a code job's output, not the input query.
            released_schema: None,
            ..Explanation::denied("", "")
        });
        event.explained(explanation).await
    }

    /// Admits, plans and starts a code job. Denials are recorded as the request's terminal event.
    ///
    /// A run with the same module, parameters and consents as an earlier one gets that run's
    /// stored output, counting no run: the data does not change between them, so repeating a
    /// run can carry nothing new.
    pub(crate) async fn submit_wasm(
        self: &Arc<Self>,
        ctx: &RequestContext,
        mut event: Pending,
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
            Err(error) => return event.refuse_after(started.elapsed(), error).await,
        };
        event.datasets = planned.guarded().datasets.clone();
        event.columns = planned.guarded().columns.clone();
        let key = crate::answers::question_key(
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
            return event.refuse_after(started.elapsed(), error).await;
        };
        // The run is counted at admission (under the lock, so concurrent runs cannot exceed the
        // limit) and recorded with the job's terminal event.
        let reserved = {
            let mut registry = self.governance.registry();
            let admitted = registry.effective(&sha256, &ctx.principal.org, now(), |d| {
                self.governance.owner_of(d)
            });
            if admitted.is_ok() {
                registry.apply(Record::ModuleRun {
                    sha256: sha256.clone(),
                });
            }
            admitted
        };
        if let Err(refusal) = reserved {
            let error = EngineError::ModuleRefused(refusal);
            return event.refuse_after(started.elapsed(), error).await;
        }
        event.record = Some(record_value(&Record::ModuleRun {
            sha256: sha256.clone(),
        }));
        let key_index = planned.guarded().key_index;
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
            )
            .map_err(|error| EngineError::AfterGuest {
                error: Box::new(error.into()),
                logs: output.logs.clone(),
                work_units: output.work_units,
            })?;
            drop(_release);
            engine
                .answers
                .put(
                    key,
                    crate::answers::CachedAnswer::exact(released.clone(), String::new()),
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
        let path = self.governance.modules_dir.join(format!("{sha256}.wasm"));
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
/// guest, not even in the buffers a filter keeps (string views, dictionaries: the batches are
/// compacted, as released ones are). Returns the rows kept and how many were withheld.
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
            kept.push(sandbox_release::compact(filter_record_batch(
                &batch, &keep,
            )?)?);
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

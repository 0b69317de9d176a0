//! The auditor's calls on the journal: events, signed checkpoints, Merkle proofs and exports.
//! Each is for the auditor role only (checked here as well as in the server's role table) and
//! is itself recorded.

use sandbox_audit::merkle::{Hash, ProofError};
use sandbox_audit::{AuditError, BundleSource, Checkpoint, StoredEvent};
use sandbox_policy::PrincipalRole;

use crate::codes::{Action, EngineRule};
use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::types::RequestContext;

/// An inclusion proof as the engine answers it.
#[derive(Debug, Clone)]
pub struct InclusionAnswer {
    pub seq: u64,
    pub tree_size: u64,
    pub record: Vec<u8>,
    pub hashes: Vec<Hash>,
    pub root: Hash,
    /// The checkpoint signed for this answer, when the caller asked for the current size.
    pub checkpoint: Option<Checkpoint>,
}

/// A consistency proof as the engine answers it.
#[derive(Debug, Clone)]
pub struct ConsistencyAnswer {
    pub first: u64,
    pub second: u64,
    pub hashes: Vec<Hash>,
    pub first_root: Hash,
    pub second_root: Hash,
    pub checkpoint: Option<Checkpoint>,
}

impl Engine {
    /// Runs `read` for an auditor and records the call with the message it returns; refuses
    /// (and records) anyone else.
    async fn for_auditor<T>(
        &self,
        ctx: &RequestContext,
        action: Action,
        read: impl AsyncFnOnce() -> Result<(T, String)>,
    ) -> Result<T> {
        let mut event = self.recorder.begin(ctx, action);
        if !ctx.principal.roles.contains(&PrincipalRole::Auditor) {
            return event
                .refuse(EngineError::RoleNotPermitted(action.as_str()))
                .await;
        }
        match read().await {
            Ok((value, message)) => {
                event.message = message;
                event.allow().await?;
                Ok(value)
            }
            Err(error) => event.refuse(error).await,
        }
    }

    /// Journal events for auditors.
    pub async fn list_events(
        &self,
        ctx: &RequestContext,
        from_seq: u64,
        limit: usize,
        tail: bool,
    ) -> Result<(Vec<StoredEvent>, u64)> {
        self.for_auditor(ctx, Action::ListEvents, async || {
            let events = if tail {
                self.recorder.journal().tail(limit)?
            } else {
                self.recorder.journal().read(from_seq, limit)?
            };
            let message = format!("read {} events", events.len());
            Ok(((events, self.recorder.journal().last_seq()), message))
        })
        .await
    }

    /// The newest signed checkpoint, or a fresh one.
    pub async fn checkpoint(&self, ctx: &RequestContext, fresh: bool) -> Result<Checkpoint> {
        self.for_auditor(ctx, Action::GetCheckpoint, async || {
            let checkpoint = match self.recorder.journal().latest_checkpoint() {
                Some(checkpoint) if !fresh => checkpoint,
                _ => self.recorder.journal().checkpoint_now().await?,
            };
            let message = format!("checkpoint of {} records", checkpoint.size);
            Ok((checkpoint, message))
        })
        .await
    }

    /// The inclusion proof of record `seq` in the tree of `tree_size` records (0: a fresh
    /// checkpoint's size).
    pub async fn inclusion_proof(
        &self,
        ctx: &RequestContext,
        seq: u64,
        tree_size: u64,
    ) -> Result<InclusionAnswer> {
        self.for_auditor(ctx, Action::GetInclusionProof, async || {
            let (tree_size, checkpoint) = self.size_or_checkpoint(tree_size).await?;
            let (record, hashes) = self
                .recorder
                .journal()
                .inclusion_proof(seq, tree_size)
                .map_err(proof_error)?;
            let root = self
                .recorder
                .journal()
                .root(tree_size)
                .map_err(proof_error)?;
            let message = format!("record {seq} in {tree_size}");
            let answer = InclusionAnswer {
                seq,
                tree_size,
                record,
                hashes,
                root,
                checkpoint,
            };
            Ok((answer, message))
        })
        .await
    }

    /// The consistency proof between the trees of `first` and `second` records (0: a fresh
    /// checkpoint's size).
    pub async fn consistency_proof(
        &self,
        ctx: &RequestContext,
        first: u64,
        second: u64,
    ) -> Result<ConsistencyAnswer> {
        self.for_auditor(ctx, Action::GetConsistencyProof, async || {
            let (second, checkpoint) = self.size_or_checkpoint(second).await?;
            let hashes = self
                .recorder
                .journal()
                .consistency_proof(first, second)
                .map_err(proof_error)?;
            let answer = ConsistencyAnswer {
                first,
                second,
                hashes,
                first_root: self.recorder.journal().root(first).map_err(proof_error)?,
                second_root: self.recorder.journal().root(second).map_err(proof_error)?,
                checkpoint,
            };
            Ok((answer, format!("{first} to {second}")))
        })
        .await
    }

    /// The files of a bundle for offline verification, up to a checkpoint signed for it.
    pub async fn export_journal(&self, ctx: &RequestContext) -> Result<BundleSource> {
        self.for_auditor(ctx, Action::ExportJournal, async || {
            let source = self.recorder.journal().bundle_source().await?;
            let message = format!("bundle of {} records", source.checkpoint.size);
            Ok((source, message))
        })
        .await
    }

    async fn size_or_checkpoint(&self, size: u64) -> Result<(u64, Option<Checkpoint>)> {
        Ok(match size {
            0 => {
                let checkpoint = self.recorder.journal().checkpoint_now().await?;
                (checkpoint.size, Some(checkpoint))
            }
            size => (size, None),
        })
    }
}

/// Sizes and sequence numbers the journal does not hold are the caller's mistake.
fn proof_error(error: AuditError) -> EngineError {
    match error {
        AuditError::Proof(ProofError(message)) => EngineError::Invalid {
            rule: EngineRule::ProofOutOfRange,
            message,
        },
        other => other.into(),
    }
}

//! The recorder: where a request's outcome becomes its one terminal journal event.
//!
//! A request gets a [`Pending`] event when the engine takes it up ([`Recorder::begin`]). The
//! handle is consumed exactly once by the request's ending: [`Pending::allow`] for a success,
//! [`Pending::refuse`] for a refusal or failure (its decision from [`decision_of`], the one
//! mapping from an error to the journal's decision), [`Pending::conclude`] for either, or
//! [`Pending::record`] for an ending that set its decision itself (a job's). Every consuming
//! method takes the handle by value, so no path records twice; a handle dropped unconsumed (a
//! path that forgot, or one that panicked) still writes its terminal event, as a failure with the
//! rule `request-abandoned`, from its `Drop`, so no path records nothing.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use sandbox_audit::{Appended, AuditEvent, Decision, Journal};

use crate::codes::{Action, JobKind};
use crate::error::{EngineError, ErrorKind, Result};
use crate::types::{Explanation, RequestContext};

/// The rule of a terminal event written for a request whose handle was dropped unconsumed.
pub const ABANDONED_RULE: &str = "request-abandoned";

/// The journal's decision for a request that ended with `error`: the one mapping.
pub fn decision_of(error: &EngineError) -> Decision {
    match error {
        EngineError::Busy(_) | EngineError::Throttled { .. } => Decision::Throttle,
        _ => match error.kind() {
            ErrorKind::PermissionDenied => Decision::PermissionDenied,
            ErrorKind::Denied => Decision::Deny,
            ErrorKind::Cancelled => Decision::Cancel,
            ErrorKind::Invalid
            | ErrorKind::NotFound
            | ErrorKind::ResourceExhausted
            | ErrorKind::Unavailable
            | ErrorKind::Internal => Decision::Fail,
        },
    }
}

/// Opens requests' events on the journal.
#[derive(Debug, Clone)]
pub(crate) struct Recorder {
    journal: Journal,
}

impl Recorder {
    pub(crate) fn new(journal: Journal) -> Self {
        Recorder { journal }
    }

    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The pending terminal event of a caller's request.
    pub(crate) fn begin(&self, ctx: &RequestContext, action: Action) -> Pending {
        self.pending(AuditEvent {
            action: action.as_str().to_string(),
            principal: ctx.principal.id.clone(),
            org: ctx.principal.org.clone(),
            request_id: ctx.request_id.clone(),
            ..AuditEvent::default()
        })
    }

    /// The pending event of a step the server takes on its own (start, seeding).
    pub(crate) fn begin_system(&self, action: Action) -> Pending {
        self.pending(AuditEvent {
            action: action.as_str().to_string(),
            principal: "sandboxd".into(),
            request_id: uuid::Uuid::new_v4().to_string(),
            ..AuditEvent::default()
        })
    }

    /// The pending event of a request refused before it reached the engine (the server's
    /// authenticate stage names the call itself).
    pub(crate) fn begin_named(&self, event: AuditEvent) -> Pending {
        self.pending(event)
    }

    fn pending(&self, event: AuditEvent) -> Pending {
        Pending {
            event: Some(event),
            journal: self.journal.clone(),
        }
    }
}

/// A request's terminal event, not yet written. Read and fill it through `Deref`; end it with
/// one of the consuming methods.
#[must_use = "a request's terminal event must be recorded: end it with allow, refuse, conclude or record"]
#[derive(Debug)]
pub(crate) struct Pending {
    event: Option<AuditEvent>,
    journal: Journal,
}

impl Pending {
    /// Sets the job kind.
    pub(crate) fn set_kind(&mut self, kind: JobKind) {
        self.kind = kind.as_str().to_string();
    }

    /// Writes the write-ahead `AdmitJob` copy of this job's event (with its record, which moves
    /// there), durable before the job executes. Not terminal: the handle stays pending.
    pub(crate) async fn admit(&mut self, message: &str) -> Result<()> {
        let admitted = AuditEvent {
            action: Action::AdmitJob.as_str().into(),
            message: message.into(),
            record: self.record.take(),
            ..(**self).clone()
        };
        self.journal.append(admitted).await?;
        Ok(())
    }

    /// Records a success.
    pub(crate) async fn allow(mut self) -> Result<Appended> {
        self.decision = Decision::Allow;
        self.record().await
    }

    /// Records the refusal or failure `error` and returns it.
    pub(crate) async fn refuse<T>(mut self, error: EngineError) -> Result<T> {
        self.note_error(&error);
        self.record().await?;
        Err(error)
    }

    /// [`Pending::refuse`] with the time the request took.
    pub(crate) async fn refuse_after<T>(
        mut self,
        elapsed: Duration,
        error: EngineError,
    ) -> Result<T> {
        self.duration_ms = elapsed.as_millis() as u64;
        self.refuse(error).await
    }

    /// Records whichever the outcome is, and returns it.
    pub(crate) async fn conclude<T>(self, outcome: Result<T>) -> Result<T> {
        match outcome {
            Ok(value) => {
                self.allow().await?;
                Ok(value)
            }
            Err(error) => self.refuse(error).await,
        }
    }

    /// Records an explanation: allowed or denied as decided, a refusal by a rule as a denied
    /// explanation, anything else (the decision could not be taken) as the error it is.
    pub(crate) async fn explained(mut self, outcome: Result<Explanation>) -> Result<Explanation> {
        let explanation = match outcome {
            Ok(explanation) => explanation,
            Err(error) if error.kind() == ErrorKind::Denied => {
                Explanation::denied(error.code(), error.to_string())
            }
            Err(error) => return self.refuse(error).await,
        };
        self.decision = if explanation.allowed {
            Decision::Allow
        } else {
            Decision::Deny
        };
        self.rule = explanation.rule.to_string();
        self.datasets = explanation.datasets.clone();
        self.columns = explanation.columns.clone();
        self.record().await?;
        Ok(explanation)
    }

    /// Fills the decision, rule and message of an ending with `error`, without recording.
    pub(crate) fn note_error(&mut self, error: &EngineError) {
        self.decision = decision_of(error);
        self.rule = error.code().to_string();
        self.message = error.to_string();
    }

    /// Records the event as it was filled (its decision included).
    pub(crate) async fn record(mut self) -> Result<Appended> {
        let event = self.event.take().expect("a pending event is recorded once");
        Ok(self.journal.append(event).await?)
    }
}

impl Deref for Pending {
    type Target = AuditEvent;
    fn deref(&self) -> &AuditEvent {
        self.event
            .as_ref()
            .expect("a pending event is recorded once")
    }
}

impl DerefMut for Pending {
    fn deref_mut(&mut self) -> &mut AuditEvent {
        self.event
            .as_mut()
            .expect("a pending event is recorded once")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut event) = self.event.take() else {
            return;
        };
        // Dropped unconsumed: a path forgot its ending, panicked, or its future was dropped (the
        // server runs every call to its end in a task of its own, so not for a client that left).
        // The request still gets its one terminal event, as a failure; a record it carried (a
        // governance change) is not kept: the registry never applied it, so replay must not.
        tracing::error!(action = %event.action, request = %event.request_id,
            "a request ended without recording its outcome; recording it as abandoned");
        event.decision = Decision::Fail;
        event.record = None;
        event.rule = ABANDONED_RULE.into();
        event.message = "the request ended before its outcome was recorded".into();
        let journal = self.journal.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = journal.append(event).await {
                        tracing::error!(%error, "cannot record an abandoned request");
                    }
                });
            }
            Err(_) => {
                if let Err(error) = journal.append_blocking(event) {
                    tracing::error!(%error, "cannot record an abandoned request");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use sandbox_audit::JournalOptions;
    use sandbox_policy::{Principal, PrincipalRole};

    use super::*;
    use crate::codes::EngineRule;

    fn recorder(dir: &std::path::Path) -> Recorder {
        let (journal, _) = Journal::open_with(dir, JournalOptions::default()).expect("opens");
        Recorder::new(journal)
    }

    fn ctx() -> RequestContext {
        RequestContext {
            principal: Principal {
                id: "analyst".into(),
                org: "bank".into(),
                roles: [PrincipalRole::Consumer].into(),
            },
            request_id: "r-1".into(),
        }
    }

    fn events(recorder: &Recorder) -> Vec<AuditEvent> {
        recorder
            .journal()
            .read(1, 100)
            .expect("reads")
            .into_iter()
            .map(|stored| stored.event)
            .collect()
    }

    /// The one mapping, case by case: what each kind of ending is recorded as.
    #[test]
    fn decisions_follow_the_error() {
        let denied = EngineError::denied(EngineRule::InputNotApproved, "no");
        let cases: Vec<(EngineError, Decision)> = vec![
            (denied, Decision::Deny),
            (EngineError::invalid("bad"), Decision::Fail),
            (
                EngineError::RoleNotPermitted("x"),
                Decision::PermissionDenied,
            ),
            (
                EngineError::NotPermitted("x".into()),
                Decision::PermissionDenied,
            ),
            (EngineError::ClientGone, Decision::Cancel),
            (EngineError::Busy(1), Decision::Throttle),
            (
                EngineError::Throttled {
                    rule: EngineRule::TooManyJobs,
                    message: String::new(),
                    retry_after: Duration::ZERO,
                },
                Decision::Throttle,
            ),
            (EngineError::JobNotFound("j".into()), Decision::Fail),
            (EngineError::Setup("x".into()), Decision::Fail),
        ];
        for (error, decision) in cases {
            assert_eq!(decision_of(&error), decision, "{error:?}");
        }
    }

    #[tokio::test]
    async fn each_ending_records_one_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recorder = recorder(dir.path());
        let mut event = recorder.begin(&ctx(), Action::SubmitJob);
        event.set_kind(JobKind::Sql);
        event.admit("admitted").await.expect("admits");
        let refused: Result<()> = event
            .refuse(EngineError::denied(
                EngineRule::InputNotApproved,
                "not approved",
            ))
            .await;
        assert!(refused.is_err());
        recorder
            .begin(&ctx(), Action::GetJob)
            .allow()
            .await
            .expect("records");
        let events = events(&recorder);
        let summary: Vec<(&str, Decision, &str)> = events
            .iter()
            .map(|e| (e.action.as_str(), e.decision, e.rule.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("AdmitJob", Decision::Allow, ""),
                ("SubmitJob", Decision::Deny, "input-not-approved"),
                ("GetJob", Decision::Allow, ""),
            ]
        );
        assert!(
            events
                .iter()
                .all(|e| e.request_id == "r-1" && e.org == "bank")
        );
        assert_eq!(events[1].kind, "sql");
    }

    /// A handle dropped unconsumed (a caller that went away, a path that forgot) still gets its
    /// one terminal event, as abandoned.
    #[tokio::test]
    async fn a_dropped_handle_records_the_request_as_abandoned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let recorder = recorder(dir.path());
        let mut event = recorder.begin(&ctx(), Action::FetchResult);
        event.job_id = "j-1".into();
        drop(event);
        // The drop hands the append to the runtime.
        for _ in 0..100 {
            if !events(&recorder).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events = events(&recorder);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].action, "FetchResult");
        assert_eq!(events[0].decision, Decision::Fail);
        assert_eq!(events[0].rule, ABANDONED_RULE);
        assert_eq!(events[0].job_id, "j-1");
    }
}

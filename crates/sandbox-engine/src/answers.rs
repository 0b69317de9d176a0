//! Released answers by question, in memory and on disk (`<data-dir>/dp-answers/`), so they hold
//! across restarts: under differential privacy shared by every org that asks the same question
//! (a question over a per-org pseudonym is keyed by the org too: its answer shows that org's
//! pseudonyms), exact ones and code runs per org. An identical question gets the stored answer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ring::digest;
use sandbox_release::Released;
use sandbox_release::dp::DpReport;

/// Most answers kept in memory; beyond it the memory starts afresh (they stay on disk).
const MAX_CACHED_ANSWERS: usize = 10_000;

#[derive(Clone)]
pub(crate) struct CachedAnswer {
    pub(crate) released: Released,
    /// The noise of an answer under differential privacy; `None` for an exact one.
    pub(crate) report: Option<DpReport>,
    pub(crate) job_id: String,
}

impl CachedAnswer {
    /// An exact answer to store.
    pub(crate) fn exact(released: Released, job_id: String) -> Self {
        CachedAnswer {
            released,
            report: None,
            job_id,
        }
    }
}

/// What is stored beside an answer's Arrow bytes.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAnswer {
    report: Option<DpReport>,
    job_id: String,
}

/// The key of a question in the answer store: its kind, the org it is scoped to (empty for a
/// question under differential privacy that reads no per-org pseudonym), the rewritten plan, and
/// whatever else decides the answer.
pub(crate) fn question_key(kind: &str, org: &str, plan: &str, extra: &str) -> String {
    hex::encode(digest::digest(
        &digest::SHA256,
        format!("{kind}\0{org}\0{plan}\0{extra}").as_bytes(),
    ))
}

/// Released DP answers by (consumer org, plan digest): in memory, and under
/// `<data-dir>/dp-answers/<key>.arrow` (the released IPC stream) with `<key>.json` (the noise
/// report and the job that paid), written durably, so they outlive a restart.
pub(crate) struct AnswerCache {
    dir: PathBuf,
    answers: Mutex<HashMap<String, CachedAnswer>>,
}

impl AnswerCache {
    pub(crate) fn new(data_dir: &Path) -> Self {
        AnswerCache {
            dir: data_dir.join("dp-answers"),
            answers: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Option<CachedAnswer> {
        if let Some(answer) = self.lock().get(key).cloned() {
            return Some(answer);
        }
        let ipc = tokio::fs::read(self.dir.join(format!("{key}.arrow")))
            .await
            .ok()?;
        let meta = tokio::fs::read(self.dir.join(format!("{key}.json")))
            .await
            .ok()?;
        let stored: StoredAnswer = match serde_json::from_slice(&meta) {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%error, key, "unreadable stored DP answer; answering afresh");
                return None;
            }
        };
        let released = match sandbox_release::dp::reload_answer(&ipc) {
            Ok(released) => released,
            Err(error) => {
                tracing::warn!(%error, key, "unreadable stored DP answer; answering afresh");
                return None;
            }
        };
        let answer = CachedAnswer {
            released,
            report: stored.report,
            job_id: stored.job_id,
        };
        self.remember(key.to_string(), answer.clone());
        Some(answer)
    }

    /// Stores an answer: the Arrow bytes, then its report (an answer without its report is not
    /// read back). A failed write only means a repeat is answered afresh, and paid.
    pub(crate) async fn put(&self, key: String, answer: CachedAnswer) {
        let stored = StoredAnswer {
            report: answer.report.clone(),
            job_id: answer.job_id.clone(),
        };
        let written = match (answer.released.to_ipc_stream(), serde_json::to_vec(&stored)) {
            (Ok(ipc), Ok(meta)) => {
                let (arrow, json) = (
                    self.dir.join(format!("{key}.arrow")),
                    self.dir.join(format!("{key}.json")),
                );
                tokio::task::spawn_blocking(move || {
                    crate::secret::write_durable(&arrow, &ipc, false)?;
                    crate::secret::write_durable(&json, &meta, false)
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
            }
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        if let Err(error) = written {
            tracing::warn!(%error, "cannot store a DP answer; a repeat will be answered afresh");
        }
        self.remember(key, answer);
    }

    fn remember(&self, key: String, answer: CachedAnswer) {
        let mut answers = self.lock();
        if answers.len() >= MAX_CACHED_ANSWERS {
            answers.clear();
        }
        answers.insert(key, answer);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, CachedAnswer>> {
        self.answers
            .lock()
            .expect("answer cache lock is never poisoned")
    }
}

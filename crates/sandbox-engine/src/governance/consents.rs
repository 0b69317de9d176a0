//! Consents: an enterprise's consent to a consumer org for a purpose, added and revoked by
//! admins (a consumer may revoke its own), listed, and seeded once from the demo's Parquet
//! table. Each change is a journal record folded into the registry, and its event names the
//! enterprise (the unit) in its query and message, so an auditor reading the journal sees whose
//! consent changed without decoding the record.

use std::collections::BTreeMap;
use std::path::Path;

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use sandbox_policy::{Consent, ConsentKey, PrincipalRole, Record};

use crate::codes::Action;
use crate::error::{EngineError, Result};
use crate::governance::registry::Governance;
use crate::governance::registry::{DAY, MAX_VALID_DAYS, now, record_value, require_role};
use crate::recorder::Recorder;
use crate::types::RequestContext;

/// Whether a consent covers runs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentStatus {
    /// Granted and not expired: runs for its consumer and purpose see the enterprise's rows.
    Active,
    /// Not in force (lapsed, or not yet begun): it stays listed, and runs skip the enterprise.
    Expired,
}

impl ConsentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsentStatus::Active => "active",
            ConsentStatus::Expired => "expired",
        }
    }
}

/// A consent as a caller sees it: the record and whether it is in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsentView {
    pub consent: Consent,
    pub status: ConsentStatus,
}

impl ConsentView {
    /// Its status at `now`, by the same test the runs use ([`Consent::in_force`]).
    fn at(consent: Consent, now: u64) -> Self {
        let status = if consent.in_force(now) {
            ConsentStatus::Active
        } else {
            ConsentStatus::Expired
        };
        ConsentView { consent, status }
    }
}

/// What a consent event names: the enterprise, the consumer org and the purpose.
fn describe(key: &ConsentKey) -> String {
    format!(
        "consent of unit `{}` to `{}` for `{}`",
        key.unit, key.consumer_org, key.purpose
    )
}

impl Governance {
    /// Records an enterprise's consent to a consumer org for a purpose (admins, on the
    /// enterprise's behalf).
    pub(crate) async fn add_consent(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        key: ConsentKey,
        valid_days: u64,
    ) -> Result<ConsentView> {
        let mut event = recorder.begin(ctx, Action::AddConsent);
        event.datasets = vec!["consents".into()];
        event.query = describe(&key);
        event.message = format!("add the {}", describe(&key));
        let outcome = (|| {
            require_role(ctx, &[PrincipalRole::Admin], "AddConsent")?;
            check_consent_key(&key)?;
            if valid_days == 0 || valid_days > MAX_VALID_DAYS {
                return Err(EngineError::invalid(format!(
                    "valid_days must be between 1 and {MAX_VALID_DAYS}"
                )));
            }
            let granted_at = now();
            let consent = Consent {
                key,
                granted_at,
                expires_at: granted_at + valid_days * DAY,
            };
            Ok((
                ConsentView::at(consent.clone(), granted_at),
                Some(Record::ConsentAdded(consent)),
            ))
        })();
        self.conclude(event, outcome).await
    }

    /// Revokes a consent: admins any, a consumer those given to its own org.
    pub(crate) async fn revoke_consent(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        key: ConsentKey,
    ) -> Result<()> {
        let mut event = recorder.begin(ctx, Action::RevokeConsent);
        event.datasets = vec!["consents".into()];
        // The enterprise is named: an auditor must see whose consent was withdrawn.
        event.query = describe(&key);
        event.message = format!("revoke the {}", describe(&key));
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

    /// Consents in force or not (expired ones stay listed, revoked ones are gone), each with its
    /// status: admins see all (or one consumer org's), a consumer its own org's.
    pub(crate) async fn list_consents(
        &self,
        recorder: &Recorder,
        ctx: &RequestContext,
        consumer_org: Option<String>,
    ) -> Result<Vec<ConsentView>> {
        let mut event = recorder.begin(ctx, Action::ListConsents);
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
            let now = now();
            let consents: Vec<ConsentView> = self
                .registry()
                .consents(org.as_deref())
                .map(|c| ConsentView::at(c.clone(), now))
                .collect();
            Ok((consents, None))
        })();
        self.conclude(event, outcome).await
    }

    /// Loads consents from Parquet files into the journal once; a marker record makes it
    /// idempotent across restarts (and across a crash in the middle).
    pub(crate) async fn seed_consents(&self, recorder: &Recorder, dir: &Path) -> Result<()> {
        let marker = "consents seeded from the demo data";
        if self.registry().is_seeded("consents") {
            return Ok(());
        }
        let consents = read_consents(dir)?;
        let appends = consents.iter().map(|consent| {
            let mut event = recorder.begin_system(Action::AddConsent);
            event.datasets = vec!["consents".into()];
            event.query = describe(&consent.key);
            event.message = "loaded from the demo consents table".into();
            event.record = Some(record_value(&Record::ConsentAdded(consent.clone())));
            event.allow()
        });
        for result in futures::future::join_all(appends).await {
            result?;
        }
        let done = Record::SeedLoaded {
            source: "consents".into(),
            count: consents.len() as u64,
        };
        let mut event = recorder.begin_system(Action::SeedConsents);
        event.datasets = vec!["consents".into()];
        event.message = format!("{marker}: {}", consents.len());
        event.record = Some(record_value(&done));
        event.allow().await?;
        let mut registry = self.registry();
        for consent in consents {
            registry.apply(Record::ConsentAdded(consent));
        }
        registry.apply(done);
        tracing::info!(count = registry.consents(None).count(), "{marker}");
        Ok(())
    }
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
        Err(EngineError::invalid(
            "unit, consumer org and purpose are 1-64 letters, digits, `_` or `-`",
        ))
    }
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

//! Authentication (bearer tokens, stored hashed) and the authorization table of every RPC.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::Context;
use ring::digest;
use sandbox_policy::{Principal, PrincipalRole};
use serde::{Deserialize, Serialize};

/// File of principals with hashed tokens, inside `<data-dir>/credentials/`.
pub const PRINCIPALS_FILE: &str = "principals.toml";

/// Every RPC of the service. Adding an RPC without a row in [`required_roles`] does not compile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rpc {
    SubmitJob,
    GetJob,
    FetchResult,
    CancelJob,
    ListDatasets,
    ExplainJob,
    ListEvents,
    GetCheckpoint,
    GetInclusionProof,
    GetConsistencyProof,
    ExportJournal,
    QueryEvents,
    UploadModule,
    ApproveModule,
    RejectModule,
    ListModules,
    AddConsent,
    RevokeConsent,
    ListConsents,
    SubmitTemplate,
    ApproveTemplate,
    ListTemplates,
    GetBudgets,
    RefreshBudget,
}

impl Rpc {
    pub const ALL: [Rpc; 24] = [
        Rpc::SubmitJob,
        Rpc::GetJob,
        Rpc::FetchResult,
        Rpc::CancelJob,
        Rpc::ListDatasets,
        Rpc::ExplainJob,
        Rpc::ListEvents,
        Rpc::GetCheckpoint,
        Rpc::GetInclusionProof,
        Rpc::GetConsistencyProof,
        Rpc::ExportJournal,
        Rpc::QueryEvents,
        Rpc::UploadModule,
        Rpc::ApproveModule,
        Rpc::RejectModule,
        Rpc::ListModules,
        Rpc::AddConsent,
        Rpc::RevokeConsent,
        Rpc::ListConsents,
        Rpc::SubmitTemplate,
        Rpc::ApproveTemplate,
        Rpc::ListTemplates,
        Rpc::GetBudgets,
        Rpc::RefreshBudget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rpc::SubmitJob => "SubmitJob",
            Rpc::GetJob => "GetJob",
            Rpc::FetchResult => "FetchResult",
            Rpc::CancelJob => "CancelJob",
            Rpc::ListDatasets => "ListDatasets",
            Rpc::ExplainJob => "ExplainJob",
            Rpc::ListEvents => "ListEvents",
            Rpc::GetCheckpoint => "GetCheckpoint",
            Rpc::GetInclusionProof => "GetInclusionProof",
            Rpc::GetConsistencyProof => "GetConsistencyProof",
            Rpc::ExportJournal => "ExportJournal",
            Rpc::QueryEvents => "QueryEvents",
            Rpc::UploadModule => "UploadModule",
            Rpc::ApproveModule => "ApproveModule",
            Rpc::RejectModule => "RejectModule",
            Rpc::ListModules => "ListModules",
            Rpc::AddConsent => "AddConsent",
            Rpc::RevokeConsent => "RevokeConsent",
            Rpc::ListConsents => "ListConsents",
            Rpc::SubmitTemplate => "SubmitTemplate",
            Rpc::ApproveTemplate => "ApproveTemplate",
            Rpc::ListTemplates => "ListTemplates",
            Rpc::GetBudgets => "GetBudgets",
            Rpc::RefreshBudget => "RefreshBudget",
        }
    }
}

/// The roles each RPC requires: one table for the whole service. Auditors and admins never touch
/// data; data consumers never read the journal.
pub fn required_roles(rpc: Rpc) -> &'static [PrincipalRole] {
    use PrincipalRole::*;
    match rpc {
        Rpc::SubmitJob | Rpc::GetJob | Rpc::FetchResult | Rpc::CancelJob | Rpc::ExplainJob => {
            &[Analyst, Consumer]
        }
        Rpc::ListDatasets => &[Analyst, Consumer, Owner],
        Rpc::ListEvents
        | Rpc::GetCheckpoint
        | Rpc::GetInclusionProof
        | Rpc::GetConsistencyProof
        | Rpc::ExportJournal => &[Auditor],
        // Owners see only the events that touched their datasets (the engine filters).
        Rpc::QueryEvents => &[Auditor, Owner],
        Rpc::UploadModule => &[Consumer],
        Rpc::ApproveModule | Rpc::RejectModule => &[Owner],
        // Module metadata (hashes, manifests, approvals), never data.
        Rpc::ListModules => &[Consumer, Owner, Auditor, Admin],
        Rpc::AddConsent => &[Admin],
        Rpc::RevokeConsent | Rpc::ListConsents => &[Consumer, Admin],
        Rpc::SubmitTemplate => &[Analyst, Consumer],
        Rpc::ApproveTemplate => &[Owner],
        // Template text and approvals, never data.
        Rpc::ListTemplates => &[Analyst, Consumer, Owner, Auditor],
        // Figures of spent budgets, never data.
        Rpc::GetBudgets => &[Analyst, Consumer, Owner, Auditor],
        Rpc::RefreshBudget => &[Owner],
    }
}

/// One principal as stored on disk: the token only as its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredPrincipal {
    pub id: String,
    pub org: String,
    pub roles: Vec<String>,
    pub token_sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalsFile {
    #[serde(default)]
    pub principal: Vec<StoredPrincipal>,
}

/// Why a request could not be authenticated. Deliberately coarse: the client learns nothing
/// about which tokens exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    MissingCredentials,
    MalformedCredentials,
    UnknownToken,
}

impl AuthFailure {
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing-credentials",
            AuthFailure::MalformedCredentials => "malformed-credentials",
            AuthFailure::UnknownToken => "unknown-token",
        }
    }
}

/// Maps token hashes to principals.
#[derive(Debug, Default)]
pub struct Authenticator {
    by_token_hash: HashMap<[u8; 32], Principal>,
}

impl Authenticator {
    /// Loads `<credentials>/principals.toml`.
    pub fn load(credentials_dir: &Path) -> anyhow::Result<Self> {
        let path = credentials_dir.join(PRINCIPALS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read principals from {}", path.display()))?;
        let file: PrincipalsFile =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        let mut by_token_hash = HashMap::new();
        for stored in file.principal {
            let roles = stored
                .roles
                .iter()
                .map(|r| r.parse::<PrincipalRole>())
                .collect::<Result<BTreeSet<_>, _>>()
                .map_err(|e| anyhow::anyhow!("principal `{}`: {e}", stored.id))?;
            let hash: [u8; 32] = hex::decode(&stored.token_sha256)
                .ok()
                .and_then(|h| h.try_into().ok())
                .with_context(|| {
                    format!(
                        "principal `{}`: token_sha256 is not 32 hex bytes",
                        stored.id
                    )
                })?;
            let principal = Principal {
                id: stored.id,
                org: stored.org,
                roles,
            };
            if by_token_hash.insert(hash, principal).is_some() {
                anyhow::bail!("two principals share a token in {}", path.display());
            }
        }
        Ok(Authenticator { by_token_hash })
    }

    /// The principal for an `authorization` header value.
    /// The principal with this id, if one has credentials.
    pub fn principal_named(&self, id: &str) -> Option<Principal> {
        self.by_token_hash.values().find(|p| p.id == id).cloned()
    }

    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthFailure> {
        let value = authorization.ok_or(AuthFailure::MissingCredentials)?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(AuthFailure::MalformedCredentials)?;
        self.by_token_hash
            .get(&token_hash(token))
            .cloned()
            .ok_or(AuthFailure::UnknownToken)
    }
}

pub fn token_hash(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every RPC x every role: the expected matrix, written out so a change to the table is a
    /// deliberate change here too.
    #[test]
    fn authorization_matrix() {
        use PrincipalRole::*;
        let expected: &[(Rpc, &[PrincipalRole])] = &[
            (Rpc::SubmitJob, &[Analyst, Consumer]),
            (Rpc::GetJob, &[Analyst, Consumer]),
            (Rpc::FetchResult, &[Analyst, Consumer]),
            (Rpc::CancelJob, &[Analyst, Consumer]),
            (Rpc::ExplainJob, &[Analyst, Consumer]),
            (Rpc::ListDatasets, &[Analyst, Consumer, Owner]),
            (Rpc::ListEvents, &[Auditor]),
            (Rpc::GetCheckpoint, &[Auditor]),
            (Rpc::GetInclusionProof, &[Auditor]),
            (Rpc::GetConsistencyProof, &[Auditor]),
            (Rpc::ExportJournal, &[Auditor]),
            (Rpc::QueryEvents, &[Auditor, Owner]),
            (Rpc::UploadModule, &[Consumer]),
            (Rpc::ApproveModule, &[Owner]),
            (Rpc::RejectModule, &[Owner]),
            (Rpc::ListModules, &[Consumer, Owner, Auditor, Admin]),
            (Rpc::AddConsent, &[Admin]),
            (Rpc::RevokeConsent, &[Consumer, Admin]),
            (Rpc::ListConsents, &[Consumer, Admin]),
            (Rpc::SubmitTemplate, &[Analyst, Consumer]),
            (Rpc::ApproveTemplate, &[Owner]),
            (Rpc::ListTemplates, &[Analyst, Consumer, Owner, Auditor]),
            (Rpc::GetBudgets, &[Analyst, Consumer, Owner, Auditor]),
            (Rpc::RefreshBudget, &[Owner]),
        ];
        assert_eq!(expected.len(), Rpc::ALL.len());
        for rpc in Rpc::ALL {
            let allowed = expected
                .iter()
                .find(|(r, _)| *r == rpc)
                .map(|(_, roles)| *roles)
                .expect("every RPC has a row");
            for role in PrincipalRole::ALL {
                assert_eq!(
                    required_roles(rpc).contains(&role),
                    allowed.contains(&role),
                    "{} for {}",
                    rpc.name(),
                    role.as_str()
                );
            }
        }
    }

    #[test]
    fn bearer_parsing_is_strict() {
        let auth = Authenticator::default();
        assert_eq!(
            auth.authenticate(None),
            Err(AuthFailure::MissingCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("Basic abc")),
            Err(AuthFailure::MalformedCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("Bearer ")),
            Err(AuthFailure::MalformedCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("Bearer nope")),
            Err(AuthFailure::UnknownToken)
        );
    }
}

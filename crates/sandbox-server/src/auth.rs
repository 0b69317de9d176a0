//! Authentication (bearer tokens stored hashed, with expiry; verified client certificates; a deny
//! list re-read on change) and the authorization table of every RPC.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

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
    WhoAmI,
    ListGrants,
    // Arrow Flight SQL (`flight.rs`): the same engine calls, reached through Flight.
    FlightHandshake,
    FlightGetSqlInfo,
    FlightGetCatalog,
    FlightPrepare,
    FlightClosePrepared,
    FlightExecute,
    FlightFetch,
    /// Flight's `CloseSession` action, which ADBC sends when a connection closes.
    FlightCloseSession,
    /// Any other Flight action: refused as unknown, after the caller is known.
    FlightOtherAction,
}

impl Rpc {
    pub const ALL: [Rpc; 35] = [
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
        Rpc::WhoAmI,
        Rpc::ListGrants,
        Rpc::FlightHandshake,
        Rpc::FlightGetSqlInfo,
        Rpc::FlightGetCatalog,
        Rpc::FlightPrepare,
        Rpc::FlightClosePrepared,
        Rpc::FlightExecute,
        Rpc::FlightFetch,
        Rpc::FlightCloseSession,
        Rpc::FlightOtherAction,
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
            Rpc::WhoAmI => "WhoAmI",
            Rpc::ListGrants => "ListGrants",
            Rpc::FlightHandshake => "FlightSql.Handshake",
            Rpc::FlightGetSqlInfo => "FlightSql.GetSqlInfo",
            Rpc::FlightGetCatalog => "FlightSql.GetCatalog",
            Rpc::FlightPrepare => "FlightSql.CreatePreparedStatement",
            Rpc::FlightClosePrepared => "FlightSql.ClosePreparedStatement",
            Rpc::FlightExecute => "FlightSql.GetFlightInfo",
            Rpc::FlightFetch => "FlightSql.DoGet",
            Rpc::FlightCloseSession => "FlightSql.CloseSession",
            Rpc::FlightOtherAction => "FlightSql.DoAction",
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
        // Every authenticated caller may ask who it is.
        Rpc::WhoAmI => &[Analyst, Consumer, Owner, Auditor, Admin],
        // Grants are policy, never data; the engine narrows them to the caller's view.
        Rpc::ListGrants => &[Analyst, Consumer, Owner, Auditor],
        // Flight SQL is for those who run SQL, and for owners browsing the catalog: the same
        // roles as the native calls each one stands for.
        // Closing a session and asking for an action the server lacks are open to whoever may
        // connect (the handshake's roles).
        Rpc::FlightHandshake
        | Rpc::FlightGetSqlInfo
        | Rpc::FlightGetCatalog
        | Rpc::FlightCloseSession
        | Rpc::FlightOtherAction => &[Analyst, Consumer, Owner],
        Rpc::FlightPrepare | Rpc::FlightClosePrepared | Rpc::FlightExecute | Rpc::FlightFetch => {
            &[Analyst, Consumer]
        }
    }
}

/// An `authorization` header: a bearer token, or HTTP basic credentials whose user is the
/// principal's name and whose password is its token (what Flight SQL clients send to the
/// handshake).
#[derive(Debug, PartialEq, Eq)]
pub enum Credentials {
    Bearer(String),
    Basic { user: String, token: String },
}

/// Longest token accepted; real ones are 64 hex digits.
const MAX_TOKEN_LEN: usize = 256;

impl Credentials {
    pub fn parse(value: &str) -> Result<Credentials, AuthFailure> {
        let usable = |t: &str| !t.is_empty() && t.len() <= MAX_TOKEN_LEN;
        let malformed = |why| Err(AuthFailure::MalformedCredentials(why));
        if let Some(token) = value.strip_prefix("Bearer ").map(str::trim) {
            return match usable(token) {
                true => Ok(Credentials::Bearer(token.to_string())),
                false => malformed(Malformed::TokenLength),
            };
        }
        let Some(encoded) = value.strip_prefix("Basic ").map(str::trim) else {
            return malformed(Malformed::Scheme);
        };
        if encoded.len() > 4 * MAX_TOKEN_LEN {
            return malformed(Malformed::TokenLength);
        }
        use base64::Engine as _;
        // Padded or not: Go clients (ADBC) send it unpadded.
        const BASIC: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let decoded = BASIC
            .decode(encoded)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        let Some((user, token)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
            return malformed(Malformed::Basic);
        };
        if user.is_empty() {
            return malformed(Malformed::Basic);
        }
        if !usable(token) {
            return malformed(Malformed::TokenLength);
        }
        Ok(Credentials::Basic {
            user: user.to_string(),
            token: token.to_string(),
        })
    }

    /// The token, whichever form carried it.
    pub fn token(&self) -> &str {
        match self {
            Credentials::Bearer(token) | Credentials::Basic { token, .. } => token,
        }
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
    /// When the token stops working (RFC 3339, UTC). Absent: it does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalsFile {
    #[serde(default)]
    pub principal: Vec<StoredPrincipal>,
}

/// File of revoked credentials, inside `<data-dir>/credentials/`: re-read whenever it changes,
/// so a revocation takes effect on the next request without a restart.
pub const REVOKED_FILE: &str = "revoked.toml";

/// The deny list: credentials refused even though they are otherwise valid.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenyList {
    /// Every credential of these principals (tokens and certificates).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Tokens, by the SHA-256 (hex) of the token text.
    #[serde(default)]
    pub token_sha256: Vec<String>,
    /// Client certificates, by the SHA-256 (hex) of their DER bytes.
    #[serde(default)]
    pub certificate_sha256: Vec<String>,
}

impl DenyList {
    fn denies_principal(&self, id: &str) -> bool {
        self.principals.iter().any(|p| p == id)
    }

    fn denies(list: &[String], hash: &[u8; 32]) -> bool {
        let hash = hex::encode(hash);
        list.iter().any(|h| h.eq_ignore_ascii_case(&hash))
    }
}

/// Why a request could not be authenticated. Each message says what was wrong with what the
/// caller presented and what fixes it; none names anything the caller did not present (no other
/// principal, no hint of which tokens exist), so an unknown token is only "not known".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error(
        "no credentials: send a bearer token (`authorization: Bearer <token>`; the CLI's --as NAME \
         or --token-file F) or, over TLS, a client certificate"
    )]
    MissingCredentials,
    #[error("{0}")]
    MalformedCredentials(Malformed),
    /// A token no principal holds, sent as a bearer token or (`basic`) as the password of basic
    /// credentials.
    #[error("{}", if *basic {
        "the password is not a token known to this server: log in with the user's token as the \
         password (tokens are under <data-dir>/credentials/)"
    } else {
        "the bearer token is not known to this server: check --as/--token-file (tokens are under \
         <data-dir>/credentials/)"
    })]
    UnknownToken { basic: bool },
    #[error(
        "the token of `{principal}` expired at {}: ask an admin to issue a new one",
        humantime::format_rfc3339_seconds(*.expired_at)
    )]
    ExpiredToken {
        principal: String,
        expired_at: SystemTime,
    },
    /// The token, the certificate or the principal is on the deny list.
    #[error("{0}")]
    Revoked(Revoked),
    /// A certificate our CA signed, naming no principal.
    #[error(
        "the client certificate names `{name}`, which is no principal of this server: present a \
         certificate issued for a principal, or a bearer token"
    )]
    UnknownCertificate { name: String },
    /// Two credentials naming different principals.
    #[error("{0}")]
    CredentialMismatch(Mismatch),
    /// The deny list cannot be read: nobody is let in until it can (fail closed).
    #[error(
        "the server cannot read its deny list (credentials/revoked.toml), so it refuses every \
         request until an operator repairs it"
    )]
    DenyListUnreadable,
}

/// What is wrong with credentials that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error(
        "the authorization header is neither `Bearer <token>` nor `Basic <base64 of user:token>`"
    )]
    Scheme,
    #[error("the Basic credentials are not the base64 of `user:token` with a user name")]
    Basic,
    #[error("the token is empty or longer than {MAX_TOKEN_LEN} characters")]
    TokenLength,
    #[error(
        "the client certificate's subject has no single common name (CN) to name its principal"
    )]
    CertificateName,
}

/// Which presented credential the deny list names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("the bearer token was revoked: ask an admin to issue a new one")]
    Token,
    #[error("the client certificate was revoked: ask an admin to issue a new one")]
    Certificate,
    #[error("every credential of `{0}` was revoked: ask an admin why, and for new ones")]
    Principal(String),
}

/// A user name the caller sent, as a refusal quotes it (and the journal keeps it): control
/// characters escaped, at most 64 characters, so that it can neither draw on an auditor's
/// terminal nor fill the journal.
fn shown_user(user: &str) -> String {
    let mut shown: String = user
        .chars()
        .take(64)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if user.chars().count() > 64 {
        shown.push('…');
    }
    shown
}

/// Two credentials that name different principals.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error(
        "the bearer token names principal `{token}` but the client certificate names \
         `{certificate}`: present one principal's credentials"
    )]
    TokenAndCertificate { token: String, certificate: String },
    /// Basic credentials whose user is not the token's principal (Flight SQL's user and
    /// password).
    #[error(
        "the user name `{user}` is not the principal of its password's token (`{token}`): log in \
         as the token's principal, or with the user's own token"
    )]
    UserAndToken { user: String, token: String },
}

impl AuthFailure {
    pub fn code(&self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing-credentials",
            AuthFailure::MalformedCredentials(_) => "malformed-credentials",
            AuthFailure::UnknownToken { .. } => "unknown-token",
            AuthFailure::ExpiredToken { .. } => "expired-token",
            AuthFailure::Revoked(_) => "revoked-credential",
            AuthFailure::UnknownCertificate { .. } => "unknown-certificate",
            AuthFailure::CredentialMismatch(_) => "credential-mismatch",
            AuthFailure::DenyListUnreadable => "deny-list-unreadable",
        }
    }
}

/// How many hex digits of a SHA-256 name a presented credential in the journal: enough to tell
/// credentials apart and to find a token by its stored hash, far too few to stand in for it.
const PRESENTED_HEX: usize = 12;

/// What a refused caller presented, as the journal records it in place of a principal (none was
/// established): `token:<first 12 hex of the token's SHA-256>` for an `authorization` header
/// that carries a token, `authorization:<12 hex of the header's SHA-256>` for one that cannot be
/// read, `cert:<subject CN>` for a client certificate (`cert:sha256:<12 hex of its DER>` when its
/// subject names no single plain CN), joined by `,` when both; empty when nothing was presented.
/// Never the secret itself.
pub fn presented(authorization: Option<&str>, client_certificate: Option<&[u8]>) -> String {
    let prefix = |hash: [u8; 32]| hex::encode(&hash[..PRESENTED_HEX / 2]);
    let mut parts = Vec::new();
    if let Some(value) = authorization {
        parts.push(match Credentials::parse(value) {
            Ok(credentials) => format!("token:{}", prefix(token_hash(credentials.token()))),
            Err(_) => format!("authorization:{}", prefix(sha256(value.as_bytes()))),
        });
    }
    if let Some(der) = client_certificate {
        // A name the CA signed, but kept to what a principal id looks like: the journal is
        // read by people and by audit SQL.
        let plain = |name: &String| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.@".contains(c))
        };
        parts.push(match crate::tls::subject_name(der).filter(plain) {
            Some(name) => format!("cert:{name}"),
            None => format!("cert:sha256:{}", prefix(sha256(der))),
        });
    }
    parts.join(",")
}

/// A principal with its token's expiry.
#[derive(Debug, Clone)]
struct Known {
    principal: Principal,
    token_expires_at: Option<SystemTime>,
}

/// The deny list as last read, and the file state it was read at.
#[derive(Debug)]
struct Revocations {
    /// Modification time and length of the file when read; `None`: the file did not exist.
    stamp: Option<(SystemTime, u64)>,
    list: Result<Arc<DenyList>, String>,
}

/// Maps token hashes and certificate subjects to principals, minus the deny list.
#[derive(Debug)]
pub struct Authenticator {
    by_token_hash: HashMap<[u8; 32], Known>,
    /// Where the deny list lives; `None` for an authenticator without one (unit tests).
    revoked_path: Option<PathBuf>,
    revocations: Mutex<Revocations>,
}

impl Default for Authenticator {
    fn default() -> Self {
        Authenticator {
            by_token_hash: HashMap::new(),
            revoked_path: None,
            revocations: Mutex::new(Revocations {
                stamp: None,
                list: Ok(Arc::default()),
            }),
        }
    }
}

impl Authenticator {
    /// Loads `<credentials>/principals.toml`; the deny list beside it is read on use.
    pub fn load(credentials_dir: &Path) -> anyhow::Result<Self> {
        let path = credentials_dir.join(PRINCIPALS_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read principals from {}", path.display()))?;
        let file: PrincipalsFile =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        let mut by_token_hash = HashMap::new();
        for stored in file.principal {
            // The journal names refused credentials `token:…` and `cert:…`, joined by `,`: no
            // principal may look like one.
            if stored.id.is_empty() || stored.id.contains([':', ',']) {
                anyhow::bail!(
                    "principal `{}` in {}: an id is not empty and holds no `:` or `,`",
                    stored.id,
                    path.display()
                );
            }
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
            let token_expires_at = stored
                .token_expires_at
                .as_deref()
                .map(humantime::parse_rfc3339_weak)
                .transpose()
                .with_context(|| {
                    format!(
                        "principal `{}`: token_expires_at is not an RFC 3339 time",
                        stored.id
                    )
                })?;
            let known = Known {
                principal: Principal {
                    id: stored.id,
                    org: stored.org,
                    roles,
                },
                token_expires_at,
            };
            if by_token_hash.insert(hash, known).is_some() {
                anyhow::bail!("two principals share a token in {}", path.display());
            }
        }
        let authenticator = Authenticator {
            by_token_hash,
            revoked_path: Some(credentials_dir.join(REVOKED_FILE)),
            ..Authenticator::default()
        };
        // A deny list that does not parse stops the start, not only every request.
        authenticator
            .deny_list()
            .map_err(|message| anyhow::anyhow!(message))?;
        Ok(authenticator)
    }

    /// The principal with this id, if one has credentials.
    pub fn principal_named(&self, id: &str) -> Option<Principal> {
        self.by_token_hash
            .values()
            .find(|k| k.principal.id == id)
            .map(|k| k.principal.clone())
    }

    /// When the token in an `authorization` value stops working: `None` for a header that names
    /// no known token or a token without expiry. Only for describing an authenticated call
    /// (`WhoAmI`); it decides nothing.
    pub fn token_expires_at(&self, authorization: &str) -> Option<SystemTime> {
        let credentials = Credentials::parse(authorization).ok()?;
        self.by_token_hash
            .get(&token_hash(credentials.token()))?
            .token_expires_at
    }

    /// The ids of every principal with credentials.
    pub fn principal_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .by_token_hash
            .values()
            .map(|k| k.principal.id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// The principal of a request: from its verified client certificate (the subject's common
    /// name names the principal), its bearer token, or both (then they must agree). Expired,
    /// revoked and mismatched credentials are refused.
    pub fn authenticate_request(
        &self,
        authorization: Option<&str>,
        client_certificate: Option<&[u8]>,
    ) -> Result<Principal, AuthFailure> {
        let deny = self
            .deny_list()
            .map_err(|_| AuthFailure::DenyListUnreadable)?;
        let from_certificate = client_certificate
            .map(|der| {
                if DenyList::denies(&deny.certificate_sha256, &sha256(der)) {
                    return Err(AuthFailure::Revoked(Revoked::Certificate));
                }
                let name = crate::tls::subject_name(der).ok_or(
                    AuthFailure::MalformedCredentials(Malformed::CertificateName),
                )?;
                self.principal_named(&name)
                    .ok_or(AuthFailure::UnknownCertificate { name })
            })
            .transpose()?;
        let from_token = match (authorization, &from_certificate) {
            (None, Some(_)) => None,
            (authorization, _) => Some(self.authenticate_token(authorization, &deny)?),
        };
        let principal = match (from_certificate, from_token) {
            (Some(certificate), Some(token)) if certificate.id != token.id => {
                return Err(AuthFailure::CredentialMismatch(
                    Mismatch::TokenAndCertificate {
                        token: token.id,
                        certificate: certificate.id,
                    },
                ));
            }
            (Some(p), _) | (None, Some(p)) => p,
            (None, None) => return Err(AuthFailure::MissingCredentials),
        };
        if deny.denies_principal(&principal.id) {
            return Err(AuthFailure::Revoked(Revoked::Principal(principal.id)));
        }
        Ok(principal)
    }

    /// The principal for an `authorization` header value (no certificate).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthFailure> {
        self.authenticate_request(authorization, None)
    }

    fn authenticate_token(
        &self,
        authorization: Option<&str>,
        deny: &DenyList,
    ) -> Result<Principal, AuthFailure> {
        let value = authorization.ok_or(AuthFailure::MissingCredentials)?;
        let credentials = Credentials::parse(value)?;
        let hash = token_hash(credentials.token());
        let known = self
            .by_token_hash
            .get(&hash)
            .ok_or(AuthFailure::UnknownToken {
                basic: matches!(credentials, Credentials::Basic { .. }),
            })?;
        // A revoked or expired token is refused as such before anything else is said of it:
        // its holder learns no more than that (fresh-attacker round of issue 18).
        if DenyList::denies(&deny.token_sha256, &hash) {
            return Err(AuthFailure::Revoked(Revoked::Token));
        }
        if deny.denies_principal(&known.principal.id) {
            return Err(AuthFailure::Revoked(Revoked::Principal(
                known.principal.id.clone(),
            )));
        }
        if let Some(at) = known.token_expires_at
            && SystemTime::now() >= at
        {
            return Err(AuthFailure::ExpiredToken {
                principal: known.principal.id.clone(),
                expired_at: at,
            });
        }
        if let Credentials::Basic { user, .. } = &credentials
            && *user != known.principal.id
        {
            return Err(AuthFailure::CredentialMismatch(Mismatch::UserAndToken {
                user: shown_user(user),
                token: known.principal.id.clone(),
            }));
        }
        Ok(known.principal.clone())
    }

    /// The deny list, re-read when the file's modification time or length changed. A file that
    /// cannot be read or parsed is an error, which refuses every request until it is fixed.
    fn deny_list(&self) -> Result<Arc<DenyList>, String> {
        let Some(path) = &self.revoked_path else {
            return Ok(Arc::default());
        };
        let stamp = match std::fs::metadata(path) {
            Ok(meta) => Some((meta.modified().unwrap_or(UNIX_EPOCH), meta.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut revocations = self
            .revocations
            .lock()
            .expect("revocations lock is never poisoned");
        if revocations.stamp != stamp {
            revocations.list = match stamp {
                None => Ok(Arc::default()),
                Some(_) => std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|text| {
                        toml::from_str::<DenyList>(&text)
                            .map(Arc::new)
                            .map_err(|e| format!("invalid {}: {e}", path.display()))
                    }),
            };
            revocations.stamp = stamp;
            match &revocations.list {
                Ok(list) => tracing::info!(
                    principals = list.principals.len(),
                    tokens = list.token_sha256.len(),
                    certificates = list.certificate_sha256.len(),
                    "deny list loaded"
                ),
                Err(message) => {
                    tracing::error!(%message, "deny list unreadable: refusing every request")
                }
            }
        }
        revocations.list.clone()
    }
}

/// Adds entries to the deny list file of a credentials dir (creating it), for operators and
/// tests. The server picks the change up on the next request.
pub fn revoke(credentials_dir: &Path, add: &DenyList) -> anyhow::Result<()> {
    let path = credentials_dir.join(REVOKED_FILE);
    let mut list: DenyList = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DenyList::default(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    list.principals.extend(add.principals.iter().cloned());
    list.token_sha256.extend(add.token_sha256.iter().cloned());
    list.certificate_sha256
        .extend(add.certificate_sha256.iter().cloned());
    let text = format!(
        "# Revoked credentials: re-read by sandboxd whenever this file changes.\n{}",
        toml::to_string(&list)?
    );
    // Written beside and renamed over, so the server never reads half a file.
    let partial = credentials_dir.join(format!("{REVOKED_FILE}.partial"));
    std::fs::write(&partial, text)?;
    std::fs::rename(&partial, &path)?;
    Ok(())
}

pub fn token_hash(token: &str) -> [u8; 32] {
    sha256(token.as_bytes())
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, bytes).as_ref());
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
            (Rpc::WhoAmI, &[Analyst, Consumer, Owner, Auditor, Admin]),
            (Rpc::ListGrants, &[Analyst, Consumer, Owner, Auditor]),
            (Rpc::FlightHandshake, &[Analyst, Consumer, Owner]),
            (Rpc::FlightGetSqlInfo, &[Analyst, Consumer, Owner]),
            (Rpc::FlightGetCatalog, &[Analyst, Consumer, Owner]),
            (Rpc::FlightPrepare, &[Analyst, Consumer]),
            (Rpc::FlightClosePrepared, &[Analyst, Consumer]),
            (Rpc::FlightExecute, &[Analyst, Consumer]),
            (Rpc::FlightFetch, &[Analyst, Consumer]),
            (Rpc::FlightCloseSession, &[Analyst, Consumer, Owner]),
            (Rpc::FlightOtherAction, &[Analyst, Consumer, Owner]),
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
        for (malformed, why) in [
            ("Basic abc", Malformed::Basic),
            ("Basic !!!!", Malformed::Basic),
            // "analyst" with no colon, and ":token" with no user.
            ("Basic YW5hbHlzdA==", Malformed::Basic),
            ("Basic OnRva2Vu", Malformed::Basic),
            // "analyst:" with an empty token.
            ("Basic YW5hbHlzdDo=", Malformed::TokenLength),
            ("Token abc", Malformed::Scheme),
            ("Bearer ", Malformed::TokenLength),
        ] {
            assert_eq!(
                auth.authenticate(Some(malformed)),
                Err(AuthFailure::MalformedCredentials(why)),
                "{malformed}"
            );
        }
        // "analyst:nope"
        assert_eq!(
            auth.authenticate(Some("Basic YW5hbHlzdDpub3Bl")),
            Err(AuthFailure::UnknownToken { basic: true })
        );
        // "analyst:secret", padded and unpadded (Go clients leave the padding out).
        for encoded in ["YW5hbHlzdDpzZWNyZXQ=", "YW5hbHlzdDpzZWNyZXQ"] {
            assert_eq!(
                Credentials::parse(&format!("Basic {encoded}")),
                Ok(Credentials::Basic {
                    user: "analyst".into(),
                    token: "secret".into()
                })
            );
        }
        assert_eq!(
            auth.authenticate(Some("Bearer nope")),
            Err(AuthFailure::UnknownToken { basic: false })
        );
    }

    /// Principals of the refusal tests: `expired` holds a token that expired in 2001.
    const PRINCIPALS: [(&str, &str, Option<&str>); 4] = [
        ("analyst", "analyst-token", None),
        ("bank", "bank-token", None),
        ("expired", "expired-token", Some("2001-02-03T04:05:06Z")),
        ("banned", "banned-token", None),
    ];

    /// A credentials dir with [`PRINCIPALS`], and a TLS dir whose CA issued certificates for
    /// them and for `mallory`, who is no principal.
    fn credentials() -> (tempfile::TempDir, Authenticator) {
        let dir = tempfile::tempdir().expect("tempdir");
        let credentials = dir.path().join("credentials");
        std::fs::create_dir_all(&credentials).expect("credentials dir");
        let file = PrincipalsFile {
            principal: PRINCIPALS
                .iter()
                .map(|(id, token, expires)| StoredPrincipal {
                    id: id.to_string(),
                    org: format!("{id}-org"),
                    roles: vec!["analyst".into()],
                    token_sha256: hex::encode(token_hash(token)),
                    token_expires_at: expires.map(str::to_string),
                })
                .collect(),
        };
        std::fs::write(
            credentials.join(PRINCIPALS_FILE),
            toml::to_string(&file).expect("toml"),
        )
        .expect("principals written");
        let mut names: Vec<String> = PRINCIPALS.iter().map(|p| p.0.to_string()).collect();
        names.push("mallory".into());
        crate::tls::ensure(dir.path(), &names, &[]).expect("certificates");
        let auth = Authenticator::load(&credentials).expect("loads");
        (dir, auth)
    }

    /// The DER of a principal's client certificate in the test dir.
    fn certificate(dir: &Path, name: &str) -> Vec<u8> {
        let pem = std::fs::read(crate::tls::TlsPaths::of(dir).client_cert(name)).expect("pem");
        x509_parser::pem::parse_x509_pem(&pem)
            .expect("parses")
            .1
            .contents
    }

    /// Each refusal rule has its own message saying what was wrong and what fixes it, and names
    /// only principals the caller's own credentials name: never another, never whether a token
    /// exists.
    #[test]
    fn each_refusal_says_what_was_wrong_and_names_only_what_was_presented() {
        let (dir, auth) = credentials();
        let revoked = |list: DenyList| {
            revoke(&dir.path().join("credentials"), &list).expect("revoked");
        };
        revoked(DenyList {
            principals: vec!["banned".into()],
            ..DenyList::default()
        });
        let bearer = |token: &str| format!("Bearer {token}");
        let basic = |user: &str, token: &str| {
            use base64::Engine as _;
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
            format!("Basic {encoded}")
        };
        let analyst_cert = certificate(dir.path(), "analyst");
        let mallory_cert = certificate(dir.path(), "mallory");
        // (authorization, certificate, rule, what the message says, principals it may name)
        type Case<'a> = (
            Option<String>,
            Option<&'a [u8]>,
            &'a str,
            Vec<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                None,
                None,
                "missing-credentials",
                vec![
                    "no credentials",
                    "--as NAME",
                    "--token-file F",
                    "client certificate",
                ],
                vec![],
            ),
            (
                Some("Digest user=x".into()),
                None,
                "malformed-credentials",
                vec!["neither `Bearer <token>` nor `Basic"],
                vec![],
            ),
            (
                Some(bearer("sbx_forged")),
                None,
                "unknown-token",
                vec![
                    "the bearer token is not known to this server",
                    "check --as/--token-file",
                    "<data-dir>/credentials/",
                ],
                vec![],
            ),
            // A user name that is a principal, with a token that is nobody's: the answer says
            // nothing about the user.
            (
                Some(basic("bank", "sbx_forged")),
                None,
                "unknown-token",
                vec!["the password is not a token known to this server"],
                vec![],
            ),
            (
                Some(basic("bank", "analyst-token")),
                None,
                "credential-mismatch",
                vec![
                    "the user name `bank` is not the principal of its password's token (`analyst`)",
                ],
                vec!["bank", "analyst"],
            ),
            (
                Some(bearer("bank-token")),
                Some(&analyst_cert),
                "credential-mismatch",
                vec![
                    "the bearer token names principal `bank` but the client certificate names \
                     `analyst`: present one principal's credentials",
                ],
                vec!["bank", "analyst"],
            ),
            (
                Some(bearer("expired-token")),
                None,
                "expired-token",
                vec![
                    "the token of `expired` expired at 2001-02-03T04:05:06Z",
                    "ask an admin to issue a new one",
                ],
                vec!["expired"],
            ),
            (
                Some(bearer("banned-token")),
                None,
                "revoked-credential",
                vec!["every credential of `banned` was revoked"],
                vec!["banned"],
            ),
            // A user name is quoted with its control characters escaped (it goes to the
            // journal, read on an auditor's terminal).
            (
                Some(basic("\u{1b}[9Gbank\r", "analyst-token")),
                None,
                "credential-mismatch",
                vec!["the user name `\\u{1b}[9Gbank\\r` is not the principal"],
                vec!["analyst"],
            ),
            // A revoked principal's token under another user name: revoked, not a mismatch.
            (
                Some(basic("bank", "banned-token")),
                None,
                "revoked-credential",
                vec!["every credential of `banned` was revoked"],
                vec!["banned"],
            ),
            (
                None,
                Some(&mallory_cert),
                "unknown-certificate",
                vec!["the client certificate names `mallory`, which is no principal"],
                vec!["mallory"],
            ),
        ];
        let check = |authorization: Option<&str>,
                     cert: Option<&[u8]>,
                     rule: &str,
                     says: &[&str],
                     may_name: &[&str]| {
            let failure = auth
                .authenticate_request(authorization, cert)
                .expect_err("refused");
            let message = failure.to_string();
            assert_eq!(failure.code(), rule, "{message}");
            for part in says {
                assert!(message.contains(part), "{rule}: `{part}` not in: {message}");
            }
            for (id, _, _) in PRINCIPALS.iter().chain(&[("mallory", "", None)]) {
                if !may_name.contains(id) {
                    assert!(
                        !message.contains(&format!("`{id}`")),
                        "{rule} names {id}: {message}"
                    );
                }
            }
        };
        for (authorization, cert, rule, says, may_name) in &cases {
            check(authorization.as_deref(), *cert, rule, says, may_name);
        }
        // The deny list names a token and a certificate: each refusal says which was revoked.
        revoked(DenyList {
            token_sha256: vec![hex::encode(token_hash("bank-token"))],
            certificate_sha256: vec![hex::encode(sha256(&analyst_cert))],
            ..DenyList::default()
        });
        check(
            Some(&bearer("bank-token")),
            None,
            "revoked-credential",
            &["the bearer token was revoked"],
            &[],
        );
        // Regression (fresh-attacker round of issue 18): a revoked token under another user name
        // is refused as revoked, without naming whose it was.
        check(
            Some(&basic("analyst", "bank-token")),
            None,
            "revoked-credential",
            &["the bearer token was revoked"],
            &[],
        );
        check(
            None,
            Some(&analyst_cert),
            "revoked-credential",
            &["the client certificate was revoked"],
            &[],
        );
        // A deny list that does not parse refuses everyone, and says so.
        std::fs::write(
            dir.path().join("credentials").join(REVOKED_FILE),
            "principals = 7",
        )
        .expect("broken deny list");
        check(
            Some(&bearer("analyst-token")),
            None,
            "deny-list-unreadable",
            &["cannot read its deny list"],
            &[],
        );
    }

    /// The journal's record of refused credentials: hash prefixes and certificate names, never
    /// the token itself.
    #[test]
    fn presented_credentials_name_hashes_never_secrets() {
        let (dir, _auth) = credentials();
        let prefix = |bytes: &[u8]| hex::encode(sha256(bytes))[..12].to_string();
        let token = "sbx_0123456789abcdef";
        let described = presented(Some(&format!("Bearer {token}")), None);
        assert_eq!(described, format!("token:{}", prefix(token.as_bytes())));
        // Basic credentials: the password is the token.
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("bank:{token}"));
        assert_eq!(presented(Some(&format!("Basic {basic}")), None), described);
        let header = format!("Digest {token}");
        assert_eq!(
            presented(Some(&header), None),
            format!("authorization:{}", prefix(header.as_bytes()))
        );
        let cert = certificate(dir.path(), "analyst");
        assert_eq!(presented(None, Some(&cert)), "cert:analyst");
        assert_eq!(
            presented(Some(&format!("Bearer {token}")), Some(&cert)),
            format!("{described},cert:analyst")
        );
        assert_eq!(
            presented(None, Some(b"not a certificate")),
            format!("cert:sha256:{}", prefix(b"not a certificate"))
        );
        assert_eq!(presented(None, None), "");
        for described in [
            presented(Some(&format!("Bearer {token}")), Some(&cert)),
            presented(Some(&header), None),
        ] {
            assert!(!described.contains("0123456789abcdef"), "{described}");
        }
    }

    /// No principal id looks like a description of presented credentials.
    #[test]
    fn principal_ids_hold_no_colon_or_comma() {
        for id in ["token:abc", "a,b", ""] {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = PrincipalsFile {
                principal: vec![StoredPrincipal {
                    id: id.into(),
                    org: "org".into(),
                    roles: vec!["analyst".into()],
                    token_sha256: hex::encode(token_hash("t")),
                    token_expires_at: None,
                }],
            };
            std::fs::write(
                dir.path().join(PRINCIPALS_FILE),
                toml::to_string(&file).expect("toml"),
            )
            .expect("written");
            let error = Authenticator::load(dir.path()).expect_err("refused");
            assert!(error.to_string().contains("no `:` or `,`"), "{error}");
        }
    }
}

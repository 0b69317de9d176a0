//! First start: on an empty or missing data dir, generate the demo datasets, write the demo
//! policies and create credentials for the demo principals. Every later start uses what is there.
//! Generating needs the demo generator (the `demo` cargo feature, on by default); a build without
//! it starts only on a prepared data dir.
//!
//! One `sandboxd` per data dir: [`prepare`] first takes the data dir's lock
//! ([`DataDirLock`], `<data-dir>/sandboxd.lock`, holding the process id), before anything is
//! generated or read, so a second server on the same data dir stops at once, naming the first.

use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use ring::rand::{SecureRandom, SystemRandom};
use sandbox_policy::PolicySet;

use crate::auth::{Authenticator, PRINCIPALS_FILE, PrincipalsFile, StoredPrincipal, token_hash};
use crate::config::ServerConfig;

/// The demo policies, compiled in from the repository's `policies/` so both stay one source.
pub const DEMO_POLICIES: [(&str, &str); 6] = [
    ("court.toml", include_str!("../../../policies/court.toml")),
    (
        "housing_fund.toml",
        include_str!("../../../policies/housing_fund.toml"),
    ),
    ("hrss.toml", include_str!("../../../policies/hrss.toml")),
    (
        "market_regulation.toml",
        include_str!("../../../policies/market_regulation.toml"),
    ),
    (
        "platform.toml",
        include_str!("../../../policies/platform.toml"),
    ),
    (
        "tax_bureau.toml",
        include_str!("../../../policies/tax_bureau.toml"),
    ),
];

/// The demo's templates for the bank, compiled in from `examples/templates/`; written to
/// [`DEMO_TEMPLATES_DIR`] at first start and approved once by every owner they read from.
pub const DEMO_TEMPLATES: [(&str, &str); 2] = [
    (
        "industry_region_risk.toml",
        include_str!("../../../examples/templates/industry_region_risk.toml"),
    ),
    (
        "tax_features.toml",
        include_str!("../../../examples/templates/tax_features.toml"),
    ),
];

/// Where the demo templates are written in the data dir.
pub const DEMO_TEMPLATES_DIR: &str = "demo-templates";

/// The demo principal whose templates are pre-approved (one of [`DEMO_PRINCIPALS`]).
pub const DEMO_TEMPLATE_CONSUMER: &str = "bank";

/// Demo principals: name, org, roles.
pub const DEMO_PRINCIPALS: [(&str, &str, &[&str]); 9] = [
    ("analyst", "analytics", &["analyst"]),
    ("bank", "bank_demo", &["consumer"]),
    ("auditor", "audit_office", &["auditor"]),
    ("admin", "platform", &["admin"]),
    ("owner_market", "market_regulation", &["owner"]),
    ("owner_tax", "tax_bureau", &["owner"]),
    ("owner_hrss", "hrss", &["owner"]),
    ("owner_fund", "housing_fund", &["owner"]),
    ("owner_court", "court", &["owner"]),
];

/// How long the demo tokens are valid (the demo certificates too).
const DEMO_TOKEN_DAYS: u64 = 365;

/// What a start needs from the data dir.
#[derive(Debug)]
pub struct Prepared {
    pub policy: PolicySet,
    /// SHA-256 over the policy files' names and texts: recorded at start, so the journal shows
    /// which policy every later decision was made under.
    pub policy_digest: String,
    /// Where the policy came from; `None` for the built-in demo policies.
    pub policy_dir: Option<PathBuf>,
    pub authenticator: Authenticator,
    pub created_demo: bool,
    /// Held for as long as the server serves the data dir.
    pub lock: DataDirLock,
}

/// The lock file of a data dir: locked by the `sandboxd` serving it, and holding its process id.
pub const LOCK_FILE: &str = "sandboxd.lock";

/// A data dir's lock, held while it exists (the OS releases it when the process ends, even
/// killed, so a crashed server's lock file never stops the next start).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Locks `data_dir` (which exists) and writes this process's id into the lock file. Refused
    /// when another process holds it, naming that process when its lock file says which.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join(LOCK_FILE);
        // Not truncated on open: until the lock is ours, the file holds the holder's id.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse::<u32>().ok())
                    .map_or(String::new(), |pid| format!(" (pid {pid})"));
                anyhow::bail!(
                    "another sandboxd{holder} is using {}: stop it, or start this one with \
                     --data-dir DIR",
                    data_dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DataDirLock { _file: file })
    }
}

/// Whether a data dir has nothing in it yet but (perhaps) its lock file: a first start.
fn is_fresh(data_dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(data_dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.with_context(|| format!("cannot read {}", data_dir.display()))?;
                if entry.file_name() != LOCK_FILE {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", data_dir.display())),
    }
}

/// The demo policies as (name, text) pairs, for loading without a directory.
pub fn demo_policy_sources() -> Vec<(String, String)> {
    DEMO_POLICIES
        .iter()
        .map(|(name, text)| (format!("<built-in>/{name}"), text.to_string()))
        .collect()
}

/// SHA-256 (hex) over each file's base name and text, in order.
fn policy_digest(sources: &[(String, String)]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for (name, text) in sources {
        let base = Path::new(name)
            .file_name()
            .map_or(name.as_str(), |n| n.to_str().unwrap_or(name));
        for part in [base.as_bytes(), b"\0", text.as_bytes(), b"\0"] {
            context.update(part);
        }
    }
    hex::encode(context.finish().as_ref())
}

pub fn prepare(config: &ServerConfig) -> anyhow::Result<Prepared> {
    let data_dir = &config.data_dir;
    if is_fresh(data_dir)? && !cfg!(feature = "demo") {
        // Refused before anything is written, so the data dir is left as it was found.
        return Err(without_demo(&format!(
            "the data dir {} is empty or missing, and a first start generates the demo there",
            data_dir.display()
        )));
    }
    if is_fresh(data_dir)? {
        check_demo_scale(config.demo_scale)?;
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create {}", data_dir.display()))?;
    }
    // Before anything is read or generated: a second server on this data dir stops here.
    let lock = DataDirLock::acquire(data_dir)?;
    // Asked again under the lock: another server may have started generating in between.
    let fresh = is_fresh(data_dir)?;
    if fresh {
        create_demo(data_dir, config.demo_scale)?;
    }
    // `--policies`, else the repository's `policies/` when run from a checkout, else the data
    // dir's copy written at first start, else the policies compiled into the binary.
    let policy_dir = match &config.policies {
        Some(dir) => Some(dir.clone()),
        None if Path::new("policies").is_dir() => Some(PathBuf::from("policies")),
        None if data_dir.join("policies").is_dir() => Some(data_dir.join("policies")),
        None => None,
    };
    let sources = match &policy_dir {
        Some(dir) => sandbox_policy::read_dir_sources(dir)
            .with_context(|| format!("cannot read the policies in {}", dir.display()))?,
        None => demo_policy_sources(),
    };
    let policy = sandbox_policy::load_sources(&sources).with_context(|| match &policy_dir {
        Some(dir) => format!("invalid policy in {}", dir.display()),
        None => "the built-in demo policies do not load".to_string(),
    })?;
    let policy_digest = policy_digest(&sources);
    tracing::info!(
        source = %policy_dir.as_ref().map_or("built-in demo policies".to_string(), |d| d.display().to_string()),
        datasets = policy.datasets.len(),
        grants = policy.grants.len(),
        digest = %policy_digest,
        "policy loaded"
    );
    let authenticator = Authenticator::load(&data_dir.join("credentials"))?;
    if fresh || config.tls {
        crate::tls::ensure(data_dir, &authenticator.principal_ids(), &config.tls_names)?;
    }
    Ok(Prepared {
        policy,
        policy_digest,
        policy_dir,
        authenticator,
        created_demo: fresh,
        lock,
    })
}

fn check_demo_scale(scale: f64) -> anyhow::Result<()> {
    if !(scale.is_finite() && scale > 0.0 && scale <= 1000.0) {
        anyhow::bail!("--demo-scale must be in (0, 1000], got {scale}");
    }
    Ok(())
}

fn create_demo(data_dir: &Path, scale: f64) -> anyhow::Result<()> {
    check_demo_scale(scale)?;
    tracing::info!(dir = %data_dir.display(), scale, "empty data dir: generating the demo");
    generate_datasets(data_dir, scale)?;

    let policy_dir = data_dir.join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    for (name, text) in DEMO_POLICIES {
        std::fs::write(policy_dir.join(name), text)?;
    }
    tracing::info!(dir = %policy_dir.display(), "demo policies written");

    let templates_dir = data_dir.join(DEMO_TEMPLATES_DIR);
    std::fs::create_dir_all(&templates_dir)?;
    for (name, text) in DEMO_TEMPLATES {
        std::fs::write(templates_dir.join(name), text)?;
    }

    let credentials = data_dir.join("credentials");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&credentials)?;
    let random = SystemRandom::new();
    let mut file = PrincipalsFile::default();
    let expires_at = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(DEMO_TOKEN_DAYS * 86_400),
    )
    .to_string();
    for (name, org, roles) in DEMO_PRINCIPALS {
        let mut bytes = [0u8; 32];
        random
            .fill(&mut bytes)
            .map_err(|_| anyhow::anyhow!("no secure randomness for tokens"))?;
        let token = format!("sbx_{}", hex::encode(bytes));
        write_private(
            &credentials.join(format!("{name}.token")),
            format!("{token}\n").as_bytes(),
        )?;
        file.principal.push(StoredPrincipal {
            id: name.to_string(),
            org: org.to_string(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            token_sha256: hex::encode(token_hash(&token)),
            token_expires_at: Some(expires_at.clone()),
        });
    }
    let text = format!(
        "# Demo principals, generated at first start. Tokens are stored only as SHA-256;\n\
         # the demo tokens themselves are in <name>.token beside this file (mode 0600).\n{}",
        toml::to_string(&file)?
    );
    write_private(&credentials.join(PRINCIPALS_FILE), text.as_bytes())?;
    tracing::info!(
        dir = %credentials.display(),
        principals = DEMO_PRINCIPALS.len(),
        "demo credentials created (DEMO ONLY: replace for real use)"
    );
    Ok(())
}

/// The demo datasets, from the generator.
#[cfg(feature = "demo")]
fn generate_datasets(data_dir: &Path, scale: f64) -> anyhow::Result<()> {
    let config = sandbox_demo::DemoConfig::scaled(scale);
    // A progress line on a terminal (indicatif draws nothing when stderr is not one): the first
    // start writes millions of rows before it listens.
    let progress = indicatif::ProgressBar::new_spinner().with_message(format!(
        "first start: generating the demo data ({} enterprises, {} months) in {}",
        config.enterprises,
        config.months,
        data_dir.display()
    ));
    progress.enable_steady_tick(std::time::Duration::from_millis(200));
    let summary = sandbox_demo::generate(data_dir, &config);
    progress.finish_and_clear();
    let summary = summary.context("cannot generate demo data")?;
    for (table, rows) in &summary.tables {
        tracing::info!(table, rows, "demo dataset written");
    }
    Ok(())
}

/// Without the generator, `prepare` refuses a data dir that would need it before calling here.
#[cfg(not(feature = "demo"))]
fn generate_datasets(data_dir: &Path, _scale: f64) -> anyhow::Result<()> {
    Err(without_demo(&format!(
        "cannot generate the demo datasets in {}",
        data_dir.display()
    )))
}

/// The refusal of a build without the demo generator to start where it would be needed: `what`
/// says what needed it.
pub fn without_demo(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what}: this sandboxd was built without the `demo` cargo feature (the demo generator); \
         start it on a prepared data dir, or build it with `--features demo`"
    )
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled-in policies are the repository's, and they load.
    #[test]
    fn demo_policies_load() {
        let policy = sandbox_policy::load_sources(&demo_policy_sources()).expect("demo policies");
        assert_eq!(policy.datasets.len(), 7);
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies"))
            .expect("policies dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "toml"))
            })
            .count();
        assert_eq!(
            on_disk,
            DEMO_POLICIES.len(),
            "every policy file is compiled in"
        );
    }

    /// Every example template is a demo template, and each parses.
    #[test]
    fn demo_templates_are_the_examples() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/templates");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .expect("templates dir")
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .filter(|name| name.ends_with(".toml"))
            .collect();
        on_disk.sort();
        let compiled: Vec<&str> = DEMO_TEMPLATES.iter().map(|(name, _)| *name).collect();
        assert_eq!(on_disk, compiled);
        for (name, text) in DEMO_TEMPLATES {
            sandbox_policy::TemplateDefinition::from_toml(text)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

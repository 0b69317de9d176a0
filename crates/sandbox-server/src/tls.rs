//! mTLS: a local CA with server and client certificates generated in the data dir at first
//! start, the server's TLS configuration, and reading the principal a client certificate names.
//!
//! Layout under `<data-dir>/tls/`: `ca.pem` (what clients and the server trust), `ca.key` (to
//! issue more certificates, e.g. with `openssl x509 -req`), `server.pem`/`server.key`, and
//! `clients/<principal>.pem`/`.key` for every principal with credentials. A client certificate
//! names its principal in the subject's common name; the server accepts it only when the CA
//! signed it, it is in its validity period and not on the deny list.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::bootstrap::write_private;

/// The TLS folder of a data dir.
pub const TLS_DIR: &str = "tls";

/// How long generated certificates are valid.
const VALIDITY_DAYS: i64 = 365;

/// Paths of the TLS files of a data dir.
#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub dir: PathBuf,
}

impl TlsPaths {
    pub fn of(data_dir: &Path) -> Self {
        TlsPaths {
            dir: data_dir.join(TLS_DIR),
        }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn client_cert(&self, principal: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{principal}.pem"))
    }
    pub fn client_key(&self, principal: &str) -> PathBuf {
        self.dir.join("clients").join(format!("{principal}.key"))
    }
}

/// Generates the CA, the server certificate (for `localhost`, the loopback addresses and
/// `extra_names`) and a client certificate per principal, unless the CA exists already.
/// Written to a temporary folder and renamed into place, so a crash leaves all or nothing.
pub fn ensure(
    data_dir: &Path,
    principals: &[String],
    extra_names: &[String],
) -> anyhow::Result<()> {
    let paths = TlsPaths::of(data_dir);
    if paths.ca().exists() {
        return Ok(());
    }
    let staging = data_dir.join(format!("{TLS_DIR}.partial"));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("cannot remove {}", staging.display()))?;
    }
    let staged = TlsPaths {
        dir: staging.clone(),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(staging.join("clients"))?;
    generate(&staged, principals, extra_names)?;
    std::fs::rename(&staging, &paths.dir)
        .with_context(|| format!("cannot move {} into place", staging.display()))?;
    tracing::info!(
        dir = %paths.dir.display(),
        clients = principals.len(),
        "local CA, server and client certificates created (DEMO ONLY: use your own CA for real use)"
    );
    Ok(())
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks behind ours.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(VALIDITY_DAYS);
}

fn generate(paths: &TlsPaths, principals: &[String], extra_names: &[String]) -> anyhow::Result<()> {
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "sandboxd local CA (demo)");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write_private(&paths.ca(), ca_cert.pem().as_bytes())?;
    write_private(&paths.dir.join("ca.key"), ca_key.serialize_pem().as_bytes())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names = vec!["localhost".to_string()];
    names.extend(extra_names.iter().cloned());
    let mut server = CertificateParams::new(names)?;
    for ip in ["127.0.0.1", "::1"] {
        server
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse().expect("valid address")));
    }
    server
        .distinguished_name
        .push(DnType::CommonName, "sandboxd");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let server_key = KeyPair::generate()?;
    let server_cert = server.signed_by(&server_key, &issuer)?;
    write_private(&paths.server_cert(), server_cert.pem().as_bytes())?;
    write_private(&paths.server_key(), server_key.serialize_pem().as_bytes())?;

    for principal in principals {
        let mut client = CertificateParams::default();
        client.distinguished_name = DistinguishedName::new();
        client
            .distinguished_name
            .push(DnType::CommonName, principal.as_str());
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut client);
        let key = KeyPair::generate()?;
        let cert = client.signed_by(&key, &issuer)?;
        write_private(&paths.client_cert(principal), cert.pem().as_bytes())?;
        write_private(&paths.client_key(principal), key.serialize_pem().as_bytes())?;
    }
    Ok(())
}

/// The server's TLS configuration: its certificate, and client certificates verified against
/// the local CA when a client presents one (optional, so bearer tokens work over TLS too).
pub fn server_config(data_dir: &Path) -> anyhow::Result<ServerTlsConfig> {
    let paths = TlsPaths::of(data_dir);
    let read = |path: PathBuf| {
        std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
    };
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read(paths.server_cert())?,
            read(paths.server_key())?,
        ))
        .client_ca_root(Certificate::from_pem(read(paths.ca())?))
        .client_auth_optional(true)
        // A client that never finishes its handshake does not hold a connection for long.
        .timeout(std::time::Duration::from_secs(10)))
}

/// The common name of a certificate's subject: the principal a client certificate names.
/// Only called on certificates rustls verified against the CA.
pub fn subject_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let mut names = certificate.subject().iter_common_name();
    let name = names.next()?.as_str().ok()?.to_string();
    // Exactly one common name: a certificate naming two principals names none.
    names.next().is_none().then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_client_certificates_name_their_principal() {
        let dir = tempfile::tempdir().unwrap();
        let principals = vec!["analyst".to_string(), "bank".to_string()];
        ensure(dir.path(), &principals, &[]).unwrap();
        let paths = TlsPaths::of(dir.path());
        for principal in &principals {
            let pem = std::fs::read(paths.client_cert(principal)).unwrap();
            let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            assert_eq!(
                subject_name(&parsed.contents).as_deref(),
                Some(principal.as_str())
            );
        }
        // A second call keeps what is there.
        let ca = std::fs::read(paths.ca()).unwrap();
        ensure(dir.path(), &principals, &[]).unwrap();
        assert_eq!(std::fs::read(paths.ca()).unwrap(), ca);
        assert!(server_config(dir.path()).is_ok());
        assert_eq!(subject_name(b"not a certificate"), None);
    }
}

//! Credentials and the connection: which data dir `--as NAME` reads, the token and TLS files the
//! options name, and errors that say which option fixes them.

use std::path::{Path, PathBuf};

use sandbox_cli::{Client, ConnectError, TlsFiles};

use crate::{Cli, EXIT_OTHER, Failure, usage};

/// The name of a server's data dir when none is given.
const DEFAULT_DATA_DIR: &str = "sandbox-data";

/// The data dir: `--data-dir` (or SANDBOX_DATA_DIR), else `./sandbox-data`, else the nearest
/// `sandbox-data` in a parent folder (so `--as NAME` works from any folder of the checkout).
pub fn data_dir(cli: &Cli) -> PathBuf {
    if let Some(dir) = &cli.data_dir {
        return dir.clone();
    }
    let here = PathBuf::from(".").join(DEFAULT_DATA_DIR);
    if here.is_dir() {
        return here;
    }
    if let Ok(current) = std::env::current_dir() {
        for folder in current.ancestors().skip(1) {
            let candidate = folder.join(DEFAULT_DATA_DIR);
            if candidate.join("credentials").is_dir() && ours_alone(&candidate) {
                return candidate;
            }
        }
    }
    here
}

/// Whether a data dir found in a parent folder is this user's and nobody else can write it or
/// its credentials: a `sandbox-data` planted in a shared folder (its tokens, its CA) is not
/// taken up unasked. Undecidable is no.
fn ours_alone(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) else {
        return false;
    };
    [dir.to_path_buf(), dir.join("credentials"), dir.join("tls")]
        .iter()
        .all(|path| match std::fs::metadata(path) {
            Ok(meta) => meta.uid() == me && meta.mode() & 0o022 == 0,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        })
}

/// Whether an address's host is this machine's loopback.
fn is_loopback(address: &str) -> bool {
    let rest = address.split_once("://").map_or(address, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The principals that have a token in `dir/credentials`, sorted.
fn known_principals(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("credentials"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_suffix(".token").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

/// The bearer token the options name, if any.
fn token(cli: &Cli) -> Result<Option<String>, Failure> {
    let from_file = |path: &Path| -> Result<String, Failure> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            usage(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        Ok(text.trim().to_string())
    };
    if let Some(path) = &cli.token_file {
        return from_file(path).map(Some);
    }
    if let Some(name) = &cli.as_principal {
        let dir = data_dir(cli);
        let path = dir.join("credentials").join(format!("{name}.token"));
        if path.is_file() {
            return from_file(&path).map(Some);
        }
        // Over TLS a client certificate may stand in for the token.
        if cli.addr.starts_with("https://")
            && TlsFiles::in_data_dir(&dir, name)
                .cert
                .is_some_and(|p| p.is_file())
        {
            return Ok(None);
        }
        let known = known_principals(&dir);
        return Err(usage(if known.is_empty() {
            format!(
                "--as {name}: no credentials under {}: run this from the folder that holds the \
                 server's data dir, or pass --data-dir DIR (or SANDBOX_DATA_DIR), or --token-file F",
                dir.join("credentials").display()
            )
        } else {
            format!(
                "--as {name}: no token `{name}.token` under {}; the principals there are: {}",
                dir.join("credentials").display(),
                known.join(", ")
            )
        }));
    }
    match std::env::var("SANDBOX_TOKEN") {
        Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_string())),
        _ => Ok(None),
    }
}

/// The TLS files the options name: `--ca/--cert/--key`, else the data dir's for `--as NAME`
/// over `https://`.
fn tls_files(cli: &Cli) -> Result<Option<TlsFiles>, Failure> {
    let https = cli.addr.starts_with("https://");
    if !https && (cli.ca.is_some() || cli.cert.is_some()) {
        return Err(usage(format!(
            "--ca, --cert and --key are for TLS, but --addr {} is plaintext: use https://",
            cli.addr
        )));
    }
    if !https {
        return Ok(None);
    }
    let mut files = TlsFiles {
        ca: cli.ca.clone(),
        cert: cli.cert.clone(),
        key: cli.key.clone(),
    };
    if let Some(name) = &cli.as_principal {
        let found = TlsFiles::in_data_dir(&data_dir(cli), name);
        if files.ca.is_none() {
            files.ca = found.ca.filter(|p| p.is_file());
        }
        if files.cert.is_none() && found.cert.as_ref().is_some_and(|p| p.is_file()) {
            files.cert = found.cert;
            files.key = found.key;
        }
    }
    for path in [&files.ca, &files.cert, &files.key].into_iter().flatten() {
        if !path.is_file() {
            return Err(usage(format!("no such file: {}", path.display())));
        }
    }
    Ok(Some(files))
}

/// A client authenticated as the principal the options name.
pub async fn client(cli: &Cli) -> Result<Client, Failure> {
    let tls = tls_files(cli)?;
    let token = token(cli)?;
    // A token over plaintext to another machine can be read on the way: refused unless asked.
    if token.is_some()
        && cli.addr.starts_with("http://")
        && !is_loopback(&cli.addr)
        && !cli.insecure_plaintext
    {
        return Err(usage(format!(
            "refusing to send a token in clear text to {}: use https:// (sandboxd --tls), or \
             --insecure-plaintext where a trusted network or proxy protects the path",
            cli.addr
        )));
    }
    Client::connect_with(&cli.addr, token.as_deref(), tls.as_ref())
        .await
        .map_err(|e| match e {
            ConnectError::NoCredentials => usage(
                "no credentials: use --as NAME, --token-file F, SANDBOX_TOKEN, or --cert F --key F \
                 over https://",
            ),
            ConnectError::Transport { .. } => Failure {
                code: EXIT_OTHER,
                message: format!("error: {e}"),
                status: None,
            },
            ConnectError::Address(_) => usage(format!(
                "{e}: write it as http://HOST:PORT (or https:// for a server started with --tls)"
            )),
            ConnectError::Token | ConnectError::File { .. } => usage(e.to_string()),
        })
}

/// A call that failed in the transport (a TLS refusal of the client certificate shows only at
/// the first call) explained like a failed connection; other failures as they are.
pub fn explain_transport(cli: &Cli, failure: Failure) -> Failure {
    let Some(status) = &failure.status else {
        return failure;
    };
    // Every answer of the server carries its request id; a status without one was made by the
    // client's transport (tonic reports a broken connection as Unknown, Unavailable, Internal
    // or Cancelled, with or without a source).
    let from_server = status.metadata().get("x-request-id").is_some();
    let transport = !from_server
        && matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
        );
    if !transport {
        return failure;
    }
    let tls = tls_files(cli).ok().flatten();
    Failure {
        code: EXIT_OTHER,
        message: format!(
            "error: the call to {} failed: {}",
            cli.addr,
            sandbox_cli::transport_hint(&cli.addr, tls.as_ref(), status)
        ),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_hosts() {
        for address in [
            "http://127.0.0.1:50051",
            "http://localhost:1",
            "http://[::1]:50051",
            "http://127.5.0.1",
        ] {
            assert!(is_loopback(address), "{address}");
        }
        for address in [
            "http://10.0.0.1:50051",
            "http://sandbox.example:50051",
            "http://[2001:db8::1]:1",
            "http://localhost.example:1",
        ] {
            assert!(!is_loopback(address), "{address}");
        }
    }
}

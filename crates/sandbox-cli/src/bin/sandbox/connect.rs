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
            if candidate.join("credentials").is_dir() {
                return candidate;
            }
        }
    }
    here
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
    use std::error::Error as _;
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

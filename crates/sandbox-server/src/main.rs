//! `sandboxd`: serves the data sandbox over gRPC.

use sandbox_server::ServerConfig;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = ServerConfig::from_command_line()?;
    let server = match sandbox_server::start(config).await {
        Ok(server) => server,
        Err(error) => {
            // One line an operator can act on (the causes after colons), not a debug dump.
            eprintln!("sandboxd: {error:#}");
            std::process::exit(1);
        }
    };
    println!("sandboxd listening on {}", server.addr);
    tracing::info!(addr = %server.addr, "listening on {}", server.addr);
    shutdown_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await
}

async fn shutdown_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

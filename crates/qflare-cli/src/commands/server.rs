//! `qflare server`: run the server (HTTPS with post-quantum hybrid key exchange).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use qflare_server::{Config, ServerOptions};

/// `qflare server` flags; they override the configuration's values.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// Listen address, e.g. 0.0.0.0:8443.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Database URL (sqlite://PATH or postgres://...).
    #[arg(long)]
    pub database: Option<String>,
    /// State directory holding keys and the certificate.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Runs the server until SIGTERM or Ctrl-C. What operators need (addresses,
/// where the admin token is, the fingerprint devices pin) goes to stdout;
/// logs go to stderr.
pub async fn run(mut config: Config, args: ServerArgs) -> anyhow::Result<()> {
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(database) = args.database {
        config.server.database_url = Some(database);
    }
    if let Some(state_dir) = args.state_dir {
        config.server.state_dir = state_dir;
    }
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let metrics = match config.server.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener {addr}"))?,
        ),
        None => None,
    };
    let env_token = crate::admin_token();
    let from_env = env_token.is_some();
    let options = ServerOptions {
        admin_token: env_token,
        ..ServerOptions::default()
    };
    let state_dir = config.server.state_dir.clone();
    let server = qflare_server::Server::new(config, options).await?;
    println!("QFLARE server on https://{}", listener.local_addr()?);
    if let Some(metrics) = &metrics {
        println!("metrics on http://{}/metrics", metrics.local_addr()?);
    }
    if !from_env {
        println!("admin token: {}", state_dir.join("admin-token").display());
    }
    println!("server fingerprint (devices pin it with --server-key):");
    println!("{}", server.fingerprint());
    server
        .serve(listener, metrics, qflare_server::shutdown_signal())
        .await?;
    Ok(())
}

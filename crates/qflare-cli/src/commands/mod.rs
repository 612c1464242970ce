//! The subcommands that run or administer a server: one module per noun.
//! Admin commands reach the server over HTTPS, pinned as devices pin it.

pub mod attest;
pub mod audit;
pub mod device;
pub mod model;
pub mod privacy;
pub mod round;
pub mod server;
pub mod server_key;
pub mod token;

use clap::Args;
use qflare_server::Config;

use crate::admin::AdminClient;

/// How admin commands reach the server.
#[derive(Debug, Args)]
pub struct Remote {
    /// The server's URL (default: https:// + the configured listen address).
    #[arg(long)]
    pub server: Option<String>,
    /// Pin this server fingerprint instead of the certificate in the local state directory.
    #[arg(long = "server-key")]
    pub server_key: Option<String>,
}

/// The URL admin commands use: `--server`, else the configured listen address
/// (with `127.0.0.1` for an unspecified one).
pub fn server_url(config: &Config, remote: &Remote) -> String {
    remote.server.clone().unwrap_or_else(|| {
        let listen = config.server.listen;
        let host = if listen.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else {
            listen.ip().to_string()
        };
        format!("https://{host}:{}", listen.port())
    })
}

/// An authenticated admin connection to the server.
pub async fn admin(config: &Config, remote: &Remote) -> anyhow::Result<AdminClient> {
    AdminClient::connect(
        &server_url(config, remote),
        remote.server_key.as_deref(),
        &config.server.state_dir,
        crate::admin_token(),
    )
    .await
}

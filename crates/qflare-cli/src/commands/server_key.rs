//! `qflare server-key`: the server's long-term identity, offline, from the
//! configuration and the state directory alone.

use std::path::PathBuf;

use clap::Subcommand;
use qflare_server::Config;

/// Server key subcommands.
#[derive(Debug, Subcommand)]
pub enum ServerKeyCommand {
    /// Replace the server's ML-DSA key and TLS certificate with new ones,
    /// handed over by the current key.
    ///
    /// Takes effect when the server next starts (restart every replica that
    /// shares the state directory). Devices verify the signed hand-over with
    /// the key they pin and move their pin by themselves at their next
    /// start; they need no new fingerprint. The old key's seed is deleted.
    Rotate {
        /// The new certificate (PEM, end entity first), when the server's
        /// certificate is configured (server.tls_certificate) rather than
        /// made by the server. Install it and its private key at the
        /// configured paths before the restart.
        #[arg(long, value_name = "PATH")]
        tls_certificate: Option<PathBuf>,
    },
}

/// Runs a server-key subcommand.
pub fn run(config: &Config, command: ServerKeyCommand) -> anyhow::Result<()> {
    match command {
        ServerKeyCommand::Rotate { tls_certificate } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let summary =
                qflare_server::key_rotation::rotate(config, tls_certificate.as_deref(), now)?;
            println!(
                "server key rotated (hand-over {} of the chain)",
                summary.chain_length
            );
            println!("old fingerprint: {}", summary.old_fingerprint);
            println!("new fingerprint: {}", summary.new_fingerprint);
            println!(
                "restart the server (every replica) to use it; enrolled devices follow the signed hand-over, new devices enroll with the new fingerprint"
            );
            Ok(())
        }
    }
}

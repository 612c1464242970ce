//! `qflare-edge`: enroll a device, open a session, rotate its keys.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use qflare_edge::identity::DEFAULT_IDENTITY_DIR;
use qflare_edge::{EnrollOptions, Identity};
use qflare_protocol::identity::{EnrollmentToken, ServerFingerprint};
use qflare_protocol::{KemSuite, SignatureSuite};

/// A QFLARE edge device: post-quantum enrollment and sessions.
#[derive(Debug, Parser)]
#[command(name = "qflare-edge", version, about, long_about = None)]
struct Cli {
    /// The identity directory (created by `enroll`, read by everything else).
    #[arg(long, global = true, default_value = DEFAULT_IDENTITY_DIR, env = "QFLARE_EDGE_IDENTITY")]
    identity: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll with a one-time token: generate key pairs, register the public halves.
    Enroll {
        /// The server, e.g. https://127.0.0.1:8443
        #[arg(long)]
        server: String,
        /// The enrollment token from `qflare token create`.
        #[arg(long, env = "QFLARE_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The server fingerprint (64 hex characters) printed by `qflare server`.
        #[arg(long = "server-key")]
        server_key: String,
        /// A name for this device (A-Z a-z 0-9 . _ -).
        #[arg(long, default_value = "edge")]
        name: String,
        /// KEM suite: ml-kem-768, ml-kem-1024, frodokem-640-aes, frodokem-976-aes, x25519-ml-kem-768.
        #[arg(long)]
        kem: Option<KemSuite>,
        /// Signature suite: ml-dsa-65 or ml-dsa-87.
        #[arg(long)]
        signature: Option<SignatureSuite>,
    },
    /// Open and confirm a session, then prove the sealed channel with a ping.
    Session,
    /// Replace this device's keys (signed by the old and the new key).
    RotateKeys,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Enroll {
            server,
            token,
            server_key,
            name,
            kem,
            signature,
        } => {
            let options = EnrollOptions {
                server_url: server,
                token: EnrollmentToken::parse(token.trim()).context("the token")?,
                fingerprint: ServerFingerprint::parse(&server_key).context("--server-key")?,
                device_name: name,
                kem_suite: kem,
                signature_suite: signature,
            };
            let identity = qflare_edge::enroll(options, &cli.identity).await?;
            println!(
                "enrolled as device {} ({} + {}); identity written to {}",
                identity.device_id,
                identity.keys.kem.public.suite(),
                identity.keys.signing.suite(),
                Identity::path(&cli.identity).display()
            );
        }
        Command::Session => {
            let identity = Identity::load(&cli.identity)?;
            let transport = qflare_edge::transport_for(&identity)?;
            let mut session = qflare_edge::open_session(&identity, &transport).await?;
            let pong = session.ping().await?;
            println!(
                "session {} established (expires at {}); sealed ping answered: {pong}",
                session.session_id(),
                session.expires_at()
            );
        }
        Command::RotateKeys => {
            let mut identity = Identity::load(&cli.identity)?;
            let transport = qflare_edge::transport_for(&identity)?;
            let mut session = qflare_edge::open_session(&identity, &transport).await?;
            let version =
                qflare_edge::rotate_keys(&mut identity, &mut session, &cli.identity).await?;
            println!("keys rotated; key version {version}");
        }
    }
    Ok(())
}

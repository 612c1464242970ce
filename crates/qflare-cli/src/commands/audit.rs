//! `qflare audit`: check the audit ledger offline, from the database and the
//! state directory alone.

use std::process::ExitCode;

use clap::Subcommand;
use qflare_server::Config;
use qflare_server::identity::PublicKeyFile;
use qflare_server::key_chain;

/// Exit status of `audit verify` when the chain or a checkpoint does not
/// verify: distinct from 1 (any error) and from 2, which clap uses for usage
/// errors, so a script can tell a tampered ledger from a mistyped command.
pub const EXIT_AUDIT_BROKEN: u8 = 3;

/// Audit subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain and check the signed checkpoints.
    Verify,
}

/// Runs an audit subcommand.
pub async fn run(config: &Config, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::Verify => {
            let store = qflare_store::open(&config.server.database_url()).await?;
            let state_dir = &config.server.state_dir;
            let key = PublicKeyFile::load(state_dir)?;
            // Checkpoints signed before a server key rotation verify under
            // the keys the hand-over chain links to the current one.
            let chain = key_chain::load_handovers(state_dir).map_err(anyhow::Error::msg)?;
            let keys = key_chain::key_history(&key, &chain).map_err(anyhow::Error::msg)?;
            let report = qflare_server::ledger::verify(store.as_ref(), &keys).await?;
            match report.first_bad {
                None => {
                    println!(
                        "audit ledger intact: {} entries, {} signed checkpoints verified",
                        report.entries, report.checkpoints
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Some((seq, reason)) => {
                    println!("audit ledger BROKEN at entry {seq}: {reason}");
                    println!("({} entries verified before it)", report.entries);
                    Ok(ExitCode::from(EXIT_AUDIT_BROKEN))
                }
            }
        }
    }
}

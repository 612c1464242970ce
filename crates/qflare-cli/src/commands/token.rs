//! `qflare token`: create, list and revoke enrollment tokens.

use std::time::Duration;

use clap::Subcommand;
use qflare_protocol::api::routes;
use qflare_server::api::{CreateTokenRequest, CreatedToken, Revoked, TokenView};

use crate::admin::AdminClient;
use crate::output::{Align, OutputArgs, OutputFormat, Table, print_json, time};

/// Enrollment-token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use token; printed once, alone on the last line.
    Create {
        /// Who or what the token is for.
        #[arg(long)]
        label: String,
        /// How long it stays valid (e.g. 30m, 24h, 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// List tokens (never their values).
    List(OutputArgs),
    /// Revoke an unused token by id.
    Revoke {
        /// The token's id from `token list`.
        id: String,
    },
}

/// Runs a token subcommand against the server.
pub async fn run(client: &AdminClient, command: TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::Create { label, ttl } => {
            let created: CreatedToken = client
                .post(
                    routes::ADMIN_TOKENS,
                    &CreateTokenRequest {
                        label,
                        ttl_secs: ttl.map(|d| d.as_secs().max(1)),
                    },
                )
                .await?;
            println!(
                "token {} for {:?}, valid until {}; it is shown only now:",
                created.id,
                created.label,
                time(created.expires_at)
            );
            println!("{}", created.token);
        }
        TokenCommand::List(output) => {
            let tokens: Vec<TokenView> = client.get(routes::ADMIN_TOKENS).await?;
            match output.output {
                OutputFormat::Json => print_json(&tokens)?,
                OutputFormat::Table => table(&tokens).print(),
            }
        }
        TokenCommand::Revoke { id } => {
            let result: Revoked = client.post(&routes::admin_token_revoke(&id), &()).await?;
            println!(
                "{}",
                if result.revoked {
                    "revoked"
                } else {
                    "not revoked (unknown, used or already revoked)"
                }
            );
        }
    }
    Ok(())
}

/// One line per token; the label last, so it may hold anything.
fn table(tokens: &[TokenView]) -> Table {
    let mut table = Table::new(&[
        ("id", Align::Left),
        ("status", Align::Left),
        ("expires", Align::Left),
        ("used by", Align::Left),
        ("label", Align::Left),
    ]);
    for t in tokens {
        table.row(vec![
            t.id.clone(),
            t.status.clone(),
            time(t.expires_at),
            t.used_by.clone().unwrap_or_else(|| "-".into()),
            t.label.clone(),
        ]);
    }
    table
}

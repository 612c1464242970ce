//! `qflare device`: list and revoke enrolled devices.

use clap::Subcommand;
use qflare_protocol::api::routes;
use qflare_server::api::{DeviceView, Revoked};

use crate::admin::AdminClient;
use crate::output::{Align, OutputArgs, OutputFormat, Table, print_json, time};

/// Device subcommands.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List enrolled devices.
    List(OutputArgs),
    /// Revoke a device: its sessions end and its updates are refused.
    Revoke {
        /// The device id.
        id: String,
    },
}

/// Runs a device subcommand against the server.
pub async fn run(client: &AdminClient, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::List(output) => {
            let devices: Vec<DeviceView> = client.get(routes::ADMIN_DEVICES).await?;
            match output.output {
                OutputFormat::Json => print_json(&devices)?,
                OutputFormat::Table => table(&devices).print(),
            }
        }
        DeviceCommand::Revoke { id } => {
            let result: Revoked = client.post(&routes::admin_device_revoke(&id), &()).await?;
            println!(
                "{}",
                if result.revoked {
                    "revoked"
                } else {
                    "not revoked (unknown or already revoked)"
                }
            );
        }
    }
    Ok(())
}

/// One line per device; the name last.
fn table(devices: &[DeviceView]) -> Table {
    let mut table = Table::new(&[
        ("id", Align::Left),
        ("status", Align::Left),
        ("kem", Align::Left),
        ("signature", Align::Left),
        ("last seen", Align::Left),
        ("name", Align::Left),
    ]);
    for d in devices {
        table.row(vec![
            d.id.clone(),
            d.status.clone(),
            d.kem_suite.clone(),
            d.signature_suite.clone(),
            d.last_seen_at.map_or_else(|| "-".into(), time),
            d.name.clone(),
        ]);
    }
    table
}

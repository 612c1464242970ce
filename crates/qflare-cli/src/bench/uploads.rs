//! `qflare bench uploads`: what one enrolled device can make the server hold
//! in memory by sending many update uploads at once.
//!
//! The server runs as a child process (its own peak RSS is the measure, read
//! from `/proc/<pid>/status` `VmHWM`), started from `--server-bin` (default:
//! this executable) with a minimal configuration that any version of the
//! server reads, so that an older build can be measured the same way. One
//! device enrolls, training starts, and once the device is selected for the
//! open round it opens `--uploads` sessions and sends, on all of them at
//! once, a sealed body as large as the update limit allows. The bodies are
//! sealed correctly (they pass the session layer) but hold no valid
//! envelope: what is measured is the memory the server commits before it can
//! tell, not the enclave's work.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use qflare_protocol::api::routes;
use qflare_protocol::federation::ModelQuery;
use qflare_protocol::wire::{self, limits};
use qflare_server::ratelimit::RateLimit;

use super::child_server::{self, ChildConfig, ChildServer, mib};

/// `qflare bench uploads` options.
#[derive(Debug, clap::Args)]
pub struct UploadsArgs {
    /// Concurrent uploads from the one device.
    #[arg(long, default_value_t = 50)]
    pub uploads: usize,
    /// The server executable to measure (default: this one). Its enclave
    /// executable must sit beside it, as in a build directory.
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// The built-in model the federation trains (sets the update size).
    #[arg(long, default_value = "mnist-cnn")]
    pub architecture: String,
}

/// Runs the benchmark; prints a markdown table.
pub async fn run(args: UploadsArgs) -> anyhow::Result<()> {
    if args.uploads == 0 {
        bail!("--uploads must be at least 1");
    }
    let bin = child_server::server_bin(args.server_bin)?;
    // Uploads, not handshakes, are what is measured: the per-address and
    // per-device limits are raised so that opening the sessions never waits.
    let raised = RateLimit {
        per_minute: 60_000,
        burst: 10_000,
    };
    let server = ChildServer::start(
        &bin,
        "qflare-bench-uploads-",
        &ChildConfig::new(
            &args.architecture,
            &[("sessions", raised), ("device", raised)],
        ),
    )
    .await?;
    let identity = server.enroll("bench-uploader", "device").await?;
    let transport = qflare_edge::transport_for(&identity)?;
    let mut first = qflare_edge::open_session(&identity, &transport).await?;
    child_server::wait_for_training(&mut first).await?;
    // The update limit follows the model: as large a body as it admits.
    let download = first
        .call_raw(
            routes::CURRENT_MODEL,
            wire::encode(&ModelQuery::default())?,
            1 << 30,
        )
        .await?;
    let (_, model) = qflare_protocol::federation::decode_model_download(&download)?;
    let body_limit = limits::sealed_record_for(limits::update_envelope_for(model.len()));
    let plaintext = body_limit.saturating_sub(qflare_protocol::channel::RECORD_OVERHEAD);

    let mut sessions = vec![first];
    for _ in 1..args.uploads {
        sessions.push(qflare_edge::open_session(&identity, &transport).await?);
    }
    let peak_before = server.memory()?.peak;
    eprintln!(
        "flooding: {} concurrent uploads of {:.1} MB from one device",
        args.uploads,
        plaintext as f64 / 1e6
    );
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for mut session in sessions {
        tasks.spawn(async move {
            let body = vec![0x5a_u8; plaintext];
            match session.call_raw(routes::UPDATES, body, 1 << 16).await {
                Ok(_) => "200".to_owned(),
                Err(err) => match err.error_code() {
                    Some(code) => code.as_str().to_owned(),
                    None => format!("no answer ({err})"),
                },
            }
        });
    }
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    while let Some(outcome) = tasks.join_next().await {
        *outcomes.entry(outcome?).or_default() += 1;
    }
    let elapsed = started.elapsed();
    let after = server.memory()?;
    println!(
        "| server | uploads × body | answers | server peak RSS before | during the flood | RSS after | flood time |"
    );
    println!("|---|---|---|---|---|---|---|");
    let answers = outcomes
        .iter()
        .map(|(code, n)| format!("{n}× {code}"))
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "| {} | {} × {:.1} MB | {answers} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {:.1} s |",
        bin.display(),
        args.uploads,
        plaintext as f64 / 1e6,
        mib(peak_before),
        mib(after.peak),
        mib(after.current),
        elapsed.as_secs_f64()
    );
    drop(server);
    Ok(())
}

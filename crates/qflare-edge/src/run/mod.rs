//! The device loop (steps 3 and 4 of the protocol): session, round, verify
//! the enclave and the model, train, sign, seal, submit, wait.
//!
//! ```text
//!   ┌──────────────────────────────────────────────────────────────────┐
//!   │ open a session if there is none or it expires within a minute    │
//!   │ POST /v1/rounds/current {nonce}   → RoundInfo + report(nonce)    │
//!   │   waiting / not_selected / submitted → ask again, held by the    │
//!   │     server until that answer changes (long poll; an unheld one   │
//!   │     sleeps poll_after first)                                     │
//!   │   finished → stop (or keep polling)                              │
//!   │   train:                                                         │
//!   │     verify the report against the policy and OUR nonce           │
//!   │     model: cached by version, else POST /v1/models/current and   │
//!   │       check key hash, certificate, version, architecture, layout │
//!   │     LocalTrainer::fit on a blocking thread → trained − global    │
//!   │     seal(update) to the attested KEM key; POST /v1/updates       │
//!   └──────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Nothing from a round answer is used before its report verifies, and no
//! model is trained on before its certificate verifies under the key that
//! report vouches for: a host that alters the model, replays an old one or
//! swaps in another enclave is refused here, before any local data is touched.
//!
//! Failures are sorted by what they mean (`Disposition` in the source):
//! a revoked device stops cleanly; a closed, duplicate or late round is
//! skipped; a restarted enclave, or a round the server resumes after its own
//! restart, gets the *same* trained update re-sealed to the new enclave key
//! (no retraining) — once per round: asked to seal it to yet another key, the
//! device drops it and waits for the next round, so a host that keeps
//! restarting the enclave gets no more envelopes of one update than a single
//! crash needs; an expired session is replaced; network
//! errors, 429, 5xx and a restarting enclave back off exponentially with
//! jitter ([`Backoff`]); refusals (a report, model or round that fails a
//! check) skip the round, or end the run when [`DeviceConfig::fail_on_refusal`]
//! is set; anything else ends the run with the error.
//!
//! The parts: [`config`](DeviceConfig) and [`events`](DeviceEvent) are what a
//! caller sees; `verify` holds the checks of reports and models; `link` the
//! three sealed calls; `runner` the loop and `disposition` what each failure
//! means to it; `train` and `submit` the two halves of a round's work.
//! Training itself is whatever [`LocalTrainer`](crate::LocalTrainer)
//! [`DeviceConfig::trainer`] holds; the loop only verifies what goes in and
//! checks and seals what comes out.

mod config;
mod disposition;
mod events;
mod link;
mod runner;
mod submit;
mod train;
mod verify;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::time::Duration;

pub use config::{Backoff, DeviceConfig, TamperFn};
pub use events::{
    DeviceEvent, Events, RoundRecord, RoundTimings, RunSummary, StopOutcome, StopReason,
};
pub use link::{
    LONG_POLL_SECS, MODEL_DOWNLOAD_LIMIT, RECEIPT_LIMIT, ROUND_INFO_LIMIT, UNHELD_POLL,
};
pub use submit::{CODE_RECEIPT_LOST, CODE_RESEAL_LIMIT, STATUS_SUBMITTED};
pub use verify::{
    decode_model, verify_model_certificate, verify_model_download, verify_round_report,
};

use crate::client::transport_for;
use crate::error::EdgeError;
use crate::identity::Identity;
use link::{HttpLink, Link};
use runner::Runner;

/// Runs the device until the server finishes training, `max_rounds`
/// submissions were made, the device is revoked (all `Ok`), or an error
/// that retrying cannot fix (`Err`). Every step is reported to `events`.
///
/// Cancel it by dropping the future; a training step already running on the
/// blocking pool finishes on its own and its result is discarded.
pub async fn run_device(
    identity: &Identity,
    config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    let transport = match transport_for(identity) {
        Ok(transport) => transport,
        Err(err) => {
            events.emit(DeviceEvent::Stopped(StopOutcome::Failed(err.to_string())));
            return Err(err);
        }
    };
    let link = HttpLink {
        identity,
        transport,
        session: None,
    };
    drive(identity, link, config, events).await
}

/// The loop over any [`Link`]; reports how it ended.
pub(crate) async fn drive<L: Link>(
    identity: &Identity,
    link: L,
    config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    let result = drive_inner(identity, link, config, events.clone()).await;
    match &result {
        Ok(summary) => events.emit(DeviceEvent::Stopped(StopOutcome::Stopped(summary.stop))),
        Err(err) => events.emit(DeviceEvent::Stopped(StopOutcome::Failed(err.to_string()))),
    }
    result
}

async fn drive_inner<L: Link>(
    identity: &Identity,
    link: L,
    config: DeviceConfig,
    events: Events,
) -> Result<RunSummary, EdgeError> {
    config.validate()?;
    let runner = Runner {
        identity,
        link,
        config,
        events,
        in_handshake: false,
        model: None,
        pending: None,
        clock: None,
        working_round: None,
        last_plan: None,
        final_evaluated: false,
        done_rounds: BTreeSet::new(),
        handshakes: Duration::ZERO,
        failures: 0,
        waiting_on: None,
        summary: RunSummary {
            stop: StopReason::Finished,
            rounds: Vec::new(),
            sessions_opened: 0,
            models_downloaded: 0,
            refusals: 0,
            reseals: 0,
            skipped: 0,
            retries: 0,
        },
    };
    runner.run().await
}

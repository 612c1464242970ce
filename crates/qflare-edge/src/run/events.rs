//! What a running device reports: progress events for a terminal UI, a demo
//! or a benchmark; where each round's time went; and the run's summary.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use qflare_protocol::attestation::AttestationMode;
use qflare_protocol::federation::RoundStatus;
use serde::Serialize;
use tokio::sync::mpsc;

/// Where each part of a round's time went.
///
/// Phases are summed durations, not wall-clock spans: retries add to them,
/// waits between polls do not. Handshakes are charged to the next round
/// submitted, so a round that reused an earlier session carries none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RoundTimings {
    /// Session handshakes (KEM to the long-term and ephemeral keys, the
    /// server's and device's signatures, two HTTPS round trips).
    pub session: Duration,
    /// `POST /v1/rounds/current` round trips for this round.
    pub round_query: Duration,
    /// Verifying the enclave's attestation reports (ML-DSA).
    pub attestation: Duration,
    /// `POST /v1/models/current` round trip (zero when the model was cached).
    pub download: Duration,
    /// Checking the model certificate (SHA-256 of the model, ML-DSA).
    pub model_verify: Duration,
    /// Decoding the safetensors bytes and checking the architecture.
    pub model_decode: Duration,
    /// Local training: the [`LocalTrainer`](crate::LocalTrainer)'s `fit`,
    /// which also computes the delta.
    pub training: Duration,
    /// Checking the update's layout, the tamper hook if any, and
    /// safetensors encoding.
    pub update_encode: Duration,
    /// `envelope::seal`: inner signature, encapsulation, AES-GCM, outer signature.
    pub sealing: Duration,
    /// `POST /v1/updates` round trip.
    pub submission: Duration,
    /// Wall clock from the round's first `train` answer to its receipt,
    /// back-off and re-seals included.
    pub wall: Duration,
}

impl RoundTimings {
    /// The sum of the phases (without `wall`).
    pub fn total(&self) -> Duration {
        self.session
            + self.round_query
            + self.attestation
            + self.download
            + self.model_verify
            + self.model_decode
            + self.training
            + self.update_encode
            + self.sealing
            + self.submission
    }

    /// The phases that exist only for the cryptography: handshakes,
    /// report and certificate checks, and sealing. (The session channel's
    /// AES-GCM on each request and answer is inside the network phases.)
    pub fn cryptography(&self) -> Duration {
        self.session + self.attestation + self.model_verify + self.sealing
    }

    /// `cryptography / total`, in `[0, 1]` (0 for an empty record).
    pub fn cryptography_share(&self) -> f64 {
        let total = self.total().as_secs_f64();
        if total > 0.0 {
            self.cryptography().as_secs_f64() / total
        } else {
            0.0
        }
    }
}

/// Why a run ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The server said training has finished.
    Finished,
    /// [`super::DeviceConfig::max_rounds`] submissions were made.
    MaxRounds,
    /// The admin revoked this device.
    Revoked,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Finished => "training finished",
            Self::MaxRounds => "maximum number of rounds reached",
            Self::Revoked => "device revoked",
        })
    }
}

/// What a running device reports, for a terminal UI, a demo or a benchmark.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum DeviceEvent {
    /// A session was established.
    SessionOpened {
        /// The session id (public: it travels in a header).
        session_id: String,
        /// Unix seconds when it expires.
        expires_at: u64,
        /// How long the handshake took.
        elapsed: Duration,
    },
    /// The server answered a round query (the report was not checked yet).
    RoundSeen {
        /// The open round, if any.
        round_id: Option<u64>,
        /// What the server asks of this device.
        status: RoundStatus,
    },
    /// The enclave's report verified for this round.
    EnclaveAttested {
        /// The round.
        round_id: u64,
        /// The enclave's measurement, hex.
        measurement: String,
        /// How the report is vouched for: `software` means self-signed by a
        /// hardened process, with no hardware behind it.
        mode: AttestationMode,
    },
    /// The global model verified (or was taken from the cache).
    ModelVerified {
        /// Its version.
        version: u64,
        /// Its name (the certificate's `architecture`, e.g. `mnist-cnn`).
        architecture: String,
        /// Size of the safetensors bytes.
        bytes: usize,
        /// True when it came from the cache rather than a download.
        cached: bool,
    },
    /// The trainer's evaluation of the round's global model was reported.
    Evaluated {
        /// The round.
        round_id: u64,
        /// The evaluated model version.
        model_version: u64,
        /// Held-out examples.
        examples: u64,
        /// The metrics.
        metrics: std::collections::BTreeMap<String, f64>,
    },
    /// Local training progress (examples processed, at most every 1 %).
    Training {
        /// The round.
        round_id: u64,
        /// Examples processed so far (each epoch counts again).
        done: usize,
        /// `epochs * examples`.
        total: usize,
    },
    /// An already trained update is sealed again after a failed submission
    /// (to a restarted enclave's new key, or over a new session), not retrained.
    Resealing {
        /// The round.
        round_id: u64,
    },
    /// The server answered a submission.
    Submitted {
        /// The round.
        round_id: u64,
        /// `accepted`, `pending`, `rejected` (or [`super::STATUS_SUBMITTED`]).
        status: String,
        /// The enclave's reason code (or [`super::CODE_RECEIPT_LOST`]).
        code: String,
        /// Bytes of the update as sealed to the enclave (KEM ciphertext and
        /// sealed payload): what the server stored and forwarded. `None`
        /// when the receipt was lost and the server's word stands for it.
        sealed_bytes: Option<u64>,
        /// Where the round's time went.
        timings: RoundTimings,
    },
    /// This device leaves the round and polls again (the server's code).
    Skipped {
        /// The round.
        round_id: Option<u64>,
        /// `not_selected`, `duplicate`, `deadline_passed` or `round_closed`.
        code: String,
    },
    /// A report, model or round failed a check; nothing was trained or sealed.
    Refused {
        /// The round, if known.
        round_id: Option<u64>,
        /// What failed.
        reason: String,
    },
    /// A retryable failure; the device waits `delay` and tries again.
    Retrying {
        /// Consecutive failures so far.
        attempt: u32,
        /// The wait.
        delay: Duration,
        /// What failed.
        error: String,
    },
    /// The device sleeps before polling again.
    Waiting {
        /// Seconds (the server's `poll_after_secs`, clamped).
        secs: u64,
    },
    /// The run ended.
    Stopped(StopOutcome),
}

/// How a run ended, as reported in [`DeviceEvent::Stopped`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Cleanly, for this reason.
    Stopped(StopReason),
    /// With this error (also returned by [`super::run_device`]).
    Failed(String),
}

/// Where events go: nowhere, a callback, or a channel.
#[derive(Clone, Default)]
pub struct Events {
    sink: Option<Arc<dyn Fn(DeviceEvent) + Send + Sync>>,
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.sink.is_some() {
            "Events(sink)"
        } else {
            "Events(none)"
        })
    }
}

impl Events {
    /// Drops every event.
    pub fn none() -> Self {
        Self::default()
    }

    /// Calls `f` with every event, on the thread that produced it (training
    /// progress comes from a blocking thread): keep it quick.
    pub fn from_fn(f: impl Fn(DeviceEvent) + Send + Sync + 'static) -> Self {
        Self {
            sink: Some(Arc::new(f)),
        }
    }

    /// Sends every event to the returned receiver (dropped silently once the
    /// receiver is gone).
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<DeviceEvent>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self::from_fn(move |event| {
                let _ = tx.send(event);
            }),
            rx,
        )
    }

    /// Reports `event`.
    pub fn emit(&self, event: DeviceEvent) {
        if let Some(sink) = &self.sink {
            sink(event);
        }
    }
}

/// One round this device submitted to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundRecord {
    /// The round.
    pub round_id: u64,
    /// The global model version trained from.
    pub model_version: u64,
    /// Local examples (FedAvg's weight).
    pub examples: u64,
    /// Mean training loss (the trainer's
    /// [`LOSS_METRIC`](crate::LOSS_METRIC); NaN if it reports none).
    pub mean_loss: f64,
    /// The receipt's status.
    pub status: String,
    /// The receipt's code.
    pub code: String,
    /// Where the time went.
    pub timings: RoundTimings,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// Why it stopped.
    pub stop: StopReason,
    /// Every submission, in order.
    pub rounds: Vec<RoundRecord>,
    /// Sessions opened.
    pub sessions_opened: u32,
    /// Models downloaded and verified.
    pub models_downloaded: u32,
    /// Reports, models or rounds refused.
    pub refusals: u32,
    /// Trained updates sealed again after a failed submission (a restarted
    /// enclave's new key, a lost session or connection), without retraining.
    pub reseals: u32,
    /// Rounds skipped on the server's word.
    pub skipped: u32,
    /// Retries after retryable failures.
    pub retries: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_add_up() {
        let ms = Duration::from_millis;
        let t = RoundTimings {
            session: ms(10),
            round_query: ms(5),
            attestation: ms(1),
            download: ms(20),
            model_verify: ms(4),
            model_decode: ms(2),
            training: ms(900),
            update_encode: ms(3),
            sealing: ms(5),
            submission: ms(50),
            wall: ms(2000),
        };
        assert_eq!(t.total(), ms(1000));
        assert_eq!(t.cryptography(), ms(20));
        assert!((t.cryptography_share() - 0.02).abs() < 1e-12);
        assert_eq!(RoundTimings::default().cryptography_share(), 0.0);
    }
}

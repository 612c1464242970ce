//! How a device runs: its attestation policy, local trainer, limits, back-off, and
//! (for simulations only) the tamper hook.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use qflare_protocol::attestation::AttestationPolicy;
use qflare_protocol::tensor::TensorMap;
use rand::RngExt;

use crate::error::EdgeError;
use crate::trainer::LocalTrainer;

/// A hook that rewrites the update before it is sealed, given the round it
/// is for.
///
/// **For simulations only**: malicious devices' poisoning attacks (scaled,
/// sign-flipped or noisy updates, or updates crafted from the round's
/// honest ones), and honest devices showing their updates to the
/// simulation's omniscient attackers. A real device never sets one.
pub type TamperFn = Arc<dyn Fn(u64, TensorMap) -> TensorMap + Send + Sync>;

/// Exponential back-off with jitter for retryable failures.
///
/// Attempt `a` (from 0) waits between half and all of
/// `min(cap, initial * 2^a)` ("equal jitter"), so waits grow, never exceed
/// the cap, and devices that failed together do not retry together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub initial: Duration,
    /// No wait is longer than this.
    pub cap: Duration,
    /// Consecutive failures tolerated before the run ends with the last
    /// error; `None` retries forever (a device in the field).
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            cap: Duration::from_secs(30),
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// The longest wait of attempt `attempt` (from 0): `min(cap, initial * 2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The wait before retry `attempt` (from 0): uniform in
    /// `[ceiling / 2, ceiling]`.
    pub fn delay<R: rand::Rng + ?Sized>(&self, attempt: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rng.random_range(0..=spread))
    }
}

/// How a device runs.
#[derive(Clone)]
pub struct DeviceConfig {
    /// Which enclaves this device seals updates to (measurements, modes, report age).
    pub policy: AttestationPolicy,
    /// Local training over the device's private data (e.g. a
    /// [`BurnTrainer`](crate::BurnTrainer) over a local shard).
    pub trainer: Arc<dyn LocalTrainer>,
    /// Stop after this many submissions (rounds that got a receipt); `None` runs on.
    pub max_rounds: Option<u64>,
    /// Stop when the server says training has finished (otherwise keep polling).
    pub stop_when_finished: bool,
    /// End the run at the first refused report, model or round instead of
    /// skipping the round (tests and demos that must see the refusal).
    pub fail_on_refusal: bool,
    /// Back-off for retryable failures.
    pub backoff: Backoff,
    /// Longest wait between polls, whatever the server asks (at least 1 s).
    pub max_poll_secs: u64,
    /// Open a new session when the current one has less than this left.
    pub session_margin_secs: u64,
    /// Refuse rounds asking for more local epochs than this (a host must not
    /// be able to pin the device's CPU indefinitely).
    pub max_local_epochs: usize,
    /// Mixed with the device id and round id into each round's shuffle seed.
    pub train_seed: u64,
    /// For simulations of malicious devices only: see [`TamperFn`].
    pub tamper: Option<TamperFn>,
}

impl fmt::Debug for DeviceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceConfig")
            .field("policy", &self.policy)
            .field("trainer", &"set")
            .field("max_rounds", &self.max_rounds)
            .field("stop_when_finished", &self.stop_when_finished)
            .field("fail_on_refusal", &self.fail_on_refusal)
            .field("backoff", &self.backoff)
            .field("max_poll_secs", &self.max_poll_secs)
            .field("session_margin_secs", &self.session_margin_secs)
            .field("max_local_epochs", &self.max_local_epochs)
            .field("train_seed", &self.train_seed)
            .field("tamper", &self.tamper.as_ref().map(|_| "set"))
            .finish()
    }
}

impl DeviceConfig {
    /// A configuration with the defaults: run until the server finishes,
    /// skip refused rounds, retry forever, poll at most every 60 s, renew the
    /// session a minute before it expires, at most 50 local epochs.
    pub fn new(policy: AttestationPolicy, trainer: Arc<dyn LocalTrainer>) -> Self {
        Self {
            policy,
            trainer,
            max_rounds: None,
            stop_when_finished: true,
            fail_on_refusal: false,
            backoff: Backoff::default(),
            max_poll_secs: 60,
            session_margin_secs: 60,
            max_local_epochs: 50,
            train_seed: 0,
            tamper: None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), EdgeError> {
        if let Some(why) = self.policy.why_nothing_passes() {
            return Err(EdgeError::Config(why));
        }
        self.trainer.check().map_err(EdgeError::Config)?;
        if self.max_local_epochs == 0 {
            return Err(EdgeError::Config(
                "max_local_epochs must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

//! The loop itself: poll the round, sort every failure by what it means
//! ([`super::disposition`]), and hand a `train` answer to the round's work
//! ([`super::train`], then [`super::submit`], which extend [`Runner`]). The
//! loop's state — the cached model, the pending update, the rounds already
//! done — lives here.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qflare_protocol::attestation::ATTESTATION_NONCE_LEN;
use qflare_protocol::federation::{RoundPosition, RoundQuery, RoundStatus};
use qflare_protocol::tensor::TensorMap;
use rand::RngExt;
use zeroize::Zeroizing;

use super::config::DeviceConfig;
use super::disposition::{Disposition, classify, is_benign_refusal};
use super::events::{DeviceEvent, Events, RoundTimings, RunSummary, StopReason};
use super::link::{LONG_POLL_SECS, Link, UNHELD_POLL};
use crate::error::EdgeError;
use crate::identity::Identity;

/// The verified global model, kept so polling does not download it again.
pub(super) struct CachedModel {
    pub(super) version: u64,
    pub(super) architecture: String,
    pub(super) bytes: usize,
    pub(super) weights: Arc<TensorMap>,
}

/// A trained update waiting for (or being re-sealed after) submission.
pub(super) struct PendingUpdate {
    pub(super) round_id: u64,
    pub(super) model_version: u64,
    pub(super) examples: u64,
    pub(super) mean_loss: f64,
    /// The trainer's evaluation of the global model, reported after the update.
    pub(super) evaluation: Option<crate::trainer::EvalResult>,
    /// The safetensors bytes of the delta: derived from private data, so
    /// wiped on drop.
    pub(super) bytes: Zeroizing<Vec<u8>>,
    /// The last submission was answered `enclave_restarting`: the server
    /// holds nothing the new enclave can open, whatever the round status
    /// says, so the update waits for the next `train` answer to be re-sealed.
    pub(super) awaiting_reseal: bool,
    /// A receipt (or the server's word) says the update arrived. It is
    /// kept until the round is over all the same: a server or enclave that
    /// restarts resumes the round and asks for it again, to be re-sealed
    /// to the new enclave boot instead of trained again.
    pub(super) delivered: bool,
    /// SHA-256 of the enclave KEM key the update was last sealed to.
    pub(super) sealed_to: Option<[u8; 32]>,
    /// How often it was sealed to a key other than the one before.
    pub(super) rekeys: u32,
}

/// How often one round's update may be sealed to a new enclave key. Each
/// re-seal hands the host a fresh envelope it can have an enclave open in a
/// round of its choosing; one is what a single crash of the server or the
/// enclave needs, and a host that restarts the enclave again and again gets
/// no more than that.
pub(super) const MAX_REKEYS: u32 = 1;

impl PendingUpdate {
    /// Whether sealing to the enclave key with this digest is allowed: the
    /// key it was last sealed to, or a new one while re-keys are left.
    pub(super) fn may_seal_to(&self, key: &[u8; 32]) -> bool {
        self.sealed_to.is_none_or(|before| before == *key) || self.rekeys < MAX_REKEYS
    }
}

/// Timing of the round being worked on.
pub(super) struct RoundClock {
    pub(super) round_id: u64,
    pub(super) started: Instant,
    pub(super) timings: RoundTimings,
}

pub(super) enum Next {
    /// Ask again at once.
    Now,
    /// Sleep this many seconds, then ask again.
    Poll(u64),
    /// End the run.
    Stop(StopReason),
}

pub(super) struct Runner<'a, L> {
    pub(super) identity: &'a Identity,
    pub(super) link: L,
    pub(super) config: DeviceConfig,
    pub(super) events: Events,
    pub(super) in_handshake: bool,
    pub(super) model: Option<CachedModel>,
    pub(super) pending: Option<PendingUpdate>,
    pub(super) clock: Option<RoundClock>,
    /// The round the last `train` answer named (what a skip code refers to).
    pub(super) working_round: Option<u64>,
    /// The training plan of the last round trained (what the final
    /// evaluation's task carries).
    pub(super) last_plan: Option<qflare_protocol::federation::TrainingPlan>,
    /// The final model's evaluation was attempted (once per run).
    pub(super) final_evaluated: bool,
    /// Rounds submitted to or skipped: never worked on again.
    pub(super) done_rounds: BTreeSet<u64>,
    /// Handshake time not yet charged to a round.
    pub(super) handshakes: Duration,
    pub(super) failures: u32,
    pub(super) summary: RunSummary,
    /// The last answer while it sends the device nowhere (`waiting`,
    /// `not_selected`, `submitted`, `finished`): the next poll asks the
    /// server to hold its answer until that changes (a long poll).
    pub(super) waiting_on: Option<RoundPosition>,
}

impl<L: Link> Runner<'_, L> {
    pub(super) async fn run(mut self) -> Result<RunSummary, EdgeError> {
        if self.config.max_rounds == Some(0) {
            return Ok(self.finish(StopReason::MaxRounds));
        }
        loop {
            let err = match self.step().await {
                Ok(Next::Now) => {
                    self.failures = 0;
                    continue;
                }
                Ok(Next::Poll(secs)) => {
                    self.failures = 0;
                    self.wait(secs).await;
                    continue;
                }
                Ok(Next::Stop(reason)) => return Ok(self.finish(reason)),
                Err(err) => err,
            };
            let disposition = classify(&err, self.in_handshake);
            self.in_handshake = false;
            match disposition {
                Disposition::Revoked => {
                    tracing::warn!("this device has been revoked; stopping");
                    return Ok(self.finish(StopReason::Revoked));
                }
                Disposition::SkipRound => {
                    let round_id = self.working_round.take();
                    tracing::info!(
                        ?round_id,
                        code = err.code().unwrap_or(""),
                        "skipping the round"
                    );
                    if let Some(round_id) = round_id {
                        self.done_rounds.insert(round_id);
                    }
                    self.pending = None;
                    self.clock = None;
                    self.summary.skipped += 1;
                    self.events.emit(DeviceEvent::Skipped {
                        round_id,
                        code: err.code().unwrap_or("").to_owned(),
                    });
                    // The next round answer says how long to wait.
                    self.failures = 0;
                }
                Disposition::Reseal => {
                    // Keep the trained update; the next `train` answer carries
                    // the new enclave's report and the update is sealed again.
                    tracing::info!("the enclave is restarting; will re-attest and re-seal");
                    if let Some(pending) = self.pending.as_mut() {
                        pending.awaiting_reseal = true;
                    }
                    self.back_off(err).await?;
                }
                Disposition::Reconnect => {
                    tracing::info!(error = %err, "session ended; opening another");
                    self.link.drop_session();
                    if self.failures == 0 {
                        self.failures = 1;
                    } else {
                        self.back_off(err).await?;
                    }
                }
                Disposition::Refusal => self.refused(err).await?,
                Disposition::Retry => self.back_off(err).await?,
                Disposition::Fatal => return Err(err),
            }
        }
    }

    fn finish(mut self, reason: StopReason) -> RunSummary {
        self.summary.stop = reason;
        self.summary
    }

    async fn wait(&self, secs: u64) {
        self.events.emit(DeviceEvent::Waiting { secs });
        // Up to 10 % of jitter (at most 1 s) so devices told the same
        // interval spread out instead of polling in lockstep.
        let jitter_ms = rand::rng().random_range(0..=secs.min(10) * 100);
        tokio::time::sleep(Duration::from_secs(secs) + Duration::from_millis(jitter_ms)).await;
    }

    async fn back_off(&mut self, err: EdgeError) -> Result<(), EdgeError> {
        self.failures = self.failures.saturating_add(1);
        if self
            .config
            .backoff
            .max_attempts
            .is_some_and(|max| self.failures > max)
        {
            return Err(err);
        }
        let delay = self
            .config
            .backoff
            .delay(self.failures - 1, &mut rand::rng());
        self.summary.retries += 1;
        tracing::warn!(error = %err, attempt = self.failures, delay_ms = delay.as_millis() as u64, "retrying");
        self.events.emit(DeviceEvent::Retrying {
            attempt: self.failures,
            delay,
            error: err.to_string(),
        });
        tokio::time::sleep(delay).await;
        Ok(())
    }

    async fn refused(&mut self, err: EdgeError) -> Result<(), EdgeError> {
        let round_id = self.working_round;
        tracing::warn!(?round_id, error = %err, "refused; nothing was trained or sealed");
        self.summary.refusals += 1;
        self.events.emit(DeviceEvent::Refused {
            round_id,
            reason: err.to_string(),
        });
        let benign = is_benign_refusal(&err);
        if self.config.fail_on_refusal && !benign {
            return Err(err);
        }
        if !benign && let Some(round_id) = self.working_round.take() {
            self.done_rounds.insert(round_id);
            self.pending = None;
            self.clock = None;
        }
        // Back off so a host that keeps failing checks is not hammered.
        self.back_off(err).await
    }

    /// Makes sure a session is open with time to spare, opening one if not.
    pub(super) async fn ensure_session(&mut self) -> Result<(), EdgeError> {
        if self.link.has_session(self.config.session_margin_secs) {
            return Ok(());
        }
        self.in_handshake = true;
        let started = Instant::now();
        let (session_id, expires_at) = self.link.open_session().await?;
        let elapsed = started.elapsed();
        self.in_handshake = false;
        self.handshakes += elapsed;
        self.summary.sessions_opened += 1;
        tracing::debug!(session = %session_id, ?elapsed, "session opened");
        self.events.emit(DeviceEvent::SessionOpened {
            session_id,
            expires_at,
            elapsed,
        });
        Ok(())
    }

    pub(super) fn timings(&mut self, round_id: u64) -> &mut RoundTimings {
        let clock = match self.clock.take() {
            Some(clock) if clock.round_id == round_id => clock,
            _ => RoundClock {
                round_id,
                started: Instant::now(),
                timings: RoundTimings::default(),
            },
        };
        &mut self.clock.insert(clock).timings
    }

    async fn step(&mut self) -> Result<Next, EdgeError> {
        let nonce: [u8; ATTESTATION_NONCE_LEN] = rand::random();
        let query = RoundQuery {
            nonce: Some(nonce),
            wait_while: self.waiting_on.take(),
        };
        let started = Instant::now();
        self.ensure_session().await?;
        let info = self.link.round(&query).await?;
        let query_time = started.elapsed();
        self.waiting_on =
            (info.status != RoundStatus::Train).then(|| RoundPosition::of(&info, LONG_POLL_SECS));
        self.events.emit(DeviceEvent::RoundSeen {
            round_id: info.round_id,
            status: info.status,
        });
        let interval = info
            .poll_after_secs
            .clamp(1, self.config.max_poll_secs.max(1));
        // A held poll paces the loop by itself: after it, ask again at once.
        // Only an answer that came back at once and unchanged (a server
        // that does not hold polls) waits the server's interval.
        let answered_unheld = query
            .wait_while
            .is_some_and(|seen| seen.unchanged_in(&info) && query_time < UNHELD_POLL);
        let poll = if answered_unheld {
            Next::Poll(interval)
        } else {
            Next::Now
        };
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.delivered && info.round_id.is_some_and(|id| id != p.round_id))
        {
            // Another round: the delivered update will not be asked for again.
            self.pending = None;
        }
        match info.status {
            RoundStatus::Finished => {
                self.pending = None;
                self.clock = None;
                self.evaluate_final_model(&info, &nonce).await;
                if self.config.stop_when_finished {
                    Ok(Next::Stop(StopReason::Finished))
                } else {
                    Ok(poll)
                }
            }
            RoundStatus::Waiting => Ok(poll),
            RoundStatus::NotSelected => {
                if self.pending.as_ref().map(|p| Some(p.round_id)) == Some(info.round_id) {
                    self.pending = None;
                    self.clock = None;
                }
                Ok(poll)
            }
            RoundStatus::Submitted => {
                self.receipt_lost(info.round_id);
                Ok(poll)
            }
            RoundStatus::Train => self.train_round(info, &nonce, query_time).await,
        }
    }
}

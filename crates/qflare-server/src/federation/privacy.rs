//! Central differential privacy on the controller's side (the enclave adds
//! the noise: `qflare_enclave::privacy`): which devices a private round
//! samples, and how much of the budget the rounds so far have spent.
//!
//! * **Sampling.** With `aggregation.privacy` set, each eligible device is
//!   selected independently with probability q (Poisson sampling), q being
//!   `federation.fraction`, or `clients_per_round` over the eligible devices.
//!   That is the sampling the accountant's bound is for; fixed-size sampling
//!   (the controller's default) would need another analysis.
//! * **The spent budget is read from the store**, not kept in memory: every
//!   round records its (q, z) in its `config_json`, and ε is the composition
//!   over all of them. A restarted server, or another replica taking over
//!   coordination, therefore continues from what was spent. Every recorded
//!   private round counts whatever its state: one that failed after the
//!   enclave aggregated would otherwise be free, and counting all of them
//!   errs on the side of privacy.
//! * **The budget**: before a private round opens, the controller asks
//!   whether ε after it stays within `epsilon_budget`
//!   ([`Federation::privacy_allows`]); the first refusal is logged and
//!   ledgered (`privacy_budget_reached`) and the federation reports itself
//!   finished, so devices stop.

use qflare_enclave::privacy::PrivacyConfig;
use qflare_enclave::privacy::accountant::{AccountantError, RdpAccountant};
use qflare_store::RoundRecord;
use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Federation, FederationError};
use crate::ledger::AuditKind;

/// What a private round records under `"privacy"` in its `config_json`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundPrivacy {
    /// q: each eligible device's chance of being selected.
    pub sampling_rate: f64,
    /// z.
    pub noise_multiplier: f64,
    /// q × the eligible devices: the noised sum's denominator.
    pub expected_participants: f64,
}

impl RoundPrivacy {
    /// The parameters `record` was opened with, if it was private.
    pub fn of_record(record: &RoundRecord) -> Option<Self> {
        let config: serde_json::Value = serde_json::from_str(&record.config_json).ok()?;
        serde_json::from_value(config.get("privacy")?.clone()).ok()
    }
}

/// Where the budget stands.
#[derive(Debug, Clone, PartialEq)]
pub struct PrivacySpent {
    /// ε of (ε, δ) over every private round recorded.
    pub epsilon: f64,
    /// δ.
    pub delta: f64,
    /// The configured budget.
    pub budget: Option<f64>,
    /// Private rounds counted.
    pub rounds: u64,
}

/// The accountant composed over `rounds` (any order), and how many counted.
pub fn accountant_of(rounds: &[RoundRecord]) -> Result<(RdpAccountant, u64), AccountantError> {
    let mut accountant = RdpAccountant::new();
    let mut counted = 0;
    for privacy in rounds.iter().filter_map(RoundPrivacy::of_record) {
        accountant.compose(privacy.noise_multiplier, privacy.sampling_rate, 1)?;
        counted += 1;
    }
    Ok((accountant, counted))
}

/// ε spent over `rounds` under `config`.
pub fn spent(
    config: &PrivacyConfig,
    rounds: &[RoundRecord],
) -> Result<PrivacySpent, AccountantError> {
    let (accountant, counted) = accountant_of(rounds)?;
    Ok(PrivacySpent {
        epsilon: accountant.epsilon(config.delta)?,
        delta: config.delta,
        budget: config.epsilon_budget,
        rounds: counted,
    })
}

/// Each of `eligible` independently with probability `q`.
pub fn poisson_sample<T: Clone, R: Rng + ?Sized>(eligible: &[T], q: f64, rng: &mut R) -> Vec<T> {
    let q = q.clamp(0.0, 1.0);
    eligible
        .iter()
        .filter(|_| rng.random_bool(q))
        .cloned()
        .collect()
}

impl Federation {
    /// Whether one more private round at sampling rate `q` keeps ε within
    /// the budget. The first refusal is logged and ledgered: training stops
    /// there until the budget or the noise is raised.
    pub(super) async fn privacy_allows(
        &self,
        settings: &PrivacyConfig,
        q: f64,
    ) -> Result<bool, FederationError> {
        let Some(budget) = settings.epsilon_budget else {
            return Ok(true);
        };
        let rounds = self.ctx.store.list_rounds(u32::MAX).await?;
        let (accountant, counted) = accountant_of(&rounds).map_err(accountant_error)?;
        let next = accountant
            .epsilon_after(settings.noise_multiplier, q, 1, settings.delta)
            .map_err(accountant_error)?;
        if next <= budget {
            return Ok(true);
        }
        let spent = accountant
            .epsilon(settings.delta)
            .map_err(accountant_error)?;
        let first = !std::mem::replace(&mut self.inner.lock().await.privacy_exhausted, true);
        if first {
            tracing::warn!(
                epsilon = spent,
                next_round_epsilon = next,
                budget,
                delta = settings.delta,
                rounds = counted,
                "privacy budget reached: no more rounds open (raise \
                 aggregation.privacy.epsilon_budget or noise_multiplier to continue)"
            );
            self.ctx
                .auditor
                .audit(
                    AuditKind::PrivacyBudgetReached,
                    "server",
                    "privacy",
                    json!({
                        "epsilon": spent,
                        "next_round_epsilon": next,
                        "budget": budget,
                        "delta": settings.delta,
                        "rounds": counted,
                    }),
                )
                .await;
        }
        Ok(false)
    }

    /// ε and δ spent so far (`None` without central DP), for the ledger.
    pub(super) async fn privacy_spent(&self) -> Result<Option<serde_json::Value>, FederationError> {
        let Some(settings) = &self.ctx.config.aggregation.privacy else {
            return Ok(None);
        };
        let rounds = self.ctx.store.list_rounds(u32::MAX).await?;
        let spent = spent(settings, &rounds).map_err(accountant_error)?;
        Ok(Some(json!({
            "epsilon": spent.epsilon,
            "delta": spent.delta,
            "budget": spent.budget,
            "rounds": spent.rounds,
        })))
    }
}

fn accountant_error(err: AccountantError) -> FederationError {
    FederationError::Inconsistent(format!("privacy accountant: {err}"))
}

#[cfg(test)]
mod tests {
    use qflare_store::RoundState;
    use rand::SeedableRng;

    use super::*;

    fn record(id: u64, config_json: &str) -> RoundRecord {
        RoundRecord {
            id,
            state: RoundState::Completed,
            base_model_version: id - 1,
            config_json: config_json.to_owned(),
            min_updates: 1,
            target_updates: 1,
            opened_at: 0,
            deadline: 0,
            closed_at: None,
            attempt: 1,
            outcome_json: None,
        }
    }

    /// ε is the composition of exactly the rounds that recorded privacy
    /// parameters, so a restart that reads the same rounds continues from
    /// the same ε.
    #[test]
    fn spent_composes_the_recorded_private_rounds() {
        let private = r#"{"architecture":"mnist-2nn","privacy":{"sampling_rate":0.1,"noise_multiplier":1.0,"expected_participants":10.0}}"#;
        let rounds = vec![
            record(1, private),
            record(2, r#"{"architecture":"mnist-2nn"}"#),
            record(3, private),
            record(4, "not json"),
        ];
        let config = PrivacyConfig {
            noise_multiplier: 1.0,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon_budget: Some(5.0),
        };
        let spent = spent(&config, &rounds).unwrap();
        assert_eq!(spent.rounds, 2);
        let expected = RdpAccountant::new()
            .epsilon_after(1.0, 0.1, 2, 1e-5)
            .unwrap();
        assert_eq!(spent.epsilon, expected);
        assert_eq!(spent.budget, Some(5.0));
    }

    #[test]
    fn poisson_sampling_selects_about_q_of_the_devices() {
        let devices: Vec<u32> = (0..10_000).collect();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        let chosen = poisson_sample(&devices, 0.1, &mut rng);
        // Binomial(10000, 0.1): mean 1000, sd 30.
        assert!((880..1120).contains(&chosen.len()), "{}", chosen.len());
        assert!(poisson_sample(&devices, 0.0, &mut rng).is_empty());
        assert_eq!(poisson_sample(&devices, 1.0, &mut rng).len(), 10_000);
    }
}

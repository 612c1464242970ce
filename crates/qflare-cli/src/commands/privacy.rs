//! `qflare privacy`: plan central differential privacy offline with the
//! accountant the server uses (`qflare_enclave::privacy::accountant`):
//! the ε that a number of rounds spends, or the noise multiplier that keeps
//! them within a target ε.

use clap::Subcommand;
use qflare_enclave::privacy::accountant::RdpAccountant;

/// The rounds a plan covers: how often devices are sampled, how many
/// rounds, at which δ.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Plan {
    /// q: each device's chance of taking part in a round.
    #[arg(long)]
    sampling_rate: f64,
    /// Rounds.
    #[arg(long)]
    rounds: u64,
    /// δ.
    #[arg(long, default_value_t = 1e-5)]
    delta: f64,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    json: bool,
}

/// `qflare privacy` subcommands.
#[derive(Debug, Subcommand)]
pub enum PrivacyCommand {
    /// The (ε, δ) that ROUNDS rounds of the Poisson-subsampled Gaussian
    /// mechanism spend.
    Epsilon {
        /// z: noise std over the clipping norm (`aggregation.privacy.noise_multiplier`).
        #[arg(long)]
        noise_multiplier: f64,
        #[command(flatten)]
        plan: Plan,
    },
    /// The smallest noise multiplier (to 0.1%) whose ROUNDS rounds stay
    /// within EPSILON.
    Calibrate {
        /// Target ε.
        #[arg(long)]
        epsilon: f64,
        #[command(flatten)]
        plan: Plan,
    },
}

/// Runs a `qflare privacy` subcommand.
pub fn run(command: &PrivacyCommand) -> anyhow::Result<()> {
    let (noise_multiplier, plan) = match command {
        PrivacyCommand::Epsilon {
            noise_multiplier,
            plan,
        } => (*noise_multiplier, plan),
        PrivacyCommand::Calibrate { epsilon, plan } => (
            calibrate(*epsilon, plan.sampling_rate, plan.rounds, plan.delta)?,
            plan,
        ),
    };
    let Plan {
        sampling_rate,
        rounds,
        delta,
        json,
    } = *plan;
    let epsilon =
        RdpAccountant::new().epsilon_after(noise_multiplier, sampling_rate, rounds, delta)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "epsilon": epsilon,
                "delta": delta,
                "noise_multiplier": noise_multiplier,
                "sampling_rate": sampling_rate,
                "rounds": rounds,
            })
        );
    } else {
        println!(
            "noise_multiplier {noise_multiplier:.4}: ε = {epsilon:.4} at δ = {delta:e} after {rounds} rounds, q = {sampling_rate}"
        );
    }
    Ok(())
}

/// The smallest z (to a relative 1e-3) with ε(z) ≤ `target`: ε falls as z
/// grows, so bisect on z.
pub fn calibrate(target: f64, q: f64, rounds: u64, delta: f64) -> anyhow::Result<f64> {
    anyhow::ensure!(
        target.is_finite() && target > 0.0,
        "--epsilon must be above 0"
    );
    let epsilon = |z: f64| RdpAccountant::new().epsilon_after(z, q, rounds, delta);
    let (mut low, mut high) = (0.01, 1.0);
    while epsilon(high)? > target {
        high *= 2.0;
        anyhow::ensure!(
            high < 1e6,
            "no noise multiplier below 10⁶ reaches ε = {target}"
        );
    }
    while (high - low) / high > 1e-3 {
        let mid = (low + high) / 2.0;
        if epsilon(mid)? > target {
            low = mid;
        } else {
            high = mid;
        }
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_lands_just_under_the_target() {
        let z = calibrate(3.0, 0.05, 100, 1e-5).unwrap();
        let at = RdpAccountant::new()
            .epsilon_after(z, 0.05, 100, 1e-5)
            .unwrap();
        let below = RdpAccountant::new()
            .epsilon_after(z * 0.99, 0.05, 100, 1e-5)
            .unwrap();
        assert!(at <= 3.0 && below > 3.0, "z {z}: {at} {below}");
        assert!(calibrate(0.0, 0.05, 100, 1e-5).is_err());
    }
}

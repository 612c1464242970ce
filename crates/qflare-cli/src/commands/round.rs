//! `qflare round`: start and pause training rounds, and show their state.

use clap::Subcommand;
use qflare_protocol::api::routes;
use qflare_server::api::federation::{FederationView, RoundView};
use serde_json::Value;

use crate::admin::AdminClient;
use crate::output::{Align, OutputArgs, OutputFormat, Table, percent, print_json, seconds, time};

/// Round subcommands.
#[derive(Debug, Subcommand)]
pub enum RoundCommand {
    /// Start (or resume) opening rounds; prints the state after.
    Start(OutputArgs),
    /// Stop opening new rounds (an open round still finishes); prints the state after.
    Pause(OutputArgs),
    /// Rounds, models and their test accuracy.
    Status(OutputArgs),
}

/// Runs a round subcommand against the server and prints the federation's state.
pub async fn run(client: &AdminClient, command: RoundCommand) -> anyhow::Result<()> {
    let (view, format): (FederationView, _) = match command {
        RoundCommand::Start(output) => (
            client.post(routes::ADMIN_ROUNDS_START, &()).await?,
            output.output,
        ),
        RoundCommand::Pause(output) => (
            client.post(routes::ADMIN_ROUNDS_PAUSE, &()).await?,
            output.output,
        ),
        RoundCommand::Status(output) => (client.get(routes::ADMIN_ROUNDS).await?, output.output),
    };
    match format {
        OutputFormat::Json => print_json(&view)?,
        OutputFormat::Table => print!("{}", render(&view)),
    }
    Ok(())
}

/// The federation as text: a status line, the rounds, then the models.
fn render(view: &FederationView) -> String {
    let mut out = format!(
        "training {}; enclave generation {}, measurement {}\n",
        if view.running { "running" } else { "paused" },
        view.enclave_generation,
        view.enclave_measurement.as_deref().unwrap_or("-")
    );
    if let Some(coordinator) = &view.coordinator {
        out.push_str(&format!(
            "coordinator {} (lease epoch {})\n",
            coordinator.address, coordinator.epoch
        ));
    }
    if let Some(privacy) = &view.privacy {
        out.push_str(&format!(
            "differential privacy: ε = {:.3}{} at δ = {:e} after {} private rounds\n",
            privacy.epsilon,
            privacy
                .budget
                .map_or_else(String::new, |b| format!(" of a budget of {b}")),
            privacy.delta,
            privacy.rounds
        ));
    }
    out.push('\n');
    let mut rounds = Table::new(&[
        ("round", Align::Right),
        ("state", Align::Left),
        ("model", Align::Right),
        ("selected", Align::Right),
        ("submitted", Align::Right),
        ("opened", Align::Left),
        ("took", Align::Right),
        ("outcome", Align::Left),
    ]);
    for round in &view.rounds {
        rounds.row(vec![
            round.id.to_string(),
            round.state.clone(),
            round.base_model_version.to_string(),
            round.selected.to_string(),
            round.submitted.to_string(),
            time(round.opened_at),
            round
                .closed_at
                .map(|closed| {
                    seconds(u64::try_from(closed.saturating_sub(round.opened_at)).unwrap_or(0))
                })
                .unwrap_or_else(|| "-".into()),
            outcome(round),
        ]);
    }
    out.push_str(&rounds.render());
    out.push('\n');
    let mut models = Table::new(&[
        ("model", Align::Right),
        ("round", Align::Right),
        ("created", Align::Left),
        ("accuracy", Align::Right),
        ("loss", Align::Right),
        ("federated evaluation", Align::Left),
    ]);
    for model in &view.models {
        models.row(vec![
            model.version.to_string(),
            model.round_id.to_string(),
            time(model.created_at),
            percent(model.accuracy),
            model.loss.map_or_else(|| "-".into(), |l| format!("{l:.4}")),
            model.federated.as_ref().map_or_else(
                || "-".into(),
                |f| {
                    let metrics: Vec<String> = f
                        .metrics
                        .iter()
                        .map(|(name, value)| format!("{name} {value:.4}"))
                        .collect();
                    format!(
                        "{} ({} devices, {} examples)",
                        metrics.join(", "),
                        f.devices,
                        f.examples
                    )
                },
            ),
        ]);
    }
    out.push_str(&models.render());
    out
}

/// A round's outcome in words: the model it produced and the verdicts, or
/// why it failed. Anything else is shown as compact JSON rather than lost.
fn outcome(round: &RoundView) -> String {
    let Some(outcome) = &round.outcome else {
        return "-".into();
    };
    if let Some(error) = outcome.get("error").and_then(Value::as_str) {
        return format!("failed: {error}");
    }
    if let Some(version) = outcome.get("model_version").and_then(Value::as_u64) {
        let count = |key: &str| outcome.get(key).and_then(Value::as_u64).unwrap_or(0);
        let clipped = outcome
            .pointer("/stats/clipped")
            .and_then(Value::as_u64)
            .filter(|&n| n > 0)
            .map(|n| format!(", {n} clipped"))
            .unwrap_or_default();
        return format!(
            "model {version}: {} accepted, {} rejected{clipped}",
            count("accepted"),
            count("rejected")
        );
    }
    outcome.to_string()
}

#[cfg(test)]
mod tests {
    use qflare_server::api::federation::ModelView;

    use super::*;

    fn round(id: u64, outcome: Option<Value>) -> RoundView {
        RoundView {
            id,
            state: "completed".into(),
            base_model_version: id - 1,
            selected: 10,
            submitted: 9,
            opened_at: 1_700_000_000,
            closed_at: Some(1_700_000_065),
            deadline: 1_700_000_600,
            outcome,
        }
    }

    #[test]
    fn outcomes_are_words_not_json() {
        let done = round(
            2,
            Some(serde_json::json!({
                "model_version": 2, "model_sha256": "ab", "accepted": 8, "rejected": 1,
                "stats": { "clipped": 2 }
            })),
        );
        assert_eq!(outcome(&done), "model 2: 8 accepted, 1 rejected, 2 clipped");
        let failed = round(3, Some(serde_json::json!({ "error": "too few updates" })));
        assert_eq!(outcome(&failed), "failed: too few updates");
        assert_eq!(outcome(&round(4, None)), "-");
    }

    #[test]
    fn status_is_an_aligned_table() {
        let view = FederationView {
            running: true,
            enclave_generation: 1,
            enclave_measurement: None,
            coordinator: None,
            rounds: vec![round(
                12,
                Some(serde_json::json!({ "model_version": 12, "accepted": 10, "rejected": 0 })),
            )],
            models: vec![ModelView {
                version: 12,
                round_id: 12,
                created_at: 1_700_000_065,
                accuracy: Some(0.9712),
                loss: Some(0.1),
                federated: Some(qflare_server::api::federation::FederatedEvaluation {
                    devices: 3,
                    examples: 3000,
                    metrics: [("accuracy".to_owned(), 0.875), ("loss".to_owned(), 0.4)].into(),
                }),
            }],
            privacy: Some(qflare_server::api::federation::PrivacyView {
                epsilon: 2.345_67,
                delta: 1e-5,
                budget: Some(8.0),
                rounds: 12,
            }),
        };
        let text = render(&view);
        assert!(
            text.contains("accuracy 0.8750, loss 0.4000 (3 devices, 3000 examples)"),
            "{text}"
        );
        assert!(text.contains("1m 5s"), "{text}");
        assert!(text.contains("97.12%"), "{text}");
        assert!(text.contains("model 12: 10 accepted, 0 rejected"), "{text}");
        assert!(
            text.contains(
                "differential privacy: ε = 2.346 of a budget of 8 at δ = 1e-5 after 12 private rounds"
            ),
            "{text}"
        );
        assert!(!text.contains('{'), "no raw JSON: {text}");
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text}");
    }
}

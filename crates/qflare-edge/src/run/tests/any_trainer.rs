//! The loop with a trainer that is not burn: it gets each round's verified
//! model, plan and seed, and what it returns is what is sealed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use qflare_protocol::federation::{RoundStatus, TrainingPlan};
use qflare_protocol::tensor::TensorMap;

use super::super::train::round_seed;
use super::super::*;
use super::loop_behaviour::{config, identity};
use super::scripted::{RoundReply, Script, ScriptedLink};
use crate::trainer::{EvalResult, FitResult, FitTask, LOSS_METRIC, LocalTrainer, TrainError};

/// What the trainer was asked.
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    round_id: u64,
    model_version: u64,
    architecture: String,
    plan: TrainingPlan,
    seed: u64,
    global: TensorMap,
}

#[derive(Clone, Copy)]
enum Answer {
    /// Every parameter of the delta is 0.5.
    Fixed,
    /// One tensor fewer than the global model.
    WrongLayout,
    Refuse,
}

struct FakeTrainer {
    answer: Answer,
    asked: Mutex<Vec<Asked>>,
    /// (round, model version) of each evaluation asked for.
    evaluated: Mutex<Vec<(u64, u64)>>,
}

impl LocalTrainer for FakeTrainer {
    fn fit(
        &self,
        task: &FitTask<'_>,
        progress: &dyn Fn(usize, usize),
    ) -> Result<FitResult, TrainError> {
        self.asked.lock().unwrap().push(Asked {
            round_id: task.round_id,
            model_version: task.model_version,
            architecture: task.architecture.to_owned(),
            plan: task.plan.clone(),
            seed: task.seed,
            global: task.global.clone(),
        });
        progress(1, 2);
        progress(2, 2);
        let update = match self.answer {
            Answer::Refuse => return Err(TrainError::Refused("not my model".into())),
            Answer::Fixed => task
                .global
                .with_flat(&vec![0.5; task.global.num_parameters()])
                .unwrap(),
            Answer::WrongLayout => {
                let mut partial = TensorMap::new();
                let (name, tensor) = task.global.iter().next().unwrap();
                partial.insert(name, tensor.clone()).unwrap();
                partial
            }
        };
        Ok(FitResult {
            update,
            examples: 7,
            metrics: BTreeMap::from([(LOSS_METRIC.to_owned(), 1.5)]),
        })
    }

    fn evaluate(&self, task: &FitTask<'_>) -> Result<Option<EvalResult>, TrainError> {
        self.evaluated
            .lock()
            .unwrap()
            .push((task.round_id, task.model_version));
        Ok(Some(EvalResult {
            examples: 3,
            metrics: BTreeMap::from([("accuracy".to_owned(), task.model_version as f64)]),
        }))
    }
}

struct Outcome {
    identity: Identity,
    result: Result<RunSummary, EdgeError>,
    events: Vec<DeviceEvent>,
    script: Arc<Mutex<Script>>,
    trainer: Arc<FakeTrainer>,
}

async fn run(rounds: &[RoundReply], answer: Answer, strict: bool) -> Outcome {
    run_until(rounds, answer, strict, Some(2)).await
}

async fn run_until(
    rounds: &[RoundReply],
    answer: Answer,
    strict: bool,
    max_rounds: Option<u64>,
) -> Outcome {
    let identity = identity();
    let script = Script::new(identity.keys.signing.verifying_key().clone(), rounds);
    let script = Arc::new(Mutex::new(script));
    let trainer = Arc::new(FakeTrainer {
        answer,
        asked: Mutex::new(Vec::new()),
        evaluated: Mutex::new(Vec::new()),
    });
    let mut config = config();
    config.trainer = trainer.clone();
    config.train_seed = 42;
    config.max_rounds = max_rounds;
    config.fail_on_refusal = strict;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let events = Events::from_fn(move |e| sink.lock().unwrap().push(e));
    let result = drive(&identity, ScriptedLink(script.clone()), config, events).await;
    let events = seen.lock().unwrap().clone();
    Outcome {
        identity,
        result,
        events,
        script,
        trainer,
    }
}

const fn train(round_id: u64, model_version: u64) -> RoundReply {
    RoundReply::Train {
        round_id,
        model_version,
    }
}

#[tokio::test(start_paused = true)]
async fn the_loop_seals_what_any_trainer_returns_and_tells_it_the_round() {
    let run = run(&[train(1, 0), train(2, 1)], Answer::Fixed, false).await;
    let summary = run.result.as_ref().unwrap();
    assert_eq!(summary.stop, StopReason::MaxRounds);
    assert_eq!(summary.rounds.len(), 2);

    let script = run.script.lock().unwrap();
    let plan = TrainingPlan {
        learning_rate: 0.1,
        batch_size: 10,
        epochs: 1,
    };
    let expected: Vec<Asked> = [(1, 0), (2, 1)]
        .into_iter()
        .map(|(round_id, model_version)| Asked {
            round_id,
            model_version,
            architecture: "mnist-2nn".into(),
            plan: plan.clone(),
            seed: round_seed(&run.identity, round_id, 42),
            global: script.global.clone(),
        })
        .collect();
    assert_eq!(*run.trainer.asked.lock().unwrap(), expected);
    assert_ne!(expected[0].seed, expected[1].seed);

    assert_eq!(script.opened.len(), 2);
    for (opened, round_id) in script.opened.iter().zip([1, 2]) {
        assert_eq!(opened.metadata.round_id, round_id);
        assert_eq!(opened.metadata.example_count, 7);
        assert!(opened.update.same_layout(&script.global));
        assert!(opened.update.to_flat().iter().all(|v| *v == 0.5));
    }
    let losses: Vec<f64> = summary.rounds.iter().map(|r| r.mean_loss).collect();
    assert_eq!(losses, [1.5, 1.5]);
    let progress = run
        .events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Training { round_id: 1, .. }))
        .count();
    assert_eq!(progress, 2, "one event per percent reported");
}

#[tokio::test(start_paused = true)]
async fn each_model_is_evaluated_and_reported_the_final_one_when_training_ends() {
    let rounds = [
        train(1, 0),
        train(2, 1),
        RoundReply::FinishedAt { model_version: 2 },
    ];
    let run = run_until(&rounds, Answer::Fixed, false, None).await;
    let summary = run.result.as_ref().unwrap();
    assert_eq!(summary.stop, StopReason::Finished);
    // Before each round's training, then the model round 2 produced.
    assert_eq!(
        *run.trainer.evaluated.lock().unwrap(),
        [(1, 0), (2, 1), (2, 2)]
    );
    let script = run.script.lock().unwrap();
    let reported: Vec<(u64, u64, u64, f64)> = script
        .evaluations
        .iter()
        .map(|r| {
            (
                r.round_id,
                r.model_version,
                r.examples,
                r.metrics["accuracy"],
            )
        })
        .collect();
    assert_eq!(reported, [(1, 0, 3, 0.0), (2, 1, 3, 1.0), (2, 2, 3, 2.0)]);
}

#[tokio::test(start_paused = true)]
async fn a_final_model_from_rounds_without_this_device_is_not_evaluated() {
    // The device's last round (1) produced version 1; the server finished at 3.
    let rounds = [train(1, 0), RoundReply::FinishedAt { model_version: 3 }];
    let run = run_until(&rounds, Answer::Fixed, false, None).await;
    assert_eq!(run.result.as_ref().unwrap().stop, StopReason::Finished);
    assert_eq!(*run.trainer.evaluated.lock().unwrap(), [(1, 0)]);
    assert_eq!(run.script.lock().unwrap().evaluations.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_update_of_another_layout_is_never_sealed() {
    let run = run(&[train(1, 0)], Answer::WrongLayout, false).await;
    assert!(matches!(
        run.result,
        Err(EdgeError::Train(TrainError::Failed(_)))
    ));
    assert!(run.script.lock().unwrap().opened.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_trainer_refusal_is_a_refused_round() {
    let rounds = [train(1, 0), RoundReply::Status(RoundStatus::Finished, None)];
    let lenient = run(&rounds, Answer::Refuse, false).await;
    let summary = lenient.result.as_ref().unwrap();
    assert_eq!(summary.stop, StopReason::Finished);
    assert_eq!(summary.refusals, 1);
    assert!(lenient.script.lock().unwrap().opened.is_empty());

    let strict = run(&rounds, Answer::Refuse, true).await;
    let err = strict.result.unwrap_err();
    assert!(matches!(err, EdgeError::Train(TrainError::Refused(_))));
    assert_eq!(err.to_string(), "round refused: not my model");
}

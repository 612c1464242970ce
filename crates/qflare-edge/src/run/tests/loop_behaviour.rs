//! The loop's reactions against the scripted server: training and model
//! caching, tampered models, enclave restarts, lost receipts, revocation,
//! closed rounds, expired sessions and waiting for a round.

use std::sync::{Arc, Mutex};

use qflare_ml::model::{IMAGE_PIXELS, IMAGE_SIDE};
use qflare_ml::{Architecture, Dataset};
use qflare_protocol::ProtocolError;
use qflare_protocol::attestation::{AttestationMode, AttestationPolicy};
use qflare_protocol::crypto::sha256;
use qflare_protocol::federation::RoundStatus;
use qflare_protocol::identity::{DeviceId, DeviceKeys, ServerFingerprint};
use qflare_protocol::tensor::TensorMap;
use qflare_protocol::{KemSuite, SignatureSuite};

use super::super::*;
use super::scripted::{MEASUREMENT, ModelReply, RoundReply, Script, ScriptedLink, SubmitReply};
use crate::error::ModelRefusal;

pub(super) fn identity() -> Identity {
    let mut rng = rand::rng();
    let server =
        qflare_protocol::sig::SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap();
    Identity {
        device_id: DeviceId::random(&mut rng),
        device_name: "scripted".into(),
        server_url: "https://127.0.0.1:1".into(),
        server_fingerprint: ServerFingerprint::compute(b"cert", server.verifying_key()),
        server_certificate_sha256: sha256(b"cert"),
        server_key: server.verifying_key().clone(),
        keys: DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng).unwrap(),
        key_version: 1,
        pending_keys: None,
        alternate_urls: Vec::new(),
    }
}

pub(super) fn config() -> DeviceConfig {
    let n = 20;
    let mut images = vec![0.0f32; n * IMAGE_PIXELS];
    for (i, image) in images.chunks_mut(IMAGE_PIXELS).enumerate() {
        image[(i % 10) * 28 + 5] = 1.0;
    }
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    let data = Dataset::new(images, labels, IMAGE_SIDE, IMAGE_SIDE).unwrap();
    let mut config = DeviceConfig::new(
        AttestationPolicy {
            allowed_measurements: vec![MEASUREMENT],
            allowed_modes: vec![AttestationMode::Software],
            max_age_secs: 600,
            require_sandbox: true,
            hardware: Default::default(),
        },
        Arc::new(crate::trainer::BurnTrainer::new(data)),
    );
    config.backoff.max_attempts = Some(5);
    config
}

struct Run {
    result: Result<RunSummary, EdgeError>,
    events: Vec<DeviceEvent>,
    script: Arc<Mutex<Script>>,
}

impl Run {
    fn summary(&self) -> &RunSummary {
        self.result.as_ref().unwrap()
    }

    /// Training runs that completed (the last progress event of each).
    fn trainings(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Training { done, total, .. } if done == total))
            .count()
    }
}

async fn run(rounds: &[RoundReply], setup: impl FnOnce(&mut Script, &mut DeviceConfig)) -> Run {
    let identity = identity();
    let mut script = Script::new(identity.keys.signing.verifying_key().clone(), rounds);
    let mut config = config();
    setup(&mut script, &mut config);
    let script = Arc::new(Mutex::new(script));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let events = Events::from_fn(move |e| sink.lock().unwrap().push(e));
    let result = drive(&identity, ScriptedLink(script.clone()), config, events).await;
    let events = seen.lock().unwrap().clone();
    Run {
        result,
        events,
        script,
    }
}

const fn train(round_id: u64, model_version: u64) -> RoundReply {
    RoundReply::Train {
        round_id,
        model_version,
    }
}

#[tokio::test(start_paused = true)]
async fn trains_submits_and_caches_the_model_by_version() {
    let run = run(&[train(1, 0), train(2, 0), train(3, 1)], |_, config| {
        config.max_rounds = Some(3);
    })
    .await;
    let summary = run.summary();
    assert_eq!(summary.stop, StopReason::MaxRounds);
    assert_eq!(summary.rounds.len(), 3);
    assert!(summary.rounds.iter().all(|r| r.status == "accepted"));
    assert_eq!(summary.sessions_opened, 1);
    assert_eq!(
        summary.models_downloaded, 2,
        "version 0 once, version 1 once"
    );
    assert_eq!(run.script.lock().unwrap().downloads, 2);
    assert!(run.events.iter().any(|e| matches!(
        e,
        DeviceEvent::ModelVerified {
            version: 0,
            cached: true,
            ..
        }
    )));
    assert_eq!(run.trainings(), 3);
    let first = &summary.rounds[0].timings;
    assert!(first.training > Duration::ZERO && first.sealing > Duration::ZERO);
    assert!(
        first.session > Duration::ZERO,
        "the handshake is charged to round 1"
    );
    assert_eq!(summary.rounds[1].timings.session, Duration::ZERO);
    assert_eq!(summary.rounds[1].timings.download, Duration::ZERO);

    let script = run.script.lock().unwrap();
    let versions: Vec<(u64, u64, u64)> = script
        .opened
        .iter()
        .map(|o| {
            (
                o.metadata.round_id,
                o.metadata.model_version,
                o.metadata.example_count,
            )
        })
        .collect();
    assert_eq!(versions, [(1, 0, 20), (2, 0, 20), (3, 1, 20)]);
    for opened in &script.opened {
        // The update is a delta: the 2NN's layout, finite, small, not zero.
        Architecture::Mnist2nn.validate(&opened.update).unwrap();
        let flat = opened.update.to_flat();
        assert!(flat.iter().any(|v| *v != 0.0));
        let global = script.global.to_flat();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(norm(&flat) < norm(&global));
    }
}

#[tokio::test(start_paused = true)]
async fn a_tampered_model_is_refused_and_never_trained_on() {
    let rounds = [train(1, 0), RoundReply::Status(RoundStatus::Finished, None)];
    let run = run(&rounds, |script, _| script.model = ModelReply::FlipByte).await;
    let summary = run.summary();
    assert_eq!(summary.stop, StopReason::Finished);
    assert_eq!(summary.refusals, 1);
    assert!(summary.rounds.is_empty());
    assert_eq!(run.trainings(), 0);
    assert!(run.script.lock().unwrap().opened.is_empty());
    assert!(run.events.iter().any(|e| matches!(
        e,
        DeviceEvent::Refused {
            round_id: Some(1),
            ..
        }
    )));

    let strict = run_strict(&rounds).await;
    assert!(matches!(
        strict.result,
        Err(EdgeError::ModelRefused(ModelRefusal::Certificate(
            ProtocolError::Mismatch("model digest")
        )))
    ));
    assert_eq!(strict.trainings(), 0);
}

async fn run_strict(rounds: &[RoundReply]) -> Run {
    run(rounds, |script, config| {
        script.model = ModelReply::FlipByte;
        config.fail_on_refusal = true;
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn an_enclave_restart_reseals_the_same_update_without_retraining() {
    let rounds = [
        train(1, 0),
        train(1, 0),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |script, _| {
        script.submits = [SubmitReply::RestartEnclave].into();
    })
    .await;
    let summary = run.summary();
    assert_eq!(summary.stop, StopReason::Finished);
    assert_eq!(summary.reseals, 1);
    assert_eq!(summary.rounds.len(), 1);
    assert_eq!(run.trainings(), 1, "trained once");
    assert_eq!(summary.models_downloaded, 1);
    let script = run.script.lock().unwrap();
    assert_eq!(script.opened.len(), 1);
    assert_eq!(
        script.opened[0].enclave_generation, 1,
        "sealed to the new key"
    );
    assert!(
        run.events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Resealing { round_id: 1 }))
    );
}

/// The host recorded the envelope before the enclave died, so it
/// lists the device as submitted; the device keeps the update and
/// re-seals it when asked again instead of calling it delivered.
#[tokio::test(start_paused = true)]
async fn an_update_lost_in_an_enclave_restart_is_not_taken_as_delivered() {
    let rounds = [
        train(1, 0),
        RoundReply::Status(RoundStatus::Submitted, Some(1)),
        train(1, 0),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |script, _| {
        script.submits = [SubmitReply::RestartEnclave].into();
    })
    .await;
    let summary = run.summary();
    assert_eq!(summary.rounds.len(), 1);
    assert_eq!(summary.rounds[0].status, "accepted");
    assert_eq!(summary.reseals, 1);
    assert_eq!(run.trainings(), 1);
    assert_eq!(run.script.lock().unwrap().opened[0].enclave_generation, 1);
}

const fn train_in_new_boot(round_id: u64, model_version: u64) -> RoundReply {
    RoundReply::TrainInNewBoot {
        round_id,
        model_version,
    }
}

/// The server took the update and answered, then was killed and restarted
/// with a new enclave boot: it resumes the round and asks again. The kept
/// update is re-sealed to the new key, not trained again.
#[tokio::test(start_paused = true)]
async fn a_resumed_round_gets_the_delivered_update_resealed_without_retraining() {
    let rounds = [
        train(1, 0),
        RoundReply::Status(RoundStatus::Submitted, Some(1)),
        train_in_new_boot(1, 0),
        RoundReply::Status(RoundStatus::Submitted, Some(1)),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |_, _| {}).await;
    let summary = run.summary();
    assert_eq!(summary.stop, StopReason::Finished);
    assert_eq!(run.trainings(), 1, "trained once");
    assert_eq!(summary.reseals, 1);
    assert_eq!(
        summary.rounds.len(),
        1,
        "one round, one row: {:?}",
        summary.rounds
    );
    assert_eq!(summary.rounds[0].status, "accepted");
    let script = run.script.lock().unwrap();
    let generations: Vec<u32> = script.opened.iter().map(|o| o.enclave_generation).collect();
    assert_eq!(generations, [0, 1], "sealed to each boot once");
    assert_eq!(
        script.opened[0].update.to_flat(),
        script.opened[1].update.to_flat(),
        "the same update"
    );
    assert!(script.opened.iter().all(|o| o.metadata.round_id == 1));
}

/// A host that restarts the enclave again and again does not get the
/// update sealed to every boot: after one re-key the device drops it.
#[tokio::test(start_paused = true)]
async fn a_round_rekeyed_twice_drops_the_update() {
    let rounds = [
        train(1, 0),
        train_in_new_boot(1, 0),
        train_in_new_boot(1, 0),
        train_in_new_boot(1, 0),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |_, _| {}).await;
    let summary = run.summary();
    assert_eq!(summary.stop, StopReason::Finished);
    assert_eq!(run.trainings(), 1, "not retrained either");
    assert_eq!(summary.skipped, 1);
    assert!(run.events.iter().any(|e| matches!(
        e,
        DeviceEvent::Skipped { round_id: Some(1), code } if code == CODE_RESEAL_LIMIT
    )));
    let script = run.script.lock().unwrap();
    let generations: Vec<u32> = script.opened.iter().map(|o| o.enclave_generation).collect();
    assert_eq!(generations, [0, 1], "never sealed to a third boot");
}

#[tokio::test(start_paused = true)]
async fn a_revoked_device_stops_cleanly() {
    let run = run(&[RoundReply::Error(403, "device_revoked")], |_, _| {}).await;
    assert_eq!(run.summary().stop, StopReason::Revoked);
    assert!(matches!(
        run.events.last(),
        Some(DeviceEvent::Stopped(StopOutcome::Stopped(
            StopReason::Revoked
        )))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_closed_round_is_skipped_and_not_retrained() {
    let rounds = [
        train(1, 0),
        train(1, 0),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |script, _| {
        script.submits = [SubmitReply::Error(409, "round_closed")].into();
    })
    .await;
    let summary = run.summary();
    assert_eq!(summary.skipped, 1);
    assert!(summary.rounds.is_empty());
    assert_eq!(run.trainings(), 1);
    assert!(run.events.iter().any(|e| matches!(
        e,
        DeviceEvent::Skipped { round_id: Some(1), code } if code == "round_closed"
    )));
}

#[tokio::test(start_paused = true)]
async fn an_expired_session_is_replaced() {
    let rounds = [RoundReply::Error(401, "expired"), train(1, 0)];
    let run = run(&rounds, |_, config| config.max_rounds = Some(1)).await;
    let summary = run.summary();
    assert_eq!(summary.sessions_opened, 2);
    assert_eq!(summary.rounds.len(), 1);
    assert_eq!(summary.retries, 0, "the first reconnect is immediate");
}

#[tokio::test(start_paused = true)]
async fn a_lost_receipt_is_recovered_from_the_round_status() {
    let rounds = [
        train(1, 0),
        RoundReply::Status(RoundStatus::Submitted, Some(1)),
        RoundReply::Status(RoundStatus::Finished, None),
    ];
    let run = run(&rounds, |script, _| {
        script.submits = [SubmitReply::DropAfterAccept].into();
    })
    .await;
    let summary = run.summary();
    assert_eq!(summary.rounds.len(), 1);
    assert_eq!(summary.rounds[0].status, STATUS_SUBMITTED);
    assert_eq!(summary.rounds[0].code, CODE_RECEIPT_LOST);
    assert_eq!(summary.retries, 1);
    assert_eq!(run.trainings(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_tamper_hook_rewrites_the_sealed_update() {
    let run = run(&[train(1, 0)], |_, config| {
        config.max_rounds = Some(1);
        config.tamper = Some(Arc::new(|_round: u64, update: TensorMap| {
            let flat = vec![0.25f32; update.num_parameters()];
            update.with_flat(&flat).unwrap()
        }));
    })
    .await;
    assert_eq!(run.summary().rounds.len(), 1);
    let script = run.script.lock().unwrap();
    assert!(script.opened[0].update.to_flat().iter().all(|v| *v == 0.25));
}

/// Each answer that sends the device nowhere is asked about again at once,
/// with the server asked to hold the poll until that answer changes.
#[tokio::test(start_paused = true)]
async fn waiting_long_polls_until_a_round_opens() {
    let rounds = [
        RoundReply::Status(RoundStatus::Waiting, None),
        RoundReply::Status(RoundStatus::NotSelected, Some(1)),
        train(2, 1),
    ];
    let run = run(&rounds, |_, config| config.max_rounds = Some(1)).await;
    assert_eq!(run.summary().rounds[0].round_id, 2);
    assert!(
        !run.events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Waiting { .. })),
        "a changed answer is followed up at once"
    );
    let script = run.script.lock().unwrap();
    let waited: Vec<_> = script
        .waited_on
        .iter()
        .take(3)
        .map(|w| w.map(|p| (p.status, p.round_id, p.max_wait_secs)))
        .collect();
    assert_eq!(
        waited,
        [
            None,
            Some((RoundStatus::Waiting, None, LONG_POLL_SECS)),
            Some((RoundStatus::NotSelected, Some(1), LONG_POLL_SECS)),
        ]
    );
}

/// A server that does not hold polls (it answers at once, unchanged) is
/// polled at the interval it asks for.
#[tokio::test(start_paused = true)]
async fn a_server_that_does_not_hold_polls_is_polled_at_its_interval() {
    let rounds = [
        RoundReply::Status(RoundStatus::Waiting, None),
        RoundReply::Status(RoundStatus::Waiting, None),
        RoundReply::Status(RoundStatus::Waiting, None),
        train(2, 1),
    ];
    let run = run(&rounds, |_, config| config.max_rounds = Some(1)).await;
    assert_eq!(run.summary().rounds[0].round_id, 2);
    let waits = run
        .events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Waiting { secs: 5 }))
        .count();
    assert_eq!(waits, 2);
}

#[test]
fn a_policy_under_which_no_enclave_can_pass_is_refused_before_running() {
    use qflare_protocol::attestation::hardware::{Digest48, HardwarePolicy, NitroPolicy};

    let refusal = |edit: &dyn Fn(&mut AttestationPolicy)| {
        let mut config = config();
        edit(&mut config.policy);
        match config.validate() {
            Err(EdgeError::Config(message)) => message,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    };
    assert!(config().validate().is_ok());
    assert!(refusal(&|p| p.allowed_modes.clear()).contains("no attestation mode"));
    assert!(refusal(&|p| p.allowed_measurements.clear()).contains("no enclave measurement"));
    // A hardware-only device needs no software measurement, but its
    // policy must trust some launch measurement of the kinds it accepts.
    let nitro_only = |pcr0: Vec<Digest48>| {
        move |p: &mut AttestationPolicy| {
            p.allowed_measurements.clear();
            p.allowed_modes = vec![AttestationMode::Nitro];
            p.hardware = HardwarePolicy {
                nitro: Some(NitroPolicy::trusting(pcr0.clone())),
                ..HardwarePolicy::default()
            };
        }
    };
    assert!(refusal(&nitro_only(Vec::new())).contains("accepts nitro"));
    let mut config = config();
    nitro_only(vec![Digest48([1; 48])])(&mut config.policy);
    assert!(config.validate().is_ok());
}

//! The loop against a scripted server: rounds, models and submissions from
//! queues, with a real enclave key pair that a restart replaces, so every
//! envelope is opened as the enclave would open it.

use super::*;

/// A scripted server: rounds, model and submissions answer from queues
/// (the last round answer repeats), with a real enclave key pair that a
/// restart replaces, so every envelope is opened as the enclave would.
mod scripted {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use qflare_ml::Architecture;
    use qflare_protocol::attestation::{AttestationMode, ReportBody, sign_report};
    use qflare_protocol::crypto::sha256;
    use qflare_protocol::envelope::{self, UpdateEnvelope, UpdateMetadata};
    use qflare_protocol::federation::{
        ModelDownload, RoundInfo, RoundQuery, RoundStatus, SubmitReceipt, TrainingPlan,
        encode_model_download,
    };
    use qflare_protocol::kem::KemKeyPair;
    use qflare_protocol::sig::{SigningKey, VerifyingKey};
    use qflare_protocol::tensor::TensorMap;
    use qflare_protocol::{KemSuite, SignatureSuite};

    use super::super::{EdgeError, Link};
    use crate::client::unix_now;

    pub const MEASUREMENT: [u8; 48] = [7; 48];

    #[derive(Clone, Copy, Debug)]
    pub enum RoundReply {
        Status(RoundStatus, Option<u64>),
        Train { round_id: u64, model_version: u64 },
        Error(u16, &'static str),
    }

    #[derive(Clone, Copy, Debug)]
    pub enum SubmitReply {
        Receipt(&'static str),
        Error(u16, &'static str),
        /// The enclave restarts with new keys; the host answers 503.
        RestartEnclave,
        /// The server takes the update, then the connection breaks.
        DropAfterAccept,
    }

    #[derive(Clone, Copy, Debug, PartialEq)]
    pub enum ModelReply {
        Honest,
        /// The host flips one byte of the weights.
        FlipByte,
    }

    pub struct Enclave {
        pub signing: SigningKey,
        pub kem: KemKeyPair,
    }

    impl Enclave {
        fn new() -> Self {
            let mut rng = rand::rng();
            Self {
                signing: SigningKey::generate(SignatureSuite::MlDsa65, &mut rng).unwrap(),
                kem: KemKeyPair::generate(KemSuite::MlKem768, &mut rng).unwrap(),
            }
        }
    }

    pub struct Opened {
        pub metadata: UpdateMetadata,
        pub update: TensorMap,
        pub enclave_generation: u32,
    }

    pub struct Script {
        pub enclave: Enclave,
        pub enclave_generation: u32,
        pub rounds: VecDeque<RoundReply>,
        pub submits: VecDeque<SubmitReply>,
        pub model: ModelReply,
        pub global: TensorMap,
        pub current_version: u64,
        pub session_open: bool,
        pub sessions: u32,
        pub downloads: u32,
        pub device_key: VerifyingKey,
        pub opened: Vec<Opened>,
    }

    impl Script {
        pub fn new(device_key: VerifyingKey, rounds: &[RoundReply]) -> Self {
            Self {
                enclave: Enclave::new(),
                enclave_generation: 0,
                rounds: rounds.iter().copied().collect(),
                submits: VecDeque::new(),
                model: ModelReply::Honest,
                global: qflare_ml::initial_model(Architecture::Mnist2nn, 3).unwrap(),
                current_version: 0,
                session_open: false,
                sessions: 0,
                downloads: 0,
                device_key,
                opened: Vec::new(),
            }
        }

        fn report(&self, nonce: [u8; 32]) -> qflare_protocol::attestation::AttestationReport {
            let body = ReportBody {
                mode: AttestationMode::Software,
                measurement: MEASUREMENT,
                kem_public_key: self.enclave.kem.public.clone(),
                verifying_key: self.enclave.signing.verifying_key().clone(),
                nonce,
                issued_at: unix_now(),
                evidence: Vec::new(),
            };
            sign_report(&body, &self.enclave.signing).unwrap()
        }
    }

    fn server(status: u16, code: &str) -> EdgeError {
        EdgeError::Server {
            status,
            code: code.into(),
            message: String::new(),
        }
    }

    #[derive(Clone)]
    pub struct ScriptedLink(pub Arc<Mutex<Script>>);

    impl Link for ScriptedLink {
        fn has_session(&self, _margin_secs: u64) -> bool {
            self.0.lock().unwrap().session_open
        }

        fn drop_session(&mut self) {
            self.0.lock().unwrap().session_open = false;
        }

        async fn open_session(&mut self) -> Result<(String, u64), EdgeError> {
            let mut script = self.0.lock().unwrap();
            script.session_open = true;
            script.sessions += 1;
            Ok((format!("session-{}", script.sessions), unix_now() + 3600))
        }

        async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError> {
            let mut script = self.0.lock().unwrap();
            let reply = if script.rounds.len() > 1 {
                script.rounds.pop_front()
            } else {
                script.rounds.front().copied()
            }
            .unwrap();
            let nonce = query.nonce.unwrap();
            let mut info = RoundInfo {
                status: RoundStatus::Waiting,
                round_id: None,
                model_version: None,
                architecture: None,
                training: None,
                deadline: None,
                report: Some(script.report(nonce)),
                poll_after_secs: 5,
            };
            match reply {
                RoundReply::Error(status, code) => {
                    if code == "expired" {
                        script.session_open = false;
                    }
                    return Err(server(status, code));
                }
                RoundReply::Status(status, round_id) => {
                    info.status = status;
                    info.round_id = round_id;
                }
                RoundReply::Train {
                    round_id,
                    model_version,
                } => {
                    script.current_version = model_version;
                    info.status = RoundStatus::Train;
                    info.round_id = Some(round_id);
                    info.model_version = Some(model_version);
                    info.architecture = Some("mnist-2nn".into());
                    info.training = Some(TrainingPlan {
                        learning_rate: 0.1,
                        batch_size: 10,
                        epochs: 1,
                    });
                    info.deadline = Some(unix_now() + 600);
                }
            }
            Ok(info)
        }

        async fn model(&mut self) -> Result<Vec<u8>, EdgeError> {
            let mut script = self.0.lock().unwrap();
            script.downloads += 1;
            let mut model = script.global.to_safetensors();
            let certificate = qflare_protocol::model::certify(
                "mnist-2nn",
                script.current_version,
                script.current_version,
                &model,
                &script.enclave.signing,
            )
            .unwrap();
            if script.model == ModelReply::FlipByte {
                let last = model.len() - 1;
                model[last] ^= 1;
            }
            let header = ModelDownload {
                certificate,
                enclave_key_sha256: sha256(script.enclave.signing.verifying_key().as_bytes()),
            };
            Ok(encode_model_download(&header, &model).unwrap())
        }

        async fn submit(&mut self, sealed: &UpdateEnvelope) -> Result<SubmitReceipt, EdgeError> {
            let mut script = self.0.lock().unwrap();
            let reply = script
                .submits
                .pop_front()
                .unwrap_or(SubmitReply::Receipt("accepted"));
            if let SubmitReply::RestartEnclave = reply {
                script.enclave = Enclave::new();
                script.enclave_generation += 1;
                return Err(server(503, "enclave_restarting"));
            }
            if let SubmitReply::Error(status, code) = reply {
                return Err(server(status, code));
            }
            // Only the current enclave's key opens it.
            let opened = envelope::open(
                sealed,
                &script.enclave.kem.secret,
                &script.enclave.kem.public,
                &script.device_key,
            )
            .unwrap();
            let update = TensorMap::from_safetensors(&opened.update, usize::MAX).unwrap();
            let generation = script.enclave_generation;
            script.opened.push(Opened {
                metadata: opened.metadata,
                update,
                enclave_generation: generation,
            });
            match reply {
                SubmitReply::DropAfterAccept => Err(EdgeError::Network("reset".into())),
                SubmitReply::Receipt(status) => Ok(SubmitReceipt {
                    round_id: sealed.round_id,
                    status: status.into(),
                    code: "ok".into(),
                }),
                _ => unreachable!(),
            }
        }
    }
}

mod loop_behaviour {
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
            keys: DeviceKeys::generate(KemSuite::MlKem768, SignatureSuite::MlDsa65, &mut rng)
                .unwrap(),
            key_version: 1,
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
            config.tamper = Some(Arc::new(|update: TensorMap| {
                let flat = vec![0.25f32; update.num_parameters()];
                update.with_flat(&flat).unwrap()
            }));
        })
        .await;
        assert_eq!(run.summary().rounds.len(), 1);
        let script = run.script.lock().unwrap();
        assert!(script.opened[0].update.to_flat().iter().all(|v| *v == 0.25));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_polls_until_a_round_opens() {
        let rounds = [
            RoundReply::Status(RoundStatus::Waiting, None),
            RoundReply::Status(RoundStatus::NotSelected, Some(1)),
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
}

/// The loop with a trainer that is not burn: it gets each round's verified
/// model, plan and seed, and what it returns is what is sealed.
mod any_trainer {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use qflare_protocol::federation::{RoundStatus, TrainingPlan};
    use qflare_protocol::tensor::TensorMap;

    use super::super::train::round_seed;
    use super::super::*;
    use super::loop_behaviour::{config, identity};
    use super::scripted::{RoundReply, Script, ScriptedLink};
    use crate::trainer::{FitResult, FitTask, LOSS_METRIC, LocalTrainer, TrainError};

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
    }

    struct Outcome {
        identity: Identity,
        result: Result<RunSummary, EdgeError>,
        events: Vec<DeviceEvent>,
        script: Arc<Mutex<Script>>,
        trainer: Arc<FakeTrainer>,
    }

    async fn run(rounds: &[RoundReply], answer: Answer, strict: bool) -> Outcome {
        let identity = identity();
        let script = Script::new(identity.keys.signing.verifying_key().clone(), rounds);
        let script = Arc::new(Mutex::new(script));
        let trainer = Arc::new(FakeTrainer {
            answer,
            asked: Mutex::new(Vec::new()),
        });
        let mut config = config();
        config.trainer = trainer.clone();
        config.train_seed = 42;
        config.max_rounds = Some(2);
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
}

/// `run_device` must be spawnable on a multi-threaded runtime.
#[allow(dead_code)]
fn run_device_is_send(identity: &Identity, config: DeviceConfig) {
    fn is_send<T: Send>(_: T) {}
    is_send(run_device(identity, config, Events::none()));
}

//! The loop against a scripted server: rounds, models and submissions from
//! queues, with a real enclave key pair that a restart replaces, so every
//! envelope is opened as the enclave would open it.
// The scripted trainers are the built-in one's.
#![cfg(feature = "burn")]

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
        Train {
            round_id: u64,
            model_version: u64,
        },
        /// The server (or its enclave) restarted: a new enclave key pair,
        /// then the round asked for again, as a resumed round is.
        TrainInNewBoot {
            round_id: u64,
            model_version: u64,
        },
        /// Training has finished; the latest model is `model_version`.
        FinishedAt {
            model_version: u64,
        },
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
        pub evaluations: Vec<qflare_protocol::federation::EvaluationReport>,
        /// What each round query asked the server to wait on.
        pub waited_on: Vec<Option<qflare_protocol::federation::RoundPosition>>,
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
                evaluations: Vec::new(),
                waited_on: Vec::new(),
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
                runtime: Some(qflare_protocol::attestation::EnclaveRuntime {
                    seccomp: qflare_protocol::attestation::SeccompState::Enforce,
                    no_new_privs: true,
                    ..qflare_protocol::attestation::EnclaveRuntime::unhardened()
                }),
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
            script.waited_on.push(query.wait_while);
            let reply = if script.rounds.len() > 1 {
                script.rounds.pop_front()
            } else {
                script.rounds.front().copied()
            }
            .unwrap();
            let reply = match reply {
                RoundReply::TrainInNewBoot {
                    round_id,
                    model_version,
                } => {
                    script.enclave = Enclave::new();
                    script.enclave_generation += 1;
                    RoundReply::Train {
                        round_id,
                        model_version,
                    }
                }
                other => other,
            };
            let nonce = query.nonce.unwrap();
            let mut info = RoundInfo {
                status: RoundStatus::Waiting,
                round_id: None,
                model_version: None,
                architecture: None,
                training: None,
                update_encoding: Default::default(),
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
                RoundReply::FinishedAt { model_version } => {
                    script.current_version = model_version;
                    info.status = RoundStatus::Finished;
                    info.architecture = Some("mnist-2nn".into());
                }
                RoundReply::TrainInNewBoot { .. } => unreachable!("mapped to Train above"),
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

        async fn evaluate(
            &mut self,
            report: &qflare_protocol::federation::EvaluationReport,
        ) -> Result<qflare_protocol::federation::EvaluationReceipt, EdgeError> {
            let mut script = self.0.lock().unwrap();
            script.evaluations.push(report.clone());
            Ok(qflare_protocol::federation::EvaluationReceipt {
                model_version: report.model_version,
            })
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

mod any_trainer;
mod loop_behaviour;

/// `run_device` must be spawnable on a multi-threaded runtime.
#[allow(dead_code)]
fn run_device_is_send(identity: &Identity, config: DeviceConfig) {
    fn is_send<T: Send>(_: T) {}
    is_send(run_device(identity, config, Events::none()));
}

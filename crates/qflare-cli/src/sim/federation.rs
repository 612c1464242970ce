//! The running federation: the server and its enclave started in-process,
//! devices enrolled and driven through rounds, and the per-round report.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qflare_edge::run::{DeviceConfig, DeviceEvent, Events, TamperFn};
use qflare_edge::{BurnTrainer, EnrollOptions, Identity};
use qflare_ml::{Dataset, Partition, Split};
use qflare_protocol::attestation::{AttestationMode, AttestationPolicy};
use qflare_protocol::identity::EnrollmentToken;
use qflare_server::federation::FederationStatus;
use qflare_server::{Config, Server, ServerOptions, SharedState};
use tokio::sync::{oneshot, watch};

use super::attack::{flip_labels, tamper};
use super::collusion::Collusion;
use super::{Attack, DataSplit, PhaseSeconds, RoundRow, SimOptions, SimReport};

/// A running simulation: server, enclave and enrolled devices.
pub struct Simulation {
    options: SimOptions,
    /// The server's state (store, federation).
    pub state: SharedState,
    /// The server's URL.
    pub url: String,
    devices: Vec<(PathBuf, Dataset, Option<TamperFn>)>,
    shutdown: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), qflare_server::ServerError>>,
    status: watch::Receiver<FederationStatus>,
}

impl Simulation {
    /// Starts the server and its enclave, and enrolls every device.
    pub async fn start(options: SimOptions) -> anyhow::Result<Self> {
        qflare_ml::set_compute_threads(options.compute_threads)?;
        let mut config = Config::default();
        // A simulation on one machine: the enclave is a hardened process.
        config.enclave.allow_software_mode = true;
        config.server.state_dir = options.state_dir.clone();
        config.server.metrics_listen = None;
        // A simulation is many devices behind one address.
        let generous = qflare_server::ratelimit::RateLimit {
            per_minute: 1_000_000,
            burst: 100_000,
        };
        config.rate_limits.enroll = generous;
        config.rate_limits.sessions = generous;
        config.rate_limits.device = generous;
        config.rate_limits.public = generous;
        config.rate_limits.admin = generous;
        config.enclave.command = Some(options.enclave_program.clone());
        config.enclave.args = options.enclave_args.clone();
        config.federation.enabled = true;
        config.federation.architecture = options.architecture.to_string();
        config.federation.model_seed = options.seed;
        config.federation.auto_start = false;
        config.federation.max_rounds = options.rounds;
        config.federation.clients_per_round = options.clients_per_round;
        config.federation.min_updates = 1.max(options.clients_per_round / 2);
        config.federation.round_timeout_secs = options.round_timeout_secs;
        config.federation.training = options.training.clone();
        config.federation.eval_data = Some(options.data_dir.clone());
        config.federation.eval_examples = options.eval_examples;
        config.federation.poll_interval_secs = 1;
        config.federation.long_poll_secs = options.long_poll_secs;
        config.federation.update_encoding = options.update_encoding;
        config.aggregation = options.aggregation.clone();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://{}", listener.local_addr()?);
        let server = Server::new(config, ServerOptions::default()).await?;
        let fingerprint = server.fingerprint();
        let state = server.state().clone();
        let status = state
            .federation
            .as_ref()
            .context("the federation did not start")?
            .subscribe();
        let (tx, rx) = oneshot::channel();
        let handle = tokio::spawn(server.serve(listener, None, async move {
            let _ = rx.await;
        }));

        let train = {
            let dir = options.data_dir.clone();
            tokio::task::spawn_blocking(move || Dataset::load(&dir, Split::Train)).await??
        };
        let scheme = match options.split {
            DataSplit::Iid => Partition::Iid,
            DataSplit::Shards => Partition::LabelShards {
                shards_per_client: 2,
                shard_size: 300,
            },
            DataSplit::Dirichlet(alpha) => Partition::Dirichlet { alpha },
        };
        let parts = qflare_ml::partition(train.labels(), options.devices, &scheme, options.seed)?;
        let attackers = options.attack.map_or(0, |(n, _)| n);
        // Crafted attacks see the round's honest updates: all devices must
        // be in every round so that the attackers know how many to wait for.
        let collusion = match options.attack {
            Some((_, attack)) if attack.is_crafted() => {
                anyhow::ensure!(
                    options.clients_per_round == options.devices
                        && attackers > 0
                        && attackers < options.devices,
                    "the {attack} attack needs every device in every round \
                     (clients per round = devices) and 0 < attackers < devices"
                );
                Some(Collusion::new(
                    attack,
                    options.devices,
                    attackers,
                    Duration::from_secs(options.round_timeout_secs),
                    options.seed,
                ))
            }
            _ => None,
        };
        let mut devices = Vec::with_capacity(options.devices);
        for (index, part) in parts.iter().enumerate() {
            let mut data = train.subset(part)?;
            if let Some(cap) = options.examples_per_device {
                data = data.head(cap);
            }
            let malicious = index >= options.devices.saturating_sub(attackers);
            let mut tamper_fn = None;
            if malicious && let Some((_, attack)) = options.attack {
                if attack == Attack::LabelFlip {
                    data = flip_labels(&data)?;
                }
                tamper_fn = tamper(attack, options.seed + index as u64);
            }
            if let Some(board) = &collusion {
                tamper_fn = Some(if malicious {
                    board.attacker_hook(index)
                } else {
                    board.honest_hook(index)
                });
            }
            let dir = options
                .state_dir
                .join("devices")
                .join(format!("device-{index:03}"));
            if Identity::path(&dir).exists() {
                // A restarted server keeps its devices (and they keep their keys).
                devices.push((dir, data, tamper_fn));
                continue;
            }
            let token = create_token(&state, &format!("device-{index}")).await?;
            let identity = qflare_edge::enroll(
                EnrollOptions {
                    server_url: url.clone(),
                    token,
                    fingerprint,
                    device_name: format!(
                        "sim-{index:03}{}",
                        if malicious { "-malicious" } else { "" }
                    ),
                    kem_suite: None,
                    signature_suite: None,
                    alternate_urls: Vec::new(),
                },
                &dir,
            )
            .await
            .with_context(|| format!("enrolling device {index}"))?;
            drop(identity);
            devices.push((dir, data, tamper_fn));
        }
        Ok(Self {
            options,
            state,
            url,
            devices,
            shutdown: Some(tx),
            server: handle,
            status,
        })
    }

    /// The attestation policy devices use: the enclave executable's
    /// measurement, software mode allowed (this is a simulation on one host), the sandbox
    /// required.
    pub fn device_policy(&self) -> anyhow::Result<AttestationPolicy> {
        Ok(AttestationPolicy {
            allowed_measurements: vec![qflare_enclave::backend::measure_file(
                &self.options.enclave_program,
            )?],
            allowed_modes: vec![AttestationMode::Software],
            max_age_secs: 600,
            require_sandbox: true,
            hardware: Default::default(),
        })
    }

    /// Runs the configured rounds; `on_round` is called after each aggregated round.
    pub async fn run(
        &mut self,
        targets: &[f64],
        on_round: impl FnMut(&RoundRow),
    ) -> anyhow::Result<SimReport> {
        self.run_until(targets, None, on_round).await
    }

    /// [`Simulation::run`], stopping early once a model reaches `stop_at`
    /// test accuracy (the devices are then stopped).
    pub async fn run_until(
        &mut self,
        targets: &[f64],
        stop_at: Option<f64>,
        mut on_round: impl FnMut(&RoundRow),
    ) -> anyhow::Result<SimReport> {
        let federation = self.state.federation.clone().context("no federation")?;
        let policy = self.device_policy()?;
        let started = Instant::now();
        federation.start_training().await?;
        let phases = Arc::new(std::sync::Mutex::new(PhaseSeconds::default()));
        // Bytes each round's devices sealed, from the devices' own events:
        // the server deletes envelopes once their round closes.
        let sent: Arc<std::sync::Mutex<HashMap<u64, u64>>> = Arc::default();
        let mut tasks = Vec::new();
        for (index, (dir, data, tamper)) in self.devices.iter().enumerate() {
            let trainer = Arc::new(BurnTrainer::new(data.clone()));
            let mut config = DeviceConfig::new(policy.clone(), trainer);
            config.stop_when_finished = true;
            config.max_poll_secs = 1;
            config.train_seed = self.options.seed + index as u64;
            config.tamper = tamper.clone();
            let mut identity = Identity::load(dir)?;
            // The server may have restarted on another port; the pins stay.
            identity.server_url = self.url.clone();
            let sink = phases.clone();
            let sent_sink = sent.clone();
            let events = Events::from_fn(move |event| {
                if let DeviceEvent::Submitted {
                    round_id,
                    sealed_bytes,
                    timings,
                    ..
                } = event
                {
                    if let Ok(mut total) = sink.lock() {
                        total.add(&timings);
                    }
                    if let (Some(bytes), Ok(mut sent)) = (sealed_bytes, sent_sink.lock()) {
                        *sent.entry(round_id).or_default() += bytes;
                    }
                }
            });
            tasks.push(tokio::spawn(async move {
                qflare_edge::run_device(&identity, config, events).await
            }));
        }
        // A resumed federation reports only the rounds this run adds.
        let mut reported = self
            .state
            .store
            .latest_model()
            .await?
            .map_or(0, |m| m.version);
        let mut rows = Vec::new();
        let mut last_change = Instant::now();
        let timeout = Duration::from_secs(self.options.round_timeout_secs.max(30) * 3);
        loop {
            let status = self.status.borrow().clone();
            let version = status.model_version.unwrap_or(0);
            let mut reached = false;
            while reported < version {
                reported += 1;
                if let Some(row) = round_row(&self.state, reported, &sent).await? {
                    on_round(&row);
                    reached |= stop_at.is_some_and(|t| row.accuracy.is_some_and(|a| a >= t));
                    rows.push(row);
                }
                last_change = Instant::now();
            }
            if reached {
                federation.pause().await?;
                for task in &tasks {
                    task.abort();
                }
                break;
            }
            if status.finished {
                break;
            }
            if last_change.elapsed() > timeout {
                bail!("no progress for {timeout:?} (round {})", status.round_id);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.status.changed()).await;
        }
        let wall_seconds = started.elapsed().as_secs_f64();
        for task in tasks {
            match tokio::time::timeout(Duration::from_secs(60), task).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(err))) => bail!("a device failed: {err}"),
                Ok(Err(err)) if err.is_cancelled() => {}
                Ok(Err(err)) => bail!("a device task failed: {err}"),
                Err(_) => bail!("a device did not stop after training finished"),
            }
        }
        let device_seconds = phases.lock().map(|p| p.clone()).unwrap_or_default();
        let history = self.state.store.model_history().await?;
        let initial_accuracy = history.first().and_then(|m| m.accuracy);
        let final_accuracy = history.last().and_then(|m| m.accuracy);
        let rounds_to_target = targets
            .iter()
            .map(|t| {
                (
                    *t,
                    history
                        .iter()
                        .find(|m| m.accuracy.is_some_and(|a| a >= *t))
                        .map(|m| m.version),
                )
            })
            .collect();
        Ok(SimReport {
            rounds: rows,
            initial_accuracy,
            final_accuracy,
            wall_seconds,
            device_seconds,
            enclave_seconds: federation
                .local()
                .map_or(0.0, |local| local.enclave_time().as_secs_f64()),
            rounds_to_target,
        })
    }

    /// The identity directories of the simulated devices, in order.
    pub fn device_dirs(&self) -> Vec<PathBuf> {
        self.devices.iter().map(|(dir, _, _)| dir.clone()).collect()
    }

    /// Loads device `index`'s identity, pointed at this server.
    pub fn identity(&self, index: usize) -> anyhow::Result<Identity> {
        let (dir, _, _) = self.devices.get(index).context("no such device")?;
        let mut identity = Identity::load(dir)?;
        identity.server_url = self.url.clone();
        Ok(identity)
    }

    /// Watches the federation's progress.
    pub fn status(&self) -> watch::Receiver<FederationStatus> {
        self.status.clone()
    }

    /// Stops abruptly, as a crash would: no graceful drain, the enclave
    /// process is killed with its handle.
    pub async fn kill(mut self) {
        drop(self.shutdown.take());
        self.server.abort();
        let _ = (&mut self.server).await;
    }

    /// Stops the server and its enclave.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        (&mut self.server).await??;
        Ok(())
    }
}

async fn create_token(state: &SharedState, label: &str) -> anyhow::Result<EnrollmentToken> {
    let token = EnrollmentToken::generate(&mut rand::rng());
    let now = state.now_i64();
    state
        .store
        .create_token(&qflare_store::TokenRecord {
            id: hex::encode(&qflare_protocol::crypto::sha256(label.as_bytes())[..8]),
            hash: token.hash().0,
            label: label.to_owned(),
            created_at: now,
            expires_at: now + 3600,
            used_at: None,
            used_by: None,
            revoked_at: None,
        })
        .await?;
    Ok(token)
}

async fn round_row(
    state: &SharedState,
    version: u64,
    sent: &std::sync::Mutex<HashMap<u64, u64>>,
) -> anyhow::Result<Option<RoundRow>> {
    let Some(model) = state.store.get_model(version).await? else {
        return Ok(None);
    };
    let Some(round) = state.store.get_round(model.round_id).await? else {
        return Ok(None);
    };
    let participants = state.store.participant_states(round.id).await?;
    let accepted = participants
        .iter()
        .filter(|p| p.verdict.as_deref() == Some("accepted"))
        .count();
    let rejections: Vec<String> = participants
        .iter()
        .filter(|p| p.verdict.as_deref() == Some("rejected"))
        .filter_map(|p| p.reason.clone())
        .collect();
    let bytes_sent = sent
        .lock()
        .map_or(0, |sent| sent.get(&round.id).copied().unwrap_or(0));
    // Metrics are written right after the model; wait briefly for them.
    let mut accuracy = model.accuracy;
    let mut loss = model.loss;
    for _ in 0..50 {
        if accuracy.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(fresh) = state.store.get_model(version).await? {
            accuracy = fresh.accuracy;
            loss = fresh.loss;
        }
    }
    Ok(Some(RoundRow {
        round_id: round.id,
        state: round.state.as_str().to_owned(),
        selected: round.target_updates,
        accepted,
        rejected: rejections.len(),
        rejections,
        accuracy,
        loss,
        seconds: round
            .closed_at
            .unwrap_or(round.opened_at)
            .saturating_sub(round.opened_at) as f64,
        bytes_sent,
    }))
}

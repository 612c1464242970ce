//! Which replica coordinates training, and how every replica serves devices
//! whichever one it is.
//!
//! ```text
//!   device ─▶ any replica ─┬─ coordinator (holds the lease) ─▶ Federation ─▶ enclave
//!                          └─ other replica ──link (HTTPS, pinned, bearer)──▶ coordinator
//!                                   │
//!                          shared PostgreSQL: devices, sessions, rounds, models, ledger,
//!                          coordinator_lease, training_control
//! ```
//!
//! * **SQLite** (one server process): the server is the coordinator from
//!   start to stop; there is no lease.
//! * **PostgreSQL** (replicas): every replica with `federation.enabled`
//!   competes for the lease row ([`qflare_store::Store::acquire_lease`]) every third of
//!   `federation.lease_secs`. The holder starts its enclave and round
//!   controller ([`Federation`]); the round it finds open is resumed in the
//!   new enclave boot, as after a restart (devices re-seal what they kept).
//!   A holder that cannot renew steps down (stops its controller and
//!   enclave) before its lease can lapse, so two controllers never run on
//!   purpose; should one still be mid-step, the round state's
//!   compare-and-set lets only one of them move a round.
//! * Every replica serves every device route: what needs the enclave — a
//!   fresh report, the current model's certificate, judging an update — is
//!   done locally by the coordinator and forwarded to it by the others
//!   ([`link`]); everything else is read from the shared store. Between a
//!   coordinator's death and the next one's enclave, those routes answer
//!   `503 enclave_restarting`, which devices wait out and re-attest after.
//! * Long polls wake on the local controller's changes at the coordinator
//!   and on the store's state (looked at twice a second) elsewhere.
//! * The admin's start and pause are stored ([`TrainingControl`]), so they
//!   hold for whichever replica coordinates, also after a restart.

pub mod link;

use std::sync::Arc;
use std::time::{Duration, Instant};

use qflare_protocol::attestation::AttestationReport;
use qflare_protocol::crypto::sha256;
use qflare_protocol::model::ModelCertificate;
use qflare_store::{CoordinatorLease, TrainingControl};
use serde_json::json;
use tokio::sync::watch;

use crate::clock::store_time;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::federation::{ControllerContext, Federation, FederationError, FederationStatus};
use crate::identity::ServerIdentity;
use crate::ledger::AuditKind;
use link::ReplicaLink;

/// How long a replica trusts what it read of the lease before reading again.
const LEASE_CACHE: Duration = Duration::from_secs(1);

/// How often a replica that does not coordinate looks at the store for a
/// change that should wake its held polls.
const OBSERVE_EVERY: Duration = Duration::from_millis(500);

/// Who does the enclave's part of a device request.
#[derive(Debug, Clone)]
pub enum Coordinator {
    /// This replica: its own controller and enclave.
    Local(Arc<Federation>),
    /// Another replica, reached over the link.
    Remote {
        /// The link.
        link: ReplicaLink,
        /// Its `host:port`.
        address: String,
    },
}

/// The model a device downloads, with the running enclave's certificate.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The safetensors bytes.
    pub bytes: Arc<Vec<u8>>,
    /// The certificate.
    pub certificate: ModelCertificate,
    /// SHA-256 of the certifying enclave key.
    pub enclave_key_sha256: [u8; 32],
}

/// The running enclave, for the admin's view.
#[derive(Debug, Clone, Default)]
pub struct EnclaveSummary {
    /// Which boot.
    pub generation: u64,
    /// Its measurement, hex, when it is up.
    pub measurement: Option<String>,
}

#[derive(Debug)]
enum Mode {
    /// SQLite: this process coordinates, always.
    Single,
    /// PostgreSQL: whoever holds the lease.
    Leased {
        /// This process's name in the lease row.
        holder: String,
    },
}

/// Coordination of training across replicas (one replica: trivially).
pub struct Coordination {
    ctx: ControllerContext,
    mode: Mode,
    link: ReplicaLink,
    /// The controller, while this replica coordinates.
    leader: watch::Sender<Option<Arc<Federation>>>,
    /// The store's round and model, for held polls where there is no local controller.
    observed: watch::Sender<FederationStatus>,
    lease: std::sync::Mutex<Option<(CoordinatorLease, Instant)>>,
    /// The newest model's bytes, read once from the store per version.
    model_bytes: tokio::sync::Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for Coordination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordination")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Coordination {
    /// With SQLite, starts the controller and its enclave now (a failure
    /// stops the server from starting); with PostgreSQL, prepares to
    /// compete for the lease once [`Coordination::run`] knows this
    /// replica's address.
    pub async fn start(
        ctx: ControllerContext,
        identity: &ServerIdentity,
    ) -> Result<Arc<Self>, FederationError> {
        let timeout = Duration::from_secs(ctx.config.server.request_timeout_secs.max(5));
        let link = ReplicaLink::new(identity, timeout).map_err(FederationError::Inconsistent)?;
        let (mode, leader) = if ctx.store.backend() == "postgres" {
            let mut name = [0u8; 8];
            rand::Rng::fill_bytes(&mut rand::rng(), &mut name);
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "replica".to_owned());
            let holder = format!("{host}/{}/{}", std::process::id(), hex::encode(name));
            (Mode::Leased { holder }, None)
        } else {
            (Mode::Single, Some(Federation::start(ctx.clone()).await?))
        };
        let (leader, _) = watch::channel(leader);
        let (observed, _) = watch::channel(FederationStatus::default());
        Ok(Arc::new(Self {
            ctx,
            mode,
            link,
            leader,
            observed,
            lease: std::sync::Mutex::new(None),
            model_bytes: tokio::sync::Mutex::new(None),
        }))
    }

    /// This replica's controller, while it coordinates.
    pub fn local(&self) -> Option<Arc<Federation>> {
        self.leader.borrow().clone()
    }

    /// The link other replicas are checked against.
    pub fn link(&self) -> &ReplicaLink {
        &self.link
    }

    /// Who does the enclave's part now. `503 enclave_restarting` while no
    /// replica coordinates (a coordinator died and its lease has not run
    /// out, or the next one's enclave is starting).
    pub async fn coordinator(&self) -> ApiResult<Coordinator> {
        if let Some(federation) = self.local() {
            return Ok(Coordinator::Local(federation));
        }
        let Mode::Leased { holder } = &self.mode else {
            return Err(ApiError::internal("the coordinator is not running"));
        };
        let lease = self.current_lease().await?;
        match lease {
            Some(lease) if lease.is_live(self.now()) && &lease.holder != holder => {
                Ok(Coordinator::Remote {
                    link: self.link.clone(),
                    address: lease.address,
                })
            }
            _ => Err(ApiError::new(ErrorCode::EnclaveRestarting)
                .detail("no replica coordinates right now")
                .retry_after(2)),
        }
    }

    /// The coordinator lease as last read (at most a second ago); `None`
    /// with SQLite, or before any replica coordinated.
    pub async fn lease(&self) -> ApiResult<Option<CoordinatorLease>> {
        match self.mode {
            Mode::Single => Ok(None),
            Mode::Leased { .. } => self.current_lease().await,
        }
    }

    async fn current_lease(&self) -> ApiResult<Option<CoordinatorLease>> {
        if let Ok(cached) = self.lease.lock()
            && let Some((lease, read)) = cached.as_ref()
            && read.elapsed() < LEASE_CACHE
        {
            return Ok(Some(lease.clone()));
        }
        let lease = self.ctx.store.coordinator_lease().await?;
        if let (Ok(mut cached), Some(lease)) = (self.lease.lock(), &lease) {
            *cached = Some((lease.clone(), Instant::now()));
        }
        Ok(lease)
    }

    /// Watches round and model changes: the local controller's when this
    /// replica coordinates, else the store's as observed.
    pub fn subscribe(&self) -> watch::Receiver<FederationStatus> {
        match self.local() {
            Some(federation) => federation.subscribe(),
            None => self.observed.subscribe(),
        }
    }

    /// A report for a device's nonce, or (no nonce) the boot's.
    pub async fn attest(&self, nonce: Option<[u8; 32]>) -> ApiResult<Option<AttestationReport>> {
        match self.coordinator().await? {
            Coordinator::Local(federation) => match nonce {
                Some(nonce) => Ok(Some(federation.attest(nonce).await?)),
                None => Ok(federation.enclave().info().await.map(|info| info.report)),
            },
            Coordinator::Remote { link, address } => Ok(link.attest(&address, nonce).await?.report),
        }
    }

    /// The model devices train from, certified by the running enclave.
    pub async fn current_model(&self) -> ApiResult<ServedModel> {
        match self.coordinator().await? {
            Coordinator::Local(federation) => {
                let enclave = federation
                    .enclave()
                    .ensure_running()
                    .await
                    .map_err(FederationError::from)?;
                let model = federation.current_model(&enclave).await?;
                Ok(ServedModel {
                    bytes: model.bytes,
                    certificate: model.certificate,
                    enclave_key_sha256: model.enclave_key_sha256,
                })
            }
            Coordinator::Remote { link, address } => {
                let certified = link.model(&address).await?;
                let mut enclave_key_sha256 = [0u8; 32];
                hex::decode_to_slice(&certified.enclave_key_sha256, &mut enclave_key_sha256)
                    .map_err(|_| ApiError::internal("the coordinator sent a malformed key hash"))?;
                let bytes = self
                    .model_bytes(certified.version, &certified.certificate.model_sha256)
                    .await?;
                Ok(ServedModel {
                    bytes,
                    certificate: certified.certificate,
                    enclave_key_sha256,
                })
            }
        }
    }

    /// The stored bytes of model `version`, which must hash to `sha256`
    /// (what the coordinator's enclave certified).
    async fn model_bytes(&self, version: u64, expected: &[u8; 32]) -> ApiResult<Arc<Vec<u8>>> {
        let mut cached = self.model_bytes.lock().await;
        if let Some((cached_version, bytes)) = cached.as_ref()
            && *cached_version == version
            && sha256(bytes) == *expected
        {
            return Ok(bytes.clone());
        }
        let record = self
            .ctx
            .store
            .get_model(version)
            .await?
            .ok_or_else(|| ApiError::internal(format!("model {version} is not stored")))?;
        if sha256(&record.bytes) != *expected {
            return Err(ApiError::internal(format!(
                "stored model {version} is not the one the coordinator's enclave certified"
            )));
        }
        let bytes = Arc::new(record.bytes);
        *cached = Some((version, bytes.clone()));
        Ok(bytes)
    }

    /// The running enclave, for the admin's view.
    pub async fn enclave_summary(&self) -> EnclaveSummary {
        match self.coordinator().await {
            Ok(Coordinator::Local(federation)) => EnclaveSummary {
                generation: federation.enclave().generation(),
                measurement: federation
                    .enclave()
                    .info()
                    .await
                    .map(|info| hex::encode(info.verified.measurement)),
            },
            Ok(Coordinator::Remote { link, address }) => match link.attest(&address, None).await {
                Ok(answer) => EnclaveSummary {
                    generation: answer.generation,
                    measurement: answer.report.map(|r| hex::encode(r.measurement)),
                },
                Err(_) => EnclaveSummary::default(),
            },
            Err(_) => EnclaveSummary::default(),
        }
    }

    /// Starts (or resumes) training, wherever the controller runs.
    pub async fn start_training(&self) -> Result<(), FederationError> {
        self.control(TrainingControl::Started).await
    }

    /// Opens no new round (an open one finishes), wherever the controller runs.
    pub async fn pause(&self) -> Result<(), FederationError> {
        self.control(TrainingControl::Paused).await
    }

    async fn control(&self, control: TrainingControl) -> Result<(), FederationError> {
        match self.local() {
            Some(federation) => federation.control(control).await,
            None => {
                self.ctx
                    .store
                    .set_training_control(control, self.now())
                    .await?;
                Ok(())
            }
        }
    }

    /// True when rounds are being started.
    pub async fn running(&self) -> Result<bool, FederationError> {
        crate::federation::is_running(self.ctx.store.as_ref(), &self.ctx.config).await
    }

    /// The largest sealed update body a device may send now.
    pub async fn update_body_limit(&self) -> usize {
        match self.local() {
            Some(federation) => federation.update_body_limit().await,
            // The coordinator checks the envelope against the model; here
            // only the configured ceiling is known without reading it.
            None => self.ctx.config.limits.update_bytes,
        }
    }

    fn now(&self) -> i64 {
        store_time(self.ctx.clock.now())
    }

    /// Runs until `shutdown` fires: the controller (SQLite), or the lease
    /// and, while it is held, the controller (PostgreSQL). `address` is
    /// where other replicas reach this one.
    pub async fn run(self: Arc<Self>, address: String, shutdown: watch::Receiver<bool>) {
        match &self.mode {
            Mode::Single => {
                if let Some(federation) = self.local() {
                    federation.run(shutdown).await;
                }
            }
            Mode::Leased { holder } => {
                let holder = holder.clone();
                let observer = tokio::spawn(self.clone().observe(shutdown.clone()));
                self.hold_lease(&holder, &address, shutdown).await;
                observer.abort();
            }
        }
    }

    /// Takes and renews the lease; starts the controller when it is taken
    /// and stops it when it cannot be kept. Starting the enclave runs in a
    /// task of its own, so renewals go on while it starts (a start slower
    /// than the lease must not hand the lease to another replica).
    async fn hold_lease(
        self: &Arc<Self>,
        holder: &str,
        address: &str,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let lease_secs = self.ctx.config.federation.lease_secs;
        let renew_every = Duration::from_secs(lease_secs / 3).max(Duration::from_secs(1));
        // Renewed this long ago at most, a holder still has a third of the
        // lease left: it steps down then rather than risk running on after
        // another replica took over.
        let keep_for = Duration::from_secs(lease_secs) - renew_every;
        let mut office = Office::Vacant;
        let mut renewed = Instant::now();
        tracing::info!(
            holder,
            address,
            lease_secs,
            "competing for the coordinator lease"
        );
        loop {
            let now = self.now();
            let expires_at = now.saturating_add(i64::try_from(lease_secs).unwrap_or(i64::MAX));
            match self
                .ctx
                .store
                .acquire_lease(holder, address, now, expires_at)
                .await
            {
                Ok(lease) if lease.holder == holder => {
                    renewed = Instant::now();
                    office = match office {
                        Office::Vacant => {
                            Office::Starting(tokio::spawn(self.clone().take_office(lease)))
                        }
                        Office::Starting(start) if start.is_finished() => match start.await {
                            Ok(Some(tenure)) => Office::Held(tenure),
                            _ => {
                                // Let another replica try sooner than the lease would.
                                let _ = self.ctx.store.release_lease(holder).await;
                                Office::Vacant
                            }
                        },
                        other => other,
                    };
                }
                Ok(lease) => {
                    if !matches!(office, Office::Vacant) {
                        tracing::warn!(
                            now_held_by = %lease.holder,
                            epoch = lease.epoch,
                            "another replica holds the coordinator lease; stepping down"
                        );
                        self.leave(std::mem::replace(&mut office, Office::Vacant))
                            .await;
                    }
                    if let Ok(mut cached) = self.lease.lock() {
                        *cached = Some((lease, Instant::now()));
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "could not renew the coordinator lease");
                    if !matches!(office, Office::Vacant) && renewed.elapsed() >= keep_for {
                        tracing::warn!(
                            "the coordinator lease could not be renewed in time; stepping down"
                        );
                        self.leave(std::mem::replace(&mut office, Office::Vacant))
                            .await;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(renew_every) => {}
                _ = shutdown.changed() => break,
            }
        }
        if !matches!(office, Office::Vacant) {
            self.leave(office).await;
            // A clean stop hands over at once rather than after the lease.
            if let Err(err) = self.ctx.store.release_lease(holder).await {
                tracing::warn!(%err, "could not release the coordinator lease");
            }
        }
    }

    /// Gives up the office: waits for a start in progress, then stops the
    /// controller and its enclave.
    async fn leave(&self, office: Office) {
        let tenure = match office {
            Office::Vacant => None,
            Office::Starting(start) => start.await.ok().flatten(),
            Office::Held(tenure) => Some(tenure),
        };
        if let Some(tenure) = tenure {
            self.step_down(tenure).await;
        }
    }

    /// Starts the enclave and the controller under a freshly taken lease.
    async fn take_office(self: Arc<Self>, lease: CoordinatorLease) -> Option<Tenure> {
        tracing::info!(
            epoch = lease.epoch,
            "took the coordinator lease; starting the enclave"
        );
        let federation = match Federation::start(self.ctx.clone()).await {
            Ok(federation) => federation,
            Err(err) => {
                tracing::error!(%err, "could not start the enclave; giving the lease up");
                return None;
            }
        };
        self.ctx
            .auditor
            .audit(
                AuditKind::CoordinatorElected,
                "server",
                &lease.holder,
                json!({ "epoch": lease.epoch, "address": lease.address }),
            )
            .await;
        let (stop, stopped) = watch::channel(false);
        let controller = tokio::spawn(federation.clone().run(stopped));
        self.leader.send_replace(Some(federation));
        Some(Tenure { stop, controller })
    }

    /// Stops the controller and its enclave.
    async fn step_down(&self, tenure: Tenure) {
        self.leader.send_replace(None);
        let _ = tenure.stop.send(true);
        let grace = Duration::from_secs(self.ctx.config.server.shutdown_grace_secs.max(1));
        if tokio::time::timeout(grace, tenure.controller)
            .await
            .is_err()
        {
            tracing::warn!("the round controller did not stop within the grace period");
        }
    }

    /// Publishes the store's round and model as they change, for held polls
    /// at a replica without a controller.
    async fn observe(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let round = self.ctx.store.latest_round().await.ok().flatten();
            let model = self.ctx.store.latest_model_summary().await.ok().flatten();
            let finished = self.ctx.config.federation.max_rounds > 0
                && model
                    .as_ref()
                    .is_some_and(|m| m.version >= self.ctx.config.federation.max_rounds);
            let now = FederationStatus {
                round_id: round.as_ref().map_or(0, |r| r.id),
                round_attempt: round.as_ref().map_or(0, |r| r.attempt),
                round_state: round.map(|r| r.state),
                model_version: model.map(|m| m.version),
                enclave_generation: 0,
                finished,
            };
            self.observed.send_if_modified(|status| {
                let changed = *status != now;
                *status = now;
                changed
            });
            tokio::select! {
                () = tokio::time::sleep(OBSERVE_EVERY) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// This replica's time as coordinator.
struct Tenure {
    stop: watch::Sender<bool>,
    controller: tokio::task::JoinHandle<()>,
}

/// Where this replica stands in the lease loop.
enum Office {
    /// Not coordinating.
    Vacant,
    /// The lease is held; the enclave is starting.
    Starting(tokio::task::JoinHandle<Option<Tenure>>),
    /// Coordinating.
    Held(Tenure),
}

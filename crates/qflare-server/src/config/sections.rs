//! The configuration's types: one struct per YAML section, with its
//! defaults, and the checks that types alone cannot express. About 650
//! lines in one file on purpose: `Config::validate` checks values across
//! sections, and reads best beside every default it checks.

use std::net::SocketAddr;
use std::path::PathBuf;

use qflare_protocol::attestation::hardware::HardwarePolicy;
use qflare_protocol::{KemSuite, SignatureSuite};
use serde::{Deserialize, Serialize};

use super::ConfigError;
use crate::ratelimit::RateLimit;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners, state and backing services.
    pub server: ServerSection,
    /// Which suites the server offers and uses.
    pub crypto: CryptoSection,
    /// Session lifetimes.
    pub sessions: SessionSection,
    /// Enrollment tokens.
    pub tokens: TokenSection,
    /// Body-size limits per route.
    pub limits: LimitSection,
    /// Request rates per client address and per device.
    pub rate_limits: RateLimitSection,
    /// The audit ledger.
    pub audit: AuditSection,
    /// The enclave process.
    pub enclave: EnclaveSection,
    /// Federated training: rounds, selection, deadlines.
    pub federation: FederationSection,
    /// The enclave's poisoning defense and aggregator.
    pub aggregation: qflare_enclave::AggregationConfig,
}

/// Listeners, state and backing services.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// HTTPS listen address.
    pub listen: SocketAddr,
    /// Plain-HTTP Prometheus listener; `null` disables it. Keep it off public interfaces.
    pub metrics_listen: Option<SocketAddr>,
    /// Holds the server's keys, TLS certificate and (by default) the SQLite database.
    pub state_dir: PathBuf,
    /// `sqlite://PATH` (created on first start) or `postgres://...`. Default: `sqlite://<state_dir>/qflare.db`.
    pub database_url: Option<String>,
    /// Redis for rate limits shared by several replicas; `null` keeps them in memory.
    pub redis_url: Option<String>,
    /// `host:port` at which the other replicas reach this one's HTTPS
    /// listener (the coordinator is reached there); `null`: the address the
    /// listener is bound to, right when it binds one specific address.
    pub advertise_address: Option<String>,
    /// PEM certificate chain; generated into the state directory when `null`.
    pub tls_certificate: Option<PathBuf>,
    /// PEM private key for `tls_certificate`.
    pub tls_private_key: Option<PathBuf>,
    /// Names and addresses put in a generated certificate.
    pub tls_subject_alt_names: Vec<String>,
    /// Longest time one request may take before it is answered with an error.
    pub request_timeout_secs: u64,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout_secs: u64,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_secs: u64,
    /// Open connections the server holds at once; more are closed on accept.
    pub max_connections: usize,
    /// Open connections one client address (an IPv6 /64) may hold at once.
    pub max_connections_per_address: usize,
    /// A connection that moves no byte either way for this long is closed,
    /// over HTTP/1.1 and HTTP/2 alike. Longer than `request_timeout_secs`.
    pub idle_timeout_secs: u64,
}

impl std::fmt::Debug for ServerSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Database and Redis URLs may embed passwords.
        f.debug_struct("ServerSection")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("state_dir", &self.state_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("advertise_address", &self.advertise_address)
            .field("tls_certificate", &self.tls_certificate)
            .field("tls_private_key", &self.tls_private_key)
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("idle_timeout_secs", &self.idle_timeout_secs)
            .finish_non_exhaustive()
    }
}

/// Replaces a URL's password with `***`: the one in the userinfo
/// (`postgres://user:pw@host`) and any in the query, where libpq and the
/// Redis client also take one (`?password=`, `?sslpassword=`).
pub fn redact_url(url: &str) -> String {
    let (rest, query) = match url.split_once('?') {
        Some((rest, query)) => (rest, Some(query)),
        None => (url, None),
    };
    let mut redacted = match (rest.find("://"), rest.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &rest[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &rest[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                ),
                None => rest.to_owned(),
            }
        }
        _ => rest.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_password_parameter(key) => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        redacted.push('?');
        redacted.push_str(&pairs.join("&"));
    }
    redacted
}

fn is_password_parameter(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password") || key == "passwd" || key == "pwd"
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            state_dir: PathBuf::from("./qflare-data"),
            database_url: None,
            redis_url: None,
            advertise_address: None,
            tls_certificate: None,
            tls_private_key: None,
            tls_subject_alt_names: vec!["localhost".into(), "127.0.0.1".into()],
            request_timeout_secs: 60,
            tls_handshake_timeout_secs: 10,
            shutdown_grace_secs: 10,
            max_connections: 16_384,
            max_connections_per_address: 256,
            idle_timeout_secs: 120,
        }
    }
}

impl ServerSection {
    /// The database URL, defaulting to a SQLite file in the state directory.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.state_dir.join("qflare.db").display()))
    }
}

/// Which suites the server offers and uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CryptoSection {
    /// KEM suites devices may enroll with.
    pub kem_suites: Vec<KemSuite>,
    /// The suite devices are told to prefer.
    pub default_kem_suite: KemSuite,
    /// Signature suites devices may enroll with.
    pub signature_suites: Vec<SignatureSuite>,
    /// The server's own signature suite (used when its key is first generated).
    pub server_signature_suite: SignatureSuite,
}

impl Default for CryptoSection {
    fn default() -> Self {
        Self {
            kem_suites: KemSuite::ALL.to_vec(),
            default_kem_suite: KemSuite::MlKem768,
            signature_suites: SignatureSuite::ALL.to_vec(),
            server_signature_suite: SignatureSuite::MlDsa65,
        }
    }
}

/// Session lifetimes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSection {
    /// How long a session lives after the handshake (at most 24 h).
    pub lifetime_secs: u64,
}

impl Default for SessionSection {
    fn default() -> Self {
        Self {
            lifetime_secs: 3600,
        }
    }
}

/// Enrollment tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSection {
    /// Validity when the admin names none.
    pub default_ttl_secs: u64,
    /// The longest validity an admin may ask for.
    pub max_ttl_secs: u64,
}

impl Default for TokenSection {
    fn default() -> Self {
        Self {
            default_ttl_secs: 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
        }
    }
}

/// Body-size limits per route, in bytes; checked before any parsing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSection {
    /// `POST /v1/enroll`.
    pub enroll_bytes: usize,
    /// `POST /v1/sessions` and `/confirm`.
    pub session_bytes: usize,
    /// Sealed in-session requests other than update submission.
    pub sealed_bytes: usize,
    /// Ceiling of a sealed update submission. The limit applied is the
    /// smaller of this and what an update of the current model can need
    /// (about 4/3 of the model's size: 9 MB for the MNIST CNN).
    pub update_bytes: usize,
    /// Admin API requests.
    pub admin_bytes: usize,
    /// Update bodies the server holds in memory at once, over all devices
    /// (each upload is charged its declared length, or the update limit).
    /// An upload over the budget is answered `503 busy` before its body is
    /// read; the device retries.
    pub uploads_in_memory_bytes: usize,
    /// Model download bodies the server holds in memory at once, over all
    /// devices (each a copy sealed to one session). A download over the
    /// budget waits for its share before its copy is made.
    pub downloads_in_memory_bytes: usize,
}

impl Default for LimitSection {
    fn default() -> Self {
        Self {
            enroll_bytes: qflare_protocol::wire::limits::ENROLL_REQUEST,
            session_bytes: qflare_protocol::wire::limits::CLIENT_HELLO,
            sealed_bytes: 256 * 1024,
            update_bytes: qflare_protocol::wire::limits::SEALED_RECORD,
            admin_bytes: 16 * 1024,
            uploads_in_memory_bytes: 1024 * 1024 * 1024,
            downloads_in_memory_bytes: 256 * 1024 * 1024,
        }
    }
}

/// Request rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitSection {
    /// `POST /v1/enroll`, per client address: the strictest, against token guessing.
    pub enroll: RateLimit,
    /// Handshakes, per client address.
    pub sessions: RateLimit,
    /// Handshakes and sealed requests, per device.
    pub device: RateLimit,
    /// Admin API and web pages, per client address.
    pub admin: RateLimit,
    /// Everything else (health, server info), per client address.
    pub public: RateLimit,
    /// New connections (TLS handshakes, the costly part of a connection), per client address.
    pub connections: RateLimit,
}

impl Default for RateLimitSection {
    fn default() -> Self {
        Self {
            enroll: RateLimit {
                per_minute: 10,
                burst: 5,
            },
            sessions: RateLimit {
                per_minute: 120,
                burst: 60,
            },
            device: RateLimit {
                per_minute: 1200,
                burst: 200,
            },
            admin: RateLimit {
                per_minute: 600,
                burst: 100,
            },
            public: RateLimit {
                per_minute: 600,
                burst: 100,
            },
            connections: RateLimit {
                per_minute: 600,
                burst: 200,
            },
        }
    }
}

/// The audit ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// A signed checkpoint of the chain head every this many entries.
    pub checkpoint_every: u64,
}

impl Default for AuditSection {
    fn default() -> Self {
        Self {
            checkpoint_every: 32,
        }
    }
}

/// The enclave process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnclaveSection {
    /// The enclave executable. Default: `qflare-enclave` beside the server's
    /// executable, else the server's own executable with the `enclave` argument.
    pub command: Option<PathBuf>,
    /// Arguments for `command` (ignored when the default is used).
    pub args: Vec<String>,
    /// The KEM suite of the enclave's per-boot key.
    pub kem_suite: KemSuite,
    /// Also trust the SHA-384 of the executable the server spawns (a
    /// development convenience: the server chose that file).
    pub trust_spawned_binary: bool,
    /// Trusted measurements (96 hex characters each).
    pub allowed_measurements: Vec<String>,
    /// Accept self-signed `software` reports: an enclave that is a plain
    /// hardened process on this host, which the host's root could read.
    /// Off by default; the demo, the benches and the tests turn it on.
    pub allow_software_mode: bool,
    /// Hardware evidence the server accepts from its enclave (an enclave run
    /// with `--tee`): per TEE kind its measurement allow-list and minimum
    /// TCB, in the format devices and `qflare attest verify` read
    /// (docs/enclave.md §5.5). Empty: none.
    pub hardware: HardwarePolicy,
    /// Longest time one enclave request may take before the process is restarted.
    pub request_timeout_secs: u64,
    /// FLTrust's root data set (an MNIST-format directory), read by the enclave at start.
    pub root_data: Option<PathBuf>,
    /// Compute threads inside the enclave.
    pub threads: usize,
}

impl Default for EnclaveSection {
    fn default() -> Self {
        Self {
            command: None,
            args: Vec::new(),
            kem_suite: KemSuite::MlKem768,
            trust_spawned_binary: true,
            allowed_measurements: Vec::new(),
            allow_software_mode: false,
            hardware: HardwarePolicy::default(),
            request_timeout_secs: 600,
            root_data: None,
            threads: 1,
        }
    }
}

/// The `federation.architecture` value for a model an admin registers from
/// a file rather than one of the built-in architectures.
pub const CUSTOM_MODEL: &str = "custom";

/// Federated training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationSection {
    /// Federated training on this deployment. With SQLite the server runs
    /// the round controller and the enclave itself; with PostgreSQL every
    /// replica that has it on serves every device route and competes for
    /// the coordinator lease, and the holder alone runs the controller and
    /// the enclave (the others forward to it).
    pub enabled: bool,
    /// How long the coordinator lease lasts unless renewed (renewed every
    /// third of it); the longest a round waits for a replica to take over
    /// from a coordinator that died. Replicas' clocks must agree to well
    /// within it. PostgreSQL only.
    pub lease_secs: u64,
    /// The model: a built-in architecture (`mnist-2nn`, `mnist-cnn`), which
    /// the enclave creates as version 0 itself, or `custom`: the federation
    /// waits until an admin registers a model file (`qflare model init`).
    pub architecture: String,
    /// Seed of the initial model the enclave creates.
    pub model_seed: u64,
    /// Start rounds as soon as enough devices are active (else `qflare round start`).
    pub auto_start: bool,
    /// Stop after this many aggregated rounds (0: never).
    pub max_rounds: u64,
    /// Devices per round (C·K in the FedAvg paper); `fraction` wins when set.
    pub clients_per_round: usize,
    /// Fraction of active devices per round (the paper's C).
    pub fraction: Option<f64>,
    /// Fewest accepted updates for a round to produce a model.
    pub min_updates: usize,
    /// Seconds a round stays open; at the deadline it is aggregated if the
    /// minimum arrived, else it fails and a new round starts.
    pub round_timeout_secs: u64,
    /// Devices seen within this many seconds are eligible for selection.
    pub active_within_secs: u64,
    /// Local training settings sent to devices.
    pub training: qflare_protocol::federation::TrainingPlan,
    /// The held-out test set (an MNIST-format directory) each new model is evaluated on.
    pub eval_data: Option<PathBuf>,
    /// How many test examples to evaluate on.
    pub eval_examples: usize,
    /// How often devices are told to poll, in seconds, when they do not
    /// long-poll (or the server answers a long poll at once).
    pub poll_interval_secs: u64,
    /// The longest a device's poll is held waiting for the round to change
    /// (a long poll), in seconds; 0 answers every poll at once. Shorter
    /// than `server.request_timeout_secs`.
    pub long_poll_secs: u64,
    /// How devices encode their updates: `f32` (exact), `f16` (half the
    /// bytes) or `int8` (a quarter, stochastically rounded per tensor);
    /// the enclave refuses any other.
    pub update_encoding: qflare_protocol::update_encoding::UpdateEncoding,
    /// Largest model file an admin may register, in bytes (the ceiling
    /// for everything sized from the model).
    pub max_model_bytes: u64,
}

impl Default for FederationSection {
    fn default() -> Self {
        Self {
            enabled: true,
            lease_secs: 10,
            architecture: "mnist-2nn".into(),
            model_seed: 1,
            auto_start: false,
            max_rounds: 0,
            clients_per_round: 10,
            fraction: None,
            min_updates: 2,
            round_timeout_secs: 600,
            active_within_secs: 3600,
            training: qflare_protocol::federation::TrainingPlan {
                learning_rate: 0.1,
                batch_size: 10,
                epochs: 1,
            },
            eval_data: None,
            eval_examples: 10_000,
            poll_interval_secs: 2,
            long_poll_secs: 25,
            update_encoding: Default::default(),
            max_model_bytes: 1 << 30,
        }
    }
}

impl Config {
    /// Checks values that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |message: &str| {
            Err(ConfigError::Invalid {
                origin: "validation".into(),
                message: message.into(),
            })
        };
        if self.crypto.kem_suites.is_empty() || self.crypto.signature_suites.is_empty() {
            return fail("crypto.kem_suites and crypto.signature_suites must not be empty");
        }
        if !self
            .crypto
            .kem_suites
            .contains(&self.crypto.default_kem_suite)
        {
            return fail("crypto.default_kem_suite must be one of crypto.kem_suites");
        }
        if self.sessions.lifetime_secs == 0
            || self.sessions.lifetime_secs > qflare_protocol::handshake::MAX_SESSION_LIFETIME_SECS
        {
            return fail("sessions.lifetime_secs must be between 1 and 86400");
        }
        if self.server.max_connections == 0
            || self.server.max_connections_per_address == 0
            || self.server.max_connections_per_address > self.server.max_connections
        {
            return fail(
                "server.max_connections and server.max_connections_per_address must be positive, the second at most the first",
            );
        }
        if self.limits.uploads_in_memory_bytes == 0 || self.limits.downloads_in_memory_bytes == 0 {
            return fail(
                "limits.uploads_in_memory_bytes and limits.downloads_in_memory_bytes must be positive",
            );
        }
        if self.federation.enabled && self.federation.lease_secs < 3 {
            return fail(
                "federation.lease_secs must be at least 3 (it is renewed every third of it, in whole seconds)",
            );
        }
        if self.federation.enabled
            && self.federation.long_poll_secs >= self.server.request_timeout_secs
        {
            return fail(
                "federation.long_poll_secs must be shorter than server.request_timeout_secs (a held poll must end before the request times out)",
            );
        }
        if self.server.idle_timeout_secs <= self.server.request_timeout_secs {
            return fail(
                "server.idle_timeout_secs must be longer than server.request_timeout_secs (a request in progress is not idle)",
            );
        }
        if self.tokens.default_ttl_secs == 0
            || self.tokens.default_ttl_secs > self.tokens.max_ttl_secs
        {
            return fail(
                "tokens.default_ttl_secs must be positive and at most tokens.max_ttl_secs",
            );
        }
        if self.federation.min_updates == 0 || self.federation.clients_per_round == 0 {
            return fail(
                "federation.min_updates and federation.clients_per_round must be positive",
            );
        }
        if self.federation.clients_per_round > qflare_enclave::frame::MAX_ROUND_DEVICES
            || self.federation.min_updates > qflare_enclave::frame::MAX_ROUND_DEVICES
        {
            return fail(
                "federation.clients_per_round and federation.min_updates are at most 16384 \
                 (the devices one round may select)",
            );
        }
        if self
            .federation
            .fraction
            .is_some_and(|f| !(f > 0.0 && f <= 1.0))
        {
            return fail("federation.fraction must be in (0, 1]");
        }
        if self.federation.architecture != CUSTOM_MODEL
            && self
                .federation
                .architecture
                .parse::<qflare_ml::Architecture>()
                .is_err()
        {
            return fail("federation.architecture must be mnist-2nn, mnist-cnn or custom");
        }
        if self.federation.max_model_bytes == 0
            || self.federation.max_model_bytes
                > qflare_protocol::wire::limits::MAX_MODEL_BYTES as u64
        {
            return fail("federation.max_model_bytes must be between 1 and 1073741824 (1 GiB)");
        }
        if self.aggregation.validate().is_err() {
            return fail(
                "the aggregation section is inconsistent (see qflare-enclave's config docs)",
            );
        }
        for measurement in &self.enclave.allowed_measurements {
            if measurement.len() != 96 || hex::decode(measurement).is_err() {
                return fail("enclave.allowed_measurements holds 96-hex-character SHA-384 values");
            }
        }
        if let Some(kind) = self.enclave.hardware.first_trusting_nothing() {
            return fail(&format!(
                "enclave.hardware.{} accepts no measurement: list the launch measurements \
                 to trust, or remove it",
                kind.as_str().replace('-', "_")
            ));
        }
        if self.federation.enabled
            && !self.enclave.allow_software_mode
            && self.enclave.hardware == HardwarePolicy::default()
        {
            return fail(
                "no enclave could attest: enclave.allow_software_mode is off and \
                 enclave.hardware accepts no TEE. Without a TEE, set \
                 enclave.allow_software_mode: true (QFLARE_ENCLAVE__ALLOW_SOFTWARE_MODE=true) \
                 to accept the enclave as a hardened process on this host (docs/enclave.md §9)",
            );
        }
        if self.audit.checkpoint_every == 0 {
            return fail("audit.checkpoint_every must be positive");
        }
        if self.server.tls_certificate.is_some() != self.server.tls_private_key.is_some() {
            return fail("server.tls_certificate and server.tls_private_key go together");
        }
        for limit in [
            &self.rate_limits.enroll,
            &self.rate_limits.sessions,
            &self.rate_limits.device,
            &self.rate_limits.admin,
            &self.rate_limits.public,
            &self.rate_limits.connections,
        ] {
            if limit.per_minute == 0 || limit.burst == 0 {
                return fail("every rate limit needs per_minute and burst above zero");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with the choice the defaults leave open made: no TEE,
    /// the enclave accepted as a hardened process.
    fn software_enclave() -> Config {
        let mut config = Config::default();
        config.enclave.allow_software_mode = true;
        config
    }

    #[test]
    fn validation_catches_inconsistent_values() {
        let mut config = software_enclave();
        config.crypto.default_kem_suite = KemSuite::FrodoKem976Aes;
        config.crypto.kem_suites = vec![KemSuite::MlKem768];
        assert!(config.validate().is_err());
        let mut config = software_enclave();
        config.sessions.lifetime_secs = 100_000;
        assert!(config.validate().is_err());
        // A held poll must end before its request times out, where the
        // federation (and so the long poll) runs.
        let mut config = software_enclave();
        config.federation.long_poll_secs = config.server.request_timeout_secs;
        assert!(config.validate().is_err());
        config.federation.enabled = false;
        assert!(config.validate().is_ok());
        // A round's BeginRound must fit the enclave frame.
        let mut config = software_enclave();
        config.federation.clients_per_round = qflare_enclave::frame::MAX_ROUND_DEVICES;
        assert!(config.validate().is_ok());
        config.federation.clients_per_round += 1;
        assert!(config.validate().is_err());
        // The update encoding reads from YAML by its wire name.
        let section: FederationSection = serde_yaml_ng::from_str("update_encoding: int8").unwrap();
        assert_eq!(
            section.update_encoding,
            qflare_protocol::update_encoding::UpdateEncoding::Int8
        );
    }

    #[test]
    fn the_enclave_hardware_policy_reads_from_yaml_and_must_trust_something() {
        let measurement = "ab".repeat(48);
        let section: EnclaveSection = serde_yaml_ng::from_str(&format!(
            "allow_software_mode: false\nhardware:\n  nitro:\n    pcr0: [\"{measurement}\"]\n"
        ))
        .unwrap();
        assert!(section.hardware.nitro.is_some() && section.hardware.sev_snp.is_none());
        let mut config = Config {
            enclave: section,
            ..software_enclave()
        };
        assert!(config.validate().is_ok());
        // An accepted kind with an empty allow-list trusts nothing.
        config.enclave.hardware = serde_yaml_ng::from_str("tdx: {mr_td: []}").unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("enclave.hardware.tdx"), "{err}");
        // Neither software nor any TEE: no enclave could ever attest.
        config.enclave.hardware = HardwarePolicy::default();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("no enclave could attest"), "{err}");
        // Unknown keys are mistakes, not ignored.
        assert!(serde_yaml_ng::from_str::<EnclaveSection>("hardware: {sgx: {}}").is_err());
    }

    #[test]
    fn url_redaction() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgres://h/db?user=u&password=secret&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:a@h/db?sslpassword=k&PASSWORD=p"),
            "postgres://u:***@h/db?sslpassword=***&PASSWORD=***"
        );
    }
}

//! Talking to the server: enrollment, the session handshake, and sealed
//! calls inside a session. Sits above [`crate::transport`] (pinned HTTPS)
//! and the private `response` module (reading answers).

use std::path::Path;
use std::time::Duration;

use qflare_protocol::api::{ErrorCode, SEALED_CONTENT_TYPE, SESSION_HEADER, routes};
use qflare_protocol::channel::ClientChannel;
use qflare_protocol::enrollment::{self, EnrollResponse};
use qflare_protocol::envelope::UpdateEnvelope;
use qflare_protocol::federation::{SubmitReceipt, UploadAdmission, UploadAdmissionRequest};
use qflare_protocol::handover;
use qflare_protocol::handshake::{ClientHello, ClientIdentity, ClientStart, ServerHello};
use qflare_protocol::identity::{DeviceKeys, EnrollmentToken, ServerFingerprint};
use qflare_protocol::rotation;
use qflare_protocol::wire::{self, limits};
use qflare_protocol::{KemSuite, SignatureSuite};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::EdgeError;
use crate::identity::Identity;
use crate::response::{decode_plain, read_body, server_error};
use crate::transport::Transport;

/// Default timeout of one HTTP exchange (model downloads and uploads included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn post_json<Req: Serialize, Resp: DeserializeOwned>(
    transport: &Transport,
    path: &str,
    request: &Req,
    limit: usize,
) -> Result<Resp, EdgeError> {
    let response = transport
        .send(
            transport
                .http
                .post(transport.url(path))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(wire::encode(request)?),
        )
        .await?;
    decode_plain(response, limit).await
}

/// What `qflare-edge enroll` needs.
#[derive(Debug)]
pub struct EnrollOptions {
    /// The server's base URL (`https://host:port`).
    pub server_url: String,
    /// The single-use token from the admin.
    pub token: EnrollmentToken,
    /// The fingerprint from the admin, pinned from now on.
    pub fingerprint: ServerFingerprint,
    /// A name for the device.
    pub device_name: String,
    /// KEM suite; the server's default when `None`.
    pub kem_suite: Option<KemSuite>,
    /// Signature suite; ML-DSA-65 when `None`.
    pub signature_suite: Option<SignatureSuite>,
    /// Other replicas of the same server, written into the identity and
    /// tried in turn when `server_url` cannot be reached.
    pub alternate_urls: Vec<String>,
}

/// Enrolls: verifies the server against the fingerprint, generates the
/// device's key pairs, proves possession, and writes the identity to `dir`.
pub async fn enroll(options: EnrollOptions, dir: &Path) -> Result<Identity, EdgeError> {
    if Identity::path(dir).exists() {
        return Err(EdgeError::Identity(format!(
            "{} already exists; refusing to overwrite an enrolled identity",
            Identity::path(dir).display()
        )));
    }
    // Checked now rather than at the first failover, which may be months on.
    if let Some(bad) = options.alternate_urls.iter().find(|url| !is_https_url(url)) {
        return Err(EdgeError::Config(format!(
            "alternate server address {bad:?} is not an https:// URL"
        )));
    }
    let server = Transport::discover(&options.server_url, &options.fingerprint).await?;
    let kem_suite = options.kem_suite.unwrap_or(server.info.default_kem_suite);
    let signature_suite = options.signature_suite.unwrap_or_default();
    if !server.info.kem_suites.contains(&kem_suite)
        || !server.info.signature_suites.contains(&signature_suite)
    {
        return Err(EdgeError::Protocol(
            qflare_protocol::ProtocolError::SuiteMismatch {
                expected: "a suite the server offers",
                actual: kem_suite.as_str(),
            },
        ));
    }
    let keys = DeviceKeys::generate(kem_suite, signature_suite, &mut rand::rng())?;
    let request = enrollment::build_request(
        &options.token,
        &options.device_name,
        &keys,
        &options.fingerprint,
    )?;
    let transport = Transport::pinned(
        &options.server_url,
        server.certificate_sha256,
        DEFAULT_TIMEOUT,
    )?;
    let response: EnrollResponse = post_json(
        &transport,
        routes::ENROLL,
        &request,
        limits::ENROLL_RESPONSE,
    )
    .await?;
    let device_id = enrollment::verify_response(
        &response,
        &request,
        &server.verifying_key,
        &options.fingerprint,
    )?;
    let identity = Identity {
        device_id,
        device_name: options.device_name,
        server_url: transport.base_url.clone(),
        server_fingerprint: options.fingerprint,
        server_certificate_sha256: server.certificate_sha256,
        server_key: server.verifying_key,
        keys,
        key_version: 1,
        pending_keys: None,
        alternate_urls: options.alternate_urls,
    };
    identity.create(dir)?;
    tracing::info!(device_id = %device_id, kem = %kem_suite, signature = %signature_suite, "enrolled");
    Ok(identity)
}

fn is_https_url(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|parsed| parsed.scheme() == "https" && parsed.has_host())
}

/// The pinned transport for an enrolled identity.
pub fn transport_for(identity: &Identity) -> Result<Transport, EdgeError> {
    Ok(Transport::pinned(
        &identity.server_url,
        identity.server_certificate_sha256,
        DEFAULT_TIMEOUT,
    )?
    .with_alternates(&identity.alternate_urls))
}

/// An established session.
pub struct Session {
    transport: Transport,
    channel: ClientChannel,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("session_id", &self.channel.session_id())
            .field("expires_at", &self.channel.expires_at())
            .finish_non_exhaustive()
    }
}

/// Runs the handshake: hello, verify the server's signed answer against the
/// pinned key, confirm.
pub async fn open_session(
    identity: &Identity,
    transport: &Transport,
) -> Result<Session, EdgeError> {
    let client = ClientIdentity {
        device_id: identity.device_id,
        kem_public_key: &identity.keys.kem.public,
        kem_secret_key: &identity.keys.kem.secret,
        signing_key: &identity.keys.signing,
    };
    let (await_hello, hello): (_, ClientHello) =
        ClientStart::new(client, &identity.server_key).hello(&mut rand::rng())?;
    let server_hello: ServerHello =
        post_json(transport, routes::SESSIONS, &hello, limits::SERVER_HELLO).await?;
    let (established, confirm) = await_hello.finish(&server_hello, unix_now())?;
    let path = routes::session_confirm(&established.session_id.to_string());
    let _: serde_json::Value = post_json(transport, &path, &confirm, 4096).await?;
    Ok(Session {
        transport: transport.clone(),
        channel: established.into_client_channel()?,
    })
}

impl Session {
    /// The session's id.
    pub fn session_id(&self) -> String {
        self.channel.session_id().to_hex()
    }

    /// When the session dies.
    pub fn expires_at(&self) -> u64 {
        self.channel.expires_at()
    }

    /// True when the session has less than `margin_secs` left.
    pub fn expires_within(&self, margin_secs: u64) -> bool {
        self.channel.expires_at() <= unix_now().saturating_add(margin_secs)
    }

    /// Sends `request` sealed to `path` and opens the sealed answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &mut self,
        path: &str,
        request: &Req,
        response_limit: usize,
    ) -> Result<Resp, EdgeError> {
        let body = self
            .call_raw(path, wire::encode(request)?, response_limit)
            .await?;
        Ok(wire::decode("sealed response", &body, response_limit)?)
    }

    /// Sends raw bytes sealed to `path`; returns the opened answer's bytes.
    pub async fn call_raw(
        &mut self,
        path: &str,
        mut body: Vec<u8>,
        response_limit: usize,
    ) -> Result<Vec<u8>, EdgeError> {
        let seq = self
            .channel
            .seal_request("POST", path, &mut body, unix_now())?;
        let response = self
            .transport
            .send(
                self.transport
                    .http
                    .post(self.transport.url(path))
                    .header(SESSION_HEADER, self.channel.session_id().to_hex())
                    .header(reqwest::header::CONTENT_TYPE, SEALED_CONTENT_TYPE)
                    .body(body),
            )
            .await?;
        let status = response.status();
        let sealed = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == SEALED_CONTENT_TYPE.as_bytes());
        let mut bytes = read_body(
            response,
            response_limit + qflare_protocol::channel::RECORD_OVERHEAD,
        )
        .await?;
        if sealed {
            self.channel.open_response(seq, "POST", path, &mut bytes)?;
        }
        if status.is_success() {
            if !sealed {
                return Err(EdgeError::Protocol(
                    qflare_protocol::ProtocolError::malformed(
                        "response",
                        "a successful in-session answer must be sealed",
                    ),
                ));
            }
            Ok(bytes)
        } else {
            Err(server_error(status.as_u16(), &bytes))
        }
    }

    /// `POST /v1/updates`: sends `envelope` in its binary encoding (a third
    /// smaller than its JSON, and parsed by the host and the enclave without
    /// base64) and opens the sealed receipt.
    ///
    /// First `POST /v1/updates/admission` asks whether the server will take
    /// a body of that length now: a refusal there (`busy` at the server's
    /// upload budget, with `Retry-After`) costs a small request instead of
    /// the whole update. A server that does not know the route (404) is
    /// sent the update directly.
    pub async fn submit_update(
        &mut self,
        envelope: &UpdateEnvelope,
        receipt_limit: usize,
    ) -> Result<SubmitReceipt, EdgeError> {
        let body = envelope.to_bytes();
        let admission = UploadAdmissionRequest {
            round_id: envelope.round_id,
            bytes: u64::try_from(body.len() + qflare_protocol::channel::RECORD_OVERHEAD)
                .unwrap_or(u64::MAX),
        };
        match self
            .call::<_, UploadAdmission>(routes::UPDATE_ADMISSION, &admission, 1024)
            .await
        {
            Ok(_) | Err(EdgeError::Server { status: 404, .. }) => {}
            Err(err) => return Err(err),
        }
        let receipt = self.call_raw(routes::UPDATES, body, receipt_limit).await?;
        Ok(wire::decode("submit receipt", &receipt, receipt_limit)?)
    }

    /// A round trip through the channel.
    pub async fn ping(&mut self) -> Result<serde_json::Value, EdgeError> {
        self.call(routes::SESSION_PING, &serde_json::json!({}), 4096)
            .await
    }
}

/// Replaces the device's keys through `session`, then rewrites the identity
/// file in `dir`. The server ends the device's sessions in the same step.
///
/// The new keys are written to the file (as pending) before the request
/// leaves: if the answer is lost, the device holds both sets and
/// [`load_identity`] finds out at the next start which one the server has.
/// An answer refusing the rotation (4xx) drops the pending keys.
pub async fn rotate_keys(
    identity: &mut Identity,
    session: &mut Session,
    dir: &Path,
) -> Result<u32, EdgeError> {
    let new_keys = DeviceKeys::generate(
        identity.keys.kem.public.suite(),
        identity.keys.signing.suite(),
        &mut rand::rng(),
    )?;
    let request = rotation::build_request(
        identity.device_id,
        &identity.keys.signing,
        &new_keys,
        unix_now(),
    )?;
    identity.pending_keys = Some(new_keys);
    identity.replace(dir)?;
    let answer: Result<serde_json::Value, EdgeError> =
        session.call(routes::ROTATE_KEYS, &request, 4096).await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(err @ EdgeError::Server { status, .. }) if status < 500 => {
            identity.pending_keys = None;
            identity.replace(dir)?;
            return Err(err);
        }
        Err(err) => {
            tracing::warn!(
                %err,
                "the rotation's answer did not arrive; both key sets are kept and the next start settles which one the server holds"
            );
            return Err(err);
        }
    };
    let key_version = answer
        .get("key_version")
        .and_then(serde_json::Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            EdgeError::Protocol(qflare_protocol::ProtocolError::malformed(
                "rotation answer",
                "no key_version",
            ))
        })?;
    if let Some(keys) = identity.pending_keys.take() {
        identity.keys = keys;
    }
    identity.key_version = key_version;
    identity.replace(dir)?;
    tracing::info!(key_version, "rotated keys");
    Ok(key_version)
}

/// Whether a failed handshake says the server holds other keys for this
/// device: the server's signed hello binds the keys it has registered, so
/// with other keys its signature does not verify here; or the server refuses
/// the confirmation (`authentication_failed`).
fn holds_other_keys(err: &EdgeError) -> bool {
    matches!(
        err,
        EdgeError::Protocol(qflare_protocol::ProtocolError::BadSignature(_))
    ) || err.error_code() == Some(ErrorCode::AuthenticationFailed)
}

/// Moves the device's pin along the server's key hand-overs, when the
/// server presents another key or certificate than the pinned ones: the
/// signed chain in `/v1/server-info` must lead from the pinned key to
/// exactly what the server presents (`qflare_protocol::handover`), and the
/// identity file is rewritten with the new pin. Returns whether it moved.
/// A server that presents something no hand-over from the pinned key leads
/// to is refused: it is not the server this device enrolled with.
pub async fn follow_server_key(identity: &mut Identity, dir: &Path) -> Result<bool, EdgeError> {
    let presented = Transport::inspect(&identity.server_url).await?;
    let certificate_sha256 = qflare_protocol::crypto::sha256(&presented.certificate);
    if presented.key == identity.server_key
        && qflare_protocol::secret::ct_eq(&certificate_sha256, &identity.server_certificate_sha256)
    {
        return Ok(false);
    }
    let successor = handover::follow_chain(
        &presented.info.key_handovers,
        &identity.server_key,
        &presented.key,
        &presented.certificate,
    )
    .map_err(|err| {
        EdgeError::Tls(format!(
            "the server presents another key or certificate than the pinned ones, and no signed hand-over from the pinned key leads to them ({err}); if the server was re-created rather than rotated, enroll again"
        ))
    })?;
    identity.server_key = successor.key;
    identity.server_certificate_sha256 = successor.certificate_sha256;
    identity.server_fingerprint = successor.fingerprint;
    identity.replace(dir)?;
    tracing::info!(
        fingerprint = %identity.server_fingerprint,
        hand_overs = successor.steps,
        "the server handed its identity over to a new key; the pin follows it"
    );
    Ok(true)
}

/// Loads the identity in `dir`, following the server's key hand-overs
/// (`follow_server_key`) and settling a rotation whose answer was lost:
/// a handshake with the current keys tells whether the server still holds
/// them (the rotation never took effect) or holds others (its signed hello
/// does not verify, or it refuses the confirmation), and then one with the
/// pending keys confirms they are the server's now. The file is
/// rewritten with the winning keys. Without a pending rotation this is
/// [`Identity::load`]; when the server cannot be reached the identity is
/// returned as it is, pending keys kept, for the next start to settle.
pub async fn load_identity(dir: &Path) -> Result<Identity, EdgeError> {
    let mut identity = Identity::load(dir)?;
    match follow_server_key(&mut identity, dir).await {
        Ok(_) => {}
        // The server cannot be reached now; the pin stays as it is.
        Err(err @ EdgeError::Network(_)) => {
            tracing::warn!(%err, "cannot check the server's key now");
        }
        Err(err) => return Err(err),
    }
    let Some(pending) = identity.pending_keys.take() else {
        return Ok(identity);
    };
    let transport = transport_for(&identity)?;
    match open_session(&identity, &transport).await {
        Ok(_) => {
            tracing::info!(
                "the unanswered key rotation did not take effect; keeping the current keys"
            );
            identity.replace(dir)?;
            Ok(identity)
        }
        Err(err) if holds_other_keys(&err) => {
            let previous = std::mem::replace(&mut identity.keys, pending);
            // The store's compare-and-set moves the version by exactly one.
            identity.key_version += 1;
            match open_session(&identity, &transport).await {
                Ok(_) => {
                    tracing::info!(
                        key_version = identity.key_version,
                        "the unanswered key rotation took effect; now using the new keys"
                    );
                    identity.replace(dir)?;
                    Ok(identity)
                }
                Err(second) => {
                    identity.pending_keys = Some(std::mem::replace(&mut identity.keys, previous));
                    identity.key_version -= 1;
                    Err(EdgeError::Identity(format!(
                        "the server accepts neither the current keys ({err}) nor those of the unanswered rotation ({second})"
                    )))
                }
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot settle the unanswered key rotation now; trying again at the next start");
            identity.pending_keys = Some(pending);
            Ok(identity)
        }
    }
}

//! Step 2: the session handshake — mutual authentication and forward secrecy.
//!
//! ```text
//! device (ClientStart)                                 server (ServerStart)
//!   (edk, epk) <- KEM.KeyGen                ClientHello
//!   n_c <- 32 random bytes          ─────────────────────▶  { id, suite, epk, n_c }
//!                                                            (ct_s, ss_s) <- Encaps(device KEM key)
//!                                                            (ct_e, ss_e) <- Encaps(epk)
//!                                          ServerHello       sid, n_s, expiry
//!  (AwaitServerHello)               ◀─────────────────────  σ_s = Sign_server(T_hello)
//!   Verify σ_s with the *pinned* server key
//!   ss_s <- Decaps(device key, ct_s); ss_e <- Decaps(edk, ct_e); drop edk
//!   T_confirm = H(T_hello, σ_s)
//!   keys = HKDF(salt = T_confirm, ikm = ss_s ‖ ss_e)
//!   σ_c = Sign_device(T_confirm)          ClientConfirm
//!   tag = HMAC(k_confirm, H(T_confirm, σ_c)) ──────────▶  verify σ_c with the registered key,
//!  (Established)                                           verify tag  (Established)
//! ```
//!
//! * Server authentication: σ_s under the key the device pinned at enrollment.
//! * Device authentication: σ_c under its registered key, and only the holder
//!   of the registered KEM key can compute `ss_s`, which the tag proves.
//! * Forward secrecy: `ss_e` comes from a key that exists only for this
//!   handshake. A later theft of the device's long-term KEM key reveals
//!   `ss_s` but not `ss_e`, so recorded sessions stay closed.
//! * The session id, both nonces, both ciphertexts, the expiry, the server's
//!   key and the device's registered KEM key are all in `T_hello`, so nothing
//!   can be swapped in transit; expiry is enforced by both sides.
//!
//! The states are types consumed by their transitions: there is no way to
//! reach the session keys of a handshake that did not verify.

use rand_core::CryptoRng;
use serde::{Deserialize, Serialize};

use crate::PROTOCOL_VERSION;
use crate::channel::{ClientChannel, ServerChannel, SessionSecrets};
use crate::crypto::{hkdf_sha256, hmac_sha256, hmac_sha256_verify};
use crate::error::{ProtocolError, Result};
use crate::identity::{DeviceId, SessionId};
use crate::kem::{KemKeyPair, KemPublicKey, KemSecretKey};
use crate::secret::SecretBytes;
use crate::sig::{SigningKey, VerifyingKey};
use crate::suite::KemSuite;
use crate::transcript::{Domain, TRANSCRIPT_HASH_LEN, Transcript, TranscriptHash};
use crate::wire::{b64, b64_array};

/// Bytes in each handshake nonce.
pub const NONCE_LEN: usize = 32;
/// The longest session a device will accept.
pub const MAX_SESSION_LIFETIME_SECS: u64 = 24 * 60 * 60;
/// How long a server keeps a half-open handshake waiting for its confirmation.
pub const HANDSHAKE_TIMEOUT_SECS: u64 = 60;

/// `POST /v1/sessions` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClientHello {
    /// Protocol version.
    pub version: u16,
    /// The enrolled device.
    pub device_id: DeviceId,
    /// Suite of the ephemeral key; must be the device's registered KEM suite.
    pub kem_suite: KemSuite,
    /// The ephemeral KEM public key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub ephemeral_public_key: Vec<u8>,
    /// The client's fresh nonce.
    #[serde(with = "b64_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub client_nonce: [u8; NONCE_LEN],
}

/// `POST /v1/sessions` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ServerHello {
    /// Protocol version.
    pub version: u16,
    /// The new session's id.
    pub session_id: SessionId,
    /// The server's fresh nonce.
    #[serde(with = "b64_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub server_nonce: [u8; NONCE_LEN],
    /// Encapsulation to the device's registered KEM key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub static_ciphertext: Vec<u8>,
    /// Encapsulation to the ephemeral key.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub ephemeral_ciphertext: Vec<u8>,
    /// Unix seconds after which the session is dead.
    pub expires_at: u64,
    /// The server's signature over the hello transcript.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub signature: Vec<u8>,
}

/// `POST /v1/sessions/{id}/confirm` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ClientConfirm {
    /// Protocol version.
    pub version: u16,
    /// The session being confirmed.
    pub session_id: SessionId,
    /// The device's signature over the confirm transcript.
    #[serde(with = "b64")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub signature: Vec<u8>,
    /// HMAC proving both sides derived the same keys.
    #[serde(with = "b64_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub key_confirmation: [u8; 32],
}

struct HelloFields<'a> {
    hello: &'a ClientHello,
    server_key: &'a VerifyingKey,
    device_kem_key: &'a KemPublicKey,
    session_id: &'a SessionId,
    server_nonce: &'a [u8; NONCE_LEN],
    static_ciphertext: &'a [u8],
    ephemeral_ciphertext: &'a [u8],
    expires_at: u64,
}

fn hello_transcript(f: &HelloFields<'_>) -> TranscriptHash {
    let mut t = Transcript::new(Domain::ServerHello);
    t.append("device_id", f.hello.device_id.as_bytes())
        .append("kem_suite", f.hello.kem_suite.as_str().as_bytes())
        .append("ephemeral_public_key", &f.hello.ephemeral_public_key)
        .append("client_nonce", &f.hello.client_nonce)
        .append(
            "server_signature_suite",
            f.server_key.suite().as_str().as_bytes(),
        )
        .append("server_key", f.server_key.as_bytes())
        .append("device_kem_key", f.device_kem_key.as_bytes())
        .append("session_id", f.session_id.as_bytes())
        .append("server_nonce", f.server_nonce)
        .append("static_ciphertext", f.static_ciphertext)
        .append("ephemeral_ciphertext", f.ephemeral_ciphertext)
        .append_u64("expires_at", f.expires_at);
    t.hash()
}

fn confirm_transcript(hello: &TranscriptHash, server_signature: &[u8]) -> TranscriptHash {
    let mut t = Transcript::new(Domain::ClientConfirm);
    t.append_hash("hello", hello)
        .append("server_signature", server_signature);
    t.hash()
}

fn key_confirmation_input(confirm: &TranscriptHash, device_signature: &[u8]) -> TranscriptHash {
    let mut t = Transcript::new(Domain::KeyConfirmation);
    t.append_hash("confirm", confirm)
        .append("device_signature", device_signature);
    t.hash()
}

/// Session keys and the key-confirmation key from both shared secrets.
fn derive(
    confirm: &TranscriptHash,
    static_secret: &SecretBytes,
    ephemeral_secret: &SecretBytes,
) -> Result<(SessionSecrets, SecretBytes)> {
    let mut ikm = zeroize::Zeroizing::new(Vec::with_capacity(
        2 + static_secret.len() + ephemeral_secret.len(),
    ));
    ikm.push(static_secret.len() as u8);
    ikm.extend_from_slice(static_secret.expose());
    ikm.push(ephemeral_secret.len() as u8);
    ikm.extend_from_slice(ephemeral_secret.expose());
    let [c2s_key, c2s_iv, s2c_key, s2c_iv, confirm_key] = hkdf_sha256(
        confirm.as_bytes(),
        &ikm,
        [
            (b"qflare v1 c2s key", 32),
            (b"qflare v1 c2s iv", 12),
            (b"qflare v1 s2c key", 32),
            (b"qflare v1 s2c iv", 12),
            (b"qflare v1 key confirmation", 32),
        ],
    )?;
    Ok((
        SessionSecrets {
            c2s_key,
            c2s_iv,
            s2c_key,
            s2c_iv,
        },
        confirm_key,
    ))
}

/// The device's long-term identity as the handshake needs it.
#[derive(Debug)]
pub struct ClientIdentity<'a> {
    /// The id the server assigned at enrollment.
    pub device_id: DeviceId,
    /// The device's registered KEM public key.
    pub kem_public_key: &'a KemPublicKey,
    /// The device's KEM secret key.
    pub kem_secret_key: &'a KemSecretKey,
    /// The device's signing key.
    pub signing_key: &'a SigningKey,
}

/// An established session: what both sides hold once the handshake verified.
#[derive(Debug)]
pub struct Established {
    /// The session's id.
    pub session_id: SessionId,
    /// The authenticated device.
    pub device_id: DeviceId,
    /// Unix seconds after which the session is dead.
    pub expires_at: u64,
    secrets: SessionSecrets,
}

impl Established {
    /// The device's end of the channel.
    pub fn into_client_channel(self) -> Result<ClientChannel> {
        ClientChannel::new(self.session_id, self.expires_at, &self.secrets)
    }

    /// The server's end of the channel.
    pub fn server_channel(&self) -> Result<ServerChannel> {
        ServerChannel::new(self.session_id, self.expires_at, &self.secrets)
    }

    /// The traffic secrets, for the server to keep (wrapped) in its session store.
    pub fn secrets(&self) -> &SessionSecrets {
        &self.secrets
    }
}

// ---------------------------------------------------------------- client

/// Client state 1: nothing sent yet.
#[derive(Debug)]
pub struct ClientStart<'a> {
    identity: ClientIdentity<'a>,
    server_key: &'a VerifyingKey,
}

/// Client state 2: hello sent, waiting for the server's answer.
#[derive(Debug)]
pub struct AwaitServerHello<'a> {
    identity: ClientIdentity<'a>,
    server_key: &'a VerifyingKey,
    ephemeral: KemSecretKey,
    hello: ClientHello,
}

impl<'a> ClientStart<'a> {
    /// Starts a handshake toward the server whose key the device pinned.
    pub fn new(identity: ClientIdentity<'a>, pinned_server_key: &'a VerifyingKey) -> Self {
        Self {
            identity,
            server_key: pinned_server_key,
        }
    }

    /// Generates the ephemeral key and nonce and produces the hello.
    pub fn hello<R: CryptoRng + ?Sized>(
        self,
        rng: &mut R,
    ) -> Result<(AwaitServerHello<'a>, ClientHello)> {
        let suite = self.identity.kem_public_key.suite();
        let ephemeral = KemKeyPair::generate(suite, rng)?;
        let mut client_nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut client_nonce);
        let hello = ClientHello {
            version: PROTOCOL_VERSION,
            device_id: self.identity.device_id,
            kem_suite: suite,
            ephemeral_public_key: ephemeral.public.as_bytes().to_vec(),
            client_nonce,
        };
        Ok((
            AwaitServerHello {
                identity: self.identity,
                server_key: self.server_key,
                ephemeral: ephemeral.secret,
                hello: hello.clone(),
            },
            hello,
        ))
    }
}

impl AwaitServerHello<'_> {
    /// Verifies the server's hello against the pinned key and the clock,
    /// derives the session, and produces the confirmation to send.
    pub fn finish(
        self,
        server_hello: &ServerHello,
        now: u64,
    ) -> Result<(Established, ClientConfirm)> {
        if server_hello.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(server_hello.version));
        }
        if server_hello.expires_at <= now {
            return Err(ProtocolError::Expired {
                expires_at: server_hello.expires_at,
                now,
            });
        }
        if server_hello.expires_at - now > MAX_SESSION_LIFETIME_SECS {
            return Err(ProtocolError::malformed(
                "server hello",
                "session lifetime over 24 hours",
            ));
        }
        let hello_hash = hello_transcript(&HelloFields {
            hello: &self.hello,
            server_key: self.server_key,
            device_kem_key: self.identity.kem_public_key,
            session_id: &server_hello.session_id,
            server_nonce: &server_hello.server_nonce,
            static_ciphertext: &server_hello.static_ciphertext,
            ephemeral_ciphertext: &server_hello.ephemeral_ciphertext,
            expires_at: server_hello.expires_at,
        });
        self.server_key.verify(
            hello_hash.as_bytes(),
            &server_hello.signature,
            "server hello",
        )?;
        let static_secret = self
            .identity
            .kem_secret_key
            .decapsulate(&server_hello.static_ciphertext)?;
        let ephemeral_secret = self
            .ephemeral
            .decapsulate(&server_hello.ephemeral_ciphertext)?;
        drop(self.ephemeral);

        let confirm_hash = confirm_transcript(&hello_hash, &server_hello.signature);
        let (secrets, confirm_key) = derive(&confirm_hash, &static_secret, &ephemeral_secret)?;
        let signature = self.identity.signing_key.sign(confirm_hash.as_bytes())?;
        let key_confirmation = hmac_sha256(
            confirm_key.expose(),
            key_confirmation_input(&confirm_hash, &signature).as_bytes(),
        );
        Ok((
            Established {
                session_id: server_hello.session_id,
                device_id: self.identity.device_id,
                expires_at: server_hello.expires_at,
                secrets,
            },
            ClientConfirm {
                version: PROTOCOL_VERSION,
                session_id: server_hello.session_id,
                signature,
                key_confirmation,
            },
        ))
    }
}

// ---------------------------------------------------------------- server

/// Server state 1: a hello has arrived.
#[derive(Debug)]
pub struct ServerStart<'a> {
    signing_key: &'a SigningKey,
}

/// Server state 2: hello answered, waiting for the device's confirmation.
///
/// Servers behind a load balancer keep this between two HTTP requests, so it
/// can be exported to bytes (secret: wrap before storing) and imported again.
#[derive(Debug)]
pub struct AwaitClientConfirm {
    session_id: SessionId,
    device_id: DeviceId,
    expires_at: u64,
    confirm_deadline: u64,
    confirm_hash: TranscriptHash,
    secrets: SessionSecrets,
    confirm_key: SecretBytes,
}

impl<'a> ServerStart<'a> {
    /// Starts the server side with the server's long-term signing key.
    pub fn new(signing_key: &'a SigningKey) -> Self {
        Self { signing_key }
    }

    /// Answers a hello from a device whose registered KEM key is `device_kem_key`.
    /// `now` and `lifetime_secs` set the expiry the server signs.
    pub fn respond<R: CryptoRng + ?Sized>(
        self,
        hello: &ClientHello,
        device_kem_key: &KemPublicKey,
        now: u64,
        lifetime_secs: u64,
        rng: &mut R,
    ) -> Result<(AwaitClientConfirm, ServerHello)> {
        if hello.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(hello.version));
        }
        if hello.kem_suite != device_kem_key.suite() {
            return Err(ProtocolError::SuiteMismatch {
                expected: device_kem_key.suite().as_str(),
                actual: hello.kem_suite.as_str(),
            });
        }
        if lifetime_secs == 0 || lifetime_secs > MAX_SESSION_LIFETIME_SECS {
            return Err(ProtocolError::malformed(
                "session lifetime",
                "must be 1 s to 24 h",
            ));
        }
        let ephemeral_key =
            KemPublicKey::from_bytes(hello.kem_suite, hello.ephemeral_public_key.clone())?;
        let (static_ciphertext, static_secret) = device_kem_key.encapsulate(rng)?;
        let (ephemeral_ciphertext, ephemeral_secret) = ephemeral_key.encapsulate(rng)?;
        let session_id = SessionId::random(rng);
        let mut server_nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut server_nonce);
        let expires_at = now.saturating_add(lifetime_secs);

        let hello_hash = hello_transcript(&HelloFields {
            hello,
            server_key: self.signing_key.verifying_key(),
            device_kem_key,
            session_id: &session_id,
            server_nonce: &server_nonce,
            static_ciphertext: &static_ciphertext,
            ephemeral_ciphertext: &ephemeral_ciphertext,
            expires_at,
        });
        let signature = self.signing_key.sign(hello_hash.as_bytes())?;
        let confirm_hash = confirm_transcript(&hello_hash, &signature);
        let (secrets, confirm_key) = derive(&confirm_hash, &static_secret, &ephemeral_secret)?;
        Ok((
            AwaitClientConfirm {
                session_id,
                device_id: hello.device_id,
                expires_at,
                confirm_deadline: now.saturating_add(HANDSHAKE_TIMEOUT_SECS).min(expires_at),
                confirm_hash,
                secrets,
                confirm_key,
            },
            ServerHello {
                version: PROTOCOL_VERSION,
                session_id,
                server_nonce,
                static_ciphertext,
                ephemeral_ciphertext,
                expires_at,
                signature,
            },
        ))
    }
}

const PENDING_EXPORT_LEN: usize =
    16 + 16 + 8 + 8 + TRANSCRIPT_HASH_LEN + SessionSecrets::EXPORT_LEN + 32;

impl AwaitClientConfirm {
    /// The session being set up.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The device that asked for it.
    pub fn device_id(&self) -> DeviceId {
        self.device_id
    }

    /// When the session will expire once confirmed.
    pub fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// When the confirmation must have arrived.
    pub fn confirm_deadline(&self) -> u64 {
        self.confirm_deadline
    }

    /// Verifies the device's confirmation with its registered verifying key.
    pub fn confirm(
        self,
        confirm: &ClientConfirm,
        device_key: &VerifyingKey,
        now: u64,
    ) -> Result<Established> {
        if confirm.version != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(confirm.version));
        }
        if confirm.session_id != self.session_id {
            return Err(ProtocolError::Mismatch("session id"));
        }
        if now >= self.confirm_deadline {
            return Err(ProtocolError::Expired {
                expires_at: self.confirm_deadline,
                now,
            });
        }
        device_key.verify(
            self.confirm_hash.as_bytes(),
            &confirm.signature,
            "client confirmation",
        )?;
        let mac_input = key_confirmation_input(&self.confirm_hash, &confirm.signature);
        if !hmac_sha256_verify(
            self.confirm_key.expose(),
            mac_input.as_bytes(),
            &confirm.key_confirmation,
        ) {
            return Err(ProtocolError::KeyConfirmation);
        }
        Ok(Established {
            session_id: self.session_id,
            device_id: self.device_id,
            expires_at: self.expires_at,
            secrets: self.secrets,
        })
    }

    /// Serializes the state. The result is secret: wrap it before it leaves memory.
    pub fn export(&self) -> SecretBytes {
        let mut out = zeroize::Zeroizing::new(Vec::with_capacity(PENDING_EXPORT_LEN));
        out.extend_from_slice(self.session_id.as_bytes());
        out.extend_from_slice(self.device_id.as_bytes());
        out.extend_from_slice(&self.expires_at.to_be_bytes());
        out.extend_from_slice(&self.confirm_deadline.to_be_bytes());
        out.extend_from_slice(self.confirm_hash.as_bytes());
        self.secrets.export_into(&mut out);
        out.extend_from_slice(self.confirm_key.expose());
        SecretBytes::from(out)
    }

    /// Restores a state produced by [`AwaitClientConfirm::export`].
    pub fn import(bytes: &[u8]) -> Result<Self> {
        if bytes.len() != PENDING_EXPORT_LEN {
            return Err(ProtocolError::InvalidLength {
                what: "pending session",
                expected: PENDING_EXPORT_LEN,
                actual: bytes.len(),
            });
        }
        let mut reader = crate::channel::Reader::new(bytes);
        let session_id = SessionId::from_bytes(reader.array()?);
        let device_id = DeviceId::from_bytes(reader.array()?);
        let expires_at = u64::from_be_bytes(reader.array()?);
        let confirm_deadline = u64::from_be_bytes(reader.array()?);
        let confirm_hash = TranscriptHash(reader.array()?);
        let secrets = SessionSecrets::import_from(&mut reader)?;
        let confirm_key = SecretBytes::from_slice(reader.take(32)?);
        Ok(Self {
            session_id,
            device_id,
            expires_at,
            confirm_deadline,
            confirm_hash,
            secrets,
            confirm_key,
        })
    }
}

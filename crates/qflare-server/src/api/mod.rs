//! Route handlers and the JSON types of the admin and device APIs.
//!
//! * [`public`]: health, server info, enrollment and the session handshake —
//!   plain JSON over HTTPS, rate limited per client address.
//! * [`device`]: routes inside a sealed session ([`crate::sealed`]).
//! * [`admin`]: tokens, devices and the audit ledger, behind the admin bearer token.
//! * [`federation`]: rounds and models for devices (sealed) and the admin.
//! * [`models`]: the admin's model registration and export.
//! * [`replica`]: the coordinator's internal routes, for the other replicas.

pub mod admin;
pub mod device;
pub mod federation;
pub mod models;
pub mod public;
pub mod replica;

use serde::{Deserialize, Serialize};

/// `GET /healthz` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Always `ok`: an unhealthy server answers with an error instead.
    pub status: String,
    /// The store backend (`sqlite` or `postgres`).
    pub store: String,
    /// The rate-limit backend (`memory` or `redis`).
    pub rate_limits: String,
}

/// `POST /v1/admin/tokens` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// Who or what the token is for (1 to 64 printable characters).
    pub label: String,
    /// Validity in seconds; the configured default when absent.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/admin/tokens` answer. The token is shown once and never stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatedToken {
    /// The token's id (for listing and revoking).
    pub id: String,
    /// The token itself.
    pub token: String,
    /// Its label.
    pub label: String,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
}

/// A token as the admin API lists it (never the token or its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenView {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// `active`, `used`, `expired` or `revoked`.
    pub status: String,
    /// Created, Unix seconds.
    pub created_at: i64,
    /// Expires, Unix seconds.
    pub expires_at: i64,
    /// When an enrollment consumed it.
    pub used_at: Option<i64>,
    /// The device that consumed it.
    pub used_by: Option<String>,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
}

/// A device as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `active` or `revoked`.
    pub status: String,
    /// Its KEM suite.
    pub kem_suite: String,
    /// Its signature suite.
    pub signature_suite: String,
    /// Enrolled, Unix seconds.
    pub enrolled_at: i64,
    /// Last authenticated request.
    pub last_seen_at: Option<i64>,
    /// Revoked, Unix seconds.
    pub revoked_at: Option<i64>,
    /// 1 at enrollment, +1 per key rotation.
    pub key_version: u32,
}

/// The answer to a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revoked {
    /// False when it was unknown or already revoked (or, for tokens, used).
    pub revoked: bool,
}

/// An audit entry as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditView {
    /// Position in the chain.
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// Event kind.
    pub kind: String,
    /// Who acted.
    pub actor: String,
    /// What it concerned.
    pub subject: String,
    /// Event details.
    pub detail: serde_json::Value,
    /// This entry's chain hash.
    pub hash: String,
}

/// `POST /v1/sessions/{id}/confirm` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionEstablished {
    /// The session.
    pub session_id: String,
    /// Unix seconds after which it is dead.
    pub expires_at: u64,
}

/// `POST /v1/session/ping` answer (sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Pong {
    /// The authenticated device.
    pub device_id: String,
    /// The session.
    pub session_id: String,
    /// The server's clock.
    pub server_time: u64,
    /// The request's sequence number.
    pub seq: u64,
}

/// `POST /v1/devices/self/rotate-keys` answer (sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeysRotated {
    /// The device's new key version.
    pub key_version: u32,
}

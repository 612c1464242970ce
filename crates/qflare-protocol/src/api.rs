//! The HTTP surface server and device agree on: every route path, the
//! sealed-session header and content type, and every error code with its
//! HTTP status and fixed message.
//!
//! One definition, because a route path is bound into each sealed record's
//! associated data (see [`crate::channel`]): a path typed differently on the
//! two sides is an authentication failure, not a 404. The server's router,
//! the edge client, the admin CLI and the tests all take paths from
//! [`routes`], and error codes from [`ErrorCode`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Header naming the session of a sealed request.
pub const SESSION_HEADER: &str = "x-qflare-session";
/// Content type of sealed request and response bodies.
pub const SEALED_CONTENT_TYPE: &str = "application/vnd.qflare.sealed";

/// Route paths. Templates with `{id}` are axum path templates; the
/// functions beside them fill them in.
pub mod routes {
    /// `GET`: liveness and backends (plain).
    pub const HEALTHZ: &str = "/healthz";
    /// `GET`: the server's suites and ML-DSA key (plain).
    pub const SERVER_INFO: &str = "/v1/server-info";
    /// `POST`: enrollment with a single-use token (plain, pinned TLS).
    pub const ENROLL: &str = "/v1/enroll";
    /// `POST`: the client hello of a session handshake.
    pub const SESSIONS: &str = "/v1/sessions";
    /// `POST`: the client's confirmation that completes a handshake.
    pub const SESSION_CONFIRM: &str = "/v1/sessions/{id}/confirm";
    /// `POST` (sealed): a round trip through the channel.
    pub const SESSION_PING: &str = "/v1/session/ping";
    /// `POST` (sealed): replace the device's keys.
    pub const ROTATE_KEYS: &str = "/v1/devices/self/rotate-keys";
    /// `POST` (sealed): the open round, as this device sees it.
    pub const CURRENT_ROUND: &str = "/v1/rounds/current";
    /// `POST` (sealed): the certified global model.
    pub const CURRENT_MODEL: &str = "/v1/models/current";
    /// `POST` (sealed): a signed update sealed to the enclave.
    pub const UPDATES: &str = "/v1/updates";
    /// `POST` (sealed): admission of an update before its body is sent.
    pub const UPDATE_ADMISSION: &str = "/v1/updates/admission";
    /// `POST` (sealed): the device's evaluation of the round's global model.
    pub const EVALUATIONS: &str = "/v1/evaluations";

    /// `POST` creates, `GET` lists enrollment tokens (admin).
    pub const ADMIN_TOKENS: &str = "/v1/admin/tokens";
    /// `POST`: revoke an unused token (admin).
    pub const ADMIN_TOKEN_REVOKE: &str = "/v1/admin/tokens/{id}/revoke";
    /// `GET`: enrolled devices (admin).
    pub const ADMIN_DEVICES: &str = "/v1/admin/devices";
    /// `POST`: revoke a device (admin).
    pub const ADMIN_DEVICE_REVOKE: &str = "/v1/admin/devices/{id}/revoke";
    /// `GET`: audit ledger entries (admin).
    pub const ADMIN_AUDIT: &str = "/v1/admin/audit";
    /// `GET`: rounds, models and the enclave (admin).
    pub const ADMIN_ROUNDS: &str = "/v1/admin/rounds";
    /// `POST`: start or resume training (admin).
    pub const ADMIN_ROUNDS_START: &str = "/v1/admin/rounds/start";
    /// `POST`: stop opening rounds (admin).
    pub const ADMIN_ROUNDS_PAUSE: &str = "/v1/admin/rounds/pause";
    /// `POST`: register the initial model from a safetensors body (admin).
    pub const ADMIN_MODELS: &str = "/v1/admin/models";
    /// `GET`: a model version's safetensors bytes (`{version}` or `latest`; admin).
    pub const ADMIN_MODEL: &str = "/v1/admin/models/{version}";
    /// `GET`: a model version's enclave certificate (admin).
    pub const ADMIN_MODEL_CERTIFICATE: &str = "/v1/admin/models/{version}/certificate";

    /// `GET`: the dashboard page (admin, HTTP Basic).
    pub const PAGE_DASHBOARD: &str = "/";
    /// `GET`: the devices page (admin, HTTP Basic).
    pub const PAGE_DEVICES: &str = "/devices";
    /// `GET`: the audit page (admin, HTTP Basic).
    pub const PAGE_AUDIT: &str = "/audit";
    /// `GET`: the pages' stylesheet.
    pub const STYLESHEET: &str = "/static/qflare.css";
    /// `GET`: this API's OpenAPI 3.1 document (plain).
    pub const OPENAPI: &str = "/openapi.json";

    /// [`SESSION_CONFIRM`] for session `id` (hex).
    pub fn session_confirm(id: &str) -> String {
        SESSION_CONFIRM.replace("{id}", id)
    }

    /// [`ADMIN_TOKEN_REVOKE`] for token `id`.
    pub fn admin_token_revoke(id: &str) -> String {
        ADMIN_TOKEN_REVOKE.replace("{id}", id)
    }

    /// [`ADMIN_MODEL`] for `version` (a number or `latest`).
    pub fn admin_model(version: &str) -> String {
        ADMIN_MODEL.replace("{version}", version)
    }

    /// [`ADMIN_MODEL_CERTIFICATE`] for `version` (a number or `latest`).
    pub fn admin_model_certificate(version: &str) -> String {
        ADMIN_MODEL_CERTIFICATE.replace("{version}", version)
    }

    /// [`ADMIN_DEVICE_REVOKE`] for device `id`.
    pub fn admin_device_revoke(id: &str) -> String {
        ADMIN_DEVICE_REVOKE.replace("{id}", id)
    }
}

/// The JSON body of every HTTP error QFLARE answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// A fixed human-readable sentence; never echoes the request.
    pub message: String,
    /// What exactly was wrong, only on admin routes whose caller needs it
    /// to fix their input (e.g. which tensor of a model file is refused);
    /// device routes never carry it, so errors are not an oracle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Declares [`ErrorCode`] and its table in one place, one row per code, so
/// a code cannot have a wire string without a status and a message.
macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = ($wire:literal, $status:literal, $message:literal), )*) => {
        /// A stable, machine-readable error code: what a client branches on.
        ///
        /// The wire string, HTTP status and message of each code are fixed
        /// here; the server adds nothing to an error's body but these.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
            /// A code this build does not know (from a newer server). Never sent.
            Unknown,
        }

        impl ErrorCode {
            /// Every code the server sends, in declaration order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),*];

            /// The code as it travels (`snake_case`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $wire, )*
                    ErrorCode::Unknown => "unknown",
                }
            }

            /// The HTTP status the server answers this code with.
            pub const fn status(self) -> u16 {
                match self {
                    $( ErrorCode::$variant => $status, )*
                    ErrorCode::Unknown => 500,
                }
            }

            /// The fixed, safe sentence sent with this code.
            pub const fn message(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $message, )*
                    ErrorCode::Unknown => "unknown error",
                }
            }

            /// The code for a wire string; [`ErrorCode::Unknown`] for one this
            /// build does not know.
            pub fn from_wire(text: &str) -> Self {
                match text {
                    $( $wire => ErrorCode::$variant, )*
                    _ => ErrorCode::Unknown,
                }
            }
        }
    };
}

error_codes! {
    // Decoding and limits.
    /// The body could not be decoded.
    MalformedRequest = ("malformed_request", 400, "the request could not be decoded"),
    /// The body is over the route's limit.
    PayloadTooLarge = ("payload_too_large", 413, "the request body is too large"),
    /// A KEM or signature suite the server does not offer.
    UnsupportedSuite = ("unsupported_suite", 400, "the requested suite is not offered"),
    /// A protocol version the server does not speak.
    UnsupportedVersion = ("unsupported_version", 400, "unsupported protocol version"),
    // Authentication and sessions. Which check failed stays in the server's
    // log: telling a bad signature from a bad tag would help an attacker probe.
    /// A signature, tag, key confirmation or pin check failed.
    AuthenticationFailed = ("authentication_failed", 401, "authentication failed"),
    /// The session (or a report) is past its expiry.
    Expired = ("expired", 401, "expired"),
    /// A sequence number that is not above the last one accepted.
    Replayed = ("replayed", 409, "replayed or out-of-order message"),
    /// The session has used every sequence number.
    SessionExhausted = ("session_exhausted", 401, "session exhausted; open a new one"),
    /// An attestation report was refused by policy.
    AttestationRefused = ("attestation_refused", 403, "attestation refused"),
    /// The enrollment token is not usable.
    InvalidToken = ("invalid_token", 401, "the enrollment token is invalid, expired, revoked or already used"),
    /// The device has been revoked.
    DeviceRevoked = ("device_revoked", 403, "this device has been revoked"),
    // Admin.
    /// No or a wrong admin token.
    Unauthorized = ("unauthorized", 401, "admin authentication failed"),
    /// A token label that is empty, too long or not printable.
    InvalidLabel = ("invalid_label", 400, "labels are 1 to 64 printable characters"),
    /// A token lifetime of zero or over the configured maximum.
    InvalidTtl = ("invalid_ttl", 400, "the token lifetime is zero or longer than the configured maximum"),
    /// A model file that cannot be federated (`detail` says why).
    InvalidModel = ("invalid_model", 400, "the model file was refused"),
    /// A model is registered already, or the server's configuration creates its own.
    ModelExists = ("model_exists", 409, "the federation's model is already fixed"),
    // Generic HTTP.
    /// No such route or resource.
    NotFound = ("not_found", 404, "not found"),
    /// The route exists, not with this method.
    MethodNotAllowed = ("method_not_allowed", 405, "method not allowed"),
    /// The request conflicts with stored state.
    Conflict = ("conflict", 409, "conflicts with existing state"),
    /// Over a rate limit; `Retry-After` says when to come back.
    RateLimited = ("rate_limited", 429, "too many requests; retry later"),
    /// The request took longer than the server's request timeout.
    Timeout = ("timeout", 503, "the request took too long"),
    /// A backing service (database, Redis) is unavailable.
    Unavailable = ("unavailable", 503, "a backing service is unavailable; retry later"),
    /// The server is at a capacity limit (memory for uploads); `Retry-After` says when to come back.
    Busy = ("busy", 503, "the server is at capacity; retry later"),
    /// A server fault; the detail is in the server's log.
    InternalError = ("internal_error", 500, "internal error"),
    // Federation.
    /// The server does not coordinate training.
    FederationDisabled = ("federation_disabled", 503, "this server does not coordinate federated training"),
    /// The enclave restarted: re-attest and seal again.
    EnclaveRestarting = ("enclave_restarting", 503, "the enclave restarted; fetch a fresh attestation and retry"),
    /// An envelope sent by another device than its own.
    DeviceMismatch = ("device_mismatch", 403, "an envelope may only be sent by its own device"),
    /// The device is not selected for the round.
    NotSelected = ("not_selected", 403, "this device is not selected for the round"),
    /// The device has already submitted to the round.
    Duplicate = ("duplicate", 409, "this device has already submitted to the round"),
    /// The round's deadline has passed.
    DeadlinePassed = ("deadline_passed", 409, "the round's deadline has passed"),
    /// The round is no longer open.
    RoundClosed = ("round_closed", 409, "the round is no longer open"),
    /// The server does not know the round.
    UnknownRound = ("unknown_round", 404, "no such round"),
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self::from_wire(text))
    }
}

impl From<&str> for ErrorCode {
    fn from(text: &str) -> Self {
        Self::from_wire(text)
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Borrowed where the input allows it, owned otherwise: a code is
        // only ever compared, so either works.
        let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        Ok(Self::from_wire(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_is_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for &code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert_eq!(ErrorCode::from_wire(code.as_str()), code);
            let json = serde_json::to_string(&code).expect("serializes");
            assert_eq!(json, format!("\"{code}\""));
            let back: ErrorCode = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, code);
            assert!((400..600).contains(&code.status()), "{code}");
            assert!(!code.message().is_empty());
        }
    }

    #[test]
    fn an_unknown_code_parses_as_unknown() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"code":"from_the_future","message":"m"}"#).expect("parses");
        assert_eq!(body.code, ErrorCode::Unknown);
    }

    #[test]
    fn route_templates_fill_in() {
        assert_eq!(routes::session_confirm("ab"), "/v1/sessions/ab/confirm");
        assert_eq!(
            routes::admin_token_revoke("t1"),
            "/v1/admin/tokens/t1/revoke"
        );
        assert_eq!(
            routes::admin_device_revoke("d1"),
            "/v1/admin/devices/d1/revoke"
        );
    }
}

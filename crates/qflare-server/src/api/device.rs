//! Routes inside a sealed session. Each takes a [`SealedRequest`], so the
//! body it reads has already been authenticated and claimed exactly once.

use axum::extract::State;
use axum::response::Response;
use qflare_protocol::api::routes;
use qflare_protocol::rotation::{self, KeyRotationRequest};
use qflare_store::DeviceKeys as StoredKeys;
use serde_json::json;

use super::{KeysRotated, Pong};
use crate::app::SharedState;
use crate::devices::registered_keys;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::ledger::AuditKind;
use crate::openapi::SealedRecord;
use crate::sealed::SealedRequest;

/// `POST /v1/session/ping`: proves the channel works both ways.
#[utoipa::path(
    post, path = routes::SESSION_PING, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed empty JSON object."),
    responses((status = 200, description = "A sealed `Pong`.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn ping(State(state): State<SharedState>, request: SealedRequest) -> Response {
    request.respond(Ok(Pong {
        device_id: request.device_id.to_hex(),
        session_id: request.session_id.to_hex(),
        server_time: state.now(),
        seq: request.seq,
    }))
}

/// `POST /v1/devices/self/rotate-keys`: replace the device's keys. Signed by
/// the old key and the new one; ends every session of the device in the same
/// transaction, so the next one is established with the new keys (this answer
/// is still sealed with the session it came in on).
#[utoipa::path(
    post, path = routes::ROTATE_KEYS, tag = "device",
    request_body(content = SealedRecord, content_type = "application/vnd.qflare.sealed", description = "A sealed `RotationRequest`: the new public keys, signed by old and new keys."),
    responses((status = 200, description = "A sealed `KeysRotated`.", content_type = "application/vnd.qflare.sealed", body = SealedRecord)),
)]
pub async fn rotate_keys(State(state): State<SharedState>, request: SealedRequest) -> Response {
    let result = rotate(&state, &request).await;
    request.respond(result)
}

async fn rotate(state: &SharedState, request: &SealedRequest) -> ApiResult<KeysRotated> {
    let body: KeyRotationRequest =
        request.json("key rotation", state.config.limits.sealed_bytes)?;
    let (_, old_key) = registered_keys(&request.device).map_err(ApiError::internal)?;
    let verified = rotation::verify_request(&body, &request.device_id, &old_key, state.now())?;
    if !state
        .config
        .crypto
        .kem_suites
        .contains(&verified.kem_public_key.suite())
        || !state
            .config
            .crypto
            .signature_suites
            .contains(&verified.verifying_key.suite())
    {
        return Err(ApiError::new(ErrorCode::UnsupportedSuite));
    }
    let keys = StoredKeys {
        kem_suite: verified.kem_public_key.suite().as_str().to_owned(),
        kem_public_key: verified.kem_public_key.as_bytes().to_vec(),
        signature_suite: verified.verifying_key.suite().as_str().to_owned(),
        verifying_key: verified.verifying_key.as_bytes().to_vec(),
    };
    // Conditioned on the key version this session was admitted under: two
    // rotations signed by the same old key cannot both win.
    if !state
        .store
        .rotate_device_keys(
            &request.device.id,
            request.device.key_version,
            &keys,
            state.now_i64(),
        )
        .await?
    {
        let revoked = state
            .store
            .get_device(&request.device.id)
            .await?
            .is_none_or(|device| device.revoked_at.is_some());
        return Err(if revoked {
            ApiError::new(ErrorCode::DeviceRevoked)
        } else {
            ApiError::new(ErrorCode::Conflict).detail("the keys were rotated by another request")
        });
    }
    let key_version = request.device.key_version + 1;
    state
        .audit(
            AuditKind::KeyRotated,
            &format!("device:{}", request.device.id),
            &request.device.id,
            json!({
                "key_version": key_version,
                "kem_suite": keys.kem_suite,
                "signature_suite": keys.signature_suite,
            }),
        )
        .await;
    Ok(KeysRotated { key_version })
}

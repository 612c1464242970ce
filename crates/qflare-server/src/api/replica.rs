//! The coordinator's internal routes, which the other replicas call on a
//! device's behalf ([`crate::coordination::link`]): only the replica that
//! holds the enclave can attest it, certify the current model or judge an
//! update. Behind the replicas' bearer key (`routes::require_replica`); not in the OpenAPI document,
//! since no device or admin calls them.
//!
//! A replica that does not (or no longer) coordinate answers
//! `503 enclave_restarting`, which the calling replica passes on to the
//! device, which waits and re-attests.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use bytes::Bytes;
use qflare_protocol::envelope;
use qflare_protocol::federation::SubmitReceipt;
use qflare_protocol::identity::DeviceId;
use qflare_protocol::wire::limits;

use super::federation::{deliver, federation};
use crate::app::SharedState;
use crate::coordination::link::{AttestRequest, CertifiedModel, DEVICE_HEADER, EnclaveReport};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::federation::{Federation, FederationError};

/// This replica's controller, if it coordinates.
fn coordinating(state: &SharedState) -> ApiResult<Arc<Federation>> {
    federation(state)?.local().ok_or_else(|| {
        ApiError::new(ErrorCode::EnclaveRestarting)
            .detail("asked to coordinate, but this replica does not hold the lease")
            .retry_after(2)
    })
}

/// `POST /internal/v1/attest`.
pub async fn attest(
    State(state): State<SharedState>,
    Json(request): Json<AttestRequest>,
) -> ApiResult<Json<EnclaveReport>> {
    let fed = coordinating(&state)?;
    let report = match request.nonce {
        Some(hex_nonce) => {
            let mut nonce = [0u8; 32];
            hex::decode_to_slice(&hex_nonce, &mut nonce)
                .map_err(|_| ApiError::malformed("a nonce is 32 bytes of hex"))?;
            Some(fed.attest(nonce).await?)
        }
        None => fed.enclave().info().await.map(|info| info.report),
    };
    Ok(Json(EnclaveReport {
        generation: fed.enclave().generation(),
        report,
    }))
}

/// `POST /internal/v1/model`.
pub async fn model(State(state): State<SharedState>) -> ApiResult<Json<CertifiedModel>> {
    let fed = coordinating(&state)?;
    let enclave = fed
        .enclave()
        .ensure_running()
        .await
        .map_err(FederationError::from)?;
    let model = fed.current_model(&enclave).await?;
    Ok(Json(CertifiedModel {
        version: model.version,
        certificate: model.certificate,
        enclave_key_sha256: hex::encode(model.enclave_key_sha256),
    }))
}

/// `POST /internal/v1/updates`: the body is the envelope as the device
/// sent it; the forwarding replica checked its signature against the
/// device of the session it arrived in, named in [`DEVICE_HEADER`].
pub async fn update(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<SubmitReceipt>> {
    let fed = coordinating(&state)?;
    let device_id = headers
        .get(DEVICE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| DeviceId::parse(v).ok())
        .ok_or_else(|| ApiError::malformed("no device named"))?;
    let envelope = envelope::decode(&body, limits::UPDATE_ENVELOPE)?;
    if envelope.device_id != device_id {
        return Err(ApiError::new(ErrorCode::DeviceMismatch));
    }
    let round_id = envelope.round_id;
    drop(envelope);
    let receipt = deliver(&state, &fed, round_id, device_id, Vec::from(body)).await?;
    Ok(Json(receipt))
}

//! Unauthenticated routes: health, server info, enrollment, the handshake.

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use qflare_protocol::PROTOCOL_VERSION;
use qflare_protocol::api::routes;
use qflare_protocol::enrollment::{self, EnrollRequest, EnrollResponse, ServerInfo};
use qflare_protocol::handshake::{
    AwaitClientConfirm, ClientConfirm, ClientHello, ServerHello, ServerStart,
};
use qflare_protocol::identity::{DeviceId, SessionId};
use qflare_protocol::wire::limits;
use qflare_store::{
    DeviceKeys as StoredKeys, DeviceRecord, NewDevice, SessionRecord, SessionState, StoreError,
};
use serde_json::json;

use super::{Health, SessionEstablished};
use crate::app::{ClientAddr, SharedState};
use crate::body::read_json;
use crate::devices::registered_keys;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::ledger::AuditKind;
use crate::metrics::Metrics;
use crate::sealed::{established_context, pending_context};

/// `GET /healthz`: the process is up and its store answers.
#[utoipa::path(
    get, path = routes::HEALTHZ, tag = "public",
    responses((status = 200, description = "The process is up and its store answers.", body = Health)),
)]
pub async fn healthz(State(state): State<SharedState>) -> ApiResult<impl IntoResponse> {
    state.store.latest_round().await?;
    Ok(Json(Health {
        status: "ok".to_owned(),
        store: state.store.backend().to_owned(),
        rate_limits: state.limiter.backend().to_owned(),
    }))
}

/// `GET /v1/server-info`.
#[utoipa::path(
    get, path = routes::SERVER_INFO, tag = "public",
    responses((status = 200, description = "Suites and the server's ML-DSA key; a device pins its fingerprint.", body = ServerInfo)),
)]
pub async fn server_info(State(state): State<SharedState>) -> Json<ServerInfo> {
    let key = state.identity.signing_key.verifying_key();
    Json(ServerInfo {
        version: PROTOCOL_VERSION,
        fingerprint: state.identity.fingerprint.to_string(),
        signature_suite: key.suite(),
        verifying_key: key.as_bytes().to_vec(),
        kem_suites: state.config.crypto.kem_suites.clone(),
        default_kem_suite: state.config.crypto.default_kem_suite,
        signature_suites: state.config.crypto.signature_suites.clone(),
        key_handovers: state.identity.key_handovers.clone(),
    })
}

/// `POST /v1/enroll`: verify the proof of possession, consume the token
/// atomically, store the public keys, answer signed.
#[utoipa::path(
    post, path = routes::ENROLL, tag = "public",
    request_body = EnrollRequest,
    responses((status = 201, description = "Enrolled; the answer is signed by the server.", body = EnrollResponse)),
)]
pub async fn enroll(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let limit = state.config.limits.enroll_bytes.min(limits::ENROLL_REQUEST);
    let request: EnrollRequest = read_json("enroll request", &headers, body, limit).await?;
    let verified = enrollment::verify_request(
        &request,
        &state.identity.fingerprint,
        &state.config.crypto.kem_suites,
        &state.config.crypto.signature_suites,
    )
    .inspect_err(|err| Metrics::count(&state.metrics.enrollments, err.public_code().as_str()))?;

    let device_id = DeviceId::random(&mut rand::rng());
    let new_device = NewDevice {
        id: device_id.to_hex(),
        name: verified.device_name.clone(),
        keys: StoredKeys {
            kem_suite: verified.kem_public_key.suite().as_str().to_owned(),
            kem_public_key: verified.kem_public_key.as_bytes().to_vec(),
            signature_suite: verified.verifying_key.suite().as_str().to_owned(),
            verifying_key: verified.verifying_key.as_bytes().to_vec(),
        },
    };
    let device = match state
        .store
        .enroll_with_token(&verified.token_hash.0, state.now_i64(), &new_device)
        .await
    {
        Ok(device) => device,
        Err(StoreError::TokenRejected(reason)) => {
            Metrics::count(&state.metrics.enrollments, "token_rejected");
            state
                .audit(
                    AuditKind::EnrollmentRefused,
                    "anonymous",
                    &verified.device_name,
                    json!({ "reason": reason.to_string() }),
                )
                .await;
            // One answer for unknown, used, expired and revoked tokens: the
            // difference would help someone guessing tokens.
            return Err(ApiError::new(ErrorCode::InvalidToken).detail(reason));
        }
        Err(err) => return Err(err.into()),
    };
    let actor = format!("device:{}", device.id);
    state
        .audit(
            AuditKind::TokenUsed,
            &actor,
            device.token_id.as_deref().unwrap_or(""),
            json!({}),
        )
        .await;
    state
        .audit(
            AuditKind::DeviceEnrolled,
            &actor,
            &device.id,
            json!({
                "name": device.name,
                "kem_suite": device.keys.kem_suite,
                "signature_suite": device.keys.signature_suite,
            }),
        )
        .await;
    Metrics::count(&state.metrics.enrollments, "enrolled");
    let enrolled_at = u64::try_from(device.enrolled_at).unwrap_or(0);
    let response = enrollment::sign_response(
        &verified,
        device_id,
        enrolled_at,
        &state.identity.signing_key,
    )?;
    Ok((StatusCode::CREATED, Json(response)))
}

async fn refuse_session(
    state: &SharedState,
    device: &str,
    reason: &str,
    err: ApiError,
) -> ApiError {
    Metrics::count(&state.metrics.sessions, err.code.as_str());
    state
        .audit(
            AuditKind::SessionRefused,
            &format!("device:{device}"),
            device,
            json!({ "reason": reason }),
        )
        .await;
    err
}

async fn active_device(state: &SharedState, id: &DeviceId) -> ApiResult<DeviceRecord> {
    let hex = id.to_hex();
    match state.store.get_device(&hex).await? {
        // Not audited: anyone can name a random id, and the ledger must not
        // be writable by unauthenticated clients. The metric still counts it.
        None => {
            Metrics::count(&state.metrics.sessions, "unknown_device");
            Err(ApiError::authentication("unknown device"))
        }
        Some(device) if device.revoked_at.is_some() => Err(refuse_session(
            state,
            &hex,
            "device revoked",
            ApiError::new(ErrorCode::DeviceRevoked),
        )
        .await),
        Some(device) => Ok(device),
    }
}

/// How the ledger names a session. The ledger is permanent and readable by
/// every admin (and shown on the audit page); a live session id there would
/// let a reader address sealed requests to the session, so the ledger
/// records a hash of it: enough to correlate entries, useless as a handle.
fn session_reference(session_id: &SessionId) -> String {
    let digest = qflare_protocol::crypto::sha256(
        [
            b"qflare-ledger-session-v1:".as_slice(),
            session_id.to_hex().as_bytes(),
        ]
        .concat()
        .as_slice(),
    );
    format!("sha256:{}", hex::encode(&digest[..16]))
}

/// `POST /v1/sessions`: answer a client hello.
#[utoipa::path(
    post, path = routes::SESSIONS, tag = "public",
    request_body = ClientHello,
    responses((status = 201, description = "The server's half of the handshake, signed.", body = ServerHello)),
)]
pub async fn open_session(
    State(state): State<SharedState>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let limit = state.config.limits.session_bytes.min(limits::CLIENT_HELLO);
    let hello: ClientHello = read_json("client hello", &headers, body, limit).await?;
    let device = active_device(&state, &hello.device_id).await?;
    // A hello is unauthenticated and device ids are public (dashboard,
    // ledger): charged to the device's own budget, a stranger naming the id
    // could keep the device from ever opening a session. So a hello spends a
    // budget of its own per (device, client address); the device's budget is
    // spent once the confirmation proves who is asking. Budgets exist only
    // for enrolled ids, so random ids cannot fill the limiter's table.
    let address = client.map_or_else(|| "unknown".to_owned(), |c| c.rate_limit_key());
    state
        .rate_limit(
            "hello",
            &format!("{}@{address}", device.id),
            &state.config.rate_limits.device,
        )
        .await?;
    let (kem_key, _) = registered_keys(&device).map_err(ApiError::internal)?;
    let now = state.now();
    let (pending, server_hello) = ServerStart::new(&state.identity.signing_key)
        .respond(
            &hello,
            &kem_key,
            now,
            state.config.sessions.lifetime_secs,
            &mut rand::rng(),
        )
        .map_err(ApiError::from)?;
    let wrapped = state.identity.storage_key.wrap(
        &pending_context(&pending.session_id()),
        &pending.export(),
        &mut rand::rng(),
    )?;
    let record = SessionRecord {
        id: pending.session_id().to_hex(),
        device_id: device.id.clone(),
        state: SessionState::Pending,
        client_nonce: hello.client_nonce.to_vec(),
        sealed_state: wrapped,
        created_at: state.now_i64(),
        confirm_deadline: i64::try_from(pending.confirm_deadline()).unwrap_or(i64::MAX),
        expires_at: i64::try_from(pending.expires_at()).unwrap_or(i64::MAX),
        last_seq: 0,
    };
    match state.store.insert_pending_session(&record).await {
        Ok(()) => {}
        Err(StoreError::Conflict(_)) => {
            return Err(refuse_session(
                &state,
                &device.id,
                "replayed client hello",
                ApiError::new(ErrorCode::Replayed),
            )
            .await);
        }
        Err(err) => return Err(err.into()),
    }
    Metrics::count(&state.metrics.sessions, "hello");
    Ok((StatusCode::CREATED, Json(server_hello)))
}

/// `POST /v1/sessions/{id}/confirm`: verify the device's confirmation.
#[utoipa::path(
    post, path = routes::SESSION_CONFIRM, tag = "public",
    params(("id" = SessionId, Path, description = "The session from the server hello.")),
    request_body = ClientConfirm,
    responses((status = 200, description = "The session is established.", body = SessionEstablished)),
)]
pub async fn confirm_session(
    State(state): State<SharedState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let session_id = SessionId::parse(&id).map_err(|e| ApiError::not_found("session").detail(e))?;
    let limit = state
        .config
        .limits
        .session_bytes
        .min(limits::CLIENT_CONFIRM);
    let confirm: ClientConfirm = read_json("client confirm", &headers, body, limit).await?;
    if confirm.session_id != session_id {
        return Err(ApiError::malformed(
            "session id in the body differs from the path",
        ));
    }
    let record = state
        .store
        .get_session(&session_id.to_hex())
        .await?
        .ok_or_else(|| ApiError::authentication("unknown session"))?;
    let device_id = DeviceId::parse(&record.device_id).map_err(ApiError::internal)?;
    if record.state != SessionState::Pending {
        return Err(refuse_session(
            &state,
            &record.device_id,
            "replayed confirmation",
            ApiError::new(ErrorCode::Replayed),
        )
        .await);
    }
    let device = active_device(&state, &device_id).await?;
    let (_, verifying_key) = registered_keys(&device).map_err(ApiError::internal)?;
    let pending = state
        .identity
        .storage_key
        .unwrap(&pending_context(&session_id), &record.sealed_state)
        .and_then(|bytes| AwaitClientConfirm::import(bytes.expose()))
        .map_err(|e| ApiError::internal(format!("stored handshake state: {e}")))?;
    let established = match pending.confirm(&confirm, &verifying_key, state.now()) {
        Ok(established) => established,
        Err(err) => {
            let reason = err.to_string();
            return Err(refuse_session(&state, &device.id, &reason, ApiError::from(err)).await);
        }
    };
    // Only now, with the device's signature checked, is its own budget spent.
    state
        .rate_limit("device", &device.id, &state.config.rate_limits.device)
        .await?;
    let wrapped = state.identity.storage_key.wrap(
        &established_context(&session_id),
        &established.secrets().export(),
        &mut rand::rng(),
    )?;
    if !state
        .store
        .establish_session(&session_id.to_hex(), &wrapped, state.now_i64())
        .await?
    {
        return Err(refuse_session(
            &state,
            &device.id,
            "confirmation raced or arrived late",
            ApiError::new(ErrorCode::Replayed),
        )
        .await);
    }
    state
        .audit(
            AuditKind::SessionOpened,
            &format!("device:{}", device.id),
            &session_reference(&session_id),
            json!({ "expires_at": established.expires_at, "kem_suite": device.keys.kem_suite }),
        )
        .await;
    Metrics::count(&state.metrics.sessions, "established");
    Ok(Json(SessionEstablished {
        session_id: session_id.to_hex(),
        expires_at: established.expires_at,
    }))
}

//! The sealed-session extractor: in-session handlers receive a
//! [`SealedRequest`] holding the *plaintext* body, which exists only after
//! every check has passed — session known and established, not expired,
//! device not revoked, within its rate limit, record authentic for this
//! session, method and path, and its sequence number claimed atomically in
//! the store (so a replay is refused even when it reaches another replica).
//! A handler cannot forget a check because it never sees unchecked bytes.
//!
//! Replies go back through [`SealedRequest::respond`], sealed under the same
//! sequence number; errors found by the handler are sealed too, so the device
//! can authenticate them. Errors found before the request is accepted
//! (unknown session, bad record, a sequence number already claimed) are
//! plain: sealing under a number that is not ours would reuse a nonce.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use qflare_protocol::ProtocolError;
use qflare_protocol::api::routes;
pub use qflare_protocol::api::{SEALED_CONTENT_TYPE, SESSION_HEADER};
use qflare_protocol::channel::{ServerChannel, SessionSecrets};
use qflare_protocol::identity::{DeviceId, SessionId};
use qflare_store::{DeviceRecord, SessionRecord, SessionState};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::SharedState;
use crate::body::{declared_length, discard, read_limited};
use crate::error::{ApiError, ErrorCode};

/// Context under which stored session secrets are wrapped.
pub fn established_context(session: &SessionId) -> Vec<u8> {
    let mut ctx = b"qflare established session ".to_vec();
    ctx.extend_from_slice(session.as_bytes());
    ctx
}

/// Context under which pending handshake state is wrapped.
pub fn pending_context(session: &SessionId) -> Vec<u8> {
    let mut ctx = b"qflare pending session ".to_vec();
    ctx.extend_from_slice(session.as_bytes());
    ctx
}

/// A verified, opened in-session request.
pub struct SealedRequest {
    /// The session.
    pub session_id: SessionId,
    /// The authenticated device.
    pub device_id: DeviceId,
    /// Its stored record.
    pub device: DeviceRecord,
    /// The record's sequence number.
    pub seq: u64,
    /// The decrypted body.
    pub body: Vec<u8>,
    method: String,
    path: String,
    channel: Arc<ServerChannel>,
    /// An update's place and memory, held until the request is answered.
    _upload: Option<crate::uploads::UploadTicket>,
}

impl std::fmt::Debug for SealedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedRequest")
            .field("session_id", &self.session_id)
            .field("device_id", &self.device_id)
            .field("seq", &self.seq)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl FromRequest<SharedState> for SealedRequest {
    type Rejection = ApiError;

    async fn from_request(request: Request<Body>, state: &SharedState) -> Result<Self, ApiError> {
        let (parts, body) = request.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let now = state.now();
        // Everything that can be checked without the body is checked first,
        // so an unauthenticated client cannot make the server buffer a
        // large body (up to the update limit) for nothing. A refused body is
        // still drained in the background (up to a cap), or an HTTP/1.1
        // client still writing it would see a broken pipe, not the answer.
        let (session_id, session, device) = match admit(&parts.headers, state, now).await {
            Ok(admitted) => admitted,
            Err(err) => {
                discard(&parts.headers, body);
                return Err(err);
            }
        };
        let device_id = DeviceId::parse(&device.id).map_err(ApiError::internal)?;
        // The one route whose body may be as large as an update envelope:
        // as large as an update of the current model needs, no larger, and
        // read only for a device the round is waiting for, one upload per
        // device at a time, within the memory budget of all uploads.
        let (limit, upload) = match &state.federation {
            Some(federation) if path == routes::UPDATES => {
                let limit = federation.update_body_limit().await;
                let charged = declared_length(&parts.headers).map_or(limit, |n| n.min(limit));
                match state
                    .uploads
                    .admit(state.store.as_ref(), &device.id, charged)
                    .await
                {
                    Ok(ticket) => (limit, Some(ticket)),
                    Err(err) => {
                        discard(&parts.headers, body);
                        return Err(err);
                    }
                }
            }
            _ => (state.config.limits.sealed_bytes, None),
        };
        // Taken over without a copy when the buffer is not shared (an
        // update's record is as large as a model).
        let mut record = Vec::from(read_limited(&parts.headers, body, limit).await?);

        let secrets = state
            .identity
            .storage_key
            .unwrap(&established_context(&session_id), &session.sealed_state)
            .and_then(|bytes| SessionSecrets::import(bytes.expose()))
            .map_err(|e| ApiError::internal(format!("stored session secrets: {e}")))?;
        let expires_at = u64::try_from(session.expires_at).unwrap_or(0);
        let channel = ServerChannel::from_secrets(session_id, expires_at, &secrets)?;
        let seq = channel
            .open_request(&method, &path, &mut record, session.last_seq, now)
            .map_err(|err| match err {
                ProtocolError::Replay { .. } | ProtocolError::Expired { .. } => ApiError::from(err),
                other => ApiError::authentication(other),
            })?;
        if !state
            .store
            .advance_session_sequence(&session_id.to_hex(), seq, state.now_i64())
            .await?
        {
            return Err(
                ApiError::new(ErrorCode::Replayed).detail("sequence number already claimed")
            );
        }
        if let Err(err) = state.store.touch_device(&device.id, state.now_i64()).await {
            tracing::warn!(%err, "could not record device activity");
        }
        Ok(Self {
            session_id,
            device_id,
            device,
            seq,
            body: record,
            method,
            path,
            channel: Arc::new(channel),
            _upload: upload,
        })
    }
}

/// The checks that need no body: the session is known, established and
/// unexpired, its device exists and is not revoked, and the device is within
/// its rate limit.
async fn admit(
    headers: &HeaderMap,
    state: &SharedState,
    now: u64,
) -> Result<(SessionId, SessionRecord, DeviceRecord), ApiError> {
    let session_id = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::authentication("missing session header"))
        .and_then(|v| SessionId::parse(v).map_err(ApiError::authentication))?;
    let session = state
        .store
        .get_session(&session_id.to_hex())
        .await?
        .ok_or_else(|| ApiError::authentication("unknown session"))?;
    if session.state != SessionState::Established {
        return Err(ApiError::authentication("session is not established"));
    }
    if u64::try_from(session.expires_at).unwrap_or(0) <= now {
        return Err(ApiError::new(ErrorCode::Expired).detail("session expired"));
    }
    let device = state
        .store
        .get_device(&session.device_id)
        .await?
        .ok_or_else(|| ApiError::authentication("session of an unknown device"))?;
    if device.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::DeviceRevoked));
    }
    state
        .rate_limit("device", &device.id, &state.config.rate_limits.device)
        .await?;
    Ok((session_id, session, device))
}

impl SealedRequest {
    /// Decodes the plaintext body as JSON.
    pub fn json<T: DeserializeOwned>(
        &self,
        what: &'static str,
        limit: usize,
    ) -> Result<T, ApiError> {
        Ok(qflare_protocol::wire::decode(what, &self.body, limit)?)
    }

    /// Seals `value` as the answer.
    pub fn respond<T: Serialize>(&self, result: Result<T, ApiError>) -> Response {
        match result {
            Ok(value) => match serde_json::to_vec(&value) {
                Ok(body) => self.seal(StatusCode::OK, body),
                Err(err) => self.respond_error(ApiError::internal(err)),
            },
            Err(err) => self.respond_error(err),
        }
    }

    /// Seals raw bytes as the answer (binary payloads such as model downloads).
    pub fn respond_raw(&self, body: Vec<u8>) -> Response {
        self.seal(StatusCode::OK, body)
    }

    /// Seals `body` as a model download's answer, streamed to the connection
    /// while `share` of the download budget is held ([`crate::downloads`]).
    pub fn respond_download(
        &self,
        mut body: Vec<u8>,
        share: crate::downloads::DownloadShare,
    ) -> Response {
        if let Err(err) = self
            .channel
            .seal_response(self.seq, &self.method, &self.path, &mut body)
        {
            return ApiError::internal(format!("sealing the response: {err}")).into_response();
        }
        let mut response = crate::downloads::streamed(Bytes::from(body), share);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(SEALED_CONTENT_TYPE),
        );
        response
    }

    /// Seals an error answer (status kept, body sealed).
    pub fn respond_error(&self, err: ApiError) -> Response {
        let status = err.status();
        let body = serde_json::to_vec(&err.body()).unwrap_or_default();
        // Log through the usual path, then send the sealed body instead.
        drop(err.into_response());
        self.seal(status, body)
    }

    fn seal(&self, status: StatusCode, mut body: Vec<u8>) -> Response {
        if let Err(err) = self
            .channel
            .seal_response(self.seq, &self.method, &self.path, &mut body)
        {
            return ApiError::internal(format!("sealing the response: {err}")).into_response();
        }
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(SEALED_CONTENT_TYPE),
        );
        response
    }
}

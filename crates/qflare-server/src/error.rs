//! The one error shape every route answers with: `{"code": ..., "message": ...}`.
//!
//! `code` is stable and machine-readable; `message` is a fixed, safe sentence.
//! The detail (which check failed, the backend's error) goes to the log with
//! the code, never to the client, so errors do not become an oracle.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use qflare_protocol::ProtocolError;
use qflare_store::StoreError;

pub use qflare_protocol::wire::ErrorBody;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// Safe message.
    pub message: &'static str,
    /// For the log only.
    pub detail: Option<String>,
    /// Seconds to wait, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A new error without detail.
    pub const fn new(status: StatusCode, code: &'static str, message: &'static str) -> Self {
        Self {
            status,
            code,
            message,
            detail: None,
            retry_after: None,
        }
    }

    /// Attaches detail for the log.
    pub fn detail(mut self, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    /// 400: the request body could not be decoded.
    pub fn malformed(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "the request could not be decoded",
        )
        .detail(detail)
    }

    /// 401: authentication failed.
    pub fn authentication(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_failed",
            "authentication failed",
        )
        .detail(detail)
    }

    /// 404: no such route or resource.
    pub fn not_found(what: &'static str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "not found").detail(what)
    }

    /// 413: the body is over the route's limit.
    pub fn too_large(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the request body is too large",
        )
        .detail(detail)
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut err = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests; retry later",
        );
        err.retry_after = Some(retry_after_secs.max(1));
        err
    }

    /// 500 with the cause logged.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error",
        )
        .detail(detail)
    }

    /// 503: a backing service is unavailable.
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        let mut err = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "a backing service is unavailable; retry later",
        )
        .detail(detail);
        err.retry_after = Some(5);
        err
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.to_owned(),
            message: self.message.to_owned(),
        }
    }

    fn log(&self) {
        let detail = self.detail.as_deref().unwrap_or("");
        if self.status.is_server_error() {
            tracing::error!(
                code = self.code,
                status = self.status.as_u16(),
                detail,
                "request failed"
            );
        } else {
            tracing::info!(
                code = self.code,
                status = self.status.as_u16(),
                detail,
                "request refused"
            );
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code, self.status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let retry_after = self.retry_after;
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = retry_after
            && let Ok(value) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<ProtocolError> for ApiError {
    fn from(err: ProtocolError) -> Self {
        let (status, message) = match err.public_code() {
            "payload_too_large" => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large",
            ),
            "malformed_request" => (StatusCode::BAD_REQUEST, "the request could not be decoded"),
            "unsupported_suite" => (
                StatusCode::BAD_REQUEST,
                "the requested suite is not offered",
            ),
            "unsupported_version" => (StatusCode::BAD_REQUEST, "unsupported protocol version"),
            "expired" => (StatusCode::UNAUTHORIZED, "expired"),
            "replayed" => (StatusCode::CONFLICT, "replayed or out-of-order message"),
            "session_exhausted" => (
                StatusCode::UNAUTHORIZED,
                "session exhausted; open a new one",
            ),
            "attestation_refused" => (StatusCode::FORBIDDEN, "attestation refused"),
            "internal_error" => (StatusCode::INTERNAL_SERVER_ERROR, "internal error"),
            _ => (StatusCode::UNAUTHORIZED, "authentication failed"),
        };
        Self::new(status, err.public_code(), message).detail(err)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::Conflict(_) => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "conflicts with existing state",
            )
            .detail(err),
            StoreError::NotFound(what) => Self::not_found(what),
            StoreError::Backend(_) => Self::unavailable(err),
            _ => Self::internal(err),
        }
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

//! The one error shape every route answers with: `{"code": ..., "message": ...}`.
//!
//! `code` is stable and machine-readable; `message` is a fixed, safe sentence.
//! Both, and the HTTP status, come from the one table in
//! `qflare_protocol::api::ErrorCode` that the device side reads too.
//! The detail (which check failed, the backend's error) goes to the log with
//! the code, never to the client, so errors do not become an oracle.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use qflare_protocol::ProtocolError;
use qflare_store::StoreError;

pub use qflare_protocol::api::{ErrorBody, ErrorCode};

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    /// Stable code; it fixes the HTTP status and the message.
    pub code: ErrorCode,
    /// For the log only, unless `public_detail`.
    pub detail: Option<String>,
    /// Send `detail` to the client too (admin routes only: see [`ErrorBody::detail`]).
    pub public_detail: bool,
    /// Seconds to wait, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A new error without detail.
    pub const fn new(code: ErrorCode) -> Self {
        Self {
            code,
            detail: None,
            public_detail: false,
            retry_after: None,
        }
    }

    /// Attaches detail the admin caller is shown as well as the log.
    pub fn explain(mut self, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self.public_detail = true;
        self
    }

    /// The HTTP status of the code.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Attaches detail for the log.
    pub fn detail(mut self, detail: impl std::fmt::Display) -> Self {
        self.detail = Some(detail.to_string());
        self
    }

    /// Asks the client to wait `secs` before retrying.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
        self
    }

    /// 400: the request body could not be decoded.
    pub fn malformed(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::MalformedRequest).detail(detail)
    }

    /// 401: authentication failed.
    pub fn authentication(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::AuthenticationFailed).detail(detail)
    }

    /// 404: no such route or resource.
    pub fn not_found(what: &'static str) -> Self {
        Self::new(ErrorCode::NotFound).detail(what)
    }

    /// 413: the body is over the route's limit.
    pub fn too_large(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::PayloadTooLarge).detail(detail)
    }

    /// 429 with `Retry-After`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(ErrorCode::RateLimited).retry_after(retry_after_secs)
    }

    /// 500 with the cause logged.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::InternalError).detail(detail)
    }

    /// 503: a backing service is unavailable.
    pub fn unavailable(detail: impl std::fmt::Display) -> Self {
        Self::new(ErrorCode::Unavailable)
            .detail(detail)
            .retry_after(5)
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.code.message().to_owned(),
            detail: self.detail.clone().filter(|_| self.public_detail),
        }
    }

    fn log(&self) {
        let detail = self.detail.as_deref().unwrap_or("");
        let status = self.code.status();
        if self.status().is_server_error() {
            tracing::error!(code = %self.code, status, detail, "request failed");
        } else {
            // Refusals are what a flood is made of: at info level every one
            // of them would be a log line an attacker writes at will. The
            // ones that matter for security (forged signatures, replays,
            // refused updates) go to the audit ledger; the counts are in the
            // metrics.
            tracing::debug!(code = %self.code, status, detail, "request refused");
        }
    }
}

impl From<ErrorCode> for ApiError {
    fn from(code: ErrorCode) -> Self {
        Self::new(code)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code, self.code.status())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let retry_after = self.retry_after;
        let mut response = (self.status(), axum::Json(self.body())).into_response();
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
        Self::new(err.public_code()).detail(err)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match &err {
            StoreError::Conflict(_) => Self::new(ErrorCode::Conflict).detail(err),
            StoreError::NotFound(what) => Self::not_found(what),
            StoreError::Backend(_) => Self::unavailable(err),
            _ => Self::internal(err),
        }
    }
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;

//! Reading the server's answers: bodies under a byte limit, plain JSON
//! answers, and the one error shape every route uses. The lowest layer of the
//! client; [`crate::transport`] and [`crate::client`] both build on it.

use qflare_protocol::api::{ErrorBody, ErrorCode};
use qflare_protocol::wire;
use serde::de::DeserializeOwned;

use crate::error::EdgeError;

/// Reads a response body, refusing more than `limit` bytes.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, EdgeError> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(EdgeError::Protocol(
            qflare_protocol::ProtocolError::TooLarge {
                what: "response",
                limit,
                actual: usize::try_from(response.content_length().unwrap_or(u64::MAX))
                    .unwrap_or(usize::MAX),
            },
        ));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(EdgeError::network)? {
        if body.len() + chunk.len() > limit {
            return Err(EdgeError::Protocol(
                qflare_protocol::ProtocolError::TooLarge {
                    what: "response",
                    limit,
                    actual: body.len() + chunk.len(),
                },
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(crate) fn server_error(status: u16, body: &[u8]) -> EdgeError {
    match wire::decode::<ErrorBody>("error", body, 16 * 1024) {
        Ok(err) => EdgeError::Server {
            status,
            code: err.code,
            message: err.message,
        },
        Err(_) => EdgeError::Server {
            status,
            code: ErrorCode::Unknown,
            message: format!("HTTP {status} without a QFLARE error body"),
        },
    }
}

/// Decodes a plain (unsealed) JSON answer or the server's error.
pub(crate) async fn decode_plain<T: DeserializeOwned>(
    response: reqwest::Response,
    limit: usize,
) -> Result<T, EdgeError> {
    let status = response.status();
    let body = read_body(response, limit).await?;
    if !status.is_success() {
        return Err(server_error(status.as_u16(), &body));
    }
    Ok(wire::decode("response", &body, limit)?)
}

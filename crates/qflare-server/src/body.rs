//! Reading request bodies under a per-route byte limit, checked against
//! `Content-Length` before anything is buffered and again while reading.
//!
//! An over-limit body is *drained* (read and discarded, up to
//! [`DRAIN_CAP`]) before the 413 is sent: an HTTP/1.1 client that is still
//! writing when the server closes would otherwise see a broken pipe instead of
//! the error. Beyond the cap the connection is simply dropped; the cost to the
//! server of an oversized request is bounded either way.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The most the server reads of a body it has already refused.
pub const DRAIN_CAP: usize = 4 * 1024 * 1024;

async fn drain(mut stream: axum::body::BodyDataStream, mut seen: usize) {
    while seen <= DRAIN_CAP {
        match stream.next().await {
            Some(Ok(chunk)) => seen += chunk.len(),
            _ => break,
        }
    }
}

/// Reads and discards the body of a request refused before its body was
/// read, when it declares a length within [`DRAIN_CAP`] (otherwise the
/// connection is simply dropped after the answer).
pub async fn discard(headers: &HeaderMap, body: Body) {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length <= DRAIN_CAP as u64) {
        drain(body.into_data_stream(), 0).await;
    }
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if let Some(length) = declared
        && length > limit as u64
    {
        if length <= DRAIN_CAP as u64 {
            drain(stream, 0).await;
        }
        return Err(ApiError::too_large(format!(
            "content-length {length} over limit {limit}"
        )));
    }
    let mut buffer = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| ApiError::malformed(format!("reading body: {err}")))?;
        if buffer.len() + chunk.len() > limit {
            let seen = buffer.len() + chunk.len();
            drain(stream, seen).await;
            return Err(ApiError::too_large(format!("body over limit {limit}")));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buffer))
}

/// Reads and decodes a JSON body of at most `limit` bytes.
pub async fn read_json<T: DeserializeOwned>(
    what: &'static str,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    let bytes = read_limited(headers, body, limit).await?;
    Ok(qflare_protocol::wire::decode(what, &bytes, limit)?)
}

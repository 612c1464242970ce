//! Reading request bodies under a per-route byte limit, checked against
//! `Content-Length` before anything is buffered and again while reading.
//!
//! A refused body is answered at once and then *lingered on*: a background
//! task keeps reading and discarding it (up to [`LINGER_CAP`] bytes or
//! [`LINGER_TIME`], one chunk in memory at a time) while the answer goes
//! out. Over HTTP/1.1 a client that writes its whole body before reading
//! (Python's `urllib`, `curl -H 'Expect:'`) would otherwise find the
//! connection closed under it and never see the 413; a client that sent
//! `Expect: 100-continue` gets the answer instead of the `100` and sends
//! nothing (the body is not touched, so hyper never sends the `100`). Over
//! HTTP/2 only the stream ends (hyper resets it once the answer is complete
//! and the body is dropped); the connection lives on.
//! Beyond the cap the connection is dropped; what an oversized request costs
//! the server is bounded either way, in memory by one chunk and in time by
//! the connection limits.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures::StreamExt;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The most the server reads of a body it has already refused.
pub const LINGER_CAP: usize = 64 * 1024 * 1024;

/// How long the server keeps reading a body it has already refused.
pub const LINGER_TIME: Duration = Duration::from_secs(15);

/// Reads and discards the rest of a refused body in the background, so the
/// answer can be sent now and the client can finish writing and read it.
fn linger(mut stream: axum::body::BodyDataStream, mut seen: usize) {
    tokio::spawn(async move {
        let drained = async {
            while seen <= LINGER_CAP {
                match stream.next().await {
                    Some(Ok(chunk)) => seen += chunk.len(),
                    _ => break,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drained).await;
    });
}

/// Whether the client waits for `100 Continue` before sending its body.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Disposes of a body refused before any of it was read. A client waiting
/// for `100 Continue` has sent none of it and never will once it sees the
/// refusal: reading would only make hyper invite the body (it sends the
/// `100` when a body it has not invited is first read), so the body is
/// dropped. Any other client is writing it now, and is lingered on.
fn refuse_unread(headers: &HeaderMap, stream: axum::body::BodyDataStream) {
    if !expects_continue(headers) {
        linger(stream, 0);
    }
}

/// Lets the body of a request refused before its body was read drain in the
/// background while the refusal is sent.
pub fn discard(headers: &HeaderMap, body: Body) {
    refuse_unread(headers, body.into_data_stream());
}

/// The body length the request declares (`Content-Length`), if any; a
/// length past `usize` reads as `usize::MAX` (over every limit).
pub fn declared_length(headers: &HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Reads a whole body of at most `limit` bytes.
pub async fn read_limited(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = declared_length(headers);
    let mut stream = body.into_data_stream();
    if let Some(length) = declared
        && length > limit
    {
        refuse_unread(headers, stream);
        return Err(ApiError::too_large(format!(
            "content-length {length} over limit {limit}"
        )));
    }
    let mut buffer = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| ApiError::malformed(format!("reading body: {err}")))?;
        if buffer.len() + chunk.len() > limit {
            let seen = buffer.len() + chunk.len();
            drop(buffer);
            linger(stream, seen);
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

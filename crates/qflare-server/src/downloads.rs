//! How much memory model downloads may hold at once.
//!
//! Every download is its own copy of the model, sealed to one session (the
//! encryption is per session), so N devices fetching a round's model at once
//! held N copies: at 1,000 devices of the 2NN the server peaked at 1.67 GiB
//! (docs/benchmarks.md §10), and 10,000 devices of the CNN would need 66 GB.
//! A download now takes its share of `limits.downloads_in_memory_bytes`
//! before its copy is made and keeps it until the connection has taken the
//! last byte. Over the budget a download *waits* rather than being refused:
//! the device would only ask again, and the model is the same for all.
//!
//! One download per device at a time (another is answered `429` with
//! `Retry-After`, as a second upload is): the loop never asks twice at once,
//! and a device that opened many connections and stopped reading them would
//! otherwise hold the whole budget until their idle timeouts.
//!
//! The body is handed to the connection in chunks, so the share is held
//! while the bytes are still queued to be written, not only while the copy
//! is being made (a single-chunk body ends, and would release its share, as
//! soon as the connection takes it).

use std::convert::Infallible;

use axum::body::Body;
use axum::http::HeaderValue;
use axum::http::header::CONTENT_LENGTH;
use axum::response::Response;
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;

use crate::budget::{DeviceSlot, DeviceSlots, MemoryBudget};
use crate::error::ApiError;

/// What one chunk of a download body holds.
const CHUNK: usize = 256 * 1024;

/// Seconds a second concurrent download of one device is told to wait.
const RETRY_AFTER_SECS: u64 = 2;

/// See the module documentation.
#[derive(Debug)]
pub struct DownloadBudget {
    in_flight: DeviceSlots,
    budget: MemoryBudget,
}

/// One download's device place and share of the budget, both given back
/// when dropped (with the body, once sent).
#[derive(Debug)]
pub struct DownloadShare {
    /// Held, never read: dropping them gives the place and bytes back.
    _slot: DeviceSlot,
    _bytes: OwnedSemaphorePermit,
}

impl DownloadBudget {
    /// A budget of `bytes` of download bodies in memory at once.
    pub fn new(bytes: usize) -> Self {
        Self {
            in_flight: DeviceSlots::default(),
            budget: MemoryBudget::new(bytes),
        }
    }

    /// Waits until a download of `bytes` for `device_id` fits, and holds
    /// its share; `429` if the device has a download in flight. A download
    /// larger than the whole budget takes all of it (it then runs alone)
    /// rather than waiting forever.
    pub async fn reserve(&self, device_id: &str, bytes: usize) -> Result<DownloadShare, ApiError> {
        let Some(slot) = self.in_flight.take(device_id) else {
            return Err(ApiError::rate_limited(RETRY_AFTER_SECS)
                .detail("a model download for this device is already in progress"));
        };
        let bytes = self.budget.take(bytes).await.map_err(ApiError::internal)?;
        Ok(DownloadShare {
            _slot: slot,
            _bytes: bytes,
        })
    }

    /// Bytes of the budget not held by any download now.
    pub fn available_bytes(&self) -> usize {
        self.budget.available_bytes()
    }
}

/// A `200` answer of `bytes` handed to the connection in chunks, holding
/// `share` until the last chunk has been taken. The length is declared, so
/// the framing is what a buffered body's would be.
pub fn streamed(bytes: Bytes, share: DownloadShare) -> Response {
    let length = bytes.len();
    let chunks = futures::stream::unfold((bytes, share), |(mut rest, share)| async move {
        if rest.is_empty() {
            // The state, and with it the share, is dropped here.
            return None;
        }
        let chunk = rest.split_to(rest.len().min(CHUNK));
        Some((Ok::<Bytes, Infallible>(chunk), (rest, share)))
    });
    let mut response = Response::new(Body::from_stream(chunks));
    response
        .headers_mut()
        .insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// The budget's unit of account.
    const UNIT: usize = 1024;

    #[tokio::test]
    async fn downloads_over_the_budget_wait_and_the_share_returns_when_sent() {
        let budget = DownloadBudget::new(4 * UNIT);
        let first = budget.reserve("a", 3 * UNIT).await.unwrap();
        assert_eq!(budget.available_bytes(), UNIT);
        // The same device may not download twice at once.
        let twice = budget.reserve("a", UNIT).await.unwrap_err();
        assert_eq!(twice.status(), http::StatusCode::TOO_MANY_REQUESTS);
        // Another device's download of three units waits for the first.
        let waiting = budget.reserve("b", 3 * UNIT);
        tokio::pin!(waiting);
        assert!(futures::poll!(&mut waiting).is_pending());

        let body = vec![7u8; CHUNK * 2 + 10];
        let response = streamed(Bytes::from(body.clone()), first);
        assert_eq!(
            response.headers().get(CONTENT_LENGTH).unwrap(),
            &body.len().to_string()
        );
        let mut stream = response.into_body().into_data_stream();
        let mut received = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = stream.next().await {
            received.extend_from_slice(&chunk.unwrap());
            chunks += 1;
            if chunks < 3 {
                // Still being sent: still held.
                assert!(futures::poll!(&mut waiting).is_pending());
            }
        }
        assert_eq!(received, body);
        assert_eq!(chunks, 3);
        // Sent: the waiting download proceeds.
        let second = waiting.await.unwrap();
        drop(second);
        assert_eq!(budget.available_bytes(), 4 * UNIT);
        // Sent, device "a" may download again.
        drop(budget.reserve("a", UNIT).await.unwrap());
        // Larger than the whole budget: takes all of it instead of waiting forever.
        let all = budget.reserve("c", 100 * UNIT).await.unwrap();
        assert_eq!(budget.available_bytes(), 0);
        drop(all);
    }
}

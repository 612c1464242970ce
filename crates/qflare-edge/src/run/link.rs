//! The sealed calls the loop makes (round, model, update, evaluation) and the
//! session they run in, behind the [`Link`] trait: [`HttpLink`] is the real
//! one over pinned HTTPS; the loop's tests drive it through a scripted one.

use qflare_protocol::ProtocolError;
use qflare_protocol::api::routes;
use qflare_protocol::envelope::UpdateEnvelope;
use qflare_protocol::federation::{
    EvaluationReceipt, EvaluationReport, ModelQuery, RoundInfo, RoundQuery, SubmitReceipt,
};
use qflare_protocol::wire::{self, limits};

use crate::client::{Session, open_session, unix_now};
use crate::error::EdgeError;
use crate::identity::Identity;
use crate::transport::Transport;

/// Largest model download accepted (header and safetensors bytes).
pub const MODEL_DOWNLOAD_LIMIT: usize = limits::MAX_MODEL_BYTES + limits::MODEL_CERTIFICATE + 1024;
/// The longest a device asks the server to hold a poll (the server holds
/// at most its own `federation.long_poll_secs`); well within the device's
/// HTTP timeout.
pub const LONG_POLL_SECS: u64 = 30;
/// A long poll answered faster than this with nothing changed was not held
/// (the server does not hold polls): the device then waits the interval
/// the server asks for before asking again.
pub const UNHELD_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Largest round answer accepted: the report plus a little JSON around it.
pub const ROUND_INFO_LIMIT: usize = limits::ATTESTATION_REPORT + 16 * 1024;
/// Largest submission receipt accepted.
pub const RECEIPT_LIMIT: usize = 4096;
/// The three sealed calls and the session they run in, as the loop sees
/// them: the real implementation is [`HttpLink`]; tests drive the loop
/// through a scripted one.
pub(crate) trait Link {
    /// True when a session is open with more than `margin_secs` left.
    fn has_session(&self, margin_secs: u64) -> bool;
    /// Forgets the session (the server ended it).
    fn drop_session(&mut self);
    /// Opens a session; returns its id and expiry.
    async fn open_session(&mut self) -> Result<(String, u64), EdgeError>;
    /// `POST /v1/rounds/current`.
    async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError>;
    /// `POST /v1/models/current`: the raw download.
    async fn model(&mut self) -> Result<Vec<u8>, EdgeError>;
    /// `POST /v1/updates`.
    async fn submit(&mut self, envelope: &UpdateEnvelope) -> Result<SubmitReceipt, EdgeError>;
    /// `POST /v1/evaluations`.
    async fn evaluate(&mut self, report: &EvaluationReport)
    -> Result<EvaluationReceipt, EdgeError>;
}

/// The loop's link over the pinned HTTPS transport.
pub(crate) struct HttpLink<'a> {
    pub(super) identity: &'a Identity,
    pub(super) transport: Transport,
    pub(super) session: Option<Session>,
}

impl HttpLink<'_> {
    fn live(&mut self) -> Result<&mut Session, EdgeError> {
        // The loop opens a session before every call; reaching here without
        // one is treated like an expired session (open another).
        self.session
            .as_mut()
            .ok_or(EdgeError::Protocol(ProtocolError::Expired {
                expires_at: 0,
                now: unix_now(),
            }))
    }
}

impl Link for HttpLink<'_> {
    fn has_session(&self, margin_secs: u64) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| !s.expires_within(margin_secs))
    }

    fn drop_session(&mut self) {
        self.session = None;
    }

    async fn open_session(&mut self) -> Result<(String, u64), EdgeError> {
        self.session = None;
        let session = open_session(self.identity, &self.transport).await?;
        let opened = (session.session_id(), session.expires_at());
        self.session = Some(session);
        Ok(opened)
    }

    async fn round(&mut self, query: &RoundQuery) -> Result<RoundInfo, EdgeError> {
        self.live()?
            .call(routes::CURRENT_ROUND, query, ROUND_INFO_LIMIT)
            .await
    }

    async fn model(&mut self) -> Result<Vec<u8>, EdgeError> {
        self.live()?
            .call_raw(
                routes::CURRENT_MODEL,
                wire::encode(&ModelQuery::default())?,
                MODEL_DOWNLOAD_LIMIT,
            )
            .await
    }

    async fn submit(&mut self, envelope: &UpdateEnvelope) -> Result<SubmitReceipt, EdgeError> {
        self.live()?.submit_update(envelope, RECEIPT_LIMIT).await
    }

    async fn evaluate(
        &mut self,
        report: &EvaluationReport,
    ) -> Result<EvaluationReceipt, EdgeError> {
        self.live()?
            .call(routes::EVALUATIONS, report, RECEIPT_LIMIT)
            .await
    }
}

//! What a failure means for the device loop: every server error code and
//! every failed local check sorted into one of a few reactions (stop, skip
//! the round, re-seal, reconnect, refuse, retry with back-off, give up).

use qflare_protocol::ProtocolError;
use qflare_protocol::api::ErrorCode;

use crate::error::{EdgeError, ModelRefusal};
use crate::trainer::TrainError;

/// Server codes that mean "this round is not for you any more; poll again"
/// (`unknown_round`: the server no longer knows it, e.g. after a restore).
const SKIP_CODES: [ErrorCode; 5] = [
    ErrorCode::NotSelected,
    ErrorCode::Duplicate,
    ErrorCode::DeadlinePassed,
    ErrorCode::RoundClosed,
    ErrorCode::UnknownRound,
];
/// Server codes no amount of retrying fixes, though their HTTP status is a
/// retryable one (a server that does not coordinate training at all).
const FATAL_CODES: [ErrorCode; 1] = [ErrorCode::FederationDisabled];
/// Server codes that mean "the session is gone; open another".
const SESSION_CODES: [ErrorCode; 4] = [
    ErrorCode::Expired,
    ErrorCode::AuthenticationFailed,
    ErrorCode::Replayed,
    ErrorCode::SessionExhausted,
];

/// What a failure means for the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Disposition {
    /// The device was revoked: stop cleanly.
    Revoked,
    /// Leave this round, poll again.
    SkipRound,
    /// The enclave restarted: back off, re-attest, re-seal the same update.
    Reseal,
    /// The session is gone: open another.
    Reconnect,
    /// A report, model or round failed a check.
    Refusal,
    /// Transient: back off and try again.
    Retry,
    /// End the run.
    Fatal,
}

pub(super) fn classify(err: &EdgeError, in_handshake: bool) -> Disposition {
    let transient =
        err.is_retryable() || matches!(err, EdgeError::Server { status, .. } if *status == 500);
    let code = err.error_code();
    let among = |codes: &[ErrorCode]| code.is_some_and(|c| codes.contains(&c));
    match err {
        _ if code == Some(ErrorCode::DeviceRevoked) => Disposition::Revoked,
        _ if among(&FATAL_CODES) => Disposition::Fatal,
        // A handshake the server refuses for any other reason will not
        // succeed by reconnecting (unknown device, bad signature, pin).
        _ if in_handshake => {
            if transient {
                Disposition::Retry
            } else {
                Disposition::Fatal
            }
        }
        _ if among(&SKIP_CODES) => Disposition::SkipRound,
        _ if code == Some(ErrorCode::EnclaveRestarting) => Disposition::Reseal,
        _ if among(&SESSION_CODES) => Disposition::Reconnect,
        EdgeError::Protocol(ProtocolError::Expired { .. } | ProtocolError::SequenceExhausted) => {
            Disposition::Reconnect
        }
        EdgeError::Attestation(_)
        | EdgeError::ModelRefused(_)
        | EdgeError::RoundRefused(_)
        | EdgeError::Train(TrainError::Refused(_) | TrainError::Diverged(_)) => {
            Disposition::Refusal
        }
        _ if transient => Disposition::Retry,
        _ => Disposition::Fatal,
    }
}

/// A refusal that may be a benign race rather than an attack: the server
/// moved to a newer model between the round answer and the download.
pub(super) fn is_benign_refusal(err: &EdgeError) -> bool {
    matches!(
        err,
        EdgeError::ModelRefused(ModelRefusal::VersionMismatch { expected, received })
            if received > expected
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(status: u16, code: &str) -> EdgeError {
        EdgeError::Server {
            status,
            code: code.into(),
            message: String::new(),
        }
    }

    #[test]
    fn failures_are_sorted_by_meaning() {
        use Disposition::*;
        let cases = [
            (server(403, "device_revoked"), false, Revoked),
            (server(403, "device_revoked"), true, Revoked),
            (server(403, "not_selected"), false, SkipRound),
            (server(409, "duplicate"), false, SkipRound),
            (server(409, "deadline_passed"), false, SkipRound),
            (server(409, "round_closed"), false, SkipRound),
            (server(503, "enclave_restarting"), false, Reseal),
            (server(503, "unavailable"), false, Retry),
            (server(429, "rate_limited"), false, Retry),
            (server(500, "internal_error"), false, Retry),
            (server(401, "expired"), false, Reconnect),
            (server(401, "authentication_failed"), false, Reconnect),
            (server(401, "authentication_failed"), true, Fatal),
            (server(429, "rate_limited"), true, Retry),
            (server(400, "malformed_request"), false, Fatal),
            (server(404, "unknown_round"), false, SkipRound),
            (server(503, "federation_disabled"), false, Fatal),
            (EdgeError::Network("reset".into()), false, Retry),
            (EdgeError::Network("reset".into()), true, Retry),
            (
                EdgeError::Protocol(ProtocolError::Expired {
                    expires_at: 1,
                    now: 2,
                }),
                false,
                Reconnect,
            ),
            (
                EdgeError::Protocol(ProtocolError::Aead("response")),
                false,
                Fatal,
            ),
            (
                EdgeError::Attestation(ProtocolError::AttestationRefused("x")),
                false,
                Refusal,
            ),
            (
                EdgeError::ModelRefused(ModelRefusal::EnclaveKeyMismatch),
                false,
                Refusal,
            ),
            (EdgeError::RoundRefused("x".into()), false, Refusal),
            (TrainError::Refused("x".into()).into(), false, Refusal),
            (TrainError::Diverged("x".into()).into(), false, Refusal),
            (TrainError::Failed("x".into()).into(), false, Fatal),
            (EdgeError::Tls("pin".into()), false, Fatal),
        ];
        for (err, in_handshake, expected) in cases {
            assert_eq!(classify(&err, in_handshake), expected, "{err}");
        }
    }

    #[test]
    fn only_a_newer_model_is_a_benign_refusal() {
        let newer = EdgeError::ModelRefused(ModelRefusal::VersionMismatch {
            expected: 3,
            received: 4,
        });
        let older = EdgeError::ModelRefused(ModelRefusal::VersionMismatch {
            expected: 3,
            received: 2,
        });
        assert!(is_benign_refusal(&newer));
        assert!(!is_benign_refusal(&older));
        assert!(!is_benign_refusal(&EdgeError::ModelRefused(
            ModelRefusal::EnclaveKeyMismatch
        )));
    }
}

//! The Python exceptions of the `qflare` package and the mapping from the
//! edge library's errors to them: each names what went wrong, so callers
//! can catch a revoked device apart from an unreachable server.
// `create_exception!` generates items without docs.
#![allow(missing_docs)]

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use qflare_edge::{EdgeError, UpdateRefusal};
use qflare_protocol::ProtocolError;
use qflare_protocol::api::ErrorCode;

pyo3::create_exception!(qflare, QflareError, PyException, "Any QFLARE failure.");
pyo3::create_exception!(
    qflare,
    ServerUnreachable,
    QflareError,
    "The server could not be reached."
);
pyo3::create_exception!(
    qflare,
    ServerKeyMismatch,
    QflareError,
    "The server's certificate or key is not the pinned one."
);
pyo3::create_exception!(
    qflare,
    EnrollmentRefused,
    QflareError,
    "The enrollment token is invalid, expired, revoked or used."
);
pyo3::create_exception!(
    qflare,
    DeviceRevoked,
    QflareError,
    "An admin revoked this device."
);
pyo3::create_exception!(
    qflare,
    AttestationRefused,
    QflareError,
    "The enclave's attestation report does not satisfy this device's policy."
);
pyo3::create_exception!(
    qflare,
    ModelRefused,
    QflareError,
    "A downloaded model failed verification against the enclave's certificate."
);
pyo3::create_exception!(
    qflare,
    ShapeMismatch,
    QflareError,
    "The trained weights do not have the global model's tensor names and shapes."
);
pyo3::create_exception!(
    qflare,
    NonFiniteUpdate,
    QflareError,
    "The trained weights hold a NaN or an infinity."
);
pyo3::create_exception!(
    qflare,
    RoundRefused,
    QflareError,
    "The server's round cannot be trained by this device."
);

/// The Python error for an edge error, by what went wrong.
pub(crate) fn to_py(err: EdgeError) -> PyErr {
    let text = err.to_string();
    match err {
        EdgeError::Network(_) => ServerUnreachable::new_err(text),
        EdgeError::Protocol(ProtocolError::PinMismatch) | EdgeError::Tls(_) => {
            ServerKeyMismatch::new_err(text)
        }
        EdgeError::Server { code, .. } => match code {
            ErrorCode::DeviceRevoked => DeviceRevoked::new_err(text),
            ErrorCode::InvalidToken => EnrollmentRefused::new_err(text),
            _ => QflareError::new_err(text),
        },
        EdgeError::Attestation(_) => AttestationRefused::new_err(text),
        EdgeError::ModelRefused(_) => ModelRefused::new_err(text),
        EdgeError::RoundRefused(_) => RoundRefused::new_err(text),
        EdgeError::UpdateRefused(UpdateRefusal::ShapeMismatch(what)) => {
            ShapeMismatch::new_err(what)
        }
        EdgeError::UpdateRefused(UpdateRefusal::NonFinite(_)) => NonFiniteUpdate::new_err(text),
        _ => QflareError::new_err(text),
    }
}

//! The federated-learning exchanges inside a sealed session (step 3 and 4):
//!
//! | route | request | answer |
//! |---|---|---|
//! | `POST /v1/rounds/current` | [`RoundQuery`] | [`RoundInfo`] |
//! | `POST /v1/models/current` | [`ModelQuery`] | [`encode_model_download`] bytes |
//! | `POST /v1/updates/admission` | [`UploadAdmissionRequest`] | [`UploadAdmission`] |
//! | `POST /v1/updates` | [`crate::envelope::UpdateEnvelope`] | [`SubmitReceipt`] |
//! | `POST /v1/evaluations` | [`EvaluationReport`] | [`EvaluationReceipt`] |
//!
//! Federated evaluation: a device evaluates the global model it was sent for
//! a round on its own held-out data and reports named metrics with the
//! example count, for a model the server cannot run itself. The report is
//! sealed in the device's session (authenticated to that device, encrypted
//! to the server): the server aggregates the metrics weighted by examples,
//! so they are for the host to read, unlike the update, which is sealed
//! past the host to the enclave.
//!
//! The round answer carries an attestation report made for the device's own
//! nonce, so a device checks a *fresh* report against its measurement
//! allow-list before it seals anything to the enclave's key. The model
//! download is binary (no base64 for a 6.65 MB model): a length-prefixed
//! [`ModelDownload`] header followed by the safetensors bytes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::attestation::AttestationReport;
use crate::error::{ProtocolError, Result};
use crate::model::ModelCertificate;
use crate::update_encoding::UpdateEncoding;
use crate::wire::b64_array;

/// Local training settings a round asks devices to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TrainingPlan {
    /// SGD learning rate.
    pub learning_rate: f64,
    /// Minibatch size (B).
    pub batch_size: usize,
    /// Local epochs (E).
    pub epochs: usize,
}

/// `POST /v1/rounds/current` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoundQuery {
    /// A fresh nonce for the enclave's attestation report, when the device
    /// wants one (it should before sealing an update).
    #[serde(default, with = "option_nonce")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub nonce: Option<[u8; 32]>,
    /// A long poll: hold the answer while it would still be this one (the
    /// device's last answer), up to `max_wait_secs` and the server's own
    /// `federation.long_poll_secs`. Absent: answer at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_while: Option<RoundPosition>,
}

/// Where a device stands, as a long poll waits for it to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoundPosition {
    /// The status last seen.
    pub status: RoundStatus,
    /// The round last seen, if any.
    pub round_id: Option<u64>,
    /// The longest the device will wait for a change, in seconds.
    pub max_wait_secs: u64,
}

impl RoundPosition {
    /// The position `info` shows, to wait on for at most `max_wait_secs`.
    pub fn of(info: &RoundInfo, max_wait_secs: u64) -> Self {
        Self {
            status: info.status,
            round_id: info.round_id,
            max_wait_secs,
        }
    }

    /// True while `info` still shows this position.
    pub fn unchanged_in(&self, info: &RoundInfo) -> bool {
        self.status == info.status && self.round_id == info.round_id
    }
}

mod option_nonce {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct Wrapped(#[serde(with = "crate::wire::b64_array")] [u8; 32]);

    pub fn serialize<S: Serializer>(
        value: &Option<[u8; 32]>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.map(Wrapped).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<[u8; 32]>, D::Error> {
        Ok(Option::<Wrapped>::deserialize(deserializer)?.map(|w| w.0))
    }
}

/// Where the federation stands, from one device's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RoundStatus {
    /// No round is open; poll again later.
    Waiting,
    /// A round is open and this device is selected and has not submitted.
    Train,
    /// A round is open but this device is not in it.
    NotSelected,
    /// This device has already submitted to the open round.
    Submitted,
    /// Training has finished; the device can stop.
    Finished,
}

/// `POST /v1/rounds/current` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RoundInfo {
    /// What the device should do.
    pub status: RoundStatus,
    /// The open round, if any.
    pub round_id: Option<u64>,
    /// The model version devices must train from.
    pub model_version: Option<u64>,
    /// The model architecture.
    pub architecture: Option<String>,
    /// Local training settings.
    pub training: Option<TrainingPlan>,
    /// How the device must encode its update (`f32` when absent).
    #[serde(default, skip_serializing_if = "UpdateEncoding::is_f32")]
    pub update_encoding: UpdateEncoding,
    /// Unix seconds after which submissions are refused.
    pub deadline: Option<u64>,
    /// The enclave's report for the device's nonce when the answer needs one (`train`,
    /// `finished`); none otherwise; the boot's report when the query carries no nonce.
    pub report: Option<AttestationReport>,
    /// Seconds the device should wait before asking again.
    pub poll_after_secs: u64,
}

/// `POST /v1/models/current` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelQuery {}

/// The header of a model download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ModelDownload {
    /// The enclave's certificate of the bytes that follow.
    pub certificate: ModelCertificate,
    /// The enclave key that signed it (must match the attested report's).
    #[serde(with = "b64_array")]
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[A-Za-z0-9_-]*$", content_encoding = "base64url"))]
    pub enclave_key_sha256: [u8; 32],
}

/// Encodes a download: `u32 BE header length | header JSON | model bytes`.
pub fn encode_model_download(header: &ModelDownload, model: &[u8]) -> Result<Vec<u8>> {
    let header = crate::wire::encode(header)?;
    let mut out = Vec::with_capacity(4 + header.len() + model.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(model);
    Ok(out)
}

/// Splits a download into its header and model bytes.
pub fn decode_model_download(bytes: &[u8]) -> Result<(ModelDownload, &[u8])> {
    if bytes.len() < 4 {
        return Err(ProtocolError::malformed("model download", "truncated"));
    }
    let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
    let rest = &bytes[4..];
    if len > rest.len() || len > crate::wire::limits::MODEL_CERTIFICATE {
        return Err(ProtocolError::malformed(
            "model download",
            "header length out of range",
        ));
    }
    let (header, model) = rest.split_at(len);
    let header = crate::wire::decode(
        "model download header",
        header,
        crate::wire::limits::MODEL_CERTIFICATE,
    )?;
    Ok((header, model))
}

/// Most metrics in one evaluation report.
pub const MAX_METRICS: usize = 32;
/// Longest metric name.
pub const MAX_METRIC_NAME_LEN: usize = 64;

/// `POST /v1/evaluations` body: a device's evaluation of the global model of
/// `model_version`: the one round `round_id` started from, or, once that
/// round completed, the one it produced (how the last model of a federation
/// is evaluated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EvaluationReport {
    /// The round the model was distributed for.
    pub round_id: u64,
    /// The evaluated model version (the round's base model or its result).
    pub model_version: u64,
    /// Held-out examples evaluated on: the metrics' weight.
    pub examples: u64,
    /// Named scalars, e.g. `loss` and `accuracy`.
    pub metrics: BTreeMap<String, f64>,
}

impl EvaluationReport {
    /// Checks what the types cannot: a positive example count, 1 to
    /// [`MAX_METRICS`] metrics, names of 1 to [`MAX_METRIC_NAME_LEN`]
    /// characters of `a-z A-Z 0-9 . _ / -`, and finite values.
    pub fn validate(&self) -> Result<()> {
        const WHAT: &str = "evaluation report";
        if self.examples == 0 {
            return Err(ProtocolError::malformed(WHAT, "zero examples"));
        }
        if self.metrics.is_empty() || self.metrics.len() > MAX_METRICS {
            return Err(ProtocolError::malformed(WHAT, "1 to 32 metrics"));
        }
        for (name, value) in &self.metrics {
            let name_ok = !name.is_empty()
                && name.len() <= MAX_METRIC_NAME_LEN
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
            if !name_ok {
                return Err(ProtocolError::malformed(
                    WHAT,
                    "metric names are 1 to 64 characters of A-Z a-z 0-9 . _ / -",
                ));
            }
            if !value.is_finite() {
                return Err(ProtocolError::malformed(
                    WHAT,
                    format!("metric {name} is not finite"),
                ));
            }
        }
        Ok(())
    }
}

/// `POST /v1/evaluations` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EvaluationReceipt {
    /// The model version the report was recorded for.
    pub model_version: u64,
}

/// `POST /v1/updates/admission`: may this device send its update now? Asked
/// before the body goes, so a server at its upload budget refuses a small
/// request instead of a model-sized one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UploadAdmissionRequest {
    /// The round the update is for.
    pub round_id: u64,
    /// The sealed record's length in bytes (what `POST /v1/updates` will carry).
    pub bytes: u64,
}

/// `POST /v1/updates/admission` answer: the device's place and bytes are
/// held for its upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct UploadAdmission {
    /// Seconds the place is held; an upload after them is admitted afresh.
    pub expires_in_secs: u64,
}

/// `POST /v1/updates` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SubmitReceipt {
    /// The round.
    pub round_id: u64,
    /// `accepted` (folded in), `pending` (the defense decides when the round
    /// closes) or `rejected`.
    pub status: String,
    /// The enclave's reason code.
    pub code: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluation_reports_are_checked() {
        let good = EvaluationReport {
            round_id: 2,
            model_version: 1,
            examples: 100,
            metrics: BTreeMap::from([("accuracy".into(), 0.5), ("loss".into(), 1.25)]),
        };
        good.validate().unwrap();
        let mut bad = good.clone();
        bad.examples = 0;
        assert!(bad.validate().is_err());
        let mut bad = good.clone();
        bad.metrics.insert("nan".into(), f64::NAN);
        assert!(bad.validate().unwrap_err().to_string().contains("nan"));
        let mut bad = good.clone();
        bad.metrics.insert("with space".into(), 1.0);
        assert!(bad.validate().is_err());
        let mut bad = good;
        bad.metrics.clear();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn download_round_trip_and_truncation() {
        let header = ModelDownload {
            certificate: ModelCertificate {
                version: 1,
                architecture: "mnist-2nn".into(),
                model_version: 3,
                round_id: 3,
                model_sha256: [1; 32],
                signature: vec![2; 10],
            },
            enclave_key_sha256: [3; 32],
        };
        let bytes = encode_model_download(&header, b"weights").unwrap();
        let (back, model) = decode_model_download(&bytes).unwrap();
        assert_eq!(back, header);
        assert_eq!(model, b"weights");
        assert!(decode_model_download(&bytes[..3]).is_err());
        let mut lying = bytes.clone();
        lying[0] = 0xff;
        assert!(decode_model_download(&lying).is_err());
        let query: RoundQuery =
            serde_json::from_str(r#"{"nonce":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#)
                .unwrap();
        assert_eq!(query.nonce, Some([0; 32]));
        assert_eq!(
            serde_json::from_str::<RoundQuery>("{}").unwrap().nonce,
            None
        );
    }
}

//! Column decoding and integer-range checks shared by both backends.
//!
//! Both schemas use the same column names and store every integer as a signed 64-bit value, so one
//! set of row mappers, written against the small [`Col`] trait, serves SQLite and PostgreSQL rows.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::error::backend;
use crate::{
    AuditEntry, CheckpointRecord, DeviceKeys, DeviceRecord, EvaluationRecord, EvaluationSummary,
    ModelRecord, ModelSummary, ParticipantRecord, RoundRecord, SessionRecord, StoreError,
    TokenRecord,
};

/// Typed column access returning [`StoreError`], implemented for every sqlx row type whose
/// database decodes the handful of Rust types the schema uses.
pub(crate) trait Col {
    fn i64(&self, name: &str) -> Result<i64, StoreError>;
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, StoreError>;
    fn text(&self, name: &str) -> Result<String, StoreError>;
    fn opt_text(&self, name: &str) -> Result<Option<String>, StoreError>;
    fn bytes(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    fn opt_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn f64(&self, name: &str) -> Result<f64, StoreError>;
    fn opt_f64(&self, name: &str) -> Result<Option<f64>, StoreError>;

    fn u64(&self, name: &str) -> Result<u64, StoreError> {
        let value = self.i64(name)?;
        u64::try_from(value)
            .map_err(|_| StoreError::Corrupt(format!("column {name} holds negative value {value}")))
    }

    fn u32(&self, name: &str) -> Result<u32, StoreError> {
        let value = self.i64(name)?;
        u32::try_from(value)
            .map_err(|_| StoreError::Corrupt(format!("column {name} holds {value}, not a u32")))
    }
}

impl<R> Col for R
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> f64: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    fn i64(&self, name: &str) -> Result<i64, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn opt_i64(&self, name: &str) -> Result<Option<i64>, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn text(&self, name: &str) -> Result<String, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn opt_text(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn bytes(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn opt_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn f64(&self, name: &str) -> Result<f64, StoreError> {
        self.try_get(name).map_err(backend)
    }
    fn opt_f64(&self, name: &str) -> Result<Option<f64>, StoreError> {
        self.try_get(name).map_err(backend)
    }
}

/// Converts a `u64` for storage; both backends hold signed 64-bit integers, and wrapping a large
/// value into a negative one would silently corrupt ordering and comparisons.
pub(crate) fn db_int(value: u64, field: &'static str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange(field))
}

/// Checks what [`EvaluationRecord`] promises before anything is written: at least one example
/// (else the weighted mean would divide by zero), finite values (SQLite would store NaN as NULL),
/// and metric names that are unique (one row per metric).
pub(crate) fn check_evaluation(evaluation: &EvaluationRecord) -> Result<(), StoreError> {
    if evaluation.examples == 0 {
        return Err(StoreError::OutOfRange("evaluation examples must be > 0"));
    }
    db_int(evaluation.examples, "evaluation examples")?;
    db_int(evaluation.model_version, "model version")?;
    db_int(evaluation.round_id, "evaluation round id")?;
    for (i, (name, value)) in evaluation.metrics.iter().enumerate() {
        if !value.is_finite() {
            return Err(StoreError::OutOfRange(
                "evaluation metric values must be finite",
            ));
        }
        if evaluation.metrics[..i]
            .iter()
            .any(|(earlier, _)| earlier == name)
        {
            return Err(StoreError::Conflict("evaluation metric"));
        }
    }
    Ok(())
}

pub(crate) fn token(row: &impl Col) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: row.text("id")?,
        hash: row.text("hash")?,
        label: row.text("label")?,
        created_at: row.i64("created_at")?,
        expires_at: row.i64("expires_at")?,
        used_at: row.opt_i64("used_at")?,
        used_by: row.opt_text("used_by")?,
        revoked_at: row.opt_i64("revoked_at")?,
    })
}

pub(crate) fn device(row: &impl Col) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        id: row.text("id")?,
        name: row.text("name")?,
        keys: DeviceKeys {
            kem_suite: row.text("kem_suite")?,
            kem_public_key: row.bytes("kem_public_key")?,
            signature_suite: row.text("signature_suite")?,
            verifying_key: row.bytes("verifying_key")?,
        },
        enrolled_at: row.i64("enrolled_at")?,
        revoked_at: row.opt_i64("revoked_at")?,
        last_seen_at: row.opt_i64("last_seen_at")?,
        key_version: row.u32("key_version")?,
        token_id: row.opt_text("token_id")?,
    })
}

pub(crate) fn session(row: &impl Col) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord {
        id: row.text("id")?,
        device_id: row.text("device_id")?,
        state: row.text("state")?.parse()?,
        client_nonce: row.bytes("client_nonce")?,
        sealed_state: row.bytes("sealed_state")?,
        created_at: row.i64("created_at")?,
        confirm_deadline: row.i64("confirm_deadline")?,
        expires_at: row.i64("expires_at")?,
        last_seq: row.u64("last_seq")?,
    })
}

pub(crate) fn round(row: &impl Col) -> Result<RoundRecord, StoreError> {
    Ok(RoundRecord {
        id: row.u64("id")?,
        state: row.text("state")?.parse()?,
        base_model_version: row.u64("base_model_version")?,
        config_json: row.text("config_json")?,
        min_updates: row.u32("min_updates")?,
        target_updates: row.u32("target_updates")?,
        opened_at: row.i64("opened_at")?,
        deadline: row.i64("deadline")?,
        closed_at: row.opt_i64("closed_at")?,
        attempt: row.u32("attempt")?,
        outcome_json: row.opt_text("outcome_json")?,
    })
}

pub(crate) fn participant(row: &impl Col) -> Result<ParticipantRecord, StoreError> {
    Ok(ParticipantRecord {
        round_id: row.u64("round_id")?,
        device_id: row.text("device_id")?,
        submitted_at: row.opt_i64("submitted_at")?,
        envelope: row.opt_bytes("envelope")?,
        verdict: row.opt_text("verdict")?,
        reason: row.opt_text("reason")?,
    })
}

pub(crate) fn model(row: &impl Col) -> Result<ModelRecord, StoreError> {
    Ok(ModelRecord {
        version: row.u64("version")?,
        round_id: row.u64("round_id")?,
        architecture: row.text("architecture")?,
        bytes: row.bytes("bytes")?,
        certificate_json: row.text("certificate_json")?,
        created_at: row.i64("created_at")?,
        accuracy: row.opt_f64("accuracy")?,
        loss: row.opt_f64("loss")?,
    })
}

pub(crate) fn model_summary(row: &impl Col) -> Result<ModelSummary, StoreError> {
    Ok(ModelSummary {
        version: row.u64("version")?,
        round_id: row.u64("round_id")?,
        architecture: row.text("architecture")?,
        created_at: row.i64("created_at")?,
        accuracy: row.opt_f64("accuracy")?,
        loss: row.opt_f64("loss")?,
    })
}

pub(crate) fn evaluation_summary(row: &impl Col) -> Result<EvaluationSummary, StoreError> {
    Ok(EvaluationSummary {
        model_version: row.u64("model_version")?,
        metric: row.text("metric")?,
        mean: row.f64("mean")?,
        examples: row.u64("examples")?,
        devices: row.u64("devices")?,
    })
}

pub(crate) fn audit_entry(row: &impl Col) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        seq: row.u64("seq")?,
        at: row.i64("at")?,
        kind: row.text("kind")?,
        actor: row.text("actor")?,
        subject: row.text("subject")?,
        detail_json: row.text("detail_json")?,
        prev_hash: row.text("prev_hash")?,
        hash: row.text("hash")?,
    })
}

pub(crate) fn checkpoint(row: &impl Col) -> Result<CheckpointRecord, StoreError> {
    Ok(CheckpointRecord {
        seq: row.u64("seq")?,
        head_hash: row.text("head_hash")?,
        signature: row.bytes("signature")?,
        signer_key: row.bytes("signer_key")?,
        created_at: row.i64("created_at")?,
    })
}

/// Maps a list of rows, failing on the first that does not decode.
pub(crate) fn all<R: Col, T>(
    rows: &[R],
    map: impl Fn(&R) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    rows.iter().map(map).collect()
}

/// Decides why a token that the conditional consume did not match was refused. The consume's
/// `WHERE` requires "unused, unrevoked, unexpired", so if the token exists and is neither used nor
/// revoked, expiry is the only remaining reason.
pub(crate) fn token_rejection(row: Option<&impl Col>) -> Result<StoreError, StoreError> {
    use crate::TokenRejection as R;
    let reason = match row {
        None => R::Unknown,
        Some(row) if row.opt_i64("used_at")?.is_some() => R::AlreadyUsed,
        Some(row) if row.opt_i64("revoked_at")?.is_some() => R::Revoked,
        Some(_) => R::Expired,
    };
    Ok(StoreError::TokenRejected(reason))
}

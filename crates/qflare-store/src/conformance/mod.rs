//! One behavioural test suite for every [`Store`] implementation.
//!
//! Each check takes a freshly opened, empty store and asserts real outcomes, panicking on a
//! violated expectation and returning `Err` only when a store call fails unexpectedly. They are
//! public so that `tests/conformance.rs` can run them against both backends and other crates (the
//! server's tests) can run them against whatever store they build. Checks that need to reopen a
//! store or to bypass the API take a closure for that.
//!
//! The checks are grouped by concern in submodules (`enrollment`, `sessions`, `rounds`, `models`,
//! `audit`, `coordination`, `robustness`) and re-exported here; this module holds the fixtures they share.

mod audit;
mod coordination;
mod enrollment;
mod models;
mod robustness;
mod rounds;
mod sessions;

pub use audit::{audit_chain, checkpoints};
pub use coordination::{coordinator_lease, lease_race, training_control};
pub use enrollment::{
    concurrent_enrollment, concurrent_enrollment_across_stores, devices, token_lifecycle,
};
pub use models::{evaluations, models};
pub use robustness::{corrupt_values_are_reported, out_of_range_values, persists_across_reopen};
pub use rounds::{closed_envelopes, rounds, submissions};
pub use sessions::{concurrent_sequence_advance, sessions};

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use crate::{
    AuditDraft, AuditEntry, DeviceKeys, DeviceRecord, ModelRecord, NewDevice, RoundRecord,
    RoundState, SessionRecord, SessionState, Store, StoreError, TokenRecord, TokenRejection,
};

/// A deterministic stand-in for the server's SHA-256 link function: the checks only need the
/// chain to depend on `(seq, prev_hash, draft)`, not cryptographic strength.
pub fn test_link(seq: u64, prev_hash: &str, draft: &AuditDraft) -> String {
    let mut hasher = DefaultHasher::new();
    (seq, prev_hash, &draft.kind, &draft.actor, &draft.subject).hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

fn keys(tag: u8) -> DeviceKeys {
    DeviceKeys {
        kem_suite: "ML-KEM-768".to_owned(),
        kem_public_key: vec![tag; 1184],
        signature_suite: "ML-DSA-65".to_owned(),
        verifying_key: vec![tag.wrapping_add(1); 1952],
    }
}

fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        name: format!("name of {id}"),
        keys: keys(id.len() as u8),
    }
}

fn token(id: &str, hash: &str, created_at: i64, expires_at: i64) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        hash: hash.to_owned(),
        label: format!("label of {id}"),
        created_at,
        expires_at,
        used_at: None,
        used_by: None,
        revoked_at: None,
    }
}

/// Enrolls `id` through a token of its own.
async fn enroll(store: &Arc<dyn Store>, id: &str, now: i64) -> Result<DeviceRecord, StoreError> {
    let hash = format!("hash-for-{id}");
    store
        .create_token(&token(&format!("token-for-{id}"), &hash, now, now + 3600))
        .await?;
    store.enroll_with_token(&hash, now, &new_device(id)).await
}

fn session(id: &str, device_id: &str, nonce: u8, created_at: i64) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        device_id: device_id.to_owned(),
        state: SessionState::Pending,
        client_nonce: vec![nonce; 32],
        sealed_state: vec![0xaa; 48],
        created_at,
        confirm_deadline: created_at + 30,
        expires_at: created_at + 900,
        last_seq: 0,
    }
}

fn round(id: u64, opened_at: i64, deadline: i64) -> RoundRecord {
    RoundRecord {
        id,
        state: RoundState::Open,
        base_model_version: id.saturating_sub(1),
        config_json: format!(r#"{{"round":{id},"local_epochs":1}}"#),
        min_updates: 1,
        target_updates: 2,
        opened_at,
        deadline,
        closed_at: None,
        attempt: 1,
        outcome_json: None,
    }
}

fn model(version: u64, created_at: i64) -> ModelRecord {
    ModelRecord {
        version,
        round_id: version.saturating_sub(1),
        architecture: "mnist-2nn".to_owned(),
        bytes: vec![version as u8; 64],
        certificate_json: format!(r#"{{"version":{version}}}"#),
        created_at,
        accuracy: None,
        loss: None,
    }
}

fn draft(at: i64, actor: &str, subject: &str) -> AuditDraft {
    AuditDraft {
        at,
        kind: "test.event".to_owned(),
        actor: actor.to_owned(),
        subject: subject.to_owned(),
        detail_json: format!(r#"{{"subject":"{subject}"}}"#),
    }
}

fn is_rejection(result: &Result<DeviceRecord, StoreError>, expected: TokenRejection) -> bool {
    matches!(result, Err(StoreError::TokenRejected(reason)) if *reason == expected)
}

/// Asserts that `entries` continue a chain whose head was `(seq, hash)` without gaps or forks.
fn assert_chain(entries: &[AuditEntry], mut seq: u64, hash: &str) {
    let mut prev = hash.to_owned();
    for entry in entries {
        seq += 1;
        assert_eq!(entry.seq, seq, "gap-free sequence");
        assert_eq!(
            entry.prev_hash, prev,
            "entry {seq} links to its predecessor"
        );
        let recomputed = test_link(
            entry.seq,
            &entry.prev_hash,
            &draft(entry.at, &entry.actor, &entry.subject),
        );
        assert_eq!(entry.hash, recomputed, "entry {seq} hash");
        prev.clone_from(&entry.hash);
    }
}

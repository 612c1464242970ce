//! The tamper-evident audit ledger.
//!
//! Every security event is appended as an entry whose hash covers its
//! sequence number, the previous entry's hash, and its content:
//!
//! ```text
//! hash_n = SHA-384 transcript("audit/entry"; seq, prev = hash_{n-1}, at, kind, actor, subject, detail)
//! ```
//!
//! so changing, inserting or deleting any entry breaks every later link.
//! Every `checkpoint_every` entries the server signs the chain head with its
//! ML-DSA key; an attacker with write access to the database but not to the
//! key cannot rewrite history past the last checkpoint and re-sign it.
//! [`verify`] recomputes the chain and checks each checkpoint, naming the
//! first entry that does not hold. The store serializes appends (one chain
//! even across replicas sharing PostgreSQL).

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use qflare_protocol::crypto::sha256;
use qflare_protocol::sig::{SigningKey, VerifyingKey};
use qflare_protocol::transcript::{Domain, Transcript};
use qflare_store::{AuditDraft, AuditEntry, CheckpointRecord, Store, StoreError};
use serde_json::Value;

use crate::clock::Clock;

/// The hash a chain starts from.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The kinds of security event the ledger records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    /// An admin created an enrollment token.
    TokenCreated,
    /// A token was consumed by an enrollment.
    TokenUsed,
    /// An admin revoked a token.
    TokenRevoked,
    /// An enrollment attempt was refused.
    EnrollmentRefused,
    /// A device enrolled.
    DeviceEnrolled,
    /// A session was established.
    SessionOpened,
    /// A handshake was refused.
    SessionRefused,
    /// An admin revoked a device.
    DeviceRevoked,
    /// A device replaced its keys.
    KeyRotated,
    /// A round was opened.
    RoundOpened,
    /// An update was accepted into a round.
    UpdateAccepted,
    /// An update was refused, by the host or the enclave.
    UpdateRejected,
    /// A round was aggregated into a new global model.
    RoundAggregated,
    /// A round failed and will be retried or abandoned.
    RoundFailed,
    /// An open round was begun again in a new enclave boot (after the
    /// server or the enclave restarted); its devices submit again.
    RoundResumed,
    /// The enclave process was (re)started and attested.
    EnclaveAttested,
    /// The server started under a key its predecessor handed over to.
    ServerKeyRotated,
    /// A restarted enclave endorsed a model a previous boot certified.
    ModelRecertified,
    /// An admin registered the federation's initial model from a file.
    ModelRegistered,
    /// A replica took the coordinator lease (it runs the round controller
    /// and the enclave from now on).
    CoordinatorElected,
    /// Central DP: the next round would take ε past the configured budget,
    /// so no more rounds open.
    PrivacyBudgetReached,
}

impl AuditKind {
    /// The stable name stored in the ledger.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TokenCreated => "token_created",
            Self::ModelRegistered => "model_registered",
            Self::TokenUsed => "token_used",
            Self::TokenRevoked => "token_revoked",
            Self::EnrollmentRefused => "enrollment_refused",
            Self::DeviceEnrolled => "device_enrolled",
            Self::SessionOpened => "session_opened",
            Self::SessionRefused => "session_refused",
            Self::DeviceRevoked => "device_revoked",
            Self::KeyRotated => "key_rotated",
            Self::RoundOpened => "round_opened",
            Self::UpdateAccepted => "update_accepted",
            Self::UpdateRejected => "update_rejected",
            Self::RoundAggregated => "round_aggregated",
            Self::RoundFailed => "round_failed",
            Self::RoundResumed => "round_resumed",
            Self::EnclaveAttested => "enclave_attested",
            Self::ModelRecertified => "model_recertified",
            Self::ServerKeyRotated => "server_key_rotated",
            Self::CoordinatorElected => "coordinator_elected",
            Self::PrivacyBudgetReached => "privacy_budget_reached",
        }
    }
}

/// The hash of entry `seq` following `prev_hash`.
pub fn entry_hash(seq: u64, prev_hash: &str, draft: &AuditDraft) -> String {
    let mut t = Transcript::new(Domain::LedgerEntry);
    t.append_u64("seq", seq)
        .append("prev_hash", prev_hash.as_bytes())
        .append("at", &draft.at.to_be_bytes())
        .append("kind", draft.kind.as_bytes())
        .append("actor", draft.actor.as_bytes())
        .append("subject", draft.subject.as_bytes())
        .append("detail", draft.detail_json.as_bytes());
    hex::encode(t.hash().as_bytes())
}

fn checkpoint_message(seq: u64, head_hash: &str) -> Vec<u8> {
    let mut t = Transcript::new(Domain::LedgerCheckpoint);
    t.append_u64("seq", seq)
        .append("head_hash", head_hash.as_bytes());
    t.hash().as_bytes().to_vec()
}

/// Appends entries and signs checkpoints.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Arc<dyn Store>,
    signing_key: Arc<SigningKey>,
    checkpoint_every: u64,
}

impl Ledger {
    /// A ledger over `store`, checkpointed by `signing_key`.
    pub fn new(store: Arc<dyn Store>, signing_key: Arc<SigningKey>, checkpoint_every: u64) -> Self {
        Self {
            store,
            signing_key,
            checkpoint_every: checkpoint_every.max(1),
        }
    }

    /// Records an event. A failure is logged and returned; callers that have
    /// already committed the action they audit log it and carry on.
    pub async fn record(
        &self,
        kind: AuditKind,
        actor: &str,
        subject: &str,
        detail: Value,
        at: u64,
    ) -> Result<AuditEntry, StoreError> {
        let draft = AuditDraft {
            at: i64::try_from(at).unwrap_or(i64::MAX),
            kind: kind.as_str().to_owned(),
            actor: actor.to_owned(),
            subject: subject.to_owned(),
            detail_json: detail.to_string(),
        };
        let link = |seq: u64, prev: &str, draft: &AuditDraft| entry_hash(seq, prev, draft);
        let entry = match self.store.append_audit(&draft, &link).await {
            Ok(entry) => entry,
            Err(err) => {
                tracing::error!(kind = kind.as_str(), %err, "audit append failed");
                return Err(err);
            }
        };
        if entry.seq % self.checkpoint_every == 0 {
            self.checkpoint(&entry).await?;
        }
        Ok(entry)
    }

    /// Records the first start under a rotated server key, once: the entry
    /// names both keys, and a checkpoint signed by the new key follows it at
    /// once, which is also how a later start knows it is recorded. Every
    /// replica that starts under the new key before that checkpoint exists
    /// records it too (harmless, and rare).
    pub async fn record_key_rotation(
        &self,
        handovers: &[qflare_protocol::handover::ServerKeyHandover],
        at: u64,
    ) -> Result<(), StoreError> {
        let Some(last) = handovers.last() else {
            return Ok(());
        };
        let current = self.signing_key.verifying_key().as_bytes();
        let checkpoints = self.store.checkpoints().await?;
        if checkpoints.iter().any(|c| c.signer_key == current) {
            return Ok(());
        }
        let detail = serde_json::json!({
            "old_key_sha256": hex::encode(sha256(&last.old_verifying_key)),
            "new_key_sha256": hex::encode(sha256(&last.new_verifying_key)),
            "new_certificate_sha256": hex::encode(sha256(&last.new_certificate)),
            "handed_over_at": last.issued_at,
            "chain_length": handovers.len(),
        });
        let entry = self
            .record(
                AuditKind::ServerKeyRotated,
                "server",
                &hex::encode(sha256(current)),
                detail,
                at,
            )
            .await?;
        if entry.seq % self.checkpoint_every != 0 {
            self.checkpoint(&entry).await?;
        }
        Ok(())
    }

    async fn checkpoint(&self, head: &AuditEntry) -> Result<(), StoreError> {
        let signature = self
            .signing_key
            .sign(&checkpoint_message(head.seq, &head.hash))
            .map_err(|e| StoreError::Backend(format!("checkpoint signature: {e}")))?;
        self.store
            .insert_checkpoint(&CheckpointRecord {
                seq: head.seq,
                head_hash: head.hash.clone(),
                signature,
                signer_key: self.signing_key.verifying_key().as_bytes().to_vec(),
                created_at: head.at,
            })
            .await
    }
}

/// The ledger as handlers and the round controller use it: each entry
/// stamped with the server's clock and counted in the metrics; a failed
/// append is logged (by [`Ledger::record`]) and does not undo the action
/// being audited, which has already happened.
#[derive(Debug, Clone)]
pub struct Auditor {
    ledger: Ledger,
    clock: Arc<dyn Clock>,
    appended: Counter,
}

impl Auditor {
    /// Audits into `ledger` at `clock`'s time, counting appends in `appended`.
    pub fn new(ledger: Ledger, clock: Arc<dyn Clock>, appended: Counter) -> Self {
        Self {
            ledger,
            clock,
            appended,
        }
    }

    /// Appends an entry; see the type's description for failures.
    pub async fn audit(&self, kind: AuditKind, actor: &str, subject: &str, detail: Value) {
        if self
            .ledger
            .record(kind, actor, subject, detail, self.clock.now())
            .await
            .is_ok()
        {
            self.appended.inc();
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The first entry (by sequence number) that does not hold, and why.
    pub first_bad: Option<(u64, String)>,
}

/// Recomputes the whole chain and checks every checkpoint against the
/// server's keys: the current one and those it rotated away from
/// (`ServerIdentity::key_history`).
pub async fn verify(
    store: &dyn Store,
    server_keys: &[VerifyingKey],
) -> Result<VerifyReport, StoreError> {
    let mut expected_seq = 1u64;
    let mut prev_hash = GENESIS_HASH.to_owned();
    let mut hashes = std::collections::HashMap::new();
    let mut first_bad = None;
    let mut after = 0u64;
    'pages: loop {
        let page = store.audit_entries(after, 1000).await?;
        if page.is_empty() {
            break;
        }
        for entry in &page {
            after = entry.seq;
            let problem = if entry.seq != expected_seq {
                Some(format!(
                    "expected entry {expected_seq}, found {} (an entry is missing)",
                    entry.seq
                ))
            } else if entry.prev_hash != prev_hash {
                Some("its link to the previous entry is broken".to_owned())
            } else {
                let draft = AuditDraft {
                    at: entry.at,
                    kind: entry.kind.clone(),
                    actor: entry.actor.clone(),
                    subject: entry.subject.clone(),
                    detail_json: entry.detail_json.clone(),
                };
                (entry_hash(entry.seq, &entry.prev_hash, &draft) != entry.hash)
                    .then(|| "its content does not match its hash (edited)".to_owned())
            };
            if let Some(reason) = problem {
                first_bad = Some((expected_seq.min(entry.seq), reason));
                break 'pages;
            }
            hashes.insert(entry.seq, entry.hash.clone());
            prev_hash = entry.hash.clone();
            expected_seq += 1;
        }
    }
    let entries = expected_seq - 1;
    let checkpoints = store.checkpoints().await?;
    for checkpoint in &checkpoints {
        let signer = server_keys
            .iter()
            .find(|key| key.as_bytes() == checkpoint.signer_key.as_slice());
        let reason = match signer {
            None => Some("checkpoint signed by another key"),
            Some(key)
                if key
                    .verify(
                        &checkpoint_message(checkpoint.seq, &checkpoint.head_hash),
                        &checkpoint.signature,
                        "audit checkpoint",
                    )
                    .is_err() =>
            {
                Some("checkpoint signature does not verify")
            }
            Some(_)
                if first_bad.is_none()
                    && hashes.get(&checkpoint.seq) != Some(&checkpoint.head_hash) =>
            {
                Some("checkpoint does not match the chain (history rewritten)")
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            let candidate = (checkpoint.seq, reason.to_owned());
            if first_bad.as_ref().is_none_or(|(seq, _)| candidate.0 < *seq) {
                first_bad = Some(candidate);
            }
        }
    }
    Ok(VerifyReport {
        entries,
        checkpoints: checkpoints.len() as u64,
        first_bad,
    })
}

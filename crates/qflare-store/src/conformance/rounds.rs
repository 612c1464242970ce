//! Checks of rounds: creation, ordering, state compare-and-set, verdicts, re-opening, every
//! submission outcome, and deleting the envelopes of closed rounds.

use std::sync::Arc;

use super::{enroll, round};
use crate::{
    ParticipantRecord, RoundRecord, RoundState, Store, StoreError, SubmissionOutcome, VerdictRecord,
};

/// Round creation, ordering, compare-and-set transitions, verdicts and re-opening.
pub async fn rounds(store: Arc<dyn Store>) -> Result<(), StoreError> {
    for id in ["r1", "r2", "r3"] {
        enroll(&store, id, 0).await?;
    }
    assert_eq!(store.latest_round().await?, None);
    let selected = ["r2".to_owned(), "r1".to_owned()];
    let first = round(1, 10, 1000);
    store.create_round(&first, &selected).await?;
    assert!(matches!(
        store.create_round(&round(1, 11, 1000), &[]).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .create_round(&round(99, 11, 1000), &["r1".to_owned(), "ghost".to_owned()])
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        store.get_round(99).await?,
        None,
        "failed creation rolled back"
    );
    assert_eq!(store.get_round(1).await?, Some(first.clone()));
    let participants = store.participants(1).await?;
    let ids: Vec<&str> = participants.iter().map(|p| p.device_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"]);
    assert!(participants.iter().all(|p| p.round_id == 1
        && p.submitted_at.is_none()
        && p.envelope.is_none()
        && p.verdict.is_none()));

    store
        .create_round(&round(3, 20, 1000), &selected[..1])
        .await?;
    store.create_round(&round(2, 30, 1000), &[]).await?;
    assert_eq!(store.latest_round().await?.map(|r| r.id), Some(3));
    let ids: Vec<u64> = store.list_rounds(10).await?.iter().map(|r| r.id).collect();
    assert_eq!(ids, [3, 2, 1]);
    let ids: Vec<u64> = store.list_rounds(2).await?.iter().map(|r| r.id).collect();
    assert_eq!(ids, [3, 2]);

    let stored = SubmissionOutcome::Stored;
    assert_eq!(
        store.record_submission(1, "r1", b"env-1", 100).await?,
        stored
    );
    assert_eq!(
        store.record_submission(1, "r2", b"env-2", 101).await?,
        stored
    );

    use RoundState::*;
    assert!(
        !store
            .transition_round(1, Aggregating, Completed, 300, None)
            .await?
    );
    assert!(
        store
            .transition_round(1, Open, Aggregating, 300, None)
            .await?
    );
    assert!(
        !store
            .transition_round(1, Open, Aggregating, 301, None)
            .await?,
        "CAS lost"
    );
    assert!(
        !store
            .transition_round(42, Open, Aggregating, 301, None)
            .await?
    );
    let aggregating = store.get_round(1).await?.expect("round 1");
    assert_eq!(
        (aggregating.state, aggregating.closed_at),
        (Aggregating, None)
    );

    let verdicts = [
        VerdictRecord {
            device_id: "r1".to_owned(),
            verdict: "accepted".to_owned(),
            reason: None,
        },
        VerdictRecord {
            device_id: "r2".to_owned(),
            verdict: "rejected".to_owned(),
            reason: Some("norm bound".to_owned()),
        },
    ];
    store.set_verdicts(1, &verdicts).await?;
    let bogus = [
        VerdictRecord {
            device_id: "r1".to_owned(),
            verdict: "rejected".to_owned(),
            reason: None,
        },
        VerdictRecord {
            device_id: "r3".to_owned(),
            verdict: "accepted".to_owned(),
            reason: None,
        },
    ];
    assert!(matches!(
        store.set_verdicts(1, &bogus).await,
        Err(StoreError::NotFound(_))
    ));
    let participants = store.participants(1).await?;
    let seen: Vec<(Option<&str>, Option<&str>)> = participants
        .iter()
        .map(|p| (p.verdict.as_deref(), p.reason.as_deref()))
        .collect();
    assert_eq!(
        seen,
        [
            (Some("accepted"), None),
            (Some("rejected"), Some("norm bound"))
        ]
    );
    // The same rows without their envelopes, for the poll path.
    let states = store.participant_states(1).await?;
    let expected: Vec<ParticipantRecord> = participants
        .iter()
        .cloned()
        .map(|p| ParticipantRecord {
            envelope: None,
            ..p
        })
        .collect();
    assert_eq!(states, expected);
    assert!(participants.iter().any(|p| p.envelope.is_some()));
    for participant in &expected {
        assert_eq!(
            store
                .participant_state(1, &participant.device_id)
                .await?
                .as_ref(),
            Some(participant)
        );
    }
    assert_eq!(store.participant_state(1, "not-selected").await?, None);
    assert_eq!(
        store.participant_state(99, &expected[0].device_id).await?,
        None
    );

    // An interrupted aggregation resumes in a new enclave boot: the same round and devices,
    // every submission cleared (its envelope was sealed to keys that are gone).
    assert!(store.reopen_round(1, 2000, 500).await?);
    let reopened = store.get_round(1).await?.expect("round 1");
    assert_eq!(
        reopened,
        RoundRecord {
            state: Open,
            attempt: 2,
            opened_at: 500,
            deadline: 2000,
            closed_at: None,
            outcome_json: None,
            ..first.clone()
        }
    );
    let participants = store.participants(1).await?;
    let ids: Vec<&str> = participants.iter().map(|p| p.device_id.as_str()).collect();
    assert_eq!(ids, ["r1", "r2"], "the same devices");
    assert!(
        participants.iter().all(|p| p.submitted_at.is_none()
            && p.envelope.is_none()
            && p.verdict.is_none()
            && p.reason.is_none()),
        "submissions cleared: {participants:?}"
    );
    assert_eq!(store.submission_count(1).await?, 0);
    assert_eq!(
        store.record_submission(1, "r1", b"env-1b", 510).await?,
        stored,
        "a device submits again"
    );
    // An open round resumes the same way (the server or the enclave restarted).
    assert!(store.reopen_round(1, 3000, 600).await?);
    let resumed = store.get_round(1).await?.expect("round 1");
    assert_eq!((resumed.state, resumed.attempt), (Open, 3));
    assert_eq!(store.submission_count(1).await?, 0);
    assert!(!store.reopen_round(42, 3000, 600).await?);

    assert_eq!(
        store.record_submission(1, "r1", b"env-1c", 610).await?,
        stored
    );
    assert!(
        store
            .transition_round(1, Open, Aggregating, 700, None)
            .await?
    );
    let outcome = r#"{"error":"enclave died"}"#;
    assert!(
        store
            .transition_round(1, Aggregating, Failed, 710, Some(outcome))
            .await?
    );
    let failed = store.get_round(1).await?.expect("round 1");
    assert_eq!((failed.state, failed.closed_at), (Failed, Some(710)));
    assert_eq!(failed.outcome_json.as_deref(), Some(outcome));
    assert!(
        !store.reopen_round(1, 4000, 720).await?,
        "failed rounds stay closed"
    );

    assert!(
        store
            .transition_round(3, Open, Aggregating, 720, None)
            .await?
    );
    let done = r#"{"model_version":1}"#;
    assert!(
        store
            .transition_round(3, Aggregating, Completed, 730, Some(done))
            .await?
    );
    let completed = store.get_round(3).await?.expect("round 3");
    assert_eq!(
        (completed.state, completed.closed_at),
        (Completed, Some(730))
    );
    assert!(
        !store.reopen_round(3, 4000, 740).await?,
        "completed rounds stay closed"
    );

    assert!(
        store
            .transition_round(2, Open, Cancelled, 800, None)
            .await?
    );
    let cancelled = store.get_round(2).await?.expect("round 2");
    assert_eq!(
        (cancelled.closed_at, cancelled.outcome_json),
        (Some(800), None)
    );
    Ok(())
}

/// Every [`SubmissionOutcome`] and the submission count.
pub async fn submissions(store: Arc<dyn Store>) -> Result<(), StoreError> {
    for id in ["p1", "p2", "p3"] {
        enroll(&store, id, 0).await?;
    }
    store
        .create_round(&round(1, 10, 1000), &["p1".to_owned(), "p2".to_owned()])
        .await?;
    assert_eq!(store.submission_count(1).await?, 0);
    let submit = |device: &'static str, envelope: &'static [u8], now: i64| {
        let store = Arc::clone(&store);
        async move { store.record_submission(1, device, envelope, now).await }
    };
    assert_eq!(
        submit("p1", b"first", 100).await?,
        SubmissionOutcome::Stored
    );
    assert_eq!(
        submit("p1", b"second", 101).await?,
        SubmissionOutcome::AlreadySubmitted
    );
    assert_eq!(
        submit("p3", b"x", 102).await?,
        SubmissionOutcome::NotSelected
    );
    assert_eq!(
        submit("ghost", b"x", 102).await?,
        SubmissionOutcome::NotSelected
    );
    assert_eq!(
        submit("p2", b"x", 1000).await?,
        SubmissionOutcome::DeadlinePassed
    );
    assert_eq!(
        store.record_submission(7, "p1", b"x", 100).await?,
        SubmissionOutcome::UnknownRound
    );
    assert_eq!(store.submission_count(1).await?, 1);
    let p1 = store
        .participants(1)
        .await?
        .into_iter()
        .find(|p| p.device_id == "p1");
    let p1 = p1.expect("p1 participates");
    assert_eq!(
        (p1.submitted_at, p1.envelope),
        (Some(100), Some(b"first".to_vec()))
    );

    assert!(
        store
            .transition_round(1, RoundState::Open, RoundState::Aggregating, 200, None)
            .await?
    );
    assert_eq!(
        submit("p2", b"late", 201).await?,
        SubmissionOutcome::RoundNotOpen
    );
    assert_eq!(store.submission_count(1).await?, 1);
    assert_eq!(store.submission_count(7).await?, 0);
    Ok(())
}

/// The envelopes of closed rounds — completed, failed or cancelled — are deleted, nothing else:
/// not the envelopes of open or aggregating rounds, not when a device submitted, not verdicts.
pub async fn closed_envelopes(store: Arc<dyn Store>) -> Result<(), StoreError> {
    use RoundState::*;
    for id in ["e1", "e2"] {
        enroll(&store, id, 0).await?;
    }
    let both = ["e1".to_owned(), "e2".to_owned()];
    for id in 1..=5 {
        store.create_round(&round(id, 10, 1000), &both).await?;
        for device in ["e1", "e2"] {
            let envelope = format!("round {id} {device}");
            assert_eq!(
                store
                    .record_submission(id, device, envelope.as_bytes(), 100)
                    .await?,
                SubmissionOutcome::Stored
            );
        }
    }
    assert!(
        store
            .transition_round(1, Open, Aggregating, 200, None)
            .await?
    );
    let verdict = VerdictRecord {
        device_id: "e1".to_owned(),
        verdict: "accepted".to_owned(),
        reason: Some("ok".to_owned()),
    };
    store
        .set_verdicts(1, std::slice::from_ref(&verdict))
        .await?;
    assert!(
        store
            .transition_round(1, Aggregating, Completed, 210, None)
            .await?
    );
    assert!(store.transition_round(2, Open, Failed, 220, None).await?);
    assert!(
        store
            .transition_round(3, Open, Cancelled, 230, None)
            .await?
    );
    assert!(
        store
            .transition_round(4, Open, Aggregating, 240, None)
            .await?
    );
    // Round 5 stays open.

    assert_eq!(store.discard_closed_envelopes().await?, 6);
    for id in 1..=5 {
        let participants = store.participants(id).await?;
        assert_eq!(participants.len(), 2);
        for p in &participants {
            assert_eq!(
                p.submitted_at,
                Some(100),
                "round {id}: the submission is still on record"
            );
            let expected = (id >= 4).then(|| format!("round {id} {}", p.device_id).into_bytes());
            assert_eq!(p.envelope, expected, "round {id}, {}", p.device_id);
        }
    }
    let e1 = store.participants(1).await?.remove(0);
    assert_eq!(
        (e1.verdict.as_deref(), e1.reason.as_deref()),
        (Some("accepted"), Some("ok")),
        "verdicts stay"
    );
    assert_eq!(store.submission_count(1).await?, 2);
    assert_eq!(store.discard_closed_envelopes().await?, 0, "idempotent");

    // Closing the aggregating round makes its envelopes go at the next call.
    assert!(
        store
            .transition_round(4, Aggregating, Failed, 300, None)
            .await?
    );
    assert_eq!(store.discard_closed_envelopes().await?, 2);
    assert!(
        store
            .participants(4)
            .await?
            .iter()
            .all(|p| p.envelope.is_none())
    );
    Ok(())
}

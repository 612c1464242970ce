//! What a device's poll (`POST /v1/rounds/current`) costs the database, with
//! 10 and with 1,000 participants that have each stored an envelope, on
//! SQLite (the PostgreSQL queries have the same shape: one indexed row each).
//!
//! * `poll`: the reads the handler makes now: the latest round, this
//!   device's participant row, the newest model's summary. None selects a
//!   blob, and each is one indexed row.
//! * `poll_reading_blobs`: the reads it made before (issue 11, item 2): every
//!   participant of the round and the latest model with its bytes, for the
//!   same answer.
//!
//! Envelopes are 256 KiB here (a real mnist-cnn one is 9 MB; the new reads
//! never touch them, the old ones read all of them), the model 6.65 MB (the
//! mnist-cnn's). The figure to look at is the ratio of the 1,000-envelope
//! time to the 10-envelope time of each, measured in the same run.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use qflare_store::{
    DeviceKeys, ModelRecord, NewDevice, RoundRecord, RoundState, Store, TokenRecord,
};

const ENVELOPE_BYTES: usize = 256 * 1024;
const MODEL_BYTES: usize = 6_653_480;

async fn seeded(store: Arc<dyn Store>, participants: usize) -> Arc<dyn Store> {
    let mut ids = Vec::with_capacity(participants);
    for i in 0..participants {
        let id = format!("{i:032x}");
        let hash = format!("hash-{id}");
        store
            .create_token(&TokenRecord {
                id: format!("t{i}"),
                hash: hash.clone(),
                label: "bench".into(),
                created_at: 0,
                expires_at: i64::MAX,
                used_at: None,
                used_by: None,
                revoked_at: None,
            })
            .await
            .expect("token");
        let device = NewDevice {
            id: id.clone(),
            name: format!("device-{i}"),
            keys: DeviceKeys {
                kem_suite: "ML-KEM-768".into(),
                kem_public_key: vec![1; 1184],
                signature_suite: "ML-DSA-65".into(),
                verifying_key: vec![2; 1952],
            },
        };
        store
            .enroll_with_token(&hash, 1, &device)
            .await
            .expect("device");
        ids.push(id);
    }
    store
        .insert_model(&ModelRecord {
            version: 0,
            round_id: 0,
            architecture: "mnist-cnn".into(),
            bytes: vec![7; MODEL_BYTES],
            certificate_json: "{}".into(),
            created_at: 1,
            accuracy: None,
            loss: None,
        })
        .await
        .expect("model");
    let round = RoundRecord {
        id: 1,
        state: RoundState::Open,
        base_model_version: 0,
        config_json: "{}".into(),
        min_updates: 1,
        target_updates: u32::try_from(participants).unwrap_or(u32::MAX),
        opened_at: 1,
        deadline: i64::MAX,
        closed_at: None,
        attempt: 1,
        outcome_json: None,
    };
    store.create_round(&round, &ids).await.expect("round");
    let envelope = vec![9; ENVELOPE_BYTES];
    for id in &ids {
        store
            .record_submission(1, id, &envelope, 2)
            .await
            .expect("envelope");
    }
    store
}

async fn poll_now(store: &dyn Store, device: &str) -> bool {
    let round = store.latest_round().await.expect("round").expect("open");
    let me = store
        .participant_state(round.id, device)
        .await
        .expect("participant");
    let model = store.latest_model_summary().await.expect("model");
    me.is_some() && model.is_some()
}

async fn poll_before(store: &dyn Store, device: &str) -> bool {
    let round = store.latest_round().await.expect("round").expect("open");
    let me = store
        .participants(round.id)
        .await
        .expect("participants")
        .into_iter()
        .find(|p| p.device_id == device);
    let model = store.latest_model().await.expect("model");
    me.is_some() && model.is_some()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut group = c.benchmark_group("poll");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for n in [10usize, 1000] {
        let url = format!(
            "sqlite://{}",
            dir.path().join(format!("poll-{n}.db")).display()
        );
        let store = runtime
            .block_on(async { seeded(qflare_store::open(&url).await.expect("sqlite"), n).await });
        // A participant in the middle of the order.
        let device = format!("{:032x}", n / 2);
        group.bench_with_input(BenchmarkId::new("poll", n), &n, |b, _| {
            b.iter(|| black_box(runtime.block_on(poll_now(store.as_ref(), &device))))
        });
        group.bench_with_input(BenchmarkId::new("poll_reading_blobs", n), &n, |b, _| {
            b.iter(|| black_box(runtime.block_on(poll_before(store.as_ref(), &device))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

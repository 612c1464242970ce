//! Checks of the global models: insertion, lookup, history order and metrics, and the devices'
//! federated evaluations of them.

use std::sync::Arc;

use super::model;
use crate::{EvaluationRecord, EvaluationSummary, ModelSummary, Store, StoreError};

/// Model insertion, lookup, history order and metrics.
pub async fn models(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(store.latest_model().await?, None);
    assert_eq!(store.latest_model_summary().await?, None);
    assert!(store.model_history().await?.is_empty());
    let mut second = model(2, 200);
    second.accuracy = Some(0.91);
    second.loss = Some(0.3);
    for m in [model(1, 100), second.clone(), model(5, 500), model(3, 300)] {
        store.insert_model(&m).await?;
    }
    assert!(matches!(
        store.insert_model(&model(2, 999)).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get_model(2).await?, Some(second.clone()));
    assert_eq!(store.get_model(4).await?, None);
    assert_eq!(store.latest_model().await?, Some(model(5, 500)));

    let history = store.model_history().await?;
    let versions: Vec<u64> = history.iter().map(|m| m.version).collect();
    assert_eq!(versions, [1, 2, 3, 5]);
    assert_eq!(store.latest_model_summary().await?.as_ref(), history.last());
    assert_eq!(
        history[1],
        ModelSummary {
            version: 2,
            round_id: 1,
            architecture: "mnist-2nn".to_owned(),
            created_at: 200,
            accuracy: Some(0.91),
            loss: Some(0.3),
        }
    );

    assert!(store.set_model_metrics(1, 0.875, 0.5).await?);
    assert!(!store.set_model_metrics(4, 0.9, 0.1).await?);
    let first = store.get_model(1).await?.expect("model 1");
    assert_eq!((first.accuracy, first.loss), (Some(0.875), Some(0.5)));
    assert_eq!(first.bytes, model(1, 100).bytes);
    Ok(())
}

fn evaluation(
    model_version: u64,
    device_id: &str,
    examples: u64,
    metrics: &[(&str, f64)],
) -> EvaluationRecord {
    EvaluationRecord {
        model_version,
        round_id: model_version + 1,
        device_id: device_id.to_owned(),
        examples,
        metrics: metrics
            .iter()
            .map(|(name, value)| ((*name).to_owned(), *value))
            .collect(),
        created_at: 1_000 + model_version as i64,
    }
}

fn summary(
    model_version: u64,
    metric: &str,
    mean: f64,
    examples: u64,
    devices: u64,
) -> EvaluationSummary {
    EvaluationSummary {
        model_version,
        metric: metric.to_owned(),
        mean,
        examples,
        devices,
    }
}

/// Federated evaluations: the example-weighted mean per version and metric, replacement of a
/// device's earlier report, ordering, and refusal of unknown versions and invalid reports.
///
/// The values are chosen so every weighted mean is exact in binary floating point, so the means
/// are compared with `==` whatever order a backend sums in.
pub async fn evaluations(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert!(store.evaluation_history().await?.is_empty());
    for m in [model(1, 100), model(2, 200), model(10, 300)] {
        store.insert_model(&m).await?;
    }
    assert!(
        store.evaluation_history().await?.is_empty(),
        "models without evaluations"
    );

    // Two devices with different example counts, two metrics each:
    // accuracy (0.5·100 + 0.75·300) / 400 = 0.6875, loss (2·100 + 1·300) / 400 = 1.25.
    store
        .record_evaluation(&evaluation(
            2,
            "dev-a",
            100,
            &[("loss", 2.0), ("accuracy", 0.5)],
        ))
        .await?;
    store
        .record_evaluation(&evaluation(
            2,
            "dev-b",
            300,
            &[("accuracy", 0.75), ("loss", 1.0)],
        ))
        .await?;
    assert_eq!(
        store.evaluation_history().await?,
        [
            summary(2, "accuracy", 0.6875, 400, 2),
            summary(2, "loss", 1.25, 400, 2),
        ]
    );

    // The same device again for the same version replaces its whole earlier report: its old
    // values are gone, its examples are not counted twice, and a metric it no longer reports
    // disappears from its contribution. (0.5·100 + 0.25·100) / 200 = 0.375.
    store
        .record_evaluation(&evaluation(2, "dev-b", 100, &[("accuracy", 0.25)]))
        .await?;
    assert_eq!(
        store.evaluation_history().await?,
        [
            summary(2, "accuracy", 0.375, 200, 2),
            summary(2, "loss", 2.0, 100, 1),
        ]
    );

    // Ordering: versions numerically (10 after 2, also as text), then metric names bytewise
    // (upper case before lower case, "loss" before "loss_top5").
    store
        .record_evaluation(&evaluation(
            10,
            "dev-a",
            50,
            &[("loss_top5", 0.5), ("loss", 3.0)],
        ))
        .await?;
    store
        .record_evaluation(&evaluation(1, "dev-c", 8, &[("f1", 0.5), ("Zeta", 1.5)]))
        .await?;
    let order: Vec<(u64, String)> = store
        .evaluation_history()
        .await?
        .into_iter()
        .map(|s| (s.model_version, s.metric))
        .collect();
    let expected: Vec<(u64, String)> = [
        (1, "Zeta"),
        (1, "f1"),
        (2, "accuracy"),
        (2, "loss"),
        (10, "loss"),
        (10, "loss_top5"),
    ]
    .into_iter()
    .map(|(v, m)| (v, m.to_owned()))
    .collect();
    assert_eq!(order, expected);
    let before = store.evaluation_history().await?;

    // An unknown version is NotFound; invalid reports are refused; none of them changes anything,
    // not even the earlier report of the same device they would have replaced.
    assert!(matches!(
        store
            .record_evaluation(&evaluation(3, "dev-a", 10, &[("accuracy", 0.5)]))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .record_evaluation(&evaluation(2, "dev-a", 0, &[("accuracy", 0.5)]))
            .await,
        Err(StoreError::OutOfRange(_))
    ));
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        assert!(matches!(
            store
                .record_evaluation(&evaluation(2, "dev-a", 10, &[("accuracy", bad)]))
                .await,
            Err(StoreError::OutOfRange(_))
        ));
    }
    assert!(matches!(
        store
            .record_evaluation(&evaluation(2, "dev-a", 10, &[("loss", 1.0), ("loss", 2.0)]))
            .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store
            .record_evaluation(&evaluation(2, "dev-a", u64::MAX, &[("loss", 1.0)]))
            .await,
        Err(StoreError::OutOfRange(_))
    ));
    assert_eq!(store.evaluation_history().await?, before);
    Ok(())
}

//! Checks of the global models: insertion, lookup, history order and metrics.

use std::sync::Arc;

use super::model;
use crate::{ModelSummary, Store, StoreError};

/// Model insertion, lookup, history order and metrics.
pub async fn models(store: Arc<dyn Store>) -> Result<(), StoreError> {
    assert_eq!(store.latest_model().await?, None);
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

//! Real training on real MNIST (skipped without `QFLARE_DATA_DIR`).

mod common;

use std::time::Instant;

use qflare_ml::{
    Architecture, DatasetKind, Split, TrainConfig, apply_delta, delta, evaluate, initial_model,
    load_model, save_model, train,
};

#[test]
fn two_nn_learns_mnist_in_one_epoch() {
    let test_name = "two_nn_learns_mnist_in_one_epoch";
    let Some(train_set) = common::load(DatasetKind::Mnist, Split::Train, test_name) else {
        return;
    };
    let Some(test_set) = common::load(DatasetKind::Mnist, Split::Test, test_name) else {
        return;
    };
    let train_slice = train_set.head(6_000);
    // Every fifth test example: 2,000 drawn evenly from both halves of the
    // test set (its first examples are harder than the average).
    let picked: Vec<usize> = (0..test_set.len()).step_by(5).collect();
    let test_slice = test_set.subset(&picked).unwrap();
    let arch = Architecture::Mnist2nn;
    let global = initial_model(arch, 0).unwrap();
    let config = TrainConfig {
        learning_rate: 0.1,
        batch_size: 10,
        epochs: 1,
        seed: 0,
    };

    let started = Instant::now();
    let outcome = train(arch, &global, &train_slice, &config, None).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let metrics = evaluate(arch, &outcome.weights, &test_slice).unwrap();
    eprintln!(
        "2NN, 6,000 examples, 1 epoch, B=10, lr 0.1: {:.0} samples/s, train loss {:.4}, \
         test loss {:.4}, test accuracy {:.2}% on 2,000",
        6_000.0 / seconds,
        outcome.mean_loss,
        metrics.loss,
        100.0 * metrics.accuracy
    );
    assert_eq!(outcome.examples, 6_000);
    assert_eq!(metrics.examples, 2_000);
    assert!(metrics.accuracy >= 0.85, "accuracy {}", metrics.accuracy);
    assert!(outcome.mean_loss < 1.0);

    // The FL update reconstructs the trained model.
    let update = delta(&outcome.weights, &global).unwrap();
    let rebuilt = apply_delta(&global, &update).unwrap();
    let again = evaluate(arch, &rebuilt, &test_slice).unwrap();
    assert!((again.accuracy - metrics.accuracy).abs() <= 0.001);

    // A safetensors file of the trained model evaluates identically.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trained.safetensors");
    save_model(&path, &outcome.weights).unwrap();
    let loaded = load_model(&path, Some(arch)).unwrap();
    assert_eq!(loaded, outcome.weights);
    assert_eq!(evaluate(arch, &loaded, &test_slice).unwrap(), metrics);
}

#[test]
fn random_models_guess() {
    let Some(test_set) = common::load(DatasetKind::Mnist, Split::Test, "random_models_guess")
    else {
        return;
    };
    let test_slice = test_set.head(2_000);
    for arch in Architecture::ALL {
        let metrics = evaluate(arch, &initial_model(arch, 5).unwrap(), &test_slice).unwrap();
        eprintln!("{arch} at initialisation: {metrics:?}");
        assert!(
            (0.02..=0.25).contains(&metrics.accuracy),
            "{arch}: an untrained model is near chance (10%), got {}",
            metrics.accuracy
        );
        assert!(
            (metrics.loss - 10f64.ln()).abs() < 0.5,
            "{arch}: loss {}",
            metrics.loss
        );
    }
}

#[test]
fn cnn_step_changes_every_tensor() {
    let Some(train_set) =
        common::load(DatasetKind::Mnist, Split::Train, "cnn_step_changes_weights")
    else {
        return;
    };
    let arch = Architecture::MnistCnn;
    let global = initial_model(arch, 3).unwrap();
    let batch = train_set.head(10);
    let config = TrainConfig {
        learning_rate: 0.05,
        batch_size: 10,
        epochs: 1,
        seed: 0,
    };
    let outcome = train(arch, &global, &batch, &config, None).unwrap();
    arch.validate(&outcome.weights).unwrap();
    for ((name, before), (_, after)) in global.iter().zip(outcome.weights.iter()) {
        assert_ne!(before.data(), after.data(), "{name} was updated");
    }
    assert!((outcome.mean_loss - 10f64.ln()).abs() < 0.5);
}

#[test]
fn same_seed_same_weights_on_real_data() {
    let Some(train_set) = common::load(DatasetKind::Mnist, Split::Train, "same_seed_same_weights")
    else {
        return;
    };
    let slice = train_set.head(300);
    for arch in Architecture::ALL {
        let global = initial_model(arch, 8).unwrap();
        let config = TrainConfig {
            learning_rate: 0.05,
            batch_size: 10,
            epochs: 1,
            seed: 77,
        };
        let n = if arch == Architecture::MnistCnn {
            30
        } else {
            300
        };
        let data = slice.head(n);
        let a = train(arch, &global, &data, &config, None).unwrap();
        let b = train(arch, &global, &data, &config, None).unwrap();
        assert_eq!(
            a.weights.to_flat(),
            b.weights.to_flat(),
            "{arch}: bit-identical"
        );
        assert_eq!(a.mean_loss.to_bits(), b.mean_loss.to_bits());
        assert_eq!(a.weights.digest(), b.weights.digest());
    }
}

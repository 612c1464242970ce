//! Data on disk: the real IDX files, the discovery order, and partitions of
//! the real labels.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use qflare_ml::partition::label_shards;
use qflare_ml::source::DATA_DIR_ENV;
use qflare_ml::{
    DataOrigin, DataSource, Dataset, DatasetKind, Download, MlError, Partition, Split, partition,
};

#[test]
fn reads_real_mnist() {
    let Some(dir) = common::data_dir(DatasetKind::Mnist, "reads_real_mnist") else {
        return;
    };
    let train = Dataset::load(&dir, Split::Train).unwrap();
    let test = Dataset::load(&dir, Split::Test).unwrap();
    assert_eq!(train.len(), 60_000);
    assert_eq!(test.len(), 10_000);
    for data in [&train, &test] {
        assert_eq!(data.image_shape(), (28, 28));
        assert_eq!(data.images().len(), data.len() * 784);
        assert!(data.images().iter().all(|p| (0.0..=1.0).contains(p)));
        let labels: BTreeSet<u8> = data.labels().iter().copied().collect();
        assert_eq!(labels, (0..10).collect(), "every digit appears");
    }
    // Published class sizes of the MNIST training set.
    assert_eq!(
        train.class_counts(),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    // The first training image is a 5 with some fully dark pixels.
    assert_eq!(train.labels()[0], 5);
    assert!(train.image(0).unwrap().contains(&1.0));
}

#[test]
fn reads_real_fashion_mnist() {
    let Some(dir) = common::data_dir(DatasetKind::FashionMnist, "reads_real_fashion_mnist") else {
        return;
    };
    let test = Dataset::load(&dir, Split::Test).unwrap();
    assert_eq!(test.len(), 10_000);
    assert_eq!(test.class_counts(), [1000; 10]);
}

fn fake_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).expect("create a test directory");
    for file in DatasetKind::Mnist.files() {
        std::fs::write(dir.join(file.name), b"stand-in bytes for discovery")
            .expect("write a stand-in file");
    }
}

#[test]
fn discovery_follows_the_documented_order() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Flag, config and env directories hold the files directly; ./data and
    // the system folder in a subdirectory named after the data set.
    let places: [(PathBuf, DataOrigin); 5] = [
        (r.join("flag"), DataOrigin::Explicit),
        (r.join("config"), DataOrigin::Config),
        (r.join("env"), DataOrigin::Environment),
        (r.join("data/mnist"), DataOrigin::Local),
        (r.join("system/mnist"), DataOrigin::System),
    ];
    for (dir, _) in &places {
        fake_dataset(dir);
    }
    let source = DataSource {
        explicit: Some(r.join("flag")),
        config: Some(r.join("config")),
        env: Some(r.join("env")),
        local_root: r.join("data"),
        system_root: r.join("system"),
        download: Download::Never,
    };
    for (dir, origin) in &places {
        let found = source.locate(DatasetKind::Mnist).unwrap();
        assert_eq!((&found.dir, found.origin), (dir, *origin));
        std::fs::remove_dir_all(dir).unwrap();
    }
    let err = source.locate(DatasetKind::Mnist).unwrap_err();
    assert!(matches!(err, MlError::DataNotFound { .. }));
    let message = err.to_string();
    // A library names no command-line flag: each program adds its own.
    assert!(!message.contains("--data"), "{message}");
    for needle in [
        "explicit",
        "config file",
        DATA_DIR_ENV,
        "data/mnist",
        "system/mnist",
        "download",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from:\n{message}"
        );
    }
}

#[test]
fn discovery_prefers_the_named_subdirectory() {
    let root = tempfile::tempdir().unwrap();
    fake_dataset(root.path());
    fake_dataset(&root.path().join("mnist"));
    let source = DataSource {
        explicit: Some(root.path().to_path_buf()),
        local_root: root.path().join("none"),
        system_root: root.path().join("none"),
        download: Download::Never,
        ..DataSource::default()
    };
    let found = source.locate(DatasetKind::Mnist).unwrap();
    assert_eq!(found.dir, root.path().join("mnist"));
    // A directory missing one file does not qualify.
    std::fs::remove_file(root.path().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap();
    std::fs::remove_file(root.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let err = source.locate(DatasetKind::Mnist).unwrap_err().to_string();
    assert!(err.contains("missing t10k-labels-idx1-ubyte.gz"), "{err}");
}

#[test]
fn mnist_is_never_taken_for_fashion_mnist() {
    let Some(dir) = common::data_dir(DatasetKind::Mnist, "mnist_is_never_taken_for_fashion_mnist")
    else {
        return;
    };
    // Link (never copy) the real MNIST files into a directory named neutrally.
    let root = tempfile::tempdir().unwrap();
    for file in DatasetKind::Mnist.files() {
        std::os::unix::fs::symlink(dir.join(file.name), root.path().join(file.name)).unwrap();
    }
    let source = DataSource {
        explicit: Some(root.path().to_path_buf()),
        local_root: root.path().join("none"),
        system_root: root.path().join("none"),
        download: Download::Never,
        ..DataSource::default()
    };
    assert_eq!(source.locate(DatasetKind::Mnist).unwrap().dir, root.path());
    let err = source
        .locate(DatasetKind::FashionMnist)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds the mnist data set"), "{err}");
}

#[test]
fn paper_shards_on_real_labels() {
    let Some(train) = common::load(
        DatasetKind::Mnist,
        Split::Train,
        "paper_shards_on_real_labels",
    ) else {
        return;
    };
    let labels = train.labels();
    let parts = partition(labels, 100, &Partition::PAPER_SHARDS, 42).unwrap();
    assert_eq!(parts.len(), 100);
    let mut seen = BTreeSet::new();
    let mut two_or_fewer = 0;
    for part in &parts {
        assert_eq!(part.len(), 600);
        assert!(
            part.iter().all(|&i| seen.insert(i)),
            "clients share no example"
        );
        let distinct: BTreeSet<u8> = part.iter().map(|&i| labels[i]).collect();
        // Two shards, each spanning at most one label boundary.
        assert!(distinct.len() <= 4);
        two_or_fewer += usize::from(distinct.len() <= 2);
    }
    assert_eq!(seen.len(), 60_000, "200 shards of 300 use every example");
    assert!(
        two_or_fewer >= 80,
        "most clients see two digits, got {two_or_fewer}/100"
    );
    assert_eq!(parts, label_shards(labels, 100, 2, 300, 42).unwrap());
    let subset = train.subset(&parts[0]).unwrap();
    assert_eq!(subset.len(), 600);

    let iid = partition(labels, 100, &Partition::Iid, 42).unwrap();
    assert!(iid.iter().all(|p| p.len() == 600));
    let skewed = partition(labels, 100, &Partition::Dirichlet { alpha: 0.1 }, 42).unwrap();
    assert_eq!(skewed.iter().map(Vec::len).sum::<usize>(), 60_000);
}

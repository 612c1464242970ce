//! The download path against a local HTTP server on 127.0.0.1 that serves
//! the real MNIST files (read from `QFLARE_DATA_DIR`, never copied into the
//! project). Nothing here reaches outside the machine.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use qflare_ml::source::download;
use qflare_ml::{DataOrigin, DataSource, DatasetKind, Download, MlError, Split};

/// Serves `files` (name to bytes) over HTTP/1.1 until the test process ends;
/// returns the base URL. Unknown paths get 404.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    let addr = listener.local_addr().expect("a bound address");
    let base = format!("http://{addr}/mnist/");
    let files = Arc::new(files);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let files = Arc::clone(&files);
            std::thread::spawn(move || {
                let Ok(read_half) = stream.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(read_half);
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                // Drain the headers up to the blank line.
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("");
                let name = path.strip_prefix("/mnist/").unwrap_or("");
                let response = match files.get(name) {
                    Some(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        [head.into_bytes(), body.clone()].concat()
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = stream.write_all(&response);
            });
        }
    });
    base
}

fn real_files(dir: &Path) -> HashMap<String, Vec<u8>> {
    DatasetKind::Mnist
        .files()
        .iter()
        .map(|f| {
            (
                f.name.to_owned(),
                std::fs::read(dir.join(f.name)).expect("read a data file"),
            )
        })
        .collect()
}

fn source_downloading_from(base: &str, root: &Path) -> DataSource {
    DataSource {
        explicit: None,
        config: None,
        env: None,
        local_root: root.join("data"),
        system_root: root.join("system"),
        download: Download::From(base.to_owned()),
    }
}

#[test]
fn downloads_and_verifies_the_published_files() {
    let Some(dir) = common::data_dir(DatasetKind::Mnist, "downloads_and_verifies") else {
        return;
    };
    let base = serve(real_files(&dir));
    let root = tempfile::tempdir().unwrap();
    let source = source_downloading_from(&base, root.path());

    let found = source.locate(DatasetKind::Mnist).unwrap();
    assert_eq!(found.origin, DataOrigin::Downloaded);
    assert_eq!(found.dir, root.path().join("data/mnist"));
    for file in DatasetKind::Mnist.files() {
        assert!(found.dir.join(file.name).is_file());
        assert!(!found.dir.join(format!("{}.part", file.name)).exists());
    }
    assert_eq!(found.load(Split::Test).unwrap().len(), 10_000);

    // Next time the files are found in ./data without a download.
    let again = source.locate(DatasetKind::Mnist).unwrap();
    assert_eq!(again.origin, DataOrigin::Local);
}

#[test]
fn a_corrupted_file_is_rejected_and_deleted() {
    let Some(dir) = common::data_dir(DatasetKind::Mnist, "a_corrupted_file_is_rejected") else {
        return;
    };
    let mut files = real_files(&dir);
    let bad = "t10k-labels-idx1-ubyte.gz";
    let bytes = files.get_mut(bad).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    let base = serve(files);
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("mnist");

    let err = download(DatasetKind::Mnist, &base, &dest).unwrap_err();
    match &err {
        MlError::HashMismatch { path, expected, .. } => {
            assert!(path.to_string_lossy().contains(bad), "{err}");
            assert_eq!(expected, &DatasetKind::Mnist.files()[3].sha256);
        }
        other => panic!("expected a hash mismatch, got {other}"),
    }
    assert!(err.to_string().contains("deleted"));
    assert!(!dest.join(bad).exists(), "the corrupted file is not kept");
    assert!(!dest.join(format!("{bad}.part")).exists());
    // The good files before it were kept; a later retry downloads only the rest.
    assert!(dest.join("train-images-idx3-ubyte.gz").is_file());

    // Through discovery, the failure is reported with every other way.
    let source = source_downloading_from(&base, root.path());
    let message = source.locate(DatasetKind::Mnist).unwrap_err().to_string();
    assert!(message.contains("SHA-256"), "{message}");
    assert!(message.contains("QFLARE_DATA_DIR"), "{message}");
}

#[test]
fn oversized_and_missing_files_fail_cleanly() {
    let mut files = HashMap::new();
    // Larger than the pinned size of the first file: cut off, never kept.
    files.insert(
        "train-images-idx3-ubyte.gz".to_owned(),
        vec![0u8; DatasetKind::Mnist.files()[0].bytes as usize + 100],
    );
    let base = serve(files);
    let root = tempfile::tempdir().unwrap();
    let dest = root.path().join("mnist");
    let err = download(DatasetKind::Mnist, &base, &dest).unwrap_err();
    assert!(err.to_string().contains("more than the published"), "{err}");
    assert!(
        std::fs::read_dir(&dest).unwrap().next().is_none(),
        "nothing kept"
    );

    // Every file is 404 on an empty server.
    let base = serve(HashMap::new());
    let err = download(DatasetKind::Mnist, &base, &dest).unwrap_err();
    assert!(matches!(err, MlError::Download { .. }), "{err}");
    assert!(err.to_string().contains("404"), "{err}");

    // Nothing listens on the port: a connection error, not a hang or a panic.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/", listener.local_addr().unwrap())
    };
    let err = download(DatasetKind::Mnist, &closed, &dest).unwrap_err();
    assert!(matches!(err, MlError::Download { .. }), "{err}");
}

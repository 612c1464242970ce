//! The operator's pages in a real browser: a federating server (the real
//! enclave process, real devices over HTTPS) finishes a round, then headless
//! Chromium loads `/`, `/devices` and `/audit` with the admin token as the
//! HTTP Basic password, and the DOM it builds must show the round and the
//! accuracy chart. Skips when `chromium` is missing, unless
//! `QFLARE_REQUIRE_BROWSER=1` (CI), and when the MNIST data is missing,
//! unless `QFLARE_REQUIRE_DATA=1`.

// A test fails loudly on any unexpected error; unwrap says so most plainly.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qflare_cli::sim::{DataSplit, SimOptions, Simulation};
use qflare_enclave::AggregationConfig;
use qflare_ml::Architecture;
use qflare_protocol::federation::TrainingPlan;

/// `chromium` on the PATH, or `None` (a failure when the browser is required).
fn chromium() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() && std::env::var("QFLARE_REQUIRE_BROWSER").is_ok_and(|v| v == "1") {
        panic!(
            "QFLARE_REQUIRE_BROWSER=1 but `chromium` is not on the PATH (apt-get install chromium)"
        );
    }
    found
}

/// The DOM headless Chromium builds for `url` (self-signed certificate
/// accepted: the pin is the devices' business, not this test's).
async fn dump_dom(browser: &Path, profile: &Path, url: &str) -> String {
    let run = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--ignore-certificate-errors",
            "--no-first-run",
            "--disable-extensions",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium answers within a minute")
        .unwrap();
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_a_finished_round_in_chromium() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: `chromium` is not installed (set QFLARE_REQUIRE_BROWSER=1 to fail)");
        return;
    };
    let Some(data) = common::data_dir() else {
        eprintln!("skipped: set QFLARE_DATA_DIR to the MNIST directory");
        return;
    };
    let started = Instant::now();
    let state = tempfile::tempdir().unwrap();
    let devices = 2;
    let mut sim = Simulation::start(SimOptions {
        devices,
        rounds: 1,
        clients_per_round: devices,
        architecture: Architecture::Mnist2nn,
        split: DataSplit::Iid,
        examples_per_device: Some(100),
        training: TrainingPlan {
            learning_rate: 0.1,
            batch_size: 10,
            epochs: 1,
        },
        data_dir: data,
        eval_examples: 1_000,
        attack: None,
        aggregation: AggregationConfig::default(),
        enclave_program: PathBuf::from(env!("CARGO_BIN_EXE_qflare")),
        enclave_args: vec!["enclave".into()],
        state_dir: state.path().join("run"),
        round_timeout_secs: 120,
        compute_threads: 2,
        seed: 7,
        long_poll_secs: 25,
        update_encoding: Default::default(),
    })
    .await
    .unwrap();
    let report = sim.run(&[], |_| {}).await.unwrap();
    let round = &report.rounds[0];
    assert_eq!(
        (round.state.as_str(), round.accepted),
        ("completed", devices),
        "{report:?}"
    );
    let accuracy = report.final_accuracy.unwrap();

    // The admin token the server generated into its state directory, as the
    // Basic-auth password in the URL (base64url: no escaping needed).
    let token = std::fs::read_to_string(state.path().join("run").join("admin-token")).unwrap();
    let base = sim
        .url
        .replacen("https://", &format!("https://admin:{}@", token.trim()), 1);
    let profile = state.path().join("chromium");
    let trained = Instant::now();

    let dashboard = dump_dom(&browser, &profile, &format!("{base}/")).await;
    // The rounds table holds the finished round, with its real verdict counts.
    assert!(
        dashboard.contains(&format!(
            "<tr><td>{}</td><td class=\"ok\">completed</td><td>v0</td><td>{devices}</td><td>{devices}</td>",
            round.round_id
        )),
        "the completed round is a row of the rounds table: {dashboard}"
    );
    assert!(
        dashboard.contains(&format!("{devices} accepted, 0 rejected")),
        "{dashboard}"
    );
    // The chart: a line through the initial and the trained model, a point
    // per model whose tooltip is the accuracy the simulation measured.
    let svg = &dashboard[dashboard.find("<svg").expect("the accuracy chart")..];
    let svg = &svg[..svg.find("</svg>").expect("the chart is closed")];
    let points = svg
        .split("points=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the chart's polyline has points");
    assert_eq!(points.split(' ').count(), 2, "v0 and v1: {points}");
    assert_eq!(svg.matches("<circle").count(), 2, "{svg}");
    // The browser parsed the gridlines as closed elements, each followed by
    // its label, not as containers swallowing the rest of the chart.
    assert_eq!(svg.matches("</line><text").count(), 5, "{svg}");
    assert!(
        svg.contains(&format!("<title>v1: {:.2}%</title>", 100.0 * accuracy)),
        "{svg}"
    );
    assert!(
        dashboard.contains(&format!("{:.2}%", 100.0 * accuracy)),
        "the latest accuracy is shown: {dashboard}"
    );

    let devices_page = dump_dom(&browser, &profile, &format!("{base}/devices")).await;
    for index in 0..devices {
        assert!(
            devices_page.contains(&format!(
                "<td>sim-{index:03}</td><td class=\"ok\">active</td>"
            )),
            "{devices_page}"
        );
    }

    let audit = dump_dom(&browser, &profile, &format!("{base}/audit")).await;
    assert!(audit.contains("Chain intact"), "{audit}");
    for kind in ["device_enrolled", "round_opened", "round_aggregated"] {
        assert!(
            audit.contains(&format!("<td>{kind}</td>")),
            "{kind}: {audit}"
        );
    }

    eprintln!(
        "browser test: round in {:.1}s, three pages in Chromium in {:.1}s",
        trained.duration_since(started).as_secs_f64(),
        trained.elapsed().as_secs_f64()
    );
    sim.stop().await.unwrap();
}

//! `qflare demo`: a whole federation on this machine in one command — the
//! server, the sandboxed enclave, and N simulated devices over real HTTPS —
//! with a per-round table, an accuracy plot (PNG and SVG) and a JSON summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use qflare_cli::sim::{self, Attack, DataSplit, RoundRow, SimOptions, SimReport, Simulation};
use qflare_enclave::{AggregationConfig, AggregatorKind, DefenseConfig, DefensePreset};
use qflare_ml::Architecture;
use qflare_protocol::federation::TrainingPlan;
use qflare_protocol::update_encoding::UpdateEncoding;

use crate::output::human_bytes;

/// `qflare demo` options.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Simulated devices.
    #[arg(long, default_value_t = 10)]
    pub devices: usize,
    /// Rounds to run.
    #[arg(long, default_value_t = 5)]
    pub rounds: u64,
    /// Devices per round (default: all).
    #[arg(long)]
    pub per_round: Option<usize>,
    /// mnist-2nn or mnist-cnn.
    #[arg(long, default_value = "mnist-2nn")]
    pub model: Architecture,
    /// iid, shards (the FedAvg paper's pathological non-IID) or dirichlet:ALPHA.
    #[arg(long, default_value = "iid")]
    pub split: String,
    /// Cap on each device's training examples.
    #[arg(long)]
    pub examples_per_device: Option<usize>,
    /// Turn COUNT devices malicious: COUNT:KIND with KIND sign-flip, scale[:FACTOR],
    /// noise[:SIGMA], label-flip, or one crafted from the round's honest updates
    /// (omniscient; needs every device in every round): alie, ipm[:EPSILON]
    /// (default 0.5), min-max, min-sum or fang. Example: --attack 2:sign-flip
    #[arg(long)]
    pub attack: Option<String>,
    /// recommended, reject_outliers, original_design or off.
    #[arg(long, default_value = "recommended")]
    pub defense: String,
    /// centered_clipping (the default), fed_avg, trimmed_mean, median, multi_krum.
    #[arg(long, default_value = "centered_clipping")]
    pub aggregator: String,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// Minibatch size B.
    #[arg(long, default_value_t = 10)]
    pub batch: usize,
    /// Local epochs E.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// MNIST directory (IDX .gz files); default: QFLARE_DATA_DIR, ./data/mnist, ./data, ...
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where the plot and summary go.
    #[arg(long, default_value = "./qflare-demo")]
    pub out: PathBuf,
    /// Threads all devices' training shares.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Seed of the split and the initial model.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Longest a device's poll is held until its round changes (the
    /// server's federation.long_poll_secs); 0: devices poll every second.
    #[arg(long, default_value_t = 25)]
    pub long_poll_secs: u64,
    /// How devices encode their updates: f32, f16 or int8 (the server's
    /// federation.update_encoding).
    #[arg(long, default_value = "f32")]
    pub update_encoding: UpdateEncoding,
}

/// Parses a split name.
pub fn parse_split(text: &str) -> anyhow::Result<DataSplit> {
    Ok(match text {
        "iid" => DataSplit::Iid,
        "shards" => DataSplit::Shards,
        other => match other
            .strip_prefix("dirichlet:")
            .and_then(|a| a.parse::<f64>().ok())
        {
            Some(alpha) if alpha > 0.0 => DataSplit::Dirichlet(alpha),
            _ => anyhow::bail!("unknown split {other}: use iid, shards or dirichlet:ALPHA"),
        },
    })
}

/// The aggregation settings for a defense preset and aggregator name.
pub fn aggregation(defense: &str, aggregator: &str) -> anyhow::Result<AggregationConfig> {
    let preset: DefensePreset = serde_json::from_value(serde_json::Value::String(defense.into()))
        .with_context(|| format!("unknown defense {defense}"))?;
    let aggregator: AggregatorKind =
        serde_json::from_value(serde_json::Value::String(aggregator.into()))
            .with_context(|| format!("unknown aggregator {aggregator}"))?;
    Ok(AggregationConfig {
        aggregator,
        defense: DefenseConfig::preset(preset),
        ..AggregationConfig::default()
    })
}

fn parse_attack(text: &str) -> anyhow::Result<(usize, Attack)> {
    let (count, kind) = text
        .split_once(':')
        .context("--attack COUNT:KIND, e.g. 2:sign-flip")?;
    let count: usize = count.parse().context("--attack COUNT")?;
    let attack: Attack = kind.parse().map_err(anyhow::Error::msg)?;
    Ok((count, attack))
}

/// Writes the accuracy curve as PNG and SVG.
pub fn plot(
    rows: &[(u64, f64)],
    title: &str,
    out_png: &Path,
    out_svg: &Path,
) -> anyhow::Result<()> {
    // The PNG rasterizer needs a font file; this one ships inside a crate,
    // so the plot works on a machine without system fonts.
    let _ = plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        epaint_default_fonts::UBUNTU_LIGHT,
    );
    draw(
        BitMapBackend::new(out_png, (900, 540)).into_drawing_area(),
        rows,
        title,
    )?;
    draw(
        SVGBackend::new(out_svg, (900, 540)).into_drawing_area(),
        rows,
        title,
    )?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    rows: &[(u64, f64)],
    title: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let max_round = rows.iter().map(|r| r.0).max().unwrap_or(1).max(1);
    let low = rows
        .iter()
        .map(|r| r.1)
        .fold(1.0f64, f64::min)
        .clamp(0.0, 0.9);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0u64..max_round, (100.0 * low)..100.0)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("test accuracy (%)")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .draw_series(LineSeries::new(
            rows.iter().map(|(r, a)| (*r, 100.0 * a)),
            BLUE.stroke_width(2),
        ))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .draw_series(
            rows.iter()
                .map(|(r, a)| Circle::new((*r, 100.0 * a), 3, BLUE.filled())),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

fn row_line(row: &RoundRow, seconds: f64) -> String {
    format!(
        "| {:>5} | {:>8} | {:>8} | {:>8} | {:>8} | {:>7.1} | {:>10} |",
        row.round_id,
        row.selected,
        row.accepted,
        row.rejected,
        row.accuracy
            .map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a)),
        seconds,
        human_bytes(row.bytes_sent),
    )
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let data_dir = sim::find_data(args.data.as_deref(), "qflare demo")?;
    let (enclave_program, enclave_args) = sim::self_as_enclave()?;
    let attack = args.attack.as_deref().map(parse_attack).transpose()?;
    let state_dir = tempfile::tempdir()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let options = SimOptions {
        devices: args.devices,
        rounds: args.rounds,
        clients_per_round: args.per_round.unwrap_or(args.devices),
        architecture: args.model,
        split: parse_split(&args.split)?,
        examples_per_device: args.examples_per_device,
        training: TrainingPlan {
            learning_rate: args.lr,
            batch_size: args.batch,
            epochs: args.epochs,
        },
        data_dir: data_dir.clone(),
        eval_examples: 10_000,
        attack,
        aggregation: aggregation(&args.defense, &args.aggregator)?,
        enclave_program,
        enclave_args,
        state_dir: state_dir.path().join("server"),
        round_timeout_secs: 600,
        compute_threads: args.threads,
        seed: args.seed,
        long_poll_secs: args.long_poll_secs,
        update_encoding: args.update_encoding,
    };
    eprintln!(
        "QFLARE demo: {} devices ({}), {}, {} rounds, data from {}",
        args.devices,
        attack.map_or_else(
            || "all honest".into(),
            |(n, a)| format!("{n} malicious: {a}")
        ),
        args.model,
        args.rounds,
        data_dir.display()
    );
    eprintln!(
        "starting the server (SQLite in a temporary directory), the enclave, and enrolling devices..."
    );
    let started = Instant::now();
    let mut simulation = Simulation::start(options).await?;
    eprintln!(
        "ready in {:.1} s; training over HTTPS (TLS 1.3, X25519MLKEM768) with ML-KEM/ML-DSA sessions\n",
        started.elapsed().as_secs_f64()
    );

    // The bar is progress, so it lives on stderr (drawn only when stderr is a
    // terminal); the table is data, printed on stdout above the bar.
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = ProgressBar::with_draw_target(
            Some(args.rounds),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} round {pos}/{len} {wide_bar} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        Some(bar)
    } else {
        None
    };
    let header = "| round | selected | accepted | rejected | accuracy | time (s) | bytes sent |\n|------:|---------:|---------:|---------:|---------:|--------:|-----------:|";
    let emit = |line: &str, bar: &Option<ProgressBar>| match bar {
        Some(bar) => bar.suspend(|| println!("{line}")),
        None => println!("{line}"),
    };
    emit(header, &bar);
    let mut last = Instant::now();
    let mut times = Vec::new();
    let report: SimReport = simulation
        .run(&[0.95], |row| {
            let seconds = last.elapsed().as_secs_f64();
            last = Instant::now();
            times.push(seconds);
            emit(&row_line(row, seconds), &bar);
            if let Some(bar) = &bar {
                bar.inc(1);
            }
            if !row.rejections.is_empty() {
                emit(
                    &format!(
                        "|       | rejected by the enclave: {} |",
                        row.rejections.join(", ")
                    ),
                    &bar,
                );
            }
        })
        .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    simulation.stop().await?;

    let mut curve = vec![(0, report.initial_accuracy.unwrap_or(0.1))];
    curve.extend(
        report
            .rounds
            .iter()
            .filter_map(|r| r.accuracy.map(|a| (r.round_id, a))),
    );
    let png = args.out.join("accuracy.png");
    let svg = args.out.join("accuracy.svg");
    plot(
        &curve,
        &format!(
            "QFLARE federated {} on MNIST ({} devices)",
            args.model, args.devices
        ),
        &png,
        &svg,
    )?;
    let summary = serde_json::json!({
        "devices": args.devices,
        "rounds": args.rounds,
        "model": args.model.to_string(),
        "split": args.split,
        "attack": args.attack,
        "defense": args.defense,
        "aggregator": args.aggregator,
        "training": { "learning_rate": args.lr, "batch_size": args.batch, "epochs": args.epochs },
        "report": report,
        "round_seconds": times,
    });
    let json = args.out.join("summary.json");
    std::fs::write(&json, serde_json::to_vec_pretty(&summary)?)?;
    let crypto = report.device_seconds.cryptography();
    println!(
        "\nfinal test accuracy: {} after {} rounds in {:.1} s (initial {})",
        report
            .final_accuracy
            .map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a)),
        report.rounds.len(),
        report.wall_seconds,
        report
            .initial_accuracy
            .map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a)),
    );
    println!(
        "device time: {:.1} s training, {:.2} s cryptography ({:.1}% of device round time); enclave: {:.2} s",
        report.device_seconds.training,
        crypto,
        100.0 * crypto / report.device_seconds.total.max(1e-9),
        report.enclave_seconds
    );
    eprintln!(
        "wrote {}, {} and {}",
        png.display(),
        svg.display(),
        json.display()
    );
    Ok(())
}

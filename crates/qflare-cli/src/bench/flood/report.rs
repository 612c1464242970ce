//! The flood's results: what each class was sent and how it was answered,
//! the device's latencies before and during the flood, the server's memory;
//! and the markdown they are printed as.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qflare_server::config::RateLimitSection;
use qflare_server::ratelimit::RateLimit;
use serde::Serialize;
use tokio::time::Instant;

use super::FloodArgs;
use crate::bench::child_server::{Memory, mib};

/// A rate-limit class the attackers drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Class {
    Enroll,
    Sessions,
    Admin,
    Public,
    Connections,
}

impl Class {
    pub(super) const ALL: [Self; 5] = [
        Self::Enroll,
        Self::Sessions,
        Self::Admin,
        Self::Public,
        Self::Connections,
    ];

    /// The class's name in the configuration and the metrics.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Enroll => "enroll",
            Self::Sessions => "sessions",
            Self::Admin => "admin",
            Self::Public => "public",
            Self::Connections => "connections",
        }
    }

    pub(super) fn limit(self, limits: &RateLimitSection) -> RateLimit {
        match self {
            Self::Enroll => limits.enroll,
            Self::Sessions => limits.sessions,
            Self::Admin => limits.admin,
            Self::Public => limits.public,
            Self::Connections => limits.connections,
        }
    }

    fn sent(self) -> &'static str {
        match self {
            Self::Enroll => "enrollments with an unknown token",
            Self::Sessions => "hellos naming the device",
            Self::Admin => "admin API and dashboard, wrong token",
            Self::Public => "health, server info, unknown path, unknown session",
            Self::Connections => "health on a new TLS connection each",
        }
    }
}

/// How one attack request ended.
pub(super) enum Outcome {
    Answered(u16, String),
    NoAnswer(String),
}

impl Outcome {
    pub(super) async fn of(sent: reqwest::Result<reqwest::Response>) -> Self {
        match sent {
            Ok(response) => {
                let status = response.status().as_u16();
                // The body is read so that an answer counts once it is
                // whole; what it says matters only for a 5xx.
                let body = response.text().await.unwrap_or_default();
                Self::Answered(status, body)
            }
            Err(err) => Self::NoAnswer(format!("{:#}", anyhow::Error::from(err))),
        }
    }
}

/// The answers to one class, over all addresses.
#[derive(Debug, Default, Clone, Serialize)]
pub(super) struct Tally {
    pub(super) sent: u64,
    pub(super) ok: u64,
    pub(super) limited: u64,
    /// 4xx other than 429 (and the odd 1xx or 3xx).
    pub(super) refused: u64,
    pub(super) server_errors: u64,
    /// No HTTP answer: the connection was closed or timed out.
    pub(super) no_answer: u64,
    pub(super) first_server_error: Option<String>,
    pub(super) first_no_answer: Option<String>,
}

impl Tally {
    pub(super) fn record(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Answered(status, _) if (200..300).contains(&status) => self.ok += 1,
            Outcome::Answered(429, _) => self.limited += 1,
            Outcome::Answered(status, body) if status >= 500 => {
                self.server_errors += 1;
                self.first_server_error
                    .get_or_insert_with(|| format!("{status}: {}", truncate(&body)));
            }
            Outcome::Answered(..) => self.refused += 1,
            Outcome::NoAnswer(err) => {
                self.no_answer += 1;
                self.first_no_answer.get_or_insert(err);
            }
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(300).collect()
}

/// A call of the legitimate device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Call {
    /// `qflare_edge::open_session`: the hello and the confirmation.
    Handshake,
    /// `POST /v1/rounds/current` on the current session.
    Poll,
    /// `GET /healthz` on the device's connection.
    Healthz,
}

impl Call {
    const ALL: [Self; 3] = [Self::Handshake, Self::Poll, Self::Healthz];

    fn label(self) -> &'static str {
        match self {
            Self::Handshake => "new session (hello + confirm)",
            Self::Poll => "poll `POST /v1/rounds/current`",
            Self::Healthz => "`GET /healthz`",
        }
    }
}

/// One call of the device.
pub(super) struct Sample {
    call: Call,
    at: Instant,
    latency: Duration,
    failure: Option<String>,
}

impl Sample {
    pub(super) fn new(call: Call, at: Instant, latency: Duration, failure: Option<String>) -> Self {
        Self {
            call,
            at,
            latency,
            failure,
        }
    }
}

/// One call's latencies in one phase.
#[derive(Debug, Serialize)]
pub(super) struct Stats {
    count: usize,
    failures: usize,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
}

impl Stats {
    fn of<'a>(samples: impl Iterator<Item = &'a Sample>) -> Self {
        let mut count = 0;
        let mut failures = 0;
        let mut ms = Vec::new();
        for sample in samples {
            count += 1;
            if sample.failure.is_some() {
                failures += 1;
            } else {
                ms.push(sample.latency.as_secs_f64() * 1e3);
            }
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank: the smallest value at or above the fraction.
        let rank = |p: f64| -> Option<f64> {
            let index = ((p * ms.len() as f64).ceil() as usize).max(1) - 1;
            ms.get(index).copied()
        };
        Self {
            count,
            failures,
            p50_ms: rank(0.5),
            p99_ms: rank(0.99),
            max_ms: ms.last().copied(),
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct CallReport {
    call: Call,
    baseline: Stats,
    flood: Stats,
    /// Flood over baseline, same run.
    p50_ratio: Option<f64>,
    p99_ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct ClassReport {
    class: Class,
    per_minute: u32,
    burst: u32,
    /// Over all addresses.
    offered_per_second: f64,
    sent_per_second: f64,
    pub(super) tally: Tally,
}

#[derive(Debug, Serialize)]
pub(super) struct DeviceFailure {
    call: Call,
    phase: &'static str,
    /// Seconds from the start of the baseline.
    at_secs: f64,
    error: String,
}

#[derive(Debug, Serialize)]
struct Settings {
    seconds: u64,
    baseline_seconds: u64,
    multiplier: u32,
    poll_interval_ms: u64,
    attackers: Vec<String>,
    device_limit_per_minute: u32,
}

#[derive(Debug, Serialize)]
struct MemoryReport {
    at_start: Memory,
    after_baseline: Memory,
    end_of_flood: Memory,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    benchmark: &'static str,
    qflare_version: &'static str,
    /// Unix seconds when the report was made.
    finished_at: u64,
    cpus: usize,
    settings: Settings,
    pub(super) classes: Vec<ClassReport>,
    device: Vec<CallReport>,
    pub(super) device_failures: Vec<DeviceFailure>,
    memory: MemoryReport,
}

fn within(at: Instant, (start, end): (Instant, Instant)) -> bool {
    at >= start && at < end
}

fn ratio(flood: Option<f64>, baseline: Option<f64>) -> Option<f64> {
    match (flood, baseline) {
        (Some(f), Some(b)) if b > 0.0 => Some(f / b),
        _ => None,
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        args: &FloodArgs,
        limits: &RateLimitSection,
        addresses: &[IpAddr],
        tallies: Vec<(Class, Tally)>,
        samples: &[Sample],
        baseline: (Instant, Instant),
        flood: (Instant, Instant),
        [at_start, after_baseline, end_of_flood]: [Memory; 3],
    ) -> Self {
        let flood_secs = (flood.1 - flood.0).as_secs_f64();
        let classes = tallies
            .into_iter()
            .map(|(class, tally)| {
                let limit = class.limit(limits);
                ClassReport {
                    class,
                    per_minute: limit.per_minute,
                    burst: limit.burst,
                    offered_per_second: f64::from(limit.per_minute)
                        * f64::from(args.multiplier)
                        * addresses.len() as f64
                        / 60.0,
                    sent_per_second: tally.sent as f64 / flood_secs,
                    tally,
                }
            })
            .collect();
        let device = Call::ALL
            .iter()
            .map(|&call| {
                let of = |window| {
                    Stats::of(
                        samples
                            .iter()
                            .filter(|s| s.call == call && within(s.at, window)),
                    )
                };
                let (baseline, flood) = (of(baseline), of(flood));
                CallReport {
                    call,
                    p50_ratio: ratio(flood.p50_ms, baseline.p50_ms),
                    p99_ratio: ratio(flood.p99_ms, baseline.p99_ms),
                    baseline,
                    flood,
                }
            })
            .collect();
        let device_failures = samples
            .iter()
            .filter_map(|s| {
                let error = s.failure.clone()?;
                let phase = if within(s.at, baseline) {
                    "baseline"
                } else if within(s.at, flood) {
                    "flood"
                } else {
                    "after the flood"
                };
                Some(DeviceFailure {
                    call: s.call,
                    phase,
                    at_secs: s.at.saturating_duration_since(baseline.0).as_secs_f64(),
                    error,
                })
            })
            .collect();
        Self {
            benchmark: "flood",
            qflare_version: env!("CARGO_PKG_VERSION"),
            finished_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cpus: std::thread::available_parallelism().map_or(0, usize::from),
            settings: Settings {
                seconds: args.seconds,
                baseline_seconds: args.baseline_seconds,
                multiplier: args.multiplier,
                poll_interval_ms: args.poll_interval_ms,
                attackers: addresses.iter().map(ToString::to_string).collect(),
                device_limit_per_minute: limits.device.per_minute,
            },
            classes,
            device,
            device_failures,
            memory: MemoryReport {
                at_start,
                after_baseline,
                end_of_flood,
            },
        }
    }

    /// Three tables (the flood, the device, the server's memory), then what
    /// the first 5xx, connection failure and device failure said.
    pub(super) fn markdown(&self) -> String {
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        let settings = &self.settings;
        line(format!(
            "Flood: {} s from {} addresses ({} to {}), each at {}x every per-address limit; \
             baseline {} s; {} CPUs shared by client and server.\n",
            settings.seconds,
            settings.attackers.len(),
            settings.attackers.first().map_or("-", String::as_str),
            settings.attackers.last().map_or("-", String::as_str),
            settings.multiplier,
            settings.baseline_seconds,
            self.cpus,
        ));
        line("| class (limit per address) | sent | per s, offered / sent | 2xx | 429 | other 4xx | 5xx | no answer |".into());
        line("|---|--:|--:|--:|--:|--:|--:|--:|".into());
        for c in &self.classes {
            let t = &c.tally;
            line(format!(
                "| `{}` ({}/min, burst {}): {} | {} | {:.0} / {:.0} | {} | {} | {} | {} | {} |",
                c.class.name(),
                c.per_minute,
                c.burst,
                c.class.sent(),
                t.sent,
                c.offered_per_second,
                c.sent_per_second,
                t.ok,
                t.limited,
                t.refused,
                t.server_errors,
                t.no_answer,
            ));
        }
        line(String::new());
        line("| device call | baseline: n | p50 | p99 | flood: n | p50 | p99 | flood / baseline p50 | p99 | refused or failed |".into());
        line("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|".into());
        let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
        let x = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
        for d in &self.device {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                d.call.label(),
                d.baseline.count,
                ms(d.baseline.p50_ms),
                ms(d.baseline.p99_ms),
                d.flood.count,
                ms(d.flood.p50_ms),
                ms(d.flood.p99_ms),
                x(d.p50_ratio),
                x(d.p99_ratio),
                d.baseline.failures + d.flood.failures,
            ));
        }
        line(String::new());
        line("| server RSS | at start | after the baseline | at the end of the flood |".into());
        line("|---|--:|--:|--:|".into());
        let m = &self.memory;
        line(format!(
            "| peak (`VmHWM`) | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
            mib(m.at_start.peak),
            mib(m.after_baseline.peak),
            mib(m.end_of_flood.peak),
        ));
        line(format!(
            "| current (`VmRSS`) | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
            mib(m.at_start.current),
            mib(m.after_baseline.current),
            mib(m.end_of_flood.current),
        ));
        let mut notes = Vec::new();
        for c in &self.classes {
            if let Some(first) = &c.tally.first_server_error {
                notes.push(format!("first 5xx to `{}`: {first}", c.class.name()));
            }
            if let Some(first) = &c.tally.first_no_answer {
                notes.push(format!("first unanswered `{}`: {first}", c.class.name()));
            }
        }
        for f in self.device_failures.iter().take(10) {
            notes.push(format!(
                "device {:?} failed ({}, {:.1} s): {}",
                f.call, f.phase, f.at_secs, f.error
            ));
        }
        if !notes.is_empty() {
            line(String::new());
            for note in notes {
                line(format!("* {note}"));
            }
        }
        out
    }
}

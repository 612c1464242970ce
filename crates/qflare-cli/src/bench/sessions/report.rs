//! The results: per-operation summaries over the rounds, and the markdown
//! report printed on stdout.

use qflare_protocol::{KemSuite, SignatureSuite};
use serde::Serialize;

use super::Operation;
use super::load::Phase;
use super::server::ServerCounters;

pub(super) fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

/// One operation over all measured rounds.
#[derive(Debug, Serialize)]
pub(super) struct Summary {
    pub(super) operation: Operation,
    pub(super) rounds: usize,
    /// Operations completed, all rounds.
    pub(super) count: u64,
    /// Operations failed, all rounds.
    pub(super) errors: u64,
    /// Measured wall time, all rounds.
    pub(super) wall_secs: f64,
    /// Median over the rounds of each round's rate.
    pub(super) median_rate_per_sec: f64,
    pub(super) min_rate_per_sec: f64,
    pub(super) max_rate_per_sec: f64,
    /// Process CPU (client + server) per operation, all rounds.
    pub(super) cpu_ms_per_op: Option<f64>,
    /// Median over the rounds of (this rate / that round's healthz rate).
    pub(super) ratio_to_healthz: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Ratios {
    /// Median over rounds of sessions/s ÷ healthz/s.
    pub(super) sessions_per_healthz: Option<f64>,
    /// Median over rounds of enrollments/s ÷ healthz/s.
    pub(super) enrollments_per_healthz: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(super) struct Settings {
    pub(super) concurrency: usize,
    pub(super) seconds_per_phase: u64,
    pub(super) warmup_secs: u64,
    pub(super) rounds: usize,
    pub(super) kem_suite: KemSuite,
    pub(super) signature_suite: SignatureSuite,
    pub(super) server_signature_suite: SignatureSuite,
    pub(super) store: &'static str,
    pub(super) rate_limit_per_minute: u32,
    pub(super) rate_limit_burst: u32,
}

#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) benchmark: &'static str,
    pub(super) qflare_version: &'static str,
    /// Unix seconds when the run started.
    pub(super) started_at: u64,
    pub(super) cpus: usize,
    pub(super) settings: Settings,
    pub(super) server: ServerCounters,
    pub(super) operations: Vec<Summary>,
    pub(super) ratios: Ratios,
    pub(super) rounds: Vec<Phase>,
    pub(super) warmup: Vec<Phase>,
}

pub(super) fn summarize(rounds: &[Phase], operation: Operation) -> Summary {
    let phases: Vec<&Phase> = rounds.iter().filter(|p| p.operation == operation).collect();
    let mut rates: Vec<f64> = phases.iter().map(|p| p.rate_per_sec).collect();
    rates.sort_by(f64::total_cmp);
    let count = phases.iter().map(|p| p.count).sum::<u64>();
    let cpu_ms: Option<f64> = phases
        .iter()
        .map(|p| p.cpu_ms_per_op.map(|ms| ms * p.count as f64))
        .sum();
    let mut ratios: Vec<f64> = phases
        .iter()
        .filter_map(|p| {
            let healthz = rounds
                .iter()
                .find(|h| h.operation == Operation::Healthz && h.round == p.round)?;
            (healthz.rate_per_sec > 0.0).then(|| p.rate_per_sec / healthz.rate_per_sec)
        })
        .collect();
    Summary {
        operation,
        rounds: phases.len(),
        count,
        errors: phases.iter().map(|p| p.errors).sum(),
        wall_secs: phases.iter().map(|p| p.wall_secs).sum(),
        median_rate_per_sec: median(&mut rates).unwrap_or(0.0),
        min_rate_per_sec: rates.first().copied().unwrap_or(0.0),
        max_rate_per_sec: rates.last().copied().unwrap_or(0.0),
        cpu_ms_per_op: cpu_ms.filter(|_| count > 0).map(|ms| ms / count as f64),
        ratio_to_healthz: median(&mut ratios),
    }
}

pub(super) fn rate(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

pub(super) fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |r| format!("{r:.4}"))
}

pub(super) fn markdown(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = &report.settings;
    let groups = if report.server.tls_handshakes.is_empty() {
        "none recorded".to_owned()
    } else {
        report
            .server
            .tls_handshakes
            .iter()
            .map(|g| format!("{} ×{}", g.group, g.handshakes))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "## qflare bench sessions\n\n\
         * {} concurrent clients per operation; {} round(s) of healthz → sessions → enrollments, \
         {} s each after a {} s warm-up; rates are the median of the rounds, ratios the median of \
         the per-round ratios.\n\
         * Server in-process on 127.0.0.1 (its own runtime), TLS 1.3; key exchange negotiated: {groups}. \
         Store: {}.\n\
         * Rate limits raised for the benchmark: every class {} per minute, burst {}, so the limiter \
         still checks every request but never refuses one ({} refused); this measures crypto and I/O, \
         not the limiter.\n\
         * Devices: {} + {}; server signs with {}. Client and server share {} CPU(s), so each rate \
         includes the client's work; CPU ms/op is the whole process (client + server) per operation.\n",
        s.concurrency,
        s.rounds,
        s.seconds_per_phase,
        s.warmup_secs,
        s.store,
        s.rate_limit_per_minute,
        s.rate_limit_burst,
        report.server.rate_limited,
        s.kem_suite,
        s.signature_suite,
        s.server_signature_suite,
        report.cpus,
    );
    let _ = writeln!(
        out,
        "| operation | one operation is | count | errors | wall (s) | rate (/s, median) | range (/s) | CPU ms/op | ÷ healthz |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|");
    for op in &report.operations {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {} | {}–{} | {} | {} |",
            op.operation.name(),
            op.operation.what(),
            op.count,
            op.errors,
            op.wall_secs,
            rate(op.median_rate_per_sec),
            rate(op.min_rate_per_sec),
            rate(op.max_rate_per_sec),
            op.cpu_ms_per_op
                .map_or_else(|| "-".into(), |ms| format!("{ms:.2}")),
            ratio(op.ratio_to_healthz),
        );
    }
    let inverse = |r: Option<f64>| {
        r.filter(|r| *r > 0.0)
            .map_or_else(|| "-".into(), |r| format!("{:.0}", 1.0 / r))
    };
    let _ = writeln!(
        out,
        "\nsessions/healthz = {} (one handshake costs about {} health checks); \
         enrollments/healthz = {} (one enrollment costs about {}).\n",
        ratio(report.ratios.sessions_per_healthz),
        inverse(report.ratios.sessions_per_healthz),
        ratio(report.ratios.enrollments_per_healthz),
        inverse(report.ratios.enrollments_per_healthz),
    );
    let _ = writeln!(
        out,
        "| round | healthz/s | sessions/s | enrollments/s | sessions÷healthz | enrollments÷healthz |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|--:|");
    for round in 1..=s.rounds {
        let find = |operation: Operation| {
            report
                .rounds
                .iter()
                .find(|p| p.round == round && p.operation == operation)
                .map(|p| p.rate_per_sec)
        };
        let (h, se, en) = (
            find(Operation::Healthz),
            find(Operation::Sessions),
            find(Operation::Enrollments),
        );
        let cell = |v: Option<f64>| v.map_or_else(|| "-".into(), rate);
        let per = |v: Option<f64>| ratio(v.zip(h).filter(|(_, h)| *h > 0.0).map(|(v, h)| v / h));
        let _ = writeln!(
            out,
            "| {round} | {} | {} | {} | {} | {} |",
            cell(h),
            cell(se),
            cell(en),
            per(se),
            per(en),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}

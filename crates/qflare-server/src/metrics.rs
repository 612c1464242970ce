//! Prometheus metrics, served on their own plain-HTTP listener (keep it on a
//! private interface). Labels carry route names and outcome codes only, never
//! ids, tokens or keys.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of an HTTP request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route pattern.
    pub route: String,
    /// The response status.
    pub status: u16,
}

/// Labels of a TLS handshake counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    /// The negotiated key-exchange group, e.g. `X25519MLKEM768`.
    pub group: String,
}

/// Labels for counters keyed by an outcome code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// A stable outcome code.
    pub outcome: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Completed TLS handshakes by negotiated group.
    pub tls_handshakes: Family<TlsLabels, Counter>,
    /// Failed TLS handshakes.
    pub tls_failures: Counter,
    /// Connections closed on accept, by reason (`total`, `per_address`, `rate`).
    pub connections_refused: Family<OutcomeLabels, Counter>,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Enrollments by outcome.
    pub enrollments: Family<OutcomeLabels, Counter>,
    /// Handshakes by outcome.
    pub sessions: Family<OutcomeLabels, Counter>,
    /// Requests refused by a rate limit, by class.
    pub rate_limited: Family<OutcomeLabels, Counter>,
    /// Audit entries appended.
    pub audit_entries: Counter,
    /// Update envelopes by outcome.
    pub updates: Family<OutcomeLabels, Counter>,
    /// Upload admissions (`POST /v1/updates/admission`) by outcome.
    pub upload_admissions: Family<OutcomeLabels, Counter>,
    /// The current round id.
    pub current_round: Gauge,
    /// The latest global model version.
    pub model_version: Gauge,
    /// Device polls held until the round changes (long polls) now.
    pub long_polls_held: Gauge,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("qflare");
        let metrics = Self {
            requests: Family::default(),
            tls_handshakes: Family::default(),
            tls_failures: Counter::default(),
            connections_refused: Family::default(),
            connections_open: Gauge::default(),
            enrollments: Family::default(),
            sessions: Family::default(),
            rate_limited: Family::default(),
            audit_entries: Counter::default(),
            updates: Family::default(),
            upload_admissions: Family::default(),
            current_round: Gauge::default(),
            model_version: Gauge::default(),
            long_polls_held: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "tls_handshakes",
            "TLS handshakes by negotiated key-exchange group",
            metrics.tls_handshakes.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Failed TLS handshakes",
            metrics.tls_failures.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed on accept, by reason",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open now",
            metrics.connections_open.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollment attempts by outcome",
            metrics.enrollments.clone(),
        );
        registry.register(
            "sessions",
            "Session handshakes by outcome",
            metrics.sessions.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by class",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "audit_entries",
            "Audit ledger entries appended",
            metrics.audit_entries.clone(),
        );
        registry.register(
            "updates",
            "Update envelopes by outcome",
            metrics.updates.clone(),
        );
        registry.register(
            "upload_admissions",
            "Upload admissions asked before an update's body, by outcome",
            metrics.upload_admissions.clone(),
        );
        registry.register(
            "long_polls_held",
            "Device polls held until the round changes",
            metrics.long_polls_held.clone(),
        );
        registry.register(
            "current_round",
            "The current federated round",
            metrics.current_round.clone(),
        );
        registry.register(
            "model_version",
            "The latest global model version",
            metrics.model_version.clone(),
        );
        Arc::new(Self {
            registry,
            ..metrics
        })
    }

    /// Counts one outcome in a family.
    pub fn count(family: &Family<OutcomeLabels, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

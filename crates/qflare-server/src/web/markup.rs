//! The pages' markup: the shared layout (head, navigation) and each page's
//! sections and tables, as maud templates checked at compile time.
//!
//! maud escapes every spliced value, so text from devices, admins and the
//! store (names, labels, audit details, round outcomes) cannot become markup.
//! These functions only shape data the handlers in [`crate::web`] fetched.

use maud::{DOCTYPE, Markup, html};
use qflare_protocol::api::routes;
use qflare_store::AuditEntry;

use crate::api::DeviceView;
use crate::api::federation::{FederationView, RoundView};
use crate::ledger::VerifyReport;

use super::chart::accuracy_chart;

/// A Unix time as RFC 3339 (UTC, seconds), or `-` when out of range.
fn time(unix: i64) -> String {
    u64::try_from(unix)
        .ok()
        .map(|s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

/// The document around every page: head, stylesheet link and navigation.
pub fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width,initial-scale=1";
                title { (title) " · QFLARE" }
                link rel="stylesheet" href=(routes::STYLESHEET);
            }
            body {
                header {
                    h1 { "QFLARE" }
                    a href=(routes::PAGE_DASHBOARD) { "Dashboard" }
                    a href=(routes::PAGE_DEVICES) { "Devices" }
                    a href=(routes::PAGE_AUDIT) { "Audit ledger" }
                }
                main { (body) }
            }
        }
    }
}

/// The dashboard of a federating server: its state, the accuracy chart and
/// the recent rounds.
pub fn federation(view: &FederationView, active_devices: usize, devices: usize) -> Markup {
    let latest = view.models.last();
    html! {
        section {
            h2 { "Federation" }
            div.kv {
                div { "Training" }
                div {
                    @if view.running {
                        span.ok { "running" }
                    } @else {
                        span.muted { "paused (qflare round start)" }
                    }
                }
                div { "Latest model" }
                div {
                    @match latest {
                        Some(m) => { "version " (m.version) " (round " (m.round_id) ")" }
                        None => { "none yet" }
                    }
                }
                div { "Test accuracy" }
                div {
                    @match latest.and_then(|m| m.accuracy) {
                        Some(a) => { (format!("{:.2}%", 100.0 * a)) }
                        None => { "-" }
                    }
                }
                div { "Federated evaluation" }
                div {
                    @match view.models.iter().rev().find_map(|m| m.federated.as_ref().map(|f| (m.version, f))) {
                        Some((version, federated)) => {
                            "version " (version) ": "
                            @for (i, (name, value)) in federated.metrics.iter().enumerate() {
                                @if i > 0 { ", " }
                                (name) " " (format!("{value:.4}"))
                            }
                            " (" (federated.devices) " devices, " (federated.examples) " examples)"
                        }
                        None => { "-" }
                    }
                }
                div { "Differential privacy" }
                div {
                    @match &view.privacy {
                        Some(p) => {
                            "ε = " (format!("{:.3}", p.epsilon))
                            @if let Some(budget) = p.budget { " of " (format!("{budget}")) }
                            " at δ = " (format!("{:e}", p.delta))
                            " after " (p.rounds) " private rounds"
                        }
                        None => { "off" }
                    }
                }
                div { "Devices" }
                div { (active_devices) " active of " (devices) }
                div { "Enclave" }
                div {
                    "generation " (view.enclave_generation) ", software attestation, measurement "
                    code { (view.enclave_measurement.as_deref().unwrap_or("-")) }
                }
            }
        }
        section {
            h2 { "Accuracy history" }
            (accuracy_chart(view))
        }
        section {
            h2 { "Rounds" }
            table {
                tr {
                    th { "Round" } th { "State" } th { "From model" } th { "Selected" }
                    th { "Submitted" } th { "Opened" } th { "Outcome" }
                }
                @for round in &view.rounds {
                    tr {
                        td { (round.id) }
                        td class=(state_class(&round.state)) { (round.state) }
                        td { "v" (round.base_model_version) }
                        td { (round.selected) }
                        td { (round.submitted) }
                        td { (time(round.opened_at)) }
                        td { (outcome(round)) }
                    }
                }
            }
        }
    }
}

/// The dashboard of a server that does not coordinate training.
pub fn no_federation() -> Markup {
    html! {
        section {
            h2 { "Federation" }
            p.muted { "This server does not coordinate training." }
        }
    }
}

fn state_class(state: &str) -> &'static str {
    match state {
        "completed" => "ok",
        "failed" | "cancelled" => "bad",
        _ => "",
    }
}

/// A round's outcome in a few words: the verdict counts, or why it failed.
fn outcome(round: &RoundView) -> String {
    round.outcome.as_ref().map_or_else(String::new, |o| {
        match (o.get("accepted"), o.get("rejected"), o.get("error")) {
            (Some(a), Some(r), _) => format!("{a} accepted, {r} rejected"),
            (_, _, Some(e)) => e.as_str().unwrap_or("").to_owned(),
            _ => String::new(),
        }
    })
}

/// The devices table.
pub fn devices(devices: &[DeviceView]) -> Markup {
    html! {
        section {
            h2 { "Devices" }
            table {
                tr {
                    th { "Id" } th { "Name" } th { "Status" } th { "KEM" } th { "Signature" }
                    th { "Keys" } th { "Enrolled" } th { "Last seen" }
                }
                @for device in devices {
                    tr {
                        td { code { (device.id) } }
                        td { (device.name) }
                        td class=(if device.status == "active" { "ok" } else { "bad" }) {
                            (device.status)
                        }
                        td { (device.kem_suite) }
                        td { (device.signature_suite) }
                        td { "v" (device.key_version) }
                        td { (time(device.enrolled_at)) }
                        td { (device.last_seen_at.map_or_else(|| "-".into(), time)) }
                    }
                }
            }
        }
    }
}

/// The audit page: the chain's verification, then the entries given
/// (newest first).
pub fn audit(report: &VerifyReport, entries: &[AuditEntry]) -> Markup {
    html! {
        section {
            h2 { "Integrity" }
            @match &report.first_bad {
                None => {
                    p.ok {
                        "Chain intact: " (report.entries) " entries, "
                        (report.checkpoints) " signed checkpoints verified."
                    }
                }
                Some((seq, reason)) => {
                    p.bad { "Broken at entry " (seq) ": " (reason) }
                }
            }
        }
        section {
            h2 { "Latest entries" }
            table {
                tr {
                    th { "#" } th { "Time" } th { "Event" } th { "Actor" } th { "Subject" }
                    th { "Detail" }
                }
                @for entry in entries {
                    tr {
                        td { (entry.seq) }
                        td { (time(entry.at)) }
                        td { (entry.kind) }
                        td { (entry.actor) }
                        td { code { (entry.subject) } }
                        td { code { (entry.detail_json) } }
                    }
                }
            }
        }
    }
}

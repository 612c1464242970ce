//! The operator's web pages: a dashboard (rounds, accuracy history, the
//! enclave), the devices, and the audit ledger with its verification.
//!
//! Server-rendered HTML with every value escaped, no JavaScript, and a
//! Content-Security-Policy that allows nothing but this origin's stylesheet.
//! The pages are behind the admin token, presented as the password of HTTP
//! Basic authentication (any user name) so a browser can log in.

use std::fmt::Write as _;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;

use crate::api::admin::device_view;
use crate::api::federation::{FederationView, view};
use crate::app::SharedState;
use crate::error::ApiResult;

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#12203a;color:#fff;padding:14px 24px;display:flex;gap:24px;align-items:baseline}
header h1{font-size:20px;margin:0} header a{color:#b9c8ff;text-decoration:none} header a:hover{text-decoration:underline}
main{padding:20px 24px;max-width:1200px}
section{background:#fff;border-radius:8px;padding:16px 20px;margin-bottom:18px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h2{font-size:16px;margin:0 0 12px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e5e8ee;vertical-align:top}
th{color:#5a6275;font-weight:600}
code{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
.ok{color:#16794c;font-weight:600}.bad{color:#b3261e;font-weight:600}.muted{color:#6b7385}
.kv{display:grid;grid-template-columns:220px 1fr;gap:6px 12px;font-size:14px}
svg text{font-size:11px;fill:#5a6275}
"#;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Escapes text for HTML element and attribute content.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

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

fn page(title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{title} · QFLARE</title><link rel=\"stylesheet\" href=\"/static/qflare.css\"></head><body>\
<header><h1>QFLARE</h1><a href=\"/\">Dashboard</a><a href=\"/devices\">Devices</a><a href=\"/audit\">Audit ledger</a></header>\
<main>{body}</main></body></html>",
        title = escape(title)
    );
    let mut response = Html(html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /static/qflare.css`.
pub async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS).into_response()
}

/// Middleware: the admin token as Basic-auth password (or as a bearer token).
pub async fn require_admin_page(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(token) = v.strip_prefix("Bearer ") {
                Some(token.trim().as_bytes().to_vec())
            } else {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(v.strip_prefix("Basic ")?.trim())
                    .ok()?;
                let colon = decoded.iter().position(|b| *b == b':')?;
                Some(decoded[colon + 1..].to_vec())
            }
        });
    match presented {
        Some(token) if state.admin_token_matches(&token) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"QFLARE admin (password: the admin token)\", charset=\"UTF-8\"",
            )],
            "admin authentication required",
        )
            .into_response(),
    }
}

fn accuracy_chart(view: &FederationView) -> String {
    let points: Vec<(u64, f64)> = view
        .models
        .iter()
        .filter_map(|m| m.accuracy.map(|a| (m.version, a)))
        .collect();
    if points.is_empty() {
        return "<p class=\"muted\">No evaluated model yet (set federation.eval_data to evaluate each new model).</p>".into();
    }
    let (width, height, left, bottom, top, right) = (760.0, 260.0, 48.0, 30.0, 12.0, 16.0);
    let max_version = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let low = points
        .iter()
        .map(|p| p.1)
        .fold(1.0f64, f64::min)
        .clamp(0.0, 0.9);
    let x = |v: u64| left + (v as f64 / max_version) * (width - left - right);
    let y = |a: f64| top + (1.0 - (a - low) / (1.0 - low).max(1e-9)) * (height - top - bottom);
    let mut svg = format!(
        "<svg viewBox=\"0 0 {width} {height}\" width=\"100%\" role=\"img\" aria-label=\"Test accuracy by model version\">"
    );
    for i in 0..=4 {
        let a = low + (1.0 - low) * f64::from(i) / 4.0;
        let _ = write!(
            svg,
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#e5e8ee\"/><text x=\"4\" y=\"{:.1}\">{:.1}%</text>",
            width - right,
            y(a) + 4.0,
            100.0 * a,
            y = y(a)
        );
    }
    let polyline: Vec<String> = points
        .iter()
        .map(|(v, a)| format!("{:.1},{:.1}", x(*v), y(*a)))
        .collect();
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#2f5bd3\" stroke-width=\"2\" points=\"{}\"/>",
        polyline.join(" ")
    );
    for (v, a) in &points {
        let _ = write!(
            svg,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"#2f5bd3\"><title>v{v}: {:.2}%</title></circle>",
            x(*v),
            y(*a),
            100.0 * a
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"{}\">model version 0</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text></svg>",
        height - 8.0,
        width - right,
        height - 8.0,
        max_version
    );
    svg
}

/// `GET /`: the dashboard.
pub async fn dashboard(State(state): State<SharedState>) -> ApiResult<Response> {
    let mut body = String::new();
    let devices = state.store.list_devices().await?;
    let active = devices.iter().filter(|d| d.revoked_at.is_none()).count();
    match view(&state, 25).await {
        Ok(view) => {
            let latest = view.models.last();
            let _ = write!(
                body,
                "<section><h2>Federation</h2><div class=\"kv\">\
<div>Training</div><div>{}</div>\
<div>Latest model</div><div>{}</div>\
<div>Test accuracy</div><div>{}</div>\
<div>Devices</div><div>{active} active of {}</div>\
<div>Enclave</div><div>generation {}, software attestation, measurement <code>{}</code></div></div></section>",
                if view.running { "<span class=\"ok\">running</span>" } else { "<span class=\"muted\">paused (qflare round start)</span>" },
                latest.map_or_else(|| "none yet".into(), |m| format!("version {} (round {})", m.version, m.round_id)),
                latest.and_then(|m| m.accuracy).map_or_else(|| "-".into(), |a| format!("{:.2}%", 100.0 * a)),
                devices.len(),
                view.enclave_generation,
                escape(view.enclave_measurement.as_deref().unwrap_or("-")),
            );
            let _ = write!(body, "<section><h2>Accuracy history</h2>{}</section>", accuracy_chart(&view));
            body.push_str("<section><h2>Rounds</h2><table><tr><th>Round</th><th>State</th><th>From model</th><th>Selected</th><th>Submitted</th><th>Opened</th><th>Outcome</th></tr>");
            for round in &view.rounds {
                let outcome = round.outcome.as_ref().map_or_else(String::new, |o| {
                    match (o.get("accepted"), o.get("rejected"), o.get("error")) {
                        (Some(a), Some(r), _) => format!("{a} accepted, {r} rejected"),
                        (_, _, Some(e)) => e.as_str().unwrap_or("").to_owned(),
                        _ => String::new(),
                    }
                });
                let class = match round.state.as_str() {
                    "completed" => "ok",
                    "failed" | "cancelled" => "bad",
                    _ => "",
                };
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td class=\"{class}\">{}</td><td>v{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    round.id,
                    escape(&round.state),
                    round.base_model_version,
                    round.selected,
                    round.submitted,
                    time(round.opened_at),
                    escape(&outcome)
                );
            }
            body.push_str("</table></section>");
        }
        Err(_) => body.push_str("<section><h2>Federation</h2><p class=\"muted\">This server does not coordinate training.</p></section>"),
    }
    Ok(page("Dashboard", &body))
}

/// `GET /devices`.
pub async fn devices(State(state): State<SharedState>) -> ApiResult<Response> {
    let mut body = String::from(
        "<section><h2>Devices</h2><table><tr><th>Id</th><th>Name</th><th>Status</th><th>KEM</th><th>Signature</th><th>Keys</th><th>Enrolled</th><th>Last seen</th></tr>",
    );
    for device in state.store.list_devices().await?.iter().map(device_view) {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{}</td><td>v{}</td><td>{}</td><td>{}</td></tr>",
            escape(&device.id),
            escape(&device.name),
            if device.status == "active" {
                "ok"
            } else {
                "bad"
            },
            escape(&device.status),
            escape(&device.kem_suite),
            escape(&device.signature_suite),
            device.key_version,
            time(device.enrolled_at),
            device.last_seen_at.map_or_else(|| "-".into(), time)
        );
    }
    body.push_str("</table></section>");
    Ok(page("Devices", &body))
}

/// `GET /audit`: the latest entries and a full verification of the chain.
pub async fn audit(State(state): State<SharedState>) -> ApiResult<Response> {
    let report = crate::ledger::verify(
        state.store.as_ref(),
        state.identity.signing_key.verifying_key(),
    )
    .await?;
    let mut body = String::from("<section><h2>Integrity</h2>");
    match &report.first_bad {
        None => {
            let _ = write!(
                body,
                "<p class=\"ok\">Chain intact: {} entries, {} signed checkpoints verified.</p>",
                report.entries, report.checkpoints
            );
        }
        Some((seq, reason)) => {
            let _ = write!(
                body,
                "<p class=\"bad\">Broken at entry {seq}: {}</p>",
                escape(reason)
            );
        }
    }
    body.push_str("</section><section><h2>Latest entries</h2><table><tr><th>#</th><th>Time</th><th>Event</th><th>Actor</th><th>Subject</th><th>Detail</th></tr>");
    let head = state.store.audit_head().await?.map_or(0, |e| e.seq);
    let mut entries = state
        .store
        .audit_entries(head.saturating_sub(200), 200)
        .await?;
    entries.reverse();
    for entry in entries {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td><code>{}</code></td></tr>",
            entry.seq,
            time(entry.at),
            escape(&entry.kind),
            escape(&entry.actor),
            escape(&entry.subject),
            escape(&entry.detail_json)
        );
    }
    body.push_str("</table></section>");
    Ok(page("Audit ledger", &body))
}

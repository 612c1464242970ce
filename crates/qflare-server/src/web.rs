//! The operator's web pages: a dashboard (rounds, accuracy history, the
//! enclave), the devices, and the audit ledger with its verification. This
//! file owns the handlers: the admin check, fetching from the store and the
//! federation, and the response headers; `web/markup.rs` renders the pages
//! with maud (every value escaped), `web/chart.rs` draws the accuracy chart,
//! and `web/qflare.css` is the stylesheet.
//!
//! Server-rendered HTML, no JavaScript, and a Content-Security-Policy that
//! allows nothing but this origin's stylesheet (so the CSS is served at
//! `/static/qflare.css`, never inlined). The pages are behind the admin
//! token, presented as the password of HTTP Basic authentication (any user
//! name) so a browser can log in.

mod chart;
mod markup;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use maud::Markup;

use crate::api::admin::device_view;
use crate::api::federation::view;
use crate::app::SharedState;
use crate::error::ApiResult;

/// The pages' stylesheet, a constant compiled in.
const CSS: &str = include_str!("web/qflare.css");

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A page in the layout, with the headers every page carries.
fn page(title: &str, body: Markup) -> Response {
    let mut response = Html(markup::layout(title, body).into_string()).into_response();
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

/// `GET /`: the dashboard.
pub async fn dashboard(State(state): State<SharedState>) -> ApiResult<Response> {
    let devices = state.store.list_devices().await?;
    let active = devices.iter().filter(|d| d.revoked_at.is_none()).count();
    let body = match view(&state, 25).await {
        Ok(view) => markup::federation(&view, active, devices.len()),
        Err(_) => markup::no_federation(),
    };
    Ok(page("Dashboard", body))
}

/// `GET /devices`.
pub async fn devices(State(state): State<SharedState>) -> ApiResult<Response> {
    let devices: Vec<_> = state
        .store
        .list_devices()
        .await?
        .iter()
        .map(device_view)
        .collect();
    Ok(page("Devices", markup::devices(&devices)))
}

/// `GET /audit`: the latest entries and a full verification of the chain.
pub async fn audit(State(state): State<SharedState>) -> ApiResult<Response> {
    let report = crate::ledger::verify(state.store.as_ref(), &state.identity.key_history).await?;
    let head = state.store.audit_head().await?.map_or(0, |e| e.seq);
    let mut entries = state
        .store
        .audit_entries(head.saturating_sub(200), 200)
        .await?;
    entries.reverse();
    Ok(page("Audit ledger", markup::audit(&report, &entries)))
}

//! The dashboard's accuracy chart: test accuracy by model version, drawn as
//! inline SVG from numbers only (gridlines, a polyline and one point per
//! evaluated model), so it needs no script and no image route.

use maud::{Markup, html};

use crate::api::federation::FederationView;

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 260.0;
const LEFT: f64 = 48.0;
const BOTTOM: f64 = 30.0;
const TOP: f64 = 12.0;
const RIGHT: f64 = 16.0;

/// One decimal, the precision of every coordinate.
fn coordinate(value: f64) -> String {
    format!("{value:.1}")
}

/// The chart, or a note that no model has been evaluated yet.
///
/// Every attribute is built from numbers; they pass through maud's escaping
/// like any other value (a no-op on digits), so nothing here is pre-escaped.
pub fn accuracy_chart(view: &FederationView) -> Markup {
    let points: Vec<(u64, f64)> = view
        .models
        .iter()
        .filter_map(|m| m.shown_accuracy().map(|a| (m.version, a)))
        .collect();
    if points.is_empty() {
        return html! {
            p.muted { "No evaluated model yet (set federation.eval_data for a built-in model, or have devices report federated evaluation)." }
        };
    }
    let max_version = points.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let low = points
        .iter()
        .map(|p| p.1)
        .fold(1.0f64, f64::min)
        .clamp(0.0, 0.9);
    let x = |v: u64| LEFT + (v as f64 / max_version) * (WIDTH - LEFT - RIGHT);
    let y = |a: f64| TOP + (1.0 - (a - low) / (1.0 - low).max(1e-9)) * (HEIGHT - TOP - BOTTOM);
    let polyline = points
        .iter()
        .map(|(v, a)| format!("{:.1},{:.1}", x(*v), y(*a)))
        .collect::<Vec<_>>()
        .join(" ");
    // SVG elements are closed explicitly: in HTML, `<line>` inside `<svg>` is
    // not a void element, and an unclosed one would swallow its siblings.
    html! {
        svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) width="100%" role="img"
            aria-label="Accuracy by model version" {
            @for i in 0..=4 {
                @let a = low + (1.0 - low) * f64::from(i) / 4.0;
                line x1=(LEFT) x2=(WIDTH - RIGHT) y1=(coordinate(y(a))) y2=(coordinate(y(a)))
                    stroke="#e5e8ee" {}
                text x="4" y=(coordinate(y(a) + 4.0)) { (format!("{:.1}%", 100.0 * a)) }
            }
            polyline fill="none" stroke="#2f5bd3" stroke-width="2" points=(polyline) {}
            @for (v, a) in &points {
                circle cx=(coordinate(x(*v))) cy=(coordinate(y(*a))) r="3" fill="#2f5bd3" {
                    title { "v" (v) ": " (format!("{:.2}%", 100.0 * a)) }
                }
            }
            text x=(LEFT) y=(HEIGHT - 8.0) { "model version 0" }
            text x=(WIDTH - RIGHT) y=(HEIGHT - 8.0) text-anchor="end" { (max_version) }
        }
    }
}

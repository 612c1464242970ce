//! Every route of the server, in one place. The paths themselves are
//! `qflare_protocol::api::routes`, shared with the device and the CLI.
//!
//! | method | path | auth | handler |
//! |---|---|---|---|
//! | GET | `/`, `/devices`, `/audit` | admin token (HTTP Basic password) | [`crate::web`] |
//! | GET | `/static/qflare.css` | — | [`crate::web::stylesheet`] |
//! | GET | `/openapi.json` | — | this API's OpenAPI document ([`crate::openapi`]) |
//! | GET | `/healthz` | — | [`public::healthz`] |
//! | GET | `/v1/server-info` | — | [`public::server_info`] |
//! | POST | `/v1/enroll` | enrollment token | [`public::enroll`] |
//! | POST | `/v1/sessions` | device (handshake) | [`public::open_session`] |
//! | POST | `/v1/sessions/{id}/confirm` | device (handshake) | [`public::confirm_session`] |
//! | POST | `/v1/session/ping` | sealed session | [`device::ping`] |
//! | POST | `/v1/devices/self/rotate-keys` | sealed session | [`device::rotate_keys`] |
//! | POST, GET | `/v1/admin/tokens` | admin token | [`admin::create_token`], [`admin::list_tokens`] |
//! | POST | `/v1/admin/tokens/{id}/revoke` | admin token | [`admin::revoke_token`] |
//! | GET | `/v1/admin/devices` | admin token | [`admin::list_devices`] |
//! | POST | `/v1/admin/devices/{id}/revoke` | admin token | [`admin::revoke_device`] |
//! | GET | `/v1/admin/audit` | admin token | [`admin::list_audit`] |
//! | POST | `/v1/rounds/current` | sealed session | [`federation::current_round`] |
//! | POST | `/v1/models/current` | sealed session | [`federation::current_model`] |
//! | POST | `/v1/updates/admission` | sealed session | [`federation::admit_update`] |
//! | POST | `/v1/updates` | sealed session | [`federation::submit_update`] |
//! | POST | `/v1/evaluations` | sealed session | [`federation::submit_evaluation`] |
//! | GET | `/v1/admin/rounds` | admin token | [`federation::list_rounds`] |
//! | POST | `/v1/admin/rounds/start` | admin token | [`federation::start_rounds`] |
//! | POST | `/v1/admin/rounds/pause` | admin token | [`federation::pause_rounds`] |
//! | POST | `/v1/admin/models` | admin token | [`models::register_model`] |
//! | GET | `/v1/admin/models/{version}` | admin token | [`models::export_model`] |
//! | GET | `/v1/admin/models/{version}/certificate` | admin token | [`models::model_certificate`] |
//! | POST | `/internal/v1/attest`, `/internal/v1/model`, `/internal/v1/updates` | replicas' key | [`replica`] |
//!
//! Layers, outermost first: request metrics, timeout and the headers every
//! answer carries (`Cache-Control: no-store`, `X-Content-Type-Options:
//! nosniff`), then a per-address rate limit chosen by route group (unmatched
//! paths and methods included), then (admin) the bearer check. Per-device
//! limits apply inside the handshake handlers and the sealed extractor.

use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

use qflare_protocol::api::routes;

use crate::api::{admin, device, federation, models, public, replica};
use crate::app::{ClientAddr, SharedState};
use crate::coordination::link;
use crate::error::{ApiError, ErrorCode};
use crate::metrics::RequestLabels;
use crate::openapi::ApiDoc;
use crate::ratelimit::RateLimit;

/// Builds the HTTPS router, and from the same registrations the OpenAPI
/// document it serves at [`routes::OPENAPI`].
pub fn router(state: SharedState) -> Router {
    let open = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(public::healthz))
        .routes(utoipa_axum::routes!(public::server_info))
        .route_layer(from_fn_with_state(state.clone(), limit_public));
    let enroll = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(public::enroll))
        .route_layer(from_fn_with_state(state.clone(), limit_enroll));
    let sessions = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(public::open_session))
        .routes(utoipa_axum::routes!(public::confirm_session))
        .route_layer(from_fn_with_state(state.clone(), limit_sessions));
    let sealed = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(device::ping))
        .routes(utoipa_axum::routes!(device::rotate_keys))
        .routes(utoipa_axum::routes!(federation::current_round))
        .routes(utoipa_axum::routes!(federation::current_model))
        .routes(utoipa_axum::routes!(federation::admit_update))
        .routes(utoipa_axum::routes!(federation::submit_update))
        .routes(utoipa_axum::routes!(federation::submit_evaluation))
        .route_layer(from_fn_with_state(state.clone(), limit_public));
    let admin = OpenApiRouter::new()
        .routes(utoipa_axum::routes!(
            admin::create_token,
            admin::list_tokens
        ))
        .routes(utoipa_axum::routes!(admin::revoke_token))
        .routes(utoipa_axum::routes!(admin::list_devices))
        .routes(utoipa_axum::routes!(admin::revoke_device))
        .routes(utoipa_axum::routes!(admin::list_audit))
        .routes(utoipa_axum::routes!(federation::list_rounds))
        .routes(utoipa_axum::routes!(federation::start_rounds))
        .routes(utoipa_axum::routes!(federation::pause_rounds))
        .routes(utoipa_axum::routes!(models::register_model))
        .routes(utoipa_axum::routes!(models::export_model))
        .routes(utoipa_axum::routes!(models::model_certificate))
        .route_layer(from_fn_with_state(state.clone(), admin::require_admin))
        .route_layer(from_fn_with_state(state.clone(), limit_admin));
    let (api, mut document) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(open)
        .merge(enroll)
        .merge(sessions)
        .merge(sealed)
        .merge(admin)
        .split_for_parts();
    crate::openapi::complete(&mut document);
    // Rendered once: the document is fixed for the life of the process.
    let document = bytes::Bytes::from(crate::openapi::render(&document));
    let spec = Router::new()
        .route(
            routes::OPENAPI,
            get(move || {
                let document = document.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], document) }
            }),
        )
        .route(routes::STYLESHEET, get(crate::web::stylesheet))
        .route_layer(from_fn_with_state(state.clone(), limit_public));
    let pages = Router::new()
        .route(routes::PAGE_DASHBOARD, get(crate::web::dashboard))
        .route(routes::PAGE_DEVICES, get(crate::web::devices))
        .route(routes::PAGE_AUDIT, get(crate::web::audit))
        .route_layer(from_fn_with_state(
            state.clone(),
            crate::web::require_admin_page,
        ))
        .route_layer(from_fn_with_state(state.clone(), limit_admin));
    // Replicas calling the coordinator: authenticated before anything else,
    // and not counted against any per-address limit (one replica carries
    // the requests of all the devices it serves), except when refused.
    let internal = Router::new()
        .route(link::ATTEST, post(replica::attest))
        .route(link::MODEL, post(replica::model))
        .route(
            link::UPDATES,
            post(replica::update).layer(axum::extract::DefaultBodyLimit::max(
                state.config.limits.update_bytes,
            )),
        )
        .route_layer(from_fn_with_state(state.clone(), require_replica));
    Router::new()
        .merge(pages)
        .merge(spec)
        .merge(api)
        .merge(internal)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Unmatched paths and methods spend the public per-address budget like any
/// route, so probing for routes is not a way around the limits.
async fn not_found(State(state): State<SharedState>, request: Request) -> ApiError {
    let limit = state.config.rate_limits.public;
    match state
        .rate_limit("public", &client_key(&request), &limit)
        .await
    {
        Ok(()) => ApiError::not_found("route"),
        Err(err) => err,
    }
}

async fn method_not_allowed(State(state): State<SharedState>, request: Request) -> ApiError {
    let limit = state.config.rate_limits.public;
    match state
        .rate_limit("public", &client_key(&request), &limit)
        .await
    {
        Ok(()) => ApiError::new(ErrorCode::MethodNotAllowed),
        Err(err) => err,
    }
}

/// Metrics and the request timeout, around everything.
async fn observe(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let timeout = Duration::from_secs(state.config.server.request_timeout_secs.max(1));
    let response = match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(ErrorCode::Timeout)
            .detail(format!("{route} exceeded {timeout:?}"))
            .into_response(),
    };
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    protect(response)
}

/// Headers every answer carries. Answers hold secrets (a new enrollment
/// token, session material, the admin's views), so no cache, shared or
/// private, may keep one; and no browser may guess a type other than the one
/// declared (a sealed body or a JSON error rendered as HTML).
fn protect(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn client_key(request: &Request) -> String {
    request
        .extensions()
        .get::<ClientAddr>()
        .map_or_else(|| "unknown".to_owned(), ClientAddr::rate_limit_key)
}

async fn limit_by_address(
    state: &SharedState,
    class: &'static str,
    limit: RateLimit,
    request: Request,
    next: Next,
) -> Response {
    match state.rate_limit(class, &client_key(&request), &limit).await {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

async fn limit_public(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let limit = state.config.rate_limits.public;
    limit_by_address(&state, "public", limit, request, next).await
}

async fn limit_enroll(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let limit = state.config.rate_limits.enroll;
    limit_by_address(&state, "enroll", limit, request, next).await
}

async fn limit_sessions(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let limit = state.config.rate_limits.sessions;
    limit_by_address(&state, "sessions", limit, request, next).await
}

/// Lets through only requests with the replicas' bearer key; a refused
/// one spends the public per-address budget, so guessing costs like probing.
async fn require_replica(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let accepted = match (
        &state.federation,
        request.headers().get(header::AUTHORIZATION),
    ) {
        (Some(coordination), Some(presented)) => coordination.link().accepts(presented.as_bytes()),
        _ => false,
    };
    if accepted {
        return next.run(request).await;
    }
    let limit = state.config.rate_limits.public;
    if let Err(err) = state
        .rate_limit("public", &client_key(&request), &limit)
        .await
    {
        return err.into_response();
    }
    ApiError::new(ErrorCode::Unauthorized)
        .detail("an internal route without the replicas' key")
        .into_response()
}

async fn limit_admin(State(state): State<SharedState>, request: Request, next: Next) -> Response {
    let limit = state.config.rate_limits.admin;
    limit_by_address(&state, "admin", limit, request, next).await
}

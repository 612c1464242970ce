//! The admin API, behind `Authorization: Bearer <QFLARE_ADMIN_TOKEN>`.

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use qflare_protocol::api::routes;
use qflare_protocol::identity::{DeviceId, EnrollmentToken};
use qflare_store::{DeviceRecord, TokenRecord};
use serde::Deserialize;
use serde_json::json;

use super::{AuditView, CreateTokenRequest, CreatedToken, DeviceView, Revoked, TokenView};
use crate::app::SharedState;
use crate::body::read_json;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::ledger::AuditKind;

/// Middleware: only requests carrying the admin token pass.
pub async fn require_admin(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(token) if state.admin_token_matches(token.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::new(ErrorCode::Unauthorized)
            .detail("wrong admin token")
            .into_response(),
        None => ApiError::new(ErrorCode::Unauthorized)
            .detail("no bearer token")
            .into_response(),
    }
}

/// Characters a label may not hold although they are not control
/// characters: bidirectional overrides and isolates (they reorder what the
/// admin reads on the pages and in `qflare token list`, "Trojan Source",
/// CVE-2021-42574) and invisible ones (zero-width, soft hyphen, BOM), with
/// which two labels that look alike differ.
fn is_deceptive(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

fn validate_label(label: &str) -> ApiResult<()> {
    let ok = !label.is_empty()
        && label.chars().count() <= 64
        && !label.chars().any(|c| c.is_control() || is_deceptive(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::InvalidLabel))
    }
}

fn token_status(token: &TokenRecord, now: i64) -> &'static str {
    if token.revoked_at.is_some() {
        "revoked"
    } else if token.used_at.is_some() {
        "used"
    } else if token.expires_at <= now {
        "expired"
    } else {
        "active"
    }
}

/// `POST /v1/admin/tokens`.
#[utoipa::path(
    post, path = routes::ADMIN_TOKENS, tag = "admin", security(("admin_token" = [])),
    request_body = CreateTokenRequest,
    responses((status = 201, description = "The token, shown once.", body = CreatedToken)),
)]
pub async fn create_token(
    State(state): State<SharedState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<impl IntoResponse> {
    let request: CreateTokenRequest = read_json(
        "create token",
        &headers,
        body,
        state.config.limits.admin_bytes,
    )
    .await?;
    validate_label(&request.label)?;
    let ttl = request
        .ttl_secs
        .unwrap_or(state.config.tokens.default_ttl_secs);
    if ttl == 0 || ttl > state.config.tokens.max_ttl_secs {
        return Err(ApiError::new(ErrorCode::InvalidTtl));
    }
    // ThreadRng is not Send: keep it out of the await points below.
    let (token, id_bytes) = {
        let mut rng = rand::rng();
        let mut id_bytes = [0u8; 8];
        rand::Rng::fill_bytes(&mut rng, &mut id_bytes);
        (EnrollmentToken::generate(&mut rng), id_bytes)
    };
    let now = state.now_i64();
    let record = TokenRecord {
        id: hex::encode(id_bytes),
        hash: token.hash().0,
        label: request.label.clone(),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)),
        used_at: None,
        used_by: None,
        revoked_at: None,
    };
    state.store.create_token(&record).await?;
    state
        .audit(
            AuditKind::TokenCreated,
            "admin",
            &record.id,
            json!({ "label": record.label, "expires_at": record.expires_at }),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: record.id,
            token: token.reveal(),
            label: record.label,
            expires_at: record.expires_at,
        }),
    ))
}

/// `GET /v1/admin/tokens`.
#[utoipa::path(
    get, path = routes::ADMIN_TOKENS, tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Every enrollment token (never the token itself).", body = Vec<TokenView>)),
)]
pub async fn list_tokens(State(state): State<SharedState>) -> ApiResult<Json<Vec<TokenView>>> {
    let now = state.now_i64();
    let tokens = state.store.list_tokens().await?;
    Ok(Json(
        tokens
            .iter()
            .map(|t| TokenView {
                id: t.id.clone(),
                label: t.label.clone(),
                status: token_status(t, now).to_owned(),
                created_at: t.created_at,
                expires_at: t.expires_at,
                used_at: t.used_at,
                used_by: t.used_by.clone(),
                revoked_at: t.revoked_at,
            })
            .collect(),
    ))
}

/// `POST /v1/admin/tokens/{id}/revoke`.
#[utoipa::path(
    post, path = routes::ADMIN_TOKEN_REVOKE, tag = "admin", security(("admin_token" = [])),
    params(("id" = String, Path, description = "The token's id.")),
    responses((status = 200, description = "Whether an unused token was revoked.", body = Revoked)),
)]
pub async fn revoke_token(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Revoked>> {
    let revoked = state.store.revoke_token(&id, state.now_i64()).await?;
    if revoked {
        state
            .audit(AuditKind::TokenRevoked, "admin", &id, json!({}))
            .await;
    }
    Ok(Json(Revoked { revoked }))
}

/// A device's public view.
pub fn device_view(d: &DeviceRecord) -> DeviceView {
    DeviceView {
        id: d.id.clone(),
        name: d.name.clone(),
        status: if d.revoked_at.is_some() {
            "revoked"
        } else {
            "active"
        }
        .to_owned(),
        kem_suite: d.keys.kem_suite.clone(),
        signature_suite: d.keys.signature_suite.clone(),
        enrolled_at: d.enrolled_at,
        last_seen_at: d.last_seen_at,
        revoked_at: d.revoked_at,
        key_version: d.key_version,
    }
}

/// `GET /v1/admin/devices`.
#[utoipa::path(
    get, path = routes::ADMIN_DEVICES, tag = "admin", security(("admin_token" = [])),
    responses((status = 200, description = "Enrolled devices.", body = Vec<DeviceView>)),
)]
pub async fn list_devices(State(state): State<SharedState>) -> ApiResult<Json<Vec<DeviceView>>> {
    Ok(Json(
        state
            .store
            .list_devices()
            .await?
            .iter()
            .map(device_view)
            .collect(),
    ))
}

/// `POST /v1/admin/devices/{id}/revoke`: ends its sessions and refuses it from now on.
#[utoipa::path(
    post, path = routes::ADMIN_DEVICE_REVOKE, tag = "admin", security(("admin_token" = [])),
    params(("id" = DeviceId, Path, description = "The device's id.")),
    responses((status = 200, description = "Whether an active device was revoked.", body = Revoked)),
)]
pub async fn revoke_device(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Revoked>> {
    let revoked = state.store.revoke_device(&id, state.now_i64()).await?;
    if revoked {
        state
            .audit(AuditKind::DeviceRevoked, "admin", &id, json!({}))
            .await;
    }
    Ok(Json(Revoked { revoked }))
}

/// Paging of `GET /v1/admin/audit`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Entries after this sequence number.
    #[serde(default)]
    pub after: u64,
    /// At most this many (1 to 1000).
    #[serde(default = "default_audit_limit")]
    pub limit: u32,
}

fn default_audit_limit() -> u32 {
    100
}

/// `GET /v1/admin/audit?after=N&limit=M`.
#[utoipa::path(
    get, path = routes::ADMIN_AUDIT, tag = "admin", security(("admin_token" = [])),
    params(
        ("after" = Option<u64>, Query, description = "Entries after this sequence number (default 0)."),
        ("limit" = Option<u32>, Query, description = "At most this many, 1 to 1000 (default 100)."),
    ),
    responses((status = 200, description = "Audit ledger entries in chain order.", body = Vec<AuditView>)),
)]
pub async fn list_audit(
    State(state): State<SharedState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AuditView>>> {
    // axum's own rejection is plain text that echoes the parser; ours is the stable shape.
    let Query(query) = query.map_err(ApiError::malformed)?;
    let entries = state
        .store
        .audit_entries(query.after, query.limit.clamp(1, 1000))
        .await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| AuditView {
                seq: e.seq,
                at: e.at,
                kind: e.kind,
                actor: e.actor,
                subject: e.subject,
                detail: serde_json::from_str(&e.detail_json).unwrap_or(serde_json::Value::Null),
                hash: e.hash,
            })
            .collect(),
    ))
}

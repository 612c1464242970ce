//! The admin's model routes: register the federation's initial model from
//! a safetensors file, and export any certified version with its
//! certificate (what `qflare model init`, `export` and `verify` use).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use qflare_protocol::api::routes;
use qflare_store::ModelRecord;
use serde::Deserialize;

use super::federation::federation;
use crate::app::SharedState;
use crate::body::read_limited;
use crate::coordination::Coordinator;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::federation::{RegisteredModel, StoredCertificate};

/// `POST /v1/admin/models` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RegisterQuery {
    /// The model's name: 1 to 64 characters of a-z 0-9 . _ -.
    pub name: String,
}

/// `POST /v1/admin/models?name=NAME`: the body is a safetensors file of F32,
/// F16 or BF16 tensors; the enclave certifies it as version 0.
#[utoipa::path(
    post, path = routes::ADMIN_MODELS, tag = "admin", security(("admin_token" = [])),
    params(RegisterQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The initial model as a safetensors file."),
    responses(
        (status = 201, description = "Registered and certified as version 0.", body = RegisteredModel),
        (status = 400, description = "`invalid_model`: the file cannot be federated; `detail` says why.", body = qflare_protocol::api::ErrorBody),
        (status = 409, description = "`model_exists`: the federation's model is fixed already.", body = qflare_protocol::api::ErrorBody),
    ),
)]
pub async fn register_model(
    State(state): State<SharedState>,
    query: Result<Query<RegisterQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(ApiError::malformed)?;
    // The enclave certifies it, so it is registered where the enclave runs.
    let fed = match federation(&state)?.coordinator().await? {
        Coordinator::Local(fed) => fed,
        Coordinator::Remote { address, .. } => {
            return Err(ApiError::new(ErrorCode::Unavailable)
                .explain(format!(
                    "a model is registered at the replica that coordinates ({address}): send it there"
                ))
                .retry_after(1));
        }
    };
    let limit = usize::try_from(state.config.federation.max_model_bytes).unwrap_or(usize::MAX);
    let file = read_limited(&headers, body, limit).await?;
    let registered = fed.register_model(&query.name, file.to_vec()).await?;
    Ok((StatusCode::CREATED, Json(registered)).into_response())
}

async fn stored_model(state: &SharedState, version: &str) -> ApiResult<ModelRecord> {
    let record = if version == "latest" {
        state.store.latest_model().await?
    } else {
        let version: u64 = version
            .parse()
            .map_err(|_| ApiError::malformed("a model version is a number or `latest`"))?;
        state.store.get_model(version).await?
    };
    record.ok_or_else(|| ApiError::new(ErrorCode::NotFound).explain("no such model version"))
}

/// `GET /v1/admin/models/{version}`: the model's safetensors bytes
/// (`version` is a number or `latest`), with its version, name and digest
/// in `x-qflare-model-*` headers.
#[utoipa::path(
    get, path = routes::ADMIN_MODEL, tag = "admin", security(("admin_token" = [])),
    params(("version" = String, Path, description = "A model version, or `latest`.")),
    responses((status = 200, description = "The safetensors file.", content_type = "application/octet-stream", body = Vec<u8>)),
)]
pub async fn export_model(
    State(state): State<SharedState>,
    Path(version): Path<String>,
) -> ApiResult<Response> {
    let record = stored_model(&state, &version).await?;
    let headers = [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (
            header::HeaderName::from_static("x-qflare-model-version"),
            record.version.to_string(),
        ),
        (
            header::HeaderName::from_static("x-qflare-model-name"),
            record.architecture.clone(),
        ),
    ];
    Ok((headers, record.bytes).into_response())
}

/// `GET /v1/admin/models/{version}/certificate`: the enclave's certificate of
/// that model and the attestation report of the enclave boot that signed it,
/// which is what `qflare model verify` checks a file against.
#[utoipa::path(
    get, path = routes::ADMIN_MODEL_CERTIFICATE, tag = "admin", security(("admin_token" = [])),
    params(("version" = String, Path, description = "A model version, or `latest`.")),
    responses((status = 200, description = "The certificate and the signing enclave's report.", body = StoredCertificate)),
)]
pub async fn model_certificate(
    State(state): State<SharedState>,
    Path(version): Path<String>,
) -> ApiResult<Json<StoredCertificate>> {
    let record = stored_model(&state, &version).await?;
    let stored: StoredCertificate = serde_json::from_str(&record.certificate_json)
        .map_err(|e| ApiError::internal(format!("stored certificate: {e}")))?;
    Ok(Json(stored))
}

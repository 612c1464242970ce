//! The OpenAPI 3.1 document served at `/openapi.json`.
//!
//! Paths, parameters and bodies come from the `#[utoipa::path]` attribute
//! on each handler, collected by the router in [`crate::routes`] as it
//! registers them, so a route cannot be served without being documented.
//! This module adds what is the same for every operation: the title, the
//! tags, the admin bearer scheme, and the error body every route may
//! answer with (its `code` is one of [`ErrorCode`]).

#![allow(unused_qualifications)] // the derive's generated code names full paths

use qflare_protocol::api::{ErrorBody, ErrorCode};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, RefOr, ResponseBuilder};
use utoipa::{Modify, PartialSchema, ToSchema};

/// The body of a sealed request or answer: one binary record of the
/// session channel (`application/vnd.qflare.sealed`, docs/api_docs.md §8).
/// Its plaintext is the JSON type each route's description names.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct SealedRecord(#[allow(dead_code)] Vec<u8>);

/// The document's fixed parts; the router fills in the paths.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "QFLARE server API",
        description = "Enrollment, the post-quantum session handshake, sealed device routes \
            and the admin API. Sealed routes carry `application/vnd.qflare.sealed` records \
            inside an established session (see docs/api_docs.md); their inner JSON types are \
            named in each description.",
    ),
    tags(
        (name = "public", description = "Plain JSON over HTTPS: health, server info, enrollment, the handshake."),
        (name = "device", description = "Inside a sealed session: the request and answer are sealed records."),
        (name = "admin", description = "Behind `Authorization: Bearer <QFLARE_ADMIN_TOKEN>`."),
    ),
    modifiers(&AdminTokenScheme),
)]
pub struct ApiDoc;

struct AdminTokenScheme;

impl Modify for AdminTokenScheme {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token (`QFLARE_ADMIN_TOKEN`)."))
                    .build(),
            ),
        );
    }
}

/// Adds the error body as every operation's `default` response and the
/// schemas it names, once the router has collected the paths.
pub fn complete(openapi: &mut OpenApi) {
    let components = openapi.components.get_or_insert_with(Default::default);
    components
        .schemas
        .insert(ErrorBody::name().into_owned(), ErrorBody::schema());
    components
        .schemas
        .insert(ErrorCode::name().into_owned(), ErrorCode::schema());
    let error = ResponseBuilder::new()
        .description(
            "An error: the HTTP status and `code` say what went wrong; \
             `message` is a fixed sentence.",
        )
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    ErrorBody::name(),
                ))))
                .build(),
        )
        .build();
    for item in openapi.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            operation
                .responses
                .responses
                .entry("default".to_owned())
                .or_insert_with(|| RefOr::T(error.clone()));
        }
    }
}

/// The document as served: compact JSON.
pub fn render(openapi: &OpenApi) -> Vec<u8> {
    // Serializing plain data structures with string keys cannot fail.
    serde_json::to_vec(openapi).expect("an OpenAPI document always serializes to JSON")
}

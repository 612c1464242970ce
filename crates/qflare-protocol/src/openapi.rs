//! JSON Schemas for the wire types whose serde form is hand-written (hex
//! ids, suite names, error codes), so the server's OpenAPI document
//! describes exactly what travels. Only built with the `openapi` feature;
//! the structs derive theirs beside their definitions.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::api::ErrorCode;
use crate::identity::{DEVICE_ID_LEN, DeviceId, SESSION_ID_LEN, SessionId};
use crate::suite::{KemSuite, SignatureSuite};

fn string_schema(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::String))
        .description(Some(description))
}

fn finish(object: ObjectBuilder) -> RefOr<Schema> {
    RefOr::T(Schema::Object(Object::from(object)))
}

fn hex_id(bytes: usize, description: &str) -> RefOr<Schema> {
    finish(
        string_schema(description)
            .pattern(Some(format!("^[0-9a-f]{{{}}}$", bytes * 2)))
            .min_length(Some(bytes * 2))
            .max_length(Some(bytes * 2)),
    )
}

impl PartialSchema for DeviceId {
    fn schema() -> RefOr<Schema> {
        hex_id(DEVICE_ID_LEN, "A device id: lowercase hex.")
    }
}
impl ToSchema for DeviceId {}

impl PartialSchema for SessionId {
    fn schema() -> RefOr<Schema> {
        hex_id(SESSION_ID_LEN, "A session id: lowercase hex.")
    }
}
impl ToSchema for SessionId {}

fn names(values: impl IntoIterator<Item = &'static str>) -> Vec<String> {
    values.into_iter().map(str::to_owned).collect()
}

impl PartialSchema for KemSuite {
    fn schema() -> RefOr<Schema> {
        finish(
            string_schema("A key-encapsulation suite.")
                .enum_values(Some(names(KemSuite::ALL.iter().map(|s| s.as_str())))),
        )
    }
}
impl ToSchema for KemSuite {}

impl PartialSchema for SignatureSuite {
    fn schema() -> RefOr<Schema> {
        finish(
            string_schema("A signature suite.")
                .enum_values(Some(names(SignatureSuite::ALL.iter().map(|s| s.as_str())))),
        )
    }
}
impl ToSchema for SignatureSuite {}

impl PartialSchema for ErrorCode {
    fn schema() -> RefOr<Schema> {
        finish(
            string_schema(
                "A stable, machine-readable error code. Clients must accept codes \
                 they do not know (treat them by HTTP status).",
            )
            .enum_values(Some(names(ErrorCode::ALL.iter().map(|c| c.as_str())))),
        )
    }
}
impl ToSchema for ErrorCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ErrorCode")
    }
}

//! The OpenAPI document of the REST API, generated from the code: the operations from the
//! handlers' annotations, the v1 message schema from the same field lists the validator uses
//! (`dmr::message`), so documentation and validation cannot drift apart. Served at `/openapi.json`.

use dmr::message::{CHAT_OPTIONAL, MESSAGE_OPTIONAL, MESSAGE_TYPES};
use std::borrow::Cow;
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::{RefOr, schema};

const UUID_PATTERN: &str = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn uuid() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".into())))
        .pattern(Some(UUID_PATTERN))
}

fn text(min: usize) -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(min))
}

fn closed(builder: ObjectBuilder) -> ObjectBuilder {
    builder
        .schema_type(Type::Object)
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
}

fn with_optional(mut builder: ObjectBuilder, names: &[&str]) -> ObjectBuilder {
    for name in names {
        builder = builder.property(*name, text(0));
    }
    builder
}

fn chat() -> ObjectBuilder {
    let b = ObjectBuilder::new()
        .property("id", uuid())
        .required("id")
        .property("created", text(1))
        .required("created");
    closed(with_optional(b, CHAT_OPTIONAL))
}

fn chat_message() -> ObjectBuilder {
    let b = ObjectBuilder::new()
        .property("id", uuid())
        .required("id")
        .property("chatId", uuid())
        .required("chatId")
        .property("authorTimestamp", text(1))
        .required("authorTimestamp")
        .property("authorRole", text(1))
        .required("authorRole");
    closed(with_optional(b, MESSAGE_OPTIONAL))
}

/// The v1 message body of `POST /v1/messages` (compat §1).
pub struct V1MessageDoc;

impl utoipa::PartialSchema for V1MessageDoc {
    fn schema() -> RefOr<Schema> {
        let payload = closed(
            ObjectBuilder::new()
                .property("chat", chat())
                .required("chat")
                .property("messages", ArrayBuilder::new().items(chat_message()))
                .required("messages"),
        );
        let kinds = schema::ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(MESSAGE_TYPES.iter().copied()));
        closed(
            ObjectBuilder::new()
                .description(Some(
                    "A v1 message; unknown properties anywhere are refused (including senderId).",
                ))
                .property("id", uuid())
                .required("id")
                .property("recipientId", uuid())
                .required("recipientId")
                .property(
                    "timestamp",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
                )
                .required("timestamp")
                .property("type", kinds)
                .required("type")
                .property("payload", payload)
                .required("payload"),
        )
        .into()
    }
}

impl utoipa::ToSchema for V1MessageDoc {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("V1Message")
    }
}

/// The error body: `{"statusCode", "message", "error"}` (NestJS's shape, as the original).
pub struct ErrorDoc;

impl utoipa::PartialSchema for ErrorDoc {
    fn schema() -> RefOr<Schema> {
        let message = schema::OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(ArrayBuilder::new().items(ObjectBuilder::new().schema_type(Type::String)));
        ObjectBuilder::new()
            .property("statusCode", ObjectBuilder::new().schema_type(Type::Integer))
            .required("statusCode")
            .property("message", message)
            .required("message")
            .property("error", ObjectBuilder::new().schema_type(Type::String))
            .required("error")
            .into()
    }
}

impl utoipa::ToSchema for ErrorDoc {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Error")
    }
}

/// The document.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "DMR agent REST API",
        description = "Hand messages to the agent for another organisation's agent."
    ),
    paths(crate::api::post_message, crate::api::health, crate::api::ready, crate::api::metrics),
    components(schemas(V1MessageDoc, ErrorDoc))
)]
pub struct ApiDoc;

//! The v1 message that internal services POST to an agent (compat §1) and its validation.
//!
//! Validation follows the original's class-validator DTOs with `forbidNonWhitelisted`: every unknown
//! property anywhere is an error, every error names its path (`payload.messages.0.id must be a
//! UUID`), and all errors are reported at once. Where the original was lax we are stricter, and
//! say so: `payload`, `payload.chat` and `payload.messages` (an array) are required here.

use serde::Serialize;
use serde_json::{Map, Value};

/// Message types known today. The field is a string so more can be added without a new version.
pub const MESSAGE_TYPES: &[&str] = &["ChatMessage"];

const TOP_LEVEL: &[&str] = &["id", "recipientId", "timestamp", "type", "payload"];
const PAYLOAD: &[&str] = &["chat", "messages"];
/// Optional string fields of `payload.chat`.
pub const CHAT_OPTIONAL: &[&str] = &[
    "endUserFirstName",
    "endUserLastName",
    "endUserId",
    "endUserEmail",
    "endUserPhone",
    "customerSupportDisplayName",
    "endUserOs",
    "endUserUrl",
];
/// Optional string fields of each `payload.messages[]` item.
pub const MESSAGE_OPTIONAL: &[&str] = &[
    "content",
    "event",
    "csaTitle",
    "authorId",
    "authorFirstName",
    "authorLastName",
    "forwardedByUser",
    "forwardedFromCsa",
    "forwardedToCsa",
    "originalBaseId",
    "originalCreated",
    "rating",
    "created",
    "preview",
    "updated",
    "buttons",
    "options",
];

/// A validated v1 message. `payload` is kept as the caller sent it (property order included).
#[derive(Debug, Clone, PartialEq)]
pub struct V1Message {
    /// Message id.
    pub id: String,
    /// Recipient agent id.
    pub recipient_id: String,
    /// Sender's timestamp, as sent.
    pub timestamp: String,
    /// Message type.
    pub kind: String,
    /// The plaintext payload.
    pub payload: Value,
}

/// What an agent POSTs to `OUTGOING_MESSAGE_ENDPOINT`, in the original's property order.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OutgoingMessage {
    /// Message id.
    pub id: String,
    /// Sender agent id.
    pub sender_id: String,
    /// Recipient agent id.
    pub recipient_id: String,
    /// Sender's timestamp.
    pub timestamp: String,
    /// Message type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The decrypted payload (absent when the sender sent none).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub payload: Option<Value>,
}

/// True for any 8-4-4-4-12 hex string, case-insensitive (class-validator `IsUUID()`, version "all").
pub fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Validates a parsed JSON body. On failure returns every error as `"<path> <constraint>"`.
pub fn validate(body: &Value) -> Result<V1Message, Vec<String>> {
    let Value::Object(top) = body else {
        return Err(vec!["body must be a JSON object".to_owned()]);
    };
    let mut errors = Vec::new();
    unknown_properties(top, TOP_LEVEL, "", &mut errors);
    uuid_field(top, "id", "", &mut errors);
    uuid_field(top, "recipientId", "", &mut errors);
    if !top
        .get("timestamp")
        .and_then(Value::as_str)
        .is_some_and(crate::time::is_iso8601)
    {
        errors.push("timestamp must be a valid ISO 8601 date string".to_owned());
    }
    if !top
        .get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| MESSAGE_TYPES.contains(&t))
    {
        errors.push(format!(
            "type must be one of the following values: {}",
            MESSAGE_TYPES.join(", ")
        ));
    }
    match top.get("payload") {
        Some(Value::Object(payload)) => validate_payload(payload, &mut errors),
        Some(_) => errors.push("payload must be an object".to_owned()),
        None => errors.push("payload should not be empty".to_owned()),
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let text = |k: &str| top.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    Ok(V1Message {
        id: text("id"),
        recipient_id: text("recipientId"),
        timestamp: text("timestamp"),
        kind: text("type"),
        payload: top.get("payload").cloned().unwrap_or(Value::Null),
    })
}

fn validate_payload(payload: &Map<String, Value>, errors: &mut Vec<String>) {
    unknown_properties(payload, PAYLOAD, "payload.", errors);
    match payload.get("chat") {
        Some(Value::Object(chat)) => {
            unknown_properties(
                chat,
                &[&["id", "created"], CHAT_OPTIONAL].concat(),
                "payload.chat.",
                errors,
            );
            uuid_field(chat, "id", "payload.chat.", errors);
            non_empty_string(chat, "created", "payload.chat.", errors);
            optional_strings(chat, CHAT_OPTIONAL, "payload.chat.", errors);
        }
        Some(_) => errors.push("payload.chat must be an object".to_owned()),
        None => errors.push("payload.chat should not be empty".to_owned()),
    }
    match payload.get("messages") {
        Some(Value::Array(messages)) => {
            let allowed = [&["id", "chatId", "authorTimestamp", "authorRole"], MESSAGE_OPTIONAL].concat();
            for (i, m) in messages.iter().enumerate() {
                let prefix = format!("payload.messages.{i}.");
                let Value::Object(m) = m else {
                    errors.push(format!("payload.messages.{i} must be an object"));
                    continue;
                };
                unknown_properties(m, &allowed, &prefix, errors);
                uuid_field(m, "id", &prefix, errors);
                uuid_field(m, "chatId", &prefix, errors);
                non_empty_string(m, "authorTimestamp", &prefix, errors);
                non_empty_string(m, "authorRole", &prefix, errors);
                optional_strings(m, MESSAGE_OPTIONAL, &prefix, errors);
            }
        }
        Some(_) => errors.push("payload.messages must be an array".to_owned()),
        None => errors.push("payload.messages must be an array".to_owned()),
    }
}

fn unknown_properties(obj: &Map<String, Value>, allowed: &[&str], prefix: &str, errors: &mut Vec<String>) {
    for key in obj.keys().filter(|k| !allowed.contains(&k.as_str())) {
        errors.push(format!("{prefix}property {key} should not exist"));
    }
}

fn uuid_field(obj: &Map<String, Value>, key: &str, prefix: &str, errors: &mut Vec<String>) {
    if !obj.get(key).and_then(Value::as_str).is_some_and(is_uuid) {
        errors.push(format!("{prefix}{key} must be a UUID"));
    }
}

fn non_empty_string(obj: &Map<String, Value>, key: &str, prefix: &str, errors: &mut Vec<String>) {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => {}
        Some(Value::String(_)) | None => errors.push(format!("{prefix}{key} should not be empty")),
        Some(_) => errors.push(format!("{prefix}{key} must be a string")),
    }
}

fn optional_strings(obj: &Map<String, Value>, keys: &[&str], prefix: &str, errors: &mut Vec<String>) {
    for key in keys {
        if obj.get(*key).is_some_and(|v| !v.is_string()) {
            errors.push(format!("{prefix}{key} must be a string"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn seed() -> Value {
        json!({
            "id": "b1a7e8c2-1234-4f56-9abc-1234567890ab",
            "recipientId": "d3b07384-d9a0-4c3f-a4e2-123456789abc",
            "timestamp": "2024-01-15T10:30:00.000Z",
            "type": "ChatMessage",
            "payload": {
                "chat": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479", "created": "2024-01-15T10:00:00.000Z"},
                "messages": [{
                    "id": "550e8400-e29b-41d4-a716-446655440000",
                    "chatId": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                    "content": "example string 2",
                    "authorTimestamp": "2024-01-15T10:30:00.000Z",
                    "authorRole": "end-user"
                }]
            }
        })
    }

    #[test]
    fn the_seed_example_is_valid() {
        let m = validate(&seed()).unwrap();
        assert_eq!(m.recipient_id, "d3b07384-d9a0-4c3f-a4e2-123456789abc");
        assert_eq!(m.payload, seed()["payload"]);
    }

    #[test]
    fn every_error_names_its_path() {
        let mut body = seed();
        body["id"] = json!("nope");
        body["senderId"] = json!("d3b07384-d9a0-4c3f-a4e2-123456789abc");
        body["timestamp"] = json!("yesterday");
        body["type"] = json!("Fax");
        body["payload"]["chat"]["foo"] = json!(1);
        body["payload"]["messages"][0]["chatId"] = json!("x");
        body["payload"]["messages"][0]["buttons"] = json!([]);
        body["payload"]["messages"][0]
            .as_object_mut()
            .unwrap()
            .remove("authorRole");
        let errors = validate(&body).unwrap_err();
        for expected in [
            "property senderId should not exist",
            "id must be a UUID",
            "timestamp must be a valid ISO 8601 date string",
            "type must be one of the following values: ChatMessage",
            "payload.chat.property foo should not exist",
            "payload.messages.0.chatId must be a UUID",
            "payload.messages.0.buttons must be a string",
            "payload.messages.0.authorRole should not be empty",
        ] {
            assert!(
                errors.iter().any(|e| e == expected),
                "missing {expected:?} in {errors:?}"
            );
        }
        assert_eq!(errors.len(), 8, "{errors:?}");
    }

    #[test]
    fn non_objects_and_missing_parts_fail() {
        assert!(validate(&json!([1])).is_err());
        let mut body = seed();
        body.as_object_mut().unwrap().remove("payload");
        assert_eq!(validate(&body).unwrap_err(), vec!["payload should not be empty"]);
        assert!(is_uuid("00000000-0000-0000-0000-000000000000"));
        assert!(is_uuid("A1E45678-12BC-4EF0-9876-DEF123456789"));
        assert!(!is_uuid("a1e4567812bc4ef09876def123456789"));
    }
}

//! The envelope exchanged between agents and servers (compat §2), its validation at the server
//! (compat §5) and the `validation-failures` record format.
//!
//! One validation path serves both transports: [`validate_fields`] reads a gRPC envelope and the
//! JSON object a legacy agent sends through the same [`EnvelopeFields`] view (by the JSON field
//! names), so the rules cannot drift apart, and a gRPC envelope is never turned into JSON to be
//! checked.

use crate::error::{ErrorType, MessageError};
use crate::message::{MESSAGE_TYPES, is_uuid};
use crate::proto;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The envelope: clear metadata plus the JWE `payload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Message id.
    pub id: String,
    /// Sender agent id.
    pub sender_id: String,
    /// Recipient agent id.
    pub recipient_id: String,
    /// Sender's timestamp (`toISOString` form).
    pub timestamp: String,
    /// Message type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Compact JWE.
    pub payload: String,
    /// Set by the server on acceptance.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub received_at: Option<String>,
}

impl Envelope {
    /// Converts from the protobuf form (an empty `received_at` means unset).
    pub fn from_proto(e: proto::Envelope) -> Self {
        Self {
            id: e.id,
            sender_id: e.sender_id,
            recipient_id: e.recipient_id,
            timestamp: e.timestamp,
            kind: e.r#type,
            payload: e.payload,
            received_at: Some(e.received_at).filter(|s| !s.is_empty()),
        }
    }

    /// Converts to the protobuf form.
    pub fn to_proto(&self) -> proto::Envelope {
        proto::Envelope {
            id: self.id.clone(),
            sender_id: self.sender_id.clone(),
            recipient_id: self.recipient_id.clone(),
            timestamp: self.timestamp.clone(),
            r#type: self.kind.clone(),
            payload: self.payload.clone(),
            received_at: self.received_at.clone().unwrap_or_default(),
        }
    }

    /// The JSON value of this envelope, as a legacy agent would send it.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// What the validator needs to know about the world.
pub struct ValidationContext<'a> {
    /// The agent whose connection carried the envelope.
    pub authenticated_agent: &'a str,
    /// Whether an agent id is in the directory.
    pub is_known_agent: &'a dyn Fn(&str) -> bool,
    /// Largest accepted `payload`, in bytes.
    pub max_payload_bytes: usize,
}

/// Validates a raw envelope in the original's order (object, format, timestamp, type, sender,
/// recipient), collecting every error. The sender must be the authenticated agent (the original
/// did not check this: compat §5 weakness).
pub fn validate(raw: &Value, ctx: &ValidationContext<'_>) -> Result<Envelope, Vec<MessageError>> {
    let Value::Object(obj) = raw else {
        return Err(vec![MessageError::new(
            ErrorType::InvalidObject,
            "message must be a JSON object",
        )]);
    };
    validate_fields(obj, ctx)?;
    let text = |k: &str| str_field(obj, k).unwrap_or_default().to_owned();
    Ok(Envelope {
        id: text("id"),
        sender_id: text("senderId").to_ascii_lowercase(),
        recipient_id: text("recipientId").to_ascii_lowercase(),
        timestamp: text("timestamp"),
        kind: text("type"),
        payload: text("payload"),
        received_at: None,
    })
}

/// Validates a gRPC envelope by the same rules as [`validate`], without copying it; on failure the
/// envelope is handed back with the errors (for the validation-failures record).
#[allow(clippy::result_large_err)]
pub fn validate_proto(
    e: proto::Envelope,
    ctx: &ValidationContext<'_>,
) -> Result<Envelope, (Vec<MessageError>, proto::Envelope)> {
    if let Err(errors) = validate_fields(&e, ctx) {
        return Err((errors, e));
    }
    Ok(Envelope {
        id: e.id,
        sender_id: e.sender_id.to_ascii_lowercase(),
        recipient_id: e.recipient_id.to_ascii_lowercase(),
        timestamp: e.timestamp,
        kind: e.r#type,
        payload: e.payload,
        received_at: None,
    })
}

/// Read access to an envelope's fields by their JSON names, whatever form the envelope has.
pub trait EnvelopeFields {
    /// The value of field `key` if it is present and a string.
    fn text(&self, key: &str) -> Option<&str>;
    /// True if `receivedAt` is present but not a string.
    fn received_at_malformed(&self) -> bool;
}

impl EnvelopeFields for Map<String, Value> {
    fn text(&self, key: &str) -> Option<&str> {
        str_field(self, key)
    }

    fn received_at_malformed(&self) -> bool {
        self.get("receivedAt").is_some_and(|v| !v.is_string())
    }
}

impl EnvelopeFields for proto::Envelope {
    fn text(&self, key: &str) -> Option<&str> {
        // proto3 strings are always present (empty when unset), as `""` would be in JSON.
        Some(match key {
            "id" => &self.id,
            "senderId" => &self.sender_id,
            "recipientId" => &self.recipient_id,
            "timestamp" => &self.timestamp,
            "type" => &self.r#type,
            "payload" => &self.payload,
            "receivedAt" => &self.received_at,
            _ => return None,
        })
    }

    fn received_at_malformed(&self) -> bool {
        false
    }
}

/// The checks of [`validate`] on any form of envelope, collecting every error.
pub fn validate_fields<F: EnvelopeFields + ?Sized>(
    obj: &F,
    ctx: &ValidationContext<'_>,
) -> Result<(), Vec<MessageError>> {
    let mut errors = Vec::new();
    let format = |e: &mut Vec<MessageError>, msg: String| e.push(MessageError::new(ErrorType::InvalidFormat, msg));
    for key in ["id", "senderId", "recipientId"] {
        if !obj.text(key).is_some_and(is_uuid) {
            format(&mut errors, format!("{key} must be a UUID"));
        }
    }
    for key in ["timestamp", "payload"] {
        if obj.text(key).is_none_or(str::is_empty) {
            format(&mut errors, format!("{key} must be a non-empty string"));
        }
    }
    if obj.text("payload").is_some_and(|p| p.len() > ctx.max_payload_bytes) {
        format(&mut errors, format!("payload exceeds {} bytes", ctx.max_payload_bytes));
    }
    if let Some(payload) = obj
        .text("payload")
        .filter(|p| !p.is_empty() && p.len() <= ctx.max_payload_bytes)
        && !is_compact_jwe(payload)
    {
        // Refused before it is queued: the recipient could only fail to decrypt it later.
        format(
            &mut errors,
            "payload must be a compact JWE: five base64url parts separated by dots (header.key.iv.ciphertext.tag)"
                .to_owned(),
        );
    }
    if obj.received_at_malformed() {
        format(&mut errors, "receivedAt must be a string".to_owned());
    }
    let timestamp = obj.text("timestamp").unwrap_or_default();
    if !timestamp.is_empty() && !crate::time::is_js_iso_string(timestamp) {
        errors.push(MessageError::new(
            ErrorType::InvalidTimestamp,
            format!("timestamp {timestamp:?} is not an ISO-8601 instant like 2024-01-15T10:30:00.000Z"),
        ));
    }
    if !obj.text("type").is_some_and(|t| MESSAGE_TYPES.contains(&t)) {
        errors.push(MessageError::new(
            ErrorType::InvalidMessageType,
            format!("type must be one of: {}", MESSAGE_TYPES.join(", ")),
        ));
    }
    if let Some(sender) = obj.text("senderId").filter(|s| is_uuid(s)) {
        if !sender.eq_ignore_ascii_case(ctx.authenticated_agent) {
            errors.push(MessageError::new(
                ErrorType::InvalidSenderId,
                format!(
                    "senderId {sender} is not the authenticated agent {}",
                    ctx.authenticated_agent
                ),
            ));
        } else if !(ctx.is_known_agent)(sender) {
            errors.push(MessageError::new(
                ErrorType::InvalidSenderId,
                format!("sender {sender} is not a known agent"),
            ));
        }
    }
    if let Some(recipient) = obj.text("recipientId").filter(|s| is_uuid(s))
        && !(ctx.is_known_agent)(recipient)
    {
        errors.push(MessageError::new(
            ErrorType::InvalidRecipientId,
            format!("recipient {recipient} is not a known agent"),
        ));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// The compact JWE serialization's shape (RFC 7516 §7.1): five base64url parts; only the
/// encrypted key may be empty (direct key agreement has none). Decrypting is the recipient's job.
pub fn is_compact_jwe(payload: &str) -> bool {
    let parts: Vec<&str> = payload.split('.').collect();
    let base64url = |p: &str| p.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    parts.len() == 5
        && parts.iter().all(|p| base64url(p))
        && parts.iter().enumerate().all(|(i, p)| i == 1 || !p.is_empty())
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

/// A record in the `validation-failures` queue, in the original's format (compat §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ValidationFailure {
    /// The message's id when it had a string one, else a fresh UUID.
    pub id: String,
    /// Why it failed.
    pub errors: Vec<MessageError>,
    /// When the server saw it.
    pub received_at: String,
    /// The message as received.
    pub message: Value,
}

impl ValidationFailure {
    /// Builds a record for `message` now.
    pub fn new(message: Value, errors: Vec<MessageError>) -> Self {
        let id = match message.get("id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => uuid::Uuid::new_v4().to_string(),
        };
        Self {
            id,
            errors,
            received_at: crate::time::now_iso(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const A: &str = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
    const B: &str = "a1e45678-12bc-4ef0-9876-def123456789";

    fn known(id: &str) -> bool {
        id.eq_ignore_ascii_case(A) || id.eq_ignore_ascii_case(B)
    }

    fn ctx() -> ValidationContext<'static> {
        ValidationContext {
            authenticated_agent: A,
            is_known_agent: &known,
            max_payload_bytes: 1000,
        }
    }

    fn good() -> Value {
        json!({"id": "b1a7e8c2-1234-4f56-9abc-1234567890ab", "senderId": A, "recipientId": B,
               "timestamp": "2024-01-15T10:30:00.000Z", "type": "ChatMessage", "payload": "x.y.z.w.v"})
    }

    fn kinds(v: &Value) -> Vec<ErrorType> {
        validate(v, &ctx()).unwrap_err().into_iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_good_envelope_passes_and_round_trips_proto() {
        let e = validate(&good(), &ctx()).unwrap();
        assert_eq!(Envelope::from_proto(e.to_proto()), e);
        assert_eq!(e.to_value(), good());
    }

    #[test]
    fn each_rule_reports_its_type() {
        assert_eq!(kinds(&json!("str")), vec![ErrorType::InvalidObject]);
        let mut v = good();
        v["id"] = json!("1");
        assert_eq!(kinds(&v), vec![ErrorType::InvalidFormat]);
        let mut v = good();
        v["timestamp"] = json!("2024-01-15T10:30:00Z");
        assert_eq!(kinds(&v), vec![ErrorType::InvalidTimestamp]);
        let mut v = good();
        v["type"] = json!("Fax");
        assert_eq!(kinds(&v), vec![ErrorType::InvalidMessageType]);
        let mut v = good();
        v["senderId"] = json!(B);
        assert_eq!(kinds(&v), vec![ErrorType::InvalidSenderId]);
        let mut v = good();
        v["recipientId"] = json!("00000000-0000-0000-0000-000000000000");
        assert_eq!(kinds(&v), vec![ErrorType::InvalidRecipientId]);
        let mut v = good();
        v["payload"] = json!("x".repeat(1001));
        assert_eq!(kinds(&v), vec![ErrorType::InvalidFormat]);
    }

    #[test]
    fn a_payload_that_is_not_a_compact_jwe_is_refused() {
        for bad in [
            "hello",
            "a.b.c",
            "a.b.c.d.e.f",
            "a.b.c.d.",
            "a.b.c.d.e=",
            "{\"x\":1}.b.c.d.e",
            "a.b..d.e",
        ] {
            let mut v = good();
            v["payload"] = json!(bad);
            let errors = validate(&v, &ctx()).unwrap_err();
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            assert_eq!(errors[0].kind, ErrorType::InvalidFormat, "{bad}");
            assert!(errors[0].message.contains("compact JWE"), "{bad}");
        }
        // Direct key agreement leaves the encrypted key empty.
        assert!(is_compact_jwe("eyJhbGciOiJkaXIifQ..iv.ct.tag"));
    }

    #[test]
    fn failure_record_has_the_originals_shape() {
        let r = ValidationFailure::new(good(), vec![MessageError::new(ErrorType::InvalidSenderId, "x")]);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["id"], "b1a7e8c2-1234-4f56-9abc-1234567890ab");
        assert_eq!(v["errors"][0]["type"], "INVALID_SENDER_ID");
        assert!(v["receivedAt"].as_str().is_some_and(crate::time::is_js_iso_string));
        assert_eq!(v["message"], good());
        let r = ValidationFailure::new(json!([1]), vec![]);
        assert!(is_uuid(&r.id));
    }
}

//! Error kinds reported about messages, with the original's names (compat §5).

use serde::{Deserialize, Serialize};

/// The kind of a message error, spelled as the original spells it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorType {
    /// The body is not a JSON object.
    InvalidObject,
    /// A field has the wrong format (not a UUID, empty, too large…).
    InvalidFormat,
    /// The sender is unknown or is not the authenticated agent.
    InvalidSenderId,
    /// The recipient is not in the directory.
    InvalidRecipientId,
    /// The message type is not known.
    InvalidMessageType,
    /// The timestamp is not an ISO-8601 instant in `toISOString` form.
    InvalidTimestamp,
    /// Anything else.
    Unknown,
    /// The recipient agent could not decrypt or verify the payload.
    DecryptionFailed,
    /// The recipient agent could not hand the message to its internal endpoint.
    DeliveryFailed,
}

impl ErrorType {
    /// The wire name, e.g. `INVALID_SENDER_ID`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidObject => "INVALID_OBJECT",
            Self::InvalidFormat => "INVALID_FORMAT",
            Self::InvalidSenderId => "INVALID_SENDER_ID",
            Self::InvalidRecipientId => "INVALID_RECIPIENT_ID",
            Self::InvalidMessageType => "INVALID_MESSAGE_TYPE",
            Self::InvalidTimestamp => "INVALID_TIMESTAMP",
            Self::Unknown => "UNKNOWN",
            Self::DecryptionFailed => "DECRYPTION_FAILED",
            Self::DeliveryFailed => "DELIVERY_FAILED",
        }
    }

    /// Parses a wire name; unknown names map to [`ErrorType::Unknown`].
    pub fn parse(name: &str) -> Self {
        serde_json::from_value(serde_json::Value::String(name.to_owned())).unwrap_or(Self::Unknown)
    }
}

/// One error about a message: `{type, message}` as in the original's validation-failure records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageError {
    /// The kind.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// Human-readable detail.
    pub message: String,
}

impl MessageError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Converts to the protobuf form.
    pub fn to_proto(&self) -> crate::proto::MessageError {
        crate::proto::MessageError {
            r#type: self.kind.as_str().to_owned(),
            message: self.message.clone(),
        }
    }

    /// Converts from the protobuf form.
    pub fn from_proto(e: &crate::proto::MessageError) -> Self {
        Self::new(ErrorType::parse(&e.r#type), e.message.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in [
            ErrorType::InvalidObject,
            ErrorType::InvalidSenderId,
            ErrorType::DecryptionFailed,
            ErrorType::DeliveryFailed,
        ] {
            assert_eq!(ErrorType::parse(t.as_str()), t);
        }
        assert_eq!(ErrorType::parse("NOPE"), ErrorType::Unknown);
        let json = serde_json::to_string(&MessageError::new(ErrorType::InvalidTimestamp, "x")).unwrap();
        assert_eq!(json, r#"{"type":"INVALID_TIMESTAMP","message":"x"}"#);
    }
}

//! Seed messages: the original README's example v1 body.

use serde_json::Value;

/// The original README's example body, addressed to `recipient`, with a fresh message id.
pub fn seed_message(recipient: &str) -> Value {
    v1_message(recipient, "example string 2")
}

/// The same body with `content` as the first chat message's text (the benchmark carries the send
/// instant there).
pub fn v1_message(recipient: &str, content: &str) -> Value {
    serde_json::json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "recipientId": recipient,
        "timestamp": "2024-01-15T10:30:00.000Z",
        "type": "ChatMessage",
        "payload": {
            "chat": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479", "created": "2024-01-15T10:00:00.000Z"},
            "messages": [{
                "id": "550e8400-e29b-41d4-a716-446655440000",
                "chatId": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                "content": content,
                "authorTimestamp": "2024-01-15T10:30:00.000Z",
                "authorRole": "end-user"
            }]
        }
    })
}

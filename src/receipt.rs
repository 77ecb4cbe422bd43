//! Delivery receipts (issue "Delivery status and signed receipts", `docs/receipts.md`): what a
//! recipient agent signs once its endpoint accepted a message, and how the sender checks it. Only
//! the format is here; nothing sends or stores receipts yet.
//!
//! A receipt is a compact RS256 JWS (the same shape as the payload's inner JWS, [`jose::sign_jws`])
//! over `{"mid","sid","rid","dat","dig"}`: message id, sender id, recipient id, delivered-at
//! (ISO-8601) and `sha256:<base64url>` of the JWE's plaintext — the sender's inner JWS, which the
//! sender made and the recipient decrypted, byte for byte the same at both ends. Signed with the
//! recipient's private key, it cannot be made by the server, and the digest binds it to the content
//! the recipient's endpoint received. (A digest of the payload as JSON would not do: serde_json reads
//! some floats back one ULP off, so the two ends could disagree about the same message — found by
//! the `receipt` fuzz target.)
//!
//! **Invariant:** [`verify`] returns a receipt only if the signature verifies with the recipient's
//! key *and* it names exactly the message, sender and recipient the caller expected.

use crate::jose::{self, JoseError};
use crate::keys::{PrivateKey, PublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Value, json};

/// What a receipt says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub sender_id: String,
    /// The recipient that signed it.
    pub recipient_id: String,
    /// When the recipient's endpoint accepted the message (ISO-8601).
    pub delivered_at: String,
    /// `sha256:<base64url>` of the JWE plaintext ([`digest`]).
    pub digest: String,
}

/// Why a receipt was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReceiptError {
    /// Not a JWS signed by the recipient's key (forged, altered, or another key).
    #[error("receipt signature: {0}")]
    Jose(#[from] JoseError),
    /// Signed, but not a receipt: a claim is missing or not a string.
    #[error("receipt claim {0:?} missing or not a string")]
    Claim(&'static str),
    /// Signed, but for another message, sender or recipient than expected.
    #[error("receipt is for {field} {found:?}, expected {expected:?}")]
    Mismatch {
        /// Which claim.
        field: &'static str,
        /// What the receipt says.
        found: String,
        /// What the caller expected.
        expected: String,
    },
}

/// `sha256:<base64url>` of `plaintext` (the JWE's plaintext: the sender's inner JWS).
pub fn digest(plaintext: &[u8]) -> String {
    let hash = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, plaintext);
    format!("sha256:{}", B64.encode(hash.as_ref()))
}

impl Receipt {
    /// The receipt for the message whose JWE decrypted to `plaintext`, delivered to `recipient_id`
    /// at `delivered_at`.
    pub fn for_delivery(
        message_id: &str,
        sender_id: &str,
        recipient_id: &str,
        delivered_at: &str,
        plaintext: &[u8],
    ) -> Self {
        Self {
            message_id: message_id.to_owned(),
            sender_id: sender_id.to_ascii_lowercase(),
            recipient_id: recipient_id.to_ascii_lowercase(),
            delivered_at: delivered_at.to_owned(),
            digest: digest(plaintext),
        }
    }

    /// Signs it with the recipient's key: a compact JWS.
    pub fn sign(&self, recipient_key: &PrivateKey) -> Result<String, JoseError> {
        let claims = json!({
            "mid": self.message_id,
            "sid": self.sender_id,
            "rid": self.recipient_id,
            "dat": self.delivered_at,
            "dig": self.digest,
        });
        jose::sign_jws(Some(&claims), recipient_key)
    }
}

/// Verifies `jws` with the recipient's directory key and checks that it is the receipt of
/// `message_id` from `sender_id` to `recipient_id`.
pub fn verify(
    jws: &str,
    recipient_key: &PublicKey,
    message_id: &str,
    sender_id: &str,
    recipient_id: &str,
) -> Result<Receipt, ReceiptError> {
    let mut claims = jose::verify_jws(jws, recipient_key)?;
    let Some(Value::Object(data)) = claims.remove("data") else {
        return Err(ReceiptError::Claim("data"));
    };
    let text = |name: &'static str| {
        data.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(ReceiptError::Claim(name))
    };
    let receipt = Receipt {
        message_id: text("mid")?,
        sender_id: text("sid")?,
        recipient_id: text("rid")?,
        delivered_at: text("dat")?,
        digest: text("dig")?,
    };
    for (field, found, expected) in [
        ("message id", &receipt.message_id, message_id),
        ("sender", &receipt.sender_id, sender_id),
        ("recipient", &receipt.recipient_id, recipient_id),
    ] {
        if !found.eq_ignore_ascii_case(expected) {
            return Err(ReceiptError::Mismatch {
                field,
                found: found.clone(),
                expected: expected.to_owned(),
            });
        }
    }
    Ok(receipt)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENDER: &str = "a1e45678-12bc-4ef0-9876-def123456789";
    const RECIPIENT: &str = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
    const MESSAGE: &str = "b1a7e8c2-1234-4f56-9abc-1234567890ab";

    fn keys() -> (PrivateKey, PublicKey, PublicKey) {
        let vectors: Value = serde_json::from_str(include_str!("../tests/data/jose-vectors.json")).unwrap();
        let pem = |path: &[&str]| {
            let mut v = &vectors;
            for p in path {
                v = &v[*p];
            }
            v.as_str().unwrap().to_owned()
        };
        let own = PrivateKey::from_pem(&pem(&["agentB", "privateKeyPkcs8Pem"])).unwrap();
        let public = PublicKey::from_pem(&pem(&["agentB", "publicKeySpkiPem"])).unwrap();
        let other = PublicKey::from_pem(&pem(&["agentA", "publicKeySpkiPem"])).unwrap();
        (own, public, other)
    }

    fn receipt() -> Receipt {
        let plaintext = b"eyJhbGciOiJSUzI1NiJ9.eyJkYXRhIjp7fX0.c2ln";
        Receipt::for_delivery(MESSAGE, SENDER, RECIPIENT, "2026-12-03T20:00:00.000Z", plaintext)
    }

    #[test]
    fn a_signed_receipt_verifies_with_the_recipients_key_and_names_the_delivery() {
        let (own, public, _) = keys();
        let jws = receipt().sign(&own).unwrap();
        assert_eq!(verify(&jws, &public, MESSAGE, SENDER, RECIPIENT), Ok(receipt()));
    }

    #[test]
    fn a_forged_altered_or_misdirected_receipt_is_refused() {
        let (own, public, other) = keys();
        let jws = receipt().sign(&own).unwrap();
        // Another key (the server has none of the recipient's).
        assert!(matches!(
            verify(&jws, &other, MESSAGE, SENDER, RECIPIENT),
            Err(ReceiptError::Jose(JoseError::Signature))
        ));
        // A claim altered after signing.
        let parts: Vec<&str> = jws.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims["data"]["dig"] = json!("sha256:forged");
        let altered = format!("{}.{}.{}", parts[0], B64.encode(claims.to_string()), parts[2]);
        assert!(matches!(
            verify(&altered, &public, MESSAGE, SENDER, RECIPIENT),
            Err(ReceiptError::Jose(JoseError::Signature))
        ));
        // A genuine receipt of another message.
        let other_message = "00000000-0000-4000-8000-000000000000";
        assert!(matches!(
            verify(&jws, &public, other_message, SENDER, RECIPIENT),
            Err(ReceiptError::Mismatch {
                field: "message id",
                ..
            })
        ));
        // A message's payload JWS is signed the same way, but is not a receipt.
        let not_a_receipt = jose::sign_jws(Some(&json!({"mid": MESSAGE})), &own).unwrap();
        assert_eq!(
            verify(&not_a_receipt, &public, MESSAGE, SENDER, RECIPIENT),
            Err(ReceiptError::Claim("sid"))
        );
    }

    #[test]
    fn the_digest_is_of_the_exact_bytes() {
        assert_eq!(digest(b"abc"), digest(b"abc"));
        assert_ne!(digest(b"abc"), digest(b"abd"));
        // SHA-256("abc"), base64url without padding.
        assert_eq!(digest(b"abc"), "sha256:ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0");
    }
}

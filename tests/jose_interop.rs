//! Byte-compatibility with the original's crypto: the real `jose` npm package (the version the
//! original pins) seals for Rust to open, and opens what Rust seals.

#![allow(clippy::unwrap_used)]

use dmr::keys::{PrivateKey, PublicKey};
use serde_json::{Value, json};
use std::io::Write as _;
use std::process::{Command, Stdio};

fn node_tool() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node");
    assert!(
        dir.join("node_modules/jose").exists(),
        "tests/node/node_modules is missing: run `npm install --prefix tests/node` (the test command in the README does this)"
    );
    dir.join("jose-interop.mjs")
}

fn node(request: Value) -> Result<Value, String> {
    let mut child = Command::new("node")
        .arg(node_tool())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node is installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    if out.status.success() {
        Ok(answer)
    } else {
        Err(answer["error"].as_str().unwrap_or("node failed").to_owned())
    }
}

fn payload() -> Value {
    json!({
        "chat": {"id": "f47ac10b-58cc-4372-a567-0e02b2c3d479", "created": "2024-01-15T10:00:00.000Z", "endUserFirstName": "Jüri"},
        "messages": [{"id": "550e8400-e29b-41d4-a716-446655440000", "chatId": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
                      "content": "Tere! ä ü 😀 \"quoted\" \\ back", "authorTimestamp": "2024-01-15T10:30:00.000Z",
                      "authorRole": "end-user", "buttons": "[]"}]
    })
}

#[test]
fn rust_opens_what_the_original_jose_seals() {
    let (sender, recipient) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
    let sealed = node(json!({
        "op": "seal",
        "senderPrivateKey": sender.to_pkcs8_pem().unwrap(),
        "recipientPublicKey": recipient.public_key().to_spki_pem(),
        "payload": payload(),
    }))
    .unwrap();
    let jwe = sealed["jwe"].as_str().unwrap();
    assert!(
        jwe.starts_with(dmr::jose::JWE_HEADER_B64),
        "jose writes the same protected header"
    );
    let data = dmr::jose::open(jwe, &recipient, sender.public_key()).unwrap();
    assert_eq!(data, Some(payload()));
    // And a signature by someone else is refused.
    let other = PrivateKey::generate().unwrap();
    assert!(dmr::jose::open(jwe, &recipient, other.public_key()).is_err());
}

#[test]
fn the_original_jose_opens_what_rust_seals() {
    let (sender, recipient) = (PrivateKey::generate().unwrap(), PrivateKey::generate().unwrap());
    let jwe = dmr::jose::seal(Some(&payload()), &sender, recipient.public_key()).unwrap();
    let opened = node(json!({
        "op": "open",
        "recipientPrivateKey": recipient.to_pkcs8_pem().unwrap(),
        "senderPublicKey": sender.public_key().to_spki_pem(),
        "jwe": jwe,
    }))
    .unwrap();
    assert_eq!(opened["data"], payload());

    // jose itself refuses it for the wrong recipient: the test can fail.
    let stranger = PrivateKey::generate().unwrap();
    let refused = node(json!({
        "op": "open",
        "recipientPrivateKey": stranger.to_pkcs8_pem().unwrap(),
        "senderPublicKey": sender.public_key().to_spki_pem(),
        "jwe": jwe,
    }));
    assert!(refused.is_err(), "{refused:?}");
}

#[test]
fn keys_from_the_dev_pki_work_with_jose() {
    let ca = dmr_pki::DevCa::generate("interop CA").unwrap();
    let a = dmr_pki::AgentCredentials::generate(&ca, "d3b07384-d9a0-4c3f-a4e2-123456789abc", "A").unwrap();
    let b = dmr_pki::AgentCredentials::generate(&ca, "a1e45678-12bc-4ef0-9876-def123456789", "B").unwrap();
    let sealed = node(json!({"op": "seal", "senderPrivateKey": a.key_pem, "recipientPublicKey": b.public_key_pem, "payload": payload()})).unwrap();
    let b_key = PrivateKey::from_pem(&b.key_pem).unwrap();
    let a_pub = PublicKey::from_pem(&a.cert_pem).unwrap();
    assert_eq!(
        dmr::jose::open(sealed["jwe"].as_str().unwrap(), &b_key, &a_pub).unwrap(),
        Some(payload())
    );
}

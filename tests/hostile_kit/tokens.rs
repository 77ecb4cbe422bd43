//! Handshake tokens a hostile legacy client could present (SECURITY.md "Legacy tokens").

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use dmr::keys::PrivateKey;
use dmr_pki::AgentCredentials;
use serde_json::{Value, json};

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn input(header: &Value, claims: &Value) -> String {
    format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()))
}

/// RS256 over any header and claims, with `creds`' key.
pub fn rs256(creds: &AgentCredentials, header: Value, claims: Value) -> String {
    let key = PrivateKey::from_pem(&creds.key_pem).expect("agent key");
    let input = input(&header, &claims);
    format!("{input}.{}", B64.encode(key.sign_rs256(input.as_bytes())))
}

/// A token as the original agent makes it, with these times.
pub fn valid_shape(creds: &AgentCredentials, iat: i64, exp: Option<i64>) -> String {
    let mut claims = json!({"sub": creds.id, "iat": iat, "cat": iat * 1000});
    if let Some(exp) = exp {
        claims["exp"] = json!(exp);
    }
    rs256(creds, json!({"alg": "RS256", "typ": "JWT", "kid": creds.id}), claims)
}

/// `alg: none`, no signature.
pub fn alg_none(creds: &AgentCredentials) -> String {
    let claims = json!({"sub": creds.id, "iat": now(), "exp": now() + 60});
    format!(
        "{}.",
        input(&json!({"alg": "none", "typ": "JWT", "kid": creds.id}), &claims)
    )
}

/// HS256 with the agent's public key (the PEM the directory publishes) as the HMAC secret: the
/// classic confusion attack on verifiers that take the algorithm from the token.
pub fn hs256_with_public_key(creds: &AgentCredentials) -> String {
    let key = PrivateKey::from_pem(&creds.key_pem).expect("agent key");
    let secret = key.public_key().to_spki_pem();
    let claims = json!({"sub": creds.id, "iat": now(), "exp": now() + 60});
    let input = input(&json!({"alg": "HS256", "typ": "JWT", "kid": creds.id}), &claims);
    let mac = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes()),
        input.as_bytes(),
    );
    format!("{input}.{}", B64.encode(mac.as_ref()))
}

/// Correctly signed by `creds`, whose id is the `kid`, claiming to be `other` in `sub`.
pub fn kid_not_sub(creds: &AgentCredentials, other: &str) -> String {
    rs256(
        creds,
        json!({"alg": "RS256", "typ": "JWT", "kid": creds.id}),
        json!({"sub": other, "iat": now(), "exp": now() + 60}),
    )
}

/// 1,000,000 bytes (within the Socket.IO payload limit, so it reaches the token check): a
/// well-formed header naming the agent, then claims filling the rest.
pub fn one_megabyte(creds: &AgentCredentials) -> String {
    let header = B64.encode(json!({"alg": "RS256", "typ": "JWT", "kid": creds.id}).to_string());
    let claims = 1_000_000 - header.len() - 2 - 342;
    format!("{header}.{}.{}", "A".repeat(claims), "B".repeat(342))
}

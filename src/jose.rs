//! JWS-in-JWE end-to-end encryption, byte-compatible with the original's `jose` 6 usage (compat §3).
//!
//! Sender: JWS compact `{"alg":"RS256"}` over claims `{"data": payload}`, signed with the sender's
//! key; then JWE compact `{"alg":"RSA-OAEP","enc":"A256GCM"}` over the UTF-8 JWS, for the
//! recipient's key (OAEP with SHA-1 as RFC 7518 defines `RSA-OAEP`; random 256-bit CEK; 96-bit IV;
//! AAD = the ASCII base64url protected header). Recipient: the reverse, verifying the signature
//! with the claimed sender's public key.
//!
//! Decryption accepts what `jose` accepts from a TypeScript sender (extra header members, `A128GCM`)
//! and rejects what it rejects (`zip`, `crit`, non-RS256 JWS, expired `exp`, future `nbf`).

use crate::keys::{PrivateKey, PublicKey};
use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value};

/// base64url of `{"alg":"RSA-OAEP","enc":"A256GCM"}`: the first segment of every JWE we make.
pub const JWE_HEADER_B64: &str = "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ";
/// base64url of `{"alg":"RS256"}`.
pub const JWS_HEADER_B64: &str = "eyJhbGciOiJSUzI1NiJ9";

/// Why a payload could not be decrypted or verified (reported as `DECRYPTION_FAILED`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoseError {
    /// Not five (JWE) or three (JWS) base64url segments.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A header names an algorithm or feature we do not accept.
    #[error("unsupported {0}")]
    Unsupported(String),
    /// The content key could not be unwrapped or the ciphertext failed authentication.
    #[error("decryption failed")]
    Decrypt,
    /// The JWS signature does not verify with the sender's key.
    #[error("signature verification failed")]
    Signature,
    /// The claims are not a JSON object, or `exp`/`nbf` reject the token.
    #[error("invalid claims: {0}")]
    Claims(String),
    /// Encryption could not be performed (bad recipient key).
    #[error("encryption failed")]
    Encrypt,
}

/// Signs `payload` (or `{}` claims when `None`, like the original) and encrypts it for `recipient`.
pub fn seal(payload: Option<&Value>, sender: &PrivateKey, recipient: &PublicKey) -> Result<String, JoseError> {
    let jws = sign_jws(payload, sender)?;
    encrypt_jwe(jws.as_bytes(), recipient)
}

/// Decrypts with `own` key, verifies with `sender`'s key and returns the claims' `data` (if any).
pub fn open(jwe: &str, own: &PrivateKey, sender: &PublicKey) -> Result<Option<Value>, JoseError> {
    let jws = decrypt_jwe(jwe, own)?;
    let jws = String::from_utf8(jws).map_err(|_| JoseError::Malformed("JWS (not UTF-8)"))?;
    let mut claims = verify_jws(&jws, sender)?;
    Ok(claims.remove("data"))
}

/// JWS compact RS256 over `{"data": payload}`.
pub fn sign_jws(payload: Option<&Value>, key: &PrivateKey) -> Result<String, JoseError> {
    let mut claims = Map::new();
    if let Some(p) = payload {
        claims.insert("data".to_owned(), p.clone());
    }
    let claims = serde_json::to_vec(&Value::Object(claims)).map_err(|e| JoseError::Claims(e.to_string()))?;
    let signing_input = format!("{JWS_HEADER_B64}.{}", B64.encode(claims));
    let sig = key.sign_rs256(signing_input.as_bytes());
    if sig.is_empty() {
        return Err(JoseError::Encrypt);
    }
    Ok(format!("{signing_input}.{}", B64.encode(sig)))
}

/// Verifies an RS256 JWS and returns its claims.
pub fn verify_jws(jws: &str, key: &PublicKey) -> Result<Map<String, Value>, JoseError> {
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JoseError::Malformed("JWS"));
    };
    let header = decode_header(h)?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err(JoseError::Unsupported(format!("JWS alg {:?}", header.get("alg"))));
    }
    if header.contains_key("crit") {
        return Err(JoseError::Unsupported("JWS crit header".into()));
    }
    let sig = B64.decode(s).map_err(|_| JoseError::Malformed("JWS signature"))?;
    if !key.verify_rs256(&jws.as_bytes()[..h.len() + 1 + p.len()], &sig) {
        return Err(JoseError::Signature);
    }
    let claims = B64.decode(p).map_err(|_| JoseError::Malformed("JWS payload"))?;
    let Ok(Value::Object(claims)) = serde_json::from_slice::<Value>(&claims) else {
        return Err(JoseError::Claims("JWT claims must be a JSON object".into()));
    };
    let now = chrono::Utc::now().timestamp();
    if let Some(exp) = claims.get("exp")
        && exp.as_f64().is_none_or(|exp| (now as f64) >= exp)
    {
        return Err(JoseError::Claims("token expired (exp)".into()));
    }
    if let Some(nbf) = claims.get("nbf")
        && nbf.as_f64().is_none_or(|nbf| (now as f64) < nbf)
    {
        return Err(JoseError::Claims("token not yet valid (nbf)".into()));
    }
    Ok(claims)
}

/// JWE compact RSA-OAEP + A256GCM of `plaintext` for `recipient`.
pub fn encrypt_jwe(plaintext: &[u8], recipient: &PublicKey) -> Result<String, JoseError> {
    let mut cek = [0u8; 32];
    let mut iv = [0u8; 12];
    aws_lc_rs::rand::fill(&mut cek).map_err(|_| JoseError::Encrypt)?;
    aws_lc_rs::rand::fill(&mut iv).map_err(|_| JoseError::Encrypt)?;
    let encrypted_key = recipient.encrypt_oaep_sha1(&cek).ok_or(JoseError::Encrypt)?;
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &cek).map_err(|_| JoseError::Encrypt)?);
    let mut buf = plaintext.to_vec();
    let tag = key
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(iv),
            Aad::from(JWE_HEADER_B64.as_bytes()),
            &mut buf,
        )
        .map_err(|_| JoseError::Encrypt)?;
    Ok(format!(
        "{JWE_HEADER_B64}.{}.{}.{}.{}",
        B64.encode(encrypted_key),
        B64.encode(iv),
        B64.encode(&buf),
        B64.encode(tag.as_ref())
    ))
}

/// Decrypts a JWE compact (RSA-OAEP with A256GCM or A128GCM).
pub fn decrypt_jwe(jwe: &str, own: &PrivateKey) -> Result<Vec<u8>, JoseError> {
    let parts: Vec<&str> = jwe.split('.').collect();
    let [h, ek, iv, ct, tag] = parts[..] else {
        return Err(JoseError::Malformed("JWE"));
    };
    let header = decode_header(h)?;
    if header.get("alg").and_then(Value::as_str) != Some("RSA-OAEP") {
        return Err(JoseError::Unsupported(format!("JWE alg {:?}", header.get("alg"))));
    }
    if header.contains_key("zip") || header.contains_key("crit") {
        return Err(JoseError::Unsupported("JWE zip/crit header".into()));
    }
    let algorithm = match header.get("enc").and_then(Value::as_str) {
        Some("A256GCM") => &AES_256_GCM,
        Some("A128GCM") => &AES_128_GCM,
        other => return Err(JoseError::Unsupported(format!("JWE enc {other:?}"))),
    };
    let decode = |s: &str, what| B64.decode(s).map_err(|_| JoseError::Malformed(what));
    let cek = own
        .decrypt_oaep_sha1(&decode(ek, "JWE encrypted key")?)
        .ok_or(JoseError::Decrypt)?;
    let iv: [u8; 12] = decode(iv, "JWE iv")?
        .try_into()
        .map_err(|_| JoseError::Malformed("JWE iv"))?;
    let mut buf = decode(ct, "JWE ciphertext")?;
    buf.extend_from_slice(&decode(tag, "JWE tag")?);
    let key = LessSafeKey::new(UnboundKey::new(algorithm, &cek).map_err(|_| JoseError::Decrypt)?);
    let plain = key
        .open_in_place(Nonce::assume_unique_for_key(iv), Aad::from(h.as_bytes()), &mut buf)
        .map_err(|_| JoseError::Decrypt)?;
    Ok(plain.to_vec())
}

fn decode_header(segment: &str) -> Result<Map<String, Value>, JoseError> {
    let bytes = B64
        .decode(segment)
        .map_err(|_| JoseError::Malformed("protected header"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JoseError::Malformed("protected header")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> Value {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jose-vectors.json"))
            .expect("tests/data/jose-vectors.json (copied from the original's interop vectors) is missing");
        serde_json::from_str(&text).expect("vectors are JSON")
    }

    fn key(v: &Value, agent: &str) -> (PrivateKey, PublicKey) {
        (
            PrivateKey::from_pem(v[agent]["privateKeyPkcs8Pem"].as_str().unwrap()).unwrap(),
            PublicKey::from_pem(v[agent]["publicKeySpkiPem"].as_str().unwrap()).unwrap(),
        )
    }

    #[test]
    fn opens_the_originals_jwe_vector() {
        let v = vectors();
        let (_, a_pub) = key(&v, "agentA");
        let (b_priv, _) = key(&v, "agentB");
        let data = open(v["jweForB"].as_str().unwrap(), &b_priv, &a_pub).unwrap();
        assert_eq!(data.as_ref(), Some(&v["plaintextPayload"]));
    }

    #[test]
    fn verifies_the_originals_jws_vector_and_reproduces_it() {
        let v = vectors();
        let (a_priv, a_pub) = key(&v, "agentA");
        let jws = v["innerJwsSignedByA"].as_str().unwrap();
        let claims = verify_jws(jws, &a_pub).unwrap();
        assert_eq!(claims["data"], v["plaintextPayload"]);
        // RS256 is deterministic: our signature over the same claims is byte-identical to jose's.
        assert_eq!(sign_jws(Some(&v["plaintextPayload"]), &a_priv).unwrap(), jws);
    }

    #[test]
    fn wrong_keys_and_tampering_fail() {
        let v = vectors();
        let (a_priv, a_pub) = key(&v, "agentA");
        let (b_priv, b_pub) = key(&v, "agentB");
        let jwe = v["jweForB"].as_str().unwrap();
        assert_eq!(open(jwe, &a_priv, &a_pub), Err(JoseError::Decrypt));
        assert_eq!(open(jwe, &b_priv, &b_pub), Err(JoseError::Signature));
        let mut tampered = jwe.to_owned();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(open(&tampered, &b_priv, &a_pub).is_err());
        assert_eq!(open("a.b", &b_priv, &a_pub), Err(JoseError::Malformed("JWE")));
    }

    #[test]
    fn seal_open_round_trip_and_empty_payload() {
        let v = vectors();
        let (a_priv, a_pub) = key(&v, "agentA");
        let (b_priv, b_pub) = key(&v, "agentB");
        let jwe = seal(Some(&v["plaintextPayload"]), &a_priv, &b_pub).unwrap();
        assert!(jwe.starts_with(JWE_HEADER_B64));
        assert_eq!(
            open(&jwe, &b_priv, &a_pub).unwrap(),
            Some(v["plaintextPayload"].clone())
        );
        let empty = seal(None, &a_priv, &b_pub).unwrap();
        assert_eq!(open(&empty, &b_priv, &a_pub).unwrap(), None);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let v = vectors();
        let (_, a_pub) = key(&v, "agentA");
        let err = verify_jws(v["socketAuthJwtOfA_expiredOnPurpose"].as_str().unwrap(), &a_pub).unwrap_err();
        assert!(matches!(err, JoseError::Claims(_)), "{err:?}");
    }
}

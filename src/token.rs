//! The legacy agents' handshake token (compat §4): an RS256 JWT with header `kid` = agent id and
//! claims `sub` (= kid), `iat`, `exp`, signed with the agent's directory key.
//!
//! Verification is split so the Socket.IO edge can apply its own expiry policy (expired tokens of
//! recently connected agents are let back in, see `docs/compat.md` §4 "Stale tokens").

use crate::keys::{PrivateKey, PublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::{Map, Value, json};

/// Why a token was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a compact JWS with JSON header and claims.
    #[error("token is not a well-formed JWT")]
    Malformed,
    /// The header has no string `kid`.
    #[error("token kid is missing or invalid")]
    MissingKid,
    /// Only RS256 is accepted.
    #[error("token algorithm {0} is not RS256")]
    Algorithm(String),
    /// The signature does not verify with the directory key of `kid`.
    #[error("token signature does not verify with the key published for agent {0}")]
    Signature(String),
    /// `sub` differs from `kid`.
    #[error("token sub and kid do not match")]
    SubjectMismatch,
    /// `exp` has passed.
    #[error("token expired at {0} (unix seconds)")]
    Expired(i64),
    /// `nbf` is in the future.
    #[error("token is not valid before {0} (unix seconds)")]
    NotYetValid(i64),
    /// No `exp` claim: such a token would be valid forever.
    #[error("token has no exp claim")]
    MissingExpiry,
    /// `iat` lies in the future.
    #[error("token was issued in the future ({0}, unix seconds)")]
    IssuedInFuture(i64),
    /// Longer than [`MAX_TOKEN_BYTES`]: refused before it is decoded.
    #[error("token is {0} bytes long; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge(usize),
}

impl TokenError {
    /// A short stable name for the defect (a metric label: `dmr_legacy_auth_refusals_total`'s
    /// `reason`), so that an operator can tell a forged token from an expired one.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed | Self::MissingKid | Self::TooLarge(_) => "malformed_token",
            Self::Algorithm(_) => "bad_algorithm",
            Self::Signature(_) => "bad_signature",
            Self::SubjectMismatch => "subject_mismatch",
            Self::Expired(_) => "expired_token",
            Self::NotYetValid(_) | Self::IssuedInFuture(_) => "not_yet_valid",
            Self::MissingExpiry => "missing_expiry",
        }
    }
}

/// Longest token accepted, in bytes. The original agent's tokens are about 600 bytes; a larger one
/// is refused before any base64 or JSON decoding, so a hostile handshake cannot make the server
/// decode megabytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Whether a well-formed, correctly signed token is still within its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Before `exp`.
    Current,
    /// Past `exp` (by this many seconds).
    Expired(i64),
}

/// Clock skew tolerated on `iat` and `nbf`, in seconds.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Checks a token's times strictly: `exp` must be present, `iat` and `nbf` must not lie in the
/// future (beyond [`CLOCK_SKEW_SECS`]). Says whether it has expired; deciding whether an expired
/// token may still be used is the caller's (see the server's legacy edge).
pub fn lifetime(claims: &AgentClaims, now: i64) -> Result<Lifetime, TokenError> {
    if let Some(nbf) = claims.nbf
        && now + CLOCK_SKEW_SECS < nbf
    {
        return Err(TokenError::NotYetValid(nbf));
    }
    if let Some(iat) = claims.iat
        && now + CLOCK_SKEW_SECS < iat
    {
        return Err(TokenError::IssuedInFuture(iat));
    }
    let exp = claims.exp.ok_or(TokenError::MissingExpiry)?;
    Ok(if now < exp {
        Lifetime::Current
    } else {
        // Saturating: a signed `exp` far in the past (-1e300 reads as i64::MIN) must not wrap
        // around to a negative age, which a grace period would accept.
        Lifetime::Expired(now.saturating_sub(exp))
    })
}

/// The verified claims that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentClaims {
    /// The agent id (`sub` = `kid`).
    pub agent_id: String,
    /// Expiry, unix seconds, if present.
    pub exp: Option<i64>,
    /// Not-before, unix seconds, if present.
    pub nbf: Option<i64>,
    /// Issued at, unix seconds, if present.
    pub iat: Option<i64>,
}

fn segment(s: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(TokenError::Malformed),
    }
}

fn parts(token: &str) -> Result<(&str, &str, &str), TokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(token.len()));
    }
    let mut it = token.split('.');
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(h), Some(p), Some(s), None) => Ok((h, p, s)),
        _ => Err(TokenError::Malformed),
    }
}

/// The `kid` of a token, read without verification (to find the key to verify with).
pub fn kid(token: &str) -> Result<String, TokenError> {
    let (h, _, _) = parts(token)?;
    segment(h)?
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or(TokenError::MissingKid)
}

/// Verifies signature and `sub` = `kid`; returns the claims. Time checks are left to [`check_time`].
pub fn verify(token: &str, key: &PublicKey) -> Result<AgentClaims, TokenError> {
    let (h, p, s) = parts(token)?;
    let header = segment(h)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or_default();
    if alg != "RS256" {
        return Err(TokenError::Algorithm(alg.to_owned()));
    }
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(TokenError::MissingKid)?;
    let sig = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    if !key.verify_rs256(&token.as_bytes()[..h.len() + 1 + p.len()], &sig) {
        return Err(TokenError::Signature(kid.to_owned()));
    }
    let claims = segment(p)?;
    if claims.get("sub").and_then(Value::as_str) != Some(kid) {
        return Err(TokenError::SubjectMismatch);
    }
    let int = |k: &str| claims.get(k).and_then(Value::as_f64).map(|v| v as i64);
    Ok(AgentClaims {
        agent_id: kid.to_ascii_lowercase(),
        exp: int("exp"),
        nbf: int("nbf"),
        iat: int("iat"),
    })
}

/// Checks `exp` and `nbf` at `now` (unix seconds); an expired token is accepted if it expired at
/// most `grace_secs` ago.
pub fn check_time(claims: &AgentClaims, now: i64, grace_secs: i64) -> Result<(), TokenError> {
    if let Some(nbf) = claims.nbf
        && now < nbf
    {
        return Err(TokenError::NotYetValid(nbf));
    }
    match claims.exp {
        Some(exp) if now >= exp && now.saturating_sub(exp) > grace_secs => Err(TokenError::Expired(exp)),
        _ => Ok(()),
    }
}

/// Signs a token as the original agent does: header `{"alg":"RS256","typ":"JWT","kid":id}`, claims
/// `{"sub":id,"iat":iat,"exp":exp,"cat":iat·1000}`.
pub fn sign(agent_id: &str, key: &PrivateKey, iat: i64, exp: i64) -> String {
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": agent_id});
    let claims = json!({"sub": agent_id, "iat": iat, "exp": exp, "cat": iat * 1000});
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let sig = key.sign_rs256(input.as_bytes());
    format!("{input}.{}", B64.encode(sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_the_originals_token_and_enforces_expiry() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jose-vectors.json"))
            .expect("tests/data/jose-vectors.json (copied from the original's interop vectors) is missing");
        let v: Value = serde_json::from_str(&text).unwrap();
        let token = v["socketAuthJwtOfA_expiredOnPurpose"].as_str().unwrap();
        let key = PublicKey::from_pem(v["agentA"]["publicKeySpkiPem"].as_str().unwrap()).unwrap();
        assert_eq!(kid(token).unwrap(), "d3b07384-d9a0-4c3f-a4e2-123456789abc");
        let claims = verify(token, &key).unwrap();
        assert_eq!(claims.exp, Some(1_752_220_860));
        assert_eq!(check_time(&claims, 1_752_220_859, 0), Ok(()));
        assert_eq!(
            check_time(&claims, 1_752_220_900, 0),
            Err(TokenError::Expired(1_752_220_860))
        );
        assert_eq!(check_time(&claims, 1_752_220_900, 60), Ok(()));
        let other = PublicKey::from_pem(v["agentB"]["publicKeySpkiPem"].as_str().unwrap()).unwrap();
        assert!(matches!(verify(token, &other), Err(TokenError::Signature(_))));
    }

    #[test]
    fn sign_round_trips_and_sub_must_match_kid() {
        let key = PrivateKey::generate().unwrap();
        let t = sign("d3b07384-d9a0-4c3f-a4e2-123456789abc", &key, 100, 160);
        assert_eq!(verify(&t, key.public_key()).unwrap().exp, Some(160));
        let (h, _, _) = parts(&t).unwrap();
        let forged_claims = B64.encode(json!({"sub": "someone-else"}).to_string());
        let input = format!("{h}.{forged_claims}");
        let forged = format!("{input}.{}", B64.encode(key.sign_rs256(input.as_bytes())));
        assert_eq!(verify(&forged, key.public_key()), Err(TokenError::SubjectMismatch));
        assert_eq!(kid("a.b"), Err(TokenError::Malformed));
    }

    #[test]
    fn hostile_tokens_are_refused_with_their_own_reason() {
        let key = PrivateKey::generate().unwrap();
        let id = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
        let huge = format!(
            "{}.{}.x",
            B64.encode(json!({"alg":"RS256","kid":id}).to_string()),
            "A".repeat(1 << 20)
        );
        assert_eq!(kid(&huge), Err(TokenError::TooLarge(huge.len())));
        assert_eq!(TokenError::TooLarge(1).reason(), "malformed_token");
        let none = format!(
            "{}.{}.",
            B64.encode(json!({"alg":"none","kid":id}).to_string()),
            B64.encode(json!({"sub":id,"exp":i64::MAX}).to_string())
        );
        let refused = verify(&none, key.public_key()).unwrap_err();
        assert_eq!(
            (refused.reason(), refused),
            ("bad_algorithm", TokenError::Algorithm("none".into()))
        );
        // A signed exp of -1e300 is i64::MIN: its age saturates instead of wrapping to negative.
        let ancient = AgentClaims {
            agent_id: id.into(),
            exp: Some(i64::MIN),
            nbf: None,
            iat: None,
        };
        assert_eq!(lifetime(&ancient, 1_700_000_000), Ok(Lifetime::Expired(i64::MAX)));
        assert_eq!(
            check_time(&ancient, 1_700_000_000, 60),
            Err(TokenError::Expired(i64::MIN))
        );
    }
}

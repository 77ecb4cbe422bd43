//! What the REST API checks before it looks at a message: where the request comes from, what it
//! claims to be, and whether its JSON is unambiguous. Plus the error bodies in the original's
//! (NestJS) shape, for every status including 404 and 405.
//!
//! Why: the agent listens on the organisation's internal network, where any web page a user opens
//! can make the browser POST to it. A browser sends an `Origin` header with every cross-site POST
//! and cannot send `Content-Type: application/json` cross-site without a CORS preflight, so
//! requiring that type and refusing foreign origins closes the hole (the original accepted any
//! type from anywhere).

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value, json};
use std::collections::HashSet;

/// Seconds a client should wait before retrying a 503 (the agent reconnects within about that).
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// An error in the original's shape: `{"statusCode", "message", "error"}`; `message` is a list for
/// 400 (one entry per problem) and a string otherwise.
pub fn error(status: StatusCode, messages: Vec<String>) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let message = if messages.len() == 1 && status != StatusCode::BAD_REQUEST {
        Value::String(messages.into_iter().next().unwrap_or_default())
    } else {
        json!(messages)
    };
    let mut response = (
        status,
        Json(json!({"statusCode": status.as_u16(), "message": message, "error": reason})),
    )
        .into_response();
    if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    response
}

/// The allowed browser origins (`CORS_ALLOWED_ORIGINS`), normalised for comparison.
#[derive(Debug, Clone, Default)]
pub struct Origins(Vec<String>);

impl Origins {
    /// From the configured list (`scheme://host[:port]`; case and a trailing `/` do not matter).
    pub fn new(list: &[String]) -> Self {
        Self(
            list.iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        )
    }

    /// The configured origins as header values (for the CORS answers to allowed pages).
    pub fn header_values(&self) -> Vec<HeaderValue> {
        self.0.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect()
    }

    fn allows(&self, origin: &str) -> bool {
        let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
        self.0.contains(&origin)
    }
}

/// Refuses a request from a browser page whose origin is not allowed (403), or whose body is not
/// declared as JSON (415). Requests without `Origin` (services, curl) are not browsers'.
pub fn check_request(headers: &HeaderMap, origins: &Origins) -> Result<(), Box<Response>> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let text = origin.to_str().unwrap_or_default();
        if !origins.allows(text) {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                vec![format!(
                    "requests from origin {text:?} are not allowed (CORS_ALLOWED_ORIGINS)"
                )],
            )));
        }
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(Box::new(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            vec!["Content-Type must be application/json".to_owned()],
        )));
    }
    Ok(())
}

/// Parses JSON, refusing an object with the same key twice: parsers disagree on which copy wins
/// (serde_json takes the last, others the first), so a validator and a consumer could see
/// different messages.
pub fn parse_strict_json(body: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = StrictValue::deserialize(&mut de)?.0;
    de.end()?;
    Ok(value)
}

struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format_args!("duplicate key {key:?}")));
            }
            out.insert(key, map.next_value::<StrictValue>()?.0);
        }
        Ok(Value::Object(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<StrictValue>()? {
            out.push(v.0);
        }
        Ok(Value::Array(out))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// A fingerprint of a message's content, independent of key order and whitespace: a repeated
/// POST of an id is the same request only if this matches.
pub fn fingerprint(value: &Value) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    fn feed(v: &Value, h: &mut std::collections::hash_map::DefaultHasher) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                b'{'.hash(h);
                for k in keys {
                    k.hash(h);
                    feed(&map[k], h);
                }
                b'}'.hash(h);
            }
            Value::Array(items) => {
                b'['.hash(h);
                items.len().hash(h);
                items.iter().for_each(|i| feed(i, h));
            }
            other => other.to_string().hash(h),
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    feed(value, &mut h);
    h.finish()
}

/// 404 for an unknown path, in the error shape.
pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, vec!["no such resource".to_owned()])
}

/// 405 for a known path with another method, in the error shape.
pub async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        vec!["method not allowed for this resource".to_owned()],
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        assert!(parse_strict_json(br#"{"a":1,"b":{"c":[{"d":1}]}}"#).is_ok());
        let e = parse_strict_json(br#"{"id":"1","id":"2"}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key \"id\""), "{e}");
        assert!(parse_strict_json(br#"{"p":{"m":[{"x":1,"x":1}]}}"#).is_err());
        assert!(parse_strict_json(br#"{"a":1} x"#).is_err(), "trailing data");
    }

    #[test]
    fn fingerprints_ignore_key_order_but_not_content() {
        let a = parse_strict_json(br#"{"a":1,"b":[1,2]}"#).unwrap();
        let b = parse_strict_json(br#"{ "b":[1,2], "a":1 }"#).unwrap();
        let c = parse_strict_json(br#"{"a":1,"b":[2,1]}"#).unwrap();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
    }

    #[test]
    fn origins_and_content_types() {
        let origins = Origins::new(&["https://chat.example.org/".to_owned()]);
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
            }
            h
        };
        let json = (header::CONTENT_TYPE, "application/json; charset=utf-8");
        assert!(check_request(&headers(std::slice::from_ref(&json)), &origins).is_ok());
        assert!(
            check_request(
                &headers(&[json.clone(), (header::ORIGIN, "https://CHAT.example.org")]),
                &origins
            )
            .is_ok()
        );
        let refused = |h: HeaderMap, o: &Origins| check_request(&h, o).unwrap_err().status();
        assert_eq!(
            refused(
                headers(&[json.clone(), (header::ORIGIN, "http://evil.example")]),
                &origins
            ),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(headers(&[json, (header::ORIGIN, "null")]), &Origins::default()),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            refused(headers(&[(header::CONTENT_TYPE, "text/plain")]), &origins),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(refused(headers(&[]), &origins), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}

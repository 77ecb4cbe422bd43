//! One function per fuzz target: it takes any bytes, must never panic, hang or allocate without
//! bound, and asserts the properties that make the parser's answer trustworthy (round trips, and
//! the JSON and protobuf paths agreeing). The libFuzzer binaries in `fuzz_targets/` and the corpus
//! replay in `tests/fuzz_corpus.rs` both call these, so they test the same thing.

use crate::fixtures::{fixtures, validation_context};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use dmr::directory::{CentOpsResponse, Directory};
use dmr::envelope::{self, Envelope, ValidationFailure};
use dmr::keys::{PrivateKey, PublicKey};
use dmr::{jose, message, policy, proto, receipt as receipts, time, token};
use prost::Message as _;
use serde_json::{Value, json};

/// A fuzz target: its name (also its `fuzz_targets/<name>.rs` and `corpus/<name>/`) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const ALL: &[Target] = &[
    ("message", message),
    ("envelope_json", envelope_json),
    ("envelope_proto", envelope_proto),
    ("jose_jws", jose_jws),
    ("jose_jwe", jose_jwe),
    ("legacy_jwt", legacy_jwt),
    ("directory_json", directory_json),
    ("directory_proto", directory_proto),
    ("keys_pem", keys_pem),
    ("timestamp", timestamp),
    ("policy_json", policy_json),
    ("receipt", receipt),
];

/// Inputs longer than this only go through the parsers, not the RSA round trips (which would
/// otherwise dominate the time per input).
const ROUND_TRIP_MAX: usize = 2048;

/// The v1 REST message validator (`message::validate`) on any JSON body.
pub fn message(data: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let verdict = message::validate(&body);
    // The verdict depends on the JSON value only: printing and re-reading it changes nothing.
    // (The payload is left out: serde_json re-reads a float to within one ULP, not exactly.)
    let again = reparse(&body);
    let strip = |v: Result<message::V1Message, Vec<String>>| {
        v.map(|m| (m.id, m.recipient_id, m.timestamp, m.kind, m.payload.is_object()))
    };
    assert_eq!(strip(message::validate(&again)), strip(verdict.clone()));
    match verdict {
        Ok(m) => {
            assert!(message::is_uuid(&m.id) && message::is_uuid(&m.recipient_id));
            assert!(message::MESSAGE_TYPES.contains(&m.kind.as_str()));
            assert_eq!(Some(&m.payload), body.get("payload"));
            // What the REST API accepted, the agent can put in an envelope the server accepts.
            assert_server_form(&m.timestamp);
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
}

/// The server's envelope validation of a legacy agent's JSON (`envelope::validate`).
pub fn envelope_json(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let ctx = validation_context();
    match envelope::validate(&raw, &ctx) {
        Ok(e) => {
            assert!(envelope::is_compact_jwe(&e.payload));
            assert!(e.payload.len() <= ctx.max_payload_bytes);
            // What passed passes again, unchanged, in either form.
            assert_eq!(envelope::validate(&e.to_value(), &ctx), Ok(e.clone()));
            assert_eq!(envelope::validate_proto(e.to_proto(), &ctx).ok(), Some(e.clone()));
            assert_eq!(Envelope::from_proto(e.to_proto()), e);
        }
        Err(errors) => {
            assert!(!errors.is_empty());
            let record = ValidationFailure::new(raw, errors);
            let text = serde_json::to_vec(&record).expect("a validation failure record serialises");
            let back: ValidationFailure = serde_json::from_slice(&text).expect("and reads back");
            assert_eq!(back.errors, record.errors);
        }
    }
}

/// Protobuf frames from an agent: an `Envelope` or a `SessionRequest`, decoded with prost and
/// validated by `envelope::validate_proto`, which must agree with the JSON path.
pub fn envelope_proto(data: &[u8]) {
    if let Ok(e) = proto::Envelope::decode(data) {
        assert_proto_and_json_agree(e);
    }
    let Ok(request) = proto::SessionRequest::decode(data) else {
        return;
    };
    let again = proto::SessionRequest::decode(request.encode_to_vec().as_slice()).expect("re-encoded frame decodes");
    assert_eq!(again, request);
    if let Some(proto::session_request::Frame::Send(proto::SendRequest { envelope: Some(e), .. })) = request.frame {
        assert_proto_and_json_agree(e);
    }
}

/// Compact JWS parsing and RS256 verification (`jose::verify_jws`) with A's key; and any JSON
/// value A signs verifies back to itself.
pub fn jose_jws(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = fixtures();
    if let Ok(claims) = jose::verify_jws(text, &f.a.public) {
        // Only A's key signed this: it must not verify with B's.
        assert!(jose::verify_jws(text, &f.b.public).is_err());
        assert!(!claims.contains_key("crit"));
    }
    if text.len() <= ROUND_TRIP_MAX
        && let Ok(value) = serde_json::from_str::<Value>(text)
    {
        let jws = jose::sign_jws(Some(&value), &f.a.private).expect("A signs any JSON value");
        let claims = jose::verify_jws(&jws, &f.a.public).expect("A's signature verifies");
        assert_eq!(claims.get("data"), Some(&reparse(&value)));
    }
}

/// Compact JWE parsing and decryption (`jose::decrypt_jwe`, `jose::open`) with B's key; and a
/// JWE this crate made for B decrypts back.
pub fn jose_jwe(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = fixtures();
    if jose::decrypt_jwe(text, &f.b.private).is_ok() {
        // Sealed for B: A's key cannot open it.
        assert!(jose::decrypt_jwe(text, &f.a.private).is_err());
        let _ = jose::open(text, &f.b.private, &f.a.public);
    }
    // Input that cannot be a compact JWE (no dot) is used as a plaintext instead.
    if text.contains('.') || text.len() > ROUND_TRIP_MAX {
        return;
    }
    let jwe = jose::encrypt_jwe(data, &f.b.public).expect("encrypting for B works");
    // The server's shape check refuses an empty ciphertext (RFC 7516 allows one, but an empty
    // plaintext is never a JWS, so the recipient could only fail on it).
    assert_eq!(envelope::is_compact_jwe(&jwe), !data.is_empty());
    assert_eq!(jose::decrypt_jwe(&jwe, &f.b.private).as_deref(), Ok(data));
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        let sealed = jose::seal(Some(&value), &f.a.private, &f.b.public).expect("A seals for B");
        assert_eq!(
            jose::open(&sealed, &f.b.private, &f.a.public),
            Ok(Some(reparse(&value)))
        );
    }
}

/// The legacy Socket.IO handshake JWT (`token::kid`, `token::verify`, then its time rules), both
/// as given and — when the input is a JSON object — as claims a hostile agent signed with its own
/// key (an agent holds its key, so any claims it likes can reach the time rules).
pub fn legacy_jwt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let f = fixtures();
    let _ = token::kid(text);
    if let Ok(claims) = token::verify(text, &f.a.public) {
        assert_eq!(claims.agent_id, f.a.id);
        assert_time_rules_total(&claims);
    }
    if text.len() > ROUND_TRIP_MAX {
        return;
    }
    let Ok(Value::Object(claims)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": f.a.id});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(Value::Object(claims).to_string())
    );
    let signed = format!("{input}.{}", B64.encode(f.a.private.sign_rs256(input.as_bytes())));
    assert_eq!(token::kid(&signed).as_deref(), Ok(f.a.id.as_str()));
    if let Ok(claims) = token::verify(&signed, &f.a.public) {
        assert_time_rules_total(&claims);
    }
}

/// The CentOps directory answer (`Directory::from_centops_json`).
pub fn directory_json(data: &[u8]) {
    if let Ok(directory) = Directory::from_centops_json(data) {
        assert_directory_round_trips(&directory);
    }
}

/// A directory frame as an agent receives it (`Directory::from_proto`, `Directory::apply_update`).
pub fn directory_proto(data: &[u8]) {
    let Ok(frame) = proto::AgentDirectory::decode(data) else {
        return;
    };
    if let Ok(directory) = Directory::from_proto(&frame.agents) {
        assert_directory_round_trips(&directory);
    }
    let mut directory = fixtures().directory.clone();
    let errors = directory.apply_update(&frame.agents);
    assert!(errors.len() <= frame.agents.len());
    // Applying an update keeps the invariant: every entry is one a whole directory could hold.
    assert_directory_round_trips(&directory);
}

/// RSA key parsing (`keys`): PEM text in every accepted form, and the same bytes as DER.
pub fn keys_pem(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key) = PublicKey::from_pem(text) {
            assert_eq!(PublicKey::from_pem(&key.to_spki_pem()), Ok(key.clone()));
            assert_eq!(PublicKey::from_spki_der(key.spki_der()), Ok(key));
        }
        if let Ok(key) = PrivateKey::from_pem(text) {
            let pem = key.to_pkcs8_pem().expect("a parsed private key prints as PKCS#8");
            let again = PrivateKey::from_pem(&pem).expect("its PKCS#8 PEM parses");
            assert_eq!(again.public_key(), key.public_key());
        }
    }
    if let Ok(key) = PublicKey::from_spki_der(data) {
        assert_eq!(PublicKey::from_pem(&key.to_spki_pem()), Ok(key));
    }
    let _ = PublicKey::from_certificate_der(data);
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(data)
        && let Some(id) = dmr::keys::agent_id_in_certificate(&cert)
    {
        assert!(message::is_uuid(&id) && id == id.to_ascii_lowercase());
    }
    let _ = PrivateKey::from_pkcs8_der(data);
}

/// The timestamp rules (`time`): the REST API's ISO-8601 and the server's `toISOString` form.
pub fn timestamp(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let iso = time::is_iso8601(s);
    assert_eq!(iso, time::parse_iso8601(s).is_some(), "{s:?}");
    assert_eq!(iso, time::to_js_iso_string(s).is_some(), "{s:?}");
    if time::is_js_iso_string(s) {
        assert!(iso, "{s:?} is in the server's form but not ISO 8601");
        assert_eq!(time::to_js_iso_string(s).as_deref(), Some(s));
    }
    if iso {
        assert_server_form(s);
    }
}

/// A timestamp the REST API accepted is in the server's form, or converts to it (as the agent
/// does before it builds the envelope).
fn assert_server_form(timestamp: &str) {
    if time::is_js_iso_string(timestamp) {
        return;
    }
    let converted = time::to_js_iso_string(timestamp);
    assert!(
        converted.as_deref().is_some_and(time::is_js_iso_string),
        "{timestamp:?} passed the REST API but converts to {converted:?}, which the server refuses"
    );
}

/// `validate_proto` and `validate` on the same envelope's JSON give the same answer.
fn assert_proto_and_json_agree(e: proto::Envelope) {
    let ctx = validation_context();
    let as_json = json!({
        "id": e.id, "senderId": e.sender_id, "recipientId": e.recipient_id, "timestamp": e.timestamp,
        "type": e.r#type, "payload": e.payload, "receivedAt": e.received_at,
    });
    let from_json = envelope::validate(&as_json, &ctx);
    match envelope::validate_proto(e.clone(), &ctx) {
        Ok(valid) => assert_eq!(from_json, Ok(valid)),
        Err((errors, returned)) => {
            assert_eq!(returned, e, "a refused envelope is handed back unchanged");
            assert_eq!(from_json, Err(errors));
        }
    }
}

/// The directory survives each of its serialised forms, and diffs against itself to nothing.
fn assert_directory_round_trips(directory: &Directory) {
    let response = CentOpsResponse {
        response: directory.entries().map(|e| e.info.clone()).collect(),
    };
    let json = serde_json::to_vec(&response).expect("a directory serialises");
    let from_json = Directory::from_centops_json(&json).expect("a directory's own JSON parses");
    assert_eq!(&from_json, directory);
    let from_proto = Directory::from_proto(&directory.to_proto().agents).expect("its protobuf form parses");
    assert_eq!(&from_proto, directory);
    for per_frame in [1, 2, 1000] {
        let agents: Vec<proto::AgentInfo> = directory.to_proto_frames(per_frame).flat_map(|f| f.agents).collect();
        assert_eq!(agents.len(), directory.len());
    }
    assert!(directory.diff(directory).is_empty());
    assert_eq!(Directory::default().diff(directory).added.len(), directory.len());
    let mut rebuilt = Directory::default();
    assert!(rebuilt.apply_update(&directory.to_proto().agents).is_empty());
    assert_eq!(&rebuilt, directory);
    for id in directory.ids() {
        assert!(message::is_uuid(id) && directory.contains(&id.to_ascii_uppercase()));
    }
}

/// The token time rules answer for any claims at any plausible clock, without overflow.
fn assert_time_rules_total(claims: &token::AgentClaims) {
    for now in [0, 1_752_220_860, 4_102_444_800] {
        let _ = token::lifetime(claims, now);
        for grace in [0, 60, i64::from(u32::MAX)] {
            let _ = token::check_time(claims, now, grace);
        }
    }
}

/// The value after printing and re-reading it, as a peer would see it.
fn reparse(value: &Value) -> Value {
    serde_json::from_str(&value.to_string()).expect("serde_json reads what it prints")
}

/// The relay policy document (`policy::Policy::from_json`), fetched by the server from a file or URL.
pub fn policy_json(data: &[u8]) {
    let Ok(parsed) = policy::Policy::from_json(data) else {
        return;
    };
    // Parsing is deterministic, and a decision is a pure function of the two ids, in any case.
    assert_eq!(policy::Policy::from_json(data).ok().as_ref(), Some(&parsed));
    let (a, b) = (&fixtures().a.id, &fixtures().b.id);
    for (from, to) in [(a, b), (b, a), (a, a)] {
        let verdict = parsed.check(from, to);
        assert_eq!(parsed.check(from, to), verdict);
        if let Err(denied) = verdict {
            assert!(denied.describe(from, to).contains(to.as_str()));
        }
    }
    let limits = parsed.limits_for(a);
    for value in [limits.messages_per_second, limits.burst, limits.max_in_flight] {
        assert_ne!(value, Some(0), "a zero limit is refused at parse time");
    }
}

/// Delivery receipts (`receipt::verify`): any text as a receipt never verifies as B's; a receipt B
/// signs for any plaintext verifies with B's key only, and carries that plaintext's digest.
pub fn receipt(data: &[u8]) {
    let (a, b) = (&fixtures().a, &fixtures().b);
    let mid = "b1a7e8c2-1234-4f56-9abc-1234567890ab";
    if let Ok(text) = std::str::from_utf8(data) {
        // Whatever the input, it is not a receipt signed by B (only B's private key makes those).
        assert!(receipts::verify(text, &b.public, mid, &a.id, &b.id).is_err());
    }
    if data.len() <= ROUND_TRIP_MAX {
        let made = receipts::Receipt::for_delivery(mid, &a.id, &b.id, "2026-12-03T20:00:00.000Z", data);
        let jws = made.sign(&b.private).expect("B signs");
        assert_eq!(receipts::verify(&jws, &b.public, mid, &a.id, &b.id).as_ref(), Ok(&made));
        assert!(receipts::verify(&jws, &a.public, mid, &a.id, &b.id).is_err());
        assert_eq!(made.digest, receipts::digest(data));
    }
}

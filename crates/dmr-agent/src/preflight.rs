//! Start-up checks of the agent's identity and addresses, so that a typo stops the start with a
//! message naming the setting, instead of an agent that loops on "transport error" or, worse,
//! connects as someone else.
//!
//! Why each matters: an `AGENT_ID` that is not the certificate's makes two agents share one
//! identity on the server (they kick each other off); a key that does not match the certificate
//! fails every TLS handshake; a garbage CA or an `http://` URL fails every connection; a bad
//! `OUTGOING_MESSAGE_ENDPOINT` fails every delivery until messages are dead-lettered.

use crate::StartError;
use crate::config::AgentConfig;
use dmr::keys::{PrivateKey, PublicKey};
use std::path::Path;

/// Runs every check against the configuration and the loaded private key.
pub fn check(cfg: &AgentConfig, key: &PrivateKey, cert_pem: &str, ca_pem: &str) -> Result<(), StartError> {
    check_certificate(cfg, key, cert_pem)?;
    check_ca(&cfg.tls_ca_file, ca_pem)?;
    if cfg.dmr_server_grpc_url.iter().all(|u| u.trim().is_empty()) {
        return Err(StartError::BadUrl {
            variable: "DMR_SERVER_GRPC_URL",
            url: String::new(),
            problem: "must name at least one server, e.g. https://dmr.example.org:8076",
        });
    }
    for url in &cfg.dmr_server_grpc_url {
        check_server_url(url.trim())?;
    }
    check_endpoint(&cfg.outgoing_message_endpoint)?;
    check_delays(cfg)
}

/// Cross-field checks of durations.
fn check_delays(cfg: &AgentConfig) -> Result<(), StartError> {
    if cfg.reconnection_delay_ms > cfg.reconnection_delay_max_ms {
        return Err(StartError::Config(format!(
            "WEBSOCKET_RECONNECTION_DELAY ({} ms) must not exceed WEBSOCKET_RECONNECTION_DELAY_MAX ({} ms)",
            cfg.reconnection_delay_ms, cfg.reconnection_delay_max_ms
        )));
    }
    Ok(())
}

fn check_certificate(cfg: &AgentConfig, key: &PrivateKey, cert_pem: &str) -> Result<(), StartError> {
    let path = &cfg.tls_cert_file;
    let ders = certificates(path, "TLS_CERT_FILE", cert_pem)?;
    // The first certificate is the agent's own; any others are its chain.
    let der = &ders[0];
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad_cert("TLS_CERT_FILE", path, e))?;
    let cert_id = dmr::keys::agent_id_in_certificate(&cert).ok_or_else(|| StartError::BadCertificate {
        variable: "TLS_CERT_FILE",
        path: path.clone(),
        problem: "it carries no agent id (SAN URI urn:uuid:<id> or a UUID common name)".into(),
    })?;
    if !cert_id.eq_ignore_ascii_case(cfg.agent_id.trim()) {
        return Err(StartError::IdMismatch {
            agent_id: cfg.agent_id.clone(),
            cert_id,
            path: path.clone(),
        });
    }
    let cert_key = PublicKey::from_certificate_der(der).map_err(|e| bad_cert("TLS_CERT_FILE", path, e))?;
    if &cert_key != key.public_key() {
        return Err(StartError::KeyMismatch { path: path.clone() });
    }
    Ok(())
}

fn check_ca(path: &Path, ca_pem: &str) -> Result<(), StartError> {
    for der in certificates(path, "TLS_CA_FILE", ca_pem)? {
        x509_parser::parse_x509_certificate(&der).map_err(|e| bad_cert("TLS_CA_FILE", path, e))?;
    }
    Ok(())
}

/// The DER certificates in a PEM file; at least one, or the file is refused.
fn certificates(path: &Path, variable: &'static str, pem: &str) -> Result<Vec<Vec<u8>>, StartError> {
    let mut ders = Vec::new();
    for item in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let item = item.map_err(|e| bad_cert(variable, path, e))?;
        if item.label == "CERTIFICATE" {
            ders.push(item.contents);
        }
    }
    if ders.is_empty() {
        return Err(StartError::BadCertificate {
            variable,
            path: path.to_owned(),
            problem: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(ders)
}

fn bad_cert(variable: &'static str, path: &Path, e: impl std::fmt::Display) -> StartError {
    StartError::BadCertificate {
        variable,
        path: path.to_owned(),
        problem: format!("not a readable X.509 certificate: {e}"),
    }
}

fn check_server_url(url: &str) -> Result<(), StartError> {
    let bad = |problem| StartError::BadUrl {
        variable: "DMR_SERVER_GRPC_URL",
        url: url.to_owned(),
        problem,
    };
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(bad("has no scheme: write it as https://host:port"));
    };
    if scheme.eq_ignore_ascii_case("http") {
        return Err(bad("uses http://, but the stream needs mutual TLS: write https://"));
    }
    if !scheme.eq_ignore_ascii_case("https") {
        return Err(bad("must be an https:// URL"));
    }
    let uri: axum::http::Uri = url.parse().map_err(|_| bad("is not a valid URL"))?;
    if uri.host().is_none_or(str::is_empty) || rest.starts_with('/') {
        return Err(bad("names no host"));
    }
    Ok(())
}

fn check_endpoint(url: &str) -> Result<(), StartError> {
    let bad = |problem| StartError::BadUrl {
        variable: "OUTGOING_MESSAGE_ENDPOINT",
        url: url.to_owned(),
        problem,
    };
    let parsed =
        reqwest::Url::parse(url.trim()).map_err(|_| bad("is not a URL (e.g. http://bot.internal:3000/messages)"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("must be an http:// or https:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("names no host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_urls_need_https_and_a_host() {
        assert!(check_server_url("https://dmr.example.org:8076").is_ok());
        assert!(check_server_url("HTTPS://localhost:8076").is_ok());
        for bad in [
            "dmr.example.org:8076",
            "http://dmr.example.org:8076",
            "ftp://x",
            "https://",
            "https:///x",
        ] {
            let e = check_server_url(bad).unwrap_err();
            assert!(e.to_string().starts_with("DMR_SERVER_GRPC_URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_first_reconnection_delay_must_not_exceed_the_largest() {
        let mut cfg = crate::config::AgentConfig::new(
            "d3b07384-d9a0-4c3f-a4e2-123456789abc".into(),
            "key.pem".into(),
            "cert.pem".into(),
            "ca.pem".into(),
            "https://localhost:8076".into(),
            "http://localhost:9/in".into(),
        );
        assert_eq!(
            (cfg.reconnection_delay_ms, cfg.reconnection_delay_max_ms),
            (1000, 5000),
            "the documented defaults"
        );
        assert_eq!(cfg.dmr_server_grpc_url, vec!["https://localhost:8076".to_owned()]);
        assert!(super::check_delays(&cfg).is_ok());
        cfg.reconnection_delay_ms = 10_000;
        let err = super::check_delays(&cfg).unwrap_err().to_string();
        assert!(err.contains("WEBSOCKET_RECONNECTION_DELAY_MAX"), "{err}");
    }

    #[test]
    fn the_endpoint_must_be_an_http_url() {
        assert!(check_endpoint("http://bot.internal:3000/messages").is_ok());
        for bad in ["", "bot.internal:3000", "ftp://bot/x", "/messages", "http://"] {
            let e = check_endpoint(bad).unwrap_err();
            assert!(e.to_string().starts_with("OUTGOING_MESSAGE_ENDPOINT"), "{bad}: {e}");
        }
    }
}

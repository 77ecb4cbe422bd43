//! RSA key handling: PEM parsing in every form the original's operators use (compat §3).
//!
//! Private keys: PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
//! Public keys: SPKI (`BEGIN PUBLIC KEY`) or an X.509 certificate
//! (`BEGIN CERTIFICATE`, whose key is used). Literal `\n` escapes from env values are accepted.
//! Keys under 2048 bits are refused, as `jose` refuses them.
//!
//! All private-key operations run on aws-lc-rs (constant-time; see the performance appendix of `docs/compat.md`).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey, PublicEncryptingKey,
};
use aws_lc_rs::signature::KeyPair as _;
use rustls_pki_types::pem::{PemObject, SectionKind};
use std::fmt;

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a key could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// No PEM block of a supported kind was found.
    #[error("no PEM block found (expected PRIVATE KEY, RSA PRIVATE KEY, PUBLIC KEY or CERTIFICATE)")]
    NoPem,
    /// The PEM block's contents are not a valid RSA key.
    #[error("not a valid RSA key: {0}")]
    Invalid(String),
    /// The key is smaller than [`MIN_RSA_BITS`].
    #[error("RSA key has {0} bits; at least 2048 are required")]
    TooSmall(usize),
}

/// Turns literal `\n` sequences (as in single-line env values) into newlines and trims.
pub fn normalize_pem(text: &str) -> String {
    text.replace("\\n", "\n").trim().to_owned()
}

fn pem_sections(text: &str) -> Vec<(SectionKind, Vec<u8>)> {
    let text = normalize_pem(text);
    <(SectionKind, Vec<u8>)>::pem_slice_iter(text.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// An agent's own RSA private key, ready for signing (RS256) and decrypting (RSA-OAEP).
pub struct PrivateKey {
    signing: KeyPair,
    decrypting: OaepPrivateDecryptingKey,
    public: PublicKey,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl PrivateKey {
    /// Parses a PKCS#8 or PKCS#1 PEM private key.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        for (kind, der) in pem_sections(text) {
            match kind {
                SectionKind::PrivateKey => return Self::from_pkcs8_der(&der),
                SectionKind::RsaPrivateKey => {
                    let pair = KeyPair::from_der(&der).map_err(|e| KeyError::Invalid(e.to_string()))?;
                    let pkcs8 = pair.as_der().map_err(|e| KeyError::Invalid(e.to_string()))?;
                    return Self::from_pkcs8_der(pkcs8.as_ref());
                }
                _ => {}
            }
        }
        Err(KeyError::NoPem)
    }

    /// Parses a PKCS#8 DER private key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let signing = KeyPair::from_pkcs8(der).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let bits = signing.public_modulus_len() * 8;
        if bits < MIN_RSA_BITS {
            return Err(KeyError::TooSmall(bits));
        }
        let decrypting = PrivateDecryptingKey::from_pkcs8(der)
            .map_err(|e| KeyError::Invalid(e.to_string()))
            .and_then(|k| OaepPrivateDecryptingKey::new(k).map_err(|e| KeyError::Invalid(e.to_string())))?;
        let spki = signing
            .public_key()
            .as_der()
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        let public = PublicKey::from_spki_der(spki.as_ref())?;
        Ok(Self {
            signing,
            decrypting,
            public,
        })
    }

    /// The matching public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256 (JWS `RS256`).
    pub fn sign_rs256(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.signing.public_modulus_len()];
        let rng = aws_lc_rs::rand::SystemRandom::new();
        // Signing with a valid key into a buffer of the modulus size cannot fail.
        if self
            .signing
            .sign(&aws_lc_rs::signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
            .is_err()
        {
            sig.clear();
        }
        sig
    }

    /// RSAES-OAEP with SHA-1 and MGF1-SHA-1 (JWE `RSA-OAEP`).
    pub fn decrypt_oaep_sha1(&self, ciphertext: &[u8]) -> Option<Vec<u8>> {
        let mut out = vec![0; self.decrypting.min_output_size()];
        let len = self
            .decrypting
            .decrypt(&aws_lc_rs::rsa::OAEP_SHA1_MGF1SHA1, ciphertext, &mut out, None)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }

    /// The private key as PKCS#8 PEM (for the dev PKI that writes key files).
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let der = self.signing.as_der().map_err(|e| KeyError::Invalid(e.to_string()))?;
        Ok(pem_encode("PRIVATE KEY", der.as_ref()))
    }

    /// Generates a fresh RSA-2048 key.
    pub fn generate() -> Result<Self, KeyError> {
        let pair = KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let der = pair.as_der().map_err(|e| KeyError::Invalid(e.to_string()))?;
        Self::from_pkcs8_der(der.as_ref())
    }
}

/// An RSA public key from the directory, comparable by value.
#[derive(Clone)]
pub struct PublicKey {
    /// Canonical SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
    bits: usize,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki == other.spki
    }
}
impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(rsa-{}, spki {} bytes)", self.bits, self.spki.len())
    }
}

impl PublicKey {
    /// Parses SPKI or certificate PEM.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        for (kind, der) in pem_sections(text) {
            match kind {
                SectionKind::PublicKey => return Self::from_spki_der(&der),
                SectionKind::Certificate => return Self::from_certificate_der(&der),
                _ => {}
            }
        }
        Err(KeyError::NoPem)
    }

    /// Takes the key of an X.509 certificate (DER).
    pub fn from_certificate_der(der: &[u8]) -> Result<Self, KeyError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| KeyError::Invalid(e.to_string()))?;
        Self::from_spki_der(cert.public_key().raw)
    }

    /// Parses SPKI or PKCS#1 DER and canonicalises it to SPKI.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = aws_lc_rs::rsa::PublicKey::from_der(der).map_err(|e| KeyError::Invalid(e.to_string()))?;
        let bits = key.modulus_len() * 8;
        if bits < MIN_RSA_BITS {
            return Err(KeyError::TooSmall(bits));
        }
        let spki = key
            .as_der()
            .map_err(|e| KeyError::Invalid(e.to_string()))?
            .as_ref()
            .to_vec();
        Ok(Self { spki, bits })
    }

    /// Canonical SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// SPKI PEM (`BEGIN PUBLIC KEY`), the form the original's `jose` `importSPKI` takes.
    pub fn to_spki_pem(&self) -> String {
        pem_encode("PUBLIC KEY", &self.spki)
    }

    /// Verifies an RS256 signature.
    pub fn verify_rs256(&self, message: &[u8], signature: &[u8]) -> bool {
        aws_lc_rs::signature::UnparsedPublicKey::new(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, &self.spki)
            .verify(message, signature)
            .is_ok()
    }

    /// RSAES-OAEP (SHA-1, MGF1-SHA-1) encryption of a short secret (the JWE content key).
    pub fn encrypt_oaep_sha1(&self, plaintext: &[u8]) -> Option<Vec<u8>> {
        let key = OaepPublicEncryptingKey::new(PublicEncryptingKey::from_der(&self.spki).ok()?).ok()?;
        let mut out = vec![0; key.ciphertext_size()];
        let len = key
            .encrypt(&aws_lc_rs::rsa::OAEP_SHA1_MGF1SHA1, plaintext, &mut out, None)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The agent id a certificate names — the one rule both the server (authenticating a stream) and
/// the agent (checking its own certificate at start) apply: the SAN URI `urn:uuid:<id>` first, else
/// a common name that is a UUID. Lower-cased.
pub fn agent_id_in_certificate(cert: &x509_parser::certificate::X509Certificate<'_>) -> Option<String> {
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .into_iter()
        .flat_map(|san| san.value.general_names.iter())
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri
                .strip_prefix("urn:uuid:")
                .filter(|id| crate::message::is_uuid(id))
                .map(str::to_owned),
            _ => None,
        });
    let from_cn = || {
        cert.subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .find(|cn| crate::message::is_uuid(cn))
            .map(str::to_owned)
    };
    from_san.or_else(from_cn).map(|id| id.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors() -> serde_json::Value {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/jose-vectors.json"))
            .expect("tests/data/jose-vectors.json (copied from the original's interop vectors) is missing");
        serde_json::from_str(&text).expect("vectors are JSON")
    }

    #[test]
    fn private_and_public_halves_match() {
        let v = vectors();
        let private = PrivateKey::from_pem(v["agentA"]["privateKeyPkcs8Pem"].as_str().unwrap()).unwrap();
        let public = PublicKey::from_pem(v["agentA"]["publicKeySpkiPem"].as_str().unwrap()).unwrap();
        assert_eq!(private.public_key(), &public);
        let other = PublicKey::from_pem(v["agentB"]["publicKeySpkiPem"].as_str().unwrap()).unwrap();
        assert_ne!(&other, &public);
    }

    #[test]
    fn escaped_newlines_and_pkcs1_are_accepted() {
        let key = PrivateKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap().replace('\n', "\\n");
        let again = PrivateKey::from_pem(&pem).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        let spki_pem = key.public_key().to_spki_pem();
        assert_eq!(&PublicKey::from_pem(&spki_pem).unwrap(), key.public_key());
        assert_eq!(PublicKey::from_pem("garbage"), Err(KeyError::NoPem));
    }

    #[test]
    fn sign_verify_and_oaep_round_trip() {
        let key = PrivateKey::generate().unwrap();
        let sig = key.sign_rs256(b"hello");
        assert!(key.public_key().verify_rs256(b"hello", &sig));
        assert!(!key.public_key().verify_rs256(b"hellO", &sig));
        let ct = key.public_key().encrypt_oaep_sha1(&[7; 32]).unwrap();
        assert_eq!(key.decrypt_oaep_sha1(&ct).unwrap(), vec![7; 32]);
    }
}

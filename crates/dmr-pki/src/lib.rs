//! Development PKI, so that nobody needs openssl: a CA, a server certificate, and per agent an
//! RSA-2048 key pair with a client certificate (SAN `urn:uuid:<id>`, CN `<id>`), plus the
//! CentOps JSON that lists the agents' public keys.
//!
//! The CA and server keys are ECDSA P-256; agent keys are RSA because one agent key serves TLS,
//! JWS signing and JWE decryption (compat §3).
//!
//! **Invariant:** private keys are only ever written to files with mode 0600 (on Unix) and never
//! printed.

use dmr::directory::{CentOpsAgent, CentOpsResponse};
use dmr::keys::PrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};

/// Why PKI material could not be made or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// An RSA key could not be made or read.
    #[error("RSA key: {0}")]
    Key(#[from] dmr::keys::KeyError),
    /// The existing `centops.json` is not a CentOps answer, so it cannot be added to.
    #[error("{path}: cannot add agents to it: {source}")]
    Centops {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    /// Certificate PEM.
    pub cert_pem: String,
    /// Private key PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A development certificate authority.
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    cert_pem: String,
}

fn ca_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "DMR development");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl DevCa {
    /// Makes a new CA called `name`.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let params = ca_params(name)?;
        let key = KeyPair::generate()?;
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Self { params, key, cert_pem })
    }

    /// Loads a CA made by [`DevCa::generate`] with the same `name`.
    pub fn load(name: &str, cert_pem: String, key_pem: &str) -> Result<Self, PkiError> {
        Ok(Self {
            params: ca_params(name)?,
            key: KeyPair::from_pem(key_pem)?,
            cert_pem,
        })
    }

    /// The CA certificate PEM (trust anchor for both sides).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    /// Issues a TLS server certificate for DNS names and IP addresses in `names`.
    pub fn issue_server(&self, names: &[&str]) -> Result<Issued, PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "dmr-server");
        for name in names {
            params.subject_alt_names.push(match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into()?),
            });
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues an agent's client certificate for its RSA key.
    pub fn issue_agent(&self, agent_id: &str, key: &PrivateKey) -> Result<String, PkiError> {
        let key_pair = KeyPair::from_pkcs8_pem_and_sign_algo(&key.to_pkcs8_pem()?, &rcgen::PKCS_RSA_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.subject_alt_names = vec![SanType::URI(format!("urn:uuid:{agent_id}").try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        Ok(params.signed_by(&key_pair, &self.issuer())?.pem())
    }
}

/// Everything one agent needs, plus its directory entry.
#[derive(Clone)]
pub struct AgentCredentials {
    /// Agent id (UUID).
    pub id: String,
    /// Display name.
    pub name: String,
    /// PKCS#8 PEM private key.
    pub key_pem: String,
    /// Client certificate PEM.
    pub cert_pem: String,
    /// SPKI PEM public key (what CentOps publishes).
    pub public_key_pem: String,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredentials")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AgentCredentials {
    /// Generates a key pair and a certificate from `ca` for agent `id`.
    pub fn generate(ca: &DevCa, id: &str, name: &str) -> Result<Self, PkiError> {
        let key = PrivateKey::generate()?;
        Self::for_key(ca, id, name, &key)
    }

    /// A certificate from `ca` for an existing key.
    pub fn for_key(ca: &DevCa, id: &str, name: &str, key: &PrivateKey) -> Result<Self, PkiError> {
        Ok(Self {
            id: id.to_owned(),
            name: name.to_owned(),
            key_pem: key.to_pkcs8_pem()?,
            cert_pem: ca.issue_agent(id, key)?,
            public_key_pem: key.public_key().to_spki_pem(),
        })
    }

    /// The CentOps entry for this agent.
    pub fn centops_entry(&self) -> CentOpsAgent {
        let now = dmr::time::now_iso();
        CentOpsAgent {
            id: self.id.clone(),
            name: self.name.clone(),
            authentication_certificate: self.public_key_pem.clone(),
            created_at: now.clone(),
            updated_at: now,
        }
    }
}

/// The CentOps JSON (`{"response":[...]}`) listing `agents`.
pub fn centops_json(agents: &[&AgentCredentials]) -> String {
    let response = CentOpsResponse {
        response: agents.iter().map(|a| a.centops_entry()).collect(),
    };
    serde_json::to_string_pretty(&response).unwrap_or_default()
}

/// Paths of a PKI state directory, as `dmr pki` writes it.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The directory.
    pub dir: PathBuf,
}

impl Layout {
    /// A layout rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// `ca.pem`
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// `ca-key.pem`
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// `server.pem`
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// `server-key.pem`
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// `agents/<id>/cert.pem`
    pub fn agent_cert(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(id).join("cert.pem")
    }
    /// `agents/<id>/key.pem`
    pub fn agent_key(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(id).join("key.pem")
    }
    /// `centops.json`
    pub fn centops(&self) -> PathBuf {
        self.dir.join("centops.json")
    }
}

/// Name of the development CA.
pub const DEV_CA_NAME: &str = "DMR development CA";

/// Creates (or completes) a PKI state directory: reuses the CA, server certificate and agent keys
/// already there, creates what is missing, and adds `agents` (id, name) to `centops.json`.
///
/// Agents already listed there stay listed (a folder is typically extended one agent at a time,
/// and dropping an entry would revoke a running agent at the server's next poll); a listed agent
/// named again gets its entry refreshed. A new CA starts a fresh list: nothing it did not sign
/// can connect.
pub fn ensure(
    layout: &Layout,
    server_names: &[&str],
    agents: &[(String, String)],
) -> Result<Vec<AgentCredentials>, PkiError> {
    let reused_ca = layout.ca_cert().exists() && layout.ca_key().exists();
    let ca = if reused_ca {
        DevCa::load(DEV_CA_NAME, read(&layout.ca_cert())?, &read(&layout.ca_key())?)?
    } else {
        let ca = DevCa::generate(DEV_CA_NAME)?;
        write(&layout.ca_cert(), ca.cert_pem(), false)?;
        write(&layout.ca_key(), &ca.key_pem(), true)?;
        // A new CA invalidates every certificate it did not sign.
        let _ = std::fs::remove_file(layout.server_cert());
        let _ = std::fs::remove_dir_all(layout.dir.join("agents"));
        ca
    };
    // The server certificate is re-issued when the requested names change.
    let names = server_names.join("\n");
    let names_file = layout.dir.join("server-names.txt");
    let same_names = std::fs::read_to_string(&names_file).is_ok_and(|n| n == names);
    if !(same_names && layout.server_cert().exists() && layout.server_key().exists()) {
        let server = ca.issue_server(server_names)?;
        write(&layout.server_cert(), &server.cert_pem, false)?;
        write(&layout.server_key(), &server.key_pem, true)?;
        write(&names_file, &names, false)?;
    }
    let mut creds = Vec::new();
    for (id, name) in agents {
        let (key_path, cert_path) = (layout.agent_key(id), layout.agent_cert(id));
        let c = if key_path.exists() && cert_path.exists() {
            let key_pem = read(&key_path)?;
            let key = PrivateKey::from_pem(&key_pem)?;
            AgentCredentials {
                id: id.clone(),
                name: name.clone(),
                key_pem,
                cert_pem: read(&cert_path)?,
                public_key_pem: key.public_key().to_spki_pem(),
            }
        } else {
            let c = AgentCredentials::generate(&ca, id, name)?;
            write(&key_path, &c.key_pem, true)?;
            write(&cert_path, &c.cert_pem, false)?;
            c
        };
        creds.push(c);
    }
    let mut listed = if reused_ca {
        existing_centops(layout)?
    } else {
        Vec::new()
    };
    for c in &creds {
        let mut entry = c.centops_entry();
        if let Some(old) = listed.iter_mut().find(|e| e.id.eq_ignore_ascii_case(&c.id)) {
            // Same agent: keep its creation time, take the current name and key.
            entry.created_at = std::mem::take(&mut old.created_at);
            *old = entry;
        } else {
            listed.push(entry);
        }
    }
    let json = serde_json::to_string_pretty(&CentOpsResponse { response: listed }).unwrap_or_default();
    write(&layout.centops(), &json, false)?;
    Ok(creds)
}

/// The entries of an existing `centops.json` (none if there is no such file).
fn existing_centops(layout: &Layout) -> Result<Vec<CentOpsAgent>, PkiError> {
    let path = layout.centops();
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = read(&path)?;
    serde_json::from_str::<CentOpsResponse>(&text)
        .map(|r| r.response)
        .map_err(|source| PkiError::Centops { path, source })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.into(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    // Keys are created readable by their owner only, never briefly world-readable.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(io)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_creates_then_reuses() {
        let dir = std::env::temp_dir().join(format!("dmr-pki-{}", uuid::Uuid::new_v4()));
        let layout = Layout::new(&dir);
        let agents = vec![("d3b07384-d9a0-4c3f-a4e2-123456789abc".to_owned(), "A".to_owned())];
        let first = ensure(&layout, &["localhost", "127.0.0.1"], &agents).unwrap();
        let server_cert = std::fs::read_to_string(layout.server_cert()).unwrap();
        let second = ensure(&layout, &["localhost", "127.0.0.1"], &agents).unwrap();
        assert_eq!(first[0].key_pem, second[0].key_pem);
        assert_eq!(first[0].cert_pem, second[0].cert_pem);
        assert_eq!(
            std::fs::read_to_string(layout.server_cert()).unwrap(),
            server_cert,
            "reused"
        );
        ensure(&layout, &["dmr.example.org"], &agents).unwrap();
        assert_ne!(
            std::fs::read_to_string(layout.server_cert()).unwrap(),
            server_cert,
            "re-issued for new names"
        );
        let dir_json = std::fs::read(layout.centops()).unwrap();
        let d = dmr::directory::Directory::from_centops_json(&dir_json).unwrap();
        let cert_key = dmr::keys::PublicKey::from_pem(&first[0].cert_pem).unwrap();
        assert_eq!(d.get(&agents[0].0).unwrap().key, cert_key);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn adding_an_agent_keeps_the_ones_already_listed() {
        let dir = tempfile_dir();
        let layout = Layout::new(&dir);
        let names = ["localhost"];
        let (a, b, c) = (
            "d3b07384-d9a0-4c3f-a4e2-123456789abc",
            "a1e45678-12bc-4ef0-9876-def123456789",
            "0b5e4f0e-8f3c-4c1e-9a55-3e5a2c1d0f77",
        );
        let first = ensure(&layout, &names, &[(a.into(), "A".into()), (b.into(), "B".into())]).unwrap();
        let ca = std::fs::read_to_string(layout.ca_cert()).unwrap();
        // `dmr pki --agent C` on the same folder: A and B must stay in the directory.
        let added = ensure(&layout, &names, &[(c.into(), "C".into())]).unwrap();
        let d = dmr::directory::Directory::from_centops_json(&std::fs::read(layout.centops()).unwrap()).unwrap();
        assert_eq!(d.len(), 3, "A, B and C are listed");
        for (id, key_pem) in [(a, &first[0].key_pem), (b, &first[1].key_pem), (c, &added[0].key_pem)] {
            let key = PrivateKey::from_pem(key_pem).unwrap();
            assert_eq!(&d.get(id).unwrap().key, key.public_key(), "{id} keeps its key");
        }
        assert_eq!(
            std::fs::read_to_string(layout.ca_cert()).unwrap(),
            ca,
            "the CA is reused"
        );
        // Naming a listed agent again refreshes its entry instead of listing it twice.
        ensure(&layout, &names, &[(a.into(), "A renamed".into())]).unwrap();
        let d = dmr::directory::Directory::from_centops_json(&std::fs::read(layout.centops()).unwrap()).unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d.get(a).unwrap().info.name, "A renamed");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_broken_centops_file_is_refused_not_overwritten() {
        let dir = tempfile_dir();
        let layout = Layout::new(&dir);
        let a = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
        ensure(&layout, &["localhost"], &[(a.into(), "A".into())]).unwrap();
        std::fs::write(layout.centops(), "not json").unwrap();
        let e = ensure(&layout, &["localhost"], &[(a.into(), "A".into())]).unwrap_err();
        assert!(matches!(e, PkiError::Centops { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(layout.centops()).unwrap(), "not json");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        std::env::temp_dir().join(format!("dmr-pki-{}", uuid::Uuid::new_v4()))
    }
}

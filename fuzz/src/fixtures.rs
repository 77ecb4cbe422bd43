//! The fixed world the fuzz targets run in: agents A and B of the original's interop vectors
//! (`tests/data/jose-vectors.json`), their keys, a directory of the two and the server's
//! validation context for a stream authenticated as A.

use dmr::directory::{CentOpsAgent, Directory};
use dmr::envelope::ValidationContext;
use dmr::keys::{PrivateKey, PublicKey};
use serde_json::Value;
use std::sync::LazyLock;

/// The interop vectors, compiled in so a fuzz binary needs no file at run time.
pub const VECTORS: &str = include_str!("../../tests/data/jose-vectors.json");

/// Largest envelope payload the fuzzed validation context accepts: small, so that the size rule
/// is reachable by short inputs.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// One agent of the vectors.
pub struct Agent {
    /// Its id (lower case).
    pub id: String,
    /// Its private key.
    pub private: PrivateKey,
    /// Its public key, as the directory publishes it.
    pub public: PublicKey,
}

/// Everything the targets share, parsed once per process.
pub struct Fixtures {
    /// The sender of the vectors (and the authenticated agent of the validation context).
    pub a: Agent,
    /// The recipient of the vectors.
    pub b: Agent,
    /// A directory holding A and B.
    pub directory: Directory,
}

/// The fixtures; the first use parses them.
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: LazyLock<Fixtures> = LazyLock::new(load);
    &FIXTURES
}

/// The validation context of a server whose stream is authenticated as A and whose directory
/// holds A and B.
pub fn validation_context() -> ValidationContext<'static> {
    ValidationContext {
        authenticated_agent: &fixtures().a.id,
        is_known_agent: &|id| fixtures().directory.contains(id),
        max_payload_bytes: MAX_PAYLOAD_BYTES,
    }
}

fn load() -> Fixtures {
    let vectors: Value = serde_json::from_str(VECTORS).expect("tests/data/jose-vectors.json is JSON");
    let agent = |name: &str| {
        let text = |field: &str| {
            vectors[name][field]
                .as_str()
                .unwrap_or_else(|| panic!("jose-vectors.json has no {name}.{field}"))
                .to_owned()
        };
        Agent {
            id: text("id"),
            private: PrivateKey::from_pem(&text("privateKeyPkcs8Pem")).expect("vector private key parses"),
            public: PublicKey::from_pem(&text("publicKeySpkiPem")).expect("vector public key parses"),
        }
    };
    let (a, b) = (agent("agentA"), agent("agentB"));
    let entry = |agent: &Agent, name: &str| CentOpsAgent {
        id: agent.id.clone(),
        name: name.to_owned(),
        authentication_certificate: agent.public.to_spki_pem(),
        created_at: "2024-01-01T00:00:00.000Z".to_owned(),
        updated_at: "2024-01-01T00:00:00.000Z".to_owned(),
    };
    let directory = Directory::from_agents(vec![entry(&a, "agent A"), entry(&b, "agent B")])
        .expect("the vectors' agents form a directory");
    Fixtures { a, b, directory }
}

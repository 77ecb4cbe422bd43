//! Test PKI on top of `dmr-pki`: a CA, a server certificate for `localhost`/`127.0.0.1`, agent
//! credentials with fresh ids, and the files the server and agents read, in a temp dir.

use crate::KitError;
use dmr::keys::PrivateKey;
use dmr_pki::{AgentCredentials, DevCa};
use std::path::{Path, PathBuf};

/// PKI material for one test or benchmark scenario, in a temp dir (removed on drop).
pub struct TestPki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
    pub ca_file: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    /// Panics if the temp dir or certificates cannot be made (a test cannot go on without them).
    pub fn new() -> Self {
        Self::try_new().expect("test PKI")
    }

    pub fn try_new() -> Result<Self, KitError> {
        let dir = tempfile::tempdir()?;
        let ca = DevCa::generate("test CA")?;
        let server = ca.issue_server(&["localhost", "127.0.0.1"])?;
        let ca_file = dir.path().join("ca.pem");
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server-key.pem");
        std::fs::write(&ca_file, ca.cert_pem())?;
        std::fs::write(&server_cert, &server.cert_pem)?;
        std::fs::write(&server_key, &server.key_pem)?;
        Ok(Self {
            dir,
            ca,
            ca_file,
            server_cert,
            server_key,
        })
    }

    /// An agent with a fresh id and a freshly generated key.
    pub fn agent(&self, name: &str) -> AgentCredentials {
        AgentCredentials::generate(&self.ca, &uuid::Uuid::new_v4().to_string(), name).expect("agent credentials")
    }

    /// `n` agents with fresh ids (so every run has its own queues) and keys from `cache` (see
    /// [`cached_keys`]): generating thousands of RSA keys on every run would dominate it.
    pub fn agents_with_cached_keys(&self, n: usize, cache: &Path) -> Result<Vec<AgentCredentials>, KitError> {
        let keys = cached_keys(n, cache)?;
        let run = uuid::Uuid::new_v4().simple().to_string();
        parallel_map(&keys, |i, key| {
            let id = uuid::Uuid::new_v4().to_string();
            Ok(AgentCredentials::for_key(
                &self.ca,
                &id,
                &format!("agent {} #{i}", &run[..8]),
                key,
            )?)
        })
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        self.try_write(name, text).expect("write into the test PKI dir")
    }

    pub fn try_write(&self, name: &str, text: &str) -> Result<PathBuf, KitError> {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    }

    /// The CentOps file listing `agents`.
    pub fn write_centops(&self, agents: &[&AgentCredentials]) -> PathBuf {
        self.write("centops.json", &dmr_pki::centops_json(agents))
    }
}

/// Runs `f` over `items` on every core, keeping the order.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(usize, &T) -> Result<R, KitError> + Sync,
) -> Result<Vec<R>, KitError> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = items.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let f = &f;
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, item)| f(c * chunk + i, item))
                        .collect::<Result<Vec<R>, KitError>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            out.extend(h.join().map_err(|_| KitError::WorkerPanicked)??);
        }
        Ok(out)
    })
}

/// `n` RSA-2048 keys: `cache/key-<i>.pem` where present (PKCS#8), generated (about 50 ms each, on
/// every core) and saved where not. Each agent id needs its own key: the server checks that the
/// certificate's key is the directory's key for that id.
pub fn cached_keys(n: usize, cache: &Path) -> Result<Vec<PrivateKey>, KitError> {
    std::fs::create_dir_all(cache)?;
    let slots: Vec<usize> = (0..n).collect();
    let missing = slots
        .iter()
        .filter(|i| !cache.join(format!("key-{i}.pem")).exists())
        .count();
    if missing > 0 {
        eprintln!(
            "generating {missing} RSA keys into {} (once; about {} s)",
            cache.display(),
            missing / 40 + 1
        );
    }
    parallel_map(&slots, |_, i| {
        let file = cache.join(format!("key-{i}.pem"));
        if let Ok(pem) = std::fs::read_to_string(&file)
            && let Ok(key) = PrivateKey::from_pem(&pem)
        {
            return Ok(key);
        }
        let key = PrivateKey::generate()?;
        // Written aside and renamed, so a concurrent run never reads half a key.
        let tmp = cache.join(format!("key-{i}.pem.{}", std::process::id()));
        std::fs::write(&tmp, key.to_pkcs8_pem()?)?;
        std::fs::rename(&tmp, &file)?;
        Ok(key)
    })
}

//! The agent directory as CentOps publishes it (compat §7), parsed all-or-nothing.
//!
//! **Invariant:** a [`Directory`] only exists if every entry parsed: unique UUID ids and usable RSA
//! keys. A partially valid CentOps answer is refused whole, never applied in part.

use crate::keys::{KeyError, PublicKey};
use crate::message::is_uuid;
use crate::proto;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One entry of the CentOps answer, field names as CentOps spells them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CentOpsAgent {
    /// Agent id (UUID).
    pub id: String,
    /// Display name.
    pub name: String,
    /// SPKI PEM public key, or an X.509 certificate PEM.
    pub authentication_certificate: String,
    /// Creation time.
    pub created_at: String,
    /// Update time.
    pub updated_at: String,
}

/// The CentOps answer: `{"response": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CentOpsResponse {
    /// The agents.
    pub response: Vec<CentOpsAgent>,
}

/// Why a CentOps answer was refused.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// Not JSON of the expected shape.
    #[error(
        "CentOps answer is not valid JSON of the form {{\"response\":[{{id,name,authentication_certificate,created_at,updated_at}}]}}: {0}"
    )]
    Format(#[from] serde_json::Error),
    /// An id is not a UUID.
    #[error("agent id {0:?} is not a UUID")]
    BadId(String),
    /// The same id appears twice.
    #[error("agent id {0} appears more than once")]
    DuplicateId(String),
    /// A key cannot be used.
    #[error("agent {id}: authentication_certificate unusable: {source}")]
    BadKey {
        /// The agent.
        id: String,
        /// Why.
        source: KeyError,
    },
}

/// One known agent with its parsed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    /// As published.
    pub info: CentOpsAgent,
    /// Its parsed public key.
    pub key: PublicKey,
}

impl AgentEntry {
    /// The legacy Socket.IO form `{id, name, authenticationCertificate, createdAt, updatedAt}`
    /// (`ClientConfigDto`), plus `deleted` for partial lists (`AgentDto`).
    pub fn to_legacy_json(&self, deleted: Option<bool>) -> serde_json::Value {
        let mut v = serde_json::json!({
            "id": self.info.id,
            "name": self.info.name,
            "authenticationCertificate": self.info.authentication_certificate,
            "createdAt": self.info.created_at,
            "updatedAt": self.info.updated_at,
        });
        if let Some(d) = deleted {
            v["deleted"] = serde_json::Value::Bool(d);
        }
        v
    }

    /// The protobuf form (`deleted` false).
    pub fn to_proto(&self) -> proto::AgentInfo {
        proto::AgentInfo {
            id: self.info.id.clone(),
            name: self.info.name.clone(),
            authentication_certificate: self.info.authentication_certificate.clone(),
            created_at: self.info.created_at.clone(),
            updated_at: self.info.updated_at.clone(),
            deleted: false,
        }
    }
}

/// The whole directory, keyed by lower-case agent id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directory {
    agents: BTreeMap<String, AgentEntry>,
}

/// What changed between two directories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectoryDiff {
    /// New agents.
    pub added: Vec<AgentEntry>,
    /// Removed agents.
    pub deleted: Vec<AgentEntry>,
    /// Same id, different key.
    pub rekeyed: Vec<AgentEntry>,
}

impl DirectoryDiff {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.deleted.is_empty() && self.rekeyed.is_empty()
    }
}

impl Directory {
    /// Parses a CentOps JSON answer; any bad entry refuses the whole answer.
    pub fn from_centops_json(bytes: &[u8]) -> Result<Self, DirectoryError> {
        let parsed: CentOpsResponse = serde_json::from_slice(bytes)?;
        Self::from_agents(parsed.response)
    }

    /// Builds from entries; any bad entry refuses the whole list.
    pub fn from_agents(agents: Vec<CentOpsAgent>) -> Result<Self, DirectoryError> {
        let mut map = BTreeMap::new();
        for info in agents {
            if !is_uuid(&info.id) {
                return Err(DirectoryError::BadId(info.id));
            }
            let id = info.id.to_ascii_lowercase();
            let key = PublicKey::from_pem(&info.authentication_certificate)
                .map_err(|source| DirectoryError::BadKey { id: id.clone(), source })?;
            if map.contains_key(&id) {
                return Err(DirectoryError::DuplicateId(id));
            }
            map.insert(id, AgentEntry { info, key });
        }
        Ok(Self { agents: map })
    }

    /// Looks an agent up by id (any case).
    pub fn get(&self, id: &str) -> Option<&AgentEntry> {
        self.agents.get(&id.to_ascii_lowercase())
    }

    /// True if the agent is known.
    pub fn contains(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Lower-case ids of all agents.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.agents.keys().map(String::as_str)
    }

    /// All entries.
    pub fn entries(&self) -> impl Iterator<Item = &AgentEntry> {
        self.agents.values()
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The protobuf full list.
    pub fn to_proto(&self) -> proto::AgentDirectory {
        proto::AgentDirectory {
            agents: self.entries().map(AgentEntry::to_proto).collect(),
            more: false,
        }
    }

    /// The whole directory as consecutive frames of at most `per_frame` agents each, every one but
    /// the last marked `more` (an empty directory is one empty frame). Frames are built as they are
    /// taken, so a session never holds more than one frame's copy of the directory.
    pub fn to_proto_frames(&self, per_frame: usize) -> impl Iterator<Item = proto::AgentDirectory> + '_ {
        let entries: Vec<&AgentEntry> = self.entries().collect();
        let per_frame = per_frame.max(1);
        let frames = entries.len().div_ceil(per_frame).max(1);
        (0..frames).map(move |i| {
            let part = &entries[(i * per_frame).min(entries.len())..((i + 1) * per_frame).min(entries.len())];
            proto::AgentDirectory {
                agents: part.iter().map(|e| e.to_proto()).collect(),
                more: i + 1 < frames,
            }
        })
    }

    /// Rebuilds a directory from protobuf entries (as an agent receives them).
    pub fn from_proto(agents: &[proto::AgentInfo]) -> Result<Self, DirectoryError> {
        Self::from_agents(agents.iter().filter(|a| !a.deleted).map(info_from_proto).collect())
    }

    /// Applies a partial update (deleted entries removed, others inserted or replaced). Entries whose
    /// key does not parse are skipped and returned as errors; the rest still apply.
    pub fn apply_update(&mut self, agents: &[proto::AgentInfo]) -> Vec<DirectoryError> {
        let mut errors = Vec::new();
        for a in agents {
            let id = a.id.to_ascii_lowercase();
            if a.deleted {
                self.agents.remove(&id);
                continue;
            }
            match Self::from_agents(vec![info_from_proto(a)]) {
                Ok(mut one) => self.agents.append(&mut one.agents),
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// What changed from `self` to `next`.
    pub fn diff(&self, next: &Directory) -> DirectoryDiff {
        let mut diff = DirectoryDiff::default();
        for (id, entry) in &next.agents {
            match self.agents.get(id) {
                None => diff.added.push(entry.clone()),
                Some(old) if old.key != entry.key => diff.rekeyed.push(entry.clone()),
                Some(_) => {}
            }
        }
        diff.deleted = self
            .agents
            .iter()
            .filter(|(id, _)| !next.agents.contains_key(*id))
            .map(|(_, e)| e.clone())
            .collect();
        diff
    }
}

fn info_from_proto(a: &proto::AgentInfo) -> CentOpsAgent {
    CentOpsAgent {
        id: a.id.clone(),
        name: a.name.clone(),
        authentication_certificate: a.authentication_certificate.clone(),
        created_at: a.created_at.clone(),
        updated_at: a.updated_at.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::PrivateKey;

    fn agent(id: &str, key: &PrivateKey) -> CentOpsAgent {
        CentOpsAgent {
            id: id.into(),
            name: format!("agent {id}"),
            authentication_certificate: key.public_key().to_spki_pem(),
            created_at: "2024-01-01T00:00:00.000Z".into(),
            updated_at: "2024-01-01T00:00:00.000Z".into(),
        }
    }

    #[test]
    fn frames_split_the_directory_and_only_the_last_is_final() {
        let key = PrivateKey::generate().unwrap();
        let ids: Vec<String> = (0..5)
            .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
            .collect();
        let json = serde_json::to_vec(&CentOpsResponse {
            response: ids.iter().map(|id| agent(id, &key)).collect(),
        })
        .unwrap();
        let dir = Directory::from_centops_json(&json).unwrap();
        let frames: Vec<_> = dir.to_proto_frames(2).collect();
        assert_eq!(frames.iter().map(|f| f.agents.len()).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(frames.iter().map(|f| f.more).collect::<Vec<_>>(), [true, true, false]);
        let rebuilt: Vec<_> = frames.into_iter().flat_map(|f| f.agents).collect();
        assert_eq!(Directory::from_proto(&rebuilt).unwrap(), dir);
        let empty: Vec<_> = Directory::default().to_proto_frames(2).collect();
        assert_eq!(empty.len(), 1);
        assert!(!empty[0].more && empty[0].agents.is_empty());
    }

    #[test]
    fn parses_refuses_garbage_and_diffs() {
        let k1 = PrivateKey::generate().unwrap();
        let k2 = PrivateKey::generate().unwrap();
        let a = "d3b07384-d9a0-4c3f-a4e2-123456789abc";
        let b = "a1e45678-12bc-4ef0-9876-def123456789";
        let json = serde_json::to_vec(&CentOpsResponse {
            response: vec![agent(a, &k1), agent(b, &k2)],
        })
        .unwrap();
        let d1 = Directory::from_centops_json(&json).unwrap();
        assert!(d1.contains(&a.to_uppercase()));
        assert!(matches!(
            Directory::from_centops_json(b"{}"),
            Err(DirectoryError::Format(_))
        ));
        assert!(matches!(
            Directory::from_agents(vec![agent(a, &k1), agent(a, &k2)]),
            Err(DirectoryError::DuplicateId(_))
        ));
        assert!(matches!(
            Directory::from_agents(vec![agent("x", &k1)]),
            Err(DirectoryError::BadId(_))
        ));
        let mut bad = agent(a, &k1);
        bad.authentication_certificate = "nope".into();
        assert!(matches!(
            Directory::from_agents(vec![bad]),
            Err(DirectoryError::BadKey { .. })
        ));

        let c = "00000000-0000-4000-8000-000000000001";
        let d2 = Directory::from_agents(vec![agent(a, &k2), agent(c, &k1)]).unwrap();
        let diff = d1.diff(&d2);
        assert_eq!(diff.added.len(), 1);
        assert_eq!(diff.deleted[0].info.id, b);
        assert_eq!(diff.rekeyed[0].info.id, a);
        let mut d3 = d1.clone();
        let mut update = d2.to_proto().agents;
        update.push(proto::AgentInfo {
            id: b.into(),
            deleted: true,
            ..Default::default()
        });
        assert!(d3.apply_update(&update).is_empty());
        assert_eq!(d3, d2);
        assert_eq!(Directory::from_proto(&d2.to_proto().agents).unwrap(), d2);
    }
}

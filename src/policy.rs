//! The relay policy: which agent may send to which, and per-agent limits that override the
//! server's global ones. Parsed all-or-nothing from JSON (a file or an HTTP answer, like the CentOps
//! directory).
//!
//! ```json
//! {
//!   "default": "deny",
//!   "groups": { "tax": ["<uuid>", "<uuid>"], "police": ["<uuid>"] },
//!   "rules": [
//!     { "from": "tax", "to": "police", "action": "allow" },
//!     { "from": "police", "to": ["tax", "<uuid>"], "action": "allow" },
//!     { "from": "*", "to": "<uuid>", "action": "deny", "reason": "decommissioned" }
//!   ],
//!   "limits": [
//!     { "for": "<uuid>", "messages_per_second": 5, "burst": 10, "max_in_flight": 16 },
//!     { "for": "*", "bytes_per_second": 1048576 }
//!   ]
//! }
//! ```
//!
//! - **Rules** are read top to bottom; the first whose `from` matches the sender and whose `to`
//!   matches the recipient decides. No match: `default` (`allow` when absent — the original's "any
//!   listed agent may message any other").
//! - A **selector** (`from`, `to`, `for`) is `"*"`, an agent id (UUID, any case), a group name from
//!   `groups`, or a list of those.
//! - **Limits**: the first entry whose `for` matches the agent gives its values; a field it leaves out
//!   falls back to the server's global setting.
//!
//! **Invariant:** a [`Policy`] only exists if the whole document parsed: every group a rule names is
//! defined, every id is a UUID. A partly wrong policy is refused whole, never applied in part.

use crate::message::is_uuid;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Why a policy document was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Not JSON of the documented shape.
    #[error("policy is not valid JSON of the documented shape: {0}")]
    Format(#[from] serde_json::Error),
    /// A selector names a group that `groups` does not define.
    #[error("{place}: {name:?} is neither \"*\", an agent id (UUID) nor a group defined in \"groups\"")]
    UnknownGroup {
        /// Where (e.g. `rules[2].to`).
        place: String,
        /// The name.
        name: String,
    },
    /// A group member is not a UUID.
    #[error("groups.{group}: member {member:?} is not an agent id (UUID)")]
    BadMember {
        /// The group.
        group: String,
        /// The member.
        member: String,
    },
    /// A group name that could be mistaken for an agent id or the wildcard.
    #[error("groups: {0:?} cannot be a group name (it is \"*\" or looks like an agent id)")]
    BadGroupName(String),
    /// A limit that cannot work (a zero rate would refuse everything: use a deny rule for that).
    #[error("limits[{index}].{field}: must be at least 1 (to stop an agent sending, use a deny rule)")]
    ZeroLimit {
        /// Index in `limits`.
        index: usize,
        /// The field.
        field: &'static str,
    },
}

/// What a rule (or the default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The send goes through.
    #[default]
    Allow,
    /// The send is refused.
    Deny,
}

/// One or several selector strings, as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Names {
    One(String),
    Many(Vec<String>),
}

impl Names {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(name) => vec![name],
            Self::Many(names) => names,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    from: Names,
    to: Names,
    action: Action,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsDoc {
    #[serde(rename = "for")]
    target: Names,
    messages_per_second: Option<u32>,
    burst: Option<u32>,
    bytes_per_second: Option<u64>,
    max_in_flight: Option<u32>,
    max_payload_bytes: Option<u64>,
}

impl LimitsDoc {
    fn limits(&self) -> AgentLimits {
        AgentLimits {
            messages_per_second: self.messages_per_second,
            burst: self.burst,
            bytes_per_second: self.bytes_per_second,
            max_in_flight: self.max_in_flight,
            max_payload_bytes: self.max_payload_bytes,
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PolicyDoc {
    #[serde(default)]
    default: Action,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
    #[serde(default)]
    limits: Vec<LimitsDoc>,
}

/// Per-agent limits; `None` = the server's global setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentLimits {
    /// Sustained sends per second.
    pub messages_per_second: Option<u32>,
    /// Sends allowed at once above the sustained rate (the bucket's size).
    pub burst: Option<u32>,
    /// Sustained payload bytes per second (the bucket holds one second's worth, and at least one
    /// largest payload).
    pub bytes_per_second: Option<u64>,
    /// Sends awaiting their answer at once.
    pub max_in_flight: Option<u32>,
    /// Largest payload (the JWE) this agent may send, in bytes; at most the server's
    /// `MESSAGE_MAX_PAYLOAD_BYTES`.
    pub max_payload_bytes: Option<u64>,
}

/// A compiled selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Any,
    Agents(BTreeSet<String>),
}

impl Selector {
    fn matches(&self, agent_id: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Agents(ids) => ids.contains(agent_id),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    from: Selector,
    to: Selector,
    action: Action,
    reason: Option<String>,
    /// Position in the document (1-based), for refusals.
    number: usize,
}

/// A send the policy refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The rule that refused it (1-based), or `None` for the default.
    pub rule: Option<usize>,
    /// The rule's own reason, if it gave one.
    pub reason: Option<String>,
}

impl Denied {
    /// What the sender is told.
    pub fn describe(&self, sender: &str, recipient: &str) -> String {
        let by = match self.rule {
            Some(n) => format!("rule {n} of the relay policy"),
            None => "the relay policy's default (deny)".to_owned(),
        };
        match &self.reason {
            Some(reason) => format!("agent {sender} may not send to agent {recipient}: {by}: {reason}"),
            None => format!("agent {sender} may not send to agent {recipient}: {by}"),
        }
    }
}

/// The policy in force.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    default: Action,
    rules: Vec<Rule>,
    limits: Vec<(Selector, AgentLimits)>,
}

impl Policy {
    /// Everyone may message everyone, no per-agent limits (no policy configured).
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Parses a policy document (see the module doc).
    pub fn from_json(bytes: &[u8]) -> Result<Self, PolicyError> {
        let doc: PolicyDoc = serde_json::from_slice(bytes)?;
        let groups = compile_groups(doc.groups)?;
        let rules = doc
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, rule)| {
                Ok(Rule {
                    from: compile(rule.from, &groups, || format!("rules[{i}].from"))?,
                    to: compile(rule.to, &groups, || format!("rules[{i}].to"))?,
                    action: rule.action,
                    reason: rule.reason.filter(|r| !r.trim().is_empty()),
                    number: i + 1,
                })
            })
            .collect::<Result<_, PolicyError>>()?;
        let limits = doc
            .limits
            .into_iter()
            .enumerate()
            .map(|(i, entry)| {
                let limits = entry.limits();
                check_limits(i, &limits)?;
                Ok((compile(entry.target, &groups, || format!("limits[{i}].for"))?, limits))
            })
            .collect::<Result<_, PolicyError>>()?;
        Ok(Self {
            default: doc.default,
            rules,
            limits,
        })
    }

    /// Whether `sender` may send to `recipient` (lower-case agent ids).
    pub fn check(&self, sender: &str, recipient: &str) -> Result<(), Denied> {
        let decided = self
            .rules
            .iter()
            .find(|rule| rule.from.matches(sender) && rule.to.matches(recipient));
        match decided {
            Some(rule) if rule.action == Action::Deny => Err(Denied {
                rule: Some(rule.number),
                reason: rule.reason.clone(),
            }),
            Some(_) => Ok(()),
            None if self.default == Action::Deny => Err(Denied {
                rule: None,
                reason: None,
            }),
            None => Ok(()),
        }
    }

    /// The per-agent limits for `agent_id` (all `None` when no entry matches).
    pub fn limits_for(&self, agent_id: &str) -> AgentLimits {
        self.limits
            .iter()
            .find(|(target, _)| target.matches(agent_id))
            .map(|(_, limits)| *limits)
            .unwrap_or_default()
    }

    /// Number of rules (for logs).
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

fn compile_groups(groups: BTreeMap<String, Vec<String>>) -> Result<BTreeMap<String, BTreeSet<String>>, PolicyError> {
    groups
        .into_iter()
        .map(|(group, members)| {
            if group == "*" || is_uuid(&group) {
                return Err(PolicyError::BadGroupName(group));
            }
            let members = members
                .into_iter()
                .map(|member| {
                    if is_uuid(&member) {
                        Ok(member.to_ascii_lowercase())
                    } else {
                        Err(PolicyError::BadMember {
                            group: group.clone(),
                            member,
                        })
                    }
                })
                .collect::<Result<_, _>>()?;
            Ok((group, members))
        })
        .collect()
}

fn compile(
    names: Names,
    groups: &BTreeMap<String, BTreeSet<String>>,
    place: impl Fn() -> String,
) -> Result<Selector, PolicyError> {
    let mut ids = BTreeSet::new();
    for name in names.into_vec() {
        if name == "*" {
            return Ok(Selector::Any);
        }
        if is_uuid(&name) {
            ids.insert(name.to_ascii_lowercase());
        } else if let Some(members) = groups.get(&name) {
            ids.extend(members.iter().cloned());
        } else {
            return Err(PolicyError::UnknownGroup { place: place(), name });
        }
    }
    Ok(Selector::Agents(ids))
}

fn check_limits(index: usize, limits: &AgentLimits) -> Result<(), PolicyError> {
    let zero = |field| Err(PolicyError::ZeroLimit { index, field });
    if limits.messages_per_second == Some(0) {
        return zero("messages_per_second");
    }
    if limits.burst == Some(0) {
        return zero("burst");
    }
    if limits.bytes_per_second == Some(0) {
        return zero("bytes_per_second");
    }
    if limits.max_in_flight == Some(0) {
        return zero("max_in_flight");
    }
    if limits.max_payload_bytes == Some(0) {
        return zero("max_payload_bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAX: &str = "11111111-1111-4111-8111-111111111111";
    const POLICE: &str = "22222222-2222-4222-8222-222222222222";
    const OTHER: &str = "33333333-3333-4333-8333-333333333333";

    fn policy(json: &str) -> Policy {
        Policy::from_json(json.as_bytes()).unwrap()
    }

    #[test]
    fn no_policy_and_an_empty_one_allow_everyone() {
        assert_eq!(Policy::allow_all().check(TAX, POLICE), Ok(()));
        assert_eq!(policy("{}").check(TAX, POLICE), Ok(()));
    }

    #[test]
    fn the_first_matching_rule_decides_and_the_default_covers_the_rest() {
        let p = policy(&format!(
            r#"{{"default":"deny","groups":{{"tax":["{}"],"police":["{POLICE}"]}},
                "rules":[{{"from":"{OTHER}","to":"*","action":"deny","reason":"suspended"}},
                         {{"from":["tax","{OTHER}"],"to":"police","action":"allow"}}]}}"#,
            TAX.to_uppercase()
        ));
        assert_eq!(p.check(TAX, POLICE), Ok(()));
        let denied = p.check(OTHER, POLICE).unwrap_err();
        assert_eq!(denied.rule, Some(1));
        assert!(
            denied
                .describe(OTHER, POLICE)
                .contains("rule 1 of the relay policy: suspended")
        );
        let by_default = p.check(POLICE, TAX).unwrap_err();
        assert_eq!(by_default.rule, None);
        assert!(by_default.describe(POLICE, TAX).contains("default (deny)"));
    }

    #[test]
    fn limits_come_from_the_first_matching_entry() {
        let p = policy(&format!(
            r#"{{"limits":[{{"for":"{TAX}","messages_per_second":5,"burst":10}},{{"for":"*","max_in_flight":16}}]}}"#
        ));
        assert_eq!(p.limits_for(TAX).messages_per_second, Some(5));
        assert_eq!(p.limits_for(TAX).max_in_flight, None);
        assert_eq!(p.limits_for(POLICE).max_in_flight, Some(16));
        assert_eq!(Policy::allow_all().limits_for(TAX), AgentLimits::default());
    }

    #[test]
    fn the_kubernetes_base_policy_parses_and_allows_everyone() {
        let p = Policy::from_json(include_bytes!("../k8s/base/server/relay-policy.json")).unwrap();
        assert_eq!(p.check(TAX, POLICE), Ok(()));
    }

    #[test]
    fn a_wrong_document_is_refused_whole_naming_the_place() {
        let unknown = Policy::from_json(br#"{"rules":[{"from":"tax","to":"*","action":"allow"}]}"#).unwrap_err();
        assert!(unknown.to_string().contains("rules[0].from"), "{unknown}");
        let member = Policy::from_json(br#"{"groups":{"tax":["not-a-uuid"]}}"#).unwrap_err();
        assert!(matches!(member, PolicyError::BadMember { .. }), "{member}");
        let typo = Policy::from_json(br#"{"rule":[]}"#).unwrap_err();
        assert!(typo.to_string().contains("unknown field"), "{typo}");
        let action = Policy::from_json(br#"{"rules":[{"from":"*","to":"*","action":"maybe"}]}"#).unwrap_err();
        assert!(matches!(action, PolicyError::Format(_)), "{action}");
        let zero = Policy::from_json(br#"{"limits":[{"for":"*","messages_per_second":0}]}"#).unwrap_err();
        assert!(zero.to_string().contains("limits[0].messages_per_second"), "{zero}");
        let name = Policy::from_json(br#"{"groups":{"*":[]}}"#).unwrap_err();
        assert!(matches!(name, PolicyError::BadGroupName(_)), "{name}");
    }
}

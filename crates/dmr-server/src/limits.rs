//! Limits that keep one agent (or one source address) from crowding out the others: token buckets
//! on each agent's sends (messages and payload bytes per second), a cap on its sends in flight and
//! on its payload size, and on session opens per agent and Socket.IO connection attempts per
//! address. Global values come from [`crate::config::PolicyConfig`]; the relay policy may override
//! the per-agent send limits agent by agent ([`dmr::policy::AgentLimits`]).
//!
//! **Invariants:**
//! - a refused send costs no validation, no broker work and nothing queued: it is refused on
//!   arrival, with the limit it hit and when to retry;
//! - state is per instance (an agent holds one session, on one instance), bounded by the directory
//!   for agents and pruned for addresses;
//! - the limits read the policy in force at each send: an override applies to open sessions.

use crate::config::PolicyConfig;
use dmr::policy::AgentLimits;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses remembered for [`Limits::socket_connect`] before idle ones are forgotten.
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// One token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    stamp: Instant,
}

impl Bucket {
    fn full(capacity: f64, now: Instant) -> Self {
        Self {
            tokens: capacity,
            stamp: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, capacity: f64) {
        let elapsed = now.saturating_duration_since(self.stamp).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(capacity);
        self.stamp = now;
    }

    /// How long until `amount` tokens are there (zero: they are).
    fn wait_for(&self, rate: f64, amount: f64) -> Duration {
        if self.tokens >= amount {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((amount - self.tokens) / rate)
        }
    }
}

/// Which limit refused something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitExceeded {
    /// Sends per second.
    SendRate {
        /// The agent's rate.
        per_second: u32,
        /// When the next send fits.
        retry_after: Duration,
    },
    /// Payload bytes per second.
    ByteRate {
        /// The agent's rate.
        per_second: u64,
        /// When this payload fits.
        retry_after: Duration,
    },
    /// Sends awaiting their answer.
    InFlight {
        /// The agent's cap.
        max: u32,
    },
    /// One payload over the agent's size limit (retrying does not help).
    PayloadSize {
        /// The payload's size.
        size: usize,
        /// The agent's limit.
        max: u64,
    },
}

impl LimitExceeded {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::SendRate { .. } => "sends_per_second",
            Self::ByteRate { .. } => "bytes_per_second",
            Self::InFlight { .. } => "sends_in_flight",
            Self::PayloadSize { .. } => "payload_size",
        }
    }

    /// When to retry; `None` when retrying the same send cannot help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::SendRate { retry_after, .. } | Self::ByteRate { retry_after, .. } => {
                Some((*retry_after).max(Duration::from_millis(1)))
            }
            Self::InFlight { .. } => Some(IN_FLIGHT_RETRY_AFTER),
            Self::PayloadSize { .. } => None,
        }
    }

    /// What the sender is told.
    pub fn describe(&self) -> String {
        match self {
            Self::SendRate { per_second, .. } => format!(
                "over this agent's limit of {per_second} sends per second (LIMIT_SENDS_PER_SECOND or the relay policy); nothing was queued, retry later"
            ),
            Self::ByteRate { per_second, .. } => format!(
                "over this agent's limit of {per_second} payload bytes per second (LIMIT_SEND_BYTES_PER_SECOND or the relay policy); nothing was queued, retry later"
            ),
            Self::InFlight { max } => format!(
                "this agent already has {max} sends awaiting their answer (LIMIT_SENDS_IN_FLIGHT or the relay policy); nothing was queued, retry later"
            ),
            Self::PayloadSize { size, max } => format!(
                "the payload is {size} bytes, over this agent's limit of {max} (the relay policy's max_payload_bytes); nothing was queued"
            ),
        }
    }
}

/// When a send refused for too many in flight may be retried.
const IN_FLIGHT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// An agent's send limits, global settings overridden by the policy.
#[derive(Debug, Clone, Copy)]
pub struct SendLimits {
    /// Sends per second (0 = off).
    pub per_second: u32,
    /// The sends bucket's size.
    pub burst: u32,
    /// Payload bytes per second (0 = off).
    pub bytes_per_second: u64,
    /// Sends in flight.
    pub in_flight: u32,
    /// Largest payload.
    pub max_payload: u64,
}

impl SendLimits {
    /// The global settings, with `overrides` from the policy.
    pub fn resolve(cfg: &PolicyConfig, global_max_payload: usize, overrides: AgentLimits) -> Self {
        let global_max_payload = global_max_payload as u64;
        Self {
            per_second: overrides.messages_per_second.unwrap_or(cfg.sends_per_second),
            burst: overrides.burst.unwrap_or(cfg.send_burst),
            bytes_per_second: overrides.bytes_per_second.unwrap_or(cfg.send_bytes_per_second),
            in_flight: overrides.max_in_flight.unwrap_or(cfg.sends_in_flight),
            max_payload: overrides
                .max_payload_bytes
                .map_or(global_max_payload, |max| max.min(global_max_payload)),
        }
    }
}

/// The send buckets of one agent.
#[derive(Debug, Clone, Copy)]
struct SendBuckets {
    sends: Bucket,
    bytes: Bucket,
}

/// Who refused a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    /// This instance holds `LIMIT_SESSIONS`.
    InstanceFull {
        /// The cap.
        max: u32,
    },
    /// The agent opened too many sessions lately.
    OpeningTooOften {
        /// When it may try again.
        retry_after: Duration,
    },
}

impl SessionRefusal {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::InstanceFull { .. } => "sessions",
            Self::OpeningTooOften { .. } => "session_opens",
        }
    }

    /// What the agent is told.
    pub fn describe(self) -> String {
        match self {
            Self::InstanceFull { max } => format!(
                "this server instance holds its maximum of {max} sessions (LIMIT_SESSIONS); connect to another instance"
            ),
            Self::OpeningTooOften { retry_after } => format!(
                "this agent opened too many sessions lately (LIMIT_SESSION_OPENS_PER_MINUTE); retry in {} s",
                retry_after.as_secs().max(1)
            ),
        }
    }
}

/// The limiters of one server instance.
#[derive(Debug, Default)]
pub struct Limits {
    sends: Mutex<HashMap<String, SendBuckets>>,
    opens: Mutex<HashMap<String, Bucket>>,
    addresses: Mutex<HashMap<IpAddr, Bucket>>,
}

impl Limits {
    /// Takes one send of `payload_bytes` from `agent_id`'s buckets, or says which limit it is over
    /// (taking nothing then).
    pub fn take_send(&self, agent_id: &str, limits: &SendLimits, payload_bytes: usize) -> Result<(), LimitExceeded> {
        if payload_bytes as u64 > limits.max_payload {
            return Err(LimitExceeded::PayloadSize {
                size: payload_bytes,
                max: limits.max_payload,
            });
        }
        if limits.per_second == 0 && limits.bytes_per_second == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let (send_rate, send_capacity) = (f64::from(limits.per_second), f64::from(limits.burst));
        let byte_rate = limits.bytes_per_second as f64;
        let byte_capacity = byte_rate.max(limits.max_payload as f64);
        let mut all = self.sends.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let buckets = all.entry(agent_id.to_owned()).or_insert_with(|| SendBuckets {
            sends: Bucket::full(send_capacity, now),
            bytes: Bucket::full(byte_capacity, now),
        });
        if limits.per_second > 0 {
            buckets.sends.refill(now, send_rate, send_capacity);
            let wait = buckets.sends.wait_for(send_rate, 1.0);
            if !wait.is_zero() {
                return Err(LimitExceeded::SendRate {
                    per_second: limits.per_second,
                    retry_after: wait,
                });
            }
        }
        let size = payload_bytes as f64;
        if limits.bytes_per_second > 0 {
            buckets.bytes.refill(now, byte_rate, byte_capacity);
            let wait = buckets.bytes.wait_for(byte_rate, size);
            if !wait.is_zero() {
                return Err(LimitExceeded::ByteRate {
                    per_second: limits.bytes_per_second,
                    retry_after: wait,
                });
            }
            buckets.bytes.tokens -= size;
        }
        if limits.per_second > 0 {
            buckets.sends.tokens -= 1.0;
        }
        Ok(())
    }

    /// Admits a new session of `agent_id` (already authenticated), given the sessions this
    /// instance holds and whether the agent already has one here (a replacement is always let in
    /// under the instance cap: the old one goes).
    pub fn open_session(
        &self,
        cfg: &PolicyConfig,
        agent_id: &str,
        sessions_here: usize,
        replaces: bool,
    ) -> Result<(), SessionRefusal> {
        if cfg.sessions > 0 && !replaces && sessions_here >= cfg.sessions as usize {
            return Err(SessionRefusal::InstanceFull { max: cfg.sessions });
        }
        if cfg.session_opens_per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(cfg.session_opens_per_minute) / 60.0;
        let capacity = f64::from(cfg.session_open_burst);
        let mut opens = self.opens.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        take_one(&mut opens, agent_id.to_owned(), rate, capacity, Instant::now())
            .map_err(|retry_after| SessionRefusal::OpeningTooOften { retry_after })
    }

    /// Takes one Socket.IO connection attempt from `address`; `Err` = when it may try again.
    pub fn socket_connect(&self, cfg: &PolicyConfig, address: IpAddr) -> Result<(), Duration> {
        if cfg.socket_connects_per_minute == 0 {
            return Ok(());
        }
        let rate = f64::from(cfg.socket_connects_per_minute) / 60.0;
        let capacity = f64::from(cfg.socket_connects_per_minute);
        let now = Instant::now();
        let mut addresses = self.addresses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if addresses.len() >= MAX_TRACKED_ADDRESSES && !addresses.contains_key(&address) {
            // Forget addresses whose bucket has refilled: they are as good as new.
            addresses.retain(|_, bucket| {
                bucket.refill(now, rate, capacity);
                bucket.tokens < capacity
            });
        }
        take_one(&mut addresses, address, rate, capacity, now)
    }
}

/// Takes one token from `key`'s bucket (a new key starts full); `Err` = how long until one is there.
fn take_one<K: std::hash::Hash + Eq>(
    buckets: &mut HashMap<K, Bucket>,
    key: K,
    rate: f64,
    capacity: f64,
    now: Instant,
) -> Result<(), Duration> {
    let bucket = buckets.entry(key).or_insert_with(|| Bucket::full(capacity, now));
    bucket.refill(now, rate, capacity);
    let wait = bucket.wait_for(rate, 1.0);
    if !wait.is_zero() {
        return Err(wait);
    }
    bucket.tokens -= 1.0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_second: u32, burst: u32, bytes_per_second: u64) -> SendLimits {
        SendLimits {
            per_second,
            burst,
            bytes_per_second,
            in_flight: 8,
            max_payload: 1000,
        }
    }

    #[test]
    fn a_burst_passes_then_sends_are_refused_with_when_to_retry() {
        let all = Limits::default();
        let l = limits(10, 5, 0);
        for _ in 0..5 {
            all.take_send("a", &l, 10).unwrap();
        }
        let refused = all.take_send("a", &l, 10).unwrap_err();
        assert_eq!(refused.label(), "sends_per_second");
        let wait = refused.retry_after().unwrap();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100), "{wait:?}");
        // Another agent has its own bucket.
        all.take_send("b", &l, 10).unwrap();
    }

    #[test]
    fn bytes_are_limited_apart_and_a_refusal_takes_nothing() {
        let all = Limits::default();
        let l = limits(0, 1, 1000);
        all.take_send("a", &l, 600).unwrap();
        let refused = all.take_send("a", &l, 600).unwrap_err();
        assert_eq!(refused.label(), "bytes_per_second");
        // The refused 600 bytes were not taken: 400 still fit.
        all.take_send("a", &l, 400).unwrap();
    }

    #[test]
    fn a_payload_over_the_size_limit_is_refused_for_good() {
        let refused = Limits::default().take_send("a", &limits(0, 1, 0), 1001).unwrap_err();
        assert_eq!(refused.retry_after(), None);
        assert!(refused.describe().contains("1001 bytes"));
    }

    #[test]
    fn policy_overrides_replace_global_values_and_cannot_raise_the_payload_cap() {
        let cfg = PolicyConfig::default();
        let resolved = SendLimits::resolve(
            &cfg,
            1000,
            AgentLimits {
                messages_per_second: Some(3),
                max_payload_bytes: Some(5000),
                ..AgentLimits::default()
            },
        );
        assert_eq!((resolved.per_second, resolved.burst), (3, cfg.send_burst));
        assert_eq!(resolved.max_payload, 1000);
    }

    #[test]
    fn session_opens_are_limited_per_agent_and_the_instance_cap_spares_replacements() {
        let cfg = PolicyConfig {
            session_open_burst: 2,
            sessions: 1,
            ..PolicyConfig::default()
        };
        let all = Limits::default();
        assert_eq!(
            all.open_session(&cfg, "a", 1, false),
            Err(SessionRefusal::InstanceFull { max: 1 })
        );
        all.open_session(&cfg, "a", 1, true).unwrap();
        all.open_session(&cfg, "a", 1, true).unwrap();
        let refused = all.open_session(&cfg, "a", 1, true).unwrap_err();
        assert_eq!(refused.label(), "session_opens");
        all.open_session(&cfg, "b", 1, true).unwrap();
    }

    #[test]
    fn socket_connects_are_limited_per_address() {
        let cfg = PolicyConfig {
            socket_connects_per_minute: 2,
            ..PolicyConfig::default()
        };
        let all = Limits::default();
        let (one, two) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        all.socket_connect(&cfg, one).unwrap();
        all.socket_connect(&cfg, one).unwrap();
        assert!(all.socket_connect(&cfg, one).is_err());
        all.socket_connect(&cfg, two).unwrap();
    }
}

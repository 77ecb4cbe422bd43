//! Backpressure from a recipient that does not keep up, so that its queue, and every message's
//! latency, does not grow without bound while its senders run:
//! - **hold** (`MESSAGE_QUEUE_HOLD_MAX_MS`, on by default): while a connected recipient's queue
//!   has messages waiting beyond those its session already took (RabbitMQ's "ready" count is at
//!   least `MESSAGE_QUEUE_HOLD_DEPTH`), the answer to a send to it (already queued) waits until the
//!   queue is back under that depth, for at most `MESSAGE_QUEUE_HOLD_MAX_MS`. A sender that waits
//!   for its answers then sends as fast as the recipient receives. A recipient that is not
//!   connected holds nobody (its messages wait for it, as in the original);
//! - **cap** (`MESSAGE_QUEUE_MAX_DEPTH`, off by default): a recipient whose queue holds that many
//!   messages makes its senders wait (429 + `Retry-After`), nothing queued.
//!
//! The depth is RabbitMQ's count of ready messages (unacked, prefetched ones are not counted), read
//! by a passive declare at most every [`FRESH_FOR`] per recipient: the cap is approximate by that
//! much, and by the sends published meanwhile.

use crate::Core;
use crate::broker::QueueCounts;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read depth is reused before the broker is asked again.
const FRESH_FOR: Duration = Duration::from_millis(500);
/// How long a read depth is reused while sends are held (they wait for it to fall), at most.
const HOLD_FRESH_FOR: Duration = Duration::from_millis(20);
/// The first pause of a hold, doubled up to [`HOLD_FRESH_FOR`]: a message published a moment ago
/// is often still "ready" only until the recipient's consumer takes it (the embedded engine shows
/// it at once), which must not cost a full pause.
const HOLD_FIRST_PAUSE: Duration = Duration::from_millis(1);
/// What a refused sender is told to wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Recent queue counts per recipient (bounded by the directory: recipients are validated first).
#[derive(Default)]
pub struct BacklogCap {
    counts: Mutex<HashMap<String, (Instant, QueueCounts)>>,
}

impl BacklogCap {
    /// The recipient's queue depth if it is at or over the cap; `None` when under it, when the cap
    /// is off, or when the depth cannot be read (the publish then decides).
    pub(crate) async fn over(&self, core: &Core, recipient: &str) -> Option<u32> {
        let cap = core.cfg.message_queue_max_depth;
        if cap == 0 {
            return None;
        }
        let depth = self.counts(core, recipient, FRESH_FOR).await?.messages;
        (depth >= cap).then_some(depth)
    }

    /// Waits, at most `MESSAGE_QUEUE_HOLD_MAX_MS`, while `recipient` is consumed and its queue has
    /// at least `MESSAGE_QUEUE_HOLD_DEPTH` messages ready; returns how long it held the send
    /// (zero if it did not).
    pub(crate) async fn hold(&self, core: &Core, recipient: &str) -> Duration {
        let max = core.cfg.message_queue_hold_max();
        let started = Instant::now();
        if max.is_zero() {
            return Duration::ZERO;
        }
        let mut held = false;
        let mut pause = HOLD_FIRST_PAUSE;
        loop {
            let Some(counts) = self.counts(core, recipient, pause).await else {
                break;
            };
            if counts.consumers == 0 || counts.messages < core.cfg.message_queue_hold_depth {
                break;
            }
            let left = max.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            held = true;
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(HOLD_FRESH_FOR);
        }
        if held { started.elapsed() } else { Duration::ZERO }
    }

    /// `recipient`'s queue counts, read from the broker unless a read younger than `fresh_for` is
    /// at hand; `None` if they cannot be read.
    async fn counts(&self, core: &Core, recipient: &str, fresh_for: Duration) -> Option<QueueCounts> {
        let cached = self
            .lock()
            .get(recipient)
            .filter(|(at, _)| at.elapsed() < fresh_for)
            .map(|(_, counts)| *counts);
        if cached.is_some() {
            return cached;
        }
        let counts = core.broker.counts(recipient).await.ok()?;
        self.lock().insert(recipient.to_owned(), (Instant::now(), counts));
        Some(counts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, QueueCounts)>> {
        self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

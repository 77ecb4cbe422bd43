//! The optional per-recipient cap on queued messages (`MESSAGE_QUEUE_MAX_DEPTH`): a recipient
//! that does not keep up makes its senders wait (429 + `Retry-After`) instead of letting its queue,
//! and every message's latency, grow without bound.
//!
//! The depth is RabbitMQ's count of ready messages (unacked, prefetched ones are not counted), read
//! by a passive declare at most every [`FRESH_FOR`] per recipient: the cap is approximate by that
//! much, and by the sends published meanwhile.

use crate::Core;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read depth is reused before the broker is asked again.
const FRESH_FOR: Duration = Duration::from_millis(500);
/// What a refused sender is told to wait.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Recent queue depths per recipient (bounded by the directory: recipients are validated first).
#[derive(Default)]
pub struct BacklogCap {
    depths: Mutex<HashMap<String, (Instant, u32)>>,
}

impl BacklogCap {
    /// The recipient's queue depth if it is at or over the cap; `None` when under it, when the cap
    /// is off, or when the depth cannot be read (the publish then decides).
    pub(crate) async fn over(&self, core: &Core, recipient: &str) -> Option<u32> {
        let cap = core.cfg.message_queue_max_depth;
        if cap == 0 {
            return None;
        }
        let cached = self
            .lock()
            .get(recipient)
            .filter(|(at, _)| at.elapsed() < FRESH_FOR)
            .map(|(_, depth)| *depth);
        let depth = match cached {
            Some(depth) => depth,
            None => {
                let depth = core.broker.counts(recipient).await.ok()?.messages;
                self.lock().insert(recipient.to_owned(), (Instant::now(), depth));
                depth
            }
        };
        (depth >= cap).then_some(depth)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, u32)>> {
        self.depths.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

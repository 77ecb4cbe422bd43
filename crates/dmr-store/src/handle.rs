//! Handles for callers that split an operation from its wait: [`Store::start_publish`] (queue the
//! message now, await its fsync later) and [`Acker`] (settle a consumer's deliveries from another
//! task while the consumer waits for the next message).

use crate::writer::{DeadLetterKind, Op, Reply};
use crate::{Consumer, Headers, Inner, Store, StoreError, lock};
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;

impl Store {
    /// Like [`Store::publish`], but the message is handed to the writer before this returns, so
    /// calls made in order are stored in that order even when their futures are awaited
    /// elsewhere (concurrently); the future resolves once the message is on disk (fsynced).
    pub fn start_publish(
        &self,
        queue: &str,
        body: Bytes,
        headers: Headers,
    ) -> Result<impl Future<Output = Result<(), StoreError>> + use<>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner().send(Op::Publish {
            queue: queue.to_string(),
            body,
            headers,
            reply: Reply::Async(tx),
        })?;
        Ok(async move { rx.await.map_err(|_| StoreError::Closed)?.map(|_| ()) })
    }
}

impl Store {
    /// Moves the ready messages `seqs` of `queue` to the end of queue `to` (headers kept, a new seq
    /// and enqueue time there), or removes them when `to` is `None`, in one durable transaction:
    /// after a crash each message is in exactly one of the two queues. Returns how many moved;
    /// seqs that are not ready in `queue` (unknown, already gone, or held unacknowledged by a
    /// consumer) are skipped. [`StoreError::QueueNotFound`] if either queue is not declared.
    ///
    /// The messages leave the ready list at once (no consumer can take them meanwhile); if the
    /// commit fails they are put back.
    pub async fn move_ready(&self, queue: &str, seqs: &[u64], to: Option<&str>) -> Result<u64, StoreError> {
        let entries: Vec<_> = {
            let mut st = lock(&self.inner().state);
            if let Some(target) = to
                && !st.queues.contains_key(target)
            {
                return Err(StoreError::QueueNotFound(target.to_string()));
            }
            let qs = st
                .queues
                .get_mut(queue)
                .ok_or_else(|| StoreError::QueueNotFound(queue.to_string()))?;
            seqs.iter()
                .filter_map(|seq| qs.ready.remove(seq).map(|meta| (*seq, meta)))
                .collect()
        };
        if entries.is_empty() {
            return Ok(0);
        }
        self.inner()
            .call(|reply| Op::Move {
                queue: queue.to_string(),
                entries,
                to: to.map(str::to_string),
                reply,
            })
            .await
    }
}

/// Settles the deliveries of one [`Consumer`] (cheap to clone). Settling after the consumer is
/// gone fails with [`StoreError::UnknownDelivery`]: its messages went back to the queue.
#[derive(Clone)]
pub struct Acker {
    pub(crate) inner: Arc<Inner>,
    pub(crate) queue: String,
    pub(crate) id: u64,
    pub(crate) incarnation: u64,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// A handle that settles this consumer's deliveries.
    pub fn acker(&self) -> Acker {
        Acker {
            inner: self.inner.clone(),
            queue: self.queue.clone(),
            id: self.id,
            incarnation: self.incarnation,
        }
    }
}

impl Acker {
    fn check_held(&self, seq: u64) -> Result<(), StoreError> {
        let st = lock(&self.inner.state);
        let held = st
            .queues
            .get(&self.queue)
            .filter(|q| q.incarnation == self.incarnation)
            .and_then(|q| q.consumers.get(&self.id))
            .is_some_and(|h| h.contains_key(&seq));
        if held {
            Ok(())
        } else {
            Err(StoreError::UnknownDelivery {
                queue: self.queue.clone(),
                seq,
            })
        }
    }

    /// See [`Consumer::ack`].
    pub async fn ack(&self, seq: u64) -> Result<(), StoreError> {
        self.check_held(seq)?;
        self.inner
            .call(|reply| Op::Ack {
                queue: self.queue.clone(),
                seq,
                reply,
            })
            .await
            .map(|_| ())
    }

    /// See [`Consumer::reject`].
    pub async fn reject(&self, seq: u64, reason: &str) -> Result<(), StoreError> {
        self.dead_letter_as(seq, DeadLetterKind::Rejected(reason.to_string()))
            .await
    }

    /// See [`Consumer::dead_letter`].
    pub async fn dead_letter(&self, seq: u64, headers: Headers) -> Result<(), StoreError> {
        self.dead_letter_as(seq, DeadLetterKind::Caller(headers)).await
    }

    async fn dead_letter_as(&self, seq: u64, kind: DeadLetterKind) -> Result<(), StoreError> {
        self.check_held(seq)?;
        self.inner
            .call(|reply| Op::DeadLetter {
                queue: self.queue.clone(),
                seq,
                kind,
                reply,
            })
            .await
            .map(|_| ())
    }
}

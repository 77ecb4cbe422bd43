//! The writer thread: drains the channel of operations and applies each batch in one write
//! transaction and one commit (group commit). See the crate docs for the fsync policy.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, Table, WriteTransaction};
use tokio::sync::oneshot;

use crate::record::{self, Meta};
use crate::{
    HeaderValue, Headers, Inner, MESSAGES, META, NEXT_SEQ, QUEUES, QueueArgs, StoreError, X_DEATH_COUNT,
    X_DEATH_DETAIL, X_DEATH_QUEUE, X_DEATH_REASON, X_DEATH_TIME, lock, now_ms,
};

/// At most this many operations go into one transaction.
const MAX_BATCH: usize = 4096;

/// Where the result of an operation goes.
pub(crate) enum Reply {
    /// A caller blocked on a std channel (sync API).
    Sync(mpsc::SyncSender<Result<u64, StoreError>>),
    /// A caller awaiting a oneshot (async API).
    Async(oneshot::Sender<Result<u64, StoreError>>),
}

impl Reply {
    fn send(self, r: Result<u64, StoreError>) {
        match self {
            Reply::Sync(tx) => {
                let _ = tx.send(r);
            }
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// How a message is dead-lettered.
pub(crate) enum DeadLetterKind {
    /// [`crate::Consumer::reject`] with its reason.
    Rejected(String),
    /// [`crate::Consumer::dead_letter`] with the caller's headers.
    Caller(Headers),
}

/// An operation for the writer thread.
pub(crate) enum Op {
    Declare {
        queue: String,
        args: QueueArgs,
        reply: Reply,
    },
    Delete {
        queue: String,
        reply: Reply,
    },
    Publish {
        queue: String,
        body: Bytes,
        headers: Headers,
        reply: Reply,
    },
    Ack {
        queue: String,
        seq: u64,
        reply: Reply,
    },
    DeadLetter {
        queue: String,
        seq: u64,
        kind: DeadLetterKind,
        reply: Reply,
    },
    /// Ready messages already taken off the ready list by [`crate::Store::move_ready`]: removed, and
    /// appended to `to` (headers kept) when it is `Some`, in one durable commit.
    Move {
        queue: String,
        entries: Vec<(u64, Meta)>,
        to: Option<String>,
        reply: Reply,
    },
    /// Expired messages already taken off the ready list.
    Expire {
        queue: String,
        entries: Vec<(u64, Meta)>,
    },
    Shutdown,
}

/// What a committed batch changes in memory, applied in order after the commit.
enum Effect {
    Declared(String, QueueArgs),
    Deleted(String),
    Enqueued(String, u64, Meta),
    Removed(String, u64),
}

pub(crate) struct Writer {
    inner: Arc<Inner>,
    db: Arc<Database>,
    next_seq: u64,
    sweep_interval: Duration,
}

/// One batch being applied.
struct Batch {
    /// Queues declared (`Some`) or deleted (`None`) earlier in this batch.
    overlay: HashMap<String, Option<QueueArgs>>,
    effects: Vec<Effect>,
    /// Ready entries taken out of memory before the commit: put back if it fails.
    undo: Vec<(String, u64, Meta)>,
    replies: Vec<(Reply, Result<u64, StoreError>)>,
    durable: bool,
    /// Per max-length queue, the seqs published in this batch still counted as ready.
    pending: HashMap<String, VecDeque<u64>>,
}

struct Tables<'t> {
    queues: Table<'t, &'static str, &'static [u8]>,
    messages: Table<'t, (&'static str, u64), &'static [u8]>,
}

fn death_headers(headers: &mut Headers, reason: &str, queue: &str, now: u64) {
    let count = match headers.get(X_DEATH_COUNT) {
        Some(HeaderValue::Int(n)) => n.saturating_add(1),
        _ => 1,
    };
    headers.insert(X_DEATH_REASON.into(), reason.into());
    headers.insert(X_DEATH_QUEUE.into(), queue.into());
    headers.insert(
        X_DEATH_TIME.into(),
        HeaderValue::Int(i64::try_from(now).unwrap_or(i64::MAX)),
    );
    headers.insert(X_DEATH_COUNT.into(), HeaderValue::Int(count));
}

impl Writer {
    pub(crate) fn new(inner: Arc<Inner>, db: Arc<Database>, next_seq: u64, sweep_interval: Duration) -> Self {
        Writer {
            inner,
            db,
            next_seq,
            sweep_interval,
        }
    }

    pub(crate) fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut next_sweep = Instant::now() + self.sweep_interval;
        // A non-durable commit has been made since the last durable one.
        let mut unsynced = false;
        loop {
            let mut ops = Vec::new();
            let wait = next_sweep.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(op) => ops.push(op),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            let shutdown = ops.iter().any(|op| matches!(op, Op::Shutdown));
            let tick = Instant::now() >= next_sweep;
            if tick {
                next_sweep = Instant::now() + self.sweep_interval;
                ops.extend(self.sweep());
            }
            let flush = shutdown || (tick && unsynced);
            if ops.iter().all(|op| matches!(op, Op::Shutdown)) && !flush {
                continue;
            }
            let durable = self.apply(ops, flush);
            unsynced = !durable;
            if shutdown {
                break;
            }
        }
    }

    /// Takes the expired ready messages of every queue with a TTL.
    fn sweep(&self) -> Vec<Op> {
        let now = now_ms();
        let mut st = lock(&self.inner.state);
        let mut ops = Vec::new();
        for (name, qs) in st.queues.iter_mut() {
            let entries = qs.take_expired(now);
            if !entries.is_empty() {
                ops.push(Op::Expire {
                    queue: name.clone(),
                    entries,
                });
            }
        }
        ops
    }

    /// Applies a batch in one transaction; returns whether its commit was durable.
    fn apply(&mut self, ops: Vec<Op>, force_durable: bool) -> bool {
        let mut b = Batch {
            overlay: HashMap::new(),
            effects: Vec::new(),
            undo: Vec::new(),
            replies: Vec::new(),
            durable: force_durable,
            pending: HashMap::new(),
        };
        let result = self.transact(ops, &mut b);
        if let Err(e) = &result {
            tracing::error!(error = %e, "queue store commit failed");
            let mut st = lock(&self.inner.state);
            for (queue, seq, meta) in b.undo.drain(..) {
                if let Some(qs) = st.queues.get_mut(&queue) {
                    qs.ready.insert(seq, meta);
                    qs.wake();
                }
            }
            drop(st);
            for (reply, r) in b.replies {
                reply.send(r.and(Err(e.clone())));
            }
            return false;
        }
        {
            let mut st = lock(&self.inner.state);
            for effect in b.effects {
                match effect {
                    Effect::Declared(q, args) => st.declare(q, args),
                    Effect::Deleted(q) => {
                        if let Some(qs) = st.queues.remove(&q) {
                            qs.wake();
                        }
                    }
                    Effect::Enqueued(q, seq, meta) => {
                        if let Some(qs) = st.queues.get_mut(&q) {
                            qs.ready.insert(seq, meta);
                            qs.wake();
                        }
                    }
                    Effect::Removed(q, seq) => {
                        if let Some(qs) = st.queues.get_mut(&q) {
                            qs.remove(seq);
                            qs.wake();
                        }
                    }
                }
            }
        }
        for (reply, r) in b.replies {
            reply.send(r);
        }
        b.durable
    }

    fn transact(&mut self, ops: Vec<Op>, b: &mut Batch) -> Result<(), StoreError> {
        let path = self.inner.db_path.clone();
        let e = |err: redb::Error| StoreError::db(&path, err);
        let mut txn: WriteTransaction = self.db.begin_write().map_err(|x| e(x.into()))?;
        {
            let mut t = Tables {
                queues: txn.open_table(QUEUES).map_err(|x| e(x.into()))?,
                messages: txn.open_table(MESSAGES).map_err(|x| e(x.into()))?,
            };
            self.inner.operations.fetch_add(ops.len() as u64, Ordering::Relaxed);
            for op in ops {
                self.op(op, &mut t, b)?;
            }
            let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
            meta.insert(NEXT_SEQ, self.next_seq).map_err(|x| e(x.into()))?;
        }
        txn.set_durability(if b.durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|x| e(x.into()))?;
        txn.commit().map_err(|x| e(x.into()))?;
        self.inner.commits.fetch_add(1, Ordering::Relaxed);
        if b.durable {
            self.inner.durable_commits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, b: &Batch, queue: &str) -> Option<QueueArgs> {
        match b.overlay.get(queue) {
            Some(o) => o.clone(),
            None => lock(&self.inner.state).queues.get(queue).map(|q| q.args.clone()),
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Applies one operation inside the transaction. Errors of the operation alone go to its
    /// reply; a database error is returned and fails the whole batch.
    fn op(&mut self, op: Op, t: &mut Tables<'_>, b: &mut Batch) -> Result<(), StoreError> {
        let path = self.inner.db_path.clone();
        let e = |err: redb::StorageError| StoreError::db(&path, err);
        match op {
            Op::Shutdown => {}
            Op::Declare { queue, args, reply } => {
                let r = match self.lookup(b, &queue) {
                    Some(existing) if existing == args => Ok(0),
                    Some(existing) => Err(StoreError::ArgsDiffer {
                        queue,
                        existing,
                        requested: args,
                    }),
                    None => {
                        t.queues
                            .insert(queue.as_str(), record::encode_args(&args, &path)?.as_slice())
                            .map_err(e)?;
                        b.overlay.insert(queue.clone(), Some(args.clone()));
                        b.effects.push(Effect::Declared(queue, args));
                        b.durable = true;
                        Ok(0)
                    }
                };
                b.replies.push((reply, r));
            }
            Op::Delete { queue, reply } => {
                let mut dropped = 0u64;
                if self.lookup(b, &queue).is_some() {
                    t.messages
                        .retain_in((queue.as_str(), 0u64)..=(queue.as_str(), u64::MAX), |_, _| {
                            dropped += 1;
                            false
                        })
                        .map_err(e)?;
                    t.queues.remove(queue.as_str()).map_err(e)?;
                    b.overlay.insert(queue.clone(), None);
                    b.pending.remove(&queue);
                    b.effects.push(Effect::Deleted(queue));
                    b.durable = true;
                }
                b.replies.push((reply, Ok(dropped)));
            }
            Op::Publish {
                queue,
                body,
                headers,
                reply,
            } => {
                let Some(args) = self.lookup(b, &queue) else {
                    b.replies.push((reply, Err(StoreError::QueueNotFound(queue))));
                    return Ok(());
                };
                let seq = self.take_seq();
                let meta = Meta {
                    enqueued_at_ms: now_ms(),
                    redelivered: false,
                };
                let rec = record::encode(meta, &headers, &body, &path)?;
                t.messages.insert((queue.as_str(), seq), rec.as_slice()).map_err(e)?;
                b.effects.push(Effect::Enqueued(queue.clone(), seq, meta));
                b.durable = true;
                if let Some(max) = args.max_length {
                    self.enforce_max(&queue, seq, max, t, b)?;
                }
                b.replies.push((reply, Ok(0)));
            }
            Op::Ack { queue, seq, reply } => {
                t.messages.remove((queue.as_str(), seq)).map_err(e)?;
                b.effects.push(Effect::Removed(queue, seq));
                b.replies.push((reply, Ok(0)));
            }
            Op::DeadLetter {
                queue,
                seq,
                kind,
                reply,
            } => {
                let r = self.dead_letter(&queue, seq, kind, t, b)?;
                b.replies.push((reply, r));
            }
            Op::Move {
                queue,
                entries,
                to,
                reply,
            } => {
                let r = self.move_ready(&queue, entries, to.as_deref(), t, b)?;
                b.replies.push((reply, r));
            }
            Op::Expire { queue, entries } => {
                let Some(args) = self.lookup(b, &queue) else {
                    return Ok(());
                };
                let target = args.dead_letter_to.filter(|t| self.lookup(b, t).is_some());
                let now = now_ms();
                for (seq, meta) in entries {
                    b.undo.push((queue.clone(), seq, meta));
                    let Some(raw) = t.messages.remove((queue.as_str(), seq)).map_err(e)? else {
                        continue;
                    };
                    let (_, mut headers, body) = record::decode(raw.value(), &path)?;
                    drop(raw);
                    match &target {
                        Some(target) => {
                            death_headers(&mut headers, "expired", &queue, now);
                            self.insert_moved(target, headers, &body, now, t, b)?;
                        }
                        None => tracing::debug!(queue, seq, "expired message dropped"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes `entries` (taken off `queue`'s ready list by the caller) and appends them to `to`
    /// with their headers; returns how many were moved (or removed). A target that no longer
    /// exists puts them back and fails the operation alone.
    fn move_ready(
        &mut self,
        queue: &str,
        entries: Vec<(u64, Meta)>,
        to: Option<&str>,
        t: &mut Tables<'_>,
        b: &mut Batch,
    ) -> Result<Result<u64, StoreError>, StoreError> {
        let path = self.inner.db_path.clone();
        if let Some(target) = to
            && self.lookup(b, target).is_none()
        {
            let mut st = lock(&self.inner.state);
            if let Some(qs) = st.queues.get_mut(queue) {
                qs.ready.extend(entries);
                qs.wake();
            }
            return Ok(Err(StoreError::QueueNotFound(target.to_string())));
        }
        let now = now_ms();
        let mut moved = 0u64;
        for (seq, meta) in entries {
            b.undo.push((queue.to_string(), seq, meta));
            let Some(raw) = t.messages.remove((queue, seq)).map_err(|x| StoreError::db(&path, x))? else {
                continue;
            };
            let (_, headers, body) = record::decode(raw.value(), &path)?;
            drop(raw);
            if let Some(target) = to {
                self.insert_moved(target, headers, &body, now, t, b)?;
            }
            moved += 1;
        }
        b.durable = true;
        Ok(Ok(moved))
    }

    /// Inserts a message moved from another queue (dead-lettered or expired) into `target`.
    fn insert_moved(
        &mut self,
        target: &str,
        headers: Headers,
        body: &[u8],
        now: u64,
        t: &mut Tables<'_>,
        b: &mut Batch,
    ) -> Result<(), StoreError> {
        let path = self.inner.db_path.clone();
        let seq = self.take_seq();
        let meta = Meta {
            enqueued_at_ms: now,
            redelivered: false,
        };
        let rec = record::encode(meta, &headers, body, &path)?;
        t.messages
            .insert((target, seq), rec.as_slice())
            .map_err(|x| StoreError::db(&path, x))?;
        b.effects.push(Effect::Enqueued(target.to_string(), seq, meta));
        if let Some(max) = self.lookup(b, target).and_then(|a| a.max_length) {
            self.enforce_max(target, seq, max, t, b)?;
        }
        Ok(())
    }

    fn dead_letter(
        &mut self,
        queue: &str,
        seq: u64,
        kind: DeadLetterKind,
        t: &mut Tables<'_>,
        b: &mut Batch,
    ) -> Result<Result<u64, StoreError>, StoreError> {
        let path = self.inner.db_path.clone();
        let Some(args) = self.lookup(b, queue) else {
            return Ok(Err(StoreError::QueueNotFound(queue.to_string())));
        };
        if let Some(target) = &args.dead_letter_to
            && self.lookup(b, target).is_none()
        {
            return Ok(Err(StoreError::QueueNotFound(target.clone())));
        }
        let Some(raw) = t.messages.remove((queue, seq)).map_err(|x| StoreError::db(&path, x))? else {
            return Ok(Err(StoreError::UnknownDelivery {
                queue: queue.to_string(),
                seq,
            }));
        };
        let (_, mut headers, body) = record::decode(raw.value(), &path)?;
        drop(raw);
        b.effects.push(Effect::Removed(queue.to_string(), seq));
        b.durable = true;
        let now = now_ms();
        if let Some(target) = &args.dead_letter_to {
            match kind {
                DeadLetterKind::Rejected(reason) => {
                    death_headers(&mut headers, "rejected", queue, now);
                    headers.insert(X_DEATH_DETAIL.into(), reason.into());
                }
                DeadLetterKind::Caller(extra) => headers.extend(extra),
            }
            self.insert_moved(target, headers, &body, now, t, b)?;
        }
        Ok(Ok(0))
    }

    /// Drops the oldest ready messages of a max-length queue beyond `max` (drop-head), counting
    /// the messages published earlier in this batch.
    fn enforce_max(
        &mut self,
        queue: &str,
        seq: u64,
        max: u32,
        t: &mut Tables<'_>,
        b: &mut Batch,
    ) -> Result<(), StoreError> {
        let path = self.inner.db_path.clone();
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        // A queue (re)declared in this batch has no committed ready messages of its own.
        let fresh = b.overlay.contains_key(queue);
        let pending = b.pending.entry(queue.to_string()).or_default();
        pending.push_back(seq);
        loop {
            let mut st = lock(&self.inner.state);
            let committed = if fresh { None } else { st.queues.get_mut(queue) };
            let ready = committed.as_ref().map_or(0, |q| q.ready.len());
            if ready + pending.len() <= max {
                return Ok(());
            }
            let victim = match committed.and_then(|q| q.ready.pop_first()) {
                Some((s, meta)) => {
                    b.undo.push((queue.to_string(), s, meta));
                    s
                }
                None => match pending.pop_front() {
                    Some(s) => {
                        b.effects.push(Effect::Removed(queue.to_string(), s));
                        s
                    }
                    None => return Ok(()),
                },
            };
            drop(st);
            t.messages
                .remove((queue, victim))
                .map_err(|x| StoreError::db(&path, x))?;
        }
    }
}

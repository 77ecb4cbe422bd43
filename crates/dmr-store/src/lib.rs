//! Durable queues on disk: a small, pure queue store for a single-node message relay.
//!
//! A [`Store`] holds named queues in one [redb] database file. Each queue is a FIFO of messages
//! (body + [`Headers`]) with at-least-once delivery to [`Consumer`]s (prefetch, ack, reject,
//! dead-letter, redelivery of unacknowledged messages when a consumer goes away), per-queue
//! message TTL with dead-lettering, and a max-length with drop-head. It knows nothing of what
//! the messages mean.
//!
//! # Why redb
//!
//! - one file, no server, pure Rust, maintained;
//! - ACID transactions over copy-on-write B-trees: a crash leaves the file at the last durable
//!   commit, never half-way through one (so a move to a dead-letter queue is never lost and
//!   never doubled);
//! - durability chosen per commit: [`redb::Durability::Immediate`] fsyncs before the commit
//!   returns, [`redb::Durability::None`] does not (and becomes durable with the next immediate
//!   commit) — used where losing the commit only causes a redelivery;
//! - it refuses to open a database another process has open (on top of that the store takes
//!   its own lock file, to name the holder's pid in [`StoreError::Locked`]).
//!
//! # On-disk layout
//!
//! The data directory holds:
//!
//! - `LOCK`: an exclusive advisory lock (`flock`) for the life of the [`Store`], containing the
//!   holder's pid (only used to word [`StoreError::Locked`]);
//! - `queues.redb`: the redb database, with three tables:
//!
//! | table      | key                         | value |
//! |------------|-----------------------------|-------|
//! | `queues`   | queue name (`&str`)         | the queue's [`QueueArgs`] as JSON |
//! | `messages` | `(queue name, seq)` (`(&str, u64)`) | a message record: `[version: u8 = 1][enqueued_at: u64 LE, unix ms][flags: u8, bit 0 = redelivered][headers_len: u32 LE][headers: JSON of Headers][body]` |
//! | `meta`     | `"next_seq"` (`&str`)       | the next sequence number (`u64`) |
//!
//! Sequence numbers are allocated from one store-wide counter, so they increase within each
//! queue in publish order; a queue's messages are the `messages` keys with its name, in seq
//! order. A dead-lettered or expired message moved to another queue gets a new seq there (and a
//! new `enqueued_at`: the target queue's TTL counts from the move).
//!
//! # Memory
//!
//! Per queue, only an index is kept in memory: `seq → (enqueued_at, redelivered)` for ready
//! messages and for each consumer's unacknowledged ones. Bodies and headers are read from the
//! file when a message is delivered, peeked or listed, so a backlog does not sit in RAM
//! (about 50 bytes of index per message). Counts ([`Store::counts`]) come from this index: exact
//! and cheap.
//!
//! # Writes and the fsync policy
//!
//! All writes go through one dedicated writer thread that drains a channel of pending operations
//! and applies each batch in **one write transaction with one commit** (group commit): many
//! concurrent publishes share a single fsync. Operations are applied in the order they were
//! sent, so calls made in order by one task keep that order. Changes become visible in memory
//! (to consumers, counts, `peek`, `list`) only after their commit.
//!
//! The commit of a batch is [`Durability::Immediate`](redb::Durability::Immediate) (fsync) when
//! the batch holds a publish, a reject or dead-letter, a declare or a queue deletion; those calls
//! return `Ok` only after that fsync. A batch of only acks and TTL expiries commits with
//! [`Durability::None`](redb::Durability::None): losing it in a crash only means the acked
//! messages are delivered again (at-least-once) and the expired ones expire again. Such
//! non-durable commits are made durable by the next immediate commit, by the writer's periodic
//! tick (every `sweep_interval` when idle) and when the store closes.
//!
//! # TTL
//!
//! A ready message older than its queue's `ttl_ms` (from the time it entered that queue) is
//! moved to the queue's `dead_letter_to` with `x-death-*` headers (reason `expired`), or dropped
//! when the queue has none. Messages held unacknowledged by a consumer do not expire (as in
//! RabbitMQ); when returned they may. Expiry is checked by the writer thread at most every
//! [`StoreOptions::sweep_interval`] and whenever a consumer looks for its next message.
//!
//! # Restart
//!
//! Opening a directory rebuilds the index from the `messages` table. Every message whose
//! [`Store::publish`] returned `Ok` is there, in order, with its headers. Messages delivered but
//! not acknowledged before the stop are ready again; they are flagged `redelivered` only if they
//! were returned to the queue before the stop (the delivery itself is not written to disk).

mod error;
mod handle;
mod record;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

pub use error::StoreError;
pub use handle::Acker;
use record::Meta;
use writer::{Op, Reply};

/// Header `x-death-reason`: why a message was dead-lettered (`rejected` or `expired`).
pub const X_DEATH_REASON: &str = "x-death-reason";
/// Header `x-death-queue`: the queue the message was dead-lettered from.
pub const X_DEATH_QUEUE: &str = "x-death-queue";
/// Header `x-death-time`: when it was dead-lettered (unix milliseconds).
pub const X_DEATH_TIME: &str = "x-death-time";
/// Header `x-death-count`: how many times it has been dead-lettered (rejected or expired).
pub const X_DEATH_COUNT: &str = "x-death-count";
/// Header `x-death-detail`: the reason string given to [`Consumer::reject`].
pub const X_DEATH_DETAIL: &str = "x-death-detail";

const QUEUES: TableDefinition<&str, &[u8]> = TableDefinition::new("queues");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";

/// The name of the database file in the data directory.
pub const DB_FILE: &str = "queues.redb";
/// The name of the lock file in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// A header value: a string or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    /// An integer.
    Int(i64),
    /// A string.
    String(String),
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::String(s.to_string())
    }
}

impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::String(s)
    }
}

impl From<i64> for HeaderValue {
    fn from(i: i64) -> Self {
        HeaderValue::Int(i)
    }
}

/// A message's headers.
pub type Headers = BTreeMap<String, HeaderValue>;

/// Options of [`Store::open`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How often the writer thread looks for expired messages (and makes non-durable commits
    /// durable when otherwise idle). Default 1 s.
    pub sweep_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sweep_interval: Duration::from_secs(1),
        }
    }
}

/// The arguments of a queue, fixed at declaration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueArgs {
    /// Message TTL in milliseconds, counted from when the message entered the queue.
    pub ttl_ms: Option<u64>,
    /// Where rejected and expired messages go (a queue name); dropped when `None`.
    pub dead_letter_to: Option<String>,
    /// Maximum number of ready messages; publishing beyond it drops the oldest ready ones
    /// (drop-head). Unacknowledged messages do not count, as in RabbitMQ.
    pub max_length: Option<u32>,
}

/// A delivered (or peeked, or listed) message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Its sequence number: increasing in publish order within the queue; what
    /// [`Consumer::ack`] and friends take.
    pub seq: u64,
    /// The body.
    pub body: Bytes,
    /// The headers.
    pub headers: Headers,
    /// Whether it has been delivered before and returned to the queue.
    pub redelivered: bool,
    /// When it entered this queue.
    pub enqueued_at: SystemTime,
}

/// Counters of the writer thread, since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Operations applied (publish, ack, reject, dead-letter, declare, delete, expiry batch).
    pub operations: u64,
    /// Write transactions committed (each one batch of operations).
    pub commits: u64,
    /// Of which with `Durability::Immediate` (fsync).
    pub durable_commits: u64,
}

/// A queue's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages waiting for a consumer.
    pub messages_ready: u32,
    /// Messages delivered and not yet acknowledged.
    pub unacked: u32,
    /// Consumers of the queue.
    pub consumers: u32,
}

pub(crate) struct QueueState {
    pub(crate) args: QueueArgs,
    pub(crate) incarnation: u64,
    pub(crate) ready: BTreeMap<u64, Meta>,
    pub(crate) consumers: HashMap<u64, BTreeMap<u64, Meta>>,
    unacked: usize,
    notify: Arc<Notify>,
}

impl QueueState {
    fn new(args: QueueArgs, incarnation: u64) -> Self {
        QueueState {
            args,
            incarnation,
            ready: BTreeMap::new(),
            consumers: HashMap::new(),
            unacked: 0,
            notify: Arc::new(Notify::new()),
        }
    }

    /// Takes the expired ready messages off the front of the ready list.
    pub(crate) fn take_expired(&mut self, now_ms: u64) -> Vec<(u64, Meta)> {
        let mut out = Vec::new();
        let Some(ttl) = self.args.ttl_ms else {
            return out;
        };
        while let Some((&seq, meta)) = self.ready.first_key_value() {
            if meta.enqueued_at_ms.saturating_add(ttl) > now_ms {
                break;
            }
            let meta = *meta;
            self.ready.remove(&seq);
            out.push((seq, meta));
        }
        out
    }

    /// Removes a message wherever it is in memory (ready or held by a consumer).
    pub(crate) fn remove(&mut self, seq: u64) {
        if self.ready.remove(&seq).is_some() {
            return;
        }
        for held in self.consumers.values_mut() {
            if held.remove(&seq).is_some() {
                self.unacked = self.unacked.saturating_sub(1);
                return;
            }
        }
    }

    pub(crate) fn wake(&self) {
        self.notify.notify_waiters();
    }
}

#[derive(Default)]
pub(crate) struct State {
    closed: bool,
    pub(crate) queues: HashMap<String, QueueState>,
    next_consumer: u64,
    next_incarnation: u64,
}

impl State {
    pub(crate) fn declare(&mut self, queue: String, args: QueueArgs) {
        self.next_incarnation += 1;
        let qs = QueueState::new(args, self.next_incarnation);
        if let Some(old) = self.queues.insert(queue, qs) {
            old.wake();
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) struct Inner {
    dir: PathBuf,
    pub(crate) db_path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    pub(crate) state: Mutex<State>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    lock_file: Mutex<Option<File>>,
    pub(crate) operations: AtomicU64,
    pub(crate) commits: AtomicU64,
    pub(crate) durable_commits: AtomicU64,
}

impl Inner {
    pub(crate) fn send(&self, op: Op) -> Result<(), StoreError> {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.send(op).map_err(|_| StoreError::Closed),
            None => Err(StoreError::Closed),
        }
    }

    pub(crate) async fn call(&self, make: impl FnOnce(Reply) -> Op) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(Reply::Async(tx)))?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    fn call_blocking(&self, make: impl FnOnce(Reply) -> Op) -> Result<u64, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(make(Reply::Sync(tx)))?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Reads whole messages by seq (skipping those no longer on disk).
    fn read(&self, queue: &str, entries: &[(u64, Meta)]) -> Result<Vec<Message>, StoreError> {
        let db = self.db()?;
        let path = &self.db_path;
        let txn = db.begin_read().map_err(|e| StoreError::db(path, e))?;
        let table = txn.open_table(MESSAGES).map_err(|e| StoreError::db(path, e))?;
        let mut out = Vec::with_capacity(entries.len());
        for &(seq, meta) in entries {
            let Some(raw) = table.get((queue, seq)).map_err(|e| StoreError::db(path, e))? else {
                continue;
            };
            let (disk, headers, body) = record::decode(raw.value(), path)?;
            out.push(Message {
                seq,
                body,
                headers,
                redelivered: meta.redelivered || disk.redelivered,
                enqueued_at: UNIX_EPOCH + Duration::from_millis(disk.enqueued_at_ms),
            });
        }
        Ok(out)
    }

    /// Hands expired messages of a queue (already taken off its ready list) to the writer.
    pub(crate) fn expire(&self, queue: &str, entries: Vec<(u64, Meta)>) {
        if entries.is_empty() {
            return;
        }
        // On a closed store the messages stay on disk and expire after the next open.
        let _ = self.send(Op::Expire {
            queue: queue.to_string(),
            entries,
        });
    }

    fn close(&self) {
        let tx = lock(&self.tx).take();
        if let Some(tx) = tx {
            let _ = tx.send(Op::Shutdown);
        }
        let handle = lock(&self.writer).take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "the queue store's writer thread panicked");
        }
        {
            let mut st = lock(&self.state);
            st.closed = true;
            for qs in st.queues.values() {
                qs.wake();
            }
            st.queues.clear();
        }
        self.db.write().unwrap_or_else(PoisonError::into_inner).take();
        let file = lock(&self.lock_file).take();
        if let Some(file) = file {
            let _ = file.set_len(0);
            let _ = file.unlock();
        }
    }
}

/// Closes the store when the last [`Store`] clone goes.
struct Handle {
    inner: Arc<Inner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

/// A store of durable queues in one data directory.
///
/// Cheap to clone; `Send + Sync`. Dropping the last clone (or [`Store::close`]) stops the writer
/// thread, makes every commit durable and releases the directory; live [`Consumer`]s then get
/// `None`.
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.handle.inner.dir)
            .finish_non_exhaustive()
    }
}

fn take_dir_lock(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| StoreError::io(&path, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid: s.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(StoreError::io(&path, e)),
    }
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.flush())
        .map_err(|e| StoreError::io(&path, e))?;
    Ok(file)
}

/// Opens the database, creates the tables and rebuilds the in-memory index.
fn recover(dir: &Path, db_path: &Path) -> Result<(Database, State, u64), StoreError> {
    let db = match Database::create(db_path) {
        Ok(db) => db,
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid: None,
            });
        }
        Err(e) => return Err(StoreError::db(db_path, e)),
    };
    let e = |err: redb::Error| StoreError::db(db_path, err);
    let mut state = State::default();
    let mut next_seq = 1u64;
    let txn = db.begin_write().map_err(|x| e(x.into()))?;
    {
        let queues = txn.open_table(QUEUES).map_err(|x| e(x.into()))?;
        let mut messages = txn.open_table(MESSAGES).map_err(|x| e(x.into()))?;
        let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        for row in queues.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let args = record::decode_args(v.value(), db_path)?;
            state.declare(k.value().to_string(), args);
        }
        if let Some(n) = meta.get(NEXT_SEQ).map_err(|x| e(x.into()))? {
            next_seq = n.value();
        }
        let mut orphans = Vec::new();
        for row in messages.iter().map_err(|x| e(x.into()))? {
            let (k, v) = row.map_err(|x| e(x.into()))?;
            let (queue, seq) = k.value();
            next_seq = next_seq.max(seq.saturating_add(1));
            match state.queues.get_mut(queue) {
                Some(qs) => {
                    qs.ready.insert(seq, record::decode_meta(v.value(), db_path)?);
                }
                None => orphans.push((queue.to_string(), seq)),
            }
        }
        for (queue, seq) in orphans {
            tracing::warn!(queue, seq, "dropping a message of an undeclared queue");
            messages.remove((queue.as_str(), seq)).map_err(|x| e(x.into()))?;
        }
    }
    txn.commit().map_err(|x| e(x.into()))?;
    Ok((db, state, next_seq))
}

impl Store {
    /// Opens (creating if needed) the data directory `dir`: takes its lock, opens
    /// `dir/queues.redb`, rebuilds the in-memory index and starts the writer thread.
    ///
    /// Fails with [`StoreError::Locked`] while another `Store` (in this process or another) has
    /// the directory open.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let lock_file = take_dir_lock(dir)?;
        let db_path = dir.join(DB_FILE);
        let (db, state, next_seq) = recover(dir, &db_path)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            dir: dir.to_path_buf(),
            db_path,
            db: RwLock::new(Some(db.clone())),
            state: Mutex::new(state),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            lock_file: Mutex::new(Some(lock_file)),
            operations: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            durable_commits: AtomicU64::new(0),
        });
        let w = writer::Writer::new(inner.clone(), db, next_seq, opts.sweep_interval);
        let handle = std::thread::Builder::new()
            .name("dmr-store-writer".into())
            .spawn(move || w.run(rx))
            .map_err(|e| StoreError::io(dir, e))?;
        *lock(&inner.writer) = Some(handle);
        Ok(Store {
            handle: Arc::new(Handle { inner }),
        })
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.handle.inner
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner().dir
    }

    /// Closes the store now (for every clone): finishes the operations already sent, makes every
    /// commit durable, stops the writer thread and releases the directory. Later calls fail with
    /// [`StoreError::Closed`]; consumers get `None`. Blocks until the writer has stopped.
    pub fn close(&self) {
        self.inner().close();
    }

    /// The writer thread's counters (e.g. to see group commit at work: far fewer commits than
    /// publishes under concurrency).
    pub fn stats(&self) -> StoreStats {
        let i = self.inner();
        StoreStats {
            operations: i.operations.load(Ordering::Relaxed),
            commits: i.commits.load(Ordering::Relaxed),
            durable_commits: i.durable_commits.load(Ordering::Relaxed),
        }
    }

    /// Declares a queue. Idempotent with the same arguments; with different ones it fails with
    /// [`StoreError::ArgsDiffer`]. Durable when it returns. Blocks the calling thread for one
    /// commit when the queue is new.
    pub fn declare(&self, queue: &str, args: QueueArgs) -> Result<(), StoreError> {
        {
            let st = lock(&self.inner().state);
            if st.closed {
                return Err(StoreError::Closed);
            }
            if let Some(qs) = st.queues.get(queue) {
                return if qs.args == args {
                    Ok(())
                } else {
                    Err(StoreError::ArgsDiffer {
                        queue: queue.to_string(),
                        existing: qs.args.clone(),
                        requested: args,
                    })
                };
            }
        }
        self.inner()
            .call_blocking(|reply| Op::Declare {
                queue: queue.to_string(),
                args,
                reply,
            })
            .map(|_| ())
    }

    /// Deletes a queue and its messages; returns how many messages were dropped (0 if the queue
    /// did not exist). Its consumers get `None`. Blocks the calling thread for one commit.
    pub fn delete_queue(&self, queue: &str) -> Result<u64, StoreError> {
        self.inner().call_blocking(|reply| Op::Delete {
            queue: queue.to_string(),
            reply,
        })
    }

    /// Whether the queue is declared.
    pub fn queue_exists(&self, queue: &str) -> bool {
        lock(&self.inner().state).queues.contains_key(queue)
    }

    /// Appends a message to a queue. Returns `Ok` only once the message is on disk (fsynced);
    /// concurrent publishes share one commit. [`StoreError::QueueNotFound`] if the queue is not
    /// declared. Calls made in order by one task are stored in that order.
    pub async fn publish(&self, queue: &str, body: Bytes, headers: Headers) -> Result<(), StoreError> {
        self.inner()
            .call(|reply| Op::Publish {
                queue: queue.to_string(),
                body,
                headers,
                reply,
            })
            .await
            .map(|_| ())
    }

    /// Starts consuming a queue with at most `prefetch` unacknowledged messages at a time
    /// (0 means no limit).
    pub fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, StoreError> {
        let mut st = lock(&self.inner().state);
        if st.closed {
            return Err(StoreError::Closed);
        }
        st.next_consumer += 1;
        let id = st.next_consumer;
        let qs = st
            .queues
            .get_mut(queue)
            .ok_or_else(|| StoreError::QueueNotFound(queue.to_string()))?;
        qs.consumers.insert(id, BTreeMap::new());
        Ok(Consumer {
            inner: self.inner().clone(),
            queue: queue.to_string(),
            id,
            incarnation: qs.incarnation,
            prefetch,
            notify: qs.notify.clone(),
        })
    }

    /// The queue's counts, from memory.
    pub fn counts(&self, queue: &str) -> Result<Counts, StoreError> {
        let st = lock(&self.inner().state);
        let qs = st
            .queues
            .get(queue)
            .ok_or_else(|| StoreError::QueueNotFound(queue.to_string()))?;
        let c = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Counts {
            messages_ready: c(qs.ready.len()),
            unacked: c(qs.unacked),
            consumers: c(qs.consumers.len()),
        })
    }

    /// The oldest ready message of the queue, without removing or delivering it.
    pub fn peek(&self, queue: &str) -> Result<Option<Message>, StoreError> {
        Ok(self.list(queue, 1)?.into_iter().next())
    }

    /// Up to `limit` ready messages of the queue, oldest first, without delivering them.
    pub fn list(&self, queue: &str, limit: usize) -> Result<Vec<Message>, StoreError> {
        let entries: Vec<(u64, Meta)> = {
            let st = lock(&self.inner().state);
            let qs = st
                .queues
                .get(queue)
                .ok_or_else(|| StoreError::QueueNotFound(queue.to_string()))?;
            qs.ready.iter().take(limit).map(|(s, m)| (*s, *m)).collect()
        };
        self.inner().read(queue, &entries)
    }
}

/// One consumer of one queue. Dropping it returns its unacknowledged messages to the queue
/// (ahead of newer ones, flagged `redelivered`).
pub struct Consumer {
    inner: Arc<Inner>,
    queue: String,
    id: u64,
    pub(crate) incarnation: u64,
    prefetch: u16,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

enum Take {
    Ended,
    Wait,
    Got(u64, Meta),
}

impl Consumer {
    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    fn take(&self) -> Take {
        let mut st = lock(&self.inner.state);
        if st.closed {
            return Take::Ended;
        }
        let Some(qs) = st
            .queues
            .get_mut(&self.queue)
            .filter(|q| q.incarnation == self.incarnation)
        else {
            return Take::Ended;
        };
        let expired = qs.take_expired(now_ms());
        self.inner.expire(&self.queue, expired);
        let held = qs.consumers.get(&self.id).map_or(0, BTreeMap::len);
        if self.prefetch != 0 && held >= usize::from(self.prefetch) {
            return Take::Wait;
        }
        let Some((seq, meta)) = qs.ready.pop_first() else {
            return Take::Wait;
        };
        qs.consumers.entry(self.id).or_default().insert(seq, meta);
        qs.unacked += 1;
        Take::Got(seq, meta)
    }

    /// The next message: waits while the queue has no ready message or this consumer already
    /// holds `prefetch` unacknowledged ones. `None` once the queue is deleted or the store is
    /// closed (or, logged, if the database cannot be read).
    ///
    /// Cancel-safe: a message is taken off the queue and read in the same poll, so dropping the
    /// future loses nothing.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            let notify = self.notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.take() {
                Take::Ended => return None,
                Take::Wait => notified.await,
                Take::Got(seq, meta) => match self.inner.read(&self.queue, &[(seq, meta)]) {
                    Ok(mut v) => match v.pop() {
                        Some(m) => return Some(m),
                        None => self.forget(seq),
                    },
                    Err(e) => {
                        tracing::error!(queue = %self.queue, seq, error = %e, "cannot read a message to deliver");
                        return None;
                    }
                },
            }
        }
    }

    /// Drops an unacked entry whose record has vanished (deleted concurrently).
    fn forget(&self, seq: u64) {
        let mut st = lock(&self.inner.state);
        if let Some(qs) = st.queues.get_mut(&self.queue)
            && let Some(held) = qs.consumers.get_mut(&self.id)
            && held.remove(&seq).is_some()
        {
            qs.unacked = qs.unacked.saturating_sub(1);
        }
    }

    /// Acknowledges a delivery: the message leaves the queue. The commit is not fsynced (see the
    /// fsync policy in the crate docs): a crash may bring the message back.
    pub async fn ack(&self, seq: u64) -> Result<(), StoreError> {
        self.acker().ack(seq).await
    }

    /// Rejects a delivery: moves it to the queue's `dead_letter_to` with `x-death-*` headers
    /// (reason `rejected`, the given `reason` in `x-death-detail`), or drops it if the queue has
    /// none, in one durable transaction. [`StoreError::QueueNotFound`] (and the message stays
    /// unacknowledged) if the dead-letter queue is not declared.
    pub async fn reject(&self, seq: u64, reason: &str) -> Result<(), StoreError> {
        self.acker().reject(seq, reason).await
    }

    /// Moves a delivery to the queue's `dead_letter_to` with `headers` merged into its own
    /// (overwriting same-named ones), in one durable transaction; drops it if the queue has no
    /// dead-letter queue. [`StoreError::QueueNotFound`] (and the message stays unacknowledged)
    /// if the dead-letter queue is not declared.
    pub async fn dead_letter(&self, seq: u64, headers: Headers) -> Result<(), StoreError> {
        self.acker().dead_letter(seq, headers).await
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        let mut st = lock(&self.inner.state);
        let Some(qs) = st
            .queues
            .get_mut(&self.queue)
            .filter(|q| q.incarnation == self.incarnation)
        else {
            return;
        };
        if let Some(held) = qs.consumers.remove(&self.id) {
            qs.unacked = qs.unacked.saturating_sub(held.len());
            let returned = !held.is_empty();
            for (seq, meta) in held {
                qs.ready.insert(
                    seq,
                    Meta {
                        redelivered: true,
                        ..meta
                    },
                );
            }
            if returned {
                qs.wake();
            }
        }
    }
}

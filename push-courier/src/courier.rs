//! Shared state and the durable path of a push.
//!
//! Memory holds the token index, the queue policy index and who is online;
//! the database holds the messages. A push is admitted in memory (collapse,
//! cap), queued for the writer task together with whatever it displaced,
//! handed to the device's connection if it is online while the writer
//! commits it, and answered 2xx only once committed. The device's ack is a
//! later write, so it never commits before the message it acks. A device
//! that connects is registered first and loads its queue second, and a
//! push hands its message over again after the commit if a new connection
//! came up meanwhile, so it reaches the device one way or the other (its
//! session drops a second copy).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Notify};
use wire::push::{CloseReason, DeviceToken, Notification, NotificationId, PushType};
use wire::ratelimit::RateLimiter;
use wire::DeviceId;

use crate::cluster::{shard_of, Cluster, NodeMsg};
use crate::core::queue::{Entry, Queues};
use crate::error::Error;
use crate::mailbox;
use crate::store::{MessageState, Store, StoredMessage, TokenKind, TokenRow, Write};
use crate::Config;

mod wakes;

pub use wakes::Woken;

/// What a device connection is told to do.
#[derive(Debug)]
pub enum ConnCommand {
    /// Boxed so that a waiting command stays small.
    Deliver(Box<Notification>),
    Close(CloseReason, &'static str),
}

/// Deliveries a connection may have waiting before it counts as a slow
/// reader.
const CONN_CHANNEL: usize = 512;

#[derive(Debug)]
struct Online {
    generation: u64,
    serial: Vec<u8>,
    tx: mailbox::Sender<ConnCommand>,
}

#[derive(Debug, Clone)]
struct TokenEntry {
    device: DeviceId,
    topic: String,
    kind: TokenKind,
    server_key: Option<Vec<u8>>,
    revoked_at: Option<i64>,
}

#[derive(Debug)]
struct Inner {
    tokens: HashMap<DeviceToken, TokenEntry>,
    by_topic: HashMap<(DeviceId, String), DeviceToken>,
    queues: Queues,
    online: HashMap<DeviceId, Online>,
    provider_limit: RateLimiter<String>,
    subscription_limit: RateLimiter<DeviceToken>,
    revoked_serials: HashSet<Vec<u8>>,
    /// Cluster mode: devices of this node's shards connected to other
    /// nodes, as (node, generation there).
    remote: HashMap<DeviceId, (Arc<str>, u64)>,
    /// Tokens the database did not know either, and when it said so: a
    /// provider sending to made-up tokens costs one read per token per
    /// [`UNKNOWN_FOR`], not one per push.
    unknown: HashMap<DeviceToken, Instant>,
}

/// How long a provider's push and a device's hello wait for a shard that
/// is between owners (given up by one node and not yet taken by another,
/// or its node died and its lease is running out) before the answer is
/// "retry", and how often they look again. A device waits longer: it is
/// better served by a slow hello than by being sent away, and the default
/// lease and one round (7.5 s) fit before its 10 s hello timeout.
const PUSH_OWNER_WAIT: Duration = Duration::from_secs(2);
const HELLO_OWNER_WAIT: Duration = Duration::from_secs(8);
const OWNER_POLL: Duration = Duration::from_millis(50);

/// How long a token the database did not know is not asked about again.
const UNKNOWN_FOR: Duration = Duration::from_secs(2);
/// Unknown tokens remembered at most (then forgotten all at once).
const UNKNOWN_KEPT: usize = 10_000;

/// A push as a provider API hands it over.
#[derive(Debug, Clone)]
pub struct PushRequest {
    pub id: NotificationId,
    pub token: DeviceToken,
    pub push_type: PushType,
    pub priority: u8,
    /// Unix seconds; 0 = no expiry.
    pub expires: u64,
    /// Deliver only if the device is connected now; never store.
    pub now_or_never: bool,
    pub collapse_id: String,
    /// The topic the provider named (APNs `apns-topic`), checked against
    /// the token's.
    pub topic: Option<String>,
    pub payload: Vec<u8>,
    pub provider: String,
    /// Web Push: the VAPID key that signed the request.
    pub vapid_key: Option<[u8; 65]>,
    /// Web Push receipt subscription.
    pub receipt: Option<String>,
    /// Set by Parley's own services (signaling's wake-ups, ids' account
    /// notices): the device the push is for, as that service knows it
    /// (the certificate that registered the binding, the account's device
    /// row). The token must be one that device got over its own link, so
    /// naming another device's token reaches nobody. Only such pushes may
    /// use Parley's own topics ([`wire::push::is_parley_topic`]); a
    /// provider's push (`None`) may not, unless `operator_granted`.
    pub for_device: Option<DeviceId>,
    /// The operator listed this VoIP topic for the provider by name
    /// (`topics = ["com.example.app.voip"]`): it may wake its app's
    /// devices as Apple lets an app's provider, which makes a courier an
    /// APNs stand-in for another Parley deployment.
    pub operator_granted: bool,
}

/// A push that passed the checks of the node the provider reached, on its
/// way to the owner of the device's queue (this node or another).
#[derive(Debug, Clone)]
pub struct Accepted {
    pub device: DeviceId,
    pub note: Notification,
    pub receipt: Option<String>,
    pub provider: String,
    pub created_at: i64,
    pub now_or_never: bool,
}

/// Who holds a device's queue.
enum Owner<'a> {
    /// This node; in cluster mode with its lease (shard, term).
    Here(Option<(u16, i64)>),
    /// Another node of `cluster`: the shard to forward to.
    Elsewhere(&'a Arc<Cluster>, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushOutcome {
    /// Stored (and handed to the device if online).
    Stored,
    /// Now-or-never: handed to the connected device.
    SentNow,
    /// Now-or-never and the device is not connected: discarded.
    Discarded,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("no such token")]
    UnknownToken,
    #[error("token was revoked")]
    Unregistered { at: i64 },
    #[error("token is not for this topic")]
    TopicMismatch,
    #[error("the token's topic is reserved for Parley's own services")]
    TopicReserved,
    #[error("token is not of this kind")]
    WrongKind,
    #[error("subscription is restricted to another application server key")]
    KeyMismatch,
    #[error("too many requests")]
    TooManyRequests,
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connects: AtomicU64,
    pub replaced: AtomicU64,
    pub pushes_stored: AtomicU64,
    pub pushes_sent_now: AtomicU64,
    pub pushes_discarded: AtomicU64,
    pub pushes_rejected: AtomicU64,
    /// Tokens looked up in the database (made by another courier, or
    /// unknown).
    pub token_reads: AtomicU64,
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub collapsed: AtomicU64,
    pub expired: AtomicU64,
    pub batches: AtomicU64,
    pub batched_writes: AtomicU64,
}

type Reply = oneshot::Sender<Result<(), String>>;

#[derive(Debug)]
pub struct Courier {
    pub config: Config,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    writer: mpsc::Sender<(Vec<Write>, Option<Reply>)>,
    inner: Mutex<Inner>,
    seqs: Arc<SeqBlocks>,
    generation: AtomicU64,
    /// Woken when the writer has committed message state changes
    /// (delivered, expired, dropped): receipt long-polls look again then,
    /// and only then.
    pub receipts: Arc<Notify>,
    /// (unix time, next sequence number) once a minute, to purge old
    /// statuses by sequence range.
    marks: Mutex<std::collections::VecDeque<(i64, i64)>>,
    /// Revocations by other couriers on the database are caught up from
    /// this time on (Unix seconds).
    revoked_mark: std::sync::atomic::AtomicI64,
    /// Set in cluster mode, once, right after open.
    cluster: OnceLock<Arc<Cluster>>,
    /// Set when the courier wakes sleeping devices through Apple's or
    /// Google's services.
    upstream: OnceLock<wakes::Upstream>,
    /// This courier, for the tasks it starts.
    me: Weak<Courier>,
}

/// Takes token rows into the token index, unless known; a live topic token
/// becomes the device's token for its topic unless it has one.
fn learn_tokens(
    tokens: &mut HashMap<DeviceToken, TokenEntry>,
    by_topic: &mut HashMap<(DeviceId, String), DeviceToken>,
    rows: impl IntoIterator<Item = TokenRow>,
) {
    for t in rows {
        if tokens.contains_key(&t.token) {
            continue;
        }
        if t.revoked_at.is_none() && t.kind == TokenKind::Topic {
            by_topic
                .entry((t.device, t.topic.clone()))
                .or_insert(t.token);
        }
        tokens.insert(
            t.token,
            TokenEntry {
                device: t.device,
                topic: t.topic,
                kind: t.kind,
                server_key: t.server_key,
                revoked_at: t.revoked_at,
            },
        );
    }
}

/// Marks `token` revoked at `at` in memory: no longer a topic's token,
/// and its queued messages leave the device's queue (returned).
fn forget_token(inner: &mut Inner, token: &DeviceToken, at: i64) -> Vec<Entry> {
    let Some(t) = inner.tokens.get_mut(token) else {
        return Vec::new();
    };
    t.revoked_at = Some(at);
    let (device, key) = (t.device, (t.device, t.topic.clone()));
    if t.kind == TokenKind::Topic && inner.by_topic.get(&key) == Some(token) {
        inner.by_topic.remove(&key);
    }
    inner.queues.remove_token(&device, token)
}

/// Message sequence numbers reserved per block in the database: at the
/// store path's ~50k pushes/s a block lasts about 20 s, time enough to
/// reserve the next even while the writer keeps SQLite busy (with blocks
/// of 65,536 the reservation, waiting for SQLite's write lock between
/// group commits, lost the race now and then and pushes got 503).
const SEQ_BLOCK: i64 = 1 << 20;

/// The block of sequence numbers this node hands out, and the next block,
/// reserved in the background before this one runs out.
#[derive(Debug)]
struct SeqBlocks {
    state: Mutex<SeqState>,
    /// Wakes the refill task: the spare block was taken into use, or the
    /// courier is gone.
    refill: Arc<Notify>,
    /// Set when the courier is dropped: the refill task ends.
    closed: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct SeqState {
    current: std::ops::Range<i64>,
    spare: Option<std::ops::Range<i64>>,
}

impl SeqBlocks {
    fn new(first: std::ops::Range<i64>) -> SeqBlocks {
        let blocks = SeqBlocks {
            state: Mutex::new(SeqState {
                current: first,
                spare: None,
            }),
            refill: Arc::new(Notify::new()),
            closed: Default::default(),
        };
        blocks.refill.notify_one();
        blocks
    }

    fn lock(&self) -> MutexGuard<'_, SeqState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next number; None only if a whole block went before the next
    /// one could be reserved.
    fn take(&self) -> Option<i64> {
        let mut s = self.lock();
        if s.current.is_empty() {
            s.current = s.spare.take()?;
            self.refill.notify_one();
        }
        s.current.next()
    }

    /// The number the next message gets (or one past every number given).
    fn next(&self) -> i64 {
        self.lock().current.start
    }
}

/// Keeps a spare block reserved while the courier lives.
async fn seq_refill(store: Store, blocks: std::sync::Weak<SeqBlocks>, wake: Arc<Notify>) {
    loop {
        let woken = wake.notified();
        let Some(b) = blocks.upgrade() else { return };
        if b.closed.load(Ordering::SeqCst) {
            return;
        }
        if b.lock().spare.is_some() {
            drop(b);
            woken.await;
            continue;
        }
        match store.reserve_seqs(SEQ_BLOCK).await {
            Ok(r) => b.lock().spare = Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "reserving message numbers failed; retrying");
                drop(b);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl Drop for Courier {
    fn drop(&mut self) {
        // The refill task holds no reference while it waits: wake it to
        // find the courier gone.
        self.seqs.closed.store(true, Ordering::SeqCst);
        self.seqs.refill.notify_one();
    }
}

impl Courier {
    /// Loads tokens and queued messages and starts the writer task. Must
    /// run inside a tokio runtime.
    pub async fn open(config: Config, store: Store) -> Result<Arc<Courier>, Error> {
        let mut tokens = HashMap::new();
        let mut by_topic = HashMap::new();
        learn_tokens(&mut tokens, &mut by_topic, store.tokens().await?);
        let mut queues = Queues::new(config.queue_cap);
        // In cluster mode each shard's queue is loaded when this node
        // takes the shard.
        let queued = match config.cluster {
            None => store.queued_index().await?,
            Some(_) => Vec::new(),
        };
        for m in &queued {
            queues.admit(m.device, entry(m));
        }
        let seqs = Arc::new(SeqBlocks::new(store.reserve_seqs(SEQ_BLOCK).await?));
        tracing::info!(
            tokens = tokens.len(),
            queued = queued.len(),
            "courier state loaded"
        );
        let (tx, rx) = mpsc::channel(config.max_batch * 2);
        let inner = Inner {
            tokens,
            by_topic,
            queues,
            online: HashMap::new(),
            provider_limit: RateLimiter::new(config.provider_rate, Duration::from_secs(1)),
            subscription_limit: RateLimiter::new(config.subscription_rate, Duration::from_secs(1)),
            revoked_serials: HashSet::new(),
            remote: HashMap::new(),
            unknown: HashMap::new(),
        };
        let metrics = Arc::new(Metrics::default());
        let courier = Arc::new_cyclic(|me| Courier {
            store: store.clone(),
            metrics: metrics.clone(),
            writer: tx,
            inner: Mutex::new(inner),
            seqs: seqs.clone(),
            generation: AtomicU64::new(0),
            receipts: Arc::new(Notify::new()),
            marks: Mutex::new(std::collections::VecDeque::new()),
            revoked_mark: std::sync::atomic::AtomicI64::new(unix_now()),
            cluster: OnceLock::new(),
            upstream: OnceLock::new(),
            me: me.clone(),
            config,
        });
        tokio::spawn(seq_refill(
            store.clone(),
            Arc::downgrade(&seqs),
            seqs.refill.clone(),
        ));
        tokio::spawn(writer(
            store,
            rx,
            courier.config.max_batch,
            metrics,
            courier.receipts.clone(),
        ));
        courier.start_waking();
        Ok(courier)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug; keep serving with the
        // state as it is rather than poisoning every later request.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commits `writes` as one transaction (batched with others).
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), Error> {
        Self::committed(self.enqueue(writes).await?).await
    }

    /// Queues `writes` for the writer, after every write queued before;
    /// the receiver answers once they are committed.
    async fn enqueue(
        &self,
        writes: Vec<Write>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, Error> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send((writes, Some(tx)))
            .await
            .map_err(|_| Error::Internal("writer stopped".into()))?;
        Ok(rx)
    }

    async fn committed(rx: oneshot::Receiver<Result<(), String>>) -> Result<(), Error> {
        rx.await
            .map_err(|_| Error::Internal("writer stopped".into()))?
            .map_err(Error::Database)
    }

    /// Queues writes without waiting for them (acks, expiry): losing them
    /// in a crash only means a redelivery the device drops.
    fn commit_later(&self, writes: Vec<Write>) {
        if let Err(e) = self.writer.try_send((writes, None)) {
            tracing::warn!(error = %e, "writer queue full; state change deferred to restart");
        }
    }

    /// Accepts a push: durable before this returns `Ok(Stored)`.
    pub async fn push(&self, mut req: PushRequest) -> Result<PushOutcome, PushError> {
        let now = unix_now();
        // A token another courier on the database made since this one
        // started is read once, then known.
        let ask = {
            let inner = self.lock();
            !inner.tokens.contains_key(&req.token)
                && inner
                    .unknown
                    .get(&req.token)
                    .is_none_or(|at| at.elapsed() >= UNKNOWN_FOR)
        };
        if ask {
            self.metrics.token_reads.fetch_add(1, Ordering::Relaxed);
            match self.store.token(&req.token).await {
                Ok(Some(row)) => self.learn(Some(row)),
                Ok(None) => {
                    let mut inner = self.lock();
                    if inner.unknown.len() >= UNKNOWN_KEPT {
                        inner.unknown.clear();
                    }
                    inner.unknown.insert(req.token, Instant::now());
                }
                Err(e) => return Err(PushError::Unavailable(e.to_string())),
            }
        }
        let accepted = {
            let mut guard = self.lock();
            // Borrow fields apart: the token entry stays borrowed while the
            // limits and queues change.
            let inner = &mut *guard;
            let t = inner
                .tokens
                .get(&req.token)
                .ok_or(PushError::UnknownToken)?;
            match req.for_device {
                // Not that device's token: as if it did not exist.
                Some(d) if d != t.device => return Err(PushError::UnknownToken),
                Some(_) => {}
                None if wire::push::is_parley_topic(&t.topic)
                    && !(req.operator_granted && t.topic.ends_with(".voip")) =>
                {
                    return Err(PushError::TopicReserved)
                }
                None => {}
            }
            if let Some(at) = t.revoked_at {
                return Err(PushError::Unregistered { at });
            }
            let web = req.push_type == PushType::WebPush;
            if web != (t.kind == TokenKind::WebPush) {
                return Err(PushError::WrongKind);
            }
            if let Some(topic) = &req.topic {
                if *topic != t.topic {
                    return Err(PushError::TopicMismatch);
                }
            }
            if let Some(k) = &t.server_key {
                if req.vapid_key.map(|v| v.to_vec()).as_ref() != Some(k) {
                    return Err(PushError::KeyMismatch);
                }
            }
            let instant = Instant::now();
            if !inner.provider_limit.take(req.provider.clone(), instant)
                || (web && !inner.subscription_limit.take(req.token, instant))
            {
                self.metrics.pushes_rejected.fetch_add(1, Ordering::Relaxed);
                return Err(PushError::TooManyRequests);
            }
            let note = Notification {
                id: req.id,
                token: req.token,
                push_type: req.push_type,
                priority: req.priority,
                expires: req.expires,
                collapse_id: req.collapse_id,
                // The provider's topic when it named one: the same string.
                topic: req.topic.take().unwrap_or_else(|| t.topic.clone()),
                payload: req.payload,
            };
            Accepted {
                device: t.device,
                note,
                receipt: req.receipt,
                provider: req.provider,
                created_at: now,
                now_or_never: req.now_or_never,
            }
        };
        let deadline = Instant::now() + PUSH_OWNER_WAIT;
        loop {
            match self.owner(&accepted.device) {
                Owner::Here(lease) => return self.accept(accepted, lease).await,
                Owner::Elsewhere(c, shard) => match c.forward_push(shard, &accepted).await {
                    Some(r) => return r,
                    None if Instant::now() < deadline => tokio::time::sleep(OWNER_POLL).await,
                    None => return Err(PushError::Unavailable(Error::NoOwner(shard).to_string())),
                },
            }
        }
    }

    /// Who holds `device`'s queue now.
    fn owner(&self, device: &DeviceId) -> Owner<'_> {
        let Some(c) = self.cluster.get() else {
            return Owner::Here(None);
        };
        let shard = shard_of(device);
        match c.term(shard) {
            Some(term) => Owner::Here(Some((shard, term))),
            None => Owner::Elsewhere(c, shard),
        }
    }

    /// Stores a push for a device whose queue this node holds (with
    /// `lease` in cluster mode) and hands it to the device wherever it is
    /// connected: durable before this returns `Ok(Stored)`.
    pub async fn accept(
        &self,
        a: Accepted,
        lease: Option<(u16, i64)>,
    ) -> Result<PushOutcome, PushError> {
        let Accepted {
            device,
            note,
            receipt,
            provider,
            created_at: now,
            now_or_never,
        } = a;
        if now_or_never {
            let sent = match self.deliver(device, &note, None) {
                Some(_) => true,
                None => self.deliver_remote(device, &note, None).await.is_some(),
            };
            let (outcome, counter) = if sent {
                (PushOutcome::SentNow, &self.metrics.pushes_sent_now)
            } else {
                (PushOutcome::Discarded, &self.metrics.pushes_discarded)
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Ok(outcome);
        }
        // A sleeping device with a platform token is owed a wake-up, from
        // the same commit as the push.
        let wakes = self.owed_by(device, &note).await;
        let (insert, displaced, owed) = {
            let mut inner = self.lock();
            let Some(seq) = self.seqs.take() else {
                return Err(PushError::Unavailable(
                    "reserving message numbers; retry shortly".into(),
                ));
            };
            let stored = StoredMessage {
                seq,
                device,
                note: note.clone(),
                receipt,
                provider,
                created_at: now,
            };
            let adm = inner.queues.admit(device, entry(&stored));
            let mut writes = vec![Write::Insert(Box::new(stored))];
            let owed = wakes.map(|calls| crate::store::Owed {
                device,
                seq,
                id: note.id,
                calls,
                expires: note.expires as i64,
            });
            writes.extend(owed.clone().map(Write::Owe));
            writes.extend(fence(lease));
            let displaced: Vec<Entry> = adm.replaced.iter().chain(&adm.dropped).cloned().collect();
            for (gone, state, counter) in [
                (
                    adm.replaced,
                    MessageState::Replaced,
                    &self.metrics.collapsed,
                ),
                (adm.dropped, MessageState::Dropped, &self.metrics.dropped),
            ] {
                if !gone.is_empty() {
                    counter.fetch_add(gone.len() as u64, Ordering::Relaxed);
                    if state == MessageState::Dropped {
                        tracing::debug!(count = gone.len(), "device queue full; oldest dropped");
                    }
                    writes.push(Write::State {
                        seqs: gone.iter().map(|e| e.seq as i64).collect(),
                        state,
                        at: now,
                    });
                }
            }
            (writes, displaced, owed)
        };
        // The insert is queued for the writer before the device can see the
        // message, so its ack (a later write) commits after it; the device
        // gets it while the commit runs, and the provider's 2xx still waits
        // for the commit. If the commit fails the provider is told so and
        // may retry with the same id, which the device drops.
        let mut early = None;
        let mut early_remote = None;
        let result = match self.enqueue(insert).await {
            Ok(reply) => {
                early = self.deliver(device, &note, None);
                if early.is_none() {
                    early_remote = self.deliver_remote(device, &note, None).await;
                }
                Self::committed(reply).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let mut inner = self.lock();
            inner.queues.remove(&device, &note.id);
            inner.queues.restore(device, displaced);
            return Err(PushError::Unavailable(e.to_string()));
        }
        self.metrics.pushes_stored.fetch_add(1, Ordering::Relaxed);
        if let Some(o) = owed {
            self.kick(o);
        }
        // A connection that came up during the commit, here or through
        // another node, may have read its backlog before the message was
        // there.
        if self.deliver(device, &note, early).is_none() {
            self.deliver_remote(device, &note, early_remote).await;
        }
        Ok(PushOutcome::Stored)
    }

    /// Cluster mode: sends `note` to the node the device is attached from,
    /// unless that is the attachment `skip`; returns the attachment it went
    /// to. Like a delivery here, it goes while the commit runs: the
    /// device's ack comes back through this node's writer, after the
    /// insert.
    async fn deliver_remote(
        &self,
        device: DeviceId,
        note: &Notification,
        skip: Option<(Arc<str>, u64)>,
    ) -> Option<(Arc<str>, u64)> {
        let c = self.cluster.get()?;
        let (node, generation) = self.lock().remote.get(&device).cloned()?;
        if skip.as_ref() == Some(&(node.clone(), generation)) {
            return skip;
        }
        let msg = NodeMsg::Deliver {
            device: device.to_string(),
            generation,
            note: crate::cluster::encode_note(note).ok()?,
        };
        c.to_node(&node, &msg).await;
        Some((node, generation))
    }

    /// Hands `note` to the device's connection unless it is the one of
    /// generation `skip`; returns the generation it went to. A connection
    /// too far behind is closed; the message is stored (or its provider
    /// told otherwise) and comes back after the device reconnects.
    fn deliver(&self, device: DeviceId, note: &Notification, skip: Option<u64>) -> Option<u64> {
        let inner = self.lock();
        let o = inner.online.get(&device)?;
        if Some(o.generation) == skip {
            return skip;
        }
        if let Err(mailbox::TrySendError::Full) =
            o.tx.try_send(ConnCommand::Deliver(Box::new(note.clone())))
        {
            let _ = o.tx.try_send(ConnCommand::Close(
                CloseReason::SlowReader,
                "too far behind",
            ));
        }
        Some(o.generation)
    }

    /// A device connected (after its handshake): kicks an older connection
    /// of the same device. Returns the channel the connection reads its
    /// commands from and its generation, or `None` if the certificate is
    /// revoked.
    pub fn connect(
        &self,
        device: DeviceId,
        serial: Vec<u8>,
    ) -> Option<(u64, mailbox::Receiver<ConnCommand>)> {
        let mut inner = self.lock();
        if inner.revoked_serials.contains(&serial) {
            return None;
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mailbox::mailbox(CONN_CHANNEL);
        if let Some(old) = inner.online.insert(
            device,
            Online {
                generation,
                serial,
                tx,
            },
        ) {
            self.metrics.replaced.fetch_add(1, Ordering::Relaxed);
            let _ = old.tx.try_send(ConnCommand::Close(
                CloseReason::Replaced,
                "another connection from this device",
            ));
        } else {
            self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics.connects.fetch_add(1, Ordering::Relaxed);
        Some((generation, rx))
    }

    /// The connection of `generation` ended.
    pub fn disconnect(&self, device: DeviceId, generation: u64) {
        let mut inner = self.lock();
        if inner
            .online
            .get(&device)
            .is_some_and(|o| o.generation == generation)
        {
            inner.online.remove(&device);
            self.metrics.connections.fetch_sub(1, Ordering::Relaxed);
        }
        drop(inner);
        if let Owner::Elsewhere(c, _) = self.owner(&device) {
            let c = c.clone();
            tokio::spawn(async move { c.detach(device, generation).await });
        }
    }

    /// Hello: one token per topic (created on first use, stable after).
    pub async fn tokens_for(
        &self,
        device: DeviceId,
        topics: &[String],
    ) -> Result<Vec<(String, DeviceToken)>, Error> {
        let now = unix_now();
        // The device may have got its tokens from another courier on the
        // database: the same ones again, not new ones.
        let missing = {
            let inner = self.lock();
            topics
                .iter()
                .any(|t| !inner.by_topic.contains_key(&(device, t.clone())))
        };
        if missing {
            self.learn(self.store.tokens_of(device).await?);
        }
        let mut out = Vec::new();
        let mut new = Vec::new();
        {
            let mut inner = self.lock();
            for topic in topics {
                if let Some(t) = inner.by_topic.get(&(device, topic.clone())) {
                    out.push((topic.clone(), *t));
                    continue;
                }
                let token = DeviceToken(random()?);
                inner.by_topic.insert((device, topic.clone()), token);
                inner.tokens.insert(
                    token,
                    TokenEntry {
                        device,
                        topic: topic.clone(),
                        kind: TokenKind::Topic,
                        server_key: None,
                        revoked_at: None,
                    },
                );
                new.push(Write::Token(TokenRow {
                    token,
                    device,
                    topic: topic.clone(),
                    kind: TokenKind::Topic,
                    server_key: None,
                    created_at: now,
                    revoked_at: None,
                }));
                out.push((topic.clone(), token));
            }
        }
        if !new.is_empty() {
            self.commit(new).await?;
        }
        Ok(out)
    }

    /// A new Web Push subscription for `topic` (the app), optionally
    /// restricted to one VAPID key (RFC 8292 §4).
    pub async fn subscribe(
        &self,
        device: DeviceId,
        topic: &str,
        server_key: Option<[u8; 65]>,
    ) -> Result<DeviceToken, Error> {
        let token = DeviceToken(random()?);
        let row = TokenRow {
            token,
            device,
            topic: topic.to_owned(),
            kind: TokenKind::WebPush,
            server_key: server_key.map(|k| k.to_vec()),
            created_at: unix_now(),
            revoked_at: None,
        };
        self.commit(vec![Write::Token(row.clone())]).await?;
        self.lock().tokens.insert(
            token,
            TokenEntry {
                device,
                topic: row.topic,
                kind: row.kind,
                server_key: row.server_key,
                revoked_at: None,
            },
        );
        Ok(token)
    }

    /// Revokes a token of `device` (an app uninstalled, a subscription
    /// dropped). Providers get 410 from now on; queued messages on it are
    /// marked unregistered.
    pub async fn revoke(&self, device: DeviceId, token: DeviceToken) -> Result<bool, Error> {
        let now = unix_now();
        let gone = {
            let mut inner = self.lock();
            if inner
                .tokens
                .get(&token)
                .is_none_or(|t| t.device != device || t.revoked_at.is_some())
            {
                return Ok(false);
            }
            forget_token(&mut inner, &token, now)
        };
        let mut writes = vec![Write::Revoke { token, at: now }];
        writes.extend(self.state_writes(
            gone.iter().map(|e| (device, e.seq as i64)),
            MessageState::Unregistered,
            now,
        ));
        self.commit(writes).await?;
        Ok(true)
    }

    /// Takes tokens read from the database into memory, unless known.
    fn learn(&self, rows: impl IntoIterator<Item = TokenRow>) {
        let inner = &mut *self.lock();
        learn_tokens(&mut inner.tokens, &mut inner.by_topic, rows);
    }

    /// Applies revocations other couriers on the database made since the
    /// last call: their tokens are refused here too, and what this courier
    /// held for them is marked unregistered. The runtime calls it every
    /// second.
    pub async fn catch_up_revocations(&self) -> Result<usize, Error> {
        let since = self.revoked_mark.load(Ordering::Relaxed);
        let rows = self.store.revoked_since(since).await?;
        let mut mark = since;
        let mut writes = Vec::new();
        let mut gone_at: Vec<(DeviceId, i64, i64)> = Vec::new();
        let mut caught = 0;
        {
            let mut inner = self.lock();
            for row in &rows {
                let Some(at) = row.revoked_at else { continue };
                mark = mark.max(at);
                if inner
                    .tokens
                    .get(&row.token)
                    .is_none_or(|t| t.revoked_at.is_some())
                {
                    continue;
                }
                caught += 1;
                let gone = forget_token(&mut inner, &row.token, at);
                gone_at.extend(gone.iter().map(|e| (row.device, e.seq as i64, at)));
            }
        }
        // Grouped by time: one revocation's messages share a statement.
        let mut i = 0;
        while i < gone_at.len() {
            let at = gone_at[i].2;
            let n = gone_at[i..].iter().take_while(|g| g.2 == at).count();
            writes.extend(self.state_writes(
                gone_at[i..i + n].iter().map(|(d, s, _)| (*d, *s)),
                MessageState::Unregistered,
                at,
            ));
            i += n;
        }
        if !writes.is_empty() {
            self.commit(writes).await?;
        }
        self.revoked_mark.store(mark, Ordering::Relaxed);
        Ok(caught)
    }

    /// Stored messages for a device that just said Hello (connection
    /// `generation`), in delivery order (VoIP and priority 10 first). In
    /// cluster mode a device of another node's shard is attached to that
    /// node, which answers with the backlog.
    pub async fn backlog(
        &self,
        device: DeviceId,
        generation: u64,
    ) -> Result<Vec<Notification>, Error> {
        // A shard between owners gets one soon: wait for it rather than
        // send the device away.
        let deadline = Instant::now() + HELLO_OWNER_WAIT;
        while let Owner::Elsewhere(c, _) = self.owner(&device) {
            match c.attach(device, generation).await {
                Err(Error::NoOwner(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(OWNER_POLL).await
                }
                r => return r,
            }
        }
        // Connected here now: not through another node any more, and
        // awake.
        self.awake(device);
        let old = self.lock().remote.remove(&device);
        if let (Some((node, generation)), Some(c)) = (old, self.cluster.get()) {
            let msg = NodeMsg::Close {
                device: device.to_string(),
                generation,
            };
            c.to_node(&node, &msg).await;
        }
        self.queued_for(device).await
    }

    /// The device's queued messages with payloads, in delivery order.
    /// Memory knows which sequence numbers it has waiting; the database
    /// has their payloads.
    async fn queued_for(&self, device: DeviceId) -> Result<Vec<Notification>, Error> {
        let order = self.lock().queues.delivery_seqs(&device, unix_now() as u64);
        if order.is_empty() {
            return Ok(Vec::new());
        }
        let seqs: Vec<i64> = order.iter().map(|s| *s as i64).collect();
        let rows = self.store.queued_by_seq(&seqs).await?;
        let mut by_seq: HashMap<i64, Notification> =
            rows.into_iter().map(|m| (m.seq, m.note)).collect();
        Ok(seqs.iter().filter_map(|s| by_seq.remove(s)).collect())
    }

    /// The device acked these ids (on a connection to this node).
    pub fn acked(&self, device: DeviceId, ids: Vec<NotificationId>) {
        match self.owner(&device) {
            Owner::Elsewhere(c, _) => {
                let c = c.clone();
                tokio::spawn(async move { c.ack(device, &ids).await });
            }
            Owner::Here(lease) => self.acked_here(device, ids, lease),
        }
    }

    /// Acks for a device whose queue this node holds (with `lease` in
    /// cluster mode).
    pub fn acked_here(
        &self,
        device: DeviceId,
        ids: Vec<NotificationId>,
        lease: Option<(u16, i64)>,
    ) {
        let mut seqs = Vec::with_capacity(ids.len());
        {
            let mut inner = self.lock();
            for id in &ids {
                while let Some(e) = inner.queues.remove(&device, id) {
                    seqs.push(e.seq as i64);
                }
            }
        }
        if seqs.is_empty() {
            // Now-or-never messages are not stored; nothing to record.
            return;
        }
        self.metrics
            .delivered
            .fetch_add(seqs.len() as u64, Ordering::Relaxed);
        let mut writes = vec![Write::State {
            seqs,
            state: MessageState::Delivered,
            at: unix_now(),
        }];
        writes.extend(fence(lease));
        self.commit_later(writes);
    }

    /// Drops expired messages from queues; called every second.
    pub fn expire(&self) {
        let now = unix_now();
        let gone = self.lock().queues.take_expired(now as u64);
        if gone.is_empty() {
            return;
        }
        self.metrics
            .expired
            .fetch_add(gone.len() as u64, Ordering::Relaxed);
        let writes = self.state_writes(
            gone.iter().map(|(d, e)| (*d, e.seq as i64)),
            MessageState::Expired,
            now,
        );
        if !writes.is_empty() {
            self.commit_later(writes);
        }
    }

    /// A state change for messages of these devices, with the fences of
    /// their shards in cluster mode. Messages of shards this node no
    /// longer holds are left to their new owner.
    fn state_writes(
        &self,
        messages: impl IntoIterator<Item = (DeviceId, i64)>,
        state: MessageState,
        at: i64,
    ) -> Vec<Write> {
        let mut seqs = Vec::new();
        let mut fences: Vec<(u16, i64)> = Vec::new();
        for (device, seq) in messages {
            match self.owner(&device) {
                Owner::Here(lease) => {
                    seqs.push(seq);
                    fences.extend(lease.filter(|l| !fences.contains(l)));
                }
                Owner::Elsewhere(..) => {}
            }
        }
        if seqs.is_empty() {
            return Vec::new();
        }
        let mut writes = vec![Write::State { seqs, state, at }];
        writes.extend(fences.into_iter().filter_map(|l| fence(Some(l))));
        writes
    }

    /// Cluster mode: `device`, a device of this node's shard, is connected
    /// to `node` as `generation`. Later pushes go there; returns the
    /// backlog. An older connection through another node is closed.
    pub async fn attach_remote(
        &self,
        device: DeviceId,
        node: &str,
        generation: u64,
    ) -> Result<Vec<Notification>, Error> {
        let old = self.lock().remote.insert(device, (node.into(), generation));
        self.awake(device);
        if let (Some((n, g)), Some(c)) = (old, self.cluster.get()) {
            if (&*n, g) != (node, generation) {
                let msg = NodeMsg::Close {
                    device: device.to_string(),
                    generation: g,
                };
                c.to_node(&n, &msg).await;
            }
        }
        // Every push admitted before the attachment is committed before
        // the backlog is read: those still committing were sent to the
        // old attachment (or to this one before NATS lost them), and the
        // backlog must hold them.
        self.commit(Vec::new()).await?;
        self.queued_for(device).await
    }

    /// Cluster mode: a connection through another node ended.
    pub fn detach_remote(&self, device: DeviceId, node: &str, generation: u64) {
        let mut inner = self.lock();
        if inner
            .remote
            .get(&device)
            .is_some_and(|(n, g)| (&**n, *g) == (node, generation))
        {
            inner.remote.remove(&device);
        }
    }

    /// Cluster mode: a delivery from the owner for connection `generation`
    /// on this node.
    pub fn deliver_to(&self, device: DeviceId, generation: u64, note: Notification) {
        let online = self
            .lock()
            .online
            .get(&device)
            .is_some_and(|o| o.generation == generation);
        if online {
            self.deliver(device, &note, None);
        }
    }

    /// Cluster mode: the device connected again elsewhere; its connection
    /// `generation` here is closed.
    pub fn replaced(&self, device: DeviceId, generation: u64) {
        let inner = self.lock();
        if let Some(o) = inner.online.get(&device) {
            if o.generation == generation {
                let _ = o.tx.try_send(ConnCommand::Close(
                    CloseReason::Replaced,
                    "another connection from this device",
                ));
            }
        }
    }

    /// Cluster mode: loads the queue index of shards this node is taking
    /// over.
    pub async fn load_shards(&self, shards: &[u16]) -> Result<(), Error> {
        let bytes: Vec<u8> = shards.iter().map(|s| *s as u8).collect();
        let rows = self.store.queued_index_of(&bytes).await?;
        let mut inner = self.lock();
        for m in &rows {
            inner.queues.admit(m.device, entry(m));
        }
        tracing::debug!(
            shards = shards.len(),
            queued = rows.len(),
            "shard queues loaded"
        );
        Ok(())
    }

    /// Cluster mode: forgets what this node held for a shard it no longer
    /// owns.
    pub fn drop_shard(&self, shard: u16) {
        let mut inner = self.lock();
        inner.queues.drop_devices(|d| shard_of(d) == shard);
        inner.remote.retain(|d, _| shard_of(d) != shard);
    }

    /// Cluster mode: `shard` has a new owner. This node's connected
    /// devices of that shard attach to it and get their backlog (the device
    /// drops what it already has); if this node is the owner, they get
    /// the backlog it loaded. A device that cannot be attached is told to
    /// reconnect.
    pub async fn reattach(&self, shard: u16) {
        self.reattach_where(|d| shard_of(d) == shard).await
    }

    /// As [`Courier::reattach`], for the connected devices `pick` picks
    /// (all of them after NATS was away: what it lost meanwhile comes
    /// back with the backlog).
    pub async fn reattach_where(&self, pick: impl Fn(&DeviceId) -> bool) {
        let here: Vec<(DeviceId, u64)> = self
            .lock()
            .online
            .iter()
            .filter(|(d, _)| pick(d))
            .map(|(d, o)| (*d, o.generation))
            .collect();
        for (device, generation) in here {
            match self.backlog(device, generation).await {
                Ok(notes) => {
                    for n in notes {
                        self.deliver_to(device, generation, n);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot attach device to its shard's owner");
                    let inner = self.lock();
                    if let Some(o) = inner.online.get(&device) {
                        if o.generation == generation {
                            let _ = o
                                .tx
                                .try_send(ConnCommand::Close(CloseReason::Shutdown, "reconnect"));
                        }
                    }
                }
            }
        }
    }

    /// Makes this courier a cluster node (once, right after open).
    pub fn join(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Adds revoked certificate serials (normalized); connected devices
    /// holding one are closed. A revocation is never taken back, so lists
    /// and notices from several sources only add: one read before a
    /// notice cannot undo it.
    pub fn revoke_serials(&self, serials: impl IntoIterator<Item = Vec<u8>>) {
        let mut inner = self.lock();
        let fresh: HashSet<Vec<u8>> = serials
            .into_iter()
            .filter(|s| !inner.revoked_serials.contains(s))
            .collect();
        if fresh.is_empty() {
            return;
        }
        for o in inner.online.values() {
            if fresh.contains(&o.serial) {
                let _ = o.tx.try_send(ConnCommand::Close(
                    CloseReason::Revoked,
                    "certificate revoked",
                ));
            }
        }
        inner.revoked_serials.extend(fresh);
    }

    /// Closes every device connection (shutdown).
    pub fn close_all(&self, reason: CloseReason, text: &'static str) {
        for o in self.lock().online.values() {
            let _ = o.tx.try_send(ConnCommand::Close(reason, text));
        }
    }

    /// Records where the sequence is now and returns the sequence number
    /// below which every message is older than `retention_s`.
    pub fn purge_cutoff(&self, now: i64, retention_s: i64) -> Option<i64> {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.push_back((now, self.seqs.next()));
        let mut cutoff = None;
        while marks.front().is_some_and(|(t, _)| *t <= now - retention_s) {
            cutoff = marks.pop_front().map(|(_, s)| s);
        }
        cutoff
    }

    /// A new message id: a UUID whose first 48 bits are the time in
    /// milliseconds (as UUIDv7), so ids the courier makes sort by time and
    /// their index grows at its end.
    pub fn new_id() -> Result<NotificationId, Error> {
        let mut b: [u8; 16] = random()?;
        b[..6].copy_from_slice(&(unix_now_ms() as u64).to_be_bytes()[2..]);
        b[6] = 0x70 | (b[6] & 0x0f);
        b[8] = 0x80 | (b[8] & 0x3f);
        Ok(NotificationId(b))
    }

    pub fn queued_total(&self) -> usize {
        self.lock().queues.total()
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        self.render_wake_metrics(out);
        let m = &self.metrics;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# TYPE parley_courier_connections gauge\nparley_courier_connections {}",
            g(&m.connections)
        );
        let _ = writeln!(
            out,
            "# TYPE parley_courier_queued gauge\nparley_courier_queued {}",
            self.queued_total()
        );
        let _ = writeln!(out, "# TYPE parley_courier_pushes_total counter");
        for (outcome, v) in [
            ("stored", &m.pushes_stored),
            ("sent_now", &m.pushes_sent_now),
            ("discarded", &m.pushes_discarded),
            ("rejected", &m.pushes_rejected),
        ] {
            let _ = writeln!(
                out,
                "parley_courier_pushes_total{{outcome=\"{outcome}\"}} {}",
                g(v)
            );
        }
        let _ = writeln!(out, "# TYPE parley_courier_messages_total counter");
        for (state, v) in [
            ("delivered", &m.delivered),
            ("dropped", &m.dropped),
            ("replaced", &m.collapsed),
            ("expired", &m.expired),
        ] {
            let _ = writeln!(
                out,
                "parley_courier_messages_total{{state=\"{state}\"}} {}",
                g(v)
            );
        }
        for (name, v) in [
            ("parley_courier_connects_total", &m.connects),
            ("parley_courier_replaced_connections_total", &m.replaced),
            ("parley_courier_commit_batches_total", &m.batches),
            ("parley_courier_committed_writes_total", &m.batched_writes),
            ("parley_courier_token_reads_total", &m.token_reads),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", g(v));
        }
        if let Some(c) = self.cluster.get() {
            c.render_metrics(out);
        }
    }
}

/// The fence for a write made under `lease`.
fn fence(lease: Option<(u16, i64)>) -> Option<Write> {
    lease.map(|(shard, term)| Write::Fence { shard, term })
}

fn entry(m: &StoredMessage) -> Entry {
    Entry {
        id: m.note.id,
        seq: m.seq as u64,
        token: m.note.token,
        collapse: m.note.collapse_id.as_str().into(),
        priority: m.note.priority,
        voip: m.note.push_type == PushType::Voip,
        expires: m.note.expires,
    }
}

/// The group-commit writer: takes whatever is waiting (up to `max_batch`
/// writes), commits it as one transaction, answers every waiter.
async fn writer(
    store: Store,
    mut rx: mpsc::Receiver<(Vec<Write>, Option<Reply>)>,
    max_batch: usize,
    metrics: Arc<Metrics>,
    receipts: Arc<Notify>,
) {
    let mut batch: Vec<Write> = Vec::new();
    // Per queued item: how many of the batch's writes are its, and who
    // waits for it.
    let mut items: Vec<(usize, Option<Reply>)> = Vec::new();
    while let Some((w, r)) = rx.recv().await {
        items.push((w.len(), r));
        batch.extend(w);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok((w, r)) => {
                    items.push((w.len(), r));
                    batch.extend(w);
                }
                Err(_) => break,
            }
        }
        let result = loop {
            let result = store.apply(&batch).await;
            metrics.batches.fetch_add(1, Ordering::Relaxed);
            metrics
                .batched_writes
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            match result {
                // A lease this node lost refuses its own writes only: the
                // rest of the batch (other shards' pushes and acks) is
                // tried again without them.
                Err(Error::Fenced(shard)) => {
                    tracing::warn!(
                        shard,
                        "writes for a shard this node no longer holds refused"
                    );
                    refuse_fenced(&mut batch, &mut items, shard);
                    if batch.is_empty() {
                        break Ok(());
                    }
                }
                r => break r.map_err(|e| e.to_string()),
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "commit failed");
        }
        for (_, r) in items.drain(..) {
            if let Some(r) = r {
                let _ = r.send(result.clone());
            }
        }
        if result.is_ok() && batch.iter().any(|w| matches!(w, Write::State { .. })) {
            receipts.notify_waiters();
        }
        batch.clear();
    }
}

/// Takes the items fenced by `shard` out of the batch and tells their
/// waiters so.
fn refuse_fenced(batch: &mut Vec<Write>, items: &mut Vec<(usize, Option<Reply>)>, shard: u16) {
    let mut all = std::mem::take(batch).into_iter();
    for (len, reply) in std::mem::take(items) {
        let writes: Vec<Write> = all.by_ref().take(len).collect();
        let fenced = writes
            .iter()
            .any(|w| matches!(w, Write::Fence { shard: s, .. } if *s == shard));
        if fenced {
            if let Some(r) = reply {
                let _ = r.send(Err(Error::Fenced(shard).to_string()));
            }
        } else {
            items.push((writes.len(), reply));
            batch.extend(writes);
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix milliseconds, as APNs error timestamps are written.
pub fn unix_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn random<const N: usize>() -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| Error::Internal("system random number generator failed".into()))?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn courier_ids_are_time_ordered_uuid_v7() {
        let a = Courier::new_id().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        let b = Courier::new_id().unwrap();
        assert!(a.0 < b.0, "later id sorts later");
        let u = b.to_uuid();
        assert_eq!(&u[14..15], "7", "version 7: {u}");
        assert!("89AB".contains(&u[19..20]), "RFC 4122 variant: {u}");
    }
}

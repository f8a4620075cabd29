//! Cluster mode: several couriers on one PostgreSQL database, talking over
//! NATS.
//!
//! Devices fall into [`SHARDS`] shards by the first byte of their id. One
//! node at a time owns a shard: it holds the shard's queue index (what
//! each device has waiting, collapse, cap, expiry), stores its pushes and
//! marks their acks. Ownership is a lease row per shard in the database
//! ([`crate::store::Store::claim_shards`]); every batch of writes for a
//! shard checks its lease term in the same transaction, so a node that
//! lost a lease (paused, cut off) cannot write after another took it, and
//! it stops serving the shard by its own clock before the lease ends in
//! the database.
//!
//! Providers and devices reach any node:
//! - a push for a device of another node's shard is forwarded to the
//!   owner (NATS request on `parley.courier.shard.<n>`), which stores it
//!   and answers; the provider's 2xx waits for that answer;
//! - a device connected to a node that does not own its shard is
//!   *attached* to the owner, which sends its backlog back and later
//!   deliveries to that node (`parley.courier.node.<node>`); acks and the
//!   end of the connection go to the owner the same way;
//! - a node that takes a shard over says so on `parley.courier.owners`,
//!   and nodes attach their connected devices of that shard to it;
//! - Parley's other services on other machines hand their pushes to any
//!   node on `parley.courier.submit` ([`crate::submit`]).
//!
//! NATS carries no state of its own: a message it loses is a delivery the
//! device gets with its backlog next time, or a request the provider is
//! answered 503 for and retries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use wire::push::{Frame, Notification, NotificationId};
use wire::DeviceId;

use crate::courier::{unix_now_ms, Accepted, Courier, PushError, PushOutcome};
use crate::error::Error;

/// Shards devices fall into: the first byte of the device id.
pub const SHARDS: u16 = 256;

/// The shard of `device`.
pub fn shard_of(device: &DeviceId) -> u16 {
    u16::from(device.0[0])
}

/// How long a forwarded request may take before the provider is told to
/// retry.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Shards a node gives up per lease round when it holds more than its
/// share, so that a joining node gets its share within a few rounds.
const RELEASE_PER_ROUND: usize = 64;

/// How a NATS connection starts: the operator's credentials and trusted
/// CAs. The courier adds its own name and callbacks to what this makes.
#[derive(Clone)]
pub struct NatsOptions(pub Arc<dyn Fn() -> async_nats::ConnectOptions + Send + Sync>);

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions(Arc::new(async_nats::ConnectOptions::new))
    }
}

impl std::fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Credentials stay out of logs.
        f.write_str("NatsOptions(..)")
    }
}

/// This node in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name: letters, digits, `-` and `_`; unique in the
    /// cluster.
    pub node: String,
    /// NATS server URLs (`nats://host:4222`), any of which will do.
    pub nats: Vec<String>,
    /// Shard lease length; a dead node's shards move within it and one
    /// lease round (a quarter of it). Default 6 s.
    pub lease: Duration,
    /// Credentials and trust for NATS. Default: none (a private network).
    pub options: NatsOptions,
}

impl ClusterConfig {
    pub fn new(node: impl Into<String>, nats: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            node: node.into(),
            nats,
            lease: Duration::from_secs(6),
            options: NatsOptions::default(),
        }
    }

    pub fn validate(&self) -> Result<(), Error> {
        let ok = !self.node.is_empty()
            && self.node.len() <= 64
            && self
                .node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(Error::Config(format!(
                "cluster node id {:?}: 1-64 letters, digits, '-' or '_'",
                self.node
            )));
        }
        if self.nats.is_empty() {
            return Err(Error::Config("cluster mode needs a NATS URL".into()));
        }
        if self.lease < Duration::from_secs(2) {
            return Err(Error::Config("cluster lease must be at least 2 s".into()));
        }
        Ok(())
    }
}

/// A request or notice for a shard's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum ShardMsg {
    /// A push validated by the node the provider reached.
    Push {
        device: String,
        now_or_never: bool,
        provider: String,
        receipt: Option<String>,
        created_at: i64,
        note: String,
    },
    /// The device is connected to `node` as `generation`; answered with
    /// its backlog.
    Attach {
        device: String,
        node: String,
        generation: u64,
    },
    /// The device acked these ids (UUIDs).
    Ack { device: String, ids: Vec<String> },
    /// The device's connection `generation` on `node` ended.
    Detach {
        device: String,
        node: String,
        generation: u64,
    },
}

/// A command for the node holding a device's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum NodeMsg {
    Deliver {
        device: String,
        generation: u64,
        note: String,
    },
    /// Another connection of the device took over.
    Close { device: String, generation: u64 },
}

/// The owner's answer to a [`ShardMsg`] request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Reply {
    Pushed {
        outcome: String,
    },
    Backlog {
        notes: Vec<String>,
    },
    /// The request reached a node that no longer owns the shard.
    NotOwner,
    Failed {
        reason: String,
    },
}

/// A notification as carried between nodes: its device-link frame, in
/// base64.
pub fn encode_note(n: &Notification) -> Result<String, Error> {
    let bytes = Frame::Notification(n.clone())
        .to_bytes()
        .map_err(|e| Error::Internal(format!("notification too large to forward: {e}")))?;
    Ok(base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes))
}

/// The inverse of [`encode_note`].
pub fn decode_note(s: &str) -> Option<Notification> {
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(s)
        .ok()?;
    match Frame::decode(&bytes) {
        Ok(Some((Frame::Notification(n), used))) if used == bytes.len() => Some(n),
        _ => None,
    }
}

/// Reads any cluster message; `None` for anything malformed.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

fn encode<T: Serialize>(msg: &T) -> bytes::Bytes {
    // Plain enums of strings and numbers always serialize.
    serde_json::to_vec(msg).unwrap_or_default().into()
}

fn shard_subject(shard: u16) -> String {
    format!("parley.courier.shard.{shard}")
}

fn node_subject(node: &str) -> String {
    format!("parley.courier.node.{node}")
}

/// Carries a shard's number when a node took it, or [`FREE`] when a node
/// gave shards up.
const OWNERS_SUBJECT: &str = "parley.courier.owners";
const FREE: &str = "free";

#[derive(Debug)]
struct Lease {
    term: i64,
    /// By this node's clock, a little before the database's expiry.
    valid_until: Instant,
    serving: JoinHandle<()>,
}

/// Counters for /metrics.
#[derive(Debug, Default)]
pub struct ClusterMetrics {
    pub nodes: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
    pub forward_micros: AtomicU64,
    pub shards_taken: AtomicU64,
    pub shards_lost: AtomicU64,
    pub shards_released: AtomicU64,
    pub remote_deliveries: AtomicU64,
}

/// This node's view of the cluster: its leases and its NATS connection.
#[derive(Debug)]
pub struct Cluster {
    pub config: ClusterConfig,
    nats: async_nats::Client,
    leases: Mutex<HashMap<u16, Lease>>,
    /// Runs a lease round now: another node gave shards up.
    round: tokio::sync::Notify,
    /// Each shard's (holder, term) as this node last read them, so that a
    /// change whose announcement NATS lost still re-attaches this node's
    /// devices of that shard. `None`: announced, not read since.
    seen: Mutex<HashMap<u16, Option<(String, i64)>>>,
    /// NATS came back after being away.
    reconnected: Arc<tokio::sync::Notify>,
    pub metrics: ClusterMetrics,
}

impl Cluster {
    /// Connects to NATS (retrying in the background if it is down: the
    /// node then reports unready and forwards nothing until it is up).
    pub async fn connect(config: ClusterConfig) -> Result<Cluster, Error> {
        config.validate()?;
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let events = reconnected.clone();
        let nats = (config.options.0)()
            .name(format!("parley-courier-{}", config.node))
            .event_callback(move |e| {
                let events = events.clone();
                async move {
                    match e {
                        async_nats::Event::Connected => events.notify_one(),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS connection lost; reconnecting")
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            // Back within a second or two of the server: a node without
            // NATS answers 503 for every device another node owns.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).min(2000))
            })
            .retry_on_initial_connect()
            .request_timeout(Some(REQUEST_TIMEOUT))
            .connect(config.nats.clone())
            .await
            .map_err(|e| Error::Config(format!("NATS {:?}: {e}", config.nats)))?;
        Ok(Cluster {
            config,
            nats,
            leases: Mutex::new(HashMap::new()),
            round: tokio::sync::Notify::new(),
            seen: Mutex::new(HashMap::new()),
            reconnected,
            metrics: ClusterMetrics::default(),
        })
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<u16, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The term of this node's lease on `shard`, if it holds one now.
    pub fn term(&self, shard: u16) -> Option<i64> {
        let leases = self.leases();
        let l = leases.get(&shard)?;
        (l.valid_until > Instant::now()).then_some(l.term)
    }

    /// Shards this node holds now.
    pub fn owned(&self) -> usize {
        let now = Instant::now();
        self.leases()
            .values()
            .filter(|l| l.valid_until > now)
            .count()
    }

    /// Whether NATS is connected.
    pub fn nats_up(&self) -> bool {
        self.nats.connection_state() == async_nats::connection::State::Connected
    }

    /// Forwards a validated push to the owner of `shard`; `None` when no
    /// node serves the shard right now.
    pub async fn forward_push(
        &self,
        shard: u16,
        a: &Accepted,
    ) -> Option<Result<PushOutcome, PushError>> {
        let note = match encode_note(&a.note) {
            Ok(n) => n,
            Err(e) => return Some(Err(PushError::Unavailable(e.to_string()))),
        };
        let msg = ShardMsg::Push {
            device: a.device.to_string(),
            now_or_never: a.now_or_never,
            provider: a.provider.clone(),
            receipt: a.receipt.clone(),
            created_at: a.created_at,
            note,
        };
        Some(match self.request(shard, &msg).await {
            Ok(Reply::Pushed { outcome }) => match outcome.as_str() {
                "stored" => Ok(PushOutcome::Stored),
                "sent_now" => Ok(PushOutcome::SentNow),
                _ => Ok(PushOutcome::Discarded),
            },
            Ok(Reply::NotOwner) => return None,
            Ok(Reply::Failed { reason }) => Err(PushError::Unavailable(reason)),
            Ok(_) => Err(PushError::Unavailable(
                "unexpected answer from the shard's owner".into(),
            )),
            Err(e) => Err(PushError::Unavailable(e)),
        })
    }

    /// Attaches a device connected here to its shard's owner; returns its
    /// backlog.
    pub async fn attach(
        &self,
        device: DeviceId,
        generation: u64,
    ) -> Result<Vec<Notification>, Error> {
        let msg = ShardMsg::Attach {
            device: device.to_string(),
            node: self.config.node.clone(),
            generation,
        };
        match self.request(shard_of(&device), &msg).await {
            Ok(Reply::Backlog { notes }) => {
                Ok(notes.iter().filter_map(|n| decode_note(n)).collect())
            }
            Ok(Reply::Failed { reason }) => Err(Error::Database(reason)),
            Ok(Reply::NotOwner) => Err(Error::NoOwner(shard_of(&device))),
            Ok(_) => Err(Error::Internal(
                "unexpected answer from the shard's owner".into(),
            )),
            Err(e) => Err(Error::Internal(e)),
        }
    }

    /// Tells the owner of the device's shard about acks.
    pub async fn ack(&self, device: DeviceId, ids: &[NotificationId]) {
        let msg = ShardMsg::Ack {
            device: device.to_string(),
            ids: ids.iter().map(|i| i.to_uuid()).collect(),
        };
        self.publish(shard_subject(shard_of(&device)), &msg).await;
    }

    /// Tells the owner of the device's shard that a connection ended.
    pub async fn detach(&self, device: DeviceId, generation: u64) {
        let msg = ShardMsg::Detach {
            device: device.to_string(),
            node: self.config.node.clone(),
            generation,
        };
        self.publish(shard_subject(shard_of(&device)), &msg).await;
    }

    /// Sends a command to the node holding a device's connection.
    pub async fn to_node(&self, node: &str, msg: &NodeMsg) {
        if matches!(msg, NodeMsg::Deliver { .. }) {
            self.metrics
                .remote_deliveries
                .fetch_add(1, Ordering::Relaxed);
        }
        self.publish(node_subject(node), msg).await;
    }

    async fn publish<T: Serialize>(&self, subject: String, msg: &T) {
        if let Err(e) = self.nats.publish(subject, encode(msg)).await {
            tracing::debug!(error = %e, "NATS publish failed");
        }
    }

    async fn request(&self, shard: u16, msg: &ShardMsg) -> Result<Reply, String> {
        let started = Instant::now();
        let r = self.nats.request(shard_subject(shard), encode(msg)).await;
        let m = &self.metrics;
        m.forwarded.fetch_add(1, Ordering::Relaxed);
        m.forward_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match r {
            Ok(reply) => decode(&reply.payload).ok_or_else(|| {
                m.forward_failures.fetch_add(1, Ordering::Relaxed);
                "malformed answer from the shard's owner".to_owned()
            }),
            // Nobody serves the shard's subject: as if its last owner had
            // answered that it owns it no more.
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => Ok(Reply::NotOwner),
            Err(e) => {
                m.forward_failures.fetch_add(1, Ordering::Relaxed);
                Err(match e.kind() {
                    async_nats::RequestErrorKind::TimedOut => {
                        "the shard's owner did not answer; retry".to_owned()
                    }
                    _ => format!("cluster messaging unavailable: {e}"),
                })
            }
        }
    }

    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let m = &self.metrics;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# TYPE parley_courier_cluster_nodes gauge\nparley_courier_cluster_nodes {}",
            g(&m.nodes)
        );
        let _ = writeln!(
            out,
            "# TYPE parley_courier_shards_owned gauge\nparley_courier_shards_owned {}",
            self.owned()
        );
        let _ = writeln!(
            out,
            "# TYPE parley_courier_nats_up gauge\nparley_courier_nats_up {}",
            u8::from(self.nats_up())
        );
        let _ = writeln!(
            out,
            "# TYPE parley_courier_forward_seconds summary\n\
             parley_courier_forward_seconds_sum {:.6}\nparley_courier_forward_seconds_count {}",
            g(&m.forward_micros) as f64 / 1e6,
            g(&m.forwarded)
        );
        for (name, v) in [
            ("parley_courier_forward_failures_total", &m.forward_failures),
            ("parley_courier_shards_taken_total", &m.shards_taken),
            ("parley_courier_shards_lost_total", &m.shards_lost),
            ("parley_courier_shards_released_total", &m.shards_released),
            (
                "parley_courier_remote_deliveries_total",
                &m.remote_deliveries,
            ),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", g(v));
        }
    }
}

/// Runs this node's part of the cluster until `shutdown`: the node's own
/// subject, owner announcements and the lease rounds. On shutdown the
/// node's leases are given up so that others take them at once.
pub async fn run(courier: Arc<Courier>, cluster: Arc<Cluster>, shutdown: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    match cluster
        .nats
        .subscribe(node_subject(&cluster.config.node))
        .await
    {
        Ok(sub) => tasks.push(tokio::spawn(node_commands(courier.clone(), sub))),
        Err(e) => tracing::error!(error = %e, "cannot subscribe to this node's subject"),
    }
    tasks.push(tokio::spawn(crate::submit::serve(
        courier.clone(),
        cluster.nats.clone(),
    )));
    match cluster.nats.subscribe(OWNERS_SUBJECT).await {
        Ok(sub) => tasks.push(tokio::spawn(owner_changes(
            courier.clone(),
            cluster.clone(),
            sub,
        ))),
        Err(e) => tracing::error!(error = %e, "cannot subscribe to owner changes"),
    }
    tasks.push(tokio::spawn({
        let (courier, cluster) = (courier.clone(), cluster.clone());
        async move {
            loop {
                cluster.reconnected.notified().await;
                courier.reattach_where(|_| true).await;
            }
        }
    }));
    lease_rounds(&courier, &cluster, shutdown).await;
    for t in tasks {
        t.abort();
    }
    let held: Vec<(u16, i64)> = cluster
        .leases()
        .drain()
        .map(|(s, l)| {
            l.serving.abort();
            (s, l.term)
        })
        .collect();
    for (shard, term) in held {
        courier.drop_shard(shard);
        let _ = courier
            .store
            .release_shard(&cluster.config.node, shard, term)
            .await;
    }
}

async fn lease_rounds(
    courier: &Arc<Courier>,
    cluster: &Arc<Cluster>,
    mut shutdown: watch::Receiver<bool>,
) {
    let lease = cluster.config.lease;
    let mut tick = tokio::time::interval(lease / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    if let Err(e) = courier.store.ensure_shards(SHARDS).await {
        tracing::warn!(error = %e, "cannot create shard lease rows; retrying");
    }
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.round.notified() => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = lease_round(courier, cluster).await {
            tracing::warn!(error = %e, "shard lease round failed");
        }
    }
}

/// One round: say this node is alive, extend its leases, drop what it
/// lost, then take or give shards towards an even share.
async fn lease_round(courier: &Arc<Courier>, cluster: &Arc<Cluster>) -> Result<(), Error> {
    let node = cluster.config.node.clone();
    let lease = cluster.config.lease;
    // Leases end a second early by this node's clock, for the time the
    // round trip took and for clocks that drift.
    let margin = Duration::from_secs(1);
    let started = Instant::now();
    let now_ms = unix_now_ms();
    let until_ms = now_ms + lease.as_millis() as i64;
    // Shards past their time by this node's clock are dropped whatever
    // the database says.
    lose(courier, cluster, |_, l| l.valid_until <= started);
    let nodes = courier.store.heartbeat(&node, until_ms, now_ms).await?;
    cluster.metrics.nodes.store(nodes as u64, Ordering::Relaxed);
    let renewed: HashMap<u16, i64> = courier
        .store
        .renew_shards(&node, until_ms, now_ms)
        .await?
        .into_iter()
        .collect();
    let valid_until = started + lease - margin;
    lose(courier, cluster, |shard, _| !renewed.contains_key(&shard));
    let mut fresh = Vec::new();
    {
        let mut leases = cluster.leases();
        for (shard, term) in &renewed {
            match leases.get_mut(shard) {
                Some(l) if l.term == *term => l.valid_until = valid_until,
                _ => fresh.push((*shard, *term)),
            }
        }
        drop(leases);
    }
    let held = renewed.len() - fresh.len();
    let share = usize::from(SHARDS).div_ceil(nodes);
    if held + fresh.len() < share {
        fresh.extend(
            courier
                .store
                .claim_shards(&node, share - held - fresh.len(), until_ms, now_ms)
                .await?,
        );
    }
    take(courier, cluster, fresh, valid_until).await;
    let extra: Vec<(u16, i64)> = {
        let leases = cluster.leases();
        let over = leases.len().saturating_sub(share);
        leases
            .iter()
            .take(over.min(RELEASE_PER_ROUND))
            .map(|(s, l)| (*s, l.term))
            .collect()
    };
    let mut released = false;
    for (shard, term) in extra {
        if let Some(l) = cluster.leases().remove(&shard) {
            l.serving.abort();
        }
        courier.drop_shard(shard);
        courier.store.release_shard(&node, shard, term).await?;
        cluster
            .metrics
            .shards_released
            .fetch_add(1, Ordering::Relaxed);
        released = true;
    }
    if released {
        // Whoever is short of shards takes them now, not at its next
        // round: until then the shard has no owner and its pushes get 503.
        let _ = cluster.nats.publish(OWNERS_SUBJECT, FREE.into()).await;
    }
    for shard in missed_changes(cluster, courier.store.shard_leases().await?) {
        let courier = courier.clone();
        tokio::spawn(async move { courier.reattach(shard).await });
    }
    Ok(())
}

/// The shards of another node whose owner changed since the last read
/// without this node hearing of it (NATS is at-most-once).
fn missed_changes(cluster: &Cluster, leases: Vec<(u16, String, i64, i64)>) -> Vec<u16> {
    let now = unix_now_ms();
    let mut seen = cluster.seen.lock().unwrap_or_else(|p| p.into_inner());
    let first = seen.is_empty();
    let mut missed = Vec::new();
    for (shard, holder, term, expires) in leases {
        if expires <= now || holder == cluster.config.node {
            continue;
        }
        let now_held = Some((holder, term));
        match seen.insert(shard, now_held.clone()) {
            Some(before @ Some(_)) if before != now_held => missed.push(shard),
            None if !first => missed.push(shard),
            _ => {}
        }
    }
    missed
}

/// Drops the shards whose leases match `lost`.
fn lose(courier: &Courier, cluster: &Cluster, lost: impl Fn(u16, &Lease) -> bool) {
    let gone: Vec<u16> = {
        let mut leases = cluster.leases();
        let gone: Vec<u16> = leases
            .iter()
            .filter(|(s, l)| lost(**s, l))
            .map(|(s, _)| *s)
            .collect();
        for s in &gone {
            if let Some(l) = leases.remove(s) {
                l.serving.abort();
            }
        }
        gone
    };
    for shard in gone {
        tracing::warn!(shard, "shard lease lost");
        cluster.metrics.shards_lost.fetch_add(1, Ordering::Relaxed);
        courier.drop_shard(shard);
    }
}

/// Takes shards over: loads their queue index (one query for all), serves
/// their subjects, and tells the other nodes.
async fn take(
    courier: &Arc<Courier>,
    cluster: &Arc<Cluster>,
    shards: Vec<(u16, i64)>,
    valid_until: Instant,
) {
    if shards.is_empty() {
        return;
    }
    let numbers: Vec<u16> = shards.iter().map(|(s, _)| *s).collect();
    if let Err(e) = courier.load_shards(&numbers).await {
        tracing::warn!(error = %e, "cannot load shard queues; leaving the leases to expire");
        return;
    }
    // Wake-ups the shards' last owner had not sent.
    let bytes: Vec<u8> = numbers
        .iter()
        .filter_map(|s| u8::try_from(*s).ok())
        .collect();
    courier.resume_owed(Some(&bytes)).await;
    for (shard, term) in shards {
        let sub = match cluster.nats.subscribe(shard_subject(shard)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard, error = %e, "cannot serve shard subject");
                courier.drop_shard(shard);
                continue;
            }
        };
        let serving = tokio::spawn(serve_shard(courier.clone(), cluster.clone(), shard, sub));
        cluster.leases().insert(
            shard,
            Lease {
                term,
                valid_until,
                serving,
            },
        );
        cluster.metrics.shards_taken.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(shard, term, "shard taken");
        let _ = cluster
            .nats
            .publish(OWNERS_SUBJECT, shard.to_string().into())
            .await;
    }
}

/// Answers requests for one owned shard.
async fn serve_shard(
    courier: Arc<Courier>,
    cluster: Arc<Cluster>,
    shard: u16,
    mut sub: async_nats::Subscriber,
) {
    while let Some(m) = sub.next().await {
        let courier = courier.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let reply = match decode::<ShardMsg>(&m.payload) {
                Some(msg) => on_shard_msg(&courier, &cluster, shard, msg).await,
                None => Some(Reply::Failed {
                    reason: "malformed request".into(),
                }),
            };
            if let (Some(to), Some(reply)) = (m.reply, reply) {
                let _ = cluster.nats.publish(to, encode(&reply)).await;
            }
        });
    }
}

async fn on_shard_msg(
    courier: &Courier,
    cluster: &Cluster,
    shard: u16,
    msg: ShardMsg,
) -> Option<Reply> {
    let device_of = |d: &str| d.parse::<DeviceId>().ok().filter(|d| shard_of(d) == shard);
    // Checked again here: after a pause the lease may have ended before
    // the round that drops it has run.
    let Some(term) = cluster.term(shard) else {
        return Some(Reply::NotOwner);
    };
    match msg {
        ShardMsg::Push {
            device,
            now_or_never,
            provider,
            receipt,
            created_at,
            note,
        } => {
            let (Some(device), Some(note)) = (device_of(&device), decode_note(&note)) else {
                return Some(Reply::Failed {
                    reason: "malformed push".into(),
                });
            };
            let a = Accepted {
                device,
                note,
                receipt,
                provider,
                created_at,
                now_or_never,
            };
            Some(match courier.accept(a, Some((shard, term))).await {
                Ok(o) => Reply::Pushed {
                    outcome: match o {
                        PushOutcome::Stored => "stored",
                        PushOutcome::SentNow => "sent_now",
                        PushOutcome::Discarded => "discarded",
                    }
                    .into(),
                },
                Err(e) => Reply::Failed {
                    reason: e.to_string(),
                },
            })
        }
        ShardMsg::Attach {
            device,
            node,
            generation,
        } => {
            let Some(device) = device_of(&device) else {
                return Some(Reply::Failed {
                    reason: "malformed device id".into(),
                });
            };
            Some(
                match courier.attach_remote(device, &node, generation).await {
                    Ok(notes) => Reply::Backlog {
                        notes: notes.iter().filter_map(|n| encode_note(n).ok()).collect(),
                    },
                    Err(e) => Reply::Failed {
                        reason: e.to_string(),
                    },
                },
            )
        }
        ShardMsg::Ack { device, ids } => {
            if let Some(device) = device_of(&device) {
                let ids = ids
                    .iter()
                    .filter_map(|i| NotificationId::from_uuid(i))
                    .collect();
                courier.acked_here(device, ids, Some((shard, term)));
            }
            None
        }
        ShardMsg::Detach {
            device,
            node,
            generation,
        } => {
            if let Some(device) = device_of(&device) {
                courier.detach_remote(device, &node, generation);
            }
            None
        }
    }
}

/// Commands from owners for connections on this node.
async fn node_commands(courier: Arc<Courier>, mut sub: async_nats::Subscriber) {
    while let Some(m) = sub.next().await {
        match decode::<NodeMsg>(&m.payload) {
            Some(NodeMsg::Deliver {
                device,
                generation,
                note,
            }) => {
                if let (Ok(device), Some(note)) = (device.parse(), decode_note(&note)) {
                    courier.deliver_to(device, generation, note);
                }
            }
            Some(NodeMsg::Close { device, generation }) => {
                if let Ok(device) = device.parse() {
                    courier.replaced(device, generation);
                }
            }
            None => tracing::debug!("malformed node command"),
        }
    }
}

/// A shard changed owner: this node's connected devices of it attach to
/// the new owner. Shards were given up: this node runs a lease round.
async fn owner_changes(
    courier: Arc<Courier>,
    cluster: Arc<Cluster>,
    mut sub: async_nats::Subscriber,
) {
    while let Some(m) = sub.next().await {
        if &m.payload[..] == FREE.as_bytes() {
            cluster.round.notify_one();
            continue;
        }
        let Some(shard) = std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse::<u16>().ok())
        else {
            continue;
        };
        // Heard: the next read of the leases takes the new owner as
        // known.
        cluster
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, None);
        let courier = courier.clone();
        tokio::spawn(async move { courier.reattach(shard).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::push::{DeviceToken, PushType};

    #[test]
    fn notes_survive_the_trip_between_nodes() {
        let n = Notification {
            id: NotificationId([7; 16]),
            token: DeviceToken([9; wire::push::TOKEN_LEN]),
            push_type: PushType::Voip,
            priority: 10,
            expires: 1_900_000_000,
            collapse_id: "c".into(),
            topic: "com.example.app.voip".into(),
            payload: b"{\"aps\":{}}".to_vec(),
        };
        let s = encode_note(&n).unwrap();
        assert_eq!(decode_note(&s), Some(n));
        assert_eq!(decode_note("not base64!"), None);
        assert_eq!(decode_note(&s[..s.len() - 4]), None, "truncated");
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let m = ShardMsg::Attach {
            device: "00".repeat(16),
            node: "a".into(),
            generation: 3,
        };
        assert_eq!(decode::<ShardMsg>(&encode(&m)), Some(m));
        assert_eq!(decode::<ShardMsg>(b"{\"t\":\"nope\"}"), None);
        assert_eq!(decode::<Reply>(b""), None);
    }

    #[test]
    fn node_ids_must_be_subject_safe() {
        let ok = ClusterConfig::new("node-1_a", vec!["nats://127.0.0.1:4222".into()]);
        assert!(ok.validate().is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>"] {
            let c = ClusterConfig::new(bad, vec!["nats://127.0.0.1:4222".into()]);
            assert!(c.validate().is_err(), "{bad:?}");
        }
        assert!(ClusterConfig::new("a", vec![]).validate().is_err());
    }

    #[tokio::test]
    async fn owner_changes_nats_lost_are_found_in_the_lease_rows() {
        let cluster = Cluster::connect(ClusterConfig::new("me", vec!["nats://127.0.0.1:9".into()]))
            .await
            .unwrap();
        let later = unix_now_ms() + 60_000;
        let row = |s: u16, h: &str, t: i64| (s, h.to_owned(), t, later);
        // First read: nothing to catch up on.
        assert!(missed_changes(&cluster, vec![row(1, "a", 1), row(2, "b", 1)]).is_empty());
        // Shard 1 moved without a word: found. Shard 2 moved and was
        // announced: not again.
        cluster.seen.lock().unwrap().insert(2, None);
        let missed = missed_changes(&cluster, vec![row(1, "c", 2), row(2, "c", 2)]);
        assert_eq!(missed, vec![1]);
        // Unchanged, or now this node's own: nothing.
        assert!(missed_changes(&cluster, vec![row(1, "c", 2), row(2, "me", 3)]).is_empty());
    }

    #[test]
    fn shards_follow_the_first_byte() {
        let mut d = DeviceId([0; 16]);
        d.0[0] = 0xab;
        assert_eq!(shard_of(&d), 0xab);
        assert!(d.to_string().starts_with("ab"));
    }
}

//! The sans-IO STUN/TURN server: bytes and `now` in, bytes and timeouts out.
//!
//! One [`Server`] serves one worker's sockets. Workers share a [`Shared`]
//! (credentials, nonce key, peer policy, quotas) so a quota holds across
//! cores. The server never touches sockets or clocks:
//!
//! - [`Server::handle_client_input`] takes a datagram (or one framed message
//!   from a stream) from a client. ChannelData and Send indications come back
//!   as [`ClientOutcome::Forward`], a range of the input to send from a relay
//!   socket, so the data path copies and allocates nothing.
//! - [`Server::handle_peer_input`] takes a datagram that arrived on a relay
//!   socket and says how to wrap it for the client.
//! - Control responses are queued for [`Server::poll_transmit`]; relay
//!   sockets to open and close come from [`Server::poll_event`], and the
//!   runtime reports each bind back through [`Server::handle_relay_bound`].
//! - [`Server::poll_timeout`] and [`Server::handle_timeout`] expire
//!   allocations, permissions and channels.

mod allocate;
mod allocation;
pub mod auth;
pub mod policy;
mod quota;
mod reply;
mod tcp_relay;

use crate::channel_data::{self, ChannelNumber};
use crate::config::Config;
use crate::message::attr::{decode_family, Family};
use crate::message::{
    AttrType, Class, ErrorCode, IntegrityKind, Message, MessageBuilder, Method, PasswordAlgorithm,
    TransactionId,
};
use crate::metrics::{AuthFailure, Metrics};
use allocation::{Allocation, Channel, TokenBucket};
use auth::{Credentials, Lookup, NonceError, NonceKey};
use policy::PeerPolicy;
use quota::Quotas;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rustc_hash::{FxHashMap, FxHashSet};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// The transport a client reached us on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// A client's 5-tuple: transport, its address, and our local address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    pub transport: Transport,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// A relay socket, named by the core; the runtime maps it to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub u32);

/// A control message for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub to: ClientAddr,
    /// Our local address to send from; differs from `to.local` only for an
    /// RFC 5780 CHANGE-REQUEST answer.
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
}

/// Work for the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bind a UDP relay socket at `addr` and report with `handle_relay_bound`.
    /// `dont_fragment`: the client sent DONT-FRAGMENT, so set the IP DF bit.
    /// With `tcp`, listen for peer connections there instead (RFC 6062).
    BindRelay {
        relay: RelayId,
        addr: SocketAddr,
        dont_fragment: bool,
        tcp: bool,
    },
    /// Close a relay socket; its allocation is gone.
    ReleaseRelay { relay: RelayId },
    /// Keep UDP port `addr` bound and unused until `until` (an EVEN-PORT
    /// reservation, RFC 8656 §7.2), so no other process takes it before
    /// the RESERVATION-TOKEN allocation: that allocation's `BindRelay` for
    /// `addr` then takes the held socket over.
    HoldPort { addr: SocketAddr, until: Instant },
    /// Open a TCP connection from the relayed address `from` to `peer` and
    /// report with `handle_peer_connected` (RFC 6062 Connect).
    ConnectPeer {
        conn: ConnectionId,
        from: SocketAddr,
        peer: SocketAddr,
    },
    /// The stream client `client` bound peer connection `conn`: after the
    /// queued success response, relay raw bytes between the two.
    Splice {
        conn: ConnectionId,
        client: ClientAddr,
    },
    /// Close peer connection `conn` (and its data connection, if spliced).
    ClosePeer { conn: ConnectionId },
}

/// An RFC 6062 connection id, unique across the server's workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u32);

/// What to do with a client datagram after [`Server::handle_client_input`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOutcome {
    /// Nothing to forward; responses, if any, are queued.
    Handled,
    /// Send `input[payload]` from relay socket `relay` to `peer`.
    Forward {
        relay: RelayId,
        peer: SocketAddr,
        payload: Range<usize>,
    },
}

/// How to deliver a datagram that arrived from a peer.
#[derive(Debug, PartialEq, Eq)]
pub enum PeerOutcome<'s> {
    Drop,
    /// Prefix the payload with the ChannelData header for `channel`.
    ChannelData {
        to: ClientAddr,
        channel: ChannelNumber,
    },
    /// Send this Data indication, which already carries the payload.
    Indication {
        to: ClientAddr,
        message: &'s [u8],
    },
}

/// State shared by every worker of one server.
#[derive(Debug)]
pub struct Shared {
    config: Config,
    credentials: RwLock<Arc<Credentials>>,
    nonce: NonceKey,
    policy: PeerPolicy,
    quotas: Mutex<Quotas>,
    /// RESERVATION-TOKEN → (reserved relay address, expiry). Shared because
    /// the second Allocate of a pair may hash to another worker.
    reservations: Mutex<FxHashMap<[u8; 8], (SocketAddr, Instant)>>,
    /// RFC 6062 connections by id, shared because a data connection may be
    /// accepted by another worker than the one holding the allocation.
    connections: Mutex<FxHashMap<u32, tcp_relay::ConnEntry>>,
    /// Maps monotonic time to Unix time: the wall clock enters only here,
    /// as an argument, so simulated time drives REST expiry and nonces.
    epoch: (Instant, u64),
}

impl Shared {
    /// `own_sockets` are the server's listening addresses (never a peer);
    /// `unix_now` is the wall-clock time at `now`.
    pub fn new(
        config: Config,
        nonce_secret: [u8; 32],
        own_sockets: Vec<SocketAddr>,
        now: Instant,
        unix_now: u64,
    ) -> Arc<Self> {
        let mut own_ips: Vec<IpAddr> = own_sockets
            .iter()
            .map(|s| s.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        own_ips.extend(config.relay_ipv4);
        own_ips.extend(config.relay_ipv6);
        own_ips.extend(config.external_ipv4);
        let policy = PeerPolicy::new(
            config.allow_peers.clone(),
            config.deny_peers.clone(),
            own_ips,
            own_sockets,
        );
        let credentials = Credentials::new(&config.realm, &config.users, &config.rest_secrets);
        Arc::new(Shared {
            credentials: RwLock::new(Arc::new(credentials)),
            nonce: NonceKey::new(&nonce_secret),
            policy,
            quotas: Mutex::new(Quotas::default()),
            reservations: Mutex::new(FxHashMap::default()),
            connections: Mutex::new(FxHashMap::default()),
            epoch: (now, unix_now),
            config,
        })
    }

    /// Replaces static users and REST secrets (SIGHUP). Existing allocations
    /// stay; their next Refresh authenticates against the new table.
    pub fn set_credentials(&self, users: &[(String, String)], rest_secrets: &[String]) {
        let c = Arc::new(Credentials::new(&self.config.realm, users, rest_secrets));
        // A poisoned lock only means another thread panicked mid-swap of an Arc.
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = c;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn credentials(&self) -> Arc<Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reserve(&self, token: [u8; 8], addr: SocketAddr, until: Instant, now: Instant) {
        let mut r = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        r.retain(|_, (_, exp)| *exp > now);
        r.insert(token, (addr, until));
    }

    fn take_reservation(&self, token: &[u8; 8], now: Instant) -> Option<SocketAddr> {
        let mut r = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        r.remove(token)
            .filter(|(_, exp)| *exp > now)
            .map(|(a, _)| a)
    }

    fn is_reserved(&self, addr: SocketAddr, now: Instant) -> bool {
        let r = self.reservations.lock().unwrap_or_else(|e| e.into_inner());
        r.values().any(|&(a, exp)| a == addr && exp > now)
    }

    fn unix(&self, now: Instant) -> u64 {
        self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_secs()
    }
}

/// How long an expired channel's number and peer stay reserved (RFC 8656 §12).
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// How long an EVEN-PORT reservation of the next port lasts (RFC 8656 §7.2).
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// Relay ports to try before giving up with 508.
const BIND_ATTEMPTS: u32 = 8;
const MAX_TEXT: usize = 763;

/// Authenticated request context.
#[derive(Debug, Clone)]
struct Auth {
    username: String,
    key: Vec<u8>,
    kind: IntegrityKind,
}

/// Response options that follow from the request.
#[derive(Debug, Clone, Copy)]
struct Reply {
    to: ClientAddr,
    method: Method,
    tid: TransactionId,
    fingerprint: bool,
}

/// An Allocate waiting for its relay sockets.
#[derive(Debug)]
struct Pending {
    reply: Reply,
    auth: Auth,
    lifetime: Duration,
    wanted: Vec<Family>,
    bound: Vec<(Family, RelayId, SocketAddr)>,
    /// Family, relay, attempts so far, port being bound.
    waiting: Vec<(Family, RelayId, u32, u16)>,
    address_error: Option<(Family, ErrorCode)>,
    dont_fragment: bool,
    /// EVEN-PORT: `Some(reserve_next)`.
    even: Option<bool>,
    /// A TCP allocation (REQUESTED-TRANSPORT 6, RFC 6062).
    tcp: bool,
}

/// One worker's sans-IO STUN/TURN server.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    rng: StdRng,
    worker: u16,
    workers: u16,
    slots: Vec<Option<Allocation>>,
    free_slots: Vec<usize>,
    by_client: FxHashMap<ClientAddr, usize>,
    by_relay: FxHashMap<RelayId, usize>,
    pending: FxHashMap<ClientAddr, Pending>,
    pending_relay: FxHashMap<RelayId, ClientAddr>,
    used_ports: FxHashSet<(Family, u16)>,
    next_relay: u32,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Connect requests waiting for the runtime's TCP handshake.
    connecting: FxHashMap<ConnectionId, (Reply, Auth, usize)>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
}

impl Server {
    /// A worker `worker` of `workers`; relay ports are split between
    /// workers by `port % workers` so they never collide.
    pub fn new(
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        worker: u16,
        workers: u16,
        seed: u64,
    ) -> Self {
        Server {
            shared,
            metrics,
            rng: StdRng::seed_from_u64(seed),
            worker,
            workers: workers.max(1),
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_client: FxHashMap::default(),
            by_relay: FxHashMap::default(),
            pending: FxHashMap::default(),
            pending_relay: FxHashMap::default(),
            used_ports: FxHashSet::default(),
            next_relay: 1,
            timers: BinaryHeap::new(),
            connecting: FxHashMap::default(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::with_capacity(2048),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether `client` holds an allocation here.
    pub fn has_allocation(&self, client: &ClientAddr) -> bool {
        self.by_client.contains_key(client)
    }

    /// Number of live allocations on this worker.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Handles one datagram, or one framed message of a stream, from a client.
    pub fn handle_client_input(
        &mut self,
        from: ClientAddr,
        bytes: &[u8],
        now: Instant,
    ) -> ClientOutcome {
        if channel_data::is_channel_data(bytes) {
            return self.handle_channel_data(from, bytes, now);
        }
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.metrics
                    .malformed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(error = %e, "malformed STUN message");
                self.answer_undecodable(from, bytes);
                return ClientOutcome::Handled;
            }
        };
        match (msg.class(), msg.method()) {
            (Class::Request, Method::Binding) => self.handle_binding(from, &msg),
            (Class::Indication, Method::Send) => return self.handle_send(from, &msg, now),
            (
                Class::Request,
                Method::Allocate
                | Method::Refresh
                | Method::CreatePermission
                | Method::ChannelBind
                | Method::Connect
                | Method::ConnectionBind,
            ) => {
                if msg.is_classic() {
                    self.error(reply_for(from, &msg), ErrorCode::BAD_REQUEST, None);
                } else {
                    self.handle_authenticated(from, &msg, now);
                }
            }
            (Class::Request, _) => self.error(reply_for(from, &msg), ErrorCode::BAD_REQUEST, None),
            // Binding indications are keepalives; responses are not ours to take.
            _ => {}
        }
        ClientOutcome::Handled
    }

    /// Handles a datagram that arrived on relay socket `relay` from `peer`.
    pub fn handle_peer_input(
        &mut self,
        relay: RelayId,
        peer: SocketAddr,
        payload: &[u8],
        now: Instant,
    ) -> PeerOutcome<'_> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(&slot) = self.by_relay.get(&relay) else {
            return PeerOutcome::Drop;
        };
        let Some(a) = self.slots[slot].as_mut() else {
            return PeerOutcome::Drop;
        };
        if !a.has_permission(peer.ip(), now) {
            self.metrics.dropped_no_permission.fetch_add(1, Relaxed);
            return PeerOutcome::Drop;
        }
        if !a.down.take(payload.len() as u64, now) {
            self.metrics.dropped_rate_limited.fetch_add(1, Relaxed);
            return PeerOutcome::Drop;
        }
        self.metrics.packets_to_client.fetch_add(1, Relaxed);
        self.metrics
            .bytes_to_client
            .fetch_add(payload.len() as u64, Relaxed);
        let to = a.client;
        if let Some(ch) = a.channel_for(peer, now) {
            return PeerOutcome::ChannelData { to, channel: ch };
        }
        // Data indication (RFC 8656 §11.6); a TCP client needs no padding
        // beyond the STUN attribute padding already in the message.
        let mut tid = [0u8; 12];
        self.rng.fill(&mut tid);
        let mut b = MessageBuilder::new(
            &mut self.scratch,
            Class::Indication,
            Method::Data,
            TransactionId(tid),
        );
        b.add_xor_address(AttrType::XorPeerAddress, peer);
        b.add_attr(AttrType::Data, payload);
        PeerOutcome::Indication {
            to,
            message: &self.scratch,
        }
    }

    /// Reports the result of an [`Event::BindRelay`]: the bound address, or
    /// `None` when the port was taken.
    pub fn handle_relay_bound(&mut self, relay: RelayId, bound: Option<SocketAddr>, now: Instant) {
        let Some(client) = self.pending_relay.remove(&relay) else {
            return;
        };
        let Some(mut p) = self.pending.remove(&client) else {
            return;
        };
        let Some(i) = p.waiting.iter().position(|w| w.1 == relay) else {
            return;
        };
        let (family, _, attempts, port) = p.waiting.swap_remove(i);
        match bound {
            Some(addr) => p.bound.push((family, relay, addr)),
            None => {
                // Another process holds the port; pick again, then free it
                // so a later allocation may try it once more.
                let even = p.even;
                let retry = (attempts + 1 < BIND_ATTEMPTS)
                    .then(|| self.pick_relay(family, even, now))
                    .flatten();
                self.used_ports.remove(&(family, port));
                if let Some((id, addr)) = retry {
                    self.request_bind(&mut p, client, family, id, addr, attempts + 1);
                } else if p.address_error.is_none() && p.wanted.len() > 1 {
                    p.address_error = Some((family, ErrorCode::INSUFFICIENT_CAPACITY));
                }
            }
        }
        if !p.waiting.is_empty() {
            self.pending.insert(client, p);
            return;
        }
        self.finish_allocate(client, p, now);
    }

    /// A stream client's connection closed: its allocation goes with it
    /// (RFC 8656 §3.1, allocations over TCP live as long as the connection).
    pub fn handle_client_closed(&mut self, client: ClientAddr) {
        if let Some(p) = self.pending.remove(&client) {
            for (_, relay, _, _) in p.waiting {
                self.pending_relay.remove(&relay);
            }
            for (_, relay, _) in p.bound {
                self.events.push_back(Event::ReleaseRelay { relay });
            }
            self.release_quota(&p.auth.username, client.remote.ip());
        }
        if let Some(&slot) = self.by_client.get(&client) {
            self.delete_allocation(slot);
        }
    }

    /// Expires allocations, permissions and channels due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((at, slot))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(a) = self.slots[slot].as_mut() else {
                continue;
            };
            if a.scheduled != Some(at) {
                continue;
            }
            a.scheduled = None;
            if a.expires <= now {
                tracing::debug!(user = %redact(&a.username), "allocation expired");
                self.delete_allocation(slot);
                continue;
            }
            let (perms, chans) = a.sweep(now, CHANNEL_COOLDOWN);
            self.expire_connections(slot, now);
            self.metrics
                .permissions
                .fetch_sub(perms as i64, std::sync::atomic::Ordering::Relaxed);
            self.metrics
                .channels
                .fetch_sub(chans as i64, std::sync::atomic::Ordering::Relaxed);
            self.schedule(slot);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops every allocation (graceful shutdown), releasing quotas and sockets.
    pub fn shutdown(&mut self) {
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                self.delete_allocation(slot);
            }
        }
    }

    fn handle_channel_data(
        &mut self,
        from: ClientAddr,
        bytes: &[u8],
        now: Instant,
    ) -> ClientOutcome {
        use std::sync::atomic::Ordering::Relaxed;
        let Ok((ch, range)) = channel_data::decode(bytes) else {
            self.metrics.malformed.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        };
        let Some(&slot) = self.by_client.get(&from) else {
            return ClientOutcome::Handled;
        };
        let Some(a) = self.slots[slot].as_mut() else {
            return ClientOutcome::Handled;
        };
        let Some(peer) = a
            .channels
            .get(&ch.get())
            .filter(|c| c.expires > now)
            .map(|c| c.peer)
        else {
            return ClientOutcome::Handled;
        };
        if !a.up.take(range.len() as u64, now) {
            self.metrics.dropped_rate_limited.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        }
        let Some(relay) = a.relay_for(peer) else {
            return ClientOutcome::Handled;
        };
        self.metrics.packets_to_peer.fetch_add(1, Relaxed);
        self.metrics
            .bytes_to_peer
            .fetch_add(range.len() as u64, Relaxed);
        ClientOutcome::Forward {
            relay,
            peer,
            payload: range,
        }
    }

    fn handle_send(&mut self, from: ClientAddr, msg: &Message<'_>, now: Instant) -> ClientOutcome {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(&slot) = self.by_client.get(&from) else {
            return ClientOutcome::Handled;
        };
        let (Ok(Some(peer)), Some(data)) = (
            msg.xor_address(AttrType::XorPeerAddress),
            msg.attr(AttrType::Data),
        ) else {
            self.metrics.malformed.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        };
        if self.shared.policy.check(peer).is_err() {
            self.metrics.peer_denied.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        }
        let Some(a) = self.slots[slot].as_mut().filter(|a| !a.tcp) else {
            return ClientOutcome::Handled;
        };
        if !a.has_permission(peer.ip(), now) {
            self.metrics.dropped_no_permission.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        }
        if !a.up.take(data.len() as u64, now) {
            self.metrics.dropped_rate_limited.fetch_add(1, Relaxed);
            return ClientOutcome::Handled;
        }
        let Some(relay) = a.relay_for(peer) else {
            return ClientOutcome::Handled;
        };
        // The DATA value is a slice of `msg`, which borrows the input buffer.
        let start = data.as_ptr() as usize - msg.as_bytes().as_ptr() as usize;
        self.metrics.packets_to_peer.fetch_add(1, Relaxed);
        self.metrics
            .bytes_to_peer
            .fetch_add(data.len() as u64, Relaxed);
        ClientOutcome::Forward {
            relay,
            peer,
            payload: start..start + data.len(),
        }
    }

    /// RFC 8489 §6.3.4 Binding, plus the classic RFC 3489 form and RFC 5780
    /// behaviour discovery.
    fn handle_binding(&mut self, from: ClientAddr, msg: &Message<'_>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.binding_requests.fetch_add(1, Relaxed);
        let alternate = self.shared.config.alternate;
        if !msg.is_classic() {
            // RESPONSE-PORT (RFC 5780 §7.5) would point our answers at a port
            // the request did not come from: a reflection tool. Refused as
            // not understood, which the RFC allows.
            let refused = msg
                .has(AttrType::ResponsePort)
                .then_some(AttrType::ResponsePort as u16);
            if let Some(t) = refused.or_else(|| msg.unknown_required().next()) {
                let reply = reply_for(from, msg);
                self.unknown_attributes(reply, t);
                return;
            }
        }
        // CHANGE-REQUEST (RFC 5780 §7.2): flags 0x4 change IP, 0x2 change port.
        let change = match msg.u32_attr(AttrType::ChangeRequest) {
            Ok(v) => v.unwrap_or(0),
            Err(_) => {
                self.error(reply_for(from, msg), ErrorCode::BAD_REQUEST, None);
                return;
            }
        };
        // RFC 5780 §4: the four addresses are {primary, alternate} IP × port;
        // OTHER-ADDRESS differs from the receiving one in both.
        let primary = self.shared.config.udp.first().copied();
        let flip = |addr: SocketAddr, ip: bool, port: bool| -> SocketAddr {
            let (Some(p), Some(a)) = (primary, alternate) else {
                return addr;
            };
            let mut out = addr;
            if ip {
                out.set_ip(if addr.ip() == p.ip() { a.ip() } else { p.ip() });
            }
            if port {
                out.set_port(if addr.port() == p.port() {
                    a.port()
                } else {
                    p.port()
                });
            }
            out
        };
        if change & 0x6 != 0 && alternate.is_none() {
            // Without a second address CHANGE-REQUEST cannot be honoured
            // (RFC 5780 §6.1: 420). Classic clients read silence as "blocked".
            if !msg.is_classic() {
                let reply = reply_for(from, msg);
                self.unknown_attributes(reply, AttrType::ChangeRequest as u16);
            }
            return;
        }
        let source = flip(from.local, change & 0x4 != 0, change & 0x2 != 0);
        let other = alternate.map(|_| flip(from.local, true, true));
        let software = self.shared.config.software.clone();
        let mut out = Vec::with_capacity(96);
        if msg.is_classic() {
            let mut b = MessageBuilder::with_raw_id(
                &mut out,
                Class::Success,
                Method::Binding,
                msg.classic_transaction_id(),
            );
            b.add_address(AttrType::MappedAddress, from.remote);
            b.add_address(AttrType::SourceAddress, source);
            if let Some(o) = other {
                b.add_address(AttrType::ChangedAddress, o);
            }
        } else {
            let mut b = MessageBuilder::new(
                &mut out,
                Class::Success,
                Method::Binding,
                msg.transaction_id(),
            );
            b.add_xor_address(AttrType::XorMappedAddress, from.remote);
            if let Some(o) = other {
                b.add_address(AttrType::OtherAddress, o);
                b.add_address(AttrType::ResponseOrigin, source);
            }
            if let Some(s) = &software {
                b.add_attr(AttrType::Software, s.as_bytes());
            }
            if msg.has(AttrType::Fingerprint) {
                b.add_fingerprint();
            }
        }
        self.transmits.push_back(Transmit {
            to: from,
            from: source,
            bytes: out,
        });
    }

    fn handle_authenticated(&mut self, from: ClientAddr, msg: &Message<'_>, now: Instant) {
        let reply = reply_for(from, msg);
        // A retransmitted Allocate whose sockets are still being bound.
        if msg.method() == Method::Allocate && self.pending.contains_key(&from) {
            return;
        }
        let Some(auth) = self.authenticate(reply, msg, now) else {
            return;
        };
        if let Some(t) = msg.unknown_required().next() {
            self.unknown_attributes(reply, t);
            return;
        }
        match msg.method() {
            Method::Allocate => self.handle_allocate(reply, auth, msg, now),
            Method::Refresh => self.handle_refresh(reply, auth, msg, now),
            Method::CreatePermission => self.handle_create_permission(reply, auth, msg, now),
            Method::ChannelBind => self.handle_channel_bind(reply, auth, msg, now),
            Method::Connect => self.handle_connect(reply, auth, msg),
            Method::ConnectionBind => self.handle_connection_bind(reply, auth, msg),
            _ => self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        }
    }

    /// RFC 8489 §9.2.4 long-term credential checks. Sends the error and
    /// returns `None` unless the request is authenticated.
    fn authenticate(&mut self, reply: Reply, msg: &Message<'_>, now: Instant) -> Option<Auth> {
        let creds = self.shared.credentials();
        let has_mi =
            msg.has(AttrType::MessageIntegrity) || msg.has(AttrType::MessageIntegritySha256);
        if !has_mi {
            self.metrics.auth_failure(AuthFailure::Challenged);
            self.challenge(
                reply,
                ErrorCode::UNAUTHORIZED,
                &creds,
                now,
                msg.as_bytes().len(),
            );
            return None;
        }
        let username = match (
            msg.text_attr(AttrType::Username, 513),
            msg.attr(AttrType::Userhash),
        ) {
            (Ok(Some(u)), _) => Some(u.to_owned()),
            (Ok(None), Some(h)) => creds.user_for_hash(h).map(str::to_owned),
            _ => None,
        };
        let realm = msg.text_attr(AttrType::Realm, MAX_TEXT).ok().flatten();
        let nonce = msg.text_attr(AttrType::Nonce, MAX_TEXT).ok().flatten();
        let (Some(realm), Some(nonce)) = (realm, nonce) else {
            self.metrics.auth_failure(AuthFailure::BadRequest);
            self.error(reply, ErrorCode::BAD_REQUEST, None);
            return None;
        };
        if msg.attr(AttrType::Username).is_none() && msg.attr(AttrType::Userhash).is_none() {
            self.metrics.auth_failure(AuthFailure::BadRequest);
            self.error(reply, ErrorCode::BAD_REQUEST, None);
            return None;
        }
        let unix = self.shared.unix(now);
        let lifetime = self.shared.config.nonce_lifetime.as_secs();
        if let Err(e) = self.shared.nonce.check(nonce, &reply.to, unix, lifetime) {
            self.metrics.auth_failure(match e {
                NonceError::Stale => AuthFailure::StaleNonce,
                NonceError::Invalid => AuthFailure::InvalidNonce,
            });
            self.challenge(reply, ErrorCode::STALE_NONCE, &creds, now, usize::MAX);
            return None;
        }
        if realm != creds.realm() {
            self.metrics.auth_failure(AuthFailure::BadIntegrity);
            self.challenge(reply, ErrorCode::UNAUTHORIZED, &creds, now, usize::MAX);
            return None;
        }
        // Bid-down protection (RFC 8489 §9.2.4): every nonce we issue carries
        // the password-algorithms feature bit, so either both attributes are
        // absent (MD5 as before RFC 8489) or both are present and the list is
        // exactly the one we offered.
        let alg = match (
            msg.attr(AttrType::PasswordAlgorithm),
            msg.attr(AttrType::PasswordAlgorithms),
        ) {
            (None, None) => PasswordAlgorithm::Md5,
            (Some(a), Some(list)) => {
                let mut offered = Vec::with_capacity(8);
                PasswordAlgorithm::encode_list(OFFERED_ALGORITHMS, &mut offered);
                match PasswordAlgorithm::decode(a) {
                    Ok(Some(alg)) if list == offered.as_slice() => alg,
                    _ => {
                        self.metrics.auth_failure(AuthFailure::BadRequest);
                        self.error(reply, ErrorCode::BAD_REQUEST, None);
                        return None;
                    }
                }
            }
            _ => {
                self.metrics.auth_failure(AuthFailure::BadRequest);
                self.error(reply, ErrorCode::BAD_REQUEST, None);
                return None;
            }
        };
        let Some(username) = username else {
            self.metrics.auth_failure(AuthFailure::UnknownUser);
            self.challenge(reply, ErrorCode::UNAUTHORIZED, &creds, now, usize::MAX);
            return None;
        };
        let passwords = match creds.lookup(&username, unix) {
            Lookup::Passwords(p) => p,
            Lookup::Expired => {
                self.metrics.auth_failure(AuthFailure::ExpiredCredential);
                self.challenge(reply, ErrorCode::UNAUTHORIZED, &creds, now, usize::MAX);
                return None;
            }
            Lookup::Unknown => {
                self.metrics.auth_failure(AuthFailure::UnknownUser);
                self.challenge(reply, ErrorCode::UNAUTHORIZED, &creds, now, usize::MAX);
                return None;
            }
        };
        for p in &passwords {
            let key = auth::long_term_key(alg, &username, creds.realm(), p);
            if let Ok(Some(kind)) = msg.verify_integrity(&key) {
                // An allocation belongs to the credentials that made it (RFC
                // 8656 §5). An Allocate on a taken 5-tuple is a 437 instead
                // (§7.2), whoever sends it.
                let existing = (reply.method != Method::Allocate)
                    .then(|| self.by_client.get(&reply.to))
                    .flatten();
                if let Some(&slot) = existing {
                    if self.slots[slot]
                        .as_ref()
                        .is_some_and(|a| a.username != username)
                    {
                        self.metrics.auth_failure(AuthFailure::WrongCredentials);
                        let a = Auth {
                            username,
                            key,
                            kind,
                        };
                        self.error(reply, ErrorCode::WRONG_CREDENTIALS, Some(&a));
                        return None;
                    }
                }
                return Some(Auth {
                    username,
                    key,
                    kind,
                });
            }
        }
        self.metrics.auth_failure(AuthFailure::BadIntegrity);
        self.challenge(reply, ErrorCode::UNAUTHORIZED, &creds, now, usize::MAX);
        None
    }
}

/// Password algorithms offered, in order of preference.
const OFFERED_ALGORITHMS: &[PasswordAlgorithm] =
    &[PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5];

fn reply_for(to: ClientAddr, msg: &Message<'_>) -> Reply {
    Reply {
        to,
        method: msg.method(),
        tid: msg.transaction_id(),
        fingerprint: msg.has(AttrType::Fingerprint),
    }
}

/// A username shortened for logs: REST usernames carry a user id.
fn redact(user: &str) -> String {
    let head: String = user.chars().take(3).collect();
    format!("{head}…")
}

#[cfg(test)]
mod tests;

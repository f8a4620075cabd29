//! A sans-IO TURN client (RFC 8656) for the media engine: str0m gathers
//! host and server-reflexive candidates itself but has no TURN client, so
//! the relayed candidate comes from here.
//!
//! It allocates a UDP relay with long-term credentials (answering the
//! server's 401 and 438 challenges), refreshes the allocation before it
//! expires, installs and refreshes permissions (5 min lifetime) and channel
//! bindings (10 min), and wraps outgoing media as ChannelData when a
//! channel is bound or as Send indications otherwise.
//!
//! Drive it like every core here: `handle_input` with datagrams from the
//! server, `handle_timeout` at `poll_timeout`, and send what
//! `poll_transmit` returns to [`Config::server`].
//!
//! The client reaches the server over UDP, or over TCP or TLS where UDP
//! is blocked ([`Transport`]; RFC 8656 §3.1). The relay toward peers is
//! UDP either way. On a stream the runtime frames what comes in (see
//! [`crate::turn_stream`]) and hands each STUN message or ChannelData
//! frame to `handle_input`; the client pads its ChannelData to four bytes
//! (§12.5) and does not retransmit requests, which the stream carries
//! reliably (RFC 8489 §6.2.2), though it gives up on an unanswered one as
//! late as on UDP.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use stun_turn::core::auth::long_term_key;
use stun_turn::message::{
    AttrType, Class, ErrorCode, IntegrityKind, Message, MessageBuilder, Method, PasswordAlgorithm,
    TransactionId,
};

/// RFC 8489 §6.2.1: first retransmission after 500 ms, doubling, seven
/// sends in all.
const RTO: Duration = Duration::from_millis(500);
const MAX_SENDS: u32 = 7;
/// A probe of a relay that may have died mid-call ([`TurnClient::probe`]):
/// four sends 250 ms apart, so a dead relay is known within a second
/// rather than the 39.5 s of the ordinary schedule.
const PROBE_RTO: Duration = Duration::from_millis(250);
const PROBE_SENDS: u32 = 4;
/// Permissions last 5 minutes, channels 10 (RFC 8656 §9, §12); refresh a
/// minute early.
const PERMISSION_REFRESH: Duration = Duration::from_secs(240);
const CHANNEL_REFRESH: Duration = Duration::from_secs(540);
const FIRST_CHANNEL: u16 = 0x4000;
const LAST_CHANNEL: u16 = 0x4fff;

/// How the client reaches the TURN server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    #[default]
    Udp,
    Tcp,
    /// TLS over TCP (`turns:`), which networks that pass only web
    /// traffic let through.
    Tls,
}

impl Transport {
    /// A byte stream (TCP or TLS) rather than datagrams.
    pub fn is_stream(self) -> bool {
        self != Transport::Udp
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
    /// Allocation lifetime asked for. Default 10 minutes.
    pub lifetime: Duration,
    /// UDP unless set.
    pub transport: Transport,
}

impl Config {
    pub fn new(server: SocketAddr, username: &str, password: &str) -> Config {
        Config {
            server,
            username: username.into(),
            password: password.into(),
            lifetime: Duration::from_secs(600),
            transport: Transport::Udp,
        }
    }

    /// The same, over `transport` (the server's address for it given).
    pub fn over(mut self, transport: Transport) -> Config {
        self.transport = transport;
        self
    }
}

/// What the client tells the media engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The relayed candidate (and the server-reflexive address the server
    /// saw).
    Allocated {
        relayed: SocketAddr,
        mapped: Option<SocketAddr>,
    },
    /// The allocation failed or was lost: the STUN error code (0 for no
    /// answer) and reason.
    Failed {
        code: u16,
        reason: String,
    },
    PermissionCreated {
        peer: IpAddr,
    },
    ChannelBound {
        peer: SocketAddr,
        channel: u16,
    },
    /// Media from a peer through the relay.
    Data {
        peer: SocketAddr,
        data: Vec<u8>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    Allocate,
    Refresh { lifetime: u32 },
    Permission { peer: IpAddr },
    Channel { peer: SocketAddr, channel: u16 },
}

#[derive(Debug)]
struct Pending {
    kind: Kind,
    bytes: Vec<u8>,
    sends: u32,
    next: Instant,
    /// A probe: the short schedule.
    probe: bool,
}

#[derive(Debug)]
pub struct TurnClient {
    config: Config,
    /// Realm and nonce from the last challenge, and the key they give.
    realm: String,
    nonce: String,
    key: Option<Vec<u8>>,
    relayed: Option<SocketAddr>,
    refresh_at: Option<Instant>,
    pending: HashMap<TransactionId, Pending>,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<SocketAddr, (u16, Instant)>,
    peers_by_channel: HashMap<u16, SocketAddr>,
    next_channel: u16,
    transmits: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    seed: u64,
    counter: u64,
}

impl TurnClient {
    /// `seed` makes transaction ids unpredictable to others; give each
    /// client fresh randomness.
    pub fn new(config: Config, seed: u64) -> TurnClient {
        TurnClient {
            config,
            realm: String::new(),
            nonce: String::new(),
            key: None,
            relayed: None,
            refresh_at: None,
            pending: HashMap::new(),
            permissions: HashMap::new(),
            channels: HashMap::new(),
            peers_by_channel: HashMap::new(),
            next_channel: FIRST_CHANNEL,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            seed,
            counter: 0,
        }
    }

    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Asks for a UDP relay.
    pub fn allocate(&mut self, now: Instant) {
        self.request(Kind::Allocate, now);
    }

    /// Lets `peer`'s address send to us through the relay (kept fresh
    /// until the allocation goes).
    pub fn create_permission(&mut self, peer: SocketAddr, now: Instant) {
        self.request(Kind::Permission { peer: peer.ip() }, now);
    }

    /// Binds a channel to `peer` (also installing its permission) and
    /// returns its number.
    pub fn bind_channel(&mut self, peer: SocketAddr, now: Instant) -> u16 {
        if let Some((ch, _)) = self.channels.get(&peer) {
            return *ch;
        }
        let channel = self.next_channel;
        self.next_channel = if channel == LAST_CHANNEL {
            FIRST_CHANNEL
        } else {
            channel + 1
        };
        self.request(Kind::Channel { peer, channel }, now);
        channel
    }

    /// Checks that the relay still answers: a Refresh on the short
    /// schedule. Media stopped arriving, and the relay may be gone; if it
    /// does not answer, [`Event::Failed`] (code 0) follows within about a
    /// second. Nothing is sent without an allocation or while a probe is
    /// out.
    pub fn probe(&mut self, now: Instant) {
        if self.relayed.is_none() || self.pending.values().any(|p| p.probe) {
            return;
        }
        let lifetime = self.config.lifetime.as_secs() as u32;
        let tid = self.request(Kind::Refresh { lifetime }, now);
        if let Some(p) = self.pending.get_mut(&tid) {
            p.probe = true;
            p.next = now + PROBE_RTO;
        }
    }

    /// Gives the allocation back (Refresh with lifetime 0, RFC 8656 §7),
    /// so it does not count against the user's quota until it expires.
    /// Sent once; the client forgets the allocation either way.
    pub fn release(&mut self, now: Instant) {
        if self.relayed.take().is_none() {
            return;
        }
        self.refresh_at = None;
        self.permissions.clear();
        self.channels.clear();
        self.peers_by_channel.clear();
        self.request(Kind::Refresh { lifetime: 0 }, now);
        // No retransmissions: the allocation expires on its own if this
        // is lost.
        self.pending.clear();
    }

    /// The datagram to send to the server to deliver `data` to `peer`:
    /// ChannelData once a channel is bound, else a Send indication.
    pub fn wrap(&mut self, peer: SocketAddr, data: &[u8]) -> Vec<u8> {
        if let Some((ch, _)) = self.channels.get(&peer) {
            let mut out = Vec::with_capacity(4 + data.len() + 3);
            out.extend_from_slice(&ch.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
            if self.config.transport.is_stream() {
                let pad = stun_turn::channel_data::stream_padding(data.len());
                out.resize(out.len() + pad, 0);
            }
            return out;
        }
        let tid = self.tid();
        let mut buf = Vec::with_capacity(data.len() + 48);
        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::Send, tid);
        b.add_xor_address(AttrType::XorPeerAddress, peer);
        b.add_attr(AttrType::Data, data);
        buf
    }

    /// A datagram from the server.
    pub fn handle_input(&mut self, bytes: &[u8], now: Instant) {
        if stun_turn::channel_data::is_channel_data(bytes) {
            if let Ok((ch, range)) = stun_turn::channel_data::decode(bytes) {
                if let Some(peer) = self.peers_by_channel.get(&ch.get()) {
                    self.events.push_back(Event::Data {
                        peer: *peer,
                        data: bytes[range].to_vec(),
                    });
                }
            }
            return;
        }
        let Ok(m) = Message::decode(bytes) else {
            return;
        };
        if m.class() == Class::Indication && m.method() == Method::Data {
            if let (Ok(Some(peer)), Some(data)) = (
                m.xor_address(AttrType::XorPeerAddress),
                m.attr(AttrType::Data),
            ) {
                self.events.push_back(Event::Data {
                    peer,
                    data: data.to_vec(),
                });
            }
            return;
        }
        let Some(p) = self.pending.remove(&m.transaction_id()) else {
            return;
        };
        match m.class() {
            Class::Success => self.succeeded(p.kind, &m, now),
            Class::Error => self.failed(p.kind, &m, now),
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<TransactionId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(t, _)| *t)
            .collect();
        for tid in due {
            let Some(p) = self.pending.get_mut(&tid) else {
                continue;
            };
            if p.sends >= if p.probe { PROBE_SENDS } else { MAX_SENDS } {
                let p = self.pending.remove(&tid).map(|p| p.kind);
                if matches!(p, Some(Kind::Allocate | Kind::Refresh { .. })) {
                    self.relayed = None;
                    self.events.push_back(Event::Failed {
                        code: 0,
                        reason: "no answer from the TURN server".into(),
                    });
                }
                continue;
            }
            p.sends += 1;
            p.next = now
                + if p.probe {
                    PROBE_RTO
                } else {
                    RTO * 2u32.pow(p.sends - 1)
                };
            // A stream delivers the first send or breaks; the schedule
            // only decides when to give up.
            if !self.config.transport.is_stream() {
                self.transmits.push_back(p.bytes.clone());
            }
        }
        if self.refresh_at.is_some_and(|t| t <= now) {
            self.refresh_at = None;
            let lifetime = self.config.lifetime.as_secs() as u32;
            self.request(Kind::Refresh { lifetime }, now);
        }
        let permissions: Vec<IpAddr> = self
            .permissions
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in permissions {
            self.permissions.insert(peer, now + PERMISSION_REFRESH);
            self.request(Kind::Permission { peer }, now);
        }
        let channels: Vec<(SocketAddr, u16)> = self
            .channels
            .iter()
            .filter(|(_, (_, t))| *t <= now)
            .map(|(p, (c, _))| (*p, *c))
            .collect();
        for (peer, channel) in channels {
            if let Some(e) = self.channels.get_mut(&peer) {
                e.1 = now + CHANNEL_REFRESH;
            }
            self.request(Kind::Channel { peer, channel }, now);
        }
    }

    /// Sends to [`Config::server`].
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending
            .values()
            .map(|p| p.next)
            .chain(self.refresh_at)
            .chain(self.permissions.values().copied())
            .chain(self.channels.values().map(|(_, t)| *t))
            .min()
    }

    fn succeeded(&mut self, kind: Kind, m: &Message<'_>, now: Instant) {
        // Responses to authenticated requests must carry our integrity.
        if let Some(key) = &self.key {
            if m.verify_integrity(key).ok().flatten().is_none() {
                return;
            }
        }
        match kind {
            Kind::Allocate => {
                let Ok(Some(relayed)) = m.xor_address(AttrType::XorRelayedAddress) else {
                    return;
                };
                let mapped = m.xor_address(AttrType::XorMappedAddress).ok().flatten();
                let lifetime = m.u32_attr(AttrType::Lifetime).ok().flatten().unwrap_or(600);
                self.relayed = Some(relayed);
                self.refresh_at = Some(now + refresh_before(lifetime));
                self.events.push_back(Event::Allocated { relayed, mapped });
            }
            Kind::Refresh { .. } => {
                let lifetime = m.u32_attr(AttrType::Lifetime).ok().flatten().unwrap_or(600);
                self.refresh_at = Some(now + refresh_before(lifetime));
            }
            Kind::Permission { peer } => {
                let fresh = self
                    .permissions
                    .insert(peer, now + PERMISSION_REFRESH)
                    .is_none();
                if fresh {
                    self.events.push_back(Event::PermissionCreated { peer });
                }
            }
            Kind::Channel { peer, channel } => {
                let fresh = self
                    .channels
                    .insert(peer, (channel, now + CHANNEL_REFRESH))
                    .is_none();
                self.peers_by_channel.insert(channel, peer);
                // A channel binding also installs the permission.
                self.permissions
                    .entry(peer.ip())
                    .or_insert(now + PERMISSION_REFRESH);
                if fresh {
                    self.events.push_back(Event::ChannelBound { peer, channel });
                }
            }
        }
    }

    fn failed(&mut self, kind: Kind, m: &Message<'_>, now: Instant) {
        let (code, reason) = m
            .attr(AttrType::ErrorCode)
            .and_then(|v| ErrorCode::decode(v).ok())
            .map(|(c, r)| (c.0, r.to_owned()))
            .unwrap_or((0, String::new()));
        let realm = m.text_attr(AttrType::Realm, 763).ok().flatten();
        let nonce = m.text_attr(AttrType::Nonce, 763).ok().flatten();
        // 401 on the first try, or 438 (stale nonce) any time: take the
        // challenge and try again once.
        let retry = match code {
            401 => self.key.is_none() || realm.is_some_and(|r| r != self.realm),
            438 => true,
            _ => false,
        };
        if retry {
            if let (Some(realm), Some(nonce)) = (realm, nonce) {
                self.realm = realm.to_owned();
                self.nonce = nonce.to_owned();
                self.key = Some(long_term_key(
                    PasswordAlgorithm::Md5,
                    &self.config.username,
                    &self.realm,
                    &self.config.password,
                ));
                self.request(kind, now);
                return;
            }
        }
        if matches!(kind, Kind::Allocate | Kind::Refresh { .. }) {
            self.relayed = None;
            self.events.push_back(Event::Failed { code, reason });
        }
    }

    fn request(&mut self, kind: Kind, now: Instant) -> TransactionId {
        let tid = self.tid();
        let method = match kind {
            Kind::Allocate => Method::Allocate,
            Kind::Refresh { .. } => Method::Refresh,
            Kind::Permission { .. } => Method::CreatePermission,
            Kind::Channel { .. } => Method::ChannelBind,
        };
        let mut buf = Vec::with_capacity(160);
        let mut b = MessageBuilder::new(&mut buf, Class::Request, method, tid);
        match &kind {
            // UDP (17), RFC 8656 §18.8.
            Kind::Allocate => {
                b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
                b.add_u32(AttrType::Lifetime, self.config.lifetime.as_secs() as u32);
            }
            Kind::Refresh { lifetime } => {
                b.add_u32(AttrType::Lifetime, *lifetime);
            }
            Kind::Permission { peer } => {
                b.add_xor_address(AttrType::XorPeerAddress, SocketAddr::new(*peer, 0));
            }
            Kind::Channel { peer, channel } => {
                b.add(
                    AttrType::ChannelNumber as u16,
                    &[(channel >> 8) as u8, *channel as u8, 0, 0],
                );
                b.add_xor_address(AttrType::XorPeerAddress, *peer);
            }
        }
        if let Some(key) = &self.key {
            b.add_attr(AttrType::Username, self.config.username.as_bytes());
            b.add_attr(AttrType::Realm, self.realm.as_bytes());
            b.add_attr(AttrType::Nonce, self.nonce.as_bytes());
            b.add_integrity(IntegrityKind::Sha1, key);
        }
        b.add_fingerprint();
        self.transmits.push_back(buf.clone());
        self.pending.insert(
            tid,
            Pending {
                kind,
                bytes: buf,
                sends: 1,
                next: now + RTO,
                probe: false,
            },
        );
        tid
    }

    /// Transaction ids from the seed and a counter through SHA-256, so
    /// they cannot be guessed from one another (RFC 8489 §6).
    fn tid(&mut self) -> TransactionId {
        self.counter += 1;
        let mut input = [0u8; 16];
        input[..8].copy_from_slice(&self.seed.to_be_bytes());
        input[8..].copy_from_slice(&self.counter.to_be_bytes());
        let d = ring::digest::digest(&ring::digest::SHA256, &input);
        let mut t = [0u8; 12];
        t.copy_from_slice(&d.as_ref()[..12]);
        TransactionId(t)
    }
}

/// Refresh a minute before expiry, or at half the lifetime if short.
fn refresh_before(lifetime: u32) -> Duration {
    let l = Duration::from_secs(u64::from(lifetime));
    if l > Duration::from_secs(120) {
        l - Duration::from_secs(60)
    } else {
        l / 2
    }
}

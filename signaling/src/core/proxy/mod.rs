//! The registrar and forking proxy, sans-IO.
//!
//! Input: [`Proxy::handle_input`] (bytes from a flow),
//! [`Proxy::handle_authorization`] (the answer to an
//! [`Event::Authorize`]), [`Proxy::handle_conn_closed`] and
//! [`Proxy::handle_timeout`]. Output: [`Proxy::poll_transmit`],
//! [`Proxy::poll_event`] and [`Proxy::poll_timeout`].
//!
//! What is stateful and what is not:
//! - out-of-dialog requests to a handle (INVITE, MESSAGE, OPTIONS…) are
//!   forked *transaction-statefully* (RFC 3261 §16): a server transaction
//!   upstream, one client transaction per branch, and a [`Fork`] context
//!   that picks the response (§16.7);
//! - REGISTER is answered by the registrar in a server transaction;
//! - in-dialog requests (a To tag), ACKs for 2xx and the responses to them
//!   are forwarded *statelessly* (§16.11): the branch is derived from the
//!   incoming one, and the flows to use are read back from the signed
//!   token in our Record-Route and Via, so no per-dialog state exists.
//!
//! Who may make us send what (the proxy is not an open relay):
//! - a request goes out only to a registered binding's flow, or along the
//!   flows of a token this proxy signed for that Call-ID and that has not
//!   expired ([`FlowTokens`]); a response only back to the flow its Via
//!   token names. A Route or Request-URI naming any other host is
//!   refused with 403, unless the sender authenticated and the host is in
//!   [`Config::forward_to`] (empty by default);
//! - a caller calls as itself: the From of an out-of-dialog request names
//!   the digest account's handle, or a handle the device is listed for;
//! - refusals to parties that did not authenticate are sent once, without
//!   a transaction (no retransmission toward a source that may be
//!   spoofed), and only within the per-source budget
//!   ([`Config::source_rate`], IPv6 counted per /64); past the budget UDP
//!   gets nothing at all;
//! - digest answers must be `qop=auth`, for this Request-URI, with a nonce
//!   count not used before ([`NonceCounts`]).
//!
//! Decline semantics: a 6xx from any branch (603 Decline when the person
//! refuses on one device, 600 Busy Everywhere) ends the call on every
//! device: the other branches are CANCELled with `Reason: SIP;cause=<code>`
//! and the 6xx goes to the caller at once (§16.7 step 5). The first 2xx
//! CANCELs the rest with `Reason: SIP;cause=200;text="Call completed
//! elsewhere"` (RFC 3326). No final answer within the ring timeout: the
//! branches are CANCELled and the caller gets 480 if any device rang, else
//! 408.

use crate::core::digest::{same_resource, Credentials, Digest, NonceCounts, Verdict};
use crate::core::flow::{ConnId, Flow, FlowTokens, Source, Transmit, Transport};
use crate::core::message::{tag_of, HeaderName, Message, Method, ParseError, StartLine};
use crate::core::registrar::{Limits, PushParams, Registrar};
use crate::core::timer::Timers;
use crate::core::uri::{NameAddr, Uri};
use crate::core::via::{Via, MAGIC_COOKIE};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use wire::handle::Handle;
use wire::keys::DeviceId;
use wire::net::{source_key, IpNet};
use wire::ratelimit::RateLimiter;

mod forking;
mod forward;
mod group;
mod request;
mod response;
mod shared;
mod transaction;

pub use shared::SharedBinding;

/// What the proxy is and how it behaves. Durations are wall-clock spans.
#[derive(Clone, Debug)]
pub struct Config {
    /// Domains (and addresses) whose URIs are ours: a Request-URI
    /// `sip:<handle>@<domain>` is looked up in the registrar.
    pub domains: Vec<String>,
    /// Our address per transport, as written in Via and Record-Route.
    pub advertise: Vec<(Transport, SocketAddr)>,
    /// Digest realm. Default: the first domain.
    pub realm: String,
    /// Digest accounts for standard user agents: handle → password.
    pub accounts: HashMap<Handle, String>,
    /// Let out-of-dialog requests without credentials through (a
    /// benchmark against a proxy without authentication). Default off.
    pub allow_unauthenticated_calls: bool,
    /// Offer SHA-256 digest (RFC 8760) before MD5. Default off: see
    /// [`crate::core::digest::Digest::challenges`].
    pub digest_sha256: bool,
    /// How long a call may ring before it is given up. Default 60 s.
    pub ring_timeout: Duration,
    /// How long a branch woken by push may take to register. Default 30 s.
    pub push_window: Duration,
    pub registrar: Limits,
    /// Keepalive interval asked of outbound flows (RFC 5626 `Flow-Timer`).
    /// Default 120 s.
    pub flow_timer: Duration,
    /// Calls (fork contexts) at once; more get 503. Default 100,000.
    pub max_calls: usize,
    /// Requests per second per source address (IPv6: per /64) that are
    /// neither retransmissions nor in a dialog of ours; more get 503 with
    /// Retry-After over connections and nothing over UDP. Default 200.
    pub source_rate: u32,
    /// Where a request that carries no route of ours may be forwarded when
    /// its sender authenticated (a device certificate or digest
    /// credentials): address prefixes of trunks or gateways. Empty by
    /// default: such requests get 403 Relaying Forbidden.
    pub forward_to: Vec<IpNet>,
    /// How long the route of a call (the signed token in our Record-Route)
    /// is honoured; in-dialog requests after that get 481. Default 12 h.
    pub dialog_lifetime: Duration,
    /// Calls per minute that may wake sleeping devices, per caller and
    /// per callee; past it a call rings only devices that are awake.
    /// Default 30.
    pub wakes_per_minute: u32,
    /// Several nodes share one location service (cluster mode): the core
    /// reports this node's bindings ([`Event::Bound`]) and asks for other
    /// nodes' before forking ([`Event::Locate`]). Default off.
    pub shared_location: bool,
    /// The SFU's join API (`https://host:8446`), handed with room tokens
    /// to the participants of group calls. Default none: a group INVITE
    /// gets 488.
    pub sfu: Option<String>,
    /// RFC 3261 timer bases. Defaults 500 ms, 4 s, 5 s.
    pub t1: Duration,
    pub t2: Duration,
    pub t4: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domains: vec!["localhost".into()],
            advertise: Vec::new(),
            realm: "localhost".into(),
            accounts: HashMap::new(),
            allow_unauthenticated_calls: false,
            digest_sha256: false,
            ring_timeout: Duration::from_secs(60),
            push_window: Duration::from_secs(30),
            registrar: Limits {
                min_expires: Duration::from_secs(60),
                max_expires: Duration::from_secs(7200),
                default_expires: Duration::from_secs(3600),
                max_bindings_per_handle: 32,
                max_bindings: 1_000_000,
            },
            flow_timer: Duration::from_secs(120),
            max_calls: 100_000,
            source_rate: 200,
            forward_to: Vec::new(),
            dialog_lifetime: Duration::from_secs(12 * 3600),
            wakes_per_minute: 30,
            shared_location: false,
            sfu: None,
            t1: Duration::from_millis(500),
            t2: Duration::from_secs(4),
            t4: Duration::from_secs(5),
        }
    }
}

/// Something the runtime must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// May this device register for this handle? Answer with
    /// [`Proxy::handle_authorization`]; the REGISTER waits.
    Authorize {
        id: u64,
        device: DeviceId,
        handle: Handle,
    },
    /// Wake a sleeping device by a VoIP push: a call is waiting for it to
    /// register.
    Wake(Wake),
    /// Cluster mode: this node's bindings of `handle` are now these
    /// (store them for the other nodes; empty = none left).
    Bound {
        handle: Handle,
        bindings: Vec<SharedBinding>,
    },
    /// Cluster mode: a call to `handle` waits for its bindings at other
    /// nodes; answer with [`Proxy::handle_located`].
    Locate { id: u64, handle: Handle },
    /// Cluster mode: a digest answer with this nonce and count was taken
    /// here; tell the other nodes ([`Proxy::handle_nonce_used`]) so that it
    /// is not taken again there.
    NonceUsed { nonce: String, nc: u32 },
    /// Cluster mode: a push token of a device of `handle` is dead; tell the
    /// other nodes ([`Proxy::handle_remote_push_gone`]), whose bindings
    /// may name it too.
    PushGone { handle: Handle, prid: String },
}

/// A VoIP push for a sleeping device, as [`Event::Wake`] asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wake {
    pub handle: Handle,
    pub push: PushParams,
    /// The device whose certificate registered the binding: the push
    /// service must check that `push.prid` is that device's token.
    pub device: DeviceId,
    pub call_id: String,
    /// The caller's From header (checked: the caller's own handle), for
    /// the push payload.
    pub caller: String,
}

/// Counters since start; labels are bounded.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub requests: u64,
    pub responses: u64,
    pub malformed: u64,
    pub rate_limited: u64,
    /// Requests refused for naming a host that is not ours nor allowed.
    pub relay_refused: u64,
    /// Digest answers sent again (a nonce count used before).
    pub digest_replays: u64,
    /// Out-of-dialog requests whose From named someone else.
    pub caller_id_refused: u64,
    pub registrations: u64,
    pub registrations_refused: u64,
    pub bindings: u64,
    pub calls_answered: u64,
    pub calls_declined: u64,
    pub calls_cancelled: u64,
    pub calls_no_answer: u64,
    pub calls_unavailable: u64,
    pub calls_failed: u64,
    pub forks: u64,
    pub fork_branches: u64,
    pub push_wakes: u64,
    /// Calls that woke nobody: the caller or the callee was past
    /// [`Config::wakes_per_minute`].
    pub wakes_limited: u64,
    pub cancels_sent: u64,
    /// Time from a 2xx or 6xx to the CANCEL of another branch, microseconds.
    pub cancel_latency_us_sum: u64,
    pub cancel_latency_us_max: u64,
    pub retransmissions: u64,
    pub calls_active: u64,
}

pub struct Proxy {
    config: Config,
    tokens: FlowTokens,
    /// Keys the room tokens of group calls, which the SFU checks.
    room_secret: [u8; 32],
    digest: Digest,
    nonce_counts: NonceCounts,
    epoch: Instant,
    /// Seconds on the proxy's clock at `epoch`: 0, or the Unix time given
    /// to [`Proxy::with_wall_clock`], so that tokens and nonces mean the
    /// same on every node sharing the secret, and after a restart.
    clock_base: u64,
    registrar: Registrar,
    servers: HashMap<String, ServerTx>,
    clients: HashMap<String, ClientTx>,
    forks: HashMap<u64, Fork>,
    waiting: HashMap<Handle, Vec<u64>>,
    pending_auth: HashMap<u64, Pending>,
    locating: HashMap<u64, shared::Locating>,
    limiter: RateLimiter<IpAddr>,
    /// Wake-ups per caller and per callee.
    wake_limiter: RateLimiter<WakeKey>,
    /// Devices whose certificates ids revoked: refused, and unbound.
    revoked: HashSet<DeviceId>,
    timers: Timers<Timer>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_id: u64,
    metrics: Metrics,
    draining: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("servers", &self.servers.len())
            .field("clients", &self.clients.len())
            .field("forks", &self.forks.len())
            .field("bindings", &self.registrar.len())
            .finish_non_exhaustive()
    }
}

const MAX_PENDING_AUTH: usize = 10_000;
/// Server transactions at once (each lives at most 64·T1 after its final
/// response); past this, new requests get a stateless 503.
const MAX_SERVER_TRANSACTIONS: usize = 1_000_000;
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl Proxy {
    /// `secret` keys flow tokens, digest nonces and our tags and branches:
    /// a fresh random one per process, or one every node of a cluster
    /// shares (kept across restarts), with [`Proxy::with_wall_clock`].
    pub fn new(config: Config, secret: [u8; 32], now: Instant) -> Proxy {
        let digest = Digest::new(&config.realm, &secret);
        let limiter = RateLimiter::new(config.source_rate.max(1), Duration::from_secs(1));
        let wake_limiter =
            RateLimiter::new(config.wakes_per_minute.max(1), Duration::from_secs(60));
        let mut timers = Timers::default();
        timers.at(now + SWEEP_EVERY, Timer::Sweep);
        Proxy {
            tokens: FlowTokens::new(&secret),
            room_secret: secret,
            digest,
            nonce_counts: NonceCounts::default(),
            epoch: now,
            clock_base: 0,
            registrar: Registrar::default(),
            servers: HashMap::new(),
            clients: HashMap::new(),
            forks: HashMap::new(),
            waiting: HashMap::new(),
            pending_auth: HashMap::new(),
            locating: HashMap::new(),
            limiter,
            wake_limiter,
            revoked: HashSet::new(),
            timers,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
            metrics: Metrics::default(),
            draining: false,
            config,
        }
    }

    /// Runs the clock of tokens and nonces on Unix time (`unix_secs` at the
    /// `now` given to [`Proxy::new`]) instead of from zero, and starts our
    /// ids (tags, branches, nonces) at `first_id`, a random number: then a
    /// route token or digest challenge of one node verifies on another node
    /// with the same secret, or on this one after a restart, and the nodes'
    /// ids do not collide.
    pub fn with_wall_clock(mut self, unix_secs: u64, first_id: u64) -> Proxy {
        self.clock_base = unix_secs;
        self.next_id = first_id;
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = self.metrics.clone();
        m.bindings = self.registrar.len() as u64;
        m.calls_active = self.forks.len() as u64;
        m
    }

    pub fn registrar(&self) -> &Registrar {
        &self.registrar
    }

    /// Refuse new calls and registrations with 503; dialogs in progress
    /// go on.
    pub fn start_drain(&mut self) {
        self.draining = true;
    }

    /// No call is in progress.
    pub fn is_idle(&self) -> bool {
        self.forks.is_empty()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// A message (datagram, or one frame of a stream) from `source`.
    pub fn handle_input(&mut self, source: Source, bytes: &[u8], now: Instant) {
        match Message::parse(bytes) {
            Ok(m) if m.is_request() => {
                self.metrics.requests += 1;
                self.handle_request(source, m, now);
            }
            Ok(m) => {
                self.metrics.responses += 1;
                self.handle_response(source, m, now);
            }
            Err(e) => {
                self.metrics.malformed += 1;
                tracing::debug!(error = %e, from = %source.flow.remote, "malformed SIP message");
                // Answered within the source's budget only, like any
                // refusal: the source of a datagram may be spoofed.
                if !self.spend_budget(&source, now) {
                    return;
                }
                if let Some(resp) = bad_request(bytes, &e, source.flow.remote) {
                    self.send(source.flow, resp.to_bytes());
                }
            }
        }
    }

    /// The runtime's answer to [`Event::Authorize`].
    pub fn handle_authorization(&mut self, id: u64, allowed: bool, now: Instant) {
        let Some(p) = self.pending_auth.remove(&id) else {
            return;
        };
        match (p.callee, allowed) {
            (None, true) => self.register(Some(&p.key), &p.source, &p.request, &p.handle, now),
            (None, false) => {
                self.metrics.registrations_refused += 1;
                self.respond(&p.key, 403, "Device Not Listed For Handle", now);
            }
            (Some(callee), true) => {
                // Unless the caller CANCELled meanwhile.
                let open = self
                    .servers
                    .get(&p.key)
                    .is_some_and(|t| t.state == SState::Proceeding);
                if open {
                    self.admit_call(p.source, p.request, p.key, callee, now);
                }
            }
            (Some(_), false) => {
                self.metrics.caller_id_refused += 1;
                self.respond(&p.key, 403, "From Is Not Yours", now);
            }
        }
    }

    /// Devices whose certificates are revoked (the whole list as the
    /// identity service has it, or a notice of the newest). Their bindings
    /// go at once; they can neither register nor call from then on,
    /// whatever their connection. A revocation is never taken back, so
    /// this only adds: a list read before a notice cannot undo it.
    pub fn handle_revoked(&mut self, devices: HashSet<DeviceId>, _now: Instant) {
        let gone = self.registrar.remove_devices(&devices);
        if gone > 0 {
            tracing::info!(bindings = gone, "removed bindings of revoked devices");
        }
        self.revoked.extend(devices);
    }

    /// A connection closed.
    pub fn handle_conn_closed(&mut self, conn: ConnId, now: Instant) {
        for handle in self.registrar.conn_closed(conn) {
            self.announce_bindings(&handle, now);
        }
        // Branches that were waiting on that connection will hear nothing:
        // a transport error is a 503 from the branch (RFC 3261 §8.1.3.1),
        // so the call goes on with the others instead of waiting for
        // Timer B.
        let lost: Vec<String> = self
            .clients
            .iter()
            .filter(|(_, tx)| tx.flow.conn == Some(conn) && tx.state != CState::Completed)
            .map(|(k, _)| k.clone())
            .collect();
        for key in lost {
            let Some(tx) = self.clients.remove(&key) else {
                continue;
            };
            if let Some(id) = tx.fork.filter(|id| self.forks.contains_key(id)) {
                let mut resp =
                    Message::response_to(&tx.request, 503, "Service Unavailable", Some("tx"));
                resp.pop_first(&HeaderName::VIA);
                self.fork_response(id, &key, resp, now);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(t) = self.timers.pop_due(now) {
            self.fire(t, now);
        }
    }
}

// ---------------------------------------------------------------------
// What the parts share: requests (request.rs), forking (forking.rs),
// stateless forwarding (forward.rs), responses (response.rs),
// transactions and timers (transaction.rs).

/// Whose wake-up budget a call spends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum WakeKey {
    /// The caller's handle (its From, checked), or its source.
    Caller(String),
    Callee(Handle),
}

/// What authenticating a request found.
enum Auth {
    Caller(Caller),
    /// Right password but an old nonce, or a nonce count used before:
    /// challenge again with `stale=true`.
    Stale,
    /// The digest `uri` is not this request's Request-URI: 400.
    BadUri,
    /// No credentials, or wrong ones: challenge.
    Missing,
}

/// Who an authenticated request is from.
enum Caller {
    Device(DeviceId),
    Account(Handle),
    /// [`Config::allow_unauthenticated_calls`].
    Anyone,
}

struct Fork {
    server: String,
    request: Message,
    handle: Handle,
    invite: bool,
    branches: Vec<Branch>,
    best: Option<Message>,
    answered_at: Option<Instant>,
    final_sent: bool,
    rang: bool,
    /// Sleeping devices woken by push: their binding's id (`+sip.instance`
    /// or push token) and the token they were woken through.
    waiting: Vec<(String, String)>,
    source_flow: Flow,
}

struct Branch {
    tx: String,
    done: bool,
    proceeding: bool,
    /// CANCEL once a provisional response arrives (§9.1).
    cancel_pending: Option<Option<String>>,
}

/// Lower is better (§16.7 step 6): 6xx, then 2xx.. but here only 3xx–5xx
/// compete; prefer the lowest class, and in 4xx prefer anything to 408.
fn rank(code: u16) -> u16 {
    match code {
        408 => 499,
        503 => 599,
        c => c,
    }
}

fn binding_id(b: &crate::core::registrar::Binding) -> String {
    b.instance
        .clone()
        .or_else(|| b.push.as_ref().map(|p| p.prid.clone()))
        .unwrap_or_else(|| b.contact.uri.to_string())
}

fn decrement_max_forwards(m: &mut Message) {
    let n = m
        .header(&HeaderName::MAX_FORWARDS)
        .and_then(|v| v.trim().parse::<u8>().ok())
        .unwrap_or(70);
    m.set(HeaderName::MAX_FORWARDS, n.saturating_sub(1).to_string());
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum CState {
    Calling,
    Proceeding,
    Completed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum SState {
    Proceeding,
    Completed,
    Confirmed,
    Accepted,
}

struct ClientTx {
    invite: bool,
    cancel: bool,
    state: CState,
    flow: Flow,
    bytes: Vec<u8>,
    request: Message,
    fork: Option<u64>,
    /// Retransmissions so far.
    sent: u32,
}

struct ServerTx {
    invite: bool,
    state: SState,
    /// The request, until the final response is sent; after that only
    /// the response bytes are kept (for retransmissions).
    request: Option<Message>,
    reply_flow: Flow,
    last: Option<Vec<u8>>,
    fork: Option<u64>,
    to_tag: String,
    sent: u32,
}

/// A request from a device waiting for [`Event::Authorize`]'s answer.
struct Pending {
    key: String,
    source: Source,
    request: Message,
    /// The handle the device registers or calls as.
    handle: Handle,
    /// For a call: whom it is to. `None` for a REGISTER.
    callee: Option<Handle>,
}

/// Every deadline the core has. Transaction timers name the state they
/// were armed in (and, for retransmissions, the count): a timer whose
/// transaction has moved on is stale and ignored.
#[derive(Debug)]
enum Timer {
    /// A, B (INVITE) and E, F (non-INVITE) in `Calling`/`Proceeding`
    /// (retransmission count > 0 = retransmit, 0 = the 64·T1 timeout);
    /// D, K in `Completed`.
    Client(String, CState, u32),
    /// G, H in `Completed`; I in `Confirmed`; J in `Completed` for
    /// non-INVITE; L in `Accepted`.
    Server(String, SState, u32),
    /// The call rang too long.
    Ring(u64),
    /// Devices woken by push did not register in time.
    PushWindow(u64),
    Sweep,
}

/// What our own Route entry carried back to us.
struct RouteToken {
    /// It had a token (valid or not): it was a Record-Route of ours.
    signed: bool,
    /// Caller's and callee's flows, when the signed token was valid.
    flows: Option<Vec<Flow>>,
    /// The caller's From tag: tells the two directions apart.
    ftag: Option<String>,
    /// A path of ours (cluster mode): the device flow it names.
    edge: Option<Flow>,
}

/// A request that belongs to the INVITE's own transaction (CANCEL §9.1,
/// ACK for a non-2xx §17.1.1.3): its Request-URI, top Via, From, Call-ID,
/// CSeq number and Route set, with `to` (the response's To, for an ACK) or
/// the INVITE's To.
fn hop_request(inv: &Message, method: Method, to: Option<&str>) -> Option<Message> {
    let mut m = Message::request(method.clone(), inv.uri()?.clone());
    if let Some(v) = inv.values(&HeaderName::VIA).next() {
        m.push(HeaderName::VIA, v.to_string());
    }
    for name in [HeaderName::FROM, HeaderName::CALL_ID] {
        if let Some(v) = inv.header(&name) {
            m.push(name, v.to_string());
        }
    }
    if let Some(to) = to.or(inv.header(&HeaderName::TO)) {
        m.push(HeaderName::TO, to.to_string());
    }
    let n = inv.cseq().map_or(1, |(n, _)| n);
    m.push(HeaderName::CSEQ, format!("{n} {method}"));
    for r in inv.values(&HeaderName::ROUTE) {
        m.push(HeaderName::ROUTE, r.to_string());
    }
    m.push(HeaderName::MAX_FORWARDS, "70");
    Some(m)
}

fn server_key(top: &Via, req: &Message, method: &Method) -> String {
    let m = match method {
        Method::Ack => "INVITE",
        other => other.as_str(),
    };
    match top.branch() {
        Some(b) if b.starts_with(MAGIC_COOKIE) => format!("{b}|{}:{:?}|{m}", top.host, top.port),
        _ => {
            // RFC 2543 peers: match on the dialog identifiers (§17.2.3).
            let tag = req.tag(&HeaderName::FROM).unwrap_or("");
            let n = req.cseq().map_or(0, |(n, _)| n);
            format!("{}|{tag}|{n}|{m}", req.call_id())
        }
    }
}

/// Where responses go (§18.2.2): the connection the request came on; on
/// UDP the Via's received/rport, else the source.
fn reply_flow(source: &Source, req: &Message) -> Flow {
    if source.flow.transport.reliable() {
        return source.flow;
    }
    let addr = req
        .values(&HeaderName::VIA)
        .next()
        .and_then(Via::parse)
        .and_then(|v| v.response_addr())
        .unwrap_or(source.flow.remote);
    Flow {
        remote: addr,
        ..source.flow
    }
}

/// A 400 for a message we could not parse, if enough of it is readable to
/// answer (a request with Via, From, To, Call-ID and CSeq lines).
fn bad_request(bytes: &[u8], err: &ParseError, from: SocketAddr) -> Option<Message> {
    let text = std::str::from_utf8(bytes.get(..bytes.len().min(8192))?).ok()?;
    let first = text.lines().next()?;
    if first.starts_with("SIP/") || first.starts_with("ACK ") {
        return None; // never answer a response or an ACK
    }
    let mut resp = Message {
        start: StartLine::Response {
            code: 400,
            reason: format!("Bad Request ({err})"),
        },
        headers: Vec::new(),
        body: Vec::new(),
    };
    let mut via = false;
    for line in text.lines().skip(1) {
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = HeaderName::from_wire(name.trim());
        let value = value.trim();
        if name.is(&HeaderName::VIA) && !via {
            let mut v = Via::parse(crate::core::message::split_list(value).next()?)?;
            v.stamp_source(from);
            resp.push(HeaderName::VIA, v.to_string());
            via = true;
        } else if [
            HeaderName::FROM,
            HeaderName::TO,
            HeaderName::CALL_ID,
            HeaderName::CSEQ,
        ]
        .iter()
        .any(|n| n.is(&name))
            && !resp.has(&name)
        {
            let mut value = value.to_string();
            if name.is(&HeaderName::TO) && tag_of(&value).is_none() {
                value.push_str(";tag=bad");
            }
            resp.push(name, value);
        }
    }
    via.then_some(resp)
}

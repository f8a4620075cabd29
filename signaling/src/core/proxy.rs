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
    digest: Digest,
    nonce_counts: NonceCounts,
    epoch: Instant,
    registrar: Registrar,
    servers: HashMap<String, ServerTx>,
    clients: HashMap<String, ClientTx>,
    forks: HashMap<u64, Fork>,
    waiting: HashMap<Handle, Vec<u64>>,
    pending_auth: HashMap<u64, Pending>,
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
    /// `secret` keys flow tokens, digest nonces and our tags and branches;
    /// give each process a fresh random one.
    pub fn new(config: Config, secret: [u8; 32], now: Instant) -> Proxy {
        let digest = Digest::new(&config.realm, &secret);
        let limiter = RateLimiter::new(config.source_rate.max(1), Duration::from_secs(1));
        let wake_limiter =
            RateLimiter::new(config.wakes_per_minute.max(1), Duration::from_secs(60));
        let mut timers = Timers::default();
        timers.at(now + SWEEP_EVERY, Timer::Sweep);
        Proxy {
            tokens: FlowTokens::new(&secret),
            digest,
            nonce_counts: NonceCounts::default(),
            epoch: now,
            registrar: Registrar::default(),
            servers: HashMap::new(),
            clients: HashMap::new(),
            forks: HashMap::new(),
            waiting: HashMap::new(),
            pending_auth: HashMap::new(),
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

    /// The devices whose certificates are revoked now (the whole set, as
    /// the identity service lists it). Their bindings go at once; they can
    /// neither register nor call from then on, whatever their connection.
    pub fn handle_revoked(&mut self, devices: HashSet<DeviceId>, _now: Instant) {
        let gone = self.registrar.remove_devices(&devices);
        if gone > 0 {
            tracing::info!(bindings = gone, "removed bindings of revoked devices");
        }
        self.revoked = devices;
    }

    /// A connection closed.
    pub fn handle_conn_closed(&mut self, conn: ConnId, now: Instant) {
        self.registrar.conn_closed(conn);
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
// Requests.

impl Proxy {
    fn handle_request(&mut self, source: Source, mut req: Message, now: Instant) {
        // RFC 3261 §18.2.1 / RFC 3581: note the real source in the top Via.
        let Some(mut top) = req.values(&HeaderName::VIA).next().and_then(Via::parse) else {
            if !self.over_budget(&source, &req, now) {
                let resp = Message::response_to(&req, 400, "Bad Via Header", None);
                self.send(source.flow, resp.to_bytes());
            }
            return;
        };
        top.stamp_source(source.flow.remote);
        req.pop_first(&HeaderName::VIA);
        req.prepend(HeaderName::VIA, top.to_string());
        let method = req.method().cloned().unwrap_or(Method::Ack);
        let key = server_key(&top, &req, &method);

        if method == Method::Ack {
            self.handle_ack(source, req, &key, now);
            return;
        }
        if method == Method::Cancel {
            self.handle_cancel(source, &req, &key, now);
            return;
        }
        if let Some(tx) = self.servers.get(&key) {
            // A retransmission: repeat the last response (§17.2.1, §17.2.2).
            if let Some(last) = tx.last.clone() {
                self.metrics.retransmissions += 1;
                let flow = tx.reply_flow;
                self.send(flow, last);
            }
            return;
        }

        // Loose routing (§16.4): our own Route entries come off, and the
        // flow token in the first tells us where in-dialog requests go.
        let token = self.pop_our_routes(&mut req, now);

        let in_dialog = req.tag(&HeaderName::TO).is_some();
        if in_dialog || req.has(&HeaderName::ROUTE) {
            self.forward_stateless(source, req, token, now);
            return;
        }

        // Out of dialog, addressed to us: within the source's budget first,
        // before anything is answered.
        if self.over_budget(&source, &req, now) {
            return;
        }
        if req
            .header(&HeaderName::MAX_FORWARDS)
            .is_some_and(|v| v.trim() == "0")
            && method != Method::Options
        {
            self.refuse(&source, &req, 483, "Too Many Hops");
            return;
        }
        let Some(uri) = req.uri().cloned() else {
            return;
        };
        if self.servers.len() >= MAX_SERVER_TRANSACTIONS {
            let mut resp = self.stateless_response(&req, 503, "Service Unavailable");
            resp.push(HeaderName::RETRY_AFTER, "5");
            self.send(reply_flow(&source, &req), resp.to_bytes());
            return;
        }
        if !self.names_us(&uri) {
            self.metrics.relay_refused += 1;
            self.refuse(&source, &req, 403, "Relaying Forbidden");
            return;
        }
        if self.draining && matches!(method, Method::Invite | Method::Register) {
            let mut resp = Message::response_to(&req, 503, "Draining", Some("dr"));
            resp.push(HeaderName::RETRY_AFTER, "5");
            self.send(source.flow, resp.to_bytes());
            return;
        }
        if method == Method::Register {
            self.handle_register(source, req, key, now);
            return;
        }
        if uri.user.is_none() {
            if method == Method::Options {
                self.start_server(&key, source, &req, None);
                let mut resp = self.response(&key, &req, 200, "OK");
                resp.push(
                    HeaderName::ALLOW,
                    "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, UPDATE, REGISTER, INFO, PRACK",
                );
                resp.push(HeaderName::SUPPORTED, "outbound, path");
                self.send_response(&key, resp, now);
            } else {
                self.refuse(&source, &req, 404, "Not Found");
            }
            return;
        }
        let Some(handle) = uri.user_unescaped().and_then(|u| Handle::parse(&u).ok()) else {
            self.refuse(&source, &req, 404, "Not Found");
            return;
        };
        let caller = match self.authenticate(&source, &mut req, &method, now) {
            Auth::Caller(c) => c,
            other => {
                self.refuse_auth(&source, &req, &other, 407, now);
                return;
            }
        };
        // A caller calls as itself (the From is what the callee's devices
        // and the wake-up push show).
        let from = self.caller_handle(&req);
        match caller {
            Caller::Anyone => {}
            Caller::Account(who) if from.as_ref() == Some(&who) => {}
            Caller::Device(device) => {
                let Some(from) = from else {
                    self.metrics.caller_id_refused += 1;
                    self.refuse(&source, &req, 403, "From Is Not Yours");
                    return;
                };
                let registered = self
                    .registrar
                    .bindings(&from)
                    .iter()
                    .any(|b| b.device == Some(device));
                if !registered {
                    // Ask the directory whether the device is listed for
                    // that handle; the request waits in its transaction.
                    self.await_directory(source, req, key, device, from, Some(handle), now);
                    return;
                }
            }
            Caller::Account(_) => {
                self.metrics.caller_id_refused += 1;
                self.refuse(&source, &req, 403, "From Is Not Yours");
                return;
            }
        }
        self.admit_call(source, req, key, handle, now);
    }

    /// An authenticated out-of-dialog request to `handle`: forked, unless
    /// too many calls are in progress.
    fn admit_call(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        handle: Handle,
        now: Instant,
    ) {
        if self.forks.len() >= self.config.max_calls {
            // In the request's transaction when it waited for the
            // directory, else statelessly.
            if self.servers.contains_key(&key) {
                let mut resp = self.response(&key, &req, 503, "Too Many Calls");
                resp.push(HeaderName::RETRY_AFTER, "1");
                self.send_response(&key, resp, now);
            } else {
                let mut resp = Message::response_to(&req, 503, "Too Many Calls", Some("mc"));
                resp.push(HeaderName::RETRY_AFTER, "1");
                self.send(source.flow, resp.to_bytes());
            }
            return;
        }
        self.start_fork(source, req, key, handle, now);
    }

    /// Parks a request from a device until the directory says whether the
    /// device is listed for `handle` ([`Event::Authorize`]): a REGISTER
    /// (`callee` none), or a call from `handle` to `callee`.
    #[allow(clippy::too_many_arguments)]
    fn await_directory(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        device: DeviceId,
        handle: Handle,
        callee: Option<Handle>,
        now: Instant,
    ) {
        // A transaction absorbs retransmissions meanwhile.
        self.start_server(&key, source, &req, None);
        if self.pending_auth.len() >= MAX_PENDING_AUTH {
            self.respond(&key, 503, "Service Unavailable", now);
            return;
        }
        if callee.is_some() && req.method() == Some(&Method::Invite) {
            let trying = Message::response_to(&req, 100, "Trying", None);
            self.send_response(&key, trying, now);
        }
        let id = self.next_id();
        self.pending_auth.insert(
            id,
            Pending {
                key,
                source,
                request: req,
                handle: handle.clone(),
                callee,
            },
        );
        self.events
            .push_back(Event::Authorize { id, device, handle });
    }

    /// The handle an out-of-dialog request's From names, if it is an
    /// address-of-record of ours.
    fn caller_handle(&self, req: &Message) -> Option<Handle> {
        let from = NameAddr::parse(req.header(&HeaderName::FROM)?).ok()?;
        if !self.names_us(&from.uri) {
            return None;
        }
        Handle::parse(&from.uri.user_unescaped()?).ok()
    }

    /// Takes one request from the source's budget; past it, a 503 over a
    /// connection (its peer is who it says) and silence over UDP (the
    /// source may be spoofed: answering would reflect traffic at it).
    fn over_budget(&mut self, source: &Source, req: &Message, now: Instant) -> bool {
        if self.spend_budget(source, now) {
            return false;
        }
        if source.flow.transport.reliable() && req.method() != Some(&Method::Ack) {
            let mut resp = Message::response_to(req, 503, "Service Unavailable", Some("rl"));
            resp.push(HeaderName::RETRY_AFTER, "1");
            self.send(source.flow, resp.to_bytes());
        }
        true
    }

    /// Takes one request from the source's budget (IPv6 by /64); false,
    /// counted, when it is spent.
    fn spend_budget(&mut self, source: &Source, now: Instant) -> bool {
        let within = self.limiter.take(source_key(source.flow.remote.ip()), now);
        if !within {
            self.metrics.rate_limited += 1;
        }
        within
    }

    /// A refusal to a party we have not authenticated: one response, with
    /// no transaction (nothing is retransmitted toward a source that may
    /// be spoofed, and nothing is kept); never an answer to an ACK.
    fn refuse(&mut self, source: &Source, req: &Message, code: u16, reason: &str) {
        if req.method() == Some(&Method::Ack) {
            return;
        }
        tracing::debug!(code, from = %source.flow.remote, "refused SIP request");
        let resp = self.stateless_response(req, code, reason);
        self.send(reply_flow(source, req), resp.to_bytes());
    }

    /// Takes our own entries off the top of the Route set (§16.4) and
    /// returns what the first one carried: the flows of its token (decoded
    /// once, here, for this Call-ID and not expired) and its `ftag`.
    fn pop_our_routes(&self, req: &mut Message, now: Instant) -> Option<RouteToken> {
        let mut token = None;
        let clock = self.clock(now);
        loop {
            let first = req.values(&HeaderName::ROUTE).next().map(str::to_string);
            let Some(first) = first else {
                break;
            };
            let Ok(na) = NameAddr::parse(&first) else {
                break;
            };
            let flows = na
                .uri
                .param("pf")
                .flatten()
                .and_then(|t| self.tokens.decode(t, req.call_id(), clock))
                // A route names both ends of a dialog.
                .filter(|f| f.len() == 2);
            if flows.is_none() && !self.names_us(&na.uri) {
                break;
            }
            if token.is_none() {
                token = Some(RouteToken {
                    signed: na.uri.has_param("pf"),
                    flows,
                    ftag: na.uri.param("ftag").flatten().map(str::to_string),
                });
            }
            req.pop_first(&HeaderName::ROUTE);
        }
        token
    }

    fn handle_ack(&mut self, source: Source, req: Message, key: &str, now: Instant) {
        let reliable = source.flow.transport.reliable();
        if let Some(tx) = self.servers.get_mut(key) {
            if tx.state == SState::Completed {
                // ACK for our non-2xx final (§17.2.1): absorbed, Timer I.
                tx.state = SState::Confirmed;
                let wait = if reliable {
                    Duration::ZERO
                } else {
                    self.config.t4
                };
                self.timers.at(
                    now + wait,
                    Timer::Server(key.to_string(), SState::Confirmed, 0),
                );
            }
            return;
        }
        // ACK for a 2xx is its own transaction and follows the route set;
        // an ACK for a stateless refusal of ours has no route and ends here.
        let mut req = req;
        let token = self.pop_our_routes(&mut req, now);
        if req.tag(&HeaderName::TO).is_some() {
            self.forward_stateless(source, req, token, now);
        }
    }

    fn handle_cancel(&mut self, source: Source, req: &Message, key: &str, now: Instant) {
        // The CANCEL matches the INVITE's server transaction (§9.2).
        let invite_key = key.replacen("|CANCEL", "|INVITE", 1);
        let Some(tx) = self.servers.get(&invite_key) else {
            if !self.over_budget(&source, req, now) {
                self.refuse(&source, req, 481, "Call/Transaction Does Not Exist");
            }
            return;
        };
        let (to_tag, fork, state) = (tx.to_tag.clone(), tx.fork, tx.state);
        let resp = Message::response_to(req, 200, "OK", Some(&to_tag));
        self.send(source.flow, resp.to_bytes());
        if state != SState::Proceeding {
            return; // final already sent: the CANCEL has no effect
        }
        let Some(fork_id) = fork else {
            // Still waiting for the directory: nothing was forked yet.
            self.respond(&invite_key, 487, "Request Terminated", now);
            return;
        };
        let reason = req.header(&HeaderName::REASON).map(str::to_string);
        self.cancel_branches(fork_id, None, reason, now);
        if let Some(f) = self.forks.get_mut(&fork_id) {
            f.waiting.clear();
            f.final_sent = true;
        }
        self.metrics.calls_cancelled += 1;
        self.respond(&invite_key, 487, "Request Terminated", now);
    }

    fn handle_register(&mut self, source: Source, req: Message, key: String, now: Instant) {
        let to = req
            .header(&HeaderName::TO)
            .and_then(|v| NameAddr::parse(v).ok());
        let Some(handle) = to
            .as_ref()
            .filter(|to| self.names_us(&to.uri))
            .and_then(|to| to.uri.user_unescaped())
            .and_then(|u| Handle::parse(&u).ok())
        else {
            self.metrics.registrations_refused += 1;
            self.refuse(&source, &req, 404, "Not Found");
            return;
        };
        if source.device.is_some_and(|d| self.revoked.contains(&d)) {
            self.metrics.registrations_refused += 1;
            self.refuse(&source, &req, 403, "Device Revoked");
            return;
        }
        if let Some(device) = source.device {
            // The answer waits for the directory.
            self.await_directory(source, req, key, device, handle, None, now);
            return;
        }
        match self.check_digest(&req, &HeaderName::AUTHORIZATION, "REGISTER", now) {
            Auth::Caller(Caller::Account(who)) if who == handle => {
                // In a transaction: a retransmission gets the same answer
                // without spending the nonce count again.
                self.start_server(&key, source, &req, None);
                self.register(Some(&key), &source, &req, &handle, now);
            }
            Auth::Caller(_) => {
                self.metrics.registrations_refused += 1;
                self.refuse(&source, &req, 403, "Forbidden");
            }
            other => {
                if matches!(other, Auth::BadUri) {
                    self.metrics.registrations_refused += 1;
                }
                self.refuse_auth(&source, &req, &other, 401, now);
            }
        }
    }

    /// A response outside any transaction, with a To tag derived from the
    /// request so a retransmission gets the same one.
    fn stateless_response(&self, req: &Message, code: u16, reason: &str) -> Message {
        let tag = self.tokens.digest(req.call_id().as_bytes());
        Message::response_to(req, code, reason, Some(&tag[..10]))
    }

    /// Applies a REGISTER and answers it: in the transaction `key` if
    /// there is one, else statelessly.
    fn register(
        &mut self,
        key: Option<&str>,
        source: &Source,
        req: &Message,
        handle: &Handle,
        now: Instant,
    ) {
        let answer = |this: &mut Proxy, resp: Message| match key {
            Some(k) => this.send_response(k, resp, now),
            None => this.send(reply_flow(source, req), resp.to_bytes()),
        };
        let respond = |this: &Proxy, code: u16, reason: &str| match key {
            Some(k) => this.response(k, req, code, reason),
            None => this.stateless_response(req, code, reason),
        };
        let result = self.registrar.register(
            handle,
            req,
            source.flow,
            source.device,
            &self.config.registrar,
            now,
        );
        match result {
            Err(refusal) => {
                self.metrics.registrations_refused += 1;
                let mut resp = respond(self, refusal.code, refusal.reason);
                if let Some(min) = refusal.min_expires {
                    resp.push(HeaderName::MIN_EXPIRES, min.to_string());
                }
                answer(self, resp);
            }
            Ok(update) => {
                self.metrics.registrations += 1;
                let mut resp = respond(self, 200, "OK");
                for c in self.registrar.contact_values(handle, now) {
                    resp.push(HeaderName::CONTACT, c);
                }
                let outbound = req
                    .values(&HeaderName::CONTACT)
                    .any(|c| c.contains("reg-id"));
                if outbound {
                    // RFC 5626 §6: confirm outbound and name the keepalive
                    // interval for connection flows.
                    resp.push(HeaderName::REQUIRE, "outbound");
                    if source.flow.transport.reliable() {
                        resp.push(
                            HeaderName::FLOW_TIMER,
                            self.config.flow_timer.as_secs().to_string(),
                        );
                    }
                }
                resp.push(HeaderName::SUPPORTED, "outbound, path");
                answer(self, resp);
                for i in update.awake {
                    self.binding_awake(handle, i, now);
                }
            }
        }
    }

    /// Who sent a request that needs a sender: a device by its
    /// certificate, or an account by its credentials (Proxy-Authorization,
    /// consumed here: §22.3).
    fn authenticate(
        &mut self,
        source: &Source,
        req: &mut Message,
        method: &Method,
        now: Instant,
    ) -> Auth {
        if let Some(d) = source.device {
            if self.revoked.contains(&d) {
                return Auth::Missing;
            }
            return Auth::Caller(Caller::Device(d));
        }
        if self.config.allow_unauthenticated_calls {
            return Auth::Caller(Caller::Anyone);
        }
        let auth = self.check_digest(req, &HeaderName::PROXY_AUTHORIZATION, method.as_str(), now);
        if matches!(auth, Auth::Caller(_)) {
            req.remove(&HeaderName::PROXY_AUTHORIZATION);
        }
        auth
    }

    /// Checks credentials in `header` against the accounts (RFC 3261
    /// §22.4, RFC 7616): the right password, for this Request-URI, with a
    /// nonce count not used before.
    fn check_digest(
        &mut self,
        req: &Message,
        header: &HeaderName,
        method: &str,
        now: Instant,
    ) -> Auth {
        let elapsed = now.duration_since(self.epoch);
        let found = req
            .lines(header)
            .filter_map(Credentials::parse)
            .filter(|c| c.realm == self.digest.realm())
            .find_map(|c| {
                let who = Handle::parse(&c.username).ok()?;
                let password = self.config.accounts.get(&who)?;
                Some((c, who, password))
            });
        let Some((creds, who, password)) = found else {
            return Auth::Missing;
        };
        if !req.uri().is_some_and(|u| same_resource(&creds.uri, u)) {
            return Auth::BadUri;
        }
        match self.digest.verify(&creds, method, password, elapsed) {
            Verdict::Wrong => Auth::Missing,
            Verdict::Stale => Auth::Stale,
            Verdict::Ok if self.nonce_counts.accept(&creds) => Auth::Caller(Caller::Account(who)),
            Verdict::Ok => {
                // A replayed answer: whoever sent it may not know the
                // password; the owner's client answers a stale challenge
                // without asking anyone.
                self.metrics.digest_replays += 1;
                Auth::Stale
            }
        }
    }

    /// The answer to a request whose authentication found no caller (an
    /// anonymous caller counts as none): 400 for a digest made for another
    /// URI, else a challenge (`code` 401 or 407), stale when the password
    /// was right.
    fn refuse_auth(
        &mut self,
        source: &Source,
        req: &Message,
        auth: &Auth,
        code: u16,
        now: Instant,
    ) {
        match auth {
            Auth::BadUri => self.refuse(source, req, 400, "Bad Request (Digest URI Mismatch)"),
            Auth::Stale => self.challenge_stale(source, req, code, true, now),
            Auth::Missing | Auth::Caller(_) => self.challenge(source, req, code, now),
        }
    }

    fn challenge(&mut self, source: &Source, req: &Message, code: u16, now: Instant) {
        self.challenge_stale(source, req, code, false, now);
    }

    /// A 401/407 challenge, sent once without a transaction: its ACK (for
    /// an INVITE) has no route of ours and is dropped, a retransmitted
    /// request is challenged again.
    fn challenge_stale(
        &mut self,
        source: &Source,
        req: &Message,
        code: u16,
        stale: bool,
        now: Instant,
    ) {
        let (reason, header) = if code == 401 {
            ("Unauthorized", HeaderName::WWW_AUTHENTICATE)
        } else {
            (
                "Proxy Authentication Required",
                HeaderName::PROXY_AUTHENTICATE,
            )
        };
        let mut resp = self.stateless_response(req, code, reason);
        let unique = self.next_id();
        for c in self.digest.challenges(
            now.duration_since(self.epoch),
            unique,
            stale,
            self.config.digest_sha256,
        ) {
            resp.push(header.clone(), c);
        }
        self.send(reply_flow(source, req), resp.to_bytes());
    }
}

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

// ---------------------------------------------------------------------
// Forking.

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
    /// Sleeping devices woken by push: `+sip.instance` or push token.
    waiting: Vec<String>,
    source_flow: Flow,
}

struct Branch {
    tx: String,
    done: bool,
    proceeding: bool,
    /// CANCEL once a provisional response arrives (§9.1).
    cancel_pending: Option<Option<String>>,
}

impl Proxy {
    fn start_fork(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        handle: Handle,
        now: Instant,
    ) {
        let invite = req.method() == Some(&Method::Invite);
        let fork_id = self.next_id();
        // A request that waited for the directory has its transaction
        // (and its 100 Trying) already.
        let parked = match self.servers.get_mut(&key) {
            Some(tx) => {
                tx.fork = Some(fork_id);
                true
            }
            None => false,
        };
        if !parked {
            self.start_server(&key, source, &req, Some(fork_id));
        }
        if invite && !parked {
            let trying = Message::response_to(&req, 100, "Trying", None);
            self.send_response(&key, trying, now);
        }
        let mut fork = Fork {
            server: key.clone(),
            request: req,
            handle: handle.clone(),
            invite,
            branches: Vec::new(),
            best: None,
            answered_at: None,
            final_sent: false,
            rang: false,
            waiting: Vec::new(),
            source_flow: source.flow,
        };
        let caller = fork
            .request
            .header(&HeaderName::FROM)
            .unwrap_or_default()
            .to_string();
        let mut targets = Vec::new();
        let mut wakes = Vec::new();
        for (_, b) in self.registrar.active(&handle, now) {
            match (b.target(), &b.push, b.device) {
                (Some(flow), _, _) => targets.push((flow, b.contact.uri.clone())),
                // Only a binding a device certificate registered is woken:
                // the push service checks the token is that device's.
                (None, Some(push), Some(device)) if invite => {
                    wakes.push((binding_id(b), push.clone(), device))
                }
                (None, _, _) => {}
            }
        }
        if !wakes.is_empty() {
            // Both budgets are spent only when both allow the wake.
            let from = self
                .caller_handle(&fork.request)
                .map(|h| h.as_str().to_string())
                .unwrap_or_else(|| source_key(source.flow.remote.ip()).to_string());
            let callee = WakeKey::Callee(handle.clone());
            let caller_key = WakeKey::Caller(from);
            let allowed = self.wake_limiter.wait_time(&callee, now).is_zero()
                && self.wake_limiter.wait_time(&caller_key, now).is_zero();
            if allowed {
                self.wake_limiter.take(callee, now);
                self.wake_limiter.take(caller_key, now);
            } else {
                self.metrics.wakes_limited += 1;
                tracing::debug!(callee = %handle.redacted(), "wake-ups past their budget; ringing awake devices only");
                wakes.clear();
            }
        }
        for (id, push, device) in wakes {
            self.metrics.push_wakes += 1;
            fork.waiting.push(id);
            self.events.push_back(Event::Wake(Wake {
                handle: handle.clone(),
                push,
                device,
                call_id: fork.request.call_id().to_string(),
                caller: caller.clone(),
            }));
        }
        self.metrics.forks += 1;
        if targets.is_empty() && fork.waiting.is_empty() {
            self.metrics.calls_unavailable += 1;
            self.forks.insert(fork_id, fork);
            self.finish(fork_id, 480, "Temporarily Unavailable", now);
            return;
        }
        if !fork.waiting.is_empty() {
            self.waiting.entry(handle).or_default().push(fork_id);
            self.timers
                .at(now + self.config.push_window, Timer::PushWindow(fork_id));
        }
        if invite {
            self.timers
                .at(now + self.config.ring_timeout, Timer::Ring(fork_id));
        }
        self.forks.insert(fork_id, fork);
        for (flow, uri) in targets {
            self.add_branch(fork_id, flow, uri, now);
        }
    }

    /// A binding was (re)registered and is reachable: a call waiting on
    /// it by push gets its branch now.
    fn binding_awake(&mut self, handle: &Handle, index: usize, now: Instant) {
        let Some(forks) = self.waiting.get(handle).cloned() else {
            return;
        };
        let Some(b) = self.registrar.bindings(handle).get(index) else {
            return;
        };
        let (id, flow, uri) = match b.target() {
            Some(flow) => (binding_id(b), flow, b.contact.uri.clone()),
            None => return,
        };
        for fork_id in forks {
            let Some(f) = self.forks.get_mut(&fork_id) else {
                continue;
            };
            let Some(pos) = f.waiting.iter().position(|w| *w == id) else {
                continue;
            };
            f.waiting.remove(pos);
            if !f.final_sent {
                self.add_branch(fork_id, flow, uri.clone(), now);
            }
        }
        self.prune_waiting(handle);
    }

    fn add_branch(&mut self, fork_id: u64, flow: Flow, uri: Uri, now: Instant) {
        let Some(f) = self.forks.get(&fork_id) else {
            return;
        };
        let mut m = f.request.clone();
        if let StartLine::Request { uri: ruri, .. } = &mut m.start {
            *ruri = uri;
        }
        decrement_max_forwards(&mut m);
        if f.invite {
            let ftag = m.tag(&HeaderName::FROM).unwrap_or("").to_string();
            let expires = self.clock(now) + self.config.dialog_lifetime.as_secs();
            let token = self
                .tokens
                .encode(&[f.source_flow, flow], m.call_id(), expires);
            // Double Record-Route when the two sides use different
            // transports (RFC 5658), so each side reaches us over its own.
            let upstream = f.source_flow.transport;
            if upstream != flow.transport {
                m.prepend(
                    HeaderName::RECORD_ROUTE,
                    self.record_route(upstream, &ftag, &token),
                );
            }
            m.prepend(
                HeaderName::RECORD_ROUTE,
                self.record_route(flow.transport, &ftag, &token),
            );
        }
        let source_flow = f.source_flow;
        let invite = f.invite;
        let n = self.next_id();
        let branch = format!("{MAGIC_COOKIE}{}", self.tokens.digest(&n.to_be_bytes()));
        let via = self.our_via(flow.transport, &branch, source_flow, m.call_id(), now);
        m.prepend(HeaderName::VIA, via);
        let bytes = m.to_bytes();
        self.send(flow, bytes.clone());
        let tx = ClientTx {
            invite,
            cancel: false,
            state: CState::Calling,
            flow,
            bytes,
            request: m,
            fork: Some(fork_id),
            sent: 0,
        };
        self.arm_client(&branch, &tx, now);
        self.clients.insert(branch.clone(), tx);
        self.metrics.fork_branches += 1;
        if let Some(f) = self.forks.get_mut(&fork_id) {
            f.branches.push(Branch {
                tx: branch,
                done: false,
                proceeding: false,
                cancel_pending: None,
            });
        }
    }

    /// A response on a branch, after its client transaction saw it.
    fn fork_response(&mut self, fork_id: u64, branch: &str, resp: Message, now: Instant) {
        let code = resp.code().unwrap_or(500);
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        let Some(bi) = f.branches.iter().position(|b| b.tx == branch) else {
            return;
        };
        let server = f.server.clone();
        if code < 200 {
            let b = &mut f.branches[bi];
            b.proceeding = true;
            if let Some(reason) = b.cancel_pending.take() {
                let answered_at = f.answered_at;
                self.send_cancel(branch, reason, answered_at, now);
                return;
            }
            if code == 100 || f.final_sent {
                return;
            }
            if code == 180 || code == 183 {
                f.rang = true;
            }
            self.relay_response(&server, resp, now);
            return;
        }
        f.branches[bi].done = true;
        if (200..300).contains(&code) {
            // Every 2xx goes upstream (§16.7 step 5).
            let first = f.answered_at.is_none() && !f.final_sent;
            if first {
                f.answered_at = Some(now);
                f.final_sent = true;
                f.waiting.clear();
                if f.invite {
                    self.metrics.calls_answered += 1;
                }
                self.cancel_branches(
                    fork_id,
                    Some(branch),
                    Some("SIP;cause=200;text=\"Call completed elsewhere\"".into()),
                    now,
                );
            }
            self.relay_response(&server, resp, now);
            return;
        }
        if f.final_sent {
            return;
        }
        if code >= 600 {
            f.answered_at = Some(now);
            f.final_sent = true;
            f.waiting.clear();
            let text = match code {
                600 => "Busy Everywhere",
                603 => "Declined",
                604 => "Does Not Exist Anywhere",
                _ => "Global Failure",
            };
            self.metrics.calls_declined += 1;
            self.cancel_branches(
                fork_id,
                Some(branch),
                Some(format!("SIP;cause={code};text=\"{text}\"")),
                now,
            );
            self.relay_response(&server, resp, now);
            return;
        }
        // 3xx–5xx: keep the best (§16.7 step 6) and wait for the rest.
        let better = match &f.best {
            None => true,
            Some(b) => rank(code) < rank(b.code().unwrap_or(500)),
        };
        if better {
            f.best = Some(resp);
        }
        self.maybe_finish(fork_id, now);
    }

    /// All branches are done and nobody is being woken: answer upstream.
    fn maybe_finish(&mut self, fork_id: u64, now: Instant) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        if f.final_sent || !f.waiting.is_empty() || f.branches.iter().any(|b| !b.done) {
            return;
        }
        f.final_sent = true;
        let server = f.server.clone();
        match f.best.take() {
            Some(mut best) => {
                self.metrics.calls_failed += 1;
                if best.code() == Some(503) {
                    // §16.7 step 6: a 503 from downstream becomes 500.
                    best.start = StartLine::Response {
                        code: 500,
                        reason: "Server Internal Error".into(),
                    };
                }
                self.relay_response(&server, best, now);
            }
            None => {
                self.metrics.calls_unavailable += 1;
                self.respond(&server, 480, "Temporarily Unavailable", now);
            }
        }
    }

    /// Sends the proxy's own final response for a fork.
    fn finish(&mut self, fork_id: u64, code: u16, reason: &str, now: Instant) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        f.final_sent = true;
        let server = f.server.clone();
        self.respond(&server, code, reason, now);
    }

    /// CANCELs every branch but `except` (§16.7 step 10, §16.10).
    fn cancel_branches(
        &mut self,
        fork_id: u64,
        except: Option<&str>,
        reason: Option<String>,
        now: Instant,
    ) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        if !f.invite {
            for b in &mut f.branches {
                b.done = true;
            }
            return;
        }
        let answered_at = f.answered_at;
        let mut now_cancel = Vec::new();
        for b in &mut f.branches {
            if b.done || Some(b.tx.as_str()) == except {
                continue;
            }
            if b.proceeding {
                now_cancel.push(b.tx.clone());
                b.done = true;
            } else {
                b.cancel_pending = Some(reason.clone());
                b.done = true;
            }
        }
        for tx in now_cancel {
            self.send_cancel(&tx, reason.clone(), answered_at, now);
        }
    }

    /// Builds and sends the CANCEL for a branch (§9.1): the INVITE's
    /// Request-URI, Call-ID, From, To, CSeq number, top Via and Route.
    fn send_cancel(
        &mut self,
        branch: &str,
        reason: Option<String>,
        since: Option<Instant>,
        now: Instant,
    ) {
        let Some(tx) = self.clients.get(branch) else {
            return;
        };
        let Some(mut c) = hop_request(&tx.request, Method::Cancel, None) else {
            return;
        };
        if let Some(r) = reason {
            c.push(HeaderName::REASON, r);
        }
        let flow = tx.flow;
        let bytes = c.to_bytes();
        self.send(flow, bytes.clone());
        self.metrics.cancels_sent += 1;
        if let Some(t) = since {
            let us = now.saturating_duration_since(t).as_micros() as u64;
            self.metrics.cancel_latency_us_sum += us;
            self.metrics.cancel_latency_us_max = self.metrics.cancel_latency_us_max.max(us);
        }
        let ctx = ClientTx {
            invite: false,
            cancel: true,
            state: CState::Calling,
            flow,
            bytes,
            request: c,
            fork: None,
            sent: 0,
        };
        let key = format!("{branch}|CANCEL");
        self.arm_client(&key, &ctx, now);
        self.clients.insert(key, ctx);
    }

    fn prune_waiting(&mut self, handle: &Handle) {
        if let Some(list) = self.waiting.get_mut(handle) {
            let forks = &self.forks;
            list.retain(|id| forks.get(id).is_some_and(|f| !f.waiting.is_empty()));
            if list.is_empty() {
                self.waiting.remove(handle);
            }
        }
    }

    fn drop_fork(&mut self, fork_id: u64) {
        if let Some(f) = self.forks.remove(&fork_id) {
            if !f.waiting.is_empty() {
                let h = f.handle.clone();
                self.prune_waiting(&h);
            }
        }
    }
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

// ---------------------------------------------------------------------
// Stateless forwarding.

impl Proxy {
    /// An in-dialog request, an ACK for a 2xx, or a request with a Route
    /// that is not ours: along the flows of our token, or nowhere.
    fn forward_stateless(
        &mut self,
        source: Source,
        req: Message,
        token: Option<RouteToken>,
        now: Instant,
    ) {
        let (flows, ftag) = match token {
            Some(RouteToken {
                flows: Some(flows),
                ftag,
                ..
            }) => (flows, ftag),
            // Our Record-Route, but its token is for another dialog, has
            // expired, or is from before a restart: no such dialog here.
            Some(RouteToken { signed: true, .. }) => {
                if !self.over_budget(&source, &req, now) {
                    self.refuse(&source, &req, 481, "Call/Transaction Does Not Exist");
                }
                return;
            }
            _ => {
                self.forward_foreign(source, req, now);
                return;
            }
        };
        if source.device.is_some_and(|d| self.revoked.contains(&d)) {
            self.refuse(&source, &req, 403, "Device Revoked");
            return;
        }
        // The token names the caller's flow, then the callee's; the
        // caller's From tag tells the direction.
        let from_caller = ftag.as_deref() == req.tag(&HeaderName::FROM);
        let flow = if from_caller { flows[1] } else { flows[0] };
        self.relay(source, req, flow, now);
    }

    /// A request with no route of ours whose next hop (the Route, else the
    /// Request-URI, §16.6 steps 6–7) is not a binding: forwarded only for
    /// an authenticated sender, to a host in [`Config::forward_to`].
    fn forward_foreign(&mut self, source: Source, mut req: Message, now: Instant) {
        let ack = req.method() == Some(&Method::Ack);
        // An ACK is never answered (the one for our stateless 407 ends
        // here), so it spends no budget; anything else may be.
        if !ack && self.over_budget(&source, &req, now) {
            return;
        }
        let next_uri = match req.values(&HeaderName::ROUTE).next() {
            Some(r) => NameAddr::parse(r).ok().map(|na| na.uri),
            None => req.uri().cloned(),
        };
        // Names us but carries no route of ours (expired, another
        // dialog's, or from before a restart): the dialog is not here.
        if next_uri.as_ref().is_some_and(|u| self.names_us(u)) {
            self.refuse(&source, &req, 404, "Not Here");
            return;
        }
        let allowed = next_uri.as_ref().and_then(Flow::for_uri).filter(|f| {
            self.config
                .forward_to
                .iter()
                .any(|n| n.contains(f.remote.ip()))
        });
        let Some(flow) = allowed else {
            self.metrics.relay_refused += 1;
            self.refuse(&source, &req, 403, "Relaying Forbidden");
            return;
        };
        if ack {
            // An ACK carries no credentials; only a device's goes on.
            if source.device.is_some_and(|d| !self.revoked.contains(&d)) {
                self.relay(source, req, flow, now);
            }
            return;
        }
        let method = req.method().cloned().unwrap_or(Method::Ack);
        match self.authenticate(&source, &mut req, &method, now) {
            Auth::Caller(Caller::Device(_) | Caller::Account(_)) => {
                self.relay(source, req, flow, now)
            }
            // `allow_unauthenticated_calls` does not open forwarding.
            other => self.refuse_auth(&source, &req, &other, 407, now),
        }
    }

    /// Sends a request on to `flow` with our Via on top (§16.6).
    fn relay(&mut self, source: Source, mut req: Message, flow: Flow, now: Instant) {
        if req
            .header(&HeaderName::MAX_FORWARDS)
            .is_some_and(|v| v.trim() == "0")
        {
            self.refuse(&source, &req, 483, "Too Many Hops");
            return;
        }
        let method = req.method().cloned().unwrap_or(Method::Ack);
        decrement_max_forwards(&mut req);
        // §16.11: a branch that depends only on the incoming one, so a
        // retransmission leaves with the same branch.
        let incoming = req
            .values(&HeaderName::VIA)
            .next()
            .unwrap_or("")
            .to_string();
        let mut seed = incoming.into_bytes();
        seed.extend_from_slice(method.as_str().as_bytes());
        let branch = format!("{MAGIC_COOKIE}s{}", self.tokens.digest(&seed));
        let via = self.our_via(
            flow.transport,
            &branch,
            reply_flow(&source, &req),
            req.call_id(),
            now,
        );
        req.prepend(HeaderName::VIA, via);
        self.send(flow, req.to_bytes());
    }
}

// ---------------------------------------------------------------------
// Responses.

impl Proxy {
    fn handle_response(&mut self, source: Source, mut resp: Message, now: Instant) {
        let Some(top) = resp.values(&HeaderName::VIA).next().and_then(Via::parse) else {
            return;
        };
        let Some(branch) = top.branch().map(str::to_string) else {
            return;
        };
        let cancel = resp.cseq().is_some_and(|(_, m)| m == Method::Cancel);
        let key = if cancel {
            format!("{branch}|CANCEL")
        } else {
            branch.clone()
        };
        if self.clients.contains_key(&key) {
            resp.pop_first(&HeaderName::VIA);
            self.client_response(&key, &top, resp, now);
            return;
        }
        // Not a transaction of ours: forwarded statelessly if our Via
        // carries our token, to the flow the token names.
        let Some(flow) = self.via_token(&top, resp.call_id(), now) else {
            tracing::debug!(from = %source.flow.remote, "response not for us");
            return;
        };
        resp.pop_first(&HeaderName::VIA);
        self.forward_response(flow, resp);
    }

    /// The flow in the token of one of our Vias: where the request came
    /// from, for responses of the same Call-ID, until the token expires.
    fn via_token(&self, via: &Via, call_id: &str, now: Instant) -> Option<Flow> {
        let flows = via
            .param("pf")
            .flatten()
            .and_then(|t| self.tokens.decode(t, call_id, self.clock(now)))?;
        match flows.as_slice() {
            [f] => Some(*f),
            _ => None,
        }
    }

    /// Sends a response back over `flow`, the one our Via token recorded.
    /// Over UDP the next Via may name another port of the same host
    /// (§18.2.2: `received` with the sent-by port); never another host.
    fn forward_response(&mut self, flow: Flow, resp: Message) {
        let mut flow = flow;
        if flow.conn.is_none() {
            let next = resp.values(&HeaderName::VIA).next().and_then(Via::parse);
            if let Some(addr) = next.and_then(|v| v.response_addr()) {
                if addr.ip() == flow.remote.ip() {
                    flow.remote = addr;
                }
            }
        }
        self.send(flow, resp.to_bytes());
    }

    fn client_response(&mut self, key: &str, ours: &Via, resp: Message, now: Instant) {
        let code = resp.code().unwrap_or(500);
        let reliable;
        let (fork, invite, cancel) = {
            let Some(tx) = self.clients.get_mut(key) else {
                return;
            };
            reliable = tx.flow.transport.reliable();
            (tx.fork, tx.invite, tx.cancel)
        };
        if cancel {
            if code >= 200 {
                self.client_complete(key, reliable, now);
            }
            return;
        }
        let state = self.clients.get(key).map(|t| t.state);
        if code < 200 {
            if state == Some(CState::Calling) {
                // Timer E goes on, at T2 from now on (§17.1.2.2).
                if let Some(tx) = self.clients.get_mut(key) {
                    tx.state = CState::Proceeding;
                }
            }
        } else if invite && code < 300 {
            // 2xx ends the client INVITE transaction (RFC 6026 keeps it
            // only to forward retransmissions, which our Via token does).
            self.clients.remove(key);
        } else {
            if state == Some(CState::Completed) {
                // A retransmitted final: re-ACK for INVITE, else absorb.
                if invite {
                    self.send_ack(key, &resp);
                }
                return;
            }
            if invite {
                self.send_ack(key, &resp);
            }
            self.client_complete(key, reliable, now);
        }
        match fork {
            Some(id) if self.forks.contains_key(&id) => self.fork_response(id, key, resp, now),
            // The call is over here, but every 2xx still goes upstream.
            _ if invite && (200..300).contains(&code) => {
                if let Some(flow) = self.via_token(ours, resp.call_id(), now) {
                    self.forward_response(flow, resp);
                }
            }
            _ => {}
        }
    }

    fn client_complete(&mut self, key: &str, reliable: bool, now: Instant) {
        let Some(tx) = self.clients.get_mut(key) else {
            return;
        };
        tx.state = CState::Completed;
        // Timer D (INVITE, ≥32 s) or K (T4) on UDP; zero on reliable.
        let wait = match (reliable, tx.invite) {
            (true, _) => Duration::ZERO,
            (false, true) => Duration::from_secs(32),
            (false, false) => self.config.t4,
        };
        self.timers.at(
            now + wait,
            Timer::Client(key.to_string(), CState::Completed, 0),
        );
    }

    /// The hop-by-hop ACK for a non-2xx final (§17.1.1.3).
    fn send_ack(&mut self, key: &str, resp: &Message) {
        let Some(tx) = self.clients.get(key) else {
            return;
        };
        let Some(ack) = hop_request(&tx.request, Method::Ack, resp.header(&HeaderName::TO)) else {
            return;
        };
        let flow = tx.flow;
        self.send(flow, ack.to_bytes());
    }
}

// ---------------------------------------------------------------------
// Transactions and timers.

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

impl Proxy {
    fn arm_client(&mut self, key: &str, tx: &ClientTx, now: Instant) {
        if !tx.flow.transport.reliable() {
            self.timers.at(
                now + self.config.t1,
                Timer::Client(key.to_string(), CState::Calling, 1),
            );
        }
        // Timer B / F.
        self.timers.at(
            now + 64 * self.config.t1,
            Timer::Client(key.to_string(), CState::Calling, 0),
        );
    }

    fn fire(&mut self, t: Timer, now: Instant) {
        match t {
            Timer::Client(key, armed, n) => self.client_timer(&key, armed, n, now),
            Timer::Server(key, armed, n) => self.server_timer(&key, armed, n, now),
            Timer::Ring(id) => {
                let Some(f) = self.forks.get(&id) else {
                    return;
                };
                if f.final_sent {
                    return;
                }
                let rang = f.rang;
                self.cancel_branches(id, None, None, now);
                if let Some(f) = self.forks.get_mut(&id) {
                    f.waiting.clear();
                }
                self.metrics.calls_no_answer += 1;
                if rang {
                    self.finish(id, 480, "Temporarily Unavailable", now);
                } else {
                    self.finish(id, 408, "Request Timeout", now);
                }
            }
            Timer::PushWindow(id) => {
                let Some(f) = self.forks.get_mut(&id) else {
                    return;
                };
                if f.waiting.is_empty() {
                    return;
                }
                f.waiting.clear();
                let h = f.handle.clone();
                self.prune_waiting(&h);
                self.maybe_finish(id, now);
            }
            Timer::Sweep => {
                self.registrar.sweep(now);
                self.limiter.prune(now);
                self.wake_limiter.prune(now);
                self.nonce_counts.prune(now.duration_since(self.epoch));
                self.timers.at(now + SWEEP_EVERY, Timer::Sweep);
            }
        }
    }

    fn client_timer(&mut self, key: &str, armed: CState, n: u32, now: Instant) {
        let (t1, t2) = (self.config.t1, self.config.t2);
        let Some(tx) = self.clients.get_mut(key) else {
            return;
        };
        if armed == CState::Completed {
            // Timer D / K: the transaction ends.
            if tx.state == CState::Completed {
                self.clients.remove(key);
            }
            return;
        }
        if tx.state == CState::Completed {
            return;
        }
        if n == 0 {
            // Timer B / F: no final response. For INVITE in Proceeding the
            // ring timeout governs instead (a proxy's Timer C).
            if tx.invite && tx.state == CState::Proceeding {
                return;
            }
            let fork = tx.fork;
            let request = tx.request.clone();
            self.clients.remove(key);
            if let Some(id) = fork {
                // As if the branch had answered 408 (§16.7 step 2), with
                // our own Via already taken off like any response's.
                let mut timeout =
                    Message::response_to(&request, 408, "Request Timeout", Some("tmo"));
                timeout.pop_first(&HeaderName::VIA);
                self.fork_response(id, key, timeout, now);
            }
            return;
        }
        // Timer A / E: retransmit (INVITE only while Calling; non-INVITE
        // until a final, at T2 once Proceeding).
        if n != tx.sent + 1 || (tx.invite && tx.state != CState::Calling) {
            return;
        }
        tx.sent = n;
        let next = match (tx.invite, tx.state) {
            (true, _) => t1 * 2u32.pow(n.min(10)),
            (false, CState::Proceeding) => t2,
            (false, _) => (t1 * 2u32.pow(n.min(10))).min(t2),
        };
        let (bytes, flow) = (tx.bytes.clone(), tx.flow);
        self.metrics.retransmissions += 1;
        self.send(flow, bytes);
        self.timers.at(
            now + next,
            Timer::Client(key.to_string(), CState::Calling, n + 1),
        );
    }

    fn server_timer(&mut self, key: &str, armed: SState, n: u32, now: Instant) {
        let (t1, t2) = (self.config.t1, self.config.t2);
        let Some(tx) = self.servers.get_mut(key) else {
            return;
        };
        if tx.state != armed {
            return;
        }
        match (armed, n) {
            (SState::Completed, n) if n > 0 && tx.invite => {
                // Timer G: retransmit the final until ACKed.
                if n != tx.sent + 1 {
                    return;
                }
                tx.sent = n;
                if let Some(last) = tx.last.clone() {
                    let flow = tx.reply_flow;
                    self.metrics.retransmissions += 1;
                    self.send(flow, last);
                }
                let next = (t1 * 2u32.pow(n.min(10))).min(t2);
                self.timers.at(
                    now + next,
                    Timer::Server(key.to_string(), SState::Completed, n + 1),
                );
            }
            _ => {
                // H, I, J, L: the transaction ends.
                let fork = tx.fork;
                self.servers.remove(key);
                if let Some(id) = fork {
                    self.drop_fork(id);
                }
            }
        }
    }

    fn start_server(&mut self, key: &str, source: Source, req: &Message, fork: Option<u64>) {
        let reply_flow = reply_flow(&source, req);
        let to_tag = self.tokens.digest(key.as_bytes())[..10].to_string();
        self.servers.insert(
            key.to_string(),
            ServerTx {
                invite: req.method() == Some(&Method::Invite),
                state: SState::Proceeding,
                request: Some(req.clone()),
                reply_flow,
                last: None,
                fork,
                to_tag,
                sent: 0,
            },
        );
    }

    fn response(&self, key: &str, req: &Message, code: u16, reason: &str) -> Message {
        let tag = self.servers.get(key).map(|t| t.to_tag.as_str());
        Message::response_to(req, code, reason, tag)
    }

    /// Our own final response in an existing server transaction.
    fn respond(&mut self, key: &str, code: u16, reason: &str, now: Instant) {
        let Some(req) = self.servers.get(key).and_then(|tx| tx.request.clone()) else {
            return; // the final response was sent already
        };
        let resp = self.response(key, &req, code, reason);
        self.send_response(key, resp, now);
    }

    /// A response from downstream, sent upstream in its server transaction.
    fn relay_response(&mut self, key: &str, resp: Message, now: Instant) {
        self.send_response(key, resp, now);
    }

    /// Sends a response in a server transaction and moves it on (§17.2).
    fn send_response(&mut self, key: &str, resp: Message, now: Instant) {
        let code = resp.code().unwrap_or(500);
        let bytes = resp.to_bytes();
        let (t1, t4) = (self.config.t1, self.config.t4);
        let Some(tx) = self.servers.get_mut(key) else {
            // No transaction (it ended): a late 2xx still goes upstream.
            return;
        };
        let flow = tx.reply_flow;
        let reliable = flow.transport.reliable();
        if code >= 200 && tx.state == SState::Proceeding {
            if tx.invite && code < 300 {
                tx.state = SState::Accepted;
                self.timers.at(
                    now + 64 * t1,
                    Timer::Server(key.to_string(), SState::Accepted, 0),
                );
            } else {
                tx.state = SState::Completed;
                if tx.invite {
                    if !reliable {
                        self.timers.at(
                            now + t1,
                            Timer::Server(key.to_string(), SState::Completed, 1),
                        );
                    }
                    // Timer H.
                    self.timers.at(
                        now + 64 * t1,
                        Timer::Server(key.to_string(), SState::Completed, 0),
                    );
                } else {
                    // Timer J.
                    let wait = if reliable { Duration::ZERO } else { 64 * t1 };
                    let _ = t4;
                    self.timers.at(
                        now + wait,
                        Timer::Server(key.to_string(), SState::Completed, 0),
                    );
                }
            }
        }
        // In Accepted, retransmitted INVITEs are absorbed (RFC 6026 §7.1).
        tx.last = (tx.state != SState::Accepted).then(|| bytes.clone());
        let release = if code >= 200 {
            tx.request = None;
            tx.fork
        } else {
            None
        };
        self.send(flow, bytes);
        if let Some(id) = release {
            self.release_fork(key, id);
        }
    }

    /// After the final response a fork is kept only while a branch still
    /// waits for a provisional before its CANCEL can go (§9.1); calls
    /// that are answered or over then cost only their transaction entry.
    fn release_fork(&mut self, key: &str, id: u64) {
        let pending = self
            .forks
            .get(&id)
            .is_some_and(|f| f.branches.iter().any(|b| b.cancel_pending.is_some()));
        if pending {
            return;
        }
        self.drop_fork(id);
        if let Some(tx) = self.servers.get_mut(key) {
            tx.fork = None;
        }
    }

    fn send(&mut self, flow: Flow, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { flow, bytes });
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn our_addr(&self, transport: Transport) -> SocketAddr {
        self.config
            .advertise
            .iter()
            .find(|(t, _)| *t == transport)
            .or_else(|| self.config.advertise.first())
            .map(|(_, a)| *a)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)))
    }

    /// Seconds on the proxy's clock, the time base of tokens.
    fn clock(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Our Via, whose token names `inbound` (where responses go back) for
    /// as long as responses to the request may come: the ring timeout and
    /// a transaction's 64·T1 (a 2xx is retransmitted that long).
    fn our_via(
        &self,
        transport: Transport,
        branch: &str,
        inbound: Flow,
        call_id: &str,
        now: Instant,
    ) -> String {
        let addr = self.our_addr(transport);
        let lifetime = self.config.ring_timeout + 64 * self.config.t1;
        let expires = self.clock(now) + lifetime.as_secs() + 1;
        let token = self.tokens.encode(&[inbound], call_id, expires);
        // A SocketAddr writes an IPv6 host in brackets, as sent-by wants.
        format!(
            "SIP/2.0/{} {addr};branch={branch};pf={token}",
            transport.via()
        )
    }

    fn record_route(&self, transport: Transport, ftag: &str, token: &str) -> String {
        let addr = self.our_addr(transport);
        let mut uri = Uri::host_port(&addr.ip().to_string(), Some(addr.port()));
        if transport != Transport::Udp {
            uri.set_param("transport", Some(transport.uri_param()));
        }
        uri.set_param("lr", None);
        if !ftag.is_empty() && ftag.bytes().all(crate::core::message::is_token_byte) {
            uri.set_param("ftag", Some(ftag));
        }
        uri.set_param("pf", Some(token));
        format!("<{uri}>")
    }

    /// A URI with one of our domains, or one of our addresses.
    fn names_us(&self, uri: &Uri) -> bool {
        if self
            .config
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&uri.host))
        {
            return true;
        }
        let Ok(ip) = uri.host.parse::<IpAddr>() else {
            return false;
        };
        self.config.advertise.iter().any(|(t, a)| {
            a.ip() == ip && uri.port.unwrap_or(crate::core::via::default_port(t.via())) == a.port()
        })
    }
}

/// What our own Route entry carried back to us.
struct RouteToken {
    /// It had a token (valid or not): it was a Record-Route of ours.
    signed: bool,
    /// Caller's and callee's flows, when the signed token was valid.
    flows: Option<Vec<Flow>>,
    /// The caller's From tag: tells the two directions apart.
    ftag: Option<String>,
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

//! The tokio shell around one [`Proxy`] core: UDP sockets, TCP and TLS
//! listeners (and outgoing TCP connections), one task that owns the core,
//! and the two hooks the binary wires to the other services.
//!
//! The core task is a single `select!` over the input channel and the
//! core's next timer; after each batch of inputs it drains the core's
//! transmits (UDP is sent at once; connections have a writer task each)
//! and events ([`Directory`] for REGISTER by device certificate, [`Waker`]
//! for VoIP pushes).

use crate::core::flow::{ConnId, Flow, Source, Transmit, Transport};
use crate::core::message::{Frame, Framer, MAX_MESSAGE};
use crate::core::proxy::{self, Event, Metrics, Proxy};
use crate::error::Error;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use wire::handle::Handle;
use wire::keys::DeviceId;

/// Where to listen and how the proxy behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// UDP listen addresses. Default 0.0.0.0:5060.
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses. Default 0.0.0.0:5060.
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses (needs a TLS configuration). Default 0.0.0.0:5061.
    pub tls: Vec<SocketAddr>,
    /// Secure WebSocket listen addresses (RFC 7118, subprotocol `sip`;
    /// needs a TLS configuration). Default 0.0.0.0:8445.
    pub wss: Vec<SocketAddr>,
    pub proxy: proxy::Config,
    /// Open connections at most, both directions; more are refused.
    /// Default 10,000 (the process shares a 20,000-file limit).
    pub max_connections: usize,
    /// Accepted connections at most from one source address (IPv6: one
    /// /64), so one host cannot take every slot. Default 256.
    pub max_connections_per_source: usize,
    /// A connection that sends nothing (not even a CRLF keepalive) for
    /// this long is closed. Default: twice the flow timer plus 30 s.
    pub idle_timeout: Duration,
    /// How long an accepted connection without a device certificate may
    /// take to send its first whole SIP message; until then it has not
    /// earned the idle timeout. Default 20 s.
    pub first_message_timeout: Duration,
    /// UDP socket receive and send buffers, bytes (the kernel caps them at
    /// net.core.rmem_max / wmem_max). Default 4 MiB: a burst of requests
    /// waits in the socket instead of being dropped and retransmitted.
    pub udp_buffer: usize,
    /// The key of digest nonces and route tokens. Nodes that share it (and
    /// a node restarted with it) take each other's challenges and tokens;
    /// None: a random one for this process alone.
    pub secret: Option<[u8; 32]>,
}

impl Default for Config {
    fn default() -> Self {
        let proxy = proxy::Config::default();
        Config {
            udp: vec![SocketAddr::from(([0, 0, 0, 0], 5060))],
            tcp: vec![SocketAddr::from(([0, 0, 0, 0], 5060))],
            tls: vec![SocketAddr::from(([0, 0, 0, 0], 5061))],
            wss: vec![SocketAddr::from(([0, 0, 0, 0], 8445))],
            idle_timeout: 2 * proxy.flow_timer + Duration::from_secs(30),
            proxy,
            max_connections: 10_000,
            max_connections_per_source: 256,
            first_message_timeout: Duration::from_secs(20),
            udp_buffer: 4 << 20,
            secret: None,
        }
    }
}

/// Answers "is this device listed for this handle?" (the identity
/// service in `parley up`).
pub trait Directory: Send + Sync + 'static {
    fn authorize(
        &self,
        device: DeviceId,
        handle: Handle,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>>;
}

pub use crate::core::proxy::Wake;

/// Sends a VoIP push to a sleeping device (the courier in `parley up`,
/// or Apple's and Google's services). What it learns of the token goes
/// back through `report`.
pub trait Waker: Send + Sync + 'static {
    fn wake(&self, wake: Wake, report: WakeReport);
}

/// How a [`Waker`] tells signaling what became of a wake-up.
#[derive(Debug, Clone)]
pub struct WakeReport {
    inputs: mpsc::Sender<Input>,
    handle: wire::handle::Handle,
    prid: String,
}

impl WakeReport {
    /// The push service says the token is dead: the device's bindings
    /// for it go, and calls waiting only for it end (480) at once.
    pub async fn token_gone(self) {
        let _ = self
            .inputs
            .send(Input::PushGone(self.handle, self.prid))
            .await;
    }
}

pub use crate::core::proxy::SharedBinding;

/// Where nodes of a cluster keep their bindings for each other (cluster
/// mode; see [`Server::start_shared`]).
pub trait Location: Send + Sync + 'static {
    /// This node's bindings of `handle` are now `bindings` (replacing what
    /// it stored for the handle before). Stores run one after another, in
    /// the order the proxy made them.
    fn store(
        &self,
        handle: Handle,
        bindings: Vec<SharedBinding>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
    /// The bindings of `handle` other nodes stored (unexpired); empty when
    /// the store cannot be read.
    fn lookup(
        &self,
        handle: Handle,
    ) -> Pin<Box<dyn Future<Output = Vec<SharedBinding>> + Send + 'static>>;
    /// What other nodes do from now on, as they do it: the bindings they
    /// store (a call here waiting for a device woken by push rings it
    /// wherever it registers) and the digest answers they take. `None`:
    /// this location tells of nothing.
    fn watch(&self) -> Option<mpsc::Receiver<Notice>> {
        None
    }
    /// Tells the other nodes that a digest answer with this nonce and
    /// count was taken here.
    fn nonce_used(&self, _nonce: String, _nc: u32) {}
    /// Tells the other nodes that a push token of a device of `handle` is
    /// dead, so that their bindings naming it go too.
    fn push_gone(&self, _handle: Handle, _prid: String) {}
}

/// What another node did, as [`Location::watch`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// It stored its bindings of a handle.
    Bound(Handle, Vec<SharedBinding>),
    /// It took a digest answer with this nonce and count.
    NonceUsed(String, u32),
    /// It heard that this push token of a device of the handle is dead.
    PushGone(Handle, String),
}

/// What the core asks of the rest of the system.
struct Services {
    directory: Arc<dyn Directory>,
    waker: Arc<dyn Waker>,
    location: Option<Arc<dyn Location>>,
}

/// Stores that may wait at once before new ones are dropped (a store that
/// slow is down; the bindings are stored again at the next REGISTER).
const STORES_QUEUED: usize = 4096;

/// A directory that refuses every device: for a proxy with digest
/// accounts only.
#[derive(Debug)]
pub struct NoDirectory;

impl Directory for NoDirectory {
    fn authorize(
        &self,
        _: DeviceId,
        _: Handle,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> {
        Box::pin(async { false })
    }
}

/// A waker that drops pushes, logging them.
#[derive(Debug)]
pub struct NoWaker;

impl Waker for NoWaker {
    fn wake(&self, wake: Wake, _: WakeReport) {
        tracing::warn!(handle = %wake.handle.redacted(), provider = %wake.push.provider, "no push service configured; cannot wake device");
    }
}

/// The running service.
pub struct Server {
    udp_addrs: Vec<SocketAddr>,
    tcp_addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    wss_addrs: Vec<SocketAddr>,
    metrics: Arc<Mutex<Metrics>>,
    counters: Arc<Counters>,
    inputs: mpsc::Sender<Input>,
    shutdown: watch::Sender<bool>,
    core: tokio::task::JoinHandle<()>,
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("udp", &self.udp_addrs)
            .field("tcp", &self.tcp_addrs)
            .field("tls", &self.tls_addrs)
            .field("wss", &self.wss_addrs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) refused_connections: AtomicU64,
    pub(crate) dropped_sends: AtomicU64,
}

pub(crate) enum Input {
    Message(Source, Vec<u8>),
    Closed(ConnId),
    Authorized(u64, bool),
    Revoked(std::collections::HashSet<DeviceId>),
    Located(u64, Vec<SharedBinding>),
    Notice(Notice),
    /// A push token turned out dead.
    PushGone(wire::handle::Handle, String),
    Drain,
}

#[derive(Default)]
struct Conns {
    by_id: HashMap<ConnId, mpsc::Sender<Vec<u8>>>,
    by_remote: HashMap<(Transport, SocketAddr), ConnId>,
}

pub(crate) struct Shared {
    conns: Mutex<Conns>,
    next_conn: AtomicU64,
    pub(crate) inputs: mpsc::Sender<Input>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) limit: Arc<tokio::sync::Semaphore>,
    /// Accepted connections per source.
    per_source: wire::net::PerSourceLimit,
    pub(crate) idle_timeout: Duration,
    pub(crate) first_message_timeout: Duration,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// A connection's place: one of `max_connections` and, for an accepted
/// connection, one of its source's `max_connections_per_source`. Given
/// back when dropped.
pub(crate) struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _source: Option<wire::net::SourceClaim>,
}

impl Server {
    /// Binds every listener and starts the core. `tls` is the server
    /// configuration for the TLS listeners (see [`tls_config`]).
    pub async fn start(
        config: Config,
        tls: Option<Arc<rustls::ServerConfig>>,
        directory: Arc<dyn Directory>,
        waker: Arc<dyn Waker>,
    ) -> Result<Server, Error> {
        Server::start_with(config, tls, directory, waker, None).await
    }

    /// As [`Server::start`], as one node of several that share their
    /// bindings through `location`: a call arriving here reaches devices
    /// registered at other nodes through those nodes.
    pub async fn start_shared(
        mut config: Config,
        tls: Option<Arc<rustls::ServerConfig>>,
        directory: Arc<dyn Directory>,
        waker: Arc<dyn Waker>,
        location: Arc<dyn Location>,
    ) -> Result<Server, Error> {
        config.proxy.shared_location = true;
        Server::start_with(config, tls, directory, waker, Some(location)).await
    }

    async fn start_with(
        mut config: Config,
        tls: Option<Arc<rustls::ServerConfig>>,
        directory: Arc<dyn Directory>,
        waker: Arc<dyn Waker>,
        location: Option<Arc<dyn Location>>,
    ) -> Result<Server, Error> {
        let mut udp = Vec::new();
        for addr in &config.udp {
            let s = bind_udp(*addr, config.udp_buffer).map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            udp.push(Arc::new(s));
        }
        let tcp = bind_tcp(&config.tcp).await?;
        let (tls_listeners, wss_listeners) = match tls {
            Some(_) => (bind_tcp(&config.tls).await?, bind_tcp(&config.wss).await?),
            None => (Vec::new(), Vec::new()),
        };
        let udp_addrs: Vec<SocketAddr> = udp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let tcp_addrs: Vec<SocketAddr> = tcp.iter().filter_map(|s| s.local_addr().ok()).collect();
        let tls_addrs: Vec<SocketAddr> = tls_listeners
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        let wss_addrs: Vec<SocketAddr> = wss_listeners
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect();
        if config.proxy.advertise.is_empty() {
            // Without a configured public address, advertise what we bound
            // (an unspecified address becomes loopback: set `advertise` for
            // anything reachable from elsewhere).
            let fix = |a: SocketAddr| {
                if a.ip().is_unspecified() {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
                } else {
                    a
                }
            };
            for (t, list) in [
                (Transport::Udp, &udp_addrs),
                (Transport::Tcp, &tcp_addrs),
                (Transport::Tls, &tls_addrs),
                (Transport::Wss, &wss_addrs),
            ] {
                if let Some(a) = list.first() {
                    config.proxy.advertise.push((t, fix(*a)));
                }
            }
        }

        let (inputs, rx) = mpsc::channel(4096);
        let (shutdown, stop) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        let shared = Arc::new(Shared {
            conns: Mutex::new(Conns::default()),
            next_conn: AtomicU64::new(1),
            inputs: inputs.clone(),
            counters: counters.clone(),
            limit: Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1))),
            per_source: wire::net::PerSourceLimit::new(config.max_connections_per_source),
            idle_timeout: config.idle_timeout,
            first_message_timeout: config.first_message_timeout,
            shutdown: stop.clone(),
        });
        let metrics = Arc::new(Mutex::new(Metrics::default()));
        let rng = ring::rand::SystemRandom::new();
        let random = |buf: &mut [u8]| {
            ring::rand::SecureRandom::fill(&rng, buf)
                .map_err(|_| Error::Tls("no system randomness".into()))
        };
        let secret = match config.secret {
            Some(s) => s,
            None => {
                let mut s = [0u8; 32];
                random(&mut s)?;
                s
            }
        };
        let mut first_id = [0u8; 8];
        random(&mut first_id)?;
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let core = Proxy::new(config.proxy.clone(), secret, Instant::now())
            .with_wall_clock(unix, u64::from_be_bytes(first_id));
        let mut listeners = Vec::new();
        for s in &udp {
            listeners.push(tokio::spawn(udp_reader(
                s.clone(),
                inputs.clone(),
                stop.clone(),
            )));
        }
        for l in tcp {
            listeners.push(tokio::spawn(accept_loop(l, None, shared.clone())));
        }
        if let Some(tls) = tls {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            for l in tls_listeners {
                listeners.push(tokio::spawn(accept_loop(
                    l,
                    Some(acceptor.clone()),
                    shared.clone(),
                )));
            }
            for l in wss_listeners {
                listeners.push(tokio::spawn(crate::websocket::accept_loop(
                    l,
                    acceptor.clone(),
                    shared.clone(),
                )));
            }
        }
        let core = tokio::spawn(run_core(
            core,
            rx,
            udp,
            shared,
            Services {
                directory,
                waker,
                location,
            },
            metrics.clone(),
        ));
        tracing::info!(udp = ?udp_addrs, tcp = ?tcp_addrs, tls = ?tls_addrs, wss = ?wss_addrs, "signaling listening");
        Ok(Server {
            udp_addrs,
            tcp_addrs,
            tls_addrs,
            wss_addrs,
            metrics,
            counters,
            inputs,
            shutdown,
            core,
            listeners,
        })
    }

    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls_addrs
    }

    pub fn wss_addrs(&self) -> &[SocketAddr] {
        &self.wss_addrs
    }

    /// Devices whose certificates are revoked (the whole list, or the
    /// newest): their bindings go and they can no longer register or call.
    pub async fn revoke_devices(&self, devices: std::collections::HashSet<DeviceId>) {
        let _ = self.inputs.send(Input::Revoked(devices)).await;
    }

    /// The core's counters, at most a second old.
    pub fn metrics(&self) -> Metrics {
        self.metrics.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Graceful drain: new calls and registrations get 503 at once; calls
    /// ringing get up to `grace` to finish; then everything stops.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.inputs.send(Input::Drain).await;
        let deadline = tokio::time::Instant::now() + grace;
        while tokio::time::Instant::now() < deadline {
            if self.metrics().calls_active == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.shutdown.send(true);
        for l in self.listeners {
            l.abort();
        }
        self.core.abort();
        let _ = self.core.await;
    }

    /// Prometheus text for the admin listener.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let m = self.metrics();
        let c = &self.counters;
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP parley_sip_{name} {help}\n# TYPE parley_sip_{name} {kind}\nparley_sip_{name} {v}"
            );
        };
        line(
            "requests_total",
            "counter",
            "SIP requests received.",
            m.requests,
        );
        line(
            "responses_total",
            "counter",
            "SIP responses received.",
            m.responses,
        );
        line(
            "malformed_total",
            "counter",
            "Messages that could not be parsed.",
            m.malformed,
        );
        line(
            "rate_limited_total",
            "counter",
            "Requests refused by the per-source limit.",
            m.rate_limited,
        );
        line(
            "relay_refused_total",
            "counter",
            "Requests refused for naming a host that is neither ours nor allowed (403 Relaying Forbidden).",
            m.relay_refused,
        );
        line(
            "digest_replays_total",
            "counter",
            "Digest answers sent again with a nonce count already used.",
            m.digest_replays,
        );
        line(
            "caller_id_refused_total",
            "counter",
            "Out-of-dialog requests refused because their From was not the sender's handle.",
            m.caller_id_refused,
        );
        line(
            "wakes_limited_total",
            "counter",
            "Calls that woke no device because the caller or callee was past its wake-up budget.",
            m.wakes_limited,
        );
        line(
            "registrations_total",
            "counter",
            "REGISTERs accepted.",
            m.registrations,
        );
        line(
            "registrations_refused_total",
            "counter",
            "REGISTERs refused.",
            m.registrations_refused,
        );
        line("bindings", "gauge", "Registered contacts.", m.bindings);
        line(
            "calls_active",
            "gauge",
            "Calls (forks) in progress.",
            m.calls_active,
        );
        line(
            "forks_total",
            "counter",
            "Requests forked to a handle's devices.",
            m.forks,
        );
        line(
            "fork_branches_total",
            "counter",
            "Branches created by forking (fan-out = branches / forks).",
            m.fork_branches,
        );
        line(
            "push_wakes_total",
            "counter",
            "VoIP pushes sent to wake a device.",
            m.push_wakes,
        );
        line(
            "cancels_sent_total",
            "counter",
            "CANCELs sent to losing branches.",
            m.cancels_sent,
        );
        line(
            "cancel_latency_microseconds_sum",
            "counter",
            "Time from the deciding answer to each CANCEL.",
            m.cancel_latency_us_sum,
        );
        line(
            "cancel_latency_microseconds_max",
            "gauge",
            "Longest time from the deciding answer to a CANCEL.",
            m.cancel_latency_us_max,
        );
        line(
            "retransmissions_total",
            "counter",
            "Requests and responses retransmitted over UDP.",
            m.retransmissions,
        );
        line(
            "connections",
            "gauge",
            "Open TCP/TLS connections.",
            c.connections.load(Ordering::Relaxed),
        );
        line(
            "connections_refused_total",
            "counter",
            "Connections refused at max_connections.",
            c.refused_connections.load(Ordering::Relaxed),
        );
        line(
            "dropped_sends_total",
            "counter",
            "Messages dropped: send buffer full or peer unreachable.",
            c.dropped_sends.load(Ordering::Relaxed),
        );
        let _ = writeln!(out, "# HELP parley_sip_calls_total Calls by outcome.\n# TYPE parley_sip_calls_total counter");
        for (outcome, v) in [
            ("answered", m.calls_answered),
            ("declined", m.calls_declined),
            ("cancelled", m.calls_cancelled),
            ("no_answer", m.calls_no_answer),
            ("unavailable", m.calls_unavailable),
            ("failed", m.calls_failed),
        ] {
            let _ = writeln!(out, "parley_sip_calls_total{{outcome=\"{outcome}\"}} {v}");
        }
    }
}

/// The TLS configuration for 5061: TLS 1.3; a client certificate from the
/// device CA is asked for but not required (standard user agents use
/// digest accounts instead); a device that presents one is identified by
/// it.
pub fn tls_config(
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    device_roots: rustls::RootCertStore,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(device_roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| Error::Tls(format!("device CA: {e}")))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("signaling certificate: {e}")))?;
    Ok(Arc::new(cfg))
}

async fn run_core(
    mut proxy: Proxy,
    mut rx: mpsc::Receiver<Input>,
    udp: Vec<Arc<UdpSocket>>,
    shared: Arc<Shared>,
    services: Services,
    metrics: Arc<Mutex<Metrics>>,
) {
    let Services {
        directory,
        waker,
        location,
    } = services;
    // What other nodes store reaches the core as it is stored.
    if let Some(mut notices) = location.as_ref().and_then(|l| l.watch()) {
        let inputs = shared.inputs.clone();
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                if inputs.send(Input::Notice(notice)).await.is_err() {
                    return;
                }
            }
        });
    }
    // Stores run in order, one after another, beside the core.
    let location = location.map(|l| {
        let (tx, mut rx) = mpsc::channel::<Pin<Box<dyn Future<Output = ()> + Send>>>(STORES_QUEUED);
        tokio::spawn(async move {
            while let Some(store) = rx.recv().await {
                store.await;
            }
        });
        (l, tx)
    });
    // Each socket's address family, read once rather than per datagram.
    let udp: Vec<(bool, Arc<UdpSocket>)> = udp
        .into_iter()
        .map(|s| (s.local_addr().map_or(true, |a| a.is_ipv4()), s))
        .collect();
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    publish.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = proxy.poll_timeout();
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else { break };
                let now = Instant::now();
                handle(&mut proxy, input, now);
                flush(&mut proxy, &udp, &shared);
                // Take what else is waiting: one wake-up serves a burst.
                // Each input's messages go out before the next is read, so
                // peers see a steady stream rather than bursts.
                for _ in 0..256 {
                    match rx.try_recv() {
                        Ok(input) => {
                            handle(&mut proxy, input, now);
                            flush(&mut proxy, &udp, &shared);
                        }
                        Err(_) => break,
                    }
                }
            }
            _ = sleep => proxy.handle_timeout(Instant::now()),
            _ = publish.tick() => {
                if let Ok(mut m) = metrics.lock() {
                    *m = proxy.metrics();
                }
            }
        }
        flush(&mut proxy, &udp, &shared);
        while let Some(e) = proxy.poll_event() {
            match e {
                Event::Authorize { id, device, handle } => {
                    let inputs = shared.inputs.clone();
                    let check = directory.authorize(device, handle);
                    tokio::spawn(async move {
                        let ok = check.await;
                        let _ = inputs.send(Input::Authorized(id, ok)).await;
                    });
                }
                Event::Wake(wake) => {
                    let report = WakeReport {
                        inputs: shared.inputs.clone(),
                        handle: wake.handle.clone(),
                        prid: wake.push.prid.clone(),
                    };
                    waker.wake(wake, report)
                }
                Event::Bound { handle, bindings } => {
                    if let Some((location, stores)) = &location {
                        if stores.try_send(location.store(handle, bindings)).is_err() {
                            tracing::warn!("binding store backlog full; a binding goes unshared until its next REGISTER");
                        }
                    }
                }
                Event::NonceUsed { nonce, nc } => {
                    if let Some((location, _)) = &location {
                        location.nonce_used(nonce, nc);
                    }
                }
                Event::PushGone { handle, prid } => {
                    if let Some((location, _)) = &location {
                        location.push_gone(handle, prid);
                    }
                }
                Event::Locate { id, handle } => {
                    let inputs = shared.inputs.clone();
                    let found = location.as_ref().map(|(l, _)| l.lookup(handle));
                    tokio::spawn(async move {
                        let bindings = match found {
                            Some(f) => f.await,
                            None => Vec::new(),
                        };
                        let _ = inputs.send(Input::Located(id, bindings)).await;
                    });
                }
            }
        }
    }
}

fn flush(proxy: &mut Proxy, udp: &[(bool, Arc<UdpSocket>)], shared: &Arc<Shared>) {
    while let Some(t) = proxy.poll_transmit() {
        send(udp, shared, t);
    }
}

fn handle(proxy: &mut Proxy, input: Input, now: Instant) {
    match input {
        Input::Message(source, bytes) => proxy.handle_input(source, &bytes, now),
        Input::Closed(conn) => proxy.handle_conn_closed(conn, now),
        Input::Authorized(id, ok) => proxy.handle_authorization(id, ok, now),
        Input::Revoked(devices) => proxy.handle_revoked(devices, now),
        Input::PushGone(handle, prid) => proxy.handle_push_gone(&handle, &prid, now),
        Input::Located(id, bindings) => proxy.handle_located(id, bindings, now),
        Input::Notice(Notice::Bound(handle, bindings)) => {
            for b in bindings {
                proxy.handle_remote_bound(&handle, b, now);
            }
        }
        Input::Notice(Notice::NonceUsed(nonce, nc)) => proxy.handle_nonce_used(&nonce, nc),
        Input::Notice(Notice::PushGone(handle, prid)) => {
            proxy.handle_remote_push_gone(&handle, &prid, now)
        }
        Input::Drain => proxy.start_drain(),
    }
}

/// Sends one transmit: UDP directly; over the named connection if it is
/// open, else any connection to the address, else a new TCP connection.
fn send(udp: &[(bool, Arc<UdpSocket>)], shared: &Arc<Shared>, t: Transmit) {
    if t.flow.transport == Transport::Udp {
        let socket = udp
            .iter()
            .find(|(v4, _)| *v4 == t.flow.remote.is_ipv4())
            .or(udp.first())
            .map(|(_, s)| s);
        match socket {
            Some(s) => {
                if s.try_send_to(&t.bytes, t.flow.remote).is_err() {
                    shared
                        .counters
                        .dropped_sends
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                shared
                    .counters
                    .dropped_sends
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        return;
    }
    let tx = {
        let Ok(conns) = shared.conns.lock() else {
            return;
        };
        let id = t
            .flow
            .conn
            .filter(|c| conns.by_id.contains_key(c))
            .or_else(|| {
                conns
                    .by_remote
                    .get(&(t.flow.transport, t.flow.remote))
                    .copied()
            });
        id.and_then(|id| conns.by_id.get(&id)).cloned()
    };
    match tx {
        Some(tx) => {
            if tx.try_send(t.bytes).is_err() {
                // A peer that does not read its connection loses messages
                // rather than stalling everyone else.
                shared
                    .counters
                    .dropped_sends
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        None if t.flow.transport == Transport::Tcp => {
            let shared = shared.clone();
            tokio::spawn(async move {
                let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
                    shared
                        .counters
                        .dropped_sends
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let slot = Slot {
                    _permit: permit,
                    _source: None,
                };
                let dial =
                    tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(t.flow.remote))
                        .await;
                match dial {
                    Ok(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        let remote = t.flow.remote;
                        run_conn(
                            stream,
                            Transport::Tcp,
                            remote,
                            None,
                            shared,
                            slot,
                            Some(t.bytes),
                        )
                        .await;
                    }
                    _ => {
                        tracing::debug!(to = %t.flow.remote, "cannot connect to SIP peer");
                        shared
                            .counters
                            .dropped_sends
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        None => {
            // TLS and WebSocket peers are reached over the connection they
            // opened; a device whose connection is gone is asleep.
            tracing::debug!(to = %t.flow.remote, transport = ?t.flow.transport, "no connection to peer");
            shared
                .counters
                .dropped_sends
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn bind_tcp(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, Error> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        out.push(
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen {
                    addr: *addr,
                    source,
                })?,
        );
    }
    Ok(out)
}

/// The next accepted connection with a connection slot, until shutdown.
/// Past `max_connections`, or its source's `max_connections_per_source`,
/// a new connection is closed at once.
pub(crate) async fn accept_next(
    listener: &TcpListener,
    shared: &Shared,
    stop: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, Slot)> {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return None,
        };
        let (stream, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
            shared
                .counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Some(claim) = shared.per_source.claim(remote.ip()) else {
            shared
                .counters
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%remote, "connections from this source at their limit");
            continue;
        };
        let slot = Slot {
            _permit: permit,
            _source: Some(claim),
        };
        let _ = stream.set_nodelay(true);
        return Some((stream, remote, slot));
    }
}

fn bind_udp(addr: SocketAddr, buffer: usize) -> std::io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: a smaller buffer than asked for is still a buffer.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

async fn udp_reader(
    socket: Arc<UdpSocket>,
    inputs: mpsc::Sender<Input>,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE + 1];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = stop.changed() => return,
        };
        let (n, from) = match received {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors surface here on some systems; keep serving.
                tracing::trace!(error = %e, "udp receive");
                continue;
            }
        };
        let data = &buf[..n];
        // Keepalives (RFC 5626 §3.5.1 CRLF, or zero-filled pings) carry no
        // message.
        if data.iter().all(|b| matches!(b, b'\r' | b'\n' | 0)) {
            continue;
        }
        let source = Source {
            flow: Flow {
                transport: Transport::Udp,
                remote: from,
                conn: None,
            },
            device: None,
        };
        if inputs
            .send(Input::Message(source, data.to_vec()))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.shutdown.clone();
    while let Some((stream, remote, slot)) = accept_next(&listener, &shared, &mut stop).await {
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => run_conn(stream, Transport::Tcp, remote, None, shared, slot, None).await,
                Some(acceptor) => {
                    let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await;
                    let Ok(Ok(tls)) = hs else {
                        tracing::debug!(%remote, "TLS handshake failed");
                        return;
                    };
                    let device = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| wire::device_cert::identity(c.as_ref()))
                        .map(|i| i.device);
                    run_conn(tls, Transport::Tls, remote, device, shared, slot, None).await
                }
            }
        });
    }
}

/// Reads frames from one connection into the core and writes what the
/// core sends to it, until either side closes, the idle timeout, or a
/// framing error.
async fn run_conn<S>(
    stream: S,
    transport: Transport,
    remote: SocketAddr,
    device: Option<DeviceId>,
    shared: Arc<Shared>,
    _slot: Slot,
    first: Option<Vec<u8>>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (flow, tx, mut rx) = shared.open_conn(transport, remote);
    // A connection we dialled carries our request: its peer answers.
    let dialled = first.is_some();
    if let Some(b) = first {
        let _ = tx.try_send(b);
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let writer_task = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if writer.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });

    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut stop = shared.shutdown.clone();
    let mut framer = Framer::default();
    // An accepted connection without a device certificate has a short
    // time to say something before it holds its slot for the idle timeout.
    let mut proven = device.is_some() || dialled;
    'read: loop {
        let wait = if proven {
            shared.idle_timeout
        } else {
            shared.first_message_timeout
        };
        let n = tokio::select! {
            r = tokio::time::timeout(wait, reader.read(&mut chunk)) => match r {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => n,
            },
            _ = stop.changed() => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match framer.next(&buf) {
                Ok(None) => break,
                Ok(Some(Frame::Keepalive { n, ping })) => {
                    buf.drain(..n);
                    if ping {
                        // RFC 5626 §3.5.1: a double CRLF is answered with one.
                        let _ = tx.try_send(b"\r\n".to_vec());
                    }
                }
                Ok(Some(Frame::Message(n))) => {
                    proven = true;
                    let msg: Vec<u8> = buf.drain(..n).collect();
                    let source = Source { flow, device };
                    if shared
                        .inputs
                        .send(Input::Message(source, msg))
                        .await
                        .is_err()
                    {
                        break 'read;
                    }
                }
                Err(e) => {
                    // A stream we cannot frame cannot be resynchronised
                    // (RFC 3261 §18.3): close it.
                    tracing::debug!(%remote, error = %e, "closing unframeable SIP connection");
                    break 'read;
                }
            }
        }
    }
    drop(tx);
    shared.close_conn(flow, writer_task).await;
}

impl Shared {
    /// Numbers a new connection and makes it reachable for sends: its
    /// flow, and the sending and receiving ends of its outgoing queue.
    pub(crate) fn open_conn(
        &self,
        transport: Transport,
        remote: SocketAddr,
    ) -> (Flow, mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>) {
        let id = ConnId(self.next_conn.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel::<Vec<u8>>(256);
        if let Ok(mut c) = self.conns.lock() {
            c.by_id.insert(id, tx.clone());
            c.by_remote.insert((transport, remote), id);
        }
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        let flow = Flow {
            transport,
            remote,
            conn: Some(id),
        };
        (flow, tx, rx)
    }

    /// Forgets a connection once its reader stopped, waits for its writer
    /// to flush, and tells the core.
    pub(crate) async fn close_conn(&self, flow: Flow, writer: tokio::task::JoinHandle<()>) {
        let Some(id) = flow.conn else {
            return;
        };
        let key = (flow.transport, flow.remote);
        if let Ok(mut c) = self.conns.lock() {
            c.by_id.remove(&id);
            if c.by_remote.get(&key) == Some(&id) {
                c.by_remote.remove(&key);
            }
        }
        let _ = writer.await;
        self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        let _ = self.inputs.send(Input::Closed(id)).await;
    }
}

//! The tokio shell around [`crate::core::Server`].
//!
//! One worker thread per core, each with a current-thread runtime, its own
//! `SO_REUSEPORT` client sockets (the kernel hashes a client's 4-tuple to one
//! worker, so its allocation lives there), its own relay sockets and its own
//! `Server`. A worker's tasks share the server through a `RefCell` and never
//! hold the borrow across an `.await`, so there is no lock and no channel
//! hop on the data path: a datagram is received into a reused buffer, the
//! core names the relay socket and the byte range, and it is sent from there.

use crate::core::{
    ClientAddr, ClientOutcome, ConnectionId, Event, PeerOutcome, RelayId, Server, Shared, Transmit,
    Transport,
};
use crate::message::stream_frame_len;
use crate::metrics::Metrics;
use crate::{channel_data, Config, Error};
use rustc_hash::FxHashMap;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// ALPN for STUN/TURN over TLS (RFC 7443).
pub const ALPN_STUN_TURN: &[u8] = b"stun.turn";
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream client that never allocates is dropped after this long.
const IDLE_STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Outgoing frames queued per stream client before a slow reader is cut off.
const STREAM_QUEUE: usize = 512;
/// Largest TCP frame: a STUN message or ChannelData of up to 64 KiB.
const MAX_FRAME: usize = 4 + 65535 + 3;

/// How long the relay waits for a peer to accept an RFC 6062 Connect.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 6062 peer connections by id, shared by the workers: the data
/// connection that binds one may be accepted by any worker.
type ConnTable = Arc<std::sync::Mutex<FxHashMap<ConnectionId, PeerConn>>>;

/// Relay ports held for EVEN-PORT reservations, with their expiry; shared
/// because the RESERVATION-TOKEN allocation may reach another worker.
type HeldPorts = Arc<std::sync::Mutex<FxHashMap<SocketAddr, (std::net::UdpSocket, Instant)>>>;

#[derive(Debug)]
enum PeerConn {
    /// Open, waiting for ConnectionBind.
    Waiting(std::net::TcpStream),
    /// Spliced; notifying ends the splice.
    Spliced(Arc<tokio::sync::Notify>),
}

/// A TLS server configuration that SIGHUP can replace; new connections use
/// the newest, established ones keep theirs.
pub type TlsConfig = Arc<RwLock<Arc<rustls::ServerConfig>>>;

/// A running relay: its bound addresses, metrics and controls.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    metrics: Vec<Arc<Metrics>>,
    udp: Vec<SocketAddr>,
    tcp: Vec<SocketAddr>,
    tls: Vec<SocketAddr>,
    tls_config: Option<TlsConfig>,
    shutdown: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    /// Binds every listener and starts the workers. Port 0 in a listen
    /// address picks a free port, shared by all workers.
    pub fn start(config: Config, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Relay, Error> {
        config.validate()?;
        let workers = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
        .min(64);
        let mut udp_addrs = config.udp.clone();
        if let (Some(p), Some(a)) = (config.udp.first().copied(), config.alternate) {
            // RFC 5780 needs all four IP × port combinations.
            for extra in [
                SocketAddr::new(p.ip(), a.port()),
                SocketAddr::new(a.ip(), p.port()),
                a,
            ] {
                if !udp_addrs.contains(&extra) {
                    udp_addrs.push(extra);
                }
            }
        }
        // The first worker's sockets fix the ports (port 0 → chosen now);
        // the others join them with SO_REUSEPORT.
        let mut udp_sets: Vec<Vec<std::net::UdpSocket>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut udp_bound = Vec::new();
        for &addr in &udp_addrs {
            ensure_free(addr, Type::DGRAM)?;
            let first = bind_udp(addr, true)?;
            let actual = first.local_addr()?;
            udp_bound.push(actual);
            udp_sets[0].push(first);
            for set in udp_sets.iter_mut().skip(1) {
                set.push(bind_udp(actual, true)?);
            }
        }
        let mut tcp_sets: Vec<Vec<(std::net::TcpListener, Transport)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut tcp_bound = Vec::new();
        let mut tls_bound = Vec::new();
        let tls_targets: &[SocketAddr] = if tls.is_some() { &config.tls } else { &[] };
        for (addrs, transport) in [
            (&config.tcp[..], Transport::Tcp),
            (tls_targets, Transport::Tls),
        ] {
            for &addr in addrs {
                ensure_free(addr, Type::STREAM)?;
                let first = bind_tcp(addr)?;
                let actual = first.local_addr()?;
                match transport {
                    Transport::Tls => tls_bound.push(actual),
                    _ => tcp_bound.push(actual),
                }
                tcp_sets[0].push((first, transport));
                for set in tcp_sets.iter_mut().skip(1) {
                    set.push((bind_tcp(actual)?, transport));
                }
            }
        }
        let mut own = udp_bound.clone();
        own.extend(&tcp_bound);
        own.extend(&tls_bound);
        let now = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let shared = Shared::new(config, random_bytes(), own, now, unix);
        let tls_config = tls.map(|c| Arc::new(RwLock::new(c)));
        let (shutdown, _) = watch::channel(false);
        let conns: ConnTable = Arc::default();
        let held: HeldPorts = Arc::default();
        let mut metrics = Vec::new();
        let mut threads = Vec::new();
        for (i, (udp, tcp)) in udp_sets.into_iter().zip(tcp_sets).enumerate() {
            let m = Arc::new(Metrics::default());
            metrics.push(m.clone());
            let seed = u64::from_be_bytes(random_bytes::<8>());
            let server = Server::new(shared.clone(), m, i as u16, workers as u16, seed);
            let rx = shutdown.subscribe();
            let tls = tls_config.clone();
            let tables = (conns.clone(), held.clone());
            let t = std::thread::Builder::new()
                .name(format!("turn-worker-{i}"))
                .spawn(move || run_worker(i, server, udp, tcp, tls, tables, rx))?;
            threads.push(t);
        }
        tracing::info!(
            workers,
            relay_ipv4 = ?shared.config().relay_ipv4,
            relay_ipv6 = ?shared.config().relay_ipv6,
            udp = ?udp_bound,
            tcp = ?tcp_bound,
            tls = ?tls_bound,
            "STUN/TURN relay listening"
        );
        Ok(Relay {
            shared,
            metrics,
            udp: udp_bound,
            tcp: tcp_bound,
            tls: tls_bound,
            tls_config,
            shutdown,
            threads,
        })
    }

    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp
    }
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.tls
    }

    /// Replaces credentials and, if given, the TLS certificate. Allocations
    /// and established connections are kept.
    pub fn reload(
        &self,
        users: &[(String, String)],
        rest_secrets: &[String],
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        self.shared.set_credentials(users, rest_secrets);
        if let (Some(slot), Some(new)) = (&self.tls_config, tls) {
            *slot.write().unwrap_or_else(|e| e.into_inner()) = new;
        }
        tracing::info!("relay credentials reloaded");
    }

    /// Appends the Prometheus text of every worker.
    pub fn render_metrics(&self, out: &mut String) {
        crate::metrics::render(&self.metrics, out);
    }

    /// Per-worker counters, for tests.
    pub fn metrics(&self) -> &[Arc<Metrics>] {
        &self.metrics
    }

    /// Stops accepting, closes every allocation and waits for the workers.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.threads {
            let _ = t.join();
        }
        tracing::info!("STUN/TURN relay stopped");
    }
}

/// A UDP socket: tokio's half for receiving, a duplicate descriptor for
/// sending. Tokio's `try_send_to` reports WouldBlock without trying until
/// the socket's first writable event has been polled, which loses the first
/// datagram sent on a fresh relay socket; a plain non-blocking `sendto`
/// fails only when the kernel's buffer is really full (then the datagram
/// is dropped, as UDP may).
#[derive(Debug)]
struct Udp {
    rx: UdpSocket,
    tx: std::net::UdpSocket,
}

impl Udp {
    fn new(s: std::net::UdpSocket) -> std::io::Result<Udp> {
        s.set_nonblocking(true)?;
        let tx = s.try_clone()?;
        Ok(Udp {
            rx: UdpSocket::from_std(s)?,
            tx,
        })
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.rx.local_addr()
    }

    fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        self.tx.send_to(buf, to)
    }
}

/// Per-worker state shared by the worker's tasks.
struct Worker {
    server: Server,
    udp: FxHashMap<SocketAddr, Rc<Udp>>,
    /// UDP relay sockets, and the task reading each (TCP relays have only
    /// their accept task).
    relays: FxHashMap<RelayId, (Option<Rc<Udp>>, tokio::task::JoinHandle<()>)>,
    streams: FxHashMap<ClientAddr, mpsc::Sender<Vec<u8>>>,
    /// Data connections whose ConnectionBind succeeded, to splice.
    splices: FxHashMap<ClientAddr, ConnectionId>,
    conns: ConnTable,
    held: HeldPorts,
}

type WorkerRef = Rc<RefCell<Worker>>;

fn run_worker(
    index: usize,
    server: Server,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<(std::net::TcpListener, Transport)>,
    tls: Option<TlsConfig>,
    (conns, held): (ConnTable, HeldPorts),
    shutdown: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start worker runtime");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let span = tracing::info_span!("turn_worker", index);
    local.block_on(
        &rt,
        async move {
            let state = Rc::new(RefCell::new(Worker {
                server,
                udp: FxHashMap::default(),
                relays: FxHashMap::default(),
                streams: FxHashMap::default(),
                splices: FxHashMap::default(),
                conns,
                held,
            }));
            WORKER.with(|w| *w.borrow_mut() = Some(state.clone()));
            for s in udp {
                match Udp::new(s) {
                    Ok(s) => {
                        let s = Rc::new(s);
                        let Ok(local) = s.local_addr() else { continue };
                        state.borrow_mut().udp.insert(local, s.clone());
                        tokio::task::spawn_local(udp_loop(
                            state.clone(),
                            s,
                            local,
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot register UDP socket"),
                }
            }
            for (l, transport) in tcp {
                match TcpListener::from_std(l) {
                    Ok(l) => {
                        tokio::task::spawn_local(accept_loop(
                            state.clone(),
                            l,
                            transport,
                            tls.clone(),
                            shutdown.clone(),
                        ));
                    }
                    Err(e) => tracing::error!(error = %e, "cannot register TCP listener"),
                }
            }
            timer_loop(state.clone(), shutdown).await;
            // Shutdown: release every allocation and close every socket.
            let mut st = state.borrow_mut();
            st.server.shutdown();
            drain(&mut st);
            for (_, (_, task)) in st.relays.drain() {
                task.abort();
            }
            st.streams.clear();
        }
        .instrument(span),
    );
}

async fn timer_loop(state: WorkerRef, mut shutdown: watch::Receiver<bool>) {
    loop {
        let now = Instant::now();
        // Re-check at least every second so timers armed meanwhile are seen.
        let next = state
            .borrow()
            .server
            .poll_timeout()
            .map_or(now + Duration::from_secs(1), |t| {
                t.min(now + Duration::from_secs(1))
            });
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = shutdown.changed() => return,
        }
        let mut st = state.borrow_mut();
        let now = Instant::now();
        st.server.handle_timeout(now);
        // Reservations nobody claimed give their ports back.
        (st.held.lock().unwrap_or_else(|e| e.into_inner())).retain(|_, (_, until)| *until > now);
        drain(&mut st);
    }
}

async fn udp_loop(
    state: WorkerRef,
    sock: Rc<Udp>,
    local: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = tokio::select! {
            r = sock.rx.recv_from(&mut buf) => match r {
                Ok(r) => r,
                // ICMP errors surface here on Linux; the socket stays usable.
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let client = ClientAddr {
            transport: Transport::Udp,
            remote: from,
            local,
        };
        client_input(&mut state.borrow_mut(), client, &buf[..n]);
    }
}

/// Hands one datagram or stream frame to the core, relays what it says to
/// forward, and carries out the rest.
fn client_input(st: &mut Worker, client: ClientAddr, input: &[u8]) {
    if let ClientOutcome::Forward {
        relay,
        peer,
        payload,
    } = st.server.handle_client_input(client, input, Instant::now())
    {
        if let Some((Some(s), _)) = st.relays.get(&relay) {
            let _ = s.send_to(&input[payload], peer);
        }
    }
    drain(st);
}

async fn relay_loop(state: WorkerRef, sock: Rc<Udp>, relay: RelayId) {
    // 4 bytes of headroom for the ChannelData header, 3 for TCP padding.
    let mut buf = vec![0u8; 4 + 65536 + 3];
    loop {
        let Ok((n, peer)) = sock.rx.recv_from(&mut buf[4..4 + 65536]).await else {
            continue;
        };
        let mut st = state.borrow_mut();
        let Worker {
            server,
            udp,
            streams,
            ..
        } = &mut *st;
        match server.handle_peer_input(relay, peer, &buf[4..4 + n], Instant::now()) {
            PeerOutcome::Drop => {}
            PeerOutcome::ChannelData { to, channel } => {
                buf[..4].copy_from_slice(&channel_data::encode_header(channel, n));
                if to.transport == Transport::Udp {
                    if let Some(s) = udp.get(&to.local) {
                        let _ = s.send_to(&buf[..4 + n], to.remote);
                    }
                } else {
                    let pad = channel_data::stream_padding(n);
                    buf[4 + n..4 + n + pad].fill(0);
                    send_stream(streams, to, buf[..4 + n + pad].to_vec());
                }
            }
            PeerOutcome::Indication { to, message } => {
                if to.transport == Transport::Udp {
                    if let Some(s) = udp.get(&to.local) {
                        let _ = s.send_to(message, to.remote);
                    }
                } else {
                    send_stream(streams, to, message.to_vec());
                }
            }
        }
    }
}

fn send_stream(
    streams: &mut FxHashMap<ClientAddr, mpsc::Sender<Vec<u8>>>,
    to: ClientAddr,
    frame: Vec<u8>,
) {
    if let Some(tx) = streams.get(&to) {
        if tx.try_send(frame).is_err() {
            // A reader this slow loses its connection rather than our memory.
            tracing::debug!("stream client too slow, closing");
            streams.remove(&to);
        }
    }
}

/// Carries out the core's queued events and transmits.
fn drain(st: &mut Worker) {
    loop {
        let mut progressed = false;
        while let Some(ev) = st.server.poll_event() {
            progressed = true;
            match ev {
                Event::BindRelay {
                    relay,
                    addr,
                    tcp: true,
                    ..
                } => {
                    let bound = bind_tcp_relay(addr).and_then(|l| {
                        let a = l.local_addr().ok()?;
                        Some((l, a))
                    });
                    let addr = bound.as_ref().map(|b| b.1);
                    if let Some((l, _)) = bound {
                        let task = tokio::task::spawn_local(tcp_relay_accept(l, relay));
                        st.relays.insert(relay, (None, task));
                    }
                    st.server.handle_relay_bound(relay, addr, Instant::now());
                }
                Event::BindRelay {
                    relay,
                    addr,
                    dont_fragment,
                    tcp: false,
                } => {
                    let held = (st.held.lock().unwrap_or_else(|e| e.into_inner()))
                        .remove(&addr)
                        .and_then(|(s, _)| take_held(s, dont_fragment));
                    let bound = held
                        .or_else(|| bind_relay(addr, dont_fragment))
                        .and_then(|s| {
                            let a = s.local_addr().ok()?;
                            Some((Rc::new(s), a))
                        });
                    let addr = bound.as_ref().map(|b| b.1);
                    if let Some((s, _)) = bound {
                        let task = tokio::task::spawn_local(relay_loop_handle(s.clone(), relay));
                        st.relays.insert(relay, (Some(s), task));
                    }
                    st.server.handle_relay_bound(relay, addr, Instant::now());
                }
                Event::HoldPort { addr, until } => {
                    // Bound without DONT-FRAGMENT; the allocation that takes
                    // the port over sets it if asked.
                    if let Some(s) = bind_relay_std(addr, false) {
                        let mut held = st.held.lock().unwrap_or_else(|e| e.into_inner());
                        held.insert(addr, (s, until));
                    }
                }
                Event::ReleaseRelay { relay } => {
                    if let Some((_, task)) = st.relays.remove(&relay) {
                        task.abort();
                    }
                }
                Event::ConnectPeer { conn, from, peer } => {
                    tokio::task::spawn_local(connect_peer(conn, from, peer));
                }
                Event::Splice { conn, client } => {
                    st.splices.insert(client, conn);
                }
                Event::ClosePeer { conn } => {
                    let gone = st
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&conn);
                    if let Some(PeerConn::Spliced(stop)) = gone {
                        stop.notify_one();
                    }
                }
            }
        }
        while let Some(t) = st.server.poll_transmit() {
            progressed = true;
            send_transmit(st, t);
        }
        if !progressed {
            return;
        }
    }
}

// The relay task needs the worker state, which `drain` holds borrowed; it
// fetches it from the thread-local set when it starts running.
thread_local! {
    static WORKER: RefCell<Option<WorkerRef>> = const { RefCell::new(None) };
}

async fn relay_loop_handle(sock: Rc<Udp>, relay: RelayId) {
    let Some(state) = WORKER.with(|w| w.borrow().clone()) else {
        return;
    };
    relay_loop(state, sock, relay).await;
}

fn send_transmit(st: &mut Worker, t: Transmit) {
    match t.to.transport {
        Transport::Udp => {
            if let Some(s) = st.udp.get(&t.from) {
                let _ = s.send_to(&t.bytes, t.to.remote);
            }
        }
        Transport::Tcp | Transport::Tls => send_stream(&mut st.streams, t.to, t.bytes),
    }
}

async fn accept_loop(
    state: WorkerRef,
    listener: TcpListener,
    transport: Transport,
    tls: Option<TlsConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let client = ClientAddr {
            transport,
            remote,
            local,
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        match (transport, &tls) {
            (Transport::Tls, Some(cfg)) => {
                let cfg = cfg.read().unwrap_or_else(|e| e.into_inner()).clone();
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                tokio::task::spawn_local(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(s)) => stream_loop(state, s, client, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
            _ => {
                tokio::task::spawn_local(stream_loop(state, stream, client, shutdown));
            }
        }
    }
}

async fn stream_loop<S>(
    state: WorkerRef,
    stream: S,
    client: ClientAddr,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(STREAM_QUEUE);
    state.borrow_mut().streams.insert(client, tx);
    let writer = tokio::task::spawn_local(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut buf = vec![0u8; 2 * MAX_FRAME];
    let mut filled = 0usize;
    let started = Instant::now();
    'conn: loop {
        let idle_deadline = started + IDLE_STREAM_TIMEOUT;
        let n = tokio::select! {
            r = rd.read(&mut buf[filled..]) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = tokio::time::sleep_until(idle_deadline.into()), if !state.borrow().server.has_allocation(&client) => {
                tracing::debug!("stream client idle without an allocation, closing");
                break;
            }
            _ = shutdown.changed() => break,
        };
        filled += n;
        let mut start = 0;
        loop {
            match stream_frame_len(&buf[start..filled]) {
                Ok(Some(len)) => {
                    let spliced = {
                        let mut st = state.borrow_mut();
                        client_input(&mut st, client, &buf[start..start + len]);
                        let conn = st.splices.remove(&client);
                        conn.map(|c| (c, st.streams.get(&client).cloned()))
                    };
                    start += len;
                    if let Some((conn, tx)) = spliced {
                        // ConnectionBind succeeded: from here on the stream
                        // carries raw bytes for the peer (RFC 6062 §5.3).
                        let leftover = buf[start..filled].to_vec();
                        if let Some(tx) = tx {
                            splice(&state, conn, &mut rd, tx, leftover, shutdown.clone()).await;
                        }
                        break 'conn;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::debug!("stream carried something other than STUN or ChannelData");
                    break 'conn;
                }
            }
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if !state.borrow().streams.contains_key(&client) {
            break;
        }
    }
    {
        let mut st = state.borrow_mut();
        st.streams.remove(&client);
        st.server.handle_client_closed(client);
        drain(&mut st);
    }
    let _ = writer.await;
}

/// Accepts peer connections on a TCP relay (RFC 6062 §5.4).
async fn tcp_relay_accept(listener: TcpListener, relay: RelayId) {
    let Some(state) = WORKER.with(|w| w.borrow().clone()) else {
        return;
    };
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut st = state.borrow_mut();
        match st.server.handle_peer_accepted(relay, peer, Instant::now()) {
            Some(conn) => {
                let _ = stream.set_nodelay(true);
                if let Ok(s) = stream.into_std() {
                    st.conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(conn, PeerConn::Waiting(s));
                }
            }
            None => tracing::debug!("peer connection without permission refused"),
        }
        drain(&mut st);
    }
}

/// Opens an RFC 6062 Connect's connection from the relayed address.
async fn connect_peer(conn: ConnectionId, from: SocketAddr, peer: SocketAddr) {
    let Some(state) = WORKER.with(|w| w.borrow().clone()) else {
        return;
    };
    let attempt = async {
        let sock = if from.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Share the relayed address with its listener (RFC 6062 §5.2).
        sock.set_reuseaddr(true)?;
        sock.set_reuseport(true)?;
        sock.bind(from)?;
        sock.connect(peer).await
    };
    let stream = match tokio::time::timeout(PEER_CONNECT_TIMEOUT, attempt).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            s.into_std().ok()
        }
        _ => None,
    };
    let mut st = state.borrow_mut();
    let ok = stream.is_some();
    if let Some(s) = stream {
        // Filed before the core answers, so a ConnectionBind on any worker finds it.
        st.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn, PeerConn::Waiting(s));
    }
    st.server.handle_peer_connected(conn, ok, Instant::now());
    drain(&mut st);
}

/// Relays raw bytes between a bound data connection and its peer
/// connection until either closes, the allocation goes, or shutdown.
async fn splice<R: AsyncRead + Unpin>(
    state: &WorkerRef,
    conn: ConnectionId,
    client: &mut R,
    to_client: mpsc::Sender<Vec<u8>>,
    leftover: Vec<u8>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stop = Arc::new(tokio::sync::Notify::new());
    let peer = {
        let st = state.borrow();
        let mut table = st.conns.lock().unwrap_or_else(|e| e.into_inner());
        match table.remove(&conn) {
            Some(PeerConn::Waiting(s)) => {
                table.insert(conn, PeerConn::Spliced(stop.clone()));
                Some(s)
            }
            _ => None,
        }
    };
    let Some(peer) = peer.and_then(|s| tokio::net::TcpStream::from_std(s).ok()) else {
        return;
    };
    let (mut pr, mut pw) = peer.into_split();
    if pw.write_all(&leftover).await.is_err() {
        return;
    }
    let up = async {
        let _ = tokio::io::copy(client, &mut pw).await;
        let _ = pw.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16384];
        loop {
            match pr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                // Awaiting queue space gives TCP back-pressure to the peer.
                Ok(n) => {
                    if to_client.send(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = stop.notified() => {}
        _ = shutdown.changed() => {}
    }
    state
        .borrow()
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&conn);
}

fn bind_tcp_relay(addr: SocketAddr) -> Option<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).ok()?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    s.set_reuse_address(true).ok()?;
    s.set_reuse_port(true).ok()?;
    s.set_nonblocking(true).ok()?;
    s.bind(&addr.into()).ok()?;
    s.listen(128).ok()?;
    TcpListener::from_std(s.into()).ok()
}

/// Fails if another socket already holds `addr`. Our own listeners use
/// SO_REUSEPORT to share a port between workers, which would also let a
/// second server process join the port silently and take half the traffic;
/// a plain bind first tells the two cases apart.
fn ensure_free(addr: SocketAddr, ty: Type) -> Result<(), Error> {
    if addr.port() == 0 {
        return Ok(());
    }
    let s = Socket::new(Domain::for_address(addr), ty, None)
        .map_err(|e| Error::Bind { addr, source: e })?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    if ty == Type::STREAM {
        // TIME_WAIT leftovers of a previous run must not block a restart.
        let _ = s.set_reuse_address(true);
    }
    s.bind(&addr.into())
        .map_err(|e| Error::Bind { addr, source: e })
}

fn bind_udp(addr: SocketAddr, reuse_port: bool) -> Result<std::net::UdpSocket, Error> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(|e| Error::Bind { addr, source: e })?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    let _ = s.set_reuse_address(true);
    if reuse_port {
        s.set_reuse_port(true)
            .map_err(|e| Error::Bind { addr, source: e })?;
    }
    // Large buffers absorb bursts; the kernel caps them at net.core.*mem_max.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)
        .map_err(|e| Error::Bind { addr, source: e })?;
    s.bind(&addr.into())
        .map_err(|e| Error::Bind { addr, source: e })?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(|e| Error::Bind { addr, source: e })?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    let _ = s.set_reuse_address(true);
    s.set_reuse_port(true)
        .map_err(|e| Error::Bind { addr, source: e })?;
    s.set_nonblocking(true)
        .map_err(|e| Error::Bind { addr, source: e })?;
    s.bind(&addr.into())
        .map_err(|e| Error::Bind { addr, source: e })?;
    s.listen(1024)
        .map_err(|e| Error::Bind { addr, source: e })?;
    Ok(s.into())
}

/// Binds a relay socket; `None` when the port is taken.
fn bind_relay(addr: SocketAddr, dont_fragment: bool) -> Option<Udp> {
    Udp::new(bind_relay_std(addr, dont_fragment)?).ok()
}

/// Binds a non-blocking relay socket outside any runtime.
fn bind_relay_std(addr: SocketAddr, dont_fragment: bool) -> Option<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).ok()?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    if dont_fragment {
        // DONT-FRAGMENT (RFC 8656 §7.2, §18.8): relayed packets carry the DF
        // bit, so a too-large one fails instead of being fragmented.
        set_dont_fragment(&s, addr.is_ipv6()).ok()?;
    }
    let _ = s.set_recv_buffer_size(1 << 20);
    s.set_nonblocking(true).ok()?;
    s.bind(&addr.into()).ok()?;
    Some(s.into())
}

/// Turns a held reservation socket into this worker's relay socket.
fn take_held(s: std::net::UdpSocket, dont_fragment: bool) -> Option<Udp> {
    if dont_fragment {
        let v6 = s.local_addr().ok()?.is_ipv6();
        set_dont_fragment(&socket2::SockRef::from(&s), v6).ok()?;
    }
    Udp::new(s).ok()
}

/// Sets the IP "don't fragment" behaviour: IP_MTU_DISCOVER = IP_PMTUDISC_DO
/// for IPv4, IPV6_DONTFRAG for IPv6. socket2 offers neither.
#[allow(unsafe_code)]
fn set_dont_fragment(s: &Socket, v6: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (level, name, value) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1 as libc::c_int)
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // SAFETY: the descriptor is open (borrowed from `s`), and the option
    // value is a live c_int whose size is passed alongside it.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // The system RNG failing means the OS cannot give us entropy at all.
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("system random number generator unavailable");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn mtu_discover(s: &UdpSocket) -> libc::c_int {
        use std::os::fd::AsRawFd;
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: reads one c_int option into a live local of that size.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    #[tokio::test]
    async fn dont_fragment_sets_the_df_bit_only_when_asked() {
        let df = bind_relay("127.0.0.1:0".parse().unwrap(), true).unwrap();
        assert_eq!(mtu_discover(&df.rx), libc::IP_PMTUDISC_DO);
        let plain = bind_relay("127.0.0.1:0".parse().unwrap(), false).unwrap();
        assert_ne!(mtu_discover(&plain.rx), libc::IP_PMTUDISC_DO);
    }
}

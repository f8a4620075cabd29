//! The device side of `parley-push/1`, over TLS or QUIC.
//!
//! [`DeviceClient::connect`] does the handshake with the device
//! certificate, sends Hello and waits for the tokens. Notifications arrive
//! from [`DeviceClient::next`] at most once each: an id seen before (a
//! redelivery after reconnecting before the ack landed) is acked again and
//! not returned. Courier pings are answered in the background; with a ping
//! interval set, the client pings on its own schedule and treats two
//! silent intervals as a dead link.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use wire::push::{
    CloseReason, DeviceToken, Frame, Notification, NotificationId, PlatformStatus, PlatformToken,
    ALPN, VERSION,
};

/// Courier addresses from a comma-separated list of `host:port` or
/// `ip:port`: every address each name resolves to (a cluster behind one
/// DNS name with several A/AAAA records), in order, each once. The device
/// link tries them in turn.
pub fn courier_addrs(spec: &str) -> std::io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut out: Vec<SocketAddr> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        for a in part.to_socket_addrs()? {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    if out.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("no courier address in {spec:?}"),
        ));
    }
    Ok(out)
}

/// How to reach the courier and who this device is.
#[derive(Debug)]
pub struct DeviceCredentials {
    /// Device certificate (from the identity service) and its key.
    pub chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub key: rustls::pki_types::PrivateKeyDer<'static>,
    /// Trust anchors for the courier's server certificate.
    pub roots: rustls::RootCertStore,
    /// Name in the courier's certificate.
    pub server_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tls,
    Quic,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    Notification(Notification),
    Subscription {
        request: u32,
        token: DeviceToken,
        endpoint: String,
    },
    Tokens(Vec<(String, DeviceToken)>),
    /// The courier's answer to [`DeviceClient::register_platform`].
    Platform {
        request: u32,
        status: PlatformStatus,
        text: String,
    },
    /// The link ended; with the courier's reason if it sent one.
    Closed(Option<(CloseReason, String)>),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("quic: {0}")]
    Quic(String),
    #[error("courier closed the link: {0:?} {1}")]
    Closed(CloseReason, String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
}

impl ClientError {
    /// The courier ended the link asking to be tried again later (it is
    /// shutting down, or its storage is briefly out of reach).
    pub fn asks_to_retry(&self) -> bool {
        matches!(self, ClientError::Closed(CloseReason::Shutdown, _))
    }
}

/// How to reach the courier.
enum Via {
    /// TLS over TCP, optionally from a given local address.
    Tls(Option<std::net::IpAddr>),
    /// QUIC, on a shared endpoint or a new one of its own.
    Quic(Option<quinn::Endpoint>),
}

/// A connected device.
#[derive(Debug)]
pub struct DeviceClient {
    out: mpsc::Sender<Frame>,
    events: mpsc::Receiver<ClientEvent>,
    seen: HashSet<NotificationId>,
    seen_order: VecDeque<NotificationId>,
    next_request: u32,
    duplicates: u64,
    /// The QUIC endpoint, kept to rebind after a network change.
    quic: Option<quinn::Endpoint>,
    task: tokio::task::JoinHandle<()>,
}

/// Ids remembered for de-duplication.
const SEEN: usize = 4096;

impl DeviceClient {
    /// Connects, says Hello with `topics`, and returns the client with the
    /// tokens the courier assigned. `ping_interval_s` 0 leaves keepalive
    /// to the courier.
    pub async fn connect(
        addr: SocketAddr,
        transport: Transport,
        creds: &DeviceCredentials,
        topics: &[&str],
        ping_interval_s: u16,
    ) -> Result<(DeviceClient, Vec<(String, DeviceToken)>), ClientError> {
        let via = match transport {
            Transport::Tls => Via::Tls(None),
            Transport::Quic => Via::Quic(None),
        };
        DeviceClient::open(addr, via, creds, topics, ping_interval_s).await
    }

    /// TLS from a chosen local address (load generators spread devices
    /// over many loopback addresses).
    pub async fn connect_from(
        source: std::net::IpAddr,
        addr: SocketAddr,
        creds: &DeviceCredentials,
        topics: &[&str],
        ping_interval_s: u16,
    ) -> Result<(DeviceClient, Vec<(String, DeviceToken)>), ClientError> {
        DeviceClient::open(addr, Via::Tls(Some(source)), creds, topics, ping_interval_s).await
    }

    /// QUIC over an existing endpoint, shared with other connections.
    pub async fn connect_quic_on(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        creds: &DeviceCredentials,
        topics: &[&str],
        ping_interval_s: u16,
    ) -> Result<(DeviceClient, Vec<(String, DeviceToken)>), ClientError> {
        DeviceClient::open(
            addr,
            Via::Quic(Some(endpoint.clone())),
            creds,
            topics,
            ping_interval_s,
        )
        .await
    }

    async fn open(
        addr: SocketAddr,
        via: Via,
        creds: &DeviceCredentials,
        topics: &[&str],
        ping_interval_s: u16,
    ) -> Result<(DeviceClient, Vec<(String, DeviceToken)>), ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .with_root_certificates(creds.roots.clone())
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let name = rustls::pki_types::ServerName::try_from(creds.server_name.clone())
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let (out_tx, out_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(64);
        let hello = Frame::Hello {
            version: VERSION,
            ping_interval_s,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        };
        let interval = (ping_interval_s > 0).then(|| Duration::from_secs(ping_interval_s.into()));
        let (task, quic) = match via {
            Via::Tls(source) => {
                let tcp = match source {
                    None => tokio::net::TcpStream::connect(addr).await?,
                    Some(ip) => {
                        let sock = if ip.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        sock.bind(SocketAddr::new(ip, 0))?;
                        sock.connect(addr).await?
                    }
                };
                tcp.set_nodelay(true)?;
                let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
                    .connect(name, tcp)
                    .await?;
                (
                    tokio::spawn(drive(stream, hello, out_rx, ev_tx, interval)),
                    None,
                )
            }
            Via::Quic(shared) => {
                let own = shared.is_none();
                let ep = match shared {
                    Some(ep) => ep,
                    None => {
                        let bind: SocketAddr = if addr.is_ipv4() {
                            SocketAddr::from(([127, 0, 0, 1], 0))
                        } else {
                            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0))
                        };
                        quinn::Endpoint::client(bind)?
                    }
                };
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                    .map_err(|e| ClientError::Quic(e.to_string()))?;
                let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
                let mut transport = quinn::TransportConfig::default();
                transport.keep_alive_interval(interval);
                // No QUIC idle timeout of our own (quinn's default is 30 s):
                // the courier's (two of its longest ping intervals) applies,
                // and the link's own keepalive finds dead peers sooner.
                transport.max_idle_timeout(None);
                cfg.transport_config(Arc::new(transport));
                let conn = ep
                    .connect_with(cfg, addr, &creds.server_name)
                    .map_err(|e| ClientError::Quic(e.to_string()))?
                    .await
                    .map_err(|e| ClientError::Quic(e.to_string()))?;
                let (send, recv) = conn
                    .open_bi()
                    .await
                    .map_err(|e| ClientError::Quic(e.to_string()))?;
                let io = tokio::io::join(recv, send);
                let task = tokio::spawn(async move {
                    drive(io, hello, out_rx, ev_tx, interval).await;
                    conn.close(0u32.into(), b"bye");
                });
                (task, own.then_some(ep))
            }
        };
        let mut client = DeviceClient {
            out: out_tx,
            events: ev_rx,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            next_request: 1,
            duplicates: 0,
            quic,
            task,
        };
        let tokens = match tokio::time::timeout(Duration::from_secs(10), client.events.recv()).await
        {
            Ok(Some(ClientEvent::Tokens(t))) => t,
            Ok(Some(ClientEvent::Closed(Some((r, t))))) => return Err(ClientError::Closed(r, t)),
            Ok(_) => return Err(ClientError::Protocol("no tokens after hello".into())),
            Err(_) => return Err(ClientError::Timeout),
        };
        Ok((client, tokens))
    }

    /// The next event; notifications already seen are acked and skipped.
    pub async fn next(&mut self) -> Option<ClientEvent> {
        loop {
            let ev = self.events.recv().await?;
            if let ClientEvent::Notification(n) = &ev {
                if self.seen.contains(&n.id) {
                    self.duplicates += 1;
                    let _ = self.out.send(Frame::Ack { ids: vec![n.id] }).await;
                    continue;
                }
                self.seen.insert(n.id);
                self.seen_order.push_back(n.id);
                if self.seen_order.len() > SEEN {
                    if let Some(old) = self.seen_order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
            }
            return Some(ev);
        }
    }

    /// The next event within `t`.
    pub async fn next_within(&mut self, t: Duration) -> Result<ClientEvent, ClientError> {
        match tokio::time::timeout(t, self.next()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ClientError::Protocol("link task ended".into())),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Notifications received again and dropped as already seen.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Acks notifications (the app has them).
    pub async fn ack(&self, ids: &[NotificationId]) -> Result<(), ClientError> {
        for chunk in ids.chunks(wire::push::MAX_ACK_IDS) {
            self.out
                .send(Frame::Ack {
                    ids: chunk.to_vec(),
                })
                .await
                .map_err(|_| ClientError::Protocol("link closed".into()))?;
        }
        Ok(())
    }

    /// Asks for a Web Push subscription; the answer arrives as
    /// [`ClientEvent::Subscription`] with the returned request id.
    pub async fn subscribe(
        &mut self,
        topic: &str,
        server_key: Option<[u8; 65]>,
    ) -> Result<u32, ClientError> {
        let request = self.next_request;
        self.next_request += 1;
        self.out
            .send(Frame::Subscribe {
                request,
                topic: topic.to_owned(),
                server_key,
            })
            .await
            .map_err(|_| ClientError::Protocol("link closed".into()))?;
        Ok(request)
    }

    /// Tells the courier this device's token at Apple's or Google's push
    /// service (an empty token withdraws it), so that it is woken through
    /// it while away from the link; the answer comes as
    /// [`ClientEvent::Platform`] with the returned request number.
    pub async fn register_platform(&mut self, token: PlatformToken) -> Result<u32, ClientError> {
        let request = self.next_request;
        self.next_request += 1;
        self.out
            .send(Frame::Platform { request, token })
            .await
            .map_err(|_| ClientError::Protocol("link closed".into()))?;
        Ok(request)
    }

    /// Revokes one of this device's tokens.
    pub async fn revoke(&self, token: DeviceToken) -> Result<(), ClientError> {
        self.out
            .send(Frame::Revoke { token })
            .await
            .map_err(|_| ClientError::Protocol("link closed".into()))
    }

    /// QUIC only: moves the connection to a new local socket, as after a
    /// network change (connection migration).
    pub fn rebind(&self, socket: std::net::UdpSocket) -> Result<(), ClientError> {
        match &self.quic {
            Some(ep) => ep.rebind(socket).map_err(ClientError::Io),
            None => Err(ClientError::Protocol("rebind needs QUIC".into())),
        }
    }

    /// The local address of the QUIC socket.
    pub fn quic_local_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
    }

    /// Drops the link without a goodbye (as a phone losing its radio).
    pub fn abort(self) {
        self.task.abort();
    }
}

async fn drive<S>(
    io: S,
    hello: Frame,
    mut out: mpsc::Receiver<Frame>,
    events: mpsc::Sender<ClientEvent>,
    interval: Option<Duration>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut wbuf = Vec::new();
    let mut closed_with = None;
    if hello.encode(&mut wbuf).is_err() || wr.write_all(&wbuf).await.is_err() {
        let _ = events.send(ClientEvent::Closed(None)).await;
        return;
    }
    let _ = wr.flush().await;
    let mut rbuf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut last_rx = tokio::time::Instant::now();
    let mut ping = interval.map(tokio::time::interval);
    let mut ping_seq = 0u64;
    // Without pings of our own, the courier's: it pings after the
    // interval its Tokens frame names, so two and a half of them with
    // nothing received mean it is gone (a node whose machine died, or a
    // QUIC peer that cannot say so), and the link ends for a reconnect.
    let mut silence: Option<Duration> = None;
    'outer: loop {
        let tick = async {
            match ping.as_mut() {
                Some(p) => {
                    p.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let quiet = async {
            match silence {
                Some(s) => tokio::time::sleep_until(last_rx + s).await,
                None => std::future::pending::<()>().await,
            }
        };
        let mut send = Vec::new();
        tokio::select! {
            r = rd.read(&mut chunk) => {
                let n = match r { Ok(0) | Err(_) => break, Ok(n) => n };
                last_rx = tokio::time::Instant::now();
                rbuf.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                loop {
                    match Frame::decode(&rbuf[used..]) {
                        Ok(Some((f, k))) => {
                            used += k;
                            let ev = match f {
                                Frame::Notification(n) => ClientEvent::Notification(n),
                                Frame::Tokens { tokens, ping_interval_s } => {
                                    if interval.is_none() && ping_interval_s > 0 {
                                        let every = Duration::from_secs(ping_interval_s.into());
                                        silence = Some(every * 5 / 2);
                                    }
                                    ClientEvent::Tokens(tokens)
                                }
                                Frame::Subscription { request, token, endpoint } => {
                                    ClientEvent::Subscription { request, token, endpoint }
                                }
                                Frame::PlatformAnswer { request, status, text } => {
                                    ClientEvent::Platform { request, status, text }
                                }
                                Frame::Ping(v) => { send.push(Frame::Pong(v)); continue; }
                                Frame::Pong(_) => continue,
                                Frame::Close { reason, text } => {
                                    closed_with = Some((reason, text));
                                    break 'outer;
                                }
                                _ => break 'outer,
                            };
                            if events.send(ev).await.is_err() {
                                break 'outer;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'outer,
                    }
                }
                rbuf.drain(..used);
            }
            f = out.recv() => match f {
                Some(f) => send.push(f),
                None => break,
            },
            _ = quiet => break,
            _ = tick => {
                if let Some(i) = interval {
                    if last_rx.elapsed() >= 2 * i {
                        break;
                    }
                }
                ping_seq += 1;
                send.push(Frame::Ping(ping_seq));
            }
        }
        if !send.is_empty() {
            wbuf.clear();
            for f in &send {
                if f.encode(&mut wbuf).is_err() {
                    break 'outer;
                }
            }
            if wr.write_all(&wbuf).await.is_err() || wr.flush().await.is_err() {
                break;
            }
        }
    }
    let _ = events.send(ClientEvent::Closed(closed_with)).await;
}

#[cfg(test)]
mod addr_tests {
    use super::courier_addrs;

    #[test]
    fn courier_lists_take_addresses_and_names() {
        let a = courier_addrs("127.0.0.2:5223, 127.0.0.3:5223,127.0.0.2:5223").unwrap();
        assert_eq!(
            a,
            vec![
                "127.0.0.2:5223".parse().unwrap(),
                "127.0.0.3:5223".parse().unwrap()
            ],
            "in order, each once"
        );
        // A name gives every address it resolves to.
        let a = courier_addrs("localhost:5223").unwrap();
        assert!(a.contains(&"127.0.0.1:5223".parse().unwrap()), "{a:?}");
        assert!(courier_addrs("").is_err());
        assert!(courier_addrs("127.0.0.1").is_err(), "a port is needed");
    }
}

//! The SFU as a service: media loops ([`media`]), each on a UDP socket of
//! its own with the rooms given to it (so rooms spread over the cores and
//! a room's packets never cross loops), and the HTTP API participants join
//! through (WHIP-like, RFC 9725's shape):
//!
//! - `POST /v1/rooms/{room}/participants` with `Authorization: Bearer
//!   <room token>` ([`crate::token`]) and the participant's SDP offer
//!   (`application/sdp`): `201 Created`, the answer, and in `Location` the
//!   participant's resource. The offer's send m-lines are what it
//!   publishes; its receive-only m-lines are its slots, the most streams
//!   of each kind it takes at once.
//! - `DELETE` on that resource (same token): the participant leaves.
//!
//! A room exists from its first join to its last leave.

mod media;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use axum::Router;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

pub use media::FRAME_MARKING_ID;

use crate::core::room::Config as RoomConfig;

#[derive(Debug, Clone)]
pub struct Config {
    /// UDP address for media (ICE, DTLS-SRTP): the first loop's; each
    /// further loop takes the next port (or a port of its own when this
    /// one is 0).
    pub media: SocketAddr,
    /// Media loops, each on its own core's worth of time with a share of
    /// the rooms (by a digest of the room id); 0: one per core, up to 8.
    pub workers: usize,
    /// The address participants are told to send media to, when `media`
    /// is a wildcard (0.0.0.0 or ::).
    pub advertise: Option<IpAddr>,
    /// The join API.
    pub http: SocketAddr,
    /// The join API's TLS (HTTPS); none serves plain HTTP (tests, or
    /// behind a TLS proxy).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Shared with signaling, which makes the room tokens.
    pub secret: Vec<u8>,
    pub room: RoomConfig,
    /// People in one room at most.
    pub max_participants: usize,
    /// People in all rooms at most: past it, joins get 503 (each holds a
    /// peer connection's memory and a share of a loop's time).
    pub max_total: usize,
    /// A participant whose media has not connected this long after it
    /// joined is dropped (it posted an offer and never came). 30 s is
    /// usual.
    pub connect_within: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("sfu.advertise is needed when the media address is {0}")]
    NoAdvertise(SocketAddr),
    #[error("{0} media loops from port {1} run past port 65535")]
    Ports(usize, u16),
}

/// Why a join was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("the offer is not usable SDP: {0}")]
    Sdp(String),
    #[error("the room is full ({0} participants)")]
    Full(usize),
    #[error("the SFU is full ({0} participants); try again later")]
    Busy(usize),
    #[error("the SFU is stopping")]
    Stopping,
}

/// A join's answer.
#[derive(Debug, Clone)]
pub struct Joined {
    pub participant: u16,
    /// The participant's resource name (random: a room token does not let
    /// one participant remove another).
    pub resource: String,
    pub answer: String,
}

pub(crate) enum Command {
    Join {
        room: String,
        offer: String,
        reply: media::JoinReply,
    },
    Leave {
        room: String,
        resource: String,
        reply: oneshot::Sender<bool>,
    },
}

/// Counters and gauges for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Some forwarded payloads (one in [`SAMPLE_EVERY`], the newest
    /// [`SAMPLES`]), as the SFU saw them: what an operator, or a check
    /// that the SFU holds nothing it can read, can look at.
    pub samples: std::sync::Mutex<std::collections::VecDeque<(bool, Vec<u8>)>>,
    pub rooms: AtomicU64,
    pub participants: AtomicU64,
    pub joins: AtomicU64,
    pub refused: AtomicU64,
    pub audio_packets: AtomicU64,
    pub audio_bytes: AtomicU64,
    pub video_packets: AtomicU64,
    pub video_bytes: AtomicU64,
    pub layer_switches: AtomicU64,
    /// Each room's forwarded payload bitrate, by a digest of its id (a
    /// room id is a capability: a call link opens it).
    room_bitrates: std::sync::Mutex<std::collections::BTreeMap<String, (String, u64)>>,
}

/// What stands for a room in `/metrics`: the first 12 hex digits of the
/// SHA-256 of its id.
pub fn room_label(room: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, room.as_bytes())
        .as_ref()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One forwarded payload in this many is kept in [`Metrics::samples`].
pub const SAMPLE_EVERY: u64 = 64;
/// How many are kept.
pub const SAMPLES: usize = 64;

impl Metrics {
    /// The sampled payloads: (audio, payload).
    pub fn sampled(&self) -> Vec<(bool, Vec<u8>)> {
        self.samples
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn sample(&self, audio: bool, n: u64, payload: &[u8]) {
        if n % SAMPLE_EVERY != 0 {
            return;
        }
        if let Ok(mut s) = self.samples.lock() {
            if s.len() >= SAMPLES {
                s.pop_front();
            }
            s.push_back((audio, payload.to_vec()));
        }
    }

    pub(crate) fn set_room_bitrate(&self, room: &str, bps: u64) {
        if let Ok(mut m) = self.room_bitrates.lock() {
            m.entry(room.to_string())
                .and_modify(|(_, v)| *v = bps)
                .or_insert_with(|| (room_label(room), bps));
        }
    }

    /// Forgets a room that ended.
    pub(crate) fn forget_room(&self, room: &str) {
        if let Ok(mut m) = self.room_bitrates.lock() {
            m.remove(room);
        }
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP parley_sfu_{name} {help}\n# TYPE parley_sfu_{name} {kind}\nparley_sfu_{name} {v}"
            );
        };
        line(
            "rooms",
            "gauge",
            "Rooms with someone in them.",
            g(&self.rooms),
        );
        line(
            "participants",
            "gauge",
            "Participants in all rooms.",
            g(&self.participants),
        );
        line("joins_total", "counter", "Joins answered.", g(&self.joins));
        line(
            "joins_refused_total",
            "counter",
            "Joins refused (token, offer, full room).",
            g(&self.refused),
        );
        line(
            "layer_switches_total",
            "counter",
            "Key frames asked of publishers to move a video slot (another layer or speaker).",
            g(&self.layer_switches),
        );
        let _ = writeln!(
            out,
            "# HELP parley_sfu_forwarded_packets_total RTP packets forwarded, by kind.\n\
             # TYPE parley_sfu_forwarded_packets_total counter\n\
             parley_sfu_forwarded_packets_total{{kind=\"audio\"}} {}\n\
             parley_sfu_forwarded_packets_total{{kind=\"video\"}} {}\n\
             # HELP parley_sfu_forwarded_bytes_total RTP payload bytes forwarded, by kind.\n\
             # TYPE parley_sfu_forwarded_bytes_total counter\n\
             parley_sfu_forwarded_bytes_total{{kind=\"audio\"}} {}\n\
             parley_sfu_forwarded_bytes_total{{kind=\"video\"}} {}",
            g(&self.audio_packets),
            g(&self.video_packets),
            g(&self.audio_bytes),
            g(&self.video_bytes),
        );
        let _ = writeln!(
            out,
            "# HELP parley_sfu_room_bitrate_bps Payload bits/s a room's participants were sent over the last second, by a digest of the room id.\n\
             # TYPE parley_sfu_room_bitrate_bps gauge"
        );
        if let Ok(m) = self.room_bitrates.lock() {
            for (label, bps) in m.values() {
                let _ = writeln!(out, "parley_sfu_room_bitrate_bps{{room=\"{label}\"}} {bps}");
            }
        }
    }
}

/// The running SFU.
#[derive(Debug)]
pub struct Sfu {
    /// The first media loop's address, as participants are told it.
    pub media: SocketAddr,
    /// Every media loop's, in order ([`worker_of`] picks a room's).
    pub media_all: Vec<SocketAddr>,
    pub http: SocketAddr,
    pub metrics: Arc<Metrics>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Clone)]
struct Api {
    /// Each media loop's commands.
    commands: Arc<[mpsc::Sender<Command>]>,
    secret: Arc<[u8]>,
    metrics: Arc<Metrics>,
}

/// The media socket: every participant's packets come in on it, so its
/// buffers are large enough for a burst (all publishers' frames at once)
/// while the loop forwards the packets before them. At the default
/// (208 KiB, about 90 video packets) an eight-person room's bursts
/// overflowed it. The kernel caps them at net.core.[rw]mem_max.
fn bind_media(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = s.set_only_v6(true);
    }
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Which of `workers` media loops holds `room`: by the first bytes of
/// the SHA-256 of its id, so the join and the leave find the same one.
pub fn worker_of(room: &str, workers: usize) -> usize {
    let d = ring::digest::digest(&ring::digest::SHA256, room.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    (u64::from_be_bytes(first) % workers.max(1) as u64) as usize
}

/// How many media loops `workers` asks for (0: one per core, up to 8).
fn loops(workers: usize) -> usize {
    match workers {
        0 => std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(8),
        n => n,
    }
}

impl Sfu {
    pub async fn start(config: Config) -> Result<Sfu, Error> {
        let n = loops(config.workers);
        let base = config.media.port();
        if base != 0 && usize::from(base) + n - 1 > usize::from(u16::MAX) {
            return Err(Error::Ports(n, base));
        }
        let mut sockets = Vec::new();
        for i in 0..n {
            let mut addr = config.media;
            if base != 0 {
                addr.set_port(base + i as u16);
            }
            let socket = bind_media(addr).map_err(|e| Error::Bind(addr, e))?;
            let bound = socket.local_addr().map_err(|e| Error::Bind(addr, e))?;
            let candidate = match (bound.ip().is_unspecified(), config.advertise) {
                (false, _) => bound,
                (true, Some(ip)) => SocketAddr::new(ip, bound.port()),
                (true, None) => return Err(Error::NoAdvertise(bound)),
            };
            sockets.push((socket, candidate));
        }
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| Error::Bind(config.http, e))?;
        let http = listener
            .local_addr()
            .map_err(|e| Error::Bind(config.http, e))?;
        let metrics = Arc::new(Metrics::default());
        let mut tasks = Vec::new();
        let mut commands = Vec::new();
        let media_all: Vec<SocketAddr> = sockets.iter().map(|(_, c)| *c).collect();
        for (socket, candidate) in sockets {
            let (tx, rx) = mpsc::channel(256);
            let media_loop = media::Loop::new(
                Arc::new(socket),
                candidate,
                config.room.clone(),
                (
                    config.max_participants,
                    config.max_total,
                    config.connect_within,
                ),
                metrics.clone(),
            );
            tasks.push(tokio::spawn(media_loop.run(rx)));
            commands.push(tx);
        }
        let api = Api {
            commands: commands.into(),
            secret: config.secret.clone().into(),
            metrics: metrics.clone(),
        };
        let router = Router::new()
            .route("/v1/rooms/{room}/participants", post(join))
            .route("/v1/rooms/{room}/participants/{resource}", delete(leave))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_OFFER))
            .with_state(api);
        let api_task = match config.tls {
            None => tokio::spawn(async move {
                let _ = axum::serve(listener, router).await;
            }),
            Some(tls) => tokio::spawn(serve_tls(listener, tls, router)),
        };
        tasks.push(api_task);
        Ok(Sfu {
            media: media_all[0],
            media_all,
            http,
            metrics,
            tasks,
        })
    }

    /// Stops at once: every participant's media ends.
    pub fn shutdown(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

/// The join API over TLS: each connection's handshake within 10 s, then
/// HTTP/1.1 with the same limit on reading a request's head.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
) {
    use std::time::Duration;
    use tower::ServiceExt;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    router.clone().oneshot(req.map(axum::body::Body::new))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        });
    }
}

impl Api {
    /// The media loop that holds `room`.
    fn loop_of(&self, room: &str) -> &mpsc::Sender<Command> {
        &self.commands[worker_of(room, self.commands.len())]
    }
}

/// An offer for 32 participants' slots fits well within this.
const MAX_OFFER: usize = 64 * 1024;

fn refuse(api: &Api, status: StatusCode, why: impl std::fmt::Display) -> Response {
    api.metrics.refused.fetch_add(1, Ordering::Relaxed);
    (status, format!("{why}\n")).into_response()
}

/// The refusal, if the bearer token does not open `room`.
fn unauthorized(api: &Api, headers: &HeaderMap, room: &str) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return Some(refuse(
            api,
            StatusCode::UNAUTHORIZED,
            "a room token is needed (Authorization: Bearer)",
        ));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    crate::token::check(&api.secret, room, token, now)
        .err()
        .map(|e| refuse(api, StatusCode::FORBIDDEN, e))
}

async fn join(
    State(api): State<Api>,
    Path(room): Path<String>,
    headers: HeaderMap,
    offer: String,
) -> Response {
    if !wire::room_token::valid_room(&room) {
        return refuse(&api, StatusCode::NOT_FOUND, "no such room name");
    }
    if let Some(r) = unauthorized(&api, &headers, &room) {
        return r;
    }
    let sdp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/sdp"));
    if !sdp {
        return refuse(
            &api,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the offer goes as application/sdp",
        );
    }
    let (reply, answer) = oneshot::channel();
    let sent = api
        .loop_of(&room)
        .send(Command::Join {
            room: room.clone(),
            offer,
            reply,
        })
        .await;
    let joined = match sent {
        Ok(()) => answer.await.unwrap_or(Err(JoinError::Stopping)),
        Err(_) => Err(JoinError::Stopping),
    };
    match joined {
        Ok(j) => (
            StatusCode::CREATED,
            [
                (header::CONTENT_TYPE, "application/sdp".to_string()),
                (
                    header::LOCATION,
                    format!("/v1/rooms/{room}/participants/{}", j.resource),
                ),
            ],
            j.answer,
        )
            .into_response(),
        Err(e @ JoinError::Sdp(_)) => refuse(&api, StatusCode::BAD_REQUEST, e),
        Err(e @ JoinError::Full(_)) => refuse(&api, StatusCode::FORBIDDEN, e),
        Err(e @ JoinError::Busy(_)) => {
            let mut r = refuse(&api, StatusCode::SERVICE_UNAVAILABLE, e);
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
            r
        }
        Err(e @ JoinError::Stopping) => refuse(&api, StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn leave(
    State(api): State<Api>,
    Path((room, resource)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&api, &headers, &room) {
        return r;
    }
    let (reply, done) = oneshot::channel();
    let sent = api
        .loop_of(&room)
        .send(Command::Leave {
            room,
            resource,
            reply,
        })
        .await;
    if sent.is_err() || !done.await.unwrap_or(false) {
        return (StatusCode::NOT_FOUND, "no such participant\n").into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

pub(crate) fn random_hex() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

//! Devices in a group call on loopback, for the group call tests and the
//! group call quality bench: the SFU with its join API on TLS, devices
//! with the SDK's group session on UDP sockets of their own (optionally
//! through a TURN relay, a lossy link or a bottleneck), each saying a tone
//! and, if it sends video, showing the test pattern; run in real time,
//! each device on a task of its own.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::group::{GroupConfig, GroupSession, SfuClient};
use client_sdk::group_keys::{GroupKeys, Member};
use client_sdk::media::audio::{tone_share, Tone};
use client_sdk::media::video::TestPattern;
use client_sdk::turn::Transport;
use client_sdk::turn_stream::{self, StreamSender, TlsTo};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use wire::group_key::KeyMessage;
use wire::keys::{DeviceId, SigningKey};

pub const SECRET: &[u8] = b"signaling secret";
pub const ROOM: &str = "group-1-abcdefghijkl";

/// One call at a time in a test binary: each runs devices in real time
/// on the machine's cores, and two at once would each be judged with
/// half of them.
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}

/// A TLS server configuration for 127.0.0.1 (TLS 1.3), and the CA its
/// certificate chains to.
pub fn tls_on_loopback() -> (Arc<rustls::ServerConfig>, rustls::RootCertStore) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    (Arc::new(tls), roots)
}

/// The SFU with its join API on TLS, and the CA its certificate chains to.
pub async fn sfu() -> (sfu::runtime::Sfu, rustls::RootCertStore) {
    let (tls, roots) = tls_on_loopback();
    let sfu = sfu::runtime::Sfu::start(sfu::runtime::Config {
        media: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        workers: 1,
        http: "127.0.0.1:0".parse().unwrap(),
        tls: Some(tls),
        secret: SECRET.to_vec(),
        room: Default::default(),
        max_participants: 32,
        max_total: 64,
        connect_within: Duration::from_secs(2),
    })
    .await
    .unwrap();
    (sfu, roots)
}

pub fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sfu::token::make(SECRET, ROOM, now + 600)
}

pub struct Device {
    pub identity: SigningKey,
    pub member: Member,
    pub session: GroupSession,
    pub socket: UdpSocket,
    pub tone: Tone,
    /// Its camera, if it sends video.
    pub pattern: Option<TestPattern>,
    pub ticks: u64,
    /// Share of incoming datagrams lost once media flows (0..1), of
    /// outgoing ones, and the state of the generator that picks them.
    pub loss: f64,
    pub uplink_loss: f64,
    pub rng: u64,
    /// A bottleneck on its incoming link, if any.
    pub bottleneck: Option<Bottleneck>,
    /// And on its outgoing one (queued by destination).
    pub uplink: Option<Bottleneck>,
    pub heard: Vec<i16>,
    /// Its stream to the relay, when it reaches it over TCP or TLS: what
    /// goes to the relay's address goes here, and what comes back on it
    /// comes from that address.
    pub stream: Option<(StreamSender, mpsc::Receiver<Vec<u8>>)>,
}

/// How a device reaches the TURN relay: its address for `transport`,
/// and for TLS what the device trusts.
#[derive(Clone, Debug)]
pub struct Via {
    pub relay: SocketAddr,
    pub transport: Transport,
    pub tls: Option<TlsTo>,
}

/// A narrow link: datagrams leave at `bps` in the order they came,
/// queued up to `depth` (200 ms unless set) and dropped beyond (as a
/// router's buffer does).
pub struct Bottleneck {
    pub bps: u32,
    pub depth: Duration,
    pub bytes: u64,
    pub free_at: Instant,
    pub queue: std::collections::VecDeque<(Instant, SocketAddr, Vec<u8>)>,
}

impl Bottleneck {
    pub fn new(bps: u32) -> Bottleneck {
        Bottleneck {
            bps,
            depth: Duration::from_millis(200),
            bytes: 0,
            free_at: Instant::now(),
            queue: Default::default(),
        }
    }

    pub fn push(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let start = self.free_at.max(now);
        if start.duration_since(now) > self.depth {
            return;
        }
        self.bytes += data.len() as u64;
        let air = Duration::from_secs_f64((data.len() + 28) as f64 * 8.0 / f64::from(self.bps));
        self.free_at = start + air;
        self.queue.push_back((self.free_at, from, data.to_vec()));
    }

    pub fn pop(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.queue.front()?.0 > now {
            return None;
        }
        self.queue.pop_front().map(|(_, from, d)| (from, d))
    }
}

impl Device {
    pub async fn join(sfu: &SfuClient, index: u16, freq: f64) -> Device {
        Device::join_with(sfu, index, freq, 0.3, 0).await
    }

    /// A device that reaches the SFU through a relay only, playing
    /// `freq` at `amplitude`, and the test pattern if it takes
    /// `video_slots` videos.
    pub async fn join_relayed(
        sfu: &SfuClient,
        index: u16,
        (freq, amplitude): (f64, f64),
        video_slots: usize,
        via: &Via,
    ) -> Device {
        let turn =
            client_sdk::turn::Config::new(via.relay, "group", "group-password").over(via.transport);
        let config = GroupConfig {
            turn: Some(turn),
            relay_only: true,
            audio_slots: 7,
            video_slots,
            ..GroupConfig::default()
        };
        let stream = match via.transport.is_stream() {
            true => Some(
                turn_stream::connect(via.relay, via.transport, via.tls.as_ref())
                    .await
                    .unwrap(),
            ),
            false => None,
        };
        let mut device = Device::join_config(sfu, index, freq, amplitude, config).await;
        device.stream = stream;
        device
    }

    /// A device playing `freq` at `amplitude` (of full scale), and the
    /// test pattern if it takes `video_slots` videos.
    pub async fn join_with(
        sfu: &SfuClient,
        index: u16,
        freq: f64,
        amplitude: f64,
        video_slots: usize,
    ) -> Device {
        let config = GroupConfig {
            audio_slots: 7,
            video_slots,
            ..GroupConfig::default()
        };
        Device::join_config(sfu, index, freq, amplitude, config).await
    }

    pub async fn join_config(
        sfu: &SfuClient,
        index: u16,
        freq: f64,
        amplitude: f64,
        config: GroupConfig,
    ) -> Device {
        let video_slots = config.video_slots;
        let identity = SigningKey::generate();
        let member = Member {
            device: DeviceId::random(),
            identity: identity.public(),
            index,
        };
        let keys = GroupKeys::new("call-1", member.clone()).unwrap();
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let (mut session, offer) = GroupSession::new(Instant::now(), local, keys, config).unwrap();
        let joined = sfu.join(ROOM, &token(), &offer).await.unwrap();
        session
            .accept_answer(Instant::now(), &joined.answer)
            .unwrap();
        Device {
            identity,
            member,
            session,
            socket,
            tone: Tone::new(freq, amplitude),
            pattern: (video_slots > 0).then(TestPattern::default),
            ticks: 0,
            loss: 0.0,
            uplink_loss: 0.0,
            rng: u64::from(index) * 7919 + 1,
            bottleneck: None,
            uplink: None,
            heard: Vec::new(),
            stream: None,
        }
    }

    pub fn step(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 2000];
        while let Ok((n, from)) = self.socket.try_recv_from(&mut buf) {
            if self.lost(self.loss) {
                continue;
            }
            match self.bottleneck.as_mut() {
                Some(b) => b.push(now, from, &buf[..n]),
                None => self.session.handle_datagram(now, from, &buf[..n]).unwrap(),
            }
        }
        while let Some((from, data)) = self.bottleneck.as_mut().and_then(|b| b.pop(now)) {
            self.session.handle_datagram(now, from, &data).unwrap();
        }
        while let Some((server, frame)) = self
            .stream
            .as_mut()
            .and_then(|(tx, rx)| Some((tx.server(), rx.try_recv().ok()?)))
        {
            self.session.handle_datagram(now, server, &frame).unwrap();
        }
        if self.session.poll_timeout() <= now {
            self.session.handle_timeout(now).unwrap();
        }
        self.transmit(now);
    }

    /// Whether to lose a datagram on a link that loses `share` of them,
    /// once media flows (xorshift: the same losses every run).
    fn lost(&mut self, share: f64) -> bool {
        if share <= 0.0 || !self.session.is_connected() {
            return false;
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 10_000) as f64 / 10_000.0 < share
    }

    /// What the session has to send, through the uplink's bottleneck if
    /// it has one.
    pub fn transmit(&mut self, now: Instant) {
        while let Some(d) = self.session.poll_transmit() {
            if self.lost(self.uplink_loss) {
                continue;
            }
            if let Some((tx, _)) = self.stream.as_ref().filter(|(tx, _)| tx.server() == d.to) {
                tx.send(&d.data);
                continue;
            }
            match self.uplink.as_mut() {
                Some(b) => b.push(now, d.to, &d.data),
                None => {
                    let _ = self.socket.try_send_to(&d.data, d.to);
                }
            }
        }
        while let Some((to, data)) = self.uplink.as_mut().and_then(|b| b.pop(now)) {
            let _ = self.socket.try_send_to(&data, to);
        }
    }

    /// One 20 ms tick: say a frame of the tone, hear a frame of the mix.
    pub fn tick(&mut self, speak: bool) {
        let frame = self.tone.next_frame();
        if speak {
            self.session.send_audio(Instant::now(), &frame).unwrap();
            // A camera frame every third tick: 16.7 per second, the
            // devices' cameras out of step (as they are) so that not all
            // of them encode in the same tick.
            let phase = self.ticks + u64::from(self.member.index);
            if let Some(p) = self.pattern.as_mut().filter(|_| phase % 3 == 0) {
                let picture = p.next_frame();
                self.session.send_video(Instant::now(), &picture).unwrap();
            }
        }
        self.ticks += 1;
        let mix = self.session.mix(Instant::now());
        self.heard.extend(mix);
        self.transmit(Instant::now());
    }
}

/// Hands each key message to the device it is for.
pub fn deliver(devices: &mut [Device], messages: Vec<KeyMessage>) {
    for m in messages {
        if let Some(d) = devices.iter_mut().find(|d| d.member.device == m.to) {
            let identity = d.identity.clone();
            d.session.keys().accept(&identity, &m).unwrap();
        }
    }
}

/// Runs the devices for `d` in real time, each on a task of its own (as
/// each phone has its own processor): it takes what came in, says and
/// hears a frame every 20 ms, and sends what its session has to send.
pub async fn run(devices: &mut Vec<Device>, d: Duration) {
    let end = Instant::now() + d;
    let tasks: Vec<_> = devices
        .drain(..)
        .map(|mut dev| {
            tokio::spawn(async move {
                let mut next = Instant::now();
                while Instant::now() < end {
                    dev.step();
                    if Instant::now() >= next {
                        next += Duration::from_millis(20);
                        let speak = dev.session.is_connected();
                        dev.tick(speak);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                dev
            })
        })
        .collect();
    for t in tasks {
        devices.push(t.await.unwrap());
    }
}

/// Share of the last `seconds` of what `d` heard at `freq`,
/// as the mean over 100 ms windows (the jitter buffer stretches and
/// shrinks each sender's delay, which shifts its phase: one long window
/// would count that against the tone).
pub fn share(d: &Device, freq: f64, seconds: f64) -> f64 {
    let n = (48_000.0 * seconds) as usize;
    let tail = &d.heard[d.heard.len().saturating_sub(n)..];
    let windows: Vec<&[i16]> = tail.chunks_exact(4_800).collect();
    windows.iter().map(|w| tone_share(w, freq)).sum::<f64>() / windows.len().max(1) as f64
}

/// Every member sends its key to every other.
pub fn start_keys(devices: &mut [Device]) {
    let members: Vec<Member> = devices.iter().map(|d| d.member.clone()).collect();
    let mut messages = Vec::new();
    for d in devices.iter_mut() {
        let others: Vec<Member> = members
            .iter()
            .filter(|m| **m != d.member)
            .cloned()
            .collect();
        let identity = d.identity.clone();
        messages.extend(d.session.keys().start(&identity, &others).unwrap());
    }
    deliver(devices, messages);
}

/// The tones of eight people.
pub const EIGHT: [f64; 8] = [350.0, 500.0, 650.0, 800.0, 950.0, 1100.0, 1250.0, 1400.0];

/// Eight devices in the room, each saying one of [`EIGHT`] quietly (seven
/// are mixed).
pub async fn eight(client: &SfuClient) -> Vec<Device> {
    let mut devices = Vec::new();
    for (i, f) in EIGHT.iter().enumerate() {
        devices.push(Device::join_with(client, i as u16 + 1, *f, 0.1, 0).await);
    }
    devices
}

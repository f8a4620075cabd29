//! A group call on loopback: devices with the SDK's group media session
//! join one room of the SFU through its HTTPS API with room tokens,
//! exchange sender keys (HPKE-sealed, signed), and each plays a tone of
//! its own. Three start; a fourth joins (everyone's key ratchets). Every
//! device then hears the other three's tones in its mix and never its
//! own, though the SFU that forwards every frame holds none of the keys.
//! A fifth joins the room with a valid room token (what a compromised
//! server could do) but is no member: it is sent every frame and reads
//! none. And eight at once, each hearing the other seven; four and eight
//! through a TURN relay with video, every pair heard and the videos of
//! each one's last-N seen; narrowing links; a lossy one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::group::{GroupConfig, GroupSession, SfuClient};
use client_sdk::group_keys::{GroupKeys, Member};
use client_sdk::media::audio::{tone_share, Tone};
use client_sdk::media::video::{is_pattern, TestPattern};
use tokio::net::UdpSocket;
use wire::group_key::KeyMessage;
use wire::keys::{DeviceId, SigningKey};

const SECRET: &[u8] = b"signaling secret";
const ROOM: &str = "group-1-abcdefghijkl";

/// One call of this file at a time: each runs devices in real time on
/// the machine's cores, and two at once would each be judged with half
/// of them.
async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}

/// The SFU with its join API on TLS, and the CA its certificate chains to.
async fn sfu() -> (sfu::runtime::Sfu, rustls::RootCertStore) {
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
    let sfu = sfu::runtime::Sfu::start(sfu::runtime::Config {
        media: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        workers: 1,
        http: "127.0.0.1:0".parse().unwrap(),
        tls: Some(Arc::new(tls)),
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

fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sfu::token::make(SECRET, ROOM, now + 600)
}

struct Device {
    identity: SigningKey,
    member: Member,
    session: GroupSession,
    socket: UdpSocket,
    tone: Tone,
    /// Its camera, if it sends video.
    pattern: Option<TestPattern>,
    ticks: u64,
    /// Share of incoming datagrams lost once media flows (0..1), and the
    /// state of the generator that picks them.
    loss: f64,
    rng: u64,
    /// A bottleneck on its incoming link, if any.
    bottleneck: Option<Bottleneck>,
    /// And on its outgoing one (queued by destination).
    uplink: Option<Bottleneck>,
    heard: Vec<i16>,
}

/// A narrow link: datagrams leave at `bps` in the order they came,
/// queued up to `depth` (200 ms unless set) and dropped beyond (as a
/// router's buffer does).
struct Bottleneck {
    bps: u32,
    depth: Duration,
    bytes: u64,
    free_at: Instant,
    queue: std::collections::VecDeque<(Instant, SocketAddr, Vec<u8>)>,
}

impl Bottleneck {
    fn new(bps: u32) -> Bottleneck {
        Bottleneck {
            bps,
            depth: Duration::from_millis(200),
            bytes: 0,
            free_at: Instant::now(),
            queue: Default::default(),
        }
    }

    fn push(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let start = self.free_at.max(now);
        if start.duration_since(now) > self.depth {
            return;
        }
        self.bytes += data.len() as u64;
        let air = Duration::from_secs_f64((data.len() + 28) as f64 * 8.0 / f64::from(self.bps));
        self.free_at = start + air;
        self.queue.push_back((self.free_at, from, data.to_vec()));
    }

    fn pop(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        if self.queue.front()?.0 > now {
            return None;
        }
        self.queue.pop_front().map(|(_, from, d)| (from, d))
    }
}

impl Device {
    async fn join(sfu: &SfuClient, index: u16, freq: f64) -> Device {
        Device::join_with(sfu, index, freq, 0.3, 0).await
    }

    /// A device that reaches the SFU through `relay` only, playing
    /// `freq` at `amplitude`, and the test pattern if it takes
    /// `video_slots` videos.
    async fn join_relayed(
        sfu: &SfuClient,
        index: u16,
        (freq, amplitude): (f64, f64),
        video_slots: usize,
        relay: SocketAddr,
    ) -> Device {
        let config = GroupConfig {
            turn: Some(client_sdk::turn::Config::new(
                relay,
                "group",
                "group-password",
            )),
            relay_only: true,
            audio_slots: 7,
            video_slots,
            ..GroupConfig::default()
        };
        Device::join_config(sfu, index, freq, amplitude, config).await
    }

    /// A device playing `freq` at `amplitude` (of full scale), and the
    /// test pattern if it takes `video_slots` videos.
    async fn join_with(
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

    async fn join_config(
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
            rng: u64::from(index) * 7919 + 1,
            bottleneck: None,
            uplink: None,
            heard: Vec::new(),
        }
    }

    fn step(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 2000];
        while let Ok((n, from)) = self.socket.try_recv_from(&mut buf) {
            if self.loss > 0.0 && self.session.is_connected() {
                // xorshift: the same losses every run.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if (self.rng % 10_000) as f64 / 10_000.0 < self.loss {
                    continue;
                }
            }
            match self.bottleneck.as_mut() {
                Some(b) => b.push(now, from, &buf[..n]),
                None => self.session.handle_datagram(now, from, &buf[..n]).unwrap(),
            }
        }
        while let Some((from, data)) = self.bottleneck.as_mut().and_then(|b| b.pop(now)) {
            self.session.handle_datagram(now, from, &data).unwrap();
        }
        if self.session.poll_timeout() <= now {
            self.session.handle_timeout(now).unwrap();
        }
        self.transmit(now);
    }

    /// What the session has to send, through the uplink's bottleneck if
    /// it has one.
    fn transmit(&mut self, now: Instant) {
        while let Some(d) = self.session.poll_transmit() {
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
    fn tick(&mut self, speak: bool) {
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
fn deliver(devices: &mut [Device], messages: Vec<KeyMessage>) {
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
async fn run(devices: &mut Vec<Device>, d: Duration) {
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
fn share(d: &Device, freq: f64, seconds: f64) -> f64 {
    let n = (48_000.0 * seconds) as usize;
    let tail = &d.heard[d.heard.len().saturating_sub(n)..];
    let windows: Vec<&[i16]> = tail.chunks_exact(4_800).collect();
    windows.iter().map(|w| tone_share(w, freq)).sum::<f64>() / windows.len().max(1) as f64
}

/// Every member sends its key to every other.
fn start_keys(devices: &mut [Device]) {
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
const EIGHT: [f64; 8] = [350.0, 500.0, 650.0, 800.0, 950.0, 1100.0, 1250.0, 1400.0];

/// Eight devices in the room, each saying one of [`EIGHT`] quietly (seven
/// are mixed).
async fn eight(client: &SfuClient) -> Vec<Device> {
    let mut devices = Vec::new();
    for (i, f) in EIGHT.iter().enumerate() {
        devices.push(Device::join_with(client, i as u16 + 1, *f, 0.1, 0).await);
    }
    devices
}

/// Eight at once, each a quieter tone (seven are mixed): every device
/// hears the seven others, each about a seventh of what it hears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_devices_each_hear_the_other_seven() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = EIGHT;
    let mut devices = eight(&client).await;
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(4)).await;
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            match i == j {
                true => assert!(s < 0.02, "device {i} hears itself ({s:.3})"),
                false => assert!(
                    s > 0.05,
                    "device {i} hears {f} Hz at {s:.3}; {:?}",
                    d.session.stats()
                ),
            }
        }
    }
    assert_eq!(
        sfu.metrics
            .participants
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
    sfu.shutdown();
}

#[tokio::test]
async fn four_devices_hear_each_other_end_to_end_through_the_sfu() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = [440.0, 660.0, 880.0, 1100.0];
    let mut devices = Vec::new();
    for (i, f) in freqs.iter().take(3).enumerate() {
        devices.push(Device::join(&client, i as u16 + 1, *f).await);
    }
    // The first three start the call: each sends its key to the others.
    let members: Vec<Member> = devices.iter().map(|d| d.member.clone()).collect();
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(3)).await;

    // A fourth joins: everyone ratchets and sends it the new key; it
    // sends its own to everyone.
    let mut late = Device::join(&client, 4, freqs[3]).await;
    let mut messages = Vec::new();
    for d in devices.iter_mut() {
        let identity = d.identity.clone();
        messages.push(
            d.session
                .keys()
                .join(&identity, late.member.clone())
                .unwrap(),
        );
    }
    let identity = late.identity.clone();
    messages.extend(late.session.keys().start(&identity, &members).unwrap());
    devices.push(late);
    deliver(&mut devices, messages);
    for d in devices.iter_mut() {
        d.heard.clear();
    }
    // The room's snoop: in the room, not in the call.
    devices.push(Device::join(&client, 9, 1500.0).await);
    run(&mut devices, Duration::from_secs(3)).await;
    let snoop = devices.pop().unwrap();
    assert!(snoop.session.is_connected());
    assert!(
        snoop.session.stats().undecryptable > 100,
        "{:?}",
        snoop.session.stats()
    );
    assert!(snoop.session.stats().heard.is_empty());
    assert!(snoop.heard.iter().all(|x| *x == 0), "the snoop heard sound");

    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        let shares: Vec<String> = freqs
            .iter()
            .map(|f| format!("{f} Hz {:.3}", share(d, *f, 2.0)))
            .collect();
        eprintln!("device {i} heard: {}", shares.join(", "));
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            if i == j {
                assert!(s < 0.02, "device {i} hears itself ({s:.3})");
            } else {
                assert!(
                    s > 0.08,
                    "device {i} hears {f} Hz at {s:.3}; stats {:?}\n{m}",
                    d.session.stats()
                );
            }
        }
        // The members' frames, and none of the snoop's (it has no member
        // key to send under that they would take).
        assert_eq!(d.session.stats().heard.len(), 3, "{:?}", d.session.stats());
    }
    sfu.shutdown();
}

/// The tones of three who also send video.
const THREE: [f64; 3] = [440.0, 660.0, 880.0];

/// The SFU, and three devices in its room with audio and video (two
/// video slots each), their keys exchanged.
async fn three_with_video() -> (sfu::runtime::Sfu, Vec<Device>) {
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let mut devices = Vec::new();
    for (i, f) in THREE.iter().enumerate() {
        devices.push(Device::join_with(&client, i as u16 + 1, *f, 0.3, 2).await);
    }
    start_keys(&mut devices);
    (sfu, devices)
}

/// Three with audio and video: each decodes the other two's test pattern
/// from its video slots, end to end encrypted like the audio, and still
/// hears their tones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_see_each_others_video_end_to_end() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        let stats = d.session.stats();
        eprintln!(
            "device {i}: sent {} video frames ({} key), saw {:?}",
            stats.video_frames_out,
            stats.keyframes_out,
            stats
                .seen
                .iter()
                .map(|(k, s)| (*k, s.pictures, s.last.map(|p| (p.width, p.height))))
                .collect::<Vec<_>>()
        );
        assert!(stats.keyframes_out >= 1, "{stats:?}");
        for (j, f) in THREE.iter().enumerate().filter(|(j, _)| *j != i) {
            let seen = stats.seen.get(&(j as u16 + 1)).copied().unwrap_or_default();
            assert!(
                seen.pictures >= 20,
                "device {i} saw {} pictures of {j}; {stats:?}\n{m}",
                seen.pictures
            );
            let last = seen.last.unwrap();
            assert!(is_pattern(&last.quadrants), "{last:?}");
            assert!(share(d, *f, 2.0) > 0.2, "device {i} hears {f} Hz faintly");
        }
        assert!(!stats.seen.contains_key(&(i as u16 + 1)), "saw itself");
    }
    assert!(m.contains("parley_sfu_forwarded_packets_total{kind=\"video\"}"));
    sfu.shutdown();
}

/// Three send their camera in three simulcast layers. Each starts on the
/// lowest and moves up to the full size; then one's incoming link narrows
/// to 120 kb/s on the wire (less than the two others send it with its
/// headers: the test pattern's layers are small, the audio is not). The
/// SFU's estimate
/// for it drops and it is moved down to a smaller layer of each of the
/// others (at a key frame, so the picture goes on), while the other two
/// keep the full size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_link_narrows_is_moved_to_a_lower_layer() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let sizes = |d: &Device| -> Vec<(u16, Option<(usize, usize)>)> {
        d.session
            .stats()
            .seen
            .iter()
            .map(|(k, s)| (*k, s.last.map(|p| (p.width, p.height))))
            .collect()
    };
    for (i, d) in devices.iter().enumerate() {
        eprintln!("before: device {i} sees {:?}", sizes(d));
        assert!(
            sizes(d).iter().all(|(_, s)| *s == Some((320, 240))),
            "device {i} should see everyone at full size: {:?}",
            sizes(d)
        );
    }
    let switches = |sfu: &sfu::runtime::Sfu| {
        let mut m = String::new();
        sfu.metrics.render(&mut m);
        m.lines()
            .find_map(|l| l.strip_prefix("parley_sfu_layer_switches_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = switches(&sfu);
    devices[0].bottleneck = Some(Bottleneck::new(120_000));
    let pictures_then: Vec<u64> = devices[0]
        .session
        .stats()
        .seen
        .values()
        .map(|s| s.pictures)
        .collect();
    run(&mut devices, Duration::from_secs(8)).await;
    for (i, d) in devices.iter().enumerate() {
        let stats = d.session.stats();
        eprintln!(
            "after: device {i} sees {:?}; sends {} layers ({} changes), estimate {:?}",
            sizes(d),
            stats.layers_sent,
            stats.layer_changes,
            stats.send_estimate
        );
    }
    eprintln!(
        "offered to the narrow link: {} kb/s",
        devices[0].bottleneck.as_ref().unwrap().bytes * 8 / 8_000
    );
    let narrow = sizes(&devices[0]);
    assert!(
        narrow
            .iter()
            .all(|(_, s)| s.is_some_and(|(w, h)| w < 320 && h < 240)),
        "the narrow link still gets full size: {narrow:?}"
    );
    // The picture went on: frames of the smaller layer were decoded and
    // are the pattern.
    for (s, then) in devices[0].session.stats().seen.values().zip(pictures_then) {
        assert!(s.pictures > then + 10, "{} then {then}", s.pictures);
        assert!(is_pattern(&s.last.unwrap().quadrants));
    }
    // The two others still see each other at full size. (What they see
    // of device 0 is up to device 0: the SFU's feedback on its uplink
    // comes through its narrow link too, late, and its own estimate may
    // stop its top layer for a while.)
    for (i, d) in devices.iter().enumerate().skip(1) {
        let seen = sizes(d);
        assert!(
            seen.iter()
                .filter(|(k, _)| *k != 1)
                .all(|(_, s)| *s == Some((320, 240))),
            "device {i} no longer sees full size: {seen:?}"
        );
    }
    assert!(switches(&sfu) >= before + 2, "layer switches not counted");
    sfu.shutdown();
}

/// Three send their camera in three simulcast layers; then one's uplink
/// narrows to 110 kb/s on the wire, a little less than its audio and
/// three layers take with their headers (the test pattern's layers are
/// small). Its own estimate of the uplink falls and it stops its top
/// layer (or two); the SFU moves the others down to what it still sends,
/// and they go on seeing its pattern and hearing its tone. Once the link
/// is wide again, the estimate climbs and the top layer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_uplink_narrows_stops_its_top_layer_and_is_still_seen() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let of_0 = |d: &Device| {
        d.session
            .stats()
            .seen
            .get(&1)
            .map(|s| (s.pictures, s.last.map(|p| (p.width, p.height))))
            .unwrap_or_default()
    };
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "before: sends {} layers ({:?} b/s), estimate {:?}; others see it at {:?}",
        stats.layers_sent,
        stats.layer_bitrates,
        stats.send_estimate,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert_eq!(stats.layers_sent, 3);
    assert!(devices[1..].iter().all(|d| of_0(d).1 == Some((320, 240))));

    // A deeper queue than the default, as on a phone's uplink (with drops
    // alone the estimate falls below what the audio and the lowest layer
    // need), but short of the listeners' jitter buffers' 400 ms ceiling:
    // audio that waited longer would come too late to play.
    devices[0].uplink = Some(Bottleneck {
        depth: Duration::from_millis(300),
        ..Bottleneck::new(110_000)
    });
    // Until it sends fewer layers and the others have moved down (15 s at
    // most), then the picture must go on.
    let down = |devices: &[Device]| {
        devices[0].session.stats().layers_sent < 3
            && devices[1..]
                .iter()
                .all(|d| of_0(d).1.is_some_and(|(w, h)| w < 320 && h < 240))
    };
    for _ in 0..15 {
        run(&mut devices, Duration::from_secs(1)).await;
        if down(&devices) {
            break;
        }
    }
    let then: Vec<u64> = devices[1..].iter().map(|d| of_0(d).0).collect();
    run(&mut devices, Duration::from_secs(3)).await;
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "narrow: sends {} layers, estimate {:?}, {} changes; others see it at {:?}",
        stats.layers_sent,
        stats.send_estimate,
        stats.layer_changes,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert!(down(&devices), "{stats:?}");
    assert!(stats.send_estimate.is_some_and(|e| e < 100_000));
    for (d, then) in devices[1..].iter().zip(then) {
        // Some 50 pictures in 3 s: at least 20.
        let pictures = of_0(d).0;
        assert!(
            pictures > then + 20,
            "the picture stalled: {pictures} then {then}"
        );
        let last = d.session.stats().seen[&1].last.unwrap();
        assert!(is_pattern(&last.quadrants));
        assert!(share(d, THREE[0], 2.0) > 0.2, "device 0 heard faintly");
    }

    // The estimate climbs back at its own pace (and the estimator probes
    // now and then): up to 30 s.
    devices[0].uplink = None;
    let full = |devices: &[Device]| {
        devices[0].session.stats().layers_sent == 3
            && devices[1..].iter().all(|d| of_0(d).1 == Some((320, 240)))
    };
    for _ in 0..30 {
        run(&mut devices, Duration::from_secs(1)).await;
        if full(&devices) {
            break;
        }
    }
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "wide again: sends {} layers, estimate {:?}; others see it at {:?}",
        stats.layers_sent,
        stats.send_estimate,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert!(full(&devices), "the top layer did not come back: {stats:?}");
    sfu.shutdown();
}

/// A whole call through the relay: `n` devices reach the SFU only
/// through a TURN relay (as on a network that blocks UDP to it, or to
/// hide their addresses), each saying one of `freqs` at `amplitude` and
/// sending its camera in three simulcast layers, taking `video_slots`
/// videos. Every device hears every other's tone, and decodes the test
/// pattern of as many others as it has slots for (the SFU's last-N), each
/// in more than 20 pictures.
async fn whole_call_through_the_relay(freqs: &[f64], amplitude: f64, video_slots: usize) {
    let relay = stun_turn::runtime::Relay::start(
        stun_turn::Config {
            udp: vec!["127.0.0.1:0".parse().unwrap()],
            tcp: Vec::new(),
            tls: Vec::new(),
            relay_ipv4: Some([127, 0, 0, 1].into()),
            users: vec![("group".into(), "group-password".into())],
            // The SFU is on loopback here.
            allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
            workers: 1,
            ..stun_turn::Config::default()
        },
        None,
    )
    .unwrap();
    let relay_addr = relay.udp_addrs()[0];
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let mut devices = Vec::new();
    for (i, f) in freqs.iter().enumerate() {
        let tone = (*f, amplitude);
        devices
            .push(Device::join_relayed(&client, i as u16 + 1, tone, video_slots, relay_addr).await);
    }
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(5)).await;
    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        let stats = d.session.stats();
        let shares: Vec<String> = freqs
            .iter()
            .map(|f| format!("{f} Hz {:.3}", share(d, *f, 2.0)))
            .collect();
        eprintln!(
            "device {i}: heard {}; saw {:?}",
            shares.join(", "),
            stats
                .seen
                .iter()
                .map(|(k, s)| (*k, s.pictures, s.last.map(|p| (p.width, p.height))))
                .collect::<Vec<_>>()
        );
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            match i == j {
                true => assert!(s < 0.02, "device {i} hears itself ({s:.3})"),
                // A seventh of the mix at the least.
                false => assert!(s > 0.05, "device {i} hears device {j} at {s:.3}; {stats:?}"),
            }
        }
        assert!(!stats.seen.contains_key(&(i as u16 + 1)), "saw itself");
        let seen: Vec<_> = stats
            .seen
            .values()
            .filter(|s| s.pictures > 20 && s.last.is_some_and(|p| is_pattern(&p.quadrants)))
            .collect();
        assert!(
            seen.len() >= video_slots.min(freqs.len() - 1),
            "device {i} saw {} others' pictures; {stats:?}\n{m}",
            seen.len()
        );
    }
    assert!(m.contains("parley_sfu_forwarded_packets_total{kind=\"video\"}"));
    sfu.shutdown();
}

/// Four through the relay, each seeing and hearing the three others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hear_and_see_each_other_through_the_relay() {
    let _alone = alone().await;
    whole_call_through_the_relay(&EIGHT[..4], 0.3, 3).await;
}

/// Eight through the relay: each hears the seven others and sees four
/// (the SFU's last-N).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hear_each_other_and_see_four_through_the_relay() {
    let _alone = alone().await;
    whole_call_through_the_relay(&EIGHT, 0.1, 4).await;
}

/// Eight people; the first loses 10% of what reaches it (a bad network).
/// Its jitter buffer conceals the losses: it still hears all seven, a
/// little less cleanly than the others do. Prints each one's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_eight_on_a_lossy_network_still_hears_everyone() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = EIGHT;
    let mut devices = eight(&client).await;
    devices[0].loss = 0.10;
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(4)).await;
    for (i, d) in devices.iter().enumerate() {
        let shares: Vec<f64> = freqs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, f)| share(d, *f, 2.0))
            .collect();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        let min = shares.iter().copied().fold(f64::INFINITY, f64::min);
        let heard = &d.session.stats().heard;
        let concealed = heard.values().map(|h| h.concealed).sum::<f64>() / heard.len() as f64;
        let mos = heard.values().map(|h| h.mos).sum::<f64>() / heard.len() as f64;
        eprintln!(
            "device {i}{}: mean share of the others {mean:.3}, lowest {min:.3}, concealed \
             {:.1}%, MOS {mos:.2}",
            if i == 0 { " (10% loss)" } else { "" },
            concealed * 100.0
        );
        assert!(min > 0.05, "device {i} lost someone: {shares:?}");
    }
    sfu.shutdown();
}

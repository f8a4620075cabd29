//! `parley loadsim sfu`: rooms of participants that each publish audio
//! and one video layer and take the others', against the Parley SFU (its
//! HTTPS join API) or Janus's VideoRoom (its plain HTTP API), the same
//! load either way.
//!
//! Every participant is a str0m peer connection in this one process: no
//! codecs, so the load generator stays light. A payload stands for SFrame
//! ciphertext and carries its sender, kind, sequence number and send time:
//! receivers count what arrives per stream (loss), and the time it took
//! (the SFU's added latency, loopback being near zero). Both SFUs forward
//! payloads without reading them. Each subscriber takes `--audio-slots`
//! of the others' audio and `--last-n` of their videos (Parley's `[sfu]
//! last_n` must be the same).
//!
//! Janus gives each participant two peer connections (a publisher and a
//! subscriber handle); Parley one.
//!
//! The report: packets/s the subscribers received, the SFU process's CPU
//! per forwarded packet (from /proc, with `--sfu-pid`), latency p50/p99
//! and loss, then one `RESULT` line for scripts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;

/// Which SFU the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    Parley,
    Janus,
}

#[derive(Debug, Args, Clone)]
pub struct SfuLoad {
    /// The SFU under load.
    #[arg(long, value_enum, default_value = "parley")]
    pub target: Target,
    /// Parley: the SFU's join API address (HTTPS). Janus: its HTTP API
    /// address (the REST transport, path /janus).
    #[arg(long, default_value = "127.0.0.1:8446")]
    pub api: SocketAddr,
    /// Parley: the data directory whose sip-secret makes room tokens (as
    /// signaling does) and whose ca.pem the API's certificate chains to.
    #[arg(long, default_value = "./parley-data")]
    pub data: PathBuf,
    /// The address participants' sockets bind to (the SFU's side of the
    /// network: Janus offers no loopback candidates, so its benchmark runs
    /// in a network namespace on an address of its own).
    #[arg(long, default_value = "127.0.0.1")]
    pub local: std::net::IpAddr,
    /// Rooms, each of --room-size participants.
    #[arg(long, default_value_t = 1)]
    pub rooms: usize,
    #[arg(long, default_value_t = 4)]
    pub room_size: usize,
    /// Videos each participant takes (its SFU's last-N).
    #[arg(long, default_value_t = 4)]
    pub last_n: usize,
    /// Voices each participant takes at once (the SDK's default: the
    /// latest eight speakers; Janus subscribers take eight feeds' audio).
    #[arg(long, default_value_t = 8)]
    pub audio_slots: usize,
    /// Each participant's video bitrate, kb/s (15 frames/s, a key frame
    /// every 2 s); audio is 50 packets/s of 100 bytes.
    #[arg(long, default_value_t = 300)]
    pub video_kbps: u32,
    /// Seconds measured, after everyone is connected and a warm-up second.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// The SFU's process id, to report its CPU time per forwarded packet.
    #[arg(long)]
    pub sfu_pid: Option<u32>,
}

/// Marks a payload as this generator's.
const MAGIC: &[u8; 4] = b"PLSF";
const AUDIO_BYTES: usize = 100;
const FPS: u64 = 15;
const MAX_CHUNK: usize = 1100;
/// RFC 9626 frame marking's header extension id (as the Parley SFU has it).
const FRAME_MARKING_ID: u8 = 5;
/// Linux reports /proc CPU times in USER_HZ, 100 per second.
const USER_HZ: f64 = 100.0;

/// One peer connection on its own socket.
struct Endpoint {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    connected: bool,
    next: Instant,
    pending: Option<SdpPendingOffer>,
    /// The SFU asked for a key frame (a subscriber switched to us).
    keyframe_asked: bool,
}

impl Endpoint {
    async fn new(ip: std::net::IpAddr) -> Result<Endpoint> {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await?;
        let local = socket.local_addr()?;
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(true)
            .set_extension(FRAME_MARKING_ID, str0m::rtp::Extension::FrameMarking)
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, Protocol::Udp)?);
        Ok(Endpoint {
            rtc,
            socket,
            local,
            connected: false,
            next: Instant::now(),
            pending: None,
            keyframe_asked: false,
        })
    }

    fn accept_answer(&mut self, sdp: &str) -> Result<()> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| anyhow!("no offer made"))?;
        let answer = SdpAnswer::from_sdp_string(sdp).context("the SFU's answer")?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        Ok(())
    }

    /// The answer to the SFU's offer.
    fn accept_offer(&mut self, sdp: &str) -> Result<String> {
        let offer = SdpOffer::from_sdp_string(sdp).context("the SFU's offer")?;
        Ok(self.rtc.sdp_api().accept_offer(offer)?.to_sdp_string())
    }

    /// Reads what arrived, runs timers when due, sends what str0m sends;
    /// payloads received go to `got`.
    fn step(&mut self, now: Instant, buf: &mut [u8], got: &mut impl FnMut(&[u8])) -> Result<()> {
        let mut input = false;
        while let Ok((n, from)) = self.socket.try_recv_from(buf) {
            if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, &buf[..n]) {
                self.rtc.handle_input(Input::Receive(now, r))?;
                self.drain(got)?;
                input = true;
            }
        }
        if now >= self.next || input {
            self.rtc.handle_input(Input::Timeout(now))?;
            self.drain(got)?;
        }
        Ok(())
    }

    fn drain(&mut self, got: &mut impl FnMut(&[u8])) -> Result<()> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.next = t;
                    return Ok(());
                }
                Output::Transmit(t) => {
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::RtpPacket(p)) => got(&p.payload),
                Output::Event(Event::KeyframeRequest(_)) => self.keyframe_asked = true,
                Output::Event(_) => {}
            }
        }
    }

    /// Writes `payload` on the stream of m-line `mid`.
    fn write(&mut self, mid: Mid, seq: u64, ts: u32, payload: &[u8], ext: ExtensionValues) {
        let Some(pt) = self
            .rtc
            .media(mid)
            .and_then(|m| m.remote_pts().first().copied())
        else {
            return;
        };
        let video = ext.frame_mark.is_some();
        let mut api = self.rtc.direct_api();
        if let Some(tx) = api.stream_tx_by_mid(mid, None) {
            tx.write_rtp(
                RtpWrite::new(pt, SeqNo::from(seq), ts, Instant::now(), payload)
                    .marker(true)
                    .ext_vals(ext)
                    .nackable(video),
            );
        }
    }
}

/// A participant: what it sends on, and (Janus) what it receives on.
struct Participant {
    id: u32,
    send: Endpoint,
    recv: Option<Endpoint>,
    audio: Mid,
    video: Mid,
    audio_seq: u64,
    video_seq: u64,
}

/// A payload's fields: sender, kind (0 audio, 1 video), sequence, send
/// time (µs since the generator started).
fn payload(size: usize, sender: u32, kind: u8, seq: u32, sent_us: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(size);
    p.extend_from_slice(MAGIC);
    p.extend_from_slice(&sender.to_be_bytes());
    p.push(kind);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&sent_us.to_be_bytes());
    p.resize(size.max(p.len()), 0x5a);
    p
}

fn parse(p: &[u8]) -> Option<(u32, u8, u32, u64)> {
    if p.len() < 21 || &p[..4] != MAGIC {
        return None;
    }
    let sender = u32::from_be_bytes(p[4..8].try_into().ok()?);
    let seq = u32::from_be_bytes(p[9..13].try_into().ok()?);
    let sent = u64::from_be_bytes(p[13..21].try_into().ok()?);
    Some((sender, p[8], seq, sent))
}

/// One received stream: packets, the newest sequence number, and what
/// is missing: short gaps are loss, long ones a pause (the SFU chose to
/// send something else for a while, as a plan that fits a bandwidth
/// estimate does).
#[derive(Default, Clone, Copy)]
struct Stream {
    packets: u64,
    last: u32,
    lost: u64,
    paused: u64,
}

/// Missing packets in a row up to this many count as lost, more as a
/// pause (a quarter second of video, half a second of audio).
const LOSS_RUN: u32 = 12;

/// What the receivers saw while measuring.
struct Tally {
    streams: HashMap<(u32, u32, u8), Stream>,
    latency_us: Histogram<u64>,
    packets: [u64; 2],
}

impl Tally {
    fn new() -> Tally {
        Tally {
            streams: HashMap::new(),
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            packets: [0; 2],
        }
    }

    fn record(&mut self, receiver: u32, p: &[u8], now_us: u64) {
        let Some((sender, kind, seq, sent)) = parse(p) else {
            return;
        };
        let kind = kind.min(1);
        self.packets[usize::from(kind)] += 1;
        let _ = self.latency_us.record(now_us.saturating_sub(sent).max(1));
        let s = self
            .streams
            .entry((receiver, sender, kind))
            .or_insert(Stream {
                last: seq.wrapping_sub(1),
                ..Stream::default()
            });
        s.packets += 1;
        if seq > s.last {
            let missing = seq - s.last - 1;
            if missing <= LOSS_RUN {
                s.lost += u64::from(missing);
            } else {
                s.paused += u64::from(missing);
            }
            s.last = seq;
        } else {
            // Late: it was counted lost.
            s.lost = s.lost.saturating_sub(1);
        }
    }

    /// Shares of the packets of `kind` (all, if `None`) lost, and paused,
    /// between each stream's first and last packet.
    fn loss(&self, kind: Option<u8>) -> (f64, f64) {
        let (mut got, mut lost, mut paused) = (0u64, 0u64, 0u64);
        for (_, s) in self
            .streams
            .iter()
            .filter(|((_, _, k), _)| kind.is_none_or(|want| *k == want))
        {
            got += s.packets;
            lost += s.lost;
            paused += s.paused;
        }
        let all = (got + lost + paused).max(1) as f64;
        if got == 0 {
            return (1.0, 0.0);
        }
        (lost as f64 / all, paused as f64 / all)
    }
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: fields 3..; utime and stime
    // are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

pub async fn run(args: SfuLoad) -> Result<()> {
    if args.room_size < 2 {
        bail!("--room-size must be at least 2");
    }
    let total = args.rooms * args.room_size;
    eprintln!(
        "loadsim sfu: {} room(s) of {} on {:?} at {}, {} kb/s video, {} videos each",
        args.rooms, args.room_size, args.target, args.api, args.video_kbps, args.last_n
    );
    let mut people = match args.target {
        Target::Parley => join_parley(&args).await?,
        Target::Janus => join_janus(&args).await?,
    };
    let start = Instant::now();
    let us = |t: Instant| t.duration_since(start).as_micros() as u64;
    let mut buf = vec![0u8; 2048];
    let mut tally = Tally::new();
    let mut measuring = false;

    // Connect (bounded), then a warm-up second, then measure.
    let connect_by = Instant::now() + Duration::from_secs(20);
    let mut warm_until: Option<Instant> = None;
    let mut end: Option<Instant> = None;
    let mut cpu_then = None;
    let mut own_then = None;
    let mut measured_from = Instant::now();
    let mut tick = Instant::now();
    let mut n_tick = 0u64;
    let frame_bytes = (u64::from(args.video_kbps) * 1000 / 8 / FPS) as usize;
    let mut last_progress = Instant::now();
    loop {
        let now = Instant::now();
        for p in people.iter_mut() {
            let id = p.id;
            let mut got = |payload: &[u8]| {
                if measuring {
                    tally.record(id, payload, us(Instant::now()));
                }
            };
            p.send.step(now, &mut buf, &mut got)?;
            if let Some(r) = p.recv.as_mut() {
                r.step(now, &mut buf, &mut got)?;
            }
        }
        let connected = people
            .iter()
            .filter(|p| p.send.connected && p.recv.as_ref().is_none_or(|r| r.connected))
            .count();
        if warm_until.is_none() {
            if connected == total {
                eprintln!("loadsim sfu: all {total} connected; warming up");
                warm_until = Some(now + Duration::from_secs(1));
            } else if now > connect_by {
                bail!("only {connected} of {total} participants connected within 20 s");
            } else if now.duration_since(last_progress) >= Duration::from_secs(2) {
                last_progress = now;
                eprintln!("loadsim sfu: {connected} of {total} connected");
            }
        }
        if let (Some(w), false, None) = (warm_until, measuring, end) {
            if now >= w {
                measuring = true;
                measured_from = now;
                cpu_then = args.sfu_pid.and_then(cpu_ticks);
                own_then = cpu_ticks(std::process::id());
                end = Some(now + Duration::from_secs(args.seconds));
                eprintln!("loadsim sfu: measuring for {} s", args.seconds);
            }
        }
        if end.is_some_and(|e| now >= e) {
            break;
        }
        if now >= tick {
            tick += Duration::from_millis(20);
            n_tick += 1;
            let sent = us(now);
            for p in people.iter_mut().filter(|p| p.send.connected) {
                let ext = ExtensionValues {
                    audio_level: Some(-20),
                    voice_activity: Some(true),
                    mid: Some(p.audio),
                    ..Default::default()
                };
                let body = payload(AUDIO_BYTES, p.id, 0, p.audio_seq as u32, sent);
                p.send
                    .write(p.audio, p.audio_seq, (p.audio_seq * 960) as u32, &body, ext);
                p.audio_seq += 1;
                // 15 frames/s on a 50/s tick: frames on 3 ticks of 10.
                if (n_tick * FPS / 50) != ((n_tick - 1) * FPS / 50) {
                    let frame = n_tick * FPS / 50;
                    let key = frame % (2 * FPS) == 0 || std::mem::take(&mut p.send.keyframe_asked);
                    let chunks = frame_bytes.div_ceil(MAX_CHUNK).max(1);
                    for c in 0..chunks {
                        let mut mark = 0u32;
                        if c == 0 {
                            mark |= 0x80 | if key { 0x20 } else { 0 };
                        }
                        if c == chunks - 1 {
                            mark |= 0x40;
                        }
                        let ext = ExtensionValues {
                            frame_mark: Some(mark << 24),
                            mid: Some(p.video),
                            ..Default::default()
                        };
                        let size = (frame_bytes / chunks).max(21);
                        let body = payload(size, p.id, 1, p.video_seq as u32, sent);
                        p.send
                            .write(p.video, p.video_seq, (frame * 6000) as u32, &body, ext);
                        p.video_seq += 1;
                    }
                }
                p.send.drain(&mut |_| {})?;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = measured_from.elapsed().as_secs_f64();
    let cpu = match (cpu_then, args.sfu_pid.and_then(cpu_ticks)) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)) as f64 / USER_HZ),
        _ => None,
    };
    let own = match (own_then, cpu_ticks(std::process::id())) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / USER_HZ / secs,
        _ => 0.0,
    };
    report(&args, &tally, secs, cpu, own);
    // Rooms end as their participants' connections time out at the SFU.
    Ok(())
}

/// `own`: this generator's CPU, s per s (near 1 means it, not the SFU,
/// may be what limits). The `RESULT` line goes to stdout for scripts.
#[allow(clippy::print_stdout)]
fn report(args: &SfuLoad, t: &Tally, secs: f64, cpu: Option<f64>, own: f64) {
    let pps = (t.packets[0] + t.packets[1]) as f64 / secs;
    let per_packet_us = cpu.map(|c| c * 1e6 / (pps * secs).max(1.0));
    let (p50, p99) = (
        t.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
        t.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
    );
    let (loss, paused) = t.loss(None);
    let (loss, paused) = (loss * 100.0, paused * 100.0);
    eprintln!(
        "loadsim sfu: forwarded {:.0} packets/s ({:.0} audio, {:.0} video) to {} subscribers",
        pps,
        t.packets[0] as f64 / secs,
        t.packets[1] as f64 / secs,
        args.rooms * args.room_size
    );
    if let (Some(c), Some(u)) = (cpu, per_packet_us) {
        eprintln!(
            "loadsim sfu: SFU CPU {:.2} s per s, {u:.2} µs per forwarded packet",
            c / secs
        );
    }
    eprintln!(
        "loadsim sfu: latency p50 {p50:.2} ms, p99 {p99:.2} ms; loss {loss:.3}% (audio {:.3}%, video {:.3}%); paused by the SFU {paused:.1}%",
        t.loss(Some(0)).0 * 100.0,
        t.loss(Some(1)).0 * 100.0
    );
    eprintln!("loadsim sfu: this generator's CPU {own:.2} s per s");
    println!(
        "RESULT target={:?} rooms={} size={} pps={:.0} cpu_s={} us_per_packet={} p50_ms={p50:.2} p99_ms={p99:.2} loss_pct={loss:.3} paused_pct={paused:.1} generator_cpu_s={own:.2}",
        args.target,
        args.rooms,
        args.room_size,
        pps,
        cpu.map_or("-".into(), |c| format!("{:.2}", c / secs)),
        per_packet_us.map_or("-".into(), |u| format!("{u:.2}")),
    );
}

/// A participant's offer: audio and video to send and, for Parley, the
/// receive slots in the same connection.
async fn publisher(
    ip: std::net::IpAddr,
    id: u32,
    audio_slots: usize,
    video_slots: usize,
) -> Result<(Participant, String)> {
    let mut send = Endpoint::new(ip).await?;
    let mut api = send.rtc.sdp_api();
    let audio = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    for _ in 0..audio_slots {
        api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
    }
    let video = api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
    for _ in 0..video_slots {
        api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
    }
    let (offer, pending) = api.apply().ok_or_else(|| anyhow!("nothing to offer"))?;
    let sdp = offer.to_sdp_string();
    send.pending = Some(pending);
    Ok((
        Participant {
            id,
            send,
            recv: None,
            audio,
            video,
            audio_seq: 0,
            video_seq: 0,
        },
        sdp,
    ))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Everyone joins the Parley SFU: one connection each, with a slot for
/// every other participant's audio and `last_n` video slots.
async fn join_parley(args: &SfuLoad) -> Result<Vec<Participant>> {
    let data = crate::data::open(&args.data)?;
    let secret = crate::data::sip_secret(&data.sip_secret)?;
    let roots = crate::tls::roots(&data.ca_cert)?;
    let client = client_sdk::group::SfuClient::new(args.api, &args.api.ip().to_string(), roots)?;
    let run = unix_now();
    let mut people = Vec::new();
    for r in 0..args.rooms {
        let room = format!("loadsim-{run}-{r:05}");
        let token = sfu::token::make(&secret, &room, run + 3600);
        for k in 0..args.room_size {
            let id = (r * args.room_size + k) as u32;
            let others = args.room_size - 1;
            let (mut p, offer) = publisher(
                args.local,
                id,
                args.audio_slots.min(others),
                args.last_n.min(others),
            )
            .await?;
            let joined = client
                .join(&room, &token, &offer)
                .await
                .with_context(|| format!("participant {id} joining {room}"))?;
            p.send.accept_answer(&joined.answer)?;
            people.push(p);
        }
        eprintln!("loadsim sfu: room {} of {} joined", r + 1, args.rooms);
    }
    Ok(people)
}

/// One request to Janus's HTTP API: its JSON answer.
async fn janus(addr: SocketAddr, path: &str, body: Option<Value>) -> Result<Value> {
    let req = hyper::Request::builder()
        .method(if body.is_some() { "POST" } else { "GET" })
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let run = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let resp = send.send_request(req).await?;
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok(serde_json::from_slice::<Value>(&bytes)?)
    };
    tokio::time::timeout(Duration::from_secs(40), run)
        .await
        .map_err(|_| anyhow!("Janus did not answer {path} within 40 s"))?
}

fn transaction() -> String {
    format!("{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    u64::from_be_bytes(b)
}

/// A Janus API call that answers at once ("success"): its `data`, or
/// the plugin's data.
async fn janus_call(addr: SocketAddr, path: &str, mut body: Value) -> Result<Value> {
    body["transaction"] = json!(transaction());
    let v = janus(addr, path, Some(body.clone())).await?;
    match v["janus"].as_str() {
        Some("success") => Ok(v),
        Some("ack") => Ok(v),
        _ => bail!("Janus refused {body}: {v}"),
    }
}

/// Waits (long poll, bounded) for the event on `handle` that carries a
/// JSEP: the plugin's data and the SDP.
async fn janus_jsep(addr: SocketAddr, session: u64, handle: u64) -> Result<(Value, String)> {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let events = janus(addr, &format!("/janus/{session}?maxev=10"), None).await?;
        let list = match events {
            Value::Array(a) => a,
            v => vec![v],
        };
        for e in list {
            if e["sender"].as_u64() != Some(handle) {
                continue;
            }
            let data = &e["plugindata"]["data"];
            if data["error"].is_string() {
                bail!("Janus: {}", data["error"]);
            }
            if let Some(sdp) = e["jsep"]["sdp"].as_str() {
                return Ok((data.clone(), sdp.to_string()));
            }
        }
    }
    bail!("no answer from Janus's VideoRoom within 30 s")
}

/// A Janus session with a VideoRoom handle attached.
async fn janus_handle(addr: SocketAddr, session: Option<u64>) -> Result<(u64, u64)> {
    let session = match session {
        Some(s) => s,
        None => janus_call(addr, "/janus", json!({"janus": "create"})).await?["data"]["id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no Janus session id"))?,
    };
    let handle = janus_call(
        addr,
        &format!("/janus/{session}"),
        json!({"janus": "attach", "plugin": "janus.plugin.videoroom"}),
    )
    .await?["data"]["id"]
        .as_u64()
        .ok_or_else(|| anyhow!("no Janus handle id"))?;
    Ok((session, handle))
}

/// Everyone publishes to a VideoRoom of its room, then subscribes (one
/// more connection) to every other's audio and `last_n` of their videos.
async fn join_janus(args: &SfuLoad) -> Result<Vec<Participant>> {
    let addr = args.api;
    let mut people = Vec::new();
    // Per participant: its session, and its feed id with its mids.
    let mut sessions = Vec::new();
    let mut feeds: Vec<(u64, String, String)> = Vec::new();
    let base = (rand_u64() % 1_000_000) * 1000;
    for r in 0..args.rooms {
        let room = base + r as u64;
        let (s, h) = janus_handle(addr, None).await?;
        let created = janus_call(
            addr,
            &format!("/janus/{s}/{h}"),
            json!({"janus": "message", "body": {
                "request": "create", "room": room, "publishers": args.room_size + 1,
                "audiocodec": "opus", "videocodec": "h264", "bitrate": 0,
                "audiolevel_ext": true, "notify_joining": false,
            }}),
        )
        .await?;
        if created["plugindata"]["data"]["videoroom"] != "created" {
            bail!("Janus did not create room {room}: {created}");
        }
        for k in 0..args.room_size {
            let id = (r * args.room_size + k) as u32;
            let (mut p, offer) = publisher(args.local, id, 0, 0).await?;
            let (session, handle) = janus_handle(addr, None).await?;
            janus_call(
                addr,
                &format!("/janus/{session}/{handle}"),
                json!({"janus": "message",
                    "body": {"request": "joinandconfigure", "room": room, "ptype": "publisher",
                             "display": format!("p{id}"), "audio": true, "video": true},
                    "jsep": {"type": "offer", "sdp": offer, "trickle": false}}),
            )
            .await?;
            let (data, answer) = janus_jsep(addr, session, handle).await?;
            p.send.accept_answer(&answer)?;
            let feed = data["id"]
                .as_u64()
                .ok_or_else(|| anyhow!("no feed id in {data}"))?;
            feeds.push((feed, p.audio.to_string(), p.video.to_string()));
            sessions.push(session);
            people.push(p);
        }
        eprintln!(
            "loadsim sfu: room {} of {}: publishers joined",
            r + 1,
            args.rooms
        );
    }
    // A feed can be subscribed to once its publisher is connected.
    let until = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 2048];
    while !people.iter().all(|p| p.send.connected) {
        if Instant::now() > until {
            bail!("publishers not connected to Janus within 20 s");
        }
        let now = Instant::now();
        for p in people.iter_mut() {
            p.send.step(now, &mut buf, &mut |_| {})?;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for r in 0..args.rooms {
        let room = base + r as u64;
        for k in 0..args.room_size {
            let i = r * args.room_size + k;
            let mut streams = Vec::new();
            let (mut voices, mut videos) = (0, 0);
            for j in (r * args.room_size..(r + 1) * args.room_size).filter(|j| *j != i) {
                let (feed, audio, video) = &feeds[j];
                if voices < args.audio_slots {
                    streams.push(json!({"feed": feed, "mid": audio}));
                    voices += 1;
                }
                if videos < args.last_n {
                    streams.push(json!({"feed": feed, "mid": video}));
                    videos += 1;
                }
            }
            let (session, handle) = janus_handle(addr, Some(sessions[i])).await?;
            janus_call(
                addr,
                &format!("/janus/{session}/{handle}"),
                json!({"janus": "message", "body": {
                    "request": "join", "room": room, "ptype": "subscriber",
                    "streams": streams,
                }}),
            )
            .await?;
            let (_, offer) = janus_jsep(addr, session, handle).await?;
            let mut recv = Endpoint::new(args.local).await?;
            let answer = recv.accept_offer(&offer)?;
            janus_call(
                addr,
                &format!("/janus/{session}/{handle}"),
                json!({"janus": "message", "body": {"request": "start"},
                       "jsep": {"type": "answer", "sdp": answer, "trickle": false}}),
            )
            .await?;
            people[i].recv = Some(recv);
        }
        eprintln!(
            "loadsim sfu: room {} of {}: subscribers joined",
            r + 1,
            args.rooms
        );
    }
    Ok(people)
}

//! One device's media in a group call, sans-IO: one peer connection to
//! the SFU (str0m in RTP mode), its own audio encrypted end to end with
//! SFrame before it is packetised, and the others' audio taken from the
//! SFU's slots, decrypted, decoded per sender and mixed.
//!
//! Only the RTP header, the audio level (RFC 6464) and the `mid` travel in
//! the clear: the SFU needs them to choose whom to forward. Whose frame a
//! packet carries is read from the SFrame key id once it decrypts, never
//! from the SFU.
//!
//! Video goes the same way: each H.264 frame is sealed whole, then split
//! into RTP packets of at most [`MAX_CHUNK`] bytes with the frame marking
//! extension (RFC 9626: start, end, independent) in the clear, so the SFU
//! can switch a subscriber's slot at a key frame it cannot read. Frames
//! from the slots are put back together, opened and decoded per sender.
//! The camera is sent in up to three simulcast layers (rids `q`, `h`,
//! `f`: a quarter, half and full size), each encoded and sealed on its
//! own; the SFU gives each subscriber the layer its bandwidth allows, and
//! a slot that moves between layers is one stream to the decoder.
//!
//! The app drives it as it drives a one-to-one [`crate::media::MediaSession`]:
//! datagrams in, [`GroupSession::poll_transmit`] out, timers through
//! [`GroupSession::poll_timeout`]; 20 ms of microphone in with
//! [`GroupSession::send_audio`], 20 ms of the mix out with
//! [`GroupSession::mix`], camera frames in with
//! [`GroupSession::send_video`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use str0m::change::{SdpAnswer, SdpPendingOffer};
use str0m::media::{Direction, MediaKind, Mid, Rid, Simulcast, SimulcastLayer};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};

use str0m::bwe::{Bitrate, BweKind};
use str0m::media::KeyframeRequestKind;

use wire::meter::Meter;

use super::uplink::{audio_need, LayerGate};
use crate::group_keys::{GroupError, GroupKeys};
use crate::media::audio::{AudioConfig, AudioDecoder, AudioEncoder, AudioError, FRAME_SAMPLES};
use crate::media::jitter::{JitterBuffer, Playout};
use crate::media::video::{half, Picture, VideoDecoder, VideoEncoder, VideoError, FPS};

/// The largest RTP payload a video frame is split into (SFrame ciphertext
/// stays under a 1200-byte path MTU with headers and SRTP).
pub const MAX_CHUNK: usize = 1100;

/// RFC 9626 frame marking, short form: start, end, independent.
const MARK_START: u8 = 0x80;
const MARK_END: u8 = 0x40;
const MARK_INDEPENDENT: u8 = 0x20;

/// The 90 kHz RTP clock's ticks per video frame.
const VIDEO_TICKS: u64 = 90_000 / FPS as u64;

/// The extension id for frame marking, as the SFU negotiates it.
const FRAME_MARKING_ID: u8 = 5;

/// RFC 6464: a frame whose level is at or below this many -dBov counts
/// as voice.
const VOICE_LEVEL: u8 = 50;

#[derive(Debug, thiserror::Error)]
pub enum GroupMediaError {
    #[error("SDP: {0}")]
    Sdp(String),
    #[error("media: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("audio: {0}")]
    Audio(#[from] AudioError),
    #[error("keys: {0}")]
    Keys(#[from] GroupError),
    #[error("video: {0}")]
    Video(#[from] VideoError),
}

/// What a group session takes and sends.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// A TURN relay to reach the SFU through (networks that block UDP to
    /// it, or to hide this device's addresses).
    pub turn: Option<crate::turn::Config>,
    /// Only the relayed candidate: the SFU never sees this device's own
    /// address.
    pub relay_only: bool,
    pub audio: AudioConfig,
    /// Speakers heard at once (receive-only audio m-lines offered).
    pub audio_slots: usize,
    /// Videos seen at once; 0 sends and takes no video.
    pub video_slots: usize,
    /// The full-size layer's bitrate; each lower layer gets a quarter of
    /// the one above (as many pixels).
    pub video_bitrate: u32,
    /// Simulcast layers sent, 1 to 3: full size (`f`), half (`h`) and
    /// quarter (`q`), from the top down. One layer is sent without rids.
    pub video_layers: usize,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        GroupConfig {
            turn: None,
            relay_only: false,
            audio: AudioConfig::default(),
            audio_slots: 8,
            video_slots: 0,
            video_bitrate: 500_000,
            video_layers: 3,
        }
    }
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// What a sender's audio did, as this device heard it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Heard {
    /// Frames that decrypted.
    pub frames: u64,
    /// RFC 6464 level of the newest played (-dBov; 127 silence).
    pub level: u8,
    /// Share of its frames played that were concealed (lost, late).
    pub concealed: f64,
    /// MOS estimate (G.107 E-model) from the concealment and the playout
    /// delay, as for one-to-one calls.
    pub mos: f64,
    /// Its jitter buffer's counters.
    pub jitter: crate::media::jitter::JitterStats,
}

/// What a sender's video did, as this device saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Seen {
    /// Pictures decoded.
    pub pictures: u64,
    /// The newest.
    pub last: Option<Picture>,
}

/// How the session is going.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupStats {
    /// Frames sent (encrypted).
    pub frames_out: u64,
    /// Packets that did not decrypt: keys not (yet) held, or not a
    /// member's.
    pub undecryptable: u64,
    /// By sender index.
    pub heard: BTreeMap<u16, Heard>,
    /// Video frames sent (encrypted) and key frames among them.
    pub video_frames_out: u64,
    pub keyframes_out: u64,
    /// Simulcast layers sent now (the uplink's estimate keeps those that
    /// fit, lowest first), and how often that number changed.
    pub layers_sent: usize,
    pub layer_changes: u64,
    /// What each layer carried over the last second, payload bits per
    /// second (lowest first; a stopped layer its last).
    pub layer_bitrates: Vec<u64>,
    /// The uplink's bandwidth estimate (TWCC feedback from the SFU), RTP
    /// payload bits per second.
    pub send_estimate: Option<u64>,
    /// By sender index.
    pub seen: BTreeMap<u16, Seen>,
}

/// A video frame coming together in a slot.
#[derive(Default)]
struct Assembly {
    timestamp: u32,
    start: Option<u64>,
    end: Option<u64>,
    chunks: BTreeMap<u64, Vec<u8>>,
}

/// One simulcast layer this device sends: the camera halved `halvings`
/// times, its encoder and its RTP numbering.
struct SendLayer {
    rid: Option<Rid>,
    halvings: u8,
    encoder: VideoEncoder,
    seq: u64,
}

/// The rids of `n` simulcast layers, lowest first, with how many times
/// each halves the camera; one layer goes without a rid.
fn simulcast_layers(n: usize) -> Vec<(Option<&'static str>, u8)> {
    match n.clamp(1, 3) {
        1 => vec![(None, 0)],
        n => [("q", 2), ("h", 1), ("f", 0)][3 - n..]
            .iter()
            .map(|(rid, h)| (Some(*rid), *h))
            .collect(),
    }
}

struct Video {
    publish: Mid,
    slots: Vec<Mid>,
    /// Lowest first.
    layers: Vec<SendLayer>,
    /// How many of them the uplink carries.
    gate: LayerGate,
    /// What each layer sends.
    meters: Vec<Meter>,
    decoders: HashMap<u16, VideoDecoder>,
    assembling: HashMap<Mid, Assembly>,
    frames: u64,
}

/// One sender's audio: its jitter buffer (reordering, loss concealed by
/// Opus), its decoder, and when it was last heard.
struct SenderAudio {
    decoder: AudioDecoder,
    jitter: JitterBuffer,
    pcm: Vec<i16>,
    last_heard: Instant,
}

/// A sender not heard from this long (it left, or its slot went to
/// another speaker) is dropped from the mix.
const SENDER_GONE: std::time::Duration = std::time::Duration::from_secs(3);

pub struct GroupSession {
    rtc: Rtc,
    local: SocketAddr,
    publish: Mid,
    pending: Option<SdpPendingOffer>,
    keys: GroupKeys,
    encoder: AudioEncoder,
    senders: HashMap<u16, SenderAudio>,
    /// When a frame (audio or video) of each sender last opened.
    last_frame: HashMap<u16, Instant>,
    seq: u64,
    video: Option<Video>,
    /// The relay, its server and the relayed address once allocated.
    turn: Option<(crate::turn::TurnClient, SocketAddr)>,
    relayed: Option<SocketAddr>,
    /// The SFU's candidates from its answer: the relay must let them in.
    sfu_addrs: Vec<SocketAddr>,
    timeout: Instant,
    out: VecDeque<Datagram>,
    connected: bool,
    closed: bool,
    stats: GroupStats,
}

impl std::fmt::Debug for GroupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupSession")
            .field("local", &self.local)
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl GroupSession {
    /// A session on the app's UDP socket bound at `local`; its offer for
    /// the SFU's join API.
    pub fn new(
        now: Instant,
        local: SocketAddr,
        keys: GroupKeys,
        config: GroupConfig,
    ) -> Result<(GroupSession, String), GroupMediaError> {
        let video_on = config.video_slots > 0;
        let layers = simulcast_layers(config.video_layers);
        // Each layer's bitrate, lowest first, and what they and the audio
        // need: the uplink's estimate starts there and keeps the layers
        // that fit.
        let rate = |halvings: u8| config.video_bitrate >> (2 * u32::from(halvings));
        let layer_rates: Vec<u64> = layers.iter().map(|(_, h)| u64::from(rate(*h))).collect();
        let gate = LayerGate::new(audio_need(config.audio.start_bitrate), layer_rates);
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(video_on)
            .set_extension(FRAME_MARKING_ID, str0m::rtp::Extension::FrameMarking)
            .enable_bwe(video_on.then(|| Bitrate::bps(gate.desired())))
            .build(now);
        if video_on {
            rtc.bwe()
                .set_bitrate(Bitrate::bps(0), Bitrate::bps(gate.desired()));
        }
        if !config.relay_only {
            let host = Candidate::host(local, Protocol::Udp)
                .map_err(|e| GroupMediaError::Sdp(format!("host candidate {local}: {e}")))?;
            rtc.add_local_candidate(host);
        }
        let turn = config.turn.clone().map(|tc| {
            let server = tc.server;
            let mut client = crate::turn::TurnClient::new(tc, u64::from(local.port()) | 1);
            client.allocate(now);
            (client, server)
        });
        let mut api = rtc.sdp_api();
        let publish = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        for _ in 0..config.audio_slots {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        let video_mids = video_on.then(|| {
            let simulcast = (layers.len() > 1).then(|| {
                let mut s = Simulcast::new();
                for rid in layers.iter().filter_map(|(rid, _)| *rid) {
                    s.add_send_layer(SimulcastLayer::new(rid));
                }
                s
            });
            let publish =
                api.add_media(MediaKind::Video, Direction::SendOnly, None, None, simulcast);
            let slots: Vec<Mid> = (0..config.video_slots)
                .map(|_| api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None))
                .collect();
            (publish, slots)
        });
        let (offer, pending) = api
            .apply()
            .ok_or_else(|| GroupMediaError::Sdp("nothing to offer".into()))?;
        let video = match video_mids {
            Some((publish, slots)) => Some(Video {
                publish,
                slots,
                layers: layers
                    .iter()
                    .map(|(rid, halvings)| {
                        Ok(SendLayer {
                            rid: rid.map(Rid::from),
                            halvings: *halvings,
                            encoder: VideoEncoder::new(rate(*halvings))?,
                            seq: 0,
                        })
                    })
                    .collect::<Result<_, VideoError>>()?,
                gate,
                meters: layers.iter().map(|_| Meter::new(now)).collect(),
                decoders: HashMap::new(),
                assembling: HashMap::new(),
                frames: 0,
            }),
            None => None,
        };
        let session = GroupSession {
            rtc,
            local,
            publish,
            pending: Some(pending),
            keys,
            encoder: AudioEncoder::new(config.audio)?,
            senders: HashMap::new(),
            last_frame: HashMap::new(),
            seq: 0,
            video,
            turn,
            relayed: None,
            sfu_addrs: Vec::new(),
            timeout: now,
            out: VecDeque::new(),
            connected: false,
            closed: false,
            stats: GroupStats::default(),
        };
        Ok((session, offer.to_sdp_string()))
    }

    /// The SFU's answer to the offer.
    pub fn accept_answer(&mut self, now: Instant, answer: &str) -> Result<(), GroupMediaError> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| GroupMediaError::Sdp("no offer waits for an answer".into()))?;
        self.sfu_addrs = answer
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a="))
            .filter_map(|c| Candidate::from_sdp_string(c).ok())
            .map(|c| c.addr())
            .collect();
        let answer =
            SdpAnswer::from_sdp_string(answer).map_err(|e| GroupMediaError::Sdp(e.to_string()))?;
        self.rtc.sdp_api().accept_answer(pending, answer)?;
        self.permit_sfu(now);
        self.drain(now)
    }

    /// The keys: the app hands it the others' key messages and sends its
    /// own as members join and leave.
    pub fn keys(&mut self) -> &mut GroupKeys {
        &mut self.keys
    }

    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The SFU closed or ICE failed: the session is over.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// When a frame of sender `index` last opened here, if one ever did:
    /// a member whose device sends (it always does while in the call)
    /// and has gone quiet for long has left, whether it said so or not.
    pub fn last_heard(&self, index: u16) -> Option<Instant> {
        self.last_frame.get(&index).copied()
    }

    pub fn stats(&self) -> &GroupStats {
        &self.stats
    }

    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), GroupMediaError> {
        match self.turn.as_mut() {
            Some((t, server)) if *server == from => {
                t.handle_input(data, now);
                self.drain_turn(now)?;
            }
            _ => {
                if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, data) {
                    self.rtc.handle_input(Input::Receive(now, r))?;
                }
            }
        }
        self.drain(now)
    }

    /// The relay lets the SFU's candidates in (a channel each).
    fn permit_sfu(&mut self, now: Instant) {
        if let (Some((t, _)), Some(_)) = (self.turn.as_mut(), self.relayed) {
            for a in &self.sfu_addrs {
                t.bind_channel(*a, now);
            }
        }
    }

    /// What the relay said: its allocation (our relayed candidate), and
    /// media from the SFU through it.
    fn drain_turn(&mut self, now: Instant) -> Result<(), GroupMediaError> {
        let Some((t, server)) = self.turn.as_mut() else {
            return Ok(());
        };
        let server = *server;
        while let Some(data) = t.poll_transmit() {
            self.out.push_back(Datagram { to: server, data });
        }
        let mut events = Vec::new();
        while let Some(e) = t.poll_event() {
            events.push(e);
        }
        for e in events {
            match e {
                crate::turn::Event::Allocated { relayed, .. } => {
                    self.relayed = Some(relayed);
                    if let Ok(c) = Candidate::relayed(relayed, self.local, Protocol::Udp) {
                        self.rtc.add_local_candidate(c);
                    }
                    self.permit_sfu(now);
                    if let Some((t, _)) = self.turn.as_mut() {
                        while let Some(data) = t.poll_transmit() {
                            self.out.push_back(Datagram { to: server, data });
                        }
                    }
                }
                crate::turn::Event::Data { peer, data } => {
                    if let Some(relayed) = self.relayed {
                        if let Ok(r) = Receive::new(Protocol::Udp, peer, relayed, &data) {
                            self.rtc.handle_input(Input::Receive(now, r))?;
                            self.drain(now)?;
                        }
                    }
                }
                crate::turn::Event::Failed { code, reason } => {
                    tracing::warn!(code, reason, "the relay to the SFU failed");
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn poll_timeout(&self) -> Instant {
        let relay = self.turn.as_ref().and_then(|(t, _)| t.poll_timeout());
        relay.map_or(self.timeout, |r| r.min(self.timeout))
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), GroupMediaError> {
        if let Some((t, _)) = self.turn.as_mut() {
            t.handle_timeout(now);
        }
        self.drain_turn(now)?;
        self.rtc.handle_input(Input::Timeout(now))?;
        self.drain(now)
    }

    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.out.pop_front()
    }

    /// 20 ms of microphone ([`FRAME_SAMPLES`] at 48 kHz): encoded,
    /// encrypted under this device's sender key, sent with its level.
    pub fn send_audio(&mut self, now: Instant, pcm: &[i16]) -> Result<(), GroupMediaError> {
        if !self.connected {
            return Ok(());
        }
        let Some(opus) = self.encoder.encode(pcm)? else {
            return Ok(());
        };
        let sframe = self.keys.encrypt(&[], &opus)?;
        let level = level(pcm);
        let pt = self
            .rtc
            .media(self.publish)
            .and_then(|m| m.remote_pts().first().copied());
        let Some(pt) = pt else {
            return Ok(());
        };
        let seq = self.seq;
        self.seq += 1;
        let ext = ExtensionValues {
            audio_level: Some(-(level as i8)),
            voice_activity: Some(level <= VOICE_LEVEL),
            mid: Some(self.publish),
            ..Default::default()
        };
        let mut api = self.rtc.direct_api();
        if let Some(tx) = api.stream_tx_by_mid(self.publish, None) {
            tx.write_rtp(
                RtpWrite::new(
                    pt,
                    SeqNo::from(seq),
                    (seq * FRAME_SAMPLES as u64) as u32,
                    now,
                    sframe,
                )
                .ext_vals(ext),
            );
            self.stats.frames_out += 1;
        }
        self.drain(now)
    }

    /// One camera frame: encoded into each simulcast layer, each sealed
    /// whole under this device's sender key and sent in chunks with frame
    /// marking in the clear.
    pub fn send_video(
        &mut self,
        now: Instant,
        frame: &openh264::formats::YUVBuffer,
    ) -> Result<(), GroupMediaError> {
        let Some(v) = self.video.as_mut().filter(|_| self.connected) else {
            return Ok(());
        };
        let pt = self
            .rtc
            .media(v.publish)
            .and_then(|m| m.remote_pts().first().copied());
        let Some(pt) = pt else {
            return Ok(());
        };
        let timestamp = (v.frames * VIDEO_TICKS) as u32;
        v.frames += 1;
        // The camera at each size a layer wants, halved once per step.
        let deepest = v.layers.iter().map(|l| l.halvings).max().unwrap_or(0);
        let mut smaller: Vec<openh264::formats::YUVBuffer> = Vec::new();
        for _ in 0..deepest {
            let next = half(smaller.last().unwrap_or(frame));
            smaller.push(next);
        }
        // What each layer carried over the last second (RTP payloads, as
        // the estimate counts).
        let mut measured = false;
        let running = v.gate.active();
        for (i, m) in v.meters.iter_mut().enumerate() {
            if let Some(bps) = m.take(now) {
                measured = true;
                // A stopped layer keeps what it last carried.
                if i < running {
                    v.gate.measure(i, bps);
                }
            }
        }
        if measured {
            self.stats.layer_bitrates = (0..v.layers.len()).map(|i| v.gate.measured(i)).collect();
        }
        // The layers the uplink carries; one that starts again starts
        // with a key frame.
        let before = v.gate.active();
        let active = match self.stats.send_estimate {
            Some(e) => v.gate.update(now, e),
            None => before,
        };
        if active != before {
            self.stats.layer_changes += 1;
            for l in v
                .layers
                .iter_mut()
                .skip(before)
                .take(active.saturating_sub(before))
            {
                l.encoder.request_keyframe();
            }
        }
        if measured {
            // What every layer needs: the estimator probes for it.
            self.rtc
                .bwe()
                .set_bitrate(Bitrate::bps(0), Bitrate::bps(v.gate.desired()));
        }
        self.stats.layers_sent = active;
        let mut api = self.rtc.direct_api();
        let mut sent_any = false;
        for (layer, meter) in v.layers.iter_mut().zip(v.meters.iter_mut()).take(active) {
            let annexb = match layer.halvings {
                0 => layer.encoder.encode(frame)?,
                h => layer.encoder.encode(&smaller[usize::from(h) - 1])?,
            };
            if annexb.is_empty() {
                continue; // skipped by rate control
            }
            let key = is_keyframe(&annexb);
            let sealed = self.keys.encrypt(&[], &annexb)?;
            let Some(tx) = api.stream_tx_by_mid(v.publish, layer.rid) else {
                continue;
            };
            let chunks: Vec<&[u8]> = sealed.chunks(MAX_CHUNK).collect();
            let last = chunks.len() - 1;
            meter.add(sealed.len() as u64, now);
            for (i, chunk) in chunks.into_iter().enumerate() {
                let mut mark = 0u8;
                if i == 0 {
                    mark |= MARK_START;
                }
                if i == last {
                    mark |= MARK_END;
                }
                if key {
                    mark |= MARK_INDEPENDENT;
                }
                let ext = ExtensionValues {
                    frame_mark: Some(u32::from(mark) << 24),
                    mid: Some(v.publish),
                    rid: layer.rid,
                    ..Default::default()
                };
                tx.write_rtp(
                    RtpWrite::new(pt, SeqNo::from(layer.seq), timestamp, now, chunk)
                        .marker(i == last)
                        .ext_vals(ext)
                        .nackable(true),
                );
                layer.seq += 1;
            }
            sent_any = true;
            if key {
                self.stats.keyframes_out += 1;
            }
        }
        if sent_any {
            self.stats.video_frames_out += 1;
        }
        self.drain(now)
    }

    /// The next 20 ms of everyone else, mixed (silence if nobody spoke):
    /// each sender's next frame from its jitter buffer, a lost one
    /// rebuilt from the next packet's FEC or concealed by Opus.
    pub fn mix(&mut self, now: Instant) -> Vec<i16> {
        self.senders
            .retain(|_, s| now.saturating_duration_since(s.last_heard) < SENDER_GONE);
        let mut sum = vec![0i32; FRAME_SAMPLES];
        for (index, s) in self.senders.iter_mut() {
            let decoded = match s.jitter.pop(now) {
                Playout::Silence => continue,
                Playout::Frame(p) => s.decoder.decode(Some(&p), false, &mut s.pcm),
                Playout::Fec(p) => s.decoder.decode(Some(&p), true, &mut s.pcm),
                Playout::Conceal => s.decoder.decode(None, false, &mut s.pcm),
            };
            if decoded.is_err() {
                continue;
            }
            if let Some(h) = self.stats.heard.get_mut(index) {
                h.level = level(&s.pcm);
                let js = s.jitter.stats();
                h.concealed = js.concealed as f64 / js.played.max(1) as f64;
                h.jitter = js;
                // The network's share of the delay is not known here:
                // one frame each way on top of the playout delay.
                let delay = s.jitter.target().as_secs_f64() * 1000.0 + 40.0;
                h.mos = crate::media::quality::mos(delay, h.concealed);
            }
            for (acc, x) in sum.iter_mut().zip(&s.pcm) {
                *acc += i32::from(*x);
            }
        }
        sum.into_iter()
            .map(|x| x.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16)
            .collect()
    }

    fn drain(&mut self, now: Instant) -> Result<(), GroupMediaError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => match (self.turn.as_mut(), self.relayed) {
                    // From the relayed candidate: through the relay.
                    (Some((turn, server)), Some(relayed)) if t.source == relayed => {
                        let server = *server;
                        let wrapped = turn.wrap(t.destination, &t.contents);
                        while let Some(data) = turn.poll_transmit() {
                            self.out.push_back(Datagram { to: server, data });
                        }
                        self.out.push_back(Datagram {
                            to: server,
                            data: wrapped,
                        });
                    }
                    _ if t.source == self.local => self.out.push_back(Datagram {
                        to: t.destination,
                        data: t.contents.to_vec(),
                    }),
                    // A candidate given up: its traffic would show our
                    // address.
                    _ => {}
                },
                Output::Event(e) => self.on_event(now, e),
            }
        }
    }

    fn on_event(&mut self, _now: Instant, e: Event) {
        match e {
            Event::Connected => self.connected = true,
            Event::EgressBitrateEstimate(BweKind::Twcc { estimate, .. }) => {
                self.stats.send_estimate = Some(estimate.as_u64());
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => self.closed = true,
            Event::RtpPacket(p) => {
                let mid = self
                    .rtc
                    .direct_api()
                    .stream_rx(&p.header.ssrc)
                    .map(|s| s.mid());
                let video_slot = match (&self.video, mid) {
                    (Some(v), Some(m)) => v.slots.contains(&m).then_some(m),
                    _ => None,
                };
                match video_slot {
                    Some(mid) => self.on_video_packet(mid, &p),
                    None => self.on_frame(&p),
                }
            }
            // The SFU wants a key frame of ours (a subscriber switched to
            // us, or lost the picture).
            Event::KeyframeRequest(req) => {
                if let Some(v) = self.video.as_mut() {
                    for l in v.layers.iter_mut() {
                        if req.rid.is_none() || l.rid == req.rid {
                            l.encoder.request_keyframe();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// A chunk of a video frame in slot `mid`; a whole frame is opened and
    /// decoded. A frame that cannot be opened or decoded asks for a key
    /// frame.
    fn on_video_packet(&mut self, mid: Mid, p: &str0m::rtp::RtpPacket) {
        let Some(v) = self.video.as_mut() else {
            return;
        };
        let mark = p.header.ext_vals.frame_mark.map_or(0, |m| (m >> 24) as u8);
        let seq = *p.seq_no;
        let a = v.assembling.entry(mid).or_default();
        if a.timestamp != p.header.timestamp || a.chunks.is_empty() {
            *a = Assembly {
                timestamp: p.header.timestamp,
                ..Assembly::default()
            };
        }
        if mark & MARK_START != 0 {
            a.start = Some(seq);
        }
        if mark & MARK_END != 0 || p.header.marker {
            a.end = Some(seq);
        }
        a.chunks.insert(seq, p.payload.to_vec());
        let (Some(start), Some(end)) = (a.start, a.end) else {
            return;
        };
        if end < start || a.chunks.len() as u64 != end - start + 1 {
            return;
        }
        let sealed: Vec<u8> = std::mem::take(&mut a.chunks)
            .into_values()
            .flatten()
            .collect();
        *a = Assembly::default();
        let ssrc = p.header.ssrc;
        let opened = wire::sframe::Header::decode(&sealed)
            .ok()
            .and_then(|(h, _)| Some(((h.kid >> 16) as u16, self.keys.decrypt(&[], &sealed).ok()?)));
        let Some((index, annexb)) = opened else {
            self.stats.undecryptable += 1;
            return;
        };
        self.last_frame.insert(index, p.timestamp);
        let Some(v) = self.video.as_mut() else {
            return;
        };
        let decoder = match v.decoders.entry(index) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match VideoDecoder::new() {
                Ok(d) => e.insert(d),
                Err(_) => return,
            },
        };
        match decoder.decode(&annexb) {
            Ok(Some(picture)) => {
                let seen = self.stats.seen.entry(index).or_default();
                seen.pictures += 1;
                seen.last = Some(picture);
            }
            Ok(None) | Err(_) => {
                if let Some(s) = self.rtc.direct_api().stream_rx(&ssrc) {
                    s.request_keyframe(KeyframeRequestKind::Pli);
                }
            }
        }
    }

    /// A frame from the SFU: whose it is says its SFrame KID, once it
    /// decrypts. It waits in that sender's jitter buffer for its turn.
    fn on_frame(&mut self, p: &str0m::rtp::RtpPacket) {
        let sframe = &p.payload[..];
        let Ok((header, _)) = wire::sframe::Header::decode(sframe) else {
            self.stats.undecryptable += 1;
            return;
        };
        let Ok(opus) = self.keys.decrypt(&[], sframe) else {
            self.stats.undecryptable += 1;
            return;
        };
        let index = (header.kid >> 16) as u16;
        self.last_frame.insert(index, p.timestamp);
        let sender = match self.senders.entry(index) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => match AudioDecoder::new() {
                Ok(decoder) => v.insert(SenderAudio {
                    decoder,
                    jitter: JitterBuffer::new(),
                    pcm: Vec::with_capacity(FRAME_SAMPLES),
                    last_heard: p.timestamp,
                }),
                Err(_) => return,
            },
        };
        sender
            .jitter
            .push(p.header.timestamp, *p.seq_no, opus, p.timestamp);
        sender.last_heard = p.timestamp;
        self.stats.heard.entry(index).or_default().frames += 1;
    }
}

/// Whether an Annex B H.264 frame decodes alone: it has an IDR slice.
fn is_keyframe(annexb: &[u8]) -> bool {
    annexb
        .windows(4)
        .any(|w| w[..3] == [0, 0, 1] && w[3] & 0x1f == 5)
}

/// RFC 6464 level of a frame: -dBov of its RMS, 0 (loudest) to 127.
pub fn level(pcm: &[i16]) -> u8 {
    if pcm.is_empty() {
        return 127;
    }
    let mean = pcm.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / pcm.len() as f64;
    let rms = mean.sqrt() / 32768.0;
    if rms <= 0.0 {
        return 127;
    }
    (-20.0 * rms.log10()).round().clamp(0.0, 127.0) as u8
}

#[cfg(test)]
mod tests {
    use super::level;

    #[test]
    fn levels_follow_rfc_6464() {
        assert_eq!(level(&[0; 960]), 127);
        assert_eq!(level(&[i16::MAX; 960]), 0);
        let half: Vec<i16> = vec![16384; 960];
        assert_eq!(level(&half), 6);
    }
}

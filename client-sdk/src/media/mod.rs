//! The media engine: one call's audio over ICE and DTLS-SRTP, sans-IO.
//!
//! [`MediaSession`] wraps str0m's `Rtc` (ICE, DTLS, SRTP, RTP/RTCP) and
//! adds what str0m leaves to the application: the relayed candidate
//! through our [`TurnClient`](crate::turn::TurnClient), the Opus codec,
//! the adaptive jitter buffer with FEC and concealment, loss-driven
//! bitrate, and per-call statistics with a MOS estimate.
//!
//! Like every core here it takes bytes and `now` and returns what to send
//! and when to wake: the app owns one UDP socket (its host candidate and
//! the path to the TURN server) and an audio clock that pushes and pulls
//! 20 ms frames.
//!
//! Remote SDP is only accepted as a [`VerifiedSdp`]: either its DTLS
//! fingerprints were checked against a PASSporT signed by a device key
//! that `ids` proved, or the app explicitly chose an unauthenticated peer
//! (a third-party SIP phone). The type makes skipping the check a visible
//! decision rather than an omission.

pub mod audio;
mod dtls;
pub mod jitter;
pub mod quality;
mod sdp;
pub mod video;

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::{SdpAnswer, SdpOffer, SdpPendingOffer};
use str0m::format::Codec;
use str0m::media::{Direction, Frequency, KeyframeRequestKind, MediaKind, MediaTime, Mid};
use str0m::net::{Protocol, Receive};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use wire::keys::PublicKey;
use wire::passport::{self, Claims, Fingerprint, PassportError};

use crate::turn::{self, TurnClient};
use audio::{AudioConfig, AudioDecoder, AudioEncoder, AudioError, Decoded, FRAME_SAMPLES};
use jitter::{JitterBuffer, JitterStats, Playout};
use video::{VideoDecoder, VideoEncoder, VideoError};

/// How long gathering waits for the TURN server before going on without
/// a relayed candidate.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);
/// The first retransmission of an ICE check. Through relays the callee's
/// first checks are always lost: the caller's relay lets nothing from the
/// callee in until the answer has arrived and the caller bound a channel.
/// str0m retries a pair only when this timer fires (an incoming check
/// does not trigger one), so it bounds relayed set-up; str0m's default is
/// 250 ms. It doubles on each retry, up to 3 s.
const ICE_INITIAL_RTO: Duration = Duration::from_millis(100);
/// No incoming media for this long raises [`MediaEvent::Stalled`]. DTX
/// still sends a packet every 400 ms in silence.
const STALL: Duration = Duration::from_millis(1500);
/// At most one key frame request (PLI) per this long.
const PLI_INTERVAL: Duration = Duration::from_millis(500);
/// How old a PASSporT may be.
const PASSPORT_MAX_AGE_S: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The far end's DTLS fingerprint is not the one its device signed:
    /// someone between the devices (the signaling path) altered the
    /// session. The call must not go on.
    #[error("security: {0}; the call was stopped because its encryption keys could not be authenticated")]
    Security(#[from] PassportError),
    #[error("the relay-only policy is set but no relayed candidate could be gathered")]
    NoRelay,
    #[error("bad SDP: {0}")]
    Sdp(String),
    #[error("media engine: {0}")]
    Rtc(#[from] str0m::RtcError),
    #[error("no audio was negotiated")]
    NoAudio,
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Video(#[from] VideoError),
    #[error("{0} called in the wrong state")]
    State(&'static str),
}

/// Remote SDP whose DTLS fingerprints were checked (or explicitly not).
#[derive(Clone, Debug)]
pub struct VerifiedSdp {
    sdp: String,
    claims: Option<Claims>,
}

impl VerifiedSdp {
    /// Checks the Identity header that came with `sdp` against the far
    /// device's key (which the caller got from an `ids` lookup whose key
    /// transparency proof verified): the signature, its age, and that the
    /// SDP's fingerprints are exactly the signed ones.
    pub fn verify(
        sdp: &str,
        identity: &str,
        device_key: &PublicKey,
        now_unix: u64,
    ) -> Result<VerifiedSdp, MediaError> {
        let fps = passport::sdp_fingerprints(sdp);
        let claims =
            passport::verify_identity(identity, device_key, &fps, now_unix, PASSPORT_MAX_AGE_S)?;
        Ok(VerifiedSdp {
            sdp: sdp.into(),
            claims: Some(claims),
        })
    }

    /// A peer that cannot sign (a third-party SIP phone): DTLS still
    /// encrypts, but nobody vouches for its key.
    pub fn unauthenticated(sdp: &str) -> VerifiedSdp {
        VerifiedSdp {
            sdp: sdp.into(),
            claims: None,
        }
    }

    pub fn sdp(&self) -> &str {
        &self.sdp
    }

    /// The verified PASSporT claims; `None` when unauthenticated.
    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }
}

/// Session settings.
#[derive(Clone, Debug)]
pub struct MediaConfig {
    pub audio: AudioConfig,
    /// The relay and the device's short-lived credentials for it.
    pub turn: Option<turn::Config>,
    /// More relays, in order of preference: when the one in use stops
    /// answering mid-call, the session allocates on the next and asks for
    /// an ICE restart ([`MediaEvent::RelayMoved`]).
    pub spare_turn: Vec<turn::Config>,
    /// Offer only the relayed candidate: the far end never learns this
    /// device's addresses.
    pub relay_only: bool,
    /// Randomness for the TURN client's transaction ids.
    pub seed: u64,
    /// How often [`MediaEvent::Stats`] comes.
    pub stats_interval: Duration,
    /// Offer (and accept) H.264 video besides audio.
    pub video: bool,
    /// Video bitrate, bits per second. Default 300 kbps.
    pub video_bitrate: u32,
    /// The far end is a third-party SIP phone: DTLS runs on OpenSSL,
    /// which also takes the RSA certificates such phones present (see
    /// the `dtls` module). Default off: our devices use str0m's own.
    pub sip_phone: bool,
}

impl Default for MediaConfig {
    fn default() -> MediaConfig {
        MediaConfig {
            audio: AudioConfig::default(),
            turn: None,
            spare_turn: Vec::new(),
            relay_only: false,
            seed: 0,
            stats_interval: Duration::from_secs(1),
            video: false,
            video_bitrate: 300_000,
            sip_phone: false,
        }
    }
}

/// A datagram for the app's UDP socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub to: SocketAddr,
    pub data: Vec<u8>,
}

/// What the session tells the app.
#[derive(Clone, Debug, PartialEq)]
pub enum MediaEvent {
    /// Candidates are gathered: create the offer or answer now; in a call
    /// that is up, they were gathered again (a new network or a new
    /// relay): restart ICE.
    Gathered {
        host: Option<SocketAddr>,
        reflexive: Option<SocketAddr>,
        relayed: Option<SocketAddr>,
    },
    /// The relay could not be used (error code 0: no answer).
    RelayFailed {
        code: u16,
        reason: String,
    },
    /// The relay in use stopped answering mid-call; the session is
    /// allocating on the next one, and [`MediaEvent::Gathered`] follows.
    RelayMoved {
        from: SocketAddr,
        to: SocketAddr,
    },
    /// ICE and DTLS are up: SRTP flows.
    Connected,
    /// ICE lost the far end (a network change: restart ICE).
    Disconnected,
    /// No media has arrived for a while although ICE holds (the far end
    /// may be muted with DTX, or a NAT rebound): an ICE restart finds a
    /// working path again.
    Stalled,
    Stats(Box<CallStats>),
}

/// What this side handed the relay to carry, by RFC 7983's first-byte
/// demultiplexing: the relay must only ever see ciphertext.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayPayloads {
    /// ICE connectivity checks.
    pub stun: u64,
    /// The DTLS handshake.
    pub dtls: u64,
    /// SRTP and SRTCP.
    pub srtp: u64,
    /// Anything else (never expected).
    pub other: u64,
}

impl RelayPayloads {
    fn count(&mut self, p: &[u8]) {
        match p.first() {
            Some(0..=3) => self.stun += 1,
            Some(20..=63) => self.dtls += 1,
            Some(128..=191) => self.srtp += 1,
            _ => self.other += 1,
        }
    }
}

/// One call's statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct CallStats {
    /// From the session's start to SRTP flowing.
    pub setup: Option<Duration>,
    /// From the session's start to the first decoded audio frame.
    pub first_audio: Option<Duration>,
    pub rtt: Option<Duration>,
    /// Packets lost toward us (from sequence numbers), 0..1.
    pub loss_in: f64,
    /// Packets lost toward the far end (from its RTCP reports), 0..1.
    pub loss_out: f64,
    /// Interarrival jitter of incoming audio (RFC 3550), milliseconds.
    pub jitter_ms: f64,
    /// The Opus encoder's target now.
    pub bitrate_out: u32,
    /// Measured over the last interval, bits per second.
    pub bitrate_in: u32,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub playout: JitterStats,
    /// The jitter buffer's playout delay target.
    pub playout_delay: Duration,
    /// Share of played frames that had to be concealed (after FEC).
    pub concealed: f64,
    /// E-model MOS estimate (1–4.5).
    pub mos: f64,
    pub relay_payloads: RelayPayloads,
    pub video: VideoStats,
}

/// Video in this call so far.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct VideoStats {
    pub frames_sent: u64,
    pub frames_decoded: u64,
    /// Decoded frames that showed the test pattern.
    pub pattern_frames: u64,
    pub decode_errors: u64,
    pub bytes_in: u64,
    /// The last decoded picture.
    pub last: Option<video::Picture>,
}

/// One call's media.
pub struct MediaSession {
    rtc: Rtc,
    config: MediaConfig,
    start: Instant,
    local: SocketAddr,
    turn: Option<TurnClient>,
    gather_deadline: Option<Instant>,
    relayed: Option<SocketAddr>,
    reflexive: Option<SocketAddr>,
    /// Remote addresses the relay has been asked to let in.
    permitted: HashSet<SocketAddr>,
    /// Our candidates now in use (replaced on a network change).
    candidates: Vec<Candidate>,
    /// The far end's candidates from the last SDP (the relay must let
    /// them in again after a new allocation).
    remote_sdp: Option<String>,
    /// Last time media arrived, for stall detection.
    last_media_in: Option<Instant>,
    stalled: bool,
    /// ICE is checking (a restart): nothing to send on.
    ice_checking: bool,
    relay_payloads: RelayPayloads,
    pending_offer: Option<SdpPendingOffer>,
    audio_mid: Option<Mid>,
    video_mid: Option<Mid>,
    video: Option<(VideoEncoder, VideoDecoder)>,
    camera_on: bool,
    video_frames_sent: u64,
    video_time: u64,
    video_stats: VideoStats,
    last_pli: Option<Instant>,
    encoder: AudioEncoder,
    decoder: AudioDecoder,
    jitter: JitterBuffer,
    pcm: Vec<i16>,
    muted: bool,
    /// RTP time of the next frame we send (48 kHz).
    send_time: u64,
    out: VecDeque<Datagram>,
    events: VecDeque<MediaEvent>,
    rtc_timeout: Instant,
    connected_at: Option<Instant>,
    first_audio_at: Option<Instant>,
    closed: bool,
    // Statistics.
    rtt: Option<Duration>,
    loss_out: f64,
    /// The last receiver report's (highest sequence number, packets lost).
    remote_report: Option<(u64, u64)>,
    packets_sent: u64,
    received: u64,
    seq_range: Option<(u64, u64)>,
    jitter_est: f64,
    last_transit: Option<f64>,
    bytes_in: u64,
    bytes_in_mark: (Instant, u64),
    bitrate_in: u32,
    next_stats: Instant,
}

impl std::fmt::Debug for MediaSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MediaSession")
            .field("local", &self.local)
            .field("relayed", &self.relayed)
            .field("connected", &self.connected_at.is_some())
            .finish_non_exhaustive()
    }
}

impl MediaSession {
    /// A session on the app's UDP socket bound at `local`. With a TURN
    /// server it starts the allocation; [`MediaEvent::Gathered`] says
    /// when the offer or answer can be made.
    pub fn new(now: Instant, config: MediaConfig, local: SocketAddr) -> Result<Self, MediaError> {
        let mut rtc = RtcConfig::new()
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(config.video)
            // Every packet straight to our own jitter buffer.
            .set_reordering_size_audio(0)
            .set_stats_interval(Some(config.stats_interval))
            // Loss reports each second, so the encoder adapts within one.
            .set_rtcp_report_interval_audio(Duration::from_secs(1));
        rtc.set_initial_stun_rto(ICE_INITIAL_RTO);
        if config.sip_phone {
            rtc = rtc.set_crypto_provider(std::sync::Arc::new(dtls::provider()));
        }
        let rtc = rtc.build(now);
        let video = if config.video {
            Some((
                VideoEncoder::new(config.video_bitrate)?,
                VideoDecoder::new()?,
            ))
        } else {
            None
        };
        let mut s = MediaSession {
            rtc,
            start: now,
            local,
            turn: None,
            gather_deadline: None,
            relayed: None,
            reflexive: None,
            permitted: HashSet::new(),
            candidates: Vec::new(),
            remote_sdp: None,
            last_media_in: None,
            stalled: false,
            ice_checking: false,
            relay_payloads: RelayPayloads::default(),
            pending_offer: None,
            audio_mid: None,
            video_mid: None,
            video,
            camera_on: true,
            video_frames_sent: 0,
            video_time: 0,
            video_stats: VideoStats::default(),
            last_pli: None,
            encoder: AudioEncoder::new(config.audio)?,
            decoder: AudioDecoder::new()?,
            jitter: JitterBuffer::new(),
            pcm: Vec::with_capacity(FRAME_SAMPLES),
            muted: false,
            send_time: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
            rtc_timeout: now,
            connected_at: None,
            first_audio_at: None,
            closed: false,
            rtt: None,
            loss_out: 0.0,
            remote_report: None,
            packets_sent: 0,
            received: 0,
            seq_range: None,
            jitter_est: 0.0,
            last_transit: None,
            bytes_in: 0,
            bytes_in_mark: (now, 0),
            bitrate_in: 0,
            next_stats: now + config.stats_interval,
            config,
        };
        if !s.config.relay_only {
            let host = Candidate::host(local, Protocol::Udp)
                .map_err(|e| MediaError::Sdp(format!("host candidate {local}: {e}")))?;
            s.add_candidate(host);
        }
        match s.config.turn.clone() {
            Some(tc) => s.allocate_on(tc, now),
            None => s.gathered()?,
        }
        s.drain(now)?;
        Ok(s)
    }

    /// The SDP offer (audio, send and receive) for an outgoing call.
    pub fn create_offer(&mut self, now: Instant) -> Result<String, MediaError> {
        self.require_gathered("create_offer")?;
        let mut api = self.rtc.sdp_api();
        let mid = api.add_media(MediaKind::Audio, Direction::SendRecv, None, None, None);
        let video = self
            .config
            .video
            .then(|| api.add_media(MediaKind::Video, Direction::SendRecv, None, None, None));
        let (offer, pending) = api
            .apply()
            .ok_or(MediaError::State("create_offer (nothing to offer)"))?;
        self.audio_mid = Some(mid);
        self.video_mid = video;
        self.pending_offer = Some(pending);
        self.drain(now)?;
        Ok(self.ours(&offer.to_sdp_string()))
    }

    /// The far end's answer to our offer.
    pub fn accept_answer(&mut self, now: Instant, answer: &VerifiedSdp) -> Result<(), MediaError> {
        let pending = self
            .pending_offer
            .take()
            .ok_or(MediaError::State("accept_answer"))?;
        let offered: Vec<String> = [self.audio_mid, self.video_mid]
            .into_iter()
            .flatten()
            .map(|m| m.to_string())
            .collect();
        let sdp = sdp::bundled(answer.sdp(), &offered)?;
        tracing::debug!(answer = %sdp, "the far end's answer");
        let parsed =
            SdpAnswer::from_sdp_string(&sdp).map_err(|e| MediaError::Sdp(e.to_string()))?;
        self.rtc.sdp_api().accept_answer(pending, parsed)?;
        self.permit_candidates(&sdp, now);
        self.remote_sdp = Some(sdp);
        self.drain(now)
    }

    /// Our answer to the far end's offer.
    pub fn accept_offer(
        &mut self,
        now: Instant,
        offer: &VerifiedSdp,
    ) -> Result<String, MediaError> {
        self.require_gathered("accept_offer")?;
        let sdp = sdp::bundled(offer.sdp(), &[])?;
        tracing::debug!(offer = %sdp, "the far end's offer");
        let parsed = SdpOffer::from_sdp_string(&sdp).map_err(|e| MediaError::Sdp(e.to_string()))?;
        // str0m drops any offer of ours still waiting (a glare).
        self.pending_offer = None;
        let answer = self.rtc.sdp_api().accept_offer(parsed)?;
        // The relay must let the far end's candidates in (and out) before
        // str0m's first check goes through it.
        self.permit_candidates(&sdp, now);
        self.drain(now)?;
        let mid_of = |kind: MediaKind| {
            sdp.lines()
                .filter_map(|l| l.trim().strip_prefix("a=mid:"))
                .map(Mid::from)
                .find(|m| self.rtc.media(*m).is_some_and(|x| x.kind() == kind))
        };
        self.audio_mid = mid_of(MediaKind::Audio);
        self.video_mid = mid_of(MediaKind::Video).filter(|_| self.config.video);
        if self.audio_mid.is_none() {
            return Err(MediaError::NoAudio);
        }
        self.remote_sdp = Some(sdp);
        Ok(self.ours(&answer.to_sdp_string()))
    }

    /// The device moved to another network: the app's socket is now
    /// bound at `local`. The old candidates are dropped, new ones gathered
    /// (a new relay allocation too, as the old one belongs to the old
    /// address); at [`MediaEvent::Gathered`] make the ICE restart offer
    /// with [`MediaSession::create_restart_offer`]. DTLS and SRTP carry
    /// on: the call does not drop.
    pub fn network_changed(&mut self, now: Instant, local: SocketAddr) -> Result<(), MediaError> {
        for c in std::mem::take(&mut self.candidates) {
            self.rtc.direct_api().invalidate_candidate(&c);
        }
        self.drain(now)?;
        self.local = local;
        self.relayed = None;
        self.reflexive = None;
        self.permitted.clear();
        if !self.config.relay_only {
            let host = Candidate::host(local, Protocol::Udp)
                .map_err(|e| MediaError::Sdp(format!("host candidate {local}: {e}")))?;
            self.add_candidate(host);
        }
        match self.config.turn.clone() {
            Some(tc) => {
                self.config.seed = self.config.seed.wrapping_add(1);
                self.allocate_on(tc, now);
            }
            None => self.gathered()?,
        }
        self.drain(now)
    }

    /// Gathering is over (the offer, answer or restart offer can be made).
    pub fn is_gathered(&self) -> bool {
        self.gather_deadline.is_none()
    }

    /// The relay in use died: its candidate goes, and an allocation on
    /// the next relay of [`MediaConfig::spare_turn`] begins (the dead one
    /// goes to the back of the list, in case it comes back).
    fn move_relay(&mut self, now: Instant) {
        let Some(old) = self.config.turn.take() else {
            return;
        };
        let next = self.config.spare_turn.remove(0);
        self.events.push_back(MediaEvent::RelayMoved {
            from: old.server,
            to: next.server,
        });
        self.config.spare_turn.push(old);
        if let Some(relayed) = self.relayed.take() {
            let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.candidates)
                .into_iter()
                .partition(|c| c.addr() == relayed);
            self.candidates = kept;
            for c in gone {
                self.rtc.direct_api().invalidate_candidate(&c);
            }
        }
        self.permitted.clear();
        self.config.seed = self.config.seed.wrapping_add(1);
        self.config.turn = Some(next.clone());
        self.allocate_on(next, now);
    }

    /// A new TURN client for `tc` (with the current seed) asks for an
    /// allocation; gathering lasts until it answers or
    /// [`GATHER_TIMEOUT`].
    fn allocate_on(&mut self, tc: turn::Config, now: Instant) {
        let mut client = TurnClient::new(tc, self.config.seed);
        client.allocate(now);
        self.turn = Some(client);
        self.gather_deadline = Some(now + GATHER_TIMEOUT);
        self.drain_turn(now);
    }

    /// An offer that restarts ICE (new credentials, the current
    /// candidates), for a re-INVITE: after a network change, or when
    /// media stalls ([`MediaEvent::Stalled`]). The answer goes to
    /// [`MediaSession::accept_answer`].
    pub fn create_restart_offer(&mut self, now: Instant) -> Result<String, MediaError> {
        self.require_gathered("create_restart_offer")?;
        let mut api = self.rtc.sdp_api();
        api.ice_restart(true);
        let (offer, pending) = api
            .apply()
            .ok_or(MediaError::State("create_restart_offer"))?;
        self.pending_offer = Some(pending);
        self.drain(now)?;
        Ok(self.ours(&offer.to_sdp_string()))
    }

    /// Our SDP as sent: a real default destination (see
    /// [`sdp::with_default`]).
    fn ours(&self, sdp: &str) -> String {
        let default = self.relayed.or(self.reflexive).unwrap_or(self.local);
        sdp::with_default(sdp, default)
    }

    /// Our DTLS fingerprints, for the PASSporT the app signs.
    pub fn local_fingerprints(&mut self) -> Vec<Fingerprint> {
        let fp = self.rtc.direct_api().local_dtls_fingerprint().to_string();
        passport::sdp_fingerprints(&format!("a=fingerprint:{fp}"))
    }

    /// A datagram that arrived on the app's socket.
    pub fn handle_input(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), MediaError> {
        let via_turn = self
            .turn
            .as_ref()
            .is_some_and(|_| self.config.turn.as_ref().is_some_and(|c| c.server == from));
        if via_turn {
            if let Some(t) = self.turn.as_mut() {
                t.handle_input(data, now);
            }
            self.drain_turn(now);
        } else if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, data) {
            self.rtc.handle_input(Input::Receive(now, r))?;
        }
        self.drain(now)
    }

    /// Time passed; call at [`MediaSession::poll_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), MediaError> {
        if let Some(t) = self.turn.as_mut() {
            t.handle_timeout(now);
        }
        if self.gather_deadline.is_some_and(|d| now >= d) {
            self.events.push_back(MediaEvent::RelayFailed {
                code: 0,
                reason: "no answer from the TURN server".into(),
            });
            if self.connected_at.is_some() && !self.config.spare_turn.is_empty() {
                // Mid-call, moving off a dead relay onto another dead one:
                // try the next.
                self.move_relay(now);
            } else {
                self.gathered()?;
            }
        }
        self.drain_turn(now);
        if now >= self.rtc_timeout {
            self.rtc.handle_input(Input::Timeout(now))?;
        }
        // Once media has flowed: ICE may already call the path lost.
        if self.connected_at.is_some()
            && !self.stalled
            && self
                .last_media_in
                .is_some_and(|t| now.saturating_duration_since(t) >= STALL)
        {
            self.stalled = true;
            self.events.push_back(MediaEvent::Stalled);
            // The relay may be gone: make sure it still answers.
            if let Some(t) = self.turn.as_mut() {
                t.probe(now);
            }
        }
        if now >= self.next_stats {
            self.next_stats = now + self.config.stats_interval;
            let stats = self.stats(now);
            self.events.push_back(MediaEvent::Stats(Box::new(stats)));
        }
        self.drain(now)
    }

    pub fn poll_transmit(&mut self) -> Option<Datagram> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MediaEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Instant {
        let mut t = self.rtc_timeout.min(self.next_stats);
        if let Some(d) = self.gather_deadline {
            t = t.min(d);
        }
        if let Some(tt) = self.turn.as_ref().and_then(|c| c.poll_timeout()) {
            t = t.min(tt);
        }
        if let (Some(last), false, true) = (
            self.last_media_in,
            self.stalled,
            self.connected_at.is_some(),
        ) {
            t = t.min(last + STALL);
        }
        t
    }

    /// One 20 ms frame from the microphone (48 kHz mono).
    pub fn send_audio(&mut self, now: Instant, pcm: &[i16]) -> Result<(), MediaError> {
        let rtp_time = self.send_time;
        self.send_time += FRAME_SAMPLES as u64;
        if !self.path_up() {
            return Ok(());
        }
        let silence;
        let input = if self.muted {
            silence = [0i16; FRAME_SAMPLES];
            &silence[..]
        } else {
            pcm
        };
        let Some(packet) = self.encoder.encode(input)? else {
            return Ok(());
        };
        let mid = self.audio_mid.ok_or(MediaError::NoAudio)?;
        let writer = self.rtc.writer(mid).ok_or(MediaError::NoAudio)?;
        let pt = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::Opus)
            .map(|p| p.pt())
            .ok_or(MediaError::NoAudio)?;
        writer.write(
            pt,
            now,
            MediaTime::new(rtp_time, Frequency::FORTY_EIGHT_KHZ),
            packet,
        )?;
        self.packets_sent += 1;
        self.drain(now)
    }

    /// The next 20 ms for the speaker, and how it was made (`None`:
    /// nothing has arrived yet, silence).
    pub fn play_audio(&mut self, now: Instant) -> Result<(&[i16], Option<Decoded>), MediaError> {
        let how = match self.jitter.pop(now) {
            Playout::Silence => {
                self.pcm.clear();
                self.pcm.resize(FRAME_SAMPLES, 0);
                None
            }
            Playout::Frame(p) => Some(self.decoder.decode(Some(&p), false, &mut self.pcm)?),
            Playout::Fec(p) => Some(self.decoder.decode(Some(&p), true, &mut self.pcm)?),
            Playout::Conceal => Some(self.decoder.decode(None, false, &mut self.pcm)?),
        };
        if how == Some(Decoded::Packet) && self.first_audio_at.is_none() {
            self.first_audio_at = Some(now);
        }
        Ok((&self.pcm, how))
    }

    /// One camera frame (I420, [`video::WIDTH`]×[`video::HEIGHT`] at
    /// [`video::FPS`]); dropped while the camera is off or before media
    /// flows.
    pub fn send_video(
        &mut self,
        now: Instant,
        frame: &openh264::formats::YUVBuffer,
    ) -> Result<(), MediaError> {
        let rtp_time = self.video_time;
        self.video_time += u64::from(90_000 / video::FPS);
        let (Some(mid), true, true) = (self.video_mid, self.camera_on, self.path_up()) else {
            return Ok(());
        };
        let Some((enc, _)) = self.video.as_mut() else {
            return Ok(());
        };
        let bits = enc.encode(frame)?;
        if bits.is_empty() {
            return Ok(());
        }
        let writer = self.rtc.writer(mid).ok_or(MediaError::NoAudio)?;
        let Some(pt) = writer
            .payload_params()
            .find(|p| p.spec().codec == Codec::H264)
            .map(|p| p.pt())
        else {
            return Ok(());
        };
        writer.write(
            pt,
            now,
            MediaTime::new(rtp_time, Frequency::NINETY_KHZ),
            bits,
        )?;
        self.video_frames_sent += 1;
        self.drain(now)
    }

    /// Camera off stops sending video; on resumes with a key frame.
    pub fn set_camera(&mut self, on: bool) {
        if on && !self.camera_on {
            if let Some((enc, _)) = self.video.as_mut() {
                enc.request_keyframe();
            }
        }
        self.camera_on = on;
    }

    /// Mute sends silence (which DTX all but stops sending).
    pub fn set_muted(&mut self, muted: bool) {
        self.muted = muted;
    }

    pub fn is_connected(&self) -> bool {
        self.connected_at.is_some() && self.rtc.is_connected()
    }

    /// Media can go out now. During an ICE restart str0m has no pair to
    /// send on and would queue what it is given, then play the backlog
    /// out late, ahead of fresh frames: a real-time sender drops instead.
    fn path_up(&self) -> bool {
        self.rtc.is_connected() && !self.ice_checking
    }

    /// The relayed address, once allocated.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Ends the session (after BYE) and gives the relay allocation back;
    /// send what [`MediaSession::poll_transmit`] still has.
    pub fn close(&mut self, now: Instant) {
        self.rtc.disconnect();
        self.closed = true;
        if let Some(t) = self.turn.as_mut() {
            t.release(now);
        }
        self.drain_turn(now);
    }

    pub fn stats(&self, now: Instant) -> CallStats {
        let playout = self.jitter.stats();
        let loss_in = match self.seq_range {
            Some((lo, hi)) => {
                let expected = hi - lo + 1;
                1.0 - (self.received.min(expected) as f64 / expected as f64)
            }
            None => 0.0,
        };
        let concealed = if playout.played == 0 {
            0.0
        } else {
            playout.concealed.saturating_sub(playout.stretched) as f64 / playout.played as f64
        };
        let one_way_ms = self.rtt.map_or(0.0, |r| r.as_secs_f64() * 500.0)
            + self.jitter.target().as_secs_f64() * 1000.0;
        let _ = now;
        CallStats {
            setup: self.connected_at.map(|t| t - self.start),
            first_audio: self.first_audio_at.map(|t| t - self.start),
            rtt: self.rtt,
            loss_in,
            loss_out: self.loss_out,
            jitter_ms: self.jitter_est * 1000.0,
            bitrate_out: self.encoder.bitrate(),
            bitrate_in: self.bitrate_in,
            packets_sent: self.packets_sent,
            packets_received: self.received,
            playout,
            playout_delay: self.jitter.target(),
            concealed,
            mos: quality::mos(one_way_ms, concealed),
            relay_payloads: self.relay_payloads,
            video: VideoStats {
                frames_sent: self.video_frames_sent,
                ..self.video_stats
            },
        }
    }

    fn require_gathered(&self, what: &'static str) -> Result<(), MediaError> {
        if self.gather_deadline.is_some() {
            return Err(MediaError::State(what));
        }
        if self.config.relay_only && self.relayed.is_none() {
            return Err(MediaError::NoRelay);
        }
        Ok(())
    }

    fn add_candidate(&mut self, c: Candidate) {
        self.candidates.push(c.clone());
        self.rtc.add_local_candidate(c);
    }

    fn gathered(&mut self) -> Result<(), MediaError> {
        self.gather_deadline = None;
        self.events.push_back(MediaEvent::Gathered {
            host: (!self.config.relay_only).then_some(self.local),
            reflexive: self.reflexive,
            relayed: self.relayed,
        });
        Ok(())
    }

    /// Lets the far end's candidates in through the relay.
    fn permit_candidates(&mut self, sdp: &str, now: Instant) {
        let Some(turn) = self.turn.as_mut().filter(|t| t.relayed().is_some()) else {
            return;
        };
        for line in sdp.lines() {
            let Some(c) = line.trim().strip_prefix("a=") else {
                continue;
            };
            if let Ok(c) = Candidate::from_sdp_string(c) {
                if self.permitted.insert(c.addr()) {
                    turn.bind_channel(c.addr(), now);
                }
            }
        }
        self.drain_turn(now);
    }

    fn drain_turn(&mut self, now: Instant) {
        let Some(turn) = self.turn.as_mut() else {
            return;
        };
        let server = turn_server(&self.config);
        while let Some(data) = turn.poll_transmit() {
            if let Some(to) = server {
                self.out.push_back(Datagram { to, data });
            }
        }
        let mut events = Vec::new();
        while let Some(ev) = turn.poll_event() {
            events.push(ev);
        }
        for ev in events {
            match ev {
                turn::Event::Allocated { relayed, mapped } => {
                    self.relayed = Some(relayed);
                    if let Ok(c) = Candidate::relayed(relayed, self.local, Protocol::Udp) {
                        self.add_candidate(c);
                    }
                    if let Some(m) = mapped.filter(|m| *m != self.local) {
                        if !self.config.relay_only {
                            if let Ok(c) = Candidate::server_reflexive(m, self.local, Protocol::Udp)
                            {
                                self.add_candidate(c);
                                self.reflexive = Some(m);
                            }
                        }
                    }
                    if self.gather_deadline.is_some() {
                        let _ = self.gathered();
                    }
                    if let Some(sdp) = self.remote_sdp.clone() {
                        self.permit_candidates(&sdp, now);
                    }
                }
                turn::Event::Failed { code, reason } => {
                    self.events
                        .push_back(MediaEvent::RelayFailed { code, reason });
                    if self.gather_deadline.is_some() {
                        let _ = self.gathered();
                    } else if !self.config.spare_turn.is_empty() {
                        self.move_relay(now);
                        return;
                    }
                }
                turn::Event::Data { peer, data } => {
                    if let Some(relayed) = self.relayed {
                        if let Ok(r) = Receive::new(Protocol::Udp, peer, relayed, &data) {
                            let _ = self.rtc.handle_input(Input::Receive(now, r));
                            // Drained by the caller.
                        }
                    }
                }
                turn::Event::PermissionCreated { .. } | turn::Event::ChannelBound { .. } => {}
            }
        }
    }

    /// Drains str0m to its next timeout (its one rule: every mutation is
    /// followed by a full drain).
    fn drain(&mut self, now: Instant) -> Result<(), MediaError> {
        loop {
            match self.rtc.poll_output()? {
                Output::Timeout(t) => {
                    self.rtc_timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => {
                    let data: Vec<u8> = t.contents.to_vec();
                    if Some(t.source) == self.relayed {
                        self.relay_payloads.count(&data);
                        let server = turn_server(&self.config);
                        if let (Some(turn), Some(server)) = (self.turn.as_mut(), server) {
                            // Requests the client queued (a ChannelBind for
                            // this peer) go first: the relay drops data to
                            // a peer it has no permission for.
                            while let Some(req) = turn.poll_transmit() {
                                self.out.push_back(Datagram {
                                    to: server,
                                    data: req,
                                });
                            }
                            let wrapped = turn.wrap(t.destination, &data);
                            self.out.push_back(Datagram {
                                to: server,
                                data: wrapped,
                            });
                        }
                    } else if t.source == self.local {
                        self.out.push_back(Datagram {
                            to: t.destination,
                            data,
                        });
                    }
                    // Anything else comes from a candidate given up (a
                    // relay that died, a network left): sending it from
                    // our own socket would show the far end our address.
                }
                Output::Event(e) => self.on_event(now, e)?,
            }
        }
    }

    fn on_event(&mut self, now: Instant, e: Event) -> Result<(), MediaError> {
        match e {
            Event::Connected => {
                if self.connected_at.is_none() {
                    self.connected_at = Some(now);
                }
                self.events.push_back(MediaEvent::Connected);
            }
            Event::MediaAdded(m) if m.kind == MediaKind::Audio => {
                self.audio_mid.get_or_insert(m.mid);
            }
            Event::IceConnectionStateChange(s) if s != IceConnectionState::Disconnected => {
                self.ice_checking = matches!(s, IceConnectionState::Checking);
            }
            Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                self.ice_checking = false;
                self.events.push_back(MediaEvent::Disconnected);
            }
            Event::MediaData(d) if Some(d.mid) == self.video_mid && self.video_mid.is_some() => {
                self.last_media_in = Some(now);
                self.video_stats.bytes_in += d.data.len() as u64;
                let mut need_key = false;
                if let Some((_, dec)) = self.video.as_mut() {
                    match dec.decode(&d.data) {
                        Ok(Some(p)) => {
                            self.video_stats.frames_decoded += 1;
                            if video::is_pattern(&p.quadrants) {
                                self.video_stats.pattern_frames += 1;
                            }
                            self.video_stats.last = Some(p);
                        }
                        Ok(None) => need_key = true,
                        Err(_) => {
                            self.video_stats.decode_errors += 1;
                            need_key = true;
                        }
                    }
                }
                // A frame we cannot decode (its key frame or parameter
                // sets were lost, e.g. sent before our SRTP was ready):
                // ask for a key frame (PLI), at most every 500 ms.
                if need_key || !d.contiguous {
                    let due = self
                        .last_pli
                        .is_none_or(|t| now.saturating_duration_since(t) >= PLI_INTERVAL);
                    if due {
                        self.last_pli = Some(now);
                        if let Some(mut w) = self.rtc.writer(d.mid) {
                            let _ = w.request_keyframe(None, KeyframeRequestKind::Pli);
                        }
                    }
                }
            }
            Event::KeyframeRequest(_) => {
                if let Some((enc, _)) = self.video.as_mut() {
                    enc.request_keyframe();
                }
            }
            Event::MediaData(d) => {
                self.last_media_in = Some(now);
                self.stalled = false;
                let ts = d.time.numer();
                let seq = *d.seq_range.start();
                self.received += 1;
                self.seq_range = Some(match self.seq_range {
                    None => (*seq, *seq),
                    Some((lo, hi)) => (lo.min(*seq), hi.max(*seq)),
                });
                // RFC 3550 interarrival jitter, in seconds.
                let transit = d
                    .network_time
                    .saturating_duration_since(self.start)
                    .as_secs_f64()
                    - ts as f64 / audio::SAMPLE_RATE as f64;
                if let Some(last) = self.last_transit {
                    self.jitter_est += ((transit - last).abs() - self.jitter_est) / 16.0;
                }
                self.last_transit = Some(transit);
                self.bytes_in += d.data.len() as u64;
                self.jitter
                    .push(ts as u32, *seq, d.data.to_vec(), d.network_time);
            }
            Event::MediaEgressStats(s) => {
                if let Some(rtt) = s.rtt {
                    self.rtt = Some(rtt);
                }
                // Loss over the interval from the far end's cumulative
                // receiver-report counters.
                if let Some(r) = &s.remote {
                    let (seq, lost) = (*r.maximum_sequence_number, r.packets_lost);
                    if let Some((seq0, lost0)) = self.remote_report {
                        if seq > seq0 {
                            let loss = lost.saturating_sub(lost0) as f64 / (seq - seq0) as f64;
                            self.loss_out = loss.clamp(0.0, 1.0);
                            self.encoder.set_loss(self.loss_out)?;
                        }
                    }
                    self.remote_report = Some((seq, lost));
                }
            }
            Event::MediaIngressStats(s) => {
                if let Some(rtt) = s.rtt {
                    self.rtt = Some(rtt);
                }
                let (t, b) = self.bytes_in_mark;
                let dt = now.saturating_duration_since(t).as_secs_f64();
                if dt > 0.0 {
                    self.bitrate_in = ((self.bytes_in - b) as f64 * 8.0 / dt) as u32;
                }
                self.bytes_in_mark = (now, self.bytes_in);
            }
            Event::PeerStats(s) => {
                if let Some(rtt) = s.rtt {
                    self.rtt = Some(rtt);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn turn_server(config: &MediaConfig) -> Option<SocketAddr> {
    config.turn.as_ref().map(|c| c.server)
}

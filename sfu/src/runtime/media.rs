//! The media loop: one UDP socket, one str0m `Rtc` per participant (ICE
//! lite, DTLS-SRTP hop by hop, RTP mode), and one [`Forwarder`] per room.
//! Packets are read off the socket, handed to the participant they belong
//! to, and what its publisher sends goes through the room's forwarder to
//! the subscribers' slots. Everything runs on one task: a room's state is
//! touched by nothing else, and a packet is forwarded without a hop
//! between threads.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use str0m::bwe::BweKind;
use str0m::change::SdpOffer;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpPacket, RtpWrite, SeqNo, Ssrc};
use str0m::{Candidate, Event, IceConnectionState, Input, Output, Rtc, RtcConfig};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use wire::meter::Meter;

use super::{Command, JoinError, Joined, Metrics};
use crate::core::forwarder::{
    ExtensionIds, Forward, Forwarder, Incoming, KeyframeRequest, Kind, Publication, Slots,
};
use crate::core::room::{Config as RoomConfig, Layer, ParticipantId, Room};

/// Where a subscriber's bandwidth estimate starts; each plan asks the
/// estimator to probe up from there for what the plan sends.
const START_ESTIMATE_KBPS: u64 = 600;

/// Datagrams read at most in one go after a wake-up.
const BATCH: usize = 256;

/// How often every room's plan is made anew (speakers, estimates).
const REPLAN_EVERY: Duration = Duration::from_millis(250);

/// The header extension id both sides use for frame marking (str0m's
/// standard map leaves 5 free).
pub const FRAME_MARKING_ID: u8 = 5;

/// Bitrates assumed for simulcast layers by their rid, lowest first.
fn layer_bitrate(rid: Option<&str>) -> u32 {
    match rid {
        Some("q") => 150_000,
        Some("h") => 500_000,
        _ => 1_500_000,
    }
}

/// One participant's end: its Rtc and what its m-lines are for.
struct Participant {
    rtc: Rtc,
    room: String,
    id: ParticipantId,
    /// The m-lines it publishes on (we receive), by mid.
    publishes: HashMap<Mid, Kind>,
    /// Its receive slots (we send), per kind, in m-line order.
    slots: HashMap<Kind, Vec<(Mid, Pt)>>,
    /// Per (kind, slot): the extended sequence number last written.
    seqs: HashMap<(Kind, usize), u64>,
    timeout: Instant,
    /// The latest instant its Rtc was given: a timeout run early is
    /// given at its own instant, and nothing after it may be earlier.
    clock: Instant,
    /// Where its packets come from, once ICE chose.
    remote: Option<SocketAddr>,
    resource: String,
    /// When it joined, until its media connects.
    connecting_since: Option<Instant>,
}

impl Participant {
    /// `now`, or the later instant its Rtc was already given.
    fn at(&mut self, now: Instant) -> Instant {
        self.clock = self.clock.max(now);
        self.clock
    }
}

struct RoomState {
    forwarder: Forwarder,
    members: HashMap<ParticipantId, u64>,
    next_id: u16,
    /// Payload bytes forwarded, for its bitrate.
    sent: Meter,
}

/// At most this many timeouts already due are run in one drain of a
/// participant (each lets a paced packet out); the rest wait for the
/// loop's next turn.
const DUE_ROUNDS: usize = 256;
/// Timeouts this close are run at once, at their own instant. str0m's
/// pacer asks for its next turn a fraction of a millisecond ahead (about
/// two drains in three at 8 in a room), and tokio's timers fire on
/// millisecond ticks: waiting for one held each subscriber's next packet
/// up to a millisecond and a loop turn, and that was most of the SFU's
/// added latency.
const SOON: Duration = Duration::from_millis(1);

pub(super) struct Loop {
    socket: Arc<UdpSocket>,
    /// The address in our ICE candidate.
    candidate: SocketAddr,
    room_config: RoomConfig,
    max_participants: usize,
    max_total: usize,
    connect_within: Duration,
    participants: HashMap<u64, Participant>,
    /// Every participant's next timeout, soonest first: the loop wakes for
    /// the first and runs only those due, not every participant per packet.
    timers: BTreeSet<(Instant, u64)>,
    by_remote: HashMap<SocketAddr, u64>,
    rooms: HashMap<String, RoomState>,
    /// Participants by their resource name.
    resources: HashMap<String, u64>,
    /// Packets publishers sent, to forward (drained Rtcs put them here).
    received: VecDeque<(u64, RtpPacket)>,
    /// Subscribers written to since their Rtc was last drained: drained
    /// once per batch of datagrams, not once per packet (a drain walks
    /// every stream of the subscriber).
    written: Vec<u64>,
    next_key: u64,
    metrics: Arc<Metrics>,
    /// The rooms and participants this loop last counted into the
    /// metrics' gauges (which every loop adds to).
    counted: (u64, u64),
}

impl Loop {
    pub(super) fn new(
        socket: Arc<UdpSocket>,
        candidate: SocketAddr,
        room_config: RoomConfig,
        (max_participants, max_total, connect_within): (usize, usize, Duration),
        metrics: Arc<Metrics>,
    ) -> Loop {
        Loop {
            socket,
            candidate,
            room_config,
            max_participants,
            max_total,
            connect_within,
            participants: HashMap::new(),
            timers: BTreeSet::new(),
            by_remote: HashMap::new(),
            rooms: HashMap::new(),
            resources: HashMap::new(),
            received: VecDeque::new(),
            written: Vec::new(),
            next_key: 1,
            metrics,
            counted: (0, 0),
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; 2000];
        let mut replan = tokio::time::Instant::now() + REPLAN_EVERY;
        loop {
            let next = self
                .timers
                .first()
                .map(|(t, _)| tokio::time::Instant::from_std(*t))
                .unwrap_or(replan)
                .min(replan);
            tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => {
                        self.datagram(from, &buf[..n]);
                        // Whatever else came in the meantime, as one
                        // batch: one wake-up, one drain per subscriber.
                        for _ in 0..BATCH {
                            let Ok((n, from)) = self.socket.try_recv_from(&mut buf) else {
                                break;
                            };
                            self.datagram(from, &buf[..n]);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "sfu socket read"),
                },
                c = commands.recv() => match c {
                    Some(c) => self.command(c),
                    None => return,
                },
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            let due: Vec<u64> = self
                .timers
                .range(..=(now, u64::MAX))
                .map(|(_, k)| *k)
                .collect();
            for key in due {
                if let Some(p) = self.participants.get_mut(&key) {
                    let at = p.at(now);
                    let _ = p.rtc.handle_input(Input::Timeout(at));
                }
                self.drain(key);
            }
            if tokio::time::Instant::now() >= replan {
                replan = tokio::time::Instant::now() + REPLAN_EVERY;
                self.replan_all(now);
                self.room_bitrates(now);
                self.drop_unconnected(now);
            }
            self.pump(now);
        }
    }

    /// Forwards what publishers sent, then drains the subscribers written
    /// to, until nothing is left (a drain may bring more packets).
    fn pump(&mut self, now: Instant) {
        loop {
            while let Some((key, pkt)) = self.received.pop_front() {
                self.forward(key, pkt, now);
            }
            if self.written.is_empty() {
                return;
            }
            let mut written = std::mem::take(&mut self.written);
            written.sort_unstable();
            written.dedup();
            for key in written.drain(..) {
                self.drain(key);
            }
            // Keep the allocation.
            self.written = written;
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Join { room, offer, reply } => {
                let r = self.join(&room, &offer);
                if let Ok((key, _)) = &r {
                    let key = *key;
                    let _ = reply.send(r.map(|(_, j)| j));
                    self.drain(key);
                } else {
                    let _ = reply.send(r.map(|(_, j)| j));
                }
            }
            Command::Leave {
                room,
                resource,
                reply,
            } => {
                let key = self
                    .resources
                    .get(&resource)
                    .copied()
                    .filter(|k| self.participants.get(k).is_some_and(|p| p.room == room));
                if let Some(key) = key {
                    self.leave(key);
                }
                let _ = reply.send(key.is_some());
            }
        }
    }

    /// A participant joins `room` with `offer`: its answer.
    fn join(&mut self, room: &str, offer: &str) -> Result<(u64, Joined), JoinError> {
        let offer = SdpOffer::from_sdp_string(offer).map_err(|e| JoinError::Sdp(e.to_string()))?;
        let members = self.rooms.get(room).map_or(0, |r| r.members.len());
        if members >= self.max_participants {
            return Err(JoinError::Full(self.max_participants));
        }
        // Everyone in every loop's rooms.
        let total = self.metrics.participants.load(Ordering::Relaxed) as usize;
        if total >= self.max_total {
            return Err(JoinError::Busy(self.max_total));
        }
        let now = Instant::now();
        let mut rtc = RtcConfig::new()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(true)
            .set_extension(FRAME_MARKING_ID, str0m::rtp::Extension::FrameMarking)
            .enable_bwe(Some(str0m::bwe::Bitrate::kbps(START_ESTIMATE_KBPS)))
            .build(now);
        let host = Candidate::host(self.candidate, Protocol::Udp)
            .map_err(|e| JoinError::Sdp(format!("candidate {}: {e}", self.candidate)))?;
        rtc.add_local_candidate(host);
        let answer = rtc
            .sdp_api()
            .accept_offer(offer)
            .map_err(|e| JoinError::Sdp(e.to_string()))?;
        let answer = answer.to_sdp_string();
        let (publishes, slots) = lines(&rtc, &answer);
        let counts = Slots {
            audio: slots.get(&Kind::Audio).map_or(0, Vec::len),
            video: slots.get(&Kind::Video).map_or(0, Vec::len),
        };
        let config = self.room_config.clone();
        let state = self
            .rooms
            .entry(room.to_string())
            .or_insert_with(|| RoomState {
                forwarder: Forwarder::new(
                    Room::new(config),
                    ExtensionIds {
                        audio_level: 1,
                        frame_marking: FRAME_MARKING_ID,
                    },
                ),
                members: HashMap::new(),
                next_id: 0,
                sent: Meter::new(Instant::now()),
            });
        let id = ParticipantId(state.next_id);
        state.next_id = state.next_id.wrapping_add(1);
        state
            .forwarder
            .join(id, Publication::default(), counts, now);
        let key = self.next_key;
        self.next_key += 1;
        state.members.insert(id, key);
        let resource = format!("{}-{}", id.0, super::random_hex());
        self.resources.insert(resource.clone(), key);
        self.timers.insert((now, key));
        self.participants.insert(
            key,
            Participant {
                rtc,
                room: room.to_string(),
                id,
                publishes,
                slots,
                seqs: HashMap::new(),
                timeout: now,
                clock: now,
                remote: None,
                resource: resource.clone(),
                connecting_since: Some(now),
            },
        );
        self.metrics.joins.fetch_add(1, Ordering::Relaxed);
        self.gauges();
        tracing::info!(room, participant = id.0, ?counts, "joined");
        Ok((
            key,
            Joined {
                participant: id.0,
                resource,
                answer,
            },
        ))
    }

    /// Participants that joined but never connected go.
    fn drop_unconnected(&mut self, now: Instant) {
        let stale: Vec<u64> = self
            .participants
            .iter()
            .filter(|(_, p)| {
                p.connecting_since
                    .is_some_and(|t| now.saturating_duration_since(t) > self.connect_within)
            })
            .map(|(k, _)| *k)
            .collect();
        for key in stale {
            tracing::info!("a participant never connected; dropped");
            self.leave(key);
        }
    }

    fn leave(&mut self, key: u64) {
        let Some(mut p) = self.participants.remove(&key) else {
            return;
        };
        self.timers.remove(&(p.timeout, key));
        p.rtc.disconnect();
        self.resources.remove(&p.resource);
        if let Some(r) = p.remote {
            self.by_remote.remove(&r);
        }
        let ended = match self.rooms.get_mut(&p.room) {
            Some(room) => {
                room.members.remove(&p.id);
                room.forwarder.leave(p.id)
            }
            None => false,
        };
        if ended
            || self
                .rooms
                .get(&p.room)
                .is_some_and(|r| r.members.is_empty())
        {
            self.rooms.remove(&p.room);
            self.metrics.forget_room(&p.room);
            tracing::info!(room = p.room, "room ended");
        }
        tracing::info!(room = p.room, participant = p.id.0, "left");
        self.gauges();
    }

    /// Adds what changed in this loop's rooms and participants to the
    /// gauges, which count every loop's.
    fn gauges(&mut self) {
        let now = (self.rooms.len() as u64, self.participants.len() as u64);
        let add = |g: &AtomicU64, then: u64, now: u64| {
            if now >= then {
                g.fetch_add(now - then, Ordering::Relaxed);
            } else {
                g.fetch_sub(then - now, Ordering::Relaxed);
            }
        };
        add(&self.metrics.rooms, self.counted.0, now.0);
        add(&self.metrics.participants, self.counted.1, now.1);
        self.counted = now;
    }

    fn datagram(&mut self, from: SocketAddr, data: &[u8]) {
        let now = Instant::now();
        let Ok(r) = Receive::new(Protocol::Udp, from, self.candidate, data) else {
            return;
        };
        let input = Input::Receive(now, r);
        let key = match self.by_remote.get(&from) {
            Some(k) => Some(*k),
            // A STUN check from a new address: whoever's ICE credentials
            // it carries.
            None => self
                .participants
                .iter()
                .find(|(_, p)| p.rtc.accepts(&input))
                .map(|(k, _)| *k),
        };
        let Some(key) = key else {
            return;
        };
        let Some(p) = self.participants.get_mut(&key) else {
            return;
        };
        if p.remote != Some(from) && p.rtc.accepts(&input) {
            if let Some(old) = p.remote.replace(from) {
                self.by_remote.remove(&old);
            }
            self.by_remote.insert(from, key);
        }
        let at = p.at(now);
        let input = match at == now {
            true => input,
            false => match Receive::new(Protocol::Udp, from, self.candidate, data) {
                Ok(r) => Input::Receive(at, r),
                Err(_) => return,
            },
        };
        if p.rtc.handle_input(input).is_err() {
            return;
        }
        self.drain(key);
    }

    /// Runs `key`'s Rtc to its next timeout: sends what it sends, and
    /// forwards the RTP it received.
    fn drain(&mut self, key: u64) {
        let mut asks = Vec::new();
        let mut gone = false;
        {
            let Some(p) = self.participants.get_mut(&key) else {
                return;
            };
            let now = Instant::now();
            let mut rounds = 0;
            loop {
                match p.rtc.poll_output() {
                    // Due already, or within [`SOON`]: str0m's pacer lets
                    // one packet out per timeout, so a subscriber's queued
                    // packets go now, not one per turn of the loop.
                    Ok(Output::Timeout(t)) if t <= now + SOON && rounds < DUE_ROUNDS => {
                        rounds += 1;
                        let at = p.at(t.max(now));
                        if p.rtc.handle_input(Input::Timeout(at)).is_err() {
                            gone = true;
                            break;
                        }
                    }
                    Ok(Output::Timeout(t)) => {
                        if t != p.timeout {
                            self.timers.remove(&(p.timeout, key));
                            self.timers.insert((t, key));
                            p.timeout = t;
                        }
                        break;
                    }
                    Ok(Output::Transmit(t)) => {
                        let _ = self.socket.try_send_to(&t.contents, t.destination);
                    }
                    Ok(Output::Event(e)) => match e {
                        Event::RtpPacket(pkt) => self.received.push_back((key, pkt)),
                        Event::KeyframeRequest(req) => asks.push(req.mid),
                        Event::EgressBitrateEstimate(BweKind::Twcc { estimate: b, .. }) => {
                            let (room, id) = (p.room.clone(), p.id);
                            if let Some(r) = self.rooms.get_mut(&room) {
                                r.forwarder
                                    .bandwidth(id, b.as_u64().min(u64::from(u32::MAX)) as u32);
                            }
                        }
                        Event::Connected => p.connecting_since = None,
                        Event::IceConnectionStateChange(IceConnectionState::Disconnected) => {
                            gone = true;
                        }
                        _ => {}
                    },
                    Err(e) => {
                        tracing::debug!(error = %e, "participant's connection failed");
                        gone = true;
                        break;
                    }
                }
            }
        }
        for mid in asks {
            self.subscriber_wants_keyframe(key, mid);
        }
        if gone {
            self.leave(key);
        }
    }

    /// A subscriber lost the picture in a video slot: a key frame from
    /// whoever the slot carries.
    fn subscriber_wants_keyframe(&mut self, key: u64, mid: Mid) {
        let Some(p) = self.participants.get(&key) else {
            return;
        };
        let Some(slot) = p
            .slots
            .get(&Kind::Video)
            .and_then(|s| s.iter().position(|(m, _)| *m == mid))
        else {
            return;
        };
        let (room, id) = (p.room.clone(), p.id);
        let ask = self
            .rooms
            .get(&room)
            .and_then(|r| r.forwarder.keyframe_for(id, slot));
        if let Some(ask) = ask {
            self.ask_keyframe(&room, ask);
        }
    }

    fn ask_keyframe(&mut self, room: &str, ask: KeyframeRequest) {
        let Some(key) = self
            .rooms
            .get(room)
            .and_then(|r| r.members.get(&ask.publisher).copied())
        else {
            return;
        };
        if let Some(p) = self.participants.get_mut(&key) {
            if let Some(s) = p.rtc.direct_api().stream_rx(&Ssrc::from(ask.ssrc)) {
                s.request_keyframe(KeyframeRequestKind::Pli);
            }
        }
    }

    /// One packet a publisher sent: learnt into its publication if new,
    /// then written into every subscriber slot the forwarder names.
    fn forward(&mut self, key: u64, pkt: RtpPacket, now: Instant) {
        let Some(p) = self.participants.get_mut(&key) else {
            return;
        };
        let ssrc: u32 = *pkt.header.ssrc;
        let (room, from) = (p.room.clone(), p.id);
        let Some(state) = self.rooms.get_mut(&room) else {
            return;
        };
        let known = state
            .forwarder
            .publication(from)
            .is_some_and(|pb| pb.audio == Some(ssrc) || pb.video.iter().any(|(_, s)| *s == ssrc));
        if !known {
            // Which of its m-lines the stream is on.
            let midrid = p
                .rtc
                .direct_api()
                .stream_rx(&pkt.header.ssrc)
                .map(|s| (s.mid(), s.rid()));
            let Some((mid, rid)) = midrid else {
                return;
            };
            let mut publication = state
                .forwarder
                .publication(from)
                .cloned()
                .unwrap_or_default();
            match p.publishes.get(&mid) {
                Some(Kind::Audio) => publication.audio = Some(ssrc),
                Some(Kind::Video) => {
                    let rid = rid.map(|r| r.to_string());
                    publication
                        .video
                        .retain(|(l, _)| Some(&l.rid) != rid.as_ref());
                    publication.video.push((
                        Layer {
                            rid: rid.clone().unwrap_or_else(|| "f".into()),
                            bitrate: layer_bitrate(rid.as_deref()),
                        },
                        ssrc,
                    ));
                    publication.video.sort_by_key(|(l, _)| l.bitrate);
                }
                None => return,
            }
            state.forwarder.publish(from, publication);
            let asks = state.forwarder.replan(now);
            for a in asks {
                self.ask_keyframe(&room, a);
            }
        }
        let Some(state) = self.rooms.get_mut(&room) else {
            return;
        };
        let ext = &pkt.header.ext_vals;
        let incoming = Incoming {
            ssrc,
            seq: pkt.header.sequence_number,
            timestamp: pkt.header.timestamp,
            audio_level: ext.audio_level.map(|l| {
                (
                    ext.voice_activity.unwrap_or(false),
                    l.unsigned_abs().min(127),
                )
            }),
            keyframe_start: ext
                .frame_mark
                .is_some_and(|m| (m >> 24) as u8 & 0xa0 == 0xa0),
            // RTP payload bytes: what the bandwidth estimator counts too
            // (the plans are held against its estimates).
            size: pkt.payload.len(),
        };
        let forwards: Vec<(u64, Forward)> = state
            .forwarder
            .incoming(from, &incoming, now)
            .into_iter()
            .filter_map(|f| Some((*state.members.get(&f.to)?, f)))
            .collect();
        let bytes = pkt.payload.len() as u64;
        let mut sent = 0u64;
        for (to, f) in forwards {
            if self.write(to, &f, &pkt) {
                sent += bytes;
                let (packets, total) = match f.kind {
                    Kind::Audio => (&self.metrics.audio_packets, &self.metrics.audio_bytes),
                    Kind::Video => (&self.metrics.video_packets, &self.metrics.video_bytes),
                };
                let n = packets.fetch_add(1, Ordering::Relaxed);
                total.fetch_add(bytes, Ordering::Relaxed);
                self.metrics.sample(f.kind == Kind::Audio, n, &pkt.payload);
                self.written.push(to);
            }
        }
        if let Some(state) = self.rooms.get_mut(&room) {
            state.sent.add(sent, now);
        }
    }

    /// Each room's forwarded bitrate over the last second or more, for
    /// `/metrics`.
    fn room_bitrates(&mut self, now: Instant) {
        for (name, r) in self.rooms.iter_mut() {
            if let Some(bps) = r.sent.take(now) {
                self.metrics.set_room_bitrate(name, bps);
            }
        }
    }

    /// Writes `pkt` into subscriber `to`'s slot as `f` says; whether it
    /// went.
    fn write(&mut self, to: u64, f: &Forward, pkt: &RtpPacket) -> bool {
        let Some(sub) = self.participants.get_mut(&to) else {
            return false;
        };
        let Some(&(mid, pt)) = sub.slots.get(&f.kind).and_then(|s| s.get(f.slot)) else {
            return false;
        };
        let last = sub.seqs.get(&(f.kind, f.slot)).copied();
        let seq = extend(last, f.header.seq);
        match last {
            Some(l) if seq <= l => {}
            _ => {
                sub.seqs.insert((f.kind, f.slot), seq);
            }
        }
        // In RTP mode str0m writes only the extensions given: the mid
        // tells the subscriber's stack which slot a new SSRC is for (its
        // slots share one payload type).
        let ext = ExtensionValues {
            audio_level: pkt.header.ext_vals.audio_level,
            voice_activity: pkt.header.ext_vals.voice_activity,
            frame_mark: pkt.header.ext_vals.frame_mark,
            mid: Some(mid),
            ..Default::default()
        };
        let mut api = sub.rtc.direct_api();
        let Some(tx) = api.stream_tx_by_mid(mid, None) else {
            return false;
        };
        tx.write_rtp(
            RtpWrite::new(
                pt,
                SeqNo::from(seq),
                f.header.timestamp,
                pkt.timestamp,
                pkt.payload.clone(),
            )
            .marker(pkt.header.marker)
            .ext_vals(ext)
            .nackable(f.kind == Kind::Video),
        );
        true
    }

    /// Tells each subscriber's bandwidth estimator what its plan sends
    /// (to hold, with padding if need be) and what the best layers would
    /// (to probe for). Without this the estimate stays near where it
    /// started and the pacer, which sends at most 1.1 times the estimate,
    /// queues whatever is beyond it.
    fn steer_estimates(&mut self, room: &str) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let targets: Vec<(u64, u32, u32)> = r
            .forwarder
            .bitrates()
            .filter_map(|(id, now, wanted)| Some((*r.members.get(&id)?, now, wanted)))
            .collect();
        for (key, bitrate, wanted) in targets {
            if let Some(p) = self.participants.get_mut(&key) {
                let (min, want) = (u64::from(bitrate), u64::from(wanted.max(bitrate)));
                p.rtc.bwe().set_bitrate(
                    str0m::bwe::Bitrate::bps(min),
                    str0m::bwe::Bitrate::bps(want),
                );
                // Its timers may have moved.
                self.drain(key);
            }
        }
    }

    fn replan_all(&mut self, now: Instant) {
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            let asks = match self.rooms.get_mut(&room) {
                Some(r) => r.forwarder.replan(now),
                None => continue,
            };
            self.steer_estimates(&room);
            if !asks.is_empty() {
                self.metrics
                    .layer_switches
                    .fetch_add(asks.len() as u64, Ordering::Relaxed);
            }
            for a in asks {
                self.ask_keyframe(&room, a);
                if let Some(key) = self
                    .rooms
                    .get(&room)
                    .and_then(|r| r.members.get(&a.publisher).copied())
                {
                    self.drain(key);
                }
            }
        }
    }
}

/// The extended sequence number nearest `last` whose low 16 bits are
/// `seq` (RFC 3711's index estimate); a first packet starts in roll-over
/// 0.
fn extend(last: Option<u64>, seq: u16) -> u64 {
    let Some(last) = last else {
        return u64::from(seq);
    };
    let base = last & !0xffff;
    let candidates = [base.wrapping_sub(0x1_0000), base, base + 0x1_0000];
    candidates
        .iter()
        .map(|b| b | u64::from(seq))
        .filter(|c| *c <= last + 0x8000)
        .min_by_key(|c| c.abs_diff(last))
        .unwrap_or(u64::from(seq))
}

/// What the answer's m-lines are for: those the participant publishes on
/// (we receive) and its receive slots (we send, with the payload type of
/// the codec), in m-line order.
#[allow(clippy::type_complexity)]
fn lines(rtc: &Rtc, answer: &str) -> (HashMap<Mid, Kind>, HashMap<Kind, Vec<(Mid, Pt)>>) {
    let mut publishes = HashMap::new();
    let mut slots: HashMap<Kind, Vec<(Mid, Pt)>> = HashMap::new();
    let mids: Vec<Mid> = answer
        .lines()
        .filter_map(|l| l.strip_prefix("a=mid:"))
        .map(|m| Mid::from(m.trim()))
        .collect();
    for mid in mids {
        let Some(media) = rtc.media(mid) else {
            continue;
        };
        let kind = match media.kind() {
            MediaKind::Audio => Kind::Audio,
            MediaKind::Video => Kind::Video,
        };
        match media.direction() {
            Direction::RecvOnly => {
                publishes.insert(mid, kind);
            }
            Direction::SendOnly => {
                if let Some(pt) = media.remote_pts().first() {
                    slots.entry(kind).or_default().push((mid, *pt));
                }
            }
            _ => {}
        }
    }
    (publishes, slots)
}

pub(super) type JoinReply = oneshot::Sender<Result<Joined, JoinError>>;

#[cfg(test)]
mod tests {
    use super::extend;

    #[test]
    fn sequence_numbers_extend_across_wraps_and_late_packets() {
        assert_eq!(extend(None, 65000), 65000);
        assert_eq!(extend(Some(65535), 0), 65536);
        assert_eq!(extend(Some(65536), 65535), 65535, "late, before the wrap");
        assert_eq!(extend(Some(70000), 4465), 70001);
        assert_eq!(extend(Some(10), 5), 5);
    }
}

//! The SFU's core for one room (sans-IO): RTP in from each publisher,
//! what to send to whom out. It reads only headers ([`super::rtp`]),
//! follows speakers and bandwidth through the [`Room`]'s plans, and sends
//! each subscriber what it wants through a fixed number of *slots*: the
//! receive-only audio and video m-lines it offered when it joined. A slot
//! carries one publisher's stream at a time as one continuous RTP stream
//! ([`Switcher`]); when the plan changes (another speaker, another layer)
//! the slot moves, at a key frame for video. So a participant never needs
//! a new offer when others join or leave, and whose frames a slot carries
//! is told by the SFrame key id inside them, not by the SFU.
//!
//! The runtime (sockets, DTLS-SRTP per participant) calls
//! [`Forwarder::rtp`] (or [`Forwarder::incoming`] with the header already
//! parsed) for each packet a publisher sends and [`Forwarder::replan`]
//! regularly (and when an estimate changes), sends each forward it is
//! given in the subscriber's slot with the rewritten header, and asks
//! publishers for the key frames it is told to.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use wire::meter::Meter;

use super::forward::{Packet, Rewritten, Switcher};
use super::room::{Layer, ParticipantId, Room};
use super::rtp::{Header, RtpError};

/// The header extension ids the room's SDP negotiated.
#[derive(Debug, Clone, Copy)]
pub struct ExtensionIds {
    pub audio_level: u8,
    pub frame_marking: u8,
}

/// What a publisher sends: its audio SSRC, and its video layers' rids,
/// bitrates and SSRCs.
#[derive(Debug, Clone, Default)]
pub struct Publication {
    pub audio: Option<u32>,
    pub video: Vec<(Layer, u32)>,
}

/// How many streams of each kind a subscriber takes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Slots {
    pub audio: usize,
    pub video: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Audio,
    Video,
}

/// One packet to send: to whom, in which of its slots, and the header
/// fields it goes out with (the rest of the packet unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub to: ParticipantId,
    pub kind: Kind,
    pub slot: usize,
    pub header: Rewritten,
}

/// Ask `publisher` for a key frame on `ssrc` (an RTCP PLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeRequest {
    pub publisher: ParticipantId,
    pub ssrc: u32,
}

/// A packet's header as the runtime parsed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    /// RFC 6464: voice activity and level (-dBov).
    pub audio_level: Option<(bool, u8)>,
    /// RFC 9626 frame marking: the first packet of an independent frame.
    pub keyframe_start: bool,
    /// The packet's RTP payload, bytes: what a stream carries is
    /// measured in the bandwidth estimator's terms.
    pub size: usize,
}

#[derive(Debug)]
struct Slot {
    switcher: Switcher,
    publisher: Option<ParticipantId>,
    /// When a key frame of the stream it waits for was last asked for.
    asked: Option<Instant>,
}

/// A slot still waiting for the key frame of the stream it is to carry
/// (the first one asked for was lost on the way, or its sender was busy)
/// asks again after this long.
const ASK_AGAIN: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Subscriber {
    audio: Vec<Slot>,
    video: Vec<Slot>,
    /// The last plan's bitrate and wanted bitrate, bits/s.
    bitrates: (u32, u32),
}

impl Subscriber {
    fn slots(&mut self, kind: Kind) -> &mut Vec<Slot> {
        match kind {
            Kind::Audio => &mut self.audio,
            Kind::Video => &mut self.video,
        }
    }
}

#[derive(Debug)]
pub struct Forwarder {
    room: Room,
    ext: ExtensionIds,
    publications: HashMap<ParticipantId, Publication>,
    /// By publisher's SSRC: whose it is, and of which kind.
    by_ssrc: HashMap<u32, (ParticipantId, Kind)>,
    subscribers: HashMap<ParticipantId, Subscriber>,
    /// What each publisher's stream carries, by SSRC.
    meters: HashMap<u32, Meter>,
    next_ssrc: u32,
}

impl Forwarder {
    pub fn new(room: Room, ext: ExtensionIds) -> Forwarder {
        Forwarder {
            room,
            ext,
            publications: HashMap::new(),
            by_ssrc: HashMap::new(),
            subscribers: HashMap::new(),
            meters: HashMap::new(),
            next_ssrc: 0x5f00_0000,
        }
    }

    pub fn room(&self) -> &Room {
        &self.room
    }

    /// `id` joins, publishing `publication` (more may follow with
    /// [`Forwarder::publish`]) and taking up to `slots` streams.
    pub fn join(
        &mut self,
        id: ParticipantId,
        publication: Publication,
        slots: Slots,
        now: Instant,
    ) {
        self.room.join(id, now);
        let mut slot = |audio: bool| {
            self.next_ssrc = self.next_ssrc.wrapping_add(1);
            Slot {
                switcher: match audio {
                    true => Switcher::audio(self.next_ssrc),
                    false => Switcher::new(self.next_ssrc),
                },
                publisher: None,
                asked: None,
            }
        };
        let subscriber = Subscriber {
            audio: (0..slots.audio).map(|_| slot(true)).collect(),
            video: (0..slots.video).map(|_| slot(false)).collect(),
            bitrates: (0, 0),
        };
        self.subscribers.insert(id, subscriber);
        self.publish(id, publication);
    }

    /// What `id` publishes now (its SSRCs may be learnt from its first
    /// packets); replaces what it published before.
    pub fn publish(&mut self, id: ParticipantId, publication: Publication) {
        self.by_ssrc.retain(|_, (p, _)| *p != id);
        if publication.audio.is_some() {
            self.room.publish_audio(id);
        }
        if !publication.video.is_empty() {
            let layers = publication.video.iter().map(|(l, _)| l.clone()).collect();
            self.room.publish_video(id, layers);
        }
        if let Some(s) = publication.audio {
            self.by_ssrc.insert(s, (id, Kind::Audio));
        }
        for (_, s) in &publication.video {
            self.by_ssrc.insert(*s, (id, Kind::Video));
        }
        self.publications.insert(id, publication);
    }

    pub fn publication(&self, id: ParticipantId) -> Option<&Publication> {
        self.publications.get(&id)
    }

    /// `id` left; whether the room ended.
    pub fn leave(&mut self, id: ParticipantId) -> bool {
        if let Some(p) = self.publications.remove(&id) {
            for ssrc in p
                .audio
                .into_iter()
                .chain(p.video.into_iter().map(|(_, s)| s))
            {
                self.meters.remove(&ssrc);
            }
        }
        self.by_ssrc.retain(|_, (p, _)| *p != id);
        self.subscribers.remove(&id);
        for sub in self.subscribers.values_mut() {
            for slot in sub.audio.iter_mut().chain(sub.video.iter_mut()) {
                if slot.publisher == Some(id) {
                    slot.publisher = None;
                    slot.switcher.stop();
                }
            }
        }
        self.room.leave(id)
    }

    /// The subscriber's bandwidth estimate, bits/s.
    pub fn bandwidth(&mut self, id: ParticipantId, bps: u32) {
        self.room.bandwidth(id, bps);
    }

    /// Plans every subscriber anew (speakers, estimates) and moves its
    /// slots accordingly; the key frames needed for the video switches
    /// that follow.
    pub fn replan(&mut self, now: Instant) -> Vec<KeyframeRequest> {
        self.measure(now);
        let ids: Vec<ParticipantId> = self.subscribers.keys().copied().collect();
        let mut requests = Vec::new();
        for id in ids {
            let plan = self.room.plan(id, now);
            let audio: Vec<(ParticipantId, u32)> = plan
                .audio
                .iter()
                .filter_map(|p| Some((*p, self.publications.get(p)?.audio?)))
                .collect();
            let video: Vec<(ParticipantId, u32)> = plan
                .video
                .iter()
                .filter_map(|(p, rid)| Some((*p, self.layer_ssrc(*p, rid)?)))
                .collect();
            let Some(sub) = self.subscribers.get_mut(&id) else {
                continue;
            };
            sub.bitrates = (plan.bitrate, plan.wanted);
            assign(&mut sub.audio, &audio, now);
            requests.extend(
                assign(&mut sub.video, &video, now)
                    .into_iter()
                    .map(|(publisher, ssrc)| KeyframeRequest { publisher, ssrc }),
            );
        }
        requests.sort_by_key(|r| (r.publisher, r.ssrc));
        requests.dedup();
        requests
    }

    /// Each stream's bitrate over the last second or more
    /// ([`wire::meter::MEASURE_OVER`]), for the room's choices; a stream
    /// silent that long measures 0 (a video layer its sender paused, short
    /// of bandwidth, is then not chosen).
    fn measure(&mut self, now: Instant) {
        let rate = |meters: &mut HashMap<u32, Meter>, ssrc: &u32| {
            let m = meters.get_mut(ssrc)?;
            let silent = m.silent(now);
            let bps = m.take(now)?;
            Some(if silent {
                0
            } else {
                bps.min(u64::from(u32::MAX)) as u32
            })
        };
        for (id, publication) in &self.publications {
            if let Some(bps) = publication.audio.and_then(|s| rate(&mut self.meters, &s)) {
                self.room.audio_rate(*id, bps);
            }
            for (layer, ssrc) in &publication.video {
                if let Some(bps) = rate(&mut self.meters, ssrc) {
                    self.room.layer_rate(*id, &layer.rid, bps);
                }
            }
        }
    }

    /// What the last plans send each subscriber and what the best layers
    /// would, bits/s: for its bandwidth estimator to hold and to probe for.
    pub fn bitrates(&self) -> impl Iterator<Item = (ParticipantId, u32, u32)> + '_ {
        self.subscribers
            .iter()
            .map(|(id, s)| (*id, s.bitrates.0, s.bitrates.1))
    }

    /// A subscriber lost the picture in video slot `slot`: the key frame
    /// to ask of whoever the slot carries (or is moving to).
    pub fn keyframe_for(&self, subscriber: ParticipantId, slot: usize) -> Option<KeyframeRequest> {
        let s = self.subscribers.get(&subscriber)?.video.get(slot)?;
        Some(KeyframeRequest {
            publisher: s.publisher?,
            ssrc: s.switcher.wanted().or(s.switcher.current())?,
        })
    }

    fn layer_ssrc(&self, publisher: ParticipantId, rid: &str) -> Option<u32> {
        self.publications
            .get(&publisher)?
            .video
            .iter()
            .find(|(l, _)| l.rid == rid)
            .map(|(_, s)| *s)
    }

    /// A packet from `from`, as it came: where it goes.
    pub fn rtp(
        &mut self,
        from: ParticipantId,
        packet: &[u8],
        now: Instant,
    ) -> Result<Vec<Forward>, RtpError> {
        let h = Header::parse(packet)?;
        let incoming = Incoming {
            ssrc: h.ssrc,
            seq: h.seq,
            timestamp: h.timestamp,
            audio_level: h.audio_level(self.ext.audio_level),
            keyframe_start: h.keyframe_start(self.ext.frame_marking).unwrap_or(false),
            size: packet.len(),
        };
        Ok(self.incoming(from, &incoming, now))
    }

    /// A packet from `from`: to every subscriber with a slot on its
    /// stream. An SSRC that is not `from`'s own goes nowhere.
    pub fn incoming(&mut self, from: ParticipantId, h: &Incoming, now: Instant) -> Vec<Forward> {
        let Some(&(owner, kind)) = self.by_ssrc.get(&h.ssrc) else {
            return Vec::new();
        };
        if owner != from {
            // Someone sending under another participant's SSRC.
            return Vec::new();
        }
        if let (Kind::Audio, Some((voice, level))) = (kind, h.audio_level) {
            self.room.audio_level(from, level, voice, now);
        }
        self.meters
            .entry(h.ssrc)
            .or_insert_with(|| Meter::new(now))
            .add(h.size as u64, now);
        let p = Packet {
            ssrc: h.ssrc,
            seq: h.seq,
            timestamp: h.timestamp,
            // Every Opus packet decodes alone.
            keyframe_start: kind == Kind::Audio || h.keyframe_start,
        };
        let mut out = Vec::new();
        for (to, sub) in self.subscribers.iter_mut() {
            for (slot, s) in sub.slots(kind).iter_mut().enumerate() {
                if s.publisher != Some(from) {
                    continue;
                }
                if let Some(header) = s.switcher.forward(&p) {
                    out.push(Forward {
                        to: *to,
                        kind,
                        slot,
                        header,
                    });
                }
            }
        }
        out.sort_by_key(|f| (f.to, f.kind, f.slot));
        out
    }
}

/// Puts `wanted` (publisher, stream) into `slots`: a publisher keeps the
/// slot it has, newcomers take the slots of those no longer wanted, in
/// the order wanted; those beyond the slots wait. The streams to ask key
/// frames of: a new stream in a slot, or one a slot has waited
/// [`ASK_AGAIN`] for since it last asked.
fn assign(
    slots: &mut [Slot],
    wanted: &[(ParticipantId, u32)],
    now: Instant,
) -> Vec<(ParticipantId, u32)> {
    let wanted = &wanted[..wanted.len().min(slots.len())];
    for slot in slots.iter_mut() {
        if slot
            .publisher
            .is_some_and(|p| !wanted.iter().any(|(w, _)| *w == p))
        {
            slot.publisher = None;
            slot.switcher.stop();
        }
    }
    let mut asks = Vec::new();
    for &(publisher, ssrc) in wanted {
        let at = slots
            .iter()
            .position(|s| s.publisher == Some(publisher))
            .or_else(|| slots.iter().position(|s| s.publisher.is_none()));
        let Some(at) = at else {
            continue;
        };
        let slot = &mut slots[at];
        slot.publisher = Some(publisher);
        let new = slot.switcher.want(ssrc);
        let waited = slot.switcher.wanted().is_some()
            && slot
                .asked
                .is_none_or(|t| now.saturating_duration_since(t) >= ASK_AGAIN);
        if new || waited {
            slot.asked = Some(now);
            asks.push((publisher, ssrc));
        }
    }
    asks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::room::Config;
    use std::time::Duration;

    const EXT: ExtensionIds = ExtensionIds {
        audio_level: 1,
        frame_marking: 3,
    };

    fn p(i: u16) -> ParticipantId {
        ParticipantId(i)
    }

    const SLOTS: Slots = Slots { audio: 2, video: 2 };

    /// Participant i's audio SSRC is i*100, its layers' i*100+1..3.
    fn publication(i: u16) -> Publication {
        let base = u32::from(i) * 100;
        Publication {
            audio: Some(base),
            video: [("q", 150_000), ("h", 500_000), ("f", 1_500_000)]
                .into_iter()
                .enumerate()
                .map(|(k, (rid, bitrate))| {
                    (
                        Layer {
                            rid: rid.into(),
                            bitrate,
                        },
                        base + 1 + k as u32,
                    )
                })
                .collect(),
        }
    }

    /// An RTP packet with one-byte extensions: audio level (id 1) or frame
    /// marking (id 3).
    fn rtp(ssrc: u32, seq: u16, ts: u32, ext: Option<(u8, u8)>) -> Vec<u8> {
        let mut b = vec![0x80 | if ext.is_some() { 0x10 } else { 0 }, 96];
        b.extend_from_slice(&seq.to_be_bytes());
        b.extend_from_slice(&ts.to_be_bytes());
        b.extend_from_slice(&ssrc.to_be_bytes());
        if let Some((id, v)) = ext {
            b.extend_from_slice(&[0xbe, 0xde, 0, 1, id << 4, v, 0, 0]);
        }
        b.extend_from_slice(b"ciphertext");
        b
    }

    fn video(ssrc: u32, seq: u16, keyframe: bool) -> Vec<u8> {
        rtp(
            ssrc,
            seq,
            u32::from(seq) * 3000,
            Some((3, if keyframe { 0xa0 } else { 0x80 })),
        )
    }

    fn speech(ssrc: u32, seq: u16) -> Vec<u8> {
        rtp(ssrc, seq, u32::from(seq) * 960, Some((1, 0x80 | 20)))
    }

    #[test]
    fn audio_reaches_everyone_else_and_video_switches_layers_at_key_frames() {
        let t = Instant::now();
        let mut f = Forwarder::new(Room::new(Config::default()), EXT);
        for i in 1..=3 {
            f.join(p(i), publication(i), SLOTS, t);
        }
        // 2 shares 4 Mb/s between two videos (after two audio streams):
        // "f" fits; 3's 300 kb/s fits nothing but the lowest.
        f.bandwidth(p(2), 4_000_000);
        f.bandwidth(p(3), 300_000);
        let asks = f.replan(t);
        // Each other subscriber wants one of 1's layers: key frames asked.
        assert!(
            asks.contains(&KeyframeRequest {
                publisher: p(1),
                ssrc: 103
            }),
            "{asks:?}"
        );
        assert!(
            asks.contains(&KeyframeRequest {
                publisher: p(1),
                ssrc: 101
            }),
            "{asks:?}"
        );

        // 1 speaks: 2 and 3 get the packet in an audio slot, numbered as
        // it came (the slot's first packet).
        let out = f.rtp(p(1), &speech(100, 7), t).unwrap();
        assert_eq!(
            out.iter().map(|o| o.to).collect::<Vec<_>>(),
            vec![p(2), p(3)]
        );
        assert!(out
            .iter()
            .all(|o| o.kind == Kind::Audio && o.header.seq == 7 && o.header.ssrc != 100));

        // 1's key frames on both layers: 2 gets "f" (103), 3 gets "q" (101),
        // each as one stream of its own.
        assert_eq!(f.rtp(p(1), &video(102, 50, true), t).unwrap(), vec![]);
        let to3 = f.rtp(p(1), &video(101, 50, true), t).unwrap();
        assert_eq!(to3.iter().map(|o| o.to).collect::<Vec<_>>(), vec![p(3)]);
        let to2 = f.rtp(p(1), &video(103, 50, true), t).unwrap();
        assert_eq!(to2.iter().map(|o| o.to).collect::<Vec<_>>(), vec![p(2)]);
        assert_ne!(to2[0].header.ssrc, to3[0].header.ssrc);

        // 2's estimate drops: down to "q" at its next key frame, numbering
        // going on.
        let before = f.rtp(p(1), &video(103, 51, false), t).unwrap()[0].header;
        f.bandwidth(p(2), 300_000);
        let asks = f.replan(t);
        assert!(asks.contains(&KeyframeRequest {
            publisher: p(1),
            ssrc: 101
        }));
        let out = f.rtp(p(1), &video(101, 52, true), t).unwrap();
        let to2 = out.iter().find(|o| o.to == p(2)).unwrap().header;
        assert_eq!(
            (to2.ssrc, to2.seq),
            (before.ssrc, before.seq.wrapping_add(1))
        );
    }

    /// A video packet of `size` bytes.
    fn sized(ssrc: u32, seq: u16, keyframe: bool, size: usize) -> Vec<u8> {
        let mut b = video(ssrc, seq, keyframe);
        b.resize(size, 0);
        b
    }

    /// 1 sends its layers for a second each step (`rates`: packets of
    /// 1000 bytes per second, per layer q, h, f), then 2's plan is made.
    fn send_for_a_second(f: &mut Forwarder, t: Instant, seq: &mut u16, rates: [u32; 3]) {
        for tick in 0..50u32 {
            let at = t + Duration::from_millis(u64::from(tick) * 20);
            for (k, rate) in rates.iter().enumerate() {
                // `rate` packets spread over the 50 ticks.
                if (tick * rate) / 50 != ((tick + 1) * rate) / 50 {
                    *seq = seq.wrapping_add(1);
                    f.rtp(p(1), &sized(101 + k as u32, *seq, tick == 0, 1000), at)
                        .unwrap();
                }
            }
        }
    }

    /// A second of 1's layers at `rates` from `*t`, then the plan just
    /// after it: the key frames it asks for. `*t` moves on a second.
    fn a_second_then_replan(
        f: &mut Forwarder,
        t: &mut Instant,
        seq: &mut u16,
        rates: [u32; 3],
    ) -> Vec<KeyframeRequest> {
        send_for_a_second(f, *t, seq, rates);
        *t += Duration::from_secs(1);
        f.replan(*t + Duration::from_millis(50))
    }

    #[test]
    fn layers_are_chosen_by_what_they_carry_and_a_paused_one_is_passed_over() {
        let t = Instant::now();
        let mut f = Forwarder::new(Room::new(Config::default()), EXT);
        f.join(p(1), publication(1), SLOTS, t);
        f.join(p(2), Publication::default(), SLOTS, t);
        // 400 kb/s less one audio stream: of the layers as published
        // (150k, 500k, 1.5M) only "q" fits.
        f.bandwidth(p(2), 400_000);
        assert!(f.replan(t).contains(&KeyframeRequest {
            publisher: p(1),
            ssrc: 101
        }));
        // They carry far less (24, 80 and 200 kb/s): "f" fits after all,
        // once measured for a second.
        let (mut now, mut seq) = (t, 0);
        let asks = |publisher: u16, ssrc: u32| {
            vec![KeyframeRequest {
                publisher: p(publisher),
                ssrc,
            }]
        };
        let step = a_second_then_replan(&mut f, &mut now, &mut seq, [3, 10, 25]);
        assert_eq!(step, asks(1, 103));
        // 1 stops sending "f" (its own uplink is short): 2 moves to "h",
        // the best layer still sent, at its key frame.
        let step = a_second_then_replan(&mut f, &mut now, &mut seq, [3, 10, 0]);
        assert_eq!(step, asks(1, 102));
        seq = seq.wrapping_add(1);
        let out = f.rtp(p(1), &sized(102, seq, true, 1000), now).unwrap();
        assert_eq!(out.iter().map(|o| o.to).collect::<Vec<_>>(), vec![p(2)]);
        // "f" comes back: up again once measured.
        let step = a_second_then_replan(&mut f, &mut now, &mut seq, [3, 10, 25]);
        assert_eq!(step, asks(1, 103));
    }

    #[test]
    fn a_slot_whose_key_frame_does_not_come_asks_again() {
        let t = Instant::now();
        let mut f = Forwarder::new(Room::new(Config::default()), EXT);
        f.join(p(1), publication(1), SLOTS, t);
        f.join(p(2), Publication::default(), SLOTS, t);
        f.bandwidth(p(2), 400_000);
        let q = KeyframeRequest {
            publisher: p(1),
            ssrc: 101,
        };
        assert!(f.replan(t).contains(&q));
        // The key frame was lost: not asked again at once...
        assert!(!f.replan(t + Duration::from_millis(500)).contains(&q));
        // ...but after a second of waiting.
        assert!(f.replan(t + ASK_AGAIN).contains(&q));
        assert!(!f
            .replan(t + ASK_AGAIN + Duration::from_millis(500))
            .contains(&q));
        // It comes: the slot carries 1's "q" and asks for it no more.
        let out = f.rtp(p(1), &video(101, 7, true), t + ASK_AGAIN).unwrap();
        assert_eq!(out.iter().map(|o| o.to).collect::<Vec<_>>(), vec![p(2)]);
        assert!(!f.replan(t + ASK_AGAIN * 3).contains(&q));
    }

    #[test]
    fn a_speaker_comes_into_last_n_and_a_leaver_goes_out() {
        let t = Instant::now();
        let config = Config {
            last_n: 1,
            ..Config::default()
        };
        let mut f = Forwarder::new(Room::new(config), EXT);
        for i in 1..=3 {
            f.join(
                p(i),
                publication(i),
                SLOTS,
                t + Duration::from_millis(u64::from(i)),
            );
        }
        f.replan(t);
        // 1 sees 2 (first to join); 3 speaks, and after a replan 1 sees 3.
        f.rtp(p(3), &speech(300, 1), t).unwrap();
        let asks = f.replan(t + Duration::from_millis(10));
        assert!(asks.contains(&KeyframeRequest {
            publisher: p(3),
            ssrc: 301
        }));
        assert_eq!(
            f.rtp(p(2), &video(201, 9, true), t)
                .unwrap()
                .iter()
                .filter(|o| o.to == p(1))
                .count(),
            0
        );
        let to1 = f.rtp(p(3), &video(301, 9, true), t).unwrap();
        assert!(to1.iter().any(|o| o.to == p(1)));

        // Someone sending under another's SSRC is dropped.
        assert!(f.rtp(p(2), &video(301, 10, false), t).unwrap().is_empty());

        // 3 leaves: nothing of 3 goes anywhere, nothing goes to 3.
        assert!(!f.leave(p(3)));
        assert!(f.rtp(p(3), &speech(300, 2), t).unwrap().is_empty());
        let out = f.rtp(p(1), &speech(100, 1), t).unwrap();
        assert!(out.iter().all(|o| o.to != p(3)));
        assert!(!f.leave(p(1)));
        assert!(f.leave(p(2)), "the room ends with its last participant");
    }

    #[test]
    fn with_fewer_audio_slots_than_speakers_a_slot_moves_to_the_latest() {
        let t = Instant::now();
        let mut f = Forwarder::new(Room::new(Config::default()), EXT);
        let one = Slots { audio: 1, video: 0 };
        for i in 1..=3 {
            f.join(
                p(i),
                publication(i),
                one,
                t + Duration::from_millis(u64::from(i)),
            );
        }
        f.replan(t);
        // 1 hears 2 (first to join of the others), not 3.
        let to1 = |f: &mut Forwarder, from: u16, seq: u16| -> Vec<Forward> {
            f.rtp(p(from), &speech(u32::from(from) * 100, seq), t)
                .unwrap()
                .into_iter()
                .filter(|o| o.to == p(1))
                .collect()
        };
        let a = to1(&mut f, 2, 10);
        assert_eq!(a.len(), 1);
        // 3's packets (silence, no level) go nowhere near 1.
        let silent = f.rtp(p(3), &rtp(300, 500, 500 * 960, None), t).unwrap();
        assert!(silent.iter().all(|o| o.to != p(1)));
        // 3 speaks up: after a replan 1's one slot carries 3, numbering
        // going on from 2's last packet.
        let later = t + Duration::from_millis(20);
        f.rtp(p(3), &speech(300, 501), later).unwrap();
        f.replan(later);
        assert!(to1(&mut f, 2, 11).is_empty());
        let b = to1(&mut f, 3, 502);
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].slot, b[0].header.ssrc), (a[0].slot, a[0].header.ssrc));
        assert_eq!(b[0].header.seq, a[0].header.seq.wrapping_add(1));
        assert_eq!(
            b[0].header.timestamp,
            a[0].header.timestamp.wrapping_add(960)
        );
    }
}

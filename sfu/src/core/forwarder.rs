//! The SFU's core for one room (sans-IO): RTP in from each publisher,
//! what to send to whom out. It reads only headers ([`super::rtp`]),
//! follows speakers and bandwidth through the [`Room`]'s plans, and keeps
//! each forwarded video one stream per subscriber ([`Switcher`]).
//!
//! The runtime (sockets, DTLS-SRTP per participant) calls [`Forwarder::
//! rtp`] for each packet a publisher sends and [`Forwarder::replan`]
//! regularly (and when an estimate changes), sends each forward it is
//! given with the rewritten header, and asks publishers for the key frames
//! it is told to.

use std::collections::HashMap;
use std::time::Instant;

use super::forward::{Packet, Rewritten, Switcher};
use super::room::{Layer, ParticipantId, Plan, Room};
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

/// One packet to send: to whom, and the header fields it goes out with
/// (the rest of the packet unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub to: ParticipantId,
    pub header: Rewritten,
}

/// Ask `publisher` for a key frame on `ssrc` (an RTCP PLI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeRequest {
    pub publisher: ParticipantId,
    pub ssrc: u32,
}

#[derive(Debug)]
pub struct Forwarder {
    room: Room,
    ext: ExtensionIds,
    publications: HashMap<ParticipantId, Publication>,
    /// By publisher's SSRC: whose it is, and whether audio.
    by_ssrc: HashMap<u32, (ParticipantId, bool)>,
    plans: HashMap<ParticipantId, Plan>,
    /// (subscriber, publisher) → the forwarded video.
    videos: HashMap<(ParticipantId, ParticipantId), Switcher>,
    next_ssrc: u32,
}

impl Forwarder {
    pub fn new(room: Room, ext: ExtensionIds) -> Forwarder {
        Forwarder {
            room,
            ext,
            publications: HashMap::new(),
            by_ssrc: HashMap::new(),
            plans: HashMap::new(),
            videos: HashMap::new(),
            next_ssrc: 0x5f00_0000,
        }
    }

    pub fn room(&self) -> &Room {
        &self.room
    }

    pub fn join(&mut self, id: ParticipantId, publication: Publication, now: Instant) {
        self.room.join(id, now);
        if publication.audio.is_some() {
            self.room.publish_audio(id);
        }
        if !publication.video.is_empty() {
            let layers = publication.video.iter().map(|(l, _)| l.clone()).collect();
            self.room.publish_video(id, layers);
        }
        if let Some(s) = publication.audio {
            self.by_ssrc.insert(s, (id, true));
        }
        for (_, s) in &publication.video {
            self.by_ssrc.insert(*s, (id, false));
        }
        self.publications.insert(id, publication);
    }

    /// `id` left; whether the room ended.
    pub fn leave(&mut self, id: ParticipantId) -> bool {
        self.publications.remove(&id);
        self.by_ssrc.retain(|_, (p, _)| *p != id);
        self.plans.remove(&id);
        self.videos.retain(|(s, p), _| *s != id && *p != id);
        self.room.leave(id)
    }

    /// The subscriber's bandwidth estimate, bits/s.
    pub fn bandwidth(&mut self, id: ParticipantId, bps: u32) {
        self.room.bandwidth(id, bps);
    }

    /// Plans every subscriber anew (speakers, estimates); the key frames
    /// needed for the layer switches that follow.
    pub fn replan(&mut self, now: Instant) -> Vec<KeyframeRequest> {
        let ids: Vec<ParticipantId> = self.publications.keys().copied().collect();
        let mut requests = Vec::new();
        for sub in ids {
            let plan = self.room.plan(sub, now);
            for (publisher, rid) in &plan.video {
                let Some(ssrc) = self.layer_ssrc(*publisher, rid) else {
                    continue;
                };
                let next = &mut self.next_ssrc;
                let s = self.videos.entry((sub, *publisher)).or_insert_with(|| {
                    *next = next.wrapping_add(1);
                    Switcher::new(*next)
                });
                if s.want(ssrc) {
                    requests.push(KeyframeRequest {
                        publisher: *publisher,
                        ssrc,
                    });
                }
            }
            // Videos no longer in the plan stop.
            self.videos
                .retain(|(s, p), _| *s != sub || plan.video.iter().any(|(v, _)| v == p));
            self.plans.insert(sub, plan);
        }
        requests.sort_by_key(|r| (r.publisher, r.ssrc));
        requests.dedup();
        requests
    }

    fn layer_ssrc(&self, publisher: ParticipantId, rid: &str) -> Option<u32> {
        self.publications
            .get(&publisher)?
            .video
            .iter()
            .find(|(l, _)| l.rid == rid)
            .map(|(_, s)| *s)
    }

    /// A packet from `from`: where it goes. Audio goes to every subscriber
    /// whose plan has the publisher's audio, unchanged; video through each
    /// subscriber's switcher.
    pub fn rtp(
        &mut self,
        from: ParticipantId,
        packet: &[u8],
        now: Instant,
    ) -> Result<Vec<Forward>, RtpError> {
        let h = Header::parse(packet)?;
        let Some(&(owner, audio)) = self.by_ssrc.get(&h.ssrc) else {
            return Ok(Vec::new());
        };
        if owner != from {
            // Someone sending under another participant's SSRC.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        if audio {
            if let Some((voice, level)) = h.audio_level(self.ext.audio_level) {
                self.room.audio_level(from, level, voice, now);
            }
            for (sub, plan) in &self.plans {
                if plan.audio.contains(&from) {
                    out.push(Forward {
                        to: *sub,
                        header: Rewritten {
                            ssrc: h.ssrc,
                            seq: h.seq,
                            timestamp: h.timestamp,
                        },
                    });
                }
            }
        } else {
            let p = Packet {
                ssrc: h.ssrc,
                seq: h.seq,
                timestamp: h.timestamp,
                keyframe_start: h.keyframe_start(self.ext.frame_marking).unwrap_or(false),
            };
            for ((sub, publisher), s) in self.videos.iter_mut() {
                if *publisher == from {
                    if let Some(header) = s.forward(&p) {
                        out.push(Forward { to: *sub, header });
                    }
                }
            }
        }
        out.sort_by_key(|f| f.to);
        Ok(out)
    }
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
            f.join(p(i), publication(i), t);
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

        // 1 speaks: 2 and 3 get the packet as it is.
        let out = f.rtp(p(1), &speech(100, 7), t).unwrap();
        assert_eq!(
            out.iter().map(|o| o.to).collect::<Vec<_>>(),
            vec![p(2), p(3)]
        );
        assert!(out
            .iter()
            .all(|o| o.header.ssrc == 100 && o.header.seq == 7));

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
}

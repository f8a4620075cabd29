//! One group call's room: who is in it, what each publishes, who is
//! speaking, and for each subscriber what to forward.
//!
//! - **Audio**: every other participant's audio goes to every subscriber
//!   (the devices mix it); it is small, and a muted participant's packets
//!   stop at the sender.
//! - **Video, last-N**: a subscriber receives the video of at most `last_n`
//!   others, the most recent speakers first (RFC 6464 audio levels, which
//!   stay readable under SFrame), then those who joined first.
//! - **Simulcast**: each publisher sends two or three layers; a subscriber
//!   gets, of each video it receives, the best layer that fits its share
//!   of its bandwidth estimate after audio. It steps down as soon as the
//!   share is too small, and up only with a margin to spare, so an
//!   estimate that hovers does not make the picture flap.
//!
//! The room ends when the last participant leaves.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A participant in a room (its index in the call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ParticipantId(pub u16);

/// One simulcast layer of a video: its RTP stream id and its bitrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub rid: String,
    pub bitrate: u32,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Videos a subscriber receives at most.
    pub last_n: usize,
    /// What one audio stream takes of a subscriber's bandwidth until it
    /// is measured, in RTP payload bits/s as the bandwidth estimator
    /// counts: 32 kb/s Opus in 20 ms frames, each sealed with SFrame.
    pub audio_bitrate: u32,
    /// How long a participant counts as speaking after its last loud
    /// packet.
    pub speaking_for: Duration,
    /// RFC 6464 level (-dBov, 0 loudest, 127 silence) at or below which a
    /// voice packet counts as speech.
    pub speech_level: u8,
    /// Share of headroom needed to step up a layer (0.15: 15%).
    pub step_up_margin: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            last_n: 4,
            audio_bitrate: 40_000,
            speaking_for: Duration::from_secs(3),
            speech_level: 50,
            step_up_margin: 0.15,
        }
    }
}

#[derive(Debug)]
struct Participant {
    joined: Instant,
    audio: bool,
    /// Its audio's measured bitrate, once known.
    audio_rate: Option<u32>,
    /// Layers, lowest bitrate first.
    video: Vec<Layer>,
    last_spoke: Option<Instant>,
    /// When its current run of speech began: speakers are ranked by it,
    /// so the order stays put while several talk at once.
    spoke_since: Option<Instant>,
    bandwidth: Option<u32>,
    /// The layer index this subscriber gets of each publisher's video.
    layers: BTreeMap<ParticipantId, usize>,
}

/// What a subscriber is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Publishers whose audio to send, latest speakers first.
    pub audio: Vec<ParticipantId>,
    /// Publisher and the rid of the layer.
    pub video: Vec<(ParticipantId, String)>,
    /// Bits/s this plan sends, and what the best layers would: the
    /// estimator should hold the one and probe for the other.
    pub bitrate: u32,
    pub wanted: u32,
}

#[derive(Debug, Default)]
pub struct Room {
    config: Config,
    participants: BTreeMap<ParticipantId, Participant>,
    /// Someone joined and then everyone left.
    ended: bool,
}

impl Room {
    pub fn new(config: Config) -> Room {
        Room {
            config,
            participants: BTreeMap::new(),
            ended: false,
        }
    }

    pub fn join(&mut self, id: ParticipantId, now: Instant) {
        self.participants.entry(id).or_insert(Participant {
            joined: now,
            audio: false,
            audio_rate: None,
            video: Vec::new(),
            last_spoke: None,
            spoke_since: None,
            bandwidth: None,
            layers: BTreeMap::new(),
        });
    }

    /// `id` left; whether the room ended with it.
    pub fn leave(&mut self, id: ParticipantId) -> bool {
        if self.participants.remove(&id).is_some() {
            for p in self.participants.values_mut() {
                p.layers.remove(&id);
            }
            if self.participants.is_empty() {
                self.ended = true;
            }
        }
        self.ended
    }

    pub fn ended(&self) -> bool {
        self.ended
    }

    pub fn len(&self) -> usize {
        self.participants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.participants.is_empty()
    }

    pub fn publish_audio(&mut self, id: ParticipantId) {
        if let Some(p) = self.participants.get_mut(&id) {
            p.audio = true;
        }
    }

    /// `id` publishes video in `layers` (any order).
    pub fn publish_video(&mut self, id: ParticipantId, mut layers: Vec<Layer>) {
        layers.sort_by_key(|l| l.bitrate);
        if let Some(p) = self.participants.get_mut(&id) {
            p.video = layers;
        }
    }

    /// What `id`'s audio measured, bits/s (0: it stopped sending).
    pub fn audio_rate(&mut self, id: ParticipantId, bps: u32) {
        if let Some(p) = self.participants.get_mut(&id) {
            p.audio_rate = Some(bps);
        }
    }

    /// What `id`'s layer `rid` measured, bits/s. The order of its layers
    /// stays as published; a layer measuring 0 is paused and not chosen.
    pub fn layer_rate(&mut self, id: ParticipantId, rid: &str, bps: u32) {
        let layer = self
            .participants
            .get_mut(&id)
            .and_then(|p| p.video.iter_mut().find(|l| l.rid == rid));
        if let Some(l) = layer {
            l.bitrate = bps;
        }
    }

    /// An audio packet of `id` carried level `level` (RFC 6464) and the
    /// voice flag.
    pub fn audio_level(&mut self, id: ParticipantId, level: u8, voice: bool, now: Instant) {
        let speech = voice && level <= self.config.speech_level;
        if let (true, Some(p)) = (speech, self.participants.get_mut(&id)) {
            let quiet_since = p
                .last_spoke
                .is_none_or(|t| now.saturating_duration_since(t) > self.config.speaking_for);
            if quiet_since {
                p.spoke_since = Some(now);
            }
            p.last_spoke = Some(now);
        }
    }

    /// The subscriber's bandwidth estimate (REMB or transport-cc), bits/s.
    pub fn bandwidth(&mut self, id: ParticipantId, bps: u32) {
        if let Some(p) = self.participants.get_mut(&id) {
            p.bandwidth = Some(bps);
        }
    }

    /// Participants in speaking order: those speaking (a word within
    /// `speaking_for`) by when they began, the latest first, then the rest
    /// by when they joined. Ranking by the last word would reshuffle
    /// everyone on each packet while several talk at once, and move their
    /// videos between slots (each move waits for a key frame).
    pub fn speakers(&self, now: Instant) -> Vec<ParticipantId> {
        // When those speaking began.
        let began = |p: &Participant| {
            p.last_spoke
                .filter(|t| now.saturating_duration_since(*t) <= self.config.speaking_for)
                .and(p.spoke_since)
        };
        let mut ids: Vec<(ParticipantId, Option<Instant>, Instant)> = self
            .participants
            .iter()
            .map(|(id, p)| (*id, began(p), p.joined))
            .collect();
        // Speakers by when they began, newest first; then the rest. Ties
        // (many begin within one batch of packets) go by joining, never
        // by the last word, which would reorder them on every batch.
        ids.sort_by(|a, b| {
            match (a.1, b.1) {
                (Some(x), Some(y)) => y.cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
            .then(a.2.cmp(&b.2))
            .then(a.0.cmp(&b.0))
        });
        ids.into_iter().map(|(id, _, _)| id).collect()
    }

    /// What to send `subscriber` now (and the layers it is on, kept for
    /// the next decision).
    pub fn plan(&mut self, subscriber: ParticipantId, now: Instant) -> Plan {
        let Some(me) = self.participants.get(&subscriber) else {
            return Plan::default();
        };
        let speakers = self.speakers(now);
        // In speaking order, so a subscriber with fewer audio slots than
        // publishers hears the latest speakers.
        let audio: Vec<ParticipantId> = speakers
            .iter()
            .copied()
            .filter(|id| *id != subscriber && self.participants[id].audio)
            .collect();
        let shown: Vec<ParticipantId> = speakers
            .into_iter()
            .filter(|id| *id != subscriber)
            .filter(|id| {
                self.participants
                    .get(id)
                    .is_some_and(|p| !p.video.is_empty())
            })
            .take(self.config.last_n)
            .collect();
        let share = me.bandwidth.map(|bw| {
            let after_audio = bw.saturating_sub(self.audio_bps(&audio));
            after_audio / (shown.len().max(1) as u32)
        });
        let mut video = Vec::with_capacity(shown.len());
        let mut layers = BTreeMap::new();
        let mut bitrate = self.audio_bps(&audio);
        let mut wanted = bitrate;
        for id in shown {
            let publisher = &self.participants[&id];
            let current = me.layers.get(&id).copied();
            let layer = self.choose(&publisher.video, current, share);
            layers.insert(id, layer);
            video.push((id, publisher.video[layer].rid.clone()));
            bitrate = bitrate.saturating_add(publisher.video[layer].bitrate);
            let best = publisher.video.iter().map(|l| l.bitrate).max().unwrap_or(0);
            wanted = wanted.saturating_add(best);
        }
        if let Some(me) = self.participants.get_mut(&subscriber) {
            me.layers = layers;
        }
        Plan {
            audio,
            video,
            bitrate,
            wanted,
        }
    }

    /// What the audio of `ids` takes: each as measured, or as the
    /// configuration assumes until it is.
    fn audio_bps(&self, ids: &[ParticipantId]) -> u32 {
        ids.iter()
            .map(|id| {
                self.participants
                    .get(id)
                    .and_then(|p| p.audio_rate)
                    .unwrap_or(self.config.audio_bitrate)
            })
            .fold(0u32, u32::saturating_add)
    }

    /// The layer of `video` (lowest first) for a share of `share` bits/s,
    /// from `current`: down at once when it no longer fits, up only with
    /// the margin. Paused layers (bitrate 0) are passed over. No estimate
    /// yet: the lowest layer.
    fn choose(&self, video: &[Layer], current: Option<usize>, share: Option<u32>) -> usize {
        let live: Vec<usize> = (0..video.len()).filter(|i| video[*i].bitrate > 0).collect();
        let Some(&lowest) = live.first() else {
            return 0;
        };
        let Some(share) = share else {
            return lowest;
        };
        let fits = |i: usize, margin: f64| {
            f64::from(video[i].bitrate) * (1.0 + margin) <= f64::from(share)
        };
        let best = live
            .iter()
            .rev()
            .copied()
            .find(|i| fits(*i, 0.0))
            .unwrap_or(lowest);
        match current.filter(|c| live.contains(c)) {
            Some(c) if best > c => {
                // Up only as far as the margin allows.
                live.iter()
                    .rev()
                    .copied()
                    .filter(|i| (c..=best).contains(i))
                    .find(|i| fits(*i, self.config.step_up_margin))
                    .unwrap_or(c)
            }
            _ => best,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(i: u16) -> ParticipantId {
        ParticipantId(i)
    }

    fn simulcast() -> Vec<Layer> {
        [("f", 1_500_000), ("q", 150_000), ("h", 500_000)]
            .into_iter()
            .map(|(rid, bitrate)| Layer {
                rid: rid.into(),
                bitrate,
            })
            .collect()
    }

    /// A room of `n`, each publishing audio and three video layers, joined
    /// a second apart.
    fn room(n: u16, config: Config) -> (Room, Instant) {
        let t0 = Instant::now();
        let mut r = Room::new(config);
        for i in 1..=n {
            r.join(p(i), t0 + Duration::from_secs(u64::from(i)));
            r.publish_audio(p(i));
            r.publish_video(p(i), simulcast());
        }
        (r, t0 + Duration::from_secs(60))
    }

    #[test]
    fn speakers_who_began_at_the_same_instant_keep_their_order() {
        let config = Config {
            last_n: 2,
            ..Config::default()
        };
        let (mut r, t) = room(4, config);
        // One batch of packets: 4, 3 and 2 begin at the same instant, and
        // go on so, in a different order each time.
        for tick in 0..50u64 {
            let at = t + Duration::from_millis(20 * tick);
            let mut order = [4u16, 3, 2];
            order.rotate_left((tick % 3) as usize);
            for id in order {
                r.audio_level(p(id), 20, true, at);
            }
            let shown: Vec<_> = r.plan(p(1), at).video.iter().map(|(id, _)| *id).collect();
            assert_eq!(shown, vec![p(2), p(3)], "at tick {tick}: by joining");
        }
    }

    #[test]
    fn several_talking_at_once_keep_their_places_in_last_n() {
        let config = Config {
            last_n: 2,
            ..Config::default()
        };
        let (mut r, t) = room(5, config);
        let ms = |n: u64| Duration::from_millis(n);
        // 2, 3 and 4 begin in turn; 1 watches.
        for (k, id) in [2u16, 3, 4].into_iter().enumerate() {
            r.audio_level(p(id), 20, true, t + ms(100 * k as u64));
        }
        let shown = |r: &mut Room, at: Instant| -> Vec<ParticipantId> {
            r.plan(p(1), at).video.iter().map(|(id, _)| *id).collect()
        };
        let first = shown(&mut r, t + ms(250));
        assert_eq!(first, vec![p(4), p(3)], "the latest to begin first");
        // They all go on talking, their packets in every order: the two
        // shown stay the two shown.
        for tick in 1..=150u64 {
            let at = t + ms(250 + 20 * tick);
            let mut order = [2u16, 3, 4];
            order.rotate_left((tick % 3) as usize);
            for (k, id) in order.into_iter().enumerate() {
                r.audio_level(p(id), 20, true, at + ms(k as u64));
            }
            assert_eq!(shown(&mut r, at + ms(5)), first, "at tick {tick}");
        }
        // 4 stops, the others go on; once 4 counts as quiet, 2 takes its
        // place.
        let mut at = t + ms(250 + 20 * 150);
        let quiet = at + r.config.speaking_for + ms(20);
        while at < quiet {
            at += ms(20);
            for id in [2u16, 3] {
                r.audio_level(p(id), 20, true, at);
            }
        }
        assert_eq!(shown(&mut r, at), vec![p(3), p(2)]);
    }

    #[test]
    fn last_n_follows_the_speakers_and_everyone_hears_everyone() {
        let config = Config {
            last_n: 3,
            ..Config::default()
        };
        let (mut r, now) = room(6, config);
        // Nobody spoke yet: the first to join.
        let plan = r.plan(p(1), now);
        assert_eq!(plan.audio, vec![p(2), p(3), p(4), p(5), p(6)]);
        let shown: Vec<_> = plan.video.iter().map(|(id, _)| *id).collect();
        assert_eq!(shown, vec![p(2), p(3), p(4)]);
        // 6 speaks, then 5; a quiet packet (level 90) from 4 is no speech.
        r.audio_level(p(6), 30, true, now);
        r.audio_level(p(5), 20, true, now + Duration::from_millis(500));
        r.audio_level(p(4), 90, true, now + Duration::from_millis(600));
        let later = now + Duration::from_secs(1);
        assert_eq!(&r.speakers(later)[..2], &[p(5), p(6)]);
        let shown: Vec<_> = r
            .plan(p(1), later)
            .video
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(shown, vec![p(5), p(6), p(2)]);
        // A speaker sees the others, not itself.
        let shown: Vec<_> = r
            .plan(p(5), later)
            .video
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(shown, vec![p(6), p(1), p(2)]);
        // Silence for longer than speaking_for: back to joining order.
        let much_later = later + Duration::from_secs(10);
        let shown: Vec<_> = r
            .plan(p(1), much_later)
            .video
            .iter()
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(shown, vec![p(2), p(3), p(4)]);
    }

    #[test]
    fn layers_step_down_at_once_and_up_with_a_margin() {
        let config = Config {
            last_n: 1,
            audio_bitrate: 40_000,
            ..Config::default()
        };
        let (mut r, now) = room(2, config);
        let rid = |r: &mut Room| r.plan(p(1), now).video[0].1.clone();
        // No estimate yet: the lowest layer.
        assert_eq!(rid(&mut r), "q");
        // Plenty: the full layer (one audio stream takes 40 kb/s).
        r.bandwidth(p(1), 3_000_000);
        assert_eq!(rid(&mut r), "f");
        // The estimate drops: down at once.
        r.bandwidth(p(1), 400_000);
        assert_eq!(rid(&mut r), "q");
        // Just enough for "h" (500k + 40k audio), not with the margin: stay.
        r.bandwidth(p(1), 560_000);
        assert_eq!(rid(&mut r), "q");
        // With the margin: up to "h", and not beyond.
        r.bandwidth(p(1), 640_000);
        assert_eq!(rid(&mut r), "h");
        // Hovering just under "h" plus margin keeps "h" (it still fits).
        r.bandwidth(p(1), 560_000);
        assert_eq!(rid(&mut r), "h");
    }

    #[test]
    fn a_participant_leaving_mid_call_drops_out_and_the_last_ends_the_room() {
        let (mut r, now) = room(3, Config::default());
        r.bandwidth(p(1), 3_000_000);
        assert_eq!(r.plan(p(1), now).audio, vec![p(2), p(3)]);
        assert!(!r.leave(p(2)));
        let plan = r.plan(p(1), now);
        assert_eq!(plan.audio, vec![p(3)]);
        assert_eq!(plan.video.len(), 1);
        assert_eq!(r.plan(p(2), now), Plan::default(), "gone: nothing");
        assert!(!r.leave(p(1)));
        assert!(!r.ended());
        assert!(r.leave(p(3)));
        assert!(r.ended() && r.is_empty());
        // Leaving again changes nothing.
        assert!(r.leave(p(3)));
    }

    #[test]
    fn a_subscriber_gets_no_video_from_those_who_publish_none() {
        let t0 = Instant::now();
        let mut r = Room::new(Config::default());
        for i in 1..=3 {
            r.join(p(i), t0);
            r.publish_audio(p(i));
        }
        r.publish_video(p(3), simulcast());
        let plan = r.plan(p(1), t0);
        assert_eq!(plan.audio, vec![p(2), p(3)]);
        assert_eq!(plan.video, vec![(p(3), "q".to_string())]);
    }

    proptest::proptest! {
        /// Whatever is said and whoever leaves, a subscriber never gets its
        /// own media, and gets at most last_n videos, each a layer its
        /// publisher sends.
        #[test]
        fn plans_stay_within_the_rules(
            n in 2u16..10,
            last_n in 1usize..5,
            events in proptest::collection::vec((1u16..10, 0u8..128, 0u64..20_000, 50_000u32..4_000_000), 0..60),
            gone in proptest::collection::vec(1u16..10, 0..3),
        ) {
            let (mut r, now) = room(n, Config { last_n, ..Config::default() });
            for (i, level, ms, bw) in events {
                let t = now + Duration::from_millis(ms);
                r.audio_level(p(i), level, true, t);
                r.bandwidth(p(i), bw);
            }
            for g in gone {
                r.leave(p(g));
            }
            let later = now + Duration::from_secs(21);
            for i in 1..=n {
                let plan = r.plan(p(i), later);
                proptest::prop_assert!(!plan.audio.contains(&p(i)));
                proptest::prop_assert!(plan.video.len() <= last_n);
                for (id, rid) in &plan.video {
                    proptest::prop_assert!(*id != p(i));
                    proptest::prop_assert!(simulcast().iter().any(|l| l.rid == *rid));
                }
            }
        }
    }
}

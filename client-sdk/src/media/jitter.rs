//! An adaptive jitter buffer for 20 ms audio frames.
//!
//! Packets go in as they arrive (any order, with their RTP timestamp and
//! arrival time); the audio clock pulls one frame every 20 ms. The buffer
//! keeps the playout point `target` behind the earliest a frame could have
//! arrived, where `target` follows the 95th percentile of recent network
//! delay variation: it grows at once when packets come late and shrinks
//! slowly when the network calms down. It reaches the target by playing
//! one extra concealed frame (stretch) or skipping one (compress), at most
//! once per 100 ms.
//!
//! A frame that is not there when its time comes is rebuilt from the FEC
//! copy in the next packet if that one is already here, else concealed.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::audio::{FRAME_SAMPLES, SAMPLE_RATE};

const FRAME: Duration = Duration::from_millis(20);
/// How far back delay variation is measured.
const WINDOW: Duration = Duration::from_secs(2);
/// Bounds of the target playout delay.
const MIN_TARGET: Duration = Duration::from_millis(20);
const MAX_TARGET: Duration = Duration::from_millis(400);
/// At most this many frames are held (10 s); beyond, the oldest go.
const MAX_FRAMES: usize = 500;
/// At most one stretch or compress per this long.
const ADJUST_EVERY: Duration = Duration::from_millis(100);

/// What to play for the next 20 ms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Playout {
    /// Nothing has arrived yet: play silence.
    Silence,
    /// The frame's own packet.
    Frame(Vec<u8>),
    /// The frame is missing; this is the next packet, whose FEC data
    /// rebuilds it.
    Fec(Vec<u8>),
    /// Missing, and no FEC at hand: conceal.
    Conceal,
}

/// Counters since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JitterStats {
    pub received: u64,
    pub played: u64,
    pub fec: u64,
    pub concealed: u64,
    /// Arrived after their time had passed.
    pub late: u64,
    pub duplicates: u64,
    /// Frames skipped to shrink the delay.
    pub compressed: u64,
    /// Frames inserted to grow it.
    pub stretched: u64,
    /// Frames the sender never sent (Opus DTX during silence): played as
    /// comfort noise, not counted as concealed loss.
    pub dtx: u64,
}

#[derive(Debug)]
pub struct JitterBuffer {
    frames: BTreeMap<u64, Vec<u8>>,
    /// Next frame index (RTP timestamp / 960, unwrapped) to play.
    next: Option<u64>,
    /// Last unwrapped RTP timestamp, for unwrapping the next.
    last_ts: Option<u64>,
    /// The first timestamp modulo a frame: frame `k` starts at
    /// `k * 960 + phase`.
    phase: Option<u64>,
    /// The first arrival: the time origin for transits.
    origin: Option<Instant>,
    /// (arrival, transit in seconds) of recent packets.
    transits: VecDeque<(Instant, f64)>,
    target: Duration,
    last_adjust: Option<Instant>,
    /// The last packet's sequence number and frame index: a gap in frames
    /// with no gap in sequence numbers is DTX, not loss.
    last_packet: Option<(u64, u64)>,
    /// Frame indices the sender skipped (DTX), known before their turn.
    dtx: std::collections::BTreeSet<u64>,
    /// Recently concealed frame indices: a later packet may show the
    /// sender skipped them (DTX), and then they were not lost.
    concealed_at: std::collections::BTreeSet<u64>,
    stats: JitterStats,
}

impl Default for JitterBuffer {
    fn default() -> Self {
        JitterBuffer::new()
    }
}

impl JitterBuffer {
    pub fn new() -> JitterBuffer {
        JitterBuffer {
            frames: BTreeMap::new(),
            next: None,
            last_ts: None,
            phase: None,
            origin: None,
            transits: VecDeque::new(),
            target: MIN_TARGET * 2,
            last_adjust: None,
            last_packet: None,
            dtx: std::collections::BTreeSet::new(),
            concealed_at: std::collections::BTreeSet::new(),
            stats: JitterStats::default(),
        }
    }

    /// One packet: its RTP timestamp (48 kHz clock), its (extended)
    /// sequence number, payload and arrival.
    pub fn push(&mut self, rtp_ts: u32, seq: u64, payload: Vec<u8>, arrival: Instant) {
        let ts = self.unwrap_ts(rtp_ts);
        let phase = *self.phase.get_or_insert(ts % FRAME_SAMPLES as u64);
        let index = (ts.saturating_sub(phase) + FRAME_SAMPLES as u64 / 2) / FRAME_SAMPLES as u64;
        if let Some((last_seq, last_index)) = self.last_packet {
            // Consecutive packets whose frames are apart: the sender was
            // silent in between (bounded, as a timestamp can jump).
            if seq == last_seq + 1 && index > last_index + 1 && index - last_index <= 500 {
                for k in last_index + 1..index {
                    if self.concealed_at.remove(&k) {
                        // Already played as concealment: it was silence.
                        self.stats.concealed = self.stats.concealed.saturating_sub(1);
                        self.stats.dtx += 1;
                    } else {
                        self.dtx.insert(k);
                    }
                }
            }
        }
        if self.last_packet.is_none_or(|(s, _)| seq > s) {
            self.last_packet = Some((seq, index));
        }
        self.stats.received += 1;
        let origin = *self.origin.get_or_insert(arrival);
        let transit = arrival.saturating_duration_since(origin).as_secs_f64()
            - ts as f64 / SAMPLE_RATE as f64;
        self.transits.push_back((arrival, transit));
        while let Some(&(t, _)) = self.transits.front() {
            if arrival.saturating_duration_since(t) > WINDOW {
                self.transits.pop_front();
            } else {
                break;
            }
        }
        self.update_target();
        if self.next.is_some_and(|n| index < n) {
            self.stats.late += 1;
            return;
        }
        if self.frames.insert(index, payload).is_some() {
            self.stats.duplicates += 1;
        }
        while self.frames.len() > MAX_FRAMES {
            self.frames.pop_first();
        }
    }

    /// The next 20 ms, called by the audio clock every 20 ms.
    pub fn pop(&mut self, now: Instant) -> Playout {
        let next = match self.next {
            Some(n) => n,
            None => match self.frames.keys().next() {
                Some(&first) => first,
                None => return Playout::Silence,
            },
        };
        // How long after its earliest possible arrival frame `next` is
        // being played.
        let delay = self.playout_delay(next, now);
        if self.stats.played == 0 && delay + FRAME < self.target {
            // Building up the first target's worth.
            return Playout::Silence;
        }
        let may_adjust = self
            .last_adjust
            .is_none_or(|t| now.saturating_duration_since(t) >= ADJUST_EVERY);
        if may_adjust && delay + FRAME < self.target {
            // Too early: wait a frame.
            self.last_adjust = Some(now);
            self.stats.stretched += 1;
            self.stats.concealed += 1;
            return Playout::Conceal;
        }
        if may_adjust && delay > self.target + 2 * FRAME && self.frames.len() > 1 {
            // Too late: drop this frame and play the following one.
            self.last_adjust = Some(now);
            self.frames.remove(&next);
            self.stats.compressed += 1;
            return self.play(next + 1);
        }
        self.play(next)
    }

    fn play(&mut self, index: u64) -> Playout {
        self.next = Some(index + 1);
        self.stats.played += 1;
        // Frames before `index` can never play now.
        while let Some((&k, _)) = self.frames.first_key_value() {
            if k < index {
                self.frames.pop_first();
            } else {
                break;
            }
        }
        if let Some(p) = self.frames.remove(&index) {
            return Playout::Frame(p);
        }
        while let Some(&k) = self.dtx.first() {
            if k < index {
                self.dtx.pop_first();
            } else {
                break;
            }
        }
        if self.dtx.remove(&index) {
            // Nothing was sent: the decoder's concealment is the comfort
            // noise, and nothing was lost.
            self.stats.dtx += 1;
            return Playout::Conceal;
        }
        if let Some(p) = self.frames.get(&(index + 1)) {
            self.stats.fec += 1;
            return Playout::Fec(p.clone());
        }
        self.stats.concealed += 1;
        self.concealed_at.insert(index);
        while self.concealed_at.len() > 512 {
            self.concealed_at.pop_first();
        }
        Playout::Conceal
    }

    /// The current target playout delay.
    pub fn target(&self) -> Duration {
        self.target
    }

    pub fn stats(&self) -> JitterStats {
        self.stats
    }

    /// Frames waiting to be played.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    fn unwrap_ts(&mut self, ts: u32) -> u64 {
        let out = match self.last_ts {
            None => u64::from(ts) + (1 << 32),
            Some(last) => {
                // The unwrapped value nearest to the last one.
                let base = last & !0xffff_ffff;
                let candidates = [base.wrapping_sub(1 << 32), base, base + (1 << 32)];
                candidates
                    .iter()
                    .map(|b| b + u64::from(ts))
                    .min_by_key(|c| c.abs_diff(last))
                    .unwrap_or(last)
            }
        };
        self.last_ts = Some(self.last_ts.map_or(out, |l| l.max(out)));
        out
    }

    fn min_transit(&self) -> f64 {
        self.transits
            .iter()
            .map(|&(_, t)| t)
            .fold(f64::INFINITY, f64::min)
    }

    fn update_target(&mut self) {
        let min = self.min_transit();
        let mut d: Vec<f64> = self.transits.iter().map(|&(_, t)| t - min).collect();
        d.sort_by(f64::total_cmp);
        let q95 = d[((d.len() - 1) as f64 * 0.95).round() as usize];
        let want = Duration::from_secs_f64(q95)
            .saturating_add(Duration::from_millis(10))
            .clamp(MIN_TARGET, MAX_TARGET);
        // Up at once, down slowly (a tenth of the gap per packet).
        self.target = if want >= self.target {
            want
        } else {
            self.target - (self.target - want) / 10
        };
    }

    fn playout_delay(&self, index: u64, now: Instant) -> Duration {
        let Some(origin) = self.origin else {
            return Duration::ZERO;
        };
        let ts = index * FRAME_SAMPLES as u64 + self.phase.unwrap_or(0);
        let frame_time = ts as f64 / SAMPLE_RATE as f64;
        let earliest = frame_time + self.min_transit();
        let now_s = now.saturating_duration_since(origin).as_secs_f64();
        Duration::from_secs_f64((now_s - earliest).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(i: u32) -> u32 {
        1_000 + i * FRAME_SAMPLES as u32
    }

    #[test]
    fn steady_stream_plays_every_frame_in_order() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let mut played = Vec::new();
        for i in 0..100u32 {
            let now = t0 + FRAME * i;
            jb.push(
                ts(i),
                i as u64,
                vec![i as u8],
                now + Duration::from_millis(1),
            );
            if let Playout::Frame(p) = jb.pop(now + Duration::from_millis(2)) {
                played.push(p[0]);
            }
        }
        // It waits for its target first, then plays each frame once.
        assert!(played.len() >= 95, "{}", played.len());
        assert!(played.windows(2).all(|w| w[1] == w[0] + 1));
        assert_eq!(jb.stats().concealed, 0);
        assert!(jb.target() <= Duration::from_millis(40));
    }

    #[test]
    fn reordering_is_absorbed_and_a_gap_uses_fec() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let mut out = Vec::new();
        // Frames 0..50 arrive in pairs swapped; frame 30 never arrives.
        for i in 0..50u32 {
            let j = if i % 2 == 0 { i + 1 } else { i - 1 };
            if j != 30 {
                jb.push(ts(j), j as u64, vec![j as u8], t0 + FRAME * i);
            }
            out.push(jb.pop(t0 + FRAME * i + Duration::from_millis(5)));
        }
        assert!(out.contains(&Playout::Fec(vec![31])), "{out:?}");
        let frames: Vec<u8> = out
            .iter()
            .filter_map(|p| match p {
                Playout::Frame(f) => Some(f[0]),
                _ => None,
            })
            .collect();
        assert!(frames.windows(2).all(|w| w[1] > w[0]), "{frames:?}");
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn target_grows_with_jitter_and_shrinks_after() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let mut i = 0u32;
        // Alternating 0 and 80 ms of extra delay.
        for _ in 0..100 {
            let extra = if i % 2 == 0 { 0 } else { 80 };
            jb.push(
                ts(i),
                i as u64,
                vec![0],
                t0 + FRAME * i + Duration::from_millis(extra),
            );
            i += 1;
        }
        let high = jb.target();
        assert!(high >= Duration::from_millis(80), "{high:?}");
        for _ in 0..400 {
            jb.push(
                ts(i),
                i as u64,
                vec![0],
                t0 + FRAME * i + Duration::from_millis(80),
            );
            i += 1;
        }
        assert!(jb.target() < high / 2, "{:?}", jb.target());
    }

    #[test]
    fn timestamps_wrap() {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new();
        let start = u32::MAX - 2 * FRAME_SAMPLES as u32;
        let mut played = 0;
        for i in 0..50u32 {
            let now = t0 + FRAME * i;
            jb.push(
                start.wrapping_add(i * FRAME_SAMPLES as u32),
                i as u64,
                vec![1],
                now,
            );
            if matches!(jb.pop(now), Playout::Frame(_)) {
                played += 1;
            }
        }
        assert!(played >= 45, "{played}");
        assert_eq!(jb.stats().late, 0);
    }

    #[test]
    fn dtx_silence_is_not_counted_as_loss() {
        // 50 frames of speech, then the sender goes quiet (DTX: one packet
        // 400 ms later, the next sequence number), then speech again.
        let mut jb = JitterBuffer::new();
        let t0 = Instant::now();
        let mut seq = 0u64;
        let mut frames: Vec<u64> = (0..50).collect();
        frames.extend(70..120);
        let mut sent = frames.iter().peekable();
        for tick in 0..120u64 {
            let now = t0 + FRAME * tick as u32;
            while let Some(&&f) = sent.peek() {
                if f > tick {
                    break;
                }
                jb.push(f as u32 * FRAME_SAMPLES as u32, seq, vec![1], now);
                seq += 1;
                sent.next();
            }
            jb.pop(now + Duration::from_millis(1));
        }
        let st = jb.stats();
        assert!(st.dtx >= 15, "{st:?}");
        assert!(st.concealed <= 3, "{st:?}");
        // A lost packet (a gap in sequence numbers) is still loss.
        let mut jb = JitterBuffer::new();
        for i in 0..60u64 {
            let now = t0 + FRAME * i as u32;
            if i != 30 && i != 31 && i != 32 {
                jb.push(i as u32 * FRAME_SAMPLES as u32, i, vec![1], now);
            }
            jb.pop(now + Duration::from_millis(1));
        }
        assert!(jb.stats().concealed >= 1, "{:?}", jb.stats());
        assert_eq!(jb.stats().dtx, 0);
    }
}

//! One forwarded video, as a subscriber sees it: a single RTP stream
//! (one SSRC, contiguous sequence numbers, a continuous clock) however
//! often the SFU moves it between the publisher's simulcast layers.
//!
//! The payload is SFrame ciphertext, so the SFU cannot look for key
//! frames in it: the publisher marks them in the clear (the frame-marking
//! header extension's start and independent bits), and the SFU reads the
//! mark. A move to another layer waits for that layer's next key frame
//! (the SFU asks for one with a PLI); until then the old layer keeps
//! flowing, so the picture never breaks.

/// What the SFU reads of a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    /// The first packet of a frame that decodes alone (a key frame).
    pub keyframe_start: bool,
}

/// The header fields a forwarded packet goes out with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
}

/// RTP clock ticks between the last frame of one video layer and the
/// first of the next (one frame at 30 fps on a 90 kHz clock).
const SWITCH_GAP: u32 = 3000;

/// The same for audio: one 20 ms Opus packet on the 48 kHz clock.
const AUDIO_SWITCH_GAP: u32 = 960;

#[derive(Debug)]
pub struct Switcher {
    out_ssrc: u32,
    /// Clock ticks left between the streams at a switch.
    gap: u32,
    current: Option<u32>,
    target: Option<u32>,
    seq_offset: u16,
    ts_offset: u32,
    /// The newest (highest) sequence number and timestamp sent.
    last: Option<(u16, u32)>,
    /// The current layer's sequence number where it was switched to:
    /// earlier ones (reordered) would collide with the old layer's.
    since: u16,
}

/// `a` comes after `b` in RFC 3550's wrapping sequence space.
fn newer(a: u16, b: u16) -> bool {
    a != b && a.wrapping_sub(b) < 0x8000
}

impl Switcher {
    /// A forwarded video that goes out as `out_ssrc`.
    pub fn new(out_ssrc: u32) -> Switcher {
        Switcher::with_gap(out_ssrc, SWITCH_GAP)
    }

    /// A forwarded audio stream: every packet is a point to switch at, so
    /// a slot can move from one speaker to another at once.
    pub fn audio(out_ssrc: u32) -> Switcher {
        Switcher::with_gap(out_ssrc, AUDIO_SWITCH_GAP)
    }

    fn with_gap(out_ssrc: u32, gap: u32) -> Switcher {
        Switcher {
            out_ssrc,
            gap,
            current: None,
            target: None,
            seq_offset: 0,
            ts_offset: 0,
            last: None,
            since: 0,
        }
    }

    /// The layer forwarded now.
    pub fn current(&self) -> Option<u32> {
        self.current
    }

    /// The layer a switch waits for, if any.
    pub fn wanted(&self) -> Option<u32> {
        self.target
    }

    /// Forwards nothing from now on (until the next [`Switcher::want`]);
    /// the numbering goes on from where it stopped.
    pub fn stop(&mut self) {
        self.current = None;
        self.target = None;
    }

    /// Asks for layer `ssrc`; true when the SFU should ask its publisher
    /// for a key frame (PLI) to switch on.
    pub fn want(&mut self, ssrc: u32) -> bool {
        if self.current == Some(ssrc) {
            self.target = None;
            return false;
        }
        let new = self.target != Some(ssrc);
        self.target = Some(ssrc);
        new
    }

    /// The packet as it goes out, or `None` if it is not forwarded (another
    /// layer, or the wanted layer before its key frame).
    pub fn forward(&mut self, p: &Packet) -> Option<Rewritten> {
        if self.target == Some(p.ssrc) && p.keyframe_start {
            // Switch here: carry on the outgoing numbering.
            let (seq, ts) = match self.last {
                Some((s, t)) => (s.wrapping_add(1), t.wrapping_add(self.gap)),
                None => (p.seq, p.timestamp),
            };
            self.seq_offset = seq.wrapping_sub(p.seq);
            self.ts_offset = ts.wrapping_sub(p.timestamp);
            self.current = Some(p.ssrc);
            self.target = None;
            self.since = p.seq;
        }
        if self.current != Some(p.ssrc) || newer(self.since, p.seq) {
            return None;
        }
        let out = Rewritten {
            ssrc: self.out_ssrc,
            seq: p.seq.wrapping_add(self.seq_offset),
            timestamp: p.timestamp.wrapping_add(self.ts_offset),
        };
        match self.last {
            Some((s, _)) if !newer(out.seq, s) => {}
            _ => self.last = Some((out.seq, out.timestamp)),
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOW: u32 = 0x1111;
    const HIGH: u32 = 0x2222;

    fn pkt(ssrc: u32, seq: u16, timestamp: u32, keyframe_start: bool) -> Packet {
        Packet {
            ssrc,
            seq,
            timestamp,
            keyframe_start,
        }
    }

    #[test]
    fn a_layer_switch_waits_for_a_key_frame_and_keeps_numbering_contiguous() {
        let mut s = Switcher::new(0xabc);
        assert!(s.want(LOW), "a PLI to start");
        // Nothing before the first key frame.
        assert_eq!(s.forward(&pkt(LOW, 100, 9000, false)), None);
        let a = s.forward(&pkt(LOW, 101, 12000, true)).unwrap();
        let b = s.forward(&pkt(LOW, 102, 15000, false)).unwrap();
        assert_eq!(
            (a.ssrc, b.seq, b.timestamp),
            (0xabc, a.seq + 1, a.timestamp + 3000)
        );
        // Up to the high layer: the low one flows until the high one's
        // key frame.
        assert!(s.want(HIGH));
        assert!(!s.want(HIGH), "one PLI per switch");
        assert_eq!(s.forward(&pkt(HIGH, 5000, 700_000, false)), None);
        let c = s.forward(&pkt(LOW, 103, 18000, false)).unwrap();
        assert_eq!(c.seq, b.seq + 1);
        let d = s.forward(&pkt(HIGH, 5001, 703_000, true)).unwrap();
        assert_eq!(d.seq, c.seq + 1, "contiguous across the switch");
        assert_eq!(d.timestamp, c.timestamp + SWITCH_GAP);
        let e = s.forward(&pkt(HIGH, 5002, 706_000, false)).unwrap();
        assert_eq!((e.seq, e.timestamp), (d.seq + 1, d.timestamp + 3000));
        // The old layer is dropped now.
        assert_eq!(s.forward(&pkt(LOW, 104, 21000, false)), None);
        assert_eq!(s.current(), Some(HIGH));
    }

    #[test]
    fn reordered_and_wrapping_sequence_numbers_pass_through() {
        let mut s = Switcher::new(1);
        s.want(LOW);
        let a = s.forward(&pkt(LOW, 65534, 0, true)).unwrap();
        let c = s.forward(&pkt(LOW, 0, 6000, false)).unwrap();
        // 65535 arrives late: it keeps its place.
        let b = s.forward(&pkt(LOW, 65535, 3000, false)).unwrap();
        assert_eq!(b.seq, a.seq.wrapping_add(1));
        assert_eq!(c.seq, a.seq.wrapping_add(2));
        // A switch after the late packet continues from the newest.
        s.want(HIGH);
        let d = s.forward(&pkt(HIGH, 7, 50, true)).unwrap();
        assert_eq!(d.seq, c.seq.wrapping_add(1));
        // A packet of the new layer from before the switch point arrives
        // late: dropped, since its number would be one the old layer used.
        assert_eq!(s.forward(&pkt(HIGH, 6, 47, false)), None);
    }

    #[test]
    fn asking_for_the_current_layer_cancels_a_pending_switch() {
        let mut s = Switcher::new(1);
        s.want(LOW);
        s.forward(&pkt(LOW, 1, 0, true)).unwrap();
        assert!(s.want(HIGH));
        assert!(!s.want(LOW), "back to the layer it has: no PLI");
        assert_eq!(
            s.forward(&pkt(HIGH, 9, 0, true)),
            None,
            "no switch any more"
        );
        assert_eq!(s.current(), Some(LOW));
    }

    proptest::proptest! {
        /// Whatever the layers send, late or not, and however often the
        /// wanted layer changes, what goes out is one SSRC, and an
        /// outgoing sequence number always stands for the same packet.
        #[test]
        fn an_outgoing_sequence_number_is_one_packet(
            ops in proptest::collection::vec(
                (proptest::bool::ANY, proptest::bool::ANY, proptest::bool::ANY, 0u16..4),
                1..300,
            )
        ) {
            let mut s = Switcher::new(9);
            let mut seq = [0u16, 30_000];
            let mut sent = std::collections::HashMap::new();
            for (high, key, switch, late) in ops {
                if switch {
                    s.want(if high { HIGH } else { LOW });
                }
                let i = usize::from(high);
                let n = if late == 0 {
                    seq[i] = seq[i].wrapping_add(1);
                    seq[i]
                } else {
                    seq[i].wrapping_sub(late)
                };
                let p = pkt([LOW, HIGH][i], n, u32::from(n) * 3000, key && late == 0);
                if let Some(out) = s.forward(&p) {
                    proptest::prop_assert_eq!(out.ssrc, 9);
                    let was = sent.insert(out.seq, (p.ssrc, p.seq));
                    proptest::prop_assert!(
                        was.is_none() || was == Some((p.ssrc, p.seq)),
                        "seq {} stood for {:?}, now {:?}", out.seq, was, (p.ssrc, p.seq)
                    );
                }
            }
        }
    }
}

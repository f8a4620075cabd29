//! Which simulcast layers this device's uplink carries.
//!
//! The sender's bandwidth estimate (TWCC feedback from the SFU) decides how
//! many of its layers, lowest first, it encodes and sends: the audio and
//! the layers kept must fit under the estimate. A layer needs what it was
//! last measured to carry (an encoder spends less than its target on a
//! still picture); one not measured yet is kept, and started again only
//! with room for its target. A layer that no longer
//! fits stops at once (a queue is building on the way to the SFU, and
//! audio waits in it too); one that would fit again starts only when the
//! estimate clears what it needs by a margin and has held still for a
//! while, so a noisy estimate does not flap it. The lowest layer is
//! always sent: a subscriber then has a picture, however small.
//!
//! The SFU sees a stopped layer go silent and moves its subscribers to
//! the next one down (asking it for a key frame), and back once it runs.

use std::time::{Duration, Instant};

/// A layer starts again only with this much over what it needs.
const START_MARGIN: f64 = 1.25;
/// And no sooner than this after the last change.
const HOLD: Duration = Duration::from_secs(2);

/// What SFrame adds to each frame (header and tag), bytes.
const SFRAME_OVERHEAD: u64 = 22;

/// What the audio needs: Opus at `opus_bps`, 50 frames a second, each
/// sealed with SFrame. Like the estimate, this counts RTP payloads: the
/// estimator measures what arrives of them, headers aside.
pub fn audio_need(opus_bps: u32) -> u64 {
    u64::from(opus_bps) + 50 * SFRAME_OVERHEAD * 8
}

#[derive(Debug)]
pub struct LayerGate {
    /// Each layer's target bitrate, lowest first.
    layers: Vec<u64>,
    /// What each carried when last measured.
    measured: Vec<Option<u64>>,
    audio: u64,
    /// Layers sent now (at least 1).
    active: usize,
    changed: Option<Instant>,
}

impl LayerGate {
    /// All layers start sent.
    pub fn new(audio: u64, layers: Vec<u64>) -> LayerGate {
        let active = layers.len().max(1);
        LayerGate {
            measured: vec![None; layers.len()],
            layers,
            audio,
            active,
            changed: None,
        }
    }

    /// Layer `i` carried `bps` over the last while.
    pub fn measure(&mut self, i: usize, bps: u64) {
        if let Some(m) = self.measured.get_mut(i) {
            *m = Some(bps);
        }
    }

    /// What layer `i` carried when last measured (0 if never).
    pub fn measured(&self, i: usize) -> u64 {
        self.measured.get(i).copied().flatten().unwrap_or(0)
    }

    /// What `n` layers and the audio need, bits per second (a layer not
    /// measured yet its target).
    pub fn need(&self, n: usize) -> u64 {
        self.audio
            + self
                .layers
                .iter()
                .zip(&self.measured)
                .take(n)
                .map(|(target, m)| m.unwrap_or(*target))
                .sum::<u64>()
    }

    /// What `n` layers running now carry with the audio (a layer not
    /// measured yet counts nothing: it is not known to be too much).
    fn carried(&self, n: usize) -> u64 {
        self.audio + self.measured.iter().take(n).flatten().sum::<u64>()
    }

    /// What every layer and the audio would need: the rate worth probing
    /// for. (While the uplink carries less, the estimator probes for it
    /// now and then; padding to it all the time would cost a phone's
    /// data and battery.)
    pub fn desired(&self) -> u64 {
        self.need(self.layers.len())
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// A new estimate: how many layers to send from now on.
    pub fn update(&mut self, now: Instant, estimate: u64) -> usize {
        let before = self.active;
        while self.active > 1 && estimate < self.carried(self.active) {
            self.active -= 1;
        }
        let settled = self
            .changed
            .is_none_or(|t| now.saturating_duration_since(t) >= HOLD);
        if self.active == before
            && self.active < self.layers.len()
            && settled
            && estimate as f64 >= self.need(self.active + 1) as f64 * START_MARGIN
        {
            self.active += 1;
        }
        if self.active != before {
            self.changed = Some(now);
        }
        self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate() -> LayerGate {
        // Audio 60k; layers 30k, 120k, 500k.
        LayerGate::new(60_000, vec![30_000, 120_000, 500_000])
    }

    /// Each layer measured at its target.
    fn measured() -> LayerGate {
        let mut g = gate();
        for (i, r) in [30_000, 120_000, 500_000].into_iter().enumerate() {
            g.measure(i, r);
        }
        g
    }

    #[test]
    fn layers_that_do_not_fit_stop_at_once_and_the_lowest_never_does() {
        let t = Instant::now();
        let mut g = measured();
        assert_eq!(g.active(), 3);
        assert_eq!(g.desired(), 710_000);
        assert_eq!(g.update(t, 800_000), 3);
        // Room for audio and two layers (210k), not three.
        assert_eq!(g.update(t, 300_000), 2);
        // Not even the lowest fits: it is still sent.
        assert_eq!(g.update(t, 50_000), 1);
    }

    #[test]
    fn a_layer_starts_again_with_a_margin_after_a_hold_one_at_a_time() {
        let t = Instant::now();
        let mut g = measured();
        assert_eq!(g.update(t, 100_000), 1);
        // Enough for two layers at once, but the hold is not over.
        assert_eq!(g.update(t + Duration::from_secs(1), 1_000_000), 1);
        let t2 = t + HOLD;
        assert_eq!(g.update(t2, 1_000_000), 2);
        // One step per hold.
        assert_eq!(g.update(t2 + Duration::from_secs(1), 1_000_000), 2);
        // Just enough for three, without the margin: no.
        let t3 = t2 + HOLD;
        assert_eq!(g.update(t3, 710_000), 2);
        assert_eq!(g.update(t3, 900_000), 3);
    }

    #[test]
    fn a_noisy_estimate_around_a_threshold_does_not_flap_the_layer() {
        let t = Instant::now();
        let mut g = measured();
        let mut changes = 0;
        let mut last = g.active();
        for i in 0..100u32 {
            // 690k to 730k, around the 710k three layers need.
            let e = if i % 2 == 0 { 690_000 } else { 730_000 };
            let n = g.update(t + Duration::from_millis(100) * i, e);
            if n != last {
                changes += 1;
                last = n;
            }
        }
        assert_eq!(changes, 1, "dropped once and stayed down");
        assert_eq!(last, 2);
    }

    #[test]
    fn a_layer_needs_what_it_was_measured_to_carry() {
        let t = Instant::now();
        let mut g = measured();
        // A still picture: the top layer carries a tenth of its target.
        g.measure(2, 50_000);
        assert_eq!(g.need(3), 260_000);
        assert_eq!(g.update(t, 300_000), 3);
        assert_eq!(g.update(t, 250_000), 2);
    }

    #[test]
    fn a_layer_not_measured_yet_is_kept_but_started_only_with_room_for_its_target() {
        let t = Instant::now();
        let mut g = gate();
        g.measure(0, 30_000);
        // The two upper layers have no measurement: only audio and the
        // lowest (90k) are known to be carried.
        assert_eq!(g.update(t, 100_000), 3);
        g.measure(1, 120_000);
        assert_eq!(g.update(t, 100_000), 1);
        // Starting the top one again wants its 500k target.
        g.measure(1, 120_000);
        let later = t + HOLD;
        assert_eq!(g.update(later, 300_000), 2);
        assert_eq!(g.update(later + HOLD, 800_000), 2);
        assert_eq!(g.update(later + HOLD, 900_000), 3);
    }

    #[test]
    fn audio_needs_its_sframe_overhead_too() {
        assert_eq!(audio_need(32_000), 32_000 + 8_800);
    }
}

//! A MOS estimate from what a call measures, by the ITU-T G.107 E-model
//! reduced to the terms that change during a call: one-way delay and
//! packet loss after concealment.
//!
//! R = R0 − Id(delay) − Ie,eff(loss), with R0 = 93.2, Id from G.107's
//! delay impairment (for echo-free VoIP, the simplified form of Cole and
//! Rosenbluth), and Ie,eff = Ie + (95 − Ie) · Ppl / (Ppl + Bpl). Opus with
//! in-band FEC is given Ie = 0 (wideband speech, a modern codec) and
//! Bpl = 20 (robust to random loss; G.113 lists 4.3 for G.711 without
//! PLC, 25 with good PLC). R maps to MOS with G.107's formula.

/// The E-model's rating factor R for `one_way_delay_ms` and a loss
/// fraction (0..1) that concealment had to cover.
pub fn r_factor(one_way_delay_ms: f64, loss: f64) -> f64 {
    const R0: f64 = 93.2;
    const IE: f64 = 0.0;
    const BPL: f64 = 20.0;
    let d = one_way_delay_ms.max(0.0);
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ppl = loss.clamp(0.0, 1.0) * 100.0;
    let ie_eff = IE + (95.0 - IE) * ppl / (ppl + BPL);
    (R0 - id - ie_eff).clamp(0.0, 100.0)
}

/// MOS (1–4.5) for an R factor (G.107 Annex B).
pub fn mos_from_r(r: f64) -> f64 {
    if r <= 0.0 {
        1.0
    } else if r >= 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7.0e-6
    }
}

/// MOS estimate for a one-way delay and a concealed-loss fraction.
pub fn mos(one_way_delay_ms: f64, loss: f64) -> f64 {
    mos_from_r(r_factor(one_way_delay_ms, loss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_points() {
        // A clean short call is "very satisfied" (> 4.3).
        assert!(mos(20.0, 0.0) > 4.3, "{}", mos(20.0, 0.0));
        // G.114's 150 ms one way without loss is still good.
        assert!(mos(150.0, 0.0) > 4.0);
        // Heavy loss is poor, and it falls monotonically.
        assert!(mos(50.0, 0.2) < 3.5);
        let mut last = 5.0;
        for l in 0..=30 {
            let m = mos(50.0, l as f64 / 100.0);
            assert!(m <= last);
            last = m;
        }
        assert_eq!(mos_from_r(-3.0), 1.0);
        assert_eq!(mos_from_r(120.0), 4.5);
    }
}

//! Opus at 48 kHz mono, 20 ms frames, in-band FEC and DTX, with a bitrate
//! that follows the loss the far end reports; and the tone source and
//! detector that tests and `parley demo` use to prove audio arrived.

use std::f64::consts::PI;

/// Samples per second.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame.
pub const FRAME_SAMPLES: usize = 960;
/// Largest Opus packet we produce (RFC 6716 allows 1275 per frame).
const MAX_PACKET: usize = 1275;

#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    #[error("audio frames are {FRAME_SAMPLES} samples (20 ms at 48 kHz), got {0}")]
    FrameSize(usize),
    #[error("opus: {0}")]
    Opus(#[from] opus::Error),
}

/// Encoder settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AudioConfig {
    /// Bitrate before any loss is reported, bits per second.
    pub start_bitrate: u32,
    /// The range the loss adaptation moves in.
    pub min_bitrate: u32,
    pub max_bitrate: u32,
    /// Opus in-band forward error correction (LBRR).
    pub fec: bool,
    /// Discontinuous transmission: one packet per 400 ms in silence.
    pub dtx: bool,
}

impl Default for AudioConfig {
    fn default() -> AudioConfig {
        AudioConfig {
            start_bitrate: 32_000,
            min_bitrate: 16_000,
            max_bitrate: 64_000,
            fec: true,
            dtx: true,
        }
    }
}

/// The bitrate and FEC strength for a loss fraction (0..1) the far end
/// reported: clean links get up to the maximum; as loss grows Opus is told
/// to expect it (so it spends bits on FEC) and the rate steps down toward
/// the minimum so that the FEC copy and the retries do not add congestion.
pub fn adapt_to_loss(config: &AudioConfig, loss: f64) -> (u32, i32) {
    let loss = loss.clamp(0.0, 1.0);
    let span = config.max_bitrate.saturating_sub(config.min_bitrate) as f64;
    // Full rate below 2 % loss; the minimum from 25 % on.
    let t = ((loss - 0.02) / 0.23).clamp(0.0, 1.0);
    let bitrate = config.max_bitrate - (span * t).round() as u32;
    let perc = (loss * 100.0).ceil() as i32;
    (bitrate, perc.clamp(0, 100))
}

/// Opus encoder for one outgoing audio stream.
pub struct AudioEncoder {
    config: AudioConfig,
    opus: opus::Encoder,
    bitrate: u32,
    loss_perc: i32,
}

impl std::fmt::Debug for AudioEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioEncoder")
            .field("bitrate", &self.bitrate)
            .field("loss_perc", &self.loss_perc)
            .finish()
    }
}

impl AudioEncoder {
    pub fn new(config: AudioConfig) -> Result<AudioEncoder, AudioError> {
        let mut opus =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)?;
        opus.set_inband_fec(config.fec)?;
        opus.set_dtx(config.dtx)?;
        opus.set_vbr(true)?;
        let bitrate = config
            .start_bitrate
            .clamp(config.min_bitrate, config.max_bitrate);
        opus.set_bitrate(opus::Bitrate::Bits(bitrate as i32))?;
        Ok(AudioEncoder {
            config,
            opus,
            bitrate,
            loss_perc: 0,
        })
    }

    /// Encodes one 20 ms frame. `None` when DTX decides the frame need
    /// not be sent (Opus then produces a packet of 2 bytes or less).
    pub fn encode(&mut self, pcm: &[i16]) -> Result<Option<Vec<u8>>, AudioError> {
        if pcm.len() != FRAME_SAMPLES {
            return Err(AudioError::FrameSize(pcm.len()));
        }
        let mut out = vec![0u8; MAX_PACKET];
        let n = self.opus.encode(pcm, &mut out)?;
        if n <= 2 && self.config.dtx {
            return Ok(None);
        }
        out.truncate(n);
        Ok(Some(out))
    }

    /// Follows the loss fraction the far end reports (RTCP).
    pub fn set_loss(&mut self, loss: f64) -> Result<(), AudioError> {
        let (bitrate, perc) = adapt_to_loss(&self.config, loss);
        if bitrate != self.bitrate {
            self.opus.set_bitrate(opus::Bitrate::Bits(bitrate as i32))?;
            self.bitrate = bitrate;
        }
        if perc != self.loss_perc {
            self.opus.set_packet_loss_perc(perc)?;
            self.loss_perc = perc;
        }
        Ok(())
    }

    pub fn bitrate(&self) -> u32 {
        self.bitrate
    }
}

/// How a frame was made at the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// From its own packet.
    Packet,
    /// Rebuilt from the FEC copy in the next packet.
    Fec,
    /// Concealed (PLC): the packet never came in time.
    Concealed,
}

/// Opus decoder for one incoming audio stream.
pub struct AudioDecoder {
    opus: opus::Decoder,
}

impl std::fmt::Debug for AudioDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioDecoder").finish()
    }
}

impl AudioDecoder {
    pub fn new() -> Result<AudioDecoder, AudioError> {
        Ok(AudioDecoder {
            opus: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)?,
        })
    }

    /// One 20 ms frame into `out` (resized to [`FRAME_SAMPLES`]).
    /// `packet` is the frame's own packet, or with `fec` the next one
    /// whose FEC data describes this frame, or `None` to conceal.
    pub fn decode(
        &mut self,
        packet: Option<&[u8]>,
        fec: bool,
        out: &mut Vec<i16>,
    ) -> Result<Decoded, AudioError> {
        out.resize(FRAME_SAMPLES, 0);
        let how = match (packet, fec) {
            (Some(p), false) => {
                self.opus.decode(p, out, false)?;
                Decoded::Packet
            }
            (Some(p), true) => {
                self.opus.decode(p, out, true)?;
                Decoded::Fec
            }
            (None, _) => {
                self.opus.decode(&[], out, false)?;
                Decoded::Concealed
            }
        };
        Ok(how)
    }
}

/// A sine tone, frame by frame, phase-continuous.
#[derive(Clone, Debug)]
pub struct Tone {
    freq: f64,
    amplitude: f64,
    n: u64,
}

impl Tone {
    /// `amplitude` in 0..1 of full scale.
    pub fn new(freq: f64, amplitude: f64) -> Tone {
        Tone {
            freq,
            amplitude: amplitude.clamp(0.0, 1.0),
            n: 0,
        }
    }

    pub fn next_frame(&mut self) -> Vec<i16> {
        let mut out = Vec::with_capacity(FRAME_SAMPLES);
        for _ in 0..FRAME_SAMPLES {
            let t = self.n as f64 / SAMPLE_RATE as f64;
            out.push((self.amplitude * 32767.0 * (2.0 * PI * self.freq * t).sin()) as i16);
            self.n += 1;
        }
        out
    }
}

/// The share (0..1) of a block's energy at `freq` (Goertzel), so a tone
/// is told apart from noise and concealment artefacts.
pub fn tone_share(samples: &[i16], freq: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let n = samples.len() as f64;
    let w = 2.0 * PI * freq / SAMPLE_RATE as f64;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    let mut energy = 0.0f64;
    for &x in samples {
        let x = x as f64;
        energy += x * x;
        let s0 = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s0;
    }
    if energy == 0.0 {
        return 0.0;
    }
    let power = s1 * s1 + s2 * s2 - coeff * s1 * s2;
    // A pure tone of amplitude A over n samples: power = (A n / 2)^2 and
    // energy = A^2 n / 2, so 2 power / (n energy) is 1.
    (2.0 * power / (n * energy)).min(1.0)
}

/// The strongest frequency among `candidates` and its share.
pub fn dominant_frequency(samples: &[i16], candidates: impl Iterator<Item = f64>) -> (f64, f64) {
    candidates
        .map(|f| (f, tone_share(samples, f)))
        .fold((0.0, 0.0), |best, x| if x.1 > best.1 { x } else { best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tone_survives_opus_and_is_found() {
        let mut enc = AudioEncoder::new(AudioConfig::default()).unwrap();
        let mut dec = AudioDecoder::new().unwrap();
        let mut tone = Tone::new(1000.0, 0.5);
        let mut pcm = Vec::new();
        let mut out = Vec::new();
        for _ in 0..50 {
            let p = enc
                .encode(&tone.next_frame())
                .unwrap()
                .expect("a tone is not silence");
            dec.decode(Some(&p), false, &mut out).unwrap();
            pcm.extend_from_slice(&out);
        }
        let tail = &pcm[pcm.len() - 9600..];
        assert!(
            tone_share(tail, 1000.0) > 0.8,
            "{}",
            tone_share(tail, 1000.0)
        );
        assert!(tone_share(tail, 1500.0) < 0.05);
        let (f, _) = dominant_frequency(tail, (300..3000).step_by(50).map(f64::from));
        assert_eq!(f, 1000.0);
    }

    #[test]
    fn silence_is_not_sent_with_dtx() {
        let mut enc = AudioEncoder::new(AudioConfig::default()).unwrap();
        let silent = vec![0i16; FRAME_SAMPLES];
        let sent = (0..100)
            .filter(|_| enc.encode(&silent).unwrap().is_some())
            .count();
        // Opus keeps one packet per 400 ms (and a few at the start).
        assert!(sent < 20, "{sent} of 100 silent frames sent");
    }

    #[test]
    fn bitrate_follows_loss() {
        let c = AudioConfig::default();
        assert_eq!(adapt_to_loss(&c, 0.0), (64_000, 0));
        assert_eq!(adapt_to_loss(&c, 0.5), (16_000, 50));
        let (mid, perc) = adapt_to_loss(&c, 0.1);
        assert!(mid < 64_000 && mid > 16_000);
        assert_eq!(perc, 10);
        assert!(AudioEncoder::new(c).unwrap().encode(&[0; 10]).is_err());
    }
}

//! H.264 video (OpenH264, built from source): the encoder and decoder a
//! call uses, and the test pattern that tests and `parley demo` send in
//! place of a camera.
//!
//! The pattern is four quadrants of distinct brightness (luma 40, 100,
//! 160, 220) with a bar sweeping across the top so every frame differs.
//! The receiver checks the quadrants' mean luma after decoding: a frame
//! that decodes to the pattern went through the encoder, SRTP and the
//! decoder intact.

use openh264::encoder::{BitRate, EncoderConfig, FrameRate, RateControlMode, UsageType};
use openh264::formats::{YUVBuffer, YUVSource};
use openh264::OpenH264API;

pub const WIDTH: usize = 320;
pub const HEIGHT: usize = 240;
pub const FPS: u32 = 15;
/// The quadrants' luma, in reading order.
pub const PATTERN_LUMA: [f64; 4] = [40.0, 100.0, 160.0, 220.0];

#[derive(Debug, thiserror::Error)]
pub enum VideoError {
    #[error("openh264: {0}")]
    Codec(String),
}

fn codec(e: openh264::Error) -> VideoError {
    VideoError::Codec(e.to_string())
}

/// Frames of the test pattern.
#[derive(Debug, Default)]
pub struct TestPattern {
    n: u64,
}

impl TestPattern {
    /// The next frame, I420.
    pub fn next_frame(&mut self) -> YUVBuffer {
        let (w, h) = (WIDTH, HEIGHT);
        let mut yuv = vec![128u8; w * h * 3 / 2];
        let bar = (self.n as usize * 8) % w;
        for y in 0..h {
            for x in 0..w {
                let q = usize::from(y >= h / 2) * 2 + usize::from(x >= w / 2);
                let mut l = PATTERN_LUMA[q] as u8;
                if y < 16 && (x + w - bar) % w < 24 {
                    l = 255;
                }
                yuv[y * w + x] = l;
            }
        }
        self.n += 1;
        YUVBuffer::from_vec(yuv, w, h)
    }
}

/// The mean luma of the middle of each quadrant (away from the bar and
/// the edges, where compression blurs), in reading order.
pub fn quadrant_luma(y: &[u8], stride: usize, w: usize, h: usize) -> [f64; 4] {
    let mut out = [0.0; 4];
    for (q, o) in out.iter_mut().enumerate() {
        let (x0, y0) = ((q % 2) * w / 2, (q / 2) * h / 2);
        let (mut sum, mut n) = (0u64, 0u64);
        for yy in (y0 + h / 8)..(y0 + h * 3 / 8) {
            for xx in (x0 + w / 8)..(x0 + w * 3 / 8) {
                if let Some(v) = y.get(yy * stride + xx) {
                    sum += u64::from(*v);
                    n += 1;
                }
            }
        }
        *o = if n == 0 { 0.0 } else { sum as f64 / n as f64 };
    }
    out
}

/// Whether decoded quadrants are the test pattern (each within 16 levels).
pub fn is_pattern(q: &[f64; 4]) -> bool {
    q.iter()
        .zip(PATTERN_LUMA)
        .all(|(a, b)| (a - b).abs() <= 16.0)
}

/// `frame` at half its width and height (each pixel the mean of the 2x2
/// it replaces): the next lower simulcast layer.
pub fn half(frame: &impl YUVSource) -> YUVBuffer {
    let (w, h) = frame.dimensions();
    let (sy, su, sv) = frame.strides();
    let (hw, hh) = ((w / 2).max(2) & !1, (h / 2).max(2) & !1);
    let mut out = Vec::with_capacity(hw * hh * 3 / 2);
    let mut plane = |src: &[u8], stride: usize, ow: usize, oh: usize| {
        let at = |x: usize, y: usize| u16::from(src.get(y * stride + x).copied().unwrap_or(128));
        for y in 0..oh {
            for x in 0..ow {
                let sum = at(2 * x, 2 * y)
                    + at(2 * x + 1, 2 * y)
                    + at(2 * x, 2 * y + 1)
                    + at(2 * x + 1, 2 * y + 1);
                out.push(((sum + 2) / 4) as u8);
            }
        }
    };
    plane(frame.y(), sy, hw, hh);
    plane(frame.u(), su, hw / 2, hh / 2);
    plane(frame.v(), sv, hw / 2, hh / 2);
    YUVBuffer::from_vec(out, hw, hh)
}

/// H.264 encoder for one outgoing stream.
pub struct VideoEncoder {
    enc: openh264::encoder::Encoder,
    force_key: bool,
}

impl std::fmt::Debug for VideoEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoEncoder").finish_non_exhaustive()
    }
}

impl VideoEncoder {
    /// Constrained for real-time: camera usage, bitrate control.
    pub fn new(bitrate_bps: u32) -> Result<VideoEncoder, VideoError> {
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bitrate_bps))
            .max_frame_rate(FrameRate::from_hz(FPS as f32))
            .usage_type(UsageType::CameraVideoRealTime)
            .rate_control_mode(RateControlMode::Bitrate)
            .skip_frames(true);
        let enc = openh264::encoder::Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(codec)?;
        Ok(VideoEncoder {
            enc,
            force_key: false,
        })
    }

    /// The far end lost a frame it needs (PLI/FIR): the next is a key frame.
    pub fn request_keyframe(&mut self) {
        self.force_key = true;
    }

    /// One frame in Annex B form (start codes), as str0m packetizes it.
    pub fn encode(&mut self, frame: &YUVBuffer) -> Result<Vec<u8>, VideoError> {
        if std::mem::take(&mut self.force_key) {
            self.enc.force_intra_frame();
        }
        let bits = self.enc.encode(frame).map_err(codec)?;
        Ok(bits.to_vec())
    }
}

/// H.264 decoder for one incoming stream.
pub struct VideoDecoder {
    dec: openh264::decoder::Decoder,
}

impl std::fmt::Debug for VideoDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoDecoder").finish_non_exhaustive()
    }
}

/// What a decoded frame showed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub quadrants: [f64; 4],
}

impl VideoDecoder {
    pub fn new() -> Result<VideoDecoder, VideoError> {
        Ok(VideoDecoder {
            dec: openh264::decoder::Decoder::new().map_err(codec)?,
        })
    }

    /// Decodes one Annex B frame; `None` while the decoder needs more
    /// (the stream started without a key frame).
    pub fn decode(&mut self, frame: &[u8]) -> Result<Option<Picture>, VideoError> {
        let Some(yuv) = self.dec.decode(frame).map_err(codec)? else {
            return Ok(None);
        };
        let (w, h) = yuv.dimensions();
        let (stride, _, _) = yuv.strides();
        Ok(Some(Picture {
            width: w,
            height: h,
            quadrants: quadrant_luma(yuv.y(), stride, w, h),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pattern_survives_h264() {
        let mut enc = VideoEncoder::new(300_000).unwrap();
        let mut dec = VideoDecoder::new().unwrap();
        let mut pattern = TestPattern::default();
        let mut seen = 0;
        for i in 0..30 {
            if i == 20 {
                enc.request_keyframe();
            }
            let bits = enc.encode(&pattern.next_frame()).unwrap();
            assert!(bits.starts_with(&[0, 0, 0, 1]) || bits.starts_with(&[0, 0, 1]));
            if let Some(p) = dec.decode(&bits).unwrap() {
                assert_eq!((p.width, p.height), (WIDTH, HEIGHT));
                assert!(is_pattern(&p.quadrants), "{:?}", p.quadrants);
                seen += 1;
            }
        }
        assert!(seen >= 29, "{seen}");
        // A grey frame is not the pattern.
        let grey = [128.0; 4];
        assert!(!is_pattern(&grey));
    }

    #[test]
    fn a_halved_pattern_is_still_the_pattern_at_a_quarter_of_the_pixels() {
        let full = TestPattern::default().next_frame();
        let half = half(&full);
        let quarter = super::half(&half);
        assert_eq!(half.dimensions(), (WIDTH / 2, HEIGHT / 2));
        assert_eq!(quarter.dimensions(), (WIDTH / 4, HEIGHT / 4));
        let (w, h) = quarter.dimensions();
        let q = quadrant_luma(quarter.y(), quarter.strides().0, w, h);
        assert!(is_pattern(&q), "{q:?}");
        let mut enc = VideoEncoder::new(50_000).unwrap();
        let mut dec = VideoDecoder::new().unwrap();
        let p = dec.decode(&enc.encode(&quarter).unwrap()).unwrap().unwrap();
        assert_eq!((p.width, p.height), (w, h));
        assert!(is_pattern(&p.quadrants), "{:?}", p.quadrants);
    }
}

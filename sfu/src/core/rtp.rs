//! What the SFU reads of an RTP packet whose payload it cannot read: the
//! fixed header (RFC 3550 §5.1) and the header extensions (RFC 8285, one-
//! and two-byte forms) that SFrame leaves in the clear, among them the
//! audio level (RFC 6464) for active speakers and video frame marking
//! (RFC 9626) for key frames. Extension ids come from the SDP's `extmap`
//! lines, so the caller names them.

/// A packet that is not RTP as the SFU forwards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtpError {
    #[error("shorter than its header says")]
    Truncated,
    #[error("not RTP version 2")]
    Version,
    #[error("malformed header extension")]
    Extension,
}

/// An RTP packet's header, borrowing the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header<'a> {
    pub marker: bool,
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// (id, data) of each header extension element.
    pub extensions: Vec<(u8, &'a [u8])>,
    /// Where the payload starts (after CSRCs, extensions and before
    /// padding is removed).
    pub payload_start: usize,
    /// The payload's length, padding removed.
    pub payload_len: usize,
}

fn be16(b: &[u8], at: usize) -> Result<u16, RtpError> {
    let s = b.get(at..at + 2).ok_or(RtpError::Truncated)?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Result<u32, RtpError> {
    let s = b.get(at..at + 4).ok_or(RtpError::Truncated)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'a> Header<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Header<'a>, RtpError> {
        let first = *b.first().ok_or(RtpError::Truncated)?;
        if first >> 6 != 2 {
            return Err(RtpError::Version);
        }
        let padding = first & 0x20 != 0;
        let has_ext = first & 0x10 != 0;
        let csrcs = usize::from(first & 0x0f);
        let second = *b.get(1).ok_or(RtpError::Truncated)?;
        let seq = be16(b, 2)?;
        let timestamp = be32(b, 4)?;
        let ssrc = be32(b, 8)?;
        let mut at = 12 + 4 * csrcs;
        let mut extensions = Vec::new();
        if has_ext {
            let profile = be16(b, at)?;
            let words = usize::from(be16(b, at + 2)?);
            let start = at + 4;
            let end = start + 4 * words;
            let block = b.get(start..end).ok_or(RtpError::Truncated)?;
            extensions = match profile {
                0xbede => one_byte(block)?,
                p if p & 0xfff0 == 0x1000 => two_byte(block)?,
                // Another profile's extension: skipped, not read.
                _ => Vec::new(),
            };
            at = end;
        }
        if at > b.len() {
            return Err(RtpError::Truncated);
        }
        let mut end = b.len();
        if padding {
            let pad = usize::from(*b.last().ok_or(RtpError::Truncated)?);
            if pad == 0 || at + pad > end {
                return Err(RtpError::Truncated);
            }
            end -= pad;
        }
        Ok(Header {
            marker: second & 0x80 != 0,
            payload_type: second & 0x7f,
            seq,
            timestamp,
            ssrc,
            extensions,
            payload_start: at,
            payload_len: end - at,
        })
    }

    /// The data of extension `id`, if the packet carries it.
    pub fn extension(&self, id: u8) -> Option<&'a [u8]> {
        self.extensions
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, d)| *d)
    }

    /// RFC 6464 audio level under extension `id`: (voice activity, level
    /// in -dBov, 0 loudest to 127 silence).
    pub fn audio_level(&self, id: u8) -> Option<(bool, u8)> {
        let d = *self.extension(id)?.first()?;
        Some((d & 0x80 != 0, d & 0x7f))
    }

    /// RFC 9626 frame marking under extension `id`: whether this packet
    /// starts a frame that decodes alone (the S and I bits).
    pub fn keyframe_start(&self, id: u8) -> Option<bool> {
        let d = *self.extension(id)?.first()?;
        Some(d & 0x80 != 0 && d & 0x20 != 0)
    }
}

/// RFC 8285 §4.2: elements of `ID(4) L(4)` then L+1 bytes; id 0 is
/// padding, id 15 ends the block.
fn one_byte(mut b: &[u8]) -> Result<Vec<(u8, &[u8])>, RtpError> {
    let mut out = Vec::new();
    while let Some(&h) = b.first() {
        let id = h >> 4;
        if id == 0 {
            b = &b[1..];
            continue;
        }
        if id == 15 {
            break;
        }
        let len = usize::from(h & 0x0f) + 1;
        let data = b.get(1..1 + len).ok_or(RtpError::Extension)?;
        out.push((id, data));
        b = &b[1 + len..];
    }
    Ok(out)
}

/// RFC 8285 §4.3: elements of `ID(8) L(8)` then L bytes; id 0 is padding.
fn two_byte(mut b: &[u8]) -> Result<Vec<(u8, &[u8])>, RtpError> {
    let mut out = Vec::new();
    while let Some(&id) = b.first() {
        if id == 0 {
            b = &b[1..];
            continue;
        }
        let len = usize::from(*b.get(1).ok_or(RtpError::Extension)?);
        let data = b.get(2..2 + len).ok_or(RtpError::Extension)?;
        out.push((id, data));
        b = &b[2 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RTP packet: version 2, `pt`, `seq`, `ts`, `ssrc`, the given
    /// extension block (profile, data) and payload.
    fn packet(ext: Option<(u16, &[u8])>, payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0x80 | if ext.is_some() { 0x10 } else { 0 }, 0x80 | 111];
        b.extend_from_slice(&4242u16.to_be_bytes());
        b.extend_from_slice(&960_000u32.to_be_bytes());
        b.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        if let Some((profile, data)) = ext {
            assert_eq!(data.len() % 4, 0);
            b.extend_from_slice(&profile.to_be_bytes());
            b.extend_from_slice(&((data.len() / 4) as u16).to_be_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn the_fixed_header_and_one_byte_extensions_read() {
        // Audio level (id 1): voice, -30 dBov; frame marking (id 3):
        // start + independent; a padding byte between.
        let ext = [0x10, 0x80 | 30, 0x00, 0x30, 0xa0, 0, 0, 0];
        let b = packet(Some((0xbede, &ext)), b"sframe ciphertext");
        let h = Header::parse(&b).unwrap();
        assert!(h.marker);
        assert_eq!((h.payload_type, h.seq, h.timestamp), (111, 4242, 960_000));
        assert_eq!(h.ssrc, 0xdead_beef);
        assert_eq!(h.audio_level(1), Some((true, 30)));
        assert_eq!(h.keyframe_start(3), Some(true));
        assert_eq!(h.audio_level(2), None);
        assert_eq!(
            &b[h.payload_start..h.payload_start + h.payload_len],
            b"sframe ciphertext"
        );
    }

    #[test]
    fn two_byte_extensions_and_padding_read() {
        let ext = [0x05, 0x01, 0x7f, 0x00, 0x09, 0x00, 0x00, 0x00];
        let mut b = packet(Some((0x1000, &ext)), b"abc");
        // Three bytes of padding, the last saying how many.
        b[0] |= 0x20;
        b.extend_from_slice(&[0, 0, 3]);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.audio_level(5), Some((false, 127)));
        assert_eq!(h.extension(9), Some(&[][..]));
        assert_eq!(h.payload_len, 3);
        // A frame that is not a key frame's start.
        let ext = [0x30, 0x80, 0, 0];
        let h2 = packet(Some((0xbede, &ext)), b"");
        assert_eq!(Header::parse(&h2).unwrap().keyframe_start(3), Some(false));
    }

    #[test]
    fn what_is_not_rtp_is_refused() {
        assert_eq!(Header::parse(&[]), Err(RtpError::Truncated));
        assert_eq!(Header::parse(&[0x40; 20]), Err(RtpError::Version));
        let b = packet(None, b"");
        assert_eq!(Header::parse(&b[..11]), Err(RtpError::Truncated));
        // An element longer than the block.
        let ext = [0x1f, 0, 0, 0];
        assert_eq!(
            Header::parse(&packet(Some((0xbede, &ext)), b"")),
            Err(RtpError::Extension)
        );
        // Padding longer than the payload.
        let mut b = packet(None, b"x");
        b[0] |= 0x20;
        *b.last_mut().unwrap() = 9;
        assert_eq!(Header::parse(&b), Err(RtpError::Truncated));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(b in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(h) = Header::parse(&b) {
                proptest::prop_assert!(h.payload_start + h.payload_len <= b.len());
            }
        }
    }
}

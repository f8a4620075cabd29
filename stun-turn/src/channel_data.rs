//! ChannelData framing (RFC 8656 §12.4): a 4-byte header (channel number,
//! length) followed by application data, padded to 4 bytes only over TCP.

use crate::error::DecodeError;

/// Lowest and highest channel numbers accepted. RFC 8656 §12 narrowed the
/// range to 0x4000–0x4FFF to leave room for DTLS-SRTP demultiplexing (RFC
/// 7983) on the *client's* side; RFC 5766 clients still in wide use, coturn's
/// among them, pick from 0x4000–0x7FFF. On the client–server leg nothing
/// else shares the socket, so the server accepts the older range.
pub const MIN_CHANNEL: u16 = 0x4000;
pub const MAX_CHANNEL: u16 = 0x7FFF;
/// Size of the ChannelData header.
pub const CHANNEL_HEADER_LEN: usize = 4;

/// A channel number in `0x4000..=0x7FFF`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    pub fn new(n: u16) -> Result<Self, DecodeError> {
        if (MIN_CHANNEL..=MAX_CHANNEL).contains(&n) {
            Ok(ChannelNumber(n))
        } else {
            Err(DecodeError::BadChannelNumber)
        }
    }
    pub fn get(self) -> u16 {
        self.0
    }
}

/// True when the first byte marks a ChannelData frame (first two bits 01).
pub fn is_channel_data(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| b >> 6 == 1)
}

/// Decodes a ChannelData frame; returns the channel and the payload's byte
/// range within `buf`. Trailing padding (UDP may carry it too) is ignored.
pub fn decode(buf: &[u8]) -> Result<(ChannelNumber, std::ops::Range<usize>), DecodeError> {
    if buf.len() < CHANNEL_HEADER_LEN {
        return Err(DecodeError::TooShort);
    }
    let ch = ChannelNumber::new(u16::from_be_bytes([buf[0], buf[1]]))?;
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if buf.len() - CHANNEL_HEADER_LEN < len {
        return Err(DecodeError::ChannelDataTruncated);
    }
    Ok((ch, CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + len))
}

/// Writes the 4-byte header for a payload of `len` bytes.
pub fn encode_header(ch: ChannelNumber, len: usize) -> [u8; 4] {
    let c = ch.0.to_be_bytes();
    let l = (len as u16).to_be_bytes();
    [c[0], c[1], l[0], l[1]]
}

/// Padding to append after a frame of `len` payload bytes on a stream transport.
pub fn stream_padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_reserved_channel_numbers() {
        assert_eq!(
            ChannelNumber::new(0x3fff),
            Err(DecodeError::BadChannelNumber)
        );
        assert_eq!(
            ChannelNumber::new(0x8000),
            Err(DecodeError::BadChannelNumber)
        );
        assert!(
            ChannelNumber::new(0x7fff).is_ok(),
            "RFC 5766 clients use up to 0x7FFF"
        );
        assert!(ChannelNumber::new(0x4000).is_ok());
        assert!(ChannelNumber::new(0x4fff).is_ok());
    }

    #[test]
    fn truncated_frame_is_an_error() {
        assert_eq!(
            decode(&[0x40, 0, 0, 5, 1, 2]),
            Err(DecodeError::ChannelDataTruncated)
        );
    }

    proptest! {
        #[test]
        fn round_trip(ch in MIN_CHANNEL..=MAX_CHANNEL, payload in proptest::collection::vec(any::<u8>(), 0..1500), pad in any::<bool>()) {
            let ch = ChannelNumber::new(ch).unwrap();
            let mut frame = encode_header(ch, payload.len()).to_vec();
            frame.extend_from_slice(&payload);
            if pad { frame.resize(frame.len() + stream_padding(payload.len()), 0); }
            let (c, range) = decode(&frame).unwrap();
            prop_assert_eq!(c, ch);
            prop_assert_eq!(&frame[range], &payload[..]);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }
}

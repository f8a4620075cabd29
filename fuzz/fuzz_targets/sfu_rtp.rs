//! What the SFU reads of packets from the network: RTP headers and their
//! extensions (RFC 3550, RFC 8285), audio levels and frame marking. Never
//! a panic, and a payload always within the packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sfu::core::rtp::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::parse(data) {
        assert!(h.payload_start + h.payload_len <= data.len());
        for id in [1, 3, 5, 14] {
            let _ = h.audio_level(id);
            let _ = h.keyframe_start(id);
        }
    }
});

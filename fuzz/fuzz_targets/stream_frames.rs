//! Cuts arbitrary TCP stream bytes into STUN/ChannelData frames the way
//! the runtime does, and decodes each frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stun_turn::message::{stream_frame_len, Message};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some(n)) = stream_frame_len(rest) {
        assert!(n <= rest.len() && n >= 4);
        let frame = &rest[..n];
        if stun_turn::channel_data::is_channel_data(frame) {
            let _ = stun_turn::channel_data::decode(frame);
        } else {
            let _ = Message::decode(frame);
        }
        rest = &rest[n..];
    }
});

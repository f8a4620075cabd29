//! Decodes arbitrary bytes as a ChannelData frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, range)) = stun_turn::channel_data::decode(data) {
        assert!(range.end <= data.len());
    }
});

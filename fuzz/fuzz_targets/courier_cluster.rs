//! What courier nodes send each other over NATS: shard requests, node
//! commands and replies, and the notifications inside them. Whatever
//! arrives decodes or is refused, never panics, and what decodes
//! re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use push_courier::cluster::{decode, decode_note, encode_note, NodeMsg, Reply, ShardMsg};

fuzz_target!(|data: &[u8]| {
    if let Some(m) = decode::<ShardMsg>(data) {
        let again = serde_json::to_vec(&m).unwrap();
        assert_eq!(decode::<ShardMsg>(&again), Some(m.clone()));
        if let ShardMsg::Push { note, .. } = &m {
            if let Some(n) = decode_note(note) {
                assert_eq!(decode_note(&encode_note(&n).unwrap()), Some(n));
            }
        }
    }
    let _ = decode::<NodeMsg>(data);
    let _ = decode::<Reply>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(n) = decode_note(s) {
            assert_eq!(decode_note(&encode_note(&n).unwrap()), Some(n));
        }
    }
});

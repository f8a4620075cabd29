//! What signaling nodes tell each other over NATS when they store a
//! handle's bindings: decoded or refused, never a panic, and what decodes
//! re-encodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::location::BoundNotice;

fuzz_target!(|data: &[u8]| {
    if let Some((notice, handle)) = BoundNotice::decode(data) {
        assert_eq!(handle.as_str(), notice.handle);
        let again = serde_json::to_vec(&notice).unwrap();
        assert_eq!(BoundNotice::decode(&again).map(|(n, _)| n), Some(notice));
    }
});

//! What signaling nodes tell each other over NATS: the bindings they
//! store, the digest answers they take and the push tokens found dead. Decoded or refused, never a
//! panic, and what decodes re-encodes to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use signaling::location::{BoundNotice, NonceNotice, PushGoneNotice};

fuzz_target!(|data: &[u8]| {
    if let Some((notice, handle)) = BoundNotice::decode(data) {
        assert_eq!(handle.as_str(), notice.handle);
        let again = serde_json::to_vec(&notice).unwrap();
        assert_eq!(BoundNotice::decode(&again).map(|(n, _)| n), Some(notice));
    }
    if let Ok(n) = serde_json::from_slice::<NonceNotice>(data) {
        let again = serde_json::to_vec(&n).unwrap();
        assert_eq!(serde_json::from_slice::<NonceNotice>(&again).ok(), Some(n));
    }
    if let Ok(n) = serde_json::from_slice::<PushGoneNotice>(data) {
        let _ = wire::handle::Handle::parse(&n.handle);
        let again = serde_json::to_vec(&n).unwrap();
        assert_eq!(
            serde_json::from_slice::<PushGoneNotice>(&again).ok(),
            Some(n)
        );
    }
});

//! The courier's device link: `parley-push/1` frames decoded as a stream,
//! and the courier's session state machine fed the same bytes in chunks.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use push_courier::core::session::{Session, SessionConfig};
use wire::push::Frame;

fuzz_target!(|data: &[u8]| {
    // Every frame that decodes re-encodes to the same bytes.
    let mut rest = data;
    while let Ok(Some((f, n))) = Frame::decode(rest) {
        assert!(n <= rest.len());
        assert_eq!(f.to_bytes().unwrap(), &rest[..n]);
        rest = &rest[n..];
    }
    // The session never panics, whatever arrives and however it is split.
    let t0 = Instant::now();
    let mut s = Session::new(SessionConfig::default(), t0);
    for (i, chunk) in data.chunks(7).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 100);
        s.handle_bytes(chunk, now);
        s.handle_timeout(now);
        while s.poll_event().is_some() {}
        let n = s.output().len();
        s.consume_output(n);
    }
    s.handle_timeout(t0 + Duration::from_secs(10_000));
});

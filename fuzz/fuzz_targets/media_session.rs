//! The media engine's two untrusted inputs: the far end's SDP (what a
//! signaling peer sends) and datagrams on the media socket (what anyone
//! on the network sends). Neither may panic.
#![no_main]

use client_sdk::media::{MediaConfig, MediaSession, VerifiedSdp};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let now = Instant::now();
    let local = "192.0.2.1:40000".parse().unwrap();
    let Ok(mut s) = MediaSession::new(now, MediaConfig::default(), local) else {
        return;
    };
    if mode & 1 == 0 {
        let sdp = String::from_utf8_lossy(rest);
        let _ = s.accept_offer(now, &VerifiedSdp::unauthenticated(&sdp));
    } else {
        let _ = s.create_offer(now);
        let from = "198.51.100.2:50000".parse().unwrap();
        for (i, d) in rest.chunks(200).enumerate() {
            let t = now + Duration::from_millis(i as u64);
            let _ = s.handle_input(t, from, d);
            let _ = s.handle_timeout(t);
        }
    }
    while s.poll_transmit().is_some() {}
    while s.poll_event().is_some() {}
    let _ = s.play_audio(now + Duration::from_secs(1));
});

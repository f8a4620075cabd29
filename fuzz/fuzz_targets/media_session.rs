//! The media engine's two untrusted inputs: the far end's SDP (what a
//! signaling peer sends: an offer, or an answer to ours, either possibly
//! in a SIP phone's dialect) and datagrams on the media socket (what
//! anyone on the network sends), with either DTLS stack. Neither may
//! panic.
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
    let config = MediaConfig {
        sip_phone: mode & 4 != 0,
        ..MediaConfig::default()
    };
    let Ok(mut s) = MediaSession::new(now, config, local) else {
        return;
    };
    if mode & 3 == 0 {
        let sdp = String::from_utf8_lossy(rest);
        let _ = s.accept_offer(now, &VerifiedSdp::unauthenticated(&sdp));
    } else if mode & 3 == 2 {
        let _ = s.create_offer(now);
        let sdp = String::from_utf8_lossy(rest);
        let _ = s.accept_answer(now, &VerifiedSdp::unauthenticated(&sdp));
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

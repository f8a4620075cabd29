//! Whole calls between two media sessions over the simulated network:
//! ICE, DTLS-SRTP, Opus and the jitter buffer for real, with the relay's
//! own core in the path where a scenario asks for it. Alice sends a
//! 440 Hz tone and Bob 880 Hz; each side's speaker output is checked for
//! the other's tone.

mod sim;

use std::time::Duration;

use client_sdk::media::audio::{dominant_frequency, tone_share, Decoded, FRAME_SAMPLES};
use client_sdk::media::{MediaError, MediaEvent};
use sim::{Link, Net};
use wire::passport::PassportError;

/// The last `secs` seconds a phone heard.
fn tail(heard: &[i16], secs: usize) -> &[i16] {
    &heard[heard.len().saturating_sub(secs * 48_000)..]
}

fn candidates() -> impl Iterator<Item = f64> {
    (200..2000).step_by(20).map(f64::from)
}

fn call(net: &mut Net) {
    net.gather();
    net.negotiate(|s| s.to_string()).expect("negotiation");
    net.run_until(Duration::from_secs(10), Net::connected);
    assert!(net.connected(), "never connected");
}

#[test]
fn direct_call_carries_both_tones() {
    let mut net = Net::new(1, Link::default(), false, false);
    call(&mut net);
    net.run(Duration::from_secs(5));
    let (alice, bob) = (&net.phones[0], &net.phones[1]);
    let (f_bob, share_bob) = dominant_frequency(tail(&bob.heard, 3), candidates());
    let (f_alice, share_alice) = dominant_frequency(tail(&alice.heard, 3), candidates());
    assert_eq!(f_bob, 440.0, "Bob hears Alice's tone ({share_bob})");
    assert_eq!(f_alice, 880.0, "Alice hears Bob's tone ({share_alice})");
    assert!(share_bob > 0.9 && share_alice > 0.9);

    let stats = bob.session.stats(net.now);
    assert!(
        stats.setup.unwrap() < Duration::from_millis(500),
        "{stats:?}"
    );
    assert!(
        stats.first_audio.unwrap() < Duration::from_millis(700),
        "{stats:?}"
    );
    assert_eq!(stats.loss_in, 0.0);
    assert!(stats.packets_received > 200, "{stats:?}");
    assert!(stats.rtt.is_some(), "RTCP gave an RTT: {stats:?}");
    assert!(stats.mos > 4.2, "{stats:?}");
    assert!(stats.bitrate_in > 10_000, "{stats:?}");
    assert!(bob.events.iter().any(|e| matches!(e, MediaEvent::Stats(_))));
}

/// DTLS on OpenSSL (as for SIP phones) against str0m's own, in both
/// roles (the offerer is the DTLS server), and on both ends.
#[test]
fn openssl_dtls_interoperates_with_str0ms_own_in_either_role() {
    for sip_phone in [[true, false], [false, true], [true, true]] {
        let mut net = Net::with_sip_phones(1, sip_phone);
        call(&mut net);
        net.run(Duration::from_secs(3));
        let (alice, bob) = (&net.phones[0], &net.phones[1]);
        let (f_bob, _) = dominant_frequency(tail(&bob.heard, 2), candidates());
        let (f_alice, _) = dominant_frequency(tail(&alice.heard, 2), candidates());
        assert_eq!((f_bob, f_alice), (440.0, 880.0), "{sip_phone:?}");
    }
}

#[test]
fn relay_only_call_goes_through_turn_and_the_relay_sees_only_ciphertext() {
    let mut net = Net::new(2, Link::default(), true, true);
    net.gather();
    for p in &net.phones {
        let gathered = p
            .events
            .iter()
            .find(|e| matches!(e, MediaEvent::Gathered { .. }))
            .unwrap();
        let MediaEvent::Gathered {
            host,
            reflexive,
            relayed,
        } = gathered
        else {
            unreachable!()
        };
        assert_eq!((host, reflexive), (&None, &None));
        assert!(relayed.is_some());
    }
    net.negotiate(|s| {
        // Relay-only offers name no device address.
        assert!(
            !s.contains("192.0.2.1") && !s.contains("198.51.100.2"),
            "{s}"
        );
        s.to_string()
    })
    .unwrap();
    net.run_until(Duration::from_secs(10), Net::connected);
    assert!(net.connected());
    net.run(Duration::from_secs(5));
    let (f, share) = dominant_frequency(tail(&net.phones[1].heard, 3), candidates());
    assert_eq!(f, 440.0, "{share}");
    let (f, _) = dominant_frequency(tail(&net.phones[0].heard, 3), candidates());
    assert_eq!(f, 880.0);

    // Everything the relay carried is STUN (ICE checks), DTLS or SRTP
    // by RFC 7983's first-byte demultiplexing, and the RTP payloads it
    // saw do not decode to the tone: it cannot listen in.
    let mut rtp = 0;
    let mut dtls = 0;
    let mut dec = client_sdk::media::audio::AudioDecoder::new().unwrap();
    let mut pcm = Vec::new();
    let mut out = Vec::new();
    for p in &net.udp.relayed_payloads {
        match p[0] {
            0..=3 => {}
            20..=63 => dtls += 1,
            128..=191 => {
                if (200..=206).contains(&p[1]) {
                    continue; // SRTCP
                }
                rtp += 1;
                let cc = (p[0] & 0x0f) as usize;
                let body = &p[12 + 4 * cc..];
                if dec.decode(Some(body), false, &mut out).is_ok() {
                    pcm.extend_from_slice(&out);
                }
            }
            b => panic!("the relay carried a datagram starting with {b}: not STUN, DTLS or SRTP"),
        }
    }
    assert!(dtls > 0 && rtp > 400, "dtls {dtls}, rtp {rtp}");
    assert!(
        tone_share(&pcm, 440.0) < 0.1 && tone_share(&pcm, 880.0) < 0.1,
        "plaintext audio leaked through the relay"
    );
}

#[test]
fn relayed_set_up_is_not_held_up_by_the_first_lost_checks() {
    // A fast wire, so the ICE timers are what is left. Through relays the
    // callee's first checks are lost at the caller's relay (no permission
    // before the answer arrives); they are retried on the ICE RTO (100 ms
    // here, 250 ms by str0m's default), and ICE + DTLS follow at once.
    let link = Link {
        latency: Duration::from_micros(200),
        ..Link::default()
    };
    let mut net = Net::new(3, link, true, true);
    net.gather();
    let negotiated = net.now;
    net.negotiate(|s| s.to_string()).unwrap();
    net.run_until(Duration::from_secs(10), Net::connected);
    assert!(net.connected());
    let setup = net.now - negotiated;
    assert!(
        setup < Duration::from_millis(230),
        "ICE + DTLS took {setup:?}"
    );
}

#[test]
fn a_rewritten_fingerprint_stops_the_call() {
    let mut net = Net::new(3, Link::default(), false, false);
    net.gather();
    // A signaling server puts its own DTLS key in the offer.
    let err = net
        .negotiate(|s| {
            let mut out = String::new();
            for line in s.lines() {
                if let Some(fp) = line.strip_prefix("a=fingerprint:sha-256 ") {
                    let flipped = if fp.starts_with('A') { "B" } else { "A" };
                    out.push_str(&format!("a=fingerprint:sha-256 {flipped}{}\r\n", &fp[1..]));
                } else {
                    out.push_str(line);
                    out.push_str("\r\n");
                }
            }
            out
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            MediaError::Security(PassportError::FingerprintMismatch)
        ),
        "{err}"
    );
    assert!(err.to_string().starts_with("security:"), "{err}");
    // And nothing was set up: no media flows.
    net.run(Duration::from_secs(2));
    assert!(!net.phones[0].connected() && !net.phones[1].connected());
}

#[test]
fn twenty_percent_loss_is_repaired_by_fec_and_concealment() {
    let link = Link {
        loss: 0.2,
        ..Link::default()
    };
    let mut net = Net::new(4, link, false, false);
    call(&mut net);
    net.run(Duration::from_secs(10));
    let bob = &net.phones[1];
    let stats = bob.session.stats(net.now);
    let frames = bob.decoded.iter().filter(|d| d.is_some()).count();
    let fec = bob.count(Decoded::Fec);
    let concealed = bob.count(Decoded::Concealed);
    eprintln!(
        "20% loss: {frames} frames played, {} from packets, {fec} rebuilt by FEC, {concealed} concealed; loss_in {:.3}, bitrate out (Alice) {}, MOS {:.2}",
        bob.count(Decoded::Packet),
        stats.loss_in,
        net.phones[0].session.stats(net.now).bitrate_out,
        stats.mos
    );
    assert!((0.15..0.25).contains(&stats.loss_in), "{stats:?}");
    // FEC rebuilt a good part of the lost frames; the rest was concealed.
    assert!(fec > frames / 20, "{fec} of {frames}");
    // The tone is still what Bob hears.
    let (f, share) = dominant_frequency(tail(&bob.heard, 5), candidates());
    assert_eq!(f, 440.0);
    assert!(share > 0.6, "{share}");
    // Alice's encoder heard about the loss (RTCP) and moved off the top
    // rate toward FEC.
    let alice = net.phones[0].session.stats(net.now);
    // (one RTCP interval's figure: it wanders around the 20%)
    assert!(alice.loss_out > 0.05, "{alice:?}");
    assert!(alice.bitrate_out < 64_000, "{alice:?}");
    assert_eq!(bob.heard.len() % FRAME_SAMPLES, 0);
}

/// Frames (20 ms) from `from` on until the phone plays half a second of
/// audio from packets without a gap.
fn recovery_frames(phone: &sim::Phone, from: usize) -> usize {
    let d = &phone.decoded[from..];
    d.windows(25)
        .position(|w| w.iter().all(|x| *x == Some(Decoded::Packet)))
        .expect("audio never came back")
}

#[test]
fn a_network_change_restarts_ice_and_the_call_carries_on() {
    let mut net = Net::new(5, Link::default(), true, false);
    call(&mut net);
    net.run(Duration::from_secs(3));
    // Alice's phone leaves Wi-Fi for cellular: a new address.
    let moved = sim::addr("192.0.2.77:41000");
    let at = net.phones[0].decoded.len();
    let now = net.now;
    net.phones[0].addr = moved;
    net.phones[0].public = moved;
    let before = net.count_events(0, |e| matches!(e, MediaEvent::Gathered { .. }));
    net.phones[0].session.network_changed(now, moved).unwrap();
    net.run_until(Duration::from_secs(5), |n| {
        n.count_events(0, |e| matches!(e, MediaEvent::Gathered { .. })) > before
    });
    net.restart_ice(0).expect("ICE restart");
    net.run(Duration::from_secs(4));
    let bob = &net.phones[1];
    let gap = recovery_frames(bob, at);
    eprintln!("network change: Bob's audio back after {} ms", gap * 20);
    assert!(gap * 20 < 1500, "{gap} frames");
    let (f, _) = dominant_frequency(tail(&bob.heard, 2), candidates());
    assert_eq!(f, 440.0);
    let (f, _) = dominant_frequency(tail(&net.phones[0].heard, 2), candidates());
    assert_eq!(f, 880.0);
    // The same DTLS session: connected once, never torn down.
    assert_eq!(net.count_events(1, |e| *e == MediaEvent::Connected), 1);
}

#[test]
fn a_nat_rebinding_is_detected_and_repaired() {
    let mut net = Net::new(6, Link::default(), false, false);
    // Alice sits behind a NAT: her host address is private.
    net.phones[0].public = sim::addr("192.0.2.1:40000");
    let internal = sim::addr("10.0.0.2:40000");
    net.phones[0].addr = internal;
    net.phones[0].session =
        client_sdk::media::MediaSession::new(net.now, Default::default(), internal).unwrap();
    net.phones[0].events.clear();
    call(&mut net);
    net.run(Duration::from_secs(3));
    // The NAT drops its mapping and picks another port.
    let at = net.phones[0].decoded.len();
    net.phones[0].public = sim::addr("192.0.2.1:40999");
    let stalled = |n: &Net| n.count_events(0, |e| *e == MediaEvent::Stalled) > 0;
    net.run_until(Duration::from_secs(5), stalled);
    // Bob's media still goes to the old mapping: Alice hears nothing and
    // says so; what the app does then is restart ICE.
    assert!(stalled(&net), "the stall was not noticed");
    net.restart_ice(0).expect("ICE restart");
    net.run(Duration::from_secs(4));
    let alice = &net.phones[0];
    let gap = recovery_frames(alice, at);
    eprintln!("NAT rebinding: Alice's audio back after {} ms", gap * 20);
    // The stall threshold (1.5 s) plus the restart.
    assert!(gap * 20 < 2500, "{gap} frames");
    let (f, _) = dominant_frequency(tail(&alice.heard, 2), candidates());
    assert_eq!(f, 880.0);
    let (f, _) = dominant_frequency(tail(&net.phones[1].heard, 2), candidates());
    assert_eq!(f, 440.0);
}

#[test]
fn video_flows_both_ways_with_audio_and_the_camera_can_go_off() {
    let mut net = sim::Net::with_video(7, Link::default(), true, true, true);
    call(&mut net);
    net.run(Duration::from_secs(3));
    for i in 0..2 {
        let v = net.phones[i].session.stats(net.now).video;
        eprintln!("phone {i}: {v:?}");
        // 15 frames/s for ~3 s, each decoded to the pattern.
        assert!(v.frames_sent >= 40, "{v:?}");
        assert!(v.frames_decoded >= 40, "{v:?}");
        assert!(v.pattern_frames >= v.frames_decoded - 1, "{v:?}");
        // Only frames before the first key frame that got through (the
        // very first was sent before the far end's SRTP was ready).
        assert!(v.decode_errors <= 3, "{v:?}");
    }
    let (f, _) = dominant_frequency(tail(&net.phones[1].heard, 2), candidates());
    assert_eq!(f, 440.0, "audio is unaffected by video");
    // Camera off: Bob stops receiving frames; on again: they come back.
    let before = net.phones[1].session.stats(net.now).video.frames_decoded;
    net.phones[0].session.set_camera(false);
    net.run(Duration::from_secs(1));
    let off = net.phones[1].session.stats(net.now).video.frames_decoded;
    assert!(off - before <= 2, "{before} → {off}");
    net.phones[0].session.set_camera(true);
    net.run(Duration::from_secs(1));
    let on = net.phones[1].session.stats(net.now).video;
    assert!(on.frames_decoded >= off + 10, "{on:?}");
    assert!(video_is_pattern(&on));
}

fn video_is_pattern(v: &client_sdk::media::VideoStats) -> bool {
    v.last
        .is_some_and(|p| client_sdk::media::video::is_pattern(&p.quadrants))
}

//! A group call on loopback: devices with the SDK's group media session
//! join one room of the SFU through its HTTPS API with room tokens,
//! exchange sender keys (HPKE-sealed, signed), and each plays a tone of
//! its own. Three start; a fourth joins (everyone's key ratchets). Every
//! device then hears the other three's tones in its mix and never its
//! own, though the SFU that forwards every frame holds none of the keys.
//! A fifth joins the room with a valid room token (what a compromised
//! server could do) but is no member: it is sent every frame and reads
//! none. And eight at once, each hearing the other seven; four and eight
//! through a TURN relay with video, every pair heard and the videos of
//! each one's last-N seen; narrowing links; a lossy one.

mod group;

use std::time::Duration;

use client_sdk::group::SfuClient;
use client_sdk::group_keys::Member;
use client_sdk::media::video::is_pattern;
use client_sdk::turn::Transport;
use client_sdk::turn_stream::TlsTo;
use group::*;

/// Eight at once, each a quieter tone (seven are mixed): every device
/// hears the seven others, each about a seventh of what it hears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_devices_each_hear_the_other_seven() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = EIGHT;
    let mut devices = eight(&client).await;
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(4)).await;
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            match i == j {
                true => assert!(s < 0.02, "device {i} hears itself ({s:.3})"),
                false => assert!(
                    s > 0.05,
                    "device {i} hears {f} Hz at {s:.3}; {:?}",
                    d.session.stats()
                ),
            }
        }
    }
    assert_eq!(
        sfu.metrics
            .participants
            .load(std::sync::atomic::Ordering::Relaxed),
        8
    );
    sfu.shutdown();
}

#[tokio::test]
async fn four_devices_hear_each_other_end_to_end_through_the_sfu() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = [440.0, 660.0, 880.0, 1100.0];
    let mut devices = Vec::new();
    for (i, f) in freqs.iter().take(3).enumerate() {
        devices.push(Device::join(&client, i as u16 + 1, *f).await);
    }
    // The first three start the call: each sends its key to the others.
    let members: Vec<Member> = devices.iter().map(|d| d.member.clone()).collect();
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(3)).await;

    // A fourth joins: everyone ratchets and sends it the new key; it
    // sends its own to everyone.
    let mut late = Device::join(&client, 4, freqs[3]).await;
    let mut messages = Vec::new();
    for d in devices.iter_mut() {
        let identity = d.identity.clone();
        messages.push(
            d.session
                .keys()
                .join(&identity, late.member.clone())
                .unwrap(),
        );
    }
    let identity = late.identity.clone();
    messages.extend(late.session.keys().start(&identity, &members).unwrap());
    devices.push(late);
    deliver(&mut devices, messages);
    for d in devices.iter_mut() {
        d.heard.clear();
    }
    // The room's snoop: in the room, not in the call.
    devices.push(Device::join(&client, 9, 1500.0).await);
    run(&mut devices, Duration::from_secs(3)).await;
    let snoop = devices.pop().unwrap();
    assert!(snoop.session.is_connected());
    assert!(
        snoop.session.stats().undecryptable > 100,
        "{:?}",
        snoop.session.stats()
    );
    assert!(snoop.session.stats().heard.is_empty());
    assert!(snoop.heard.iter().all(|x| *x == 0), "the snoop heard sound");

    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        let shares: Vec<String> = freqs
            .iter()
            .map(|f| format!("{f} Hz {:.3}", share(d, *f, 2.0)))
            .collect();
        eprintln!("device {i} heard: {}", shares.join(", "));
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            if i == j {
                assert!(s < 0.02, "device {i} hears itself ({s:.3})");
            } else {
                assert!(
                    s > 0.08,
                    "device {i} hears {f} Hz at {s:.3}; stats {:?}\n{m}",
                    d.session.stats()
                );
            }
        }
        // The members' frames, and none of the snoop's (it has no member
        // key to send under that they would take).
        assert_eq!(d.session.stats().heard.len(), 3, "{:?}", d.session.stats());
    }
    sfu.shutdown();
}

/// The tones of three who also send video.
const THREE: [f64; 3] = [440.0, 660.0, 880.0];

/// The SFU, and three devices in its room with audio and video (two
/// video slots each), their keys exchanged.
async fn three_with_video() -> (sfu::runtime::Sfu, Vec<Device>) {
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let mut devices = Vec::new();
    for (i, f) in THREE.iter().enumerate() {
        devices.push(Device::join_with(&client, i as u16 + 1, *f, 0.3, 2).await);
    }
    start_keys(&mut devices);
    (sfu, devices)
}

/// Three with audio and video: each decodes the other two's test pattern
/// from its video slots, end to end encrypted like the audio, and still
/// hears their tones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_devices_see_each_others_video_end_to_end() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        let stats = d.session.stats();
        eprintln!(
            "device {i}: sent {} video frames ({} key), saw {:?}",
            stats.video_frames_out,
            stats.keyframes_out,
            stats
                .seen
                .iter()
                .map(|(k, s)| (*k, s.pictures, s.last.map(|p| (p.width, p.height))))
                .collect::<Vec<_>>()
        );
        assert!(stats.keyframes_out >= 1, "{stats:?}");
        for (j, f) in THREE.iter().enumerate().filter(|(j, _)| *j != i) {
            let seen = stats.seen.get(&(j as u16 + 1)).copied().unwrap_or_default();
            assert!(
                seen.pictures >= 20,
                "device {i} saw {} pictures of {j}; {stats:?}\n{m}",
                seen.pictures
            );
            let last = seen.last.unwrap();
            assert!(is_pattern(&last.quadrants), "{last:?}");
            assert!(share(d, *f, 2.0) > 0.2, "device {i} hears {f} Hz faintly");
        }
        assert!(!stats.seen.contains_key(&(i as u16 + 1)), "saw itself");
    }
    assert!(m.contains("parley_sfu_forwarded_packets_total{kind=\"video\"}"));
    sfu.shutdown();
}

/// Three send their camera in three simulcast layers. Each starts on the
/// lowest and moves up to the full size; then one's incoming link narrows
/// to 120 kb/s on the wire (less than the two others send it with its
/// headers: the test pattern's layers are small, the audio is not). The
/// SFU's estimate
/// for it drops and it is moved down to a smaller layer of each of the
/// others (at a key frame, so the picture goes on), while the other two
/// keep the full size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_link_narrows_is_moved_to_a_lower_layer() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let sizes = |d: &Device| -> Vec<(u16, Option<(usize, usize)>)> {
        d.session
            .stats()
            .seen
            .iter()
            .map(|(k, s)| (*k, s.last.map(|p| (p.width, p.height))))
            .collect()
    };
    for (i, d) in devices.iter().enumerate() {
        eprintln!("before: device {i} sees {:?}", sizes(d));
        assert!(
            sizes(d).iter().all(|(_, s)| *s == Some((320, 240))),
            "device {i} should see everyone at full size: {:?}",
            sizes(d)
        );
    }
    let switches = |sfu: &sfu::runtime::Sfu| {
        let mut m = String::new();
        sfu.metrics.render(&mut m);
        m.lines()
            .find_map(|l| l.strip_prefix("parley_sfu_layer_switches_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = switches(&sfu);
    devices[0].bottleneck = Some(Bottleneck::new(120_000));
    let pictures_then: Vec<u64> = devices[0]
        .session
        .stats()
        .seen
        .values()
        .map(|s| s.pictures)
        .collect();
    run(&mut devices, Duration::from_secs(8)).await;
    for (i, d) in devices.iter().enumerate() {
        let stats = d.session.stats();
        eprintln!(
            "after: device {i} sees {:?}; sends {} layers ({} changes), estimate {:?}",
            sizes(d),
            stats.layers_sent,
            stats.layer_changes,
            stats.send_estimate
        );
    }
    eprintln!(
        "offered to the narrow link: {} kb/s",
        devices[0].bottleneck.as_ref().unwrap().bytes * 8 / 8_000
    );
    let narrow = sizes(&devices[0]);
    assert!(
        narrow
            .iter()
            .all(|(_, s)| s.is_some_and(|(w, h)| w < 320 && h < 240)),
        "the narrow link still gets full size: {narrow:?}"
    );
    // The picture went on: frames of the smaller layer were decoded and
    // are the pattern.
    for (s, then) in devices[0].session.stats().seen.values().zip(pictures_then) {
        assert!(s.pictures > then + 10, "{} then {then}", s.pictures);
        assert!(is_pattern(&s.last.unwrap().quadrants));
    }
    // The two others still see each other at full size. (What they see
    // of device 0 is up to device 0: the SFU's feedback on its uplink
    // comes through its narrow link too, late, and its own estimate may
    // stop its top layer for a while.)
    for (i, d) in devices.iter().enumerate().skip(1) {
        let seen = sizes(d);
        assert!(
            seen.iter()
                .filter(|(k, _)| *k != 1)
                .all(|(_, s)| *s == Some((320, 240))),
            "device {i} no longer sees full size: {seen:?}"
        );
    }
    assert!(switches(&sfu) >= before + 2, "layer switches not counted");
    sfu.shutdown();
}

/// Three send their camera in three simulcast layers; then one's uplink
/// narrows to 110 kb/s on the wire, a little less than its audio and
/// three layers take with their headers (the test pattern's layers are
/// small). Its own estimate of the uplink falls and it stops its top
/// layer (or two); the SFU moves the others down to what it still sends,
/// and they go on seeing its pattern and hearing its tone. Once the link
/// is wide again, the estimate climbs and the top layer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_whose_uplink_narrows_stops_its_top_layer_and_is_still_seen() {
    let _alone = alone().await;
    let (sfu, mut devices) = three_with_video().await;
    run(&mut devices, Duration::from_secs(4)).await;
    let of_0 = |d: &Device| {
        d.session
            .stats()
            .seen
            .get(&1)
            .map(|s| (s.pictures, s.last.map(|p| (p.width, p.height))))
            .unwrap_or_default()
    };
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "before: sends {} layers ({:?} b/s), estimate {:?}; others see it at {:?}",
        stats.layers_sent,
        stats.layer_bitrates,
        stats.send_estimate,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert_eq!(stats.layers_sent, 3);
    assert!(devices[1..].iter().all(|d| of_0(d).1 == Some((320, 240))));

    // A deeper queue than the default, as on a phone's uplink (with drops
    // alone the estimate falls below what the audio and the lowest layer
    // need), but short of the listeners' jitter buffers' 400 ms ceiling:
    // audio that waited longer would come too late to play.
    devices[0].uplink = Some(Bottleneck {
        depth: Duration::from_millis(300),
        ..Bottleneck::new(110_000)
    });
    // Until it sends fewer layers and the others have moved down (15 s at
    // most), then the picture must go on.
    let down = |devices: &[Device]| {
        devices[0].session.stats().layers_sent < 3
            && devices[1..]
                .iter()
                .all(|d| of_0(d).1.is_some_and(|(w, h)| w < 320 && h < 240))
    };
    for _ in 0..15 {
        run(&mut devices, Duration::from_secs(1)).await;
        if down(&devices) {
            break;
        }
    }
    let then: Vec<u64> = devices[1..].iter().map(|d| of_0(d).0).collect();
    run(&mut devices, Duration::from_secs(3)).await;
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "narrow: sends {} layers, estimate {:?}, {} changes; others see it at {:?}",
        stats.layers_sent,
        stats.send_estimate,
        stats.layer_changes,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert!(down(&devices), "{stats:?}");
    assert!(stats.send_estimate.is_some_and(|e| e < 100_000));
    for (d, then) in devices[1..].iter().zip(then) {
        // Some 50 pictures in 3 s: at least 20.
        let pictures = of_0(d).0;
        assert!(
            pictures > then + 20,
            "the picture stalled: {pictures} then {then}"
        );
        let last = d.session.stats().seen[&1].last.unwrap();
        assert!(is_pattern(&last.quadrants));
        assert!(share(d, THREE[0], 2.0) > 0.2, "device 0 heard faintly");
    }

    // The estimate climbs back at its own pace (and the estimator probes
    // now and then): up to 30 s.
    devices[0].uplink = None;
    let full = |devices: &[Device]| {
        devices[0].session.stats().layers_sent == 3
            && devices[1..].iter().all(|d| of_0(d).1 == Some((320, 240)))
    };
    for _ in 0..30 {
        run(&mut devices, Duration::from_secs(1)).await;
        if full(&devices) {
            break;
        }
    }
    let stats = devices[0].session.stats().clone();
    eprintln!(
        "wide again: sends {} layers, estimate {:?}; others see it at {:?}",
        stats.layers_sent,
        stats.send_estimate,
        devices[1..].iter().map(of_0).collect::<Vec<_>>()
    );
    assert!(full(&devices), "the top layer did not come back: {stats:?}");
    sfu.shutdown();
}

/// A whole call through the relay: `n` devices reach the SFU only
/// through a TURN relay (as on a network that blocks UDP to it, or to
/// hide their addresses), each saying one of `freqs` at `amplitude` and
/// sending its camera in three simulcast layers, taking `video_slots`
/// videos. Every device hears every other's tone, and decodes the test
/// pattern of as many others as it has slots for (the SFU's last-N), each
/// in more than 20 pictures.
async fn whole_call_through_the_relay(freqs: &[f64], amplitude: f64, video_slots: usize) {
    whole_call_over(freqs, amplitude, video_slots, &[Transport::Udp]).await;
}

/// The same, device `i` reaching the relay over `over[i % over.len()]`;
/// the relay listens only on the transports used.
async fn whole_call_over(freqs: &[f64], amplitude: f64, video_slots: usize, over: &[Transport]) {
    let on = |t: Transport| match over.contains(&t) {
        true => vec!["127.0.0.1:0".parse().unwrap()],
        false => Vec::new(),
    };
    let (tls, relay_roots) = tls_on_loopback();
    let relay = stun_turn::runtime::Relay::start(
        stun_turn::Config {
            udp: on(Transport::Udp),
            tcp: on(Transport::Tcp),
            tls: on(Transport::Tls),
            relay_ipv4: Some([127, 0, 0, 1].into()),
            users: vec![("group".into(), "group-password".into())],
            // The SFU is on loopback here.
            allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
            workers: 1,
            ..stun_turn::Config::default()
        },
        Some(tls),
    )
    .unwrap();
    let via = |t: Transport| Via {
        relay: match t {
            Transport::Udp => relay.udp_addrs()[0],
            Transport::Tcp => relay.tcp_addrs()[0],
            Transport::Tls => relay.tls_addrs()[0],
        },
        transport: t,
        tls: Some(TlsTo::new(relay_roots.clone(), "127.0.0.1").unwrap()),
    };
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let mut devices = Vec::new();
    for (i, f) in freqs.iter().enumerate() {
        let tone = (*f, amplitude);
        let via = via(over[i % over.len()]);
        devices.push(Device::join_relayed(&client, i as u16 + 1, tone, video_slots, &via).await);
    }
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(5)).await;
    let mut m = String::new();
    sfu.metrics.render(&mut m);
    for (i, d) in devices.iter().enumerate() {
        assert!(d.session.is_connected(), "device {i} never connected");
        let stats = d.session.stats();
        let shares: Vec<String> = freqs
            .iter()
            .map(|f| format!("{f} Hz {:.3}", share(d, *f, 2.0)))
            .collect();
        eprintln!(
            "device {i}: heard {}; saw {:?}",
            shares.join(", "),
            stats
                .seen
                .iter()
                .map(|(k, s)| (*k, s.pictures, s.last.map(|p| (p.width, p.height))))
                .collect::<Vec<_>>()
        );
        for (j, f) in freqs.iter().enumerate() {
            let s = share(d, *f, 2.0);
            match i == j {
                true => assert!(s < 0.02, "device {i} hears itself ({s:.3})"),
                // A seventh of the mix at the least.
                false => assert!(s > 0.05, "device {i} hears device {j} at {s:.3}; {stats:?}"),
            }
        }
        assert!(!stats.seen.contains_key(&(i as u16 + 1)), "saw itself");
        let seen: Vec<_> = stats
            .seen
            .values()
            .filter(|s| s.pictures > 20 && s.last.is_some_and(|p| is_pattern(&p.quadrants)))
            .collect();
        assert!(
            seen.len() >= video_slots.min(freqs.len() - 1),
            "device {i} saw {} others' pictures; {stats:?}\n{m}",
            seen.len()
        );
    }
    assert!(m.contains("parley_sfu_forwarded_packets_total{kind=\"video\"}"));
    sfu.shutdown();
}

/// Four through the relay, each seeing and hearing the three others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_hear_and_see_each_other_through_the_relay() {
    let _alone = alone().await;
    whole_call_through_the_relay(&EIGHT[..4], 0.3, 3).await;
}

/// Four on a network that blocks UDP to the relay: two reach it over
/// TCP, two over TLS (the relay has no UDP listener at all), and each
/// still hears and sees the three others through the SFU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_reach_the_sfu_through_the_relay_over_tcp_and_tls() {
    let _alone = alone().await;
    whole_call_over(&EIGHT[..4], 0.3, 3, &[Transport::Tcp, Transport::Tls]).await;
}

/// Eight through the relay: each hears the seven others and sees four
/// (the SFU's last-N).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hear_each_other_and_see_four_through_the_relay() {
    let _alone = alone().await;
    whole_call_through_the_relay(&EIGHT, 0.1, 4).await;
}

/// Eight people; the first loses 10% of what reaches it (a bad network).
/// Its jitter buffer conceals the losses: it still hears all seven, a
/// little less cleanly than the others do. Prints each one's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_eight_on_a_lossy_network_still_hears_everyone() {
    let _alone = alone().await;
    let (sfu, roots) = sfu().await;
    let client = SfuClient::new(sfu.http, "127.0.0.1", roots).unwrap();
    let freqs = EIGHT;
    let mut devices = eight(&client).await;
    devices[0].loss = 0.10;
    start_keys(&mut devices);
    run(&mut devices, Duration::from_secs(4)).await;
    for (i, d) in devices.iter().enumerate() {
        let shares: Vec<f64> = freqs
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, f)| share(d, *f, 2.0))
            .collect();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        let min = shares.iter().copied().fold(f64::INFINITY, f64::min);
        let heard = &d.session.stats().heard;
        let concealed = heard.values().map(|h| h.concealed).sum::<f64>() / heard.len() as f64;
        let mos = heard.values().map(|h| h.mos).sum::<f64>() / heard.len() as f64;
        eprintln!(
            "device {i}{}: mean share of the others {mean:.3}, lowest {min:.3}, concealed \
             {:.1}%, MOS {mos:.2}",
            if i == 0 { " (10% loss)" } else { "" },
            concealed * 100.0
        );
        assert!(min > 0.05, "device {i} lost someone: {shares:?}");
    }
    sfu.shutdown();
}

//! The SFU on loopback with str0m peers as participants: each joins
//! through the HTTP API with a room token, connects (ICE lite, DTLS-SRTP),
//! publishes audio whose payload stands for SFrame ciphertext, and takes
//! the others' audio in its receive slots. What arrives is the payload as
//! sent, byte for byte; a participant that leaves is heard no more; the
//! room ends with its last participant. Video lost between the SFU and a
//! subscriber is repaired hop by hop (NACK, retransmission), and a
//! subscriber's picture loss reaches the publisher (PLI).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, KeyframeRequestKind, MediaKind, Mid};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{ExtensionValues, RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

const SECRET: &[u8] = b"room secret";

async fn sfu() -> sfu::runtime::Sfu {
    sfu_with(64).await
}

/// The SFU holding at most `max_total` participants in all its rooms.
async fn sfu_with(max_total: usize) -> sfu::runtime::Sfu {
    sfu_on(max_total, 1).await
}

/// The same with `workers` media loops.
async fn sfu_on(max_total: usize, workers: usize) -> sfu::runtime::Sfu {
    sfu::runtime::Sfu::start(sfu::runtime::Config {
        media: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
        workers,
        http: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        secret: SECRET.to_vec(),
        room: Default::default(),
        max_participants: 32,
        max_total,
        connect_within: Duration::from_secs(2),
    })
    .await
    .unwrap()
}

fn token(room: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    sfu::token::make(SECRET, room, now + 600)
}

/// One HTTP/1.1 exchange: status, headers (lower-case names), body.
async fn http(
    to: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, HashMap<String, String>, String) {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: sfu\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

/// Posts `offer` to join `room` with a good token.
async fn post_offer(
    sfu: &sfu::runtime::Sfu,
    room: &str,
    offer: &str,
) -> (u16, HashMap<String, String>, String) {
    let auth = format!("Bearer {}", token(room));
    http(
        sfu.http,
        "POST",
        &format!("/v1/rooms/{room}/participants"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/sdp"),
        ],
        offer,
    )
    .await
}

/// A participant: its peer connection, socket and what it heard, by slot
/// m-line: the payloads in arrival order.
struct Peer {
    rtc: Rtc,
    socket: UdpSocket,
    local: SocketAddr,
    publish: Mid,
    /// Its video m-line, if it sends video.
    camera: Option<Mid>,
    heard: HashMap<Mid, Vec<Vec<u8>>>,
    connected: bool,
    resource: String,
    seq: u64,
    video_seq: u64,
    /// Drops every n-th SRTP media packet that comes in, once connected.
    drop_every: Option<u64>,
    media_in: u64,
    dropped: u64,
    /// Key frames the SFU asked of it.
    keyframes_asked: u64,
    /// Where the SFU's answer said to send media.
    sfu_media: Vec<SocketAddr>,
}

impl Peer {
    /// Makes an offer (audio to send, `slots` audio slots to receive) and
    /// joins `room` with it.
    async fn join(sfu: &sfu::runtime::Sfu, room: &str, slots: usize) -> Peer {
        Peer::join_with(sfu, room, slots, 0).await
    }

    /// As [`Peer::join`], also sending video and taking `video_slots`.
    async fn join_with(
        sfu: &sfu::runtime::Sfu,
        room: &str,
        slots: usize,
        video_slots: usize,
    ) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
            .enable_h264(video_slots > 0)
            .set_extension(
                sfu::runtime::FRAME_MARKING_ID,
                str0m::rtp::Extension::FrameMarking,
            )
            .build(Instant::now());
        rtc.add_local_candidate(Candidate::host(local, Protocol::Udp).unwrap());
        let mut api = rtc.sdp_api();
        let publish = api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
        for _ in 0..slots {
            api.add_media(MediaKind::Audio, Direction::RecvOnly, None, None, None);
        }
        let camera = (video_slots > 0)
            .then(|| api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None));
        for _ in 0..video_slots {
            api.add_media(MediaKind::Video, Direction::RecvOnly, None, None, None);
        }
        let (offer, pending) = api.apply().unwrap();
        let (status, headers, body) = post_offer(sfu, room, &offer.to_sdp_string()).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(headers["content-type"], "application/sdp");
        let sfu_media = body
            .lines()
            .filter_map(|l| l.trim().strip_prefix("a="))
            .filter_map(|c| Candidate::from_sdp_string(c).ok())
            .map(|c| c.addr())
            .collect();
        let answer = SdpAnswer::from_sdp_string(&body).unwrap();
        rtc.sdp_api().accept_answer(pending, answer).unwrap();
        Peer {
            rtc,
            socket,
            local,
            publish,
            camera,
            heard: HashMap::new(),
            connected: false,
            resource: headers["location"].clone(),
            seq: 0,
            video_seq: 0,
            drop_every: None,
            media_in: 0,
            dropped: 0,
            keyframes_asked: 0,
            sfu_media,
        }
    }

    /// Reads what arrived, runs timers, sends what str0m sends (str0m
    /// wants a full drain after every input).
    fn step(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 2000];
        while let Ok((n, from)) = self.socket.try_recv_from(&mut buf) {
            // SRTP (not SRTCP, STUN or DTLS): RFC 7983's first byte, and
            // no RTCP packet type in the second.
            let media = n > 1 && (128..192).contains(&buf[0]) && !(192..224).contains(&buf[1]);
            if let (Some(every), true, true) = (self.drop_every, self.connected, media) {
                self.media_in += 1;
                if self.media_in % every == 0 {
                    self.dropped += 1;
                    continue;
                }
            }
            if let Ok(r) = Receive::new(Protocol::Udp, from, self.local, &buf[..n]) {
                self.rtc.handle_input(Input::Receive(now, r)).unwrap();
                self.drain();
            }
        }
        self.rtc.handle_input(Input::Timeout(now)).unwrap();
        self.drain();
    }

    fn drain(&mut self) {
        loop {
            match self.rtc.poll_output().unwrap() {
                Output::Timeout(_) => break,
                Output::Transmit(t) => {
                    let _ = self.socket.try_send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::KeyframeRequest(_)) => self.keyframes_asked += 1,
                Output::Event(Event::RtpPacket(p)) => {
                    let mid = self
                        .rtc
                        .direct_api()
                        .stream_rx(&p.header.ssrc)
                        .map(|s| s.mid());
                    if let Some(mid) = mid {
                        self.heard.entry(mid).or_default().push(p.payload.to_vec());
                    }
                }
                Output::Event(_) => {}
            }
        }
    }

    /// One 20 ms audio packet: `payload`, said loudly.
    fn say(&mut self, payload: &[u8]) {
        let pt = self.rtc.media(self.publish).unwrap().remote_pts()[0];
        let seq = self.seq;
        self.seq += 1;
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(self.publish, None).unwrap();
        let ext = ExtensionValues {
            audio_level: Some(-20),
            voice_activity: Some(true),
            mid: Some(self.publish),
            ..Default::default()
        };
        tx.write_rtp(
            RtpWrite::new(
                pt,
                SeqNo::from(seq),
                (seq * 960) as u32,
                Instant::now(),
                payload,
            )
            .ext_vals(ext),
        );
    }

    /// One video frame in one packet: `payload`, a key frame or not
    /// (frame marking), kept for retransmission.
    fn show(&mut self, payload: &[u8], key: bool) {
        let camera = self.camera.unwrap();
        let pt = self.rtc.media(camera).unwrap().remote_pts()[0];
        let seq = self.video_seq;
        self.video_seq += 1;
        let mut api = self.rtc.direct_api();
        let tx = api.stream_tx_by_mid(camera, None).unwrap();
        let mark: u32 = if key { 0xe0 } else { 0xc0 };
        let ext = ExtensionValues {
            frame_mark: Some(mark << 24),
            mid: Some(camera),
            ..Default::default()
        };
        tx.write_rtp(
            RtpWrite::new(
                pt,
                SeqNo::from(seq),
                (seq * 6000) as u32,
                Instant::now(),
                payload,
            )
            .marker(true)
            .ext_vals(ext)
            .nackable(true),
        );
    }

    /// Every payload heard in any slot.
    fn all_heard(&self) -> Vec<&Vec<u8>> {
        self.heard.values().flatten().collect()
    }
}

/// Runs every peer for `d`; `talk` speaks for peer i at each 20 ms tick.
async fn run(peers: &mut [Peer], d: Duration, mut talk: impl FnMut(usize, u64) -> Option<Vec<u8>>) {
    let end = Instant::now() + d;
    let mut tick = 0u64;
    let mut next_tick = Instant::now();
    while Instant::now() < end {
        for p in peers.iter_mut() {
            p.step();
        }
        if Instant::now() >= next_tick {
            next_tick += Duration::from_millis(20);
            for (i, p) in peers.iter_mut().enumerate() {
                if p.connected {
                    if let Some(payload) = talk(i, tick) {
                        p.say(&payload);
                    }
                }
            }
            tick += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn metric(sfu: &sfu::runtime::Sfu, name: &str) -> u64 {
    let mut out = String::new();
    sfu.metrics.render(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{out}"))
}

#[tokio::test]
async fn three_participants_hear_each_others_payloads_as_sent() {
    let sfu = sfu().await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(Peer::join(&sfu, "room-1-abcdefghijkl", 2).await);
    }
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 3);
    assert_eq!(metric(&sfu, "parley_sfu_rooms"), 1);
    let said = |i: usize, n: u64| format!("sframe ciphertext of {i}, frame {n}").into_bytes();
    run(&mut peers, Duration::from_secs(3), |i, n| Some(said(i, n))).await;
    for (i, p) in peers.iter().enumerate() {
        assert!(p.connected, "peer {i} never connected");
        let heard = p.all_heard();
        for j in (0..3).filter(|j| *j != i) {
            let from_j = heard
                .iter()
                .filter(|h| h.starts_with(format!("sframe ciphertext of {j},").as_bytes()))
                .count();
            assert!(from_j >= 20, "peer {i} heard {from_j} packets of {j}");
        }
        assert!(
            !heard
                .iter()
                .any(|h| h.starts_with(format!("sframe ciphertext of {i},").as_bytes())),
            "peer {i} was sent its own audio"
        );
        // Byte for byte: every payload is one that was said.
        assert!(heard.iter().all(|h| {
            let s = String::from_utf8_lossy(h);
            s.starts_with("sframe ciphertext of ") && s.contains(", frame ")
        }));
        // Each other speaker in a slot of its own.
        assert_eq!(p.heard.len(), 2, "slots used: {:?}", p.heard.keys());
    }
    assert!(metric(&sfu, "parley_sfu_forwarded_packets_total{kind=\"audio\"}") > 100);
    // The room's bitrate, under a digest of its id: never the id itself,
    // which opens the room.
    let label = sfu::runtime::room_label("room-1-abcdefghijkl");
    let bps = metric(
        &sfu,
        &format!("parley_sfu_room_bitrate_bps{{room=\"{label}\"}}"),
    );
    // Three each sending ~36 bytes 50 times a second to two others:
    // about 86 kb/s.
    assert!((40_000..200_000).contains(&bps), "{bps} b/s");
    let mut text = String::new();
    sfu.metrics.render(&mut text);
    assert!(!text.contains("room-1-abcdefghijkl"));

    // Peer 2 leaves: the others hear it no more.
    let auth = format!("Bearer {}", token("room-1-abcdefghijkl"));
    let (status, _, _) = http(
        sfu.http,
        "DELETE",
        &peers[2].resource.clone(),
        &[("Authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 2);
    let left = peers.pop().unwrap();
    for p in peers.iter_mut() {
        p.heard.clear();
    }
    run(&mut peers, Duration::from_millis(600), |i, n| {
        Some(said(i, n))
    })
    .await;
    for p in &peers {
        assert!(!p.all_heard().is_empty());
        assert!(!p
            .all_heard()
            .iter()
            .any(|h| h.starts_with(b"sframe ciphertext of 2,")));
    }
    drop(left);

    // The last two leave: the room ends.
    for p in &peers {
        let (status, _, _) = http(
            sfu.http,
            "DELETE",
            &p.resource,
            &[("Authorization", &auth)],
            "",
        )
        .await;
        assert_eq!(status, 204);
    }
    assert_eq!(metric(&sfu, "parley_sfu_rooms"), 0);
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 0);
    sfu.shutdown();
}

/// Video from one publisher to two subscribers, one of which loses every
/// tenth media packet on its hop from the SFU. str0m at the subscriber
/// asks for what is missing (NACK) and the SFU sends it again from its
/// own cache: every frame arrives, though the publisher never heard of
/// the loss. (str0m caps retransmissions at 15% of what a stream sends,
/// so a loss much above that is only partly repaired.) The subscriber then asks for a picture (PLI): the SFU asks
/// the publisher for a key frame.
#[tokio::test]
async fn lost_video_is_repaired_hop_by_hop_and_a_picture_loss_reaches_the_publisher() {
    let sfu = sfu().await;
    let room = "room-nack-abcdefghijkl";
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(Peer::join_with(&sfu, room, 2, 1).await);
    }
    peers[2].drop_every = Some(10);
    let frame = |n: u64| format!("sealed video frame {n}").into_bytes();
    // Peer 0 shows a frame every 20 ms, a key frame first and every 50th;
    // the others only listen. The first 150 are checked (a loss is
    // noticed when a later packet comes).
    let end = Instant::now() + Duration::from_secs(6);
    let (mut shown, mut next) = (0u64, Instant::now());
    while Instant::now() < end {
        for p in peers.iter_mut() {
            p.step();
        }
        if Instant::now() >= next && peers.iter().all(|p| p.connected) {
            next = Instant::now() + Duration::from_millis(20);
            peers[0].show(&frame(shown), shown % 50 == 0);
            shown += 1;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(shown >= 170, "only {shown} frames shown");
    let slot_payloads = |p: &Peer| -> Vec<Vec<u8>> {
        let mut v: Vec<Vec<u8>> = p
            .heard
            .values()
            .flatten()
            .filter(|h| h.starts_with(b"sealed video frame "))
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let clean = slot_payloads(&peers[1]);
    let lossy = slot_payloads(&peers[2]);
    assert!(peers[2].dropped >= 15, "dropped only {}", peers[2].dropped);
    assert!(
        (0..150).all(|n| clean.contains(&frame(n))),
        "the clean subscriber missed frames"
    );
    let missing: Vec<u64> = (0..150).filter(|n| !lossy.contains(&frame(*n))).collect();
    assert!(
        missing.is_empty(),
        "frames {missing:?} never reached the lossy subscriber ({} packets dropped)",
        peers[2].dropped
    );
    assert!(metric(&sfu, "parley_sfu_forwarded_packets_total{kind=\"video\"}") >= 300);

    // Picture loss at peer 1: a PLI on its video slot reaches peer 0.
    let asked = peers[0].keyframes_asked;
    let slot = peers[1]
        .heard
        .keys()
        .copied()
        .find(|m| {
            peers[1]
                .rtc
                .media(*m)
                .is_some_and(|m| m.kind() == MediaKind::Video)
        })
        .unwrap();
    let ssrc = {
        let mut api = peers[1].rtc.direct_api();
        api.stream_rx_by_mid(slot, None).unwrap().ssrc()
    };
    peers[1]
        .rtc
        .direct_api()
        .stream_rx(&ssrc)
        .unwrap()
        .request_keyframe(KeyframeRequestKind::Pli);
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end && peers[0].keyframes_asked == asked {
        for p in peers.iter_mut() {
            p.step();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        peers[0].keyframes_asked > asked,
        "the publisher was never asked for a key frame"
    );
    sfu.shutdown();
}

#[tokio::test]
async fn joins_without_a_valid_token_or_offer_are_refused() {
    let sfu = sfu().await;
    let path = "/v1/rooms/room-1-abcdefghijkl/participants";
    let sdp = ("Content-Type", "application/sdp");
    let (status, _, body) = http(sfu.http, "POST", path, &[sdp], "v=0").await;
    assert_eq!(status, 401, "{body}");
    let other = format!("Bearer {}", token("room-2-abcdefghijkl"));
    let (status, _, body) = http(
        sfu.http,
        "POST",
        path,
        &[("Authorization", &other), sdp],
        "v=0",
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not for this room"), "{body}");
    let expired = format!(
        "Bearer {}",
        sfu::token::make(SECRET, "room-1-abcdefghijkl", 1)
    );
    let (status, _, _) = http(
        sfu.http,
        "POST",
        path,
        &[("Authorization", &expired), sdp],
        "v=0",
    )
    .await;
    assert_eq!(status, 403);
    let good = format!("Bearer {}", token("room-1-abcdefghijkl"));
    let (status, _, body) = http(
        sfu.http,
        "POST",
        path,
        &[("Authorization", &good), sdp],
        "v=0",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = http(
        sfu.http,
        "POST",
        path,
        &[("Authorization", &good), ("Content-Type", "text/plain")],
        "v=0",
    )
    .await;
    assert_eq!(status, 415);
    let (status, _, _) = http(
        sfu.http,
        "DELETE",
        "/v1/rooms/room-1-abcdefghijkl/participants/0-nobody",
        &[("Authorization", &good)],
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(metric(&sfu, "parley_sfu_joins_refused_total"), 5);
    sfu.shutdown();
}

/// Someone with a room token posts an offer and never comes: the SFU
/// lets go of it after its connect window.
#[tokio::test]
async fn a_participant_that_never_connects_is_dropped() {
    let sfu = sfu().await;
    let mut rtc = RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .build(Instant::now());
    let local: SocketAddr = "127.0.0.1:9".parse().unwrap();
    rtc.add_local_candidate(Candidate::host(local, Protocol::Udp).unwrap());
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    let (offer, _) = api.apply().unwrap();
    let (status, _, _) = post_offer(&sfu, "room-1-abcdefghijkl", &offer.to_sdp_string()).await;
    assert_eq!(status, 201);
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&sfu, "parley_sfu_participants") != 0 {
        assert!(Instant::now() < deadline, "still held after 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&sfu, "parley_sfu_rooms"), 0);
    sfu.shutdown();
}

/// Past its total, the SFU refuses joins with 503 and Retry-After, in
/// any room, and counts them.
#[tokio::test]
async fn a_full_sfu_says_when_to_come_back() {
    let sfu = sfu_with(2).await;
    let offer = offer_of_one();
    for room in ["room-1-abcdefghijkl", "room-2-abcdefghijkl"] {
        assert_eq!(post_offer(&sfu, room, &offer).await.0, 201);
    }
    let (status, headers, body) = post_offer(&sfu, "room-3-abcdefghijkl", &offer).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["retry-after"], "30");
    assert!(body.contains("the SFU is full"), "{body}");
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 2);
    assert_eq!(metric(&sfu, "parley_sfu_joins_refused_total"), 1);
    sfu.shutdown();
}

/// With two media loops, rooms spread over them: a room's participants
/// are sent to its loop's port, media flows in a room on each, the gauges
/// count both loops, and the limit on everyone holds across them.
#[tokio::test]
async fn rooms_spread_over_media_loops_and_counts_and_limits_span_them() {
    let sfu = sfu_on(5, 2).await;
    assert_eq!(sfu.media_all.len(), 2);
    assert_ne!(sfu.media_all[0], sfu.media_all[1]);
    // A room on each loop.
    let rooms: Vec<String> = (0..2)
        .map(|w| {
            (0..1000)
                .map(|i| format!("room-{i}-abcdefghijkl"))
                .find(|r| sfu::runtime::worker_of(r, 2) == w)
                .unwrap()
        })
        .collect();
    let mut peers = Vec::new();
    for room in &rooms {
        for _ in 0..2 {
            peers.push(Peer::join(&sfu, room, 1).await);
        }
    }
    for (i, p) in peers.iter().enumerate() {
        assert_eq!(p.sfu_media, vec![sfu.media_all[i / 2]], "peer {i}");
    }
    assert_eq!(metric(&sfu, "parley_sfu_participants"), 4);
    assert_eq!(metric(&sfu, "parley_sfu_rooms"), 2);
    let said = |i: usize, n: u64| format!("sframe ciphertext of {i}, frame {n}").into_bytes();
    run(&mut peers, Duration::from_secs(2), |i, n| Some(said(i, n))).await;
    for (i, p) in peers.iter().enumerate() {
        let from = |j: usize| {
            p.all_heard()
                .iter()
                .filter(|h| h.starts_with(format!("sframe ciphertext of {j},").as_bytes()))
                .count()
        };
        // Its room-mate, and nobody from the other room.
        let mate = i ^ 1;
        assert!(from(mate) >= 20, "peer {i} heard {} of {mate}", from(mate));
        let others = if i < 2 { [2, 3] } else { [0, 1] };
        assert_eq!(others.map(from), [0, 0], "peer {i} heard the other room");
    }
    // Five at most in all: one more joins, then the next is refused,
    // whichever loop its room is on.
    let p = Peer::join(&sfu, &rooms[0], 1).await;
    let (status, headers, _) = post_offer(&sfu, &rooms[1], &offer_of_one()).await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "30");
    drop(p);
    sfu.shutdown();
}

/// An offer that sends audio and takes nothing.
fn offer_of_one() -> String {
    let mut rtc = RtcConfig::new()
        .set_rtp_mode(true)
        .clear_codecs()
        .enable_opus(true, false)
        .build(Instant::now());
    rtc.add_local_candidate(
        Candidate::host("127.0.0.1:9".parse().unwrap(), Protocol::Udp).unwrap(),
    );
    let mut api = rtc.sdp_api();
    api.add_media(MediaKind::Audio, Direction::SendOnly, None, None, None);
    api.apply().unwrap().0.to_sdp_string()
}

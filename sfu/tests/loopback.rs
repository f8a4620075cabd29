//! The SFU on loopback with str0m peers as participants: each joins
//! through the HTTP API with a room token, connects (ICE lite, DTLS-SRTP),
//! publishes audio whose payload stands for SFrame ciphertext, and takes
//! the others' audio in its receive slots. What arrives is the payload as
//! sent, byte for byte; a participant that leaves is heard no more; the
//! room ends with its last participant.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use str0m::change::SdpAnswer;
use str0m::media::{Direction, MediaKind, Mid};
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
    sfu::runtime::Sfu::start(sfu::runtime::Config {
        media: "127.0.0.1:0".parse().unwrap(),
        advertise: None,
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
    heard: HashMap<Mid, Vec<Vec<u8>>>,
    connected: bool,
    resource: String,
    seq: u64,
}

impl Peer {
    /// Makes an offer (audio to send, `slots` audio slots to receive) and
    /// joins `room` with it.
    async fn join(sfu: &sfu::runtime::Sfu, room: &str, slots: usize) -> Peer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let local = socket.local_addr().unwrap();
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_opus(true, false)
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
        let (offer, pending) = api.apply().unwrap();
        let (status, headers, body) = post_offer(sfu, room, &offer.to_sdp_string()).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(headers["content-type"], "application/sdp");
        let answer = SdpAnswer::from_sdp_string(&body).unwrap();
        rtc.sdp_api().accept_answer(pending, answer).unwrap();
        Peer {
            rtc,
            socket,
            local,
            publish,
            heard: HashMap::new(),
            connected: false,
            resource: headers["location"].clone(),
            seq: 0,
        }
    }

    /// Reads what arrived, runs timers, sends what str0m sends (str0m
    /// wants a full drain after every input).
    fn step(&mut self) {
        let now = Instant::now();
        let mut buf = vec![0u8; 2000];
        while let Ok((n, from)) = self.socket.try_recv_from(&mut buf) {
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
    let offer = api.apply().unwrap().0.to_sdp_string();
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

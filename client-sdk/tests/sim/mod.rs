//! A simulated network for whole calls: two media sessions, our TURN
//! server's core, seeded loss and delay, and hand-moved time. Every
//! datagram crosses the network as bytes, with addresses, so ICE, DTLS,
//! SRTP and the relay run exactly as they would on sockets.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use client_sdk::media::audio::{Decoded, Tone, FRAME_SAMPLES};
use client_sdk::media::video::{self, TestPattern};
use client_sdk::media::{MediaConfig, MediaEvent, MediaSession, VerifiedSdp};
use client_sdk::turn;
use stun_turn::core::{ClientAddr, ClientOutcome, PeerOutcome, RelayId, Server, Shared, Transport};
use wire::keys::SigningKey;
use wire::passport::{self, Claims};

pub const TURN: &str = "203.0.113.10:3478";
pub const RELAY_IP: &str = "203.0.113.10";
/// A second relay, for calls that move when the first dies.
pub const TURN2: &str = "203.0.113.20:3478";
pub const ALICE: &str = "192.0.2.1:40000";
pub const BOB: &str = "198.51.100.2:50000";
const TICK: Duration = Duration::from_millis(20);

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Loss and delay on every hop.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub latency: Duration,
    /// Extra delay, uniform in 0..jitter.
    pub jitter: Duration,
    pub loss: f64,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            latency: Duration::from_millis(15),
            jitter: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

/// splitmix64: deterministic randomness from a seed.
pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One device in a call.
pub struct Phone {
    /// The session's own socket address.
    pub addr: SocketAddr,
    /// Where the world sees it: `addr` unless behind a NAT.
    pub public: SocketAddr,
    pub session: MediaSession,
    pub key: SigningKey,
    pub tone: Tone,
    /// Everything played out, and how each frame was made.
    pub heard: Vec<i16>,
    pub decoded: Vec<Option<Decoded>>,
    pub events: Vec<MediaEvent>,
}

impl Phone {
    pub fn connected(&self) -> bool {
        self.events.contains(&MediaEvent::Connected)
    }
    pub fn count(&self, how: Decoded) -> usize {
        self.decoded.iter().filter(|d| **d == Some(how)).count()
    }
}

pub struct Relay {
    /// Where clients reach it.
    pub at: SocketAddr,
    /// Killed: everything to or from it is lost.
    pub dead: bool,
    pub server: Server,
    pub by_addr: HashMap<SocketAddr, RelayId>,
    pub addr_of: HashMap<RelayId, SocketAddr>,
    next_port: u16,
}

/// The wire: datagrams in flight with loss and delay, and the TURN
/// server's core at [`TURN`] with its relayed addresses.
pub struct Udp {
    pub now: Instant,
    pub link: Link,
    rng: Rng,
    seq: u64,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, (SocketAddr, SocketAddr, Vec<u8>)>,
    pub relays: Vec<Relay>,
    /// What the relays forwarded between the devices (peer-side payloads).
    pub relayed_payloads: Vec<Vec<u8>>,
}

impl Udp {
    /// `users`: TURN accounts (user, password) on a relay at [`TURN`].
    pub fn new(seed: u64, link: Link, now: Instant, users: Option<Vec<(String, String)>>) -> Udp {
        match users {
            Some(users) => Udp::with_relays(seed, link, now, users, &[TURN]),
            None => Udp::with_relays(seed, link, now, Vec::new(), &[]),
        }
    }

    /// Relays at each of `servers`, all with the accounts `users`.
    pub fn with_relays(
        seed: u64,
        link: Link,
        now: Instant,
        users: Vec<(String, String)>,
        servers: &[&str],
    ) -> Udp {
        let relays = servers.iter().map(|at| {
            let at = addr(at);
            let config = stun_turn::Config {
                realm: "parley".into(),
                udp: vec![at],
                relay_ipv4: Some(at.ip()),
                users: users.clone(),
                // The simulated devices and relay live in documentation
                // ranges, which the relay's default policy refuses.
                allow_peers: vec![
                    "192.0.2.0/24".parse().unwrap(),
                    "198.51.100.0/24".parse().unwrap(),
                    "203.0.113.0/24".parse().unwrap(),
                ],
                ..stun_turn::Config::default()
            };
            let shared = Shared::new(config, [9; 32], vec![at], now, unix_now());
            Relay {
                at,
                dead: false,
                server: Server::new(
                    shared,
                    Arc::new(stun_turn::metrics::Metrics::default()),
                    0,
                    1,
                    seed,
                ),
                by_addr: HashMap::new(),
                addr_of: HashMap::new(),
                next_port: 49_152,
            }
        });
        Udp {
            now,
            link,
            rng: Rng(seed),
            seq: 0,
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            relays: relays.collect(),
            relayed_payloads: Vec::new(),
        }
    }

    pub fn send(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        if self.rng.unit() < self.link.loss {
            return;
        }
        let extra = self.link.jitter.mul_f64(self.rng.unit());
        let at = self.now + self.link.latency + extra;
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq)));
        self.in_flight.insert(self.seq, (from, to, data));
    }

    /// The relay at `at` dies (as with `kill -9`): from now on it takes
    /// and sends nothing.
    pub fn kill_relay(&mut self, at: &str) {
        let at = addr(at);
        for r in self.relays.iter_mut().filter(|r| r.at == at) {
            r.dead = true;
        }
    }

    /// When the wire or a relay next has something to do.
    pub fn next_time(&self) -> Option<Instant> {
        let q = self.queue.peek().map(|Reverse((t, _))| *t);
        self.relays
            .iter()
            .filter(|r| !r.dead)
            .filter_map(|r| r.server.poll_timeout())
            .chain(q)
            .min()
    }

    /// Runs the relay and hands back the datagrams that arrive at an
    /// endpoint by `now`: (from, to, data).
    pub fn due(&mut self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let now = self.now;
        for r in self.relays.iter_mut().filter(|r| !r.dead) {
            if r.server.poll_timeout().is_some_and(|t| t <= now) {
                r.server.handle_timeout(now);
            }
        }
        self.flush_relays();
        let mut out = Vec::new();
        while let Some(Reverse((t, id))) = self.queue.peek().copied() {
            if t > now {
                break;
            }
            self.queue.pop();
            let (from, to, data) = self.in_flight.remove(&id).unwrap();
            if !self.deliver_to_relay(from, to, &data) {
                out.push((from, to, data));
            }
        }
        out
    }

    /// Sends what the relays' cores queued.
    fn flush_relays(&mut self) {
        let mut sends = Vec::new();
        for r in self.relays.iter_mut().filter(|r| !r.dead) {
            while let Some(e) = r.server.poll_event() {
                if let stun_turn::core::Event::BindRelay { relay, addr, .. } = e {
                    let bound = SocketAddr::new(addr.ip(), r.next_port);
                    r.next_port += 1;
                    r.by_addr.insert(bound, relay);
                    r.addr_of.insert(relay, bound);
                    r.server.handle_relay_bound(relay, Some(bound), self.now);
                }
            }
            while let Some(t) = r.server.poll_transmit() {
                sends.push((t.from, t.to.remote, t.bytes));
            }
        }
        for (from, to, data) in sends {
            self.send(from, to, data);
        }
    }

    /// Delivers to a relay if it is for one (a dead relay loses it).
    fn deliver_to_relay(&mut self, from: SocketAddr, to: SocketAddr, data: &[u8]) -> bool {
        let now = self.now;
        let Some(r) = self
            .relays
            .iter_mut()
            .find(|r| r.at == to || r.by_addr.contains_key(&to))
        else {
            return false;
        };
        if r.dead {
            return true;
        }
        let at = r.at;
        let mut out = Vec::new();
        if to == at {
            let client = ClientAddr {
                transport: Transport::Udp,
                remote: from,
                local: to,
            };
            if let ClientOutcome::Forward {
                relay,
                peer,
                payload,
            } = r.server.handle_client_input(client, data, now)
            {
                if let Some(src) = r.addr_of.get(&relay) {
                    self.relayed_payloads.push(data[payload.clone()].to_vec());
                    out.push((*src, peer, data[payload].to_vec()));
                }
            }
        } else if let Some(&relay) = r.by_addr.get(&to) {
            match r.server.handle_peer_input(relay, from, data, now) {
                PeerOutcome::Drop => {}
                PeerOutcome::ChannelData { to, channel } => {
                    let mut f =
                        stun_turn::channel_data::encode_header(channel, data.len()).to_vec();
                    f.extend_from_slice(data);
                    out.push((at, to.remote, f));
                }
                PeerOutcome::Indication { to, message } => {
                    out.push((at, to.remote, message.to_vec()));
                }
            }
        } else {
            return false;
        }
        for (from, to, data) in out {
            self.send(from, to, data);
        }
        self.flush_relays();
        true
    }
}

pub struct Net {
    pub now: Instant,
    pub udp: Udp,
    pub phones: Vec<Phone>,
    next_tick: Instant,
    pub audio_on: bool,
    /// Next video frame time and each phone's camera.
    video: Option<(Instant, TestPattern, TestPattern)>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl Net {
    /// Alice and Bob; with `with_turn`, both get the relay and its
    /// credentials; `relay_only` keeps their own addresses out of the SDP.
    pub fn new(seed: u64, link: Link, with_turn: bool, relay_only: bool) -> Net {
        Net::with_video(seed, link, with_turn, relay_only, false)
    }

    /// As [`Net::new`], with H.264 video (the test pattern) both ways.
    pub fn with_video(
        seed: u64,
        link: Link,
        with_turn: bool,
        relay_only: bool,
        video: bool,
    ) -> Net {
        Net::build(seed, link, with_turn, relay_only, video, [false, false])
    }

    /// As [`Net::new`], Alice and/or Bob running DTLS as for a SIP phone
    /// (on OpenSSL rather than str0m's own).
    pub fn with_sip_phones(seed: u64, sip_phone: [bool; 2]) -> Net {
        Net::build(seed, Link::default(), false, false, false, sip_phone)
    }

    fn build(
        seed: u64,
        link: Link,
        with_turn: bool,
        relay_only: bool,
        video: bool,
        sip_phone: [bool; 2],
    ) -> Net {
        let now = Instant::now();
        let users = with_turn.then(|| {
            vec![
                ("alice".to_string(), "alice-pass".to_string()),
                ("bob".to_string(), "bob-pass".to_string()),
            ]
        });
        let mut net = Net {
            now,
            udp: Udp::new(seed, link, now, users),
            phones: Vec::new(),
            next_tick: now,
            audio_on: true,
            video: video.then(|| (now, TestPattern::default(), TestPattern::default())),
        };
        for (i, (a, user, freq)) in [(ALICE, "alice", 440.0), (BOB, "bob", 880.0)]
            .into_iter()
            .enumerate()
        {
            let config = MediaConfig {
                turn: with_turn
                    .then(|| turn::Config::new(addr(TURN), user, &format!("{user}-pass"))),
                relay_only,
                seed: seed + i as u64,
                video,
                sip_phone: sip_phone[i],
                ..MediaConfig::default()
            };
            let session = MediaSession::new(now, config, addr(a)).unwrap();
            net.phones.push(Phone {
                addr: addr(a),
                public: addr(a),
                session,
                key: SigningKey::generate(),
                tone: Tone::new(freq, 0.3),
                heard: Vec::new(),
                decoded: Vec::new(),
                events: Vec::new(),
            });
        }
        net.flush();
        net
    }

    /// Runs until every phone has gathered its candidates.
    pub fn gather(&mut self) {
        let gathered = |p: &Phone| {
            p.events
                .iter()
                .any(|e| matches!(e, MediaEvent::Gathered { .. }))
        };
        self.run_until(Duration::from_secs(5), |n| n.phones.iter().all(gathered));
        assert!(self.phones.iter().all(gathered), "gathering never ended");
    }

    /// The Identity header phone `i` signs over its SDP's fingerprints.
    pub fn identity(&mut self, i: usize) -> String {
        let p = &mut self.phones[i];
        let claims = Claims {
            orig: if i == 0 {
                "mailto:alice@example.com"
            } else {
                "mailto:bob@example.com"
            }
            .into(),
            dest: vec![if i == 0 {
                "mailto:bob@example.com"
            } else {
                "mailto:alice@example.com"
            }
            .into()],
            iat: unix_now(),
            mky: p.session.local_fingerprints(),
        };
        passport::identity_header(&claims, &p.key, "https://ids.example/v1/device")
    }

    /// Offer from Alice, answer from Bob, each side verifying the other's
    /// PASSporT; `tamper` may rewrite the SDP on the way, as a malicious
    /// signaling server would.
    pub fn negotiate(
        &mut self,
        tamper: impl Fn(&str) -> String,
    ) -> Result<(), client_sdk::media::MediaError> {
        let offer = self.phones[0].session.create_offer(self.now)?;
        self.exchange(0, offer, tamper)
    }

    /// Phone `from` restarts ICE (a re-INVITE) and the other answers.
    pub fn restart_ice(&mut self, from: usize) -> Result<(), client_sdk::media::MediaError> {
        let offer = self.phones[from].session.create_restart_offer(self.now)?;
        self.exchange(from, offer, |s| s.to_string())
    }

    fn exchange(
        &mut self,
        from: usize,
        offer: String,
        tamper: impl Fn(&str) -> String,
    ) -> Result<(), client_sdk::media::MediaError> {
        let now = self.now;
        let to = 1 - from;
        let offer_identity = self.identity(from);
        let offer = tamper(&offer);
        let key = self.phones[from].key.public();
        let verified = VerifiedSdp::verify(&offer, &offer_identity, &key, unix_now())?;
        let answer = self.phones[to].session.accept_offer(now, &verified)?;
        let answer_identity = self.identity(to);
        let key = self.phones[to].key.public();
        let verified = VerifiedSdp::verify(&answer, &answer_identity, &key, unix_now())?;
        self.phones[from].session.accept_answer(now, &verified)?;
        self.flush();
        Ok(())
    }

    /// Events of phone `i` of this kind since the start.
    pub fn count_events(&self, i: usize, f: impl Fn(&MediaEvent) -> bool) -> usize {
        self.phones[i].events.iter().filter(|e| f(e)).count()
    }

    pub fn connected(&self) -> bool {
        self.phones.iter().all(Phone::connected)
    }

    /// Moves time forward by `d`, stopping early when `done` holds.
    pub fn run_until(&mut self, d: Duration, done: impl Fn(&Net) -> bool) {
        let until = self.now + d;
        for _ in 0..10_000_000 {
            if done(self) {
                return;
            }
            let mut next = until;
            if let Some(t) = self.udp.next_time() {
                next = next.min(t);
            }
            for p in &self.phones {
                next = next.min(p.session.poll_timeout());
            }
            if self.audio_on {
                next = next.min(self.next_tick);
            }
            if let Some((t, _, _)) = &self.video {
                next = next.min(*t);
            }
            if next > until {
                return;
            }
            self.now = self.now.max(next);
            self.udp.now = self.now;
            self.step();
            if self.now >= until && self.udp.next_time().is_none_or(|t| t > until) {
                return;
            }
        }
        panic!("simulation did not finish");
    }

    pub fn run(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }

    fn step(&mut self) {
        let now = self.now;
        for (from, to, data) in self.udp.due() {
            if let Some(p) = self.phones.iter_mut().find(|p| p.public == to) {
                p.session.handle_input(now, from, &data).unwrap();
            }
        }
        for p in &mut self.phones {
            if p.session.poll_timeout() <= now {
                p.session.handle_timeout(now).unwrap();
            }
        }
        if let Some((t, a, b)) = &mut self.video {
            if now >= *t {
                *t = now + Duration::from_millis(1000 / u64::from(video::FPS));
                let frames = [a.next_frame(), b.next_frame()];
                for (p, f) in self.phones.iter_mut().zip(frames.iter()) {
                    p.session.send_video(now, f).unwrap();
                }
            }
        }
        if self.audio_on && now >= self.next_tick {
            self.next_tick = now + TICK;
            for p in &mut self.phones {
                let frame = p.tone.next_frame();
                p.session.send_audio(now, &frame).unwrap();
                let (pcm, how) = p.session.play_audio(now).unwrap();
                assert_eq!(pcm.len(), FRAME_SAMPLES);
                p.heard.extend_from_slice(pcm);
                p.decoded.push(how);
            }
        }
        self.flush();
    }

    /// Collects what every phone wants to send and puts it on the wire.
    fn flush(&mut self) {
        self.udp.now = self.now;
        for p in &mut self.phones {
            while let Some(d) = p.session.poll_transmit() {
                self.udp.send(p.public, d.to, d.data);
            }
            while let Some(e) = p.session.poll_event() {
                p.events.push(e);
            }
        }
    }
}

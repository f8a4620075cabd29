//! Whole calls through every service's core, in one simulated world with
//! hand-moved time: the SDK's [`Phone`]s (user agent, media, PASSporTs),
//! the signaling service's proxy, and the relay's TURN core on a lossy
//! wire. The directory of device keys stands in for verified `ids`
//! lookups.
//!
//! Alice calls Bob, who has a phone (asleep: registered once with push
//! parameters, connection closed) and a laptop (online). Both ring, the
//! phone after its VoIP push; the laptop answers, the phone hears
//! "answered elsewhere"; audio flows both ways through the relay only.

mod sim;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client_sdk::call::{CallEvent, DeviceKey, EndReason, Phone};
use client_sdk::media::audio::{dominant_frequency, Decoded, Tone};
use client_sdk::media::MediaConfig;
use client_sdk::sip::{PushContact, UaConfig};
use client_sdk::turn;
use signaling::core::flow::{ConnId, Flow, Source, Transport};
use signaling::core::proxy::{Config, Event, Proxy};
use sim::{addr, Link, Udp, TURN, TURN2};
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};

const DOMAIN: &str = "parley.test";
const PROXY: &str = "192.0.2.100:5061";
const TICK: Duration = Duration::from_millis(20);

struct Dev {
    name: &'static str,
    phone: Phone,
    key: DeviceKey,
    sip: SocketAddr,
    conn: Option<u64>,
    media: SocketAddr,
    call: Option<String>,
    tone: Tone,
    heard: Vec<i16>,
    /// How each played frame was made (None: nothing to play yet).
    played: Vec<Option<Decoded>>,
    events: Vec<(Duration, CallEvent)>,
}

/// Rewrites SIP on its way from the proxy to a device.
type Tamper = Box<dyn Fn(&str, Vec<u8>) -> Vec<u8>>;

struct World {
    start: Instant,
    now: Instant,
    proxy: Proxy,
    udp: Udp,
    devs: Vec<Dev>,
    /// What a verified `ids` lookup returns for each handle.
    directory: HashMap<Handle, Vec<DeviceKey>>,
    next_conn: u64,
    wakes: Vec<Event>,
    tamper: Option<Tamper>,
    next_tick: Instant,
}

impl World {
    fn new(link: Link) -> World {
        let now = Instant::now();
        let config = Config {
            domains: vec![DOMAIN.into()],
            advertise: vec![(Transport::Tls, PROXY.parse().unwrap())],
            realm: DOMAIN.into(),
            ..Config::default()
        };
        let users = ["alice", "phone", "laptop"]
            .iter()
            .map(|u| (u.to_string(), format!("{u}-turn")))
            .collect();
        World {
            start: now,
            now,
            proxy: Proxy::new(config, [4; 32], now),
            // Two relays, as ids lists them: the first carries calls.
            udp: Udp::with_relays(11, link, now, users, &[TURN, TURN2]),
            devs: Vec::new(),
            directory: HashMap::new(),
            next_conn: 1,
            wakes: Vec::new(),
            tamper: None,
            next_tick: now,
        }
    }

    fn add(&mut self, name: &'static str, handle: &str, n: u8, freq: f64, push: bool) {
        let handle = Handle::parse(handle).unwrap();
        let key = SigningKey::generate();
        let device = DeviceId::random();
        let sip: SocketAddr = format!("198.51.100.{n}:40000").parse().unwrap();
        let media: SocketAddr = format!("198.51.100.{n}:50000").parse().unwrap();
        let mut ua = UaConfig::new(handle.as_str(), DOMAIN, sip, &format!("urn:uuid:{name}"));
        if push {
            ua.push = Some(PushContact {
                provider: "parley".into(),
                prid: format!("{name}-token"),
                param: Some("app.voip".into()),
            });
        }
        let media_config = MediaConfig {
            turn: Some(turn::Config::new(addr(TURN), name, &format!("{name}-turn"))),
            spare_turn: vec![turn::Config::new(
                addr(TURN2),
                name,
                &format!("{name}-turn"),
            )],
            relay_only: true,
            seed: u64::from(n) * 31,
            ..MediaConfig::default()
        };
        let dk = DeviceKey {
            device,
            key: key.public(),
        };
        self.directory
            .entry(handle.clone())
            .or_default()
            .push(dk.clone());
        self.devs.push(Dev {
            name,
            phone: Phone::new(ua, handle, device, key, media_config, u64::from(n)),
            key: dk,
            sip,
            conn: None,
            media,
            call: None,
            tone: Tone::new(freq, 0.3),
            heard: Vec::new(),
            played: Vec::new(),
            events: Vec::new(),
        });
        self.connect(name);
        self.register(name);
    }

    fn dev(&mut self, name: &str) -> &mut Dev {
        self.devs.iter_mut().find(|d| d.name == name).unwrap()
    }

    fn connect(&mut self, name: &str) {
        let c = self.next_conn;
        self.next_conn += 1;
        self.dev(name).conn = Some(c);
    }

    fn register(&mut self, name: &str) {
        let now = self.now;
        self.dev(name).phone.ua().register(now);
        self.pump();
        assert!(
            self.dev(name).phone.ua().is_registered(),
            "{name} registers"
        );
    }

    fn sleep(&mut self, name: &str) {
        let d = self.dev(name);
        let conn = d.conn.take().unwrap();
        d.phone.ua().handle_disconnected();
        self.proxy.handle_conn_closed(ConnId(conn), self.now);
        self.pump();
    }

    fn at(&self) -> Duration {
        self.now - self.start
    }

    /// Moves SIP and call events until quiet.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            let now = self.now;
            let at = self.at();
            for d in &mut self.devs {
                while let Some(bytes) = d.phone.poll_sip_transmit() {
                    moved = true;
                    let Some(conn) = d.conn else { continue };
                    let source = Source {
                        flow: Flow {
                            transport: Transport::Tls,
                            remote: d.sip,
                            conn: Some(ConnId(conn)),
                        },
                        device: Some(d.key.device),
                    };
                    self.proxy.handle_input(source, &bytes, now);
                }
                while let Some((_, dg)) = d.phone.poll_media_transmit() {
                    self.udp.now = now;
                    self.udp.send(d.media, dg.to, dg.data);
                }
                while let Some(e) = d.phone.poll_event() {
                    moved = true;
                    if let CallEvent::Incoming { call, .. } = &e {
                        d.call = Some(call.clone());
                    }
                    d.events.push((at, e));
                }
            }
            while let Some(e) = self.proxy.poll_event() {
                moved = true;
                match e {
                    Event::Authorize { id, .. } => self.proxy.handle_authorization(id, true, now),
                    wake @ Event::Wake(_) => self.wakes.push(wake),
                    // One node: no shared location.
                    Event::Bound { .. }
                    | Event::Locate { .. }
                    | Event::NonceUsed { .. }
                    | Event::PushGone { .. } => {}
                }
            }
            while let Some(t) = self.proxy.poll_transmit() {
                moved = true;
                let Some(d) = self
                    .devs
                    .iter_mut()
                    .find(|d| d.conn.is_some() && d.conn.map(ConnId) == t.flow.conn)
                else {
                    continue;
                };
                let bytes = match &self.tamper {
                    Some(f) => f(d.name, t.bytes),
                    None => t.bytes,
                };
                d.phone.handle_sip_input(now, &bytes).unwrap();
            }
            if !moved {
                return;
            }
        }
        panic!("never quiet");
    }

    /// Time passes: media, relay, timers, and the audio clock of every
    /// device in a call (its tone out, what it hears in).
    fn run(&mut self, d: Duration) {
        let until = self.now + d;
        for _ in 0..10_000_000 {
            let mut next = until.min(self.next_tick);
            if let Some(t) = self.udp.next_time() {
                next = next.min(t);
            }
            if let Some(t) = self.proxy.poll_timeout() {
                next = next.min(t);
            }
            for dev in &self.devs {
                if let Some(t) = dev.phone.poll_timeout() {
                    next = next.min(t);
                }
            }
            self.now = self.now.max(next);
            self.udp.now = self.now;
            let now = self.now;
            for (from, to, data) in self.udp.due() {
                if let Some(d) = self.devs.iter_mut().find(|d| d.media == to) {
                    if let Some(call) = d.call.clone() {
                        d.phone.handle_media_input(now, &call, from, &data).unwrap();
                    }
                }
            }
            self.proxy.handle_timeout(now);
            for d in &mut self.devs {
                d.phone.handle_timeout(now).unwrap();
            }
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                for d in &mut self.devs {
                    let Some(call) = d.call.clone() else { continue };
                    let frame = d.tone.next_frame();
                    d.phone.send_audio(now, &call, &frame).unwrap();
                    if let Some(p) = d.phone.play_audio(now, &call).unwrap() {
                        d.heard.extend_from_slice(&p.pcm);
                        d.played.push(p.how);
                    }
                }
            }
            self.pump();
            if self.now >= until {
                return;
            }
        }
        panic!("time never reached the end");
    }

    fn run_until(&mut self, max: Duration, done: impl Fn(&World) -> bool) {
        let until = self.now + max;
        while self.now < until && !done(self) {
            self.run(TICK);
        }
    }

    fn events(&self, name: &str) -> Vec<CallEvent> {
        let d = self.devs.iter().find(|d| d.name == name).unwrap();
        d.events.iter().map(|(_, e)| e.clone()).collect()
    }

    fn has(&self, name: &str, f: impl Fn(&CallEvent) -> bool) -> bool {
        self.events(name).iter().any(f)
    }

    /// An incoming call's caller, looked up in the directory and rung.
    fn ring(&mut self, name: &str) -> Result<(), client_sdk::call::CallError> {
        let (call, from) = self
            .events(name)
            .iter()
            .find_map(|e| match e {
                CallEvent::Incoming { call, from, .. } => Some((call.clone(), from.clone())),
                _ => None,
            })
            .expect("an incoming call");
        let keys = self.directory[&from].clone();
        let now = self.now;
        let d = self.dev(name);
        let local = d.media;
        let r = d.phone.ring(now, &call, keys, local);
        self.pump();
        r
    }

    fn dial(&mut self, from: &str, to: &str) -> String {
        let handle = Handle::parse(to).unwrap();
        let keys = self.directory[&handle].clone();
        let now = self.now;
        let d = self.dev(from);
        let local = d.media;
        let call = d.phone.dial(now, &handle, keys, local).unwrap();
        d.call = Some(call.clone());
        self.pump();
        call
    }

    fn timeline(&self) -> String {
        let mut all: Vec<(Duration, String)> = Vec::new();
        for d in &self.devs {
            for (t, e) in &d.events {
                if !matches!(e, CallEvent::Stats { .. }) {
                    all.push((*t, format!("{:>6} {e:?}", d.name)));
                }
            }
        }
        all.sort_by_key(|(t, _)| *t);
        all.iter()
            .map(|(t, s)| format!("{:>7.1} ms  {s}\n", t.as_secs_f64() * 1000.0))
            .collect()
    }
}

fn bob_and_alice(link: Link) -> World {
    let mut w = World::new(link);
    w.add("alice", "alice@example.com", 1, 440.0, false);
    w.add("phone", "+14155550123", 2, 880.0, true);
    w.add("laptop", "+14155550123", 3, 660.0, false);
    w.sleep("phone");
    w
}

fn heard(w: &World, name: &str) -> f64 {
    let d = w.devs.iter().find(|d| d.name == name).unwrap();
    let tail = &d.heard[d.heard.len().saturating_sub(96_000)..];
    dominant_frequency(tail, (200..2000).step_by(20).map(f64::from)).0
}

#[test]
fn alice_calls_bob_the_laptop_answers_the_phone_hears_answered_elsewhere() {
    let mut w = bob_and_alice(Link::default());
    let call = w.dial("alice", "+14155550123");
    // Gathering (relay allocation), the INVITE, the fork.
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Incoming { .. }))
    });
    w.ring("laptop").unwrap();
    assert_eq!(w.wakes.len(), 1, "the sleeping phone is woken by push");
    // The push arrives; the phone connects and registers again.
    w.connect("phone");
    w.register("phone");
    w.ring("phone").unwrap();
    w.run_until(Duration::from_secs(3), |w| {
        w.has("phone", |e| matches!(e, CallEvent::Ringing { .. }))
            && w.has("laptop", |e| matches!(e, CallEvent::Ringing { .. }))
    });
    assert!(w.has("alice", |e| matches!(e, CallEvent::Alerting { .. })));

    let now = w.now;
    w.dev("laptop").phone.answer(now, &call).unwrap();
    w.pump();
    let laptop_device = w.dev("laptop").key.device;
    assert!(w.has("alice", |e| *e
        == CallEvent::Answered {
            call: call.clone(),
            device: Some(laptop_device)
        }));
    assert!(w.has("phone", |e| *e
        == CallEvent::Ended {
            call: call.clone(),
            reason: EndReason::AnsweredElsewhere
        }));
    w.dev("phone").call = None;

    w.run_until(Duration::from_secs(5), |w| {
        w.has("alice", |e| matches!(e, CallEvent::MediaConnected { .. }))
            && w.has("laptop", |e| matches!(e, CallEvent::MediaConnected { .. }))
    });
    w.run(Duration::from_secs(3));
    assert_eq!(heard(&w, "alice"), 660.0, "Alice hears the laptop");
    assert_eq!(heard(&w, "laptop"), 440.0, "the laptop hears Alice");
    assert!(
        w.udp.relayed_payloads.len() > 200,
        "media went through the relay"
    );

    let now = w.now;
    w.dev("alice").phone.hangup(now, &call).unwrap();
    w.pump();
    assert!(w.has("laptop", |e| *e
        == CallEvent::Ended {
            call: call.clone(),
            reason: EndReason::Remote
        }));
    eprintln!("{}", w.timeline());
    let stats = w
        .dev("alice")
        .events
        .iter()
        .rev()
        .find_map(|(_, e)| match e {
            CallEvent::Stats { stats, .. } => Some(stats.clone()),
            _ => None,
        });
    let stats = stats.expect("stats during the call");
    assert!(stats.mos > 4.0, "{stats:?}");
}

/// Alice calls Bob's laptop (relay only), it answers, and they talk for
/// two seconds: the world and the call.
fn alice_and_the_laptop_talk(link: Link) -> (World, String) {
    let mut w = World::new(link);
    w.add("alice", "alice@example.com", 1, 440.0, false);
    w.add("laptop", "+14155550123", 3, 660.0, false);
    let call = w.dial("alice", "+14155550123");
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Incoming { .. }))
    });
    w.ring("laptop").unwrap();
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Ringing { .. }))
    });
    let now = w.now;
    w.dev("laptop").phone.answer(now, &call).unwrap();
    w.pump();
    w.run_until(Duration::from_secs(5), |w| {
        w.has("alice", |e| matches!(e, CallEvent::MediaConnected { .. }))
            && w.has("laptop", |e| matches!(e, CallEvent::MediaConnected { .. }))
    });
    w.run(Duration::from_secs(2));
    (w, call)
}

/// The relay carrying a call dies mid-call (both ends use it): each end
/// finds its relay silent, allocates on the next one, and restarts ICE;
/// the two re-INVITEs meet (491 both ways) and the retry of RFC 3261
/// §14.1 settles it. Audio comes back both ways through the second relay
/// within seconds, and the call never ends.
#[test]
fn when_the_relay_in_use_dies_the_call_moves_to_another() {
    let (mut w, call) = alice_and_the_laptop_talk(Link::default());
    assert_eq!(heard(&w, "alice"), 660.0);
    assert_eq!(heard(&w, "laptop"), 440.0);

    w.udp.kill_relay(TURN);
    let killed_at = w.at();
    let before: Vec<(usize, usize)> = w
        .devs
        .iter()
        .map(|d| (d.heard.len(), d.played.len()))
        .collect();
    // Stall (1.5 s), the probe (1 s), the new allocation, the restart.
    w.run(Duration::from_secs(10));
    eprintln!("{}", w.timeline());
    for name in ["alice", "laptop"] {
        let moved = w
            .devs
            .iter()
            .find(|d| d.name == name)
            .unwrap()
            .events
            .iter()
            .find_map(|(t, e)| match e {
                CallEvent::RelayMoved { from, to, .. } => Some((*t, *from, *to)),
                _ => None,
            });
        let (t, from, to) = moved.unwrap_or_else(|| panic!("{name} moves to the other relay"));
        assert_eq!((from, to), (addr(TURN), addr(TURN2)));
        assert!(
            t - killed_at < Duration::from_secs(4),
            "{name} moved at {t:?}"
        );
        assert!(
            !w.has(name, |e| matches!(e, CallEvent::Ended { .. })),
            "{name}'s call goes on"
        );
    }
    // The last three seconds carry the far end's tone again.
    assert_eq!(heard(&w, "alice"), 660.0, "Alice hears the laptop again");
    assert_eq!(heard(&w, "laptop"), 440.0, "the laptop hears Alice again");
    for (d, (samples, frames)) in w.devs.iter().zip(before) {
        assert!(
            d.heard.len() - samples >= 9 * 48_000,
            "{} kept playing out",
            d.name
        );
        // Packets stop (concealment stands in), then come again through
        // the second relay.
        let after = &d.played[frames..];
        let gap = after
            .iter()
            .position(|p| *p == Some(Decoded::Concealed))
            .expect("the loss shows");
        let back = gap
            + after[gap..]
                .iter()
                .position(|p| *p == Some(Decoded::Packet))
                .unwrap_or_else(|| panic!("{} gets packets again", d.name));
        let back = TICK * back as u32;
        // Stall 1.5 s, probe 1 s, then a new allocation and restart.
        assert!(back < Duration::from_secs(4), "{}: {back:?}", d.name);
    }
    let now = w.now;
    assert!(
        w.dev("alice").phone.stats(&call, now).is_some(),
        "the call is up"
    );
}

/// Both ends change network at the same moment, so their ICE restarts
/// cross (a glare): each gets 491, and the retry of RFC 3261 §14.1 (the
/// callee first, then the caller) brings media back on the new paths.
#[test]
fn crossing_ice_restarts_settle_after_the_glare() {
    let link = Link {
        jitter: Duration::ZERO,
        ..Link::default()
    };
    let (mut w, call) = alice_and_the_laptop_talk(link);
    let glares = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = glares.clone();
    w.tamper = Some(Box::new(move |_, bytes| {
        if bytes.starts_with(b"SIP/2.0 491") {
            seen.set(seen.get() + 1);
        }
        bytes
    }));
    let now = w.now;
    for (name, port) in [("alice", 50_001), ("laptop", 50_001)] {
        let d = w.dev(name);
        d.media.set_port(port);
        let local = d.media;
        d.phone.network_changed(now, &call, local).unwrap();
    }
    w.pump();
    let frames: Vec<usize> = w.devs.iter().map(|d| d.played.len()).collect();
    w.run(Duration::from_secs(6));
    assert!(glares.get() >= 2, "both re-INVITEs met a 491");
    for (d, from) in w.devs.iter().zip(frames) {
        assert!(
            !d.events
                .iter()
                .any(|(_, e)| matches!(e, CallEvent::Ended { .. })),
            "{}'s call goes on",
            d.name
        );
        // The last two seconds came in packets again.
        let tail = &d.played[from..];
        let recent = &tail[tail.len() - 100..];
        let packets = recent
            .iter()
            .filter(|p| **p == Some(Decoded::Packet))
            .count();
        assert!(packets > 90, "{}: {packets} of 100 frames", d.name);
    }
}

#[test]
fn a_signaling_server_that_rewrites_the_fingerprint_fails_the_call_closed() {
    let mut w = World::new(Link::default());
    w.add("alice", "alice@example.com", 1, 440.0, false);
    w.add("laptop", "+14155550123", 3, 660.0, false);
    // The proxy puts its own DTLS key into what reaches the laptop.
    w.tamper = Some(Box::new(|to, bytes| {
        if to != "laptop" {
            return bytes;
        }
        let text = String::from_utf8(bytes).unwrap();
        let Some(i) = text.find("a=fingerprint:sha-256 ") else {
            return text.into_bytes();
        };
        let at = i + "a=fingerprint:sha-256 ".len();
        let mut out = text.clone();
        let c = if &text[at..at + 1] == "0" { "1" } else { "0" };
        out.replace_range(at..at + 1, c);
        out.into_bytes()
    }));
    let call = w.dial("alice", "+14155550123");
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Incoming { .. }))
    });
    let err = w.ring("laptop").unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
    assert!(w.has("laptop", |e| matches!(
        e,
        CallEvent::Ended {
            reason: EndReason::Security(_),
            ..
        }
    )));
    w.run(Duration::from_secs(1));
    assert!(
        w.has("alice", |e| *e
            == CallEvent::Ended {
                call: call.clone(),
                reason: EndReason::Failed(438, "Invalid Identity Header".into())
            }),
        "{:?}",
        w.events("alice")
    );
    assert!(!w.has("alice", |e| matches!(e, CallEvent::MediaConnected { .. })));
}

#[test]
fn a_device_missing_from_the_key_directory_cannot_take_the_call() {
    let mut w = World::new(Link::default());
    w.add("alice", "alice@example.com", 1, 440.0, false);
    w.add("laptop", "+14155550123", 3, 660.0, false);
    // The directory Alice trusts does not list this laptop (say it was
    // registered with the signaling service behind the directory's back).
    let bob = Handle::parse("+14155550123").unwrap();
    w.directory.insert(
        bob,
        vec![DeviceKey {
            device: DeviceId::random(),
            key: SigningKey::generate().public(),
        }],
    );
    let call = w.dial("alice", "+14155550123");
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Incoming { .. }))
    });
    w.ring("laptop").unwrap();
    w.run_until(Duration::from_secs(3), |w| {
        w.has("laptop", |e| matches!(e, CallEvent::Ringing { .. }))
    });
    let now = w.now;
    w.dev("laptop").phone.answer(now, &call).unwrap();
    w.pump();
    let ended = w.events("alice").into_iter().find_map(|e| match e {
        CallEvent::Ended { reason, .. } => Some(reason),
        _ => None,
    });
    match ended {
        Some(EndReason::Security(why)) => assert!(why.contains("not one of"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Alice hung up on it: the laptop's call ends too.
    assert!(w.has("laptop", |e| matches!(e, CallEvent::Ended { .. })));
}

//! The SDK's user agent against the signaling service's own proxy core,
//! both sans-IO, over simulated TCP connections with hand-moved time:
//! registration (device certificate and digest), a call forked to every
//! device of a handle with one asleep and woken by push, "answered
//! elsewhere", decline everywhere, cancel, re-INVITE and hang-up; a
//! group call's room tokens, and MESSAGE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use client_sdk::sip::{PushContact, UaConfig, UaEvent, UserAgent};
use signaling::core::flow::{ConnId, Flow, Source, Transport};
use signaling::core::proxy::{Config, Event, Proxy};
use wire::handle::Handle;
use wire::keys::DeviceId;

const DOMAIN: &str = "parley.test";
const PROXY: &str = "192.0.2.100:5060";
const ALICE: &str = "alice@example.com";
const BOB: &str = "+14155550123";
const SFU: &str = "https://sfu.parley.test:8446";

struct Device {
    ua: UserAgent,
    addr: SocketAddr,
    device: Option<DeviceId>,
    conn: Option<u64>,
    events: Vec<UaEvent>,
}

struct World {
    proxy: Proxy,
    now: Instant,
    devices: HashMap<&'static str, Device>,
    next_conn: u64,
    wakes: Vec<Event>,
}

impl World {
    fn new() -> World {
        let now = Instant::now();
        let mut accounts = HashMap::new();
        accounts.insert(
            Handle::parse("carol@example.com").unwrap(),
            "s3cret".to_string(),
        );
        let config = Config {
            domains: vec![DOMAIN.into()],
            advertise: vec![(Transport::Tcp, PROXY.parse().unwrap())],
            realm: DOMAIN.into(),
            accounts,
            sfu: Some(SFU.into()),
            ..Config::default()
        };
        World {
            proxy: Proxy::new(config, [3; 32], now),
            now,
            devices: HashMap::new(),
            next_conn: 1,
            wakes: Vec::new(),
        }
    }

    fn add(&mut self, name: &'static str, handle: &str, addr: &str, push: bool) {
        let addr: SocketAddr = addr.parse().unwrap();
        let mut cfg = UaConfig::new(handle, DOMAIN, addr, &format!("urn:uuid:{name}"));
        cfg.transport = "TCP";
        if push {
            cfg.push = Some(PushContact {
                provider: "parley".into(),
                prid: format!("{name}-token"),
                param: Some("app.voip".into()),
            });
        }
        let seed = 1000 + self.devices.len() as u64 * 7919;
        self.devices.insert(
            name,
            Device {
                ua: UserAgent::new(cfg, seed),
                addr,
                device: Some(DeviceId::random()),
                conn: None,
                events: Vec::new(),
            },
        );
        self.connect(name);
    }

    fn connect(&mut self, name: &str) {
        let c = self.next_conn;
        self.next_conn += 1;
        self.devices.get_mut(name).unwrap().conn = Some(c);
    }

    /// The device's connection drops (the app went to the background).
    fn disconnect(&mut self, name: &str) {
        let d = self.devices.get_mut(name).unwrap();
        let conn = d.conn.take().unwrap();
        d.ua.handle_disconnected();
        self.proxy.handle_conn_closed(ConnId(conn), self.now);
        self.pump();
    }

    fn ua(&mut self, name: &str) -> &mut UserAgent {
        &mut self.devices.get_mut(name).unwrap().ua
    }

    fn events(&mut self, name: &str) -> Vec<UaEvent> {
        std::mem::take(&mut self.devices.get_mut(name).unwrap().events)
    }

    /// Moves messages both ways until everything is quiet.
    fn pump(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            let now = self.now;
            let names: Vec<&'static str> = self.devices.keys().copied().collect();
            for name in &names {
                let d = self.devices.get_mut(name).unwrap();
                while let Some(bytes) = d.ua.poll_transmit() {
                    moved = true;
                    let Some(conn) = d.conn else { continue };
                    let source = Source {
                        flow: Flow {
                            transport: Transport::Tcp,
                            remote: d.addr,
                            conn: Some(ConnId(conn)),
                        },
                        device: d.device,
                    };
                    self.proxy.handle_input(source, &bytes, now);
                }
                while let Some(e) = d.ua.poll_event() {
                    d.events.push(e);
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
                let to = self
                    .devices
                    .values_mut()
                    .find(|d| d.conn.is_some() && d.conn.map(ConnId) == t.flow.conn);
                if let Some(d) = to {
                    d.ua.handle_input(now, &t.bytes).unwrap();
                }
            }
            if !moved {
                return;
            }
        }
        panic!("never quiet");
    }

    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        for _ in 0..100_000 {
            let mut next = until;
            if let Some(t) = self.proxy.poll_timeout() {
                next = next.min(t);
            }
            for dev in self.devices.values() {
                if let Some(t) = dev.ua.poll_timeout() {
                    next = next.min(t);
                }
            }
            self.now = self.now.max(next);
            self.proxy.handle_timeout(self.now);
            let now = self.now;
            for dev in self.devices.values_mut() {
                dev.ua.handle_timeout(now);
            }
            self.pump();
            if self.now >= until {
                return;
            }
        }
    }
}

fn registered(w: &mut World, name: &str) {
    let now = w.now;
    w.ua(name).register(now);
    w.pump();
    let ev = w.events(name);
    assert!(
        ev.iter().any(|e| matches!(e, UaEvent::Registered { .. })),
        "{name}: {ev:?}"
    );
    // Keep what came with it (a woken device's call).
    w.devices.get_mut(name).unwrap().events = ev
        .into_iter()
        .filter(|e| !matches!(e, UaEvent::Registered { .. }))
        .collect();
}

/// Alice; Bob's phone (registered once with push parameters, now asleep)
/// and Bob's laptop (online).
fn world() -> World {
    let mut w = World::new();
    w.add("alice", ALICE, "198.51.100.1:40001", false);
    w.add("phone", BOB, "198.51.100.2:40002", true);
    w.add("laptop", BOB, "198.51.100.3:40003", false);
    for n in ["alice", "phone", "laptop"] {
        registered(&mut w, n);
    }
    w.disconnect("phone");
    w
}

/// The push the proxy asked for reaches the phone: it reconnects and
/// registers, and the waiting call is forked to it.
fn wake_phone(w: &mut World) {
    assert_eq!(w.wakes.len(), 1, "one VoIP push for the sleeping phone");
    w.wakes.clear();
    w.connect("phone");
    registered(w, "phone");
}

fn incoming(events: &[UaEvent]) -> (String, String) {
    events
        .iter()
        .find_map(|e| match e {
            UaEvent::Incoming { call, sdp, .. } => Some((call.clone(), sdp.clone())),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no call: {events:?}"))
}

#[test]
fn both_devices_ring_the_laptop_answers_the_phone_hears_answered_elsewhere() {
    let mut w = world();
    let now = w.now;
    let call = w
        .ua("alice")
        .invite(now, BOB, "v=0 offer", Some("alice-passport"))
        .unwrap();
    w.pump();
    let (laptop_call, sdp) = incoming(&w.events("laptop"));
    assert_eq!(
        (laptop_call.as_str(), sdp.as_str()),
        (call.as_str(), "v=0 offer")
    );
    assert!(w
        .events("alice")
        .contains(&UaEvent::Ringing { call: call.clone() }));
    wake_phone(&mut w);
    let (phone_call, _) = incoming(&w.events("phone"));
    assert_eq!(phone_call, call);

    let now = w.now;
    w.ua("laptop")
        .answer(now, &call, "v=0 answer", Some("bob-passport"))
        .unwrap();
    w.pump();
    let alice = w.events("alice");
    assert!(
        alice.contains(&UaEvent::Answered {
            call: call.clone(),
            sdp: "v=0 answer".into(),
            identity: Some("bob-passport".into()),
        }),
        "{alice:?}"
    );
    assert_eq!(
        w.events("phone"),
        vec![UaEvent::Cancelled {
            call: call.clone(),
            reason: Some("Call completed elsewhere".into()),
        }]
    );

    // An ICE restart from Alice reaches the laptop through the proxy's
    // Record-Route and comes back.
    let now = w.now;
    w.ua("alice")
        .reoffer(now, &call, "v=0 restart", Some("p2"))
        .unwrap();
    w.pump();
    let laptop = w.events("laptop");
    assert!(
        laptop.contains(&UaEvent::ReOffer {
            call: call.clone(),
            sdp: "v=0 restart".into(),
            identity: Some("p2".into()),
        }),
        "{laptop:?}"
    );
    w.ua("laptop")
        .answer_reoffer(&call, "v=0 restarted", None)
        .unwrap();
    w.pump();
    assert!(w
        .events("alice")
        .iter()
        .any(|e| matches!(e, UaEvent::ReAnswered { sdp, .. } if sdp == "v=0 restarted")));

    let now = w.now;
    w.ua("alice").hangup(now, &call).unwrap();
    w.pump();
    assert_eq!(
        w.events("laptop"),
        vec![UaEvent::Ended {
            call: call.clone(),
            by_peer: true
        }]
    );
    // Nothing is left ringing anywhere, and the proxy is idle.
    w.advance(Duration::from_secs(40));
    assert!(w
        .events("alice")
        .iter()
        .all(|e| !matches!(e, UaEvent::Failed { .. })));
    assert_eq!(w.proxy.metrics().calls_active, 0);
    assert_eq!(w.proxy.metrics().calls_answered, 1);
}

#[test]
fn a_decline_on_one_device_ends_the_call_everywhere() {
    let mut w = world();
    let now = w.now;
    let call = w.ua("alice").invite(now, BOB, "offer", None).unwrap();
    w.pump();
    wake_phone(&mut w);
    let (c, _) = incoming(&w.events("phone"));
    w.ua("phone").decline(&c, 603).unwrap();
    w.pump();
    let alice = w.events("alice");
    assert!(
        alice
            .iter()
            .any(|e| matches!(e, UaEvent::Failed { code: 603, .. })),
        "{alice:?}"
    );
    let laptop = w.events("laptop");
    assert!(
        laptop
            .iter()
            .any(|e| matches!(e, UaEvent::Cancelled { call: x, .. } if *x == call)),
        "{laptop:?}"
    );
}

#[test]
fn the_caller_cancels_and_every_device_stops_ringing() {
    let mut w = world();
    let now = w.now;
    let call = w.ua("alice").invite(now, BOB, "offer", None).unwrap();
    w.pump();
    let _ = w.events("laptop");
    let now = w.now;
    w.ua("alice").hangup(now, &call).unwrap();
    w.pump();
    let alice = w.events("alice");
    assert!(
        alice
            .iter()
            .any(|e| matches!(e, UaEvent::Failed { code: 487, .. })),
        "{alice:?}"
    );
    assert!(w
        .events("laptop")
        .iter()
        .any(|e| matches!(e, UaEvent::Cancelled { .. })));
}

#[test]
fn an_unknown_handle_fails_with_the_proxys_status() {
    let mut w = world();
    let now = w.now;
    w.ua("alice")
        .invite(now, "nobody@example.com", "offer", None)
        .unwrap();
    w.pump();
    let alice = w.events("alice");
    assert!(
        alice.iter().any(|e| matches!(
            e,
            UaEvent::Failed {
                code: 404 | 480,
                ..
            }
        )),
        "{alice:?}"
    );
}

#[test]
fn a_standard_account_registers_with_digest_and_refreshes() {
    let mut w = World::new();
    w.add("carol", "carol@example.com", "198.51.100.9:5060", false);
    w.devices.get_mut("carol").unwrap().device = None; // no certificate
    let mut cfg = w.ua("carol").config().clone();
    cfg.credentials = Some(("carol@example.com".into(), "s3cret".into()));
    cfg.expires = 120;
    w.devices.get_mut("carol").unwrap().ua = UserAgent::new(cfg.clone(), 5);
    registered(&mut w, "carol");
    // Refreshed before it lapses, again and again.
    w.advance(Duration::from_secs(400));
    let ev = w.events("carol");
    let refreshes = ev
        .iter()
        .filter(|e| matches!(e, UaEvent::Registered { .. }))
        .count();
    assert!(refreshes >= 3, "{ev:?}");
    assert!(w.ua("carol").is_registered());

    // A wrong password is refused, not retried forever.
    cfg.credentials = Some(("carol@example.com".into(), "wrong".into()));
    w.devices.get_mut("carol").unwrap().ua = UserAgent::new(cfg, 6);
    let now = w.now;
    w.ua("carol").register(now);
    w.pump();
    let ev = w.events("carol");
    assert!(
        ev.iter().any(|e| matches!(
            e,
            UaEvent::RegistrationFailed {
                code: 401 | 403,
                ..
            }
        )),
        "{ev:?}"
    );
}

/// Alice rings Bob into a group call: his awake device gets the room,
/// the roster and a room token from the proxy; Alice gets hers with the
/// ringing (once); Bob answers without SDP, since media goes to the SFU.
#[test]
fn a_group_call_rings_with_room_tokens_and_is_answered_without_sdp() {
    let mut w = world();
    let now = w.now;
    let room = "room-0123456789abcdef";
    let roster = r#"{"members":[]}"#;
    let call = w.ua("alice").next_call_id();
    w.ua("alice")
        .invite_group(now, &call, BOB, room, roster)
        .unwrap();
    w.pump();
    let ev = w.events("laptop");
    let (incoming, pass) = ev
        .iter()
        .find_map(|e| match e {
            UaEvent::IncomingGroup {
                call,
                room: r,
                pass,
                roster: body,
                ..
            } => {
                assert_eq!((r.as_str(), body.as_str()), (room, roster));
                Some((call.clone(), pass.clone()))
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no group call: {ev:?}"));
    let pass = pass.expect("a room token for the callee");
    assert_eq!(pass.sfu, SFU);
    assert!(!pass.token.is_empty());
    let ev = w.events("alice");
    let passes: Vec<_> = ev
        .iter()
        .filter_map(|e| match e {
            UaEvent::RoomPass { call: c, pass } if *c == call => Some(pass.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(passes.len(), 1, "{ev:?}");
    assert_eq!(passes[0].sfu, SFU);
    assert!(ev.iter().any(|e| matches!(e, UaEvent::Ringing { .. })));

    let now = w.now;
    w.ua("laptop").answer_group(now, &incoming, None).unwrap();
    w.pump();
    let ev = w.events("alice");
    assert!(
        ev.iter()
            .any(|e| matches!(e, UaEvent::Answered { sdp, .. } if sdp.is_empty())),
        "{ev:?}"
    );
    assert!(
        !ev.iter().any(|e| matches!(e, UaEvent::RoomPass { .. })),
        "one pass per call: {ev:?}"
    );
    let now = w.now;
    w.ua("alice").hangup(now, &call).unwrap();
    w.pump();
    assert!(w
        .events("laptop")
        .iter()
        .any(|e| matches!(e, UaEvent::Ended { by_peer: true, .. })));
}

/// A MESSAGE to a handle reaches its awake device, which answers 200;
/// the sender hears what became of it, and of one to nobody.
#[test]
fn a_message_reaches_the_handles_device_and_the_sender_hears_the_outcome() {
    let mut w = world();
    let now = w.now;
    let id = w
        .ua("alice")
        .message(now, BOB, "application/vnd.parley.keys+json", b"[1,2]")
        .unwrap();
    w.pump();
    let ev = w.events("laptop");
    assert!(
        ev.iter().any(|e| matches!(
            e,
            UaEvent::Message { content_type, body, from }
                if content_type == "application/vnd.parley.keys+json"
                    && body == b"[1,2]"
                    && from.contains("alice%40example.com")
        )),
        "{ev:?}"
    );
    let ev = w.events("alice");
    assert!(
        ev.contains(&UaEvent::MessageDone {
            id: id.clone(),
            code: 200
        }),
        "{ev:?}"
    );
    let now = w.now;
    let nobody = w
        .ua("alice")
        .message(now, "nobody@example.com", "text/plain", b"hi")
        .unwrap();
    w.pump();
    let ev = w.events("alice");
    assert!(
        ev.iter().any(|e| matches!(
            e,
            UaEvent::MessageDone { id, code } if *id == nobody && *code >= 400
        )),
        "{ev:?}"
    );
}

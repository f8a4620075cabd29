//! A hand-driven world around one [`Proxy`] core: user agents are plain
//! message builders, time moves only when a test moves it.

#![allow(dead_code)]

use signaling::core::flow::{ConnId, Flow, Source, Transport};
use signaling::core::message::{HeaderName, Message};
use signaling::core::proxy::{Config, Event, Proxy};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use wire::handle::Handle;
use wire::keys::DeviceId;

pub const DOMAIN: &str = "parley.test";
pub const BOB: &str = "+14155550123";
pub const ALICE: &str = "+14155550100";

pub struct World {
    pub proxy: Proxy,
    pub now: Instant,
    pub events: Vec<Event>,
    seq: u32,
}

/// A user agent: where it is and how it reaches the proxy.
#[derive(Clone, Debug)]
pub struct Ua {
    pub name: String,
    pub flow: Flow,
    pub device: Option<DeviceId>,
    pub instance: String,
    pub push: bool,
}

pub fn udp(addr: &str) -> Flow {
    Flow {
        transport: Transport::Udp,
        remote: addr.parse().unwrap(),
        conn: None,
    }
}

pub fn tcp(addr: &str, conn: u64) -> Flow {
    Flow {
        transport: Transport::Tcp,
        remote: addr.parse().unwrap(),
        conn: Some(ConnId(conn)),
    }
}

impl Ua {
    pub fn new(name: &str, flow: Flow) -> Ua {
        Ua {
            name: name.into(),
            flow,
            device: Some(DeviceId::random()),
            instance: format!("urn:parley:test:{name}"),
            push: false,
        }
    }

    pub fn contact(&self) -> String {
        let t = match self.flow.transport {
            Transport::Udp => "",
            _ => ";transport=tcp",
        };
        let pn = if self.push {
            ";pn-provider=parley;pn-prid=feedface;pn-param=app.voip"
        } else {
            ""
        };
        format!(
            "<sip:{}@{}{t}{pn}>;+sip.instance=\"<{}>\"",
            self.name, self.flow.remote, self.instance
        )
    }

    pub fn via(&self, branch: &str) -> String {
        let t = match self.flow.transport {
            Transport::Udp => "UDP",
            _ => "TCP",
        };
        format!(
            "SIP/2.0/{t} {};branch=z9hG4bK{branch};rport",
            self.flow.remote
        )
    }
}

pub fn config() -> Config {
    let mut c = Config {
        domains: vec![DOMAIN.into()],
        advertise: vec![
            (Transport::Udp, "192.0.2.1:5060".parse().unwrap()),
            (Transport::Tcp, "192.0.2.1:5060".parse().unwrap()),
        ],
        realm: DOMAIN.into(),
        ..Config::default()
    };
    c.accounts
        .insert(Handle::parse(ALICE).unwrap(), "alice-secret".into());
    c
}

impl World {
    pub fn new() -> World {
        World::with(config())
    }

    /// A node of several: `config` keyed with `secret`, on Unix time
    /// (`unix` now), its ids starting at `first_id`.
    pub fn node(config: Config, secret: [u8; 32], unix: u64, first_id: u64) -> World {
        let mut w = World::with(config.clone());
        w.proxy = Proxy::new(config, secret, w.now).with_wall_clock(unix, first_id);
        w
    }

    pub fn with(config: Config) -> World {
        let now = Instant::now();
        World {
            proxy: Proxy::new(config, [9; 32], now),
            now,
            events: Vec::new(),
            seq: 0,
        }
    }

    /// Delivers a message from `ua` and returns everything the proxy sent.
    pub fn send(&mut self, ua: &Ua, text: &str) -> Vec<(Flow, Message)> {
        let source = Source {
            flow: ua.flow,
            device: ua.device,
        };
        let bytes = text.replace('\n', "\r\n");
        self.proxy.handle_input(source, bytes.as_bytes(), self.now);
        self.drain()
    }

    /// Delivers an already-built message.
    pub fn send_msg(&mut self, ua: &Ua, m: &Message) -> Vec<(Flow, Message)> {
        let source = Source {
            flow: ua.flow,
            device: ua.device,
        };
        self.proxy.handle_input(source, &m.to_bytes(), self.now);
        self.drain()
    }

    pub fn advance(&mut self, d: Duration) -> Vec<(Flow, Message)> {
        let until = self.now + d;
        let mut out = Vec::new();
        // Step through every timer on the way, as a runtime would.
        while let Some(t) = self.proxy.poll_timeout() {
            if t > until {
                break;
            }
            self.now = self.now.max(t);
            self.proxy.handle_timeout(self.now);
            out.extend(self.drain());
        }
        self.now = until;
        self.proxy.handle_timeout(self.now);
        out.extend(self.drain());
        out
    }

    pub fn drain(&mut self) -> Vec<(Flow, Message)> {
        let mut out = Vec::new();
        while let Some(t) = self.proxy.poll_transmit() {
            let m = Message::parse(&t.bytes).expect("the proxy writes valid SIP");
            out.push((t.flow, m));
        }
        while let Some(e) = self.proxy.poll_event() {
            if let Event::Authorize { id, .. } = &e {
                // Every device is listed for the handle in these scenarios.
                self.proxy.handle_authorization(*id, true, self.now);
                while let Some(t) = self.proxy.poll_transmit() {
                    out.push((t.flow, Message::parse(&t.bytes).unwrap()));
                }
            }
            self.events.push(e);
        }
        out
    }

    /// A push-capable phone registered for `handle` over TCP connection 7,
    /// whose app then went to the background: its connection is closed.
    pub fn sleeping_phone(&mut self, handle: &str) -> Ua {
        let mut phone = Ua::new("phone", tcp("10.0.0.11:40000", 7));
        phone.push = true;
        self.register(&phone, handle);
        self.proxy.handle_conn_closed(ConnId(7), self.now);
        phone
    }

    pub fn register(&mut self, ua: &Ua, handle: &str) {
        self.seq += 1;
        let text = format!(
            "REGISTER sip:{DOMAIN} SIP/2.0\n\
             Via: {}\n\
             From: <sip:{handle}@{DOMAIN}>;tag=r{}\n\
             To: <sip:{handle}@{DOMAIN}>\n\
             Call-ID: reg-{}-{}\n\
             CSeq: {} REGISTER\n\
             Contact: {}\n\
             Expires: 600\n\
             Content-Length: 0\n\n",
            ua.via(&format!("reg{}", self.seq)),
            self.seq,
            ua.name,
            ua.instance,
            self.seq,
            ua.contact()
        );
        let out = self.send(ua, &text);
        let ok = out.iter().any(|(_, m)| m.code() == Some(200));
        assert!(ok, "REGISTER of {} not accepted: {out:#?}", ua.name);
    }

    /// An INVITE from `caller` to `handle`; returns what the proxy sent.
    pub fn invite(&mut self, caller: &Ua, handle: &str, call: &str) -> Vec<(Flow, Message)> {
        let text = invite_text(caller, handle, call, &format!("inv-{call}"));
        self.send(caller, &text)
    }
}

/// A REGISTER from `ua` for `handle` with `extra` header lines (a
/// Contact, credentials…), CSeq `cseq` on one Call-ID per user agent.
pub fn register_text(ua: &Ua, handle: &str, cseq: u32, extra: &str) -> String {
    format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\n\
     Via: {}\n\
     From: <sip:{handle}@{DOMAIN}>;tag=r\n\
     To: <sip:{handle}@{DOMAIN}>\n\
     Call-ID: reg-{}\n\
     CSeq: {cseq} REGISTER\n\
     {extra}\
     Content-Length: 0\n\n",
        ua.via(&format!("r{cseq}")),
        ua.name
    )
}

pub fn invite_text(caller: &Ua, handle: &str, call: &str, branch: &str) -> String {
    format!(
        "INVITE sip:{handle}@{DOMAIN} SIP/2.0\n\
         Via: {}\n\
         Max-Forwards: 70\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         To: <sip:{handle}@{DOMAIN}>\n\
         Call-ID: {call}\n\
         CSeq: 1 INVITE\n\
         Contact: <sip:alice@{}>\n\
         Content-Type: application/sdp\n\
         Content-Length: 5\n\n\
         v=0\n",
        caller.via(branch),
        caller.flow.remote
    )
}

/// The response a UA sends to a request it received.
pub fn reply(req: &Message, code: u16, reason: &str, tag: &str) -> Message {
    let mut r = Message::dialog_response(req, code, reason, tag);
    if req.method().is_some_and(|m| m.as_str() == "INVITE") && (200..300).contains(&code) {
        r.push(HeaderName::CONTACT, "<sip:uas@10.0.0.99:5060>".to_string());
    }
    r
}

/// Messages sent to a flow's address.
pub fn to<'a>(out: &'a [(Flow, Message)], ua: &Ua) -> Vec<&'a Message> {
    out.iter()
        .filter(|(f, _)| f.remote == ua.flow.remote)
        .map(|(_, m)| m)
        .collect()
}

pub fn requests<'a>(out: &'a [(Flow, Message)], ua: &Ua, method: &str) -> Vec<&'a Message> {
    to(out, ua)
        .into_iter()
        .filter(|m| m.method().is_some_and(|x| x.as_str() == method))
        .collect()
}

pub fn codes(out: &[(Flow, Message)], ua: &Ua) -> Vec<u16> {
    to(out, ua).iter().filter_map(|m| m.code()).collect()
}

pub fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn bob_devices() -> HashMap<&'static str, Ua> {
    let mut m = HashMap::new();
    m.insert("phone", Ua::new("phone", udp("10.0.0.11:5060")));
    m.insert("laptop", Ua::new("laptop", udp("10.0.0.12:5060")));
    m.insert("tablet", Ua::new("tablet", udp("10.0.0.13:5060")));
    m
}

/// Bob's laptop registered, Alice's call to Bob answered: (Alice, the
/// laptop, the Record-Route the laptop saw).
pub fn answered_call(w: &mut World, call: &str) -> (Ua, Ua, String) {
    let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
    w.register(&laptop, BOB);
    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    let out = w.send(
        &alice,
        &invite_text(&alice, BOB, call, &format!("i-{call}")),
    );
    let inv = requests(&out, &laptop, "INVITE")[0].clone();
    let rr = inv.header(&HeaderName::RECORD_ROUTE).unwrap().to_string();
    w.send_msg(&laptop, &reply(&inv, 200, "OK", "lap"));
    (alice, laptop, rr)
}

/// Alice's BYE of `call` along `rr`.
pub fn bye(ua: &Ua, call: &str, rr: &str, branch: &str) -> String {
    format!(
        "BYE sip:uas@10.0.0.99:5060;transport=tcp SIP/2.0\n\
         Via: {}\n\
         Route: {rr}\n\
         Max-Forwards: 70\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         To: <sip:{BOB}@{DOMAIN}>;tag=lap\n\
         Call-ID: {call}\n\
         CSeq: 2 BYE\n\
         Content-Length: 0\n\n",
        ua.via(branch)
    )
}

/// The digest challenge in the answer `ua` got.
pub fn challenge(out: &[(Flow, Message)], ua: &Ua) -> String {
    to(out, ua)[0]
        .header(&HeaderName::WWW_AUTHENTICATE)
        .unwrap()
        .to_string()
}

/// An Authorization header line answering `challenge` for a REGISTER to
/// `uri` as `user`, with nonce count `nc`.
pub fn authorization(challenge: &str, uri: &str, user: &str, secret: &str, nc: u32) -> String {
    let a =
        wire::sip::digest::respond(&[challenge], "REGISTER", uri, user, secret, "cn", nc).unwrap();
    format!("Authorization: {a}\n")
}

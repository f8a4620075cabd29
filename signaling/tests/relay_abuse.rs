//! What a stranger (or another user) can make the proxy send: nothing to
//! any address but its own, once, within its budget. The proxy forwards a
//! request only to a registered binding or along a route token it signed
//! for that dialog; everything else is refused without a transaction.

mod sim;

use proptest::prelude::*;
use signaling::core::flow::{Flow, Source, Transport};
use signaling::core::message::{HeaderName, Message};
use signaling::core::proxy::{Config, Event};
use sim::*;
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use wire::net::IpNet;

fn stranger(flow: Flow) -> Ua {
    let mut ua = Ua::new("stranger", flow);
    ua.device = None;
    ua
}

/// A request of `method` to `ruri`, with optional Route and To tag.
fn request(ua: &Ua, method: &str, ruri: &str, route: Option<&str>, to_tag: bool) -> String {
    let route = route.map(|r| format!("Route: {r}\n")).unwrap_or_default();
    let tag = if to_tag { ";tag=victim" } else { "" };
    format!(
        "{method} {ruri} SIP/2.0\n\
         Via: {}\n\
         {route}\
         Max-Forwards: 70\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=evil\n\
         To: <sip:{BOB}@{DOMAIN}>{tag}\n\
         Call-ID: abuse-{method}-{}\n\
         CSeq: 1 {method}\n\
         Contact: <sip:evil@{}>\n\
         Content-Length: 0\n\n",
        ua.via(&format!("ab{}", ruri.len())),
        ruri.len(),
        ua.flow.remote
    )
}

/// Every address the proxy sent to, other than `ua`'s own.
fn elsewhere(out: &[(Flow, Message)], ua: &Ua) -> Vec<SocketAddr> {
    out.iter()
        .map(|(f, _)| f.remote)
        .filter(|a| a.ip() != ua.flow.remote.ip())
        .collect()
}

#[test]
fn a_preloaded_route_or_a_to_tag_does_not_relay_to_any_host() {
    let targets = [
        "127.0.0.1:5070",
        "127.0.0.1:5070;transport=tcp",
        "127.0.0.1:22;transport=tcp",
        "[::1]:5070",
        "[::1]:5070;transport=tcp",
        "10.1.2.3:5060;transport=tls",
        "169.254.169.254:80;transport=tcp",
        "203.0.113.9",
    ];
    for from in [udp("198.51.100.7:5060"), tcp("198.51.100.7:40000", 7)] {
        for target in targets {
            let mut w = World::new();
            let ua = stranger(from);
            let cases = [
                // Preloaded Route to the target, Request-URI a handle of ours.
                (
                    "INVITE",
                    format!("sip:{BOB}@{DOMAIN}"),
                    Some(format!("<sip:{target};lr>")),
                    false,
                ),
                // A To tag and a Request-URI naming the target.
                ("INVITE", format!("sip:x@{target}"), None, true),
                ("BYE", format!("sip:x@{target}"), None, true),
                ("MESSAGE", format!("sip:x@{target}"), None, true),
                // Both, with our own address first in the Route set.
                (
                    "INFO",
                    format!("sip:x@{target}"),
                    Some(format!("<sip:192.0.2.1:5060;lr>, <sip:{target};lr>")),
                    true,
                ),
            ];
            for (method, ruri, route, tag) in cases {
                let text = request(&ua, method, &ruri, route.as_deref(), tag);
                let out = w.send(&ua, &text);
                assert!(
                    elsewhere(&out, &ua).is_empty(),
                    "{method} via {target} reached {:?}",
                    elsewhere(&out, &ua)
                );
                assert_eq!(codes(&out, &ua), vec![403], "{method} via {target}");
                let r = to(&out, &ua)[0];
                assert!(
                    format!("{:?}", r.start).contains("Relaying Forbidden"),
                    "{r:?}"
                );
            }
            // An ACK is never answered and never forwarded.
            let ack = request(&ua, "ACK", &format!("sip:x@{target}"), None, true);
            assert!(w.send(&ua, &ack).is_empty(), "ACK via {target}");
            // Nothing is retransmitted later: no transaction was made.
            let later = w.advance(Duration::from_secs(40));
            assert!(later.is_empty(), "{later:?}");
            assert!(w.proxy.metrics().relay_refused >= 5);
        }
    }
}

#[test]
fn a_spoofed_invite_gets_one_answer_and_the_budget_bounds_the_rest() {
    let mut config = config();
    config.source_rate = 5;
    let mut w = World::with(config);
    // The "source" is the victim of a reflection attack.
    let victim = stranger(udp("198.51.100.8:5060"));
    let foreign = request(&victim, "INVITE", "sip:x@203.0.113.9", None, false);
    let out = w.send(&victim, &foreign);
    assert_eq!(codes(&out, &victim), vec![403]);
    let out = w.advance(Duration::from_secs(40));
    assert!(out.is_empty(), "Timer G would resend the 403: {out:?}");
    // An INVITE to a real handle is challenged once, also statelessly.
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    let out = w.invite(&victim, BOB, "reflect");
    assert_eq!(codes(&out, &victim), vec![407]);
    assert!(w.advance(Duration::from_secs(40)).is_empty());
    // The ACKs for those challenges are absorbed without spending the
    // budget: two more challenges still get their answers.
    let mut small = sim::config();
    small.source_rate = 2;
    let mut w2 = World::with(small);
    w2.register(&phone, BOB);
    let caller = stranger(udp("198.51.100.20:5060"));
    for i in 0..2 {
        let out = w2.invite(&caller, BOB, &format!("acked-{i}"));
        let challenge = to(&out, &caller)[0].clone();
        assert_eq!(challenge.code(), Some(407));
        let ack = format!(
            "ACK sip:{BOB}@{DOMAIN} SIP/2.0\n\
             Via: {}\n\
             Max-Forwards: 70\n\
             From: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
             To: {}\n\
             Call-ID: acked-{i}\n\
             CSeq: 1 ACK\n\
             Content-Length: 0\n\n",
            caller.via(&format!("inv-acked-{i}")),
            challenge.header(&HeaderName::TO).unwrap()
        );
        assert!(
            w2.send(&caller, &ack).is_empty(),
            "an ACK is never answered"
        );
    }
    assert_eq!(w2.proxy.metrics().rate_limited, 0);
    // A flood: at most `source_rate` answers a second, then silence over
    // UDP; a TCP peer (its address is proven) is told 503.
    let mut answered = 0;
    for i in 0..50 {
        let text = invite_text(&victim, BOB, &format!("flood-{i}"), &format!("fl{i}"));
        answered += w.send(&victim, &text).len();
    }
    assert!(answered <= 6, "{answered} answers to 50 spoofed INVITEs");
    let tcp_peer = stranger(tcp("198.51.100.9:40000", 9));
    let mut refused = 0;
    for i in 0..20 {
        let text = invite_text(&tcp_peer, BOB, &format!("t-{i}"), &format!("t{i}"));
        refused += codes(&w.send(&tcp_peer, &text), &tcp_peer)
            .iter()
            .filter(|c| **c == 503)
            .count();
    }
    assert!(refused >= 14, "{refused}");
    // A /64 is one source: another address in it shares the budget.
    let a = stranger(udp("[2001:db8:5::1]:5060"));
    let b = stranger(udp("[2001:db8:5::2:3]:5060"));
    let mut answers = 0;
    for i in 0..10 {
        for ua in [&a, &b] {
            let text = invite_text(ua, BOB, &format!("v6-{i}"), &format!("v{i}"));
            answers += w.send(ua, &text).len();
        }
    }
    assert!(answers <= 6, "{answers} answers to one /64");
}

#[test]
fn forwarding_outside_our_dialogs_needs_authentication_and_the_allow_list() {
    let mut config = config();
    config.forward_to = vec!["127.0.0.0/8".parse::<IpNet>().unwrap()];
    let mut w = World::with(config);
    let trunk = "127.0.0.1:5070";
    let target = format!("sip:+15550001@{trunk}");
    // A stranger is challenged, and nothing goes to the trunk.
    let s = stranger(udp("198.51.100.7:5060"));
    let out = w.send(&s, &request(&s, "INVITE", &target, None, true));
    assert_eq!(codes(&out, &s), vec![407]);
    assert!(elsewhere(&out, &s).is_empty());
    // A device (certificate) may reach the allowed trunk...
    let device = Ua::new("device", tcp("10.0.0.20:40000", 20));
    let out = w.send(&device, &request(&device, "INVITE", &target, None, true));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0.remote, trunk.parse::<SocketAddr>().unwrap());
    // ...but not anything else.
    let other = "sip:+15550001@127.0.0.1:22;transport=tcp".replace("127.0.0.1", "10.9.9.9");
    let out = w.send(&device, &request(&device, "BYE", &other, None, true));
    assert_eq!(codes(&out, &device), vec![403]);
    assert!(elsewhere(&out, &device).is_empty());
    // A digest account answers the challenge and is forwarded.
    let phone = stranger(udp("10.0.0.30:5060"));
    let text = request(&phone, "MESSAGE", &target, None, true);
    let out = w.send(&phone, &text);
    let challenge = to(&out, &phone)[0]
        .header(&HeaderName::PROXY_AUTHENTICATE)
        .unwrap()
        .to_string();
    let answer = wire::sip::digest::respond(
        &[&challenge],
        "MESSAGE",
        &target,
        ALICE,
        "alice-secret",
        "c1",
        1,
    )
    .unwrap();
    let authed = text.replace(
        "Max-Forwards",
        &format!("Proxy-Authorization: {answer}\nMax-Forwards"),
    );
    let out = w.send(&phone, &authed);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].0.remote, trunk.parse::<SocketAddr>().unwrap());
    assert!(!out[0].1.has(&HeaderName::PROXY_AUTHORIZATION), "consumed");
}

/// Sets up Alice (TCP) calling Bob's laptop (TCP) to an answered call and
/// returns them with the Record-Route entry.
#[test]
fn route_tokens_are_bound_to_their_dialog_and_expire() {
    let mut config = config();
    config.dialog_lifetime = Duration::from_secs(3600);
    let mut w = World::with(config);
    let (alice, laptop, rr) = answered_call(&mut w, "call-a");
    // The token of call-a does not route another Call-ID.
    let out = w.send(&alice, &bye(&alice, "call-b", &rr, "b1"));
    assert!(
        out.iter().all(|(f, _)| f.remote != laptop.flow.remote),
        "{out:?}"
    );
    assert_eq!(codes(&out, &alice), vec![481]);
    // In its own dialog it routes...
    let out = w.send(&alice, &bye(&alice, "call-a", &rr, "b2"));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.remote, laptop.flow.remote);
    // ...until the dialog's lifetime is over.
    w.advance(Duration::from_secs(3601));
    let out = w.send(&alice, &bye(&alice, "call-a", &rr, "b3"));
    assert!(out.iter().all(|(f, _)| f.remote != laptop.flow.remote));
    assert_eq!(codes(&out, &alice), vec![481]);
}

#[test]
fn a_revoked_device_cannot_send_into_its_dialogs() {
    let mut w = World::new();
    let (alice, laptop, rr) = answered_call(&mut w, "call-r");
    let revoked: HashSet<_> = [alice.device.unwrap()].into_iter().collect();
    w.proxy.handle_revoked(revoked, w.now);
    let out = w.send(&alice, &bye(&alice, "call-r", &rr, "r1"));
    assert!(out.iter().all(|(f, _)| f.remote != laptop.flow.remote));
    assert_eq!(codes(&out, &alice), vec![403]);
}

#[test]
fn responses_go_back_only_to_the_flow_the_request_came_from() {
    let mut w = World::new();
    let (alice, laptop, rr) = answered_call(&mut w, "call-v");
    let out = w.send(&alice, &bye(&alice, "call-v", &rr, "v1"));
    let fwd = out[0].1.clone();
    // The laptop answers with a second Via naming another host: the
    // response still goes to Alice's connection, never to that host.
    let mut resp = reply(&fwd, 200, "OK", "lap");
    let vias: Vec<String> = resp.values(&HeaderName::VIA).map(str::to_string).collect();
    resp.remove(&HeaderName::VIA);
    resp.push(HeaderName::VIA, vias[0].clone());
    resp.push(
        HeaderName::VIA,
        "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKx;rport=5070".to_string(),
    );
    let out = w.send_msg(&laptop, &resp);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.remote, alice.flow.remote);
    // A response whose Via token belongs to another Call-ID goes nowhere.
    let mut other = reply(&fwd, 200, "OK", "lap");
    other.set(HeaderName::CALL_ID, "call-w".to_string());
    assert!(w.send_msg(&laptop, &other).is_empty());
}

#[test]
fn a_caller_calls_as_itself_only() {
    let mut w = World::new();
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    // A digest account (Alice's) may not call as Bob.
    let softphone = stranger(udp("10.0.0.40:5060"));
    let text = invite_text(&softphone, ALICE, "spoof-1", "sp1").replace(
        &format!("From: <sip:{ALICE}@"),
        &format!("From: <sip:{BOB}@"),
    );
    let out = w.send(&softphone, &text);
    let challenge = to(&out, &softphone)[0]
        .header(&HeaderName::PROXY_AUTHENTICATE)
        .unwrap()
        .to_string();
    let uri = format!("sip:{ALICE}@{DOMAIN}");
    let answer = |nc: u32| {
        wire::sip::digest::respond(
            &[&challenge],
            "INVITE",
            &uri,
            ALICE,
            "alice-secret",
            "c",
            nc,
        )
        .unwrap()
    };
    let authed = text.replace(
        "Max-Forwards",
        &format!("Proxy-Authorization: {}\nMax-Forwards", answer(1)),
    );
    let out = w.send(&softphone, &authed.replace("sp1", "sp2"));
    assert_eq!(codes(&out, &softphone), vec![403]);
    assert!(requests(&out, &phone, "INVITE").is_empty());
    assert_eq!(w.proxy.metrics().caller_id_refused, 1);

    // A device may call only as a handle it is listed for: Bob's phone
    // (registered for Bob) calling as Alice is asked about, and refused.
    let alice_dev = Ua::new("alice-dev", udp("10.0.0.41:5060"));
    w.register(&alice_dev, ALICE);
    let text = invite_text(&phone, ALICE, "spoof-2", "sp3");
    w.proxy.handle_input(
        Source {
            flow: phone.flow,
            device: phone.device,
        },
        text.replace('\n', "\r\n").as_bytes(),
        w.now,
    );
    let mut asked = None;
    while let Some(e) = w.proxy.poll_event() {
        if let Event::Authorize { id, handle, device } = e {
            assert_eq!(handle.as_str(), ALICE, "the From's handle is checked");
            assert_eq!(Some(device), phone.device);
            asked = Some(id);
        }
    }
    let id = asked.expect("the directory is asked");
    w.proxy.handle_authorization(id, false, w.now);
    let out = w.drain();
    assert!(requests(&out, &alice_dev, "INVITE").is_empty());
    assert!(codes(&out, &phone).contains(&403), "{out:?}");
    // As itself (registered for Bob), it calls at once.
    let text = invite_text(&phone, ALICE, "own-1", "own1").replace(
        &format!("From: <sip:{ALICE}@"),
        &format!("From: <sip:{BOB}@"),
    );
    let out = w.send(&phone, &text);
    assert_eq!(requests(&out, &alice_dev, "INVITE").len(), 1);
    // A From in another domain is nobody's handle here.
    let text = invite_text(&phone, ALICE, "own-2", "own2").replace(
        &format!("From: <sip:{ALICE}@{DOMAIN}>"),
        "From: <sip:ceo@bank.example>",
    );
    let out = w.send(&phone, &text);
    assert_eq!(codes(&out, &phone), vec![403]);
}

#[test]
fn digest_answers_are_for_this_request_uri_and_used_once() {
    let mut w = World::new();
    let ua = stranger(udp("10.0.0.5:5060"));
    let register = |cseq: u32, extra: &str| {
        let lines = format!("Contact: <sip:alice@10.0.0.5:5060>\n{extra}");
        register_text(&ua, ALICE, cseq, &lines)
    };
    let out = w.send(&ua, &register(1, ""));
    let challenge = challenge(&out, &ua);
    let answer = |uri: &str, nc: u32| authorization(&challenge, uri, ALICE, "alice-secret", nc);
    // SIPp's default: the answer names another URI than the request's.
    let out = w.send(&ua, &register(2, &answer("sip:127.0.0.1:5070", 1)));
    assert_eq!(codes(&out, &ua), vec![400]);
    let out = w.send(&ua, &register(3, &answer(&format!("sip:{DOMAIN}"), 1)));
    assert_eq!(codes(&out, &ua), vec![200]);
    // The same answer in a new request (a sniffed REGISTER replayed with
    // the attacker's Contact) is refused with a stale challenge.
    let replay = register(4, &answer(&format!("sip:{DOMAIN}"), 1))
        .replace("sip:alice@10.0.0.5:5060", "sip:attacker@203.0.113.66:5060");
    let out = w.send(&ua, &replay);
    assert_eq!(codes(&out, &ua), vec![401]);
    let again = to(&out, &ua)[0];
    assert!(again
        .header(&HeaderName::WWW_AUTHENTICATE)
        .unwrap()
        .contains("stale=true"));
    assert_eq!(w.proxy.metrics().digest_replays, 1);
    // The next count is fine.
    let out = w.send(&ua, &register(5, &answer(&format!("sip:{DOMAIN}"), 2)));
    assert_eq!(codes(&out, &ua), vec![200]);
    let contacts: Vec<String> = to(&out, &ua)[0]
        .values(&HeaderName::CONTACT)
        .map(str::to_string)
        .collect();
    assert!(
        contacts.iter().all(|c| !c.contains("attacker")),
        "{contacts:?}"
    );
}

// ---------------------------------------------------------------------
// Random abuse from unauthenticated sources.

fn host() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(DOMAIN.to_string()),
        Just("192.0.2.1".to_string()),
        Just("192.0.2.1:5060".to_string()),
        Just("127.0.0.1".to_string()),
        Just("127.0.0.1:5070".to_string()),
        Just("[::1]:5070".to_string()),
        Just("10.0.0.11:5060".to_string()),
        Just("169.254.169.254:80".to_string()),
        Just("203.0.113.5".to_string()),
        Just("evil.example".to_string()),
    ]
}

fn uri() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just(String::new()),
            Just(format!("{BOB}@")),
            Just("x@".into())
        ],
        host(),
        prop_oneof![
            Just(""),
            Just(";transport=tcp"),
            Just(";transport=tls"),
            Just(";lr"),
            Just(";lr;transport=tcp"),
            Just(";lr;pf=u7f0000011396.x10.0011223344556677"),
            Just(";lr;ftag=evil;pf=garbage"),
        ],
    )
        .prop_map(|(user, host, params)| format!("sip:{user}{host}{params}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn unauthenticated_requests_reach_no_one_but_their_sender(
        method in prop_oneof![
            Just("INVITE"), Just("ACK"), Just("BYE"), Just("CANCEL"), Just("OPTIONS"),
            Just("MESSAGE"), Just("INFO"), Just("UPDATE"), Just("REFER"), Just("SUBSCRIBE"),
            Just("NOTIFY"), Just("PRACK"), Just("REGISTER"),
        ],
        ruri in uri(),
        routes in prop::collection::vec(uri(), 0..3),
        to_tag in any::<bool>(),
        via_extra in prop_oneof![
            Just(""), Just(";rport"), Just(";received=127.0.0.1"),
            Just(";rport=5070;received=10.0.0.11"), Just(";maddr=127.0.0.1"),
        ],
        via_host in prop_oneof![Just("198.51.100.7:5060"), Just("127.0.0.1:5070"), Just("evil.example")],
        reliable in any::<bool>(),
    ) {
        let mut w = World::new();
        let phone = Ua::new("phone", udp("10.0.0.11:5060"));
        let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
        w.register(&phone, BOB);
        w.register(&laptop, BOB);
        let from = if reliable { tcp("198.51.100.7:40001", 99) } else { udp("198.51.100.7:5060") };
        let s = stranger(from);
        let route = if routes.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = routes.iter().map(|r| format!("<{r}>")).collect();
            format!("Route: {}\n", list.join(", "))
        };
        let tag = if to_tag { ";tag=t1" } else { "" };
        let t = if reliable { "TCP" } else { "UDP" };
        let text = format!(
            "{method} {ruri} SIP/2.0\n\
             Via: SIP/2.0/{t} {via_host};branch=z9hG4bKfz{via_extra}\n\
             {route}\
             Max-Forwards: 70\n\
             From: <sip:{ALICE}@{DOMAIN}>;tag=f1\n\
             To: <sip:{BOB}@{DOMAIN}>{tag}\n\
             Call-ID: fuzz-1\n\
             CSeq: 1 {method}\n\
             Contact: <sip:x@198.51.100.7:5060>\n\
             Content-Length: 0\n\n"
        );
        let mut out = w.send(&s, &text);
        out.extend(w.advance(Duration::from_secs(60)));
        let source_ip: IpAddr = s.flow.remote.ip();
        for (flow, m) in &out {
            prop_assert_eq!(flow.remote.ip(), source_ip, "sent {:?} to {}", m.start, flow.remote);
            prop_assert!(!m.is_request(), "a request left: {:?}", m.start);
            if reliable {
                prop_assert_eq!(flow.transport, Transport::Tcp);
            }
        }
        prop_assert!(out.len() <= 1, "{} answers to one request", out.len());
        let woke = w.events.iter().any(|e| matches!(e, Event::Wake(_)));
        prop_assert!(!woke, "a device was woken");
    }
}

#[test]
fn the_default_config_forwards_nowhere_foreign() {
    assert!(Config::default().forward_to.is_empty());
}

// ---------------------------------------------------------------------
// Wake-ups.

fn wakes(w: &World) -> usize {
    w.events
        .iter()
        .filter(|e| matches!(e, Event::Wake(_)))
        .count()
}

#[test]
fn a_wake_up_names_the_registering_device_and_digest_bindings_are_not_woken() {
    let mut w = World::new();
    let phone = w.sleeping_phone(BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    w.invite(&alice, BOB, "w-1");
    let device = w.events.iter().find_map(|e| match e {
        Event::Wake(wake) => Some(wake.device),
        _ => None,
    });
    assert_eq!(device, phone.device, "the push service checks this device");

    // A SIP phone with a digest account registers push parameters naming
    // some token: nobody can say whose token it is, so it is never woken.
    let mut config = config();
    config.accounts.insert(
        wire::handle::Handle::parse(BOB).unwrap(),
        "bob-secret".into(),
    );
    let mut w = World::with(config);
    let sip_phone = stranger(tcp("10.0.0.50:40000", 50));
    let contact = "<sip:p@10.0.0.50:40000;transport=tcp;pn-provider=parley;pn-prid=feedface;pn-param=app.voip>";
    let register = |cseq: u32, auth: &str| {
        register_text(
            &sip_phone,
            BOB,
            cseq,
            &format!("Contact: {contact}\n{auth}"),
        )
    };
    let out = w.send(&sip_phone, &register(1, ""));
    let answer = authorization(
        &challenge(&out, &sip_phone),
        &format!("sip:{DOMAIN}"),
        BOB,
        "bob-secret",
        1,
    );
    let out = w.send(&sip_phone, &register(2, &answer));
    assert_eq!(codes(&out, &sip_phone), vec![200]);
    w.proxy
        .handle_conn_closed(signaling::core::flow::ConnId(50), w.now);
    let out = w.invite(&alice, BOB, "w-2");
    assert_eq!(wakes(&w), 0);
    assert!(codes(&out, &alice).contains(&480), "{out:?}");
}

#[test]
fn wake_ups_are_budgeted_per_caller_and_per_callee() {
    let mut config = config();
    config.wakes_per_minute = 3;
    let mut w = World::with(config);
    w.sleeping_phone(BOB);
    // One caller calls again and again: three wake-ups, then none.
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    for i in 0..6 {
        let text = invite_text(&alice, BOB, &format!("rep-{i}"), &format!("rep{i}"));
        w.send(&alice, &text);
    }
    assert_eq!(wakes(&w), 3);
    assert_eq!(w.proxy.metrics().wakes_limited, 3);
    // A minute later the caller may wake the callee again.
    w.advance(Duration::from_secs(61));
    w.events.clear();
    w.send(&alice, &invite_text(&alice, BOB, "later", "later"));
    assert_eq!(wakes(&w), 1);

    // Many callers (each under its own budget) for one callee: the
    // callee's budget bounds the wake-ups.
    w.advance(Duration::from_secs(61));
    w.events.clear();
    for i in 0..6 {
        let caller = Ua::new(&format!("c{i}"), udp(&format!("10.0.1.{i}:5060")));
        w.register(&caller, &format!("+1415555020{i}"));
        let text = invite_text(&caller, BOB, &format!("many-{i}"), &format!("m{i}")).replace(
            &format!("From: <sip:{ALICE}@"),
            &format!("From: <sip:+1415555020{i}@"),
        );
        w.send(&caller, &text);
    }
    assert_eq!(wakes(&w), 3);
}

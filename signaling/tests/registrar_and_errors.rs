//! REGISTER handling, authentication, in-dialog routing and hostile input,
//! driven through the core with hand-moved time.

mod sim;

use signaling::core::flow::{ConnId, Transport};
use signaling::core::message::HeaderName;
use signaling::core::proxy::Event;
use signaling::core::proxy::Proxy;
use sim::*;
use std::time::{Duration, Instant};

#[test]
fn digest_register_challenges_then_accepts_the_right_password_only() {
    let mut w = World::new();
    let www_md5_only = {
        let mut ua = Ua::new("md5", udp("10.0.0.4:5060"));
        ua.device = None;
        let contact = format!("Contact: {}\n", ua.contact());
        let out = w.send(&ua, &register_text(&ua, ALICE, 1, &contact));
        to(&out, &ua)[0]
            .lines(&HeaderName::WWW_AUTHENTICATE)
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(www_md5_only.len(), 1, "MD5 only unless SHA-256 is enabled");
    assert!(www_md5_only[0].contains("algorithm=MD5"));
    let mut config = config();
    config.digest_sha256 = true;
    let mut w = World::with(config);
    let mut ua = Ua::new("softphone", udp("10.0.0.5:5060"));
    ua.device = None; // a standard user agent: no device certificate
    let contact = format!("Contact: {}\n", ua.contact());
    let out = w.send(&ua, &register_text(&ua, ALICE, 1, &contact));
    let challenge = to(&out, &ua)[0].clone();
    assert_eq!(challenge.code(), Some(401));
    let www: Vec<&str> = challenge.lines(&HeaderName::WWW_AUTHENTICATE).collect();
    assert_eq!(www.len(), 2);
    assert!(www[0].contains("algorithm=SHA-256") && www[1].contains("algorithm=MD5"));
    let nonce = www[0]
        .split("nonce=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();

    let answer = |password: &str, nc: u32| {
        use ring::digest::{digest, SHA256};
        let h = |s: String| {
            digest(&SHA256, s.as_bytes())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let ha1 = h(format!("{ALICE}:{DOMAIN}:{password}"));
        let ha2 = h(format!("REGISTER:sip:{DOMAIN}"));
        let r = h(format!("{ha1}:{nonce}:{nc:08x}:c0ffee:auth:{ha2}"));
        format!(
            "Authorization: Digest username=\"{ALICE}\", realm=\"{DOMAIN}\", nonce=\"{nonce}\", \
             uri=\"sip:{DOMAIN}\", response=\"{r}\", algorithm=SHA-256, qop=auth, nc={nc:08x}, \
             cnonce=\"c0ffee\"\n"
        )
    };
    let wrong = format!("{contact}{}", answer("guess", 1));
    let out = w.send(&ua, &register_text(&ua, ALICE, 2, &wrong));
    assert_eq!(codes(&out, &ua), vec![401]);
    let right = format!("{contact}{}", answer("alice-secret", 1));
    let out = w.send(&ua, &register_text(&ua, ALICE, 3, &right));
    assert_eq!(codes(&out, &ua), vec![200]);
    // A retransmission is answered again from its transaction; the same
    // answer in another request is a replay (stale challenge); an older
    // CSeq with a fresh count is out of order.
    let out = w.send(&ua, &register_text(&ua, ALICE, 3, &right));
    assert_eq!(codes(&out, &ua), vec![200]);
    let out = w.send(&ua, &register_text(&ua, ALICE, 2, &right));
    assert_eq!(codes(&out, &ua), vec![401]);
    let next = format!("{contact}{}", answer("alice-secret", 2));
    let out = w.send(&ua, &register_text(&ua, ALICE, 2, &next));
    assert_eq!(codes(&out, &ua), vec![500]);
    // Alice's credentials do not register Bob.
    let bob = format!("{contact}{}", answer("alice-secret", 3));
    let out = w.send(&ua, &register_text(&ua, BOB, 4, &bob));
    assert_eq!(codes(&out, &ua), vec![403]);
}

#[test]
fn a_device_ids_does_not_list_is_refused() {
    let mut w = World::new();
    let ua = Ua::new("stolen", tcp("10.0.0.6:40000", 3));
    let contact = format!("Contact: {}\n", ua.contact());
    w.proxy.handle_input(
        signaling::core::flow::Source {
            flow: ua.flow,
            device: ua.device,
        },
        register_text(&ua, BOB, 1, &contact)
            .replace('\n', "\r\n")
            .as_bytes(),
        w.now,
    );
    let id = match w.proxy.poll_event() {
        Some(Event::Authorize { id, handle, .. }) => {
            assert_eq!(handle.as_str(), BOB);
            id
        }
        other => panic!("expected an authorization question, got {other:?}"),
    };
    w.proxy.handle_authorization(id, false, w.now);
    let out = w.drain();
    assert_eq!(codes(&out, &ua), vec![403]);
    assert!(w.proxy.registrar().is_empty());
}

#[test]
fn expiry_rules_wildcard_and_outbound() {
    let mut w = World::new();
    let ua = Ua::new("phone", tcp("10.0.0.7:40000", 4));
    let brief = format!("Contact: {};expires=10\n", ua.contact());
    let out = w.send(&ua, &register_text(&ua, BOB, 1, &brief));
    let r = to(&out, &ua)[0].clone();
    assert_eq!(r.code(), Some(423));
    assert_eq!(r.header(&HeaderName::MIN_EXPIRES), Some("60"));

    let ob = format!("Contact: {};reg-id=1\nSupported: outbound\n", ua.contact());
    let out = w.send(&ua, &register_text(&ua, BOB, 2, &ob));
    let r = to(&out, &ua)[0].clone();
    assert_eq!(r.code(), Some(200));
    assert_eq!(r.header(&HeaderName::REQUIRE), Some("outbound"));
    assert_eq!(r.header(&HeaderName::FLOW_TIMER), Some("120"));
    assert!(r
        .header(&HeaderName::CONTACT)
        .unwrap()
        .contains("expires=3600"));
    assert_eq!(w.proxy.registrar().len(), 1);

    // An outbound binding without push goes with its connection.
    w.proxy.handle_conn_closed(ConnId(4), w.now);
    assert_eq!(w.proxy.registrar().len(), 0);

    w.register(&ua, BOB);
    assert_eq!(w.proxy.registrar().len(), 1);
    let star = "Contact: *\nExpires: 0\n";
    let out = w.send(&ua, &register_text(&ua, BOB, 90, star));
    assert_eq!(codes(&out, &ua), vec![200]);
    assert_eq!(w.proxy.registrar().len(), 0);

    // Bindings expire.
    w.register(&ua, BOB);
    w.advance(Duration::from_secs(601 + 10));
    assert_eq!(w.proxy.registrar().len(), 0);
}

#[test]
fn in_dialog_requests_follow_record_route_over_the_right_connections() {
    let mut w = World::new();
    let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
    w.register(&laptop, BOB);
    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    let invite = invite_text(&alice, BOB, "call-d", "d1").replace(
        "Content-Type",
        "Identity: eyJhbGciOiJFUzI1NiJ9.e30.c2ln;info=<https://parley.test/k>\nContent-Type",
    );
    let out = w.send(&alice, &invite);
    let inv = requests(&out, &laptop, "INVITE")[0].clone();
    assert_eq!(
        inv.header(&HeaderName::IDENTITY),
        Some("eyJhbGciOiJFUzI1NiJ9.e30.c2ln;info=<https://parley.test/k>"),
        "the Identity header passes through untouched"
    );
    let rr: Vec<String> = inv
        .values(&HeaderName::RECORD_ROUTE)
        .map(str::to_string)
        .collect();
    assert_eq!(rr.len(), 1, "same transport both sides: one Record-Route");
    let out = w.send_msg(&laptop, &reply(&inv, 200, "OK", "lap"));
    let ok = to(&out, &alice)[0].clone();
    assert_eq!(ok.code(), Some(200));
    assert_eq!(out[0].0.conn, Some(ConnId(22)));

    // Alice's BYE, routed by the Record-Route, reaches the laptop over its
    // connection even though its Request-URI names another address.
    let bye = format!(
        "BYE sip:uas@10.0.0.99:5060;transport=tcp SIP/2.0\n\
         Via: {}\n\
         Route: {}\n\
         Max-Forwards: 70\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         To: <sip:{BOB}@{DOMAIN}>;tag=lap\n\
         Call-ID: call-d\n\
         CSeq: 2 BYE\n\
         Content-Length: 0\n\n",
        alice.via("bye1"),
        rr[0]
    );
    let out = w.send(&alice, &bye);
    assert_eq!(out.len(), 1);
    let (flow, fwd) = &out[0];
    assert_eq!(flow.conn, Some(ConnId(21)));
    assert_eq!(flow.transport, Transport::Tcp);
    assert!(!fwd.has(&HeaderName::ROUTE), "our Route entry is consumed");
    assert_eq!(fwd.values(&HeaderName::VIA).count(), 2);
    // Its 200 goes back to Alice's connection with our Via removed.
    let out = w.send_msg(&laptop, &reply(fwd, 200, "OK", "lap"));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.conn, Some(ConnId(22)));
    assert_eq!(out[0].1.values(&HeaderName::VIA).count(), 1);

    // A re-INVITE or UPDATE (an ICE restart) takes the same way.
    let update = bye
        .replace("BYE sip:", "UPDATE sip:")
        .replace("CSeq: 2 BYE", "CSeq: 2 UPDATE")
        .replace("bye1", "upd1");
    let out = w.send(&alice, &update);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.conn, Some(ConnId(21)));
    assert_eq!(out[0].1.method().map(|m| m.as_str()), Some("UPDATE"));

    // The laptop's own BYE the other way goes to Alice's connection.
    let bye_back = format!(
        "BYE sip:alice@10.0.0.1:41000 SIP/2.0\n\
         Via: {}\n\
         Route: {}\n\
         From: <sip:{BOB}@{DOMAIN}>;tag=lap\n\
         To: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         Call-ID: call-d\n\
         CSeq: 1 BYE\n\
         Content-Length: 0\n\n",
        laptop.via("bye2"),
        rr[0]
    );
    let out = w.send(&laptop, &bye_back);
    assert_eq!(out[0].0.conn, Some(ConnId(22)));

    // A BYE that names the proxy itself and has no route of ours would
    // loop: 404.
    let stray = bye
        .replace(&format!("Route: {}\n", rr[0]), "")
        .replace("sip:uas@10.0.0.99:5060;transport=tcp", "sip:192.0.2.1:5060")
        .replace("bye1", "bye4");
    let out = w.send(&alice, &stray);
    assert_eq!(codes(&out, &alice), vec![404]);

    // A forged token routes nowhere special: it is not ours.
    let forged = rr[0].replace("pf=", "pf=00");
    let out = w.send(
        &alice,
        &bye.replace(&rr[0], &forged).replace("bye1", "bye3"),
    );
    assert!(out.iter().all(|(f, _)| f.conn != Some(ConnId(21))));
}

#[test]
fn malformed_and_oversized_messages_get_400_or_nothing() {
    let mut w = World::new();
    let ua = Ua::new("x", udp("10.0.0.9:5060"));
    let no_callid = "OPTIONS sip:parley.test SIP/2.0\n\
        Via: SIP/2.0/UDP 10.0.0.9:5060;branch=z9hG4bKm1\n\
        From: <sip:a@parley.test>;tag=1\n\
        To: <sip:a@parley.test>\n\
        CSeq: 1 OPTIONS\n\
        Content-Length: 0\n\n";
    // Too broken for a well-formed answer: still a 400 that names it.
    w.proxy.handle_input(
        signaling::core::flow::Source {
            flow: ua.flow,
            device: None,
        },
        no_callid.replace('\n', "\r\n").as_bytes(),
        w.now,
    );
    let raw = w.proxy.poll_transmit().expect("a 400");
    let text = String::from_utf8(raw.bytes).unwrap();
    assert!(
        text.starts_with("SIP/2.0 400 Bad Request (Missing Call-ID Header)\r\n"),
        "{text}"
    );
    let bad_mf = no_callid.replace("CSeq", "Call-ID: m\nMax-Forwards: banana\nCSeq");
    let out = w.send(&ua, &bad_mf);
    let r = to(&out, &ua)[0].clone();
    assert_eq!(r.code(), Some(400));
    assert_eq!(r.call_id(), "m");
    assert!(format!("{:?}", r.start).contains("Bad Max-Forwards Header"));
    // Nothing to answer to: dropped, counted.
    assert!(w.send(&ua, "garbage\n\n").is_empty());
    let mut big = "MESSAGE sip:+14155550123@parley.test SIP/2.0\n".to_string();
    big.push_str(
        &"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n".repeat(1100),
    );
    let out = w.send(&ua, &big);
    assert!(out.is_empty() || codes(&out, &ua) == vec![400]);
    assert!(w.proxy.metrics().malformed >= 3);
    // A response never gets a 400.
    assert!(w.send(&ua, "SIP/2.0 200 OK\nVia: x\n\n").is_empty());
    // OPTIONS to the proxy itself is answered.
    let ping = no_callid.replace("CSeq", "Call-ID: ping\nCSeq");
    let out = w.send(&ua, &ping);
    let r = to(&out, &ua)[0].clone();
    assert_eq!(r.code(), Some(200));
    assert!(r.header(&HeaderName::ALLOW).unwrap().contains("INVITE"));
}

#[test]
fn calls_need_credentials_and_sources_are_rate_limited() {
    let mut w = World::new();
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    let mut stranger = Ua::new("stranger", udp("10.0.0.66:5060"));
    stranger.device = None;
    let out = w.invite(&stranger, BOB, "call-s");
    let r = to(&out, &stranger)[0].clone();
    assert_eq!(r.code(), Some(407));
    assert!(r.has(&HeaderName::PROXY_AUTHENTICATE));
    assert!(requests(&out, &phone, "INVITE").is_empty());

    let mut config = config();
    config.source_rate = 5;
    config.allow_unauthenticated_calls = true;
    let mut w = World::with(config);
    w.register(&phone, BOB);
    // Over TCP (the peer's address is proven) the flood is told 503.
    let mut flooder = Ua::new("flooder", tcp("10.0.0.67:40000", 67));
    flooder.device = None;
    let mut refused = 0;
    for i in 0..20 {
        let out = w.send(
            &flooder,
            &invite_text(&flooder, BOB, &format!("flood-{i}"), &format!("f{i}")),
        );
        if codes(&out, &flooder).contains(&503) {
            refused += 1;
        }
    }
    assert!(refused >= 14, "{refused} of 20 refused");
    assert!(w.proxy.metrics().rate_limited >= 14);
    // Over UDP (the source may be spoofed) past the budget nothing is sent.
    let mut forks = 0;
    for i in 0..20 {
        let out = w.send(
            &stranger,
            &invite_text(&stranger, BOB, &format!("udp-{i}"), &format!("u{i}")),
        );
        assert!(!codes(&out, &stranger).contains(&503));
        forks += requests(&out, &phone, "INVITE").len();
    }
    assert!(forks <= 6, "{forks} calls let through");
}

#[test]
fn message_to_a_handle_forks_without_cancel_and_times_out_with_408() {
    let mut w = World::new();
    let a = Ua::new("phone", udp("10.0.0.11:5060"));
    let b = Ua::new("laptop", udp("10.0.0.12:5060"));
    w.register(&a, BOB);
    w.register(&b, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let msg = format!(
        "MESSAGE sip:{BOB}@{DOMAIN} SIP/2.0\n\
         Via: {}\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=m\n\
         To: <sip:{BOB}@{DOMAIN}>\n\
         Call-ID: msg-1\n\
         CSeq: 1 MESSAGE\n\
         Content-Type: text/plain\n\
         Content-Length: 2\n\nhi",
        alice.via("m1")
    );
    let out = w.send(&alice, &msg);
    assert!(codes(&out, &alice).is_empty(), "no 100 for non-INVITE");
    assert_eq!(requests(&out, &a, "MESSAGE").len(), 1);
    assert_eq!(requests(&out, &b, "MESSAGE").len(), 1);
    // Timer E: T1, 2·T1, 4·T1, then T2 (4 s) apart; Timer F: 32 s → 408.
    let mut resent = 0;
    let mut final_code = None;
    for _ in 0..340 {
        let out = w.advance(Duration::from_millis(100));
        resent += requests(&out, &a, "MESSAGE").len();
        if let Some(c) = codes(&out, &alice).first() {
            final_code = Some(*c);
            break;
        }
    }
    assert_eq!(final_code, Some(408));
    assert_eq!(resent, 10, "retransmissions at 0.5, 1.5, 3.5, 7.5 … 31.5 s");
}

#[test]
fn draining_refuses_new_calls_and_registrations() {
    let mut w = World::new();
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    w.proxy.start_drain();
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "late");
    assert_eq!(codes(&out, &alice), vec![503]);
    let _ = Proxy::new(config(), [0; 32], Instant::now());
}

#[test]
fn a_revoked_device_loses_its_bindings_and_cannot_register_or_call() {
    let mut w = World::new();
    let phone = Ua::new("phone", tcp("10.0.0.11:40000", 5));
    let laptop = Ua::new("laptop", udp("10.0.0.12:5060"));
    w.register(&phone, BOB);
    w.register(&laptop, BOB);
    assert_eq!(w.proxy.registrar().len(), 2);
    let revoked: std::collections::HashSet<_> = [phone.device.unwrap()].into_iter().collect();
    w.proxy.handle_revoked(revoked, w.now);
    assert_eq!(w.proxy.registrar().len(), 1, "only the laptop is left");
    let contact = format!("Contact: {}\n", phone.contact());
    let out = w.send(&phone, &register_text(&phone, BOB, 7, &contact));
    assert_eq!(codes(&out, &phone), vec![403]);
    let out = w.invite(&phone, ALICE, "from-revoked");
    assert_eq!(codes(&out, &phone), vec![407]);
}

//! The proxy core's call scenarios under hand-moved time: every device
//! rings, the first answer wins, a decline ends the call everywhere,
//! sleeping devices are woken by push, and nothing rings forever.

mod sim;

use signaling::core::flow::Transport;
use signaling::core::message::{HeaderName, Message};
use signaling::core::proxy::Event;
use sim::*;
use std::time::Duration;

/// Alice calls Bob, whose three devices are registered: all three ring.
fn ringing(w: &mut World) -> (Ua, Vec<(Ua, Message)>) {
    let devices = bob_devices();
    for ua in devices.values() {
        w.register(ua, BOB);
    }
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-1");
    assert_eq!(codes(&out, &alice), vec![100], "100 Trying at once");
    let mut legs = Vec::new();
    for name in ["phone", "laptop", "tablet"] {
        let ua = devices[name].clone();
        let inv = requests(&out, &ua, "INVITE");
        assert_eq!(inv.len(), 1, "{name} rings");
        let inv = inv[0].clone();
        assert_eq!(inv.uri().unwrap().user.as_deref(), Some(name));
        assert!(
            inv.has(&HeaderName::RECORD_ROUTE),
            "proxy stays on the path"
        );
        assert_eq!(inv.values(&HeaderName::VIA).count(), 2);
        assert_eq!(inv.header(&HeaderName::MAX_FORWARDS), Some("69"));
        assert_eq!(inv.body, b"v=0\r\n", "SDP passes through untouched");
        legs.push((ua, inv));
    }
    for (ua, inv) in &legs {
        let out = w.send_msg(ua, &reply(inv, 180, "Ringing", &ua.name));
        assert_eq!(codes(&out, &alice), vec![180]);
    }
    (alice, legs)
}

#[test]
fn call_rings_all_devices_and_first_answer_cancels_the_rest() {
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let (laptop, inv) = &legs[1];
    let out = w.send_msg(laptop, &reply(inv, 200, "OK", "laptop"));
    assert_eq!(codes(&out, &alice), vec![200]);
    for (ua, _) in [&legs[0], &legs[2]] {
        let cancels = requests(&out, ua, "CANCEL");
        assert_eq!(cancels.len(), 1, "{} gets CANCEL", ua.name);
        assert_eq!(
            cancels[0].header(&HeaderName::REASON),
            Some("SIP;cause=200;text=\"Call completed elsewhere\"")
        );
    }
    assert!(requests(&out, laptop, "CANCEL").is_empty());
    assert_eq!(
        w.proxy.metrics().calls_active,
        0,
        "an answered call keeps no fork state"
    );
    // The cancelled devices answer 200 to CANCEL and 487 to INVITE; the
    // proxy ACKs the 487 and Alice hears nothing more.
    for (ua, inv) in [&legs[0], &legs[2]] {
        let cancel = requests(&out, ua, "CANCEL")[0].clone();
        let none = w.send_msg(ua, &reply(&cancel, 200, "OK", &ua.name));
        assert!(none.is_empty());
        let out = w.send_msg(ua, &reply(inv, 487, "Request Terminated", &ua.name));
        assert_eq!(requests(&out, ua, "ACK").len(), 1);
        assert!(to(&out, &alice).is_empty());
    }
    let m = w.proxy.metrics();
    assert_eq!(m.calls_answered, 1);
    assert_eq!(m.cancels_sent, 2);
    assert_eq!(m.fork_branches, 3);
}

#[test]
fn a_decline_on_one_device_ends_the_call_everywhere() {
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let (phone, inv) = &legs[0];
    let out = w.send_msg(phone, &reply(inv, 603, "Decline", "phone"));
    assert_eq!(requests(&out, phone, "ACK").len(), 1);
    assert_eq!(codes(&out, &alice), vec![603]);
    for (ua, _) in &legs[1..] {
        let c = requests(&out, ua, "CANCEL");
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].header(&HeaderName::REASON),
            Some("SIP;cause=603;text=\"Declined\"")
        );
    }
    assert_eq!(w.proxy.metrics().calls_declined, 1);
}

#[test]
fn the_best_final_response_wins_when_nobody_answers() {
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let mut out = Vec::new();
    for ((ua, inv), code) in legs.iter().zip([486, 404, 503]) {
        out = w.send_msg(ua, &reply(inv, code, "No", &ua.name));
    }
    // 404 is the lowest class-4 response; it reaches Alice once, last.
    assert_eq!(codes(&out, &alice), vec![404]);
}

#[test]
fn ring_timeout_cancels_and_answers_480_or_408() {
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let out = w.advance(Duration::from_secs(59));
    assert!(codes(&out, &alice).is_empty());
    let out = w.advance(Duration::from_millis(1001));
    assert_eq!(codes(&out, &alice), vec![480], "rang, so 480");
    for (ua, _) in &legs {
        assert_eq!(requests(&out, ua, "CANCEL").len(), 1);
        assert!(requests(&out, ua, "CANCEL")[0]
            .header(&HeaderName::REASON)
            .is_none());
    }
    assert_eq!(w.proxy.metrics().calls_no_answer, 1);

    // Nobody even says Ringing (devices silent but registered): 408.
    let mut w = World::new();
    let dev = Ua::new("desk", udp("10.0.0.20:5060"));
    w.register(&dev, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-2");
    assert_eq!(requests(&out, &dev, "INVITE").len(), 1);
    let out = w.advance(Duration::from_secs(61));
    assert_eq!(codes(&out, &alice).first(), Some(&408));
    let timeout = to(&out, &alice)[0];
    assert_eq!(
        timeout.values(&HeaderName::VIA).count(),
        1,
        "our own Via never reaches the caller"
    );
    assert!(
        requests(&out, &dev, "CANCEL").is_empty(),
        "no CANCEL before a provisional (§9.1)"
    );
}

#[test]
fn caller_cancel_racing_a_200() {
    // CANCEL first: Alice gets 200 (CANCEL) and 487 (INVITE); the 200 a
    // device sends in the crossing still reaches her (§16.7: every 2xx is
    // forwarded), so she can ACK and BYE it.
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let cancel = "CANCEL sip:+14155550123@parley.test SIP/2.0\n\
        Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinv-call-1;rport\n\
        Max-Forwards: 70\n\
        From: <sip:+14155550100@parley.test>;tag=caller1\n\
        To: <sip:+14155550123@parley.test>\n\
        Call-ID: call-1\n\
        CSeq: 1 CANCEL\n\
        Content-Length: 0\n\n";
    let out = w.send(&alice, cancel);
    assert_eq!(codes(&out, &alice), vec![200, 487]);
    for (ua, _) in &legs {
        assert_eq!(requests(&out, ua, "CANCEL").len(), 1);
    }
    let (laptop, inv) = &legs[1];
    let out = w.send_msg(laptop, &reply(inv, 200, "OK", "laptop"));
    assert_eq!(codes(&out, &alice), vec![200]);
    assert_eq!(w.proxy.metrics().calls_cancelled, 1);

    // 200 first: the CANCEL that crosses it gets 200 and changes nothing.
    let mut w = World::new();
    let (alice, legs) = ringing(&mut w);
    let (laptop, inv) = &legs[1];
    let out = w.send_msg(laptop, &reply(inv, 200, "OK", "laptop"));
    assert_eq!(codes(&out, &alice), vec![200]);
    let out = w.send(&alice, cancel);
    assert_eq!(codes(&out, &alice), vec![200]);
    assert!(out.iter().all(|(_, m)| m.method().is_none()));
}

#[test]
fn unknown_transaction_cancel_is_481() {
    let mut w = World::new();
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.send(
        &alice,
        "CANCEL sip:+14155550123@parley.test SIP/2.0\n\
         Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKnope\n\
         From: <sip:a@parley.test>;tag=1\n\
         To: <sip:b@parley.test>\n\
         Call-ID: x\n\
         CSeq: 1 CANCEL\n\
         Content-Length: 0\n\n",
    );
    assert_eq!(codes(&out, &alice), vec![481]);
}

#[test]
fn udp_retransmissions_follow_the_rfc_timers() {
    let mut w = World::new();
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-r");
    let inv = requests(&out, &phone, "INVITE")[0].clone();
    // Timer A: T1, 2·T1, 4·T1… while the device is silent.
    let mut times = Vec::new();
    let start = w.now;
    for _ in 0..40 {
        let out = w.advance(Duration::from_millis(100));
        if !requests(&out, &phone, "INVITE").is_empty() {
            times.push(w.now.duration_since(start).as_millis());
        }
    }
    assert_eq!(times, vec![500, 1500, 3500]);
    // A retransmitted INVITE from Alice gets the 100 again, not a new fork.
    let again = invite_text(&alice, BOB, "call-r", "inv-call-r");
    let out = w.send(&alice, &again);
    assert_eq!(codes(&out, &alice), vec![100]);
    assert!(requests(&out, &phone, "INVITE").is_empty());
    // A provisional stops Timer A.
    w.send_msg(&phone, &reply(&inv, 180, "Ringing", "p"));
    let out = w.advance(Duration::from_secs(10));
    assert!(requests(&out, &phone, "INVITE").is_empty());
    // The device declines with 486; the proxy relays Busy Here and, as
    // Alice does not ACK, Timer G repeats it: T1, 2·T1, 4·T1, T2, T2…
    let out = w.send_msg(&phone, &reply(&inv, 486, "Busy Here", "p"));
    assert_eq!(codes(&out, &alice), vec![486]);
    let mut times = Vec::new();
    let start = w.now;
    for _ in 0..120 {
        let out = w.advance(Duration::from_millis(100));
        if codes(&out, &alice).contains(&486) {
            times.push(w.now.duration_since(start).as_millis());
        }
    }
    assert_eq!(times, vec![500, 1500, 3500, 7500, 11500]);
    // The ACK stops Timer G.
    let ack = "ACK sip:+14155550123@parley.test SIP/2.0\n\
        Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKinv-call-r;rport\n\
        Max-Forwards: 70\n\
        From: <sip:+14155550100@parley.test>;tag=caller1\n\
        To: <sip:+14155550123@parley.test>;tag=p\n\
        Call-ID: call-r\n\
        CSeq: 1 ACK\n\
        Content-Length: 0\n\n";
    assert!(w.send(&alice, ack).is_empty(), "the ACK is absorbed");
    let out = w.advance(Duration::from_secs(30));
    assert!(codes(&out, &alice).is_empty(), "{out:#?}");
}

#[test]
fn a_sleeping_device_is_woken_by_push_and_joins_the_call() {
    let mut w = World::new();
    let mut phone = Ua::new("phone", tcp("10.0.0.11:40000", 7));
    phone.push = true;
    w.register(&phone, BOB);
    let laptop = Ua::new("laptop", udp("10.0.0.12:5060"));
    w.register(&laptop, BOB);
    // The phone's app goes to the background: its connection closes.
    w.proxy
        .handle_conn_closed(signaling::core::flow::ConnId(7), w.now);

    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-p");
    assert_eq!(requests(&out, &laptop, "INVITE").len(), 1);
    assert!(requests(&out, &phone, "INVITE").is_empty());
    let wake = w
        .events
        .iter()
        .find_map(|e| match e {
            Event::Wake(wake) => Some((wake.push.clone(), wake.call_id.clone())),
            _ => None,
        })
        .expect("a VoIP push");
    assert_eq!(wake.0.prid, "feedface");
    assert_eq!(wake.1, "call-p");

    // Woken, it connects again and registers: its branch starts.
    let out = w.advance(Duration::from_secs(2));
    assert!(codes(&out, &alice).is_empty());
    phone.flow = tcp("10.0.0.11:40001", 8);
    let reg = format!(
        "REGISTER sip:{DOMAIN} SIP/2.0\n\
         Via: {}\n\
         From: <sip:{BOB}@{DOMAIN}>;tag=w\n\
         To: <sip:{BOB}@{DOMAIN}>\n\
         Call-ID: wake-1\n\
         CSeq: 1 REGISTER\n\
         Contact: {}\n\
         Content-Length: 0\n\n",
        phone.via("w1"),
        phone.contact()
    );
    let out = w.send(&phone, &reg);
    assert_eq!(codes(&out, &phone), vec![200]);
    let inv = requests(&out, &phone, "INVITE");
    assert_eq!(inv.len(), 1, "the woken phone rings");
    let (flow, _) = out
        .iter()
        .find(|(_, m)| m.method().is_some_and(|m| m.as_str() == "INVITE"))
        .unwrap();
    assert_eq!(flow.conn, phone.flow.conn, "over its new connection");
    assert_eq!(flow.transport, Transport::Tcp);
    let inv = inv[0].clone();
    let out = w.send_msg(&phone, &reply(&inv, 200, "OK", "phone"));
    assert_eq!(codes(&out, &alice), vec![200]);
    assert_eq!(w.proxy.metrics().push_wakes, 1);
}

#[test]
fn a_device_that_never_wakes_leaves_480() {
    let mut w = World::new();
    w.sleeping_phone(BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-q");
    assert_eq!(codes(&out, &alice), vec![100]);
    let out = w.advance(Duration::from_secs(29));
    assert!(codes(&out, &alice).is_empty());
    let out = w.advance(Duration::from_millis(1001));
    assert_eq!(codes(&out, &alice), vec![480]);
}

/// The push service says the sleeping phone's token is dead (the app was
/// removed): its binding goes, the call that waited only for it answers
/// 480 at once instead of at its ring timeout, and the next call does not
/// try to wake it.
#[test]
fn a_dead_push_token_ends_the_wait_and_the_binding() {
    let mut w = World::new();
    w.sleeping_phone(BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-g");
    assert_eq!(codes(&out, &alice), vec![100]);
    let bob = wire::handle::Handle::parse(BOB).unwrap();
    // Another token changes nothing.
    let now = w.now;
    w.proxy.handle_push_gone(&bob, "c0ffee", now);
    assert!(codes(&w.drain(), &alice).is_empty());
    w.proxy.handle_push_gone(&bob, "feedface", now);
    assert_eq!(codes(&w.drain(), &alice), vec![480]);
    assert!(w.proxy.shared_bindings(&bob, now).is_empty());
    let wakes = w.proxy.metrics().push_wakes;
    let out = w.invite(&alice, BOB, "call-h");
    assert_eq!(codes(&out, &alice), vec![100, 480]);
    assert_eq!(w.proxy.metrics().push_wakes, wakes, "nobody to wake");
}

#[test]
fn nobody_registered_is_480_and_not_a_handle_is_404() {
    let mut w = World::new();
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-n");
    assert_eq!(codes(&out, &alice), vec![100, 480]);
    let out = w.invite(&alice, "nobody", "call-m");
    assert_eq!(codes(&out, &alice), vec![404]);
}

#[test]
fn timers_h_and_d_end_the_transactions() {
    let mut w = World::new();
    let phone = Ua::new("phone", udp("10.0.0.11:5060"));
    w.register(&phone, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-h");
    let inv = requests(&out, &phone, "INVITE")[0].clone();
    w.send_msg(&phone, &reply(&inv, 180, "Ringing", "p"));
    let busy = reply(&inv, 486, "Busy Here", "p");
    let out = w.send_msg(&phone, &busy);
    assert_eq!(requests(&out, &phone, "ACK").len(), 1);
    assert_eq!(codes(&out, &alice), vec![486]);

    // Timer D: for 32 s the device's retransmitted 486 is ACKed again and
    // not relayed; then the client transaction is gone.
    let out = w.advance(Duration::from_secs(5));
    assert!(requests(&out, &phone, "ACK").is_empty());
    let out = w.send_msg(&phone, &busy);
    assert_eq!(
        requests(&out, &phone, "ACK").len(),
        1,
        "re-ACK in Completed"
    );
    assert!(codes(&out, &alice).is_empty(), "not relayed again");

    // Timer H: Alice never ACKs; 64·T1 after the 486 the server
    // transaction gives up and stops retransmitting.
    let out = w.advance(Duration::from_secs(27));
    assert!(codes(&out, &alice).contains(&486), "Timer G still running");
    let out = w.advance(Duration::from_secs(2));
    let _ = out;
    let out = w.advance(Duration::from_secs(20));
    assert!(
        codes(&out, &alice).is_empty(),
        "Timer H ended the transaction"
    );
    assert_eq!(w.proxy.metrics().calls_active, 0);

    // After Timer D the device's late 486 finds no transaction: dropped,
    // never ACKed by a transaction that no longer exists.
    let out = w.send_msg(&phone, &busy);
    assert!(requests(&out, &phone, "ACK").is_empty());
}

#[test]
fn a_branch_whose_connection_drops_fails_at_once() {
    let mut w = World::new();
    let phone = Ua::new("phone", tcp("10.0.0.11:40000", 9));
    let laptop = Ua::new("laptop", udp("10.0.0.12:5060"));
    w.register(&phone, BOB);
    w.register(&laptop, BOB);
    let alice = Ua::new("alice", udp("10.0.0.1:5060"));
    let out = w.invite(&alice, BOB, "call-drop");
    assert_eq!(requests(&out, &phone, "INVITE").len(), 1);
    let lap_inv = requests(&out, &laptop, "INVITE")[0].clone();
    // The phone's connection drops while it rings: its branch is over
    // (no 32 s wait), the laptop rings on.
    w.proxy
        .handle_conn_closed(signaling::core::flow::ConnId(9), w.now);
    let out = w.drain();
    assert!(codes(&out, &alice).is_empty(), "the laptop still rings");
    let out = w.send_msg(&laptop, &reply(&lap_inv, 486, "Busy Here", "l"));
    // Both branches are done: the best of 486 and the lost branch's 503.
    assert_eq!(codes(&out, &alice), vec![486]);
}

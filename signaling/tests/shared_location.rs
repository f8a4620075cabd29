//! Two nodes that share their bindings (cluster mode): a device registers
//! at node B, its edge; a call arrives at node A, which sends its branch
//! through B by the binding's path; answers come back by Via, and the
//! dialog's requests go device → B → A → caller by the two Record-Routes.

mod sim;

use signaling::core::flow::{ConnId, Flow};
use signaling::core::message::{HeaderName, Message};
use signaling::core::proxy::{Event, SharedBinding};
use sim::*;
use wire::handle::Handle;

const UNIX: u64 = 1_800_000_000;

/// A node at `ip` (UDP and TCP on 5060), sharing its bindings.
fn node(ip: &str, first_id: u64) -> (World, Ua) {
    let mut c = config();
    c.advertise = vec![
        (
            signaling::core::flow::Transport::Udp,
            addr(&format!("{ip}:5060")),
        ),
        (
            signaling::core::flow::Transport::Tcp,
            addr(&format!("{ip}:5060")),
        ),
    ];
    c.shared_location = true;
    let w = World::node(c, [9; 32], UNIX, first_id);
    // How the other node appears to this one: a UDP peer, no device.
    let mut me = Ua::new(&format!("node-{ip}"), udp(&format!("{ip}:5060")));
    me.device = None;
    (w, me)
}

/// What `w` reported of its bindings of `handle`, last.
fn bound(w: &World, handle: &str) -> Vec<SharedBinding> {
    let h = Handle::parse(handle).unwrap();
    w.events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Bound { handle, bindings } if *handle == h => Some(bindings.clone()),
            _ => None,
        })
        .expect("no Bound event")
}

/// The id of the call waiting in `w` for its bindings elsewhere.
fn locating(w: &World) -> u64 {
    w.events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::Locate { id, .. } => Some(*id),
            _ => None,
        })
        .expect("no Locate event")
}

/// Feeds `to`, as if from `from_node`, whatever in `out` went to its
/// address; returns what `to` sent.
fn hop(
    out: &[(Flow, Message)],
    to: &mut World,
    to_node: &Ua,
    from_node: &Ua,
) -> Vec<(Flow, Message)> {
    let mut next = Vec::new();
    for m in sim::to(out, to_node) {
        next.extend(to.send_msg(from_node, m));
    }
    next
}

#[test]
fn a_call_at_one_node_rings_a_device_registered_at_another() {
    let (mut a, node_a) = node("192.0.2.1", 1);
    let (mut b, node_b) = node("192.0.2.2", 1 << 40);
    let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
    b.register(&laptop, BOB);
    let shared = bound(&b, BOB);
    assert_eq!(shared.len(), 1);
    let path = shared[0].path.clone().expect("an awake binding has a path");
    assert!(
        path.contains("192.0.2.2:5060") && path.contains("pe="),
        "{path}"
    );

    // The call arrives at A, which asks where Bob is and forks through B.
    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    let out = a.invite(&alice, BOB, "call-e1");
    assert_eq!(codes(&out, &alice), vec![100]);
    a.proxy.handle_located(locating(&a), shared.clone(), a.now);
    let out = a.drain();
    let to_b = requests(&out, &node_b, "INVITE");
    assert_eq!(to_b.len(), 1, "{out:#?}");
    assert_eq!(to_b[0].header(&HeaderName::ROUTE), Some(path.as_str()));

    // B takes its Route off and sends the INVITE down the laptop's flow,
    // record-routing itself.
    let out = hop(&out, &mut b, &node_b, &node_a);
    let inv = requests(&out, &laptop, "INVITE");
    assert_eq!(inv.len(), 1, "{out:#?}");
    let inv = inv[0].clone();
    assert!(
        inv.header(&HeaderName::ROUTE).is_none(),
        "the path stays between nodes"
    );
    // B's entries, then A's (each node twice where its two sides use
    // different transports, RFC 5658).
    let rrs: Vec<&str> = inv.values(&HeaderName::RECORD_ROUTE).collect();
    let b_entries = rrs.iter().take_while(|r| r.contains("192.0.2.2")).count();
    assert!(b_entries >= 1, "{rrs:?}");
    assert!(rrs.len() > b_entries, "{rrs:?}");
    assert!(
        rrs[b_entries..].iter().all(|r| r.contains("192.0.2.1")),
        "{rrs:?}"
    );

    // Ringing and the answer come back through B and A to Alice.
    let out = b.send_msg(&laptop, &reply(&inv, 180, "Ringing", "lap"));
    let out = hop(&out, &mut a, &node_a, &node_b);
    assert_eq!(codes(&out, &alice), vec![180]);
    let out = b.send_msg(&laptop, &reply(&inv, 200, "OK", "lap"));
    let out = hop(&out, &mut a, &node_a, &node_b);
    assert_eq!(codes(&out, &alice), vec![200]);

    // The laptop hangs up along its route set: B, then A, then Alice.
    let bye = format!(
        "BYE sip:alice@10.0.0.1:41000;transport=tcp SIP/2.0\n\
         Via: {}\n\
         Route: {}\n\
         Max-Forwards: 70\n\
         From: <sip:{BOB}@{DOMAIN}>;tag=lap\n\
         To: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         Call-ID: call-e1\n\
         CSeq: 1 BYE\n\
         Content-Length: 0\n\n",
        laptop.via("bye1"),
        rrs.join(", "),
    );
    let out = b.send(&laptop, &bye);
    let out = hop(&out, &mut a, &node_a, &node_b);
    assert_eq!(requests(&out, &alice, "BYE").len(), 1, "{out:#?}");
}

#[test]
fn a_cancel_follows_the_invite_through_the_edge() {
    let (mut a, node_a) = node("192.0.2.1", 1);
    let (mut b, node_b) = node("192.0.2.2", 1 << 40);
    let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
    b.register(&laptop, BOB);
    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    a.invite(&alice, BOB, "call-e2");
    a.proxy.handle_located(locating(&a), bound(&b, BOB), a.now);
    let out = a.drain();
    let out = hop(&out, &mut b, &node_b, &node_a);
    let inv = requests(&out, &laptop, "INVITE")[0].clone();
    let out = b.send_msg(&laptop, &reply(&inv, 180, "Ringing", "lap"));
    hop(&out, &mut a, &node_a, &node_b);
    // Alice gives up: A CANCELs its branch, B passes it to the laptop.
    let cancel = format!(
        "CANCEL sip:{BOB}@{DOMAIN} SIP/2.0\n\
         Via: {}\n\
         Max-Forwards: 70\n\
         From: <sip:{ALICE}@{DOMAIN}>;tag=caller1\n\
         To: <sip:{BOB}@{DOMAIN}>\n\
         Call-ID: call-e2\n\
         CSeq: 1 CANCEL\n\
         Content-Length: 0\n\n",
        alice.via("inv-call-e2")
    );
    let out = a.send(&alice, &cancel);
    let out = hop(&out, &mut b, &node_b, &node_a);
    assert_eq!(requests(&out, &laptop, "CANCEL").len(), 1, "{out:#?}");
}

#[test]
fn a_device_whose_edge_lost_its_connection_is_not_reached_through_it() {
    let (mut a, node_a) = node("192.0.2.1", 1);
    let (mut b, node_b) = node("192.0.2.2", 1 << 40);
    let mut phone = Ua::new("phone", tcp("10.0.0.11:40000", 7));
    phone.push = true;
    b.register(&phone, BOB);
    let awake = bound(&b, BOB);
    assert!(awake[0].path.is_some());
    // The app went to the background: asleep, reachable by push only.
    b.proxy.handle_conn_closed(ConnId(7), b.now);
    b.drain();
    let asleep = bound(&b, BOB);
    assert_eq!(asleep.len(), 1);
    assert!(asleep[0].path.is_none() && asleep[0].push.is_some());

    // A call with the asleep binding wakes the phone.
    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    a.invite(&alice, BOB, "call-e3");
    a.proxy.handle_located(locating(&a), asleep.clone(), a.now);
    a.drain();
    assert!(a.events.iter().any(|e| matches!(e, Event::Wake(_))));
    // It registers again at B over a new connection; A hears of it and
    // rings it through B.
    let phone = Ua {
        flow: tcp("10.0.0.11:40001", 8),
        ..phone
    };
    b.register(&phone, BOB);
    let again = bound(&b, BOB).remove(0);
    a.proxy
        .handle_remote_bound(&Handle::parse(BOB).unwrap(), again, a.now);
    let out = a.drain();
    let out = hop(&out, &mut b, &node_b, &node_a);
    assert_eq!(requests(&out, &phone, "INVITE").len(), 1, "{out:#?}");

    // A stale path (the connection it names is gone) gets 480 from B.
    let (mut a2, node_a2) = node("192.0.2.1", 1 << 41);
    a2.invite(&alice, BOB, "call-e4");
    a2.proxy.handle_located(locating(&a2), awake, a2.now);
    let out = a2.drain();
    let out = hop(&out, &mut b, &node_b, &node_a2);
    assert_eq!(codes(&out, &node_a2), vec![480], "{out:#?}");
}

/// A digest answer taken at one node is refused at another once that node
/// heard of it (the nodes share the secret, so the answer verifies at
/// both): a replay is answered with a stale challenge, as at one node.
#[test]
fn a_digest_answer_taken_at_one_node_is_not_taken_at_another() {
    let (mut a, _) = node("192.0.2.1", 1);
    let (mut b, _) = node("192.0.2.2", 1 << 40);
    let mut ua = Ua::new("softphone", udp("10.0.0.5:5060"));
    ua.device = None;
    let register = |cseq: u32, extra: &str| {
        let lines = format!("Contact: <sip:alice@10.0.0.5:5060>\n{extra}");
        register_text(&ua, ALICE, cseq, &lines)
    };
    let out = a.send(&ua, &register(1, ""));
    let answer = authorization(
        &challenge(&out, &ua),
        &format!("sip:{DOMAIN}"),
        ALICE,
        "alice-secret",
        1,
    );
    let out = a.send(&ua, &register(2, &answer));
    assert_eq!(codes(&out, &ua), vec![200]);
    let (nonce, nc) = a
        .events
        .iter()
        .find_map(|e| match e {
            Event::NonceUsed { nonce, nc } => Some((nonce.clone(), *nc)),
            _ => None,
        })
        .expect("A tells of the answer it took");
    assert_eq!(nc, 1);
    b.proxy.handle_nonce_used(&nonce, nc);
    let out = b.send(&ua, &register(3, &answer));
    assert_eq!(codes(&out, &ua), vec![401], "the same answer again, at B");
    assert_eq!(b.proxy.metrics().digest_replays, 1);
}

/// A stranger cannot route through an edge: a path token that is forged,
/// or signed for a dialog rather than a path, sends nothing to any device.
#[test]
fn a_forged_or_borrowed_path_reaches_no_device() {
    let (mut b, _) = node("192.0.2.2", 1 << 40);
    let laptop = Ua::new("laptop", tcp("10.0.0.12:40000", 21));
    b.register(&laptop, BOB);
    let real = bound(&b, BOB)[0].path.clone().unwrap();
    let mut stranger = Ua::new("stranger", udp("203.0.113.9:5060"));
    stranger.device = None;
    let forged = real.replace("pe=", "pe=00");
    // A Record-Route token of a call (pf, signed for its Call-ID) used as
    // a path.
    let token = real.split("pe=").nth(1).unwrap().trim_end_matches('>');
    let borrowed = format!("<sip:192.0.2.2:5060;lr;pf={token}>");
    for route in [forged, borrowed] {
        let text = format!(
            "INVITE sip:laptop@10.0.0.12:40000;transport=tcp SIP/2.0\n\
             Via: {}\n\
             Route: {route}\n\
             Max-Forwards: 70\n\
             From: <sip:mallory@example.org>;tag=m1\n\
             To: <sip:{BOB}@{DOMAIN}>\n\
             Call-ID: stranger-1\n\
             CSeq: 1 INVITE\n\
             Content-Length: 0\n\n",
            stranger.via("s1")
        );
        let out = b.send(&stranger, &text);
        assert!(
            requests(&out, &laptop, "INVITE").is_empty(),
            "{route} reached the device: {out:#?}"
        );
    }
}

/// Apple calls dead the token of a device asleep at another node: the call
/// that woke it here answers 480 at once, this node tells the others, and
/// the node that holds the binding drops it, so the next call wakes
/// nobody through it.
#[test]
fn a_dead_token_of_a_device_asleep_at_another_node_ends_the_wait_everywhere() {
    let (mut a, _) = node("192.0.2.1", 1);
    let (mut b, _) = node("192.0.2.2", 1 << 40);
    let mut phone = Ua::new("phone", tcp("10.0.0.11:40000", 7));
    phone.push = true;
    b.register(&phone, BOB);
    b.proxy.handle_conn_closed(ConnId(7), b.now);
    b.drain();
    let asleep = bound(&b, BOB);
    let prid = asleep[0].push.clone().expect("a push binding").prid;

    let alice = Ua::new("alice", tcp("10.0.0.1:41000", 22));
    let out = a.invite(&alice, BOB, "call-g1");
    assert_eq!(codes(&out, &alice), vec![100]);
    a.proxy.handle_located(locating(&a), asleep, a.now);
    a.drain();
    assert!(a.events.iter().any(|e| matches!(e, Event::Wake(_))));

    let bob = Handle::parse(BOB).unwrap();
    let now = a.now;
    a.proxy.handle_push_gone(&bob, &prid, now);
    let out = a.drain();
    assert_eq!(codes(&out, &alice), vec![480], "{out:#?}");
    assert!(a.events.iter().any(|e| matches!(
        e,
        Event::PushGone { handle, prid: p } if *handle == bob && *p == prid
    )));

    // B hears of it and drops its binding.
    let now = b.now;
    b.proxy.handle_remote_push_gone(&bob, &prid, now);
    b.drain();
    assert!(bound(&b, BOB).is_empty(), "B kept the dead binding");
    assert!(
        !b.events.iter().any(|e| matches!(e, Event::PushGone { .. })),
        "B told the others again"
    );
}

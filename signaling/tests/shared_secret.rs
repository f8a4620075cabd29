//! Nodes that share signaling's secret and run on Unix time take each
//! other's digest challenges and route tokens, and so does a node
//! restarted with its secret: a 401 from one node is answered at another,
//! and a BYE finds its dialog's callee after the proxy it came through is
//! gone. Another secret takes neither.

mod loopback;
mod sim;

use sim::*;
use std::time::Duration;

const SECRET: [u8; 32] = [42; 32];
/// 2027-01-15, in Unix seconds.
const UNIX: u64 = 1_800_000_000;

/// A node on Unix time with `secret`, its ids starting at `first_id`.
fn node(secret: [u8; 32], unix: u64, first_id: u64) -> World {
    World::node(config(), secret, unix, first_id)
}

#[test]
fn a_challenge_from_one_node_is_answered_at_another() {
    let mut a = node(SECRET, UNIX, 1);
    let mut b = node(SECRET, UNIX + 3, 1 << 40);
    let mut other = node([7; 32], UNIX + 3, 1 << 41);
    let mut ua = Ua::new("softphone", udp("10.0.0.5:5060"));
    ua.device = None;
    let register = |cseq: u32, extra: &str| {
        let lines = format!("Contact: <sip:alice@10.0.0.5:5060>\n{extra}");
        register_text(&ua, ALICE, cseq, &lines)
    };
    let out = a.send(&ua, &register(1, ""));
    let challenge = challenge(&out, &ua);
    let uri = format!("sip:{DOMAIN}");
    let answer = authorization(&challenge, &uri, ALICE, "alice-secret", 1);
    let out = other.send(&ua, &register(2, &answer));
    assert_eq!(codes(&out, &ua), vec![401], "another secret");
    let out = b.send(&ua, &register(3, &answer));
    assert_eq!(codes(&out, &ua), vec![200], "the same secret");
    // The nonce's age counts in Unix time on every node: past its
    // lifetime it is stale wherever it is answered.
    let mut late = node(SECRET, UNIX + 3600, 1 << 42);
    let answer = authorization(&challenge, &uri, ALICE, "alice-secret", 2);
    let out = late.send(&ua, &register(4, &answer));
    assert_eq!(codes(&out, &ua), vec![401]);
    assert!(to(&out, &ua)[0]
        .header(&signaling::core::message::HeaderName::WWW_AUTHENTICATE)
        .unwrap()
        .contains("stale=true"));
}

#[test]
fn a_route_token_outlives_a_restart_with_the_same_secret() {
    let mut w = node(SECRET, UNIX, 1);
    let (alice, laptop, rr) = answered_call(&mut w, "call-r");
    let reaches_laptop = |out: &[(signaling::core::flow::Flow, _)]| {
        out.iter().any(|(f, _)| f.remote == laptop.flow.remote)
    };
    // Restarted an hour later with its secret: the BYE still goes through.
    let mut restarted = node(SECRET, UNIX + 3600, 1 << 40);
    restarted.now += Duration::from_secs(1);
    let out = restarted.send(&alice, &bye(&alice, "call-r", &rr, "b1"));
    assert!(reaches_laptop(&out), "{out:?}");
    // Restarted with another secret: no such dialog here.
    let mut fresh = node([8; 32], UNIX + 3600, 1 << 41);
    let out = fresh.send(&alice, &bye(&alice, "call-r", &rr, "b2"));
    assert!(!reaches_laptop(&out), "{out:?}");
    assert_eq!(codes(&out, &alice), vec![481]);
    // Past the dialog lifetime (12 h) the token is spent everywhere.
    let mut later = node(SECRET, UNIX + 13 * 3600, 1 << 42);
    let out = later.send(&alice, &bye(&alice, "call-r", &rr, "b3"));
    assert_eq!(codes(&out, &alice), vec![481]);
}

/// The runtime takes its secret from the configuration: two servers on
/// loopback with one secret take each other's challenges; a server left
/// to pick its own does not.
#[test]
fn servers_configured_with_one_secret_take_each_others_challenges() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = |secret: Option<[u8; 32]>| {
        let mut c = loopback::config(std::net::Ipv4Addr::LOCALHOST.into());
        c.proxy.accounts.insert(
            wire::handle::Handle::parse(ALICE).unwrap(),
            "alice-secret".into(),
        );
        c.secret = secret;
        loopback::serve(&rt, c)
    };
    let (a, b, own) = (server(Some(SECRET)), server(Some(SECRET)), server(None));
    let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = u.local_addr().unwrap();
    let ask = |to: std::net::SocketAddr, cseq: u32, auth: &str| -> String {
        let req = format!(
            "REGISTER sip:parley.test SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bKss{cseq}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:+14155550100@parley.test>;tag=ss\r\n\
             To: <sip:+14155550100@parley.test>\r\n\
             Call-ID: shared-secret\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:alice@{me}>\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        );
        u.send_to(req.as_bytes(), to).unwrap();
        let mut buf = [0u8; 4096];
        let (n, _) = u.recv_from(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = ask(a.udp_addrs()[0], 1, "");
    assert!(first.starts_with("SIP/2.0 401 "), "{first}");
    let challenge = first
        .lines()
        .find_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .unwrap()
        .to_string();
    let answer = |nc: u32| {
        let a = wire::sip::digest::respond(
            &[challenge.as_str()],
            "REGISTER",
            "sip:parley.test",
            ALICE,
            "alice-secret",
            "cn",
            nc,
        )
        .unwrap();
        format!("Authorization: {a}\r\n")
    };
    let at_own = ask(own.udp_addrs()[0], 2, &answer(1));
    assert!(at_own.starts_with("SIP/2.0 401 "), "{at_own}");
    let at_b = ask(b.udp_addrs()[0], 3, &answer(1));
    assert!(at_b.starts_with("SIP/2.0 200 "), "{at_b}");
    for s in [a, b, own] {
        rt.block_on(s.shutdown(Duration::ZERO));
    }
}

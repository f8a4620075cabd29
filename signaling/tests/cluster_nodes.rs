//! Two signaling nodes on loopback sharing their bindings in PostgreSQL
//! (started by the test): a device registers at node B over TCP, a call
//! arrives at node A over UDP and rings the device through B; the answer
//! comes back the same way.

mod loopback;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use signaling::location::SqlLocation;
use signaling::runtime::{NoDirectory, NoWaker, Server};
use wire::handle::Handle;

const BOB: &str = "+14155550123";

fn node(rt: &tokio::runtime::Runtime, ip: [u8; 4], url: &str, name: &str) -> (Server, SqlLocation) {
    let mut config = loopback::config(std::net::Ipv4Addr::from(ip).into());
    config.secret = Some([5; 32]);
    config.proxy.allow_unauthenticated_calls = true;
    config
        .proxy
        .accounts
        .insert(Handle::parse(BOB).unwrap(), "bob-secret".into());
    let location = rt.block_on(SqlLocation::open(url, name)).unwrap();
    let server = rt
        .block_on(Server::start_shared(
            config,
            None,
            Arc::new(NoDirectory),
            Arc::new(NoWaker),
            Arc::new(location.clone()),
        ))
        .unwrap();
    (server, location)
}

/// Reads one SIP message from a stream (headers and Content-Length body).
fn read_message(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)
            .expect("a message within the timeout");
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

fn header<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    msg.lines()
        .filter_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
        .map(str::trim)
        .collect()
}

#[test]
fn a_call_at_node_a_rings_a_device_registered_at_node_b() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = parley_tests::postgres::Postgres::start("sip-cluster");
    let (a, loc_a) = node(&rt, [127, 0, 0, 2], &pg.url(), "a");
    let (b, _loc_b) = node(&rt, [127, 0, 0, 3], &pg.url(), "b");

    // Bob's device registers at B over TCP (digest account).
    let mut dev = TcpStream::connect(b.tcp_addrs()[0]).unwrap();
    dev.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let me = dev.local_addr().unwrap();
    let register = |cseq: u32, auth: &str| {
        format!(
            "REGISTER sip:parley.test SIP/2.0\r\n\
             Via: SIP/2.0/TCP {me};branch=z9hG4bKreg{cseq}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{BOB}@parley.test>;tag=r1\r\n\
             To: <sip:{BOB}@parley.test>\r\n\
             Call-ID: reg-bob\r\n\
             CSeq: {cseq} REGISTER\r\n\
             Contact: <sip:bob@{me};transport=tcp>;+sip.instance=\"<urn:uuid:bob-laptop>\"\r\n\
             Expires: 600\r\n\
             {auth}Content-Length: 0\r\n\r\n"
        )
    };
    dev.write_all(register(1, "").as_bytes()).unwrap();
    let challenge = read_message(&mut dev);
    assert!(challenge.starts_with("SIP/2.0 401"), "{challenge}");
    let www = header(&challenge, "WWW-Authenticate");
    let answer = wire::sip::digest::respond(
        &www,
        "REGISTER",
        "sip:parley.test",
        BOB,
        "bob-secret",
        "cn",
        1,
    )
    .unwrap();
    dev.write_all(register(2, &format!("Authorization: {answer}\r\n")).as_bytes())
        .unwrap();
    let ok = read_message(&mut dev);
    assert!(ok.starts_with("SIP/2.0 200"), "{ok}");

    // A sees B's binding (stored in the background).
    let bob = Handle::parse(BOB).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rt.block_on(loc_a.get(&bob)).unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "B's binding never reached the database"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Alice calls Bob at A, over UDP.
    let alice = UdpSocket::bind("127.0.0.1:0").unwrap();
    alice
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let her = alice.local_addr().unwrap();
    let invite = format!(
        "INVITE sip:{BOB}@parley.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {her};branch=z9hG4bKinv1;rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@example.org>;tag=a1\r\n\
         To: <sip:{BOB}@parley.test>\r\n\
         Call-ID: cluster-call-1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:alice@{her}>\r\n\
         Content-Length: 0\r\n\r\n"
    );
    alice.send_to(invite.as_bytes(), a.udp_addrs()[0]).unwrap();

    // The device gets it from B, with B and A in the Record-Route.
    let inv = read_message(&mut dev);
    assert!(inv.starts_with("INVITE "), "{inv}");
    let rr = header(&inv, "Record-Route").join(",");
    assert!(rr.contains("127.0.0.3") && rr.contains("127.0.0.2"), "{rr}");
    assert!(
        header(&inv, "Route").is_empty(),
        "the path stays between nodes: {inv}"
    );

    // It answers; Alice hears 200 through B and A.
    let vias = header(&inv, "Via").join("\r\nVia: ");
    let ok = format!(
        "SIP/2.0 200 OK\r\n\
         Via: {vias}\r\n\
         From: <sip:alice@example.org>;tag=a1\r\n\
         To: <sip:{BOB}@parley.test>;tag=b1\r\n\
         Call-ID: cluster-call-1\r\n\
         CSeq: 1 INVITE\r\n\
         Contact: <sip:bob@{me};transport=tcp>\r\n\
         Record-Route: {rr}\r\n\
         Content-Length: 0\r\n\r\n"
    );
    dev.write_all(ok.as_bytes()).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n, _) = alice.recv_from(&mut buf).expect("an answer within 10 s");
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("SIP/2.0 200") {
            break;
        }
        assert!(text.starts_with("SIP/2.0 1"), "{text}");
        assert!(Instant::now() < deadline);
    }
    drop((a, b));
}

/// What a node stores reaches the other nodes over NATS as it is stored
/// (a call waiting for a woken device hears of its registration there),
/// and never the node itself.
#[test]
fn stores_are_told_to_the_other_nodes() {
    use signaling::runtime::{Location, Notice, SharedBinding};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = parley_tests::postgres::Postgres::start("sip-cluster-nats");
    let nats = parley_tests::nats::Nats::start("sip-cluster-nats");
    let open = |name: &str| {
        rt.block_on(async {
            SqlLocation::open(&pg.url(), name)
                .await
                .unwrap()
                .with_nats(&[nats.url()])
                .await
                .unwrap()
        })
    };
    let (a, c) = (open("a"), open("c"));
    let mut heard_a = rt.block_on(async { a.watch() }).expect("a NATS watch");
    let mut heard_c = rt.block_on(async { c.watch() }).expect("a NATS watch");
    let bob = Handle::parse(BOB).unwrap();
    let binding = SharedBinding {
        id: "urn:uuid:bob-phone".into(),
        contact: "sip:bob@10.0.0.11:40001;transport=tcp".into(),
        path: Some("<sip:127.0.0.4:5060;lr;pe=x>".into()),
        push: None,
        device: Some(wire::keys::DeviceId::random()),
        expires: 4_000_000_000,
    };
    // The subscriptions are made in the background: store until heard.
    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        rt.block_on(c.put(&bob, std::slice::from_ref(&binding)))
            .unwrap();
        let got = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(200), heard_a.recv()).await
        });
        if let Ok(Some(got)) = got {
            break got;
        }
        assert!(Instant::now() < deadline, "node a never heard of c's store");
    };
    assert_eq!(got, Notice::Bound(bob.clone(), vec![binding.clone()]));
    // The one who stored hears nothing of it.
    let own = rt
        .block_on(async { tokio::time::timeout(Duration::from_millis(300), heard_c.recv()).await });
    assert!(own.is_err(), "a node was told of its own store: {own:?}");
    // And the table has it for lookups too.
    assert_eq!(rt.block_on(a.get(&bob)).unwrap(), vec![binding]);
    // A digest answer taken at c is told to a, so it is not taken twice.
    rt.block_on(async { c.nonce_used("6b4a7ac0.abc".into(), 3) });
    let got =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), heard_a.recv()).await });
    assert_eq!(got, Ok(Some(Notice::NonceUsed("6b4a7ac0.abc".into(), 3))));
    // A push token that Apple called dead at c: a drops its bindings too.
    rt.block_on(async { c.push_gone(bob.clone(), "feedface".into()) });
    let got =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), heard_a.recv()).await });
    assert_eq!(got, Ok(Some(Notice::PushGone(bob, "feedface".into()))));
}

/// Bindings outlive their node: a node that starts again (every node, after
/// a restart of all of them) finds its old bindings in the table, handed
/// out asleep, since the connections their paths named are gone; a
/// push-capable device among them is then woken by the next call.
#[test]
fn bindings_survive_a_restart_asleep() {
    use signaling::runtime::SharedBinding;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pg = parley_tests::postgres::Postgres::start("sip-cluster-restart");
    let bob = Handle::parse(BOB).unwrap();
    let phone = SharedBinding {
        id: "urn:uuid:bob-phone".into(),
        contact: "sip:bob@10.0.0.11:40001;transport=tcp".into(),
        path: Some("<sip:127.0.0.3:5060;transport=tcp;lr;pe=x>".into()),
        push: Some(signaling::core::registrar::PushParams {
            provider: "parley".into(),
            prid: "feedface".into(),
            param: Some("com.example.app.voip".into()),
        }),
        device: Some(wire::keys::DeviceId::random()),
        expires: 4_000_000_000,
    };
    let b = rt.block_on(SqlLocation::open(&pg.url(), "b")).unwrap();
    rt.block_on(b.put(&bob, std::slice::from_ref(&phone)))
        .unwrap();
    let a = rt.block_on(SqlLocation::open(&pg.url(), "a")).unwrap();
    assert_eq!(rt.block_on(a.get(&bob)).unwrap(), vec![phone.clone()]);
    // B starts again.
    drop(b);
    let _b = rt.block_on(SqlLocation::open(&pg.url(), "b")).unwrap();
    let asleep = SharedBinding {
        path: None,
        ..phone
    };
    assert_eq!(rt.block_on(a.get(&bob)).unwrap(), vec![asleep]);
}

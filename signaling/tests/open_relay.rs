//! A raw SIP client on loopback cannot reach any address through the
//! proxy: preloaded Routes and To-tagged requests naming local UDP and
//! TCP services (IPv4 and IPv6) are refused with one 403, the services
//! hear nothing, and the refusal is not retransmitted at the client (a
//! spoofed source would otherwise get Timer G's copies).

mod loopback;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const BOB: &str = "+14155550123";

/// The attacks, each naming `target` (`host:port` with URI params).
fn attacks(via: &str, target: &str, n: usize) -> Vec<String> {
    let head = |line: &str, route: &str, to_tag: &str, i: usize| {
        format!(
            "{line} SIP/2.0\r\n\
             Via: {via};branch=z9hG4bKrelay{n}x{i};rport\r\n\
             {route}\
             Max-Forwards: 70\r\n\
             From: <sip:+14155550100@parley.test>;tag=evil\r\n\
             To: <sip:{BOB}@parley.test>{to_tag}\r\n\
             Call-ID: relay-{n}-{i}\r\n\
             CSeq: 1 {}\r\n\
             Content-Length: 0\r\n\r\n",
            line.split(' ').next().unwrap()
        )
    };
    vec![
        head(
            &format!("INVITE sip:{BOB}@parley.test"),
            &format!("Route: <sip:{target};lr>\r\n"),
            "",
            0,
        ),
        head(&format!("INVITE sip:x@{target}"), "", ";tag=1", 1),
        head(&format!("BYE sip:x@{target}"), "", ";tag=1", 2),
        head(
            &format!("MESSAGE sip:{BOB}@parley.test"),
            &format!("Route: <sip:{target};lr>\r\n"),
            ";tag=1",
            3,
        ),
    ]
}

fn status(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Nothing arrives on the UDP service or the TCP listener.
fn silent(udp: &UdpSocket, tcp: &TcpListener) {
    let mut buf = [0u8; 2048];
    udp.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    if let Ok((n, from)) = udp.recv_from(&mut buf) {
        panic!(
            "the UDP service got {} bytes from {from}:\n{}",
            n,
            String::from_utf8_lossy(&buf[..n])
        );
    }
    tcp.set_nonblocking(true).unwrap();
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        if let Ok((_, from)) = tcp.accept() {
            panic!("the TCP service got a connection from {from}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn run(v6: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ip: std::net::IpAddr = if v6 {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    };
    let server = loopback::start(&rt, ip);
    let host = if v6 { "[::1]" } else { "127.0.0.1" };
    let bind = format!("{host}:0");
    let service = UdpSocket::bind(&bind).unwrap();
    let listener = TcpListener::bind(&bind).unwrap();
    let sport = service.local_addr().unwrap().port();
    let lport = listener.local_addr().unwrap().port();
    let targets = [
        format!("{host}:{sport}"),
        format!("{host}:{lport};transport=tcp"),
        format!("{host}:{lport};transport=tls"),
    ];

    // Over UDP: one 403 for each, and nothing more.
    let client = UdpSocket::bind(&bind).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let me = client.local_addr().unwrap();
    let proxy = server.udp_addrs()[0];
    let mut buf = [0u8; 4096];
    for (n, target) in targets.iter().enumerate() {
        for text in attacks(&format!("SIP/2.0/UDP {me}"), target, n) {
            client.send_to(text.as_bytes(), proxy).unwrap();
            let (len, _) = client.recv_from(&mut buf).expect("an answer");
            let answer = String::from_utf8_lossy(&buf[..len]).to_string();
            assert_eq!(status(&answer), 403, "via {target}:\n{answer}");
        }
    }
    silent(&service, &listener);
    // Timer G would resend a 403 to an INVITE 0.5 s and 1.5 s later.
    client
        .set_read_timeout(Some(Duration::from_millis(1700)))
        .unwrap();
    if let Ok((len, _)) = client.recv_from(&mut buf) {
        panic!(
            "a refusal was sent again:\n{}",
            String::from_utf8_lossy(&buf[..len])
        );
    }

    // Over TCP: the same.
    let mut tcp = TcpStream::connect(server.tcp_addrs()[0]).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = tcp.local_addr().unwrap();
    for (n, target) in targets.iter().enumerate() {
        for text in attacks(&format!("SIP/2.0/TCP {me}"), target, n + 10) {
            tcp.write_all(text.as_bytes()).unwrap();
            let len = tcp.read(&mut buf).expect("an answer");
            let answer = String::from_utf8_lossy(&buf[..len]).to_string();
            assert_eq!(status(&answer), 403, "via {target}:\n{answer}");
        }
    }
    silent(&service, &listener);
    rt.block_on(server.shutdown(Duration::ZERO));
}

#[test]
fn a_raw_client_cannot_relay_through_the_proxy_over_ipv4() {
    run(false);
}

#[test]
fn a_raw_client_cannot_relay_through_the_proxy_over_ipv6() {
    if UdpSocket::bind("[::1]:0").is_err() {
        // CI hosts have ::1; a machine without IPv6 loopback cannot run it.
        panic!("::1 is not available on this machine");
    }
    run(true);
}

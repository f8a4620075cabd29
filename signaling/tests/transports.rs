//! The runtime's transports on loopback: CRLF keepalive pongs on streams
//! (RFC 5626 §3.5.1), a stream that cannot be framed is closed, malformed
//! datagrams get a 400 that names the fault, and OPTIONS to the proxy is
//! answered over TCP.

mod loopback;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

fn read_some(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) => panic!("nothing within the timeout: {e}"),
    }
}

#[test]
fn keepalives_framing_errors_and_malformed_datagrams() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = loopback::start(&rt, std::net::Ipv4Addr::LOCALHOST.into());
    let tcp = server.tcp_addrs()[0];
    let udp = server.udp_addrs()[0];

    // A double CRLF is a ping; the answer is one CRLF.
    let mut s = TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"\r\n\r\n").unwrap();
    assert_eq!(read_some(&mut s), b"\r\n");

    // OPTIONS to the proxy over the same connection.
    let options = "OPTIONS sip:parley.test SIP/2.0\r\n\
        Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKo1\r\n\
        From: <sip:a@parley.test>;tag=1\r\n\
        To: <sip:parley.test>\r\n\
        Call-ID: opt-1\r\n\
        CSeq: 1 OPTIONS\r\n\
        Content-Length: 0\r\n\r\n";
    s.write_all(options.as_bytes()).unwrap();
    let reply = String::from_utf8(read_some(&mut s)).unwrap();
    assert!(reply.starts_with("SIP/2.0 200 OK\r\n"), "{reply}");
    assert!(reply.contains("\r\nAllow: "), "{reply}");

    // A message without Content-Length cannot be framed: closed.
    s.write_all(b"OPTIONS sip:parley.test SIP/2.0\r\nVia: x\r\n\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let closed = s.read_to_end(&mut rest);
    assert!(closed.is_ok(), "the proxy closes the connection");

    // A datagram missing its Call-ID gets a 400 naming it.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let me = u.local_addr().unwrap();
    let bad = format!(
        "OPTIONS sip:parley.test SIP/2.0\r\n\
         Via: SIP/2.0/UDP {me};branch=z9hG4bKu1\r\n\
         From: <sip:a@parley.test>;tag=1\r\n\
         To: <sip:parley.test>\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    u.send_to(bad.as_bytes(), udp).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = u.recv_from(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(
        text.starts_with("SIP/2.0 400 Bad Request (Missing Call-ID Header)\r\n"),
        "{text}"
    );
    rt.block_on(server.shutdown(Duration::ZERO));
}

/// One source cannot take every connection slot, and a connection that
/// says nothing loses its slot after the first-message timeout instead of
/// the idle timeout.
#[test]
fn connections_are_capped_per_source_and_silent_ones_close_early() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut config = loopback::config(std::net::Ipv4Addr::LOCALHOST.into());
    config.udp = vec![];
    config.max_connections_per_source = 3;
    config.first_message_timeout = Duration::from_millis(300);
    let server = loopback::serve(&rt, config);
    let tcp = server.tcp_addrs()[0];
    let options = |n: u32| {
        format!(
            "OPTIONS sip:parley.test SIP/2.0\r\n\
             Via: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bKcap{n}\r\n\
             From: <sip:a@parley.test>;tag=1\r\n\
             To: <sip:parley.test>\r\n\
             Call-ID: cap-{n}\r\n\
             CSeq: 1 OPTIONS\r\n\
             Content-Length: 0\r\n\r\n"
        )
    };
    // A connection that says nothing is closed after the first-message
    // timeout, not the idle timeout (270 s).
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(tcp).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    // Three speaking connections from 127.0.0.1 are served (retrying
    // while the silent one's slot is given back)...
    let mut held = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while held.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "slots not given back");
        n += 1;
        let mut s = TcpStream::connect(tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(options(n).as_bytes()).is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) | Err(_) => continue,
            Ok(len) => {
                let reply = String::from_utf8_lossy(&buf[..len]).to_string();
                assert!(reply.starts_with("SIP/2.0 200 OK\r\n"), "{reply}");
                held.push(s);
            }
        }
    }
    // ...a fourth is closed at once: it gets no answer.
    let mut fourth = TcpStream::connect(tcp).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = fourth.write_all(options(99).as_bytes());
    let mut rest = Vec::new();
    let answered = fourth.read_to_end(&mut rest).map(|_| rest.clone());
    assert!(
        answered.as_ref().map_or(true, |r| r.is_empty()),
        "the fourth connection was served: {:?}",
        answered.map(|r| String::from_utf8_lossy(&r).to_string())
    );
    rt.block_on(server.shutdown(Duration::ZERO));
}

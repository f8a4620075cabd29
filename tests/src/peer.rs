//! A UDP peer on loopback that echoes every datagram back to its sender and
//! keeps a copy, so tests can prove what the relay delivered. Like
//! `turnutils_peer` it listens on a port pair (RTP on `port`, RTCP on
//! `port + 1`), since `turnutils_uclient` sends its RTCP leg to the latter.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Each datagram the peer received, with its sender.
type Log = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

#[derive(Debug)]
pub struct EchoPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Log,
    tcp_bytes: Arc<std::sync::atomic::AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoPeer {
    /// Binds 127.0.0.1 on a free even port and the next one, and echoes.
    pub fn start() -> EchoPeer {
        let (a, b) = (0..100)
            .find_map(|_| {
                let a = UdpSocket::bind("127.0.0.1:0").ok()?;
                let port = a.local_addr().ok()?.port();
                let b = UdpSocket::bind(("127.0.0.1", port.checked_add(1)?)).ok()?;
                Some((a, b))
            })
            .expect("a free loopback port pair");
        let addr = a.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let received: Log = Arc::new(Mutex::new(Vec::new()));
        let mut threads = [a, b]
            .into_iter()
            .map(|sock| {
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                let (s, r) = (stop.clone(), received.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while !s.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = sock.recv_from(&mut buf) {
                            let _ = sock.send_to(&buf[..n], from);
                            r.lock().expect("peer log").push((from, buf[..n].to_vec()));
                        }
                    }
                })
            })
            .collect::<Vec<_>>();
        // A TCP echo on the same port, for RFC 6062 TCP relaying.
        let tcp_bytes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        if let Ok(listener) = std::net::TcpListener::bind(addr) {
            listener.set_nonblocking(true).expect("nonblocking");
            let (s, bytes) = (stop.clone(), tcp_bytes.clone());
            threads.push(std::thread::spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let (s, bytes) = (s.clone(), bytes.clone());
                            std::thread::spawn(move || tcp_echo(conn, &s, &bytes));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        EchoPeer {
            addr,
            stop,
            received,
            tcp_bytes,
            threads,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes echoed over TCP so far.
    pub fn tcp_bytes(&self) -> usize {
        self.tcp_bytes.load(Ordering::Relaxed)
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.received.lock().expect("peer log").len()
    }

    /// Everything received so far, with the sender (a relay address).
    pub fn received(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.received.lock().expect("peer log").clone()
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_echo(
    mut conn: std::net::TcpStream,
    stop: &AtomicBool,
    bytes: &std::sync::atomic::AtomicUsize,
) {
    use std::io::{Read, Write};
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = conn.set_nodelay(true);
    let mut buf = vec![0u8; 16384];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n, Ordering::Relaxed);
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

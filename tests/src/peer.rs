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
        let threads = [a, b]
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
            .collect();
        EchoPeer {
            addr,
            stop,
            received,
            threads,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

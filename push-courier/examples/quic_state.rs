//! How much memory quinn-proto itself keeps per idle server connection,
//! under the courier's own QUIC configuration: the floor under a QUIC
//! device link, before quinn's async wrapper or the courier add theirs.
//!
//! Runs N handshakes (with device certificates) between two in-memory
//! quinn-proto endpoints, no sockets, then drops the client side and
//! counts the bytes still allocated for the server side.
//!
//!   cargo run --release -p push-courier --example quic_state [N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Endpoint, EndpointConfig,
};

/// Counts the bytes allocated and not yet freed.
struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// A global allocator can only be written as an unsafe impl.
// SAFETY: every call is passed to the system allocator unchanged.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, n)
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// The datagrams `conn` has to send now, one per transmit.
fn datagrams(conn: &mut Connection, now: Instant) -> Vec<BytesMut> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
        out.push(BytesMut::from(&buf[..t.size]));
        buf.clear();
    }
    out
}

#[allow(clippy::print_stdout)]
fn main() -> anyhow::Result<()> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 2000,
    };
    let pki = parley_tests::pki::TestPki::new();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&pki.ca_pem, rcgen::KeyPair::from_pem(&pki.ca_key_pem)?)?;
    let device_key = rcgen::KeyPair::generate()?;
    let device_cert =
        rcgen::CertificateParams::new(vec!["device".into()])?.signed_by(&device_key, &issuer)?;

    let server_tls = push_courier::device::tls_config(
        vec![pki.server_cert.clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
        pki.roots(),
        Vec::new(),
    )?;
    let server_cfg =
        push_courier::device::quic_server_config(server_tls, Duration::from_secs(600))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(pki.roots())
        .with_client_auth_cert(
            vec![device_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(device_key.serialize_der().into()),
        )?;
    client_tls.alpn_protocols = vec![wire::push::ALPN.to_vec()];
    let client_cfg = ClientConfig::new(Arc::new(
        quinn_proto::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));

    let mut server = Endpoint::new(
        Arc::new(EndpointConfig::default()),
        Some(Arc::new(server_cfg)),
        true,
        None,
    );
    let mut client = Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None);
    let server_addr: SocketAddr = "127.0.0.1:5223".parse()?;
    let now = Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let mut servers: Vec<Connection> = Vec::with_capacity(n);
    let mut clients: Vec<Connection> = Vec::with_capacity(n);
    for i in 0..n {
        let addr = SocketAddr::from(([127, 0, (i / 250) as u8, (i % 250 + 1) as u8], 40000));
        let (_, mut c) = client.connect(now, client_cfg.clone(), server_addr, "localhost")?;
        let mut s: Option<(ConnectionHandle, Connection)> = None;
        // A handshake is a few flights; bounded.
        for _ in 0..20 {
            let mut moved = false;
            for data in datagrams(&mut c, now) {
                moved = true;
                let mut reply = Vec::new();
                match server.handle(now, addr, None, None, data, &mut reply) {
                    Some(DatagramEvent::NewConnection(incoming)) => {
                        let accepted = server.accept(incoming, now, &mut reply, None);
                        s = Some(accepted.map_err(|e| anyhow::anyhow!("{:?}", e.cause))?);
                    }
                    Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                        if let Some((_, s)) = s.as_mut() {
                            s.handle_event(ev);
                        }
                    }
                    _ => {}
                }
            }
            if let Some((h, s)) = s.as_mut() {
                while let Some(ev) = s.poll_endpoint_events() {
                    if let Some(ev) = server.handle_event(*h, ev) {
                        s.handle_event(ev);
                    }
                }
                for data in datagrams(s, now) {
                    moved = true;
                    let mut reply = Vec::new();
                    if let Some(DatagramEvent::ConnectionEvent(_, ev)) =
                        client.handle(now, server_addr, None, None, data, &mut reply)
                    {
                        c.handle_event(ev);
                    }
                }
                while s.poll().is_some() {}
            }
            while c.poll_endpoint_events().is_some() {}
            while c.poll().is_some() {}
            if !moved {
                break;
            }
        }
        let (_, s) = s.ok_or_else(|| anyhow::anyhow!("no server connection"))?;
        anyhow::ensure!(!s.is_handshaking(), "handshake {i} did not finish");
        servers.push(s);
        clients.push(c);
    }
    drop(clients);
    drop(client);
    let per_conn = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;
    println!("quinn-proto server connections: {n}");
    println!(
        "  the connection struct: {} bytes",
        std::mem::size_of::<Connection>()
    );
    println!(
        "  allocated per connection, struct included (keys, TLS session, sent-packet map, ids): {:.0} bytes ({:.1} KiB)",
        per_conn,
        per_conn / 1024.0
    );
    drop(servers);
    drop(server);
    Ok(())
}

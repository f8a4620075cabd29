//! What the relay carries, byte for byte, over real loopback sockets.

use parley_tests::peer::EchoPeer;
use parley_tests::relay::{self, PASSWORD, USER};
use parley_tests::turn_client::{Incoming, TurnClient};
use std::net::SocketAddr;
use std::sync::Arc;
use stun_turn::message::{AttrType, Class, Message, MessageBuilder, Method, TransactionId};

/// A deterministic payload of `len` bytes, different for every `seed`.
fn payload(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn channel_data_and_send_indications_arrive_byte_for_byte_both_ways() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(relay.udp_addrs()[0], USER, PASSWORD);
    let relayed = c.allocate().expect("allocate");
    c.channel_bind(0x4001, peer.addr()).expect("channel bind");

    let mut sent = Vec::new();
    for i in 0..200u32 {
        // Every length from 0 up, including ones that need padding.
        let p = payload(i, (i as usize * 7) % 1400);
        c.send_channel(0x4001, &p);
        match c.recv() {
            Some(Incoming::ChannelData(0x4001, echoed)) => {
                assert_eq!(echoed, p, "echo of datagram {i}")
            }
            other => {
                use std::sync::atomic::Ordering::Relaxed;
                let m: Vec<_> = relay
                    .metrics()
                    .iter()
                    .map(|m| {
                        (
                            m.packets_to_peer.load(Relaxed),
                            m.packets_to_client.load(Relaxed),
                            m.dropped_no_permission.load(Relaxed),
                            m.allocations.load(Relaxed),
                        )
                    })
                    .collect();
                panic!("datagram {i}: expected ChannelData, got {other:?}; peer got {:?}; metrics {m:?}; relayed {relayed}", peer.received());
            }
        }
        sent.push(p);
    }
    for i in 200..250u32 {
        let p = payload(i, 1 + i as usize % 500);
        c.send_indication(peer.addr(), &p);
        // The peer is bound to a channel, so the answer comes as ChannelData.
        match c.recv() {
            Some(Incoming::ChannelData(0x4001, echoed)) => assert_eq!(echoed, p),
            other => panic!("datagram {i}: {other:?}"),
        }
        sent.push(p);
    }
    let got = peer.received();
    assert_eq!(got.len(), sent.len());
    for (i, ((from, bytes), want)) in got.iter().zip(&sent).enumerate() {
        assert_eq!(*from, relayed, "datagram {i} came from the relayed address");
        assert_eq!(bytes, want, "datagram {i} arrived unchanged");
    }
}

#[test]
fn data_indications_carry_peer_traffic_without_a_channel() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(relay.udp_addrs()[0], USER, PASSWORD);
    c.allocate().expect("allocate");
    c.create_permission(peer.addr()).expect("permission");
    for i in 0..20u32 {
        let p = payload(i, 33 + i as usize);
        c.send_indication(peer.addr(), &p);
        assert_eq!(c.recv(), Some(Incoming::Data(peer.addr(), p)));
    }
}

#[test]
fn nothing_flows_without_a_permission() {
    let relay = relay::start(relay::lab_config());
    let peer = EchoPeer::start();
    let mut c = TurnClient::new(relay.udp_addrs()[0], USER, PASSWORD);
    let relayed = c.allocate().expect("allocate");
    c.send_indication(peer.addr(), b"no permission yet");
    assert_eq!(c.recv(), None);
    assert_eq!(peer.count(), 0);
    // A stranger writing to the relayed address is dropped too.
    let stranger = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    stranger.send_to(b"unsolicited", relayed).expect("send");
    assert_eq!(c.recv(), None);
}

#[test]
fn every_loopback_form_is_refused_over_the_wire() {
    let relay = relay::start(relay::loopback_config());
    let mut c = TurnClient::new(relay.udp_addrs()[0], USER, PASSWORD);
    c.allocate().expect("allocate");
    let own = relay.udp_addrs()[0];
    for p in [
        "127.0.0.1:9",
        "0.0.0.0:9",
        "10.1.1.1:9",
        "169.254.169.254:80",
        "192.168.0.1:9",
        "100.64.0.1:9",
        "224.0.0.1:9",
    ] {
        let p: SocketAddr = p.parse().expect("addr");
        assert_eq!(c.create_permission(p), Err(403), "{p}");
        assert_eq!(c.channel_bind(0x4002, p), Err(403), "{p}");
    }
    assert_eq!(
        c.create_permission(own),
        Err(403),
        "the relay's own listener"
    );
    // Refresh to zero deletes; a second one finds no allocation.
    assert_eq!(c.refresh(0), Ok(()));
    assert_eq!(c.refresh(600), Err(437));
}

#[test]
fn tls_negotiates_the_stun_turn_alpn() {
    let relay = relay::start(relay::loopback_config());
    let addr = relay.tls_addrs()[0];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"stun.turn".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"stun.turn"[..]));
        assert_eq!(
            tls.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let mut req = Vec::new();
        MessageBuilder::new(
            &mut req,
            Class::Request,
            Method::Binding,
            TransactionId([4; 12]),
        );
        tls.write_all(&req).await.expect("write");
        let mut resp = vec![0u8; 32];
        tokio::time::timeout(std::time::Duration::from_secs(5), tls.read_exact(&mut resp))
            .await
            .expect("in time")
            .expect("read");
        let m = Message::decode(&resp).expect("decodes");
        assert_eq!(m.class(), Class::Success);
        let mapped = m
            .xor_address(AttrType::XorMappedAddress)
            .expect("attr")
            .expect("mapped");
        assert!(mapped.ip().is_loopback());
    });
}

/// The test certificate is self-signed; the test checks ALPN, not trust.
#[derive(Debug)]
struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn an_even_port_reservation_holds_the_next_port_until_claimed() {
    let relay = relay::start(relay::lab_config());
    let server = relay.udp_addrs()[0];
    let mut first = TurnClient::new(server, USER, PASSWORD);
    let (even, token) = first.allocate_even_pair().expect("even allocation");
    assert_eq!(even.port() % 2, 0, "{even}");
    let next = SocketAddr::new(even.ip(), even.port() + 1);
    // Nobody else can take the reserved port meanwhile ...
    assert!(
        std::net::UdpSocket::bind(next).is_err(),
        "{next} is not held for the reservation"
    );
    // ... and the token's allocation gets exactly it.
    let mut second = TurnClient::new(server, USER, PASSWORD);
    assert_eq!(second.allocate_reserved(token), Ok(next));
    assert_eq!(
        second.allocate_reserved(token),
        Err(437),
        "already allocated"
    );
    let mut third = TurnClient::new(server, USER, PASSWORD);
    assert_eq!(
        third.allocate_reserved(token),
        Err(508),
        "a token is single-use"
    );
}

//! SIP over secure WebSocket (RFC 7118) through the real runtime: a device
//! with an ids-issued certificate registers over WSS, is found by the
//! directory, and a call from UDP reaches it over its WebSocket.

use futures_util::{SinkExt, StreamExt};
use signaling::core::message::{HeaderName, Message};
use signaling::runtime::{tls_config, Config, Directory, NoWaker, Server};
use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as Ws;
use wire::handle::Handle;
use wire::keys::{DeviceId, SigningKey};

const BOB: &str = "+14155550123";

/// Lists exactly the devices it was given.
struct Listed(Mutex<Vec<DeviceId>>);

impl Directory for Listed {
    fn authorize(
        &self,
        device: DeviceId,
        handle: Handle,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'static>> {
        let ok = handle.as_str() == BOB && self.0.lock().unwrap().contains(&device);
        Box::pin(async move { ok })
    }
}

struct Pki {
    roots: rustls::RootCertStore,
    server: (Vec<rustls::pki_types::CertificateDer<'static>>, Vec<u8>),
    device_ca: ids::certs::DeviceCa,
}

fn pki() -> Pki {
    let t = parley_tests::pki::TestPki::new();
    Pki {
        roots: t.roots(),
        server: (vec![t.server_cert.clone()], t.server_key.clone()),
        device_ca: ids::certs::DeviceCa::from_pem(&t.ca_pem, &t.ca_key_pem).unwrap(),
    }
}

/// A device's TLS client configuration with its ids-issued certificate.
fn device_tls(pki: &Pki, id: DeviceId) -> Arc<rustls::ClientConfig> {
    let key = SigningKey::generate();
    let (_, pem) = pki
        .device_ca
        .issue(id, &key.public(), [7; 16], 1_790_000_000)
        .unwrap();
    let chain = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_client_auth_cert(
            chain,
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into()),
        )
        .unwrap();
    Arc::new(cfg)
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn open(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    subprotocol: Option<&str>,
) -> Result<WsStream, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!("wss://localhost:{}/", addr.port())
        .into_client_request()
        .unwrap();
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, stream)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok()),
        Some("sip")
    );
    Ok(ws)
}

async fn next_sip(ws: &mut WsStream) -> String {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a message within 5 s")
            .expect("open")
            .expect("frame");
        if let Ws::Text(t) = m {
            return t;
        }
    }
}

#[test]
fn a_device_registers_over_wss_and_a_udp_call_reaches_it() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pki = pki();
        let listed = DeviceId::random();
        let directory = Arc::new(Listed(Mutex::new(vec![listed])));
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut config = Config {
            udp: vec![any],
            tcp: vec![],
            tls: vec![],
            wss: vec![any],
            ..Config::default()
        };
        config.proxy.domains = vec!["parley.test".into()];
        config.proxy.allow_unauthenticated_calls = true;
        let tls = tls_config(
            pki.server.0.clone(),
            rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server.1.clone().into()),
            pki.roots.clone(),
        )
        .unwrap();
        let server = Server::start(config, Some(tls), directory, Arc::new(NoWaker))
            .await
            .unwrap();
        let wss = server.wss_addrs()[0];
        let udp = server.udp_addrs()[0];

        // Without the sip subprotocol the upgrade is refused.
        let refused = open(wss, device_tls(&pki, listed), None).await;
        assert!(refused.is_err(), "upgrade without `sip` must fail");

        // A device ids does not list for Bob is refused with 403.
        let mut stranger = open(wss, device_tls(&pki, DeviceId::random()), Some("sip"))
            .await
            .unwrap();
        let register = |instance: &str| {
            format!(
                "REGISTER sip:parley.test SIP/2.0\r\n\
                 Via: SIP/2.0/WSS df7jal23ls0d.invalid;branch=z9hG4bK{instance}\r\n\
                 From: <sip:{BOB}@parley.test>;tag=w\r\n\
                 To: <sip:{BOB}@parley.test>\r\n\
                 Call-ID: ws-{instance}\r\n\
                 CSeq: 1 REGISTER\r\n\
                 Contact: <sip:dev@df7jal23ls0d.invalid;transport=ws>;+sip.instance=\"<urn:uuid:{instance}>\";reg-id=1\r\n\
                 Supported: outbound\r\n\
                 Content-Length: 0\r\n\r\n"
            )
        };
        stranger.send(Ws::Text(register("x1"))).await.unwrap();
        let r = next_sip(&mut stranger).await;
        assert!(r.starts_with("SIP/2.0 403 "), "{r}");

        let mut ws = open(wss, device_tls(&pki, listed), Some("sip"))
            .await
            .unwrap();
        ws.send(Ws::Text(register("d1"))).await.unwrap();
        let r = next_sip(&mut ws).await;
        assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
        let r = Message::parse(r.as_bytes()).unwrap();
        assert_eq!(r.header(&HeaderName::REQUIRE), Some("outbound"));

        // A call from a UDP caller reaches the device over its WebSocket.
        let caller = UdpSocket::bind("127.0.0.1:0").unwrap();
        caller
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let me = caller.local_addr().unwrap();
        let invite = format!(
            "INVITE sip:{BOB}@parley.test SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bKcall1;rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:+14155550100@parley.test>;tag=c\r\n\
             To: <sip:{BOB}@parley.test>\r\n\
             Call-ID: ws-call\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:caller@{me}>\r\n\
             Content-Length: 0\r\n\r\n"
        );
        caller.send_to(invite.as_bytes(), udp).unwrap();
        let inv = next_sip(&mut ws).await;
        assert!(inv.starts_with("INVITE sip:dev@df7jal23ls0d.invalid;transport=ws SIP/2.0\r\n"), "{inv}");
        let inv = Message::parse(inv.as_bytes()).unwrap();
        let rr: Vec<&str> = inv.values(&HeaderName::RECORD_ROUTE).collect();
        assert_eq!(rr.len(), 2, "UDP on one side, WSS on the other: two Record-Routes\n{inv:?}");
        assert!(rr[0].contains("transport=ws"), "{inv:?}");
        let mut ok = Message::dialog_response(&inv, 200, "OK", "dev");
        ok.push(HeaderName::CONTACT, "<sip:dev@df7jal23ls0d.invalid;transport=ws>");
        ws.send(Ws::Text(String::from_utf8(ok.to_bytes()).unwrap()))
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let mut codes = Vec::new();
        while !codes.contains(&200) {
            let (n, _) = caller.recv_from(&mut buf).expect("a response within 5 s");
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            codes.push(text[8..11].parse::<u16>().unwrap());
        }
        assert_eq!(codes, vec![100, 200]);
        server.shutdown(Duration::ZERO).await;
    });
}

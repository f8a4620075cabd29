//! `parley up` joins signaling to the identity service and the courier:
//! a device activated through ids registers over SIP/TLS with its ids
//! certificate (a device ids does not list is refused), falls asleep, is
//! woken by a VoIP push on its courier link when a call comes, registers
//! again and takes the call.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use client_sdk::courier::{ClientEvent, DeviceClient, DeviceCredentials, Transport};
use parley_tests::up::Up;
use signaling::core::message::{HeaderName, Message};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::device_list::{DeviceEntry, DeviceList, DirectoryValue};
use wire::{DeviceId, SigningKey};

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_parley");
const BOB: &str = "+14155550123";
const ALICE: &str = "+14155550100";
const ALICE_PASSWORD: &str = "alice-password";
const TOPIC: &str = "com.example.phone.voip";

fn start(data: &Path, config: &Path) -> Up {
    parley_tests::up::start(BIN, data, config)
}

/// One HTTPS call to ids with curl; returns (status, JSON body).
fn ids_call(
    up: &Up,
    data: &Path,
    path: &str,
    body: &serde_json::Value,
    key: Option<&SigningKey>,
) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let mut args: Vec<String> = vec![
        "-sS".into(),
        "--cacert".into(),
        data.join("ca.pem").display().to_string(),
        "-X".into(),
        "POST".into(),
        "-H".into(),
        "content-type: application/json".into(),
        "-d".into(),
        body.clone(),
        "-w".into(),
        "\n%{http_code}".into(),
    ];
    if let Some(k) = key {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let auth = wire::request_auth::sign(k, "POST", path, ts, body.as_bytes());
        args.push("-H".into());
        args.push(format!("authorization: {auth}"));
    }
    args.push(format!("https://{}{path}", up.ids));
    let out = parley_tests::tool::run("curl", &args, Duration::from_secs(20));
    let (json, status) = out.text.trim().rsplit_once('\n').expect("status line");
    (
        status.trim().parse().unwrap(),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

/// Proves Bob's number and creates his account with one device; returns
/// the device's key, id and certificate (PEM).
fn activate(up: &Up, data: &Path) -> (SigningKey, DeviceId, String) {
    activate_as(up, data, BOB)
}

/// Proves `handle` and creates its account with one device.
fn activate_as(up: &Up, data: &Path, handle: &str) -> (SigningKey, DeviceId, String) {
    let outbox = data.join("outbox");
    let seen: Vec<std::path::PathBuf> = std::fs::read_dir(&outbox)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let (s, v) = ids_call(
        up,
        data,
        "/v1/verifications",
        &serde_json::json!({"handle": handle}),
        None,
    );
    assert_eq!(s, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        let found = std::fs::read_dir(&outbox).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "txt") && !seen.contains(p))
        });
        if let Some(f) = found {
            let text = std::fs::read_to_string(f).unwrap();
            break text
                .split("code is ")
                .nth(1)
                .unwrap()
                .chars()
                .take(6)
                .collect::<String>();
        }
        assert!(Instant::now() < deadline, "no code in the outbox");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (s, v) = ids_call(
        up,
        data,
        &format!("/v1/verifications/{id}/check"),
        &serde_json::json!({"code": code}),
        None,
    );
    assert_eq!(s, 200, "{v}");
    let token = v["handle_token"].as_str().unwrap().to_owned();

    let account = SigningKey::generate();
    let device = SigningKey::generate();
    let device_id = DeviceId::random();
    let list = DeviceList {
        account_key: account.public(),
        seq: 1,
        handles: vec![wire::Handle::parse(handle).unwrap().uri()],
        devices: vec![DeviceEntry {
            id: device_id,
            identity_key: device.public(),
        }],
    };
    let signed = B64.encode(DirectoryValue::Active(list.sign(&account).unwrap()).encode());
    let (s, v) = ids_call(
        up,
        data,
        "/v1/accounts",
        &serde_json::json!({"handle_tokens": [token], "device_list": signed, "device": {}}),
        Some(&device),
    );
    assert_eq!(s, 201, "{v}");
    let cert = v["certificate"].as_str().unwrap().to_owned();
    (device, device_id, cert)
}

fn roots(data: &Path) -> rustls::RootCertStore {
    let pem = std::fs::read(data.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    roots
}

fn credentials(data: &Path, key: &SigningKey, cert_pem: &str) -> DeviceCredentials {
    DeviceCredentials {
        chain: rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap(),
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into()),
        roots: roots(data),
        server_name: "localhost".into(),
    }
}

/// A SIP/TLS connection with a device certificate; reads whole messages.
struct SipTls {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl SipTls {
    async fn connect(addr: SocketAddr, creds: &DeviceCredentials) -> SipTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(creds.roots.clone())
            .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        SipTls {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, msg: &str) {
        self.stream.write_all(msg.as_bytes()).await.unwrap();
    }

    async fn recv(&mut self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(signaling::core::message::Frame::Message(n))) =
                signaling::core::message::frame(&self.buf)
            {
                let m: Vec<u8> = self.buf.drain(..n).collect();
                return String::from_utf8(m).unwrap();
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut chunk))
                .await
                .expect("a SIP message within 10 s")
                .unwrap();
            assert!(n > 0, "signaling closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn register_text(contact: &str, call_id: &str, cseq: u32) -> String {
    format!(
        "REGISTER sip:localhost SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:1;branch=z9hG4bKreg{cseq}{call_id}\r\n\
         From: <sip:{BOB}@localhost>;tag=r\r\n\
         To: <sip:{BOB}@localhost>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         Contact: {contact}\r\n\
         Expires: 600\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The digest answer for Alice's account to a `Proxy-Authenticate`
/// challenge (SHA-256, RFC 8760).
fn proxy_authorization(challenges: &[&str], uri: &str) -> String {
    let sha = challenges
        .iter()
        .find(|c| c.contains("SHA-256"))
        .expect("a SHA-256 challenge");
    let field = |name: &str| {
        sha.split(&format!("{name}=\""))
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned()
    };
    let (realm, nonce) = (field("realm"), field("nonce"));
    let h = |s: String| {
        ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let ha1 = h(format!("{ALICE}:{realm}:{ALICE_PASSWORD}"));
    let ha2 = h(format!("INVITE:{uri}"));
    let response = h(format!("{ha1}:{nonce}:00000001:feed:auth:{ha2}"));
    format!(
        "Digest username=\"{ALICE}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm=SHA-256, qop=auth, nc=00000001, cnonce=\"feed\""
    )
}

/// `parley up` in `dir` with Alice's digest account, a 30 s ring timeout
/// and `extra` configuration, and Bob's phone activated through its ids:
/// the data directory, the stack and the phone's credentials.
fn bob_and_alice_up(dir: &Path, extra: &str) -> (std::path::PathBuf, Up, DeviceCredentials) {
    let data = dir.join("data");
    let config = dir.join("parley.toml");
    std::fs::write(
        &config,
        format!(
            "[signaling]\nring_timeout_secs = 30\ndigest_sha256 = true\n\
             [[signaling.accounts]]\nhandle = \"{ALICE}\"\npassword = \"{ALICE_PASSWORD}\"\n{extra}"
        ),
    )
    .unwrap();
    let up = start(&data, &config);
    let (key, _, cert) = activate(&up, &data);
    let creds = credentials(&data, &key, &cert);
    (data, up, creds)
}

#[test]
fn a_sleeping_device_is_woken_through_the_courier_and_takes_the_call() {
    parley_tests::tool::require("curl");
    let dir = tempfile::tempdir().unwrap();
    let (data, up, creds) = bob_and_alice_up(dir.path(), "");

    runtime().block_on(async {
        // The phone holds its courier link and learns its VoIP token.
        let (mut courier, tokens) =
            DeviceClient::connect(up.courier, Transport::Tls, &creds, &[TOPIC], 0)
                .await
                .unwrap();
        let token = tokens
            .iter()
            .find(|(t, _)| t == TOPIC)
            .map(|(_, t)| t.to_hex())
            .unwrap();
        let contact = format!(
            "<sip:phone@127.0.0.1:1;transport=tls;pn-provider=parley;pn-prid={token};pn-param={TOPIC}>;+sip.instance=\"<urn:uuid:0f1e2d3c-0000-4000-8000-000000000001>\""
        );

        // A certificate from the same CA for a device ids does not list is
        // refused.
        let stranger_key = SigningKey::generate();
        let ca = ids::certs::DeviceCa::from_pem(
            &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
        )
        .unwrap();
        let (_, stranger_pem) = ca
            .issue(DeviceId::random(), &stranger_key.public(), [9; 16], 1_790_000_000)
            .unwrap();
        let mut stranger =
            SipTls::connect(up.sip_tls, &credentials(&data, &stranger_key, &stranger_pem)).await;
        stranger.send(&register_text(&contact, "reg-x", 1)).await;
        let r = stranger.recv().await;
        assert!(r.starts_with("SIP/2.0 403 "), "{r}");

        // Bob's phone registers with its ids certificate, then sleeps.
        registers_and_sleeps(&up, &creds, &contact, "reg-1").await;

        // Alice calls from a standard user agent with her digest account.
        let alice = alice_invites(&up, "wake-call");

        // The VoIP push arrives on the phone's courier link.
        let push = loop {
            match courier.next_within(Duration::from_secs(10)).await {
                Ok(ClientEvent::Notification(n)) => break n,
                Ok(ClientEvent::Closed(r)) => panic!("courier link closed: {r:?}"),
                Ok(_) => {}
                Err(e) => panic!("no VoIP push: {e}"),
            }
        };
        courier.ack(&[push.id]).await.unwrap();
        assert_eq!(push.push_type, wire::push::PushType::Voip);
        assert_eq!(push.priority, 10);
        let payload: serde_json::Value = serde_json::from_slice(&push.payload).unwrap();
        assert_eq!(payload["parley"]["call_id"], "wake-call");

        // Woken, the phone registers again and the INVITE follows.
        registers_again_and_answers(&up, &creds, &contact, "reg-1", "phone", &alice).await;
    });
}

/// /metrics counts one wake-up through `platform` that ended in `outcome`
/// (bounded wait: the count follows the platform's answer).
fn upstream_counted(up: &Up, platform: &str, outcome: &str) {
    let line =
        format!("parley_upstream_wakes_total{{platform=\"{platform}\",outcome=\"{outcome}\"}} 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, m) = parley_tests::tool::http_get(up.admin, "/metrics");
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "no {line} in\n{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A device tells our courier its token at Apple's or Google's service
/// over its own link (then leaves the link: it sleeps); the courier's
/// answer.
async fn registers_platform(
    up: &Up,
    creds: &DeviceCredentials,
    token: wire::push::PlatformToken,
) -> (wire::push::PlatformStatus, String) {
    let (mut link, _) = DeviceClient::connect(up.courier, Transport::Tls, creds, &[TOPIC], 0)
        .await
        .unwrap();
    support::platform_answer(&mut link, token).await
}

/// The bundle id an app's platform tokens name (its VoIP topic without
/// `.voip`).
fn bundle() -> String {
    TOPIC.trim_end_matches(".voip").to_owned()
}

/// Mallory (`creds`, handle `me`) registers `contact` and sleeps, then
/// calls herself from another connection (Call-ID `call_id`); her caller
/// connection, past the 100 Trying.
async fn calls_own_sleeping_binding(
    up: &Up,
    creds: &DeviceCredentials,
    me: &str,
    contact: &str,
    call_id: &str,
) -> SipTls {
    let mut sip = SipTls::connect(up.sip_tls, creds).await;
    sip.send(&register_text(contact, &format!("reg-{call_id}"), 1).replace(BOB, me))
        .await;
    let r = sip.recv().await;
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    drop(sip);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut caller = SipTls::connect(up.sip_tls, creds).await;
    caller
        .send(&format!(
            "INVITE sip:{me}@localhost SIP/2.0\r\n\
             Via: SIP/2.0/TLS 127.0.0.1:2;branch=z9hG4bK{call_id}\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{me}@localhost>;tag=m1\r\n\
             To: <sip:{me}@localhost>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: 1 INVITE\r\n\
             Contact: <sip:m@127.0.0.1:2;transport=tls>\r\n\
             Content-Length: 0\r\n\r\n"
        ))
        .await;
    let trying = caller.recv().await;
    assert!(trying.starts_with("SIP/2.0 100 "), "{trying}");
    caller
}

/// A device registers `contact` (Call-ID `reg`, CSeq 1) with its
/// certificate, then closes its connection: asleep.
async fn registers_and_sleeps(up: &Up, creds: &DeviceCredentials, contact: &str, reg: &str) {
    let mut sip = SipTls::connect(up.sip_tls, creds).await;
    sip.send(&register_text(contact, reg, 1)).await;
    let r = sip.recv().await;
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    drop(sip);
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A woken device registers again with `contact` (Call-ID `reg`, CSeq
/// 2), takes the INVITE that waited for it (to `user`), answers, and
/// Alice hears the 200.
async fn registers_again_and_answers(
    up: &Up,
    creds: &DeviceCredentials,
    contact: &str,
    reg: &str,
    user: &str,
    alice: &UdpSocket,
) {
    let mut sip = SipTls::connect(up.sip_tls, creds).await;
    sip.send(&register_text(contact, reg, 2)).await;
    let r = sip.recv().await;
    assert!(r.starts_with("SIP/2.0 200 OK\r\n"), "{r}");
    let inv = sip.recv().await;
    assert!(
        inv.starts_with(&format!("INVITE sip:{user}@127.0.0.1:1;")),
        "{inv}"
    );
    let inv = Message::parse(inv.as_bytes()).unwrap();
    let mut ok = Message::dialog_response(&inv, 200, "OK", user);
    ok.push(
        HeaderName::CONTACT,
        format!("<sip:{user}@127.0.0.1:1;transport=tls>"),
    );
    sip.send(&String::from_utf8(ok.to_bytes()).unwrap()).await;
    let answered = recv_udp(alice);
    assert!(answered.starts_with("SIP/2.0 200 OK\r\n"), "{answered}");
}

/// Alice, a standard user agent with a digest account, calls Bob over UDP
/// with `call_id`: the INVITE, the 407, the ACK, the INVITE with her
/// credentials, and the 100 Trying. Her socket, for what comes next.
fn alice_invites(up: &Up, call_id: &str) -> UdpSocket {
    let alice = UdpSocket::bind("127.0.0.1:0").unwrap();
    alice
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let me = alice.local_addr().unwrap();
    let uri = format!("sip:{BOB}@localhost");
    let invite = |branch: &str, cseq: u32, auth: Option<String>| {
        let auth = auth
            .map(|a| format!("Proxy-Authorization: {a}\r\n"))
            .unwrap_or_default();
        format!(
            "INVITE {uri} SIP/2.0\r\n\
             Via: SIP/2.0/UDP {me};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\n\
             From: <sip:{ALICE}@localhost>;tag=alice\r\n\
             To: <sip:{BOB}@localhost>\r\n\
             Call-ID: {call_id}\r\n\
             CSeq: {cseq} INVITE\r\n\
             Contact: <sip:alice@{me}>\r\n\
             {auth}\
             Content-Length: 0\r\n\r\n"
        )
    };
    alice
        .send_to(invite("a1", 1, None).as_bytes(), up.sip_udp)
        .unwrap();
    let challenge = recv_udp(&alice);
    assert!(challenge.starts_with("SIP/2.0 407 "), "{challenge}");
    let challenge = Message::parse(challenge.as_bytes()).unwrap();
    let ack = format!(
        "ACK {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKa1;rport\r\n\
         From: <sip:{ALICE}@localhost>;tag=alice\r\nTo: {}\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        challenge.header(&HeaderName::TO).unwrap()
    );
    alice.send_to(ack.as_bytes(), up.sip_udp).unwrap();
    let challenges: Vec<&str> = challenge.lines(&HeaderName::PROXY_AUTHENTICATE).collect();
    let auth = proxy_authorization(&challenges, &uri);
    alice
        .send_to(invite("a2", 2, Some(auth)).as_bytes(), up.sip_udp)
        .unwrap();
    let trying = recv_udp(&alice);
    assert!(trying.starts_with("SIP/2.0 100 "), "{trying}");
    alice
}

fn recv_udp(sock: &UdpSocket) -> String {
    let mut buf = [0u8; 8192];
    let (n, _) = sock.recv_from(&mut buf).expect("a response within 10 s");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

/// The attack of a user with an account: register your own handle with
/// the victim's VoIP token (learnt from a lookup, a log, a shared
/// device…), go to sleep, call yourself. The wake-up names the device
/// that registered the binding, the courier finds the token is not that
/// device's, and the victim's phone hears nothing.
#[test]
fn a_wake_binding_with_another_devices_token_wakes_nobody() {
    parley_tests::tool::require("curl");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("parley.toml");
    std::fs::write(&config, "[signaling]\nring_timeout_secs = 30\n").unwrap();
    let up = start(&data, &config);
    let (bob_key, _, bob_cert) = activate(&up, &data);
    let bob = credentials(&data, &bob_key, &bob_cert);
    const MALLORY: &str = "+14155550199";
    let (m_key, _, m_cert) = activate_as(&up, &data, MALLORY);
    let mallory = credentials(&data, &m_key, &m_cert);

    runtime().block_on(async {
        let (mut courier, tokens) =
            DeviceClient::connect(up.courier, Transport::Tls, &bob, &[TOPIC], 0)
                .await
                .unwrap();
        let victim_token = tokens[0].1.to_hex();

        // Mallory registers her own handle with Bob's token and sleeps.
        let contact = format!(
            "<sip:m@127.0.0.1:1;transport=tls;pn-provider=parley;pn-prid={victim_token};pn-param={TOPIC}>;+sip.instance=\"<urn:uuid:0f1e2d3c-0000-4000-8000-0000000000ee>\""
        );
        // She calls herself from another connection.
        let mut caller =
            calls_own_sleeping_binding(&up, &mallory, MALLORY, &contact, "wake-abuse").await;

        // Bob's phone hears nothing (the courier refused the wake-up as
        // another device's token), though a real wake-up takes well under
        // a second on this path.
        match courier.next_within(Duration::from_secs(3)).await {
            Err(client_sdk::courier::ClientError::Timeout) => {}
            Ok(ClientEvent::Notification(n)) => panic!(
                "Bob was woken by Mallory's call: {}",
                String::from_utf8_lossy(&n.payload)
            ),
            other => panic!("unexpected: {other:?}"),
        }
        // The token is not hers: her binding goes, and her call ends now
        // (480) instead of ringing out its 30 s.
        let r = caller.recv().await;
        assert!(r.starts_with("SIP/2.0 480 "), "{r}");
    });
}

/// An iPhone in the background: asleep, no link to our courier, only an
/// APNs device token in its binding (RFC 8599 `pn-provider=apns`), which
/// it registered with our courier over its link before it slept. The
/// call's VoIP push goes through `[courier.upstream.apns]` to Apple, here
/// a second `parley courier` speaking Apple's provider API, with the VoIP
/// headers and a payload that names no one; the phone, woken, registers
/// and takes the call. A stranger who names the iPhone's token, with the
/// courier or in a binding of his own, wakes nobody.
#[test]
fn a_sleeping_iphone_is_woken_through_apns_and_takes_the_call() {
    parley_tests::tool::require("curl");
    let dir = tempfile::tempdir().unwrap();
    // "Apple": a courier with our team's key as a provider.
    let apple_data = dir.path().join("apple");
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let p8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let public = {
        use ring::signature::KeyPair;
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, p8.as_ref(), &rng).unwrap();
        wire::PublicKey::from_slice(kp.public_key().as_ref())
            .unwrap()
            .to_spki_der()
    };
    let p8_path = dir.path().join("AuthKey_KEY1234567.p8");
    std::fs::write(
        &p8_path,
        parley_tests::tool::pem("PRIVATE KEY", p8.as_ref()),
    )
    .unwrap();
    let pub_path = dir.path().join("team.pem");
    std::fs::write(&pub_path, parley_tests::tool::pem("PUBLIC KEY", &public)).unwrap();
    let apple_config = dir.path().join("apple.toml");
    std::fs::write(
        &apple_config,
        format!(
            "[[courier.providers]]\nname = \"us\"\nteam_id = \"TEAM123456\"\n\
             key_id = \"KEY1234567\"\nkey = \"{}\"\ntopics = [\"{TOPIC}\"]\n",
            pub_path.display()
        ),
    )
    .unwrap();
    let apple =
        parley_tests::courier::start_with(BIN, &apple_data, &apple_config, &[], "127.0.0.1");

    // Our stack, with Apple as the courier's upstream.
    let (data, up, creds) = bob_and_alice_up(
        dir.path(),
        &format!(
            "[courier.upstream.apns]\nurl = \"{}\"\nserver_name = \"localhost\"\n\
             ca = \"{}\"\nkey = \"{}\"\nkey_id = \"KEY1234567\"\nteam_id = \"TEAM123456\"\n",
            apple.provider,
            apple_data.join("ca.pem").display(),
            p8_path.display()
        ),
    );

    runtime().block_on(async {
        // The phone's APNs token: its link to "Apple".
        let apple_creds = {
            let ca = ids::certs::DeviceCa::from_pem(
                &std::fs::read_to_string(apple_data.join("ca.pem")).unwrap(),
                &std::fs::read_to_string(apple_data.join("ca-key.pem")).unwrap(),
            )
            .unwrap();
            let k = SigningKey::generate();
            let (_, pem) = ca.issue(DeviceId::random(), &k.public(), [7; 16], 1_790_000_000).unwrap();
            DeviceCredentials {
                chain: rustls_pemfile::certs(&mut pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                key: rustls::pki_types::PrivateKeyDer::Pkcs8(k.pkcs8().to_vec().into()),
                roots: roots(&apple_data),
                server_name: "localhost".into(),
            }
        };
        let (mut apns, tokens) =
            DeviceClient::connect(apple.device, Transport::Tls, &apple_creds, &[TOPIC], 0)
                .await
                .unwrap();
        let apns_token = tokens[0].1.to_hex();
        let pushkit = wire::push::PlatformToken {
            platform: wire::push::Platform::Apns,
            calls: true,
            others: false,
            sandbox: false,
            topic: bundle(),
            token: apns_token.clone(),
            seal_to: None,
        };
        let (status, why) = registers_platform(&up, &creds, pushkit.clone()).await;
        assert_eq!(status, wire::push::PlatformStatus::Ok, "{why}");
        let contact = format!(
            "<sip:iphone@127.0.0.1:1;transport=tls;pn-provider=apns;pn-prid={apns_token};\
             pn-param=TEAM123456.{TOPIC}>;+sip.instance=\"<urn:uuid:0f1e2d3c-0000-4000-8000-0000000000a9>\""
        );
        // It registers with its ids certificate, then goes to the
        // background.
        registers_and_sleeps(&up, &creds, &contact, "reg-i").await;

        let alice = alice_invites(&up, "iphone-call");
        let push = match apns.next_within(Duration::from_secs(10)).await {
            Ok(ClientEvent::Notification(n)) => n,
            other => panic!("no VoIP push through APNs: {other:?}"),
        };
        apns.ack(&[push.id]).await.unwrap();
        assert_eq!(push.push_type, wire::push::PushType::Voip);
        assert_eq!(push.priority, 10);
        assert_eq!(push.topic, TOPIC);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(push.expires > now && push.expires <= now + 31, "{}", push.expires);
        assert_eq!(push.collapse_id, "parley-call");
        // Apple learns that a call waits, under an opaque id: not which
        // call, nor who calls whom.
        let text = String::from_utf8(push.payload.clone()).unwrap();
        let payload: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(payload["parley"]["type"], "call");
        let id = payload["parley"]["id"].as_str().unwrap();
        assert!(wire::push::NotificationId::from_uuid(id).is_some(), "{text}");
        for secret in [ALICE, BOB, "iphone-call"] {
            assert!(!text.contains(secret), "{text}");
        }
        upstream_counted(&up, "apns", "accepted");

        // Woken, the phone registers again and answers.
        registers_again_and_answers(&up, &creds, &contact, "reg-i", "iphone", &alice).await;

        // Mallory, a user of ours, learnt the iPhone's token. The courier
        // will not take it as her device's, and her binding naming it
        // wakes nobody: her call ends at once, Apple hears nothing.
        const MALLORY: &str = "+14155550199";
        let (m_key, _, m_cert) = activate_as(&up, &data, MALLORY);
        let mallory = credentials(&data, &m_key, &m_cert);
        let (status, _) = registers_platform(&up, &mallory, pushkit.clone()).await;
        assert_eq!(status, wire::push::PlatformStatus::Taken);
        let theirs = contact
            .replace("sip:iphone@", "sip:m@")
            .replace("0000000000a9", "0000000000ee");
        let mut caller =
            calls_own_sleeping_binding(&up, &mallory, MALLORY, &theirs, "stolen-token").await;
        let r = caller.recv().await;
        assert!(r.starts_with("SIP/2.0 480 "), "{r}");
        match apns.next_within(Duration::from_secs(2)).await {
            Err(client_sdk::courier::ClientError::Timeout) => {}
            other => panic!("Mallory's call reached the iPhone: {other:?}"),
        }

        // The app is removed: Apple forgets its token. The next call's
        // wake-up is refused (410), the binding goes, and Alice hears 480
        // at once rather than after the ring timeout.
        apns.revoke(tokens[0].1).await.unwrap();
        registers_and_sleeps(&up, &creds, &contact, "reg-i2").await;
        let alice = alice_invites(&up, "iphone-call-2");
        let r = recv_udp(&alice);
        assert!(r.starts_with("SIP/2.0 480 "), "{r}");
        upstream_counted(&up, "apns", "gone");
    });
}

/// An Android phone without a foreground service: asleep, only an FCM
/// registration token in its binding (`pn-provider=fcm`), registered
/// with our courier over its link first. The call's wake-up goes through
/// `[courier.upstream.fcm]` to FCM, here a local stand-in, as a
/// high-priority data message with an opaque id; the phone, woken,
/// registers and takes the call.
#[test]
fn a_sleeping_android_phone_is_woken_through_fcm_and_takes_the_call() {
    parley_tests::tool::require("curl");
    let rt = runtime();
    let fcm = rt.block_on(parley_tests::fcm::FakeFcm::start(3600));
    let dir = tempfile::tempdir().unwrap();
    let account = dir.path().join("service-account.json");
    std::fs::write(&account, fcm.service_account_json()).unwrap();
    let ca = dir.path().join("google-ca.pem");
    std::fs::write(&ca, &fcm.ca_pem).unwrap();
    let (_, up, creds) = bob_and_alice_up(
        dir.path(),
        &format!(
            "[courier.upstream.fcm]\nservice_account = \"{}\"\nurl = \"127.0.0.1:{}\"\nca = \"{}\"\n",
            account.display(),
            fcm.addr.port(),
            ca.display()
        ),
    );

    rt.block_on(async {
        let token = wire::push::PlatformToken {
            platform: wire::push::Platform::Fcm,
            calls: true,
            others: true,
            sandbox: false,
            topic: "parley-test".into(),
            token: "fcm-token-1".into(),
            seal_to: None,
        };
        let (status, why) = registers_platform(&up, &creds, token).await;
        assert_eq!(status, wire::push::PlatformStatus::Ok, "{why}");
        let contact = "<sip:pixel@127.0.0.1:1;transport=tls;pn-provider=fcm;pn-prid=fcm-token-1;\
             pn-param=parley-test>;+sip.instance=\"<urn:uuid:0f1e2d3c-0000-4000-8000-0000000000f1>\"";
        registers_and_sleeps(&up, &creds, contact, "reg-f").await;

        let alice = alice_invites(&up, "pixel-call");
        let deadline = Instant::now() + Duration::from_secs(10);
        let message = loop {
            if let Some(m) = fcm.sent().first() {
                break m["message"].clone();
            }
            assert!(Instant::now() < deadline, "no message reached FCM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(message["token"], "fcm-token-1");
        assert_eq!(message["android"]["priority"], "HIGH");
        let ttl = message["android"]["ttl"].as_str().unwrap();
        assert!(["29s", "30s"].contains(&ttl), "{ttl}");
        assert_eq!(message["android"]["collapse_key"], "parley-call");
        assert_eq!(message["data"]["type"], "call");
        let id = message["data"]["id"].as_str().unwrap();
        assert!(wire::push::NotificationId::from_uuid(id).is_some());
        let text = message.to_string();
        for secret in [ALICE, BOB, "pixel-call"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert_eq!(fcm.issued(), 1);
        upstream_counted(&up, "fcm", "accepted");

        registers_again_and_answers(&up, &creds, contact, "reg-f", "pixel", &alice).await;
    });
}

/// A two-thread runtime for the tests that hold device links.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

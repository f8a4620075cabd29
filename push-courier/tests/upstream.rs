//! The APNs upstream client against a local stand-in: a second Parley
//! courier speaks Apple's provider API, so the client's pushes reach a
//! device connected to it with every APNs header, and its refusals (410
//! with a timestamp, 400 BadDeviceToken, 429) come back as APNs gives them.

mod common;

use std::time::Duration;

use client_sdk::courier::Transport;
use common::*;
use push_courier::upstream::{ApnsClient, ApnsConfig, ApnsPush, Outcome};
use wire::push::{NotificationId, PushType};

fn client_for(env: &Env) -> ApnsClient {
    ApnsClient::new(ApnsConfig {
        addr: env.server().provider_addr(),
        server_name: "localhost".into(),
        roots: env.roots.clone(),
        key_pkcs8: env.provider_key.clone(),
        key_id: KID.into(),
        team_id: TEAM.into(),
    })
}

fn wake(token: String, n: u8) -> ApnsPush {
    ApnsPush {
        token,
        topic: TOPIC.into(),
        push_type: PushType::Voip,
        priority: 10,
        expiration: unix_now() as u64 + 30,
        collapse_id: Some("call-1".into()),
        id: NotificationId([n; 16]),
        payload: br#"{"aps":{},"parley":{"id":"opaque"}}"#.to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voip_wake_reaches_the_device_with_every_apns_header() {
    let apple = Env::start(|_| {}).await;
    let (_, creds) = apple.device();
    let (mut dev, tokens) = apple.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let client = client_for(&apple);
    let push = wake(tokens[0].1.to_hex(), 1);
    assert_eq!(
        client.send(&push).await,
        Outcome::Accepted {
            id: push.id.to_uuid()
        }
    );
    let n = match dev.next_within(Duration::from_secs(5)).await.unwrap() {
        client_sdk::courier::ClientEvent::Notification(n) => n,
        other => panic!("expected the wake, got {other:?}"),
    };
    assert_eq!(n.id, push.id);
    assert_eq!(n.push_type, PushType::Voip);
    assert_eq!(n.priority, 10);
    assert_eq!(n.expires, push.expiration);
    assert_eq!(n.collapse_id, "call-1");
    assert_eq!(n.topic, TOPIC);
    assert_eq!(n.payload, push.payload);
    // Many pushes share the one connection.
    let sends = (2..12u8).map(|i| {
        let (client, push) = (&client, wake(tokens[0].1.to_hex(), i));
        async move { client.send(&push).await }
    });
    for o in futures_util::future::join_all(sends).await {
        assert!(matches!(o, Outcome::Accepted { .. }), "{o:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_tokens_are_gone_and_overload_is_retried() {
    let apple = Env::start(|c| c.provider_rate = 3).await;
    let (_, creds) = apple.device();
    let (dev, tokens) = apple.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let client = client_for(&apple);
    // A token APNs never issued.
    match client.send(&wake("ab".repeat(32), 1)).await {
        Outcome::Gone { reason, since } => {
            assert_eq!((reason.as_str(), since), ("BadDeviceToken", None))
        }
        other => panic!("{other:?}"),
    }
    // A token the app gave up: 410 with when it was last valid.
    let token = tokens[0].1;
    dev.revoke(token).await.unwrap();
    let mut outcome = client.send(&wake(token.to_hex(), 2)).await;
    for _ in 0..50 {
        if matches!(outcome, Outcome::Gone { .. }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        outcome = client.send(&wake(token.to_hex(), 2)).await;
    }
    match outcome {
        Outcome::Gone { reason, since } => {
            assert_eq!(reason, "Unregistered");
            let since = since.expect("410 carries a timestamp");
            assert!((since / 1000 - unix_now()).abs() < 60, "{since}");
        }
        other => panic!("{other:?}"),
    }
    // Past the provider's rate: try again later, as APNs says.
    let (_, creds) = apple.device();
    let (_dev, tokens) = apple.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let mut retried = None;
    for i in 0..10u8 {
        if let Outcome::Retry { after, reason } =
            client.send(&wake(tokens[0].1.to_hex(), 10 + i)).await
        {
            retried = Some((after, reason));
            break;
        }
    }
    let (after, reason) = retried.expect("429 after the provider's rate");
    assert_eq!(reason, "TooManyRequests");
    assert!(after >= Duration::from_secs(1), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_apns_is_retried_and_a_later_one_reached() {
    let mut apple = Env::start(|_| {}).await;
    let client = client_for(&apple);
    let (_, creds) = apple.device();
    let (_dev, tokens) = apple.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert!(matches!(
        client.send(&wake(tokens[0].1.to_hex(), 1)).await,
        Outcome::Accepted { .. }
    ));
    // APNs restarts: the connection drops; the push is to be retried,
    // and the next one goes over a new connection.
    apple.restart().await;
    let (_dev, tokens) = apple.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let mut outcome = client.send(&wake(tokens[0].1.to_hex(), 2)).await;
    if matches!(outcome, Outcome::Retry { .. }) {
        outcome = client.send(&wake(tokens[0].1.to_hex(), 2)).await;
    }
    assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
}

// ------------------------------------------------------------------ FCM

/// A local FCM HTTP v1 stand-in: Google's token endpoint (JWT bearer
/// grant, RS256 assertions checked against the service account's key) and
/// `messages:send`, over TLS and HTTP/2. Registration tokens named
/// `gone`, `busy` and `down` get FCM's errors.
struct FakeFcm {
    addr: std::net::SocketAddr,
    roots: rustls::RootCertStore,
    state: Arc<Mutex<FakeState>>,
}

#[derive(Default)]
struct FakeState {
    /// Access tokens issued, and the live ones.
    issued: u32,
    live: Vec<String>,
    /// Their lifetime, seconds.
    expires_in: i64,
    /// Refuse the next send's token as if it had expired.
    revoke_next: bool,
    sent: Vec<serde_json::Value>,
}

use std::sync::{Arc, Mutex};

impl FakeFcm {
    async fn start(public_pkcs1: Vec<u8>, expires_in: i64) -> FakeFcm {
        let pki = parley_tests::pki::TestPki::new();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![pki.server_cert.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(pki.server_key.clone().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            expires_in,
            ..FakeState::default()
        }));
        let serving = state.clone();
        let key = Arc::new(public_pkcs1);
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state, key) = (acceptor.clone(), serving.clone(), key.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |req| {
                        let (state, key) = (state.clone(), key.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(fake_fcm(req, &state, &key).await)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
                });
            }
        });
        FakeFcm {
            addr,
            roots: pki.roots(),
            state,
        }
    }

    fn issued(&self) -> u32 {
        self.state.lock().unwrap().issued
    }
}

async fn fake_fcm(
    req: hyper::Request<hyper::body::Incoming>,
    state: &Mutex<FakeState>,
    public_pkcs1: &[u8],
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    use http_body_util::BodyExt;
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let answer = |status: u16, headers: &[(&str, &str)], body: serde_json::Value| {
        let mut r = hyper::Response::builder().status(status);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap()
    };
    let fcm_error = |status: u16, code: &str| {
        serde_json::json!({"error": {"code": status, "status": code,
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]}})
    };
    if path == "/token" {
        let form = String::from_utf8_lossy(&body).to_string();
        let assertion = form
            .split('&')
            .find_map(|kv| kv.strip_prefix("assertion="))
            .unwrap_or_default();
        let grant =
            form.contains("grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer");
        let parts: Vec<&str> = assertion.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        let signed = parts.len() == 3
            && ring::signature::UnparsedPublicKey::new(
                &ring::signature::RSA_PKCS1_2048_8192_SHA256,
                public_pkcs1,
            )
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &b64.decode(parts[2]).unwrap_or_default(),
            )
            .is_ok();
        let claims: serde_json::Value = parts
            .get(1)
            .and_then(|c| b64.decode(c).ok())
            .and_then(|c| serde_json::from_slice(&c).ok())
            .unwrap_or_default();
        let scoped = claims["scope"] == push_courier::upstream::fcm::SCOPE
            && claims["iss"] == "parley@example.iam.gserviceaccount.com"
            && claims["aud"]
                .as_str()
                .is_some_and(|a| a.ends_with("/token"));
        if !(grant && signed && scoped) {
            return answer(400, &[], serde_json::json!({"error": "invalid_grant"}));
        }
        let mut s = state.lock().unwrap();
        s.issued += 1;
        let token = format!("tok-{}", s.issued);
        s.live.push(token.clone());
        return answer(
            200,
            &[],
            serde_json::json!({"access_token": token, "expires_in": s.expires_in, "token_type": "Bearer"}),
        );
    }
    if path != "/v1/projects/parley-test/messages:send" {
        return answer(404, &[], serde_json::json!({}));
    }
    let mut s = state.lock().unwrap();
    let token = auth.strip_prefix("Bearer ").unwrap_or_default().to_owned();
    if s.revoke_next {
        s.revoke_next = false;
        s.live.retain(|t| *t != token);
    }
    if !s.live.contains(&token) {
        return answer(
            401,
            &[],
            serde_json::json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}}),
        );
    }
    let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    match msg["message"]["token"].as_str().unwrap_or_default() {
        "gone" => answer(404, &[], fcm_error(404, "UNREGISTERED")),
        "busy" => answer(
            429,
            &[("retry-after", "3")],
            fcm_error(429, "QUOTA_EXCEEDED"),
        ),
        "down" => answer(503, &[], fcm_error(503, "UNAVAILABLE")),
        _ => {
            s.sent.push(msg);
            let name = format!("projects/parley-test/messages/{}", s.sent.len());
            answer(200, &[], serde_json::json!({"name": name}))
        }
    }
}

/// A service account with a fresh RSA key; its public key (PKCS#1 DER).
fn service_account(token_port: u16) -> (push_courier::upstream::fcm::ServiceAccount, Vec<u8>) {
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let public = rsa.public_key_to_der_pkcs1().unwrap();
    let pem = openssl::pkey::PKey::from_rsa(rsa)
        .unwrap()
        .private_key_to_pem_pkcs8()
        .unwrap();
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "parley-test",
        "private_key_id": "k1",
        "private_key": String::from_utf8(pem).unwrap(),
        "client_email": "parley@example.iam.gserviceaccount.com",
        "token_uri": format!("https://localhost:{token_port}/token"),
    });
    let account =
        push_courier::upstream::fcm::ServiceAccount::from_json(json.to_string().as_bytes())
            .unwrap();
    (account, public)
}

async fn fcm(expires_in: i64) -> (FakeFcm, push_courier::upstream::fcm::FcmClient) {
    // The key must exist before the server that checks it; the port after.
    let rsa_port = parley_tests::tool::free_port();
    let (account, public) = service_account(rsa_port);
    let fake = FakeFcm::start(public, expires_in).await;
    let account = push_courier::upstream::fcm::ServiceAccount {
        token_uri: format!("https://localhost:{}/token", fake.addr.port()),
        ..account
    };
    let client =
        push_courier::upstream::fcm::FcmClient::new(push_courier::upstream::fcm::FcmConfig {
            account,
            api: fake.addr,
            api_name: "localhost".into(),
            token: fake.addr,
            token_name: "localhost".into(),
            roots: fake.roots.clone(),
        });
    (fake, client)
}

fn data_push(token: &str) -> push_courier::upstream::fcm::FcmPush {
    push_courier::upstream::fcm::FcmPush {
        token: token.into(),
        data: [(
            "parley".to_owned(),
            r#"{"type":"call","call_id":"c1"}"#.to_owned(),
        )]
        .into(),
        ttl: Duration::from_secs(30),
        collapse_key: Some("c1".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fcm_data_message_goes_out_high_priority_with_a_cached_access_token() {
    let (fake, client) = fcm(3600).await;
    for _ in 0..3 {
        assert!(matches!(
            client.send(&data_push("android-1")).await,
            Outcome::Accepted { ref id } if id.starts_with("projects/parley-test/messages/")
        ));
    }
    assert_eq!(fake.issued(), 1, "one access token for all three");
    let sent = fake.state.lock().unwrap().sent[0].clone();
    assert_eq!(sent["message"]["token"], "android-1");
    assert_eq!(sent["message"]["android"]["priority"], "HIGH");
    assert_eq!(sent["message"]["android"]["ttl"], "30s");
    assert_eq!(sent["message"]["android"]["collapse_key"], "c1");
    assert_eq!(
        sent["message"]["data"]["parley"],
        r#"{"type":"call","call_id":"c1"}"#
    );
    assert!(sent["message"]["notification"].is_null(), "data only");

    // FCM calls the token invalid: a new one, and the push goes.
    fake.state.lock().unwrap().revoke_next = true;
    assert!(matches!(
        client.send(&data_push("android-1")).await,
        Outcome::Accepted { .. }
    ));
    assert_eq!(fake.issued(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcm_errors_drop_dead_tokens_and_retry_the_rest() {
    // Tokens that live a minute are never reused (a minute's margin).
    let (fake, client) = fcm(60).await;
    assert!(matches!(
        client.send(&data_push("gone")).await,
        Outcome::Gone { ref reason, .. } if reason == "UNREGISTERED"
    ));
    assert_eq!(
        client.send(&data_push("busy")).await,
        Outcome::Retry {
            after: Duration::from_secs(3),
            reason: "QUOTA_EXCEEDED".into()
        }
    );
    assert!(matches!(
        client.send(&data_push("down")).await,
        Outcome::Retry { ref reason, .. } if reason == "UNAVAILABLE"
    ));
    assert_eq!(fake.issued(), 3, "a token about to expire is not reused");
}

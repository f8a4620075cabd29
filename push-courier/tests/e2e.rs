//! The courier end to end over real loopback sockets: devices on TLS and
//! QUIC, providers through curl (HTTP/2), pywebpush and npm `web-push`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use client_sdk::courier::{ClientEvent, DeviceClient, Transport};
use common::*;
use wire::push::{CloseReason, Notification, PushType};

const WAIT: Duration = Duration::from_secs(10);

async fn next_note(c: &mut DeviceClient) -> Notification {
    loop {
        match c.next_within(WAIT).await.unwrap() {
            ClientEvent::Notification(n) => return n,
            ClientEvent::Closed(r) => panic!("link closed: {r:?}"),
            _ => {}
        }
    }
}

/// Nothing arrives within `t`.
async fn quiet(c: &mut DeviceClient, t: Duration) {
    match c.next_within(t).await {
        Err(client_sdk::courier::ClientError::Timeout) => {}
        other => panic!("expected silence, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_push_over_http2_reaches_a_tls_device_and_status_says_delivered() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert_eq!(tokens.len(), 1);
    let token = tokens[0].1;
    // The token is stable across connections.
    drop(dev);
    let (mut dev, again) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert_eq!(again[0].1, token);

    let payload = br#"{"aps":{"alert":"hello"}}"#;
    let id = "0A1B2C3D-0000-4000-8000-00000000AA01";
    let r = env
        .apns(&token, &[("apns-id", id.to_owned())], payload)
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.version, "2", "curl spoke HTTP/2");
    assert_eq!(r.header("apns-id").as_deref(), Some(id));
    let n = next_note(&mut dev).await;
    assert_eq!(n.id.to_uuid(), id);
    assert_eq!(n.payload, payload);
    assert_eq!(n.topic, TOPIC);
    assert_eq!(n.push_type, PushType::Alert);
    dev.ack(&[n.id]).await.unwrap();

    // The delivery-status endpoint reports the ack (written in the background).
    assert_delivered(&env, id).await;
}

/// The delivery-status endpoint says `id` was delivered (within 5 s: acks
/// are written in the background).
async fn assert_delivered(env: &Env, id: &str) {
    let mut status = String::new();
    for _ in 0..100 {
        let r = env
            .curl(
                "GET",
                &format!("/3/status/{id}"),
                &[("authorization", format!("bearer {}", env.jwt()))],
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        status = r.body;
        if status.contains("delivered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status.contains("\"delivered\""), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_device_gets_a_push_while_it_commits_and_an_early_ack_sticks() {
    use sqlx::Connection;
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = tokens[0].1;
    // Another connection holds the database's write lock, so the courier's
    // commit waits (its busy timeout is 10 s).
    let db = env.dir.path().join("courier.db");
    let mut holder = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .unwrap();

    let id = "0A1B2C3D-0000-4000-8000-00000000EA01";
    let headers = [("apns-id", id.to_owned())];
    let push = env.apns(&token, &headers, b"{\"n\":1}");
    tokio::pin!(push);
    let n = tokio::select! {
        r = &mut push => panic!("answered before its commit: {r:?}"),
        n = next_note(&mut dev) => n,
    };
    assert_eq!(n.id.to_uuid(), id);
    // Acked before the message itself is durable.
    dev.ack(&[n.id]).await.unwrap();
    tokio::select! {
        r = &mut push => panic!("answered before its commit: {r:?}"),
        _ = tokio::time::sleep(Duration::from_millis(300)) => {}
    }
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let r = push.await;
    assert_eq!(r.status, 200, "{r:?}");

    // The ack committed after the message: delivered, and not sent again.
    assert_delivered(&env, id).await;
    drop(dev);
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    quiet(&mut dev, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apns_errors_match_apple_reasons() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (_dev, tokens) = env
        .connect(&creds, Transport::Tls, &[TOPIC, "com.example.other"])
        .await;
    let token = tokens[0].1;
    let body = br#"{"aps":{}}"#;

    // Malformed and unknown tokens.
    let r = env
        .curl(
            "POST",
            "/3/device/nothex",
            &[("authorization", format!("bearer {}", env.jwt()))],
            Some(body),
        )
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "BadDeviceToken"));
    let r = env.apns(&wire::push::DeviceToken([7; 32]), &[], body).await;
    assert_eq!((r.status, r.reason().as_str()), (400, "BadDeviceToken"));

    // Payload limits: 4096 bytes, 5120 for VoIP; empty.
    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(4100));
    let r = env.apns(&token, &[], big.as_bytes()).await;
    assert_eq!((r.status, r.reason().as_str()), (413, "PayloadTooLarge"));
    let r = env.apns(&token, &[], b"").await;
    assert_eq!((r.status, r.reason().as_str()), (400, "PayloadEmpty"));

    // Provider authentication.
    let path = format!("/3/device/{}", token.to_hex());
    let r = env
        .curl(
            "POST",
            &path,
            &[("apns-topic", TOPIC.to_owned())],
            Some(body),
        )
        .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (403, "MissingProviderToken")
    );
    let r = env
        .curl(
            "POST",
            &path,
            &[
                ("authorization", "bearer not.a.jwt".to_owned()),
                ("apns-topic", TOPIC.to_owned()),
            ],
            Some(body),
        )
        .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (403, "InvalidProviderToken")
    );
    let (other_key, _) = p256_keypair();
    let forged = push_courier::core::jwt::sign(
        &other_key,
        Some(KID),
        &serde_json::json!({"iss": TEAM, "iat": unix_now()}),
    )
    .unwrap();
    let r = env
        .curl(
            "POST",
            &path,
            &[
                ("authorization", format!("bearer {forged}")),
                ("apns-topic", TOPIC.to_owned()),
            ],
            Some(body),
        )
        .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (403, "InvalidProviderToken")
    );
    let r = env
        .curl(
            "POST",
            &path,
            &[
                (
                    "authorization",
                    format!("bearer {}", env.jwt_at(unix_now() - 3700)),
                ),
                ("apns-topic", TOPIC.to_owned()),
            ],
            Some(body),
        )
        .await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (403, "ExpiredProviderToken")
    );

    // Headers.
    let r = env
        .apns(&token, &[("apns-priority", "7".into())], body)
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "BadPriority"));
    let r = env
        .apns(&token, &[("apns-push-type", "carrier-pigeon".into())], body)
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "InvalidPushType"));
    let r = env.apns(&token, &[("apns-id", "42".into())], body).await;
    assert_eq!((r.status, r.reason().as_str()), (400, "BadMessageId"));
    let r = env
        .apns(&token, &[("apns-collapse-id", "c".repeat(65))], body)
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "BadCollapseId"));
    let r = env
        .curl(
            "POST",
            &path,
            &[("authorization", format!("bearer {}", env.jwt()))],
            Some(body),
        )
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "MissingTopic"));
    // A token belongs to one topic.
    let other = tokens[1].1;
    let r = env.apns(&other, &[], body).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (400, "DeviceTokenNotForTopic")
    );
    let r = env.curl("GET", &path, &[], None).await;
    assert_eq!((r.status, r.reason().as_str()), (405, "MethodNotAllowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_gets_410_unregistered_with_timestamp() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = tokens[0].1;
    let before = unix_now() * 1000;
    dev.revoke(token).await.unwrap();
    let mut r = env.apns(&token, &[], b"{}").await;
    for _ in 0..100 {
        if r.status == 410 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        r = env.apns(&token, &[], b"{}").await;
    }
    assert_eq!((r.status, r.reason().as_str()), (410, "Unregistered"));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let ts = v["timestamp"].as_i64().unwrap();
    assert!(
        ts >= before - 1000 && ts <= unix_now() * 1000 + 1000,
        "{ts}"
    );
    // A new Hello gives the topic a new token.
    drop(dev);
    let (_dev, again) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert_ne!(again[0].1, token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_queue_collapses_expires_and_puts_voip_first() {
    let env = Env::start(|_| {}).await;
    let (device, creds) = env.device();
    let voip_topic = "com.example.chat.voip";
    let (dev, tokens) = env
        .connect(&creds, Transport::Tls, &[TOPIC, voip_topic])
        .await;
    let (token, voip) = (tokens[0].1, tokens[1].1);
    drop(dev);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let soon = (unix_now() + 1).to_string();
    type Push<'a> = (&'a wire::push::DeviceToken, Vec<(&'a str, String)>, &'a str);
    let pushes: Vec<Push> = vec![
        (&token, vec![("apns-priority", "5".into())], r#"{"n":1}"#),
        (
            &token,
            vec![
                ("apns-collapse-id", "score".into()),
                ("apns-priority", "5".into()),
            ],
            r#"{"n":2}"#,
        ),
        (&token, vec![("apns-expiration", soon)], r#"{"n":3}"#),
        (&token, vec![("apns-expiration", "0".into())], r#"{"n":4}"#),
        (
            &token,
            vec![
                ("apns-collapse-id", "score".into()),
                ("apns-priority", "5".into()),
            ],
            r#"{"n":5}"#,
        ),
    ];
    for (t, h, b) in pushes {
        let r = env.apns(t, &h, b.as_bytes()).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    // A VoIP wake-up comes from signaling, for the device it names; a
    // provider may not push to a VoIP topic.
    let r = env
        .curl(
            "POST",
            &format!("/3/device/{}", voip.to_hex()),
            &[
                ("authorization", format!("bearer {}", env.jwt())),
                ("apns-topic", voip_topic.to_owned()),
                ("apns-push-type", "voip".into()),
                ("apns-priority", "5".into()),
            ],
            Some(br#"{"n":0}"#),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("TopicDisallowed"), "{r:?}");
    let courier = env.server.as_ref().unwrap().courier.clone();
    let wake = |for_device| push_courier::courier::PushRequest {
        id: push_courier::courier::Courier::new_id().unwrap(),
        token: voip,
        push_type: PushType::Voip,
        priority: 5,
        expires: 0,
        now_or_never: false,
        collapse_id: String::new(),
        topic: Some(voip_topic.to_owned()),
        payload: br#"{"n":6}"#.to_vec(),
        provider: "signaling".into(),
        vapid_key: None,
        receipt: None,
        for_device,
        operator_granted: false,
    };
    // Named for another device, the token is nobody's.
    let other = wire::DeviceId::random();
    assert_eq!(
        courier.push(wake(Some(other))).await,
        Err(push_courier::courier::PushError::UnknownToken)
    );
    assert_eq!(
        courier.push(wake(Some(device))).await,
        Ok(push_courier::courier::PushOutcome::Stored)
    );
    // Let n=3 expire.
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let (mut dev, _) = env
        .connect(&creds, Transport::Tls, &[TOPIC, voip_topic])
        .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let n = next_note(&mut dev).await;
        got.push(String::from_utf8(n.payload.clone()).unwrap());
        dev.ack(&[n.id]).await.unwrap();
    }
    // VoIP first; n=2 replaced by n=5; n=3 expired; n=4 was now-or-never.
    assert_eq!(got, vec![r#"{"n":6}"#, r#"{"n":1}"#, r#"{"n":5}"#]);
    quiet(&mut dev, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_cap_drops_the_oldest_and_reports_it() {
    let env = Env::start(|c| c.queue_cap = 3).await;
    let (_, creds) = env.device();
    let (dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = tokens[0].1;
    drop(dev);
    let ids: Vec<String> = (1..=4)
        .map(|i| format!("00000000-0000-4000-8000-00000000000{i}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let r = env
            .apns(
                &token,
                &[("apns-id", id.clone())],
                format!("{{\"n\":{i}}}").as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let r = env
        .curl(
            "GET",
            &format!("/3/status/{}", ids[0]),
            &[("authorization", format!("bearer {}", env.jwt()))],
            None,
        )
        .await;
    assert!(r.body.contains("\"dropped\""), "{r:?}");
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_note(&mut dev).await.id.to_uuid());
    }
    assert_eq!(got, ids[1..].to_vec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_closes_the_first_with_a_reason() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut first, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let (mut second, _) = env.connect(&creds, Transport::Quic, &[TOPIC]).await;
    match first.next_within(WAIT).await.unwrap() {
        ClientEvent::Closed(Some((CloseReason::Replaced, _))) => {}
        other => panic!("expected Replaced, got {other:?}"),
    }
    // The new one gets the pushes.
    let r = env.apns(&tokens[0].1, &[], b"{\"to\":\"second\"}").await;
    assert_eq!(r.status, 200);
    assert_eq!(next_note(&mut second).await.payload, b"{\"to\":\"second\"}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_come_back_after_reconnect_and_the_device_sees_them_once() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = tokens[0].1;
    let r = env.apns(&token, &[], b"{\"n\":1}").await;
    assert_eq!(r.status, 200);
    let n = next_note(&mut dev).await;
    // No ack: the link drops.
    dev.abort();
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let again = next_note(&mut dev).await;
    assert_eq!(again.id, n.id, "redelivered after reconnect");
    dev.ack(&[again.id]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(dev);
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    quiet(&mut dev, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_device_keeps_its_link_across_a_network_change() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Quic, &[TOPIC]).await;
    let token = tokens[0].1;
    let r = env.apns(&token, &[], b"{\"n\":1}").await;
    assert_eq!(r.status, 200);
    let n = next_note(&mut dev).await;
    dev.ack(&[n.id]).await.unwrap();

    // Move to a new local address (a new UDP socket on another loopback IP).
    let before = dev.quic_local_addr().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    dev.rebind(socket).unwrap();
    assert_ne!(dev.quic_local_addr().unwrap(), before);
    let r = env.apns(&token, &[], b"{\"n\":2}").await;
    assert_eq!(r.status, 200);
    let n = next_note(&mut dev).await;
    assert_eq!(n.payload, b"{\"n\":2}");
    assert_eq!(
        env.server()
            .courier
            .metrics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "no reconnect happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_without_a_device_certificate_are_refused() {
    let env = Env::start(|_| {}).await;
    // A certificate from another CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let p = rcgen::CertificateParams::new(vec!["device".into()]).unwrap();
    let cert = p.self_signed(&key).unwrap();
    let creds = env.creds_for(vec![cert.der().clone()], key.serialize_der());
    let r = DeviceClient::connect(
        env.server().device_addr(),
        Transport::Tls,
        &creds,
        &[TOPIC],
        0,
    )
    .await;
    assert!(r.is_err(), "foreign certificate accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_rate_limit_answers_429() {
    let env = Env::start(|c| c.provider_rate = 2).await;
    let (_, creds) = env.device();
    let (_dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        let r = env.apns(&tokens[0].1, &[], b"{}").await;
        codes.push((r.status, r.reason()));
    }
    assert!(
        codes
            .iter()
            .any(|(s, r)| *s == 429 && r == "TooManyRequests"),
        "{codes:?}"
    );
}

/// What a Web Push test needs: a subscribed device and a VAPID key.
struct WebPushSetup {
    dev: DeviceClient,
    creds: client_sdk::courier::DeviceCredentials,
    keys: wire::webpush::SubscriptionKeys,
    endpoint: String,
    vapid_pkcs8: Vec<u8>,
    vapid_pub: Vec<u8>,
}

async fn web_push_setup(env: &Env, restrict: bool) -> WebPushSetup {
    let (_, creds) = env.device();
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[]).await;
    let (vapid_pkcs8, vapid_pub) = p256_keypair();
    let key = restrict.then(|| vapid_pub.clone().try_into().unwrap());
    let req = dev.subscribe("https://app.example", key).await.unwrap();
    let endpoint = match dev.next_within(WAIT).await.unwrap() {
        ClientEvent::Subscription {
            request, endpoint, ..
        } => {
            assert_eq!(request, req);
            endpoint
        }
        other => panic!("{other:?}"),
    };
    WebPushSetup {
        dev,
        creds,
        keys: wire::webpush::SubscriptionKeys::generate().unwrap(),
        endpoint,
        vapid_pkcs8,
        vapid_pub,
    }
}

fn vapid_header(env: &Env, pkcs8: &[u8], public: &[u8], aud_port: u16, exp: i64) -> String {
    let _ = env;
    let t = push_courier::core::jwt::sign(
        pkcs8,
        None,
        &serde_json::json!({
            "aud": format!("https://localhost:{aud_port}"),
            "exp": exp,
            "sub": "mailto:ops@example.com",
        }),
    )
    .unwrap();
    format!("vapid t={t}, k={}", b64(public))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pywebpush_sends_to_a_subscription_and_the_device_decrypts_it() {
    let env = Env::start(|_| {}).await;
    let mut s = web_push_setup(&env, true).await;
    assert!(s
        .endpoint
        .starts_with(&format!("https://localhost:{}/wp/", env.provider_port())));
    let pem_path = env.dir.path().join("vapid.pem");
    std::fs::write(&pem_path, pem("PRIVATE KEY", &s.vapid_pkcs8)).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/pywebpush_send.py"
    );
    let args = vec![
        script.to_owned(),
        s.endpoint.clone(),
        b64(&s.keys.public()),
        b64(&s.keys.auth),
        pem_path.display().to_string(),
        "hello from pywebpush".to_owned(),
    ];
    let ca = env.ca_pem.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        parley_tests::tool::run_with(
            None,
            &[("REQUESTS_CA_BUNDLE", &ca)],
            "python3",
            &args,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let mut lines = out.text.lines();
    assert_eq!(lines.next(), Some("201"), "{}", out.text);
    assert!(
        lines.next().unwrap_or("").contains("/wp/m/"),
        "{}",
        out.text
    );
    let n = next_note(&mut s.dev).await;
    assert_eq!(n.push_type, PushType::WebPush);
    assert_eq!(
        s.keys.decrypt(&n.payload).unwrap(),
        b"hello from pywebpush",
        "body passed through untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn npm_web_push_sends_to_a_subscription_and_the_device_decrypts_it() {
    let env = Env::start(|_| {}).await;
    let mut s = web_push_setup(&env, false).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/web-push")
            .is_dir(),
        "npm web-push is not installed; run scripts/install-deps.sh"
    );
    let args = vec![
        "webpush_send.js".to_owned(),
        s.endpoint.clone(),
        b64(&s.keys.public()),
        b64(&s.keys.auth),
        b64(&s.vapid_pub),
        b64(&p256_scalar(&s.vapid_pkcs8)),
        "hello from web-push".to_owned(),
    ];
    let ca = env.ca_pem.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        parley_tests::tool::run_with(
            Some(std::path::Path::new(dir)),
            &[("NODE_EXTRA_CA_CERTS", &ca)],
            "node",
            &args,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    let mut lines = out.text.lines();
    assert_eq!(lines.next(), Some("201"), "{}", out.text);
    let n = next_note(&mut s.dev).await;
    assert_eq!(s.keys.decrypt(&n.payload).unwrap(), b"hello from web-push");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_push_protocol_rules() {
    let env = Env::start(|_| {}).await;
    let s = web_push_setup(&env, true).await;
    let path = s.endpoint.split_once("localhost").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    let port = env.provider_port();
    let good = vapid_header(&env, &s.vapid_pkcs8, &s.vapid_pub, port, unix_now() + 600);
    let body =
        wire::webpush::encrypt(&s.keys.public(), &s.keys.auth, b"topic one", [3u8; 48]).unwrap();
    let h = |auth: &str, extra: &[(&'static str, &'static str)]| {
        let mut v = vec![
            ("authorization", auth.to_owned()),
            ("content-encoding", "aes128gcm".to_owned()),
        ];
        v.extend(extra.iter().map(|(k, x)| (*k, (*x).to_owned())));
        v
    };

    // VAPID: 401 without, 403 for a bad signature, wrong aud, expired, or
    // a key other than the one the subscription is restricted to.
    let r = env
        .curl("POST", path, &[("ttl", "60".into())], Some(&body))
        .await;
    assert_eq!(r.status, 401, "{r:?}");
    let (other_pkcs8, other_pub) = p256_keypair();
    let forged = {
        let t = vapid_header(&env, &other_pkcs8, &other_pub, port, unix_now() + 600);
        let (tok, _) = t.split_once(", k=").unwrap();
        format!("{tok}, k={}", b64(&s.vapid_pub))
    };
    for bad in [
        forged,
        vapid_header(&env, &s.vapid_pkcs8, &s.vapid_pub, 1, unix_now() + 600),
        vapid_header(&env, &s.vapid_pkcs8, &s.vapid_pub, port, unix_now() - 10),
        vapid_header(&env, &other_pkcs8, &other_pub, port, unix_now() + 600),
    ] {
        let r = env
            .curl("POST", path, &h(&bad, &[("ttl", "60")]), Some(&body))
            .await;
        assert_eq!(r.status, 403, "{bad}: {r:?}");
    }
    // TTL is required; Urgency and Topic are checked.
    let r = env.curl("POST", path, &h(&good, &[]), Some(&body)).await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = env
        .curl(
            "POST",
            path,
            &h(&good, &[("ttl", "60"), ("urgency", "asap")]),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = env
        .curl(
            "POST",
            path,
            &h(&good, &[("ttl", "60"), ("topic", "not valid!")]),
            Some(&body),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let r = env
        .curl(
            "POST",
            path,
            &h(&good, &[("ttl", "60")]),
            Some(&vec![0u8; 4097]),
        )
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    let r = env
        .curl("POST", "/wp/AAAA", &h(&good, &[("ttl", "60")]), Some(&body))
        .await;
    assert_eq!(r.status, 404, "{r:?}");

    // Topic replacement while the device is away, then a receipt.
    let receipt = env
        .curl(
            "POST",
            "/wp/receipts",
            &[("authorization", good.clone())],
            None,
        )
        .await;
    assert_eq!(receipt.status, 201, "{receipt:?}");
    let receipt_url = receipt.header("location").unwrap();
    let receipt_path = &receipt_url[receipt_url.find("/wp/r/").unwrap()..];
    let WebPushSetup {
        dev, creds, keys, ..
    } = s;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for text in [b"topic one" as &[u8], b"topic two"] {
        let body = wire::webpush::encrypt(&keys.public(), &keys.auth, text, [5u8; 48]).unwrap();
        let mut hh = h(
            &good,
            &[
                ("ttl", "600"),
                ("topic", "news"),
                ("urgency", "high"),
                ("prefer", "respond-async"),
            ],
        );
        hh.push(("push-receipt", receipt_url.clone()));
        let r = env.curl("POST", path, &hh, Some(&body)).await;
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.header("ttl").as_deref(), Some("600"));
        assert!(r.header("location").unwrap().contains("/wp/m/"));
    }
    // The device comes back: only the newer message is waiting.
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[]).await;
    let n = next_note(&mut dev).await;
    assert_eq!(keys.decrypt(&n.payload).unwrap(), b"topic two");
    assert_eq!(n.priority, 10, "urgency high");
    dev.ack(&[n.id]).await.unwrap();
    quiet(&mut dev, Duration::from_millis(300)).await;
    // Receipts: one replaced, one delivered.
    let mut seen = String::new();
    for _ in 0..3 {
        let r = env
            .curl(
                "GET",
                receipt_path,
                &[("authorization", good.clone())],
                None,
            )
            .await;
        assert!(r.status == 200 || r.status == 204, "{r:?}");
        seen.push_str(&r.body);
        if seen.contains("delivered") && seen.contains("replaced") {
            break;
        }
    }
    assert!(
        seen.contains("\"delivered\"") && seen.contains("\"replaced\""),
        "{seen}"
    );
    // Receipt subscriptions cost a row each and a VAPID key costs nothing
    // to make: one address makes at most 10 a minute.
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let r = env
            .curl(
                "POST",
                "/wp/receipts",
                &[("authorization", good.clone())],
                None,
            )
            .await;
        statuses.push(r.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        9,
        "{statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_apn_library_pointed_at_the_courier_works() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop");
    assert!(
        std::path::Path::new(dir)
            .join("node_modules/@parse/node-apn")
            .is_dir(),
        "npm @parse/node-apn is not installed; run scripts/install-deps.sh"
    );
    let p8 = env.dir.path().join("AuthKey.p8");
    std::fs::write(&p8, pem("PRIVATE KEY", &env.provider_key)).unwrap();
    let args = vec![
        "apn_send.js".to_owned(),
        env.provider_port().to_string(),
        env.ca_pem.display().to_string(),
        p8.display().to_string(),
        KID.to_owned(),
        TEAM.to_owned(),
        TOPIC.to_owned(),
        tokens[0].1.to_hex(),
        "hello from node-apn".to_owned(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        parley_tests::tool::run_in(
            Some(std::path::Path::new(dir)),
            "node",
            &args,
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert!(out.text.contains("sent 1 failed 1"), "{}", out.text);
    assert!(out.text.contains("400 BadDeviceToken"), "{}", out.text);
    let n = next_note(&mut dev).await;
    let v: serde_json::Value = serde_json::from_slice(&n.payload).unwrap();
    assert_eq!(v["aps"]["alert"], "hello from node-apn");
    assert_eq!(n.collapse_id, "greeting");
    assert_eq!(n.priority, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_may_authenticate_with_a_client_certificate() {
    let env = Env::start(|_| {}).await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let path = format!("/3/device/{}", tokens[0].1.to_hex());
    let tls = env.cert_args("certco");
    // No token, no apns-topic: the certificate names the provider and its
    // one topic.
    let r = env
        .curl_with(&tls, "POST", &path, &[], Some(b"{\"via\":\"cert\"}"))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(next_note(&mut dev).await.payload, b"{\"via\":\"cert\"}");
    // A certificate for a provider that is not registered proves nothing.
    let tls = env.cert_args("stranger");
    let r = env.curl_with(&tls, "POST", &path, &[], Some(b"{}")).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (403, "MissingProviderToken")
    );
    // The certificate provider may push only to its topic.
    let tls = env.cert_args("certco");
    let r = env
        .curl_with(
            &tls,
            "POST",
            &path,
            &[("apns-topic", "com.example.other".to_owned())],
            Some(b"{}"),
        )
        .await;
    assert_eq!((r.status, r.reason().as_str()), (400, "TopicDisallowed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_pushes_are_stored_collapsed_and_survive_a_restart() {
    let mut env = Env::start_postgres("courier-e2e", |_| {}).await;
    let (_, creds) = env.device();
    let (dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = tokens[0].1;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for (i, collapse) in ["a", "b", "b", ""].iter().enumerate() {
        let mut h = vec![("apns-priority", "5".to_owned())];
        if !collapse.is_empty() {
            h.push(("apns-collapse-id", (*collapse).to_owned()));
        }
        let r = env
            .apns(&token, &h, format!("{{\"n\":{i}}}").as_bytes())
            .await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    env.restart().await;
    let (mut dev, again) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert_eq!(again[0].1, token);
    let mut got = Vec::new();
    for _ in 0..3 {
        let n = next_note(&mut dev).await;
        got.push(String::from_utf8(n.payload.clone()).unwrap());
        dev.ack(&[n.id]).await.unwrap();
    }
    assert_eq!(got, vec![r#"{"n":0}"#, r#"{"n":2}"#, r#"{"n":3}"#]);
    quiet(&mut dev, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_ack_is_disconnected_and_loses_nothing() {
    let env = Env::start(|c| {
        c.session.max_inflight = 2;
        c.session.max_waiting = 2;
    })
    .await;
    let (_, creds) = env.device();
    let (mut dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    for i in 0..5 {
        let r = env
            .apns(&tokens[0].1, &[], format!("{{\"n\":{i}}}").as_bytes())
            .await;
        assert_eq!(r.status, 200);
    }
    // It reads but never acks: two in flight, two waiting, then closed.
    let mut reason = None;
    for _ in 0..10 {
        if let ClientEvent::Closed(r) = dev.next_within(WAIT).await.unwrap() {
            reason = r;
            break;
        }
    }
    assert!(
        matches!(reason, Some((CloseReason::SlowReader, _))),
        "{reason:?}"
    );
    // Everything is still stored for its next connection.
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        let n = next_note(&mut dev).await;
        got.push(String::from_utf8(n.payload.clone()).unwrap());
        dev.ack(&[n.id]).await.unwrap();
    }
    got.sort();
    assert_eq!(
        got,
        (0..5).map(|i| format!("{{\"n\":{i}}}")).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let env = Env::start(|c| c.handshake_timeout = Duration::from_millis(500)).await;
    let mut tcp = tokio::net::TcpStream::connect(env.server().device_addr())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("the courier closes a silent connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a word");
    assert!(started.elapsed() >= Duration::from_millis(400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_in_progress_are_bounded() {
    let env = Env::start(|c| {
        c.max_handshakes = 1;
        c.handshake_timeout = Duration::from_millis(700);
    })
    .await;
    let (_, creds) = env.device();
    // A silent connection holds the only handshake slot…
    let _silent = tokio::net::TcpStream::connect(env.server().device_addr())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // …so a device arriving now is turned away,
    let r = DeviceClient::connect(
        env.server().device_addr(),
        Transport::Tls,
        &creds,
        &[TOPIC],
        0,
    )
    .await;
    assert!(r.is_err(), "accepted beyond max_handshakes");
    // and gets in once the slot is free again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    env.connect(&creds, Transport::Tls, &[TOPIC]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_certificate_is_closed_and_refused() {
    let env = Env::start(|_| {}).await;
    let (_, creds, serial) = env.device_with_serial();
    let (_, other) = env.device();
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let (mut bystander, _) = env.connect(&other, Transport::Quic, &[TOPIC]).await;
    let revoked = push_courier::device::crl_serials(&env.crl(&[&serial])).unwrap();
    assert_eq!(revoked.len(), 1);
    env.server().courier.revoke_serials(revoked);
    match dev.next_within(WAIT).await.unwrap() {
        ClientEvent::Closed(Some((CloseReason::Revoked, _))) => {}
        other => panic!("expected Revoked, got {other:?}"),
    }
    match DeviceClient::connect(
        env.server().device_addr(),
        Transport::Tls,
        &creds,
        &[TOPIC],
        0,
    )
    .await
    {
        Err(client_sdk::courier::ClientError::Closed(CloseReason::Revoked, _)) => {}
        other => panic!("revoked device got in: {other:?}"),
    }
    quiet(&mut bystander, Duration::from_millis(200)).await;
}

/// A body that never ends holds its stream only until the body deadline
/// (a stranger's is thrown away as it comes, never buffered), and one
/// source holds a bounded share of the provider connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_bounded_and_connections_are_capped() {
    let env = Env::start(|c| {
        c.max_provider_connections_per_source = 2;
        c.provider_body_timeout = Duration::from_millis(300);
    })
    .await;
    let mut h2 = env.provider_http2().await.unwrap();
    let path = format!("/3/device/{}", "ab".repeat(32));
    // Headers, 1 KiB of a 60 KiB body, and nothing more: the answer comes
    // at the deadline (the old handler waited for the body forever).
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        h2.request_unfinished(
            "POST",
            &path,
            &[("content-length", "61440"), ("apns-topic", TOPIC)],
            vec![b'x'; 1024],
        ),
    )
    .await
    .expect("answered at the body deadline")
    .unwrap();
    assert_eq!(status, 403);
    // A provider's stalled body gets IdleTimeout, as APNs says it.
    let jwt = format!("bearer {}", env.jwt());
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        h2.request_unfinished(
            "POST",
            &path,
            &[
                ("content-length", "61440"),
                ("apns-topic", TOPIC),
                ("authorization", &jwt),
            ],
            vec![b'x'; 1024],
        ),
    )
    .await
    .expect("answered at the body deadline")
    .unwrap();
    assert_eq!(status, 400);
    // A request refused on its headers alone (here its apns-id) is also
    // answered only once its body ended or the deadline passed: an answer
    // while the client is still sending resets the stream, and curl then
    // reports a failure instead of BadMessageId.
    let asked = std::time::Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        h2.request_unfinished(
            "POST",
            &path,
            &[
                ("content-length", "61440"),
                ("apns-topic", TOPIC),
                ("apns-id", "42"),
                ("authorization", &jwt),
            ],
            vec![b'x'; 1024],
        ),
    )
    .await
    .expect("answered at the body deadline")
    .unwrap();
    assert_eq!(status, 400);
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "answered after {:?}, while the body was still coming",
        asked.elapsed()
    );
    // A Web Push body that stalls is answered at the same deadline.
    let status = tokio::time::timeout(
        Duration::from_secs(5),
        h2.request_unfinished(
            "POST",
            "/wp/AAAA",
            &[("content-length", "4096"), ("ttl", "60")],
            vec![b'x'; 1024],
        ),
    )
    .await
    .expect("answered at the body deadline")
    .unwrap();
    assert_eq!(status, 408);
    // Two connections from this address are open; a third gets none.
    let _second = env.provider_http2().await.unwrap();
    let third = tokio::time::timeout(Duration::from_secs(5), env.provider_http2()).await;
    assert!(
        !matches!(third, Ok(Ok(_))),
        "a third connection from one source was served"
    );
    // Giving one back lets the next in.
    drop(h2);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if env.provider_http2().await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slot not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connections that never finish their TLS handshake hold at most their
/// source's share of the handshake slots, and only until the handshake
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_from_one_source_are_capped() {
    let env = Env::start(|c| {
        c.max_handshakes_per_source = 2;
        c.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let (_, creds) = env.device();
    let addr = env.server().device_addr();
    let idle = idle_connections(addr, 2).await;
    // Both of this address's handshake slots are held: a device from the
    // same address is dropped at once.
    let refused = DeviceClient::connect(addr, Transport::Tls, &creds, &[TOPIC], 0).await;
    assert!(refused.is_err(), "served past the source's handshake cap");
    // After the handshake timeout the idle ones are gone.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    assert_eq!(tokens.len(), 1);
    drop(idle);
}

/// `n` TCP connections that never start TLS.
async fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // The listener accepts in order: these take their slots before any
    // connection made after them.
    out
}

/// Every request that reaches the provider listener gets an answer in
/// Apple's form, bodies included: an unknown path is `404 BadPath`, a
/// wrong method `405 MethodNotAllowed` (curl, HTTP/2, with a body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_and_methods_get_apples_answers() {
    let env = Env::start(|_| {}).await;
    for path in ["/3/nothing/here", "/", "/3/device", "/wp"] {
        let r = env.curl("POST", path, &[], Some(b"{}")).await;
        assert_eq!(
            (r.status, r.reason().as_str()),
            (404, "BadPath"),
            "{path}: {r:?}"
        );
        assert!(r.header("apns-id").is_some(), "{r:?}");
    }
    let r = env.curl("POST", "/3/status/abc", &[], Some(b"{}")).await;
    assert_eq!(
        (r.status, r.reason().as_str()),
        (405, "MethodNotAllowed"),
        "{r:?}"
    );
}

/// Two couriers on one PostgreSQL database.
async fn two_couriers(
    name: &'static str,
) -> (
    parley_tests::postgres::Postgres,
    std::sync::Arc<push_courier::courier::Courier>,
    std::sync::Arc<push_courier::courier::Courier>,
) {
    use push_courier::courier::Courier;
    use push_courier::store::Store;
    let pg = tokio::task::spawn_blocking(move || parley_tests::postgres::Postgres::start(name))
        .await
        .unwrap();
    let config = push_courier::Config {
        database_url: pg.url(),
        // Every push stays queued, for counting.
        queue_cap: 1000,
        ..push_courier::Config::default()
    };
    let a = Courier::open(config.clone(), Store::open(&pg.url()).await.unwrap())
        .await
        .unwrap();
    let b = Courier::open(config, Store::open(&pg.url()).await.unwrap())
        .await
        .unwrap();
    (pg, a, b)
}

/// A provider's push of `n` to `token`.
fn push_of(token: wire::push::DeviceToken, n: usize) -> push_courier::courier::PushRequest {
    push_courier::courier::PushRequest {
        id: push_courier::courier::Courier::new_id().unwrap(),
        token,
        push_type: PushType::Alert,
        priority: 5,
        expires: 0,
        now_or_never: false,
        collapse_id: String::new(),
        topic: None,
        payload: format!("{{\"n\":{n}}}").into_bytes(),
        provider: "test".into(),
        vapid_key: None,
        receipt: None,
        for_device: None,
        operator_granted: false,
    }
}

/// Two couriers on one PostgreSQL database take pushes at the same time:
/// each hands out message numbers from blocks the database reserved for
/// it, so no push collides with another's row (numbers used to start at
/// each node's `max(seq)`, so both handed out the same ones and whole
/// batches failed). Every push is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_couriers_on_one_database_number_their_messages_apart() {
    use push_courier::courier::PushOutcome;
    let (pg, a, b) = two_couriers("courier-seq").await;
    let device = wire::DeviceId::random();
    let token = a.tokens_for(device, &[TOPIC.to_string()]).await.unwrap()[0].1;
    const EACH: usize = 300;
    let mut tasks = Vec::new();
    for i in 0..EACH {
        let (a, b) = (a.clone(), b.clone());
        tasks.push(tokio::spawn(async move { a.push(push_of(token, i)).await }));
        tasks.push(tokio::spawn(async move {
            b.push(push_of(token, EACH + i)).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(PushOutcome::Stored));
    }
    let store = push_courier::store::Store::open(&pg.url()).await.unwrap();
    let queued = store.queued_index().await.unwrap();
    assert_eq!(queued.len(), 2 * EACH, "every push stored once");
    let mut seqs: Vec<i64> = queued.iter().map(|m| m.seq).collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 2 * EACH);
}

/// A token made by one courier works at another on the same database,
/// the device gets the same token from either, and a revocation at one is
/// refused at the other once it catches up (every second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_revocations_reach_every_courier_on_the_database() {
    use push_courier::courier::{PushError, PushOutcome};
    let (_pg, a, b) = two_couriers("courier-tokens").await;
    let device = wire::DeviceId::random();
    let token = a.tokens_for(device, &[TOPIC.to_string()]).await.unwrap()[0].1;
    assert_eq!(b.push(push_of(token, 1)).await, Ok(PushOutcome::Stored));
    let again = b.tokens_for(device, &[TOPIC.to_string()]).await.unwrap()[0].1;
    assert_eq!(again, token, "the same token from the other courier");
    assert!(a.revoke(device, token).await.unwrap());
    assert_eq!(b.catch_up_revocations().await.unwrap(), 1);
    assert!(matches!(
        b.push(push_of(token, 2)).await,
        Err(PushError::Unregistered { .. })
    ));
    // Caught up once only.
    assert_eq!(b.catch_up_revocations().await.unwrap(), 0);
    // A token nobody made stays unknown, and is looked up once however
    // often it is pushed to.
    let reads = || {
        b.metrics
            .token_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = reads();
    for n in 0..20 {
        assert_eq!(
            b.push(push_of(wire::push::DeviceToken([7; 32]), n)).await,
            Err(PushError::UnknownToken)
        );
    }
    assert_eq!(reads() - before, 1);
}

/// A courier that goes silent without closing anything (its machine
/// died; over QUIC nothing says so): a device that pings on no schedule of
/// its own ends the link after two and a half of the courier's ping
/// intervals, so it can reconnect elsewhere, and not while the courier
/// still pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_leaves_a_courier_that_went_silent() {
    let env = Env::start(|c| c.session.ping_interval = Duration::from_secs(1)).await;
    let (_, creds) = env.device();
    // A UDP relay between the device and the courier that can go dark.
    let server = env.server().quic_addr().unwrap();
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let dark = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relaying = {
        let dark = dark.clone();
        tokio::spawn(async move {
            let upstream = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            upstream.connect(server).await.unwrap();
            let mut device = None;
            let (mut a, mut b) = ([0u8; 2048], [0u8; 2048]);
            loop {
                tokio::select! {
                    Ok((n, from)) = relay.recv_from(&mut a) => {
                        device = Some(from);
                        if !dark.load(std::sync::atomic::Ordering::Relaxed) {
                            let _ = upstream.send(&a[..n]).await;
                        }
                    }
                    Ok(n) = upstream.recv(&mut b) => {
                        if let (Some(d), false) = (device, dark.load(std::sync::atomic::Ordering::Relaxed)) {
                            let _ = relay.send_to(&b[..n], d).await;
                        }
                    }
                }
            }
        })
    };
    let (mut dev, _) = DeviceClient::connect(relay_addr, Transport::Quic, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    // The courier pings every second and the device answers: the link
    // holds.
    quiet(&mut dev, Duration::from_secs(4)).await;
    dark.store(true, std::sync::atomic::Ordering::Relaxed);
    let went_dark = std::time::Instant::now();
    match dev.next_within(Duration::from_secs(10)).await {
        Ok(ClientEvent::Closed(None)) => {}
        other => panic!("expected the link to end, got {other:?}"),
    }
    let after = went_dark.elapsed();
    assert!(
        after >= Duration::from_secs(1) && after <= Duration::from_secs(8),
        "ended {after:?} after the courier went silent"
    );
    relaying.abort();
}

/// A device's platform tokens over its link: kept, replaced when the
/// platform rotates them, withdrawn; another device's token, a malformed
/// one and one for a platform without credentials are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_tokens_belong_to_the_device_that_registered_them_first() {
    platform_token_rules(Env::start(with_apns).await).await;
}

/// The same on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_tokens_belong_to_the_first_device_on_postgres_too() {
    platform_token_rules(Env::start_postgres("courier-platform-tokens", with_apns).await).await;
}

/// APNs production credentials, never used: nothing is pushed.
fn with_apns(c: &mut push_courier::Config) {
    c.platforms.apns = Some(Arc::new(push_courier::upstream::ApnsClient::new(
        push_courier::upstream::ApnsConfig {
            addr: "127.0.0.1:9".parse().unwrap(),
            server_name: "localhost".into(),
            roots: rustls::RootCertStore::empty(),
            key_pkcs8: Vec::new(),
            key_id: "KEY1234567".into(),
            team_id: "TEAM123456".into(),
        },
    )));
}

async fn platform_token_rules(env: Env) {
    use wire::push::{Platform, PlatformStatus, PlatformToken};
    let pushkit = |token: &str| PlatformToken {
        platform: Platform::Apns,
        calls: true,
        others: false,
        sandbox: false,
        topic: "com.example.app".into(),
        token: token.into(),
        seal_to: None,
    };
    let (a, a_creds) = env.device();
    let (mut phone, _) = env.connect(&a_creds, Transport::Tls, &[TOPIC]).await;
    let first = "aa".repeat(32);
    assert_eq!(
        platform_answer(&mut phone, pushkit(&first)).await,
        PlatformStatus::Ok
    );
    let store = &env.server().courier.store;
    assert_eq!(
        store.platform_tokens_of(a).await.unwrap(),
        vec![pushkit(&first)]
    );
    // Rotated by the platform: the new one replaces the old.
    let second = "bb".repeat(32);
    assert_eq!(
        platform_answer(&mut phone, pushkit(&second)).await,
        PlatformStatus::Ok
    );
    assert_eq!(
        store.platform_tokens_of(a).await.unwrap(),
        vec![pushkit(&second)]
    );

    // Another device naming it is refused; the token stays the first's.
    let (_, b_creds) = env.device();
    let (mut stranger, _) = env.connect(&b_creds, Transport::Tls, &[TOPIC]).await;
    assert_eq!(
        platform_answer(&mut stranger, pushkit(&second)).await,
        PlatformStatus::Taken
    );
    assert_eq!(
        platform_answer(&mut stranger, pushkit("not hex")).await,
        PlatformStatus::Invalid
    );
    let fcm = PlatformToken {
        platform: Platform::Fcm,
        others: true,
        topic: "project".into(),
        token: "fcm-token".into(),
        ..pushkit("")
    };
    assert_eq!(
        platform_answer(&mut stranger, fcm).await,
        PlatformStatus::Unsupported
    );
    let mut sandbox = pushkit(&"cc".repeat(32));
    sandbox.sandbox = true;
    assert_eq!(
        platform_answer(&mut stranger, sandbox).await,
        PlatformStatus::Unsupported
    );

    // Withdrawn (the app signed out): then another device may have it.
    assert_eq!(
        platform_answer(&mut phone, pushkit("")).await,
        PlatformStatus::Ok
    );
    assert!(store.platform_tokens_of(a).await.unwrap().is_empty());
    assert_eq!(
        platform_answer(&mut stranger, pushkit(&second)).await,
        PlatformStatus::Ok
    );
}

//! The APNs upstream client against a local stand-in: a second Parley
//! courier speaks Apple's provider API, so the client's pushes reach a
//! device connected to it with every APNs header, and its refusals (410
//! with a timestamp, 400 BadDeviceToken, 429) come back as APNs gives them.
//! Then a courier's owed wake-ups through it: retried past 429, dead
//! tokens dropped. And the FCM client against a local FCM stand-in.

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
        high: true,
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
    let sent = fake.sent()[0].clone();
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
    fake.revoke_next();
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

// ------------------------------------------------------- owed wake-ups

/// Waits (bounded) until `parley_upstream_wakes_total{…outcome}` is
/// `want`: Apple's answer is counted just after the phone has the push.
async fn wakes_reach(env: &Env, outcome: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while wakes(env, outcome) < want {
        assert!(
            std::time::Instant::now() < deadline,
            "{outcome}: {} of {want}",
            wakes(env, outcome)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(wakes(env, outcome), want, "{outcome}");
}

/// The value of `parley_upstream_wakes_total{platform="apns",outcome=…}`.
fn wakes(env: &Env, outcome: &str) -> u64 {
    wakes_of(env, "apns", outcome)
}

/// The value of `parley_upstream_wakes_total{platform=…,outcome=…}`.
fn wakes_of(env: &Env, platform: &str, outcome: &str) -> u64 {
    let mut m = String::new();
    env.server().courier.render_metrics(&mut m);
    let key =
        format!("parley_upstream_wakes_total{{platform=\"{platform}\",outcome=\"{outcome}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Devices asleep with APNs alert tokens, pushed to at once: "Apple"
/// takes three a second and answers 429 past that; the courier tries each
/// wake-up again after the Retry-After until every one is taken. A token
/// Apple then calls dead (410) is dropped from the device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owed_wake_ups_are_retried_past_429_and_dead_tokens_dropped() {
    let apple = Env::start(|c| c.provider_rate = 3).await;
    let upstream = std::sync::Arc::new(client_for(&apple));
    let ours = Env::start(|c| c.platforms.apns = Some(upstream)).await;
    const N: usize = 6;
    let mut phones = Vec::new();
    let mut courier_tokens = Vec::new();
    let mut devices = Vec::new();
    for _ in 0..N {
        // The phone's token at "Apple", and the device at our courier.
        let (_, apple_creds) = apple.device();
        let (phone, apple_tokens) = apple.connect(&apple_creds, Transport::Tls, &[TOPIC]).await;
        let (device, creds) = ours.device();
        let (mut dev, tokens) = ours.connect(&creds, Transport::Tls, &[TOPIC]).await;
        let token = wire::push::PlatformToken {
            platform: wire::push::Platform::Apns,
            calls: false,
            others: true,
            sandbox: false,
            topic: TOPIC.into(),
            token: apple_tokens[0].1.to_hex(),
            seal_to: None,
        };
        assert_eq!(
            platform_answer(&mut dev, token).await,
            wire::push::PlatformStatus::Ok
        );
        drop(dev);
        phones.push((phone, apple_tokens[0].1));
        courier_tokens.push(tokens[0].1);
        devices.push(device);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let http = ours.provider_http2().await.unwrap();
    let mut sender =
        push_courier::provider::ApnsSender::new(http, ours.provider_key.clone(), KID, TEAM);
    for t in &courier_tokens {
        let r = sender
            .push(t, TOPIC, &[], b"{\"n\":1}".to_vec())
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    for (phone, _) in &mut phones {
        match phone.next_within(Duration::from_secs(15)).await {
            Ok(client_sdk::courier::ClientEvent::Notification(n)) => {
                assert_eq!(n.push_type, PushType::Alert);
                phone.ack(&[n.id]).await.unwrap();
            }
            other => panic!("a wake-up never reached Apple: {other:?}"),
        }
    }
    wakes_reach(&ours, "accepted", N as u64).await;
    assert!(wakes(&ours, "retried") >= 1, "Apple's 429 was never met");
    // Nothing owed any more (the rows go with the next group commit).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ours
        .server()
        .courier
        .store
        .owed(None)
        .await
        .unwrap()
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "wake-ups still owed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The first phone's app is removed: Apple forgets its token.
    let (phone, apple_token) = phones.remove(0);
    phone.revoke(apple_token).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = sender
        .push(&courier_tokens[0], TOPIC, &[], b"{\"n\":2}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let store = &ours.server().courier.store;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !store
        .platform_tokens_of(devices[0])
        .await
        .unwrap()
        .is_empty()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead token was kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wakes_reach(&ours, "gone", 1).await;
}

/// A device owed a wake-up comes back on its link while the courier waits
/// out FCM's Retry-After (3 s for the stand-in's `busy` token): the
/// wake-up is owed no more at once, rather than after the wait (or, had
/// the courier restarted, sent for nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_back_on_its_link_is_owed_no_wake_up() {
    let (_google, client) = fcm(3600).await;
    let ours = Env::start(|c| c.platforms.fcm = Some(std::sync::Arc::new(client))).await;
    let (_, creds) = ours.device();
    let (mut dev, tokens) = ours.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = wire::push::PlatformToken {
        platform: wire::push::Platform::Fcm,
        calls: true,
        others: true,
        sandbox: false,
        topic: "parley-test".into(),
        token: "busy".into(),
        seal_to: None,
    };
    assert_eq!(
        platform_answer(&mut dev, token).await,
        wire::push::PlatformStatus::Ok
    );
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let http = ours.provider_http2().await.unwrap();
    let mut sender =
        push_courier::provider::ApnsSender::new(http, ours.provider_key.clone(), KID, TEAM);
    let r = sender
        .push(&tokens[0].1, TOPIC, &[], b"{\"n\":1}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let store = &ours.server().courier.store;
    // FCM said "later": the wake-up is owed.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while wakes_of(&ours, "fcm", "retried") == 0 {
        assert!(std::time::Instant::now() < deadline, "FCM was never asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.owed(None).await.unwrap().len(), 1);

    // Back on its link: it gets the push, and nothing is owed well before
    // FCM's 3 s are up.
    let back = std::time::Instant::now();
    let (mut dev, _) = ours.connect(&creds, Transport::Tls, &[TOPIC]).await;
    match dev.next_within(Duration::from_secs(5)).await.unwrap() {
        client_sdk::courier::ClientEvent::Notification(n) => dev.ack(&[n.id]).await.unwrap(),
        other => panic!("{other:?}"),
    }
    while !store.owed(None).await.unwrap().is_empty() {
        assert!(
            back.elapsed() < Duration::from_millis(1500),
            "still owed after the device came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

//! Couriers as one cluster: several nodes on one PostgreSQL database,
//! talking over NATS, each started by the test on loopback.

mod common;

use std::time::{Duration, Instant};

use client_sdk::courier::{ClientEvent, DeviceClient, Transport};
use common::*;
use push_courier::cluster::{shard_of, ClusterConfig};
use push_courier::courier::Courier;
use push_courier::runtime::Server;
use push_courier::store::{MessageState, Store};
use wire::push::{DeviceToken, NotificationId};

/// `n` courier nodes (the first is `env.server()`), one PostgreSQL, one
/// NATS; returns once every shard has an owner and every node holds
/// some.
async fn cluster(name: &str, n: usize) -> (Env, Vec<Server>, parley_tests::nats::Nats) {
    let nats = tokio::task::spawn_blocking({
        let name = name.to_owned();
        move || parley_tests::nats::Nats::start(&name)
    })
    .await
    .unwrap();
    let node = |i: usize| {
        let mut c = ClusterConfig::new(format!("n{i}"), vec![nats.url()]);
        c.lease = Duration::from_secs(4);
        Some(c)
    };
    let env = Env::start_postgres(name, |c| c.cluster = node(0)).await;
    let mut others = Vec::new();
    for i in 1..n {
        let mut config = env.config.clone();
        config.device_listen = "127.0.0.1:0".parse().unwrap();
        config.provider_listen = "127.0.0.1:0".parse().unwrap();
        config.cluster = node(i);
        others.push(env.node(config).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let owned: Vec<usize> = std::iter::once(env.server())
            .chain(&others)
            .map(|s| s.courier.cluster().unwrap().owned())
            .collect();
        if owned.iter().sum::<usize>() == 256 && owned.iter().all(|o| *o > 0) {
            break;
        }
        assert!(Instant::now() < deadline, "shards not spread: {owned:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (env, others, nats)
}

fn owns(c: &Courier, device: &wire::DeviceId) -> bool {
    c.cluster().unwrap().term(shard_of(device)).is_some()
}

/// The next notification within 5 s.
async fn next_note(dev: &mut DeviceClient) -> wire::push::Notification {
    match dev.next_within(Duration::from_secs(5)).await {
        Ok(ClientEvent::Notification(n)) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// Polls the database until message `id` is in `state` (bounded).
async fn wait_state(store: &Store, id: &NotificationId, state: MessageState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = store.status(id).await.unwrap().map(|s| s.state);
        if s == Some(state) {
            return;
        }
        assert!(Instant::now() < deadline, "message is {s:?}, not {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A provider pushes to one node for a device connected to another: the
/// push is in the database before the 2xx, reaches the device, and the
/// device's ack reaches the owner of its queue. Both directions: the
/// owner is the node the provider reached, then the node the device is
/// on. A device that was away gets what waited for it through the node
/// it comes back to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_any_node_reaches_the_device_on_another() {
    let (env, others, _nats) = cluster("courier-cluster-route", 2).await;
    let (a, b) = (env.server(), &others[0]);
    // A device whose queue node A holds, connected to node B.
    let (device, creds) = loop {
        let (id, creds) = env.device();
        if owns(&a.courier, &id) {
            break (id, creds);
        }
    };
    assert!(!owns(&b.courier, &device));
    let (mut dev, tokens) =
        DeviceClient::connect(b.device_addr(), Transport::Tls, &creds, &[TOPIC], 0)
            .await
            .unwrap();
    let token: DeviceToken = tokens[0].1;
    let store = Store::open(&env.config.database_url).await.unwrap();

    // Provider → A (the owner); device on B.
    let http = env.provider_http2_to(a.provider_addr()).await.unwrap();
    let mut sender =
        push_courier::provider::ApnsSender::new(http, env.provider_key.clone(), KID, TEAM);
    let r = sender
        .push(&token, TOPIC, &[], b"{\"n\":1}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = NotificationId::from_uuid(r.header("apns-id").unwrap()).unwrap();
    assert!(
        store.status(&id).await.unwrap().is_some(),
        "answered 2xx before it was committed"
    );
    let n = next_note(&mut dev).await;
    assert_eq!((n.id, n.payload.as_slice()), (id, &b"{\"n\":1}"[..]));
    dev.ack(&[id]).await.unwrap();
    wait_state(&store, &id, MessageState::Delivered).await;

    // Provider → B (not the owner: forwarded to A, which sends it back to
    // B for the device).
    let http = env.provider_http2_to(b.provider_addr()).await.unwrap();
    let mut sender =
        push_courier::provider::ApnsSender::new(http, env.provider_key.clone(), KID, TEAM);
    let r = sender
        .push(&token, TOPIC, &[], b"{\"n\":2}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id2 = NotificationId::from_uuid(r.header("apns-id").unwrap()).unwrap();
    assert!(store.status(&id2).await.unwrap().is_some());
    let n = next_note(&mut dev).await;
    assert_eq!(n.id, id2);
    dev.ack(&[id2]).await.unwrap();
    wait_state(&store, &id2, MessageState::Delivered).await;

    // Away: stored by A for the device, delivered when it is back on B.
    drop(dev);
    let r = sender
        .push(&token, TOPIC, &[], b"{\"n\":3}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id3 = NotificationId::from_uuid(r.header("apns-id").unwrap()).unwrap();
    let (mut dev, _) = DeviceClient::connect(b.device_addr(), Transport::Tls, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    let n = next_note(&mut dev).await;
    assert_eq!(n.id, id3);
    dev.ack(&[id3]).await.unwrap();
    wait_state(&store, &id3, MessageState::Delivered).await;

    let m = &b.courier.cluster().unwrap().metrics;
    assert!(
        m.forwarded.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "push and attach forwarded"
    );
    assert!(
        a.courier
            .cluster()
            .unwrap()
            .metrics
            .remote_deliveries
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
}

/// A device says hello while its shard has no owner (here another node
/// held it and went silent): the hello waits for the lease to run out and
/// this node to take the shard, and the device gets its tokens and what
/// was stored for it, instead of being sent away to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_waits_for_a_shard_between_owners() {
    let (env, _others, _nats) = cluster("courier-cluster-between", 1).await;
    let node = env.server();
    let (device, creds) = env.device();
    let (dev, tokens) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    drop(dev);
    let http = env.provider_http2().await.unwrap();
    let mut sender =
        push_courier::provider::ApnsSender::new(http, env.provider_key.clone(), KID, TEAM);
    let r = sender
        .push(&tokens[0].1, TOPIC, &[], b"{\"n\":1}".to_vec())
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let id = NotificationId::from_uuid(r.header("apns-id").unwrap()).unwrap();

    // A node that is not there takes the device's shard for 3 s.
    let pool = sqlx::PgPool::connect(&env.config.database_url)
        .await
        .unwrap();
    let until = unix_now() * 1000 + 3000;
    sqlx::query(
        "UPDATE courier_shards SET holder = 'gone', term = term + 1, expires_at = $1 \
         WHERE shard = $2",
    )
    .bind(until)
    .bind(i64::from(shard_of(&device)))
    .execute(&pool)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while owns(&node.courier, &device) {
        assert!(Instant::now() < deadline, "the node kept the shard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (mut dev, again) =
        DeviceClient::connect(node.device_addr(), Transport::Tls, &creds, &[TOPIC], 0)
            .await
            .expect("the hello waits for the shard's next owner");
    assert_eq!(again, tokens);
    assert!(owns(&node.courier, &device));
    let n = next_note(&mut dev).await;
    assert_eq!(n.id, id);
}

/// Signaling on another machine wakes a sleeping device through its FCM
/// token over NATS (`parley.courier.wake`): the wake-up reaches FCM for
/// the device that registered the token, and a request naming another
/// device with the same token is refused and reaches nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_over_nats_goes_only_through_the_devices_own_token() {
    use wire::push::{Platform, PlatformStatus, PlatformToken};
    let (google, fcm) = fcm(3600).await;
    let nats = tokio::task::spawn_blocking(|| parley_tests::nats::Nats::start("courier-wake"))
        .await
        .unwrap();
    let env = Env::start_postgres("courier-wake", |c| {
        let mut cluster = ClusterConfig::new("n0", vec![nats.url()]);
        cluster.lease = Duration::from_secs(4);
        c.cluster = Some(cluster);
        c.platforms.fcm = Some(std::sync::Arc::new(fcm));
    })
    .await;
    let (device, creds) = env.device();
    let (mut dev, _) = env.connect(&creds, Transport::Tls, &[TOPIC]).await;
    let token = PlatformToken {
        platform: Platform::Fcm,
        calls: true,
        others: true,
        sandbox: false,
        topic: "parley-test".into(),
        token: "pixel-7".into(),
        seal_to: None,
    };
    assert_eq!(platform_answer(&mut dev, token).await, PlatformStatus::Ok);
    drop(dev);

    let signaling = async_nats::connect(nats.url()).await.unwrap();
    let expires = unix_now() + 30;
    // The queue group is joined in the background: ask until a node takes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let woken = loop {
        match push_courier::submit::wake(&signaling, device, Platform::Fcm, "pixel-7", expires)
            .await
        {
            Err(push_courier::submit::SubmitError::Unreachable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => break other,
        }
    };
    assert_eq!(woken.unwrap(), push_courier::courier::Woken::Accepted);
    assert_eq!(google.sent().len(), 1);
    assert_eq!(google.sent()[0]["message"]["data"]["type"], "call");

    // A stranger's device naming the same token.
    let stranger = wire::DeviceId::random();
    let refused =
        push_courier::submit::wake(&signaling, stranger, Platform::Fcm, "pixel-7", expires).await;
    assert!(
        matches!(refused, Err(push_courier::submit::SubmitError::Refused(_))),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(google.sent().len(), 1, "the stranger's wake-up reached FCM");
}

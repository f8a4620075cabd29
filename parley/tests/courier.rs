//! `parley courier` as an operator runs it: pushes answered 2xx survive
//! `kill -9`, and reach the device exactly once per ack.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use client_sdk::courier::{ClientEvent, DeviceClient, Transport};
use parley_tests::courier::Courier;
use push_courier::provider::Http2;
use wire::push::NotificationId;

mod support;
use support::{device_creds, platform_answer, provider_config, roots, unix_now, TOPIC};

const BIN: &str = env!("CARGO_BIN_EXE_parley");

fn start(data: &Path, config: &Path) -> Courier {
    parley_tests::courier::start(BIN, data, config)
}

/// Pushes `n` messages concurrently; returns the ids answered 200.
async fn push_many(c: &Courier, data: &Path, key: &[u8], token: &str, n: usize) -> Vec<String> {
    let jwt = push_courier::core::jwt::sign(
        key,
        Some("KEY1234567"),
        &serde_json::json!({"iss": "TEAM123456", "iat": unix_now()}),
    )
    .unwrap();
    let client = Http2::connect(c.provider, "localhost", roots(data))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = client.clone();
        let auth = format!("bearer {jwt}");
        let path = format!("/3/device/{token}");
        let id = NotificationId(push_courier::courier::random().unwrap()).to_uuid();
        tasks.push(tokio::spawn(async move {
            let r = client
                .request(
                    "POST",
                    &path,
                    &[
                        ("authorization", &auth),
                        ("apns-topic", TOPIC),
                        ("apns-id", &id),
                    ],
                    format!("{{\"n\":{i}}}").into_bytes(),
                )
                .await
                .unwrap();
            (r.status, id)
        }));
    }
    let mut ok = Vec::new();
    for t in tasks {
        let (status, id) = t.await.unwrap();
        assert_eq!(status, 200, "push {id}");
        ok.push(id);
    }
    ok
}

/// Receives until `want` distinct ids arrived (acking each); returns them
/// and how many arrived more than once.
async fn drain(dev: &mut DeviceClient, want: usize) -> HashSet<String> {
    let mut got = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < want && Instant::now() < deadline {
        match dev.next_within(Duration::from_secs(10)).await {
            Ok(ClientEvent::Notification(n)) => {
                dev.ack(&[n.id]).await.unwrap();
                assert!(got.insert(n.id.to_uuid()), "the app saw {} twice", n.id);
            }
            Ok(ClientEvent::Closed(r)) => panic!("link closed: {r:?}"),
            Ok(_) => {}
            Err(e) => panic!("after {} of {want}: {e}", got.len()),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_2xx_loses_nothing_and_delivers_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config, key) = provider_config(dir.path(), "");
    let courier = start(&data, &config);
    let creds = device_creds(&data, wire::DeviceId::random());
    let (dev, tokens) = DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    let token = tokens[0].1.to_hex();
    drop(dev);

    // Offline device: every 2xx must survive the kill.
    const N: usize = 300;
    let pushed = push_many(&courier, &data, &key, &token, N).await;
    drop(courier); // SIGKILL right after the last 2xx
    let courier = start(&data, &config);
    let (mut dev, again) =
        DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
            .await
            .unwrap();
    assert_eq!(again[0].1.to_hex(), token, "token survives restart");
    let got = drain(&mut dev, N).await;
    assert_eq!(got, pushed.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(dev.duplicates(), 0, "nothing acked before was sent again");
    // Acks are written in the background; give them a moment, then make
    // sure a reconnect brings nothing back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(dev);

    // Online device, killed mid-stream: unacked messages come back after
    // the restart and the device drops what it has already seen.
    let (mut dev, _) = DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    match dev.next_within(Duration::from_millis(500)).await {
        Err(client_sdk::courier::ClientError::Timeout) => {}
        other => panic!("acked messages came back: {other:?}"),
    }
    const M: usize = 200;
    let pushed = push_many(&courier, &data, &key, &token, M).await;
    let mut seen = HashSet::new();
    // Take some, without acking, then kill.
    for _ in 0..M / 2 {
        if let Ok(ClientEvent::Notification(n)) = dev.next_within(Duration::from_secs(10)).await {
            seen.insert(n.id.to_uuid());
        }
    }
    drop(courier);
    dev.abort();
    let courier = start(&data, &config);
    let (mut dev, _) = DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    let after = drain(&mut dev, M).await;
    assert_eq!(after, pushed.iter().cloned().collect::<HashSet<_>>());
    assert!(seen.is_subset(&after), "unacked messages were redelivered");
}

/// A push for a device asleep without its link, answered 2xx while Apple
/// cannot be reached; the courier is killed (`kill -9`) before Apple took
/// the wake-up. After the restart the wake-up goes out (an alert naming
/// only the push's id), and the device, back on its link, gets the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_up_owed_when_the_courier_is_killed_goes_out_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    // "Apple": a courier that takes our wake-ups as a provider's pushes.
    let apple_dir = dir.path().join("apple");
    std::fs::create_dir_all(&apple_dir).unwrap();
    let (apple_config, p8) = provider_config(&apple_dir, "");
    let apple_data = apple_dir.join("data");
    let apple = start(&apple_data, &apple_config);
    let (mut iphone, apple_tokens) = DeviceClient::connect(
        apple.device,
        Transport::Tls,
        &device_creds(&apple_data, wire::DeviceId::random()),
        &[TOPIC],
        0,
    )
    .await
    .unwrap();
    let p8_path = dir.path().join("AuthKey_KEY1234567.p8");
    std::fs::write(&p8_path, parley_tests::tool::pem("PRIVATE KEY", &p8)).unwrap();

    let data = dir.path().join("data");
    let (config, key) = provider_config(
        dir.path(),
        &format!(
            "[courier.upstream.apns]\nurl = \"{}\"\nserver_name = \"localhost\"\nca = \"{}\"\n\
             key = \"{}\"\nkey_id = \"KEY1234567\"\nteam_id = \"TEAM123456\"\n",
            apple.provider,
            apple_data.join("ca.pem").display(),
            p8_path.display()
        ),
    );
    let courier = start(&data, &config);
    let creds = device_creds(&data, wire::DeviceId::random());
    let (mut dev, tokens) =
        DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
            .await
            .unwrap();
    let alert = wire::push::PlatformToken {
        platform: wire::push::Platform::Apns,
        calls: false,
        others: true,
        sandbox: false,
        topic: TOPIC.into(),
        token: apple_tokens[0].1.to_hex(),
        seal_to: None,
    };
    let (status, why) = platform_answer(&mut dev, alert).await;
    assert_eq!(status, wire::push::PlatformStatus::Ok, "{why}");
    drop(dev);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Apple hangs; the provider's push is answered all the same, then the
    // courier dies.
    apple.pause(true);
    let pushed = push_many(&courier, &data, &key, &tokens[0].1.to_hex(), 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(courier);
    apple.pause(false);
    match iphone.next_within(Duration::from_millis(500)).await {
        Err(client_sdk::courier::ClientError::Timeout) => {}
        other => panic!("Apple took the wake-up before the kill: {other:?}"),
    }

    let courier = start(&data, &config);
    let wake = match iphone.next_within(Duration::from_secs(15)).await {
        Ok(ClientEvent::Notification(n)) => n,
        other => panic!("no wake-up after the restart: {other:?}"),
    };
    iphone.ack(&[wake.id]).await.unwrap();
    assert_eq!(wake.push_type, wire::push::PushType::Alert);
    let body: serde_json::Value = serde_json::from_slice(&wake.payload).unwrap();
    assert_eq!(body["parley"]["type"], "wake");
    assert_eq!(body["parley"]["id"], pushed[0].as_str());
    assert_eq!(body["aps"]["mutable-content"], 1);
    assert!(!String::from_utf8_lossy(&wake.payload).contains("\"n\""));

    // Woken, the device takes the push itself over its link.
    let (mut dev, _) = DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0)
        .await
        .unwrap();
    let got = drain(&mut dev, 1).await;
    assert_eq!(got, pushed.into_iter().collect::<HashSet<_>>());
    drop(apple);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_courier_refuses_devices_on_its_revocation_list() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (config, _) = provider_config(dir.path(), "");
    // First start creates the CA; the device's certificate comes from it.
    drop(start(&data, &config));
    let creds = device_creds(&data, wire::DeviceId::random());
    let ca = ids::certs::DeviceCa::from_pem(
        &std::fs::read_to_string(data.join("ca.pem")).unwrap(),
        &std::fs::read_to_string(data.join("ca-key.pem")).unwrap(),
    )
    .unwrap();
    // device_creds issues serial 11…11.
    let crl = ca
        .crl(&[(wire::keys::hex(&[0x11; 16]), unix_now())], unix_now())
        .unwrap();
    std::fs::write(dir.path().join("devices.crl"), &crl).unwrap();
    let mut text = std::fs::read_to_string(&config).unwrap();
    text = text.replace(
        "[courier]\n",
        &format!(
            "[courier]\ndevice_crl = \"{}\"\n",
            dir.path().join("devices.crl").display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let courier = start(&data, &config);
    let r = DeviceClient::connect(courier.device, Transport::Tls, &creds, &[TOPIC], 0).await;
    assert!(
        matches!(
            r,
            Err(client_sdk::courier::ClientError::Closed(
                wire::push::CloseReason::Revoked,
                _
            ))
        ),
        "{r:?}"
    );
}

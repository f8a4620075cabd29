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
use support::{device_creds, provider_config, roots, unix_now, TOPIC};

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

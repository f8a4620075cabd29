//! A stranger against a live group call: Alice, Bob and Carol talk
//! through the whole stack, and Eve, a registered user who is not in the
//! call but knows its room and their devices, sends what members send to
//! one another. None of it takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use client_sdk::call::CallEvent;
use client_sdk::device::{first_device, Device, DeviceEvent};
use client_sdk::sip::{UaConfig, UaEvent, UserAgent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::handle::Handle;

use super::{device_config, reach, start_stack, Dev, Reach, Timeline};
use crate::client::prove_from_outbox;

const LEFT_TYPE: &str = "application/vnd.parley.left+json";
const JOINED_TYPE: &str = "application/vnd.parley.joined+json";

/// Eve's user agent on her own device's TLS flow to signaling.
struct Eve {
    ua: UserAgent,
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    events: Vec<UaEvent>,
}

impl Eve {
    /// Moves bytes both ways until `done` holds of what came (10 s at
    /// most).
    async fn until(&mut self, done: impl Fn(&[UaEvent]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = vec![0u8; 16 * 1024];
        while !done(&self.events) {
            assert!(Instant::now() < deadline, "Eve waited: {:?}", self.events);
            while let Some(out) = self.ua.poll_transmit() {
                self.tls.write_all(&out).await.unwrap();
            }
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(20), self.tls.read(&mut buf)).await
            {
                assert!(n > 0, "signaling closed Eve's flow");
                self.ua.handle_input(Instant::now(), &buf[..n]).unwrap();
            }
            self.ua.handle_timeout(Instant::now());
            while let Some(e) = self.ua.poll_event() {
                self.events.push(e);
            }
        }
    }

    /// Sends a MESSAGE to `to` and waits for its final status.
    async fn message(&mut self, to: &str, content_type: &str, body: &str) -> u16 {
        let id = self
            .ua
            .message(Instant::now(), to, content_type, body.as_bytes())
            .unwrap();
        self.until(|evs| {
            evs.iter()
                .any(|e| matches!(e, UaEvent::MessageDone { id: i, .. } if *i == id))
        })
        .await;
        self.events
            .iter()
            .find_map(|e| match e {
                UaEvent::MessageDone { id: i, code } if *i == id => Some(*code),
                _ => None,
            })
            .unwrap()
    }
}

/// What the members saw of their call's membership since `from` (events
/// past that index): anyone leaving, joining or asking in, or the call
/// ending.
fn membership_since(devs: &[Dev], from: &[usize]) -> Vec<String> {
    devs.iter()
        .zip(from)
        .flat_map(|(d, f)| {
            d.events[*f..]
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        DeviceEvent::Call(
                            CallEvent::MemberLeft { .. }
                                | CallEvent::MemberJoined { .. }
                                | CallEvent::JoinRequest { .. }
                                | CallEvent::Ended { .. }
                        )
                    )
                })
                .map(move |e| format!("{}: {}", d.name, crate::client::describe(e)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_cannot_say_who_left_or_joined_nor_join_as_a_member() {
    let dir = tempfile::tempdir().unwrap();
    let (stack, data, settings) = start_stack(dir.path(), true).await.unwrap();
    let Reach {
        courier,
        signaling,
        roots,
        ids,
        outbox,
        ..
    } = reach(&stack, &data, &settings).unwrap();
    let mut t = Timeline {
        start: Instant::now(),
        lines: Vec::new(),
        quiet: true,
    };
    let names = ["alice", "bob", "carol"];
    let handles: Vec<Handle> = names
        .iter()
        .map(|n| Handle::parse(&format!("{n}@example.com")).unwrap())
        .collect();
    let mut devs = Vec::new();
    let mut device_ids = Vec::new();
    for (i, (name, handle)) in names.iter().zip(&handles).enumerate() {
        let proof = prove_from_outbox(&ids, &outbox, handle).await.unwrap();
        let (id, _, _) = first_device(&ids, proof, handle, name).await.unwrap();
        device_ids.push(id.device);
        let config = device_config(
            name,
            handle,
            (signaling, courier, &roots),
            440.0 + 220.0 * i as f64,
        );
        let device = Device::start(config, id, ids.clone(), true).await.unwrap();
        devs.push(Dev {
            name,
            device,
            events: Vec::new(),
        });
    }
    let registered = |d: &[Dev]| {
        d.iter().all(|x| {
            x.events
                .iter()
                .any(|e| matches!(e, DeviceEvent::Registered))
        })
    };
    super::until(
        &mut devs,
        &mut t,
        Duration::from_secs(20),
        "registrations",
        registered,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Alice rings Bob and Carol; both answer; all three are in the room.
    let room = devs[0].device.group_call(&handles[1..]).await.unwrap();
    let mut answered = [true, false, false];
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered.iter().any(|a| !a) {
        assert!(Instant::now() < deadline, "the group call did not ring");
        super::pump(&mut devs, &mut t).await;
        for (i, d) in devs.iter().enumerate() {
            let rang = d.events.iter().any(|e| {
                matches!(e, DeviceEvent::Call(CallEvent::IncomingGroup { call, .. }) if *call == room)
            });
            if rang && !answered[i] {
                d.device.answer(&room).await.unwrap();
                answered[i] = true;
            }
        }
    }
    let connected = |d: &[Dev]| {
        d.iter().all(|x| {
            x.events
                .iter()
                .any(|e| matches!(e, DeviceEvent::Call(CallEvent::MediaConnected { .. })))
        })
    };
    super::until(
        &mut devs,
        &mut t,
        Duration::from_secs(20),
        "media",
        connected,
    )
    .await
    .unwrap();

    // Eve: an account and a device of her own, registered on signaling.
    let eve_handle = Handle::parse("eve@example.com").unwrap();
    let proof = prove_from_outbox(&ids, &outbox, &eve_handle).await.unwrap();
    let (eve_id, _, _) = first_device(&ids, proof, &eve_handle, "eve").await.unwrap();
    let (chain, key) = client_sdk::ids::tls_identity(&eve_id.certificate, &eve_id.key).unwrap();
    let tls_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_client_auth_cert(chain, key)
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(signaling.tls_addrs()[0])
        .await
        .unwrap();
    let local = tcp.local_addr().unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    let ua_config = UaConfig::new(
        eve_handle.as_str(),
        "localhost",
        local,
        &format!("urn:uuid:{}", eve_id.device),
    );
    let mut eve = Eve {
        ua: UserAgent::new(ua_config, 7),
        tls,
        events: Vec::new(),
    };
    // Her device is in the directory's next epoch: members that look her
    // up find it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    eve.ua.register(Instant::now());
    eve.until(|evs| evs.iter().any(|e| matches!(e, UaEvent::Registered { .. })))
        .await;
    super::pump(&mut devs, &mut t).await;
    let mark: Vec<usize> = devs.iter().map(|d| d.events.len()).collect();

    // 1. "Alice's device left", to Bob and Carol. Their devices take the
    //    MESSAGE (200), and nobody leaves.
    let left = format!(r#"{{"room":"{room}","device":"{}"}}"#, device_ids[0]);
    for to in ["bob@example.com", "carol@example.com"] {
        assert_eq!(eve.message(to, LEFT_TYPE, &left).await, 200);
    }
    // 2. "I admitted Eve's device" (her own, which the directory does
    //    list), to all three: nobody joins, nor sends her a key.
    let joined = format!(
        r#"{{"room":"{room}","handle":"eve@example.com","device":"{}","index":9}}"#,
        eve_id.device
    );
    for to in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        assert_eq!(eve.message(to, JOINED_TYPE, &joined).await, 200);
    }
    // 3. Asking Alice in by the room, as Carol's device: refused (488),
    //    and Alice is never asked.
    let roster = format!(
        r#"{{"room":"{room}","members":[{{"handle":"carol@example.com","device":"{}","index":0}}]}}"#,
        device_ids[2]
    );
    eve.ua
        .invite_group(
            Instant::now(),
            "eve-join-1",
            "alice@example.com",
            &room,
            &roster,
        )
        .unwrap();
    eve.until(|evs| {
        evs.iter()
            .any(|e| matches!(e, UaEvent::Failed { call, .. } if call == "eve-join-1"))
    })
    .await;
    let code = eve.events.iter().find_map(|e| match e {
        UaEvent::Failed { call, code, .. } if call == "eve-join-1" => Some(*code),
        _ => None,
    });
    assert_eq!(code, Some(488), "{:?}", eve.events);

    // A second of the call goes on: the three still hear each other and
    // no member left, joined or was asked about.
    let end = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        super::pump(&mut devs, &mut t).await;
    }
    let seen = membership_since(&devs, &mark);
    assert!(seen.is_empty(), "{seen:#?}");
    for d in &devs {
        let stats = d.device.group_stats(&room).await.unwrap().unwrap();
        assert_eq!(stats.heard.len(), 2, "{}: {:?}", d.name, stats.heard.keys());
    }
    for d in &devs {
        d.device.hangup(&room).await.unwrap();
    }
    stack.shutdown().await.unwrap();
}

//! `parley courier` as a cluster: processes on 127.0.0.2, .3, .4 sharing
//! one PostgreSQL and one NATS server, all started by the test.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use client_sdk::courier::{ClientError, ClientEvent, DeviceClient, DeviceCredentials, Transport};
use parley_tests::courier::Courier;
use push_courier::cluster::shard_of;
use push_courier::provider::Http2;
use wire::push::{DeviceToken, NotificationId};
use wire::DeviceId;

mod support;
use support::{device_creds, provider_config, roots, unix_now, TOPIC};

const BIN: &str = env!("CARGO_BIN_EXE_parley");

struct Lab {
    _dir: tempfile::TempDir,
    data: PathBuf,
    key: Vec<u8>,
    pg: parley_tests::postgres::Postgres,
    nats: Mutex<parley_tests::nats::Nats>,
    /// Node i listens on 127.0.0.(i+2); `None` once killed.
    nodes: Mutex<Vec<Option<Courier>>>,
}

impl Lab {
    /// `n` nodes; returns once every shard has an owner and every node
    /// holds some.
    async fn start(name: &'static str, n: usize) -> Arc<Lab> {
        let lab = tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            let pg = parley_tests::postgres::Postgres::start(name);
            let nats = parley_tests::nats::Nats::start(name);
            let (config, key) = provider_config(
                dir.path(),
                &format!("\n[cluster]\nnats = \"{}\"\nlease_secs = 4\n", nats.url()),
            );
            let nodes = (0..n)
                .map(|i| {
                    Some(parley_tests::courier::start_with(
                        BIN,
                        &data,
                        &config,
                        &[
                            "--cluster-node",
                            &format!("n{i}"),
                            "--courier-database",
                            &pg.url(),
                        ],
                        &format!("127.0.0.{}", i + 2),
                    ))
                })
                .collect();
            Lab {
                _dir: dir,
                data,
                key,
                pg,
                nats: Mutex::new(nats),
                nodes: Mutex::new(nodes),
            }
        })
        .await
        .unwrap();
        let lab = Arc::new(lab);
        lab.wait_spread(n, Duration::from_secs(30)).await;
        lab
    }

    /// Waits until the live nodes (`live` of them) own all 256 shards,
    /// each some; returns how long that took.
    async fn wait_spread(&self, live: usize, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let owned: Vec<f64> = self
                .nodes
                .lock()
                .unwrap()
                .iter()
                .flatten()
                .map(|c| c.metric("parley_courier_shards_owned").unwrap_or(0.0))
                .collect();
            if owned.len() == live
                && owned.iter().sum::<f64>() == 256.0
                && owned.iter().all(|o| *o > 0.0)
            {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "shards not spread: {owned:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A device link to node `i` (which must be alive) and its tokens.
    /// A node may turn a device away for a moment while a shard changes
    /// hands ("retry"); the device tries again, as the SDK does.
    async fn connect(&self, i: usize, creds: &DeviceCredentials) -> (DeviceClient, DeviceToken) {
        for attempt in 1.. {
            match DeviceClient::connect(
                self.device_addr(i).unwrap(),
                Transport::Tls,
                creds,
                &[TOPIC],
                0,
            )
            .await
            {
                Ok((dev, tokens)) => return (dev, tokens[0].1),
                Err(ClientError::Closed(_, why)) if why.contains("retry") && attempt < 20 => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => panic!("device link to node {i}: {e}"),
            }
        }
        unreachable!()
    }

    fn device_addr(&self, i: usize) -> Option<std::net::SocketAddr> {
        self.nodes.lock().unwrap()[i].as_ref().map(|c| c.device)
    }

    fn provider_addr(&self, i: usize) -> Option<std::net::SocketAddr> {
        self.nodes.lock().unwrap()[i].as_ref().map(|c| c.provider)
    }

    fn bearer(&self) -> String {
        let jwt = push_courier::core::jwt::sign(
            &self.key,
            Some("KEY1234567"),
            &serde_json::json!({"iss": "TEAM123456", "iat": unix_now()}),
        )
        .unwrap();
        format!("bearer {jwt}")
    }

    async fn store(&self) -> push_courier::store::Store {
        push_courier::store::Store::open(&self.pg.url())
            .await
            .unwrap()
    }

    /// The node (index) holding `device`'s shard.
    async fn owner_of(&self, device: &DeviceId) -> usize {
        let leases = self.store().await.shard_leases().await.unwrap();
        let (_, holder, _, _) = &leases[usize::from(shard_of(device))];
        holder.trim_start_matches('n').parse().unwrap()
    }
}

/// One push through a node's provider API; the status (0 = no answer).
/// A 503 must say when to retry.
async fn push_once(http: &mut Http2, auth: &str, token: &DeviceToken, id: &str, n: usize) -> u16 {
    let path = format!("/3/device/{}", token.to_hex());
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        http.request(
            "POST",
            &path,
            &[
                ("authorization", auth),
                ("apns-topic", TOPIC),
                ("apns-id", id),
            ],
            format!("{{\"n\":{n}}}").into_bytes(),
        ),
    )
    .await;
    match r {
        Ok(Ok(r)) => {
            if r.status == 503 {
                assert_eq!(
                    r.header("retry-after"),
                    Some("1"),
                    "503 without Retry-After"
                );
            }
            r.status
        }
        _ => 0,
    }
}

/// A device that stays connected as the SDK does: to its first node, and
/// after a link ends to the next live one (with a short backoff); acks
/// what it gets and records it, once per id.
fn run_device(
    lab: Arc<Lab>,
    creds: DeviceCredentials,
    first: usize,
    got: Arc<Mutex<HashSet<NotificationId>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut duplicates = 0;
        let mut attempt = 0;
        while !stop.load(Ordering::Relaxed) {
            let node = (first + attempt) % 3;
            attempt += 1;
            let Some(addr) = lab.device_addr(node) else {
                continue;
            };
            let Ok((mut dev, _)) =
                DeviceClient::connect(addr, Transport::Tls, &creds, &[TOPIC], 0).await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            loop {
                match dev.next_within(Duration::from_millis(200)).await {
                    Ok(ClientEvent::Notification(n)) => {
                        let _ = dev.ack(&[n.id]).await;
                        got.lock().unwrap().insert(n.id);
                    }
                    Ok(ClientEvent::Closed(_)) | Err(ClientError::Protocol(_)) => break,
                    Ok(_) | Err(_) => {}
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            duplicates += dev.duplicates();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        duplicates
    })
}

/// What happens a third of the way through a load run; returns a task
/// whose answer the run reports.
type Disruption = Box<dyn FnOnce(Arc<Lab>) -> tokio::task::JoinHandle<String> + Send>;

/// Pushes `PUSHES` messages to 24 devices spread over three nodes, by 48
/// providers that each push to a node in turn and retry a push that got
/// no 2xx at the next node with the same id (as APNs clients do), with
/// `disrupt` a third of the way through. Then checks that every push
/// answered 2xx reached its device (once, after the device's dedup) and
/// that nothing is left queued once the devices have acked.
async fn under_load(lab: Arc<Lab>, disrupt: Disruption) {
    const DEVICES: usize = 24;
    const PUSHES: usize = 20_000;
    const WORKERS: usize = 48;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tokens = Vec::new();
    let mut received = Vec::new();
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let creds = device_creds(&lab.data, DeviceId::random());
        let (dev, token) = lab.connect(i % 3, &creds).await;
        drop(dev);
        tokens.push(token);
        let got = Arc::new(Mutex::new(HashSet::new()));
        received.push(got.clone());
        devices.push(run_device(lab.clone(), creds, i % 3, got, stop.clone()));
    }
    let tokens = Arc::new(tokens);

    let auth = Arc::new(lab.bearer());
    let mut http = Vec::new();
    for i in 0..3 {
        http.push(
            Http2::connect(lab.provider_addr(i).unwrap(), "localhost", roots(&lab.data))
                .await
                .unwrap(),
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let pushed: Arc<Mutex<HashMap<usize, HashSet<NotificationId>>>> = Default::default();
    let disrupt = Arc::new(Mutex::new(Some(disrupt)));
    let during: Arc<Mutex<Option<tokio::task::JoinHandle<String>>>> = Default::default();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (lab, next, pushed, tokens, auth, disrupt, during) = (
            lab.clone(),
            next.clone(),
            pushed.clone(),
            tokens.clone(),
            auth.clone(),
            disrupt.clone(),
            during.clone(),
        );
        let mut http = http.clone();
        workers.push(tokio::spawn(async move {
            let mut retries = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= PUSHES {
                    return retries;
                }
                if i == PUSHES / 3 {
                    let f = disrupt.lock().unwrap().take().unwrap();
                    *during.lock().unwrap() = Some(f(lab.clone()));
                }
                let device = i % DEVICES;
                let id = NotificationId(push_courier::courier::random().unwrap());
                let uuid = id.to_uuid();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut node = i % 3;
                loop {
                    let status = push_once(&mut http[node], &auth, &tokens[device], &uuid, i).await;
                    if status == 200 {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "push {i} not accepted within 60 s (last {status})"
                    );
                    retries += 1;
                    node = (node + 1) % 3;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                pushed.lock().unwrap().entry(device).or_default().insert(id);
            }
        }));
    }
    let mut retries = 0;
    for w in workers {
        retries += w.await.unwrap();
    }
    let push_time = started.elapsed();
    let watcher = during.lock().unwrap().take().unwrap();
    let what = watcher.await.unwrap();

    // Every acknowledged push arrives (bounded).
    let pushed = pushed.lock().unwrap().clone();
    assert_eq!(pushed.values().map(HashSet::len).sum::<usize>(), PUSHES);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing: usize = (0..DEVICES)
            .map(|d| pushed[&d].difference(&received[d].lock().unwrap()).count())
            .sum();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged pushes never arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Acks reach the owners: nothing stays queued.
    let store = lab.store().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let queued = store.queued_index().await.unwrap();
        if queued.is_empty() {
            break;
        }
        let ids: Vec<String> = queued.iter().map(|m| m.note.id.to_uuid()).collect();
        assert!(
            Instant::now() < deadline,
            "{} messages still queued after every device acked: {ids:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut duplicates = 0;
    for d in devices {
        duplicates += d.await.unwrap();
    }
    eprintln!(
        "{PUSHES} pushes in {push_time:?} ({:.0}/s), {retries} retries, \
         {duplicates} duplicates dropped by devices; {what}",
        PUSHES as f64 / push_time.as_secs_f64(),
    );
}

/// `kill -9` of one of three nodes under load: its shards move to the
/// others within the lease, its devices reconnect elsewhere, and no push
/// answered 2xx is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_no_acknowledged_push() {
    let lab = Lab::start("courier-cluster-kill", 3).await;
    under_load(
        lab,
        Box::new(|lab: Arc<Lab>| {
            // SIGKILL, as `kill -9`.
            lab.nodes.lock().unwrap()[1] = None;
            tokio::spawn(async move {
                let t = lab.wait_spread(2, Duration::from_secs(30)).await;
                format!("every shard owned by the survivors {t:?} after the kill")
            })
        }),
    )
    .await;
}

/// NATS restarted under load: while it is away pushes that need another
/// node get 503 (never a 2xx for a push not stored) and /readyz says so;
/// once it is back the nodes reconnect by themselves and every push
/// answered 2xx arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_under_load_loses_no_acknowledged_push() {
    let lab = Lab::start("courier-cluster-nats", 3).await;
    under_load(
        lab,
        Box::new(|lab: Arc<Lab>| {
            lab.nats.lock().unwrap().stop();
            tokio::spawn(async move {
                let down = Instant::now();
                let node0 = || lab.nodes.lock().unwrap()[0].as_ref().map(|c| c.readyz());
                while node0() != Some(503) {
                    assert!(
                        down.elapsed() < Duration::from_secs(10),
                        "/readyz stayed ready without NATS"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_secs(3)).await;
                let nats = lab.clone();
                tokio::task::spawn_blocking(move || nats.nats.lock().unwrap().start_again())
                    .await
                    .unwrap();
                while node0() != Some(200) {
                    assert!(
                        down.elapsed() < Duration::from_secs(30),
                        "not ready again after NATS came back"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                format!("NATS away for {:?}", down.elapsed())
            })
        }),
    )
    .await;
}

/// A node paused (SIGSTOP) past its lease loses its shards to the others;
/// resumed (SIGCONT), it no longer acts as their owner: what it still held
/// in memory is not delivered, and pushes through it reach the device via
/// the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_out_when_it_resumes() {
    let lab = Lab::start("courier-cluster-pause", 2).await;
    // A device whose shard node 0 holds.
    let device = loop {
        let d = DeviceId::random();
        if lab.owner_of(&d).await == 0 {
            break d;
        }
    };
    let creds = device_creds(&lab.data, device);
    let (dev, token) = lab.connect(1, &creds).await;
    drop(dev);
    let auth = lab.bearer();
    let mut via1 = Http2::connect(lab.provider_addr(1).unwrap(), "localhost", roots(&lab.data))
        .await
        .unwrap();
    // Stored by node 0 while the device is away.
    let stale = NotificationId(push_courier::courier::random().unwrap());
    assert_eq!(
        push_once(&mut via1, &auth, &token, &stale.to_uuid(), 1).await,
        200
    );

    lab.nodes.lock().unwrap()[0].as_ref().unwrap().pause(true);
    let paused = Instant::now();
    // Node 1 takes the shard once the lease runs out; until then pushes
    // for the device are refused (503), never answered 2xx unstored.
    let fresh = NotificationId(push_courier::courier::random().unwrap());
    loop {
        match push_once(&mut via1, &auth, &token, &fresh.to_uuid(), 2).await {
            200 => break,
            503 | 0 => {}
            s => panic!("push during failover answered {s}"),
        }
        assert!(
            paused.elapsed() < Duration::from_secs(20),
            "no takeover within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let takeover = paused.elapsed();
    assert_eq!(lab.owner_of(&device).await, 1);
    // The device, back on node 1, gets both from the new owner.
    let (mut dev, _) = lab.connect(1, &creds).await;
    let mut got = HashSet::new();
    while got.len() < 2 {
        match dev.next_within(Duration::from_secs(10)).await {
            Ok(ClientEvent::Notification(n)) => {
                dev.ack(&[n.id]).await.unwrap();
                got.insert(n.id);
            }
            other => panic!("expected the queued pushes, got {other:?}"),
        }
    }
    assert_eq!(got, HashSet::from([stale, fresh]));
    let store = lab.store().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !store.queued_index().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "acks not recorded by the new owner"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(dev);

    // Resumed: node 0 still has the stale message in memory, but its lease
    // ended by its own clock: the device connecting to it is served by
    // the new owner, which has nothing left for it.
    lab.nodes.lock().unwrap()[0].as_ref().unwrap().pause(false);
    let (mut dev, _) = lab.connect(0, &creds).await;
    match dev.next_within(Duration::from_secs(2)).await {
        Err(ClientError::Timeout) => {}
        other => panic!("the paused node delivered stale state: {other:?}"),
    }
    let later = NotificationId(push_courier::courier::random().unwrap());
    let mut via0 = Http2::connect(lab.provider_addr(0).unwrap(), "localhost", roots(&lab.data))
        .await
        .unwrap();
    // Shards move back to the resumed node meanwhile; a push for one in
    // transit is answered 503 and retried, as providers do.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match push_once(&mut via0, &auth, &token, &later.to_uuid(), 3).await {
            200 => break,
            503 if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            s => panic!("push through the resumed node answered {s}"),
        }
    }
    match dev.next_within(Duration::from_secs(5)).await {
        Ok(ClientEvent::Notification(n)) => assert_eq!(n.id, later),
        other => panic!("expected the new push, got {other:?}"),
    }
    assert_eq!(dev.duplicates(), 0);
    let n0 = lab.nodes.lock().unwrap()[0]
        .as_ref()
        .unwrap()
        .metric("parley_courier_shards_lost_total");
    assert!(
        n0.unwrap_or(0.0) >= 1.0,
        "node 0 did not notice it lost its shards"
    );
    eprintln!("takeover {takeover:?} after SIGSTOP");
}

/// NATS that asks for a password: a node given the user and password file
/// joins and is ready; one with the wrong password stays unready (its
/// /readyz says NATS is down) rather than running without its cluster.
#[test]
fn nodes_log_in_to_nats_with_the_configured_password() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pg = parley_tests::postgres::Postgres::start("courier-nats-auth");
    let nats = parley_tests::nats::Nats::start_with_password("nats-auth", "parley", "s3cret-nats");
    let node = |name: &str, password: &str, host: &str| {
        let secret = dir.path().join(format!("{name}.pass"));
        std::fs::write(&secret, format!("{password}\n")).unwrap();
        let (config, _) = provider_config(
            dir.path(),
            &format!(
                "\n[cluster]\nnats = \"{}\"\nnats_user = \"parley\"\nnats_password_file = \"{}\"\n",
                nats.url(),
                secret.display()
            ),
        );
        let renamed = dir.path().join(format!("{name}.toml"));
        std::fs::rename(&config, &renamed).unwrap();
        parley_tests::courier::start_with(
            BIN,
            &data,
            &renamed,
            &["--cluster-node", name, "--courier-database", &pg.url()],
            host,
        )
    };
    let good = node("n0", "s3cret-nats", "127.0.0.2");
    let wrong = node("n1", "guessed", "127.0.0.3");
    let deadline = Instant::now() + Duration::from_secs(20);
    while good.readyz() != 200 {
        assert!(
            Instant::now() < deadline,
            "the node with the password never got ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(good.metric("parley_courier_nats_up"), Some(1.0));
    assert_eq!(wrong.readyz(), 503);
    assert_eq!(wrong.metric("parley_courier_nats_up"), Some(0.0));
}

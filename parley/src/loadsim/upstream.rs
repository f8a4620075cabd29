//! `parley loadsim upstream`: how fast the courier hands wake-ups to Apple,
//! and how much later than the provider's 2xx.
//!
//! It plays every part around a running courier configured with
//! `[courier.upstream.apns]` pointing at `--sink-listen`: an APNs stand-in
//! (HTTP/2 over TLS; answers 200 and notes when each `apns-id` arrived),
//! devices that register an APNs token over their link and go to sleep,
//! and a provider pushing to them at a paced rate. Phase 1 offers `--rate`
//! (throughput: wake-ups Apple took per second); phase 2 offers half of
//! what phase 1 achieved (latency: from the provider's 2xx to the wake-up
//! reaching Apple, for every push whose own id went up).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use client_sdk::courier::{ClientEvent, DeviceClient, DeviceCredentials, Transport};
use hdrhistogram::Histogram;
use push_courier::provider::{ApnsSender, Http2};
use wire::push::{DeviceToken, Platform, PlatformStatus, PlatformToken};

use super::{push_id, read_pkcs8, unix_nanos, Pacer};

#[derive(Debug, Args, Clone)]
pub struct UpstreamLoad {
    /// Data directory of the courier (device certificates from its CA).
    #[arg(long, default_value = "./parley-data")]
    pub data: PathBuf,
    /// Courier device address (TLS).
    #[arg(long, default_value = "127.0.0.1:5223")]
    pub device_addr: SocketAddr,
    /// Courier provider address (HTTPS).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub provider_addr: SocketAddr,
    /// The provider; its topic is also the bundle id the devices' APNs
    /// tokens name.
    #[command(flatten)]
    pub provider: super::Provider,
    /// Where the APNs stand-in listens (the courier's
    /// `courier.upstream.apns.url`).
    #[arg(long, default_value = "127.0.0.1:19443")]
    pub sink_listen: SocketAddr,
    /// The stand-in's certificate chain and key (PEM), for "localhost".
    #[arg(long)]
    pub sink_cert: PathBuf,
    #[arg(long)]
    pub sink_key: PathBuf,
    /// Sleeping devices, each with an APNs token.
    #[arg(long, default_value_t = 5000)]
    pub devices: usize,
    /// Phase 1 push rate (pushes/s offered).
    #[arg(long, default_value_t = 40_000)]
    pub rate: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

/// What the APNs stand-in saw.
#[derive(Default)]
struct Sink {
    taken: AtomicU64,
    /// When the latest wake-up arrived (unix ns).
    last: AtomicU64,
    /// apns-id → when it arrived (unix ns), for the latency phase.
    arrived: Mutex<HashMap<String, u64>>,
    record: std::sync::atomic::AtomicBool,
}

async fn start_sink(args: &UpstreamLoad, sink: Arc<Sink>) -> Result<()> {
    let chain = crate::tls::chain(&args.sink_cert)?;
    let key = crate::tls::private_key(&args.sink_key)?;
    let tls = push_courier::http::tls_config(chain, key, None)?;
    let app = axum::Router::new().route(
        "/3/device/{token}",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, _body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let id = headers
                        .get("apns-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    sink.taken.fetch_add(1, Ordering::Relaxed);
                    let now = unix_nanos();
                    sink.last.fetch_max(now, Ordering::Relaxed);
                    if sink.record.load(Ordering::Relaxed) {
                        sink.arrived
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.clone(), now);
                    }
                    ([("apns-id", id)], "")
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind(args.sink_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.sink_listen))?;
    let (_keep, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _keep;
        push_courier::http::serve(
            listener,
            tls,
            app,
            push_courier::http::Limits {
                connections: 64,
                per_source: 64,
            },
            shutdown,
        )
        .await
    });
    Ok(())
}

/// Devices that register an APNs token and go to sleep; their courier
/// tokens.
#[allow(clippy::print_stdout)]
async fn sleepers(args: &UpstreamLoad) -> Result<Vec<DeviceToken>> {
    let ca = ids::certs::DeviceCa::from_pem(
        &std::fs::read_to_string(args.data.join("ca.pem"))?,
        &std::fs::read_to_string(args.data.join("ca-key.pem"))
            .context("the load simulator issues device certificates from ca-key.pem")?,
    )?;
    let roots = crate::tls::roots(&args.data.join("ca.pem"))?;
    let key = wire::SigningKey::generate();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..args.devices {
        let device = wire::DeviceId({
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            b[8..].copy_from_slice(b"upstream");
            b
        });
        let mut serial = [0u8; 16];
        serial[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let (_, pem) = ca.issue(device, &key.public(), serial, now)?;
        let creds = DeviceCredentials {
            chain: rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into()),
            roots: roots.clone(),
            server_name: "localhost".into(),
        };
        let (sem, addr, topic) = (sem.clone(), args.device_addr, args.provider.topic.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (mut dev, tokens) =
                DeviceClient::connect(addr, Transport::Tls, &creds, &[&topic], 0)
                    .await
                    .map_err(|e| anyhow::anyhow!("device {i}: {e}"))?;
            let token = PlatformToken {
                platform: Platform::Apns,
                calls: false,
                others: true,
                sandbox: false,
                topic,
                token: format!("{i:064x}"),
                seal_to: None,
            };
            let request = dev.register_platform(token).await?;
            match dev.next_within(Duration::from_secs(10)).await {
                Ok(ClientEvent::Platform {
                    request: r,
                    status: PlatformStatus::Ok,
                    ..
                }) if r == request => {}
                other => bail!("device {i}: platform token not kept: {other:?}"),
            }
            tokens
                .first()
                .map(|(_, t)| *t)
                .ok_or_else(|| anyhow::anyhow!("device {i}: no token"))
        }));
    }
    let started = Instant::now();
    let mut out = Vec::with_capacity(tasks.len());
    for (k, t) in tasks.into_iter().enumerate() {
        out.push(t.await??);
        if (k + 1) % 1000 == 0 {
            println!(
                "loadsim: {} devices asleep with APNs tokens, {:.0} s",
                k + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(out)
}

#[allow(clippy::print_stdout)]
pub async fn run(args: UpstreamLoad) -> Result<()> {
    if args.devices == 0 || args.rate == 0 || args.seconds == 0 {
        bail!("--devices, --rate and --seconds must be positive");
    }
    let sink = Arc::new(Sink::default());
    start_sink(&args, sink.clone()).await?;
    println!(
        "loadsim: APNs stand-in on {}; {} devices going to sleep",
        args.sink_listen, args.devices
    );
    let tokens = Arc::new(sleepers(&args).await?);
    // Their links close; let the courier see them go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let provider_key = read_pkcs8(&args.provider.provider_key)?;
    let roots = crate::tls::roots(&args.data.join("ca.pem"))?;
    let mut senders = Vec::new();
    for _ in 0..args.provider.provider_connections.max(1) {
        let http = Http2::connect(args.provider_addr, "localhost", roots.clone()).await?;
        senders.push(ApnsSender::new(
            http,
            provider_key.clone(),
            &args.provider.key_id,
            &args.provider.team_id,
        ));
    }

    // Phase 1: throughput.
    let before = sink.taken.load(Ordering::Relaxed);
    let started = unix_nanos();
    let p1 = pushes(&args, &senders, &tokens, 0, args.rate, None).await;
    settle(&sink).await;
    let taken1 = sink.taken.load(Ordering::Relaxed) - before;
    // Over the time until the last wake-up reached the stand-in.
    let took = sink.last.load(Ordering::Relaxed).saturating_sub(started);
    let upstream_per_s = taken1 as f64 / (took.max(1) as f64 / 1e9);
    println!(
        "loadsim: phase 1: {:.0} pushes/s accepted, {upstream_per_s:.0} wake-ups/s taken by the stand-in",
        p1.0
    );

    // Phase 2: half of what went up, timed per push.
    let half = (upstream_per_s / 2.0).max(1.0) as u64;
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    sink.record.store(true, Ordering::Relaxed);
    let before = sink.taken.load(Ordering::Relaxed);
    let p2 = pushes(&args, &senders, &tokens, 1, half, Some(acked.clone())).await;
    settle(&sink).await;
    let taken2 = sink.taken.load(Ordering::Relaxed) - before;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let mut early = 0u64;
    {
        let acked = acked.lock().unwrap_or_else(|p| p.into_inner());
        let arrived = sink.arrived.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at) in arrived.iter() {
            if let Some(ok) = acked.get(id) {
                if at < ok {
                    // It left for Apple before the 2xx reached the provider.
                    early += 1;
                }
                let _ = hist.record(at.saturating_sub(*ok).max(1));
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1e6;
    println!();
    println!("| | value |");
    println!("|---|---|");
    println!("| sleeping devices (APNs tokens) | {} |", args.devices);
    println!(
        "| phase 1 offered / accepted (2xx, durable) | {} / {:.0} pushes/s ({} errors) |",
        args.rate, p1.0, p1.1
    );
    println!(
        "| phase 1 wake-ups taken by the APNs stand-in | {upstream_per_s:.0}/s ({taken1} in all) |"
    );
    println!(
        "| phase 2 (half load) offered / accepted | {half} / {:.0} pushes/s ({} errors); {taken2} wake-ups |",
        p2.0, p2.1
    );
    println!(
        "| phase 2 added latency, provider 2xx → at Apple | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.1} ms ({} samples, {early} before the 2xx arrived) |",
        ms(0.5),
        ms(0.9),
        ms(0.99),
        hist.max() as f64 / 1e6,
        hist.len()
    );
    Ok(())
}

/// Waits until the stand-in has taken nothing new for a second (at most
/// 30 s): the wake-ups still owed went up.
async fn settle(sink: &Sink) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = sink.taken.load(Ordering::Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = sink.taken.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Pushes at `rate` for the run's seconds, round-robin over `tokens`;
/// (accepted per second, errors). With `acked`, when each push's 2xx
/// arrived (unix ns) by its id.
#[allow(clippy::print_stdout)]
async fn pushes(
    args: &UpstreamLoad,
    senders: &[ApnsSender],
    tokens: &Arc<Vec<DeviceToken>>,
    phase: u8,
    rate: u64,
    acked: Option<Arc<Mutex<HashMap<String, u64>>>>,
) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let pacer = Pacer::new(rate, args.seconds);
    let start = pacer.start;
    let mut tasks = Vec::new();
    for lane in 0..args.provider.concurrency.max(1) {
        let mut sender = senders[lane % senders.len()].clone();
        let (ok, errors, pacer, tokens) =
            (ok.clone(), errors.clone(), pacer.clone(), tokens.clone());
        let (topic, acked) = (args.provider.topic.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            while let Some(k) = pacer.next().await {
                let token = tokens[(k as usize) % tokens.len()];
                let id = push_id(phase, k);
                let headers = [("apns-priority", "10"), ("apns-id", id.as_str())];
                match sender.push(&token, &topic, &headers, b"{}".to_vec()).await {
                    Ok(r) if r.status == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if let Some(a) = &acked {
                            let now = unix_nanos();
                            a.lock().unwrap_or_else(|p| p.into_inner()).insert(id, now);
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        errors.load(Ordering::Relaxed),
    )
}

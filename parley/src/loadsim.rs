//! `parley loadsim courier`: many devices and a provider against a running
//! courier, with a progress line and a summary.
//!
//! The parent process starts worker processes (itself, with `--worker`),
//! each holding a slice of the devices: TLS devices from their own
//! loopback source address (one address has ~28k ephemeral ports, one
//! process 20k files), QUIC devices multiplexed over a few UDP sockets.
//! Workers print each device's token, then "ready"; the parent samples the
//! courier's resident memory, pushes through the APNs-style API at a target
//! rate (phase 1: throughput), then at half the rate it achieved (phase 2:
//! latency). Each payload carries its send time; workers record
//! provider→device latency in an HDR histogram per phase and hand the
//! buckets to the parent, which merges them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use client_sdk::courier::{ClientEvent, DeviceClient, DeviceCredentials};
use hdrhistogram::Histogram;
use push_courier::provider::{ApnsSender, Http2};
use wire::push::{DeviceToken, NotificationId};

pub mod sfu;
pub mod upstream;

/// The provider the load generators push as.
#[derive(Debug, Args, Clone)]
pub struct Provider {
    /// Provider ES256 private key (PKCS#8 PEM) registered with the courier.
    #[arg(long)]
    pub provider_key: PathBuf,
    #[arg(long, default_value = "LOADTEAM01")]
    pub team_id: String,
    #[arg(long, default_value = "LOADKEY001")]
    pub key_id: String,
    /// The app's topic the provider pushes to.
    #[arg(long, default_value = "com.example.load")]
    pub topic: String,
    /// HTTP/2 connections the provider pushes over.
    #[arg(long, default_value_t = 8)]
    pub provider_connections: usize,
    /// Pushes in flight at once.
    #[arg(long, default_value_t = 512)]
    pub concurrency: usize,
}

#[derive(Debug, Args, Clone)]
pub struct CourierLoad {
    /// Data directory of the courier: device certificates are issued from
    /// its CA (as `ids` does), and its ca.pem is trusted.
    #[arg(long, default_value = "./parley-data")]
    pub data: PathBuf,
    /// Courier device address (TLS and QUIC); several (comma-separated)
    /// for the nodes of a cluster: device i connects to the (i mod n)th.
    #[arg(long, default_value = "127.0.0.1:5223", value_delimiter = ',')]
    pub device_addr: Vec<SocketAddr>,
    /// Courier provider address (HTTPS); several (comma-separated) for
    /// the nodes of a cluster: the provider connections are spread over
    /// them, so most pushes reach a node that does not hold the device.
    #[arg(long, default_value = "127.0.0.1:8443", value_delimiter = ',')]
    pub provider_addr: Vec<SocketAddr>,
    #[command(flatten)]
    pub provider: Provider,
    /// Devices to connect.
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Share of devices on QUIC, in percent; the rest use TLS over TCP.
    #[arg(long, default_value_t = 85)]
    pub quic_percent: u8,
    /// Share of devices, in percent, that disconnect once they have their
    /// token: pushes to them are only stored (the store path alone).
    #[arg(long, default_value_t = 0)]
    pub offline_percent: u8,
    /// Worker processes holding the devices. [default: enough for 15,000 TLS devices each, at least 2]
    #[arg(long)]
    pub procs: Option<usize>,
    /// Phase 1 push rate (pushes/s offered).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Seconds per phase.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// The courier's process id (ids, comma-separated, for a cluster), to
    /// report its memory per connection.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Device connections opened at once per worker.
    #[arg(long, default_value_t = 64)]
    pub connect_parallelism: usize,
    /// A cluster node's process id: after the two phases, a third at half
    /// load during which this process is killed (SIGKILL). Providers
    /// retry refused pushes with the same id at the other nodes, devices
    /// reconnect to the next address, and the report says how long after
    /// the kill every acknowledged push had reached its device, and
    /// whether any was lost or came twice.
    #[arg(long)]
    pub kill_pid: Option<u32>,
    /// Internal: run as worker INDEX of COUNT.
    #[arg(long, hide = true, num_args = 2, value_names = ["INDEX", "COUNT"])]
    pub worker: Option<Vec<usize>>,
}

pub fn run(args: CourierLoad) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.worker.clone() {
        Some(w) => rt.block_on(worker(args, w[0], w[1])),
        None => rt.block_on(parent(args)),
    }
}

pub fn run_sfu(args: sfu::SfuLoad) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(sfu::run(args))
}

pub fn run_upstream(args: upstream::UpstreamLoad) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(upstream::run(args))
}

/// Hands out push numbers 0..total, each when it is due at `rate` per
/// second from the start, to any number of lanes pushing at once.
struct Pacer {
    issued: AtomicU64,
    total: u64,
    rate: u64,
    start: Instant,
}

impl Pacer {
    fn new(rate: u64, seconds: u64) -> Arc<Pacer> {
        Arc::new(Pacer {
            issued: AtomicU64::new(0),
            total: rate * seconds,
            rate: rate.max(1),
            start: Instant::now(),
        })
    }

    /// The next push's number once it is due; `None` when all are out.
    async fn next(&self) -> Option<u64> {
        let k = self.issued.fetch_add(1, Ordering::Relaxed);
        if k >= self.total {
            return None;
        }
        let due = self.start + Duration::from_secs_f64(k as f64 / self.rate as f64);
        // A push already due goes now: a timer would wait for the
        // runtime's next tick.
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        Some(k)
    }
}

/// The apns-id of push `k` of `phase`.
fn push_id(phase: u8, k: u64) -> String {
    let mut id = [0u8; 16];
    id[0] = phase;
    id[8..].copy_from_slice(&k.to_be_bytes());
    NotificationId(id).to_uuid()
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Devices of worker `i` of `n`: (first index, count).
fn slice(total: usize, i: usize, n: usize) -> (usize, usize) {
    let base = total / n;
    let extra = total % n;
    let start = i * base + i.min(extra);
    (start, base + usize::from(i < extra))
}

fn is_quic(index: usize, percent: u8) -> bool {
    (index % 100) < usize::from(percent)
}

/// The provider's ES256 key as PKCS#8 DER, from a PEM file.
fn read_pkcs8(path: &std::path::Path) -> Result<Vec<u8>> {
    match crate::tls::private_key(path)? {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => Ok(k.secret_pkcs8_der().to_vec()),
        _ => bail!("{} is not a PKCS#8 PEM private key", path.display()),
    }
}

// ---------------------------------------------------------------- worker

/// Throughput, half load, and (with `--kill-pid`) half load while a node
/// dies.
const PHASES: usize = 3;

#[derive(Default)]
struct WorkerStats {
    received: AtomicU64,
    /// Notifications a device got again after acking them.
    duplicates: AtomicU64,
    /// Device links made again after their node went away.
    reconnected: AtomicU64,
    connected: AtomicU64,
    failed: AtomicU64,
    offline: AtomicU64,
    closed: AtomicU64,
}

async fn worker(args: CourierLoad, index: usize, count: usize) -> Result<()> {
    let (start, n) = slice(args.devices, index, count);
    let ca_pem = std::fs::read_to_string(args.data.join("ca.pem"))?;
    let ca_key = std::fs::read_to_string(args.data.join("ca-key.pem"))
        .context("the load simulator issues device certificates from ca-key.pem")?;
    let ca = ids::certs::DeviceCa::from_pem(&ca_pem, &ca_key)?;
    let roots = crate::tls::roots(&args.data.join("ca.pem"))?;
    // One device key for all simulated devices (certificates still differ
    // per device id): key generation is not what is being measured.
    let key = wire::SigningKey::generate();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    // TLS devices bind a source address of their own per worker so that
    // ephemeral ports do not run out; QUIC shares a few UDP sockets.
    let tls_source = IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        1 + (index / 250) as u8,
        1 + (index % 250) as u8,
    ));
    let hist: Arc<Mutex<[Histogram<u64>; PHASES]>> = Arc::new(Mutex::new([
        Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
        Histogram::new_with_bounds(1, 60_000_000_000, 3)?,
    ]));
    let stats = Arc::new(WorkerStats::default());
    let quic_eps: Vec<quinn::Endpoint> = {
        let quic_n = (start..start + n)
            .filter(|i| is_quic(*i, args.quic_percent))
            .count();
        let k = quic_n.div_ceil(4096).max(1);
        (0..k)
            .map(|_| {
                quinn::Endpoint::client(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + (index % 250) as u8)),
                    0,
                ))
            })
            .collect::<std::io::Result<_>>()?
    };
    let sem = Arc::new(tokio::sync::Semaphore::new(args.connect_parallelism));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let mut tasks = Vec::with_capacity(n);
    for (k, i) in (start..start + n).enumerate() {
        let device = wire::DeviceId({
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            b[8..].copy_from_slice(b"loadsim!");
            b
        });
        let mut serial = [0u8; 16];
        serial[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let (_, pem) = ca.issue(device, &key.public(), serial, now)?;
        let chain = rustls_pemfile::certs(&mut pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
        let creds = DeviceCredentials {
            chain,
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into()),
            roots: roots.clone(),
            server_name: "localhost".into(),
        };
        let quic = is_quic(i, args.quic_percent).then(|| quic_eps[k % quic_eps.len()].clone());
        let (sem, hist, stats, out) = (sem.clone(), hist.clone(), stats.clone(), out.clone());
        let (addrs, topic) = (args.device_addr.clone(), args.provider.topic.clone());
        let offline = args.offline_percent;
        tasks.push(tokio::spawn(async move {
            let permit = sem.acquire_owned().await;
            let mut tries = 0;
            let mut at = i % addrs.len();
            let connect = async |addr: SocketAddr| match &quic {
                Some(ep) => DeviceClient::connect_quic_on(ep, addr, &creds, &[&topic], 0).await,
                None => DeviceClient::connect_from(tls_source, addr, &creds, &[&topic], 0).await,
            };
            let conn = loop {
                match connect(addrs[at]).await {
                    Ok(c) => break Some(c),
                    Err(_) if tries < 5 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
                    }
                    Err(e) => {
                        eprintln!("device {i}: {e}");
                        break None;
                    }
                }
            };
            drop(permit);
            let Some((mut dev, tokens)) = conn else {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                return;
            };
            if let Some((_, t)) = tokens.first() {
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(o, "token {}", t.to_hex());
            }
            if (i * 7 % 100) < usize::from(offline) {
                stats.offline.fetch_add(1, Ordering::Relaxed);
                return;
            }
            stats.connected.fetch_add(1, Ordering::Relaxed);
            // Ids seen, across reconnections: a push delivered again after
            // its ack is counted, not played twice.
            let mut seen = std::collections::HashSet::new();
            loop {
                while let Some(ev) = dev.next().await {
                    match ev {
                        ClientEvent::Notification(n) => {
                            let now = unix_nanos();
                            let _ = dev.ack(&[n.id]).await;
                            if !seen.insert(n.id) {
                                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            stats.received.fetch_add(1, Ordering::Relaxed);
                            if let Some((phase, sent)) = parse_payload(&n.payload) {
                                let mut h = hist.lock().unwrap_or_else(|p| p.into_inner());
                                if let Some(h) = h.get_mut(phase) {
                                    let _ = h.record(now.saturating_sub(sent).max(1));
                                }
                            }
                        }
                        ClientEvent::Closed(_) => break,
                        _ => {}
                    }
                }
                stats.closed.fetch_add(1, Ordering::Relaxed);
                // The node went away: the next address, with backoff, as
                // the SDK does (bounded: a minute of tries).
                let mut reconnected = None;
                for k in 1..=60u64 {
                    at = (at + 1) % addrs.len();
                    tokio::time::sleep(Duration::from_millis(100 * k.min(10))).await;
                    if let Ok((d, _)) = connect(addrs[at]).await {
                        reconnected = Some(d);
                        break;
                    }
                }
                match reconnected {
                    Some(d) => {
                        dev = d;
                        stats.reconnected.fetch_add(1, Ordering::Relaxed);
                    }
                    None => return,
                }
            }
        }));
    }
    // Progress until every device tried, then "ready".
    loop {
        let c = stats.connected.load(Ordering::Relaxed);
        let f = stats.failed.load(Ordering::Relaxed);
        let off = stats.offline.load(Ordering::Relaxed);
        {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(o, "connected {c} failed {f}");
            let _ = o.flush();
        }
        if c + f + off >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    {
        let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(o, "ready");
        let _ = o.flush();
    }
    // Report on request (a line on stdin), until stdin closes.
    let stdin = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    });
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stdin);
    loop {
        tokio::select! {
            _ = &mut stdin => break,
            _ = tick.tick() => {
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                let _ = writeln!(o, "received {} closed {} duplicates {} reconnected {}", stats.received.load(Ordering::Relaxed), stats.closed.load(Ordering::Relaxed), stats.duplicates.load(Ordering::Relaxed), stats.reconnected.load(Ordering::Relaxed));
                let _ = o.flush();
            }
        }
    }
    let h = hist.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
    for (phase, h) in h.iter().enumerate() {
        for v in h.iter_recorded() {
            let _ = writeln!(
                o,
                "hist {phase} {} {}",
                v.value_iterated_to(),
                v.count_at_value()
            );
        }
    }
    let _ = writeln!(
        o,
        "final received {} closed {} duplicates {} reconnected {}",
        stats.received.load(Ordering::Relaxed),
        stats.closed.load(Ordering::Relaxed),
        stats.duplicates.load(Ordering::Relaxed),
        stats.reconnected.load(Ordering::Relaxed)
    );
    let _ = o.flush();
    std::process::exit(0);
}

fn parse_payload(p: &[u8]) -> Option<(usize, u64)> {
    // {"p":1,"t":123}
    let s = std::str::from_utf8(p).ok()?;
    let phase = s
        .split("\"p\":")
        .nth(1)?
        .split([',', '}'])
        .next()?
        .parse::<usize>()
        .ok()?;
    let t = s
        .split("\"t\":")
        .nth(1)?
        .split([',', '}'])
        .next()?
        .parse::<u64>()
        .ok()?;
    Some((phase.min(PHASES - 1), t))
}

// ---------------------------------------------------------------- parent

struct Worker {
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Shared {
    tokens: Vec<DeviceToken>,
    connected: HashMap<usize, (u64, u64)>,
    received: HashMap<usize, u64>,
    duplicates: HashMap<usize, u64>,
    reconnected: HashMap<usize, u64>,
    ready: usize,
    hist: Vec<(usize, u64, u64)>,
    finals: usize,
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The resident memory of all of `pids`, if every one can be read.
fn rss_total(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// Addresses as a comma-separated list, as the flags take them.
fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[allow(clippy::print_stdout)]
async fn parent(args: CourierLoad) -> Result<()> {
    if args.devices == 0 || args.quic_percent > 100 {
        bail!("--devices must be positive and --quic-percent at most 100");
    }
    if args.device_addr.is_empty() || args.provider_addr.is_empty() {
        bail!("--device-addr and --provider-addr need at least one address");
    }
    let tls_devices = args.devices - args.devices * usize::from(args.quic_percent) / 100;
    let procs = args
        .procs
        .unwrap_or_else(|| tls_devices.div_ceil(15_000).max(2))
        .clamp(1, 250);
    let provider_key = read_pkcs8(&args.provider.provider_key)?;
    let rss_before = rss_total(&args.server_pid);
    println!(
        "loadsim: {} devices ({}% QUIC) over {procs} worker processes against {}",
        args.devices,
        args.quic_percent,
        list(&args.device_addr)
    );
    let exe = std::env::current_exe()?;
    let shared = Arc::new(Mutex::new(Shared::default()));
    let mut workers = Vec::new();
    for i in 0..procs {
        let mut cmd = Command::new(&exe);
        cmd.args(["loadsim", "courier"])
            .arg("--data")
            .arg(&args.data)
            .arg("--device-addr")
            .arg(list(&args.device_addr))
            .arg("--provider-key")
            .arg(&args.provider.provider_key)
            .arg("--topic")
            .arg(&args.provider.topic)
            .arg("--devices")
            .arg(args.devices.to_string())
            .arg("--quic-percent")
            .arg(args.quic_percent.to_string())
            .arg("--offline-percent")
            .arg(args.offline_percent.to_string())
            .arg("--connect-parallelism")
            .arg(args.connect_parallelism.to_string())
            .arg("--worker")
            .arg(i.to_string())
            .arg(procs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("cannot start a loadsim worker")?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("worker stdout"))?;
        let shared = shared.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                let w: Vec<&str> = line.split_whitespace().collect();
                match w.as_slice() {
                    ["token", hex] => {
                        if let Some(t) = DeviceToken::from_hex(hex) {
                            s.tokens.push(t);
                        }
                    }
                    ["connected", c, "failed", f] => {
                        s.connected
                            .insert(i, (c.parse().unwrap_or(0), f.parse().unwrap_or(0)));
                    }
                    ["ready"] => s.ready += 1,
                    ["received", r, "closed", _, "duplicates", d, "reconnected", c] => {
                        s.received.insert(i, r.parse().unwrap_or(0));
                        s.duplicates.insert(i, d.parse().unwrap_or(0));
                        s.reconnected.insert(i, c.parse().unwrap_or(0));
                    }
                    ["hist", p, v, c] => {
                        let t = (
                            p.parse().unwrap_or(0),
                            v.parse().unwrap_or(0),
                            c.parse().unwrap_or(0),
                        );
                        s.hist.push(t);
                    }
                    ["final", "received", r, "closed", _, "duplicates", d, "reconnected", c] => {
                        s.received.insert(i, r.parse().unwrap_or(0));
                        s.duplicates.insert(i, d.parse().unwrap_or(0));
                        s.reconnected.insert(i, c.parse().unwrap_or(0));
                        s.finals += 1;
                    }
                    _ => {}
                }
            }
        });
        workers.push(Worker { child });
    }

    // Connect phase.
    let started = Instant::now();
    let connect_deadline = started + Duration::from_secs(60 + args.devices as u64 / 200);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (c, f, ready) = {
            let s = shared.lock().unwrap_or_else(|p| p.into_inner());
            let (c, f) = s
                .connected
                .values()
                .fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
            (c, f, s.ready)
        };
        let secs = started.elapsed().as_secs_f64();
        println!(
            "loadsim: connecting {c}/{} ({f} failed) {:.0}/s, {:.0} s",
            args.devices,
            c as f64 / secs,
            secs
        );
        if ready == procs {
            break;
        }
        if Instant::now() > connect_deadline {
            bail!("devices did not all connect in time ({c} connected, {f} failed)");
        }
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Let the courier settle, then sample its memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (held, failed) = {
        let s = shared.lock().unwrap_or_else(|p| p.into_inner());
        s.connected
            .values()
            .fold((0u64, 0u64), |a, v| (a.0 + v.0, a.1 + v.1))
    };
    let rss_after = rss_total(&args.server_pid);
    let server_files = args
        .server_pid
        .iter()
        .map(|p| std::fs::read_dir(format!("/proc/{p}/fd")).map(|d| d.count()))
        .sum::<std::io::Result<usize>>()
        .ok()
        .filter(|_| !args.server_pid.is_empty());
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if held > 0 => Some((a.saturating_sub(b)) as f64 * 1024.0 / held as f64),
        _ => None,
    };
    println!(
        "loadsim: {held} connections held ({failed} failed) after {connect_secs:.0} s; courier RSS {} -> {} KiB{}",
        rss_before.map_or("?".into(), |v| v.to_string()),
        rss_after.map_or("?".into(), |v| v.to_string()),
        per_conn.map_or(String::new(), |b| format!(", {:.0} bytes per connection", b))
    );

    let tokens: Arc<Vec<DeviceToken>> = Arc::new(
        shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .clone(),
    );
    if tokens.is_empty() {
        bail!("no device tokens");
    }
    let roots = crate::tls::roots(&args.data.join("ca.pem"))?;
    let mut senders = Vec::new();
    for k in 0..args
        .provider
        .provider_connections
        .max(args.provider_addr.len())
    {
        let addr = args.provider_addr[k % args.provider_addr.len()];
        let http = Http2::connect(addr, "localhost", roots.clone()).await?;
        senders.push(ApnsSender::new(
            http,
            provider_key.clone(),
            &args.provider.key_id,
            &args.provider.team_id,
        ));
    }

    // Phase 1: throughput at the offered rate; phase 2: half of what phase 1 achieved.
    let p1 = push_phase(&args, &senders, &tokens, 0, args.rate, &shared).await;
    let half = (p1.accepted_per_s / 2.0).max(1.0) as u64;
    let p2 = push_phase(&args, &senders, &tokens, 1, half, &shared).await;
    // Phase 3: half load again, and a node killed a third of the way in.
    let failover = match args.kill_pid {
        None => None,
        Some(pid) => {
            let after = Duration::from_secs(args.seconds) / 3;
            let killer = tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                println!("loadsim: killed {pid} (SIGKILL)");
                Instant::now()
            });
            let p3 = push_phase(&args, &senders, &tokens, 2, half, &shared).await;
            let killed = killer.await?;
            // Until every acknowledged push has reached its device (or a
            // minute has passed: the rest are lost).
            let accepted = p1.accepted + p2.accepted + p3.accepted;
            let delivered = || -> u64 {
                let s = shared.lock().unwrap_or_else(|p| p.into_inner());
                s.received.values().sum()
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            while delivered() < accepted && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let all_in = (delivered() >= accepted).then(|| killed.elapsed());
            Some((p3, all_in, after))
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Collect histograms.
    for w in &mut workers {
        if let Some(mut stdin) = w.child.stdin.take() {
            let _ = writeln!(stdin, "report");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.lock().unwrap_or_else(|p| p.into_inner()).finals < procs
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = shared.lock().unwrap_or_else(|p| p.into_inner());
    let mut hists = [
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?,
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?,
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?,
    ];
    for (p, v, c) in &s.hist {
        if let Some(h) = hists.get_mut(*p) {
            let _ = h.record_n(*v, *c);
        }
    }
    let received: u64 = s.received.values().sum();
    let duplicates: u64 = s.duplicates.values().sum();
    let reconnected: u64 = s.reconnected.values().sum();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e6;
    println!();
    println!("| | value |");
    println!("|---|---|");
    println!(
        "| devices connected | {held} ({failed} failed), {:.0}/s |",
        held as f64 / connect_secs
    );
    println!(
        "| transports | {}% QUIC, the rest TLS over TCP, {procs} worker processes |",
        args.quic_percent
    );
    if args.offline_percent > 0 {
        println!(
            "| offline devices (pushes only stored) | {}% |",
            args.offline_percent
        );
    }
    if let Some(f) = server_files {
        println!("| courier open files while connected | {f} |");
    }
    if let Some(b) = per_conn {
        println!(
            "| courier memory per idle connection | {:.1} KiB (RSS {} → {} KiB) |",
            b / 1024.0,
            rss_before.unwrap_or(0),
            rss_after.unwrap_or(0)
        );
    }
    println!(
        "| phase 1 offered | {} pushes/s for {} s |",
        args.rate, args.seconds
    );
    println!(
        "| phase 1 accepted (2xx, durable) | {:.0} pushes/s ({} errors) |",
        p1.accepted_per_s, p1.errors
    );
    println!(
        "| phase 2 (half load) offered | {half} pushes/s, accepted {:.0}/s |",
        p2.accepted_per_s
    );
    for (i, h) in hists.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        println!(
            "| phase {} provider→device latency | p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.1} ms ({} samples) |",
            i + 1,
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            h.max() as f64 / 1e6,
            h.len()
        );
    }
    let mut accepted = p1.accepted + p2.accepted;
    if let Some((p3, all_in, after)) = &failover {
        accepted += p3.accepted;
        println!(
            "| phase 3 (half load, a node killed after {} s) | accepted {:.0}/s ({} given up after 20 s of retries) |",
            after.as_secs(),
            p3.accepted_per_s,
            p3.errors
        );
        println!("| devices reconnected to another node | {reconnected} |");
        println!(
            "| kill → every acknowledged push delivered | {} |",
            all_in.map_or("not within 60 s".into(), |d| format!(
                "{:.1} s (1 s resolution)",
                d.as_secs_f64()
            ))
        );
    }
    println!(
        "| delivered to devices | {received} of {accepted} accepted, {} lost, {duplicates} delivered again after their ack |",
        accepted.saturating_sub(received)
    );
    Ok(())
}

struct PhaseResult {
    accepted: u64,
    accepted_per_s: f64,
    errors: u64,
}

#[allow(clippy::print_stdout)]
async fn push_phase(
    args: &CourierLoad,
    senders: &[ApnsSender],
    tokens: &Arc<Vec<DeviceToken>>,
    phase: usize,
    rate: u64,
    shared: &Arc<Mutex<Shared>>,
) -> PhaseResult {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let pacer = Pacer::new(rate, args.seconds);
    let start = pacer.start;
    let lanes = args.provider.concurrency.max(1);
    let mut tasks = Vec::new();
    // While a node dies (phase 3) a refused push is sent again with the
    // same id at the next node, as a provider retrying 5xx and timeouts
    // does; otherwise a refusal is an error.
    let retry = phase == 2;
    for lane in 0..lanes {
        let mut at = lane % senders.len();
        let mut sender = senders[at].clone();
        let senders = senders.to_vec();
        let (ok, errors, pacer, tokens) =
            (ok.clone(), errors.clone(), pacer.clone(), tokens.clone());
        let topic = args.provider.topic.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(k) = pacer.next().await {
                let token = tokens[(k as usize) % tokens.len()];
                let payload = format!("{{\"p\":{phase},\"t\":{}}}", unix_nanos()).into_bytes();
                let id = push_id(phase as u8, k);
                let headers = [("apns-priority", "10"), ("apns-id", id.as_str())];
                for attempt in 0.. {
                    match sender.push(&token, &topic, &headers, payload.clone()).await {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        _ if retry && attempt < 80 => {
                            at = (at + 1) % senders.len();
                            sender = senders[at].clone();
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    let progress = {
        let (ok, errors) = (ok.clone(), errors.clone());
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let o = ok.load(Ordering::Relaxed);
                let r: u64 = shared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .received
                    .values()
                    .sum();
                println!(
                    "loadsim: phase {} {:.0} s: accepted {}/s, {} errors, delivered {r} total",
                    phase + 1,
                    start.elapsed().as_secs_f64(),
                    o - last,
                    errors.load(Ordering::Relaxed)
                );
                last = o;
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    progress.abort();
    let secs = start.elapsed().as_secs_f64();
    let accepted = ok.load(Ordering::Relaxed);
    PhaseResult {
        accepted,
        accepted_per_s: accepted as f64 / secs,
        errors: errors.load(Ordering::Relaxed),
    }
}

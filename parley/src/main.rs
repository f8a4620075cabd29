//! `parley`: runs Parley's services, all in one process (`parley up`) or
//! one at a time (`parley turn`).

mod admin;
mod client;
mod config;
mod data;
mod demo;
mod loadsim;
mod revocations;
#[cfg(feature = "sound-card")]
mod sound;
mod stack;
mod tls;
mod wiring;

use anyhow::{Context, Result};

/// mimalloc instead of glibc's allocator: per-request allocations from
/// many threads were a quarter of the courier's CPU under load, and its
/// pages return to the system more readily with 100k connections.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use stun_turn::runtime::{Relay, ALPN_STUN_TURN};
use toml::Value;

/// Parley: self-hostable calling and push infrastructure.
///
/// Configuration comes from a TOML file (--config), then PARLEY_* environment
/// variables (PARLEY_TURN_REALM is turn.realm), then flags, each overriding the
/// one before. On first start the data directory gets a development CA, a
/// server certificate for localhost and a TURN REST secret.
#[derive(Debug, Parser)]
#[command(name = "parley", version, propagate_version = true)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "PARLEY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory: CA, certificates, secrets. [default: ./parley-data]
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Admin listener for /metrics, /healthz and /readyz. [default: 127.0.0.1:9090]
    #[arg(long, global = true, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// Log filter, e.g. `info`, `debug`, `stun_turn=trace`. [default: info;
    /// warn for `parley client`]
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    /// NATS server URL(s), comma-separated: run as one node of a cluster
    /// on PostgreSQL and NATS (see [cluster]). [default: none, one node]
    #[arg(long = "cluster-nats", global = true, value_name = "URL")]
    cluster_nats: Option<String>,
    /// This node's name in the cluster. [default: the data directory's node-id]
    #[arg(long = "cluster-node", global = true, value_name = "NAME")]
    cluster_node: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service in one process on the data directory.
    ///
    /// The STUN/TURN relay on 3478 (UDP and TCP) and 5349 (TLS), the
    /// identity service on 8444 (HTTPS), the push courier on 5223 (devices,
    /// TLS and QUIC) and 8443 (providers, HTTPS), SIP signaling on 5060
    /// (UDP and TCP), 5061 (TLS) and 8445 (secure WebSocket), and the SFU
    /// for group calls on 5004 (media, UDP) and 8446 (join API, HTTPS).
    Up(Box<UpArgs>),
    /// Run the STUN/TURN relay alone.
    ///
    /// STUN (RFC 8489) and TURN (RFC 8656, RFC 6156) on UDP, TCP and TLS, with
    /// long-term and coturn-style REST credentials. Peers on loopback, private
    /// and other special-purpose addresses are refused unless --allow-peer
    /// names them. SIGHUP reloads credentials and certificates; SIGTERM drains.
    Turn(TurnArgs),
    /// Run the identity service alone.
    ///
    /// HTTPS JSON API on 8444: proves phone numbers and emails with codes
    /// (written to <data>/outbox/ by default), registers devices under
    /// account-signed device lists, issues device certificates from the
    /// data directory's CA, and serves lookups with key transparency proofs
    /// (akd). The OpenAPI document is at /v1/openapi.json.
    Ids(IdsArgs),
    /// Run the push courier alone.
    ///
    /// Devices hold one connection each on 5223 (TLS 1.3 over TCP, or QUIC),
    /// ALPN parley-push/1, authenticated by the device certificate the
    /// identity service issued (the data directory's CA). Providers push on
    /// 8443 over HTTP/2 or HTTP/1.1: the APNs-compatible API
    /// (POST /3/device/<token>, ES256 provider tokens or client
    /// certificates) and Web Push (RFC 8030, VAPID, aes128gcm). A push
    /// answered 2xx is in the database (courier.db) first and survives a
    /// crash; offline devices get their queue when they reconnect.
    Courier(CourierArgs),
    /// Run the SIP registrar and forking proxy alone.
    ///
    /// SIP (RFC 3261) on 5060 (UDP and TCP), 5061 (TLS 1.3) and 8445 (secure
    /// WebSocket, RFC 7118). Handles
    /// register as sip:<handle>@<domain> (an E.164 number, or an email with
    /// its @ written %40) with a device certificate or a digest account
    /// ([[signaling.accounts]]); an INVITE to a handle rings every
    /// registered device at once, the first answer cancels the others
    /// ("Call completed elsewhere") and a decline ends the call everywhere.
    Signaling(SignalingArgs),
    /// Run the selective forwarding unit for group calls alone.
    ///
    /// Participants join a room through the HTTPS API on 8446 (POST
    /// /v1/rooms/<room>/participants with an SDP offer and a room token
    /// signaling made), then send and receive media on UDP 5004 (ICE lite,
    /// DTLS-SRTP; with more than one media loop, on the ports after it
    /// too, a room on one of them). Media is SFrame-encrypted end to end: the SFU forwards
    /// it without reading it, choosing per participant the latest speakers
    /// and the simulcast layer its bandwidth allows.
    Sfu(SfuArgs),
    /// Show a whole call: the stack in this process, three devices, one call.
    ///
    /// Starts every service on free loopback ports with a temporary data
    /// directory and activates Alice (one device) and Bob (a laptop, and a
    /// phone approved by it that is asleep with only its courier link).
    /// Alice calls Bob: both of Bob's devices ring (the phone woken by a
    /// VoIP push), the laptop answers, the phone hears "answered
    /// elsewhere", a tone and an H.264 test pattern flow each way through
    /// the relay, end to end encrypted, then Alice hangs up. Prints a
    /// timeline and the call's statistics; exits 0 only if each side
    /// detected the other's tone and decoded the other's test pattern, and
    /// the relay carried nothing but STUN, DTLS and SRTP.
    Demo(demo::DemoArgs),
    /// A desktop device against `parley up`: activate, approve, call, listen.
    ///
    /// Keeps its identity key, account key and device certificate in
    /// --state. `activate` proves a handle (or joins an account with a link
    /// code from `approve` on an existing device); `call` dials a handle
    /// and `listen` takes calls. Audio comes from a WAV file (--play) or a
    /// tone (--tone) and what the far end says goes to a WAV file
    /// (--record). Every key is checked against the key transparency
    /// directory before it is used.
    Client(client::ClientArgs),
    /// Load generators (not tests): drive a running service and report.
    #[command(subcommand)]
    Loadsim(Loadsim),
}

#[derive(Debug, Subcommand)]
enum Loadsim {
    /// Connect many devices to a running courier, push at a rate through the
    /// APNs-style API, and report connections held, courier memory per
    /// connection, accepted pushes/s and provider→device latency.
    ///
    /// Device certificates are issued from <data>/ca-key.pem, as ids issues
    /// them; the provider key must be registered in [[courier.providers]].
    /// TLS devices come from 127.0.1.x source addresses (one per worker
    /// process), QUIC devices share a few UDP sockets per worker.
    Courier(loadsim::CourierLoad),
    /// Wake-ups through Apple: play an APNs stand-in, devices asleep with
    /// APNs tokens, and a provider, against a running courier whose
    /// [courier.upstream.apns] points at the stand-in; report wake-ups/s
    /// taken and the latency from the provider's 2xx to Apple.
    Upstream(loadsim::upstream::UpstreamLoad),
    /// Rooms of participants that each send audio and one video layer and
    /// take the others', against the Parley SFU or Janus's VideoRoom (the
    /// same load): report packets forwarded per second, the SFU's CPU per
    /// forwarded packet (--sfu-pid), latency p50/p99 and loss. Payloads
    /// are opaque, as SFrame ciphertext is; no codecs run.
    Sfu(loadsim::sfu::SfuLoad),
}

#[derive(Debug, Args, Default)]
struct CourierArgs {
    /// Device listen address, TCP (TLS) and UDP (QUIC). [default: 0.0.0.0:5223]
    #[arg(long = "courier-device-listen", value_name = "ADDR")]
    device_listen: Option<SocketAddr>,
    /// Provider HTTPS listen address. [default: 0.0.0.0:8443]
    #[arg(long = "courier-provider-listen", value_name = "ADDR")]
    provider_listen: Option<SocketAddr>,
    /// Courier database: sqlite://PATH or postgres://URL. [default: sqlite in the data directory]
    #[arg(long = "courier-database", value_name = "URL")]
    database: Option<String>,
}

impl CourierArgs {
    fn overrides(&self) -> Vec<(String, Value)> {
        let mut o = Vec::new();
        if let Some(a) = self.device_listen {
            o.push(("courier.device_listen".into(), Value::String(a.to_string())));
        }
        if let Some(a) = self.provider_listen {
            o.push((
                "courier.provider_listen".into(),
                Value::String(a.to_string()),
            ));
        }
        if let Some(d) = &self.database {
            o.push(("courier.database".into(), Value::String(d.clone())));
        }
        o
    }
}

#[derive(Debug, Args, Default)]
struct SignalingArgs {
    /// SIP UDP and TCP listen address; repeat for several. [default: 0.0.0.0:5060]
    #[arg(long = "sip-listen", value_name = "ADDR")]
    sip_listen: Vec<SocketAddr>,
    /// SIP TLS listen address. [default: 0.0.0.0:5061]
    #[arg(long = "sip-tls-listen", value_name = "ADDR")]
    sip_tls_listen: Vec<SocketAddr>,
    /// SIP secure WebSocket listen address (RFC 7118). [default: 0.0.0.0:8445]
    #[arg(long = "sip-wss-listen", value_name = "ADDR")]
    sip_wss_listen: Vec<SocketAddr>,
    /// Domain of the addresses-of-record; repeat for several. [default: localhost]
    #[arg(long = "sip-domain", value_name = "DOMAIN")]
    sip_domains: Vec<String>,
    /// Address peers reach us at, for Via and Record-Route. [default: the listen address]
    #[arg(long = "sip-advertise", value_name = "IP")]
    sip_advertise: Option<std::net::IpAddr>,
}

impl SignalingArgs {
    fn overrides(&self) -> Vec<(String, Value)> {
        let mut o = Vec::new();
        let list = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        if !self.sip_listen.is_empty() {
            o.push((
                "signaling.listen".into(),
                list(self.sip_listen.iter().map(ToString::to_string).collect()),
            ));
        }
        if !self.sip_tls_listen.is_empty() {
            o.push((
                "signaling.tls".into(),
                list(
                    self.sip_tls_listen
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ),
            ));
        }
        if !self.sip_wss_listen.is_empty() {
            o.push((
                "signaling.wss".into(),
                list(
                    self.sip_wss_listen
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                ),
            ));
        }
        if !self.sip_domains.is_empty() {
            o.push(("signaling.domains".into(), list(self.sip_domains.clone())));
        }
        if let Some(ip) = self.sip_advertise {
            o.push(("signaling.advertise".into(), Value::String(ip.to_string())));
        }
        o
    }
}

#[derive(Debug, Args, Default)]
struct UpArgs {
    #[command(flatten)]
    turn: TurnArgs,
    #[command(flatten)]
    ids: IdsArgs,
    #[command(flatten)]
    courier: CourierArgs,
    #[command(flatten)]
    signaling: SignalingArgs,
    #[command(flatten)]
    sfu: SfuArgs,
}

#[derive(Debug, Args, Default)]
struct SfuArgs {
    /// SFU media (ICE, DTLS-SRTP) UDP listen address. [default: 0.0.0.0:5004]
    #[arg(long = "sfu-listen", value_name = "ADDR")]
    sfu_listen: Option<SocketAddr>,
    /// SFU join API (HTTPS) listen address. [default: 0.0.0.0:8446]
    #[arg(long = "sfu-api-listen", value_name = "ADDR")]
    sfu_api_listen: Option<SocketAddr>,
    /// Address participants send media to when --sfu-listen is a wildcard.
    /// [default: 127.0.0.1]
    #[arg(long = "sfu-advertise", value_name = "IP")]
    sfu_advertise: Option<std::net::IpAddr>,
    /// SFU media loops, each with a share of the rooms on a core of its
    /// own and a UDP port of its own (--sfu-listen's, then the next ones).
    /// [default: one per core, up to 8]
    #[arg(long = "sfu-workers", value_name = "N")]
    sfu_workers: Option<usize>,
}

impl SfuArgs {
    fn overrides(&self) -> Vec<(String, Value)> {
        let mut o = Vec::new();
        if let Some(a) = self.sfu_listen {
            o.push(("sfu.listen".into(), Value::String(a.to_string())));
        }
        if let Some(a) = self.sfu_api_listen {
            o.push(("sfu.api_listen".into(), Value::String(a.to_string())));
        }
        if let Some(a) = self.sfu_advertise {
            o.push(("sfu.advertise".into(), Value::String(a.to_string())));
        }
        if let Some(n) = self.sfu_workers {
            o.push(("sfu.workers".into(), Value::Integer(n as i64)));
        }
        o
    }
}

#[derive(Debug, Args, Default)]
struct IdsArgs {
    /// Identity service HTTPS listen address. [default: 0.0.0.0:8444]
    #[arg(long = "ids-listen", value_name = "ADDR")]
    ids_listen: Option<SocketAddr>,
    /// Identity database: sqlite://PATH or postgres://URL. [default: sqlite in the data directory]
    #[arg(long = "ids-database", value_name = "URL")]
    ids_database: Option<String>,
}

impl IdsArgs {
    fn overrides(&self) -> Vec<(String, Value)> {
        let mut o = Vec::new();
        if let Some(a) = self.ids_listen {
            o.push(("ids.listen".into(), Value::String(a.to_string())));
        }
        if let Some(d) = &self.ids_database {
            o.push(("ids.database".into(), Value::String(d.clone())));
        }
        o
    }
}

#[derive(Debug, Args, Default)]
struct TurnArgs {
    /// Realm sent in challenges. [default: parley]
    #[arg(long)]
    realm: Option<String>,
    /// UDP and TCP listen address; repeat for several. [default: 0.0.0.0:3478]
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// TLS listen address (ALPN stun.turn). [default: port 5349 on the listen IPs]
    #[arg(long = "tls-listen", value_name = "ADDR")]
    tls_listen: Vec<SocketAddr>,
    /// IPv4 address relayed allocations bind to. [default: the listen IP, else the default-route interface]
    #[arg(long = "relay-ip", value_name = "IP")]
    relay_ip: Option<std::net::IpAddr>,
    /// IPv6 address for IPv6 and dual-stack allocations. [default: none]
    #[arg(long = "relay-ipv6", value_name = "IP")]
    relay_ipv6: Option<std::net::IpAddr>,
    /// Relay port range, e.g. 49152-65535.
    #[arg(long = "ports", value_name = "MIN-MAX")]
    ports: Option<String>,
    /// Static user `name:password`; repeat for several.
    #[arg(long = "user", value_name = "NAME:PASSWORD")]
    users: Vec<String>,
    /// REST shared secret; repeat to accept several while rotating. [default: the data directory's]
    #[arg(long = "rest-secret", value_name = "SECRET")]
    rest_secrets: Vec<String>,
    /// Allow peers in this prefix even if special-purpose (labs, tests), e.g. 127.0.0.0/8.
    #[arg(long = "allow-peer", value_name = "PREFIX")]
    allow_peers: Vec<String>,
    /// Second address for RFC 5780 NAT behaviour discovery, e.g. 127.0.0.2:3479.
    #[arg(long, value_name = "ADDR")]
    alternate: Option<SocketAddr>,
    /// Worker threads. [default: one per core]
    #[arg(long)]
    workers: Option<usize>,
}

impl TurnArgs {
    fn overrides(&self) -> Result<Vec<(String, Value)>> {
        let mut o = Vec::new();
        let strs =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        let addrs = |v: &[SocketAddr]| {
            Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect())
        };
        if let Some(r) = &self.realm {
            o.push(("turn.realm".into(), Value::String(r.clone())));
        }
        if !self.listen.is_empty() {
            o.push(("turn.listen".into(), addrs(&self.listen)));
        }
        if !self.tls_listen.is_empty() {
            o.push(("turn.tls".into(), addrs(&self.tls_listen)));
        }
        if let Some(ip) = self.relay_ip {
            o.push(("turn.relay_ipv4".into(), Value::String(ip.to_string())));
        }
        if let Some(ip) = self.relay_ipv6 {
            o.push(("turn.relay_ipv6".into(), Value::String(ip.to_string())));
        }
        if let Some(p) = &self.ports {
            let (lo, hi) = p
                .split_once('-')
                .context("--ports: expected MIN-MAX, e.g. 49152-65535")?;
            let lo: u16 = lo.parse().context("--ports: bad minimum port")?;
            let hi: u16 = hi.parse().context("--ports: bad maximum port")?;
            o.push(("turn.min_port".into(), Value::Integer(lo.into())));
            o.push(("turn.max_port".into(), Value::Integer(hi.into())));
        }
        if !self.users.is_empty() {
            o.push(("turn.users".into(), strs(&self.users)));
        }
        if !self.rest_secrets.is_empty() {
            o.push(("turn.rest_secrets".into(), strs(&self.rest_secrets)));
        }
        if !self.allow_peers.is_empty() {
            o.push(("turn.allow_peers".into(), strs(&self.allow_peers)));
        }
        if let Some(a) = self.alternate {
            o.push(("turn.alternate".into(), Value::String(a.to_string())));
        }
        if let Some(w) = self.workers {
            o.push(("turn.workers".into(), Value::Integer(w as i64)));
        }
        Ok(o)
    }
}

fn main() {
    let cli = Cli::parse();
    if let Command::Loadsim(which) = cli.command {
        // A client, not a service: no data directory, config or admin port.
        let r = match which {
            Loadsim::Courier(args) => loadsim::run(args),
            Loadsim::Upstream(args) => loadsim::run_upstream(args),
            Loadsim::Sfu(args) => loadsim::run_sfu(args),
        };
        if let Err(e) = r {
            eprintln!("parley loadsim: {e:#}");
            std::process::exit(2);
        }
        return;
    }
    if let Command::Demo(args) = cli.command {
        // Its own stack, data directory and ports.
        if let Err(e) = demo::run(args) {
            eprintln!("parley demo: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Command::Client(args) = cli.command {
        // A device, not a service: it says what happens on stdout; the
        // log (stderr) carries only what went wrong, unless asked.
        if let Err(e) = init_tracing(cli.log.as_deref().unwrap_or("warn")) {
            eprintln!("parley client: {e:#}");
            std::process::exit(2);
        }
        if let Err(e) = client::run(args, cli.data) {
            eprintln!("parley client: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run(cli) {
        eprintln!("parley: {e:#}");
        std::process::exit(2);
    }
}

/// Which services this process runs.
#[derive(Debug, Clone, Copy)]
struct Services {
    turn: bool,
    ids: bool,
    courier: bool,
    signaling: bool,
    sfu: bool,
}

fn run(cli: Cli) -> Result<()> {
    let empty = TurnArgs::default();
    let only = |turn, ids, courier, signaling| Services {
        turn,
        ids,
        courier,
        signaling,
        sfu: false,
    };
    let (services, turn_args, ids_args, courier_args, sip_args, sfu_args) = match &cli.command {
        Command::Up(a) => (
            Services {
                sfu: true,
                ..only(true, true, true, true)
            },
            &a.turn,
            Some(&a.ids),
            Some(&a.courier),
            Some(&a.signaling),
            Some(&a.sfu),
        ),
        Command::Turn(a) => (only(true, false, false, false), a, None, None, None, None),
        Command::Ids(a) => (
            only(false, true, false, false),
            &empty,
            Some(a),
            None,
            None,
            None,
        ),
        Command::Courier(a) => (
            only(false, false, true, false),
            &empty,
            None,
            Some(a),
            None,
            None,
        ),
        Command::Signaling(a) => (
            only(false, false, false, true),
            &empty,
            None,
            None,
            Some(a),
            None,
        ),
        Command::Sfu(a) => (
            Services {
                sfu: true,
                ..only(false, false, false, false)
            },
            &empty,
            None,
            None,
            None,
            Some(a),
        ),
        Command::Loadsim(_) | Command::Demo(_) | Command::Client(_) => {
            unreachable!("handled in main")
        }
    };
    let mut overrides = turn_args.overrides()?;
    if let Some(a) = ids_args {
        overrides.extend(a.overrides());
    }
    if let Some(a) = courier_args {
        overrides.extend(a.overrides());
    }
    if let Some(a) = sip_args {
        overrides.extend(a.overrides());
    }
    if let Some(a) = sfu_args {
        overrides.extend(a.overrides());
    }
    if let Some(d) = &cli.data {
        overrides.push(("data".into(), Value::String(d.display().to_string())));
    }
    if let Some(a) = cli.admin {
        overrides.push(("admin.listen".into(), Value::String(a.to_string())));
    }
    if let Some(l) = &cli.log {
        overrides.push(("log".into(), Value::String(l.clone())));
    }
    if let Some(n) = &cli.cluster_nats {
        let urls = n.split(',').map(|u| Value::String(u.trim().to_owned()));
        overrides.push(("cluster.nats".into(), Value::Array(urls.collect())));
    }
    if let Some(n) = &cli.cluster_node {
        overrides.push(("cluster.node".into(), Value::String(n.clone())));
    }
    let settings = config::load(cli.config.as_deref(), std::env::vars(), &overrides)?;
    init_tracing(settings.log.as_deref().unwrap_or("info"))?;

    if settings.cluster.enabled() {
        require_postgres(services, &settings)?;
    }
    let data_root = settings
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from("./parley-data"));
    let data = data::open(&data_root)?;
    let turn_config = settings.turn.to_config(&data.turn_secret)?;
    let mut ids_config = settings.ids.to_config(&data.root)?;
    ids_config.turn.secret = Some(data.turn_secret.clone());
    let mut courier_config = settings.courier.to_config(&data.root)?;
    courier_config.cluster = settings.cluster.courier(&data.node_id)?;
    let mut signaling_config = settings.signaling.to_config()?;
    settings.signaling.advertise(&mut signaling_config);
    let sip_secret = (settings.cluster.secret_file.as_ref())
        .or(settings.signaling.secret_file.as_ref())
        .unwrap_or(&data.sip_secret);
    let sip_secret = data::sip_secret(sip_secret)?;
    signaling_config.secret = Some(sip_secret);
    // Signaling makes the room tokens the SFU checks.
    let sfu_config = stack::sfu_config(&settings, &data, sip_secret)?;
    let (cert, key) = stack::tls_files(&settings.turn, &data);
    let tls = tls::server_config(&cert, &key, &[ALPN_STUN_TURN])?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(
        cli.config,
        overrides,
        settings,
        data,
        services,
        (
            turn_config,
            ids_config,
            courier_config,
            signaling_config,
            sfu_config,
        ),
        tls,
    ))
}

/// Cluster mode keeps shared state in PostgreSQL: a node on SQLite would
/// be a cluster of its own.
fn require_postgres(services: Services, settings: &config::Settings) -> Result<()> {
    // A stand-alone signaling node reads the directory from ids' store,
    // which must then be the cluster's.
    let ids_store = services.ids || (services.signaling && settings.ids.database.is_some());
    for (on, name, url) in [
        (ids_store, "ids.database", &settings.ids.database),
        (
            services.signaling,
            "signaling.database",
            &settings.signaling.database,
        ),
        (
            services.courier,
            "courier.database",
            &settings.courier.database,
        ),
    ] {
        let url = url.as_deref().unwrap_or("sqlite in the data directory");
        if on && !url.starts_with("postgres") {
            anyhow::bail!(
                "cluster mode needs PostgreSQL: set {name} = \"postgres://…\" (it is {url})"
            );
        }
    }
    Ok(())
}

async fn serve(
    config_file: Option<PathBuf>,
    overrides: Vec<(String, Value)>,
    settings: config::Settings,
    data: data::DataDir,
    services: Services,
    configs: stack::Configs,
    tls: Arc<rustls::ServerConfig>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Install handlers before binding so an early signal is not lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    let ready = Arc::new(AtomicBool::new(false));
    let stack = stack::Stack::start(&settings, &data, services, configs, tls).await?;
    let relay = &stack.relay;
    let ids_server = &stack.ids;
    let courier_server = &stack.courier;
    let signaling_server = &stack.signaling;
    let admin_addr = settings
        .admin
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot bind admin listener {admin_addr}"))?;
    let admin_addr = listener.local_addr()?;
    let state = admin::AdminState {
        ready: ready.clone(),
        sources: Arc::new(
            relay
                .iter()
                .map(|r| r.clone() as Arc<dyn admin::MetricsSource>)
                .chain(courier_server.iter().map(|c| {
                    Arc::new(admin::CourierMetrics(c.courier.clone()))
                        as Arc<dyn admin::MetricsSource>
                }))
                .chain(signaling_server.iter().map(|s| {
                    Arc::new(admin::SignalingMetrics(s.clone())) as Arc<dyn admin::MetricsSource>
                }))
                .chain(ids_server.iter().map(|i| {
                    Arc::new(admin::IdsMetrics(i.ids.clone())) as Arc<dyn admin::MetricsSource>
                }))
                .chain(stack.sfu.iter().map(|s| {
                    Arc::new(admin::SfuMetrics(s.metrics.clone())) as Arc<dyn admin::MetricsSource>
                }))
                .chain(
                    (ids_server.is_some()
                        || courier_server.is_some()
                        || signaling_server.is_some())
                    .then(|| Arc::new(stack.revocations.clone()) as Arc<dyn admin::MetricsSource>),
                )
                .collect(),
        ),
        probes: Arc::new(
            ids_server
                .iter()
                .map(|i| {
                    Arc::new(admin::IdsDatabase(i.ids.store.clone())) as Arc<dyn admin::ReadyProbe>
                })
                .chain(courier_server.iter().map(|c| {
                    Arc::new(admin::CourierDatabase(c.courier.store.clone()))
                        as Arc<dyn admin::ReadyProbe>
                }))
                .chain(
                    courier_server
                        .iter()
                        .filter_map(|c| c.courier.cluster().cloned())
                        .map(|c| Arc::new(admin::CourierNats(c)) as Arc<dyn admin::ReadyProbe>),
                )
                .chain(stack.probes.iter().cloned())
                .collect(),
        ),
    };
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(async move {
        let _ = axum::serve(listener, admin::router(state))
            .with_graceful_shutdown(async {
                let _ = admin_stopped.await;
            })
            .await;
    });

    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    // Ready before it says so: whoever reads "parley: ready" may ask
    // /readyz at once.
    ready.store(true, Ordering::Release);
    // User-facing start-up lines: scripts and tests read these.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "parley: data {} (trust {} in clients)",
            data.root.display(),
            data.ca_cert.display()
        );
        if let Some(relay) = &relay {
            println!(
                "parley: turn udp={} tcp={} tls={}",
                list(relay.udp_addrs()),
                list(relay.tcp_addrs()),
                list(relay.tls_addrs())
            );
        }
        if let Some(s) = &ids_server {
            println!("parley: ids https://{} (/v1/openapi.json)", s.addr());
        }
        if let Some(c) = &courier_server {
            println!(
                "parley: courier devices tls={} quic={} providers https://{} (web push {}/wp/)",
                c.device_addr(),
                c.quic_addr().map_or("off".to_owned(), |a| a.to_string()),
                c.provider_addr(),
                c.courier.config.public_url,
            );
            if let Some(cl) = &c.courier.config.cluster {
                println!(
                    "parley: courier cluster node={} nats={}",
                    cl.node,
                    cl.nats.join(",")
                );
            }
        }
        if let Some(s) = &signaling_server {
            println!(
                "parley: signaling udp={} tcp={} tls={} wss={}",
                list(s.udp_addrs()),
                list(s.tcp_addrs()),
                list(s.tls_addrs()),
                list(s.wss_addrs())
            );
        }
        if let Some(s) = &stack.sfu {
            let media: Vec<String> = s.media_all.iter().map(|a| a.to_string()).collect();
            println!("parley: sfu media={} https://{}", media.join(","), s.http);
        }
        println!("parley: admin http://{admin_addr} (/metrics /healthz /readyz)");
        println!("parley: ready");
    }

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                match reload(config_file.as_deref(), &overrides, &data) {
                    Ok((users, secrets, tls)) => {
                        if let Some(relay) = relay {
                            relay.reload(&users, &secrets, Some(tls));
                        }
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reload failed; keeping the running configuration"),
                }
            }
        }
    }
    tracing::info!("draining");
    ready.store(false, Ordering::Release);
    let _ = stop_admin.send(());
    let _ = admin_task.await;
    stack.shutdown().await
}

/// What SIGHUP replaces: static users, REST secrets, the TLS configuration.
type Reloaded = (
    Vec<(String, String)>,
    Vec<String>,
    Arc<rustls::ServerConfig>,
);

/// Re-reads the configuration and secret files for SIGHUP.
fn reload(
    config_file: Option<&std::path::Path>,
    overrides: &[(String, Value)],
    data: &data::DataDir,
) -> Result<Reloaded> {
    let settings = config::load(config_file, std::env::vars(), overrides)?;
    let secret = data::read_secret(&data.root.join("turn-secret"))?;
    let users = settings.turn.users()?;
    let secrets = settings.turn.rest_secrets(&secret);
    let (cert, key) = stack::tls_files(&settings.turn, data);
    let tls = tls::server_config(&cert, &key, &[ALPN_STUN_TURN])?;
    Ok((users, secrets, tls))
}

fn init_tracing(filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid configuration: log: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, not for log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

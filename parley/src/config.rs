//! Configuration from a TOML file, `PARLEY_*` environment variables and
//! flags, in that order of precedence. All three are merged into one TOML
//! document, then read into typed sections once, so a bad value gets the
//! same one-line error naming its key wherever it came from.
//!
//! Environment variables map to keys by section: `PARLEY_TURN_MIN_PORT=50000`
//! is `turn.min_port = 50000`, `PARLEY_ADMIN_LISTEN` is `admin.listen`,
//! `PARLEY_DATA` is `data`. A value with commas is a list.

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::{Table, Value};
use wire::net::IpNet;

/// Sections that environment variables may address.
const SECTIONS: &[&str] = &[
    "admin",
    "turn",
    "ids",
    "courier",
    "signaling",
    "sfu",
    "cluster",
];

/// The whole configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Data directory. Default `./parley-data`.
    pub data: Option<PathBuf>,
    /// Log filter (`info`, `debug`, `stun_turn=trace`…). Default `info`.
    pub log: Option<String>,
    pub admin: AdminSection,
    pub turn: TurnSection,
    pub ids: IdsSection,
    pub courier: CourierSection,
    pub signaling: SignalingSection,
    pub sfu: SfuSection,
    pub cluster: ClusterSection,
}

/// The selective forwarding unit for group calls.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SfuSection {
    /// Media (ICE, DTLS-SRTP) on UDP. Default 0.0.0.0:5004. Each further
    /// media loop (`workers`) takes the next port: 5005, 5006…
    pub listen: Option<SocketAddr>,
    /// Media loops, each with a share of the rooms on a core of its own
    /// (a room stays on one). Default: one per core, up to 8.
    pub workers: Option<usize>,
    /// The join API (HTTPS): participants post their offer with a room
    /// token. Default 0.0.0.0:8446.
    pub api_listen: Option<SocketAddr>,
    /// The address participants send media to, when `listen` is a
    /// wildcard (NAT, 0.0.0.0). Default 127.0.0.1.
    pub advertise: Option<IpAddr>,
    /// People in one room at most. Default 32.
    pub max_participants: Option<usize>,
    /// People in all rooms at most; past it joins get 503. Default 2000.
    pub max_total: Option<usize>,
    /// Videos each participant receives at most: the latest speakers'.
    /// Default 4.
    pub last_n: Option<usize>,
    /// Certificate chain and key of the join API (PEM). Default: the data
    /// directory's server certificate.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl SfuSection {
    /// The SFU's configuration; `secret` checks room tokens (signaling's,
    /// which makes them).
    pub fn to_config(&self, secret: [u8; 32]) -> Result<sfu::runtime::Config> {
        let listen = self
            .listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5004)));
        let max_participants = self.max_participants.unwrap_or(32);
        if !(2..=64).contains(&max_participants) {
            bail!("invalid configuration: sfu.max_participants: {max_participants} is not within 2..=64");
        }
        if let Some(w) = self.workers.filter(|w| !(1..=64).contains(w)) {
            bail!("invalid configuration: sfu.workers: {w} is not within 1..=64");
        }
        let workers = self.workers.unwrap_or(0);
        let last_n = self.last_n.unwrap_or(4);
        if !(1..=32).contains(&last_n) {
            bail!("invalid configuration: sfu.last_n: {last_n} is not within 1..=32");
        }
        Ok(sfu::runtime::Config {
            media: listen,
            workers,
            advertise: Some(self.advertise.unwrap_or(match listen {
                SocketAddr::V4(_) => IpAddr::from([127, 0, 0, 1]),
                SocketAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            })),
            http: self
                .api_listen
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8446))),
            tls: None,
            secret: secret.to_vec(),
            room: sfu::core::room::Config {
                last_n,
                ..Default::default()
            },
            max_participants,
            max_total: self.max_total.unwrap_or(2000).max(max_participants),
            connect_within: Duration::from_secs(30),
        })
    }
}

/// Several nodes of a service sharing PostgreSQL and NATS. Without
/// `nats`, each process is a cluster of one.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// NATS server URLs (`nats://host:4222`); naming one turns cluster
    /// mode on. Default: none.
    pub nats: Option<OneOrMany<String>>,
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`).
    /// Default: the data directory's `node-id`.
    pub node: Option<String>,
    /// Key file every node shares, for SIP digest nonces and route tokens
    /// (base64url, 32+ random bytes). Default: `signaling.secret_file`,
    /// else the data directory's `sip-secret` (copy it to every node).
    pub secret_file: Option<PathBuf>,
    /// Courier shard lease, seconds: a dead node's devices and queues
    /// move to the others within it and a quarter of it. Default 6.
    pub lease_secs: Option<u64>,
    /// NATS user, with `nats_password_file` (the password alone in a
    /// file, never in the configuration or logs). Default: none.
    pub nats_user: Option<String>,
    pub nats_password_file: Option<PathBuf>,
    /// CA certificates (PEM) NATS's TLS certificate chains to: TLS is then
    /// required. Default: plain TCP (a private network only).
    pub nats_ca: Option<PathBuf>,
}

impl ClusterSection {
    pub fn enabled(&self) -> bool {
        self.nats.as_ref().is_some_and(|n| !n.to_vec().is_empty())
    }

    /// The courier's part, for node `default_node` unless `node` is set.
    pub fn courier(
        &self,
        default_node: &str,
    ) -> Result<Option<push_courier::cluster::ClusterConfig>> {
        if !self.enabled() {
            return Ok(None);
        }
        let mut c = push_courier::cluster::ClusterConfig::new(
            self.node.clone().unwrap_or_else(|| default_node.to_owned()),
            self.nats
                .as_ref()
                .map(OneOrMany::to_vec)
                .unwrap_or_default(),
        );
        if let Some(s) = self.lease_secs {
            c.lease = Duration::from_secs(s);
        }
        c.options = self.nats_options()?;
        c.validate().map_err(|e| anyhow!("cluster: {e}"))?;
        Ok(Some(c))
    }

    /// How every NATS connection of this node starts: user and password,
    /// and the CA TLS must chain to.
    pub fn nats_options(&self) -> Result<push_courier::cluster::NatsOptions> {
        let login = match (&self.nats_user, &self.nats_password_file) {
            (Some(u), Some(f)) => {
                let p = std::fs::read_to_string(f).with_context(|| {
                    format!("cluster.nats_password_file: cannot read {}", f.display())
                })?;
                Some((u.clone(), p.trim().to_owned()))
            }
            (None, None) => None,
            _ => bail!("cluster: nats_user and nats_password_file go together"),
        };
        if let Some(ca) = &self.nats_ca {
            if !ca.is_file() {
                bail!("cluster.nats_ca: {} is not a file", ca.display());
            }
        }
        let ca = self.nats_ca.clone();
        Ok(push_courier::cluster::NatsOptions(std::sync::Arc::new(
            move || {
                let mut o = match &login {
                    Some((u, p)) => {
                        async_nats::ConnectOptions::with_user_and_password(u.clone(), p.clone())
                    }
                    None => async_nats::ConnectOptions::new(),
                };
                if let Some(ca) = &ca {
                    o = o.add_root_certificates(ca.clone()).require_tls(true);
                }
                o
            },
        )))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalingSection {
    /// SIP over UDP and TCP, unless `udp`/`tcp` say otherwise. Default 0.0.0.0:5060.
    pub listen: Option<OneOrMany<SocketAddr>>,
    pub udp: Option<OneOrMany<SocketAddr>>,
    pub tcp: Option<OneOrMany<SocketAddr>>,
    /// SIP over TLS. Default 0.0.0.0:5061.
    pub tls: Option<OneOrMany<SocketAddr>>,
    /// SIP over secure WebSocket (RFC 7118). Default 0.0.0.0:8445.
    pub wss: Option<OneOrMany<SocketAddr>>,
    /// The domains of our addresses-of-record (`sip:<handle>@<domain>`).
    /// Default `localhost`.
    pub domains: Option<OneOrMany<String>>,
    /// Address written in Via and Record-Route, per listener, when the
    /// listen address is not what peers reach (NAT, 0.0.0.0). Default: the
    /// bound address, with 0.0.0.0 as 127.0.0.1.
    pub advertise: Option<IpAddr>,
    /// Digest realm. Default: the first domain.
    pub realm: Option<String>,
    /// File holding the key of digest nonces and route tokens (base64url,
    /// 32+ random bytes). Nodes that share it take each other's challenges
    /// and route tokens. Default: the data directory's `sip-secret`.
    pub secret_file: Option<PathBuf>,
    /// How long a call may ring, seconds. Default 60.
    pub ring_timeout_secs: Option<u64>,
    /// How long a device woken by push may take to register, seconds. Default 30.
    pub push_window_secs: Option<u64>,
    /// Requests per second per source address (IPv6: per /64) outside
    /// dialogs of ours. Default 200.
    pub source_rate: Option<u32>,
    /// Address prefixes (trunks, gateways) that requests without a route
    /// of ours may be forwarded to, for authenticated senders only.
    /// Default: none, i.e. such requests get 403 Relaying Forbidden.
    pub forward_to: Option<OneOrMany<String>>,
    /// How long a call's route through the proxy is honoured, seconds.
    /// Default 43200 (12 h).
    pub dialog_lifetime_secs: Option<u64>,
    /// Calls per minute that may wake sleeping devices, per caller and
    /// per callee. Default 30.
    pub wakes_per_minute: Option<u32>,
    /// Calls ringing at once. Default 100000.
    pub max_calls: Option<usize>,
    /// The SFU's join API that participants of group calls are sent to,
    /// with their room tokens (`https://sfu.example.com:8446`). Default:
    /// the SFU of the same `parley up`; none for `parley signaling` alone,
    /// where group INVITEs then get 488.
    pub sfu_url: Option<String>,
    /// Open SIP connections. Default 10000.
    pub max_connections: Option<usize>,
    /// Accepted SIP connections from one source address (IPv6: /64).
    /// Default 256.
    pub max_connections_per_source: Option<usize>,
    /// Let calls through without a device certificate or digest
    /// credentials (benchmarks, labs). Default false.
    pub allow_unauthenticated_calls: Option<bool>,
    /// Offer SHA-256 digest (RFC 8760) before MD5. Off by default: SIPp
    /// 3.6 and baresip 1.0 fail on a SHA-256 challenge. Default false.
    pub digest_sha256: Option<bool>,
    /// Digest accounts for standard user agents: `[[signaling.accounts]]`
    /// with `handle` and `password`.
    pub accounts: Vec<SipAccount>,
    /// TLS certificate chain and key (PEM). Default: the data directory's.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA of device certificates. Default: the data directory's CA.
    pub device_ca: Option<PathBuf>,
    /// Where the nodes of a cluster keep their SIP bindings for each
    /// other (`postgres://…`); needed with `[cluster]`. Default: none (one
    /// node keeps its own).
    pub database: Option<String>,
}

/// A digest account: the handle it may register and call as.
#[derive(Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SipAccount {
    pub handle: String,
    pub password: String,
}

impl std::fmt::Debug for SipAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SipAccount")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl SignalingSection {
    pub fn to_config(&self) -> Result<signaling::runtime::Config> {
        let mut c = signaling::runtime::Config::default();
        let listen = self.listen.as_ref().map(OneOrMany::to_vec);
        if let Some(v) = self.udp.as_ref().map(OneOrMany::to_vec).or(listen.clone()) {
            c.udp = v;
        }
        if let Some(v) = self.tcp.as_ref().map(OneOrMany::to_vec).or(listen) {
            c.tcp = v;
        }
        if let Some(v) = &self.tls {
            c.tls = v.to_vec();
        }
        if let Some(v) = &self.wss {
            c.wss = v.to_vec();
        }
        let p = &mut c.proxy;
        if let Some(d) = &self.domains {
            p.domains = d.to_vec().iter().map(|d| d.to_ascii_lowercase()).collect();
            if p.domains.is_empty() {
                return Err(anyhow!(
                    "invalid configuration: signaling.domains: name at least one domain"
                ));
            }
        }
        p.realm = self.realm.clone().unwrap_or_else(|| p.domains[0].clone());
        if let Some(s) = self.ring_timeout_secs {
            if !(5..=600).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: signaling.ring_timeout_secs: must be 5 to 600, got {s}"
                ));
            }
            p.ring_timeout = Duration::from_secs(s);
        }
        if let Some(s) = self.push_window_secs {
            if !(1..=300).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: signaling.push_window_secs: must be 1 to 300, got {s}"
                ));
            }
            p.push_window = Duration::from_secs(s);
        }
        if let Some(r) = self.source_rate {
            p.source_rate = r.max(1);
        }
        p.forward_to = nets("signaling.forward_to", &self.forward_to)?;
        if let Some(u) = &self.sfu_url {
            if !u.starts_with("https://") || u.contains(char::is_whitespace) {
                return Err(anyhow!(
                    "invalid configuration: signaling.sfu_url: an https:// URL, got {u:?}"
                ));
            }
            p.sfu = Some(u.trim_end_matches('/').to_string());
        }
        if let Some(s) = self.dialog_lifetime_secs {
            if !(60..=7 * 24 * 3600).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: signaling.dialog_lifetime_secs: must be 60 to 604800, got {s}"
                ));
            }
            p.dialog_lifetime = Duration::from_secs(s);
        }
        if let Some(n) = self.wakes_per_minute {
            if n == 0 {
                return Err(anyhow!(
                    "invalid configuration: signaling.wakes_per_minute: must be at least 1"
                ));
            }
            p.wakes_per_minute = n;
        }
        if let Some(n) = self.max_calls {
            p.max_calls = n.max(1);
        }
        if let Some(n) = self.max_connections {
            c.max_connections = n.max(1);
        }
        if let Some(n) = self.max_connections_per_source {
            c.max_connections_per_source = n.max(1);
        }
        if let Some(b) = self.allow_unauthenticated_calls {
            p.allow_unauthenticated_calls = b;
        }
        if let Some(b) = self.digest_sha256 {
            p.digest_sha256 = b;
        }
        for (i, a) in self.accounts.iter().enumerate() {
            let handle = wire::handle::Handle::parse(&a.handle).map_err(|e| {
                anyhow!("invalid configuration: signaling.accounts[{i}].handle: {e}")
            })?;
            if a.password.len() < 8 {
                return Err(anyhow!(
                    "invalid configuration: signaling.accounts[{i}].password: at least 8 characters"
                ));
            }
            p.accounts.insert(handle, a.password.clone());
        }
        Ok(c)
    }

    /// The advertised address, applied once the listeners are known.
    pub fn advertise(&self, c: &mut signaling::runtime::Config) {
        if let Some(ip) = self.advertise {
            use signaling::core::flow::Transport;
            for (t, list) in [
                (Transport::Udp, &c.udp),
                (Transport::Tcp, &c.tcp),
                (Transport::Tls, &c.tls),
                (Transport::Wss, &c.wss),
            ] {
                if let Some(a) = list.first() {
                    c.proxy.advertise.push((t, SocketAddr::new(ip, a.port())));
                }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CourierSection {
    /// Device listener, TLS over TCP and QUIC over UDP on the same port. Default 0.0.0.0:5223.
    pub device_listen: Option<SocketAddr>,
    /// Serve QUIC beside TLS. Default true.
    pub quic: Option<bool>,
    /// Provider HTTPS listener (APNs-style API and Web Push). Default 0.0.0.0:8443.
    pub provider_listen: Option<SocketAddr>,
    /// `sqlite://…` or `postgres://…`. Default: `courier.db` in the data directory.
    pub database: Option<String>,
    /// Origin providers use, for Web Push endpoints and VAPID `aud`.
    /// Default `https://localhost:<provider port>`.
    pub public_url: Option<String>,
    /// Stored messages per device. Default 100.
    pub queue_cap: Option<usize>,
    /// Courier keepalive when the device does not choose one, seconds. Default 240.
    pub ping_interval_secs: Option<u64>,
    /// Pushes per second per provider. Default 20000.
    pub provider_rate: Option<u32>,
    /// How long message statuses stay queryable, seconds. Default 86400.
    pub status_retention_secs: Option<u64>,
    /// Device TLS handshakes in progress at once from one address (IPv6:
    /// /64). Default 64.
    pub max_handshakes_per_source: Option<usize>,
    /// Open provider connections, and from one address. Defaults 4096, 64.
    pub max_provider_connections: Option<usize>,
    pub max_provider_connections_per_source: Option<usize>,
    /// How long a provider request's body may take, seconds. Default 10.
    pub provider_body_timeout_secs: Option<u64>,
    /// Wait for the disk on every commit. false: a push answered 2xx survives
    /// the courier being killed, not a power loss (SQLite only). Default true.
    pub fsync: Option<bool>,
    /// TLS certificate chain and key (PEM). Default: the data directory's.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// CA that issues device certificates. Default: the data directory's CA (the one `ids` uses).
    pub device_ca: Option<PathBuf>,
    /// CA for provider client certificates (CN = provider name). Default: the data directory's CA.
    pub provider_ca: Option<PathBuf>,
    /// Revocation list of device certificates (DER or PEM, as ids serves at
    /// /v1/crl), re-read every 30 s. Default: none; `parley up` takes
    /// revocations from its own ids instead.
    pub device_crl: Option<PathBuf>,
    /// APNs-style providers: `[[courier.providers]]` tables.
    pub providers: Vec<ProviderEntry>,
    /// Platform push services the courier hands wake-ups to, for devices
    /// that cannot hold its link: `[courier.upstream.apns]`.
    pub upstream: UpstreamSection,
}

/// `[courier.upstream]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamSection {
    pub apns: Option<ApnsSection>,
    pub fcm: Option<FcmSection>,
}

/// `[courier.upstream.fcm]`: Google's Firebase Cloud Messaging (HTTP v1),
/// reached with a service account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSection {
    /// The service-account JSON file from the Firebase console (its
    /// project, client email, RSA key and token URI; never logged).
    pub service_account: PathBuf,
    /// host:port. Default `fcm.googleapis.com:443`.
    #[serde(default)]
    pub url: Option<String>,
    /// CA certificates (PEM) to trust instead of the public roots, for
    /// FCM and the token endpoint: a local stand-in.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

/// Google's endpoint.
pub const FCM_DEFAULT: &str = "fcm.googleapis.com:443";

/// `[courier.upstream.apns]`: Apple's push service, reached as a provider
/// with a token-signing key (`.p8`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSection {
    /// host:port of the production environment. Default
    /// `api.push.apple.com:443`.
    #[serde(default)]
    pub url: Option<String>,
    /// host:port of the sandbox environment, for devices running
    /// development builds of an app (`api.sandbox.push.apple.com:443`).
    /// Default: none; such devices' tokens are refused.
    #[serde(default)]
    pub sandbox_url: Option<String>,
    /// The name its certificate carries. Default: the host of `url`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// CA certificates (PEM) to trust instead of the public roots: a local
    /// stand-in.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The signing key Apple issued (`AuthKey_<key id>.p8`, PKCS#8 PEM).
    pub key: PathBuf,
    pub key_id: String,
    pub team_id: String,
}

/// Apple's production endpoint.
pub const APNS_DEFAULT: &str = "api.push.apple.com:443";

/// One APNs-style provider.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderEntry {
    /// Name; also the CN of its client certificate if it uses one.
    pub name: String,
    /// Provider token `iss` (team id) and `kid` (key id).
    pub team_id: Option<String>,
    pub key_id: Option<String>,
    /// PEM file with its ES256 public key (`-----BEGIN PUBLIC KEY-----`).
    pub key: Option<PathBuf>,
    /// Topics it may push to. Default: any.
    pub topics: Vec<String>,
}

impl CourierSection {
    pub fn to_config(&self, data: &Path) -> Result<push_courier::Config> {
        let mut c = push_courier::Config {
            database_url: self
                .database
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", data.join("courier.db").display())),
            ..push_courier::Config::default()
        };
        if let Some(a) = self.device_listen {
            c.device_listen = a;
        }
        if let Some(a) = self.provider_listen {
            c.provider_listen = a;
        }
        if let Some(q) = self.quic {
            c.quic = q;
        }
        if let Some(u) = &self.public_url {
            if !u.starts_with("https://") {
                return Err(anyhow!(
                    "invalid configuration: courier.public_url: must start with https://, got {u:?}"
                ));
            }
            c.public_url = u.trim_end_matches('/').to_owned();
        }
        if let Some(n) = self.queue_cap {
            if n == 0 || n > 10_000 {
                return Err(anyhow!(
                    "invalid configuration: courier.queue_cap: must be 1 to 10000, got {n}"
                ));
            }
            c.queue_cap = n;
        }
        if let Some(s) = self.ping_interval_secs {
            if !(10..=3600).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: courier.ping_interval_secs: must be 10 to 3600, got {s}"
                ));
            }
            c.session.ping_interval = Duration::from_secs(s);
        }
        if let Some(r) = self.provider_rate {
            c.provider_rate = r.max(1);
        }
        if let Some(s) = self.status_retention_secs {
            c.status_retention = Duration::from_secs(s);
        }
        if let Some(n) = self.max_handshakes_per_source {
            c.max_handshakes_per_source = n.max(1);
        }
        if let Some(n) = self.max_provider_connections {
            c.max_provider_connections = n.max(1);
        }
        if let Some(n) = self.max_provider_connections_per_source {
            c.max_provider_connections_per_source = n.max(1);
        }
        if let Some(s) = self.provider_body_timeout_secs {
            if !(1..=300).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: courier.provider_body_timeout_secs: must be 1 to 300, got {s}"
                ));
            }
            c.provider_body_timeout = Duration::from_secs(s);
        }
        if let Some(f) = self.fsync {
            c.fsync = f;
        }
        for (i, p) in self.providers.iter().enumerate() {
            let key = |what: &str| format!("invalid configuration: courier.providers[{i}].{what}");
            if p.name.is_empty() {
                return Err(anyhow!("{}: required", key("name")));
            }
            let public_key = match &p.key {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        anyhow!("{}: cannot read {}: {e}", key("key"), path.display())
                    })?;
                    let der = rustls_pemfile::read_one(&mut pem.as_slice())
                        .ok()
                        .flatten()
                        .and_then(|item| match item {
                            rustls_pemfile::Item::SubjectPublicKeyInfo(d) => {
                                Some(d.as_ref().to_vec())
                            }
                            _ => None,
                        })
                        .ok_or_else(|| {
                            anyhow!("{}: {} is not a PEM public key", key("key"), path.display())
                        })?;
                    let point = wire::PublicKey::from_spki_der(&der).map_err(|_| {
                        anyhow!(
                            "{}: {} is not a P-256 (ES256) key",
                            key("key"),
                            path.display()
                        )
                    })?;
                    Some(point.0)
                }
                None => None,
            };
            if public_key.is_some() && (p.team_id.is_none() || p.key_id.is_none()) {
                return Err(anyhow!(
                    "{}: team_id and key_id are required with key",
                    key("key")
                ));
            }
            c.providers.push(push_courier::Provider {
                name: p.name.clone(),
                team_id: p.team_id.clone().unwrap_or_default(),
                key_id: p.key_id.clone().unwrap_or_default(),
                public_key,
                topics: p.topics.clone(),
            });
        }
        Ok(c)
    }
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdsSection {
    /// HTTPS listen address of the identity service. Default 0.0.0.0:8444.
    pub listen: Option<SocketAddr>,
    /// `sqlite://…` or `postgres://…`. Default: `ids.db` in the data directory.
    pub database: Option<String>,
    /// Seconds between key transparency epochs when there are changes. Default 2.
    pub publish_interval_secs: Option<f64>,
    /// Where the development code sender writes messages. Default: `outbox/` in the data directory.
    pub outbox: Option<PathBuf>,
    /// TLS certificate chain and key (PEM). Default: the data directory's.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// SMTP relay for email codes, e.g. `smtps://user:pass@mail.example.com:465`.
    /// Default: none (codes go to the outbox).
    pub email_smtp_url: Option<String>,
    /// Sender of code emails, e.g. `Parley <no-reply@example.com>`.
    pub email_from: Option<String>,
    /// HTTPS webhook for SMS codes. Default: none (codes go to the outbox).
    pub sms_webhook_url: Option<String>,
    /// Bearer token sent to the SMS webhook.
    pub sms_webhook_token: Option<String>,
    /// Relay URIs handed to devices with their TURN credentials, e.g.
    /// `turn:turn.example.com:3478?transport=udp`. Default: the relay's
    /// listen addresses (unspecified ones as loopback).
    pub turn_uris: Option<OneOrMany<String>>,
    /// Lifetime of a device's TURN credentials, seconds. Default 3600.
    pub turn_ttl_secs: Option<u64>,
    /// Handles an account may look up per minute (four times that per
    /// client address). Default 600.
    pub lookups_per_minute: Option<u32>,
    /// How long a reset of an account that still has devices waits for
    /// them, seconds. Default 604800 (7 days).
    pub reset_delay_secs: Option<u64>,
}

/// Secrets (SMTP URL with its password, webhook token) stay out of Debug.
impl std::fmt::Debug for IdsSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: &Option<String>| o.as_ref().map(|_| "<set>");
        f.debug_struct("IdsSection")
            .field("listen", &self.listen)
            .field("database", &set(&self.database))
            .field("publish_interval_secs", &self.publish_interval_secs)
            .field("outbox", &self.outbox)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("email_smtp_url", &set(&self.email_smtp_url))
            .field("email_from", &self.email_from)
            .field("sms_webhook_url", &self.sms_webhook_url)
            .field("sms_webhook_token", &set(&self.sms_webhook_token))
            .field("turn_uris", &self.turn_uris)
            .field("turn_ttl_secs", &self.turn_ttl_secs)
            .field("lookups_per_minute", &self.lookups_per_minute)
            .field("reset_delay_secs", &self.reset_delay_secs)
            .finish()
    }
}

impl IdsSection {
    /// The code senders: SMTP for email and the webhook for phone numbers
    /// when configured, else the development outbox.
    pub fn sender(&self, outbox: &Path) -> Result<Box<dyn ids::sender::CodeSender>> {
        use ids::sender::{ByKind, CodeSender, OutboxSender, SmtpSender, WebhookSender};
        let dev = || -> Box<dyn CodeSender> {
            tracing::warn!(dir = %outbox.display(), "verification codes are written to the outbox, not sent");
            Box::new(OutboxSender {
                dir: outbox.to_owned(),
            })
        };
        let email: Box<dyn CodeSender> = match &self.email_smtp_url {
            Some(url) => {
                let from = self.email_from.as_deref().ok_or_else(|| {
                    anyhow!(
                        "invalid configuration: ids.email_from: required with ids.email_smtp_url"
                    )
                })?;
                Box::new(SmtpSender::new(url, from)?)
            }
            None => dev(),
        };
        let phone: Box<dyn CodeSender> = match &self.sms_webhook_url {
            Some(url) => Box::new(WebhookSender::new(url, self.sms_webhook_token.clone())?),
            None => dev(),
        };
        Ok(Box::new(ByKind { email, phone }))
    }

    pub fn to_config(&self, data: &Path) -> Result<ids::Config> {
        let mut c = ids::Config {
            database_url: self
                .database
                .clone()
                .unwrap_or_else(|| format!("sqlite://{}", data.join("ids.db").display())),
            outbox: self.outbox.clone().unwrap_or_else(|| data.join("outbox")),
            ..ids::Config::default()
        };
        if let Some(u) = &self.turn_uris {
            let uris = u.to_vec();
            if let Some(bad) = uris
                .iter()
                .find(|u| !(u.starts_with("turn:") || u.starts_with("turns:")))
            {
                return Err(anyhow!(
                    "invalid configuration: ids.turn_uris: {bad:?} is not a turn: or turns: URI"
                ));
            }
            c.turn.uris = uris;
        }
        if let Some(n) = self.lookups_per_minute {
            if n == 0 {
                return Err(anyhow!(
                    "invalid configuration: ids.lookups_per_minute: must be at least 1"
                ));
            }
            c.lookups_per_minute = n;
        }
        if let Some(s) = self.reset_delay_secs {
            if s > 90 * 24 * 3600 {
                return Err(anyhow!(
                    "invalid configuration: ids.reset_delay_secs: at most 7776000 (90 days), got {s}"
                ));
            }
            c.reset_delay = Duration::from_secs(s);
        }
        if let Some(t) = self.turn_ttl_secs {
            if !(60..=86_400).contains(&t) {
                return Err(anyhow!(
                    "invalid configuration: ids.turn_ttl_secs: must be 60 to 86400, got {t}"
                ));
            }
            c.turn.ttl = Duration::from_secs(t);
        }
        if let Some(s) = self.publish_interval_secs {
            if !(0.01..=10.0).contains(&s) {
                return Err(anyhow!(
                    "invalid configuration: ids.publish_interval_secs: must be 0.01 to 10 (epochs at least every 10 s), got {s}"
                ));
            }
            c.publish_interval = Duration::from_secs_f64(s);
        }
        Ok(c)
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8444)))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSection {
    /// Listen address of `/metrics`, `/healthz`, `/readyz`. Default 127.0.0.1:9090.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnSection {
    pub realm: Option<String>,
    /// UDP and TCP listen addresses (both), unless `udp`/`tcp` say otherwise.
    pub listen: Option<OneOrMany<SocketAddr>>,
    pub udp: Option<OneOrMany<SocketAddr>>,
    pub tcp: Option<OneOrMany<SocketAddr>>,
    pub tls: Option<OneOrMany<SocketAddr>>,
    pub relay_ipv4: Option<IpAddr>,
    pub relay_ipv6: Option<IpAddr>,
    pub external_ipv4: Option<IpAddr>,
    pub min_port: Option<u16>,
    pub max_port: Option<u16>,
    pub default_lifetime_secs: Option<u64>,
    pub max_lifetime_secs: Option<u64>,
    pub nonce_lifetime_secs: Option<u64>,
    /// Static users as `name:password`.
    pub users: Option<OneOrMany<String>>,
    /// REST secrets; the first is current. Default: the data directory's.
    pub rest_secrets: Option<OneOrMany<String>>,
    pub max_allocations: Option<u32>,
    pub max_allocations_per_user: Option<u32>,
    pub max_allocations_per_ip: Option<u32>,
    pub max_bytes_per_sec: Option<u64>,
    pub allow_peers: Option<OneOrMany<String>>,
    pub deny_peers: Option<OneOrMany<String>>,
    pub software: Option<String>,
    pub alternate: Option<SocketAddr>,
    pub workers: Option<usize>,
    /// TLS certificate chain and key (PEM). Default: the data directory's.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A value or a list of values.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    pub fn to_vec(&self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// Reads the file (if any), overlays the environment and `overrides`
/// (`key.path`, value) from flags, and parses the result.
pub fn load(
    file: Option<&Path>,
    env: impl Iterator<Item = (String, String)>,
    overrides: &[(String, Value)],
) -> Result<Settings> {
    let mut doc = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| anyhow!("cannot read config file {}: {e}", p.display()))?;
            text.parse::<Table>()
                .map_err(|e| anyhow!("config file {}: {}", p.display(), one_line(e.message())))?
        }
        None => Table::new(),
    };
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("PARLEY_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        if rest == "config" {
            continue;
        }
        let path = match rest.split_once('_') {
            Some((section, key)) if SECTIONS.contains(&section) => format!("{section}.{key}"),
            _ => rest,
        };
        set(&mut doc, &path, env_value(&raw));
    }
    for (path, v) in overrides {
        set(&mut doc, path, v.clone());
    }
    serde_path_to_error::deserialize(Value::Table(doc)).map_err(|e| {
        let path = e.path().to_string();
        let inner = one_line(&e.into_inner().to_string());
        if path == "." || path.is_empty() {
            anyhow!("invalid configuration: {inner}")
        } else {
            anyhow!("invalid configuration: {path}: {inner}")
        }
    })
}

/// Parses an environment value as TOML (numbers, booleans, arrays) or,
/// failing that, as a string; commas make a list of strings.
fn env_value(raw: &str) -> Value {
    if let Ok(t) = format!("v = {raw}").parse::<Table>() {
        if let Some(v) = t.get("v") {
            return v.clone();
        }
    }
    if raw.contains(',') {
        return Value::Array(
            raw.split(',')
                .map(|s| Value::String(s.trim().to_owned()))
                .collect(),
        );
    }
    Value::String(raw.to_owned())
}

fn set(doc: &mut Table, path: &str, v: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return };
    let mut t = doc;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        let Value::Table(next) = entry else { return };
        t = next;
    }
    t.insert(last.to_owned(), v);
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl TurnSection {
    /// Builds the relay configuration; `secret` is the data directory's
    /// REST secret, used when none is configured.
    pub fn to_config(&self, secret: &str) -> Result<stun_turn::Config> {
        let mut c = stun_turn::Config::default();
        if let Some(r) = &self.realm {
            c.realm = r.clone();
        }
        if let Some(l) = &self.listen {
            c.udp = l.to_vec();
            c.tcp = l.to_vec();
            // TLS follows the listen IPs on port 5349 unless set.
            c.tls = l
                .to_vec()
                .iter()
                .map(|a| SocketAddr::new(a.ip(), if a.port() == 0 { 0 } else { 5349 }))
                .collect();
        }
        if let Some(v) = &self.udp {
            c.udp = v.to_vec();
        }
        if let Some(v) = &self.tcp {
            c.tcp = v.to_vec();
        }
        if let Some(v) = &self.tls {
            c.tls = v.to_vec();
        }
        c.relay_ipv4 = self.relay_ipv4;
        c.relay_ipv6 = self.relay_ipv6;
        c.external_ipv4 = self.external_ipv4;
        // IPv4 relaying follows the listeners whatever `relay_ipv6` says:
        // a server IPv4 clients can reach relays IPv4 unless told where.
        let ipv4_clients = c
            .udp
            .iter()
            .chain(&c.tcp)
            .any(|a| a.is_ipv4() || a.ip().is_unspecified());
        if c.relay_ipv4.is_none() && (ipv4_clients || c.relay_ipv6.is_none()) {
            c.relay_ipv4 = Some(default_relay_ip(&c.udp));
        }
        c.min_port = self.min_port.unwrap_or(c.min_port);
        c.max_port = self.max_port.unwrap_or(c.max_port);
        let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
        c.default_lifetime = secs(self.default_lifetime_secs, c.default_lifetime);
        c.max_lifetime = secs(self.max_lifetime_secs, c.max_lifetime);
        c.nonce_lifetime = secs(self.nonce_lifetime_secs, c.nonce_lifetime);
        c.users = self.users()?;
        c.rest_secrets = self.rest_secrets(secret);
        c.max_allocations = self.max_allocations.unwrap_or(c.max_allocations);
        c.max_allocations_per_user = self
            .max_allocations_per_user
            .unwrap_or(c.max_allocations_per_user);
        c.max_allocations_per_ip = self
            .max_allocations_per_ip
            .unwrap_or(c.max_allocations_per_ip);
        c.max_bytes_per_sec = self.max_bytes_per_sec.unwrap_or(c.max_bytes_per_sec);
        c.allow_peers = nets("turn.allow_peers", &self.allow_peers)?;
        c.deny_peers = nets("turn.deny_peers", &self.deny_peers)?;
        c.software = self.software.clone();
        c.alternate = self.alternate;
        c.workers = self.workers.unwrap_or(0);
        if c.alternate.is_some() && c.udp.first().is_none_or(|a| a.ip().is_unspecified()) {
            anyhow::bail!("invalid configuration: turn.alternate: needs a specific first UDP listen address (not 0.0.0.0)");
        }
        c.validate().map_err(|e| match e {
            stun_turn::Error::Config { key, reason } => {
                anyhow!("invalid configuration: turn.{key}: {reason}")
            }
            other => anyhow!(other),
        })?;
        Ok(c)
    }

    pub fn users(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for u in self
            .users
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
        {
            let (name, pass) = u.split_once(':').ok_or_else(|| {
                anyhow!(
                    "invalid configuration: turn.users: `{}` is not name:password",
                    u.split(':').next().unwrap_or("")
                )
            })?;
            out.push((name.to_owned(), pass.to_owned()));
        }
        Ok(out)
    }

    pub fn rest_secrets(&self, secret: &str) -> Vec<String> {
        match &self.rest_secrets {
            Some(s) => s.to_vec(),
            None => vec![secret.to_owned()],
        }
    }
}

fn nets(key: &str, v: &Option<OneOrMany<String>>) -> Result<Vec<IpNet>> {
    v.as_ref()
        .map(OneOrMany::to_vec)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map_err(|e| anyhow!("invalid configuration: {key}: {e}"))
        })
        .collect()
}

/// The relay address when none is configured: the first specific UDP listen
/// IP, else the address of the interface that holds the default route
/// (found with `connect` on a UDP socket, which sends nothing), else loopback.
fn default_relay_ip(udp: &[SocketAddr]) -> IpAddr {
    if let Some(a) = udp.iter().find(|a| a.is_ipv4() && !a.ip().is_unspecified()) {
        return a.ip();
    }
    let probe = || -> Option<IpAddr> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        s.connect("192.0.2.1:9").ok()?;
        Some(s.local_addr().ok()?.ip())
    };
    probe()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sfu_workers_default_to_one_per_core_and_are_bounded() {
        let section = |workers| SfuSection {
            workers,
            ..SfuSection::default()
        };
        assert_eq!(section(None).to_config([0; 32]).unwrap().workers, 0);
        assert_eq!(section(Some(3)).to_config([0; 32]).unwrap().workers, 3);
        for bad in [0, 65] {
            let e = section(Some(bad)).to_config([0; 32]).unwrap_err();
            assert!(e.to_string().contains("sfu.workers"), "{e}");
        }
    }

    #[test]
    fn precedence_is_file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("parley.toml");
        std::fs::write(
            &f,
            "[turn]\nrealm = \"file\"\nmin_port = 40000\nmax_port = 40100\n",
        )
        .unwrap();
        let s = load(
            Some(&f),
            env(&[
                ("PARLEY_TURN_REALM", "env"),
                ("PARLEY_TURN_MIN_PORT", "40010"),
            ])
            .into_iter(),
            &[("turn.min_port".into(), Value::Integer(40020))],
        )
        .unwrap();
        assert_eq!(s.turn.realm.as_deref(), Some("env"));
        assert_eq!(s.turn.min_port, Some(40020));
        assert_eq!(s.turn.max_port, Some(40100));
    }

    #[test]
    fn env_lists_and_addresses() {
        let s = load(
            None,
            env(&[
                ("PARLEY_TURN_ALLOW_PEERS", "127.0.0.0/8,::1"),
                ("PARLEY_ADMIN_LISTEN", "127.0.0.1:9999"),
                ("PARLEY_DATA", "/tmp/x"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        assert_eq!(
            s.turn.allow_peers.unwrap().to_vec(),
            vec!["127.0.0.0/8".to_owned(), "::1".to_owned()]
        );
        assert_eq!(s.admin.listen, Some("127.0.0.1:9999".parse().unwrap()));
        assert_eq!(s.data, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = load(
            None,
            env(&[("PARLEY_TURN_MIN_PORT", "70000")]).into_iter(),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("turn.min_port"), "{e}");
        assert!(!e.contains('\n'));
        let e = load(None, env(&[("PARLEY_TURN_BOGUS", "1")]).into_iter(), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let s = load(
            None,
            env(&[("PARLEY_TURN_ALLOW_PEERS", "300.0.0.0/8")]).into_iter(),
            &[],
        )
        .unwrap();
        let e = s.turn.to_config("s").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid configuration: turn.allow_peers"),
            "{e}"
        );
        let s = load(
            None,
            env(&[
                ("PARLEY_TURN_MIN_PORT", "60000"),
                ("PARLEY_TURN_MAX_PORT", "50000"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        let e = s.turn.to_config("s").unwrap_err().to_string();
        assert!(e.starts_with("invalid configuration: turn.min_port"), "{e}");
    }

    #[test]
    fn ids_senders_are_checked_and_secrets_stay_out_of_debug() {
        let s = load(
            None,
            env(&[
                (
                    "PARLEY_IDS_EMAIL_SMTP_URL",
                    "smtps://u:hunter2@mail.example.com:465",
                ),
                ("PARLEY_IDS_SMS_WEBHOOK_URL", "https://sms.example.com/send"),
                ("PARLEY_IDS_SMS_WEBHOOK_TOKEN", "tok-secret"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains("tok-secret"),
            "{debug}"
        );
        let e = s.ids.sender(Path::new("/tmp/x")).unwrap_err().to_string();
        assert!(e.contains("ids.email_from"), "{e}");
        let e = load(
            None,
            env(&[("PARLEY_IDS_PUBLISH_INTERVAL_SECS", "30")]).into_iter(),
            &[],
        )
        .unwrap()
        .ids
        .to_config(Path::new("/tmp"))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ids.publish_interval_secs"), "{e}");
    }

    #[test]
    fn courier_values_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load_toml = |t: &str| {
            let f = dir.path().join("c.toml");
            std::fs::write(&f, t).unwrap();
            load(Some(&f), std::iter::empty(), &[]).and_then(|s| s.courier.to_config(dir.path()))
        };
        let e = load_toml("[courier]\nqueue_cap = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("courier.queue_cap"), "{e}");
        let e = load_toml("[courier]\npublic_url = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("courier.public_url"), "{e}");
        let e = load_toml("[[courier.providers]]\nname = \"a\"\nkey = \"/nonexistent.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("courier.providers[0].key"), "{e}");
        let c = load_toml("[courier]\nqueue_cap = 7\nping_interval_secs = 60\n\n[[courier.providers]]\nname = \"cert-only\"\ntopics = [\"com.example\"]\n").unwrap();
        assert_eq!(c.queue_cap, 7);
        assert_eq!(c.session.ping_interval, Duration::from_secs(60));
        assert_eq!(c.providers[0].name, "cert-only");
        assert!(c.providers[0].public_key.is_none());
        assert!(c.database_url.ends_with("courier.db"));
        let c = load_toml(
            "[courier]\nmax_handshakes_per_source = 8\nmax_provider_connections = 100\n\
             max_provider_connections_per_source = 4\nprovider_body_timeout_secs = 3\n",
        )
        .unwrap();
        assert_eq!(c.max_handshakes_per_source, 8);
        assert_eq!(c.max_provider_connections, 100);
        assert_eq!(c.max_provider_connections_per_source, 4);
        assert_eq!(c.provider_body_timeout, Duration::from_secs(3));
        let e = load_toml("[courier]\nprovider_body_timeout_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("courier.provider_body_timeout_secs"), "{e}");
    }

    #[test]
    fn an_ipv6_relay_address_leaves_ipv4_relaying_on() {
        let turn = |listen: &[&str], v6: Option<&str>| {
            TurnSection {
                listen: Some(OneOrMany::Many(
                    listen.iter().map(|a| a.parse().unwrap()).collect(),
                )),
                relay_ipv6: v6.map(|a| a.parse().unwrap()),
                ..TurnSection::default()
            }
            .to_config("s")
            .unwrap()
        };
        // Both families listened on, IPv6 relay named: IPv4 relays on
        // the IPv4 listen address.
        let c = turn(&["127.0.0.1:3479", "[::1]:3479"], Some("::1"));
        assert_eq!(c.relay_ipv4, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(c.relay_ipv6, Some("::1".parse().unwrap()));
        // IPv6 only: no IPv4 relay (no IPv4 client can reach it).
        let c = turn(&["[::1]:3479"], Some("::1"));
        assert_eq!(c.relay_ipv4, None);
        // Nothing named: the IPv4 listen address.
        let c = turn(&["127.0.0.2:3479"], None);
        assert_eq!(c.relay_ipv4, Some("127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn cluster_mode_is_off_until_a_nats_url_is_named() {
        let s = load(None, env(&[]).into_iter(), &[]).unwrap();
        assert!(!s.cluster.enabled());
        assert!(s.cluster.courier("node-a").unwrap().is_none());
        let s = load(
            None,
            env(&[
                (
                    "PARLEY_CLUSTER_NATS",
                    "nats://10.0.0.1:4222,nats://10.0.0.2:4222",
                ),
                ("PARLEY_CLUSTER_LEASE_SECS", "5"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        let c = s.cluster.courier("node-a").unwrap().unwrap();
        assert_eq!(c.node, "node-a", "the data directory's node id by default");
        assert_eq!(c.nats.len(), 2);
        assert_eq!(c.lease, Duration::from_secs(5));
        // A node name must be usable in NATS subjects.
        let s = load(
            None,
            env(&[
                ("PARLEY_CLUSTER_NATS", "nats://127.0.0.1:4222"),
                ("PARLEY_CLUSTER_NODE", "a.b"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        let e = s.cluster.courier("x").unwrap_err().to_string();
        assert!(e.contains("cluster node id"), "{e}");
    }

    #[test]
    fn abuse_limits_are_configurable_and_checked() {
        let s = load(
            None,
            env(&[
                ("PARLEY_SIGNALING_FORWARD_TO", "10.1.0.0/16,2001:db8::/32"),
                ("PARLEY_SIGNALING_DIALOG_LIFETIME_SECS", "3600"),
                ("PARLEY_SIGNALING_WAKES_PER_MINUTE", "5"),
                ("PARLEY_SIGNALING_MAX_CONNECTIONS_PER_SOURCE", "16"),
                ("PARLEY_IDS_LOOKUPS_PER_MINUTE", "120"),
                ("PARLEY_IDS_RESET_DELAY_SECS", "86400"),
            ])
            .into_iter(),
            &[],
        )
        .unwrap();
        let sig = s.signaling.to_config().unwrap();
        assert_eq!(sig.proxy.forward_to.len(), 2);
        assert_eq!(sig.proxy.dialog_lifetime, Duration::from_secs(3600));
        assert_eq!(sig.proxy.wakes_per_minute, 5);
        assert_eq!(sig.max_connections_per_source, 16);
        let ids = s.ids.to_config(Path::new("/tmp")).unwrap();
        assert_eq!(ids.lookups_per_minute, 120);
        assert_eq!(ids.reset_delay, Duration::from_secs(86400));
        for (key, value, named) in [
            (
                "PARLEY_SIGNALING_FORWARD_TO",
                "10.0.0.0/99",
                "signaling.forward_to",
            ),
            (
                "PARLEY_SIGNALING_DIALOG_LIFETIME_SECS",
                "5",
                "signaling.dialog_lifetime_secs",
            ),
            (
                "PARLEY_SIGNALING_WAKES_PER_MINUTE",
                "0",
                "signaling.wakes_per_minute",
            ),
        ] {
            let e = load(None, env(&[(key, value)]).into_iter(), &[])
                .and_then(|s| s.signaling.to_config())
                .unwrap_err()
                .to_string();
            assert!(e.contains(named), "{e}");
        }
        let e = load(
            None,
            env(&[("PARLEY_IDS_LOOKUPS_PER_MINUTE", "0")]).into_iter(),
            &[],
        )
        .and_then(|s| s.ids.to_config(Path::new("/tmp")))
        .unwrap_err()
        .to_string();
        assert!(e.contains("ids.lookups_per_minute"), "{e}");
    }
}

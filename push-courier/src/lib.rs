//! The Parley push courier.
//!
//! Devices hold one connection each ([`wire::push`], TLS 1.3 over TCP or
//! QUIC on 5223, ALPN `parley-push/1`, device certificate required) and get
//! one stable token per app topic. Providers push to those tokens over
//! HTTPS on 8443 (HTTP/2 and HTTP/1.1): the APNs-compatible API
//! ([`apns`]) or Web Push ([`webpush`], RFC 8030/8291/8292).
//!
//! - [`core`]: the device session state machine, the offline queue policy
//!   and JWT checks; no I/O.
//! - [`courier`]: shared state (tokens, queues, who is online) and the
//!   group-commit writer: a push is in the database before its 2xx.
//! - [`store`]: sqlx on SQLite or PostgreSQL.
//! - [`device`]: the TLS and QUIC listeners that drive sessions.
//! - [`provider`]: the provider side (HTTP/2 client, APNs-style sender).
//! - [`cluster`]: shard leases and NATS messages between couriers on one
//!   PostgreSQL database.
//! - [`runtime`]: starts and stops all of it.

pub mod apns;
pub mod cluster;
pub mod core;
pub mod courier;
pub mod device;
pub mod error;
pub mod http;
mod lean_tls;
pub mod mailbox;
pub mod provider;
pub mod runtime;
pub mod store;
pub mod submit;
pub mod upstream;
pub mod webpush;

use std::net::SocketAddr;
use std::time::Duration;

pub use core::session::SessionConfig;
pub use error::Error;

/// A provider allowed to push through the APNs-style API.
#[derive(Clone, PartialEq, Eq)]
pub struct Provider {
    /// Name; also the CN of its client certificate, if it uses one.
    pub name: String,
    /// JWT `iss` (the APNs team id).
    pub team_id: String,
    /// JWT `kid`.
    pub key_id: String,
    /// Its ES256 public key, uncompressed P-256 (65 bytes); `None` for a
    /// provider that authenticates by client certificate only.
    pub public_key: Option<[u8; 65]>,
    /// Topics (app ids) it may push to; empty = any.
    pub topics: Vec<String>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("team_id", &self.team_id)
            .field("key_id", &self.key_id)
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// Courier configuration; [`Config::default`] is production-safe.
#[derive(Debug, Clone)]
pub struct Config {
    /// Device listener, TCP (TLS) and UDP (QUIC). Default 0.0.0.0:5223.
    pub device_listen: SocketAddr,
    /// Serve QUIC on the device port's UDP side. Default true.
    pub quic: bool,
    /// Provider HTTPS listener. Default 0.0.0.0:8443.
    pub provider_listen: SocketAddr,
    /// `sqlite://…` or `postgres://…`.
    pub database_url: String,
    /// Origin providers reach the courier at; Web Push endpoints are
    /// `<public_url>/wp/<token>` and VAPID `aud` must equal it. Empty (the
    /// default) = `https://localhost:<provider port>`.
    pub public_url: String,
    /// Stored messages per device. Default 100.
    pub queue_cap: usize,
    pub session: SessionConfig,
    /// Time for a device's TLS or QUIC handshake. Default 10 s.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; connections beyond are dropped
    /// and the device retries. Default 1024.
    pub max_handshakes: usize,
    /// TLS handshakes in progress at once from one source address (IPv6:
    /// one /64), so one host cannot hold every handshake slot. Default 64.
    pub max_handshakes_per_source: usize,
    /// How long a provider request's body may take to arrive. Default 10 s.
    pub provider_body_timeout: Duration,
    /// Open provider connections at most. Default 4096.
    pub max_provider_connections: usize,
    /// Open provider connections from one source address (IPv6: /64).
    /// Default 64.
    pub max_provider_connections_per_source: usize,
    /// Unwritten bytes to a device before it is a slow reader and is
    /// disconnected (its messages stay stored). Default 256 KiB.
    pub max_write_buffer: usize,
    /// Pushes per second per provider (burst the same). Default 20,000.
    pub provider_rate: u32,
    /// Pushes per second per Web Push subscription. Default 100.
    pub subscription_rate: u32,
    /// How long delivered/expired/dropped statuses stay queryable.
    /// Default 24 h.
    pub status_retention: Duration,
    /// Wait for the disk on every commit (SQLite `synchronous = FULL`).
    /// Off, a 2xx push survives the courier being killed but not the
    /// machine losing power (`synchronous = NORMAL`). Default true.
    pub fsync: bool,
    /// Largest group-commit batch. Default 2048 writes.
    pub max_batch: usize,
    pub providers: Vec<Provider>,
    /// Cluster mode (PostgreSQL and NATS); `None` = one node.
    pub cluster: Option<cluster::ClusterConfig>,
    /// Apple's and Google's services, to wake devices that sleep without
    /// the link. Default: none.
    pub platforms: upstream::wake::Platforms,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device_listen: SocketAddr::from(([0, 0, 0, 0], 5223)),
            quic: true,
            provider_listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            database_url: "sqlite://courier.db".into(),
            public_url: String::new(),
            queue_cap: 100,
            session: SessionConfig::default(),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            max_handshakes_per_source: 64,
            provider_body_timeout: Duration::from_secs(10),
            max_provider_connections: 4096,
            max_provider_connections_per_source: 64,
            max_write_buffer: 256 * 1024,
            provider_rate: 20_000,
            subscription_rate: 100,
            status_retention: Duration::from_secs(24 * 3600),
            fsync: true,
            max_batch: 2048,
            providers: Vec::new(),
            cluster: None,
            platforms: upstream::wake::Platforms::default(),
        }
    }
}

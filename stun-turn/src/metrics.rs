//! Counters for `/metrics`. Each worker owns one `Metrics` so the data path
//! only touches cache lines of its own core; [`render`] sums them. Every
//! label is from a fixed set: no user, token or address is ever a label.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why a request failed authentication (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credentials yet: the normal first round trip (401 challenge).
    Challenged,
    StaleNonce,
    InvalidNonce,
    UnknownUser,
    ExpiredCredential,
    BadIntegrity,
    WrongCredentials,
    BadRequest,
}

impl AuthFailure {
    const ALL: [AuthFailure; 8] = [
        AuthFailure::Challenged,
        AuthFailure::StaleNonce,
        AuthFailure::InvalidNonce,
        AuthFailure::UnknownUser,
        AuthFailure::ExpiredCredential,
        AuthFailure::BadIntegrity,
        AuthFailure::WrongCredentials,
        AuthFailure::BadRequest,
    ];
    fn label(self) -> &'static str {
        match self {
            AuthFailure::Challenged => "challenged",
            AuthFailure::StaleNonce => "stale_nonce",
            AuthFailure::InvalidNonce => "invalid_nonce",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::ExpiredCredential => "expired_credential",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::WrongCredentials => "wrong_credentials",
            AuthFailure::BadRequest => "bad_request",
        }
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub allocations: AtomicI64,
    pub permissions: AtomicI64,
    pub channels: AtomicI64,
    pub allocations_created: AtomicU64,
    pub binding_requests: AtomicU64,
    pub packets_to_peer: AtomicU64,
    pub bytes_to_peer: AtomicU64,
    pub packets_to_client: AtomicU64,
    pub bytes_to_client: AtomicU64,
    pub dropped_no_permission: AtomicU64,
    pub dropped_rate_limited: AtomicU64,
    pub peer_denied: AtomicU64,
    pub quota_rejected: AtomicU64,
    pub malformed: AtomicU64,
    /// RFC 6062 peer connections bound to a data connection.
    pub tcp_connections_bound: AtomicU64,
    auth_failures: [AtomicU64; 8],
}

impl Metrics {
    pub fn auth_failure(&self, why: AuthFailure) {
        self.auth_failures[why as usize].fetch_add(1, Relaxed);
    }
    pub fn auth_failures(&self, why: AuthFailure) -> u64 {
        self.auth_failures[why as usize].load(Relaxed)
    }
}

/// Writes the Prometheus text exposition of all workers' counters.
pub fn render(workers: &[std::sync::Arc<Metrics>], out: &mut String) {
    let sum_u =
        |f: fn(&Metrics) -> &AtomicU64| workers.iter().map(|m| f(m).load(Relaxed)).sum::<u64>();
    let sum_i =
        |f: fn(&Metrics) -> &AtomicI64| workers.iter().map(|m| f(m).load(Relaxed)).sum::<i64>();
    let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        out,
        "parley_turn_allocations",
        "Active TURN allocations.",
        sum_i(|m| &m.allocations),
    );
    gauge(
        out,
        "parley_turn_permissions",
        "Active permissions.",
        sum_i(|m| &m.permissions),
    );
    gauge(
        out,
        "parley_turn_channels",
        "Active channel bindings.",
        sum_i(|m| &m.channels),
    );
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    };
    counter(
        out,
        "parley_turn_allocations_created_total",
        "Allocations created.",
        sum_u(|m| &m.allocations_created),
    );
    counter(
        out,
        "parley_stun_binding_requests_total",
        "Binding requests answered.",
        sum_u(|m| &m.binding_requests),
    );
    let _ = writeln!(out, "# HELP parley_turn_relayed_packets_total Packets relayed, by direction.\n# TYPE parley_turn_relayed_packets_total counter");
    let _ = writeln!(
        out,
        "parley_turn_relayed_packets_total{{direction=\"to_peer\"}} {}",
        sum_u(|m| &m.packets_to_peer)
    );
    let _ = writeln!(
        out,
        "parley_turn_relayed_packets_total{{direction=\"to_client\"}} {}",
        sum_u(|m| &m.packets_to_client)
    );
    let _ = writeln!(out, "# HELP parley_turn_relayed_bytes_total Payload bytes relayed, by direction.\n# TYPE parley_turn_relayed_bytes_total counter");
    let _ = writeln!(
        out,
        "parley_turn_relayed_bytes_total{{direction=\"to_peer\"}} {}",
        sum_u(|m| &m.bytes_to_peer)
    );
    let _ = writeln!(
        out,
        "parley_turn_relayed_bytes_total{{direction=\"to_client\"}} {}",
        sum_u(|m| &m.bytes_to_client)
    );
    let _ = writeln!(out, "# HELP parley_turn_dropped_packets_total Packets not relayed, by reason.\n# TYPE parley_turn_dropped_packets_total counter");
    let _ = writeln!(
        out,
        "parley_turn_dropped_packets_total{{reason=\"no_permission\"}} {}",
        sum_u(|m| &m.dropped_no_permission)
    );
    let _ = writeln!(
        out,
        "parley_turn_dropped_packets_total{{reason=\"rate_limited\"}} {}",
        sum_u(|m| &m.dropped_rate_limited)
    );
    counter(
        out,
        "parley_turn_peer_denied_total",
        "Peer addresses refused by the peer policy (403).",
        sum_u(|m| &m.peer_denied),
    );
    counter(
        out,
        "parley_turn_quota_rejected_total",
        "Allocations refused by a quota (486/508).",
        sum_u(|m| &m.quota_rejected),
    );
    counter(
        out,
        "parley_turn_tcp_connections_bound_total",
        "RFC 6062 peer connections spliced to a client data connection.",
        sum_u(|m| &m.tcp_connections_bound),
    );
    counter(
        out,
        "parley_stun_malformed_total",
        "Datagrams that were not valid STUN or ChannelData.",
        sum_u(|m| &m.malformed),
    );
    let _ = writeln!(out, "# HELP parley_turn_auth_failures_total Requests that did not authenticate, by reason.\n# TYPE parley_turn_auth_failures_total counter");
    for why in AuthFailure::ALL {
        let v: u64 = workers.iter().map(|m| m.auth_failures(why)).sum();
        let _ = writeln!(
            out,
            "parley_turn_auth_failures_total{{reason=\"{}\"}} {v}",
            why.label()
        );
    }
}

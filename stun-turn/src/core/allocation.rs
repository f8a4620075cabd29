//! One TURN allocation: its relay sockets, permissions and channels
//! (RFC 8656 §6, §9, §12), and its bandwidth budget.

use super::{ClientAddr, RelayId};
use crate::channel_data::ChannelNumber;
use crate::message::TransactionId;
use rustc_hash::FxHashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(super) struct Allocation {
    pub client: ClientAddr,
    pub username: String,
    /// Relay sockets: index 0 IPv4, index 1 IPv6; address as advertised.
    pub relays: [Option<(RelayId, SocketAddr)>; 2],
    pub expires: Instant,
    /// Peer IP → permission expiry. Ports are not part of a permission (§9).
    pub permissions: FxHashMap<IpAddr, Instant>,
    /// Channel number → binding, kept through the cool-down after expiry.
    pub channels: FxHashMap<u16, Channel>,
    pub channel_of_peer: FxHashMap<SocketAddr, u16>,
    pub allocate_tid: TransactionId,
    /// The RESERVATION-TOKEN handed out with this allocation, for retransmits.
    pub reservation: Option<[u8; 8]>,
    pub up: TokenBucket,
    pub down: TokenBucket,
    /// The deadline queued in the server's timer heap for this allocation.
    pub scheduled: Option<Instant>,
    /// A TCP allocation (RFC 6062): the relay is a listener, not a socket.
    pub tcp: bool,
    /// RFC 6062 connections, with the deadline for binding each one
    /// (`None` once a data connection bound it).
    pub connections: Vec<(super::ConnectionId, Option<Instant>)>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Channel {
    pub peer: SocketAddr,
    pub expires: Instant,
}

impl Allocation {
    /// The relay socket that reaches `peer`'s address family.
    pub fn relay_for(&self, peer: SocketAddr) -> Option<RelayId> {
        self.relays[peer.is_ipv6() as usize].map(|r| r.0)
    }

    pub fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&ip).is_some_and(|&e| e > now)
    }

    /// Installs or refreshes a permission; true when it is new.
    pub fn permit(&mut self, ip: IpAddr, until: Instant) -> bool {
        self.permissions.insert(ip, until).is_none()
    }

    /// The live channel bound to `peer`.
    pub fn channel_for(&self, peer: SocketAddr, now: Instant) -> Option<ChannelNumber> {
        let n = *self.channel_of_peer.get(&peer)?;
        let c = self.channels.get(&n)?;
        (c.expires > now)
            .then(|| ChannelNumber::new(n).ok())
            .flatten()
    }

    pub fn live_permissions(&self) -> usize {
        self.permissions.len()
    }

    /// Channels not yet removed, counted once as live when bound.
    pub fn live_channels(&self) -> usize {
        self.channels.len()
    }

    /// Drops expired permissions and channels whose cool-down is over.
    /// Returns how many of each were dropped.
    pub fn sweep(&mut self, now: Instant, cooldown: Duration) -> (usize, usize) {
        let before = (self.permissions.len(), self.channels.len());
        self.permissions.retain(|_, e| *e > now);
        let mut gone = Vec::new();
        self.channels.retain(|n, c| {
            let keep = c.expires + cooldown > now;
            if !keep {
                gone.push(c.peer);
            }
            let _ = n;
            keep
        });
        for p in gone {
            self.channel_of_peer.remove(&p);
        }
        (
            before.0 - self.permissions.len(),
            before.1 - self.channels.len(),
        )
    }

    /// The earliest moment something of this allocation expires.
    pub fn next_deadline(&self, cooldown: Duration) -> Instant {
        let perms = self.permissions.values().copied();
        let chans = self.channels.values().map(|c| c.expires + cooldown);
        let conns = self.connections.iter().filter_map(|c| c.1);
        perms
            .chain(chans)
            .chain(conns)
            .fold(self.expires, Instant::min)
    }
}

/// Bytes per second with one second of burst. `rate == 0` means unlimited.
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: u64,
    tokens: u64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, now: Instant) -> Self {
        TokenBucket {
            rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes `n` bytes if available.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last);
        if !elapsed.is_zero() {
            let add = (elapsed.as_micros() as u64).saturating_mul(self.rate) / 1_000_000;
            if add > 0 {
                self.tokens = (self.tokens + add).min(self.rate);
                self.last = now;
            }
        }
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

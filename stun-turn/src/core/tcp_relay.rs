//! TCP allocations (RFC 6062): Connect, ConnectionAttempt, ConnectionBind.
//!
//! A TCP allocation's relay is a listener. The client asks the server to
//! connect to a peer (Connect) or hears of a peer that connected
//! (ConnectionAttempt); either way the peer connection gets a CONNECTION-ID.
//! The client then opens a new *data* connection and sends ConnectionBind
//! with that id; after the success response the two TCP connections are
//! spliced and carry raw bytes. An id not bound within 30 s is closed.
//!
//! The data connection may reach another worker than the one holding the
//! allocation, so ids live in [`super::Shared`]; the core only decides, and
//! the runtime hands sockets over.

use super::{Auth, ConnectionId, Event, Reply, Server, Transmit, Transport};
use crate::message::{AttrType, Class, ErrorCode, Message, MessageBuilder, Method, TransactionId};
use rand::Rng;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long a peer connection waits for its ConnectionBind (RFC 6062 §5.2, §5.3).
const BIND_WINDOW: Duration = Duration::from_secs(30);
/// Peer connections one allocation may hold at once.
const MAX_CONNECTIONS: usize = 256;

/// A connection id's state, shared by all workers.
#[derive(Debug)]
pub(crate) struct ConnEntry {
    username: String,
    peer: SocketAddr,
    state: ConnState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// Connect sent; the runtime is opening the TCP connection.
    Connecting,
    /// Peer connection open, waiting for ConnectionBind.
    Ready,
    /// Spliced to a data connection.
    Bound,
}

impl Server {
    /// RFC 6062 §5.2 Connect on a control connection.
    pub(super) fn handle_connect(&mut self, reply: Reply, auth: Auth, msg: &Message<'_>) {
        let Some(&slot) = self.by_client.get(&reply.to) else {
            return self.error(reply, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        };
        let Ok(Some(peer)) = msg.xor_address(AttrType::XorPeerAddress) else {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        };
        if !self.slots[slot].as_ref().is_some_and(|a| a.tcp) {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        if let Err(code) = self.check_peer(slot, peer, true) {
            return self.error(reply, code, Some(&auth));
        }
        let Some(a) = self.slots[slot].as_ref() else {
            return;
        };
        let ids: Vec<ConnectionId> = a.connections.iter().map(|c| c.0).collect();
        {
            let reg = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if ids
                .iter()
                .any(|id| reg.get(&id.0).is_some_and(|e| e.peer == peer))
            {
                drop(reg);
                return self.error(reply, ErrorCode::CONNECTION_ALREADY_EXISTS, Some(&auth));
            }
        }
        if ids.len() >= MAX_CONNECTIONS {
            return self.error(reply, ErrorCode::FORBIDDEN, Some(&auth));
        }
        let Some(from) = self.bound_relay_addr(slot, peer) else {
            return self.error(reply, ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH, Some(&auth));
        };
        let conn = self.new_connection(&auth.username, peer, ConnState::Connecting);
        if let Some(a) = self.slots[slot].as_mut() {
            a.connections.push((conn, None));
        }
        self.connecting.insert(conn, (reply, auth, slot));
        self.events
            .push_back(Event::ConnectPeer { conn, from, peer });
    }

    /// The runtime's answer to [`Event::ConnectPeer`]: whether the TCP
    /// connection to the peer opened.
    pub fn handle_peer_connected(&mut self, conn: ConnectionId, ok: bool, now: Instant) {
        let Some((reply, auth, slot)) = self.connecting.remove(&conn) else {
            if ok {
                self.events.push_back(Event::ClosePeer { conn });
            }
            return;
        };
        let alive = self.slots[slot]
            .as_ref()
            .is_some_and(|a| a.client == reply.to);
        if !alive {
            return self.close_connection(conn);
        }
        if !ok {
            self.shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&conn.0);
            if let Some(a) = self.slots[slot].as_mut() {
                a.connections.retain(|c| c.0 != conn);
            }
            return self.error(reply, ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE, Some(&auth));
        }
        self.set_state(conn, ConnState::Ready);
        if let Some(a) = self.slots[slot].as_mut() {
            if let Some(c) = a.connections.iter_mut().find(|c| c.0 == conn) {
                c.1 = Some(now + BIND_WINDOW);
            }
        }
        self.schedule(slot);
        let mut out = Vec::with_capacity(64);
        let mut b = MessageBuilder::new(&mut out, Class::Success, Method::Connect, reply.tid);
        b.add_u32(AttrType::ConnectionId, conn.0);
        self.finish(b, reply, Some(&auth));
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    /// A peer connected to TCP relay `relay`. Returns the connection id the
    /// runtime files the socket under, or `None` to close it (no permission).
    pub fn handle_peer_accepted(
        &mut self,
        relay: super::RelayId,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<ConnectionId> {
        let slot = *self.by_relay.get(&relay)?;
        let a = self.slots[slot].as_ref()?;
        if !a.tcp || !a.has_permission(peer.ip(), now) || a.connections.len() >= MAX_CONNECTIONS {
            self.metrics
                .dropped_no_permission
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return None;
        }
        let client = a.client;
        let conn = self.new_connection(&a.username.clone(), peer, ConnState::Ready);
        if let Some(a) = self.slots[slot].as_mut() {
            a.connections.push((conn, Some(now + BIND_WINDOW)));
        }
        self.schedule(slot);
        // RFC 6062 §5.4: a ConnectionAttempt indication (the method has
        // only indication semantics) on the control connection.
        let mut tid = [0u8; 12];
        self.rng.fill(&mut tid);
        let mut out = Vec::with_capacity(64);
        let mut b = MessageBuilder::new(
            &mut out,
            Class::Indication,
            Method::ConnectionAttempt,
            TransactionId(tid),
        );
        b.add_xor_address(AttrType::XorPeerAddress, peer);
        b.add_u32(AttrType::ConnectionId, conn.0);
        self.transmits.push_back(Transmit {
            to: client,
            from: client.local,
            bytes: out,
        });
        Some(conn)
    }

    /// RFC 6062 §5.3 ConnectionBind on a new data connection.
    pub(super) fn handle_connection_bind(&mut self, reply: Reply, auth: Auth, msg: &Message<'_>) {
        if reply.to.transport == Transport::Udp || self.by_client.contains_key(&reply.to) {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let Ok(Some(id)) = msg.u32_attr(AttrType::ConnectionId) else {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        };
        let bound = {
            let mut reg = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            match reg.get_mut(&id) {
                Some(e) if e.state == ConnState::Ready && e.username == auth.username => {
                    e.state = ConnState::Bound;
                    true
                }
                _ => false,
            }
        };
        if !bound {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        self.metrics
            .tcp_connections_bound
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::with_capacity(48);
        let b = MessageBuilder::new(&mut out, Class::Success, Method::ConnectionBind, reply.tid);
        self.finish(b, reply, Some(&auth));
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
        self.events.push_back(Event::Splice {
            conn: ConnectionId(id),
            client: reply.to,
        });
    }

    /// Closes connections of `slot` whose bind window ended unbound.
    pub(super) fn expire_connections(&mut self, slot: usize, now: Instant) {
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let due: Vec<ConnectionId> = a
            .connections
            .iter()
            .filter(|c| c.1.is_some_and(|d| d <= now))
            .map(|c| c.0)
            .collect();
        if due.is_empty() {
            return;
        }
        let mut expired = Vec::new();
        {
            let mut reg = self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for id in &due {
                match reg.get(&id.0).map(|e| e.state) {
                    Some(ConnState::Bound) => {}
                    _ => {
                        reg.remove(&id.0);
                        expired.push(*id);
                    }
                }
            }
        }
        for c in a.connections.iter_mut() {
            if due.contains(&c.0) {
                c.1 = None;
            }
        }
        a.connections.retain(|c| !expired.contains(&c.0));
        for conn in expired {
            self.events.push_back(Event::ClosePeer { conn });
        }
    }

    /// Forgets a connection id and tells the runtime to close its sockets.
    pub(super) fn close_connection(&mut self, conn: ConnectionId) {
        self.shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&conn.0);
        self.connecting.remove(&conn);
        self.events.push_back(Event::ClosePeer { conn });
    }

    fn new_connection(
        &mut self,
        username: &str,
        peer: SocketAddr,
        state: ConnState,
    ) -> ConnectionId {
        let mut reg = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        loop {
            let id: u32 = self.rng.gen();
            if id != 0 && !reg.contains_key(&id) {
                reg.insert(
                    id,
                    ConnEntry {
                        username: username.to_owned(),
                        peer,
                        state,
                    },
                );
                return ConnectionId(id);
            }
        }
    }

    fn set_state(&self, conn: ConnectionId, state: ConnState) {
        if let Some(e) = self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&conn.0)
        {
            e.state = state;
        }
    }

    /// The local address the allocation's relay for `peer`'s family is
    /// bound to (not the advertised one, which may be a NAT's).
    fn bound_relay_addr(&self, slot: usize, peer: SocketAddr) -> Option<SocketAddr> {
        let a = self.slots[slot].as_ref()?;
        let (_, adv) = a.relays[peer.is_ipv6() as usize]?;
        let cfg = &self.shared.config;
        let ip = if peer.is_ipv6() {
            cfg.relay_ipv6?
        } else {
            cfg.relay_ipv4?
        };
        Some(SocketAddr::new(ip, adv.port()))
    }
}

//! The requests that make and keep allocations: Allocate (RFC 8656 §7),
//! Refresh, CreatePermission and ChannelBind; relay addresses, lifetimes,
//! quotas and the expiry schedule.

use super::*;

impl Server {
    pub(super) fn handle_allocate(
        &mut self,
        reply: Reply,
        auth: Auth,
        msg: &Message<'_>,
        now: Instant,
    ) {
        if let Some(&slot) = self.by_client.get(&reply.to) {
            // A retransmission gets the same success; anything else is a 437.
            let same = self.slots[slot]
                .as_ref()
                .is_some_and(|a| a.allocate_tid == reply.tid);
            if same {
                self.allocate_success(slot, reply, &auth, now, None);
            } else {
                self.error(reply, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
            }
            return;
        }
        // UDP, or TCP over a stream control connection (RFC 6062 §5.1).
        let tcp = match msg.attr(AttrType::RequestedTransport) {
            Some([17, 0, 0, 0]) => false,
            Some([6, 0, 0, 0]) if reply.to.transport != Transport::Udp => true,
            Some([6, 0, 0, 0]) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
            Some([_, 0, 0, 0]) => {
                return self.error(reply, ErrorCode::UNSUPPORTED_TRANSPORT, Some(&auth))
            }
            _ => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        };
        // EVEN-PORT (R bit: also hold the next port) and RESERVATION-TOKEN
        // (claim a port held that way), RFC 8656 §7.2.
        let even = match msg.attr(AttrType::EvenPort) {
            None => None,
            Some(v) if !v.is_empty() => Some(v[0] & 0x80 != 0),
            Some(_) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        };
        let token: Option<[u8; 8]> = match msg.attr(AttrType::ReservationToken) {
            None => None,
            Some(v) => match v.try_into() {
                Ok(t) => Some(t),
                Err(_) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
            },
        };
        if token.is_some()
            && (even.is_some()
                || msg.has(AttrType::RequestedAddressFamily)
                || msg.has(AttrType::AdditionalAddressFamily))
        {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let requested = msg
            .attr(AttrType::RequestedAddressFamily)
            .map(|v| decode_family(v, "REQUESTED-ADDRESS-FAMILY"));
        let additional = msg
            .attr(AttrType::AdditionalAddressFamily)
            .map(|v| decode_family(v, "ADDITIONAL-ADDRESS-FAMILY"));
        let mut wanted = Vec::with_capacity(2);
        match (requested, additional) {
            (Some(_), Some(_)) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
            (Some(Ok(Some(f))), None) => wanted.push(f),
            (Some(Ok(None)), None) => {
                return self.error(reply, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED, Some(&auth))
            }
            (None, Some(Ok(Some(Family::V6)))) => {
                wanted.push(Family::V4);
                wanted.push(Family::V6);
            }
            // ADDITIONAL-ADDRESS-FAMILY may only ask for IPv6 (RFC 8656 §18.11).
            (None, Some(_)) | (Some(Err(_)), None) => {
                return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth))
            }
            (None, None) => wanted.push(Family::V4),
        }
        let cfg = &self.shared.config;
        let mut address_error = None;
        wanted.retain(|&f| {
            let ok = match f {
                Family::V4 => cfg.relay_ipv4.is_some(),
                Family::V6 => cfg.relay_ipv6.is_some(),
            };
            if !ok {
                address_error = Some((f, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED));
            }
            ok
        });
        if wanted.is_empty() {
            return self.error(reply, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED, Some(&auth));
        }
        let lifetime = match self.requested_lifetime(msg) {
            Ok(l) => l,
            Err(()) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        };
        if lifetime.is_zero() {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let quota = self
            .shared
            .quotas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acquire(&auth.username, reply.to.remote.ip(), cfg);
        if let Err(code) = quota {
            self.metrics
                .quota_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.error(reply, code, Some(&auth));
        }
        let mut p = Pending {
            reply,
            auth,
            lifetime,
            wanted: wanted.clone(),
            bound: Vec::new(),
            waiting: Vec::new(),
            address_error,
            dont_fragment: msg.has(AttrType::DontFragment),
            even,
            tcp,
        };
        if let Some(t) = token {
            // The reserved port is bound as it is, with no second try.
            if let Some(addr) = self.shared.take_reservation(&t, now) {
                let id = self.next_relay_id();
                let f = Family::of(addr.ip());
                p.wanted = vec![f];
                self.request_bind(&mut p, reply.to, f, id, addr, BIND_ATTEMPTS);
            }
            wanted = Vec::new();
        }
        for f in wanted {
            let Some((id, addr)) = self.pick_relay(f, even, now) else {
                continue;
            };
            self.request_bind(&mut p, reply.to, f, id, addr, 0);
        }
        if p.waiting.is_empty() {
            self.release_quota(&p.auth.username, reply.to.remote.ip());
            self.metrics
                .quota_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.error(reply, ErrorCode::INSUFFICIENT_CAPACITY, Some(&p.auth));
        }
        self.pending.insert(reply.to, p);
    }

    /// Asks the runtime to bind relay `id` at `addr` for a pending Allocate.
    pub(super) fn request_bind(
        &mut self,
        p: &mut Pending,
        client: ClientAddr,
        family: Family,
        id: RelayId,
        addr: SocketAddr,
        attempts: u32,
    ) {
        p.waiting.push((family, id, attempts, addr.port()));
        self.pending_relay.insert(id, client);
        self.events.push_back(Event::BindRelay {
            relay: id,
            addr,
            dont_fragment: p.dont_fragment,
            tcp: p.tcp,
        });
    }

    pub(super) fn finish_allocate(&mut self, client: ClientAddr, p: Pending, now: Instant) {
        if p.bound.is_empty() {
            self.release_quota(&p.auth.username, client.remote.ip());
            self.metrics
                .quota_rejected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.error(p.reply, ErrorCode::INSUFFICIENT_CAPACITY, Some(&p.auth));
        }
        let cfg = &self.shared.config;
        let mut relays = [None, None];
        for &(family, id, bound) in &p.bound {
            let advertised = match (family, cfg.external_ipv4) {
                (Family::V4, Some(ext)) => SocketAddr::new(ext, bound.port()),
                _ => bound,
            };
            relays[(family == Family::V6) as usize] = Some((id, advertised));
        }
        let max_bps = cfg.max_bytes_per_sec;
        // EVEN-PORT with the R bit holds the IPv4 relay's odd neighbour.
        let v4 = p.bound.iter().find(|b| b.0 == Family::V4).map(|b| b.2);
        let reservation = v4.filter(|_| p.even == Some(true)).map(|b| {
            let mut token = [0u8; 8];
            self.rng.fill(&mut token);
            let next = SocketAddr::new(b.ip(), b.port() + 1);
            let until = now + RESERVATION_LIFETIME;
            self.shared.reserve(token, next, until, now);
            self.events.push_back(Event::HoldPort { addr: next, until });
            token
        });
        let a = Allocation {
            reservation,
            client,
            username: p.auth.username.clone(),
            relays,
            expires: now + p.lifetime,
            permissions: FxHashMap::default(),
            channels: FxHashMap::default(),
            channel_of_peer: FxHashMap::default(),
            allocate_tid: p.reply.tid,
            up: TokenBucket::new(max_bps, now),
            down: TokenBucket::new(max_bps, now),
            scheduled: None,
            tcp: p.tcp,
            connections: Vec::new(),
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.slots[s] = Some(a);
                s
            }
            None => {
                self.slots.push(Some(a));
                self.slots.len() - 1
            }
        };
        self.by_client.insert(client, slot);
        for &(_, id, _) in &p.bound {
            self.by_relay.insert(id, slot);
        }
        self.schedule(slot);
        self.metrics
            .allocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .allocations_created
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(user = %redact(&p.auth.username), transport = ?client.transport, "allocation created");
        self.allocate_success(slot, p.reply, &p.auth, now, p.address_error);
    }

    pub(super) fn allocate_success(
        &mut self,
        slot: usize,
        reply: Reply,
        auth: &Auth,
        now: Instant,
        address_error: Option<(Family, ErrorCode)>,
    ) {
        let Some(a) = self.slots[slot].as_ref() else {
            return;
        };
        let lifetime = a.expires.saturating_duration_since(now).as_secs() as u32;
        let relays: Vec<SocketAddr> = a.relays.iter().flatten().map(|r| r.1).collect();
        let reservation = a.reservation;
        let mut out = Vec::with_capacity(128);
        let mut b = MessageBuilder::new(&mut out, Class::Success, Method::Allocate, reply.tid);
        for r in relays {
            b.add_xor_address(AttrType::XorRelayedAddress, r);
        }
        b.add_u32(AttrType::Lifetime, lifetime);
        if let Some(t) = reservation {
            b.add_attr(AttrType::ReservationToken, &t);
        }
        b.add_xor_address(AttrType::XorMappedAddress, reply.to.remote);
        if let Some((f, code)) = address_error {
            let c = code.0;
            b.add_with(AttrType::AddressErrorCode as u16, 4, |o| {
                o.extend_from_slice(&[f.code(), 0, (c / 100) as u8, (c % 100) as u8])
            });
        }
        self.finish(b, reply, Some(auth));
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    pub(super) fn handle_refresh(
        &mut self,
        reply: Reply,
        auth: Auth,
        msg: &Message<'_>,
        now: Instant,
    ) {
        let Some(&slot) = self.by_client.get(&reply.to) else {
            return self.error(reply, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        };
        let lifetime = match self.requested_lifetime(msg) {
            Ok(l) => l,
            Err(()) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        };
        if let Some(v) = msg.attr(AttrType::RequestedAddressFamily) {
            let fam = decode_family(v, "REQUESTED-ADDRESS-FAMILY").ok().flatten();
            let has = fam.is_some_and(|f| {
                self.slots[slot]
                    .as_ref()
                    .is_some_and(|a| a.relays[(f == Family::V6) as usize].is_some())
            });
            if !has {
                return self.error(reply, ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH, Some(&auth));
            }
        }
        if lifetime.is_zero() {
            self.delete_allocation(slot);
        } else if let Some(a) = self.slots[slot].as_mut() {
            a.expires = now + lifetime;
            self.schedule(slot);
        }
        let mut out = Vec::with_capacity(64);
        let mut b = MessageBuilder::new(&mut out, Class::Success, Method::Refresh, reply.tid);
        b.add_u32(AttrType::Lifetime, lifetime.as_secs() as u32);
        self.finish(b, reply, Some(&auth));
        self.transmits.push_back(Transmit {
            to: reply.to,
            from: reply.to.local,
            bytes: out,
        });
    }

    pub(super) fn handle_create_permission(
        &mut self,
        reply: Reply,
        auth: Auth,
        msg: &Message<'_>,
        now: Instant,
    ) {
        let Some(&slot) = self.by_client.get(&reply.to) else {
            return self.error(reply, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        };
        let mut peers = Vec::with_capacity(4);
        for p in msg.xor_addresses(AttrType::XorPeerAddress) {
            match p {
                Ok(p) => peers.push(p),
                Err(_) => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
            }
        }
        if peers.is_empty() {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        // All or nothing (RFC 8656 §10.2).
        for &p in &peers {
            if let Err(code) = self.check_peer(slot, p, false) {
                return self.error(reply, code, Some(&auth));
            }
        }
        let lifetime = self.shared.config.permission_lifetime;
        let mut added = 0;
        if let Some(a) = self.slots[slot].as_mut() {
            for p in peers {
                added += a.permit(p.ip(), now + lifetime) as i64;
            }
        }
        self.metrics
            .permissions
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        self.schedule(slot);
        self.empty_success(reply, &auth);
    }

    pub(super) fn handle_channel_bind(
        &mut self,
        reply: Reply,
        auth: Auth,
        msg: &Message<'_>,
        now: Instant,
    ) {
        let Some(&slot) = self.by_client.get(&reply.to) else {
            return self.error(reply, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        };
        // A TCP allocation has no channels (RFC 6062 §5.3).
        if self.slots[slot].as_ref().is_some_and(|a| a.tcp) {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let ch = match msg.attr(AttrType::ChannelNumber) {
            Some(v) if v.len() == 4 => ChannelNumber::new(u16::from_be_bytes([v[0], v[1]])),
            _ => return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth)),
        };
        let (Ok(ch), Ok(Some(peer))) = (ch, msg.xor_address(AttrType::XorPeerAddress)) else {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        };
        if let Err(code) = self.check_peer(slot, peer, true) {
            return self.error(reply, code, Some(&auth));
        }
        let cfg = &self.shared.config;
        let (perm_life, chan_life) = (cfg.permission_lifetime, cfg.channel_lifetime);
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        // A number is bound to one peer and a peer to one number, including
        // during the cool-down after expiry (RFC 8656 §12).
        let number_taken = a.channels.get(&ch.get()).is_some_and(|c| c.peer != peer);
        let peer_taken = a.channel_of_peer.get(&peer).is_some_and(|&n| n != ch.get());
        if number_taken || peer_taken {
            return self.error(reply, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let new_perm = a.permit(peer.ip(), now + perm_life) as i64;
        let fresh = a
            .channels
            .insert(
                ch.get(),
                Channel {
                    peer,
                    expires: now + chan_life,
                },
            )
            .is_none_or(|c| c.expires <= now);
        a.channel_of_peer.insert(peer, ch.get());
        self.metrics
            .permissions
            .fetch_add(new_perm, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .channels
            .fetch_add(fresh as i64, std::sync::atomic::Ordering::Relaxed);
        self.schedule(slot);
        self.empty_success(reply, &auth);
    }

    /// `port_matters`: the request names a transport address data will go
    /// to (ChannelBind, Connect), not a permission, which ignores the port.
    pub(super) fn check_peer(
        &mut self,
        slot: usize,
        peer: SocketAddr,
        port_matters: bool,
    ) -> Result<(), ErrorCode> {
        let verdict = match port_matters {
            true => self.shared.policy.check(peer),
            false => self.shared.policy.check_ip(peer.ip()),
        };
        if verdict.is_err() {
            self.metrics
                .peer_denied
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!("peer refused by policy");
            return Err(ErrorCode::FORBIDDEN);
        }
        let has_family = self.slots[slot]
            .as_ref()
            .is_some_and(|a| a.relay_for(peer).is_some());
        if !has_family {
            return Err(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        Ok(())
    }

    pub(super) fn requested_lifetime(&self, msg: &Message<'_>) -> Result<Duration, ()> {
        let cfg = &self.shared.config;
        match msg.u32_attr(AttrType::Lifetime) {
            Err(_) => Err(()),
            Ok(None) => Ok(cfg.default_lifetime),
            Ok(Some(0)) => Ok(Duration::ZERO),
            // RFC 8656 §7.2: at least the default, at most the server maximum.
            Ok(Some(s)) => {
                Ok(Duration::from_secs(u64::from(s)).clamp(cfg.default_lifetime, cfg.max_lifetime))
            }
        }
    }

    /// A free relay port of this worker's share. Ports are split between
    /// workers in pairs (`port / 2 % workers`) so every worker can offer an
    /// even port with its odd neighbour (EVEN-PORT).
    pub(super) fn pick_relay(
        &mut self,
        family: Family,
        even: Option<bool>,
        now: Instant,
    ) -> Option<(RelayId, SocketAddr)> {
        let cfg = &self.shared.config;
        let ip = match family {
            Family::V4 => cfg.relay_ipv4?,
            Family::V6 => cfg.relay_ipv6?,
        };
        let (lo, hi) = (u32::from(cfg.min_port), u32::from(cfg.max_port));
        let (w, n) = (u32::from(self.worker), u32::from(self.workers));
        let span = hi - lo + 1;
        let start = self.rng.gen_range(0..span);
        for i in 0..span {
            let port = lo + (start + i) % span;
            if (port / 2) % n != w || self.used_ports.contains(&(family, port as u16)) {
                continue;
            }
            if even.is_some() && port % 2 != 0 {
                continue;
            }
            let addr = SocketAddr::new(ip, port as u16);
            if self.shared.is_reserved(addr, now) {
                continue;
            }
            if even == Some(true) {
                let next = SocketAddr::new(ip, (port + 1) as u16);
                if port + 1 > hi
                    || self.used_ports.contains(&(family, next.port()))
                    || self.shared.is_reserved(next, now)
                {
                    continue;
                }
            }
            self.used_ports.insert((family, port as u16));
            return Some((self.next_relay_id(), addr));
        }
        None
    }

    pub(super) fn next_relay_id(&mut self) -> RelayId {
        let id = RelayId(self.next_relay);
        self.next_relay = self.next_relay.wrapping_add(1).max(1);
        id
    }

    pub(super) fn delete_allocation(&mut self, slot: usize) {
        let Some(a) = self.slots[slot].take() else {
            return;
        };
        self.free_slots.push(slot);
        self.by_client.remove(&a.client);
        for (i, r) in a.relays.iter().enumerate() {
            if let Some((id, addr)) = r {
                self.by_relay.remove(id);
                let fam = if i == 0 { Family::V4 } else { Family::V6 };
                self.used_ports.remove(&(fam, addr.port()));
                self.events.push_back(Event::ReleaseRelay { relay: *id });
            }
        }
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics.allocations.fetch_sub(1, Relaxed);
        self.metrics
            .permissions
            .fetch_sub(a.live_permissions() as i64, Relaxed);
        self.metrics
            .channels
            .fetch_sub(a.live_channels() as i64, Relaxed);
        self.release_quota(&a.username, a.client.remote.ip());
        // RFC 6062 §5.5: the allocation's connections close with it.
        for (conn, _) in a.connections {
            self.close_connection(conn);
        }
    }

    pub(super) fn release_quota(&self, user: &str, ip: IpAddr) {
        self.shared
            .quotas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release(user, ip);
    }

    pub(super) fn schedule(&mut self, slot: usize) {
        let Some(a) = self.slots[slot].as_mut() else {
            return;
        };
        let next = a.next_deadline(CHANNEL_COOLDOWN);
        if a.scheduled.is_none_or(|s| next < s) {
            a.scheduled = Some(next);
            self.timers.push(Reverse((next, slot)));
        }
    }
}

//! Transactions and timers, and the helpers every part sends with.

use super::*;

impl Proxy {
    pub(super) fn arm_client(&mut self, key: &str, tx: &ClientTx, now: Instant) {
        if !tx.flow.transport.reliable() {
            self.timers.at(
                now + self.config.t1,
                Timer::Client(key.to_string(), CState::Calling, 1),
            );
        }
        // Timer B / F.
        self.timers.at(
            now + 64 * self.config.t1,
            Timer::Client(key.to_string(), CState::Calling, 0),
        );
    }

    pub(super) fn fire(&mut self, t: Timer, now: Instant) {
        match t {
            Timer::Client(key, armed, n) => self.client_timer(&key, armed, n, now),
            Timer::Server(key, armed, n) => self.server_timer(&key, armed, n, now),
            Timer::Ring(id) => {
                let Some(f) = self.forks.get(&id) else {
                    return;
                };
                if f.final_sent {
                    return;
                }
                let rang = f.rang;
                self.cancel_branches(id, None, None, now);
                if let Some(f) = self.forks.get_mut(&id) {
                    f.waiting.clear();
                }
                self.metrics.calls_no_answer += 1;
                if rang {
                    self.finish(id, 480, "Temporarily Unavailable", now);
                } else {
                    self.finish(id, 408, "Request Timeout", now);
                }
            }
            Timer::PushWindow(id) => {
                let Some(f) = self.forks.get_mut(&id) else {
                    return;
                };
                if f.waiting.is_empty() {
                    return;
                }
                f.waiting.clear();
                let h = f.handle.clone();
                self.prune_waiting(&h);
                self.maybe_finish(id, now);
            }
            Timer::Sweep => {
                self.registrar.sweep(now);
                self.limiter.prune(now);
                self.wake_limiter.prune(now);
                self.nonce_counts
                    .prune(Duration::from_secs(self.clock(now)));
                self.timers.at(now + SWEEP_EVERY, Timer::Sweep);
            }
        }
    }

    pub(super) fn client_timer(&mut self, key: &str, armed: CState, n: u32, now: Instant) {
        let (t1, t2) = (self.config.t1, self.config.t2);
        let Some(tx) = self.clients.get_mut(key) else {
            return;
        };
        if armed == CState::Completed {
            // Timer D / K: the transaction ends.
            if tx.state == CState::Completed {
                self.clients.remove(key);
            }
            return;
        }
        if tx.state == CState::Completed {
            return;
        }
        if n == 0 {
            // Timer B / F: no final response. For INVITE in Proceeding the
            // ring timeout governs instead (a proxy's Timer C).
            if tx.invite && tx.state == CState::Proceeding {
                return;
            }
            let fork = tx.fork;
            let request = tx.request.clone();
            self.clients.remove(key);
            if let Some(id) = fork {
                // As if the branch had answered 408 (§16.7 step 2), with
                // our own Via already taken off like any response's.
                let mut timeout =
                    Message::response_to(&request, 408, "Request Timeout", Some("tmo"));
                timeout.pop_first(&HeaderName::VIA);
                self.fork_response(id, key, timeout, now);
            }
            return;
        }
        // Timer A / E: retransmit (INVITE only while Calling; non-INVITE
        // until a final, at T2 once Proceeding).
        if n != tx.sent + 1 || (tx.invite && tx.state != CState::Calling) {
            return;
        }
        tx.sent = n;
        let next = match (tx.invite, tx.state) {
            (true, _) => t1 * 2u32.pow(n.min(10)),
            (false, CState::Proceeding) => t2,
            (false, _) => (t1 * 2u32.pow(n.min(10))).min(t2),
        };
        let (bytes, flow) = (tx.bytes.clone(), tx.flow);
        self.metrics.retransmissions += 1;
        self.send(flow, bytes);
        self.timers.at(
            now + next,
            Timer::Client(key.to_string(), CState::Calling, n + 1),
        );
    }

    pub(super) fn server_timer(&mut self, key: &str, armed: SState, n: u32, now: Instant) {
        let (t1, t2) = (self.config.t1, self.config.t2);
        let Some(tx) = self.servers.get_mut(key) else {
            return;
        };
        if tx.state != armed {
            return;
        }
        match (armed, n) {
            (SState::Completed, n) if n > 0 && tx.invite => {
                // Timer G: retransmit the final until ACKed.
                if n != tx.sent + 1 {
                    return;
                }
                tx.sent = n;
                if let Some(last) = tx.last.clone() {
                    let flow = tx.reply_flow;
                    self.metrics.retransmissions += 1;
                    self.send(flow, last);
                }
                let next = (t1 * 2u32.pow(n.min(10))).min(t2);
                self.timers.at(
                    now + next,
                    Timer::Server(key.to_string(), SState::Completed, n + 1),
                );
            }
            _ => {
                // H, I, J, L: the transaction ends.
                let fork = tx.fork;
                self.servers.remove(key);
                if let Some(id) = fork {
                    self.drop_fork(id);
                }
            }
        }
    }

    pub(super) fn start_server(
        &mut self,
        key: &str,
        source: Source,
        req: &Message,
        fork: Option<u64>,
    ) {
        let reply_flow = reply_flow(&source, req);
        let to_tag = self.tokens.digest(key.as_bytes())[..10].to_string();
        self.servers.insert(
            key.to_string(),
            ServerTx {
                invite: req.method() == Some(&Method::Invite),
                state: SState::Proceeding,
                request: Some(req.clone()),
                reply_flow,
                last: None,
                fork,
                to_tag,
                sent: 0,
            },
        );
    }

    pub(super) fn response(&self, key: &str, req: &Message, code: u16, reason: &str) -> Message {
        let tag = self.servers.get(key).map(|t| t.to_tag.as_str());
        Message::response_to(req, code, reason, tag)
    }

    /// Our own final response in an existing server transaction.
    pub(super) fn respond(&mut self, key: &str, code: u16, reason: &str, now: Instant) {
        let Some(req) = self.servers.get(key).and_then(|tx| tx.request.clone()) else {
            return; // the final response was sent already
        };
        let resp = self.response(key, &req, code, reason);
        self.send_response(key, resp, now);
    }

    /// A response from downstream, sent upstream in its server transaction.
    pub(super) fn relay_response(&mut self, key: &str, resp: Message, now: Instant) {
        self.send_response(key, resp, now);
    }

    /// Sends a response in a server transaction and moves it on (§17.2).
    pub(super) fn send_response(&mut self, key: &str, resp: Message, now: Instant) {
        let code = resp.code().unwrap_or(500);
        let bytes = resp.to_bytes();
        let (t1, t4) = (self.config.t1, self.config.t4);
        let Some(tx) = self.servers.get_mut(key) else {
            // No transaction (it ended): a late 2xx still goes upstream.
            return;
        };
        let flow = tx.reply_flow;
        let reliable = flow.transport.reliable();
        if code >= 200 && tx.state == SState::Proceeding {
            if tx.invite && code < 300 {
                tx.state = SState::Accepted;
                self.timers.at(
                    now + 64 * t1,
                    Timer::Server(key.to_string(), SState::Accepted, 0),
                );
            } else {
                tx.state = SState::Completed;
                if tx.invite {
                    if !reliable {
                        self.timers.at(
                            now + t1,
                            Timer::Server(key.to_string(), SState::Completed, 1),
                        );
                    }
                    // Timer H.
                    self.timers.at(
                        now + 64 * t1,
                        Timer::Server(key.to_string(), SState::Completed, 0),
                    );
                } else {
                    // Timer J.
                    let wait = if reliable { Duration::ZERO } else { 64 * t1 };
                    let _ = t4;
                    self.timers.at(
                        now + wait,
                        Timer::Server(key.to_string(), SState::Completed, 0),
                    );
                }
            }
        }
        // In Accepted, retransmitted INVITEs are absorbed (RFC 6026 §7.1).
        tx.last = (tx.state != SState::Accepted).then(|| bytes.clone());
        let release = if code >= 200 {
            tx.request = None;
            tx.fork
        } else {
            None
        };
        self.send(flow, bytes);
        if let Some(id) = release {
            self.release_fork(key, id);
        }
    }

    /// After the final response a fork is kept only while a branch still
    /// waits for a provisional before its CANCEL can go (§9.1); calls
    /// that are answered or over then cost only their transaction entry.
    pub(super) fn release_fork(&mut self, key: &str, id: u64) {
        let pending = self
            .forks
            .get(&id)
            .is_some_and(|f| f.branches.iter().any(|b| b.cancel_pending.is_some()));
        if pending {
            return;
        }
        self.drop_fork(id);
        if let Some(tx) = self.servers.get_mut(key) {
            tx.fork = None;
        }
    }

    pub(super) fn send(&mut self, flow: Flow, bytes: Vec<u8>) {
        self.transmits.push_back(Transmit { flow, bytes });
    }

    pub(super) fn next_id(&mut self) -> u64 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    pub(super) fn our_addr(&self, transport: Transport) -> SocketAddr {
        self.config
            .advertise
            .iter()
            .find(|(t, _)| *t == transport)
            .or_else(|| self.config.advertise.first())
            .map(|(_, a)| *a)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5060)))
    }

    /// Seconds on the proxy's clock, the time base of tokens.
    pub(super) fn clock(&self, now: Instant) -> u64 {
        self.clock_base + now.saturating_duration_since(self.epoch).as_secs()
    }

    /// Our Via, whose token names `inbound` (where responses go back) for
    /// as long as responses to the request may come: the ring timeout and
    /// a transaction's 64·T1 (a 2xx is retransmitted that long).
    pub(super) fn our_via(
        &self,
        transport: Transport,
        branch: &str,
        inbound: Flow,
        call_id: &str,
        now: Instant,
    ) -> String {
        let addr = self.our_addr(transport);
        let lifetime = self.config.ring_timeout + 64 * self.config.t1;
        let expires = self.clock(now) + lifetime.as_secs() + 1;
        let token = self.tokens.encode(&[inbound], call_id, expires);
        // A SocketAddr writes an IPv6 host in brackets, as sent-by wants.
        format!(
            "SIP/2.0/{} {addr};branch={branch};pf={token}",
            transport.via()
        )
    }

    pub(super) fn record_route(&self, transport: Transport, ftag: &str, token: &str) -> String {
        let addr = self.our_addr(transport);
        let mut uri = Uri::host_port(&addr.ip().to_string(), Some(addr.port()));
        if transport != Transport::Udp {
            uri.set_param("transport", Some(transport.uri_param()));
        }
        uri.set_param("lr", None);
        if !ftag.is_empty() && ftag.bytes().all(crate::core::message::is_token_byte) {
            uri.set_param("ftag", Some(ftag));
        }
        uri.set_param("pf", Some(token));
        format!("<{uri}>")
    }

    /// A URI with one of our domains, or one of our addresses.
    pub(super) fn names_us(&self, uri: &Uri) -> bool {
        if self
            .config
            .domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&uri.host))
        {
            return true;
        }
        let Ok(ip) = uri.host.parse::<IpAddr>() else {
            return false;
        };
        self.config.advertise.iter().any(|(t, a)| {
            a.ip() == ip && uri.port.unwrap_or(crate::core::via::default_port(t.via())) == a.port()
        })
    }
}

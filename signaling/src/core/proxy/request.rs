//! Requests: what arrives, who sent it, and whether it may go on.

use super::*;

impl Proxy {
    pub(super) fn handle_request(&mut self, source: Source, mut req: Message, now: Instant) {
        // RFC 3261 §18.2.1 / RFC 3581: note the real source in the top Via.
        let Some(mut top) = req.values(&HeaderName::VIA).next().and_then(Via::parse) else {
            if !self.over_budget(&source, &req, now) {
                let resp = Message::response_to(&req, 400, "Bad Via Header", None);
                self.send(source.flow, resp.to_bytes());
            }
            return;
        };
        top.stamp_source(source.flow.remote);
        req.pop_first(&HeaderName::VIA);
        req.prepend(HeaderName::VIA, top.to_string());
        let method = req.method().cloned().unwrap_or(Method::Ack);
        let key = server_key(&top, &req, &method);

        if method == Method::Ack {
            self.handle_ack(source, req, &key, now);
            return;
        }
        if method == Method::Cancel {
            self.handle_cancel(source, &req, &key, now);
            return;
        }
        if let Some(tx) = self.servers.get(&key) {
            // A retransmission: repeat the last response (§17.2.1, §17.2.2).
            if let Some(last) = tx.last.clone() {
                self.metrics.retransmissions += 1;
                let flow = tx.reply_flow;
                self.send(flow, last);
            }
            return;
        }

        // Loose routing (§16.4): our own Route entries come off, and the
        // flow token in the first tells us where in-dialog requests go.
        let token = self.pop_our_routes(&mut req, now);
        if let Some(edge) = token.as_ref().and_then(|t| t.edge) {
            self.forward_to_edge(source, req, edge, now);
            return;
        }

        let in_dialog = req.tag(&HeaderName::TO).is_some();
        if in_dialog || req.has(&HeaderName::ROUTE) {
            self.forward_stateless(source, req, token, now);
            return;
        }

        // Out of dialog, addressed to us: within the source's budget first,
        // before anything is answered.
        if self.over_budget(&source, &req, now) {
            return;
        }
        if req
            .header(&HeaderName::MAX_FORWARDS)
            .is_some_and(|v| v.trim() == "0")
            && method != Method::Options
        {
            self.refuse(&source, &req, 483, "Too Many Hops");
            return;
        }
        let Some(uri) = req.uri().cloned() else {
            return;
        };
        if self.servers.len() >= MAX_SERVER_TRANSACTIONS {
            let mut resp = self.stateless_response(&req, 503, "Service Unavailable");
            resp.push(HeaderName::RETRY_AFTER, "5");
            self.send(reply_flow(&source, &req), resp.to_bytes());
            return;
        }
        if !self.names_us(&uri) {
            self.metrics.relay_refused += 1;
            self.refuse(&source, &req, 403, "Relaying Forbidden");
            return;
        }
        if self.draining && matches!(method, Method::Invite | Method::Register) {
            let mut resp = Message::response_to(&req, 503, "Draining", Some("dr"));
            resp.push(HeaderName::RETRY_AFTER, "5");
            self.send(source.flow, resp.to_bytes());
            return;
        }
        if method == Method::Register {
            self.handle_register(source, req, key, now);
            return;
        }
        if uri.user.is_none() {
            if method == Method::Options {
                self.start_server(&key, source, &req, None);
                let mut resp = self.response(&key, &req, 200, "OK");
                resp.push(
                    HeaderName::ALLOW,
                    "INVITE, ACK, CANCEL, BYE, OPTIONS, MESSAGE, UPDATE, REGISTER, INFO, PRACK",
                );
                resp.push(HeaderName::SUPPORTED, "outbound, path");
                self.send_response(&key, resp, now);
            } else {
                self.refuse(&source, &req, 404, "Not Found");
            }
            return;
        }
        let Some(handle) = uri.user_unescaped().and_then(|u| Handle::parse(&u).ok()) else {
            self.refuse(&source, &req, 404, "Not Found");
            return;
        };
        let caller = match self.authenticate(&source, &mut req, &method, now) {
            Auth::Caller(c) => c,
            other => {
                self.refuse_auth(&source, &req, &other, 407, now);
                return;
            }
        };
        // A caller calls as itself (the From is what the callee's devices
        // and the wake-up push show).
        let from = self.caller_handle(&req);
        match caller {
            Caller::Anyone => {}
            Caller::Account(who) if from.as_ref() == Some(&who) => {}
            Caller::Device(device) => {
                let Some(from) = from else {
                    self.metrics.caller_id_refused += 1;
                    self.refuse(&source, &req, 403, "From Is Not Yours");
                    return;
                };
                let registered = self
                    .registrar
                    .bindings(&from)
                    .iter()
                    .any(|b| b.device == Some(device));
                if !registered {
                    // Ask the directory whether the device is listed for
                    // that handle; the request waits in its transaction.
                    self.await_directory(source, req, key, device, from, Some(handle), now);
                    return;
                }
            }
            Caller::Account(_) => {
                self.metrics.caller_id_refused += 1;
                self.refuse(&source, &req, 403, "From Is Not Yours");
                return;
            }
        }
        self.admit_call(source, req, key, handle, now);
    }

    /// An authenticated out-of-dialog request to `handle`: forked, unless
    /// too many calls are in progress.
    pub(super) fn admit_call(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        handle: Handle,
        now: Instant,
    ) {
        if self.forks.len() >= self.config.max_calls {
            // In the request's transaction when it waited for the
            // directory, else statelessly.
            if self.servers.contains_key(&key) {
                let mut resp = self.response(&key, &req, 503, "Too Many Calls");
                resp.push(HeaderName::RETRY_AFTER, "1");
                self.send_response(&key, resp, now);
            } else {
                let mut resp = Message::response_to(&req, 503, "Too Many Calls", Some("mc"));
                resp.push(HeaderName::RETRY_AFTER, "1");
                self.send(source.flow, resp.to_bytes());
            }
            return;
        }
        if self.config.shared_location {
            self.locate(source, req, key, handle, now);
        } else {
            self.start_fork(source, req, key, handle, Vec::new(), now);
        }
    }

    /// Parks a request from a device until the directory says whether the
    /// device is listed for `handle` ([`Event::Authorize`]): a REGISTER
    /// (`callee` none), or a call from `handle` to `callee`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn await_directory(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        device: DeviceId,
        handle: Handle,
        callee: Option<Handle>,
        now: Instant,
    ) {
        // A transaction absorbs retransmissions meanwhile.
        self.start_server(&key, source, &req, None);
        if self.pending_auth.len() >= MAX_PENDING_AUTH {
            self.respond(&key, 503, "Service Unavailable", now);
            return;
        }
        if callee.is_some() && req.method() == Some(&Method::Invite) {
            let trying = Message::response_to(&req, 100, "Trying", None);
            self.send_response(&key, trying, now);
        }
        let id = self.next_id();
        self.pending_auth.insert(
            id,
            Pending {
                key,
                source,
                request: req,
                handle: handle.clone(),
                callee,
            },
        );
        self.events
            .push_back(Event::Authorize { id, device, handle });
    }

    /// The handle an out-of-dialog request's From names, if it is an
    /// address-of-record of ours.
    pub(super) fn caller_handle(&self, req: &Message) -> Option<Handle> {
        let from = NameAddr::parse(req.header(&HeaderName::FROM)?).ok()?;
        if !self.names_us(&from.uri) {
            return None;
        }
        Handle::parse(&from.uri.user_unescaped()?).ok()
    }

    /// Takes one request from the source's budget; past it, a 503 over a
    /// connection (its peer is who it says) and silence over UDP (the
    /// source may be spoofed: answering would reflect traffic at it).
    pub(super) fn over_budget(&mut self, source: &Source, req: &Message, now: Instant) -> bool {
        if self.spend_budget(source, now) {
            return false;
        }
        if source.flow.transport.reliable() && req.method() != Some(&Method::Ack) {
            let mut resp = Message::response_to(req, 503, "Service Unavailable", Some("rl"));
            resp.push(HeaderName::RETRY_AFTER, "1");
            self.send(source.flow, resp.to_bytes());
        }
        true
    }

    /// Takes one request from the source's budget (IPv6 by /64); false,
    /// counted, when it is spent.
    pub(super) fn spend_budget(&mut self, source: &Source, now: Instant) -> bool {
        let within = self.limiter.take(source_key(source.flow.remote.ip()), now);
        if !within {
            self.metrics.rate_limited += 1;
        }
        within
    }

    /// A refusal to a party we have not authenticated: one response, with
    /// no transaction (nothing is retransmitted toward a source that may
    /// be spoofed, and nothing is kept); never an answer to an ACK.
    pub(super) fn refuse(&mut self, source: &Source, req: &Message, code: u16, reason: &str) {
        if req.method() == Some(&Method::Ack) {
            return;
        }
        tracing::debug!(code, from = %source.flow.remote, "refused SIP request");
        let resp = self.stateless_response(req, code, reason);
        self.send(reply_flow(source, req), resp.to_bytes());
    }

    /// Takes our own entries off the top of the Route set (§16.4) and
    /// returns what the first one carried: the flows of its token (decoded
    /// once, here, for this Call-ID and not expired) and its `ftag`.
    ///
    /// Ours are the entries naming one of our addresses. The first entry
    /// may also be another node's with a token that verifies here (a node
    /// sharing our secret that is gone: we take its dialogs over), with
    /// the entries after it that name the same host (its double
    /// Record-Route); an entry of another node further down stays, since
    /// the request goes on through that node.
    pub(super) fn pop_our_routes(&self, req: &mut Message, now: Instant) -> Option<RouteToken> {
        let mut token: Option<RouteToken> = None;
        let mut taken_over: Option<String> = None;
        let clock = self.clock(now);
        loop {
            let first = req.values(&HeaderName::ROUTE).next().map(str::to_string);
            let Some(first) = first else {
                break;
            };
            let Ok(na) = NameAddr::parse(&first) else {
                break;
            };
            let flows = na
                .uri
                .param("pf")
                .flatten()
                .and_then(|t| self.tokens.decode(t, req.call_id(), clock))
                // A route names both ends of a dialog.
                .filter(|f| f.len() == 2);
            let edge = self.edge_flow(&na.uri, now);
            let ours = self.names_us(&na.uri) || taken_over.as_deref() == Some(&na.uri.host);
            if !ours {
                if token.is_some() || (flows.is_none() && edge.is_none()) {
                    break;
                }
                taken_over = Some(na.uri.host.clone());
            }
            if token.is_none() {
                token = Some(RouteToken {
                    signed: na.uri.has_param("pf") || na.uri.has_param("pe"),
                    flows,
                    ftag: na.uri.param("ftag").flatten().map(str::to_string),
                    edge,
                });
            }
            req.pop_first(&HeaderName::ROUTE);
        }
        token
    }

    pub(super) fn handle_ack(&mut self, source: Source, req: Message, key: &str, now: Instant) {
        let reliable = source.flow.transport.reliable();
        if let Some(tx) = self.servers.get_mut(key) {
            if tx.state == SState::Completed {
                // ACK for our non-2xx final (§17.2.1): absorbed, Timer I.
                tx.state = SState::Confirmed;
                let wait = if reliable {
                    Duration::ZERO
                } else {
                    self.config.t4
                };
                self.timers.at(
                    now + wait,
                    Timer::Server(key.to_string(), SState::Confirmed, 0),
                );
            }
            return;
        }
        // ACK for a 2xx is its own transaction and follows the route set;
        // an ACK for a stateless refusal of ours has no route and ends here.
        let mut req = req;
        let token = self.pop_our_routes(&mut req, now);
        if let Some(edge) = token.as_ref().and_then(|t| t.edge) {
            // The ACK for a non-2xx the device sent through us, from the
            // node the call came to.
            self.forward_to_edge(source, req, edge, now);
        } else if req.tag(&HeaderName::TO).is_some() {
            self.forward_stateless(source, req, token, now);
        }
    }

    pub(super) fn handle_cancel(&mut self, source: Source, req: &Message, key: &str, now: Instant) {
        // The CANCEL matches the INVITE's server transaction (§9.2).
        let invite_key = key.replacen("|CANCEL", "|INVITE", 1);
        let Some(tx) = self.servers.get(&invite_key) else {
            // An INVITE we sent on to a device statelessly, as its edge:
            // its CANCEL follows the same path (§16.11).
            let mut fwd = req.clone();
            if let Some(edge) = self.pop_our_routes(&mut fwd, now).and_then(|t| t.edge) {
                self.forward_to_edge(source, fwd, edge, now);
                return;
            }
            if !self.over_budget(&source, req, now) {
                self.refuse(&source, req, 481, "Call/Transaction Does Not Exist");
            }
            return;
        };
        let (to_tag, fork, state) = (tx.to_tag.clone(), tx.fork, tx.state);
        let resp = Message::response_to(req, 200, "OK", Some(&to_tag));
        self.send(source.flow, resp.to_bytes());
        if state != SState::Proceeding {
            return; // final already sent: the CANCEL has no effect
        }
        let Some(fork_id) = fork else {
            // Still waiting for the directory: nothing was forked yet.
            self.respond(&invite_key, 487, "Request Terminated", now);
            return;
        };
        let reason = req.header(&HeaderName::REASON).map(str::to_string);
        self.cancel_branches(fork_id, None, reason, now);
        if let Some(f) = self.forks.get_mut(&fork_id) {
            f.waiting.clear();
            f.final_sent = true;
        }
        self.metrics.calls_cancelled += 1;
        self.respond(&invite_key, 487, "Request Terminated", now);
    }

    pub(super) fn handle_register(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        now: Instant,
    ) {
        let to = req
            .header(&HeaderName::TO)
            .and_then(|v| NameAddr::parse(v).ok());
        let Some(handle) = to
            .as_ref()
            .filter(|to| self.names_us(&to.uri))
            .and_then(|to| to.uri.user_unescaped())
            .and_then(|u| Handle::parse(&u).ok())
        else {
            self.metrics.registrations_refused += 1;
            self.refuse(&source, &req, 404, "Not Found");
            return;
        };
        if source.device.is_some_and(|d| self.revoked.contains(&d)) {
            self.metrics.registrations_refused += 1;
            self.refuse(&source, &req, 403, "Device Revoked");
            return;
        }
        if let Some(device) = source.device {
            // The answer waits for the directory.
            self.await_directory(source, req, key, device, handle, None, now);
            return;
        }
        match self.check_digest(&req, &HeaderName::AUTHORIZATION, "REGISTER", now) {
            Auth::Caller(Caller::Account(who)) if who == handle => {
                // In a transaction: a retransmission gets the same answer
                // without spending the nonce count again.
                self.start_server(&key, source, &req, None);
                self.register(Some(&key), &source, &req, &handle, now);
            }
            Auth::Caller(_) => {
                self.metrics.registrations_refused += 1;
                self.refuse(&source, &req, 403, "Forbidden");
            }
            other => {
                if matches!(other, Auth::BadUri) {
                    self.metrics.registrations_refused += 1;
                }
                self.refuse_auth(&source, &req, &other, 401, now);
            }
        }
    }

    /// A response outside any transaction, with a To tag derived from the
    /// request so a retransmission gets the same one.
    pub(super) fn stateless_response(&self, req: &Message, code: u16, reason: &str) -> Message {
        let tag = self.tokens.digest(req.call_id().as_bytes());
        Message::response_to(req, code, reason, Some(&tag[..10]))
    }

    /// Applies a REGISTER and answers it: in the transaction `key` if
    /// there is one, else statelessly.
    pub(super) fn register(
        &mut self,
        key: Option<&str>,
        source: &Source,
        req: &Message,
        handle: &Handle,
        now: Instant,
    ) {
        let answer = |this: &mut Proxy, resp: Message| match key {
            Some(k) => this.send_response(k, resp, now),
            None => this.send(reply_flow(source, req), resp.to_bytes()),
        };
        let respond = |this: &Proxy, code: u16, reason: &str| match key {
            Some(k) => this.response(k, req, code, reason),
            None => this.stateless_response(req, code, reason),
        };
        let result = self.registrar.register(
            handle,
            req,
            source.flow,
            source.device,
            &self.config.registrar,
            now,
        );
        match result {
            Err(refusal) => {
                self.metrics.registrations_refused += 1;
                let mut resp = respond(self, refusal.code, refusal.reason);
                if let Some(min) = refusal.min_expires {
                    resp.push(HeaderName::MIN_EXPIRES, min.to_string());
                }
                answer(self, resp);
            }
            Ok(update) => {
                self.metrics.registrations += 1;
                let mut resp = respond(self, 200, "OK");
                for c in self.registrar.contact_values(handle, now) {
                    resp.push(HeaderName::CONTACT, c);
                }
                let outbound = req
                    .values(&HeaderName::CONTACT)
                    .any(|c| c.contains("reg-id"));
                if outbound {
                    // RFC 5626 §6: confirm outbound and name the keepalive
                    // interval for connection flows.
                    resp.push(HeaderName::REQUIRE, "outbound");
                    if source.flow.transport.reliable() {
                        resp.push(
                            HeaderName::FLOW_TIMER,
                            self.config.flow_timer.as_secs().to_string(),
                        );
                    }
                }
                resp.push(HeaderName::SUPPORTED, "outbound, path");
                answer(self, resp);
                self.announce_bindings(handle, now);
                for i in update.awake {
                    self.binding_awake(handle, i, now);
                }
            }
        }
    }

    /// Who sent a request that needs a sender: a device by its
    /// certificate, or an account by its credentials (Proxy-Authorization,
    /// consumed here: §22.3).
    pub(super) fn authenticate(
        &mut self,
        source: &Source,
        req: &mut Message,
        method: &Method,
        now: Instant,
    ) -> Auth {
        if let Some(d) = source.device {
            if self.revoked.contains(&d) {
                return Auth::Missing;
            }
            return Auth::Caller(Caller::Device(d));
        }
        if self.config.allow_unauthenticated_calls {
            return Auth::Caller(Caller::Anyone);
        }
        let auth = self.check_digest(req, &HeaderName::PROXY_AUTHORIZATION, method.as_str(), now);
        if matches!(auth, Auth::Caller(_)) {
            req.remove(&HeaderName::PROXY_AUTHORIZATION);
        }
        auth
    }

    /// Checks credentials in `header` against the accounts (RFC 3261
    /// §22.4, RFC 7616): the right password, for this Request-URI, with a
    /// nonce count not used before.
    pub(super) fn check_digest(
        &mut self,
        req: &Message,
        header: &HeaderName,
        method: &str,
        now: Instant,
    ) -> Auth {
        let elapsed = Duration::from_secs(self.clock(now));
        let found = req
            .lines(header)
            .filter_map(Credentials::parse)
            .filter(|c| c.realm == self.digest.realm())
            .find_map(|c| {
                let who = Handle::parse(&c.username).ok()?;
                let password = self.config.accounts.get(&who)?;
                Some((c, who, password))
            });
        let Some((creds, who, password)) = found else {
            return Auth::Missing;
        };
        if !req.uri().is_some_and(|u| same_resource(&creds.uri, u)) {
            return Auth::BadUri;
        }
        match self.digest.verify(&creds, method, password, elapsed) {
            Verdict::Wrong => Auth::Missing,
            Verdict::Stale => Auth::Stale,
            Verdict::Ok if self.nonce_counts.accept(&creds) => {
                if self.config.shared_location {
                    if let Some(nc) = creds
                        .nc
                        .as_deref()
                        .and_then(|n| u32::from_str_radix(n, 16).ok())
                    {
                        self.events.push_back(Event::NonceUsed {
                            nonce: creds.nonce.clone(),
                            nc,
                        });
                    }
                }
                Auth::Caller(Caller::Account(who))
            }
            Verdict::Ok => {
                // A replayed answer: whoever sent it may not know the
                // password; the owner's client answers a stale challenge
                // without asking anyone.
                self.metrics.digest_replays += 1;
                Auth::Stale
            }
        }
    }

    /// The answer to a request whose authentication found no caller (an
    /// anonymous caller counts as none): 400 for a digest made for another
    /// URI, else a challenge (`code` 401 or 407), stale when the password
    /// was right.
    pub(super) fn refuse_auth(
        &mut self,
        source: &Source,
        req: &Message,
        auth: &Auth,
        code: u16,
        now: Instant,
    ) {
        match auth {
            Auth::BadUri => self.refuse(source, req, 400, "Bad Request (Digest URI Mismatch)"),
            Auth::Stale => self.challenge_stale(source, req, code, true, now),
            Auth::Missing | Auth::Caller(_) => self.challenge(source, req, code, now),
        }
    }

    pub(super) fn challenge(&mut self, source: &Source, req: &Message, code: u16, now: Instant) {
        self.challenge_stale(source, req, code, false, now);
    }

    /// A 401/407 challenge, sent once without a transaction: its ACK (for
    /// an INVITE) has no route of ours and is dropped, a retransmitted
    /// request is challenged again.
    pub(super) fn challenge_stale(
        &mut self,
        source: &Source,
        req: &Message,
        code: u16,
        stale: bool,
        now: Instant,
    ) {
        let (reason, header) = if code == 401 {
            ("Unauthorized", HeaderName::WWW_AUTHENTICATE)
        } else {
            (
                "Proxy Authentication Required",
                HeaderName::PROXY_AUTHENTICATE,
            )
        };
        let mut resp = self.stateless_response(req, code, reason);
        let unique = self.next_id();
        for c in self.digest.challenges(
            Duration::from_secs(self.clock(now)),
            unique,
            stale,
            self.config.digest_sha256,
        ) {
            resp.push(header.clone(), c);
        }
        self.send(reply_flow(source, req), resp.to_bytes());
    }
}

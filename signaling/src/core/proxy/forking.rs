//! Forking: one out-of-dialog request to every device of a handle
//! (RFC 3261 §16.7).

use super::*;

impl Proxy {
    pub(super) fn start_fork(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        handle: Handle,
        remote: Vec<SharedBinding>,
        now: Instant,
    ) {
        let invite = req.method() == Some(&Method::Invite);
        let fork_id = self.next_id();
        // A request that waited for the directory has its transaction
        // (and its 100 Trying) already.
        let parked = match self.servers.get_mut(&key) {
            Some(tx) => {
                tx.fork = Some(fork_id);
                true
            }
            None => false,
        };
        if !parked {
            self.start_server(&key, source, &req, Some(fork_id));
        }
        if invite && !parked {
            let trying = Message::response_to(&req, 100, "Trying", None);
            self.send_response(&key, trying, now);
        }
        let mut fork = Fork {
            server: key.clone(),
            request: req,
            handle: handle.clone(),
            invite,
            branches: Vec::new(),
            best: None,
            answered_at: None,
            final_sent: false,
            rang: false,
            waiting: Vec::new(),
            source_flow: source.flow,
        };
        if let Some((code, reason)) = invite.then(|| self.group_refusal(&fork.request)).flatten() {
            self.forks.insert(fork_id, fork);
            self.finish(fork_id, code, reason, now);
            return;
        }
        // Who calls, as the woken device shows it: the caller's handle
        // (checked against its account or device), else its From.
        let caller = self
            .caller_handle(&fork.request)
            .map(|h| h.as_str().to_string())
            .unwrap_or_else(|| {
                fork.request
                    .header(&HeaderName::FROM)
                    .unwrap_or_default()
                    .to_string()
            });
        let mut targets = Vec::new();
        let mut wakes = Vec::new();
        for (_, b) in self.registrar.active(&handle, now) {
            match (b.target(), &b.push, b.device) {
                (Some(flow), _, _) => targets.push((flow, b.contact.uri.clone(), None)),
                // Only a binding a device certificate registered is woken:
                // the push service checks the token is that device's.
                (None, Some(push), Some(device)) if invite => {
                    wakes.push((binding_id(b), push.clone(), device))
                }
                (None, _, _) => {}
            }
        }
        // Bindings at other nodes: through their edge, or woken.
        for b in remote {
            let target = b
                .path
                .as_deref()
                .and_then(|p| shared::remote_target(p, &b.contact).map(|t| (t, p)));
            match (target, b.push, b.device) {
                (Some(((flow, uri), path)), _, _) => {
                    targets.push((flow, uri, Some(path.to_string())))
                }
                (None, Some(push), Some(device)) if invite => wakes.push((b.id, push, device)),
                (None, _, _) => {}
            }
        }
        if !wakes.is_empty() {
            // Both budgets are spent only when both allow the wake.
            let from = self
                .caller_handle(&fork.request)
                .map(|h| h.as_str().to_string())
                .unwrap_or_else(|| source_key(source.flow.remote.ip()).to_string());
            let callee = WakeKey::Callee(handle.clone());
            let caller_key = WakeKey::Caller(from);
            let allowed = self.wake_limiter.wait_time(&callee, now).is_zero()
                && self.wake_limiter.wait_time(&caller_key, now).is_zero();
            if allowed {
                self.wake_limiter.take(callee, now);
                self.wake_limiter.take(caller_key, now);
            } else {
                self.metrics.wakes_limited += 1;
                tracing::debug!(callee = %handle.redacted(), "wake-ups past their budget; ringing awake devices only");
                wakes.clear();
            }
        }
        for (id, push, device) in wakes {
            self.metrics.push_wakes += 1;
            fork.waiting.push((id, push.prid.clone()));
            self.events.push_back(Event::Wake(Wake {
                handle: handle.clone(),
                push,
                device,
                call_id: fork.request.call_id().to_string(),
                caller: caller.clone(),
            }));
        }
        self.metrics.forks += 1;
        if targets.is_empty() && fork.waiting.is_empty() {
            self.metrics.calls_unavailable += 1;
            self.forks.insert(fork_id, fork);
            self.finish(fork_id, 480, "Temporarily Unavailable", now);
            return;
        }
        if !fork.waiting.is_empty() {
            self.waiting.entry(handle).or_default().push(fork_id);
            self.timers
                .at(now + self.config.push_window, Timer::PushWindow(fork_id));
        }
        if invite {
            self.timers
                .at(now + self.config.ring_timeout, Timer::Ring(fork_id));
        }
        self.forks.insert(fork_id, fork);
        for (flow, uri, route) in targets {
            self.add_branch(fork_id, flow, uri, route, now);
        }
    }

    /// A binding was (re)registered and is reachable: a call waiting on
    /// it by push gets its branch now.
    pub(super) fn binding_awake(&mut self, handle: &Handle, index: usize, now: Instant) {
        let Some(b) = self.registrar.bindings(handle).get(index) else {
            return;
        };
        let (id, flow, uri) = match b.target() {
            Some(flow) => (binding_id(b), flow, b.contact.uri.clone()),
            None => return,
        };
        self.woken(handle, &id, flow, uri, None, now);
    }

    /// The binding `id` of `handle` woke (here, or at another node whose
    /// edge `route` names): every call waiting for it gets its branch.
    pub(super) fn woken(
        &mut self,
        handle: &Handle,
        id: &str,
        flow: Flow,
        uri: Uri,
        route: Option<String>,
        now: Instant,
    ) {
        let Some(forks) = self.waiting.get(handle).cloned() else {
            return;
        };
        for fork_id in forks {
            let Some(f) = self.forks.get_mut(&fork_id) else {
                continue;
            };
            let Some(pos) = f.waiting.iter().position(|(w, _)| w == id) else {
                continue;
            };
            f.waiting.remove(pos);
            if !f.final_sent {
                self.add_branch(fork_id, flow, uri.clone(), route.clone(), now);
            }
        }
        self.prune_waiting(handle);
    }

    /// The push service says the token `prid` of a device of `handle` is
    /// dead (the app is gone, or the token rotated): its bindings go, and
    /// calls waiting for it stop waiting; a call with nothing else to
    /// ring answers at once (480) rather than at its ring timeout.
    pub fn handle_push_gone(&mut self, handle: &Handle, prid: &str, now: Instant) {
        if self.config.shared_location {
            self.events.push_back(Event::PushGone {
                handle: handle.clone(),
                prid: prid.to_owned(),
            });
        }
        self.drop_push(handle, prid, now);
    }

    /// Another node heard that a push token of a device of `handle` is
    /// dead: this node's bindings naming it go too.
    pub fn handle_remote_push_gone(&mut self, handle: &Handle, prid: &str, now: Instant) {
        self.drop_push(handle, prid, now);
    }

    fn drop_push(&mut self, handle: &Handle, prid: &str, now: Instant) {
        let gone = self.registrar.remove_push(handle, prid);
        if !gone.is_empty() {
            tracing::info!(handle = %handle.redacted(), "a push token is dead; its bindings are dropped");
            self.announce_bindings(handle, now);
        }
        // Calls wait no more for it, whichever node holds its binding.
        let ids: Vec<String> = gone.iter().map(binding_id).collect();
        let forks = self.waiting.get(handle).cloned().unwrap_or_default();
        for fork_id in forks {
            if let Some(f) = self.forks.get_mut(&fork_id) {
                f.waiting.retain(|(id, p)| !ids.contains(id) && p != prid);
            }
            self.maybe_finish(fork_id, now);
        }
        self.prune_waiting(handle);
    }

    /// A branch of the fork to `uri` over `flow`; `route`: the path of a
    /// binding at another node, whose edge `flow` reaches.
    pub(super) fn add_branch(
        &mut self,
        fork_id: u64,
        flow: Flow,
        uri: Uri,
        route: Option<String>,
        now: Instant,
    ) {
        let Some(f) = self.forks.get(&fork_id) else {
            return;
        };
        let mut m = f.request.clone();
        if let StartLine::Request { uri: ruri, .. } = &mut m.start {
            *ruri = uri;
        }
        if let Some(route) = route {
            m.prepend(HeaderName::ROUTE, route);
        }
        decrement_max_forwards(&mut m);
        if f.invite {
            self.add_room_headers(&f.request, &mut m, now);
        }
        if f.invite {
            let ftag = m.tag(&HeaderName::FROM).unwrap_or("").to_string();
            let expires = self.clock(now) + self.config.dialog_lifetime.as_secs();
            let token = self
                .tokens
                .encode(&[f.source_flow, flow], m.call_id(), expires);
            // Double Record-Route when the two sides use different
            // transports (RFC 5658), so each side reaches us over its own.
            let upstream = f.source_flow.transport;
            if upstream != flow.transport {
                m.prepend(
                    HeaderName::RECORD_ROUTE,
                    self.record_route(upstream, &ftag, &token),
                );
            }
            m.prepend(
                HeaderName::RECORD_ROUTE,
                self.record_route(flow.transport, &ftag, &token),
            );
        }
        let source_flow = f.source_flow;
        let invite = f.invite;
        let n = self.next_id();
        let branch = format!("{MAGIC_COOKIE}{}", self.tokens.digest(&n.to_be_bytes()));
        let via = self.our_via(flow.transport, &branch, source_flow, m.call_id(), now);
        m.prepend(HeaderName::VIA, via);
        let bytes = m.to_bytes();
        self.send(flow, bytes.clone());
        let tx = ClientTx {
            invite,
            cancel: false,
            state: CState::Calling,
            flow,
            bytes,
            request: m,
            fork: Some(fork_id),
            sent: 0,
        };
        self.arm_client(&branch, &tx, now);
        self.clients.insert(branch.clone(), tx);
        self.metrics.fork_branches += 1;
        if let Some(f) = self.forks.get_mut(&fork_id) {
            f.branches.push(Branch {
                tx: branch,
                done: false,
                proceeding: false,
                cancel_pending: None,
            });
        }
    }

    /// A response on a branch, after its client transaction saw it.
    pub(super) fn fork_response(
        &mut self,
        fork_id: u64,
        branch: &str,
        resp: Message,
        now: Instant,
    ) {
        let code = resp.code().unwrap_or(500);
        let mut resp = resp;
        match self.forks.get(&fork_id) {
            // The caller of a group call gets its room token with the
            // ringing and the answer.
            Some(f) if f.invite && (180..300).contains(&code) => {
                self.add_room_headers(&f.request, &mut resp, now)
            }
            _ => group::strip_room_headers(&mut resp),
        }
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        let Some(bi) = f.branches.iter().position(|b| b.tx == branch) else {
            return;
        };
        let server = f.server.clone();
        if code < 200 {
            let b = &mut f.branches[bi];
            b.proceeding = true;
            if let Some(reason) = b.cancel_pending.take() {
                let answered_at = f.answered_at;
                self.send_cancel(branch, reason, answered_at, now);
                return;
            }
            if code == 100 || f.final_sent {
                return;
            }
            if code == 180 || code == 183 {
                f.rang = true;
            }
            self.relay_response(&server, resp, now);
            return;
        }
        f.branches[bi].done = true;
        if (200..300).contains(&code) {
            // Every 2xx goes upstream (§16.7 step 5).
            let first = f.answered_at.is_none() && !f.final_sent;
            if first {
                f.answered_at = Some(now);
                f.final_sent = true;
                f.waiting.clear();
                if f.invite {
                    self.metrics.calls_answered += 1;
                }
                self.cancel_branches(
                    fork_id,
                    Some(branch),
                    Some("SIP;cause=200;text=\"Call completed elsewhere\"".into()),
                    now,
                );
            }
            self.relay_response(&server, resp, now);
            return;
        }
        if f.final_sent {
            return;
        }
        if code >= 600 {
            f.answered_at = Some(now);
            f.final_sent = true;
            f.waiting.clear();
            let text = match code {
                600 => "Busy Everywhere",
                603 => "Declined",
                604 => "Does Not Exist Anywhere",
                _ => "Global Failure",
            };
            self.metrics.calls_declined += 1;
            self.cancel_branches(
                fork_id,
                Some(branch),
                Some(format!("SIP;cause={code};text=\"{text}\"")),
                now,
            );
            self.relay_response(&server, resp, now);
            return;
        }
        // 3xx–5xx: keep the best (§16.7 step 6) and wait for the rest.
        let better = match &f.best {
            None => true,
            Some(b) => rank(code) < rank(b.code().unwrap_or(500)),
        };
        if better {
            f.best = Some(resp);
        }
        self.maybe_finish(fork_id, now);
    }

    /// All branches are done and nobody is being woken: answer upstream.
    pub(super) fn maybe_finish(&mut self, fork_id: u64, now: Instant) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        if f.final_sent || !f.waiting.is_empty() || f.branches.iter().any(|b| !b.done) {
            return;
        }
        f.final_sent = true;
        let server = f.server.clone();
        match f.best.take() {
            Some(mut best) => {
                self.metrics.calls_failed += 1;
                if best.code() == Some(503) {
                    // §16.7 step 6: a 503 from downstream becomes 500.
                    best.start = StartLine::Response {
                        code: 500,
                        reason: "Server Internal Error".into(),
                    };
                }
                self.relay_response(&server, best, now);
            }
            None => {
                self.metrics.calls_unavailable += 1;
                self.respond(&server, 480, "Temporarily Unavailable", now);
            }
        }
    }

    /// Sends the proxy's own final response for a fork.
    pub(super) fn finish(&mut self, fork_id: u64, code: u16, reason: &str, now: Instant) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        f.final_sent = true;
        let server = f.server.clone();
        self.respond(&server, code, reason, now);
    }

    /// CANCELs every branch but `except` (§16.7 step 10, §16.10).
    pub(super) fn cancel_branches(
        &mut self,
        fork_id: u64,
        except: Option<&str>,
        reason: Option<String>,
        now: Instant,
    ) {
        let Some(f) = self.forks.get_mut(&fork_id) else {
            return;
        };
        if !f.invite {
            for b in &mut f.branches {
                b.done = true;
            }
            return;
        }
        let answered_at = f.answered_at;
        let mut now_cancel = Vec::new();
        for b in &mut f.branches {
            if b.done || Some(b.tx.as_str()) == except {
                continue;
            }
            if b.proceeding {
                now_cancel.push(b.tx.clone());
                b.done = true;
            } else {
                b.cancel_pending = Some(reason.clone());
                b.done = true;
            }
        }
        for tx in now_cancel {
            self.send_cancel(&tx, reason.clone(), answered_at, now);
        }
    }

    /// Builds and sends the CANCEL for a branch (§9.1): the INVITE's
    /// Request-URI, Call-ID, From, To, CSeq number, top Via and Route.
    pub(super) fn send_cancel(
        &mut self,
        branch: &str,
        reason: Option<String>,
        since: Option<Instant>,
        now: Instant,
    ) {
        let Some(tx) = self.clients.get(branch) else {
            return;
        };
        let Some(mut c) = hop_request(&tx.request, Method::Cancel, None) else {
            return;
        };
        if let Some(r) = reason {
            c.push(HeaderName::REASON, r);
        }
        let flow = tx.flow;
        let bytes = c.to_bytes();
        self.send(flow, bytes.clone());
        self.metrics.cancels_sent += 1;
        if let Some(t) = since {
            let us = now.saturating_duration_since(t).as_micros() as u64;
            self.metrics.cancel_latency_us_sum += us;
            self.metrics.cancel_latency_us_max = self.metrics.cancel_latency_us_max.max(us);
        }
        let ctx = ClientTx {
            invite: false,
            cancel: true,
            state: CState::Calling,
            flow,
            bytes,
            request: c,
            fork: None,
            sent: 0,
        };
        let key = format!("{branch}|CANCEL");
        self.arm_client(&key, &ctx, now);
        self.clients.insert(key, ctx);
    }

    pub(super) fn prune_waiting(&mut self, handle: &Handle) {
        if let Some(list) = self.waiting.get_mut(handle) {
            let forks = &self.forks;
            list.retain(|id| forks.get(id).is_some_and(|f| !f.waiting.is_empty()));
            if list.is_empty() {
                self.waiting.remove(handle);
            }
        }
    }

    pub(super) fn drop_fork(&mut self, fork_id: u64) {
        if let Some(f) = self.forks.remove(&fork_id) {
            if !f.waiting.is_empty() {
                let h = f.handle.clone();
                self.prune_waiting(&h);
            }
        }
    }
}

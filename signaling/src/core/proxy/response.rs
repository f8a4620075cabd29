//! Responses: back along the Via token, or into a client transaction.

use super::*;

impl Proxy {
    pub(super) fn handle_response(&mut self, source: Source, mut resp: Message, now: Instant) {
        let Some(top) = resp.values(&HeaderName::VIA).next().and_then(Via::parse) else {
            return;
        };
        let Some(branch) = top.branch().map(str::to_string) else {
            return;
        };
        let cancel = resp.cseq().is_some_and(|(_, m)| m == Method::Cancel);
        let key = if cancel {
            format!("{branch}|CANCEL")
        } else {
            branch.clone()
        };
        if self.clients.contains_key(&key) {
            resp.pop_first(&HeaderName::VIA);
            self.client_response(&key, &top, resp, now);
            return;
        }
        // Not a transaction of ours: forwarded statelessly if our Via
        // carries our token, to the flow the token names.
        let Some(flow) = self.via_token(&top, resp.call_id(), now) else {
            tracing::debug!(from = %source.flow.remote, "response not for us");
            return;
        };
        resp.pop_first(&HeaderName::VIA);
        self.forward_response(flow, resp);
    }

    /// The flow in the token of one of our Vias: where the request came
    /// from, for responses of the same Call-ID, until the token expires.
    pub(super) fn via_token(&self, via: &Via, call_id: &str, now: Instant) -> Option<Flow> {
        let flows = via
            .param("pf")
            .flatten()
            .and_then(|t| self.tokens.decode(t, call_id, self.clock(now)))?;
        match flows.as_slice() {
            [f] => Some(*f),
            _ => None,
        }
    }

    /// Sends a response back over `flow`, the one our Via token recorded.
    /// Over UDP the next Via may name another port of the same host
    /// (§18.2.2: `received` with the sent-by port); never another host.
    pub(super) fn forward_response(&mut self, flow: Flow, resp: Message) {
        let mut flow = flow;
        if flow.conn.is_none() {
            let next = resp.values(&HeaderName::VIA).next().and_then(Via::parse);
            if let Some(addr) = next.and_then(|v| v.response_addr()) {
                if addr.ip() == flow.remote.ip() {
                    flow.remote = addr;
                }
            }
        }
        self.send(flow, resp.to_bytes());
    }

    pub(super) fn client_response(&mut self, key: &str, ours: &Via, resp: Message, now: Instant) {
        let code = resp.code().unwrap_or(500);
        let reliable;
        let (fork, invite, cancel) = {
            let Some(tx) = self.clients.get_mut(key) else {
                return;
            };
            reliable = tx.flow.transport.reliable();
            (tx.fork, tx.invite, tx.cancel)
        };
        if cancel {
            if code >= 200 {
                self.client_complete(key, reliable, now);
            }
            return;
        }
        let state = self.clients.get(key).map(|t| t.state);
        if code < 200 {
            if state == Some(CState::Calling) {
                // Timer E goes on, at T2 from now on (§17.1.2.2).
                if let Some(tx) = self.clients.get_mut(key) {
                    tx.state = CState::Proceeding;
                }
            }
        } else if invite && code < 300 {
            // 2xx ends the client INVITE transaction (RFC 6026 keeps it
            // only to forward retransmissions, which our Via token does).
            self.clients.remove(key);
        } else {
            if state == Some(CState::Completed) {
                // A retransmitted final: re-ACK for INVITE, else absorb.
                if invite {
                    self.send_ack(key, &resp);
                }
                return;
            }
            if invite {
                self.send_ack(key, &resp);
            }
            self.client_complete(key, reliable, now);
        }
        match fork {
            Some(id) if self.forks.contains_key(&id) => self.fork_response(id, key, resp, now),
            // The call is over here, but every 2xx still goes upstream.
            _ if invite && (200..300).contains(&code) => {
                if let Some(flow) = self.via_token(ours, resp.call_id(), now) {
                    self.forward_response(flow, resp);
                }
            }
            _ => {}
        }
    }

    pub(super) fn client_complete(&mut self, key: &str, reliable: bool, now: Instant) {
        let Some(tx) = self.clients.get_mut(key) else {
            return;
        };
        tx.state = CState::Completed;
        // Timer D (INVITE, ≥32 s) or K (T4) on UDP; zero on reliable.
        let wait = match (reliable, tx.invite) {
            (true, _) => Duration::ZERO,
            (false, true) => Duration::from_secs(32),
            (false, false) => self.config.t4,
        };
        self.timers.at(
            now + wait,
            Timer::Client(key.to_string(), CState::Completed, 0),
        );
    }

    /// The hop-by-hop ACK for a non-2xx final (§17.1.1.3).
    pub(super) fn send_ack(&mut self, key: &str, resp: &Message) {
        let Some(tx) = self.clients.get(key) else {
            return;
        };
        let Some(ack) = hop_request(&tx.request, Method::Ack, resp.header(&HeaderName::TO)) else {
            return;
        };
        let flow = tx.flow;
        self.send(flow, ack.to_bytes());
    }
}

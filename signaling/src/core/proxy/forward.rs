//! Stateless forwarding (RFC 3261 §16.11).

use super::*;

impl Proxy {
    /// An in-dialog request, an ACK for a 2xx, or a request with a Route
    /// that is not ours: along the flows of our token, or nowhere.
    pub(super) fn forward_stateless(
        &mut self,
        source: Source,
        req: Message,
        token: Option<RouteToken>,
        now: Instant,
    ) {
        let (flows, ftag) = match token {
            Some(RouteToken {
                flows: Some(flows),
                ftag,
                ..
            }) => (flows, ftag),
            // Our Record-Route, but its token is for another dialog, has
            // expired, or is from before a restart: no such dialog here.
            Some(RouteToken { signed: true, .. }) => {
                if !self.over_budget(&source, &req, now) {
                    self.refuse(&source, &req, 481, "Call/Transaction Does Not Exist");
                }
                return;
            }
            _ => {
                self.forward_foreign(source, req, now);
                return;
            }
        };
        if source.device.is_some_and(|d| self.revoked.contains(&d)) {
            self.refuse(&source, &req, 403, "Device Revoked");
            return;
        }
        // The token names the caller's flow, then the callee's; the
        // caller's From tag tells the direction.
        let from_caller = ftag.as_deref() == req.tag(&HeaderName::FROM);
        let flow = if from_caller { flows[1] } else { flows[0] };
        self.relay(source, req, flow, now);
    }

    /// A request with no route of ours whose next hop (the Route, else the
    /// Request-URI, §16.6 steps 6–7) is not a binding: forwarded only for
    /// an authenticated sender, to a host in [`Config::forward_to`].
    pub(super) fn forward_foreign(&mut self, source: Source, mut req: Message, now: Instant) {
        let ack = req.method() == Some(&Method::Ack);
        // An ACK is never answered (the one for our stateless 407 ends
        // here), so it spends no budget; anything else may be.
        if !ack && self.over_budget(&source, &req, now) {
            return;
        }
        let next_uri = match req.values(&HeaderName::ROUTE).next() {
            Some(r) => NameAddr::parse(r).ok().map(|na| na.uri),
            None => req.uri().cloned(),
        };
        // Names us but carries no route of ours (expired, another
        // dialog's, or from before a restart): the dialog is not here.
        if next_uri.as_ref().is_some_and(|u| self.names_us(u)) {
            self.refuse(&source, &req, 404, "Not Here");
            return;
        }
        let allowed = next_uri.as_ref().and_then(Flow::for_uri).filter(|f| {
            self.config
                .forward_to
                .iter()
                .any(|n| n.contains(f.remote.ip()))
        });
        let Some(flow) = allowed else {
            self.metrics.relay_refused += 1;
            self.refuse(&source, &req, 403, "Relaying Forbidden");
            return;
        };
        if ack {
            // An ACK carries no credentials; only a device's goes on.
            if source.device.is_some_and(|d| !self.revoked.contains(&d)) {
                self.relay(source, req, flow, now);
            }
            return;
        }
        let method = req.method().cloned().unwrap_or(Method::Ack);
        match self.authenticate(&source, &mut req, &method, now) {
            Auth::Caller(Caller::Device(_) | Caller::Account(_)) => {
                self.relay(source, req, flow, now)
            }
            // `allow_unauthenticated_calls` does not open forwarding.
            other => self.refuse_auth(&source, &req, &other, 407, now),
        }
    }

    /// Sends a request on to `flow` with our Via on top (§16.6).
    pub(super) fn relay(&mut self, source: Source, mut req: Message, flow: Flow, now: Instant) {
        if req
            .header(&HeaderName::MAX_FORWARDS)
            .is_some_and(|v| v.trim() == "0")
        {
            self.refuse(&source, &req, 483, "Too Many Hops");
            return;
        }
        let method = req.method().cloned().unwrap_or(Method::Ack);
        decrement_max_forwards(&mut req);
        // §16.11: a branch that depends only on the incoming one, so a
        // retransmission leaves with the same branch.
        let incoming = req
            .values(&HeaderName::VIA)
            .next()
            .unwrap_or("")
            .to_string();
        let mut seed = incoming.into_bytes();
        seed.extend_from_slice(method.as_str().as_bytes());
        let branch = format!("{MAGIC_COOKIE}s{}", self.tokens.digest(&seed));
        let via = self.our_via(
            flow.transport,
            &branch,
            reply_flow(&source, &req),
            req.call_id(),
            now,
        );
        req.prepend(HeaderName::VIA, via);
        self.send(flow, req.to_bytes());
    }
}

//! Bindings shared between nodes ([`Config::shared_location`]): a device
//! registers at one node, its *edge*, which holds its flow; a call may
//! arrive at any node.
//!
//! The edge publishes each binding with a *path* (RFC 3327): a SIP URI of
//! its own carrying a signed token that names the device's flow (`pe`,
//! one flow, good until the binding expires; unlike a dialog's `pf` token
//! it is not bound to a Call-ID). A node forking a call asks the runtime
//! for the handle's bindings at other nodes ([`Event::Locate`]) and sends
//! each a branch with `Route: <path>` to the edge, which checks the token
//! and forwards the request down the device's flow, record-routing itself.
//! Responses come back by Via, in-dialog requests by the two Record-Routes
//! (device → edge → the node the call arrived at → caller), each node
//! forwarding statelessly on its own token. The path never reaches callers
//! or devices: the edge takes its Route off before forwarding.

use super::*;

/// What a path token is signed for, in place of a dialog's Call-ID: a
/// Call-ID holds no NUL, so no token made for a request (a Via's, a
/// Record-Route's) verifies as a path, nor the reverse.
const PATH_LABEL: &str = "\0path";

/// A binding as the other nodes see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SharedBinding {
    /// Names the binding across registrations (`+sip.instance`, else its
    /// push token, else its contact): what a call waiting for it by push
    /// waits on.
    pub id: String,
    /// The contact URI: the Request-URI of a branch to it.
    pub contact: String,
    /// The edge's path URI, `<sip:…;lr;pe=…>`; `None` while the binding is
    /// asleep (its flow is gone: reachable only by push).
    pub path: Option<String>,
    pub push: Option<PushParams>,
    #[serde(with = "device_hex")]
    pub device: Option<DeviceId>,
    /// Unix seconds.
    pub expires: u64,
}

/// A device id as its 32 hex digits.
mod device_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    use wire::keys::DeviceId;

    pub fn serialize<S: Serializer>(d: &Option<DeviceId>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DeviceId>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| h.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// A call waiting for [`Event::Locate`]'s answer.
pub(super) struct Locating {
    key: String,
    source: Source,
    request: Message,
    handle: Handle,
}

impl Proxy {
    /// This node's live bindings of `handle`, as other nodes should see
    /// them.
    pub fn shared_bindings(&self, handle: &Handle, now: Instant) -> Vec<SharedBinding> {
        let clock = self.clock(now);
        self.registrar
            .active(handle, now)
            .map(|(_, b)| {
                let expires = clock + b.expires_at.saturating_duration_since(now).as_secs();
                SharedBinding {
                    id: binding_id(b),
                    contact: b.contact.uri.to_string(),
                    path: b.target().and_then(|f| self.path_uri(f, expires)),
                    push: b.push.clone(),
                    device: b.device,
                    expires,
                }
            })
            .collect()
    }

    /// Tells the runtime this node's bindings of `handle` changed.
    pub(super) fn announce_bindings(&mut self, handle: &Handle, now: Instant) {
        if self.config.shared_location {
            let bindings = self.shared_bindings(handle, now);
            self.events.push_back(Event::Bound {
                handle: handle.clone(),
                bindings,
            });
        }
    }

    /// Our path URI for `flow`, good until `expires` (our clock's
    /// seconds): over TCP if we listen on it (an INVITE with SDP and an
    /// Identity header outgrows a datagram, RFC 3261 §18.1.1), else UDP;
    /// `None` with neither.
    fn path_uri(&self, flow: Flow, expires: u64) -> Option<String> {
        let ours = |t: Transport| self.config.advertise.iter().find(|(a, _)| *a == t);
        let (transport, addr) = ours(Transport::Tcp).or_else(|| ours(Transport::Udp))?;
        let token = self.tokens.encode(&[flow], PATH_LABEL, expires);
        let mut uri = Uri::host_port(&addr.ip().to_string(), Some(addr.port()));
        if *transport == Transport::Tcp {
            uri.set_param("transport", Some("tcp"));
        }
        uri.set_param("lr", None);
        uri.set_param("pe", Some(&token));
        Some(format!("<{uri}>"))
    }

    /// The device flow a path token of ours names, if it is valid.
    pub(super) fn edge_flow(&self, uri: &Uri, now: Instant) -> Option<Flow> {
        let token = uri.param("pe").flatten()?;
        let flows = self.tokens.decode(token, PATH_LABEL, self.clock(now))?;
        match flows.as_slice() {
            [f] => Some(*f),
            _ => None,
        }
    }

    /// Parks an admitted call until the runtime has looked up the handle's
    /// bindings at other nodes.
    pub(super) fn locate(
        &mut self,
        source: Source,
        req: Message,
        key: String,
        handle: Handle,
        now: Instant,
    ) {
        if !self.servers.contains_key(&key) {
            self.start_server(&key, source, &req, None);
            if req.method() == Some(&Method::Invite) {
                let trying = Message::response_to(&req, 100, "Trying", None);
                self.send_response(&key, trying, now);
            }
        }
        if self.locating.len() >= MAX_PENDING_AUTH {
            self.respond(&key, 503, "Service Unavailable", now);
            return;
        }
        let id = self.next_id();
        self.locating.insert(
            id,
            Locating {
                key,
                source,
                request: req,
                handle: handle.clone(),
            },
        );
        self.events.push_back(Event::Locate { id, handle });
    }

    /// The runtime's answer to [`Event::Locate`]: the handle's bindings at
    /// other nodes (expired ones and this node's own are skipped).
    pub fn handle_located(&mut self, id: u64, remote: Vec<SharedBinding>, now: Instant) {
        let Some(l) = self.locating.remove(&id) else {
            return;
        };
        // Unless the caller CANCELled meanwhile.
        let open = self
            .servers
            .get(&l.key)
            .is_some_and(|t| t.state == SState::Proceeding);
        if !open {
            return;
        }
        let clock = self.clock(now);
        let remote = remote
            .into_iter()
            .filter(|b| b.expires > clock)
            .filter(|b| !b.path.as_deref().is_some_and(|p| self.path_is_ours(p)))
            .collect();
        self.start_fork(l.source, l.request, l.key, l.handle, remote, now);
    }

    /// Another node took a digest answer with this nonce and count: a
    /// replay of it here is refused as it would be there.
    pub fn handle_nonce_used(&mut self, nonce: &str, nc: u32) {
        self.nonce_counts.record(nonce, nc);
    }

    fn path_is_ours(&self, path: &str) -> bool {
        NameAddr::parse(path).is_ok_and(|na| self.names_us(&na.uri))
    }

    /// A device registered at another node (the runtime heard so): a call
    /// here waiting for it by push gets its branch through that node now.
    pub fn handle_remote_bound(&mut self, handle: &Handle, b: SharedBinding, now: Instant) {
        let Some(path) = b.path.clone() else {
            return;
        };
        let Some((flow, contact)) = remote_target(&path, &b.contact) else {
            return;
        };
        self.woken(handle, &b.id, flow, contact, Some(path), now);
    }

    /// A request that came with one of our path tokens (from the node a
    /// call arrived at): down the device's flow, if a binding still uses
    /// it.
    pub(super) fn forward_to_edge(
        &mut self,
        source: Source,
        mut req: Message,
        edge: Flow,
        now: Instant,
    ) {
        let method = req.method().cloned().unwrap_or(Method::Ack);
        if !self.registrar.flow_in_use(&edge) {
            if method != Method::Ack && !self.over_budget(&source, &req, now) {
                self.refuse(&source, &req, 480, "Temporarily Unavailable");
            }
            return;
        }
        if method == Method::Invite {
            // The dialog's requests come back through us: our token names
            // the way to the node the call came from, then the device.
            let ftag = req.tag(&HeaderName::FROM).unwrap_or("").to_string();
            let expires = self.clock(now) + self.config.dialog_lifetime.as_secs();
            let token = self
                .tokens
                .encode(&[source.flow, edge], req.call_id(), expires);
            if source.flow.transport != edge.transport {
                req.prepend(
                    HeaderName::RECORD_ROUTE,
                    self.record_route(source.flow.transport, &ftag, &token),
                );
            }
            req.prepend(
                HeaderName::RECORD_ROUTE,
                self.record_route(edge.transport, &ftag, &token),
            );
        }
        self.relay(source, req, edge, now);
    }
}

/// Where a branch to a binding at another node goes: the flow to its
/// edge (from the path URI) and the Request-URI (its contact).
pub(super) fn remote_target(path: &str, contact: &str) -> Option<(Flow, Uri)> {
    let edge = NameAddr::parse(path).ok()?.uri;
    let flow = Flow::for_uri(&edge)?;
    let contact = Uri::parse(contact).ok()?;
    Some((flow, contact))
}

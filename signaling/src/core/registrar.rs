//! The location service behind REGISTER (RFC 3261 §10.3): which contacts
//! are bound to each handle, and how to reach them.
//!
//! A binding is identified by its `+sip.instance` and `reg-id` (RFC 5626
//! outbound), else its `+sip.instance` alone, else its contact URI. A
//! binding made over a connection is reached over that connection while it
//! is open. When the connection closes, a binding that carries RFC 8599
//! push parameters stays, *asleep*: the proxy wakes it by push when a call
//! comes; a binding without them that was registered with outbound goes
//! (its flow is gone, RFC 5626 §5.3); any other binding falls back to its
//! contact address.

use crate::core::flow::{ConnId, Flow, Transport};
use crate::core::message::{HeaderName, Message};
use crate::core::uri::NameAddr;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use wire::handle::Handle;
use wire::keys::DeviceId;

/// RFC 8599 push parameters from a Contact URI.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushParams {
    /// `pn-provider`: `apns`, `fcm`, `webpush`, or `parley` for the
    /// courier's own device link.
    pub provider: String,
    /// `pn-prid`: the push token (for the courier, hex device token).
    pub prid: String,
    /// `pn-param`: provider-specific; for APNs `<team>.<topic>.voip`.
    pub param: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Binding {
    pub contact: NameAddr,
    /// `+sip.instance` without its quotes and angle brackets.
    pub instance: Option<String>,
    pub reg_id: Option<u32>,
    /// The flow the REGISTER came over.
    pub flow: Flow,
    /// Registered with RFC 5626 outbound (`reg-id`).
    pub outbound: bool,
    /// For connection flows: the connection is still open.
    pub live: bool,
    pub expires_at: Instant,
    pub call_id: String,
    pub cseq: u32,
    pub push: Option<PushParams>,
    pub device: Option<DeviceId>,
}

impl Binding {
    /// Where requests for this binding go now; `None` if it is asleep (or
    /// its contact names a host we would have to resolve).
    pub fn target(&self) -> Option<Flow> {
        if self.flow.conn.is_some() && self.live && self.reuses_connection() {
            return Some(self.flow);
        }
        if self.flow.transport == Transport::Udp && self.outbound {
            return Some(self.flow);
        }
        if self.push.is_some() && self.flow.conn.is_some() {
            return None;
        }
        Flow::for_uri(&self.contact.uri)
    }

    /// Requests go back over the REGISTER's connection when the device
    /// asked for it (outbound, push), when its contact is the connection's
    /// own address, or when the contact names no address we could dial
    /// (a device behind NAT, a WebSocket client). A third-party
    /// registration of some other address is reached at that address.
    fn reuses_connection(&self) -> bool {
        let uri = &self.contact.uri;
        let contact_ip = uri.host.parse::<IpAddr>().ok();
        self.outbound
            || self.push.is_some()
            || contact_ip.is_none()
            || (contact_ip == Some(self.flow.remote.ip())
                && uri.port.unwrap_or(5060) == self.flow.remote.port())
    }

    /// Asleep: reachable only by push.
    pub fn asleep(&self) -> bool {
        self.push.is_some() && self.target().is_none()
    }

    fn same(&self, instance: &Option<String>, reg_id: Option<u32>, contact: &NameAddr) -> bool {
        match (&self.instance, instance) {
            (Some(a), Some(b)) => a == b && self.reg_id == reg_id,
            (None, None) => self.contact.uri == contact.uri,
            _ => false,
        }
    }
}

/// Limits the registrar enforces.
#[derive(Clone, Debug)]
pub struct Limits {
    pub min_expires: Duration,
    pub max_expires: Duration,
    pub default_expires: Duration,
    pub max_bindings_per_handle: usize,
    pub max_bindings: usize,
}

/// Why a REGISTER was refused: status, reason phrase, and for 423 the
/// minimum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: u16,
    pub reason: &'static str,
    pub min_expires: Option<u64>,
}

fn refuse(code: u16, reason: &'static str) -> Refusal {
    Refusal {
        code,
        reason,
        min_expires: None,
    }
}

/// What a successful REGISTER changed.
#[derive(Debug, Default)]
pub struct Update {
    /// Indices (into [`Registrar::bindings`]) of bindings added or
    /// refreshed that can be reached now.
    pub awake: Vec<usize>,
    pub added: usize,
    pub removed: usize,
}

#[derive(Debug, Default)]
pub struct Registrar {
    aors: HashMap<Handle, Vec<Binding>>,
    by_conn: HashMap<ConnId, Vec<Handle>>,
    total: usize,
}

impl Registrar {
    /// The bindings of a handle, expired ones included until the next
    /// sweep; use [`Registrar::active`].
    pub fn bindings(&self, handle: &Handle) -> &[Binding] {
        self.aors.get(handle).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn active<'a>(
        &'a self,
        handle: &Handle,
        now: Instant,
    ) -> impl Iterator<Item = (usize, &'a Binding)> + 'a {
        self.bindings(handle)
            .iter()
            .enumerate()
            .filter(move |(_, b)| b.expires_at > now)
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Applies an authorised REGISTER for `handle` (RFC 3261 §10.3 steps
    /// 6–8).
    pub fn register(
        &mut self,
        handle: &Handle,
        req: &Message,
        flow: Flow,
        device: Option<DeviceId>,
        limits: &Limits,
        now: Instant,
    ) -> Result<Update, Refusal> {
        let call_id = req.call_id().to_string();
        let (cseq, _) = req.cseq().ok_or(refuse(400, "Bad CSeq Header"))?;
        let header_expires = match req.header(&HeaderName::EXPIRES) {
            Some(v) => Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| refuse(400, "Bad Expires Header"))?,
            ),
            None => None,
        };
        let contacts: Vec<&str> = req.values(&HeaderName::CONTACT).collect();
        let mut update = Update::default();
        if contacts.is_empty() {
            return Ok(update); // a query (§10.3 step 6 "no Contact")
        }
        if contacts.iter().any(|c| c.trim() == "*") {
            if contacts.len() != 1 || header_expires != Some(0) {
                return Err(refuse(400, "Wildcard Contact Needs Expires 0"));
            }
            update.removed = self.remove_all(handle);
            return Ok(update);
        }
        let mut parsed = Vec::with_capacity(contacts.len());
        for c in contacts {
            let na = NameAddr::parse(c).map_err(|_| refuse(400, "Bad Contact Header"))?;
            let expires = match na.param("expires") {
                Some(Some(v)) => v
                    .parse::<u64>()
                    .map_err(|_| refuse(400, "Bad Contact Expires"))?,
                Some(None) => return Err(refuse(400, "Bad Contact Expires")),
                None => header_expires.unwrap_or(limits.default_expires.as_secs()),
            };
            if expires != 0 && expires < limits.min_expires.as_secs() {
                return Err(Refusal {
                    code: 423,
                    reason: "Interval Too Brief",
                    min_expires: Some(limits.min_expires.as_secs()),
                });
            }
            let instance = na.param("+sip.instance").flatten().map(|v| {
                v.trim_matches('"')
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            });
            let reg_id = match na.param("reg-id") {
                Some(Some(v)) => Some(
                    v.parse::<u32>()
                        .map_err(|_| refuse(400, "Bad reg-id Parameter"))?,
                ),
                Some(None) => return Err(refuse(400, "Bad reg-id Parameter")),
                None => None,
            };
            if reg_id.is_some() && instance.is_none() {
                // RFC 5626 §6: reg-id without +sip.instance is ignored.
                parsed.push((na, None, None, expires));
            } else {
                parsed.push((na, instance, reg_id, expires));
            }
        }

        let list = self.aors.entry(handle.clone()).or_default();
        for (na, instance, reg_id, expires) in parsed {
            let existing = list.iter().position(|b| b.same(&instance, reg_id, &na));
            if let Some(i) = existing {
                let b = &list[i];
                // §10.3 step 7: an older CSeq on the same Call-ID is out
                // of order. The same CSeq is this request again (a
                // retransmission answered statelessly) and is applied
                // again, which changes nothing.
                if b.call_id == call_id && cseq < b.cseq {
                    return Err(refuse(500, "Out Of Order REGISTER"));
                }
            }
            if expires == 0 {
                if let Some(i) = existing {
                    list.remove(i);
                    self.total -= 1;
                    update.removed += 1;
                }
                continue;
            }
            let expires = expires.min(limits.max_expires.as_secs());
            let push = match (na.uri.param("pn-provider"), na.uri.param("pn-prid")) {
                (Some(Some(provider)), Some(Some(prid))) => Some(PushParams {
                    provider: provider.to_string(),
                    prid: prid.to_string(),
                    param: na.uri.param("pn-param").flatten().map(str::to_string),
                }),
                _ => None,
            };
            let binding = Binding {
                outbound: reg_id.is_some(),
                contact: na,
                instance,
                reg_id,
                flow,
                live: true,
                expires_at: now + Duration::from_secs(expires),
                call_id: call_id.clone(),
                cseq,
                push,
                device,
            };
            let at = match existing {
                Some(i) => {
                    list[i] = binding;
                    i
                }
                None => {
                    if list.len() >= limits.max_bindings_per_handle {
                        return Err(refuse(503, "Too Many Registered Contacts"));
                    }
                    if self.total >= limits.max_bindings {
                        return Err(refuse(503, "Registrar Full"));
                    }
                    list.push(binding);
                    self.total += 1;
                    update.added += 1;
                    list.len() - 1
                }
            };
            if list[at].target().is_some() {
                update.awake.push(at);
            }
            if let Some(conn) = flow.conn {
                let handles = self.by_conn.entry(conn).or_default();
                if !handles.contains(handle) {
                    handles.push(handle.clone());
                }
            }
        }
        if list.is_empty() {
            self.aors.remove(handle);
        }
        Ok(update)
    }

    /// A connection closed: its bindings fall asleep, go, or fall back to
    /// their contact address (see the module doc). Returns the handles
    /// whose bindings changed.
    pub fn conn_closed(&mut self, conn: ConnId) -> Vec<Handle> {
        let Some(handles) = self.by_conn.remove(&conn) else {
            return Vec::new();
        };
        let mut removed = 0;
        for h in &handles {
            let Some(list) = self.aors.get_mut(h) else {
                continue;
            };
            let before = list.len();
            list.retain_mut(|b| {
                if b.flow.conn != Some(conn) {
                    return true;
                }
                b.live = false;
                b.push.is_some() || !b.outbound
            });
            removed += before - list.len();
            if list.is_empty() {
                self.aors.remove(h);
            }
        }
        self.total -= removed;
        handles
    }

    /// Whether a connection flow is still open and carries a binding. A
    /// datagram flow has no end to notice; it counts as in use.
    pub fn flow_in_use(&self, flow: &Flow) -> bool {
        flow.conn
            .is_none_or(|conn| self.by_conn.contains_key(&conn))
    }

    /// Drops every binding of these devices (their certificates were
    /// revoked). Returns how many went.
    pub fn remove_devices(&mut self, devices: &std::collections::HashSet<DeviceId>) -> usize {
        let mut removed = 0;
        self.aors.retain(|_, list| {
            let before = list.len();
            list.retain(|b| !b.device.is_some_and(|d| devices.contains(&d)));
            removed += before - list.len();
            !list.is_empty()
        });
        self.total -= removed;
        removed
    }

    /// Drops the bindings of `handle` woken through the push token `prid`
    /// (the platform says it is dead); returns them.
    pub fn remove_push(&mut self, handle: &Handle, prid: &str) -> Vec<Binding> {
        let Some(list) = self.aors.get_mut(handle) else {
            return Vec::new();
        };
        let (gone, kept): (Vec<Binding>, Vec<Binding>) = std::mem::take(list)
            .into_iter()
            .partition(|b| b.push.as_ref().is_some_and(|p| p.prid == prid));
        *list = kept;
        if list.is_empty() {
            self.aors.remove(handle);
        }
        self.total -= gone.len();
        gone
    }

    /// Drops expired bindings.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        self.aors.retain(|_, list| {
            let before = list.len();
            list.retain(|b| b.expires_at > now);
            removed += before - list.len();
            !list.is_empty()
        });
        self.total -= removed;
        removed
    }

    /// The Contact values for a 200 to REGISTER (§10.3 step 8).
    pub fn contact_values(&self, handle: &Handle, now: Instant) -> Vec<String> {
        self.active(handle, now)
            .map(|(_, b)| {
                let mut na = b.contact.clone();
                let left = b.expires_at.saturating_duration_since(now).as_secs();
                na.set_param("expires", Some(&left.to_string()));
                na.to_string()
            })
            .collect()
    }

    fn remove_all(&mut self, handle: &Handle) -> usize {
        let n = self.aors.remove(handle).map_or(0, |l| l.len());
        self.total -= n;
        n
    }
}

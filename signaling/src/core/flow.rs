//! Transports, flows and where a message goes.
//!
//! A *flow* (RFC 5626 §3) is how we reach a peer: a UDP 5-tuple or one
//! connection (TCP, TLS, WebSocket). Connections get a [`ConnId`] from the
//! runtime. When a request crosses the proxy, the flows on both sides are
//! written into our Record-Route and Via as a signed *flow token*, so that
//! in-dialog requests and responses go back over the same connections
//! without the proxy keeping per-dialog state.

use ring::hmac;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use wire::keys::DeviceId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// WebSocket over TLS (RFC 7118).
    Wss,
}

impl Transport {
    /// The Via transport token.
    pub fn via(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Wss => "WSS",
        }
    }

    /// The URI `transport` parameter value.
    pub fn uri_param(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Wss => "ws",
        }
    }

    pub fn reliable(self) -> bool {
        self != Transport::Udp
    }

    /// The transport a URI asks for (RFC 3261 §18.1.1, RFC 7118 §5).
    pub fn from_uri(uri: &crate::core::uri::Uri) -> Transport {
        match uri.transport().as_deref() {
            Some("tcp") if uri.scheme == crate::core::uri::Scheme::Sips => Transport::Tls,
            Some("tcp") => Transport::Tcp,
            Some("tls") => Transport::Tls,
            Some("ws") | Some("wss") => Transport::Wss,
            _ if uri.scheme == crate::core::uri::Scheme::Sips => Transport::Tls,
            _ => Transport::Udp,
        }
    }

    pub fn from_via(token: &str) -> Option<Transport> {
        match token {
            "UDP" => Some(Transport::Udp),
            "TCP" => Some(Transport::Tcp),
            "TLS" => Some(Transport::Tls),
            "WSS" | "WS" => Some(Transport::Wss),
            _ => None,
        }
    }
}

/// A connection, numbered by the runtime; never reused within a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// A flow: the transport, the peer's address, and for connections the
/// connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub remote: SocketAddr,
    pub conn: Option<ConnId>,
}

impl Flow {
    /// Where a URI says to send (RFC 3261 §18.1.1, §19.1.2): its transport
    /// and port, or the defaults; `None` for a host name (we do not
    /// resolve names) or a WebSocket peer (it cannot be dialled).
    pub fn for_uri(uri: &crate::core::uri::Uri) -> Option<Flow> {
        let transport = Transport::from_uri(uri);
        if transport == Transport::Wss {
            return None;
        }
        let ip: IpAddr = uri.host.parse().ok()?;
        let port = uri
            .port
            .unwrap_or(crate::core::via::default_port(transport.via()));
        Some(Flow {
            transport,
            remote: SocketAddr::new(ip, port),
            conn: None,
        })
    }
}

/// Where a received message came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Source {
    pub flow: Flow,
    /// The device, when the peer presented a device certificate over TLS.
    pub device: Option<DeviceId>,
}

/// A message to send. The runtime sends over `flow.conn` if that
/// connection is still open; otherwise over any open connection to
/// `flow.remote` with that transport, or a new one (TCP and TLS only: a
/// WebSocket peer cannot be dialled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub flow: Flow,
    pub bytes: Vec<u8>,
}

/// Signs and reads flow tokens: `<flow>.<flow>.<expiry>.<mac>` or
/// `<flow>.<expiry>.<mac>`, where a flow is `u<hex address>`, `t…`, `s…`,
/// `w…` (transport and address) optionally followed by `-<conn id>`, and
/// the expiry is `x<hex seconds>` on the proxy's clock. The MAC
/// (HMAC-SHA256, truncated to 64 bits) covers the token and the Call-ID it
/// was issued for, keyed by signaling's secret: a token cannot be forged
/// by a peer, used in another dialog, nor outlive its expiry; nodes (and a
/// restarted process) with the same secret and Unix time take it.
#[derive(Debug)]
pub struct FlowTokens {
    key: hmac::Key,
}

impl FlowTokens {
    pub fn new(secret: &[u8; 32]) -> FlowTokens {
        FlowTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A token naming `flows`, good for requests and responses of the
    /// dialog `call_id` until `expires` (seconds on the proxy's clock).
    pub fn encode(&self, flows: &[Flow], call_id: &str, expires: u64) -> String {
        let mut out = String::with_capacity(64);
        for f in flows {
            encode_flow(&mut out, f);
            out.push('.');
        }
        let _ = write!(out, "x{expires:x}.");
        let tag = self.mac(&out, call_id);
        for b in &tag.as_ref()[..8] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// The flows in a token we signed for `call_id` that has not expired
    /// at `now` (seconds on the proxy's clock); `None` for anything else.
    pub fn decode(&self, token: &str, call_id: &str, now: u64) -> Option<Vec<Flow>> {
        let (body, mac) = token.rsplit_once('.')?;
        let signed = &token[..body.len() + 1];
        let tag = self.mac(signed, call_id);
        let mut expect = String::with_capacity(16);
        for b in &tag.as_ref()[..8] {
            let _ = write!(expect, "{b:02x}");
        }
        if !wire::keys::ct_eq(expect.as_bytes(), mac.as_bytes()) {
            return None;
        }
        let (flows, expiry) = body.rsplit_once('.')?;
        let expires = u64::from_str_radix(expiry.strip_prefix('x')?, 16).ok()?;
        if now > expires {
            return None;
        }
        flows.split('.').map(decode_flow).collect()
    }

    /// A hex digest of `input` under the process key: for branch ids that
    /// must come out the same for a retransmission (RFC 3261 §16.11).
    pub fn digest(&self, input: &[u8]) -> String {
        let tag = hmac::sign(&self.key, input);
        let mut out = String::with_capacity(20);
        for b in &tag.as_ref()[..10] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    fn mac(&self, signed: &str, call_id: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(signed.as_bytes());
        // The Call-ID cannot hold a NUL, so the split is unambiguous.
        ctx.update(b"\0");
        ctx.update(call_id.as_bytes());
        ctx.sign()
    }
}

fn encode_flow(out: &mut String, f: &Flow) {
    out.push(match f.transport {
        Transport::Udp => 'u',
        Transport::Tcp => 't',
        Transport::Tls => 's',
        Transport::Wss => 'w',
    });
    match f.remote.ip() {
        IpAddr::V4(ip) => {
            for b in ip.octets() {
                let _ = write!(out, "{b:02x}");
            }
        }
        IpAddr::V6(ip) => {
            for b in ip.octets() {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
    let _ = write!(out, "{:04x}", f.remote.port());
    if let Some(c) = f.conn {
        let _ = write!(out, "-{:x}", c.0);
    }
}

fn decode_flow(s: &str) -> Option<Flow> {
    let transport = match s.as_bytes().first()? {
        b'u' => Transport::Udp,
        b't' => Transport::Tcp,
        b's' => Transport::Tls,
        b'w' => Transport::Wss,
        _ => return None,
    };
    let rest = &s[1..];
    let (addr, conn) = match rest.split_once('-') {
        Some((a, c)) => (a, Some(ConnId(u64::from_str_radix(c, 16).ok()?))),
        None => (rest, None),
    };
    let bytes: Vec<u8> = (0..addr.len() / 2)
        .map(|i| u8::from_str_radix(addr.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<_>>()?;
    let ip = match bytes.len() {
        6 => IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?),
        18 => IpAddr::from(<[u8; 16]>::try_from(&bytes[..16]).ok()?),
        _ => return None,
    };
    let n = bytes.len();
    let port = u16::from_be_bytes([bytes[n - 2], bytes[n - 1]]);
    Some(Flow {
        transport,
        remote: SocketAddr::new(ip, port),
        conn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_forgeries() {
        let t = FlowTokens::new(&[7; 32]);
        let flows = [
            Flow {
                transport: Transport::Tcp,
                remote: "127.0.0.1:40000".parse().unwrap(),
                conn: Some(ConnId(42)),
            },
            Flow {
                transport: Transport::Udp,
                remote: "[::1]:5070".parse().unwrap(),
                conn: None,
            },
        ];
        let token = t.encode(&flows, "call-1", 100);
        assert_eq!(t.decode(&token, "call-1", 100), Some(flows.to_vec()));
        let forged = token.replacen("-2a", "-2b", 1);
        assert_eq!(t.decode(&forged, "call-1", 100), None);
        assert_eq!(
            FlowTokens::new(&[8; 32]).decode(&token, "call-1", 100),
            None
        );
        assert_eq!(t.decode("garbage", "call-1", 100), None);
        // Bound to its dialog and its lifetime.
        assert_eq!(t.decode(&token, "call-2", 100), None);
        assert_eq!(t.decode(&token, "call-1", 101), None);
        let later = token.replacen("x64.", "x65.", 1);
        assert_ne!(later, token);
        assert_eq!(t.decode(&later, "call-1", 101), None);
    }
}

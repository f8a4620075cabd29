//! How a device's calls reach the network: which TURN relay, over which
//! transport, and each call's media link (its UDP socket, and its own
//! stream to the relay when the relay is reached over TCP or TLS).
//!
//! ids names the relays as `turn:` and `turns:` URIs. UDP is the one media
//! wants; where a network blocks UDP (many corporate and hotel networks
//! do) the device reaches the relay over TCP, and where only web traffic
//! passes, over TLS (RFC 8656 §3.1). At start the device checks, in that
//! order, which one answers, unless told which to use
//! ([`super::DeviceConfig::turn_transport`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use stun_turn::message::{Class, Message, MessageBuilder, Method, TransactionId};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;

use super::DeviceError;
use crate::sip::CallId;
use crate::turn::{self, Transport};
use crate::turn_stream::{self, StreamSender, TlsTo};

/// A STUN Binding over UDP: four sends 250 ms apart.
const UDP_TRIES: u32 = 4;
const UDP_WAIT: Duration = Duration::from_millis(250);
/// How long a TCP connection to the relay may take to open.
const TCP_WITHIN: Duration = Duration::from_secs(2);

/// A relay's address and how to reach it, from a `turn:` or `turns:` URI
/// with an IP host: `turn:h:p` and `?transport=udp` are UDP,
/// `?transport=tcp` TCP, `turns:` TLS.
pub(super) fn parse_uri(uri: &str) -> Option<(Transport, SocketAddr)> {
    let (tls, rest) = match uri.strip_prefix("turns:") {
        Some(rest) => (true, rest),
        None => (false, uri.strip_prefix("turn:")?),
    };
    let (hostport, query) = rest.split_once('?').unwrap_or((rest, ""));
    let transport = match (tls, query) {
        (true, "" | "transport=tcp") => Transport::Tls,
        (false, "" | "transport=udp") => Transport::Udp,
        (false, "transport=tcp") => Transport::Tcp,
        _ => return None,
    };
    Some((transport, hostport.parse().ok()?))
}

/// The relay calls go through, and the others that take over when it
/// dies mid-call (UDP only).
#[derive(Debug)]
pub(super) struct Relays {
    pub first: turn::Config,
    pub spares: Vec<turn::Config>,
}

/// Chooses the relay and its transport: `forced`, or the first of UDP,
/// TCP and TLS that answers from here.
pub(super) async fn choose(
    uris: &[String],
    (username, password): (&str, &str),
    forced: Option<Transport>,
    media_ip: IpAddr,
) -> Result<Relays, DeviceError> {
    let named: Vec<(Transport, SocketAddr)> = uris.iter().filter_map(|u| parse_uri(u)).collect();
    let of = |t: Transport| named.iter().filter(move |(x, _)| *x == t).map(|(_, a)| *a);
    let config = |t: Transport, a: SocketAddr| turn::Config::new(a, username, password).over(t);
    let transport = match forced {
        Some(t) => t,
        None => {
            let mut chosen = None;
            for t in [Transport::Udp, Transport::Tcp, Transport::Tls] {
                if let Some(a) = of(t).next() {
                    if answers(t, a, media_ip).await {
                        chosen = Some(t);
                        break;
                    }
                    tracing::info!(transport = ?t, relay = %a, "the relay does not answer");
                }
            }
            // None answered: UDP, and calls will say the relay failed.
            chosen.unwrap_or(Transport::Udp)
        }
    };
    let mut relays = of(transport).map(|a| config(transport, a));
    let first = relays
        .next()
        .ok_or_else(|| DeviceError::Call(format!("no {transport:?} relay among the TURN URIs")))?;
    Ok(Relays {
        first,
        // A stream is opened per call to one relay; failing over to
        // another is for UDP.
        spares: match transport {
            Transport::Udp => relays.collect(),
            _ => Vec::new(),
        },
    })
}

/// Whether the relay at `at` answers over `transport`: a STUN Binding over
/// UDP, or a TCP connection (for TLS too) that opens.
async fn answers(transport: Transport, at: SocketAddr, media_ip: IpAddr) -> bool {
    match transport {
        Transport::Udp => binding_answered(at, media_ip).await.unwrap_or(false),
        Transport::Tcp | Transport::Tls => {
            matches!(
                tokio::time::timeout(TCP_WITHIN, TcpStream::connect(at)).await,
                Ok(Ok(_))
            )
        }
    }
}

async fn binding_answered(at: SocketAddr, media_ip: IpAddr) -> std::io::Result<bool> {
    let socket = UdpSocket::bind(SocketAddr::new(media_ip, 0)).await?;
    let mut tid = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tid)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    let tid = TransactionId(tid);
    let mut request = Vec::new();
    MessageBuilder::new(&mut request, Class::Request, Method::Binding, tid).add_fingerprint();
    let mut buf = vec![0u8; 1500];
    for _ in 0..UDP_TRIES {
        socket.send_to(&request, at).await?;
        let deadline = tokio::time::Instant::now() + UDP_WAIT;
        while let Ok(Ok((n, from))) =
            tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await
        {
            let ok = Message::decode(&buf[..n])
                .is_ok_and(|m| m.transaction_id() == tid && m.class() == Class::Success);
            if from == at && ok {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Frames from the relay's stream.
pub(super) type Incoming = mpsc::Receiver<Vec<u8>>;

/// A call's way out: its UDP socket, and its stream to the relay when
/// the relay is reached over TCP or TLS.
#[derive(Clone, Debug)]
pub(super) struct MediaLink {
    udp: Arc<UdpSocket>,
    turn: Option<StreamSender>,
}

impl MediaLink {
    /// A UDP socket on `media_ip`, and a stream to `relay` if it is
    /// reached over one, with the frames that come in on it.
    pub(super) async fn open(
        media_ip: IpAddr,
        relay: &turn::Config,
        tls: &TlsTo,
    ) -> Result<(MediaLink, Option<Incoming>), DeviceError> {
        let udp = UdpSocket::bind(SocketAddr::new(media_ip, 0))
            .await
            .map_err(|e| DeviceError::Call(format!("media socket: {e}")))?;
        let (turn, incoming) = match relay.transport.is_stream() {
            true => {
                let (tx, rx) = turn_stream::connect(relay.server, relay.transport, Some(tls))
                    .await
                    .map_err(|e| {
                        DeviceError::Call(format!("TURN over {:?}: {e}", relay.transport))
                    })?;
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let link = MediaLink {
            udp: Arc::new(udp),
            turn,
        };
        Ok((link, incoming))
    }

    /// Hands what comes in on the socket and on the relay's stream to
    /// `to` as `(call, from, datagram)`, the relay's frames as from its
    /// address, until `to` is closed or the socket fails.
    pub(super) fn deliver(
        &self,
        call: &str,
        incoming: Option<Incoming>,
        to: mpsc::Sender<(CallId, SocketAddr, Vec<u8>)>,
    ) {
        if let (Some(mut rx), Some(server)) = (incoming, self.turn.as_ref().map(|t| t.server())) {
            let (to, id) = (to.clone(), call.to_string());
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if to.send((id.clone(), server, frame)).await.is_err() {
                        return;
                    }
                }
            });
        }
        let (s, id) = (self.udp.clone(), call.to_string());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                if to
                    .send((id.clone(), from, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
    }

    pub(super) fn local_addr(&self) -> Result<SocketAddr, DeviceError> {
        self.udp
            .local_addr()
            .map_err(|e| DeviceError::Call(e.to_string()))
    }

    /// Sends a datagram: on the relay's stream if it goes to the relay
    /// and the relay is reached over one, else on the UDP socket.
    pub(super) async fn send_to(&self, data: &[u8], to: SocketAddr) {
        match &self.turn {
            Some(t) if t.server() == to => {
                t.send(data);
            }
            _ => {
                let _ = self.udp.send_to(data, to).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_uris_name_their_transport() {
        let a: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5349".parse().unwrap();
        assert_eq!(parse_uri("turn:192.0.2.1:3478"), Some((Transport::Udp, a)));
        assert_eq!(
            parse_uri("turn:192.0.2.1:3478?transport=udp"),
            Some((Transport::Udp, a))
        );
        assert_eq!(
            parse_uri("turn:192.0.2.1:3478?transport=tcp"),
            Some((Transport::Tcp, a))
        );
        assert_eq!(
            parse_uri("turns:192.0.2.1:5349?transport=tcp"),
            Some((Transport::Tls, b))
        );
        assert_eq!(parse_uri("turns:192.0.2.1:5349"), Some((Transport::Tls, b)));
        // DTLS, names and other schemes are not ours to use.
        assert_eq!(parse_uri("turns:192.0.2.1:5349?transport=udp"), None);
        assert_eq!(parse_uri("turn:relay.example:3478"), None);
        assert_eq!(parse_uri("stun:192.0.2.1:3478"), None);
    }

    /// A relay that does not answer over UDP (nothing listens there) but
    /// takes TCP is reached over TCP; asked for TLS, the device uses TLS.
    #[tokio::test]
    async fn the_first_transport_that_answers_is_chosen() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = tcp.local_addr().unwrap();
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let uris = vec![
            format!("turn:{}?transport=udp", silent.local_addr().unwrap()),
            format!("turn:{at}?transport=tcp"),
            format!("turns:{at}?transport=tcp"),
        ];
        let local: IpAddr = [127, 0, 0, 1].into();
        let r = choose(&uris, ("u", "p"), None, local).await.unwrap();
        assert_eq!((r.first.transport, r.first.server), (Transport::Tcp, at));
        assert!(r.spares.is_empty());
        let r = choose(&uris, ("u", "p"), Some(Transport::Tls), local)
            .await
            .unwrap();
        assert_eq!((r.first.transport, r.first.server), (Transport::Tls, at));
        let only_udp = &uris[..1];
        let e = choose(only_udp, ("u", "p"), Some(Transport::Tcp), local).await;
        assert!(e.is_err());
    }
}

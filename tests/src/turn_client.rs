//! A small blocking TURN client over UDP, for tests that must see exact
//! bytes and error codes. It uses the relay's codec but none of its server
//! logic, and answers 401/438 challenges the way RFC 8489 clients do.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;
use stun_turn::core::auth::long_term_key;
use stun_turn::message::{
    AttrType, Class, ErrorCode, IntegrityKind, Message, MessageBuilder, Method, PasswordAlgorithm,
    TransactionId,
};

/// What came back from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    ChannelData(u16, Vec<u8>),
    Data(SocketAddr, Vec<u8>),
}

#[derive(Debug)]
pub struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    user: String,
    password: String,
    realm: String,
    nonce: String,
    next_tid: u32,
}

impl TurnClient {
    pub fn new(server: SocketAddr, user: &str, password: &str) -> TurnClient {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        TurnClient {
            sock,
            server,
            user: user.into(),
            password: password.into(),
            realm: String::new(),
            nonce: String::new(),
            next_tid: 1,
        }
    }

    /// Allocates a UDP relay; returns the relayed address or the error code.
    pub fn allocate(&mut self) -> Result<SocketAddr, u16> {
        self.allocate_with(|_| {}).map(|(a, _)| a)
    }

    /// Allocates an even relay port and reserves the next one (EVEN-PORT
    /// with the R bit); returns the address and the RESERVATION-TOKEN.
    pub fn allocate_even_pair(&mut self) -> Result<(SocketAddr, [u8; 8]), u16> {
        let (addr, token) = self.allocate_with(|b| {
            b.add_attr(AttrType::EvenPort, &[0x80]);
        })?;
        Ok((addr, token.expect("RESERVATION-TOKEN")))
    }

    /// Allocates the port reserved under `token`.
    pub fn allocate_reserved(&mut self, token: [u8; 8]) -> Result<SocketAddr, u16> {
        self.allocate_with(|b| {
            b.add_attr(AttrType::ReservationToken, &token);
        })
        .map(|(a, _)| a)
    }

    fn allocate_with(
        &mut self,
        extra: impl Fn(&mut MessageBuilder<'_>),
    ) -> Result<(SocketAddr, Option<[u8; 8]>), u16> {
        let resp = self.transact(Method::Allocate, |b| {
            b.add_attr(AttrType::RequestedTransport, &[17, 0, 0, 0]);
            extra(b);
        })?;
        let m = Message::decode(&resp).expect("decodes");
        let addr = m
            .xor_address(AttrType::XorRelayedAddress)
            .expect("address")
            .expect("relayed address");
        let token = m
            .attr(AttrType::ReservationToken)
            .map(|t| t.try_into().expect("8-byte token"));
        Ok((addr, token))
    }

    pub fn create_permission(&mut self, peer: SocketAddr) -> Result<(), u16> {
        self.transact(Method::CreatePermission, |b| {
            b.add_xor_address(AttrType::XorPeerAddress, peer);
        })
        .map(drop)
    }

    pub fn channel_bind(&mut self, channel: u16, peer: SocketAddr) -> Result<(), u16> {
        self.transact(Method::ChannelBind, |b| {
            b.add(
                AttrType::ChannelNumber as u16,
                &[(channel >> 8) as u8, channel as u8, 0, 0],
            );
            b.add_xor_address(AttrType::XorPeerAddress, peer);
        })
        .map(drop)
    }

    pub fn refresh(&mut self, lifetime: u32) -> Result<(), u16> {
        self.transact(Method::Refresh, |b| {
            b.add_u32(AttrType::Lifetime, lifetime);
        })
        .map(drop)
    }

    pub fn send_channel(&self, channel: u16, data: &[u8]) {
        let mut f = vec![(channel >> 8) as u8, channel as u8];
        f.extend_from_slice(&(data.len() as u16).to_be_bytes());
        f.extend_from_slice(data);
        self.sock.send_to(&f, self.server).expect("send");
    }

    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        let tid = self.tid();
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, Class::Indication, Method::Send, tid);
        b.add_xor_address(AttrType::XorPeerAddress, peer);
        b.add_attr(AttrType::Data, data);
        self.sock.send_to(&buf, self.server).expect("send");
    }

    /// The next relayed datagram, or `None` after the read timeout.
    pub fn recv(&self) -> Option<Incoming> {
        let mut buf = vec![0u8; 65536];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        let b = &buf[..n];
        if stun_turn::channel_data::is_channel_data(b) {
            let (ch, range) = stun_turn::channel_data::decode(b).ok()?;
            return Some(Incoming::ChannelData(ch.get(), b[range].to_vec()));
        }
        let m = Message::decode(b).ok()?;
        let peer = m.xor_address(AttrType::XorPeerAddress).ok()??;
        Some(Incoming::Data(peer, m.attr(AttrType::Data)?.to_vec()))
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        let mut t = [0x5a; 12];
        t[..4].copy_from_slice(&self.next_tid.to_be_bytes());
        TransactionId(t)
    }

    /// Sends a request, answering up to two challenges (401, 438).
    fn transact(
        &mut self,
        method: Method,
        attrs: impl Fn(&mut MessageBuilder<'_>),
    ) -> Result<Vec<u8>, u16> {
        for _ in 0..3 {
            let tid = self.tid();
            let mut buf = Vec::new();
            let mut b = MessageBuilder::new(&mut buf, Class::Request, method, tid);
            attrs(&mut b);
            let key = long_term_key(
                PasswordAlgorithm::Md5,
                &self.user,
                &self.realm,
                &self.password,
            );
            if !self.nonce.is_empty() {
                b.add_attr(AttrType::Username, self.user.as_bytes());
                b.add_attr(AttrType::Realm, self.realm.as_bytes());
                b.add_attr(AttrType::Nonce, self.nonce.as_bytes());
                b.add_integrity(IntegrityKind::Sha1, &key);
            }
            b.add_fingerprint();
            self.sock.send_to(&buf, self.server).expect("send");
            let resp = self.response(tid).ok_or(0u16)?;
            let m = Message::decode(&resp).expect("response decodes");
            if m.class() == Class::Success {
                assert_eq!(
                    m.verify_integrity(&key).expect("integrity"),
                    Some(IntegrityKind::Sha1)
                );
                return Ok(resp);
            }
            let (code, _) =
                ErrorCode::decode(m.attr(AttrType::ErrorCode).expect("ERROR-CODE")).expect("valid");
            if code.0 == 401 || code.0 == 438 {
                let first = self.nonce.is_empty() || code.0 == 438;
                self.realm = m
                    .text_attr(AttrType::Realm, 763)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_owned();
                self.nonce = m
                    .text_attr(AttrType::Nonce, 763)
                    .ok()
                    .flatten()
                    .unwrap_or_default()
                    .to_owned();
                if first {
                    continue;
                }
            }
            return Err(code.0);
        }
        Err(401)
    }

    /// Waits for the response to `tid`, skipping relayed data.
    fn response(&self, tid: TransactionId) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        for _ in 0..64 {
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            if let Ok(m) = Message::decode(&buf[..n]) {
                if m.transaction_id() == tid {
                    return Some(buf[..n].to_vec());
                }
            }
        }
        None
    }
}

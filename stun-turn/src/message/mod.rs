//! STUN message codec (RFC 8489 §5, §14, §15), with the TURN attributes of
//! RFC 8656, RFC 6062 and RFC 6156 and the classic RFC 3489 header.
//!
//! [`Message`] is a borrowed view over a received datagram: decoding checks
//! the header and every attribute's bounds once, and attribute values are
//! then read from the original buffer without copying. [`MessageBuilder`]
//! writes a message into a caller-owned, reusable `Vec<u8>` and appends
//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT at the end.

pub mod attr;
mod integrity;

pub use attr::{AttrType, ErrorCode, PasswordAlgorithm};
pub use integrity::{ct_eq, fingerprint_crc, hmac_sha1, hmac_sha256, IntegrityKind};

use crate::error::DecodeError;
use std::net::SocketAddr;

/// The fixed value in bytes 4..8 of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// At most this many attributes are indexed per message; more is a 400.
/// Real requests carry fewer than 16.
pub const MAX_ATTRS: usize = 32;

/// The message class (RFC 8489 §5: bits C1 and C0 of the type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// The STUN and TURN methods this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Binding,
    Allocate,
    Refresh,
    Send,
    Data,
    CreatePermission,
    ChannelBind,
    Connect,
    ConnectionBind,
    ConnectionAttempt,
    /// Any other 12-bit method number.
    Other(u16),
}

impl Method {
    pub fn code(self) -> u16 {
        match self {
            Method::Binding => 0x001,
            Method::Allocate => 0x003,
            Method::Refresh => 0x004,
            Method::Send => 0x006,
            Method::Data => 0x007,
            Method::CreatePermission => 0x008,
            Method::ChannelBind => 0x009,
            Method::Connect => 0x00a,
            Method::ConnectionBind => 0x00b,
            Method::ConnectionAttempt => 0x00c,
            Method::Other(m) => m & 0x0fff,
        }
    }

    pub fn from_code(code: u16) -> Method {
        match code {
            0x001 => Method::Binding,
            0x003 => Method::Allocate,
            0x004 => Method::Refresh,
            0x006 => Method::Send,
            0x007 => Method::Data,
            0x008 => Method::CreatePermission,
            0x009 => Method::ChannelBind,
            0x00a => Method::Connect,
            0x00b => Method::ConnectionBind,
            0x00c => Method::ConnectionAttempt,
            m => Method::Other(m),
        }
    }

    /// A short, bounded name for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Method::Binding => "binding",
            Method::Allocate => "allocate",
            Method::Refresh => "refresh",
            Method::Send => "send",
            Method::Data => "data",
            Method::CreatePermission => "create_permission",
            Method::ChannelBind => "channel_bind",
            Method::Connect => "connect",
            Method::ConnectionBind => "connection_bind",
            Method::ConnectionAttempt => "connection_attempt",
            Method::Other(_) => "other",
        }
    }
}

/// Encodes class and method into the 14-bit message type (RFC 8489 §5, figure 3).
pub fn message_type(class: Class, method: Method) -> u16 {
    let m = method.code();
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (m & 0x000f) | ((m & 0x0070) << 1) | ((m & 0x0f80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

fn split_type(t: u16) -> (Class, Method) {
    let class = match ((t >> 7) & 2) | ((t >> 4) & 1) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    let m = (t & 0x000f) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0f80);
    (class, Method::from_code(m))
}

/// The 96-bit transaction id of an RFC 5389+ message. For a classic RFC 3489
/// message the 128-bit id is the magic-cookie field plus these 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

/// A decoded, bounds-checked view over a STUN message in a borrowed buffer.
#[derive(Clone)]
pub struct Message<'a> {
    raw: &'a [u8],
    class: Class,
    method: Method,
    classic: bool,
    attrs: [(u16, u16, u16); MAX_ATTRS],
    n_attrs: usize,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("class", &self.class)
            .field("method", &self.method)
            .field("classic", &self.classic)
            .field("len", &self.raw.len())
            .field("attrs", &self.n_attrs)
            .finish()
    }
}

/// An attribute as it sits in the message: type and value (without padding).
#[derive(Debug, Clone, Copy)]
pub struct RawAttr<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Byte offset of the attribute header within the message.
    pub offset: usize,
}

impl<'a> Message<'a> {
    /// Decodes one STUN message that must fill `buf` exactly (UDP) — use
    /// [`stream_frame_len`] to cut messages out of a TCP stream first.
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        if buf[0] & 0xc0 != 0 {
            return Err(DecodeError::NotStun);
        }
        let typ = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if len % 4 != 0 {
            return Err(DecodeError::BadLength);
        }
        if HEADER_LEN + len != buf.len() {
            return Err(DecodeError::LengthMismatch);
        }
        let cookie = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
        let (class, method) = split_type(typ);
        let mut msg = Message {
            raw: buf,
            class,
            method,
            classic: cookie != MAGIC_COOKIE,
            attrs: [(0, 0, 0); MAX_ATTRS],
            n_attrs: 0,
        };
        let mut off = HEADER_LEN;
        while off < buf.len() {
            if buf.len() - off < 4 {
                return Err(DecodeError::TruncatedAttribute);
            }
            let at = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let alen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            let padded = (alen + 3) & !3;
            if buf.len() - off - 4 < padded {
                return Err(DecodeError::TruncatedAttribute);
            }
            if msg.n_attrs == MAX_ATTRS {
                return Err(DecodeError::TooManyAttributes);
            }
            msg.attrs[msg.n_attrs] = (at, off as u16, alen as u16);
            msg.n_attrs += 1;
            off += 4 + padded;
        }
        Ok(msg)
    }

    pub fn class(&self) -> Class {
        self.class
    }
    pub fn method(&self) -> Method {
        self.method
    }
    /// True for an RFC 3489 message without the magic cookie.
    pub fn is_classic(&self) -> bool {
        self.classic
    }
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.raw[8..20]);
        TransactionId(t)
    }
    /// The 16 bytes after type and length: cookie plus id (the RFC 3489 id).
    pub fn classic_transaction_id(&self) -> [u8; 16] {
        let mut t = [0u8; 16];
        t.copy_from_slice(&self.raw[4..20]);
        t
    }
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }

    /// All attributes in order.
    pub fn attributes(&self) -> impl Iterator<Item = RawAttr<'a>> + '_ {
        self.attrs[..self.n_attrs].iter().map(|&(t, off, len)| {
            let off = off as usize;
            RawAttr {
                typ: t,
                value: &self.raw[off + 4..off + 4 + len as usize],
                offset: off,
            }
        })
    }

    /// The first attribute of a type, ignoring anything after
    /// MESSAGE-INTEGRITY(-SHA256) other than FINGERPRINT (RFC 8489 §14.5).
    pub fn attr(&self, typ: AttrType) -> Option<&'a [u8]> {
        let want = typ as u16;
        for a in self.attributes() {
            if a.typ == want {
                return Some(a.value);
            }
            if a.typ == AttrType::MessageIntegrity as u16
                || a.typ == AttrType::MessageIntegritySha256 as u16
            {
                // Only the other integrity attribute and FINGERPRINT may follow.
                if want != AttrType::MessageIntegritySha256 as u16
                    && want != AttrType::Fingerprint as u16
                {
                    return None;
                }
            }
        }
        None
    }

    pub fn has(&self, typ: AttrType) -> bool {
        self.attr(typ).is_some()
    }

    /// Comprehension-required attributes (type < 0x8000) that this
    /// implementation does not understand (RFC 8489 §15: answered with 420).
    pub fn unknown_required(&self) -> impl Iterator<Item = u16> + '_ {
        self.attributes()
            .map(|a| a.typ)
            .filter(|&t| t < 0x8000 && AttrType::from_code(t).is_none())
    }

    /// An XOR-encoded address attribute (XOR-MAPPED/PEER/RELAYED-ADDRESS).
    pub fn xor_address(&self, typ: AttrType) -> Result<Option<SocketAddr>, DecodeError> {
        match self.attr(typ) {
            None => Ok(None),
            Some(v) => attr::decode_xor_address(v, &self.raw[4..20]).map(Some),
        }
    }

    /// Every instance of an XOR address attribute (CreatePermission may carry several).
    pub fn xor_addresses(
        &self,
        typ: AttrType,
    ) -> impl Iterator<Item = Result<SocketAddr, DecodeError>> + '_ {
        let want = typ as u16;
        let tid = &self.raw[4..20];
        self.attributes()
            .take_while(|a| {
                a.typ != AttrType::MessageIntegrity as u16
                    && a.typ != AttrType::MessageIntegritySha256 as u16
            })
            .filter(move |a| a.typ == want)
            .map(move |a| attr::decode_xor_address(a.value, tid))
    }

    /// A 32-bit attribute such as LIFETIME.
    pub fn u32_attr(&self, typ: AttrType) -> Result<Option<u32>, DecodeError> {
        match self.attr(typ) {
            None => Ok(None),
            Some(v) if v.len() == 4 => Ok(Some(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))),
            Some(_) => Err(DecodeError::BadAttribute(typ.name())),
        }
    }

    /// A UTF-8 text attribute (USERNAME, REALM, NONCE, SOFTWARE) bounded by `max` bytes.
    pub fn text_attr(&self, typ: AttrType, max: usize) -> Result<Option<&'a str>, DecodeError> {
        match self.attr(typ) {
            None => Ok(None),
            Some(v) if v.len() <= max => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| DecodeError::BadAttribute(typ.name())),
            Some(_) => Err(DecodeError::BadAttribute(typ.name())),
        }
    }

    /// Checks FINGERPRINT if present. Returns `Ok(false)` when absent.
    pub fn check_fingerprint(&self) -> Result<bool, DecodeError> {
        let Some(a) = self
            .attributes()
            .find(|a| a.typ == AttrType::Fingerprint as u16)
        else {
            return Ok(false);
        };
        if a.value.len() != 4 || a.offset + 8 != self.raw.len() {
            return Err(DecodeError::BadAttribute("FINGERPRINT"));
        }
        let want = u32::from_be_bytes([a.value[0], a.value[1], a.value[2], a.value[3]]);
        if integrity::fingerprint_over(self.raw, a.offset) != want {
            return Err(DecodeError::BadFingerprint);
        }
        Ok(true)
    }

    /// Verifies MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 with `key`.
    /// When both are present the SHA-256 one is checked (RFC 8489 §9.2.4).
    /// Returns the kind that matched; `None` means neither attribute exists.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<Option<IntegrityKind>, DecodeError> {
        let mut sha1 = None;
        let mut sha256 = None;
        for a in self.attributes() {
            if a.typ == AttrType::MessageIntegrity as u16 && sha1.is_none() {
                sha1 = Some(a);
            } else if a.typ == AttrType::MessageIntegritySha256 as u16 && sha256.is_none() {
                sha256 = Some(a);
            }
        }
        if let Some(a) = sha256 {
            // RFC 8489 §14.6: at least 16 bytes, a multiple of 4, at most 32.
            if a.value.len() < 16 || a.value.len() > 32 || a.value.len() % 4 != 0 {
                return Err(DecodeError::BadAttribute("MESSAGE-INTEGRITY-SHA256"));
            }
            let mac = integrity::mac_over(IntegrityKind::Sha256, key, self.raw, a.offset);
            return if integrity::ct_eq(&mac[..a.value.len()], a.value) {
                Ok(Some(IntegrityKind::Sha256))
            } else {
                Err(DecodeError::IntegrityMismatch)
            };
        }
        if let Some(a) = sha1 {
            if a.value.len() != 20 {
                return Err(DecodeError::BadAttribute("MESSAGE-INTEGRITY"));
            }
            let mac = integrity::mac_over(IntegrityKind::Sha1, key, self.raw, a.offset);
            return if integrity::ct_eq(&mac[..20], a.value) {
                Ok(Some(IntegrityKind::Sha1))
            } else {
                Err(DecodeError::IntegrityMismatch)
            };
        }
        Ok(None)
    }
}

/// Length of the STUN message or ChannelData frame at the start of a TCP
/// stream buffer, including ChannelData padding to 4 bytes (RFC 8656 §12.5).
/// `Ok(None)` means more bytes are needed.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = match buf[0] >> 6 {
        0 => HEADER_LEN + len,
        1 => 4 + ((len + 3) & !3),
        _ => return Err(DecodeError::NotStun),
    };
    Ok(if buf.len() >= total {
        Some(total)
    } else {
        None
    })
}

/// Writes one STUN message into a reusable buffer.
///
/// ```
/// use stun_turn::message::{MessageBuilder, Class, Method, TransactionId, AttrType};
/// let mut buf = Vec::new();
/// let mut b = MessageBuilder::new(&mut buf, Class::Request, Method::Binding, TransactionId([7; 12]));
/// b.add_fingerprint();
/// assert_eq!(buf.len(), 28);
/// ```
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
}

impl<'b> MessageBuilder<'b> {
    /// Starts an RFC 5389+ message; clears `buf`.
    pub fn new(buf: &'b mut Vec<u8>, class: Class, method: Method, tid: TransactionId) -> Self {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        id[4..].copy_from_slice(&tid.0);
        Self::with_raw_id(buf, class, method, id)
    }

    /// Starts a message with a raw 128-bit id (cookie field included), as an
    /// RFC 3489 response must echo its request's id.
    pub fn with_raw_id(buf: &'b mut Vec<u8>, class: Class, method: Method, id: [u8; 16]) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(class, method).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&id);
        MessageBuilder { buf, start: 0 }
    }

    fn set_len(&mut self, len: usize) {
        let l = (len - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&l.to_be_bytes());
    }

    /// Appends an attribute with padding; the header length follows.
    pub fn add(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.add_with(typ, value.len(), |out| out.extend_from_slice(value))
    }

    /// Appends an attribute whose value `write` produces (`len` bytes).
    pub fn add_with(
        &mut self,
        typ: u16,
        len: usize,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> &mut Self {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(len as u16).to_be_bytes());
        let before = self.buf.len();
        write(self.buf);
        debug_assert_eq!(self.buf.len() - before, len);
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
        let l = self.buf.len();
        self.set_len(l);
        self
    }

    pub fn add_attr(&mut self, typ: AttrType, value: &[u8]) -> &mut Self {
        self.add(typ as u16, value)
    }

    pub fn add_u32(&mut self, typ: AttrType, v: u32) -> &mut Self {
        self.add(typ as u16, &v.to_be_bytes())
    }

    /// XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS or XOR-RELAYED-ADDRESS.
    pub fn add_xor_address(&mut self, typ: AttrType, addr: SocketAddr) -> &mut Self {
        let mut tid = [0u8; 16];
        tid.copy_from_slice(&self.buf[self.start + 4..self.start + 20]);
        let len = if addr.is_ipv4() { 8 } else { 20 };
        self.add_with(typ as u16, len, |out| {
            attr::encode_xor_address(out, addr, &tid)
        })
    }

    /// A plain (non-XOR) address attribute: MAPPED-ADDRESS, RESPONSE-ORIGIN,
    /// OTHER-ADDRESS and the RFC 3489 SOURCE/CHANGED-ADDRESS.
    pub fn add_address(&mut self, typ: AttrType, addr: SocketAddr) -> &mut Self {
        let len = if addr.is_ipv4() { 8 } else { 20 };
        self.add_with(typ as u16, len, |out| attr::encode_address(out, addr))
    }

    pub fn add_error(&mut self, code: ErrorCode, reason: &str) -> &mut Self {
        let r = reason.as_bytes();
        let c = code.0;
        self.add_with(AttrType::ErrorCode as u16, 4 + r.len(), |out| {
            out.extend_from_slice(&[0, 0, (c / 100) as u8, (c % 100) as u8]);
            out.extend_from_slice(r);
        })
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1) or MESSAGE-INTEGRITY-SHA256
    /// (full 32 bytes) computed with `key` over everything before it.
    pub fn add_integrity(&mut self, kind: IntegrityKind, key: &[u8]) -> &mut Self {
        let (typ, len) = match kind {
            IntegrityKind::Sha1 => (AttrType::MessageIntegrity, 20),
            IntegrityKind::Sha256 => (AttrType::MessageIntegritySha256, 32),
        };
        let off = self.buf.len() - self.start;
        // Length must already include this attribute (RFC 8489 §14.5).
        self.set_len(off + 4 + len);
        let mac = integrity::mac_over(kind, key, &self.buf[self.start..], off);
        self.add_attr(typ, &mac[..len])
    }

    /// Appends FINGERPRINT; must be last.
    pub fn add_fingerprint(&mut self) -> &mut Self {
        let off = self.buf.len() - self.start;
        self.set_len(off + 8);
        let crc = integrity::fingerprint_over(&self.buf[self.start..], off);
        self.add_u32(AttrType::Fingerprint, crc)
    }

    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;

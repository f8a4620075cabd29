//! Attribute types, error codes and address encodings.

use crate::error::DecodeError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

macro_rules! attr_types {
    ($($name:ident = $code:literal, $text:literal;)*) => {
        /// Every attribute type this crate understands. Comprehension-required
        /// types (< 0x8000) outside this list get a 420 (RFC 8489 §15).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum AttrType { $($name = $code,)* }

        impl AttrType {
            pub fn from_code(code: u16) -> Option<AttrType> {
                match code { $($code => Some(AttrType::$name),)* _ => None }
            }
            /// The RFC's name of the attribute, for error messages.
            pub fn name(self) -> &'static str {
                match self { $(AttrType::$name => $text,)* }
            }
        }
    };
}

attr_types! {
    MappedAddress = 0x0001, "MAPPED-ADDRESS";
    ResponseAddress = 0x0002, "RESPONSE-ADDRESS";
    ChangeRequest = 0x0003, "CHANGE-REQUEST";
    SourceAddress = 0x0004, "SOURCE-ADDRESS";
    ChangedAddress = 0x0005, "CHANGED-ADDRESS";
    Username = 0x0006, "USERNAME";
    MessageIntegrity = 0x0008, "MESSAGE-INTEGRITY";
    ErrorCode = 0x0009, "ERROR-CODE";
    UnknownAttributes = 0x000A, "UNKNOWN-ATTRIBUTES";
    ChannelNumber = 0x000C, "CHANNEL-NUMBER";
    Lifetime = 0x000D, "LIFETIME";
    XorPeerAddress = 0x0012, "XOR-PEER-ADDRESS";
    Data = 0x0013, "DATA";
    Realm = 0x0014, "REALM";
    Nonce = 0x0015, "NONCE";
    XorRelayedAddress = 0x0016, "XOR-RELAYED-ADDRESS";
    RequestedAddressFamily = 0x0017, "REQUESTED-ADDRESS-FAMILY";
    EvenPort = 0x0018, "EVEN-PORT";
    RequestedTransport = 0x0019, "REQUESTED-TRANSPORT";
    DontFragment = 0x001A, "DONT-FRAGMENT";
    MessageIntegritySha256 = 0x001C, "MESSAGE-INTEGRITY-SHA256";
    PasswordAlgorithm = 0x001D, "PASSWORD-ALGORITHM";
    Userhash = 0x001E, "USERHASH";
    XorMappedAddress = 0x0020, "XOR-MAPPED-ADDRESS";
    ReservationToken = 0x0022, "RESERVATION-TOKEN";
    Padding = 0x0026, "PADDING";
    ResponsePort = 0x0027, "RESPONSE-PORT";
    ConnectionId = 0x002A, "CONNECTION-ID";
    AdditionalAddressFamily = 0x8000, "ADDITIONAL-ADDRESS-FAMILY";
    AddressErrorCode = 0x8001, "ADDRESS-ERROR-CODE";
    PasswordAlgorithms = 0x8002, "PASSWORD-ALGORITHMS";
    AlternateDomain = 0x8003, "ALTERNATE-DOMAIN";
    Icmp = 0x8004, "ICMP";
    Software = 0x8022, "SOFTWARE";
    AlternateServer = 0x8023, "ALTERNATE-SERVER";
    TransactionTransmitCounter = 0x8025, "TRANSACTION-TRANSMIT-COUNTER";
    CacheTimeout = 0x8027, "CACHE-TIMEOUT";
    Fingerprint = 0x8028, "FINGERPRINT";
    IceControlled = 0x8029, "ICE-CONTROLLED";
    IceControlling = 0x802A, "ICE-CONTROLLING";
    ResponseOrigin = 0x802B, "RESPONSE-ORIGIN";
    OtherAddress = 0x802C, "OTHER-ADDRESS";
    Priority = 0x0024, "PRIORITY";
    UseCandidate = 0x0025, "USE-CANDIDATE";
}

/// A STUN error code (300..=699).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const TRY_ALTERNATE: ErrorCode = ErrorCode(300);
    pub const BAD_REQUEST: ErrorCode = ErrorCode(400);
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(401);
    pub const FORBIDDEN: ErrorCode = ErrorCode(403);
    pub const UNKNOWN_ATTRIBUTE: ErrorCode = ErrorCode(420);
    pub const ALLOCATION_MISMATCH: ErrorCode = ErrorCode(437);
    pub const STALE_NONCE: ErrorCode = ErrorCode(438);
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: ErrorCode = ErrorCode(440);
    pub const WRONG_CREDENTIALS: ErrorCode = ErrorCode(441);
    pub const UNSUPPORTED_TRANSPORT: ErrorCode = ErrorCode(442);
    pub const PEER_ADDRESS_FAMILY_MISMATCH: ErrorCode = ErrorCode(443);
    pub const CONNECTION_ALREADY_EXISTS: ErrorCode = ErrorCode(446);
    pub const CONNECTION_TIMEOUT_OR_FAILURE: ErrorCode = ErrorCode(447);
    pub const ALLOCATION_QUOTA_REACHED: ErrorCode = ErrorCode(486);
    pub const ROLE_CONFLICT: ErrorCode = ErrorCode(487);
    pub const SERVER_ERROR: ErrorCode = ErrorCode(500);
    pub const INSUFFICIENT_CAPACITY: ErrorCode = ErrorCode(508);

    /// The RFC's reason phrase.
    pub fn reason(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            446 => "Connection Already Exists",
            447 => "Connection Timeout or Failure",
            486 => "Allocation Quota Reached",
            487 => "Role Conflict",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "Error",
        }
    }

    /// Decodes an ERROR-CODE value.
    pub fn decode(v: &[u8]) -> Result<(ErrorCode, &str), DecodeError> {
        if v.len() < 4 || v[2] > 7 || v[3] > 99 {
            return Err(DecodeError::BadAttribute("ERROR-CODE"));
        }
        let code = u16::from(v[2] & 7) * 100 + u16::from(v[3]);
        let reason =
            std::str::from_utf8(&v[4..]).map_err(|_| DecodeError::BadAttribute("ERROR-CODE"))?;
        Ok((ErrorCode(code), reason))
    }
}

/// PASSWORD-ALGORITHM values (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordAlgorithm {
    Md5 = 1,
    Sha256 = 2,
}

impl PasswordAlgorithm {
    pub fn from_code(c: u16) -> Option<Self> {
        match c {
            1 => Some(Self::Md5),
            2 => Some(Self::Sha256),
            _ => None,
        }
    }

    /// Decodes a PASSWORD-ALGORITHM value: algorithm, parameter length, parameters.
    pub fn decode(v: &[u8]) -> Result<Option<Self>, DecodeError> {
        if v.len() < 4 {
            return Err(DecodeError::BadAttribute("PASSWORD-ALGORITHM"));
        }
        let plen = u16::from_be_bytes([v[2], v[3]]) as usize;
        if v.len() != 4 + plen {
            return Err(DecodeError::BadAttribute("PASSWORD-ALGORITHM"));
        }
        Ok(Self::from_code(u16::from_be_bytes([v[0], v[1]])))
    }

    /// Encodes a PASSWORD-ALGORITHMS value listing `algs` in order.
    pub fn encode_list(algs: &[PasswordAlgorithm], out: &mut Vec<u8>) {
        for a in algs {
            out.extend_from_slice(&(*a as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
    }
}

const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// Decodes an address-family byte as used by REQUESTED-ADDRESS-FAMILY and
/// ADDITIONAL-ADDRESS-FAMILY. `Ok(None)` is an unknown family (a 440).
pub fn decode_family(v: &[u8], name: &'static str) -> Result<Option<Family>, DecodeError> {
    if v.len() != 4 {
        return Err(DecodeError::BadAttribute(name));
    }
    Ok(match v[0] {
        FAMILY_V4 => Some(Family::V4),
        FAMILY_V6 => Some(Family::V6),
        _ => None,
    })
}

/// An IP address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Family::V4 => FAMILY_V4,
            Family::V6 => FAMILY_V6,
        }
    }
}

pub(crate) fn encode_address(out: &mut Vec<u8>, addr: SocketAddr) {
    out.push(0);
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&addr.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&addr.port().to_be_bytes());
            out.extend_from_slice(&ip.octets());
        }
    }
}

/// Decodes a plain address attribute (MAPPED-ADDRESS, OTHER-ADDRESS…).
pub fn decode_address(v: &[u8]) -> Result<SocketAddr, DecodeError> {
    decode_address_with(v, &[0u8; 16])
}

pub(crate) fn encode_xor_address(out: &mut Vec<u8>, addr: SocketAddr, id: &[u8; 16]) {
    let port = addr.port() ^ 0x2112;
    out.push(0);
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(FAMILY_V4);
            out.extend_from_slice(&port.to_be_bytes());
            let o = ip.octets();
            for i in 0..4 {
                out.push(o[i] ^ id[i]);
            }
        }
        IpAddr::V6(ip) => {
            out.push(FAMILY_V6);
            out.extend_from_slice(&port.to_be_bytes());
            let o = ip.octets();
            for i in 0..16 {
                out.push(o[i] ^ id[i]);
            }
        }
    }
}

/// Decodes an XOR-encoded address; `id` is the message's bytes 4..20
/// (magic cookie plus transaction id).
pub fn decode_xor_address(v: &[u8], id: &[u8]) -> Result<SocketAddr, DecodeError> {
    let mut mask = [0u8; 16];
    mask.copy_from_slice(&id[..16]);
    let a = decode_address_with(v, &mask)?;
    Ok(SocketAddr::new(a.ip(), a.port() ^ 0x2112))
}

fn decode_address_with(v: &[u8], mask: &[u8; 16]) -> Result<SocketAddr, DecodeError> {
    if v.len() < 4 {
        return Err(DecodeError::BadAddress);
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    match (v[1], v.len()) {
        (FAMILY_V4, 8) => {
            let mut o = [0u8; 4];
            for i in 0..4 {
                o[i] = v[4 + i] ^ mask[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(o)), port))
        }
        (FAMILY_V6, 20) => {
            let mut o = [0u8; 16];
            for i in 0..16 {
                o[i] = v[4 + i] ^ mask[i];
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        _ => Err(DecodeError::BadAddress),
    }
}

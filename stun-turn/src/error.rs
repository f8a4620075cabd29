//! The crate's error types.

use std::net::SocketAddr;

/// Why bytes could not be decoded as a STUN message or ChannelData frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message shorter than the 20-byte STUN header")]
    TooShort,
    #[error("first two bits are not zero: not a STUN message")]
    NotStun,
    #[error("header length is not a multiple of 4")]
    BadLength,
    #[error("header length does not match the datagram size")]
    LengthMismatch,
    #[error("attribute runs past the end of the message")]
    TruncatedAttribute,
    #[error("more than 32 attributes")]
    TooManyAttributes,
    #[error("malformed {0} attribute")]
    BadAttribute(&'static str),
    #[error("malformed address attribute")]
    BadAddress,
    #[error("FINGERPRINT does not match")]
    BadFingerprint,
    #[error("message integrity check failed")]
    IntegrityMismatch,
    #[error("ChannelData frame is shorter than its length field says")]
    ChannelDataTruncated,
    #[error("channel number outside 0x4000..=0x7FFF")]
    BadChannelNumber,
}

/// Errors of the runtime and configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {key}: {reason}")]
    Config { key: &'static str, reason: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

//! SIP (RFC 3261) as both ends speak it: messages and their framing,
//! URIs and name-addrs, Via, and digest authentication. The signaling
//! service's proxy and the client SDK's user agent share it.

pub mod digest;
pub mod message;
pub mod uri;
pub mod via;

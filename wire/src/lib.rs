//! Types and formats shared by Parley's services and its client SDK. No I/O.
//!
//! - [`handle`]: phone numbers and email addresses in canonical form.
//! - [`keys`]: P-256 device and account keys, ids.
//! - [`key_transfer`]: sealing the account key to a newly approved device.
//! - [`device_list`]: the account-signed list of devices that the identity
//!   service publishes in its key transparency directory.
//! - [`push`]: `parley-push/1`, the device link of the push courier.
//! - [`webpush`]: opening (and sealing) RFC 8291 Web Push bodies.
//! - [`net`]: address prefixes and the key a per-source limit counts by.
//! - [`ratelimit`]: keyed token buckets with time passed in.
//! - [`meter`]: bytes counted into bits/s over windows of a second.
//! - [`request_auth`]: how a device signs its HTTP requests.
//! - [`sip`]: SIP messages, URIs, Via and digest authentication.
//! - [`safety_number`]: the 60 digits and QR payload two people compare.
//! - [`transparency`]: verification of lookup and history proofs against a
//!   signed epoch root.

pub mod device_cert;
pub mod device_list;
pub mod group_key;
pub mod handle;
pub mod hpke;
pub mod key_transfer;
pub mod keys;
pub mod meter;
pub mod net;
pub mod passport;
pub mod push;
pub mod ratelimit;
pub mod request_auth;
pub mod room_token;
pub mod safety_number;
pub mod sframe;
pub mod sip;
pub mod tls;
pub mod transparency;
pub mod webpush;

pub use device_list::{DeviceEntry, DeviceList, DirectoryValue, SignedDeviceList};
pub use handle::{Handle, HandleError};
pub use keys::{DeviceId, PublicKey, SigningKey};
pub use safety_number::SafetyNumber;

//! Device certificates as the identity service issues them: the device id
//! is in a `urn:parley:device:<id>` URI SAN (else the subject CN), and the
//! serial is what revocation lists name.

use crate::keys::{DeviceId, PublicKey};

/// A device's identity, from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    pub device: DeviceId,
    /// Certificate serial, leading zero bytes stripped.
    pub serial: Vec<u8>,
}

/// Reads the device id (SAN `urn:parley:device:<id>`, else the subject CN)
/// and serial from a certificate.
pub fn identity(cert_der: &[u8]) -> Option<DeviceIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let from_san = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u
                    .strip_prefix("urn:parley:device:")
                    .and_then(|id| id.parse().ok()),
                _ => None,
            })
        });
    let device = from_san.or_else(|| {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .and_then(|s| s.parse().ok())
    })?;
    Some(DeviceIdentity {
        device,
        serial: normalize_serial(cert.raw_serial()),
    })
}

/// The P-256 key a device certificate certifies (the device's identity
/// key), if it holds one.
pub fn public_key(cert_der: &[u8]) -> Option<PublicKey> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    PublicKey::from_spki_der(cert.public_key().raw).ok()
}

/// Strips leading zero bytes so serials compare equal however encoded.
pub fn normalize_serial(s: &[u8]) -> Vec<u8> {
    let start = s.iter().position(|b| *b != 0).unwrap_or(s.len());
    s[start..].to_vec()
}

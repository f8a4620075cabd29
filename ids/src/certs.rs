//! Device certificates: X.509 client certificates for device identity
//! keys, issued from the deployment's device CA, and the revocation list
//! other services check.
//!
//! A certificate's subject CN is the device id; its SAN is the URI
//! `urn:parley:device:<id>`; extended key usage is client auth only. The
//! key in it is the device's P-256 identity key, so the device uses the
//! key it already has for mutual TLS.

use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
    SubjectPublicKeyInfo,
};
use time::{Duration, OffsetDateTime};
use wire::{DeviceId, PublicKey};

use crate::error::Error;

/// Device certificates are valid this long; devices renew by re-registering.
pub const CERT_LIFETIME_DAYS: i64 = 365;

pub struct DeviceCa {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl std::fmt::Debug for DeviceCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCa").finish_non_exhaustive()
    }
}

impl DeviceCa {
    pub fn from_pem(ca_pem: &str, ca_key_pem: &str) -> Result<DeviceCa, Error> {
        let key = KeyPair::from_pem(ca_key_pem)
            .map_err(|e| Error::Config(format!("device CA key: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(ca_pem, key)
            .map_err(|e| Error::Config(format!("device CA certificate: {e}")))?;
        Ok(DeviceCa {
            issuer,
            ca_pem: ca_pem.to_owned(),
        })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Issues a certificate for a device key. Returns (serial hex, PEM).
    pub fn issue(
        &self,
        device: DeviceId,
        key: &PublicKey,
        serial: [u8; 16],
        now_unix: i64,
    ) -> Result<(String, String), Error> {
        let spki = key.to_spki_der();
        let spki = SubjectPublicKeyInfo::from_der(&spki)
            .map_err(|e| Error::Internal(format!("device key: {e}")))?;
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| Error::Internal(e.to_string()))?;
        p.distinguished_name
            .push(DnType::CommonName, device.to_string());
        p.subject_alt_names = vec![SanType::URI(
            format!("urn:parley:device:{device}")
                .try_into()
                .map_err(|_| Error::Internal("device URI".into()))?,
        )];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Positive serial: clear the top bit.
        let mut serial = serial;
        serial[0] &= 0x7f;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = at(now_unix)?;
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::days(CERT_LIFETIME_DAYS);
        let cert = p
            .signed_by(&spki, &self.issuer)
            .map_err(|e| Error::Internal(format!("issuing device certificate: {e}")))?;
        Ok((wire::keys::hex(&serial), cert.pem()))
    }

    /// A CRL listing `revoked` (serial hex, unix time), valid one day.
    pub fn crl(&self, revoked: &[(String, i64)], now_unix: i64) -> Result<Vec<u8>, Error> {
        let now = at(now_unix)?;
        let revoked_certs = revoked
            .iter()
            .filter_map(|(serial, when)| {
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&wire::keys::unhex(serial)?),
                    revocation_time: at(*when).ok()?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from((now_unix.max(0) as u64).to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| Error::Internal(format!("signing CRL: {e}")))?;
        Ok(crl.der().to_vec())
    }
}

fn at(unix: i64) -> Result<OffsetDateTime, Error> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| Error::Internal(e.to_string()))
}

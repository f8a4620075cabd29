//! How a device signs an HTTP request to a Parley service.
//!
//! ```text
//! Authorization: Parley key="<base64url identity public key>", ts="<unix seconds>", sig="<base64url>"
//! ```
//!
//! `sig` is an ECDSA P-256 SHA-256 signature (r‖s) by the device's identity
//! key over
//!
//! ```text
//! "parley-request-v1\n" METHOD "\n" path-and-query "\n" ts "\n" hex(SHA-256(body))
//! ```
//!
//! Servers accept a `ts` within a configured skew (default ±300 s) of their
//! clock. The same header authenticates a device that is not registered yet
//! (account creation, link claims): it proves possession of the key the
//! request registers.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

use crate::keys::{hex, KeyError, PublicKey, SigningKey, SIGNATURE_LEN};

pub const SCHEME: &str = "Parley";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("Authorization must be: Parley key=\"…\", ts=\"…\", sig=\"…\"")]
    Malformed,
    #[error("request timestamp is outside the allowed clock skew")]
    Stale,
    #[error("request signature does not verify")]
    BadSignature,
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// A parsed `Authorization: Parley …` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    pub key: PublicKey,
    pub ts: u64,
    pub sig: [u8; SIGNATURE_LEN],
}

fn signing_bytes(method: &str, path_and_query: &str, ts: u64, body: &[u8]) -> Vec<u8> {
    let digest = ring::digest::digest(&ring::digest::SHA256, body);
    format!(
        "parley-request-v1\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path_and_query,
        ts,
        hex(digest.as_ref())
    )
    .into_bytes()
}

/// Builds the header value for a request.
pub fn sign(key: &SigningKey, method: &str, path_and_query: &str, ts: u64, body: &[u8]) -> String {
    let sig = key.sign(&signing_bytes(method, path_and_query, ts, body));
    format!(
        "{SCHEME} key=\"{}\", ts=\"{ts}\", sig=\"{}\"",
        key.public().to_b64(),
        B64.encode(sig)
    )
}

impl RequestAuth {
    pub fn parse(header: &str) -> Result<RequestAuth, AuthError> {
        let rest = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or(AuthError::Malformed)?;
        let (mut key, mut ts, mut sig) = (None, None, None);
        for part in rest.split(',') {
            let (name, value) = part.trim().split_once('=').ok_or(AuthError::Malformed)?;
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .ok_or(AuthError::Malformed)?;
            match name {
                "key" => key = Some(PublicKey::from_b64(value)?),
                "ts" => ts = Some(value.parse::<u64>().map_err(|_| AuthError::Malformed)?),
                "sig" => {
                    let b = B64.decode(value).map_err(|_| AuthError::Malformed)?;
                    sig = Some(b.try_into().map_err(|_| AuthError::Malformed)?);
                }
                _ => return Err(AuthError::Malformed),
            }
        }
        match (key, ts, sig) {
            (Some(key), Some(ts), Some(sig)) => Ok(RequestAuth { key, ts, sig }),
            _ => Err(AuthError::Malformed),
        }
    }

    /// Checks freshness against `now_unix` and the signature over the request.
    pub fn verify(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
        now_unix: u64,
        max_skew_secs: u64,
    ) -> Result<(), AuthError> {
        if self.ts.abs_diff(now_unix) > max_skew_secs {
            return Err(AuthError::Stale);
        }
        self.key
            .verify(
                &signing_bytes(method, path_and_query, self.ts, body),
                &self.sig,
            )
            .map_err(|_| AuthError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_request_verifies_and_binds_everything() {
        let k = SigningKey::generate();
        let h = sign(&k, "post", "/v1/lookup?x=1", 1000, b"{}");
        let a = RequestAuth::parse(&h).unwrap();
        assert_eq!(a.key, k.public());
        a.verify("POST", "/v1/lookup?x=1", b"{}", 1100, 300)
            .unwrap();
        assert_eq!(
            a.verify("POST", "/v1/lookup?x=1", b"{}", 1400, 300),
            Err(AuthError::Stale)
        );
        for (m, p, b) in [
            ("GET", "/v1/lookup?x=1", &b"{}"[..]),
            ("POST", "/v1/lookup", b"{}"),
            ("POST", "/v1/lookup?x=1", b"{ }"),
        ] {
            assert_eq!(a.verify(m, p, b, 1000, 300), Err(AuthError::BadSignature));
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        for h in [
            "",
            "Bearer x",
            "Parley key=\"x\"",
            "Parley key=abc, ts=\"1\", sig=\"x\"",
            "Parley ts=\"1\", sig=\"AAAA\"",
        ] {
            assert!(RequestAuth::parse(h).is_err(), "{h}");
        }
    }
}

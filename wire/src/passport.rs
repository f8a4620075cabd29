//! PASSporTs (RFC 8225) in SIP Identity headers (RFC 8224), signed by a
//! device key, binding a call's SDP DTLS fingerprints with the `mky`
//! claim (RFC 8225 §5.2.2).
//!
//! The caller signs its offer's fingerprints; the callee its answer's.
//! Each side checks the other's PASSporT against the device key that
//! `ids` proved belongs to the other handle, and against the
//! fingerprints in the SDP it actually received: a signaling server that
//! rewrites a fingerprint (to sit in the middle of DTLS) makes the check
//! fail.
//!
//! Header value: `<base64url(header)>.<base64url(claims)>.<base64url(sig)>;info=<uri>;alg=ES256`,
//! with the JWS header `{"alg":"ES256","typ":"passport","x5u":<info>}`.
//! Telephone numbers go in `tn` claims without their `+` (RFC 8225
//! §5.2.1), everything else in `uri` claims.

use crate::keys::{PublicKey, SigningKey, SIGNATURE_LEN};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// A DTLS certificate fingerprint as SDP carries it (RFC 8122).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Hash function, lower case: `sha-256`.
    pub alg: String,
    /// Upper-case hex bytes separated by colons.
    pub dig: String,
}

impl Fingerprint {
    fn normalized(&self) -> Fingerprint {
        Fingerprint {
            alg: self.alg.to_ascii_lowercase(),
            dig: self.dig.to_ascii_uppercase(),
        }
    }
}

/// What a PASSporT asserts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Who calls: a handle URI (`tel:+14155550123`, `mailto:…`) or SIP URI.
    pub orig: String,
    /// Who is called.
    pub dest: Vec<String>,
    /// Unix seconds.
    pub iat: u64,
    /// The DTLS fingerprints of the signer's SDP.
    pub mky: Vec<Fingerprint>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PassportError {
    #[error("malformed Identity header or PASSporT")]
    Malformed,
    #[error("PASSporT algorithm must be ES256")]
    Algorithm,
    #[error("PASSporT signature does not verify with the device key")]
    Signature,
    #[error("PASSporT is {0} s away from now; at most {1} s is accepted")]
    Stale(u64, u64),
    #[error("the SDP's DTLS fingerprints are not the ones the device signed")]
    FingerprintMismatch,
}

/// The `a=fingerprint:` values of an SDP, session and media level.
pub fn sdp_fingerprints(sdp: &str) -> Vec<Fingerprint> {
    let mut out: Vec<Fingerprint> = sdp
        .lines()
        .filter_map(|l| l.trim().strip_prefix("a=fingerprint:"))
        .filter_map(|v| {
            let (alg, dig) = v.trim().split_once(' ')?;
            Some(
                Fingerprint {
                    alg: alg.into(),
                    dig: dig.trim().into(),
                }
                .normalized(),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.alg, &a.dig).cmp(&(&b.alg, &b.dig)));
    out.dedup();
    out
}

/// The `info` parameter's URI of an Identity header value: who signed
/// (RFC 8224 §4.1).
pub fn info(value: &str) -> Option<&str> {
    value.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("info") {
            return None;
        }
        v.trim().strip_prefix('<')?.strip_suffix('>')
    })
}

/// Signs `claims` with a device key; returns the Identity header value.
pub fn identity_header(claims: &Claims, key: &SigningKey, info: &str) -> String {
    let header = serde_json::json!({"alg": "ES256", "typ": "passport", "x5u": info});
    let payload = serde_json::json!({
        "orig": identity(&claims.orig),
        "dest": dest(&claims.dest),
        "iat": claims.iat,
        "mky": claims.mky.iter().map(Fingerprint::normalized).collect::<Vec<_>>(),
    });
    let signing_input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(payload.to_string())
    );
    let sig = key.sign(signing_input.as_bytes());
    format!(
        "{signing_input}.{};info=<{info}>;alg=ES256",
        B64.encode(sig)
    )
}

/// Verifies an Identity header value: the signature by `key`, the age
/// (`iat` within `max_age_s` of `now_unix`), and that `sdp_fingerprints`
/// (from the SDP actually received) are exactly those signed.
pub fn verify_identity(
    value: &str,
    key: &PublicKey,
    sdp_fingerprints: &[Fingerprint],
    now_unix: u64,
    max_age_s: u64,
) -> Result<Claims, PassportError> {
    let jws = value
        .split(';')
        .next()
        .ok_or(PassportError::Malformed)?
        .trim();
    let mut parts = jws.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PassportError::Malformed);
    };
    let header: serde_json::Value = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(PassportError::Malformed)?;
    if header["alg"] != "ES256" {
        return Err(PassportError::Algorithm);
    }
    if header["typ"] != "passport" {
        return Err(PassportError::Malformed);
    }
    let sig = B64.decode(s).map_err(|_| PassportError::Malformed)?;
    if sig.len() != SIGNATURE_LEN {
        return Err(PassportError::Malformed);
    }
    key.verify(&jws.as_bytes()[..h.len() + 1 + p.len()], &sig)
        .map_err(|_| PassportError::Signature)?;
    let payload: serde_json::Value = B64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(PassportError::Malformed)?;
    let iat = payload["iat"].as_u64().ok_or(PassportError::Malformed)?;
    let age = now_unix.abs_diff(iat);
    if age > max_age_s {
        return Err(PassportError::Stale(age, max_age_s));
    }
    let orig = read_identity(&payload["orig"]).ok_or(PassportError::Malformed)?;
    let dest = read_dest(&payload["dest"]).ok_or(PassportError::Malformed)?;
    let mut mky: Vec<Fingerprint> =
        serde_json::from_value::<Vec<Fingerprint>>(payload["mky"].clone())
            .map_err(|_| PassportError::Malformed)?
            .iter()
            .map(Fingerprint::normalized)
            .collect();
    mky.sort_by(|a, b| (&a.alg, &a.dig).cmp(&(&b.alg, &b.dig)));
    mky.dedup();
    let mut got: Vec<Fingerprint> = sdp_fingerprints
        .iter()
        .map(Fingerprint::normalized)
        .collect();
    got.sort_by(|a, b| (&a.alg, &a.dig).cmp(&(&b.alg, &b.dig)));
    got.dedup();
    if mky.is_empty() || mky != got {
        return Err(PassportError::FingerprintMismatch);
    }
    Ok(Claims {
        orig,
        dest,
        iat,
        mky,
    })
}

/// `{"tn": "14155550123"}` for a telephone number, else `{"uri": …}`.
fn identity(uri: &str) -> serde_json::Value {
    match uri.strip_prefix("tel:+") {
        Some(tn) => serde_json::json!({ "tn": tn }),
        None => serde_json::json!({ "uri": uri }),
    }
}

fn dest(uris: &[String]) -> serde_json::Value {
    let (tn, other): (Vec<&String>, Vec<&String>) =
        uris.iter().partition(|u| u.starts_with("tel:+"));
    let mut d = serde_json::Map::new();
    if !tn.is_empty() {
        d.insert(
            "tn".into(),
            tn.iter().map(|u| u["tel:+".len()..].to_owned()).collect(),
        );
    }
    if !other.is_empty() {
        d.insert("uri".into(), other.iter().map(|u| (*u).clone()).collect());
    }
    serde_json::Value::Object(d)
}

fn read_identity(v: &serde_json::Value) -> Option<String> {
    if let Some(tn) = v["tn"].as_str() {
        return Some(format!("tel:+{tn}"));
    }
    v["uri"].as_str().map(str::to_owned)
}

fn read_dest(v: &serde_json::Value) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for tn in v["tn"].as_array().into_iter().flatten() {
        out.push(format!("tel:+{}", tn.as_str()?));
    }
    for uri in v["uri"].as_array().into_iter().flatten() {
        out.push(uri.as_str()?.to_owned());
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nt=0 0\r\n\
        a=fingerprint:SHA-256 ab:cd:ef:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
        a=fingerprint:sha-256 AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\r\n";

    fn claims() -> Claims {
        Claims {
            orig: "tel:+14155550100".into(),
            dest: vec!["tel:+14155550123".into(), "mailto:bob@example.com".into()],
            iat: 1_790_000_000,
            mky: sdp_fingerprints(SDP),
        }
    }

    #[test]
    fn signs_and_verifies_against_the_received_sdp() {
        let key = SigningKey::generate();
        assert_eq!(
            sdp_fingerprints(SDP).len(),
            1,
            "same fingerprint twice is one"
        );
        let h = identity_header(&claims(), &key, "https://ids.parley.test/v1/keys/dev");
        assert!(h.ends_with(";info=<https://ids.parley.test/v1/keys/dev>;alg=ES256"));
        let got =
            verify_identity(&h, &key.public(), &sdp_fingerprints(SDP), 1_790_000_030, 60).unwrap();
        assert_eq!(got, claims());
    }

    #[test]
    fn a_rewritten_fingerprint_another_key_or_an_old_passport_fail() {
        let key = SigningKey::generate();
        let h = identity_header(&claims(), &key, "https://x/k");
        let forged_sdp = SDP.replace("AB:CD:EF:01:23:45:67:89:AB", "00:CD:EF:01:23:45:67:89:AB");
        assert_eq!(
            verify_identity(
                &h,
                &key.public(),
                &sdp_fingerprints(&forged_sdp),
                1_790_000_000,
                60
            ),
            Err(PassportError::FingerprintMismatch)
        );
        let other = SigningKey::generate();
        assert_eq!(
            verify_identity(
                &h,
                &other.public(),
                &sdp_fingerprints(SDP),
                1_790_000_000,
                60
            ),
            Err(PassportError::Signature)
        );
        assert!(matches!(
            verify_identity(&h, &key.public(), &sdp_fingerprints(SDP), 1_790_000_500, 60),
            Err(PassportError::Stale(500, 60))
        ));
        // Claims swapped under the same signature.
        let mut parts: Vec<String> = h.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c.orig = "tel:+19995550000".into();
        let other_payload = identity_header(&c, &key, "https://x/k");
        parts[1] = other_payload.split('.').nth(1).unwrap().to_owned();
        assert_eq!(
            verify_identity(
                &parts.join("."),
                &key.public(),
                &sdp_fingerprints(SDP),
                1_790_000_000,
                60
            ),
            Err(PassportError::Signature)
        );
        assert_eq!(
            verify_identity("garbage", &key.public(), &[], 0, 60),
            Err(PassportError::Malformed)
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let key = SigningKey::generate();
            let _ = verify_identity(&s, &key.public(), &[], 0, 60);
            let _ = sdp_fingerprints(&s);
        }
    }
}

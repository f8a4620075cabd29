//! ES256 JSON Web Tokens, as APNs provider tokens (`kid`, `iss`, `iat`) and
//! VAPID (RFC 8292: `aud`, `exp`, `sub`) use them. Only ES256 is accepted;
//! `alg: none` and every other algorithm are refused.

use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Longest token accepted, to bound parsing work.
pub const MAX_TOKEN_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not three base64url parts")]
    Format,
    #[error("token header or claims are not JSON objects")]
    Json,
    #[error("algorithm must be ES256")]
    Algorithm,
    #[error("signature does not verify")]
    Signature,
}

/// A parsed, not yet verified token.
#[derive(Debug, Clone)]
pub struct Jwt {
    pub kid: Option<String>,
    pub claims: serde_json::Map<String, serde_json::Value>,
    signing_input: String,
    signature: Vec<u8>,
}

impl Jwt {
    pub fn parse(token: &str) -> Result<Jwt, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Format);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Format);
        };
        let header = object(&B64.decode(h).map_err(|_| JwtError::Format)?)?;
        let claims = object(&B64.decode(c).map_err(|_| JwtError::Format)?)?;
        let signature = B64.decode(s).map_err(|_| JwtError::Format)?;
        if header.get("alg").and_then(|v| v.as_str()) != Some("ES256") {
            return Err(JwtError::Algorithm);
        }
        let kid = header
            .get("kid")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Ok(Jwt {
            kid,
            claims,
            signing_input: format!("{h}.{c}"),
            signature,
        })
    }

    /// Verifies the signature with an uncompressed P-256 public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), JwtError> {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, public_key)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwtError::Signature)
    }

    pub fn str_claim(&self, name: &str) -> Option<&str> {
        self.claims.get(name).and_then(|v| v.as_str())
    }

    pub fn int_claim(&self, name: &str) -> Option<i64> {
        self.claims.get(name).and_then(|v| v.as_i64())
    }
}

fn object(b: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, JwtError> {
    match serde_json::from_slice(b) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Json),
    }
}

/// Signs `claims` with a P-256 key (PKCS#8) as an ES256 token; for tools,
/// tests and the load simulator.
pub fn sign(
    pkcs8: &[u8],
    kid: Option<&str>,
    claims: &serde_json::Value,
) -> Result<String, JwtError> {
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        pkcs8,
        &rng,
    )
    .map_err(|_| JwtError::Algorithm)?;
    let mut header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = k.into();
    }
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = key
        .sign(&rng, input.as_bytes())
        .map_err(|_| JwtError::Signature)?;
    Ok(format!("{input}.{}", B64.encode(sig.as_ref())))
}

/// Tokens that already verified, so a provider reusing its token (as APNs
/// asks) costs one signature check per token, not one per push. Only
/// verified tokens go in; when full it starts over.
#[derive(Debug)]
pub struct VerifiedCache<V> {
    cap: usize,
    map: std::sync::Mutex<std::collections::HashMap<String, V>>,
}

impl<V: Clone> VerifiedCache<V> {
    pub fn new(cap: usize) -> VerifiedCache<V> {
        VerifiedCache {
            cap: cap.max(1),
            map: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    pub fn get(&self, token: &str) -> Option<V> {
        self.lock().get(token).cloned()
    }

    pub fn insert(&self, token: &str, v: V) {
        let mut map = self.lock();
        if map.len() >= self.cap {
            map.clear();
        }
        map.insert(token.to_owned(), v);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, V>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn key() -> (Vec<u8>, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .unwrap();
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            doc.as_ref(),
            &rng,
        )
        .unwrap();
        (doc.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
    }

    #[test]
    fn signs_and_verifies() {
        let (sk, pk) = key();
        let t = sign(
            &sk,
            Some("ABC123DEFG"),
            &serde_json::json!({"iss": "TEAM", "iat": 1}),
        )
        .unwrap();
        let j = Jwt::parse(&t).unwrap();
        assert_eq!(j.kid.as_deref(), Some("ABC123DEFG"));
        assert_eq!(j.str_claim("iss"), Some("TEAM"));
        assert_eq!(j.int_claim("iat"), Some(1));
        j.verify(&pk).unwrap();
        let (_, other) = key();
        assert_eq!(j.verify(&other), Err(JwtError::Signature));
    }

    #[test]
    fn refuses_other_algorithms_and_junk() {
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none"}"#),
            B64.encode(r#"{"iss":"x"}"#)
        );
        assert_eq!(Jwt::parse(&none).unwrap_err(), JwtError::Algorithm);
        assert_eq!(Jwt::parse("a.b").unwrap_err(), JwtError::Format);
        assert_eq!(Jwt::parse("a.b.c.d").unwrap_err(), JwtError::Format);
        let arr = format!("{}.{}.", B64.encode("[]"), B64.encode("{}"));
        assert_eq!(Jwt::parse(&arr).unwrap_err(), JwtError::Json);
        assert_eq!(Jwt::parse(&"a".repeat(3000)).unwrap_err(), JwtError::Format);
    }

    #[test]
    fn tampered_claims_fail() {
        let (sk, pk) = key();
        let t = sign(&sk, None, &serde_json::json!({"iss": "TEAM"})).unwrap();
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(r#"{"iss":"EVIL"}"#),
            parts[2]
        );
        assert_eq!(
            Jwt::parse(&forged).unwrap().verify(&pk),
            Err(JwtError::Signature)
        );
    }
}

//! HTTP Digest authentication for SIP (RFC 3261 §22, RFC 2617 with
//! `qop=auth`, RFC 8760 for SHA-256), for standard user agents that have
//! a configured account. Parley devices use their certificate instead.
//!
//! Nonces are stateless: the time they were issued, a number unique to
//! the challenge (so no two clients share a nonce, and with it a nonce
//! count) and a MAC over both, so any number of challenges cost no
//! memory, and a nonce older than [`NONCE_LIFETIME`] is answered with
//! `stale=true`.
//!
//! Replay protection (RFC 7616 §3.4, §5.12): only `qop=auth` answers are
//! accepted, so every answer carries a nonce count, and [`NonceCounts`]
//! remembers the highest count accepted per nonce: a sniffed answer sent
//! again (with another Contact, say) is refused. The `uri` an answer was
//! made for must name the request's own Request-URI ([`same_resource`],
//! RFC 2617 §3.2.2.5), so an answer for one request is no good for
//! another. The state is kept only for answers that verified, that is for
//! parties that know a password.

use crate::keys::ct_eq;
use crate::sip::uri::Uri;
use md5::{Digest as _, Md5};
use ring::{digest, hmac};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

pub const NONCE_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Md5,
    Sha256,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Algorithm::Md5 => "MD5",
            Algorithm::Sha256 => "SHA-256",
        }
    }

    fn hash(self, input: &str) -> String {
        let mut out = String::with_capacity(64);
        match self {
            Algorithm::Md5 => {
                for b in Md5::digest(input.as_bytes()) {
                    let _ = write!(out, "{b:02x}");
                }
            }
            Algorithm::Sha256 => {
                for b in digest::digest(&digest::SHA256, input.as_bytes()).as_ref() {
                    let _ = write!(out, "{b:02x}");
                }
            }
        }
        out
    }
}

/// The parameters of an `Authorization` or `Proxy-Authorization` value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub realm: String,
    pub nonce: String,
    pub uri: String,
    pub response: String,
    pub algorithm: Option<String>,
    pub cnonce: Option<String>,
    pub qop: Option<String>,
    pub nc: Option<String>,
}

impl Credentials {
    pub fn parse(value: &str) -> Option<Credentials> {
        let rest = value.trim();
        let (scheme, rest) = rest.split_once(|c: char| c.is_ascii_whitespace())?;
        if !scheme.eq_ignore_ascii_case("Digest") {
            return None;
        }
        let mut c = Credentials::default();
        for (k, v) in params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "username" => c.username = v,
                "realm" => c.realm = v,
                "nonce" => c.nonce = v,
                "uri" => c.uri = v,
                "response" => c.response = v,
                "algorithm" => c.algorithm = Some(v),
                "cnonce" => c.cnonce = Some(v),
                "qop" => c.qop = Some(v),
                "nc" => c.nc = Some(v),
                _ => {}
            }
        }
        (!c.username.is_empty() && !c.nonce.is_empty() && !c.response.is_empty()).then_some(c)
    }
}

/// What checking credentials found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Right password, old nonce: challenge again with `stale=true`.
    Stale,
    /// Wrong password, no `qop=auth`, or not a nonce of ours.
    Wrong,
}

/// Issues challenges and checks answers for one realm.
#[derive(Debug)]
pub struct Digest {
    realm: String,
    key: hmac::Key,
}

impl Digest {
    pub fn new(realm: &str, secret: &[u8; 32]) -> Digest {
        Digest {
            realm: realm.to_string(),
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The challenge header values: SHA-256 first if `sha256` (RFC 8760
    /// §2.4: the preferred algorithm comes first), then MD5. SHA-256 is
    /// opt-in because common user agents break on it: baresip 1.0 fails
    /// the whole registration ("Function not implemented") when any
    /// challenge names an algorithm it lacks, and SIPp 3.6 knows MD5 only.
    /// Either way, credentials in both algorithms are accepted.
    /// `unique` must differ between challenges (a counter).
    pub fn challenges(
        &self,
        elapsed: Duration,
        unique: u64,
        stale: bool,
        sha256: bool,
    ) -> Vec<String> {
        let nonce = self.nonce(elapsed.as_secs(), unique);
        let stale = if stale { ", stale=true" } else { "" };
        let algorithms: &[Algorithm] = if sha256 {
            &[Algorithm::Sha256, Algorithm::Md5]
        } else {
            &[Algorithm::Md5]
        };
        algorithms
            .iter()
            .map(|a| {
                format!(
                    "Digest realm=\"{}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{stale}",
                    self.realm,
                    a.name()
                )
            })
            .collect()
    }

    /// Checks `creds` for a request with `method`, given the account's
    /// password. `elapsed` is the core's clock (the nonce's time base).
    pub fn verify(
        &self,
        creds: &Credentials,
        method: &str,
        password: &str,
        elapsed: Duration,
    ) -> Verdict {
        let algorithm = match creds.algorithm.as_deref() {
            None => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some(a) if a.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(_) => return Verdict::Wrong,
        };
        if creds.realm != self.realm {
            return Verdict::Wrong;
        }
        let Some(issued) = self.nonce_time(&creds.nonce) else {
            return Verdict::Wrong;
        };
        let ha1 = algorithm.hash(&format!("{}:{}:{password}", creds.username, self.realm));
        let ha2 = algorithm.hash(&format!("{method}:{}", creds.uri));
        // RFC 2069 answers (no qop) carry no count and replay freely.
        let expect = match (&creds.qop, &creds.cnonce, &creds.nc) {
            (Some(qop), Some(cnonce), Some(nc)) if qop.eq_ignore_ascii_case("auth") => {
                algorithm.hash(&format!("{ha1}:{}:{nc}:{cnonce}:auth:{ha2}", creds.nonce))
            }
            _ => return Verdict::Wrong,
        };
        let given = creds.response.to_ascii_lowercase();
        if !ct_eq(expect.as_bytes(), given.as_bytes()) {
            return Verdict::Wrong;
        }
        if elapsed.as_secs().saturating_sub(issued) > NONCE_LIFETIME.as_secs() {
            return Verdict::Stale;
        }
        Verdict::Ok
    }

    /// `<secs>.<unique>.<mac>`, in hex.
    fn nonce(&self, secs: u64, unique: u64) -> String {
        let stamp = format!("{secs:x}.{unique:x}");
        let tag = hmac::sign(&self.key, stamp.as_bytes());
        let mut out = stamp;
        out.push('.');
        for b in &tag.as_ref()[..12] {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    fn nonce_time(&self, nonce: &str) -> Option<u64> {
        let mut parts = nonce.splitn(3, '.');
        let secs = u64::from_str_radix(parts.next()?, 16).ok()?;
        let unique = u64::from_str_radix(parts.next()?, 16).ok()?;
        ct_eq(self.nonce(secs, unique).as_bytes(), nonce.as_bytes()).then_some(secs)
    }
}

/// Whether the `uri` of an answer names the same resource as the
/// request's Request-URI (RFC 2617 §3.2.2.5, RFC 3261 §22.4): the same
/// scheme, user, host (case-insensitive) and port. URI parameters are not
/// part of the resource.
pub fn same_resource(answer_uri: &str, request_uri: &Uri) -> bool {
    let Ok(u) = Uri::parse(answer_uri.trim()) else {
        return false;
    };
    u.scheme == request_uri.scheme
        && u.user_unescaped() == request_uri.user_unescaped()
        && u.host.eq_ignore_ascii_case(&request_uri.host)
        && u.port == request_uri.port
}

/// The highest nonce count accepted for each nonce still alive: an answer
/// is used once (RFC 7616 §3.4: the count must grow).
#[derive(Debug, Default)]
pub struct NonceCounts {
    /// Nonce → (when it was issued, on the verifier's clock; highest count).
    seen: HashMap<String, (u64, u32)>,
}

impl NonceCounts {
    /// Records the count of a verified answer; false if this count (or a
    /// higher one) was accepted for the same nonce before: a replay.
    pub fn accept(&mut self, creds: &Credentials) -> bool {
        let Some(nc) = creds
            .nc
            .as_deref()
            .and_then(|n| u32::from_str_radix(n, 16).ok())
        else {
            return false;
        };
        self.record(&creds.nonce, nc)
    }

    /// Records count `nc` of `nonce` as used (accepted here, or by another
    /// node sharing the secret, which said so); false if it or a higher
    /// one was used before.
    pub fn record(&mut self, nonce: &str, nc: u32) -> bool {
        let issued = nonce
            .split_once('.')
            .and_then(|(t, _)| u64::from_str_radix(t, 16).ok())
            .unwrap_or(0);
        match self.seen.get_mut(nonce) {
            Some((_, highest)) if nc <= *highest => false,
            Some((_, highest)) => {
                *highest = nc;
                true
            }
            None => {
                self.seen.insert(nonce.to_owned(), (issued, nc));
                true
            }
        }
    }

    /// Forgets nonces past their lifetime (they verify as stale anyway).
    pub fn prune(&mut self, elapsed: Duration) {
        let now = elapsed.as_secs();
        self.seen
            .retain(|_, (issued, _)| now.saturating_sub(*issued) <= NONCE_LIFETIME.as_secs());
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The client side: the `Authorization` (or `Proxy-Authorization`) value
/// answering the strongest of `challenges` (SHA-256 over MD5), with
/// `qop=auth` when offered. `None` when no challenge is a digest this
/// knows.
pub fn respond(
    challenges: &[&str],
    method: &str,
    uri: &str,
    username: &str,
    password: &str,
    cnonce: &str,
    nc: u32,
) -> Option<String> {
    let mut best: Option<(Algorithm, Vec<(String, String)>)> = None;
    for c in challenges {
        let c = c.trim();
        let Some((scheme, rest)) = c.split_once(|ch: char| ch.is_ascii_whitespace()) else {
            continue;
        };
        if !scheme.eq_ignore_ascii_case("Digest") {
            continue;
        }
        let p = params(rest);
        let alg = match p.iter().find(|(k, _)| k.eq_ignore_ascii_case("algorithm")) {
            None => Algorithm::Md5,
            Some((_, v)) if v.eq_ignore_ascii_case("MD5") => Algorithm::Md5,
            Some((_, v)) if v.eq_ignore_ascii_case("SHA-256") => Algorithm::Sha256,
            Some(_) => continue,
        };
        if best
            .as_ref()
            .is_none_or(|(b, _)| *b == Algorithm::Md5 && alg == Algorithm::Sha256)
        {
            best = Some((alg, p));
        }
    }
    let (alg, p) = best?;
    let get = |name: &str| {
        p.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let realm = get("realm")?;
    let nonce = get("nonce")?;
    let qop_auth = get("qop").is_some_and(|q| q.split(',').any(|x| x.trim() == "auth"));
    let ha1 = alg.hash(&format!("{username}:{realm}:{password}"));
    let ha2 = alg.hash(&format!("{method}:{uri}"));
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out = format!(
        "Digest username=\"{}\", realm=\"{}\", nonce=\"{}\", uri=\"{}\"",
        quote(username),
        quote(realm),
        quote(nonce),
        quote(uri)
    );
    let response = if qop_auth {
        let nc = format!("{nc:08x}");
        let r = alg.hash(&format!("{ha1}:{nonce}:{nc}:{cnonce}:auth:{ha2}"));
        let _ = write!(out, ", qop=auth, nc={nc}, cnonce=\"{}\"", quote(cnonce));
        r
    } else {
        alg.hash(&format!("{ha1}:{nonce}:{ha2}"))
    };
    let _ = write!(out, ", response=\"{response}\", algorithm={}", alg.name());
    if let Some(opaque) = get("opaque") {
        let _ = write!(out, ", opaque=\"{}\"", quote(opaque));
    }
    Some(out)
}

/// `k=v, k="v"` pairs; quoted strings may hold commas and `\"`.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key.trim().to_string(), value.trim().to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_answer_verifies_and_prefers_sha256() {
        let d = Digest::new("example.com", &[5; 32]);
        for sha in [false, true] {
            let ch = d.challenges(Duration::from_secs(10), 1, false, sha);
            let ch: Vec<&str> = ch.iter().map(String::as_str).collect();
            let v = respond(&ch, "REGISTER", "sip:example.com", "alice", "pw", "abc", 1).unwrap();
            assert_eq!(v.contains("algorithm=SHA-256"), sha, "{v}");
            let creds = Credentials::parse(&v).unwrap();
            let ok = d.verify(&creds, "REGISTER", "pw", Duration::from_secs(11));
            assert_eq!(ok, Verdict::Ok);
            let wrong = d.verify(&creds, "REGISTER", "nope", Duration::from_secs(11));
            assert_eq!(wrong, Verdict::Wrong);
        }
        assert!(respond(&["Basic realm=\"x\""], "A", "b", "c", "d", "e", 1).is_none());
    }

    /// The example of RFC 2617 §3.5, but with SIP's method and URI.
    #[test]
    fn accepts_a_correct_answer_and_refuses_others() {
        let d = Digest::new("parley.test", &[1; 32]);
        let now = Duration::from_secs(1000);
        let challenge = &d.challenges(now, 7, false, false)[0];
        let nonce = challenge
            .split("nonce=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let ha1 = Algorithm::Md5.hash("+15550001:parley.test:secret");
        let ha2 = Algorithm::Md5.hash("REGISTER:sip:parley.test");
        let response = Algorithm::Md5.hash(&format!("{ha1}:{nonce}:00000001:abc:auth:{ha2}"));
        let header = format!(
            "Digest username=\"+15550001\", realm=\"parley.test\", nonce=\"{nonce}\", \
             uri=\"sip:parley.test\", response=\"{response}\", algorithm=MD5, cnonce=\"abc\", \
             qop=auth, nc=00000001"
        );
        let creds = Credentials::parse(&header).unwrap();
        assert_eq!(d.verify(&creds, "REGISTER", "secret", now), Verdict::Ok);
        assert_eq!(d.verify(&creds, "REGISTER", "other", now), Verdict::Wrong);
        assert_eq!(d.verify(&creds, "INVITE", "secret", now), Verdict::Wrong);
        assert_eq!(
            d.verify(&creds, "REGISTER", "secret", now + Duration::from_secs(301)),
            Verdict::Stale
        );
        let mut forged = creds.clone();
        forged.nonce = "3e8.7.000000000000000000000000".into();
        assert_eq!(d.verify(&forged, "REGISTER", "secret", now), Verdict::Wrong);
        assert!(Credentials::parse("Basic abc").is_none());
        // An RFC 2069 answer (no qop, so no count) is refused.
        let legacy = Algorithm::Md5.hash(&format!("{ha1}:{nonce}:{ha2}"));
        let old = Credentials {
            response: legacy,
            qop: None,
            nc: None,
            cnonce: None,
            ..creds.clone()
        };
        assert_eq!(d.verify(&old, "REGISTER", "secret", now), Verdict::Wrong);
        // Two challenges in the same second carry different nonces.
        let other = &d.challenges(now, 8, false, false)[0];
        assert_ne!(challenge, other);
    }

    #[test]
    fn a_nonce_count_is_accepted_once_and_must_grow() {
        let mut counts = NonceCounts::default();
        let creds = |nonce: &str, nc: &str| Credentials {
            nonce: nonce.into(),
            nc: Some(nc.into()),
            ..Credentials::default()
        };
        assert!(counts.accept(&creds("10.1.aa", "00000001")));
        assert!(!counts.accept(&creds("10.1.aa", "00000001")), "replayed");
        assert!(counts.accept(&creds("10.1.aa", "00000003")));
        assert!(!counts.accept(&creds("10.1.aa", "00000002")), "older");
        assert!(
            counts.accept(&creds("11.2.bb", "00000001")),
            "another nonce"
        );
        assert!(!counts.accept(&creds("11.2.bb", "zz")), "no count");
        counts.prune(Duration::from_secs(0x10 + 300));
        assert_eq!(counts.len(), 2);
        counts.prune(Duration::from_secs(0x11 + 301));
        assert!(counts.is_empty());
    }

    #[test]
    fn the_answer_uri_must_name_the_request_uri() {
        let ruri = Uri::parse("sip:parley.test").unwrap();
        assert!(same_resource("sip:parley.test", &ruri));
        assert!(same_resource("sip:PARLEY.test;transport=tcp", &ruri));
        assert!(!same_resource("sip:127.0.0.1:5070", &ruri));
        assert!(!same_resource("sip:parley.test:5060", &ruri));
        assert!(!same_resource("sips:parley.test", &ruri));
        assert!(!same_resource("garbage", &ruri));
        let call = Uri::parse("sip:+14155550123@parley.test").unwrap();
        assert!(same_resource("sip:%2B14155550123@parley.test", &call));
        assert!(!same_resource("sip:+14155550100@parley.test", &call));
    }
}

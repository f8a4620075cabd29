//! Safety numbers: what two people compare in person to know that the
//! account keys their apps use are each other's.
//!
//! Each account key gets a 30-digit fingerprint: SHA-512 iterated 5200
//! times over the key (slow on purpose, so finding a key with a chosen
//! fingerprint costs 5200× more), the first 30 bytes read as six 40-bit
//! numbers, each reduced mod 100 000 to five digits. The safety number is
//! the two fingerprints in ascending order: 60 digits, the same on both
//! phones. The QR payload carries both full 32-byte fingerprints, the
//! shower's first, so a scan compares 256 bits, not 60 digits.

use crate::keys::PublicKey;

const ITERATIONS: usize = 5200;
const CONTEXT: &[u8] = b"parley-safety-number-v1";
/// QR payload version.
pub const QR_VERSION: u8 = 1;

#[derive(Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    mine: [u8; 64],
    theirs: [u8; 64],
}

impl std::fmt::Debug for SafetyNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SafetyNumber({})", self.display())
    }
}

impl SafetyNumber {
    /// The number between my account key and theirs.
    pub fn new(mine: &PublicKey, theirs: &PublicKey) -> SafetyNumber {
        SafetyNumber {
            mine: fingerprint(mine),
            theirs: fingerprint(theirs),
        }
    }

    /// 60 digits, identical on both sides.
    pub fn digits(&self) -> String {
        let (a, b) = (digits30(&self.mine), digits30(&self.theirs));
        if a <= b {
            a + &b
        } else {
            b + &a
        }
    }

    /// The digits in twelve groups of five, as apps show them.
    pub fn display(&self) -> String {
        let d = self.digits();
        d.as_bytes()
            .chunks(5)
            .map(|c| std::str::from_utf8(c).unwrap_or(""))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// What this side shows as a QR code: version, my fingerprint, theirs.
    pub fn qr_payload(&self) -> Vec<u8> {
        let mut p = vec![QR_VERSION];
        p.extend_from_slice(&self.mine[..32]);
        p.extend_from_slice(&self.theirs[..32]);
        p
    }

    /// Whether a payload scanned from the other phone agrees: it must show
    /// their fingerprint first and mine second.
    pub fn matches_scan(&self, scanned: &[u8]) -> bool {
        // Fingerprints are public: a plain comparison is fine.
        scanned.len() == 65
            && scanned[0] == QR_VERSION
            && scanned[1..33] == self.theirs[..32]
            && scanned[33..65] == self.mine[..32]
    }
}

fn fingerprint(key: &PublicKey) -> [u8; 64] {
    use ring::digest::{Context, SHA512};
    let mut cx = Context::new(&SHA512);
    cx.update(CONTEXT);
    cx.update(&key.0);
    let mut d = cx.finish();
    for _ in 1..ITERATIONS {
        let mut cx = Context::new(&SHA512);
        cx.update(d.as_ref());
        cx.update(&key.0);
        d = cx.finish();
    }
    let mut out = [0u8; 64];
    out.copy_from_slice(d.as_ref());
    out
}

fn digits30(fp: &[u8; 64]) -> String {
    fp[..30]
        .chunks(5)
        .map(|c| {
            let n = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", n % 100_000)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SigningKey;

    #[test]
    fn both_sides_see_the_same_sixty_digits() {
        let (a, b) = (
            SigningKey::generate().public(),
            SigningKey::generate().public(),
        );
        let ab = SafetyNumber::new(&a, &b);
        let ba = SafetyNumber::new(&b, &a);
        assert_eq!(ab.digits(), ba.digits());
        assert_eq!(ab.digits().len(), 60);
        assert!(ab.digits().bytes().all(|c| c.is_ascii_digit()));
        assert_eq!(ab.display().split(' ').count(), 12);
    }

    #[test]
    fn another_key_changes_the_number() {
        let (a, b, c) = (
            SigningKey::generate().public(),
            SigningKey::generate().public(),
            SigningKey::generate().public(),
        );
        assert_ne!(
            SafetyNumber::new(&a, &b).digits(),
            SafetyNumber::new(&a, &c).digits()
        );
    }

    #[test]
    fn a_scan_matches_only_the_other_side_of_the_same_pair() {
        let (a, b, c) = (
            SigningKey::generate().public(),
            SigningKey::generate().public(),
            SigningKey::generate().public(),
        );
        let ab = SafetyNumber::new(&a, &b);
        let ba = SafetyNumber::new(&b, &a);
        assert!(ab.matches_scan(&ba.qr_payload()));
        assert!(ba.matches_scan(&ab.qr_payload()));
        assert!(
            !ab.matches_scan(&ab.qr_payload()),
            "my own code is not theirs"
        );
        assert!(!ab.matches_scan(&SafetyNumber::new(&c, &a).qr_payload()));
        let mut bad = ba.qr_payload();
        bad[0] = 2;
        assert!(!ab.matches_scan(&bad));
        assert!(!ab.matches_scan(&[]));
    }

    #[test]
    fn fingerprint_is_stable() {
        // A fixed key gives a fixed number across releases.
        let mut raw = [7u8; 65];
        raw[0] = 4;
        let k = PublicKey(raw);
        let n = SafetyNumber::new(&k, &k);
        assert_eq!(n.digits()[..30], n.digits()[30..]);
        assert_eq!(n.digits(), SafetyNumber::new(&k, &k).digits());
    }
}

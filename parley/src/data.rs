//! The data directory: created on first start, reused afterwards.
//!
//! ```text
//! parley-data/
//!   ca.pem, ca-key.pem          development CA (trust ca.pem in clients)
//!   server.pem, server-key.pem  localhost, 127.0.0.1 and ::1, issued by the CA
//!   turn-secret                 the TURN REST shared secret
//!   sip-secret                  signaling's key for digest nonces and
//!                               route tokens (share it between nodes)
//!   node-id                     this node's name among others (never copy
//!                               it to another node)
//! ```
//! Keys and secrets are written with mode 0600. Production passes real
//! certificate files and secrets instead; then these are not used.

use anyhow::{Context, Result};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Paths and secrets of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub turn_secret: String,
    /// Signaling's key for digest nonces and route tokens: kept, so that a
    /// restart does not break the dialogs and challenges in flight.
    pub sip_secret: PathBuf,
    /// This node's name among nodes sharing a database (the key directory
    /// publisher lease): random, made once, kept across restarts.
    pub node_id: String,
}

impl DataDir {
    /// A service's certificate chain and key: the configured files, else
    /// the data directory's server certificate.
    pub fn server_files(
        &self,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
    ) -> (PathBuf, PathBuf) {
        (
            cert.clone().unwrap_or_else(|| self.server_cert.clone()),
            key.clone().unwrap_or_else(|| self.server_key.clone()),
        )
    }

    /// A CA file: the configured one, else the data directory's CA.
    pub fn ca_or(&self, ca: &Option<PathBuf>) -> PathBuf {
        ca.clone().unwrap_or_else(|| self.ca_cert.clone())
    }
}

/// Opens `root`, creating whatever is missing. Says what it created.
pub fn open(root: &Path) -> Result<DataDir> {
    fs::create_dir_all(root)
        .with_context(|| format!("cannot create data directory {}", root.display()))?;
    restrict(root, 0o700)?;
    let ca_cert = root.join("ca.pem");
    let ca_key = root.join("ca-key.pem");
    let server_cert = root.join("server.pem");
    let server_key = root.join("server-key.pem");
    let secret_path = root.join("turn-secret");

    if !ca_cert.exists() || !ca_key.exists() {
        let (cert, key) = new_ca()?;
        write_file(&ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&ca_cert, cert.pem().as_bytes(), 0o644)?;
        // A new CA invalidates any old server certificate.
        let _ = fs::remove_file(&server_cert);
        tracing::info!(path = %ca_cert.display(), "created development CA");
    }
    if !server_cert.exists() || !server_key.exists() {
        let ca_pem = fs::read_to_string(&ca_cert)
            .with_context(|| format!("cannot read {}", ca_cert.display()))?;
        let ca_key_pem = fs::read_to_string(&ca_key)
            .with_context(|| format!("cannot read {}", ca_key.display()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)
            .with_context(|| format!("{} is not a private key", ca_key.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .with_context(|| format!("{} is not a CA certificate", ca_cert.display()))?;
        let (cert, key) = new_server_cert(&issuer)?;
        write_file(&server_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&server_cert, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %server_cert.display(), "issued server certificate for localhost, 127.0.0.1, ::1");
    }
    new_secret(&secret_path, "TURN REST secret")?;
    let turn_secret = read_secret(&secret_path)?;
    let sip_secret = root.join("sip-secret");
    new_secret(&sip_secret, "signaling secret")?;
    let node_path = root.join("node-id");
    new_secret(&node_path, "node id")?;
    let node_id = read_secret(&node_path)?;
    Ok(DataDir {
        root: root.to_owned(),
        ca_cert,
        ca_key,
        server_cert,
        server_key,
        turn_secret,
        sip_secret,
        node_id,
    })
}

/// Writes 32 random bytes (base64url) to `path` unless it exists.
fn new_secret(path: &Path, what: &str) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| anyhow::anyhow!("system random number generator unavailable"))?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    write_file(path, format!("{secret}\n").as_bytes(), 0o600)?;
    tracing::info!(path = %path.display(), "generated {what}");
    Ok(())
}

/// A signaling secret file: base64url of at least 32 bytes, hashed to the
/// 32-byte key (so any long random string will do).
pub fn sip_secret(path: &Path) -> Result<[u8; 32]> {
    let text = read_secret(path)?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .unwrap_or_else(|_| text.as_bytes().to_vec());
    if raw.len() < 32 {
        anyhow::bail!(
            "{} holds {} bytes; a signaling secret needs at least 32 random bytes",
            path.display(),
            raw.len()
        );
    }
    let d = ring::digest::digest(&ring::digest::SHA256, &raw);
    Ok(d.as_ref().try_into().expect("SHA-256 is 32 bytes"))
}

impl DataDir {
    /// The identity service's key transparency keys, created on first use:
    /// `ids-vrf.key` (32 random bytes, the akd VRF key) and `ids-root.pk8`
    /// (Ed25519 PKCS#8, signs epoch roots). Losing them means a new
    /// directory that clients will not accept as the old one.
    pub fn ids_keys(&self) -> Result<([u8; 32], Vec<u8>)> {
        let rng = ring::rand::SystemRandom::new();
        let vrf_path = self.root.join("ids-vrf.key");
        let root_path = self.root.join("ids-root.pk8");
        if !vrf_path.exists() {
            let mut raw = [0u8; 32];
            ring::rand::SecureRandom::fill(&rng, &mut raw)
                .map_err(|_| anyhow::anyhow!("system random number generator unavailable"))?;
            write_file(&vrf_path, &raw, 0o600)?;
            tracing::info!(path = %vrf_path.display(), "generated key transparency VRF key");
        }
        if !root_path.exists() {
            let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| anyhow::anyhow!("cannot generate an Ed25519 key"))?;
            write_file(&root_path, doc.as_ref(), 0o600)?;
            tracing::info!(path = %root_path.display(), "generated key transparency root key");
        }
        let vrf =
            fs::read(&vrf_path).with_context(|| format!("cannot read {}", vrf_path.display()))?;
        let vrf: [u8; 32] = vrf
            .try_into()
            .map_err(|_| anyhow::anyhow!("{} must hold 32 bytes", vrf_path.display()))?;
        let root =
            fs::read(&root_path).with_context(|| format!("cannot read {}", root_path.display()))?;
        Ok((vrf, root))
    }
}

/// Reads a one-line secret file.
pub fn read_secret(path: &Path) -> Result<String> {
    let s = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let s = s.trim().to_owned();
    anyhow::ensure!(!s.is_empty(), "{} is empty", path.display());
    Ok(s)
}

fn new_ca() -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "Parley development CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "Parley");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = p.self_signed(&key)?;
    Ok((cert, key))
}

fn new_server_cert(issuer: &Issuer<'_, KeyPair>) -> Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec!["localhost".to_owned()])?;
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    p.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    p.distinguished_name.push(DnType::CommonName, "localhost");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2035, 1, 1);
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert, key))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        restrict(&tmp, mode)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set permissions on {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signaling_secret_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path()).unwrap();
        let key = sip_secret(&first.sip_secret).unwrap();
        // A second start reads the same file: the same key.
        let again = open(dir.path()).unwrap();
        assert_eq!(sip_secret(&again.sip_secret).unwrap(), key);
        // A file of its own: any long random string, or refused if short.
        let own = dir.path().join("own");
        fs::write(&own, "c2hhcmVkLWJ5LWV2ZXJ5LW5vZGUtb2YtdGhlLWNsdXN0ZXI\n").unwrap();
        assert_ne!(sip_secret(&own).unwrap(), key);
        fs::write(&own, "short\n").unwrap();
        assert!(sip_secret(&own).is_err());
    }
}

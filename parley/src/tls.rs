//! Loads certificate and key files into a rustls server configuration.

use anyhow::{Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// A TLS 1.3 server configuration for `cert` (PEM chain) and `key` (PEM),
/// offering the given ALPN protocols.
pub fn server_config(cert: &Path, key: &Path, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>> {
    wire::tls::server_config(chain(cert)?, private_key(key)?, None, alpn)
        .context("certificate and key do not match")
}

/// A PEM certificate chain.
pub fn chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("cannot open {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", cert.display());
    Ok(certs)
}

/// A PEM private key.
pub fn private_key(key: &Path) -> Result<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot open {}", key.display()))?,
    ))
    .with_context(|| format!("{} is not a PEM private key", key.display()))?
    .with_context(|| format!("{} holds no private key", key.display()))
}

/// Trust anchors from a PEM file of CA certificates.
pub fn roots(ca: &Path) -> Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in chain(ca)? {
        store
            .add(c)
            .with_context(|| format!("{} holds an unusable CA certificate", ca.display()))?;
    }
    Ok(store)
}

//! What the tests of `parley courier` processes share: a provider in the
//! config file and device certificates from the data directory's CA.

#![allow(dead_code)]

pub mod clients;

use std::path::Path;

use client_sdk::courier::DeviceCredentials;
use ring::signature::KeyPair;

pub const TOPIC: &str = "com.example.crash";

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A provider key registered in a config file that also holds `extra`
/// (more TOML sections); returns the file and the key's PKCS#8.
pub fn provider_config(dir: &Path, extra: &str) -> (std::path::PathBuf, Vec<u8>) {
    let rng = ring::rand::SystemRandom::new();
    let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let doc = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
    let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, doc.as_ref(), &rng).unwrap();
    let spki = wire::PublicKey::from_slice(kp.public_key().as_ref())
        .unwrap()
        .to_spki_der();
    let key_path = dir.join("provider.pem");
    std::fs::write(&key_path, parley_tests::tool::pem("PUBLIC KEY", &spki)).unwrap();
    let config = dir.join("parley.toml");
    std::fs::write(
        &config,
        format!(
            "[courier]\nqueue_cap = 1000\n\n[[courier.providers]]\nname = \"acme\"\nteam_id = \"TEAM123456\"\nkey_id = \"KEY1234567\"\nkey = \"{}\"\ntopics = [\"{TOPIC}\"]\n{extra}",
            key_path.display()
        ),
    )
    .unwrap();
    (config, doc.as_ref().to_vec())
}

/// A certificate for `device` from the data directory's CA, as `ids`
/// issues it (serial 11…11).
pub fn device_creds(data: &Path, device: wire::DeviceId) -> DeviceCredentials {
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).unwrap();
    let ca_key = std::fs::read_to_string(data.join("ca-key.pem")).unwrap();
    let ca = ids::certs::DeviceCa::from_pem(&ca_pem, &ca_key).unwrap();
    let key = wire::SigningKey::generate();
    let (_, cert) = ca
        .issue(device, &key.public(), [0x11; 16], unix_now())
        .unwrap();
    let chain = rustls_pemfile::certs(&mut cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    DeviceCredentials {
        chain,
        key: rustls::pki_types::PrivateKeyDer::Pkcs8(key.pkcs8().to_vec().into()),
        roots: roots(data),
        server_name: "localhost".into(),
    }
}

pub fn roots(data: &Path) -> rustls::RootCertStore {
    let ca_pem = std::fs::read(data.join("ca.pem")).unwrap();
    let mut r = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        r.add(c.unwrap()).unwrap();
    }
    r
}

/// The courier's answer to a platform token the device sends over `dev`
/// (within 5 s), and its text.
pub async fn platform_answer(
    dev: &mut client_sdk::courier::DeviceClient,
    token: wire::push::PlatformToken,
) -> (wire::push::PlatformStatus, String) {
    let request = dev.register_platform(token).await.unwrap();
    match dev.next_within(std::time::Duration::from_secs(5)).await {
        Ok(client_sdk::courier::ClientEvent::Platform {
            request: r,
            status,
            text,
        }) if r == request => (status, text),
        other => panic!("no answer to the platform token: {other:?}"),
    }
}

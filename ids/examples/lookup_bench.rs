//! Identity lookup benchmark: loads N handles into a fresh directory, then
//! drives `POST /v1/lookup` over HTTPS with proofs from concurrent clients
//! and prints lookups per second, p50/p99 latency and epoch publish times.
//! Run through `bench/ids-lookup.sh`.
//!
//!   lookup_bench [--handles N] [--seconds S] [--clients C] [--db URL] [--dir DIR]
//!                [--reuse yes] [--auth mtls|signature]
//!
//! `--auth`: the client presents its device certificate (mutual TLS, as
//! the SDK does; the default) or signs every request.
//! `--reuse yes` serves the SQLite directory a previous run left in DIR
//! (loaded with the same N) instead of loading anew: for profiling.

// A benchmark prints its results on stdout.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rcgen::{CertificateParams, KeyPair};
use wire::device_list::{DeviceEntry, DeviceList, DirectoryValue};
use wire::{DeviceId, SigningKey};

struct Args {
    handles: u64,
    seconds: u64,
    clients: usize,
    db: Option<String>,
    dir: std::path::PathBuf,
    reuse: bool,
    /// Sign each request instead of presenting a device certificate.
    sign: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        handles: 1_000_000,
        seconds: 20,
        clients: 8,
        db: None,
        dir: std::env::temp_dir().join("parley-ids-bench"),
        reuse: false,
        sign: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--handles" => a.handles = v.parse()?,
            "--seconds" => a.seconds = v.parse()?,
            "--clients" => a.clients = v.parse()?,
            "--db" => a.db = Some(v),
            "--dir" => a.dir = v.into(),
            "--reuse" => a.reuse = v == "yes",
            "--auth" => {
                a.sign = match v.as_str() {
                    "mtls" => false,
                    "signature" => true,
                    _ => anyhow::bail!("--auth is mtls or signature"),
                }
            }
            _ => anyhow::bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

// As in the `parley` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn handle(i: u64) -> String {
    format!("mailto:user{i}@bench.example")
}

fn main() -> Result<()> {
    let a = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(a))
}

async fn run(a: Args) -> Result<()> {
    let reuse = a.reuse && a.db.is_none() && a.dir.join("ids.db").exists();
    if !reuse {
        let _ = std::fs::remove_dir_all(&a.dir);
    }
    std::fs::create_dir_all(&a.dir)?;
    let url =
        a.db.clone()
            .unwrap_or_else(|| format!("sqlite://{}", a.dir.join("ids.db").display()));
    let store = ids::store::Store::open(&url).await?;
    let root_key =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("ed25519"))?;
    let kt = ids::kt::Transparency::open(
        store.clone(),
        ids::kt::VrfKey::new([5; 32])?,
        root_key.as_ref(),
    )
    .await?;

    // --- load --------------------------------------------------------------
    let account = Arc::new(SigningKey::generate());
    let device_key = SigningKey::generate().public();
    let load_started = Instant::now();
    let batch = 50_000u64;
    let mut published = if reuse { a.handles } else { 0 };
    let mut publish_secs = 0f64;
    while published < a.handles {
        let n = batch.min(a.handles - published);
        let first = published;
        let acct = account.clone();
        // Sign lists on the blocking pool, both cores.
        let halves: Vec<_> = (0..2u64)
            .map(|h| {
                let acct = acct.clone();
                tokio::task::spawn_blocking(move || {
                    (first + h * n / 2..first + (h + 1) * n / 2)
                        .chain((h == 1 && n % 2 == 1).then_some(first + n - 1))
                        .map(|i| {
                            let mut id = [0u8; 16];
                            id[8..].copy_from_slice(&i.to_be_bytes());
                            let list = DeviceList {
                                account_key: acct.public(),
                                seq: 1,
                                handles: vec![handle(i)],
                                devices: vec![DeviceEntry {
                                    id: DeviceId(id),
                                    identity_key: device_key,
                                }],
                            };
                            (
                                i,
                                DirectoryValue::Active(list.sign(&acct).expect("sign")).encode(),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut values = Vec::with_capacity(n as usize);
        for h in halves {
            values.extend(h.await?);
        }
        insert_rows(&store, &values).await?;
        let t = Instant::now();
        kt.publish_pending(i64::MAX).await?;
        publish_secs += t.elapsed().as_secs_f64();
        published += n;
        eprintln!(
            "bench: loaded {published}/{} handles ({:.0} s, publishing {:.0} values/s)",
            a.handles,
            load_started.elapsed().as_secs_f64(),
            published as f64 / publish_secs
        );
    }

    // An epoch of 1000 changes on the full directory.
    let t = Instant::now();
    let mut tx = store.begin().await?;
    for i in 0..if reuse { 0 } else { 1000u64.min(a.handles) } {
        let list = DeviceList {
            account_key: account.public(),
            seq: 2,
            handles: vec![handle(i)],
            devices: vec![DeviceEntry {
                id: DeviceId([9; 16]),
                identity_key: device_key,
            }],
        };
        ids::store::tx::queue_publish(
            &mut tx,
            &handle(i),
            &DirectoryValue::Active(list.sign(&account)?).encode(),
            0,
        )
        .await?;
    }
    tx.commit().await?;
    let queued = t.elapsed();
    let t = Instant::now();
    kt.publish_pending(i64::MAX).await?;
    let epoch_1000 = t.elapsed();

    // What the server does as it starts (a fresh load left the tree
    // cached already), done here so it is not measured.
    {
        let t = Instant::now();
        let n = kt.warm_cache().await?;
        eprintln!(
            "bench: {n} tree records loaded in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }

    // --- serve ----------------------------------------------------------------
    let me = SigningKey::generate();
    let me_id = DeviceId::random();
    {
        let mut tx = store.begin().await?;
        ids::store::tx::insert_device(
            &mut tx,
            &ids::store::DeviceRow {
                id: me_id,
                account_id: "bench-client".into(),
                identity_key: me.public().0.to_vec(),
                name: "bench".into(),
                capabilities: "[]".into(),
                push_tokens: "[]".into(),
                cert_serial: "00".into(),
                certificate: String::new(),
                created_at: 0,
                revoked_at: None,
            },
        )
        .await?;
        tx.commit().await?;
    }
    let ca_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key)?;
    let mut device_roots = rustls::RootCertStore::empty();
    device_roots.add(ca.der().clone())?;
    let ca = ids::certs::DeviceCa::from_pem(&ca.pem(), &ca_key.serialize_pem())?;
    let (_, my_cert) = ca.issue(
        me_id,
        &me.public(),
        [7; 16],
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs() as i64,
    )?;
    let server_key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])?.self_signed(&server_key)?;
    let tls = ids::runtime::tls_config(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
            .map_err(anyhow::Error::msg)?,
        Some(device_roots),
    )?;
    let config = ids::Config {
        database_url: url.clone(),
        lookups_per_minute: u32::MAX / 2,
        publish_interval: Duration::from_secs(10),
        outbox: a.dir.join("outbox"),
        ..ids::Config::default()
    };
    let service = ids::Ids::new(
        config,
        store.clone(),
        kt,
        ca,
        Box::new(ids::sender::OutboxSender {
            dir: a.dir.join("outbox"),
        }),
    )?;
    let server = ids::runtime::Server::start(service, "127.0.0.1:0".parse()?, tls).await?;
    let addr = server.addr();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone())?;
    let identity = match a.sign {
        true => None,
        false => Some(client_sdk::ids::tls_identity(&my_cert, &me)?),
    };
    let client_tls = client_sdk::ids::tls_connector(roots, identity)?;
    let sign = a.sign;
    let me = Arc::new(me);
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let warmup = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for c in 0..a.clients {
        let (tls, me) = (client_tls.clone(), me.clone());
        let handles = a.handles;
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = tls
                .connect(rustls::pki_types::ServerName::try_from("127.0.0.1")?, tcp)
                .await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let mut lat = Vec::new();
            let mut x = 0x9e3779b97f4a7c15u64 ^ (c as u64 + 1);
            let mut bad = 0u64;
            while Instant::now() < deadline {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let body = format!("{{\"handles\":[\"{}\"]}}", handle(x % handles));
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs();
                let mut req = hyper::Request::post("/v1/lookup").header("host", "127.0.0.1");
                if sign {
                    let auth =
                        wire::request_auth::sign(&me, "POST", "/v1/lookup", ts, body.as_bytes());
                    req = req.header("authorization", auth);
                }
                let req = req.body(Full::new(Bytes::from(body)))?;
                let t = Instant::now();
                let resp = send.send_request(req).await?;
                let ok = resp.status() == 200;
                let body = resp.into_body().collect().await?.to_bytes();
                let took = t.elapsed();
                if !ok || !body.windows(7).any(|w| w == b"\"found\"") {
                    bad += 1;
                }
                if t >= warmup {
                    lat.push(took);
                }
            }
            anyhow::Ok((lat, bad))
        }));
    }
    // Process CPU over the measured window, from the warm-up's end.
    let cpu_window = tokio::spawn(async move {
        tokio::time::sleep_until(warmup.into()).await;
        let start = process_cpu_secs();
        tokio::time::sleep_until(deadline.into()).await;
        process_cpu_secs().zip(start).map(|(b, a)| b - a)
    });
    let mut lat = Vec::new();
    let mut bad = 0;
    for t in tasks {
        let (l, b) = t.await??;
        lat.extend(l);
        bad += b;
    }
    server.shutdown().await;
    lat.sort();
    let measured = a.seconds.saturating_sub(2).max(1) as f64;
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let db_bytes: u64 = std::fs::read_dir(&a.dir)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("handles {}", a.handles);
    if !reuse {
        println!(
            "load_publish_values_per_sec {:.0}",
            a.handles as f64 / publish_secs
        );
    }
    println!(
        "epoch_1000_changes_ms {:.0} (queueing {:.0} ms)",
        epoch_1000.as_secs_f64() * 1000.0,
        queued.as_secs_f64() * 1000.0
    );
    println!("database_mb {:.0}", db_bytes as f64 / 1e6);
    println!("clients {}", a.clients);
    println!("auth {}", if a.sign { "signature" } else { "mtls" });
    println!("lookups_per_sec {:.0}", lat.len() as f64 / measured);
    println!("p50_ms {:.2}", pct(0.50).as_secs_f64() * 1000.0);
    println!("p99_ms {:.2}", pct(0.99).as_secs_f64() * 1000.0);
    println!("failed_lookups {bad}");
    if let Some(cpu) = cpu_window.await? {
        println!(
            "cpu_us_per_lookup {:.0}",
            cpu * 1e6 / (lat.len().max(1) as f64)
        );
    }
    Ok(())
}

/// Bulk rows: accounts, handles, devices and queued directory values.
async fn insert_rows(store: &ids::store::Store, values: &[(u64, Vec<u8>)]) -> Result<()> {
    let mut tx = store.begin().await?;
    for chunk in values.chunks(200) {
        let mut acc =
            String::from("INSERT INTO accounts (id, account_key, seq, list, created_at) VALUES ");
        let mut han = String::from("INSERT INTO handles (uri, account_id) VALUES ");
        let mut dev = String::from(
            "INSERT INTO devices (id, account_id, identity_key, name, capabilities, push_tokens, cert_serial, certificate, created_at) VALUES ",
        );
        let mut pen = String::from("INSERT INTO kt_pending (uri, value, queued_at) VALUES ");
        for (k, (i, _)) in chunk.iter().enumerate() {
            let sep = if k == 0 { "" } else { "," };
            acc += &format!("{sep}('a{i}', x'04', 1, ${}, 0)", k + 1);
            han += &format!("{sep}('{}', 'a{i}')", handle(*i));
            dev += &format!(
                "{sep}('{i:032x}', 'a{i}', ${}, '', '[]', '[]', '00', '', 0)",
                k + 1
            );
            pen += &format!("{sep}('{}', ${}, 0)", handle(*i), k + 1);
        }
        let mut q = sqlx::query(&acc);
        for (_, v) in chunk {
            q = q.bind(v.clone());
        }
        q.execute(&mut *tx).await?;
        sqlx::query(&han).execute(&mut *tx).await?;
        let mut q = sqlx::query(&dev);
        for (i, _) in chunk {
            // Unique, not a real point: lookups never parse routing keys.
            let mut key = vec![0u8; 65];
            key[57..].copy_from_slice(&i.to_be_bytes());
            q = q.bind(key);
        }
        q.execute(&mut *tx).await?;
        let mut q = sqlx::query(&pen);
        for (_, v) in chunk {
            q = q.bind(v.clone());
        }
        q.execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// User plus system CPU seconds of this process, from /proc (Linux).
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux ABI Rust targets.
    Some(ticks / 100.0)
}

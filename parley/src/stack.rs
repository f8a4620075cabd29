//! The services of one process, started together and stopped in order,
//! and the joins between them: signaling's directory and wake-ups, ids'
//! account notices, revocations, and in cluster mode the NATS link for
//! stand-alone services.

use anyhow::{Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use stun_turn::runtime::Relay;

use crate::{admin, config, data, revocations, tls, wiring, Services};

/// The relay's addresses as `turn:`/`turns:` URIs for devices; an
/// unspecified address becomes loopback (set `ids.turn_uris` for
/// deployments reached from elsewhere).
fn turn_uris(relay: &Relay) -> Vec<String> {
    let host = |a: &std::net::SocketAddr| {
        let ip = if a.ip().is_unspecified() {
            match a {
                std::net::SocketAddr::V4(_) => "127.0.0.1".to_string(),
                std::net::SocketAddr::V6(_) => "[::1]".to_string(),
            }
        } else if a.is_ipv6() {
            format!("[{}]", a.ip())
        } else {
            a.ip().to_string()
        };
        format!("{ip}:{}", a.port())
    };
    let mut out = Vec::new();
    out.extend(
        relay
            .udp_addrs()
            .iter()
            .map(|a| format!("turn:{}?transport=udp", host(a))),
    );
    out.extend(
        relay
            .tcp_addrs()
            .iter()
            .map(|a| format!("turn:{}?transport=tcp", host(a))),
    );
    out.extend(
        relay
            .tls_addrs()
            .iter()
            .map(|a| format!("turns:{}?transport=tcp", host(a))),
    );
    out
}

/// Opens the identity service's storage, directory and CA and binds it.
async fn start_ids(
    settings: &config::IdsSection,
    data: &data::DataDir,
    config: ids::Config,
    cluster: &config::ClusterSection,
) -> Result<ids::runtime::Server> {
    let (vrf, root_key) = data.ids_keys()?;
    let store = ids::store::Store::open(&config.database_url)
        .await
        .with_context(|| "cannot open the identity database (ids.database)")?;
    let kt = ids::kt::Transparency::open(store.clone(), ids::kt::VrfKey::new(vrf)?, &root_key)
        .await?
        // The publisher lease's holder: nodes sharing one data directory
        // (scripts/cluster.sh) are told apart by --cluster-node.
        .with_node(cluster.node.as_deref().unwrap_or(&data.node_id));
    let ca_pem = std::fs::read_to_string(&data.ca_cert)
        .with_context(|| format!("cannot read {}", data.ca_cert.display()))?;
    let ca_key = std::fs::read_to_string(&data.ca_key)
        .with_context(|| format!("cannot read {}", data.ca_key.display()))?;
    let ca = ids::certs::DeviceCa::from_pem(&ca_pem, &ca_key)?;
    let sender = settings.sender(&config.outbox)?;
    // Verification codes are stored under a key every node derives alike
    // from the directory's VRF key.
    let code_key = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &vrf),
        b"parley-verification-codes-v1",
    );
    let code_key: [u8; 32] = code_key.as_ref().try_into()?;
    let mut service = ids::Ids::new(config, store, kt, ca, sender)?.with_code_key(&code_key);
    if cluster.enabled() {
        service = service.with_shared_budgets();
    }
    let (cert, key) = data.server_files(&settings.cert, &settings.key);
    // Devices may authenticate with the certificates this CA issues them.
    let tls = ids::runtime::tls_config(
        tls::chain(&cert)?,
        tls::private_key(&key)?,
        Some(tls::roots(&data.ca_cert)?),
    )?;
    Ok(ids::runtime::Server::start(service, settings.listen(), tls).await?)
}

/// Loads the courier's certificates and trust anchors and binds it.
async fn start_courier(
    settings: &config::CourierSection,
    data: &data::DataDir,
    config: push_courier::Config,
) -> Result<push_courier::runtime::Server> {
    let (cert, key) = data.server_files(&settings.cert, &settings.key);
    let device_ca = data.ca_or(&settings.device_ca);
    let provider_ca = data.ca_or(&settings.provider_ca);
    let tls = push_courier::runtime::Tls {
        chain: tls::chain(&cert)?,
        key: tls::private_key(&key)?,
        device_roots: tls::roots(&device_ca)?,
        device_crls: Vec::new(),
        provider_roots: Some(tls::roots(&provider_ca)?),
    };
    push_courier::runtime::Server::start(config, tls)
        .await
        .with_context(|| "cannot start the push courier")
}

/// Where signaling shares its bindings in cluster mode.
struct SharedSip {
    url: String,
    node: String,
    nats: Vec<String>,
    options: push_courier::cluster::NatsOptions,
}

/// Binds SIP signaling; with the identity service's store its device
/// checks go there, and with a courier (in this process, or a cluster's
/// over NATS) its wake-ups.
async fn start_signaling(
    settings: &config::SignalingSection,
    data: &data::DataDir,
    config: signaling::runtime::Config,
    ids: Option<ids::store::Store>,
    courier: Option<wiring::CourierLink>,
    shared: Option<&SharedSip>,
) -> Result<(
    signaling::runtime::Server,
    Option<signaling::location::SqlLocation>,
)> {
    let (cert, key) = data.server_files(&settings.cert, &settings.key);
    let device_ca = data.ca_or(&settings.device_ca);
    let tls = signaling::runtime::tls_config(
        tls::chain(&cert)?,
        tls::private_key(&key)?,
        tls::roots(&device_ca)?,
    )?;
    let directory: Arc<dyn signaling::runtime::Directory> = match ids {
        Some(store) => Arc::new(wiring::IdsDirectory(store)),
        None => Arc::new(signaling::runtime::NoDirectory),
    };
    let waker: Arc<dyn signaling::runtime::Waker> = match courier {
        Some(link) => Arc::new(wiring::CourierWaker { link }),
        None => Arc::new(signaling::runtime::NoWaker),
    };
    let started = match shared {
        // Cluster mode: bindings shared with the other nodes.
        Some(shared) => {
            let location = signaling::location::SqlLocation::open(&shared.url, &shared.node)
                .await
                .with_context(|| "cannot open the shared SIP bindings (signaling.database)")?
                .with_nats_options(&shared.nats, (shared.options.0)())
                .await
                .with_context(|| "cannot reach NATS (cluster.nats)")?;
            signaling::runtime::Server::start_shared(
                config,
                Some(tls),
                directory,
                waker,
                Arc::new(location.clone()),
            )
            .await
            .map(|s| (s, Some(location)))
        }
        None => signaling::runtime::Server::start(config, Some(tls), directory, waker)
            .await
            .map(|s| (s, None)),
    };
    started.with_context(|| "cannot start signaling")
}

/// `host:port` resolved now (`key` names it in errors), and its host.
async fn resolve(key: &str, url: &str) -> Result<(std::net::SocketAddr, String)> {
    let addr = tokio::net::lookup_host(url)
        .await
        .with_context(|| format!("{key}: cannot resolve {url}"))?
        .next()
        .with_context(|| format!("{key}: no address for {url}"))?;
    let host = url.rsplit_once(':').map_or(url, |(h, _)| h);
    Ok((addr, host.to_owned()))
}

/// The public roots, unless `ca` names others (a stand-in).
fn upstream_roots(ca: &Option<PathBuf>) -> Result<rustls::RootCertStore> {
    Ok(match ca {
        Some(ca) => tls::roots(ca)?,
        None => rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    })
}

/// The platforms' services `[courier.upstream]` sets up.
async fn platforms(u: &config::UpstreamSection) -> Result<push_courier::upstream::wake::Platforms> {
    let mut p = push_courier::upstream::wake::Platforms::default();
    if let Some(a) = &u.apns {
        let url = a.url.as_deref().unwrap_or(config::APNS_DEFAULT);
        p.apns = Some(Arc::new(apns_client(a, "url", url).await?));
        if let Some(url) = &a.sandbox_url {
            p.apns_sandbox = Some(Arc::new(apns_client(a, "sandbox_url", url).await?));
        }
    }
    if let Some(f) = &u.fcm {
        p.fcm = Some(Arc::new(fcm_client(f).await?));
    }
    Ok(p)
}

/// An APNs client for the environment at `url` (`[courier.upstream.apns]`
/// `which`): its address resolved now, the `.p8` key read (never logged).
async fn apns_client(
    a: &config::ApnsSection,
    which: &str,
    url: &str,
) -> Result<push_courier::upstream::ApnsClient> {
    let (addr, host) = resolve(&format!("courier.upstream.apns.{which}"), url).await?;
    let roots = upstream_roots(&a.ca)?;
    let key = match tls::private_key(&a.key)
        .with_context(|| format!("courier.upstream.apns.key: {}", a.key.display()))?
    {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => anyhow::bail!(
            "courier.upstream.apns.key: {} is not a PKCS#8 key (Apple's .p8 files are)",
            a.key.display()
        ),
    };
    Ok(push_courier::upstream::ApnsClient::new(
        push_courier::upstream::ApnsConfig {
            addr,
            server_name: a.server_name.clone().unwrap_or(host),
            roots,
            key_pkcs8: key,
            key_id: a.key_id.clone(),
            team_id: a.team_id.clone(),
        },
    ))
}

/// The FCM client `[courier.upstream.fcm]` describes: the service
/// account read (its key never logged), FCM's and the token endpoint's
/// addresses resolved now.
async fn fcm_client(f: &config::FcmSection) -> Result<push_courier::upstream::fcm::FcmClient> {
    use push_courier::upstream::fcm;
    let key = "courier.upstream.fcm.service_account";
    let json = std::fs::read(&f.service_account)
        .with_context(|| format!("{key}: cannot read {}", f.service_account.display()))?;
    let account = fcm::ServiceAccount::from_json(&json).with_context(|| key.to_owned())?;
    let url = f.url.as_deref().unwrap_or(config::FCM_DEFAULT);
    let (api, api_name) = resolve("courier.upstream.fcm.url", url).await?;
    // https://host[:port]/path → host:port
    let authority = account
        .token_uri
        .strip_prefix("https://")
        .and_then(|r| r.split('/').next())
        .with_context(|| format!("{key}: token_uri is not an https URL"))?;
    let authority = match authority.contains(':') {
        true => authority.to_owned(),
        false => format!("{authority}:443"),
    };
    let (token, token_name) = resolve("the service account's token_uri", &authority).await?;
    Ok(fcm::FcmClient::new(fcm::FcmConfig {
        account,
        api,
        api_name,
        token,
        token_name,
        roots: upstream_roots(&f.ca)?,
    }))
}

/// A NATS connection for a stand-alone service of a cluster.
async fn connect_nats(cluster: &config::ClusterSection) -> Result<async_nats::Client> {
    let urls = cluster
        .nats
        .as_ref()
        .map(config::OneOrMany::to_vec)
        .unwrap_or_default();
    (cluster.nats_options()?.0)()
        .retry_on_initial_connect()
        .connect(urls.clone())
        .await
        .with_context(|| format!("cannot reach NATS (cluster.nats {urls:?})"))
}

/// The SFU's configuration: room tokens checked with signaling's
/// `secret`, the join API on the `[sfu]` certificate (the data
/// directory's by default).
pub(crate) fn sfu_config(
    settings: &config::Settings,
    data: &data::DataDir,
    secret: [u8; 32],
) -> Result<sfu::runtime::Config> {
    let mut c = settings.sfu.to_config(secret)?;
    let (cert, key) = data.server_files(&settings.sfu.cert, &settings.sfu.key);
    c.tls = Some(tls::server_config(&cert, &key, &[b"http/1.1"])?);
    Ok(c)
}

pub(crate) fn tls_files(turn: &config::TurnSection, data: &data::DataDir) -> (PathBuf, PathBuf) {
    data.server_files(&turn.cert, &turn.key)
}

/// Each service's configuration.
pub(crate) type Configs = (
    stun_turn::Config,
    ids::Config,
    push_courier::Config,
    signaling::runtime::Config,
    sfu::runtime::Config,
);

/// The services of one process, started.
pub(crate) struct Stack {
    pub(crate) relay: Option<Arc<Relay>>,
    pub(crate) ids: Option<ids::runtime::Server>,
    pub(crate) courier: Option<push_courier::runtime::Server>,
    pub(crate) signaling: Option<Arc<signaling::runtime::Server>>,
    pub(crate) sfu: Option<sfu::runtime::Sfu>,
    /// What `/readyz` asks besides the services' own databases: in a
    /// cluster, signaling's shared bindings and the NATS link of a
    /// stand-alone service.
    pub(crate) probes: Vec<Arc<dyn admin::ReadyProbe>>,
    /// Revocations heard, for `/metrics`.
    pub(crate) revocations: revocations::Feed,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Stack {
    pub(crate) async fn start(
        settings: &config::Settings,
        data: &data::DataDir,
        services: Services,
        (turn_config, mut ids_config, mut courier_config, signaling_config, sfu_config): Configs,
        tls: Arc<rustls::ServerConfig>,
    ) -> Result<Stack> {
        let relay = match services.turn {
            true => Some(Arc::new(Relay::start(turn_config, Some(tls))?)),
            false => None,
        };
        if let (Some(r), true) = (&relay, ids_config.turn.uris.is_empty()) {
            // The addresses actually bound (a port 0 is chosen by now).
            ids_config.turn.uris = turn_uris(r);
        }
        let ids_server = match services.ids {
            true => Some(start_ids(&settings.ids, data, ids_config, &settings.cluster).await?),
            false => None,
        };
        let courier_server = match services.courier {
            true => {
                courier_config.platforms = platforms(&settings.courier.upstream).await?;
                Some(start_courier(&settings.courier, data, courier_config).await?)
            }
            false => None,
        };
        let mut tasks = Vec::new();
        if let (Some(path), Some(c)) = (&settings.courier.device_crl, &courier_server) {
            // Read once before serving, so a bad path stops start-up.
            c.courier.revoke_serials(revocations::read_crl(path)?);
            tasks.push(tokio::spawn(revocations::catch_up_from_file(
                path.clone(),
                c.courier.clone(),
            )));
        }
        // A stand-alone service of a cluster reaches the courier nodes over
        // NATS, and signaling reads the directory from ids' store.
        let courier_link = match &courier_server {
            Some(c) => Some(wiring::CourierLink::Local(c.courier.clone())),
            None if settings.cluster.enabled() && (services.ids || services.signaling) => Some(
                wiring::CourierLink::Cluster(connect_nats(&settings.cluster).await?),
            ),
            None => None,
        };
        // Every node of a cluster hears the revocations any ids node makes.
        let bus = match (&courier_link, settings.cluster.enabled()) {
            (Some(wiring::CourierLink::Cluster(nats)), _) => Some(nats.clone()),
            (_, true) => Some(connect_nats(&settings.cluster).await?),
            (_, false) => None,
        };
        let feed = revocations::Feed::new(bus);
        tasks.extend(feed.listen().await?);
        if let Some(i) = &ids_server {
            i.ids.set_notifier(Arc::new(wiring::IdsNotifier {
                courier: courier_link.clone(),
                revocations: feed.clone(),
            }));
        }
        let ids_store = match (&ids_server, &settings.ids.database) {
            (Some(i), _) => Some(i.ids.store.clone()),
            (None, Some(url)) if services.signaling || services.courier => Some(
                ids::store::Store::open(url)
                    .await
                    .with_context(|| "cannot open the identity service's store (ids.database)")?,
            ),
            (None, None) if services.signaling => {
                tracing::warn!(
                    "no ids.database: only digest accounts can register; device certificates \
                     are refused until ids.database names the identity service's PostgreSQL"
                );
                None
            }
            _ => None,
        };
        let shared_sip = match (settings.cluster.enabled(), &settings.signaling.database) {
            (true, Some(url)) => Some(SharedSip {
                url: url.clone(),
                node: settings
                    .cluster
                    .node
                    .clone()
                    .unwrap_or_else(|| data.node_id.clone()),
                nats: settings
                    .cluster
                    .nats
                    .as_ref()
                    .map(config::OneOrMany::to_vec)
                    .unwrap_or_default(),
                options: settings.cluster.nats_options()?,
            }),
            _ => None,
        };
        let mut probes: Vec<Arc<dyn admin::ReadyProbe>> = Vec::new();
        if let Some(wiring::CourierLink::Cluster(nats)) = &courier_link {
            probes.push(Arc::new(admin::ClusterNats(nats.clone())));
        }
        let sfu = match services.sfu {
            true => Some(
                sfu::runtime::Sfu::start(sfu_config)
                    .await
                    .context("cannot start the SFU")?,
            ),
            false => None,
        };
        let mut signaling_config = signaling_config;
        if let (Some(s), None) = (&sfu, &signaling_config.proxy.sfu) {
            // Participants reach the API where they reach the media.
            signaling_config.proxy.sfu = Some(format!(
                "https://{}",
                std::net::SocketAddr::new(s.media.ip(), s.http.port())
            ));
        }
        let signaling_server = match services.signaling {
            true => {
                let (server, location) = start_signaling(
                    &settings.signaling,
                    data,
                    signaling_config,
                    ids_store.clone(),
                    courier_link,
                    shared_sip.as_ref(),
                )
                .await?;
                if let Some(l) = location {
                    probes.push(Arc::new(admin::SignalingBindings(l)));
                }
                Some(Arc::new(server))
            }
            false => None,
        };
        let courier = courier_server.as_ref().map(|c| c.courier.clone());
        tasks.push(feed.apply(revocations::Targets {
            courier: courier.clone(),
            signaling: signaling_server.clone(),
            ids: ids_server.as_ref().map(|i| i.ids.clone()),
        }));
        // The courier reads the operator's CRL file instead, if named.
        let courier = courier.filter(|_| settings.courier.device_crl.is_none());
        match ids_store {
            Some(store) if courier.is_some() || signaling_server.is_some() => {
                tasks.push(tokio::spawn(revocations::catch_up_from_store(
                    store,
                    courier,
                    signaling_server.clone(),
                )))
            }
            None if courier.is_some() => tracing::warn!(
                "neither ids.database nor courier.device_crl: the courier refuses only the \
                 certificates revoked while it runs"
            ),
            _ => {}
        }
        Ok(Stack {
            relay,
            ids: ids_server,
            courier: courier_server,
            signaling: signaling_server,
            sfu,
            probes,
            revocations: feed,
            tasks,
        })
    }

    /// Stops everything: ringing calls get a few seconds.
    pub(crate) async fn shutdown(self) -> Result<()> {
        for r in self.tasks {
            r.abort();
            let _ = r.await;
        }
        if let Some(s) = self.signaling {
            // Admin metrics no longer hold a reference once the admin task
            // has stopped.
            match Arc::try_unwrap(s) {
                Ok(s) => s.shutdown(std::time::Duration::from_secs(5)).await,
                Err(_) => tracing::error!("signaling still referenced at shutdown"),
            }
        }
        if let Some(s) = self.sfu {
            s.shutdown();
        }
        if let Some(c) = self.courier {
            c.shutdown().await;
        }
        if let Some(s) = self.ids {
            s.shutdown().await;
        }
        if let Some(relay) = self.relay {
            match Arc::try_unwrap(relay) {
                Ok(r) => tokio::task::spawn_blocking(move || r.shutdown()).await?,
                Err(_) => tracing::error!("relay still referenced at shutdown; unclean shutdown"),
            }
        }
        Ok(())
    }
}

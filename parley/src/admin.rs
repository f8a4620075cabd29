//! The loopback admin listener: `/metrics` (Prometheus text), `/healthz`
//! (the process runs) and `/readyz` (every service accepts traffic; 503
//! while starting or draining, or while a database does not answer).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Something that can append its metrics.
pub trait MetricsSource: Send + Sync {
    fn render(&self, out: &mut String);
}

/// The SFU's rooms, participants and forwarded media.
pub struct SfuMetrics(pub Arc<sfu::runtime::Metrics>);

impl MetricsSource for SfuMetrics {
    fn render(&self, out: &mut String) {
        self.0.render(out);
    }
}

/// Something a service needs to take traffic (its database), asked at
/// each `/readyz`.
pub trait ReadyProbe: Send + Sync {
    /// What it is, for the answer: `ids database`.
    fn name(&self) -> &'static str;
    fn probe(&self) -> Probe<'_>;
}

/// A probe's answer to come.
pub type Probe<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub sources: Arc<Vec<Arc<dyn MetricsSource>>>,
    pub probes: Arc<Vec<Arc<dyn ReadyProbe>>>,
}

/// How long `/readyz` waits for each probe.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut out = String::with_capacity(4096);
    for src in s.sources.iter() {
        src.render(&mut out);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if !s.ready.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_string());
    }
    for p in s.probes.iter() {
        let failed = match tokio::time::timeout(PROBE_TIMEOUT, p.probe()).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => format!("no answer within {PROBE_TIMEOUT:?}"),
        };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}: {failed}\n", p.name()),
        );
    }
    (StatusCode::OK, "ready\n".to_string())
}

pub struct SignalingMetrics(pub Arc<signaling::runtime::Server>);

impl MetricsSource for SignalingMetrics {
    fn render(&self, out: &mut String) {
        self.0.render_metrics(out);
    }
}

pub struct CourierMetrics(pub Arc<push_courier::courier::Courier>);

impl MetricsSource for CourierMetrics {
    fn render(&self, out: &mut String) {
        self.0.render_metrics(out);
    }
}

impl MetricsSource for crate::Relay {
    fn render(&self, out: &mut String) {
        self.render_metrics(out);
    }
}

pub struct IdsMetrics(pub Arc<ids::Ids>);

impl MetricsSource for IdsMetrics {
    fn render(&self, out: &mut String) {
        self.0.kt.render_metrics(out);
    }
}

/// The identity service's database.
pub struct IdsDatabase(pub ids::store::Store);

impl ReadyProbe for IdsDatabase {
    fn name(&self) -> &'static str {
        "ids database"
    }

    fn probe(&self) -> Probe<'_> {
        Box::pin(async { self.0.ping().await.map_err(|e| e.to_string()) })
    }
}

/// The push courier's database.
pub struct CourierDatabase(pub push_courier::store::Store);

impl ReadyProbe for CourierDatabase {
    fn name(&self) -> &'static str {
        "courier database"
    }

    fn probe(&self) -> Probe<'_> {
        Box::pin(async { self.0.ping().await.map_err(|e| e.to_string()) })
    }
}

/// Signaling's shared bindings in a cluster: PostgreSQL and NATS.
pub struct SignalingBindings(pub signaling::location::SqlLocation);

impl ReadyProbe for SignalingBindings {
    fn name(&self) -> &'static str {
        "signaling bindings"
    }

    fn probe(&self) -> Probe<'_> {
        Box::pin(async { self.0.ready().await })
    }
}

/// A stand-alone service's NATS link to the courier nodes.
pub struct ClusterNats(pub async_nats::Client);

impl ReadyProbe for ClusterNats {
    fn name(&self) -> &'static str {
        "NATS (pushes to the couriers)"
    }

    fn probe(&self) -> Probe<'_> {
        Box::pin(async {
            match self.0.connection_state() {
                async_nats::connection::State::Connected => Ok(()),
                s => Err(format!("{s:?}")),
            }
        })
    }
}

/// The courier's NATS connection, in cluster mode.
pub struct CourierNats(pub Arc<push_courier::cluster::Cluster>);

impl ReadyProbe for CourierNats {
    fn name(&self) -> &'static str {
        "courier NATS"
    }

    fn probe(&self) -> Probe<'_> {
        Box::pin(async {
            match self.0.nats_up() {
                true => Ok(()),
                false => Err("not connected".to_owned()),
            }
        })
    }
}

//! The loopback admin listener: `/metrics` (Prometheus text), `/healthz`
//! (the process runs) and `/readyz` (every service accepts traffic; 503
//! while starting or draining).

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

#[derive(Clone)]
pub struct AdminState {
    pub ready: Arc<AtomicBool>,
    pub sources: Arc<Vec<Arc<dyn MetricsSource>>>,
}

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
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

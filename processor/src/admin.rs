//! The admin HTTP server: `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// What the admin endpoints report on.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Metrics to export.
    pub registry: Arc<Registry>,
    /// True once the consumers are bound and pulling (or paused); false
    /// again while shutting down.
    pub ready: Arc<AtomicBool>,
    /// The NATS connection, for readiness.
    pub nats: async_nats::Client,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let connected = s.nats.connection_state() == async_nats::connection::State::Connected;
    if !connected {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS")
    } else if !s.ready.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "not serving")
    } else {
        (StatusCode::OK, "ok")
    }
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

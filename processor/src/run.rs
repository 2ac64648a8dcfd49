//! Run a processor in-process: the admin server (`/healthz`, `/readyz`,
//! `/metrics`) and the delivery engine on an existing NATS connection, with
//! the graceful stop the binary performs on SIGTERM. The binary's `main`
//! parses flags, connects and calls [`start`]; `local/` and tests may too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminState};
use crate::engine::{Processor, ShutdownHandle, StartError};
use crate::metrics::Metrics;
use crate::settings::Settings;

/// Why a processor stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The admin address could not be bound.
    #[error("binding the admin address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The engine could not start or stopped with an error.
    #[error(transparent)]
    Engine(#[from] StartError),
    /// The engine's task panicked.
    #[error("processor task panicked")]
    Panicked,
    /// Workers did not stop even after their deliveries were aborted.
    #[error("workers did not stop after abort")]
    Stuck,
}

/// A running processor.
pub struct Running {
    /// Bound address of the admin server.
    pub admin_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    handle: ShutdownHandle,
    task: JoinHandle<Result<(), StartError>>,
    admin: JoinHandle<()>,
    nats: async_nats::Client,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

/// Start serving `settings` on `nats`, with the admin server on
/// `admin_addr` (port 0: any).
pub async fn start(
    settings: Settings,
    nats: async_nats::Client,
    admin_addr: SocketAddr,
) -> Result<Running, RunError> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: admin_addr,
            source,
        })?;
    let admin_addr = listener.local_addr().map_err(|source| RunError::Bind {
        addr: admin_addr,
        source,
    })?;
    let app = admin::router(AdminState {
        registry: Arc::new(registry),
        ready: ready.clone(),
        nats: nats.clone(),
    });
    let admin = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin server stopped");
        }
    });
    let (handle, shutdown) = ShutdownHandle::new();
    let processor = Arc::new(Processor::new(
        settings,
        js,
        metrics,
        shutdown,
        ready.clone(),
    )?);
    let task = tokio::spawn(processor.run());
    Ok(Running {
        admin_addr,
        ready,
        handle,
        task,
        admin,
        nats,
    })
}

impl Running {
    /// Wait until the engine stops by itself (an error: it does not stop
    /// otherwise).
    pub async fn wait(&mut self) -> Result<(), RunError> {
        match (&mut self.task).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(RunError::Panicked),
        }
    }

    /// Stop gracefully: `/readyz` turns 503, no new pulls, in-flight
    /// deliveries get up to `grace` to finish (then they are handed back:
    /// JetStream redelivers them), and buffered acks are flushed.
    pub async fn shutdown(mut self, grace: Duration) -> Result<(), RunError> {
        tracing::info!("shutting down: no new pulls, finishing in-flight deliveries");
        self.ready.store(false, Ordering::SeqCst);
        self.handle.stop();
        let result = match tokio::time::timeout(grace, &mut self.task).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("in-flight deliveries did not finish in time; handing them back");
                self.handle.abort();
                tokio::time::timeout(Duration::from_secs(5), &mut self.task)
                    .await
                    .map_err(|_| RunError::Stuck)?
            }
        };
        self.finish().await;
        match result {
            Ok(r) => Ok(r?),
            Err(_) => Err(RunError::Panicked),
        }
    }

    /// Acks and naks are buffered: make sure they reach the server; stop
    /// the admin server.
    async fn finish(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.nats.flush()).await;
        self.admin.abort();
    }
}

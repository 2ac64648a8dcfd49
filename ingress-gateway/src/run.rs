//! Wiring: connect NATS, start the endpoint source, serve both listeners,
//! shut down gracefully.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::info;

use crate::config::{Config, SourceKind};
use crate::listener::{ServeOptions, bind, serve};
use crate::metrics::Metrics;
use crate::route::Router;
use crate::server::{self, Gateway, Limits};
use crate::source::{self, FileWatch, SourceError};

/// The gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("binding {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    /// The NATS URL or options are invalid.
    #[error("connecting to NATS: {0}")]
    Nats(#[from] async_nats::ConnectError),
    /// A NATS credentials or TLS file is missing or unusable.
    #[error(transparent)]
    NatsFile(#[from] crate::nats::NatsFileError),
    /// The NATS URL list does not parse.
    #[error("NATS URL: {0}")]
    NatsUrl(String),
    /// No Kubernetes client could be configured.
    #[error("configuring the Kubernetes client: {0}")]
    Kube(#[from] kube::Error),
    /// The endpoints file is invalid.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Running {
    /// Bound address of the webhook listener.
    pub addr: SocketAddr,
    /// Bound address of the admin listener.
    pub admin_addr: SocketAddr,
    /// Shared state (routing table, metrics, readiness).
    pub gateway: Arc<Gateway>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Turn `/readyz` to 503, keep serving for the drain delay, then stop
    /// accepting, drain in-flight requests and publishes, flush NATS, and
    /// return.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Wait until the server stops by itself (it does not, short of a
    /// shutdown).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that triggers shutdown from elsewhere.
    pub fn shutdown_trigger(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

/// Start the gateway. `kube_client` overrides the in-cluster/kubeconfig
/// client of the kubernetes source (tests pass theirs).
pub async fn start(
    config: &Config,
    kube_client: Option<kube::Client>,
) -> Result<Running, StartError> {
    let servers =
        spillway_api::nats::server_addrs(&config.nats_url).map_err(StartError::NatsUrl)?;
    let nats = crate::nats::connect_options(config)?
        .connect(servers)
        .await?;
    let router = Arc::new(Router::new(config.rate_limit_replicas));
    let metrics = Arc::new(Metrics::new());
    let synced = Arc::new(AtomicBool::new(false));
    let source_task: JoinHandle<()> = match config.source {
        SourceKind::File => {
            let path = config.endpoints_file.clone().unwrap_or_default();
            let watch = FileWatch::new(&path, config.secrets_dir.as_deref())?;
            watch
                .source()
                .apply(&router, config.public_base_url.as_deref());
            synced.store(true, Ordering::Release);
            info!(routes = router.table().len(), file = %path.display(), "loaded endpoints from file");
            tokio::spawn(source::run_file(
                watch,
                router.clone(),
                metrics.clone(),
                config.public_base_url.clone(),
                config.file_poll_interval,
            ))
        }
        SourceKind::Kubernetes => {
            let client = match kube_client {
                Some(c) => c,
                None => kube::Client::try_default().await?,
            };
            tokio::spawn(source::run_kubernetes(
                client,
                config.namespace.clone(),
                router.clone(),
                synced.clone(),
                metrics.clone(),
                config.public_base_url.clone(),
            ))
        }
    };
    let limits = Limits {
        publish_timeout: config.publish_timeout,
        body_timeout: config.body_timeout,
        retry_after_secs: config.retry_after.as_secs().max(1),
        max_in_flight_publishes: config.max_in_flight_publishes,
        max_concurrent_requests: config.max_concurrent_requests,
        body_budget_bytes: config.body_budget_bytes,
        min_body_bytes_per_second: config.min_body_bytes_per_second,
        max_requests_per_client: config.max_requests_per_client,
    };
    let gateway = Arc::new(Gateway::new(nats, router, metrics, synced, limits));
    let listener = bind(config.listen).map_err(|e| StartError::Bind(config.listen, e))?;
    let admin = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| StartError::Bind(config.listen, e))?;
    let admin_addr = admin
        .local_addr()
        .map_err(|e| StartError::Bind(config.admin_listen, e))?;
    let opts = ServeOptions {
        header_read_timeout: config.header_read_timeout,
        max_header_bytes: config.max_header_bytes,
        idle_timeout: config.idle_timeout,
        shutdown_grace: config.shutdown_grace,
        max_streams_per_connection: config.max_streams_per_connection,
    };
    // `tx`: shutdown requested; `close_tx`: stop accepting, after the
    // drain delay.
    let (tx, rx) = watch::channel(false);
    let (close_tx, close_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let admin_task = tokio::spawn(serve(
        admin,
        server::admin_app(gateway.clone()),
        ServeOptions {
            shutdown_grace: std::time::Duration::from_secs(1),
            ..opts.clone()
        },
        stopped(close_rx.clone()),
    ));
    let gw = gateway.clone();
    let drain_delay = config.drain_delay;
    let task = tokio::spawn(async move {
        let drain = async {
            stopped(rx).await;
            gw.start_draining();
            info!(
                drain_delay = %spillway_api::duration::format(drain_delay),
                "shutdown requested: /readyz answers 503; still serving until the drain delay is over"
            );
            tokio::time::sleep(drain_delay).await;
            let _ = close_tx.send(true);
        };
        tokio::join!(
            serve(listener, server::app(gw.clone()), opts, stopped(close_rx)),
            drain
        );
        gw.flush().await;
        source_task.abort();
        let _ = admin_task.await;
        info!("gateway stopped");
    });
    info!(%addr, %admin_addr, "gateway listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        shutdown: tx,
        task,
    })
}

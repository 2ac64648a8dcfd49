//! The Spillway operator: reconciles WebhookEndpoints into JetStream
//! streams, consumers, dead-letter streams and scaled processor Deployments.
//!
//! [`start`] runs everything (CRD check, NATS connection, admin server,
//! leader election, controller) on the current tokio runtime and returns a
//! handle; the binary is a thin wrapper around it, and the integration tests
//! run it in-process the same way.
#![forbid(unsafe_code)]

pub mod admin;
pub mod controller;
pub mod jetstream;
pub mod leader;
pub mod listener;
pub mod metrics;
pub mod notices;
pub mod render;
pub mod scaling;
pub mod settings;
pub mod wake;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::ListParams;
use kube::runtime::controller::Config as ControllerConfig;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use spillway_api::{WebhookEndpoint, WebhookListener};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use controller::{Context, FINALIZER};
pub use settings::Settings;

use crate::admin::Health;
use crate::jetstream::Js;
use crate::leader::LeaseLock;
use crate::metrics::Metrics;

/// Why the operator cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD is not installed.
    #[error(
        "the WebhookEndpoint CRD (webhookendpoints.spillway.dev) is not installed in this cluster; install it first (kubectl apply -f crds/ or the Helm chart), then start the operator"
    )]
    CrdMissing,
    /// Kubernetes API error at startup.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// NATS options could not be built (bad URL, connection refused …).
    #[error("NATS configuration: {0}")]
    NatsConfig(String),
    /// A NATS credentials or TLS file is missing or unusable (the error
    /// names the flag, never the file's contents).
    #[error(transparent)]
    NatsFile(#[from] spillway_api::nats::NatsFileError),
    /// The admin server could not bind.
    #[error("admin server on {addr}: {source}")]
    Admin {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Fail with [`Error::CrdMissing`] when the CRD is not served.
pub async fn check_crd(client: &Client) -> Result<(), Error> {
    let api: Api<WebhookEndpoint> = Api::all(client.clone());
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(Error::CrdMissing),
        Err(e) => Err(e.into()),
    }
}

/// Connect to NATS in the background (the operator starts while NATS is
/// down and reconnects forever, at most 2 s apart). The credentials and TLS
/// files are checked first (see [`spillway_api::nats::NatsAuth`]).
pub async fn connect_nats(settings: &Settings) -> Result<async_nats::Client, Error> {
    let opts = settings
        .nats_auth()
        .connect_options(spillway_api::nats::SettingNames::FLAGS)?
        .name("spillway-operator")
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(3))
        .reconnect_delay_callback(|n| {
            Duration::from_millis(100u64.saturating_mul(1 << n.min(5))).min(Duration::from_secs(2))
        });
    let urls = spillway_api::nats::server_addrs(&settings.nats_url())
        .map_err(|e| Error::NatsConfig(format!("--nats-url: {e}")))?;
    opts.connect(urls)
        .await
        .map_err(|e| Error::NatsConfig(e.to_string()))
}

/// A running operator.
pub struct Running {
    /// Where /healthz, /readyz and /metrics are served.
    pub admin_addr: SocketAddr,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// Liveness, readiness and leadership.
    pub health: Arc<Health>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    admin: JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Stop reconciling (finishing reconciles in flight), release the
    /// Lease, and stop the admin server.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.admin.abort();
    }

    /// Stop at once, as a crash would: reconciles in flight are dropped
    /// and the Lease is not released (another replica takes over when it
    /// expires).
    pub fn abort(self) {
        self.task.abort();
        self.admin.abort();
    }

    /// Wait until the operator stops on its own (it only does when stopped).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Check the CRD, connect to NATS, serve the admin endpoints and run the
/// controller (under leader election when enabled).
pub async fn start(settings: Settings, client: Client) -> Result<Running, Error> {
    if spillway_api::nats::url_has_credentials(&settings.processor_nats_url()) {
        // The URL goes into every processor Deployment's env, in every
        // tenant namespace, in plain text.
        return Err(Error::NatsConfig(format!(
            "the processors' NATS URL ({}) carries credentials, which would be written in plain \
             text into every processor Deployment; set --processor-nats-url without them and give \
             processors credentials through --processor-nats-creds-secret",
            spillway_api::nats::redact_url(&settings.processor_nats_url())
        )));
    }
    check_crd(&client).await?;
    let nats = connect_nats(&settings).await?;
    let js = Js::new(nats, settings.nats_request_timeout);
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (admin_addr, admin) = admin::serve(settings.admin_addr, metrics.clone(), health.clone())
        .await
        .map_err(|source| Error::Admin {
            addr: settings.admin_addr,
            source,
        })?;
    health.ready.store(true, Ordering::SeqCst);
    info!(%admin_addr, nats = %spillway_api::nats::redact_url(&settings.nats_url()), "spillway-operator started");
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(lead(
        settings,
        client,
        js,
        metrics.clone(),
        health.clone(),
        stop_rx,
    ));
    Ok(Running {
        admin_addr,
        metrics,
        health,
        stop,
        task,
        admin,
    })
}

fn identity(settings: &Settings) -> String {
    settings
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("spillway-operator-{}", std::process::id()))
}

async fn lead(
    settings: Settings,
    client: Client,
    js: Js,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let id = identity(&settings);
    let lock = LeaseLock::new(
        client.clone(),
        &settings.lease_namespace,
        &settings.lease_name,
        &id,
        settings.lease_duration,
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "spillway-operator".into(),
            instance: Some(id.clone()),
        },
    );
    loop {
        if *stop.borrow() {
            return;
        }
        if settings.leader_elect {
            info!(identity = %id, lease = %settings.lease_name, "waiting for leadership");
            loop {
                match lock.try_acquire_or_renew().await {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "lease acquire failed"),
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(settings.lease_renew_interval) => {}
                }
            }
            info!(identity = %id, "became leader");
        }
        health.leader.store(true, Ordering::SeqCst);

        // The term ends on shutdown (in-flight reconciles finish) or when
        // the Lease is lost (they are cancelled at once: another replica
        // may already lead; a sync cut short is safe, stale consumers are
        // deleted last).
        let (lost_tx, lost_rx) = oneshot::channel::<()>();
        let mut stop2 = stop.clone();
        let elect = settings.leader_elect;
        let renew_every = settings.lease_renew_interval;
        let lease_duration = settings.lease_duration;
        let lock2 = lock.clone();
        let watchdog = tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::select! {
                    _ = stop2.changed() => return,
                    _ = tokio::time::sleep(renew_every), if elect => {
                        // Bounded: a renewal hanging on a half-open
                        // connection must not outlive the lease.
                        match tokio::time::timeout(renew_every, lock2.try_acquire_or_renew()).await {
                            Ok(Ok(true)) => last_ok = Instant::now(),
                            Ok(Ok(false)) => {
                                warn!("lease taken by another replica");
                                break;
                            }
                            failed => {
                                match failed {
                                    Ok(Err(e)) => warn!(error = %e, "lease renewal failed"),
                                    _ => warn!(timeout = ?renew_every, "lease renewal timed out"),
                                }
                                if last_ok.elapsed() + renew_every >= lease_duration {
                                    warn!("could not renew the lease in time");
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            let _ = lost_tx.send(());
        });
        let mut stop3 = stop.clone();
        let controller = run_controller(
            &settings,
            client.clone(),
            js.clone(),
            metrics.clone(),
            recorder.clone(),
            async move {
                let _ = stop3.wait_for(|v| *v).await;
            },
        );
        tokio::select! {
            _ = controller => {}
            Ok(()) = lost_rx => {
                warn!("lease lost: cancelling the reconciles in progress");
            }
        }
        watchdog.abort();
        health.leader.store(false, Ordering::SeqCst);
        if *stop.borrow() {
            if settings.leader_elect {
                lock.release().await;
            }
            info!("stopped");
            return;
        }
        error!("lost leadership; reconciling stopped until the lease is won again");
    }
}

/// Run the controller until `shutdown` completes.
pub async fn run_controller(
    settings: &Settings,
    client: Client,
    js: Js,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (endpoints, deployments): (Api<WebhookEndpoint>, Api<Deployment>) =
        match &settings.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    // The caches keep only what reconciling reads: no managedFields, no
    // last-applied annotation, and for Deployments no pod template (the
    // render hash annotation stands for it).
    let (dstore, dwriter) = reflector::store();
    let owned = reflector::reflector(
        dwriter,
        watcher(
            deployments,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=spillway-operator"),
        )
        .modify(|d: &mut Deployment| {
            d.metadata.managed_fields = None;
            d.spec.template = Default::default();
        }),
    )
    .default_backoff()
    .touched_objects();
    let (estore, ewriter) = reflector::store();
    let trigger = reflector::reflector(
        ewriter,
        watcher(endpoints, watcher::Config::default()).modify(|e: &mut WebhookEndpoint| {
            e.metadata.managed_fields = None;
            if let Some(a) = e.metadata.annotations.as_mut() {
                a.remove("kubectl.kubernetes.io/last-applied-configuration");
            }
        }),
    )
    .default_backoff()
    .touched_objects()
    // Not our own status writes: each one would trigger a reconcile that
    // reads a slightly different backlog and writes again, for as long as
    // traffic flows. Status is refreshed on the resync period instead.
    .predicate_filter(user_intent, Default::default());
    let (tx, rx) = mpsc::unbounded_channel::<ObjectRef<WebhookEndpoint>>();
    let retrigger =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });

    let controller = Controller::for_stream(trigger, estore.clone());
    let notice_trigger = tx.clone();
    let ctx = Arc::new(Context::new(
        client,
        js,
        settings.clone(),
        recorder,
        metrics,
        estore,
        dstore,
        tx,
    ));
    // Sink notices from processors, for this term of leadership only (also
    // when the term is cut short by dropping this future).
    let _notices = AbortOnDrop(tokio::spawn(notices::listen(
        ctx.js.client().clone(),
        ctx.endpoints.clone(),
        ctx.sink_notices.clone(),
        notice_trigger,
    )));
    let shutdown = shutdown.shared();
    let listeners = listener_controller(
        settings,
        ctx.client.clone(),
        ctx.js.clone(),
        ctx.metrics.clone(),
        ctx.recorder.clone(),
        shutdown.clone(),
    );
    let endpoints = controller
        .owns_stream(owned)
        .reconcile_on(retrigger)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(controller::reconcile, controller::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    futures::join!(endpoints, listeners);
}

/// Run the WebhookListener controller until `shutdown` completes (at once
/// when the WebhookListener CRD is not installed: endpoints work without
/// it).
async fn listener_controller(
    settings: &Settings,
    client: Client,
    js: Js,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (listeners, deployments): (Api<WebhookListener>, Api<Deployment>) =
        match &settings.watch_namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    match listeners
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 404 => {
            warn!(
                "the WebhookListener CRD is not installed: listeners are not reconciled (apply crds/webhooklisteners.spillway.dev.yaml and restart)"
            );
            return;
        }
        _ => {}
    }
    let (store, writer) = reflector::store();
    let trigger = reflector::reflector(
        writer,
        watcher(listeners, watcher::Config::default()).modify(|l: &mut WebhookListener| {
            l.metadata.managed_fields = None;
        }),
    )
    .default_backoff()
    .touched_objects()
    .predicate_filter(user_intent, Default::default());
    let ctx = Arc::new(listener::ListenerContext::new(
        client,
        js,
        settings.clone(),
        recorder,
        metrics,
    ));
    Controller::for_stream(trigger, store)
        .owns(
            deployments,
            watcher::Config::default().labels("app.kubernetes.io/managed-by=spillway-operator"),
        )
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .graceful_shutdown_on(shutdown)
        .run(listener::reconcile, listener::error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "listener controller event");
            }
        })
        .await;
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What of a WebhookEndpoint starts a reconcile: its spec (generation),
/// finalizers, deletion, labels and annotations; not its status.
fn user_intent<K: kube::Resource>(e: &K) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let m = e.meta();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.generation.hash(&mut h);
    m.finalizers.hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    m.labels.hash(&mut h);
    m.annotations.hash(&mut h);
    Some(h.finish())
}

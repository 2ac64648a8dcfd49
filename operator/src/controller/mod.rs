//! The WebhookEndpoint reconciler. `reconcile` runs [`accept`] (spec,
//! Secrets, path), [`streams`] (the JetStream sync's report), [`processor`]
//! (Deployment, scaling, KEDA) and [`status`] (conditions and the patch);
//! [`cleanup`] runs when an endpoint is deleted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use spillway_api::condition::{ACCEPTED, PROCESSOR_READY, READY, SINK_AVAILABLE, STREAM_READY};
use spillway_api::names::{EndpointNames, path_precedence};
use spillway_api::validate::{Timings, check};
use spillway_api::wire::redact_url;
use spillway_api::{
    Autoscaler, Backlog, DeletionPolicy, ReplicaStatus, Scheme, SecretKeyRef, WebhookEndpoint,
    WebhookEndpointStatus,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::jetstream::{
    Js, Migration, NatsError, SyncError, Synced, foreign_holding, is_managed_consumer,
};
use crate::metrics::Metrics;
use crate::notices::SinkNotices;
use crate::render::{self, FIELD_MANAGER, deployment_name};
use crate::scaling;
use crate::settings::Settings;
use spillway_api::condition::{self as conditions, Desired, Reason, Status};

mod accept;
mod cleanup;
mod processor;
mod status;
mod streams;

use accept::*;
pub use accept::{
    Rejection, effective_path, path_holder, processor_secret_problem, secret_ref_problem,
    secret_refs,
};
use cleanup::*;
use processor::*;
use status::*;
pub use status::{all_conditions, processor_condition};
pub use streams::payload_fits;
use streams::*;

/// The finalizer that holds a deleted endpoint until its NATS objects are
/// cleaned up.
pub const FINALIZER: &str = "spillway.dev/cleanup";
/// Longest a reconcile waits for the caches' initial listing.
const STORE_WAIT: Duration = Duration::from_secs(10);
/// KEDA's ScaledObject CRD.
pub const KEDA_CRD: &str = "scaledobjects.keda.sh";

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// JetStream access.
    pub js: Js,
    /// Operator configuration.
    pub settings: Settings,
    /// Event recorder.
    pub recorder: Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// All WebhookEndpoints (for path conflicts).
    pub endpoints: Store<WebhookEndpoint>,
    /// Processor Deployments managed by the operator.
    pub deployments: Store<Deployment>,
    /// What the operator remembers per endpoint, by uid (forgotten when
    /// it is cleaned up).
    state: Mutex<HashMap<String, EndpointState>>,
    retrigger: mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
    /// What processors reported about the sinks (for `SinkAvailable`).
    pub sink_notices: Arc<SinkNotices>,
    /// Subscriptions that wake endpoints at zero replicas.
    pub wakers: crate::wake::Wakers,
    /// Since when every processor has read the current stored format
    /// (`processor::stored_format`).
    readers_ready_since: Mutex<Option<Instant>>,
}

/// What the operator remembers about one endpoint between reconciles.
#[derive(Debug, Default)]
struct EndpointState {
    /// Consecutive failed reconciles (the error policy's backoff).
    reconcile_failures: u32,
    /// Consecutive syncs that found NATS unavailable (the requeue backoff).
    nats_failures: u32,
    /// Builtin scaling's memory (cooldown).
    scale: scaling::State,
    /// The status last written. The operator is the only writer of status,
    /// so this is at least as new as the cached object, which can lag behind
    /// our own write when another trigger (e.g. the Deployment) fires first;
    /// comparing against it avoids writing the same status twice.
    written: Option<WebhookEndpointStatus>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// Assemble the context; `retrigger` asks the controller to reconcile
    /// an endpoint again (used when a path is freed).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        client: Client,
        js: Js,
        settings: Settings,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        endpoints: Store<WebhookEndpoint>,
        deployments: Store<Deployment>,
        retrigger: mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
    ) -> Self {
        Self {
            client,
            js,
            sink_notices: Arc::new(SinkNotices::new(settings.sink_gone_quiet_period)),
            settings,
            recorder,
            metrics,
            endpoints,
            deployments,
            state: Mutex::default(),
            retrigger,
            wakers: crate::wake::Wakers::default(),
            readers_ready_since: Mutex::new(None),
        }
    }

    /// Read or change what is remembered about the endpoint `uid`.
    fn with_state<R>(&self, uid: &str, f: impl FnOnce(&mut EndpointState) -> R) -> R {
        let mut all = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(uid.to_owned()).or_default())
    }

    /// Change what is remembered about `uid`, only if anything is.
    fn if_known(&self, uid: &str, f: impl FnOnce(&mut EndpointState)) {
        let mut all = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.get_mut(uid) {
            f(s);
        }
    }

    /// Forget the endpoint `uid` (deleted).
    fn forget(&self, uid: &str) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    async fn event(&self, ep: &WebhookEndpoint, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &ep.object_ref(&())).await {
            warn!(endpoint = %key(ep), error = %e, "could not publish event");
        }
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

fn key(ep: &WebhookEndpoint) -> String {
    format!("{}/{}", ep.namespace().unwrap_or_default(), ep.name_any())
}

/// Errors that end a reconcile (and requeue it with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// Adding or removing the finalizer, or the wrapped step, failed.
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// NATS cleanup of a deleted endpoint has to wait for NATS.
    #[error("cleanup of {endpoint} waits for NATS: {source}")]
    CleanupPending {
        /// `namespace/name`.
        endpoint: String,
        /// Why.
        source: NatsError,
    },
    /// The Deployment could not be rendered.
    #[error("rendering the processor Deployment: {0}")]
    Render(String),
}

impl Error {
    /// Short reason for metrics and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.reason(),
                _ => "FinalizerError",
            },
            Error::CleanupPending { .. } => "CleanupPending",
            Error::Render(_) => "RenderError",
        }
    }
}

/// Reconcile one endpoint (entry point for the Controller).
pub async fn reconcile(ep: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let ns = ep.namespace().unwrap_or_default();
    let api: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = ep.uid().unwrap_or_default();
    let result = finalizer(&api, FINALIZER, ep, |event| async {
        match event {
            Finalizer::Apply(ep) => apply(ep, ctx.clone()).await,
            Finalizer::Cleanup(ep) => cleanup(ep, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(result.is_ok(), start.elapsed());
    if result.is_ok() {
        ctx.if_known(&uid, |s| s.reconcile_failures = 0);
    }
    result
}

/// Exponential backoff for the `n`th consecutive failure: 1 s, 2 s, 4 s …
/// capped at `cap`.
pub fn backoff(n: u32, cap: Duration) -> Duration {
    let secs = 1u64 << n.saturating_sub(1).min(16);
    Duration::from_secs(secs).min(cap)
}

/// On error: log a warning, count it, publish a Warning Event, and requeue
/// with per-endpoint exponential backoff.
pub fn error_policy(ep: Arc<WebhookEndpoint>, err: &Error, ctx: Arc<Context>) -> Action {
    let k = key(&ep);
    let n = ctx.with_state(&ep.uid().unwrap_or_default(), |s| {
        s.reconcile_failures += 1;
        s.reconcile_failures
    });
    let reason = err.reason();
    warn!(endpoint = %k, reason, error = %err, attempt = n, "reconcile failed");
    ctx.metrics.error(reason);
    let note = err.to_string();
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        ctx2.event(&ep, EventType::Warning, reason, note).await;
    });
    Action::requeue(backoff(n, Duration::from_secs(300)))
}

async fn apply(ep: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let k = key(&ep);
    let names = EndpointNames::new(&ns, &name);
    let spec = &ep.spec;
    let uid = ep.uid().unwrap_or_default();
    let old = ctx
        .with_state(&uid, |s| s.written.clone())
        .or_else(|| ep.status.clone())
        .unwrap_or_default();
    let resync = ctx.settings.resync_interval;
    let mut requeue = resync;
    // What this reconcile's JetStream sync read, for the gauges.
    let mut counts = None;

    let mut status = WebhookEndpointStatus {
        observed_generation: ep.metadata.generation,
        conditions: Vec::new(),
        path: Some(effective_path(&ep)),
        stream: Some(names.stream()),
        dead_letter_stream: spec
            .processor
            .dead_letter
            .enabled
            .then(|| names.dead_letter_stream()),
        backlog: old.backlog.clone(),
        dead_letters: old.dead_letters,
        replicas: old.replicas.clone(),
        partitions: old.partitions,
        // Never back to 1 once 2 (webhooks stored in format 2 stay so),
        // and then nothing to look at.
        stored_format: old
            .stored_format
            .filter(|f| *f >= spillway_api::stored::CURRENT)
            .or_else(|| {
                processor::stored_format(
                    &ctx.deployments,
                    &ctx.readers_ready_since,
                    ctx.settings.stored_format_settle,
                )
                .filter(|f| *f > 1)
            })
            .or(old.stored_format),
    };

    let parts = match accept(&ep, &ctx).await? {
        Err(rej) => {
            requeue = resync.min(Duration::from_secs(10));
            vec![
                Desired::new(ACCEPTED, Status::False, rej.reason, rej.message),
                Desired::new(
                    STREAM_READY,
                    Status::Unknown,
                    Reason::NotAccepted,
                    "waiting for the endpoint to be accepted",
                ),
                Desired::new(
                    PROCESSOR_READY,
                    Status::Unknown,
                    Reason::NotAccepted,
                    "waiting for the endpoint to be accepted",
                ),
            ]
        }
        Ok(timings) => {
            let accepted = Desired::new(
                ACCEPTED,
                Status::True,
                Reason::Accepted,
                "spec, Secrets and path are valid",
            );
            // JetStream.
            let (stream_cond, synced) = match ctx.js.sync(&names, spec, &timings).await {
                Ok(s) => (stream_ready(&names, &s), Some(s)),
                Err(e) => {
                    if matches!(e, SyncError::Unavailable(_)) {
                        let n = ctx.with_state(&uid, |s| {
                            s.nats_failures += 1;
                            s.nats_failures
                        });
                        requeue = requeue.min(backoff(n, resync));
                    }
                    ctx.metrics.error(e.reason().as_str());
                    (
                        Desired::new(STREAM_READY, Status::False, e.reason(), e.to_string()),
                        None,
                    )
                }
            };
            if let Some(s) = &synced {
                ctx.with_state(&uid, |s| s.nats_failures = 0);
                counts = Some(synced_counts(s, time::OffsetDateTime::now_utc()));
                report_created(&ep, &ctx, &old, s, &stream_cond).await;
                // Once per generation (not per resync: no idle writes).
                if old.observed_generation != ep.metadata.generation {
                    warn_payload(&ep, &ctx).await;
                }
                status.backlog = Some(Backlog {
                    pending: s.backlog.pending,
                    ack_pending: s.backlog.ack_pending,
                    redelivered: s.backlog.redelivered,
                    retrying: s.backlog.retrying,
                });
                status.dead_letters = s.dead_letters;
                // The partition consumers that exist: the gateway uses
                // these.
                status.partitions = s.partitions;
            }
            // Processor: for the partitions that exist (a larger
            // ordering.partitions may wait, or its sync may have failed).
            let serve = serving(&ep, status.partitions);
            let (proc_cond, replicas, scale_due) =
                processor(&serve, &ctx, &names, &timings, synced.as_ref()).await?;
            if let Some(due) = scale_due {
                requeue = requeue.min(due + Duration::from_millis(200));
            }
            status.replicas = Some(replicas);
            vec![accepted, stream_cond, proc_cond]
        }
    };

    let mut desired = all_conditions(parts, spec.suspend, spec.processor.paused);
    // Reported by the processors through NATS; not part of Ready.
    let (sink_cond, recheck) = ctx.sink_notices.condition(
        &k,
        &render::sink_url(&ep)
            .map(|u| redact_url(&u))
            .unwrap_or_default(),
        spec.processor.dead_letter.enabled,
        old.conditions.iter().find(|c| c.type_ == SINK_AVAILABLE),
        Timestamp::now(),
    );
    if let Some(r) = recheck {
        requeue = requeue.min(r + Duration::from_secs(1));
    }
    desired.push(sink_cond);
    let now = Time(Timestamp::now());
    status.conditions = conditions::merge(&old.conditions, &desired, ep.metadata.generation, &now);
    ctx.metrics.set_endpoint(
        &k,
        Some(crate::metrics::EndpointState {
            ready: status
                .conditions
                .iter()
                .any(|c| c.type_ == READY && c.status == "True"),
            synced: counts,
        }),
    );
    ctx.metrics.set_conditions(
        &k,
        Some(
            status
                .conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect(),
        ),
    );

    if status != old {
        write_status(&ep, &ctx, &old, status).await?;
    }
    Ok(Action::requeue(requeue))
}

/// Endpoints for unit tests, built through the real types.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub(crate) fn ep(
        ns: &str,
        name: &str,
        created: i64,
        path: Option<&str>,
    ) -> Arc<WebhookEndpoint> {
        let mut e: WebhookEndpoint = serde_saphyr::from_str(&format!(
            r#"
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: {name}, namespace: {ns}, uid: {ns}-{name}}}
spec:
  verification: {{scheme: none}}
  processor: {{sink: {{url: "http://x/"}}}}
"#
        ))
        .unwrap();
        e.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        e.spec.path = path.map(String::from);
        Arc::new(e)
    }
}

/// StreamReady after a successful sync: full (the gateway answers 503
/// until the backlog drains), else waiting to apply a partition change,
/// else held by consumers not Spillway's, else ready. What foreign
/// consumers hold is said in a full stream's message too (often why it is
/// full).
pub(crate) fn stream_ready(names: &EndpointNames, s: &Synced) -> Desired {
    let foreign = foreign_holding(&names.stream(), &s.foreign);
    match (&s.backlog_full, &s.partitions_waiting, foreign) {
        (Some(why), _, foreign) => Desired::new(
            STREAM_READY,
            Status::False,
            Reason::BacklogFull,
            match foreign {
                Some(f) => format!("{why}; {f}"),
                None => why.clone(),
            },
        ),
        (None, Some(why), _) => Desired::new(
            STREAM_READY,
            Status::True,
            Reason::PartitionsChangeWaiting,
            why.clone(),
        ),
        (None, None, Some(f)) => Desired::new(
            STREAM_READY,
            Status::True,
            Reason::ForeignConsumerHolding,
            f,
        ),
        (None, None, None) => Desired::new(
            STREAM_READY,
            Status::True,
            Reason::StreamReady,
            format!("stream {} and its consumers are in place", names.stream()),
        ),
    }
}

/// The gauges' view of a sync at `now`: the oldest webhook's age counts
/// only while some are undelivered.
pub(crate) fn synced_counts(
    s: &crate::jetstream::Synced,
    now: time::OffsetDateTime,
) -> crate::metrics::SyncedCounts {
    let b = &s.backlog;
    let undelivered = b.pending + b.ack_pending > 0;
    crate::metrics::SyncedCounts {
        backlog: b.pending,
        in_flight: b.ack_pending,
        retrying: b.retrying,
        dead_letters: s.dead_letters.unwrap_or(0),
        oldest_seconds: match s.oldest {
            Some(t) if undelivered => u64::try_from((now - t).whole_seconds()).unwrap_or(0),
            _ => 0,
        },
        stream_fill_percent: s.fill_percent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::ep;

    #[test]
    fn stream_ready_says_what_holds_the_work_stream() {
        let names = EndpointNames::new("ns", "gh");
        // Full, partitions waiting, a foreign consumer holding → what
        // StreamReady says (and what its message contains).
        struct Case {
            full: bool,
            waiting: bool,
            foreign: bool,
            want: (Status, Reason),
            says: &'static [&'static str],
        }
        let case = |full, waiting, foreign, want, says| Case {
            full,
            waiting,
            foreign,
            want,
            says,
        };
        let (ready, holding, partitions, full) = (
            (Status::True, Reason::StreamReady),
            (Status::True, Reason::ForeignConsumerHolding),
            (Status::True, Reason::PartitionsChangeWaiting),
            (Status::False, Reason::BacklogFull),
        );
        for c in [
            case(false, false, false, ready, &["in place"]),
            case(false, false, true, holding, &["debugging (10)"]),
            case(false, true, true, partitions, &["partitions wait"]),
            case(true, false, false, full, &["undelivered"]),
            case(true, true, true, full, &["undelivered", "debugging (10)"]),
        ] {
            let synced = Synced {
                backlog_full: c.full.then(|| "full of undelivered webhooks".to_owned()),
                partitions_waiting: c.waiting.then(|| "partitions wait".to_owned()),
                foreign: if c.foreign {
                    vec![crate::jetstream::ForeignConsumer {
                        name: "debugging".into(),
                        waiting: 10,
                    }]
                } else {
                    Vec::new()
                },
                ..Default::default()
            };
            let d = stream_ready(&names, &synced);
            let at = (c.full, c.waiting, c.foreign);
            assert_eq!((d.status, d.reason), c.want, "{at:?}");
            for s in c.says {
                assert!(d.message.contains(s), "{at:?}: {}: {s}", d.message);
            }
        }
    }

    #[test]
    fn the_oldest_age_counts_only_while_webhooks_wait() {
        let now = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let synced =
            |pending: u64, ack_pending: u64, oldest: Option<i64>| crate::jetstream::Synced {
                backlog: crate::jetstream::Backlog {
                    pending,
                    ack_pending,
                    ..Default::default()
                },
                dead_letters: Some(4),
                oldest: oldest.map(|s| time::OffsetDateTime::from_unix_timestamp(s).unwrap()),
                ..Default::default()
            };
        let c = synced_counts(&synced(3, 1, Some(999_880)), now);
        assert_eq!(
            (c.backlog, c.in_flight, c.dead_letters, c.oldest_seconds),
            (3, 1, 4, 120)
        );
        // Held only until the history confirms its copies: nothing waits.
        assert_eq!(
            synced_counts(&synced(0, 0, Some(999_999)), now).oldest_seconds,
            0
        );
        assert_eq!(synced_counts(&synced(2, 0, None), now).oldest_seconds, 0);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(1, cap), Duration::from_secs(1));
        assert_eq!(backoff(3, cap), Duration::from_secs(4));
        assert_eq!(backoff(50, cap), cap);
    }

    /// API server unavailable (nothing listens on the port): the reconcile
    /// fails with a typed error, nothing panics, and the error policy backs
    /// off 1 s, 2 s, 4 s … per endpoint.
    #[tokio::test]
    async fn api_server_down_fails_softly_with_backoff() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        cfg.connect_timeout = Some(Duration::from_millis(500));
        let client = Client::try_from(cfg).unwrap();
        let mut settings = Settings::defaults();
        settings.nats.url = Some(format!("nats://127.0.0.1:{port}"));
        let nats = crate::connect_nats(&settings).await.unwrap();
        let js = Js::new(nats, Duration::from_millis(200));
        let recorder = Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "test".into(),
                instance: None,
            },
        );
        let (tx, _rx) = mpsc::unbounded_channel();
        let ctx = Arc::new(Context::new(
            client,
            js,
            settings,
            recorder,
            Arc::new(Metrics::new()),
            kube::runtime::reflector::store().0,
            kube::runtime::reflector::store().0,
            tx,
        ));
        // With the finalizer present the reconcile goes on to read Secrets.
        let mut e = (*ep("ns", "x", 1, None)).clone();
        e.spec.verification =
            serde_saphyr::from_str("{scheme: github, secretRefs: [{name: gh, key: secret}]}")
                .unwrap();
        e.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let e = Arc::new(e);
        let err = reconcile(e.clone(), ctx.clone()).await.unwrap_err();
        assert_eq!(err.reason(), "KubernetesApiError", "{err}");
        let actions: Vec<Action> = (0..4)
            .map(|_| error_policy(e.clone(), &err, ctx.clone()))
            .collect();
        assert_eq!(
            actions,
            [1, 2, 4, 8].map(|s| Action::requeue(Duration::from_secs(s)))
        );
        assert!(
            ctx.metrics
                .render()
                .contains(r#"reason="KubernetesApiError""#)
        );
        // Without the finalizer, adding it fails the same soft way.
        let err = reconcile(ep("ns", "y", 1, None), ctx.clone())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "FinalizerError", "{err}");
    }
}

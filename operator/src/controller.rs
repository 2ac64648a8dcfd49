//! The WebhookEndpoint reconciler: acceptance checks, JetStream objects,
//! processor Deployment, scaling, status, Events and cleanup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use spillway_api::condition::{ACCEPTED, PROCESSOR_READY, SINK_AVAILABLE, STREAM_READY};
use spillway_api::names::{EndpointNames, default_path, path_precedence};
use spillway_api::validate::{Timings, check};
use spillway_api::wire::redact_url;
use spillway_api::{
    Autoscaler, Backlog, DeletionPolicy, ReplicaStatus, Scheme, SecretKeyRef, WebhookEndpoint,
    WebhookEndpointStatus,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::conditions::{self, Desired, Status};
use crate::jetstream::{Js, Migration, NatsError, SyncError, Synced, is_managed_consumer};
use crate::metrics::Metrics;
use crate::notices::SinkNotices;
use crate::render::{self, FIELD_MANAGER, deployment_name};
use crate::scaling;
use crate::settings::Settings;

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
    scale: Mutex<HashMap<String, scaling::State>>,
    failures: Mutex<HashMap<String, u32>>,
    /// The status last written per endpoint uid. The operator is the only
    /// writer of status, so this is at least as new as the cached object,
    /// which can lag behind our own write when another trigger (e.g. the
    /// Deployment) fires first; comparing against it avoids writing the same
    /// status twice.
    written: Mutex<HashMap<String, WebhookEndpointStatus>>,
    retrigger: mpsc::UnboundedSender<ObjectRef<WebhookEndpoint>>,
    /// What processors reported about the sinks (for `SinkAvailable`).
    pub sink_notices: Arc<SinkNotices>,
    /// Subscriptions that wake endpoints at zero replicas.
    pub wakers: crate::wake::Wakers,
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
            scale: Mutex::default(),
            failures: Mutex::default(),
            written: Mutex::default(),
            retrigger,
            wakers: crate::wake::Wakers::default(),
        }
    }

    fn failures(&self, key: &str, bump: bool) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if bump {
            let n = f.entry(key.to_owned()).or_default();
            *n += 1;
            *n
        } else {
            f.remove(key);
            0
        }
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
    let k = key(&ep);
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
        ctx.failures(&k, false);
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
    let n = ctx.failures(&k, true);
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

/// Why an endpoint is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// `PathConflict`, `SecretNotFound`, `SecretKeyMissing` or `InvalidSpec`.
    pub reason: &'static str,
    /// What to do about it.
    pub message: String,
}

/// The effective path of an endpoint.
pub fn effective_path(ep: &WebhookEndpoint) -> String {
    ep.spec
        .path
        .clone()
        .unwrap_or_else(|| default_path(&ep.namespace().unwrap_or_default(), &ep.name_any()))
}

/// The older of two endpoints keeps a contested path (ranked by
/// [`path_precedence`], as in the gateway). Returns the endpoint in `others`
/// that holds `ep`'s path, if any.
pub fn path_holder<'a>(
    ep: &WebhookEndpoint,
    others: &'a [Arc<WebhookEndpoint>],
) -> Option<&'a WebhookEndpoint> {
    let path = effective_path(ep);
    let mine = precedence(ep);
    others
        .iter()
        .map(|o| o.as_ref())
        .filter(|o| o.uid() != ep.uid() && o.metadata.deletion_timestamp.is_none())
        .filter(|o| effective_path(o) == path)
        .filter(|o| precedence(o) < mine)
        .min_by_key(|o| precedence(o))
}

fn precedence(e: &WebhookEndpoint) -> (i64, &str, &str) {
    path_precedence(
        e.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second()),
        e.metadata.namespace.as_deref().unwrap_or_default(),
        e.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// Every Secret reference of the spec, with where it is referenced.
pub fn secret_refs(ep: &WebhookEndpoint) -> Vec<(String, &SecretKeyRef)> {
    let s = &ep.spec;
    let mut out: Vec<(String, &SecretKeyRef)> = s
        .verification
        .secret_refs
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("verification.secretRefs[{i}]"), r))
        .collect();
    if let Some(h) = &s.handshake {
        if let Some(r) = &h.verify_token_secret_ref {
            out.push(("handshake.verifyTokenSecretRef".into(), r));
        }
        if let Some(r) = &h.secret_ref {
            out.push(("handshake.secretRef".into(), r));
        }
    }
    if let Some(sig) = &s.processor.signing {
        out.push(("processor.signing.secretRef".into(), &sig.secret_ref));
    }
    out
}

/// Why processor pods cannot start for want of a NATS Secret of the
/// operator's settings (`found`: that Secret in namespace `ns`, if it
/// exists): a `ProcessorReady` reason and message, or `None` when it is
/// there with every key.
pub fn processor_secret_problem(
    ns: &str,
    wanted: &render::ProcessorSecret,
    found: Option<&Secret>,
) -> Option<(&'static str, String)> {
    let Some(s) = found else {
        return Some((
            "NatsSecretNotFound",
            format!(
                "Secret {ns}/{} (operator setting {}) does not exist: processor pods cannot start until it does",
                wanted.name, wanted.flag
            ),
        ));
    };
    let missing: Vec<&str> = wanted
        .keys
        .iter()
        .filter(|k| {
            !(s.data.as_ref().is_some_and(|d| d.contains_key(*k))
                || s.string_data.as_ref().is_some_and(|d| d.contains_key(*k)))
        })
        .map(String::as_str)
        .collect();
    (!missing.is_empty()).then(|| {
        (
            "NatsSecretKeyMissing",
            format!(
                "Secret {ns}/{} (operator setting {}) has no key {}: processor pods cannot start until it does",
                wanted.name,
                wanted.flag,
                missing.join(", ")
            ),
        )
    })
}

/// The first processor NATS Secret missing (or lacking a key) in `ns`.
/// Errors reading a Secret skip the check: it only explains pods that are
/// not ready.
async fn missing_processor_secret(ns: &str, ctx: &Context) -> Option<(&'static str, String)> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for wanted in render::processor_nats_secrets(&ctx.settings) {
        match secrets.get_opt(&wanted.name).await {
            Ok(found) => {
                if let Some(p) = processor_secret_problem(ns, &wanted, found.as_ref()) {
                    return Some(p);
                }
            }
            Err(e) => {
                debug!(namespace = %ns, secret = %wanted.name, error = %e, "cannot check a processor NATS Secret");
            }
        }
    }
    None
}

async fn accept(ep: &WebhookEndpoint, ctx: &Context) -> Result<Result<Timings, Rejection>, Error> {
    let timings = match check(&ep.spec) {
        Ok(t) => t,
        Err(problems) => {
            return Ok(Err(Rejection {
                reason: "InvalidSpec",
                message: problems.join("; "),
            }));
        }
    };
    if let Err(message) = render::user_template(ep) {
        return Ok(Err(Rejection {
            reason: "InvalidSpec",
            message,
        }));
    }
    let ns = ep.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut fetched: HashMap<String, Option<Secret>> = HashMap::new();
    for (field, r) in secret_refs(ep) {
        if !fetched.contains_key(&r.name) {
            fetched.insert(r.name.clone(), secrets.get_opt(&r.name).await?);
        }
        match &fetched[&r.name] {
            None => {
                return Ok(Err(Rejection {
                    reason: "SecretNotFound",
                    message: format!(
                        "Secret {ns}/{} (referenced by {field}) does not exist",
                        r.name
                    ),
                }));
            }
            Some(s) => {
                let value = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|v| v.0.as_slice())
                    .or_else(|| {
                        s.string_data
                            .as_ref()
                            .and_then(|d| d.get(&r.key))
                            .map(|v| v.as_bytes())
                    });
                let Some(value) = value else {
                    return Ok(Err(Rejection {
                        reason: "SecretKeyMissing",
                        message: format!(
                            "Secret {ns}/{} has no key {:?} (referenced by {field})",
                            r.name, r.key
                        ),
                    }));
                };
                let whsec = field == "processor.signing.secretRef"
                    || (field.starts_with("verification.")
                        && ep.spec.verification.scheme == Scheme::StandardWebhooks);
                // The same parse as the gateway's and the processor's.
                match spillway_api::secret::key(value, whsec) {
                    Ok(_) => {}
                    Err(spillway_api::secret::KeyError::Empty) => {
                        return Ok(Err(Rejection {
                            reason: "SecretKeyEmpty",
                            message: format!(
                                "Secret {ns}/{} key {:?} (referenced by {field}) is empty; \
                                 the gateway does not use it (requests are answered 503 while no \
                                 secret of the endpoint has a value); put the secret in it",
                                r.name, r.key
                            ),
                        }));
                    }
                    Err(spillway_api::secret::KeyError::Whsec) => {
                        return Ok(Err(Rejection {
                            reason: "SecretKeyInvalid",
                            message: format!(
                                "Secret {ns}/{} key {:?} (referenced by {field}) starts with \
                                 whsec_ but the rest is not valid base64; the gateway cannot \
                                 use it (requests are answered 503); put the key as the \
                                 provider shows it, whsec_ followed by base64",
                                r.name, r.key
                            ),
                        }));
                    }
                }
            }
        }
    }
    // Judge paths only on a complete view of the endpoints.
    let _ = tokio::time::timeout(STORE_WAIT, ctx.endpoints.wait_until_ready()).await;
    if let Some(holder) = path_holder(ep, &ctx.endpoints.state()) {
        return Ok(Err(Rejection {
            reason: "PathConflict",
            message: format!(
                "path {} is already served by the older endpoint {}; set a different spec.path",
                effective_path(ep),
                key(holder)
            ),
        }));
    }
    Ok(Ok(timings))
}

/// ProcessorReady from the desired and ready replica counts.
pub fn processor_condition(paused: bool, desired: Option<i32>, ready: i32) -> Desired {
    let d = |s, r: &str, m: String| Desired::new(PROCESSOR_READY, s, r, m);
    if paused {
        return d(
            Status::True,
            "Paused",
            "processor paused: webhooks are stored and delivered once resumed".into(),
        );
    }
    match desired {
        Some(0) => d(
            Status::True,
            "ScaledToZero",
            "no backlog: scaled to zero replicas".into(),
        ),
        Some(n) if ready >= 1 => d(
            Status::True,
            "Available",
            format!("{ready}/{n} processor replicas ready"),
        ),
        Some(n) => d(
            Status::False,
            "PodsNotReady",
            format!("0/{n} processor replicas ready"),
        ),
        None if ready >= 1 => d(
            Status::True,
            "Available",
            format!("{ready} processor replicas ready"),
        ),
        None => d(
            Status::False,
            "PodsNotReady",
            "no processor replica is ready".into(),
        ),
    }
}

/// All four conditions, Ready last, with Ready's reason noting suspension or
/// pause when everything else is fine.
pub fn all_conditions(parts: Vec<Desired>, suspended: bool, paused: bool) -> Vec<Desired> {
    let mut ready = conditions::ready(&parts);
    if ready.status == Status::True && suspended {
        ready.reason = "Suspended".into();
        ready.message = "suspended: the gateway answers 503 with Retry-After; stored webhooks are still delivered".into();
    } else if ready.status == Status::True && paused {
        ready.reason = "Paused".into();
        ready.message = "delivery paused: webhooks are accepted and stored".into();
    }
    let mut all = vec![ready];
    all.extend(parts);
    all
}

async fn apply(ep: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let k = key(&ep);
    let names = EndpointNames::new(&ns, &name);
    let spec = &ep.spec;
    let uid = ep.uid().unwrap_or_default();
    let old = ctx
        .written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&uid)
        .cloned()
        .or_else(|| ep.status.clone())
        .unwrap_or_default();
    let resync = ctx.settings.resync_interval;
    let mut requeue = resync;

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
    };

    let parts = match accept(&ep, &ctx).await? {
        Err(rej) => {
            requeue = resync.min(Duration::from_secs(10));
            vec![
                Desired::new(ACCEPTED, Status::False, rej.reason, rej.message),
                Desired::new(
                    STREAM_READY,
                    Status::Unknown,
                    "NotAccepted",
                    "waiting for the endpoint to be accepted",
                ),
                Desired::new(
                    PROCESSOR_READY,
                    Status::Unknown,
                    "NotAccepted",
                    "waiting for the endpoint to be accepted",
                ),
            ]
        }
        Ok(timings) => {
            let accepted = Desired::new(
                ACCEPTED,
                Status::True,
                "Accepted",
                "spec, Secrets and path are valid",
            );
            // JetStream.
            let (stream_cond, synced) = match ctx.js.sync(&names, spec, &timings).await {
                Ok(s) => (
                    match &s.backlog_full {
                        // Full of undelivered webhooks: the gateway answers
                        // 503 until the backlog drains.
                        Some(why) => {
                            Desired::new(STREAM_READY, Status::False, "BacklogFull", why.clone())
                        }
                        None => match &s.partitions_waiting {
                            Some(why) => Desired::new(
                                STREAM_READY,
                                Status::True,
                                "PartitionsChangeWaiting",
                                why.clone(),
                            ),
                            None => Desired::new(
                                STREAM_READY,
                                Status::True,
                                "StreamReady",
                                format!("stream {} and its consumers are in place", names.stream()),
                            ),
                        },
                    },
                    Some(s),
                ),
                Err(e) => {
                    if matches!(e, SyncError::Unavailable(_)) {
                        let n = ctx.failures(&format!("nats:{k}"), true);
                        requeue = requeue.min(backoff(n, resync));
                    }
                    ctx.metrics.error(e.reason());
                    (
                        Desired::new(STREAM_READY, Status::False, e.reason(), e.to_string()),
                        None,
                    )
                }
            };
            if let Some(s) = &synced {
                ctx.failures(&format!("nats:{k}"), false);
                report_created(&ep, &ctx, &old, s).await;
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
        for (type_, from, to) in conditions::transitions(&old.conditions, &status.conditions) {
            // A first status is not a transition unless it is a failure:
            // saves four Events per new endpoint.
            if from.is_none() && to != "False" {
                continue;
            }
            let c = status
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .expect("from the list");
            let et = if to == "False" {
                EventType::Warning
            } else {
                EventType::Normal
            };
            info!(endpoint = %k, condition = %type_, from = ?from, to = %to, reason = %c.reason, "condition changed");
            ctx.event(
                &ep,
                et,
                &c.reason,
                format!("{type_} is {to}: {}", c.message),
            )
            .await;
        }
        let api: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "spillway.dev/v1alpha1",
            "kind": "WebhookEndpoint",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        ctx.metrics.status_written();
        ctx.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(uid, status);
    }
    Ok(Action::requeue(requeue))
}

async fn report_created(
    ep: &WebhookEndpoint,
    ctx: &Context,
    old: &WebhookEndpointStatus,
    s: &Synced,
) {
    let was_ready = old
        .conditions
        .iter()
        .any(|c| c.type_ == STREAM_READY && c.status == "True");
    let was_full = old
        .conditions
        .iter()
        .any(|c| c.type_ == STREAM_READY && c.reason == "BacklogFull");
    if let (Some(why), false) = (&s.backlog_full, was_full) {
        warn!(endpoint = %key(ep), %why, "backlog full: refusing new webhooks");
        ctx.event(ep, EventType::Warning, "BacklogFull", why.clone())
            .await;
    }
    match s.migration {
        Some(Migration::Started) => {
            info!(endpoint = %key(ep), "migrating to the work/history stream layout");
            ctx.event(
                ep,
                EventType::Normal,
                "Migrating",
                format!(
                    "moved intake to work stream {} (history: {}); stream {} drains what it holds, then is deleted",
                    s_names(ep).stream(),
                    s_names(ep).history_stream(),
                    s_names(ep).legacy_stream()
                ),
            )
            .await;
            return;
        }
        Some(Migration::Finished) => {
            info!(endpoint = %key(ep), "migration finished");
            ctx.event(
                ep,
                EventType::Normal,
                "Migrated",
                format!(
                    "stream {} delivered and copied to the history; deleted",
                    s_names(ep).legacy_stream()
                ),
            )
            .await;
        }
        None => {}
    }
    if !s.created.is_empty() {
        let streams = s.created.join(" and ");
        if was_ready {
            warn!(endpoint = %key(ep), streams, "streams were missing and have been recreated");
            ctx.event(
                ep,
                EventType::Warning,
                "StreamRecreated",
                format!(
                    "JetStream stream(s) {streams} deleted outside Spillway; recreated (empty)"
                ),
            )
            .await;
        } else {
            ctx.event(
                ep,
                EventType::Normal,
                "StreamCreated",
                format!("created JetStream stream(s) {streams}"),
            )
            .await;
        }
    }
    if !s.updated.is_empty() {
        ctx.event(
            ep,
            EventType::Normal,
            "Updated",
            format!("updated {} in place", s.updated.join(", ")),
        )
        .await;
    }
}

fn s_names(ep: &WebhookEndpoint) -> EndpointNames {
    EndpointNames::new(&ep.namespace().unwrap_or_default(), &ep.name_any())
}

/// Largest headers the gateway adds to a body (original headers kept under
/// `Spillway-Orig-*` plus its own), for the max_payload check.
const HEADER_ALLOWANCE: u64 = 16 * 1024;

/// Whether NATS can carry the largest body this endpoint accepts.
pub fn payload_fits(max_payload: usize, max_body_bytes: u64) -> bool {
    max_payload == 0 || max_payload as u64 >= max_body_bytes + HEADER_ALLOWANCE
}

async fn warn_payload(ep: &WebhookEndpoint, ctx: &Context) {
    let max = ctx.js.max_payload();
    let body = ep.spec.ingress.max_body_bytes;
    if !payload_fits(max, body) {
        ctx.event(
            ep,
            EventType::Warning,
            "NatsMaxPayloadTooSmall",
            format!(
                "ingress.maxBodyBytes is {body} but the NATS server's max_payload is {max}: bodies near the limit cannot be stored (the gateway answers 5xx); raise max_payload above {} or lower maxBodyBytes",
                body + HEADER_ALLOWANCE
            ),
        )
        .await;
    }
}

/// Whether KEDA's CRD exists. Not being allowed to look (the Helm chart
/// grants it only with `operator.keda.enabled`) counts as not installed.
async fn keda_installed(ctx: &Context) -> Result<bool, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    match crds.get_opt(KEDA_CRD).await {
        Ok(found) => Ok(found.is_some()),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A Deployment by name, through `list` (the operator's RBAC has list and
/// watch on Deployments, not get).
async fn find_deployment(api: &Api<Deployment>, name: &str) -> Result<Option<Deployment>, Error> {
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    Ok(api.list(&lp).await?.items.into_iter().next())
}

fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// The KEDA ScaledObject scaling the processor on the consumers' lag.
pub fn scaled_object(
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    settings: &Settings,
) -> serde_json::Value {
    let r = &ep.spec.processor.replicas;
    let (min, max) = render::replica_bounds(&ep.spec.processor);
    let triggers: Vec<serde_json::Value> = render::consumer_names(ep, names)
        .iter()
        .map(|c| {
            let mut trigger = json!({
                "type": "nats-jetstream",
                "metadata": {
                    "natsServerMonitoringEndpoint": settings.nats_monitoring_endpoint,
                    "account": settings.keda_nats_account,
                    "stream": names.stream(),
                    "consumer": c,
                    "lagThreshold": r.target_backlog_per_replica.to_string(),
                    "useHttps": settings.keda_nats_use_https.to_string(),
                }
            });
            if let Some(auth) = &settings.keda_cluster_trigger_authentication {
                trigger["authenticationRef"] =
                    json!({"name": auth, "kind": "ClusterTriggerAuthentication"});
            }
            trigger
        })
        .collect();
    let mut annotations = serde_json::Map::new();
    if ep.spec.processor.paused {
        annotations.insert("autoscaling.keda.sh/paused-replicas".into(), json!("0"));
    }
    json!({
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {
            "name": deployment_name(&ep.name_any()),
            "namespace": ep.namespace(),
            "labels": render::labels(&ep.name_any()),
            "annotations": annotations,
            "ownerReferences": [render::owner_ref(ep)],
        },
        "spec": {
            "scaleTargetRef": {"name": deployment_name(&ep.name_any())},
            "minReplicaCount": min,
            "maxReplicaCount": max,
            "cooldownPeriod": settings.scale_down_cooldown.as_secs(),
            "triggers": triggers,
        }
    })
}

/// Scale, render and apply the processor Deployment. Returns the
/// ProcessorReady condition, the replica status and, when a scale-down is
/// pending, how long until it is due.
/// The endpoint as its processor serves it: an ordered endpoint with the
/// partitions whose consumers exist (`partitions`, from the sync or the
/// last status), when fewer than the spec asks for.
fn serving(ep: &WebhookEndpoint, partitions: Option<u16>) -> std::borrow::Cow<'_, WebhookEndpoint> {
    match (&ep.spec.ordering, partitions) {
        (Some(o), Some(n)) if n > 0 && n < o.partitions => {
            let mut e = ep.clone();
            if let Some(o) = e.spec.ordering.as_mut() {
                o.partitions = n;
            }
            std::borrow::Cow::Owned(e)
        }
        _ => std::borrow::Cow::Borrowed(ep),
    }
}

async fn processor(
    ep: &WebhookEndpoint,
    ctx: &Context,
    names: &EndpointNames,
    timings: &Timings,
    synced: Option<&Synced>,
) -> Result<(Desired, ReplicaStatus, Option<Duration>), Error> {
    let ns = ep.namespace().unwrap_or_default();
    let dname = deployment_name(&ep.name_any());
    let uid = ep.uid().unwrap_or_default();
    let p = &ep.spec.processor;
    // The current replica count matters after a restart: wait for the cache.
    let _ = tokio::time::timeout(STORE_WAIT, ctx.deployments.wait_until_ready()).await;
    let current = ctx
        .deployments
        .get(&ObjectRef::new(&dname).within(&ns))
        .filter(|d| {
            d.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.uid == uid)
        });

    let mut keda_missing = false;
    let use_keda = p.replicas.autoscaler == Autoscaler::Keda && {
        let ok = keda_installed(ctx).await?;
        keda_missing = !ok;
        ok
    };

    let (replicas, due) = if use_keda {
        ctx.wakers.disarm(&uid);
        // KEDA scales now: builtin scaling starts afresh if it comes back.
        ctx.scale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&uid);
        (None, None)
    } else {
        let (min, max) = render::replica_bounds(p);
        let input = scaling::Input {
            min,
            max,
            target_backlog_per_replica: p.replicas.target_backlog_per_replica,
            paused: p.paused,
            // Waiting retries need a pod to move them back when due, but
            // not more pods: they count as one.
            backlog: synced
                .map(|s| s.backlog.pending + s.backlog.ack_pending + s.backlog.retrying.min(1)),
        };
        let fallback = current.as_ref().and_then(|d| d.spec.replicas);
        let now = Instant::now();
        let cooldown = ctx.settings.scale_down_cooldown;
        let mut states = ctx.scale.lock().unwrap_or_else(|e| e.into_inner());
        let state = states.get(&uid).copied().unwrap_or_default();
        let (desired, next) = scaling::decide(&input, state, fallback, now, cooldown);
        if Some(desired) != fallback && fallback.is_some() {
            info!(endpoint = %key(ep), from = ?fallback, to = desired, backlog = ?input.backlog, "scaling processor");
        }
        states.insert(uid.clone(), next);
        drop(states);
        // At zero, the first webhook wakes it at once (not at the resync).
        if desired == 0 && !p.paused {
            ctx.wakers.arm(
                &uid,
                ctx.js.client(),
                names.stream_subjects(),
                ObjectRef::from_obj(ep),
                ctx.retrigger.clone(),
            );
        } else {
            ctx.wakers.disarm(&uid);
        }
        (
            Some(desired),
            scaling::scale_down_due_in(&next, now, cooldown),
        )
    };

    let want = render::deployment(
        ep,
        names,
        timings,
        &ctx.settings,
        replicas,
        synced.map_or(&[][..], |s| &s.legacy_consumers[..]),
    )
    .map_err(Error::Render)?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if current.is_none()
        && let Some(existing) = find_deployment(&deployments, &dname).await?
        && !is_ours(&existing)
    {
        // Never take over a Deployment someone else made.
        return Ok((
            Desired::new(
                PROCESSOR_READY,
                Status::False,
                "DeploymentConflict",
                format!(
                    "Deployment {ns}/{dname} exists and is not managed by Spillway; delete or rename it"
                ),
            ),
            ReplicaStatus::default(),
            None,
        ));
    }
    let was_keda = current.as_deref().is_some_and(render::scaled_by_keda);
    let scaled_objects = || {
        Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &ns, &scaled_object_resource())
    };
    if was_keda && !use_keda {
        // Back to builtin scaling: KEDA's HPA must not scale against it.
        // Before the Deployment loses its `keda` mark, so a failed delete
        // is tried again by the next reconcile.
        match scaled_objects()
            .delete(&dname, &DeleteParams::background())
            .await
        {
            Ok(_) => info!(endpoint = %key(ep), "deleted the KEDA ScaledObject (builtin scaling)"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if use_keda
        && !was_keda
        && let Some(r) = current.as_ref().and_then(|d| d.spec.replicas)
    {
        // Handing replicas over to KEDA: an apply that leaves out a field
        // the operator owns would remove it (back to 1 replica until the
        // HPA acts). Another manager holds the current count meanwhile.
        deployments
            .patch(
                &dname,
                &PatchParams::apply(render::HANDOVER_FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "metadata": {"name": dname},
                    "spec": {"replicas": r},
                })),
            )
            .await?;
    }
    let applied = match &current {
        Some(have) if render::up_to_date(have, &want) => have.clone(),
        _ => {
            let created = current.is_none();
            let d = deployments
                .patch(
                    &dname,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&want),
                )
                .await?;
            if created {
                ctx.event(
                    ep,
                    EventType::Normal,
                    "DeploymentCreated",
                    format!("created Deployment {dname}"),
                )
                .await;
            }
            Arc::new(d)
        }
    };
    if use_keda {
        scaled_objects()
            .patch(
                &dname,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(scaled_object(ep, names, &ctx.settings)),
            )
            .await?;
    }

    let ready = applied
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let spec_replicas = applied.spec.replicas;
    let desired = replicas.or(spec_replicas);
    let mut cond = processor_condition(p.paused, desired, ready);
    // Pods that are not ready may lack a NATS Secret the operator mounts
    // (the kubelet reports that only as a pod event): say so.
    if cond.status == Status::False
        && let Some((reason, message)) = missing_processor_secret(&ns, ctx).await
    {
        cond = Desired::new(PROCESSOR_READY, Status::False, reason, message);
    }
    if keda_missing {
        cond = Desired::new(
            PROCESSOR_READY,
            Status::False,
            "KedaNotInstalled",
            format!(
                "autoscaler keda was requested but KEDA's CRD {KEDA_CRD} is not installed (or the operator may not read it: Helm value operator.keda.enabled); install KEDA or set processor.replicas.autoscaler to builtin (scaling builtin meanwhile)"
            ),
        );
    }
    Ok((
        cond,
        ReplicaStatus {
            desired: desired.unwrap_or(0),
            ready,
        },
        due,
    ))
}

/// Whether a Deployment was made by the operator (possibly for an earlier
/// endpoint of the same name, which may be taken over).
fn is_ours(d: &Deployment) -> bool {
    d.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == "spillway-operator")
}

/// What cleanup does with the streams, for messages.
fn leftovers(names: &EndpointNames, policy: DeletionPolicy) -> String {
    match policy {
        DeletionPolicy::Retain => format!("consumers of stream {}", names.stream()),
        DeletionPolicy::Delete => format!(
            "streams {}, {}, {} and {} and their consumers",
            names.stream(),
            names.history_stream(),
            names.dead_letter_stream(),
            names.retry_stream()
        ),
    }
}

async fn nats_cleanup(
    js: &Js,
    names: &EndpointNames,
    policy: DeletionPolicy,
) -> Result<Vec<String>, NatsError> {
    // Retain keeps the consumers too: they remember what was delivered, so
    // an endpoint created again under the same name resumes there instead
    // of sending the retained history to its sink again. (Deleting a
    // stream deletes its consumers.)
    let mut done = Vec::new();
    if policy == DeletionPolicy::Delete {
        let stream = names.stream();
        for c in js.consumer_names(&stream).await? {
            if is_managed_consumer(&c) && js.delete_consumer(&stream, &c).await? {
                done.push(format!("consumer {stream}/{c}"));
            }
        }
        for s in [
            stream,
            names.history_stream(),
            names.legacy_stream(),
            names.dead_letter_stream(),
            names.retry_stream(),
        ] {
            if js.delete_stream(&s).await? {
                done.push(format!("stream {s}"));
            }
        }
    }
    Ok(done)
}

async fn cleanup(ep: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let k = key(&ep);
    let names = EndpointNames::new(&ns, &name);
    let policy = ep.spec.stream.deletion_policy;
    let dname = deployment_name(&name);

    // Stop the processor first so it does not pull from a consumer being
    // removed (garbage collection would get there too, later).
    // Only ours: a same-named Deployment someone else made is left alone.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = ep.uid().unwrap_or_default();
    ctx.wakers.disarm(&uid);
    if let Some(d) = find_deployment(&deployments, &dname).await?
        && is_ours(&d)
        && d.owner_references().iter().any(|o| o.uid == uid)
    {
        match deployments
            .delete(&dname, &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if ep.spec.processor.replicas.autoscaler == Autoscaler::Keda && keda_installed(&ctx).await? {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &ns, &scaled_object_resource());
        match api.delete(&dname, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    match nats_cleanup(&ctx.js, &names, policy).await {
        Ok(done) => {
            let kept = match policy {
                DeletionPolicy::Retain => format!(
                    "; streams {} and {} and their consumers retained (deletionPolicy Retain)",
                    names.stream(),
                    names.dead_letter_stream()
                ),
                DeletionPolicy::Delete => String::new(),
            };
            let what = if done.is_empty() {
                "nothing to delete".to_owned()
            } else {
                done.join(", ")
            };
            info!(endpoint = %k, "cleaned up: {what}{kept}");
            ctx.event(
                &ep,
                EventType::Normal,
                "CleanedUp",
                format!("deleted {what}{kept}"),
            )
            .await;
        }
        Err(e) => {
            let since = ep
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| Timestamp::now().duration_since(t.0).unsigned_abs())
                .unwrap_or_default();
            let limit = ctx.settings.cleanup_timeout;
            if since < limit {
                let note = format!(
                    "cannot clean up {} yet: {e}; retrying for up to {}",
                    leftovers(&names, policy),
                    spillway_api::duration::format(limit)
                );
                warn!(endpoint = %k, "{note}");
                ctx.event(&ep, EventType::Warning, "CleanupRetrying", note)
                    .await;
                return Err(Error::CleanupPending {
                    endpoint: k,
                    source: e,
                });
            }
            let note = format!(
                "gave up cleaning up after {}: {e}; left behind in NATS: {}; delete them by hand (e.g. `nats stream rm {}`)",
                spillway_api::duration::format(limit),
                leftovers(&names, policy),
                names.stream()
            );
            warn!(endpoint = %k, "{note}");
            ctx.metrics.error("CleanupAbandoned");
            ctx.event(&ep, EventType::Warning, "CleanupAbandoned", note)
                .await;
        }
    }

    ctx.metrics.set_conditions(&k, None);
    ctx.sink_notices.forget(&k);
    ctx.failures(&format!("nats:{k}"), false);
    ctx.written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&ep.uid().unwrap_or_default());
    if let Ok(mut s) = ctx.scale.lock() {
        s.remove(&ep.uid().unwrap_or_default());
    }
    // Endpoints waiting for this path may take it now.
    let path = effective_path(&ep);
    let waiting: Vec<ObjectRef<WebhookEndpoint>> = ctx
        .endpoints
        .state()
        .iter()
        .filter(|o| o.uid() != ep.uid() && effective_path(o) == path)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect();
    for r in waiting {
        let _ = ctx.retrigger.send(r);
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_nats_secrets_are_judged_by_name_and_keys() {
        let mut s = Settings::defaults();
        assert!(render::processor_nats_secrets(&s).is_empty());
        s.processor_nats_tls_ca_secret = Some("ca".into());
        s.processor_nats_tls_client_secret = Some("client".into());
        let wanted = render::processor_nats_secrets(&s);
        assert_eq!(
            wanted.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(),
            ["ca", "client"]
        );
        let secret = |keys: &[&str]| -> Secret {
            serde_json::from_value(json!({
                "metadata": {"name": "x"},
                "data": keys.iter().map(|k| (k.to_string(), "c2VjcmV0")).collect::<std::collections::BTreeMap<_, _>>(),
            }))
            .unwrap()
        };
        let (reason, msg) = processor_secret_problem("team", &wanted[0], None).unwrap();
        assert_eq!(reason, "NatsSecretNotFound");
        assert!(msg.contains("team/ca"), "{msg}");
        assert!(msg.contains("--processor-nats-tls-ca-secret"), "{msg}");
        assert_eq!(
            processor_secret_problem("team", &wanted[0], Some(&secret(&["ca.crt"]))),
            None
        );
        let (reason, msg) =
            processor_secret_problem("team", &wanted[1], Some(&secret(&["tls.crt"]))).unwrap();
        assert_eq!(reason, "NatsSecretKeyMissing");
        assert!(
            msg.contains("tls.key") && !msg.contains("c2VjcmV0"),
            "{msg}"
        );
        assert_eq!(
            processor_secret_problem("team", &wanted[1], Some(&secret(&["tls.crt", "tls.key"]))),
            None
        );
    }

    fn ep(ns: &str, name: &str, created: i64, path: Option<&str>) -> Arc<WebhookEndpoint> {
        let mut e: WebhookEndpoint = serde_yaml_ng::from_str(&format!(
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

    #[test]
    fn keda_triggers_use_the_configured_account_and_authentication() {
        let e = ep("team", "gh", 1, None);
        let names = EndpointNames::new("team", "gh");
        let mut settings = Settings::defaults();
        let so = scaled_object(&e, &names, &settings);
        let t = &so["spec"]["triggers"][0];
        assert_eq!(t["metadata"]["account"], "$G");
        assert_eq!(t["metadata"]["useHttps"], "false");
        assert!(t.get("authenticationRef").is_none());
        settings.keda_nats_account = "ACCOUNT_A".into();
        settings.keda_nats_use_https = true;
        settings.keda_cluster_trigger_authentication = Some("nats-monitoring".into());
        let so = scaled_object(&e, &names, &settings);
        let t = &so["spec"]["triggers"][0];
        assert_eq!(t["metadata"]["account"], "ACCOUNT_A");
        assert_eq!(t["metadata"]["useHttps"], "true");
        assert_eq!(
            t["authenticationRef"],
            json!({"name": "nats-monitoring", "kind": "ClusterTriggerAuthentication"})
        );
    }

    #[test]
    fn older_endpoint_keeps_the_path() {
        let a = ep("a", "x", 100, Some("/p"));
        let b = ep("b", "y", 200, Some("/p"));
        let c = ep("c", "z", 50, Some("/other"));
        let all = vec![a.clone(), b.clone(), c.clone()];
        assert!(path_holder(&a, &all).is_none());
        assert_eq!(path_holder(&b, &all).map(key), Some("a/x".into()));
        assert!(path_holder(&c, &all).is_none());
        // Same creation time: the namespace, then the name decides (as a
        // tuple, not as the string "ns/name": "a-b" sorts after "a").
        let e = ep("a-b", "x", 100, Some("/p"));
        let all = vec![a.clone(), e.clone()];
        assert_eq!(path_holder(&e, &all).map(key), Some("a/x".into()));
        // Same creation time and namespace: the name decides.
        let d = ep("a", "w", 100, Some("/p"));
        let all = vec![a.clone(), d.clone()];
        assert_eq!(path_holder(&a, &all).map(key), Some("a/w".into()));
        assert!(path_holder(&d, &all).is_none());
        // Default paths never collide across names.
        assert_eq!(effective_path(&ep("n", "m", 1, None)), "/n/m");
    }

    #[test]
    fn every_secret_reference_is_checked() {
        let mut e = (*ep("ns", "x", 1, None)).clone();
        e.spec.verification = serde_yaml_ng::from_str(
            "{scheme: stripe, secretRefs: [{name: a, key: k1}, {name: b, key: k2}]}",
        )
        .unwrap();
        e.spec.handshake = Some(
            serde_yaml_ng::from_str(
                "{type: metaHubChallenge, verifyTokenSecretRef: {name: c, key: t}, secretRef: {name: d, key: z}}",
            )
            .unwrap(),
        );
        e.spec.processor.signing =
            Some(serde_yaml_ng::from_str("{secretRef: {name: e, key: s}}").unwrap());
        let refs: Vec<(String, String)> = secret_refs(&e)
            .into_iter()
            .map(|(field, r)| (field, r.name.clone()))
            .collect();
        let fields: Vec<&str> = refs.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "verification.secretRefs[0]",
                "verification.secretRefs[1]",
                "handshake.verifyTokenSecretRef",
                "handshake.secretRef",
                "processor.signing.secretRef"
            ]
        );
        assert_eq!(refs[4].1, "e");
    }

    #[test]
    fn processor_ready_rules() {
        assert_eq!(processor_condition(true, Some(0), 0).reason, "Paused");
        assert_eq!(processor_condition(false, Some(0), 0).status, Status::True);
        assert_eq!(processor_condition(false, Some(2), 0).status, Status::False);
        let c = processor_condition(false, Some(2), 1);
        assert_eq!(
            (c.status, c.message.as_str()),
            (Status::True, "1/2 processor replicas ready")
        );
    }

    #[test]
    fn suspended_is_ready_with_a_reason() {
        let parts = vec![
            Desired::new(ACCEPTED, Status::True, "Accepted", ""),
            Desired::new(STREAM_READY, Status::True, "StreamReady", ""),
            Desired::new(PROCESSOR_READY, Status::True, "Available", ""),
        ];
        let all = all_conditions(parts.clone(), true, false);
        assert_eq!(all.len(), 4);
        assert_eq!(
            (all[0].status, all[0].reason.as_str()),
            (Status::True, "Suspended")
        );
        assert_eq!(all_conditions(parts, false, false)[0].reason, "Ready");
    }

    #[test]
    fn payload_check() {
        assert!(payload_fits(0, 1 << 20), "unknown while disconnected");
        assert!(
            !payload_fits(1 << 20, 1 << 20),
            "NATS default 1 MiB vs 1 MiB bodies"
        );
        assert!(payload_fits(9 << 20, 8 << 20));
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
        settings.nats_url = format!("nats://127.0.0.1:{port}");
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
            serde_yaml_ng::from_str("{scheme: github, secretRefs: [{name: gh, key: secret}]}")
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

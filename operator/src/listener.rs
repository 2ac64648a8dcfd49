//! The WebhookListener reconciler. A listener is one more durable consumer
//! on its endpoint's work stream (filtered on the intake subjects and its
//! own `due` subject), a parking consumer on the retry stream, a
//! dead-letter subject in the endpoint's dead-letter stream, and a
//! processor Deployment in the listener's namespace. The endpoint's
//! reconciler owns the streams; this one owns only the listener's
//! consumers and Deployment ([`cleanup`] deletes the consumers, the
//! Deployment goes with its owner).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use spillway_api::condition::{
    self as conditions, ACCEPTED, Desired, PROCESSOR_READY, Reason, STREAM_READY, Status,
};
use spillway_api::filter::Filter;
use spillway_api::names::{EndpointNames, listener_token};
use spillway_api::validate::{Timings, check};
use spillway_api::{
    Backlog, FromNamespaces, ReplicaStatus, WebhookEndpoint, WebhookListener, WebhookListenerStatus,
};
use tracing::{info, warn};

use crate::controller::{Error, backoff, processor_condition};
use crate::jetstream::{Js, NatsError, listener_consumer_config, retry_consumer_config};
use crate::metrics::Metrics;
use crate::render::{self, FIELD_MANAGER, Workload};
use crate::scaling;
use crate::settings::Settings;

/// Holds a deleted listener until its consumers are deleted.
pub const FINALIZER: &str = "spillway.dev/listener-cleanup";

/// Shared state of the listener reconciler.
pub struct ListenerContext {
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
    state: Mutex<HashMap<String, ListenerState>>,
}

impl std::fmt::Debug for ListenerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerContext").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct ListenerState {
    failures: u32,
    scale: scaling::State,
    written: Option<WebhookListenerStatus>,
}

impl ListenerContext {
    /// Assemble the context.
    pub fn new(
        client: Client,
        js: Js,
        settings: Settings,
        recorder: Recorder,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            js,
            settings,
            recorder,
            metrics,
            state: Mutex::default(),
        }
    }

    fn with_state<R>(&self, uid: &str, f: impl FnOnce(&mut ListenerState) -> R) -> R {
        let mut all = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(all.entry(uid.to_owned()).or_default())
    }

    async fn event(&self, l: &WebhookListener, type_: EventType, reason: &str, note: String) {
        let ev = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &l.object_ref(&())).await {
            warn!(listener = %key(l), error = %e, "could not publish event");
        }
    }
}

fn key(l: &WebhookListener) -> String {
    format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any())
}

/// The listener's token (its name in subjects and consumer names).
pub fn token(l: &WebhookListener) -> String {
    listener_token(&l.namespace().unwrap_or_default(), &l.name_any())
}

/// Base name of the listener's Deployment (`<name>-listener-processor`).
pub fn workload_name(l: &WebhookListener) -> String {
    format!("{}-listener", l.name_any())
}

/// Whether a listener in namespace `listener_ns` (with labels
/// `ns_labels`) may attach to `ep`.
pub fn admitted(
    ep: &WebhookEndpoint,
    listener_ns: &str,
    ns_labels: Option<&std::collections::BTreeMap<String, String>>,
) -> Result<(), String> {
    let ep_ns = ep.namespace().unwrap_or_default();
    if listener_ns == ep_ns {
        return Ok(());
    }
    let n = &ep.spec.allowed_listeners.namespaces;
    let who = format!("{ep_ns}/{}", ep.name_any());
    match n.from {
        FromNamespaces::All => Ok(()),
        FromNamespaces::Same => Err(format!(
            "WebhookEndpoint {who} admits listeners from its own namespace only; \
             set its allowedListeners.namespaces (from: All, or Selector with a selector matching {listener_ns})"
        )),
        FromNamespaces::Selector => {
            let selector: Selector =
                n.selector
                    .clone()
                    .unwrap_or_default()
                    .try_into()
                    .map_err(|e| {
                        format!(
                            "WebhookEndpoint {who} has an invalid allowedListeners selector: {e}"
                        )
                    })?;
            let empty = Default::default();
            if selector.matches(ns_labels.unwrap_or(&empty)) {
                Ok(())
            } else {
                Err(format!(
                    "namespace {listener_ns} does not match the allowedListeners selector of WebhookEndpoint {who}"
                ))
            }
        }
    }
}

/// Reconcile one listener (entry point for the Controller).
pub async fn reconcile(
    l: Arc<WebhookListener>,
    ctx: Arc<ListenerContext>,
) -> Result<Action, Error> {
    let start = Instant::now();
    let ns = l.namespace().unwrap_or_default();
    let api: Api<WebhookListener> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = l.uid().unwrap_or_default();
    let result = finalizer(&api, FINALIZER, l, |event| async {
        match event {
            Finalizer::Apply(l) => apply(&l, &ctx).await,
            Finalizer::Cleanup(l) => cleanup(&l, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    ctx.metrics.reconciled(result.is_ok(), start.elapsed());
    if result.is_ok() {
        ctx.with_state(&uid, |s| s.failures = 0);
    }
    result
}

/// On error: log, count, requeue with per-listener backoff.
pub fn error_policy(l: Arc<WebhookListener>, err: &Error, ctx: Arc<ListenerContext>) -> Action {
    let n = ctx.with_state(&l.uid().unwrap_or_default(), |s| {
        s.failures += 1;
        s.failures
    });
    warn!(listener = %key(&l), reason = err.reason(), error = %err, attempt = n, "reconcile failed");
    ctx.metrics.error(err.reason());
    Action::requeue(backoff(n, Duration::from_secs(300)))
}

/// The endpoint and the checks that do not need NATS: `Err` is the
/// `Accepted=False` reason and message.
async fn accept(
    l: &WebhookListener,
    ctx: &ListenerContext,
) -> Result<Result<(WebhookEndpoint, Timings), (Reason, String)>, Error> {
    let ns = l.namespace().unwrap_or_default();
    if let Err(e) = Filter::compile(&l.spec.event_types, l.spec.filter.as_deref()) {
        return Ok(Err((Reason::FilterInvalid, e)));
    }
    let ep_ns = l.spec.endpoint_namespace(&ns).to_owned();
    let ep_name = &l.spec.endpoint_ref.name;
    let Some(ep) = Api::<WebhookEndpoint>::namespaced(ctx.client.clone(), &ep_ns)
        .get_opt(ep_name)
        .await?
    else {
        return Ok(Err((
            Reason::EndpointNotFound,
            format!("WebhookEndpoint {ep_ns}/{ep_name} does not exist"),
        )));
    };
    let labels = if ep_ns == ns {
        None
    } else {
        Api::<Namespace>::all(ctx.client.clone())
            .get_opt(&ns)
            .await?
            .and_then(|n| n.metadata.labels)
    };
    if let Err(m) = admitted(&ep, &ns, labels.as_ref()) {
        return Ok(Err((Reason::NotAllowed, m)));
    }
    if ep.spec.ordering.is_some() {
        return Ok(Err((
            Reason::OrderingUnsupported,
            format!(
                "WebhookEndpoint {ep_ns}/{ep_name} is ordered; listeners serve unordered endpoints \
                 only (an ordered endpoint delivers through its spec.processor)"
            ),
        )));
    }
    let view = render::listener_view(l, &ep);
    let timings = match check(&view.spec) {
        Ok(t) => t,
        Err(p) => return Ok(Err((Reason::InvalidSpec, p.join("; ")))),
    };
    if let Err(m) = render::template_of(&l.spec.processor) {
        return Ok(Err((Reason::InvalidSpec, m)));
    }
    if let Some(s) = &l.spec.processor.signing {
        let r = &s.secret_ref;
        let found = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&r.name)
            .await?;
        if let Some(p) =
            crate::controller::secret_ref_problem(&ns, "signing.secretRef", r, found.as_ref(), true)
        {
            return Ok(Err(p));
        }
    }
    Ok(Ok((ep, timings)))
}

/// What the JetStream part found.
struct Synced {
    backlog: Backlog,
    dead_letters: u64,
}

fn nats_rejected(what: &str, e: NatsError) -> (Reason, String) {
    match e {
        NatsError::Unavailable(m) => (
            Reason::NatsUnavailable,
            format!("NATS is unavailable ({what}): {m}"),
        ),
        NatsError::Api { message, .. } => (
            Reason::StreamRejected,
            format!("JetStream refused {what}: {message}"),
        ),
    }
}

/// The listener's consumers (created or updated), its backlog and dead
/// letters.
async fn sync(
    l: &WebhookListener,
    ep: &WebhookEndpoint,
    t: &Timings,
    js: &Js,
) -> Result<Synced, (Reason, String)> {
    let names = EndpointNames::new(&ep.namespace().unwrap_or_default(), &ep.name_any());
    let token = token(l);
    let work = names.stream();
    let ep_key = format!("{}/{}", ep.namespace().unwrap_or_default(), ep.name_any());
    // The endpoint's reconciler makes the streams; a listener waits for
    // them (never creating an interest stream's only consumer, which would
    // let it keep webhooks nobody else reads).
    let have = js
        .stream_info(&work)
        .await
        .map_err(|e| nats_rejected("reading the work stream", e))?;
    if have.is_none_or(|w| w.config.subjects.iter().all(|s| s == &work)) {
        return Err((
            Reason::StreamMissing,
            format!("the work stream of WebhookEndpoint {ep_key} is not in place yet"),
        ));
    }
    let want = listener_consumer_config(&names, &token, l.spec.processor.concurrency, t);
    let info = js
        .put_consumer(&work, &want)
        .await
        .map_err(|e| nats_rejected("the listener's consumer", e))?;
    let retry = js
        .put_consumer(
            &names.retry_stream(),
            &retry_consumer_config(&names, &token),
        )
        .await
        .map_err(|e| nats_rejected("the listener's retry consumer", e))?;
    let dead_letters = if l.spec.processor.dead_letter.enabled {
        if js
            .stream_info(&names.dead_letter_stream())
            .await
            .map_err(|e| nats_rejected("reading the dead-letter stream", e))?
            .is_none()
        {
            // The endpoint keeps no dead letters of its own: this
            // listener's need the stream all the same.
            let ep_t = check(&ep.spec).map_err(|p| (Reason::InvalidSpec, p.join("; ")))?;
            js.create_stream(&crate::jetstream::dead_letter_config(
                &names, &ep.spec, &ep_t,
            ))
            .await
            .map_err(|e| nats_rejected("the dead-letter stream", e))?;
        }
        js.subject_messages(
            &names.dead_letter_stream(),
            &names.listener_dead_letter_subject(&token),
        )
        .await
        .map_err(|e| nats_rejected("counting dead letters", e))?
    } else {
        0
    };
    Ok(Synced {
        backlog: Backlog {
            pending: info.num_pending,
            ack_pending: info.num_ack_pending as u64,
            redelivered: info.num_redelivered as u64,
            retrying: retry.num_pending + retry.num_ack_pending as u64,
        },
        dead_letters,
    })
}

async fn apply(l: &WebhookListener, ctx: &ListenerContext) -> Result<Action, Error> {
    let ns = l.namespace().unwrap_or_default();
    let uid = l.uid().unwrap_or_default();
    let old = ctx
        .with_state(&uid, |s| s.written.clone())
        .or_else(|| l.status.clone())
        .unwrap_or_default();
    let resync = ctx.settings.resync_interval;
    let mut requeue = resync;
    let tok = token(l);
    let mut status = WebhookListenerStatus {
        observed_generation: l.metadata.generation,
        conditions: Vec::new(),
        endpoint: Some(format!(
            "{}/{}",
            l.spec.endpoint_namespace(&ns),
            l.spec.endpoint_ref.name
        )),
        listener: Some(tok.clone()),
        consumer: None,
        backlog: old.backlog.clone(),
        dead_letters: old.dead_letters,
        replicas: old.replicas.clone(),
    };
    let waiting = |why: &str| {
        vec![
            Desired::new(STREAM_READY, Status::Unknown, Reason::NotAccepted, why),
            Desired::new(PROCESSOR_READY, Status::Unknown, Reason::NotAccepted, why),
        ]
    };
    let parts = match accept(l, ctx).await? {
        Err((reason, message)) => {
            requeue = resync.min(Duration::from_secs(10));
            let mut p = vec![Desired::new(ACCEPTED, Status::False, reason, message)];
            p.extend(waiting("waiting for the listener to be accepted"));
            p
        }
        Ok((ep, timings)) => {
            let names = EndpointNames::new(&ep.namespace().unwrap_or_default(), &ep.name_any());
            status.consumer = Some(names.listener_consumer(&tok));
            let accepted = Desired::new(
                ACCEPTED,
                Status::True,
                Reason::Accepted,
                "endpoint, filter, spec and Secrets are valid",
            );
            let synced = sync(l, &ep, &timings, &ctx.js).await;
            let stream_cond = match &synced {
                Ok(s) => {
                    status.backlog = Some(s.backlog.clone());
                    status.dead_letters = Some(s.dead_letters);
                    Desired::new(
                        STREAM_READY,
                        Status::True,
                        Reason::StreamReady,
                        format!(
                            "consumer {} on stream {} is in place",
                            names.listener_consumer(&tok),
                            names.stream()
                        ),
                    )
                }
                Err((reason, message)) => {
                    requeue = requeue.min(Duration::from_secs(5));
                    Desired::new(STREAM_READY, Status::False, *reason, message.clone())
                }
            };
            let backlog = synced
                .as_ref()
                .ok()
                .map(|s| s.backlog.pending + s.backlog.ack_pending + s.backlog.retrying.min(1));
            let (proc_cond, replicas, due) =
                deployment(l, &ep, &names, &tok, &timings, backlog, ctx).await?;
            if let Some(due) = due {
                requeue = requeue.min(due + Duration::from_millis(200));
            }
            if replicas.desired == 0 && !l.spec.processor.paused {
                // At zero replicas the next webhook is noticed here.
                requeue = requeue.min(Duration::from_secs(5));
            }
            status.replicas = Some(replicas);
            vec![accepted, stream_cond, proc_cond]
        }
    };
    let desired = crate::controller::all_conditions(parts, false, l.spec.processor.paused);
    let now = Time(Timestamp::now());
    status.conditions = conditions::merge(&old.conditions, &desired, l.metadata.generation, &now);
    ctx.metrics.set_listener(
        &key(l),
        status.endpoint.as_deref().unwrap_or_default(),
        Some(crate::metrics::EndpointState {
            ready: status
                .conditions
                .iter()
                .any(|c| c.type_ == conditions::READY && c.status == "True"),
            synced: status
                .backlog
                .as_ref()
                .map(|b| crate::metrics::SyncedCounts {
                    backlog: b.pending,
                    in_flight: b.ack_pending,
                    retrying: b.retrying,
                    dead_letters: status.dead_letters.unwrap_or(0),
                    oldest_seconds: 0,
                    stream_fill_percent: 0,
                }),
        }),
    );
    if status != old {
        for (type_, from, to) in conditions::transitions(&old.conditions, &status.conditions) {
            if from.is_none() && to != Status::False {
                continue;
            }
            let c = status
                .conditions
                .iter()
                .find(|c| c.type_ == type_)
                .expect("from the list");
            info!(listener = %key(l), condition = %type_, from = ?from, to = %to, reason = %c.reason, "condition changed");
            let et = if to == Status::False {
                EventType::Warning
            } else {
                EventType::Normal
            };
            ctx.event(l, et, &c.reason, format!("{type_} is {to}: {}", c.message))
                .await;
        }
        Api::<WebhookListener>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &l.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&json!({
                    "apiVersion": "spillway.dev/v1alpha1",
                    "kind": "WebhookListener",
                    "status": status,
                })),
            )
            .await?;
        ctx.metrics.status_written();
        ctx.with_state(&uid, |s| s.written = Some(status));
    }
    Ok(Action::requeue(requeue))
}

/// Scale (builtin, on this listener's backlog), render and apply the
/// listener's processor Deployment.
async fn deployment(
    l: &WebhookListener,
    ep: &WebhookEndpoint,
    names: &EndpointNames,
    tok: &str,
    t: &Timings,
    backlog: Option<u64>,
    ctx: &ListenerContext,
) -> Result<(Desired, ReplicaStatus, Option<Duration>), Error> {
    let ns = l.namespace().unwrap_or_default();
    let uid = l.uid().unwrap_or_default();
    let p = &l.spec.processor;
    let base = workload_name(l);
    let dname = render::deployment_name(&base);
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let current = api
        .list(&ListParams::default().fields(&format!("metadata.name={dname}")))
        .await?
        .items
        .into_iter()
        .next();
    if let Some(d) = &current
        && !d
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid)
    {
        return Ok((
            Desired::new(
                PROCESSOR_READY,
                Status::False,
                Reason::DeploymentConflict,
                format!(
                    "Deployment {ns}/{dname} exists and is not this listener's; delete or rename it"
                ),
            ),
            ReplicaStatus::default(),
            None,
        ));
    }
    let (min, max) = render::replica_bounds(p);
    let input = scaling::Input {
        min,
        max,
        target_backlog_per_replica: p.replicas.target_backlog_per_replica,
        paused: p.paused,
        backlog,
    };
    let fallback = current.as_ref().and_then(|d| d.spec.replicas);
    let now = Instant::now();
    let cooldown = ctx.settings.scale_down_cooldown;
    let state = ctx.with_state(&uid, |s| s.scale);
    let (desired, next) = scaling::decide(&input, state, fallback, now, cooldown);
    ctx.with_state(&uid, |s| s.scale = next);
    let config = render::listener_config(l, ep, names, tok, t);
    let want = render::workload_deployment(
        &Workload {
            name: base,
            namespace: ns.clone(),
            owner: l
                .controller_owner_ref(&())
                .expect("stored listeners have a uid"),
            processor: p,
            ordered: false,
            config,
        },
        &ctx.settings,
        Some(desired),
    )
    .map_err(Error::Render)?;
    let applied = match &current {
        Some(have) if render::up_to_date(have, &want) => have.clone(),
        _ => {
            let d = api
                .patch(
                    &dname,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&want),
                )
                .await?;
            if current.is_none() {
                ctx.event(
                    l,
                    EventType::Normal,
                    "DeploymentCreated",
                    format!("created Deployment {dname}"),
                )
                .await;
            }
            d
        }
    };
    let ready = applied
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    Ok((
        processor_condition(p.paused, Some(desired), ready),
        ReplicaStatus { desired, ready },
        scaling::scale_down_due_in(&next, now, cooldown),
    ))
}

/// Delete the listener's consumers (its Deployment is garbage-collected
/// with it). Its dead letters stay in the endpoint's dead-letter stream
/// until they age out or are redriven.
async fn cleanup(l: &WebhookListener, ctx: &ListenerContext) -> Result<Action, Error> {
    let ns = l.namespace().unwrap_or_default();
    let tok = token(l);
    // The endpoint it was attached to (the status says, in case the
    // reference changed since).
    let mut endpoints = vec![format!(
        "{}/{}",
        l.spec.endpoint_namespace(&ns),
        l.spec.endpoint_ref.name
    )];
    if let Some(e) = l.status.as_ref().and_then(|s| s.endpoint.clone())
        && !endpoints.contains(&e)
    {
        endpoints.push(e);
    }
    for e in endpoints {
        let Some((ens, ename)) = e.split_once('/') else {
            continue;
        };
        let names = EndpointNames::new(ens, ename);
        for (stream, consumer) in [
            (names.stream(), names.listener_consumer(&tok)),
            (names.retry_stream(), names.retry_consumer(&tok)),
        ] {
            match ctx.js.delete_consumer(&stream, &consumer).await {
                Ok(existed) => {
                    if existed {
                        info!(listener = %key(l), %stream, %consumer, "deleted the listener's consumer");
                    }
                }
                Err(source) => {
                    return Err(Error::CleanupPending {
                        endpoint: key(l),
                        source,
                    });
                }
            }
        }
    }
    ctx.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&l.uid().unwrap_or_default());
    let endpoint = l
        .status
        .as_ref()
        .and_then(|s| s.endpoint.clone())
        .unwrap_or_default();
    ctx.metrics.set_listener(&key(l), &endpoint, None);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ep(allowed: &str) -> WebhookEndpoint {
        serde_saphyr::from_str(&format!(
            r#"
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: gh, namespace: shop, uid: u1}}
spec:
  verification: {{scheme: none}}
  processor: {{sink: {{url: "http://sink"}}}}
  {allowed}
"#
        ))
        .expect("fixture parses")
    }

    #[test]
    fn namespaces_are_admitted_as_allowed_listeners_says() {
        let team = BTreeMap::from([("team".to_owned(), "ci".to_owned())]);
        let other = BTreeMap::from([("team".to_owned(), "web".to_owned())]);
        let selector =
            "allowedListeners: {namespaces: {from: Selector, selector: {matchLabels: {team: ci}}}}";
        let cases = [
            ("", "shop", None, true),
            ("", "ci", Some(&team), false),
            (
                "allowedListeners: {namespaces: {from: All}}",
                "ci",
                None,
                true,
            ),
            (selector, "ci", Some(&team), true),
            (selector, "web", Some(&other), false),
            (selector, "bare", None, false),
            (selector, "shop", None, true),
        ];
        for (allowed, ns, labels, want) in cases {
            let got = admitted(&ep(allowed), ns, labels);
            assert_eq!(got.is_ok(), want, "{allowed:?} {ns}: {got:?}");
        }
        let err = admitted(&ep(""), "ci", None).unwrap_err();
        assert!(err.contains("allowedListeners"), "{err}");
    }
}

//! Cleanup of a deleted endpoint: its processor, KEDA object and NATS
//! objects (per `stream.deletionPolicy`), then the operator's own state.

use super::*;

/// What cleanup does with the streams, for messages.
pub(super) fn leftovers(names: &EndpointNames, policy: DeletionPolicy) -> String {
    match policy {
        DeletionPolicy::Retain => format!("consumers of stream {}", names.stream()),
        DeletionPolicy::Delete => format!(
            "streams {}, {}, {}, {} and {} and their consumers",
            names.stream(),
            names.history_stream(),
            names.dead_letter_stream(),
            names.retry_stream(),
            names.attempt_stream()
        ),
    }
}

pub(super) async fn nats_cleanup(
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
            names.attempt_stream(),
        ] {
            if js.delete_stream(&s).await? {
                done.push(format!("stream {s}"));
            }
        }
    }
    Ok(done)
}

pub(super) async fn cleanup(ep: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
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
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &ns,
            &render::keda::scaled_object_resource(),
        );
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
    ctx.metrics.set_endpoint(&k, None);
    ctx.sink_notices.forget(&k);
    ctx.forget(&ep.uid().unwrap_or_default());
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

//! The processor Deployment: scaling (builtin or KEDA), rendering and
//! applying it, and the `ProcessorReady` condition's inputs.

use super::*;

/// The first processor NATS Secret missing (or lacking a key) in `ns`.
/// Errors reading a Secret skip the check: it only explains pods that are
/// not ready.
pub(super) async fn missing_processor_secret(ns: &str, ctx: &Context) -> Option<(Reason, String)> {
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

/// Whether KEDA's CRD exists. Not being allowed to look (the Helm chart
/// grants it only with `operator.keda.enabled`) counts as not installed.
pub(super) async fn keda_installed(ctx: &Context) -> Result<bool, Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(ctx.client.clone());
    match crds.get_opt(KEDA_CRD).await {
        Ok(found) => Ok(found.is_some()),
        Err(kube::Error::Api(s)) if s.code == 403 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A Deployment by name, through `list` (the operator's RBAC has list and
/// watch on Deployments, not get).
pub(super) async fn find_deployment(
    api: &Api<Deployment>,
    name: &str,
) -> Result<Option<Deployment>, Error> {
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    Ok(api.list(&lp).await?.items.into_iter().next())
}

/// The endpoint as its processor serves it: an ordered endpoint with the
/// partitions whose consumers exist (`partitions`, from the sync or the
/// last status), when fewer than the spec asks for.
pub(super) fn serving(
    ep: &WebhookEndpoint,
    partitions: Option<u16>,
) -> std::borrow::Cow<'_, WebhookEndpoint> {
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

/// Scale, render and apply the processor Deployment. Returns the
/// ProcessorReady condition, the replica status and, when a scale-down is
/// pending, how long until it is due.
pub(super) async fn processor(
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
        ctx.with_state(&uid, |s| s.scale = scaling::State::default());
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
        let state = ctx.with_state(&uid, |s| s.scale);
        let (desired, next) = scaling::decide(&input, state, fallback, now, cooldown);
        if Some(desired) != fallback && fallback.is_some() {
            info!(endpoint = %key(ep), from = ?fallback, to = desired, backlog = ?input.backlog, "scaling processor");
        }
        ctx.with_state(&uid, |s| s.scale = next);
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
                Reason::DeploymentConflict,
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
        Api::<DynamicObject>::namespaced_with(
            ctx.client.clone(),
            &ns,
            &render::keda::scaled_object_resource(),
        )
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
                &Patch::Apply(render::keda::scaled_object(ep, names, &ctx.settings)),
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
            Reason::KedaNotInstalled,
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
pub(super) fn is_ours(d: &Deployment) -> bool {
    d.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == "spillway-operator")
}

/// Whether this processor Deployment's pods all read the current stored
/// format: it was rendered by an operator whose processors do (the
/// annotation), and no pod of an earlier template remains (the Deployment
/// controller has seen the current template, and every pod is of it). A
/// Deployment no controller has observed yet has no pods of an earlier
/// template.
pub(crate) fn reads_current_format(d: &Deployment) -> bool {
    let marked = d
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(render::READS_STORED_FORMAT))
        .and_then(|v| v.parse::<u8>().ok())
        .is_some_and(|f| f >= spillway_api::stored::CURRENT);
    let status = d.status.as_ref();
    let rolled = match status.and_then(|s| s.observed_generation) {
        None => true,
        Some(seen) => {
            let count = |f: fn(&k8s_openapi::api::apps::v1::DeploymentStatus) -> Option<i32>| {
                status.and_then(f).unwrap_or(0)
            };
            seen >= d.metadata.generation.unwrap_or(0)
                && count(|s| s.updated_replicas) >= count(|s| s.replicas)
                // Pods shutting down are not in `replicas` (where the
                // cluster reports them at all: Kubernetes 1.33+).
                && count(|s| s.terminating_replicas) == 0
        }
    };
    marked && rolled
}

/// The stored format the gateway may write for every endpoint: the current
/// one once every processor Deployment the operator sees has read it for
/// `settle` without a break (`ready_since` keeps when that began; `None`
/// while the cache is not synced: nothing is known yet), else 1. A
/// Deployment stuck mid-rollout keeps every endpoint on format 1, which
/// every processor reads.
pub(crate) fn stored_format(
    deployments: &kube::runtime::reflector::Store<Deployment>,
    ready_since: &std::sync::Mutex<Option<Instant>>,
    settle: Duration,
) -> Option<u8> {
    use futures::FutureExt as _;
    deployments.wait_until_ready().now_or_never()?.ok()?;
    let all = deployments.state().iter().all(|d| reads_current_format(d));
    let mut since = ready_since.lock().unwrap_or_else(|e| e.into_inner());
    *since = all.then(|| since.unwrap_or_else(Instant::now));
    Some(if since.is_some_and(|t| t.elapsed() >= settle) {
        spillway_api::stored::CURRENT
    } else {
        1
    })
}

#[cfg(test)]
mod stored_format_tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;

    fn deployment(
        marked: Option<&str>,
        generation: i64,
        status: Option<(i64, i32, i32)>,
    ) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.metadata.annotations =
            marked.map(|v| [(render::READS_STORED_FORMAT.to_owned(), v.to_owned())].into());
        // `replicas` -1: as many as updated, and 1 shutting down.
        d.status = status.map(|(seen, replicas, updated)| DeploymentStatus {
            observed_generation: Some(seen),
            replicas: Some(replicas.max(updated)),
            updated_replicas: Some(updated),
            terminating_replicas: (replicas < 0).then_some(1),
            ..Default::default()
        });
        d
    }

    #[test]
    fn a_deployment_reads_format_2_once_marked_and_rolled() {
        for (marked, generation, status, reads, why) in [
            (Some("2"), 3, Some((3, 2, 2)), true, "rolled out"),
            (Some("2"), 3, Some((3, 0, 0)), true, "scaled to zero"),
            (
                Some("2"),
                1,
                None,
                true,
                "no controller has seen it: no older pods",
            ),
            (
                Some("2"),
                4,
                Some((3, 2, 2)),
                false,
                "the new template not seen yet",
            ),
            (Some("2"), 4, Some((4, 3, 1)), false, "older pods still run"),
            (
                Some("2"),
                4,
                Some((4, -1, 2)),
                false,
                "an older pod shutting down",
            ),
            (
                None,
                3,
                Some((3, 2, 2)),
                false,
                "an earlier operator's template",
            ),
            (
                None,
                1,
                None,
                false,
                "an earlier operator's, never observed",
            ),
            (
                Some("1"),
                3,
                Some((3, 2, 2)),
                false,
                "a reader of format 1 only",
            ),
            (Some("x"), 3, Some((3, 2, 2)), false, "not a number"),
        ] {
            let d = deployment(marked, generation, status);
            assert_eq!(reads_current_format(&d), reads, "{why}");
        }
    }
}

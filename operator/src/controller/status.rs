//! Conditions and the status patch.

use super::*;

/// ProcessorReady from the desired and ready replica counts.
pub fn processor_condition(paused: bool, desired: Option<i32>, ready: i32) -> Desired {
    let d = |s, r: Reason, m: String| Desired::new(PROCESSOR_READY, s, r, m);
    if paused {
        return d(
            Status::True,
            Reason::Paused,
            "processor paused: webhooks are stored and delivered once resumed".into(),
        );
    }
    match desired {
        Some(0) => d(
            Status::True,
            Reason::ScaledToZero,
            "no backlog: scaled to zero replicas".into(),
        ),
        Some(n) if ready >= 1 => d(
            Status::True,
            Reason::Available,
            format!("{ready}/{n} processor replicas ready"),
        ),
        Some(n) => d(
            Status::False,
            Reason::PodsNotReady,
            format!("0/{n} processor replicas ready"),
        ),
        None if ready >= 1 => d(
            Status::True,
            Reason::Available,
            format!("{ready} processor replicas ready"),
        ),
        None => d(
            Status::False,
            Reason::PodsNotReady,
            "no processor replica is ready".into(),
        ),
    }
}

/// All four conditions, Ready last, with Ready's reason noting suspension or
/// pause when everything else is fine.
pub fn all_conditions(parts: Vec<Desired>, suspended: bool, paused: bool) -> Vec<Desired> {
    let mut ready = conditions::ready(&parts);
    if ready.status == Status::True && suspended {
        ready.reason = Reason::Suspended;
        ready.message = "suspended: the gateway answers 503 with Retry-After; stored webhooks are still delivered".into();
    } else if ready.status == Status::True && paused {
        ready.reason = Reason::Paused;
        ready.message = "delivery paused: webhooks are accepted and stored".into();
    }
    let mut all = vec![ready];
    all.extend(parts);
    all
}

/// Write `status` (it differs from `old`, the last written): an Event
/// per condition that changed (a first status only for failures), then one
/// server-side apply of the status under the operator's field manager,
/// remembered per uid.
pub(super) async fn write_status(
    ep: &WebhookEndpoint,
    ctx: &Context,
    old: &WebhookEndpointStatus,
    status: WebhookEndpointStatus,
) -> Result<(), Error> {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let k = key(ep);
    let uid = ep.uid().unwrap_or_default();
    for (type_, from, to) in conditions::transitions(&old.conditions, &status.conditions) {
        // A first status is not a transition unless it is a failure:
        // saves four Events per new endpoint.
        if from.is_none() && to != Status::False {
            continue;
        }
        let c = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("from the list");
        let et = if to == Status::False {
            EventType::Warning
        } else {
            EventType::Normal
        };
        info!(endpoint = %k, condition = %type_, from = ?from, to = %to, reason = %c.reason, "condition changed");
        ctx.event(ep, et, &c.reason, format!("{type_} is {to}: {}", c.message))
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
    ctx.with_state(&uid, |s| s.written = Some(status));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_ready_rules() {
        assert_eq!(processor_condition(true, Some(0), 0).reason, Reason::Paused);
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
            Desired::new(ACCEPTED, Status::True, Reason::Accepted, ""),
            Desired::new(STREAM_READY, Status::True, Reason::StreamReady, ""),
            Desired::new(PROCESSOR_READY, Status::True, Reason::Available, ""),
        ];
        let all = all_conditions(parts.clone(), true, false);
        assert_eq!(all.len(), 4);
        assert_eq!(
            (all[0].status, all[0].reason),
            (Status::True, Reason::Suspended)
        );
        assert_eq!(all_conditions(parts, false, false)[0].reason, Reason::Ready);
    }
}

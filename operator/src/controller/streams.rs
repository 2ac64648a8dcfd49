//! JetStream: what the sync reports (Events for created, updated and
//! migrated streams, a full backlog, consumers not Spillway's holding
//! webhooks) and the server's `max_payload` check.

use super::*;

pub(super) async fn report_created(
    ep: &WebhookEndpoint,
    ctx: &Context,
    old: &WebhookEndpointStatus,
    s: &Synced,
    stream_ready: &Desired,
) {
    let was_ready = conditions::is(&old.conditions, STREAM_READY, Status::True);
    // A full backlog, or consumers not Spillway's holding webhooks: a
    // Warning when StreamReady starts saying so, with its message.
    let warned = [Reason::BacklogFull, Reason::ForeignConsumerHolding];
    let was = old
        .conditions
        .iter()
        .any(|c| c.type_ == STREAM_READY && c.reason == stream_ready.reason.as_str());
    if warned.contains(&stream_ready.reason) && !was {
        let why = &stream_ready.message;
        warn!(endpoint = %key(ep), %why, reason = stream_ready.reason.as_str(), "work stream");
        ctx.event(
            ep,
            EventType::Warning,
            stream_ready.reason.as_str(),
            why.clone(),
        )
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

pub(super) fn s_names(ep: &WebhookEndpoint) -> EndpointNames {
    EndpointNames::new(&ep.namespace().unwrap_or_default(), &ep.name_any())
}

/// Largest the gateway adds to a body (the stored head of format 2, or
/// format 1's headers: the original headers plus Spillway's own), for the
/// max_payload check.
pub(super) const HEADER_ALLOWANCE: u64 = 16 * 1024;

/// Whether NATS can carry the largest body this endpoint accepts.
pub fn payload_fits(max_payload: usize, max_body_bytes: u64) -> bool {
    max_payload == 0 || max_payload as u64 >= max_body_bytes + HEADER_ALLOWANCE
}

pub(super) async fn warn_payload(ep: &WebhookEndpoint, ctx: &Context) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_check() {
        assert!(payload_fits(0, 1 << 20), "unknown while disconnected");
        assert!(
            !payload_fits(1 << 20, 1 << 20),
            "NATS default 1 MiB vs 1 MiB bodies"
        );
        assert!(payload_fits(9 << 20, 8 << 20));
    }
}

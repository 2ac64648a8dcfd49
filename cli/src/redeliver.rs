//! `spillway redeliver ENDPOINT ID`: deliver one stored webhook again, to
//! one listener: one new request, recorded as attempts like any other.
//!
//! The webhook is read from the history stream. Its attempt records say
//! when the gateway accepted it, so the search starts there instead of at
//! the beginning of the history. The copy goes to the listener's own `due`
//! subject in the work stream (only that listener's consumer reads it, and
//! the history does not copy it again); on an ordered endpoint, whose
//! partition consumers read only intake subjects, to its partition's intake
//! subject, behind what waits there.

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use spillway_api::names::BUILTIN_LISTENER;
use spillway_api::wire::{self, AttemptRecord};

use crate::endpoint::EndpointRef;
use crate::history::{self, Reader, Start, Stored};

/// Where the search starts when the attempt records say when the webhook
/// was accepted: this much earlier (the history stores its copy after the
/// gateway's clock read `Spillway-Received-At`, and clocks differ).
const BEFORE_RECEIVED: time::Duration = time::Duration::seconds(30);

/// What `redeliver` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redelivered {
    /// Where the webhook was found in the history.
    pub history_seq: u64,
    /// The subject its copy was published to.
    pub subject: String,
    /// The copy's sequence in the work stream.
    pub work_seq: u64,
    /// History messages read to find it.
    pub scanned: u64,
}

/// The listener token `asked` names (`processor`, a WebhookListener's name
/// in the endpoint's namespace, or `namespace/name`), checked: a
/// WebhookListener must have its consumer on the work stream.
pub async fn listener_token(
    js: &jetstream::Context,
    ep: &EndpointRef,
    asked: &str,
) -> Result<String> {
    let names = ep.names();
    let listener = &spillway_api::names::listener_arg(&ep.namespace, asked);
    if listener != BUILTIN_LISTENER {
        let work = js
            .get_stream(names.stream())
            .await
            .with_context(|| format!("work stream {} not found", names.stream()))?;
        if work
            .consumer_info(names.listener_consumer(listener))
            .await
            .is_err()
        {
            bail!(
                "listener {asked:?} not found on {ep}: name {BUILTIN_LISTENER:?} (spec.processor), \
                 a WebhookListener as NAME (in {}) or NAMESPACE/NAME",
                ep.namespace
            );
        }
    }
    Ok(listener.clone())
}

/// Find `id` in the endpoint's history and publish one copy for
/// `listener` (see [`find`] for `since`).
pub async fn redeliver(
    js: &jetstream::Context,
    ep: &EndpointRef,
    id: &str,
    listener: &str,
    since: Option<time::OffsetDateTime>,
    run: &str,
) -> Result<Redelivered> {
    let names = ep.names();
    let listener = &listener_token(js, ep, listener).await?;
    let history_name = names.history_stream();
    // Without an attempt stream (an older operator) the search starts from
    // `since` or the beginning.
    let records = crate::attempts::rows(js, ep, id)
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let (found, scanned) = find(js, ep, id, &records, since).await?;
    let work = js
        .get_stream(names.stream())
        .await
        .with_context(|| format!("work stream {} not found", names.stream()))?;
    let unordered = work.consumer_info(names.consumer(None)).await.is_ok();
    let subject = if unordered {
        names.due_subject(listener)
    } else {
        ep.replay_subject(&found.subject).with_context(|| {
            format!(
                "history message {} is on subject {}, which is not one of {ep}'s",
                found.seq, found.subject
            )
        })?
    };
    let headers = history::republish_headers(
        &found.headers,
        &wire::redeliver_msg_id(&history_name, found.seq, run),
    );
    let ack = js
        .publish_with_headers(subject.clone(), headers, found.payload.into())
        .await
        .map_err(|e| anyhow::anyhow!("publishing the copy: {e}"))?
        .await
        .map_err(|e| anyhow::anyhow!("the work stream did not store the copy: {e}"))?;
    Ok(Redelivered {
        history_seq: found.seq,
        subject,
        work_seq: ack.sequence,
        scanned,
    })
}

/// Find `id` in the endpoint's history: from when its attempt `records`
/// say it was accepted, else from `since`, else from the start. Returns the
/// stored webhook and how many messages were read.
pub async fn find(
    js: &jetstream::Context,
    ep: &EndpointRef,
    id: &str,
    records: &[AttemptRecord],
    since: Option<time::OffsetDateTime>,
) -> Result<(Stored, u64)> {
    let history_name = ep.names().history_stream();
    let mut stream = js.get_stream(&history_name).await.with_context(|| {
        format!(
            "stream {history_name} not found (is the endpoint ready, and the NATS account right?)"
        )
    })?;
    let state = stream.info().await?.state.clone();
    if state.messages == 0 {
        bail!("the history of {ep} is empty: {id} is not in it");
    }
    let start = match accepted_at(records) {
        Some(t) => Start::Time(t - BEFORE_RECEIVED),
        None => match since {
            Some(t) => Start::Time(t),
            None => {
                eprintln!(
                    "no attempt records for {id}: searching the whole history of {ep} \
                     ({} webhooks; --since narrows it)",
                    state.messages
                );
                Start::First
            }
        },
    };
    let mut r = Reader::open(js, &history_name, start, state.last_sequence).await?;
    let mut scanned = 0u64;
    loop {
        let Some(m) = r.next().await? else {
            bail!(
                "{id} is not in the history of {ep} (not received, or older than what \
                 stream.maxAge and stream.historyMaxBytes keep)"
            );
        };
        scanned += 1;
        if m.webhook().delivery_id.as_deref() == Some(id) {
            return Ok((m, scanned));
        }
    }
}

/// When the gateway accepted a webhook, from its attempt records.
fn accepted_at(records: &[AttemptRecord]) -> Option<time::OffsetDateTime> {
    records
        .iter()
        .filter_map(|r| r.received_at.as_deref())
        .filter_map(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        })
        .min()
}

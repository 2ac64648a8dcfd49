//! `spillway attempts ENDPOINT --id ID`: every recorded delivery attempt at
//! one webhook, of every listener, with the answer it got.
//!
//! Records live in the endpoint's attempt stream under
//! `spillway.attempt.<ns>.<name>.<listener>.<hash of the id>`, so the lookup
//! reads only that id's subjects (an ephemeral ordered consumer filtered on
//! them), not the whole stream.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use serde::Serialize;
use spillway_api::wire::AttemptRecord;

use crate::endpoint::EndpointRef;
use crate::output::{self, Format};

/// Longest wait for one record the consumer said is there.
const IDLE: Duration = Duration::from_secs(5);

/// The attempts at one delivery id.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// `namespace/name`.
    pub endpoint: String,
    /// The delivery id looked up.
    pub delivery_id: String,
    /// The records, oldest first.
    pub items: Vec<AttemptRecord>,
}

/// Read every record of `id`'s attempts.
pub async fn rows(js: &jetstream::Context, ep: &EndpointRef, id: &str) -> Result<Listing> {
    let names = ep.names();
    let stream = names.attempt_stream();
    let s = js.get_stream(&stream).await.with_context(|| {
        format!(
            "stream {stream} not found (is the endpoint ready, on an operator that records \
             attempts, and the NATS account right?)"
        )
    })?;
    let c = s
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: names.attempt_lookup_subject(id),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating a reader on {stream}: {e}"))?;
    let mut left = c.cached_info().num_pending;
    let mut items = Vec::new();
    if left > 0 {
        let mut msgs = c
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
        while left > 0 {
            let m = match tokio::time::timeout(IDLE, msgs.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => anyhow::bail!("reading {stream}: {e}"),
                Ok(None) | Err(_) => anyhow::bail!(
                    "reading {stream} stalled with {left} record(s) to go (NATS slow or unavailable?)"
                ),
            };
            left = m.info().map(|i| i.pending).unwrap_or(0);
            // Another id with the same hash, or a record this version
            // cannot read: not this id's.
            if let Ok(r) = serde_json::from_slice::<AttemptRecord>(&m.payload)
                && r.delivery_id == id
            {
                items.push(r);
            }
        }
    }
    items.sort_by(|a, b| {
        (&a.started_at, &a.listener, a.attempt).cmp(&(&b.started_at, &b.listener, b.attempt))
    });
    Ok(Listing {
        endpoint: ep.to_string(),
        delivery_id: id.to_owned(),
        items,
    })
}

/// Print the attempts as a table, JSON or YAML.
pub async fn show(
    js: &jetstream::Context,
    ep: &EndpointRef,
    id: &str,
    format: Format,
) -> Result<()> {
    let listing = rows(js, ep, id).await?;
    render(&mut std::io::stdout().lock(), &listing, format)
}

/// Write a listing in `format`.
pub fn render(out: &mut impl Write, listing: &Listing, format: Format) -> Result<()> {
    if output::structured(out, format, listing)? {
        return Ok(());
    }
    if listing.items.is_empty() {
        writeln!(
            out,
            "no attempts recorded for {} on {} (not delivered yet, or older than the attempt stream keeps)",
            listing.delivery_id, listing.endpoint
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<12} {:>7}  {:<24} {:>8}  {:<9} {:<9} {:<24} RESPONSE",
        "LISTENER", "ATTEMPT", "STARTED", "DURATION", "RESULT", "DECISION", "POD"
    )?;
    for r in &listing.items {
        let result = match (r.status, r.error) {
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => e.as_str().to_owned(),
            (None, None) => "-".to_owned(),
        };
        let response: String = r
            .response
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect();
        writeln!(
            out,
            "{:<12} {:>7}  {:<24} {:>6}ms  {:<9} {:<9} {:<24} {}",
            r.listener,
            r.attempt,
            r.started_at,
            r.duration_ms,
            result,
            r.decision.as_str(),
            r.pod,
            response
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_api::wire::{AttemptDecision, AttemptError};

    fn record(attempt: u32, status: Option<u16>, error: Option<AttemptError>) -> AttemptRecord {
        AttemptRecord {
            delivery_id: "d-1".into(),
            received_at: None,
            listener: "processor".into(),
            attempt,
            stream_sequence: 4,
            started_at: format!("2026-12-05T10:00:0{attempt}.000Z"),
            duration_ms: 12,
            status,
            error,
            response: status.map(|_| "busy".into()),
            decision: if status == Some(200) {
                AttemptDecision::Delivered
            } else {
                AttemptDecision::Retry
            },
            pod: "hooks-processor-abc".into(),
        }
    }

    #[test]
    fn the_table_shows_each_attempt_and_its_answer() {
        let listing = Listing {
            endpoint: "team/hooks".into(),
            delivery_id: "d-1".into(),
            items: vec![
                record(1, None, Some(AttemptError::Timeout)),
                record(2, Some(503), None),
                record(3, Some(200), None),
            ],
        };
        let mut out = Vec::new();
        render(&mut out, &listing, Format::Table).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[1].contains("timeout") && lines[1].contains("retry"),
            "{text}"
        );
        assert!(
            lines[2].contains("503") && lines[2].contains("busy"),
            "{text}"
        );
        assert!(
            lines[3].contains("200") && lines[3].contains("delivered"),
            "{text}"
        );
        let mut out = Vec::new();
        render(&mut out, &listing, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["deliveryId"], "d-1");
        assert_eq!(v["items"][1]["status"], 503);
        assert_eq!(v["items"][0]["error"], "timeout");
    }

    #[test]
    fn nothing_recorded_says_so() {
        let listing = Listing {
            endpoint: "team/hooks".into(),
            delivery_id: "d-9".into(),
            items: vec![],
        };
        let mut out = Vec::new();
        render(&mut out, &listing, Format::Table).unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("no attempts recorded for d-9")
        );
    }
}

//! `spillway status`: what each endpoint is doing, from its status and the
//! live JetStream numbers.

use std::io::Write as _;

use anyhow::{Context, Result};
use async_nats::jetstream;
use kube::api::{Api, ListParams};
use spillway_api::{WebhookEndpoint, condition};

use crate::endpoint::EndpointRef;

/// Live numbers from JetStream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Live {
    /// Waiting to be delivered.
    pub pending: u64,
    /// Handed to a processor, not yet acknowledged.
    pub in_flight: u64,
    /// Retries so far (messages redelivered).
    pub redelivered: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// One endpoint's status line.
#[derive(Debug, Clone)]
pub struct Line {
    /// The endpoint.
    pub ep: EndpointRef,
    /// Path served.
    pub path: String,
    /// Ready condition: `True`, or `False (Reason)`.
    pub ready: String,
    /// Live numbers, or the ones from `.status` when NATS was unreachable.
    pub live: Live,
    /// Whether `live` came from JetStream.
    pub from_nats: bool,
    /// `ready/desired`.
    pub replicas: String,
    /// Paused or suspended.
    pub note: String,
    /// Condition messages that are not True, for the detailed view.
    pub problems: Vec<String>,
}

/// Consumers of an endpoint (one per partition when ordered).
pub fn consumers(we: &WebhookEndpoint, ep: &EndpointRef) -> Vec<String> {
    let n = ep.names();
    match &we.spec.ordering {
        Some(o) => (0..o.partitions.max(1))
            .map(|p| n.consumer(Some(p)))
            .collect(),
        None => vec![n.consumer(None)],
    }
}

async fn live(js: &jetstream::Context, we: &WebhookEndpoint, ep: &EndpointRef) -> Result<Live> {
    let names = ep.names();
    let stream = js.get_stream(names.stream()).await?;
    let mut l = Live::default();
    for c in consumers(we, ep) {
        let mut consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&c)
            .await
            .map_err(|e| anyhow::anyhow!("consumer {c}: {e}"))?;
        let info = consumer.info().await?;
        l.pending += info.num_pending;
        l.in_flight += info.num_ack_pending as u64;
        l.redelivered += info.num_redelivered as u64;
    }
    if let Ok(mut dlq) = js.get_stream(names.dead_letter_stream()).await {
        l.dead_letters = dlq.info().await?.state.messages;
    }
    Ok(l)
}

fn line(we: &WebhookEndpoint, live_nats: Option<Live>) -> Line {
    let ep = EndpointRef {
        namespace: we.metadata.namespace.clone().unwrap_or_default(),
        name: we.metadata.name.clone().unwrap_or_default(),
    };
    let st = we.status.clone().unwrap_or_default();
    let ready = st
        .conditions
        .iter()
        .find(|c| c.type_ == condition::READY)
        .map(|c| {
            if c.status == "True" {
                "True".to_owned()
            } else {
                format!("{} ({})", c.status, c.reason)
            }
        })
        .unwrap_or_else(|| "Unknown".into());
    let problems = st
        .conditions
        .iter()
        .filter(|c| c.status != "True")
        .map(|c| format!("{}: {} — {}", c.type_, c.reason, c.message))
        .collect();
    let from_nats = live_nats.is_some();
    let live = live_nats.unwrap_or_else(|| Live {
        pending: st.backlog.as_ref().map(|b| b.pending).unwrap_or(0),
        in_flight: st.backlog.as_ref().map(|b| b.ack_pending).unwrap_or(0),
        redelivered: st.backlog.as_ref().map(|b| b.redelivered).unwrap_or(0),
        dead_letters: st.dead_letters.unwrap_or(0),
    });
    let mut notes = Vec::new();
    if we.spec.processor.paused {
        notes.push("paused");
    }
    if we.spec.suspend {
        notes.push("suspended");
    }
    Line {
        path: st.path.clone().unwrap_or_else(|| "-".into()),
        ready,
        live,
        from_nats,
        replicas: st
            .replicas
            .as_ref()
            .map(|r| format!("{}/{}", r.ready, r.desired))
            .unwrap_or_else(|| "-".into()),
        note: notes.join(","),
        problems,
        ep,
    }
}

/// Show one endpoint in detail, or every endpoint in a table.
pub async fn run(
    client: kube::Client,
    js: Option<&jetstream::Context>,
    ns: Option<&str>,
    one: Option<&EndpointRef>,
) -> Result<()> {
    let list: Vec<WebhookEndpoint> = match one {
        Some(ep) => {
            let api: Api<WebhookEndpoint> = Api::namespaced(client, &ep.namespace);
            vec![api.get(&ep.name).await.with_context(|| {
                format!(
                    "getting WebhookEndpoint {ep} (does it exist? `kubectl get whe -n {}`)",
                    ep.namespace
                )
            })?]
        }
        None => {
            let api: Api<WebhookEndpoint> = match ns {
                Some(ns) => Api::namespaced(client, ns),
                None => Api::all(client),
            };
            api.list(&ListParams::default())
                .await
                .context("listing WebhookEndpoints (is the Spillway CRD installed?)")?
                .items
        }
    };
    let mut lines = Vec::new();
    for we in &list {
        let ep = EndpointRef {
            namespace: we.metadata.namespace.clone().unwrap_or_default(),
            name: we.metadata.name.clone().unwrap_or_default(),
        };
        let l = match js {
            Some(js) => live(js, we, &ep).await.ok(),
            None => None,
        };
        lines.push(line(we, l));
    }
    let mut out = std::io::stdout().lock();
    if lines.is_empty() {
        writeln!(out, "no WebhookEndpoints found")?;
        return Ok(());
    }
    if one.is_some() {
        let l = &lines[0];
        writeln!(out, "Endpoint:      {}", l.ep)?;
        writeln!(out, "Path:          {}", l.path)?;
        writeln!(out, "Ready:         {}", l.ready)?;
        writeln!(out, "Backlog:       {}", l.live.pending)?;
        writeln!(out, "In flight:     {}", l.live.in_flight)?;
        writeln!(out, "Redelivered:   {}", l.live.redelivered)?;
        writeln!(out, "Dead letters:  {}", l.live.dead_letters)?;
        writeln!(out, "Replicas:      {}", l.replicas)?;
        if !l.note.is_empty() {
            writeln!(out, "Note:          {}", l.note)?;
        }
        if !l.from_nats {
            writeln!(
                out,
                "(numbers from the endpoint's status: live JetStream numbers were not available)"
            )?;
        }
        for p in &l.problems {
            writeln!(out, "  {p}")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<32} {:<28} {:<22} {:>8} {:>9} {:>12} {:>8}  NOTE",
        "ENDPOINT", "PATH", "READY", "BACKLOG", "IN FLIGHT", "DEAD LETTERS", "REPLICAS"
    )?;
    for l in &lines {
        writeln!(
            out,
            "{:<32} {:<28} {:<22} {:>8} {:>9} {:>12} {:>8}  {}{}",
            l.ep.to_string(),
            l.path,
            l.ready,
            l.live.pending,
            l.live.in_flight,
            l.live.dead_letters,
            l.replicas,
            l.note,
            if l.from_nats {
                ""
            } else {
                " (from status; no live numbers)"
            }
        )?;
    }
    Ok(())
}

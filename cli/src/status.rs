//! `spillway status`: what each endpoint is doing, from its status and the
//! live JetStream numbers.

use std::io::Write;

use anyhow::{Context, Result};
use async_nats::jetstream;
use kube::api::{Api, ListParams};
use serde::Serialize;
use spillway_api::condition::{self, Status};
use spillway_api::{ReplicaStatus, WebhookEndpoint, WebhookListener};

use crate::endpoint::EndpointRef;
use crate::output::{self, Format};

/// Live numbers from JetStream.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Live {
    /// Waiting to be delivered.
    #[serde(rename = "backlog")]
    pub pending: u64,
    /// Handed to a processor, not yet acknowledged.
    pub in_flight: u64,
    /// Retries so far (messages redelivered).
    pub redelivered: u64,
    /// Dead letters.
    pub dead_letters: u64,
}

/// Where the numbers of a [`Line`] come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// Read live from JetStream.
    Jetstream,
    /// The operator's last `.status` (NATS was unreachable).
    Status,
}

/// One condition of the endpoint's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Cond {
    /// `Ready`, `Accepted`, `StreamReady`, `ProcessorReady`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// CamelCase reason.
    pub reason: String,
    /// What it means.
    pub message: String,
}

/// One endpoint's status: a table row, the detailed view, or one item of
/// `-o json|yaml` (field names in camelCase, see docs/cli.md).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Line {
    /// The endpoint (`namespace`, `name`).
    #[serde(flatten)]
    pub ep: EndpointRef,
    /// Path served, once the operator has set it.
    pub path: Option<String>,
    /// Status of the Ready condition: `True`, `False` or `Unknown`.
    pub ready: String,
    /// Reason of the Ready condition when it is not `True`.
    pub ready_reason: Option<String>,
    /// Backlog, in flight, redelivered and dead letters.
    #[serde(flatten)]
    pub live: Live,
    /// Where `live` comes from.
    pub source: Source,
    /// Processor replicas, once the operator has set them.
    pub replicas: Option<ReplicaStatus>,
    /// `spec.processor.paused`.
    pub paused: bool,
    /// `spec.suspend`.
    pub suspended: bool,
    /// All conditions.
    pub conditions: Vec<Cond>,
    /// The endpoint's WebhookListeners (detailed view of one endpoint
    /// only), from their status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerLine>,
}

/// One WebhookListener of an endpoint, from its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerLine {
    /// `namespace/name`.
    pub listener: String,
    /// Ready: `True`, `False (Reason)` or `Unknown`.
    pub ready: String,
    /// Offered and not yet handed out.
    pub backlog: u64,
    /// Handed out, not acknowledged.
    pub in_flight: u64,
    /// Its dead letters.
    pub dead_letters: u64,
    /// Processor replicas.
    pub replicas: Option<ReplicaStatus>,
}

impl ListenerLine {
    /// A listener's line from its status.
    pub fn of(l: &WebhookListener) -> Self {
        let st = l.status.clone().unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .find(|c| c.type_ == condition::READY)
            .map(|c| {
                if c.status == "True" {
                    c.status.clone()
                } else {
                    format!("{} ({})", c.status, c.reason)
                }
            })
            .unwrap_or_else(|| "Unknown".into());
        let b = st.backlog.unwrap_or_default();
        Self {
            listener: format!(
                "{}/{}",
                l.metadata.namespace.as_deref().unwrap_or_default(),
                l.metadata.name.as_deref().unwrap_or_default()
            ),
            ready,
            backlog: b.pending,
            in_flight: b.ack_pending,
            dead_letters: st.dead_letters.unwrap_or(0),
            replicas: st.replicas,
        }
    }
}

/// The WebhookListeners attached to `ep` (every namespace when the user may
/// list them cluster-wide, else the endpoint's own), sorted.
async fn listeners_of(client: kube::Client, ep: &EndpointRef) -> Vec<ListenerLine> {
    let all: Api<WebhookListener> = Api::all(client.clone());
    let found = match all.list(&ListParams::default()).await {
        Ok(l) => l.items,
        Err(_) => Api::<WebhookListener>::namespaced(client, &ep.namespace)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default(),
    };
    let mut out: Vec<ListenerLine> = found
        .iter()
        .filter(|l| {
            let own = l.metadata.namespace.as_deref().unwrap_or_default();
            l.spec.endpoint_ref.name == ep.name && l.spec.endpoint_namespace(own) == ep.namespace
        })
        .map(ListenerLine::of)
        .collect();
    out.sort_by(|a, b| a.listener.cmp(&b.listener));
    out
}

impl Line {
    /// The READY column: `True`, or `False (Reason)`.
    pub fn ready_text(&self) -> String {
        match &self.ready_reason {
            Some(r) => format!("{} ({r})", self.ready),
            None => self.ready.clone(),
        }
    }

    /// The REPLICAS column: `ready/desired` or `-`.
    pub fn replicas_text(&self) -> String {
        self.replicas
            .as_ref()
            .map(|r| format!("{}/{}", r.ready, r.desired))
            .unwrap_or_else(|| "-".into())
    }

    /// The NOTE column: `paused`, `suspended`, both, or empty.
    pub fn note(&self) -> String {
        let mut notes = Vec::new();
        if self.paused {
            notes.push("paused");
        }
        if self.suspended {
            notes.push("suspended");
        }
        notes.join(",")
    }

    /// Conditions that are not True, one line each.
    pub fn problems(&self) -> Vec<String> {
        self.conditions
            .iter()
            .filter(|c| Status::parse(&c.status) != Status::True)
            .map(|c| format!("{}: {} — {}", c.type_, c.reason, c.message))
            .collect()
    }
}

/// Consumers of an endpoint (one per partition when ordered).
pub fn consumers(we: &WebhookEndpoint, ep: &EndpointRef) -> Vec<String> {
    we.spec.consumers(&ep.names())
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
    let ready_cond = st.conditions.iter().find(|c| c.type_ == condition::READY);
    let source = if live_nats.is_some() {
        Source::Jetstream
    } else {
        Source::Status
    };
    let live = live_nats.unwrap_or_else(|| Live {
        pending: st.backlog.as_ref().map(|b| b.pending).unwrap_or(0),
        in_flight: st.backlog.as_ref().map(|b| b.ack_pending).unwrap_or(0),
        redelivered: st.backlog.as_ref().map(|b| b.redelivered).unwrap_or(0),
        dead_letters: st.dead_letters.unwrap_or(0),
    });
    Line {
        path: st.path.clone(),
        ready: ready_cond
            .map(|c| c.status.clone())
            .unwrap_or_else(|| "Unknown".into()),
        ready_reason: ready_cond
            .filter(|c| Status::of(c) != Status::True)
            .map(|c| c.reason.clone()),
        live,
        source,
        replicas: st.replicas.clone(),
        paused: we.spec.processor.paused,
        suspended: we.spec.suspend,
        conditions: st
            .conditions
            .iter()
            .map(|c| Cond {
                type_: c.type_.clone(),
                status: c.status.clone(),
                reason: c.reason.clone(),
                message: c.message.clone(),
            })
            .collect(),
        listeners: Vec::new(),
        ep,
    }
}

/// Show one endpoint in detail, or every endpoint in a table.
pub async fn run(
    client: kube::Client,
    js: Option<&jetstream::Context>,
    ns: Option<&str>,
    one: Option<&EndpointRef>,
    format: Format,
) -> Result<()> {
    let list: Vec<WebhookEndpoint> = match one {
        Some(ep) => {
            let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ep.namespace);
            vec![api.get(&ep.name).await.with_context(|| {
                format!(
                    "getting WebhookEndpoint {ep} (does it exist? `kubectl get whe -n {}`)",
                    ep.namespace
                )
            })?]
        }
        None => {
            let api: Api<WebhookEndpoint> = match ns {
                Some(ns) => Api::namespaced(client.clone(), ns),
                None => Api::all(client.clone()),
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
        let mut line = line(we, l);
        if one.is_some() {
            line.listeners = listeners_of(client.clone(), &ep).await;
        }
        lines.push(line);
    }
    let mut out = std::io::stdout().lock();
    render(&mut out, &lines, one.is_some(), format)
}

/// Write `lines`: one endpoint in detail (or as one object), several in a
/// table (or as `{"items": [...]}`).
pub fn render(out: &mut impl Write, lines: &[Line], one: bool, format: Format) -> Result<()> {
    let done = match (one, lines.first()) {
        (true, Some(l)) => output::structured(out, format, l)?,
        _ => output::structured(out, format, &output::List { items: lines })?,
    };
    if done {
        return Ok(());
    }
    if lines.is_empty() {
        writeln!(out, "no WebhookEndpoints found")?;
        return Ok(());
    }
    if one {
        let l = &lines[0];
        writeln!(out, "Endpoint:      {}", l.ep)?;
        writeln!(out, "Path:          {}", l.path.as_deref().unwrap_or("-"))?;
        writeln!(out, "Ready:         {}", l.ready_text())?;
        writeln!(out, "Backlog:       {}", l.live.pending)?;
        writeln!(out, "In flight:     {}", l.live.in_flight)?;
        writeln!(out, "Redelivered:   {}", l.live.redelivered)?;
        writeln!(out, "Dead letters:  {}", l.live.dead_letters)?;
        writeln!(out, "Replicas:      {}", l.replicas_text())?;
        let note = l.note();
        if !note.is_empty() {
            writeln!(out, "Note:          {note}")?;
        }
        if l.source == Source::Status {
            writeln!(
                out,
                "(numbers from the endpoint's status: live JetStream numbers were not available)"
            )?;
        }
        for p in l.problems() {
            writeln!(out, "  {p}")?;
        }
        if !l.listeners.is_empty() {
            writeln!(out, "Listeners (from their status):")?;
            writeln!(
                out,
                "  {:<40} {:<24} {:>8} {:>9} {:>12} {:>8}",
                "LISTENER", "READY", "BACKLOG", "IN FLIGHT", "DEAD LETTERS", "REPLICAS"
            )?;
            for x in &l.listeners {
                writeln!(
                    out,
                    "  {:<40} {:<24} {:>8} {:>9} {:>12} {:>8}",
                    x.listener,
                    x.ready,
                    x.backlog,
                    x.in_flight,
                    x.dead_letters,
                    x.replicas
                        .as_ref()
                        .map(|r| format!("{}/{}", r.ready, r.desired))
                        .unwrap_or_else(|| "-".into())
                )?;
            }
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<32} {:<28} {:<22} {:>8} {:>9} {:>12} {:>8}  NOTE",
        "ENDPOINT", "PATH", "READY", "BACKLOG", "IN FLIGHT", "DEAD LETTERS", "REPLICAS"
    )?;
    for l in lines {
        writeln!(
            out,
            "{:<32} {:<28} {:<22} {:>8} {:>9} {:>12} {:>8}  {}{}",
            l.ep.to_string(),
            l.path.as_deref().unwrap_or("-"),
            l.ready_text(),
            l.live.pending,
            l.live.in_flight,
            l.live.dead_letters,
            l.replicas_text(),
            l.note(),
            if l.source == Source::Jetstream {
                ""
            } else {
                " (from status; no live numbers)"
            }
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Line {
        Line {
            ep: EndpointRef {
                namespace: "team".into(),
                name: "gh".into(),
            },
            path: Some("/team/gh".into()),
            ready: "False".into(),
            ready_reason: Some("SinkDown".into()),
            live: Live {
                pending: 4,
                in_flight: 1,
                redelivered: 2,
                dead_letters: 3,
            },
            source: Source::Status,
            replicas: Some(ReplicaStatus {
                desired: 2,
                ready: 1,
            }),
            paused: true,
            suspended: false,
            conditions: vec![Cond {
                type_: "Ready".into(),
                status: "False".into(),
                reason: "SinkDown".into(),
                message: "no ready processor".into(),
            }],
            listeners: Vec::new(),
        }
    }

    #[test]
    fn json_has_stable_camel_case_fields() {
        let mut out = Vec::new();
        render(&mut out, &[sample()], true, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let want = serde_json::json!({
            "namespace": "team", "name": "gh", "path": "/team/gh",
            "ready": "False", "readyReason": "SinkDown",
            "backlog": 4, "inFlight": 1, "redelivered": 2, "deadLetters": 3,
            "source": "status", "replicas": {"desired": 2, "ready": 1},
            "paused": true, "suspended": false,
            "conditions": [{"type": "Ready", "status": "False", "reason": "SinkDown",
                            "message": "no ready processor"}]
        });
        assert_eq!(v, want);

        let mut out = Vec::new();
        render(&mut out, &[sample(), sample()], false, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["items"].as_array().unwrap().len(), 2);
        let mut out = Vec::new();
        render(&mut out, &[], false, Format::Json).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&out).unwrap(),
            serde_json::json!({"items": []})
        );
    }

    #[test]
    fn yaml_and_table() {
        let mut out = Vec::new();
        render(&mut out, &[sample()], true, Format::Yaml).unwrap();
        let y = String::from_utf8(out).unwrap();
        assert!(y.contains("readyReason: SinkDown\n"), "{y}");
        assert!(y.contains("inFlight: 1\n"), "{y}");

        let mut out = Vec::new();
        render(&mut out, &[sample()], true, Format::Table).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("Ready:         False (SinkDown)\n"), "{t}");
        assert!(t.contains("Replicas:      1/2\n"), "{t}");
        assert!(t.contains("Note:          paused\n"), "{t}");
        assert!(t.contains("Ready: SinkDown — no ready processor"), "{t}");
        assert!(!t.contains("Listeners"), "none: no section\n{t}");
    }

    #[test]
    fn listeners_are_listed_in_the_detailed_view() {
        let mut l = sample();
        l.listeners = vec![ListenerLine {
            listener: "team/ci".into(),
            ready: "False (PodsNotReady)".into(),
            backlog: 2,
            in_flight: 1,
            dead_letters: 7,
            replicas: Some(ReplicaStatus {
                desired: 1,
                ready: 0,
            }),
        }];
        let mut out = Vec::new();
        render(&mut out, std::slice::from_ref(&l), true, Format::Table).unwrap();
        let t = String::from_utf8(out).unwrap();
        assert!(t.contains("Listeners (from their status):"), "{t}");
        let row = t
            .lines()
            .find(|r| r.trim_start().starts_with("team/ci"))
            .unwrap_or_else(|| panic!("no listener row in\n{t}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            ["team/ci", "False", "(PodsNotReady)", "2", "1", "7", "0/1"],
            "{row}"
        );
        let mut out = Vec::new();
        render(&mut out, &[l], true, Format::Json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["listeners"][0]["deadLetters"], 7, "{v}");
    }
}

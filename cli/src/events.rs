//! `spillway events`: the stored webhooks of an endpoint with their
//! delivery state per listener, and `spillway events show`: one of them,
//! with its headers, body and attempts.
//!
//! Webhooks come from the history stream (everything accepted, delivered
//! or not, for `stream.maxAge`); their state from the attempt records, one
//! indexed lookup per webhook shown (so `--limit` bounds the work).

use std::collections::VecDeque;
use std::io::Write;

use anyhow::Result;
use async_nats::jetstream;
use clap::ValueEnum;
use serde::Serialize;
use spillway_api::names::BUILTIN_LISTENER;
use spillway_api::wire::{AttemptDecision, AttemptRecord};

use crate::attempts;
use crate::endpoint::EndpointRef;
use crate::history::{Reader, Start, Stored};
use crate::output::{self, Format};
use crate::progress::Progress;

/// Most history messages one `events` listing reads.
const MAX_SCAN: u64 = 100_000;

/// A webhook's delivery state for one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "camelCase")]
pub enum State {
    /// No attempt recorded yet: waiting (or its records have expired).
    Pending,
    /// The sink accepted it.
    Delivered,
    /// The last attempt failed; another follows.
    Failed,
    /// Given up: dead-lettered (or dropped with dead letters off).
    Dead,
}

impl State {
    /// The name used in tables, JSON and `--state`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Failed => "failed",
            State::Dead => "dead",
        }
    }
}

/// The state `records` (one listener's, oldest first) describe.
pub fn state_of(records: &[&AttemptRecord]) -> State {
    match records.last().map(|r| r.decision) {
        None => State::Pending,
        Some(AttemptDecision::Delivered) => State::Delivered,
        Some(AttemptDecision::Retry) => State::Failed,
        Some(AttemptDecision::Dead) => State::Dead,
    }
}

/// One listener's view of a webhook.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerState {
    /// The listener.
    pub listener: String,
    /// Its delivery state.
    pub state: State,
    /// Attempts recorded.
    pub attempts: usize,
    /// The status code of the last answer, if any.
    pub last_status: Option<u16>,
}

/// One stored webhook.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Sequence in the history stream.
    pub seq: u64,
    /// Delivery id.
    pub delivery_id: String,
    /// When the gateway accepted it (RFC 3339).
    pub received_at: String,
    /// The provider's event type ([`spillway_api::event`]), if it names one.
    pub event_type: Option<String>,
    /// Body size in bytes.
    pub size: usize,
    /// Delivery state per listener.
    pub listeners: Vec<ListenerState>,
}

/// A listing.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listing {
    /// `namespace/name`.
    pub endpoint: String,
    /// The webhooks, oldest first.
    pub items: Vec<Event>,
}

/// What to list.
#[derive(Debug, Clone)]
pub struct Query {
    /// Webhooks received since then.
    pub since: time::OffsetDateTime,
    /// Only webhooks in this state (for `listener`, else for any listener).
    pub state: Option<State>,
    /// Only this listener's state.
    pub listener: Option<String>,
    /// The newest this many.
    pub limit: usize,
}

fn event_of(m: &Stored, w: &spillway_api::stored::Webhook) -> Event {
    let body = w.body(&m.payload);
    Event {
        seq: m.seq,
        delivery_id: w.delivery_id.clone().unwrap_or_default(),
        received_at: w.received_at.clone().unwrap_or_else(|| {
            m.time
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        }),
        event_type: spillway_api::event::event_type(|n| w.header(n).map(str::to_owned), body),
        size: body.len(),
        listeners: Vec::new(),
    }
}

/// Each listener's state from `records` (the built-in listener always
/// appears, pending when it has none).
fn listener_states(records: &[AttemptRecord]) -> Vec<ListenerState> {
    let mut names: Vec<&str> = records.iter().map(|r| r.listener.as_str()).collect();
    names.push(BUILTIN_LISTENER);
    names.sort_unstable();
    names.dedup();
    names
        .into_iter()
        .map(|l| {
            let mine: Vec<&AttemptRecord> = records.iter().filter(|r| r.listener == l).collect();
            ListenerState {
                listener: l.to_owned(),
                state: state_of(&mine),
                attempts: mine.len(),
                last_status: mine.last().and_then(|r| r.status),
            }
        })
        .collect()
}

/// List the endpoint's webhooks as `q` asks.
pub async fn rows(js: &jetstream::Context, ep: &EndpointRef, q: &Query) -> Result<Listing> {
    let name = ep.names().history_stream();
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| anyhow::anyhow!("stream {name} not found ({e}); is the endpoint ready?"))?;
    let last = stream.info().await?.state.last_sequence;
    let mut out = Listing {
        endpoint: ep.to_string(),
        items: Vec::new(),
    };
    if last == 0 || q.limit == 0 {
        return Ok(out);
    }
    // The window, newest kept (bounded: a state filter needs a lookup per
    // webhook, done newest first until `limit` match).
    let mut progress = Progress::new("read", 0);
    let mut window: VecDeque<Event> = VecDeque::new();
    let keep = if q.state.is_some() {
        MAX_SCAN as usize
    } else {
        q.limit
    };
    let mut r = Reader::open(js, &name, Start::Time(q.since), last).await?;
    let mut scanned = 0u64;
    while let Some(m) = r.next().await? {
        scanned += 1;
        progress.set_total(scanned + m.pending);
        progress.inc();
        window.push_back(event_of(&m, &m.webhook()));
        if window.len() > keep {
            window.pop_front();
        }
        if scanned >= MAX_SCAN {
            progress.note(&format!(
                "stopped after {MAX_SCAN} webhooks: narrow --since to see later ones"
            ));
            break;
        }
    }
    progress.finish();
    let mut picked = Vec::new();
    while let Some(mut e) = window.pop_back() {
        if picked.len() >= q.limit {
            break;
        }
        let records = attempts::rows(js, ep, &e.delivery_id).await?.items;
        e.listeners = listener_states(&records);
        if let Some(l) = &q.listener {
            e.listeners.retain(|s| &s.listener == l);
        }
        let wanted = q
            .state
            .is_none_or(|s| e.listeners.iter().any(|l| l.state == s));
        if wanted {
            picked.push(e);
        }
    }
    picked.reverse();
    out.items = picked;
    Ok(out)
}

/// Print a listing as a table, JSON or YAML.
pub fn render(out: &mut impl Write, listing: &Listing, format: Format) -> Result<()> {
    if output::structured(out, format, listing)? {
        return Ok(());
    }
    if listing.items.is_empty() {
        writeln!(out, "no webhooks of {} match", listing.endpoint)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<8} {:<24} {:<40} {:<24} STATE",
        "SEQ", "RECEIVED", "DELIVERY ID", "EVENT"
    )?;
    for e in &listing.items {
        let states = e
            .listeners
            .iter()
            .map(|l| format!("{}={}({})", l.listener, l.state.as_str(), l.attempts))
            .collect::<Vec<_>>()
            .join(" ");
        writeln!(
            out,
            "{:<8} {:<24} {:<40} {:<24} {}",
            e.seq,
            e.received_at,
            e.delivery_id,
            e.event_type.as_deref().unwrap_or("-"),
            states
        )?;
    }
    Ok(())
}

/// Header names whose values are not shown by `events show`: signatures
/// and anything named like a credential.
pub fn redacted(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "signature",
        "token",
        "secret",
        "hmac",
        "authorization",
        "api-key",
        "apikey",
        "password",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// One webhook in full.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Shown {
    /// `namespace/name`.
    pub endpoint: String,
    /// What `events` lists.
    #[serde(flatten)]
    pub event: Event,
    /// The subject it is stored under.
    pub subject: String,
    /// The stored headers, signature and credential values redacted.
    pub headers: Vec<(String, String)>,
    /// The body (with `--body`), as text when it is UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Every recorded attempt.
    pub attempts: Vec<AttemptRecord>,
}

/// Read one webhook with its attempts.
pub async fn show(
    js: &jetstream::Context,
    ep: &EndpointRef,
    id: &str,
    since: Option<time::OffsetDateTime>,
    body: bool,
) -> Result<Shown> {
    let records = attempts::rows(js, ep, id).await?.items;
    let (m, _) = crate::redeliver::find(js, ep, id, &records, since).await?;
    let w = m.webhook();
    let mut event = event_of(&m, &w);
    event.listeners = listener_states(&records);
    // Either stored format is shown in one shape: the NATS headers, and
    // for format 2 the metadata and provider headers as format 1 named them.
    let nats = m.headers.iter().flat_map(|(k, vs)| {
        let k: &str = k.as_ref();
        vs.iter()
            .map(move |v| (k.to_owned(), v.as_str().to_owned()))
    });
    let stored = if w.format == Some(spillway_api::stored::Format::V2) {
        w.as_headers()
    } else {
        Vec::new()
    };
    let mut headers: Vec<(String, String)> = nats
        .chain(stored)
        .map(|(k, v)| {
            let v = if redacted(&k) {
                "<redacted>".to_owned()
            } else {
                v
            };
            (k, v)
        })
        .collect();
    headers.sort();
    Ok(Shown {
        endpoint: ep.to_string(),
        event,
        subject: m.subject.clone(),
        headers,
        body: body.then(|| String::from_utf8_lossy(w.body(&m.payload)).into_owned()),
        attempts: records,
    })
}

/// Print one webhook.
pub fn render_shown(out: &mut impl Write, s: &Shown, format: Format) -> Result<()> {
    if output::structured(out, format, s)? {
        return Ok(());
    }
    let e = &s.event;
    writeln!(out, "Endpoint:     {}", s.endpoint)?;
    writeln!(out, "Delivery id:  {}", e.delivery_id)?;
    writeln!(out, "Received:     {}", e.received_at)?;
    writeln!(
        out,
        "Event type:   {}",
        e.event_type.as_deref().unwrap_or("-")
    )?;
    writeln!(out, "History seq:  {} ({})", e.seq, s.subject)?;
    writeln!(out, "Headers:")?;
    for (k, v) in &s.headers {
        writeln!(out, "  {k}: {v}")?;
    }
    match &s.body {
        Some(b) => writeln!(out, "Body ({} bytes):\n{b}", e.size)?,
        None => writeln!(out, "Body:         {} bytes (--body prints it)", e.size)?,
    }
    writeln!(out, "Attempts:")?;
    let listing = attempts::Listing {
        endpoint: s.endpoint.clone(),
        delivery_id: e.delivery_id.clone(),
        items: s.attempts.clone(),
    };
    attempts::render(out, &listing, Format::Table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(listener: &str, attempt: u32, decision: AttemptDecision) -> AttemptRecord {
        AttemptRecord {
            delivery_id: "d".into(),
            received_at: None,
            listener: listener.into(),
            attempt,
            stream_sequence: 1,
            started_at: format!("2026-12-05T10:00:0{attempt}.000Z"),
            duration_ms: 1,
            status: Some(if decision == AttemptDecision::Delivered {
                200
            } else {
                503
            }),
            error: None,
            response: None,
            decision,
            pod: "p".into(),
        }
    }

    #[test]
    fn the_last_attempt_decides_the_state() {
        use AttemptDecision::*;
        let states = listener_states(&[
            rec("processor", 1, Retry),
            rec("processor", 2, Delivered),
            rec("bot", 1, Retry),
        ]);
        let got: Vec<(&str, State, usize)> = states
            .iter()
            .map(|s| (s.listener.as_str(), s.state, s.attempts))
            .collect();
        assert_eq!(
            got,
            [
                ("bot", State::Failed, 1),
                ("processor", State::Delivered, 2)
            ]
        );
        assert_eq!(state_of(&[]), State::Pending);
        assert_eq!(state_of(&[&rec("x", 3, Dead)]), State::Dead);
        // No records: the built-in listener is pending.
        let none = listener_states(&[]);
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].state, State::Pending);
    }

    #[test]
    fn credentials_and_signatures_are_redacted() {
        for name in [
            "Spillway-Orig-X-Hub-Signature-256",
            "Spillway-Orig-Stripe-Signature",
            "Spillway-Orig-Webhook-Signature",
            "Spillway-Orig-X-Shopify-Hmac-Sha256",
            "Spillway-Orig-X-Api-Key",
        ] {
            assert!(redacted(name), "{name}");
        }
        for name in [
            "Spillway-Orig-X-Github-Event",
            "Spillway-Delivery-Id",
            "Content-Type",
        ] {
            assert!(!redacted(name), "{name}");
        }
    }
}

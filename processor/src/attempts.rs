//! Attempt records: one JSON record per delivery attempt
//! ([`AttemptRecord`]), published to the endpoint's attempt stream on the
//! subject of its delivery id, so `spillway attempts` finds every attempt
//! at one webhook by subject.
//!
//! Recording never blocks or fails a delivery: records go through a bounded
//! queue to a background task that publishes them with a bounded number of
//! acknowledgements outstanding. A full queue, a refused publish or an
//! unconfirmed one is counted in `spillway_processor_attempt_records_failed_total`
//! and otherwise ignored.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::body::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use spillway_api::names::EndpointNames;
use spillway_api::wire::{AttemptDecision, AttemptError, AttemptRecord, AttemptsConfig};
use tokio::sync::mpsc;

use crate::metrics::{Metrics, RecordFailureLabels};
use crate::outcome::AttemptResult;

/// Records waiting to be published; more are dropped (and counted).
const QUEUE: usize = 4096;

/// Publishes awaiting JetStream's acknowledgement at once.
const IN_FLIGHT: usize = 256;

/// Longest a record's acknowledgement is waited for.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything an attempt record says about one attempt.
#[derive(Debug, Clone)]
pub struct Attempt<'a> {
    /// The webhook's delivery id.
    pub delivery_id: &'a str,
    /// When the gateway accepted it (`Spillway-Received-At`), if known.
    pub received_at: Option<&'a str>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The work-stream sequence of the copy delivered (a retry is a copy
    /// put back after the original, with a later sequence).
    pub stream_sequence: u64,
    /// When the request started.
    pub started_at: jiff::Timestamp,
    /// How long it took.
    pub took: Duration,
    /// What the sink did.
    pub result: &'a AttemptResult,
    /// What followed.
    pub decision: AttemptDecision,
}

/// Why an attempt got no answer, from the transport's description. TLS
/// failures surface as connect errors whose cause names the certificate or
/// the handshake.
pub fn error_class(result: &AttemptResult) -> Option<AttemptError> {
    let tls = |m: &str| {
        let m = m.to_ascii_lowercase();
        m.contains("certificate") || m.contains("tls") || m.contains("handshake")
    };
    match result {
        AttemptResult::Response { .. } => None,
        AttemptResult::Timeout => Some(AttemptError::Timeout),
        AttemptResult::Connect(m) if tls(m) => Some(AttemptError::Tls),
        AttemptResult::Connect(_) => Some(AttemptError::Connect),
        AttemptResult::Transport(m) if tls(m) => Some(AttemptError::Tls),
        AttemptResult::Transport(_) => Some(AttemptError::Transport),
    }
}

/// The record of `a`, made by `listener` in `pod`; the answer's excerpt
/// only with `record_body`.
pub fn record_of(a: &Attempt<'_>, listener: &str, pod: &str, record_body: bool) -> AttemptRecord {
    let response = match a.result {
        AttemptResult::Response { excerpt, .. } if record_body => Some(excerpt.clone()),
        _ => None,
    };
    AttemptRecord {
        delivery_id: a.delivery_id.to_owned(),
        received_at: a.received_at.map(str::to_owned),
        listener: listener.to_owned(),
        attempt: a.attempt,
        stream_sequence: a.stream_sequence,
        started_at: format!("{:.3}", a.started_at),
        duration_ms: u64::try_from(a.took.as_millis()).unwrap_or(u64::MAX),
        status: a.result.status(),
        error: error_class(a.result),
        response,
        decision: a.decision,
        pod: pod.to_owned(),
    }
}

/// Hands attempt records to the background publisher.
#[derive(Debug, Clone)]
pub struct Recorder {
    tx: mpsc::Sender<(String, Bytes)>,
    names: EndpointNames,
    config: AttemptsConfig,
    pod: String,
    metrics: Arc<Metrics>,
}

impl Recorder {
    /// Start the publisher for `endpoint` (`namespace/name`); it ends when
    /// every `Recorder` is dropped and the queue is empty.
    pub fn start(
        js: jetstream::Context,
        endpoint: &str,
        config: AttemptsConfig,
        pod: String,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (ns, name) = endpoint.split_once('/').unwrap_or(("", endpoint));
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(publish(js, rx, metrics.clone()));
        Self {
            tx,
            names: EndpointNames::new(ns, name),
            config,
            pod,
            metrics,
        }
    }

    /// Queue the record of `a`; never waits.
    pub fn record(&self, a: &Attempt<'_>) {
        let rec = record_of(
            a,
            &self.config.listener,
            &self.pod,
            self.config.record_response_body,
        );
        let subject = self
            .names
            .attempt_subject(&self.config.listener, a.delivery_id);
        let payload = match serde_json::to_vec(&rec) {
            Ok(p) => Bytes::from(p),
            Err(_) => return,
        };
        if self.tx.try_send((subject, payload)).is_err() {
            self.failed("queue_full");
        }
    }

    fn failed(&self, reason: &'static str) {
        failed(&self.metrics, reason);
    }
}

fn failed(metrics: &Metrics, reason: &'static str) {
    metrics
        .attempt_record_failures
        .get_or_create(&RecordFailureLabels { reason })
        .inc();
}

/// Publish queued records, at most [`IN_FLIGHT`] unacknowledged.
async fn publish(
    js: jetstream::Context,
    mut rx: mpsc::Receiver<(String, Bytes)>,
    metrics: Arc<Metrics>,
) {
    let mut acks = FuturesUnordered::new();
    let mut open = true;
    while open || !acks.is_empty() {
        tokio::select! {
            next = rx.recv(), if open && acks.len() < IN_FLIGHT => match next {
                Some((subject, payload)) => match js.publish(subject, payload).await {
                    Ok(ack) => acks.push(tokio::time::timeout(ACK_TIMEOUT, ack.into_future())),
                    Err(_) => failed(&metrics, "publish"),
                },
                None => open = false,
            },
            Some(done) = acks.next(), if !acks.is_empty() => match done {
                Ok(Ok(_)) => {
                    metrics.attempt_records.inc();
                }
                _ => failed(&metrics, "publish"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(result: &AttemptResult) -> Attempt<'_> {
        Attempt {
            delivery_id: "provider:github:1",
            received_at: Some("2026-12-05T09:59:59.000Z"),
            attempt: 2,
            stream_sequence: 7,
            started_at: "2026-12-05T10:00:00.123456Z".parse().unwrap(),
            took: Duration::from_millis(42),
            result,
            decision: AttemptDecision::Retry,
        }
    }

    #[test]
    fn a_record_says_what_the_sink_answered() {
        let r = AttemptResult::Response {
            status: 503,
            retry_after: None,
            excerpt: "busy".into(),
        };
        let rec = record_of(&attempt(&r), "processor", "pod-1", true);
        assert_eq!(rec.status, Some(503));
        assert_eq!(rec.error, None);
        assert_eq!(rec.response.as_deref(), Some("busy"));
        assert_eq!(rec.started_at, "2026-12-05T10:00:00.123Z");
        assert_eq!(
            (rec.attempt, rec.stream_sequence, rec.duration_ms),
            (2, 7, 42)
        );
        assert_eq!(rec.pod, "pod-1");
        let json = serde_json::to_value(&rec).unwrap();
        assert_eq!(json["decision"], "retry");
        assert_eq!(json["deliveryId"], "provider:github:1");
        // recordResponseBody: false keeps status and timing only.
        let quiet = record_of(&attempt(&r), "processor", "pod-1", false);
        assert_eq!(quiet.response, None);
        assert_eq!(quiet.status, Some(503));
    }

    #[test]
    fn failures_are_classified() {
        let cases = [
            (AttemptResult::Timeout, AttemptError::Timeout),
            (
                AttemptResult::Connect("error trying to connect: Connection refused".into()),
                AttemptError::Connect,
            ),
            (
                AttemptResult::Connect(
                    "error trying to connect: invalid peer certificate: UnknownIssuer".into(),
                ),
                AttemptError::Tls,
            ),
            (
                AttemptResult::Transport("connection reset by peer".into()),
                AttemptError::Transport,
            ),
        ];
        for (r, want) in cases {
            let rec = record_of(&attempt(&r), "processor", "p", true);
            assert_eq!(rec.error, Some(want), "{r:?}");
            assert_eq!(rec.status, None);
            assert_eq!(rec.response, None);
        }
    }
}

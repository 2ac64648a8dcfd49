//! The contract between the gateway, the processor and the CLI: NATS message
//! headers, and the processor's configuration as rendered by the operator.
//!
//! The gateway publishes each accepted webhook to
//! [`EndpointNames::subject`](crate::names::EndpointNames::subject) in the
//! stored format of [`crate::stored`]: format 2 keeps the metadata named
//! below (`ENDPOINT` … `ORDERING_KEY`) in a head in front of the body,
//! format 1 as NATS headers. The processor delivers it and, when it gives
//! up, publishes payload and headers plus the `DLQ_*` headers to the
//! dead-letter subject; retry bookkeeping (`ATTEMPTS_SPENT`, `RETRY_AT`,
//! `RETRY_OF`, `REQUEUED_AT`) is always a NATS header.

use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;

/// JetStream's deduplication header (set from the delivery id).
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";
/// `namespace/name` of the WebhookEndpoint.
pub const ENDPOINT: &str = "Spillway-Endpoint";
/// The provider's delivery id (or the body hash when it has none).
pub const DELIVERY_ID: &str = "Spillway-Delivery-Id";
/// When the gateway accepted the request, RFC 3339 with milliseconds, UTC.
pub const RECEIVED_AT: &str = "Spillway-Received-At";
/// The request's Content-Type.
pub const CONTENT_TYPE: &str = "Content-Type";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The provider's W3C `tracestate`, stored beside `traceparent` as it came
/// (when valid) and forwarded with every delivery.
pub const TRACESTATE: &str = "tracestate";
/// The ordering key, when the endpoint is ordered.
pub const ORDERING_KEY: &str = "Spillway-Ordering-Key";
/// Stored format 1 keeps the original request headers under this prefix
/// (e.g. `Spillway-Orig-X-GitHub-Event`); format 2 keeps them as received
/// in its head. Hop-by-hop headers, cookies and authorization headers are
/// not kept in either.
pub const ORIGINAL_HEADER_PREFIX: &str = "Spillway-Orig-";

/// Why the message was dead-lettered (short machine-readable reason such as
/// `max_attempts`, `client_error`, `gone`).
pub const DLQ_REASON: &str = "Spillway-Dlq-Reason";
/// Human-readable detail of the last failure (never contains secrets).
pub const DLQ_DETAIL: &str = "Spillway-Dlq-Detail";
/// Attempts made before giving up.
pub const DLQ_ATTEMPTS: &str = "Spillway-Dlq-Attempts";
/// HTTP status of the last attempt, if there was a response.
pub const DLQ_LAST_STATUS: &str = "Spillway-Dlq-Last-Status";
/// Stream sequence of the original message.
pub const DLQ_ORIGINAL_SEQ: &str = "Spillway-Dlq-Original-Seq";
/// Subject of the original message (redrive publishes back to it).
pub const DLQ_ORIGINAL_SUBJECT: &str = "Spillway-Dlq-Original-Subject";
/// When the message was dead-lettered, RFC 3339 UTC.
pub const DLQ_FAILED_AT: &str = "Spillway-Dlq-Failed-At";

/// Delivery attempts a retried copy has already been through (absent on a
/// first copy). The attempt number of a delivery is this plus JetStream's
/// delivery count of the copy in hand.
pub const ATTEMPTS_SPENT: &str = "Spillway-Attempts-Spent";
/// When a copy was put back by `spillway dlq redrive` or `spillway
/// replay` (RFC 3339 UTC): a webhook's age for `stream.maxAge` counts from
/// the later of this and [`RECEIVED_AT`], so an old dead letter redriven on
/// purpose is not expired at once.
pub const REQUEUED_AT: &str = "Spillway-Requeued-At";
/// When a parked retry is due, Unix milliseconds.
pub const RETRY_AT: &str = "Spillway-Retry-At";
/// On a retried copy in the main stream: the stream sequence of the message
/// whose delivery failed first (the webhook as the gateway stored it).
/// `replay` skips copies that carry it: the original is replayed instead.
pub const RETRY_OF: &str = "Spillway-Retry-Of";

/// Where the gateway took a webhook's deduplication id from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdSource {
    /// The provider's delivery id (header or body field of the scheme).
    Provider,
    /// SHA-256 of the body.
    Body,
    /// The header named in `deduplication.header`.
    Header,
}

/// `Nats-Msg-Id` of a webhook the gateway stores. Deduplication ids live in
/// disjoint namespaces: the gateway's start with `provider:`, `body:` or
/// `header:`, Spillway's own (parked and due retries, dead letters,
/// redrives, replays) with `spillway:`, so no request, whatever delivery id
/// it carries, can make its id equal an internal one (a forged
/// `redrive-…` id once made a later redrive believe its copy existed and
/// delete the dead letter).
pub fn intake_msg_id(source: IdSource, id: &str) -> String {
    let kind = match source {
        IdSource::Provider => "provider:",
        IdSource::Body => "body:",
        IdSource::Header => "header:",
    };
    // On every request: one allocation, no formatting machinery.
    let mut out = String::with_capacity(kind.len() + id.len());
    out.push_str(kind);
    out.push_str(id);
    out
}

/// `Nats-Msg-Id` of the dead letter of the message at `seq` of `stream`,
/// published at `published_unix_nanos` (its JetStream timestamp): the same
/// for the same stored message, so a dead-letter publish repeated after a
/// lost acknowledgement is deduplicated, and different for the message at
/// the same sequence of a recreated stream.
pub fn dead_letter_msg_id(stream: &str, seq: u64, published_unix_nanos: i128) -> String {
    format!("spillway:dlq:{stream}:{seq}:{published_unix_nanos}")
}

/// `Nats-Msg-Id` a dead letter at `seq` of `dead_letter_stream` is
/// redriven with: new relative to the original (not deduplicated against
/// it), the same for the same dead letter, so a redrive interrupted between
/// publish and delete and run again is deduplicated instead of delivered
/// twice.
pub fn redrive_msg_id(dead_letter_stream: &str, seq: u64) -> String {
    format!("spillway:redrive:{dead_letter_stream}:{seq}")
}

/// `Nats-Msg-Id` of a replayed copy: unique per replay run and original
/// sequence, so a run repeated with the same `--replay-id` publishes
/// nothing twice within the stream's duplicate window.
pub fn replay_msg_id(run: &str, seq: u64) -> String {
    format!("spillway:replay:{run}:{seq}")
}

/// `Nats-Msg-Id` of a copy `spillway redeliver` makes of the webhook at
/// `seq` of the history stream `stream`: unique per run, so each command
/// makes one new delivery, and a publish retried within the run is
/// deduplicated.
pub fn redeliver_msg_id(stream: &str, seq: u64, run: &str) -> String {
    format!("spillway:redeliver:{stream}:{seq}:{run}")
}

/// `Nats-Msg-Id` of the parked copy of the message at `seq` of `stream`:
/// a pod that dies after parking and before acknowledging delivers the
/// message again and parks it again, which JetStream then deduplicates.
/// Internal ids start with `spillway:`; see also [`due_msg_id`].
pub fn park_msg_id(stream: &str, seq: u64) -> String {
    format!("spillway:park:{stream}:{seq}")
}

/// `Nats-Msg-Id` of the due copy made from the parked retry at `seq` of
/// the retry stream `stream`.
pub fn due_msg_id(stream: &str, seq: u64) -> String {
    format!("spillway:due:{stream}:{seq}")
}

/// Prefix of the dead-letter headers above (`Spillway-Dlq-*`).
pub const DLQ_HEADER_PREFIX: &str = "Spillway-Dlq-";

/// The headers of a stored message worth carrying over when it is published
/// again (dead-lettered, redriven, replayed): all of them except its
/// NATS's own (`Nats-*`: [`NATS_MSG_ID`], and what a republish adds), any
/// dead-letter headers (`Spillway-Dlq-*`) and the retry
/// bookkeeping ([`ATTEMPTS_SPENT`], [`RETRY_AT`], [`RETRY_OF`]: a dead
/// letter, redrive or replay starts counting afresh), matched
/// case-insensitively. The caller adds the new message id (cargo feature
/// `nats`).
#[cfg(feature = "nats")]
pub fn carried_headers(original: &async_nats::HeaderMap) -> async_nats::HeaderMap {
    let mut out = async_nats::HeaderMap::new();
    for (name, values) in original.iter() {
        let n: &str = name.as_ref();
        let dead_letter = n
            .get(..DLQ_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(DLQ_HEADER_PREFIX));
        let retry = [ATTEMPTS_SPENT, RETRY_AT, RETRY_OF]
            .iter()
            .any(|h| n.eq_ignore_ascii_case(h));
        // NATS's own headers (`Nats-Msg-Id`, and those a republish adds:
        // `Nats-Stream`, `Nats-Sequence`, …) describe the stored copy, not
        // the webhook.
        let nats = n.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("Nats-"));
        if nats || dead_letter || retry {
            continue;
        }
        for v in values {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// Environment variable holding [`ProcessorConfig`] as JSON.
pub const PROCESSOR_CONFIG_ENV: &str = "SPILLWAY_PROCESSOR_CONFIG";

/// Everything a processor needs to serve one endpoint. The operator renders
/// it into the processor Deployment (a change rolls the pods); in tests and
/// the local run it is passed to a local process the same way.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessorConfig {
    /// `namespace/name` of the WebhookEndpoint (for logs and metrics).
    pub endpoint: String,
    /// The main stream.
    pub stream: String,
    /// Durable consumers to pull from: one, or one per partition when the
    /// endpoint is ordered (each with maxAckPending 1).
    pub consumers: Vec<String>,
    /// Subject of the dead-letter stream; `None` when dead letters are off.
    pub dead_letter_subject: Option<String>,
    /// Absolute URL deliveries are POSTed to.
    pub sink_url: String,
    /// Cap on deliveries in flight across all replicas.
    pub concurrency: u32,
    /// Cap on deliveries in flight in this pod. Unordered: the whole
    /// `concurrency` (JetStream's `maxAckPending` caps all pods together).
    /// Ordered: `concurrency` split over the maximum replica count, at least
    /// 1 (there the consumers' total `maxAckPending` is the partition count).
    pub concurrency_per_replica: u32,
    /// Most processor pods the operator runs (splits the rate limit);
    /// 0 in older configs: derived from the concurrency split.
    #[serde(default)]
    pub max_replicas: u32,
    /// Where failed deliveries wait out their delay; `None`: they wait
    /// with a delayed NAK on their own consumer (ordered endpoints, where
    /// that wait is the head-of-line blocking ordering asks for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryConfig>,
    /// Consumers of an older layout's stream that still hold undelivered
    /// webhooks (an endpoint being migrated): served as well until the
    /// operator removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain: Option<DrainConfig>,
    /// A webhook received longer ago than this (Go-style duration) is
    /// dead-lettered with reason `expired` instead of delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<GoDuration>,
    /// Per-delivery timeout, Go-style duration.
    pub timeout: GoDuration,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Retry delays, Go-style durations; the last repeats.
    pub backoff: Vec<GoDuration>,
    /// Deliveries per second across all replicas, if limited.
    pub rate_limit_per_second: Option<u32>,
    /// Stop pulling while true.
    pub paused: bool,
    /// Path of a file holding the outbound signing secret, if signing is on.
    pub signing_secret_file: Option<String>,
    /// Record every attempt in the endpoint's attempt stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<AttemptsConfig>,
    /// A WebhookListener's selection (`eventTypes`, `filter`); absent:
    /// every webhook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterConfig>,
}

/// A listener's selection, compiled by the processor with
/// `spillway_api::filter::Filter` (the operator has compiled it before).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FilterConfig {
    /// Event types received (`*` suffix: prefix match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// CEL expression over `headers`, `body` and `event`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<String>,
}

/// Where a processor records its delivery attempts (absent in configs of
/// an operator that predates attempt records: nothing is recorded).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttemptsConfig {
    /// The listener's name (a token of the attempt subjects).
    pub listener: String,
    /// Keep the first bytes of the sink's answer in each record.
    #[serde(default = "yes")]
    pub record_response_body: bool,
}

fn yes() -> bool {
    true
}

/// One delivery attempt, as recorded in the endpoint's attempt stream
/// (`EndpointNames::attempt_subject`). JSON; carries no secrets: no request
/// headers, the sink only as its listener's name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AttemptRecord {
    /// The webhook's delivery id (`Spillway-Delivery-Id`).
    pub delivery_id: String,
    /// Which listener made the attempt.
    pub listener: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the gateway accepted the webhook (`Spillway-Received-At`),
    /// when known: where `spillway redeliver` starts looking in the history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<String>,
    /// The work-stream sequence of the copy delivered (a retry is a copy
    /// put back after the original, with a later sequence).
    pub stream_sequence: u64,
    /// When the request started (RFC 3339, UTC).
    pub started_at: String,
    /// How long it took until the answer (or the failure), milliseconds.
    pub duration_ms: u64,
    /// The sink's status code, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why there was no answer, when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AttemptError>,
    /// The first 256 bytes of the answer's body, control characters
    /// removed (absent with `recordResponseBody: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    /// What followed: `delivered`, `retry` or `dead`.
    pub decision: AttemptDecision,
    /// The processor pod that made it.
    pub pod: String,
}

/// Why an attempt got no answer.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AttemptError {
    /// No complete answer within the delivery timeout.
    Timeout,
    /// The connection could not be made (refused, DNS, unreachable).
    Connect,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// The connection failed after it was made (reset, protocol error).
    Transport,
}

impl AttemptError {
    /// The name used in records and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptError::Timeout => "timeout",
            AttemptError::Connect => "connect",
            AttemptError::Tls => "tls",
            AttemptError::Transport => "transport",
        }
    }
}

/// What followed an attempt.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AttemptDecision {
    /// Acknowledged: the webhook is delivered.
    Delivered,
    /// Another attempt follows after a backoff.
    Retry,
    /// Dead-lettered (or dropped when dead letters are off).
    Dead,
}

impl AttemptDecision {
    /// The name used in records and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptDecision::Delivered => "delivered",
            AttemptDecision::Retry => "retry",
            AttemptDecision::Dead => "dead",
        }
    }
}

/// The retry stream a processor parks failed deliveries in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    /// The retry stream.
    pub stream: String,
    /// Subject parked retries are published to.
    pub subject: String,
    /// Durable consumer holding them until due.
    pub consumer: String,
    /// Subject of the main stream a due retry is published back to.
    pub due_subject: String,
}

/// Consumers of another stream to serve as well (see
/// [`ProcessorConfig::drain`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DrainConfig {
    /// The stream.
    pub stream: String,
    /// Its durable consumers.
    pub consumers: Vec<String>,
}

/// What a [`SinkNotice`] reports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// The sink answered 410 Gone: it says it no longer exists, and
    /// deliveries are being dead-lettered.
    SinkGone,
    /// The sink accepted a delivery (2xx) after a pod of the endpoint
    /// reported it gone.
    SinkOk,
}

impl NoticeKind {
    /// The JSON spelling (also a metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::SinkGone => "sink_gone",
            NoticeKind::SinkOk => "sink_ok",
        }
    }
}

/// A processor's report about its sink, published as JSON on core NATS
/// (no JetStream, no reply) to
/// [`EndpointNames::notice_subject`](crate::names::EndpointNames::notice_subject).
/// The operator turns it into the endpoint's `SinkAvailable` condition, as
/// processors have no Kubernetes API access. Carries no secrets: the sink
/// is given without userinfo, query or fragment ([`redact_url`]).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SinkNotice {
    /// What happened.
    pub kind: NoticeKind,
    /// `namespace/name` of the WebhookEndpoint (must match the subject).
    pub endpoint: String,
    /// HTTP status the sink answered.
    pub status: u16,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// The reporting pod.
    pub pod: String,
    /// The sink URL as [`redact_url`] shows it.
    pub sink: String,
}

/// A URL without userinfo, query and fragment (`scheme://host[:port]/path`),
/// for notices, status messages and logs. Input that is not an absolute URL
/// is cut the same way, best effort.
pub fn redact_url(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    match scheme {
        Some(s) => format!("{s}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_ids_never_equal_internal_ids() {
        // Whatever id a request carries, the gateway's msg id has a prefix
        // no internal id has.
        for forged in [
            "spillway:redrive:spillway_a_b_dlq:4",
            "redrive-spillway_a_b_dlq-4",
            "spillway:dlq:x:1:2",
        ] {
            for src in [IdSource::Provider, IdSource::Body, IdSource::Header] {
                let id = intake_msg_id(src, forged);
                assert!(!id.starts_with("spillway:"), "{id}");
                assert_ne!(id, redrive_msg_id("spillway_a_b_dlq", 4));
            }
        }
        assert_ne!(
            intake_msg_id(IdSource::Provider, "x"),
            intake_msg_id(IdSource::Header, "x")
        );
        for internal in [
            redrive_msg_id("s", 1),
            replay_msg_id("r", 1),
            dead_letter_msg_id("s", 1, 5),
            park_msg_id("s", 1),
            due_msg_id("s", 1),
        ] {
            assert!(internal.starts_with("spillway:"), "{internal}");
        }
        // A recreated stream's message at the same sequence has another
        // dead-letter id.
        assert_ne!(dead_letter_msg_id("s", 1, 5), dead_letter_msg_id("s", 1, 6));
    }

    #[test]
    fn redacted_urls_keep_only_scheme_host_and_path() {
        assert_eq!(
            redact_url("https://user:pa%40ss@sink.example:8443/hooks/in?token=s3cr3t#x"),
            "https://sink.example:8443/hooks/in"
        );
        assert_eq!(
            redact_url("http://app.team.svc:8080/hooks"),
            "http://app.team.svc:8080/hooks"
        );
        assert_eq!(redact_url("http://a@b@host?q"), "http://host");
        assert_eq!(redact_url("http://host/p@th"), "http://host/p@th");
        assert_eq!(redact_url("not a url?k=v"), "not a url");
    }

    #[test]
    fn notices_round_trip_as_camel_case_json() {
        let n = SinkNotice {
            kind: NoticeKind::SinkGone,
            endpoint: "default/gh".into(),
            status: 410,
            at: "2026-01-01T00:00:00Z".into(),
            pod: "gh-processor-abc".into(),
            sink: "http://app/hooks".into(),
        };
        let json = serde_json::to_string(&n).unwrap();
        assert!(json.contains(r#""kind":"sink_gone""#), "{json}");
        assert_eq!(serde_json::from_str::<SinkNotice>(&json).unwrap(), n);
        assert_eq!(NoticeKind::SinkOk.as_str(), "sink_ok");
    }

    #[cfg(feature = "nats")]
    #[test]
    fn carried_headers_drop_the_message_id_and_dead_letter_headers() {
        let mut h = async_nats::HeaderMap::new();
        h.insert(NATS_MSG_ID, "orig");
        h.insert(DELIVERY_ID, "evt_1");
        h.insert(DLQ_REASON, "client_error");
        h.insert("spillway-dlq-custom", "x");
        h.insert("spillway-attempts-spent", "3");
        h.insert(RETRY_AT, "1");
        h.insert(RETRY_OF, "7");
        h.insert("Nats-Sequence", "12");
        h.insert("Spillway-Orig-X-Event", "push");
        h.append("Spillway-Orig-X-Multi", "1");
        h.append("Spillway-Orig-X-Multi", "2");
        let out = carried_headers(&h);
        let names: Vec<String> = out.iter().map(|(n, _)| n.to_string()).collect();
        assert!(out.get(NATS_MSG_ID).is_none(), "{names:?}");
        assert!(out.get(DLQ_REASON).is_none(), "{names:?}");
        assert!(out.get("spillway-dlq-custom").is_none(), "{names:?}");
        assert!(out.get(ATTEMPTS_SPENT).is_none(), "{names:?}");
        assert!(out.get(RETRY_OF).is_none(), "{names:?}");
        assert_eq!(out.get(DELIVERY_ID).map(|v| v.as_str()), Some("evt_1"));
        assert_eq!(
            out.get("Spillway-Orig-X-Event").map(|v| v.as_str()),
            Some("push")
        );
        assert_eq!(out.get_all("Spillway-Orig-X-Multi").count(), 2);
        assert_eq!(out.iter().count(), 3, "{names:?}");
    }
}

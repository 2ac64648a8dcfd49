//! The contract between the gateway, the processor and the CLI: NATS message
//! headers, and the processor's configuration as rendered by the operator.
//!
//! The gateway publishes each accepted webhook to
//! [`EndpointNames::subject`](crate::names::EndpointNames::subject) with the
//! raw request body as payload and the headers below. The processor delivers
//! it and, when it gives up, publishes payload and headers plus the `DLQ_*`
//! headers to the dead-letter subject.

use serde::{Deserialize, Serialize};

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
/// The ordering key, when the endpoint is ordered.
pub const ORDERING_KEY: &str = "Spillway-Ordering-Key";
/// Original request headers are kept under this prefix (e.g.
/// `Spillway-Orig-X-GitHub-Event`). Hop-by-hop headers, cookies and
/// authorization headers are not kept.
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
    /// Cap on deliveries in flight in this pod (the global cap split over the
    /// maximum replica count, at least 1).
    pub concurrency_per_replica: u32,
    /// Per-delivery timeout, Go-style duration.
    pub timeout: String,
    /// Attempts before dead-lettering.
    pub max_attempts: u32,
    /// Retry delays, Go-style durations; the last repeats.
    pub backoff: Vec<String>,
    /// Deliveries per second across all replicas, if limited.
    pub rate_limit_per_second: Option<u32>,
    /// Stop pulling while true.
    pub paused: bool,
    /// Path of a file holding the outbound signing secret, if signing is on.
    pub signing_secret_file: Option<String>,
}

//! The endpoint's JetStream objects: desired configs (pure) and the sync
//! that creates, updates, inspects and deletes them.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::response::Response;
use async_nats::jetstream::{self, ErrorCode, consumer, stream};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use spillway_api::condition::Reason;
use spillway_api::names::EndpointNames;
use spillway_api::validate::Timings;
use spillway_api::{StorageType, WebhookEndpointSpec};

/// Room for message headers on top of the largest accepted body.
pub const HEADER_HEADROOM: u64 = 64 * 1024;
/// Extra room in the dead-letter stream for the `Spillway-Dlq-*` headers.
pub const DEAD_LETTER_HEADROOM: u64 = 16 * 1024;
/// Added to the delivery timeout to get the ack wait, so a delivery that
/// takes exactly the timeout is not redelivered under the processor.
pub const ACK_WAIT_MARGIN: Duration = Duration::from_secs(5);

/// A failed JetStream call.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// NATS could not be reached or did not answer.
    #[error("NATS JetStream unavailable: {0}")]
    Unavailable(String),
    /// JetStream answered with an error.
    #[error("{message}")]
    Api {
        /// JetStream's error code.
        code: ErrorCode,
        /// JetStream's description, with codes.
        message: String,
    },
}

impl NatsError {
    fn is(&self, code: ErrorCode) -> bool {
        matches!(self, NatsError::Api { code: c, .. } if *c == code)
    }
}

/// The work stream's desired configuration: interest retention (a webhook
/// leaves once every consumer has settled it: the processor's, and the
/// history's source, which JetStream's flow control acknowledges as soon
/// as the history stored the copy), so only undelivered webhooks fill it; `discard: new` at
/// `stream.maxBytes` / `stream.maxMessages` (the gateway answers 503 and
/// providers retry: nothing stored is dropped); no age limit (a webhook
/// older than `stream.maxAge` is dead-lettered by the processor with reason
/// `expired`, never removed silently).
pub fn stream_config(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
) -> stream::Config {
    let s = &spec.stream;
    stream::Config {
        name: names.stream(),
        // Intake partitions, and retries whose wait is over; scoped and,
        // for publishers of the previous release during an upgrade, legacy.
        subjects: work_subjects(names),
        retention: stream::RetentionPolicy::Interest,
        max_bytes: s.max_bytes,
        max_messages: s.max_messages,
        num_replicas: usize::from(s.replicas),
        storage: storage(s.storage),
        discard: stream::DiscardPolicy::New,
        duplicate_window: t.dedup_window,
        max_message_size: msg_size(spec.ingress.max_body_bytes + HEADER_HEADROOM),
        description: Some(format!(
            "Spillway webhooks waiting for delivery, {}",
            endpoint_id(names)
        )),
        ..Default::default()
    }
}

/// The work stream's subjects: intake and `due`, scoped
/// (`spillway.in.<ns>.<name>.*`) and legacy (`spillway.in.<ns>_<name>.*`).
/// The two forms have different numbers of tokens, so neither matches the
/// other's wildcards or another endpoint's. The legacy forms are kept for
/// this release so that gateways and processors of the previous one keep
/// working while an upgrade rolls out.
pub fn work_subjects(names: &EndpointNames) -> Vec<String> {
    vec![
        names.stream_subjects(),
        names.due_subjects(),
        names.legacy_stream_subjects(),
        names.legacy_due_subjects(),
    ]
}

/// Intake subjects of the work stream, both forms (what the history copies).
pub fn intake_filters(names: &EndpointNames) -> Vec<String> {
    vec![names.stream_subjects(), names.legacy_stream_subjects()]
}

/// The history stream's desired configuration: every accepted webhook,
/// sourced from the work stream through the durable consumer
/// [`history_consumer_config`] (and, while an endpoint is migrated, what
/// its legacy stream holds), for `replay`; `discard: old` within
/// `stream.maxAge` and `stream.historyMaxBytes`, so it never blocks intake.
/// The durable consumer makes the copy at least once: while the history is
/// unavailable (its leader's node down) the work stream keeps what the
/// history has not stored yet, and the history catches up.
pub fn history_config(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
    with_legacy: bool,
) -> stream::Config {
    let s = &spec.stream;
    stream::Config {
        name: names.history_stream(),
        subjects: vec![names.history_subjects()],
        sources: Some(
            std::iter::once(stream::Source {
                name: names.stream(),
                consumer: Some(stream::StreamConsumerSource::new(
                    names.history_consumer(),
                    names.history_feed_subject(),
                )),
                ..Default::default()
            })
            .chain(with_legacy.then(|| stream::Source {
                name: names.legacy_stream(),
                ..Default::default()
            }))
            .collect(),
        ),
        retention: stream::RetentionPolicy::Limits,
        max_age: t.stream_max_age,
        max_bytes: s.history_max_bytes,
        max_messages: -1,
        num_replicas: usize::from(s.replicas),
        storage: storage(s.storage),
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120).min(t.stream_max_age),
        max_message_size: msg_size(spec.ingress.max_body_bytes + HEADER_HEADROOM),
        description: Some(format!("Spillway webhook history, {}", endpoint_id(names))),
        ..Default::default()
    }
}

/// The attempt stream: one record per delivery attempt of every listener
/// (`spillway attempts`). Limits retention and `discard: old`, at most
/// `stream.maxAge` old and `stream.attemptsMaxBytes` big: recording never
/// refuses, so it never delays a delivery. Direct gets serve lookups.
pub fn attempts_config(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
) -> stream::Config {
    let s = &spec.stream;
    stream::Config {
        name: names.attempt_stream(),
        subjects: vec![names.attempt_subjects()],
        retention: stream::RetentionPolicy::Limits,
        max_age: t.stream_max_age,
        max_bytes: s.attempts_max_bytes,
        max_messages: -1,
        num_replicas: usize::from(s.replicas),
        storage: storage(s.storage),
        discard: stream::DiscardPolicy::Old,
        max_message_size: ATTEMPT_RECORD_MAX_BYTES,
        allow_direct: true,
        description: Some(format!(
            "Spillway delivery attempts, {}",
            endpoint_id(names)
        )),
        ..Default::default()
    }
}

/// Largest attempt record (a 256-byte excerpt, a delivery id of at most a
/// few hundred bytes and a pod name fit many times over).
const ATTEMPT_RECORD_MAX_BYTES: i32 = 16 * 1024;

/// Most copies the history's source may have in flight before JetStream's
/// flow control must confirm them (which acknowledges them in the work
/// stream).
pub const HISTORY_MAX_ACK_PENDING: i64 = 1_000;

/// The durable consumer on the work stream that the history stream sources
/// through (ADR-58's pre-created sourcing consumer): a push consumer on the
/// intake subjects only (retries' `due` copies are not history), from the
/// first message, acknowledged by the history's flow-control replies
/// (`ack_policy: flow_control`, heartbeat 1 s, no ack wait, no delivery
/// limit), with the work stream's replicas.
pub fn history_consumer_config(names: &EndpointNames) -> consumer::Config {
    consumer::Config {
        durable_name: Some(names.history_consumer()),
        description: Some("Spillway history source".into()),
        deliver_subject: Some(names.history_feed_subject()),
        filter_subjects: intake_filters(names),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::FlowControl,
        flow_control: true,
        idle_heartbeat: Duration::from_secs(1),
        max_ack_pending: HISTORY_MAX_ACK_PENDING,
        max_deliver: -1,
        ..Default::default()
    }
}

/// Whether the existing history consumer needs `want` applied.
pub fn history_consumer_differs(have: &consumer::Config, want: &consumer::Config) -> bool {
    have.deliver_subject != want.deliver_subject
        || have.filter_subject != want.filter_subject
        || have.filter_subjects != want.filter_subjects
        || have.ack_policy != want.ack_policy
        || have.max_ack_pending != want.max_ack_pending
        || have.description != want.description
}

/// What a stream holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Bytes stored.
    pub bytes: u64,
    /// Messages stored.
    pub messages: u64,
}

impl From<&stream::State> for Stored {
    fn from(s: &stream::State) -> Self {
        Self {
            bytes: s.bytes,
            messages: s.messages,
        }
    }
}

/// Whether applying `want`'s limits to a stream in state `have` would make
/// JetStream delete stored messages (it enforces lowered limits at once);
/// the reason when it would.
pub fn limits_would_drop(have: &Stored, want: &stream::Config) -> Option<String> {
    if want.max_bytes > 0 && have.bytes > want.max_bytes as u64 {
        return Some(format!(
            "stream.maxBytes {} is below the {} bytes of undelivered webhooks stored now; JetStream would delete them",
            want.max_bytes, have.bytes
        ));
    }
    if want.max_messages > 0 && have.messages > want.max_messages as u64 {
        return Some(format!(
            "stream.maxMessages {} is below the {} undelivered webhooks stored now; JetStream would delete them",
            want.max_messages, have.messages
        ));
    }
    None
}

/// Why the work stream refuses new webhooks now, if it does: it holds
/// `maxBytes` (less room than the largest body) or `maxMessages`.
pub fn backlog_full(have: &Stored, want: &stream::Config) -> Option<String> {
    let room = u64::try_from(want.max_message_size.max(0)).unwrap_or(0);
    if want.max_bytes > 0 && have.bytes.saturating_add(room) > want.max_bytes as u64 {
        return Some(format!(
            "{} bytes of undelivered webhooks of stream.maxBytes {}: the gateway may answer 503 until the backlog drains",
            have.bytes, want.max_bytes
        ));
    }
    if want.max_messages > 0 && have.messages >= want.max_messages as u64 {
        return Some(format!(
            "{} undelivered webhooks, stream.maxMessages {}: the gateway answers 503 until the backlog drains",
            have.messages, want.max_messages
        ));
    }
    None
}

/// How full the work stream is: percent of the tighter of its configured
/// limits (`maxBytes`, `maxMessages`), 0 when it has none, at most 100.
/// Undelivered webhooks fill it, and so do delivered copies the history's
/// source has not yet confirmed or that a consumer not Spillway's has not
/// taken (docs/operations.md, "NATS durability").
pub fn fill_percent(have: &Stored, want: &stream::Config) -> u64 {
    let of = |used: u64, limit: i64| match u64::try_from(limit) {
        Ok(l) if l > 0 => used.saturating_mul(100) / l,
        _ => 0,
    };
    of(have.bytes, want.max_bytes)
        .max(of(have.messages, want.max_messages))
        .min(100)
}

/// A consumer on the work stream that is not Spillway's
/// ([`is_spillway_consumer`]) and has webhooks it has not taken; the work
/// stream (interest retention) keeps each until every consumer has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignConsumer {
    /// Its name.
    pub name: String,
    /// Webhooks it has not taken or not acknowledged.
    pub waiting: u64,
}

/// Most consumers a [`foreign_holding`] message names.
const FOREIGN_NAMED: usize = 5;

/// What StreamReady says when consumers not Spillway's hold webhooks in the
/// work stream `stream`: which, how many, and what to do (none when none
/// do).
pub fn foreign_holding(stream: &str, foreign: &[ForeignConsumer]) -> Option<String> {
    let first = foreign.first()?;
    let mut named: Vec<String> = foreign
        .iter()
        .take(FOREIGN_NAMED)
        .map(|f| format!("{} ({})", f.name, f.waiting))
        .collect();
    if foreign.len() > FOREIGN_NAMED {
        named.push(format!("{} more", foreign.len() - FOREIGN_NAMED));
    }
    Some(format!(
        "consumer(s) not Spillway's have webhooks they have not taken: {}; stream {stream} keeps each webhook until every consumer has taken it, so these take its capacity: delete them (`nats consumer rm {stream} {}`) or let them consume",
        named.join(", "),
        first.name,
    ))
}

/// The dead-letter stream's desired configuration.
pub fn dead_letter_config(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
) -> stream::Config {
    let s = &spec.stream;
    stream::Config {
        name: names.dead_letter_stream(),
        subjects: vec![
            names.dead_letter_subjects(),
            names.legacy_dead_letter_subject(),
        ],
        retention: stream::RetentionPolicy::Limits,
        max_age: t.dead_letter_max_age,
        max_bytes: s.max_bytes,
        max_messages: s.max_messages,
        num_replicas: usize::from(s.replicas),
        storage: storage(s.storage),
        // Dead letters are kept as long as possible: old ones make room.
        discard: stream::DiscardPolicy::Old,
        // Long enough that a dead letter published again after a lost
        // terminate (the original comes back after the ack wait and is
        // processed again) is still recognised as a duplicate.
        duplicate_window: dead_letter_dedup_window(t).min(t.dead_letter_max_age),
        max_message_size: msg_size(
            spec.ingress.max_body_bytes + HEADER_HEADROOM + DEAD_LETTER_HEADROOM,
        ),
        description: Some(format!("Spillway dead letters for {}", endpoint_id(names))),
        ..Default::default()
    }
}

/// The retry stream's desired configuration: failed deliveries of an
/// unordered endpoint wait here, off the delivery cap, until they are due.
/// Work-queue retention (a parked retry leaves when it has been moved back
/// to the main stream), no age limit (a waiting retry is never dropped),
/// `discard: new` at `stream.maxBytes` (a full retry stream makes the
/// processor fall back to waiting on the main consumer, never loses one).
pub fn retry_stream_config(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
) -> stream::Config {
    let s = &spec.stream;
    stream::Config {
        name: names.retry_stream(),
        subjects: vec![names.retry_subjects(), names.legacy_retry_subjects()],
        retention: stream::RetentionPolicy::WorkQueue,
        max_bytes: s.max_bytes,
        max_messages: s.max_messages,
        num_replicas: usize::from(s.replicas),
        storage: storage(s.storage),
        discard: stream::DiscardPolicy::New,
        // A pod that parks a retry and dies before acknowledging the
        // original parks it again after the ack wait: still a duplicate.
        duplicate_window: dead_letter_dedup_window(t),
        max_message_size: msg_size(spec.ingress.max_body_bytes + HEADER_HEADROOM),
        description: Some(format!("Spillway retries for {}", endpoint_id(names))),
        ..Default::default()
    }
}

/// `pause_until` of the work stream's consumers while a legacy stream
/// drains (2100-01-01; unpaused as soon as it has drained).
pub fn paused_until() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(4_102_444_800)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Most parked retries one parking consumer holds at once; more wait in
/// the retry stream and are picked up as earlier ones move back.
pub const RETRY_MAX_ACK_PENDING: i64 = 100_000;

/// How long a processor may hold a parked retry it picked up before
/// JetStream hands it to another (it only checks the due time and moves it).
pub const RETRY_ACK_WAIT: Duration = Duration::from_secs(30);

/// The parking consumers on the retry stream (one per listener; ordered
/// endpoints have none: their retries wait on their partition).
pub fn retry_consumer_configs(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
) -> Vec<pull::Config> {
    if spec.ordering.is_some() {
        return Vec::new();
    }
    let listener = spillway_api::names::BUILTIN_LISTENER;
    let mut c = retry_consumer_config(names, listener);
    c.filter_subjects.push(names.legacy_retry_subject(listener));
    vec![c]
}

/// The parking consumer of `listener` on the retry stream.
pub fn retry_consumer_config(names: &EndpointNames, listener: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(names.retry_consumer(listener)),
        filter_subjects: vec![names.retry_subject(listener)],
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        replay_policy: ReplayPolicy::Instant,
        ack_wait: RETRY_ACK_WAIT,
        max_deliver: -1,
        max_ack_pending: RETRY_MAX_ACK_PENDING,
        description: Some("Spillway retries waiting for their time".into()),
        ..Default::default()
    }
}

/// A WebhookListener's consumer on the work stream (named by its token):
/// every intake subject and its own `due` subject, `maxAckPending` = its
/// `concurrency`; otherwise as the built-in listener's (see
/// [`consumer_configs`]).
pub fn listener_consumer_config(
    names: &EndpointNames,
    token: &str,
    concurrency: u32,
    t: &Timings,
) -> pull::Config {
    let mut filters = intake_filters(names);
    filters.push(names.due_subject(token));
    pull::Config {
        durable_name: Some(names.listener_consumer(token)),
        filter_subjects: filters,
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        replay_policy: ReplayPolicy::Instant,
        ack_wait: t.delivery_timeout + ACK_WAIT_MARGIN,
        max_deliver: -1,
        max_ack_pending: i64::from(concurrency),
        description: Some(format!("Spillway listener {token}")),
        ..Default::default()
    }
}

/// The dead-letter stream's duplicate window: two ack waits (redelivery
/// plus another full delivery) and a minute, at least two minutes.
pub fn dead_letter_dedup_window(t: &Timings) -> Duration {
    (2 * (t.delivery_timeout + ACK_WAIT_MARGIN) + Duration::from_secs(60))
        .max(Duration::from_secs(120))
}

fn endpoint_id(names: &EndpointNames) -> String {
    names.key().to_owned()
}

fn msg_size(n: u64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn storage(s: StorageType) -> stream::StorageType {
    match s {
        StorageType::File => stream::StorageType::File,
        StorageType::Memory => stream::StorageType::Memory,
    }
}

/// The durable pull consumers the processor uses, by name: one shared
/// consumer with `maxAckPending` = concurrency, or with ordering one per
/// partition filtered on its subject with `maxAckPending` 1.
///
/// The retry schedule (`processor.retry`) is applied by the processor, not
/// by JetStream: it NAKs a failed delivery with the schedule's delay and
/// dead-letters after `maxAttempts`. The consumer therefore has
/// - no JetStream `backoff`: the server measures a delayed NAK from
///   `backoff[0]` but expires it by `backoff[n]`, which stretched the later
///   retries by the difference (a 3s retry became 5.7s, measured);
/// - `ack_wait` = delivery timeout + margin: a delivery in progress is never
///   redelivered under the processor, and a message whose processor died
///   comes back after that;
/// - unlimited `max_deliver`: JetStream silently stops delivering a message
///   at `max_deliver`, so a message whose last attempt could not finish
///   (processor killed, dead-letter publish failed) would be lost; the
///   processor dead-letters anything delivered more than `maxAttempts` times
///   before sending it to the sink again.
pub fn consumer_configs(
    names: &EndpointNames,
    spec: &WebhookEndpointSpec,
    t: &Timings,
) -> Vec<pull::Config> {
    let p = &spec.processor;
    let base = pull::Config {
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        replay_policy: ReplayPolicy::Instant,
        ack_wait: t.delivery_timeout + ACK_WAIT_MARGIN,
        max_deliver: -1,
        ..Default::default()
    };
    match &spec.ordering {
        // Intake and its own `due` subjects: other listeners' retries are
        // theirs.
        None => vec![pull::Config {
            durable_name: Some(names.consumer(None)),
            filter_subjects: {
                let mut f = intake_filters(names);
                f.push(names.due_subject(spillway_api::names::BUILTIN_LISTENER));
                f.push(names.legacy_due_subjects());
                f
            },
            max_ack_pending: i64::from(p.concurrency),
            description: Some("Spillway processor".into()),
            ..base
        }],
        Some(o) => (0..o.partitions.max(1))
            .map(|i| pull::Config {
                durable_name: Some(names.consumer(Some(i))),
                filter_subjects: vec![names.subject(i), names.legacy_subject(i)],
                max_ack_pending: 1,
                description: Some(format!("Spillway processor, partition {i}")),
                ..base.clone()
            })
            .collect(),
    }
}

/// A consumer's subject filters (one or many; empty: every subject).
pub fn filters_of(c: &consumer::Config) -> Vec<String> {
    if !c.filter_subjects.is_empty() {
        c.filter_subjects.clone()
    } else if !c.filter_subject.is_empty() {
        vec![c.filter_subject.clone()]
    } else {
        Vec::new()
    }
}

pub use spillway_api::names::{is_managed_consumer, is_spillway_consumer};

/// How far an existing consumer has got: its subject filters (empty: all)
/// and the stream sequence of the first message on it that it has not
/// settled (the stream's last sequence + 1 when it has settled everything).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The consumer's subject filters.
    pub filters: Vec<String>,
    /// First unsettled stream sequence.
    pub next: u64,
}

/// Where a new consumer with subject filters `filters` (empty: all) starts:
/// at the earliest unsettled message of the existing consumers whose
/// filters overlap it (ordering switched on or off), so what they
/// acknowledged is not delivered again and what they had not is not
/// skipped. `None` (deliver everything stored) when none overlaps: a new
/// endpoint, a new partition's subject, or consumers deleted behind the
/// operator's back, whose progress is unknown (delivering twice beats
/// losing).
pub fn resume_point(existing: &[Position], filters: &[String]) -> Option<u64> {
    existing
        .iter()
        .filter(|p| {
            p.filters.is_empty()
                || filters.is_empty()
                || p.filters
                    .iter()
                    .any(|f| filters.iter().any(|g| subjects_overlap(f, g)))
        })
        .map(|p| p.next)
        .min()
}

/// Whether two subject filters can match a common subject (`*` is any one
/// token, `>` the rest).
pub fn subjects_overlap(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('.'), b.split('.'));
    loop {
        match (x.next(), y.next()) {
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(p), Some(q)) if p == q || p == "*" || q == "*" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// How an existing stream compares with the desired configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamDiff {
    /// Nothing to do.
    Same,
    /// Fields JetStream can change in place differ.
    Update,
    /// Fields JetStream cannot change in place differ (named).
    Immutable(Vec<&'static str>),
}

/// Compare the fields the operator manages.
pub fn diff_stream(have: &stream::Config, want: &stream::Config) -> StreamDiff {
    let mut immutable = Vec::new();
    if have.storage != want.storage {
        immutable.push("storage");
    }
    if have.retention != want.retention {
        immutable.push("retention");
    }
    if !immutable.is_empty() {
        return StreamDiff::Immutable(immutable);
    }
    let same = have.subjects == want.subjects
        && have.max_age == want.max_age
        && have.max_bytes == want.max_bytes
        && have.max_messages == want.max_messages
        && have.num_replicas.max(1) == want.num_replicas.max(1)
        && have.discard == want.discard
        && have.duplicate_window == want.duplicate_window
        && have.max_message_size == want.max_message_size
        && have.description == want.description
        && source_names(have) == source_names(want)
        && have.republish == want.republish;
    if same {
        StreamDiff::Same
    } else {
        StreamDiff::Update
    }
}

/// Each source's stream and sourcing consumer (none: ephemeral), sorted.
fn source_names(c: &stream::Config) -> Vec<(&str, Option<&str>)> {
    let mut v: Vec<(&str, Option<&str>)> = c
        .sources
        .iter()
        .flatten()
        .map(|s| {
            (
                s.name.as_str(),
                s.consumer.as_ref().map(|c| c.name.as_str()),
            )
        })
        .collect();
    v.sort_unstable();
    v
}

/// The existing configuration with the managed fields set as desired
/// (fields set by others, e.g. metadata, are kept).
pub fn updated_stream(have: &stream::Config, want: &stream::Config) -> stream::Config {
    stream::Config {
        subjects: want.subjects.clone(),
        max_age: want.max_age,
        max_bytes: want.max_bytes,
        max_messages: want.max_messages,
        num_replicas: want.num_replicas,
        discard: want.discard,
        duplicate_window: want.duplicate_window,
        max_message_size: want.max_message_size,
        description: want.description.clone(),
        sources: want.sources.clone(),
        republish: want.republish.clone(),
        ..have.clone()
    }
}

/// Whether an existing consumer needs the desired configuration applied.
pub fn consumer_differs(have: &consumer::Config, want: &pull::Config) -> bool {
    have.durable_name != want.durable_name
        || have.ack_wait != want.ack_wait
        || have.max_deliver != want.max_deliver
        || have.backoff != want.backoff
        || have.max_ack_pending != want.max_ack_pending
        || have.filter_subject != want.filter_subject
        || have.filter_subjects != want.filter_subjects
        || have.description != want.description
}

/// Backlog of the endpoint's consumers, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Messages not yet handed out.
    pub pending: u64,
    /// Messages handed out and not acknowledged.
    pub ack_pending: u64,
    /// Messages handed out more than once.
    pub redelivered: u64,
    /// Failed deliveries waiting out their retry delay (parked).
    pub retrying: u64,
}

/// What a successful sync found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Synced {
    /// Consumer backlog.
    pub backlog: Backlog,
    /// Messages in the dead-letter stream (when it exists).
    pub dead_letters: Option<u64>,
    /// Streams created because they were missing (names).
    pub created: Vec<String>,
    /// Streams or consumers updated in place (names).
    pub updated: Vec<String>,
    /// Why the work stream refuses new webhooks now (full), if it does.
    pub backlog_full: Option<String>,
    /// How full the work stream is ([`fill_percent`]).
    pub fill_percent: u64,
    /// Consumers still draining the legacy stream of an endpoint being
    /// migrated (the processor serves them until they are settled).
    pub legacy_consumers: Vec<String>,
    /// The migration from the legacy stream began or ended in this sync.
    pub migration: Option<Migration>,
    /// Ordered endpoints: the partitions whose consumers are in place (the
    /// gateway routes over these, the processor serves these).
    pub partitions: Option<u16>,
    /// Why a larger `ordering.partitions` is not applied yet (see
    /// [`partitions_to_apply`]).
    pub partitions_waiting: Option<String>,
    /// When the oldest webhook the work stream holds was stored (none when
    /// it holds none).
    pub oldest: Option<time::OffsetDateTime>,
    /// Consumers on the work stream not Spillway's that hold webhooks.
    pub foreign: Vec<ForeignConsumer>,
}

/// Partition consumers of an ordered endpoint that exist now: their count
/// (`processor-p0` … `processor-p{n-1}`), and how many webhooks they hold
/// (not yet delivered or not yet acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionState {
    /// Partition consumers in place.
    pub partitions: u16,
    /// Webhooks pending or in flight on them.
    pub waiting: u64,
}

/// How many partitions to run when the spec asks for `wanted` and
/// `existing` describes what runs: growing is applied only while no
/// partition holds a webhook, since a key that moves to another partition
/// would otherwise overtake its older webhooks still waiting on its old
/// one. `Err` carries the count to keep and the reason.
pub fn partitions_to_apply(
    wanted: u16,
    existing: Option<PartitionState>,
) -> Result<u16, (u16, String)> {
    match existing {
        Some(e) if e.partitions > 0 && e.partitions < wanted && e.waiting > 0 => Err((
            e.partitions,
            format!(
                "ordering.partitions {} → {wanted} waits until the {} webhook(s) on the current partitions are delivered (keys that move would overtake them); the endpoint keeps {} partitions meanwhile",
                e.partitions, e.waiting, e.partitions
            ),
        )),
        _ => Ok(wanted),
    }
}

/// A step of the migration from the one-stream layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    /// The intake subjects moved to the work stream; the legacy stream's
    /// consumers drain what it holds.
    Started,
    /// Everything the legacy stream held is delivered and copied to the
    /// history stream; it was deleted.
    Finished,
}

/// Why a sync could not finish.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// NATS down or slow.
    #[error(transparent)]
    Unavailable(NatsError),
    /// The change cannot be applied in place.
    #[error("{0}")]
    Immutable(String),
    /// Switching ordering on with fewer partitions than webhooks still
    /// waiting on: they would be on subjects no consumer reads.
    #[error("{0}")]
    WouldStrand(String),
    /// JetStream refused a create or update.
    #[error("{0}")]
    Rejected(String),
    /// Lowered limits would make JetStream delete undelivered webhooks.
    #[error("{0}")]
    WouldDrop(String),
}

impl SyncError {
    fn from_nats(e: NatsError, what: &str) -> Self {
        match e {
            NatsError::Unavailable(_) => SyncError::Unavailable(e),
            NatsError::Api { message, .. } => {
                SyncError::Rejected(format!("JetStream refused {what}: {message}"))
            }
        }
    }

    /// Condition reason for StreamReady=False.
    pub fn reason(&self) -> Reason {
        match self {
            SyncError::Unavailable(_) => Reason::NatsUnavailable,
            SyncError::Immutable(_) => Reason::StreamConfigImmutable,
            SyncError::WouldStrand(_) => Reason::PartitionsWouldStrandWebhooks,
            SyncError::Rejected(_) => Reason::StreamRejected,
            SyncError::WouldDrop(_) => Reason::LimitsWouldDropWebhooks,
        }
    }
}

/// An empty JSON object: JetStream refuses `null` where it wants no
/// request body.
#[derive(Serialize)]
struct Empty {}

const EMPTY: Empty = Empty {};

#[derive(Serialize)]
struct CreateConsumer<'a, C> {
    stream_name: &'a str,
    config: &'a C,
}

#[derive(Deserialize)]
struct ConsumerNamesPage {
    #[serde(default)]
    consumers: Option<Vec<String>>,
    #[serde(default)]
    total: usize,
}

#[derive(Serialize)]
struct Offset {
    offset: usize,
}

/// JetStream API access with uniform errors.
#[derive(Clone)]
pub struct Js {
    ctx: jetstream::Context,
    client: async_nats::Client,
}

impl std::fmt::Debug for Js {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Js").finish_non_exhaustive()
    }
}

impl Js {
    /// Wrap a client; `timeout` bounds each API request.
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        let mut ctx = jetstream::new(client.clone());
        ctx.set_timeout(timeout);
        Self { ctx, client }
    }

    /// The NATS client (for core subscriptions such as sink notices).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The server's `max_payload` (0 while not connected).
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Whether the connection is up right now.
    pub fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn api<T: DeserializeOwned, P: Serialize + ?Sized>(
        &self,
        subject: String,
        payload: &P,
    ) -> Result<T, NatsError> {
        if !self.connected() {
            return Err(NatsError::Unavailable("not connected".into()));
        }
        match self
            .ctx
            .request::<_, _, Response<T>>(subject, payload)
            .await
        {
            Ok(Response::Ok(v)) => Ok(v),
            Ok(Response::Err { error }) => Err(NatsError::Api {
                code: error.error_code(),
                message: error.to_string(),
            }),
            Err(e) => Err(NatsError::Unavailable(e.to_string())),
        }
    }

    /// Pause a consumer until `until`, or resume it (`None`).
    pub async fn pause_consumer(
        &self,
        stream: &str,
        name: &str,
        until: Option<time::OffsetDateTime>,
    ) -> Result<(), NatsError> {
        #[derive(Serialize)]
        struct Pause {
            #[serde(
                with = "time::serde::rfc3339::option",
                skip_serializing_if = "Option::is_none"
            )]
            pause_until: Option<time::OffsetDateTime>,
        }
        #[derive(serde::Deserialize)]
        struct Paused {}
        let _: Paused = self
            .api(
                format!("CONSUMER.PAUSE.{stream}.{name}"),
                &Pause { pause_until: until },
            )
            .await?;
        Ok(())
    }

    /// Stream info, `None` when it does not exist.
    pub async fn stream_info(&self, name: &str) -> Result<Option<stream::Info>, NatsError> {
        match self.api(format!("STREAM.INFO.{name}"), &EMPTY).await {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Consumer info, `None` when it does not exist.
    pub async fn consumer_info(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<Option<consumer::Info>, NatsError> {
        match self
            .api(format!("CONSUMER.INFO.{stream}.{name}"), &EMPTY)
            .await
        {
            Ok(i) => Ok(Some(i)),
            Err(e) if e.is(ErrorCode::CONSUMER_NOT_FOUND) || e.is(ErrorCode::STREAM_NOT_FOUND) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Create a stream (an existing one with the same configuration is
    /// fine).
    pub async fn create_stream(&self, cfg: &stream::Config) -> Result<(), NatsError> {
        let _: stream::Info = self.api(format!("STREAM.CREATE.{}", cfg.name), cfg).await?;
        Ok(())
    }

    /// Messages a stream holds on `subject` (0 when the stream does not
    /// exist).
    pub async fn subject_messages(&self, stream: &str, subject: &str) -> Result<u64, NatsError> {
        #[derive(Serialize)]
        struct Filter<'a> {
            subjects_filter: &'a str,
        }
        #[derive(serde::Deserialize)]
        struct Info {
            state: State,
        }
        #[derive(serde::Deserialize)]
        struct State {
            #[serde(default)]
            subjects: Option<std::collections::HashMap<String, u64>>,
        }
        match self
            .api::<Info, _>(
                format!("STREAM.INFO.{stream}"),
                &Filter {
                    subjects_filter: subject,
                },
            )
            .await
        {
            Ok(i) => Ok(i
                .state
                .subjects
                .and_then(|m| m.get(subject).copied())
                .unwrap_or(0)),
            Err(e) if e.is(ErrorCode::STREAM_NOT_FOUND) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// Names of a stream's consumers.
    pub async fn consumer_names(&self, stream: &str) -> Result<Vec<String>, NatsError> {
        let mut out = Vec::new();
        loop {
            let page: ConsumerNamesPage = match self
                .api(
                    format!("CONSUMER.NAMES.{stream}"),
                    &Offset { offset: out.len() },
                )
                .await
            {
                Ok(p) => p,
                Err(e) if e.is(ErrorCode::STREAM_NOT_FOUND) => return Ok(out),
                Err(e) => return Err(e),
            };
            let got = page.consumers.unwrap_or_default();
            if got.is_empty() {
                return Ok(out);
            }
            out.extend(got);
            if out.len() >= page.total {
                return Ok(out);
            }
        }
    }

    /// Create or update a durable consumer.
    pub async fn put_consumer(
        &self,
        stream: &str,
        config: &pull::Config,
    ) -> Result<consumer::Info, NatsError> {
        let name = config.durable_name.as_deref().unwrap_or_default();
        self.api(
            format!("CONSUMER.CREATE.{stream}.{name}"),
            &CreateConsumer {
                stream_name: stream,
                config,
            },
        )
        .await
    }

    /// Delete a consumer; true when it existed.
    pub async fn delete_consumer(&self, stream: &str, name: &str) -> Result<bool, NatsError> {
        match self
            .api::<serde_json::Value, _>(format!("CONSUMER.DELETE.{stream}.{name}"), &EMPTY)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is(ErrorCode::CONSUMER_NOT_FOUND) || e.is(ErrorCode::STREAM_NOT_FOUND) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Delete a stream; true when it existed.
    pub async fn delete_stream(&self, name: &str) -> Result<bool, NatsError> {
        match self
            .api::<serde_json::Value, _>(format!("STREAM.DELETE.{name}"), &EMPTY)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is(ErrorCode::STREAM_NOT_FOUND) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Bring one stream to the desired configuration; returns its info and
    /// whether it was created / updated.
    async fn ensure_stream(
        &self,
        want: &stream::Config,
        out: &mut Synced,
    ) -> Result<stream::Info, SyncError> {
        let have = self
            .stream_info(&want.name)
            .await
            .map_err(|e| SyncError::from_nats(e, "reading a stream"))?;
        let reject = |e: NatsError| match e {
            NatsError::Unavailable(_) => SyncError::Unavailable(e),
            NatsError::Api { message, .. } => SyncError::Rejected(format!(
                "JetStream rejected stream {}: {message}",
                want.name
            )),
        };
        match have {
            None => {
                let info: stream::Info = self
                    .api(format!("STREAM.CREATE.{}", want.name), want)
                    .await
                    .map_err(reject)?;
                out.created.push(want.name.clone());
                Ok(info)
            }
            Some(info) => match diff_stream(&info.config, want) {
                StreamDiff::Same => Ok(info),
                StreamDiff::Immutable(fields) => Err(SyncError::Immutable(format!(
                    "stream {} cannot change {} in place; revert the change, or delete the stream (its messages are lost) so it is recreated",
                    want.name,
                    fields.join(", ")
                ))),
                StreamDiff::Update => {
                    let cfg = updated_stream(&info.config, want);
                    let info: stream::Info = self
                        .api(format!("STREAM.UPDATE.{}", want.name), &cfg)
                        .await
                        .map_err(reject)?;
                    out.updated.push(want.name.clone());
                    Ok(info)
                }
            },
        }
    }

    /// The first stored message at or after `seq` on `subject` (wildcards
    /// allowed), `None` when there is none.
    async fn next_on_subject(
        &self,
        stream: &str,
        seq: u64,
        subject: &str,
    ) -> Result<Option<u64>, SyncError> {
        #[derive(Serialize)]
        struct NextBySubject<'a> {
            seq: u64,
            next_by_subj: &'a str,
        }
        match self
            .api::<serde_json::Value, _>(
                format!("STREAM.MSG.GET.{stream}"),
                &NextBySubject {
                    seq,
                    next_by_subj: subject,
                },
            )
            .await
        {
            Ok(v) => Ok(v["message"]["seq"].as_u64()),
            Err(e) if e.is(ErrorCode::NO_MESSAGE_FOUND) => Ok(None),
            Err(e) => Err(SyncError::from_nats(e, "reading the stream")),
        }
    }

    /// Where each existing consumer has got (see [`Position`]): its first
    /// unsettled message is the next one on its filter after its
    /// acknowledgement floor (for a filtered consumer the floor can lag far
    /// behind: other subjects' messages in between are not its own).
    async fn positions(
        &self,
        stream: &str,
        names: &EndpointNames,
        existing: &[consumer::Info],
        last_seq: u64,
    ) -> Result<Vec<Position>, SyncError> {
        let mut out = Vec::new();
        for i in existing {
            let filters = filters_of(&i.config);
            let next = if i.num_pending == 0 && i.num_ack_pending == 0 {
                last_seq + 1
            } else {
                let subjects = if filters.is_empty() {
                    intake_filters(names)
                } else {
                    filters.clone()
                };
                let mut next = last_seq + 1;
                for subject in &subjects {
                    if let Some(seq) = self
                        .next_on_subject(stream, i.ack_floor.stream_sequence + 1, subject)
                        .await?
                    {
                        next = next.min(seq);
                    }
                }
                next
            };
            out.push(Position { filters, next });
        }
        Ok(out)
    }

    /// Ordering switched on with `partitions` while a shared consumer (from
    /// ordering off) still has a backlog: refuse when some of it sits on a
    /// partition subject at or above `partitions` (stored while ordering
    /// was on with more partitions), since no new consumer would read it.
    async fn check_not_stranded(
        &self,
        stream: &str,
        names: &EndpointNames,
        existing: &[consumer::Info],
        partitions: u16,
    ) -> Result<(), SyncError> {
        let Some(shared) = existing.iter().find(|i| {
            i.name == names.consumer(None) && (i.num_pending > 0 || i.num_ack_pending > 0)
        }) else {
            return Ok(());
        };
        let from = shared.ack_floor.stream_sequence + 1;
        #[derive(Serialize)]
        struct SubjectsFilter {
            subjects_filter: String,
        }
        #[derive(Deserialize)]
        struct Info {
            state: State,
        }
        #[derive(Deserialize)]
        struct State {
            #[serde(default)]
            subjects: std::collections::HashMap<String, u64>,
        }
        let mut stranded = Vec::new();
        for subjects_filter in intake_filters(names) {
            let info: Info = self
                .api(
                    format!("STREAM.INFO.{stream}"),
                    &SubjectsFilter { subjects_filter },
                )
                .await
                .map_err(|e| SyncError::from_nats(e, "listing the stream's subjects"))?;
            for subject in info.state.subjects.keys() {
                let Some(p) = names.partition_of_subject(subject) else {
                    continue;
                };
                if p < partitions || stranded.contains(&p) {
                    continue;
                }
                if self.next_on_subject(stream, from, subject).await?.is_some() {
                    stranded.push(p);
                }
            }
        }
        if stranded.is_empty() {
            return Ok(());
        }
        stranded.sort_unstable();
        let most = stranded.last().copied().unwrap_or(partitions) + 1;
        Err(SyncError::WouldStrand(format!(
            "webhooks stored while ordering had more partitions are not delivered yet on \
             partition(s) {stranded:?}; with ordering.partitions {partitions} no consumer would read \
             them: set ordering.partitions to at least {most}, or switch ordering off until the \
             backlog is delivered (nothing was changed)"
        )))
    }

    /// Create the history's source consumer on the work stream, or bring
    /// it to the desired configuration (where it starts is kept).
    async fn ensure_history_consumer(
        &self,
        names: &EndpointNames,
        work: &str,
    ) -> Result<(), SyncError> {
        let want = history_consumer_config(names);
        let name = names.history_consumer();
        let have = self
            .consumer_info(work, &name)
            .await
            .map_err(|e| SyncError::from_nats(e, "reading the history consumer"))?;
        let mut cfg = want.clone();
        match &have {
            Some(i) if !history_consumer_differs(&i.config, &want) => return Ok(()),
            Some(i) => cfg.deliver_policy = i.config.deliver_policy,
            None => {}
        }
        let _: consumer::Info = self
            .api(
                format!("CONSUMER.CREATE.{work}.{name}"),
                &CreateConsumer {
                    stream_name: work,
                    config: &cfg,
                },
            )
            .await
            .map_err(|e| match e {
                NatsError::Unavailable(_) => SyncError::Unavailable(e),
                NatsError::Api { message, .. } => SyncError::Rejected(format!(
                    "JetStream rejected consumer {work}/{name}: {message}"
                )),
            })?;
        Ok(())
    }

    /// The retry stream and its parking consumers (unordered endpoints; an
    /// existing one is kept and read when ordering is switched on, so what
    /// it holds is still reported).
    async fn sync_retries(
        &self,
        names: &EndpointNames,
        spec: &WebhookEndpointSpec,
        t: &Timings,
        out: &mut Synced,
    ) -> Result<(), SyncError> {
        let wanted = retry_consumer_configs(names, spec);
        let stream = names.retry_stream();
        if wanted.is_empty() {
            if let Some(info) = self
                .stream_info(&stream)
                .await
                .map_err(|e| SyncError::from_nats(e, "reading the retry stream"))?
            {
                out.backlog.retrying += info.state.messages;
            }
            return Ok(());
        }
        self.ensure_stream(&retry_stream_config(names, spec, t), out)
            .await?;
        for want in &wanted {
            let name = want.durable_name.as_deref().unwrap_or_default();
            let have = self
                .consumer_info(&stream, name)
                .await
                .map_err(|e| SyncError::from_nats(e, "reading a retry consumer"))?;
            let info = match have {
                Some(i) if !consumer_differs(&i.config, want) => i,
                have => {
                    let mut cfg = want.clone();
                    if let Some(i) = &have {
                        cfg.deliver_policy = i.config.deliver_policy;
                    }
                    let info = self
                        .put_consumer(&stream, &cfg)
                        .await
                        .map_err(|e| match e {
                            NatsError::Unavailable(_) => SyncError::Unavailable(e),
                            NatsError::Api { message, .. } => SyncError::Rejected(format!(
                                "JetStream rejected consumer {stream}/{name}: {message}"
                            )),
                        })?;
                    if have.is_some() {
                        out.updated.push(format!("{stream}/{name}"));
                    }
                    info
                }
            };
            out.backlog.retrying += info.num_pending + info.num_ack_pending as u64;
        }
        Ok(())
    }

    /// Create or update the endpoint's streams and consumers, delete
    /// managed consumers no longer wanted, and read backlog and dead-letter
    /// counts.
    pub async fn sync(
        &self,
        names: &EndpointNames,
        spec: &WebhookEndpointSpec,
        t: &Timings,
    ) -> Result<Synced, SyncError> {
        let mut out = Synced::default();
        let mut main = stream_config(names, spec, t);
        let intake = main.subjects.clone();
        let legacy = self
            .stream_info(&names.legacy_stream())
            .await
            .map_err(|e| SyncError::from_nats(e, "reading the legacy stream"))?;
        // The older layout's stream still takes the intake subjects.
        let legacy_owns = legacy
            .as_ref()
            .is_some_and(|l| l.config.subjects.iter().any(|s| intake.contains(s)));
        let have_work = self
            .stream_info(&main.name)
            .await
            .map_err(|e| SyncError::from_nats(e, "reading the work stream"))?;
        if let Some(have) = &have_work
            && let Some(why) = limits_would_drop(&(&have.state).into(), &main)
        {
            return Err(SyncError::WouldDrop(format!(
                "{why}; raise the limit again, or lower it once the backlog has drained (nothing was changed)"
            )));
        }
        // A webhook stored in an interest stream that has no consumer yet
        // is dropped at once: the work stream starts without the intake
        // subjects (JetStream then gives it its own name as subject) and
        // takes them below, once the history's source and the processor's
        // consumers exist (and, when migrating, off the legacy stream).
        let hold_subjects = legacy_owns
            || have_work
                .as_ref()
                .is_none_or(|w| !intake.iter().all(|s| w.config.subjects.contains(s)));
        if hold_subjects {
            // An existing stream keeps what it has meanwhile (the subjects
            // of the previous release while it gains the scoped ones: its
            // consumers already read those), a new one gets a placeholder.
            main.subjects = match &have_work {
                Some(w) if !legacy_owns && !w.config.subjects.is_empty() => {
                    w.config.subjects.clone()
                }
                _ => vec![main.name.clone()],
            };
        }
        let main_state = self.ensure_stream(&main, &mut out).await?.state;
        let last_seq = main_state.last_sequence;
        out.oldest = (main_state.messages > 0).then_some(main_state.first_timestamp);
        // The history's source consumer, then the history stream (which
        // also copies the legacy stream, if any).
        self.ensure_history_consumer(names, &main.name).await?;
        self.ensure_stream(&history_config(names, spec, t, legacy.is_some()), &mut out)
            .await?;
        self.ensure_stream(&attempts_config(names, spec, t), &mut out)
            .await?;
        // The legacy stream's consumers that still have work.
        let mut draining = Vec::new();
        if let Some(l) = &legacy {
            for name in self
                .consumer_names(&l.config.name)
                .await
                .map_err(|e| SyncError::from_nats(e, "listing legacy consumers"))?
                .into_iter()
                .filter(|n| is_managed_consumer(n))
            {
                if let Some(info) = self
                    .consumer_info(&l.config.name, &name)
                    .await
                    .map_err(|e| SyncError::from_nats(e, "reading a legacy consumer"))?
                {
                    draining.push(info);
                }
            }
        }
        if spec.processor.dead_letter.enabled {
            let dlq = self
                .ensure_stream(&dead_letter_config(names, spec, t), &mut out)
                .await?;
            out.dead_letters = Some(dlq.state.messages);
        } else if let Some(dlq) = self
            .stream_info(&names.dead_letter_stream())
            .await
            .map_err(|e| SyncError::from_nats(e, "reading the dead-letter stream"))?
        {
            // Disabled but kept: still report what it holds.
            out.dead_letters = Some(dlq.state.messages);
        }

        // Existing consumers, before deciding what is wanted; and any that
        // is not Spillway's, for what it holds.
        let mut existing = Vec::new();
        for name in self
            .consumer_names(&main.name)
            .await
            .map_err(|e| SyncError::from_nats(e, "listing consumers"))?
        {
            let managed = is_managed_consumer(&name);
            if !managed && is_spillway_consumer(&name) {
                continue;
            }
            let Some(info) = self
                .consumer_info(&main.name, &name)
                .await
                .map_err(|e| SyncError::from_nats(e, "reading a consumer"))?
            else {
                continue;
            };
            let waiting = info.num_pending + info.num_ack_pending as u64;
            if managed {
                existing.push(info);
            } else if waiting > 0 {
                out.foreign.push(ForeignConsumer { name, waiting });
            }
        }
        // A larger ordering.partitions waits while partitions hold webhooks.
        let mut applied;
        let spec = match &spec.ordering {
            Some(o) => {
                let running: Vec<&consumer::Info> = existing
                    .iter()
                    .filter(|i| i.name.starts_with("processor-p"))
                    .collect();
                let state = (!running.is_empty()).then(|| PartitionState {
                    partitions: u16::try_from(running.len()).unwrap_or(u16::MAX),
                    waiting: running
                        .iter()
                        .map(|i| i.num_pending + i.num_ack_pending as u64)
                        .sum(),
                });
                let n = match partitions_to_apply(o.partitions, state) {
                    Ok(n) => n,
                    Err((n, why)) => {
                        out.partitions_waiting = Some(why);
                        n
                    }
                };
                out.partitions = Some(n);
                applied = spec.clone();
                if let Some(o) = applied.ordering.as_mut() {
                    o.partitions = n;
                }
                &applied
            }
            None => spec,
        };
        let wanted = consumer_configs(names, spec, t);
        // While the legacy stream's consumers deliver what it holds, the work
        // stream's consumers wait (paused): the two together must not exceed
        // the cap, and older webhooks go first.
        let legacy_busy = draining
            .iter()
            .any(|i| i.num_pending > 0 || i.num_ack_pending > 0);

        let wanted_names: BTreeSet<&str> = wanted
            .iter()
            .filter_map(|c| c.durable_name.as_deref())
            .collect();
        if let Some(o) = &spec.ordering {
            self.check_not_stranded(&main.name, names, &existing, o.partitions)
                .await?;
        }
        let mut positions: Option<Vec<Position>> = None;
        for want in &wanted {
            let name = want.durable_name.as_deref().unwrap_or_default();
            let have = existing.iter().find(|i| i.name == name);
            let info = match have {
                Some(i) if !consumer_differs(&i.config, want) => i.clone(),
                _ => {
                    let mut cfg = want.clone();
                    match have {
                        // JetStream cannot change where a consumer starts.
                        Some(i) => cfg.deliver_policy = i.config.deliver_policy,
                        // Created beside or in place of earlier consumers
                        // (ordering switched on or off): start where they
                        // had got to, not at the start of the history.
                        None => {
                            if positions.is_none() {
                                positions = Some(
                                    self.positions(&main.name, names, &existing, last_seq)
                                        .await?,
                                );
                            }
                            let known = positions.as_deref().unwrap_or_default();
                            if let Some(seq) = resume_point(known, &want.filter_subjects) {
                                cfg.deliver_policy = DeliverPolicy::ByStartSequence {
                                    start_sequence: seq,
                                };
                            }
                        }
                    }
                    let info = self
                        .put_consumer(&main.name, &cfg)
                        .await
                        .map_err(|e| match e {
                            NatsError::Unavailable(_) => SyncError::Unavailable(e),
                            NatsError::Api { message, .. } => SyncError::Rejected(format!(
                                "JetStream rejected consumer {name}: {message}"
                            )),
                        })?;
                    if have.is_some() {
                        out.updated.push(name.to_owned());
                    }
                    info
                }
            };
            if info.config.pause_until.is_some() != legacy_busy {
                self.pause_consumer(&main.name, name, legacy_busy.then(paused_until))
                    .await
                    .map_err(|e| SyncError::from_nats(e, "pausing or resuming a consumer"))?;
                out.updated.push(name.to_owned());
            }
            out.backlog.pending += info.num_pending;
            out.backlog.ack_pending += info.num_ack_pending as u64;
            out.backlog.redelivered += info.num_redelivered as u64;
        }
        self.sync_retries(names, spec, t, &mut out).await?;
        // Give the work stream its intake subjects, moving them from the
        // legacy stream when migrating (publishes in between get no answer
        // and a 503: providers retry).
        if hold_subjects {
            if legacy_owns && let Some(l) = &legacy {
                let mut moved = l.config.clone();
                moved.subjects = vec![names.legacy_parked_subject()];
                let _: stream::Info = self
                    .api(format!("STREAM.UPDATE.{}", moved.name), &moved)
                    .await
                    .map_err(|e| {
                        SyncError::from_nats(e, "moving the intake subjects off the legacy stream")
                    })?;
                out.migration = Some(Migration::Started);
            }
            main.subjects = intake;
            self.ensure_stream(&main, &mut out).await?;
            // Created in two steps is still "created".
            let created = out.created.clone();
            out.updated.retain(|n| !created.contains(n));
        }
        // Drain the legacy stream: settled consumers go; when none is left
        // and the history has copied it, the legacy stream goes too.
        if let Some(l) = &legacy {
            for info in &draining {
                if info.num_pending == 0 && info.num_ack_pending == 0 {
                    self.delete_consumer(&l.config.name, &info.name)
                        .await
                        .map_err(|e| {
                            SyncError::from_nats(e, "deleting a drained legacy consumer")
                        })?;
                } else {
                    out.legacy_consumers.push(info.name.clone());
                    out.backlog.pending += info.num_pending;
                    out.backlog.ack_pending += info.num_ack_pending as u64;
                    out.backlog.redelivered += info.num_redelivered as u64;
                }
            }
            if out.legacy_consumers.is_empty() && !legacy_owns {
                let history = self
                    .stream_info(&names.history_stream())
                    .await
                    .map_err(|e| SyncError::from_nats(e, "reading the history stream"))?;
                let copied = history.as_ref().is_some_and(|h| {
                    h.sources.iter().any(|src| {
                        src.name == l.config.name && src.lag == 0 && src.active.is_some()
                    })
                });
                if copied {
                    self.delete_stream(&l.config.name).await.map_err(|e| {
                        SyncError::from_nats(e, "deleting the drained legacy stream")
                    })?;
                    self.ensure_stream(&history_config(names, spec, t, false), &mut out)
                        .await?;
                    out.migration = Some(Migration::Finished);
                }
            }
        }
        if let Some(work) = self
            .stream_info(&main.name)
            .await
            .map_err(|e| SyncError::from_nats(e, "reading the work stream"))?
        {
            out.backlog_full = backlog_full(&(&work.state).into(), &main);
            out.fill_percent = fill_percent(&(&work.state).into(), &main);
        }
        // Only once their successors exist: a sync that fails half way
        // must not leave a stream without consumers (the next one would
        // start the new consumers at the beginning of the history).
        for stale in existing
            .iter()
            .filter(|i| !wanted_names.contains(i.name.as_str()))
        {
            self.delete_consumer(&main.name, &stale.name)
                .await
                .map_err(|e| SyncError::from_nats(e, "deleting a stale consumer"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_consumers_are_named_with_what_they_hold() {
        let f = |name: &str, waiting| ForeignConsumer {
            name: name.into(),
            waiting,
        };
        assert_eq!(foreign_holding("spillway-work_ns_gh", &[]), None);
        let one = foreign_holding("spillway-work_ns_gh", &[f("debugging", 10)]).unwrap();
        assert!(one.contains("debugging (10)"), "{one}");
        assert!(
            one.contains("`nats consumer rm spillway-work_ns_gh debugging`"),
            "{one}"
        );
        let many: Vec<_> = (0..7).map(|i| f(&format!("c{i}"), i + 1)).collect();
        let msg = foreign_holding("w", &many).unwrap();
        assert!(
            msg.contains("c0 (1), c1 (2), c2 (3), c3 (4), c4 (5), 2 more"),
            "{msg}"
        );
        assert!(!msg.contains("c5"), "{msg}");
    }
    use spillway_api::duration::GoDuration;
    use spillway_api::validate::check;

    fn spec(yaml: &str) -> WebhookEndpointSpec {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const BASE: &str = r#"
verification: {scheme: github, secretRefs: [{name: gh, key: secret}]}
processor: {sink: {url: "http://sink:8080/hook"}, concurrency: 7, timeout: 10s, retry: {maxAttempts: 4, backoff: [1s, 2s]}}
deduplication: {window: 5m}
stream: {maxAge: 1h, maxBytes: 1000000, storage: memory, discard: old}
ingress: {maxBodyBytes: 1000}
"#;

    #[test]
    fn stream_config_follows_spec() {
        let s = spec(BASE);
        let t = check(&s).unwrap();
        let n = EndpointNames::new("ns", "gh");
        let c = stream_config(&n, &s, &t);
        assert_eq!(c.name, "spillway-work_ns_gh");
        assert_eq!(
            c.subjects,
            vec![
                "spillway.in.ns.gh.*".to_owned(),
                "spillway.due.ns.gh.*".to_owned(),
                "spillway.in.ns_gh.*".to_owned(),
                "spillway.due.ns_gh.*".to_owned()
            ]
        );
        // Only undelivered webhooks: interest retention, refuse when full
        // (the spec's `discard: old` is ignored), never aged out.
        assert_eq!(c.retention, stream::RetentionPolicy::Interest);
        assert_eq!(c.discard, stream::DiscardPolicy::New);
        assert_eq!(c.max_age, Duration::ZERO);
        assert_eq!(c.max_bytes, 1_000_000);
        assert_eq!(c.duplicate_window, Duration::from_secs(300));
        assert_eq!(c.storage, stream::StorageType::Memory);
        // History: its own bounds, drops the oldest, copies the work stream
        // through a durable consumer (and the legacy stream while one is
        // migrated).
        assert!(c.republish.is_none());
        let h = history_config(&n, &s, &t, false);
        assert_eq!(h.name, "spillway-history_ns_gh");
        assert_eq!(h.subjects, ["spillway.hist.ns_gh.*"]);
        assert_eq!(h.retention, stream::RetentionPolicy::Limits);
        assert_eq!(h.discard, stream::DiscardPolicy::Old);
        assert_eq!(h.max_age, Duration::from_secs(3600));
        assert_eq!(h.max_bytes, s.stream.history_max_bytes);
        assert_eq!(source_names(&h), [("spillway-work_ns_gh", Some("history"))]);
        let h = history_config(&n, &s, &t, true);
        assert_eq!(
            source_names(&h),
            [
                ("spillway-work_ns_gh", Some("history")),
                ("spillway_ns_gh", None)
            ]
        );
        let hc = history_consumer_config(&n);
        assert_eq!(
            hc.filter_subjects,
            ["spillway.in.ns.gh.*", "spillway.in.ns_gh.*"],
            "no retries"
        );
        assert_eq!(
            hc.deliver_subject.as_deref(),
            Some("spillway.feed.ns_gh"),
            "the source's deliver subject"
        );
        assert_eq!(hc.ack_policy, AckPolicy::FlowControl);
        assert_eq!(hc.max_deliver, -1);
        assert!(!history_consumer_differs(&hc, &hc));
        assert!(
            !is_managed_consumer(&n.history_consumer()),
            "never deleted as stale"
        );
        assert_eq!(c.max_message_size as u64, 1000 + HEADER_HEADROOM);
        let d = dead_letter_config(&n, &s, &t);
        assert_eq!(
            d.subjects,
            ["spillway.dlq.ns.gh.*", "spillway.dlq.ns_gh"],
            "scoped, and the previous release's"
        );
        assert_eq!(d.max_age, Duration::from_secs(336 * 3600));
        // timeout 10s: 2 x (10s + 5s) + 60s, above the 2 min floor.
        assert_eq!(d.duplicate_window, Duration::from_secs(120));
        // Retries: never aged out, refused rather than dropped when full,
        // gone once moved back.
        let r = retry_stream_config(&n, &s, &t);
        assert_eq!(
            r.subjects,
            vec![n.retry_subjects(), n.legacy_retry_subjects()]
        );
        assert_eq!(r.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(r.discard, stream::DiscardPolicy::New);
        assert_eq!(r.max_age, Duration::ZERO);
        assert_eq!(r.max_bytes, 1_000_000);
        let rc = retry_consumer_configs(&n, &s);
        assert_eq!(rc.len(), 1);
        assert_eq!(
            rc[0].filter_subjects,
            [
                n.retry_subject("processor"),
                n.legacy_retry_subject("processor")
            ]
        );
        assert_eq!(rc[0].durable_name.as_deref(), Some("retry-processor"));
        let mut ordered = s.clone();
        ordered.ordering =
            Some(serde_saphyr::from_str("{keyHeader: X-Key, partitions: 3}").unwrap());
        assert!(retry_consumer_configs(&n, &ordered).is_empty());
        let mut long = s.clone();
        long.processor.timeout = GoDuration::from_secs(300);
        let t = check(&long).unwrap();
        assert_eq!(
            dead_letter_config(&n, &long, &t).duplicate_window,
            Duration::from_secs(2 * 305 + 60)
        );
    }

    #[test]
    fn limits_that_would_drop_or_refuse() {
        let s = spec(BASE);
        let t = check(&s).unwrap();
        let c = stream_config(&EndpointNames::new("ns", "gh"), &s, &t);
        let state = |bytes: u64, messages: u64| Stored { bytes, messages };
        assert_eq!(limits_would_drop(&state(999_999, 5), &c), None);
        assert!(
            limits_would_drop(&state(1_000_001, 5), &c).is_some_and(|m| m.contains("maxBytes"))
        );
        let mut few = c.clone();
        few.max_messages = 3;
        assert!(limits_would_drop(&state(10, 4), &few).is_some_and(|m| m.contains("maxMessages")));
        let mut unlimited = c.clone();
        unlimited.max_bytes = -1;
        assert_eq!(limits_would_drop(&state(u64::MAX, 5), &unlimited), None);
        // Full when the largest webhook no longer fits.
        let room = 1000 + HEADER_HEADROOM;
        assert_eq!(backlog_full(&state(1_000_000 - room, 1), &c), None);
        assert!(backlog_full(&state(1_000_000 - room + 1, 1), &c).is_some());
        assert!(backlog_full(&state(0, 3), &few).is_some());
        // Fill: the tighter limit, capped, 0 without limits.
        assert_eq!(fill_percent(&state(500_000, 1), &c), 50);
        assert_eq!(fill_percent(&state(2_000_000, 1), &c), 100);
        assert_eq!(fill_percent(&state(10, 2), &few), 66);
        assert_eq!(fill_percent(&state(0, 0), &few), 0);
        assert_eq!(fill_percent(&state(u64::MAX, 5), &unlimited), 0);
    }

    #[test]
    fn consumers_shared_or_per_partition() {
        let s = spec(BASE);
        let t = check(&s).unwrap();
        let n = EndpointNames::new("ns", "gh");
        let c = consumer_configs(&n, &s, &t);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].durable_name.as_deref(), Some("processor"));
        assert_eq!(c[0].max_ack_pending, 7);
        // The processor applies maxAttempts and the backoff schedule.
        assert_eq!(c[0].max_deliver, -1);
        assert!(c[0].backoff.is_empty());
        assert_eq!(c[0].ack_wait, Duration::from_secs(15));
        assert!(c[0].filter_subject.is_empty());

        let mut s = s;
        s.ordering = Some(serde_saphyr::from_str("{keyHeader: X-Key, partitions: 3}").unwrap());
        let c = consumer_configs(&n, &s, &t);
        assert_eq!(c.len(), 3);
        assert_eq!(c[2].durable_name.as_deref(), Some("processor-p2"));
        assert_eq!(c[2].filter_subjects, [n.subject(2), n.legacy_subject(2)]);
        assert!(c.iter().all(|c| c.max_ack_pending == 1));
    }

    #[test]
    fn diffs_classify_changes() {
        let s = spec(BASE);
        let t = check(&s).unwrap();
        let n = EndpointNames::new("ns", "gh");
        let want = stream_config(&n, &s, &t);
        assert_eq!(diff_stream(&want, &want), StreamDiff::Same);
        let mut have = want.clone();
        have.max_age = Duration::from_secs(1);
        assert_eq!(diff_stream(&have, &want), StreamDiff::Update);
        let up = updated_stream(&have, &want);
        assert_eq!(diff_stream(&up, &want), StreamDiff::Same);
        have.storage = stream::StorageType::File;
        assert_eq!(
            diff_stream(&have, &want),
            StreamDiff::Immutable(vec!["storage"])
        );
    }

    fn at(filters: &[&str], next: u64) -> Position {
        Position {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            next,
        }
    }

    fn f(filters: &[&str]) -> Vec<String> {
        filters.iter().map(|f| f.to_string()).collect()
    }

    #[test]
    fn new_consumers_resume_after_the_consumers_they_replace() {
        // Nothing before: everything stored is delivered.
        for (a, b, want) in [
            ("spillway.in.ns.ep.3", "spillway.in.ns.ep.*", true),
            ("spillway.in.ns.ep.*", "spillway.in.ns.ep.*", true),
            ("spillway.in.ns.ep.3", "spillway.in.ns.ep.4", false),
            ("spillway.in.ns_ep.3", "spillway.in.ns.ep.*", false),
            ("spillway.due.ns.ep.processor", "spillway.>", true),
            ("spillway.in.ns.ep", "spillway.in.ns.ep.*", false),
        ] {
            assert_eq!(subjects_overlap(a, b), want, "{a} {b}");
            assert_eq!(subjects_overlap(b, a), want, "{b} {a}");
        }
        assert_eq!(resume_point(&[], &[]), None);
        assert_eq!(resume_point(&[], &f(&["in.0"])), None);
        // Ordering switched on: every partition starts at the shared
        // consumer's first unsettled message.
        let shared = [at(&[], 42)];
        assert_eq!(resume_point(&shared, &f(&["in.0", "old.0"])), Some(42));
        assert_eq!(resume_point(&shared, &f(&["in.3"])), Some(42));
        // Ordering switched off: the shared consumer starts at the earliest
        // unsettled message of any partition.
        let parts = [at(&["in.0"], 91), at(&["in.1"], 13), at(&["in.2"], 101)];
        assert_eq!(resume_point(&parts, &[]), Some(13));
        assert_eq!(resume_point(&parts[2..], &[]), Some(101));
        // A partition added: its subject has no history to skip.
        assert_eq!(resume_point(&parts, &f(&["in.3", "old.3"])), None);
        // A consumer of the previous release (legacy filter only) is
        // replaced by one reading both forms: it resumes where it was.
        let before = [at(&["old.1"], 77)];
        assert_eq!(resume_point(&before, &f(&["in.1", "old.1"])), Some(77));
    }

    #[test]
    fn consumers_read_both_subject_forms() {
        let n = EndpointNames::new("ns", "gh");
        let h = history_consumer_config(&n);
        assert_eq!(h.filter_subjects, intake_filters(&n));
        let s = spec(BASE);
        let t = check(&s).unwrap();
        let w = stream_config(&n, &s, &t);
        for want in [
            "spillway.in.ns.gh.*",
            "spillway.in.ns_gh.*",
            "spillway.due.ns.gh.*",
            "spillway.due.ns_gh.*",
        ] {
            assert!(w.subjects.iter().any(|s| s == want), "{want}");
        }
        // A consumer of the previous release (one filter, legacy form)
        // is brought to both forms.
        let mut old = consumer::Config {
            filter_subject: n.legacy_stream_subjects(),
            ..h.clone()
        };
        old.filter_subjects.clear();
        assert!(history_consumer_differs(&old, &h));
        assert_eq!(filters_of(&old), [n.legacy_stream_subjects()]);
    }

    #[test]
    fn partitions_grow_only_while_none_holds_a_webhook() {
        let running = |partitions, waiting| {
            Some(PartitionState {
                partitions,
                waiting,
            })
        };
        // New endpoint, ordering switched on, or nothing waiting: applied.
        assert_eq!(partitions_to_apply(4, None), Ok(4));
        assert_eq!(partitions_to_apply(4, running(2, 0)), Ok(4));
        // Same count (a resync), or shrinking (refused by the CRD): as is.
        assert_eq!(partitions_to_apply(4, running(4, 9)), Ok(4));
        // Growing while webhooks wait: the current count is kept.
        let (keep, why) = partitions_to_apply(8, running(4, 3)).unwrap_err();
        assert_eq!(keep, 4);
        assert!(why.contains("4 → 8") && why.contains("3 webhook"), "{why}");
    }
}

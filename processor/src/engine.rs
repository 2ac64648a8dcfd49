//! The delivery loop: pull from the durable consumers, deliver under the
//! concurrency cap, then ack, retry or dead-letter.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use spillway_api::wire::{self, AttemptDecision};
use spillway_api::{stored, telemetry};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::{Instrument as _, field};

use crate::attempts::{Attempt, Recorder};
use crate::dead_letter::{self, Failure};
use crate::http;
use crate::metrics::{Metrics, ReasonLabels};
use crate::notice::Notifier;
use crate::outcome::{AttemptResult, DeadReason, Decision, decide};
use crate::settings::Settings;
use crate::signing::SecretFile;

/// How long one pull request waits for a message. Bounds how long a worker
/// takes to notice shutdown.
const PULL_WAIT: Duration = Duration::from_secs(2);

/// Wait between attempts to find the stream and consumers.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// Most messages asked for in one pull request (a pod asks for as many as
/// it has free slots, up to this).
const MAX_BATCH: usize = 512;

/// Parked retries looked at in one pull, and moved back at once.
const PARK_BATCH: usize = 256;
const PARK_CONCURRENCY: usize = 64;

/// A parked retry due within this is moved back now.
const DUE_SLACK: Duration = Duration::from_millis(5);

/// Wait before trying again to move a due retry back when the main stream
/// refused it (full, or NATS unavailable).
const MOVE_RETRY: Duration = Duration::from_secs(1);

/// Failure to start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The stream could not be looked up.
    #[error(
        "cannot open stream {stream}: {source} (the operator creates it; is the WebhookEndpoint ready?)"
    )]
    Stream {
        /// Stream name.
        stream: String,
        /// Cause.
        source: jetstream::context::GetStreamError,
    },
    /// A consumer could not be looked up.
    #[error("cannot open consumer {consumer} on stream {stream}: {source}")]
    Consumer {
        /// Stream name.
        stream: String,
        /// Consumer name.
        consumer: String,
        /// Cause.
        source: async_nats::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// The signing secret could not be loaded.
    #[error(transparent)]
    Secret(#[from] crate::signing::SecretError),
}

/// Shutdown signals: `stop` ends pulling; `abort` ends in-flight deliveries
/// (they are negatively acknowledged for immediate redelivery elsewhere).
#[derive(Debug, Clone)]
pub struct Shutdown {
    stop: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
}

/// The sending half of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownHandle {
    stop: watch::Sender<bool>,
    abort: watch::Sender<bool>,
}

impl ShutdownHandle {
    /// New signals, both off.
    pub fn new() -> (Self, Shutdown) {
        let (stop, stop_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        (
            Self { stop, abort },
            Shutdown {
                stop: stop_rx,
                abort: abort_rx,
            },
        )
    }

    /// Stop pulling new messages.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Give up on in-flight deliveries (implies stop).
    pub fn abort(&self) {
        self.stop.send_replace(true);
        self.abort.send_replace(true);
    }
}

/// One endpoint's processor.
pub struct Processor {
    settings: Settings,
    js: jetstream::Context,
    client: reqwest::Client,
    signer: Option<SecretFile>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    limiter: Option<DefaultDirectRateLimiter>,
    shutdown: Shutdown,
    ready: Arc<AtomicBool>,
    notifier: Notifier,
    recorder: Option<Recorder>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("endpoint", &self.settings.endpoint)
            .finish_non_exhaustive()
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// This pod's name for sink notices: `POD_NAME`, else `HOSTNAME` (the pod
/// name in Kubernetes), else `unknown`.
pub fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// How long ago the gateway accepted a message (its `Spillway-Received-At`,
/// else when JetStream stored this copy), or a redrive or replay put it
/// back (`Spillway-Requeued-At`), whichever is later.
fn age_of(msg: &Message, webhook: &stored::Webhook) -> Option<Duration> {
    let parse = |v: &str| v.parse::<jiff::Timestamp>().ok();
    let received = webhook.received_at.as_deref().and_then(parse).or_else(|| {
        let t = msg.info().ok()?.published;
        jiff::Timestamp::from_second(t.unix_timestamp()).ok()
    })?;
    let requeued = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(wire::REQUEUED_AT))
        .and_then(|v| parse(v.as_str()));
    let received = requeued.map_or(received, |r| r.max(received));
    let age = jiff::Timestamp::now().duration_since(received);
    Duration::try_from(age).ok()
}

/// Milliseconds since the Unix epoch.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// How often to send in-progress acknowledgements: well within the shortest
/// time after which JetStream would redeliver (ack wait, or the first backoff
/// step, which the server uses instead of ack wait when backoff is set).
pub fn progress_interval(ack_wait: Duration, backoff: &[Duration]) -> Duration {
    let shortest = backoff
        .iter()
        .copied()
        .chain([ack_wait])
        .filter(|d| !d.is_zero())
        .min()
        .unwrap_or(Duration::from_secs(30));
    (shortest / 3).max(Duration::from_millis(20))
}

impl Processor {
    /// Set up (loads the signing secret, builds the HTTP client).
    pub fn new(
        settings: Settings,
        js: jetstream::Context,
        metrics: Arc<Metrics>,
        shutdown: Shutdown,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, StartError> {
        let pool = settings.concurrency_per_replica as usize;
        let client = http::client(settings.timeout, pool)?;
        let signer = match &settings.signing_secret_file {
            Some(path) => Some(SecretFile::load(path)?),
            None => None,
        };
        let limiter = settings.rate_share.and_then(|r| {
            Quota::with_period(r.interval).map(|q| RateLimiter::direct(q.allow_burst(r.burst)))
        });
        let notifier = Notifier::new(
            js.client(),
            &settings.endpoint,
            &settings.sink_url_text,
            pod_name(),
            metrics.clone(),
        );
        let recorder = settings.attempts.clone().map(|c| {
            Recorder::start(
                js.clone(),
                &settings.endpoint,
                c,
                pod_name(),
                metrics.clone(),
            )
        });
        Ok(Self {
            recorder,
            permits: Arc::new(Semaphore::new(pool)),
            settings,
            js,
            client,
            signer,
            metrics,
            limiter,
            shutdown,
            ready,
            notifier,
        })
    }

    /// Serve until shutdown: returns once every worker has stopped. Waits
    /// (not ready) until the stream and consumers exist.
    pub async fn run(self: Arc<Self>) -> Result<(), StartError> {
        let s = &self.settings;
        if s.paused {
            tracing::info!(endpoint = %s.endpoint, "paused: not pulling until the endpoint is resumed");
            self.ready.store(true, Ordering::SeqCst);
            let mut stop = self.shutdown.stop.clone();
            let _ = stop.wait_for(|v| *v).await;
            return Ok(());
        }
        // Other pods' sink notices, for as long as this runs (never a
        // reason to be not ready).
        let _follow = AbortOnDrop(self.notifier.follow());
        // The operator creates the stream and consumers; until they exist
        // (or while NATS is unreachable) keep trying, not ready.
        let consumers = loop {
            match self.bind().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot bind to the consumers yet; retrying");
                    self.pause(BIND_RETRY).await;
                    if self.stopping() {
                        return Ok(());
                    }
                }
            }
        };
        let mut workers = JoinSet::new();
        for (name, consumer) in consumers {
            let cfg = &consumer.cached_info().config;
            let cap = s.concurrency_per_replica;
            let pending = u32::try_from(cfg.max_ack_pending).unwrap_or(0);
            let every = progress_interval(cfg.ack_wait, &cfg.backoff);
            if pending == 1 {
                // A partition of an ordered endpoint: one message at a time,
                // and this pod's slots shared by all its partitions (a
                // puller waits for a slot only once it holds a message, so
                // an idle partition takes none).
                tracing::info!(consumer = %name, progress_every = ?every, "pulling one at a time");
                workers.spawn(self.clone().worker(consumer.clone(), every));
            } else {
                // The shared consumer: JetStream's maxAckPending caps all
                // pods together, so this pod asks for as many messages as
                // it has free slots, up to the whole cap.
                let batch = (if pending > 0 { pending.min(cap) } else { cap }) as usize;
                let batch = batch.clamp(1, MAX_BATCH);
                tracing::info!(consumer = %name, slots = cap, batch, progress_every = ?every, "pulling in batches");
                workers.spawn(self.clone().puller(consumer.clone(), every, batch));
            }
        }
        if let Some(parking) = self.bind_retry().await {
            tracing::info!(consumer = %parking.cached_info().name, "moving parked retries back when due");
            workers.spawn(self.clone().parker(parking));
        }
        self.ready.store(true, Ordering::SeqCst);
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "delivery worker failed");
            }
        }
        Ok(())
    }

    /// The parking consumer, when retries are parked. Retried until it
    /// exists (the operator creates it with the stream); `None` on shutdown.
    async fn bind_retry(&self) -> Option<jetstream::consumer::PullConsumer> {
        let r = self.settings.retry.as_ref()?;
        loop {
            let found = match self.js.get_stream(&r.stream).await {
                Ok(stream) => stream
                    .get_consumer(&r.consumer)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match found {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(stream = %r.stream, consumer = %r.consumer, error = %e,
                        "cannot bind to the retry consumer yet; retrying");
                    self.pause(BIND_RETRY).await;
                    if self.stopping() {
                        return None;
                    }
                }
            }
        }
    }

    /// Look up the stream and every consumer.
    async fn bind(&self) -> Result<Vec<(String, jetstream::consumer::PullConsumer)>, StartError> {
        let s = &self.settings;
        let stream = self
            .js
            .get_stream(&s.stream)
            .await
            .map_err(|source| StartError::Stream {
                stream: s.stream.clone(),
                source,
            })?;
        let mut out = Vec::new();
        if let Some(d) = &s.drain {
            // A legacy stream being drained: its consumers first (the work
            // stream's are paused by the operator until they are done).
            match self.js.get_stream(&d.stream).await {
                Ok(legacy) => {
                    for name in &d.consumers {
                        match legacy.get_consumer(name).await {
                            Ok(c) => out.push((format!("{}/{name}", d.stream), c)),
                            Err(e) => {
                                tracing::info!(stream = %d.stream, consumer = %name, error = %e,
                                "legacy consumer gone (drained); not serving it")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::info!(stream = %d.stream, error = %e, "legacy stream gone (drained)")
                }
            }
        }
        for name in &s.consumers {
            let consumer =
                stream
                    .get_consumer(name)
                    .await
                    .map_err(|source| StartError::Consumer {
                        stream: s.stream.clone(),
                        consumer: name.clone(),
                        source,
                    })?;
            out.push((name.clone(), consumer));
        }
        Ok(out)
    }

    /// Pull from the shared consumer in batches sized to this pod's free
    /// slots; each message is delivered in its own task holding one slot.
    async fn puller(
        self: Arc<Self>,
        consumer: jetstream::consumer::PullConsumer,
        every: Duration,
        max_batch: usize,
    ) {
        let mut running = JoinSet::new();
        let mut stop = self.shutdown.stop.clone();
        while !self.stopping() {
            while running.try_join_next().is_some() {}
            // At least one free slot, then as many more as are free.
            let first = tokio::select! {
                p = self.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stop.wait_for(|v| *v) => break,
            };
            let mut slots = vec![first];
            while slots.len() < max_batch {
                match self.permits.clone().try_acquire_owned() {
                    Ok(p) => slots.push(p),
                    Err(_) => break,
                }
            }
            let Some(mut batch) = self.pull(&consumer, slots.len(), "pull request").await else {
                continue;
            };
            // Messages as they arrive, each with a slot; the request ends
            // when it has them all or expires.
            while let Some(m) = batch.next().await {
                match m {
                    Ok(msg) => {
                        let Some(slot) = slots.pop() else {
                            // JetStream never sends more than asked for;
                            // should it, the message waits for a slot.
                            running.spawn(self.clone().handle(msg, every, None));
                            continue;
                        };
                        running.spawn(self.clone().handle(msg, every, Some(slot)));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pull failed; retrying");
                        self.pause(Duration::from_millis(500)).await;
                        break;
                    }
                }
            }
        }
        // Shutdown: finish what is in hand.
        while running.join_next().await.is_some() {}
    }

    /// Ask `consumer` for up to `n` messages (the request ends when it has
    /// them or after [`PULL_WAIT`]); `None`, after a pause, when the request
    /// failed.
    async fn pull(
        &self,
        consumer: &jetstream::consumer::PullConsumer,
        n: usize,
        what: &str,
    ) -> Option<jetstream::consumer::pull::Batch> {
        match consumer
            .batch()
            .max_messages(n)
            .expires(PULL_WAIT)
            .messages()
            .await
        {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed; retrying");
                self.pause(Duration::from_secs(1)).await;
                None
            }
        }
    }

    /// Move parked retries back to the main stream when they are due: one
    /// not yet due is handed back to JetStream with a delayed NAK for the
    /// time left (the timer is the server's, so a pod that dies loses
    /// nothing); a due one is published to the due subject and, once
    /// JetStream has it, acknowledged here.
    async fn parker(self: Arc<Self>, consumer: jetstream::consumer::PullConsumer) {
        while !self.stopping() {
            let Some(batch) = self
                .pull(&consumer, PARK_BATCH, "pulling parked retries")
                .await
            else {
                continue;
            };
            batch
                .for_each_concurrent(PARK_CONCURRENCY, |m| {
                    let this = self.clone();
                    async move {
                        match m {
                            Ok(msg) => this.move_when_due(msg).await,
                            Err(e) => {
                                tracing::warn!(error = %e, "pulling parked retries failed");
                                this.pause(Duration::from_millis(500)).await;
                            }
                        }
                    }
                })
                .await;
        }
    }

    async fn move_when_due(&self, msg: Message) {
        let Some(r) = &self.settings.retry else {
            return;
        };
        let Ok(info) = msg.info() else {
            tracing::warn!("parked retry without JetStream metadata; terminating it");
            let _ = msg.ack_with(AckKind::Term).await;
            return;
        };
        let parked_seq = info.stream_sequence;
        let headers = msg.headers.clone().unwrap_or_default();
        let now_ms = now_millis();
        let due_ms = headers
            .get(wire::RETRY_AT)
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .unwrap_or(now_ms);
        let left = Duration::from_millis(due_ms.saturating_sub(now_ms));
        if left > DUE_SLACK {
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(left))).await {
                tracing::debug!(error = %e, "delayed NAK of a parked retry failed; JetStream hands it out again after its ack wait");
            }
            return;
        }
        let mut out = wire::carried_headers(&headers);
        for h in [wire::ATTEMPTS_SPENT, wire::RETRY_OF] {
            if let Some(v) = headers.get(h) {
                out.insert(h, v.as_str());
            }
        }
        out.insert(
            wire::NATS_MSG_ID,
            wire::due_msg_id(&r.stream, parked_seq).as_str(),
        );
        let published = self
            .publish_acked(r.due_subject.clone(), out, &msg)
            .await
            .map(|_| ());
        match published {
            Ok(()) => {
                self.metrics.retries_moved.inc();
                if let Err(e) = msg.double_ack().await {
                    self.metrics.ack_failures.inc();
                    tracing::warn!(parked_seq, error = %e,
                        "ack of a moved retry not confirmed; moving it again is deduplicated");
                }
            }
            Err(e) => {
                self.metrics.retry_move_failures.inc();
                tracing::warn!(parked_seq, error = %e, "cannot move a due retry back yet; keeping it");
                let _ = msg.ack_with(AckKind::Nak(Some(MOVE_RETRY))).await;
            }
        }
    }

    /// Publish a copy of `msg`'s body and wait for JetStream's
    /// acknowledgement.
    async fn publish_acked(
        &self,
        subject: String,
        headers: async_nats::HeaderMap,
        msg: &Message,
    ) -> Result<async_nats::jetstream::publish::PublishAck, String> {
        match self
            .js
            .publish_with_headers(subject, headers, msg.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A dead-letter publish answered "duplicate": JetStream saw this id
    /// within its window. That is only a success if the dead-letter stream
    /// still holds the message under that id (a publish repeated after a
    /// lost acknowledgement); otherwise terminating the original would lose
    /// it.
    async fn dead_letter_held(
        &self,
        subject: &str,
        ack: &async_nats::jetstream::publish::PublishAck,
        id: &str,
    ) -> Result<(), String> {
        let name = self
            .js
            .stream_by_subject(subject)
            .await
            .map_err(|e| format!("finding the dead-letter stream: {e}"))?;
        let stream = self
            .js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| format!("opening the dead-letter stream: {e}"))?;
        let held = stream
            .get_raw_message(ack.sequence)
            .await
            .map_err(|e| format!("the dead-letter stream does not hold it: {e}"))?;
        let held_id = held
            .headers
            .get(wire::NATS_MSG_ID)
            .map(|v| v.as_str().to_owned());
        if held_id.as_deref() == Some(id) {
            Ok(())
        } else {
            Err("the dead-letter stream answered duplicate but holds another message there".into())
        }
    }

    /// Park a failed delivery in the retry stream until `delay` has passed,
    /// then acknowledge it here, freeing its slot at once. `false` when it
    /// could not be parked (the caller then waits on this consumer).
    async fn park(&self, msg: &Message, delay: Duration, attempt: u32, seq: u64) -> bool {
        let Some(r) = &self.settings.retry else {
            return false;
        };
        let original = msg.headers.clone().unwrap_or_default();
        let mut out = wire::carried_headers(&original);
        out.insert(wire::ATTEMPTS_SPENT, attempt.to_string().as_str());
        let due = now_millis().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        out.insert(wire::RETRY_AT, due.to_string().as_str());
        let first = original
            .get(wire::RETRY_OF)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_else(|| seq.to_string());
        out.insert(wire::RETRY_OF, first.as_str());
        out.insert(
            wire::NATS_MSG_ID,
            wire::park_msg_id(&self.settings.stream, seq).as_str(),
        );
        let published = self
            .publish_acked(r.subject.clone(), out, msg)
            .await
            .map(|_| ());
        match published {
            Ok(()) => {
                if let Err(e) = msg.double_ack().await {
                    self.metrics.ack_failures.inc();
                    tracing::warn!(seq, error = %e,
                        "ack after parking not confirmed; a redelivery parks it again (deduplicated)");
                }
                true
            }
            Err(e) => {
                self.metrics.park_failures.inc();
                tracing::warn!(seq, error = %e, "cannot park the retry; it waits on the consumer instead");
                false
            }
        }
    }

    async fn worker(self: Arc<Self>, consumer: jetstream::consumer::PullConsumer, every: Duration) {
        while !self.stopping() {
            let Some(mut batch) = self.pull(&consumer, 1, "pull request").await else {
                continue;
            };
            // At most one message; the batch ends when it expires.
            while let Some(m) = batch.next().await {
                match m {
                    Ok(msg) => self.clone().handle(msg, every, None).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "pull failed; retrying");
                        self.pause(Duration::from_millis(500)).await;
                    }
                }
            }
        }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.stop.borrow()
    }

    async fn pause(&self, d: Duration) {
        let mut stop = self.shutdown.stop.clone();
        let _ = tokio::time::timeout(d, stop.wait_for(|v| *v)).await;
    }

    /// Run `fut` while sending in-progress acknowledgements for `msg` every
    /// `every`; `None` when aborted.
    async fn keep_alive<F: Future>(
        &self,
        msg: &Message,
        every: Duration,
        fut: F,
    ) -> Option<F::Output> {
        let mut abort = self.shutdown.abort.clone();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                _ = tick.tick() => {
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %e, "in-progress ack failed");
                    }
                }
                aborted = async { abort.wait_for(|v| *v).await.is_ok() } => {
                    if aborted {
                        return None;
                    }
                    // Sender gone: no abort can come; just finish.
                    return Some(fut.await);
                }
            }
        }
    }

    async fn nak_now(&self, msg: &Message) {
        if let Err(e) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::warn!(error = %e, "negative ack failed; JetStream redelivers after ack wait");
        }
    }

    /// Deliver one message. `slot` is the delivery slot it was pulled for;
    /// without one (ordered partitions) it waits for one here.
    async fn handle(
        self: Arc<Self>,
        msg: Message,
        every: Duration,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let spent = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(wire::ATTEMPTS_SPENT))
            .and_then(|v| v.as_str().parse::<u32>().ok())
            .unwrap_or(0);
        let (attempt, seq) = match msg.info() {
            Ok(i) => (
                spent.saturating_add(u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX)),
                i.stream_sequence,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "message without JetStream metadata; terminating it");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        let s = &self.settings;
        // The webhook as stored (either format; spillway_api::stored).
        let webhook = match stored::decode(msg.headers.as_ref(), &msg.payload) {
            Ok(w) => w,
            Err(e) => {
                let result = AttemptResult::Transport(e.to_string());
                self.dead_letter(&msg, DeadReason::Malformed, attempt, seq, &result)
                    .await;
                return;
            }
        };
        let body = msg
            .payload
            .slice(webhook.body_offset.min(msg.payload.len())..);
        // Exported spans (OTLP; disabled callsites otherwise): children of
        // the gateway's publish span, from the stored traceparent.
        let stored_trace = webhook
            .traceparent
            .as_deref()
            .and_then(spillway_api::trace::TraceParent::parse);
        let otel_span = |span: tracing::Span| {
            if let Some(tp) = &stored_trace {
                telemetry::set_parent(&span, tp);
            }
            span
        };
        // From arrival to a delivery slot (or the filter's verdict).
        let pull = otel_span(tracing::info_span!(
            target: telemetry::TARGET,
            "pull",
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.destination.name = %s.stream,
            webhook.stream_sequence = seq,
            webhook.attempt = attempt,
            webhook.filtered = field::Empty,
        ));
        // A listener's filter decides before a delivery slot is taken: what
        // it does not select is settled for this listener at once (the
        // other listeners' consumers still hold it) and counted.
        if let Some(filter) = &s.filter {
            let verdict = filter.check(
                webhook
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
                &body,
            );
            if verdict != spillway_api::filter::Verdict::Match {
                pull.record("webhook.filtered", verdict.as_str());
                self.metrics
                    .filtered
                    .get_or_create(&crate::metrics::FilteredLabels {
                        reason: verdict.as_str(),
                    })
                    .inc();
                tracing::debug!(
                    seq,
                    reason = verdict.as_str(),
                    "not selected by the listener's filter"
                );
                if let Err(e) = msg.double_ack().await {
                    self.metrics.ack_failures.inc();
                    tracing::warn!(seq, error = %e, "ack of a filtered webhook not confirmed; it is checked again");
                }
                return;
            }
        }
        // A message already in hand when shutdown begins is still delivered
        // (within the shutdown grace): handing it back unsent would spend
        // one of its attempts. Only an abort hands it back.
        // Wait for a delivery slot (and the rate limit), keeping the
        // message alive meanwhile.
        let slot = self
            .keep_alive(&msg, every, async {
                let permit = match slot {
                    Some(p) => Ok(p),
                    None => self.permits.clone().acquire_owned().await,
                };
                if let Some(l) = &self.limiter {
                    l.until_ready().await;
                }
                permit
            })
            .await;
        drop(pull);
        let _permit = match slot {
            Some(Ok(p)) => p,
            _ => {
                self.nak_now(&msg).await;
                return;
            }
        };
        if attempt > s.max_attempts {
            // Earlier attempts did not finish (crash, lost ack or failed
            // dead-letter publish): do not deliver again.
            let result = AttemptResult::Transport(format!(
                "delivered {attempt} times; earlier attempts did not complete"
            ));
            self.dead_letter(&msg, DeadReason::MaxAttempts, attempt, seq, &result)
                .await;
            return;
        }

        if let Some(max) = s.expire_after
            && let Some(age) = age_of(&msg, &webhook)
            && age > max
        {
            let result = AttemptResult::Transport(format!(
                "received {}s ago, longer than stream.maxAge ({}s); not delivered",
                age.as_secs(),
                max.as_secs()
            ));
            self.dead_letter(&msg, DeadReason::Expired, attempt, seq, &result)
                .await;
            return;
        }

        let id = webhook
            .delivery_id
            .clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("{}-{seq}", s.stream));
        let deliver = otel_span(tracing::info_span!(
            target: telemetry::TARGET,
            "deliver",
            otel.kind = "client",
            server.address = s.sink_url.host_str().unwrap_or_default(),
            webhook.attempt = attempt,
            http.response.status_code = field::Empty,
            otel.status_code = field::Empty,
        ));
        // The sink's traceparent: the deliver span when exported, else a new
        // span id in the stored trace.
        let traceparent = telemetry::traceparent_of(&deliver)
            .unwrap_or_else(|| spillway_api::trace::child_of(webhook.traceparent.as_deref()))
            .header();
        let mut out = http::outgoing_headers(&webhook, attempt, &traceparent);
        if let Some(sf) = &self.signer {
            http::sign(&mut out, &sf.signer(), &id, &body);
        }

        self.metrics.in_flight.inc();
        let started = Instant::now();
        let started_at = jiff::Timestamp::now();
        let result = self
            .keep_alive(
                &msg,
                every,
                http::post(&self.client, &s.sink_url, out, body.clone())
                    .instrument(deliver.clone()),
            )
            .await;
        self.metrics.in_flight.dec();
        if let Some(r) = &result {
            if let Some(code) = r.status() {
                deliver.record("http.response.status_code", code);
            }
            if !matches!(r.status(), Some(200..=299)) {
                deliver.record("otel.status_code", "ERROR");
            }
        }
        drop(deliver);
        let Some(result) = result else {
            self.metrics.delivery("abandoned", "none");
            self.nak_now(&msg).await;
            return;
        };
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let class = result.status_class();
        self.notifier.observe(result.status());

        let decision = decide(&result, attempt, s.max_attempts, &s.backoff);
        if let Some(r) = &self.recorder {
            r.record(&Attempt {
                delivery_id: &id,
                received_at: webhook.received_at.as_deref(),
                attempt,
                stream_sequence: seq,
                started_at,
                took: started.elapsed(),
                result: &result,
                decision: match decision {
                    Decision::Ack => AttemptDecision::Delivered,
                    Decision::Retry { .. } => AttemptDecision::Retry,
                    Decision::DeadLetter { .. } => AttemptDecision::Dead,
                },
            });
        }
        let ack = otel_span(tracing::info_span!(
            target: telemetry::TARGET,
            "ack",
            webhook.decision = match decision {
                Decision::Ack => "delivered",
                Decision::Retry { .. } => "retry",
                Decision::DeadLetter { .. } => "dead",
            },
        ));
        async {
        match decision {
            Decision::Ack => {
                self.metrics.delivery("acked", class);
                if let Err(e) = msg.double_ack().await {
                    self.metrics.ack_failures.inc();
                    tracing::warn!(seq, error = %e, "ack not confirmed; the message may be delivered again");
                }
                tracing::debug!(seq, attempt, id = %id, "delivered");
            }
            Decision::Retry { delay } => {
                self.metrics.delivery("retried", class);
                self.metrics.retries.inc();
                tracing::info!(seq, attempt, id = %id, ?delay, failure = %result.describe(), "retrying");
                // Unordered: wait off the cap, in the retry stream.
                // Ordered (or the retry stream refused it): wait here,
                // holding this consumer's place.
                if !self.park(&msg, delay, attempt, seq).await
                    && let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await
                {
                    tracing::warn!(seq, error = %e, "negative ack failed; JetStream redelivers after ack wait");
                }
            }
            Decision::DeadLetter { reason } => {
                if reason == DeadReason::Gone {
                    self.metrics.sink_gone.inc();
                    tracing::error!(
                        seq,
                        endpoint = %s.endpoint,
                        "the sink answered 410 Gone: it says it no longer exists; \
                         dead-lettering; fix processor.sink, then redrive with `spillway dlq redrive`"
                    );
                }
                self.dead_letter(&msg, reason, attempt, seq, &result).await;
            }
        }
        }
        .instrument(ack)
        .await;
    }

    /// Publish to the dead-letter stream and only after its PubAck terminate
    /// the original; when the publish fails, retry the message later.
    async fn dead_letter(
        &self,
        msg: &Message,
        reason: DeadReason,
        attempt: u32,
        seq: u64,
        result: &AttemptResult,
    ) {
        let s = &self.settings;
        let class = result.status_class();
        let detail = result.describe();
        let Some(subject) = &s.dead_letter_subject else {
            self.metrics.delivery("dropped", class);
            self.metrics.dropped.inc();
            tracing::warn!(seq, attempt, reason = reason.as_str(), failure = %detail,
                "giving up; dead letters are disabled, so the message is dropped");
            if let Err(e) = msg.double_ack_with(AckKind::Term).await {
                self.metrics.ack_failures.inc();
                tracing::warn!(seq, error = %e, "terminate not confirmed");
            }
            return;
        };
        let failed_at = jiff::Timestamp::now().to_string();
        let headers = dead_letter::headers(
            msg.headers.as_ref(),
            &Failure {
                reason,
                detail: &detail,
                attempts: attempt,
                last_status: result.status(),
                stream: &s.stream,
                seq,
                published_unix_nanos: msg
                    .info()
                    .map(|i| i.published.unix_timestamp_nanos())
                    .unwrap_or_default(),
                subject: msg.subject.as_str(),
                failed_at: &failed_at,
            },
        );
        let id = headers
            .get(wire::NATS_MSG_ID)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let published = match self.publish_acked(subject.clone(), headers, msg).await {
            Ok(ack) if ack.duplicate => self.dead_letter_held(subject, &ack, &id).await,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        match published {
            Ok(()) => {
                self.metrics.delivery("dead_lettered", class);
                self.metrics
                    .dead_lettered
                    .get_or_create(&ReasonLabels {
                        reason: reason.as_str(),
                    })
                    .inc();
                tracing::warn!(seq, attempt, reason = reason.as_str(), failure = %detail, "dead-lettered");
                if let Err(e) = msg.double_ack_with(AckKind::Term).await {
                    self.metrics.ack_failures.inc();
                    tracing::warn!(seq, error = %e,
                        "terminate not confirmed; a redelivery is dead-lettered again and deduplicated");
                }
            }
            Err(e) => {
                self.metrics.dead_letter_publish_failures.inc();
                let delay = s.backoff_after(attempt);
                tracing::error!(seq, error = %e, ?delay,
                    "dead-letter publish failed; keeping the message and retrying");
                if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(seq, error = %e, "negative ack failed; JetStream redelivers after ack wait");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_sent_well_before_redelivery() {
        let s = Duration::from_secs;
        assert_eq!(progress_interval(s(30), &[]), s(10));
        assert_eq!(progress_interval(s(30), &[s(3), s(60)]), s(1));
        assert_eq!(progress_interval(Duration::ZERO, &[]), s(10));
        assert_eq!(
            progress_interval(Duration::from_millis(30), &[]),
            Duration::from_millis(20)
        );
    }
}

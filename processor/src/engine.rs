//! The delivery loop: pull from the durable consumers, deliver under the
//! concurrency cap, then ack, retry or dead-letter.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, Message};
use futures::StreamExt as _;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use ring::rand::SystemRandom;
use spillway_api::wire;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

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
    permits: Semaphore,
    limiter: Option<DefaultDirectRateLimiter>,
    rng: SystemRandom,
    shutdown: Shutdown,
    ready: Arc<AtomicBool>,
    notifier: Notifier,
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
        Ok(Self {
            permits: Semaphore::new(pool),
            settings,
            js,
            client,
            signer,
            metrics,
            limiter,
            rng: SystemRandom::new(),
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
            let n = match u32::try_from(cfg.max_ack_pending) {
                Ok(m) if m > 0 => m.min(cap),
                _ => cap,
            };
            let every = progress_interval(cfg.ack_wait, &cfg.backoff);
            tracing::info!(consumer = %name, workers = n, progress_every = ?every, "pulling");
            for _ in 0..n {
                workers.spawn(self.clone().worker(consumer.clone(), every));
            }
        }
        self.ready.store(true, Ordering::SeqCst);
        while let Some(r) = workers.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "delivery worker failed");
            }
        }
        Ok(())
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

    async fn worker(self: Arc<Self>, consumer: jetstream::consumer::PullConsumer, every: Duration) {
        while !self.stopping() {
            let batch = consumer
                .batch()
                .max_messages(1)
                .expires(PULL_WAIT)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "pull request failed; retrying");
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // At most one message; the batch ends when it expires.
            while let Some(m) = batch.next().await {
                match m {
                    Ok(msg) => self.handle(msg, every).await,
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

    async fn handle(&self, msg: Message, every: Duration) {
        let (attempt, seq) = match msg.info() {
            Ok(i) => (
                u32::try_from(i.delivered.max(1)).unwrap_or(u32::MAX),
                i.stream_sequence,
            ),
            Err(e) => {
                tracing::warn!(error = %e, "message without JetStream metadata; terminating it");
                let _ = msg.ack_with(AckKind::Term).await;
                return;
            }
        };
        // A message already in hand when shutdown begins is still delivered
        // (within the shutdown grace): handing it back unsent would spend
        // one of its attempts. Only an abort hands it back.
        let s = &self.settings;
        // Wait for a delivery slot (and the rate limit), keeping the
        // message alive meanwhile.
        let slot = self
            .keep_alive(&msg, every, async {
                let permit = self.permits.acquire().await;
                if let Some(l) = &self.limiter {
                    l.until_ready().await;
                }
                permit
            })
            .await;
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

        let headers = msg.headers.as_ref();
        let id = headers
            .and_then(|h| h.get(wire::DELIVERY_ID))
            .map(|v| v.as_str().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| format!("{}-{seq}", s.stream));
        let incoming_tp = headers
            .and_then(|h| h.get(wire::TRACEPARENT))
            .map(|v| v.as_str().to_owned());
        let traceparent = crate::trace::child_of(incoming_tp.as_deref(), &self.rng).header();
        let mut out = http::outgoing_headers(headers, attempt, &traceparent);
        if let Some(sf) = &self.signer {
            http::sign(&mut out, &sf.signer(), &id, &msg.payload);
        }

        self.metrics.in_flight.inc();
        let started = Instant::now();
        let result = self
            .keep_alive(
                &msg,
                every,
                http::post(&self.client, &s.sink_url, out, msg.payload.clone()),
            )
            .await;
        self.metrics.in_flight.dec();
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

        match decide(&result, attempt, s.max_attempts, &s.backoff) {
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
                if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
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
                subject: msg.subject.as_str(),
                failed_at: &failed_at,
            },
        );
        let published = match self
            .js
            .publish_with_headers(subject.clone(), headers, msg.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
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

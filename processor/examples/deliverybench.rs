//! A bounded delivery benchmark for the processor, loopback only.
//!
//! Starts a real nats-server (the `spillway-tests` harness, from
//! `.tools/bin`), creates each endpoint's stream, dead-letter stream and
//! durable consumer with the operator's own config functions, preloads a
//! backlog, then starts the real release `spillway-processor` binary (one
//! replica) against an in-process HTTP sink with a fixed artificial latency.
//! The sink counts distinct deliveries and the most requests it ever had in
//! flight at once (which must not exceed the endpoint's concurrency). After
//! the drain, single probe messages measure the publish-to-sink latency of an
//! idle processor. Writes a Markdown report.
//!
//! ```text
//! cargo build --release -p spillway-processor --examples --bins
//! target/release/examples/deliverybench --out docs/benchmarks/processor.md
//! ```
//!
//! The report's "Reading" section is written by hand for the run it shows;
//! regenerating the report drops it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream;
use axum::body::Bytes;
use axum::extract::State;
use clap::Parser;
use spillway_api::WebhookEndpoint;
use spillway_api::names::EndpointNames;
use spillway_api::validate;
use spillway_api::wire::{self, PROCESSOR_CONFIG_ENV};
use spillway_operator::jetstream::{
    attempts_config, consumer_configs, dead_letter_config, history_config, retry_consumer_configs,
    retry_stream_config, stream_config,
};
use spillway_operator::render::processor_config;
use spillway_tests::{NatsServer, eventually, free_port, watchdog};

const NAMESPACE: &str = "bench";

#[derive(Parser, Debug)]
struct Args {
    /// Messages per scenario with a 0 ms sink; the most any scenario gets.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// With a slower sink, a scenario gets about this many seconds of work
    /// at the ideal rate (concurrency / latency), within
    /// [--min-messages, --messages].
    #[arg(long, default_value_t = 8)]
    target_seconds: u64,
    /// Fewest messages in a scenario.
    #[arg(long, default_value_t = 100)]
    min_messages: u64,
    /// Sink latencies in milliseconds (comma-separated).
    #[arg(long, default_value = "30")]
    latency_ms: String,
    /// Endpoint concurrencies (comma-separated: one scenario each per latency
    /// and failure share).
    #[arg(long, default_value = "3,32,128")]
    concurrency: String,
    /// Shares of webhooks (percent, comma-separated) whose first attempt the
    /// sink answers 503 (retried on the endpoint's backoff, 1 s first).
    #[arg(long, default_value = "0,15,50")]
    failure_pct: String,
    /// Concurrencies at which a 0 ms sink is drained by the processor and by
    /// the benchmark's own raw fetch+POST+ack loop, side by side (empty:
    /// none).
    #[arg(long, default_value = "32,128")]
    raw_concurrency: String,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Latency probes per scenario, sent one at a time after the drain.
    #[arg(long, default_value_t = 100)]
    probes: u32,
    /// Hard stop per drain, seconds.
    #[arg(long, default_value_t = 180)]
    max_seconds: u64,
    /// The processor binary.
    #[arg(long, default_value = "target/release/spillway-processor")]
    processor_bin: PathBuf,
    /// Markdown report to write.
    #[arg(long)]
    out: Option<PathBuf>,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Microseconds since the benchmark started (shared by publisher and sink).
fn now_us() -> u64 {
    u64::try_from(EPOCH.elapsed().as_micros()).unwrap_or(u64::MAX)
}

// ------------------------------------------------------------------ sink

struct Sink {
    latency: Duration,
    /// Percent of messages whose first attempt is answered 503.
    fail_pct: u64,
    failed: Mutex<HashSet<u64>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    requests: AtomicU64,
    distinct: AtomicU64,
    seen: Mutex<HashSet<u64>>,
    first_us: AtomicU64,
    last_us: AtomicU64,
    probe_us: Mutex<Vec<u64>>,
}

impl Sink {
    fn new(latency: Duration, fail_pct: u64) -> Self {
        Self {
            latency,
            fail_pct,
            failed: Mutex::new(HashSet::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            seen: Mutex::new(HashSet::new()),
            first_us: AtomicU64::new(u64::MAX),
            last_us: AtomicU64::new(0),
            probe_us: Mutex::new(Vec::new()),
        }
    }
}

/// Counts a request as in flight until dropped (also when the processor
/// gives up on it and the handler is cancelled).
struct InFlight(Arc<Sink>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether message `i` is one whose first attempt fails (a fixed spread).
fn fails_first(i: u64, pct: u64) -> bool {
    (i.wrapping_mul(2_654_435_761) >> 7) % 100 < pct
}

async fn sink_handler(State(s): State<Arc<Sink>>, body: Bytes) -> axum::http::StatusCode {
    let at = now_us();
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(s.clone());
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    s.first_us.fetch_min(at, Ordering::SeqCst);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let i = v["i"].as_u64().unwrap_or(u64::MAX);
    if v["probe"].as_bool() == Some(true)
        && let Some(t) = v["t"].as_u64()
    {
        s.probe_us
            .lock()
            .expect("probe lock")
            .push(at.saturating_sub(t));
    }
    if !s.latency.is_zero() {
        tokio::time::sleep(s.latency).await;
    }
    s.requests.fetch_add(1, Ordering::SeqCst);
    s.last_us.fetch_max(now_us(), Ordering::SeqCst);
    if v["probe"].as_bool() != Some(true)
        && fails_first(i, s.fail_pct)
        && s.failed.lock().expect("failed lock").insert(i)
    {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
    }
    if s.seen.lock().expect("seen lock").insert(i) {
        s.distinct.fetch_add(1, Ordering::SeqCst);
    }
    axum::http::StatusCode::OK
}

async fn start_sink(latency: Duration, fail_pct: u64) -> Result<(Arc<Sink>, String)> {
    let state = Arc::new(Sink::new(latency, fail_pct));
    let app = axum::Router::new()
        .fallback(axum::routing::post(sink_handler))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((state, format!("http://{addr}/hook")))
}

// ------------------------------------------------------------- processor

/// The processor child: SIGTERM on drop, then SIGKILL if it lingers.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// User + system CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Machine-wide (busy, total) jiffies from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// -------------------------------------------------------------- scenario

struct Outcome {
    latency_ms: u64,
    concurrency: u32,
    fail_pct: u64,
    /// Delivered by the benchmark's raw loop, not the processor.
    raw: bool,
    messages: u64,
    sink_calls: u64,
    /// Records in the endpoint's attempt stream at the end, against every
    /// sink call including the probes' (the raw loop records none).
    attempt_records: (u64, u64),
    drain: Duration,
    rate: f64,
    first_delivery: Duration,
    max_in_flight: usize,
    duplicates: u64,
    proc_cpu_pct: f64,
    proc_cpu_us_per_delivery: f64,
    machine_cpu_pct: f64,
    rss_kib: u64,
    probe_us: Vec<u64>,
}

fn endpoint(name: &str, sink_url: &str, concurrency: u32) -> Result<WebhookEndpoint> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "verification": {"scheme": "none"},
            "processor": {
                "sink": {"url": sink_url},
                "concurrency": concurrency,
                "replicas": {"min": 1, "max": 1},
            },
        },
    }))?)
}

/// A webhook as the gateway stores it (stored format 2): `Nats-Msg-Id`,
/// and the metadata and a provider header in front of the body.
fn stored(name: &str, id: &str, body: Bytes) -> (HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    h.insert(wire::NATS_MSG_ID, id);
    let endpoint = format!("{NAMESPACE}/{name}");
    let received_at = format!("{:.3}", jiff::Timestamp::now());
    let meta = spillway_api::stored::Metadata {
        endpoint: &endpoint,
        delivery_id: id,
        received_at: &received_at,
        content_type: Some("application/json"),
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        tracestate: None,
        ordering_key: None,
    };
    let payload =
        spillway_api::stored::encode(&meta, [("x-github-event", "push")].into_iter(), &body);
    (h, payload.into())
}

fn body(i: u64, probe: bool, pad: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"i\":{i},\"t\":{},\"probe\":{probe},\"pad\":\"{pad}\"}}",
        now_us()
    ))
}

fn messages_for(args: &Args, latency_ms: u64, concurrency: u32) -> u64 {
    if latency_ms == 0 {
        return args.messages;
    }
    let ideal = u64::from(concurrency) * 1000 / latency_ms * args.target_seconds;
    ideal.clamp(args.min_messages.min(args.messages), args.messages)
}

/// One scenario's shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    latency_ms: u64,
    concurrency: u32,
    fail_pct: u64,
    raw: bool,
}

async fn scenario(
    nats: &NatsServer,
    js: &jetstream::Context,
    shape: Shape,
    args: &Args,
    ticks_per_s: f64,
    dir: &Path,
) -> Result<Outcome> {
    let Shape {
        latency_ms,
        concurrency,
        fail_pct,
        raw,
    } = shape;
    let name = format!(
        "l{latency_ms}-c{concurrency}-f{fail_pct}{}",
        if raw { "-raw" } else { "" }
    );
    let names = EndpointNames::new(NAMESPACE, &name);
    let (sink, sink_url) = start_sink(Duration::from_millis(latency_ms), fail_pct).await?;
    let ep = endpoint(&name, &sink_url, concurrency)?;
    let timings =
        validate::check(&ep.spec).map_err(|p| anyhow::anyhow!("invalid endpoint: {p:?}"))?;

    // What the operator creates for this endpoint.
    let stream = js
        .create_stream(stream_config(&names, &ep.spec, &timings))
        .await?;
    js.create_stream(dead_letter_config(&names, &ep.spec, &timings))
        .await?;
    js.create_stream(history_config(&names, &ep.spec, &timings, false))
        .await?;
    // Every attempt is recorded there (without it each record's publish
    // would find no stream and be dropped, which costs less than storing).
    js.create_stream(attempts_config(&names, &ep.spec, &timings))
        .await?;
    for c in consumer_configs(&names, &ep.spec, &timings) {
        stream.create_consumer(c).await?;
    }
    let retry = js
        .create_stream(retry_stream_config(&names, &ep.spec, &timings))
        .await?;
    for c in retry_consumer_configs(&names, &ep.spec) {
        retry.create_consumer(c).await?;
    }
    let config = processor_config(&ep, &names, &timings);

    // The backlog, published as the gateway would (pipelined PubAcks).
    let n = messages_for(args, latency_ms, concurrency);
    let pad = "x".repeat(args.body_bytes.saturating_sub(64));
    let subject = names.subject(0);
    let mut acks = Vec::with_capacity(512);
    for i in 0..n {
        let id = format!("{name}-{i}");
        let (h, p) = stored(&name, &id, body(i, false, &pad));
        acks.push(js.publish_with_headers(subject.clone(), h, p).await?);
        if acks.len() == 512 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks.drain(..) {
        a.await?;
    }

    let log = dir.join(format!("{name}.log"));
    let machine_before = machine_ticks();
    let spawned_us = now_us();
    let (proc, raw_loop) = if raw {
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_consumer(&names.consumer(None))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let url = sink_url.clone();
        (
            None,
            Some(AbortOnDrop(tokio::spawn(raw_loop(
                consumer,
                url,
                concurrency,
            )))),
        )
    } else {
        let child = Command::new(&args.processor_bin)
            .env(PROCESSOR_CONFIG_ENV, serde_json::to_string(&config)?)
            .env("SPILLWAY_NATS_URL", &nats.url)
            .env("SPILLWAY_ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("RUST_LOG", "warn")
            .env("POD_NAME", format!("bench-{name}"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.processor_bin.display()))?;
        watchdog(child.id());
        (Some(Proc { child, log }), None)
    };
    let log_tail = || proc.as_ref().map_or_else(String::new, Proc::log_tail);

    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    while sink.distinct.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            bail!(
                "{name}: {} of {n} delivered after {} s; processor log:\n{}",
                sink.distinct.load(Ordering::SeqCst),
                args.max_seconds,
                log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let machine_after = machine_ticks();
    let proc_ticks = proc.as_ref().and_then(|p| cpu_ticks(p.pid())).unwrap_or(0);
    let (first, last) = (
        sink.first_us.load(Ordering::SeqCst),
        sink.last_us.load(Ordering::SeqCst),
    );
    let drain = Duration::from_micros(last.saturating_sub(spawned_us));
    let active = Duration::from_micros(last.saturating_sub(first)).max(Duration::from_micros(1));
    let sink_calls = sink.requests.load(Ordering::SeqCst);
    let failed_first = sink.failed.lock().expect("failed lock").len() as u64;
    let duplicates = sink_calls.saturating_sub(n + failed_first);

    // Idle pick-up latency: one message at a time, publish to sink arrival.
    for k in 0..u64::from(args.probes) {
        let i = n + k;
        let id = format!("{name}-probe-{k}");
        let (h, p) = stored(&name, &id, body(i, true, &pad));
        js.publish_with_headers(subject.clone(), h, p)
            .await?
            .await?;
        let until = Instant::now() + Duration::from_secs(10);
        while sink.distinct.load(Ordering::SeqCst) <= i {
            if Instant::now() > until {
                bail!("{name}: probe {k} not delivered within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // Everything acknowledged: nothing pending, nothing in flight.
    let consumer = names.consumer(None);
    eventually(Duration::from_secs(15), "consumer drained", || {
        let stream = stream.clone();
        let consumer = consumer.clone();
        async move {
            match stream.consumer_info(&consumer).await {
                Ok(i) => i.num_pending == 0 && i.num_ack_pending == 0,
                Err(_) => false,
            }
        }
    })
    .await?;
    // Records are published in the background: wait (briefly) for every
    // call's.
    let all_calls = sink.requests.load(Ordering::SeqCst);
    let expected = if raw { 0 } else { all_calls };
    let attempts = names.attempt_stream();
    let until = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let recorded = js.get_stream(&attempts).await?.info().await?.state.messages;
        if recorded >= expected || Instant::now() > until {
            break recorded;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_kib = proc
        .as_ref()
        .and_then(|p| peak_rss_kib(p.pid()))
        .unwrap_or(0);
    drop(proc);
    drop(raw_loop);
    js.delete_stream(names.stream()).await?;
    js.delete_stream(names.dead_letter_stream()).await?;
    js.delete_stream(names.retry_stream()).await?;
    js.delete_stream(names.history_stream()).await?;
    js.delete_stream(&attempts).await?;

    let mut probe_us = sink.probe_us.lock().expect("probe lock").clone();
    probe_us.sort_unstable();
    let machine_cpu_pct = match (machine_before, machine_after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64,
        _ => 0.0,
    };
    Ok(Outcome {
        latency_ms,
        concurrency,
        fail_pct,
        raw,
        messages: n,
        sink_calls,
        attempt_records: (recorded, all_calls),
        drain,
        rate: n as f64 / active.as_secs_f64(),
        first_delivery: Duration::from_micros(first.saturating_sub(spawned_us)),
        max_in_flight: sink.max_in_flight.load(Ordering::SeqCst),
        duplicates,
        proc_cpu_pct: 100.0 * proc_ticks as f64 / ticks_per_s / drain.as_secs_f64(),
        proc_cpu_us_per_delivery: 1e6 * proc_ticks as f64 / ticks_per_s / n as f64,
        machine_cpu_pct,
        rss_kib,
        probe_us,
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The simplest correct capped consumer, for comparison: pull as many
/// messages as there are free slots, POST each (body only), ack on 2xx,
/// NAK otherwise. No retries off the cap, headers, signing, tracing,
/// metrics or keep-alive acks.
async fn raw_loop(consumer: jetstream::consumer::PullConsumer, url: String, concurrency: u32) {
    use futures::StreamExt as _;
    // The processor's own client settings (pool, timeouts, TLS provider).
    let client = spillway_processor::http::client(Duration::from_secs(30), concurrency as usize)
        .expect("http client");
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency as usize));
    loop {
        let Ok(first) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut held = vec![first];
        while let Ok(p) = slots.clone().try_acquire_owned() {
            held.push(p);
        }
        let Ok(mut batch) = consumer
            .batch()
            .max_messages(held.len())
            .expires(Duration::from_secs(2))
            .messages()
            .await
        else {
            continue;
        };
        while let Some(Ok(msg)) = batch.next().await {
            let Some(slot) = held.pop() else { break };
            let client = client.clone();
            let url = url.clone();
            // The body alone, out of the stored payload.
            let body = spillway_api::stored::decode(msg.headers.as_ref(), &msg.payload)
                .map_or_else(
                    |_| msg.payload.clone(),
                    |w| msg.payload.slice(w.body_offset..),
                );
            tokio::spawn(async move {
                let ok = client
                    .post(&url)
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                let _ = if ok {
                    msg.double_ack().await
                } else {
                    msg.ack_with(jetstream::AckKind::Nak(None)).await
                };
                drop(slot);
            });
        }
    }
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0
}

fn list<T: std::str::FromStr>(s: &str, what: &str) -> Result<Vec<T>> {
    s.split(',')
        .map(|x| x.trim().parse::<T>().ok().with_context(|| what.to_owned()))
        .collect()
}

fn ideal(o: &Outcome) -> Option<f64> {
    (o.latency_ms > 0).then(|| f64::from(o.concurrency) * 1000.0 / o.latency_ms as f64)
}

/// Drain time at the cap: sink calls × latency / concurrency.
fn ideal_drain(o: &Outcome) -> Option<Duration> {
    (o.latency_ms > 0).then(|| {
        Duration::from_millis(o.latency_ms) * u32::try_from(o.sink_calls).unwrap_or(u32::MAX)
            / o.concurrency
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    LazyLock::force(&EPOCH);
    let latencies: Vec<u64> = list(&args.latency_ms, "--latency-ms")?;
    let concurrencies: Vec<u32> = list(&args.concurrency, "--concurrency")?;
    let failures: Vec<u64> = list(&args.failure_pct, "--failure-pct")?;
    let raws: Vec<u32> = if args.raw_concurrency.trim().is_empty() {
        Vec::new()
    } else {
        list(&args.raw_concurrency, "--raw-concurrency")?
    };
    if concurrencies.contains(&0) || raws.contains(&0) {
        bail!("concurrency values must be at least 1");
    }
    if failures.iter().any(|f| *f > 100) {
        bail!("--failure-pct values are percentages (0-100)");
    }
    let mut shapes = Vec::new();
    for &latency_ms in &latencies {
        for &fail_pct in &failures {
            for &concurrency in &concurrencies {
                shapes.push(Shape {
                    latency_ms,
                    concurrency,
                    fail_pct,
                    raw: false,
                });
            }
        }
    }
    for &concurrency in &raws {
        for raw in [false, true] {
            shapes.push(Shape {
                latency_ms: 0,
                concurrency,
                fail_pct: 0,
                raw,
            });
        }
    }
    if !args.processor_bin.exists() {
        bail!(
            "{} is missing: cargo build --release -p spillway-processor --examples --bins",
            args.processor_bin.display()
        );
    }
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into());
    let dir = std::env::temp_dir().join(format!("spillway-deliverybench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ticks_per_s = clock_ticks_per_second();

    let nats = NatsServer::start().await?;
    let js = nats.jetstream().await?;
    let mut outcomes = Vec::new();
    for shape in shapes {
        let o = scenario(&nats, &js, shape, &args, ticks_per_s, &dir).await?;
        println!(
            "{} sink {:>3} ms, concurrency {:>3}, {:>2}% failing first: {} in {:.2}s = {:.0}/s{}; {} sink calls{}; sink max in flight {} (cap {}); {} duplicates; {} of {} calls recorded; CPU {:.0}%, machine {:.0}%; first after {:.0} ms; probe p50 {:.2} ms",
            if o.raw { "raw loop " } else { "processor" },
            o.latency_ms,
            o.concurrency,
            o.fail_pct,
            o.messages,
            o.drain.as_secs_f64(),
            o.rate,
            ideal(&o).map_or(String::new(), |i| format!(
                " ({:.0}% of {i:.0}/s)",
                100.0 * o.rate / i
            )),
            o.sink_calls,
            ideal_drain(&o).map_or(String::new(), |i| format!(
                ", drain/ideal {:.2}",
                o.drain.as_secs_f64() / i.as_secs_f64()
            )),
            o.max_in_flight,
            o.concurrency,
            o.duplicates,
            o.attempt_records.0,
            o.attempt_records.1,
            o.proc_cpu_pct,
            o.machine_cpu_pct,
            o.first_delivery.as_secs_f64() * 1000.0,
            pct(&o.probe_us, 0.5),
        );
        outcomes.push(o);
    }
    let load_after = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into());

    if let Some(out) = &args.out {
        write_report(out, &args, &outcomes, &load_before, &load_after)?;
        println!("wrote {}", out.display());
    }
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(o) = outcomes
        .iter()
        .find(|o| o.max_in_flight > o.concurrency as usize)
    {
        bail!(
            "cap violated: sink saw {} concurrent requests with concurrency {}",
            o.max_in_flight,
            o.concurrency
        );
    }
    Ok(())
}

fn write_report(
    out: &Path,
    args: &Args,
    outcomes: &[Outcome],
    load_before: &str,
    load_after: &str,
) -> Result<()> {
    let mut md = String::from(
        "# Processor benchmark\n\nGenerated by `processor/examples/deliverybench.rs` (see its header for the commands). \
One real `nats-server` (JetStream, file storage, the test harness's configuration) and the real \
`spillway-processor` binary (release build, one replica) on loopback, delivering to an HTTP sink inside the \
benchmark process that waits a fixed time before answering. Sink, processor and NATS share the same \
machine, so the figures are a floor for what one processor replica does on dedicated cores, not a capacity \
promise.\n\n\
Each scenario is its own endpoint, set up with the operator's own functions (`stream_config`, \
`history_config`, `attempts_config`, `dead_letter_config`, `consumer_configs`, `retry_stream_config`, \
`retry_consumer_configs`, `processor_config`: file streams, dead letters on, every attempt recorded, one durable consumer with `maxAckPending` = concurrency, \
`replicas: {min: 1, max: 1}`, default timeout and retries: backoff 1s, 5s, …). The backlog is published \
first, as the gateway stores it (stored format 2) with a unique `Nats-Msg-Id` per message; then the processor starts and \
drains it. In a scenario with failures the sink answers 503 to the first attempt of that share of the \
webhooks (a fixed spread over the sequence), and 200 after.\n\n\
Columns: **path** is the processor, or the benchmark's own raw loop (pull as many as there are free \
slots, POST the body, ack; no retries, headers, signing, metrics) on the same sink and machine; **sink \
calls** counts every request (first attempts and retries); **drain s** from starting the processor to the \
last sink answer (includes process start, binding, and the last retry's backoff); **ideal drain s** = \
sink calls × latency / concurrency; **drain/ideal** their ratio (1.00 = the cap was the only limit); \
**deliveries/s** over first to last delivery; **sink max in flight** is the most requests the sink ever \
held at once, the proof of the cap (must be ≤ concurrency); **dup** counts calls beyond one per message \
and one per failed first attempt; **attempt records** counts the records in the endpoint's attempt \
stream at the end against every sink call, the probes' included (one each is the goal); **proc CPU** is the processor's CPU time over the drain (100% = one \
core) and per delivery (10 ms clock ticks: coarse for short scenarios); **RSS** is the processor's peak \
resident set (`VmHWM`); **probe p50/p99** is the publish-to-sink latency of single messages sent one at a \
time to the idle processor after the drain.\n\n",
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let nats_version = Command::new(spillway_tests::tool("nats-server"))
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    md += &format!(
        "Machine: {cores} cores ({cpu}), shared with other work; load average before the run: {load_before}, \
after: {load_after}. {nats_version}. Body: {} bytes. Messages: {} with a 0 ms sink, else about {} s of work \
at the ideal rate (at least {}, at most {}). Probes: {} per scenario. Command: `{}`.\n\n",
        args.body_bytes,
        args.messages,
        args.target_seconds,
        args.min_messages,
        args.messages,
        args.probes,
        std::env::args().collect::<Vec<_>>().join(" ")
    );
    md += "| path | sink ms | concurrency | failing first | messages | sink calls | drain s | ideal drain s | drain/ideal | deliveries/s | sink max in flight | ≤ cap | dup | attempt records | proc CPU | proc CPU µs/delivery | RSS MiB | probe p50 ms | probe p99 ms |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for o in outcomes {
        let (ideal_s, ratio) = match ideal_drain(o) {
            Some(i) => (
                format!("{:.2}", i.as_secs_f64()),
                format!("{:.2}", o.drain.as_secs_f64() / i.as_secs_f64()),
            ),
            None => ("—".into(), "—".into()),
        };
        let (cpu, cpu_per, rss) = if o.raw {
            ("—".to_owned(), "—".to_owned(), "—".to_owned())
        } else {
            (
                format!("{:.0}%", o.proc_cpu_pct),
                format!("{:.0}", o.proc_cpu_us_per_delivery),
                format!("{:.1}", o.rss_kib as f64 / 1024.0),
            )
        };
        md += &format!(
            "| {} | {} | {} | {}% | {} | {} | {:.2} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} |\n",
            if o.raw { "raw loop" } else { "processor" },
            o.latency_ms,
            o.concurrency,
            o.fail_pct,
            o.messages,
            o.sink_calls,
            o.drain.as_secs_f64(),
            ideal_s,
            ratio,
            o.rate,
            o.max_in_flight,
            if o.max_in_flight <= o.concurrency as usize {
                "yes"
            } else {
                "NO"
            },
            o.duplicates,
            if o.raw {
                "—".to_owned()
            } else {
                format!("{} of {}", o.attempt_records.0, o.attempt_records.1)
            },
            cpu,
            cpu_per,
            rss,
            pct(&o.probe_us, 0.5),
            pct(&o.probe_us, 0.99),
        );
    }
    let raw_pairs: Vec<String> = outcomes
        .iter()
        .filter(|o| o.raw)
        .filter_map(|r| {
            let p = outcomes
                .iter()
                .find(|o| !o.raw && o.latency_ms == 0 && o.concurrency == r.concurrency)?;
            Some(format!(
                "concurrency {}: processor {:.0}/s, raw loop {:.0}/s, ratio {:.2}",
                r.concurrency,
                p.rate,
                r.rate,
                p.rate / r.rate
            ))
        })
        .collect();
    if !raw_pairs.is_empty() {
        md += &format!(
            "\nNo-op sink (0 ms), processor against the raw loop in the same run: {}.\n",
            raw_pairs.join("; ")
        );
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, md)?;
    Ok(())
}

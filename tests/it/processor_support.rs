//! Helpers for the processor and CLI integration tests: JetStream objects set
//! up the way the operator does, a scriptable HTTP sink that counts
//! concurrent requests, and the real `spillway-processor` binary as a child
//! process.
//!
//! A module of the one integration-test program (`tests/it/main.rs`), so
//! `tests/src/lib.rs` stays the harness's own.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::response::{IntoResponse, Response};
use spillway_api::WebhookEndpointSpec;
use spillway_api::names::{EndpointNames, partition_of};
use spillway_api::validate::{Timings, check};
use spillway_api::wire::{self, ProcessorConfig};
use spillway_operator::jetstream::{
    attempts_config, consumer_configs, dead_letter_config, history_config, history_consumer_config,
    retry_consumer_configs, retry_stream_config, stream_config,
};
use spillway_tests::{bin_path, eventually, free_port, watchdog};

// ---------------------------------------------------------------- endpoint

/// How to set up an endpoint's JetStream objects and processor config.
#[derive(Debug, Clone)]
pub struct Setup {
    pub namespace: String,
    pub name: String,
    pub concurrency: u32,
    pub per_replica: u32,
    pub timeout: String,
    pub max_attempts: u32,
    pub backoff: Vec<String>,
    /// Ordered endpoint with this many partitions.
    pub partitions: Option<u16>,
    pub dead_letter: bool,
    pub rate: Option<u32>,
    pub paused: bool,
    pub signing_secret_file: Option<String>,
    /// Consumer ack wait; defaults to the operator's (timeout + margin).
    pub ack_wait: Option<Duration>,
    /// Consumer max deliver; defaults to the operator's (unlimited).
    pub max_deliver: Option<i64>,
    /// `stream.maxAge` (undelivered webhooks older are dead-lettered).
    pub max_age: String,
    /// `stream.maxBytes` (undelivered capacity).
    pub max_bytes: i64,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            name: "hooks".into(),
            concurrency: 3,
            per_replica: 3,
            timeout: "5s".into(),
            max_attempts: 5,
            backoff: vec!["200ms".into()],
            partitions: None,
            dead_letter: true,
            rate: None,
            paused: false,
            signing_secret_file: None,
            ack_wait: None,
            max_deliver: None,
            max_age: "1h".into(),
            max_bytes: 1 << 30,
        }
    }
}

/// An endpoint whose stream, consumers and dead-letter stream exist.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub setup: Setup,
    pub names: EndpointNames,
    pub js: jetstream::Context,
}

impl Endpoint {
    /// Create the stream, consumers and dead-letter stream as the operator
    /// does (limits retention so history can be replayed).
    pub async fn create(js: jetstream::Context, setup: Setup) -> Result<Self> {
        let names = EndpointNames::new(&setup.namespace, &setup.name);
        let probe = Self {
            setup: setup.clone(),
            names: names.clone(),
            js: js.clone(),
        };
        let (spec, t) = (probe.spec()?, probe.timings()?);
        // The streams exactly as the operator configures them, the
        // history's source consumer before the history stream.
        let work = js
            .create_stream(stream_config(&names, &spec, &t))
            .await
            .context("creating the work stream")?;
        work.create_consumer(history_consumer_config(&names))
            .await
            .context("creating the history source consumer")?;
        for cfg in [
            history_config(&names, &spec, &t, false),
            attempts_config(&names, &spec, &t),
            dead_letter_config(&names, &spec, &t),
            retry_stream_config(&names, &spec, &t),
        ] {
            let name = cfg.name.clone();
            js.create_stream(cfg)
                .await
                .with_context(|| format!("creating stream {name}"))?;
        }
        let retry = js.get_stream(names.retry_stream()).await?;
        for cfg in retry_consumer_configs(&names, &spec) {
            retry
                .create_consumer(cfg)
                .await
                .context("creating the retry consumer")?;
        }
        let ep = Self { setup, names, js };
        let stream = ep.js.get_stream(ep.names.stream()).await?;
        // The consumers exactly as the operator configures them, with the
        // test's overrides on top.
        for cfg in consumer_configs(&ep.names, &ep.spec()?, &ep.timings()?) {
            let name = cfg.durable_name.clone().unwrap_or_default();
            stream
                .create_consumer(consumer::pull::Config {
                    ack_wait: ep.setup.ack_wait.unwrap_or(cfg.ack_wait),
                    max_deliver: ep.setup.max_deliver.unwrap_or(cfg.max_deliver),
                    ..cfg
                })
                .await
                .with_context(|| format!("creating consumer {name}"))?;
        }
        Ok(ep)
    }

    /// The WebhookEndpoint spec this setup stands for (what the operator
    /// would see).
    pub fn spec(&self) -> Result<WebhookEndpointSpec> {
        let s = &self.setup;
        let mut spec = serde_json::json!({
            "verification": {"scheme": "none"},
            "processor": {
                "sink": {"url": "http://sink.invalid/"},
                "concurrency": s.concurrency,
                "timeout": s.timeout,
                "retry": {"maxAttempts": s.max_attempts, "backoff": s.backoff},
                "deadLetter": {"enabled": s.dead_letter},
                "paused": s.paused,
            },
            "stream": {"maxAge": s.max_age, "maxBytes": s.max_bytes},
        });
        if let Some(r) = s.rate {
            spec["processor"]["rateLimit"] = serde_json::json!({"perSecond": r});
        }
        if let Some(n) = s.partitions {
            spec["ordering"] = serde_json::json!({"keyHeader": "X-Key", "partitions": n});
        }
        Ok(serde_json::from_value(spec)?)
    }

    fn timings(&self) -> Result<Timings> {
        check(&self.spec()?).map_err(|p| anyhow::anyhow!("invalid setup: {}", p.join("; ")))
    }

    /// The config the operator renders for this endpoint (its own
    /// function, not a copy), pointed at `sink_url`, with the test's knobs
    /// that are not in the spec on top: the slots of one process
    /// (`per_replica`, no replica split) and the signing secret's file.
    pub fn config(&self, sink_url: &str) -> ProcessorConfig {
        let mut c = self
            .operator_config(sink_url, 1)
            .expect("a Setup is a valid spec");
        c.concurrency_per_replica = self.setup.per_replica;
        c.max_replicas = 0;
        c.signing_secret_file = self.setup.signing_secret_file.clone();
        c
    }

    /// The config the operator renders for this endpoint with
    /// `replicas.max` = `max_replicas` (its own function, not a copy),
    /// pointed at `sink_url`.
    pub fn operator_config(&self, sink_url: &str, max_replicas: u32) -> Result<ProcessorConfig> {
        let mut spec = self.spec()?;
        spec.processor.replicas.max = max_replicas;
        let t = check(&spec).map_err(|p| anyhow::anyhow!("invalid setup: {}", p.join("; ")))?;
        let mut ep = spillway_api::WebhookEndpoint::new(&self.setup.name, spec);
        ep.metadata.namespace = Some(self.setup.namespace.clone());
        let mut c = spillway_operator::render::processor_config(&ep, &self.names, &t);
        c.sink_url = sink_url.into();
        Ok(c)
    }

    /// Headers the gateway would store with a webhook.
    pub fn gateway_headers(&self, id: &str, key: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, id);
        h.insert(wire::DELIVERY_ID, id);
        h.insert(wire::CONTENT_TYPE, "application/json");
        h.insert(
            wire::ENDPOINT,
            format!("{}/{}", self.setup.namespace, self.setup.name).as_str(),
        );
        h.insert(
            wire::RECEIVED_AT,
            format!("{:.3}", jiff::Timestamp::now()).as_str(),
        );
        h.insert("Spillway-Orig-X-Test-Event", "ping");
        if let Some(k) = key {
            h.insert(wire::ORDERING_KEY, k);
        }
        h
    }

    /// The subject a webhook with ordering key `key` goes to.
    pub fn subject_for(&self, key: Option<&str>) -> String {
        match (self.setup.partitions, key) {
            (Some(n), Some(k)) => self.names.subject(partition_of(k.as_bytes(), n)),
            _ => self.names.subject(0),
        }
    }

    /// A webhook as the gateway stores it in the current format (2):
    /// `Nats-Msg-Id`, and the metadata and headers of `gateway_headers` in
    /// front of the body (`gateway_headers` itself is format 1).
    pub fn stored(&self, id: &str, key: Option<&str>, body: &str) -> (HeaderMap, Bytes) {
        let endpoint = format!("{}/{}", self.setup.namespace, self.setup.name);
        let received_at = format!("{:.3}", jiff::Timestamp::now());
        let traceparent = spillway_api::trace::root().header();
        let meta = spillway_api::stored::Metadata {
            endpoint: &endpoint,
            delivery_id: id,
            received_at: &received_at,
            content_type: Some("application/json"),
            traceparent: &traceparent,
            tracestate: None,
            ordering_key: key,
        };
        let payload = spillway_api::stored::encode(
            &meta,
            [("x-test-event", "ping")].into_iter(),
            body.as_bytes(),
        );
        let mut h = HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, id);
        (h, payload.into())
    }

    /// Publish one webhook like the gateway (format 2; waiting for the
    /// PubAck).
    pub async fn publish(&self, id: &str, key: Option<&str>, body: &str) -> Result<u64> {
        let (headers, payload) = self.stored(id, key, body);
        let ack = self
            .js
            .publish_with_headers(self.subject_for(key), headers, payload)
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// Publish `ids` pipelined (all PubAcks awaited at the end, in chunks).
    pub async fn publish_many(&self, ids: &[String]) -> Result<()> {
        for chunk in ids.chunks(500) {
            let mut acks = Vec::with_capacity(chunk.len());
            for id in chunk {
                let (headers, payload) = self.stored(id, None, &format!("{{\"id\":\"{id}\"}}"));
                acks.push(
                    self.js
                        .publish_with_headers(self.subject_for(None), headers, payload)
                        .await?,
                );
            }
            for a in acks {
                a.await?;
            }
        }
        Ok(())
    }

    /// Every message in the dead-letter stream.
    pub async fn dead_letters(&self) -> Result<Vec<jetstream::message::StreamMessage>> {
        stream_messages(&self.js, &self.names.dead_letter_stream()).await
    }

    /// Wait until the history stream holds `n` messages (its source copies
    /// from the work stream within a moment, not at once).
    pub async fn history_holds(&self, n: u64) -> Result<()> {
        let js = self.js.clone();
        let name = self.names.history_stream();
        eventually(Duration::from_secs(10), "history copies", || {
            let (js, name) = (js.clone(), name.clone());
            async move {
                match js.get_stream(&name).await {
                    Ok(mut s) => s.info().await.is_ok_and(|i| i.state.messages >= n),
                    Err(_) => false,
                }
            }
        })
        .await
    }

    /// Info of consumer `name`.
    pub async fn consumer_info(&self, name: &str) -> Result<consumer::Info> {
        let mut c: consumer::PullConsumer = self
            .js
            .get_stream(self.names.stream())
            .await?
            .get_consumer(name)
            .await
            .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
        Ok(c.info().await?.clone())
    }
}

/// Every message currently in `stream`, in order.
pub async fn stream_messages(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Vec<jetstream::message::StreamMessage>> {
    let mut s = js.get_stream(stream).await?;
    let state = s.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            out.push(m);
        }
    }
    Ok(out)
}

/// A header's value as a string.
pub fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.as_str().to_owned())
}

// -------------------------------------------------------------------- sink

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub delay: Duration,
    /// The answer's body.
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            retry_after: None,
            delay: Duration::ZERO,
            body: "scripted".into(),
        }
    }
    pub fn body(status: u16, body: &str) -> Self {
        Self {
            body: body.into(),
            ..Self::status(status)
        }
    }
    pub fn retry_after(status: u16, value: &str) -> Self {
        Self {
            retry_after: Some(value.into()),
            ..Self::status(status)
        }
    }
    pub fn slow(status: u16, delay: Duration) -> Self {
        Self {
            delay,
            ..Self::status(status)
        }
    }
}

/// A request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub attempt: u32,
    pub status: u16,
    pub at: Instant,
    /// The whole answer was given (false while in progress, or when the
    /// client gave up first).
    pub answered: bool,
    pub headers: HttpHeaders,
    pub body: Bytes,
}

#[derive(Default)]
struct SinkState {
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    default: Mutex<Option<Reply>>,
    received: Mutex<Vec<Received>>,
}

/// A real HTTP sink on 127.0.0.1 that answers by script and counts
/// concurrent requests.
#[derive(Clone)]
pub struct Sink {
    pub url: String,
    state: Arc<SinkState>,
}

struct InFlight(Arc<SinkState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn sink_handler(
    State(s): State<Arc<SinkState>>,
    headers: HttpHeaders,
    body: Bytes,
) -> Response {
    let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    let _guard = InFlight(s.clone());
    s.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let id = headers
        .get("spillway-delivery-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let attempt = headers
        .get("spillway-attempt")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let reply = {
        let mut scripts = s.scripts.lock().unwrap();
        scripts
            .get_mut(&id)
            .and_then(VecDeque::pop_front)
            .or_else(|| s.default.lock().unwrap().clone())
            .unwrap_or(Reply::status(200))
    };
    let index = {
        let mut rs = s.received.lock().unwrap();
        rs.push(Received {
            id,
            attempt,
            status: reply.status,
            at: Instant::now(),
            answered: false,
            headers,
            body,
        });
        rs.len() - 1
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    s.received.lock().unwrap()[index].answered = true;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match reply.retry_after {
        Some(ra) => (status, [("retry-after", ra)], reply.body).into_response(),
        None => (status, reply.body).into_response(),
    }
}

impl Sink {
    /// Start a sink that answers 200 unless told otherwise.
    pub async fn start() -> Result<Self> {
        Self::start_on(0).await
    }

    /// Like [`Sink::start`], on a given port (0: any).
    pub async fn start_on(port: u16) -> Result<Self> {
        let state = Arc::new(SinkState::default());
        let app = axum::Router::new()
            .fallback(axum::routing::post(sink_handler))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}/hook"),
            state,
        })
    }

    /// Answer delivery `id` with these replies, in turn (then the default).
    pub fn script(&self, id: &str, replies: Vec<Reply>) {
        self.state
            .scripts
            .lock()
            .unwrap()
            .insert(id.into(), replies.into());
    }

    /// The answer to anything not scripted.
    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }

    /// Most requests seen in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Everything received so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Requests received for `id`.
    pub fn attempts(&self, id: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.id == id).collect()
    }

    /// Number of requests received.
    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// Distinct ids answered (completely) with a 2xx.
    pub fn delivered_ids(&self) -> std::collections::HashSet<String> {
        self.received()
            .into_iter()
            .filter(|r| r.answered && (200..300).contains(&r.status))
            .map(|r| r.id)
            .collect()
    }
}

// --------------------------------------------------------------- processor

/// The real `spillway-processor` binary, killed on drop.
pub struct ProcessorProc {
    child: Option<Child>,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ProcessorProc {
    /// Start the processor for `config` against `nats_url`; waits for /readyz.
    pub async fn start(config: &ProcessorConfig, nats_url: &str) -> Result<Self> {
        let p = Self::spawn(config, nats_url)?;
        p.wait_ready().await?;
        Ok(p)
    }

    /// Start without waiting for readiness.
    pub fn spawn(config: &ProcessorConfig, nats_url: &str) -> Result<Self> {
        Self::spawn_with_env(config, nats_url, &[])
    }

    /// Like [`ProcessorProc::spawn`], with more environment variables (NATS
    /// credentials and TLS files, say).
    pub fn spawn_with_env(
        config: &ProcessorConfig,
        nats_url: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-proc-")
            .tempdir()?;
        let log = dir.path().join("processor.log");
        let out = std::fs::File::create(&log)?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let child = Command::new(bin_path("spillway-processor"))
            .env(wire::PROCESSOR_CONFIG_ENV, serde_json::to_string(config)?)
            .env("SPILLWAY_NATS_URL", nats_url)
            .env("SPILLWAY_ADMIN_ADDR", admin.to_string())
            .env("SPILLWAY_SHUTDOWN_TIMEOUT", "10s")
            .env("RUST_LOG", "info,spillway_processor=debug,async_nats=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning spillway-processor")?;
        watchdog(child.id());
        Ok(Self {
            child: Some(child),
            admin,
            log,
            _dir: dir,
        })
    }

    /// Wait until /readyz answers 200.
    pub async fn wait_ready(&self) -> Result<()> {
        let admin = self.admin;
        eventually(
            Duration::from_secs(15),
            "processor /readyz",
            || async move { matches!(http_get(admin, "/readyz").await, Ok((200, _))) },
        )
        .await
        .with_context(|| format!("processor not ready; log:\n{}", self.log_text()))
    }

    /// The /metrics text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(http_get(self.admin, "/metrics").await?.1)
    }

    /// The value of one metric line (exact series text, e.g.
    /// `spillway_processor_retries_total`).
    /// Fails when the series is absent (a misspelt name must not read as 0).
    pub async fn metric(&self, series: &str) -> Result<f64> {
        let text = self.metrics().await?;
        match metric_value(&text, series) {
            Some(v) => Ok(v),
            None => {
                let family = series.split('{').next().unwrap_or(series);
                let near: Vec<&str> = text.lines().filter(|l| l.starts_with(family)).collect();
                bail!("no series {series} (present: {near:?})")
            }
        }
    }

    /// The value of a series that may not exist yet (a labelled counter
    /// appears on its first increment): `None` when it does not.
    pub async fn metric_opt(&self, series: &str) -> Result<Option<f64>> {
        Ok(metric_value(&self.metrics().await?, series))
    }

    /// The process log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send SIGTERM.
    pub async fn sigterm(&self) -> Result<()> {
        let pid = self.child.as_ref().context("not running")?.id();
        let st = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        if !st.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// SIGKILL and reap.
    pub fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait (bounded) for the process to exit; its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            let c = self.child.as_mut().context("not running")?;
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if start.elapsed() > within {
                bail!(
                    "processor did not exit within {within:?}; log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ProcessorProc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A minimal HTTP/1.1 GET (status and body), enough for admin endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of `series` in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

// --------------------------------------------------------------------- cli

/// Output of a `spillway` run.
#[derive(Debug)]
pub struct CliOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` (`spillway args`, directly or wrapped) with `env` and without
/// the caller's kubeconfig, NATS URL or home directory, bounded to 60s.
async fn run_cli(
    mut cmd: tokio::process::Command,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<std::io::Result<std::process::Output>> {
    cmd.env_remove("KUBECONFIG")
        .env_remove("NATS_URL")
        .env("HOME", std::env::temp_dir())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .with_context(|| format!("spillway {args:?} did not finish within 60s"))
}

/// Run the real `spillway` binary with `args` (bounded to 60s). No
/// kubeconfig is inherited from the environment.
pub async fn spillway(args: &[&str], env: &[(&str, &str)]) -> Result<CliOutput> {
    let mut cmd = tokio::process::Command::new(bin_path("spillway"));
    cmd.args(args);
    let out = run_cli(cmd, args, env).await??;
    Ok(CliOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Run the real `spillway` binary on a terminal: under `script(1)`, which
/// gives it a pty for stdin, stdout and stderr. Returns whether it exited 0
/// and what the terminal showed (stdout and stderr interleaved, with the
/// control sequences). Bounded to 60s.
pub async fn spillway_on_a_terminal(args: &[&str], env: &[(&str, &str)]) -> Result<(bool, String)> {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let cmd = std::iter::once(bin_path("spillway").display().to_string())
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = tokio::process::Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"]);
    let out = run_cli(c, args, env)
        .await?
        .context("running script(1) (util-linux) to give spillway a terminal")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// Like [`spillway`], failing unless it exits 0.
pub async fn spillway_ok(args: &[&str], env: &[(&str, &str)]) -> Result<CliOutput> {
    let out = spillway(args, env).await?;
    if !out.success {
        bail!("spillway {args:?} failed:\n{}\n{}", out.stdout, out.stderr);
    }
    Ok(out)
}

/// Number of messages in `stream`.
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

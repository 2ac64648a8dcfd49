//! The gateway benchmark, side by side with the Go bridge, loopback only.
//!
//! One run starts one real nats-server (JetStream, file storage, R1) and
//! measures, at each concurrency:
//! - the raw publish ceiling: `gobridge raw` (Go, nats.go: c publishers,
//!   each awaiting its PubAck);
//! - the real `spillway-gateway` binary (file mode, one GitHub endpoint);
//! - the Go bridge (`gobridge serve`: net/http + nats.go, GitHub HMAC,
//!   `Nats-Msg-Id`, PubAck before 200);
//! - the HTTP floor (`loadgen floor`, this binary): hyper, the body read,
//!   one publish, the PubAck, 200, nothing else; what any HTTP front costs
//!   on this machine, beside raw publish (it listens with the gateway's
//!   queue of 4096 connections, as the bridge does with Go's),
//!
//! the last three with `wrk` (closed loop, one thread, pre-signed 1 KiB body,
//! a unique `X-GitHub-Delivery` per request), CPU per request of the server
//! and of nats-server from `/proc`, and stored = 2xx checked on the stream.
//! The rows of a concurrency run back to back (every server stays up),
//! `--rounds` times with the servers' order rotating, and each figure is
//! the median of its samples: a slow spell of the shared machine falls on
//! all columns, not on one. Then, open loop at half the gateway's best rate, the p99 of the
//! gateway, of a raw publisher, of the floor and of the bridge at that fixed rate (latency
//! from the scheduled send time, so a stall is not hidden), and the gateway
//! with 1,000 endpoints configured against 1 endpoint, sampled alternately.
//! Writes a Markdown report and an SVG. `--open-only RATE` runs the open
//! loop alone with a percentile line per sample (for investigating tails).
//!
//! ```text
//! make bench-gateway         # release build, the bridge built with go, docs/benchmarks/gateway.md
//! target/release/examples/loadgen --bridge-bin /tmp/gobridge --out docs/benchmarks/gateway.md
//! ```
//!
//! `--smoke` runs every phase tiny (debug binaries are fine) and only
//! checks that it works and that stored = 2xx; `make test` runs it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use spillway_gateway::verify::{ring_hmac, sign};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SECRET: &str = "bench-secret";
/// The one stream every endpoint's intake subjects land in (one stream is
/// enough for a benchmark of the gateway; the operator makes one per
/// endpoint).
const STREAM: &str = "BENCH";

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Connections (comma-separated: one closed-loop run each).
    #[arg(long, default_value = "16,64,256")]
    concurrency: String,
    /// Seconds per closed-loop sample.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Samples per row: the rows of a concurrency are measured this many
    /// times, alternating which server goes first, and each figure is the
    /// median (this shared machine's speed drifts by 20 % within a minute).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Messages per raw publish sample.
    #[arg(long, default_value_t = 100_000)]
    raw_messages: u64,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Endpoints configured in the "many endpoints" run.
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/spillway-gateway")]
    gateway_bin: PathBuf,
    /// The Go bridge binary (`go build` of ../shared/peers/gobridge);
    /// without it the bridge and raw Go publish columns are left out.
    #[arg(long)]
    bridge_bin: Option<PathBuf>,
    /// The nats-server binary.
    #[arg(long, default_value = ".tools/bin/nats-server")]
    nats_server: PathBuf,
    /// wrk.
    #[arg(long, default_value = ".tools/bin/wrk")]
    wrk: PathBuf,
    /// Markdown report to write (an SVG plot is written beside it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// What the HTTP floor stores besides the body and `Nats-Msg-Id`:
    /// nothing, or a webhook's metadata the size of the gateway's (as NATS
    /// headers, or in front of the body in the payload), to measure what
    /// storing it costs and where.
    #[arg(long, value_enum, default_value_t = FloorMetadata::None)]
    floor_metadata: FloorMetadata,
    /// Every phase tiny; checks only that it runs and stored = 2xx.
    #[arg(long)]
    smoke: bool,
    /// Only the open loop, at this rate (requests per second): `--rounds`
    /// samples of each server, a percentile line per sample, no report.
    /// For investigating the fixed-rate tail.
    #[arg(long)]
    open_only: Option<f64>,
}

/// See `Args::floor_metadata`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FloorMetadata {
    None,
    Headers,
    Payload,
}

/// A child process stopped (TERM, then KILL) when dropped.
struct Proc(Child);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..50 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ')'.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// Resident memory of a process, MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    Ok(kb / 1024.0)
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn stored(js: &async_nats::jetstream::Context, stream: &str) -> Result<u64> {
    Ok(js.get_stream(stream).await?.info().await?.state.messages)
}

/// Empty `stream` before a sample: a run writes gigabytes otherwise, and
/// every sample should meet the same store (not one grown by the samples
/// before it).
async fn purge(js: &async_nats::jetstream::Context, stream: &str) -> Result<()> {
    js.get_stream(stream).await?.purge().await?;
    Ok(())
}

/// The run's scratch folder, removed when dropped (also when the run
/// fails), after the processes in it have stopped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

/// One keep-alive HTTP/1.1 connection (the open-loop generator's).
struct Conn {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Result<Self> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        Ok(Self {
            r: BufReader::new(r),
            w,
        })
    }

    async fn request(&mut self, head: &str, body: &[u8]) -> Result<u16> {
        self.w.write_all(head.as_bytes()).await?;
        self.w.write_all(body).await?;
        let mut line = String::new();
        self.r.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("status line")?;
        let mut len = 0usize;
        loop {
            line.clear();
            if self.r.read_line(&mut line).await? == 0 {
                bail!("connection closed");
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse()?;
            }
        }
        let mut rest = vec![0; len];
        self.r.read_exact(&mut rest).await?;
        Ok(status)
    }
}

/// The benchmark's request body and its GitHub signature.
fn body_and_signature(bytes: usize) -> (Vec<u8>, String) {
    let pad = "x".repeat(bytes.saturating_sub(32));
    let body = format!("{{\"ref\":\"refs/heads/main\",\"pad\":\"{pad}\"}}").into_bytes();
    let sig = format!(
        "sha256={}",
        hex::encode(sign(ring_hmac::HMAC_SHA256, SECRET.as_bytes(), &[&body]))
    );
    (body, sig)
}

/// wrk's script: the fixed signed body, a unique delivery id per request
/// (run tag, thread, counter).
const WRK_SCRIPT: &str = r#"
local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
local body = f:read("*a")
f:close()
local sig = os.getenv("BENCH_SIG")
local run = os.getenv("BENCH_RUN")
local n = 0
function request()
  n = n + 1
  return wrk.format("POST", nil, {
    ["Content-Type"] = "application/json",
    ["X-GitHub-Event"] = "push",
    ["X-GitHub-Delivery"] = run .. "-" .. n,
    ["X-Hub-Signature-256"] = sig,
  }, body)
end
"#;

/// One closed-loop run's figures.
#[derive(Debug, Clone, Default)]
struct Run {
    concurrency: usize,
    requests: u64,
    non_2xx: u64,
    errors: u64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU µs of the server per request (gateway or bridge; for raw
    /// publish, the publisher).
    server_us: f64,
    /// CPU µs of nats-server per request.
    nats_us: f64,
    /// Every 2xx was stored (the stream grew by the 2xx count, plus at
    /// most the requests in flight when wrk stopped).
    stored_ok: bool,
}

/// wrk's latency value (`1.23ms`, `850.00us`, `1.02s`) in ms.
fn wrk_ms(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => n,
    }
}

struct Bench {
    args: Args,
    js: async_nats::jetstream::Context,
    nats_url: String,
    nats_pid: u32,
    body_file: PathBuf,
    sig: String,
    script: PathBuf,
    run_tag: AtomicU64,
}

impl Bench {
    /// wrk against `url` at `c` connections; `server` is the pid whose
    /// CPU is charged per request.
    async fn wrk(
        &self,
        url: &str,
        stream: &str,
        c: usize,
        server: u32,
        seconds: u64,
    ) -> Result<Run> {
        purge(&self.js, stream).await?;
        let before = stored(&self.js, stream).await?;
        let (s0, n0) = (cpu_seconds(server)?, cpu_seconds(self.nats_pid)?);
        let tag = format!(
            "r{}-{}",
            self.run_tag.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        let out = Command::new(&self.args.wrk)
            .args([
                "-t1",
                &format!("-c{c}"),
                &format!("-d{seconds}s"),
                "--latency",
            ])
            .arg("-s")
            .arg(&self.script)
            .arg(url)
            .env("BENCH_BODY_FILE", &self.body_file)
            .env("BENCH_SIG", &self.sig)
            .env("BENCH_RUN", &tag)
            .output()
            .with_context(|| format!("running {}", self.args.wrk.display()))?;
        let (s1, n1) = (cpu_seconds(server)?, cpu_seconds(self.nats_pid)?);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        }
        // Let the last PubAcks land before counting.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = stored(&self.js, stream).await?;
        let find = |prefix: &str| -> Option<String> {
            text.lines()
                .map(str::trim)
                .find(|l| l.starts_with(prefix))
                .map(str::to_owned)
        };
        let requests: u64 = text
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .context("wrk: requests")?;
        let non_2xx: u64 = find("Non-2xx")
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0);
        let errors: u64 = find("Socket errors:")
            .map(|l| {
                l.split(',')
                    .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        let rate: f64 = find("Requests/sec:")
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .context("wrk: Requests/sec")?;
        let pct = |p: &str| {
            find(p)
                .filter(|l| l.split_whitespace().count() == 2)
                .and_then(|l| l.split_whitespace().nth(1).map(wrk_ms))
                .unwrap_or(f64::NAN)
        };
        let ok = requests - non_2xx;
        let per = |secs: f64| secs * 1e6 / requests.max(1) as f64;
        Ok(Run {
            concurrency: c,
            requests,
            non_2xx,
            errors,
            rate,
            p50_ms: pct("50%"),
            p99_ms: pct("99%"),
            server_us: per(s1 - s0),
            nats_us: per(n1 - n0),
            // wrk stops at its deadline with up to `c` requests in
            // flight: those may be stored without their answer being
            // counted. Every 2xx must be stored, and nothing beyond those.
            stored_ok: (ok..=ok + c as u64).contains(&(after - before)),
        })
    }

    /// `gobridge raw` at `c` publishers.
    async fn raw_go(&self, bridge: &Path, c: usize) -> Result<Run> {
        let n = self.args.raw_messages;
        // A stream per sample: stored is counted from empty.
        let stream = format!("RAW{c}S{}", self.run_tag.fetch_add(1, Ordering::Relaxed));
        let n0 = cpu_seconds(self.nats_pid)?;
        let child = Command::new(bridge)
            .args(["raw", "-nats", &self.nats_url, "-stream", &stream])
            .args(["-c", &c.to_string(), "-n", &n.to_string()])
            .args(["-size", &self.args.body_bytes.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let pid = child.id();
        let mut peak = 0.0f64;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output());
        // The publisher's CPU: sampled until it exits (then /proc is gone).
        while !out.is_finished() {
            if let Ok(s) = cpu_seconds(pid) {
                peak = peak.max(s);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = out.await??;
        let n1 = cpu_seconds(self.nats_pid)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "gobridge raw failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let field = |k: &str| -> f64 {
            text.split_whitespace()
                .find_map(|t| t.strip_prefix(k))
                .map(|v| v.trim_end_matches("ms").trim_end_matches("/s"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let s = stored(&self.js, &stream).await?;
        self.js.delete_stream(&stream).await?;
        Ok(Run {
            concurrency: c,
            requests: n,
            rate: field("rate="),
            p50_ms: field("p50="),
            p99_ms: field("p99="),
            server_us: peak * 1e6 / n as f64,
            nats_us: (n1 - n0) * 1e6 / n as f64,
            stored_ok: s == n,
            ..Run::default()
        })
    }

    /// Open loop: `rate` requests per second for `seconds` to `path` on
    /// `addr`, each request a task started at its scheduled time on an idle
    /// keep-alive connection (a new one when none is idle, at most 512);
    /// latencies from
    /// the scheduled time, so a stall is counted, not hidden. p99 in ms and
    /// whether `stream` grew by the 2xx count.
    async fn open_loop_http(
        &self,
        addr: SocketAddr,
        path: &str,
        stream: &str,
        rate: f64,
        seconds: u64,
    ) -> Result<(f64, bool)> {
        purge(&self.js, stream).await?;
        let before = stored(&self.js, stream).await?;
        let (body, sig) = body_and_signature(self.args.body_bytes);
        let body = Arc::new(body);
        let total = (rate * seconds as f64) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let ok = Arc::new(AtomicU64::new(0));
        let idle: Arc<std::sync::Mutex<Vec<Conn>>> = Arc::default();
        // At most this many connections: beyond, a request waits for one
        // (and that wait counts in its latency).
        let conns = Arc::new(tokio::sync::Semaphore::new(512));
        let lats: Arc<std::sync::Mutex<Vec<Duration>>> = Arc::default();
        let tag = self.run_tag.fetch_add(1, Ordering::Relaxed);
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            let (body, ok, idle, lats, conns) = (
                body.clone(),
                ok.clone(),
                idle.clone(),
                lats.clone(),
                conns.clone(),
            );
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\nContent-Type: application/json\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: open{tag}-{i}\r\nX-Hub-Signature-256: {sig}\r\n\r\n",
                body.len()
            );
            tasks.spawn(async move {
                let _slot = conns.acquire().await?;
                let pooled = idle.lock().expect("pool").pop();
                // A pooled connection the server has closed meanwhile (idle
                // timeout) fails at once: the request goes on a new one.
                let (conn, status) = match pooled {
                    Some(mut c) => match c.request(&head, &body).await {
                        Ok(s) => (c, s),
                        Err(_) => {
                            let mut c = Conn::open(addr).await?;
                            let s = c.request(&head, &body).await?;
                            (c, s)
                        }
                    },
                    None => {
                        let mut c = Conn::open(addr).await?;
                        let s = c.request(&head, &body).await?;
                        (c, s)
                    }
                };
                lats.lock().expect("latencies").push(due.elapsed());
                if (200..300).contains(&status) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                idle.lock().expect("pool").push(conn);
                anyhow::Ok(())
            });
            // Reap finished tasks as we go (bounded memory).
            while let Some(r) = tasks.try_join_next() {
                r??;
            }
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let mut lat = std::mem::take(&mut *lats.lock().expect("latencies"));
        spread(path, &mut lat);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = stored(&self.js, stream).await?;
        Ok((p99(&mut lat), after - before == ok.load(Ordering::Relaxed)))
    }

    /// Open loop: `rate` JetStream publishes per second for `seconds`
    /// (each awaiting its PubAck in its own task); p99 from the scheduled
    /// time, in ms.
    async fn open_loop_raw(&self, rate: f64, seconds: u64) -> Result<f64> {
        let stream = "RAWOPEN";
        self.js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: stream.into(),
                subjects: vec![format!("{stream}.>")],
                duplicate_window: Duration::from_secs(120),
                storage: async_nats::jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        purge(&self.js, stream).await?;
        // Ids unique across samples: a repeated id within the duplicate
        // window would be answered as a duplicate, not stored.
        let tag = self.run_tag.fetch_add(1, Ordering::Relaxed);
        let payload = vec![b'x'; self.args.body_bytes];
        let total = (rate * seconds as f64) as u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            tokio::time::sleep_until(due.into()).await;
            let js = self.js.clone();
            let payload = payload.clone();
            tasks.spawn(async move {
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("open{tag}-{i}").as_str());
                let ack = js
                    .publish_with_headers(format!("{stream}.in"), h, payload.into())
                    .await?;
                ack.await?;
                anyhow::Ok(due.elapsed())
            });
        }
        let mut lat = Vec::new();
        while let Some(r) = tasks.join_next().await {
            lat.push(r??);
        }
        spread("raw", &mut lat);
        Ok(p99(&mut lat))
    }
}

/// Bytes of the NATS header block of the last message on `subject` in
/// `stream` (`NATS/1.0` line, `Name: value` lines, blank line), and of
/// its payload.
async fn stored_bytes(
    js: &async_nats::jetstream::Context,
    stream: &str,
    subject: &str,
) -> Result<(usize, usize)> {
    let m = js
        .get_stream(stream)
        .await?
        .get_last_raw_message_by_subject(subject)
        .await?;
    let mut n = "NATS/1.0\r\n\r\n".len();
    for (k, vs) in m.headers.iter() {
        for v in vs {
            n += AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2;
        }
    }
    Ok((n, m.payload.len()))
}

fn p99(lat: &mut [Duration]) -> f64 {
    percentile(lat, 0.99)
}

/// The `q` quantile of `lat` in ms (sorts it).
fn percentile(lat: &mut [Duration], q: f64) -> f64 {
    if lat.is_empty() {
        return f64::NAN;
    }
    lat.sort_unstable();
    let i = ((lat.len() - 1) as f64 * q).round() as usize;
    lat[i].as_secs_f64() * 1000.0
}

/// One line of an open-loop sample's latency distribution.
fn spread(what: &str, lat: &mut [Duration]) {
    let n = lat.len();
    let [a, b, c, d, e] = [0.5, 0.9, 0.99, 0.999, 1.0].map(|q| percentile(lat, q));
    println!("  {what:<8} n={n} p50 {a:.2} p90 {b:.2} p99 {c:.2} p99.9 {d:.2} max {e:.2} ms");
}

/// Endpoints file with `n` GitHub endpoints (`/bench`, `/bench-1`, …).
fn endpoints_yaml(n: usize) -> String {
    let mut s = String::new();
    for i in 0..n {
        let (name, path) = if i == 0 {
            ("bench".to_owned(), "/bench".to_owned())
        } else {
            (format!("bench-{i}"), format!("/bench-{i}"))
        };
        let _ = write!(
            s,
            "---\napiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: {name}, namespace: local}}\nspec:\n  path: {path}\n  verification: {{scheme: github, secretRefs: [{{name: bench, key: secret}}]}}\n  processor: {{sink: {{url: \"http://127.0.0.1:1/\"}}}}\n"
        );
    }
    s
}

/// Start the gateway with `n` endpoints; its address and process.
async fn start_gateway(
    args: &Args,
    dir: &Path,
    nats_url: &str,
    n: usize,
) -> Result<(SocketAddr, Proc)> {
    let d = dir.join(format!("gw-{n}"));
    std::fs::create_dir_all(d.join("secrets/bench"))?;
    std::fs::write(d.join("secrets/bench/secret"), SECRET)?;
    std::fs::write(d.join("endpoints.yaml"), endpoints_yaml(n))?;
    let (port, admin) = (free_port()?, free_port()?);
    std::fs::write(
        d.join("gateway.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\nadminListen: 127.0.0.1:{admin}\nsource: file\nendpointsFile: {}\nsecretsDir: {}\nlogFormat: json\n",
            d.join("endpoints.yaml").display(),
            d.join("secrets").display()
        ),
    )?;
    let p = Proc(
        Command::new(&args.gateway_bin)
            .arg("--config")
            .arg(d.join("gateway.yaml"))
            .env("SPILLWAY_NATS_URL", nats_url)
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(d.join("gateway.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.gateway_bin.display()))?,
    );
    wait_for("gateway /readyz", async || {
        let Ok(mut c) = Conn::open(([127, 0, 0, 1], admin).into()).await else {
            return false;
        };
        c.request("GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n", b"")
            .await
            .is_ok_and(|s| s == 200)
    })
    .await?;
    Ok((([127, 0, 0, 1], port).into(), p))
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "–".into()
    }
}

fn num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

/// A small SVG: rate (left) and p99 (right) against connections, one
/// line per system.
fn svg(series: &[(&str, &str, &[Run])]) -> String {
    let (w, h, pad) = (360.0, 240.0, 48.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        2.0 * w + 20.0,
        h + 40.0
    );
    for (panel, title, value) in [
        (0.0, "requests/s (closed loop)", 0usize),
        (w + 20.0, "p99 ms (closed loop)", 1usize),
    ] {
        let pick = |r: &Run| if value == 0 { r.rate } else { r.p99_ms };
        let max = series
            .iter()
            .flat_map(|(_, _, runs)| runs.iter().map(pick))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let xs: Vec<usize> = series
            .first()
            .map(|(_, _, r)| r.iter().map(|r| r.concurrency).collect())
            .unwrap_or_default();
        let x = |i: usize| panel + pad + (w - 2.0 * pad) * i as f64 / (xs.len().max(2) - 1) as f64;
        let y = |v: f64| 20.0 + (h - pad) * (1.0 - v / max);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"14\">{title}</text><line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{}\" y1=\"20\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><text x=\"{}\" y=\"24\">{}</text><text x=\"{}\" y=\"{}\">0</text>",
            panel + pad,
            panel + pad,
            y(0.0),
            panel + w - pad,
            y(0.0),
            panel + pad,
            panel + pad,
            y(0.0),
            panel + 2.0,
            num(max / 1.1, if value == 0 { 0 } else { 1 }),
            panel + 30.0,
            y(0.0)
        );
        for (i, c) in xs.iter().enumerate() {
            let _ = writeln!(
                out,
                "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{c}</text>",
                x(i),
                y(0.0) + 14.0
            );
        }
        for (k, (name, color, runs)) in series.iter().enumerate() {
            let pts: Vec<String> = runs
                .iter()
                .enumerate()
                .filter(|(_, r)| pick(r).is_finite())
                .map(|(i, r)| format!("{:.1},{:.1}", x(i), y(pick(r))))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/><text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                pts.join(" "),
                panel + w - pad - 90.0,
                34.0 + 13.0 * k as f64
            );
        }
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">connections</text>",
            panel + w / 2.0,
            h + 30.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// Each figure of `runs` (samples of one row) as its median; counts are
/// summed, stored = 2xx must hold for every sample.
fn median_run(runs: &[Run]) -> Run {
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    Run {
        concurrency: runs.first().map_or(0, |r| r.concurrency),
        requests: runs.iter().map(|r| r.requests).sum(),
        non_2xx: runs.iter().map(|r| r.non_2xx).sum(),
        errors: runs.iter().map(|r| r.errors).sum(),
        rate: median(|r| r.rate),
        p50_ms: median(|r| r.p50_ms),
        p99_ms: median(|r| r.p99_ms),
        server_us: median(|r| r.server_us),
        nats_us: median(|r| r.nats_us),
        stored_ok: runs.iter().all(|r| r.stored_ok),
    }
}

/// The HTTP floor (`loadgen floor LISTEN NATS_URL`): the least a Rust
/// server can do for a durable webhook on this machine. hyper (HTTP/1.1,
/// the gateway's HTTP stack without axum), the body read, one JetStream
/// publish with `Nats-Msg-Id` from `X-GitHub-Delivery`, the PubAck awaited,
/// 200. No verification, limits, routing, metrics, logs or stored headers.
/// Beside raw publish it shows what HTTP itself costs here; beside the
/// gateway, what Spillway adds.
/// With `metadata`, it stores a webhook's metadata the size of the
/// gateway's as well (the same names and value sizes as a benchmark
/// webhook's), as NATS headers or in the payload in front of the body, to
/// measure what storing it costs the client, nats-server and the latency.
async fn floor_server(listen: &str, nats: &str, metadata: FloorMetadata) -> Result<()> {
    use http_body_util::BodyExt;
    use spillway_api::wire;
    // The gateway's header names (values sized like a benchmark webhook's
    // below), built once.
    let orig = |h: &str| format!("{}{h}", wire::ORIGINAL_HEADER_PREFIX);
    let names: Arc<[String; 8]> = Arc::new([
        wire::ENDPOINT.to_owned(),
        wire::DELIVERY_ID.to_owned(),
        wire::RECEIVED_AT.to_owned(),
        wire::CONTENT_TYPE.to_owned(),
        wire::TRACEPARENT.to_owned(),
        orig("X-Github-Event"),
        orig("X-Github-Delivery"),
        orig("X-Hub-Signature-256"),
    ]);
    let js = async_nats::jetstream::new(async_nats::connect(nats).await?);
    // The gateway's listen queue (the bridge's is Go's, the system's
    // limit): every server gets the same queue for a burst of connections.
    let listener = spillway_gateway::listener::bind(listen.parse()?)?;
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let (js, names) = (js.clone(), names.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(
                move |req: hyper::Request<hyper::body::Incoming>| {
                    let (js, names) = (js.clone(), names.clone());
                    async move {
                        let id = req
                            .headers()
                            .get("x-github-delivery")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        let mut body = req.into_body().collect().await?.to_bytes();
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Nats-Msg-Id", id.as_str());
                        let values = [
                            "local/bench",
                            id.as_str(),
                            "2026-12-06T07:10:00.123Z",
                            "application/json",
                            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                            "push",
                            id.as_str(),
                            "sha256=0af7651916cd43dd8448eb211c80319c0af7651916cd43dd8448eb211c80319c",
                        ];
                        match metadata {
                            FloorMetadata::None => {}
                            FloorMetadata::Headers => {
                                for (k, v) in names.iter().zip(values) {
                                    h.insert(k.as_str(), v);
                                }
                            }
                            FloorMetadata::Payload => {
                                let mut p = Vec::with_capacity(512 + body.len());
                                for (k, v) in names.iter().zip(values) {
                                    p.extend_from_slice(k.as_bytes());
                                    p.extend_from_slice(b": ");
                                    p.extend_from_slice(v.as_bytes());
                                    p.extend_from_slice(b"\r\n");
                                }
                                p.extend_from_slice(b"\r\n");
                                p.extend_from_slice(&body);
                                body = p.into();
                            }
                        }
                        let stored = match js.publish_with_headers(FLOOR_SUBJECT, h, body).await {
                            Ok(ack) => ack.await.is_ok(),
                            Err(_) => false,
                        };
                        let mut res =
                            hyper::Response::new(http_body_util::Empty::<axum::body::Bytes>::new());
                        if !stored {
                            *res.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        Ok::<_, hyper::Error>(res)
                    }
                },
            );
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                .await;
        });
    }
}

/// Start `cmd`, a server listening on `port`, wait until it accepts, and
/// warm it up (1 s of wrk storing to `stream`): its process and URL.
async fn start_server(
    bench: &Bench,
    what: &str,
    mut cmd: Command,
    port: u16,
    stream: &str,
) -> Result<(Proc, String)> {
    let p = Proc(
        cmd.spawn()
            .with_context(|| format!("starting the {what}"))?,
    );
    wait_for(what, async || {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await?;
    let url = format!("http://127.0.0.1:{port}/");
    bench.wrk(&url, stream, 8, p.pid(), 1).await?;
    Ok((p, url))
}

/// The floor server's stream and subject.
const FLOOR_STREAM: &str = "FLOOR";
const FLOOR_SUBJECT: &str = "FLOOR.in";

#[tokio::main]
async fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("floor") {
        return match &argv[2..] {
            [listen, nats] => floor_server(listen, nats, FloorMetadata::None).await,
            [listen, nats, m] => {
                let m = <FloorMetadata as clap::ValueEnum>::from_str(m, true)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                floor_server(listen, nats, m).await
            }
            _ => bail!("usage: loadgen floor LISTEN NATS_URL [none|headers|payload]"),
        };
    }
    let mut args = Args::parse();
    if args.smoke {
        args.concurrency = "4".into();
        args.seconds = 1;
        args.rounds = 1;
        args.raw_messages = 500;
        args.endpoints = 10;
    }
    let concs: Vec<usize> = if args.open_only.is_some() {
        Vec::new()
    } else {
        args.concurrency
            .split(',')
            .map(|c| c.trim().parse().context("--concurrency"))
            .collect::<Result<_>>()?
    };
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into());
    // Declared before every process: dropped (removed) after they stop.
    let scratch =
        Scratch(std::env::temp_dir().join(format!("spillway-bench-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0)?;
    let dir = scratch.0.clone();

    let nats_port = free_port()?;
    std::fs::write(
        dir.join("nats.conf"),
        format!(
            "listen: 127.0.0.1:{nats_port}\njetstream {{ store_dir: {:?} }}\n",
            dir.join("js")
        ),
    )?;
    let nats = Proc(
        Command::new(&args.nats_server)
            .arg("-c")
            .arg(dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.nats_server.display()))?,
    );
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    wait_for("nats-server", async || {
        async_nats::connect(&nats_url).await.is_ok()
    })
    .await?;
    let js = async_nats::jetstream::new(async_nats::connect(&nats_url).await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        // Every endpoint's intake subjects (the bridge makes its own, PEER).
        subjects: vec!["spillway.in.>".into()],
        duplicate_window: Duration::from_secs(120),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: FLOOR_STREAM.into(),
        subjects: vec![FLOOR_SUBJECT.into()],
        duplicate_window: Duration::from_secs(120),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let (body, sig) = body_and_signature(args.body_bytes);
    let body_file = dir.join("body.json");
    std::fs::write(&body_file, &body)?;
    let script = dir.join("signed.lua");
    std::fs::write(&script, WRK_SCRIPT)?;
    let bench = Bench {
        args: args.clone(),
        js: js.clone(),
        nats_url: nats_url.clone(),
        nats_pid: nats.pid(),
        body_file,
        sig,
        script,
        run_tag: AtomicU64::new(0),
    };

    // Both servers run side by side; each concurrency's rows (raw publish,
    // gateway, bridge) are measured back to back, so a slow minute of this
    // shared machine hits all three rather than one column.
    let (gw_addr, gw) = start_gateway(&args, &dir, &nats_url, 1).await?;
    let gw_url = format!("http://{gw_addr}/bench");
    bench.wrk(&gw_url, STREAM, 8, gw.pid(), 1).await?; // warm-up
    let bridge_proc = match &args.bridge_bin {
        Some(bin) => {
            let port = free_port()?;
            let mut cmd = Command::new(bin);
            cmd.args(["serve", "-listen", &format!("127.0.0.1:{port}")])
                .args(["-nats", &nats_url, "-stream", "PEER", "-secret", SECRET])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("bridge.log"))?);
            // The bridge stores in its own stream, PEER (same settings).
            let (b, url) = start_server(&bench, "bridge", cmd, port, "PEER").await?;
            Some((b, port, url))
        }
        None => None,
    };
    // The HTTP floor (see `floor_server`), this same binary.
    let floor_port = free_port()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["floor", &format!("127.0.0.1:{floor_port}"), &nats_url])
        .arg(
            <FloorMetadata as clap::ValueEnum>::to_possible_value(&args.floor_metadata)
                .expect("no variant is skipped")
                .get_name(),
        )
        .stdout(Stdio::null());
    let (floor_proc, floor_url) =
        start_server(&bench, "HTTP floor server", cmd, floor_port, FLOOR_STREAM).await?;
    let mut raw = Vec::new();
    let mut gateway = Vec::new();
    let mut bridge = Vec::new();
    let mut floor = Vec::new();
    let mut gw_rss_64 = f64::NAN;
    let rounds = args.rounds.max(1);
    for &c in &concs {
        let (mut raws, mut gws, mut brs, mut fls) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            if let Some(bin) = &args.bridge_bin {
                raws.push(bench.raw_go(bin, c).await?);
            }
            // Rotate which server goes first.
            let mut order = [0, 1, 2];
            order.rotate_left(round % 3);
            for turn in order {
                match turn {
                    0 => gws.push(
                        bench
                            .wrk(&gw_url, STREAM, c, gw.pid(), args.seconds)
                            .await?,
                    ),
                    1 => {
                        if let Some((b, _, url)) = &bridge_proc {
                            brs.push(bench.wrk(url, "PEER", c, b.pid(), args.seconds).await?);
                        }
                    }
                    _ => fls.push(
                        bench
                            .wrk(&floor_url, FLOOR_STREAM, c, floor_proc.pid(), args.seconds)
                            .await?,
                    ),
                }
            }
        }
        let r = median_run(&fls);
        println!(
            "http floor       c={c:<4} {:>8.0}/s p99 {:.2} ms  {:.1} µs/req  nats {:.1} µs/req  stored=2xx {}",
            r.rate, r.p99_ms, r.server_us, r.nats_us, r.stored_ok
        );
        floor.push(r);
        if !raws.is_empty() {
            let r = median_run(&raws);
            println!(
                "raw go publish  c={c:<4} {:>8.0}/s p99 {:.2} ms",
                r.rate, r.p99_ms
            );
            raw.push(r);
        }
        let r = median_run(&gws);
        println!(
            "spillway gateway c={c:<4} {:>8.0}/s ({} requests) p50 {:.2} ms p99 {:.2} ms  {:.1} µs/req  nats {:.1} µs/req  stored=2xx {}",
            r.rate, r.requests, r.p50_ms, r.p99_ms, r.server_us, r.nats_us, r.stored_ok
        );
        if c == 64 || concs.len() == 1 {
            gw_rss_64 = rss_mib(gw.pid())?;
        }
        gateway.push(r);
        if !brs.is_empty() {
            let r = median_run(&brs);
            println!(
                "go bridge        c={c:<4} {:>8.0}/s ({} requests) p50 {:.2} ms p99 {:.2} ms  {:.1} µs/req  nats {:.1} µs/req  stored=2xx {}",
                r.rate, r.requests, r.p50_ms, r.p99_ms, r.server_us, r.nats_us, r.stored_ok
            );
            bridge.push(r);
        }
    }

    let (gw_header_bytes, gw_payload_bytes) =
        stored_bytes(&js, STREAM, "spillway.in.local.bench.0").await?;
    let gw_head_bytes = gw_payload_bytes.saturating_sub(args.body_bytes);
    let best = gateway.iter().map(|r| r.rate).fold(0.0, f64::max);
    let half = args.open_only.unwrap_or((best / 2.0).max(10.0));
    let open_secs = args.seconds.min(10);

    // Open loop at half the gateway's best rate: gateway, raw publish and
    // bridge back to back, `rounds` times; medians of the p99s.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let (mut gw_p99s, mut raw_p99s, mut bridge_p99s, mut floor_p99s) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut open_ok = true;
    let mut bridge_header_bytes = 0usize;
    if bridge_proc.is_some() {
        bridge_header_bytes = stored_bytes(&js, "PEER", "PEER.in").await?.0;
    }
    for round in 0..rounds {
        // Rotate which goes first, as in the closed loop.
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        for turn in order {
            let (target, stream, path) = match turn {
                0 => (gw_addr, STREAM, "/bench"),
                1 => {
                    raw_p99s.push(bench.open_loop_raw(half, open_secs).await?);
                    continue;
                }
                2 => (([127, 0, 0, 1], floor_port).into(), FLOOR_STREAM, "/"),
                _ => match &bridge_proc {
                    Some((_, port, _)) => (([127, 0, 0, 1], *port).into(), "PEER", "/"),
                    None => continue,
                },
            };
            let (p, ok) = bench
                .open_loop_http(target, path, stream, half, open_secs)
                .await?;
            open_ok &= ok;
            match turn {
                0 => gw_p99s.push(p),
                2 => floor_p99s.push(p),
                _ => bridge_p99s.push(p),
            }
        }
    }
    let (gw_open_p99, raw_open_p99) = (median(gw_p99s), median(raw_p99s));
    let (bridge_open_p99, floor_open_p99) = (median(bridge_p99s), median(floor_p99s));
    println!(
        "open loop at {half:.0}/s: gateway p99 {gw_open_p99:.2} ms, raw publish p99 {raw_open_p99:.2} ms, go bridge p99 {bridge_open_p99:.2} ms, http floor p99 {floor_open_p99:.2} ms (medians), stored=2xx {open_ok}"
    );
    drop(bridge_proc);
    drop(floor_proc);
    if args.open_only.is_some() {
        return Ok(());
    }

    // Many endpoints against one, at 64 connections (or the only one):
    // both gateways up, sampled alternately like the rows above.
    let c_many = if concs.contains(&64) { 64 } else { concs[0] };
    let (many_addr, many_gw) = start_gateway(&args, &dir, &nats_url, args.endpoints).await?;
    let many_url = format!("http://{many_addr}/bench");
    bench.wrk(&many_url, STREAM, 8, many_gw.pid(), 1).await?;
    let (mut ones, mut manys) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for many_turn in [round % 2 == 1, round % 2 == 0] {
            if many_turn {
                manys.push(
                    bench
                        .wrk(&many_url, STREAM, c_many, many_gw.pid(), args.seconds)
                        .await?,
                );
            } else {
                ones.push(
                    bench
                        .wrk(&gw_url, STREAM, c_many, gw.pid(), args.seconds)
                        .await?,
                );
            }
        }
    }
    let (one, many) = (median_run(&ones), median_run(&manys));
    let many_rss = rss_mib(many_gw.pid())?;
    drop(many_gw);
    drop(gw);
    println!(
        "{} endpoints     c={c_many:<4} {:>8.0}/s (1 endpoint {:.0}/s, alternating), RSS {many_rss:.1} MiB (1 endpoint {gw_rss_64:.1} MiB), stored=2xx {}",
        args.endpoints, many.rate, one.rate, many.stored_ok
    );

    let all_stored = gateway
        .iter()
        .chain(&bridge)
        .chain(&raw)
        .chain(&floor)
        .all(|r| r.stored_ok)
        && open_ok
        && many.stored_ok;
    let all_2xx = gateway
        .iter()
        .chain(&bridge)
        .chain(&floor)
        .chain([&many])
        .all(|r| r.non_2xx == 0 && r.errors == 0);

    if let Some(out) = &args.out {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Gateway benchmark: Spillway's gateway beside the Go bridge\n"
        );
        let _ = writeln!(
            md,
            "Generated by `make bench-gateway` (`ingress-gateway/examples/loadgen.rs`; its header explains every phase). One run on this machine: 2 cores shared by the load generator, the servers and nats-server, so ratios within the run are what to compare, not absolute rates. Load average before: {load_before}.\n"
        );
        let _ = writeln!(
            md,
            "Commit: {} (`git describe --always --dirty` where the run was made).\n",
            std::process::Command::new("git")
                .args(["describe", "--always", "--dirty"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_else(|| "unknown".into())
        );
        // The version as the binary reports it ("nats-server: v2.15.3").
        let nats_version = std::process::Command::new(&args.nats_server)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                let out = String::from_utf8_lossy(&o.stdout);
                let v = out.trim().rsplit(' ').next().unwrap_or_default();
                v.trim_start_matches('v').to_owned()
            })
            .unwrap_or_else(|| "(version unknown)".into());
        let _ = writeln!(
            md,
            "Setup: nats-server {nats_version}, JetStream file storage, R1, one stream per server; bodies of {} bytes, GitHub-signed (HMAC-SHA256), a unique `X-GitHub-Delivery` per request used as `Nats-Msg-Id`, 2xx only after the PubAck, on both servers. Closed loop: `wrk -t1 -cN -d{}s` per sample; each concurrency's raw, gateway and bridge samples run back to back, {} times (alternating which server goes first), and every figure in the table is the median of its samples. Stored = 2xx: the stream grew by the 2xx count (plus at most N requests in flight when wrk stopped, stored but not counted by wrk); open loop and raw publish count exactly. CPU per request: the process's user + system time from `/proc` over the requests served. Command: `{}`.\n",
            args.body_bytes,
            args.seconds,
            args.rounds.max(1),
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        let _ = writeln!(
            md,
            "Where the gateway's time goes, what was changed and what was not: [gateway-profile.md](gateway-profile.md). Targets (issue 18) are checked below the table.\n"
        );
        let _ = writeln!(
            md,
            "| connections | raw Go publish | Spillway gateway | Go bridge | HTTP floor | gateway / bridge | gateway / raw | floor / raw | gateway p99 ms | bridge p99 ms | gateway CPU µs/req | bridge CPU µs/req | floor CPU µs/req | gateway/bridge CPU | nats µs/msg (gateway) | nats µs/msg (bridge) | nats µs/msg (floor) | stored = 2xx |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"
        );
        for (i, g) in gateway.iter().enumerate() {
            let r = raw.get(i).cloned().unwrap_or(Run {
                rate: f64::NAN,
                ..Run::default()
            });
            let b = bridge.get(i).cloned().unwrap_or(Run {
                rate: f64::NAN,
                p99_ms: f64::NAN,
                server_us: f64::NAN,
                nats_us: f64::NAN,
                stored_ok: true,
                ..Run::default()
            });
            let f = floor.get(i).cloned().unwrap_or_default();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                g.concurrency,
                num(r.rate, 0),
                num(g.rate, 0),
                num(b.rate, 0),
                num(f.rate, 0),
                ratio(g.rate, b.rate),
                ratio(g.rate, r.rate),
                ratio(f.rate, r.rate),
                num(g.p99_ms, 2),
                num(b.p99_ms, 2),
                num(g.server_us, 1),
                num(b.server_us, 1),
                num(f.server_us, 1),
                ratio(g.server_us, b.server_us),
                num(g.nats_us, 1),
                num(b.nats_us, 1),
                num(f.nats_us, 1),
                if g.stored_ok && b.stored_ok && f.stored_ok && (r.stored_ok || r.rate.is_nan()) {
                    "yes"
                } else {
                    "NO"
                },
            );
        }
        let _ = writeln!(
            md,
            "\n![rate and p99 against connections](gateway.svg)\n\n**Open loop** at half the gateway's best closed-loop rate ({half:.0}/s, {open_secs} s per sample, {rounds} samples each taken back to back, medians; latency from each request's scheduled send time): gateway p99 {} ms, raw publish p99 {} ms (async-nats, each publish awaiting its PubAck): ratio {}; the Go bridge at the same rate: p99 {} ms; the HTTP floor: p99 {} ms (ratio to raw {}). Stored = 2xx: {}.\n",
            num(gw_open_p99, 2),
            num(raw_open_p99, 2),
            ratio(gw_open_p99, raw_open_p99),
            num(bridge_open_p99, 2),
            num(floor_open_p99, 2),
            ratio(floor_open_p99, raw_open_p99),
            if open_ok { "yes" } else { "NO" }
        );
        let _ = writeln!(
            md,
            "**{} endpoints** configured (file mode), {c_many} connections to one of them: {} req/s against {} with 1 endpoint (medians, sampled alternately) ({}), RSS {:.1} MiB against {:.1} MiB (+{:.1} MiB). Stored = 2xx: {}.",
            args.endpoints,
            num(many.rate, 0),
            num(one.rate, 0),
            ratio(many.rate, one.rate),
            many_rss,
            gw_rss_64,
            many_rss - gw_rss_64,
            if many.stored_ok { "yes" } else { "NO" }
        );
        let _ = writeln!(
            md,
            "\nStored per webhook besides the {}-byte body: from the gateway, a {gw_header_bytes}-byte NATS header block (the dedup id) and a {gw_head_bytes}-byte head in front of the body (stored format 2: delivery id, receive time, trace context, content type, endpoint and the provider's own headers; `spillway_api::stored`); from the bridge, {bridge_header_bytes} bytes of NATS headers (content type and dedup id only).",
            args.body_bytes
        );
        let at = |runs: &[Run]| runs.iter().find(|r| r.concurrency == c_many).cloned();
        if let (Some(g), Some(b)) = (at(&gateway), at(&bridge)) {
            let r = at(&raw).map_or(f64::NAN, |r| r.rate);
            let _ = writeln!(md, "\n## Targets at {c_many} connections (this run)\n");
            let _ = writeln!(md, "| target | measured | met |\n|---|---:|:---:|");
            let row = |md: &mut String, what: &str, v: f64, limit: f64, above: bool| {
                let met = if above { v >= limit } else { v <= limit };
                let _ = writeln!(
                    md,
                    "| {what} | {v:.2} | {} |",
                    if met { "yes" } else { "no" }
                );
            };
            row(
                &mut md,
                "gateway rate / bridge rate ≥ 1.3",
                g.rate / b.rate,
                1.3,
                true,
            );
            row(
                &mut md,
                "gateway CPU / bridge CPU per webhook ≤ 0.6",
                g.server_us / b.server_us,
                0.6,
                false,
            );
            row(
                &mut md,
                "gateway rate / raw publish ≥ 0.6",
                g.rate / r,
                0.6,
                true,
            );
            row(
                &mut md,
                "nats-server CPU per webhook, gateway / bridge ≤ 1",
                g.nats_us / b.nats_us,
                1.0,
                false,
            );
            row(
                &mut md,
                "open-loop p99, gateway / raw publish ≤ 3",
                gw_open_p99 / raw_open_p99,
                3.0,
                false,
            );
            row(
                &mut md,
                &format!("rate with {} endpoints / 1 endpoint ≥ 0.95", args.endpoints),
                many.rate / one.rate,
                0.95,
                true,
            );
            row(
                &mut md,
                &format!("RSS growth with {} endpoints, MiB, < 20", args.endpoints),
                many_rss - gw_rss_64,
                20.0,
                false,
            );
            if let Some(f) = at(&floor) {
                let _ = writeln!(
                    md,
                    "\nFor reference, not a target: the HTTP floor (hyper, read, publish, PubAck, 200; nothing else; it stores {}) reaches {} of raw publish at {c_many} connections and its open-loop p99 is {} of raw's; the gateway reaches {} of the floor's rate at {} of its CPU per request. What the floor loses against raw publish is what any HTTP/1.1 front costs on this machine (a request and a response through loopback TCP, and the load generator on the same two cores).",
                    match args.floor_metadata {
                        FloorMetadata::None => "only `Nats-Msg-Id` besides the body",
                        FloorMetadata::Headers =>
                            "the gateway's metadata too, as headers (`--floor-metadata headers`)",
                        FloorMetadata::Payload =>
                            "the gateway's metadata too, in front of the body (`--floor-metadata payload`)",
                    },
                    ratio(f.rate, r),
                    ratio(floor_open_p99, raw_open_p99),
                    ratio(g.rate, f.rate),
                    ratio(g.server_us, f.server_us),
                );
            }
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, md)?;
        let plot = out.with_extension("svg");
        let mut series: Vec<(&str, &str, &[Run])> = vec![("Spillway gateway", "#1f77b4", &gateway)];
        if !bridge.is_empty() {
            series.push(("Go bridge", "#d62728", &bridge));
        }
        if !raw.is_empty() {
            series.push(("raw Go publish", "#7f7f7f", &raw));
        }
        series.push(("HTTP floor", "#2ca02c", &floor));
        std::fs::write(&plot, svg(&series))?;
        println!("wrote {} and {}", out.display(), plot.display());
    }
    drop(bench);
    drop(nats);
    drop(scratch);
    if !all_stored {
        bail!("stored != 2xx in some run (see above)");
    }
    if !all_2xx {
        bail!("some requests were not answered 2xx (see above)");
    }
    println!("bench: every 2xx is stored");
    Ok(())
}

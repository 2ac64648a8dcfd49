//! A bounded load generator for the gateway, loopback only.
//!
//! Starts a real nats-server (from `.tools/bin`) and the real
//! `spillway-gateway` binary in file mode, sends signed GitHub-style webhooks
//! over keep-alive HTTP/1.1 connections, checks that every 2xx is in the
//! stream, and writes a Markdown report.
//!
//! ```text
//! cargo build --release -p spillway-gateway --bins --examples
//! target/release/examples/loadgen --requests 20000 --concurrency 64 --out docs/benchmarks/gateway.md
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use spillway_api::names::EndpointNames;
use spillway_gateway::verify::{ring_hmac, sign};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const SECRET: &[u8] = b"bench-secret";

#[derive(Parser, Debug)]
struct Args {
    /// Requests per scenario.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Connections (comma-separated list: one scenario each).
    #[arg(long, default_value = "16,64")]
    concurrency: String,
    /// Body size in bytes.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Hard stop per scenario, seconds.
    #[arg(long, default_value_t = 60)]
    max_seconds: u64,
    /// The gateway binary.
    #[arg(long, default_value = "target/release/spillway-gateway")]
    gateway_bin: PathBuf,
    /// The nats-server binary.
    #[arg(long, default_value = ".tools/bin/nats-server")]
    nats_server: PathBuf,
    /// Markdown report to write.
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Kill(Child);

impl Drop for Kill {
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

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection.
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

    async fn post(&mut self, path: &str, headers: &str, body: &[u8]) -> Result<u16> {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {}\r\n{headers}\r\n",
            body.len()
        );
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

struct Outcome {
    concurrency: usize,
    ok: u64,
    other: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    stored: u64,
}

async fn scenario(
    addr: SocketAddr,
    js: &async_nats::jetstream::Context,
    stream: &str,
    run: u32,
    concurrency: usize,
    args: &Args,
) -> Result<Outcome> {
    let before = js.get_stream(stream).await?.info().await?.state.messages;
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let padding = "x".repeat(args.body_bytes.saturating_sub(48));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (next, ok, other, errors) = (next.clone(), ok.clone(), other.clone(), errors.clone());
        let padding = padding.clone();
        let total = args.requests;
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut conn = match Conn::open(addr).await {
                Ok(c) => c,
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return lat;
                }
            };
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() > deadline {
                    return lat;
                }
                let body = format!("{{\"run\":{run},\"i\":{i},\"pad\":\"{padding}\"}}");
                let sig = hex::encode(sign(ring_hmac::HMAC_SHA256, SECRET, &[body.as_bytes()]));
                let headers = format!(
                    "X-Hub-Signature-256: sha256={sig}\r\nX-GitHub-Delivery: r{run}-{i}\r\nX-GitHub-Event: push\r\nContent-Type: application/json\r\n"
                );
                let t = Instant::now();
                match conn.post("/bench", &headers, body.as_bytes()).await {
                    Ok(s) => {
                        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                        if (200..300).contains(&s) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            other.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        match Conn::open(addr).await {
                            Ok(c) => conn = c,
                            Err(_) => return lat,
                        }
                    }
                }
            }
        });
    }
    let mut latencies_us = Vec::new();
    while let Some(l) = tasks.join_next().await {
        latencies_us.extend(l?);
    }
    let elapsed = started.elapsed();
    latencies_us.sort_unstable();
    let after = js.get_stream(stream).await?.info().await?.state.messages;
    let ok = ok.load(Ordering::Relaxed);
    Ok(Outcome {
        concurrency,
        ok,
        other: other.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies_us,
        stored: after - before,
    })
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[idx]) / 1000.0
}

fn write_dir(dir: &Path, port: u16, admin: u16) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join("secrets/bench"))?;
    std::fs::write(dir.join("secrets/bench/secret"), SECRET)?;
    std::fs::write(
        dir.join("endpoints.yaml"),
        "apiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {name: bench, namespace: local}\nspec:\n  path: /bench\n  verification: {scheme: github, secretRefs: [{name: bench, key: secret}]}\n  processor: {sink: {url: \"http://127.0.0.1:1/\"}}\n",
    )?;
    let cfg = dir.join("gateway.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nadminListen: 127.0.0.1:{admin}\nsource: file\nendpointsFile: {}\nsecretsDir: {}\nlogFormat: json\n",
            dir.join("endpoints.yaml").display(),
            dir.join("secrets").display()
        ),
    )?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "unknown".into());
    let dir = std::env::temp_dir().join(format!("spillway-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let nats_port = free_port()?;
    std::fs::write(
        dir.join("nats.conf"),
        format!(
            "listen: 127.0.0.1:{nats_port}\njetstream {{ store_dir: {:?} }}\n",
            dir.join("js")
        ),
    )?;
    let _nats = Kill(
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
    let client = async_nats::connect(&nats_url).await?;
    let js = async_nats::jetstream::new(client);
    let names = EndpointNames::new("local", "bench");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: names.stream(),
        subjects: vec![names.stream_subjects()],
        duplicate_window: Duration::from_secs(120),
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    let (port, admin) = (free_port()?, free_port()?);
    let cfg = write_dir(&dir, port, admin)?;
    let _gw = Kill(
        Command::new(&args.gateway_bin)
            .arg("--config")
            .arg(&cfg)
            .env("SPILLWAY_NATS_URL", &nats_url)
            .env("RUST_LOG", "warn")
            .stdout(std::fs::File::create(dir.join("gateway.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", args.gateway_bin.display()))?,
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for("gateway /readyz", async || {
        let Ok(mut c) = Conn::open(([127, 0, 0, 1], admin).into()).await else {
            return false;
        };
        let _ =
            c.w.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
        let mut line = String::new();
        let _ = c.r.read_line(&mut line).await;
        line.contains(" 200 ")
    })
    .await?;

    // Warm-up (not reported).
    let warm = Args {
        requests: 500,
        ..Args::parse()
    };
    scenario(addr, &js, &names.stream(), 0, 8, &warm).await?;

    let mut outcomes = Vec::new();
    for (run, c) in args.concurrency.split(',').enumerate() {
        let c: usize = c.trim().parse().context("concurrency")?;
        let o = scenario(addr, &js, &names.stream(), run as u32 + 1, c, &args).await?;
        println!(
            "concurrency {:>3}: {} ok, {} other, {} errors in {:.2}s = {:.0} req/s; p50 {:.2} ms, p99 {:.2} ms; stored {}",
            o.concurrency,
            o.ok,
            o.other,
            o.errors,
            o.elapsed.as_secs_f64(),
            o.ok as f64 / o.elapsed.as_secs_f64(),
            pct(&o.latencies_us, 0.5),
            pct(&o.latencies_us, 0.99),
            o.stored
        );
        if o.stored != o.ok {
            bail!("{} acknowledged but {} stored", o.ok, o.stored);
        }
        outcomes.push(o);
    }

    if let Some(out) = &args.out {
        let mut md = String::from(
            "# Gateway benchmark\n\nGenerated by `ingress-gateway/examples/loadgen.rs` (see its header for the commands). \
One real `nats-server` (JetStream, file storage) and the real `spillway-gateway` binary (release build, file mode) \
on loopback; the load generator, the gateway and NATS share the same machine, so the figures are a floor for \
what the gateway does on dedicated cores, not a capacity promise.\n\n\
Each request is a signed GitHub-style webhook (HMAC-SHA256 verified by the gateway, unique `X-GitHub-Delivery` \
used as `Nats-Msg-Id`), answered only after the JetStream PubAck. Keep-alive HTTP/1.1, one request at a time per \
connection. After each run the stream's message count is compared with the number of 2xx answers. \
nats-server runs with its default file-store sync policy (the PubAck means the message is in the server's \
store, flushed to disk on the server's sync interval, not fsynced per message).\n\n",
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
        md += &format!(
            "Machine: {cores} cores ({cpu}); load average before the runs: {load_before} (other work on the machine). \
Body: {} bytes. Requests per run: {} (cap {} s). Command: `{}`.\n\n",
            args.body_bytes,
            args.requests,
            args.max_seconds,
            std::env::args().collect::<Vec<_>>().join(" ")
        );
        md += "| connections | 2xx | non-2xx | errors | seconds | req/s | p50 ms | p90 ms | p99 ms | max ms | stored = 2xx |\n";
        md += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|\n";
        for o in &outcomes {
            md += &format!(
                "| {} | {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
                o.concurrency,
                o.ok,
                o.other,
                o.errors,
                o.elapsed.as_secs_f64(),
                o.ok as f64 / o.elapsed.as_secs_f64(),
                pct(&o.latencies_us, 0.5),
                pct(&o.latencies_us, 0.9),
                pct(&o.latencies_us, 0.99),
                pct(&o.latencies_us, 1.0),
                if o.stored == o.ok { "yes" } else { "NO" }
            );
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(out, md)?;
        println!("wrote {}", out.display());
    }
    drop(_gw);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! Scale benchmark of the operator (not a timed test; ignored by default):
//! 1,000 WebhookEndpoints created at once against a real kube-apiserver and
//! nats-server, with the operator binary as its own process. Prints the time
//! until all are Ready, the operator's memory, and the API writes per minute
//! once idle. Figures are recorded in docs/benchmarks/operator.md.
//!
//! ```sh
//! cargo build -p spillway-operator
//! SPILLWAY_BENCH_ENDPOINTS=1000 cargo test -p spillway-tests --test it operator_scale:: -- --ignored --nocapture
//! ```

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use spillway_api::WebhookEndpoint;
use spillway_tests::{ControlPlane, KillOnDrop, NatsServer, bin_path, free_port};

fn rss_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Mutating requests seen by the API server, by verb and resource.
async fn writes(cp: &ControlPlane) -> Result<BTreeMap<String, f64>> {
    let text = cp.kubectl_output(&["get", "--raw", "/metrics"]).await?;
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |k: &str| {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        let verb = label("verb");
        if !["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&verb.as_str()) {
            continue;
        }
        let sub = label("subresource");
        let key = format!(
            "{verb} {}{}",
            label("resource"),
            if sub.is_empty() {
                String::new()
            } else {
                format!("/{sub}")
            }
        );
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(key).or_default() += v;
    }
    Ok(out)
}

fn diff(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

#[tokio::test]
#[ignore = "benchmark: run explicitly, see the module docs"]
async fn thousand_endpoints() -> Result<()> {
    let n: usize = std::env::var("SPILLWAY_BENCH_ENDPOINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let idle_secs: u64 = std::env::var("SPILLWAY_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let cp = ControlPlane::shared().await;
    let client = cp.client().await?;
    let ns = cp.namespace("bench").await?;
    let nats = NatsServer::start().await?;
    let admin = free_port();
    let child = Command::new(bin_path("spillway-operator"))
        .env("KUBECONFIG", &cp.kubeconfig)
        .env("RUST_LOG", "warn")
        .args([
            "--nats-url",
            &nats.url,
            "--watch-namespace",
            &ns,
            "--lease-namespace",
            &ns,
        ])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .args([
            "--leader-elect",
            &std::env::var("SPILLWAY_BENCH_LEADER_ELECT").unwrap_or_else(|_| "true".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the operator binary")?;
    let pid = child.id();
    let _guard = KillOnDrop(child);
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "operator pid {pid}, idle RSS before endpoints: {:?} KiB",
        rss_kib(pid)
    );

    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let rollout_before = writes(cp).await?;
    let t0 = Instant::now();
    let created = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let ep: WebhookEndpoint = serde_json::from_value(json!({
                    "apiVersion": "spillway.dev/v1alpha1",
                    "kind": "WebhookEndpoint",
                    "metadata": {"name": format!("ep-{i:04}")},
                    "spec": {
                        "verification": {"scheme": "none"},
                        "stream": {"maxBytes": 1048576},
                        "processor": {"sink": {"url": "http://sink:8080/"}, "replicas": {"min": 0, "max": 2}},
                    },
                }))?;
                api.create(&PostParams::default(), &ep).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    for r in created {
        r?;
    }
    let t_created = t0.elapsed();
    println!("created {n} endpoints in {t_created:?}");

    let mut peak = (0, 0);
    let all_ready = loop {
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|e| {
                e.status.as_ref().is_some_and(|s| {
                    spillway_api::condition::is(
                        &s.conditions,
                        spillway_api::condition::READY,
                        spillway_api::condition::Status::True,
                    )
                })
            })
            .count();
        let rss = rss_kib(pid);
        peak = (peak.0.max(rss.0), rss.1);
        if ready == n {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("only {ready}/{n} Ready after 30 min");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    println!(
        "all {n} Ready after {all_ready:?}; RSS now/peak {:?} KiB",
        rss_kib(pid)
    );

    println!("API writes from creation until all Ready (incl. the {n} creates):");
    for (k, v) in diff(&rollout_before, &writes(cp).await?) {
        println!("  {k}: {v}");
    }

    // Let the last status writes and events settle, then measure idle.
    tokio::time::sleep(Duration::from_secs(35)).await;
    let before = writes(cp).await?;
    let status_before = status_writes(admin).await?;
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let after = writes(cp).await?;
    let status_after = status_writes(admin).await?;
    let d = diff(&before, &after);
    let per_min = 60.0 / idle_secs as f64;
    println!("idle for {idle_secs}s; API writes per minute by verb/resource:");
    for (k, v) in &d {
        println!("  {k}: {:.1}", v * per_min);
    }
    println!(
        "operator status writes per minute when idle: {:.1}",
        (status_after - status_before) * per_min
    );
    println!("operator RSS after idle: {:?} KiB", rss_kib(pid));
    Ok(())
}

async fn status_writes(port: u16) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    out.lines()
        .find(|l| l.starts_with("spillway_operator_status_writes_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .context("status writes metric")
}

//! `spillway-local` (`make run`): Spillway end to end on this machine.
//!
//! Starts the embedded control plane (kube-apiserver + etcd) and NATS from
//! the test environment, installs the CRD, runs the operator and the gateway,
//! runs the processors the operator asks for as local processes, starts a
//! demo sink, applies `examples/` (sinks pointed at the demo sink), sends
//! signed sample webhooks and a few bad ones, and prints what happened. Then
//! it keeps running until Ctrl-C and cleans up after itself.
#![forbid(unsafe_code)]

mod demo;
mod kubelet;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use kube::{Api, ResourceExt};
use spillway_api::{WebhookEndpoint, WebhookListener};
use spillway_tests::{ControlPlane, NatsServer, bin_path, free_port, root};

#[derive(Parser)]
#[command(
    name = "spillway-local",
    about = "Run Spillway end to end on this machine"
)]
struct Args {
    /// Port of the gateway (webhooks go to http://127.0.0.1:PORT/<path>).
    #[arg(long, env = "SPILLWAY_LOCAL_PORT", default_value_t = 8080)]
    port: u16,
    /// Exit after the demo instead of running until Ctrl-C (used by tests).
    #[arg(long)]
    exit_after_demo: bool,
    /// Folder of example manifests to apply.
    #[arg(long)]
    examples: Option<PathBuf>,
}

const NAMESPACE: &str = "demo";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..30 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(bin: &str, env: &[(&str, String)], log: PathBuf) -> Result<Proc> {
    let out = std::fs::File::create(&log)?;
    let child = Command::new(bin_path(bin))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {bin}"))?;
    spillway_tests::watchdog(child.id());
    Ok(Proc(child))
}

/// What `spillway attempts` prints for `id` (the real CLI), once the
/// records are there (they are written just after each attempt).
async fn attempts(endpoint: &str, id: &str, nats_url: &str) -> String {
    let mut text = String::new();
    for _ in 0..25 {
        let out = tokio::process::Command::new(bin_path("spillway"))
            .args(["attempts", endpoint, "--id", id])
            .env("NATS_URL", nats_url)
            .env_remove("NATS_CREDS")
            .stdin(Stdio::null())
            .output()
            .await;
        text = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => format!("spillway attempts: {e}"),
        };
        if text.starts_with("LISTENER") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn step(msg: &str) {
    println!("==> {msg}");
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Before anything starts: a taken port would only show later as every
    // sample failing.
    if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", args.port)) {
        bail!(
            "port {} on 127.0.0.1 is not free for the gateway ({e}); \
             pick another with SPILLWAY_LOCAL_PORT=PORT make run",
            args.port
        );
    }
    let started = Instant::now();
    let run_dir = tempfile::Builder::new()
        .prefix("spillway-local-")
        .tempdir()?;
    let logs = run_dir.path().to_path_buf();

    step("starting the local control plane (kube-apiserver + etcd) and NATS JetStream");
    let (cp, nats) = tokio::try_join!(ControlPlane::start(), NatsServer::start())?;
    cp.install_crd().await?;
    let client = cp.client().await?;
    let kubeconfig = cp.kubeconfig.display().to_string();

    step("starting the operator and the gateway");
    let gateway_addr: SocketAddr = ([127, 0, 0, 1], args.port).into();
    let common = vec![
        ("KUBECONFIG", kubeconfig.clone()),
        ("SPILLWAY_NATS_URL", nats.url.clone()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let mut op_env = common.clone();
    op_env.extend([
        ("SPILLWAY_PROCESSOR_NATS_URL", nats.url.clone()),
        ("SPILLWAY_ADMIN_ADDR", format!("127.0.0.1:{}", free_port())),
        ("SPILLWAY_LEADER_ELECT", "false".to_owned()),
        ("POD_NAMESPACE", "default".to_owned()),
        ("SPILLWAY_RESYNC_INTERVAL", "3s".to_owned()),
        ("SPILLWAY_SCALE_DOWN_COOLDOWN", "1m".to_owned()),
    ]);
    let _operator = spawn("spillway-operator", &op_env, logs.join("operator.log"))?;
    let mut gw_env = common.clone();
    gw_env.extend([
        ("SPILLWAY_GATEWAY_LISTEN", gateway_addr.to_string()),
        (
            "SPILLWAY_GATEWAY_ADMIN_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("SPILLWAY_GATEWAY_SOURCE", "kubernetes".to_owned()),
        ("SPILLWAY_GATEWAY_LOG_FORMAT", "text".to_owned()),
    ]);
    let _gateway = spawn("spillway-gateway", &gw_env, logs.join("gateway.log"))?;

    let kubelet = kubelet::LocalKubelet::new(
        client.clone(),
        bin_path("spillway-processor"),
        nats.url.clone(),
        logs.clone(),
    );
    let kubelet_task = tokio::spawn(kubelet.run());

    step("starting the demo sink");
    let sink = demo::Sink::default();
    let sink_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_url = format!("http://{}", sink_listener.local_addr()?);
    let sink_task = tokio::spawn(sink.clone().serve(sink_listener));

    step(&format!("applying examples/ in namespace {NAMESPACE:?}"));
    cp.kubectl_output(&["create", "namespace", NAMESPACE])
        .await?;
    let dir = args.examples.unwrap_or_else(|| root().join("examples"));
    let examples = demo::load_examples(&dir, NAMESPACE, &sink_url)?;
    for ex in &examples {
        for doc in &ex.docs {
            cp.kubectl_stdin(&["apply", "-n", NAMESPACE, "-f", "-"], &doc.to_string())
                .await
                .with_context(|| format!("applying example {}", ex.name))?;
        }
    }
    let api: Api<WebhookEndpoint> = Api::namespaced(client.clone(), NAMESPACE);
    wait_ready(&api, examples.len(), Duration::from_secs(120)).await?;
    let listeners: Api<WebhookListener> = Api::namespaced(client.clone(), NAMESPACE);
    let n = examples.iter().map(|e| e.listeners.len()).sum();
    wait_listeners_ready(&listeners, n, Duration::from_secs(60)).await?;
    // The gateway watches the same objects; give it a moment to route them.
    wait_routed(gateway_addr, &examples).await;

    step("sending sample webhooks through the gateway");
    let samples = demo::samples(&examples);
    let mut wrong = 0;
    println!(
        "  {:<18} {:<38} {:>6}  RESULT",
        "ENDPOINT", "CASE", "STATUS"
    );
    for s in &samples {
        let (status, body) = demo::send(gateway_addr, s).await?;
        let ok = if s.expect == 0 {
            (200..300).contains(&status)
        } else {
            status == s.expect
        };
        let verdict = match (ok, (200..300).contains(&status)) {
            (true, true) => "accepted".to_owned(),
            (true, false) => format!("rejected as expected {}", body.trim()),
            (false, _) => {
                wrong += 1;
                format!("UNEXPECTED {}", body.trim())
            }
        };
        println!(
            "  {:<18} {:<38} {:>6}  {}",
            s.endpoint, s.case, status, verdict
        );
    }

    let expected: usize = samples.iter().map(|s| s.delivers).sum();
    step(&format!(
        "waiting for {expected} deliveries at the demo sink (capped, retried processors)"
    ));
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.total() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("  {:<18} {:>9}", "ENDPOINT", "DELIVERED");
    for (name, n) in sink.snapshot() {
        println!("  {name:<18} {n:>9}");
    }
    let delivered = sink.total();
    println!(
        "delivered: {delivered} of {expected} accepted webhooks; {} of {} requests answered as expected",
        samples.len() - wrong,
        samples.len()
    );
    if let Some(gh) = examples.iter().find(|e| e.scheme == "github") {
        let ep = format!("{NAMESPACE}/{}", gh.name);
        step(&format!(
            "the attempts of one webhook: spillway attempts {ep} --id {}",
            demo::RETRIED_ID
        ));
        println!("{}", attempts(&ep, demo::RETRIED_ID, &nats.url).await);
    }
    println!(
        "\nSpillway is running ({:.0}s to start).\n  gateway     http://{gateway_addr}/<path>   (paths: {})\n  kubectl     KUBECONFIG={kubeconfig} .tools/bin/kubectl get whe -A\n  NATS        {}\n  logs        {}\n",
        started.elapsed().as_secs_f64(),
        examples
            .iter()
            .map(|e| e.path.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        nats.url,
        logs.display(),
    );
    let healthy = wrong == 0 && delivered == expected;
    if args.exit_after_demo {
        kubelet_task.abort();
        sink_task.abort();
        if !healthy {
            bail!(
                "the demo did not go as expected; logs are in {}",
                logs.display()
            );
        }
        println!("demo: {} passed, 0 failed", samples.len());
        return Ok(());
    }
    println!("Press Ctrl-C to stop and clean up.");
    tokio::signal::ctrl_c().await?;
    step("stopping");
    kubelet_task.abort();
    sink_task.abort();
    Ok(())
}

/// Wait until `n` listeners report Ready=True.
async fn wait_listeners_ready(
    api: &Api<WebhookListener>,
    n: usize,
    timeout: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let all = api.list(&Default::default()).await?.items;
        let ready = all
            .iter()
            .filter(|l| {
                l.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                })
            })
            .count();
        if ready >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            for l in &all {
                eprintln!(
                    "  listener {}: {}",
                    l.name_any(),
                    serde_json::to_string(&l.status).unwrap_or_default()
                );
            }
            bail!("{ready} of {n} listeners became Ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Wait until `n` endpoints report Ready=True; print their conditions if not.
async fn wait_ready(api: &Api<WebhookEndpoint>, n: usize, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let list = api.list(&Default::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|e| is_true(e, spillway_api::condition::READY))
            .count();
        if ready >= n {
            println!("  {ready} endpoints Ready");
            return Ok(());
        }
        if start.elapsed() > timeout {
            for e in &list.items {
                let conds = e.status.as_ref().map(|s| &s.conditions);
                println!("  {}: {:?}", e.name_any(), conds);
            }
            bail!("only {ready} of {n} endpoints became Ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn is_true(e: &WebhookEndpoint, ty: &str) -> bool {
    e.status.as_ref().is_some_and(|s| {
        spillway_api::condition::is(&s.conditions, ty, spillway_api::condition::Status::True)
    })
}

/// Wait (bounded) until the gateway knows every example's path.
async fn wait_routed(gateway: SocketAddr, examples: &[demo::Example]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    // An unsigned probe is refused (401) once routed; an unauthenticated
    // endpoint would accept it, so it is not probed.
    for ex in examples.iter().filter(|e| e.scheme != "none") {
        let probe = demo::Sample {
            endpoint: ex.name.clone(),
            case: "probe",
            path: ex.path.clone(),
            headers: vec![],
            body: b"{}".to_vec(),
            expect: 0,
            delivers: 0,
        };
        while Instant::now() < deadline {
            match demo::send(gateway, &probe).await {
                Ok((404, _)) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                Ok(_) => break,
            }
        }
    }
}

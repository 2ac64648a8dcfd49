//! Spillway's test harness: real servers, started per test (NATS) or once per
//! test program (kube-apiserver + etcd), on random loopback ports, in temp dirs.
//!
//! The binaries come from `.tools/bin`, installed by `hack/install-tools.sh`.
//! Every child process is also watched by a tiny shell watchdog that kills it
//! when the test binary exits, so nothing outlives a test run even when a
//! shared server is held in a static.
#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;
use tokio::sync::OnceCell;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Path of a pinned tool in `.tools/bin`; panics with the fix when missing.
pub fn tool(name: &str) -> PathBuf {
    let p = root().join(".tools/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run hack/install-tools.sh (or `make tools`)",
        p.display()
    );
    p
}

/// Path of a workspace binary built into the shared target dir (build it
/// first, e.g. `cargo build -p spillway-processor`; `make test` does).
pub fn bin_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --bins` first",
        p.display()
    );
    p
}

/// Target labels Prometheus Operator puts on every series it scrapes
/// through a ServiceMonitor or PodMonitor. A metric's own label of the same
/// name is renamed `exported_<name>` (unless `honorLabels`), which breaks
/// dashboards and alerts written against it.
pub const PROMETHEUS_OPERATOR_TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "service",
    "pod",
    "container",
    "endpoint",
];

/// Fail when a series of the Prometheus text `exposition` has a label that
/// Prometheus Operator reserves ([`PROMETHEUS_OPERATOR_TARGET_LABELS`]).
pub fn check_metric_labels(exposition: &str) -> Result<()> {
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let Some(labels) = line
            .split_once('{')
            .and_then(|(_, rest)| rest.rsplit_once('}'))
            .map(|(l, _)| l)
        else {
            continue;
        };
        for pair in labels.split(',') {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
            if PROMETHEUS_OPERATOR_TARGET_LABELS.contains(&name) {
                bail!("label {name:?} is one Prometheus Operator sets itself: {line}");
            }
        }
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound then released).
///
/// Ports come from 20000–31999, below Linux's ephemeral range (32768 and
/// up), so no outgoing connection of this or another process can take one
/// between this check and the server's bind (a port from `bind(:0)` could:
/// that made a kube-apiserver fail with "address already in use" in CI).
/// Each process starts at its own offset and walks the range, so two
/// suites on one machine rarely meet either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const BASE: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (BASE + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Kill `child_pid` once this process is gone (covers statics, panics and
/// aborted runs; a normal Drop kills earlier). The watchdog ends with the
/// child, so it never signals a process that later reuses the pid.
pub fn watchdog(child_pid: u32) {
    let me = std::process::id();
    sh_background(format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {child_pid} 2>/dev/null; do sleep 0.5; done; \
         kill -0 {me} 2>/dev/null || kill -9 {child_pid} 2>/dev/null"
    ));
}

/// Remove `dir` once this process is gone: statics (the shared control
/// plane) are never dropped, and etcd pre-allocates ~130 MB in each.
fn remove_when_gone(dir: &Path) {
    let me = std::process::id();
    let dir = dir.display().to_string().replace('\'', "");
    sh_background(format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; sleep 1; rm -rf '{dir}'"
    ));
}

fn sh_background(script: String) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    watchdog(child.id());
    Ok(child)
}

/// Kills and reaps a child process when dropped (a failed assertion
/// included), e.g. a binary a test starts itself.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// The last lines of a log file, for error messages.
fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// The documents of a multi-document YAML stream (`helm template` output,
/// an example file) as JSON values; empty documents are skipped.
pub fn yaml_documents(yaml: &str) -> Result<Vec<serde_json::Value>> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml)?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

/// Poll `f` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A real nats-server with JetStream, on a random port, with a temp store.
pub struct NatsServer {
    /// `nats://127.0.0.1:PORT`
    pub url: String,
    /// The client port.
    pub port: u16,
    dir: TempDir,
    child: Option<Child>,
    /// Extra configuration appended to the generated file.
    extra: Option<String>,
    /// JetStream store encryption key (`cipher: chachapoly`), if any.
    cipher_key: Option<String>,
}

impl NatsServer {
    /// Start a server whose JetStream store is encrypted at rest
    /// (`cipher: chachapoly` with `key`).
    pub async fn start_encrypted(key: &str) -> Result<Self> {
        Self::start_inner(None, Some(key.to_owned())).await
    }

    /// The JetStream store directory (its files, for tests that look at
    /// what is on disk).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// Start a server and wait until it accepts connections.
    pub async fn start() -> Result<Self> {
        Self::start_inner(None, None).await
    }

    /// Start a server whose configuration file also holds `extra` (e.g. an
    /// `authorization { ... }` or `tls { ... }` block), and wait until it
    /// greets clients (its `INFO` line: a plain client may not be allowed
    /// to connect). [`client`](Self::client) and
    /// [`jetstream`](Self::jetstream) connect without credentials, so they
    /// only work when `extra` lets such clients in.
    pub async fn start_with(extra: &str) -> Result<Self> {
        Self::start_inner(Some(extra.to_owned()), None).await
    }

    async fn start_inner(extra: Option<String>, cipher_key: Option<String>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-nats-")
            .tempdir()?;
        let port = free_port();
        let mut s = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            dir,
            child: None,
            extra,
            cipher_key,
        };
        s.spawn().await?;
        Ok(s)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        // max_payload above the gateway's largest body (8 MiB) plus headers.
        // JetStream reserves every stream's maxBytes (1 GiB by default, the
        // dead-letter stream too) against max_file_store, which otherwise
        // defaults to 75% of the free disk: a dozen endpoints would then be
        // rejected on a machine with a small disk. Tests store little, so
        // the limit is set far above what they reserve.
        let conf = self.dir.path().join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{}\nmax_payload: 9MB\njetstream {{ store_dir: {:?}, max_file_store: 1T{} }}\n{}\n",
                self.port,
                self.dir.path().join("js"),
                self.cipher_key
                    .as_deref()
                    .map(|k| format!(", cipher: chachapoly, key: {k:?}"))
                    .unwrap_or_default(),
                self.extra.as_deref().unwrap_or_default()
            ),
        )?;
        let log = self.dir.path().join("nats.log");
        let mut cmd = Command::new(tool("nats-server"));
        cmd.arg("-c").arg(&conf);
        self.child = Some(spawn_logged(cmd, &log)?);
        let url = self.url.clone();
        let port = self.port;
        let greets = self.extra.is_some();
        eventually(Duration::from_secs(10), "nats-server to accept", || {
            let url = url.clone();
            async move {
                if greets {
                    sends_info(port).await
                } else {
                    async_nats::connect(url).await.is_ok()
                }
            }
        })
        .await
        .with_context(|| format!("nats-server did not start:\n{}", tail(&log)))
    }

    /// Stop the server (SIGKILL); the store stays for [`restart`](Self::restart).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Start again on the same port with the same store.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.spawn().await
    }

    /// A client connection.
    pub async fn client(&self) -> Result<async_nats::Client> {
        Ok(async_nats::connect(&self.url).await?)
    }

    /// A JetStream context on a fresh connection.
    pub async fn jetstream(&self) -> Result<async_nats::jetstream::Context> {
        Ok(async_nats::jetstream::new(self.client().await?))
    }
}

/// Whether a NATS server on `port` sends its `INFO` greeting.
async fn sends_info(port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
        Ok(Ok(_))
    ) && &buf == b"INFO"
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real kube-apiserver backed by a real etcd, with the Spillway CRD
/// installed. One per test program ([`ControlPlane::shared`]); tests isolate
/// themselves with their own namespaces.
pub struct ControlPlane {
    /// Kubeconfig file for kubectl, helm and kube::Client.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`
    pub server: String,
    dir: TempDir,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// The kube-apiserver's arguments, to start it again.
    api_args: Vec<std::ffi::OsString>,
}

static SHARED: OnceCell<ControlPlane> = OnceCell::const_new();

const TOKEN: &str = "spillway-test-token";

impl ControlPlane {
    /// The control plane shared by every test in this binary (started on
    /// first use, with the CRD installed; killed when the binary exits).
    pub async fn shared() -> &'static ControlPlane {
        SHARED
            .get_or_init(|| async {
                let cp = ControlPlane::start()
                    .await
                    .expect("test control plane starts");
                cp.install_crd().await.expect("CRD installs");
                cp
            })
            .await
    }

    /// Start etcd and kube-apiserver and wait for `/readyz`.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-kube-")
            .tempdir()?;
        remove_when_gone(dir.path());
        let d = dir.path();
        let (etcd_port, peer_port, api_port) = (free_port(), free_port(), free_port());

        let mut etcd = Command::new(tool("etcd"));
        etcd.args([
            "--name",
            "default",
            "--unsafe-no-fsync",
            "--log-level",
            "warn",
        ])
        .arg("--data-dir")
        .arg(d.join("etcd"))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
        .arg(format!(
            "--advertise-client-urls=http://127.0.0.1:{etcd_port}"
        ))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
        ))
        .arg(format!(
            "--initial-cluster=default=http://127.0.0.1:{peer_port}"
        ));
        let etcd = spawn_logged(etcd, &d.join("etcd.log"))?;

        std::fs::write(
            d.join("tokens.csv"),
            format!("{TOKEN},admin,admin,system:masters\n"),
        )?;
        let sa_key = d.join("sa.key");
        let st = tokio::process::Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&sa_key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .await
            .context("openssl genrsa (is openssl installed?)")?;
        if !st.success() {
            bail!("openssl genrsa failed");
        }
        let mut api = Command::new(tool("kube-apiserver"));
        api.arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
            .arg(format!("--secure-port={api_port}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--cert-dir={}", d.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                d.join("tokens.csv").display()
            ))
            .args([
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.96.0.0/24",
            ])
            .arg(format!("--service-account-key-file={}", sa_key.display()))
            .arg(format!(
                "--service-account-signing-key-file={}",
                sa_key.display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .args([
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
            ]);
        let api_args = api.get_args().map(ToOwned::to_owned).collect();
        let apiserver = spawn_logged(api, &d.join("apiserver.log"))?;

        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context: {{cluster: test, user: admin, namespace: default}}\ncurrent-context: test\n"
            ),
        )?;
        let mut cp = Self {
            kubeconfig,
            server,
            dir,
            etcd: Some(etcd),
            apiserver: Some(apiserver),
            api_args,
        };
        let start = Instant::now();
        loop {
            let ready = cp
                .kubectl_output(&["get", "--raw", "/readyz"])
                .await
                .is_ok_and(|o| o.trim() == "ok");
            if ready {
                break;
            }
            for (name, child) in [
                ("etcd", &mut cp.etcd),
                ("kube-apiserver", &mut cp.apiserver),
            ] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    let log = cp
                        .dir
                        .path()
                        .join(format!("{}.log", name.trim_start_matches("kube-")));
                    bail!("{name} exited ({status}) while starting:\n{}", tail(&log));
                }
            }
            if start.elapsed() > Duration::from_secs(90) {
                bail!(
                    "kube-apiserver not ready after 90s:\n{}",
                    tail(&cp.dir.path().join("apiserver.log"))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cp)
    }

    /// SIGKILL the kube-apiserver (etcd keeps the data).
    pub fn kill_apiserver(&mut self) {
        kill(&mut self.apiserver);
    }

    /// Start the kube-apiserver again with the same arguments and wait for
    /// `/readyz`.
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        kill(&mut self.apiserver);
        let mut api = Command::new(tool("kube-apiserver"));
        api.args(&self.api_args);
        self.apiserver = Some(spawn_logged(
            api,
            &self.dir.path().join("apiserver-restarted.log"),
        )?);
        let this = &*self;
        eventually(
            Duration::from_secs(90),
            "kube-apiserver ready again",
            || async move {
                this.kubectl_output(&["get", "--raw", "/readyz"])
                    .await
                    .is_ok_and(|o| o.trim() == "ok")
            },
        )
        .await
    }

    /// A kubectl command using this control plane (async: tests run on
    /// tokio, whose threads a blocking wait would hold).
    pub fn kubectl(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(tool("kubectl"));
        c.env("KUBECONFIG", &self.kubeconfig).kill_on_drop(true);
        c
    }

    /// A helm command using this control plane.
    pub fn helm(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(tool("helm"));
        c.env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm/data"))
            .kill_on_drop(true);
        c
    }

    /// Run kubectl with `args`; stdout on success, stderr as the error.
    pub async fn kubectl_output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .kubectl()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
        }
    }

    /// Run kubectl with `args`, feeding `stdin`.
    pub async fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut input = child.stdin.take().expect("piped stdin");
        input.write_all(stdin.as_bytes()).await?;
        drop(input);
        let out = child.wait_with_output().await?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
        }
    }

    /// A client for the current tokio runtime.
    pub async fn client(&self) -> Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Install (or update) the generated CRDs and wait until they are
    /// served.
    pub async fn install_crd(&self) -> Result<()> {
        for (file, yaml) in spillway_api::crd_files()? {
            self.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &yaml)
                .await?;
            let name = file.trim_end_matches(".yaml");
            self.kubectl_output(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{name}"),
            ])
            .await?;
        }
        Ok(())
    }

    /// Create a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.kubectl_output(&["create", "namespace", &name]).await?;
        Ok(name)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The apiserver first: stopping etcd under it makes its shutdown hang.
        kill(&mut self.apiserver);
        kill(&mut self.etcd);
    }
}

/// Connect to the first reachable of comma-separated NATS URLs.
pub async fn connect_any(urls: &str) -> Result<async_nats::Client> {
    let servers = urls
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(async_nats::connect(servers).await?)
}

/// A cluster of real nats-servers with JetStream on loopback (the pinned
/// binary), for streams and consumers with replicas. Nodes can be killed
/// (SIGKILL) and restarted on the same ports and stores.
pub struct NatsCluster {
    /// `nats://127.0.0.1:P1,nats://127.0.0.1:P2,…`: clients fail over.
    pub url: String,
    dir: TempDir,
    ports: Vec<(u16, u16)>,
    children: Vec<Option<Child>>,
}

impl NatsCluster {
    /// Start `n` nodes named `n0`…, routed to each other, and wait until
    /// JetStream has a meta leader.
    pub async fn start(n: usize) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-natsc-")
            .tempdir()?;
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let url = ports
            .iter()
            .map(|(p, _)| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            url,
            dir,
            children: (0..n).map(|_| None).collect(),
            ports,
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        let url = c.url.clone();
        let last = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let seen = last.clone();
        eventually(Duration::from_secs(30), "JetStream cluster ready", || {
            let (url, last) = (url.clone(), last.clone());
            async move {
                let client = match connect_any(&url).await {
                    Ok(c) => c,
                    Err(e) => {
                        *last.lock().unwrap() = e.to_string();
                        return false;
                    }
                };
                match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => true,
                    Err(e) => {
                        *last.lock().unwrap() = e.to_string();
                        false
                    }
                }
            }
        })
        .await
        .with_context(|| {
            format!(
                "cluster did not form ({}):\n{}",
                seen.lock().unwrap(),
                c.log(0)
            )
        })?;
        Ok(c)
    }

    /// The server name of node `i`.
    pub fn name(i: usize) -> String {
        format!("n{i}")
    }

    /// Node `i`'s log so far.
    pub fn log(&self, i: usize) -> String {
        tail(&self.dir.path().join(format!("n{i}.log")))
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let (port, cport) = self.ports[i];
        let routes = self
            .ports
            .iter()
            .map(|(_, c)| format!("nats-route://127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // One node: a plain server (a cluster block would wait for peers).
        let cluster = if self.ports.len() > 1 {
            format!("cluster {{ name: spillway, listen: 127.0.0.1:{cport}, routes: [{routes}] }}\n")
        } else {
            String::new()
        };
        let conf = self.dir.path().join(format!("n{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{port}\nmax_payload: 9MB\n\
                 jetstream {{ store_dir: {:?}, max_file_store: 1T }}\n{cluster}",
                self.dir.path().join(format!("js{i}")),
            ),
        )?;
        let mut cmd = Command::new(tool("nats-server"));
        cmd.arg("-c").arg(&conf);
        self.children[i] = Some(spawn_logged(
            cmd,
            &self.dir.path().join(format!("n{i}.log")),
        )?);
        Ok(())
    }

    /// SIGKILL node `i` (its store stays).
    pub fn kill(&mut self, i: usize) {
        kill(&mut self.children[i]);
    }

    /// Start node `i` again on its ports and store, and wait until it
    /// accepts clients.
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        let url = format!("nats://127.0.0.1:{}", self.ports[i].0);
        eventually(Duration::from_secs(15), "restarted node accepts", || {
            let url = url.clone();
            async move { async_nats::connect(url).await.is_ok() }
        })
        .await
    }

    /// The index of the node that leads stream `name` now.
    pub async fn leader_of(&self, name: &str) -> Result<usize> {
        let js = async_nats::jetstream::new(connect_any(&self.url).await?);
        let mut s = js.get_stream(name).await?;
        let info = s.info().await?;
        if self.ports.len() == 1 {
            return Ok(0);
        }
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .context("stream has no leader")?;
        leader
            .strip_prefix('n')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unknown leader {leader}"))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            kill(c);
        }
    }
}

/// A message as the gateway stored it (either stored format,
/// `spillway_api::stored`): the webhook's metadata and headers, and its body.
pub fn stored_webhook(
    m: &async_nats::jetstream::message::StreamMessage,
) -> Result<(spillway_api::stored::Webhook, Vec<u8>)> {
    let w = spillway_api::stored::decode(Some(&m.headers), &m.payload)?;
    let body = w.body(&m.payload).to_vec();
    Ok((w, body))
}

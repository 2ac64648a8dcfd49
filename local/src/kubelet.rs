//! A stand-in for the kubelet: runs the processor Deployments the operator
//! creates as local processes (there are no nodes locally), keeps their count
//! at the Deployment's replicas, restarts them when the pod template changes,
//! and reports them ready in the Deployment's status so the operator's
//! ProcessorReady condition works as in a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spillway_api::wire::{PROCESSOR_CONFIG_ENV, ProcessorConfig};

/// Where the operator mounts the signing Secret in a processor pod.
const SIGNING_DIR: &str = "/var/run/spillway/signing";
const SELECTOR: &str = "app.kubernetes.io/managed-by=spillway-operator";

struct Running {
    template_hash: String,
    children: Vec<Child>,
}

/// Runs processor Deployments as local processes.
pub struct LocalKubelet {
    client: Client,
    processor_bin: PathBuf,
    nats_url: String,
    dir: PathBuf,
    running: BTreeMap<String, Running>,
}

impl LocalKubelet {
    pub fn new(client: Client, processor_bin: PathBuf, nats_url: String, dir: PathBuf) -> Self {
        Self {
            client,
            processor_bin,
            nats_url,
            dir,
            running: BTreeMap::new(),
        }
    }

    /// Reconcile every second until the task is dropped.
    pub async fn run(mut self) {
        loop {
            if let Err(e) = self.sync().await {
                eprintln!("local kubelet: {e:#}");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Total processor processes running now.
    async fn sync(&mut self) -> Result<()> {
        let api: Api<Deployment> = Api::all(self.client.clone());
        let list = api.list(&ListParams::default().labels(SELECTOR)).await?;
        let mut seen = Vec::new();
        for d in list {
            let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
            seen.push(key.clone());
            let want = d.spec.replicas.unwrap_or(1).max(0) as usize;
            let hash = template_hash(&d);
            let entry = self.running.entry(key.clone()).or_insert_with(|| Running {
                template_hash: hash.clone(),
                children: Vec::new(),
            });
            // Reap exited processes (a crashed processor is restarted, like a pod).
            entry
                .children
                .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
            if entry.template_hash != hash {
                stop_all(&mut entry.children);
                entry.template_hash = hash;
            }
            while entry.children.len() > want {
                if let Some(mut c) = entry.children.pop() {
                    stop(&mut c);
                }
            }
            let mut started = 0;
            while entry.children.len() < want {
                let n = entry.children.len();
                let child = spawn_processor(
                    &self.client,
                    &d,
                    &self.processor_bin,
                    &self.nats_url,
                    &self.dir,
                    n,
                )
                .await
                .with_context(|| format!("starting a processor for {key}"))?;
                entry.children.push(child);
                started += 1;
            }
            let ready = entry.children.len() as i32;
            let observed = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            let gen_seen = d.status.as_ref().and_then(|s| s.observed_generation);
            if started > 0 || observed != ready || gen_seen != d.metadata.generation {
                let ns_api: Api<Deployment> =
                    Api::namespaced(self.client.clone(), &d.namespace().unwrap_or_default());
                let status = json!({"status": {
                    "observedGeneration": d.metadata.generation,
                    "replicas": ready, "readyReplicas": ready,
                    "availableReplicas": ready, "updatedReplicas": ready
                }});
                ns_api
                    .patch_status(
                        &d.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await?;
            }
        }
        self.running.retain(|k, r| {
            let keep = seen.contains(k);
            if !keep {
                stop_all(&mut r.children);
            }
            keep
        });
        Ok(())
    }
}

impl Drop for LocalKubelet {
    fn drop(&mut self) {
        for r in self.running.values_mut() {
            stop_all(&mut r.children);
        }
    }
}

fn template_hash(d: &Deployment) -> String {
    serde_json::to_string(&d.spec.template).unwrap_or_default()
}

fn stop(c: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &c.id().to_string()])
        .status();
    for _ in 0..50 {
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn stop_all(children: &mut Vec<Child>) {
    for mut c in children.drain(..) {
        stop(&mut c);
    }
}

async fn spawn_processor(
    client: &Client,
    d: &Deployment,
    bin: &Path,
    nats_url: &str,
    dir: &Path,
    index: usize,
) -> Result<Child> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let pod = d
        .spec
        .template
        .spec
        .as_ref()
        .context("deployment without a pod spec")?;
    let container = pod
        .containers
        .iter()
        .find(|c| c.name == "processor")
        .context("deployment without a processor container")?;
    let mut env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
        .collect();
    env.insert(spillway_api::nats::env::URL.into(), nats_url.into());
    env.insert(
        "SPILLWAY_ADMIN_ADDR".into(),
        format!("127.0.0.1:{}", spillway_tests::free_port()),
    );
    // The signing Secret is a volume in a pod; locally it becomes a file.
    if let Some(raw) = env.get(PROCESSOR_CONFIG_ENV).cloned() {
        let mut cfg: ProcessorConfig = serde_json::from_str(&raw)?;
        if let Some(file) = cfg.signing_secret_file.clone() {
            let secret_name = pod
                .volumes
                .iter()
                .flatten()
                .find_map(|v| v.secret.as_ref().and_then(|s| s.secret_name.clone()))
                .context("signing configured but no Secret volume")?;
            let key = file.trim_start_matches(SIGNING_DIR).trim_start_matches('/');
            let secret = Api::<Secret>::namespaced(client.clone(), &ns)
                .get(&secret_name)
                .await?;
            let value = secret
                .data
                .and_then(|mut d| d.remove(key))
                .with_context(|| format!("Secret {ns}/{secret_name} has no key {key}"))?;
            let local = dir.join("signing").join(&ns).join(&name);
            std::fs::create_dir_all(&local)?;
            let path = local.join(key);
            std::fs::write(&path, value.0)?;
            cfg.signing_secret_file = Some(path.display().to_string());
            env.insert(PROCESSOR_CONFIG_ENV.into(), serde_json::to_string(&cfg)?);
        }
    }
    let log = dir.join(format!("processor-{ns}-{name}-{index}.log"));
    let out = std::fs::File::create(&log)?;
    let child = Command::new(bin)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    spillway_tests::watchdog(child.id());
    Ok(child)
}

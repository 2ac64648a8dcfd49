//! GitOps behaviour with the real kubectl against a real kube-apiserver and
//! the operator: `kubectl wait --for=condition=Ready` works on every example,
//! applying the same manifests again changes nothing (the operator writes
//! status, a finalizer and nothing else of the user's objects), and
//! `kubectl diff` sees no drift.

use std::time::Duration;

use crate::operator_support::operator_settings;
use anyhow::{Context as _, Result, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use spillway_api::WebhookEndpoint;
use spillway_tests::{ControlPlane, NatsServer, root};

/// Name, resourceVersion and generation of every WebhookEndpoint, Secret
/// and processor Deployment in `ns`.
async fn versions(client: &kube::Client, ns: &str) -> Result<Vec<(String, String, i64)>> {
    let mut out = Vec::new();
    let whe: Api<WebhookEndpoint> = Api::namespaced(client.clone(), ns);
    for e in whe.list(&ListParams::default()).await? {
        out.push((
            format!("whe/{}", e.name_any()),
            e.resource_version().unwrap_or_default(),
            e.metadata.generation.unwrap_or_default(),
        ));
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for s in secrets.list(&ListParams::default()).await? {
        out.push((
            format!("secret/{}", s.name_any()),
            s.resource_version().unwrap_or_default(),
            0,
        ));
    }
    let deploy: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in deploy.list(&ListParams::default()).await? {
        out.push((
            format!("deploy/{}", d.name_any()),
            d.resource_version().unwrap_or_default(),
            d.metadata.generation.unwrap_or_default(),
        ));
    }
    out.sort();
    Ok(out)
}

/// No kubelet runs here: report every processor Deployment as rolled out.
async fn kubelet_stand_in(client: &kube::Client, ns: &str) -> Result<()> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for d in api.list(&ListParams::default()).await? {
        let want = d.spec.replicas.unwrap_or(1);
        let status = d.status.clone().unwrap_or_default();
        if status.ready_replicas.unwrap_or(0) != want
            || status.observed_generation != d.metadata.generation
        {
            api.patch_status(
                &d.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "observedGeneration": d.metadata.generation,
                    "replicas": want,
                    "updatedReplicas": want,
                    "readyReplicas": want,
                    "availableReplicas": want,
                }})),
            )
            .await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn examples_become_ready_and_a_second_apply_changes_nothing() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("gitops").await?;
    let client = cp.client().await?;
    let nats = NatsServer::start().await?;
    let settings = operator_settings(&nats.url, &ns);
    let op = spillway_operator::start(settings, client.clone()).await?;
    let examples = root().join("examples");
    let examples = examples.to_str().context("utf-8 path")?;

    let first = cp
        .kubectl_output(&["apply", "-n", &ns, "-f", examples])
        .await?;
    ensure!(first.contains("created"), "first apply: {first}");

    // `kubectl wait` on every endpoint, while a stand-in kubelet marks the
    // processor Deployments available.
    let mut waiter = cp
        .kubectl()
        .args([
            "wait",
            "-n",
            &ns,
            "--for=condition=Ready",
            "whe",
            "--all",
            "--timeout=60s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let waited = loop {
        kubelet_stand_in(&client, &ns).await?;
        if let Some(status) = waiter.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let out = waiter.wait_with_output().await?;
    if !waited.success() {
        let whe: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
        let mut conditions = String::new();
        for e in whe.list(&ListParams::default()).await? {
            let c = e
                .status
                .as_ref()
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            conditions.push_str(&format!(
                "{}: {}\n",
                e.name_any(),
                serde_json::to_string(&c)?
            ));
        }
        anyhow::bail!(
            "kubectl wait failed: {}{}\n{conditions}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let met = String::from_utf8_lossy(&out.stdout);
    let count = std::fs::read_dir(root().join("examples"))?.count();
    ensure!(
        met.matches("condition met").count() == count,
        "one `condition met` per example ({count}): {met}"
    );

    // Settled: a second apply of the same files is a no-op for every object,
    // and nothing the user applied was changed by the operator.
    let before = versions(&client, &ns).await?;
    let second = cp
        .kubectl_output(&["apply", "-n", &ns, "-f", examples])
        .await?;
    for line in second.lines() {
        // kubectl reports Secrets written with `stringData` as "configured"
        // on every apply (it cannot compare them); the resourceVersion check
        // below shows they did not change either.
        ensure!(
            line.ends_with(" unchanged") || line.starts_with("secret/"),
            "second apply changed: {line}"
        );
    }
    let diff = cp
        .kubectl()
        .args(["diff", "-n", &ns, "-f", examples])
        .output()
        .await?;
    ensure!(
        diff.status.success(),
        "kubectl diff found drift: {}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    // Two resyncs later nothing has been written either.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = versions(&client, &ns).await?;
    ensure!(before == after, "objects changed:\n{before:?}\n{after:?}");

    // The operator owns status and its finalizer, never the spec.
    let whe: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    for e in whe.list(&ListParams::default()).await? {
        for mf in e.managed_fields() {
            if mf.manager.as_deref() != Some("spillway-operator") {
                continue;
            }
            let fields = mf
                .fields_v1
                .as_ref()
                .map(|f| f.0.clone())
                .unwrap_or_default();
            ensure!(
                fields.get("f:spec").is_none(),
                "the operator manages spec fields of {}: {fields}",
                e.name_any()
            );
        }
    }

    op.stop().await;
    Ok(())
}

//! Operator start-up and high availability against a control plane of its
//! own (this binary starts without the CRD): refusing to start without the
//! CRD, leader election through a Lease with fail-over, the admin
//! endpoints, and the KEDA path with and without KEDA's CRD.

use std::net::SocketAddr;
use std::time::Duration;

use crate::operator_support::operator_settings;
use anyhow::{Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use spillway_api::WebhookEndpoint;
use spillway_operator::{Error, Running, Settings};
use spillway_tests::{ControlPlane, NatsServer, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(40);

fn settings(nats: &str, ns: &str, id: &str) -> Settings {
    Settings {
        leader_elect: true,
        lease_namespace: ns.to_owned(),
        identity: Some(id.to_owned()),
        lease_duration: Duration::from_secs(3),
        lease_renew_interval: Duration::from_secs(1),
        nats_request_timeout: Duration::from_secs(1),
        ..operator_settings(nats, ns)
    }
}

async fn get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

async fn endpoint(client: &Client, ns: &str, name: &str, extra: serde_json::Value) -> Result<()> {
    let mut spec = json!({
        "verification": {"scheme": "none"},
        "processor": {"sink": {"url": "http://sink.example:8080/"}, "replicas": {"min": 1, "max": 2}},
    });
    if let (Some(s), Some(e)) = (spec["processor"].as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    let ep: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }))?;
    Api::<WebhookEndpoint>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ep)
        .await?;
    Ok(())
}

async fn condition(client: &Client, ns: &str, name: &str, type_: &str) -> Option<(String, String)> {
    let ep = Api::<WebhookEndpoint>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .ok()?;
    ep.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason))
}

fn leaders(ops: &[&Running]) -> usize {
    ops.iter()
        .filter(|o| o.health.leader.load(std::sync::atomic::Ordering::SeqCst))
        .count()
}

#[tokio::test]
async fn refuses_without_crd_then_elects_one_leader_and_fails_over() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let client = cp.client().await?;
    let nats = NatsServer::start().await?;

    // No CRD: a clear refusal, not a crash loop of watch errors.
    match spillway_operator::start(settings(&nats.url, "default", "x"), client.clone()).await {
        Err(e @ Error::CrdMissing) => {
            assert!(
                e.to_string().contains("webhookendpoints.spillway.dev"),
                "{e}"
            );
        }
        Err(e) => bail!("unexpected error {e}"),
        Ok(_) => bail!("started without the CRD"),
    }

    // Credentials in the processors' NATS URL are refused before anything
    // is rendered, and the refusal does not repeat them.
    let mut with_creds = settings(&nats.url, "default", "x");
    with_creds.processor_nats_url = Some("nats://proc:s3cret@nats:4222".into());
    match spillway_operator::start(with_creds, client.clone()).await {
        Err(e @ Error::NatsConfig(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("carries credentials") && !msg.contains("s3cret"),
                "{msg}"
            );
        }
        Err(e) => bail!("unexpected error {e}"),
        Ok(_) => bail!("started with credentials in the processors' URL"),
    }

    // The binary says so and exits non-zero (built by `make test`).
    let out = tokio::process::Command::new(spillway_tests::bin_path("spillway-operator"))
        .env("KUBECONFIG", &cp.kubeconfig)
        .args(["--nats-url", &nats.url, "--admin-addr", "127.0.0.1:0"])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("CRD (webhookendpoints.spillway.dev) is not installed"),
        "{stderr}"
    );

    cp.install_crd().await?;
    let ns = cp.namespace("op-ha").await?;
    let a = spillway_operator::start(settings(&nats.url, &ns, "op-a"), client.clone()).await?;
    let b = spillway_operator::start(settings(&nats.url, &ns, "op-b"), client.clone()).await?;
    eventually(WAIT, "one leader", || async { leaders(&[&a, &b]) == 1 }).await?;
    // Both stay ready; exactly one leads for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leaders(&[&a, &b]), 1);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let holder = leases
        .get("spillway-operator")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    let (leader, standby) = if holder == "op-a" { (a, b) } else { (b, a) };
    assert!(
        leader
            .health
            .leader
            .load(std::sync::atomic::Ordering::SeqCst)
    );

    // Admin endpoints.
    assert!(get(leader.admin_addr, "/healthz").await?.contains("200 OK"));
    assert!(
        get(leader.admin_addr, "/readyz")
            .await?
            .contains("ok (leader)")
    );
    assert!(
        get(standby.admin_addr, "/readyz")
            .await?
            .contains("ok (standby)")
    );
    let metrics = get(leader.admin_addr, "/metrics").await?;
    assert!(metrics.contains("spillway_operator_reconcile_duration_seconds"));
    spillway_tests::check_metric_labels(&metrics)?;

    // The leader reconciles.
    endpoint(&client, &ns, "one", json!({})).await?;
    eventually(WAIT, "one StreamReady", || async {
        condition(&client, &ns, "one", "StreamReady")
            .await
            .is_some_and(|c| c.0 == "True")
    })
    .await?;

    // The leader crashes (the Lease is not released): the standby takes
    // over once it expires.
    leader.abort();
    eventually(WAIT, "standby leads", || async {
        standby
            .health
            .leader
            .load(std::sync::atomic::Ordering::SeqCst)
    })
    .await?;
    endpoint(&client, &ns, "two", json!({})).await?;
    eventually(WAIT, "two StreamReady", || async {
        condition(&client, &ns, "two", "StreamReady")
            .await
            .is_some_and(|c| c.0 == "True")
    })
    .await?;

    // The Lease is taken from it (another holder renewed it): it steps down
    // at its next renewal, and leads again once that holder's lease expires.
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    leases
        .patch(
            "spillway-operator",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"holderIdentity": "intruder", "renewTime": now}})),
        )
        .await?;
    let leads = || {
        standby
            .health
            .leader
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    eventually(WAIT, "steps down", || async { !leads() }).await?;
    eventually(WAIT, "leads again", || async { leads() }).await?;

    // KEDA requested but not installed: said so in ProcessorReady, builtin
    // scaling meanwhile.
    endpoint(
        &client,
        &ns,
        "keda",
        json!({"replicas": {"min": 2, "max": 3, "autoscaler": "keda"}}),
    )
    .await?;
    eventually(WAIT, "KedaNotInstalled", || async {
        condition(&client, &ns, "keda", "ProcessorReady")
            .await
            .is_some_and(|c| c.0 == "False" && c.1 == "KedaNotInstalled")
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert_eq!(
        deployments.get("keda-processor").await?.spec.replicas,
        Some(2)
    );

    // With KEDA's CRD present, a ScaledObject on the consumer's lag.
    let crd = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: scaledobjects.keda.sh}
spec:
  group: keda.sh
  names: {kind: ScaledObject, plural: scaledobjects, singular: scaledobject, listKind: ScaledObjectList}
  scope: Namespaced
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema:
      openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"#;
    cp.kubectl_stdin(&["apply", "--server-side", "-f", "-"], crd)
        .await?;
    cp.kubectl_output(&[
        "wait",
        "--for=condition=Established",
        "--timeout=30s",
        "crd/scaledobjects.keda.sh",
    ])
    .await?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    );
    let scaled: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    // Nudge a reconcile now rather than waiting for the resync.
    Api::<WebhookEndpoint>::namespaced(client.clone(), &ns)
        .patch(
            "keda",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"test/nudge": "1"}}})),
        )
        .await?;
    eventually(WAIT, "ScaledObject", || async {
        scaled
            .get_opt("keda-processor")
            .await
            .ok()
            .flatten()
            .is_some()
    })
    .await?;
    let so = scaled.get("keda-processor").await?;
    assert_eq!(so.data["spec"]["scaleTargetRef"]["name"], "keda-processor");
    assert_eq!(so.data["spec"]["maxReplicaCount"], 3);
    assert_eq!(so.data["spec"]["triggers"][0]["type"], "nats-jetstream");
    assert_eq!(
        so.data["spec"]["triggers"][0]["metadata"]["consumer"],
        "processor"
    );
    eventually(WAIT, "keda ProcessorReady not KedaNotInstalled", || async {
        condition(&client, &ns, "keda", "ProcessorReady")
            .await
            .is_some_and(|c| c.1 != "KedaNotInstalled")
    })
    .await?;
    // Handed over to KEDA without dropping to the default of 1 replica.
    assert_eq!(
        deployments.get("keda-processor").await?.spec.replicas,
        Some(2)
    );
    // Back to builtin: the ScaledObject (and so KEDA's HPA) goes, the
    // operator scales again.
    Api::<WebhookEndpoint>::namespaced(client.clone(), &ns)
        .patch(
            "keda",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"processor": {"replicas": {"autoscaler": "builtin"}}}})),
        )
        .await?;
    eventually(WAIT, "ScaledObject deleted", || async {
        scaled
            .get_opt("keda-processor")
            .await
            .is_ok_and(|o| o.is_none())
    })
    .await?;
    let d = deployments.get("keda-processor").await?;
    assert_eq!(d.spec.replicas, Some(2));
    assert_eq!(d.annotations()["spillway.dev/autoscaler"], "builtin");
    // A clean stop releases the Lease for the next replica at once.
    standby.stop().await;
    let spec = leases
        .get("spillway-operator")
        .await?
        .spec
        .unwrap_or_default();
    assert_eq!(spec.holder_identity, None, "released on stop");
    Ok(())
}

/// The operator with exactly the RBAC the Helm chart grants (namespaced
/// mode, leader election on), through a ServiceAccount token: create →
/// Ready, a change, events, and deletion all work without a Forbidden.
#[tokio::test]
async fn runs_with_exactly_the_chart_rbac() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let admin = cp.client().await?;
    let ns = cp.namespace("op-rbac").await?;
    let release_ns = cp.namespace("op-rbac-sys").await?;
    let out = cp
        .helm()
        .arg("template")
        .arg("sprbac")
        .arg(spillway_tests::root().join("charts/spillway"))
        .args(["--namespace", &release_ns])
        .args(["--set", &format!("watchNamespace={ns}")])
        .args(["--set", "operator.serviceAccount.name=spillway-op"])
        .args([
            "--set",
            "operator.leaderElection.leaseName=spillway-op-lease",
        ])
        .output()
        .await?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rendered = String::from_utf8(out.stdout)?;
    let mut rbac = String::new();
    for v in spillway_tests::yaml_documents(&rendered)? {
        let kind = v["kind"].as_str().unwrap_or_default();
        if [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ]
        .contains(&kind)
        {
            rbac.push_str("---\n");
            rbac.push_str(&serde_saphyr::to_string(&v)?);
        }
    }
    cp.kubectl_stdin(&["apply", "-f", "-"], &rbac).await?;
    // The RBAC authorizer works from a cache: wait until it sees the grants.
    let sa = format!("system:serviceaccount:{release_ns}:spillway-op");
    eventually(WAIT, "RBAC in effect", || async {
        for (verb, res) in [
            ("get", "secrets"),
            ("list", "deployments"),
            ("patch", "webhookendpoints"),
        ] {
            let yes = cp
                .kubectl_output(&["auth", "can-i", verb, res, "-n", &ns, "--as", &sa])
                .await
                .is_ok_and(|o| o.trim() == "yes");
            if !yes {
                return false;
            }
        }
        true
    })
    .await?;
    let token = cp
        .kubectl_output(&["create", "token", "spillway-op", "-n", &release_ns])
        .await?;
    let mut cfg = kube::Config::new(cp.server.parse()?);
    cfg.accept_invalid_certs = true;
    cfg.auth_info.token = Some(token.trim().to_owned().into());
    let restricted = Client::try_from(cfg)?;

    let nats = NatsServer::start().await?;
    let mut s = settings(&nats.url, &ns, "rbac-op");
    s.lease_namespace = release_ns.clone();
    s.lease_name = "spillway-op-lease".into();
    let op = spillway_operator::start(s, restricted).await?;

    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "gh"}, "stringData": {"secret": "x"}}),
            )?,
        )
        .await?;
    let ep: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "r", "namespace": ns},
        "spec": {
            "verification": {"scheme": "github", "secretRefs": [{"name": "gh", "key": "secret"}]},
            "processor": {"sink": {"url": "http://sink:8080/"}, "replicas": {"min": 0, "max": 2}},
        },
    }))?;
    let endpoints: Api<WebhookEndpoint> = Api::namespaced(admin.clone(), &ns);
    endpoints.create(&PostParams::default(), &ep).await?;
    if let Err(e) = eventually(WAIT, "Ready with the chart's RBAC", || async {
        condition(&admin, &ns, "r", "Ready")
            .await
            .is_some_and(|c| c.0 == "True")
    })
    .await
    {
        let status = endpoints.get("r").await.ok().and_then(|e| e.status);
        bail!("{e}; status {status:?}; metrics:\n{}", op.metrics.render());
    }
    endpoints
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"processor": {"replicas": {"min": 1}}}})),
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    eventually(WAIT, "replicas 1", || async {
        deployments
            .get("r-processor")
            .await
            .is_ok_and(|d| d.spec.replicas == Some(1))
    })
    .await?;
    endpoints.delete("r", &Default::default()).await?;
    eventually(WAIT, "deleted", || async {
        endpoints.get_opt("r").await.is_ok_and(|e| e.is_none())
    })
    .await?;
    assert!(deployments.get_opt("r-processor").await?.is_none());
    let errors = op.metrics.render();
    assert!(
        !errors.contains("reconcile_errors_total{reason=\"KubernetesApiError\"}"),
        "{errors}"
    );
    op.stop().await;
    Ok(())
}

//! The Helm chart (charts/spillway) with the pinned helm and the real test
//! kube-apiserver: lint, render with default and with every-feature values
//! (`charts/spillway/ci/full-values.yaml`) and apply each with
//! `kubectl apply --dry-run=server`, schema rejections with clear messages,
//! restricted pod security and labels on everything, image tags from the
//! chart's appVersion, and the gateway's drain settings with a grace period
//! that covers its shutdown.
//!
//! ServiceMonitor, PodMonitor and HTTPRoute are not built into Kubernetes:
//! the full-values test installs minimal stand-in CRDs for them
//! (tests/fixtures/chart-test-crds.yaml) that declare only the fields the
//! chart uses, so those three kinds are checked for field names and types,
//! not against the upstream schemas.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use spillway_tests::{ControlPlane, root, yaml_documents};

fn chart() -> PathBuf {
    root().join("charts/spillway")
}

/// The chart for `helm install`/`upgrade` against the test kube-apiserver,
/// and the copy it may be (dropped last). Helm refuses a release when the
/// server's version does not satisfy Chart.yaml's `kubeVersion`, and the
/// harness's kube-apiserver, built from source without version stamping,
/// reports `v0.0.0-master+$Format:%H$`, which Helm cannot even parse. For
/// such a server only, this returns a copy of the chart without
/// `kubeVersion` (`helm template --kube-version` checks the constraint:
/// platform_assigned_ids_and_kubernetes_versions). A stamped server gets
/// the chart itself.
pub async fn installable_chart(cp: &ControlPlane) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let v: Value = serde_json::from_str(&cp.kubectl_output(&["get", "--raw", "/version"]).await?)?;
    let server = v["gitVersion"].as_str().unwrap_or_default();
    if !server.starts_with("v0.0.0-") {
        return Ok((chart(), None));
    }
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("spillway");
    let status = std::process::Command::new("cp")
        .arg("-R")
        .arg(chart())
        .arg(&copy)
        .status()?;
    anyhow::ensure!(status.success(), "copying the chart");
    let meta = copy.join("Chart.yaml");
    let text = std::fs::read_to_string(&meta)?;
    let kept: String = text
        .lines()
        .filter(|l| !l.starts_with("kubeVersion:"))
        .map(|l| format!("{l}\n"))
        .collect();
    anyhow::ensure!(kept.len() < text.len(), "Chart.yaml has a kubeVersion");
    std::fs::write(&meta, kept)?;
    Ok((copy, Some(dir)))
}

/// Run helm; stdout on success, stderr as the error.
async fn helm(cp: &ControlPlane, args: &[&str]) -> Result<String> {
    let out = cp
        .helm()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .context("running helm")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim())
    }
}

/// `helm template` of the chart as release `spillway` in `ns`.
async fn render(cp: &ControlPlane, ns: &str, extra: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args = vec![
        "template",
        "spillway",
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        ns,
    ];
    args.extend_from_slice(extra);
    helm(cp, &args).await
}

fn kinds(objs: &[Value]) -> Vec<String> {
    objs.iter()
        .map(|o| o["kind"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn app_version() -> String {
    let text = std::fs::read_to_string(chart().join("Chart.yaml")).expect("Chart.yaml");
    let v: Value = serde_saphyr::from_str(&text).expect("Chart.yaml is YAML");
    v["appVersion"].as_str().expect("appVersion").to_owned()
}

/// Create namespaces (idempotent).
async fn ensure_namespaces(cp: &ControlPlane, names: &[&str]) -> Result<()> {
    let yaml: String = names
        .iter()
        .map(|n| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n"))
        .collect();
    cp.kubectl_stdin(&["apply", "-f", "-"], &yaml).await?;
    Ok(())
}

/// `kubectl apply --dry-run=server` the rendered chart; returns kubectl's
/// per-object lines.
async fn dry_run_apply(cp: &ControlPlane, yaml: &str) -> Result<Vec<String>> {
    let out = cp
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], yaml)
        .await
        .context("kubectl apply --dry-run=server of the rendered chart")?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Every pod template of the rendered objects, with its owner's name.
fn pod_specs(objs: &[Value]) -> Vec<(String, &Value)> {
    objs.iter()
        .filter(|o| o["kind"] == "Deployment")
        .map(|o| {
            (
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                &o["spec"]["template"]["spec"],
            )
        })
        .collect()
}

/// Restricted pod security, resources and labels on every object.
fn assert_hardened(objs: &[Value]) {
    for o in objs {
        let what = format!("{} {}", o["kind"], o["metadata"]["name"]);
        let labels = &o["metadata"]["labels"];
        for l in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/part-of",
            "helm.sh/chart",
        ] {
            assert!(labels[l].is_string(), "{what} lacks label {l}");
        }
    }
    let pods = pod_specs(objs);
    assert_eq!(pods.len(), 2, "operator and gateway Deployments");
    for (name, pod) in pods {
        let psc = &pod["securityContext"];
        assert_eq!(psc["runAsNonRoot"], true, "{name}");
        assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        let containers = pod["containers"].as_array().expect("containers");
        for c in containers {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["runAsNonRoot"], true, "{name}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{name}"
            );
            assert!(
                c["resources"]["requests"]["cpu"].is_string()
                    && c["resources"]["requests"]["memory"].is_string()
                    && c["resources"]["limits"]["memory"].is_string(),
                "{name}: requests and a memory limit are set"
            );
            assert!(c["readinessProbe"].is_object() && c["livenessProbe"].is_object());
        }
    }
}

fn env<'a>(objs: &'a [Value], deployment_suffix: &str, var: &str) -> Option<&'a str> {
    objs.iter()
        .filter(|o| o["kind"] == "Deployment")
        .find(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(deployment_suffix))
        })?["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == var)?["value"]
        .as_str()
}

/// `(volume, Secret, mount path)` of a Deployment's Secret volumes whose
/// name starts with `nats-`, sorted; every one must be mounted read-only.
fn nats_volumes(objs: &[Value], deployment_suffix: &str) -> Vec<(String, String, String)> {
    let Some(pod) = objs
        .iter()
        .filter(|o| o["kind"] == "Deployment")
        .find(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(deployment_suffix))
        })
        .map(|d| &d["spec"]["template"]["spec"])
    else {
        return Vec::new();
    };
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<(String, String, String)> = pod["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| {
            let name = v["name"].as_str()?;
            if !name.starts_with("nats-") {
                return None;
            }
            let mount = mounts.iter().find(|m| m["name"] == name)?;
            assert_eq!(mount["readOnly"], true, "{deployment_suffix} {name}");
            Some((
                name.to_owned(),
                v["secret"]["secretName"].as_str()?.to_owned(),
                mount["mountPath"].as_str()?.to_owned(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// The pod template of the Deployment whose name ends with `suffix`.
fn pod_of<'a>(objs: &'a [Value], suffix: &str) -> Option<&'a Value> {
    objs.iter()
        .filter(|o| o["kind"] == "Deployment")
        .find(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(suffix))
        })
        .map(|d| &d["spec"]["template"]["spec"])
}

/// A probe's timings, after checking that it asks `path` on the admin port.
fn probe_timings(probe: &Value, path: &str) -> Value {
    assert_eq!(probe["httpGet"]["path"], path, "{probe}");
    assert_eq!(probe["httpGet"]["port"], "admin", "{probe}");
    let mut t = probe.clone();
    if let Some(m) = t.as_object_mut() {
        m.remove("httpGet");
    }
    t
}

/// The operator's settings as the rendered operator Deployment gives them:
/// every environment variable the chart sets is turned into the flag that
/// reads it (clap's own table) and parsed. Fails on a variable the operator
/// does not read (other than RUST_LOG and the values' extraEnv) and on a
/// value it refuses.
fn operator_settings(objs: &[Value]) -> Result<spillway_operator::Settings> {
    use clap::CommandFactory;
    let cmd = spillway_operator::Settings::command();
    let pod = pod_of(objs, "-operator").context("operator Deployment")?;
    let mut args = vec!["spillway-operator".to_owned()];
    let mut unread = Vec::new();
    for e in pod["containers"][0]["env"].as_array().context("env")? {
        let name = e["name"].as_str().context("env name")?;
        // valueFrom (POD_NAME, POD_NAMESPACE): set by the kubelet.
        let Some(value) = e["value"].as_str() else {
            continue;
        };
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|v| v == name))
        else {
            unread.push(name.to_owned());
            continue;
        };
        let long = arg.get_long().context("a long flag")?;
        if arg.get_action().takes_values() {
            args.push(format!("--{long}={value}"));
        } else if value == "true" {
            args.push(format!("--{long}"));
        }
    }
    unread.retain(|n| n != "RUST_LOG" && n != "SPILLWAY_EXTRA");
    assert!(unread.is_empty(), "the operator reads no {unread:?}");
    <spillway_operator::Settings as clap::Parser>::try_parse_from(&args)
        .map_err(|e| anyhow::anyhow!("{e}: {args:?}"))
}

/// The pod template (spec, plus its metadata under `metadata`) of the
/// processor Deployment the operator renders with `settings` for a plain
/// endpoint.
fn processor_pod(settings: &spillway_operator::Settings) -> Result<Value> {
    let mut ep: spillway_api::WebhookEndpoint = serde_json::from_value(serde_json::json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "gh", "namespace": "payments", "uid": "uid-1"},
        "spec": {
            "verification": {"scheme": "none"},
            "processor": {"sink": {"url": "http://sink.payments.svc:8080/"}},
        },
    }))?;
    ep.metadata.uid = Some("uid-1".into());
    let timings = spillway_api::validate::check(&ep.spec).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let d = spillway_operator::render::deployment(
        &ep,
        &spillway_api::names::EndpointNames::new("payments", "gh"),
        &timings,
        settings,
        Some(1),
        &[],
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let mut pod = serde_json::to_value(&d.spec.template.spec)?;
    pod["metadata"] = serde_json::to_value(&d.spec.template.metadata)?;
    Ok(pod)
}

/// What ci/full-values.yaml sets of the chart's extension points: extra
/// volumes and mounts, probe timings, HPA behavior, scrape timeout and
/// relabelings, and extraObjects (both forms) rendered through tpl.
fn check_extensibility(objs: &[Value], ns: &str) -> Result<()> {
    for (suffix, readiness, liveness) in [
        (
            "-operator",
            serde_json::json!({"periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 6}),
            serde_json::json!({"initialDelaySeconds": 15, "periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 5}),
        ),
        (
            "-gateway",
            serde_json::json!({"periodSeconds": 3, "timeoutSeconds": 1, "failureThreshold": 2}),
            serde_json::json!({"initialDelaySeconds": 10, "periodSeconds": 15, "failureThreshold": 4}),
        ),
    ] {
        let pod = pod_of(objs, suffix).context(suffix)?;
        let c = &pod["containers"][0];
        assert_eq!(
            probe_timings(&c["readinessProbe"], "/readyz"),
            readiness,
            "{suffix}"
        );
        assert_eq!(
            probe_timings(&c["livenessProbe"], "/healthz"),
            liveness,
            "{suffix}"
        );
        let volume = pod["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "extra-ca"))
            .with_context(|| format!("{suffix}: extra volume"))?;
        assert_eq!(volume["configMap"]["name"], "spillway-extra-ca");
        let mount = c["volumeMounts"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == "extra-ca"))
            .with_context(|| format!("{suffix}: extra mount"))?;
        assert_eq!(mount["mountPath"], "/etc/spillway/extra-ca");
        assert_eq!(mount["readOnly"], true);
        // The chart's own mounts are still there.
        assert!(
            c["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "tmp")),
            "{suffix}"
        );
    }
    let hpa = objs
        .iter()
        .find(|o| o["kind"] == "HorizontalPodAutoscaler")
        .context("HPA")?;
    assert_eq!(
        hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        600
    );
    assert_eq!(
        hpa["spec"]["behavior"]["scaleUp"]["policies"][0]["type"],
        "Percent"
    );
    for o in objs.iter().filter(|o| o["kind"] == "ServiceMonitor") {
        let e = &o["spec"]["endpoints"][0];
        assert_eq!(e["scrapeTimeout"], "10s", "{o}");
        assert_eq!(e["relabelings"][0]["targetLabel"], "node", "{o}");
        assert_eq!(e["metricRelabelings"][0]["action"], "drop", "{o}");
    }
    let pm = objs
        .iter()
        .find(|o| o["kind"] == "PodMonitor")
        .context("PodMonitor")?;
    let e = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(e["scrapeTimeout"], "15s");
    assert_eq!(e["relabelings"][0]["targetLabel"], "endpoint_namespace");
    assert_eq!(e["metricRelabelings"][0]["action"], "labeldrop");
    // extraObjects: a YAML string and an object, both through tpl.
    let cm = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "spillway-extra-ca")
        .context("the extraObjects ConfigMap")?;
    assert_eq!(cm["metadata"]["namespace"], ns);
    assert_eq!(
        cm["metadata"]["labels"]["team"], "platform",
        "commonLabels via include"
    );
    let secret = objs
        .iter()
        .find(|o| o["kind"] == "Secret")
        .context("the extraObjects Secret")?;
    assert_eq!(secret["metadata"]["name"], "spillway-extra");
    assert_eq!(secret["metadata"]["namespace"], ns);
    assert_eq!(secret["stringData"]["release"], "spillway");
    Ok(())
}

#[tokio::test]
async fn lint_passes_with_default_and_full_values() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    let out = helm(cp, &["lint", "--strict", chart]).await?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let full = root().join("charts/spillway/ci/full-values.yaml");
    let out = helm(
        cp,
        &[
            "lint",
            "--strict",
            chart,
            "-f",
            full.to_str().expect("utf-8"),
        ],
    )
    .await?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

#[tokio::test]
async fn default_values_render_and_apply_on_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-default").await?;
    let yaml = render(cp, &ns, &[]).await?;
    let objs = yaml_documents(&yaml)?;
    let got: BTreeSet<String> = kinds(&objs).into_iter().collect();
    let want: BTreeSet<String> = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "CustomResourceDefinition",
        "Deployment",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Service",
        "ServiceAccount",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(got, want, "kinds rendered with default values");
    assert_hardened(&objs);

    // One image, tagged with the chart's appVersion, for all three binaries.
    let version = app_version();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "Chart appVersion equals the workspace version"
    );
    let image = format!("ghcr.io/spillway-dev/spillway:{version}");
    for (name, pod) in pod_specs(&objs) {
        assert_eq!(pod["containers"][0]["image"], image.as_str(), "{name}");
    }
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_PROCESSOR_IMAGE"),
        Some(image.as_str())
    );
    // Two operator replicas with leader election through a Lease.
    let op = objs
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "spillway-operator")
        .context("operator Deployment")?;
    assert_eq!(op["spec"]["replicas"], 2);
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_LEADER_ELECT"),
        Some("true")
    );
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_LEASE_NAME"),
        Some("spillway-operator")
    );
    // No NATS files by default: nothing mounted, no file settings.
    for suffix in ["-gateway", "-operator"] {
        assert!(nats_volumes(&objs, suffix).is_empty(), "{suffix}");
        for var in [
            "SPILLWAY_NATS_CREDS_FILE",
            "SPILLWAY_NATS_TLS_CA_FILE",
            "SPILLWAY_NATS_TLS_CERT_FILE",
            "SPILLWAY_NATS_TLS_REQUIRED",
        ] {
            assert_eq!(env(&objs, suffix, var), None, "{suffix} {var}");
        }
    }

    // Probe timings from values default to what the chart always set; no
    // extra volumes; the chart's own IDs (the image's user and group).
    for (suffix, readiness, liveness) in [
        (
            "-operator",
            serde_json::json!({"periodSeconds": 5, "failureThreshold": 3}),
            serde_json::json!({"initialDelaySeconds": 5, "periodSeconds": 10, "failureThreshold": 3}),
        ),
        (
            "-gateway",
            serde_json::json!({"periodSeconds": 2, "failureThreshold": 2}),
            serde_json::json!({"initialDelaySeconds": 5, "periodSeconds": 10, "failureThreshold": 3}),
        ),
    ] {
        let pod = pod_of(&objs, suffix).context(suffix)?;
        let c = &pod["containers"][0];
        assert_eq!(
            probe_timings(&c["readinessProbe"], "/readyz"),
            readiness,
            "{suffix}"
        );
        assert_eq!(
            probe_timings(&c["livenessProbe"], "/healthz"),
            liveness,
            "{suffix}"
        );
        assert!(
            !c["volumeMounts"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["name"] == "extra-ca")),
            "{suffix}"
        );
        assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{suffix}");
        assert_eq!(pod["securityContext"]["fsGroup"], 65532, "{suffix}");
    }
    // The operator reads every variable the chart gives it; processor pods
    // get no platform defaults, and fsGroup 65532.
    let pod = processor_pod(&operator_settings(&objs)?)?;
    for field in [
        "imagePullSecrets",
        "nodeSelector",
        "tolerations",
        "priorityClassName",
    ] {
        assert!(pod[field].is_null(), "{field}: {pod}");
    }
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);

    let lines = dry_run_apply(cp, &yaml).await?;
    assert_eq!(lines.len(), objs.len(), "one line per object: {lines:#?}");
    assert!(
        lines.iter().all(|l| l.ends_with("(server dry run)")),
        "{lines:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn full_values_render_and_apply_on_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let crds = std::fs::read_to_string(root().join("tests/fixtures/chart-test-crds.yaml"))?;
    cp.kubectl_stdin(&["apply", "-f", "-"], &crds).await?;
    for crd in [
        "servicemonitors.monitoring.coreos.com",
        "podmonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
        "httproutes.gateway.networking.k8s.io",
    ] {
        cp.kubectl_output(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ])
        .await?;
    }
    let ns = cp.namespace("chart-full").await?;
    // rbac.namespaces and grafanaDashboard.namespace of the values file.
    ensure_namespaces(cp, &["payments", "ci", "monitoring"]).await?;
    let full = root().join("charts/spillway/ci/full-values.yaml");
    let yaml = render(cp, &ns, &["-f", full.to_str().expect("utf-8")]).await?;
    let objs = yaml_documents(&yaml)?;
    let ks = kinds(&objs);
    let count = |k: &str| ks.iter().filter(|x| *x == k).count();
    for (kind, n) in [
        ("Ingress", 1),
        ("HTTPRoute", 1),
        ("HorizontalPodAutoscaler", 1),
        ("PodDisruptionBudget", 2),
        ("NetworkPolicy", 2),
        ("ServiceMonitor", 2),
        ("PodMonitor", 1),
        ("PrometheusRule", 1),
        // The gateway's config, the dashboard and one from extraObjects.
        ("ConfigMap", 3),
        ("Secret", 1),
    ] {
        assert_eq!(count(kind), n, "{kind} objects with full values");
    }
    check_alert_rules(&objs)?;
    assert_hardened(&objs);
    check_extensibility(&objs, &ns)?;
    // The processor pod defaults reach the operator, which puts them into
    // the processor Deployments it renders.
    let settings = operator_settings(&objs)?;
    let pod = processor_pod(&settings)?;
    assert_eq!(
        pod["imagePullSecrets"],
        serde_json::json!([{"name": "registry-creds"}, {"name": "mirror-creds"}])
    );
    assert_eq!(
        pod["nodeSelector"],
        serde_json::json!({"node-pool": "hooks"})
    );
    assert_eq!(pod["tolerations"][0]["value"], "hooks");
    assert_eq!(pod["priorityClassName"], "webhooks");
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    assert_eq!(pod["metadata"]["labels"]["cost-center"], "hooks");
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner"],
        "platform, team hooks"
    );
    // The image digest wins over a tag.
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_PROCESSOR_IMAGE"),
        Some(
            "registry.example.com/spillway/spillway@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        )
    );
    // The gateway: its own credentials and client certificate, the shared
    // CA, TLS required; each file from a read-only Secret volume.
    for (var, value) in [
        (
            "SPILLWAY_NATS_CREDS_FILE",
            "/etc/spillway/nats/creds/gateway.creds",
        ),
        ("SPILLWAY_NATS_TLS_CA_FILE", "/etc/spillway/nats/ca/ca.crt"),
        (
            "SPILLWAY_NATS_TLS_CERT_FILE",
            "/etc/spillway/nats/client/tls.crt",
        ),
        (
            "SPILLWAY_NATS_TLS_KEY_FILE",
            "/etc/spillway/nats/client/tls.key",
        ),
        ("SPILLWAY_NATS_TLS_REQUIRED", "true"),
    ] {
        assert_eq!(env(&objs, "-gateway", var), Some(value), "gateway {var}");
    }
    assert_eq!(env(&objs, "-gateway", "SSL_CERT_FILE"), None);
    assert_eq!(
        nats_volumes(&objs, "-gateway"),
        vec![
            (
                "nats-ca".to_owned(),
                "nats-ca".to_owned(),
                "/etc/spillway/nats/ca".to_owned()
            ),
            (
                "nats-client-tls".to_owned(),
                "spillway-gateway-nats-tls".to_owned(),
                "/etc/spillway/nats/client".to_owned()
            ),
            (
                "nats-creds".to_owned(),
                "spillway-gateway-nats".to_owned(),
                "/etc/spillway/nats/creds".to_owned()
            ),
        ]
    );
    assert_eq!(
        nats_volumes(&objs, "-operator"),
        vec![
            (
                "nats-ca".to_owned(),
                "nats-ca".to_owned(),
                "/etc/spillway/nats/ca".to_owned()
            ),
            (
                "nats-client-tls".to_owned(),
                "spillway-operator-nats-tls".to_owned(),
                "/etc/spillway/nats/client".to_owned()
            ),
            (
                "nats-creds".to_owned(),
                "spillway-operator-nats".to_owned(),
                "/etc/spillway/nats/creds".to_owned()
            ),
        ]
    );
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_SINK_GONE_QUIET_PERIOD"),
        Some("15m")
    );
    // NATS credentials: the operator's own file, and the Secret name the
    // operator mounts into processor pods.
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_NATS_CREDS_FILE"),
        Some("/etc/spillway/nats/creds/operator.creds")
    );
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_PROCESSOR_NATS_CREDS_SECRET"),
        Some("spillway-processor-nats")
    );
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_PROCESSOR_NATS_CREDS_KEY"),
        Some("processor.creds")
    );
    assert_eq!(
        env(&objs, "-operator", "SPILLWAY_NATS_TLS_KEY_FILE"),
        Some("/etc/spillway/nats/client/tls.key")
    );
    // NATS TLS Secrets the operator mounts into processor pods.
    for (name, want) in [
        ("SPILLWAY_PROCESSOR_NATS_TLS_CA_SECRET", "nats-ca"),
        ("SPILLWAY_PROCESSOR_NATS_TLS_CA_KEY", "ca.pem"),
        (
            "SPILLWAY_PROCESSOR_NATS_TLS_CLIENT_SECRET",
            "spillway-processor-nats-tls",
        ),
        ("SPILLWAY_PROCESSOR_NATS_TLS_REQUIRED", "true"),
    ] {
        assert_eq!(env(&objs, "-operator", name), Some(want), "{name}");
    }
    // With an HPA the Deployment leaves replicas to it.
    let gw = objs
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "spillway-gateway")
        .context("gateway Deployment")?;
    assert!(gw["spec"]["replicas"].is_null());
    // The dashboard is valid JSON.
    let dash = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "spillway-dashboard")
        .context("dashboard ConfigMap")?;
    assert_eq!(dash["metadata"]["namespace"], "monitoring");
    let d: Value = serde_json::from_str(dash["data"]["spillway.json"].as_str().unwrap_or(""))?;
    assert!(d["panels"].as_array().is_some_and(|p| p.len() >= 8));
    // Its queries parse as PromQL once Grafana's variables are filled in,
    // and it can be narrowed to a namespace and an endpoint.
    let vars: Vec<&str> = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(
        vars.contains(&"namespace") && vars.contains(&"endpoint"),
        "{vars:?}"
    );
    let mut backlog_panel = false;
    for panel in d["panels"].as_array().into_iter().flatten() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or_default();
            backlog_panel |= expr.contains("spillway_operator_endpoint_backlog");
            let filled = expr
                .replace("$__rate_interval", "5m")
                .replace("$endpoint", ".*")
                .replace("$namespace", ".*");
            promql_parser::parser::parse(&filled)
                .map_err(|e| anyhow::anyhow!("{}: {e}: {filled}", panel["title"]))?;
        }
    }
    assert!(backlog_panel, "the dashboard shows the backlog");

    let lines = dry_run_apply(cp, &yaml).await?;
    assert_eq!(lines.len(), objs.len(), "{lines:#?}");
    assert!(
        lines.iter().all(|l| l.ends_with("(server dry run)")),
        "{lines:#?}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_values_fail_with_a_message_naming_the_value() -> Result<()> {
    let cp = ControlPlane::shared().await;
    // (--set argument, what the error must say)
    let cases: &[(&str, &[&str])] = &[
        ("gateway.replicas=0", &["/gateway/replicas", "minimum"]),
        (
            "operator.resyncInterval=soon",
            &["/operator/resyncInterval", "does not match pattern"],
        ),
        ("nats.url=http://nats:4222", &["/nats/url"]),
        ("gateway.replica=3", &["/gateway", "'replica' not allowed"]),
        (
            "operator.leaderElection.enabled=false",
            &["/operator/replicas", "value must be 1"],
        ),
        (
            "securityContext.readOnlyRootFilesystem=false",
            &["/securityContext/readOnlyRootFilesystem"],
        ),
        (
            "gateway.httpRoute.enabled=true",
            &["/gateway/httpRoute/parentRefs"],
        ),
        ("image.pullPolicy=Sometimes", &["/image/pullPolicy"]),
        (
            "processor.resources.requests.memory=lots",
            &["/processor/resources/requests/memory"],
        ),
        (
            "nats.monitoringEndpoint=http://nats:8222/",
            &["/nats/monitoringEndpoint"],
        ),
        (
            "nats.processorCredentials.secretName=Not_A_Name",
            &["/nats/processorCredentials/secretName"],
        ),
        (
            "nats.processorTls.required=maybe",
            &["/nats/processorTls/required"],
        ),
        (
            "watchNamespace=team-a,rbac.namespaces={team-b}",
            &["rbac.namespaces", "team-a"],
        ),
        (
            "gateway.autoscaling.enabled=true,gateway.autoscaling.minReplicas=5,gateway.autoscaling.maxReplicas=2",
            &["minReplicas (5) is greater than maxReplicas (2)"],
        ),
        (
            "networkPolicy.dnsPorts={0}",
            &["/networkPolicy/dnsPorts/0", "minimum"],
        ),
        (
            "networkPolicy.dnsTo=kube-dns",
            &["/networkPolicy/dnsTo", "array"],
        ),
        (
            "gateway.config.maxConcurrentRequests=0",
            &["/gateway/config/maxConcurrentRequests", "minimum"],
        ),
        (
            "gateway.config.drainDelay=5sec",
            &["/gateway/config/drainDelay", "does not match pattern"],
        ),
        // The gateway reads whole ms/s/m/h parts only.
        (
            "gateway.config.drainDelay=1.5s",
            &["/gateway/config/drainDelay", "does not match pattern"],
        ),
        (
            "gateway.config.maxHeaderBytes=4096",
            &["/gateway/config/maxHeaderBytes", "minimum"],
        ),
        (
            "metrics.serviceMonitor.scrapeTimeout=10sec",
            &["/metrics/serviceMonitor/scrapeTimeout"],
        ),
        (
            "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.scrapeTimeout=1m",
            &[
                "metrics.serviceMonitor.scrapeTimeout (1m) is longer than metrics.serviceMonitor.interval (30s)",
            ],
        ),
        (
            "metrics.podMonitor.interval=10s,metrics.podMonitor.scrapeTimeout=11s",
            &[
                "metrics.podMonitor.scrapeTimeout (11s) is longer than metrics.podMonitor.interval (10s)",
            ],
        ),
        (
            "metrics.serviceMonitor.relabelings[0].target_label=x",
            &[
                "/metrics/serviceMonitor/relabelings/0",
                "'target_label' not allowed",
            ],
        ),
        (
            "operator.livenessProbe.successThreshold=2",
            &[
                "/operator/livenessProbe/successThreshold",
                "value must be 1",
            ],
        ),
        (
            "gateway.readinessProbe.periodSeconds=0",
            &["/gateway/readinessProbe/periodSeconds", "minimum"],
        ),
        (
            "gateway.readinessProbe.httpGet.path=/x",
            &["/gateway/readinessProbe", "'httpGet' not allowed"],
        ),
        (
            "gateway.extraVolumeMounts[0].name=x",
            &["/gateway/extraVolumeMounts/0", "mountPath"],
        ),
        (
            "operator.extraVolumes[0].emptyDir.medium=Memory",
            &["/operator/extraVolumes/0", "name"],
        ),
        (
            "gateway.autoscaling.behavior.scaleDwn.selectPolicy=Max",
            &["/gateway/autoscaling/behavior", "'scaleDwn' not allowed"],
        ),
        ("extraObjects[0]=3", &["/extraObjects/0"]),
        (
            "processor.tolerations[0].operator=Equals",
            &["/processor/tolerations/0/operator"],
        ),
        (
            "processor.priorityClassName=High_Priority",
            &["/processor/priorityClassName"],
        ),
        (
            "processor.podLabels.tier=null,processor.nodeSelector.pool=1",
            &["/processor/nodeSelector/pool", "want string"],
        ),
        (
            "platformAssignsIds=yes",
            &["/platformAssignsIds", "boolean"],
        ),
        (
            "gateway.terminationGracePeriodSeconds=35",
            &[
                "gateway.terminationGracePeriodSeconds (35) must exceed",
                "drainDelay (5s) + shutdownGrace (25s) + publishTimeout (5s) = 35s",
                "at least 36",
            ],
        ),
        (
            "gateway.terminationGracePeriodSeconds=85,gateway.config.drainDelay=1m,gateway.config.publishTimeout=500ms",
            &["= 85.5s", "at least 86", "computes it (91)"],
        ),
    ];
    for (set, want) in cases {
        let err = match render(cp, "spillway-system", &["--set", set]).await {
            Ok(_) => bail!("--set {set} was accepted"),
            Err(e) => e.to_string(),
        };
        for w in *want {
            assert!(err.contains(w), "--set {set}: error lacks {w:?}:\n{err}");
        }
    }
    // And the same through `helm install` (the schema is checked before
    // anything reaches the cluster).
    let ns = cp.namespace("chart-bad").await?;
    let chart = chart();
    let err = helm(
        cp,
        &[
            "install",
            "bad",
            chart.to_str().expect("utf-8"),
            "-n",
            &ns,
            "--set",
            "gateway.service.port=70000",
        ],
    )
    .await
    .expect_err("port 70000 is refused");
    assert!(err.to_string().contains("/gateway/service/port"), "{err}");
    assert!(
        cp.kubectl_output(&["get", "deploy", "-n", &ns, "-o", "name"])
            .await?
            .trim()
            .is_empty(),
        "nothing was installed"
    );
    Ok(())
}

/// The DNS egress rule of each NetworkPolicy: (ports as `port/protocol`,
/// peers), one per policy; None when a policy has no rule on a DNS port.
fn dns_egress(objs: &[Value], dns_ports: &[u64]) -> Vec<Option<(Vec<String>, Value)>> {
    objs.iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .map(|np| {
            let rules = np["spec"]["egress"].as_array()?;
            let rule = rules.iter().find(|r| {
                r["ports"].as_array().is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p["port"].as_u64().is_some_and(|n| dns_ports.contains(&n)))
                })
            })?;
            let ports = rule["ports"]
                .as_array()?
                .iter()
                .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("")))
                .collect();
            Some((ports, rule["to"].clone()))
        })
        .collect()
}

#[tokio::test]
async fn network_policy_dns_egress_follows_the_values() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-dns").await?;
    let on = ["--set", "networkPolicy.enabled=true"];
    // Default: the kube-dns pods of any namespace, UDP and TCP 53.
    let objs = yaml_documents(&render(cp, &ns, &on).await?)?;
    let kube_dns = serde_json::json!([{
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }]);
    let rules = dns_egress(&objs, &[53]);
    assert_eq!(rules.len(), 2, "operator and gateway policies");
    for rule in &rules {
        assert_eq!(
            rule.as_ref(),
            Some(&(
                vec!["53/UDP".to_owned(), "53/TCP".to_owned()],
                kube_dns.clone()
            ))
        );
    }
    // OpenShift: the openshift-dns namespace, pods listening on 5353.
    let openshift = serde_json::json!([{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "openshift-dns"}},
    }]);
    let set_to = format!("networkPolicy.dnsTo={openshift}");
    let yaml = render(
        cp,
        &ns,
        &[
            on[0],
            on[1],
            "--set-json",
            &set_to,
            "--set",
            "networkPolicy.dnsPorts={5353}",
        ],
    )
    .await?;
    let objs = yaml_documents(&yaml)?;
    for rule in dns_egress(&objs, &[53, 5353]) {
        assert_eq!(
            rule,
            Some((
                vec!["5353/UDP".to_owned(), "5353/TCP".to_owned()],
                openshift.clone()
            ))
        );
    }
    // The API server takes the custom peers.
    let policies: String = objs
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).expect("YAML")))
        .collect();
    let lines = dry_run_apply(cp, &policies).await?;
    assert_eq!(lines.len(), 2, "{lines:#?}");
    // Empty: port 53 to anywhere (no `to`), e.g. NodeLocal DNSCache
    // without knowing its address.
    let objs = yaml_documents(
        &render(
            cp,
            &ns,
            &[on[0], on[1], "--set-json", "networkPolicy.dnsTo=[]"],
        )
        .await?,
    )?;
    for rule in dns_egress(&objs, &[53]) {
        let (ports, to) = rule.context("a DNS rule")?;
        assert_eq!(ports, ["53/UDP", "53/TCP"]);
        assert!(to.is_null(), "no peers: {to}");
    }
    // dns: false: no DNS rule at all.
    let objs = yaml_documents(
        &render(cp, &ns, &[on[0], on[1], "--set", "networkPolicy.dns=false"]).await?,
    )?;
    assert_eq!(dns_egress(&objs, &[53]), vec![None, None]);
    Ok(())
}

/// The gateway as the chart configures it: its config file (the ConfigMap,
/// loaded with the gateway's own config loader, which refuses unknown
/// keys), the Deployment's config hash, grace period and readiness probe.
struct GatewayShutdown {
    config: spillway_gateway::config::Config,
    config_hash: String,
    grace_seconds: u64,
    /// periodSeconds × failureThreshold of the readiness probe: how long
    /// after /readyz turns 503 the kubelet marks the pod not ready, at most.
    readiness_window_seconds: u64,
}

fn gateway_shutdown(objs: &[Value]) -> Result<GatewayShutdown> {
    let cm = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "spillway-gateway")
        .context("gateway ConfigMap")?;
    let text = cm["data"]["config.yaml"]
        .as_str()
        .context("config.yaml in the gateway ConfigMap")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("config.yaml");
    std::fs::write(&file, text)?;
    let config = spillway_gateway::config::Config::load(spillway_gateway::config::Cli {
        config: Some(file),
        ..Default::default()
    })
    .with_context(|| format!("the gateway refuses the chart's config file:\n{text}"))?;

    let gw = objs
        .iter()
        .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "spillway-gateway")
        .context("gateway Deployment")?;
    let pod = &gw["spec"]["template"]["spec"];
    // The Deployment reads that ConfigMap as its config file.
    assert_eq!(
        env(objs, "-gateway", "SPILLWAY_GATEWAY_CONFIG"),
        Some("/etc/spillway/gateway/config.yaml")
    );
    let volume = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "config"))
        .context("config volume")?;
    assert_eq!(volume["configMap"]["name"], "spillway-gateway");
    let container = &pod["containers"][0];
    assert!(
        container["volumeMounts"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["name"] == "config" && m["mountPath"] == "/etc/spillway/gateway")),
        "config volume mounted at /etc/spillway/gateway"
    );
    let probe = &container["readinessProbe"];
    assert_eq!(probe["httpGet"]["path"], "/readyz");
    let readiness_window_seconds = probe["periodSeconds"].as_u64().context("periodSeconds")?
        * probe["failureThreshold"]
            .as_u64()
            .context("failureThreshold")?;
    Ok(GatewayShutdown {
        config,
        config_hash: gw["spec"]["template"]["metadata"]["annotations"]["spillway.dev/config-hash"]
            .as_str()
            .context("config-hash annotation")?
            .to_owned(),
        grace_seconds: pod["terminationGracePeriodSeconds"]
            .as_u64()
            .context("terminationGracePeriodSeconds")?,
        readiness_window_seconds,
    })
}

impl GatewayShutdown {
    /// drainDelay + shutdownGrace + publishTimeout: the longest the gateway
    /// takes from SIGTERM to exit.
    fn shutdown(&self) -> Duration {
        self.config.drain_delay + self.config.shutdown_grace + self.config.publish_timeout
    }
}

#[tokio::test]
async fn gateway_drain_settings_and_grace_period_follow_the_values() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = "spillway-system";

    // Defaults: the gateway's own defaults, written out; 5s + 25s + 5s of
    // shutdown and 5s of slack.
    let defaults = gateway_shutdown(&yaml_documents(&render(cp, ns, &[]).await?)?)?;
    assert_eq!(defaults.config.drain_delay, Duration::from_secs(5));
    assert_eq!(defaults.config.max_concurrent_requests, 256);
    assert_eq!(defaults.shutdown(), Duration::from_secs(35));
    assert_eq!(defaults.grace_seconds, 40);
    assert!(Duration::from_secs(defaults.grace_seconds) > defaults.shutdown());
    // The kubelet notices /readyz turning 503 before the drain delay ends.
    assert!(
        Duration::from_secs(defaults.readiness_window_seconds) < defaults.config.drain_delay,
        "readiness probe window {}s vs drainDelay {:?}",
        defaults.readiness_window_seconds,
        defaults.config.drain_delay
    );

    // Custom values: carried into the config file, a new config hash (so
    // pods roll), and a grace period computed from them (107.5s rounded up,
    // plus 5s).
    let custom = gateway_shutdown(&yaml_documents(
        &render(
            cp,
            ns,
            &[
                "--set",
                "gateway.config.drainDelay=45s,gateway.config.maxConcurrentRequests=7,\
             gateway.config.shutdownGrace=1m,gateway.config.publishTimeout=2500ms",
            ],
        )
        .await?,
    )?)?;
    assert_eq!(custom.config.drain_delay, Duration::from_secs(45));
    assert_eq!(custom.config.max_concurrent_requests, 7);
    assert_eq!(custom.config.shutdown_grace, Duration::from_secs(60));
    assert_eq!(custom.shutdown(), Duration::from_millis(107_500));
    assert_eq!(custom.grace_seconds, 113);
    assert!(Duration::from_secs(custom.grace_seconds) > custom.shutdown());
    assert!(Duration::from_secs(custom.readiness_window_seconds) < custom.config.drain_delay);
    assert_ne!(custom.config_hash, defaults.config_hash);

    // No drain delay; unset keys fall back to the gateway's defaults in the
    // computation too.
    let unset = gateway_shutdown(&yaml_documents(
        &render(
            cp,
            ns,
            &[
                "--set",
                "gateway.config.drainDelay=0s,gateway.config.shutdownGrace=null",
            ],
        )
        .await?,
    )?)?;
    assert_eq!(unset.config.drain_delay, Duration::ZERO);
    assert_eq!(unset.config.shutdown_grace, Duration::from_secs(25));
    assert_eq!(unset.grace_seconds, 35);

    // A configured grace period is kept when it exceeds the shutdown
    // (bad ones are refused: bad_values_fail_with_a_message_naming_the_value).
    let explicit = gateway_shutdown(&yaml_documents(
        &render(
            cp,
            ns,
            &["--set", "gateway.terminationGracePeriodSeconds=36"],
        )
        .await?,
    )?)?;
    assert_eq!(explicit.grace_seconds, 36);

    // The every-feature values file sets its own, large enough.
    let full = root().join("charts/spillway/ci/full-values.yaml");
    let full = gateway_shutdown(&yaml_documents(
        &render(cp, ns, &["-f", full.to_str().expect("utf-8")]).await?,
    )?)?;
    assert_eq!(full.config.drain_delay, Duration::from_secs(8));
    assert_eq!(full.config.max_concurrent_requests, 512);
    assert!(Duration::from_secs(full.grace_seconds) > full.shutdown());
    assert!(Duration::from_secs(full.readiness_window_seconds) < full.config.drain_delay);
    Ok(())
}

#[tokio::test]
async fn helm_install_prints_how_to_start_and_uninstalls() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-install").await?;
    let (chart, _copy) = installable_chart(cp).await?;
    let chart = chart.to_str().expect("utf-8 path");
    // The CRDs here are the harness's (applied with kubectl, shared by
    // every test), so this release leaves them to it (crds.enabled=false);
    // crds_are_templates_and_upgrade_with_the_chart covers the chart's own.
    let out = helm(
        cp,
        &[
            "install",
            "spw",
            chart,
            "-n",
            &ns,
            "--set",
            &format!("watchNamespace={ns}"),
            "--set",
            "crds.enabled=false",
        ],
    )
    .await?;
    for want in [
        "kubectl -n demo wait --for=condition=Ready whe/github",
        "kubectl -n demo apply -f examples/github.yaml",
        &format!("http://spw-spillway-gateway.{ns}.svc:80/"),
        &format!("kubectl -n {ns} port-forward svc/spw-spillway-gateway"),
        &format!("Spillway only watches namespace {ns}"),
    ] {
        assert!(out.contains(want), "NOTES lack {want:?}:\n{out}");
    }
    let deployments = cp
        .kubectl_output(&["get", "deploy", "-n", &ns, "-o", "name"])
        .await?;
    assert_eq!(
        deployments.lines().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "deployment.apps/spw-spillway-gateway",
            "deployment.apps/spw-spillway-operator"
        ])
    );
    helm(cp, &["uninstall", "spw", "-n", &ns, "--wait"]).await?;
    assert!(
        cp.kubectl_output(&["get", "deploy,role,sa", "-n", &ns, "-o", "name"])
            .await?
            .lines()
            .all(|l| l.ends_with("/default")),
        "uninstall removes what install created"
    );
    assert!(
        cp.kubectl_output(&["get", "crd", "webhookendpoints.spillway.dev", "-o", "name"])
            .await
            .is_ok(),
        "the CRD stays"
    );
    Ok(())
}

/// One value sets how every process logs; a component's own value still
/// overrides it.
#[tokio::test]
async fn one_logging_value_reaches_operator_gateway_and_processors() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-logging").await?;
    let objs = yaml_documents(&render(cp, &ns, &[]).await?)?;
    for (dep, var, want) in [
        ("-operator", "SPILLWAY_LOG_FORMAT", "json"),
        ("-operator", "SPILLWAY_PROCESSOR_LOG_FORMAT", "json"),
        ("-operator", "SPILLWAY_PROCESSOR_LOG_LEVEL", "info"),
        ("-operator", "RUST_LOG", "info"),
        ("-gateway", "SPILLWAY_GATEWAY_LOG_FORMAT", "json"),
        ("-gateway", "RUST_LOG", "info"),
    ] {
        assert_eq!(env(&objs, dep, var), Some(want), "{dep} {var}");
    }
    let text = yaml_documents(
        &render(
            cp,
            &ns,
            &[
                "--set",
                "logging.format=text",
                "--set",
                "logging.level=debug",
                "--set",
                "gateway.logLevel=warn",
            ],
        )
        .await?,
    )?;
    for (dep, var, want) in [
        ("-operator", "SPILLWAY_LOG_FORMAT", "text"),
        ("-operator", "SPILLWAY_PROCESSOR_LOG_FORMAT", "text"),
        ("-operator", "SPILLWAY_PROCESSOR_LOG_LEVEL", "debug"),
        ("-operator", "RUST_LOG", "debug"),
        ("-gateway", "SPILLWAY_GATEWAY_LOG_FORMAT", "text"),
        ("-gateway", "RUST_LOG", "warn"),
    ] {
        assert_eq!(env(&text, dep, var), Some(want), "{dep} {var}");
    }
    // The gateway's config file never carries an empty logFormat (the
    // gateway would refuse it); the format comes through the environment.
    let config = text
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["data"]["config.yaml"].as_str().is_some())
        .context("the gateway's ConfigMap")?;
    assert!(
        !config["data"]["config.yaml"]
            .as_str()
            .unwrap_or_default()
            .contains("logFormat"),
        "{config}"
    );
    Ok(())
}

/// `tracing.otlpEndpoint` turns on OTLP export in the gateway and (through
/// the operator) the processors, opens the gateway's egress to the
/// collector, and is off by default; a bad sampler is refused.
#[tokio::test]
async fn one_tracing_value_reaches_the_gateway_and_the_processors() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-tracing").await?;
    let plain = yaml_documents(&render(cp, &ns, &["--set", "networkPolicy.enabled=true"]).await?)?;
    for (dep, var) in [
        ("-gateway", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ("-operator", "SPILLWAY_PROCESSOR_OTLP_ENDPOINT"),
    ] {
        assert_eq!(env(&plain, dep, var), None, "{dep} {var} off by default");
    }
    let collector = "http://otel-collector.obs:4318";
    let traced = yaml_documents(
        &render(
            cp,
            &ns,
            &[
                "--set",
                &format!("tracing.otlpEndpoint={collector}"),
                "--set",
                "tracing.sampler=parentbased_traceidratio",
                "--set",
                "tracing.samplerArg=0.1",
                "--set",
                "networkPolicy.enabled=true",
            ],
        )
        .await?,
    )?;
    for (dep, var, want) in [
        ("-gateway", "OTEL_EXPORTER_OTLP_ENDPOINT", collector),
        ("-gateway", "OTEL_SERVICE_NAME", "spillway-gateway"),
        (
            "-gateway",
            "OTEL_TRACES_SAMPLER",
            "parentbased_traceidratio",
        ),
        ("-gateway", "OTEL_TRACES_SAMPLER_ARG", "0.1"),
        ("-operator", "SPILLWAY_PROCESSOR_OTLP_ENDPOINT", collector),
        (
            "-operator",
            "SPILLWAY_PROCESSOR_OTEL_SAMPLER",
            "parentbased_traceidratio",
        ),
        ("-operator", "SPILLWAY_PROCESSOR_OTEL_SAMPLER_ARG", "0.1"),
    ] {
        assert_eq!(env(&traced, dep, var), Some(want), "{dep} {var}");
    }
    let egress_ports = |objs: &[Value], component: &str| -> Vec<u64> {
        objs.iter()
            .filter(|o| {
                o["kind"] == "NetworkPolicy"
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(component))
            })
            .flat_map(|o| o["spec"]["egress"].as_array().cloned().unwrap_or_default())
            .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["port"].as_u64())
            .collect()
    };
    assert!(egress_ports(&traced, "-gateway").contains(&4318));
    assert!(!egress_ports(&plain, "-gateway").contains(&4318));
    assert!(!egress_ports(&traced, "-operator").contains(&4318));
    let bad = render(cp, &ns, &["--set", "tracing.sampler=sometimes"]).await;
    assert!(bad.is_err_and(|e| e.to_string().contains("sampler")));
    Ok(())
}

/// Every rule of the rendered PrometheusRule parses as PromQL (promtool is
/// not available here: `promql-parser`, the parser of GreptimeDB and
/// others, checks the expressions), refers to metrics Spillway exports, and
/// has a `for` and a severity.
fn check_alert_rules(objs: &[Value]) -> Result<()> {
    let rule = objs
        .iter()
        .find(|o| o["kind"] == "PrometheusRule")
        .context("a PrometheusRule")?;
    let mut alerts = Vec::new();
    for group in rule["spec"]["groups"].as_array().context("groups")? {
        for r in group["rules"].as_array().context("rules")? {
            let expr = r["expr"].as_str().context("expr")?;
            promql_parser::parser::parse(expr)
                .map_err(|e| anyhow::anyhow!("{}: {e}: {expr}", r["alert"]))?;
            assert!(expr.contains("spillway_"), "{expr}");
            assert!(r["for"].is_string(), "{r}");
            assert!(r["labels"]["severity"].is_string(), "{r}");
            alerts.push(r["alert"].as_str().unwrap_or_default().to_owned());
        }
    }
    for want in [
        "SpillwayEndpointNotReady",
        "SpillwayBacklogGrowing",
        "SpillwayOldestUndeliveredTooOld",
        "SpillwayWorkStreamFilling",
        "SpillwayDeadLetters",
        "SpillwaySinkGone",
        "SpillwayGatewayUnavailable",
        "SpillwayReconcileErrors",
        "SpillwayProcessorRetriesHigh",
    ] {
        assert!(
            alerts.iter().any(|a| a == want),
            "{want} missing: {alerts:?}"
        );
    }
    // A broken expression is caught.
    assert!(promql_parser::parser::parse("sum(rate(x[5m])").is_err());
    Ok(())
}

/// `platformAssignsIds` leaves user, group and fsGroup to the platform
/// (OpenShift restricted-v2) for the operator and the gateway, and tells the
/// operator to do the same for processor pods; the rest of the restricted
/// profile stays. And Chart.yaml's kubeVersion: older clusters are refused
/// before anything renders, and pathPolicy asks for 1.30.
#[tokio::test]
async fn platform_assigned_ids_and_kubernetes_versions() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("chart-openshift").await?;
    let yaml = render(cp, &ns, &["--set", "platformAssignsIds=true"]).await?;
    let objs = yaml_documents(&yaml)?;
    for (name, pod) in pod_specs(&objs) {
        let psc = pod["securityContext"]
            .as_object()
            .context("securityContext")?;
        for key in ["runAsUser", "runAsGroup", "fsGroup"] {
            assert!(!psc.contains_key(key), "{name}: {key} is set: {psc:?}");
        }
        assert_eq!(psc["runAsNonRoot"], true, "{name}");
        for c in pod["containers"].as_array().context("containers")? {
            assert!(c["securityContext"]["runAsUser"].is_null(), "{name}");
        }
    }
    assert_hardened(&objs);
    // Processor pods: no fsGroup either.
    let pod = processor_pod(&operator_settings(&objs)?)?;
    assert!(pod["securityContext"]["fsGroup"].is_null(), "{pod}");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let lines = dry_run_apply(cp, &yaml).await?;
    assert_eq!(lines.len(), objs.len(), "{lines:#?}");

    let chart_yaml: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("Chart.yaml"))?)?;
    assert_eq!(chart_yaml["kubeVersion"], ">=1.29.0-0");
    let err = render(cp, &ns, &["--kube-version", "1.28.9"])
        .await
        .expect_err("Kubernetes 1.28 is refused");
    assert!(
        err.to_string().contains("chart requires kubeVersion"),
        "{err}"
    );
    render(cp, &ns, &["--kube-version", "1.29.0"]).await?;
    let err = render(
        cp,
        &ns,
        &[
            "--kube-version",
            "1.29.4",
            "--set",
            "pathPolicy.requireNamespacePrefix=true",
        ],
    )
    .await
    .expect_err("pathPolicy on 1.29 is refused");
    assert!(
        err.to_string()
            .contains("pathPolicy.requireNamespacePrefix needs Kubernetes 1.30"),
        "{err}"
    );
    render(
        cp,
        &ns,
        &[
            "--kube-version",
            "1.30.0",
            "--set",
            "pathPolicy.requireNamespacePrefix=true",
        ],
    )
    .await?;
    Ok(())
}

/// Key paths of the official `nats` chart's values.yaml (nats-io/k8s, chart
/// version 2.14.2, helm/charts/nats/values.yaml) that
/// charts/spillway/nats-values.yaml may set. That chart ships no
/// values.schema.json, and it cannot be fetched where the tests run, so
/// this list is the minimal check: a misspelt key fails here instead of
/// being ignored by Helm. `merge` maps and `container.env` are free-form in
/// that chart (NATS configuration, environment variables). The file was also
/// rendered with that chart and the pinned helm, and the rendered nats.conf
/// accepted by `nats-server -t` (by hand, when this test was written).
const NATS_CHART_KEYS: &[&str] = &[
    "config.cluster.enabled",
    "config.cluster.replicas",
    "config.jetstream.enabled",
    "config.jetstream.fileStore.enabled",
    "config.jetstream.fileStore.pvc.size",
    "config.jetstream.fileStore.maxSize",
    "config.jetstream.merge",
    "config.merge",
    "container.env",
    "container.image.tag",
    "promExporter.enabled",
    "promExporter.podMonitor.enabled",
];

/// Dotted paths of the leaves of `v`, stopping at the free-form maps.
fn value_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v.as_object() {
        Some(m) if !prefix.ends_with("merge") && prefix != "container.env" => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                value_paths(v, &p, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

/// `<< $VAR >>` and `<< 9MB >>` as the nats chart writes them into
/// nats.conf: bare, so NATS reads a variable or a unit.
fn nats_conf_value(v: &Value, vars: &[(&str, &str)]) -> String {
    match v {
        Value::String(s) if s.starts_with("<< ") && s.ends_with(" >>") => {
            let inner = &s[3..s.len() - 3];
            vars.iter()
                .find(|(k, _)| inner == format!("${k}"))
                .map(|(_, v)| format!("{v:?}"))
                .unwrap_or_else(|| inner.to_owned())
        }
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{k:?}: {}", nats_conf_value(v, vars)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(a) => format!(
            "[{}]",
            a.iter()
                .map(|v| nats_conf_value(v, vars))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

/// charts/spillway/nats-values.yaml (docs/quickstart.md): keys the official
/// chart has; a 3-node JetStream cluster on files with sync_interval,
/// max_payload above the examples' bodies and the exporter; the processor
/// user exactly as `spillway nats-permissions` prints it; and its accounts
/// on a real nats-server: the operator creates a stream, the gateway
/// stores into it and gets the PubAck, a connection without credentials (the
/// processors) may not.
#[tokio::test]
async fn nats_values_fit_the_official_chart_and_spillway() -> Result<()> {
    let text = std::fs::read_to_string(chart().join("nats-values.yaml"))?;
    let v: Value = serde_saphyr::from_str(&text)?;
    let mut paths = Vec::new();
    value_paths(&v, "", &mut paths);
    for p in &paths {
        assert!(
            NATS_CHART_KEYS.contains(&p.as_str()),
            "{p} is not a value of the nats chart 2.14.2"
        );
    }
    let c = &v["config"];
    assert_eq!(c["cluster"]["enabled"], true);
    assert_eq!(c["cluster"]["replicas"], 3);
    assert_eq!(c["jetstream"]["enabled"], true);
    assert_eq!(c["jetstream"]["fileStore"]["enabled"], true);
    assert!(c["jetstream"]["merge"]["sync_interval"].is_string());
    assert_eq!(v["promExporter"]["enabled"], true);
    // The server the tests run (hack/install-tools.sh's pin).
    let install = std::fs::read_to_string(root().join("hack/install-tools.sh"))?;
    let pinned = install
        .lines()
        .find_map(|l| l.strip_prefix("NATS_SERVER_VERSION="))
        .context("NATS_SERVER_VERSION in hack/install-tools.sh")?;
    assert_eq!(
        v["container"]["image"]["tag"],
        format!("{pinned}-alpine").as_str(),
        "the NATS chart's server is not the one the tests run"
    );
    // max_payload above every example's maxBodyBytes (headers need room).
    let max_payload = c["merge"]["max_payload"].as_str().context("max_payload")?;
    let mb: u64 = max_payload
        .trim_start_matches("<< ")
        .trim_end_matches("MB >>")
        .parse()?;
    for entry in std::fs::read_dir(root().join("examples"))? {
        let yaml = std::fs::read_to_string(entry?.path())?;
        for doc in yaml_documents(&yaml)? {
            if let Some(max) = doc["spec"]["ingress"]["maxBodyBytes"].as_u64() {
                assert!(mb * 1_000_000 > max + 64 * 1024, "{max_payload} vs {max}");
            }
        }
    }
    // Users: the processors' from the same function as the CLI's command.
    let users = c["merge"]["accounts"]["SPILLWAY"]["users"]
        .as_array()
        .context("users")?;
    let user = |name: &str| {
        users
            .iter()
            .find(|u| u["user"] == name)
            .unwrap_or_else(|| panic!("user {name}"))
    };
    let want = spillway_api::tenancy::processor_permissions("demo", &["github".into()]);
    let p = &user("spillway-processor-demo")["permissions"];
    assert_eq!(p["publish"]["allow"], serde_json::json!(want.publish));
    assert_eq!(p["subscribe"]["allow"], serde_json::json!(want.subscribe));
    let g = &user("spillway-gateway")["permissions"];
    assert_eq!(g["publish"]["allow"], serde_json::json!(["spillway.in.>"]));
    assert_eq!(g["subscribe"]["allow"], serde_json::json!(["_INBOX.>"]));
    assert_eq!(c["merge"]["no_auth_user"], "spillway-processor-demo");

    // The accounts on a real nats-server.
    let vars = [
        ("SPILLWAY_OPERATOR_PASSWORD", "op-pw"),
        ("SPILLWAY_GATEWAY_PASSWORD", "gw-pw"),
        ("SPILLWAY_PROCESSOR_DEMO_PASSWORD", "pr-pw"),
    ];
    let extra = format!(
        "accounts: {}\nno_auth_user: {:?}\n",
        nats_conf_value(&c["merge"]["accounts"], &vars),
        "spillway-processor-demo"
    );
    let nats = spillway_tests::NatsServer::start_with(&extra).await?;
    let login = |u: &'static str, pw: &'static str| {
        async_nats::ConnectOptions::with_user_and_password(u.into(), pw.into())
            .connect(nats.url.clone())
    };
    let names = spillway_api::names::EndpointNames::new("demo", "github");
    let op = async_nats::jetstream::new(login("spillway-operator", "op-pw").await?);
    op.create_stream(async_nats::jetstream::stream::Config {
        name: names.stream(),
        subjects: vec![names.stream_subjects()],
        ..Default::default()
    })
    .await
    .context("the operator creates a stream")?;
    let mut gw = async_nats::jetstream::new(login("spillway-gateway", "gw-pw").await?);
    gw.set_timeout(Duration::from_secs(2));
    gw.publish(names.subject(0), "{}".into())
        .await?
        .await
        .context("the gateway stores a webhook and gets the PubAck")?;
    let mut anon = async_nats::jetstream::new(
        async_nats::ConnectOptions::new()
            .connect(nats.url.clone())
            .await?,
    );
    anon.set_timeout(Duration::from_secs(2));
    let refused = match anon.publish(names.subject(0), "{}".into()).await {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a processor may not store webhooks");
    assert!(
        login("spillway-gateway", "wrong").await.is_err(),
        "passwords are checked"
    );
    Ok(())
}

/// The CRDs are chart templates: `helm install` creates them, `helm
/// upgrade` with a changed CRD applies the change on the real API server,
/// and `helm uninstall` keeps them (`crds.keep`). On a control plane of its
/// own: CRDs are cluster-wide.
#[tokio::test]
async fn crds_are_templates_and_upgrade_with_the_chart() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let ns = cp.namespace("chart-crds").await?;
    let dir = tempfile::tempdir()?;
    let (source, _copy) = installable_chart(&cp).await?;
    let chart = dir.path().join("spillway");
    let status = std::process::Command::new("cp")
        .arg("-R")
        .arg(&source)
        .arg(&chart)
        .status()?;
    anyhow::ensure!(status.success(), "copying the chart");
    let chart_arg = chart.to_str().expect("utf-8 path");

    // Rendering follows crds.enabled and crds.keep.
    let off = helm(
        &cp,
        &["template", "t", chart_arg, "--set", "crds.enabled=false"],
    )
    .await?;
    assert!(
        !off.contains("kind: CustomResourceDefinition"),
        "crds.enabled=false renders none"
    );
    let loose = helm(
        &cp,
        &["template", "t", chart_arg, "--set", "crds.keep=false"],
    )
    .await?;
    assert_eq!(loose.matches("kind: CustomResourceDefinition").count(), 2);
    assert!(
        !loose.contains("helm.sh/resource-policy"),
        "crds.keep=false: no keep policy"
    );

    let install = [
        "install",
        "spw",
        chart_arg,
        "-n",
        &ns,
        "--set",
        &format!("watchNamespace={ns}"),
    ];
    helm(&cp, &install).await?;
    let short_names = |crd: &'static str| {
        let cp = &cp;
        async move {
            cp.kubectl_output(&["get", "crd", crd, "-o", "jsonpath={.spec.names.shortNames}"])
                .await
        }
    };
    assert_eq!(
        short_names("webhookendpoints.spillway.dev").await?,
        r#"["whe"]"#
    );
    assert_eq!(
        short_names("webhooklisteners.spillway.dev").await?,
        r#"["whl"]"#
    );
    let policy = cp
        .kubectl_output(&[
            "get",
            "crd",
            "webhookendpoints.spillway.dev",
            "-o",
            r"jsonpath={.metadata.annotations.helm\.sh/resource-policy}",
        ])
        .await?;
    assert_eq!(policy, "keep");

    // A new chart version whose CRD changed: the upgrade applies it.
    let template = chart.join("templates/crds.yaml");
    let text = std::fs::read_to_string(&template)?;
    let changed = text.replacen("    - whe\n", "    - whe\n    - whep\n", 1);
    anyhow::ensure!(changed != text, "the CRD template lists short name whe");
    std::fs::write(&template, changed)?;
    let upgrade = [
        "upgrade",
        "spw",
        chart_arg,
        "-n",
        &ns,
        "--set",
        &format!("watchNamespace={ns}"),
    ];
    helm(&cp, &upgrade).await?;
    assert_eq!(
        short_names("webhookendpoints.spillway.dev").await?,
        r#"["whe","whep"]"#,
        "helm upgrade updated the CRD"
    );
    // The new short name is served.
    cp.kubectl_output(&["get", "whep", "-n", &ns]).await?;

    helm(&cp, &["uninstall", "spw", "-n", &ns, "--wait"]).await?;
    for crd in [
        "webhookendpoints.spillway.dev",
        "webhooklisteners.spillway.dev",
    ] {
        assert!(
            cp.kubectl_output(&["get", "crd", crd, "-o", "name"])
                .await
                .is_ok(),
            "{crd} kept after uninstall"
        );
    }
    Ok(())
}

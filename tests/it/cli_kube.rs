//! `spillway status` and `spillway send` reading WebhookEndpoints from a real
//! kube-apiserver, with live numbers from a real nats-server.

use std::time::Duration;

use crate::processor_support::*;
use anyhow::Result;
use spillway_tests::{ControlPlane, NatsServer, bin_path, eventually};

fn endpoint_yaml(ns: &str) -> String {
    format!(
        r#"apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: hooks, namespace: {ns}}}
spec:
  verification: {{scheme: github, secretRefs: [{{name: gh, key: secret}}]}}
  processor: {{sink: {{url: "http://sink:8080/hook"}}, paused: true}}
"#
    )
}

const STATUS_PATCH: &str = r#"{"status":{"path":"/team/hooks","replicas":{"desired":2,"ready":1},
 "backlog":{"pending":40,"ackPending":2,"redelivered":0},"deadLetters":9,
 "conditions":[{"type":"Ready","status":"True","reason":"Ready","message":"serving","lastTransitionTime":"2026-01-01T00:00:00Z"}]}}"#;

/// A fresh namespace (named after `prefix`) holding the endpoint `hooks`
/// with the status of [`STATUS_PATCH`].
async fn endpoint_with_status(cp: &ControlPlane, prefix: &str) -> Result<String> {
    let ns = cp.namespace(prefix).await?;
    cp.kubectl_stdin(&["apply", "-f", "-"], &endpoint_yaml(&ns))
        .await?;
    cp.kubectl_output(&[
        "patch",
        "-n",
        &ns,
        "webhookendpoint",
        "hooks",
        "--subresource=status",
        "--type=merge",
        "-p",
        STATUS_PATCH,
    ])
    .await?;
    Ok(ns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_path_readiness_backlog_dead_letters_and_replicas() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = endpoint_with_status(cp, "cli-status").await?;
    let nats = NatsServer::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            namespace: ns.clone(),
            ..Setup::default()
        },
    )
    .await?;
    for i in 0..3 {
        ep.publish(&format!("s{i}"), None, "{}").await?;
    }
    ep.js
        .publish(ep.names.dead_letter_subject(), "{}".into())
        .await?
        .await?;

    let kubeconfig = cp.kubeconfig.display().to_string();
    let env = [
        ("NATS_URL", nats.url.as_str()),
        ("KUBECONFIG", kubeconfig.as_str()),
    ];
    let target = format!("{ns}/hooks");
    let one = spillway_ok(&["status", &target], &env).await?;
    let o = &one.stdout;
    assert!(o.contains("/team/hooks"), "{o}");
    assert!(o.contains("Ready:         True"), "{o}");
    assert!(
        o.contains("Backlog:       3"),
        "live backlog, not the status' 40:\n{o}"
    );
    assert!(o.contains("In flight:     0"), "{o}");
    assert!(o.contains("Dead letters:  1"), "{o}");
    assert!(o.contains("Replicas:      1/2"), "{o}");
    assert!(o.contains("paused"), "{o}");

    // The table for the namespace (bare names resolve with -n too).
    let table = spillway_ok(&["status", "-n", &ns], &env).await?;
    let row = table
        .stdout
        .lines()
        .find(|l| l.starts_with(&target))
        .unwrap_or_else(|| panic!("no row for {target}:\n{}", table.stdout));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[1..4], ["/team/hooks", "True", "3"], "{row}");
    let bare = spillway_ok(&["status", "hooks", "-n", &ns], &env).await?;
    assert!(bare.stdout.contains("Backlog:       3"));

    // The same for scripts: -o json (one object, or {"items": [...]}) and yaml.
    let j = spillway_ok(&["status", &target, "-o", "json"], &env).await?;
    let v: serde_json::Value = serde_json::from_str(&j.stdout)?;
    assert_eq!(v["namespace"], ns.as_str(), "{v}");
    assert_eq!(v["name"], "hooks");
    assert_eq!(v["path"], "/team/hooks");
    assert_eq!(v["ready"], "True");
    assert!(v["readyReason"].is_null(), "{v}");
    assert_eq!(v["backlog"], 3, "live, not the status' 40: {v}");
    assert_eq!(v["inFlight"], 0);
    assert_eq!(v["deadLetters"], 1);
    assert_eq!(v["source"], "jetstream");
    assert_eq!(v["replicas"], serde_json::json!({"desired": 2, "ready": 1}));
    assert_eq!(v["paused"], true);
    assert_eq!(v["suspended"], false);
    assert_eq!(v["conditions"][0]["type"], "Ready");
    let j = spillway_ok(&["status", "-n", &ns, "--output=json"], &env).await?;
    let v: serde_json::Value = serde_json::from_str(&j.stdout)?;
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["name"], "hooks");
    assert_eq!(items[0]["backlog"], 3);
    let y = spillway_ok(&["status", &target, "-o", "yaml"], &env).await?;
    let v: serde_json::Value = serde_saphyr::from_str(&y.stdout)?;
    assert_eq!(v["deadLetters"], 1, "{}", y.stdout);
    let empty_ns = cp.namespace("cli-status-empty").await?;
    let j = spillway_ok(&["status", "-n", &empty_ns, "-o", "json"], &env).await?;
    let v: serde_json::Value = serde_json::from_str(&j.stdout)?;
    assert_eq!(v, serde_json::json!({"items": []}));

    // NATS unreachable: the numbers the operator wrote into the status.
    let env_down = [
        ("NATS_URL", "nats://127.0.0.1:1"),
        ("KUBECONFIG", kubeconfig.as_str()),
    ];
    let down = spillway_ok(&["status", &target], &env_down).await?;
    assert!(down.stdout.contains("Backlog:       40"), "{}", down.stdout);
    assert!(
        down.stdout
            .contains("live JetStream numbers were not available"),
        "{}",
        down.stdout
    );
    assert!(down.stderr.contains("NATS"), "{}", down.stderr);
    let down = spillway_ok(&["status", &target, "-o", "json"], &env_down).await?;
    let v: serde_json::Value = serde_json::from_str(&down.stdout)?;
    assert_eq!(v["source"], "status", "{v}");
    assert_eq!(v["backlog"], 40);
    assert_eq!(v["inFlight"], 2);
    assert_eq!(v["deadLetters"], 9);

    // A missing endpoint is an error that says so.
    let missing = spillway(&["status", &format!("{ns}/nope")], &env).await?;
    assert!(
        !missing.success && missing.stderr.contains("nope"),
        "{}",
        missing.stderr
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_takes_scheme_and_path_from_the_endpoint() -> Result<()> {
    use hmac::{Hmac, Mac};
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("cli-send").await?;
    cp.kubectl_stdin(&["apply", "-f", "-"], &endpoint_yaml(&ns))
        .await?;
    cp.kubectl_output(&[
        "patch",
        "-n",
        &ns,
        "webhookendpoint",
        "hooks",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"path":"/gh/acme"}}"#,
    ])
    .await?;
    // A stand-in gateway that records what it gets.
    let gw = Sink::start().await?;
    let base = gw.url.trim_end_matches("/hook").to_owned();
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("secret"), "It's a Secret to Everybody\n")?;
    std::fs::write(
        dir.path().join("body.json"),
        r#"{"zen":"Keep it logically awesome."}"#,
    )?;
    let kubeconfig = cp.kubeconfig.display().to_string();
    let secret = dir.path().join("secret").display().to_string();
    let body = dir.path().join("body.json").display().to_string();
    let out = spillway_ok(
        &[
            "send",
            "hooks",
            "-n",
            &ns,
            "--secret-from",
            &secret,
            "--gateway",
            &base,
            "-H",
            "X-GitHub-Event: push",
            &body,
        ],
        &[("KUBECONFIG", kubeconfig.as_str())],
    )
    .await?;
    assert!(out.stdout.contains("github signed"), "{}", out.stdout);
    assert!(out.stdout.contains("/gh/acme"), "{}", out.stdout);
    eventually(Duration::from_secs(5), "received", || async {
        gw.count() == 1
    })
    .await?;
    let r = &gw.received()[0];
    let sig = r
        .headers
        .get("x-hub-signature-256")
        .unwrap()
        .to_str()?
        .to_owned();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"It's a Secret to Everybody")?;
    mac.update(&r.body);
    let want = format!("sha256={}", hex_lower(&mac.finalize().into_bytes()));
    assert_eq!(sig, want);
    assert_eq!(r.headers.get("x-github-event").unwrap(), "push");
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    Ok(())
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `kubectl spillway ...` with the real kubectl: the binary linked as
/// `kubectl-spillway` on PATH is found by kubectl's plugin discovery and gets
/// the environment (KUBECONFIG) and the arguments after `spillway`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_spillway_is_the_cli_as_a_kubectl_plugin() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = endpoint_with_status(cp, "cli-plugin").await?;
    let bin = tempfile::tempdir()?;
    let plugin = bin.path().join("kubectl-spillway");
    std::os::unix::fs::symlink(bin_path("spillway"), &plugin)?;
    // Only the plugin's directory on PATH: kubectl is run by its full path.
    let kubectl = |args: &[&str]| {
        let mut c = cp.kubectl();
        c.env("PATH", bin.path())
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env_remove("NATS_CREDS")
            .args(args);
        async move {
            let out = c.output().await.expect("running kubectl");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };

    let (ok, list, err) = kubectl(&["plugin", "list"]).await;
    assert!(ok, "{list}{err}");
    assert!(
        list.contains(&plugin.display().to_string()),
        "kubectl plugin list:\n{list}{err}"
    );

    // KUBECONFIG reaches the plugin through the environment.
    let (ok, out, err) = kubectl(&["spillway", "status", "hooks", "-n", &ns, "-o", "json"]).await;
    assert!(ok, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["namespace"], ns.as_str(), "{v}");
    assert_eq!(v["name"], "hooks");
    assert_eq!(v["path"], "/team/hooks");
    assert_eq!(v["source"], "status", "NATS is unreachable here: {v}");
    assert_eq!(v["backlog"], 40);
    assert!(err.contains("NATS"), "{err}");

    // The table, and kubectl's own flags given after `spillway` (kubectl
    // does not pass its flags before the plugin name to plugins).
    let kubeconfig = cp.kubeconfig.display().to_string();
    let mut c = cp.kubectl();
    c.env_remove("KUBECONFIG")
        .env("PATH", bin.path())
        .env("NATS_URL", "nats://127.0.0.1:1")
        .args(["spillway", "--kubeconfig", &kubeconfig, "-n", &ns, "status"]);
    let out = c.output().await?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&format!("{ns}/hooks")))
        .unwrap_or_else(|| panic!("no row:\n{table}"));
    assert!(row.contains("/team/hooks"), "{row}");

    // Help speaks of `kubectl spillway`.
    let (ok, help, err) = kubectl(&["spillway", "status", "--help"]).await;
    assert!(ok, "{help}{err}");
    assert!(help.contains("Usage: kubectl spillway status"), "{help}");
    Ok(())
}

/// `spillway --port-forward --spillway-namespace INSTALLATION dlq list`.
async fn port_forward_dlq_list(installation: &str, kubeconfig: &str) -> Result<CliOutput> {
    spillway(
        &[
            "--port-forward",
            "--spillway-namespace",
            installation,
            "dlq",
            "list",
            "default/hooks",
        ],
        &[("KUBECONFIG", kubeconfig)],
    )
    .await
}

/// `--port-forward` finds the installation the chart made (its operator
/// Deployment, rendered by `helm template` and applied), reads the NATS URL
/// and the credentials Secret the chart gave it, resolves the NATS Service
/// to a ready pod through its EndpointSlice and opens a port-forward to it.
/// This control plane has no kubelet, so the API server refuses the
/// port-forward itself: the test checks what was found on the way and that
/// the error names the pod. Without an installation, or with two, it says
/// what to pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_finds_the_installation_its_nats_service_and_a_ready_pod() -> Result<()> {
    use spillway_tests::yaml_documents;
    let cp = ControlPlane::shared().await;
    let spw = cp.namespace("pf-spillway").await?;
    let nats_ns = cp.namespace("pf-nats").await?;
    let chart = spillway_tests::root().join("charts/spillway");
    let out = cp
        .helm()
        .args([
            "template",
            "spw",
            chart.to_str().unwrap(),
            "--namespace",
            &spw,
            "--set",
            "crds.enabled=false",
            "--set",
            &format!("nats.url=nats://nats.{nats_ns}.svc:4222"),
            "--set",
            "nats.credentials.secretName=nats-operator",
            "--set",
            "nats.credentials.key=operator.creds",
        ])
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let operator = yaml_documents(&String::from_utf8(out.stdout)?)?
        .into_iter()
        .find(|o| {
            o["kind"] == "Deployment"
                && o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
        })
        .expect("the chart's operator Deployment");
    cp.kubectl_stdin(&["apply", "-n", &spw, "-f", "-"], &operator.to_string())
        .await?;
    let user = nkeys::KeyPair::new_user();
    let creds = crate::gateway_nats_auth::creds("eyJ0eXAiOiJKV1QifQ.e30.c2ln", &user);
    let objects = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Secret",
         "metadata": {"name": "nats-operator", "namespace": spw},
         "stringData": {"operator.creds": creds}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "nats", "namespace": nats_ns},
         "spec": {"selector": {"app": "nats"},
                  "ports": [{"name": "client", "port": 4222, "targetPort": "client"}]}},
        // No controller manager here to make it.
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "default", "namespace": nats_ns}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "nats-1", "namespace": nats_ns, "labels": {"app": "nats"}},
         "spec": {"containers": [{"name": "nats", "image": "nats:2.14",
                  "ports": [{"name": "client", "containerPort": 4322}]}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "nats-x1", "namespace": nats_ns,
                      "labels": {"kubernetes.io/service-name": "nats"}},
         "addressType": "IPv4",
         "ports": [{"name": "client", "port": 4322, "protocol": "TCP"}],
         "endpoints": [
            {"addresses": ["10.0.0.8"], "conditions": {"ready": false},
             "targetRef": {"kind": "Pod", "name": "nats-0", "namespace": nats_ns}},
            {"addresses": ["10.0.0.9"], "conditions": {"ready": true},
             "targetRef": {"kind": "Pod", "name": "nats-1", "namespace": nats_ns}}]}
    ]});
    cp.kubectl_stdin(&["apply", "-f", "-"], &objects.to_string())
        .await?;

    let kubeconfig = cp.kubeconfig.display().to_string();
    let out = port_forward_dlq_list(&spw, &kubeconfig).await?;
    assert!(!out.success, "no kubelet here: {out:?}");
    for want in [
        format!(
            "NATS through port-forward to pod {nats_ns}/nats-1 port 4322 (Service nats, as told to {spw}/spw-spillway-operator; credentials from Secret {spw}/nats-operator)"
        ),
        format!("port-forward to pod {nats_ns}/nats-1 port 4322"),
    ] {
        assert!(
            out.stderr.contains(&want),
            "want {want:?} in:\n{}",
            out.stderr
        );
    }
    assert!(!out.stderr.contains("SEED"), "no credentials in output");

    // Another namespace: nothing there.
    let empty = cp.namespace("pf-empty").await?;
    let out = port_forward_dlq_list(&empty, &kubeconfig).await?;
    assert!(!out.success);
    assert!(
        out.stderr.contains("no Spillway installation found")
            && out.stderr.contains("--spillway-namespace"),
        "{}",
        out.stderr
    );

    // The credentials Secret unreadable (deleted here): said, and the
    // connection is still tried.
    cp.kubectl_output(&["delete", "secret", "-n", &spw, "nats-operator"])
        .await?;
    let out = port_forward_dlq_list(&spw, &kubeconfig).await?;
    assert!(
        out.stderr
            .contains(&format!("reading Secret {spw}/nats-operator"))
            && out
                .stderr
                .contains("connecting without the installation's NATS credentials")
            && out
                .stderr
                .contains(&format!("port-forward to pod {nats_ns}/nats-1")),
        "{}",
        out.stderr
    );
    Ok(())
}

//! The chart's optional path policy (`pathPolicy.requireNamespacePrefix`):
//! a ValidatingAdmissionPolicy and its binding, rendered by helm and applied
//! to the real test kube-apiserver. With it, a WebhookEndpoint whose
//! `spec.path` does not start with `/<its namespace>/` is refused with a
//! message naming the required prefix; an own-namespace path and the
//! default path are accepted; exempt namespaces may use any path; endpoints
//! created before the policy keep their path (updates that leave it alone
//! pass, moving it elsewhere does not); `validationActions: [Warn]` accepts
//! with a warning. Also: what the policy would do to the repository's
//! examples, and that it is off by default with checked values.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use spillway_tests::{ControlPlane, root, yaml_documents};

/// Release name of the live test: the policy is `pp-spillway-endpoint-path`.
const RELEASE: &str = "pp";
const POLICY: &str = "pp-spillway-endpoint-path";
/// How long a new or changed policy may take to be enforced.
const EFFECTIVE: Duration = Duration::from_secs(30);

/// `helm template` of the chart as `release` in `spillway-system`.
async fn render(cp: &ControlPlane, release: &str, set: &[&str]) -> Result<String> {
    let mut cmd = cp.helm();
    cmd.args(["template", release])
        .arg(root().join("charts/spillway"))
        .args(["--namespace", "spillway-system"])
        .stdin(Stdio::null());
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().await.context("running helm")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The rendered admission objects (ValidatingAdmissionPolicy and binding).
fn admission_objects(yaml: &str) -> Result<Vec<Value>> {
    Ok(yaml_documents(yaml)?
        .into_iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .is_some_and(|a| a.starts_with("admissionregistration.k8s.io/"))
        })
        .collect())
}

fn to_yaml(objs: &[Value]) -> String {
    objs.iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).expect("YAML")))
        .collect()
}

/// What kubectl said: success, stdout and stderr.
struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn kubectl(cp: &ControlPlane, args: &[&str], stdin: Option<&str>) -> Result<Outcome> {
    use tokio::io::AsyncWriteExt;
    let mut child = cp
        .kubectl()
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl")?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .await?;
    }
    let out = child.wait_with_output().await?;
    Ok(Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// A minimal WebhookEndpoint; `path: None` leaves `spec.path` unset.
fn endpoint(ns: &str, name: &str, path: Option<&str>) -> String {
    let path = path.map(|p| format!("  path: {p:?}\n")).unwrap_or_default();
    format!(
        "apiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{path}  verification: {{scheme: none}}\n  processor:\n    sink: {{url: \"http://sink.example:8080/\"}}\n"
    )
}

/// `kubectl create` an endpoint (optionally as a server-side dry run).
async fn create(
    cp: &ControlPlane,
    ns: &str,
    name: &str,
    path: Option<&str>,
    dry_run: bool,
) -> Result<Outcome> {
    let mut args = vec!["create", "-f", "-"];
    if dry_run {
        args.push("--dry-run=server");
    }
    kubectl(cp, &args, Some(&endpoint(ns, name, path))).await
}

/// Whether kubectl's stderr carries the policy's denial of `path` in `ns`
/// (the message names the required prefix and the refused path).
fn denied(stderr: &str, ns: &str, path: &str) -> bool {
    stderr.contains(&format!(
        "spec.path must start with /{ns}/ (the endpoint namespace) or be left unset (default /{ns}/"
    )) && stderr.contains(&format!("); got {path}"))
}

/// Poll (bounded) until `f` holds; a new or changed policy takes a moment
/// to be enforced.
async fn until(what: &str, mut f: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        if f().await? {
            return Ok(());
        }
        if start.elapsed() > EFFECTIVE {
            bail!("timed out after {EFFECTIVE:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn exists(cp: &ControlPlane, ns: &str, name: &str) -> Result<bool> {
    Ok(
        kubectl(cp, &["get", "whe", name, "-n", ns, "-o", "name"], None)
            .await?
            .ok,
    )
}

/// The WebhookEndpoint paths a YAML file sets (`None`: left unset).
fn example_paths(text: &str) -> Result<Vec<Option<String>>> {
    Ok(yaml_documents(text)?
        .into_iter()
        .filter(|o| o["kind"] == "WebhookEndpoint")
        .map(|o| o["spec"]["path"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn namespace_prefix_policy_on_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared().await;

    // The API server must serve the v1 policy API (GA and on by default
    // since Kubernetes 1.30; tests/src/lib.rs sets no --runtime-config or
    // admission plugin flags that would turn it off).
    let served = cp
        .kubectl_output(&[
            "api-resources",
            "--api-group=admissionregistration.k8s.io",
            "-o",
            "name",
        ])
        .await?;
    for r in [
        "validatingadmissionpolicies.admissionregistration.k8s.io",
        "validatingadmissionpolicybindings.admissionregistration.k8s.io",
    ] {
        assert!(
            served.lines().any(|l| l == r),
            "the test kube-apiserver does not serve {r}:\n{served}"
        );
    }

    let a = cp.namespace("pp-team-a").await?;
    let b = cp.namespace("pp-team-b").await?;
    let platform = cp.namespace("pp-platform").await?;

    // Created before the policy: a foreign path the policy would refuse.
    let legacy_path = format!("/{a}/legacy");
    let out = create(cp, &b, "legacy", Some(&legacy_path), false).await?;
    assert!(out.ok, "before the policy: {}", out.stderr);

    // Render with the policy on and one exempt namespace; apply only the
    // admission objects.
    let exempt = format!("pathPolicy.exemptNamespaces={{{platform}}}");
    let yaml = render(
        cp,
        RELEASE,
        &["pathPolicy.requireNamespacePrefix=true", &exempt],
    )
    .await?;
    let policy = admission_objects(&yaml)?;
    let kinds: Vec<&str> = policy
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    for o in &policy {
        assert_eq!(o["apiVersion"], "admissionregistration.k8s.io/v1");
        assert_eq!(o["metadata"]["name"], POLICY);
    }
    let binding = &policy[1];
    assert_eq!(binding["spec"]["policyName"], POLICY);
    assert_eq!(
        binding["spec"]["validationActions"],
        serde_json::json!(["Deny"])
    );
    assert_eq!(
        binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"],
        serde_json::json!([{
            "key": "kubernetes.io/metadata.name",
            "operator": "NotIn",
            "values": [platform],
        }])
    );
    let manifest = to_yaml(&policy);
    cp.kubectl_stdin(&["apply", "-f", "-"], &manifest)
        .await
        .context("applying the policy objects")?;

    // Enforced once the API server has loaded it (server-side dry runs, so
    // nothing is created while it is not yet).
    let foreign = format!("/{a}/hook");
    until("the policy to refuse a foreign path", async || {
        let out = create(cp, &b, "probe", Some(&foreign), true).await?;
        Ok(!out.ok && denied(&out.stderr, &b, &foreign))
    })
    .await?;

    // Refused: another namespace's path, the bare namespace, a namespace
    // that merely starts with b's name, a path outside any namespace.
    for (name, path) in [
        ("foreign", foreign.clone()),
        ("bare", format!("/{b}")),
        ("lookalike", format!("/{b}x/hook")),
        ("global", "/stripe".to_owned()),
    ] {
        let out = create(cp, &b, name, Some(&path), false).await?;
        assert!(!out.ok, "{path} was accepted in {b}");
        assert!(denied(&out.stderr, &b, &path), "{path}: {}", out.stderr);
        for want in [
            format!("(default /{b}/{name}); got {path}"),
            format!("ValidatingAdmissionPolicy '{POLICY}'"),
        ] {
            assert!(
                out.stderr.contains(&want),
                "{path}: the error lacks {want:?}:\n{}",
                out.stderr
            );
        }
        assert!(!exists(cp, &b, name).await?, "{name} was not created");
    }

    // Accepted: own-namespace paths and the default path.
    let own = format!("/{b}/hook");
    for (name, path) in [
        ("own", Some(own.clone())),
        ("nested", Some(format!("/{b}/github/acme"))),
        ("default", None),
    ] {
        let out = create(cp, &b, name, path.as_deref(), false).await?;
        assert!(out.ok, "{path:?} refused in {b}: {}", out.stderr);
        assert!(exists(cp, &b, name).await?);
    }

    // Updates: moving an endpoint to a foreign path is refused.
    let to_foreign = format!(r#"{{"spec":{{"path":"{foreign}"}}}}"#);
    let out = kubectl(
        cp,
        &[
            "patch",
            "whe",
            "own",
            "-n",
            &b,
            "--type=merge",
            "-p",
            &to_foreign,
        ],
        None,
    )
    .await?;
    assert!(!out.ok, "own moved to {foreign}");
    assert!(denied(&out.stderr, &b, &foreign), "{}", out.stderr);
    let path = cp
        .kubectl_output(&["get", "whe", "own", "-n", &b, "-o", "jsonpath={.spec.path}"])
        .await?;
    assert_eq!(path, own);

    // The endpoint from before the policy keeps its path: an update that
    // leaves it alone passes (so finalizers can be removed), moving it to
    // another foreign path does not, and it can be deleted.
    let out = kubectl(
        cp,
        &["label", "whe", "legacy", "-n", &b, "audit=pending"],
        None,
    )
    .await?;
    assert!(out.ok, "labelling legacy: {}", out.stderr);
    let elsewhere = format!("/{a}/elsewhere");
    let out = kubectl(
        cp,
        &[
            "patch",
            "whe",
            "legacy",
            "-n",
            &b,
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"path":"{elsewhere}"}}}}"#),
        ],
        None,
    )
    .await?;
    assert!(!out.ok, "legacy moved to {elsewhere}");
    assert!(denied(&out.stderr, &b, &elsewhere), "{}", out.stderr);
    cp.kubectl_output(&["delete", "whe", "legacy", "-n", &b])
        .await?;

    // The exempt namespace may use any path.
    for (name, path) in [
        ("platform-a", foreign.clone()),
        ("stripe", "/stripe".into()),
    ] {
        let out = create(cp, &platform, name, Some(&path), false).await?;
        assert!(
            out.ok,
            "{path} refused in exempt {platform}: {}",
            out.stderr
        );
    }

    // The repository's examples, applied in one namespace: a file is
    // refused exactly when one of its endpoints sets a path outside it.
    let mut refused = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    assert!(!files.is_empty(), "examples/*.yaml");
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let paths = example_paths(&text)?;
        let bad = paths
            .iter()
            .flatten()
            .find(|p| !p.starts_with(&format!("/{b}/")));
        let out = kubectl(
            cp,
            &["create", "--dry-run=server", "-n", &b, "-f", "-"],
            Some(&text),
        )
        .await?;
        let what = file.file_name().unwrap_or_default().to_string_lossy();
        match bad {
            Some(p) => {
                assert!(!out.ok, "{what} (path {p}) was accepted");
                assert!(denied(&out.stderr, &b, p), "{what}: {}", out.stderr);
                refused.push(format!("{what} ({p})"));
            }
            None => assert!(out.ok, "{what} refused: {}", out.stderr),
        }
    }
    eprintln!(
        "examples refused with the policy on: {}/{}: {refused:?}",
        refused.len(),
        files.len()
    );

    // validationActions [Warn]: accepted, with the message as a warning.
    let yaml = render(
        cp,
        RELEASE,
        &[
            "pathPolicy.requireNamespacePrefix=true",
            &exempt,
            "pathPolicy.validationActions={Warn}",
        ],
    )
    .await?;
    let warn = to_yaml(&admission_objects(&yaml)?);
    cp.kubectl_stdin(&["apply", "-f", "-"], &warn).await?;
    until("the Warn binding to be enforced", async || {
        Ok(create(cp, &b, "probe", Some(&foreign), true).await?.ok)
    })
    .await?;
    let out = create(cp, &b, "warned", Some(&foreign), false).await?;
    assert!(out.ok, "Warn refused: {}", out.stderr);
    assert!(
        out.stderr.contains("Warning:") && denied(&out.stderr, &b, &foreign),
        "kubectl shows the warning: {}",
        out.stderr
    );
    assert!(out.stdout.contains("warned"), "{}", out.stdout);

    cp.kubectl_stdin(&["delete", "-f", "-"], &manifest).await?;
    Ok(())
}

#[tokio::test]
async fn policy_is_off_by_default_and_its_values_are_checked() -> Result<()> {
    let cp = ControlPlane::shared().await;
    assert!(
        admission_objects(&render(cp, "spillway", &[]).await?)?.is_empty(),
        "no admission objects with default values"
    );
    assert!(
        admission_objects(
            &render(cp, "spillway", &["pathPolicy.exemptNamespaces={platform}"]).await?
        )?
        .is_empty(),
        "exemptNamespaces alone does not turn the policy on"
    );

    // With watchNamespace, only that namespace is bound (minus exemptions).
    let yaml = render(
        cp,
        "spillway",
        &[
            "pathPolicy.requireNamespacePrefix=true",
            "watchNamespace=team",
            "pathPolicy.exemptNamespaces={platform,ops}",
        ],
    )
    .await?;
    let objs = admission_objects(&yaml)?;
    assert_eq!(objs.len(), 2);
    assert_eq!(
        objs[1]["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"],
        serde_json::json!([
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["team"]},
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["platform", "ops"]},
        ])
    );
    // Without exemptions or watchNamespace the binding matches everything.
    let objs = admission_objects(
        &render(cp, "spillway", &["pathPolicy.requireNamespacePrefix=true"]).await?,
    )?;
    assert!(objs[1]["spec"]["matchResources"].is_null(), "{}", objs[1]);

    // Bad values fail before anything is rendered, naming the value.
    for (set, want) in [
        (
            "pathPolicy.requireNamespacePrefix=maybe",
            "/pathPolicy/requireNamespacePrefix",
        ),
        (
            "pathPolicy.exemptNamespaces={Not_A_Namespace}",
            "/pathPolicy/exemptNamespaces/0",
        ),
        (
            "pathPolicy.validationActions={Reject}",
            "/pathPolicy/validationActions/0",
        ),
        (
            "pathPolicy.validationActions={Deny,Warn}",
            "pathPolicy.validationActions: Deny and Warn may not be used together",
        ),
        ("pathPolicy.prefix=/x", "'prefix' not allowed"),
    ] {
        match render(cp, "spillway", &[set]).await {
            Ok(_) => bail!("--set {set} was accepted"),
            Err(e) => assert!(e.to_string().contains(want), "--set {set}: {e}"),
        }
    }
    Ok(())
}

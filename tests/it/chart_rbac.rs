//! The chart's RBAC is exactly the table in docs/security.md, and it is
//! enough: the operator and the gateway, each using a client that
//! impersonates its chart ServiceAccount, serve an endpoint end to end
//! (Secret check, finalizer, stream, processor Deployment by server-side
//! apply, status, Events, Lease, KEDA detection, Secret watch, cleanup) in
//! each RBAC mode: cluster-wide, `rbac.namespaces`, and `watchNamespace`;
//! and in each the operator's cache of processor Deployments fills (later
//! reconciles find the Deployment and do not create it again).

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use serde_json::Value;
use spillway_api::WebhookEndpoint;
use spillway_gateway::config::{Config, SourceKind};
use spillway_tests::{ControlPlane, NatsServer, eventually, root, yaml_documents};

// ------------------------------------------------------------ the table

/// One granted permission: (component, where, apiGroup, resource, verb,
/// resourceName). `where` is `*` for cluster-wide or a namespace.
type Grant = (String, String, String, String, String, String);

#[derive(Debug)]
struct Row {
    component: String,
    scope: String,
    group: String,
    resource: String,
    verbs: Vec<String>,
    names: Vec<String>,
    when: String,
}

fn table() -> Vec<Row> {
    let doc = std::fs::read_to_string(root().join("docs/security.md")).expect("docs/security.md");
    let start = doc
        .find("<!-- rbac-table:start -->")
        .expect("rbac-table:start marker");
    let end = doc
        .find("<!-- rbac-table:end -->")
        .expect("rbac-table:end marker");
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|x| x.trim().trim_matches('`').to_owned())
            .filter(|x| !x.is_empty())
            .collect()
    };
    let rows: Vec<Row> = doc[start..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            let c: Vec<&str> = l
                .trim()
                .trim_matches('|')
                .split('|')
                .map(str::trim)
                .collect();
            assert_eq!(c.len(), 8, "8 columns in {l:?}");
            Row {
                component: c[0].into(),
                scope: c[1].into(),
                group: if c[2] == "core" {
                    String::new()
                } else {
                    c[2].into()
                },
                resource: c[3].into(),
                verbs: list(c[4]),
                names: list(c[5]),
                when: c[6].into(),
            }
        })
        .collect();
    assert!(rows.len() >= 10, "the table was found: {rows:?}");
    rows
}

/// What a chart configuration means for the table.
#[derive(Debug, Default)]
struct Scenario {
    set: Vec<String>,
    release_ns: String,
    watch_ns: Option<String>,
    rbac_namespaces: Vec<String>,
    keda: bool,
    leader: bool,
    lease_name: String,
    rbac: bool,
}

impl Scenario {
    fn new(release_ns: &str) -> Self {
        Self {
            release_ns: release_ns.into(),
            keda: true,
            leader: true,
            lease_name: "spillway-operator".into(),
            rbac: true,
            ..Default::default()
        }
    }

    fn when(&self, cond: &str) -> bool {
        match cond {
            "always" => true,
            "operator.keda.enabled" => self.keda,
            "operator.leaderElection.enabled" => self.leader,
            other => panic!("docs/security.md: unknown When {other:?}; teach chart_rbac.rs"),
        }
    }

    fn places(&self, scope: &str) -> Vec<String> {
        match scope {
            "cluster" => vec!["*".into()],
            "watched" => vec![self.watch_ns.clone().unwrap_or_else(|| "*".into())],
            "workloads" if !self.rbac_namespaces.is_empty() => self.rbac_namespaces.clone(),
            "workloads" => vec![self.watch_ns.clone().unwrap_or_else(|| "*".into())],
            "release" => vec![self.release_ns.clone()],
            other => panic!("docs/security.md: unknown scope {other:?}"),
        }
    }

    fn documented(&self, rows: &[Row]) -> BTreeSet<Grant> {
        let mut out = BTreeSet::new();
        if !self.rbac {
            return out;
        }
        for r in rows.iter().filter(|r| self.when(&r.when)) {
            let names: Vec<String> = if r.names.is_empty() {
                vec![String::new()]
            } else {
                r.names
                    .iter()
                    .map(|n| n.replace("<leaseName>", &self.lease_name))
                    .collect()
            };
            for place in self.places(&r.scope) {
                for verb in &r.verbs {
                    for name in &names {
                        out.insert((
                            r.component.clone(),
                            place.clone(),
                            r.group.clone(),
                            r.resource.clone(),
                            verb.clone(),
                            name.clone(),
                        ));
                    }
                }
            }
        }
        out
    }
}

async fn helm_template(
    cp: &ControlPlane,
    release: &str,
    ns: &str,
    set: &[String],
) -> Result<String> {
    let chart = root().join("charts/spillway");
    let mut cmd = cp.helm();
    cmd.args(["template", release])
        .arg(&chart)
        .args(["--namespace", ns])
        .stdin(Stdio::null());
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().await?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the rendered chart grants, following bindings from the chart's
/// ServiceAccounts to their (Cluster)Roles.
fn rendered(objs: &[Value], release: &str, release_ns: &str) -> Result<BTreeSet<Grant>> {
    let mut out = BTreeSet::new();
    let is_rbac = |o: &&Value| {
        o["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("rbac.authorization.k8s.io/"))
    };
    let rbac: Vec<&Value> = objs.iter().filter(is_rbac).collect();
    let mut bound = BTreeSet::new();
    for b in rbac
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let subjects = b["subjects"].as_array().context("subjects")?;
        assert_eq!(subjects.len(), 1, "one subject per binding: {b}");
        let s = &subjects[0];
        assert_eq!(s["kind"], "ServiceAccount", "{b}");
        assert_eq!(s["namespace"], release_ns, "{b}");
        let sa = s["name"].as_str().unwrap_or_default();
        let component = sa
            .strip_prefix(&format!("{release}-"))
            .and_then(|c| c.strip_prefix("spillway-").or(Some(c)))
            .with_context(|| format!("binding to an unknown ServiceAccount {sa}"))?
            .to_owned();
        let binding_ns = b["metadata"]["namespace"].as_str();
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = b["roleRef"]["name"].as_str().unwrap_or_default();
        let role = rbac
            .iter()
            .find(|r| {
                r["kind"] == role_kind
                    && r["metadata"]["name"] == role_name
                    && (role_kind == "ClusterRole"
                        || r["metadata"]["namespace"].as_str() == binding_ns)
            })
            .with_context(|| format!("binding {b} refers to a role the chart does not render"))?;
        assert_eq!(
            role["metadata"]["labels"]["app.kubernetes.io/component"],
            component.as_str(),
            "{role_name} is bound to the {component}'s ServiceAccount"
        );
        bound.insert((
            role_kind.to_owned(),
            role_name.to_owned(),
            binding_ns.map(str::to_owned),
        ));
        let place = if b["kind"] == "ClusterRoleBinding" {
            "*".to_owned()
        } else {
            binding_ns.context("RoleBinding namespace")?.to_owned()
        };
        for rule in role["rules"].as_array().context("rules")? {
            let names = match strs(&rule["resourceNames"]) {
                n if n.is_empty() => vec![String::new()],
                n => n,
            };
            for g in strs(&rule["apiGroups"]) {
                for res in strs(&rule["resources"]) {
                    for verb in strs(&rule["verbs"]) {
                        assert!(
                            g != "*" && res != "*" && verb != "*",
                            "no wildcards: {rule}"
                        );
                        for n in &names {
                            out.insert((
                                component.clone(),
                                place.clone(),
                                g.clone(),
                                res.clone(),
                                verb.clone(),
                                n.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    // Every role the chart renders is bound (no dead rules).
    for r in rbac
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let key = (
            r["kind"].as_str().unwrap_or_default().to_owned(),
            r["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            r["metadata"]["namespace"].as_str().map(str::to_owned),
        );
        assert!(bound.contains(&key), "{key:?} is rendered but not bound");
    }
    Ok(out)
}

fn diff(want: &BTreeSet<Grant>, got: &BTreeSet<Grant>) -> String {
    let missing: Vec<_> = want.difference(got).collect();
    let extra: Vec<_> = got.difference(want).collect();
    format!("documented but not granted: {missing:#?}\ngranted but not documented: {extra:#?}")
}

#[tokio::test]
async fn rendered_rbac_is_exactly_the_documented_table() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let rows = table();
    let scenarios = vec![
        Scenario::new("spillway-system"),
        Scenario {
            set: vec!["watchNamespace=team".into()],
            watch_ns: Some("team".into()),
            ..Scenario::new("spillway-system")
        },
        Scenario {
            set: vec!["rbac.namespaces={payments,ci}".into()],
            rbac_namespaces: vec!["payments".into(), "ci".into()],
            ..Scenario::new("spillway-system")
        },
        Scenario {
            set: vec![
                "operator.keda.enabled=false".into(),
                "operator.leaderElection.enabled=false".into(),
                "operator.replicas=1".into(),
                "watchNamespace=spillway-system".into(),
            ],
            keda: false,
            leader: false,
            watch_ns: Some("spillway-system".into()),
            ..Scenario::new("spillway-system")
        },
        Scenario {
            set: vec!["operator.leaderElection.leaseName=my-lease".into()],
            lease_name: "my-lease".into(),
            ..Scenario::new("ops")
        },
        Scenario {
            set: vec!["rbac.create=false".into()],
            rbac: false,
            ..Scenario::new("spillway-system")
        },
    ];
    for s in &scenarios {
        let yaml = helm_template(cp, "spillway", &s.release_ns, &s.set).await?;
        let got = rendered(&yaml_documents(&yaml)?, "spillway", &s.release_ns)?;
        let want = s.documented(&rows);
        assert!(got == want, "scenario {:?}:\n{}", s.set, diff(&want, &got));
    }
    Ok(())
}

// ------------------------------------------------------------ live

/// A client that acts as ServiceAccount `ns/sa` (the admin user of the
/// test control plane may impersonate).
async fn client_as(cp: &ControlPlane, ns: &str, sa: &str) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(&cp.kubeconfig)?;
    let mut cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
    cfg.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{sa}"));
    cfg.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    Ok(Client::try_from(cfg)?)
}

/// `kubectl auth can-i` as a ServiceAccount.
async fn can_i(cp: &ControlPlane, ns: &str, sa: &str, args: &[&str]) -> Result<bool> {
    let out = cp
        .kubectl()
        .args(["auth", "can-i"])
        .args(args)
        .arg(format!("--as=system:serviceaccount:{ns}:{sa}"))
        .output()
        .await?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match answer.as_str() {
        "yes" => Ok(true),
        "no" => Ok(false),
        _ => bail!(
            "kubectl auth can-i {args:?}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

async fn condition(
    api: &Api<WebhookEndpoint>,
    name: &str,
    type_: &str,
) -> Option<(String, String)> {
    let ep = api.get(name).await.ok()?;
    ep.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason))
}

const WAIT: Duration = Duration::from_secs(60);

/// How often `DeploymentCreated` was recorded for endpoint `name` (an
/// Event repeated by the operator's recorder carries a series count).
async fn deployment_created_count(cp: &ControlPlane, ns: &str, name: &str) -> Result<u64> {
    let out = cp
        .kubectl_output(&["get", "events.events.k8s.io", "-n", ns, "-o", "json"])
        .await?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|e| {
            e["reason"] == "DeploymentCreated"
                && e["regarding"]["kind"] == "WebhookEndpoint"
                && e["regarding"]["name"] == name
        })
        .map(|e| e["series"]["count"].as_u64().unwrap_or(1))
        .sum())
}

/// Reconciles the operator has finished, from its metrics.
fn reconciles(operator: &spillway_operator::Running) -> u64 {
    operator
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("spillway_operator_reconciles_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Install only the chart's ServiceAccounts and RBAC for `release` in
/// `release_ns`, run the operator and the gateway as those ServiceAccounts,
/// and serve endpoints in `team`.
async fn serve_with_chart_rbac(
    cp: &ControlPlane,
    nats: &NatsServer,
    release: &str,
    team: &str,
    set: &[String],
    watch: bool,
) -> Result<()> {
    let release_ns = cp.namespace(&format!("{release}-sys")).await?;
    let yaml = helm_template(cp, release, &release_ns, set).await?;
    let rbac: Vec<Value> = yaml_documents(&yaml)?
        .into_iter()
        .filter(|o| {
            o["kind"] == "ServiceAccount"
                || o["apiVersion"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("rbac.authorization.k8s.io/"))
        })
        .collect();
    let manifest: String = rbac
        .iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).expect("YAML")))
        .collect();
    cp.kubectl_stdin(&["apply", "-f", "-"], &manifest).await?;

    let op_sa = format!("{release}-spillway-operator");
    let gw_sa = format!("{release}-spillway-gateway");
    // Least privilege, spot checks of what must NOT be allowed.
    for (sa, args) in [
        (&op_sa, vec!["list", "secrets", "-n", team]),
        (&op_sa, vec!["watch", "secrets", "-n", team]),
        (
            &op_sa,
            vec!["update", "webhookendpoints.spillway.dev", "-n", team],
        ),
        (&op_sa, vec!["create", "leases", "-n", team]),
        (
            &op_sa,
            vec!["update", "leases/someone-else", "-n", &release_ns],
        ),
        (&op_sa, vec!["get", "pods", "-n", team]),
        (
            &op_sa,
            vec![
                "get",
                "customresourcedefinitions/webhookendpoints.spillway.dev",
            ],
        ),
        (&gw_sa, vec!["get", "deployments", "-n", team]),
        (
            &gw_sa,
            vec!["patch", "webhookendpoints.spillway.dev", "-n", team],
        ),
        (&gw_sa, vec!["create", "secrets", "-n", team]),
    ] {
        assert!(
            !can_i(cp, &release_ns, sa, &args).await?,
            "{sa} may {args:?}"
        );
    }
    assert!(can_i(cp, &release_ns, &op_sa, &["get", "secrets", "-n", team]).await?);
    // The operator's Deployment cache watches where endpoints are watched
    // (every namespace without watchNamespace), read-only; writes stay in
    // the workload namespaces.
    assert_eq!(
        can_i(
            cp,
            &release_ns,
            &op_sa,
            &["watch", "deployments.apps", "--all-namespaces"]
        )
        .await?,
        !watch,
        "{set:?}: cluster-wide watch of Deployments"
    );
    let confined = watch || set.iter().any(|s| s.starts_with("rbac.namespaces="));
    for verb in ["create", "patch", "delete"] {
        assert_eq!(
            can_i(
                cp,
                &release_ns,
                &op_sa,
                &[verb, "deployments.apps", "-n", "kube-system"]
            )
            .await?,
            !confined,
            "{set:?}: {verb} Deployments in kube-system"
        );
    }
    assert!(can_i(cp, &release_ns, &gw_sa, &["watch", "secrets", "-n", team]).await?);

    let admin = cp.client().await?;
    // With rbac.namespaces, an endpoint in a namespace the gateway may not
    // read Secrets in (applied before the gateway starts): its Secret watch
    // is Forbidden forever. It must only make that endpoint answer 503,
    // never keep the gateway unready for everyone else.
    let listed_only = !watch && set.iter().any(|s| s.starts_with("rbac.namespaces="));
    let outside = if listed_only {
        let ns = cp.namespace(&format!("{release}-outside")).await?;
        cp.kubectl_stdin(
            &["apply", "-f", "-"],
            &format!(
                r#"
apiVersion: v1
kind: Secret
metadata: {{name: gh, namespace: {ns}}}
stringData: {{secret: other}}
---
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: out, namespace: {ns}}}
spec:
  verification: {{scheme: github, secretRefs: [{{name: gh, key: secret}}]}}
  processor:
    sink: {{url: "http://sink.example:8080/"}}
    replicas: {{min: 0, max: 1}}
"#
            ),
        )
        .await?;
        Some(ns)
    } else {
        None
    };
    let lease_name = format!("{release}-spillway-operator");
    let mut args = vec![
        "spillway-operator".to_owned(),
        format!("--nats-url={}", nats.url),
        "--admin-addr=127.0.0.1:0".into(),
        "--leader-elect=true".into(),
        format!("--lease-namespace={release_ns}"),
        format!("--lease-name={lease_name}"),
        "--identity=op-0".into(),
        "--resync-interval=2s".into(),
        "--nats-request-timeout=2s".into(),
    ];
    if watch {
        args.push(format!("--watch-namespace={team}"));
    }
    let settings = spillway_operator::Settings::parse_from(args);
    let operator = spillway_operator::start(settings, client_as(cp, &release_ns, &op_sa).await?)
        .await
        .context("the operator starts with the chart's RBAC")?;
    let gateway = spillway_gateway::run::start(
        &Config {
            nats_url: nats.url.clone(),
            listen: ([127, 0, 0, 1], 0).into(),
            admin_listen: ([127, 0, 0, 1], 0).into(),
            source: SourceKind::Kubernetes,
            namespace: watch.then(|| team.to_owned()),
            ..Config::default()
        },
        Some(client_as(cp, &release_ns, &gw_sa).await?),
    )
    .await
    .context("the gateway starts with the chart's RBAC")?;

    let endpoints = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: gh, namespace: {team}}}
stringData: {{secret: s3cret}}
---
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: gh, namespace: {team}}}
spec:
  verification: {{scheme: github, secretRefs: [{{name: gh, key: secret}}]}}
  processor:
    sink: {{url: "http://sink.example:8080/"}}
    replicas: {{min: 0, max: 2}}
---
apiVersion: spillway.dev/v1alpha1
kind: WebhookEndpoint
metadata: {{name: kd, namespace: {team}}}
spec:
  verification: {{scheme: none}}
  processor:
    sink: {{url: "http://sink.example:8080/"}}
    replicas: {{min: 0, max: 2, autoscaler: keda}}
"#
    );
    cp.kubectl_stdin(&["apply", "-f", "-"], &endpoints).await?;
    let api: Api<WebhookEndpoint> = Api::namespaced(admin.clone(), team);

    // Secret get, finalizer patch, stream, Deployment apply, status patch.
    eventually(WAIT, "gh Ready=True", || async {
        condition(&api, "gh", "Ready")
            .await
            .is_some_and(|(s, _)| s == "True")
    })
    .await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), team);
    let d = deployments.get("gh-processor").await?;
    assert_eq!(d.spec.replicas, Some(0));
    // KEDA detection (get on its CRD) works and reports KEDA missing.
    eventually(WAIT, "kd ProcessorReady=False/KedaNotInstalled", || async {
        condition(&api, "kd", "ProcessorReady")
            .await
            .is_some_and(|(s, r)| s == "False" && r == "KedaNotInstalled")
    })
    .await?;
    // Events were written.
    let events = cp
        .kubectl_output(&[
            "get",
            "events.events.k8s.io",
            "-n",
            team,
            "-o",
            "jsonpath={.items[*].reason}",
        ])
        .await?;
    assert!(events.contains("DeploymentCreated"), "events: {events}");
    // The operator's Deployment cache works: over the next reconciles (a
    // resync every 2 s) it finds gh's Deployment up to date and neither
    // re-applies it nor repeats DeploymentCreated. Without list/watch on
    // Deployments wherever the operator watches (cluster-wide here unless
    // watchNamespace), its cache never fills and every reconcile waits for
    // it, re-applies and counts another DeploymentCreated.
    let created = deployment_created_count(cp, team, "gh").await?;
    assert!(created >= 1, "gh's DeploymentCreated event");
    let reconciled = reconciles(&operator);
    eventually(WAIT, "four more reconciles", || async {
        reconciles(&operator) >= reconciled + 4
    })
    .await?;
    assert_eq!(
        deployment_created_count(cp, team, "gh").await?,
        created,
        "{set:?}: the operator created gh's Deployment again: its Deployment cache is empty"
    );
    // The Lease is held.
    let lease = Api::<Lease>::namespaced(admin.clone(), &release_ns)
        .get(&lease_name)
        .await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("op-0")
    );
    assert!(operator.health.leader.load(Ordering::SeqCst));
    // The gateway routes gh with its secret (list/watch of that Secret).
    let gw = gateway.gateway.clone();
    let path = format!("/{team}/gh");
    eventually(WAIT, "gateway ready with gh's secret", || {
        let gw = gw.clone();
        let path = path.clone();
        async move {
            gw.ready()
                && gw
                    .router
                    .table()
                    .get(&path)
                    .is_some_and(|r| r.verifier.is_ok())
        }
    })
    .await?;
    if let Some(ns) = &outside {
        // The unreadable endpoint is routed but has no secret: 503
        // not_ready for it alone.
        let route = gw.router.table().get(&format!("/{ns}/out"));
        assert!(
            route.as_ref().is_some_and(|r| r.verifier.is_err()),
            "the outside endpoint is routed without a secret"
        );
        let answer = {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut c = tokio::net::TcpStream::connect(gateway.addr).await?;
            c.write_all(
                format!("POST /{ns}/out HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}")
                    .as_bytes(),
            )
            .await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            out
        };
        assert!(
            answer.starts_with("HTTP/1.0 503") && answer.ends_with(r#"{"error":"not_ready"}"#),
            "{answer}"
        );
        cp.kubectl_output(&["delete", "whe", "out", "-n", ns, "--wait=false"])
            .await?;
    }

    // Cleanup: Deployment delete, NATS cleanup, finalizer removal.
    cp.kubectl_output(&["delete", "whe", "gh", "kd", "-n", team, "--wait=false"])
        .await?;
    eventually(WAIT, "endpoints deleted", || async {
        api.list(&Default::default())
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await?;
    assert!(deployments.get_opt("gh-processor").await?.is_none());
    gateway.shutdown().await;
    operator.stop().await;
    Ok(())
}

#[tokio::test]
async fn operator_and_gateway_run_on_exactly_the_chart_rbac() -> Result<()> {
    // A control plane of its own: the cluster-wide operators below reconcile
    // every endpoint they can see, and on the shared one they would rewrite
    // the status of other tests' endpoints (the CLI tests set theirs by hand)
    // and render Deployments another test's operator also owns.
    let cp = &ControlPlane::start().await?;
    cp.install_crd().await?;
    let nats = NatsServer::start().await?;
    // One mode after the other: a cluster-wide operator would also pick up
    // the other modes' endpoints.
    let team = cp.namespace("team-cluster").await?;
    serve_with_chart_rbac(cp, &nats, "rc", &team, &[], false)
        .await
        .context("cluster-wide RBAC")?;
    let team = cp.namespace("team-listed").await?;
    serve_with_chart_rbac(
        cp,
        &nats,
        "rn",
        &team,
        &[format!("rbac.namespaces={{{team}}}")],
        false,
    )
    .await
    .context("rbac.namespaces")?;
    let team = cp.namespace("team-watched").await?;
    serve_with_chart_rbac(
        cp,
        &nats,
        "rw",
        &team,
        &[format!("watchNamespace={team}")],
        true,
    )
    .await
    .context("watchNamespace")?;
    Ok(())
}

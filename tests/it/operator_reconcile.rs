//! The operator against a real kube-apiserver + etcd and a real nats-server,
//! running in-process (one operator per test, scoped to the test's
//! namespace). No kubelet runs, so tests set Deployment readiness through
//! the status subresource where they need it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::operator_support::{condition, config_of, operator_settings, wait_condition};
use anyhow::Result;
use async_nats::jetstream::consumer::{DeliverPolicy, PullConsumer};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use spillway_api::WebhookEndpoint;
use spillway_api::names::EndpointNames;
use spillway_operator::{Running, Settings};
use spillway_tests::{ControlPlane, NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(40);

fn settings(nats: &str, ns: &str) -> Settings {
    Settings {
        scale_down_cooldown: Duration::from_secs(3),
        cleanup_timeout: Duration::from_secs(4),
        nats_request_timeout: Duration::from_secs(1),
        ..operator_settings(nats, ns)
    }
}

struct Env {
    client: Client,
    ns: String,
    nats: NatsServer,
    op: Option<Running>,
}

impl Env {
    async fn new(prefix: &str) -> Result<Self> {
        Self::with_settings(prefix, |s| s).await
    }

    /// An operator with `settings` changed by `change`.
    async fn with_settings(
        prefix: &str,
        change: impl FnOnce(Settings) -> Settings,
    ) -> Result<Self> {
        let cp = ControlPlane::shared().await;
        let ns = cp.namespace(prefix).await?;
        let client = cp.client().await?;
        let nats = NatsServer::start().await?;
        let op = spillway_operator::start(change(settings(&nats.url, &ns)), client.clone()).await?;
        Ok(Self {
            client,
            ns,
            nats,
            op: Some(op),
        })
    }

    fn endpoints(&self) -> Api<WebhookEndpoint> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn names(&self, name: &str) -> EndpointNames {
        EndpointNames::new(&self.ns, name)
    }

    async fn secret(&self, name: &str, key: &str) -> Result<()> {
        self.secret_with(name, &[key]).await
    }

    /// Create or replace Secret `name` with `keys` (placeholder values).
    async fn secret_with(&self, name: &str, keys: &[&str]) -> Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let data: serde_json::Map<String, Value> = keys
            .iter()
            .map(|k| (k.to_string(), json!("s3cr3t")))
            .collect();
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data,
        }))?;
        api.patch(
            name,
            &PatchParams::apply("spillway-tests").force(),
            &Patch::Apply(&s),
        )
        .await?;
        Ok(())
    }

    async fn create(&self, name: &str, spec: Value) -> Result<()> {
        let ep: WebhookEndpoint = serde_json::from_value(json!({
            "apiVersion": "spillway.dev/v1alpha1",
            "kind": "WebhookEndpoint",
            "metadata": {"name": name},
            "spec": spec,
        }))?;
        self.endpoints().create(&PostParams::default(), &ep).await?;
        Ok(())
    }

    async fn patch_spec(&self, name: &str, spec: Value) -> Result<()> {
        self.endpoints()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": spec })),
            )
            .await?;
        Ok(())
    }

    /// Wait until `cond` has `status` (and `reason`, when given).
    async fn wait_condition(
        &self,
        name: &str,
        cond: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<WebhookEndpoint> {
        wait_condition(&self.endpoints(), name, cond, status, reason, WAIT).await
    }

    async fn deployment(&self, name: &str) -> Result<Deployment> {
        Ok(self.deployments().get(&format!("{name}-processor")).await?)
    }

    async fn set_ready(&self, name: &str, ready: i32) -> Result<()> {
        self.deployments()
            .patch_status(
                &format!("{name}-processor"),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"replicas": ready, "readyReplicas": ready, "availableReplicas": ready}})),
            )
            .await?;
        Ok(())
    }

    async fn replicas(&self, name: &str) -> Option<i32> {
        self.deployment(name)
            .await
            .ok()
            .and_then(|d| d.spec.replicas)
    }

    async fn event_reasons(&self) -> Result<Vec<(String, String)>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect())
    }

    async fn stop(mut self) {
        if let Some(op) = self.op.take() {
            op.stop().await;
        }
    }
}

fn spec(extra: Value) -> Value {
    let mut base = json!({
        "verification": {"scheme": "github", "secretRefs": [{"name": "gh", "key": "secret"}]},
        "processor": {
            "sink": {"service": {"name": "app", "port": 8080, "path": "/hooks"}},
            "concurrency": 10,
            "timeout": "10s",
            "replicas": {"min": 1, "max": 3, "targetBacklogPerReplica": 5},
            "retry": {"maxAttempts": 4, "backoff": ["1s", "2s"]},
        },
        "stream": {"maxAge": "1h", "storage": "memory"},
        "deduplication": {"window": "5m"},
    });
    merge(&mut base, extra);
    base
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

fn config_hash(d: &Deployment) -> String {
    d.spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()["spillway.dev/config-hash"]
        .clone()
}

#[tokio::test]
async fn create_update_pause_suspend_idle_and_delete() -> Result<()> {
    let env = Env::new("op-main").await?;
    env.secret("gh", "secret").await?;
    env.create("gh", spec(json!({}))).await?;
    let names = env.names("gh");

    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    // One replica wanted, no kubelet: processor not ready yet.
    let ep = env
        .wait_condition("gh", "ProcessorReady", "False", Some("PodsNotReady"))
        .await?;
    let st = ep.status.as_ref().unwrap();
    assert_eq!(condition(&ep, "Accepted").unwrap().0, "True");
    assert_eq!(condition(&ep, "Ready").unwrap().0, "False");
    assert_eq!(st.observed_generation, ep.metadata.generation);
    assert_eq!(st.path.as_deref(), Some(format!("/{}/gh", env.ns).as_str()));
    assert_eq!(st.stream.as_deref(), Some(names.stream().as_str()));
    assert_eq!(
        st.dead_letter_stream.as_deref(),
        Some(names.dead_letter_stream().as_str())
    );
    assert!(ep.finalizers().iter().any(|f| f == "spillway.dev/cleanup"));

    // JetStream objects as specified.
    let js = env.nats.jetstream().await?;
    let mut stream = js.get_stream(names.stream()).await?;
    let info = stream.info().await?.clone();
    assert_eq!(
        info.config.subjects,
        vec![
            names.stream_subjects(),
            names.due_subjects(),
            names.legacy_stream_subjects(),
            names.legacy_due_subjects()
        ]
    );
    // The work stream holds undelivered webhooks with no age limit; the
    // history keeps them for maxAge.
    assert_eq!(info.config.max_age, Duration::ZERO);
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::Interest
    );
    let mut history = js.get_stream(names.history_stream()).await?;
    assert_eq!(
        history.info().await?.config.max_age,
        Duration::from_secs(3600)
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    let c = stream.consumer_info("processor").await?;
    assert_eq!(c.config.max_ack_pending, 10);
    // maxAttempts and the backoff schedule are the processor's: JetStream
    // would stop delivering at max_deliver (losing a message whose last
    // attempt did not finish) and stretch delayed NAKs by its backoff.
    assert_eq!(c.config.max_deliver, -1);
    assert!(c.config.backoff.is_empty());
    assert_eq!(
        c.config.ack_wait,
        Duration::from_secs(15),
        "timeout + margin"
    );
    let mut dlq = js.get_stream(names.dead_letter_stream()).await?;
    let dlq_info = dlq.info().await?;
    assert_eq!(
        dlq_info.config.subjects,
        vec![
            names.dead_letter_subjects(),
            names.legacy_dead_letter_subject()
        ]
    );
    assert_eq!(dlq_info.config.max_age, Duration::from_secs(336 * 3600));

    // The Deployment.
    let d = env.deployment("gh").await?;
    assert_eq!(d.spec.replicas, Some(1));
    assert_eq!(d.owner_references()[0].uid, ep.uid().unwrap());
    assert_eq!(d.labels()["app.kubernetes.io/name"], "spillway-processor");
    assert_eq!(
        d.labels()["app.kubernetes.io/managed-by"],
        "spillway-operator"
    );
    let cfg = config_of(&d)?;
    assert_eq!(
        cfg.sink_url,
        format!("http://app.{}.svc:8080/hooks", env.ns)
    );
    assert_eq!(cfg.stream, names.stream());
    assert_eq!(cfg.consumers, vec!["processor".to_owned()]);
    assert_eq!(cfg.concurrency, 10);
    let container = &d.spec.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some("spillway-processor:test"));
    let sc = container.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let hash_before = config_hash(&d);

    // Pods become ready (simulated): Ready.
    env.set_ready("gh", 1).await?;
    let ep = env
        .wait_condition("gh", "Ready", "True", Some("Ready"))
        .await?;
    assert_eq!(
        ep.status.as_ref().unwrap().replicas.as_ref().unwrap().ready,
        1
    );
    let events = env.event_reasons().await?;
    assert!(
        events.iter().any(|(r, _)| r == "StreamCreated"),
        "{events:?}"
    );

    // Idle: no writes to the endpoint or the Deployment over several resyncs.
    let op = env.op.as_ref().unwrap();
    let writes = op.metrics.status_writes();
    let ep_rv = env.endpoints().get("gh").await?.resource_version();
    let d_rv = env.deployment("gh").await?.resource_version();
    let events_before = env.event_reasons().await?.len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        env.event_reasons().await?.len(),
        events_before,
        "events while idle"
    );
    assert_eq!(
        op.metrics.status_writes(),
        writes,
        "status written while idle"
    );
    assert_eq!(env.endpoints().get("gh").await?.resource_version(), ep_rv);
    assert_eq!(env.deployment("gh").await?.resource_version(), d_rv);
    let metrics = http_get_metrics(op.admin_addr).await?;
    assert!(
        metrics.contains("spillway_operator_reconciles_total"),
        "{metrics}"
    );
    spillway_tests::check_metric_labels(&metrics)?;
    assert!(
        metrics.contains(r#"spillway_operator_endpoints{condition="Ready",status="True"} 1"#),
        "{metrics}"
    );

    // Changes are applied: concurrency, retention, replicas.
    env.patch_spec(
        "gh",
        json!({"processor": {"concurrency": 20, "replicas": {"min": 2, "max": 4}}, "stream": {"maxAge": "2h"}}),
    )
    .await?;
    eventually(WAIT, "consumer maxAckPending 20", || async {
        stream
            .consumer_info("processor")
            .await
            .is_ok_and(|c| c.config.max_ack_pending == 20)
    })
    .await?;
    assert_eq!(
        js.get_stream(names.history_stream())
            .await?
            .info()
            .await?
            .config
            .max_age,
        Duration::from_secs(7200)
    );
    eventually(WAIT, "replicas 2", || async {
        env.replicas("gh").await == Some(2)
    })
    .await?;
    let d = env.deployment("gh").await?;
    assert_eq!(config_of(&d)?.concurrency, 20);
    assert_ne!(config_hash(&d), hash_before, "config change rolls the pods");
    let ep = env.endpoints().get("gh").await?;
    eventually(WAIT, "observedGeneration", || async {
        env.endpoints().get("gh").await.is_ok_and(|e| {
            e.status.as_ref().and_then(|s| s.observed_generation) == e.metadata.generation
        })
    })
    .await?;
    assert!(ep.metadata.generation > Some(1));

    // Paused: zero replicas, reflected in the conditions.
    env.patch_spec("gh", json!({"processor": {"paused": true}}))
        .await?;
    let ep = env
        .wait_condition("gh", "ProcessorReady", "True", Some("Paused"))
        .await?;
    assert_eq!(condition(&ep, "Ready").unwrap().1, "Paused");
    assert_eq!(env.replicas("gh").await, Some(0));
    assert!(config_of(&env.deployment("gh").await?)?.paused);
    // Suspended (and resumed).
    env.patch_spec(
        "gh",
        json!({"suspend": true, "processor": {"paused": false}}),
    )
    .await?;
    env.wait_condition("gh", "Ready", "True", Some("Suspended"))
        .await?;
    eventually(WAIT, "replicas back to 2", || async {
        env.replicas("gh").await == Some(2)
    })
    .await?;

    // Delete with the default policy (Retain): the processor goes, the
    // streams and the consumer (what was delivered) stay.
    let consumer_before = stream.consumer_info("processor").await?;
    env.endpoints()
        .delete("gh", &DeleteParams::default())
        .await?;
    eventually(WAIT, "endpoint gone", || async {
        env.endpoints()
            .get_opt("gh")
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await?;
    assert!(env.deployments().get_opt("gh-processor").await?.is_none());
    assert!(
        stream.consumer_info("processor").await.is_ok(),
        "consumer retained"
    );
    assert!(
        js.get_stream(names.stream()).await.is_ok(),
        "stream retained"
    );
    assert!(
        js.get_stream(names.dead_letter_stream()).await.is_ok(),
        "DLQ retained"
    );
    // Created again: it resumes with the same consumer (updated in place),
    // so the retained history is not delivered a second time.
    env.create("gh", spec(json!({}))).await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    let again = stream.consumer_info("processor").await?;
    assert_eq!(again.created, consumer_before.created, "not recreated");
    env.stop().await;
    Ok(())
}

/// Processor NATS Secrets from the operator's settings: mounted read-only
/// with their env vars (accepted by the API server), and a missing Secret
/// or key is named in ProcessorReady (no kubelet runs here to mount them).
#[tokio::test]
async fn processor_nats_secrets_are_mounted_and_missing_ones_reported() -> Result<()> {
    let env = Env::with_settings("op-natstls", |s| Settings {
        processor_nats_creds_secret: Some("proc-nats".into()),
        processor_nats_tls_ca_secret: Some("proc-nats-ca".into()),
        processor_nats_tls_client_secret: Some("proc-nats-tls".into()),
        processor_nats_tls_required: Some(true),
        ..s
    })
    .await?;
    env.secret("gh", "secret").await?;
    env.create("gh", spec(json!({}))).await?;
    let ep = env
        .wait_condition("gh", "ProcessorReady", "False", Some("NatsSecretNotFound"))
        .await?;
    let (_, _, msg) = condition(&ep, "ProcessorReady").unwrap();
    assert!(msg.contains(&format!("{}/proc-nats ", env.ns)), "{msg}");
    assert_eq!(condition(&ep, "Accepted").unwrap().0, "True");

    let d = env.deployment("gh").await?;
    let container = &d.spec.template.spec.as_ref().unwrap().containers[0];
    // NATS credentials and TLS files from the operator's settings.
    let env_of: BTreeMap<&str, &str> = container
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
        .collect();
    for (name, want) in [
        (
            "SPILLWAY_NATS_CREDS_FILE",
            "/var/run/spillway/nats/nats.creds",
        ),
        (
            "SPILLWAY_NATS_TLS_CA_FILE",
            "/var/run/spillway/nats-ca/ca.crt",
        ),
        (
            "SPILLWAY_NATS_TLS_CERT_FILE",
            "/var/run/spillway/nats-tls/tls.crt",
        ),
        (
            "SPILLWAY_NATS_TLS_KEY_FILE",
            "/var/run/spillway/nats-tls/tls.key",
        ),
        ("SPILLWAY_NATS_TLS_REQUIRED", "true"),
    ] {
        assert_eq!(env_of.get(name).copied(), Some(want), "{name}");
    }
    let secret_volumes: BTreeMap<&str, &str> = d
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter_map(|v| Some((v.name.as_str(), v.secret.as_ref()?.secret_name.as_deref()?)))
        .collect();
    assert_eq!(
        secret_volumes,
        BTreeMap::from([
            ("spillway-nats-ca", "proc-nats-ca"),
            ("spillway-nats-creds", "proc-nats"),
            ("spillway-nats-tls", "proc-nats-tls"),
        ])
    );
    let read_only_mounts: BTreeMap<&str, &str> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .filter(|m| m.read_only == Some(true))
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert_eq!(
        read_only_mounts,
        BTreeMap::from([
            ("spillway-nats-ca", "/var/run/spillway/nats-ca"),
            ("spillway-nats-creds", "/var/run/spillway/nats"),
            ("spillway-nats-tls", "/var/run/spillway/nats-tls"),
        ])
    );

    env.secret("proc-nats", "nats.creds").await?;
    env.secret("proc-nats-ca", "ca.crt").await?;
    env.secret("proc-nats-tls", "tls.crt").await?;
    let ep = env
        .wait_condition(
            "gh",
            "ProcessorReady",
            "False",
            Some("NatsSecretKeyMissing"),
        )
        .await?;
    let (_, _, msg) = condition(&ep, "ProcessorReady").unwrap();
    assert!(
        msg.contains("proc-nats-tls") && msg.contains("tls.key"),
        "{msg}"
    );
    env.secret_with("proc-nats-tls", &["tls.crt", "tls.key"])
        .await?;
    env.wait_condition("gh", "ProcessorReady", "False", Some("PodsNotReady"))
        .await?;
    env.stop().await;
    Ok(())
}

async fn http_get_metrics(addr: std::net::SocketAddr) -> Result<String> {
    // A minimal HTTP/1.0 GET; the admin server is plain HTTP on loopback.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn missing_secret_and_path_conflict_are_reported() -> Result<()> {
    let env = Env::new("op-accept").await?;
    env.create("a", spec(json!({"path": "/shared"}))).await?;
    let ep = env
        .wait_condition("a", "Accepted", "False", Some("SecretNotFound"))
        .await?;
    let msg = condition(&ep, "Accepted").unwrap().2;
    assert!(
        msg.contains("gh") && msg.contains("verification.secretRefs[0]"),
        "{msg}"
    );
    assert_eq!(condition(&ep, "Ready").unwrap().0, "False");
    // Nothing is created for an endpoint that is not accepted.
    let js = env.nats.jetstream().await?;
    assert!(js.get_stream(env.names("a").stream()).await.is_err());

    // The Secret exists but lacks the key.
    env.secret("gh", "other").await?;
    env.wait_condition("a", "Accepted", "False", Some("SecretKeyMissing"))
        .await?;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &env.ns);
    let set = |v: &'static str| {
        let secrets = secrets.clone();
        async move {
            secrets
                .patch(
                    "gh",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"stringData": {"secret": v}})),
                )
                .await
        }
    };
    // The key is there but empty: no secret at all (the gateway ignores it).
    set("").await?;
    let ep = env
        .wait_condition("a", "Accepted", "False", Some("SecretKeyEmpty"))
        .await?;
    let msg = condition(&ep, "Accepted").unwrap().2;
    assert!(
        msg.contains("is empty") && msg.contains("\"secret\""),
        "{msg}"
    );
    // Whitespace only is empty too: surrounding whitespace is not part of
    // a value (spillway_api::secret, the gateway's and processor's rule).
    set("x").await?;
    env.wait_condition("a", "Accepted", "True", None).await?;
    set(" \n").await?;
    env.wait_condition("a", "Accepted", "False", Some("SecretKeyEmpty"))
        .await?;
    set("x").await?;
    env.wait_condition("a", "Accepted", "True", None).await?;
    env.wait_condition("a", "StreamReady", "True", None).await?;

    // An invalid whsec_ key is refused where a Standard Webhooks key is
    // expected (the gateway could not use it), and is a literal token for
    // other schemes; the value is never shown.
    env.create(
        "sw",
        spec(json!({"path": "/sw", "verification": {"scheme": "standardWebhooks"}})),
    )
    .await?;
    env.wait_condition("sw", "Accepted", "True", None).await?;
    set("whsec_not base64!").await?;
    let ep = env
        .wait_condition("sw", "Accepted", "False", Some("SecretKeyInvalid"))
        .await?;
    let msg = condition(&ep, "Accepted").unwrap().2;
    assert!(
        msg.contains("whsec_") && !msg.contains("not base64!"),
        "{msg}"
    );
    env.wait_condition("a", "Accepted", "True", None).await?;
    set("x").await?;
    env.wait_condition("sw", "Accepted", "True", None).await?;

    // A newer endpoint on the same path is refused …
    env.create("b", spec(json!({"path": "/shared"}))).await?;
    let ep = env
        .wait_condition("b", "Accepted", "False", Some("PathConflict"))
        .await?;
    assert!(
        condition(&ep, "Accepted")
            .unwrap()
            .2
            .contains(&format!("{}/a", env.ns))
    );
    // … invalid specs too …
    env.create(
        "c",
        spec(json!({"processor": {"template": {"spec": {"containers": "not-a-list"}}}})),
    )
    .await?;
    env.wait_condition("c", "Accepted", "False", Some("InvalidSpec"))
        .await?;
    // … and gets the path once the older one is gone.
    env.endpoints()
        .delete("a", &DeleteParams::default())
        .await?;
    env.wait_condition("b", "Accepted", "True", None).await?;

    // A Deployment of the same name that Spillway did not make is neither
    // taken over nor deleted.
    let foreign: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "f-processor", "labels": {"app": "mine"}},
        "spec": {
            "selector": {"matchLabels": {"app": "mine"}},
            "template": {
                "metadata": {"labels": {"app": "mine"}},
                "spec": {"containers": [{"name": "c", "image": "mine:1"}]},
            },
        },
    }))?;
    env.deployments()
        .create(&PostParams::default(), &foreign)
        .await?;
    env.create("f", spec(json!({}))).await?;
    env.wait_condition("f", "ProcessorReady", "False", Some("DeploymentConflict"))
        .await?;
    env.endpoints()
        .delete("f", &DeleteParams::default())
        .await?;
    eventually(WAIT, "endpoint f gone", || async {
        env.endpoints()
            .get_opt("f")
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await?;
    let d = env.deployment("f").await?;
    assert_eq!(
        d.spec.template.spec.unwrap().containers[0].image.as_deref(),
        Some("mine:1")
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn nats_outage_and_external_stream_deletion_recover() -> Result<()> {
    let mut env = Env::new("op-nats").await?;
    env.secret("gh", "secret").await?;
    env.create("gh", spec(json!({"stream": {"storage": "file"}})))
        .await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    let names = env.names("gh");

    // Deleted behind the operator's back: recreated on the next resync.
    let js = env.nats.jetstream().await?;
    js.delete_stream(names.stream()).await?;
    eventually(WAIT, "stream recreated", || async {
        let js = js.clone();
        let s = names.stream();
        async move {
            match js.get_stream(&s).await {
                Ok(st) => st.consumer_info("processor").await.is_ok(),
                Err(_) => false,
            }
        }
        .await
    })
    .await?;
    eventually(WAIT, "StreamRecreated event", || async {
        env.event_reasons().await.is_ok_and(|e| {
            e.iter()
                .any(|(r, n)| r == "StreamRecreated" && n.contains(&names.stream()))
        })
    })
    .await?;

    // NATS down: StreamReady=False, and back when it returns.
    env.nats.stop();
    let ep = env
        .wait_condition("gh", "StreamReady", "False", Some("NatsUnavailable"))
        .await?;
    assert_eq!(condition(&ep, "Ready").unwrap().0, "False");
    env.nats.restart().await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn backlog_scales_up_and_drains_to_zero_after_cooldown() -> Result<()> {
    let env = Env::new("op-scale").await?;
    env.secret("gh", "secret").await?;
    env.create(
        "gh",
        spec(json!({"processor": {"concurrency": 20, "replicas": {"min": 0, "max": 3, "targetBacklogPerReplica": 5}}})),
    )
    .await?;
    // Idle endpoint with min 0: zero replicas and Ready.
    env.wait_condition("gh", "ProcessorReady", "True", Some("ScaledToZero"))
        .await?;
    // (A first sync may time out on a loaded machine; Ready follows.)
    env.wait_condition("gh", "Ready", "True", None).await?;
    assert_eq!(env.replicas("gh").await, Some(0));

    // 12 stored webhooks: ceil(12/5) = 3 replicas.
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    for i in 0..12 {
        js.publish(names.subject(0), format!("{{\"n\":{i}}}").into())
            .await?
            .await?;
    }
    eventually(WAIT, "scaled to 3", || async {
        env.replicas("gh").await == Some(3)
    })
    .await?;
    // The status follows the Deployment in the same reconcile.
    eventually(WAIT, "status backlog 12, desired 3", || async {
        env.endpoints().get("gh").await.is_ok_and(|e| {
            e.status.is_some_and(|s| {
                s.backlog.is_some_and(|b| b.pending == 12)
                    && s.replicas.is_some_and(|r| r.desired == 3)
            })
        })
    })
    .await?;

    // Dead letters are counted in the status.
    for _ in 0..2 {
        js.publish(names.dead_letter_subject(), "dead".into())
            .await?
            .await?;
    }
    eventually(WAIT, "deadLetters 2", || async {
        env.endpoints()
            .get("gh")
            .await
            .is_ok_and(|e| e.status.and_then(|s| s.dead_letters) == Some(2))
    })
    .await?;

    // Drain the backlog like a processor would.
    let consumer: PullConsumer = js
        .get_stream(names.stream())
        .await?
        .get_consumer("processor")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut msgs = consumer.fetch().max_messages(20).messages().await?;
    let mut acked = 0;
    while let Some(m) = msgs.next().await {
        m.map_err(|e| anyhow::anyhow!(e))?
            .ack()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        acked += 1;
    }
    assert_eq!(acked, 12);
    // Down to zero, but only after the cooldown.
    eventually(WAIT, "backlog 0 in status", || async {
        env.endpoints().get("gh").await.is_ok_and(|e| {
            e.status
                .and_then(|s| s.backlog)
                .is_some_and(|b| b.pending == 0 && b.ack_pending == 0)
        })
    })
    .await?;
    assert_eq!(
        env.replicas("gh").await,
        Some(3),
        "cooldown holds the replicas"
    );
    eventually(WAIT, "scaled to 0", || async {
        env.replicas("gh").await == Some(0)
    })
    .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_busy_endpoint_writes_status_on_the_resync_period_only() -> Result<()> {
    let env = Env::new("op-busy").await?;
    env.secret("gh", "secret").await?;
    env.create(
        "gh",
        spec(json!({"processor": {"replicas": {"min": 1, "max": 1}}})),
    )
    .await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    let op = env.op.as_ref().unwrap();
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    // The backlog changes all the time; each status write used to start a
    // reconcile that read a new backlog and wrote again.
    let writes = op.metrics.status_writes();
    let busy = Instant::now();
    let mut sent = 0;
    while busy.elapsed() < Duration::from_secs(4) {
        js.publish(names.subject(0), format!("{{\"n\":{sent}}}").into())
            .await?
            .await?;
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let busy_writes = op.metrics.status_writes() - writes;
    // Resync every 2 s: two or three refreshes, plus what the endpoint's
    // creation still had under way (without the filter: about a hundred).
    assert!(
        busy_writes <= 8,
        "{busy_writes} status writes in 4 s of traffic ({sent} webhooks)"
    );
    // The backlog is still reported.
    eventually(WAIT, "backlog in status", || async {
        env.endpoints().get("gh").await.is_ok_and(|e| {
            e.status
                .and_then(|s| s.backlog)
                .is_some_and(|b| b.pending == sent)
        })
    })
    .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn delete_policy_delete_and_cleanup_while_nats_is_down() -> Result<()> {
    let mut env = Env::new("op-delete").await?;
    env.secret("gh", "secret").await?;
    env.create("del", spec(json!({"stream": {"deletionPolicy": "Delete"}})))
        .await?;
    env.create(
        "stuck",
        spec(json!({"stream": {"deletionPolicy": "Delete"}})),
    )
    .await?;
    env.create("kept", spec(json!({}))).await?;
    for n in ["del", "stuck", "kept"] {
        env.wait_condition(n, "StreamReady", "True", None).await?;
    }
    let js = env.nats.jetstream().await?;

    // Delete policy: both streams go.
    env.endpoints()
        .delete("del", &DeleteParams::default())
        .await?;
    eventually(WAIT, "endpoint del gone", || async {
        env.endpoints()
            .get_opt("del")
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await?;
    let names = env.names("del");
    assert!(
        js.get_stream(names.stream()).await.is_err(),
        "stream deleted"
    );
    assert!(
        js.get_stream(names.dead_letter_stream()).await.is_err(),
        "DLQ deleted"
    );

    // NATS down during deletion: with Retain there is nothing to do in
    // NATS, so the endpoint goes at once; with Delete, cleanup is retried,
    // then released after the cleanup timeout with a Warning naming what
    // was left.
    env.nats.stop();
    env.endpoints()
        .delete("kept", &DeleteParams::default())
        .await?;
    eventually(WAIT, "endpoint kept released", || async {
        env.endpoints()
            .get_opt("kept")
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await?;
    assert!(
        !env.event_reasons()
            .await?
            .iter()
            .any(|(r, n)| r == "CleanupRetrying" && n.contains("_kept")),
        "Retain needs no NATS to delete"
    );
    env.endpoints()
        .delete("stuck", &DeleteParams::default())
        .await?;
    eventually(WAIT, "endpoint stuck released", || async {
        env.endpoints()
            .get_opt("stuck")
            .await
            .is_ok_and(|e| e.is_none())
    })
    .await?;
    let events = env.event_reasons().await?;
    let stream = env.names("stuck").stream();
    assert!(
        events.iter().any(|(r, _)| r == "CleanupRetrying"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(r, n)| r == "CleanupAbandoned" && n.contains(&stream)),
        "{events:?}"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn ordering_partitions_and_immutable_changes() -> Result<()> {
    let env = Env::new("op-order").await?;
    env.secret("gh", "secret").await?;
    env.create(
        "ord",
        spec(json!({"ordering": {"keyHeader": "X-Key", "partitions": 3}})),
    )
    .await?;
    env.wait_condition("ord", "StreamReady", "True", None)
        .await?;
    let names = env.names("ord");
    let js = env.nats.jetstream().await?;
    let stream = js.get_stream(names.stream()).await?;
    for p in 0..3u16 {
        let c = stream.consumer_info(names.consumer(Some(p))).await?;
        assert_eq!(
            c.config.filter_subjects,
            [names.subject(p), names.legacy_subject(p)]
        );
        assert_eq!(c.config.max_ack_pending, 1);
    }
    assert!(stream.consumer_info("processor").await.is_err());
    let cfg = config_of(&env.deployment("ord").await?)?;
    assert_eq!(cfg.consumers.len(), 3);

    // Fewer partitions would strand what is stored on the removed ones:
    // the API server refuses.
    let err = env
        .patch_spec("ord", json!({"ordering": {"partitions": 2}}))
        .await
        .expect_err("partitions cannot shrink");
    assert!(err.to_string().contains("cannot be reduced"), "{err}");

    // Traffic: seqs 1-4 and 6 on partition 0, 5 on partition 1; partition
    // 0 settles 1-4 (6 stays pending), partition 1 settles 5.
    for (i, p) in [0u16, 0, 0, 0, 1, 0].into_iter().enumerate() {
        js.publish(names.subject(p), format!("{{\"n\":{i}}}").into())
            .await?
            .await?;
    }
    for (p, n) in [(0u16, 4), (1, 1)] {
        let c: PullConsumer = stream
            .get_consumer(&names.consumer(Some(p)))
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let mut msgs = c.fetch().max_messages(n).messages().await?;
        while let Some(m) = msgs.next().await {
            m.map_err(|e| anyhow::anyhow!(e))?
                .double_ack()
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
        }
    }

    // More partitions while seq 6 waits on partition 0: a key moving to
    // another partition would overtake it, so the change waits (issue
    // 15.7); the endpoint keeps 3 partitions, and says why.
    env.patch_spec("ord", json!({"ordering": {"partitions": 4}}))
        .await?;
    let ep = env
        .wait_condition(
            "ord",
            "StreamReady",
            "True",
            Some("PartitionsChangeWaiting"),
        )
        .await?;
    let msg = condition(&ep, "StreamReady").unwrap().2;
    assert!(msg.contains("3 → 4") && msg.contains("1 webhook"), "{msg}");
    assert_eq!(ep.status.as_ref().and_then(|s| s.partitions), Some(3));
    assert!(stream.consumer_info(names.consumer(Some(3))).await.is_err());
    let cfg = config_of(&env.deployment("ord").await?)?;
    assert_eq!(cfg.consumers.len(), 3, "the processor serves what exists");
    // Seq 6 delivered: the change goes through; the new partition has no
    // history to skip.
    let c: PullConsumer = stream
        .get_consumer(&names.consumer(Some(0)))
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut msgs = c.fetch().max_messages(1).messages().await?;
    while let Some(m) = msgs.next().await {
        m.map_err(|e| anyhow::anyhow!(e))?
            .double_ack()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    eventually(WAIT, "processor-p3 created", || async {
        stream.consumer_info(names.consumer(Some(3))).await.is_ok()
    })
    .await?;
    let p3 = stream.consumer_info(names.consumer(Some(3))).await?;
    assert_eq!(p3.config.deliver_policy, DeliverPolicy::All);
    // The gateway may use the new partition once its consumer exists.
    eventually(WAIT, "status.partitions 4", || async {
        env.endpoints()
            .get("ord")
            .await
            .is_ok_and(|e| e.status.and_then(|s| s.partitions) == Some(4))
    })
    .await?;
    // Seq 7 lands on the new partition 3 (and stays undelivered).
    js.publish(names.subject(3), "{\"n\":7}".into())
        .await?
        .await?;

    // Ordering off: the shared consumer replaces the partitions and starts
    // at the earliest message they had not settled (7, on partition 3;
    // everything before was settled), not at the start of the history.
    env.patch_spec("ord", json!({"ordering": null})).await?;
    eventually(WAIT, "shared consumer, partitions gone", || async {
        stream.consumer_info("processor").await.is_ok()
            && stream.consumer_info(names.consumer(Some(0))).await.is_err()
    })
    .await?;
    let shared = stream.consumer_info("processor").await?;
    assert_eq!(
        shared.config.deliver_policy,
        DeliverPolicy::ByStartSequence { start_sequence: 7 }
    );
    assert_eq!(shared.num_pending, 1, "seq 7 only");

    // Ordering on again with 2 partitions would leave seq 7 (partition 3)
    // to no consumer: refused, nothing changed.
    env.patch_spec(
        "ord",
        json!({"ordering": {"keyHeader": "X-Key", "partitions": 2}}),
    )
    .await?;
    let ep = env
        .wait_condition(
            "ord",
            "StreamReady",
            "False",
            Some("PartitionsWouldStrandWebhooks"),
        )
        .await?;
    let msg = condition(&ep, "StreamReady").unwrap().2;
    assert!(msg.contains("at least 4"), "{msg}");
    assert!(stream.consumer_info("processor").await.is_ok(), "kept");
    assert!(stream.consumer_info(names.consumer(Some(0))).await.is_err());
    // With enough partitions it goes through, after the shared floor.
    env.patch_spec("ord", json!({"ordering": {"partitions": 4}}))
        .await?;
    env.wait_condition("ord", "StreamReady", "True", None)
        .await?;
    let p3 = stream.consumer_info(names.consumer(Some(3))).await?;
    assert_eq!(p3.num_pending, 1, "seq 7 waits on partition 3");
    assert!(stream.consumer_info("processor").await.is_err(), "replaced");

    // Storage cannot change in place: reported, stream untouched.
    env.patch_spec("ord", json!({"stream": {"storage": "file"}}))
        .await?;
    let ep = env
        .wait_condition("ord", "StreamReady", "False", Some("StreamConfigImmutable"))
        .await?;
    let msg = condition(&ep, "StreamReady").unwrap().2;
    assert!(msg.contains("storage"), "{msg}");
    let mut stream = js.get_stream(names.stream()).await?;
    assert_eq!(
        stream.info().await?.config.storage,
        async_nats::jetstream::stream::StorageType::Memory
    );
    // Reverting heals it.
    env.patch_spec("ord", json!({"stream": {"storage": "memory"}}))
        .await?;
    env.wait_condition("ord", "StreamReady", "True", None)
        .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn the_first_webhook_wakes_an_endpoint_at_zero_without_waiting_for_a_resync() -> Result<()> {
    // A resync far longer than the promise: only the wake can explain a
    // scale-up within 2 s.
    let env = Env::with_settings("op-wake", |s| Settings {
        resync_interval: Duration::from_secs(120),
        ..s
    })
    .await?;
    env.secret("gh", "secret").await?;
    env.create(
        "gh",
        spec(json!({"processor": {"replicas": {"min": 0, "max": 3}}})),
    )
    .await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    env.wait_condition("gh", "ProcessorReady", "True", Some("ScaledToZero"))
        .await?;
    assert_eq!(env.replicas("gh").await, Some(0));
    // Let the reconcile that scaled to zero finish (and arm the wake).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    let sent = Instant::now();
    let ack = js
        .publish(names.subject(0), "{\"n\":1}".into())
        .await?
        .await;
    if let Err(e) = ack {
        let info = js.get_stream(names.stream()).await?.info().await?.clone();
        let log = env.nats.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        anyhow::bail!(
            "publish not acknowledged ({e}); stream {:?} state {:?}\n{}",
            info.config.subjects,
            info.state,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    eventually(Duration::from_secs(2), "scaled to 1 within 2 s", || async {
        env.replicas("gh").await == Some(1)
    })
    .await?;
    println!("woken {:?} after the webhook", sent.elapsed());
    env.stop().await;
    Ok(())
}

/// Publish `n` webhooks of about 1 KiB to the endpoint's intake subject as
/// the gateway would (PubAck awaited); the first refusal ends it.
async fn fill(
    js: &async_nats::jetstream::Context,
    names: &EndpointNames,
    from: usize,
    n: usize,
) -> Result<usize, String> {
    fill_on(js, &names.subject(0), from, n).await
}

/// Like [`fill`], on `subject`.
async fn fill_on(
    js: &async_nats::jetstream::Context,
    subject: &str,
    from: usize,
    n: usize,
) -> Result<usize, String> {
    let pad = "x".repeat(1000);
    for i in from..from + n {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("w{i}").as_str());
        let sent = js
            .publish_with_headers(
                subject.to_owned(),
                h,
                format!("{{\"n\":{i},\"pad\":\"{pad}\"}}").into(),
            )
            .await;
        match sent {
            Ok(ack) => {
                if let Err(e) = ack.await {
                    return Err(format!("refused after {} ({e})", i - from));
                }
            }
            Err(e) => return Err(format!("refused after {} ({e})", i - from)),
        }
    }
    Ok(n)
}

/// Acknowledge up to `n` messages on the work stream's consumer, as a
/// processor would after delivering them.
async fn deliver(js: &async_nats::jetstream::Context, stream: &str, n: usize) -> Result<usize> {
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer("processor")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut msgs = consumer
        .fetch()
        .max_messages(n)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut acked = 0;
    while let Some(m) = msgs.next().await {
        m.map_err(|e| anyhow::anyhow!(e))?
            .double_ack()
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        acked += 1;
    }
    Ok(acked)
}

#[tokio::test]
async fn only_undelivered_webhooks_fill_an_endpoint() -> Result<()> {
    let env = Env::new("op-store").await?;
    env.secret("gh", "secret").await?;
    // 200 KiB of undelivered capacity (bodies up to 1 KiB), 100 KiB of
    // history.
    env.create(
        "gh",
        spec(json!({
            "ingress": {"maxBodyBytes": 1024},
            "stream": {"maxBytes": 204800, "historyMaxBytes": 102400},
        })),
    )
    .await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;

    // Delivered history far beyond maxBytes never refuses intake: 600
    // webhooks (~600 KiB), each batch delivered before the next. A
    // delivered webhook leaves the work stream once the history's source
    // has confirmed its copy too (flow control: within a heartbeat, 1 s).
    let mut work = js.get_stream(names.stream()).await?;
    for round in 0..6 {
        fill(&js, &names, round * 100, 100)
            .await
            .map_err(|e| anyhow::anyhow!("round {round}: {e}"))?;
        assert_eq!(deliver(&js, &names.stream(), 100).await?, 100);
        eventually(WAIT, "work stream empty once delivered", || {
            let mut work = work.clone();
            async move { work.info().await.is_ok_and(|i| i.state.messages == 0) }
        })
        .await?;
    }
    let mut history = js.get_stream(names.history_stream()).await?;
    let h = history.info().await?.state.clone();
    assert!(h.bytes <= 102_400, "history over its bound: {h:?}");
    assert!(
        h.messages > 0 && h.last_sequence >= 600,
        "history kept the newest: {h:?}"
    );

    // Undelivered webhooks fill it: refused, condition BacklogFull.
    let refused = fill(&js, &names, 10_000, 1000).await;
    let why = refused.expect_err("a full backlog must refuse");
    assert!(why.contains("refused after"), "{why}");
    let ep = env
        .wait_condition("gh", "StreamReady", "False", Some("BacklogFull"))
        .await?;
    let (_, _, message) = condition(&ep, "StreamReady").unwrap();
    assert!(message.contains("undelivered"), "{message}");
    let held = work.info().await?.state.messages;
    assert!(held > 100, "{held} undelivered");
    // The operator's gauge says how full it is (the alert
    // SpillwayWorkStreamFilling reads it).
    let series = format!(
        "spillway_operator_endpoint_stream_fill_percent{{webhook_endpoint=\"{}/gh\"}}",
        env.ns
    );
    let fill_gauge = || {
        let op = env.op.as_ref().expect("operator running");
        crate::processor_support::metric_value(&op.metrics.render(), &series)
    };
    eventually(WAIT, "fill gauge near 100", || async {
        fill_gauge().is_some_and(|p| p >= 95.0)
    })
    .await?;

    // Lowering the limit below the backlog is refused, nothing deleted.
    env.patch_spec("gh", json!({"stream": {"maxBytes": 65536}}))
        .await?;
    let ep = env
        .wait_condition(
            "gh",
            "StreamReady",
            "False",
            Some("LimitsWouldDropWebhooks"),
        )
        .await?;
    assert!(
        condition(&ep, "StreamReady")
            .unwrap()
            .2
            .contains("nothing was changed")
    );
    assert_eq!(work.info().await?.state.messages, held, "nothing deleted");
    assert_eq!(work.info().await?.config.max_bytes, 204_800);
    env.patch_spec("gh", json!({"stream": {"maxBytes": 204800}}))
        .await?;

    // Drained: accepted again, and the condition clears.
    while deliver(&js, &names.stream(), 500).await? > 0 {}
    fill(&js, &names, 20_000, 10)
        .await
        .map_err(|e| anyhow::anyhow!("after draining: {e}"))?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    eventually(WAIT, "fill gauge low once drained", || async {
        fill_gauge().is_some_and(|p| p <= 10.0)
    })
    .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_consumer_not_spillways_holding_webhooks_is_named() -> Result<()> {
    let env = Env::new("op-foreign").await?;
    env.secret("gh", "secret").await?;
    env.create("gh", spec(json!({}))).await?;
    env.wait_condition("gh", "StreamReady", "True", Some("StreamReady"))
        .await?;
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    let mut work = js.get_stream(names.stream()).await?;
    // Someone's consumer on the work stream, as `nats consumer add` makes
    // while debugging: it takes nothing.
    work.create_consumer(async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("debugging".into()),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    })
    .await?;

    // Delivered by the processor and copied to the history, yet kept: the
    // stream keeps each webhook until every consumer has taken it.
    fill(&js, &names, 0, 10)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(deliver(&js, &names.stream(), 10).await?, 10);
    let ep = env
        .wait_condition("gh", "StreamReady", "True", Some("ForeignConsumerHolding"))
        .await?;
    let (_, _, message) = condition(&ep, "StreamReady").unwrap();
    assert!(message.contains("debugging (10)"), "{message}");
    assert!(
        message.contains(&format!("nats consumer rm {} debugging", names.stream())),
        "{message}"
    );
    assert_eq!(work.info().await?.state.messages, 10, "held for it");
    eventually(WAIT, "a ForeignConsumerHolding event", || async {
        env.event_reasons().await.is_ok_and(|r| {
            r.iter().any(|(reason, note)| {
                reason == "ForeignConsumerHolding" && note.contains("debugging")
            })
        })
    })
    .await?;

    // Removed: the stream lets the webhooks go, and the condition clears.
    work.delete_consumer("debugging").await?;
    eventually(WAIT, "work stream empty without it", || {
        let mut work = work.clone();
        async move { work.info().await.is_ok_and(|i| i.state.messages == 0) }
    })
    .await?;
    env.wait_condition("gh", "StreamReady", "True", Some("StreamReady"))
        .await?;
    env.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_endpoint_on_the_one_stream_layout_is_migrated_without_loss() -> Result<()> {
    let env = Env::new("op-migrate").await?;
    env.secret("gh", "secret").await?;
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    // The older layout, as the previous operator made it: one limits
    // stream with the intake subjects and a consumer that has delivered
    // 4 of 10 webhooks.
    let legacy = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: names.legacy_stream(),
            subjects: vec![names.legacy_stream_subjects()],
            storage: async_nats::jetstream::stream::StorageType::Memory,
            ..Default::default()
        })
        .await?;
    legacy
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("processor".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    fill_on(&js, &names.legacy_subject(0), 0, 10)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    assert_eq!(deliver(&js, &names.legacy_stream(), 4).await?, 4);

    env.create("gh", spec(json!({}))).await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    // Intake now goes to the work stream; the processor drains the legacy
    // consumer first (the work stream's consumer is paused meanwhile).
    fill(&js, &names, 100, 3)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut work = js.get_stream(names.stream()).await?;
    assert_eq!(work.info().await?.state.messages, 3);
    eventually(
        WAIT,
        "processor config drains the legacy consumer",
        || async {
            env.deployment("gh").await.is_ok_and(|d| {
                config_of(&d).ok().and_then(|c| c.drain).is_some_and(|d| {
                    d.stream == names.legacy_stream() && d.consumers == ["processor"]
                })
            })
        },
    )
    .await?;
    let paused = work.consumer_info("processor").await?.config.pause_until;
    assert!(
        paused.is_some(),
        "work consumer paused while the legacy drains"
    );
    assert_eq!(deliver(&js, &names.legacy_stream(), 10).await?, 6);

    // Drained: the legacy stream goes, the work consumer resumes, the
    // history holds all 13.
    eventually(WAIT, "legacy stream deleted", || async {
        js.get_stream(names.legacy_stream()).await.is_err()
    })
    .await?;
    eventually(WAIT, "work consumer unpaused", || {
        let work = work.clone();
        async move {
            work.consumer_info("processor")
                .await
                .is_ok_and(|i| i.config.pause_until.is_none())
        }
    })
    .await?;
    eventually(WAIT, "processor config without drain", || async {
        env.deployment("gh")
            .await
            .is_ok_and(|d| config_of(&d).is_ok_and(|c| c.drain.is_none()))
    })
    .await?;
    assert_eq!(deliver(&js, &names.stream(), 10).await?, 3);
    let mut history = js.get_stream(names.history_stream()).await?;
    assert_eq!(history.info().await?.state.messages, 13);
    env.stop().await;
    Ok(())
}

/// Fetch up to `n` from consumer `name` of `stream`, acknowledge them, and
/// return their `n` fields in order.
async fn take(
    js: &async_nats::jetstream::Context,
    stream: &str,
    name: &str,
    n: usize,
) -> Result<Vec<u64>> {
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer(name)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut msgs = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let mut got = Vec::new();
    while let Some(m) = msgs.next().await {
        let m = m.map_err(|e| anyhow::anyhow!(e))?;
        let v: Value = serde_json::from_slice(&m.payload)?;
        got.push(v["n"].as_u64().unwrap_or(u64::MAX));
        m.double_ack().await.map_err(|e| anyhow::anyhow!(e))?;
    }
    Ok(got)
}

/// Issue 15.11: an endpoint whose streams use the previous release's
/// one-token subjects (`spillway.in.<ns>_<name>.<p>`) gains the scoped
/// ones in place; what was stored under the old subjects is still
/// delivered, in order, before what comes after, and copied to the history.
#[tokio::test]
async fn scoped_subjects_are_added_in_place_without_loss() -> Result<()> {
    use spillway_operator::jetstream::{
        consumer_configs, dead_letter_config, history_config, history_consumer_config,
        stream_config, work_subjects,
    };
    let env = Env::new("op-subjects").await?;
    env.secret("gh", "secret").await?;
    let names = env.names("gh");
    let js = env.nats.jetstream().await?;
    let want = spec(json!({"ordering": {"keyHeader": "X-Key", "partitions": 2}}));
    let typed: spillway_api::WebhookEndpointSpec = serde_json::from_value(want.clone())?;
    let t = spillway_api::validate::check(&typed).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // The previous release's layout: the same streams and consumers, on
    // the one-token subjects.
    let mut work = stream_config(&names, &typed, &t);
    work.subjects = vec![names.legacy_stream_subjects(), names.legacy_due_subjects()];
    let work = js.create_stream(work).await?;
    let mut hc = history_consumer_config(&names);
    hc.filter_subjects.clear();
    hc.filter_subject = names.legacy_stream_subjects();
    work.create_consumer(hc).await?;
    let mut dlq = dead_letter_config(&names, &typed, &t);
    dlq.subjects = vec![names.legacy_dead_letter_subject()];
    for cfg in [history_config(&names, &typed, &t, false), dlq] {
        js.create_stream(cfg).await?;
    }
    for (i, mut c) in consumer_configs(&names, &typed, &t).into_iter().enumerate() {
        c.filter_subjects.clear();
        c.filter_subject = names.legacy_subject(i as u16);
        work.create_consumer(c).await?;
    }
    fill_on(&js, &names.legacy_subject(0), 0, 3)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    fill_on(&js, &names.legacy_subject(1), 10, 2)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;

    env.create("gh", want).await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    eventually(WAIT, "scoped subjects on the work stream", || {
        let js = js.clone();
        let names = names.clone();
        async move {
            match js.get_stream(names.stream()).await {
                Ok(mut s) => s
                    .info()
                    .await
                    .is_ok_and(|i| i.config.subjects == work_subjects(&names)),
                Err(_) => false,
            }
        }
    })
    .await?;
    let mut work = js.get_stream(names.stream()).await?;
    for p in 0..2u16 {
        let c = work.consumer_info(format!("processor-p{p}")).await?;
        assert_eq!(
            c.config.filter_subjects,
            [names.subject(p), names.legacy_subject(p)]
        );
    }
    let h = work.consumer_info("history").await?;
    assert_eq!(
        h.config.filter_subjects,
        [names.stream_subjects(), names.legacy_stream_subjects()]
    );
    let dlq = js
        .get_stream(names.dead_letter_stream())
        .await?
        .info()
        .await?
        .config
        .clone();
    assert!(
        dlq.subjects.contains(&names.dead_letter_subjects()),
        "{:?}",
        dlq.subjects
    );
    assert_eq!(work.info().await?.state.messages, 5, "nothing lost");
    // The new gateway's subject, and still the old one (a gateway of the
    // previous release during the upgrade).
    fill_on(&js, &names.subject(0), 3, 1)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    fill_on(&js, &names.legacy_subject(0), 4, 1)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // Partition 0: the old webhooks first, then the new, in order.
    assert_eq!(
        take(&js, &names.stream(), "processor-p0", 10).await?,
        [0, 1, 2, 3, 4]
    );
    assert_eq!(
        take(&js, &names.stream(), "processor-p1", 10).await?,
        [10, 11]
    );
    let history = js.get_stream(names.history_stream()).await?;
    eventually(WAIT, "the history holds all 7", || {
        let mut history = history.clone();
        async move { history.info().await.is_ok_and(|i| i.state.messages == 7) }
    })
    .await?;
    eventually(WAIT, "the work stream is empty", || {
        let mut work = work.clone();
        async move { work.info().await.is_ok_and(|i| i.state.messages == 0) }
    })
    .await?;
    env.stop().await;
    Ok(())
}

/// The operator tells the gateway to store format 2 (`status.storedFormat`)
/// only once no processor of an earlier release can read the endpoint's
/// stream: every processor Deployment it manages is marked as a format-2
/// reader and has no pods of an earlier template left. Once 2, never back.
#[tokio::test]
async fn stored_format_2_waits_for_every_processor_to_read_it() -> Result<()> {
    let env = Env::with_settings("op-format", |s| Settings {
        stored_format_settle: Duration::from_secs(3),
        ..s
    })
    .await?;
    // A processor Deployment of an earlier release (managed by the
    // operator, not marked), mid-rollout: 2 pods, 1 of the new template.
    let old: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "earlier-processor",
            "labels": {"app.kubernetes.io/managed-by": "spillway-operator"},
        },
        "spec": {
            "selector": {"matchLabels": {"app": "earlier"}},
            "template": {
                "metadata": {"labels": {"app": "earlier"}},
                "spec": {"containers": [{"name": "processor", "image": "spillway/processor:old"}]},
            },
        },
    }))?;
    env.deployments()
        .create(&PostParams::default(), &old)
        .await?;
    // What the Deployment controller reports: it has seen the current
    // generation (for Deployments, annotations count), and `updated` of
    // the 2 pods are of the current template.
    let rollout = async |updated: i32| -> Result<()> {
        let generation = env
            .deployments()
            .get("earlier-processor")
            .await?
            .metadata
            .generation;
        let status = json!({"status": {
            "observedGeneration": generation,
            "replicas": 2,
            "updatedReplicas": updated,
        }});
        env.deployments()
            .patch_status(
                "earlier-processor",
                &PatchParams::default(),
                &Patch::Merge(status),
            )
            .await?;
        Ok(())
    };
    let mark = async |value: Value| -> Result<()> {
        let patch =
            json!({"metadata": {"annotations": {"spillway.dev/reads-stored-format": value}}});
        env.deployments()
            .patch(
                "earlier-processor",
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await?;
        Ok(())
    };
    rollout(1).await?;
    env.secret("gh", "secret").await?;
    env.create("gh", spec(json!({}))).await?;
    env.wait_condition("gh", "StreamReady", "True", None)
        .await?;
    // Its own Deployment says it reads format 2, on the pods too.
    let d = env.deployment("gh").await?;
    assert_eq!(d.annotations()["spillway.dev/reads-stored-format"], "2");
    let pod = d.spec.template.metadata.unwrap_or_default();
    assert_eq!(
        pod.annotations.unwrap_or_default()["spillway.dev/reads-stored-format"],
        "2"
    );
    let format = async || -> Result<Option<u8>> {
        Ok(env
            .endpoints()
            .get("gh")
            .await?
            .status
            .and_then(|s| s.stored_format))
    };
    // Three resyncs (2 s each): format 1 while the earlier one is unmarked,
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(format().await?, None, "an unmarked processor may still run");
    // and while pods of the earlier template still run once it is marked
    // (the controller has seen the new generation, 1 pod of 2 updated).
    mark(json!("2")).await?;
    rollout(1).await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        format().await?,
        None,
        "pods of the earlier template still run"
    );
    // Rolled out: format 2.
    rollout(2).await?;
    eventually(WAIT, "status.storedFormat 2", || async {
        format().await.is_ok_and(|f| f == Some(2))
    })
    .await?;
    // An unmarked processor appearing afterwards does not take it back:
    // what was stored in format 2 stays so.
    mark(Value::Null).await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(format().await?, Some(2));
    env.stop().await;
    Ok(())
}

//! WebhookListeners against the real kube-apiserver and nats-server: the
//! in-process operator makes each listener's consumers and Deployment; the
//! test runs each Deployment's processor as a local process with the
//! config the operator rendered (pods do not run here).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::operator_support::{config_of, operator_settings};
use crate::processor_signing::verify;
use crate::processor_support::{ProcessorProc, Reply, Sink, spillway, spillway_ok};
use anyhow::{Context, Result, bail};
use async_nats::HeaderMap;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spillway_api::names::{EndpointNames, listener_token};
use spillway_api::wire;
use spillway_api::{WebhookEndpoint, WebhookListener};
use spillway_operator::{Running, Settings};
use spillway_tests::{ControlPlane, NatsServer, eventually};

const WAIT: Duration = Duration::from_secs(40);

struct Env {
    client: Client,
    ns: String,
    nats: NatsServer,
    _op: Running,
}

impl Env {
    /// A namespace, a NATS server and an operator watching `watch` (the
    /// new namespace when `None`).
    async fn new(prefix: &str, watch: Option<&str>) -> Result<Self> {
        let cp = ControlPlane::shared().await;
        let ns = cp.namespace(prefix).await?;
        let client = cp.client().await?;
        let nats = NatsServer::start().await?;
        let settings = Settings {
            scale_down_cooldown: Duration::from_secs(3),
            nats_request_timeout: Duration::from_secs(1),
            ..operator_settings(&nats.url, watch.unwrap_or(&ns))
        };
        let op = spillway_operator::start(settings, client.clone()).await?;
        Ok(Self {
            client,
            ns,
            nats,
            _op: op,
        })
    }

    fn listeners(&self, ns: &str) -> Api<WebhookListener> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn create_endpoint(&self, ns: &str, name: &str, extra: serde_json::Value) -> Result<()> {
        let mut spec = json!({
            "verification": {"scheme": "none"},
            // The built-in listener is paused: these tests are about the
            // WebhookListeners (it still holds its own copy of each webhook).
            "processor": {"sink": {"url": "http://127.0.0.1:9/unused"}, "paused": true},
        });
        merge(&mut spec, extra);
        let ep: WebhookEndpoint = serde_json::from_value(json!({
            "apiVersion": "spillway.dev/v1alpha1",
            "kind": "WebhookEndpoint",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))?;
        Api::<WebhookEndpoint>::namespaced(self.client.clone(), ns)
            .create(&PostParams::default(), &ep)
            .await?;
        Ok(())
    }

    async fn create_listener(&self, ns: &str, name: &str, spec: serde_json::Value) -> Result<()> {
        let l: WebhookListener = serde_json::from_value(json!({
            "apiVersion": "spillway.dev/v1alpha1",
            "kind": "WebhookListener",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))?;
        self.listeners(ns)
            .create(&PostParams::default(), &l)
            .await?;
        Ok(())
    }

    /// Wait until listener `name` has condition `cond` = `status` (and
    /// `reason`); the listener then.
    async fn wait_condition(
        &self,
        ns: &str,
        name: &str,
        cond: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<WebhookListener> {
        let api = self.listeners(ns);
        let start = Instant::now();
        loop {
            let l = api.get(name).await.ok();
            let c = l.as_ref().and_then(|l| {
                l.status
                    .as_ref()?
                    .conditions
                    .iter()
                    .find(|c| c.type_ == cond)
                    .cloned()
            });
            if let (Some(l), Some(c)) = (&l, &c)
                && c.status == status
                && reason.is_none_or(|r| c.reason == r)
            {
                return Ok(l.clone());
            }
            if start.elapsed() > WAIT {
                bail!(
                    "listener {ns}/{name}: {cond}={status} ({reason:?}) not reached; status: {}",
                    serde_json::to_string(&l.and_then(|l| l.status)).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Run listener `name`'s processor as the operator rendered it (its
    /// signing Secret becomes a local file, as a mounted volume would).
    async fn run_listener(&self, name: &str, signing: Option<&str>) -> Result<ProcessorProc> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.ns);
        let dname = format!("{name}-listener-processor");
        eventually(WAIT, "the listener's Deployment", || async {
            api.get_opt(&dname).await.ok().flatten().is_some()
        })
        .await?;
        let mut cfg = config_of(&api.get(&dname).await?)?;
        if let Some(secret) = signing {
            let f = std::env::temp_dir().join(format!("spillway-{}-{name}-signing", self.ns));
            std::fs::write(&f, secret)?;
            cfg.signing_secret_file = Some(f.display().to_string());
        }
        ProcessorProc::start(&cfg, &self.nats.url).await
    }

    /// Publish webhooks like the gateway, with the provider's event header
    /// (`None`: a webhook that names no event type).
    async fn publish(
        &self,
        endpoint: &str,
        hooks: &[(String, Option<&str>, String)],
    ) -> Result<()> {
        let js = self.nats.jetstream().await?;
        let names = EndpointNames::new(&self.ns, endpoint);
        let mut acks = Vec::new();
        for (id, event, body) in hooks {
            let mut h = HeaderMap::new();
            h.insert(wire::NATS_MSG_ID, id.as_str());
            h.insert(wire::DELIVERY_ID, id.as_str());
            h.insert(wire::CONTENT_TYPE, "application/json");
            h.insert(
                wire::RECEIVED_AT,
                format!("{:.3}", jiff::Timestamp::now()).as_str(),
            );
            if let Some(e) = event {
                h.insert("Spillway-Orig-X-GitHub-Event", *e);
            }
            acks.push(
                js.publish_with_headers(names.subject(0), h, body.clone().into())
                    .await?,
            );
        }
        for a in acks {
            a.await?;
        }
        Ok(())
    }

    async fn consumer_exists(&self, stream: &str, name: &str) -> Result<bool> {
        let js = self.nats.jetstream().await?;
        let s = js.get_stream(stream).await?;
        Ok(s.consumer_info(name).await.is_ok())
    }
}

fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (a.as_object_mut(), b) {
        for (k, v) in b {
            a.insert(k, v);
        }
    }
}

fn ids(sink: &Sink) -> HashSet<String> {
    sink.received().into_iter().map(|r| r.id).collect()
}

/// Two listeners on one endpoint: each receives only what its eventTypes
/// and filter select, under its own cap, and the one with a signing
/// Secret signs with it (checked with an independent Standard Webhooks
/// verifier); what a filter rejects is acknowledged and counted. Deleting
/// one removes its consumers and leaves the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_select_cap_and_sign_on_their_own() -> Result<()> {
    let env = Env::new("whl", None).await?;
    let ns = env.ns.clone();
    let ci_sink = Sink::start().await?;
    ci_sink.set_default(Reply::slow(200, Duration::from_millis(250)));
    let bot_sink = Sink::start().await?;
    bot_sink.set_default(Reply::slow(200, Duration::from_millis(100)));
    let bot_secret = "whsec_c3BpbGx3YXkgbGlzdGVuZXIgYm90IHNpZ25pbmcga2V5";
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "bot-signing", "namespace": ns},
        "stringData": {"key": bot_secret},
    }))?;
    Api::<Secret>::namespaced(env.client.clone(), &ns)
        .create(&PostParams::default(), &secret)
        .await?;
    env.create_endpoint(&ns, "gh", json!({})).await?;
    env.create_listener(
        &ns,
        "ci",
        json!({
            "endpointRef": {"name": "gh"},
            "eventTypes": ["push"],
            "sink": {"url": ci_sink.url},
            "concurrency": 2,
        }),
    )
    .await?;
    env.create_listener(
        &ns,
        "bot",
        json!({
            "endpointRef": {"name": "gh"},
            "eventTypes": ["issues"],
            "filter": "body.action == 'opened'",
            "sink": {"url": bot_sink.url},
            "concurrency": 5,
            "signing": {"secretRef": {"name": "bot-signing", "key": "key"}},
        }),
    )
    .await?;
    let ci = env
        .wait_condition(&ns, "ci", "StreamReady", "True", None)
        .await?;
    env.wait_condition(&ns, "bot", "StreamReady", "True", None)
        .await?;
    let status = ci.status.clone().unwrap_or_default();
    assert_eq!(
        status.endpoint.as_deref(),
        Some(format!("{ns}/gh").as_str())
    );
    assert_eq!(status.listener, Some(listener_token(&ns, "ci")));
    let ci_proc = env.run_listener("ci", None).await?;
    let bot_proc = env.run_listener("bot", Some(bot_secret)).await?;

    let mut hooks = Vec::new();
    let mut push = HashSet::new();
    let mut opened = HashSet::new();
    for i in 0..12 {
        let id = format!("push-{i}");
        push.insert(id.clone());
        hooks.push((
            id,
            Some("push"),
            format!(r#"{{"ref":"refs/heads/main","n":{i}}}"#),
        ));
    }
    for i in 0..10 {
        let id = format!("opened-{i}");
        opened.insert(id.clone());
        hooks.push((
            id,
            Some("issues"),
            format!(r#"{{"action":"opened","n":{i}}}"#),
        ));
    }
    for i in 0..4 {
        hooks.push((
            format!("closed-{i}"),
            Some("issues"),
            r#"{"action":"closed"}"#.into(),
        ));
    }
    for i in 0..3 {
        hooks.push((format!("plain-{i}"), None, r#"{"hello":"world"}"#.into()));
    }
    env.publish("gh", &hooks).await?;

    eventually(WAIT, "ci and bot deliveries", || async {
        ci_sink.count() >= 12 && bot_sink.count() >= 10
    })
    .await?;
    // Settled: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ids(&ci_sink), push, "ci receives push only");
    assert_eq!(ci_sink.count(), 12, "once each");
    assert_eq!(ids(&bot_sink), opened, "bot receives opened issues only");
    assert_eq!(bot_sink.count(), 10, "once each");
    assert_eq!(ci_sink.max_in_flight(), 2, "ci's cap is 2, and used");
    let bot_peak = bot_sink.max_in_flight();
    assert!(
        (2..=5).contains(&bot_peak),
        "bot's cap is 5: peak {bot_peak}"
    );
    for r in bot_sink.received() {
        verify(bot_secret, &r.headers, &r.body, Duration::from_secs(300))
            .with_context(|| format!("bot delivery {} signed with bot's secret", r.id))?;
    }
    for r in ci_sink.received() {
        assert!(
            r.headers.get("webhook-signature").is_none(),
            "ci has no signing secret"
        );
    }
    assert_eq!(
        ci_proc
            .metric("spillway_processor_filtered_total{reason=\"event_type\"}")
            .await?,
        17.0
    );
    assert_eq!(
        bot_proc
            .metric("spillway_processor_filtered_total{reason=\"event_type\"}")
            .await?,
        15.0
    );
    assert_eq!(
        bot_proc
            .metric("spillway_processor_filtered_total{reason=\"expression\"}")
            .await?,
        4.0
    );
    // Each listener's backlog drains, filtered webhooks included.
    eventually(WAIT, "listener backlogs at zero", || async {
        let mut zero = true;
        for name in ["ci", "bot"] {
            let b = env
                .listeners(&ns)
                .get(name)
                .await
                .ok()
                .and_then(|l| l.status?.backlog);
            zero &= b.is_some_and(|b| b.pending == 0 && b.ack_pending == 0);
        }
        zero
    })
    .await?;

    // Each listener's attempts are recorded under its own name, and one
    // webhook can be retriggered for one listener only.
    let ep_ref = format!("{ns}/gh");
    let nats_env = [("NATS_URL", env.nats.url.as_str())];
    eventually(WAIT, "bot's attempt record", || async {
        spillway_ok(
            &["attempts", &ep_ref, "--id", "opened-3", "-o", "json"],
            &nats_env,
        )
        .await
        .ok()
        .and_then(|o| serde_json::from_str::<serde_json::Value>(&o.stdout).ok())
        .is_some_and(|v| {
            v["items"].as_array().is_some_and(|items| {
                items.len() == 1
                    && items[0]["listener"] == listener_token(&ns, "bot").as_str()
                    && items[0]["decision"] == "delivered"
            })
        })
    })
    .await?;
    spillway_ok(
        &["redeliver", &ep_ref, "opened-3", "--listener", "bot"],
        &nats_env,
    )
    .await?;
    eventually(WAIT, "bot gets opened-3 again", || async {
        bot_sink.attempts("opened-3").len() == 2
    })
    .await?;
    let unknown = spillway(
        &["redeliver", &ep_ref, "opened-3", "--listener", "nobody"],
        &nats_env,
    )
    .await?;
    assert!(
        !unknown.success && unknown.stderr.contains("listener \"nobody\" not found"),
        "{}",
        unknown.stderr
    );
    assert_eq!(ci_sink.count(), 12, "the redelivery went to bot only");
    // A replay for one listener: bot gets its 10 opened issues again (its
    // filter still drops the rest), ci nothing.
    let out = spillway_ok(
        &["replay", &ep_ref, "--since", "1h", "--listener", "bot"],
        &nats_env,
    )
    .await?;
    assert!(out.stdout.contains("replayed"), "{}", out.stdout);
    eventually(WAIT, "bot gets every opened issue again", || async {
        (0..10).all(|i| {
            let n = bot_sink.attempts(&format!("opened-{i}")).len();
            n == if i == 3 { 3 } else { 2 }
        })
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ci_sink.count(), 12, "the replay went to bot only");
    // `spillway status ENDPOINT` lists the endpoint's listeners.
    let kubeconfig = ControlPlane::shared()
        .await
        .kubeconfig
        .display()
        .to_string();
    let status = spillway_ok(
        &["status", &ep_ref],
        &[
            ("KUBECONFIG", kubeconfig.as_str()),
            ("NATS_URL", env.nats.url.as_str()),
        ],
    )
    .await?;
    for l in ["bot", "ci"] {
        assert!(
            status.stdout.contains(&format!("  {ns}/{l} ")),
            "status lists listener {l}:\n{}",
            status.stdout
        );
    }

    // Deleting bot removes its consumers, not the others'.
    let names = EndpointNames::new(&ns, "gh");
    let bot_token = listener_token(&ns, "bot");
    let ci_token = listener_token(&ns, "ci");
    assert!(
        env.consumer_exists(&names.stream(), &names.listener_consumer(&bot_token))
            .await?
    );
    env.listeners(&ns)
        .delete("bot", &DeleteParams::default())
        .await?;
    eventually(WAIT, "bot's consumers deleted", || async {
        !env.consumer_exists(&names.stream(), &names.listener_consumer(&bot_token))
            .await
            .unwrap_or(true)
            && !env
                .consumer_exists(&names.retry_stream(), &names.retry_consumer(&bot_token))
                .await
                .unwrap_or(true)
    })
    .await?;
    eventually(WAIT, "bot's listener gone", || async {
        env.listeners(&ns)
            .get_opt("bot")
            .await
            .is_ok_and(|l| l.is_none())
    })
    .await?;
    for (stream, consumer) in [
        (names.stream(), names.listener_consumer(&ci_token)),
        (names.stream(), names.consumer(None)),
        (names.retry_stream(), names.retry_consumer(&ci_token)),
    ] {
        assert!(
            env.consumer_exists(&stream, &consumer).await?,
            "{stream}/{consumer} kept"
        );
    }
    // ci still receives.
    env.publish("gh", &[("push-after".into(), Some("push"), "{}".into())])
        .await?;
    eventually(WAIT, "ci receives after bot is gone", || async {
        ids(&ci_sink).contains("push-after")
    })
    .await?;
    Ok(())
}

/// A listener in another namespace is refused until the endpoint's
/// allowedListeners admits that namespace; filters that do not compile and
/// unknown endpoints are refused with their reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_acceptance_follows_the_endpoint() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ep_ns = cp.namespace("whl-ep").await?;
    let listener_ns = cp.namespace("whl-team").await?;
    cp.kubectl_output(&["label", "namespace", &listener_ns, "team=ci"])
        .await?;
    // The operator watches the listeners' namespace; it reads the endpoint
    // in the other one.
    let env = Env::new("whl-op", Some(&listener_ns)).await?;
    env.create_endpoint(&ep_ns, "gh", json!({})).await?;
    let spec = json!({
        "endpointRef": {"name": "gh", "namespace": ep_ns},
        "sink": {"url": "http://127.0.0.1:9/ci"},
    });
    env.create_listener(&listener_ns, "ci", spec.clone())
        .await?;
    let l = env
        .wait_condition(&listener_ns, "ci", "Accepted", "False", Some("NotAllowed"))
        .await?;
    let msg = &l.status.unwrap_or_default().conditions[1].message;
    assert!(msg.contains("allowedListeners"), "{msg}");

    // Admit namespaces labelled team=ci.
    Api::<WebhookEndpoint>::namespaced(env.client.clone(), &ep_ns)
        .patch(
            "gh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedListeners": {"namespaces": {
                "from": "Selector", "selector": {"matchLabels": {"team": "ci"}}
            }}}})),
        )
        .await?;
    env.wait_condition(&listener_ns, "ci", "Accepted", "True", None)
        .await?;
    // Nothing reconciles the endpoint's namespace here: no stream yet.
    env.wait_condition(
        &listener_ns,
        "ci",
        "StreamReady",
        "False",
        Some("StreamMissing"),
    )
    .await?;

    let mut bad = spec.clone();
    merge(&mut bad, json!({"filter": "body.ref =="}));
    env.create_listener(&listener_ns, "bad-filter", bad).await?;
    let l = env
        .wait_condition(
            &listener_ns,
            "bad-filter",
            "Accepted",
            "False",
            Some("FilterInvalid"),
        )
        .await?;
    let status = l.status.unwrap_or_default();
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Accepted")
        .context("Accepted")?;
    assert!(c.message.contains("does not compile"), "{}", c.message);

    let mut missing = spec;
    merge(
        &mut missing,
        json!({"endpointRef": {"name": "nope", "namespace": ep_ns}}),
    );
    env.create_listener(&listener_ns, "lost", missing).await?;
    env.wait_condition(
        &listener_ns,
        "lost",
        "Accepted",
        "False",
        Some("EndpointNotFound"),
    )
    .await?;
    Ok(())
}

/// One listener's sink failing every delivery (retries, then dead letters)
/// does not slow another listener of the same endpoint: the healthy
/// listener's drain time for 200 webhooks is measured with both sinks
/// healthy, then with the other failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_listener_does_not_slow_a_healthy_one() -> Result<()> {
    let env = Env::new("whl-iso", None).await?;
    let ns = env.ns.clone();
    let healthy_sink = Sink::start().await?;
    healthy_sink.set_default(Reply::slow(200, Duration::from_millis(20)));
    let failing_sink = Sink::start().await?;
    env.create_endpoint(&ns, "gh", json!({})).await?;
    for (name, sink, retry) in [
        ("healthy", &healthy_sink, json!({})),
        (
            "failing",
            &failing_sink,
            json!({"maxAttempts": 3, "backoff": ["1s"]}),
        ),
    ] {
        env.create_listener(
            &ns,
            name,
            json!({
                "endpointRef": {"name": "gh"},
                "sink": {"url": sink.url},
                "concurrency": 4,
                "retry": retry,
            }),
        )
        .await?;
    }
    for name in ["healthy", "failing"] {
        env.wait_condition(&ns, name, "StreamReady", "True", None)
            .await?;
    }
    let _healthy = env.run_listener("healthy", None).await?;
    let _failing = env.run_listener("failing", None).await?;

    let batch = |tag: &str| -> Vec<(String, Option<&'static str>, String)> {
        (0..200)
            .map(|i| (format!("{tag}-{i}"), Some("push"), "{}".to_owned()))
            .collect()
    };
    let drain = |want: usize| {
        let s = healthy_sink.clone();
        async move {
            eventually(Duration::from_secs(60), "healthy drained", || {
                let s = s.clone();
                async move { s.count() >= want }
            })
            .await
        }
    };
    let start = Instant::now();
    env.publish("gh", &batch("calm")).await?;
    drain(200).await?;
    let calm = start.elapsed();

    failing_sink.set_default(Reply::status(500));
    let start = Instant::now();
    env.publish("gh", &batch("storm")).await?;
    drain(400).await?;
    let storm = start.elapsed();
    println!(
        "healthy listener, 200 webhooks: {:.2} s with the other listener healthy, {:.2} s with it failing every delivery",
        calm.as_secs_f64(),
        storm.as_secs_f64()
    );
    assert!(
        storm <= calm * 2 + Duration::from_secs(2),
        "the healthy listener slowed down: {calm:?} then {storm:?}"
    );
    // The failing listener dead-letters on its own subject, counted in its
    // status (3 attempts, 1 s apart).
    eventually(
        Duration::from_secs(60),
        "failing listener's dead letters",
        || async {
            env.listeners(&ns)
                .get("failing")
                .await
                .ok()
                .and_then(|l| l.status?.dead_letters)
                == Some(200)
        },
    )
    .await?;
    assert_eq!(healthy_sink.count(), 400, "healthy got each webhook once");

    // Redriven, the failing listener's dead letters go back to it alone
    // (its due subject), not to every listener of the endpoint.
    failing_sink.set_default(Reply::status(200));
    let nats_env = [("NATS_URL", env.nats.url.as_str())];
    spillway_ok(&["dlq", "redrive", &format!("{ns}/gh"), "--all"], &nats_env).await?;
    eventually(
        Duration::from_secs(60),
        "redriven to the failing listener",
        || async { (0..200).all(|i| failing_sink.delivered_ids().contains(&format!("storm-{i}"))) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        healthy_sink.count(),
        400,
        "the redrive reached the failing listener only"
    );
    Ok(())
}

//! A sink answering 410 Gone reaches the user: the real processor
//! dead-letters and sends one rate-limited `sink_gone` notice over NATS, the
//! operator (in-process, against a real kube-apiserver) sets
//! `SinkAvailable=False/SinkGone` with one Warning Event, and a later
//! successful delivery (`sink_ok`) sets it back to True, also across a
//! NATS restart (the operator's subscription comes back by itself), and
//! also when it is another pod, one that never saw a 410, that delivers
//! first. Ready is not affected.

use std::time::Duration;

use crate::operator_support::{condition, config_of, operator_settings, wait_condition};
use crate::processor_support::{ProcessorProc, Reply, Sink, stream_messages};
use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use spillway_api::WebhookEndpoint;
use spillway_api::names::{EndpointNames, NOTICE_SUBJECTS};
use spillway_api::wire::{self, NoticeKind, SinkNotice};
use spillway_operator::Settings;
use spillway_tests::{ControlPlane, NatsServer, eventually, free_port};

const WAIT: Duration = Duration::from_secs(30);

fn settings(nats: &str, ns: &str) -> Settings {
    Settings {
        nats_request_timeout: Duration::from_secs(1),
        ..operator_settings(nats, ns)
    }
}

/// Wait until `type_` has `status` and `reason`; its message then.
async fn wait_reason(
    api: &Api<WebhookEndpoint>,
    name: &str,
    type_: &str,
    status: &str,
    reason: &str,
) -> Result<String> {
    let ep = wait_condition(api, name, type_, status, Some(reason), WAIT).await?;
    Ok(condition(&ep, type_).map(|c| c.2).unwrap_or_default())
}

/// `(type, reason, note)` of the namespace's Events.
async fn events(client: &Client, ns: &str) -> Result<Vec<(String, String, String)>> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect())
}

/// Whether the connection named `name` holds a subscription to `subject`
/// (from the server's monitoring port).
async fn subscribed(monitor: std::net::SocketAddr, name: &str, subject: &str) -> bool {
    // HTTP/1.0: a plain body, not chunked.
    async fn get(addr: std::net::SocketAddr) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /connz?subs=1 HTTP/1.0\r\nHost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await??;
        Ok(out
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default())
    }
    let Ok(body) = get(monitor).await else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
        return false;
    };
    v["connections"].as_array().is_some_and(|cs| {
        cs.iter().any(|c| {
            c["name"] == name
                && c["subscriptions_list"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|s| s == subject))
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_gone_is_reported_on_the_endpoint_and_clears_on_success() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("sink-gone").await?;
    let client = cp.client().await?;
    let monitor: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut nats = NatsServer::start_with(&format!("http: {monitor:?}")).await?;
    let sink = Sink::start().await?;
    sink.set_default(Reply::status(410));
    let op = spillway_operator::start(settings(&nats.url, &ns), client.clone()).await?;

    // Every notice on the wire, as the operator sees them.
    let nc = nats.client().await?;
    let mut notices_sub = nc.subscribe(NOTICE_SUBJECTS).await?;
    nc.flush().await?;

    let endpoints: Api<WebhookEndpoint> = Api::namespaced(client.clone(), &ns);
    let ep: WebhookEndpoint = serde_json::from_value(json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "gh"},
        "spec": {
            "verification": {"scheme": "none"},
            "processor": {
                // Userinfo and query must not show up anywhere.
                "sink": {"url": sink.url.replace("http://", "http://user:s3cr3t@") + "?token=s3cr3t"},
                "concurrency": 2,
                "timeout": "5s",
                "replicas": {"min": 1, "max": 1},
                "retry": {"maxAttempts": 3, "backoff": ["1s"]},
            },
            // File storage: the streams outlive the NATS restart below.
            "stream": {"maxAge": "1h"},
        },
    }))?;
    endpoints.create(&PostParams::default(), &ep).await?;
    wait_reason(&endpoints, "gh", "StreamReady", "True", "StreamReady").await?;
    // No notice yet: SinkAvailable starts True.
    wait_reason(&endpoints, "gh", "SinkAvailable", "True", "NoGoneReported").await?;

    // Pods "ready" (no kubelet here), so Ready is True before the sink goes.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    deployments
        .patch_status(
            "gh-processor",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"replicas": 1, "readyReplicas": 1, "availableReplicas": 1}}),
            ),
        )
        .await?;
    wait_reason(&endpoints, "gh", "Ready", "True", "Ready").await?;

    // The processor runs as rendered by the operator.
    let cfg = config_of(&deployments.get("gh-processor").await?)?;
    let pod = |name: &'static str| [("POD_NAME", std::ffi::OsStr::new(name))];
    let mut proc = ProcessorProc::spawn_with_env(&cfg, &nats.url, &pod("gh-processor-a"))?;
    proc.wait_ready().await?;

    let names = EndpointNames::new(&ns, "gh");
    let js = nats.jetstream().await?;
    let publish = |id: &'static str| {
        let js = js.clone();
        let subject = names.subject(0);
        async move {
            let mut h = async_nats::HeaderMap::new();
            h.insert(wire::NATS_MSG_ID, id);
            h.insert(wire::DELIVERY_ID, id);
            js.publish_with_headers(subject, h, "{}".into())
                .await?
                .await?;
            anyhow::Ok(())
        }
    };
    for id in ["a", "b", "c"] {
        publish(id).await?;
    }

    // Dead-lettered at once (410 is not retried).
    eventually(WAIT, "three dead letters", || async {
        stream_messages(&js, &names.dead_letter_stream())
            .await
            .is_ok_and(|m| m.len() == 3)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log_text()))?;
    let dl = stream_messages(&js, &names.dead_letter_stream()).await?;
    assert!(
        dl.iter().all(|m| m
            .headers
            .get(wire::DLQ_REASON)
            .is_some_and(|v| v.as_str() == "gone")),
        "dead-letter reason gone"
    );

    // The endpoint says so; Ready is unchanged.
    let message = wait_reason(&endpoints, "gh", "SinkAvailable", "False", "SinkGone")
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", proc.log_text()))?;
    assert!(message.contains("410 Gone"), "{message}");
    assert!(message.contains("spillway dlq redrive"), "{message}");
    assert!(message.contains(&sink.url), "sink shown: {message}");
    assert!(!message.contains("s3cr3t"), "{message}");
    assert_eq!(
        condition(&endpoints.get("gh").await?, "Ready").map(|c| c.0),
        Some("True".into())
    );
    eventually(WAIT, "SinkGone Warning Event", || async {
        events(&client, &ns)
            .await
            .is_ok_and(|ev| ev.iter().any(|(t, r, _)| t == "Warning" && r == "SinkGone"))
    })
    .await?;

    // One rate-limited notice for three 410s, without secrets.
    let first = tokio::time::timeout(Duration::from_secs(5), notices_sub.next())
        .await?
        .context("notice subscription ended")?;
    assert_eq!(first.subject.as_str(), names.notice_subject());
    assert!(!String::from_utf8_lossy(&first.payload).contains("s3cr3t"));
    let first_payload = first.payload.clone();
    let first: SinkNotice = serde_json::from_slice(&first.payload)?;
    assert_eq!(first.kind, NoticeKind::SinkGone);
    assert_eq!(first.status, 410);
    assert_eq!(first.endpoint, format!("{ns}/gh"));
    assert_eq!(first.sink, sink.url);

    assert!(
        tokio::time::timeout(Duration::from_millis(300), notices_sub.next())
            .await
            .is_err(),
        "no second sink_gone within 30 s"
    );

    // NATS restarts; the operator's subscription comes back by itself.
    nats.restart().await?;
    eventually(WAIT, "operator resubscribed to notices", || {
        subscribed(monitor, "spillway-operator", NOTICE_SUBJECTS)
    })
    .await?;
    proc.wait_ready().await?;
    assert_eq!(
        proc.metric(r#"spillway_processor_notices_total{kind="sink_gone"}"#)
            .await?,
        1.0
    );

    // Another pod, which never saw a 410, delivers first: it heard pod a's
    // sink_gone (repeated here as pod a repeats it every 30 s while the
    // 410s go on), so it sends the sink_ok.
    proc.sigterm().await?;
    proc.wait_exit(WAIT).await?;
    let proc_b = ProcessorProc::spawn_with_env(&cfg, &nats.url, &pod("gh-processor-b"))?;
    proc_b.wait_ready().await?;
    eventually(WAIT, "pod b heard pod a's sink_gone", || async {
        let sent = nc
            .publish(names.notice_subject(), first_payload.clone())
            .await
            .is_ok()
            && nc.flush().await.is_ok();
        sent && proc_b.log_text().contains("another pod reported the sink")
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", proc_b.log_text()))?;

    // The sink is back: the next delivery clears the condition.
    sink.set_default(Reply::status(200));
    eventually(WAIT, "webhook d stored", || async {
        publish("d").await.is_ok()
    })
    .await?;
    wait_reason(&endpoints, "gh", "SinkAvailable", "True", "SinkRecovered")
        .await
        .map_err(|e| anyhow::anyhow!("{e}\n{}", proc_b.log_text()))?;
    assert!(sink.delivered_ids().contains("d"));
    eventually(WAIT, "SinkRecovered Event", || async {
        events(&client, &ns).await.is_ok_and(|ev| {
            ev.iter()
                .any(|(t, r, _)| t == "Normal" && r == "SinkRecovered")
        })
    })
    .await?;
    let ev = events(&client, &ns).await?;
    assert_eq!(
        ev.iter().filter(|(_, r, _)| r == "SinkGone").count(),
        1,
        "one Warning for the transition: {ev:?}"
    );
    assert!(ev.iter().all(|(_, _, note)| !note.contains("s3cr3t")));
    assert_eq!(
        proc_b
            .metric_opt(r#"spillway_processor_notices_total{kind="sink_gone"}"#)
            .await?,
        None,
        "pod b never sent sink_gone"
    );
    assert_eq!(
        proc_b
            .metric(r#"spillway_processor_notices_total{kind="sink_ok"}"#)
            .await?,
        1.0
    );

    op.stop().await;
    Ok(())
}

//! OTLP trace export from the real gateway and processor binaries to a
//! collector written here (OTLP/HTTP JSON on 127.0.0.1): the spans arrive
//! with the right names, parents and trace, and the traceparent stored
//! with a webhook and sent to the sink names the exported spans.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use serde_json::Value;
use spillway_api::wire;
use spillway_tests::{NatsServer, eventually};

use crate::gateway_e2e::{FileModeGateway, github_headers, post};
use crate::processor_support::*;

/// One exported span, as the collector got it.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    kind: i64,
    attributes: Value,
}

impl Span {
    /// An attribute's value, as text (OTLP JSON sends integers as strings).
    fn attr(&self, key: &str) -> Option<String> {
        let a = self
            .attributes
            .as_array()?
            .iter()
            .find(|a| a["key"] == key)?;
        let v = &a["value"];
        ["stringValue", "intValue", "boolValue"]
            .iter()
            .find_map(|k| v.get(*k))
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    }
}

/// An OTLP/HTTP JSON receiver: `POST /v1/traces`.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

async fn receive(State(spans): State<Arc<Mutex<Vec<Span>>>>, body: Bytes) -> &'static str {
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return "{}";
    };
    let mut out = spans.lock().unwrap();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_owned();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
                out.push(Span {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId").to_ascii_lowercase(),
                    span_id: text("spanId").to_ascii_lowercase(),
                    parent_span_id: text("parentSpanId").to_ascii_lowercase(),
                    kind: s["kind"].as_i64().unwrap_or_default(),
                    attributes: s["attributes"].clone(),
                });
            }
        }
    }
    "{}"
}

impl Collector {
    async fn start() -> Result<Self> {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(receive))
            .with_state(spans.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            url: format!("http://{addr}"),
            spans,
        })
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.url.clone()),
            // Export within 100 ms, so the test need not stop the process.
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    }

    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Wait until trace `trace_id` has every span named in `names` (with
    /// multiplicity).
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Result<Vec<Span>> {
        eventually(Duration::from_secs(15), "spans exported", || async {
            let got = self.trace(trace_id);
            names.iter().all(|n| {
                got.iter().filter(|s| s.name == *n).count()
                    >= names.iter().filter(|m| *m == n).count()
            })
        })
        .await
        .with_context(|| format!("trace {trace_id} has only {:#?}", self.trace(trace_id)))?;
        Ok(self.trace(trace_id))
    }
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {spans:#?}");
    found[0]
}

/// The `(trace id, parent id)` of a traceparent header value.
fn ids(traceparent: &str) -> (String, String) {
    let p: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(p.len(), 4, "{traceparent}");
    (p[1].to_owned(), p[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_exports_verify_and_publish_spans_and_stores_the_publish_span() -> Result<()> {
    let collector = Collector::start().await?;
    let nats = NatsServer::start().await?;
    let env = collector.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let secret = "otlp secret";
    let gw = FileModeGateway::start_with_env(&nats, secret, "", &env).await?;

    // A provider that traces: the gateway's spans join its trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let provider_span = "00f067aa0ba902b7";
    let body = br#"{"zen":"traced"}"#;
    let mut headers = github_headers(secret, body, "otlp-1");
    headers.push((
        "traceparent".into(),
        format!("00-{trace_id}-{provider_span}-01"),
    ));
    let r = post(gw.addr, "/gh", &headers, body).await?;
    assert_eq!(r.status, 200, "{r:?}");

    let spans = collector
        .wait_for(trace_id, &["webhook", "verify", "publish"])
        .await?;
    let (webhook, verify, publish) = (
        one(&spans, "webhook"),
        one(&spans, "verify"),
        one(&spans, "publish"),
    );
    assert_eq!(webhook.service, "spillway-gateway");
    assert_eq!(
        webhook.parent_span_id, provider_span,
        "child of the provider's span"
    );
    assert_eq!(webhook.kind, 2, "server");
    assert_eq!(
        webhook.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(verify.parent_span_id, webhook.span_id);
    assert_eq!(verify.attr("webhook.scheme").as_deref(), Some("github"));
    assert_eq!(publish.parent_span_id, webhook.span_id);
    assert_eq!(publish.kind, 4, "producer");

    // The stored traceparent is the publish span: the processor's spans
    // become its children.
    let subject = spillway_api::names::EndpointNames::new("local", "gh").subject(0);
    let stored = gw.stream.get_last_raw_message_by_subject(&subject).await?;
    let tp = spillway_tests::stored_webhook(&stored)?
        .0
        .traceparent
        .context("stored traceparent")?;
    assert_eq!(ids(&tp), (trace_id.to_owned(), publish.span_id.clone()));

    // No traceparent: the gateway's span is the root of a new trace, and
    // the stored traceparent names its publish span.
    let body = br#"{"zen":"untraced"}"#;
    let r = post(
        gw.addr,
        "/gh",
        &github_headers(secret, body, "otlp-2"),
        body,
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    let stored = gw.stream.get_last_raw_message_by_subject(&subject).await?;
    let tp = spillway_tests::stored_webhook(&stored)?.0.traceparent;
    let (new_trace, parent) = ids(&tp.context("stored traceparent")?);
    assert_ne!(new_trace, trace_id);
    let spans = collector
        .wait_for(&new_trace, &["webhook", "verify", "publish"])
        .await?;
    assert_eq!(one(&spans, "webhook").parent_span_id, "", "a root span");
    assert_eq!(one(&spans, "publish").span_id, parent);

    // A bad signature: the verify span is an error, the answer 401.
    let mut headers = github_headers("wrong secret", body, "otlp-3");
    let bad_trace = "0af7651916cd43dd8448eb211c80319c";
    headers.push((
        "traceparent".into(),
        format!("00-{bad_trace}-b7ad6b7169203331-01"),
    ));
    let r = post(gw.addr, "/gh", &headers, body).await?;
    assert_eq!(r.status, 401, "{r:?}");
    let spans = collector
        .wait_for(bad_trace, &["webhook", "verify"])
        .await?;
    assert!(spans.iter().all(|s| s.name != "publish"), "{spans:#?}");
    assert_eq!(
        one(&spans, "webhook")
            .attr("http.response.status_code")
            .as_deref(),
        Some("401")
    );

    // Exported spans are not log lines.
    let log = std::fs::read_to_string(&gw.log)?;
    assert!(log.contains("exporting traces over OTLP"), "{log}");
    assert!(!log.contains("spillway::otel"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_exports_pull_deliver_and_ack_spans_in_the_stored_trace() -> Result<()> {
    let collector = Collector::start().await?;
    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(nats.jetstream().await?, Setup::default()).await?;
    let env = collector.env();
    let env: Vec<(&str, &std::ffi::OsStr)> = env
        .iter()
        .map(|(k, v)| (*k, std::ffi::OsStr::new(v.as_str())))
        .collect();
    let p = ProcessorProc::spawn_with_env(&ep.config(&sink.url), &nats.url, &env)?;
    p.wait_ready().await?;

    // Stored as the gateway stores it, with its publish span as parent; the
    // sink fails the first attempt.
    let (trace_id, publish_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    sink.script("evt_1", vec![Reply::status(500)]);
    let mut h = ep.gateway_headers("evt_1", None);
    h.insert(
        wire::TRACEPARENT,
        format!("00-{trace_id}-{publish_span}-01").as_str(),
    );
    ep.js
        .publish_with_headers(ep.subject_for(None), h, "{}".into())
        .await?
        .await?;
    eventually(
        Duration::from_secs(10),
        "delivered on the second attempt",
        || async { sink.attempts("evt_1").len() == 2 && sink.delivered_ids().contains("evt_1") },
    )
    .await?;

    let spans = collector
        .wait_for(
            trace_id,
            &["pull", "pull", "deliver", "deliver", "ack", "ack"],
        )
        .await?;
    for s in &spans {
        assert_eq!(s.service, "spillway-processor");
        assert_eq!(s.parent_span_id, publish_span, "{s:?}");
    }
    let delivers: Vec<&Span> = spans.iter().filter(|s| s.name == "deliver").collect();
    let mut codes: Vec<String> = delivers
        .iter()
        .map(|s| s.attr("http.response.status_code").unwrap_or_default())
        .collect();
    codes.sort();
    assert_eq!(codes, ["200", "500"]);
    assert!(delivers.iter().all(|s| s.kind == 3), "client spans");
    let mut decisions: Vec<String> = spans
        .iter()
        .filter(|s| s.name == "ack")
        .map(|s| s.attr("webhook.decision").unwrap_or_default())
        .collect();
    decisions.sort();
    assert_eq!(decisions, ["delivered", "retry"]);

    // Each attempt's traceparent at the sink names its deliver span.
    for r in sink.attempts("evt_1") {
        let tp = r
            .headers
            .get("traceparent")
            .context("traceparent")?
            .to_str()?;
        let (t, parent) = ids(tp);
        assert_eq!(t, trace_id);
        let d = delivers
            .iter()
            .find(|s| s.span_id == parent)
            .with_context(|| format!("no deliver span {parent}: {delivers:#?}"))?;
        assert_eq!(
            d.attr("http.response.status_code").as_deref(),
            Some(r.status.to_string().as_str())
        );
    }
    Ok(())
}

//! The WebhookEndpoint API against a real kube-apiserver: the CRD installs,
//! the examples round-trip, nonsense is rejected with a useful message, and
//! the doc comments reach `kubectl explain`.

use std::time::Duration;

use anyhow::{Context, Result};
use kube::Api;
use serde_json::{Value, json};
use spillway_api::WebhookEndpoint;
use spillway_tests::{ControlPlane, root, yaml_documents};

fn examples() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(root().join("examples"))
        .expect("examples/ exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The WebhookEndpoints in a multi-document YAML file, as the Rust types
/// read them (with serde defaults applied).
fn endpoints_in(file: &std::path::Path) -> Result<Vec<WebhookEndpoint>> {
    let text = std::fs::read_to_string(file)?;
    let mut out = Vec::new();
    for v in yaml_documents(&text)? {
        if v["kind"] == "WebhookEndpoint" {
            out.push(serde_json::from_value(v)?);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn every_example_applies_and_reads_back_equal() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("examples").await?;
    let client = cp.client().await?;
    let api: Api<WebhookEndpoint> = Api::namespaced(client, &ns);
    let files = examples();
    assert!(files.len() >= 10, "one example per scheme at least");
    let mut schemes = std::collections::BTreeSet::new();
    for file in &files {
        let path = file.to_str().expect("utf-8 path");
        cp.kubectl_output(&["apply", "-n", &ns, "-f", path])
            .await
            .with_context(|| format!("applying {path}"))?;
        let local = endpoints_in(file)?;
        assert!(!local.is_empty(), "{path} has a WebhookEndpoint");
        for want in local {
            let name = want.metadata.name.clone().expect("named");
            let got = api.get(&name).await?;
            // The API server's schema defaults and the Rust defaults agree.
            assert_eq!(got.spec, want.spec, "{path}: {name} reads back different");
            schemes.insert(want.spec.verification.scheme.as_str());
        }
    }
    for s in [
        "github",
        "stripe",
        "slack",
        "standardWebhooks",
        "shopify",
        "gitlab",
        "twilio",
        "twitch",
        "hmac",
        "none",
    ] {
        assert!(schemes.contains(s), "no example for scheme {s}");
    }
    // Printer columns.
    let table = cp.kubectl_output(&["get", "whe", "-n", &ns]).await?;
    let header = table.lines().next().unwrap_or_default();
    for col in ["PATH", "SCHEME", "READY", "BACKLOG", "AGE"] {
        assert!(header.contains(col), "column {col} missing in {header:?}");
    }
    Ok(())
}

fn base() -> Value {
    json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "invalid"},
        "spec": {
            "verification": {"scheme": "github", "secretRefs": [{"name": "s", "key": "k"}]},
            "processor": {"sink": {"url": "http://sink:8080/"}}
        }
    })
}

/// Set `value` at a `/`-separated path under `.spec`, creating objects.
fn set(doc: &mut Value, path: &str, value: Value) {
    let mut cur = &mut doc["spec"];
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts[..parts.len() - 1] {
        if cur.get(*p).is_none() {
            cur[*p] = json!({});
        }
        cur = &mut cur[*p];
    }
    let last = parts[parts.len() - 1];
    if value.is_null() {
        cur.as_object_mut().expect("object").remove(last);
    } else {
        cur[last] = value;
    }
}

/// What is wrong, the edits making it so, and the message expected.
type Case = (&'static str, Vec<(&'static str, Value)>, &'static str);

#[tokio::test]
async fn nonsense_is_rejected_with_a_clear_message() -> Result<()> {
    let cp = ControlPlane::shared().await;
    let ns = cp.namespace("invalid").await?;
    let cases: Vec<Case> = vec![
        (
            "signed scheme without secrets",
            vec![("verification/secretRefs", Value::Null)],
            "secretRefs needs at least one Secret reference unless scheme is none",
        ),
        (
            "scheme none with secrets",
            vec![("verification/scheme", json!("none"))],
            "scheme none takes no secretRefs",
        ),
        (
            "hmac without settings",
            vec![("verification/scheme", json!("hmac"))],
            "hmac settings are required when scheme is hmac",
        ),
        (
            "hmac timestamp checked but not signed",
            vec![
                ("verification/scheme", json!("hmac")),
                (
                    "verification/hmac",
                    json!({"header": "X-Sig", "timestampHeader": "X-Ts"}),
                ),
            ],
            "hmac.timestampHeader and a {timestamp} placeholder in hmac.signedContent go together",
        ),
        (
            "hmac {timestamp} signed without its header",
            vec![
                ("verification/scheme", json!("hmac")),
                (
                    "verification/hmac",
                    json!({"header": "X-Sig", "signedContent": "{timestamp}.{body}"}),
                ),
            ],
            "hmac.timestampHeader and a {timestamp} placeholder in hmac.signedContent go together",
        ),
        (
            "twitch without its handshake",
            vec![("verification/scheme", json!("twitch"))],
            "scheme twitch needs handshake type twitchCallbackVerification",
        ),
        (
            "twitch with another handshake",
            vec![
                ("verification/scheme", json!("twitch")),
                ("handshake", json!({"type": "slackUrlVerification"})),
            ],
            "scheme twitch needs handshake type twitchCallbackVerification",
        ),
        (
            "a Secret name that cannot exist",
            vec![(
                "verification/secretRefs",
                json!([{"name": "a=b", "key": "secret"}]),
            )],
            "spec.verification.secretRefs[0].name in body should match",
        ),
        (
            "a Secret key that cannot exist",
            vec![(
                "verification/secretRefs",
                json!([{"name": "gh", "key": "a/b"}]),
            )],
            "spec.verification.secretRefs[0].key in body should match",
        ),
        (
            "unknown scheme",
            vec![("verification/scheme", json!("paypal"))],
            "Unsupported value: \"paypal\"",
        ),
        (
            "two sink forms",
            vec![("processor/sink/service", json!({"name": "svc", "port": 80}))],
            "sink needs exactly one of url or service",
        ),
        (
            "no sink",
            vec![("processor/sink/url", Value::Null)],
            "sink needs exactly one of url or service",
        ),
        (
            "min above max",
            vec![("processor/replicas", json!({"min": 3, "max": 2}))],
            "processor.replicas.min must not exceed processor.replicas.max",
        ),
        (
            "zero concurrency",
            vec![("processor/concurrency", json!(0))],
            "spec.processor.concurrency: Invalid value: 0: spec.processor.concurrency in body should be greater than or equal to 1",
        ),
        (
            "duration without unit",
            vec![("processor/timeout", json!("30"))],
            "spec.processor.timeout in body should match",
        ),
        (
            // Past Go's time.Duration: spillway_api::duration::parse refuses
            // it, so the API server must too (a stored endpoint always
            // deserializes into the typed GoDuration).
            "duration beyond Go's range",
            vec![("stream/maxAge", json!("99999999999999999999h"))],
            "type conversion error from 'string' to 'google.protobuf.Duration' evaluating rule: stream.maxAge must be at least 1m",
        ),
        (
            "timeout too long",
            vec![("processor/timeout", json!("1h"))],
            "processor.timeout must be between 1s and 15m",
        ),
        (
            "more backoff steps than attempts",
            vec![(
                "processor/retry",
                json!({"maxAttempts": 2, "backoff": ["1s", "2s", "3s"]}),
            )],
            "retry.backoff may list at most maxAttempts durations",
        ),
        (
            "backoff step too short",
            vec![("processor/retry", json!({"backoff": ["10ms"]}))],
            "each retry.backoff duration must be between 100ms and 24h",
        ),
        (
            "dedup window beyond retention",
            vec![
                ("deduplication/window", json!("48h")),
                ("stream/maxAge", json!("24h")),
            ],
            "deduplication.window must not be longer than stream.maxAge",
        ),
        (
            "path without slash",
            vec![("path", json!("github"))],
            "spec.path in body should match",
        ),
        (
            "odd response status",
            vec![("ingress/responseStatus", json!(201))],
            "Unsupported value: 201",
        ),
        (
            "body limit beyond 8 MiB",
            vec![("ingress/maxBodyBytes", json!(9_000_000))],
            "should be less than or equal to 8388608",
        ),
        (
            "both ordering keys",
            vec![(
                "ordering",
                json!({"keyHeader": "X-Key", "keyJsonPointer": "/id"}),
            )],
            "ordering needs exactly one of keyHeader or keyJsonPointer",
        ),
        (
            "header dedup without header",
            vec![("deduplication/source", json!("header"))],
            "deduplication.header is required when source is header",
        ),
        (
            "burst below rate",
            vec![(
                "ingress/rateLimit",
                json!({"requestsPerSecond": 10, "burst": 5}),
            )],
            "rateLimit.burst must be at least requestsPerSecond",
        ),
        (
            "meta handshake without verify token",
            vec![("handshake", json!({"type": "metaHubChallenge"}))],
            "handshake type metaHubChallenge needs verifyTokenSecretRef",
        ),
        (
            "too many stream replicas",
            vec![("stream/replicas", json!(7))],
            "should be less than or equal to 5",
        ),
        (
            "unknown storage",
            vec![("stream/storage", json!("disk"))],
            "Unsupported value: \"disk\"",
        ),
    ];
    let mut failures = Vec::new();
    for (what, edits, want) in &cases {
        let mut doc = base();
        for (path, value) in edits {
            set(&mut doc, path, value.clone());
        }
        let res = cp
            .kubectl_stdin(
                &["create", "--dry-run=server", "-n", &ns, "-f", "-"],
                &doc.to_string(),
            )
            .await;
        match res {
            Ok(out) => failures.push(format!("{what}: accepted ({})", out.trim())),
            Err(e) if e.to_string().contains(want) => {}
            Err(e) => failures.push(format!("{what}: rejected, but without {want:?}: {e}")),
        }
    }
    // The unchanged base is valid, so every rejection above is the edit's.
    cp.kubectl_stdin(
        &["create", "--dry-run=server", "-n", &ns, "-f", "-"],
        &base().to_string(),
    )
    .await
    .context("the base manifest must be valid")?;
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn kubectl_explain_shows_the_doc_comments() -> Result<()> {
    let cp = ControlPlane::shared().await;
    // kubectl reads the OpenAPI document, published a moment after the CRD
    // is Established.
    let out = std::sync::Mutex::new(String::new());
    spillway_tests::eventually(Duration::from_secs(30), "the CRD's OpenAPI", || async {
        let r = cp
            .kubectl_output(&["explain", "webhookendpoint.spec.processor.concurrency"])
            .await;
        let ok = r.is_ok();
        *out.lock().unwrap() = r.unwrap_or_default();
        ok
    })
    .await?;
    let out = out.into_inner().unwrap();
    assert!(
        out.contains("Hard cap on deliveries in flight to the sink, across all"),
        "{out}"
    );
    let out = cp
        .kubectl_output(&["explain", "whe.spec.verification.secretRefs"])
        .await?;
    assert!(out.contains("rotated"), "{out}");
    Ok(())
}

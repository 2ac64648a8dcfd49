//! The Argo CD health check documented in charts/spillway/README.md, run in
//! Lua 5.1 (the dialect of Argo CD's gopher-lua) against WebhookEndpoints
//! built from the API's own Rust types, as Argo CD would see them.

use anyhow::{Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use mlua::{Lua, LuaSerdeExt, Table};
use serde_json::{Value, json};
use spillway_api::WebhookEndpointStatus;
use spillway_tests::root;

/// The Lua script, taken from the README (the copy users paste).
fn script() -> Result<String> {
    let readme = std::fs::read_to_string(root().join("charts/spillway/README.md"))?;
    let start = readme
        .find("<!-- argocd-health:start -->")
        .context("argocd-health:start marker")?;
    let end = readme
        .find("<!-- argocd-health:end -->")
        .context("argocd-health:end marker")?;
    let block = &readme[start..end];
    let yaml = block
        .split("```yaml")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .context("a yaml code block between the markers")?;
    let cm: Value = serde_saphyr::from_str(yaml)?;
    Ok(
        cm["data"]["resource.customizations.health.spillway.dev_WebhookEndpoint"]
            .as_str()
            .context("the health key for spillway.dev/WebhookEndpoint")?
            .to_owned(),
    )
}

fn cond(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(Timestamp::UNIX_EPOCH),
        observed_generation: Some(2),
    }
}

fn endpoint(generation: i64, status: Option<WebhookEndpointStatus>) -> Value {
    let mut obj = json!({
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "WebhookEndpoint",
        "metadata": {"name": "gh", "namespace": "team", "generation": generation},
        "spec": {"verification": {"scheme": "none"}, "processor": {"sink": {"url": "http://x/"}}},
    });
    if let Some(s) = status {
        obj["status"] = serde_json::to_value(s).expect("status serializes");
    }
    obj
}

fn status(conditions: Vec<Condition>) -> WebhookEndpointStatus {
    WebhookEndpointStatus {
        observed_generation: Some(2),
        conditions,
        ..Default::default()
    }
}

/// (status, message) the health check returns for `obj`.
fn health(lua: &Lua, script: &str, obj: &Value) -> Result<(String, String)> {
    lua.globals().set("obj", lua.to_value(obj)?)?;
    let hs: Table = lua.load(script).eval()?;
    Ok((hs.get("status")?, hs.get("message")?))
}

#[test]
fn argocd_health_follows_the_conditions() -> Result<()> {
    let script = script()?;
    let lua = Lua::new();
    let accepted = || cond("Accepted", "True", "Accepted", "ok");
    let stream = || cond("StreamReady", "True", "StreamReady", "ok");
    let processor = || cond("ProcessorReady", "True", "Available", "1/1 ready");

    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "no status yet",
            endpoint(1, None),
            "Progressing",
            "operator",
        ),
        (
            "status of an older generation",
            endpoint(3, Some(status(vec![cond("Ready", "True", "Ready", "ok")]))),
            "Progressing",
            "generation 3",
        ),
        (
            "ready",
            endpoint(
                2,
                Some(status(vec![
                    cond("Ready", "True", "Ready", "all good"),
                    accepted(),
                    stream(),
                    processor(),
                ])),
            ),
            "Healthy",
            "all good",
        ),
        (
            "refused: missing Secret",
            endpoint(
                2,
                Some(status(vec![
                    cond("Ready", "False", "NotAccepted", "x"),
                    cond(
                        "Accepted",
                        "False",
                        "SecretNotFound",
                        "Secret team/gh does not exist",
                    ),
                    cond("StreamReady", "Unknown", "NotAccepted", "waiting"),
                ])),
            ),
            "Degraded",
            "Accepted: SecretNotFound: Secret team/gh does not exist",
        ),
        (
            "NATS down",
            endpoint(
                2,
                Some(status(vec![
                    cond("Ready", "False", "StreamNotReady", "x"),
                    accepted(),
                    cond("StreamReady", "False", "NatsUnavailable", "no NATS"),
                ])),
            ),
            "Degraded",
            "StreamReady: NatsUnavailable",
        ),
        (
            "processor starting",
            endpoint(
                2,
                Some(status(vec![
                    cond(
                        "Ready",
                        "False",
                        "ProcessorNotReady",
                        "0/1 processor replicas ready",
                    ),
                    accepted(),
                    stream(),
                    cond(
                        "ProcessorReady",
                        "False",
                        "PodsNotReady",
                        "0/1 processor replicas ready",
                    ),
                ])),
            ),
            "Progressing",
            "0/1 processor replicas ready",
        ),
        (
            "suspended",
            endpoint(
                2,
                Some(status(vec![
                    cond(
                        "Ready",
                        "True",
                        "Suspended",
                        "suspended: the gateway answers 503",
                    ),
                    accepted(),
                    stream(),
                    processor(),
                ])),
            ),
            "Suspended",
            "suspended",
        ),
    ];
    for (what, obj, want_status, want_message) in cases {
        let (s, m) = health(&lua, &script, &obj).with_context(|| what.to_owned())?;
        assert_eq!(s, want_status, "{what}: {m}");
        assert!(
            m.contains(want_message),
            "{what}: message {m:?} lacks {want_message:?}"
        );
    }
    Ok(())
}

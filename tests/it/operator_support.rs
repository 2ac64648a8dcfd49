//! Helpers for the tests that run the operator in-process: its settings,
//! and reading what it wrote (conditions, the rendered processor config).
//!
//! A module of the one integration-test program (`tests/it/main.rs`), so
//! `tests/src/lib.rs` stays the harness's own and needs no dependency on
//! the operator.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use spillway_api::WebhookEndpoint;
use spillway_api::wire::{PROCESSOR_CONFIG_ENV, ProcessorConfig};
use spillway_operator::Settings;

/// Settings of an in-process operator: NATS at `nats`, only namespace `ns`
/// watched, the admin server on a free port, no leader election, a resync
/// every 2 s, processors rendered with the image `spillway-processor:test`.
/// Change more with struct update syntax (`Settings { .., ..this }`).
pub fn operator_settings(nats: &str, ns: &str) -> Settings {
    Settings::parse_from([
        "spillway-operator",
        "--nats-url",
        nats,
        "--admin-addr",
        "127.0.0.1:0",
        "--watch-namespace",
        ns,
        "--leader-elect",
        "false",
        "--resync-interval",
        "2s",
        // The switch to stored format 2 at once (one test sets its own).
        "--stored-format-settle",
        "0s",
        "--processor-image",
        "spillway-processor:test",
    ])
}

/// `(status, reason, message)` of the condition `type_` of `ep`.
pub fn condition(ep: &WebhookEndpoint, type_: &str) -> Option<(String, String, String)> {
    ep.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Wait up to `wait` until the endpoint `name` has the condition `cond`
/// with `status` (and `reason`, when given); the endpoint as it was then.
pub async fn wait_condition(
    api: &Api<WebhookEndpoint>,
    name: &str,
    cond: &str,
    status: &str,
    reason: Option<&str>,
    wait: Duration,
) -> Result<WebhookEndpoint> {
    let start = Instant::now();
    loop {
        let ep = api.get(name).await.ok();
        if let Some(ep) = &ep
            && condition(ep, cond)
                .is_some_and(|(s, r, _)| s == status && reason.is_none_or(|want| r == want))
        {
            return Ok(ep.clone());
        }
        if start.elapsed() > wait {
            bail!(
                "timed out waiting for {name}: {cond}={status} ({reason:?}); last status: {}",
                serde_json::to_string(&ep.and_then(|e| e.status)).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The processor config the operator rendered into a Deployment.
pub fn config_of(d: &Deployment) -> Result<ProcessorConfig> {
    let pod = d.spec.template.spec.as_ref().context("pod spec")?;
    let env = pod.containers[0].env.as_ref().context("env")?;
    let v = env
        .iter()
        .find(|e| e.name == PROCESSOR_CONFIG_ENV)
        .and_then(|e| e.value.clone())
        .context("config env")?;
    Ok(serde_json::from_str(&v)?)
}

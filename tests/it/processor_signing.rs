//! Outbound Standard Webhooks signatures, checked by an independent verifier
//! written from the specification (RustCrypto HMAC, not the processor's
//! ring); and the context headers a sink gets.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::processor_support::*;
use anyhow::{Result, bail};
use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use spillway_api::wire;
use spillway_tests::{NatsServer, eventually};

/// Standard Webhooks verification: secret `whsec_<base64>`; signed content
/// `{webhook-id}.{webhook-timestamp}.{body}`; `webhook-signature` is a
/// space-separated list of `v1,<base64 HMAC-SHA256>`; timestamp within
/// `tolerance` of now.
pub(crate) fn verify(
    secret: &str,
    headers: &HeaderMap,
    body: &[u8],
    tolerance: Duration,
) -> Result<()> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_").unwrap_or(secret))?;
    let get = |n: &str| -> Result<String> {
        Ok(headers
            .get(n)
            .ok_or_else(|| anyhow::anyhow!("missing {n}"))?
            .to_str()?
            .to_owned())
    };
    let (id, ts, sigs) = (
        get("webhook-id")?,
        get("webhook-timestamp")?,
        get("webhook-signature")?,
    );
    let t: u64 = ts.parse()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    if now.abs_diff(t) > tolerance.as_secs() {
        bail!("timestamp {t} too far from now {now}");
    }
    for sig in sigs.split(' ') {
        let Some(b64) = sig.strip_prefix("v1,") else {
            continue;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key)?;
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        if mac.verify_slice(&STANDARD.decode(b64)?).is_ok() {
            return Ok(());
        }
    }
    bail!("no valid v1 signature")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_and_carry_context_headers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let secret = format!(
        "whsec_{}",
        STANDARD.encode(b"spillway outbound signing key 32b")
    );
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, format!("{secret}\n"))?;

    let nats = NatsServer::start().await?;
    let sink = Sink::start().await?;
    let ep = Endpoint::create(
        nats.jetstream().await?,
        Setup {
            signing_secret_file: Some(secret_file.display().to_string()),
            ..Setup::default()
        },
    )
    .await?;
    let _p = ProcessorProc::start(&ep.config(&sink.url), &nats.url).await?;

    // Published like the gateway, with a trace context.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut h = ep.gateway_headers("evt_1", None);
    h.insert(wire::TRACEPARENT, tp);
    let body = r#"{"type":"invoice.paid","amount":1200}"#;
    ep.js
        .publish_with_headers(ep.subject_for(None), h, body.into())
        .await?
        .await?;
    eventually(Duration::from_secs(10), "delivered", || async {
        sink.delivered_ids().contains("evt_1")
    })
    .await?;
    let r = &sink.attempts("evt_1")[0];
    verify(&secret, &r.headers, &r.body, Duration::from_secs(300))?;
    assert_eq!(r.headers.get("webhook-id").unwrap(), "evt_1");

    // The verifier does reject what it should.
    assert!(verify(&secret, &r.headers, b"tampered", Duration::from_secs(300)).is_err());
    let other = format!("whsec_{}", STANDARD.encode(b"some other key"));
    assert!(verify(&other, &r.headers, &r.body, Duration::from_secs(300)).is_err());

    // Original body, content type and headers; delivery id, attempt; the
    // trace continues with a new span.
    assert_eq!(r.body.as_ref(), body.as_bytes());
    assert_eq!(r.headers.get("content-type").unwrap(), "application/json");
    assert_eq!(r.headers.get("x-test-event").unwrap(), "ping");
    assert_eq!(r.headers.get("spillway-delivery-id").unwrap(), "evt_1");
    assert_eq!(r.headers.get("spillway-attempt").unwrap(), "1");
    let out_tp = r.headers.get("traceparent").unwrap().to_str()?;
    assert!(
        out_tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{out_tp}"
    );
    assert_ne!(out_tp, tp, "a new span id");
    assert!(r.headers.get("nats-msg-id").is_none());
    Ok(())
}

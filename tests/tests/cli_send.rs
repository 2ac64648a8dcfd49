//! `spillway send` signs like the providers: checked by verifiers written
//! here from each provider's documentation (RustCrypto, not the CLI's ring).

#[path = "../src/processor_support.rs"]
mod processor_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use processor_support::*;
use sha2::Sha256;
use spillway_tests::eventually;

fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn send(scheme: &str, secret: &str, body: &str) -> Result<Received> {
    let gw = Sink::start().await?;
    let base = gw.url.trim_end_matches("/hook").to_owned();
    let dir = tempfile::tempdir()?;
    let (sf, bf) = (dir.path().join("secret"), dir.path().join("body"));
    std::fs::write(&sf, secret)?;
    std::fs::write(&bf, body)?;
    let (sf, bf) = (sf.display().to_string(), bf.display().to_string());
    let out = spillway_ok(
        &[
            "send",
            "ns/hooks",
            "--scheme",
            scheme,
            "--secret-from",
            &sf,
            "--gateway",
            &base,
            "--path",
            "/in/hooks",
            "--id",
            "msg_1",
            &bf,
        ],
        &[],
    )
    .await?;
    assert!(out.stdout.contains("-> 200"), "{}", out.stdout);
    eventually(Duration::from_secs(5), "received", || async {
        gw.count() == 1
    })
    .await?;
    let r = gw.received().remove(0);
    assert_eq!(r.body.as_ref(), body.as_bytes());
    Ok(r)
}

fn h(r: &Received, name: &str) -> String {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("missing {name}"))
        .to_str()
        .unwrap()
        .to_owned()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_webhooks() -> Result<()> {
    let key = b"0123456789abcdef0123456789abcdef";
    let secret = format!("whsec_{}", STANDARD.encode(key));
    let r = send("standardWebhooks", &secret, r#"{"type":"user.created"}"#).await?;
    let (id, ts) = (h(&r, "webhook-id"), h(&r, "webhook-timestamp"));
    assert_eq!(id, "msg_1");
    assert!((ts.parse::<i64>()? - now()).abs() < 60);
    let want = STANDARD.encode(hmac256(key, &[format!("{id}.{ts}.").as_bytes(), &r.body]));
    assert!(
        h(&r, "webhook-signature")
            .split(' ')
            .any(|s| s == format!("v1,{want}"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_and_slack() -> Result<()> {
    let r = send("stripe", "whsec_stripe_test\n", r#"{"id":"evt_1"}"#).await?;
    let sig = h(&r, "stripe-signature");
    let t = sig
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .unwrap()
        .to_owned();
    let v1 = sig.split(',').find_map(|p| p.strip_prefix("v1=")).unwrap();
    // The trailing newline of the secret file is not part of the secret.
    assert_eq!(
        v1,
        hex(&hmac256(
            b"whsec_stripe_test",
            &[t.as_bytes(), b".", &r.body]
        ))
    );

    let r = send("slack", "slack-signing-secret", "token=x&text=hi").await?;
    let ts = h(&r, "x-slack-request-timestamp");
    let want = hex(&hmac256(
        b"slack-signing-secret",
        &[b"v0:", ts.as_bytes(), b":", &r.body],
    ));
    assert_eq!(h(&r, "x-slack-signature"), format!("v0={want}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rejections_fail_the_command() -> Result<()> {
    let gw = Sink::start().await?;
    gw.set_default(Reply::status(401));
    let base = gw.url.trim_end_matches("/hook").to_owned();
    let dir = tempfile::tempdir()?;
    let bf = dir.path().join("body");
    std::fs::write(&bf, "{}")?;
    let out = spillway(
        &[
            "send",
            "ns/hooks",
            "--scheme",
            "none",
            "--gateway",
            &base,
            "--path",
            "/x",
            &bf.display().to_string(),
        ],
        &[],
    )
    .await?;
    assert!(!out.success);
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    let no_secret = spillway(
        &[
            "send",
            "ns/hooks",
            "--scheme",
            "github",
            "--gateway",
            &base,
            "--path",
            "/x",
            "-",
        ],
        &[],
    )
    .await?;
    assert!(
        !no_secret.success && no_secret.stderr.contains("--secret-from"),
        "{}",
        no_secret.stderr
    );
    Ok(())
}

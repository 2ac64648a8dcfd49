//! `spillway send` signs like the providers: checked by verifiers written
//! here from each provider's documentation (RustCrypto, not the CLI's ring).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::processor_support::*;
use anyhow::Result;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
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

/// Twitch EventSub: `sha256=` + hex HMAC-SHA256(secret, message id +
/// timestamp + raw body), the timestamp RFC 3339.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twitch() -> Result<()> {
    let secret = "twitch-eventsub-secret";
    let r = send(
        "twitch",
        &format!("{secret}\n"),
        r#"{"event":{"user_id":"1337"}}"#,
    )
    .await?;
    let (id, ts) = (
        h(&r, "twitch-eventsub-message-id"),
        h(&r, "twitch-eventsub-message-timestamp"),
    );
    assert_eq!(id, "msg_1");
    let at: jiff::Timestamp = ts.parse()?;
    assert!((at.as_second() - now()).abs() < 60, "{ts}");
    let want = hex(&hmac256(
        secret.as_bytes(),
        &[id.as_bytes(), ts.as_bytes(), &r.body],
    ));
    assert_eq!(
        h(&r, "twitch-eventsub-message-signature"),
        format!("sha256={want}")
    );
    assert_eq!(h(&r, "twitch-eventsub-message-type"), "notification");
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

/// `spillway send --scheme twilio` through the real gateway (in-process,
/// file source, real nats-server): a JSON body goes out with a signed
/// `bodySHA256` in the URL, which the gateway requires for a non-form body;
/// a form body is signed through its sorted parameters. Both are stored
/// byte for byte; a wrong auth token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_json_and_form_are_accepted_and_stored_by_the_gateway() -> Result<()> {
    // No publicUrl: the gateway signs its public base URL plus the path,
    // which is where the CLI posts.
    let (_nats, dir, gw, base, mut stream) = file_gateway(
        "twilio",
        "  path: /in/twilio\n  verification: {scheme: twilio, secretRefs: [{name: keys, key: twilio}]}\n",
        "twilio",
        "twilio-auth\n",
    )
    .await?;

    let send = |secret: &'static str, content_type: &'static str, body: &'static str| {
        let (dir, base) = (dir.path().to_owned(), base.clone());
        async move {
            let (sf, bf) = (dir.join("secret"), dir.join("body"));
            std::fs::write(&sf, secret)?;
            std::fs::write(&bf, body)?;
            let (sf, bf) = (sf.display().to_string(), bf.display().to_string());
            spillway(
                &[
                    "send",
                    "local/twilio",
                    "--scheme",
                    "twilio",
                    "--secret-from",
                    &sf,
                    "--gateway",
                    &base,
                    "--path",
                    "/in/twilio",
                    "--content-type",
                    content_type,
                    &bf,
                ],
                &[],
            )
            .await
        }
    };
    let json = r#"{"CallSid":"CA1","CallStatus":"completed"}"#;
    let out = send("twilio-auth\n", "application/json", json).await?;
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    let digest = hex(&<Sha256 as sha2::Digest>::digest(json.as_bytes()));
    assert!(
        out.stdout.contains(&format!(
            "POST {base}/in/twilio?bodySHA256={digest} (twilio signed) -> 200"
        )),
        "{}",
        out.stdout
    );
    let form = "To=%2B18005551212&From=%2B14158675309&Body=hi";
    let out = send("twilio-auth", "application/x-www-form-urlencoded", form).await?;
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("POST {base}/in/twilio (twilio signed) -> 200")),
        "{}",
        out.stdout
    );

    let wrong = send("another-token", "application/json", json).await?;
    assert!(!wrong.success, "{}", wrong.stdout);
    assert!(wrong.stdout.contains("-> 401"), "{}", wrong.stdout);

    let state = stream.info().await?.state.clone();
    assert_eq!(state.messages, 2, "exactly the two accepted webhooks");
    let mut stored = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await?;
        stored.push(spillway_tests::stored_webhook(&m)?.1);
    }
    assert_eq!(
        stored,
        [json.as_bytes(), form.as_bytes()],
        "raw bodies stored"
    );
    gw.shutdown().await;
    Ok(())
}

/// An in-process gateway (file source, real nats-server) serving one
/// endpoint `local/<name>` whose `spec` lines (indented two spaces, without
/// the processor) set `path: /in/<name>`; the Secret `keys` holds `secret`
/// under `key`. Returns once the path is routed, with what must stay alive,
/// the gateway's base URL and the endpoint's stream.
async fn file_gateway(
    name: &str,
    spec: &str,
    key: &str,
    secret: &str,
) -> Result<(
    spillway_tests::NatsServer,
    tempfile::TempDir,
    spillway_gateway::run::Running,
    String,
    async_nats::jetstream::stream::Stream,
)> {
    use spillway_api::names::EndpointNames;
    use spillway_gateway::config::{Config, SourceKind};

    let nats = spillway_tests::NatsServer::start().await?;
    let names = EndpointNames::new("local", name);
    let stream = nats
        .jetstream()
        .await?
        .create_stream(async_nats::jetstream::stream::Config {
            name: names.stream(),
            subjects: vec![names.stream_subjects()],
            ..Default::default()
        })
        .await?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("secrets/keys"))?;
    std::fs::write(dir.path().join("secrets/keys").join(key), secret)?;
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        format!(
            "apiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: {name}, namespace: local}}\nspec:\n{spec}  processor: {{sink: {{url: \"http://sink.invalid/hook\"}}}}\n"
        ),
    )?;
    let port = spillway_tests::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let gw = spillway_gateway::run::start(
        &Config {
            listen: ([127, 0, 0, 1], port).into(),
            admin_listen: "127.0.0.1:0".parse()?,
            nats_url: nats.url.clone(),
            source: SourceKind::File,
            endpoints_file: Some(endpoints),
            secrets_dir: Some(dir.path().join("secrets")),
            public_base_url: Some(base.clone()),
            publish_timeout: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            ..Config::default()
        },
        None,
    )
    .await?;
    let gateway = gw.gateway.clone();
    let path = format!("/in/{name}");
    // Routed and ready: the NATS connection is made in the background
    // (retry on initial connect), and a webhook before it gets a 503.
    eventually(
        Duration::from_secs(15),
        "endpoint routed, gateway ready",
        || {
            let ok = gateway.ready()
                && gateway
                    .router
                    .table()
                    .get(&path)
                    .is_some_and(|r| r.verifier.is_ok());
            async move { ok }
        },
    )
    .await?;
    Ok((nats, dir, gw, base, stream))
}

/// `spillway send --scheme twitch` through the real gateway: a notification
/// is verified and stored, the signed webhook_callback_verification (message
/// type set with -H) gets its challenge echoed and is not stored, and a
/// wrong secret is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twitch_notification_and_handshake_through_the_gateway() -> Result<()> {
    let (_nats, dir, gw, base, mut stream) = file_gateway(
        "twitch",
        "  path: /in/twitch\n  verification: {scheme: twitch, secretRefs: [{name: keys, key: twitch}]}\n  handshake: {type: twitchCallbackVerification}\n",
        "twitch",
        "twitch-eventsub-secret\n",
    )
    .await?;
    let send = |secret: &'static str, body: &'static str, extra: &'static [&'static str]| {
        let (dir, base) = (dir.path().to_owned(), base.clone());
        async move {
            let (sf, bf) = (dir.join("secret"), dir.join("body"));
            std::fs::write(&sf, secret)?;
            std::fs::write(&bf, body)?;
            let (sf, bf) = (sf.display().to_string(), bf.display().to_string());
            let mut args = vec![
                "send",
                "local/twitch",
                "--scheme",
                "twitch",
                "--secret-from",
                &sf,
                "--gateway",
                &base,
                "--path",
                "/in/twitch",
            ];
            args.extend_from_slice(extra);
            args.push(&bf);
            spillway(&args, &[]).await
        }
    };
    let notification = r#"{"subscription":{"type":"channel.follow"},"event":{"user_id":"1337"}}"#;
    let out = send("twitch-eventsub-secret", notification, &[]).await?;
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("POST {base}/in/twitch (twitch signed) -> 200")),
        "{}",
        out.stdout
    );

    let challenge =
        r#"{"challenge":"cli-twitch-challenge","subscription":{"type":"channel.follow"}}"#;
    let verification: &[&str] = &[
        "-H",
        "Twitch-Eventsub-Message-Type: webhook_callback_verification",
    ];
    let out = send("twitch-eventsub-secret", challenge, verification).await?;
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.lines().any(|l| l == "cli-twitch-challenge"),
        "the challenge is echoed: {}",
        out.stdout
    );

    for body in [notification, challenge] {
        let wrong = send("not-the-eventsub-secret", body, verification).await?;
        assert!(!wrong.success, "{}", wrong.stdout);
        assert!(wrong.stdout.contains("-> 401"), "{}", wrong.stdout);
        assert!(!wrong.stdout.contains("cli-twitch-challenge"));
    }

    let state = stream.info().await?.state.clone();
    assert_eq!(state.messages, 1, "only the notification is stored");
    let stored = stream.get_raw_message(state.last_sequence).await?;
    let (_, body) = spillway_tests::stored_webhook(&stored)?;
    assert_eq!(body, notification.as_bytes());
    gw.shutdown().await;
    Ok(())
}

//! The ingress gateway against a real nats-server and a real kube-apiserver:
//! endpoints and Secrets are applied with kubectl, the gateway (in-process,
//! on 127.0.0.1:0) picks them up through its reflectors, and what it stores
//! is read back from JetStream.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use spillway_api::names::{EndpointNames, partition_of};
use spillway_api::stored::{self, Format};
use spillway_api::wire;
use spillway_gateway::config::{Config, SourceKind};
use spillway_gateway::run::{Running, start};
use spillway_gateway::verify::sign;
use spillway_tests::{ControlPlane, KillOnDrop, NatsServer, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ------------------------------------------------------------------ helpers

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hmac256(secret: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    sign(ring_alg::SHA256, secret, parts).as_ref().to_vec()
}

mod ring_alg {
    pub use spillway_gateway::verify::ring_hmac::{
        HMAC_SHA1_FOR_LEGACY_USE_ONLY as SHA1, HMAC_SHA256 as SHA256,
    };
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

/// A minimal HTTP/1.1 response.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send one request on a fresh connection (`Connection: close`). With
/// `send_body` false only the head is sent, as a client would that waits for
/// an early answer.
async fn http_raw(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
    send_body: bool,
) -> Result<Resp> {
    let s = TcpStream::connect(addr).await?;
    http_on(s, method, target, headers, body, send_body).await
}

/// A POST from the source address `from` (any 127.0.0.0/8 address).
async fn post_from(
    from: std::net::IpAddr,
    addr: std::net::SocketAddr,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Resp> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    let s = socket.connect(addr).await?;
    http_on(s, "POST", target, headers, body, true).await
}

async fn http_on(
    mut s: TcpStream,
    method: &str,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
    send_body: bool,
) -> Result<Resp> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    if send_body {
        let _ = s.write_all(body).await;
    }
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut buf)).await;
    if !matches!(read, Ok(Ok(_))) && buf.is_empty() {
        bail!("no response to {method} {target}: {read:?}");
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("response head")?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .context("status line")?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_owned(),
    })
}

pub(crate) async fn post(
    addr: std::net::SocketAddr,
    target: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<Resp> {
    http_raw(addr, "POST", target, headers, body, true).await
}

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One test's world: a namespace, a NATS server and a gateway watching the
/// namespace.
struct World {
    cp: &'static ControlPlane,
    ns: String,
    nats: NatsServer,
    js: jetstream::Context,
    gw: Running,
}

impl World {
    async fn new(prefix: &str) -> Result<Self> {
        Self::with(prefix, |_| {}).await
    }

    async fn with(prefix: &str, tweak: impl FnOnce(&mut Config)) -> Result<Self> {
        let cp = ControlPlane::shared().await;
        let ns = cp.namespace(prefix).await?;
        let nats = NatsServer::start().await?;
        let js = nats.jetstream().await?;
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            admin_listen: "127.0.0.1:0".parse()?,
            nats_url: nats.url.clone(),
            source: SourceKind::Kubernetes,
            namespace: Some(ns.clone()),
            publish_timeout: Duration::from_secs(2),
            retry_after: Duration::from_secs(3),
            shutdown_grace: Duration::from_secs(5),
            drain_delay: Duration::ZERO,
            ..Config::default()
        };
        let mut config = config;
        tweak(&mut config);
        let gw = start(&config, Some(cp.client().await?)).await?;
        Ok(Self {
            cp,
            ns,
            nats,
            js,
            gw,
        })
    }

    async fn apply(&self, yaml: &str) -> Result<()> {
        self.cp
            .kubectl_stdin(&["apply", "-n", &self.ns, "-f", "-"], yaml)
            .await
            .map(|_| ())
    }

    fn names(&self, name: &str) -> EndpointNames {
        EndpointNames::new(&self.ns, name)
    }

    /// Create the endpoint's stream the way the operator does.
    async fn stream(&self, name: &str, max_msgs: i64) -> Result<()> {
        let n = self.names(name);
        self.js
            .create_stream(jetstream::stream::Config {
                name: n.stream(),
                subjects: vec![n.stream_subjects()],
                duplicate_window: Duration::from_secs(120),
                discard: jetstream::stream::DiscardPolicy::New,
                max_messages: max_msgs,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    async fn messages(&self, name: &str) -> Result<Vec<jetstream::message::StreamMessage>> {
        let mut stream = self.js.get_stream(self.names(name).stream()).await?;
        let state = stream.info().await?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            out.push(stream.get_raw_message(seq).await?);
        }
        Ok(out)
    }

    async fn count(&self, name: &str) -> Result<u64> {
        let mut stream = self.js.get_stream(self.names(name).stream()).await?;
        Ok(stream.info().await?.state.messages)
    }

    /// Wait until `path` is routed with its secrets loaded and the gateway
    /// is ready (its NATS connection is made in the background).
    async fn routed(&self, path: &str) -> Result<()> {
        let gateway = self.gw.gateway.clone();
        let p = path.to_owned();
        eventually(Duration::from_secs(15), &format!("{path} routed"), || {
            let ok = gateway.ready()
                && gateway
                    .router
                    .table()
                    .get(&p)
                    .is_some_and(|r| r.verifier.is_ok());
            async move { ok }
        })
        .await
    }

    /// One GitHub endpoint `name` on `path` (Secret `keys`), applied, with
    /// its stream there and its path routed.
    async fn github_endpoint(&self, name: &str, path: &str) -> Result<()> {
        let mut y = secrets_yaml();
        y += &endpoint(
            name,
            path,
            "{scheme: github, secretRefs: [{name: keys, key: github}]}",
            "",
        );
        self.apply(&y).await?;
        self.stream(name, -1).await?;
        self.routed(path).await
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.gw.addr
    }
}

fn endpoint(name: &str, path: &str, verification: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: spillway.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: {name}}}\nspec:\n  path: {path}\n  verification: {verification}\n{extra}  processor: {{sink: {{url: \"http://sink.invalid/hook\"}}}}\n"
    )
}

const SVIX_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const TWILIO_URL: &str = "https://hooks.example.com/e/twilio";

fn secrets_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  github: \"It's a Secret to Everybody\"\n  stripe: whsec_stripe_test\n  slack: 8f742231b10e8888abcd99yyyzzz85a5\n  svix: {SVIX_SECRET}\n  shopify: shpss_test\n  gitlab: gl-token-1\n  twilio: twilio-auth\n  twitch: twitch-eventsub-secret\n  hmac: generic-key\n  meta: meta-verify\n  zoom: zoom-secret\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Good,
    Tampered,
    WrongSecret,
    Stale,
    Missing,
}

const SCHEMES: &[&str] = &[
    "github", "stripe", "slack", "svix", "shopify", "gitlab", "twilio", "twitch", "hmac", "none",
];

fn all_endpoints() -> String {
    let r = |k: &str| format!("{{name: keys, key: {k}}}");
    let mut y = secrets_yaml();
    y += &endpoint(
        "github",
        "/e/github",
        &format!("{{scheme: github, secretRefs: [{}]}}", r("github")),
        "",
    );
    y += &endpoint(
        "stripe",
        "/e/stripe",
        &format!("{{scheme: stripe, secretRefs: [{}]}}", r("stripe")),
        "",
    );
    y += &endpoint(
        "slack",
        "/e/slack",
        &format!("{{scheme: slack, secretRefs: [{}]}}", r("slack")),
        "",
    );
    y += &endpoint(
        "svix",
        "/e/svix",
        &format!("{{scheme: standardWebhooks, secretRefs: [{}]}}", r("svix")),
        "",
    );
    y += &endpoint(
        "shopify",
        "/e/shopify",
        &format!("{{scheme: shopify, secretRefs: [{}]}}", r("shopify")),
        "",
    );
    y += &endpoint(
        "gitlab",
        "/e/gitlab",
        &format!("{{scheme: gitlab, secretRefs: [{}]}}", r("gitlab")),
        "",
    );
    y += &endpoint(
        "twilio",
        "/e/twilio",
        &format!(
            "{{scheme: twilio, publicUrl: \"{TWILIO_URL}\", secretRefs: [{}]}}",
            r("twilio")
        ),
        "",
    );
    y += &endpoint(
        "twitch",
        "/e/twitch",
        &format!("{{scheme: twitch, secretRefs: [{}]}}", r("twitch")),
        "  handshake: {type: twitchCallbackVerification}\n",
    );
    y += &endpoint(
        "hmac",
        "/e/hmac",
        &format!(
            "{{scheme: hmac, secretRefs: [{}], hmac: {{header: X-Signature, prefix: \"sha256=\", signedContent: \"{{timestamp}}.{{body}}\", timestampHeader: X-Timestamp}}}}",
            r("hmac")
        ),
        "",
    );
    y += &endpoint("none", "/e/none", "{scheme: none}", "");
    y
}

/// A request for `scheme`, signed per `mode`. Returns headers, body and the
/// delivery id the gateway should record.
fn request(scheme: &str, n: u32, mode: Mode) -> (Vec<(String, String)>, Vec<u8>, String) {
    let secret: &[u8] = match (mode, scheme) {
        (Mode::WrongSecret, _) => b"wrong-secret",
        (_, "github") => b"It's a Secret to Everybody",
        (_, "stripe") => b"whsec_stripe_test",
        (_, "slack") => b"8f742231b10e8888abcd99yyyzzz85a5",
        (_, "shopify") => b"shpss_test",
        (_, "gitlab") => b"gl-token-1",
        (_, "twilio") => b"twilio-auth",
        (_, "twitch") => b"twitch-eventsub-secret",
        (_, "hmac") => b"generic-key",
        _ => b"",
    };
    let ts = if mode == Mode::Stale {
        now() - 3600
    } else {
        now()
    }
    .to_string();
    let id = format!("{scheme}-{n}");
    let json = format!(r#"{{"id":"{id}","event_id":"{id}","n":{n}}}"#).into_bytes();
    let json_ct = ("Content-Type".to_string(), "application/json".to_string());
    let (mut headers, body, sig_header): (Vec<(String, String)>, Vec<u8>, &str) = match scheme {
        "github" => (
            vec![
                (
                    "X-Hub-Signature-256".into(),
                    format!("sha256={}", hex(&hmac256(secret, &[&json]))),
                ),
                ("X-GitHub-Delivery".into(), id.clone()),
                ("X-GitHub-Event".into(), "push".into()),
                json_ct,
            ],
            json,
            "X-Hub-Signature-256",
        ),
        "stripe" => (
            vec![
                (
                    "Stripe-Signature".into(),
                    format!(
                        "t={ts},v1={}",
                        hex(&hmac256(secret, &[ts.as_bytes(), b".", &json]))
                    ),
                ),
                json_ct,
            ],
            json,
            "Stripe-Signature",
        ),
        "slack" => (
            vec![
                ("X-Slack-Request-Timestamp".into(), ts.clone()),
                (
                    "X-Slack-Signature".into(),
                    format!(
                        "v0={}",
                        hex(&hmac256(secret, &[b"v0:", ts.as_bytes(), b":", &json]))
                    ),
                ),
                json_ct,
            ],
            json,
            "X-Slack-Signature",
        ),
        "svix" => {
            let key = if mode == Mode::WrongSecret {
                b"wrong-secret".to_vec()
            } else {
                B64.decode(SVIX_SECRET.trim_start_matches("whsec_"))
                    .expect("svix secret")
            };
            let sig = B64.encode(hmac256(
                &key,
                &[id.as_bytes(), b".", ts.as_bytes(), b".", &json],
            ));
            (
                vec![
                    ("webhook-id".into(), id.clone()),
                    ("webhook-timestamp".into(), ts.clone()),
                    ("webhook-signature".into(), format!("v1,{sig}")),
                    json_ct,
                ],
                json,
                "webhook-signature",
            )
        }
        "shopify" => (
            vec![
                (
                    "X-Shopify-Hmac-Sha256".into(),
                    B64.encode(hmac256(secret, &[&json])),
                ),
                ("X-Shopify-Webhook-Id".into(), id.clone()),
                json_ct,
            ],
            json,
            "X-Shopify-Hmac-Sha256",
        ),
        "gitlab" => (
            vec![
                (
                    "X-Gitlab-Token".into(),
                    String::from_utf8_lossy(secret).into_owned(),
                ),
                ("X-Gitlab-Event-UUID".into(), id.clone()),
                ("X-Gitlab-Event".into(), "Push Hook".into()),
                json_ct,
            ],
            json,
            "X-Gitlab-Token",
        ),
        "twilio" => {
            let form = format!("MessageSid=SM{n}&Body=Ahoy+{n}&From=%2B15551234567");
            let mut params = vec![
                ("Body".to_string(), format!("Ahoy {n}")),
                ("From".to_string(), "+15551234567".to_string()),
                ("MessageSid".to_string(), format!("SM{n}")),
            ];
            params.sort();
            let mut data = TWILIO_URL.as_bytes().to_vec();
            for (k, v) in &params {
                data.extend_from_slice(k.as_bytes());
                data.extend_from_slice(v.as_bytes());
            }
            let sig = B64.encode(sign(ring_alg::SHA1, secret, &[&data]).as_ref());
            (
                vec![
                    ("X-Twilio-Signature".into(), sig),
                    ("I-Twilio-Idempotency-Token".into(), id.clone()),
                    (
                        "Content-Type".into(),
                        "application/x-www-form-urlencoded".into(),
                    ),
                ],
                form.into_bytes(),
                "X-Twilio-Signature",
            )
        }
        "twitch" => {
            // RFC 3339 with nanoseconds, as Twitch sends it.
            let at = if mode == Mode::Stale {
                now() - 3600
            } else {
                now()
            };
            let ts = jiff::Timestamp::new(at, 123_456_789)
                .expect("a valid time")
                .to_string();
            assert!(ts.ends_with(".123456789Z"), "{ts}");
            let sig = hex(&hmac256(secret, &[id.as_bytes(), ts.as_bytes(), &json]));
            (
                vec![
                    ("Twitch-Eventsub-Message-Id".into(), id.clone()),
                    ("Twitch-Eventsub-Message-Retry".into(), "0".into()),
                    ("Twitch-Eventsub-Message-Type".into(), "notification".into()),
                    (
                        "Twitch-Eventsub-Message-Signature".into(),
                        format!("sha256={sig}"),
                    ),
                    ("Twitch-Eventsub-Message-Timestamp".into(), ts),
                    (
                        "Twitch-Eventsub-Subscription-Type".into(),
                        "channel.follow".into(),
                    ),
                    json_ct,
                ],
                json,
                "Twitch-Eventsub-Message-Signature",
            )
        }
        "hmac" => (
            vec![
                ("X-Timestamp".into(), ts.clone()),
                (
                    "X-Signature".into(),
                    format!(
                        "sha256={}",
                        hex(&hmac256(secret, &[ts.as_bytes(), b".", &json]))
                    ),
                ),
                json_ct,
            ],
            json,
            "X-Signature",
        ),
        _ => (vec![json_ct], json, ""),
    };
    let delivery = match scheme {
        "hmac" | "none" => spillway_gateway::delivery::body_hash(&body),
        _ => id,
    };
    let body = match mode {
        Mode::Tampered => {
            let mut b = body;
            b.extend_from_slice(b" ");
            b
        }
        _ => body,
    };
    if mode == Mode::Missing {
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case(sig_header));
    }
    (headers, body, delivery)
}

// -------------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scheme_lands_exactly_once_and_bad_requests_are_401() -> Result<()> {
    let w = World::new("gw-schemes").await?;
    w.apply(&all_endpoints()).await?;
    for s in SCHEMES {
        w.stream(s, -1).await?;
        w.routed(&format!("/e/{s}")).await?;
    }
    let admin = w.gw.admin_addr;
    eventually(Duration::from_secs(10), "readyz", || async move {
        http_raw(admin, "GET", "/readyz", &[], b"", true)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await?;

    // Format 1 while the endpoints' status says nothing (an operator of
    // this release has not yet seen every processor read format 2), then
    // format 2 once `status.storedFormat` is 2; the same webhook either way.
    for (round, format) in [(1u32, Format::V1), (2, Format::V2)] {
        if format == Format::V2 {
            for s in SCHEMES {
                w.cp.kubectl_output(&[
                    "patch",
                    "-n",
                    &w.ns,
                    "webhookendpoint",
                    s,
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    r#"{"status":{"storedFormat":2}}"#,
                ])
                .await?;
            }
            let gateway = w.gw.gateway.clone();
            eventually(Duration::from_secs(15), "format 2 routed", || {
                let table = gateway.router.table();
                let all = SCHEMES.iter().all(|s| {
                    table
                        .get(&format!("/e/{s}"))
                        .is_some_and(|r| r.stored_format == 2 && r.verifier.is_ok())
                });
                async move { all }
            })
            .await?;
        }
        for s in SCHEMES {
            let (headers, body, delivery) = request(s, round, Mode::Good);
            let r = post(w.addr(), &format!("/e/{s}"), &headers, &body).await?;
            assert_eq!(r.status, 200, "{s}: {r:?}");
            let msgs = w.messages(s).await?;
            assert_eq!(msgs.len(), round as usize, "{s}: exactly one stored");
            let m = &msgs[round as usize - 1];
            let stored = stored::decode(Some(&m.headers), &m.payload)?;
            assert_eq!(stored.format, Some(format), "{s}");
            assert_eq!(
                stored.body(&m.payload),
                body.as_slice(),
                "{s}: raw body stored"
            );
            if format == Format::V2 {
                // Nothing but JetStream's deduplication id in the headers.
                let names: Vec<String> = m.headers.iter().map(|(k, _)| k.to_string()).collect();
                assert_eq!(names, [wire::NATS_MSG_ID], "{s}");
            }
            assert_eq!(m.subject.as_str(), w.names(s).subject(0));
            assert_eq!(stored.endpoint, Some(format!("{}/{s}", w.ns)), "{s}");
            assert_eq!(
                stored.delivery_id.as_deref(),
                Some(delivery.as_str()),
                "{s}"
            );
            // The provider's id (or, without one, the body hash), in the
            // gateway's namespace.
            let msg_id = m
                .headers
                .get(wire::NATS_MSG_ID)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            assert!(
                msg_id == format!("provider:{delivery}") || msg_id == format!("body:{delivery}"),
                "{s}: {msg_id}"
            );
            assert!(
                stored
                    .received_at
                    .as_deref()
                    .is_some_and(|t| t.ends_with('Z') && t.len() == 24),
                "{s}"
            );
            assert!(
                stored.traceparent.as_deref().is_some_and(|t| t.len() == 55),
                "{s}"
            );
            let ct = headers
                .iter()
                .find(|(k, _)| k == "Content-Type")
                .map(|(_, v)| v.clone());
            assert_eq!(stored.content_type, ct, "{s}");
            for (k, v) in &headers {
                let kept = stored.header(k);
                if k == "X-Gitlab-Token" {
                    assert_eq!(kept, None, "the GitLab token is a secret and never stored");
                } else if k != "Content-Type" {
                    assert_eq!(kept, Some(v.as_str()), "{s}: {k} kept");
                }
            }
            if format == Format::V1 {
                // Format 1's names, title-cased under the prefix.
                for (k, _) in headers
                    .iter()
                    .filter(|(k, _)| k != "Content-Type" && k != "X-Gitlab-Token")
                {
                    let name = format!("{}{}", wire::ORIGINAL_HEADER_PREFIX, title(k));
                    assert!(m.headers.get(name.as_str()).is_some(), "{s}: {name}");
                }
            }
        }
    }

    // Twitch retries a notification with the same message id (a new retry
    // count and signature): stored once.
    let (mut headers, body, _) = request("twitch", 1, Mode::Good);
    for (k, v) in &mut headers {
        if k == "Twitch-Eventsub-Message-Retry" {
            *v = "1".into();
        }
    }
    let r = post(w.addr(), "/e/twitch", &headers, &body).await?;
    assert_eq!(r.status, 200, "twitch retry: {r:?}");
    assert_eq!(
        w.count("twitch").await?,
        2,
        "a Twitch retry is stored once (across formats too)"
    );

    for s in SCHEMES.iter().filter(|s| **s != "none") {
        let mut modes = vec![
            (Mode::WrongSecret, "bad_signature"),
            (Mode::Missing, "missing_signature"),
        ];
        // GitLab sends a shared token, not a signature over the body.
        if *s != "gitlab" {
            modes.push((Mode::Tampered, "bad_signature"));
        }
        if ["stripe", "slack", "svix", "twitch", "hmac"].contains(s) {
            modes.push((Mode::Stale, "timestamp_out_of_tolerance"));
        }
        for (mode, reason) in modes {
            let (headers, body, _) = request(s, 2, mode);
            let r = post(w.addr(), &format!("/e/{s}"), &headers, &body).await?;
            assert_eq!(r.status, 401, "{s} {mode:?}: {r:?}");
            let v: serde_json::Value = serde_json::from_str(&r.body)?;
            assert_eq!(v, serde_json::json!({ "error": reason }), "{s} {mode:?}");
        }
        assert_eq!(
            w.count(s).await?,
            2,
            "{s}: nothing published for rejected requests"
        );
    }

    let metrics = http_raw(admin, "GET", "/metrics", &[], b"", true)
        .await?
        .body;
    assert!(
        metrics.contains(&format!(
            "spillway_gateway_verify_failures_total{{webhook_endpoint=\"{}/stripe\",reason=\"timestamp_out_of_tolerance\"}} 1",
            w.ns
        )),
        "{metrics}"
    );
    assert!(metrics.contains("spillway_gateway_publish_duration_seconds_bucket"));
    // Prometheus Operator's own target labels stay its own.
    spillway_tests::check_metric_labels(&metrics)?;
    assert!(
        spillway_tests::check_metric_labels("x_total{endpoint=\"a/b\"} 1").is_err(),
        "the check catches a reserved label"
    );
    assert!(!metrics.contains("It's a Secret"), "no secrets in metrics");
    w.gw.shutdown().await;
    Ok(())
}

fn title(name: &str) -> String {
    name.to_ascii_lowercase()
        .split('-')
        .map(|seg| {
            let mut c = seg.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("-")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotation_applies_live() -> Result<()> {
    let w = World::new("gw-rotate").await?;
    let secret = |old: &str, new: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: gh}}\nstringData: {{old: \"{old}\", new: \"{new}\"}}\n"
        )
    };
    let ep = |refs: &str| {
        endpoint(
            "rot",
            "/rot",
            &format!("{{scheme: github, secretRefs: [{refs}]}}"),
            "",
        )
    };
    w.apply(&(secret("old-secret", "new-secret") + &ep("{name: gh, key: old}")))
        .await?;
    w.stream("rot", -1).await?;
    w.routed("/rot").await?;
    let send = |secret: &'static str, n: u32| {
        let addr = w.addr();
        async move {
            let body = format!("{{\"n\":{n}}}").into_bytes();
            let headers = h(&[
                (
                    "X-Hub-Signature-256",
                    &format!("sha256={}", hex(&hmac256(secret.as_bytes(), &[&body]))),
                ),
                ("X-GitHub-Delivery", &format!("rot-{n}")),
            ]);
            post(addr, "/rot", &headers, &body).await.map(|r| r.status)
        }
    };
    assert_eq!(send("old-secret", 1).await?, 200);
    assert_eq!(send("new-secret", 2).await?, 401);

    // Add the new secret: both verify.
    w.apply(&ep("{name: gh, key: old}, {name: gh, key: new}"))
        .await?;
    let mut n = 10;
    eventually(Duration::from_secs(10), "new secret accepted", || {
        n += 1;
        let f = send("new-secret", n);
        async move { f.await.is_ok_and(|s| s == 200) }
    })
    .await?;
    assert_eq!(send("old-secret", 3).await?, 200);

    // Remove the old one.
    w.apply(&ep("{name: gh, key: new}")).await?;
    let mut m = 100;
    eventually(Duration::from_secs(10), "old secret refused", || {
        m += 1;
        let f = send("old-secret", m);
        async move { f.await.is_ok_and(|s| s == 401) }
    })
    .await?;
    assert_eq!(send("new-secret", 4).await?, 200);

    // Changing the Secret's value is picked up too.
    w.apply(&secret("old-secret", "newer-secret")).await?;
    let mut k = 200;
    eventually(Duration::from_secs(10), "changed value accepted", || {
        k += 1;
        let f = send("newer-secret", k);
        async move { f.await.is_ok_and(|s| s == 200) }
    })
    .await?;

    // Suspend and resume live, then delete: 503, 200 again, then 404.
    w.apply(
        &ep("{name: gh, key: new}").replace("  path: /rot\n", "  path: /rot\n  suspend: true\n"),
    )
    .await?;
    let mut j = 300;
    eventually(Duration::from_secs(10), "suspended", || {
        j += 1;
        let f = send("newer-secret", j);
        async move { f.await.is_ok_and(|s| s == 503) }
    })
    .await?;
    w.apply(&ep("{name: gh, key: new}")).await?;
    eventually(Duration::from_secs(10), "resumed", || {
        j += 1;
        let f = send("newer-secret", j);
        async move { f.await.is_ok_and(|s| s == 200) }
    })
    .await?;
    w.cp.kubectl_output(&["delete", "webhookendpoint", "rot", "-n", &w.ns])
        .await?;
    eventually(Duration::from_secs(10), "deleted endpoint unrouted", || {
        j += 1;
        let f = send("newer-secret", j);
        async move { f.await.is_ok_and(|s| s == 404) }
    })
    .await?;
    w.gw.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_are_answered_and_not_stored() -> Result<()> {
    let w = World::new("gw-handshake").await?;
    let r = |k: &str| format!("{{name: keys, key: {k}}}");
    let mut y = secrets_yaml();
    y += &endpoint(
        "slack",
        "/h/slack",
        &format!("{{scheme: slack, secretRefs: [{}]}}", r("slack")),
        "  handshake: {type: slackUrlVerification}\n",
    );
    y += &endpoint(
        "meta",
        "/h/meta",
        &format!("{{scheme: github, secretRefs: [{}]}}", r("github")),
        &format!(
            "  handshake: {{type: metaHubChallenge, verifyTokenSecretRef: {}}}\n",
            r("meta")
        ),
    );
    y += &endpoint(
        "zoom",
        "/h/zoom",
        &format!(
            "{{scheme: hmac, secretRefs: [{}], hmac: {{header: x-zm-signature, prefix: \"v0=\", signedContent: \"v0:{{timestamp}}:{{body}}\", timestampHeader: x-zm-request-timestamp}}}}",
            r("zoom")
        ),
        "  handshake: {type: zoomUrlValidation}\n",
    );
    y += &endpoint(
        "graph",
        "/h/graph",
        "{scheme: none}",
        "  handshake: {type: msGraphValidationToken}\n",
    );
    y += &endpoint(
        "twitch",
        "/h/twitch",
        &format!("{{scheme: twitch, secretRefs: [{}]}}", r("twitch")),
        "  handshake: {type: twitchCallbackVerification}\n",
    );
    w.apply(&y).await?;
    for s in ["slack", "meta", "zoom", "graph", "twitch"] {
        w.stream(s, -1).await?;
        w.routed(&format!("/h/{s}")).await?;
    }
    let addr = w.addr();

    // Slack: signed url_verification.
    let ts = now().to_string();
    let body = br#"{"token":"t","challenge":"slack-challenge-123","type":"url_verification"}"#;
    let sig = format!(
        "v0={}",
        hex(&hmac256(
            b"8f742231b10e8888abcd99yyyzzz85a5",
            &[b"v0:", ts.as_bytes(), b":", body]
        ))
    );
    let signed = h(&[
        ("X-Slack-Request-Timestamp", &ts),
        ("X-Slack-Signature", &sig),
    ]);
    let resp = post(addr, "/h/slack", &signed, body).await?;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "slack-challenge-123")
    );
    let unsigned = post(addr, "/h/slack", &[], body).await?;
    assert_eq!(
        unsigned.status, 401,
        "an unsigned Slack handshake is refused"
    );

    // Meta: GET with the verify token.
    let ok = http_raw(
        addr,
        "GET",
        "/h/meta?hub.mode=subscribe&hub.verify_token=meta-verify&hub.challenge=1158201444",
        &[],
        b"",
        true,
    )
    .await?;
    assert_eq!((ok.status, ok.body.as_str()), (200, "1158201444"));
    let bad = http_raw(
        addr,
        "GET",
        "/h/meta?hub.mode=subscribe&hub.verify_token=nope&hub.challenge=1158201444",
        &[],
        b"",
        true,
    )
    .await?;
    assert_eq!(bad.status, 403);
    assert!(!bad.body.contains("1158201444"));

    // Zoom: signed endpoint.url_validation → plainToken + encryptedToken.
    let body = br#"{"payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"},"event_ts":1654503849680,"event":"endpoint.url_validation"}"#;
    let ts = now().to_string();
    let sig = format!(
        "v0={}",
        hex(&hmac256(
            b"zoom-secret",
            &[b"v0:", ts.as_bytes(), b":", body]
        ))
    );
    let resp = post(
        addr,
        "/h/zoom",
        &h(&[("x-zm-request-timestamp", &ts), ("x-zm-signature", &sig)]),
        body,
    )
    .await?;
    assert_eq!(resp.status, 200, "{resp:?}");
    let v: serde_json::Value = serde_json::from_str(&resp.body)?;
    assert_eq!(v["plainToken"], "qgg8vlvZRS6UYooatFL8Aw");
    assert_eq!(
        v["encryptedToken"],
        hex(&hmac256(b"zoom-secret", &[b"qgg8vlvZRS6UYooatFL8Aw"]))
    );

    // Microsoft Graph: validationToken echoed as text/plain.
    let resp = post(
        addr,
        "/h/graph?validationToken=Validation%3A%20Testing%20123",
        &[],
        b"",
    )
    .await?;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "Validation: Testing 123")
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );

    // Twitch: webhook_callback_verification signed as Twitch EventSub
    // signs (scheme twitch), answered only once it verified.
    let body = br#"{"challenge":"pogchamp-kappa-360noscope-vohiyo","subscription":{"type":"channel.follow"}}"#;
    let twitch = |secret: &[u8], at: i64| {
        let ts = jiff::Timestamp::new(at, 5_000_000)
            .expect("a valid time")
            .to_string();
        let id = "e76c6bd4-55c9-4987-8304-da1588d8988b";
        let sig = hex(&hmac256(secret, &[id.as_bytes(), ts.as_bytes(), body]));
        h(&[
            ("Twitch-Eventsub-Message-Id", id),
            ("Twitch-Eventsub-Message-Timestamp", &ts),
            (
                "Twitch-Eventsub-Message-Signature",
                &format!("sha256={sig}"),
            ),
            (
                "Twitch-Eventsub-Message-Type",
                "webhook_callback_verification",
            ),
        ])
    };
    let resp = post(
        addr,
        "/h/twitch",
        &twitch(b"twitch-eventsub-secret", now()),
        body,
    )
    .await?;
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (200, "pogchamp-kappa-360noscope-vohiyo")
    );
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain"))
    );
    for (what, headers, reason) in [
        (
            "wrong secret",
            twitch(b"not-the-eventsub-secret", now()),
            "bad_signature",
        ),
        (
            "stale",
            twitch(b"twitch-eventsub-secret", now() - 3600),
            "timestamp_out_of_tolerance",
        ),
        (
            "unsigned",
            h(&[(
                "Twitch-Eventsub-Message-Type",
                "webhook_callback_verification",
            )]),
            "missing_signature",
        ),
    ] {
        let resp = post(addr, "/h/twitch", &headers, body).await?;
        assert_eq!(resp.status, 401, "twitch {what}: {resp:?}");
        assert!(
            !resp.body.contains("pogchamp"),
            "twitch {what}: no challenge echoed"
        );
        let v: serde_json::Value = serde_json::from_str(&resp.body)?;
        assert_eq!(v, serde_json::json!({ "error": reason }), "twitch {what}");
    }

    for s in ["slack", "meta", "zoom", "graph", "twitch"] {
        assert_eq!(w.count(s).await?, 0, "{s}: handshakes are not stored");
    }
    w.gw.shutdown().await;
    Ok(())
}

pub(crate) fn github_headers(secret: &str, body: &[u8], delivery: &str) -> Vec<(String, String)> {
    h(&[
        (
            "X-Hub-Signature-256",
            &format!("sha256={}", hex(&hmac256(secret.as_bytes(), &[body]))),
        ),
        ("X-GitHub-Delivery", delivery),
        ("Content-Type", "application/json"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_dedup_ordering_and_nats_outage() -> Result<()> {
    let mut w = World::new("gw-limits").await?;
    let gh = "{scheme: github, secretRefs: [{name: keys, key: github}]}";
    let mut y = secrets_yaml();
    y += &endpoint(
        "small",
        "/l/small",
        gh,
        "  ingress: {maxBodyBytes: 1024, responseStatus: 202, redactHeaders: [Authorization, x-api-key]}\n",
    );
    y += &endpoint(
        "rated",
        "/l/rated",
        gh,
        "  ingress: {rateLimit: {requestsPerSecond: 1, burst: 2}}\n",
    );
    y += &endpoint("paused", "/l/paused", gh, "  suspend: true\n");
    y += &endpoint(
        "ordered",
        "/l/ordered",
        gh,
        "  ordering: {keyJsonPointer: /customer, partitions: 4}\n",
    );
    y += &endpoint("full", "/l/full", gh, "");
    y += &endpoint("slow", "/l/slow", gh, "");
    w.apply(&y).await?;
    for s in ["small", "rated", "paused", "ordered"] {
        w.stream(s, -1).await?;
        w.routed(&format!("/l/{s}")).await?;
    }
    w.stream("full", 1).await?;
    w.routed("/l/full").await?;
    let secret = "It's a Secret to Everybody";
    let addr = w.addr();

    // 404 with no detail.
    let r = post(addr, "/nowhere", &[], b"{}").await?;
    assert_eq!((r.status, r.body.as_str()), (404, ""));

    // 413: declared too large, answered before the body is sent.
    let big = vec![b'x'; 4096];
    let r = http_raw(
        addr,
        "POST",
        "/l/small",
        &github_headers(secret, &big, "big"),
        &big,
        false,
    )
    .await?;
    assert_eq!(r.status, 413);
    // At the limit it is accepted, with the endpoint's responseStatus.
    let ok = vec![b'y'; 1024];
    let mut with_credentials = github_headers(secret, &ok, "fits");
    with_credentials.extend(h(&[
        ("Authorization", "Bearer sender-credential"),
        ("X-Api-Key", "another-credential"),
        ("X-Custom", "kept"),
    ]));
    let r = post(addr, "/l/small", &with_credentials, &ok).await?;
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(w.count("small").await?, 1);
    // Redacted headers are never stored; the others are.
    let stored = &w.messages("small").await?[0];
    let names: Vec<String> = stored
        .headers
        .iter()
        .map(|(k, _)| k.to_string().to_ascii_lowercase())
        .collect();
    assert!(
        names.contains(&"spillway-orig-x-custom".to_owned()),
        "{names:?}"
    );
    assert!(
        !names
            .iter()
            .any(|n| n.contains("authorization") || n.contains("api-key")),
        "{names:?}"
    );
    let raw = format!("{:?}", stored.headers);
    assert!(!raw.contains("credential"), "{raw}");

    // Duplicate delivery id: both answered 2xx, one stored.
    let body = br#"{"dup":true}"#;
    for _ in 0..3 {
        let r = post(
            addr,
            "/l/small",
            &github_headers(secret, body, "dup-1"),
            body,
        )
        .await?;
        assert_eq!(r.status, 202);
    }
    assert_eq!(
        w.count("small").await?,
        2,
        "three deliveries of dup-1 stored once"
    );

    // Unsigned junk is refused (401) without spending the endpoint's rate
    // limit: only verified requests count.
    for i in 0..10 {
        let b = format!("{{\"junk\":{i}}}").into_bytes();
        let r = post(
            addr,
            "/l/rated",
            &github_headers("not the secret", &b, &format!("j{i}")),
            &b,
        )
        .await?;
        assert_eq!(r.status, 401, "junk {i}");
    }
    // 429 with Retry-After once the burst is used.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let b = format!("{{\"i\":{i}}}").into_bytes();
        let r = post(
            addr,
            "/l/rated",
            &github_headers(secret, &b, &format!("r{i}")),
            &b,
        )
        .await?;
        if r.status == 429 {
            assert!(
                r.header("retry-after")
                    .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))
            );
        }
        statuses.push(r.status);
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");

    // Suspended: 503 + Retry-After, nothing stored.
    let r = post(addr, "/l/paused", &github_headers(secret, body, "p1"), body).await?;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("3"));
    assert_eq!(w.count("paused").await?, 0);

    // Ordering key → partition subject.
    let body = br#"{"customer":"cus_42"}"#;
    let r = post(
        addr,
        "/l/ordered",
        &github_headers(secret, body, "o1"),
        body,
    )
    .await?;
    assert_eq!(r.status, 200);
    let msgs = w.messages("ordered").await?;
    assert_eq!(
        msgs[0].subject.as_str(),
        w.names("ordered").subject(partition_of(b"cus_42", 4))
    );
    assert_eq!(
        msgs[0].headers.get(wire::ORDERING_KEY).map(|v| v.as_str()),
        Some("cus_42")
    );
    // A key with a newline (an end user's JSON field) or megabytes long
    // cannot be a NATS header: it is stored as its SHA-256, answered 2xx.
    let long = "k".repeat(600_000);
    for (i, key) in ["line1\nline2\r\nX-Injected: 1", long.as_str()]
        .into_iter()
        .enumerate()
    {
        use sha2::{Digest, Sha256};
        let body = serde_json::to_vec(&serde_json::json!({ "customer": key }))?;
        let r = post(
            addr,
            "/l/ordered",
            &github_headers(secret, &body, &format!("o-odd-{i}")),
            &body,
        )
        .await?;
        assert_eq!(r.status, 200, "{r:?}");
        let stored = w.messages("ordered").await?;
        let m = stored.last().context("stored")?;
        let want = format!("sha256:{}", hex(&Sha256::digest(key.as_bytes())));
        assert_eq!(
            m.headers.get(wire::ORDERING_KEY).map(|v| v.as_str()),
            Some(want.as_str())
        );
        assert_eq!(
            m.subject.as_str(),
            w.names("ordered").subject(partition_of(want.as_bytes(), 4))
        );
        assert_eq!(m.payload.as_ref(), body.as_slice());
    }

    // JetStream slower than the deadline: a subscriber that never acks
    // stands in for a stream that does not answer in time.
    w.routed("/l/slow").await?;
    let silent = w.nats.client().await?;
    let _sub = silent.subscribe(w.names("slow").subject(0)).await?;
    silent.flush().await?;
    let started = std::time::Instant::now();
    let r = post(addr, "/l/slow", &github_headers(secret, body, "s1"), body).await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "answered only after the publish deadline"
    );

    // Stream full with discard=new: 503, never 2xx.
    let b1 = br#"{"f":1}"#;
    assert_eq!(
        post(addr, "/l/full", &github_headers(secret, b1, "f1"), b1)
            .await?
            .status,
        200
    );
    let b2 = br#"{"f":2}"#;
    let r = post(addr, "/l/full", &github_headers(secret, b2, "f2"), b2).await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.header("retry-after").is_some());

    // NATS stopped mid-test: 503 with Retry-After, then 2xx again after a
    // restart; every 2xx-acknowledged delivery is in the stream.
    let mut acked = vec!["o1".to_string()];
    w.nats.stop();
    let admin = w.gw.admin_addr;
    for i in 0..3 {
        let b = format!("{{\"customer\":\"c{i}\"}}").into_bytes();
        let id = format!("down-{i}");
        let r = post(addr, "/l/ordered", &github_headers(secret, &b, &id), &b).await?;
        assert_eq!(r.status, 503, "NATS down: {r:?}");
        assert!(r.header("retry-after").is_some());
    }
    let ready = http_raw(admin, "GET", "/readyz", &[], b"", true).await?;
    assert_eq!(ready.status, 503, "not ready while NATS is down");
    w.nats.restart().await?;
    let mut n = 0;
    eventually(Duration::from_secs(20), "2xx after NATS restart", || {
        n += 1;
        let b = format!("{{\"customer\":\"back{n}\"}}").into_bytes();
        let id = format!("back-{n}");
        let headers = github_headers(secret, &b, &id);
        async move {
            post(addr, "/l/ordered", &headers, &b)
                .await
                .is_ok_and(|r| r.status == 200)
        }
    })
    .await?;
    acked.push(format!("back-{n}"));
    w.js = w.nats.jetstream().await?;
    let stored: Vec<String> = w
        .messages("ordered")
        .await?
        .iter()
        .filter_map(|m| {
            m.headers
                .get(wire::DELIVERY_ID)
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    for id in &acked {
        assert!(
            stored.contains(id),
            "acknowledged {id} missing from {stored:?}"
        );
    }
    w.gw.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_are_all_stored() -> Result<()> {
    let w = World::new("gw-load").await?;
    w.github_endpoint("load", "/load").await?;
    // A newer endpoint (creation times have one-second resolution) claiming
    // the same path does not take it over.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    w.apply(&endpoint("intruder", "/load", "{scheme: none}", ""))
        .await?;
    w.cp.kubectl_output(&["get", "webhookendpoint", "intruder", "-n", &w.ns])
        .await?;
    let router = w.gw.gateway.router.clone();
    let intruder = format!("{}/intruder", w.ns);
    eventually(Duration::from_secs(10), "conflict seen", || {
        let seen = router.conflicts().contains(&intruder);
        async move { seen }
    })
    .await?;
    let route = w.gw.gateway.router.table().get("/load").expect("routed");
    assert_eq!(
        route.endpoint,
        format!("{}/load", w.ns),
        "the older endpoint keeps the path"
    );

    let addr = w.addr();
    let total = 300u32;
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    for i in 0..total {
        let sem = sem.clone();
        tasks.spawn(async move {
            let _p = sem.acquire().await.expect("semaphore");
            let b = format!("{{\"i\":{i}}}").into_bytes();
            let id = format!("load-{i}");
            let r = post(
                addr,
                "/load",
                &github_headers("It's a Secret to Everybody", &b, &id),
                &b,
            )
            .await;
            (id, r.map(|r| r.status).unwrap_or(0))
        });
    }
    let mut acked = Vec::new();
    while let Some(res) = tasks.join_next().await {
        let (id, status) = res?;
        if status == 200 {
            acked.push(id);
        }
    }
    assert_eq!(acked.len(), total as usize, "every request stored");
    assert_eq!(w.count("load").await?, u64::from(total));
    w.gw.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_slow_senders_and_graceful_shutdown() -> Result<()> {
    let w = World::with("gw-hygiene", |c| {
        c.max_header_bytes = 8192;
        c.body_timeout = Duration::from_secs(1);
        c.header_read_timeout = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(1);
    })
    .await?;
    w.github_endpoint("drain", "/drain").await?;
    let addr = w.addr();

    // Oversized request head.
    let huge = "x".repeat(20_000);
    let r = post(addr, "/drain", &h(&[("X-Huge", &huge)]), b"{}").await?;
    assert_eq!(r.status, 431, "{r:?}");

    // A body that stops arriving is cut off.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");

    // A head that stops arriving: the connection is closed.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"POST /drain HTTP/1.1\r\nHost: x\r\n").await?;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "slow head not cut off");
    // A connection that sends nothing at all is closed too.
    let mut s = TcpStream::connect(addr).await?;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "idle connection not cut off");
    assert_eq!(w.count("drain").await?, 0);

    // Graceful shutdown with requests in flight: whatever was answered 2xx
    // is stored, nothing else is answered, and the port closes.
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..80u32 {
        let answered = answered.clone();
        tasks.spawn(async move {
            let b = format!("{{\"i\":{i}}}").into_bytes();
            let id = format!("drain-{i}");
            let r = post(
                addr,
                "/drain",
                &github_headers("It's a Secret to Everybody", &b, &id),
                &b,
            )
            .await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (id, r.map(|r| r.status).ok())
        });
    }
    let a = answered.clone();
    eventually(Duration::from_secs(10), "first answers", || {
        let n = a.load(std::sync::atomic::Ordering::SeqCst);
        async move { n >= 5 }
    })
    .await?;
    let gateway = w.gw.gateway.clone();
    let World {
        gw, js, nats, ns, ..
    } = w;
    gw.shutdown().await;
    let mut ok = Vec::new();
    while let Some(res) = tasks.join_next().await {
        let (id, status) = res?;
        match status {
            Some(200) => ok.push(id),
            // Cut off by shutdown, or (408) starved past the 1 s read
            // timeouts on a loaded machine: not answered 2xx either way.
            None | Some(408) => {}
            Some(other) => bail!("{id}: unexpected {other} during shutdown"),
        }
    }
    assert!(ok.len() >= 5, "{} answered", ok.len());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "port closed after shutdown"
    );
    let mut stream = js
        .get_stream(EndpointNames::new(&ns, "drain").stream())
        .await?;
    let state = stream.info().await?.state.clone();
    let mut stored = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await?;
        if let Some(id) = m.headers.get(wire::DELIVERY_ID) {
            stored.push(id.as_str().to_owned());
        }
    }
    for id in &ok {
        assert!(stored.contains(id), "answered 2xx but not stored: {id}");
    }
    assert_eq!(gateway.metrics.in_flight.get(), 0);
    drop(nats);
    Ok(())
}

/// An empty Secret value is no key: with only empty values the endpoint
/// answers 503 (like a missing Secret), never 2xx to a request "signed" with
/// the empty key or carrying an empty token; a real value makes it serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_secret_values_never_verify() -> Result<()> {
    let w = World::new("gw-empty").await?;
    let secret = |v: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: blank}}\nstringData: {{gitlab: \"{v}\", github: \"{v}\"}}\n"
        )
    };
    let mut y = secret("");
    y += &endpoint(
        "gl",
        "/empty/gl",
        "{scheme: gitlab, secretRefs: [{name: blank, key: gitlab}]}",
        "",
    );
    y += &endpoint(
        "gh",
        "/empty/gh",
        "{scheme: github, secretRefs: [{name: blank, key: github}]}",
        "",
    );
    w.apply(&y).await?;
    w.stream("gl", -1).await?;
    w.stream("gh", -1).await?;
    let gateway = w.gw.gateway.clone();
    eventually(Duration::from_secs(15), "routes and Secret synced", || {
        let t = gateway.router.table();
        let ok = gateway.synced.load(std::sync::atomic::Ordering::Acquire)
            && t.get("/empty/gl").is_some()
            && t.get("/empty/gh").is_some();
        async move { ok }
    })
    .await?;
    let addr = w.addr();
    let body = br#"{"object_kind":"push"}"#;
    let empty_token = h(&[("X-Gitlab-Token", "")]);
    let r = post(addr, "/empty/gl", &empty_token, body).await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("3"));
    assert!(r.body.contains("not_ready"), "{r:?}");
    let forged = github_headers("", body, "forged");
    let r = post(addr, "/empty/gh", &forged, body).await?;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(w.count("gl").await? + w.count("gh").await?, 0);

    w.apply(&secret("now-set")).await?;
    w.routed("/empty/gl").await?;
    w.routed("/empty/gh").await?;
    assert_eq!(
        post(addr, "/empty/gl", &empty_token, body).await?.status,
        401
    );
    assert_eq!(post(addr, "/empty/gh", &forged, body).await?.status, 401);
    let r = post(
        addr,
        "/empty/gl",
        &h(&[("X-Gitlab-Token", "now-set")]),
        body,
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    w.gw.shutdown().await;
    Ok(())
}

/// The global cap on requests in progress: a sender that never finishes its
/// body holds the only slot, the next request is answered 503 + Retry-After
/// before its body is read, and once the slot is free requests are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_global_cap_get_503_and_normal_traffic_passes() -> Result<()> {
    let w = World::with("gw-cap", |c| {
        c.max_concurrent_requests = 1;
        c.body_timeout = Duration::from_secs(30);
    })
    .await?;
    w.github_endpoint("cap", "/cap").await?;
    let addr = w.addr();
    let secret = "It's a Secret to Everybody";
    let body = br#"{"cap":1}"#;
    assert_eq!(
        post(addr, "/cap", &github_headers(secret, body, "c-1"), body)
            .await?
            .status,
        200,
        "under the cap"
    );

    // A sender that never finishes its body takes the only slot. If a probe
    // happens to hold the slot when the slow request arrives, the slow one
    // is the one refused: then try again with a new slow sender.
    let mut held = None;
    for _ in 0..20 {
        let mut slow = TcpStream::connect(addr).await?;
        slow.write_all(b"POST /cap HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123")
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = post(addr, "/cap", &github_headers(secret, body, "c-2"), body).await?;
        if r.status == 503 {
            held = Some((slow, r));
            break;
        }
    }
    let (slow, r) = held.context("no 503 while a slow sender held the only slot")?;
    assert_eq!(r.header("retry-after"), Some("3"), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body)?;
    assert_eq!(v, serde_json::json!({"error": "overloaded"}));
    // The slow sender still holds the slot (its body timeout is 30s).
    let r = post(addr, "/cap", &github_headers(secret, body, "c-2"), body).await?;
    assert_eq!(r.status, 503, "{r:?}");

    drop(slow);
    eventually(
        Duration::from_secs(10),
        "stored once the slot is free",
        || {
            let headers = github_headers(secret, body, "c-3");
            async move {
                post(addr, "/cap", &headers, body)
                    .await
                    .is_ok_and(|r| r.status == 200)
            }
        },
    )
    .await?;
    // c-2 may have been stored by an attempt before the slot was taken.
    let stored: Vec<String> = w
        .messages("cap")
        .await?
        .iter()
        .filter_map(|m| {
            m.headers
                .get(wire::DELIVERY_ID)
                .map(|v| v.as_str().to_owned())
        })
        .collect();
    assert!(
        stored.contains(&"c-1".to_owned()) && stored.contains(&"c-3".to_owned()),
        "{stored:?}"
    );
    w.gw.shutdown().await;
    Ok(())
}

/// Replace a file the way the kubelet updates a mounted Secret: write
/// elsewhere, then rename over it.
fn replace(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The endpoints file of [`FileModeGateway`] with `local/gh` at `path`.
fn gh_endpoint(path: &str) -> String {
    endpoint(
        "gh",
        path,
        "{scheme: github, secretRefs: [{name: gh, key: secret}]}",
        "",
    )
    .replace(
        "metadata: {name: gh}",
        "metadata: {name: gh, namespace: local}",
    )
}

/// The real `spillway-gateway` binary in file mode, logging JSON to `log`:
/// one GitHub endpoint `local/gh` at `/gh` whose secret is the file
/// `secret`, its stream created on `nats`.
pub(crate) struct FileModeGateway {
    _dir: tempfile::TempDir,
    endpoints: std::path::PathBuf,
    secret: std::path::PathBuf,
    pub(crate) log: std::path::PathBuf,
    pub(crate) addr: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    pub(crate) stream: jetstream::stream::Stream,
    pub(crate) child: KillOnDrop,
}

impl FileModeGateway {
    /// Start it with the secret `secret_value` and `extra` lines in its
    /// config file (`drainDelay: 0s` unless `extra` sets it); wait until it
    /// is ready.
    async fn start(nats: &NatsServer, secret_value: &str, extra: &str) -> Result<Self> {
        Self::start_with_env(nats, secret_value, extra, &[]).await
    }

    /// Like [`FileModeGateway::start`], with more environment variables.
    pub(crate) async fn start_with_env(
        nats: &NatsServer,
        secret_value: &str,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let mut extra = extra.to_owned();
        if !extra.contains("drainDelay:") {
            extra.push_str("drainDelay: 0s\n");
        }
        let names = EndpointNames::new("local", "gh");
        let stream = nats
            .jetstream()
            .await?
            .create_stream(jetstream::stream::Config {
                name: names.stream(),
                subjects: vec![names.stream_subjects()],
                ..Default::default()
            })
            .await?;
        let dir = tempfile::tempdir()?;
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(secrets.join("gh"))?;
        let secret = secrets.join("gh/secret");
        replace(&secret, &format!("{secret_value}\n"))?;
        let endpoints = dir.path().join("endpoints.yaml");
        replace(&endpoints, &gh_endpoint("/gh"))?;
        let (port, admin_port) = (spillway_tests::free_port(), spillway_tests::free_port());
        std::fs::write(
            dir.path().join("gateway.yaml"),
            format!(
                "listen: 127.0.0.1:{port}\nadminListen: 127.0.0.1:{admin_port}\nsource: file\nendpointsFile: {}\nsecretsDir: {}\npublishTimeout: 1s\n{extra}",
                endpoints.display(),
                secrets.display()
            ),
        )?;
        let log = dir.path().join("gateway.log");
        let child = KillOnDrop(
            std::process::Command::new(spillway_tests::bin_path("spillway-gateway"))
                .arg("--config")
                .arg(dir.path().join("gateway.yaml"))
                .env("SPILLWAY_NATS_URL", &nats.url)
                .env("RUST_LOG", "info")
                .envs(env.iter().copied())
                .stdout(std::fs::File::create(&log)?)
                .stderr(std::process::Stdio::null())
                .spawn()?,
        );
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], admin_port).into();
        eventually(Duration::from_secs(15), "binary ready", || async move {
            http_raw(admin, "GET", "/readyz", &[], b"", true)
                .await
                .is_ok_and(|r| r.status == 200)
        })
        .await
        .with_context(|| {
            format!(
                "not ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        Ok(Self {
            _dir: dir,
            endpoints,
            secret,
            log,
            addr: ([127, 0, 0, 1], port).into(),
            admin,
            stream,
            child,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_in_file_mode_serves_logs_json_and_stops_on_sigterm() -> Result<()> {
    let nats = NatsServer::start().await?;
    let mut gw = FileModeGateway::start(&nats, "It's a Secret to Everybody", "").await?;
    let addr = gw.addr;
    let body = br#"{"zen":"Keep it logically awesome."}"#;
    let r = post(
        addr,
        "/gh",
        &github_headers("It's a Secret to Everybody", body, "bin-1"),
        body,
    )
    .await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(gw.stream.info().await?.state.messages, 1);

    let st = tokio::process::Command::new("kill")
        .args(["-TERM", &gw.child.0.id().to_string()])
        .status()
        .await?;
    assert!(st.success());
    let mut exited = None;
    for _ in 0..100 {
        if let Some(s) = gw.child.0.try_wait()? {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = exited else {
        bail!("gateway did not stop on SIGTERM");
    };
    assert!(status.success(), "{status}");
    let logs = std::fs::read_to_string(&gw.log)?;
    assert!(logs.lines().count() >= 2, "{logs}");
    for line in logs.lines() {
        let v: serde_json::Value = serde_json::from_str(line).context(line.to_owned())?;
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    assert!(logs.contains("gateway stopped"), "{logs}");
    assert!(!logs.contains("It's a Secret"), "no secrets in logs");
    Ok(())
}

/// SIGTERM first turns readiness off while webhooks are still stored, and
/// closes the listener only after `drainDelay`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_sigterm_turns_unready_and_serves_through_the_drain_delay() -> Result<()> {
    let nats = NatsServer::start().await?;
    let secret = "It's a Secret to Everybody";
    let mut gw = FileModeGateway::start(&nats, secret, "drainDelay: 8s\n").await?;
    let (addr, admin) = (gw.addr, gw.admin);
    let st = tokio::process::Command::new("kill")
        .args(["-TERM", &gw.child.0.id().to_string()])
        .status()
        .await?;
    assert!(st.success());
    eventually(
        Duration::from_secs(5),
        "/readyz 503 after SIGTERM",
        || async {
            http_raw(admin, "GET", "/readyz", &[], b"", true)
                .await
                .is_ok_and(|r| r.status == 503)
        },
    )
    .await?;
    let body = br#"{"zen":"Still here."}"#;
    let r = post(addr, "/gh", &github_headers(secret, body, "drain-1"), body).await?;
    assert_eq!(r.status, 200, "served during the drain delay: {r:?}");
    assert_eq!(gw.stream.info().await?.state.messages, 1);
    let mut exited = None;
    for _ in 0..200 {
        if let Some(s) = gw.child.0.try_wait()? {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = exited.context("gateway did not stop after the drain delay")?;
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    let logs = std::fs::read_to_string(&gw.log)?;
    assert!(logs.contains("shutdown requested"), "{logs}");
    assert!(logs.contains("gateway stopped"), "{logs}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_in_file_mode_reloads_changed_files_and_keeps_routes_on_bad_ones() -> Result<()> {
    let nats = NatsServer::start().await?;
    let mut gw = FileModeGateway::start(&nats, "old-secret", "filePollInterval: 200ms\n").await?;
    let (addr, admin) = (gw.addr, gw.admin);
    let body = br#"{"zen":"Reload me."}"#;
    let send = |target: &'static str, secret: &'static str, id: &'static str| async move {
        post(addr, target, &github_headers(secret, body, id), body)
            .await
            .map_or(0, |r| r.status)
    };
    assert_eq!(send("/gh", "old-secret", "r-1").await, 200);

    // The Secret file is rotated: the new signature is accepted, the old
    // one no longer is.
    replace(&gw.secret, "new-secret\n")?;
    eventually(Duration::from_secs(10), "new secret accepted", || async {
        send("/gh", "new-secret", "r-2").await == 200
    })
    .await?;
    assert_eq!(send("/gh", "old-secret", "r-3").await, 401);

    // An invalid endpoints file: reported, routing stays as it was.
    replace(
        &gw.endpoints,
        "kind: WebhookEndpoint\nmetadata: {name: broken}\nspec: {}\n",
    )?;
    let metrics = || async move {
        http_raw(admin, "GET", "/metrics", &[], b"", true)
            .await
            .map(|r| r.body)
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(10), "failed reload counted", || async {
        metrics()
            .await
            .contains(r#"spillway_gateway_file_reloads_total{result="failed"} 1"#)
    })
    .await?;
    assert_eq!(send("/gh", "new-secret", "r-4").await, 200, "route kept");
    assert_eq!(send("/gh", "old-secret", "r-5").await, 401);
    let ready = http_raw(admin, "GET", "/readyz", &[], b"", true).await?;
    assert_eq!(ready.status, 200, "still ready on the previous table");
    // A file that is not there at all: the same.
    std::fs::remove_file(&gw.endpoints)?;
    eventually(Duration::from_secs(10), "missing file counted", || async {
        metrics()
            .await
            .contains(r#"spillway_gateway_file_reloads_total{result="failed"} 2"#)
    })
    .await?;
    assert_eq!(send("/gh", "new-secret", "r-6").await, 200, "route kept");

    // A valid file again, with the endpoint moved: the new path serves.
    replace(&gw.endpoints, &gh_endpoint("/moved"))?;
    eventually(Duration::from_secs(10), "moved endpoint served", || async {
        send("/moved", "new-secret", "r-7").await == 200
    })
    .await?;
    assert_eq!(send("/gh", "new-secret", "r-8").await, 404);
    let m = metrics().await;
    assert!(
        m.contains(r#"spillway_gateway_file_reloads_total{result="applied"} 2"#),
        "{m}"
    );
    assert!(m.contains("spillway_gateway_routes 1"), "{m}");

    assert_eq!(
        gw.stream.info().await?.state.messages,
        5,
        "r-1, r-2, r-4, r-6 and r-7 stored"
    );
    let logs = std::fs::read_to_string(&gw.log)?;
    assert!(
        logs.contains("keeping the previous routing table"),
        "{logs}"
    );
    assert!(
        !logs.contains("old-secret") && !logs.contains("new-secret"),
        "no secrets in logs"
    );
    Ok(())
}

/// Twilio's JSON variant: the body is not in the signature; the signed URL
/// carries `bodySHA256`, which the body must hash to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_json_is_checked_through_the_signed_body_sha256() -> Result<()> {
    use sha2::{Digest, Sha256};
    let w = World::new("gw-twilio-json").await?;
    let public = "https://hooks.example.com/e/twilio-json";
    w.apply(
        &(secrets_yaml()
            + &endpoint(
                "twilio-json",
                "/e/twilio-json",
                &format!(
                    "{{scheme: twilio, publicUrl: \"{public}\", secretRefs: [{{name: keys, key: twilio}}]}}"
                ),
                "",
            )),
    ).await?;
    w.stream("twilio-json", -1).await?;
    w.routed("/e/twilio-json").await?;
    let sign_url =
        |url: &str| B64.encode(sign(ring_alg::SHA1, b"twilio-auth", &[url.as_bytes()]).as_ref());
    let json = |body: &[u8], query: &str, sig: Option<&str>| {
        let mut h = h(&[("Content-Type", "application/json")]);
        if let Some(sig) = sig {
            h.push(("X-Twilio-Signature".into(), sig.into()));
        }
        (format!("/e/twilio-json?{query}"), h, body.to_vec())
    };
    let body = br#"{"CallSid":"CA1","CallStatus":"completed"}"#;
    let digest = hex(&Sha256::digest(body));
    let query = format!("bodySHA256={digest}");
    let sig = sign_url(&format!("{public}?{query}"));

    let (target, headers, b) = json(body, &query, Some(&sig));
    let r = post(w.addr(), &target, &headers, &b).await?;
    assert_eq!(r.status, 200, "{r:?}");
    let msgs = w.messages("twilio-json").await?;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].payload.as_ref(), body, "raw JSON body stored");
    assert_eq!(
        msgs[0]
            .headers
            .get(wire::DELIVERY_ID)
            .map(|v| v.as_str().to_owned()),
        Some(digest.clone()),
        "no idempotency token: the delivery id is the body's SHA-256"
    );

    let tampered = br#"{"CallSid":"CA1","CallStatus":"failed"}"#;
    let tampered_digest = hex(&Sha256::digest(tampered));
    for (what, body, query, sig, reason) in [
        (
            "body changed, signed digest kept",
            &tampered[..],
            query.clone(),
            Some(sig.clone()),
            "bad_signature",
        ),
        (
            "digest in the URL replaced, signature of the old URL",
            &tampered[..],
            format!("bodySHA256={tampered_digest}"),
            Some(sig.clone()),
            "bad_signature",
        ),
        (
            "signature made with another auth token",
            &body[..],
            query.clone(),
            Some(
                B64.encode(
                    sign(
                        ring_alg::SHA1,
                        b"wrong-secret",
                        &[format!("{public}?{query}").as_bytes()],
                    )
                    .as_ref(),
                ),
            ),
            "bad_signature",
        ),
        (
            "no signature",
            &body[..],
            query.clone(),
            None,
            "missing_signature",
        ),
    ] {
        let (target, headers, b) = json(body, &query, sig.as_deref());
        let r = post(w.addr(), &target, &headers, &b).await?;
        assert_eq!(r.status, 401, "{what}: {r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.body)?;
        assert_eq!(v, serde_json::json!({ "error": reason }), "{what}");
    }
    assert_eq!(w.count("twilio-json").await?, 1, "nothing else stored");
    w.gw.shutdown().await;
    Ok(())
}

/// Slow-body exhaustion: 256 senders, each declaring a 1 MiB body, sending
/// all of it but the last byte and then stalling. The gateway binary's
/// memory grows by no more than its body budget (plus fixed overhead), and
/// a signed provider request sent in the middle of the attack is accepted:
/// large bodies may hold only half of the request slots and three quarters
/// of the budget. (Before: every slot and ~256 MiB were theirs, and the
/// provider got 503.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_large_bodies_cannot_exhaust_the_gateway() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BUDGET: u64 = 32 * 1024 * 1024;
    const BODY: usize = 1024 * 1024;
    let secret = "It's a Secret to Everybody";
    let nats = NatsServer::start().await?;
    let mut gw = FileModeGateway::start(
        &nats,
        secret,
        &format!("bodyBudgetBytes: {BUDGET}\nmaxConcurrentRequests: 256\nbodyTimeout: 15s\n"),
    )
    .await?;
    let pid = gw.child.0.id();
    let kib = |field: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let before = kib("VmRSS:");
    let addr = gw.addr;
    let attackers: Vec<_> = (0..256)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut c) = tokio::net::TcpStream::connect(addr).await else {
                    return;
                };
                let head = format!(
                    "POST /gh HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {BODY}\r\n\r\n"
                );
                if c.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0;
                while sent < BODY - 1 {
                    let n = chunk.len().min(BODY - 1 - sent);
                    if c.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
                // Stall with the last byte unsent, until answered or 8 s.
                let mut answer = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(8), c.read(&mut answer)).await;
            })
        })
        .collect();
    // The attack in place, a provider's webhook arrives.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let body = br#"{"zen":"Responsive is better than fast."}"#;
    let r = post(
        addr,
        "/gh",
        &github_headers(secret, body, "during-attack"),
        body,
    )
    .await?;
    assert_eq!(
        r.status, 200,
        "the provider is served during the attack: {r:?}"
    );
    for a in attackers {
        let _ = a.await;
    }
    let peak = kib("VmHWM:");
    let grown = peak.saturating_sub(before) * 1024;
    assert!(
        grown < BUDGET + 32 * 1024 * 1024,
        "memory grew by {} MiB (budget {} MiB, before {} MiB)",
        grown / (1024 * 1024),
        BUDGET / (1024 * 1024),
        before / 1024
    );
    assert_eq!(
        gw.stream.info().await?.state.messages,
        1,
        "only the provider's"
    );
    Ok(())
}

/// A body trickling in slower than the minimum rate is cut off soon after
/// the 2 s grace with 408, long before the body timeout (10 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_slower_than_the_minimum_rate_get_408_after_the_grace() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let nats = NatsServer::start().await?;
    let gw = FileModeGateway::start(
        &nats,
        "It's a Secret to Everybody",
        "bodyTimeout: 10s\nminBodyBytesPerSecond: 4096\n",
    )
    .await?;
    let mut c = tokio::net::TcpStream::connect(gw.addr).await?;
    c.write_all(b"POST /gh HTTP/1.1\r\nHost: x\r\nContent-Length: 10240\r\n\r\n")
        .await?;
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            n = c.read(&mut buf) => {
                let n = n.unwrap_or(0);
                if n == 0 { break; }
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") { break; }
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                // One byte every 250 ms: 4 B/s, far below 4 KiB/s.
                if c.write_all(b"x").await.is_err() { break; }
            }
        }
        if started.elapsed() > Duration::from_secs(9) {
            bail!("no answer within 9 s");
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "cut off after {took:?}"
    );
    Ok(())
}

/// One client address cannot take every request slot (issue 15.2): with
/// `maxRequestsPerClient: 4`, a fifth request from an address whose four
/// stall gets 429 `client_busy` before its body is read, and a provider's
/// signed webhook from another address is stored meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_gets_its_share_of_slots() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let secret = "It's a Secret to Everybody";
    let nats = NatsServer::start().await?;
    let mut gw = FileModeGateway::start(
        &nats,
        secret,
        "maxRequestsPerClient: 4\nmaxConcurrentRequests: 8\nbodyTimeout: 10s\nminBodyBytesPerSecond: 0\n",
    )
    .await?;
    let addr = gw.addr;
    // Four requests from 127.0.0.1 that declare a body and never send it.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(addr).await?;
        c.write_all(b"POST /gh HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            .await?;
        stalled.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let body = br#"{"zen":"Keep it logically awesome."}"#;
    let fifth = post(addr, "/gh", &github_headers(secret, body, "fifth"), body).await?;
    assert_eq!(fifth.status, 429, "{fifth:?}");
    assert!(fifth.body.contains("client_busy"), "{fifth:?}");
    assert!(
        fifth
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("retry-after")),
        "{fifth:?}"
    );
    // Another address still finds a slot.
    let other = post_from(
        "127.0.0.2".parse()?,
        addr,
        "/gh",
        &github_headers(secret, body, "provider"),
        body,
    )
    .await?;
    assert_eq!(other.status, 200, "{other:?}");
    // The stalled ones give their slots back: 127.0.0.1 is served again.
    drop(stalled);
    let mut again = None;
    for _ in 0..50 {
        let r = post(addr, "/gh", &github_headers(secret, body, "later"), body).await?;
        if r.status == 200 {
            again = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "slots given back");
    assert_eq!(gw.stream.info().await?.state.messages, 2);
    Ok(())
}

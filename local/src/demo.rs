//! The demo: a sink that counts what it receives, the examples rewritten to
//! deliver to it, and sample webhooks signed the way each provider signs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::Value;
use spillway_api::{GenericHmac, Scheme};
use spillway_cli::sign;

/// Deliveries received by the demo sink, per endpoint name.
#[derive(Clone, Default)]
pub struct Sink {
    pub received: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
}

impl Sink {
    /// Serve on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) {
        async fn hook(
            State(s): State<Sink>,
            UrlPath(name): UrlPath<String>,
            headers: HeaderMap,
            _body: axum::body::Bytes,
        ) -> &'static str {
            let id = headers
                .get("spillway-delivery-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            s.received
                .lock()
                .expect("sink lock")
                .entry(name)
                .or_default()
                .push(id);
            "ok"
        }
        let app = Router::new().route("/{name}", post(hook)).with_state(self);
        let _ = axum::serve(listener, app).await;
    }

    pub fn total(&self) -> usize {
        self.received
            .lock()
            .expect("sink lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    pub fn snapshot(&self) -> BTreeMap<String, usize> {
        self.received
            .lock()
            .expect("sink lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect()
    }
}

/// One example file's endpoint, its secrets and its manifests as applied.
pub struct Example {
    pub name: String,
    /// WebhookListeners of the endpoint in the same file.
    pub listeners: Vec<String>,
    pub path: String,
    pub scheme: String,
    pub secret: Option<Vec<u8>>,
    pub public_url: Option<String>,
    /// Generic HMAC settings, for scheme `hmac`.
    pub hmac: Option<GenericHmac>,
    /// Manifests (Secrets and the endpoint) to apply, as JSON.
    pub docs: Vec<Value>,
}

/// Read `examples/*.yaml`, pointing each endpoint's sink at the demo sink.
pub fn load_examples(dir: &std::path::Path, namespace: &str, sink: &str) -> Result<Vec<Example>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f)?;
        let mut docs: Vec<Value> = serde_saphyr::from_multiple(&text)
            .with_context(|| format!("parsing {}", f.display()))?;
        docs.retain(|d| !d.is_null());
        // Listeners deliver to the demo sink too, each under its own name.
        let mut listeners = Vec::new();
        for l in docs.iter_mut().filter(|d| d["kind"] == "WebhookListener") {
            let lname = l["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            l["spec"]["sink"] = serde_json::json!({"url": format!("{sink}/{lname}")});
            listeners.push(lname);
        }
        let Some(ep) = docs.iter_mut().find(|d| d["kind"] == "WebhookEndpoint") else {
            continue;
        };
        let name = ep["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        ep["spec"]["processor"]["sink"] = serde_json::json!({"url": format!("{sink}/{name}")});
        let spec = ep["spec"].clone();
        let path = spec["path"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| spillway_api::names::default_path(namespace, &name));
        let scheme = spec["verification"]["scheme"]
            .as_str()
            .unwrap_or("none")
            .to_owned();
        let first_ref = &spec["verification"]["secretRefs"][0];
        let secret = docs.iter().find_map(|d| {
            (d["kind"] == "Secret" && d["metadata"]["name"] == first_ref["name"])
                .then(|| d["stringData"][first_ref["key"].as_str()?].as_str())
                .flatten()
                .map(|s| s.as_bytes().to_vec())
        });
        let public_url = spec["verification"]["publicUrl"]
            .as_str()
            .map(str::to_owned);
        let hmac = serde_json::from_value(spec["verification"]["hmac"].clone()).ok();
        out.push(Example {
            name,
            listeners,
            path,
            scheme,
            secret,
            public_url,
            hmac,
            docs,
        });
    }
    Ok(out)
}

/// A request to send, and what the gateway should answer.
pub struct Sample {
    pub endpoint: String,
    pub case: &'static str,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub expect: u16,
    /// Deliveries the sink should see (one per listener that selects it).
    pub delivers: usize,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Headers a provider would send for `body`, signed with the example's
/// secret at `ts` (the CLI's `spillway send` signer).
pub fn provider_headers(
    ex: &Example,
    body: &[u8],
    ts: u64,
    id: &str,
) -> Option<Vec<(String, String)>> {
    let scheme = sign::parse_scheme(&ex.scheme).ok()?;
    let content_type = if scheme == Scheme::Twilio {
        "application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    let req = sign::Request {
        body,
        content_type,
        now: i64::try_from(ts).ok()?,
        id,
        url: ex.public_url.as_deref().unwrap_or_default(),
    };
    let secret = ex.secret.as_deref().unwrap_or_default();
    let mut headers = sign::headers(scheme, secret, &req, ex.hmac.as_ref()).ok()?;
    headers.push(("content-type".into(), content_type.into()));
    // Ids the schemes above do not carry in a signed header.
    match scheme {
        Scheme::Gitlab => headers.push(("x-gitlab-event-uuid".into(), id.into())),
        Scheme::Twilio => headers.push(("i-twilio-idempotency-token".into(), id.into())),
        Scheme::None => headers.push(("x-request-id".into(), id.into())),
        _ => {}
    }
    Some(headers)
}

/// The delivery id of the GitHub webhook the demo sends twice (the second
/// is deduplicated); `make run`'s summary shows its attempts.
pub const RETRIED_ID: &str = "demo-retry";

/// The sample requests: one good webhook per example, a provider retry of
/// one of them, and requests the gateway must refuse.
pub fn samples(examples: &[Example]) -> Vec<Sample> {
    let ts = now();
    let mut out = Vec::new();
    for (i, ex) in examples.iter().enumerate() {
        let id = format!("demo-{}-{i}", ex.name);
        let body = if ex.scheme == "twilio" {
            b"Body=Hello&From=%2B15005550006&MessageSid=SM1&To=%2B15005550001".to_vec()
        } else {
            serde_json::json!({"id": id, "type": "demo", "data": {"object": {"customer": "cus_demo"}}})
                .to_string()
                .into_bytes()
        };
        let Some(headers) = provider_headers(ex, &body, ts, &id) else {
            continue;
        };
        out.push(Sample {
            endpoint: ex.name.clone(),
            case: "signed webhook",
            path: ex.path.clone(),
            headers,
            body,
            expect: 0,
            delivers: 1,
        });
    }
    if let Some(gh) = examples.iter().find(|e| e.scheme == "github") {
        let body = br#"{"zen":"Keep it logically awesome."}"#.to_vec();
        let headers = provider_headers(gh, &body, ts, RETRIED_ID).unwrap_or_default();
        for case in ["provider retry (1st)", "provider retry (2nd, deduplicated)"] {
            out.push(Sample {
                endpoint: gh.name.clone(),
                case,
                path: gh.path.clone(),
                headers: headers.clone(),
                body: body.clone(),
                expect: 0,
                delivers: usize::from(case.ends_with("(1st)")),
            });
        }
        // The listeners of examples/github.yaml: `push` to CI, opened
        // issues to the bot; a closed issue reaches only the endpoint's own
        // processor.
        let with_listeners = |n: usize| 1 + n * usize::from(!gh.listeners.is_empty());
        for (case, event, body, listeners) in [
            (
                "push event (+ listener ci)",
                "push",
                r#"{"ref":"refs/heads/main"}"#,
                1,
            ),
            (
                "issue opened (+ listener bot)",
                "issues",
                r#"{"action":"opened"}"#,
                1,
            ),
            (
                "issue closed (filtered out)",
                "issues",
                r#"{"action":"closed"}"#,
                0,
            ),
        ] {
            let id = format!("demo-{event}-{listeners}");
            let mut h = provider_headers(gh, body.as_bytes(), ts, &id).unwrap_or_default();
            h.retain(|(k, _)| !k.eq_ignore_ascii_case("x-github-event"));
            h.push(("x-github-event".into(), event.into()));
            out.push(Sample {
                endpoint: gh.name.clone(),
                case,
                path: gh.path.clone(),
                headers: h,
                body: body.as_bytes().to_vec(),
                expect: 0,
                delivers: with_listeners(listeners),
            });
        }
        let mut tampered = headers.clone();
        tampered.retain(|(k, _)| k != "x-github-delivery");
        tampered.push(("x-github-delivery".into(), "demo-tampered".into()));
        out.push(Sample {
            endpoint: gh.name.clone(),
            case: "tampered body",
            path: gh.path.clone(),
            headers: tampered,
            body: br#"{"zen":"Give me all your money."}"#.to_vec(),
            expect: 401,
            delivers: 0,
        });
        out.push(Sample {
            endpoint: gh.name.clone(),
            case: "missing signature",
            path: gh.path.clone(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.clone(),
            expect: 401,
            delivers: 0,
        });
    }
    if let Some(st) = examples.iter().find(|e| e.scheme == "stripe") {
        let body = br#"{"id":"evt_stale"}"#.to_vec();
        out.push(Sample {
            endpoint: st.name.clone(),
            case: "replayed (stale timestamp)",
            path: st.path.clone(),
            headers: provider_headers(st, &body, ts - 3600, "evt_stale").unwrap_or_default(),
            body,
            expect: 401,
            delivers: 0,
        });
    }
    if let Some(sl) = examples.iter().find(|e| e.scheme == "slack") {
        let body =
            br#"{"type":"url_verification","challenge":"demo-challenge","token":"x"}"#.to_vec();
        out.push(Sample {
            endpoint: sl.name.clone(),
            case: "url_verification handshake",
            path: sl.path.clone(),
            headers: provider_headers(sl, &body, ts, "hs").unwrap_or_default(),
            body,
            expect: 200,
            delivers: 0,
        });
    }
    if let Some(tw) = examples.iter().find(|e| e.scheme == "twitch") {
        // Twitch's signed subscription check: answered with the challenge
        // only because it verifies, and never delivered.
        let body = br#"{"challenge":"demo-twitch-challenge","subscription":{"type":"channel.follow","version":"2","status":"webhook_callback_verification_pending"}}"#.to_vec();
        let mut headers =
            provider_headers(tw, &body, ts, "demo-twitch-handshake").unwrap_or_default();
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("twitch-eventsub-message-type"));
        headers.push((
            "twitch-eventsub-message-type".into(),
            "webhook_callback_verification".into(),
        ));
        out.push(Sample {
            endpoint: tw.name.clone(),
            case: "webhook_callback_verification",
            path: tw.path.clone(),
            headers,
            body,
            expect: 200,
            delivers: 0,
        });
    }
    out.push(Sample {
        endpoint: "-".into(),
        case: "unknown path",
        path: "/no/such/endpoint".into(),
        headers: vec![],
        body: b"{}".to_vec(),
        expect: 404,
        delivers: 0,
    });
    out
}

/// POST one sample with a minimal HTTP/1.1 client (loopback only).
pub async fn send(gateway: std::net::SocketAddr, s: &Sample) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway).await?;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nhost: {gateway}\r\nconnection: close\r\ncontent-length: {}\r\n",
        s.path,
        s.body.len()
    );
    for (k, v) in &s.headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await?;
    stream.write_all(&s.body).await?;
    let mut resp = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(15),
        stream.read_to_end(&mut resp),
    )
    .await
    .context("gateway did not answer within 15s")??;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP response")?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

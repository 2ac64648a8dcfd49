//! The HTTP side of a delivery: which headers go to the sink, and one POST.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderName, HeaderValue};
use spillway_api::stored;

use crate::outcome::{AttemptResult, parse_retry_after};
use crate::signing::{self, Signer};

/// Outgoing header carrying the attempt number (1 for the first delivery).
pub const ATTEMPT: &str = "Spillway-Attempt";

/// Most bytes of a sink's response body kept for logs and dead letters.
const EXCERPT_BYTES: usize = 256;
/// Most of a response body read to keep the connection reusable; a longer
/// body is left unread and the connection closed.
const DRAIN_BYTES: usize = 64 * 1024;

/// Original request headers never forwarded to the sink (hop-by-hop or
/// describing the original connection), even if the gateway kept them.
const NOT_FORWARDED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
];

/// Build a reqwest client for the sink: bounded timeouts, a pool sized to
/// the concurrency, no redirects, ring-based rustls.
pub fn client(timeout: Duration, pool: usize) -> Result<reqwest::Client, reqwest::Error> {
    // Ignore "already installed": any installed provider will do.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_max_idle_per_host(pool)
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("spillway-processor/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The headers of the HTTP request for a stored webhook: the provider's
/// (less hop-by-hop ones), Spillway's delivery id, receive time, ordering
/// key and tracestate, the Content-Type, the attempt and the traceparent.
pub fn outgoing_headers(
    webhook: &stored::Webhook,
    attempt: u32,
    traceparent: &str,
) -> reqwest::header::HeaderMap {
    let mut out = reqwest::header::HeaderMap::new();
    for (name, value) in &webhook.headers {
        if NOT_FORWARDED.iter().any(|h| h.eq_ignore_ascii_case(name)) {
            continue;
        }
        if let (Ok(hn), Ok(hv)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.append(hn, hv);
        }
    }
    for (name, value) in [
        ("spillway-delivery-id", &webhook.delivery_id),
        ("spillway-received-at", &webhook.received_at),
        ("spillway-ordering-key", &webhook.ordering_key),
        ("tracestate", &webhook.tracestate),
        ("content-type", &webhook.content_type),
    ] {
        if let Some(hv) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            out.insert(HeaderName::from_static(name), hv);
        }
    }
    out.insert(
        HeaderName::from_static("spillway-attempt"),
        HeaderValue::from(attempt),
    );
    if let Ok(hv) = HeaderValue::from_str(traceparent) {
        out.insert(HeaderName::from_static("traceparent"), hv);
    }
    out
}

/// Add Standard Webhooks signature headers (replacing any forwarded ones).
pub fn sign(headers: &mut reqwest::header::HeaderMap, signer: &Signer, id: &str, body: &[u8]) {
    let ts = jiff::Timestamp::now().as_second();
    let sig = signer.sign(id, ts, body);
    for (name, value) in [
        (signing::WEBHOOK_ID, id.to_owned()),
        (signing::WEBHOOK_TIMESTAMP, ts.to_string()),
        (signing::WEBHOOK_SIGNATURE, sig),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }
}

/// POST once and classify the result (the client's timeout bounds it).
pub async fn post(
    client: &reqwest::Client,
    url: &reqwest::Url,
    headers: reqwest::header::HeaderMap,
    body: impl Into<reqwest::Body>,
) -> AttemptResult {
    let resp = client
        .post(url.clone())
        .headers(headers)
        .body(body)
        .send()
        .await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return classify_error(e),
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    // Read the body (so the connection can be reused) but keep only the
    // excerpt, and stop after DRAIN_BYTES: a sink answering with a huge
    // body costs a closed connection, not memory. A body that does not
    // arrive in time makes the attempt a timeout unless the status already
    // says success.
    let mut kept = Vec::new();
    let mut seen = 0usize;
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                let room = EXCERPT_BYTES.saturating_sub(kept.len());
                kept.extend_from_slice(&c[..c.len().min(room)]);
                seen += c.len();
                if seen > DRAIN_BYTES {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) if !(200..300).contains(&status) => return classify_error(e),
            Err(_) => break,
        }
    }
    let excerpt = excerpt(&kept);
    AttemptResult::Response {
        status,
        retry_after,
        excerpt,
    }
}

/// Classify a transport error. The URL is left out of the text: it may hold
/// credentials.
fn classify_error(e: reqwest::Error) -> AttemptResult {
    let e = e.without_url();
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    if e.is_timeout() {
        AttemptResult::Timeout
    } else if e.is_connect() {
        AttemptResult::Connect(msg)
    } else {
        AttemptResult::Transport(msg)
    }
}

/// A short printable excerpt of a response body.
pub fn excerpt(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(EXCERPT_BYTES)]);
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_api::wire;

    /// A sink answering 200 with an endless body: the attempt is a 200 with
    /// the body's first bytes as excerpt, not a read until the timeout
    /// (which left no excerpt) or memory without bound.
    #[tokio::test]
    async fn an_endless_response_body_is_not_read_to_the_end() {
        use axum::body::Body;
        let app = axum::Router::new().route(
            "/",
            axum::routing::post(|| async {
                let chunk = axum::body::Bytes::from(vec![b'x'; 16 * 1024]);
                let endless =
                    futures::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
                Body::from_stream(endless)
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = client(Duration::from_secs(3), 1).unwrap();
        let url = reqwest::Url::parse(&format!("http://{addr}/")).unwrap();
        match post(&client, &url, reqwest::header::HeaderMap::new(), "{}").await {
            AttemptResult::Response {
                status, excerpt, ..
            } => {
                assert_eq!(status, 200);
                assert_eq!(excerpt.len(), EXCERPT_BYTES, "{excerpt:?}");
                assert!(excerpt.bytes().all(|b| b == b'x'));
            }
            other => panic!("{other:?}"),
        }
    }

    /// A format-1 message's headers.
    fn stored_v1() -> async_nats::HeaderMap {
        let mut h = async_nats::HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, "gh-123");
        h.insert(wire::DELIVERY_ID, "gh-123");
        h.insert(wire::CONTENT_TYPE, "application/json");
        h.insert(wire::ENDPOINT, "default/gh");
        h.insert(wire::RECEIVED_AT, "2026-12-06T09:00:00.123Z");
        h.insert("Spillway-Orig-X-GitHub-Event", "push");
        h.insert("spillway-orig-x-lower", "yes");
        h.insert("Spillway-Orig-Host", "evil.example");
        h.insert("Spillway-Orig-Content-Length", "999");
        h.insert("Spillway-Orig-", "empty");
        h.insert("X-Not-Original", "no");
        h.insert(wire::TRACESTATE, "congo=t61rcWkgMzE");
        h
    }

    fn stored() -> stored::Webhook {
        stored::decode(Some(&stored_v1()), b"{}").unwrap()
    }

    /// The same webhook in format 2.
    fn stored_v2() -> (async_nats::HeaderMap, Vec<u8>) {
        let meta = stored::Metadata {
            endpoint: "default/gh",
            delivery_id: "gh-123",
            received_at: "2026-12-06T09:00:00.123Z",
            content_type: Some("application/json"),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
            tracestate: Some("congo=t61rcWkgMzE"),
            ordering_key: None,
        };
        let headers = [
            ("x-github-event", "push"),
            ("x-lower", "yes"),
            ("host", "evil.example"),
            ("content-length", "999"),
        ];
        let mut h = async_nats::HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, "provider:gh-123");
        (h, stored::encode(&meta, headers.into_iter(), b"{}"))
    }

    #[test]
    fn forwards_original_headers_without_prefix_and_spillway_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (h2, p2) = stored_v2();
        let v2 = stored::decode(Some(&h2), &p2).unwrap();
        assert_eq!(v2.format, Some(stored::Format::V2));
        // Both formats give the sink the same request headers.
        assert_eq!(
            outgoing_headers(&v2, 3, tp),
            outgoing_headers(&stored(), 3, tp)
        );
        let h = outgoing_headers(&stored(), 3, tp);
        assert_eq!(h.get("x-github-event").unwrap(), "push");
        assert_eq!(h.get("x-lower").unwrap(), "yes");
        assert_eq!(h.get("content-type").unwrap(), "application/json");
        assert_eq!(h.get("spillway-delivery-id").unwrap(), "gh-123");
        assert_eq!(h.get("spillway-attempt").unwrap(), "3");
        assert_eq!(h.get("traceparent").unwrap(), tp);
        assert_eq!(h.get("tracestate").unwrap(), "congo=t61rcWkgMzE");
        for absent in [
            "host",
            "content-length",
            "x-not-original",
            "nats-msg-id",
            "spillway-endpoint",
        ] {
            assert!(h.get(absent).is_none(), "{absent} must not be forwarded");
        }
    }

    #[test]
    fn signing_replaces_forwarded_signature_headers() {
        let mut s = stored();
        s.headers
            .push(("Webhook-Signature".into(), "v1,provider".into()));
        let mut h = outgoing_headers(&s, 1, "x");
        let signer = Signer::new(b"key");
        sign(&mut h, &signer, "gh-123", b"{}");
        let sigs: Vec<_> = h.get_all("webhook-signature").iter().collect();
        assert_eq!(sigs.len(), 1);
        let ts: i64 = h
            .get("webhook-timestamp")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(sigs[0].to_str().unwrap(), signer.sign("gh-123", ts, b"{}"));
        assert_eq!(h.get("webhook-id").unwrap(), "gh-123");
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        assert_eq!(excerpt(b"bad\r\nrequest"), "bad  request");
        assert_eq!(excerpt(&[b'a'; 1000]).len(), EXCERPT_BYTES);
    }
}

//! The stored message: which request headers are kept, the trace context,
//! the ordering key, and the NATS headers and payload of a stored webhook
//! (`spillway_api::stored` writes format 2; format 1 is written here until
//! the operator says every processor reads format 2).

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use spillway_api::names::partition_of;
use spillway_api::trace;
use spillway_api::{stored, wire};

use crate::delivery;
use crate::route::Route;

/// Headers never copied into the stored message.
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-type",
    "cookie",
    "set-cookie",
    "authorization",
    "traceparent",
    "tracestate",
    // GitLab sends the shared secret itself.
    "x-gitlab-token",
];

/// `x-github-event` → `Spillway-Orig-X-Github-Event`: the stored name of
/// an original header (one allocation).
fn stored_name(name: &str) -> String {
    let mut out = String::with_capacity(wire::ORIGINAL_HEADER_PREFIX.len() + name.len());
    out.push_str(wire::ORIGINAL_HEADER_PREFIX);
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper { c.to_ascii_uppercase() } else { c });
        upper = c == '-';
    }
    out
}

/// The request's valid `traceparent`, or a new trace.
fn traceparent(headers: &HeaderMap) -> String {
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(trace::TraceParent::parse)
        .unwrap_or_else(trace::root)
        .header()
}

/// Longest `tracestate` kept (the W3C limit is 32 members of at most 256
/// characters; 512 bytes covers what tracers send in practice).
const MAX_TRACESTATE_BYTES: usize = 512;

/// The request's `tracestate`, when it is printable ASCII of bounded size.
fn tracestate(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("tracestate")?.to_str().ok()?.trim();
    (!v.is_empty()
        && v.len() <= MAX_TRACESTATE_BYTES
        && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
    .then_some(v)
}

/// Longest ordering key stored (and partitioned on) as it is.
pub const MAX_ORDERING_KEY_BYTES: usize = 256;

/// The ordering key as stored in `Spillway-Ordering-Key` and partitioned on.
/// A key with control characters (which cannot be a NATS header value) or
/// longer than [`MAX_ORDERING_KEY_BYTES`] is replaced by `sha256:<hex>` of
/// its bytes: equal keys still land on the same partition, and the header
/// stays small and valid.
pub fn safe_ordering_key(key: String) -> String {
    if key.len() <= MAX_ORDERING_KEY_BYTES && !key.chars().any(char::is_control) {
        key
    } else {
        format!("sha256:{}", delivery::body_hash(key.as_bytes()))
    }
}

pub(crate) fn ordering_key(
    route: &Route,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<(String, u16)> {
    let o = route.ordering.as_ref()?;
    let key = if let Some(h) = &o.key_header {
        headers.get(h.as_str())?.to_str().ok()?.to_owned()
    } else {
        let p = o.key_json_pointer.as_deref()?;
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        match v.pointer(p)? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => return None,
            other => other.to_string(),
        }
    };
    let key = safe_ordering_key(key);
    let p = partition_of(key.as_bytes(), o.partitions);
    Some((key, p))
}

/// The fixed header names, built once (a `&str` name is validated,
/// matched against the standard names and copied on every insert).
mod names {
    use async_nats::header::HeaderName;
    use spillway_api::wire;
    pub const ENDPOINT: HeaderName = HeaderName::from_static(wire::ENDPOINT);
    pub const DELIVERY_ID: HeaderName = HeaderName::from_static(wire::DELIVERY_ID);
    pub const NATS_MSG_ID: HeaderName = HeaderName::from_static(wire::NATS_MSG_ID);
    pub const RECEIVED_AT: HeaderName = HeaderName::from_static(wire::RECEIVED_AT);
    pub const CONTENT_TYPE: HeaderName = HeaderName::from_static(wire::CONTENT_TYPE);
    pub const TRACEPARENT: HeaderName = HeaderName::from_static(wire::TRACEPARENT);
    pub const TRACESTATE: HeaderName = HeaderName::from_static(wire::TRACESTATE);
    pub const ORDERING_KEY: HeaderName = HeaderName::from_static(wire::ORDERING_KEY);
}

/// `now` in RFC 3339 with milliseconds, UTC (`2026-12-06T09:00:00.123Z`),
/// as `{now:.3}` prints it; the part up to the second is formatted once per
/// second per thread.
fn received_at(now: jiff::Timestamp) -> String {
    use std::cell::RefCell;
    thread_local!(static SECOND: RefCell<(i64, String)> = const { RefCell::new((i64::MIN, String::new())) });
    let millis = now.subsec_millisecond();
    if millis < 0 {
        return format!("{now:.3}");
    }
    SECOND.with_borrow_mut(|(second, prefix)| {
        if *second != now.as_second() {
            *second = now.as_second();
            *prefix = format!("{now:.0}");
            prefix.pop(); // the `Z`
        }
        let mut out = String::with_capacity(prefix.len() + 5);
        out.push_str(prefix);
        out.push('.');
        let m = u8::try_from(millis / 100).unwrap_or(0);
        out.push(char::from(b'0' + m));
        out.push(char::from(
            b'0' + u8::try_from(millis / 10 % 10).unwrap_or(0),
        ));
        out.push(char::from(b'0' + u8::try_from(millis % 10).unwrap_or(0)));
        out.push('Z');
        out
    })
}

/// Whether a request header is stored (hop-by-hop, credentials, what the
/// metadata holds and the endpoint's `redactHeaders` are not).
fn kept(route: &Route, name: &str) -> bool {
    !DROPPED_HEADERS.contains(&name) && !route.redact_headers.iter().any(|r| r == name)
}

/// What a stored webhook is made of besides its body.
#[derive(Clone, Copy)]
pub struct Accepted<'a> {
    /// The endpoint's route.
    pub route: &'a Route,
    /// The request's headers.
    pub headers: &'a HeaderMap,
    /// Its delivery and deduplication ids.
    pub ids: &'a delivery::Ids,
    /// Its ordering key, when the endpoint is ordered.
    pub ordering: Option<&'a str>,
    /// When it was accepted.
    pub now: jiff::Timestamp,
    /// The exported publish span: the stored `traceparent`, else the
    /// request's valid one or a new trace.
    pub trace: Option<&'a trace::TraceParent>,
}

/// The NATS headers and payload of a stored webhook, in the endpoint's
/// stored format (`Route::stored_format`, see `spillway_api::stored`).
pub fn stored_message(a: &Accepted<'_>, body: Bytes) -> (async_nats::HeaderMap, Bytes) {
    let Accepted {
        route,
        headers,
        ids,
        ordering,
        now,
        trace,
    } = *a;
    if route.stored_format < 2 {
        return (message_headers_v1(a), body);
    }
    let mut h = async_nats::HeaderMap::new();
    if let Some(id) = &ids.msg_id {
        h.insert(names::NATS_MSG_ID, id.as_str());
    }
    let received_at = received_at(now);
    let traceparent = trace.map_or_else(|| traceparent(headers), trace::TraceParent::header);
    let meta = stored::Metadata {
        endpoint: &route.endpoint,
        delivery_id: &ids.delivery_id,
        received_at: &received_at,
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
        traceparent: &traceparent,
        tracestate: tracestate(headers),
        ordering_key: ordering,
    };
    let mut originals = Vec::with_capacity(headers.len());
    originals.extend(headers.iter().filter_map(|(name, value)| {
        let n = name.as_str();
        kept(route, n).then_some(())?;
        Some((n, value.to_str().ok()?))
    }));
    let payload = stored::encode(&meta, originals.iter().copied(), &body);
    (h, Bytes::from(payload))
}

/// Format 1 (for endpoints whose `status.storedFormat` is not 2 yet):
/// every field a NATS header, the provider's under `Spillway-Orig-`.
pub fn message_headers_v1(a: &Accepted<'_>) -> async_nats::HeaderMap {
    let (route, headers, ids) = (a.route, a.headers, a.ids);
    let mut h = async_nats::HeaderMap::new();
    h.insert(names::ENDPOINT, route.endpoint.as_str());
    h.insert(names::DELIVERY_ID, ids.delivery_id.as_str());
    if let Some(id) = &ids.msg_id {
        h.insert(names::NATS_MSG_ID, id.as_str());
    }
    h.insert(names::RECEIVED_AT, received_at(a.now));
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        h.insert(names::CONTENT_TYPE, ct);
    }
    h.insert(
        names::TRACEPARENT,
        a.trace
            .map_or_else(|| traceparent(headers), trace::TraceParent::header),
    );
    if let Some(ts) = tracestate(headers) {
        h.insert(names::TRACESTATE, ts);
    }
    if let Some(k) = a.ordering {
        h.insert(names::ORDERING_KEY, k);
    }
    for (name, value) in headers {
        let n = name.as_str();
        if !kept(route, n) {
            continue;
        }
        if let Ok(v) = value.to_str() {
            h.append(stored_name(n), v);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn header_names_are_title_cased() {
        assert_eq!(
            stored_name("x-github-event"),
            "Spillway-Orig-X-Github-Event"
        );
        assert_eq!(stored_name("webhook-id"), "Spillway-Orig-Webhook-Id");
        assert_eq!(stored_name("x--a"), "Spillway-Orig-X--A");
    }

    #[test]
    fn received_at_prints_as_jiff_does() {
        for ms in [
            1_700_000_000_123,
            1_700_000_000_000,
            1_700_000_000_999,
            1_700_000_001_005,
            1_700_000_001_050,
            0,
        ] {
            let t = jiff::Timestamp::from_millisecond(ms).unwrap();
            assert_eq!(received_at(t), format!("{t:.3}"), "{ms}");
        }
        let t = jiff::Timestamp::from_millisecond(-1_500).unwrap();
        assert_eq!(received_at(t), format!("{t:.3}"));
    }

    #[test]
    fn traceparent_is_kept_or_made() {
        let mut h = HeaderMap::new();
        let made = traceparent(&h);
        assert_eq!(made.len(), 55);
        assert!(made.starts_with("00-") && made.ends_with("-01"));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        h.insert("traceparent", HeaderValue::from_static(tp));
        assert_eq!(traceparent(&h), tp);
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        assert_ne!(traceparent(&h), "garbage");
    }

    #[test]
    fn tracestate_is_kept_when_sane() {
        let mut h = HeaderMap::new();
        assert_eq!(tracestate(&h), None);
        h.insert(
            "tracestate",
            HeaderValue::from_static("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        );
        assert_eq!(
            tracestate(&h),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let long = "a=".to_owned() + &"x".repeat(MAX_TRACESTATE_BYTES);
        h.insert("tracestate", HeaderValue::from_str(&long).unwrap());
        assert_eq!(tracestate(&h), None);
    }
}

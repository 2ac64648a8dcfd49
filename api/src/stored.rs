//! How a webhook is stored in the work stream: the one place that writes
//! and reads it, for the gateway (writes), the processor, and the CLI's
//! `events`, `dlq`, `redeliver` and `replay` (read).
//!
//! **Format 2** (this release's gateway, once every processor reads it; see
//! docs/architecture.md, "Stored format"): the NATS headers hold only
//! `Nats-Msg-Id` (JetStream's deduplication, when on); the payload is a
//! small HTTP-like head, then the body as it came:
//!
//! ```text
//! SPILLWAY/2\r\n
//! Spillway-Endpoint: payments/stripe\r\n        ┐ Spillway's metadata
//! Spillway-Delivery-Id: evt_1\r\n               │ (names of `wire`)
//! Spillway-Received-At: 2026-12-06T09:00:00.123Z\r\n
//! traceparent: 00-…-01\r\n                      ┘
//! \r\n
//! stripe-signature: t=…,v1=…\r\n                ┐ the provider's headers,
//! user-agent: Stripe/1.0\r\n                    ┘ as received
//! \r\n
//! {"id":"evt_1",…}                              the body
//! ```
//!
//! Why not NATS headers (format 1: every field a header, the provider's
//! under `Spillway-Orig-`): nats-server scans a message's header block for
//! its own headers (`Nats-Msg-Id`, `Nats-Expected-*`, `Nats-TTL`, …) on
//! every publish, and the client builds a hash map per message; ~450 bytes
//! of headers cost nats-server ~4 µs and the gateway ~3 µs per webhook,
//! and most of the open-loop p99 — the same bytes in the payload cost
//! nothing measurable (docs/benchmarks/gateway-profile.md).
//!
//! **Format 1** (earlier releases) is still read: a message with a
//! `Spillway-Delivery-Id` header is format 1, whatever its payload. Copies
//! (retries, dead letters, redrives, replays) keep the payload, so a
//! webhook keeps its format for life; the retry and dead-letter
//! bookkeeping stays in NATS headers in both formats.

use crate::wire;

/// The first line of a format-2 payload.
pub const MAGIC: &[u8] = b"SPILLWAY/2\r\n";

/// The format a gateway writes, per endpoint (`status.storedFormat`,
/// written by the operator once every processor reads format 2).
pub const CURRENT: u8 = 2;

/// A webhook's metadata, as the gateway writes it.
#[derive(Debug, Clone, Copy)]
pub struct Metadata<'a> {
    /// `namespace/name` of the WebhookEndpoint.
    pub endpoint: &'a str,
    /// The provider's delivery id (or the body hash).
    pub delivery_id: &'a str,
    /// RFC 3339 with milliseconds, UTC.
    pub received_at: &'a str,
    /// The request's Content-Type.
    pub content_type: Option<&'a str>,
    /// W3C trace context.
    pub traceparent: &'a str,
    /// The provider's W3C tracestate, when valid.
    pub tracestate: Option<&'a str>,
    /// The ordering key, when the endpoint is ordered.
    pub ordering_key: Option<&'a str>,
}

/// The metadata's names on the wire, in the order the head lists them
/// (and format 1 named its headers): the one list the writer and both
/// readers go by.
const NAMES: [&str; 7] = [
    wire::ENDPOINT,
    wire::DELIVERY_ID,
    wire::RECEIVED_AT,
    wire::CONTENT_TYPE,
    wire::TRACEPARENT,
    wire::TRACESTATE,
    wire::ORDERING_KEY,
];

impl Metadata<'_> {
    /// The values, in [`NAMES`]' order.
    fn values(&self) -> [Option<&str>; 7] {
        [
            Some(self.endpoint),
            Some(self.delivery_id),
            Some(self.received_at),
            self.content_type,
            Some(self.traceparent),
            self.tracestate,
            self.ordering_key,
        ]
    }

    fn fields(&self) -> impl Iterator<Item = (&'static str, &str)> + Clone {
        NAMES
            .into_iter()
            .zip(self.values())
            .filter_map(|(n, v)| Some((n, v?)))
    }
}

/// A name and value can go on one line of the head: no CR, LF or NUL, no
/// `:` in the name, neither empty (the gateway's values are visible ASCII
/// already; anything else is left out rather than break the framing).
fn fits(name: &str, value: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        && memchr::memchr3(b'\r', b'\n', 0, value.as_bytes()).is_none()
}

fn put_line(out: &mut Vec<u8>, name: &str, value: &str) {
    if fits(name, value) {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// The format-2 payload of a webhook, in one allocation (sized for every
/// line; a line that cannot be framed is left out).
pub fn encode<'h>(
    meta: &Metadata<'_>,
    headers: impl Iterator<Item = (&'h str, &'h str)> + Clone,
    body: &[u8],
) -> Vec<u8> {
    let line = |(n, v): (&str, &str)| n.len() + v.len() + 4;
    let room = MAGIC.len()
        + meta.fields().map(line).sum::<usize>()
        + headers.clone().map(line).sum::<usize>()
        + 4
        + body.len();
    let mut out = Vec::with_capacity(room);
    out.extend_from_slice(MAGIC);
    for (n, v) in meta.fields() {
        put_line(&mut out, n, v);
    }
    out.extend_from_slice(b"\r\n");
    for (n, v) in headers {
        put_line(&mut out, n, v);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    debug_assert!(out.len() <= room);
    out
}

/// Which format a stored webhook is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Every field a NATS header, the provider's under `Spillway-Orig-`.
    V1,
    /// The metadata and the provider's headers in front of the body.
    V2,
}

/// A stored webhook, read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Webhook {
    /// `namespace/name` of the endpoint.
    pub endpoint: Option<String>,
    /// The provider's delivery id.
    pub delivery_id: Option<String>,
    /// When the gateway accepted it (RFC 3339).
    pub received_at: Option<String>,
    /// The request's Content-Type.
    pub content_type: Option<String>,
    /// W3C trace context.
    pub traceparent: Option<String>,
    /// W3C tracestate.
    pub tracestate: Option<String>,
    /// The ordering key.
    pub ordering_key: Option<String>,
    /// The provider's headers, in order (format 1: names without the
    /// `Spillway-Orig-` prefix; format 2: as received).
    pub headers: Vec<(String, String)>,
    /// Where the body starts in the payload.
    pub body_offset: usize,
    /// Format 2, else format 1 (`None`: the default, a payload that is
    /// all body and no metadata).
    pub format: Option<Format>,
}

impl Webhook {
    /// The body, out of the payload this was read from.
    pub fn body<'p>(&self, payload: &'p [u8]) -> &'p [u8] {
        payload.get(self.body_offset..).unwrap_or_default()
    }

    /// The first value of a provider header, by name, case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The metadata under their `wire` names and the provider's headers
    /// under `Spillway-Orig-`: the webhook as format 1 stored it, one
    /// shape for people reading either format (`spillway events show`).
    pub fn as_headers(&self) -> Vec<(String, String)> {
        NAMES
            .into_iter()
            .zip(self.slots())
            .filter_map(|(n, v)| Some((n.to_owned(), v.clone()?)))
            .chain(
                self.headers
                    .iter()
                    .map(|(n, v)| (format!("{}{n}", wire::ORIGINAL_HEADER_PREFIX), v.clone())),
            )
            .collect()
    }

    /// The metadata fields, in [`NAMES`]' order.
    fn slots(&self) -> [&Option<String>; 7] {
        [
            &self.endpoint,
            &self.delivery_id,
            &self.received_at,
            &self.content_type,
            &self.traceparent,
            &self.tracestate,
            &self.ordering_key,
        ]
    }

    /// The metadata fields, in [`NAMES`]' order, to fill.
    fn slots_mut(&mut self) -> [&mut Option<String>; 7] {
        [
            &mut self.endpoint,
            &mut self.delivery_id,
            &mut self.received_at,
            &mut self.content_type,
            &mut self.traceparent,
            &mut self.tracestate,
            &mut self.ordering_key,
        ]
    }

    /// A metadata field by its wire name (case-insensitive); the first
    /// value wins.
    fn set(&mut self, name: &str, value: &str) {
        let slot = NAMES
            .iter()
            .zip(self.slots_mut())
            .find(|(n, _)| n.eq_ignore_ascii_case(name));
        if let Some((_, slot)) = slot
            && slot.is_none()
        {
            *slot = Some(value.to_owned());
        }
    }
}

/// A payload that starts as format 2 but does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("stored webhook is malformed: {0}")]
pub struct Malformed(&'static str);

/// One section of `name: value` lines up to an empty line: the lines and
/// where the next section starts.
fn section(buf: &[u8], mut at: usize) -> Result<(Vec<(String, String)>, usize), Malformed> {
    let mut out = Vec::new();
    loop {
        let rest = buf.get(at..).ok_or(Malformed("truncated"))?;
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(Malformed("a line without CRLF"))?;
        let line = &rest[..end];
        at += end + 2;
        if line.is_empty() {
            return Ok((out, at));
        }
        let line = std::str::from_utf8(line).map_err(|_| Malformed("a line is not UTF-8"))?;
        let (name, value) = line
            .split_once(": ")
            .ok_or(Malformed("a line without `: `"))?;
        if !fits(name, value) {
            return Err(Malformed("an invalid header name"));
        }
        out.push((name.to_owned(), value.to_owned()));
    }
}

/// Read a format-2 payload.
pub fn decode_v2(payload: &[u8]) -> Result<Webhook, Malformed> {
    if !payload.starts_with(MAGIC) {
        return Err(Malformed("no SPILLWAY/2 line"));
    }
    let (meta, at) = section(payload, MAGIC.len())?;
    let (headers, body_offset) = section(payload, at)?;
    let mut w = Webhook {
        headers,
        body_offset,
        format: Some(Format::V2),
        ..Webhook::default()
    };
    for (n, v) in &meta {
        w.set(n, v);
    }
    Ok(w)
}

/// Read a format-1 message from its headers (`name → values`).
pub fn decode_v1<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> Webhook {
    let mut w = Webhook {
        format: Some(Format::V1),
        ..Webhook::default()
    };
    let p = wire::ORIGINAL_HEADER_PREFIX;
    for (n, v) in headers {
        match n.get(..p.len()) {
            Some(head) if head.eq_ignore_ascii_case(p) && n.len() > p.len() => {
                w.headers.push((n[p.len()..].to_owned(), v.to_owned()));
            }
            _ => w.set(n, v),
        }
    }
    w
}

/// Read a stored webhook of either format (cargo feature `nats`).
#[cfg(feature = "nats")]
pub fn decode(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<Webhook, Malformed> {
    let v1 = headers.is_some_and(|h| h.get(wire::DELIVERY_ID).is_some());
    if !v1 && payload.starts_with(MAGIC) {
        return decode_v2(payload);
    }
    let pairs = headers.into_iter().flat_map(|h| {
        h.iter().flat_map(|(n, vs)| {
            let n: &str = n.as_ref();
            vs.iter().map(move |v| (n, v.as_str()))
        })
    });
    let mut w = decode_v1(pairs);
    if !v1 {
        // Neither format's metadata: a bare payload (published by hand).
        w.format = None;
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> Metadata<'static> {
        Metadata {
            endpoint: "payments/stripe",
            delivery_id: "evt_1",
            received_at: "2026-12-06T09:00:00.123Z",
            content_type: Some("application/json"),
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate: None,
            ordering_key: Some("cus_1"),
        }
    }

    #[test]
    fn format_2_round_trips() {
        let headers = [
            ("stripe-signature", "t=1,v1=ab"),
            ("x-a", "1"),
            ("x-a", "2"),
        ];
        let body = b"{\"id\":\"evt_1\"}\r\n\r\nmore";
        let p = encode(&meta(), headers.iter().copied(), body);
        assert!(p.starts_with(MAGIC));
        let w = decode_v2(&p).unwrap();
        assert_eq!(w.format, Some(Format::V2));
        assert_eq!(w.endpoint.as_deref(), Some("payments/stripe"));
        assert_eq!(w.delivery_id.as_deref(), Some("evt_1"));
        assert_eq!(w.received_at.as_deref(), Some("2026-12-06T09:00:00.123Z"));
        assert_eq!(w.content_type.as_deref(), Some("application/json"));
        assert_eq!(w.traceparent.as_deref(), Some(meta().traceparent));
        assert_eq!(w.tracestate, None);
        assert_eq!(w.ordering_key.as_deref(), Some("cus_1"));
        assert_eq!(
            w.headers,
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        );
        assert_eq!(w.header("X-A"), Some("1"));
        let shown = w.as_headers();
        assert!(shown.contains(&("Spillway-Delivery-Id".into(), "evt_1".into())));
        assert!(shown.contains(&("Spillway-Orig-x-a".into(), "2".into())));
        assert_eq!(shown.len(), 6 + 3);
        assert_eq!(w.body(&p), body);
    }

    #[test]
    fn what_cannot_be_framed_is_left_out() {
        let headers = [
            ("x-ok", "1"),
            ("x-bad", "a\r\nx-forged: 1"),
            ("bad:name", "1"),
        ];
        let m = Metadata {
            tracestate: Some("a=1\nb"),
            ..meta()
        };
        let p = encode(&m, headers.iter().copied(), b"");
        let w = decode_v2(&p).unwrap();
        assert_eq!(w.headers, vec![("x-ok".into(), "1".into())]);
        assert_eq!(w.tracestate, None);
        assert_eq!(w.body(&p), b"");
    }

    #[test]
    fn malformed_payloads_are_refused() {
        for (p, why) in [
            (
                &b"SPILLWAY/2\r\nSpillway-Endpoint: a/b\r\n"[..],
                "a line without CRLF",
            ),
            (b"SPILLWAY/2\r\nno colon\r\n\r\n\r\n", "a line without `: `"),
            (b"SPILLWAY/2\r\n\r\nx-a: 1\r\n", "a line without CRLF"),
            (b"SPILLWAY/2\r\n\r\n: v\r\n\r\n", "an invalid header name"),
            (b"SPILLWAY/2\r\n\xff: v\r\n\r\n\r\n", "a line is not UTF-8"),
            (b"{}", "no SPILLWAY/2 line"),
        ] {
            assert_eq!(decode_v2(p), Err(Malformed(why)), "{p:?}");
        }
        // The least format 2 there is: no metadata, no headers, no body.
        assert!(decode_v2(b"SPILLWAY/2\r\n\r\n\r\n").is_ok());
    }

    #[test]
    fn format_1_is_read_from_headers() {
        let w = decode_v1(
            [
                ("Spillway-Delivery-Id", "gh-1"),
                ("Nats-Msg-Id", "provider:gh-1"),
                ("Spillway-Orig-X-Github-Event", "push"),
                ("spillway-orig-user-agent", "GitHub-Hookshot"),
                ("Spillway-Orig-", "nameless"),
                ("Content-Type", "application/json"),
            ]
            .into_iter(),
        );
        assert_eq!(w.format, Some(Format::V1));
        assert_eq!(w.delivery_id.as_deref(), Some("gh-1"));
        assert_eq!(w.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            w.headers,
            vec![
                ("X-Github-Event".into(), "push".into()),
                ("user-agent".into(), "GitHub-Hookshot".into())
            ]
        );
        assert_eq!(w.body_offset, 0);
    }

    #[cfg(feature = "nats")]
    #[test]
    fn the_format_is_told_by_the_headers_then_the_payload() {
        let p = encode(&meta(), std::iter::empty(), b"body");
        // Format 2: no Spillway-Delivery-Id header, the magic line.
        let mut h = async_nats::HeaderMap::new();
        h.insert(wire::NATS_MSG_ID, "provider:evt_1");
        let w = decode(Some(&h), &p).unwrap();
        assert_eq!((w.format, w.body(&p)), (Some(Format::V2), &b"body"[..]));
        assert_eq!(decode(None, &p).unwrap().format, Some(Format::V2));
        // Format 1 whose body happens to start like format 2: the header
        // decides, and the payload is all body.
        h.insert(wire::DELIVERY_ID, "evt_1");
        let w = decode(Some(&h), &p).unwrap();
        assert_eq!((w.format, w.body(&p)), (Some(Format::V1), &p[..]));
        // Neither: all body.
        let w = decode(None, b"{}").unwrap();
        assert_eq!((w.format, w.body(b"{}")), (None, &b"{}"[..]));
    }
}

//! Delivery ids and deduplication ids, per scheme and per the endpoint's
//! `deduplication` settings.

use axum::http::HeaderMap;
use spillway_api::wire::{self, IdSource};
use spillway_api::{DedupSource, Deduplication, Scheme};

use crate::verify::header;

/// Longest id taken from a request; longer ones fall back to the body hash.
const MAX_ID_LEN: usize = 256;

/// The ids attached to one stored webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// The provider's delivery id, or the body hash when it has none.
    pub delivery_id: String,
    /// JetStream's `Nats-Msg-Id` (namespaced: see
    /// [`wire::intake_msg_id`]); `None` when deduplication is off.
    pub msg_id: Option<String>,
}

/// SHA-256 of the body, lowercase hex.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, body))
}

fn clean(id: &str) -> Option<String> {
    let id = id.trim();
    (!id.is_empty() && id.len() <= MAX_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic()))
        .then(|| id.to_owned())
}

fn json_field(body: &[u8], field: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Any(serde_json::Map<String, serde_json::Value>);
    let Any(map) = serde_json::from_slice(body).ok()?;
    match map.get(field)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The delivery id the provider put on the request, if the scheme has one:
/// `X-GitHub-Delivery`, the Stripe event `id`, `webhook-id`,
/// `X-Shopify-Webhook-Id`, the Slack `event_id`, `X-Gitlab-Event-UUID`,
/// `I-Twilio-Idempotency-Token`, `Twitch-Eventsub-Message-Id` (Twitch
/// retries a notification with the same id).
pub fn provider_id(scheme: Scheme, headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let raw = match scheme {
        Scheme::Github => return header(headers, "x-github-delivery").and_then(clean),
        Scheme::Stripe => json_field(body, "id"),
        Scheme::StandardWebhooks => return header(headers, "webhook-id").and_then(clean),
        Scheme::Shopify => return header(headers, "x-shopify-webhook-id").and_then(clean),
        Scheme::Slack => json_field(body, "event_id"),
        Scheme::Gitlab => return header(headers, "x-gitlab-event-uuid").and_then(clean),
        Scheme::Twilio => return header(headers, "i-twilio-idempotency-token").and_then(clean),
        Scheme::Twitch => return header(headers, "twitch-eventsub-message-id").and_then(clean),
        Scheme::Hmac | Scheme::None => None,
    }?;
    clean(&raw)
}

/// Work out the delivery id and the deduplication id of a request.
pub fn ids(dedup: &Deduplication, scheme: Scheme, headers: &HeaderMap, body: &[u8]) -> Ids {
    let provider = provider_id(scheme, headers, body);
    let from_body = || wire::intake_msg_id(IdSource::Body, &body_hash(body));
    let msg_id = match dedup.source {
        DedupSource::None => None,
        DedupSource::Provider => Some(match &provider {
            Some(id) => wire::intake_msg_id(IdSource::Provider, id),
            None => from_body(),
        }),
        DedupSource::BodyHash => Some(from_body()),
        DedupSource::Header => Some(
            dedup
                .header
                .as_deref()
                .and_then(|h| header(headers, h))
                .and_then(clean)
                .map_or_else(from_body, |v| wire::intake_msg_id(IdSource::Header, &v)),
        ),
    };
    Ids {
        delivery_id: provider.unwrap_or_else(|| body_hash(body)),
        msg_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderName, HeaderValue};

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn provider_ids_per_scheme() {
        let none = HeaderMap::new();
        let cases: Vec<(Scheme, HeaderMap, &[u8], Option<&str>)> = vec![
            (
                Scheme::Github,
                h(&[("X-GitHub-Delivery", "72d3162e")]),
                b"{}",
                Some("72d3162e"),
            ),
            (
                Scheme::Stripe,
                none.clone(),
                br#"{"id":"evt_1N","object":"event"}"#,
                Some("evt_1N"),
            ),
            (Scheme::Stripe, none.clone(), b"not json", None),
            (
                Scheme::StandardWebhooks,
                h(&[("webhook-id", "msg_1")]),
                b"{}",
                Some("msg_1"),
            ),
            (
                Scheme::Shopify,
                h(&[("X-Shopify-Webhook-Id", "b54557e4")]),
                b"{}",
                Some("b54557e4"),
            ),
            (
                Scheme::Slack,
                none.clone(),
                br#"{"type":"event_callback","event_id":"Ev08"}"#,
                Some("Ev08"),
            ),
            (Scheme::Slack, none.clone(), b"token=x&command=%2Fa", None),
            (
                Scheme::Gitlab,
                h(&[("X-Gitlab-Event-UUID", "u-1")]),
                b"{}",
                Some("u-1"),
            ),
            (
                Scheme::Twilio,
                h(&[("I-Twilio-Idempotency-Token", "t-1")]),
                b"",
                Some("t-1"),
            ),
            (
                Scheme::Twitch,
                h(&[(
                    "Twitch-Eventsub-Message-Id",
                    "befa7b53-d79d-478f-86b9-120f112b044e",
                )]),
                b"{}",
                Some("befa7b53-d79d-478f-86b9-120f112b044e"),
            ),
            (Scheme::Twitch, h(&[("webhook-id", "msg_1")]), b"{}", None),
            (Scheme::Hmac, h(&[("X-GitHub-Delivery", "x")]), b"{}", None),
            (
                Scheme::Github,
                h(&[("X-GitHub-Delivery", "has space")]),
                b"{}",
                None,
            ),
        ];
        for (scheme, headers, body, want) in cases {
            assert_eq!(
                provider_id(scheme, &headers, body).as_deref(),
                want,
                "{scheme:?} {headers:?}"
            );
        }
    }

    #[test]
    fn dedup_sources() {
        let body = b"hello";
        let hash = body_hash(body);
        assert_eq!(
            hash,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let headers = h(&[("X-GitHub-Delivery", "d-1"), ("X-Custom", "c-1")]);
        let mut d = Deduplication::default();
        assert_eq!(
            ids(&d, Scheme::Github, &headers, body),
            Ids {
                delivery_id: "d-1".into(),
                msg_id: Some("provider:d-1".into())
            }
        );
        let by_hash = format!("body:{hash}");
        assert_eq!(
            ids(&d, Scheme::Hmac, &headers, body).msg_id.as_deref(),
            Some(by_hash.as_str())
        );
        d.source = DedupSource::BodyHash;
        let got = ids(&d, Scheme::Github, &headers, body);
        assert_eq!(got.delivery_id, "d-1");
        assert_eq!(got.msg_id.as_deref(), Some(by_hash.as_str()));
        d.source = DedupSource::Header;
        d.header = Some("x-custom".into());
        assert_eq!(
            ids(&d, Scheme::Github, &headers, body).msg_id.as_deref(),
            Some("header:c-1")
        );
        d.header = Some("x-absent".into());
        assert_eq!(
            ids(&d, Scheme::Github, &headers, body).msg_id.as_deref(),
            Some(by_hash.as_str())
        );
        // A forged delivery id that looks like an internal one stays in the
        // gateway's namespace.
        d.source = DedupSource::Provider;
        let forged = h(&[("X-GitHub-Delivery", "redrive-spillway_a_b_dlq-4")]);
        let got = ids(&d, Scheme::Github, &forged, body).msg_id.unwrap();
        assert_eq!(got, "provider:redrive-spillway_a_b_dlq-4");
        d.source = DedupSource::None;
        assert_eq!(ids(&d, Scheme::Github, &headers, body).msg_id, None);
    }
}

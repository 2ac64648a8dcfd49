//! Providers' URL-ownership probes. They are answered synchronously and never
//! stored.
//!
//! Meta's GET probe and Microsoft Graph's `validationToken` are not signed by
//! the provider, so they are answered before verification ([`before_verify`]);
//! Slack, Zoom and Twitch sign theirs, so they are answered only once the
//! request verified ([`after_verify`]).

use axum::http::{HeaderMap, Method};
use serde::Deserialize;
use spillway_api::HandshakeType;
use subtle::ConstantTimeEq;

use crate::verify::{header, sign};

/// What to answer a handshake with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200 with a `text/plain` body.
    Text(String),
    /// 200 with a JSON body.
    Json(serde_json::Value),
    /// 403: the probe did not prove knowledge of the verify token.
    Forbidden,
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Handshakes that come unsigned: Meta's `GET ?hub.mode=subscribe` (checked
/// against the verify token) and Microsoft Graph's `validationToken`.
pub fn before_verify(
    kind: HandshakeType,
    method: &Method,
    query: Option<&str>,
    meta_verify_token: Option<&[u8]>,
) -> Option<Reply> {
    match kind {
        HandshakeType::MetaHubChallenge if method == Method::GET => {
            if query_param(query, "hub.mode").as_deref() != Some("subscribe") {
                return None;
            }
            let challenge = query_param(query, "hub.challenge")?;
            let token = query_param(query, "hub.verify_token").unwrap_or_default();
            let ok = meta_verify_token.is_some_and(|want| bool::from(token.as_bytes().ct_eq(want)));
            Some(if ok {
                Reply::Text(challenge)
            } else {
                Reply::Forbidden
            })
        }
        HandshakeType::MsGraphValidationToken if method == Method::POST => {
            query_param(query, "validationToken").map(Reply::Text)
        }
        _ => None,
    }
}

#[derive(Deserialize)]
struct SlackChallenge {
    #[serde(rename = "type")]
    kind: String,
    challenge: String,
}

#[derive(Deserialize)]
struct ZoomValidation {
    event: String,
    payload: ZoomPayload,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ZoomPayload {
    plain_token: String,
}

#[derive(Deserialize)]
struct TwitchChallenge {
    challenge: String,
}

/// Handshakes the provider signs, answered only after the request verified:
/// Slack `url_verification`, Zoom `endpoint.url_validation` (with
/// `zoom_secret`, the Zoom secret token) and Twitch
/// `webhook_callback_verification`.
pub fn after_verify(
    kind: HandshakeType,
    headers: &HeaderMap,
    body: &[u8],
    zoom_secret: Option<&[u8]>,
) -> Option<Reply> {
    match kind {
        HandshakeType::SlackUrlVerification => {
            let c: SlackChallenge = serde_json::from_slice(body).ok()?;
            (c.kind == "url_verification").then_some(Reply::Text(c.challenge))
        }
        HandshakeType::ZoomUrlValidation => {
            let z: ZoomValidation = serde_json::from_slice(body).ok()?;
            if z.event != "endpoint.url_validation" {
                return None;
            }
            let secret = zoom_secret?;
            let encrypted = hex::encode(sign(
                ring::hmac::HMAC_SHA256,
                secret,
                &[z.payload.plain_token.as_bytes()],
            ));
            Some(Reply::Json(serde_json::json!({
                "plainToken": z.payload.plain_token,
                "encryptedToken": encrypted,
            })))
        }
        HandshakeType::TwitchCallbackVerification => {
            if header(headers, "twitch-eventsub-message-type")
                != Some("webhook_callback_verification")
            {
                return None;
            }
            let c: TwitchChallenge = serde_json::from_slice(body).ok()?;
            Some(Reply::Text(c.challenge))
        }
        HandshakeType::MetaHubChallenge | HandshakeType::MsGraphValidationToken => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn meta_hub_challenge() {
        let q = Some("hub.mode=subscribe&hub.verify_token=tok%201&hub.challenge=1158201444");
        assert_eq!(
            before_verify(
                HandshakeType::MetaHubChallenge,
                &Method::GET,
                q,
                Some(b"tok 1")
            ),
            Some(Reply::Text("1158201444".into()))
        );
        assert_eq!(
            before_verify(
                HandshakeType::MetaHubChallenge,
                &Method::GET,
                q,
                Some(b"tok 2")
            ),
            Some(Reply::Forbidden)
        );
        assert_eq!(
            before_verify(HandshakeType::MetaHubChallenge, &Method::GET, q, None),
            Some(Reply::Forbidden)
        );
        assert_eq!(
            before_verify(
                HandshakeType::MetaHubChallenge,
                &Method::POST,
                q,
                Some(b"tok 1")
            ),
            None
        );
        assert_eq!(
            before_verify(
                HandshakeType::MetaHubChallenge,
                &Method::GET,
                Some("a=b"),
                None
            ),
            None
        );
    }

    #[test]
    fn ms_graph_validation_token() {
        let q = Some("validationToken=Validation%3A%20Testing%20client%20application");
        assert_eq!(
            before_verify(
                HandshakeType::MsGraphValidationToken,
                &Method::POST,
                q,
                None
            ),
            Some(Reply::Text("Validation: Testing client application".into()))
        );
        assert_eq!(
            before_verify(
                HandshakeType::MsGraphValidationToken,
                &Method::POST,
                None,
                None
            ),
            None
        );
    }

    #[test]
    fn slack_url_verification() {
        let body = br#"{"token":"Jhj5dZrVaK7ZwHHjRyZWjbDl","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
        assert_eq!(
            after_verify(
                HandshakeType::SlackUrlVerification,
                &HeaderMap::new(),
                body,
                None
            ),
            Some(Reply::Text(
                "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P".into()
            ))
        );
        let event = br#"{"type":"event_callback","event_id":"Ev1","challenge":"x"}"#;
        assert_eq!(
            after_verify(
                HandshakeType::SlackUrlVerification,
                &HeaderMap::new(),
                event,
                None
            ),
            None
        );
    }

    #[test]
    fn zoom_url_validation() {
        let body = br#"{"payload":{"plainToken":"qgg8vlvZRS6UYooatFL8Aw"},"event_ts":1654503849680,"event":"endpoint.url_validation"}"#;
        let got = after_verify(
            HandshakeType::ZoomUrlValidation,
            &HeaderMap::new(),
            body,
            Some(b"secret"),
        );
        let want = hex::encode(sign(
            ring::hmac::HMAC_SHA256,
            b"secret",
            &[b"qgg8vlvZRS6UYooatFL8Aw"],
        ));
        assert_eq!(
            got,
            Some(Reply::Json(serde_json::json!({
                "plainToken": "qgg8vlvZRS6UYooatFL8Aw",
                "encryptedToken": want,
            })))
        );
        assert_eq!(want.len(), 64);
        let other = br#"{"event":"meeting.started","payload":{"plainToken":"x"}}"#;
        assert_eq!(
            after_verify(
                HandshakeType::ZoomUrlValidation,
                &HeaderMap::new(),
                other,
                Some(b"s")
            ),
            None
        );
    }

    #[test]
    fn twitch_callback_verification() {
        let mut h = HeaderMap::new();
        let body = br#"{"challenge":"pogchamp-kappa-360noscope-vohiyo","subscription":{}}"#;
        assert_eq!(
            after_verify(HandshakeType::TwitchCallbackVerification, &h, body, None),
            None
        );
        h.insert(
            "Twitch-Eventsub-Message-Type",
            HeaderValue::from_static("webhook_callback_verification"),
        );
        assert_eq!(
            after_verify(HandshakeType::TwitchCallbackVerification, &h, body, None),
            Some(Reply::Text("pogchamp-kappa-360noscope-vohiyo".into()))
        );
    }
}

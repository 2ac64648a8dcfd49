//! A webhook's event type, the one rule `spillway events` shows and
//! listeners' `eventTypes` filters will match: the provider's own header,
//! else the JSON body's type field.
//!
//! | provider | where the type is |
//! | --- | --- |
//! | GitHub | `X-GitHub-Event` |
//! | GitLab | `X-Gitlab-Event` |
//! | Shopify | `X-Shopify-Topic` |
//! | Twitch | `Twitch-Eventsub-Subscription-Type` |
//! | Slack (Events API) | body `event.type` (the envelope's `type` is `event_callback`) |
//! | Stripe, Standard Webhooks, others | body `type` |

/// Headers that name the event type, looked up in this order
/// (case-insensitively).
pub const EVENT_TYPE_HEADERS: &[&str] = &[
    "X-GitHub-Event",
    "X-Gitlab-Event",
    "X-Shopify-Topic",
    "Twitch-Eventsub-Subscription-Type",
];

/// The event type of a webhook with these headers (`header(name)` looks
/// one up, case-insensitively) and this body; `None` when neither names
/// one.
pub fn event_type(header: impl Fn(&str) -> Option<String>, body: &[u8]) -> Option<String> {
    if let Some(v) = EVENT_TYPE_HEADERS.iter().find_map(|h| header(h)) {
        return Some(v);
    }
    if body.first() != Some(&b'{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |p: &str| v.pointer(p).and_then(|t| t.as_str()).map(str::to_owned);
    text("/event/type").or_else(|| text("/type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_provider_names_its_event_type() {
        let none = |_: &str| None;
        let h = |name: &'static str, value: &'static str| {
            move |n: &str| n.eq_ignore_ascii_case(name).then(|| value.to_owned())
        };
        let cases: Vec<(Option<String>, Option<&str>)> = vec![
            (event_type(h("x-github-event", "push"), b"{}"), Some("push")),
            (
                event_type(h("X-Gitlab-Event", "Merge Request Hook"), b"{}"),
                Some("Merge Request Hook"),
            ),
            (
                event_type(h("X-Shopify-Topic", "orders/create"), b"{}"),
                Some("orders/create"),
            ),
            (
                event_type(
                    h("Twitch-Eventsub-Subscription-Type", "channel.follow"),
                    b"{}",
                ),
                Some("channel.follow"),
            ),
            (
                event_type(none, br#"{"id":"evt_1","type":"invoice.paid"}"#),
                Some("invoice.paid"),
            ),
            (
                event_type(
                    none,
                    br#"{"type":"event_callback","event":{"type":"app_mention"}}"#,
                ),
                Some("app_mention"),
            ),
            (event_type(none, b"Body=Hello&From=%2B1"), None),
            (event_type(none, br#"{"type":42}"#), None),
            (event_type(none, b"{not json"), None),
        ];
        for (got, want) in cases {
            assert_eq!(got.as_deref(), want);
        }
        // The header wins over the body.
        assert_eq!(
            event_type(h("X-GitHub-Event", "issues"), br#"{"type":"x"}"#).as_deref(),
            Some("issues")
        );
    }
}

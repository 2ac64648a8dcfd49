//! Semantic checks the operator runs before acting on a spec. The API server
//! already enforces the schema and CEL rules; these catch what CEL cannot
//! (or what an older CRD let through) with messages a user can act on.

use std::time::Duration;

use crate::WebhookEndpointSpec;

/// A spec's durations, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timings {
    pub dedup_window: Duration,
    pub stream_max_age: Duration,
    pub delivery_timeout: Duration,
    pub backoff: Vec<Duration>,
    pub dead_letter_max_age: Duration,
}

/// Why `verification.hmac` is refused when `timestampHeader` and the
/// `{timestamp}` placeholder do not come together.
pub const HMAC_TIMESTAMP_PROBLEM: &str = "verification.hmac.timestampHeader and a {timestamp} placeholder in verification.hmac.signedContent go together: a timestamp that is not signed protects nothing against replays, and {timestamp} needs the header it is read from";

/// Why an endpoint with `scheme: twitch` is refused without the Twitch
/// handshake.
pub const TWITCH_HANDSHAKE_PROBLEM: &str = "scheme twitch needs handshake type twitchCallbackVerification: Twitch enables a subscription only once its webhook_callback_verification challenge is echoed";

/// Check a spec and parse its durations. Every problem found is reported,
/// not just the first.
pub fn check(spec: &WebhookEndpointSpec) -> Result<Timings, Vec<String>> {
    let mut problems = Vec::new();
    let p = &spec.processor;
    let t = Timings {
        dedup_window: spec.deduplication.window.get(),
        stream_max_age: spec.stream.max_age.get(),
        delivery_timeout: p.timeout.get(),
        backoff: p.retry.backoff.iter().map(|d| d.get()).collect(),
        dead_letter_max_age: p.dead_letter.max_age.get(),
    };
    if t.dedup_window > t.stream_max_age {
        problems.push("deduplication.window must not be longer than stream.maxAge".into());
    }
    let p = &spec.processor;
    if p.replicas.min > p.replicas.max {
        problems.push("processor.replicas.min must not exceed processor.replicas.max".into());
    }
    if p.retry.backoff.len() > p.retry.max_attempts as usize {
        problems.push("processor.retry.backoff may list at most maxAttempts durations".into());
    }
    if p.sink.url.is_some() == p.sink.service.is_some() {
        problems.push("processor.sink needs exactly one of url or service".into());
    }
    let v = &spec.verification;
    if v.scheme != crate::Scheme::None && v.secret_refs.is_empty() {
        problems.push("verification.secretRefs needs at least one Secret reference".into());
    }
    if (v.scheme == crate::Scheme::Hmac) != v.hmac.is_some() {
        problems.push(
            "verification.hmac is required when scheme is hmac and not allowed otherwise".into(),
        );
    }
    if let Some(h) = &v.hmac
        && h.timestamp_header.is_some() != h.signed_content.contains("{timestamp}")
    {
        problems.push(HMAC_TIMESTAMP_PROBLEM.into());
    }
    // Without the handshake the signed challenge would be stored like a
    // notification and answered with an empty 2xx, and Twitch would never
    // enable the subscription.
    if v.scheme == crate::Scheme::Twitch
        && spec.handshake.as_ref().map(|h| h.kind)
            != Some(crate::HandshakeType::TwitchCallbackVerification)
    {
        problems.push(TWITCH_HANDSHAKE_PROBLEM.into());
    }
    if problems.is_empty() {
        Ok(t)
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::GoDuration;

    fn spec(yaml: &str) -> WebhookEndpointSpec {
        serde_saphyr::from_str(yaml).expect("test spec parses")
    }

    const MINIMAL: &str = r#"
verification: {scheme: github, secretRefs: [{name: gh, key: secret}]}
processor: {sink: {url: "http://sink:8080/hook"}}
"#;

    #[test]
    fn minimal_spec_gets_defaults_and_passes() {
        let s = spec(MINIMAL);
        assert_eq!(s.processor.concurrency, 10);
        assert_eq!(s.ingress.max_body_bytes, 1 << 20);
        assert_eq!(s.verification.tolerance_seconds, 300);
        let t = check(&s).unwrap();
        assert_eq!(t.delivery_timeout, Duration::from_secs(30));
        assert_eq!(t.backoff.len(), 5);
    }

    #[test]
    fn reports_every_problem() {
        let mut s = spec(MINIMAL);
        s.deduplication.window = GoDuration::from_secs(100 * 3600);
        s.processor.replicas.min = 5;
        s.processor.retry.max_attempts = 2;
        let problems = check(&s).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("deduplication.window")));
    }

    #[test]
    fn a_bad_duration_is_refused_with_its_field() {
        let e = serde_saphyr::from_str::<WebhookEndpointSpec>(
            "verification: {scheme: none}\nprocessor: {sink: {url: \"http://s\"}, timeout: soon}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("processor") && e.contains("Go-style duration"),
            "{e}"
        );
    }

    #[test]
    fn hmac_timestamp_header_and_placeholder_go_together() {
        let hmac = |extra: &str| {
            spec(&format!(
                "verification: {{scheme: hmac, secretRefs: [{{name: s, key: k}}], hmac: {{header: X-Sig{extra}}}}}\nprocessor: {{sink: {{url: \"http://sink\"}}}}\n"
            ))
        };
        let refused = |s: &WebhookEndpointSpec| {
            check(s).is_err_and(|p| p == [HMAC_TIMESTAMP_PROBLEM.to_owned()])
        };
        assert!(check(&hmac("")).is_ok(), "default {{body}}, no timestamp");
        assert!(
            check(&hmac(
                ", signedContent: \"v0:{timestamp}:{body}\", timestampHeader: X-Ts"
            ))
            .is_ok()
        );
        // A checked but unsigned timestamp: replays with a fresh timestamp pass.
        assert!(refused(&hmac(", timestampHeader: X-Ts")));
        assert!(refused(&hmac(
            ", signedContent: \"{body}\", timestampHeader: X-Ts"
        )));
        // {timestamp} without the header would sign an empty string.
        assert!(refused(&hmac(", signedContent: \"{timestamp}.{body}\"")));
    }

    #[test]
    fn twitch_needs_the_twitch_handshake() {
        let twitch = |extra: &str| {
            spec(&format!(
                "verification: {{scheme: twitch, secretRefs: [{{name: s, key: k}}]}}\n{extra}processor: {{sink: {{url: \"http://sink\"}}}}\n"
            ))
        };
        let refused = |s: &WebhookEndpointSpec| {
            check(s).is_err_and(|p| p == [TWITCH_HANDSHAKE_PROBLEM.to_owned()])
        };
        assert!(check(&twitch("handshake: {type: twitchCallbackVerification}\n")).is_ok());
        assert!(refused(&twitch("")));
        assert!(refused(&twitch(
            "handshake: {type: slackUrlVerification}\n"
        )));
        // Other schemes may take the Twitch handshake (as before) or none.
        let mut s = twitch("handshake: {type: twitchCallbackVerification}\n");
        s.verification.scheme = crate::Scheme::Github;
        assert!(check(&s).is_ok());
        s.handshake = None;
        assert!(check(&s).is_ok());
    }
}

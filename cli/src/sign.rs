//! Sign a test webhook the way each provider does, so `spillway send`
//! exercises the gateway's verification for real.

use spillway_api::signature;
use spillway_api::{GenericHmac, Scheme};

/// What is signed and where it goes (the URL is [`Target::signed`]).
pub use signature::Outbound as Request;

/// Where a test webhook is posted, and the URL that goes into its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL to POST to.
    pub post: String,
    /// The URL the provider signs (only Twilio signs one).
    pub signed: String,
}

/// The URL to POST to and the URL to sign, for a webhook of `scheme` sent to
/// `url`.
///
/// `public_url` is the endpoint's `verification.publicUrl`, the URL the
/// provider was given; the gateway appends the request's query string to
/// it, so the signed URL is `public_url` plus the posted URL's query (or the
/// posted URL itself when there is no `public_url`).
///
/// Twilio signs only the URL (plus the parameters of a form body). For any
/// other non-empty body it does what Twilio does for JSON: it appends
/// `bodySHA256=<lowercase hex SHA-256 of the raw body>` to the query string
/// and signs the URL with it, so the body is covered through its digest.
/// Form bodies and empty bodies are posted to `url` unchanged.
pub fn target(
    scheme: Scheme,
    url: &str,
    public_url: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Target {
    let mut post = url.to_owned();
    if scheme == Scheme::Twilio && !is_form(content_type) && !body.is_empty() {
        post = with_query(&post, &format!("bodySHA256={}", body_sha256(body)));
    }
    let signed = match public_url {
        None => post.clone(),
        Some(public) => match post.split_once('?') {
            Some((_, q)) if !q.is_empty() => with_query(public, q),
            _ => public.to_owned(),
        },
    };
    Target { post, signed }
}

/// Lowercase hex SHA-256 of `body`, as Twilio's `bodySHA256` carries it.
pub fn body_sha256(body: &[u8]) -> String {
    signature::twilio::body_sha256(body)
}

/// `url` with `query` appended to its query string.
fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// The headers a provider using `scheme` would send with `req`, signed by
/// [`spillway_api::signature`] (the gateway verifies with the same code).
/// `generic` is the endpoint's `verification.hmac` (required for `hmac`).
pub fn headers(
    scheme: Scheme,
    secret: &[u8],
    req: &Request<'_>,
    generic: Option<&GenericHmac>,
) -> Result<Vec<(String, String)>, String> {
    // The one rule for Secret values (spillway_api::secret), as the gateway
    // applies it: surrounding whitespace is not part of the secret.
    let secret = spillway_api::secret::value(secret);
    match scheme {
        Scheme::Github => signature::github::sign(secret, req),
        Scheme::Stripe => signature::stripe::sign(secret, req),
        Scheme::Slack => signature::slack::sign(secret, req),
        Scheme::StandardWebhooks => {
            let key = spillway_api::secret::key(secret, true).map_err(|e| e.to_string())?;
            signature::standard_webhooks::sign(&key, req)
        }
        Scheme::Shopify => signature::shopify::sign(secret, req),
        Scheme::Gitlab => signature::gitlab::sign(secret, req),
        Scheme::Twilio => signature::twilio::sign(secret, req),
        Scheme::Twitch => signature::twitch::sign(secret, req),
        Scheme::Hmac => {
            let g = generic.ok_or("scheme hmac needs the endpoint's verification.hmac settings")?;
            signature::generic::Generic::new(g)
                .map_err(|e| e.to_string())?
                .sign(secret, req)
        }
        Scheme::None => Ok(vec![]),
    }
}

fn is_form(ct: &str) -> bool {
    signature::is_form(ct)
}

/// Parse a scheme name as written in the CRD (`github`, `standardWebhooks`, ...).
pub fn parse_scheme(s: &str) -> Result<Scheme, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!(
            "unknown scheme {s:?}: use github, stripe, slack, standardWebhooks, shopify, gitlab, twilio, twitch, hmac or none"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use ring::hmac;
    use spillway_api::signature::mac;
    use spillway_api::{HmacAlgorithm, SignatureEncoding};

    fn req<'a>(body: &'a [u8], now: i64, id: &'a str) -> Request<'a> {
        Request {
            body,
            content_type: "application/json",
            now,
            id,
            url: "https://example.com/hook",
        }
    }

    fn get(h: &[(String, String)], k: &str) -> String {
        h.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k}"))
    }

    #[test]
    fn github_matches_the_documented_example() {
        // docs.github.com "Validating webhook deliveries" test values.
        let h = headers(
            Scheme::Github,
            b"It's a Secret to Everybody",
            &req(b"Hello, World!", 0, "d"),
            None,
        )
        .unwrap();
        assert_eq!(
            get(&h, "X-Hub-Signature-256"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn standard_webhooks_matches_the_reference_vector() {
        let h = headers(
            Scheme::StandardWebhooks,
            b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            &req(
                br#"{"test": 2432232314}"#,
                1614265330,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            get(&h, "webhook-signature"),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(get(&h, "webhook-timestamp"), "1614265330");
    }

    #[test]
    fn slack_matches_the_documented_example() {
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let h = headers(
            Scheme::Slack,
            b"8f742231b10e8888abcd99yyyzzz85a5",
            &req(body, 1531420618, "x"),
            None,
        )
        .unwrap();
        assert_eq!(
            get(&h, "X-Slack-Signature"),
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
        );
    }

    #[test]
    fn stripe_signs_timestamp_dot_body() {
        let h = headers(
            Scheme::Stripe,
            b"whsec_test",
            &req(b"{}", 1700000000, "x"),
            None,
        )
        .unwrap();
        let v = get(&h, "Stripe-Signature");
        let want = hex::encode(mac(hmac::HMAC_SHA256, b"whsec_test", &[b"1700000000.{}"]));
        assert_eq!(v, format!("t=1700000000,v1={want}"));
    }

    #[test]
    fn twilio_signs_url_and_sorted_form_params() {
        // Twilio's documented example (auth token 12345).
        let body = b"CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212";
        let r = Request {
            body,
            content_type: "application/x-www-form-urlencoded",
            now: 0,
            id: "x",
            url: "https://mycompany.com/myapp.php?foo=1&bar=2",
        };
        let h = headers(Scheme::Twilio, b"12345", &r, None).unwrap();
        assert_eq!(
            get(&h, "X-Twilio-Signature"),
            "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
        );
    }

    #[test]
    fn twilio_json_carries_a_signed_body_sha256_like_twilio() {
        // Twilio's JSON signature-validation sample: the body's bodySHA256.
        let body = br#"{"CallSid":"CA1234567890ABCDE","Caller":"+12349013030"}"#;
        let t = target(
            Scheme::Twilio,
            "https://example.com/myapp",
            None,
            "application/json",
            body,
        );
        let want = "https://example.com/myapp?bodySHA256=5ccde7145dfb8f56479710896586cb9d5911809d83afbe34627818790db0aec9";
        assert_eq!(t.post, want);
        assert_eq!(t.signed, want);

        // The vectors of Twilio's helper libraries (auth token 12345): the
        // digest is appended to an existing query, or starts one.
        let body = br#"{"property": "value", "boolean": true}"#;
        let digest = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(body_sha256(body), digest);
        for (url, sig) in [
            (
                "https://mycompany.com/myapp.php?foo=1&bar=2",
                "a9nBmqA0ju/hNViExpshrM61xv4=",
            ),
            (
                "https://mycompany.com/myapp.php",
                "y77kIzt2vzLz71DgmJGsen2scGs=",
            ),
        ] {
            let t = target(
                Scheme::Twilio,
                url,
                None,
                "application/json; charset=utf-8",
                body,
            );
            let sep = if url.contains('?') { '&' } else { '?' };
            assert_eq!(t.post, format!("{url}{sep}bodySHA256={digest}"));
            assert_eq!(t.signed, t.post);
            let r = Request {
                body,
                content_type: "application/json",
                now: 0,
                id: "x",
                url: &t.signed,
            };
            let h = headers(Scheme::Twilio, b"12345", &r, None).unwrap();
            assert_eq!(get(&h, "X-Twilio-Signature"), sig, "{url}");
        }
    }

    #[test]
    fn twilio_target_keeps_form_and_empty_bodies_and_uses_the_public_url() {
        let url = "http://127.0.0.1:8080/in/tw";
        for (ct, body) in [
            ("application/x-www-form-urlencoded", &b"To=%2B1"[..]),
            (
                "Application/X-WWW-Form-Urlencoded; charset=utf-8",
                b"To=%2B1",
            ),
            ("application/json", b""),
        ] {
            let t = target(Scheme::Twilio, url, None, ct, body);
            assert_eq!((t.post.as_str(), t.signed.as_str()), (url, url), "{ct}");
        }
        // Other schemes never touch the URL.
        let t = target(Scheme::Github, url, None, "application/json", b"{}");
        assert_eq!(t.post, url);

        // With verification.publicUrl the public URL is signed, with the
        // posted URL's query appended (as the gateway rebuilds it).
        let public = "https://hooks.example.com/tw";
        let t = target(Scheme::Twilio, url, Some(public), "application/json", b"{}");
        let digest = body_sha256(b"{}");
        assert_eq!(t.post, format!("{url}?bodySHA256={digest}"));
        assert_eq!(t.signed, format!("{public}?bodySHA256={digest}"));
        let t = target(
            Scheme::Twilio,
            &format!("{url}?a=1"),
            Some(public),
            "application/x-www-form-urlencoded",
            b"To=%2B1",
        );
        assert_eq!(t.signed, format!("{public}?a=1"));
        let t = target(
            Scheme::Twilio,
            url,
            Some(public),
            "application/x-www-form-urlencoded",
            b"To=%2B1",
        );
        assert_eq!(t.signed, public);
    }

    #[test]
    fn twitch_signs_id_timestamp_and_body() {
        let body = br#"{"event":{"user_id":"1337"}}"#;
        let h = headers(
            Scheme::Twitch,
            b"twitch-secret-1",
            &req(body, 1_795_554_000, "befa7b53"),
            None,
        )
        .unwrap();
        let ts = "2026-11-24T21:00:00Z";
        assert_eq!(get(&h, "Twitch-Eventsub-Message-Timestamp"), ts);
        assert_eq!(get(&h, "Twitch-Eventsub-Message-Id"), "befa7b53");
        assert_eq!(get(&h, "Twitch-Eventsub-Message-Type"), "notification");
        let want = hex::encode(mac(
            hmac::HMAC_SHA256,
            b"twitch-secret-1",
            &[b"befa7b53", ts.as_bytes(), body],
        ));
        assert_eq!(
            get(&h, "Twitch-Eventsub-Message-Signature"),
            format!("sha256={want}")
        );
        assert_eq!(parse_scheme("twitch").unwrap(), Scheme::Twitch);
    }

    #[test]
    fn generic_hmac_follows_the_template() {
        let g = GenericHmac {
            header: "X-Sig".into(),
            algorithm: HmacAlgorithm::Sha256,
            encoding: SignatureEncoding::Base64,
            prefix: Some("v0=".into()),
            signed_content: "v0:{timestamp}:{body}".into(),
            timestamp_header: Some("X-Ts".into()),
        };
        let h = headers(Scheme::Hmac, b"k", &req(b"B", 7, "x"), Some(&g)).unwrap();
        let want = BASE64.encode(mac(hmac::HMAC_SHA256, b"k", &[b"v0:7:B"]));
        assert_eq!(get(&h, "X-Sig"), format!("v0={want}"));
        assert_eq!(get(&h, "X-Ts"), "7");
        assert!(headers(Scheme::Hmac, b"k", &req(b"B", 7, "x"), None).is_err());
    }

    #[test]
    fn parses_scheme_names_like_the_crd() {
        assert_eq!(
            parse_scheme("standardWebhooks").unwrap(),
            Scheme::StandardWebhooks
        );
        assert_eq!(parse_scheme("github").unwrap(), Scheme::Github);
        assert!(parse_scheme("GitHub").is_err());
    }

    /// Every scheme, signed here, verifies with the gateway's own verifier.
    #[test]
    fn the_gateway_verifies_every_scheme() {
        use spillway_gateway::verify::{Inbound, Verifier};
        let generic = GenericHmac {
            header: "X-Signature".into(),
            algorithm: HmacAlgorithm::Sha512,
            encoding: SignatureEncoding::Hex,
            prefix: Some("sha512=".into()),
            signed_content: "{timestamp}.{body}".into(),
            timestamp_header: Some("X-Timestamp".into()),
        };
        let now = 1_700_000_000;
        let url = "https://hooks.example.com/twilio/acme";
        for (scheme, secret, ct, body) in [
            (
                Scheme::Github,
                "gh-secret",
                "application/json",
                r#"{"a":1}"#,
            ),
            (
                Scheme::Stripe,
                "whsec_stripe",
                "application/json",
                r#"{"id":"evt"}"#,
            ),
            (
                Scheme::Slack,
                "slack",
                "application/x-www-form-urlencoded",
                "a=1&b=2",
            ),
            (
                Scheme::StandardWebhooks,
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                "application/json",
                "{}",
            ),
            (Scheme::Shopify, "shop", "application/json", "{}"),
            (Scheme::Gitlab, "gl-token", "application/json", "{}"),
            (
                Scheme::Twilio,
                "12345",
                "application/x-www-form-urlencoded",
                "To=%2B1&From=%2B2",
            ),
            (
                Scheme::Twilio,
                "12345",
                "application/json",
                r#"{"CallSid":"CA1"}"#,
            ),
            (
                Scheme::Twitch,
                "twitch-eventsub-secret",
                "application/json",
                r#"{"event":{"user_id":"1337"}}"#,
            ),
            (Scheme::Hmac, "generic", "application/json", "{}"),
            (Scheme::None, "", "application/json", "{}"),
        ] {
            let t = target(scheme, url, None, ct, body.as_bytes());
            let query = t.post.split_once('?').map(|(_, q)| q.to_owned());
            let r = Request {
                body: body.as_bytes(),
                content_type: ct,
                now,
                id: "msg_1",
                url: &t.signed,
            };
            let signed = headers(scheme, secret.as_bytes(), &r, Some(&generic)).unwrap();
            let mut h = reqwest::header::HeaderMap::new();
            h.insert("content-type", ct.parse().unwrap());
            for (k, v) in &signed {
                h.insert(
                    reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let secrets = if scheme == Scheme::None {
                vec![]
            } else {
                vec![secret.as_bytes().to_vec()]
            };
            let v = Verifier::new(scheme, secrets, 300, Some(url.into()), Some(&generic)).unwrap();
            let inbound = |body: &'static str| Inbound {
                headers: &h,
                body: body.as_bytes(),
                query: query.as_deref(),
                now_unix: now,
            };
            assert_eq!(v.verify(&inbound(body)), Ok(()), "{}", scheme.as_str());
            if scheme != Scheme::None && scheme != Scheme::Gitlab {
                assert!(
                    v.verify(&inbound("tampered")).is_err(),
                    "{}",
                    scheme.as_str()
                );
            }
        }
    }
}

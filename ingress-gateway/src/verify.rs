//! Request authentication for every supported signature scheme: the
//! per-endpoint [`Verifier`], built once from the spec and its secrets,
//! dispatching to [`spillway_api::signature`] (one file per scheme, shared
//! with `spillway send` and the processor's signing, so what is signed and
//! what is verified cannot drift apart). Signatures are compared in constant
//! time and every configured secret is tried, so a secret can be rotated by
//! adding the new one before removing the old. Nothing in this module logs;
//! failures carry only a machine-readable reason.

use axum::http::HeaderMap;
use ring::hmac;
use spillway_api::signature::{self as sig, generic::Generic};
use spillway_api::{GenericHmac, Scheme, secret};

/// The HMAC primitives used here, for callers that sign (tests, tools).
pub use ring::hmac as ring_hmac;
pub use spillway_api::signature::Failure;

/// A verifier could not be built from the endpoint's configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `scheme: hmac` without `hmac` settings.
    #[error("scheme hmac needs verification.hmac settings")]
    MissingHmacSettings,
    /// A scheme that needs a secret has none (empty values do not count).
    #[error("no non-empty secret is available for scheme {0}")]
    NoSecret(&'static str),
    /// `hmac.timestampHeader` without `{timestamp}` in the signed content
    /// (the timestamp would be checked but not signed, so a replay with a
    /// fresh timestamp passes), or `{timestamp}` without the header.
    #[error("verification.hmac.timestampHeader and {{timestamp}} in signedContent go together")]
    TimestampNotSigned,
    /// A `whsec_` secret is not valid base64 (the secret itself is not shown).
    #[error("a whsec_ secret is not valid base64")]
    BadWhsecSecret,
    /// Twilio signs the public URL, which is unknown.
    #[error("scheme twilio needs verification.publicUrl or a gateway public base URL")]
    MissingPublicUrl,
}

/// The parts of a request that verification looks at (the one shape,
/// [`spillway_api::signature::Inbound`]).
pub use spillway_api::signature::Inbound;

/// One endpoint's verification settings and secrets, ready to check
/// requests.
#[derive(Clone)]
pub struct Verifier {
    scheme: Scheme,
    secrets: Vec<Vec<u8>>,
    tolerance: i64,
    twilio_url: Option<String>,
    generic: Option<Generic>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("scheme", &self.scheme)
            .field(
                "secrets",
                &format_args!("<{} redacted>", self.secrets.len()),
            )
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

/// Whether a secret value gives no key as `scheme` uses it (see
/// [`spillway_api::secret`]: empty once trimmed, or a Standard Webhooks
/// `whsec_` secret that decodes to nothing). An empty key would make every
/// signature computable by anyone (and an empty GitLab token would match an
/// empty header), so such values are never used.
pub fn is_empty_secret(scheme: Scheme, raw: &[u8]) -> bool {
    secret::key(raw, scheme == Scheme::StandardWebhooks) == Err(secret::KeyError::Empty)
}

impl Verifier {
    /// Build a verifier. `secrets` are the raw values of every secretRef that
    /// could be read; `public_url` is the resolved URL Twilio signs. Empty
    /// values (see [`is_empty_secret`]) are ignored; a scheme left without
    /// a secret is [`ConfigError::NoSecret`], never a verifier that accepts.
    pub fn new(
        scheme: Scheme,
        secrets: Vec<Vec<u8>>,
        tolerance_seconds: u32,
        public_url: Option<String>,
        generic: Option<&GenericHmac>,
    ) -> Result<Self, ConfigError> {
        // One rule for every Secret value (spillway_api::secret): trimmed,
        // `whsec_` decoded for Standard Webhooks, empty ones skipped.
        let mut keys = Vec::new();
        for raw in &secrets {
            match secret::key(raw, scheme == Scheme::StandardWebhooks) {
                Ok(k) => keys.push(k),
                Err(secret::KeyError::Empty) => {}
                Err(secret::KeyError::Whsec) => return Err(ConfigError::BadWhsecSecret),
            }
        }
        let secrets = keys;
        if scheme != Scheme::None && secrets.is_empty() {
            return Err(ConfigError::NoSecret(scheme.as_str()));
        }
        let generic = if scheme == Scheme::Hmac {
            let g = generic.ok_or(ConfigError::MissingHmacSettings)?;
            Some(Generic::new(g).map_err(|_| ConfigError::TimestampNotSigned)?)
        } else {
            None
        };
        if scheme == Scheme::Twilio && public_url.is_none() {
            return Err(ConfigError::MissingPublicUrl);
        }
        Ok(Self {
            scheme,
            secrets,
            tolerance: i64::from(tolerance_seconds),
            twilio_url: public_url,
            generic,
        })
    }

    /// The scheme this verifier checks.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Check a request. `Ok` means it verified against at least one secret
    /// (and its timestamp, if any, is within tolerance).
    pub fn verify(&self, req: &Inbound<'_>) -> Result<(), Failure> {
        let (keys, r, tolerance) = (&self.secrets, req, self.tolerance);
        match self.scheme {
            Scheme::None => Ok(()),
            Scheme::Github => sig::github::verify(keys, r),
            Scheme::Stripe => sig::stripe::verify(keys, r, tolerance),
            Scheme::Slack => sig::slack::verify(keys, r, tolerance),
            Scheme::StandardWebhooks => sig::standard_webhooks::verify(keys, r, tolerance),
            Scheme::Shopify => sig::shopify::verify(keys, r),
            Scheme::Gitlab => sig::gitlab::verify(keys, r),
            Scheme::Twilio => {
                sig::twilio::verify(keys, r, self.twilio_url.as_deref().unwrap_or_default())
            }
            Scheme::Twitch => sig::twitch::verify(keys, r, tolerance),
            Scheme::Hmac => match &self.generic {
                Some(g) => g.verify(keys, r, tolerance),
                None => Err(Failure::BadSignature),
            },
        }
    }
}

/// HMAC of the concatenation of `parts` (for tests and tools that sign).
pub fn sign(alg: hmac::Algorithm, secret: &[u8], parts: &[&[u8]]) -> hmac::Tag {
    let key = hmac::Key::new(alg, secret);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign()
}

/// A header's value as text, if present and visible ASCII.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    sig::header(headers, name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD as BASE64;
    use spillway_api::{HmacAlgorithm, SignatureEncoding};

    const NOW: i64 = 1_700_000_000;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn check(v: &Verifier, h: &HeaderMap, body: &[u8], now: i64) -> Result<(), Failure> {
        v.verify(&Inbound {
            headers: h,
            body,
            query: None,
            now_unix: now,
        })
    }

    fn v(scheme: Scheme, secrets: &[&str]) -> Verifier {
        Verifier::new(
            scheme,
            secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
            300,
            None,
            None,
        )
        .unwrap()
    }

    fn hex_sig(secret: &str, parts: &[&[u8]]) -> String {
        hex::encode(sign(hmac::HMAC_SHA256, secret.as_bytes(), parts))
    }

    #[test]
    fn github_public_vector() {
        let ver = v(Scheme::Github, &["It's a Secret to Everybody"]);
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = headers(&[("X-Hub-Signature-256", sig)]);
        assert_eq!(check(&ver, &h, b"Hello, World!", NOW), Ok(()));
        assert_eq!(
            check(&ver, &h, b"Hello, World?", NOW),
            Err(Failure::BadSignature)
        );
        assert_eq!(
            check(&ver, &HeaderMap::new(), b"Hello, World!", NOW),
            Err(Failure::MissingSignature)
        );
        let wrong = v(Scheme::Github, &["nope"]);
        assert_eq!(
            check(&wrong, &h, b"Hello, World!", NOW),
            Err(Failure::BadSignature)
        );
        let h = headers(&[("X-Hub-Signature-256", "sha1=757107ea")]);
        assert_eq!(
            check(&ver, &h, b"Hello, World!", NOW),
            Err(Failure::BadSignature)
        );
    }

    #[test]
    fn every_secret_is_tried() {
        let ver = v(Scheme::Github, &["old", "It's a Secret to Everybody"]);
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = headers(&[("X-Hub-Signature-256", sig)]);
        assert_eq!(check(&ver, &h, b"Hello, World!", NOW), Ok(()));
        let old = format!("sha256={}", hex_sig("old", &[b"Hello, World!"]));
        let h = headers(&[("X-Hub-Signature-256", &old)]);
        assert_eq!(check(&ver, &h, b"Hello, World!", NOW), Ok(()));
    }

    const SLACK_BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";

    #[test]
    fn slack_public_vector() {
        let ver = v(Scheme::Slack, &["8f742231b10e8888abcd99yyyzzz85a5"]);
        let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        let h = headers(&[
            ("X-Slack-Signature", sig),
            ("X-Slack-Request-Timestamp", "1531420618"),
        ]);
        assert_eq!(
            check(&ver, &h, SLACK_BODY.as_bytes(), 1531420618 + 10),
            Ok(())
        );
        assert_eq!(
            check(&ver, &h, SLACK_BODY.as_bytes(), 1531420618 + 301),
            Err(Failure::TimestampOutOfTolerance)
        );
        let mut tampered = SLACK_BODY.to_owned();
        tampered.push('x');
        assert_eq!(
            check(&ver, &h, tampered.as_bytes(), 1531420618),
            Err(Failure::BadSignature)
        );
        let h = headers(&[("X-Slack-Signature", sig)]);
        assert_eq!(
            check(&ver, &h, SLACK_BODY.as_bytes(), 1531420618),
            Err(Failure::MissingSignature)
        );
    }

    #[test]
    fn svix_public_vector() {
        let ver = v(
            Scheme::StandardWebhooks,
            &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
        );
        let body = br#"{"test": 2432232314}"#;
        let mk = |sig: &str| {
            headers(&[
                ("webhook-id", "msg_p5jXN8AQM9LWM0D4loKWxJek"),
                ("webhook-timestamp", "1614265330"),
                ("webhook-signature", sig),
            ])
        };
        let good = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(check(&ver, &mk(good), body, 1614265330), Ok(()));
        // Any of several space-separated signatures may match.
        let several = format!("v1,bm9wZQ== v2,xyz {good}");
        assert_eq!(check(&ver, &mk(&several), body, 1614265330), Ok(()));
        assert_eq!(
            check(&ver, &mk("v1,bm9wZQ=="), body, 1614265330),
            Err(Failure::BadSignature)
        );
        assert_eq!(
            check(&ver, &mk(good), body, 1614265330 + 1000),
            Err(Failure::TimestampOutOfTolerance)
        );
        assert!(
            Verifier::new(
                Scheme::StandardWebhooks,
                vec![b"whsec_!!!".to_vec()],
                300,
                None,
                None
            )
            .is_err()
        );
    }

    #[test]
    fn stripe_any_v1_and_tolerance() {
        let secret = "whsec_test_secret";
        let ver = v(Scheme::Stripe, &[secret]);
        let body = br#"{"id":"evt_1","object":"event"}"#;
        let t = NOW.to_string();
        let good = hex_sig(secret, &[t.as_bytes(), b".", body]);
        let bad = hex_sig("other", &[t.as_bytes(), b".", body]);
        let h = headers(&[(
            "Stripe-Signature",
            &format!("t={t},v1={bad},v1={good},v0=abc"),
        )]);
        assert_eq!(check(&ver, &h, body, NOW), Ok(()));
        assert_eq!(
            check(&ver, &h, body, NOW + 301),
            Err(Failure::TimestampOutOfTolerance)
        );
        let h = headers(&[("Stripe-Signature", &format!("t={t},v1={bad}"))]);
        assert_eq!(check(&ver, &h, body, NOW), Err(Failure::BadSignature));
        let h = headers(&[("Stripe-Signature", &format!("v1={good}"))]);
        assert_eq!(check(&ver, &h, body, NOW), Err(Failure::BadSignature));
        assert_eq!(
            check(&ver, &HeaderMap::new(), body, NOW),
            Err(Failure::MissingSignature)
        );
    }

    #[test]
    fn shopify_and_gitlab() {
        let ver = v(Scheme::Shopify, &["shpss"]);
        let body = br#"{"id":1}"#;
        let sig = BASE64.encode(sign(hmac::HMAC_SHA256, b"shpss", &[body]));
        let h = headers(&[("X-Shopify-Hmac-Sha256", &sig)]);
        assert_eq!(check(&ver, &h, body, NOW), Ok(()));
        assert_eq!(check(&ver, &h, b"{}", NOW), Err(Failure::BadSignature));

        let ver = v(Scheme::Gitlab, &["tok-a", "tok-b"]);
        let h = headers(&[("X-Gitlab-Token", "tok-b")]);
        assert_eq!(check(&ver, &h, b"{}", NOW), Ok(()));
        let h = headers(&[("X-Gitlab-Token", "tok-c")]);
        assert_eq!(check(&ver, &h, b"{}", NOW), Err(Failure::BadSignature));
        let h = headers(&[("X-Gitlab-Token", "tok-")]);
        assert_eq!(check(&ver, &h, b"{}", NOW), Err(Failure::BadSignature));
        assert_eq!(
            check(&ver, &HeaderMap::new(), b"{}", NOW),
            Err(Failure::MissingSignature)
        );
    }

    #[test]
    fn twilio_form_and_body_sha256() {
        // Example from Twilio's security docs.
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let (base, query) = url.split_once('?').unwrap();
        let body = "To=%2B18005551212&CallSid=CA1234567890ABCDE&Caller=%2B14158675309&Digits=1234&From=%2B14158675309";
        let ver = Verifier::new(
            Scheme::Twilio,
            vec![b"12345".to_vec()],
            300,
            Some(base.into()),
            None,
        )
        .unwrap();
        let mut h = headers(&[
            ("X-Twilio-Signature", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ]);
        let run = |h: &HeaderMap, body: &[u8], q: &str| {
            ver.verify(&Inbound {
                headers: h,
                body,
                query: Some(q),
                now_unix: NOW,
            })
        };
        assert_eq!(run(&h, body.as_bytes(), query), Ok(()));
        assert_eq!(
            run(&h, b"CallSid=CA1234567890ABCDE", query),
            Err(Failure::BadSignature)
        );
        // A publicUrl written with its query (as given to Twilio) verifies
        // the same request: the query is not appended twice.
        let with_query = Verifier::new(
            Scheme::Twilio,
            vec![b"12345".to_vec()],
            300,
            Some(url.into()),
            None,
        )
        .unwrap();
        let inbound = Inbound {
            headers: &h,
            body: body.as_bytes(),
            query: Some(query),
            now_unix: NOW,
        };
        assert_eq!(with_query.verify(&inbound), Ok(()));

        // JSON variant: URL carries bodySHA256 of the body.
        let json = br#"{"property": "value", "boolean": true}"#;
        let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, json));
        let q = format!("bodySHA256={digest}");
        let signed = format!("{base}?{q}");
        let sig = BASE64.encode(sign(
            hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            b"12345",
            &[signed.as_bytes()],
        ));
        h.insert("x-twilio-signature", HeaderValue::from_str(&sig).unwrap());
        h.insert("content-type", HeaderValue::from_static("application/json"));
        assert_eq!(run(&h, json, &q), Ok(()));
        assert_eq!(run(&h, b"{}", &q), Err(Failure::BadSignature));

        // Neither form-encoded nor a bodySHA256 in the URL: the signature
        // covers only the URL, so only an empty body is accepted with it.
        let sig = BASE64.encode(sign(
            hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
            b"12345",
            &[base.as_bytes()],
        ));
        h.insert("x-twilio-signature", HeaderValue::from_str(&sig).unwrap());
        assert_eq!(run(&h, b"", ""), Ok(()));
        assert_eq!(run(&h, json, ""), Err(Failure::BadSignature));
        h.remove("content-type");
        assert_eq!(run(&h, b"", ""), Ok(()));
        assert_eq!(run(&h, b"anything", ""), Err(Failure::BadSignature));
        assert!(Verifier::new(Scheme::Twilio, vec![b"x".to_vec()], 300, None, None).is_err());
    }

    /// `sha256=` + hex HMAC-SHA256(secret, id + timestamp + body), computed
    /// with RustCrypto as Twitch documents it, independently of `ring`.
    fn twitch_sig(secret: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
        use ::hmac::{Hmac, Mac};
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        m.update(id.as_bytes());
        m.update(ts.as_bytes());
        m.update(body);
        format!("sha256={}", hex::encode(m.finalize().into_bytes()))
    }

    #[test]
    fn twitch_eventsub() {
        const SECRET: &str = "s3cRe7-twitch-eventsub";
        const ID: &str = "befa7b53-d79d-478f-86b9-120f112b044e";
        const TS: &str = "2026-11-24T21:00:00.123456789Z";
        // 2026-11-24T21:00:00Z
        const T: i64 = 1_795_554_000;
        let body = br#"{"subscription":{"id":"f1c2a387-161a-49f9-a165-0f21d7a4e1c4","type":"channel.follow","version":"2","status":"enabled"},"event":{"user_id":"1337","user_login":"awesome_user","broadcaster_user_id":"12826"}}"#;
        let sig = twitch_sig(SECRET.as_bytes(), ID, TS, body);
        // Independently computed, and what the gateway's own signer makes.
        assert_eq!(
            sig,
            format!(
                "sha256={}",
                hex_sig(SECRET, &[ID.as_bytes(), TS.as_bytes(), body])
            )
        );
        let mk = |id: &str, ts: &str, sig: &str| {
            headers(&[
                ("Twitch-Eventsub-Message-Id", id),
                ("Twitch-Eventsub-Message-Retry", "0"),
                ("Twitch-Eventsub-Message-Type", "notification"),
                ("Twitch-Eventsub-Message-Signature", sig),
                ("Twitch-Eventsub-Message-Timestamp", ts),
            ])
        };
        let ver = v(Scheme::Twitch, &["an-older-twitch-secret", SECRET]);
        let good = mk(ID, TS, &sig);
        assert_eq!(check(&ver, &good, body, T), Ok(()));
        // Tolerance both ways: older than it, or further in the future.
        assert_eq!(check(&ver, &good, body, T + 300), Ok(()));
        assert_eq!(check(&ver, &good, body, T - 300), Ok(()));
        assert_eq!(
            check(&ver, &good, body, T + 301),
            Err(Failure::TimestampOutOfTolerance)
        );
        assert_eq!(
            check(&ver, &good, body, T - 301),
            Err(Failure::TimestampOutOfTolerance)
        );
        // Body, id and timestamp are all signed.
        let mut tampered = body.to_vec();
        tampered.push(b' ');
        assert_eq!(check(&ver, &good, &tampered, T), Err(Failure::BadSignature));
        assert_eq!(
            check(&ver, &mk("another-id", TS, &sig), body, T),
            Err(Failure::BadSignature)
        );
        assert_eq!(
            check(
                &ver,
                &mk(ID, "2026-11-24T21:00:01.123456789Z", &sig),
                body,
                T
            ),
            Err(Failure::BadSignature)
        );
        // Signed with none of the secrets, malformed, or another prefix.
        let other = twitch_sig(b"not-the-twitch-secret", ID, TS, body);
        for bad in [
            other.as_str(),
            &sig[7..],
            "sha256=zz",
            &sig.replace("sha256=", "sha1="),
        ] {
            assert_eq!(
                check(&ver, &mk(ID, TS, bad), body, T),
                Err(Failure::BadSignature),
                "{bad}"
            );
        }
        // Every secret is tried: the first one verifies too.
        let old = twitch_sig(b"an-older-twitch-secret", ID, TS, body);
        assert_eq!(check(&ver, &mk(ID, TS, &old), body, T), Ok(()));
        // Any RFC 3339 offset; a signed timestamp that is not RFC 3339 is
        // refused like a stale one.
        for (ts, ok) in [
            ("2026-11-24T22:00:00.5+01:00", true),
            ("2026-11-24T21:00:00Z", true),
            ("1795554000", false),
            ("2026-11-24T21:00:00", false),
        ] {
            let h = mk(ID, ts, &twitch_sig(SECRET.as_bytes(), ID, ts, body));
            let want = if ok {
                Ok(())
            } else {
                Err(Failure::TimestampOutOfTolerance)
            };
            assert_eq!(check(&ver, &h, body, T), want, "{ts}");
        }
        // Each of the three headers is required.
        for name in [
            "twitch-eventsub-message-id",
            "twitch-eventsub-message-timestamp",
            "twitch-eventsub-message-signature",
        ] {
            let mut h = good.clone();
            h.remove(name);
            assert_eq!(
                check(&ver, &h, body, T),
                Err(Failure::MissingSignature),
                "{name}"
            );
        }
        assert_eq!(
            Verifier::new(Scheme::Twitch, vec![Vec::new()], 300, None, None).unwrap_err(),
            ConfigError::NoSecret("twitch")
        );
    }

    fn generic(ts_header: Option<&str>, template: &str, enc: SignatureEncoding) -> GenericHmac {
        GenericHmac {
            header: "x-zm-signature".into(),
            algorithm: HmacAlgorithm::Sha256,
            encoding: enc,
            prefix: Some("v0=".into()),
            signed_content: template.into(),
            timestamp_header: ts_header.map(String::from),
        }
    }

    #[test]
    fn generic_hmac_template_and_timestamp() {
        let g = generic(
            Some("x-zm-request-timestamp"),
            "v0:{timestamp}:{body}",
            SignatureEncoding::Hex,
        );
        let ver = Verifier::new(Scheme::Hmac, vec![b"zoom".to_vec()], 300, None, Some(&g)).unwrap();
        let body = br#"{"event":"meeting.started"}"#;
        let t = NOW.to_string();
        let sig = format!(
            "v0={}",
            hex_sig("zoom", &[b"v0:", t.as_bytes(), b":", body])
        );
        let h = headers(&[("x-zm-signature", &sig), ("x-zm-request-timestamp", &t)]);
        assert_eq!(check(&ver, &h, body, NOW), Ok(()));
        assert_eq!(
            check(&ver, &h, body, NOW - 400),
            Err(Failure::TimestampOutOfTolerance)
        );
        let h2 = headers(&[("x-zm-signature", &sig)]);
        assert_eq!(check(&ver, &h2, body, NOW), Err(Failure::MissingSignature));
        let h3 = headers(&[
            ("x-zm-signature", &sig[3..]),
            ("x-zm-request-timestamp", &t),
        ]);
        assert_eq!(check(&ver, &h3, body, NOW), Err(Failure::BadSignature));

        let g = generic(None, "{body}", SignatureEncoding::Base64);
        let ver = Verifier::new(Scheme::Hmac, vec![b"k".to_vec()], 300, None, Some(&g)).unwrap();
        let sig = format!(
            "v0={}",
            BASE64.encode(sign(hmac::HMAC_SHA256, b"k", &[b"{body}-literal"]))
        );
        let h = headers(&[("x-zm-signature", &sig)]);
        assert_eq!(check(&ver, &h, b"{body}-literal", NOW), Ok(()));
        assert!(Verifier::new(Scheme::Hmac, vec![b"k".to_vec()], 300, None, None).is_err());

        // A timestamp header that is not signed (or {timestamp} without a
        // header) is refused: such a verifier would accept replays.
        for (ts, template) in [
            (Some("x-zm-request-timestamp"), "{body}"),
            (None, "{timestamp}.{body}"),
        ] {
            let g = generic(ts, template, SignatureEncoding::Hex);
            assert_eq!(
                Verifier::new(Scheme::Hmac, vec![b"k".to_vec()], 300, None, Some(&g)).unwrap_err(),
                ConfigError::TimestampNotSigned
            );
        }
    }

    #[test]
    fn empty_secrets_are_ignored_and_never_accept() {
        // An empty GitLab token would match an empty X-Gitlab-Token header.
        let empty_header = headers(&[("X-Gitlab-Token", "")]);
        assert_eq!(
            Verifier::new(Scheme::Gitlab, vec![Vec::new()], 300, None, None).unwrap_err(),
            ConfigError::NoSecret("gitlab")
        );
        let ver = v(Scheme::Gitlab, &["", "tok"]);
        assert_eq!(
            check(&ver, &empty_header, b"{}", NOW),
            Err(Failure::BadSignature)
        );
        assert_eq!(
            check(&ver, &headers(&[("X-Gitlab-Token", "tok")]), b"{}", NOW),
            Ok(())
        );
        // An empty HMAC key is a key anyone can sign with.
        let body = b"{}";
        let forged = format!("sha256={}", hex_sig("", &[body]));
        let h = headers(&[("X-Hub-Signature-256", &forged)]);
        assert!(Verifier::new(Scheme::Github, vec![Vec::new()], 300, None, None).is_err());
        assert_eq!(
            check(&v(Scheme::Github, &["", "real"]), &h, body, NOW),
            Err(Failure::BadSignature)
        );
        // A whsec_ secret that decodes to nothing.
        for raw in ["whsec_", "whsec_  ", " \n"] {
            assert!(is_empty_secret(Scheme::StandardWebhooks, raw.as_bytes()));
            assert_eq!(
                Verifier::new(
                    Scheme::StandardWebhooks,
                    vec![raw.as_bytes().to_vec()],
                    300,
                    None,
                    None
                )
                .unwrap_err(),
                ConfigError::NoSecret("standardWebhooks")
            );
        }
        assert!(!is_empty_secret(Scheme::Github, b"whsec_"));
        assert!(!is_empty_secret(Scheme::StandardWebhooks, b"whsec_aGk="));
        // Surrounding whitespace is not part of a value, in every scheme.
        let sig = format!("sha256={}", hex_sig("real", &[body]));
        let h = headers(&[("X-Hub-Signature-256", &sig)]);
        assert_eq!(
            check(&v(Scheme::Github, &["real\n"]), &h, body, NOW),
            Ok(())
        );
        assert_eq!(
            check(&v(Scheme::Github, &[" real "]), &h, body, NOW),
            Ok(())
        );
    }

    #[test]
    fn none_accepts_and_debug_redacts() {
        let ver = v(Scheme::None, &[]);
        assert_eq!(check(&ver, &HeaderMap::new(), b"x", NOW), Ok(()));
        let ver = v(Scheme::Github, &["supersecretvalue"]);
        assert!(!format!("{ver:?}").contains("supersecretvalue"));
        assert!(Verifier::new(Scheme::Github, vec![], 300, None, None).is_err());
    }
}

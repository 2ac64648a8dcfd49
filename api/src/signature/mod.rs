//! Webhook signatures, per scheme: what each provider signs, how it writes
//! the signature into headers, and how a request is checked. One file per
//! scheme; in each, `verify` recomputes the signature with the same
//! function `sign` uses, so signing and verifying cannot drift apart.
//!
//! The gateway verifies with it, `spillway send` signs test webhooks with
//! it, and the processor signs outbound deliveries with
//! [`standard_webhooks`]. Signatures are compared in constant time and every
//! key is tried (rotation: add the new secret before removing the old).
//! Nothing here logs; failures carry only a machine-readable reason.
//! Cargo feature `signature`.

use http::HeaderMap;
use ring::hmac;
use subtle::ConstantTimeEq;

pub mod generic;
pub mod github;
pub mod gitlab;
pub mod shopify;
pub mod slack;
pub mod standard_webhooks;
pub mod stripe;
pub mod twilio;
pub mod twitch;

/// Why a request was not authenticated. The reason is safe to return to the
/// caller and to use as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Failure {
    /// A header the scheme needs is absent.
    #[error("missing_signature")]
    MissingSignature,
    /// The signature is malformed or matches none of the secrets.
    #[error("bad_signature")]
    BadSignature,
    /// The signed timestamp is too far from the receiver's clock (or not a
    /// number).
    #[error("timestamp_out_of_tolerance")]
    TimestampOutOfTolerance,
}

impl Failure {
    /// Every failure (the gateway removes an endpoint's series of each).
    pub const ALL: [Failure; 3] = [
        Failure::MissingSignature,
        Failure::BadSignature,
        Failure::TimestampOutOfTolerance,
    ];

    /// The reason as sent in the 401 body and used in metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::MissingSignature => "missing_signature",
            Failure::BadSignature => "bad_signature",
            Failure::TimestampOutOfTolerance => "timestamp_out_of_tolerance",
        }
    }
}

/// The parts of a received request that verification looks at.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    /// Request headers.
    pub headers: &'a HeaderMap,
    /// Raw request body, exactly as received.
    pub body: &'a [u8],
    /// Raw query string without `?` (Twilio signs it as part of the URL).
    pub query: Option<&'a str>,
    /// The receiver's clock, Unix seconds.
    pub now_unix: i64,
}

/// What a sender signs.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    /// The raw body.
    pub body: &'a [u8],
    /// The body's content type (Twilio signs form parameters).
    pub content_type: &'a str,
    /// Unix time, seconds.
    pub now: i64,
    /// A delivery/message id for schemes that carry one.
    pub id: &'a str,
    /// The URL the provider signs (Twilio).
    pub url: &'a str,
}

/// Headers to send, `(name, value)`.
pub type Headers = Vec<(String, String)>;

/// HMAC of the concatenation of `parts`.
pub fn mac(alg: hmac::Algorithm, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let key = hmac::Key::new(alg, key);
    let mut ctx = hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(p);
    }
    ctx.sign().as_ref().to_vec()
}

/// Whether the HMAC of `parts` under any of `keys` equals any of
/// `candidates`. Every comparison runs, each in constant time.
pub(crate) fn any_match(
    keys: &[Vec<u8>],
    alg: hmac::Algorithm,
    parts: &[&[u8]],
    candidates: &[Vec<u8>],
) -> bool {
    let mut ok = false;
    for key in keys {
        let tag = mac(alg, key, parts);
        for c in candidates {
            ok |= bool::from(tag.as_slice().ct_eq(c.as_slice()));
        }
    }
    ok
}

/// `Ok` when `ok`, else [`Failure::BadSignature`].
pub(crate) fn require(ok: bool) -> Result<(), Failure> {
    if ok {
        Ok(())
    } else {
        Err(Failure::BadSignature)
    }
}

/// A header's value as text, if present and visible ASCII.
pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A Unix-seconds timestamp within `tolerance` of `now`.
pub(crate) fn check_timestamp(ts: &str, now: i64, tolerance: i64) -> Result<(), Failure> {
    let t: i64 = ts
        .trim()
        .parse()
        .map_err(|_| Failure::TimestampOutOfTolerance)?;
    if now.abs_diff(t) > tolerance.unsigned_abs() {
        return Err(Failure::TimestampOutOfTolerance);
    }
    Ok(())
}

/// Whether a content type is a form (`application/x-www-form-urlencoded`).
pub fn is_form(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .eq_ignore_ascii_case("application/x-www-form-urlencoded")
}

fn pair(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_owned(), value.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_failure() {
        // A new variant fails to compile here until it is listed in ALL.
        for f in Failure::ALL {
            match f {
                Failure::MissingSignature
                | Failure::BadSignature
                | Failure::TimestampOutOfTolerance => {}
            }
        }
        let reasons: std::collections::HashSet<_> =
            Failure::ALL.iter().map(|f| f.reason()).collect();
        assert_eq!(reasons.len(), 3);
    }

    /// Each scheme's own headers verify, with the same key, and fail with
    /// another key or a changed body.
    #[test]
    fn what_is_signed_verifies_and_nothing_else_does() {
        let key = b"It's a Secret to Everybody".to_vec();
        let other = b"another".to_vec();
        let body = br#"{"type":"ping"}"#;
        let now = 1_700_000_000;
        let out = Outbound {
            body,
            content_type: "application/json",
            now,
            id: "msg_1",
            url: "https://hooks.example.com/gh",
        };
        type Signer = fn(&[u8], &Outbound<'_>) -> Result<Headers, String>;
        type Verify = fn(&[Vec<u8>], &Inbound<'_>) -> Result<(), Failure>;
        let schemes: [(&str, Signer, Verify); 6] = [
            ("github", github::sign, github::verify),
            ("stripe", stripe::sign, |k, r| stripe::verify(k, r, 300)),
            ("slack", slack::sign, |k, r| slack::verify(k, r, 300)),
            ("shopify", shopify::sign, shopify::verify),
            ("twitch", twitch::sign, |k, r| twitch::verify(k, r, 300)),
            ("standard", standard_webhooks::sign, |k, r| {
                standard_webhooks::verify(k, r, 300)
            }),
        ];
        for (name, sign, verify) in schemes {
            let mut h = HeaderMap::new();
            for (k, v) in sign(&key, &out).unwrap() {
                h.insert(
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            let req = |body: &'static [u8]| Inbound {
                headers: &h,
                body,
                query: None,
                now_unix: now,
            };
            assert_eq!(
                verify(std::slice::from_ref(&key), &req(body)),
                Ok(()),
                "{name}"
            );
            assert_eq!(
                verify(&[other.clone(), key.clone()], &req(body)),
                Ok(()),
                "{name}: any key"
            );
            assert_eq!(
                verify(std::slice::from_ref(&other), &req(body)),
                Err(Failure::BadSignature),
                "{name}"
            );
            assert_eq!(
                verify(std::slice::from_ref(&key), &req(br#"{"type":"pong"}"#)),
                Err(Failure::BadSignature),
                "{name}: body changed"
            );
            assert_eq!(
                verify(
                    std::slice::from_ref(&key),
                    &Inbound {
                        headers: &HeaderMap::new(),
                        ..req(body)
                    }
                ),
                Err(Failure::MissingSignature),
                "{name}"
            );
        }
    }
}

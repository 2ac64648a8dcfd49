//! Twitch EventSub: `Twitch-Eventsub-Message-Signature: sha256=<hex
//! HMAC-SHA256 of message id + timestamp + body>` (no separators), the
//! timestamp in RFC 3339 within tolerance.

use k8s_openapi::jiff::Timestamp;
use ring::hmac;

use super::{Failure, Headers, Inbound, Outbound, any_match, header, mac, pair, require};

fn signed<'a>(id: &'a str, ts: &'a str, body: &'a [u8]) -> [&'a [u8]; 3] {
    [id.as_bytes(), ts.as_bytes(), body]
}

/// The headers Twitch sends (a notification; Twitch adds nanoseconds to
/// the timestamp, whole seconds are as valid).
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    let ts = Timestamp::from_second(out.now)
        .map_err(|_| format!("time {} cannot be written as RFC 3339", out.now))?
        .to_string();
    let sig = mac(hmac::HMAC_SHA256, key, &signed(out.id, &ts, out.body));
    Ok(vec![
        pair("Twitch-Eventsub-Message-Id", out.id),
        pair("Twitch-Eventsub-Message-Retry", "0"),
        pair("Twitch-Eventsub-Message-Type", "notification"),
        pair(
            "Twitch-Eventsub-Message-Signature",
            format!("sha256={}", hex::encode(sig)),
        ),
        pair("Twitch-Eventsub-Message-Timestamp", ts),
    ])
}

/// Check a request against `keys`.
/// `tolerance`: the largest accepted distance, in seconds, between the
/// message timestamp and `req.now_unix`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>, tolerance: i64) -> Result<(), Failure> {
    let id = header(req.headers, "twitch-eventsub-message-id").ok_or(Failure::MissingSignature)?;
    let ts = header(req.headers, "twitch-eventsub-message-timestamp")
        .ok_or(Failure::MissingSignature)?;
    let sig = header(req.headers, "twitch-eventsub-message-signature")
        .ok_or(Failure::MissingSignature)?;
    let sig = sig
        .strip_prefix("sha256=")
        .and_then(|x| hex::decode(x.trim()).ok())
        .ok_or(Failure::BadSignature)?;
    require(any_match(
        keys,
        hmac::HMAC_SHA256,
        &signed(id, ts, req.body),
        &[sig],
    ))?;
    let t: Timestamp = ts
        .trim()
        .parse()
        .map_err(|_| Failure::TimestampOutOfTolerance)?;
    if req.now_unix.abs_diff(t.as_second()) > tolerance.unsigned_abs() {
        return Err(Failure::TimestampOutOfTolerance);
    }
    Ok(())
}

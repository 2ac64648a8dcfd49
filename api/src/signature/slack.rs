//! Slack: `X-Slack-Signature: v0=<hex HMAC-SHA256 of "v0:<ts>:<body>">`
//! with `X-Slack-Request-Timestamp`, within tolerance.

use ring::hmac;

use super::{
    Failure, Headers, Inbound, Outbound, any_match, check_timestamp, header, mac, pair, require,
};

fn signed<'a>(ts: &'a str, body: &'a [u8]) -> [&'a [u8]; 4] {
    [b"v0:", ts.as_bytes(), b":", body]
}

/// The headers Slack sends.
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    let ts = out.now.to_string();
    let sig = mac(hmac::HMAC_SHA256, key, &signed(&ts, out.body));
    Ok(vec![
        pair("X-Slack-Request-Timestamp", ts.clone()),
        pair("X-Slack-Signature", format!("v0={}", hex::encode(sig))),
    ])
}

/// Check a request against `keys`.
/// `tolerance`: the largest accepted distance, in seconds, between the
/// signed timestamp and `req.now_unix`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>, tolerance: i64) -> Result<(), Failure> {
    let sig = header(req.headers, "x-slack-signature").ok_or(Failure::MissingSignature)?;
    let ts = header(req.headers, "x-slack-request-timestamp").ok_or(Failure::MissingSignature)?;
    let sig = sig
        .strip_prefix("v0=")
        .and_then(|x| hex::decode(x.trim()).ok())
        .ok_or(Failure::BadSignature)?;
    require(any_match(
        keys,
        hmac::HMAC_SHA256,
        &signed(ts, req.body),
        &[sig],
    ))?;
    check_timestamp(ts, req.now_unix, tolerance)
}

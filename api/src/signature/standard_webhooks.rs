//! Standard Webhooks (and Svix): `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`
//! (space-separated when several keys sign). Keys are the decoded
//! `whsec_` secrets ([`crate::secret::key`]). The processor signs outbound
//! deliveries with [`signature`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;

use super::{
    Failure, Headers, Inbound, Outbound, any_match, check_timestamp, header, mac, pair, require,
};

/// Header carrying the message id.
pub const WEBHOOK_ID: &str = "webhook-id";
/// Header carrying the Unix timestamp (seconds) that was signed.
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the signatures.
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

fn signed<'a>(id: &'a str, ts: &'a str, body: &'a [u8]) -> [&'a [u8]; 5] {
    [id.as_bytes(), b".", ts.as_bytes(), b".", body]
}

/// The `webhook-signature` value for `id`, `timestamp` and `body` with the
/// key bytes `key`.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let sig = mac(hmac::HMAC_SHA256, key, &signed(id, &ts, body));
    format!("v1,{}", BASE64.encode(sig))
}

/// The three headers, with `key` as key bytes (decode a `whsec_` secret
/// with [`crate::secret::key`] first).
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    Ok(vec![
        pair(WEBHOOK_ID, out.id),
        pair(WEBHOOK_TIMESTAMP, out.now.to_string()),
        pair(WEBHOOK_SIGNATURE, signature(key, out.id, out.now, out.body)),
    ])
}

/// Check a request against `keys` (key bytes).
/// `tolerance`: the largest accepted distance, in seconds, between the
/// signed timestamp and `req.now_unix`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>, tolerance: i64) -> Result<(), Failure> {
    let id = header(req.headers, WEBHOOK_ID).ok_or(Failure::MissingSignature)?;
    let ts = header(req.headers, WEBHOOK_TIMESTAMP).ok_or(Failure::MissingSignature)?;
    let sigs = header(req.headers, WEBHOOK_SIGNATURE).ok_or(Failure::MissingSignature)?;
    let candidates: Vec<Vec<u8>> = sigs
        .split_ascii_whitespace()
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| BASE64.decode(s).ok())
        .collect();
    if candidates.is_empty() {
        return Err(Failure::BadSignature);
    }
    require(any_match(
        keys,
        hmac::HMAC_SHA256,
        &signed(id, ts, req.body),
        &candidates,
    ))?;
    check_timestamp(ts, req.now_unix, tolerance)
}

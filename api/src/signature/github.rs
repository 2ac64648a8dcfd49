//! GitHub: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`.

use ring::hmac;

use super::{Failure, Headers, Inbound, Outbound, any_match, header, mac, pair, require};

/// The signature header value for `body`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(mac(hmac::HMAC_SHA256, key, &[body]))
    )
}

/// The headers GitHub sends (a `ping` event).
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    Ok(vec![
        pair("X-Hub-Signature-256", signature(key, out.body)),
        pair("X-GitHub-Event", "ping"),
        pair("X-GitHub-Delivery", out.id),
    ])
}

/// Check a request against `keys`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>) -> Result<(), Failure> {
    let h = header(req.headers, "x-hub-signature-256").ok_or(Failure::MissingSignature)?;
    let sig = h
        .strip_prefix("sha256=")
        .and_then(|x| hex::decode(x.trim()).ok())
        .ok_or(Failure::BadSignature)?;
    require(any_match(keys, hmac::HMAC_SHA256, &[req.body], &[sig]))
}

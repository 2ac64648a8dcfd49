//! Shopify: `X-Shopify-Hmac-Sha256: <base64 HMAC-SHA256 of the body>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;

use super::{Failure, Headers, Inbound, Outbound, any_match, header, mac, pair, require};

/// The headers Shopify sends.
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    Ok(vec![
        pair(
            "X-Shopify-Hmac-Sha256",
            BASE64.encode(mac(hmac::HMAC_SHA256, key, &[out.body])),
        ),
        pair("X-Shopify-Webhook-Id", out.id),
    ])
}

/// Check a request against `keys`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>) -> Result<(), Failure> {
    let h = header(req.headers, "x-shopify-hmac-sha256").ok_or(Failure::MissingSignature)?;
    let sig = BASE64.decode(h.trim()).map_err(|_| Failure::BadSignature)?;
    require(any_match(keys, hmac::HMAC_SHA256, &[req.body], &[sig]))
}

//! Stripe: `Stripe-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`
//! (several `v1` while a secret is rolled), timestamp within tolerance.

use ring::hmac;

use super::{
    Failure, Headers, Inbound, Outbound, any_match, check_timestamp, header, mac, pair, require,
};

fn signed<'a>(ts: &'a str, body: &'a [u8]) -> [&'a [u8]; 3] {
    [ts.as_bytes(), b".", body]
}

/// The headers Stripe sends.
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    let ts = out.now.to_string();
    let sig = mac(hmac::HMAC_SHA256, key, &signed(&ts, out.body));
    Ok(vec![pair(
        "Stripe-Signature",
        format!("t={ts},v1={}", hex::encode(sig)),
    )])
}

/// Check a request against `keys`.
/// `tolerance`: the largest accepted distance, in seconds, between the
/// signed timestamp and `req.now_unix`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>, tolerance: i64) -> Result<(), Failure> {
    let h = header(req.headers, "stripe-signature").ok_or(Failure::MissingSignature)?;
    let mut t = None;
    let mut v1 = Vec::new();
    for item in h.split(',') {
        match item.trim().split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => {
                if let Ok(sig) = hex::decode(v) {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(Failure::BadSignature)?;
    if v1.is_empty() {
        return Err(Failure::BadSignature);
    }
    require(any_match(
        keys,
        hmac::HMAC_SHA256,
        &signed(t, req.body),
        &v1,
    ))?;
    check_timestamp(t, req.now_unix, tolerance)
}

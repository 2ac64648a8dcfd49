//! Twilio: `X-Twilio-Signature: <base64 HMAC-SHA1 of URL + sorted form
//! parameters>`. The URL is the one Twilio requested (the endpoint's
//! public URL with the request's query). A JSON body is covered by a
//! `bodySHA256` query parameter (in the signed URL) that must match the
//! body's SHA-256.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;
use subtle::ConstantTimeEq;

use super::{Failure, Headers, Inbound, Outbound, any_match, header, is_form, mac, pair, require};

/// What Twilio signs: `url`, then for a form body its parameters sorted by
/// name, each name followed by its value.
fn signed(url: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut data = url.as_bytes().to_vec();
    if is_form(content_type) {
        let mut params: Vec<(String, String)> = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        params.sort();
        for (k, v) in params {
            data.extend_from_slice(k.as_bytes());
            data.extend_from_slice(v.as_bytes());
        }
    }
    data
}

/// Lowercase hex SHA-256 of `body`, as Twilio's `bodySHA256` carries it.
pub fn body_sha256(body: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, body))
}

/// The header Twilio sends for a request to `out.url` (which, for a JSON
/// body, already carries `bodySHA256`).
pub fn sign(key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
    let data = signed(out.url, out.content_type, out.body);
    let sig = mac(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key, &[&data]);
    Ok(vec![pair("X-Twilio-Signature", BASE64.encode(sig))])
}

/// The URL Twilio signed for a request with `query` to the endpoint whose
/// public URL is `public_url` (a query written in `public_url` is the one
/// Twilio was given, so it arrives with the request and is not added
/// twice).
pub fn signed_url(public_url: &str, query: Option<&str>) -> String {
    match query.filter(|q| !q.is_empty()) {
        Some(q) => {
            let path = public_url.split_once('?').map_or(public_url, |(p, _)| p);
            format!("{path}?{q}")
        }
        None => public_url.to_owned(),
    }
}

/// Check a request against `keys`, for the endpoint's `public_url`.
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>, public_url: &str) -> Result<(), Failure> {
    let h = header(req.headers, "x-twilio-signature").ok_or(Failure::MissingSignature)?;
    let sig = BASE64.decode(h.trim()).map_err(|_| Failure::BadSignature)?;
    let url = signed_url(public_url, req.query);
    let content_type = header(req.headers, "content-type").unwrap_or_default();
    if !is_form(content_type) {
        if let Some(want) = req.query.and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "bodySHA256")
                .map(|(_, v)| v.into_owned())
        }) {
            // The JSON variant: the URL (with bodySHA256) is signed, and the
            // body must hash to the signed value.
            let got = body_sha256(req.body);
            if !bool::from(got.as_bytes().ct_eq(want.to_ascii_lowercase().as_bytes())) {
                return Err(Failure::BadSignature);
            }
        } else if !req.body.is_empty() {
            // Neither form parameters nor a signed bodySHA256: only the URL
            // is signed, so a body would be accepted unverified.
            return Err(Failure::BadSignature);
        }
    }
    let data = signed(&url, content_type, req.body);
    require(any_match(
        keys,
        hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        &[&data],
        &[sig],
    ))
}

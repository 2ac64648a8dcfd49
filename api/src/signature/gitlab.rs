//! GitLab: the secret token itself in `X-Gitlab-Token` (no HMAC),
//! compared in constant time.

use subtle::ConstantTimeEq;

use super::{Failure, Headers, Inbound, Outbound, pair, require};

/// The headers GitLab sends (a system hook).
pub fn sign(key: &[u8], _out: &Outbound<'_>) -> Result<Headers, String> {
    let token =
        String::from_utf8(key.to_vec()).map_err(|_| "a GitLab token must be text".to_owned())?;
    Ok(vec![
        pair("X-Gitlab-Token", token),
        pair("X-Gitlab-Event", "System Hook"),
    ])
}

/// Check a request against `keys` (the tokens).
pub fn verify(keys: &[Vec<u8>], req: &Inbound<'_>) -> Result<(), Failure> {
    let token = req
        .headers
        .get("x-gitlab-token")
        .ok_or(Failure::MissingSignature)?
        .as_bytes();
    let mut ok = false;
    for k in keys {
        ok |= bool::from(token.ct_eq(k.as_slice()));
    }
    require(ok)
}

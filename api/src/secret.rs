//! Secret values: one rule for every component that reads them (the gateway
//! in Kubernetes and file mode, the processor, the operator and the CLI).
//!
//! - Surrounding ASCII whitespace (spaces, tabs, CR, LF) is not part of a
//!   value: `echo secret > file`, `kubectl create secret --from-file` and
//!   editors add a trailing newline, and no provider issues secrets that
//!   begin or end with whitespace.
//! - Where a Standard Webhooks key is expected (`verification.scheme:
//!   standardWebhooks`, `processor.signing`), `whsec_<base64>` is decoded;
//!   anything else is used as raw bytes.
//! - A value that leaves no key bytes is never used: an empty HMAC key makes
//!   every signature computable by anyone.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Why a Secret value gives no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing left once surrounding whitespace (and a `whsec_` prefix) is
    /// removed.
    #[error("the secret value is empty")]
    Empty,
    /// `whsec_` followed by something that is not base64.
    #[error("the secret starts with whsec_ but the rest is not valid base64")]
    Whsec,
}

/// A Secret value without its surrounding ASCII whitespace.
pub fn value(raw: &[u8]) -> &[u8] {
    raw.trim_ascii()
}

/// The key bytes of a Secret value: trimmed, and with `whsec` (a Standard
/// Webhooks key is expected) a `whsec_<base64>` value decoded.
pub fn key(raw: &[u8], whsec: bool) -> Result<Vec<u8>, KeyError> {
    let v = value(raw);
    let key = match v.strip_prefix(b"whsec_").filter(|_| whsec) {
        Some(b64) => STANDARD.decode(b64).map_err(|_| KeyError::Whsec)?,
        None => v.to_vec(),
    };
    if key.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw value, whether a `whsec_` key is expected, and the key.
    type Case = (&'static [u8], bool, Result<&'static [u8], KeyError>);

    #[test]
    fn one_rule_for_whitespace_and_whsec() {
        let table: &[Case] = &[
            (b"secret", false, Ok(b"secret")),
            (b"secret\n", false, Ok(b"secret")),
            (b"  secret\r\n", false, Ok(b"secret")),
            (b"sec ret", false, Ok(b"sec ret")),
            (b"", false, Err(KeyError::Empty)),
            (b" \n", false, Err(KeyError::Empty)),
            // A literal token that happens to start with whsec_.
            (b"whsec_", false, Ok(b"whsec_")),
            (b"whsec_", true, Err(KeyError::Empty)),
            (b"whsec_ \n", true, Err(KeyError::Empty)),
            (b"whsec_aGVsbG8=\n", true, Ok(b"hello")),
            (b"whsec_not base64!", true, Err(KeyError::Whsec)),
            (b"whsec_aGVsbG8", true, Err(KeyError::Whsec)),
            (b"raw-standard-key", true, Ok(b"raw-standard-key")),
        ];
        for (raw, whsec, want) in table {
            let got = key(raw, *whsec);
            assert_eq!(
                got.as_deref().map_err(|e| *e),
                want.map(|w| w),
                "{:?} whsec={whsec}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}

//! The generic HMAC scheme (`verification.hmac`): a header (with an
//! optional prefix) carrying the hex or base64 HMAC (SHA-1, SHA-256 or
//! SHA-512) of a template over `{body}` and `{timestamp}`, the timestamp
//! read from its own header and checked against the tolerance.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::hmac;

use super::{
    Failure, Headers, Inbound, Outbound, any_match, check_timestamp, header, mac, pair, require,
};
use crate::{GenericHmac, HmacAlgorithm, SignatureEncoding};

/// `verification.hmac` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `timestampHeader` without `{timestamp}` in the signed content (the
    /// timestamp would be checked but not signed, so a replay with a fresh
    /// timestamp passes), or `{timestamp}` without the header.
    #[error("verification.hmac.timestampHeader and {{timestamp}} in signedContent go together")]
    TimestampNotSigned,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(Vec<u8>),
    Body,
    Timestamp,
}

fn parse_template(t: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut lit = Vec::new();
    let mut rest = t;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("{body}") {
            if !lit.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
            }
            parts.push(Part::Body);
            rest = r;
        } else if let Some(r) = rest.strip_prefix("{timestamp}") {
            if !lit.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut lit)));
            }
            parts.push(Part::Timestamp);
            rest = r;
        } else {
            let c = rest.chars().next().unwrap_or_default();
            let mut buf = [0u8; 4];
            lit.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            rest = &rest[c.len_utf8()..];
        }
    }
    if !lit.is_empty() {
        parts.push(Part::Literal(lit));
    }
    parts
}

/// One endpoint's `verification.hmac`, parsed.
#[derive(Debug, Clone)]
pub struct Generic {
    header: String,
    algorithm: hmac::Algorithm,
    encoding: SignatureEncoding,
    prefix: String,
    template: Vec<Part>,
    timestamp_header: Option<String>,
}

impl Generic {
    /// Parse the settings.
    pub fn new(g: &GenericHmac) -> Result<Self, TemplateError> {
        let template = parse_template(&g.signed_content);
        if g.timestamp_header.is_some() != template.contains(&Part::Timestamp) {
            return Err(TemplateError::TimestampNotSigned);
        }
        Ok(Self {
            header: g.header.clone(),
            algorithm: match g.algorithm {
                HmacAlgorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
                HmacAlgorithm::Sha256 => hmac::HMAC_SHA256,
                HmacAlgorithm::Sha512 => hmac::HMAC_SHA512,
            },
            encoding: g.encoding,
            prefix: g.prefix.clone().unwrap_or_default(),
            template,
            timestamp_header: g.timestamp_header.clone(),
        })
    }

    /// The signed content's parts for `body` and timestamp `ts`.
    fn parts<'a>(&'a self, body: &'a [u8], ts: &'a str) -> Vec<&'a [u8]> {
        self.template
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_slice(),
                Part::Body => body,
                Part::Timestamp => ts.as_bytes(),
            })
            .collect()
    }

    /// The signature header (and the timestamp header, if any).
    pub fn sign(&self, key: &[u8], out: &Outbound<'_>) -> Result<Headers, String> {
        let ts = out.now.to_string();
        let sig = mac(self.algorithm, key, &self.parts(out.body, &ts));
        let encoded = match self.encoding {
            SignatureEncoding::Hex => hex::encode(sig),
            SignatureEncoding::Base64 => BASE64.encode(sig),
        };
        let mut headers = vec![pair(&self.header, format!("{}{encoded}", self.prefix))];
        if let Some(th) = &self.timestamp_header {
            headers.push(pair(th, ts));
        }
        Ok(headers)
    }

    /// Check a request against `keys`.
    /// `tolerance`: the largest accepted distance, in seconds, between the
    /// timestamp header (when one is configured) and `req.now_unix`.
    pub fn verify(
        &self,
        keys: &[Vec<u8>],
        req: &Inbound<'_>,
        tolerance: i64,
    ) -> Result<(), Failure> {
        let h = header(req.headers, &self.header).ok_or(Failure::MissingSignature)?;
        let ts = match &self.timestamp_header {
            Some(name) => Some(header(req.headers, name).ok_or(Failure::MissingSignature)?),
            None => None,
        };
        let encoded = h
            .strip_prefix(self.prefix.as_str())
            .ok_or(Failure::BadSignature)?;
        let sig = match self.encoding {
            SignatureEncoding::Hex => hex::decode(encoded.trim()).ok(),
            SignatureEncoding::Base64 => BASE64.decode(encoded.trim()).ok(),
        }
        .ok_or(Failure::BadSignature)?;
        let parts = self.parts(req.body, ts.unwrap_or_default());
        require(any_match(keys, self.algorithm, &parts, &[sig]))?;
        match ts {
            Some(ts) => check_timestamp(ts, req.now_unix, tolerance),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_parsing() {
        assert_eq!(parse_template("{body}"), vec![Part::Body]);
        assert_eq!(
            parse_template("v0:{timestamp}:{body}{x}"),
            vec![
                Part::Literal(b"v0:".to_vec()),
                Part::Timestamp,
                Part::Literal(b":".to_vec()),
                Part::Body,
                Part::Literal(b"{x}".to_vec()),
            ]
        );
    }
}

//! `spillway send`: sign a test webhook like the provider and POST it to the
//! gateway.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use spillway_api::{GenericHmac, Scheme, WebhookEndpoint};

use crate::endpoint::EndpointRef;
use spillway_cli::sign;

/// Everything `send` needs, once resolved.
#[derive(Debug, Clone)]
pub struct SendArgs {
    /// The endpoint.
    pub ep: EndpointRef,
    /// Scheme (from the endpoint when not given).
    pub scheme: Option<Scheme>,
    /// File holding the secret.
    pub secret_from: Option<PathBuf>,
    /// Body file (`-` for stdin).
    pub body: PathBuf,
    /// Gateway base URL.
    pub gateway: String,
    /// Path on the gateway (from the endpoint when not given).
    pub path: Option<String>,
    /// Content type of the body.
    pub content_type: String,
    /// Extra headers `Name: value`.
    pub headers: Vec<String>,
    /// Delivery id for schemes that carry one.
    pub id: Option<String>,
}

/// Read a secret file; one trailing newline (as `echo` writes) is dropped.
pub fn read_secret(path: &PathBuf) -> Result<Vec<u8>> {
    let mut s =
        std::fs::read(path).with_context(|| format!("reading --secret-from {}", path.display()))?;
    if s.ends_with(b"\n") {
        s.pop();
        if s.ends_with(b"\r") {
            s.pop();
        }
    }
    Ok(s)
}

/// Join the gateway base URL and a path.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// Send it; returns the gateway's status code.
pub async fn run(args: SendArgs, we: Option<WebhookEndpoint>) -> Result<u16> {
    let scheme = match (args.scheme, &we) {
        (Some(s), _) => s,
        (None, Some(we)) => we.spec.verification.scheme,
        (None, None) => bail!("pass --scheme (or let spillway read it from the WebhookEndpoint)"),
    };
    let path = match (&args.path, &we) {
        (Some(p), _) => p.clone(),
        (None, Some(we)) => we
            .status
            .as_ref()
            .and_then(|s| s.path.clone())
            .or_else(|| we.spec.path.clone())
            .unwrap_or_else(|| {
                spillway_api::names::default_path(&args.ep.namespace, &args.ep.name)
            }),
        (None, None) => spillway_api::names::default_path(&args.ep.namespace, &args.ep.name),
    };
    let generic: Option<GenericHmac> = we.as_ref().and_then(|w| w.spec.verification.hmac.clone());
    let public_url = we
        .as_ref()
        .and_then(|w| w.spec.verification.public_url.clone());
    let secret = match (&args.secret_from, scheme) {
        (_, Scheme::None) => Vec::new(),
        (Some(p), _) => read_secret(p)?,
        (None, s) => bail!(
            "scheme {} needs --secret-from FILE (the provider's signing secret)",
            s.as_str()
        ),
    };
    let body = if args.body.as_os_str() == "-" {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
        b
    } else {
        std::fs::read(&args.body).with_context(|| format!("reading {}", args.body.display()))?
    };
    // Twilio: a non-form body is covered by a signed bodySHA256 in the URL.
    let target = sign::target(
        scheme,
        &join_url(&args.gateway, &path),
        public_url.as_deref(),
        &args.content_type,
        &body,
    );
    let url = target.post;
    let now = time::OffsetDateTime::now_utc();
    let id = args.id.clone().unwrap_or_else(|| {
        format!(
            "spillway-send-{}{:09}",
            now.unix_timestamp(),
            now.nanosecond()
        )
    });
    let signed = sign::headers(
        scheme,
        &secret,
        &sign::Request {
            body: &body,
            content_type: &args.content_type,
            now: now.unix_timestamp(),
            id: &id,
            url: &target.signed,
        },
        generic.as_ref(),
    )
    .map_err(anyhow::Error::msg)?;

    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut headers = reqwest::header::HeaderMap::new();
    let mut set = |k: &str, v: &str| -> Result<()> {
        headers.insert(
            reqwest::header::HeaderName::from_bytes(k.trim().as_bytes())
                .with_context(|| format!("invalid header name {k:?}"))?,
            reqwest::header::HeaderValue::from_str(v.trim())
                .with_context(|| format!("invalid value for header {k}"))?,
        );
        Ok(())
    };
    set("content-type", &args.content_type)?;
    for (k, v) in &signed {
        set(k, v)?;
    }
    // Extra headers last: they replace defaults such as X-GitHub-Event.
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?} is not `Name: value`"))?;
        set(k, v)?;
    }
    let req = client.post(&url).headers(headers).body(body);
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("POST {url}: {}", e.without_url()))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    println!("POST {url} ({} signed) -> {status}", scheme.as_str());
    if !text.trim().is_empty() {
        println!("{}", text.trim());
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_urls() {
        assert_eq!(join_url("http://gw:8080/", "/a/b"), "http://gw:8080/a/b");
        assert_eq!(join_url("http://gw:8080", "a"), "http://gw:8080/a");
    }

    #[test]
    fn drops_one_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("spillway-send-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s");
        std::fs::write(&f, "sekrit\r\n").unwrap();
        assert_eq!(read_secret(&f).unwrap(), b"sekrit");
        std::fs::write(&f, "sekrit\n\n").unwrap();
        assert_eq!(read_secret(&f).unwrap(), b"sekrit\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

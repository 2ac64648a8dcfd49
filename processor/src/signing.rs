//! Outbound signing with Standard Webhooks headers: `webhook-id`,
//! `webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "{id}.{timestamp}.{body}">`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spillway_api::signature::standard_webhooks;
pub use spillway_api::signature::standard_webhooks::{
    WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};

/// How often the secret file is re-read (Kubernetes updates mounted Secrets
/// in place, so a rotated secret is picked up without a restart).
const RELOAD_EVERY: Duration = Duration::from_secs(30);

/// A signing secret that cannot be used. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read the signing secret file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A `whsec_` secret whose remainder is not base64.
    #[error("the signing secret starts with whsec_ but the rest is not valid base64")]
    Base64,
    /// Nothing left after trimming.
    #[error("the signing secret is empty")]
    Empty,
}

/// The key bytes of a secret, by the one rule of [`spillway_api::secret`]:
/// surrounding whitespace ignored, `whsec_<base64>` decoded, anything else
/// used as raw bytes.
pub fn parse_secret(raw: &[u8]) -> Result<Vec<u8>, SecretError> {
    spillway_api::secret::key(raw, true).map_err(|e| match e {
        spillway_api::secret::KeyError::Empty => SecretError::Empty,
        spillway_api::secret::KeyError::Whsec => SecretError::Base64,
    })
}

/// Signs deliveries with one key (by the scheme's one implementation,
/// [`spillway_api::signature::standard_webhooks`], which the gateway
/// verifies with).
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer for the key bytes (see [`parse_secret`]).
    pub fn new(key: &[u8]) -> Self {
        Self { key: key.to_vec() }
    }

    /// The `webhook-signature` value for `id`, `timestamp` and `body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        standard_webhooks::signature(&self.key, id, timestamp, body)
    }
}

/// A signer backed by a file that is re-read now and then.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
    current: Mutex<(Instant, Arc<Signer>)>,
}

impl SecretFile {
    /// Load the file now; fails when it is unreadable or invalid.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, SecretError> {
        let path = path.into();
        let signer = Self::read(&path)?;
        Ok(Self {
            path,
            current: Mutex::new((Instant::now(), Arc::new(signer))),
        })
    }

    fn read(path: &PathBuf) -> Result<Signer, SecretError> {
        let raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Signer::new(&parse_secret(&raw)?))
    }

    /// The current signer (re-reading the file when it is due; a failed
    /// re-read keeps the previous secret and logs a warning).
    pub fn signer(&self) -> Arc<Signer> {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.0.elapsed() >= RELOAD_EVERY {
            match Self::read(&self.path) {
                Ok(s) => cur.1 = Arc::new(s),
                Err(e) => tracing::warn!(error = %e, "keeping the previous signing secret"),
            }
            cur.0 = Instant::now();
        }
        cur.1.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The example from the Standard Webhooks specification's reference
        // libraries (svix): secret, msg id, timestamp, payload, signature.
        let key = parse_secret(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let s = Signer::new(&key);
        let sig = s.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn raw_secrets_are_used_as_bytes_and_trimmed() {
        assert_eq!(parse_secret(b"hunter2\n").unwrap(), b"hunter2");
        assert!(matches!(parse_secret(b"  \n"), Err(SecretError::Empty)));
        assert!(matches!(
            parse_secret(b"whsec_!!!"),
            Err(SecretError::Base64)
        ));
        assert!(matches!(parse_secret(b"whsec_"), Err(SecretError::Empty)));
    }

    #[test]
    fn secret_file_loads_and_errors_do_not_leak_the_secret() {
        let dir = std::env::temp_dir().join(format!("spillway-sign-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("secret");
        std::fs::write(&f, "whsec_not base64 at all").unwrap();
        let e = SecretFile::load(&f).unwrap_err().to_string();
        assert!(!e.contains("not base64 at all"), "{e}");
        std::fs::write(&f, "raw-secret").unwrap();
        let sf = SecretFile::load(&f).unwrap();
        assert_eq!(
            sf.signer().sign("a", 1, b"x"),
            Signer::new(b"raw-secret").sign("a", 1, b"x")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The gateway's NATS connection options: credentials file, CA file, client
//! certificate for mutual TLS and `require_tls`. Every file is read and
//! checked before connecting, so a missing or malformed file stops the
//! gateway at start with the setting's name, never with the file's contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::config::Config;

/// A NATS credentials or TLS file is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{setting} {}: {reason}", path.display())]
pub struct NatsFileError {
    /// The setting, as spelled in the config file (e.g. `natsCredsFile`).
    pub setting: &'static str,
    /// The file.
    pub path: PathBuf,
    /// What is wrong (an I/O error or a fixed description; never contents).
    pub reason: String,
}

fn file_error(setting: &'static str, path: &Path, reason: impl Into<String>) -> NatsFileError {
    NatsFileError {
        setting,
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read(setting: &'static str, path: &Path) -> Result<Vec<u8>, NatsFileError> {
    std::fs::read(path).map_err(|e| file_error(setting, path, format!("cannot read: {e}")))
}

fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, NatsFileError> {
    let pem = read(setting, path)?;
    // The PEM parser's errors can quote a line of the file: report a fixed
    // reason instead.
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| file_error(setting, path, "not a valid PEM file"))?;
    if certs.is_empty() {
        return Err(file_error(setting, path, "no PEM CERTIFICATE found"));
    }
    Ok(certs)
}

/// Build the connect options of `config`, checking every file it names:
/// the credentials file must hold a user JWT and NKey seed, the CA file at
/// least one certificate, the client certificate and key must parse and
/// belong together.
pub fn connect_options(config: &Config) -> Result<async_nats::ConnectOptions, NatsFileError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name("spillway-gateway")
        .retry_on_initial_connect()
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => info!("connected to NATS"),
                async_nats::Event::Disconnected => warn!("disconnected from NATS"),
                // Authorization violations, TLS failures and the like; these
                // messages carry no credentials.
                other => warn!(event = %other, "NATS connection event"),
            }
        });
    if let Some(path) = &config.nats_creds_file {
        const SETTING: &str = "natsCredsFile";
        let bytes = read(SETTING, path)?;
        let text = String::from_utf8(bytes)
            .map_err(|_| file_error(SETTING, path, "not a text (.creds) file"))?;
        // async-nats' parse errors name what is missing, not the contents.
        opts = opts
            .credentials(&text)
            .map_err(|e| file_error(SETTING, path, e.to_string()))?;
    }
    if let Some(path) = &config.nats_tls_ca_file {
        certificates("natsTlsCaFile", path)?;
        opts = opts.add_root_certificates(path.clone());
    }
    match (&config.nats_tls_cert_file, &config.nats_tls_key_file) {
        (Some(cert), Some(key)) => {
            let chain = certificates("natsTlsCertFile", cert)?;
            let key_pem = read("natsTlsKeyFile", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|_| file_error("natsTlsKeyFile", key, "no PEM private key found"))?;
            // Refuse a key that does not belong to the certificate now
            // rather than on every connection attempt.
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| file_error("natsTlsCertFile", cert, e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| {
                file_error(
                    "natsTlsKeyFile",
                    key,
                    format!("does not go with natsTlsCertFile: {e}"),
                )
            })?;
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        (Some(cert), None) => {
            return Err(file_error("natsTlsCertFile", cert, "needs natsTlsKeyFile"));
        }
        (None, Some(key)) => {
            return Err(file_error("natsTlsKeyFile", key, "needs natsTlsCertFile"));
        }
        (None, None) => {}
    }
    if config.nats_tls_required {
        opts = opts.require_tls(true);
    }
    Ok(opts)
}

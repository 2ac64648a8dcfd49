//! The gateway's NATS connection options: credentials file, CA file, client
//! certificate for mutual TLS and `require_tls`, checked by the shared
//! [`spillway_api::nats`] before connecting, so a missing or malformed file
//! stops the gateway at start with the setting's name (as spelled in the
//! config file), never with the file's contents.

use spillway_api::nats::{NatsAuth, SettingNames};
use tracing::{info, warn};

use crate::config::Config;

pub use spillway_api::nats::NatsFileError;

/// The credentials and TLS files of `config`.
pub fn auth(config: &Config) -> NatsAuth {
    NatsAuth {
        creds_file: config.nats_creds_file.clone(),
        tls_ca_file: config.nats_tls_ca_file.clone(),
        tls_cert_file: config.nats_tls_cert_file.clone(),
        tls_key_file: config.nats_tls_key_file.clone(),
        tls_required: config.nats_tls_required,
        token_file: config.nats_token_file.clone(),
        user_file: config.nats_user_file.clone(),
        password_file: config.nats_password_file.clone(),
    }
}

/// Build the connect options of `config`, checking every file it names
/// (see [`NatsAuth::connect_options`]).
pub fn connect_options(config: &Config) -> Result<async_nats::ConnectOptions, NatsFileError> {
    Ok(auth(config)
        .connect_options(SettingNames::CONFIG_FILE)?
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
        }))
}

//! The shared ingress gateway: verifies webhooks, answers handshakes and
//! stores accepted requests in JetStream before answering the provider.
#![forbid(unsafe_code)]

pub mod config;
pub mod delivery;
pub mod error;
pub mod handshake;
pub mod listener;
pub mod message;
pub mod metrics;
pub mod nats;
pub mod route;
pub mod run;
pub mod server;
pub mod source;
pub mod verify;

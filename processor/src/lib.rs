//! Spillway's processor: pulls stored webhooks from an endpoint's JetStream
//! consumers and delivers them to the sink with a hard concurrency cap,
//! retries with backoff, dead letters, per-key ordering and outbound signing.
#![forbid(unsafe_code)]

pub mod admin;
pub mod attempts;
pub mod dead_letter;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod notice;
pub mod outcome;
pub mod run;
pub mod settings;
pub mod signing;

//! Library part of the `spillway` CLI: provider-style request signing, shared
//! with the local demo (`spillway-local`) so there is one implementation of
//! "sign like the provider does"; and `--port-forward`'s discovery and TLS
//! ([`reach`]).
#![forbid(unsafe_code)]

pub mod reach;
pub mod sign;

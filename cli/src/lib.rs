//! Library part of the `spillway` CLI: provider-style request signing, shared
//! with the local demo (`spillway-local`) so there is one implementation of
//! "sign like the provider does".
#![forbid(unsafe_code)]

pub mod sign;

//! The `spillway-gateway` binary.
fn main() {}

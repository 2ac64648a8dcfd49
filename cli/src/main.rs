//! The `spillway` command line (work in progress).
fn main() {}

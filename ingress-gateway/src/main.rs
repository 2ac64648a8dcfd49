//! Placeholder main; replaced by its issue.
fn main() {}

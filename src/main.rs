//! The `postern` command line.

fn main() {}

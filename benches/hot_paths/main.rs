//! Benchmarks of the work Postern does on every connection before it can splice bytes:
//! parsing the pre-login dialogue, deciding access from the security profiles, and
//! decrypting the upstream credential from the vault.
//!
//! Run with `cargo bench --bench hot_paths`; add `-- --quick` for a faster, rougher pass
//! or `-- --test` to only check that every benchmark runs.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

mod access;
mod preauth;
mod vault;

/// Short runs with few samples, so the whole suite stays near a minute on two cores.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = hot_paths;
    config = config();
    targets = preauth::bench, access::bench, vault::bench
}
criterion_main!(hot_paths);

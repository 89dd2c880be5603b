//! Test harness shared by the integration tests: real slapd and Dovecot servers started on
//! free loopback ports with throw-away configs, a test certificate authority, an SMTP sink
//! and a small mail client.
//!
//! Each server starts once per test binary and is shared; tests use distinct users.
#![allow(dead_code)]

pub mod client;
pub mod dovecot;
pub mod logs;
pub mod mail;
pub mod oauth;
pub mod pki;
pub mod proxy;
pub mod sink;
pub mod slapd;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1 (bound, then released for the caller to use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free loopback port")
}

/// The path of `name` on `PATH` or in the usual sbin folders; panics with an install hint.
pub fn require_binary(name: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("`{name}` is not installed; these tests need it: apt-get install {package} (.ci/run does this)")
    })
}

/// This process's resident memory, KiB (Linux).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

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
pub mod redis;
pub mod sink;
pub mod slapd;
pub mod webhook;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1 (bound, then released for the caller to use), only for the
/// external servers (slapd, Dovecot), which start again on new ports when another process
/// took one in between. Whatever runs in this process binds port 0 and reads its address.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("no free loopback port")
}

/// A loopback port where connections are refused, held for as long as this lives: the socket
/// is bound but does not listen, so no other process can take the port meanwhile.
pub struct ClosedPort {
    _socket: tokio::net::TcpSocket,
    /// The port.
    pub port: u16,
}

/// A [`ClosedPort`] on 127.0.0.1.
pub fn closed_port() -> ClosedPort {
    let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
    socket.bind("127.0.0.1:0".parse().expect("address")).expect("bind a loopback port");
    let port = socket.local_addr().expect("bound address").port();
    ClosedPort { _socket: socket, port }
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

/// The resident memory of process `pid`, KiB (Linux); panics if it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{status}"))
}

/// Runs all `futures` concurrently on this task; their outputs in order.
pub async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}

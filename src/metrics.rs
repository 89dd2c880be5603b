//! Prometheus metrics: relaxed atomic counters and fixed-bucket histograms, rendered in the
//! text exposition format; the daemon's HTTP endpoint serves them at `/metrics`.
//!
//! Every counter is bounded in cardinality: protocols are three, login outcomes and reasons
//! come from a fixed list, so a scrape never grows with the number of users.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::protocol::Protocol;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const PROTOCOLS: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How one login attempt ended, as counted: the `outcome` and `reason` labels. The access
/// decision names them (`Refusal::labels`), one pair per kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LoginResult {
    /// `ok`, `denied` or `unavailable`.
    pub outcome: &'static str,
    /// Why, from a bounded set.
    pub reason: &'static str,
}

impl LoginResult {
    /// A login that got through.
    pub const OK: LoginResult = LoginResult { outcome: "ok", reason: "ok" };
}

/// A latency histogram with fixed buckets; observations are lock-free.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
}

/// Per-protocol counter triple.
#[derive(Debug, Default)]
struct PerProtocol([AtomicU64; 3]);

impl PerProtocol {
    fn add(&self, protocol: Protocol, n: u64) {
        self.0[slot(protocol)].fetch_add(n, Ordering::Relaxed);
    }
    fn sub(&self, protocol: Protocol) {
        self.0[slot(protocol)].fetch_sub(1, Ordering::Relaxed);
    }
    fn get(&self, protocol: Protocol) -> u64 {
        self.0[slot(protocol)].load(Ordering::Relaxed)
    }
    fn render(&self, out: &mut String, name: &str, kind: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for p in PROTOCOLS {
            let _ = writeln!(out, "{name}{{protocol=\"{p}\"}} {}", self.get(p));
        }
    }
}

fn slot(protocol: Protocol) -> usize {
    match protocol {
        Protocol::Imap => 0,
        Protocol::Pop3 => 1,
        Protocol::Smtp => 2,
    }
}

/// Every metric the daemon exports.
#[derive(Debug, Default)]
pub struct Metrics {
    sessions_active: PerProtocol,
    sessions_total: PerProtocol,
    logins: std::sync::Mutex<std::collections::BTreeMap<LoginResult, u64>>,
    bytes_up: PerProtocol,
    bytes_down: PerProtocol,
    tls_failures: PerProtocol,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    sessions_revoked: AtomicU64,
    /// Time the directory takes to look a user up or check a password.
    pub directory_latency: Histogram,
    /// Time the upstream takes to accept (or refuse) a login.
    pub upstream_latency: Histogram,
    /// Time the whole access decision takes, from credentials to upstream session.
    pub login_latency: Histogram,
}

/// Counts a session as active until dropped.
#[derive(Debug)]
pub struct ActiveSession {
    metrics: Arc<Metrics>,
    protocol: Protocol,
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.metrics.sessions_active.sub(self.protocol);
    }
}

impl Metrics {
    /// A TLS connection was accepted; it counts as active until the guard is dropped.
    pub fn session_started(self: &Arc<Self>, protocol: Protocol) -> ActiveSession {
        self.sessions_total.add(protocol, 1);
        self.sessions_active.add(protocol, 1);
        ActiveSession { metrics: self.clone(), protocol }
    }

    /// Sessions open now for `protocol`.
    pub fn active(&self, protocol: Protocol) -> u64 {
        self.sessions_active.get(protocol)
    }

    /// Sessions accepted since start for `protocol`.
    pub fn total(&self, protocol: Protocol) -> u64 {
        self.sessions_total.get(protocol)
    }

    /// Counts one login attempt.
    pub fn login(&self, result: LoginResult) {
        *self.logins.lock().unwrap_or_else(|e| e.into_inner()).entry(result).or_default() += 1;
    }

    /// Login attempts counted with `result`.
    pub fn logins(&self, result: LoginResult) -> u64 {
        self.logins.lock().unwrap_or_else(|e| e.into_inner()).get(&result).copied().unwrap_or(0)
    }

    /// Adds the bytes a finished splice relayed.
    pub fn relayed(&self, protocol: Protocol, up: u64, down: u64) {
        self.bytes_up.add(protocol, up);
        self.bytes_down.add(protocol, down);
    }

    /// Counts a failed or timed-out client TLS handshake.
    pub fn tls_failure(&self, protocol: Protocol) {
        self.tls_failures.add(protocol, 1);
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        let counter = if ok { &self.reloads_ok } else { &self.reloads_failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts live sessions closed because their user no longer passes the access checks.
    pub fn revoked(&self, n: u64) {
        self.sessions_revoked.fetch_add(n, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        self.sessions_active.render(&mut out, "postern_sessions_active", "gauge", "Client connections open now.");
        self.sessions_total.render(
            &mut out,
            "postern_sessions_total",
            "counter",
            "Client connections accepted (after TLS).",
        );
        let _ = writeln!(
            out,
            "# HELP postern_logins_total Login attempts by outcome and reason.\n# TYPE postern_logins_total counter"
        );
        for (LoginResult { outcome, reason }, count) in self.logins.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "postern_logins_total{{outcome=\"{outcome}\",reason=\"{reason}\"}} {count}");
        }
        self.bytes_up.render(
            &mut out,
            "postern_bytes_up_total",
            "counter",
            "Bytes relayed client to upstream by finished sessions.",
        );
        self.bytes_down.render(
            &mut out,
            "postern_bytes_down_total",
            "counter",
            "Bytes relayed upstream to client by finished sessions.",
        );
        self.tls_failures.render(
            &mut out,
            "postern_tls_handshake_failures_total",
            "counter",
            "Client TLS handshakes that failed or timed out.",
        );
        let _ = writeln!(
            out,
            "# HELP postern_reloads_total Reloads by result.\n# TYPE postern_reloads_total counter\npostern_reloads_total{{result=\"ok\"}} {}\npostern_reloads_total{{result=\"failed\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP postern_sessions_revoked_total Live sessions closed because the user no longer passes the access checks.\n# TYPE postern_sessions_revoked_total counter\npostern_sessions_revoked_total {}",
            self.sessions_revoked.load(Ordering::Relaxed)
        );
        self.directory_latency.render(
            &mut out,
            "postern_directory_seconds",
            "Directory lookup and password check latency.",
        );
        self.upstream_latency.render(&mut out, "postern_upstream_login_seconds", "Upstream login latency.");
        self.login_latency.render(
            &mut out,
            "postern_login_seconds",
            "Whole access decision latency, upstream login included.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_logins_and_fills_histograms_cumulatively() {
        let m = Arc::new(Metrics::default());
        let guard = m.session_started(Protocol::Pop3);
        m.login(LoginResult::OK);
        m.login(LoginResult { outcome: "denied", reason: "wrong password" });
        m.login_latency.observe(Duration::from_millis(30));
        m.login_latency.observe(Duration::from_secs(100));
        let text = m.render();
        assert!(text.contains("postern_sessions_active{protocol=\"pop3\"} 1"), "{text}");
        assert!(text.contains("postern_logins_total{outcome=\"ok\",reason=\"ok\"} 1"));
        assert!(text.contains("postern_logins_total{outcome=\"denied\",reason=\"wrong password\"} 1"));
        assert!(text.contains("postern_login_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("postern_login_seconds_bucket{le=\"30\"} 1"));
        assert!(text.contains("postern_login_seconds_bucket{le=\"+Inf\"} 2"));
        drop(guard);
        assert!(m.render().contains("postern_sessions_active{protocol=\"pop3\"} 0"));
    }
}

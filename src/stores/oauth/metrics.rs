//! Counters of token endpoint traffic and latency, read at any time with
//! [`TokenMetrics::snapshot`]. The request and cache-hit counts are the ones the daemon
//! exports on `/metrics` ([`TokenMetrics::exported`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::metrics::{Success, TokenEndpointMetrics};

/// Live counters of one token source.
#[derive(Debug, Default)]
pub struct TokenMetrics {
    exported: TokenEndpointMetrics,
    latency_total_us: AtomicU64,
    latency_last_us: AtomicU64,
    latency_max_us: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Requests sent to the token endpoint.
    pub requests: u64,
    /// Of those, the ones that produced no token.
    pub failures: u64,
    /// Logins served from the cache without a request.
    pub cache_hits: u64,
    /// Latency of the last request.
    pub last_latency: Duration,
    /// Highest latency seen.
    pub max_latency: Duration,
    /// Sum of all latencies (with `requests`, the mean).
    pub total_latency: Duration,
}

impl MetricsSnapshot {
    /// Mean latency per request, if any was made.
    pub fn mean_latency(&self) -> Option<Duration> {
        u32::try_from(self.requests).ok().filter(|&n| n > 0).map(|n| self.total_latency / n)
    }
}

impl TokenMetrics {
    /// Counts one request to the endpoint that took `latency`.
    pub(crate) fn record_request(&self, latency: Duration, ok: bool) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.exported.request(Success::of(ok));
        self.latency_total_us.fetch_add(us, Ordering::Relaxed);
        self.latency_last_us.store(us, Ordering::Relaxed);
        self.latency_max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Counts one token served from the cache.
    pub(crate) fn record_hit(&self) {
        self.exported.cache_hit();
    }

    /// Counts requests and cache hits in `exported` (shared by every source) from now on.
    pub(crate) fn export_into(&mut self, exported: &TokenEndpointMetrics) {
        self.exported = exported.clone();
    }

    /// The request and cache-hit counters, for the daemon's metrics registry.
    pub fn exported(&self) -> &TokenEndpointMetrics {
        &self.exported
    }

    /// The counters now.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let us = |a: &AtomicU64| Duration::from_micros(a.load(Ordering::Relaxed));
        let failures = self.exported.requests(Success::Failed);
        MetricsSnapshot {
            requests: self.exported.requests(Success::Ok) + failures,
            failures,
            cache_hits: self.exported.cache_hits(),
            last_latency: us(&self.latency_last_us),
            max_latency: us(&self.latency_max_us),
            total_latency: us(&self.latency_total_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_aggregates_requests() {
        let m = TokenMetrics::default();
        assert_eq!(m.snapshot().mean_latency(), None);
        m.record_request(Duration::from_millis(10), true);
        m.record_request(Duration::from_millis(30), false);
        m.record_hit();
        let s = m.snapshot();
        assert_eq!((s.requests, s.failures, s.cache_hits), (2, 1, 1));
        assert_eq!(s.last_latency, Duration::from_millis(30));
        assert_eq!(s.max_latency, Duration::from_millis(30));
        assert_eq!(s.mean_latency(), Some(Duration::from_millis(20)));
    }
}

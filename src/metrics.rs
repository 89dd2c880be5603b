//! Prometheus metrics, kept in a `prometheus_client` registry and rendered in the Prometheus
//! text format (version 0.0.4); the daemon's HTTP endpoint serves them at `/metrics`.
//!
//! Every series is bounded in cardinality: label values are typed (a protocol, an outcome,
//! a reload or token result) or, for a login's `reason`, come from the access decision's
//! fixed list, so a scrape never grows with the number of users.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, prometheus_text};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::protocol::Protocol;

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

const PROTOCOLS: [Protocol; 3] = [Protocol::Imap, Protocol::Pop3, Protocol::Smtp];

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

impl EncodeLabelValue for Protocol {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: Protocol,
}

/// The `outcome` label of a login attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// The login got through.
    Ok,
    /// The login was refused.
    Denied,
    /// The login could not be decided or completed; the client was told to try later.
    Unavailable,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Unavailable => "unavailable",
        }
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// How one login attempt ended, as counted: the `outcome` and `reason` labels. The access
/// decision names them (`Refusal::labels`), one pair per kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct LoginResult {
    /// Whether the login got through, was refused or could not be completed.
    pub outcome: Outcome,
    /// Why, from the access decision's fixed list.
    pub reason: &'static str,
}

impl LoginResult {
    /// A login that got through.
    pub const OK: LoginResult = LoginResult { outcome: Outcome::Ok, reason: "ok" };
}

/// The `reason` label of a connection closed because of its PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyRefusal {
    /// The peer is not in the listener's `trusted_proxies`.
    Untrusted,
    /// The balancer address had too many headers being read at once.
    Busy,
    /// The header did not arrive within `limits.proxy_header_timeout_secs`.
    Timeout,
    /// The connection ended (or failed) before the header was complete.
    Truncated,
    /// No PROXY protocol signature: the peer sent something else.
    Signature,
    /// A header over its size limit.
    TooLong,
    /// A malformed header.
    Malformed,
    /// A version 2 header for an address family other than TCP over IPv4 or IPv6.
    Family,
}

impl ProxyRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyRefusal::Untrusted => "untrusted",
            ProxyRefusal::Busy => "busy",
            ProxyRefusal::Timeout => "timeout",
            ProxyRefusal::Truncated => "truncated",
            ProxyRefusal::Signature => "signature",
            ProxyRefusal::TooLong => "too-long",
            ProxyRefusal::Malformed => "malformed",
            ProxyRefusal::Family => "family",
        }
    }
}

impl EncodeLabelValue for ProxyRefusal {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ProxyRefusalLabels {
    protocol: Protocol,
    reason: ProxyRefusal,
}

/// The `result` label of a reload or of a token endpoint request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Success {
    /// It worked.
    Ok,
    /// It did not.
    Failed,
}

impl Success {
    /// `Ok` when `ok`, else `Failed`.
    pub fn of(ok: bool) -> Self {
        if ok { Success::Ok } else { Success::Failed }
    }
}

impl EncodeLabelValue for Success {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Success::Ok => "ok",
            Success::Failed => "failed",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: Success,
}

/// A family by `result` with both series at zero.
fn by_result() -> Family<ResultLabels, Counter> {
    let family = Family::default();
    for result in [Success::Ok, Success::Failed] {
        drop(family.get_or_create(&ResultLabels { result }));
    }
    family
}

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug, Clone)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Self(prometheus_client::metrics::histogram::Histogram::new(BUCKETS))
    }
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        self.0.observe(elapsed.as_secs_f64());
    }
}

/// One series per protocol, every one created up front so a scrape shows all three.
#[derive(Debug)]
struct PerProtocol<M>([M; 3]);

impl<M> PerProtocol<M>
where
    M: EncodeMetric + TypedMetric + Clone + Default + std::fmt::Debug + Send + Sync + 'static,
{
    fn register(registry: &mut Registry, name: &str, help: &str) -> Self {
        let family = Family::<ProtocolLabels, M>::default();
        let each = PROTOCOLS.map(|protocol| family.get_or_create_owned(&ProtocolLabels { protocol }));
        registry.register(name, help, family);
        Self(each)
    }

    fn of(&self, protocol: Protocol) -> &M {
        &self.0[match protocol {
            Protocol::Imap => 0,
            Protocol::Pop3 => 1,
            Protocol::Smtp => 2,
        }]
    }
}

/// The OAuth2 token endpoint's counters: shared by the token source that updates them and
/// the registry that exports them ([`Metrics::export_token_endpoint`]).
#[derive(Debug, Clone)]
pub struct TokenEndpointMetrics {
    requests: Family<ResultLabels, Counter>,
    cache_hits: Counter,
}

impl Default for TokenEndpointMetrics {
    fn default() -> Self {
        Self { requests: by_result(), cache_hits: Counter::default() }
    }
}

impl TokenEndpointMetrics {
    /// Counts one request to the token endpoint.
    pub fn request(&self, result: Success) {
        self.requests.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one token served from the cache without a request.
    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    /// Requests counted with `result`.
    pub fn requests(&self, result: Success) -> u64 {
        self.requests.get_or_create(&ResultLabels { result }).get()
    }

    /// Tokens served from the cache.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.get()
    }
}

/// The alert webhooks' counters: shared by the delivery tasks that update them and the
/// registry that exports them ([`Metrics::export_alerts`]).
#[derive(Debug, Clone)]
pub struct AlertMetrics {
    sent: Family<ResultLabels, Counter>,
    dropped: Counter,
}

impl Default for AlertMetrics {
    fn default() -> Self {
        Self { sent: by_result(), dropped: Counter::default() }
    }
}

impl AlertMetrics {
    /// Counts one alert delivered (`Ok`) or given up after its retries (`Failed`).
    pub fn sent(&self, result: Success) {
        self.sent.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts one alert dropped because a webhook's queue was full.
    pub fn dropped(&self) {
        self.dropped.inc();
    }

    /// Alerts counted with `result`.
    pub fn sent_count(&self, result: Success) -> u64 {
        self.sent.get_or_create(&ResultLabels { result }).get()
    }

    /// Alerts dropped.
    pub fn dropped_count(&self) -> u64 {
        self.dropped.get()
    }
}

/// Every metric the daemon exports, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions_active: PerProtocol<Gauge>,
    sessions_total: PerProtocol<Counter>,
    logins: Family<LoginResult, Counter>,
    bytes_up: PerProtocol<Counter>,
    bytes_down: PerProtocol<Counter>,
    tls_failures: PerProtocol<Counter>,
    proxy_refusals: Family<ProxyRefusalLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    sessions_revoked: Counter,
    /// Time the directory takes to look a user up or check a password.
    pub directory_latency: Histogram,
    /// Time the upstream takes to accept (or refuse) a login.
    pub upstream_latency: Histogram,
    /// Time the whole access decision takes, from credentials to upstream session.
    pub login_latency: Histogram,
    /// 1 while the state store (lockout and session counters) answers, 0 while it is down.
    pub state_store_up: Gauge,
    /// Tokio tasks alive in the runtime that renders the metrics (the daemon's), read at
    /// each render: see [`Metrics::render`].
    tokio_tasks_alive: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts a session as active until dropped.
#[derive(Debug)]
pub struct ActiveSession(Gauge);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Every metric at zero, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let r = &mut registry;
        let sessions_active = PerProtocol::register(r, "postern_sessions_active", "Client connections open now");
        let sessions_total = PerProtocol::register(r, "postern_sessions", "Client connections accepted (after TLS)");
        let logins = Family::<LoginResult, Counter>::default();
        r.register("postern_logins", "Login attempts by outcome and reason", logins.clone());
        let bytes_up =
            PerProtocol::register(r, "postern_bytes_up", "Bytes relayed client to upstream by finished sessions");
        let bytes_down =
            PerProtocol::register(r, "postern_bytes_down", "Bytes relayed upstream to client by finished sessions");
        let tls_failures = PerProtocol::register(
            r,
            "postern_tls_handshake_failures",
            "Client TLS handshakes that failed or timed out",
        );
        let proxy_refusals = Family::<ProxyRefusalLabels, Counter>::default();
        r.register(
            "postern_proxy_header_refusals",
            "Connections closed because of their PROXY protocol header (or its absence), by reason",
            proxy_refusals.clone(),
        );
        let reloads = by_result();
        r.register("postern_reloads", "Reloads by result", reloads.clone());
        let sessions_revoked = Counter::default();
        r.register(
            "postern_sessions_revoked",
            "Live sessions closed because the user no longer passes the access checks",
            sessions_revoked.clone(),
        );
        let directory_latency = Histogram::default();
        r.register(
            "postern_directory_seconds",
            "Directory lookup and password check latency",
            directory_latency.0.clone(),
        );
        let upstream_latency = Histogram::default();
        r.register("postern_upstream_login_seconds", "Upstream login latency", upstream_latency.0.clone());
        let login_latency = Histogram::default();
        r.register(
            "postern_login_seconds",
            "Whole access decision latency, upstream login included",
            login_latency.0.clone(),
        );
        let state_store_up = Gauge::default();
        state_store_up.set(1);
        r.register(
            "postern_state_store_up",
            "Whether the store of lockout and session counters answers (1) or not (0)",
            state_store_up.clone(),
        );
        let tokio_tasks_alive = Gauge::default();
        r.register(
            "postern_tokio_tasks_alive",
            "Tasks alive in the daemon's async runtime (spawned and not finished), read at each scrape",
            tokio_tasks_alive.clone(),
        );
        Self {
            registry,
            state_store_up,
            tokio_tasks_alive,
            sessions_active,
            sessions_total,
            logins,
            bytes_up,
            bytes_down,
            tls_failures,
            proxy_refusals,
            reloads,
            sessions_revoked,
            directory_latency,
            upstream_latency,
            login_latency,
        }
    }

    /// Exports the alert webhooks' counters too (`postern_alerts_sent_total{result}`,
    /// `postern_alerts_dropped_total`).
    pub fn export_alerts(&mut self, alerts: &AlertMetrics) {
        self.registry.register(
            "postern_alerts_sent",
            "Alerts to webhooks by result: delivered, or failed after every retry",
            alerts.sent.clone(),
        );
        self.registry.register(
            "postern_alerts_dropped",
            "Alerts dropped because a webhook's queue was full",
            alerts.dropped.clone(),
        );
    }

    /// Exports the OAuth2 token endpoint's counters too.
    pub fn export_token_endpoint(&mut self, token: &TokenEndpointMetrics) {
        self.registry.register(
            "postern_oauth_token_requests",
            "Requests to the OAuth2 token endpoint by result",
            token.requests.clone(),
        );
        self.registry.register(
            "postern_oauth_token_cache_hits",
            "OAuth2 access tokens served from the cache without a request",
            token.cache_hits.clone(),
        );
    }

    /// A TLS connection was accepted; it counts as active until the guard is dropped.
    pub fn session_started(&self, protocol: Protocol) -> ActiveSession {
        self.sessions_total.of(protocol).inc();
        let active = self.sessions_active.of(protocol).clone();
        active.inc();
        ActiveSession(active)
    }

    /// Sessions open now for `protocol`.
    pub fn active(&self, protocol: Protocol) -> u64 {
        u64::try_from(self.sessions_active.of(protocol).get()).unwrap_or(0)
    }

    /// Sessions accepted since start for `protocol`.
    pub fn total(&self, protocol: Protocol) -> u64 {
        self.sessions_total.of(protocol).get()
    }

    /// Counts one login attempt.
    pub fn login(&self, result: LoginResult) {
        self.logins.get_or_create(&result).inc();
    }

    /// Login attempts counted with `result`.
    pub fn logins(&self, result: LoginResult) -> u64 {
        self.logins.get(&result).map_or(0, |c| c.get())
    }

    /// Adds the bytes a finished splice relayed.
    pub fn relayed(&self, protocol: Protocol, up: u64, down: u64) {
        self.bytes_up.of(protocol).inc_by(up);
        self.bytes_down.of(protocol).inc_by(down);
    }

    /// Counts a failed or timed-out client TLS handshake.
    pub fn tls_failure(&self, protocol: Protocol) {
        self.tls_failures.of(protocol).inc();
    }

    /// Counts a connection closed because of its PROXY protocol header.
    pub fn proxy_refusal(&self, protocol: Protocol, reason: ProxyRefusal) {
        self.proxy_refusals.get_or_create(&ProxyRefusalLabels { protocol, reason }).inc();
    }

    /// Connections of `protocol` closed because of their PROXY protocol header for `reason`.
    pub fn proxy_refusals(&self, protocol: Protocol, reason: ProxyRefusal) -> u64 {
        self.proxy_refusals.get(&ProxyRefusalLabels { protocol, reason }).map_or(0, |c| c.get())
    }

    /// Counts a reload attempt.
    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabels { result: Success::of(ok) }).inc();
    }

    /// Counts live sessions closed because their user no longer passes the access checks.
    pub fn revoked(&self, n: u64) {
        self.sessions_revoked.inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    ///
    /// `postern_tokio_tasks_alive` is read here from the runtime the caller runs on (tokio's
    /// `num_alive_tasks`: every spawned task not yet finished, one or more per connection
    /// plus the listeners' and housekeeping tasks), so a scrape of the daemon's endpoint
    /// shows the daemon's tasks; called outside a runtime, it keeps its last value. A count
    /// that keeps growing while the connections do not is a task leak.
    pub fn render(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let alive = runtime.metrics().num_alive_tasks();
            self.tokio_tasks_alive.set(i64::try_from(alive).unwrap_or(i64::MAX));
        }
        let mut out = String::with_capacity(8 * 1024);
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot render the metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_logins_and_fills_histograms_cumulatively() {
        let m = Metrics::default();
        let guard = m.session_started(Protocol::Pop3);
        m.login(LoginResult::OK);
        m.login(LoginResult { outcome: Outcome::Denied, reason: "wrong password" });
        m.login_latency.observe(Duration::from_millis(30));
        m.login_latency.observe(Duration::from_secs(100));
        let text = m.render();
        assert!(text.contains("postern_sessions_active{protocol=\"pop3\"} 1"), "{text}");
        assert!(text.contains("postern_sessions_active{protocol=\"smtp\"} 0"), "{text}");
        assert!(text.contains("postern_sessions_total{protocol=\"pop3\"} 1"), "{text}");
        assert!(text.contains("postern_logins_total{outcome=\"ok\",reason=\"ok\"} 1"), "{text}");
        assert!(text.contains("postern_logins_total{outcome=\"denied\",reason=\"wrong password\"} 1"));
        assert!(text.contains("postern_login_seconds_bucket{le=\"0.05\"} 1"), "{text}");
        assert!(text.contains("postern_login_seconds_bucket{le=\"30\"} 1"), "{text}");
        assert!(text.contains("postern_login_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("postern_login_seconds_count 2"), "{text}");
        assert!(text.contains("postern_reloads_total{result=\"failed\"} 0"), "{text}");
        assert_eq!((m.active(Protocol::Pop3), m.total(Protocol::Pop3)), (1, 1));
        drop(guard);
        assert!(m.render().contains("postern_sessions_active{protocol=\"pop3\"} 0"));
        assert_eq!((m.active(Protocol::Pop3), m.total(Protocol::Pop3)), (0, 1));
    }

    #[test]
    fn counters_land_under_their_typed_labels() {
        let m = Metrics::default();
        m.relayed(Protocol::Smtp, 10, 20);
        m.tls_failure(Protocol::Imap);
        m.reload(true);
        m.reload(false);
        m.reload(false);
        m.revoked(3);
        m.proxy_refusal(Protocol::Pop3, ProxyRefusal::TooLong);
        assert_eq!(m.proxy_refusals(Protocol::Pop3, ProxyRefusal::TooLong), 1);
        assert_eq!(m.proxy_refusals(Protocol::Imap, ProxyRefusal::TooLong), 0);
        let text = m.render();
        for line in [
            "postern_bytes_up_total{protocol=\"smtp\"} 10",
            "postern_bytes_down_total{protocol=\"smtp\"} 20",
            "postern_tls_handshake_failures_total{protocol=\"imap\"} 1",
            "postern_reloads_total{result=\"ok\"} 1",
            "postern_reloads_total{result=\"failed\"} 2",
            "postern_sessions_revoked_total 3",
            "postern_proxy_header_refusals_total{protocol=\"pop3\",reason=\"too-long\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
        assert!(!text.contains("postern_oauth"), "no token endpoint, no token metrics");
    }

    /// The count of alive tasks at `render`, once every spawned task had its turn.
    async fn tasks_alive_after_yielding(m: &Metrics) -> String {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let text = m.render();
        text.lines().find(|l| l.starts_with("postern_tokio_tasks_alive ")).unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn the_tasks_gauge_follows_the_runtime_s_alive_tasks() {
        let m = Metrics::default();
        assert_eq!(tasks_alive_after_yielding(&m).await, "postern_tokio_tasks_alive 0");
        let (release, wait) = tokio::sync::watch::channel(false);
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let mut wait = wait.clone();
                tokio::spawn(async move { wait.wait_for(|go| *go).await.map(drop) })
            })
            .collect();
        assert_eq!(tasks_alive_after_yielding(&m).await, "postern_tokio_tasks_alive 3");
        release.send_replace(true);
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(tasks_alive_after_yielding(&m).await, "postern_tokio_tasks_alive 0");
        assert!(m.render().contains("# TYPE postern_tokio_tasks_alive gauge"));
    }

    #[test]
    fn token_endpoint_counters_are_exported_when_asked() {
        let mut m = Metrics::default();
        let token = TokenEndpointMetrics::default();
        m.export_token_endpoint(&token);
        token.request(Success::Ok);
        token.request(Success::Failed);
        token.request(Success::Failed);
        token.cache_hit();
        let text = m.render();
        for line in [
            "postern_oauth_token_requests_total{result=\"ok\"} 1",
            "postern_oauth_token_requests_total{result=\"failed\"} 2",
            "postern_oauth_token_cache_hits_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line} in\n{text}");
        }
    }
}

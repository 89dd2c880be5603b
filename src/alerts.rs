//! Alerts: events an admin should hear about, posted as JSON to HTTPS webhooks (`[alerts]`).
//!
//! Events: `user_locked`, `user_unlocked`, `upstream_refused` (at most one per user per
//! `upstream_refused_every_secs`) and `certificate_expiring` (checked at start, on reload
//! and daily). Each carries `event`, `time` (RFC 3339, UTC), `host` (`server.hostname`) and
//! its fields; never a password or token.
//!
//! Alerting never holds up a login: an event is queued with `try_send` on each webhook's
//! bounded queue, and dropped (counted in `postern_alerts_dropped_total`) when the queue is
//! full. One task per webhook delivers its queue in order: one POST per event, each with the
//! webhook's timeout, retried a bounded number of times with doubling pauses; the outcome
//! is counted in `postern_alerts_sent_total{result}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::{AlertMetrics, Success};
use crate::protocol::Protocol;
use crate::stores::oauth::http::{HttpError, HttpsClient, HttpsUrl};

/// The first pause before a retry; each further pause doubles, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The longest pause between two tries of one alert.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How often the certificate is checked while the daemon runs.
pub const CERTIFICATE_CHECK_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Users whose last `upstream_refused` alert is remembered (for the rate limit) at most.
const MAX_TRACKED_USERS: usize = 10_000;

/// Longest upstream answer carried in an alert, in bytes.
const MAX_ANSWER: usize = 300;

/// `[alerts]`: where events are posted.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// The webhooks; every event goes to each of them. None: no alerts.
    pub webhooks: Vec<WebhookConfig>,
    /// Events waiting per webhook at most; more are dropped (and counted).
    pub queue_size: usize,
    /// At most one `upstream_refused` alert per user in this many seconds.
    pub upstream_refused_every_secs: u64,
    /// `certificate_expiring` is sent when the certificate has fewer days left than this.
    pub certificate_days: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self { webhooks: Vec::new(), queue_size: 256, upstream_refused_every_secs: 3600, certificate_days: 14 }
    }
}

/// One webhook: `{ url = "https://...", ca_file = "...", timeout_secs = 5, retries = 3 }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The `https://` URL events are posted to.
    pub url: String,
    /// Extra PEM CA certificates trusted for the webhook, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Seconds one POST may take, connection included.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Tries after the first one failed (no answer, or not a 2xx answer).
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_timeout() -> u64 {
    5
}

fn default_retries() -> u32 {
    3
}

impl AlertsConfig {
    /// Checks the keys; the error names the key and what to do.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.queue_size == 0 || self.queue_size > 100_000 {
            return Err(("alerts.queue_size".into(), "must be between 1 and 100000".into()));
        }
        if self.upstream_refused_every_secs == 0 {
            return Err(("alerts.upstream_refused_every_secs".into(), "must be at least 1 second".into()));
        }
        if self.certificate_days == 0 || self.certificate_days > 365 {
            return Err(("alerts.certificate_days".into(), "must be between 1 and 365 days".into()));
        }
        for (i, hook) in self.webhooks.iter().enumerate() {
            let key = |name: &str| format!("alerts.webhooks[{i}].{name}");
            HttpsUrl::parse(&hook.url).map_err(|e| (key("url"), e.to_string()))?;
            if hook.timeout_secs == 0 || hook.timeout_secs > 60 {
                return Err((key("timeout_secs"), "must be between 1 and 60 seconds".into()));
            }
            if hook.retries > 10 {
                return Err((key("retries"), "must be at most 10".into()));
            }
            if hook.ca_file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err((key("ca_file"), "must be a file path; leave it out for the system roots only".into()));
            }
        }
        Ok(())
    }
}

/// Why the webhooks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AlertsError {
    /// A webhook URL is unusable.
    #[error("alerts.webhooks: {0}")]
    Url(#[from] HttpError),
    /// A webhook's CA file is unusable.
    #[error("alerts.webhooks: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// One event, as posted (with `time` and `host` added).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Wrong passwords locked a user.
    UserLocked {
        /// The user.
        user: String,
        /// The client address of the failure that locked.
        client: IpAddr,
        /// Wrong passwords in the window that locked (`lockout.max_failures`).
        failures: u32,
        /// When the lock lifts (RFC 3339); `null`: until an admin lifts it.
        until: Option<String>,
    },
    /// An admin lifted a user's lock.
    UserUnlocked {
        /// The user.
        user: String,
        /// Who: the control socket client's account (`uid=0(root)`), or `admin`.
        by: String,
    },
    /// The upstream refused the user's stored credential (often: the upstream password was
    /// changed without updating Postern's vault).
    UpstreamRefused {
        /// The user.
        user: String,
        /// `imap`, `pop3` or `smtp`.
        protocol: &'static str,
        /// The upstream's `host:port`.
        upstream: String,
        /// The upstream's answer, shortened.
        answer: String,
    },
    /// A certificate expires soon.
    CertificateExpiring {
        /// Which certificate: `tls.cert` (the server certificate clients see).
        certificate: String,
        /// Its file.
        path: String,
        /// Its subject.
        subject: String,
        /// Its not-after date (RFC 3339).
        not_after: String,
        /// Whole days left (negative once expired).
        days_left: i64,
    },
}

impl Event {
    /// The event's name, as in its `event` field.
    pub fn name(&self) -> &'static str {
        match self {
            Event::UserLocked { .. } => "user_locked",
            Event::UserUnlocked { .. } => "user_unlocked",
            Event::UpstreamRefused { .. } => "upstream_refused",
            Event::CertificateExpiring { .. } => "certificate_expiring",
        }
    }
}

/// The webhooks' queues and what decides which events go out.
pub struct Alerts {
    queues: Vec<mpsc::Sender<Bytes>>,
    metrics: AlertMetrics,
    host: String,
    refused_every: Duration,
    refused_last: Mutex<HashMap<String, Instant>>,
    certificate_days: u64,
    certificate: Mutex<Option<PathBuf>>,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").field("webhooks", &self.queues.len()).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `text` cut to at most `max` bytes on a character boundary.
fn shorten(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_owned()
}

impl Alerts {
    /// Alerts going nowhere (no `[alerts]` webhooks).
    pub fn disabled(metrics: AlertMetrics) -> Arc<Self> {
        Arc::new(Self::new(Vec::new(), metrics, String::new(), &AlertsConfig::default()))
    }

    fn new(queues: Vec<mpsc::Sender<Bytes>>, metrics: AlertMetrics, host: String, config: &AlertsConfig) -> Self {
        Self {
            queues,
            metrics,
            host,
            refused_every: Duration::from_secs(config.upstream_refused_every_secs),
            refused_last: Mutex::new(HashMap::new()),
            certificate_days: config.certificate_days,
            certificate: Mutex::new(None),
        }
    }

    /// Sets up `config`'s webhooks and starts one delivery task per webhook and the daily
    /// certificate check; they end when the returned value is dropped. `host` names this
    /// instance in every event; CA files are resolved against `base_dir`.
    pub fn start(
        config: &AlertsConfig,
        host: &str,
        base_dir: &Path,
        metrics: AlertMetrics,
    ) -> Result<Arc<Self>, AlertsError> {
        let mut deliveries = Vec::new();
        let mut queues = Vec::new();
        for hook in &config.webhooks {
            let url = HttpsUrl::parse(&hook.url)?;
            let ca = hook.ca_file.as_ref().map(|p| base_dir.join(p));
            let tls = crate::tls::client_config(ca.as_deref())?;
            let client = HttpsClient::new(tls, Duration::from_secs(hook.timeout_secs));
            let (tx, rx) = mpsc::channel(config.queue_size);
            queues.push(tx);
            deliveries.push(Delivery { client, url, retries: hook.retries, queue: rx, metrics: metrics.clone() });
        }
        let alerts = Arc::new(Self::new(queues, metrics, host.to_owned(), config));
        for delivery in deliveries {
            tokio::spawn(delivery.run());
        }
        if !config.webhooks.is_empty() {
            tokio::spawn(check_daily(Arc::downgrade(&alerts)));
        }
        Ok(alerts)
    }

    /// Whether any webhook is configured.
    pub fn enabled(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Queues `event` for every webhook, without waiting: a full queue drops it (counted).
    pub fn emit(&self, event: Event) {
        if self.queues.is_empty() {
            return;
        }
        let name = event.name();
        let mut document = match serde_json::to_value(&event) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => return,
        };
        document.insert("time".into(), crate::audit::file::rfc3339(unix_now()).into());
        document.insert("host".into(), self.host.clone().into());
        let body = match serde_json::to_vec(&document) {
            Ok(body) => Bytes::from(body),
            Err(_) => return,
        };
        for queue in &self.queues {
            if queue.try_send(body.clone()).is_err() {
                self.metrics.dropped();
                tracing::warn!(event = name, "alert dropped: the webhook's queue is full");
            }
        }
    }

    /// `user_locked`: wrong passwords from `client` locked `user` for `lock_secs` (0: until
    /// unlocked).
    pub fn user_locked(&self, user: &str, client: IpAddr, failures: u32, lock_secs: u64) {
        let until = (lock_secs > 0).then(|| crate::audit::file::rfc3339(unix_now().saturating_add(lock_secs)));
        self.emit(Event::UserLocked { user: user.to_owned(), client, failures, until });
    }

    /// `upstream_refused`, unless one went out for `user` within `upstream_refused_every_secs`.
    pub fn upstream_refused(&self, user: &str, protocol: Protocol, upstream: &str, answer: &str) {
        if self.queues.is_empty() {
            return;
        }
        let now = Instant::now();
        {
            let Ok(mut last) = self.refused_last.lock() else { return };
            if last.get(user).is_some_and(|&at| now.duration_since(at) < self.refused_every) {
                return;
            }
            if last.len() >= MAX_TRACKED_USERS && !last.contains_key(user) {
                let every = self.refused_every;
                last.retain(|_, at| now.duration_since(*at) < every);
                if last.len() >= MAX_TRACKED_USERS {
                    // Bounded memory over completeness: this one is not sent.
                    self.metrics.dropped();
                    return;
                }
            }
            last.insert(user.to_owned(), now);
        }
        self.emit(Event::UpstreamRefused {
            user: user.to_owned(),
            protocol: protocol.name(),
            upstream: upstream.to_owned(),
            answer: shorten(answer, MAX_ANSWER),
        });
    }

    /// Checks the server certificate at `path` now, and from now on daily:
    /// `certificate_expiring` when it has fewer than `certificate_days` left.
    pub fn check_certificate(&self, path: &Path) {
        if let Ok(mut current) = self.certificate.lock() {
            *current = Some(path.to_owned());
        }
        self.check_current_certificate();
    }

    fn check_current_certificate(&self) {
        if self.queues.is_empty() {
            return;
        }
        let Some(path) = self.certificate.lock().ok().and_then(|c| c.clone()) else { return };
        match expiry(&path) {
            Ok((subject, not_after)) => {
                let left = not_after - i64::try_from(unix_now()).unwrap_or(i64::MAX);
                if left < i64::try_from(self.certificate_days.saturating_mul(86_400)).unwrap_or(i64::MAX) {
                    self.emit(Event::CertificateExpiring {
                        certificate: "tls.cert".to_owned(),
                        path: path.display().to_string(),
                        subject,
                        not_after: crate::audit::file::rfc3339(u64::try_from(not_after).unwrap_or(0)),
                        days_left: left.div_euclid(86_400),
                    });
                }
            }
            Err(message) => {
                tracing::warn!(cert = %path.display(), error = message, "cannot check the certificate's expiry")
            }
        }
    }
}

/// The subject and not-after time (Unix seconds) of the first certificate in `path`.
fn expiry(path: &Path) -> Result<(String, i64), String> {
    let certs = crate::tls::load_certs(path, "certificate").map_err(|e| e.to_string())?;
    let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref()).map_err(|e| e.to_string())?;
    Ok((parsed.subject().to_string(), parsed.validity().not_after.timestamp()))
}

/// Re-checks the certificate every [`CERTIFICATE_CHECK_EVERY`] while the alerts live.
async fn check_daily(alerts: Weak<Alerts>) {
    let mut tick = tokio::time::interval_at(Instant::now() + CERTIFICATE_CHECK_EVERY, CERTIFICATE_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(alerts) = alerts.upgrade() else { return };
        alerts.check_current_certificate();
    }
}

/// One webhook's delivery task.
struct Delivery {
    client: HttpsClient,
    url: HttpsUrl,
    retries: u32,
    queue: mpsc::Receiver<Bytes>,
    metrics: AlertMetrics,
}

impl Delivery {
    /// Posts each queued event in turn until every sender is gone.
    async fn run(mut self) {
        while let Some(body) = self.queue.recv().await {
            let delivered = self.post(body).await;
            self.metrics.sent(Success::of(delivered));
        }
    }

    /// Posts one event: the first try and up to `retries` more, with doubling pauses.
    async fn post(&self, body: Bytes) -> bool {
        let mut pause = FIRST_BACKOFF;
        let mut tries_left = self.retries;
        loop {
            let problem = match self.client.post_json(&self.url, body.clone()).await {
                Ok(response) if (200..300).contains(&response.status) => return true,
                Ok(response) => format!("answered HTTP {}", response.status),
                Err(e) => e.to_string(),
            };
            if tries_left == 0 {
                tracing::warn!(webhook = %self.url, error = problem, "alert not delivered; giving up");
                return false;
            }
            tracing::info!(webhook = %self.url, error = problem, retry_in = ?pause, "alert not delivered; retrying");
            tries_left -= 1;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(config: &AlertsConfig) -> (Alerts, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(config.queue_size);
        (Alerts::new(vec![tx], AlertMetrics::default(), "proxy.test".into(), config), rx)
    }

    fn json(body: &Bytes) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn events_carry_their_name_time_host_and_fields() {
        let (alerts, mut rx) = queued(&AlertsConfig::default());
        alerts.user_locked("a@x", "192.0.2.1".parse().unwrap(), 5, 0);
        alerts.emit(Event::UserUnlocked { user: "a@x".into(), by: "admin".into() });
        let locked = json(&rx.try_recv().unwrap());
        assert_eq!(locked["event"], "user_locked");
        assert_eq!(locked["client"], "192.0.2.1");
        assert_eq!(locked["failures"], 5);
        assert!(locked["until"].is_null(), "lock_secs = 0: until unlocked");
        assert_eq!(locked["host"], "proxy.test");
        assert!(locked["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(json(&rx.try_recv().unwrap())["event"], "user_unlocked");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let config = AlertsConfig { queue_size: 2, ..AlertsConfig::default() };
        let (alerts, _rx) = queued(&config);
        for _ in 0..5 {
            alerts.emit(Event::UserUnlocked { user: "a@x".into(), by: "admin".into() });
        }
        assert_eq!(alerts.metrics.dropped_count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_refused_goes_out_once_per_user_and_period() {
        let (alerts, mut rx) = queued(&AlertsConfig::default());
        let long = "NO ".to_owned() + &"é".repeat(400);
        alerts.upstream_refused("a@x", Protocol::Imap, "imap.example:993", &long);
        alerts.upstream_refused("a@x", Protocol::Pop3, "pop.example:995", "NO");
        alerts.upstream_refused("b@x", Protocol::Imap, "imap.example:993", "NO");
        let first = json(&rx.try_recv().unwrap());
        assert_eq!((first["user"].as_str(), first["protocol"].as_str()), (Some("a@x"), Some("imap")));
        assert!(first["answer"].as_str().unwrap().len() <= MAX_ANSWER);
        assert_eq!(json(&rx.try_recv().unwrap())["user"], "b@x");
        assert!(rx.try_recv().is_err(), "a@x's second refusal within the hour is not sent");
        tokio::time::advance(Duration::from_secs(3601)).await;
        alerts.upstream_refused("a@x", Protocol::Imap, "imap.example:993", "NO");
        assert_eq!(json(&rx.try_recv().unwrap())["user"], "a@x", "an hour later it is sent again");
    }

    #[test]
    fn a_certificate_close_to_expiry_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["soon.example".to_owned()]).unwrap();
        let (y, m, d) = day_in(4);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let path = dir.path().join("c.pem");
        std::fs::write(&path, params.self_signed(&key).unwrap().pem()).unwrap();
        let (alerts, mut rx) = queued(&AlertsConfig::default());
        alerts.check_certificate(&path);
        let event = json(&rx.try_recv().unwrap());
        assert_eq!((event["event"].as_str(), event["days_left"].as_i64()), (Some("certificate_expiring"), Some(3)));
        let (relaxed, mut rx) = queued(&AlertsConfig { certificate_days: 2, ..AlertsConfig::default() });
        relaxed.check_certificate(&path);
        assert!(rx.try_recv().is_err(), "3 days left is not within 2");
    }

    /// The date `days` from today (UTC); its midnight is between `days - 1` and `days` away.
    fn day_in(days: u64) -> (i32, u8, u8) {
        let date = crate::audit::file::rfc3339(unix_now() + days * 86_400);
        let part = |range: std::ops::Range<usize>| date[range].parse::<u32>().unwrap();
        (part(0..4) as i32, part(5..7) as u8, part(8..10) as u8)
    }

    #[test]
    fn the_table_is_checked() {
        let hook = |url: &str| WebhookConfig { url: url.into(), ca_file: None, timeout_secs: 5, retries: 3 };
        let with = |hooks: Vec<WebhookConfig>| AlertsConfig { webhooks: hooks, ..AlertsConfig::default() };
        assert!(with(vec![hook("https://hooks.example/postern")]).validate().is_ok());
        assert_eq!(with(vec![hook("http://hooks.example/")]).validate().unwrap_err().0, "alerts.webhooks[0].url");
        let slow = WebhookConfig { timeout_secs: 0, ..hook("https://h/") };
        assert_eq!(with(vec![slow]).validate().unwrap_err().0, "alerts.webhooks[0].timeout_secs");
        let eager = WebhookConfig { retries: 11, ..hook("https://h/") };
        assert_eq!(with(vec![hook("https://h/"), eager]).validate().unwrap_err().0, "alerts.webhooks[1].retries");
        let none = AlertsConfig { queue_size: 0, ..AlertsConfig::default() };
        assert_eq!(none.validate().unwrap_err().0, "alerts.queue_size");
    }
}

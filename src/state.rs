//! What every session shares: the profiles, directory, app passwords, vault, upstreams,
//! limits and counters in force now, swapped whole on reload. Starting and stopping listeners is the
//! daemon's business (`crate::daemon`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_rustls::TlsAcceptor;

use crate::tls::stream::TlsAcceptor as MailAcceptor;
use tokio_util::sync::CancellationToken;

use crate::access::certificate::ClientCa;
use crate::access::profiles::Profiles;
use crate::access::slots::SessionLimits;
use crate::access::store::CounterStore;
use crate::audit::file::AuditFile;
use crate::config::{Config, Limits, MetricsConfig};
use crate::metrics::Metrics;
use crate::protocol::{DialogueSettings, Protocol};
use crate::session::registry::{LastResults, LiveSessions};
use crate::stores::app_passwords::{AppPasswordError, AppPasswords, Usage};
use crate::stores::directory::Directory;
use crate::stores::vault::Vault;
use crate::upstream::credential::Upstreams;
use crate::upstream::route::DEFAULT_ROUTE;
use crate::upstream::route::SetupUpstreamsError;

/// Why the shared state could not be loaded (at start or on reload).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// TLS certificate, key or CA problem.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The profiles file is missing or invalid.
    #[error(transparent)]
    Profiles(#[from] crate::access::profiles::ProfilesError),
    /// The directory configuration is unusable.
    #[error("directory: {0}")]
    Directory(#[from] crate::stores::directory::DirectoryError),
    /// The vault could not be opened.
    #[error(transparent)]
    Vault(#[from] crate::stores::vault::VaultError),
    /// The audit file could not be opened.
    #[error(transparent)]
    AuditFile(#[from] crate::audit::file::AuditFileError),
    /// An upstream or the OAuth2 token source could not be set up.
    #[error(transparent)]
    Upstreams(#[from] SetupUpstreamsError),
    /// The store of lockout and session counters could not be set up.
    #[error(transparent)]
    Counters(#[from] crate::access::store::SetupError),
    /// The alert webhooks could not be set up.
    #[error(transparent)]
    Alerts(#[from] crate::alerts::AlertsError),
    /// The app password file could not be read.
    #[error(transparent)]
    AppPasswords(#[from] AppPasswordError),
}

/// The two stages of stopping: first no new logins, then (after a grace period) every
/// spliced session is closed too.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Cancelled when the server stops accepting; sessions not yet logged in say goodbye.
    pub stop_accepting: CancellationToken,
    /// Cancelled when the grace period is over; logged-in sessions are closed.
    pub close_sessions: CancellationToken,
}

/// Everything sessions share.
pub struct State {
    /// Timeouts and sizes.
    pub limits: Limits,
    hostname: String,
    directory: ArcSwap<Directory>,
    /// Lockout and per-user session counters, in memory or shared (`[state]`).
    pub counters: Arc<CounterStore>,
    /// The alert webhooks (`[alerts]`); going nowhere when none is configured.
    pub alerts: Arc<crate::alerts::Alerts>,
    /// Concurrent connection and handshake limits per address (this instance's own).
    pub sessions: Arc<SessionLimits>,
    /// The bytes all connections together may buffer before login.
    pub preauth_budget: Arc<crate::session::budget::Budget>,
    profiles: ArcSwap<Profiles>,
    app_passwords: ArcSwap<AppPasswords>,
    app_password_usage: Arc<Usage>,
    state_dir: PathBuf,
    /// The upstreams, with the vault and OAuth2 token source that log in to them.
    pub upstreams: Upstreams,
    smtp_max_size: Option<u64>,
    tls: ArcSwap<Acceptors>,
    client_ca: ArcSwapOption<ClientCa>,
    metrics: Arc<Metrics>,
    live: LiveSessions,
    last_results: LastResults,
    audit_file: ArcSwapOption<AuditFile>,
    started: Instant,
    last_reload: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
    restart_only: RestartOnly,
    config: ArcSwap<Config>,
}

/// A protocol table's listener keys: `listen`, `starttls_listen`, `max_message_size`,
/// `proxy_protocol`, `trusted_proxies`.
type ListenerKeys = (Vec<std::net::SocketAddr>, Vec<std::net::SocketAddr>, Option<u64>, bool, Vec<String>);

/// The parts of a config that only a restart applies.
#[derive(Debug, PartialEq)]
struct RestartOnly {
    listeners: Vec<(Protocol, ListenerKeys)>,
    limits: Limits,
    hostname: String,
    state_dir: PathBuf,
    control_socket: PathBuf,
    metrics: MetricsConfig,
    state: crate::access::store::StateConfig,
    alerts: crate::alerts::AlertsConfig,
    /// `[onboarding]` but its certificate, which reloads.
    onboarding: Option<crate::config::OnboardingConfig>,
}

impl RestartOnly {
    fn of(config: &Config) -> Self {
        Self {
            listeners: config
                .protocols()
                .map(|(p, c)| {
                    let keys = (
                        c.listen.clone(),
                        c.starttls_listen.clone(),
                        c.max_message_size,
                        c.proxy_protocol,
                        c.trusted_proxies.clone(),
                    );
                    (p, keys)
                })
                .collect(),
            limits: config.limits.clone(),
            hostname: config.server.hostname.clone(),
            state_dir: config.server.state_dir.clone(),
            control_socket: config.control_socket(),
            metrics: config.metrics.clone(),
            state: config.state.clone(),
            alerts: config.alerts.clone(),
            onboarding: config.onboarding.clone().map(|o| crate::config::OnboardingConfig {
                cert: None,
                key: None,
                ..o
            }),
        }
    }
}

/// `[tls] client_ca` and `client_crl`, loaded; `None` when no client CA is configured.
fn load_client_ca(config: &Config) -> Result<Option<Arc<ClientCa>>, LoadError> {
    let Some(ca) = &config.tls.client_ca else {
        return Ok(None);
    };
    let crl = config.tls.client_crl.as_ref().map(|p| config.resolve(p));
    Ok(Some(Arc::new(ClientCa::load(&config.resolve(ca), crl.as_deref())?)))
}

/// The acceptor for client connections; asks for a certificate issued by `client_ca`'s
/// subjects when there is one.
/// The `[tls]` certificate's acceptors: the mail listeners' (asking for a client certificate
/// when a client CA is set) and the web listeners' (never asking).
struct Acceptors {
    mail: MailAcceptor,
    web: TlsAcceptor,
}

fn tls_acceptor(config: &Config, client_ca: Option<&ClientCa>) -> Result<Acceptors, LoadError> {
    let cert = config.resolve(&config.tls.cert);
    let key = config.resolve(&config.tls.key);
    let plain = crate::tls::server_config(&cert, &key, config.tls.min_version, None)?;
    let mail = match client_ca {
        Some(ca) => {
            MailAcceptor::from(crate::tls::server_config(&cert, &key, config.tls.min_version, Some(ca.subjects()))?)
        }
        None => MailAcceptor::from(plain.clone()),
    };
    Ok(Acceptors { mail, web: TlsAcceptor::from(plain) })
}

fn open_audit_file(config: &Config) -> Result<Option<Arc<AuditFile>>, LoadError> {
    Ok(match &config.audit.file {
        Some(path) => Some(Arc::new(AuditFile::open(&config.resolve(path))?)),
        None => None,
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl State {
    /// Loads everything the config names. Generates the self-signed certificate if the
    /// config asks for it and the files are missing.
    pub async fn from_config(config: &Config) -> Result<Arc<Self>, LoadError> {
        let cert = config.resolve(&config.tls.cert);
        let key = config.resolve(&config.tls.key);
        if config.tls.generate_self_signed && !cert.exists() && !key.exists() {
            crate::tls::generate_self_signed(&config.server.hostname, &cert, &key)?;
            tracing::warn!(cert = %cert.display(), "generated a self-signed certificate; clients will warn until a real one is installed");
        }
        let client_ca = load_client_ca(config)?;
        let tls = tls_acceptor(config, client_ca.as_deref())?;
        let audit_file = open_audit_file(config)?;
        let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
        let directory = Directory::open(&config.directory, &config.base_dir).await?;
        let state_dir = config.resolve(&config.server.state_dir);
        if Vault::init(&state_dir)? {
            tracing::warn!(state_dir = %state_dir.display(), "created a new, empty vault; store upstream credentials with `postern user set-upstream`");
        }
        let vault = Vault::open(&state_dir)?;
        let app_passwords = AppPasswords::load(&state_dir)?;
        let upstreams = Upstreams::from_config(config, vault)?;
        let mut metrics = Metrics::new();
        metrics.export_token_endpoint(upstreams.token_metrics());
        let alert_metrics = crate::metrics::AlertMetrics::default();
        metrics.export_alerts(&alert_metrics);
        let alerts =
            crate::alerts::Alerts::start(&config.alerts, &config.server.hostname, &config.base_dir, alert_metrics)?;
        alerts.check_certificate(&cert);
        let sessions = SessionLimits::with_proxy_headers(
            config.limits.max_sessions_per_user,
            config.limits.max_connections_per_ip,
            config.limits.max_handshakes_per_ip,
            config.limits.max_proxy_headers_per_ip,
        );
        let counters = CounterStore::open(
            &config.state,
            config.lockout.clone(),
            sessions.clone(),
            &state_dir,
            &config.base_dir,
            &metrics,
        )?;
        tracing::info!(profiles = profiles.len(), "loaded security profiles");
        Ok(Arc::new(Self {
            limits: config.limits.clone(),
            hostname: config.server.hostname.clone(),
            directory: ArcSwap::from_pointee(directory),
            counters: Arc::new(counters),
            alerts,
            sessions,
            preauth_budget: crate::session::budget::Budget::new(config.limits.preauth_buffer_budget),
            profiles: ArcSwap::from_pointee(profiles),
            app_passwords: ArcSwap::from_pointee(app_passwords),
            app_password_usage: Arc::new(Usage::default()),
            state_dir,
            upstreams,
            smtp_max_size: config.smtp.as_ref().and_then(|s| s.max_message_size),
            tls: ArcSwap::from_pointee(tls),
            client_ca: ArcSwapOption::new(client_ca),
            metrics: Arc::new(metrics),
            live: LiveSessions::default(),
            last_results: LastResults::default(),
            audit_file: ArcSwapOption::new(audit_file),
            started: Instant::now(),
            last_reload: AtomicU64::new(0),
            reload_lock: tokio::sync::Mutex::new(()),
            restart_only: RestartOnly::of(config),
            config: ArcSwap::from_pointee(config.clone()),
        }))
    }

    /// The metrics every session updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The sessions logged in now.
    pub fn live(&self) -> &LiveSessions {
        &self.live
    }

    /// Each user's last upstream login result.
    pub fn last_results(&self) -> &LastResults {
        &self.last_results
    }

    /// How long the server has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Unix time of the last successful reload; `None` if there was none.
    pub fn last_reload(&self) -> Option<u64> {
        Some(self.last_reload.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Writes `record`'s audit line for `event` to the log and, when one is configured, to
    /// the audit file.
    pub fn audit(&self, record: &crate::audit::SessionRecord, event: crate::audit::Event) {
        record.emit(event);
        if let Some(file) = self.audit_file.load().as_ref() {
            file.write(record.started_at, record.to_json(event));
        }
    }

    /// The profiles in force now.
    pub fn profiles(&self) -> Arc<Profiles> {
        self.profiles.load_full()
    }

    /// Replaces the profiles for every login from now on.
    pub fn set_profiles(&self, profiles: Profiles) {
        self.profiles.store(Arc::new(profiles));
    }

    /// The app passwords in force now.
    pub fn app_passwords(&self) -> Arc<AppPasswords> {
        self.app_passwords.load_full()
    }

    /// Re-reads the app password file for every login from now on; on error the ones in
    /// force stay.
    pub fn reload_app_passwords(&self) -> Result<(), AppPasswordError> {
        self.app_passwords.store(Arc::new(AppPasswords::load(&self.state_dir)?));
        Ok(())
    }

    /// The app passwords' last uses not yet written to their file.
    pub fn app_password_usage(&self) -> &Arc<Usage> {
        &self.app_password_usage
    }

    /// The state directory (vault, app passwords, saved lockouts).
    pub fn state_dir(&self) -> &std::path::Path {
        &self.state_dir
    }

    /// Re-reads the profiles file, the vault, the app passwords, the directory, the
    /// upstreams, routes and token sources, the TLS certificate, the client CA and CRL and
    /// the audit file, all or nothing: on any error the old ones stay in force. The caller then
    /// re-checks the live sessions (`crate::access::decision::revalidate`).
    pub async fn reload(&self, config: &Config) -> Result<(), LoadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = async {
            let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
            let vault = Vault::open(&config.resolve(&config.server.state_dir))?;
            let app_passwords = AppPasswords::load(&self.state_dir)?;
            let client_ca = load_client_ca(config)?;
            let tls = tls_acceptor(config, client_ca.as_deref())?;
            let audit_file = open_audit_file(config)?;
            let directory = Directory::open(&config.directory, &config.base_dir).await?;
            let routing = self.upstreams.prepare(config)?;
            Ok::<_, LoadError>((profiles, vault, app_passwords, tls, client_ca, audit_file, directory, routing))
        }
        .await;
        let (profiles, vault, app_passwords, tls, client_ca, audit_file, directory, routing) = match loaded {
            Ok(parts) => parts,
            Err(e) => {
                self.metrics.reload(false);
                return Err(e);
            }
        };
        tracing::info!(
            profiles = profiles.len(),
            routes = config.route.len(),
            client_ca = client_ca.is_some(),
            client_crls = client_ca.as_ref().map_or(0, |ca| ca.revocation_lists()),
            "reloaded security profiles, vault, app passwords, directory, upstreams and routes, TLS certificate and client CA"
        );
        if RestartOnly::of(config) != self.restart_only {
            tracing::warn!(
                "listen addresses, [state], [alerts], [onboarding] (but its certificate), limits, hostname, state_dir, metrics or control socket changed: those apply after a restart only"
            );
        }
        self.set_profiles(profiles);
        self.upstreams.set_vault(vault);
        self.upstreams.set_routing(routing);
        self.app_passwords.store(Arc::new(app_passwords));
        self.directory.store(Arc::new(directory));
        self.tls.store(Arc::new(tls));
        self.client_ca.store(client_ca);
        self.alerts.check_certificate(&config.resolve(&config.tls.cert));
        self.audit_file.store(audit_file);
        self.config.store(Arc::new(config.clone()));
        self.metrics.reload(true);
        self.last_reload.store(unix_now(), Ordering::Relaxed);
        Ok(())
    }

    /// Re-reads `[tls] client_ca` and `client_crl` (and the certificate, whose acceptor
    /// names the CA to clients), both or neither: on an error the ones in force stay. The
    /// caller then re-checks the live sessions.
    pub async fn reload_client_ca(&self, config: &Config) -> Result<(), LoadError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let client_ca = load_client_ca(config)?;
        let tls = tls_acceptor(config, client_ca.as_deref())?;
        self.tls.store(Arc::new(tls));
        self.client_ca.store(client_ca);
        Ok(())
    }

    /// The config in force now: the one loaded at start or by the last successful reload.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The directory in force now.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.load_full()
    }

    /// Opens the directory `config` describes again (after its users file changed) and puts
    /// it in force; on error the one in force stays.
    pub async fn reload_directory(&self, config: &Config) -> Result<(), LoadError> {
        let directory = Directory::open(&config.directory, &config.base_dir).await?;
        self.directory.store(Arc::new(directory));
        Ok(())
    }

    /// The vault in force now.
    pub fn vault(&self) -> Arc<Vault> {
        self.upstreams.vault()
    }

    /// The `host:port` of `protocol`'s default upstream (its table's), for sessions not yet
    /// routed.
    pub fn default_upstream(&self, protocol: Protocol) -> String {
        let routing = self.upstreams.routing();
        routing.get(DEFAULT_ROUTE).and_then(|r| r.address(protocol)).unwrap_or("-").to_owned()
    }

    /// The client CA and CRL in force now (`[tls] client_ca`); `None` when not configured.
    pub fn client_ca(&self) -> Option<Arc<ClientCa>> {
        self.client_ca.load_full()
    }

    /// The TLS acceptor for new client connections (the certificate in force now).
    pub fn tls(&self) -> MailAcceptor {
        self.tls.load().mail.clone()
    }

    /// The acceptor for the web listeners (console, onboarding) with the `[tls]` certificate
    /// in force now; it never asks for a client certificate.
    pub fn web_tls(&self) -> TlsAcceptor {
        TlsAcceptor::clone(&self.tls.load().web)
    }

    /// Settings for a new session's pre-login dialogue.
    pub fn dialogue_settings(&self, protocol: Protocol) -> DialogueSettings {
        DialogueSettings {
            max_line: self.limits.max_line,
            max_literal: self.limits.max_literal,
            hostname: self.hostname.clone(),
            smtp_max_size: if protocol == Protocol::Smtp { self.smtp_max_size } else { None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::MINIMAL;

    fn restart_only(text: &str) -> RestartOnly {
        let config = Config::parse(text, std::path::Path::new("proxy.toml"), PathBuf::from("/etc/postern")).unwrap();
        RestartOnly::of(&config)
    }

    #[test]
    fn restart_only_changes_are_found_by_value() {
        let base = restart_only(MINIMAL);
        assert_eq!(base, restart_only(MINIMAL), "the same config");
        let reloadable = MINIMAL.replace("profiles.toml", "other-profiles.toml").replace("c.pem", "new.pem");
        assert_eq!(base, restart_only(&reloadable), "profiles and certificate apply on reload");
        let upstream = MINIMAL.replace("imap.gmail.com:993", "imap.example.com:993");
        assert_eq!(base, restart_only(&upstream), "upstreams and routes apply on reload");
        let onboarding = format!("{MINIMAL}\n[onboarding]\nlisten = \"0.0.0.0:443\"\ndomains = [\"example.com\"]\n");
        let own_certificate = format!("{onboarding}cert = \"o.pem\"\nkey = \"o.key\"\n");
        assert_eq!(restart_only(&onboarding), restart_only(&own_certificate), "the onboarding certificate reloads");
        assert_ne!(base, restart_only(&onboarding), "turning onboarding on needs a restart");
        for changed in
            [MINIMAL.replace("10993", "10994"), MINIMAL.replace("[imap]", "[limits]\nmax_connections = 7\n[imap]")]
        {
            assert_ne!(base, restart_only(&changed), "{changed}");
        }
    }
}

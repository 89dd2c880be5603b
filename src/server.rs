//! The running daemon: what every session shares, and the start/stop of the listeners.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::sessions::SessionLimits;
use crate::access::{self, Lockout, Profiles};
use crate::auditlog::AuditFile;
use crate::config::{Config, Limits};
use crate::directory::{Directory, DirectoryError};
use crate::listener;
use crate::live::{LastResults, LiveSessions};
use crate::metrics::Metrics;
use crate::protocol::{DialogueSettings, Protocol};
use crate::upstream::Upstream;
use crate::vault::Vault;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS certificate, key or CA problem.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The profiles file is missing or invalid.
    #[error(transparent)]
    Profiles(#[from] crate::access::profiles::ProfilesError),
    /// The directory configuration is unusable.
    #[error("directory: {0}")]
    Directory(#[from] crate::directory::DirectoryError),
    /// The vault could not be opened.
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    /// The audit file could not be opened.
    #[error(transparent)]
    AuditFile(#[from] crate::auditlog::AuditFileError),
    /// The metrics address could not be bound.
    #[error("cannot listen on {address} for metrics: {source}")]
    MetricsBind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The OAuth2 token source could not be set up (key file, client secret, CA).
    #[error("oauth: {0}")]
    OAuth(#[from] crate::oauth::SetupError),
    /// A listen address could not be bound.
    #[error("cannot listen on {address} for {protocol}: {source} (is another process using the port?)")]
    Bind {
        /// The protocol.
        protocol: Protocol,
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
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
pub struct Server {
    /// Timeouts and sizes.
    pub limits: Limits,
    hostname: String,
    directory: ArcSwap<Directory>,
    /// Lockout after repeated password failures.
    pub lockout: Lockout,
    /// Concurrent session limits per user and per address.
    pub sessions: Arc<SessionLimits>,
    profiles: ArcSwap<Profiles>,
    vault: ArcSwap<Vault>,
    upstreams: HashMap<Protocol, Upstream>,
    smtp_max_size: Option<u64>,
    tls: ArcSwap<TlsAcceptor>,
    /// Where OAuth2 access tokens come from, when some upstream uses XOAUTH2.
    pub oauth: Option<crate::oauth::TokenSource>,
    metrics: Arc<Metrics>,
    live: LiveSessions,
    last_results: LastResults,
    audit_file: ArcSwapOption<AuditFile>,
    started: Instant,
    last_reload: AtomicU64,
    reload_lock: tokio::sync::Mutex<()>,
    restart_only: String,
}

/// The parts of a config that only a restart applies, in a comparable form.
fn restart_only(config: &Config) -> String {
    let protocols: Vec<String> = config
        .protocols()
        .map(|(p, c)| format!("{p} {:?} {} {:?} {:?} {:?}", c.listen, c.upstream, c.upstream_tls, c.upstream_server_name, c.upstream_ca_file))
        .collect();
    format!(
        "{protocols:?} {:?} {:?} {:?} {:?} {:?}",
        config.limits, config.server.hostname, config.server.state_dir, config.metrics.listen, config.server.control_socket
    )
}

fn tls_acceptor(config: &Config) -> Result<TlsAcceptor, StartError> {
    let cert = config.resolve(&config.tls.cert);
    let key = config.resolve(&config.tls.key);
    Ok(TlsAcceptor::from(crate::tls::server_config(&cert, &key, config.tls.min_version)?))
}

fn open_audit_file(config: &Config) -> Result<Option<Arc<AuditFile>>, StartError> {
    Ok(match &config.audit.file {
        Some(path) => Some(Arc::new(AuditFile::open(&config.resolve(path))?)),
        None => None,
    })
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Server {
    /// Loads everything the config names. Generates the self-signed certificate if the
    /// config asks for it and the files are missing.
    pub async fn from_config(config: &Config) -> Result<Arc<Self>, StartError> {
        let cert = config.resolve(&config.tls.cert);
        let key = config.resolve(&config.tls.key);
        if config.tls.generate_self_signed && !cert.exists() && !key.exists() {
            crate::tls::generate_self_signed(&config.server.hostname, &cert, &key)?;
            tracing::warn!(cert = %cert.display(), "generated a self-signed certificate; clients will warn until a real one is installed");
        }
        let tls = tls_acceptor(config)?;
        let audit_file = open_audit_file(config)?;
        let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
        let directory = Directory::open(&config.directory, &config.base_dir).await?;
        let state_dir = config.resolve(&config.server.state_dir);
        if Vault::init(&state_dir)? {
            tracing::warn!(state_dir = %state_dir.display(), "created a new, empty vault; store upstream credentials with `postern user set-upstream`");
        }
        let vault = Vault::open(&state_dir)?;
        let mut upstreams = HashMap::new();
        for (protocol, p) in config.protocols() {
            let ca = p.upstream_ca_file.as_ref().map(|f| config.resolve(f));
            let upstream =
                Upstream::new(protocol, p, ca.as_deref(), &config.server.hostname, config.limits.upstream_timeout())?;
            upstreams.insert(protocol, upstream);
        }
        let oauth = crate::oauth::TokenSource::from_config(config)?;
        tracing::info!(profiles = profiles.len(), "loaded security profiles");
        Ok(Arc::new(Self {
            limits: config.limits.clone(),
            hostname: config.server.hostname.clone(),
            directory: ArcSwap::from_pointee(directory),
            lockout: Lockout::new(config.lockout.clone()),
            sessions: SessionLimits::new(config.limits.max_sessions_per_user, config.limits.max_connections_per_ip),
            profiles: ArcSwap::from_pointee(profiles),
            vault: ArcSwap::from_pointee(vault),
            upstreams,
            smtp_max_size: config.smtp.as_ref().and_then(|s| s.max_message_size),
            tls: ArcSwap::from_pointee(tls),
            oauth,
            metrics: Arc::new(Metrics::default()),
            live: LiveSessions::default(),
            last_results: LastResults::default(),
            audit_file: ArcSwapOption::new(audit_file),
            started: Instant::now(),
            last_reload: AtomicU64::new(0),
            reload_lock: tokio::sync::Mutex::new(()),
            restart_only: restart_only(config),
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

    /// Re-reads the profiles file, the vault, the directory, the TLS certificate and the
    /// audit file, all or nothing: on any error the old ones stay in force. Then closes the
    /// live sessions whose user no longer passes (see [`Server::revalidate`]).
    pub async fn reload(&self, config: &Config) -> Result<(), StartError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let loaded = async {
            let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
            let vault = Vault::open(&config.resolve(&config.server.state_dir))?;
            let tls = tls_acceptor(config)?;
            let audit_file = open_audit_file(config)?;
            let directory = Directory::open(&config.directory, &config.base_dir).await?;
            Ok::<_, StartError>((profiles, vault, tls, audit_file, directory))
        }
        .await;
        let (profiles, vault, tls, audit_file, directory) = match loaded {
            Ok(parts) => parts,
            Err(e) => {
                self.metrics.reload(false);
                return Err(e);
            }
        };
        tracing::info!(profiles = profiles.len(), "reloaded security profiles, vault, directory and TLS certificate");
        if restart_only(config) != self.restart_only {
            tracing::warn!("listen addresses, upstreams, limits, hostname, state_dir, metrics or control socket changed: those apply after a restart only");
        }
        self.set_profiles(profiles);
        self.vault.store(Arc::new(vault));
        self.directory.store(Arc::new(directory));
        self.tls.store(Arc::new(tls));
        self.audit_file.store(audit_file);
        self.metrics.reload(true);
        self.last_reload.store(unix_now(), Ordering::Relaxed);
        drop(_one_at_a_time);
        self.revalidate().await;
        Ok(())
    }

    /// Replaces the profiles (e.g. the profiles file changed on disk) and closes the live
    /// sessions they no longer allow.
    pub async fn apply_profiles(&self, profiles: Profiles) {
        tracing::info!(profiles = profiles.len(), "applied the changed security profiles");
        self.set_profiles(profiles);
        self.revalidate().await;
    }

    /// Re-runs the password-free checks for every live session with the profiles, vault and
    /// directory in force now, and closes the sessions that fail; returns how many.
    ///
    /// Groups are looked up again only when some profile names groups. A directory that
    /// cannot answer, or does not tell groups without a password, keeps sessions open:
    /// only a definite "no" closes one.
    pub async fn revalidate(&self) -> usize {
        let sessions = self.live.snapshot();
        if sessions.is_empty() {
            return 0;
        }
        let profiles = self.profiles();
        let vault = self.vault();
        let directory = self.directory();
        let mut groups_of: HashMap<String, Result<Option<Vec<String>>, String>> = HashMap::new();
        let mut closed = 0;
        for session in sessions {
            let reason = if !vault.contains(&session.user) {
                Some("closed: the user's upstream credential was removed from the vault".to_owned())
            } else {
                if !groups_of.contains_key(&session.user) {
                    let groups = if profiles.uses_groups() {
                        match directory.lookup(&session.user).await {
                            Ok(entry) => Ok(entry.groups),
                            Err(DirectoryError::UnknownUser) => Err("closed: the user was removed from the directory".to_owned()),
                            Err(e) => {
                                tracing::warn!(user = %session.user, error = %e, "cannot re-check the groups of a live session; it stays open");
                                Ok(None)
                            }
                        }
                    } else {
                        Ok(Some(Vec::new()))
                    };
                    groups_of.insert(session.user.clone(), groups);
                }
                match &groups_of[&session.user] {
                    Err(reason) => Some(reason.clone()),
                    Ok(groups) => {
                        let known = groups.as_deref().unwrap_or_default();
                        match access::check_profiles(&profiles, &session.user, known, session.protocol, session.ip) {
                            Ok(_) => None,
                            Err(_) if groups.is_none() => None,
                            Err(denial) => Some(format!("closed: profile change no longer allows this client ({denial})")),
                        }
                    }
                }
            };
            if let Some(reason) = reason {
                tracing::info!(user = %session.user, protocol = %session.protocol, ip = %session.ip, reason, "closing a live session");
                session.revoke(reason);
                closed += 1;
            }
        }
        self.metrics.revoked(closed as u64);
        closed
    }

    /// Replaces the vault for every login from now on.
    pub fn set_vault(&self, vault: Vault) {
        self.vault.store(Arc::new(vault));
    }

    /// The directory in force now.
    pub fn directory(&self) -> Arc<Directory> {
        self.directory.load_full()
    }

    /// The vault in force now.
    pub fn vault(&self) -> Arc<Vault> {
        self.vault.load_full()
    }

    /// The upstream of `protocol`. Sessions exist only for configured protocols.
    pub fn upstream(&self, protocol: Protocol) -> &Upstream {
        &self.upstreams[&protocol]
    }

    /// The TLS acceptor for new client connections (the certificate in force now).
    pub fn tls(&self) -> TlsAcceptor {
        TlsAcceptor::clone(&self.tls.load())
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

/// A server whose listeners are bound and accepting.
pub struct Running {
    /// The bound addresses per protocol (useful when the config asked for port 0).
    pub addresses: HashMap<Protocol, Vec<SocketAddr>>,
    /// The bound metrics address, when `[metrics] listen` is set.
    pub metrics_address: Option<SocketAddr>,
    /// Stops the server when cancelled.
    pub shutdown: Shutdown,
    tasks: TaskTracker,
    grace: Duration,
    helpers: CancellationToken,
}

impl Running {
    /// Stops accepting, lets logged-in sessions run for the grace period, then closes them,
    /// and returns when every session has ended.
    pub async fn stop(self) {
        self.shutdown.stop_accepting.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait()).await.is_err() {
            tracing::info!(sessions = self.tasks.len(), "grace period over; closing remaining sessions");
            self.shutdown.close_sessions.cancel();
            self.tasks.wait().await;
        }
        self.helpers.cancel();
    }
}

/// Binds every configured listener of `config` and starts accepting.
pub async fn start(server: Arc<Server>, config: &Config, grace: Duration) -> Result<Running, StartError> {
    let shutdown = Shutdown::default();
    let tasks = TaskTracker::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
    let mut addresses: HashMap<Protocol, Vec<SocketAddr>> = HashMap::new();
    let mut bound = Vec::new();
    for (protocol, p) in config.protocols() {
        for &address in &p.listen {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Bind { protocol, address, source })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind { protocol, address, source })?;
            tracing::info!(%protocol, address = %local, upstream = server.upstream(protocol).address(), "listening");
            addresses.entry(protocol).or_default().push(local);
            bound.push((protocol, listener));
        }
    }
    let helpers = CancellationToken::new();
    let metrics_address = match config.metrics.listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::MetricsBind { address, source })?;
            let local = listener.local_addr().map_err(|source| StartError::MetricsBind { address, source })?;
            tracing::info!(address = %local, "serving metrics at /metrics");
            tokio::spawn(crate::metrics::serve(listener, server.metrics().clone(), helpers.clone()));
            Some(local)
        }
        None => None,
    };
    if config.server.watch_profiles {
        let path = config.resolve(&config.access.profiles);
        tokio::spawn(crate::watch::watch_profiles(server.clone(), path, helpers.clone()));
    }
    for (protocol, listener) in bound {
        let accept = listener::accept_loop(
            listener,
            protocol,
            server.clone(),
            permits.clone(),
            tasks.clone(),
            shutdown.clone(),
        );
        tasks.spawn(accept);
    }
    Ok(Running { addresses, metrics_address, shutdown, tasks, grace, helpers })
}

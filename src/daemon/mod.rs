//! The running daemon: binds the listeners, serves the control socket and the metrics
//! endpoint, watches the profiles and app password files, writes app passwords' last uses,
//! reloads on SIGHUP and stops on SIGTERM in two stages (no new logins, then, after the
//! grace period, every session closed).

pub mod control;
pub mod health;
pub mod http;
pub mod listener;
pub mod notify;
pub mod watch;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::protocol::Protocol;
use crate::state::{LoadError, Shutdown, State};
use control::ReloadRequest;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration names something that cannot be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The metrics address could not be bound.
    #[error("cannot listen on {address} for metrics: {source} (is another process using the port?)")]
    MetricsBind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The admin console could not start.
    #[error(transparent)]
    Console(#[from] crate::web::console::StartError),
    /// The onboarding listener could not start.
    #[error(transparent)]
    Onboarding(#[from] crate::web::onboarding::StartError),
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

fn load_config(path: &Path) -> anyhow::Result<Config> {
    use anyhow::Context;
    Config::load(path).with_context(|| format!("loading {} (use --config to name another file)", path.display()))
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP (or `reload` on the control socket)
/// reloads. Tells systemd when it is ready, reloading and stopping.
pub async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let server = State::from_config(&config).await?;
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let running = start(server.clone(), &config, grace).await?;
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    let control_path = config.control_socket();
    let control_stop = CancellationToken::new();
    match control::bind(&control_path) {
        Ok(listener) => {
            tracing::info!(path = %control_path.display(), "control socket ready");
            tokio::spawn(control::serve(listener, server.clone(), reload_tx, control_stop.clone()));
        }
        Err(e) => {
            tracing::error!(path = %control_path.display(), error = %e, "no control socket; postern status will not work")
        }
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    notify::ready();
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let _ = reload(path, &running).await;
            }
            Some(answer) = reload_rx.recv() => {
                let result = reload(path, &running).await.map_err(|e| format!("{e:#}"));
                let _ = answer.send(result);
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    notify::stopping();
    tracing::info!(grace_secs = grace.as_secs(), "stopping: no new connections; sessions get the grace period");
    running.stop().await;
    control_stop.cancel();
    let _ = std::fs::remove_file(&control_path);
    tracing::info!("stopped");
    Ok(())
}

/// Re-reads the config file and everything reloadable; logs the outcome.
async fn reload(path: &Path, running: &Running) -> anyhow::Result<()> {
    let server = &running.server;
    notify::reloading();
    let result = match load_config(path) {
        Ok(config) => match running.reload(&config).await {
            Ok(()) => {
                crate::access::decision::revalidate(server).await;
                Ok(())
            }
            Err(e) => Err(anyhow::Error::from(e)),
        },
        Err(e) => {
            server.metrics().reload(false);
            Err(e)
        }
    };
    match &result {
        Ok(()) => tracing::info!("reload done"),
        Err(e) => tracing::error!(
            error = format!("{e:#}"),
            "reload failed; the previous profiles, vault, directory and certificate stay in force"
        ),
    }
    notify::ready();
    result
}

/// A server whose listeners are bound and accepting.
pub struct Running {
    /// The bound implicit TLS addresses per protocol (useful when the config asked for port 0).
    pub addresses: HashMap<Protocol, Vec<SocketAddr>>,
    /// The bound STARTTLS addresses per protocol.
    pub starttls_addresses: HashMap<Protocol, Vec<SocketAddr>>,
    /// The bound metrics address, when `[metrics] listen` is set.
    pub metrics_address: Option<SocketAddr>,
    /// The bound admin console address, when `[console]` is set.
    pub console_address: Option<SocketAddr>,
    /// The bound onboarding address, when `[onboarding] listen` is set.
    pub onboarding_address: Option<SocketAddr>,
    onboarding_certificate: Option<Arc<crate::web::onboarding::Certificate>>,
    /// Stops the server when cancelled.
    pub shutdown: Shutdown,
    /// What `/healthz` answers: draining as soon as [`Running::stop`] begins.
    pub readiness: Arc<health::Readiness>,
    tasks: TaskTracker,
    grace: Duration,
    helpers: CancellationToken,
    server: Arc<State>,
}

impl Running {
    /// Re-reads everything reloadable from `config`, all or nothing: the shared state
    /// ([`State::reload`]) and the onboarding listener's certificate.
    pub async fn reload(&self, config: &Config) -> Result<(), LoadError> {
        let onboarding = match &self.onboarding_certificate {
            Some(_) => Some(crate::web::onboarding::Certificate::prepare(config)?),
            None => None,
        };
        self.server.reload(config).await?;
        if let (Some(certificate), Some(next)) = (&self.onboarding_certificate, onboarding) {
            certificate.apply(next);
        }
        Ok(())
    }

    /// Stops accepting (from now on `/healthz` answers `draining`, so balancers send new
    /// clients elsewhere), lets logged-in sessions run for the grace period, then closes
    /// them, and returns when every session has ended.
    pub async fn stop(self) {
        self.shutdown.stop_accepting.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.grace, self.tasks.wait()).await.is_err() {
            tracing::info!(sessions = self.tasks.len(), "grace period over; closing remaining sessions");
            self.shutdown.close_sessions.cancel();
            self.tasks.wait().await;
        }
        self.helpers.cancel();
        if let Err(e) = self.server.counters.save(true) {
            tracing::warn!(error = %e, "cannot save lockouts to the state folder; locks are lost on restart");
        }
        if let Err(e) = self.server.app_password_usage().write(self.server.state_dir()) {
            tracing::warn!(error = %e, "cannot record when app passwords were last used");
        }
    }
}

/// Binds every configured listener of `config` and starts accepting.
pub async fn start(server: Arc<State>, config: &Config, grace: Duration) -> Result<Running, StartError> {
    let shutdown = Shutdown::default();
    let tasks = TaskTracker::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
    let mut addresses: HashMap<Protocol, Vec<SocketAddr>> = HashMap::new();
    let mut starttls_addresses: HashMap<Protocol, Vec<SocketAddr>> = HashMap::new();
    let mut bound = Vec::new();
    let mut proxy_protocols = HashMap::new();
    for (protocol, p) in config.protocols() {
        if p.proxy_protocol {
            let settings = Arc::new(listener::ProxyProtocol::new(p.trusted_proxies()));
            proxy_protocols.insert(protocol, settings);
        }
        for (address, security) in p.listeners() {
            let listener = tokio::net::TcpListener::bind(address).await.map_err(|source| StartError::Bind {
                protocol,
                address,
                source,
            })?;
            let local = listener.local_addr().map_err(|source| StartError::Bind { protocol, address, source })?;
            tracing::info!(
                %protocol,
                address = %local,
                tls = security.name(),
                upstream = server.default_upstream(protocol),
                proxy_protocol = p.proxy_protocol,
                "listening"
            );
            let by_kind = match security {
                crate::config::ClientTls::Implicit => &mut addresses,
                crate::config::ClientTls::Starttls => &mut starttls_addresses,
            };
            by_kind.entry(protocol).or_default().push(local);
            bound.push((protocol, security, listener));
        }
    }
    let helpers = CancellationToken::new();
    let readiness =
        Arc::new(health::Readiness::new(Box::new(ProbeState(server.clone())), shutdown.stop_accepting.clone()));
    let metrics_address = match config.metrics.listen {
        Some(address) => {
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::MetricsBind { address, source })?;
            let local = listener.local_addr().map_err(|source| StartError::MetricsBind { address, source })?;
            tracing::info!(address = %local, "serving metrics at /metrics and readiness at /healthz");
            let services = http::Services { metrics: server.metrics().clone(), readiness: readiness.clone() };
            tokio::spawn(http::serve(listener, services, helpers.clone()));
            Some(local)
        }
        None => None,
    };
    let console_address = match &config.console {
        Some(settings) => Some(crate::web::console::start(server.clone(), config, settings, helpers.clone()).await?),
        None => None,
    };
    let (onboarding_address, onboarding_certificate) = match &config.onboarding {
        Some(onboarding) => {
            let listeners = bound.iter().filter_map(|(p, s, l)| Some((*p, *s, l.local_addr().ok()?))).collect();
            let started =
                crate::web::onboarding::start(config, onboarding, server.clone(), listeners, helpers.clone()).await?;
            (Some(started.address), Some(started.certificate))
        }
        None => (None, None),
    };
    tokio::spawn(server.counters.clone().save_periodically(helpers.clone()));
    let state_dir = server.state_dir().to_owned();
    let usage = server.app_password_usage().clone();
    tokio::spawn(crate::stores::app_passwords::flush_usage(usage, state_dir.clone(), helpers.clone()));
    let app_passwords = state_dir.join(crate::stores::app_passwords::FILE);
    tokio::spawn(crate::daemon::watch::watch_app_passwords(server.clone(), app_passwords, helpers.clone()));
    if config.server.watch_profiles {
        let path = config.resolve(&config.access.profiles);
        tokio::spawn(crate::daemon::watch::watch_profiles(server.clone(), path, helpers.clone()));
        if config.tls.client_ca.is_some() {
            tokio::spawn(crate::daemon::watch::watch_client_ca(server.clone(), config.clone(), helpers.clone()));
        }
    }
    for (protocol, security, listener) in bound {
        let accept = listener::accept_loop(
            listener,
            protocol,
            security,
            proxy_protocols.get(&protocol).cloned(),
            server.clone(),
            permits.clone(),
            tasks.clone(),
            shutdown.clone(),
        );
        tasks.spawn(accept);
    }
    readiness.set_listening();
    Ok(Running {
        addresses,
        starttls_addresses,
        metrics_address,
        console_address,
        onboarding_address,
        onboarding_certificate,
        shutdown,
        readiness,
        tasks,
        grace,
        helpers,
        server,
    })
}

/// The shared state as the readiness probe (see [`health::Probe`] for [`State`]).
struct ProbeState(Arc<State>);

impl health::Probe for ProbeState {
    fn probe(&self) -> health::ProbeFuture<'_> {
        health::Probe::probe(&*self.0)
    }
}

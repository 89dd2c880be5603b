//! The running daemon: what every session shares, and the start/stop of the listeners.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::{Lockout, Profiles};
use crate::config::{Config, Limits};
use crate::directory::Directory;
use crate::listener;
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
    profiles: ArcSwap<Profiles>,
    vault: ArcSwap<Vault>,
    upstreams: HashMap<Protocol, Upstream>,
    smtp_max_size: Option<u64>,
    tls: TlsAcceptor,
    /// Where OAuth2 access tokens come from, when some upstream uses XOAUTH2.
    pub oauth: Option<crate::oauth::TokenSource>,
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
        let tls = TlsAcceptor::from(crate::tls::server_config(&cert, &key, config.tls.min_version)?);
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
            lockout: Lockout::disabled(),
            profiles: ArcSwap::from_pointee(profiles),
            vault: ArcSwap::from_pointee(vault),
            upstreams,
            smtp_max_size: config.smtp.as_ref().and_then(|s| s.max_message_size),
            tls,
            oauth,
        }))
    }

    /// The profiles in force now.
    pub fn profiles(&self) -> Arc<Profiles> {
        self.profiles.load_full()
    }

    /// Replaces the profiles for every login from now on.
    pub fn set_profiles(&self, profiles: Profiles) {
        self.profiles.store(Arc::new(profiles));
    }

    /// Re-reads the profiles file, the vault and the directory; on any error the old ones
    /// stay in force. Sessions already logged in are not touched.
    pub async fn reload(&self, config: &Config) -> Result<(), StartError> {
        let profiles = Profiles::load(&config.resolve(&config.access.profiles))?;
        let vault = Vault::open(&config.resolve(&config.server.state_dir))?;
        let directory = Directory::open(&config.directory, &config.base_dir).await?;
        tracing::info!(profiles = profiles.len(), "reloaded security profiles, vault and directory");
        self.set_profiles(profiles);
        self.vault.store(Arc::new(vault));
        self.directory.store(Arc::new(directory));
        Ok(())
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

    /// The TLS acceptor for client connections.
    pub fn tls(&self) -> &TlsAcceptor {
        &self.tls
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
    /// Stops the server when cancelled.
    pub shutdown: Shutdown,
    tasks: TaskTracker,
    grace: Duration,
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
    Ok(Running { addresses, shutdown, tasks, grace })
}

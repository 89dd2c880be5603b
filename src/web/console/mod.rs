//! The admin web console: a small server-rendered front end over the same operations as
//! the admin commands, on its own HTTPS listener (`[console]`).
//!
//! Controls, outermost first: only addresses in `[console] allow` get an answer; every
//! response forbids framing, caching, sniffing and any script, style or image from elsewhere
//! (a strict Content-Security-Policy, no JavaScript at all); admins log in with their
//! directory password under the mail logins' throttle and lockout and must be in an admin
//! group ([`crate::access::admin`]); sessions are short-lived `__Host-` cookies bound to the
//! admin's address ([`auth`]); every form carries the session's CSRF token and cross-site
//! posts are refused; every change is audited with the admin's name.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::access::admin::ConsoleAccess;
use crate::config::{Config, ConsoleConfig};
use crate::state::State as ProxyState;
use crate::web::ClientAddr;

pub mod auth;
mod explain;
mod history;
mod page;
mod profiles;
mod sessions;
mod users;

/// What the console's pages share.
pub struct Console {
    /// The daemon's shared state.
    pub state: Arc<ProxyState>,
    /// Who may use the console.
    pub access: ConsoleAccess,
    /// Logged-in admins.
    pub sessions: auth::Sessions,
    /// One profile save at a time: its check that the file is unchanged and its write.
    pub saving: tokio::sync::Mutex<()>,
    /// Users with an OAuth2 device enrolment waiting for approval (one each at a time).
    pub enrolling: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// The Content-Security-Policy of every response: nothing but this origin's stylesheet, no
/// scripts, no frames, forms only to this origin.
pub const CSP: &str =
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

impl Console {
    /// The console of `state`, as `settings` describe it.
    pub fn new(state: Arc<ProxyState>, settings: &ConsoleConfig) -> Self {
        Self {
            state,
            access: ConsoleAccess::new(settings),
            sessions: auth::Sessions::new(Duration::from_secs(settings.session_minutes * 60)),
            saving: tokio::sync::Mutex::new(()),
            enrolling: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// The config in force now (the daemon's last successful reload), never a copy kept
    /// from the start.
    pub fn config(&self) -> Arc<Config> {
        self.state.config()
    }

    /// The profiles file.
    pub fn profiles_path(&self) -> PathBuf {
        let config = self.config();
        config.resolve(&config.access.profiles)
    }

    /// The state folder (vault).
    pub fn state_dir(&self) -> PathBuf {
        let config = self.config();
        config.resolve(&config.server.state_dir)
    }

    /// Records an admin's action: on the `audit` log target, and in the audit file when one
    /// is configured. `user` is the user acted on, or empty.
    pub fn audit(&self, admin: &str, ip: IpAddr, event: &str, user: &str, result: &str) {
        let admin = crate::user::escape(admin);
        let user = crate::user::escape(user);
        let result = crate::user::escape(result);
        tracing::info!(target: "audit", event, admin = %admin, client = %ip, user = %user, result = %result, "console");
        let config = self.config();
        if let Some(file) = &config.audit.file {
            let line = serde_json::json!({
                "event": event, "admin": admin, "client": ip.to_string(), "user": user, "result": result,
            });
            if let Err(e) = crate::audit::file::append(&config.resolve(file), line) {
                tracing::error!(error = %e, "console: cannot write the audit file");
            }
        }
    }

    /// Re-reads the vault after a change and re-checks live sessions, as a reload does.
    pub async fn reload_vault(&self) -> Result<(), crate::stores::vault::VaultError> {
        let vault = crate::stores::vault::Vault::open(&self.state_dir())?;
        self.state.upstreams.set_vault(vault);
        crate::access::decision::revalidate(&self.state).await;
        Ok(())
    }
}

/// Why the console could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address could not be bound.
    #[error("cannot listen on {address} for the console: {source} (is another process using the port?)")]
    Bind {
        /// The address.
        address: std::net::SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// The console's own certificate or key is unusable.
    #[error("console certificate: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// The console's own certificate: loaded again for new connections when the certificate
/// file changes (a renewal needs no restart); the last good one stays if the new one is
/// broken.
struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    min: crate::tls::TlsVersion,
    current: std::sync::Mutex<(Option<std::time::SystemTime>, tokio_rustls::TlsAcceptor)>,
}

impl Certificate {
    fn load(cert: PathBuf, key: PathBuf, min: crate::tls::TlsVersion) -> Result<Self, crate::tls::TlsError> {
        let modified = std::fs::metadata(&cert).and_then(|m| m.modified()).ok();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&cert, &key, min, None)?);
        Ok(Self { cert, key, min, current: std::sync::Mutex::new((modified, acceptor)) })
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let modified = std::fs::metadata(&self.cert).and_then(|m| m.modified()).ok();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if modified != current.0 {
            match crate::tls::server_config(&self.cert, &self.key, self.min, None) {
                Ok(config) => *current = (modified, tokio_rustls::TlsAcceptor::from(config)),
                Err(e) => {
                    tracing::warn!(error = %e, "console: the changed certificate cannot be loaded; the previous one stays")
                }
            }
        }
        current.1.clone()
    }
}

/// Binds `[console] listen` and serves the console until `stop` is cancelled; the bound
/// address. Without its own certificate the console uses `[tls]`'s, reloads included (never
/// asking for a client certificate).
pub async fn start(
    state: Arc<ProxyState>,
    config: &Config,
    settings: &ConsoleConfig,
    stop: tokio_util::sync::CancellationToken,
) -> Result<std::net::SocketAddr, StartError> {
    let tls: Arc<dyn Fn() -> tokio_rustls::TlsAcceptor + Send + Sync> = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let certificate = Certificate::load(config.resolve(cert), config.resolve(key), config.tls.min_version)?;
            Arc::new(move || certificate.acceptor())
        }
        // `[tls]`'s certificate as reloads leave it, never asking for a client certificate.
        _ => {
            let state = state.clone();
            Arc::new(move || state.web_tls())
        }
    };
    let address = settings.listen;
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|source| StartError::Bind { address, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind { address, source })?;
    tracing::info!(address = %local, "serving the admin console");
    let console = Arc::new(Console::new(state, settings));
    tokio::spawn(crate::web::serve("console", listener, tls, router(console), stop, crate::web::Limits::default()));
    Ok(local)
}

/// The console's routes, with its guards around them.
pub fn router(console: Arc<Console>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/profiles") }))
        .route("/static/console.css", get(stylesheet))
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/logout", post(auth::logout))
        .route("/profiles", get(profiles::list))
        .route("/profiles/edit", get(profiles::edit))
        .route("/profiles/preview", post(profiles::preview))
        .route("/profiles/save", post(profiles::save))
        .route("/users", get(users::list))
        .route("/users/action", post(users::action))
        .route("/sessions", get(sessions::list))
        .route("/sessions/close", post(sessions::close))
        .route("/history", get(history::search))
        .route("/history.csv", get(history::csv))
        .route("/explain", get(explain::explain))
        .fallback(|| async { page::error(StatusCode::NOT_FOUND, "No such page.") })
        // Forms are small; a CSV import is the largest (1 MiB).
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .layer(middleware::from_fn_with_state(console.clone(), guard))
        .with_state(console)
}

/// Answers only allowed addresses and puts the security headers on every response.
async fn guard(State(console): State<Arc<Console>>, request: Request, next: Next) -> Response {
    let allowed = request.extensions().get::<ClientAddr>().is_some_and(|c| console.access.allows(c.0.ip()));
    let mut response = if allowed {
        if request.method() == axum::http::Method::POST && !auth::same_origin(request.headers()) {
            let header =
                |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
            tracing::warn!(
                origin = header("origin"),
                host = header("host"),
                site = header("sec-fetch-site"),
                "console: a cross-site form post was refused"
            );
            page::error(StatusCode::FORBIDDEN, "Cross-site form posts are refused.")
        } else {
            next.run(request).await
        }
    } else {
        (StatusCode::FORBIDDEN, "Not allowed\n").into_response()
    };
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    response
}

async fn stylesheet() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("../../../templates/console/console.css"))
        .into_response()
}

//! The one place that chooses what Postern presents upstream for a user, and logs in with
//! it: client logins and `postern probe` both go through [`Upstreams::login`].
//!
//! The user's route (`super::route`) says which upstream; its `upstream_auth` says which
//! credential:
//!
//! - `"password"`: the password stored in the vault (none stored: [`LoginError::NoCredential`]);
//! - `"xoauth2"`: an access token from the `[oauth]` source for the user's mailbox (the
//!   vault's upstream login name if one is stored, else the address), from the upstream's
//!   `oauth_source`. With the
//!   refresh-token source the vault must hold the user's refresh token; a rotated one is
//!   written back.
//!
//! POP3's `recent:` prefix is put in front of the upstream login name.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::route::{Route, Routing, SetupUpstreamsError, Target};
use super::{LoggedIn, UpstreamAuth, UpstreamError};
use crate::config::{Config, UpstreamAuthMode};
use crate::metrics::TokenEndpointMetrics;
use crate::protocol::Protocol;
use crate::stores::oauth::TokenError;
use crate::stores::vault::{SecretKind, Vault, VaultError};

/// Why no upstream session could be had for a user. Apart from [`LoginError::NoCredential`]
/// (nothing stored: the admin has not set the user up), every kind is an outage: the user's
/// own password was right, the upstream side failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The vault holds nothing for the user.
    #[error("no upstream credential is stored for the user")]
    NoCredential,
    /// The vault could not be read.
    #[error("vault: {0}")]
    Vault(#[from] VaultError),
    /// The stored credential is of the wrong kind for the protocol's `upstream_auth`.
    #[error(
        "the stored credential is {} but {protocol}.upstream_auth = \"{}\" needs {}: store the right one with `postern user set-upstream`",
        stored.article(), mode.as_str(), needed.article()
    )]
    WrongKind {
        /// The protocol.
        protocol: Protocol,
        /// Its `upstream_auth`.
        mode: UpstreamAuthMode,
        /// What is stored.
        stored: SecretKind,
        /// What the mode needs.
        needed: SecretKind,
    },
    /// The user's route has no upstream for the protocol.
    #[error("route {route} has no upstream for {protocol}")]
    NotRouted {
        /// The route.
        route: String,
        /// The protocol.
        protocol: Protocol,
    },
    /// `upstream_auth = "xoauth2"` without an `[oauth]` source.
    #[error("{0}.upstream_auth is \"xoauth2\" but no [oauth] source is set up")]
    NoTokenSource(Protocol),
    /// No access token could be had from the token endpoint.
    #[error("no OAuth2 token for {mailbox}: {source}")]
    Token {
        /// The mailbox the token was for.
        mailbox: String,
        /// Why.
        source: TokenError,
    },
    /// The upstream answered the login with a refusal (its answer is kept for the admin).
    #[error("upstream {address} refused the stored credential: {answer}")]
    Refused {
        /// The upstream's `host:port`.
        address: String,
        /// Its answer.
        answer: String,
    },
    /// The upstream could not be reached, or broke off the login.
    #[error("upstream {address}: {source}")]
    Unreachable {
        /// The upstream's `host:port`.
        address: String,
        /// What failed.
        source: UpstreamError,
    },
}

/// The configured routes and their upstreams with what logs in to them: the vault in force
/// and the OAuth2 token sources. Both are swapped whole on reload.
pub struct Upstreams {
    routing: ArcSwap<Routing>,
    vault: ArcSwap<Vault>,
    token_metrics: TokenEndpointMetrics,
}

/// The credential presented upstream for one attempt.
struct Credential {
    auth: UpstreamAuth,
    /// For an OAuth2 token: the mailbox it is for, and whether it came from the cache.
    oauth: Option<(String, bool)>,
}

impl Upstreams {
    /// Prepares every route's upstreams and token sources; nothing is dialled yet.
    pub fn from_config(config: &Config, vault: Vault) -> Result<Self, SetupUpstreamsError> {
        let token_metrics = TokenEndpointMetrics::default();
        let routing = Routing::from_config(config, None, &token_metrics)?;
        Ok(Self { routing: ArcSwap::from_pointee(routing), vault: ArcSwap::from_pointee(vault), token_metrics })
    }

    /// The routes of `config`, ready for [`Upstreams::set_routing`]; token sources whose
    /// settings did not change are carried over with their cached tokens.
    pub fn prepare(&self, config: &Config) -> Result<Routing, SetupUpstreamsError> {
        Routing::from_config(config, Some(&self.routing.load()), &self.token_metrics)
    }

    /// Replaces the routes for every login from now on.
    pub fn set_routing(&self, routing: Routing) {
        self.routing.store(Arc::new(routing));
    }

    /// The routes in force now.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// The vault in force now.
    pub fn vault(&self) -> Arc<Vault> {
        self.vault.load_full()
    }

    /// Replaces the vault for every login from now on.
    pub fn set_vault(&self, vault: Vault) {
        self.vault.store(Arc::new(vault));
    }

    /// The token endpoints' request and cache-hit counters, all sources together.
    pub fn token_metrics(&self) -> &TokenEndpointMetrics {
        &self.token_metrics
    }

    /// Builds `user`'s credential for `protocol` on `route` (from [`Routing::resolve`]) and
    /// logs in upstream with it. `user` is a normalized identity (`crate::user::normalize`); `upstream_prefix` is POP3's `recent:`
    /// or empty; `client_hello` the client's SMTP `EHLO` name; `client` the client's address,
    /// passed on where the protocol's `forward_client_address` is on. `observe` is told how
    /// long each upstream login attempt took.
    ///
    /// A cached OAuth2 token the upstream refuses may have been revoked early: it is
    /// forgotten and the login tried once more with a new token.
    #[allow(clippy::too_many_arguments)]
    pub async fn login(
        &self,
        route: &Route,
        protocol: Protocol,
        user: &str,
        upstream_prefix: &str,
        client_hello: Option<&str>,
        client: Option<SocketAddr>,
        observe: &(dyn Fn(Duration) + Sync),
    ) -> Result<LoggedIn, LoginError> {
        let target =
            route.target(protocol).ok_or_else(|| LoginError::NotRouted { route: route.name().to_owned(), protocol })?;
        let upstream = &target.upstream;
        let mut credential = self.credential(protocol, target, user, upstream_prefix).await?;
        let mut retried = false;
        loop {
            let started = Instant::now();
            let result = upstream.login(&credential.auth, client_hello, client).await;
            observe(started.elapsed());
            let error = match result {
                Ok(logged_in) => return Ok(logged_in),
                Err(e) => e,
            };
            if let (
                UpstreamError::Refused(_),
                Some((mailbox, from_cache)),
                Some(oauth),
                UpstreamAuth::XOAuth2 { token, .. },
            ) = (&error, &credential.oauth, &target.oauth, &credential.auth)
            {
                if oauth.forget(mailbox, token).await && *from_cache && !retried {
                    retried = true;
                    tracing::info!(user, %error, "upstream refused a cached OAuth2 token; retrying with a new one");
                    credential = self.credential(protocol, target, user, upstream_prefix).await?;
                    continue;
                }
            }
            let address = upstream.address().to_owned();
            return Err(match error {
                UpstreamError::Refused(answer) => LoginError::Refused { address, answer },
                source => LoginError::Unreachable { address, source },
            });
        }
    }

    async fn credential(
        &self,
        protocol: Protocol,
        target: &Target,
        user: &str,
        upstream_prefix: &str,
    ) -> Result<Credential, LoginError> {
        let mode = target.upstream.auth_mode();
        let stored = self.vault().get(user)?;
        let wrong_kind =
            |stored: SecretKind, needed: SecretKind| LoginError::WrongKind { protocol, mode, stored, needed };
        match mode {
            UpstreamAuthMode::Password => {
                let stored = stored.ok_or(LoginError::NoCredential)?;
                if stored.kind != SecretKind::Password {
                    return Err(wrong_kind(stored.kind, SecretKind::Password));
                }
                let upstream_user = format!("{upstream_prefix}{}", stored.upstream_user.as_deref().unwrap_or(user));
                Ok(Credential {
                    auth: UpstreamAuth::Password { user: upstream_user, password: stored.secret },
                    oauth: None,
                })
            }
            UpstreamAuthMode::Xoauth2 => {
                let oauth = target.oauth.as_ref().ok_or(LoginError::NoTokenSource(protocol))?;
                let mailbox = stored.as_ref().and_then(|s| s.upstream_user.clone()).unwrap_or_else(|| user.to_owned());
                let refresh_token = if oauth.needs_refresh_token() {
                    let stored = stored.as_ref().ok_or(LoginError::NoCredential)?;
                    if stored.kind != SecretKind::RefreshToken {
                        return Err(wrong_kind(stored.kind, SecretKind::RefreshToken));
                    }
                    Some(&stored.secret)
                } else {
                    None
                };
                let token = oauth
                    .access_token(&mailbox, refresh_token)
                    .await
                    .map_err(|source| LoginError::Token { mailbox: mailbox.clone(), source })?;
                if let (Some(rotated), Some(used)) = (token.refresh_token, refresh_token) {
                    match oauth.store_rotated_refresh_token(user, used, rotated).await {
                        Ok(Some(vault)) => self.set_vault(vault),
                        Ok(None) => tracing::info!(
                            user,
                            "refresh token rotated, but the vault entry changed meanwhile; kept it"
                        ),
                        Err(e) => {
                            tracing::error!(user, error = %e, "cannot store the rotated refresh token; renewals may fail")
                        }
                    }
                }
                Ok(Credential {
                    auth: UpstreamAuth::XOAuth2 { user: format!("{upstream_prefix}{mailbox}"), token: token.token },
                    oauth: Some((mailbox, token.from_cache)),
                })
            }
        }
    }
}

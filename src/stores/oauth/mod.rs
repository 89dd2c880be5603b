//! OAuth2 access tokens for upstream logins with SASL XOAUTH2.
//!
//! One [`TokenSource`], built from the `[oauth]` table, serves every protocol whose
//! `upstream_auth` is `"xoauth2"`. It gets tokens from one of three sources:
//!
//! - a Google service account with domain-wide delegation ([`google`]): a signed JWT per
//!   mailbox, traded with the JWT-bearer grant;
//! - a Microsoft 365 application ([`microsoft`]): the client-credentials grant, one token for
//!   all mailboxes;
//! - per-user refresh tokens kept in the vault ([`refresh`]).
//!
//! Tokens are cached until shortly before they expire, with one request in flight per user
//! ([`cache`]). Token endpoints are reached over verified TLS only ([`http`]). Keys, client
//! secrets, assertions and tokens are [`Secret`]s: wiped on drop and never logged; key and
//! secret files that group or others may read are refused. Each request's latency is logged
//! (`latency_ms`) and counted in [`TokenMetrics`], which a metrics exporter can read.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::config::{Config, OAuthConfig, OAuthSource};
use crate::metrics::TokenEndpointMetrics;
use crate::secret::{Secret, SecretFileError};
use crate::stores::vault::{SecretKind, UpstreamSecret, Vault, VaultError};
use crate::tls::TlsError;

mod cache;
pub mod device;
pub mod google;
pub mod grant;
pub mod http;
pub mod jwt;
mod metrics;
pub mod microsoft;
pub mod refresh;

pub use cache::Obtained as AccessToken;
pub use metrics::{MetricsSnapshot, TokenMetrics};

/// Why the token source could not be set up at startup.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A key or secret file's content is malformed.
    #[error("{what} {path}: {message}")]
    File {
        /// Which file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong; never the file's content.
        message: String,
    },
    /// A key or secret file is missing, or refused by the secret-file policy of
    /// [`crate::secret`] (group or others may access it, wrong owner, not a regular file).
    #[error("{what} {error}")]
    SecretFile {
        /// Which file.
        what: &'static str,
        /// Why it was refused; says what to do.
        error: SecretFileError,
    },
    /// A value in `[oauth]` cannot be used.
    #[error("config key `oauth.{key}`: {message}")]
    Config {
        /// The key inside `[oauth]`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// No `[oauth]` table is the source asked for.
    #[error("{0}: add the [oauth] table or name another source")]
    NoSuchSource(String),
    /// The CA file for the token endpoint is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why no access token could be had. Every variant is an outage from the client's point of
/// view: the user's directory password was right, the upstream side is what failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The endpoint could not be reached or did not answer in time.
    #[error("token endpoint {url} unreachable: {source}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// What failed.
        source: http::HttpError,
    },
    /// The endpoint answered with an OAuth2 error (e.g. `invalid_grant` for a revoked
    /// refresh token, `unauthorized_client` for missing delegation).
    #[error("token endpoint {url} refused the request (HTTP {status}): {error}{}", if description.is_empty() { String::new() } else { format!(": {description}") })]
    Rejected {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The OAuth2 error code.
        error: String,
        /// The endpoint's explanation, if any.
        description: String,
    },
    /// The endpoint answered an HTTP error without an OAuth2 error body.
    #[error("token endpoint {url} answered HTTP {status}")]
    Status {
        /// The endpoint.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The endpoint's success answer is unusable.
    #[error("unusable answer from token endpoint {url}: {message}")]
    BadResponse {
        /// The endpoint.
        url: String,
        /// What is wrong; never the token.
        message: String,
    },
    /// The JWT assertion could not be signed.
    #[error("cannot sign the JWT assertion: {0}")]
    Sign(String),
}

enum Grant {
    Google(google::ServiceAccount),
    Microsoft(microsoft::App),
    Refresh(refresh::Client),
}

/// Where access tokens come from, with their cache and counters.
pub struct TokenSource {
    settings: OAuthConfig,
    grant: Grant,
    client: http::HttpsClient,
    cache: cache::TokenCache,
    metrics: TokenMetrics,
    state_dir: PathBuf,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("source", &self.source().name())
            .field("token_url", &self.token_url())
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    /// The token source `name` of the config's `[oauth]` tables (`default` for a single
    /// `[oauth]` table), counting its requests in `exported` too.
    pub fn named(config: &Config, name: &str, exported: &TokenEndpointMetrics) -> Result<Self, SetupError> {
        let oauth = config
            .oauth
            .get(name)
            .ok_or_else(|| SetupError::NoSuchSource(format!("there is no [{}] table", config.oauth.key(name))))?;
        let mut source = Self::new(oauth, &config.base_dir, config.resolve(&config.server.state_dir))?;
        source.metrics.export_into(exported);
        Ok(source)
    }

    /// The token source an admin command means: the one called `name`, or the only one
    /// when no name is given.
    pub fn chosen(config: &Config, name: Option<&str>) -> Result<Self, SetupError> {
        let names = || config.oauth.names().collect::<Vec<_>>().join(", ");
        let Some((name, _)) = config.oauth.choose(name) else {
            let message = match name {
                Some(name) => format!("there is no [oauth.{name}] table; the sources are: {}", names()),
                None if config.oauth.is_empty() => "there is no [oauth] table".to_owned(),
                None => format!("several sources are configured; name one of: {}", names()),
            };
            return Err(SetupError::NoSuchSource(message));
        };
        Self::named(config, name, &TokenEndpointMetrics::default())
    }

    /// Loads keys and secrets for `oauth`; relative paths are resolved against `base_dir`.
    /// Rotated refresh tokens are written to the vault in `state_dir`.
    pub fn new(oauth: &OAuthConfig, base_dir: &Path, state_dir: PathBuf) -> Result<Self, SetupError> {
        let resolve = |p: &Path| base_dir.join(p);
        let missing = |key: &'static str| SetupError::Config {
            key,
            message: format!("required with source = \"{}\"", oauth.source.name()),
        };
        let grant = match oauth.source {
            OAuthSource::GoogleServiceAccount => {
                let key = oauth.service_account_key.as_deref().ok_or_else(|| missing("service_account_key"))?;
                Grant::Google(google::ServiceAccount::load(
                    &resolve(key),
                    oauth.token_url.as_deref(),
                    oauth.scope.as_deref(),
                )?)
            }
            OAuthSource::Microsoft => {
                let client_id = oauth.client_id.as_deref().ok_or_else(|| missing("client_id"))?;
                let secret = oauth.client_secret_file.as_deref().ok_or_else(|| missing("client_secret_file"))?;
                Grant::Microsoft(microsoft::App::load(
                    oauth.tenant.as_deref(),
                    client_id,
                    &resolve(secret),
                    oauth.token_url.as_deref(),
                    oauth.scope.as_deref(),
                )?)
            }
            OAuthSource::RefreshToken => {
                let url = oauth.token_url.as_deref().ok_or_else(|| missing("token_url"))?;
                let client_id = oauth.client_id.as_deref().ok_or_else(|| missing("client_id"))?;
                let secret = oauth.client_secret_file.as_deref().map(resolve);
                Grant::Refresh(refresh::Client::load(
                    url,
                    client_id,
                    secret.as_deref(),
                    oauth.scope.as_deref(),
                    oauth.device_authorization_url.as_deref(),
                )?)
            }
        };
        let ca = oauth.ca_file.as_deref().map(resolve);
        let tls = crate::tls::client_config(ca.as_deref())?;
        Ok(Self {
            settings: oauth.clone(),
            grant,
            client: http::HttpsClient::new(tls, oauth.timeout()),
            cache: cache::TokenCache::new(oauth.refresh_margin()),
            metrics: TokenMetrics::default(),
            state_dir,
        })
    }

    /// Enrols a user's refresh token with the device authorization grant (RFC 8628):
    /// `announce` is given the code and the page to enter it on; then the token endpoint is
    /// polled until the grant is approved (the refresh token is returned), denied or expired.
    pub async fn authorize_device(
        &self,
        announce: impl FnOnce(&device::DeviceAuthorization),
    ) -> Result<Secret, device::DeviceError> {
        let Grant::Refresh(refresh) = &self.grant else {
            return Err(device::DeviceError::NotConfigured);
        };
        let authorization = refresh.start_device(&self.client).await?;
        announce(&authorization);
        device::wait_for_grant(&authorization, || refresh.poll_device(&self.client, &authorization)).await
    }

    /// The settings it was made from.
    pub fn settings(&self) -> &OAuthConfig {
        &self.settings
    }

    /// Which kind of source this is.
    pub fn source(&self) -> OAuthSource {
        match self.grant {
            Grant::Google(_) => OAuthSource::GoogleServiceAccount,
            Grant::Microsoft(_) => OAuthSource::Microsoft,
            Grant::Refresh(_) => OAuthSource::RefreshToken,
        }
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &str {
        match &self.grant {
            Grant::Google(g) => g.token_url().as_str(),
            Grant::Microsoft(m) => m.token_url().as_str(),
            Grant::Refresh(r) => r.token_url().as_str(),
        }
    }

    /// Whether each user needs a refresh token stored in the vault.
    pub fn needs_refresh_token(&self) -> bool {
        matches!(self.grant, Grant::Refresh(_))
    }

    /// Counters of token endpoint requests, cache hits and latency.
    pub fn metrics(&self) -> &TokenMetrics {
        &self.metrics
    }

    /// An access token for `mailbox`. `refresh_token` is the user's stored refresh token,
    /// required when [`TokenSource::needs_refresh_token`] says so and ignored otherwise.
    pub async fn access_token(&self, mailbox: &str, refresh_token: Option<&Secret>) -> Result<AccessToken, TokenError> {
        let key = self.cache_key(mailbox);
        let obtained = self.cache.get(&key, || self.fetch(mailbox, refresh_token)).await?;
        if obtained.from_cache {
            self.metrics.record_hit();
        }
        Ok(obtained)
    }

    /// Forgets `token` for `mailbox` after the upstream refused it, so the next login asks for
    /// a new one instead of presenting a revoked token until it expires. Returns whether a
    /// new token may help. Microsoft's application token is kept: it is shared by all
    /// mailboxes, and a refusal there almost always means the mailbox was not granted to the
    /// application, which a new token would not change.
    pub async fn forget(&self, mailbox: &str, token: &Secret) -> bool {
        if matches!(self.grant, Grant::Microsoft(_)) {
            return false;
        }
        self.cache.forget(&self.cache_key(mailbox), token).await;
        true
    }

    /// Microsoft's application token is the same for every mailbox.
    fn cache_key(&self, mailbox: &str) -> String {
        match self.grant {
            Grant::Microsoft(_) => String::new(),
            _ => mailbox.to_lowercase(),
        }
    }

    async fn fetch(&self, mailbox: &str, refresh_token: Option<&Secret>) -> Result<grant::Issued, TokenError> {
        let started = Instant::now();
        let result = match &self.grant {
            Grant::Google(g) => g.fetch(&self.client, mailbox).await,
            Grant::Microsoft(m) => m.fetch(&self.client).await,
            Grant::Refresh(r) => match refresh_token {
                Some(token) => r.fetch(&self.client, token).await,
                None => Err(TokenError::BadResponse {
                    url: r.token_url().to_string(),
                    message: format!("no refresh token was given for {mailbox}"),
                }),
            },
        };
        let latency = started.elapsed();
        self.metrics.record_request(latency, result.is_ok());
        let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        match &result {
            Ok(issued) => tracing::debug!(
                source = self.source().name(),
                mailbox,
                latency_ms,
                lifetime_secs = issued.lifetime.as_secs(),
                rotated = issued.refresh_token.is_some(),
                "token endpoint issued an access token"
            ),
            Err(error) => {
                tracing::warn!(source = self.source().name(), mailbox, latency_ms, %error, "token endpoint request failed")
            }
        }
        result
    }

    /// Replaces `user`'s stored refresh token `used` by `rotated` and returns the updated
    /// vault, or `None` when the vault no longer holds `used` for the user (an admin changed
    /// it meanwhile; theirs wins). Written with [`Vault::update`], so a concurrent admin
    /// command or another rotation is neither lost nor overwritten.
    pub async fn store_rotated_refresh_token(
        &self,
        user: &str,
        used: &Secret,
        rotated: Secret,
    ) -> Result<Option<Vault>, VaultError> {
        let user = user.to_owned();
        let used = used.clone();
        let state_dir = self.state_dir.clone();
        let dir = state_dir.clone();
        let write = tokio::task::spawn_blocking(move || {
            let stored = Vault::update(&state_dir, |vault| {
                let Some(current) = vault.get(&user)? else {
                    return Ok(false);
                };
                if current.kind != SecretKind::RefreshToken || !current.secret.constant_time_eq(used.expose()) {
                    return Ok(false);
                }
                let mut entry = UpstreamSecret::refresh_token(rotated);
                entry.upstream_user = current.upstream_user;
                vault.set(&user, entry)?;
                Ok::<_, VaultError>(true)
            })?;
            // Read again once the lock is released: what other writers stored since is kept.
            if stored { Vault::open(&state_dir).map(Some) } else { Ok(None) }
        });
        write.await.unwrap_or_else(|e| Err(VaultError::Io { path: dir, source: io::Error::other(e.to_string()) }))
    }
}

/// Reads a file holding a key or secret with the one secret-file reader
/// ([`crate::secret::read_secret_text`]), naming the file as `what` in errors.
pub(crate) fn read_private_file(path: &Path, what: &'static str) -> Result<Secret, SetupError> {
    crate::secret::read_secret_text(path).map_err(|error| SetupError::SecretFile { what, error })
}

/// Reads a client secret file: one line, surrounding whitespace ignored.
pub(crate) fn read_secret_file(path: &Path) -> Result<Secret, SetupError> {
    let what = "client secret file";
    let text = read_private_file(path, what)?;
    let secret = text.expose().trim();
    if secret.is_empty() || secret.contains(['\r', '\n']) {
        return Err(SetupError::File {
            what,
            path: path.to_owned(),
            message: "must hold the secret on a single line".into(),
        });
    }
    Ok(Secret::new(secret))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn readable_secret_files_are_refused_and_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "s3cr3t-value\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            fs::set_permissions(&path, Permissions::from_mode(mode)).unwrap();
            let err = read_secret_file(&path).unwrap_err();
            assert!(matches!(&err, SetupError::SecretFile { error, .. } if error.is_exposed()), "{mode:o}: {err}");
            assert!(err.to_string().contains("chmod 600"));
        }
        fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "s3cr3t-value");
        fs::write(&path, "two\nlines\n").unwrap();
        assert!(!read_secret_file(&path).unwrap_err().to_string().contains("two"));
    }

    #[test]
    fn google_key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.json");
        let write = |text: &str| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, Permissions::from_mode(0o600)).unwrap();
        };
        write(
            r#"{"type":"service_account","client_email":"sa@p.iam.gserviceaccount.com","private_key":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}"#,
        );
        let err = google::ServiceAccount::load(&path, None, None).unwrap_err().to_string();
        assert!(err.contains("private_key") && !err.contains("AAAA"), "{err}");
        write(r#"{"type":"authorized_user","client_email":"x","private_key":"k"}"#);
        assert!(google::ServiceAccount::load(&path, None, None).unwrap_err().to_string().contains("service_account"));
        write(r#"{"private_key":"k"}"#);
        assert!(google::ServiceAccount::load(&path, None, None).unwrap_err().to_string().contains("client_email"));
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            google::ServiceAccount::load(&path, None, None),
            Err(SetupError::SecretFile { error, .. }) if error.is_exposed()
        ));
    }
}

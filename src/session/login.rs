//! The access decision for one login, in order: user name → address throttle → lockout →
//! any profile lists the address at all → directory lookup → the user's profiles → password
//! → upstream credential (the stored password, or an OAuth2 access token) → upstream login.
//!
//! Cheap checks run first so strangers never reach the directory, and a disallowed address
//! never gets a password checked.

use std::net::IpAddr;

use crate::access::sessions::UserSlot;
use crate::access::{self, Denial, Grant};
use crate::config::UpstreamAuthMode;
use crate::directory::DirectoryError;
use crate::protocol::{Credentials, Protocol};
use crate::server::Server;
use crate::upstream::{LoggedIn, UpstreamAuth, UpstreamError};
use crate::vault::SecretKind;

/// Longest user name accepted (the longest legal mail address).
const MAX_USER_NAME: usize = 254;

/// Why a login did not get through.
#[derive(Debug)]
pub enum Refusal {
    /// Refused; the client sees the one denial text.
    Denied(Denial),
    /// Could not be decided or completed because a service is down or refused us.
    Unavailable(String),
}

/// A login that got through: the upstream session and the profile that admitted it.
pub struct Admitted {
    /// The user's session slot, held while the session lives.
    pub slot: UserSlot,
    /// The logged-in upstream session.
    pub upstream: LoggedIn,
    /// The profile and allow entry that matched.
    pub grant: Grant,
}

/// The identity the decision works with: the typed address, trimmed and lower-cased.
pub fn normalize_user(user: &str) -> Result<String, Denial> {
    let user = user.trim();
    let valid = !user.is_empty()
        && user.len() <= MAX_USER_NAME
        && !user.chars().any(|c| c.is_control() || c.is_whitespace());
    if valid { Ok(user.to_lowercase()) } else { Err(Denial::InvalidUserName) }
}

/// Runs the whole decision for `credentials` from `ip`, and logs in upstream if it passes.
/// Every refusal is counted against the client's address; wrong passwords also against the
/// user.
pub async fn admit(server: &Server, protocol: Protocol, ip: IpAddr, credentials: &Credentials) -> Result<Admitted, Refusal> {
    let result = decide(server, protocol, ip, credentials).await;
    if let Err(Refusal::Denied(denial)) = &result {
        if *denial != Denial::WrongPassword {
            server.lockout.record_address_failure(ip);
        }
    }
    result
}

async fn decide(server: &Server, protocol: Protocol, ip: IpAddr, credentials: &Credentials) -> Result<Admitted, Refusal> {
    let user = normalize_user(&credentials.user).map_err(Refusal::Denied)?;
    if server.lockout.is_throttled(ip) {
        return Err(Refusal::Denied(Denial::Throttled));
    }
    if server.lockout.is_locked(&user) {
        return Err(Refusal::Denied(Denial::Locked));
    }
    let profiles = server.profiles();
    if !profiles.any_allows(ip) {
        return Err(Refusal::Denied(Denial::IpNotInAnyProfile));
    }
    let directory = server.directory();
    let started = std::time::Instant::now();
    let entry = directory.lookup(&user).await;
    server.metrics().directory_latency.observe(started.elapsed());
    let entry = entry.map_err(directory_refusal)?;
    if let Some(groups) = &entry.groups {
        access::check_profiles(&profiles, &user, groups, protocol, ip).map_err(Refusal::Denied)?;
    }
    let started = std::time::Instant::now();
    let verified = directory.verify(&entry, &credentials.password).await;
    server.metrics().directory_latency.observe(started.elapsed());
    let groups = match verified {
        Ok(groups) => groups,
        Err(DirectoryError::WrongPassword) => {
            if server.lockout.record_failure(&user, ip) {
                tracing::warn!(user = %user, "user locked out after repeated wrong passwords");
            }
            return Err(Refusal::Denied(Denial::WrongPassword));
        }
        Err(e) => return Err(directory_refusal(e)),
    };
    server.lockout.record_success(&user);
    let grant = access::check_profiles(&profiles, &user, &groups, protocol, ip).map_err(Refusal::Denied)?;
    let slot = server.sessions.try_user(&user).ok_or_else(|| {
        Refusal::Unavailable(format!("too many concurrent sessions for the user (limit {})", server.sessions.per_user()))
    })?;

    let upstream = login_upstream(
        server,
        protocol,
        &user,
        &credentials.upstream_prefix,
        credentials.client_hello.as_deref(),
    )
    .await?;
    Ok(Admitted { slot, upstream, grant })
}

/// The credential presented upstream for one login.
pub struct UpstreamCredential {
    /// What the upstream login sends.
    pub auth: UpstreamAuth,
    /// For an OAuth2 token: the mailbox it is for, and whether it came from the cache.
    oauth: Option<(String, bool)>,
}

/// Builds what Postern presents upstream for `user` (already [`normalize_user`]d) on
/// `protocol`, as that protocol's `upstream_auth` says:
///
/// - `"password"`: the password stored in the vault (none stored: denied);
/// - `"xoauth2"`: an access token from the `[oauth]` source for the user's mailbox (the
///   vault's upstream login name if one is stored, else the address). With the
///   refresh-token source the vault must hold the user's refresh token; a rotated one is
///   written back. Without a token the login is an outage, never a wrong password.
///
/// `upstream_prefix` (POP3's `recent:`) is put in front of the upstream login name.
pub async fn upstream_credential(
    server: &Server,
    protocol: Protocol,
    user: &str,
    upstream_prefix: &str,
) -> Result<UpstreamCredential, Refusal> {
    let stored = server.vault().get(user).map_err(|e| Refusal::Unavailable(format!("vault: {e}")))?;
    match server.upstream(protocol).auth_mode() {
        UpstreamAuthMode::Password => {
            let stored = stored.ok_or(Refusal::Denied(Denial::NoUpstreamCredential))?;
            let upstream_user = format!("{upstream_prefix}{}", stored.upstream_user.as_deref().unwrap_or(user));
            match stored.kind {
                SecretKind::Password => {
                    Ok(UpstreamCredential { auth: UpstreamAuth::Password { user: upstream_user, password: stored.secret }, oauth: None })
                }
                SecretKind::RefreshToken => Err(Refusal::Unavailable(format!(
                    "the stored credential is an OAuth2 refresh token, but {protocol}.upstream_auth is \"password\""
                ))),
            }
        }
        UpstreamAuthMode::Xoauth2 => {
            let oauth = server.oauth.as_ref().ok_or_else(|| {
                Refusal::Unavailable(format!("{protocol}.upstream_auth is \"xoauth2\" but no [oauth] source is set up"))
            })?;
            let mailbox = stored.as_ref().and_then(|s| s.upstream_user.clone()).unwrap_or_else(|| user.to_owned());
            let refresh_token = if oauth.needs_refresh_token() {
                let stored = stored.as_ref().ok_or(Refusal::Denied(Denial::NoUpstreamCredential))?;
                if stored.kind != SecretKind::RefreshToken {
                    return Err(Refusal::Unavailable(format!(
                        "the stored credential is a {}, but the refresh-token source needs the user's refresh token",
                        stored.kind
                    )));
                }
                Some(&stored.secret)
            } else {
                None
            };
            let token = oauth
                .access_token(&mailbox, refresh_token)
                .await
                .map_err(|e| Refusal::Unavailable(format!("no OAuth2 token for {mailbox}: {e}")))?;
            if let (Some(rotated), Some(used)) = (token.refresh_token, refresh_token) {
                match oauth.store_rotated_refresh_token(user, used, rotated).await {
                    Ok(Some(vault)) => server.set_vault(vault),
                    Ok(None) => tracing::info!(user, "refresh token rotated, but the vault entry changed meanwhile; kept it"),
                    Err(e) => tracing::error!(user, error = %e, "cannot store the rotated refresh token; renewals may fail"),
                }
            }
            Ok(UpstreamCredential {
                auth: UpstreamAuth::XOAuth2 { user: format!("{upstream_prefix}{mailbox}"), token: token.token },
                oauth: Some((mailbox, token.from_cache)),
            })
        }
    }
}

/// Builds the upstream credential of `user` and logs in upstream with it: what a client
/// login does once the directory said yes, and what `postern probe USER` runs.
///
/// A cached OAuth2 token the upstream refuses may have been revoked early: it is forgotten
/// and the login tried once more with a new token. Every upstream failure is an outage.
pub async fn login_upstream(
    server: &Server,
    protocol: Protocol,
    user: &str,
    upstream_prefix: &str,
    client_hello: Option<&str>,
) -> Result<LoggedIn, Refusal> {
    let upstream = server.upstream(protocol);
    let mut credential = upstream_credential(server, protocol, user, upstream_prefix).await?;
    let mut retried = false;
    loop {
        let started = std::time::Instant::now();
        let result = upstream.login(&credential.auth, client_hello).await;
        server.metrics().upstream_latency.observe(started.elapsed());
        let error = match result {
            Ok(logged_in) => return Ok(logged_in),
            Err(e) => e,
        };
        if let (UpstreamError::Refused(_), Some((mailbox, from_cache)), Some(oauth), UpstreamAuth::XOAuth2 { token, .. }) =
            (&error, &credential.oauth, &server.oauth, &credential.auth)
        {
            if oauth.forget(mailbox, token).await && *from_cache && !retried {
                retried = true;
                tracing::info!(user, %error, "upstream refused a cached OAuth2 token; retrying with a new one");
                credential = upstream_credential(server, protocol, user, upstream_prefix).await?;
                continue;
            }
        }
        return Err(match error {
            UpstreamError::Refused(_) => Refusal::Unavailable(error.to_string()),
            other => Refusal::Unavailable(format!("upstream: {other}")),
        });
    }
}

fn directory_refusal(error: DirectoryError) -> Refusal {
    match error {
        DirectoryError::UnknownUser => Refusal::Denied(Denial::UnknownUser),
        DirectoryError::WrongPassword => Refusal::Denied(Denial::WrongPassword),
        e @ (DirectoryError::Unavailable(_) | DirectoryError::Config(_)) => Refusal::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_trimmed_lowercased_and_checked() {
        assert_eq!(normalize_user(" Alice@Example.COM ").unwrap(), "alice@example.com");
        assert_eq!(normalize_user(""), Err(Denial::InvalidUserName));
        assert_eq!(normalize_user("a b@example.com"), Err(Denial::InvalidUserName));
        assert_eq!(normalize_user("a\0b@example.com"), Err(Denial::InvalidUserName));
        assert_eq!(normalize_user("a\r\nb"), Err(Denial::InvalidUserName));
        assert_eq!(normalize_user(&"a".repeat(255)), Err(Denial::InvalidUserName));
    }
}

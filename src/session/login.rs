//! The access decision for one login, in order: user name → address throttle → lockout →
//! any profile lists the address at all → directory lookup → the user's profiles → password
//! → stored upstream credential → upstream login.
//!
//! Cheap checks run first so strangers never reach the directory, and a disallowed address
//! never gets a password checked.

use std::net::IpAddr;

use crate::access::sessions::UserSlot;
use crate::access::{self, Denial, Grant};
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
    let entry = directory.lookup(&user).await.map_err(directory_refusal)?;
    if let Some(groups) = &entry.groups {
        access::check_profiles(&profiles, &user, groups, protocol, ip).map_err(Refusal::Denied)?;
    }
    let groups = match directory.verify(&entry, &credentials.password).await {
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

    let stored = server
        .vault()
        .get(&user)
        .map_err(|e| Refusal::Unavailable(format!("vault: {e}")))?
        .ok_or(Refusal::Denied(Denial::NoUpstreamCredential))?;
    let upstream_user = format!("{}{}", credentials.upstream_prefix, stored.upstream_user.as_deref().unwrap_or(&user));
    let auth = match stored.kind {
        SecretKind::Password => UpstreamAuth::Password { user: upstream_user, password: stored.secret },
        SecretKind::RefreshToken => {
            return Err(Refusal::Unavailable(
                "the stored credential is an OAuth2 refresh token, but no token endpoint is configured".into(),
            ));
        }
    };
    let upstream = server
        .upstream(protocol)
        .login(&auth, credentials.client_hello.as_deref())
        .await
        .map_err(|e| match e {
            UpstreamError::Refused(_) => Refusal::Unavailable(e.to_string()),
            other => Refusal::Unavailable(format!("upstream: {other}")),
        })?;
    Ok(Admitted { slot, upstream, grant })
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

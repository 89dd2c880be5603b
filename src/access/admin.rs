//! Who may use the admin console: an address in `[console] allow`, then the same throttle,
//! lockout, directory password check and failure counting as a mail login, then membership
//! of one of `[console] admin_groups`. Mail profiles play no part: an admin need not be
//! allowed mail access, and mail access does not make anyone an admin.

use std::collections::HashSet;
use std::net::IpAddr;

use super::decision::{Denial, Refusal, normalize_user, precheck, reserve, wrong_password};
use super::profiles::canonical_ip;
use crate::config::ConsoleConfig;
use crate::secret::Secret;
use crate::state::State;
use crate::stores::directory::DirectoryError;

/// The console's access rules.
#[derive(Debug, Clone)]
pub struct ConsoleAccess {
    allow: Vec<ipnet::IpNet>,
    admin_groups: HashSet<String>,
}

impl ConsoleAccess {
    /// The rules of `[console]`.
    pub fn new(config: &ConsoleConfig) -> Self {
        Self {
            allow: config.allowed_networks(),
            admin_groups: config.admin_groups.iter().map(|g| g.trim().to_lowercase()).collect(),
        }
    }

    /// Whether the console answers a client at `ip` at all.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.allow.iter().any(|net| net.contains(&ip))
    }

    /// Whether one of `groups` is an admin group.
    pub fn is_admin(&self, groups: &[String]) -> bool {
        groups.iter().any(|g| self.admin_groups.contains(&g.trim().to_lowercase()))
    }
}

/// Checks an admin's console login from `ip`; the normalized user name when it passes.
/// Refusals are counted against the address; wrong passwords also against the user, in
/// the same lockout as mail logins.
pub async fn admit_admin(
    state: &State,
    access: &ConsoleAccess,
    ip: IpAddr,
    user: &str,
    password: &Secret,
) -> Result<String, Refusal> {
    let result = decide(state, access, ip, user, password).await;
    if let Err(Refusal::Denied(denial)) = &result
        && *denial != Denial::WrongPassword
    {
        state.counters.record_address_failure(ip).await;
    }
    result
}

async fn decide(
    state: &State,
    access: &ConsoleAccess,
    ip: IpAddr,
    user: &str,
    password: &Secret,
) -> Result<String, Refusal> {
    if !access.allows(ip) {
        return Err(Refusal::Denied(Denial::ConsoleAddressNotAllowed));
    }
    let user = normalize_user(user).map_err(Refusal::Denied)?;
    if password.is_empty() {
        return Err(Refusal::Denied(Denial::EmptyPassword));
    }
    // As long as a mail login's password may be; nothing longer reaches the hashing or the
    // directory.
    if password.expose().len() > crate::protocol::limits::DEFAULT_MAX_LITERAL {
        return Err(Refusal::Denied(Denial::WrongPassword));
    }
    precheck(state, &user, ip).await?;
    let directory = state.directory();
    let entry = match directory.lookup(&user).await {
        Ok(entry) => entry,
        Err(e) => {
            let refusal = Refusal::from(e);
            if matches!(refusal, Refusal::Denied(_)) {
                directory.equalize_refusal(password).await;
            }
            return Err(refusal);
        }
    };
    let reservation = reserve(state, &user, ip).await?;
    let groups = match directory.verify(&entry, password).await {
        Ok(groups) => {
            reservation.succeeded().await;
            groups
        }
        Err(DirectoryError::WrongPassword) => {
            wrong_password(state, reservation, &user, ip).await;
            return Err(Refusal::Denied(Denial::WrongPassword));
        }
        Err(e) => {
            drop(reservation);
            return Err(e.into());
        }
    };
    if !access.is_admin(&groups) {
        return Err(Refusal::Denied(Denial::NotAnAdmin));
    }
    Ok(user)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> ConsoleAccess {
        let config: ConsoleConfig = toml::from_str(
            "listen = \"127.0.0.1:0\"\nadmin_groups = [\"Mail-Admins\"]\nallow = [\"10.0.0.0/24\", \"::1\"]",
        )
        .unwrap();
        ConsoleAccess::new(&config)
    }

    #[test]
    fn the_console_answers_only_listed_networks_and_admits_only_admin_groups() {
        let a = access();
        assert!(a.allows("10.0.0.7".parse().unwrap()));
        assert!(a.allows("::ffff:10.0.0.7".parse().unwrap()), "IPv4-mapped");
        assert!(a.allows("::1".parse().unwrap()));
        assert!(!a.allows("10.0.1.7".parse().unwrap()));
        assert!(a.is_admin(&["staff".into(), "mail-admins".into()]), "groups compare without case");
        assert!(!a.is_admin(&["staff".into()]));
    }
}

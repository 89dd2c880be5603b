//! Who may log in: security profiles with IP allowlists, and lockout.
//!
//! The checks that need no password live here; the session runs them in order around the
//! directory's password check (see `session::login`).

use std::net::IpAddr;

use crate::protocol::Protocol;

pub mod lockout;
pub mod profiles;
pub mod sessions;

pub use lockout::Lockout;
pub use profiles::{Profile, Profiles};

/// The precise reason a login was refused. The client never sees it (every refusal reads
/// the same); the audit log does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// The user name is not a usable mail address.
    InvalidUserName,
    /// Too many recent password failures for this user.
    Locked,
    /// Too many recent failed logins from the client's address.
    Throttled,
    /// The client's address is in no profile at all.
    IpNotInAnyProfile,
    /// The directory does not know the user.
    UnknownUser,
    /// No profile applies to the user.
    NoProfile,
    /// Profiles apply, but none has mail access switched on.
    MailAccessOff,
    /// Profiles apply, but none covers this protocol.
    ProtocolNotAllowed,
    /// Profiles apply, but none lists the client's address.
    IpNotAllowed,
    /// The directory password is wrong.
    WrongPassword,
    /// No upstream credential is stored for the user.
    NoUpstreamCredential,
}

impl Denial {
    /// The reason as written to the audit log.
    pub fn reason(self) -> &'static str {
        match self {
            Denial::InvalidUserName => "invalid user name",
            Denial::Locked => "locked out after repeated password failures",
            Denial::Throttled => "client IP throttled after repeated failed logins",
            Denial::IpNotInAnyProfile => "client IP not in any profile",
            Denial::UnknownUser => "unknown user",
            Denial::NoProfile => "no profile applies to the user",
            Denial::MailAccessOff => "user's profiles do not grant mail access",
            Denial::ProtocolNotAllowed => "protocol not allowed by the user's profiles",
            Denial::IpNotAllowed => "client IP not allowed by the user's profiles",
            Denial::WrongPassword => "wrong password",
            Denial::NoUpstreamCredential => "no upstream credential stored for the user",
        }
    }

}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

/// Which profile let a login through, for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The profile's name.
    pub profile: String,
    /// The allow entry that matched the client's address.
    pub entry: ipnet::IpNet,
}

/// Decides, from the user's profiles alone, whether `ip` may use `protocol`.
///
/// `user` is lower-case; `groups` are the user's directory groups.
pub fn check_profiles(
    profiles: &Profiles,
    user: &str,
    groups: &[String],
    protocol: Protocol,
    ip: IpAddr,
) -> Result<Grant, Denial> {
    let applicable = profiles.for_user(user, groups);
    if applicable.is_empty() {
        return Err(Denial::NoProfile);
    }
    let mut enabled = applicable.into_iter().filter(|p| p.mail_access).peekable();
    if enabled.peek().is_none() {
        return Err(Denial::MailAccessOff);
    }
    let mut covering = enabled.filter(|p| p.covers(protocol)).peekable();
    if covering.peek().is_none() {
        return Err(Denial::ProtocolNotAllowed);
    }
    covering
        .find_map(|p| p.matching_entry(ip).map(|entry| Grant { profile: p.name.clone(), entry: *entry }))
        .ok_or(Denial::IpNotAllowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profiles() -> Profiles {
        Profiles::parse(
            r#"
            [[profile]]
            name = "office"
            allow = ["127.0.0.1/32"]
            users = ["alice@example.com", "dave@example.com"]
            protocols = ["imap", "smtp"]
            [[profile]]
            name = "off"
            mail_access = false
            allow = ["0.0.0.0/0"]
            users = ["bob@example.com"]
            [[profile]]
            name = "remote"
            allow = ["192.0.2.0/24"]
            groups = ["travellers"]
            "#,
        )
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        let p = profiles();
        let check = |user: &str, groups: &[&str], proto, addr: &str| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            check_profiles(&p, user, &groups, proto, ip(addr))
        };
        assert_eq!(check("carol@example.com", &[], Protocol::Imap, "127.0.0.1"), Err(Denial::NoProfile));
        assert_eq!(check("bob@example.com", &[], Protocol::Imap, "127.0.0.1"), Err(Denial::MailAccessOff));
        assert_eq!(check("alice@example.com", &[], Protocol::Pop3, "127.0.0.1"), Err(Denial::ProtocolNotAllowed));
        assert_eq!(check("alice@example.com", &[], Protocol::Imap, "127.0.0.2"), Err(Denial::IpNotAllowed));
        let grant = check("alice@example.com", &[], Protocol::Imap, "127.0.0.1").unwrap();
        assert_eq!(grant.profile, "office");
        let grant = check("dave@example.com", &["Travellers"], Protocol::Pop3, "192.0.2.50").unwrap();
        assert_eq!(grant.profile, "remote");
    }
}

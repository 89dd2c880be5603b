//! Security profiles: named IP allowlists that admins apply to users and groups.
//!
//! The profiles file (TOML) is what admins edit:
//!
//! ```toml
//! [[profile]]
//! name = "head-office"
//! mail_access = true                 # the "POP/IMAP access restriction" switch
//! allow = ["203.0.113.0/24", "2001:db8:10::/48", "198.51.100.7"]
//! users = ["alice@example.com"]
//! groups = ["mail-users"]            # directory groups, by name or full DN
//! protocols = ["imap", "pop3", "smtp"]  # optional; all when absent
//! client_cert = "off"                # or "required" / "alternative" ([tls] client_ca)
//! password = "directory"             # or "app" (app passwords only) or "either"
//! ```
//!
//! A user may log in only when a profile that applies to them (by name or group) has
//! `mail_access` on, covers the protocol, lists the client's address, and accepts the kind
//! of password given (see [`PasswordPolicy`]); `client_cert` adds a client certificate
//! naming the user to that (`required`) or accepts one instead of a listed address
//! (`alternative`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde::Deserialize;

use crate::protocol::Protocol;

/// Why a profiles file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfilesError {
    /// The file could not be read.
    #[error("cannot read profiles file {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid or has unknown keys.
    #[error("profiles file {path}: {message}")]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, with line and key.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfilesFile {
    #[serde(default)]
    profile: Vec<ProfileEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEntry {
    name: String,
    #[serde(default = "yes")]
    mail_access: bool,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    protocols: Option<Vec<Protocol>>,
    #[serde(default)]
    client_cert: CertRequirement,
    #[serde(default)]
    password: PasswordPolicy,
}

/// What a profile asks of the client's certificate (`client_cert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRequirement {
    /// Certificates play no part: the address decides.
    #[default]
    Off,
    /// A listed address and a valid certificate naming the user.
    Required,
    /// A listed address, or else a valid certificate naming the user (from anywhere).
    Alternative,
}

impl CertRequirement {
    /// The value as written in the profiles file.
    pub fn name(self) -> &'static str {
        match self {
            CertRequirement::Off => "off",
            CertRequirement::Required => "required",
            CertRequirement::Alternative => "alternative",
        }
    }
}

/// Which passwords a profile accepts (`password = ...`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PasswordPolicy {
    /// The directory password only (the default).
    #[default]
    Directory,
    /// App passwords only (`postern user app-password add`); the directory password is
    /// refused.
    App,
    /// Either.
    Either,
}

/// The kind of password a login presented, as the password check found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasswordKind {
    /// The user's directory password.
    Directory,
    /// One of the user's app passwords.
    App,
}

impl PasswordPolicy {
    /// Whether a password of `kind` is accepted.
    pub fn accepts(self, kind: PasswordKind) -> bool {
        matches!(
            (self, kind),
            (PasswordPolicy::Either, _)
                | (PasswordPolicy::Directory, PasswordKind::Directory)
                | (PasswordPolicy::App, PasswordKind::App)
        )
    }

    /// The setting as written in the profiles file.
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordPolicy::Directory => "directory",
            PasswordPolicy::App => "app",
            PasswordPolicy::Either => "either",
        }
    }
}

impl PasswordKind {
    /// The kind as written in audit lines and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            PasswordKind::Directory => "directory",
            PasswordKind::App => "app",
        }
    }
}

fn yes() -> bool {
    true
}

/// One security profile, parsed.
#[derive(Debug, Clone)]
pub struct Profile {
    /// The admin's name for it, shown in audit lines.
    pub name: String,
    /// Whether the profile grants mail access at all.
    pub mail_access: bool,
    /// Protocols it covers; `None` means all.
    pub protocols: Option<Vec<Protocol>>,
    /// Allowed client networks; single addresses are /32 or /128 networks.
    pub allow: Vec<IpNet>,
    /// What the profile asks of a client certificate.
    pub client_cert: CertRequirement,
    /// Which passwords it accepts.
    pub password: PasswordPolicy,
}

impl Profile {
    /// The first allow entry containing `ip`, if any.
    pub fn matching_entry(&self, ip: IpAddr) -> Option<&IpNet> {
        let ip = canonical_ip(ip);
        self.allow.iter().find(|net| net.contains(&ip))
    }

    /// Whether the profile covers `protocol`.
    pub fn covers(&self, protocol: Protocol) -> bool {
        self.protocols.as_ref().is_none_or(|p| p.contains(&protocol))
    }
}

/// All profiles, indexed by the users and groups they apply to.
#[derive(Debug, Default)]
pub struct Profiles {
    profiles: Vec<Profile>,
    by_user: HashMap<String, Vec<usize>>,
    by_group: HashMap<String, Vec<usize>>,
}

/// An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`, what a dual-stack socket reports for
/// IPv4 clients) as the IPv4 address it is, so IPv4 allow entries match it.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_allow_entry(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        let net = match net {
            IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                let v4 = v6.addr().to_ipv4_mapped().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).map_err(|e| e.to_string())?
            }
            other => other,
        };
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(|ip| IpNet::from(canonical_ip(ip)))
        .map_err(|_| format!("`{text}` is not an IP address or CIDR network (e.g. 203.0.113.7 or 203.0.113.0/24)"))
}

impl Profiles {
    /// Reads and parses the profiles file at `path`.
    pub fn load(path: &Path) -> Result<Self, ProfilesError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ProfilesError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|message| ProfilesError::Parse { path: path.to_owned(), message })
    }

    /// Parses profiles from TOML text; the error names the profile and entry at fault.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ProfilesFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut profiles = Profiles::default();
        let mut names = HashSet::new();
        for (index, entry) in file.profile.into_iter().enumerate() {
            let at = format!("profile `{}` (#{})", entry.name, index + 1);
            if entry.name.trim().is_empty() {
                return Err(format!("profile #{} has an empty name", index + 1));
            }
            if !names.insert(entry.name.clone()) {
                return Err(format!("{at}: the name is used twice"));
            }
            let allow = entry
                .allow
                .iter()
                .filter(|line| !line.trim().is_empty())
                .map(|line| parse_allow_entry(line).map_err(|e| format!("{at}, allow: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            for user in entry.users {
                let user = crate::user::normalize(&user).map_err(|e| format!("{at}, users: {e}"))?;
                profiles.by_user.entry(user).or_default().push(index);
            }
            for group in entry.groups {
                profiles.by_group.entry(group.trim().to_lowercase()).or_default().push(index);
            }
            profiles.profiles.push(Profile {
                name: entry.name,
                mail_access: entry.mail_access,
                protocols: entry.protocols,
                allow,
                client_cert: entry.client_cert,
                password: entry.password,
            });
        }
        Ok(profiles)
    }

    /// Number of profiles.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// Whether there are no profiles at all.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Whether any profile names directory groups (so groups must be known to decide).
    pub fn uses_groups(&self) -> bool {
        !self.by_group.is_empty()
    }

    /// Whether `ip` appears in any profile's allowlist: a cheap first filter that refuses
    /// strangers before the directory is asked anything.
    pub fn any_allows(&self, ip: IpAddr) -> bool {
        self.profiles.iter().any(|p| p.mail_access && p.matching_entry(ip).is_some())
    }

    /// Whether a profile with mail access accepts a certificate instead of an address
    /// (`client_cert = "alternative"`): then a client whose address is in no profile may
    /// still get in with a certificate.
    pub fn any_accepts_certificates(&self) -> bool {
        self.profiles.iter().any(|p| p.mail_access && p.client_cert == CertRequirement::Alternative)
    }

    /// Whether any profile asks for a client certificate (`client_cert` not `"off"`).
    pub fn any_asks_for_certificates(&self) -> bool {
        self.profiles.iter().any(|p| p.client_cert != CertRequirement::Off)
    }

    /// Profiles applying to `user` (lower-case) directly or through one of `groups`,
    /// each once, in file order.
    pub fn for_user<'a>(&'a self, user: &str, groups: &[String]) -> Vec<&'a Profile> {
        let mut indices: Vec<usize> = self.by_user.get(user).cloned().unwrap_or_default();
        for group in groups {
            if let Some(found) = self.by_group.get(&group.to_lowercase()) {
                indices.extend(found);
            }
        }
        indices.sort_unstable();
        indices.dedup();
        indices.into_iter().map(|i| &self.profiles[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[profile]]
        name = "office"
        allow = ["127.0.0.1", "10.1.0.0/16", "2001:db8::/32", " "]
        users = ["Alice@Example.com"]

        [[profile]]
        name = "staff-vpn"
        allow = ["192.0.2.0/24"]
        groups = ["Staff"]
        protocols = ["imap"]

        [[profile]]
        name = "disabled"
        mail_access = false
        allow = ["0.0.0.0/0"]
        users = ["bob@example.com"]
    "#;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn users_and_groups_select_profiles_case_insensitively() {
        let p = Profiles::parse(FILE).unwrap();
        let names = |v: Vec<&Profile>| v.into_iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(p.for_user("alice@example.com", &[])), ["office"]);
        assert_eq!(names(p.for_user("alice@example.com", &["staff".into()])), ["office", "staff-vpn"]);
        assert!(p.for_user("carol@example.com", &[]).is_empty());
        assert!(p.uses_groups());
    }

    #[test]
    fn allow_entries_match_addresses_networks_and_mapped_ipv4() {
        let p = Profiles::parse(FILE).unwrap();
        let office = &p.for_user("alice@example.com", &[])[0];
        assert!(office.matching_entry(ip("127.0.0.1")).is_some());
        assert!(office.matching_entry(ip("127.0.0.2")).is_none());
        assert!(office.matching_entry(ip("10.1.200.3")).is_some());
        assert!(office.matching_entry(ip("::ffff:10.1.0.9")).is_some());
        assert!(office.matching_entry(ip("2001:db8:1::5")).is_some());
        assert!(office.matching_entry(ip("2001:db9::5")).is_none());
    }

    #[test]
    fn mapped_ipv6_entries_become_ipv4() {
        let p = Profiles::parse("[[profile]]\nname='x'\nallow=['::ffff:192.0.2.0/120']\nusers=['u']").unwrap();
        assert!(p.for_user("u", &[])[0].matching_entry(ip("192.0.2.77")).is_some());
    }

    #[test]
    fn protocols_and_mail_access_are_kept() {
        let p = Profiles::parse(FILE).unwrap();
        let vpn = &p.for_user("x", &["staff".into()])[0];
        assert!(vpn.covers(Protocol::Imap) && !vpn.covers(Protocol::Pop3));
        assert!(!p.for_user("bob@example.com", &[])[0].mail_access);
        assert!(p.any_allows(ip("192.0.2.9")));
        assert!(!p.any_allows(ip("198.51.100.1")), "a disabled profile's entries do not count");
    }

    #[test]
    fn client_cert_defaults_to_off_and_takes_three_values() {
        let p = Profiles::parse(FILE).unwrap();
        assert_eq!(p.for_user("alice@example.com", &[])[0].client_cert, CertRequirement::Off);
        assert!(!p.any_accepts_certificates());
        let text = "[[profile]]\nname='a'\nclient_cert='required'\nusers=['u']\n\
                    [[profile]]\nname='b'\nclient_cert='alternative'\nusers=['u']";
        let p = Profiles::parse(text).unwrap();
        let kinds: Vec<_> = p.for_user("u", &[]).iter().map(|p| p.client_cert).collect();
        assert_eq!(kinds, [CertRequirement::Required, CertRequirement::Alternative]);
        assert!(p.any_accepts_certificates() && p.any_asks_for_certificates());
        let off = Profiles::parse("[[profile]]\nname='b'\nmail_access=false\nclient_cert='alternative'").unwrap();
        assert!(!off.any_accepts_certificates(), "a profile without mail access lets no one in");
        let err = Profiles::parse("[[profile]]\nname='a'\nclient_cert='yes'").unwrap_err();
        assert!(err.contains("client_cert") || err.contains("off"), "{err}");
    }

    #[test]
    fn the_password_setting_defaults_to_the_directory_password() {
        let p = Profiles::parse(
            "[[profile]]\nname='a'\nusers=['u']\n[[profile]]\nname='b'\nusers=['u']\npassword='app'\n\
             [[profile]]\nname='c'\nusers=['u']\npassword='either'",
        )
        .unwrap();
        let policies: Vec<PasswordPolicy> = p.for_user("u", &[]).iter().map(|p| p.password).collect();
        assert_eq!(policies, [PasswordPolicy::Directory, PasswordPolicy::App, PasswordPolicy::Either]);
        assert!(PasswordPolicy::Directory.accepts(PasswordKind::Directory));
        assert!(!PasswordPolicy::Directory.accepts(PasswordKind::App));
        assert!(!PasswordPolicy::App.accepts(PasswordKind::Directory));
        assert!(PasswordPolicy::Either.accepts(PasswordKind::App));
        let err = Profiles::parse("[[profile]]\nname='a'\npassword='ldap'").unwrap_err();
        assert!(err.contains("directory") && err.contains("either"), "{err}");
    }

    #[test]
    fn bad_entries_name_the_profile() {
        let err = Profiles::parse("[[profile]]\nname='lab'\nallow=['10.0.0.300']").unwrap_err();
        assert!(err.contains("lab") && err.contains("10.0.0.300"), "{err}");
        let err = Profiles::parse("[[profile]]\nname='a'\n[[profile]]\nname='a'").unwrap_err();
        assert!(err.contains("twice"), "{err}");
        assert!(Profiles::parse("[[profile]]\nname='a'\ncolour='red'").unwrap_err().contains("colour"));
    }
}

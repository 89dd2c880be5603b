//! Directories that own users' passwords: an embedded file, or LDAP / Active Directory.
//!
//! Checking a login is two calls so that cheap, password-free checks (profiles, source IP)
//! can run between them: [`Directory::lookup`] finds the user and, where it can, their
//! groups; [`Directory::verify`] checks the password and returns the groups.

use std::path::Path;

use crate::secret::Secret;

pub mod file;
pub mod ldap;

/// Which directory to use, from the `[directory]` table of the config.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum DirectoryConfig {
    /// Users and argon2id hashes in a TOML file next to the config.
    File(file::FileConfig),
    /// An LDAP or Active Directory server.
    Ldap(Box<ldap::LdapConfig>),
}

/// A user the directory knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The user's mail address, as the directory spells it.
    pub user: String,
    /// LDAP: the entry's distinguished name, bound with the user's password in `verify`.
    pub dn: Option<String>,
    /// Groups known before the password check; `None` when only `verify` can tell
    /// (LDAP with a bind-DN template and no service account).
    pub groups: Option<Vec<String>>,
}

/// Why the directory did not confirm a login.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// No such user.
    #[error("unknown user")]
    UnknownUser,
    /// The password is wrong (or empty).
    #[error("wrong password")]
    WrongPassword,
    /// The directory could not be reached or answered with an error; not the user's fault.
    #[error("directory unavailable: {0}")]
    Unavailable(String),
    /// The directory's own configuration or file is unusable.
    #[error("directory configuration: {0}")]
    Config(String),
    /// The directory refuses the account itself (disabled, expired, locked there, ...),
    /// whatever Postern thinks of the password.
    #[error("directory refuses the account: {0}")]
    Account(AccountState),
}

/// A state of a directory account that refuses logins, as the directory reports it on the
/// bind: Active Directory in its diagnostic text (`data 533`, ...), OpenLDAP's password
/// policy overlay in its bind response control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AccountState {
    /// The account is disabled (AD `533`).
    #[error("account disabled")]
    Disabled,
    /// The account itself has expired (AD `701`).
    #[error("account expired")]
    Expired,
    /// The password has expired (AD `532`, ppolicy `passwordExpired`).
    #[error("password expired")]
    PasswordExpired,
    /// The password was reset and must be changed before use (AD `773`, ppolicy
    /// `changeAfterReset`).
    #[error("password must be changed")]
    PasswordMustChange,
    /// The directory has locked the account (AD `775`, ppolicy `accountLocked`).
    #[error("account locked in the directory")]
    Locked,
    /// Logons are not allowed at this time of day (AD `530`).
    #[error("logon not allowed at this time")]
    LogonHours,
    /// Logons are not allowed from this workstation (AD `531`).
    #[error("logon not allowed from this workstation")]
    Workstation,
}

/// An opened directory.
pub enum Directory {
    /// See [`file::FileDirectory`].
    File(file::FileDirectory),
    /// See [`ldap::LdapDirectory`].
    Ldap(Box<ldap::LdapDirectory>),
}

impl Directory {
    /// Opens the directory `config` names; relative paths are taken from `base_dir`.
    pub async fn open(config: &DirectoryConfig, base_dir: &Path) -> Result<Self, DirectoryError> {
        Ok(match config {
            DirectoryConfig::File(c) => Directory::File(file::FileDirectory::open(c, base_dir)?),
            DirectoryConfig::Ldap(c) => Directory::Ldap(Box::new(ldap::LdapDirectory::open(c, base_dir).await?)),
        })
    }

    /// Finds `user` (a lower-case mail address) without checking any password.
    pub async fn lookup(&self, user: &str) -> Result<Entry, DirectoryError> {
        match self {
            Directory::File(d) => d.lookup(user),
            Directory::Ldap(d) => d.lookup(user).await,
        }
    }

    /// Spends on a refused login what a password check would have cost (the file
    /// directory's argon2 check), so refusals before the check cannot tell known users from
    /// unknown ones by time. LDAP answers both quickly and needs nothing.
    pub async fn equalize_refusal(&self, password: &Secret) {
        if let Directory::File(_) = self {
            file::check_dummy(password).await;
        }
    }

    /// Whether the directory answers, cheaply (for the readiness check): the file
    /// directory always does; LDAP must answer a small request on the service connection.
    pub async fn reachable(&self) -> Result<(), DirectoryError> {
        match self {
            Directory::File(_) => Ok(()),
            Directory::Ldap(d) => d.reachable().await,
        }
    }

    /// Checks `password` for `entry` and returns the user's groups.
    ///
    /// An empty password is refused here, before any backend sees it: an LDAP simple bind
    /// with an empty password is an anonymous bind, which "succeeds".
    pub async fn verify(&self, entry: &Entry, password: &Secret) -> Result<Vec<String>, DirectoryError> {
        if password.is_empty() {
            return Err(DirectoryError::WrongPassword);
        }
        match self {
            Directory::File(d) => d.verify(entry, password).await,
            Directory::Ldap(d) => d.verify(entry, password).await,
        }
    }
}

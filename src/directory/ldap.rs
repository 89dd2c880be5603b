//! LDAP / Active Directory (placeholder until it lands).

use std::path::Path;

use super::{DirectoryError, Entry};
use crate::secret::Secret;

/// `[directory] kind = "ldap"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// `ldap://host:port` or `ldaps://host:port`.
    pub url: String,
}

/// An LDAP directory.
pub struct LdapDirectory;

impl LdapDirectory {
    /// Connects according to `config`; relative paths are taken from `base_dir`.
    pub async fn open(_config: &LdapConfig, _base_dir: &Path) -> Result<Self, DirectoryError> {
        Ok(Self)
    }
    /// See [`super::Directory::lookup`].
    pub async fn lookup(&self, _user: &str) -> Result<Entry, DirectoryError> {
        Err(DirectoryError::UnknownUser)
    }
    /// See [`super::Directory::verify`].
    pub async fn verify(&self, _entry: &Entry, _password: &Secret) -> Result<Vec<String>, DirectoryError> {
        Err(DirectoryError::WrongPassword)
    }
}

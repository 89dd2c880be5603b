//! The vault of upstream credentials (placeholder until it lands).

use std::path::Path;

use crate::secret::Secret;

/// Why the vault could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// Underlying file error.
    #[error("vault file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What kind of secret an entry holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretKind {
    /// A password or app password, sent with LOGIN / PLAIN.
    Password,
    /// An OAuth2 refresh token, traded for access tokens.
    RefreshToken,
}

/// One user's upstream credential, decrypted.
#[derive(Debug, Clone)]
pub struct UpstreamSecret {
    /// The upstream login name when it differs from the user's mail address.
    pub upstream_user: Option<String>,
    /// What `secret` is.
    pub kind: SecretKind,
    /// The secret itself.
    pub secret: Secret,
}

/// The encrypted store of upstream credentials under the state directory.
pub struct Vault;

impl Vault {
    /// Opens the vault under `state_dir`.
    pub fn open(_state_dir: &Path) -> Result<Self, VaultError> {
        Ok(Self)
    }
    /// The decrypted credential of `user`, if one is stored.
    pub fn get(&self, _user: &str) -> Result<Option<UpstreamSecret>, VaultError> {
        Ok(None)
    }
}

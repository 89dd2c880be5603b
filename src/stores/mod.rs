//! Where the decision and the upstream login get their facts: the [`directory`] (who the
//! user is, their password and groups), the users' per-device [`app_passwords`], the
//! [`vault`] (each user's upstream credential) and the [`oauth`] token sources (access
//! tokens for XOAUTH2); the [`ca`] issues client certificates.

pub mod app_passwords;
pub mod ca;
pub mod credentials_csv;
pub mod directory;
pub mod oauth;
pub mod vault;

use crate::config::Config;

/// Why a user could not be removed.
#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    /// The vault could not be changed.
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
    /// The file directory could not be changed.
    #[error(transparent)]
    Directory(#[from] directory::DirectoryError),
}

/// Removes `user`'s upstream credential and, with the file directory, their directory entry;
/// says what was removed (empty: the user was not known). Blocks on the vault's write lock.
pub fn remove_user(config: &Config, user: &str) -> Result<Vec<&'static str>, RemoveError> {
    let state_dir = config.resolve(&config.server.state_dir);
    let mut removed = Vec::new();
    if vault::Vault::update(&state_dir, |vault| vault.remove(user))? {
        removed.push("upstream credential");
    }
    if let directory::DirectoryConfig::File(file) = &config.directory
        && directory::file::remove_user(&config.resolve(&file.path), user)?
    {
        removed.push("directory entry");
    }
    Ok(removed)
}

//! The embedded file directory (placeholder until it lands).

use std::path::{Path, PathBuf};

use super::{DirectoryError, Entry};
use crate::secret::Secret;

/// `[directory] kind = "file"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The users file.
    pub path: PathBuf,
}

/// Users and their argon2id password hashes, loaded from a TOML file.
pub struct FileDirectory;

impl FileDirectory {
    /// Loads the users file named by `config`, relative to `base_dir`.
    pub fn open(_config: &FileConfig, _base_dir: &Path) -> Result<Self, DirectoryError> {
        Ok(Self)
    }
    /// See [`super::Directory::lookup`].
    pub fn lookup(&self, _user: &str) -> Result<Entry, DirectoryError> {
        Err(DirectoryError::UnknownUser)
    }
    /// See [`super::Directory::verify`].
    pub async fn verify(&self, _entry: &Entry, _password: &Secret) -> Result<Vec<String>, DirectoryError> {
        Err(DirectoryError::WrongPassword)
    }
}

/// Sets `user`'s password in the users file at `path`, creating file and user as needed.
pub fn set_password(_path: &Path, _user: &str, _password: &Secret) -> Result<(), DirectoryError> {
    Ok(())
}

//! Secrets (passwords, upstream credentials, keys) in memory, and the one reader for files
//! that hold them.
//!
//! Every file holding a secret (the vault key and file, the users file, the LDAP bind
//! password file, OAuth2 key and client-secret files) is read with [`read_secret_file`] or
//! [`read_secret_text`], so the daemon, a reload and `postern check` accept and refuse the
//! same files. The policy: a regular file of at most [`MAX_SECRET_FILE_LEN`] bytes, owned
//! by the process's user or root, that neither group nor others may access (mode & 0o077
//! == 0). A process running as root accepts any owner: that is the administrator running
//! `postern check` or editing the vault with `sudo` on files the service account owns.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// A secret string: wiped from memory on drop, redacted in `Debug` and `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps `value`; the caller's copy should be dropped.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The secret's text, for the few places that must send it somewhere.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `other` in time independent of where they differ.
    pub fn constant_time_eq(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// Largest secret file read: far above any key or vault this program writes, small
/// enough that a wrong path (a log, a device image) fails fast instead of filling memory.
pub const MAX_SECRET_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Why a secret file was refused. Never carries the file's content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// There is no file at the path.
    #[error("{path} not found: create it, or correct the path in the config")]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The path is a directory, FIFO, socket or device.
    #[error("{path} is a {kind}, not a regular file: point the config at the file itself")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// The file is larger than [`MAX_SECRET_FILE_LEN`].
    #[error("{path} is {len} bytes, more than the {MAX_SECRET_FILE_LEN} allowed for a secret file: check the path")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
    /// The file belongs to another account than the process's or root.
    #[error(
        "{path} is owned by uid {owner}, neither this process's user (uid {euid}) nor root: run `chown {euid} {path}` (or `chown root {path}`)"
    )]
    WrongOwner {
        /// The file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The process's effective user.
        euid: u32,
    },
    /// Others (every account) may access the file.
    #[error("{path} is readable by everyone or accessible by others (mode {mode:04o}): run `chmod 600 {path}`")]
    WorldAccessible {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file's group may access it.
    #[error("{path} is accessible by its group (mode {mode:04o}): run `chmod 600 {path}`")]
    GroupAccessible {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A text secret file does not hold UTF-8.
    #[error("{path} is not UTF-8 text: check that it is the right file")]
    NotText {
        /// The file.
        path: PathBuf,
    },
    /// Any other error while reading (permission denied to this process, I/O error).
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

impl SecretFileError {
    /// Whether the file does not exist (some callers treat that as "empty").
    pub fn is_missing(&self) -> bool {
        matches!(self, SecretFileError::Missing { .. })
    }

    /// Whether the file was refused for its mode bits.
    pub fn is_exposed(&self) -> bool {
        matches!(self, SecretFileError::WorldAccessible { .. } | SecretFileError::GroupAccessible { .. })
    }
}

/// Applies the secret-file policy to `meta`, the metadata of the file at `path`.
fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), SecretFileError> {
    check_metadata_as(path, meta, rustix::process::geteuid().as_raw())
}

/// [`check_metadata`] for a process whose effective user is `euid`.
fn check_metadata_as(path: &Path, meta: &fs::Metadata, euid: u32) -> Result<(), SecretFileError> {
    let file_type = meta.file_type();
    if !file_type.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if file_type.is_dir() {
            "directory"
        } else if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_socket() {
            "socket"
        } else if file_type.is_block_device() || file_type.is_char_device() {
            "device"
        } else {
            "special file"
        };
        return Err(SecretFileError::NotRegular { path: path.to_owned(), kind });
    }
    if euid != 0 && meta.uid() != euid && meta.uid() != 0 {
        return Err(SecretFileError::WrongOwner { path: path.to_owned(), owner: meta.uid(), euid });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(SecretFileError::WorldAccessible { path: path.to_owned(), mode });
    }
    if mode & 0o070 != 0 {
        return Err(SecretFileError::GroupAccessible { path: path.to_owned(), mode });
    }
    if meta.len() > MAX_SECRET_FILE_LEN {
        return Err(SecretFileError::TooLarge { path: path.to_owned(), len: meta.len() });
    }
    Ok(())
}

fn io_error(path: &Path, source: io::Error) -> SecretFileError {
    if source.kind() == io::ErrorKind::NotFound {
        SecretFileError::Missing { path: path.to_owned() }
    } else {
        SecretFileError::Io { path: path.to_owned(), source }
    }
}

/// Checks the file at `path` against the secret-file policy without reading it; the same
/// test [`read_secret_file`] applies, for `postern check`.
pub fn check_secret_file(path: &Path) -> Result<(), SecretFileError> {
    let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
    check_metadata(path, &meta)
}

/// Reads a file holding a secret, refusing it unless it passes the secret-file policy
/// (see the module documentation). The bytes are wiped when dropped.
///
/// The path is checked before it is opened (so a FIFO is never opened), and the opened
/// file is checked again, so a file swapped in between is refused too.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    check_secret_file(path)?;
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let meta = file.metadata().map_err(|e| io_error(path, e))?;
    check_metadata(path, &meta)?;
    // Room for one byte more than allowed, so growth after the check is noticed without
    // a reallocation that would leave an unwiped copy behind.
    let capacity = usize::try_from(meta.len().saturating_add(1)).unwrap_or(usize::MAX);
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(MAX_SECRET_FILE_LEN + 1).read_to_end(&mut bytes).map_err(|e| io_error(path, e))?;
    let len = bytes.len() as u64;
    if len > MAX_SECRET_FILE_LEN {
        return Err(SecretFileError::TooLarge { path: path.to_owned(), len });
    }
    Ok(bytes)
}

/// Like [`read_secret_file`], for files holding text: the content as a [`Secret`].
pub fn read_secret_text(path: &Path) -> Result<Secret, SecretFileError> {
    let mut bytes = read_secret_file(path)?;
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Secret::new(text)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(SecretFileError::NotText { path: path.to_owned() })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn constant_time_eq_compares_whole_value() {
        let s = Secret::new("abc");
        assert!(s.constant_time_eq("abc"));
        assert!(!s.constant_time_eq("abd"));
        assert!(!s.constant_time_eq("ab"));
    }

    fn private_file(dir: &Path, mode: u32, content: &[u8]) -> PathBuf {
        let path = dir.join(format!("secret-{mode:o}"));
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn secret_files_readable_only_by_the_owner_are_read() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o600, 0o400] {
            let path = private_file(dir.path(), mode, b"s3cret\n");
            check_secret_file(&path).unwrap();
            assert_eq!(&read_secret_file(&path).unwrap()[..], b"s3cret\n");
            assert_eq!(read_secret_text(&path).unwrap().expose(), "s3cret\n");
        }
    }

    #[test]
    fn group_readable_secret_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o640, 0o620, 0o610, 0o660] {
            let path = private_file(dir.path(), mode, b"s3cret-value");
            let err = read_secret_file(&path).unwrap_err();
            assert!(matches!(err, SecretFileError::GroupAccessible { .. }), "{mode:o}: {err}");
            let message = err.to_string();
            assert!(message.contains(&format!("chmod 600 {}", path.display())), "{message}");
            assert!(!message.contains("s3cret-value"), "{message}");
            assert!(matches!(check_secret_file(&path), Err(SecretFileError::GroupAccessible { .. })));
        }
    }

    #[test]
    fn world_readable_secret_file_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o604, 0o602, 0o601] {
            let path = private_file(dir.path(), mode, b"s3cret-value");
            let err = read_secret_text(&path).unwrap_err();
            assert!(matches!(err, SecretFileError::WorldAccessible { .. }), "{mode:o}: {err}");
            assert!(err.to_string().contains(&format!("chmod 600 {}", path.display())), "{err}");
            assert!(!err.to_string().contains("s3cret-value"), "{err}");
        }
    }

    #[test]
    fn secret_file_of_another_account_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = private_file(dir.path(), 0o600, b"s3cret");
        if fs::metadata(&path).unwrap().uid() == 0 {
            // Running as root: give the file to an ordinary account to test the rule.
            std::os::unix::fs::chown(&path, Some(4242), None).unwrap();
        }
        let meta = fs::metadata(&path).unwrap();
        let owner = meta.uid();
        check_metadata_as(&path, &meta, owner).unwrap();
        check_metadata_as(&path, &meta, 0).unwrap();
        let other = owner + 1;
        let err = check_metadata_as(&path, &meta, other).unwrap_err();
        assert!(matches!(err, SecretFileError::WrongOwner { .. }), "{err}");
        assert!(err.to_string().contains(&format!("chown {other} {}", path.display())), "{err}");

        let root_owned = tempfile::NamedTempFile::new().unwrap();
        let mut meta = fs::metadata(root_owned.path()).unwrap();
        if meta.uid() == 0 {
            fs::set_permissions(root_owned.path(), fs::Permissions::from_mode(0o600)).unwrap();
            meta = fs::metadata(root_owned.path()).unwrap();
            check_metadata_as(root_owned.path(), &meta, 4242).unwrap();
        }
    }

    #[test]
    fn directory_as_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o700)).unwrap();
        let err = read_secret_file(&sub).unwrap_err();
        assert!(matches!(err, SecretFileError::NotRegular { kind: "directory", .. }), "{err}");
        assert!(matches!(check_secret_file(&sub), Err(SecretFileError::NotRegular { .. })));
    }

    #[test]
    fn too_large_secret_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = private_file(dir.path(), 0o600, b"");
        File::options().write(true).open(&path).unwrap().set_len(MAX_SECRET_FILE_LEN + 1).unwrap();
        let err = read_secret_file(&path).unwrap_err();
        assert!(matches!(err, SecretFileError::TooLarge { len, .. } if len == MAX_SECRET_FILE_LEN + 1), "{err}");
        File::options().write(true).open(&path).unwrap().set_len(MAX_SECRET_FILE_LEN).unwrap();
        assert_eq!(read_secret_file(&path).unwrap().len() as u64, MAX_SECRET_FILE_LEN);
    }

    #[test]
    fn missing_secret_file_is_reported_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent");
        let err = read_secret_file(&path).unwrap_err();
        assert!(err.is_missing(), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(check_secret_file(&path).unwrap_err().is_missing());
    }

    #[test]
    fn non_utf8_secret_text_is_refused_without_echo() {
        let dir = tempfile::tempdir().unwrap();
        let path = private_file(dir.path(), 0o600, &[0xff, 0xfe, b'x']);
        assert!(matches!(read_secret_text(&path), Err(SecretFileError::NotText { .. })));
    }
}

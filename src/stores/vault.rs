//! The vault: upstream credentials, encrypted at rest under the state directory.
//!
//! Users log in to Postern with their directory password; Postern logs in upstream with a
//! different secret kept here, which the users never see. The state directory holds:
//!
//! - `vault.key`: 32 random bytes, the AES-256-GCM key, mode 0600. Created once by
//!   `postern vault init` and never overwritten; losing it makes the vault unreadable.
//! - `vault.toml`: one table per user with the upstream login name, the kind of secret,
//!   when it was last changed, and the secret sealed with AES-256-GCM:
//!
//!   ```toml
//!   version = 1
//!
//!   [users."alice@example.com"]
//!   upstream_user = "alice@gmail.com"
//!   kind = "password"
//!   changed = 1767225600
//!   sealed = "base64 of nonce (12 bytes) followed by ciphertext and tag"
//!   ```
//!
//! - `vault.lock`: an empty file, mode 0600, that every writer holds an exclusive advisory
//!   lock on (`flock`) while it re-reads the vault file, changes it and writes it back, so
//!   the daemon (rotated refresh tokens) and admin commands never lose each other's writes.
//!   Readers take no lock: writes replace the file atomically.
//!
//! Every write seals with a fresh random nonce. The associated data binds each sealed
//! secret to its user name, kind and upstream login, so moving a ciphertext to another
//! user or editing those fields makes it fail to decrypt instead of handing one user's
//! credential to another. Both files are read with [`crate::secret::read_secret_file`], so
//! they must be regular files owned by Postern's user (or root) that neither group nor
//! others may access; Postern refuses to open them otherwise. Unix only: permissions are
//! POSIX modes.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::rngs::OsRng;
use rand::{Rng, RngCore};
use zeroize::Zeroizing;

use crate::secret::{Secret, SecretFileError, read_secret_file, read_secret_text};

/// Name of the key file inside the state directory.
pub const KEY_FILE: &str = "vault.key";
/// Name of the credentials file inside the state directory.
pub const VAULT_FILE: &str = "vault.toml";
/// Name of the lock file inside the state directory that serialises writers.
pub const LOCK_FILE: &str = "vault.lock";
/// The vault file format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Characters of generated passwords: letters and digits without look-alikes (0 O 1 l I).
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
const GENERATED_PASSWORD_LEN: usize = 24;

/// Why the vault could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// There is no key file: the vault was never initialised here.
    #[error("vault key {path} not found: run `postern vault init` to create the vault")]
    KeyMissing {
        /// The expected key file.
        path: PathBuf,
    },
    /// The key file fails the secret-file policy (see [`crate::secret`]): group or others
    /// may access it, it is not a regular file, or it belongs to another account.
    #[error("vault key {0}")]
    KeyFile(SecretFileError),
    /// The key file is not 32 bytes, so it is not a key this vault wrote.
    #[error("vault key {path} is not a {KEY_LEN}-byte key (found {len} bytes)")]
    InvalidKey {
        /// The key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The vault file fails the secret-file policy (see [`crate::secret`]).
    #[error("vault file {0}")]
    VaultFile(SecretFileError),
    /// The vault file does not parse or holds malformed entries.
    #[error("vault file {path} is corrupt: {message}")]
    Corrupt {
        /// The vault file.
        path: PathBuf,
        /// What is wrong (for TOML errors, with line and column).
        message: String,
    },
    /// The vault file was written by a newer format.
    #[error("vault file {path} has format version {version}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The vault file.
        path: PathBuf,
        /// The version it declares.
        version: u32,
    },
    /// A sealed secret did not decrypt: the key does not match or the entry was tampered with.
    #[error("cannot decrypt the upstream secret of {user}: wrong vault key or tampered entry")]
    Decrypt {
        /// The user whose entry failed.
        user: String,
    },
    /// A secret could not be sealed (AES-GCM refuses only absurdly long inputs).
    #[error("cannot encrypt the upstream secret of {user}")]
    Encrypt {
        /// The user whose entry failed.
        user: String,
    },
    /// A user name was empty or contained control characters.
    #[error("invalid user name {0:?}")]
    InvalidUser(String),
    /// Underlying file error.
    #[error("vault file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
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

impl SecretKind {
    /// The kind with its article, for messages ("a password").
    pub fn article(self) -> &'static str {
        match self {
            SecretKind::Password => "a password",
            SecretKind::RefreshToken => "an OAuth2 refresh token",
        }
    }

    /// The name used in the vault file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::Password => "password",
            SecretKind::RefreshToken => "refresh-token",
        }
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// When the secret was set, in seconds since the Unix epoch.
    pub changed: u64,
}

impl UpstreamSecret {
    /// A password (or app password) set now, for the user's own mail address upstream.
    pub fn password(secret: Secret) -> Self {
        Self::new(SecretKind::Password, secret)
    }

    /// An OAuth2 refresh token set now, for the user's own mail address upstream.
    pub fn refresh_token(secret: Secret) -> Self {
        Self::new(SecretKind::RefreshToken, secret)
    }

    /// A secret of `kind` set now.
    pub fn new(kind: SecretKind, secret: Secret) -> Self {
        Self { upstream_user: None, kind, secret, changed: unix_now() }
    }

    /// The same secret, used with the upstream login name `user`.
    pub fn with_upstream_user(mut self, user: impl Into<String>) -> Self {
        self.upstream_user = Some(user.into());
        self
    }
}

/// What the vault holds for one user, without the secret: for `postern vault list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultListing {
    /// The user's mail address (lower case).
    pub user: String,
    /// The upstream login name when it differs from `user`.
    pub upstream_user: Option<String>,
    /// What kind of secret is stored.
    pub kind: SecretKind,
    /// When it was set, in seconds since the Unix epoch.
    pub changed: u64,
    /// Whether a rotation left the previous secret waiting for confirmation.
    pub has_previous: bool,
}

/// The vault file as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct VaultFile {
    version: u32,
    #[serde(default)]
    users: BTreeMap<String, StoredEntry>,
}

/// One user's entry as stored; `sealed` is base64 of nonce ‖ ciphertext ‖ tag.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    upstream_user: Option<String>,
    kind: SecretKind,
    changed: u64,
    sealed: String,
    /// The secret a rotation replaced, kept until the new one is confirmed upstream;
    /// sealed with its own associated data so it cannot pass for the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Box<StoredEntry>>,
}

/// The name under which a user's previous secret is sealed; user names hold no control
/// characters, so it never equals a real user's.
fn previous_slot(user: &str) -> String {
    format!("{user}\u{0}previous")
}

/// The encrypted store of upstream credentials under the state directory.
///
/// Holds the key (wiped on drop) and the sealed entries; secrets are decrypted only in
/// [`Vault::get`]. Changes are written to disk before they show in memory, by one writer
/// at a time across processes ([`Vault::update`]).
pub struct Vault {
    key_path: PathBuf,
    vault_path: PathBuf,
    key: Zeroizing<[u8; KEY_LEN]>,
    users: BTreeMap<String, StoredEntry>,
    /// Held while this vault is the one writer (inside [`Vault::update`]).
    lock: Option<WriteLock>,
}

/// The exclusive lock on the state directory's [`LOCK_FILE`] ([`crate::fsutil::WriteLock`]).
#[derive(Debug)]
struct WriteLock {
    _lock: crate::fsutil::WriteLock,
}

impl WriteLock {
    /// Waits until this process holds the lock on `state_dir`'s lock file, creating the
    /// file (mode 0600) if needed. Blocks: call it off the async workers.
    fn acquire(state_dir: &Path) -> Result<Self, VaultError> {
        let path = state_dir.join(LOCK_FILE);
        let lock = crate::fsutil::WriteLock::acquire(&path).map_err(io_at(&path))?;
        Ok(Self { _lock: lock })
    }
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("vault_path", &self.vault_path)
            .field("entries", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Creates the state directory (mode 0700), a new key and an empty vault file, leaving
    /// whatever already exists untouched. Returns whether a new key was created.
    pub fn init(state_dir: &Path) -> Result<bool, VaultError> {
        DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(io_at(state_dir))?;

        let key_path = state_dir.join(KEY_FILE);
        let created = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key_path) {
            Ok(mut file) => {
                let mut key = Zeroizing::new([0u8; KEY_LEN]);
                OsRng.fill_bytes(&mut key[..]);
                file.write_all(&key[..]).and_then(|()| file.sync_all()).map_err(io_at(&key_path))?;
                sync_dir(state_dir)?;
                true
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_at(&key_path)(e)),
        };

        let vault_path = state_dir.join(VAULT_FILE);
        if !vault_path.exists() {
            let _lock = WriteLock::acquire(state_dir)?;
            if !vault_path.exists() {
                let empty = VaultFile { version: FORMAT_VERSION, users: BTreeMap::new() };
                write_vault_file(&vault_path, &empty)?;
            }
        }
        Ok(created)
    }

    /// Opens the vault under `state_dir`, refusing key or vault files that group or
    /// others can access. A missing vault file next to an existing key is an empty vault.
    pub fn open(state_dir: &Path) -> Result<Self, VaultError> {
        let key_path = state_dir.join(KEY_FILE);
        let key = read_key(&key_path)?;

        let vault_path = state_dir.join(VAULT_FILE);
        let users = read_vault_file(&vault_path)?;

        Ok(Self { key_path, vault_path, key, users, lock: None })
    }

    /// The one way to change the vault: waits for the exclusive lock on the state
    /// directory's [`LOCK_FILE`], reads the vault as it is on disk now, runs `change` on it
    /// (each [`Vault::set`], [`Vault::rotate`], [`Vault::confirm`] or [`Vault::remove`]
    /// inside writes the file atomically), and releases the lock. Another process or thread
    /// doing the same waits, then sees these changes, so no write is lost.
    ///
    /// Blocks while another writer holds the lock: from async code, call it inside
    /// `tokio::task::spawn_blocking`. `change` must not call [`Vault::init`] or
    /// [`Vault::update`] for the same directory: it would wait for its own lock.
    pub fn update<T, E>(state_dir: &Path, change: impl FnOnce(&mut Vault) -> Result<T, E>) -> Result<T, E>
    where
        E: From<VaultError>,
    {
        let lock = match WriteLock::acquire(state_dir) {
            // No state directory: say how to create the vault rather than name the lock file.
            Err(VaultError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(VaultError::KeyMissing { path: state_dir.join(KEY_FILE) }.into());
            }
            result => result?,
        };
        let mut vault = Self::open(state_dir)?;
        vault.lock = Some(lock);
        change(&mut vault)
    }

    /// Runs `change` as the one writer: directly inside [`Vault::update`], else under the
    /// lock after re-reading the vault file, so a vault opened with [`Vault::open`] cannot
    /// overwrite what other writers stored since.
    fn write_locked<T>(&mut self, change: impl FnOnce(&mut Self) -> Result<T, VaultError>) -> Result<T, VaultError> {
        if self.lock.is_some() {
            return change(self);
        }
        let state_dir = match self.vault_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
            _ => PathBuf::from("."),
        };
        let lock = WriteLock::acquire(&state_dir)?;
        self.users = read_vault_file(&self.vault_path)?;
        self.lock = Some(lock);
        let result = change(self);
        self.lock = None;
        result
    }

    /// The key file this vault was opened with.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// The vault file this vault reads and writes.
    pub fn path(&self) -> &Path {
        &self.vault_path
    }

    /// The decrypted credential of `user`, if one is stored.
    pub fn get(&self, user: &str) -> Result<Option<UpstreamSecret>, VaultError> {
        let user = normalize_user(user)?;
        let Some(entry) = self.users.get(&user) else {
            return Ok(None);
        };
        let secret = self.open_sealed(&user, entry)?;
        Ok(Some(UpstreamSecret {
            upstream_user: entry.upstream_user.clone(),
            kind: entry.kind,
            secret,
            changed: entry.changed,
        }))
    }

    /// Stores `secret` for `user`, replacing any previous one, and writes the vault file
    /// (under the write lock; see [`Vault::update`]).
    pub fn set(&mut self, user: &str, secret: UpstreamSecret) -> Result<(), VaultError> {
        self.write_locked(|vault| vault.set_locked(user, secret))
    }

    fn set_locked(&mut self, user: &str, secret: UpstreamSecret) -> Result<(), VaultError> {
        let user = normalize_user(user)?;
        let entry = StoredEntry {
            sealed: self.seal(&user, secret.kind, secret.upstream_user.as_deref(), &secret.secret)?,
            upstream_user: secret.upstream_user,
            kind: secret.kind,
            changed: secret.changed,
            previous: None,
        };
        let mut users = self.users.clone();
        users.insert(user, entry);
        self.commit(users)
    }

    /// Replaces `user`'s secret with `secret`, keeping the replaced one as "previous" until
    /// [`Vault::confirm`]. Returns `false` (and changes nothing) when `user` has no secret.
    /// Writes under the write lock; see [`Vault::update`].
    pub fn rotate(&mut self, user: &str, secret: UpstreamSecret) -> Result<bool, VaultError> {
        self.write_locked(|vault| vault.rotate_locked(user, secret))
    }

    /// Stores `token` as `user`'s OAuth2 refresh token, keeping the upstream login name stored
    /// for the user, if any (what a device enrolment does).
    pub fn set_refresh_token(&mut self, user: &str, token: Secret) -> Result<(), VaultError> {
        let upstream_user = self.get(user)?.and_then(|current| current.upstream_user);
        let mut entry = UpstreamSecret::refresh_token(token);
        if let Some(name) = upstream_user {
            entry = entry.with_upstream_user(name);
        }
        self.set(user, entry)
    }

    /// Replaces `user`'s secret with `secret`, keeping its kind and upstream login name and
    /// the replaced secret as "previous" (see [`Vault::rotate`]); `false` when `user` has none.
    pub fn rotate_secret(&mut self, user: &str, secret: Secret) -> Result<bool, VaultError> {
        let Some(current) = self.get(user)? else {
            return Ok(false);
        };
        let mut entry = UpstreamSecret::new(current.kind, secret);
        entry.upstream_user = current.upstream_user;
        self.rotate(user, entry)
    }

    fn rotate_locked(&mut self, user: &str, secret: UpstreamSecret) -> Result<bool, VaultError> {
        let user = normalize_user(user)?;
        let Some(old) = self.get(&user)? else {
            return Ok(false);
        };
        let slot = previous_slot(&user);
        let previous = StoredEntry {
            sealed: self.seal(&slot, old.kind, old.upstream_user.as_deref(), &old.secret)?,
            upstream_user: old.upstream_user,
            kind: old.kind,
            changed: old.changed,
            previous: None,
        };
        let entry = StoredEntry {
            sealed: self.seal(&user, secret.kind, secret.upstream_user.as_deref(), &secret.secret)?,
            upstream_user: secret.upstream_user,
            kind: secret.kind,
            changed: secret.changed,
            previous: Some(Box::new(previous)),
        };
        let mut users = self.users.clone();
        users.insert(user, entry);
        self.commit(users)?;
        Ok(true)
    }

    /// The secret the last rotation replaced, while it waits for confirmation.
    pub fn previous(&self, user: &str) -> Result<Option<UpstreamSecret>, VaultError> {
        let user = normalize_user(user)?;
        let Some(previous) = self.users.get(&user).and_then(|e| e.previous.as_deref()) else {
            return Ok(None);
        };
        let secret = self
            .open_sealed(&previous_slot(&user), previous)
            .map_err(|_| VaultError::Decrypt { user: format!("{user} (previous secret)") })?;
        Ok(Some(UpstreamSecret {
            upstream_user: previous.upstream_user.clone(),
            kind: previous.kind,
            secret,
            changed: previous.changed,
        }))
    }

    /// Forgets the previous secret of `user` (the new one works upstream); `false` if
    /// there was none. Writes under the write lock; see [`Vault::update`].
    pub fn confirm(&mut self, user: &str) -> Result<bool, VaultError> {
        self.write_locked(|vault| vault.confirm_locked(user))
    }

    fn confirm_locked(&mut self, user: &str) -> Result<bool, VaultError> {
        let user = normalize_user(user)?;
        let mut users = self.users.clone();
        match users.get_mut(&user) {
            Some(entry) if entry.previous.is_some() => entry.previous = None,
            _ => return Ok(false),
        }
        self.commit(users)?;
        Ok(true)
    }

    /// Removes `user`'s credential and writes the vault file (under the write lock; see
    /// [`Vault::update`]); `false` if there was none.
    pub fn remove(&mut self, user: &str) -> Result<bool, VaultError> {
        self.write_locked(|vault| vault.remove_locked(user))
    }

    fn remove_locked(&mut self, user: &str) -> Result<bool, VaultError> {
        let user = normalize_user(user)?;
        if !self.users.contains_key(&user) {
            return Ok(false);
        }
        let mut users = self.users.clone();
        users.remove(&user);
        self.commit(users)?;
        Ok(true)
    }

    /// Every stored entry, by user, without secrets.
    pub fn list(&self) -> Vec<VaultListing> {
        self.users
            .iter()
            .map(|(user, e)| VaultListing {
                user: user.clone(),
                upstream_user: e.upstream_user.clone(),
                kind: e.kind,
                changed: e.changed,
                has_previous: e.previous.is_some(),
            })
            .collect()
    }

    /// Whether a credential is stored for `user`.
    pub fn contains(&self, user: &str) -> bool {
        normalize_user(user).is_ok_and(|user| self.users.contains_key(&user))
    }

    /// Writes `users` to disk, then adopts them. Only called with the write lock held.
    fn commit(&mut self, users: BTreeMap<String, StoredEntry>) -> Result<(), VaultError> {
        debug_assert!(self.lock.is_some(), "vault written without the write lock");
        let file = VaultFile { version: FORMAT_VERSION, users };
        write_vault_file(&self.vault_path, &file)?;
        self.users = file.users;
        Ok(())
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&self.key[..]))
    }

    fn seal(
        &self,
        user: &str,
        kind: SecretKind,
        upstream_user: Option<&str>,
        secret: &Secret,
    ) -> Result<String, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        let aad = associated_data(user, kind, upstream_user);
        let payload = Payload { msg: secret.expose().as_bytes(), aad: &aad };
        let ciphertext = self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), payload)
            .map_err(|_| VaultError::Encrypt { user: user.to_owned() })?;
        let mut blob = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ciphertext);
        Ok(BASE64.encode(blob))
    }

    fn open_sealed(&self, user: &str, entry: &StoredEntry) -> Result<Secret, VaultError> {
        let fail = || VaultError::Decrypt { user: user.to_owned() };
        let blob = BASE64.decode(&entry.sealed).map_err(|_| fail())?;
        if blob.len() < NONCE_LEN + TAG_LEN {
            return Err(fail());
        }
        let (nonce, ciphertext) = blob.split_at(NONCE_LEN);
        let aad = associated_data(user, entry.kind, entry.upstream_user.as_deref());
        let mut plain = Zeroizing::new(
            self.cipher()
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad: &aad })
                .map_err(|_| fail())?,
        );
        match String::from_utf8(std::mem::take(&mut *plain)) {
            Ok(text) => Ok(Secret::new(text)),
            Err(e) => {
                drop(Zeroizing::new(e.into_bytes()));
                Err(fail())
            }
        }
    }
}

/// Makes a random password for an upstream account: 24 characters from letters and
/// digits without look-alikes, about 140 bits.
pub fn generate_password() -> Secret {
    let mut rng = OsRng;
    let text: String = (0..GENERATED_PASSWORD_LEN)
        .map(|_| char::from(PASSWORD_ALPHABET[rng.gen_range(0..PASSWORD_ALPHABET.len())]))
        .collect();
    Secret::new(text)
}

fn write_vault_file(path: &Path, file: &VaultFile) -> Result<(), VaultError> {
    let text = toml::to_string(file)
        .map_err(|e| VaultError::Corrupt { path: path.to_owned(), message: format!("cannot serialise: {e}") })?;
    crate::fsutil::write_private_atomic(path, text.as_bytes()).map_err(io_at(path))
}

fn parse_vault_file(path: &Path, text: &str) -> Result<BTreeMap<String, StoredEntry>, VaultError> {
    let corrupt = |message: String| VaultError::Corrupt { path: path.to_owned(), message };
    let file: VaultFile = toml::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(VaultError::UnsupportedVersion { path: path.to_owned(), version: file.version });
    }
    let mut users = BTreeMap::new();
    for (user, entry) in file.users {
        let lower = user.to_lowercase();
        if lower != user {
            return Err(corrupt(format!("user {user:?} is not lower case")));
        }
        match BASE64.decode(&entry.sealed) {
            Ok(blob) if blob.len() >= NONCE_LEN + TAG_LEN => {}
            _ => {
                return Err(corrupt(format!("entry for {user} has a malformed sealed value")));
            }
        }
        users.insert(user, entry);
    }
    Ok(users)
}

/// Reads the vault file through the secret-file reader; a missing file is an empty vault.
fn read_vault_file(path: &Path) -> Result<BTreeMap<String, StoredEntry>, VaultError> {
    match read_secret_text(path) {
        Ok(text) => parse_vault_file(path, text.expose()),
        Err(e) if e.is_missing() => Ok(BTreeMap::new()),
        Err(e) => Err(VaultError::VaultFile(e)),
    }
}

fn read_key(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
    let bytes = read_secret_file(path).map_err(|e| match e {
        e if e.is_missing() => VaultError::KeyMissing { path: path.to_owned() },
        e => VaultError::KeyFile(e),
    })?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return Err(VaultError::InvalidKey { path: path.to_owned(), len: bytes.len() as u64 });
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Binds a sealed secret to its place: format version, user, kind and upstream login,
/// each length-prefixed so no two distinct tuples encode alike.
fn associated_data(user: &str, kind: SecretKind, upstream_user: Option<&str>) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.extend_from_slice(b"postern-vault");
    aad.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    for field in [user, kind.as_str()] {
        push_field(&mut aad, field.as_bytes());
    }
    match upstream_user {
        Some(u) => {
            aad.push(1);
            push_field(&mut aad, u.as_bytes());
        }
        None => aad.push(0),
    }
    aad
}

fn push_field(buf: &mut Vec<u8>, field: &[u8]) {
    buf.extend_from_slice(&(field.len() as u64).to_be_bytes());
    buf.extend_from_slice(field);
}

fn normalize_user(user: &str) -> Result<String, VaultError> {
    crate::user::normalize(user).map_err(|e| VaultError::InvalidUser(e.0))
}

fn sync_dir(dir: &Path) -> Result<(), VaultError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> VaultError + '_ {
    move |source| VaultError::Io { path: path.to_owned(), source }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn init_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        assert!(Vault::init(&dir).unwrap());
        (tmp, dir)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn sealed_of(dir: &Path, user: &str) -> String {
        let text = fs::read_to_string(dir.join(VAULT_FILE)).unwrap();
        let file: VaultFile = toml::from_str(&text).unwrap();
        file.users[user].sealed.clone()
    }

    #[test]
    fn init_creates_private_key_and_is_idempotent() {
        let (_tmp, dir) = init_dir();
        let key_path = dir.join(KEY_FILE);
        assert_eq!(mode(&key_path), 0o600);
        assert_eq!(mode(&dir.join(VAULT_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(fs::metadata(&key_path).unwrap().len(), KEY_LEN as u64);

        let key = fs::read(&key_path).unwrap();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("a@example.com", UpstreamSecret::password(Secret::new("pw"))).unwrap();

        assert!(!Vault::init(&dir).unwrap());
        assert_eq!(fs::read(&key_path).unwrap(), key);
        assert!(Vault::open(&dir).unwrap().contains("a@example.com"), "init must not reset the vault");
    }

    #[test]
    fn rotation_keeps_the_previous_secret_until_confirmed() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        assert!(!vault.rotate("r@example.com", UpstreamSecret::password(Secret::new("new"))).unwrap());
        vault.set("r@example.com", UpstreamSecret::password(Secret::new("old"))).unwrap();
        assert!(vault.rotate("R@example.com", UpstreamSecret::password(Secret::new("new"))).unwrap());
        let vault = Vault::open(&dir).unwrap();
        assert_eq!(vault.get("r@example.com").unwrap().unwrap().secret.expose(), "new");
        assert_eq!(vault.previous("r@example.com").unwrap().unwrap().secret.expose(), "old");
        assert!(vault.list()[0].has_previous);
        let text = fs::read_to_string(dir.join(VAULT_FILE)).unwrap();
        assert!(!text.contains("old") && !text.contains("new\""), "{text}");

        let mut swapped: VaultFile = toml::from_str(&text).unwrap();
        let entry = swapped.users.get_mut("r@example.com").unwrap();
        let previous = entry.previous.as_mut().unwrap();
        std::mem::swap(&mut entry.sealed, &mut previous.sealed);
        write_vault_file(&dir.join(VAULT_FILE), &swapped).unwrap();
        let vault = Vault::open(&dir).unwrap();
        assert!(vault.get("r@example.com").is_err() && vault.previous("r@example.com").is_err());

        let mut vault = Vault::open(&dir).unwrap();
        vault.set("r@example.com", UpstreamSecret::password(Secret::new("old"))).unwrap();
        vault.rotate("r@example.com", UpstreamSecret::password(Secret::new("new"))).unwrap();
        assert!(vault.confirm("r@example.com").unwrap());
        assert!(!vault.confirm("r@example.com").unwrap());
        assert!(Vault::open(&dir).unwrap().previous("r@example.com").unwrap().is_none());
    }

    #[test]
    fn round_trip() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        let secret = UpstreamSecret::refresh_token(Secret::new("1//tok\"en\\ü")).with_upstream_user("Alice@Gmail.com");
        let changed = secret.changed;
        vault.set("Alice@Example.com", secret).unwrap();
        assert!(vault.contains("alice@example.com"));

        let reopened = Vault::open(&dir).unwrap();
        let got = reopened.get("ALICE@example.com").unwrap().unwrap();
        assert_eq!(got.secret.expose(), "1//tok\"en\\ü");
        assert_eq!(got.kind, SecretKind::RefreshToken);
        assert_eq!(got.upstream_user.as_deref(), Some("Alice@Gmail.com"));
        assert_eq!(got.changed, changed);
        assert!(reopened.get("bob@example.com").unwrap().is_none());
    }

    #[test]
    fn remove_deletes_and_persists() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("a@example.com", UpstreamSecret::password(Secret::new("pw"))).unwrap();
        assert!(vault.remove("A@example.com").unwrap());
        assert!(!vault.remove("a@example.com").unwrap());
        assert!(!Vault::open(&dir).unwrap().contains("a@example.com"));
    }

    #[test]
    fn wrong_key_fails_naming_the_user() {
        let (tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("alice@example.com", UpstreamSecret::password(Secret::new("pw"))).unwrap();

        let other = tmp.path().join("other");
        Vault::init(&other).unwrap();
        fs::copy(dir.join(VAULT_FILE), other.join(VAULT_FILE)).unwrap();
        let err = Vault::open(&other).unwrap().get("alice@example.com").unwrap_err();
        assert!(matches!(&err, VaultError::Decrypt { user } if user == "alice@example.com"));
        assert!(err.to_string().contains("alice@example.com"));
    }

    #[test]
    fn swapped_ciphertexts_fail() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("alice@example.com", UpstreamSecret::password(Secret::new("alice-pw"))).unwrap();
        vault.set("bob@example.com", UpstreamSecret::password(Secret::new("bob-pw"))).unwrap();

        let path = dir.join(VAULT_FILE);
        let mut file: VaultFile = toml::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let alice = file.users["alice@example.com"].sealed.clone();
        let bob = std::mem::replace(&mut file.users.get_mut("bob@example.com").unwrap().sealed, alice);
        file.users.get_mut("alice@example.com").unwrap().sealed = bob;
        fs::write(&path, toml::to_string(&file).unwrap()).unwrap();

        let vault = Vault::open(&dir).unwrap();
        assert!(matches!(vault.get("alice@example.com"), Err(VaultError::Decrypt { .. })));
        assert!(matches!(vault.get("bob@example.com"), Err(VaultError::Decrypt { .. })));
    }

    #[test]
    fn changing_kind_or_upstream_user_fails() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("a@example.com", UpstreamSecret::password(Secret::new("pw")).with_upstream_user("x@up")).unwrap();
        let path = dir.join(VAULT_FILE);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("x@up", "y@up")).unwrap();
        assert!(matches!(Vault::open(&dir).unwrap().get("a@example.com"), Err(VaultError::Decrypt { .. })));
        fs::write(&path, text.replace("\"password\"", "\"refresh-token\"")).unwrap();
        assert!(matches!(Vault::open(&dir).unwrap().get("a@example.com"), Err(VaultError::Decrypt { .. })));
    }

    #[test]
    fn nonce_differs_between_writes() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        vault.set("a@example.com", UpstreamSecret::password(Secret::new("same"))).unwrap();
        let first = sealed_of(&dir, "a@example.com");
        vault.set("a@example.com", UpstreamSecret::password(Secret::new("same"))).unwrap();
        let second = sealed_of(&dir, "a@example.com");
        assert_ne!(first, second);
        assert_ne!(BASE64.decode(&first).unwrap()[..NONCE_LEN], BASE64.decode(&second).unwrap()[..NONCE_LEN]);
    }

    #[test]
    fn readable_key_is_refused() {
        let (_tmp, dir) = init_dir();
        let key_path = dir.join(KEY_FILE);
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(mode)).unwrap();
            let err = Vault::open(&dir).unwrap_err();
            assert!(matches!(&err, VaultError::KeyFile(e) if e.is_exposed()), "{mode:o}: {err}");
            assert!(err.to_string().contains(&format!("chmod 600 {}", key_path.display())));
        }
    }

    #[test]
    fn readable_vault_file_is_refused() {
        let (_tmp, dir) = init_dir();
        fs::set_permissions(dir.join(VAULT_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = Vault::open(&dir).unwrap_err();
        assert!(matches!(&err, VaultError::VaultFile(e) if e.is_exposed()), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn missing_key_says_how_to_create_it() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Vault::open(tmp.path()).unwrap_err();
        assert!(matches!(err, VaultError::KeyMissing { .. }));
        assert!(err.to_string().contains("postern vault init"));
    }

    #[test]
    fn short_key_and_corrupt_file_are_reported() {
        let (_tmp, dir) = init_dir();
        let vault_path = dir.join(VAULT_FILE);
        fs::write(&vault_path, "version = 1\n[users.\"a@b\"]\nkind = \"password\"\nbogus = 1\n").unwrap();
        let err = Vault::open(&dir).unwrap_err();
        assert!(matches!(err, VaultError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("line"), "{err}");

        fs::write(&vault_path, "version = 2\n").unwrap();
        assert!(matches!(Vault::open(&dir), Err(VaultError::UnsupportedVersion { version: 2, .. })));

        fs::write(dir.join(KEY_FILE), [0u8; 5]).unwrap();
        assert!(matches!(Vault::open(&dir), Err(VaultError::InvalidKey { len: 5, .. })));
    }

    #[test]
    fn writes_leave_no_temporary_files() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        for i in 0..3 {
            vault.set(&format!("u{i}@example.com"), UpstreamSecret::password(generate_password())).unwrap();
        }
        vault.remove("u0@example.com").unwrap();
        let mut names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [KEY_FILE, LOCK_FILE, VAULT_FILE]);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        assert_eq!(mode(&dir.join(VAULT_FILE)), 0o600);
    }

    #[test]
    fn secrets_stay_out_of_list_debug_and_file() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        let secret = "correct-horse-battery-staple";
        vault.set("a@example.com", UpstreamSecret::password(Secret::new(secret))).unwrap();

        let listing = vault.list();
        assert_eq!(listing.len(), 1);
        assert_eq!(listing[0].user, "a@example.com");
        assert_eq!(listing[0].kind, SecretKind::Password);
        assert!(!format!("{listing:?}").contains(secret));
        assert!(!format!("{vault:?}").contains(secret));
        assert!(!format!("{:?}", vault.get("a@example.com").unwrap()).contains(secret));

        let text = fs::read_to_string(dir.join(VAULT_FILE)).unwrap();
        assert!(!text.contains(secret));
        assert!(!text.contains(&BASE64.encode(secret)));
    }

    #[test]
    fn generated_passwords_are_long_unambiguous_and_distinct() {
        let a = generate_password();
        let b = generate_password();
        assert_eq!(a.expose().len(), GENERATED_PASSWORD_LEN);
        assert!(a.expose().bytes().all(|c| PASSWORD_ALPHABET.contains(&c)));
        assert!(!a.expose().contains(['0', 'O', '1', 'l', 'I']));
        assert_ne!(a, b);
    }

    #[test]
    fn empty_user_is_refused() {
        let (_tmp, dir) = init_dir();
        let mut vault = Vault::open(&dir).unwrap();
        let err = vault.set("", UpstreamSecret::password(Secret::new("pw"))).unwrap_err();
        assert!(matches!(err, VaultError::InvalidUser(_)));
    }

    #[test]
    fn racing_writer_threads_keep_every_write() {
        let (_tmp, dir) = init_dir();
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    for round in 0..4 {
                        let user = format!("t{i}-{round}@example.com");
                        Vault::update(&dir, |vault| {
                            vault.set(&user, UpstreamSecret::password(Secret::new(format!("pw-{user}"))))
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let vault = Vault::open(&dir).unwrap();
        assert_eq!(vault.list().len(), 32);
        assert_eq!(vault.get("t7-3@example.com").unwrap().unwrap().secret.expose(), "pw-t7-3@example.com");
    }

    #[test]
    fn a_stale_vault_rereads_before_it_writes() {
        let (_tmp, dir) = init_dir();
        let mut stale = Vault::open(&dir).unwrap();
        Vault::update(&dir, |vault| vault.set("first@example.com", UpstreamSecret::password(Secret::new("1"))))
            .unwrap();
        stale.set("second@example.com", UpstreamSecret::password(Secret::new("2"))).unwrap();
        assert!(stale.contains("first@example.com"), "the write re-read the file");
        let vault = Vault::open(&dir).unwrap();
        assert!(vault.contains("first@example.com") && vault.contains("second@example.com"));
    }

    #[test]
    fn update_waits_for_the_writer_holding_the_lock() {
        let (_tmp, dir) = init_dir();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let holder = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                Vault::update(&dir, |vault| {
                    locked_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    vault.set("holder@example.com", UpstreamSecret::password(Secret::new("h")))
                })
                .unwrap();
            })
        };
        locked_rx.recv().unwrap();
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                Vault::update(&dir, |vault| {
                    let saw_holder = vault.contains("holder@example.com");
                    vault.set("waiter@example.com", UpstreamSecret::password(Secret::new("w")))?;
                    Ok::<_, VaultError>(saw_holder)
                })
                .unwrap()
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!waiter.is_finished(), "a second writer ran while the first held the lock");
        release_tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(waiter.join().unwrap(), "the second writer did not see the first one's write");
    }
}

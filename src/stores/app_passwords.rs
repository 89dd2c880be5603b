//! Per-device app passwords: generated passwords a user types into one device (a phone, a
//! laptop's mail client) instead of the directory password, each revocable on its own.
//!
//! The state directory holds `app-passwords.toml` (mode 0600, read with the one secret-file
//! reader, [`crate::secret::read_secret_text`]): per user, per label, the argon2id hash of
//! the password (the parameters and hashing workers of the file directory,
//! [`crate::stores::directory::file`]), when it was created and when it was last used.
//! The password itself is printed once by `postern user app-password add` and never stored.
//!
//! ```toml
//! version = 1
//!
//! [users."alice@example.com".phone]
//! hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//! created = 1767225600
//! last_used = 1767229200
//! ```
//!
//! Writers (admin commands and the daemon's last-use flush) hold an exclusive lock on
//! `app-passwords.lock` while they re-read, change and atomically rewrite the file
//! ([`AppPasswords::update`]), so none loses another's write. Readers take no lock.
//!
//! Generated passwords are four groups of four characters from lower-case letters and
//! digits without look-alikes (80 bits), easy to type on a phone. A presented password is
//! compared in its canonical form: separators (`-`, spaces) dropped, lower case.
//!
//! A login's check runs every hash of the user side by side on the hashing workers, or one
//! dummy hash when the user has none ([`crate::stores::directory::file::check_any`]): a
//! user without app passwords costs the same time as a wrong app password.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::password_hash::PasswordHash;
use rand::Rng;
use rand::rngs::OsRng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::fsutil::WriteLock;
use crate::secret::{Secret, SecretFileError, read_secret_text};
use crate::stores::directory::DirectoryError;
use crate::stores::directory::file::{check_any, hash_password};

/// Name of the app password file inside the state directory.
pub const FILE: &str = "app-passwords.toml";
/// Name of the lock file inside the state directory that serialises writers.
pub const LOCK_FILE: &str = "app-passwords.lock";
/// The file format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Longest label, in characters.
pub const MAX_LABEL_CHARS: usize = 64;
/// Most app passwords one user may hold (each login checks them all).
pub const MAX_PER_USER: usize = 16;

/// Characters of generated passwords: lower-case letters and digits without look-alikes
/// (no `l`, `o`, `0`, `1`), 32 of them, so each is 5 bits.
const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyz23456789";
const GROUPS: usize = 4;
const GROUP_LEN: usize = 4;

/// Shortest time between two writes of last-use times by the daemon: a burst of logins
/// costs one write.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// Why the app passwords could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum AppPasswordError {
    /// The file fails the secret-file policy (see [`crate::secret`]).
    #[error("app password file {0}")]
    File(SecretFileError),
    /// The file does not parse or holds malformed entries.
    #[error("app password file {path} is corrupt: {message}; fix it, or remove it (every app password stops working)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong (for TOML errors, with line and column).
        message: String,
    },
    /// The file was written by a newer format.
    #[error("app password file {path} has format version {version}; this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it declares.
        version: u32,
    },
    /// A label is empty, too long, or holds control or invisible characters.
    #[error("invalid label {0:?}: use 1 to {MAX_LABEL_CHARS} visible characters, e.g. \"phone\" or \"work laptop\"")]
    InvalidLabel(String),
    /// A user name is not a usable mail address.
    #[error("invalid user name: {0}")]
    InvalidUser(String),
    /// The user already has an app password with this label.
    #[error("{user} already has an app password labelled {label:?}; revoke it first or choose another label")]
    DuplicateLabel {
        /// The user.
        user: String,
        /// The label.
        label: String,
    },
    /// The user holds the most app passwords allowed.
    #[error("{user} already has {MAX_PER_USER} app passwords, the most allowed; revoke one first")]
    TooMany {
        /// The user.
        user: String,
    },
    /// The password could not be hashed.
    #[error("cannot hash the app password: {0}")]
    Hash(DirectoryError),
    /// Underlying file error.
    #[error("app password file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// One app password as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    hash: String,
    created: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used: Option<u64>,
}

/// The file as stored.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredFile {
    version: u32,
    #[serde(default)]
    users: BTreeMap<String, BTreeMap<String, Stored>>,
}

/// What `postern user app-password list` shows of one app password: never its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The label.
    pub label: String,
    /// When it was created, in seconds since the Unix epoch.
    pub created: u64,
    /// When it last let a login in, if it has (as of the last write of last-use times).
    pub last_used: Option<u64>,
}

/// The app password a login's password matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matched {
    /// Its label.
    pub label: String,
    /// Its stored hash, which identifies this password (a new one with the same label has
    /// another salt) when its use is recorded.
    pub hash: String,
}

/// Every user's app passwords, as loaded from the state directory.
pub struct AppPasswords {
    path: PathBuf,
    users: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Held while this is the one writer (inside [`AppPasswords::update`]).
    lock: Option<WriteLock>,
}

impl fmt::Debug for AppPasswords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppPasswords").field("path", &self.path).field("users", &self.users.len()).finish()
    }
}

impl AppPasswords {
    /// Loads the app passwords under `state_dir`; a missing file holds none.
    pub fn load(state_dir: &Path) -> Result<Self, AppPasswordError> {
        let path = state_dir.join(FILE);
        let users = read_file(&path)?;
        Ok(Self { path, users, lock: None })
    }

    /// The one way to change the file: waits for the exclusive lock on the state
    /// directory's [`LOCK_FILE`] (creating the directory, mode 0700, if needed), reads the
    /// file as it is now, runs `change` on it (each [`AppPasswords::add`],
    /// [`AppPasswords::revoke`] or [`AppPasswords::record_use`] inside writes it
    /// atomically), and releases the lock. Blocks: from async code, call it inside
    /// `tokio::task::spawn_blocking`.
    pub fn update<T, E>(state_dir: &Path, change: impl FnOnce(&mut AppPasswords) -> Result<T, E>) -> Result<T, E>
    where
        E: From<AppPasswordError>,
    {
        let io = |source| AppPasswordError::Io { path: state_dir.to_owned(), source };
        DirBuilder::new().recursive(true).mode(0o700).create(state_dir).map_err(io)?;
        let lock_path = state_dir.join(LOCK_FILE);
        let lock = WriteLock::acquire(&lock_path)
            .map_err(|source| AppPasswordError::Io { path: lock_path.clone(), source })?;
        let mut passwords = Self::load(state_dir)?;
        passwords.lock = Some(lock);
        change(&mut passwords)
    }

    /// The file these were loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether no user has an app password.
    pub fn is_empty(&self) -> bool {
        self.users.values().all(BTreeMap::is_empty)
    }

    /// `user`'s app passwords in label order, without hashes.
    pub fn list(&self, user: &str) -> Vec<Listing> {
        let Some(labels) = self.users.get(user) else { return Vec::new() };
        labels
            .iter()
            .map(|(label, s)| Listing { label: label.clone(), created: s.created, last_used: s.last_used })
            .collect()
    }

    /// Whether `user` (normalized) holds an app password labelled `label` (ignoring case).
    pub fn contains(&self, user: &str, label: &str) -> bool {
        self.users.get(user).is_some_and(|labels| find_label(labels, label).is_some())
    }

    /// Checks `password` against every app password of `user` (normalized) on the hashing
    /// workers, side by side; one dummy check when the user has none.
    pub async fn check(&self, user: &str, password: &Secret) -> Result<Option<Matched>, DirectoryError> {
        let entries: Vec<(&String, &Stored)> = self.users.get(user).map(|l| l.iter().collect()).unwrap_or_default();
        let hashes: Vec<String> = entries.iter().map(|(_, s)| s.hash.clone()).collect();
        let canonical = canonical(password);
        let found = check_any(&hashes, &canonical).await?;
        Ok(found.map(|index| Matched { label: entries[index].0.clone(), hash: entries[index].1.hash.clone() }))
    }

    /// Spends what a check of a user without app passwords costs (one dummy hash), so a
    /// refusal before the check takes as long as one after it.
    pub async fn equalize(password: &Secret) {
        let _ = check_any(&[], password).await;
    }

    /// Adds an app password `password` labelled `label` for `user` and writes the file.
    /// Only inside [`AppPasswords::update`].
    pub fn add(&mut self, user: &str, label: &str, password: &Secret) -> Result<(), AppPasswordError> {
        let user = valid_user(user)?;
        let label = valid_label(label)?;
        let existing = self.users.get(&user);
        if let Some(found) = existing.and_then(|labels| find_label(labels, &label)) {
            return Err(AppPasswordError::DuplicateLabel { user, label: found.to_owned() });
        }
        if existing.is_some_and(|labels| labels.len() >= MAX_PER_USER) {
            return Err(AppPasswordError::TooMany { user });
        }
        let hash = hash_password(&canonical(password)).map_err(AppPasswordError::Hash)?;
        let mut users = self.users.clone();
        users.entry(user).or_default().insert(label, Stored { hash, created: unix_now(), last_used: None });
        self.commit(users)
    }

    /// Removes `user`'s app password labelled `label` (ignoring case) and writes the file;
    /// the label as it was stored, or `None` if there was none. Only inside
    /// [`AppPasswords::update`].
    pub fn revoke(&mut self, user: &str, label: &str) -> Result<Option<String>, AppPasswordError> {
        let user = valid_user(user)?;
        let Some(found) = self.users.get(&user).and_then(|labels| find_label(labels, label)).map(str::to_owned) else {
            return Ok(None);
        };
        let mut users = self.users.clone();
        if let Some(labels) = users.get_mut(&user) {
            labels.remove(&found);
            if labels.is_empty() {
                users.remove(&user);
            }
        }
        self.commit(users)?;
        Ok(Some(found))
    }

    /// Records last-use times (by hash, seconds since the epoch) of app passwords that
    /// still exist, keeping the later time, and writes the file if anything changed.
    /// Only inside [`AppPasswords::update`].
    pub fn record_use(&mut self, used: &HashMap<String, u64>) -> Result<(), AppPasswordError> {
        let mut users = self.users.clone();
        let mut changed = false;
        for stored in users.values_mut().flat_map(BTreeMap::values_mut) {
            if let Some(&at) = used.get(&stored.hash) {
                if stored.last_used.is_none_or(|last| last < at) {
                    stored.last_used = Some(at);
                    changed = true;
                }
            }
        }
        if changed { self.commit(users) } else { Ok(()) }
    }

    /// Writes `users` to disk, then adopts them. Only with the write lock held.
    fn commit(&mut self, users: BTreeMap<String, BTreeMap<String, Stored>>) -> Result<(), AppPasswordError> {
        debug_assert!(self.lock.is_some(), "app passwords written without the write lock");
        let file = StoredFile { version: FORMAT_VERSION, users };
        let text = toml::to_string(&file).map_err(|e| AppPasswordError::Corrupt {
            path: self.path.clone(),
            message: format!("cannot serialise: {e}"),
        })?;
        crate::fsutil::write_private_atomic(&self.path, text.as_bytes())
            .map_err(|source| AppPasswordError::Io { path: self.path.clone(), source })?;
        self.users = file.users;
        Ok(())
    }
}

/// The label in `labels` equal to `label` ignoring case.
fn find_label<'a>(labels: &'a BTreeMap<String, Stored>, label: &str) -> Option<&'a str> {
    let wanted = label.trim().to_lowercase();
    labels.keys().find(|l| l.to_lowercase() == wanted).map(String::as_str)
}

/// `label` trimmed, if it is 1 to [`MAX_LABEL_CHARS`] characters with no control or
/// invisible ones (which could disguise an audit line or a listing).
pub fn valid_label(label: &str) -> Result<String, AppPasswordError> {
    let trimmed = label.trim();
    let count = trimmed.chars().count();
    let bad = |c: char| c.is_control() || crate::user::is_invisible(c);
    if count == 0 || count > MAX_LABEL_CHARS || trimmed.chars().any(bad) {
        return Err(AppPasswordError::InvalidLabel(crate::user::escape(label).chars().take(80).collect()));
    }
    Ok(trimmed.to_owned())
}

fn valid_user(user: &str) -> Result<String, AppPasswordError> {
    crate::user::normalize(user).map_err(|e| AppPasswordError::InvalidUser(e.to_string()))
}

/// A new app password: four groups of four characters, e.g. `k7wd-mq3x-9fha-tcpe`.
pub fn generate() -> Secret {
    let mut rng = OsRng;
    let mut text = String::with_capacity(GROUPS * (GROUP_LEN + 1));
    for group in 0..GROUPS {
        if group > 0 {
            text.push('-');
        }
        for _ in 0..GROUP_LEN {
            text.push(char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]));
        }
    }
    Secret::new(text)
}

/// The form a password is hashed and checked in: separators (`-`, spaces) dropped, lower
/// case, so `K7WD MQ3X 9FHA TCPE` is the same app password as `k7wd-mq3x-9fha-tcpe`.
fn canonical(password: &Secret) -> Secret {
    let text: String =
        password.expose().chars().filter(|c| *c != '-' && !c.is_whitespace()).flat_map(char::to_lowercase).collect();
    Secret::new(text)
}

fn read_file(path: &Path) -> Result<BTreeMap<String, BTreeMap<String, Stored>>, AppPasswordError> {
    let text = match read_secret_text(path) {
        Ok(text) => text,
        Err(e) if e.is_missing() => return Ok(BTreeMap::new()),
        Err(e) => return Err(AppPasswordError::File(e)),
    };
    let corrupt = |message: String| AppPasswordError::Corrupt { path: path.to_owned(), message };
    let file: StoredFile = toml::from_str(text.expose()).map_err(|e| corrupt(e.to_string()))?;
    if file.version != FORMAT_VERSION {
        return Err(AppPasswordError::UnsupportedVersion { path: path.to_owned(), version: file.version });
    }
    let mut users = BTreeMap::new();
    for (user, labels) in file.users {
        let normalized = crate::user::normalize(&user).map_err(|e| corrupt(e.to_string()))?;
        if normalized != user {
            return Err(corrupt(format!("user {user:?} is not written as {normalized:?}")));
        }
        if labels.len() > MAX_PER_USER {
            return Err(corrupt(format!("{user} has more than {MAX_PER_USER} app passwords")));
        }
        let mut seen = std::collections::HashSet::new();
        for (label, stored) in &labels {
            if valid_label(label).ok().as_deref() != Some(label.as_str()) || !seen.insert(label.to_lowercase()) {
                return Err(corrupt(format!(
                    "{user} has an invalid or repeated label {:?}",
                    crate::user::escape(label)
                )));
            }
            if !PasswordHash::new(&stored.hash).is_ok_and(|h| h.algorithm.as_str() == "argon2id") {
                return Err(corrupt(format!("the hash of {user}'s {label:?} is not an argon2id PHC string")));
            }
        }
        users.insert(user, labels);
    }
    Ok(users)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Last uses of app passwords the daemon has seen and not yet written, by hash. A login
/// only notes its use here (no disk write on the login path); [`flush_usage`] writes them.
#[derive(Debug, Default)]
pub struct Usage {
    pending: Mutex<HashMap<String, u64>>,
    noted: Notify,
}

impl Usage {
    /// Notes that the app password with stored hash `hash` let a login in now.
    pub fn record(&self, hash: &str) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(hash.to_owned(), unix_now());
        self.noted.notify_one();
    }

    fn take(&self) -> HashMap<String, u64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn give_back(&self, used: HashMap<String, u64>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (hash, at) in used {
            let slot = pending.entry(hash).or_insert(at);
            *slot = (*slot).max(at);
        }
    }

    /// Writes the noted uses into the file under `state_dir` now (blocking); on failure
    /// they stay noted for the next try.
    pub fn write(&self, state_dir: &Path) -> Result<(), AppPasswordError> {
        let used = self.take();
        if used.is_empty() {
            return Ok(());
        }
        match AppPasswords::update(state_dir, |passwords| passwords.record_use(&used)) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.give_back(used);
                Err(e)
            }
        }
    }
}

/// Writes noted last uses soon after they happen, at most once per [`FLUSH_INTERVAL`],
/// off the login path, until `stop` (the daemon writes what is left when it stops).
pub async fn flush_usage(usage: Arc<Usage>, state_dir: PathBuf, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = usage.noted.notified() => {}
            () = stop.cancelled() => return,
        }
        let (u, dir) = (usage.clone(), state_dir.clone());
        match tokio::task::spawn_blocking(move || u.write(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot record when app passwords were last used; will retry"),
            Err(e) => tracing::warn!(error = %e, "the write of app password last-use times failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn add(dir: &Path, user: &str, label: &str, password: &Secret) -> Result<(), AppPasswordError> {
        AppPasswords::update(dir, |p| p.add(user, label, password))
    }

    #[test]
    fn generated_passwords_are_four_groups_of_four_easy_characters() {
        let a = generate();
        let groups: Vec<&str> = a.expose().split('-').collect();
        assert_eq!(groups.len(), 4);
        assert!(groups.iter().all(|g| g.len() == 4 && g.bytes().all(|b| ALPHABET.contains(&b))), "{a:?}");
        assert_ne!(a.expose(), generate().expose());
        assert_eq!(ALPHABET.len(), 32, "5 bits per character, 80 bits in all");
    }

    #[tokio::test]
    async fn add_check_revoke_and_the_file_holds_only_hashes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let phone = generate();
        add(&dir, "Alice@Example.com", "phone", &phone).unwrap();
        add(&dir, "alice@example.com", "laptop", &generate()).unwrap();
        let loaded = AppPasswords::load(&dir).unwrap();
        let labels: Vec<String> = loaded.list("alice@example.com").into_iter().map(|l| l.label).collect();
        assert_eq!(labels, ["laptop", "phone"]);
        let matched = loaded.check("alice@example.com", &phone).await.unwrap().unwrap();
        assert_eq!(matched.label, "phone");
        let typed = Secret::new(phone.expose().to_uppercase().replace('-', " "));
        assert_eq!(loaded.check("alice@example.com", &typed).await.unwrap().unwrap().label, "phone");
        assert_eq!(loaded.check("alice@example.com", &Secret::new("nope")).await.unwrap(), None);
        assert_eq!(loaded.check("bob@example.com", &phone).await.unwrap(), None, "another user's is not his");

        let text = std::fs::read_to_string(dir.join(FILE)).unwrap();
        let plain = phone.expose().replace('-', "");
        assert!(!text.contains(phone.expose()) && !text.contains(&plain), "{text}");
        assert!(text.contains("$argon2id$"));
        assert_eq!(std::fs::metadata(dir.join(FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);

        assert_eq!(
            AppPasswords::update(&dir, |p| p.revoke("alice@example.com", "PHONE")).unwrap().as_deref(),
            Some("phone")
        );
        assert_eq!(AppPasswords::update(&dir, |p| p.revoke("alice@example.com", "phone")).unwrap(), None);
        let loaded = AppPasswords::load(&dir).unwrap();
        assert_eq!(loaded.check("alice@example.com", &phone).await.unwrap(), None);
        assert!(loaded.contains("alice@example.com", "Laptop") && !loaded.contains("alice@example.com", "phone"));
    }

    #[test]
    fn labels_are_unique_per_user_bounded_and_visible() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        add(dir, "a@example.com", " Phone ", &generate()).unwrap();
        assert!(matches!(
            add(dir, "a@example.com", "phone", &generate()),
            Err(AppPasswordError::DuplicateLabel { .. })
        ));
        add(dir, "b@example.com", "phone", &generate()).unwrap();
        for bad in ["", "   ", "tab\there", "new\nline", "bidi\u{202E}", &"x".repeat(MAX_LABEL_CHARS + 1)] {
            let err = add(dir, "a@example.com", bad, &generate()).unwrap_err();
            assert!(matches!(err, AppPasswordError::InvalidLabel(_)), "{bad:?}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        add(dir, "a@example.com", &"é".repeat(MAX_LABEL_CHARS), &generate()).unwrap();
        assert!(matches!(add(dir, "a b", "x", &generate()), Err(AppPasswordError::InvalidUser(_))));
        for i in 2..MAX_PER_USER {
            add(dir, "a@example.com", &format!("device {i}"), &generate()).unwrap();
        }
        assert!(matches!(add(dir, "a@example.com", "one more", &generate()), Err(AppPasswordError::TooMany { .. })));
    }

    #[test]
    fn last_uses_are_kept_for_passwords_that_still_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        add(dir, "a@example.com", "phone", &generate()).unwrap();
        let hash = AppPasswords::load(dir).unwrap().users["a@example.com"]["phone"].hash.clone();
        let usage = Usage::default();
        usage.record(&hash);
        usage.record("$argon2id$of-a-revoked-one");
        usage.write(dir).unwrap();
        let listed = AppPasswords::load(dir).unwrap().list("a@example.com");
        assert!(listed[0].last_used.is_some_and(|t| t >= listed[0].created));
        assert!(usage.take().is_empty());
    }

    #[test]
    fn a_broken_or_exposed_file_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join(FILE);
        let write = |text: &str, mode: u32| {
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("version = 1\n[users.\"a@example.com\".phone]\nhash = \"plain\"\ncreated = 1\n", 0o600);
        let err = AppPasswords::load(dir).unwrap_err().to_string();
        assert!(err.contains("argon2id") && err.contains("remove it"), "{err}");
        write("version = 2\n", 0o600);
        assert!(matches!(AppPasswords::load(dir), Err(AppPasswordError::UnsupportedVersion { .. })));
        write("version = 1\n", 0o644);
        let err = AppPasswords::load(dir).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(AppPasswords::load(dir).unwrap().is_empty(), "a missing file holds none");
    }
}

//! The embedded file directory: users and argon2id password hashes in a TOML file, so a
//! small installation (and the quickstart) needs no LDAP server.
//!
//! The users file holds one table per user, keyed by mail address:
//!
//! ```toml
//! [users."alice@example.com"]
//! password = "$argon2id$v=19$m=19456,t=2,p=1$..."   # PHC string, from `postern user set-password`
//! groups = ["staff"]                               # optional
//! ```
//!
//! Unknown keys are errors. Names are matched case-insensitively and stored lower case;
//! passwords must be argon2id PHC strings. A missing file is an empty directory (the CLI
//! creates it on the first [`set_password`]). The editing functions rewrite the whole file
//! atomically with mode 0600; comments and layout of a hand-edited file are not kept.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::rngs::OsRng;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use zeroize::{Zeroize, Zeroizing};

use super::{DirectoryError, Entry};
use crate::secret::Secret;

/// `[directory] kind = "file"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The users file; relative paths are taken from the config file's directory.
    pub path: PathBuf,
}

/// Argon2 checks run at once per core (see [`hashing_queue`]).
const HASHES_PER_CORE: usize = 2;

/// Largest argon2 memory cost accepted from a stored hash, KiB (the default is 19 MiB):
/// each worker keeps this much while it checks.
const MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;

/// Checks waiting for a hashing worker before callers wait to queue.
const HASH_QUEUE: usize = 256;

/// A well-formed argon2id hash no password is known to match, checked against when the
/// user is unknown so that `verify` costs the same either way.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$\
                          AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

/// One user as stored.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UserRecord {
    password: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
}

/// The users file as stored.
#[derive(Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: BTreeMap<String, UserRecord>,
}

/// Users and their argon2id password hashes, loaded from a TOML file.
///
/// The file is read once; open it again to pick up changes.
pub struct FileDirectory {
    path: PathBuf,
    users: BTreeMap<String, UserRecord>,
}

impl fmt::Debug for FileDirectory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileDirectory").field("path", &self.path).field("users", &self.users.len()).finish()
    }
}

impl FileDirectory {
    /// Loads the users file named by `config`, relative to `base_dir`.
    ///
    /// A missing file gives an empty directory and a warning; an unreadable or malformed
    /// one is a [`DirectoryError::Config`] naming the file (and line and column).
    pub fn open(config: &FileConfig, base_dir: &Path) -> Result<Self, DirectoryError> {
        let path = base_dir.join(&config.path);
        let users = match load_users(&path)? {
            Some(users) => users,
            None => {
                tracing::warn!(
                    path = %path.display(),
                    "users file not found: the directory is empty until `postern user set-password` adds a user"
                );
                BTreeMap::new()
            }
        };
        Ok(Self { path, users })
    }

    /// The users file this directory was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The users, in name order, with their groups; for listing.
    pub fn users(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.users.iter().map(|(name, r)| (name.as_str(), r.groups.as_slice()))
    }

    /// See [`super::Directory::lookup`].
    pub fn lookup(&self, user: &str) -> Result<Entry, DirectoryError> {
        let user = crate::user::normalize(user).map_err(|_| DirectoryError::UnknownUser)?;
        let record = self.users.get(&user).ok_or(DirectoryError::UnknownUser)?;
        Ok(Entry { user, dn: None, groups: Some(record.groups.clone()) })
    }

    /// See [`super::Directory::verify`].
    ///
    /// The argon2id check runs on the bounded hashing workers ([`check_in_pool`]). A user
    /// missing from the directory (an entry from before a reload) is checked against a
    /// dummy hash, so the answer takes as long as for a known user.
    pub async fn verify(&self, entry: &Entry, password: &Secret) -> Result<Vec<String>, DirectoryError> {
        let record = self.users.get(&entry.user).cloned();
        let phc = record.as_ref().map_or_else(|| DUMMY_HASH.to_owned(), |r| r.password.clone());
        let matched = check_in_pool(phc, password.clone()).await?;
        match record {
            None => Err(DirectoryError::UnknownUser),
            Some(_) if !matched => Err(DirectoryError::WrongPassword),
            Some(r) => Ok(r.groups),
        }
    }
}

/// Runs the same check as for a known user against a hash no password matches, so a
/// refusal of an unknown user takes as long as a wrong password.
pub async fn check_dummy(password: &Secret) {
    let _ = check_in_pool(DUMMY_HASH.to_owned(), password.clone()).await;
}

/// Checks `password` against each of `hashes` on the hashing workers, all queued at once so
/// that they run side by side, and returns the index of the first that matches. With no
/// hashes, one check against a hash no password matches runs instead: the answer takes as
/// long as one wrong hash either way.
pub async fn check_any(hashes: &[String], password: &Secret) -> Result<Option<usize>, DirectoryError> {
    let unavailable = || DirectoryError::Unavailable("the password hashing workers are gone".into());
    let phcs: Vec<String> = if hashes.is_empty() { vec![DUMMY_HASH.to_owned()] } else { hashes.to_vec() };
    let mut answers = Vec::with_capacity(phcs.len());
    for phc in phcs {
        let (answer, answered) = oneshot::channel();
        hashing_queue().send(HashJob { phc, password: password.clone(), answer }).await.map_err(|_| unavailable())?;
        answers.push(answered);
    }
    let mut matched = None;
    let mut failure = None;
    for (index, answered) in answers.into_iter().enumerate() {
        match answered.await.map_err(|_| unavailable())? {
            Ok(true) if matched.is_none() && !hashes.is_empty() => matched = Some(index),
            Ok(_) => {}
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    match (matched, failure) {
        (Some(index), _) => Ok(Some(index)),
        (None, Some(e)) => Err(e),
        (None, None) => Ok(None),
    }
}

/// One password check for the hashing workers.
struct HashJob {
    phc: String,
    password: Secret,
    answer: oneshot::Sender<Result<bool, DirectoryError>>,
}

/// The queue of the hashing workers: a fixed set of threads ([`HASHES_PER_CORE`] per core)
/// that run every argon2 check. Each check holds about 19 MiB while it runs, so a burst of
/// guesses queues here instead of allocating without bound, and the memory allocator keeps
/// at most a few threads' worth of freed blocks.
fn hashing_queue() -> &'static mpsc::Sender<HashJob> {
    static QUEUE: OnceLock<mpsc::Sender<HashJob>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<HashJob>(HASH_QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        for i in 0..HASHES_PER_CORE * cores {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new().name(format!("postern-hash-{i}")).spawn(move || {
                let mut blocks = Vec::new();
                loop {
                    let mut queue = queue.lock().unwrap_or_else(|e| e.into_inner());
                    let job = match queue.try_recv() {
                        Ok(job) => Some(job),
                        // Idle: give the working memory back until the next burst.
                        Err(_) => {
                            blocks = Vec::new();
                            queue.blocking_recv()
                        }
                    };
                    drop(queue);
                    let Some(job) = job else { return };
                    // A login that gave up (timed out, client gone) needs no answer.
                    if !job.answer.is_closed() {
                        let _ = job.answer.send(check_password_in(&job.phc, &job.password, &mut blocks));
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password hashing thread");
            }
        }
        jobs
    })
}

/// Checks `password` against `phc` on the hashing workers (argon2 is deliberately slow and
/// must not stall the async workers); waits its turn when they are busy. The caller's
/// deadline covers the wait.
async fn check_in_pool(phc: String, password: Secret) -> Result<bool, DirectoryError> {
    let (answer, answered) = oneshot::channel();
    let unavailable = || DirectoryError::Unavailable("the password hashing workers are gone".into());
    hashing_queue().send(HashJob { phc, password, answer }).await.map_err(|_| unavailable())?;
    answered.await.map_err(|_| unavailable())?
}

/// Hashes `password` with argon2id (default parameters, random salt) into a PHC string.
///
/// Slow on purpose; call it from a blocking context.
pub fn hash_password(password: &Secret) -> Result<String, DirectoryError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| DirectoryError::Config(format!("cannot hash password: {e}")))
}

/// Sets `user`'s password in the users file at `path`, creating file and user as needed
/// and keeping the user's groups.
pub fn set_password(path: &Path, user: &str, password: &Secret) -> Result<(), DirectoryError> {
    let user = valid_user(user)?;
    if password.is_empty() {
        return Err(DirectoryError::Config("refusing to set an empty password".into()));
    }
    let mut users = read_users_or_empty(path)?;
    let hash = hash_password(password)?;
    users
        .entry(user)
        .and_modify(|r| r.password.clone_from(&hash))
        .or_insert_with(|| UserRecord { password: hash.clone(), groups: Vec::new() });
    write_users(path, users)
}

/// Replaces the groups of `user`, who must already be in the users file at `path`.
pub fn set_groups(path: &Path, user: &str, groups: &[String]) -> Result<(), DirectoryError> {
    let user = valid_user(user)?;
    let mut users = read_users_or_empty(path)?;
    let record = users.get_mut(&user).ok_or(DirectoryError::UnknownUser)?;
    record.groups = groups.to_vec();
    write_users(path, users)
}

/// Removes `user` from the users file at `path`; `false` if they were not in it.
pub fn remove_user(path: &Path, user: &str) -> Result<bool, DirectoryError> {
    let mut users = read_users_or_empty(path)?;
    if users.remove(&valid_user(user)?).is_none() {
        return Ok(false);
    }
    write_users(path, users)?;
    Ok(true)
}

/// Whether `password` matches the PHC string `phc`.
/// Checks `password` against the argon2 PHC string `phc`, using `blocks` as the hash's
/// working memory (grown as needed, wiped afterwards: it is derived from the password).
/// Workers keep theirs between checks, so a burst of checks does not allocate anew.
fn check_password_in(phc: &str, password: &Secret, blocks: &mut Vec<Block>) -> Result<bool, DirectoryError> {
    let unusable = |e: &dyn fmt::Display| DirectoryError::Config(format!("stored password hash is unusable: {e}"));
    let hash = PasswordHash::new(phc).map_err(|e| unusable(&e))?;
    let algorithm = Algorithm::try_from(hash.algorithm).map_err(|e| unusable(&e))?;
    let version = hash.version.map(Version::try_from).transpose().map_err(|e| unusable(&e))?.unwrap_or_default();
    let params = Params::try_from(&hash).map_err(|e| unusable(&e))?;
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return Err(unusable(&format!(
            "memory cost {} KiB is above the {MAX_HASH_MEMORY_KIB} KiB limit",
            params.m_cost()
        )));
    }
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else {
        return Err(unusable(&"no salt or no hash"));
    };
    let mut salt_bytes = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_bytes).map_err(|e| unusable(&e))?;
    let mut computed = Zeroizing::new(vec![0u8; expected.len()]);
    blocks.resize(params.block_count(), Block::default());
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.expose().as_bytes(),
        salt,
        &mut computed,
        &mut blocks[..],
    );
    blocks.iter_mut().for_each(Zeroize::zeroize);
    hashed.map_err(|e| unusable(&e))?;
    Ok(computed.ct_eq(expected.as_bytes()).into())
}

fn read_users_or_empty(path: &Path) -> Result<BTreeMap<String, UserRecord>, DirectoryError> {
    Ok(load_users(path)?.unwrap_or_default())
}

/// Reads and checks the users file (the secret-file policy of [`crate::secret`], since
/// password hashes can be attacked offline; TOML shape, names unique ignoring case, argon2id
/// hashes); `None` if there is no such file.
fn load_users(path: &Path) -> Result<Option<BTreeMap<String, UserRecord>>, DirectoryError> {
    let text = match crate::secret::read_secret_text(path) {
        Ok(text) => text,
        Err(e) if e.is_missing() => return Ok(None),
        Err(e) => return Err(DirectoryError::Config(format!("users file {e}"))),
    };
    let invalid = |msg: String| DirectoryError::Config(format!("users file {}: {msg}", path.display()));
    let file: UsersFile = toml::from_str(text.expose()).map_err(|e| invalid(e.to_string()))?;
    let mut users = BTreeMap::new();
    for (name, record) in file.users {
        let is_argon2id = PasswordHash::new(&record.password).is_ok_and(|h| h.algorithm.as_str() == "argon2id");
        if !is_argon2id {
            return Err(invalid(format!("the password of {name:?} is not an argon2id PHC string")));
        }
        let key = crate::user::normalize(&name).map_err(|e| invalid(e.to_string()))?;
        if users.insert(key, record).is_some() {
            return Err(invalid(format!("user {name:?} appears more than once (names ignore case)")));
        }
    }
    Ok(Some(users))
}

fn write_users(path: &Path, users: BTreeMap<String, UserRecord>) -> Result<(), DirectoryError> {
    let text = toml::to_string(&UsersFile { users })
        .map_err(|e| DirectoryError::Config(format!("cannot serialise users file: {e}")))?;
    crate::fsutil::write_private_atomic(path, text.as_bytes())
        .map_err(|e| DirectoryError::Config(format!("cannot write users file {}: {e}", path.display())))
}

fn valid_user(user: &str) -> Result<String, DirectoryError> {
    crate::user::normalize(user).map_err(|e| DirectoryError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn directory(path: &Path) -> FileDirectory {
        FileDirectory::open(&FileConfig { path: path.to_owned() }, Path::new("/")).unwrap()
    }

    async fn login(path: &Path, user: &str, password: &str) -> Result<Vec<String>, DirectoryError> {
        let dir = directory(path);
        let entry = dir.lookup(user)?;
        dir.verify(&entry, &Secret::new(password)).await
    }

    /// Writes a hand-edited users file as an admin would, readable by its owner only.
    fn write_private(path: &Path, text: impl AsRef<[u8]>) -> std::io::Result<()> {
        std::fs::write(path, text)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    }

    #[test]
    fn reused_working_memory_checks_like_a_fresh_one_and_is_wiped() {
        let phc = hash_password(&Secret::new("pw")).unwrap();
        let mut blocks = Vec::new();
        assert!(check_password_in(&phc, &Secret::new("pw"), &mut blocks).unwrap());
        assert!(!check_password_in(&phc, &Secret::new("pW"), &mut blocks).unwrap());
        assert!(check_password_in(&phc, &Secret::new("pw"), &mut blocks).unwrap());
        assert!(!blocks.is_empty() && blocks.iter().all(|b| b.as_ref().iter().all(|w| *w == 0)), "wiped");
        let greedy = phc.replace("m=19456", "m=1048576");
        assert!(matches!(check_password_in(&greedy, &Secret::new("pw"), &mut blocks), Err(DirectoryError::Config(_))));
    }

    #[tokio::test]
    async fn check_any_finds_the_matching_hash_and_costs_one_check_without_hashes() {
        let hashes: Vec<String> = ["one", "two", "three"].map(|p| hash_password(&Secret::new(p)).unwrap()).to_vec();
        assert_eq!(check_any(&hashes, &Secret::new("two")).await.unwrap(), Some(1));
        assert_eq!(check_any(&hashes, &Secret::new("four")).await.unwrap(), None);
        assert_eq!(check_any(&[], &Secret::new("anything")).await.unwrap(), None);
        let broken = vec!["$argon2id$v=19$m=1048576,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$AAAA".to_owned(), hashes[0].clone()];
        assert_eq!(check_any(&broken, &Secret::new("one")).await.unwrap(), Some(1), "a match wins");
        assert!(matches!(check_any(&broken, &Secret::new("x")).await, Err(DirectoryError::Config(_))));
    }

    #[test]
    fn dummy_hash_is_well_formed() {
        assert!(!check_password_in(DUMMY_HASH, &Secret::new("anything"), &mut Vec::new()).unwrap());
    }

    #[tokio::test]
    async fn set_then_verify_and_wrong_password() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        set_password(&path, "Alice@Example.com", &Secret::new("s3cret")).unwrap();
        set_groups(&path, "alice@example.com", &["staff".into(), "admins".into()]).unwrap();

        assert_eq!(login(&path, "alice@example.com", "s3cret").await.unwrap(), ["staff", "admins"]);
        assert_eq!(login(&path, "ALICE@example.COM", "s3cret").await.unwrap(), ["staff", "admins"]);
        assert!(matches!(login(&path, "alice@example.com", "s3cret ").await, Err(DirectoryError::WrongPassword)));

        set_password(&path, "alice@example.com", &Secret::new("new")).unwrap();
        assert!(matches!(login(&path, "alice@example.com", "s3cret").await, Err(DirectoryError::WrongPassword)));
        assert_eq!(login(&path, "alice@example.com", "new").await.unwrap(), ["staff", "admins"], "groups kept");
    }

    #[tokio::test]
    async fn unknown_user() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        set_password(&path, "alice@example.com", &Secret::new("pw")).unwrap();
        let dir = directory(&path);
        assert!(matches!(dir.lookup("bob@example.com"), Err(DirectoryError::UnknownUser)));

        let stale = Entry { user: "bob@example.com".into(), dn: None, groups: None };
        assert!(matches!(dir.verify(&stale, &Secret::new("pw")).await, Err(DirectoryError::UnknownUser)));
        assert!(matches!(set_groups(&path, "bob@example.com", &[]), Err(DirectoryError::UnknownUser)));
    }

    #[tokio::test]
    async fn awkward_passwords() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        for (i, pw) in ["pässwörd ✓ 密码", "quo\"te's", "back\\slash\\", "\" = 1\n[users.x]"].iter().enumerate() {
            let user = format!("u{i}@example.com");
            set_password(&path, &user, &Secret::new(*pw)).unwrap();
            assert!(login(&path, &user, pw).await.unwrap().is_empty(), "{pw:?}");
        }
        assert_eq!(directory(&path).users().count(), 4);
    }

    #[test]
    fn missing_file_is_empty_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FileDirectory::open(&FileConfig { path: "users.toml".into() }, tmp.path()).unwrap();
        assert_eq!(dir.path(), tmp.path().join("users.toml"));
        assert!(matches!(dir.lookup("a@example.com"), Err(DirectoryError::UnknownUser)));
    }

    #[test]
    fn malformed_file_names_file_and_position() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        write_private(&path, "[users.\"a@example.com\"]\npassword = \"x\"\nshell = \"/bin/sh\"\n").unwrap();
        let err = FileDirectory::open(&FileConfig { path: path.clone() }, tmp.path()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DirectoryError::Config(_)));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(set_password(&path, "a@example.com", &Secret::new("pw")).is_err(), "never clobber a broken file");

        write_private(&path, "[users.\"a@example.com\"]\npassword = \"plain\"\n").unwrap();
        let msg = FileDirectory::open(&FileConfig { path: path.clone() }, tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("argon2id") && !msg.contains("plain"), "{msg}");

        let hash = hash_password(&Secret::new("pw")).unwrap();
        write_private(
            &path,
            format!("[users.\"A@x\"]\npassword = \"{hash}\"\n[users.\"a@x\"]\npassword = \"{hash}\"\n"),
        )
        .unwrap();
        let msg = FileDirectory::open(&FileConfig { path: path.clone() }, tmp.path()).unwrap_err().to_string();
        assert!(msg.contains("more than once"), "{msg}");
    }

    #[test]
    fn writes_are_atomic_and_private() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        set_password(&path, "a@example.com", &Secret::new("pw")).unwrap();
        set_password(&path, "b@example.com", &Secret::new("pw")).unwrap();
        assert!(remove_user(&path, "B@example.com").unwrap());
        assert!(!remove_user(&path, "b@example.com").unwrap());

        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["users.toml"]);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn hashes_never_contain_the_password() {
        let pw = Secret::new("hunter2hunter2");
        let (a, b) = (hash_password(&pw).unwrap(), hash_password(&pw).unwrap());
        assert!(a.starts_with("$argon2id$"));
        assert_ne!(a, b, "fresh salt each time");
        assert!(!a.contains(pw.expose()));

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        set_password(&path, "a@example.com", &pw).unwrap();
        assert!(!std::fs::read_to_string(&path).unwrap().contains(pw.expose()));
        assert!(set_password(&path, "a@example.com", &Secret::new("")).is_err());
        assert!(set_password(&path, "a b@example.com", &pw).is_err());
    }

    #[test]
    fn group_or_world_readable_users_file_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("users.toml");
        set_password(&path, "a@example.com", &Secret::new("pw")).unwrap();
        for mode in [0o640, 0o644] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = FileDirectory::open(&FileConfig { path: path.clone() }, tmp.path()).unwrap_err().to_string();
            assert!(err.contains(&format!("chmod 600 {}", path.display())) && !err.contains("argon2id"), "{err}");
            assert!(set_password(&path, "b@example.com", &Secret::new("pw")).is_err(), "{mode:o}");
        }
    }
}

//! Where the access decision keeps its counters: password failures and locks per user,
//! failures per client address, password checks in flight, and logged-in sessions per user.
//!
//! Two backends sit behind [`CounterStore`]:
//!
//! - `memory` (the default): this process's [`Lockout`] and [`SessionLimits`]. Locks and
//!   failure counts are saved to `lockout.json` in the state folder (shortly after a
//!   change and at shutdown) and loaded on start, so a restart does not lift a lock.
//! - `redis` (Redis or Valkey, [`redis`]): the counters are shared by every instance behind
//!   a load balancer. A reservation (check lock and limits, count the check in flight) and
//!   its settlement are each one Lua script, so they stay atomic across instances.
//!
//! When the shared store cannot be reached, `[state] on_store_down` decides: `"open"` (the
//! default) uses this process's own counters meanwhile, with the same limits; `"closed"`
//! refuses logins as unavailable. Connection counts per address and TLS handshakes stay
//! per instance in both backends.

pub mod redis;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::lockout::{self, Locked, Lockout, LockoutConfig, Refused, Snapshot};
use super::slots::{SessionLimits, UserSlot};
use crate::metrics::Metrics;

/// The file the memory backend saves locks and failure counts in, in the state folder.
pub const SNAPSHOT_FILE: &str = "lockout.json";

/// How often the memory backend saves its counters when they changed.
pub const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Which backend keeps the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// This process's memory, saved to the state folder.
    #[default]
    Memory,
    /// A Redis or Valkey server shared by every instance.
    Redis,
}

/// What logins do while the shared store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreDown {
    /// Count in this process's memory meanwhile, with the same limits: logins keep working
    /// and brute force is still limited, per instance.
    #[default]
    Open,
    /// Refuse logins as unavailable until the store is back.
    Closed,
}

/// `[state]`: where the counters live.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// `"memory"` (default) or `"redis"`.
    pub backend: BackendKind,
    /// `redis://host:port/db` or `rediss://` (TLS); required with `backend = "redis"`.
    /// A user name may be given in the URL, a password may not: use `password_file`.
    pub url: Option<String>,
    /// File holding the Redis password (mode 0600, like every secret file).
    pub password_file: Option<PathBuf>,
    /// Prefix of every key, so several deployments can share one server.
    pub key_prefix: String,
    /// `"open"` (default) or `"closed"`: what logins do while the store is down.
    pub on_store_down: OnStoreDown,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Memory,
            url: None,
            password_file: None,
            key_prefix: "postern".to_owned(),
            on_store_down: OnStoreDown::Open,
        }
    }
}

impl StateConfig {
    /// Checks the keys; the error names the key and what to do.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self.key_prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            return Err(("state.key_prefix", "use 1 to 64 letters, digits, `-`, `_`, `.` or `:`".into()));
        }
        match self.backend {
            BackendKind::Memory => {
                if self.url.is_some() {
                    return Err(("state.url", "only used with backend = \"redis\"; remove it".into()));
                }
                if self.password_file.is_some() {
                    return Err(("state.password_file", "only used with backend = \"redis\"; remove it".into()));
                }
            }
            BackendKind::Redis => {
                let Some(url) = &self.url else {
                    return Err((
                        "state.url",
                        "required with backend = \"redis\", e.g. \"rediss://redis.internal:6379\"".into(),
                    ));
                };
                redis::check_url(url).map_err(|message| ("state.url", message))?;
            }
        }
        Ok(())
    }
}

/// Why the counter store could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The Redis password file is unusable.
    #[error("state.password_file: {0}")]
    Password(#[from] crate::secret::SecretFileError),
    /// The Redis URL or client could not be set up.
    #[error("state.url: {0}")]
    Client(String),
    /// The saved counters could not be read.
    #[error("cannot read {path}: {message}")]
    Snapshot {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The shared store did not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("state store unavailable: {0}")]
pub struct StoreError(pub String);

/// Why a password check may not start.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// The limits refuse it.
    #[error("{0:?}")]
    Refused(Refused),
    /// The store is down and `on_store_down = "closed"`.
    #[error(transparent)]
    Down(StoreError),
}

/// A reserved password check (see [`lockout::Reservation`]): settled as failed or
/// succeeded, or dropped (counts nothing).
#[derive(Debug)]
#[must_use = "a reservation settles as failed or succeeded, or counts as nothing when dropped"]
pub enum Reservation<'a> {
    /// Counted in this process.
    Local(lockout::Reservation<'a>),
    /// Counted in the shared store.
    Shared(redis::SharedReservation),
}

impl Reservation<'_> {
    /// The password was wrong; true when this failure locked the user.
    pub async fn failed(self) -> bool {
        match self {
            Reservation::Local(r) => r.failed(),
            Reservation::Shared(r) => r.failed().await,
        }
    }

    /// The password was right: the user's failure count starts again.
    pub async fn succeeded(self) {
        match self {
            Reservation::Local(r) => r.succeeded(),
            Reservation::Shared(r) => r.succeeded().await,
        }
    }
}

/// A held session slot of a user, in this process or in the shared store; freed on drop.
#[derive(Debug)]
pub enum SessionSlot {
    /// Counted in this process.
    Local(UserSlot),
    /// Counted in the shared store (refreshed while held, expires if this process dies).
    Shared(redis::SharedSlot),
}

/// The counters of the access decision, in the configured backend.
pub struct CounterStore {
    local: Lockout,
    sessions: Arc<SessionLimits>,
    shared: Option<Arc<redis::RedisCounters>>,
    on_down: OnStoreDown,
    snapshot_path: Option<PathBuf>,
}

impl std::fmt::Debug for CounterStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterStore").field("shared", &self.shared.is_some()).finish_non_exhaustive()
    }
}

impl CounterStore {
    /// Counters in this process only, not saved anywhere (tests, benches).
    pub fn memory(lockout: LockoutConfig, sessions: Arc<SessionLimits>) -> Self {
        Self { local: Lockout::new(lockout), sessions, shared: None, on_down: OnStoreDown::Open, snapshot_path: None }
    }

    /// The store `config` asks for. The memory backend loads `state_dir/lockout.json`;
    /// the Redis backend connects lazily (a server that is down at start is a store that
    /// is down, not a failed start) and reports its health in `metrics`.
    pub fn open(
        config: &StateConfig,
        lockout: LockoutConfig,
        sessions: Arc<SessionLimits>,
        state_dir: &Path,
        base_dir: &Path,
        metrics: &Metrics,
    ) -> Result<Self, SetupError> {
        let mut store = Self::memory(lockout.clone(), sessions.clone());
        store.on_down = config.on_store_down;
        metrics.state_store_up.set(1);
        match config.backend {
            BackendKind::Memory => {
                let path = state_dir.join(SNAPSHOT_FILE);
                if let Some(snapshot) = load_snapshot(&path)? {
                    store.local.restore(snapshot);
                    tracing::info!(locked = store.local.locked_users().len(), path = %path.display(), "loaded saved lockouts");
                }
                store.snapshot_path = Some(path);
            }
            BackendKind::Redis => {
                let password = match &config.password_file {
                    Some(path) => Some(crate::secret::read_secret_text(&base_dir.join(path))?),
                    None => None,
                };
                let url = config.url.as_deref().unwrap_or_default();
                let shared = redis::RedisCounters::connect(
                    url,
                    password,
                    &config.key_prefix,
                    lockout,
                    sessions.per_user(),
                    metrics.state_store_up.clone(),
                )
                .map_err(SetupError::Client)?;
                store.shared = Some(shared);
            }
        }
        Ok(store)
    }

    /// This process's own counters: the memory backend, or the fallback while a shared
    /// store is down.
    pub fn local(&self) -> &Lockout {
        &self.local
    }

    /// Whether the store answers (always true for the memory backend).
    pub fn is_up(&self) -> bool {
        self.shared.as_ref().is_none_or(|s| s.is_up())
    }

    /// Whether logins can be decided now: the store answers, or `on_store_down = "open"`
    /// lets local counters stand in while it does not.
    pub fn serves_logins(&self) -> bool {
        self.is_up() || self.on_down == OnStoreDown::Open
    }

    /// What to do with a failed store call: fall back to local counters (`Ok(())`) or
    /// refuse (`Err`).
    fn when_down(&self, error: StoreError) -> Result<(), StoreError> {
        match self.on_down {
            OnStoreDown::Open => Ok(()),
            OnStoreDown::Closed => Err(error),
        }
    }

    /// The cheap checks before the directory is asked: whether `ip` is throttled or `user`
    /// locked (throttle first).
    pub async fn precheck(&self, user: &str, ip: IpAddr) -> Result<Option<Refused>, StoreError> {
        if let Some(shared) = &self.shared {
            match shared.precheck(user, ip).await {
                Ok(refused) => return Ok(refused),
                Err(e) => self.when_down(e)?,
            }
        }
        Ok(if self.local.is_throttled(ip) {
            Some(Refused::Throttled)
        } else if self.local.is_locked(user) {
            Some(Refused::Locked)
        } else {
            None
        })
    }

    /// Reserves one password check of `user` from `ip` (see [`Lockout::reserve`]): the
    /// check of the lock and limits and the count in flight are one atomic step, in this
    /// process or in the shared store.
    pub async fn reserve(&self, user: &str, ip: IpAddr) -> Result<Reservation<'_>, ReserveError> {
        if let Some(shared) = &self.shared {
            match shared.reserve(user, ip).await {
                Ok(Ok(reservation)) => return Ok(Reservation::Shared(reservation)),
                Ok(Err(refused)) => return Err(ReserveError::Refused(refused)),
                Err(e) => self.when_down(e).map_err(ReserveError::Down)?,
            }
        }
        self.local.reserve(user, ip).map(Reservation::Local).map_err(ReserveError::Refused)
    }

    /// Records a refused login from `ip` that was not a password check.
    pub async fn record_address_failure(&self, ip: IpAddr) {
        if let Some(shared) = &self.shared {
            match shared.record_address_failure(ip).await {
                Ok(()) => return,
                Err(_) if self.on_down == OnStoreDown::Closed => return,
                Err(_) => {}
            }
        }
        self.local.record_address_failure(ip);
    }

    /// How long to wait before answering a refused login from `ip`: grows with the
    /// address's recent failures.
    pub async fn failure_delay(&self, ip: IpAddr) -> Duration {
        if let Some(shared) = &self.shared {
            if let Ok(recent) = shared.address_failures(ip).await {
                return lockout::failure_delay(self.local.config(), recent);
            }
        }
        self.local.failure_delay(ip)
    }

    /// Lifts `user`'s lock and forgets their failures, for every instance sharing the
    /// store; true if they were locked.
    pub async fn unlock(&self, user: &str) -> Result<bool, StoreError> {
        // The shared lock first: when the store is down the unlock fails as a whole, and
        // the admin tries again once it is back.
        let there = match &self.shared {
            Some(shared) => shared.unlock(user).await?,
            None => false,
        };
        Ok(self.local.unlock(user) || there)
    }

    /// Users locked now, with the time left.
    pub async fn locked_users(&self) -> Result<Vec<Locked>, StoreError> {
        let mut locked = match &self.shared {
            Some(shared) => shared.locked_users().await?,
            None => Vec::new(),
        };
        for l in self.local.locked_users() {
            if !locked.iter().any(|s| s.user == l.user) {
                locked.push(l);
            }
        }
        locked.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(locked)
    }

    /// A slot for another logged-in session of `user`, counted over every instance sharing
    /// the store; `None` when the user is at `[limits] max_sessions_per_user`.
    pub async fn try_user(&self, user: &str) -> Result<Option<SessionSlot>, StoreError> {
        if let Some(shared) = &self.shared {
            match shared.try_user(user).await {
                Ok(slot) => return Ok(slot.map(SessionSlot::Shared)),
                Err(e) => self.when_down(e)?,
            }
        }
        Ok(self.sessions.try_user(user).map(SessionSlot::Local))
    }

    /// The per-user session limit.
    pub fn per_user(&self) -> usize {
        self.sessions.per_user()
    }

    /// Saves the memory backend's locks and failure counts if they changed since the last
    /// save (or always, with `force`). Nothing to do for a shared store.
    pub fn save(&self, force: bool) -> std::io::Result<()> {
        let Some(path) = &self.snapshot_path else { return Ok(()) };
        if !self.local.take_changed() && !force {
            return Ok(());
        }
        let json = serde_json::to_vec_pretty(&self.local.snapshot()).map_err(std::io::Error::other)?;
        if let Err(e) = crate::fsutil::write_private_atomic(path, &json) {
            // Try again at the next tick.
            self.local.mark_changed();
            return Err(e);
        }
        Ok(())
    }

    /// Saves changes every [`SAVE_EVERY`] until `stop` is cancelled (the caller saves once
    /// more at shutdown).
    pub async fn save_periodically(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if self.snapshot_path.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(SAVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(e) = self.save(false) {
                tracing::warn!(error = %e, "cannot save lockouts to the state folder");
            }
        }
    }
}

fn load_snapshot(path: &Path) -> Result<Option<Snapshot>, SetupError> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SetupError::Snapshot { path: path.to_owned(), message: e.to_string() }),
    };
    match serde_json::from_slice(&text) {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(e) => {
            // A damaged file must not keep the daemon from starting; the locks are lost.
            tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable lockout file");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> CounterStore {
        let lockout = LockoutConfig { max_failures: 2, failure_delay_ms: 0, ..LockoutConfig::default() };
        let sessions = SessionLimits::new(1, 10, 10);
        CounterStore::open(&StateConfig::default(), lockout, sessions, dir, dir, &Metrics::new()).unwrap()
    }

    #[tokio::test]
    async fn the_memory_backend_saves_locks_on_change_and_loads_them_on_start() {
        let dir = tempfile::tempdir().unwrap();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let store = open(dir.path());
        store.save(false).unwrap();
        assert!(!dir.path().join(SNAPSHOT_FILE).exists(), "nothing changed, nothing written");
        for _ in 0..2 {
            store.reserve("u@x", ip).await.unwrap().failed().await;
        }
        assert!(matches!(store.precheck("u@x", ip).await.unwrap(), Some(Refused::Locked)));
        store.save(false).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join(SNAPSHOT_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let restarted = open(dir.path());
        assert!(matches!(restarted.precheck("u@x", ip).await.unwrap(), Some(Refused::Locked)));
        assert_eq!(restarted.locked_users().await.unwrap()[0].user, "u@x");
        assert!(restarted.unlock("u@x").await.unwrap());
        restarted.save(false).unwrap();
        assert!(open(dir.path()).precheck("u@x", ip).await.unwrap().is_none(), "the unlock was saved");
    }

    #[tokio::test]
    async fn a_damaged_file_does_not_stop_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SNAPSHOT_FILE), "{not json").unwrap();
        let store = open(dir.path());
        assert!(store.locked_users().await.unwrap().is_empty());
    }

    #[test]
    fn the_state_table_is_checked() {
        let redis =
            |url: &str| StateConfig { backend: BackendKind::Redis, url: Some(url.into()), ..StateConfig::default() };
        assert!(redis("redis://127.0.0.1:6379").validate().is_ok());
        assert_eq!(StateConfig { url: None, ..redis("x") }.validate().unwrap_err().0, "state.url");
        assert_eq!(redis("rediss://u:pw@h").validate().unwrap_err().0, "state.url");
        let memory_with_url = StateConfig { url: Some("redis://h".into()), ..StateConfig::default() };
        assert_eq!(memory_with_url.validate().unwrap_err().0, "state.url");
        let bad_prefix = StateConfig { key_prefix: "a b*".into(), ..StateConfig::default() };
        assert_eq!(bad_prefix.validate().unwrap_err().0, "state.key_prefix");
    }
}

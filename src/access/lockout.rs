//! Brute-force defences: per-user lockout after repeated wrong passwords, a per-address
//! throttle against password spraying, and a growing delay before every refusal.
//!
//! Only wrong passwords count: a directory or upstream outage is never the user's fault.
//!
//! A password check is reserved before it starts ([`Lockout::reserve`]): the reservation
//! checks the lock and the throttle and counts the attempt as in flight, in one step with
//! no await in between, so a burst of parallel guesses cannot get more checks than the
//! limits allow. The reservation then settles as a failure, a success or, dropped (an
//! outage), as nothing. In a shared store the same step is one atomic operation.
//! Failures are recorded only for users the directory knows, so an attacker cycling
//! through made-up names cannot grow the user table; the address table is pruned.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Address entries kept before expired ones are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// `[lockout]`: thresholds, with defaults for an internet-facing proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutConfig {
    /// Wrong passwords for one user within `window_secs` that lock the user (0: never lock).
    pub max_failures: u32,
    /// The window failures are counted in, seconds.
    pub window_secs: u64,
    /// How long a locked user stays locked, seconds; 0: until an admin lifts the lock
    /// (`postern user unlock USER`).
    pub lock_secs: u64,
    /// Failed logins from one address within `window_secs` after which that address is
    /// refused outright until the window passes (0: never).
    pub max_failures_per_ip: u32,
    /// Delay before answering a refused login, milliseconds; grows with the address's
    /// recent failures.
    pub failure_delay_ms: u64,
    /// Ceiling of the growing delay, milliseconds.
    pub max_failure_delay_ms: u64,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            max_failures: 5,
            window_secs: 15 * 60,
            lock_secs: 30 * 60,
            max_failures_per_ip: 50,
            failure_delay_ms: 2_000,
            max_failure_delay_ms: 15_000,
        }
    }
}

/// How long a lock holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lock {
    /// Until this instant.
    Until(Instant),
    /// Until an admin lifts it (`lock_secs = 0`).
    Indefinite,
}

impl Lock {
    fn holds(self, now: Instant) -> bool {
        match self {
            Lock::Until(until) => until > now,
            Lock::Indefinite => true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Counter {
    failures: u32,
    /// Password checks reserved and not yet settled.
    in_flight: u32,
    window_start: Instant,
    locked_until: Option<Lock>,
}

impl Counter {
    fn new(now: Instant) -> Self {
        Self { failures: 0, in_flight: 0, window_start: now, locked_until: None }
    }

    /// Counts one failure, starting a new window when the old one has passed.
    fn add(&mut self, now: Instant, window: Duration) -> u32 {
        if now.duration_since(self.window_start) >= window {
            self.failures = 0;
            self.window_start = now;
        }
        self.failures = self.failures.saturating_add(1);
        self.failures
    }

    fn current(&self, now: Instant, window: Duration) -> u32 {
        if now.duration_since(self.window_start) >= window { 0 } else { self.failures }
    }

    /// Failures in the window plus checks in flight: what a new check would count against.
    fn committed(&self, now: Instant, window: Duration) -> u32 {
        self.current(now, window).saturating_add(self.in_flight)
    }
}

/// Why a password check may not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The user is locked, or enough checks for the user are already failed or in flight.
    Locked,
    /// The address is throttled, or enough checks from it are already failed or in flight.
    Throttled,
}

/// A password check that counts against the limits until it settles. Dropped unsettled
/// (the directory could not answer), it counts as nothing.
#[derive(Debug)]
#[must_use = "a reservation settles as failed or succeeded, or counts as nothing when dropped"]
pub struct Reservation<'a> {
    lockout: &'a Lockout,
    user: Option<String>,
    ip: IpAddr,
    settled: bool,
}

impl Reservation<'_> {
    /// The password was wrong: the in-flight check becomes a failure of the user and the
    /// address. Returns true when this failure locked the user.
    pub fn failed(mut self) -> bool {
        self.settled = true;
        self.lockout.changed();
        let now = Instant::now();
        let window = self.lockout.window();
        self.release_address(|c| {
            c.add(now, window);
        });
        let Some(user) = self.user.take() else { return false };
        let Some(mut counter) = self.lockout.users.get_mut(&user) else { return false };
        counter.in_flight = counter.in_flight.saturating_sub(1);
        if counter.locked_until.is_some_and(|lock| lock.holds(now)) {
            return false;
        }
        if counter.add(now, window) >= self.lockout.config.max_failures {
            counter.locked_until = Some(match self.lockout.config.lock_secs {
                0 => Lock::Indefinite,
                secs => Lock::Until(now + Duration::from_secs(secs)),
            });
            counter.failures = 0;
            return true;
        }
        false
    }

    /// The password was right. Wrong passwords of the window are not forgiven: the window
    /// bounds the guesses whatever happens between them, so a right password checked in the
    /// middle of a burst of guesses does not open the way for more.
    pub fn succeeded(mut self) {
        self.settled = true;
        self.release(|_| {});
    }

    /// Releases the check in flight of the user and the address.
    fn release(&mut self, then: impl FnOnce(&mut Counter)) {
        self.lockout.changed();
        self.release_address(then);
        if let Some(user) = self.user.take() {
            if let Some(mut counter) = self.lockout.users.get_mut(&user) {
                counter.in_flight = counter.in_flight.saturating_sub(1);
            }
        }
    }

    fn release_address(&self, then: impl FnOnce(&mut Counter)) {
        if let Some(mut counter) = self.lockout.addresses.get_mut(&self.ip) {
            counter.in_flight = counter.in_flight.saturating_sub(1);
            then(&mut counter);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.release(|_| {});
        }
    }
}

/// A user currently locked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    /// The user.
    pub user: String,
    /// Time left until the lock lifts; `None`: until an admin lifts it.
    pub remaining: Option<Duration>,
}

/// Failure counts per user and per client address.
#[derive(Debug)]
pub struct Lockout {
    config: LockoutConfig,
    users: DashMap<String, Counter>,
    addresses: DashMap<IpAddr, Counter>,
    /// Set when a failure, success or unlock changed what [`Lockout::snapshot`] saves.
    dirty: AtomicBool,
}

impl Default for Lockout {
    fn default() -> Self {
        Self::new(LockoutConfig::default())
    }
}

impl Lockout {
    /// Lockout with `config`'s thresholds.
    pub fn new(config: LockoutConfig) -> Self {
        Self { config, users: DashMap::new(), addresses: DashMap::new(), dirty: AtomicBool::new(false) }
    }

    /// The thresholds in force.
    pub fn config(&self) -> &LockoutConfig {
        &self.config
    }

    fn changed(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Marks the counters as changed, so the next save writes them (after a failed save).
    pub fn mark_changed(&self) {
        self.changed();
    }

    /// Whether anything changed since the last call: the saver's cue to write a snapshot.
    pub fn take_changed(&self) -> bool {
        self.dirty.swap(false, Ordering::Relaxed)
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_secs)
    }

    /// Whether `user` is locked now.
    pub fn is_locked(&self, user: &str) -> bool {
        let now = Instant::now();
        self.users.get(user).and_then(|c| c.locked_until).is_some_and(|lock| lock.holds(now))
    }

    /// Whether `ip` has failed so often lately that its logins are refused unchecked.
    pub fn is_throttled(&self, ip: IpAddr) -> bool {
        let limit = self.config.max_failures_per_ip;
        limit > 0 && self.addresses.get(&ip).is_some_and(|c| c.current(Instant::now(), self.window()) >= limit)
    }

    /// Reserves one password check of `user` from `ip`, or refuses it when the user is
    /// locked or the failures and checks in flight already reach a limit. The check and the
    /// count are one step (the user's entry is held while the address's is updated, always
    /// in that order).
    pub fn reserve(&self, user: &str, ip: IpAddr) -> Result<Reservation<'_>, Refused> {
        let now = Instant::now();
        let window = self.window();
        self.prune_addresses(now);
        let user_limit = self.config.max_failures;
        let mut user_entry =
            (user_limit > 0).then(|| self.users.entry(user.to_owned()).or_insert_with(|| Counter::new(now)));
        if let Some(counter) = &user_entry {
            if counter.locked_until.is_some_and(|lock| lock.holds(now)) || counter.committed(now, window) >= user_limit
            {
                return Err(Refused::Locked);
            }
        }
        {
            let mut address = self.addresses.entry(ip).or_insert_with(|| Counter::new(now));
            let ip_limit = self.config.max_failures_per_ip;
            if ip_limit > 0 && address.committed(now, window) >= ip_limit {
                return Err(Refused::Throttled);
            }
            if now.duration_since(address.window_start) >= window {
                address.failures = 0;
                address.window_start = now;
            }
            address.in_flight = address.in_flight.saturating_add(1);
        }
        if let Some(counter) = user_entry.as_mut() {
            if now.duration_since(counter.window_start) >= window {
                counter.failures = 0;
                counter.window_start = now;
            }
            counter.in_flight = counter.in_flight.saturating_add(1);
        }
        Ok(Reservation { lockout: self, user: user_entry.map(|_| user.to_owned()), ip, settled: false })
    }

    /// Records a refused login from `ip` that was not a password check (unknown user,
    /// address not allowed...): it slows and eventually throttles the address.
    pub fn record_address_failure(&self, ip: IpAddr) {
        let now = Instant::now();
        self.prune_addresses(now);
        self.addresses.entry(ip).or_insert_with(|| Counter::new(now)).add(now, self.window());
        self.changed();
    }

    /// Forgets addresses whose window has passed and that have nothing in flight, once the
    /// table is large.
    fn prune_addresses(&self, now: Instant) {
        if self.addresses.len() > PRUNE_ABOVE {
            let window = self.window();
            self.addresses.retain(|_, c| c.in_flight > 0 || now.duration_since(c.window_start) < window);
        }
    }

    /// How long to wait before answering a refused login from `ip`.
    pub fn failure_delay(&self, ip: IpAddr) -> Duration {
        let recent = self.addresses.get(&ip).map_or(0, |c| c.current(Instant::now(), self.window()));
        failure_delay(&self.config, recent)
    }

    /// Lifts `user`'s lock and forgets their failures; true if they were locked.
    pub fn unlock(&self, user: &str) -> bool {
        let now = Instant::now();
        self.changed();
        self.users.remove(user).and_then(|(_, c)| c.locked_until).is_some_and(|lock| lock.holds(now))
    }

    /// Users locked now, with the time left.
    pub fn locked_users(&self) -> Vec<Locked> {
        let now = Instant::now();
        let mut locked: Vec<Locked> = self
            .users
            .iter()
            .filter_map(|e| {
                let remaining = match e.value().locked_until? {
                    Lock::Until(until) if until > now => Some(until - now),
                    Lock::Until(_) => return None,
                    Lock::Indefinite => None,
                };
                Some(Locked { user: e.key().clone(), remaining })
            })
            .collect();
        locked.sort_by(|a, b| a.user.cmp(&b.user));
        locked
    }

    /// The locks and failure counts in force now, with absolute (Unix) times, for saving
    /// across a restart. Checks in flight are not saved: they end with the process.
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_at(unix_ms())
    }

    fn snapshot_at(&self, unix_ms: u64) -> Snapshot {
        let now = Instant::now();
        let window = self.window();
        let at = |instant: Instant| unix_ms.saturating_add(instant.saturating_duration_since(now).as_millis() as u64);
        let save = |c: &Counter| {
            let locked_until_ms = match c.locked_until {
                Some(Lock::Until(until)) if until > now => Some(at(until)),
                _ => None,
            };
            let locked_indefinitely = c.locked_until == Some(Lock::Indefinite);
            let failures = c.current(now, window);
            (failures > 0 || locked_until_ms.is_some() || locked_indefinitely).then(|| SavedCounter {
                failures,
                window_ends_ms: at(c.window_start + window),
                locked_until_ms,
                locked_indefinitely,
            })
        };
        let mut users: Vec<(String, SavedCounter)> =
            self.users.iter().filter_map(|e| save(e.value()).map(|s| (e.key().clone(), s))).collect();
        let mut addresses: Vec<(IpAddr, SavedCounter)> =
            self.addresses.iter().filter_map(|e| save(e.value()).map(|s| (*e.key(), s))).collect();
        users.sort_by(|a, b| a.0.cmp(&b.0));
        addresses.sort_by_key(|a| a.0);
        Snapshot { users, addresses }
    }

    /// Takes over the locks and failure counts of a [`Lockout::snapshot`]; entries whose
    /// lock and window have passed are dropped.
    pub fn restore(&self, snapshot: Snapshot) {
        self.restore_at(snapshot, unix_ms());
    }

    fn restore_at(&self, snapshot: Snapshot, unix_ms: u64) {
        let now = Instant::now();
        let window = self.window();
        let left = |at_ms: u64| Duration::from_millis(at_ms.saturating_sub(unix_ms));
        let load = |saved: &SavedCounter| -> Option<Counter> {
            let locked_until = if saved.locked_indefinitely {
                Some(Lock::Indefinite)
            } else {
                saved.locked_until_ms.map(left).filter(|d| !d.is_zero()).map(|d| Lock::Until(now + d))
            };
            let window_left = left(saved.window_ends_ms).min(window);
            let failures = if window_left.is_zero() { 0 } else { saved.failures };
            if failures == 0 && locked_until.is_none() {
                return None;
            }
            let window_start = now.checked_sub(window - window_left).unwrap_or(now);
            Some(Counter { failures, in_flight: 0, window_start, locked_until })
        };
        for (user, saved) in &snapshot.users {
            if let Some(counter) = load(saved) {
                self.users.insert(user.clone(), counter);
            }
        }
        for (ip, saved) in &snapshot.addresses {
            if let Some(counter) = load(saved) {
                self.addresses.insert(*ip, counter);
            }
        }
    }
}

/// The delay before answering a refused login from an address with `recent` failures in
/// the window: `failure_delay_ms` times the failures, at most `max_failure_delay_ms`.
pub fn failure_delay(config: &LockoutConfig, recent: u32) -> Duration {
    let base = config.failure_delay_ms;
    let grown = base.saturating_mul(u64::from(recent.max(1)));
    Duration::from_millis(grown.min(config.max_failure_delay_ms.max(base)))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// One saved counter: failures in the window, when the window ends and when a lock lifts,
/// as Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCounter {
    /// Failures counted in the window.
    pub failures: u32,
    /// When the failure window ends.
    pub window_ends_ms: u64,
    /// When the lock lifts, if locked for a time.
    pub locked_until_ms: Option<u64>,
    /// Locked until an admin lifts it (`lock_secs = 0`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locked_indefinitely: bool,
}

/// Locks and failure counts saved across a restart (`lockout.json` in the state folder).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Per user.
    pub users: Vec<(String, SavedCounter)>,
    /// Per client address.
    pub addresses: Vec<(IpAddr, SavedCounter)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// One password check that failed; true when it locked the user.
    fn record_failure(l: &Lockout, user: &str, ip: IpAddr) -> bool {
        l.reserve(user, ip).is_ok_and(Reservation::failed)
    }

    fn record_success(l: &Lockout, user: &str) {
        if let Ok(r) = l.reserve(user, "192.0.2.250".parse().unwrap()) {
            r.succeeded();
        }
    }

    fn lockout(max_failures: u32, window_secs: u64, lock_secs: u64) -> Lockout {
        Lockout::new(LockoutConfig { max_failures, window_secs, lock_secs, ..LockoutConfig::default() })
    }

    #[tokio::test(start_paused = true)]
    async fn locks_after_n_failures_in_the_window_and_unlocks_after_the_lock_time() {
        let l = lockout(3, 3600, 3600);
        let a = ip("192.0.2.1");
        assert!(!record_failure(&l, "u", a));
        assert!(!record_failure(&l, "u", a));
        assert!(!l.is_locked("u"));
        assert!(record_failure(&l, "u", a), "the third failure locks");
        assert!(l.is_locked("u"));
        assert!(!l.is_locked("other"));
        assert_eq!(l.locked_users()[0].user, "u");
        tokio::time::advance(Duration::from_secs(3599)).await;
        assert!(l.is_locked("u"));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!l.is_locked("u"));
        assert!(l.locked_users().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_add_up() {
        let l = lockout(3, 60, 600);
        let a = ip("192.0.2.1");
        record_failure(&l, "u", a);
        record_failure(&l, "u", a);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!record_failure(&l, "u", a));
        assert!(!l.is_locked("u"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_forgives_nothing_in_the_window_nor_lifts_a_lock_and_unlock_does() {
        let l = lockout(2, 600, 600);
        let a = ip("192.0.2.1");
        record_failure(&l, "u", a);
        record_success(&l, "u");
        assert!(record_failure(&l, "u", a), "two wrong passwords in the window lock, a right one between or not");
        record_success(&l, "u");
        assert!(l.is_locked("u"), "a right password does not lift a lock");
        assert!(l.unlock("u"));
        assert!(!l.is_locked("u"));
        assert!(!l.unlock("u"));
    }

    #[tokio::test(start_paused = true)]
    async fn lock_secs_zero_locks_until_unlocked_and_survives_a_snapshot() {
        let l = lockout(2, 600, 0);
        let a = ip("192.0.2.1");
        record_failure(&l, "u", a);
        assert!(record_failure(&l, "u", a));
        tokio::time::advance(Duration::from_secs(10 * 365 * 86_400)).await;
        assert!(l.is_locked("u"), "no time lifts it");
        assert_eq!(l.locked_users(), vec![Locked { user: "u".into(), remaining: None }]);
        let json = serde_json::to_string(&l.snapshot()).unwrap();
        assert!(json.contains("\"locked_indefinitely\":true"), "{json}");
        let restored = lockout(2, 600, 0);
        restored.restore_at(serde_json::from_str(&json).unwrap(), unix_ms() + 365 * 86_400_000);
        assert!(restored.is_locked("u"), "the lock survives a restart, however late");
        assert_eq!(restored.reserve("u", a).unwrap_err(), Refused::Locked);
        assert!(restored.unlock("u"));
        assert!(!restored.is_locked("u"));
        assert!(restored.locked_users().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_disables_user_lockout() {
        let l = lockout(0, 600, 600);
        for _ in 0..100 {
            assert!(!record_failure(&l, "u", ip("192.0.2.1")));
        }
        assert!(!l.is_locked("u"));
    }

    #[tokio::test(start_paused = true)]
    async fn addresses_that_spray_are_slowed_then_throttled() {
        let l = Lockout::new(LockoutConfig {
            max_failures_per_ip: 4,
            failure_delay_ms: 100,
            max_failure_delay_ms: 250,
            ..LockoutConfig::default()
        });
        let a = ip("198.51.100.9");
        assert_eq!(l.failure_delay(a), Duration::from_millis(100));
        l.record_address_failure(a);
        l.record_address_failure(a);
        assert_eq!(l.failure_delay(a), Duration::from_millis(200));
        record_failure(&l, "x", a);
        assert_eq!(l.failure_delay(a), Duration::from_millis(250), "capped");
        assert!(!l.is_throttled(a));
        l.record_address_failure(a);
        assert!(l.is_throttled(a));
        assert!(!l.is_throttled(ip("198.51.100.10")));
        tokio::time::advance(Duration::from_secs(15 * 60 + 1)).await;
        assert!(!l.is_throttled(a));
    }

    #[tokio::test(start_paused = true)]
    async fn checks_in_flight_count_against_the_user_and_the_address() {
        let l = Lockout::new(LockoutConfig { max_failures: 2, max_failures_per_ip: 3, ..LockoutConfig::default() });
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let first = l.reserve("u", a).unwrap();
        let second = l.reserve("u", b).unwrap();
        assert_eq!(l.reserve("u", a).unwrap_err(), Refused::Locked, "two checks in flight fill the user's budget");
        drop(first);
        let third = l.reserve("u", a).expect("an unsettled reservation counts as nothing");
        assert!(!second.failed());
        assert!(third.failed(), "the second failure locks");
        assert_eq!(l.reserve("u", a).unwrap_err(), Refused::Locked);
        assert!(l.is_locked("u"));
        let held: Vec<_> = ["v", "w", "x"].iter().map(|u| l.reserve(u, b)).collect();
        assert!(held[0].is_ok() && held[1].is_ok(), "{held:?}");
        assert_eq!(held[2].as_ref().unwrap_err(), &Refused::Throttled, "one failure and two in flight from b");
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_settles_its_reservation() {
        let l = lockout(2, 600, 600);
        let a = ip("192.0.2.1");
        for _ in 0..5 {
            l.reserve("u", a).unwrap().succeeded();
        }
        assert!(!record_failure(&l, "u", a), "successes leave no check in flight behind");
        assert!(!l.is_locked("u"));
    }

    #[test]
    fn concurrent_failures_are_all_counted() {
        let config = LockoutConfig { max_failures: 1000, max_failures_per_ip: 0, ..LockoutConfig::default() };
        let l = std::sync::Arc::new(Lockout::new(config));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                    rt.block_on(async {
                        (0..125).filter(|_| record_failure(&l, "u", "192.0.2.1".parse().unwrap())).count()
                    })
                })
            })
            .collect();
        let locked: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(locked, 1, "exactly the 1000th failure locks, whatever the interleaving");
    }
    #[tokio::test(start_paused = true)]
    async fn a_snapshot_carries_locks_and_failures_over_and_drops_what_expired() {
        let l = lockout(2, 600, 600);
        let a = ip("192.0.2.1");
        record_failure(&l, "u", a);
        record_failure(&l, "u", a);
        record_failure(&l, "v", a);
        l.record_address_failure(ip("192.0.2.2"));
        assert!(l.take_changed() && !l.take_changed());
        let snapshot = l.snapshot();
        let json = serde_json::to_string(&snapshot).unwrap();
        let restored = lockout(2, 600, 600);
        restored.restore(serde_json::from_str(&json).unwrap());
        assert!(restored.is_locked("u"), "the lock survives");
        assert!(record_failure(&restored, "v", a), "v's first failure still counts: the second locks");
        assert_eq!(restored.failure_delay(ip("192.0.2.2")), l.failure_delay(ip("192.0.2.2")));
        let saved_at = unix_ms();
        let snapshot = l.snapshot_at(saved_at);
        let late = lockout(2, 600, 600);
        late.restore_at(snapshot, saved_at + 601_000);
        assert!(!late.is_locked("u"));
        assert!(late.users.is_empty() && late.addresses.is_empty(), "expired entries are dropped");
    }
}

//! Concurrent session limits per user and per client address.
//!
//! A stolen password must not open hundreds of upstream sessions, and one address must not
//! hold every connection slot. Slots are RAII guards: dropping one frees it, however the
//! session ends. Taking a slot is one atomic step under the map's shard lock, so two
//! sessions racing for the last slot cannot both win.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Live session counts with their limits.
#[derive(Debug)]
pub struct SessionLimits {
    per_user: usize,
    per_ip: usize,
    users: DashMap<String, usize>,
    ips: DashMap<IpAddr, usize>,
}

/// A held per-user slot; freed on drop.
#[derive(Debug)]
pub struct UserSlot {
    limits: Arc<SessionLimits>,
    user: String,
}

/// A held per-address slot; freed on drop.
#[derive(Debug)]
pub struct IpSlot {
    limits: Arc<SessionLimits>,
    ip: IpAddr,
}

fn take<K: Eq + Hash + Clone>(map: &DashMap<K, usize>, key: &K, limit: usize) -> bool {
    let mut count = map.entry(key.clone()).or_insert(0);
    if *count >= limit {
        return false;
    }
    *count += 1;
    true
}

fn give_back<K: Eq + Hash>(map: &DashMap<K, usize>, key: &K) {
    map.remove_if_mut(key, |_, count| {
        *count = count.saturating_sub(1);
        *count == 0
    });
}

impl SessionLimits {
    /// Limits of `per_user` logged-in sessions per user and `per_ip` connections per address.
    pub fn new(per_user: usize, per_ip: usize) -> Arc<Self> {
        Arc::new(Self { per_user, per_ip, users: DashMap::new(), ips: DashMap::new() })
    }

    /// The per-user limit.
    pub fn per_user(&self) -> usize {
        self.per_user
    }

    /// The per-address limit.
    pub fn per_ip(&self) -> usize {
        self.per_ip
    }

    /// A slot for another session of `user`, unless the user is at the limit.
    pub fn try_user(self: &Arc<Self>, user: &str) -> Option<UserSlot> {
        take(&self.users, &user.to_owned(), self.per_user)
            .then(|| UserSlot { limits: self.clone(), user: user.to_owned() })
    }

    /// A slot for another connection from `ip`, unless the address is at the limit.
    pub fn try_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        take(&self.ips, &ip, self.per_ip).then(|| IpSlot { limits: self.clone(), ip })
    }

    /// Sessions `user` holds now.
    pub fn user_sessions(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |c| *c)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        give_back(&self.limits.users, &self.user);
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        give_back(&self.limits.ips, &self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_and_freed_on_drop() {
        let limits = SessionLimits::new(2, 1);
        let a = limits.try_user("u").unwrap();
        let b = limits.try_user("u").unwrap();
        assert!(limits.try_user("u").is_none());
        assert!(limits.try_user("v").is_some(), "other users are unaffected");
        drop(a);
        assert_eq!(limits.user_sessions("u"), 1);
        assert!(limits.try_user("u").is_some());
        drop(b);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let slot = limits.try_ip(ip).unwrap();
        assert!(limits.try_ip(ip).is_none());
        drop(slot);
        assert!(limits.try_ip(ip).is_some());
        assert!(limits.ips.is_empty() && limits.users.is_empty(), "freed entries are removed");
    }

    #[test]
    fn racing_sessions_never_exceed_the_limit() {
        let limits = SessionLimits::new(10, 10);
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if let Some(slot) = limits.try_user("u") {
                            held.lock().unwrap().push(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 10);
    }
}

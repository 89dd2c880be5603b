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

/// Live counts with their limits: logged-in sessions per user, connections per address,
/// unfinished TLS handshakes per address, and PROXY protocol headers being read per
/// balancer address.
#[derive(Debug)]
pub struct SessionLimits {
    per_user: usize,
    per_ip: usize,
    handshakes_per_ip: usize,
    proxy_headers_per_ip: usize,
    users: DashMap<String, usize>,
    ips: DashMap<IpAddr, usize>,
    handshakes: DashMap<IpAddr, usize>,
    proxy_headers: DashMap<IpAddr, usize>,
}

/// A held slot in one of the counts; freed on drop.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash> {
    limits: Arc<SessionLimits>,
    count: fn(&SessionLimits) -> &DashMap<K, usize>,
    key: K,
}

/// A held per-user session slot.
pub type UserSlot = Slot<String>;

/// A held per-address connection or handshake slot.
pub type IpSlot = Slot<IpAddr>;

impl<K: Eq + Hash> Drop for Slot<K> {
    fn drop(&mut self) {
        (self.count)(&self.limits).remove_if_mut(&self.key, |_, count| {
            *count = count.saturating_sub(1);
            *count == 0
        });
    }
}

impl SessionLimits {
    /// Limits of `per_user` logged-in sessions per user, `per_ip` connections per address
    /// and `handshakes_per_ip` unfinished TLS handshakes per address; PROXY protocol
    /// headers are not limited (see [`SessionLimits::with_proxy_headers`]).
    pub fn new(per_user: usize, per_ip: usize, handshakes_per_ip: usize) -> Arc<Self> {
        Self::with_proxy_headers(per_user, per_ip, handshakes_per_ip, usize::MAX)
    }

    /// Like [`SessionLimits::new`], with at most `proxy_headers_per_ip` PROXY protocol
    /// headers being read at once from one balancer address.
    pub fn with_proxy_headers(
        per_user: usize,
        per_ip: usize,
        handshakes_per_ip: usize,
        proxy_headers_per_ip: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            per_user,
            per_ip,
            handshakes_per_ip,
            proxy_headers_per_ip,
            users: DashMap::new(),
            ips: DashMap::new(),
            handshakes: DashMap::new(),
            proxy_headers: DashMap::new(),
        })
    }

    /// Takes a slot of `key` in `count` unless it is at `limit`: one atomic step under the
    /// map's shard lock.
    fn take<K: Eq + Hash + Clone>(
        self: &Arc<Self>,
        count: fn(&SessionLimits) -> &DashMap<K, usize>,
        key: K,
        limit: usize,
    ) -> Option<Slot<K>> {
        let mut held = count(self).entry(key.clone()).or_insert(0);
        if *held >= limit {
            return None;
        }
        *held += 1;
        drop(held);
        Some(Slot { limits: self.clone(), count, key })
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
        self.take(|l| &l.users, user.to_owned(), self.per_user)
    }

    /// A slot for another connection from `ip`, unless the address is at the limit.
    pub fn try_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.take(|l| &l.ips, ip, self.per_ip)
    }

    /// A slot for another unfinished TLS handshake from `ip`, unless the address is at the
    /// limit; held until the handshake ends.
    pub fn try_handshake(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.take(|l| &l.handshakes, ip, self.handshakes_per_ip)
    }

    /// A slot for reading another PROXY protocol header from the balancer at `ip`, unless
    /// the address is at the limit; held until the header is read.
    pub fn try_proxy_header(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        self.take(|l| &l.proxy_headers, ip, self.proxy_headers_per_ip)
    }

    /// Sessions `user` holds now.
    pub fn user_sessions(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |c| *c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_limited_and_freed_on_drop() {
        let limits = SessionLimits::new(2, 1, 1);
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
        let handshake = limits.try_handshake(ip).unwrap();
        assert!(limits.try_handshake(ip).is_none());
        assert!(limits.try_ip(ip).is_some(), "handshakes and connections are counted apart");
        drop(handshake);
        assert!(limits.ips.is_empty() && limits.users.is_empty(), "freed entries are removed");
        assert!(limits.handshakes.is_empty());
        let limits = SessionLimits::with_proxy_headers(1, 1, 1, 2);
        let (a, b) = (limits.try_proxy_header(ip).unwrap(), limits.try_proxy_header(ip).unwrap());
        assert!(limits.try_proxy_header(ip).is_none());
        assert!(limits.try_handshake(ip).is_some() && limits.try_ip(ip).is_some(), "counted apart");
        drop((a, b));
        assert!(limits.proxy_headers.is_empty());
    }

    #[test]
    fn racing_sessions_never_exceed_the_limit() {
        let limits = SessionLimits::new(10, 10, 10);
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

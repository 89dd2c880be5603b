//! Requests per client address per minute, in a table of bounded size.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Client addresses tracked at once (a few hundred kilobytes at most). When the table is
/// full, addresses whose minute is over are dropped first, then the longest-tracked one:
/// a flood of new addresses can only give others a fresh minute, never lock them out.
pub const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// The counting window.
const WINDOW: Duration = Duration::from_secs(60);

/// A client over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// When the client may ask again, rounded up to whole seconds.
    pub retry_after_secs: u64,
}

/// Who is counted: an IPv4 address, or an IPv6 /64 (one subscriber's network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(u32),
    V6(u64),
}

impl Client {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Client::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client::V4(v4.into()),
                None => Client::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

/// Counts requests per client in fixed one-minute windows.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    capacity: usize,
    table: Mutex<HashMap<Client, Window>>,
}

impl RateLimiter {
    /// A limiter allowing `per_minute` requests per client address.
    pub fn new(per_minute: u32) -> Self {
        Self::with_capacity(per_minute, MAX_TRACKED_ADDRESSES)
    }

    fn with_capacity(per_minute: u32, capacity: usize) -> Self {
        Self { per_minute: per_minute.max(1), capacity: capacity.max(1), table: Mutex::new(HashMap::new()) }
    }

    /// Counts a request from `ip` at `now`; [`Limited`] when its minute's budget is spent.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        let client = Client::of(ip);
        let mut table = self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !table.contains_key(&client) && table.len() >= self.capacity {
            table.retain(|_, w| now.saturating_duration_since(w.start) < WINDOW);
            if table.len() >= self.capacity {
                if let Some(oldest) = table.iter().min_by_key(|(_, w)| w.start).map(|(c, _)| *c) {
                    table.remove(&oldest);
                }
            }
        }
        let window = table.entry(client).or_insert(Window { start: now, count: 0 });
        if now.saturating_duration_since(window.start) >= WINDOW {
            *window = Window { start: now, count: 0 };
        }
        if window.count >= self.per_minute {
            let left = WINDOW.saturating_sub(now.saturating_duration_since(window.start));
            return Err(Limited { retry_after_secs: left.as_secs() + u64::from(left.subsec_nanos() > 0) });
        }
        window.count += 1;
        Ok(())
    }

    /// How many client addresses are tracked now.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_address_gets_its_budget_per_minute_then_a_retry_time() {
        let limiter = RateLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.check(ip("192.0.2.1"), t0).unwrap();
        }
        assert_eq!(
            limiter.check(ip("192.0.2.1"), t0 + Duration::from_millis(500)),
            Err(Limited { retry_after_secs: 60 })
        );
        assert_eq!(limiter.check(ip("192.0.2.1"), t0 + Duration::from_secs(45)), Err(Limited { retry_after_secs: 15 }));
        limiter.check(ip("192.0.2.2"), t0).expect("another address has its own budget");
        limiter.check(ip("192.0.2.1"), t0 + WINDOW).expect("a new minute");
    }

    #[test]
    fn an_ipv6_64_counts_as_one_client_and_mapped_ipv4_as_its_ipv4() {
        let limiter = RateLimiter::new(2);
        let t0 = Instant::now();
        limiter.check(ip("2001:db8:1:2::1"), t0).unwrap();
        limiter.check(ip("2001:db8:1:2::ffff"), t0).unwrap();
        assert!(limiter.check(ip("2001:db8:1:2:abcd::9"), t0).is_err(), "same /64");
        limiter.check(ip("2001:db8:1:3::1"), t0).expect("another /64");
        limiter.check(ip("198.51.100.7"), t0).unwrap();
        limiter.check(ip("::ffff:198.51.100.7"), t0).unwrap();
        assert!(limiter.check(ip("198.51.100.7"), t0).is_err(), "mapped and plain IPv4 are one client");
    }

    #[test]
    fn the_table_stays_bounded_and_a_flood_never_locks_out_a_newcomer() {
        let limiter = RateLimiter::with_capacity(1, 100);
        let t0 = Instant::now();
        for n in 0..1000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + n);
            limiter.check(IpAddr::V4(a), t0 + Duration::from_millis(u64::from(n))).unwrap();
            assert!(limiter.tracked() <= 100);
        }
        limiter.check(ip("203.0.113.9"), t0 + Duration::from_secs(1)).expect("a new address is served");
        assert_eq!(limiter.tracked(), 100);
        // Finished windows go first, so the recent heavy users are still counted.
        assert!(limiter.check(ip("10.0.3.231"), t0 + Duration::from_secs(1)).is_err(), "999th address still tracked");
    }
}

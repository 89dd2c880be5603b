//! The shared counters in Redis (or Valkey), for several instances behind a load balancer.
//!
//! Keys, all under the configured prefix `P`:
//!
//! | key                 | type       | what                                               |
//! |---------------------|------------|----------------------------------------------------|
//! | `P:lock:USER`       | string     | the user is locked; expires when the lock lifts    |
//! |                     |            | (no expiry with `lock_secs = 0`: until unlocked)   |
//! | `P:fail:user:USER`  | counter    | wrong passwords in the window; expires with it     |
//! | `P:fail:ip:IP`      | counter    | failed logins from the address in the window       |
//! | `P:fly:user:USER`   | sorted set | password checks in flight, scored by their expiry  |
//! | `P:fly:ip:IP`       | sorted set | the same per address                               |
//! | `P:sessions:USER`   | sorted set | logged-in sessions, scored by their expiry         |
//!
//! A reservation (lock, failures and checks in flight against the limits, then the count in
//! flight) is one Lua script, and so is each settlement: Redis runs a script alone, so
//! instances racing for the last check cannot both win. Times are the server's (`TIME`),
//! so the instances' clocks do not matter. Entries in flight expire after
//! [`IN_FLIGHT_TTL`] and session entries after [`SESSION_TTL`] unless refreshed, so a
//! crashed instance frees what it held.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use prometheus_client::metrics::gauge::Gauge;
use rand::RngCore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script};

use super::StoreError;
use crate::access::lockout::{Locked, LockoutConfig, Refused};
use crate::secret::Secret;

/// How long a password check counts as in flight at most (a crashed instance's checks stop
/// counting after this).
pub const IN_FLIGHT_TTL: Duration = Duration::from_secs(300);

/// How long a session entry lives without a refresh.
pub const SESSION_TTL: Duration = Duration::from_secs(90);

/// How often held sessions are refreshed and the store's health checked.
const TICK: Duration = Duration::from_secs(1);

/// Refresh sessions every this many ticks.
const REFRESH_EVERY_TICKS: u32 = 30;

/// Longest wait for one store operation; longer counts as the store being down.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

const NOW: &str =
    "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS: lock, user failures, user in flight, address failures, address in flight.
/// ARGV: member, in-flight ttl ms, user limit, address limit. 0 ok, 1 locked, 2 throttled.
const RESERVE: &str = r"
local ttl, ulimit, alimit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ulimit > 0 then
  if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if tonumber(redis.call('GET', KEYS[2]) or '0') + redis.call('ZCARD', KEYS[3]) >= ulimit then return 1 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
if alimit > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') + redis.call('ZCARD', KEYS[5]) >= alimit then return 2 end
redis.call('ZADD', KEYS[5], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[5], ttl)
if ulimit > 0 then
  redis.call('ZADD', KEYS[3], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ttl)
end
return 0
";

/// KEYS as [`RESERVE`]. ARGV: member, window ms, lock ms (0: until unlocked), user limit,
/// has user (1/0). 1 when this failure locked the user.
const FAILED: &str = r"
redis.call('ZREM', KEYS[5], ARGV[1])
if redis.call('INCR', KEYS[4]) == 1 then redis.call('PEXPIRE', KEYS[4], ARGV[2]) end
if ARGV[5] ~= '1' then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local failures = redis.call('INCR', KEYS[2])
if failures == 1 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if failures >= tonumber(ARGV[4]) then
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], now, 'PX', ARGV[3])
  else
    redis.call('SET', KEYS[1], now)
  end
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
";

/// KEYS as [`RESERVE`]. ARGV: member, succeeded (1/0). Ends a check without a failure.
const RELEASE: &str = r"
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
return 0
";

/// KEYS: address failures. ARGV: window ms.
const ADDRESS_FAILURE: &str = r"
if redis.call('INCR', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
";

/// KEYS: sessions. ARGV: member, ttl ms, limit. 1 when the slot was taken.
const TAKE_SESSION: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// KEYS: sessions. ARGV: member, ttl ms. Re-adds a held session (also after the server
/// lost its data).
const REFRESH_SESSION: &str = r"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
";

fn script(body: &str) -> Script {
    Script::new(&format!("{NOW}{body}"))
}

struct Scripts {
    reserve: Script,
    failed: Script,
    release: Script,
    address_failure: Script,
    take_session: Script,
    refresh_session: Script,
}

/// Checks a `[state] url`: `redis://` or `rediss://`, no password in it.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| "expected redis://host:port or rediss://host:port (TLS)".to_owned())?;
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@') {
        if userinfo.contains(':') {
            return Err("do not put the password in the URL: use state.password_file".into());
        }
    }
    url.into_connection_info().map(|_| ()).map_err(|e| e.to_string())
}

/// Whether the store answers: the `postern_state_store_up` gauge and a log line on change.
struct Health {
    up: AtomicBool,
    gauge: Gauge,
}

impl Health {
    fn report(&self, up: bool, error: Option<&str>) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.gauge.set(i64::from(up));
            if up {
                tracing::warn!("state store is back up; shared counters in use again");
            } else {
                tracing::warn!(error = error.unwrap_or_default(), "state store is down");
            }
        }
    }
}

/// The counters in a Redis server, shared by every instance using the same prefix.
pub struct RedisCounters {
    connection: ConnectionManager,
    prefix: String,
    instance: String,
    config: LockoutConfig,
    per_user: usize,
    /// Sessions this instance holds: member → user, refreshed every few seconds.
    held: DashMap<String, String>,
    health: Health,
    scripts: Scripts,
}

impl RedisCounters {
    /// A client of `url` (connected lazily, reconnecting with backoff) and the task that
    /// checks its health and refreshes this instance's sessions.
    pub fn connect(
        url: &str,
        password: Option<Secret>,
        prefix: &str,
        config: LockoutConfig,
        per_user: usize,
        gauge: Gauge,
    ) -> Result<Arc<Self>, String> {
        let mut info = url.into_connection_info().map_err(|e| e.to_string())?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password.expose().trim_end_matches(['\n', '\r']));
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        let manager = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(100))
            .set_max_delay(Duration::from_secs(2))
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT));
        let connection = ConnectionManager::new_lazy_with_config(client, manager).map_err(|e| e.to_string())?;
        let mut instance = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut instance);
        gauge.set(1);
        let counters = Arc::new(Self {
            connection,
            prefix: prefix.to_owned(),
            instance: instance.iter().map(|b| format!("{b:02x}")).collect(),
            config,
            per_user,
            held: DashMap::new(),
            health: Health { up: AtomicBool::new(true), gauge },
            scripts: Scripts {
                reserve: script(RESERVE),
                failed: script(FAILED),
                release: script(RELEASE),
                address_failure: script(ADDRESS_FAILURE),
                take_session: script(TAKE_SESSION),
                refresh_session: script(REFRESH_SESSION),
            },
        });
        tokio::spawn(tend(Arc::downgrade(&counters)));
        Ok(counters)
    }

    /// Whether the last store operation succeeded.
    pub fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Relaxed)
    }

    fn key(&self, kind: &str, name: impl std::fmt::Display) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn lockout_keys(&self, user: &str, ip: IpAddr) -> [String; 5] {
        [
            self.key("lock", user),
            self.key("fail:user", user),
            self.key("fly:user", user),
            self.key("fail:ip", ip),
            self.key("fly:ip", ip),
        ]
    }

    fn member(&self) -> String {
        format!("{}:{:016x}", self.instance, rand::rngs::OsRng.next_u64())
    }

    /// Runs one store operation with a deadline, reporting the store's health.
    async fn run<T, F>(&self, operation: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = match tokio::time::timeout(OP_TIMEOUT, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError(e.to_string())),
            Err(_) => Err(StoreError(format!("no answer within {OP_TIMEOUT:?}"))),
        };
        self.health.report(result.is_ok(), result.as_ref().err().map(|e| e.0.as_str()));
        result
    }

    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let mut connection = self.connection.clone();
        self.run(async move { invocation.invoke_async(&mut connection).await }).await
    }

    /// Whether `ip` is throttled or `user` locked (reads only).
    pub async fn precheck(&self, user: &str, ip: IpAddr) -> Result<Option<Refused>, StoreError> {
        let mut connection = self.connection.clone();
        let keys = [self.key("fail:ip", ip), self.key("lock", user)];
        let (failures, lock): (Option<u32>, Option<String>) =
            self.run(async move { connection.mget(&keys).await }).await?;
        let limit = self.config.max_failures_per_ip;
        Ok(if limit > 0 && failures.unwrap_or(0) >= limit {
            Some(Refused::Throttled)
        } else if self.config.max_failures > 0 && lock.is_some() {
            Some(Refused::Locked)
        } else {
            None
        })
    }

    /// Reserves one password check (one script: check and count together).
    pub async fn reserve(
        self: &Arc<Self>,
        user: &str,
        ip: IpAddr,
    ) -> Result<Result<SharedReservation, Refused>, StoreError> {
        let keys = self.lockout_keys(user, ip);
        let member = self.member();
        let args = [
            member.clone(),
            IN_FLIGHT_TTL.as_millis().to_string(),
            self.config.max_failures.to_string(),
            self.config.max_failures_per_ip.to_string(),
        ];
        let answer: i64 = self.invoke(&self.scripts.reserve, &keys, &args).await?;
        Ok(match answer {
            0 => Ok(SharedReservation {
                store: self.clone(),
                keys,
                member,
                counts_user: self.config.max_failures > 0,
                settled: false,
            }),
            2 => Err(Refused::Throttled),
            _ => Err(Refused::Locked),
        })
    }

    /// Counts a non-password refusal from `ip`.
    pub async fn record_address_failure(&self, ip: IpAddr) -> Result<(), StoreError> {
        let window = (self.config.window_secs * 1000).to_string();
        self.invoke::<i64>(&self.scripts.address_failure, &[self.key("fail:ip", ip)], &[window]).await.map(|_| ())
    }

    /// Failed logins from `ip` in the window.
    pub async fn address_failures(&self, ip: IpAddr) -> Result<u32, StoreError> {
        let mut connection = self.connection.clone();
        let key = self.key("fail:ip", ip);
        let failures: Option<u32> = self.run(async move { connection.get(&key).await }).await?;
        Ok(failures.unwrap_or(0))
    }

    /// Lifts `user`'s lock and forgets their failures; true if they were locked.
    pub async fn unlock(&self, user: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let (lock, failures) = (self.key("lock", user), self.key("fail:user", user));
        let (deleted, _): (u32, u32) = self
            .run(async move { redis::pipe().atomic().del(&lock).del(&failures).query_async(&mut connection).await })
            .await?;
        Ok(deleted > 0)
    }

    /// Users locked now, with the time left (none for a lock without expiry).
    pub async fn locked_users(&self) -> Result<Vec<Locked>, StoreError> {
        let mut connection = self.connection.clone();
        let pattern = format!("{}:lock:*", self.prefix);
        let keys: Vec<String> = self
            .run(async {
                let mut iter: redis::AsyncIter<String> = connection.scan_match(&pattern).await?;
                let mut keys = Vec::new();
                while let Some(key) = iter.next_item().await {
                    keys.push(key?);
                }
                Ok(keys)
            })
            .await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.pttl(key);
        }
        let mut connection = self.connection.clone();
        let ttls: Vec<i64> = self.run(async move { pipe.query_async(&mut connection).await }).await?;
        let strip = format!("{}:lock:", self.prefix);
        let mut locked: Vec<Locked> = keys
            .iter()
            .zip(ttls)
            // PTTL: -2 the key is gone, -1 it has no expiry (locked until unlocked).
            .filter(|(_, ttl)| *ttl > 0 || *ttl == -1)
            .filter_map(|(key, ttl)| {
                let user = key.strip_prefix(&strip)?.to_owned();
                let remaining = (ttl > 0).then(|| Duration::from_millis(ttl.unsigned_abs()));
                Some(Locked { user, remaining })
            })
            .collect();
        locked.sort_by(|a, b| a.user.cmp(&b.user));
        Ok(locked)
    }

    /// A session slot for `user`, unless the user holds the limit over all instances.
    pub async fn try_user(self: &Arc<Self>, user: &str) -> Result<Option<SharedSlot>, StoreError> {
        let member = self.member();
        let key = self.key("sessions", user);
        let args = [member.clone(), SESSION_TTL.as_millis().to_string(), self.per_user.to_string()];
        let taken: i64 = self.invoke(&self.scripts.take_session, std::slice::from_ref(&key), &args).await?;
        if taken != 1 {
            return Ok(None);
        }
        self.held.insert(member.clone(), user.to_owned());
        Ok(Some(SharedSlot { store: self.clone(), key, member }))
    }

    async fn refresh_sessions(&self) {
        let held: Vec<(String, String)> = self.held.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        for (member, user) in held {
            let key = self.key("sessions", &user);
            let ttl = SESSION_TTL.as_millis().to_string();
            if self.invoke::<i64>(&self.scripts.refresh_session, &[key], &[member, ttl]).await.is_err() {
                return;
            }
        }
    }

    async fn ping(&self) {
        let mut connection = self.connection.clone();
        let _ = self.run(async move { redis::cmd("PING").query_async::<String>(&mut connection).await }).await;
    }
}

/// Checks the store every [`TICK`] (so the gauge follows it without traffic) and refreshes
/// held sessions; ends when the store is dropped.
async fn tend(store: Weak<RedisCounters>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        store.ping().await;
        ticks = ticks.wrapping_add(1);
        if ticks % REFRESH_EVERY_TICKS == 0 && store.is_up() {
            store.refresh_sessions().await;
        }
    }
}

/// Runs `settle` on the runtime when a guard is dropped outside a settlement.
fn spawn_settlement(future: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(future);
    }
}

/// A password check counted in flight in the store.
#[must_use = "a reservation settles as failed or succeeded, or counts as nothing when dropped"]
pub struct SharedReservation {
    store: Arc<RedisCounters>,
    keys: [String; 5],
    member: String,
    counts_user: bool,
    settled: bool,
}

impl std::fmt::Debug for SharedReservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedReservation").field("member", &self.member).finish_non_exhaustive()
    }
}

impl SharedReservation {
    /// The password was wrong; true when this failure locked the user.
    pub async fn failed(mut self) -> bool {
        self.settled = true;
        let config = &self.store.config;
        let args = [
            self.member.clone(),
            (config.window_secs * 1000).to_string(),
            (config.lock_secs * 1000).to_string(),
            config.max_failures.to_string(),
            if self.counts_user { "1" } else { "0" }.to_owned(),
        ];
        match self.store.invoke::<i64>(&self.store.scripts.failed, &self.keys, &args).await {
            Ok(locked) => locked == 1,
            Err(e) => {
                tracing::warn!(error = %e, "could not count a wrong password in the state store");
                false
            }
        }
    }

    /// The password was right: the user's failures start again.
    pub async fn succeeded(mut self) {
        self.settled = true;
        let args = [self.member.clone(), "1".to_owned()];
        let _ = self.store.invoke::<i64>(&self.store.scripts.release, &self.keys, &args).await;
    }
}

impl Drop for SharedReservation {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let (store, keys, args) = (self.store.clone(), self.keys.clone(), [self.member.clone(), "0".to_owned()]);
        spawn_settlement(async move {
            let _ = store.invoke::<i64>(&store.scripts.release, &keys, &args).await;
        });
    }
}

/// A session slot held in the store; given back on drop.
pub struct SharedSlot {
    store: Arc<RedisCounters>,
    key: String,
    member: String,
}

impl std::fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlot").field("key", &self.key).finish_non_exhaustive()
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        self.store.held.remove(&self.member);
        let (store, key, member) = (self.store.clone(), self.key.clone(), self.member.clone());
        spawn_settlement(async move {
            let mut connection = store.connection.clone();
            let _ = store.run(async move { connection.zrem::<_, _, i64>(&key, &member).await }).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redis_or_rediss_without_a_password() {
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
        assert!(check_url("rediss://redis.internal:6380/2").is_ok());
        assert!(check_url("rediss://postern@redis.internal:6380").is_ok());
        assert!(check_url("rediss://postern:secret@redis.internal").unwrap_err().contains("password_file"));
        assert!(check_url("http://redis.internal").is_err());
    }
}

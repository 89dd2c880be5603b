//! The four workloads, each against one target address.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

use crate::client::Imap;

/// Where a workload connects and how it logs in.
#[derive(Clone)]
pub struct Target {
    /// Column name.
    pub name: &'static str,
    /// The address clients connect to.
    pub addr: SocketAddr,
    /// TLS to the target (always, except for a plaintext reference).
    pub tls: Option<TlsConnector>,
    /// `(user, password)` of bench user `i` as this target expects it.
    pub credentials: Arc<dyn Fn(usize) -> (String, String) + Send + Sync>,
    /// Process whose memory is measured (with its children), if any.
    pub pid: Option<u32>,
}

impl Target {
    async fn session(&self, user: usize) -> std::io::Result<Imap> {
        let mut imap = Imap::connect(self.addr, self.tls.as_ref()).await?;
        let (name, password) = (self.credentials)(user);
        imap.login(&name, &password).await?;
        Ok(imap)
    }
}

/// What the FETCH loop measured.
pub struct Throughput {
    /// MB/s (10^6 bytes).
    pub mb_per_sec: f64,
    /// The target's CPU time per 100 MB moved, milliseconds (when its process is known).
    pub cpu_ms_per_100mb: Option<f64>,
    /// The message size.
    pub size: usize,
}

/// `fetches` whole-message FETCHes of message 1 of user 0, after one warm-up FETCH.
pub async fn throughput(target: &Target, fetches: usize) -> std::io::Result<Throughput> {
    let mut imap = target.session(0).await?;
    imap.command("SELECT INBOX").await?;
    let size = imap.command("FETCH 1 BODY.PEEK[]").await?;
    let cpu_before = target.pid.map(crate::targets::cpu_secs);
    let start = Instant::now();
    let mut total = 0;
    for _ in 0..fetches {
        total += imap.command("FETCH 1 BODY.PEEK[]").await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = target.pid.map(crate::targets::cpu_secs).zip(cpu_before).map(|(after, before)| after - before);
    imap.logout().await?;
    Ok(Throughput {
        mb_per_sec: total as f64 / elapsed / 1e6,
        cpu_ms_per_100mb: cpu.map(|c| c * 1e3 / (total as f64 / 1e8)),
        size,
    })
}

/// Logins per second, latency quantiles and errors.
pub struct LoginRate {
    /// Completed connect + LOGIN + LOGOUT cycles per second.
    pub per_sec: f64,
    /// Median cycle time.
    pub p50: Duration,
    /// 99th percentile cycle time.
    pub p99: Duration,
    /// Failed cycles.
    pub errors: usize,
}

/// `clients` concurrent loops of TLS connect + LOGIN + LOGOUT for `duration`.
pub async fn logins(target: &Target, clients: usize, users: usize, duration: Duration) -> LoginRate {
    let deadline = Instant::now() + duration;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let (mut times, mut errors) = (Vec::new(), 0);
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let cycle = async {
                    let imap = target.session(i % users).await?;
                    imap.logout().await
                };
                match tokio::time::timeout(Duration::from_secs(30), cycle).await {
                    Ok(Ok(())) => times.push(t.elapsed()),
                    _ => errors += 1,
                }
                i += clients;
            }
            (times, errors)
        }));
    }
    let (mut times, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (t, e) = task.await.unwrap_or_default();
        times.extend(t);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    times.sort();
    LoginRate { per_sec: times.len() as f64 / elapsed, p50: quantile(&times, 0.5), p99: quantile(&times, 0.99), errors }
}

/// The `q` quantile of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Median and 99th percentile of `rounds` NOOP round trips on one logged-in session.
pub async fn noop_latency(target: &Target, rounds: usize) -> std::io::Result<(Duration, Duration)> {
    let mut imap = target.session(0).await?;
    imap.command("SELECT INBOX").await?;
    for _ in 0..50 {
        imap.command("NOOP").await?;
    }
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        imap.command("NOOP").await?;
        times.push(t.elapsed());
    }
    imap.logout().await?;
    times.sort();
    Ok((quantile(&times, 0.5), quantile(&times, 0.99)))
}

/// Memory of idle sessions.
pub struct Idle {
    /// Sessions that reached IDLE.
    pub sessions: usize,
    /// Sessions that failed on the way.
    pub errors: usize,
    /// The target's RSS before, KiB.
    pub before_kib: u64,
    /// The target's RSS with every session idle, KiB.
    pub after_kib: u64,
}

impl Idle {
    /// RSS growth per idle session, KiB.
    pub fn per_session_kib(&self) -> f64 {
        (self.after_kib.saturating_sub(self.before_kib)) as f64 / self.sessions.max(1) as f64
    }
}

/// Opens `n` sessions (logged in, INBOX selected, in IDLE), measures the target's RSS, then
/// drops them all.
pub async fn idle_memory(target: &Target, n: usize, users: usize, rss: impl Fn() -> u64) -> Idle {
    // Warm up the allocator and lazy state with a few sessions first.
    for i in 0..4 {
        if let Ok(imap) = target.session(i % users).await {
            let _ = imap.logout().await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Sessions of an earlier run (an earlier round's idle sessions) must be gone from the
    // target before the baseline is read.
    closed(target).await;
    let before_kib = rss();
    let gate = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let target = target.clone();
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await.ok()?;
            let open = async {
                let mut imap = target.session(i % users).await?;
                imap.command("SELECT INBOX").await?;
                imap.idle().await?;
                Ok::<_, std::io::Error>(imap)
            };
            match tokio::time::timeout(Duration::from_secs(60), open).await {
                Ok(Ok(imap)) => Some(imap),
                Ok(Err(e)) => {
                    eprintln!("  {}: session {i}: {e}", target.name);
                    None
                }
                Err(_) => None,
            }
        }));
    }
    let mut open = Vec::with_capacity(n);
    let mut errors = 0;
    for task in tasks {
        match task.await.ok().flatten() {
            Some(imap) => open.push(imap),
            None => errors += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_kib = rss();
    let sessions = open.len();
    drop(open);
    // Let the target notice the closes before the next workload.
    tokio::time::sleep(Duration::from_secs(2)).await;
    closed(target).await;
    Idle { sessions, errors, before_kib, after_kib }
}

/// Waits (up to 60 s) until the target holds no client connection; says so when it still
/// does.
async fn closed(target: &Target) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = crate::targets::open_connections(target.addr.port());
        if open == 0 {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("  {}: {open} connections still open after 60 s", target.name);
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

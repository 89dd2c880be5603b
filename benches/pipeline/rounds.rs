//! The side-by-side comparison in rounds: each target's process runs for the whole
//! comparison, and every round runs every workload against every target in turn, so slow
//! drift of the machine (load, heat, other work) falls on all targets alike. The order of
//! the targets is rotated by one each round, so no target always follows the same one.
//!
//! Idle memory is the exception: an allocator keeps what a process's earlier sessions freed
//! and hands it to the next ones, so a process that has held sessions before grows little
//! or not at all for new ones (a second round on the same process measured 0.1–1.5 KiB per
//! session where the first measured 23–41). Each idle measurement, for each round and
//! session count, therefore runs on a fresh instance of the proxy, started for it and
//! stopped after it.

use std::path::Path;
use std::time::Duration;

use crate::load::{self, Idle, LoginRate, Target};
use crate::targets::{self, Proxy};
use crate::{Env, Plan};

/// One column of the comparison.
pub struct Contender {
    /// Where the workloads connect (a process started once for the whole comparison).
    pub target: Target,
    /// The proxy to start afresh for each idle measurement; `None` for Dovecot direct,
    /// whose memory is not measured.
    pub proxy: Option<Proxy>,
}

/// Where and with what fresh instances start.
pub struct Setting<'a> {
    /// The servers and files every proxy is configured with.
    pub env: &'a Env<'a>,
    /// The bench folder; each fresh instance gets a folder in it.
    pub dir: &'a Path,
    /// The number of bench users.
    pub users: usize,
}

/// What one round measured against one target.
#[derive(Default)]
pub struct Sample {
    /// FETCH throughput, MB/s.
    pub throughput: Option<f64>,
    /// The target's CPU time per 100 MB of FETCH, ms.
    pub cpu_per_100mb: Option<f64>,
    /// Per concurrency level.
    pub logins: Vec<(usize, LoginRate)>,
    /// Per session count.
    pub idle: Vec<(usize, Idle)>,
    /// NOOP p50 and p99.
    pub noop: Option<(Duration, Duration)>,
    /// The target's RSS after the round's workloads, KiB (0 when its process is not known).
    pub rss_kib: u64,
}

impl Sample {
    /// The login workload at `clients` concurrent loops.
    pub fn logins(&self, clients: usize) -> Option<&LoginRate> {
        self.logins.iter().find(|(c, _)| *c == clients).map(|(_, rate)| rate)
    }

    /// The idle workload with `n` sessions.
    pub fn idle(&self, n: usize) -> Option<&Idle> {
        self.idle.iter().find(|(c, _)| *c == n).map(|(_, idle)| idle)
    }
}

/// What one target measured: one sample per round, in round order.
pub struct Row {
    /// Column name.
    pub name: &'static str,
    /// `rounds[r]` is round `r + 1`.
    pub rounds: Vec<Sample>,
}

/// Indices into the target list in the order round `round` (from 0) measures them.
fn order(count: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..count).map(move |i| (i + round) % count)
}

/// Runs `plan.rounds` rounds of every workload against every contender.
pub async fn run(contenders: &[Contender], setting: &Setting<'_>, plan: &Plan) -> Vec<Row> {
    let mut rows: Vec<Row> = contenders.iter().map(|c| Row { name: c.target.name, rounds: Vec::new() }).collect();
    for round in 0..plan.rounds {
        for i in order(contenders.len(), round) {
            eprintln!("== round {}/{}: {}", round + 1, plan.rounds, contenders[i].target.name);
            rows[i].rounds.push(measure(&contenders[i], round, setting, plan).await);
        }
    }
    rows
}

/// How the rounds ran, for the conditions.
pub fn describe(contenders: &[Contender], rounds: usize) -> String {
    let orders: Vec<String> = (0..rounds)
        .map(|round| {
            let names: Vec<&str> = order(contenders.len(), round).map(|i| contenders[i].target.name).collect();
            format!("round {}: {}", round + 1, names.join(", "))
        })
        .collect();
    format!(
        "{rounds} rounds against the same processes, every workload against every target in each round, the targets \
         in turn and their order rotated by one each round ({}); idle memory on a fresh instance of each proxy for \
         each round and session count (a process reuses what its earlier sessions freed)",
        orders.join("; ")
    )
}

/// Every workload against one contender, once.
async fn measure(contender: &Contender, round: usize, setting: &Setting<'_>, plan: &Plan) -> Sample {
    let (target, users) = (&contender.target, setting.users);
    let mut sample = Sample::default();
    if let Some(proxy) = contender.proxy {
        for &n in &plan.sessions {
            let dir = setting.dir.join(format!("{}-idle-{n}-round-{}", proxy.name(), round + 1));
            let Some(idle) = idle_memory(proxy, target, n, &dir, setting).await else { continue };
            eprintln!(
                "  idle {n}: {} sessions, {} errors, RSS {} -> {} KiB, {:.1} KiB/session",
                idle.sessions,
                idle.errors,
                idle.before_kib,
                idle.after_kib,
                idle.per_session_kib()
            );
            sample.idle.push((n, idle));
        }
    }
    match load::noop_latency(target, plan.noops).await {
        Ok(latency) => sample.noop = Some(latency),
        Err(e) => eprintln!("  NOOP latency failed: {e}"),
    }
    match load::throughput(target, plan.fetches).await {
        Ok(t) => {
            eprintln!(
                "  throughput: {:.0} MB/s, {:?} CPU ms per 100 MB ({} byte message)",
                t.mb_per_sec, t.cpu_ms_per_100mb, t.size
            );
            sample.throughput = Some(t.mb_per_sec);
            sample.cpu_per_100mb = t.cpu_ms_per_100mb;
        }
        Err(e) => eprintln!("  throughput failed: {e}"),
    }
    for &clients in &plan.clients {
        let rate = load::logins(target, clients, users, Duration::from_secs(plan.login_secs)).await;
        eprintln!(
            "  logins x{clients}: {:.0}/s p50 {:?} p99 {:?} errors {}",
            rate.per_sec, rate.p50, rate.p99, rate.errors
        );
        sample.logins.push((clients, rate));
        // Let TIME_WAIT sockets and the target's backlog settle between levels.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(pid) = target.pid {
        sample.rss_kib = targets::rss_kib(pid);
    }
    sample
}

/// The idle workload with `n` sessions on a fresh instance of `proxy` (configured like
/// `target`'s), stopped afterwards.
async fn idle_memory(proxy: Proxy, target: &Target, n: usize, dir: &Path, setting: &Setting<'_>) -> Option<Idle> {
    let (process, addr) = proxy.start(dir, setting.env).await?;
    let pid = process.pid();
    let fresh = Target { addr, pid: Some(pid), ..target.clone() };
    Some(load::idle_memory(&fresh, n, setting.users, || targets::rss_kib(pid)).await)
}

//! A/B comparison of Postern builds in one invocation: each round starts every build in
//! turn (A B A B ...), each time a fresh process, and measures the same workloads, so the
//! machine's load falls on every build alike.
//!
//! `POSTERN_BENCH_TARGETS=ab POSTERN_BENCH_AB=zero-on-free=target/release/postern,system=/tmp/postern-system`
//! names the builds (`name=path`; a path of `current` is this tree's release binary). Per
//! round and build: RSS per idle session at each `POSTERN_BENCH_SESSIONS` count, CPU ms per
//! 100 MB of FETCH, logins/s and CPU ms per login at each `POSTERN_BENCH_CLIENTS` level.
//!
//! With `POSTERN_BENCH_CALLGRIND=1` every build runs under `valgrind --tool=callgrind` and
//! the section reports instructions executed by the proxy (`callgrind_control` dumps around
//! each phase) per 100 MB relayed and per login: counts that do not depend on the load of
//! the machine. Idle memory is skipped there (valgrind's own memory would dominate), and
//! the wall-clock figures of that mode mean nothing.
//!
//! With `POSTERN_BENCH_MASSIF=1` every build runs under `valgrind --tool=massif` and only
//! the idle workload runs: detailed heap snapshots (`vgdb ... detailed_snapshot`) are taken
//! before the sessions open and while they are idle, as `massif.before.N` and
//! `massif.idle.N` in the bench folder (`POSTERN_KEEP_TEST_DIRS=1` keeps it), for
//! `ms_print` to show what each idle session's heap is made of.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::client::Imap;
use crate::load::{self, Target};
use crate::stats::Spread;
use crate::targets::{self, Extra};
use crate::{Env, Plan};

/// One build under comparison.
pub struct Build {
    /// Label in the results.
    pub name: String,
    /// The `postern` binary.
    pub path: PathBuf,
}

/// The builds named by `POSTERN_BENCH_AB`.
pub fn builds() -> Vec<Build> {
    let spec = std::env::var("POSTERN_BENCH_AB").unwrap_or_else(|_| "current=current".into());
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (name, path) = item.split_once('=').unwrap_or((item, item));
            let path = match path.trim() {
                "current" => targets::postern_binary(),
                p => PathBuf::from(p),
            };
            assert!(path.is_file(), "POSTERN_BENCH_AB: {} is not a file", path.display());
            Build { name: name.trim().to_owned(), path }
        })
        .collect()
}

/// What one round measured for one build.
#[derive(Default)]
struct Sample {
    /// KiB per idle session, per session count.
    idle: Vec<(usize, f64)>,
    /// CPU ms of the proxy per 100 MB of FETCH.
    cpu_per_100mb: Option<f64>,
    /// FETCH MB/s.
    mb_per_sec: Option<f64>,
    /// Instructions per 100 MB of FETCH (callgrind).
    ir_per_100mb: Option<f64>,
    /// Per client level.
    logins: Vec<Level>,
}

/// The login workload at one concurrency.
#[derive(Clone, Copy)]
struct Level {
    clients: usize,
    per_sec: f64,
    cpu_ms: Option<f64>,
    /// Instructions per login (callgrind).
    instructions: Option<f64>,
    /// Heap allocations per login (callgrind).
    allocations: Option<f64>,
}

/// The proxy's callgrind counters, read by dumping them (a dump also zeroes them).
struct Callgrind {
    pid: u32,
    dir: PathBuf,
}

impl Callgrind {
    /// Zeroes the counters.
    fn zero(&mut self) {
        let _ = Command::new("callgrind_control").args(["-z", &self.pid.to_string()]).output();
    }

    /// Instructions executed and heap allocations made (calls of `malloc`, `calloc`,
    /// `realloc` and the aligned allocators) since the last zero or dump.
    fn dump(&mut self) -> Option<(f64, f64)> {
        let out = Command::new("callgrind_control").args(["-d", &self.pid.to_string()]).output().ok()?;
        if !out.status.success() {
            eprintln!("  callgrind_control -d failed: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        // Dumps are numbered parts of the out file: the newest is the highest part.
        let part = |p: &Path| p.file_name()?.to_str()?.strip_prefix("callgrind.out.")?.parse::<usize>().ok();
        let newest = std::fs::read_dir(&self.dir).ok()?.flatten().map(|e| e.path()).max_by_key(|p| part(p))?;
        let text = std::fs::read_to_string(&newest).ok()?;
        let line = text.lines().find(|l| l.starts_with("summary:") || l.starts_with("totals:"))?;
        let instructions = line.split_whitespace().nth(1)?.parse().ok()?;
        // Uncompressed names (`--compress-strings=no`): each call site is a `cfn=NAME`
        // line followed by `calls=COUNT ...`.
        const ALLOCATORS: [&str; 6] = ["malloc", "calloc", "realloc", "posix_memalign", "aligned_alloc", "memalign"];
        let mut allocations = 0.0;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(name) = line.strip_prefix("cfn=") else { continue };
            if ALLOCATORS.contains(&name.trim()) {
                let calls =
                    lines.next().and_then(|l| l.strip_prefix("calls=")?.split_whitespace().next()?.parse().ok());
                allocations += calls.unwrap_or(0.0);
            }
        }
        Some((instructions, allocations))
    }
}

/// Runs the comparison and returns its section of the results file.
pub async fn compare(env: &Env<'_>, template: &Target, plan: &Plan, users: usize, dir: &Path) -> String {
    let builds = builds();
    let callgrind = std::env::var("POSTERN_BENCH_CALLGRIND").as_deref() == Ok("1");
    let massif = std::env::var("POSTERN_BENCH_MASSIF").as_deref() == Ok("1");
    let mut samples: Vec<Vec<Sample>> = builds.iter().map(|_| Vec::new()).collect();
    for round in 0..plan.rounds {
        for (index, build) in builds.iter().enumerate() {
            let sub = dir.join(format!("ab-{round}-{index}"));
            std::fs::create_dir_all(&sub).expect("ab dir");
            eprintln!("== round {} {} ({})", round + 1, build.name, build.path.display());
            let extra = Extra {
                binary: Some(build.path.clone()),
                valgrind: if callgrind {
                    Some(("callgrind", sub.clone()))
                } else if massif {
                    Some(("massif", sub.clone()))
                } else {
                    None
                },
                ..Extra::default()
            };
            let (process, addr) = targets::postern_with(&sub, env.issued, env.slapd, env.dovecot, env.users, &extra);
            let pid = process.pid();
            let target = Target { name: "ab", addr, pid: Some(pid), ..template.clone() };
            if massif {
                heap_snapshots(&target, plan, users, &sub).await;
                continue;
            }
            let mut counter = callgrind.then(|| Callgrind { pid, dir: sub.clone() });
            samples[index].push(measure(&target, plan, users, counter.as_mut()).await);
            drop(process);
        }
    }
    report(&builds, &samples, plan, callgrind)
}

/// Heap snapshots of a build under massif before and with each count of idle sessions.
async fn heap_snapshots(target: &Target, plan: &Plan, users: usize, dir: &Path) {
    let pid = target.pid.expect("a process");
    for &n in &plan.sessions {
        let taken = std::cell::Cell::new(0);
        let snapshot = || {
            let name = if taken.get() == 0 { "before" } else { "idle" };
            taken.set(taken.get() + 1);
            let file = dir.join(format!("massif.{name}.{n}"));
            let status = Command::new("vgdb")
                .args([&format!("--pid={pid}"), "detailed_snapshot", file.to_str().expect("utf-8 path")])
                .output();
            match status {
                Ok(out) if out.status.success() => eprintln!("  heap snapshot {}", file.display()),
                Ok(out) => eprintln!("  vgdb failed: {}", String::from_utf8_lossy(&out.stderr)),
                Err(e) => eprintln!("  vgdb: {e}"),
            }
            targets::rss_kib(pid)
        };
        let idle = load::idle_memory(target, n, users, snapshot).await;
        eprintln!("  idle {n}: {} sessions, {} errors", idle.sessions, idle.errors);
    }
}

async fn measure(target: &Target, plan: &Plan, users: usize, mut callgrind: Option<&mut Callgrind>) -> Sample {
    let pid = target.pid.expect("a process");
    let mut sample = Sample::default();
    if callgrind.is_none() {
        for &n in &plan.sessions {
            let idle = load::idle_memory(target, n, users, || targets::rss_kib(pid)).await;
            eprintln!("  idle {n}: {:.1} KiB/session ({} errors)", idle.per_session_kib(), idle.errors);
            sample.idle.push((n, idle.per_session_kib()));
        }
    }
    match fetches(target, plan.fetches, callgrind.as_deref_mut()).await {
        Ok((bytes, secs, cpu, ir)) => {
            sample.mb_per_sec = Some(bytes / secs / 1e6);
            sample.cpu_per_100mb = Some(cpu * 1e3 / (bytes / 1e8));
            sample.ir_per_100mb = ir.map(|ir| ir / (bytes / 1e8));
            eprintln!(
                "  FETCH: {:.0} MB/s, {:.0} CPU ms/100 MB, {:?} instructions/100 MB",
                bytes / secs / 1e6,
                cpu * 1e3 / (bytes / 1e8),
                sample.ir_per_100mb
            );
        }
        Err(e) => eprintln!("  FETCH failed: {e}"),
    }
    for &clients in &plan.clients {
        // Warm-up: the upstream's TLS session cache, LDAP connections.
        let _ = load::logins(target, clients.min(4), users, Duration::from_millis(500)).await;
        if let Some(c) = callgrind.as_deref_mut() {
            c.zero();
        }
        let cpu_before = targets::cpu_secs(pid);
        let rate = load::logins(target, clients, users, Duration::from_secs(plan.login_secs)).await;
        let cpu = targets::cpu_secs(pid) - cpu_before;
        let counted = callgrind.as_deref_mut().and_then(Callgrind::dump);
        let count = rate.per_sec * plan.login_secs as f64;
        let cpu_per_login = (count > 0.0).then(|| cpu * 1e3 / count);
        let ir_per_login = counted.filter(|_| count > 0.0).map(|(ir, _)| ir / count);
        let allocs_per_login = counted.filter(|_| count > 0.0).map(|(_, a)| a / count);
        eprintln!(
            "  logins x{clients}: {:.0}/s, {cpu_per_login:?} CPU ms, {ir_per_login:?} instructions and \
             {allocs_per_login:?} allocations per login, {} errors",
            rate.per_sec, rate.errors
        );
        sample.logins.push(Level {
            clients,
            per_sec: rate.per_sec,
            cpu_ms: cpu_per_login,
            instructions: ir_per_login,
            allocations: allocs_per_login,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    sample
}

/// `n` whole-message FETCHes after a warm-up one: bytes, seconds, proxy CPU seconds and
/// (under callgrind) instructions.
async fn fetches(
    target: &Target,
    n: usize,
    mut callgrind: Option<&mut Callgrind>,
) -> std::io::Result<(f64, f64, f64, Option<f64>)> {
    let mut imap = Imap::connect(target.addr, target.tls.as_ref()).await?;
    let (user, password) = (target.credentials)(0);
    imap.login(&user, &password).await?;
    imap.command("SELECT INBOX").await?;
    imap.command("FETCH 1 BODY.PEEK[]").await?;
    if let Some(c) = callgrind.as_deref_mut() {
        c.zero();
    }
    let pid = target.pid.expect("a process");
    let cpu_before = targets::cpu_secs(pid);
    let start = Instant::now();
    let mut total = 0;
    for _ in 0..n {
        total += imap.command("FETCH 1 BODY.PEEK[]").await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = targets::cpu_secs(pid) - cpu_before;
    let ir = callgrind.and_then(Callgrind::dump).map(|(ir, _)| ir);
    imap.logout().await?;
    Ok((total as f64, secs, cpu, ir))
}

fn report(builds: &[Build], samples: &[Vec<Sample>], plan: &Plan, callgrind: bool) -> String {
    let mut out = format!(
        "## A/B of Postern builds ({} rounds, builds alternating{})\n\n",
        plan.rounds,
        if callgrind { ", under callgrind: instruction counts; wall and CPU figures are valgrind's" } else { "" }
    );
    for b in builds {
        let _ = writeln!(out, "- {}: `{}`", b.name, b.path.display());
    }
    let _ = write!(out, "\nMedian (min–max) of the rounds.\n\n| workload |");
    for b in builds {
        let _ = write!(out, " {} |", b.name);
    }
    let _ = write!(out, "\n|---|{}\n", "---:|".repeat(builds.len()));
    let mut line = |label: String, get: &dyn Fn(&Sample) -> Option<f64>, scale: f64, digits: usize| {
        let cells: Vec<String> = samples.iter().map(|s| spread(s.iter().filter_map(get), scale, digits)).collect();
        if cells.iter().all(|c| c == "-") {
            return;
        }
        let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
    };
    for &n in &plan.sessions {
        line(
            format!("idle KiB/session, {n} sessions in IDLE"),
            &move |s| s.idle.iter().find(|(c, _)| *c == n).map(|(_, k)| *k),
            1.0,
            1,
        );
    }
    line("instructions per 100 MB of FETCH, millions".into(), &|s| s.ir_per_100mb, 1e6, 0);
    line("CPU ms per 100 MB of FETCH".into(), &|s| s.cpu_per_100mb, 1.0, 0);
    line(format!("FETCH {} MiB x{}, MB/s", plan.message_mb, plan.fetches), &|s| s.mb_per_sec, 1.0, 0);
    for &clients in &plan.clients {
        let level = move |s: &Sample| s.logins.iter().find(|l| l.clients == clients).copied();
        line(format!("instructions per login, {clients} clients, thousands"), &move |s| level(s)?.instructions, 1e3, 0);
        line(format!("heap allocations per login, {clients} clients"), &move |s| level(s)?.allocations, 1.0, 0);
        line(format!("CPU ms per login, {clients} clients"), &move |s| level(s)?.cpu_ms, 1.0, 2);
        line(format!("logins/s, {clients} clients"), &move |s| level(s).map(|l| l.per_sec), 1.0, 0);
    }
    out
}

/// Median and range of `values / scale`, formatted with `digits` decimals.
fn spread(values: impl Iterator<Item = f64>, scale: f64, digits: usize) -> String {
    Spread::of(values.map(|x| x / scale)).map_or_else(|| "-".into(), |s| s.show(digits))
}

//! Two Postern instances behind HAProxy in TCP mode (round robin, PROXY protocol v2), once
//! with each instance's own memory counters (`lb-memory`) and once sharing them in one
//! Redis (`lb-redis`): what the shared state costs a login.
//!
//! Only the login workload runs (and one NOOP latency measurement per target), in rounds
//! that alternate the targets (A B A B ...) so both see the same machine load. Then the
//! store's own part of a login is timed alone, call by call, for both backends, next to a
//! bare Redis round trip on loopback.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Plan;
use crate::common::redis::Redis;
use crate::load::{self, LoginRate, Target};
use crate::stats::median;
use crate::targets::{self, Extra, Process};

/// Two Postern instances behind one HAProxy, and the processes to stop afterwards.
pub struct Balanced {
    /// Where clients connect (HAProxy's frontend).
    pub target: Target,
    /// The Postern instances' process ids.
    pub postern_pids: Vec<u32>,
    /// HAProxy first, so it stops before the instances behind it.
    _processes: Vec<Process>,
}

/// Starts two Postern instances with `state` as their `[state]` table, and HAProxy in front;
/// `None` when HAProxy is not installed.
pub fn start(name: &'static str, dir: &Path, env: &crate::Env<'_>, state: &str, template: &Target) -> Option<Balanced> {
    let extra = Extra {
        imap: "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n".into(),
        tables: state.into(),
        ..Extra::default()
    };
    let mut instances = Vec::new();
    for i in 0..2 {
        let sub = dir.join(format!("postern{i}"));
        std::fs::create_dir_all(&sub).expect("instance dir");
        instances.push(targets::postern_with(&sub, env.issued, env.slapd, env.dovecot, env.users, &extra));
    }
    let backends: Vec<SocketAddr> = instances.iter().map(|(_, addr)| *addr).collect();
    let (haproxy, addr) = targets::haproxy_balancer(dir, &backends)?;
    let postern_pids = instances.iter().map(|(p, _)| p.pid()).collect();
    let mut processes = vec![haproxy];
    processes.extend(instances.into_iter().map(|(p, _)| p));
    Some(Balanced { target: Target { name, addr, pid: None, ..template.clone() }, postern_pids, _processes: processes })
}

/// One login run of one target.
struct Run {
    round: usize,
    target: usize,
    clients: usize,
    rate: LoginRate,
    /// CPU seconds of both Postern instances during the run.
    postern_cpu: f64,
    /// CPU seconds of redis-server during the run (lb-redis only).
    redis_cpu: Option<f64>,
    /// One-minute load average just before the run.
    load: f64,
}

/// Runs the comparison and returns its section of the results file.
pub async fn compare(targets: &[Balanced], redis: &Redis, plan: &Plan, users: usize, rounds: usize) -> String {
    let redis_pid = redis.pid();
    let mut noops = Vec::new();
    for t in targets {
        eprintln!("== {}", t.target.name);
        // Warm up: TLS session caches, LDAP connections, the store's connection.
        let _ = load::logins(&t.target, 4, users, Duration::from_secs(1)).await;
        noops.push(load::noop_latency(&t.target, plan.noops).await.ok());
    }
    let mut runs = Vec::new();
    for round in 0..rounds {
        for (index, t) in targets.iter().enumerate() {
            for &clients in &plan.clients {
                let load = load_average();
                let cpu = |pids: &[u32]| pids.iter().map(|p| targets::cpu_secs(*p)).sum::<f64>();
                let (postern_before, redis_before) = (cpu(&t.postern_pids), redis_pid.map(targets::cpu_secs));
                let rate = load::logins(&t.target, clients, users, Duration::from_secs(plan.login_secs)).await;
                let postern_cpu = cpu(&t.postern_pids) - postern_before;
                let redis_cpu = (t.target.name == "lb-redis")
                    .then(|| redis_pid.map(targets::cpu_secs).zip(redis_before).map(|(a, b)| a - b))
                    .flatten();
                eprintln!(
                    "  round {} {} x{clients}: {:.0}/s p50 {:?} p99 {:?} errors {} (load {load:.2})",
                    round + 1,
                    t.target.name,
                    rate.per_sec,
                    rate.p50,
                    rate.p99,
                    rate.errors
                );
                runs.push(Run { round, target: index, clients, rate, postern_cpu, redis_cpu, load });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    eprintln!("timing the store's calls alone ...");
    let memory = store_probe(None, 2000).await;
    let shared = store_probe(Some(&redis.url()), 2000).await;
    let ping = ping_latency(redis.port, 2000).await;
    report(targets, &noops, &runs, plan, rounds, &[("memory", memory), ("redis", shared)], ping)
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The store calls of one successful login, in the order the decision makes them.
const STEPS: [&str; 4] = [
    "precheck: lock and address throttle (`MGET`)",
    "reserve the password check (script)",
    "settle it as succeeded (script)",
    "take a session slot (script)",
];

/// Per step and in total: median and 99th percentile of `n` logins' store calls, made one
/// after the other by this process (no other load on the store).
async fn store_probe(redis_url: Option<&str>, n: usize) -> Vec<(Duration, Duration)> {
    use postern::access::lockout::LockoutConfig;
    use postern::access::slots::SessionLimits;
    use postern::access::store::{BackendKind, CounterStore, StateConfig};
    let dir = tempfile::tempdir().expect("probe dir");
    let config = match redis_url {
        Some(url) => StateConfig {
            backend: BackendKind::Redis,
            url: Some(url.to_owned()),
            key_prefix: "probe".into(),
            ..StateConfig::default()
        },
        None => StateConfig::default(),
    };
    let store = CounterStore::open(
        &config,
        LockoutConfig::default(),
        SessionLimits::new(100_000, 100_000, 100_000),
        dir.path(),
        dir.path(),
        &postern::metrics::Metrics::new(),
    )
    .expect("counter store");
    let ip: IpAddr = [127, 0, 0, 1].into();
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); STEPS.len() + 1];
    for i in 0..n + 100 {
        let user = format!("probe{}@example.com", i % 100);
        let mut took = [Duration::ZERO; STEPS.len()];
        let mut t = Instant::now();
        let mut lap = |step: usize, t: &mut Instant| {
            took[step] = t.elapsed();
            *t = Instant::now();
        };
        let refused = store.precheck(&user, ip).await.expect("precheck");
        assert!(refused.is_none(), "probe user refused");
        lap(0, &mut t);
        let reservation = store.reserve(&user, ip).await.expect("reserve");
        lap(1, &mut t);
        reservation.succeeded().await;
        lap(2, &mut t);
        let slot = store.try_user(&user).await.expect("session slot").expect("slot free");
        lap(3, &mut t);
        // Given back when the session ends, in a spawned task: not on the login's path.
        // Let it finish so it does not overlap the next login's calls.
        drop(slot);
        if redis_url.is_some() {
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if i >= 100 {
            for (step, d) in took.iter().enumerate() {
                times[step].push(*d);
            }
            times[STEPS.len()].push(took.iter().sum());
        }
    }
    times
        .iter_mut()
        .map(|t| {
            t.sort();
            (load::quantile(t, 0.5), load::quantile(t, 0.99))
        })
        .collect()
}

/// Median and 99th percentile of `n` `PING` round trips to Redis on one plain TCP
/// connection: the floor of any store call.
async fn ping_latency(port: u16, n: usize) -> Option<(Duration, Duration)> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let mut buf = [0u8; 64];
    let mut times = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t = Instant::now();
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut got = 0;
        while !buf[..got].ends_with(b"\r\n") {
            got += stream.read(&mut buf[got..]).await.ok().filter(|r| *r > 0)?;
        }
        if i >= 100 {
            times.push(t.elapsed());
        }
    }
    times.sort();
    Some((load::quantile(&times, 0.5), load::quantile(&times, 0.99)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn report(
    targets: &[Balanced],
    noops: &[Option<(Duration, Duration)>],
    runs: &[Run],
    plan: &Plan,
    rounds: usize,
    probes: &[(&str, Vec<(Duration, Duration)>)],
    ping: Option<(Duration, Duration)>,
) -> String {
    let mut out = String::new();
    let names: Vec<&str> = targets.iter().map(|t| t.target.name).collect();
    let _ = writeln!(
        out,
        "## Two instances behind HAProxy: memory vs Redis state\n\n\
         HAProxy in TCP mode (`balance roundrobin`, `send-proxy-v2`, no TLS of its own) in front of two \
         Postern instances (release binary, LDAP directory, `proxy_protocol = true`); `lb-memory`: each \
         instance on `[state] backend = \"memory\"`, `lb-redis`: both on one `redis-server` \
         (`--save \"\" --appendonly no`, loopback). {rounds} rounds of {} s per level, targets alternating \
         ({}); a login is TLS connect + LOGIN + LOGOUT, each on a new connection.\n",
        plan.login_secs,
        (0..rounds).map(|_| names.join(", ")).collect::<Vec<_>>().join(", ")
    );
    let mut header = "| workload |".to_owned();
    let mut rule = "|---|".to_owned();
    for name in &names {
        header += &format!(" {name} |");
        rule += "---:|";
    }
    let _ = writeln!(out, "{header} redis - memory |\n{rule}---:|");
    let select = |target: usize, clients: usize| -> Vec<&Run> {
        runs.iter().filter(|r| r.target == target && r.clients == clients).collect()
    };
    for &clients in &plan.clients {
        let mut rates = Vec::new();
        let mut p50s = Vec::new();
        let mut rate_line = format!("| logins/s, {clients} clients: median of {rounds} (min–max) |");
        let mut latency_line = format!("| login p50 / p99 ms, {clients} clients (median of rounds) |");
        let mut cpu_line = format!("| CPU ms per login, {clients} clients: both instances (+ redis-server) |");
        for index in 0..targets.len() {
            let chosen = select(index, clients);
            let per_sec: Vec<f64> = chosen.iter().map(|r| r.rate.per_sec).collect();
            let (min, max) = per_sec.iter().fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
            let rate = median(&per_sec);
            let p50 = median(&chosen.iter().map(|r| ms(r.rate.p50)).collect::<Vec<_>>());
            let p99 = median(&chosen.iter().map(|r| ms(r.rate.p99)).collect::<Vec<_>>());
            let errors: usize = chosen.iter().map(|r| r.rate.errors).sum();
            let logins: f64 = chosen.iter().map(|r| r.rate.per_sec * plan.login_secs as f64).sum();
            let postern_cpu: f64 = chosen.iter().map(|r| r.postern_cpu).sum();
            let redis_cpu: Option<f64> = chosen.iter().map(|r| r.redis_cpu).sum();
            rate_line += &format!(" {rate:.0} ({min:.0}–{max:.0}){} |", errors_note(errors));
            latency_line += &format!(" {p50:.1} / {p99:.1} |");
            cpu_line += &match redis_cpu {
                Some(r) => format!(" {:.2} (+ {:.2}) |", postern_cpu * 1e3 / logins, r * 1e3 / logins),
                None => format!(" {:.2} |", postern_cpu * 1e3 / logins),
            };
            rates.push(rate);
            p50s.push(p50);
        }
        let (rate_diff, p50_diff) = match (rates.as_slice(), p50s.as_slice()) {
            ([m, r], [pm, pr]) => (format!("{:+.1}%", (r / m - 1.0) * 100.0), format!("{:+.2} ms (p50)", pr - pm)),
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(out, "{rate_line} {rate_diff} |\n{latency_line} {p50_diff} |\n{cpu_line} - |");
    }
    let mut noop_line = "| NOOP round trip p50 / p99, µs (one session) |".to_owned();
    for noop in noops {
        noop_line += &match noop {
            Some((p50, p99)) => format!(" {:.0} / {:.0} |", us(*p50), us(*p99)),
            None => " - |".into(),
        };
    }
    let _ = writeln!(out, "{noop_line} - |\n");

    let _ = writeln!(
        out,
        "Every run, in the order they ran (load: one-minute load average just before):\n\n\
         | round | target | clients | logins/s | p50 ms | p99 ms | errors | load |\n|---:|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {} | {:.2} |",
            r.round + 1,
            names[r.target],
            r.clients,
            r.rate.per_sec,
            ms(r.rate.p50),
            ms(r.rate.p99),
            r.rate.errors,
            r.load
        );
    }

    let _ = writeln!(
        out,
        "\nThe store's part of one successful login, timed alone: the bench calls Postern's \
         `CounterStore` the way the access decision does, one login after the other (2000 logins, \
         no other load on the store; the Redis client is the daemon's, one multiplexed connection). \
         Median / 99th percentile, µs:\n\n| store call | {} |\n|---|{}",
        probes.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(probes.len())
    );
    for (step, name) in STEPS.iter().chain(std::iter::once(&"all four, per login")).enumerate() {
        let cells: Vec<String> =
            probes.iter().map(|(_, t)| format!("{:.1} / {:.1}", us(t[step].0), us(t[step].1))).collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    if let Some((p50, p99)) = ping {
        let _ = writeln!(
            out,
            "| (a bare `PING` round trip to the same redis-server, raw TCP) | - | {:.1} / {:.1} |",
            us(p50),
            us(p99)
        );
    }
    let _ = writeln!(out, "\nLoad average at the end of the comparison: {}.", {
        let l = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    });
    out
}

fn errors_note(errors: usize) -> String {
    if errors == 0 { String::new() } else { format!(", {errors} errors") }
}

/// Starts Redis and the balanced targets named in `wanted` (`lb-memory`, `lb-redis`), in
/// that order; `None` when HAProxy is missing.
pub fn start_all(dir: &Path, env: &crate::Env<'_>, template: &Target, wanted: &str) -> Option<(Redis, Vec<Balanced>)> {
    let redis = Redis::start();
    let mut list = Vec::new();
    for (name, state) in [
        ("lb-memory", "[state]\nbackend = \"memory\"\n".to_owned()),
        ("lb-redis", format!("[state]\nbackend = \"redis\"\nurl = {:?}\nkey_prefix = \"bench\"\n", redis.url())),
    ] {
        if !wanted.contains(name) {
            continue;
        }
        let sub = dir.join(name);
        std::fs::create_dir_all(&sub).expect("target dir");
        list.push(start(name, &sub, env, &state, template)?);
    }
    Some((redis, list))
}

//! End-to-end pipeline benchmark: Postern against the proxies an operator would otherwise
//! deploy, same workload, same run, all on loopback.
//!
//! Starts the test CA, a real slapd and a real Dovecot (IMAPS, plus plaintext IMAP for nginx),
//! then each target once — Dovecot directly, Postern (release binary, LDAP directory),
//! HAProxy TLS-to-TLS and nginx's mail proxy when installed — and measures, in
//! `POSTERN_BENCH_ROUNDS` rounds (default 3) with every target in each round, in turn, the
//! order rotated by one each round (see `rounds.rs`):
//!
//! 1. throughput: whole-message FETCH of a large message, repeated (MB/s);
//! 2. login rate: concurrent TLS connect + LOGIN + LOGOUT loops (logins/s, p50/p99);
//! 3. idle memory: N sessions logged in and in IDLE, RSS growth per session, each round and
//!    session count on a fresh instance of the proxy (a process that held sessions before
//!    reuses the memory they freed and would hardly grow);
//! 4. added latency: NOOP round trip, minus Dovecot's own in the same round.
//!
//! Prints a table, each cell the median of the rounds with their range (`253 (241–260)`),
//! Postern's ratios to the other proxies of the medians, and writes it (with conditions and
//! a `perf` profile of Postern's login path, taken once after the rounds) to
//! `benches/results/latest.md`.
//!
//! Two more targets, not in the default list, put HAProxy in TCP mode (round robin,
//! `send-proxy-v2`) in front of two Postern instances with `proxy_protocol = true`:
//! `lb-memory` (each instance on the memory state backend) and `lb-redis` (both sharing one
//! redis-server started here). They run the login workload only (and one NOOP latency
//! measurement), in `POSTERN_BENCH_ROUNDS` rounds alternating the targets, then time the
//! state store's calls of one login alone (see `lb.rs`).
//!
//! ```sh
//! cargo bench --bench pipeline
//! POSTERN_BENCH_SESSIONS=1000,10000 cargo bench --bench pipeline
//! POSTERN_BENCH_TARGETS=lb-memory,lb-redis POSTERN_BENCH_CLIENTS=1,50 POSTERN_BENCH_LOGIN_SECS=3 \
//!     POSTERN_BENCH_OUT=benches/results/lb-state.md cargo bench --bench pipeline
//! ```
//!
//! Knobs (environment): `POSTERN_BENCH_SESSIONS` (idle sessions, comma list, default 1000),
//! `POSTERN_BENCH_CLIENTS` (login concurrency, default 1,50,500), `POSTERN_BENCH_LOGIN_SECS`
//! (per level, default 4), `POSTERN_BENCH_MESSAGE_MB` (default 32), `POSTERN_BENCH_FETCHES`
//! (default 8), `POSTERN_BENCH_TARGETS` (default direct,postern,haproxy,nginx),
//! `POSTERN_BENCH_PERF` (0 to skip the profile), `POSTERN_BENCH_OUT` (results file),
//! `POSTERN_BENCH_ROUNDS` (rounds of the side-by-side table and of the `lb-*` and `ab`
//! comparisons, default 3), `POSTERN_BENCH_AB` and `POSTERN_BENCH_CALLGRIND` (the `ab` target:
//! builds of Postern compared in one run, see `ab.rs`), `POSTERN_BENCH_SOAK_MINUTES` and
//! `POSTERN_BENCH_SOAK_SAMPLE_SECS` (the `soak` target, run alone: mixed load on one Postern
//! for 20 minutes, its memory, descriptors and tasks sampled each minute, written to
//! `benches/results/soak.md`; see `soak.rs`).

#[path = "../../tests/it/common/mod.rs"]
#[allow(dead_code, unused_imports, clippy::all)]
mod common;

mod ab;
mod client;
mod lb;
mod load;
mod report;
mod rounds;
mod soak;
mod stats;
mod targets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use common::dovecot::{self, Tuning};
use load::Target;
use rounds::Contender;
use targets::Proxy;

/// One bench user: LDAP password for Postern and nginx, Dovecot password for the rest.
pub struct User {
    /// Mail address (also the Dovecot login).
    pub mail: String,
    /// Directory password.
    pub password: String,
    /// Upstream (Dovecot) password.
    pub upstream_password: String,
}

/// The servers and files every Postern target is configured with.
pub struct Env<'a> {
    /// Postern's certificate.
    pub issued: &'a common::pki::Issued,
    /// The LDAP directory.
    pub slapd: &'a common::slapd::Slapd,
    /// The upstream.
    pub dovecot: &'a common::dovecot::Dovecot,
    /// The bench users.
    pub users: &'a Users,
}

/// All bench users.
pub struct Users {
    /// In index order.
    pub list: Vec<User>,
}

/// The bench folder, kept when `POSTERN_KEEP_TEST_DIRS` is set (logs of every target).
struct Keep(Option<tempfile::TempDir>);

impl Keep {
    fn path(&self) -> &std::path::Path {
        self.0.as_ref().map(|d| d.path()).unwrap_or(std::path::Path::new("/tmp"))
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        if std::env::var_os("POSTERN_KEEP_TEST_DIRS").is_some() {
            if let Some(dir) = self.0.take() {
                let _ = dir.keep();
            }
        }
    }
}

/// A free loopback address for a listener.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name).unwrap_or_else(|_| default.into()).split(',').filter_map(|s| s.trim().parse().ok()).collect()
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(default)
}

/// The bench's workload sizes.
pub struct Plan {
    /// Idle-session counts.
    pub sessions: Vec<usize>,
    /// Login concurrency levels.
    pub clients: Vec<usize>,
    /// Seconds per login level.
    pub login_secs: u64,
    /// Message size, MiB.
    pub message_mb: usize,
    /// Timed FETCHes.
    pub fetches: usize,
    /// NOOP round trips.
    pub noops: usize,
    /// Rounds of the side-by-side table and of the `lb-*` and `ab` comparisons.
    pub rounds: usize,
}

fn main() {
    // `cargo bench` passes `--bench`; filters make no sense for this harness.
    let plan = Plan {
        sessions: env_list("POSTERN_BENCH_SESSIONS", "1000"),
        clients: env_list("POSTERN_BENCH_CLIENTS", "1,50,500"),
        login_secs: env_num("POSTERN_BENCH_LOGIN_SECS", 4) as u64,
        message_mb: env_num("POSTERN_BENCH_MESSAGE_MB", 32),
        fetches: env_num("POSTERN_BENCH_FETCHES", 8),
        noops: 2000,
        rounds: env_num("POSTERN_BENCH_ROUNDS", 3).max(1),
    };
    let peers = std::env::var("POSTERN_BENCH_TARGETS").unwrap_or_else(|_| "direct,postern,haproxy,nginx".into());
    let max_sessions = plan.sessions.iter().copied().max().unwrap_or(0);
    // The clients hold one descriptor per session; raise our own limit (root may).
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &std::process::id().to_string(), &format!("--nofile={0}:{0}", targets::NOFILE)])
        .status();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(run(plan, &peers, max_sessions));
}

async fn run(plan: Plan, peers: &str, max_sessions: usize) {
    let mut conditions = format!(
        "{}\n- a session's task future in this tree's release build: {} bytes (the session itself runs boxed)",
        report::conditions(),
        output_size(postern::session::run::<postern::tls::stream::ServerTls<tokio::net::TcpStream>>)
    );
    eprintln!("starting slapd and Dovecot ...");
    let pki = common::pki::pki();
    let slapd = common::slapd::slapd();
    let dovecot = dovecot::dovecot_tuned(Tuning {
        plain_imap: true,
        max_clients: (max_sessions + 1000) as u32,
        ..Tuning::default()
    });
    let user_count = 100;
    let users = Users {
        list: (0..user_count)
            .map(|i| User {
                mail: format!("bench{i}@example.com"),
                password: format!("dir-{i}-Pw7"),
                upstream_password: format!("up-{i}-Qk4"),
            })
            .collect(),
    };
    eprintln!("adding {} users ...", users.list.len());
    for (i, user) in users.list.iter().enumerate() {
        slapd.add_user(&format!("bench{i}"), &user.mail, &user.password, &[]);
    }
    let pairs: Vec<(&str, &str)> = users.list.iter().map(|u| (u.mail.as_str(), u.upstream_password.as_str())).collect();
    dovecot.add_users(&pairs);
    dovecot.deliver(&users.list[0].mail, &message(plan.message_mb));

    let dir = tempfile::Builder::new().prefix("postern-bench-").tempdir().expect("bench dir");
    if std::env::var_os("POSTERN_KEEP_TEST_DIRS").is_some() {
        eprintln!("keeping {}", dir.path().display());
    }
    let dir = Keep(Some(dir));
    let issued = pki.issue_in("proxy", dir.path());
    let tls = client::connector(&pki.ca_file);
    let users = Arc::new(users);
    let directory_login = {
        let users = users.clone();
        Arc::new(move |i: usize| (users.list[i].mail.clone(), users.list[i].password.clone()))
            as Arc<dyn Fn(usize) -> (String, String) + Send + Sync>
    };
    let upstream_login = {
        let users = users.clone();
        Arc::new(move |i: usize| (users.list[i].mail.clone(), users.list[i].upstream_password.clone()))
            as Arc<dyn Fn(usize) -> (String, String) + Send + Sync>
    };

    let env = Env { issued: &issued, slapd, dovecot, users: &users };
    if peers.split(',').any(|p| p.trim() == "soak") {
        return soak::run(&env, &tls, dir.path(), &conditions).await;
    }
    // The side-by-side comparison: each proxy started once, then every workload in rounds.
    let direct = Target {
        name: report::DIRECT,
        addr: dovecot.imaps,
        tls: Some(tls.clone()),
        credentials: upstream_login.clone(),
        pid: None,
    };
    let mut contenders = Vec::new();
    if peers.contains("direct") {
        contenders.push(Contender { target: direct.clone(), proxy: None });
    }
    let mut processes = Vec::new();
    let mut profiled = None;
    for (proxy, name, credentials) in [
        (Proxy::Postern, report::POSTERN, &directory_login),
        (Proxy::Haproxy, "HAProxy TLS-TLS", &upstream_login),
        (Proxy::Nginx, "nginx mail", &directory_login),
    ] {
        if !peers.contains(proxy.name()) {
            continue;
        }
        let sub = dir.path().join(proxy.name());
        let Some((process, addr)) = proxy.start(&sub, &env).await else {
            eprintln!("{}; skipped", proxy.install_hint());
            continue;
        };
        let target =
            Target { name, addr, tls: Some(tls.clone()), credentials: credentials.clone(), pid: Some(process.pid()) };
        if proxy == Proxy::Postern {
            profiled = Some((target.clone(), process.pid(), sub));
        }
        contenders.push(Contender { target, proxy: Some(proxy) });
        processes.push(process);
    }
    let setting = rounds::Setting { env: &env, dir: dir.path(), users: users.list.len() };
    let rows = rounds::run(&contenders, &setting, &plan).await;
    if !contenders.is_empty() {
        conditions += &format!("\n- {}", rounds::describe(&contenders, plan.rounds));
    }
    let mut profile = None;
    if let Some((target, pid, sub)) = &profiled {
        if std::env::var("POSTERN_BENCH_PERF").as_deref() != Ok("0") {
            profile = report::profile_logins(target, *pid, users.list.len(), sub).await;
        }
    }
    drop(processes);

    // What the `lb-*` and `ab` comparisons start from: Postern's login on Dovecot's address.
    let template =
        Target { name: "", addr: direct.addr, tls: Some(tls.clone()), credentials: directory_login.clone(), pid: None };
    let mut balanced = None;
    if peers.contains("lb-") {
        let sub = dir.path().join("lb");
        std::fs::create_dir_all(&sub).expect("lb dir");
        match lb::start_all(&sub, &env, &template, peers) {
            Some((redis, targets)) => {
                let section = lb::compare(&targets, &redis, &plan, users.list.len(), plan.rounds).await;
                println!("\n{section}");
                balanced = Some(section);
            }
            None => eprintln!("haproxy is not installed (apt-get install haproxy); lb-* skipped"),
        }
    }

    if peers.split(',').any(|p| p.trim() == "ab") {
        let sub = dir.path().join("ab");
        std::fs::create_dir_all(&sub).expect("ab dir");
        let section = ab::compare(&env, &template, &plan, users.list.len(), &sub).await;
        println!("\n{section}");
        balanced = Some(balanced.map_or(section.clone(), |b| format!("{b}\n{section}")));
    }

    let table = if rows.is_empty() { None } else { Some(report::table(&rows, &plan)) };
    if let Some(table) = &table {
        println!("\n{table}");
    }
    let out = std::env::var_os("POSTERN_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/latest.md"));
    report::write(&out, &conditions, &plan, table.as_deref(), balanced.as_deref(), profile.as_deref());
    println!("results written to {}", out.display());
}

/// The size of the future a function returns, without calling it.
#[allow(clippy::too_many_arguments)]
fn output_size<A, B, C, D, E, F, G, H, R>(_: impl Fn(A, B, C, D, E, F, G, H) -> R) -> usize {
    std::mem::size_of::<R>()
}

/// A message of about `mb` MiB with CRLF lines, as a delivery agent would store it.
fn message(mb: usize) -> Vec<u8> {
    let mut m = b"From: bench@example.com\r\nTo: bench0@example.com\r\nSubject: large\r\n\r\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n";
    while m.len() < mb * 1024 * 1024 {
        m.extend_from_slice(line);
    }
    m
}

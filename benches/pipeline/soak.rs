//! Soak run: one Postern process under mixed load for a long stretch (20 minutes by
//! default), with its resident memory, open descriptors, OS threads and live tokio tasks
//! sampled at a fixed interval, to see that after warm-up they stay flat.
//!
//! ```sh
//! POSTERN_BENCH_TARGETS=soak cargo bench --bench pipeline        # 20 minutes, a sample a minute
//! POSTERN_BENCH_TARGETS=soak POSTERN_BENCH_SOAK_MINUTES=2 POSTERN_BENCH_SOAK_SAMPLE_SECS=10 \
//!     POSTERN_BENCH_OUT=/tmp/soak-check.md cargo bench --bench pipeline   # a quick check
//! ```
//!
//! The target runs alone (other targets named with it are not run). It uses the harness's
//! slapd, Dovecot and bench users and starts the release build of Postern with IMAPS and
//! POP3S, a metrics listener, a short lockout (5 wrong passwords in 60 s lock a user for
//! 30 s) and a profile that allows 127.0.0.1 only. For the whole run, all at once:
//!
//! - IMAP login loops: a full TLS handshake, `LOGIN` with the directory password, `SELECT`,
//!   `LOGOUT`; a POP3 loop: `USER`, `PASS`, `STAT`, `QUIT`;
//! - a FETCH loop: a 4 MiB message fetched whole, ten per session, each compared byte for
//!   byte with what was delivered;
//! - idle sessions (logged in, INBOX selected, in `IDLE`): 100 stay for the whole run and
//!   end it with `DONE` and `LOGOUT`; of 300 more, 40 leave every 5 seconds, half with
//!   `DONE` and `LOGOUT`, half dropped without a word, and as many new ones take their place;
//! - refused logins: wrong passwords for users that no other loop uses (the lockout engages
//!   for them, by design, and never for the others), unknown user names (a new one each
//!   time), and the right password of a real user from 127.0.0.2–127.0.0.201, outside the
//!   profile;
//! - bad input: TLS garbage, a ClientHello cut in half, connections closed before or right
//!   after the handshake, an over-long line, garbage lines, too many bad commands, a
//!   literal announced and half sent, a literal over the limit.
//!
//! Every outcome is checked: a refused login must get `NO`, a line too long must close the
//! connection, and so on; anything else a client sees is a client error, listed in the
//! report. Each sample takes Postern's RSS, descriptors (`/proc/PID/fd`), threads
//! (`/proc/PID/task`), and from its `/metrics` the live tokio tasks
//! (`postern_tokio_tasks_alive`) and live sessions; with the clients' counts of that
//! interval. The report (`benches/results/soak.md`, or `POSTERN_BENCH_OUT`) has the
//! conditions, the table of samples, one more taken after the load stopped, and a verdict
//! computed from them: after the warm-up samples, the range of RSS, descriptors and tasks,
//! and whether the last sample is within a stated tolerance of the level at the end of
//! warm-up. Nothing here asserts on time; it is a report.
//!
//! Knobs: `POSTERN_BENCH_SOAK_MINUTES` (default 20), `POSTERN_BENCH_SOAK_SAMPLE_SECS`
//! (default 60).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::client::Imap;
use crate::targets::{self, Extra};
use crate::{Env, free_addr};

/// Samples at the start that count as warm-up, not steady state.
const WARM_UP_SAMPLES: usize = 3;
/// Concurrent IMAP login loops, and their pause between cycles.
const LOGIN_LOOPS: usize = 4;
const LOGIN_PAUSE: Duration = Duration::from_millis(50);
/// The POP3 login loop's pause between cycles.
const POP3_PAUSE: Duration = Duration::from_millis(200);
/// Sessions held in IDLE, of them those that stay for the whole run, and how many of the
/// others leave (and are replaced) how often.
const IDLE_POOL: usize = 400;
const LONG_IDLE: usize = 100;
const IDLE_CHURN: usize = 40;
const IDLE_CHURN_EVERY: Duration = Duration::from_secs(5);
/// Sessions of the idle pool opened at once.
const IDLE_OPENING: usize = 32;
/// The fetched message, MiB; fetches per session and the pause between them.
const FETCH_MB: usize = 4;
const FETCHES_PER_SESSION: usize = 10;
const FETCH_PAUSE: Duration = Duration::from_millis(200);
/// Pause between refused logins in each refusal loop, and between bad-input cases.
const REFUSED_PAUSE: Duration = Duration::from_millis(100);
const BAD_INPUT_PAUSE: Duration = Duration::from_millis(100);
/// Longest any one client operation may take before it counts as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server has to close a connection it must close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bench users `0..GOOD_USERS` log in (login loops, POP3, idle pool, outside-profile
/// attempts); the others only ever get wrong passwords.
const GOOD_USERS: usize = 50;
/// The user whose INBOX holds the fetched message (the harness put its large message in
/// user 0's).
const FETCH_USER: usize = 1;
/// The lockout of the run: short, so that the wrong-password users lock and unlock
/// several times a run and the counters reach their steady state within warm-up.
const LOCKOUT: &str = "max_failures = 5\nwindow_secs = 60\nlock_secs = 30\n";
/// Allowed tolerance at the end of the run, relative to the level at the end of warm-up:
/// the larger of the share and the floor.
const TOLERANCE_SHARE: f64 = 0.10;
const RSS_FLOOR_KIB: f64 = 8.0 * 1024.0;
const COUNT_FLOOR: f64 = 32.0;
/// Distinct client error messages kept for the report.
const KEPT_ERRORS: usize = 40;

/// The run's length and sampling interval.
struct Shape {
    minutes: u64,
    sample: Duration,
}

impl Shape {
    fn from_env() -> Shape {
        Shape {
            minutes: crate::env_num("POSTERN_BENCH_SOAK_MINUTES", 20).max(1) as u64,
            sample: Duration::from_secs(crate::env_num("POSTERN_BENCH_SOAK_SAMPLE_SECS", 60).max(1) as u64),
        }
    }
}

/// What the clients counted since the start (or, from [`Counts::since`], in one interval).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    /// Successful logins of every loop (IMAP and POP3 loops, idle sessions, FETCH sessions).
    logins_ok: u64,
    /// Refused as they should be: wrong password, unknown user, address outside the profile.
    wrong_password: u64,
    unknown_user: u64,
    outside_profile: u64,
    pop3_logins: u64,
    fetches: u64,
    fetch_bytes: u64,
    idle_opened: u64,
    idle_logged_out: u64,
    idle_dropped: u64,
    bad_input: u64,
    /// Anything a client saw that it should not have.
    errors: u64,
}

impl Counts {
    fn refused(&self) -> u64 {
        self.wrong_password + self.unknown_user + self.outside_profile
    }

    fn since(&self, before: &Counts) -> Counts {
        Counts {
            logins_ok: self.logins_ok - before.logins_ok,
            wrong_password: self.wrong_password - before.wrong_password,
            unknown_user: self.unknown_user - before.unknown_user,
            outside_profile: self.outside_profile - before.outside_profile,
            pop3_logins: self.pop3_logins - before.pop3_logins,
            fetches: self.fetches - before.fetches,
            fetch_bytes: self.fetch_bytes - before.fetch_bytes,
            idle_opened: self.idle_opened - before.idle_opened,
            idle_logged_out: self.idle_logged_out - before.idle_logged_out,
            idle_dropped: self.idle_dropped - before.idle_dropped,
            bad_input: self.bad_input - before.bad_input,
            errors: self.errors - before.errors,
        }
    }
}

/// The clients' counters, shared by every loop.
#[derive(Default)]
struct Counters {
    logins_ok: AtomicU64,
    wrong_password: AtomicU64,
    unknown_user: AtomicU64,
    outside_profile: AtomicU64,
    pop3_logins: AtomicU64,
    fetches: AtomicU64,
    fetch_bytes: AtomicU64,
    idle_opened: AtomicU64,
    idle_logged_out: AtomicU64,
    idle_dropped: AtomicU64,
    bad_input: AtomicU64,
    errors: AtomicU64,
    /// Client errors by message, the first [`KEPT_ERRORS`] distinct ones.
    messages: Mutex<BTreeMap<String, u64>>,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> Counts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counts {
            logins_ok: get(&self.logins_ok),
            wrong_password: get(&self.wrong_password),
            unknown_user: get(&self.unknown_user),
            outside_profile: get(&self.outside_profile),
            pop3_logins: get(&self.pop3_logins),
            fetches: get(&self.fetches),
            fetch_bytes: get(&self.fetch_bytes),
            idle_opened: get(&self.idle_opened),
            idle_logged_out: get(&self.idle_logged_out),
            idle_dropped: get(&self.idle_dropped),
            bad_input: get(&self.bad_input),
            errors: get(&self.errors),
        }
    }

    /// Counts a client error of the `what` loop.
    fn error(&self, what: &str, error: impl std::fmt::Display) {
        add(&self.errors, 1);
        let mut text = format!("{what}: {error}");
        if text.len() > 160 {
            let mut end = 160;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        let mut messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        let known = messages.contains_key(&text);
        if known || messages.len() < KEPT_ERRORS {
            *messages.entry(text).or_default() += 1;
        } else {
            *messages.entry("(other messages)".into()).or_default() += 1;
        }
    }

    /// Counts the outcome of one operation that had [`OP_TIMEOUT`].
    fn outcome(&self, what: &str, result: Result<io::Result<()>, tokio::time::error::Elapsed>) {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.error(what, e),
            Err(_) => self.error(what, format!("no answer within {} s", OP_TIMEOUT.as_secs())),
        }
    }
}

/// What every load loop shares.
struct Ctx {
    imap: SocketAddr,
    pop3: SocketAddr,
    tls: TlsConnector,
    /// `(mail, directory password)` of each bench user.
    users: Vec<(String, String)>,
    /// The fetched message as delivered.
    message: Vec<u8>,
    counters: Counters,
    stop: CancellationToken,
}

impl Ctx {
    fn running(&self) -> bool {
        !self.stop.is_cancelled()
    }

    /// Waits `d`, or less when the run stops meanwhile.
    async fn pause(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// A logged-in IMAP session of bench user `user`.
    async fn session(&self, user: usize) -> io::Result<Imap> {
        let mut imap = Imap::connect(self.imap, Some(&self.tls)).await?;
        let (name, password) = &self.users[user];
        imap.login(name, password).await?;
        add(&self.counters.logins_ok, 1);
        Ok(imap)
    }
}

/// Postern's own view, from its `/metrics`.
#[derive(Debug, Clone, Default)]
struct Scrape {
    tasks: u64,
    sessions: u64,
    tls_failures: u64,
    /// `postern_logins_total` by `(outcome, reason)`.
    logins: BTreeMap<(String, String), u64>,
}

/// One sample of the process and the interval before it.
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: u64,
    threads: u64,
    scrape: Option<Scrape>,
    interval: Counts,
}

/// Runs the soak against a new Postern in `dir` and writes the report; `conditions` are
/// the harness's.
pub async fn run(env: &Env<'_>, tls: &TlsConnector, dir: &Path, conditions: &str) {
    let shape = Shape::from_env();
    let started = Instant::now();
    let dir = dir.join("soak");
    std::fs::create_dir_all(&dir).expect("soak dir");
    let message = crate::message(FETCH_MB);
    env.dovecot.deliver(&env.users.list[FETCH_USER].mail, &message);
    let pop3 = free_addr();
    let metrics = free_addr();
    let extra = Extra {
        lockout: LOCKOUT.into(),
        allow: Some("[\"127.0.0.1/32\"]".into()),
        tables: format!(
            "[pop3]\nlisten = [\"{pop3}\"]\nupstream = \"localhost:{}\"\nupstream_ca_file = {:?}\n\n[metrics]\nlisten = \"{metrics}\"\n",
            env.dovecot.pop3s.port(),
            env.dovecot.ca_file.display().to_string(),
        ),
        ..Extra::default()
    };
    let (process, imap) = targets::postern_with(&dir, env.issued, env.slapd, env.dovecot, env.users, &extra);
    let pid = process.pid();
    eprintln!(
        "== soak: {} min, a sample every {} s, Postern pid {pid} on {imap} (POP3S {pop3}, metrics {metrics})",
        shape.minutes,
        shape.sample.as_secs()
    );
    let ctx = Arc::new(Ctx {
        imap,
        pop3,
        tls: tls.clone(),
        users: env.users.list.iter().map(|u| (u.mail.clone(), u.password.clone())).collect(),
        message,
        counters: Counters::default(),
        stop: CancellationToken::new(),
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = sample(pid, metrics, Duration::ZERO, Counts::default()).await;
    let slapd_port = env.slapd.url.rsplit_once(':').and_then(|(_, p)| p.trim_end_matches('/').parse().ok());
    let peers = [
        (slapd_port.unwrap_or(0), "slapd"),
        (env.dovecot.imaps.port(), "Dovecot IMAPS"),
        (env.dovecot.pop3s.port(), "Dovecot POP3S"),
    ];
    let fds_before = descriptors(pid, &peers);

    let mut loops = JoinSet::new();
    for n in 0..LOGIN_LOOPS {
        loops.spawn(login_loop(ctx.clone(), n));
    }
    loops.spawn(pop3_loop(ctx.clone()));
    loops.spawn(fetch_loop(ctx.clone()));
    loops.spawn(idle_pool(ctx.clone()));
    for kind in [Refusal::WrongPassword, Refusal::UnknownUser, Refusal::OutsideProfile] {
        loops.spawn(refusal_loop(ctx.clone(), kind));
    }
    loops.spawn(bad_input_loop(ctx.clone()));

    let load_start = Instant::now();
    let end = load_start + Duration::from_secs(shape.minutes * 60);
    let mut samples = Vec::new();
    let mut before = Counts::default();
    let mut next = load_start + shape.sample;
    while next <= end {
        tokio::time::sleep_until(next.into()).await;
        let now = ctx.counters.snapshot();
        let s = sample(pid, metrics, load_start.elapsed(), now.since(&before)).await;
        before = now;
        eprintln!("  {}", row(&s, ""));
        samples.push(s);
        next += shape.sample;
    }
    tokio::time::sleep_until(end.into()).await;
    ctx.stop.cancel();
    let load_secs = load_start.elapsed().as_secs_f64();
    while let Some(finished) = loops.join_next().await {
        if let Err(e) = finished {
            ctx.counters.error("load loop", e);
        }
    }
    // Let Postern notice the last closes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let total = ctx.counters.snapshot();
    let after = sample(pid, metrics, load_start.elapsed(), total.since(&before)).await;
    eprintln!("  {}", row(&after, " (after)"));
    let fds = [fds_before, descriptors(pid, &peers)];
    drop(process);

    let users = ctx.users.len();
    let report =
        report(&shape, conditions, &baseline, &samples, &after, &total, &ctx.counters, load_secs, started, users, &fds);
    println!("\n{report}");
    let out = std::env::var_os("POSTERN_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/results/soak.md"));
    if let Some(parent) = out.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(&out, report) {
        Ok(()) => println!("results written to {}", out.display()),
        Err(e) => eprintln!("cannot write {}: {e}", out.display()),
    }
}

/// Connect, `LOGIN`, `SELECT INBOX`, `LOGOUT`, over the good users in turn.
async fn login_loop(ctx: Arc<Ctx>, n: usize) {
    let mut user = n;
    while ctx.running() {
        let cycle = async {
            let mut imap = ctx.session(user % GOOD_USERS).await?;
            imap.command("SELECT INBOX").await?;
            imap.logout().await
        };
        ctx.counters.outcome("IMAP login loop", tokio::time::timeout(OP_TIMEOUT, cycle).await);
        user += LOGIN_LOOPS;
        ctx.pause(LOGIN_PAUSE).await;
    }
}

/// POP3S: `USER`, `PASS`, `STAT`, `QUIT`, over the good users in turn.
async fn pop3_loop(ctx: Arc<Ctx>) {
    let mut user = 0;
    while ctx.running() {
        let (name, password) = &ctx.users[user % GOOD_USERS];
        let cycle = async {
            let tcp = TcpStream::connect(ctx.pop3).await?;
            tcp.set_nodelay(true)?;
            let name_tls = ServerName::try_from("localhost").map_err(io::Error::other)?;
            let mut pop = BufReader::new(ctx.tls.connect(name_tls, tcp).await?);
            pop3_ok(&mut pop, "greeting").await?;
            for (command, what) in [(format!("USER {name}"), "USER"), (format!("PASS {password}"), "PASS")] {
                pop.get_mut().write_all(format!("{command}\r\n").as_bytes()).await?;
                pop3_ok(&mut pop, what).await?;
            }
            add(&ctx.counters.logins_ok, 1);
            add(&ctx.counters.pop3_logins, 1);
            pop.get_mut().write_all(b"STAT\r\nQUIT\r\n").await?;
            pop3_ok(&mut pop, "STAT").await?;
            pop3_ok(&mut pop, "QUIT").await?;
            let mut rest = Vec::new();
            match pop.read_to_end(&mut rest).await {
                Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => Err(e),
                _ => Ok(()),
            }
        };
        ctx.counters.outcome("POP3 login loop", tokio::time::timeout(OP_TIMEOUT, cycle).await);
        user += 1;
        ctx.pause(POP3_PAUSE).await;
    }
}

/// Reads one POP3 answer, which must be `+OK`.
async fn pop3_ok<S: tokio::io::AsyncRead + Unpin>(pop: &mut BufReader<S>, what: &str) -> io::Result<()> {
    let mut line = String::new();
    if pop.read_line(&mut line).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if line.starts_with("+OK") { Ok(()) } else { Err(io::Error::other(format!("POP3 {what}: {}", line.trim_end()))) }
}

/// Whole-message FETCHes of the large message, each compared with what was delivered.
async fn fetch_loop(ctx: Arc<Ctx>) {
    while ctx.running() {
        let cycle = async {
            let mut imap = ctx.session(FETCH_USER).await?;
            imap.command("SELECT INBOX").await?;
            for _ in 0..FETCHES_PER_SESSION {
                if !ctx.running() {
                    break;
                }
                let got = imap.command_keeping("FETCH 1 BODY.PEEK[]").await?;
                if got != ctx.message {
                    let first = got.iter().zip(&ctx.message).position(|(a, b)| a != b);
                    ctx.counters.error(
                        "FETCH loop",
                        format!(
                            "message differs: {} bytes, {} expected, first difference at {first:?}",
                            got.len(),
                            ctx.message.len()
                        ),
                    );
                } else {
                    add(&ctx.counters.fetches, 1);
                    add(&ctx.counters.fetch_bytes, got.len() as u64);
                }
                ctx.pause(FETCH_PAUSE).await;
            }
            imap.logout().await
        };
        // Ten fetches and their pauses take longer than one operation.
        let limit = OP_TIMEOUT + (FETCH_PAUSE + OP_TIMEOUT) * FETCHES_PER_SESSION as u32;
        match tokio::time::timeout(limit, cycle).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => ctx.counters.error("FETCH loop", e),
            Err(_) => ctx.counters.error("FETCH loop", "a FETCH session did not finish in time"),
        }
    }
}

/// The idle sessions: [`LONG_IDLE`] that stay for the whole run and end with `DONE` and
/// `LOGOUT` (so a session the server lost on the way shows as an error), and a pool of the
/// rest where every [`IDLE_CHURN_EVERY`] [`IDLE_CHURN`] sessions leave (half with `DONE` and
/// `LOGOUT`, half dropped) and are replaced. At the end, the pool's sessions are dropped.
async fn idle_pool(ctx: Arc<Ctx>) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut next_user = 0;
    let mut long = Vec::with_capacity(LONG_IDLE);
    fill(&ctx, &mut long, LONG_IDLE, &mut next_user).await;
    let mut pool: Vec<Imap> = Vec::with_capacity(IDLE_POOL - LONG_IDLE);
    let mut leaving = JoinSet::new();
    while ctx.running() {
        fill(&ctx, &mut pool, IDLE_POOL - LONG_IDLE, &mut next_user).await;
        ctx.pause(IDLE_CHURN_EVERY).await;
        if !ctx.running() {
            break;
        }
        while leaving.try_join_next().is_some() {}
        for k in 0..IDLE_CHURN.min(pool.len()) {
            let imap = pool.swap_remove(rng.gen_range(0..pool.len()));
            if k % 2 == 1 {
                drop(imap);
                add(&ctx.counters.idle_dropped, 1);
            } else {
                leaving.spawn(close_idle(ctx.clone(), imap));
            }
        }
    }
    add(&ctx.counters.idle_dropped, pool.len() as u64);
    drop(pool);
    for imap in long {
        leaving.spawn(close_idle(ctx.clone(), imap));
    }
    while leaving.join_next().await.is_some() {}
}

/// Ends an idle session with `DONE` and `LOGOUT`.
async fn close_idle(ctx: Arc<Ctx>, mut imap: Imap) {
    let close = async {
        imap.idle_done().await?;
        imap.logout().await?;
        add(&ctx.counters.idle_logged_out, 1);
        Ok(())
    };
    ctx.counters.outcome("idle session close", tokio::time::timeout(OP_TIMEOUT, close).await);
}

/// Opens idle sessions until `pool` holds `size` (or the run stops), [`IDLE_OPENING`] at a
/// time.
async fn fill(ctx: &Arc<Ctx>, pool: &mut Vec<Imap>, size: usize, next_user: &mut usize) {
    let mut opening = JoinSet::new();
    let mut wanted = size.saturating_sub(pool.len());
    while (wanted > 0 || !opening.is_empty()) && ctx.running() {
        while wanted > 0 && opening.len() < IDLE_OPENING {
            let ctx = ctx.clone();
            let user = *next_user % GOOD_USERS;
            *next_user += 1;
            wanted -= 1;
            opening.spawn(async move {
                let open = async {
                    let mut imap = ctx.session(user).await?;
                    imap.command("SELECT INBOX").await?;
                    imap.idle().await?;
                    Ok::<_, io::Error>(imap)
                };
                match tokio::time::timeout(OP_TIMEOUT, open).await {
                    Ok(Ok(imap)) => {
                        add(&ctx.counters.idle_opened, 1);
                        Some(imap)
                    }
                    Ok(Err(e)) => {
                        ctx.counters.error("idle session open", e);
                        None
                    }
                    Err(_) => {
                        ctx.counters.error("idle session open", "no answer in time");
                        None
                    }
                }
            });
        }
        if let Some(Ok(Some(imap))) = opening.join_next().await {
            pool.push(imap);
        }
    }
}

/// A kind of login that must be refused.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// A wrong password for a user of `GOOD_USERS..`: the lockout counts them.
    WrongPassword,
    /// A user name the directory does not know, new each time.
    UnknownUser,
    /// The right password of a good user, from an address outside the profile.
    OutsideProfile,
}

/// Logins that must be answered `NO`, then `LOGOUT`.
async fn refusal_loop(ctx: Arc<Ctx>, kind: Refusal) {
    let mut i = 0usize;
    let bad_users = ctx.users.len().saturating_sub(GOOD_USERS).max(1);
    while ctx.running() {
        let (from, name, password, counter, what) = match kind {
            Refusal::WrongPassword => {
                let (name, _) = &ctx.users[(GOOD_USERS + i % bad_users).min(ctx.users.len() - 1)];
                (None, name.clone(), format!("wrong-{i}"), &ctx.counters.wrong_password, "wrong password")
            }
            Refusal::UnknownUser => (
                None,
                format!("soak-nobody-{i}@example.com"),
                "whatever-1".to_owned(),
                &ctx.counters.unknown_user,
                "unknown user",
            ),
            Refusal::OutsideProfile => {
                let (name, password) = &ctx.users[i % GOOD_USERS];
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 200) as u8));
                (Some(from), name.clone(), password.clone(), &ctx.counters.outside_profile, "outside the profile")
            }
        };
        let cycle = async {
            let mut imap = Imap::connect_from(from, ctx.imap, Some(&ctx.tls)).await?;
            let answer = imap.answer(&format!("LOGIN \"{name}\" \"{password}\"")).await?;
            if !answer.contains(" NO [AUTHENTICATIONFAILED]") {
                return Err(io::Error::other(format!("login {what}: answered {answer:?}")));
            }
            add(counter, 1);
            imap.logout().await
        };
        ctx.counters.outcome("refused login", tokio::time::timeout(OP_TIMEOUT, cycle).await);
        i += 1;
        ctx.pause(REFUSED_PAUSE).await;
    }
}

/// The kinds of bad input, taken in turn.
const BAD_INPUTS: [&str; 10] = [
    "TLS garbage",
    "TLS record of garbage",
    "ClientHello cut in half",
    "closed before the handshake",
    "dropped after the greeting",
    "line over the limit",
    "garbage lines, then NOOP",
    "too many bad commands",
    "literal half sent",
    "literal over the limit",
];

/// Bad input of every kind in turn, each answered as it should be.
async fn bad_input_loop(ctx: Arc<Ctx>) {
    let mut rng = StdRng::seed_from_u64(11);
    let mut i = 0usize;
    while ctx.running() {
        let kind = BAD_INPUTS[i % BAD_INPUTS.len()];
        let seed: u64 = rng.r#gen();
        let result = tokio::time::timeout(OP_TIMEOUT, bad_input(&ctx, kind, seed)).await;
        if matches!(result, Ok(Ok(()))) {
            add(&ctx.counters.bad_input, 1);
        }
        ctx.counters.outcome(&format!("bad input ({kind})"), result);
        i += 1;
        ctx.pause(BAD_INPUT_PAUSE).await;
    }
}

/// Random bytes that are neither line ends nor literal braces.
fn garbage(rng: &mut StdRng, len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            loop {
                let b: u8 = rng.r#gen();
                if !matches!(b, b'\r' | b'\n' | b'{' | b'}') {
                    break b;
                }
            }
        })
        .collect()
}

/// Waits until the server closes `stream` (a reset counts), within [`CLOSE_TIMEOUT`].
async fn expect_close(mut stream: TcpStream, what: &str) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let closed = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    };
    tokio::time::timeout(CLOSE_TIMEOUT, closed)
        .await
        .map_err(|_| io::Error::other(format!("{what}: the connection stayed open")))
}

/// Waits until the server closes an IMAP session, and checks that what it said before
/// contains `expected` (unless the close was a reset that lost it).
async fn expect_imap_close(imap: &mut Imap, expected: &str) -> io::Result<()> {
    let seen = tokio::time::timeout(CLOSE_TIMEOUT, imap.until_closed())
        .await
        .map_err(|_| io::Error::other(format!("expected {expected:?}, the connection stayed open")))??;
    let text = String::from_utf8_lossy(&seen);
    if !seen.is_empty() && !text.contains(expected) {
        return Err(io::Error::other(format!("expected {expected:?}, got {:?}", text.trim_end())));
    }
    Ok(())
}

async fn bad_input(ctx: &Ctx, kind: &str, seed: u64) -> io::Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let tls = Some(&ctx.tls);
    match kind {
        "TLS garbage" => {
            let mut tcp = TcpStream::connect(ctx.imap).await?;
            tcp.write_all(&garbage(&mut rng, 512)).await?;
            expect_close(tcp, kind).await
        }
        "TLS record of garbage" => {
            let mut tcp = TcpStream::connect(ctx.imap).await?;
            let mut record = vec![0x16, 0x03, 0x01, 0x00, 0x80];
            record.extend(garbage(&mut rng, 0x80));
            // A handshake message longer than 64 KiB, refused at once. (With a length that
            // fits, the server rightly waits for the rest until the handshake timeout, 60 s
            // in the bench's configuration; the half ClientHello case covers that.)
            record[6] |= 0x80;
            tcp.write_all(&record).await?;
            expect_close(tcp, kind).await
        }
        "ClientHello cut in half" => {
            let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
            let mut hello = Vec::new();
            let mut client = rustls::ClientConnection::new(ctx.tls.config().clone(), name).map_err(io::Error::other)?;
            client.write_tls(&mut hello)?;
            let mut tcp = TcpStream::connect(ctx.imap).await?;
            tcp.write_all(&hello[..hello.len() / 2]).await?;
            Ok(())
        }
        "closed before the handshake" => TcpStream::connect(ctx.imap).await.map(drop),
        "dropped after the greeting" => Imap::connect(ctx.imap, tls).await.map(drop),
        "line over the limit" => {
            let mut imap = Imap::connect(ctx.imap, tls).await?;
            // Past the default 8 KiB pre-login line limit; the server may close before
            // reading it all.
            let _ = imap.send(&vec![b'a'; 16 * 1024]).await;
            expect_imap_close(&mut imap, "* BYE Line too long").await
        }
        "garbage lines, then NOOP" => {
            let mut imap = Imap::connect(ctx.imap, tls).await?;
            for _ in 0..3 {
                let mut line = garbage(&mut rng, 200);
                line.extend_from_slice(b"\r\n");
                imap.send(&line).await?;
            }
            imap.command("NOOP").await?;
            imap.logout().await
        }
        "too many bad commands" => {
            let mut imap = Imap::connect(ctx.imap, tls).await?;
            imap.send("x SELECT INBOX\r\n".repeat(12).as_bytes()).await?;
            expect_imap_close(&mut imap, "* BYE Too many invalid commands").await
        }
        "literal half sent" => {
            let mut imap = Imap::connect(ctx.imap, tls).await?;
            imap.send(b"l1 LOGIN {20}\r\n").await?;
            let line = imap.line().await?;
            if !line.starts_with(b"+") {
                return Err(io::Error::other(format!("literal: answered {:?}", String::from_utf8_lossy(&line))));
            }
            imap.send(b"bench0@").await
        }
        "literal over the limit" => {
            let mut imap = Imap::connect(ctx.imap, tls).await?;
            imap.send(b"l1 LOGIN {100000}\r\n").await?;
            let line = imap.line().await?;
            if !line.starts_with(b"l1 BAD") {
                return Err(io::Error::other(format!("literal: answered {:?}", String::from_utf8_lossy(&line))));
            }
            imap.logout().await
        }
        other => Err(io::Error::other(format!("no such bad input: {other}"))),
    }
}

/// What `pid`'s open descriptors are, counted by kind: TCP listeners, TCP connections by
/// the peer's port (named from `peers` when known), Unix sockets, anonymous inodes (epoll,
/// eventfd, ...) and files.
fn descriptors(pid: u32, peers: &[(u16, &str)]) -> String {
    // inode -> (listening, remote port), from the process's network namespace.
    let mut tcp = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(inode)) = (f.get(2), f.get(3), f.get(9)) else { continue };
            let port = remote.rsplit_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()).unwrap_or(0);
            tcp.insert(inode.to_string(), (*state == "0A", port));
        }
    }
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else { continue };
        let link = link.to_string_lossy().into_owned();
        let kind = match link.strip_prefix("socket:[").and_then(|l| l.strip_suffix(']')) {
            Some(inode) => match tcp.get(inode) {
                Some((true, _)) => "TCP listener".to_owned(),
                Some((false, port)) => match peers.iter().find(|(p, _)| p == port) {
                    Some((_, name)) => format!("TCP to {name}"),
                    None => "TCP, other".to_owned(),
                },
                None => "Unix or other socket".to_owned(),
            },
            None if link.starts_with("anon_inode:") => link,
            None if link.starts_with("pipe:") => "pipe".to_owned(),
            None if link.starts_with('/') => {
                let name = Path::new(&link).file_name().map(|n| n.to_string_lossy().into_owned());
                format!("file {}", name.unwrap_or(link))
            }
            None => link,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds.iter().map(|(kind, n)| format!("{kind} ×{n}")).collect::<Vec<_>>().join(", ")
}

/// Entries of a `/proc/PID/...` folder.
fn entries(path: String) -> u64 {
    std::fs::read_dir(path).map(|d| d.count() as u64).unwrap_or(0)
}

async fn sample(pid: u32, metrics: SocketAddr, at: Duration, interval: Counts) -> Sample {
    Sample {
        at,
        rss_kib: targets::rss_kib(pid),
        fds: entries(format!("/proc/{pid}/fd")),
        threads: entries(format!("/proc/{pid}/task")),
        scrape: scrape(metrics).await,
        interval,
    }
}

/// Reads Postern's `/metrics`.
async fn scrape(addr: SocketAddr) -> Option<Scrape> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n").await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok::<_, io::Error>(body)
    };
    let text = match tokio::time::timeout(Duration::from_secs(10), fetch).await {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => {
            eprintln!("  /metrics: {e}");
            return None;
        }
        Err(_) => {
            eprintln!("  /metrics: no answer");
            return None;
        }
    };
    let mut scrape = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Ok(value) = value.parse::<f64>() else { continue };
        let value = value as u64;
        let label = |name: &str| {
            let start = series.find(&format!("{name}=\""))? + name.len() + 2;
            let end = series[start..].find('"')? + start;
            Some(series[start..end].to_owned())
        };
        if series == "postern_tokio_tasks_alive" {
            scrape.tasks = value;
        } else if series.starts_with("postern_sessions_active{") {
            scrape.sessions += value;
        } else if series.starts_with("postern_tls_handshake_failures_total{") {
            scrape.tls_failures += value;
        } else if series.starts_with("postern_logins_total{") {
            if let (Some(outcome), Some(reason)) = (label("outcome"), label("reason")) {
                *scrape.logins.entry((outcome, reason)).or_default() += value;
            }
        }
    }
    Some(scrape)
}

fn clock(at: Duration) -> String {
    let secs = at.as_secs_f64().round() as u64;
    format!("{}:{:02}", secs / 60, secs % 60)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One table row; `note` follows the time.
fn row(s: &Sample, note: &str) -> String {
    let c = &s.interval;
    let (tasks, sessions) =
        s.scrape.as_ref().map_or(("-".into(), "-".into()), |m| (m.tasks.to_string(), m.sessions.to_string()));
    format!(
        "| {}{note} | {:.1} | {} | {} | {tasks} | {sessions} | {} / {} | {} ({:.0}) | {} / {} / {} | {} | {} |",
        clock(s.at),
        mib(s.rss_kib),
        s.fds,
        s.threads,
        c.logins_ok,
        c.refused(),
        c.fetches,
        c.fetch_bytes as f64 / 1e6,
        c.idle_opened,
        c.idle_logged_out,
        c.idle_dropped,
        c.bad_input,
        c.errors
    )
}

/// The steady-state figures of one measure: range after warm-up, level at the end of
/// warm-up, last value, tolerance and slope.
struct Flatness {
    name: &'static str,
    unit: &'static str,
    level: f64,
    min: f64,
    max: f64,
    last: f64,
    tolerance: f64,
    /// Least-squares slope over the samples from the end of warm-up on, per minute.
    per_minute: f64,
}

impl Flatness {
    fn of(name: &'static str, unit: &'static str, points: &[(f64, f64)], floor: f64) -> Option<Flatness> {
        // From the end of warm-up (its last sample is the level) to the end.
        let steady = points.get(WARM_UP_SAMPLES - 1..).filter(|p| p.len() >= 2)?;
        let level = steady[0].1;
        let after = &steady[1..];
        let min = after.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let max = after.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let last = steady[steady.len() - 1].1;
        let n = steady.len() as f64;
        let mean_t = steady.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_v = steady.iter().map(|p| p.1).sum::<f64>() / n;
        let cov: f64 = steady.iter().map(|p| (p.0 - mean_t) * (p.1 - mean_v)).sum();
        let var: f64 = steady.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
        let per_minute = if var > 0.0 { cov / var * 60.0 } else { 0.0 };
        Some(Flatness {
            name,
            unit,
            level,
            min,
            max,
            last,
            tolerance: (level * TOLERANCE_SHARE).max(floor),
            per_minute,
        })
    }

    fn within(&self) -> bool {
        (self.last - self.level).abs() <= self.tolerance
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    shape: &Shape,
    conditions: &str,
    baseline: &Sample,
    samples: &[Sample],
    after: &Sample,
    total: &Counts,
    counters: &Counters,
    load_secs: f64,
    started: Instant,
    users: usize,
    fds: &[String; 2],
) -> String {
    let mut out = String::from("# Soak run\n\n");
    let _ = writeln!(
        out,
        "Written by `POSTERN_BENCH_TARGETS=soak cargo bench --bench pipeline` \
         (`POSTERN_BENCH_SOAK_MINUTES={}`, `POSTERN_BENCH_SOAK_SAMPLE_SECS={}`): {:.1} minutes of load, \
         {:.1} minutes in all with the set-up.\n",
        shape.minutes,
        shape.sample.as_secs(),
        load_secs / 60.0,
        started.elapsed().as_secs_f64() / 60.0
    );
    let _ = writeln!(out, "## Conditions\n\n{conditions}");
    let _ = writeln!(
        out,
        "- one Postern process (release build), IMAPS and POP3S, LDAP directory, Dovecot upstream over TLS; \
         lockout `max_failures = 5`, `window_secs = 60`, `lock_secs = 30`, no failure delay, per-address \
         throttle off; the profile allows 127.0.0.1 only\n\
         - load, all at once for the whole run: {LOGIN_LOOPS} IMAP login loops (TLS, LOGIN, SELECT, LOGOUT; \
         {} ms pause), 1 POP3 loop (USER, PASS, STAT, QUIT; {} ms pause), 1 FETCH loop ({FETCH_MB} MiB message, \
         {FETCHES_PER_SESSION} per session, each compared byte for byte, {} ms pause), {IDLE_POOL} sessions in IDLE: \
         {LONG_IDLE} for the whole run (ending with DONE and LOGOUT), of the others {IDLE_CHURN} leave every {} s \
         (half LOGOUT, half dropped) and are replaced, 3 refusal loops (wrong password \
         for users only they use, unknown user, right password from 127.0.0.2–201 outside the profile; {} ms pause \
         each), 1 bad-input loop ({} ms pause) taking in turn: {}\n\
         - users: bench users 0–{} log in, {}–{} only get wrong passwords",
        LOGIN_PAUSE.as_millis(),
        POP3_PAUSE.as_millis(),
        FETCH_PAUSE.as_millis(),
        IDLE_CHURN_EVERY.as_secs(),
        REFUSED_PAUSE.as_millis(),
        BAD_INPUT_PAUSE.as_millis(),
        BAD_INPUTS.join(", "),
        GOOD_USERS - 1,
        GOOD_USERS,
        users - 1,
    );
    let _ = writeln!(
        out,
        "\n## Samples\n\n\
         Process figures at the sample; client counts over the interval before it. Logins ok: every loop's \
         (IMAP, POP3, idle sessions opened, FETCH sessions). Tasks and live sessions: Postern's `/metrics` \
         (`postern_tokio_tasks_alive`, `postern_sessions_active` of all protocols). Threads are tokio's workers \
         and its blocking pool (host name lookups, at most one a minute per upstream, and other blocking work), \
         which lets a thread go after 10 s without work: they follow the load's concurrency, not its length.\n\n\
         | time | RSS MiB | fds | threads | tasks | live sessions | logins ok / refused | fetches (MB) | idle opened / logged out / dropped | bad input | client errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(out, "{}", row(baseline, " (before the load)"));
    for s in samples {
        let _ = writeln!(out, "{}", row(s, ""));
    }
    let _ = writeln!(out, "{}", row(after, " (load stopped 5 s before)"));

    // The verdict.
    let _ = writeln!(out, "\n## Verdict\n");
    let points = |get: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples.iter().filter_map(|s| Some((s.at.as_secs_f64(), get(s)?))).collect()
    };
    let measures = [
        Flatness::of("RSS", "MiB", &points(&|s| Some(mib(s.rss_kib))), RSS_FLOOR_KIB / 1024.0),
        Flatness::of("open descriptors", "", &points(&|s| Some(s.fds as f64)), COUNT_FLOOR),
        Flatness::of("tokio tasks", "", &points(&|s| s.scrape.as_ref().map(|m| m.tasks as f64)), COUNT_FLOOR),
    ];
    let measures: Vec<Flatness> = measures.into_iter().flatten().collect();
    if measures.is_empty() {
        let _ = writeln!(
            out,
            "Too few samples for a verdict: the first {WARM_UP_SAMPLES} are warm-up and at least two more are needed."
        );
    } else {
        let _ = writeln!(
            out,
            "Warm-up: the first {WARM_UP_SAMPLES} samples (to {}); its level is the value at its last sample. \
             Tolerance for the last sample: ±{:.0}% of that level, at least {:.0} MiB of RSS and {COUNT_FLOOR:.0} \
             descriptors or tasks (the idle pool's churn alone moves descriptors and tasks by up to {} sessions' \
             worth between samples).\n\n\
             | measure | level at the end of warm-up | min – max after it | max − min | last | slope after warm-up, per minute | last within tolerance |\n\
             |---|---:|---:|---:|---:|---:|---|",
            clock(samples[WARM_UP_SAMPLES - 1].at),
            TOLERANCE_SHARE * 100.0,
            RSS_FLOOR_KIB / 1024.0,
            IDLE_CHURN,
        );
        for m in &measures {
            let d = if m.unit == "MiB" { 1 } else { 0 };
            let unit = if m.unit.is_empty() { String::new() } else { format!(" {}", m.unit) };
            let _ = writeln!(
                out,
                "| {} | {:.d$}{unit} | {:.d$} – {:.d$} | {:.d$} | {:.d$} | {:+.2} | {} (±{:.d$}) |",
                m.name,
                m.level,
                m.min,
                m.max,
                m.max - m.min,
                m.last,
                m.per_minute,
                if m.within() { "yes" } else { "**no**" },
                m.tolerance,
            );
        }
        let flat = measures.iter().all(Flatness::within);
        let _ = writeln!(
            out,
            "\n{}",
            if flat {
                "**Flat**: RSS, descriptors and tasks ended within tolerance of their level at the end of warm-up."
            } else {
                "**Not flat**: at least one measure ended outside its tolerance (above)."
            }
        );
    }
    if let (Some(before), Some(now)) = (&baseline.scrape, &after.scrape) {
        let _ = writeln!(
            out,
            "\nAfter the load stopped: {} live sessions, {} tasks and {} descriptors (before the load: {} tasks, {} \
             descriptors), RSS {:.1} MiB (before: {:.1}).",
            now.sessions,
            now.tasks,
            after.fds,
            before.tasks,
            baseline.fds,
            mib(after.rss_kib),
            mib(baseline.rss_kib)
        );
        let _ = writeln!(out, "\n- descriptors before the load: {}\n- after it: {}", fds[0], fds[1]);
    }
    let _ = writeln!(
        out,
        "\nClient errors: {}.",
        if total.errors == 0 { "none".to_owned() } else { format!("**{}**, listed below", total.errors) }
    );

    // Totals, clients' and Postern's.
    let _ = writeln!(
        out,
        "\n## Totals\n\n\
         Clients: {} logins ok ({} over POP3), {} refused as expected ({} wrong password, {} unknown user, {} \
         outside the profile), {} FETCHes arrived whole and identical to the message ({:.0} MB), idle sessions {} opened / {} logged out / \
         {} dropped, {} bad-input cases answered as expected, {} client errors.",
        total.logins_ok,
        total.pop3_logins,
        total.refused(),
        total.wrong_password,
        total.unknown_user,
        total.outside_profile,
        total.fetches,
        total.fetch_bytes as f64 / 1e6,
        total.idle_opened,
        total.idle_logged_out,
        total.idle_dropped,
        total.bad_input,
        total.errors
    );
    if let (Some(before), Some(now)) = (&baseline.scrape, &after.scrape) {
        let _ = writeln!(
            out,
            "\nPostern's `/metrics`, over the run: {} failed TLS handshakes.\n\n| login outcome | reason | count |\n|---|---|---:|",
            now.tls_failures - before.tls_failures
        );
        for ((outcome, reason), n) in &now.logins {
            let n = n - before.logins.get(&(outcome.clone(), reason.clone())).copied().unwrap_or(0);
            if n > 0 {
                let _ = writeln!(out, "| {outcome} | {reason} | {n} |");
            }
        }
    }
    let messages = counters.messages.lock().unwrap_or_else(|e| e.into_inner());
    if !messages.is_empty() {
        let _ = writeln!(out, "\n## Client errors\n\n| error | count |\n|---|---:|");
        for (text, n) in messages.iter() {
            let _ = writeln!(out, "| {} | {n} |", text.replace('|', "\\|"));
        }
    }
    out
}

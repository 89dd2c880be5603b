//! The results table, the run's conditions, the login-path profile and the results file.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Plan;
use crate::load::{self, Target};
use crate::rounds::{Row, Sample};
use crate::stats::Spread;
use crate::targets;

/// The reference column: Dovecot without a proxy.
pub const DIRECT: &str = "Dovecot direct";
/// The column whose ratios to the other proxies the table shows.
pub const POSTERN: &str = "Postern";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A markdown table, one column per target with the median (min–max) of its rounds, and
/// Postern's ratio to each peer, of the medians.
pub fn table(rows: &[Row], plan: &Plan) -> String {
    let mut table = Table::new(rows, plan.rounds);
    table.figure(&format!("FETCH {} MiB x{}, MB/s", plan.message_mb, plan.fetches), 0, |s| s.throughput);
    table.figure("CPU ms of the proxy per 100 MB of FETCH", 0, |s| s.cpu_per_100mb);
    for &clients in &plan.clients {
        table.counted(&format!("logins/s, {clients} clients"), 0, |s| s.logins(clients).map(|l| (l.per_sec, l.errors)));
        table.figure(&format!("login p50 ms, {clients} clients"), 1, |s| s.logins(clients).map(|l| ms(l.p50)));
        table.figure(&format!("login p99 ms, {clients} clients"), 1, |s| s.logins(clients).map(|l| ms(l.p99)));
    }
    for &n in &plan.sessions {
        table.counted(&format!("idle KiB/session, {n} sessions in IDLE"), 1, |s| {
            s.idle(n).map(|i| (i.per_session_kib(), i.errors))
        });
    }
    table.figure("NOOP round trip p50, µs", 0, |s| s.noop.map(|(p50, _)| us(p50)));
    table.figure("NOOP round trip p99, µs", 0, |s| s.noop.map(|(_, p99)| us(p99)));
    // Against the direct run of the same round; a ratio of two differences means nothing.
    let direct: Vec<Option<f64>> = rows
        .iter()
        .find(|r| r.name == DIRECT)
        .map(|r| r.rounds.iter().map(|s| s.noop.map(|(p50, _)| us(p50))).collect())
        .unwrap_or_default();
    table.line("added NOOP latency vs direct (p50), µs", 0, false, |row, round| {
        let p50 = us(row.rounds[round].noop?.0);
        (row.name != DIRECT).then_some((p50 - (*direct.get(round)?)?, 0))
    });
    table.figure("RSS after the round's workloads, MiB", 1, |s| (s.rss_kib > 0).then(|| s.rss_kib as f64 / 1024.0));
    table.out
}

/// The table being written.
struct Table<'a> {
    rows: &'a [Row],
    rounds: usize,
    /// Index of Postern's row.
    postern: Option<usize>,
    /// Indices of the rows Postern is compared with (all but Postern and Dovecot).
    peers: Vec<usize>,
    out: String,
}

impl<'a> Table<'a> {
    /// The note on what the cells hold, then the header.
    fn new(rows: &'a [Row], rounds: usize) -> Table<'a> {
        let postern = rows.iter().position(|r| r.name == POSTERN);
        let peers: Vec<usize> =
            (0..rows.len()).filter(|&i| rows[i].name != POSTERN && rows[i].name != DIRECT).collect();
        let mut out = if rounds > 1 {
            format!(
                "Each cell: the median of {rounds} rounds (lowest–highest); the ratios are of the medians; \
                 errors are the rounds' total.\n\n"
            )
        } else {
            "One round (`POSTERN_BENCH_ROUNDS=1`): each cell is its figure.\n\n".to_owned()
        };
        out += "| workload |";
        for row in rows {
            let _ = write!(out, " {} |", row.name);
        }
        for &peer in &peers {
            let _ = write!(out, " {POSTERN} / {} |", rows[peer].name);
        }
        let _ = write!(out, "\n|---|{}\n", "---:|".repeat(rows.len() + peers.len()));
        Table { rows, rounds, postern, peers, out }
    }

    /// A line of a figure read from each round's sample.
    fn figure(&mut self, label: &str, digits: usize, get: impl Fn(&Sample) -> Option<f64>) {
        self.line(label, digits, true, |row, round| get(&row.rounds[round]).map(|value| (value, 0)));
    }

    /// A line of a figure and its count of errors, read from each round's sample.
    fn counted(&mut self, label: &str, digits: usize, get: impl Fn(&Sample) -> Option<(f64, usize)>) {
        self.line(label, digits, true, |row, round| get(&row.rounds[round]));
    }

    /// A line: per target, `get(row, round)` (the figure and errors of that round) over the
    /// rounds, then Postern's ratios to its peers when `ratios`.
    fn line(&mut self, label: &str, digits: usize, ratios: bool, get: impl Fn(&Row, usize) -> Option<(f64, usize)>) {
        let mut medians = Vec::with_capacity(self.rows.len());
        let _ = write!(self.out, "| {label} |");
        for row in self.rows {
            let rounds: Vec<(f64, usize)> = (0..row.rounds.len()).filter_map(|round| get(row, round)).collect();
            let spread = Spread::of(rounds.iter().map(|(value, _)| *value));
            let errors: usize = rounds.iter().map(|(_, errors)| errors).sum();
            let cell = match spread {
                None => "-".to_owned(),
                Some(s) => {
                    let mut cell = s.show(digits);
                    if s.count < self.rounds {
                        let _ = write!(cell, ", {} of {} rounds", s.count, self.rounds);
                    }
                    if errors > 0 {
                        let _ = write!(cell, ", {errors} errors");
                    }
                    cell
                }
            };
            let _ = write!(self.out, " {cell} |");
            medians.push(spread.map(|s| s.median));
        }
        for &peer in &self.peers {
            let ratio = match (self.postern.and_then(|p| medians[p]), medians[peer]) {
                (Some(p), Some(q)) if ratios && q > 0.0 => format!("{:.2}x", p / q),
                _ => "-".to_owned(),
            };
            let _ = write!(self.out, " {ratio} |");
        }
        self.out.push('\n');
    }
}

/// Machine, load and versions at the start of the run.
pub fn conditions() -> String {
    let uname = targets::version("uname", "-sr");
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let date = targets::version("date", "-u");
    format!(
        "- date: {date}\n- machine: {cpus} CPUs ({model}), {uname}; load average at start: {}\n- Dovecot {}, {}, {}, OpenLDAP {}, {}\n- every process on 127.0.0.1; clients are this bench's tokio + rustls (aws-lc-rs) with TLS resumption off, so each login is a full handshake",
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        targets::version("dovecot", "--version"),
        targets::version("haproxy", "-v"),
        targets::version("nginx", "-v"),
        targets::version("slapd", "-VV"),
        targets::version("redis-server", "--version"),
    )
}

/// A `perf` profile of Postern during a 50-client login run: the top symbols and the share
/// of each shared object. `None` when perf is missing or cannot attach.
pub async fn profile_logins(target: &Target, pid: u32, users: usize, dir: &Path) -> Option<String> {
    let perf = targets::which("perf")?;
    let data = dir.join("perf.data");
    eprintln!("  profiling the login path (perf, 50 clients, 6 s) ...");
    let mut record = Command::new(&perf)
        .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
        .arg(&data)
        .args(["--", "sleep", "6"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rate = load::logins(target, 50, users, Duration::from_secs(5)).await;
    let _ = tokio::task::spawn_blocking(move || record.wait()).await;
    let report = |args: &[&str]| {
        Command::new(&perf)
            .arg("report")
            .arg("-i")
            .arg(&data)
            .args(["--stdio", "--no-children"])
            .args(args)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let strip = |text: String, max: usize| {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(max)
            .map(|l| l.trim_end().trim_end_matches(['-', ' ']).to_owned())
            .collect::<Vec<_>>()
    };
    let by_dso = strip(report(&["--sort", "dso", "-g", "none"]), 8);
    let symbols = strip(report(&["--sort", "dso,symbol", "-g", "none", "--percent-limit", "0.3"]), 400);
    if symbols.is_empty() {
        return None;
    }
    // Where the time goes, by kind of work.
    let mut kinds: Vec<(&str, f64)> = KINDS.iter().map(|(name, _)| (*name, 0.0)).collect();
    let mut other = 0.0;
    for line in &symbols {
        let percent: f64 = line.split('%').next().and_then(|p| p.trim().parse().ok()).unwrap_or(0.0);
        match KINDS.iter().position(|(_, needles)| needles.iter().any(|n| line.contains(n))) {
            Some(i) => kinds[i].1 += percent,
            None => other += percent,
        }
    }
    let mut summary: String = kinds.iter().map(|(name, p)| format!("| {name} | {p:.1}% |\n")).collect();
    summary += &format!("| everything else (symbols >= 0.3%) | {other:.1}% |\n");
    let top = symbols.iter().take(40).cloned().collect::<Vec<_>>().join("\n");
    Some(format!(
        "Postern during 50 concurrent login loops ({:.0} logins/s while sampled at 999 Hz, `perf record -g`).\n\n| work | share of samples |\n|---|---:|\n{summary}\nBy shared object:\n\n```\n{}\n```\n\nTop symbols (self time):\n\n```\n{top}\n```\n",
        rate.per_sec,
        by_dso.join("\n")
    ))
}

/// Symbol fragments of each kind of work in the profile.
const KINDS: &[(&str, &[&str])] = &[
    (
        "TLS crypto (aws-lc: key exchange, signatures, hashes, AES-GCM)",
        &[
            "aws_lc",
            "curve25519",
            "x25519",
            "ecp_nistz256",
            "sha256",
            "sha512",
            "aes_",
            "gcm_",
            "bn_",
            "ecdsa",
            "p256",
            "fiat_",
        ],
    ),
    ("kernel (TCP, scheduling, syscalls)", &["[k]"]),
    ("allocator (malloc/free)", &["malloc", "free", "_int_", "unlink_chunk", "realloc", "calloc"]),
    ("memory copies", &["memmove", "memcpy", "memset"]),
];

/// Writes the results file.
pub fn write(
    path: &Path,
    conditions: &str,
    plan: &Plan,
    table: Option<&str>,
    balanced: Option<&str>,
    profile: Option<&str>,
) {
    let mut text = String::from("# Pipeline benchmark results\n\nWritten by `cargo bench --bench pipeline`");
    let sessions: Vec<String> = plan.sessions.iter().map(usize::to_string).collect();
    let _ = write!(
        text,
        " (targets: {}; idle sessions: {}; login clients: {:?}, {} s each; rounds: {}).\n\n## Conditions\n\n{conditions}\n\n",
        std::env::var("POSTERN_BENCH_TARGETS").unwrap_or_else(|_| "default".into()),
        sessions.join(", "),
        plan.clients,
        plan.login_secs,
        plan.rounds
    );
    if let Some(table) = table {
        let _ = write!(text, "## Results\n\n{table}\n");
    }
    if let Some(balanced) = balanced {
        let _ = writeln!(text, "{balanced}");
    }
    if let Some(profile) = profile {
        let _ = write!(text, "## Login path profile\n\n{profile}\n");
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("cannot write {}: {e}", path.display());
    }
}

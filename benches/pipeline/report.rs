//! The results table, the run's conditions, the login-path profile and the results file.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::Plan;
use crate::load::{self, Idle, LoginRate, Target};
use crate::targets;

/// What one target measured.
#[derive(Default)]
pub struct Row {
    /// Column name.
    pub name: &'static str,
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
    /// RSS after all workloads, KiB.
    pub peak_kib: u64,
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A markdown table, one column per target, with Postern's ratios to each peer.
pub fn table(rows: &[Row], plan: &Plan) -> String {
    let postern = rows.iter().find(|r| r.name == "Postern");
    let peers: Vec<&Row> = rows.iter().filter(|r| r.name != "Postern" && r.name != "Dovecot direct").collect();
    let mut out = String::new();
    let mut header = "| workload |".to_owned();
    let mut rule = "|---|".to_owned();
    for row in rows {
        header += &format!(" {} |", row.name);
        rule += "---:|";
    }
    for peer in &peers {
        header += &format!(" Postern / {} |", peer.name);
        rule += "---:|";
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let ratio = |p: Option<f64>, q: Option<f64>| match (p, q) {
        (Some(p), Some(q)) if q > 0.0 => format!("{:.2}x", p / q),
        _ => "-".to_owned(),
    };
    let mut line = |label: String, value: &dyn Fn(&Row) -> Option<f64>, cell: &dyn Fn(&Row) -> String| {
        let mut text = format!("| {label} |");
        for row in rows {
            text += &format!(" {} |", cell(row));
        }
        for peer in &peers {
            text += &format!(" {} |", ratio(postern.and_then(value), value(peer)));
        }
        let _ = writeln!(out, "{text}");
    };
    line(format!("FETCH {} MiB x{}, MB/s", plan.message_mb, plan.fetches), &|r| r.throughput, &|r| {
        r.throughput.map(|t| format!("{t:.0}")).unwrap_or_else(|| "-".into())
    });
    line("CPU ms of the proxy per 100 MB of FETCH".into(), &|r| r.cpu_per_100mb, &|r| {
        r.cpu_per_100mb.map(|c| format!("{c:.0}")).unwrap_or_else(|| "-".into())
    });
    for &clients in &plan.clients {
        fn get(r: &Row, clients: usize) -> Option<&LoginRate> {
            r.logins.iter().find(|(c, _)| *c == clients).map(|(_, l)| l)
        }
        line(
            format!("logins/s, {clients} clients (p50 / p99 ms)"),
            &move |r| get(r, clients).map(|l| l.per_sec),
            &move |r| match get(r, clients) {
                Some(l) if l.errors == 0 => format!("{:.0} ({} / {})", l.per_sec, ms(l.p50), ms(l.p99)),
                Some(l) => format!("{:.0} ({} / {}, {} errors)", l.per_sec, ms(l.p50), ms(l.p99), l.errors),
                None => "-".into(),
            },
        );
    }
    for &n in &plan.sessions {
        fn get(r: &Row, n: usize) -> Option<&Idle> {
            r.idle.iter().find(|(c, _)| *c == n).map(|(_, i)| i)
        }
        line(
            format!("idle KiB/session, {n} sessions in IDLE"),
            &move |r| get(r, n).map(Idle::per_session_kib),
            &move |r| match get(r, n) {
                Some(i) if i.errors == 0 => format!("{:.1}", i.per_session_kib()),
                Some(i) => format!("{:.1} ({} of {n} opened)", i.per_session_kib(), i.sessions),
                None => "-".into(),
            },
        );
    }
    let direct = rows.iter().find(|r| r.name == "Dovecot direct").and_then(|r| r.noop).map(|(p50, _)| us(p50));
    line("NOOP round trip p50 / p99, µs".into(), &|r| r.noop.map(|(p50, _)| us(p50)), &|r| {
        r.noop.map(|(p50, p99)| format!("{:.0} / {:.0}", us(p50), us(p99))).unwrap_or_else(|| "-".into())
    });
    line(
        "added NOOP latency vs direct (p50), µs".into(),
        &|r| Some(r.noop.map(|(p50, _)| us(p50))? - direct?),
        &|r| match (r.noop, direct) {
            (Some((p50, _)), Some(d)) => format!("{:.0}", us(p50) - d),
            _ => "-".into(),
        },
    );
    line("RSS after the run, MiB".into(), &|r| (r.peak_kib > 0).then_some(r.peak_kib as f64 / 1024.0), &|r| {
        if r.peak_kib > 0 { format!("{:.1}", r.peak_kib as f64 / 1024.0) } else { "-".into() }
    });
    out
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
        " (targets: {}; idle sessions: {}; login clients: {:?}, {} s each).\n\n## Conditions\n\n{conditions}\n\n",
        std::env::var("POSTERN_BENCH_TARGETS").unwrap_or_else(|_| "default".into()),
        sessions.join(", "),
        plan.clients,
        plan.login_secs
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

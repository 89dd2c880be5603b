//! `postern serve` as systemd runs it: readiness and reload notifications, live reload that
//! keeps sessions, the profiles watch, closing sessions whose user lost access, SIGTERM
//! draining, metrics and the control socket. Runs the real binary against Dovecot.

use crate::common;
use crate::install;

use std::time::{Duration, Instant};

use common::client::{self, MailClient};
use install::{Daemon, Install, expect_code, profiles_for, scrape};

async fn connect(daemon: &Daemon, install: &Install) -> MailClient {
    let mut c = client::connect_tls(daemon.imaps, &install.ca_file).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c
}

/// Logs in and returns the open session; panics unless the login succeeds.
async fn session(daemon: &Daemon, install: &Install, user: &str) -> MailClient {
    let mut c = connect(daemon, install).await;
    let answer = c.tagged("l1", &format!("LOGIN {user} dir-pw")).await;
    assert!(answer.starts_with("l1 OK"), "login of {user}: {answer}\n{}", daemon.log());
    c
}

async fn login_answer(daemon: &Daemon, install: &Install, user: &str) -> String {
    let mut c = connect(daemon, install).await;
    c.tagged("l1", &format!("LOGIN {user} dir-pw")).await
}

async fn still_works(c: &mut MailClient) {
    assert!(c.tagged("n1", "NOOP").await.starts_with("n1 OK"));
}

/// Waits until the audit file has a line for `user` containing `needle`.
fn wait_for_audit(install: &Install, user: &str, needle: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = install::audit_lines(&install.path("audit.jsonl"));
        if let Some(line) = lines.iter().find(|l| l["user"] == user && l.to_string().contains(needle)) {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "no audit line for {user} with {needle:?}: {lines:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A JSON log line's `timestamp` (RFC 3339, UTC) in microseconds since the Unix epoch.
fn log_time(line: &str) -> i64 {
    let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let stamp = value["timestamp"].as_str().unwrap_or_else(|| panic!("no timestamp: {line}"));
    let parse = |range: std::ops::Range<usize>| -> i64 {
        stamp.get(range).and_then(|d| d.parse().ok()).unwrap_or_else(|| panic!("odd timestamp {stamp:?}"))
    };
    let (year, month, day) = (parse(0..4), parse(5..7), parse(8..10));
    let (hour, minute, second) = (parse(11..13), parse(14..16), parse(17..19));
    let fraction = stamp[19..].strip_prefix('.').map_or("", |f| f.trim_end_matches('Z'));
    let micros: i64 = format!("{fraction:0<6}")[..6].parse().unwrap_or_else(|_| panic!("odd timestamp {stamp:?}"));
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    ((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_login_and_status_reports_the_last_upstream_result() {
    let install = Install::new(&profiles_for(&["m1@example.com"]), "", "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    install.add_user("m1@example.com", "dir-pw");
    let daemon = Daemon::start(&install);
    let metrics = daemon.metrics.expect("metrics address logged");

    let mut c = session(&daemon, &install, "m1@example.com").await;
    assert!(login_answer(&daemon, &install, "m1@example.com").await.starts_with("l1 OK"));
    let mut wrong = connect(&daemon, &install).await;
    assert!(wrong.tagged("w1", "LOGIN m1@example.com not-the-pw").await.starts_with("w1 NO"));

    let text = scrape(metrics);
    assert_eq!(metric(&text, "postern_logins_total{outcome=\"ok\",reason=\"ok\"}"), 2);
    assert_eq!(metric(&text, "postern_logins_total{outcome=\"denied\",reason=\"wrong password\"}"), 1);
    assert!(metric(&text, "postern_sessions_total{protocol=\"imap\"}") >= 3);
    assert!(metric(&text, "postern_sessions_active{protocol=\"imap\"}") >= 1);
    assert_eq!(metric(&text, "postern_login_seconds_count"), 3);
    assert_eq!(metric(&text, "postern_directory_seconds_count"), 6, "a lookup and a password check per login");
    assert_eq!(metric(&text, "postern_upstream_login_seconds_count"), 2);

    let out = expect_code(&install.run(&["status", "--user", "m1@example.com"], ""), 0);
    assert!(out.contains("uptime:") && out.contains("imap: "), "{out}");
    assert!(out.contains("m1@example.com: last upstream login") && out.contains(": OK"), "{out}");
    let out = expect_code(&install.run(&["status", "--user", "never@example.com"], ""), 0);
    assert!(out.contains("no upstream login since the daemon started"), "{out}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(install.path("state/control.sock")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    still_works(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_sessions_applies_profiles_rejects_broken_files_and_closes_revoked_users() {
    let install = Install::new(
        &profiles_for(&["r1@example.com"]),
        "watch_profiles = false",
        "[metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    install.add_user("r1@example.com", "dir-pw");
    install.add_user("r2@example.com", "dir-pw");
    let mut daemon = Daemon::start(&install);
    let mut r1 = session(&daemon, &install, "r1@example.com").await;
    assert!(login_answer(&daemon, &install, "r2@example.com").await.starts_with("l1 NO"));

    std::fs::write(install.path("profiles.toml"), profiles_for(&["r1@example.com", "r2@example.com"])).unwrap();
    daemon.signal("HUP");
    let reloading = daemon.expect_notify("RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    daemon.expect_notify("READY=1");
    let mut r2 = session(&daemon, &install, "r2@example.com").await;
    still_works(&mut r1).await;

    std::fs::write(install.path("profiles.toml"), "[[profile]]\nname = \"broken\"\nallow = [\"not-an-address\"]\n")
        .unwrap();
    daemon.signal("HUP");
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
    daemon.wait_for_log(&["reload failed", "not-an-address"]);
    still_works(&mut r1).await;
    still_works(&mut r2).await;
    assert!(login_answer(&daemon, &install, "r2@example.com").await.starts_with("l1 OK"), "old profiles stay in force");
    assert_eq!(metric(&scrape(daemon.metrics.unwrap()), "postern_reloads_total{result=\"failed\"}"), 1);

    std::fs::write(install.path("profiles.toml"), profiles_for(&["r1@example.com"])).unwrap();
    daemon.signal("HUP");
    daemon.expect_notify("READY=1");
    r2.expect_closed().await;
    let line = wait_for_audit(&install, "r2@example.com", "closed: profile change no longer allows this client");
    assert_eq!(line["outcome"], "logged-in");
    still_works(&mut r1).await;

    expect_code(&install.run(&["user", "remove", "r1@example.com"], ""), 0);
    daemon.signal("HUP");
    r1.expect_closed().await;
    wait_for_audit(&install, "r1@example.com", "closed: the user's upstream credential was removed from the vault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profile_edits_apply_without_a_reload() {
    let install = Install::new(&profiles_for(&["w1@example.com"]), "", "");
    install.add_user("w1@example.com", "dir-pw");
    install.add_user("w2@example.com", "dir-pw");
    let daemon = Daemon::start(&install);
    let mut w1 = session(&daemon, &install, "w1@example.com").await;

    std::fs::write(install.path("profiles.toml"), "[[profile]\nbroken").unwrap();
    daemon.wait_for_log(&["the changed profiles file is invalid"]);
    still_works(&mut w1).await;
    assert!(login_answer(&daemon, &install, "w1@example.com").await.starts_with("l1 OK"));

    std::fs::write(install.path("profiles.toml"), profiles_for(&["w2@example.com"])).unwrap();
    w1.expect_closed().await;
    wait_for_audit(
        &install,
        "w1@example.com",
        "closed: profile change no longer allows this client (no profile applies to the user)",
    );
    assert!(login_answer(&daemon, &install, "w2@example.com").await.starts_with("l1 OK"));
    assert!(login_answer(&daemon, &install, "w1@example.com").await.starts_with("l1 NO"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_lets_sessions_finish_then_closes_them() {
    let install = Install::new(&profiles_for(&["t1@example.com", "t2@example.com"]), "shutdown_grace_secs = 2", "");
    install.add_user("t1@example.com", "dir-pw");
    install.add_user("t2@example.com", "dir-pw");
    let mut daemon = Daemon::start(&install);
    let mut finishing = session(&daemon, &install, "t1@example.com").await;
    let mut lingering = session(&daemon, &install, "t2@example.com").await;

    daemon.signal("TERM");
    daemon.expect_notify("STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(daemon.imaps).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    still_works(&mut finishing).await;
    still_works(&mut lingering).await;
    assert!(finishing.tagged("o1", "LOGOUT").await.starts_with("o1 OK"));
    wait_for_audit(&install, "t1@example.com", "\"reason\":\"closed\"");

    lingering.expect_closed().await;
    let code = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{}", daemon.log());
    wait_for_audit(&install, "t2@example.com", "server shutdown");
    // The lingering session was closed when the 2 s grace ended, by the daemon's own clock.
    let stopping = log_time(&daemon.wait_for_log(&["stopping: no new connections"]));
    let over = daemon.wait_for_log(&["grace period over"]);
    assert!(over.contains("\"sessions\":1"), "one session was left to close: {over}");
    let grace = log_time(&over) - stopping;
    assert!(grace >= 2_000_000, "the remaining session was closed {grace} µs after the stop began, before the grace");
    assert!(!install.path("state/control.sock").exists(), "the control socket is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_users_show_in_status_and_unlock_lifts_the_lock() {
    let lockout = "\n[lockout]\nmax_failures = 2\nfailure_delay_ms = 0\n";
    let install = Install::new(&profiles_for(&["lock1@example.com"]), "", lockout);
    install.add_user("lock1@example.com", "dir-pw");
    let daemon = Daemon::start(&install);

    let mut c = connect(&daemon, &install).await;
    for tag in ["w1", "w2"] {
        assert!(c.tagged(tag, "LOGIN lock1@example.com wrong").await.starts_with(&format!("{tag} NO")));
    }
    assert!(login_answer(&daemon, &install, "lock1@example.com").await.starts_with("l1 NO"), "locked");
    let status = expect_code(&install.run(&["status"], ""), 0);
    assert!(status.contains("locked users: 1") && status.contains("lock1@example.com"), "{status}");

    let out = expect_code(&install.run(&["user", "unlock", "Lock1@Example.com"], ""), 0);
    assert!(out.contains("lock1@example.com unlocked"), "{out}");
    assert!(login_answer(&daemon, &install, "lock1@example.com").await.starts_with("l1 OK"));
    let out = expect_code(&install.run(&["user", "unlock", "lock1@example.com"], ""), 0);
    assert!(out.contains("was not locked"), "{out}");
    let (_, err) = install::text(&install.run(&["user", "unlock", "bad name"], ""));
    assert!(err.contains("not a usable user name"), "{err}");
}

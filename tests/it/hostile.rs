//! Hostile input before login: every case is answered with a protocol error or a close, and
//! afterwards the proxy still serves a normal login from another client.
//!
//! Timeouts are checked by what the proxy says caused the close (its log and audit lines), not
//! by a stopwatch; freed slots by retrying until they are free.

use crate::common;
use crate::install;

use std::net::SocketAddr;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::mail::b64;
use common::proxy::{self, Options, Proxy, TestUser};
use install::{Daemon, Install, scrape};
use tokio::io::AsyncWriteExt;

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

async fn start(uid: &str, options: Options) -> (Proxy, TestUser) {
    logs::capture();
    let mail = format!("{uid}@example.com");
    let proxy = Proxy::start(Options { profiles: proxy::profile_for(&[&mail]), ..options }).await;
    let user = proxy::add_user(&proxy, uid, &format!("{uid}-pw"));
    (proxy, user)
}

async fn connect(proxy: &Proxy) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c
}

/// A normal login on a fresh connection still works.
async fn still_serves(proxy: &Proxy, user: &TestUser) {
    let mut c = connect(proxy).await;
    c.send(format!("z1 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    let answer = c.read_until_tagged("z1").await.pop().unwrap();
    assert!(answer.starts_with("z1 OK"), "after the attack, a normal login failed: {answer}");
}

/// How long a freed slot may take to be seen free before the test fails.
const SLOT_DEADLINE: Duration = Duration::from_secs(30);

/// Logs in on fresh connections until the login is no longer refused as busy (a slot the test
/// freed is released when the proxy has seen the connection end); panics on any other answer
/// or when the slot is still taken after [`SLOT_DEADLINE`].
async fn serves_once_a_slot_is_free(proxy: &Proxy, user: &TestUser) {
    let deadline = tokio::time::Instant::now() + SLOT_DEADLINE;
    loop {
        let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
        let greeting = c.read_line().await;
        if greeting.starts_with("* OK") {
            c.send(format!("z1 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
            let answer = c.read_until_tagged("z1").await.pop().unwrap();
            if answer.starts_with("z1 OK") {
                return;
            }
            assert!(answer.starts_with("z1 NO [UNAVAILABLE]"), "after the slot was freed: {answer}");
        } else {
            assert!(greeting.starts_with("* BYE [UNAVAILABLE]"), "after the slot was freed: {greeting}");
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot is still taken after {SLOT_DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of a metric series in the proxy's Prometheus text.
fn metric(proxy: &Proxy, series: &str) -> u64 {
    let text = proxy.server().metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Waits for the audit line of the session from `client` and checks its outcome and reason.
async fn expect_session_audit(client: SocketAddr, outcome: &str, reason: &str) {
    let client_field = format!("\"client\":\"{client}\"");
    let outcome_field = format!("\"outcome\":\"{outcome}\"");
    let reason_field = format!("\"reason\":\"{reason}\"");
    logs::wait_for_line(&[
        "\"target\":\"audit\"",
        "\"message\":\"session\"",
        &client_field,
        &outcome_field,
        &reason_field,
    ])
    .await;
}

fn short_limits() -> Options {
    Options {
        limits: "preauth_timeout_secs = 2\nhandshake_timeout_secs = 1\nmax_line = 1024\nmax_literal = 4096".to_owned(),
        ..Options::default()
    }
}

#[tokio::test]
async fn over_long_line_is_refused_and_closed() {
    let (proxy, user) = start("hostile-line", short_limits()).await;
    let mut c = connect(&proxy).await;
    c.send(&vec![b'a'; 5000]).await;
    assert_eq!(c.read_line().await, "* BYE Line too long");
    c.expect_closed().await;
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn huge_literals_are_refused() {
    let (proxy, user) = start("hostile-literal", short_limits()).await;
    let mut c = connect(&proxy).await;
    c.send(b"h1 LOGIN {999999999}\r\n").await;
    let answer = c.read_line().await;
    assert!(answer.starts_with("h1 BAD"), "synchronizing literal over the limit: {answer}");
    c.send(b"h2 LOGIN user {999999+}\r\n").await;
    assert_eq!(c.read_line().await, "* BYE Literal too large");
    c.expect_closed().await;
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn literal_announced_but_never_sent_times_out() {
    let (proxy, user) = start("hostile-nolit", short_limits()).await;
    let mut c = connect(&proxy).await;
    c.send(b"n1 LOGIN {20}\r\n").await;
    assert!(c.read_line().await.starts_with('+'));
    let bye = c.read_line().await;
    assert!(bye.starts_with("* BYE"), "{bye}");
    c.expect_closed().await;
    // The pre-login timeout closed it, not a limit or an error.
    expect_session_audit(c.local_addr(), "timeout", "no login within the pre-login timeout").await;
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn binary_garbage_gets_errors_then_a_close() {
    let (proxy, user) = start("hostile-garbage", short_limits()).await;
    let mut c = connect(&proxy).await;
    let mut garbage = Vec::new();
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..600 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        garbage.push((x & 0xff) as u8);
    }
    for _ in 0..20 {
        garbage.extend_from_slice(b"\x00\xff\xfe garbage \x01\r\n");
    }
    c.send(&garbage).await;
    let rest = c.read_to_end_or_close().await;
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("BAD"), "{text}");
    assert!(text.contains("* BYE"), "too many bad commands end the connection: {text}");
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn invalid_base64_in_sasl_is_a_protocol_error() {
    let (proxy, user) = start("hostile-b64", Options::default()).await;
    let mut c = connect(&proxy).await;
    c.send(b"b1 AUTHENTICATE PLAIN !!!not-base64!!!\r\n").await;
    let answer = c.read_until_tagged("b1").await.pop().unwrap();
    assert!(answer.starts_with("b1 BAD"), "{answer}");
    c.send(b"b2 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(b"%%%%\r\n").await;
    assert!(c.read_until_tagged("b2").await.pop().unwrap().starts_with("b2 BAD"));
    // The same connection is still in step and can log in.
    c.send(format!("b3 AUTHENTICATE PLAIN {}\r\n", b64(format!("\0{}\0{}", user.mail, user.password))).as_bytes())
        .await;
    assert!(c.read_until_tagged("b3").await.pop().unwrap().starts_with("b3 OK"));
}

#[tokio::test]
async fn nul_cr_lf_in_user_names_never_reach_the_directory_or_upstream() {
    let (proxy, user) = start("hostile-nul", Options::default()).await;
    let dovecot = common::dovecot::dovecot();
    let directory_before = metric(&proxy, "postern_directory_seconds_count");
    let upstream_before = metric(&proxy, "postern_upstream_login_seconds_count");
    let dovecot_log_before = dovecot.log().len();

    let mut c = connect(&proxy).await;
    let name = format!("{}\0x", user.mail);
    c.send(format!("u1 LOGIN {{{}+}}\r\n{name} {}\r\n", name.len(), user.password).as_bytes()).await;
    let answer = c.read_until_tagged("u1").await.pop().unwrap();
    assert!(answer.starts_with("u1 BAD") || answer.starts_with("u1 NO"), "{answer}");
    let plain = b64(format!("\0{}\r\nA1 LOGOUT\0{}", user.mail, user.password));
    c.send(format!("u2 AUTHENTICATE PLAIN {plain}\r\n").as_bytes()).await;
    let answer = c.read_until_tagged("u2").await.pop().unwrap();
    assert!(!answer.starts_with("u2 OK"), "{answer}");
    drop(c);

    // The proxy asked neither its directory nor the upstream anything.
    assert_eq!(metric(&proxy, "postern_directory_seconds_count"), directory_before, "a directory query was made");
    assert_eq!(metric(&proxy, "postern_upstream_login_seconds_count"), upstream_before, "an upstream login was made");

    // A normal login afterwards reaches Dovecot; nothing Dovecot logged before it (its auth
    // process logs every failed attempt) carries the injected names.
    still_serves(&proxy, &user).await;
    assert!(metric(&proxy, "postern_directory_seconds_count") > directory_before, "the counter counts");
    assert_eq!(metric(&proxy, "postern_upstream_login_seconds_count"), upstream_before + 1);
    let login = format!("Login: user=<{}>", user.mail);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let log = loop {
        let log = dovecot.log();
        if log[dovecot_log_before..].contains(&login) {
            break log;
        }
        assert!(std::time::Instant::now() < deadline, "no {login:?} in Dovecot's log:\n{}", dovecot.log_tail(30));
        std::thread::sleep(Duration::from_millis(50));
    };
    let upstream_log = &log[dovecot_log_before..];
    for injected in ["@example.com\0x", "@example.com\\0x", "A1 LOGOUT", "example.comx"] {
        assert!(!upstream_log.contains(injected), "Dovecot saw {injected:?}:\n{upstream_log}");
    }
    let before_login = &upstream_log[..upstream_log.find(&login).expect("login line")];
    assert!(
        !before_login.contains("hostile-nul"),
        "Dovecot heard of the user before the normal login:\n{upstream_log}"
    );
}

#[tokio::test]
async fn plaintext_to_the_tls_port_is_closed() {
    let (proxy, user) = start("hostile-plain", short_limits()).await;
    let mut c = client::connect_plain(proxy.imaps).await;
    c.send(b"a1 LOGIN alice secret\r\n").await;
    let reply = c.read_to_end_or_close().await;
    assert!(!String::from_utf8_lossy(&reply).contains("OK"), "no IMAP answer over plaintext");
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn abandoned_tls_handshake_is_closed_after_the_handshake_timeout() {
    let (proxy, user) = start("hostile-handshake", short_limits()).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.imaps).await.unwrap();
    let local = tcp.local_addr().unwrap();
    // The first bytes of a TLS ClientHello record, then silence.
    tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncReadExt::read(&mut tcp, &mut buf))
        .await
        .expect("the proxy closes a stalled handshake")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // The handshake timeout closed it, not a TLS error.
    logs::wait_for_line(&["TLS handshake timed out", &format!("\"peer\":\"{local}\"")]).await;
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn slowloris_is_cut_off_by_the_pre_login_timeout() {
    let (proxy, user) = start("hostile-slow", short_limits()).await;
    let mut c = connect(&proxy).await;
    let local = c.local_addr();
    // One byte every half second: the line is never finished before the proxy gives up.
    let command = b"s1 LOGIN someone@example.com password\r\n";
    let mut sent = 0;
    for byte in command {
        if c.try_send(&[*byte]).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rest = String::from_utf8_lossy(&c.read_to_end_or_close().await).into_owned();
    assert!(rest.contains("* BYE Autologout"), "the pre-login timeout said goodbye: {rest}");
    assert!(sent < command.len(), "the proxy closed the connection before the slow line was complete");
    expect_session_audit(local, "timeout", "no login within the pre-login timeout").await;
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_user_and_a_right_one_does_not_tell() {
    let lockout = "failure_delay_ms = 0\nmax_failures = 3\nwindow_secs = 600\nlock_secs = 600".to_owned();
    let (proxy, user) = start("hostile-lock", Options { lockout, ..Options::default() }).await;
    let mut c = connect(&proxy).await;
    for i in 0..3 {
        c.send(format!("l{i} LOGIN {} wrong-{i}\r\n", user.mail).as_bytes()).await;
        assert_eq!(c.read_until_tagged(&format!("l{i}")).await.pop().unwrap(), format!("l{i} {DENIAL}"));
    }
    let mut c = connect(&proxy).await;
    c.send(format!("l9 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    assert_eq!(
        c.read_until_tagged("l9").await.pop().unwrap(),
        format!("l9 {DENIAL}"),
        "locked: the right password is refused alike"
    );
    drop(c);
    logs::wait_for_audit(&user.mail, &["locked out after repeated password failures"]).await;
    assert!(proxy.server().counters.unlock(&user.mail).await.expect("memory store"));
    still_serves(&proxy, &user).await;
}

#[tokio::test]
async fn refusals_are_delayed() {
    let lockout = "failure_delay_ms = 400".to_owned();
    let (proxy, user) = start("hostile-delay", Options { lockout, ..Options::default() }).await;
    let mut c = connect(&proxy).await;
    let started = std::time::Instant::now();
    c.send(format!("d1 LOGIN {} wrong\r\n", user.mail).as_bytes()).await;
    assert_eq!(c.read_until_tagged("d1").await.pop().unwrap(), format!("d1 {DENIAL}"));
    assert!(started.elapsed() >= Duration::from_millis(400), "the refusal waited for the failure delay");
}

/// Runs the real daemon, so its memory is measured apart from this test process (where other
/// tests run at the same time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_from_one_address_do_not_stop_service() {
    let mail = "hostile-flood@example.com";
    let profiles = format!("[[profile]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\nusers = [\"{mail}\"]\n");
    let install = Install::new(&profiles, "", "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let text = install.config_text().replace(
        "[limits]\n",
        "[limits]\npreauth_timeout_secs = 2\nhandshake_timeout_secs = 1\nmax_line = 1024\nmax_literal = 4096\n",
    );
    std::fs::write(&install.config, text).expect("write config");
    install.add_user(mail, "flood-pw");
    let daemon = Daemon::start(&install);
    let metrics = daemon.metrics.expect("metrics address logged");
    let daemon_serves = |from: &'static str| async {
        let mut c = client::connect_tls_from(from.parse().unwrap(), daemon.imaps, &install.ca_file).await;
        assert!(c.read_line().await.starts_with("* OK"));
        c.send(format!("z1 LOGIN {mail} flood-pw\r\n").as_bytes()).await;
        let answer = c.read_until_tagged("z1").await.pop().unwrap();
        assert!(answer.starts_with("z1 OK"), "a normal login failed: {answer}\n{}", daemon.log());
    };
    let failed_handshakes = || {
        let text = scrape(metrics);
        text.lines()
            .find_map(|l| l.strip_prefix("postern_tls_handshake_failures_total{protocol=\"imap\"}"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no handshake failure count in\n{text}"))
    };
    daemon_serves("127.0.0.1").await;
    let rss_before = common::rss_kib(daemon.pid());

    let mut sockets = Vec::new();
    for _ in 0..1000 {
        sockets.push(tokio::net::TcpStream::connect(daemon.imaps).await.expect("connect"));
    }
    // Beyond its unfinished-handshake cap the flooding address is turned away at accept;
    // everyone else is served.
    daemon_serves("127.0.0.2").await;
    drop(sockets);
    // Every one of them ends in a failed (closed or timed-out) handshake and its task ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while failed_handshakes() < 1000 {
        assert!(tokio::time::Instant::now() < deadline, "{} of 1,000 handshakes ended", failed_handshakes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon_serves("127.0.0.1").await;
    let growth = common::rss_kib(daemon.pid()).saturating_sub(rss_before);
    assert!(growth < 64 * 1024, "the daemon's memory grew by {growth} KiB after 1,000 connections closed");
}

#[tokio::test]
async fn connections_per_address_are_limited_politely() {
    let limits = "max_connections_per_ip = 3".to_owned();
    let (proxy, user) = start("hostile-perip", Options { limits, ..Options::default() }).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&proxy).await);
    }
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert_eq!(c.read_line().await, "* BYE [UNAVAILABLE] Too many connections from your address; try again later");
    c.expect_closed().await;
    // Another address is unaffected.
    let mut other = client::connect_tls_from("127.0.0.2".parse().unwrap(), proxy.imaps, &proxy.ca_file).await;
    assert!(other.read_line().await.starts_with("* OK"));
    drop(held);
    drop(other);
    serves_once_a_slot_is_free(&proxy, &user).await;
}

#[tokio::test]
async fn sessions_per_user_are_limited() {
    let limits = "max_sessions_per_user = 2".to_owned();
    let (proxy, user) = start("hostile-peruser", Options { limits, ..Options::default() }).await;
    let mut sessions = Vec::new();
    for i in 0..2 {
        let mut c = connect(&proxy).await;
        c.send(format!("s{i} LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
        assert!(c.read_until_tagged(&format!("s{i}")).await.pop().unwrap().starts_with(&format!("s{i} OK")));
        sessions.push(c);
    }
    let mut c = connect(&proxy).await;
    c.send(format!("s3 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    assert!(c.read_until_tagged("s3").await.pop().unwrap().starts_with("s3 NO [UNAVAILABLE]"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["too many concurrent sessions for the user (limit 2)"]).await;
    // Ending one session frees its slot.
    let mut first = sessions.remove(0);
    first.send(b"x LOGOUT\r\n").await;
    first.read_to_end_or_close().await;
    drop(first);
    serves_once_a_slot_is_free(&proxy, &user).await;
}

/// The reason the audit log gives for a PLAIN login whose authorization identity is not the user.
const AUTHZID_REASON: &str = "authorization identity differs from the user";

/// Options for the authzid tests: no delay, and an address throttled after two refusals.
fn throttle_after_two() -> Options {
    Options {
        lockout: "failure_delay_ms = 0\nmax_failures_per_ip = 2\nwindow_secs = 600".to_owned(),
        ..Options::default()
    }
}

/// SASL PLAIN for `user` asking to act as `bob`, with the user's own (right) password.
fn plain_as_bob(user: &TestUser) -> String {
    b64(format!("bob\0{}\0{}", user.mail, user.password))
}

/// After two authzid refusals from this address: the refusal was audited with its reason
/// and counted, and the address is throttled even for the right credentials.
async fn authzid_refusals_were_counted(proxy: &Proxy, user: &TestUser) {
    logs::wait_for_audit(&user.mail, &["\"outcome\":\"denied\"", AUTHZID_REASON]).await;
    let series = format!("postern_logins_total{{outcome=\"denied\",reason=\"{AUTHZID_REASON}\"}}");
    assert_eq!(metric(proxy, &series), 2, "both refusals counted under their own reason");
    let mut c = connect(proxy).await;
    c.send(format!("t1 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    assert_eq!(c.read_until_tagged("t1").await.pop().unwrap(), format!("t1 {DENIAL}"), "the address is throttled");
    logs::wait_for_audit(&user.mail, &["client IP throttled after repeated failed logins"]).await;
}

#[tokio::test]
async fn imap_authenticate_plain_with_a_foreign_authzid_is_a_counted_refusal() {
    let (proxy, user) = start("hostile-authzid-imap", throttle_after_two()).await;
    for i in 0..2 {
        let mut c = connect(&proxy).await;
        c.send(format!("p{i} AUTHENTICATE PLAIN {}\r\n", plain_as_bob(&user)).as_bytes()).await;
        assert_eq!(c.read_until_tagged(&format!("p{i}")).await.pop().unwrap(), format!("p{i} {DENIAL}"));
    }
    authzid_refusals_were_counted(&proxy, &user).await;
}

#[tokio::test]
async fn pop3_auth_plain_with_a_foreign_authzid_is_a_counted_refusal() {
    let (proxy, user) = start("hostile-authzid-pop3", throttle_after_two()).await;
    for _ in 0..2 {
        let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
        assert!(c.read_line().await.starts_with("+OK"));
        c.send(format!("AUTH PLAIN {}\r\n", plain_as_bob(&user)).as_bytes()).await;
        assert_eq!(c.read_line().await, "-ERR [AUTH] You are not allowed to access this server");
    }
    authzid_refusals_were_counted(&proxy, &user).await;
}

#[tokio::test]
async fn smtp_auth_plain_with_a_foreign_authzid_is_a_counted_refusal() {
    let (proxy, user) = start("hostile-authzid-smtp", throttle_after_two()).await;
    for _ in 0..2 {
        let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
        assert!(c.read_line().await.starts_with("220 "));
        c.send(b"EHLO client.example\r\n").await;
        while !c.read_line().await.starts_with("250 ") {}
        c.send(format!("AUTH PLAIN {}\r\n", plain_as_bob(&user)).as_bytes()).await;
        assert_eq!(c.read_line().await, "535 5.7.8 You are not allowed to access this server");
    }
    authzid_refusals_were_counted(&proxy, &user).await;
}

/// Literal size the memory test announces: within the default literal limit.
const PENDING_LITERAL: usize = 8000;
/// The pre-login buffer budget the memory test configures: room for about a hundred of them.
const SMALL_BUDGET: usize = 1024 * 1024;

/// Runs the real daemon, so its memory is measured apart from this test process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_literals_cost_a_bounded_amount_of_memory() {
    let mail = "hostile-literals@example.com";
    let profiles = format!("[[profile]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\nusers = [\"{mail}\"]\n");
    let install = Install::new(&profiles, "", "");
    let text = install.config_text().replace(
        "[limits]\n",
        &format!("[limits]\npreauth_timeout_secs = 120\npreauth_buffer_budget = {SMALL_BUDGET}\n"),
    );
    std::fs::write(&install.config, text).expect("write config");
    install.add_user(mail, "literal-pw");
    let daemon = Daemon::start(&install);
    let ca = install.ca_file.clone();
    let serves = |from: &'static str| {
        let ca = ca.clone();
        async move {
            let mut c = client::connect_tls_from(from.parse().unwrap(), daemon.imaps, &ca).await;
            assert!(c.read_line().await.starts_with("* OK"));
            c.send(format!("z1 LOGIN {mail} literal-pw\r\n").as_bytes()).await;
            let answer = c.read_until_tagged("z1").await.pop().unwrap();
            assert!(answer.starts_with("z1 OK"), "a normal login failed: {answer}");
        }
    };
    serves("127.0.0.1").await;
    let rss_before = common::rss_kib(daemon.pid());

    // Four source addresses, a hundred connections each, every one announcing a literal and
    // sending half of it.
    const PER_ADDRESS: usize = 100;
    let imaps = daemon.imaps;
    let mut tasks = Vec::new();
    for host in 2..6 {
        let ca = ca.clone();
        tasks.push(tokio::spawn(async move {
            let from: std::net::IpAddr = format!("127.0.0.{host}").parse().unwrap();
            let mut held = Vec::new();
            // Refused connections stay open too: every connection costs what it costs.
            let mut refused = Vec::new();
            for _ in 0..PER_ADDRESS {
                let mut c = client::connect_tls_from(from, imaps, &ca).await;
                assert!(c.read_line().await.starts_with("* OK"));
                c.send(format!("m1 LOGIN {mail} {{{PENDING_LITERAL}}}\r\n").as_bytes()).await;
                let answer = c.read_line().await;
                if answer.starts_with('+') {
                    c.send(&vec![b'x'; PENDING_LITERAL / 2]).await;
                    held.push(c);
                } else {
                    assert!(answer.starts_with("m1 NO [LIMIT]"), "a literal beyond the budget: {answer}");
                    refused.push(c);
                }
            }
            (held, refused)
        }));
    }
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        let (mut h, mut r) = task.await.expect("client task");
        held.append(&mut h);
        refused.append(&mut r);
    }
    // Let the daemon read what was sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let growth = common::rss_kib(daemon.pid()).saturating_sub(rss_before);
    let connections = 4 * PER_ADDRESS;
    let per_connection = growth as f64 / connections as f64;
    eprintln!(
        "{connections} connections with a half-sent {PENDING_LITERAL}-byte literal: {} pending, {} refused; \
         RSS grew {growth} KiB, {per_connection:.1} KiB per connection",
        held.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "no literal was refused although {connections} of them exceed the budget");
    assert!(held.len() * PENDING_LITERAL <= SMALL_BUDGET, "{} literals pending beyond the budget", held.len());
    assert!(per_connection < 16.0, "{per_connection:.1} KiB per pending connection");

    // Service goes on, and once the pending literals are gone the budget is free again.
    serves("127.0.0.6").await;
    drop(held);
    drop(refused);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = client::connect_tls_from("127.0.0.7".parse().unwrap(), imaps, &ca).await;
        assert!(c.read_line().await.starts_with("* OK"));
        c.send(format!("m2 LOGIN {mail} {{{PENDING_LITERAL}}}\r\n").as_bytes()).await;
        if c.read_line().await.starts_with('+') {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the budget is still taken after the connections closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Paths users rely on, run against the real `postern` binary: a live session closed when
//! its user leaves a directory group, certificate and audit-file handling on SIGHUP
//! (including broken files that must leave the old state in force), IPv6 and dual-stack
//! listeners under the per-address limits and lockout, `[tls] min_version`, and an SMTP
//! STARTTLS upstream that fails before the login.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;
use crate::common::client::{self, MailClient};
use crate::common::mail::{b64, smtp_reply};
use crate::common::{dovecot, pki, slapd};
use crate::install::{self, Daemon, Install, scrape};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);

/// The root DN and password of the shared test slapd (`tests/common/slapd.rs`), for edits
/// its service account may not make.
const LDAP_ROOT_DN: &str = "cn=admin,dc=example,dc=com";
const LDAP_ROOT_PW: &str = "root-secret";

/// What a test's `proxy.toml` says beyond the common parts.
struct Conf {
    /// Check passwords against the shared slapd instead of the installation's users file.
    ldap: bool,
    /// Extra `[server]` lines.
    server: String,
    /// Extra `[tls]` lines.
    tls: String,
    /// The `[limits]` lines.
    limits: String,
    /// The `[lockout]` lines.
    lockout: String,
    /// IMAPS listen addresses (upstream: the shared Dovecot); none leaves `[imap]` out.
    imap_listen: Vec<&'static str>,
    /// An `[smtp]` listener whose upstream is this address, upgraded with STARTTLS.
    smtp_starttls_upstream: Option<SocketAddr>,
    /// Serve metrics on a free loopback port.
    metrics: bool,
}

impl Default for Conf {
    fn default() -> Self {
        Conf {
            ldap: false,
            server: String::new(),
            tls: String::new(),
            limits: "upstream_timeout_secs = 5".to_owned(),
            lockout: "failure_delay_ms = 0".to_owned(),
            imap_listen: vec!["127.0.0.1:0"],
            smtp_starttls_upstream: None,
            metrics: false,
        }
    }
}

/// Replaces the installation's config with one built from `conf` (same certificate,
/// profiles, vault, users file and audit file).
fn write_config(install: &Install, conf: &Conf) {
    let directory = if conf.ldap {
        let s = slapd::slapd();
        format!(
            "kind = \"ldap\"\nurl = {:?}\nbind_dn = {:?}\nbind_password = {:?}\nbase_dn = {:?}\nfilter = \"(mail={{user}})\"\ntimeout_secs = 5\n",
            s.url, s.service_dn, s.service_password, s.base_dn
        )
    } else {
        "kind = \"file\"\npath = \"users.toml\"\n".to_owned()
    };
    let mut text = format!(
        r#"[server]
hostname = "proxy.test"
state_dir = "state"
shutdown_grace_secs = 1
{server}

[tls]
cert = {cert:?}
key = {key:?}
{tls}

[limits]
{limits}

[lockout]
{lockout}

[directory]
{directory}

[access]
profiles = "profiles.toml"

[audit]
format = "json"
file = "audit.jsonl"
"#,
        server = conf.server,
        cert = install.path("proxy.crt").display().to_string(),
        key = install.path("proxy.key").display().to_string(),
        tls = conf.tls,
        limits = conf.limits,
        lockout = conf.lockout,
    );
    if conf.metrics {
        text.push_str("\n[metrics]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !conf.imap_listen.is_empty() {
        let d = dovecot::dovecot();
        let listen: Vec<String> = conf.imap_listen.iter().map(|a| format!("{a:?}")).collect();
        text.push_str(&format!(
            "\n[imap]\nlisten = [{}]\nupstream = \"localhost:{}\"\nupstream_ca_file = {:?}\n",
            listen.join(", "),
            d.imaps.port(),
            d.ca_file.display().to_string()
        ));
    }
    if let Some(upstream) = conf.smtp_starttls_upstream {
        text.push_str(&format!(
            "\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nupstream = \"{upstream}\"\nupstream_tls = \"starttls\"\n"
        ));
    }
    std::fs::write(&install.config, text).expect("write config");
}

/// An installation with `profiles`, configured as `conf` says.
fn installation(profiles: &str, conf: &Conf) -> Install {
    let install = Install::new(profiles, "", "");
    write_config(&install, conf);
    install
}

/// A profile named `name` allowing `allow` for `users`.
fn profile(name: &str, allow: &[&str], users: &[&str]) -> String {
    let quote = |items: &[&str]| items.iter().map(|i| format!("{i:?}")).collect::<Vec<_>>().join(", ");
    format!("[[profile]]\nname = {name:?}\nallow = [{}]\nusers = [{}]\n", quote(allow), quote(users))
}

/// Polls `probe` until it yields a value; panics with `what()` after [`DEADLINE`].
async fn eventually<T>(mut probe: impl FnMut() -> Option<T>, what: impl Fn() -> String) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {}", what());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The daemon's log lines (JSON) that contain every one of `needles`.
fn log_lines(daemon: &Daemon, needles: &[&str]) -> Vec<String> {
    daemon.log().lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned).collect()
}

/// Waits until the daemon has logged `count` lines with all of `needles`.
async fn wait_log_count(daemon: &Daemon, needles: &[&str], count: usize) -> Vec<String> {
    eventually(
        || Some(log_lines(daemon, needles)).filter(|l| l.len() >= count),
        || format!("{count} log line(s) with {needles:?}; log:\n{}", daemon.log()),
    )
    .await
}

/// The addresses the daemon listens on for `protocol`, once it has logged `count` of them.
async fn listeners(daemon: &Daemon, protocol: &str, count: usize) -> Vec<SocketAddr> {
    let lines = wait_log_count(daemon, &["\"listening\"", &format!("\"protocol\":\"{protocol}\"")], count).await;
    lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON log line");
            v["address"].as_str().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no address in {l}"))
        })
        .collect()
}

/// Waits until the audit file has a line for `user` containing each of `needles`.
async fn wait_audit(install: &Install, user: &str, needles: &[&str]) -> serde_json::Value {
    let path = install.path("audit.jsonl");
    eventually(
        || {
            install::audit_lines(&path).into_iter().find(|l| {
                let text = l.to_string();
                l["user"] == user && needles.iter().all(|n| text.contains(n))
            })
        },
        || {
            format!(
                "audit line for {user} with {needles:?}; file:\n{}",
                std::fs::read_to_string(&path).unwrap_or_default()
            )
        },
    )
    .await
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Sends SIGHUP and waits until the daemon says it is ready again.
fn reload(daemon: &mut Daemon) {
    daemon.signal("HUP");
    daemon.expect_notify("RELOADING=1");
    daemon.expect_notify("READY=1");
}

async fn connect(addr: SocketAddr, install: &Install) -> MailClient {
    let mut c = client::connect_tls(addr, &install.ca_file).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("* OK"), "greeting from {addr}: {greeting}");
    c
}

/// Logs in on a new connection and returns it; panics unless the login succeeds.
async fn session(addr: SocketAddr, install: &Install, user: &str, password: &str) -> MailClient {
    let mut c = connect(addr, install).await;
    let answer = c.tagged("l1", &format!("LOGIN {user} {password}")).await;
    assert!(answer.starts_with("l1 OK"), "login of {user} at {addr}: {answer}");
    c
}

/// The tagged answer to a login on a new connection.
async fn login_answer(addr: SocketAddr, install: &Install, user: &str, password: &str) -> String {
    let mut c = connect(addr, install).await;
    c.tagged("l1", &format!("LOGIN {user} {password}")).await
}

async fn still_works(c: &mut MailClient) {
    let answer = c.tagged("n1", "NOOP").await;
    assert!(answer.starts_with("n1 OK"), "NOOP on a live session: {answer}");
}

/// Runs `ldapmodify` as the slapd root DN with `ldif`; panics unless it succeeds.
fn ldapmodify(ldif: &str) {
    let tool = common::require_binary("ldapmodify", "ldap-utils");
    let mut child = Command::new(tool)
        .args(["-x", "-H", &slapd::slapd().url, "-D", LDAP_ROOT_DN, "-w", LDAP_ROOT_PW])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ldapmodify");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), ldif.as_bytes()).expect("write LDIF");
    let out = child.wait_with_output().expect("ldapmodify output");
    assert!(out.status.success(), "ldapmodify failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
}

/// The DER of the first certificate in the PEM file at `path`.
fn first_cert_der(path: &Path) -> Vec<u8> {
    let first = CertificateDer::pem_file_iter(path).expect("read PEM").next().expect("a certificate");
    first.expect("parse PEM").as_ref().to_vec()
}

/// The common name of a DER certificate.
fn common_name(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse certificate");
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned);
    cn.expect("a common name")
}

/// Handshakes with `addr` (trusting the test CA) and returns the leaf certificate it served.
async fn served_certificate(addr: SocketAddr, ca_file: &Path) -> Vec<u8> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(DEADLINE, client::tls_connector(ca_file).connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("server certificates")[0].as_ref().to_vec()
}

/// Adds `mail` to Dovecot with an upstream password and stores it in the installation's vault.
fn add_upstream(install: &Install, mail: &str) {
    let upstream = format!("up-{mail}-Pt4");
    dovecot::dovecot().add_user(mail, &upstream);
    install.set_upstream(mail, &upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_a_profile_group_closes_the_live_session_on_reload() {
    let s = slapd::slapd();
    let group = "paths-roamers";
    let profiles = format!("[[profile]]\nname = \"roamers\"\nallow = [\"127.0.0.1/32\"]\ngroups = [{group:?}]\n");
    let conf = Conf { ldap: true, server: "watch_profiles = false".to_owned(), metrics: true, ..Conf::default() };
    let install = installation(&profiles, &conf);
    let (leaver, stayer) = ("grp-leaver@example.com", "grp-stayer@example.com");
    s.add_user("grp-leaver", leaver, "leaver-pw", &[group]);
    s.add_user("grp-stayer", stayer, "stayer-pw", &[group]);
    add_upstream(&install, leaver);
    add_upstream(&install, stayer);
    let mut daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 1).await[0];

    let mut idling = session(imaps, &install, leaver, "leaver-pw").await;
    idling.send(b"i1 IDLE\r\n").await;
    let idle = idling.read_line().await;
    assert!(idle.starts_with('+'), "IDLE accepted: {idle}");
    let mut staying = session(imaps, &install, stayer, "stayer-pw").await;

    ldapmodify(&format!(
        "dn: {}\nchangetype: modify\ndelete: member\nmember: {}\n",
        s.group_dn(group),
        s.user_dn("grp-leaver")
    ));
    still_works(&mut staying).await;
    reload(&mut daemon);

    idling.expect_closed().await;
    let line = wait_audit(&install, leaver, &["\"event\":\"session\""]).await;
    assert_eq!(line["outcome"], "logged-in", "{line}");
    assert_eq!(
        line["reason"], "closed: profile change no longer allows this client (no profile applies to the user)",
        "{line}"
    );
    wait_log_count(&daemon, &["closing a live session", leaver], 1).await;
    assert_eq!(metric(&scrape(daemon.metrics.expect("metrics")), "postern_sessions_revoked_total"), 1);

    still_works(&mut staying).await;
    assert!(login_answer(imaps, &install, leaver, "leaver-pw").await.starts_with("l1 NO"), "no longer in the group");
    assert!(login_answer(imaps, &install, stayer, "stayer-pw").await.starts_with("l1 OK"));
    assert!(log_lines(&daemon, &["closing a live session", stayer]).is_empty(), "the member stays logged in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_a_renewed_certificate_and_keeps_sessions() {
    let user = "cert-renew@example.com";
    let install = installation(&profile("loopback", &["127.0.0.1/32"], &[user]), &Conf::default());
    install.add_user(user, "renew-pw");
    let mut daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 1).await[0];

    let old = served_certificate(imaps, &install.ca_file).await;
    assert_eq!(old, first_cert_der(&install.path("proxy.crt")));
    let mut live = session(imaps, &install, user, "renew-pw").await;

    let renewed = pki::pki().issue_in("proxy-renewed", install.dir.path());
    std::fs::write(install.path("proxy.crt"), std::fs::read(&renewed.cert_file).unwrap()).unwrap();
    std::fs::write(install.path("proxy.key"), std::fs::read(&renewed.key_file).unwrap()).unwrap();
    reload(&mut daemon);
    wait_log_count(&daemon, &["reload done"], 1).await;

    let new = served_certificate(imaps, &install.ca_file).await;
    assert_ne!(new, old, "a new handshake still sees the old certificate");
    assert_eq!(new, first_cert_der(&renewed.cert_file));
    assert_eq!(common_name(&new), "proxy-renewed");
    assert!(login_answer(imaps, &install, user, "renew-pw").await.starts_with("l1 OK"));
    still_works(&mut live).await;
}

/// What a reload must survive: a description, what its error must name, and how to break it.
type Breakage<'a> = (&'static str, &'static str, Box<dyn Fn() + 'a>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_certificate_or_vault_on_reload_keeps_the_old_ones() {
    let user = "keep-old@example.com";
    let conf = Conf { metrics: true, ..Conf::default() };
    let install = installation(&profile("loopback", &["127.0.0.1/32"], &[user]), &conf);
    install.add_user(user, "keep-pw");
    let mut daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 1).await[0];
    let metrics = daemon.metrics.expect("metrics");
    let old_cert = served_certificate(imaps, &install.ca_file).await;
    let good_cert_pem = std::fs::read(install.path("proxy.crt")).unwrap();
    let mut live = session(imaps, &install, user, "keep-pw").await;

    // Each broken state, what the reload error must name, and the repair before the next.
    let other = pki::pki().issue_in("proxy-other", install.dir.path());
    let breakages: [Breakage<'_>; 3] = [
        (
            "garbage certificate",
            "proxy.crt",
            Box::new(|| {
                std::fs::write(install.path("proxy.crt"), "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap()
            }),
        ),
        (
            "certificate not matching the key",
            "TLS configuration",
            Box::new(|| std::fs::write(install.path("proxy.crt"), std::fs::read(&other.cert_file).unwrap()).unwrap()),
        ),
        (
            "corrupt vault",
            "vault.toml",
            Box::new(|| {
                std::fs::write(install.path("proxy.crt"), &good_cert_pem).unwrap();
                std::fs::write(install.path("state/vault.toml"), "[[[ this is not a vault \u{0}\n").unwrap();
            }),
        ),
    ];
    for (round, (what, named, break_it)) in breakages.iter().enumerate() {
        break_it();
        reload(&mut daemon);
        let failed = wait_log_count(&daemon, &["reload failed"], round + 1).await;
        assert!(failed[round].contains(named), "{what}: the reload error names {named}: {}", failed[round]);
        let text = scrape(metrics);
        assert_eq!(metric(&text, "postern_reloads_total{result=\"failed\"}"), round as u64 + 1, "{what}");
        assert_eq!(metric(&text, "postern_reloads_total{result=\"ok\"}"), 0, "{what}");
        assert_eq!(served_certificate(imaps, &install.ca_file).await, old_cert, "{what}: old certificate served");
        let answer = login_answer(imaps, &install, user, "keep-pw").await;
        assert!(answer.starts_with("l1 OK"), "{what}: new logins work with the old state: {answer}");
        still_works(&mut live).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_is_reopened_after_rotation() {
    let (before, after) = ("rot-before@example.com", "rot-after@example.com");
    let install = installation(&profile("loopback", &["127.0.0.1/32"], &[before, after]), &Conf::default());
    install.add_user(before, "rot-pw");
    install.add_user(after, "rot-pw");
    let mut daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 1).await[0];

    let mut c = session(imaps, &install, before, "rot-pw").await;
    assert!(c.tagged("o1", "LOGOUT").await.starts_with("o1 OK"));
    wait_audit(&install, before, &["\"event\":\"session\""]).await;

    let rotated = install.path("audit.jsonl.1");
    std::fs::rename(install.path("audit.jsonl"), &rotated).unwrap();
    reload(&mut daemon);
    wait_log_count(&daemon, &["reload done"], 1).await;

    let mut c = session(imaps, &install, after, "rot-pw").await;
    assert!(c.tagged("o1", "LOGOUT").await.starts_with("o1 OK"));
    let line = wait_audit(&install, after, &["\"event\":\"session\""]).await;
    assert_eq!(line["outcome"], "logged-in", "{line}");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(install.path("audit.jsonl")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the new audit file is private");
    let old = install::audit_lines(&rotated);
    assert!(old.iter().any(|l| l["user"] == before), "{old:?}");
    assert!(!old.iter().any(|l| l["user"] == after), "a line after the reload went to the rotated file: {old:?}");
    let new = install::audit_lines(&install.path("audit.jsonl"));
    assert!(!new.iter().any(|l| l["user"] == before), "{new:?}");
}

/// Panics with a clear message unless this machine can bind the IPv6 loopback.
fn require_ipv6_loopback() {
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!("this test needs the IPv6 loopback address ::1 (cannot bind it: {e}); enable IPv6 on lo");
    }
}

/// Connects to `addr` as soon as the client's address has a free connection slot again
/// (a closed session releases its slot a moment after the client sees the close).
async fn connect_when_free(addr: SocketAddr, install: &Install) -> MailClient {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut c = client::connect_tls(addr, &install.ca_file).await;
        let greeting = c.read_line().await;
        if greeting.starts_with("* OK") {
            return c;
        }
        assert!(greeting.starts_with("* BYE [UNAVAILABLE] Too many connections"), "{greeting}");
        assert!(Instant::now() < deadline, "the address's connection slot was not freed within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three refused logins of an unknown user on one connection (the per-connection limit),
/// each counted against the client's address; the proxy then closes the connection.
async fn fail_three_logins(mut c: MailClient) {
    for tag in ["f1", "f2", "f3"] {
        let answer = c.tagged(tag, "LOGIN stranger@example.com nope").await;
        assert!(answer.starts_with(&format!("{tag} NO")), "{answer}");
    }
    c.expect_closed().await;
}

/// Asserts that a new connection to `addr` is turned away because its address is busy.
async fn expect_busy(addr: SocketAddr, install: &Install) {
    let mut c = client::connect_tls(addr, &install.ca_file).await;
    let bye = c.read_line().await;
    assert_eq!(bye, "* BYE [UNAVAILABLE] Too many connections from your address; try again later", "at {addr}");
    c.expect_closed().await;
}

async fn logout(mut c: MailClient) {
    assert!(c.tagged("o1", "LOGOUT").await.starts_with("o1 OK"));
    c.expect_closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_get_per_address_limits_and_lockout() {
    require_ipv6_loopback();
    let user = "six@example.com";
    let conf = Conf {
        limits: "max_connections_per_ip = 1".to_owned(),
        lockout: "failure_delay_ms = 0\nmax_failures_per_ip = 3".to_owned(),
        imap_listen: vec!["[::1]:0", "127.0.0.1:0"],
        ..Conf::default()
    };
    let install = installation(&profile("loopbacks", &["::1", "127.0.0.1/32"], &[user]), &conf);
    install.add_user(user, "six-pw");
    let daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 2).await;
    let v6 = *imaps.iter().find(|a| a.is_ipv6()).expect("an IPv6 listener");
    let v4 = *imaps.iter().find(|a| a.is_ipv4()).expect("an IPv4 listener");

    let held = session(v6, &install, user, "six-pw").await;
    expect_busy(v6, &install).await;
    let busy = wait_audit(&install, "-", &["\"outcome\":\"busy\""]).await;
    assert!(busy["client"].as_str().is_some_and(|c| c.starts_with("[::1]:")), "{busy}");
    let other_address = session(v4, &install, user, "six-pw").await;
    logout(held).await;
    logout(other_address).await;

    fail_three_logins(connect_when_free(v6, &install).await).await;
    let mut c = connect_when_free(v6, &install).await;
    assert!(c.tagged("l1", &format!("LOGIN {user} six-pw")).await.starts_with("l1 NO"), "::1 is throttled");
    let line = wait_audit(&install, user, &["client IP throttled after repeated failed logins"]).await;
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("[::1]:")), "{line}");
    let mut c = connect_when_free(v4, &install).await;
    let answer = c.tagged("l1", &format!("LOGIN {user} six-pw")).await;
    assert!(answer.starts_with("l1 OK"), "127.0.0.1 is not throttled: {answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_clients_of_a_dual_stack_listener_count_as_their_ipv4_address() {
    require_ipv6_loopback();
    let user = "dual@example.com";
    let conf = Conf {
        limits: "max_connections_per_ip = 1".to_owned(),
        lockout: "failure_delay_ms = 0\nmax_failures_per_ip = 3".to_owned(),
        imap_listen: vec!["[::]:0", "127.0.0.1:0"],
        ..Conf::default()
    };
    let install = installation(&profile("ipv4-only", &["127.0.0.1/32"], &[user]), &conf);
    install.add_user(user, "dual-pw");
    let daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 2).await;
    let any = imaps.iter().find(|a| a.is_ipv6()).expect("the [::] listener");
    let plain = *imaps.iter().find(|a| a.is_ipv4()).expect("the 127.0.0.1 listener");
    // An IPv4 client reaches the [::] listener, which sees it as ::ffff:127.0.0.1.
    let dual = SocketAddr::from(([127, 0, 0, 1], any.port()));
    if let Err(e) = std::net::TcpStream::connect(dual) {
        panic!("IPv4 cannot reach the [::] listener ({e}): IPv6 sockets here are IPv6-only (net.ipv6.bindv6only = 1)");
    }

    // Only an IPv4 allow entry lists the client, and the login gets through (once the
    // probe above has given its connection slot back).
    let mut held = connect_when_free(dual, &install).await;
    assert!(held.tagged("l1", &format!("LOGIN {user} dual-pw")).await.starts_with("l1 OK"));
    expect_busy(plain, &install).await;
    logout(held).await;
    let line = wait_audit(&install, user, &["\"event\":\"session\""]).await;
    assert_eq!(line["profile"], "ipv4-only (127.0.0.1/32)", "{line}");
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{line}");
    let mut held = connect_when_free(plain, &install).await;
    assert!(held.tagged("l1", &format!("LOGIN {user} dual-pw")).await.starts_with("l1 OK"));
    expect_busy(dual, &install).await;
    logout(held).await;

    fail_three_logins(connect_when_free(dual, &install).await).await;
    let mut c = connect_when_free(plain, &install).await;
    let answer = c.tagged("l1", &format!("LOGIN {user} dual-pw")).await;
    assert!(answer.starts_with("l1 NO"), "failures through the [::] listener throttle 127.0.0.1: {answer}");
    let line = wait_audit(&install, user, &["client IP throttled after repeated failed logins"]).await;
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{line}");
}

/// A handshake from a client that speaks TLS 1.2 only: the negotiated version, or the error.
async fn tls12_only_handshake(addr: SocketAddr, ca_file: &Path) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA") {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("TLS 1.2")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    match tokio::time::timeout(DEADLINE, connect).await.expect("handshake timed out") {
        Ok(tls) => Ok(format!("{:?}", tls.get_ref().1.protocol_version().expect("version"))),
        Err(e) => Err(e.to_string()),
    }
}

/// Python's `ssl` (OpenSSL) connecting to `addr`, at most TLS 1.2 when `tls12_only`;
/// prints `version <v>` and the greeting, or `refused <reason>`.
fn python_tls(addr: SocketAddr, ca_file: &Path, tls12_only: bool) -> String {
    let python = common::require_binary("python3", "python3");
    let script = r#"
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[3])
if sys.argv[4] == "1.2":
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            print("version", tls.version())
            print("greeting", tls.recv(200).decode(errors="replace").strip())
except ssl.SSLError as e:
    print("refused", e.reason)
"#;
    let out = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(ca_file)
        .arg(if tls12_only { "1.2" } else { "any" })
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python3 failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_min_version_1_3_refuses_tls_1_2_clients_at_the_handshake() {
    let user = "tls13@example.com";
    let profiles = profile("loopback", &["127.0.0.1/32"], &[user]);
    let strict = Conf { tls: "min_version = \"1.3\"".to_owned(), metrics: true, ..Conf::default() };
    let install = installation(&profiles, &strict);
    install.add_user(user, "tls13-pw");
    let mut daemon = Daemon::start(&install);
    let imaps = listeners(&daemon, "imap", 1).await[0];

    let refused = tls12_only_handshake(imaps, &install.ca_file).await.expect_err("a TLS 1.2-only client is refused");
    assert!(refused.contains("ProtocolVersion"), "refused for the protocol version: {refused}");
    let python = python_tls(imaps, &install.ca_file, true);
    assert!(python.starts_with("refused"), "{python}");
    let python = python_tls(imaps, &install.ca_file, false);
    assert!(python.starts_with("version TLSv1.3\ngreeting * OK"), "{python}");
    assert!(login_answer(imaps, &install, user, "tls13-pw").await.starts_with("l1 OK"));
    let text = scrape(daemon.metrics.expect("metrics"));
    assert_eq!(metric(&text, "postern_tls_handshake_failures_total{protocol=\"imap\"}"), 2);

    // The same clients get through at the default minimum: the refusal was the setting's.
    write_config(&install, &Conf { metrics: true, ..Conf::default() });
    reload(&mut daemon);
    wait_log_count(&daemon, &["reload done"], 1).await;
    assert_eq!(tls12_only_handshake(imaps, &install.ca_file).await, Ok("TLSv1_2".to_owned()));
    let python = python_tls(imaps, &install.ca_file, true);
    assert!(python.starts_with("version TLSv1.2\ngreeting * OK"), "{python}");
}

/// How the fake SMTP upstream misbehaves once asked for STARTTLS.
#[derive(Debug, Clone, Copy)]
enum StartTlsFault {
    /// Answers `454 4.7.0 TLS not available`.
    Refuses,
    /// Says 220, then closes the connection.
    ClosesAfter220,
    /// Says 220, then answers the TLS ClientHello with plain text.
    GarbageAfter220,
    /// Says 220, then never answers the handshake.
    SilentAfter220,
}

/// A submission server on 127.0.0.1 that greets, offers STARTTLS and then fails with the
/// next of `faults` for each connection; returns its address and how many connections came.
async fn fake_smtp_upstream(faults: Vec<StartTlsFault>) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake upstream");
    let address = listener.local_addr().expect("address");
    let accepted = Arc::new(Mutex::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        for fault in faults {
            let Ok((tcp, _)) = listener.accept().await else { return };
            *count.lock().unwrap() += 1;
            tokio::spawn(serve_fault(tcp, fault));
        }
    });
    (address, accepted)
}

async fn serve_fault(tcp: TcpStream, fault: StartTlsFault) {
    let (read, mut write) = tcp.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    let _ = write.write_all(b"220 fake.test ESMTP\r\n").await;
    if read.read_line(&mut line).await.unwrap_or(0) == 0 || !line.starts_with("EHLO ") {
        return;
    }
    let _ = write.write_all(b"250-fake.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n").await;
    line.clear();
    if read.read_line(&mut line).await.unwrap_or(0) == 0 || line.trim_end() != "STARTTLS" {
        return;
    }
    let ready = b"220 2.0.0 Ready to start TLS\r\n";
    match fault {
        StartTlsFault::Refuses => {
            let _ = write.write_all(b"454 4.7.0 TLS not available\r\n").await;
        }
        StartTlsFault::ClosesAfter220 => {
            let _ = write.write_all(ready).await;
            return;
        }
        StartTlsFault::GarbageAfter220 => {
            let _ = write.write_all(ready).await;
            let mut hello = [0u8; 512];
            let _ = read.read(&mut hello).await;
            let _ = write.write_all(b"this is not a TLS server\r\n").await;
        }
        StartTlsFault::SilentAfter220 => {
            let _ = write.write_all(ready).await;
        }
    }
    // Hold the connection until the proxy gives up on it.
    let mut rest = Vec::new();
    let _ = read.read_to_end(&mut rest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_smtp_starttls_upstream_is_a_temporary_failure() {
    use StartTlsFault::*;
    let user = "starttls-fault@example.com";
    let faults = [
        (Refuses, "454 4.7.0 TLS not available"),
        (ClosesAfter220, "TLS with"),
        (GarbageAfter220, "TLS with"),
        (SilentAfter220, "upstream did not answer within 3s"),
    ];
    let (upstream, accepted) = fake_smtp_upstream(faults.iter().map(|(f, _)| *f).collect()).await;
    let conf = Conf {
        limits: "upstream_timeout_secs = 3".to_owned(),
        imap_listen: Vec::new(),
        smtp_starttls_upstream: Some(upstream),
        ..Conf::default()
    };
    let install = installation(&profile("loopback", &["127.0.0.1/32"], &[user]), &conf);
    install.add_user(user, "fault-pw");
    let daemon = Daemon::start(&install);
    let smtps = listeners(&daemon, "smtp", 1).await[0];

    for (round, (fault, needle)) in faults.iter().enumerate() {
        let mut c = client::connect_tls(smtps, &install.ca_file).await;
        smtp_reply(&mut c, "220").await;
        c.send(b"EHLO client.test\r\n").await;
        smtp_reply(&mut c, "250").await;
        c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{user}\0fault-pw"))).as_bytes()).await;
        let answer = c.read_line().await;
        assert_eq!(answer, "454 4.7.0 Mail service temporarily unavailable, try again later", "{fault:?}");
        c.send(b"QUIT\r\n").await;
        let bye = c.read_line().await;
        assert!(bye.starts_with("221"), "{fault:?}: the session still answers: {bye}");
        c.expect_closed().await;
        assert_eq!(*accepted.lock().unwrap(), round + 1, "{fault:?}: the proxy dialled the upstream");

        let path = install.path("audit.jsonl");
        let refused = eventually(
            || {
                let lines = install::audit_lines(&path);
                let lines: Vec<_> =
                    lines.into_iter().filter(|l| l["user"] == user && l["event"] == "login refused").collect();
                (lines.len() > round).then_some(lines)
            },
            || {
                format!(
                    "{} refused-login audit lines:\n{}",
                    round + 1,
                    std::fs::read_to_string(&path).unwrap_or_default()
                )
            },
        )
        .await;
        let line = &refused[round];
        assert_eq!(line["outcome"], "unavailable", "{fault:?}: {line}");
        let reason = line["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&format!("upstream {upstream}")) && reason.contains(needle), "{fault:?}: {line}");
    }
}

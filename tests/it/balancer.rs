//! Behind a load balancer: a real HAProxy in TCP mode sends PROXY protocol v2 headers to
//! Postern, whose profiles, audit lines and per-address caps then see the real client,
//! and whose `/healthz` HAProxy polls. Hostile headers (untrusted senders, truncated,
//! forged, late) are closed and audited; a balancer's `LOCAL` health check closes quietly.

use crate::common;
use crate::install;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::{self, MailClient};
use common::logs;
use common::proxy::{self, Options, Proxy};
use install::{Daemon, Install};
use postern::metrics::{LoginResult, Outcome, ProxyRefusal};
use postern::protocol::Protocol;
use postern::protocol::proxy::build;

const TRUSTED: &str = "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

fn ip(text: &str) -> IpAddr {
    text.parse().expect("address")
}

/// HAProxy in TCP mode on a free loopback port of 127.0.0.1, relaying to `backend` with
/// `send-proxy-v2`, and (with `healthz`) checking `GET /healthz` on that address.
struct Haproxy {
    child: Child,
    frontend: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    fn start(backend: SocketAddr, healthz: Option<SocketAddr>) -> Haproxy {
        Haproxy::start_many(&[backend], healthz)
    }

    /// Like [`Haproxy::start`], spreading connections over `backends` round robin.
    fn start_many(backends: &[SocketAddr], healthz: Option<SocketAddr>) -> Haproxy {
        let binary = common::require_binary("haproxy", "haproxy");
        let mut last_log = String::new();
        // The frontend port is picked free, then bound by HAProxy: another process may take
        // it in between, so try a few.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("haproxy temp dir");
            let frontend: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().expect("address");
            let (check_options, check) = match healthz {
                Some(h) => (
                    "    option httpchk GET /healthz\n".to_owned(),
                    format!(" check addr {} port {} inter 200ms fall 1 rise 1", h.ip(), h.port()),
                ),
                None => (String::new(), String::new()),
            };
            let servers: String = backends
                .iter()
                .enumerate()
                .map(|(i, backend)| format!("    server postern{i} {backend} send-proxy-v2{check}\n"))
                .collect();
            let config = format!(
                "global\n    log stderr format raw local0 info\n\
                 defaults\n    mode tcp\n    log global\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\
                 frontend mail\n    bind {frontend}\n    default_backend postern\n\
                 backend postern\n    balance roundrobin\n{check_options}{servers}"
            );
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, config).expect("write haproxy.cfg");
            let mut child = Command::new(&binary)
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start haproxy");
            let log = Arc::new(Mutex::new(Vec::new()));
            let stdout = child.stdout.take().expect("stdout");
            let stderr = child.stderr.take().expect("stderr");
            for stream in [Box::new(stdout) as Box<dyn Read + Send>, Box::new(stderr)] {
                let sink = log.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(Result::ok) {
                        sink.lock().unwrap().push(line);
                    }
                });
            }
            let mut haproxy = Haproxy { child, frontend, log, _dir: dir };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if std::net::TcpStream::connect(frontend).is_ok() {
                    return haproxy;
                }
                if haproxy.child.try_wait().expect("try_wait").is_some() || Instant::now() > deadline {
                    last_log = haproxy.log();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("haproxy did not start listening; its log:\n{last_log}");
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until HAProxy has logged a line containing every one of `needles`.
    fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no haproxy log line with {needles:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A profiles file allowing `user` from 127.0.0.2 only.
fn only_from_127_0_0_2(user: &str) -> String {
    format!("[[profile]]\nname = \"branch\"\nallow = [\"127.0.0.2/32\"]\nusers = [{user:?}]\n")
}

async fn login(c: &mut MailClient, user: &str, password: &str) -> String {
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(format!("l1 LOGIN {user} {password}\r\n").as_bytes()).await;
    c.read_until_tagged("l1").await.pop().expect("tagged answer")
}

#[tokio::test]
async fn through_haproxy_the_profiles_and_audit_see_the_real_client() {
    logs::capture();
    let mail = "lb1@example.com";
    let proxy = Proxy::start(Options {
        profiles: only_from_127_0_0_2(mail),
        imap_extra: TRUSTED.to_owned(),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&proxy, "lb1", "lb1-pw");
    let haproxy = Haproxy::start(proxy.imaps, None);

    let mut allowed = client::connect_tls_from(ip("127.0.0.2"), haproxy.frontend, &proxy.ca_file).await;
    let answer = login(&mut allowed, &user.mail, &user.password).await;
    assert!(answer.starts_with("l1 OK"), "from 127.0.0.2 through HAProxy: {answer}");
    allowed.send(b"n1 NOOP\r\n").await;
    assert!(allowed.read_until_tagged("n1").await.pop().unwrap().starts_with("n1 OK"));

    let mut refused = client::connect_tls_from(ip("127.0.0.3"), haproxy.frontend, &proxy.ca_file).await;
    let answer = login(&mut refused, &user.mail, &user.password).await;
    assert!(answer.starts_with("l1 NO"), "from 127.0.0.3 through HAProxy: {answer}");
    let line = logs::wait_for_audit(mail, &["login refused", "\"client\":\"127.0.0.3:", "\"via\":\"127.0.0.1:"]).await;
    assert!(line.contains("\"outcome\":\"denied\""), "{line}");

    allowed.send(b"z LOGOUT\r\n").await;
    allowed.expect_closed().await;
    let port = allowed.local_addr().port();
    let line =
        logs::wait_for_audit(mail, &["\"outcome\":\"logged-in\"", &format!("\"client\":\"127.0.0.2:{port}\"")]).await;
    assert!(line.contains("\"via\":\"127.0.0.1:"), "the balancer is named: {line}");
    drop(haproxy);
    proxy.stop().await;
}

/// Connects straight to the proxy from `from`, sends `bytes` (then, with `close`, ends the
/// write side) and expects the proxy to close the connection; the client's local address.
async fn send_and_expect_close(proxy: &Proxy, from: &str, bytes: &[u8], close: bool) -> SocketAddr {
    let mut c = client::connect_plain_from(ip(from), proxy.imaps).await;
    let local = c.local_addr();
    // An untrusted peer may be closed before it has written; that is the point.
    let _ = c.try_send(bytes).await;
    if close {
        c.shutdown().await;
    }
    c.expect_closed().await;
    local
}

async fn refused_line(local: SocketAddr, needles: &[&str]) -> String {
    let client = format!("\"client\":\"{local}\"");
    let mut all = vec!["proxy header refused", client.as_str()];
    all.extend_from_slice(needles);
    logs::wait_for_line(&all).await
}

#[tokio::test]
async fn hostile_headers_are_closed_and_audited() {
    logs::capture();
    let proxy = Proxy::start(Options {
        profiles: proxy::profile_for(&["lb2@example.com"]),
        imap_extra: TRUSTED.to_owned(),
        limits: "proxy_header_timeout_secs = 1".to_owned(),
        directory: proxy::Dir::File,
        ..Options::default()
    })
    .await;
    let metrics = proxy.server().metrics().clone();
    let balancer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
    let header = build::v2("127.0.0.2:5000".parse().unwrap(), balancer, &[]);

    // A well-formed header, but from an address that is not a trusted balancer.
    let local = send_and_expect_close(&proxy, "127.0.0.5", &header, false).await;
    let line = refused_line(local, &["trusted_proxies", "\"outcome\":\"denied\""]).await;
    assert!(line.contains("\"via\":\"-\""), "{line}");
    // A version 1 header forging a trusted client address, from an untrusted peer.
    let forged = build::v1("127.0.0.2:5000".parse().unwrap(), balancer);
    let local = send_and_expect_close(&proxy, "127.0.0.6", &forged, false).await;
    let line = refused_line(local, &["trusted_proxies"]).await;
    assert!(!line.contains("127.0.0.2"), "the forged address is not believed: {line}");
    assert!(metrics.proxy_refusals(Protocol::Imap, ProxyRefusal::Untrusted) >= 2);

    // From the trusted balancer: a header cut short, garbage, and nothing at all.
    let local = send_and_expect_close(&proxy, "127.0.0.1", &header[..20], true).await;
    refused_line(local, &["ended after 20 bytes", "\"outcome\":\"abandoned\""]).await;
    let local = send_and_expect_close(&proxy, "127.0.0.1", b"GET / HTTP/1.0\r\n\r\n", false).await;
    refused_line(local, &["no PROXY protocol signature", "\"outcome\":\"protocol-error\""]).await;
    let local = send_and_expect_close(&proxy, "127.0.0.1", b"PROXY TCP4 1.2.3.4\r\n", false).await;
    refused_line(local, &["malformed version 1 header"]).await;
    let local = send_and_expect_close(&proxy, "127.0.0.1", b"", false).await;
    refused_line(local, &["within 1 s", "\"outcome\":\"timeout\""]).await;
    assert!(metrics.proxy_refusals(Protocol::Imap, ProxyRefusal::Truncated) >= 1);
    assert!(metrics.proxy_refusals(Protocol::Imap, ProxyRefusal::Timeout) >= 1);

    // A balancer's health check: LOCAL, closed without an audit line.
    let local = send_and_expect_close(&proxy, "127.0.0.1", &build::v2_local(), false).await;
    logs::wait_for_line(&["PROXY header without a client", &local.to_string()]).await;
    let client = format!("\"client\":\"{local}\"");
    assert!(
        !logs::all().lines().any(|l| l.contains("\"target\":\"audit\"") && l.contains(&client)),
        "a LOCAL header leaves no audit line"
    );

    // A valid header from the trusted balancer still leads to the client's session.
    proxy.set_file_password("lb2@example.com", "lb2-pw").await;
    let mut c = client::connect_plain_from(ip("127.0.0.1"), proxy.imaps).await;
    c.send(&build::v2("127.0.0.1:6000".parse().unwrap(), balancer, &[])).await;
    c.start_tls(&proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(b"a LOGOUT\r\n").await;
    c.expect_closed().await;
    logs::wait_for_line(&["\"target\":\"audit\"", "\"client\":\"127.0.0.1:6000\"", "\"via\":\"127.0.0.1:"]).await;
    proxy.stop().await;
}

/// `GET path` on `address`: the status line and the body.
fn http_get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the HTTP endpoint");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes()).expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response.lines().next().unwrap_or_default().to_owned();
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn healthz_is_ready_then_draining_after_sigterm_and_haproxy_sees_it() {
    let mail = "lb3@example.com";
    let install = Install::new(
        &only_from_127_0_0_2(mail),
        "shutdown_grace_secs = 120",
        &format!("{TRUSTED}\n[metrics]\nlisten = \"127.0.0.1:0\"\n"),
    );
    install.add_user(mail, "dir-pw");
    let mut daemon = Daemon::start(&install);
    let metrics = daemon.metrics.expect("metrics address");
    assert_eq!(http_get(metrics, "/healthz"), ("HTTP/1.1 200 OK".to_owned(), "ready\n".to_owned()));
    let haproxy = Haproxy::start(daemon.imaps, Some(metrics));

    // A session through HAProxy, held open across the stop.
    let mut held = client::connect_tls_from(ip("127.0.0.2"), haproxy.frontend, &install.ca_file).await;
    let answer = login(&mut held, mail, "dir-pw").await;
    assert!(answer.starts_with("l1 OK"), "{answer}\n{}", daemon.log());

    daemon.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(metrics, "/healthz");
        if status.starts_with("HTTP/1.1 503") {
            assert_eq!(body, "draining\n");
            break;
        }
        assert!(Instant::now() < deadline, "still {status} {body:?} after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    haproxy.wait_for_log(&["postern", "DOWN", "503"]);
    held.send(b"n1 NOOP\r\n").await;
    assert!(held.read_until_tagged("n1").await.pop().unwrap().starts_with("n1 OK"), "the held session goes on");
    held.send(b"z LOGOUT\r\n").await;
    held.expect_closed().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let lines = install::audit_lines(&install.path("audit.jsonl"));
        if let Some(line) = lines.iter().find(|l| l["user"] == mail && l["outcome"] == "logged-in") {
            break line.clone();
        }
        assert!(Instant::now() < deadline, "no audit line for {mail}: {lines:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.2:")), "{line}");
    assert!(line["via"].as_str().is_some_and(|v| v.starts_with("127.0.0.1:")), "{line}");
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0), "{}", daemon.log());
}

/// Logs in through `haproxy` from `from`; the tagged answer.
async fn login_through(haproxy: &Haproxy, from: &str, ca: &std::path::Path, user: &str, password: &str) -> String {
    let mut c = client::connect_tls_from(ip(from), haproxy.frontend, ca).await;
    login(&mut c, user, password).await
}

#[tokio::test]
async fn two_instances_behind_haproxy_see_the_client_and_share_the_lockout() {
    logs::capture();
    let redis = common::redis::Redis::start();
    let mail = "lb-pair@example.com";
    let options = || Options {
        profiles: only_from_127_0_0_2(mail),
        imap_extra: TRUSTED.to_owned(),
        lockout: "failure_delay_ms = 0\nmax_failures = 3\nmax_failures_per_ip = 0\nwindow_secs = 600\nlock_secs = 600"
            .to_owned(),
        state: format!("backend = \"redis\"\nurl = {:?}\nkey_prefix = \"lb-pair\"\n", redis.url()),
        ..Options::default()
    };
    let (a, b) = (Proxy::start(options()).await, Proxy::start(options()).await);
    let user = proxy::add_user(&a, "lb-pair", "lb-pair-pw");
    b.set_upstream(&user.mail, &user.upstream_password);
    let haproxy = Haproxy::start_many(&[a.imaps, b.imaps], None);
    let ca = a.ca_file.clone();
    let logins = |p: &Proxy| {
        let ok = LoginResult::OK;
        p.server().metrics().logins(ok)
    };

    // The allowlist sees the real client on both instances: logins until each instance has
    // served one (round robin alternates, whatever connection it started with).
    for attempt in 0.. {
        assert!(login_through(&haproxy, "127.0.0.2", &ca, mail, &user.password).await.starts_with("l1 OK"));
        if logins(&a) >= 1 && logins(&b) >= 1 {
            break;
        }
        assert!(attempt < 6, "both instances served: {} and {}", logins(&a), logins(&b));
    }
    for _ in 0..2 {
        assert!(login_through(&haproxy, "127.0.0.3", &ca, mail, &user.password).await.starts_with("l1 NO"));
    }

    // Wrong passwords spread over the two instances lock the user on both.
    for i in 0..3 {
        let answer = login_through(&haproxy, "127.0.0.2", &ca, mail, &format!("wrong-{i}")).await;
        assert!(answer.starts_with("l1 NO"), "{answer}");
    }
    let locked = LoginResult { outcome: Outcome::Denied, reason: "locked out after repeated password failures" };
    for _ in 0..4 {
        let answer = login_through(&haproxy, "127.0.0.2", &ca, mail, &user.password).await;
        assert!(answer.starts_with("l1 NO"), "locked on whichever instance answers: {answer}");
    }
    let (on_a, on_b) = (a.server().metrics().logins(locked), b.server().metrics().logins(locked));
    assert_eq!(on_a + on_b, 4, "every refusal was the lock");
    assert!(on_a >= 1 && on_b >= 1, "both instances refused as locked: {on_a} and {on_b}");

    // An unlock on one instance frees the user on both.
    assert!(a.server().counters.unlock(mail).await.expect("unlock"));
    for _ in 0..2 {
        assert!(login_through(&haproxy, "127.0.0.2", &ca, mail, &user.password).await.starts_with("l1 OK"));
    }
    drop(haproxy);
    a.stop().await;
    b.stop().await;
}

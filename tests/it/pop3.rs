//! POP3S through the proxy, end to end, against real slapd and Dovecot.

use crate::common;

use std::process::Command;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::mail::{b64, message};
use common::proxy::{self, Options, Proxy, TestUser};

const DENIAL: &str = "-ERR [AUTH] You are not allowed to access this server";

async fn proxy_for(uid: &str) -> (Proxy, TestUser) {
    logs::capture();
    let mail = format!("{uid}@example.com");
    let proxy = Proxy::start(Options { profiles: proxy::profile_for(&[&mail]), ..Options::default() }).await;
    let user = proxy::add_user(&proxy, uid, &format!("{uid} pw \"q\" \\ ü"));
    (proxy, user)
}

async fn connect(addr: std::net::SocketAddr, ca: &std::path::Path) -> MailClient {
    let mut c = client::connect_tls(addr, ca).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("+OK"), "greeting: {greeting}");
    c
}

async fn command(c: &mut MailClient, line: &str) -> String {
    c.send(format!("{line}\r\n").as_bytes()).await;
    c.read_line().await
}

/// STAT and RETR 1 in a logged-in session.
async fn stat_and_retr(c: &mut MailClient) -> (String, Vec<u8>) {
    let stat = command(c, "STAT").await;
    let retr = command(c, "RETR 1").await;
    assert!(retr.starts_with("+OK"), "{retr}");
    (stat, c.pop3_multiline().await)
}

#[tokio::test]
async fn user_pass_stat_and_retr_match_a_direct_session() {
    let (proxy, user) = proxy_for("pop1").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("pop1", 50_000));

    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    assert!(command(&mut c, &format!("USER {}", user.mail)).await.starts_with("+OK"));
    let ok = command(&mut c, &format!("PASS {}", user.password)).await;
    assert_eq!(ok, "+OK Logged in.");
    let through_proxy = stat_and_retr(&mut c).await;
    assert!(command(&mut c, "QUIT").await.starts_with("+OK"));
    c.expect_closed().await;

    let d = common::dovecot::dovecot();
    let mut direct = connect(d.pop3s, &d.ca_file).await;
    command(&mut direct, &format!("USER {}", user.mail)).await;
    assert!(command(&mut direct, &format!("PASS {}", user.upstream_password)).await.starts_with("+OK"));
    assert_eq!(stat_and_retr(&mut direct).await, through_proxy);
    assert_eq!(through_proxy.1, message("pop1", 50_000));
    logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", "\"mechanism\":\"USER/PASS\""]).await;
}

#[tokio::test]
async fn auth_plain_with_initial_response_and_with_continuation() {
    let (proxy, user) = proxy_for("pop2").await;
    let response = b64(format!("\0{}\0{}", user.mail, user.password));

    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    assert_eq!(command(&mut c, &format!("AUTH PLAIN {response}")).await, "+OK Logged in.");
    assert!(command(&mut c, "STAT").await.starts_with("+OK 0 0"));

    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    assert!(command(&mut c, "AUTH PLAIN").await.starts_with('+'));
    assert_eq!(command(&mut c, &response).await, "+OK Logged in.");

    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    assert!(command(&mut c, "AUTH LOGIN").await.starts_with('+'));
    assert!(command(&mut c, &b64(&user.mail)).await.starts_with('+'));
    assert_eq!(command(&mut c, &b64(&user.password)).await, "+OK Logged in.");
}

#[tokio::test]
async fn recent_mode_reaches_the_upstream_with_its_prefix() {
    let (proxy, user) = proxy_for("pop3recent").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("pop3recent", 1_000));
    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    command(&mut c, &format!("USER recent:{}", user.mail)).await;
    assert_eq!(command(&mut c, &format!("PASS {}", user.password)).await, "+OK Logged in.");
    let (_, body) = stat_and_retr(&mut c).await;
    assert_eq!(body, message("pop3recent", 1_000));
    command(&mut c, "QUIT").await;

    let d = common::dovecot::dovecot();
    let needle = format!("Login: user=<recent:{}>", user.mail);
    assert!(d.wait_for_log(&needle, Duration::from_secs(5)), "{}", d.log_tail(20));
    logs::wait_for_audit(&user.mail, &["\"mode\":\"recent\"", "\"outcome\":\"logged-in\""]).await;
}

#[tokio::test]
async fn refusals_use_the_pop3_denial() {
    let (proxy, user) = proxy_for("pop4").await;
    let mut c = connect(proxy.pop3s, &proxy.ca_file).await;
    command(&mut c, &format!("USER {}", user.mail)).await;
    assert_eq!(command(&mut c, "PASS wrong password").await, DENIAL);
    // An unknown user reads exactly the same.
    command(&mut c, "USER nobody-here@example.com").await;
    assert_eq!(command(&mut c, "PASS whatever").await, DENIAL);
    // Refused stored credential: an outage, not a denial.
    proxy.set_upstream(&user.mail, "stale-upstream-password");
    command(&mut c, &format!("USER {}", user.mail)).await;
    let answer = command(&mut c, &format!("PASS {}", user.password)).await;
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    drop(c);
    logs::wait_for_audit(&user.mail, &["refused the stored credential"]).await;
}

#[tokio::test]
async fn python_poplib_retrieves_a_message() {
    common::require_binary("python3", "python3");
    let (proxy, user) = proxy_for("pypop1").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("pypop1", 3_000));
    let script = r#"
import poplib, ssl, sys
port, ca, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
p = poplib.POP3_SSL("localhost", port, context=ctx)
p.user(user)
p.pass_(password)
count, size = p.stat()
resp, lines, octets = p.retr(1)
sys.stdout.buffer.write(b"\r\n".join(lines) + b"\r\n")
p.quit()
"#;
    let (port, ca) = (proxy.pop3s.port().to_string(), proxy.ca_file.display().to_string());
    let (mail, password) = (user.mail.clone(), user.password.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").args(["-c", script, &port, &ca, &mail, &password]).output().expect("python3")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "poplib: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, message("pypop1", 3_000));
}

#[tokio::test]
async fn curl_retrieves_a_message() {
    common::require_binary("curl", "curl");
    let (proxy, user) = proxy_for("curlpop1").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("curlpop1", 3_000));
    let port = proxy.pop3s.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["--cacert", &proxy.ca_file.display().to_string()])
        .args(["--user", &format!("{}:{}", user.mail, user.password), &format!("pop3s://localhost:{port}/1")])
        .output()
        .await
        .expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, message("curlpop1", 3_000));
}

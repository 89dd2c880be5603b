//! SMTPS submission through the proxy, end to end: real slapd, Dovecot's submission service
//! relaying to the test sink.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::mail::{b64, dot_stuffed, message, smtp_reply};
use common::proxy::{self, Options, Proxy, TestUser};
use common::sink::{Received, sink};

async fn proxy_for(uid: &str, options: Options) -> (Proxy, TestUser) {
    logs::capture();
    let mail = format!("{uid}@example.com");
    let proxy = Proxy::start(Options { profiles: proxy::profile_for(&[&mail]), ..options }).await;
    let user = proxy::add_user(&proxy, uid, &format!("{uid} pw \"q\" \\ ü"));
    (proxy, user)
}

async fn connect(addr: SocketAddr, ca: &std::path::Path) -> MailClient {
    let mut c = client::connect_tls(addr, ca).await;
    smtp_reply(&mut c, "220").await;
    c
}

async fn say(c: &mut MailClient, line: &str, code: &str) -> Vec<String> {
    c.send(format!("{line}\r\n").as_bytes()).await;
    smtp_reply(c, code).await
}

/// Sends `msg` in a logged-in session and waits until the sink has it.
async fn send_message(c: &mut MailClient, from: &str, msg: &[u8], marker: &str) -> Received {
    say(c, &format!("MAIL FROM:<{from}>"), "250").await;
    say(c, "RCPT TO:<friend@example.net>", "250").await;
    say(c, "DATA", "354").await;
    c.send(&dot_stuffed(msg)).await;
    smtp_reply(c, "250").await;
    let needle = format!("<{marker}@example.com>");
    sink()
        .wait_for_async(|m| m.data_contains(needle.as_bytes()), Duration::from_secs(10))
        .await
        .expect("the message reaches the sink")
}

/// The body of a message: everything after the first empty line.
fn body(data: &[u8]) -> &[u8] {
    let at = data.windows(4).position(|w| w == b"\r\n\r\n").expect("header/body separator");
    &data[at + 4..]
}

#[tokio::test]
async fn auth_plain_then_a_message_arrives_with_an_identical_body() {
    let (proxy, user) = proxy_for("smtp1", Options::default()).await;
    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    let ehlo = say(&mut c, "EHLO client.example", "250").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH PLAIN LOGIN")), "{ehlo:?}");
    assert!(ehlo.iter().any(|l| l.contains("ENHANCEDSTATUSCODES")), "{ehlo:?}");
    let ok = say(&mut c, &format!("AUTH PLAIN {}", b64(format!("\0{}\0{}", user.mail, user.password))), "235").await;
    assert_eq!(ok, ["235 2.7.0 Authentication successful"]);
    // The client's own EHLO after login goes to the upstream and still works.
    say(&mut c, "EHLO client.example", "250").await;
    let msg = message("smtp1-marker", 40_000);
    let got = send_message(&mut c, &user.mail, &msg, "smtp1-marker").await;
    assert_eq!(body(&got.data), body(&msg));
    assert_eq!(got.recipients, ["friend@example.net"]);
    say(&mut c, "QUIT", "221").await;
    logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", "\"mechanism\":\"AUTH PLAIN\""]).await;
}

#[tokio::test]
async fn auth_login_and_plain_continuation() {
    let (proxy, user) = proxy_for("smtp2", Options::default()).await;
    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    say(&mut c, "EHLO client.example", "250").await;
    say(&mut c, "AUTH LOGIN", "334").await;
    say(&mut c, &b64(&user.mail), "334").await;
    say(&mut c, &b64(&user.password), "235").await;
    let msg = message("smtp2-marker", 2_000);
    let got = send_message(&mut c, &user.mail, &msg, "smtp2-marker").await;
    assert_eq!(body(&got.data), body(&msg));

    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    say(&mut c, "EHLO client.example", "250").await;
    say(&mut c, "AUTH PLAIN", "334").await;
    say(&mut c, &b64(format!("\0{}\0{}", user.mail, user.password)), "235").await;
}

#[tokio::test]
async fn mail_before_auth_is_refused_and_denials_read_the_same() {
    let (proxy, user) = proxy_for("smtp3", Options::default()).await;
    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    say(&mut c, "EHLO client.example", "250").await;
    let refused = say(&mut c, "MAIL FROM:<smtp3@example.com>", "530").await;
    assert_eq!(refused, ["530 5.7.0 Authentication required"]);
    let denial = say(&mut c, &format!("AUTH PLAIN {}", b64(format!("\0{}\0wrong", user.mail))), "535").await;
    assert_eq!(denial, ["535 5.7.8 You are not allowed to access this server"]);
    proxy.set_upstream(&user.mail, "stale-upstream-password");
    let outage =
        say(&mut c, &format!("AUTH PLAIN {}", b64(format!("\0{}\0{}", user.mail, user.password))), "454").await;
    assert!(outage[0].starts_with("454 4.7.0"), "{outage:?}");
}

#[tokio::test]
async fn pipelined_commands_after_auth_are_not_lost() {
    let (proxy, user) = proxy_for("smtp4", Options::default()).await;
    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    say(&mut c, "EHLO client.example", "250").await;
    let batch = format!(
        "AUTH PLAIN {}\r\nMAIL FROM:<{}>\r\nRCPT TO:<friend@example.net>\r\n",
        b64(format!("\0{}\0{}", user.mail, user.password)),
        user.mail
    );
    c.send(batch.as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    smtp_reply(&mut c, "250").await;
    smtp_reply(&mut c, "250").await;
}

#[tokio::test]
async fn starttls_upstream_on_port_587_works() {
    let (proxy, user) = proxy_for("smtp5", Options { smtp_starttls: true, ..Options::default() }).await;
    let mut c = connect(proxy.smtps, &proxy.ca_file).await;
    say(&mut c, "EHLO client.example", "250").await;
    say(&mut c, &format!("AUTH PLAIN {}", b64(format!("\0{}\0{}", user.mail, user.password))), "235").await;
    let msg = message("smtp5-marker", 2_000);
    let got = send_message(&mut c, &user.mail, &msg, "smtp5-marker").await;
    assert_eq!(body(&got.data), body(&msg));
    let d = common::dovecot::dovecot();
    assert!(d.wait_for_log(&format!("user=<{}>", user.mail), Duration::from_secs(5)));
    let logins = d.login_lines(&user.mail);
    assert!(
        !logins.is_empty() && logins.iter().all(|l| l.contains(", TLS")),
        "upstream login not over TLS: {logins:?}"
    );
}

#[tokio::test]
async fn python_smtplib_sends_a_message() {
    common::require_binary("python3", "python3");
    logs::capture();
    let proxy =
        Proxy::start(Options { profiles: proxy::profile_for(&["pysmtp1@example.com"]), ..Options::default() }).await;
    // smtplib encodes credentials as ASCII; quotes, backslashes and spaces still travel in PLAIN.
    let user = proxy::add_user(&proxy, "pysmtp1", "py \"pw\" \\ x");
    let script = r#"
import smtplib, ssl, sys
port, ca, user, password, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
with smtplib.SMTP_SSL("localhost", port, context=ctx) as s:
    s.login(user, password)
    s.sendmail(user, ["friend@example.net"], f"Subject: {marker}\r\nMessage-ID: <{marker}@example.com>\r\n\r\nsent by smtplib\r\n")
"#;
    let (port, ca) = (proxy.smtps.port().to_string(), proxy.ca_file.display().to_string());
    let (mail, password) = (user.mail.clone(), user.password.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", script, &port, &ca, &mail, &password, "pysmtp1-marker"])
            .output()
            .expect("python3")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "smtplib: {}", String::from_utf8_lossy(&out.stderr));
    let got =
        sink().wait_for_async(|m| m.data_contains(b"<pysmtp1-marker@example.com>"), Duration::from_secs(10)).await;
    assert!(got.is_some_and(|m| m.data_contains(b"sent by smtplib")));
}

#[tokio::test]
async fn curl_sends_a_message() {
    common::require_binary("curl", "curl");
    let (proxy, user) = proxy_for("curlsmtp1", Options::default()).await;
    let port = proxy.smtps.port();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mail.eml");
    std::fs::write(&file, message("curlsmtp1-marker", 2_000)).unwrap();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["--cacert", &proxy.ca_file.display().to_string()])
        .args(["--user", &format!("{}:{}", user.mail, user.password)])
        .args(["--mail-from", &user.mail, "--mail-rcpt", "friend@example.net"])
        .args(["--upload-file", &file.display().to_string(), &format!("smtps://localhost:{port}")])
        .output()
        .await
        .expect("curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let got = sink()
        .wait_for_async(|m| m.data_contains(b"<curlsmtp1-marker@example.com>"), Duration::from_secs(10))
        .await
        .expect("curl's message reaches the sink");
    assert_eq!(body(&got.data), body(&message("curlsmtp1-marker", 2_000)));
}

#[tokio::test]
async fn swaks_sends_a_message() {
    common::require_binary("swaks", "swaks");
    // swaks speaks TLS through Net::SSLeay, which it only recommends.
    let ssleay = std::process::Command::new("perl").args(["-MNet::SSLeay", "-e", "1"]).status();
    assert!(
        ssleay.is_ok_and(|s| s.success()),
        "swaks needs Perl's Net::SSLeay for TLS: apt-get install libnet-ssleay-perl (.ci/run does this)"
    );
    let (proxy, user) = proxy_for("swaks1", Options::default()).await;
    let port = proxy.smtps.port().to_string();
    let out = tokio::process::Command::new("swaks")
        .args(["--server", "127.0.0.1", "--port", &port, "--tls-on-connect", "--tls-ca-path"])
        .arg(&proxy.ca_file)
        .args(["--auth", "PLAIN", "--auth-user", &user.mail, "--auth-password", &user.password])
        .args(["--from", &user.mail, "--to", "friend@example.net"])
        .args(["--header", "Message-ID: <swaks1-marker@example.com>", "--body", "sent by swaks"])
        .output()
        .await
        .expect("swaks");
    assert!(
        out.status.success(),
        "swaks: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let got = sink()
        .wait_for_async(|m| m.data_contains(b"<swaks1-marker@example.com>"), Duration::from_secs(10))
        .await
        .expect("swaks' message reaches the sink");
    assert!(got.data_contains(b"sent by swaks"));
}

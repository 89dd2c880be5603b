//! The harness itself: the test CA, Dovecot (IMAPS, POP3S, submission), the SMTP sink and the
//! test client work together without the proxy in between.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::client::{self, MailClient};
use common::dovecot::dovecot;
use common::mail::{dot_stuffed, message, smtp_reply};
use common::sink::sink;

#[test]
fn test_ca_issues_a_loadable_certificate() {
    let issued = common::pki::pki().issue("smoke");
    let pem = std::fs::read_to_string(&issued.cert_file).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
}

async fn expect_ok(c: &mut MailClient, what: &str) -> String {
    let line = c.read_line().await;
    assert!(line.starts_with("+OK") || line.starts_with("* OK"), "{what}: {line}");
    line
}

async fn imap_ok(c: &mut MailClient, tag: &str, command: &str) -> Vec<String> {
    c.send(format!("{tag} {command}\r\n").as_bytes()).await;
    let lines = c.read_until_tagged(tag).await;
    let last = lines.last().unwrap();
    assert!(last.starts_with(&format!("{tag} OK")), "{command}: {lines:?}");
    lines
}

#[tokio::test]
async fn imaps_login_select_and_fetch_returns_the_delivered_message() {
    let d = dovecot();
    d.add_user("imap-smoke@example.com", "pa:ss w\"rd");
    let small = message("imap-smoke-small", 2_000);
    let large = message("imap-smoke-large", 33 * 1024 * 1024);
    d.deliver("imap-smoke@example.com", &small);
    d.deliver("imap-smoke@example.com", &large);

    let mut c = client::connect_tls(d.imaps, &d.ca_file).await;
    expect_ok(&mut c, "greeting").await;
    // The password has a quote, so send it as a literal (non-synchronising, LITERAL+).
    let password = "pa:ss w\"rd";
    c.send(format!("a LOGIN imap-smoke@example.com {{{}+}}\r\n{password}\r\n", password.len()).as_bytes()).await;
    let lines = c.read_until_tagged("a").await;
    assert!(lines.last().unwrap().starts_with("a OK"), "{lines:?}");
    let lines = imap_ok(&mut c, "b", "SELECT INBOX").await;
    assert!(lines.iter().any(|l| l == "* 2 EXISTS"), "{lines:?}");

    assert_eq!(c.imap_fetch_body("c", 1).await, small);
    let got = c.imap_fetch_body("d", 2).await;
    assert_eq!(got.len(), large.len());
    assert!(got == large, "large message differs");

    imap_ok(&mut c, "e", "LOGOUT").await;
    c.expect_closed().await;
    assert!(d.wait_for_log("user=<imap-smoke@example.com>", Duration::from_secs(5)));
}

#[tokio::test]
async fn imaps_rejects_a_wrong_password() {
    let d = dovecot();
    d.add_user("imap-wrong@example.com", "right");
    let mut c = client::connect_tls(d.imaps, &d.ca_file).await;
    expect_ok(&mut c, "greeting").await;
    c.send(b"a LOGIN imap-wrong@example.com wrong\r\n").await;
    let lines = c.read_until_tagged("a").await;
    assert!(lines.last().unwrap().starts_with("a NO"), "{lines:?}");
}

#[tokio::test]
async fn pop3s_user_pass_stat_and_retr() {
    let d = dovecot();
    d.add_user("pop-smoke@example.com", "secret:1");
    let msg = message("pop-smoke", 33 * 1024 * 1024);
    d.deliver("pop-smoke@example.com", &msg);

    let mut c = client::connect_tls(d.pop3s, &d.ca_file).await;
    expect_ok(&mut c, "greeting").await;
    c.send(b"USER pop-smoke@example.com\r\n").await;
    expect_ok(&mut c, "USER").await;
    c.send(b"PASS secret:1\r\n").await;
    expect_ok(&mut c, "PASS").await;
    c.send(b"STAT\r\n").await;
    assert_eq!(expect_ok(&mut c, "STAT").await, format!("+OK 1 {}", msg.len()));
    c.send(b"RETR 1\r\n").await;
    expect_ok(&mut c, "RETR").await;
    assert!(c.pop3_multiline().await == msg, "RETR differs");
    c.send(b"QUIT\r\n").await;
    expect_ok(&mut c, "QUIT").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn pop3s_recent_mode_login_reaches_the_same_mailbox_and_is_logged() {
    let d = dovecot();
    d.add_user("pop-recent@example.com", "recent-pw");
    let msg = message("pop-recent", 1_000);
    d.deliver("pop-recent@example.com", &msg);

    let mut c = client::connect_tls(d.pop3s, &d.ca_file).await;
    expect_ok(&mut c, "greeting").await;
    c.send(b"USER recent:pop-recent@example.com\r\nPASS recent-pw\r\n").await;
    expect_ok(&mut c, "USER").await;
    expect_ok(&mut c, "PASS").await;
    c.send(b"RETR 1\r\n").await;
    expect_ok(&mut c, "RETR").await;
    assert!(c.pop3_multiline().await == msg);
    c.send(b"QUIT\r\n").await;
    expect_ok(&mut c, "QUIT").await;
    assert!(
        d.wait_for_log("Login: user=<recent:pop-recent@example.com>", Duration::from_secs(5)),
        "{}",
        d.log_tail(20)
    );
}

#[test]
fn recent_prefix_only_maps_real_recent_logins() {
    let d = dovecot();
    d.add_user("map-check@example.com", "pw");
    assert!(d.auth_test("recent:map-check@example.com", "pw").unwrap());
    assert!(!d.auth_test("recent:map-check@example.com", "nope").unwrap());
    // Seven arbitrary characters must not act like the prefix.
    assert!(!d.auth_test("xxxxxxxmap-check@example.com", "pw").unwrap());
}

#[tokio::test]
async fn submissions_relays_the_message_to_the_sink() {
    let d = dovecot();
    d.add_user("submit-smoke@example.com", "sub:pw");
    let mut c = client::connect_tls(d.submissions, &d.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = smtp_reply(&mut c, "250").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH") && l.contains("PLAIN")), "{ehlo:?}");
    let auth = base64::engine::general_purpose::STANDARD.encode(b"\0submit-smoke@example.com\0sub:pw");
    c.send(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    c.send(b"MAIL FROM:<submit-smoke@example.com>\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(b"RCPT TO:<someone@example.net>\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(b"DATA\r\n").await;
    smtp_reply(&mut c, "354").await;
    let msg = message("submit-smoke-marker", 20_000);
    c.send(&dot_stuffed(&msg)).await;
    smtp_reply(&mut c, "250").await;
    c.send(b"QUIT\r\n").await;
    smtp_reply(&mut c, "221").await;

    let got = sink()
        .wait_for_async(|m| m.data_contains(b"<submit-smoke-marker@example.com>"), Duration::from_secs(10))
        .await
        .expect("message reached the sink");
    assert_eq!(got.from, "submit-smoke@example.com");
    assert_eq!(got.recipients, ["someone@example.net"]);
    assert!(got.data.ends_with(&msg), "relayed data does not end with the submitted message");
}

#[tokio::test]
async fn submission_plain_port_offers_starttls_and_logs_the_tls_login() {
    let d = dovecot();
    d.add_user("starttls-smoke@example.com", "st-pw");
    let mut c = client::connect_plain(d.submission_starttls).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = smtp_reply(&mut c, "250").await;
    assert!(ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    c.send(b"STARTTLS\r\n").await;
    smtp_reply(&mut c, "220").await;
    c.start_tls(&d.ca_file).await;
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = smtp_reply(&mut c, "250").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH") && l.contains("PLAIN")), "{ehlo:?}");
    let auth = base64::engine::general_purpose::STANDARD.encode(b"\0starttls-smoke@example.com\0st-pw");
    c.send(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    c.send(b"QUIT\r\n").await;
    smtp_reply(&mut c, "221").await;
    assert!(d.wait_for_log("user=<starttls-smoke@example.com>", Duration::from_secs(5)));
    let logins = d.login_lines("starttls-smoke@example.com");
    assert!(logins.iter().all(|l| l.contains(", TLS,")), "{logins:?}");
}

#[tokio::test]
async fn client_can_bind_another_loopback_source_address() {
    let d = dovecot();
    let mut c = client::connect_tls_from("127.0.0.2".parse().unwrap(), d.imaps, &d.ca_file).await;
    expect_ok(&mut c, "greeting").await;
    imap_ok(&mut c, "a", "LOGOUT").await;
    c.expect_closed().await;
    assert!(c.is_closed());
}

#[test]
fn sink_handles_odd_input_and_dot_stuffing() {
    use std::io::{BufRead, BufReader, Write};
    let s = sink();
    let stream = std::net::TcpStream::connect(s.addr).unwrap();
    let mut out = stream.try_clone().unwrap();
    let mut input = BufReader::new(stream);
    let mut line = String::new();
    let mut expect = |code: &str, input: &mut BufReader<std::net::TcpStream>| loop {
        line.clear();
        input.read_line(&mut line).unwrap();
        assert!(line.starts_with(code), "expected {code}: {line}");
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    };
    expect("220", &mut input);
    out.write_all(b"BOGUS\r\nRCPT TO:<x@y>\r\nEHLO me\r\n").unwrap();
    expect("502", &mut input);
    expect("503", &mut input);
    expect("250", &mut input);
    out.write_all(b"MAIL FROM:<> BODY=8BITMIME\r\nRCPT TO:<a@b> NOTIFY=NEVER\r\nRCPT TO:<c@d>\r\nDATA\r\n").unwrap();
    for code in ["250", "250", "250", "354"] {
        expect(code, &mut input);
    }
    out.write_all(b"Subject: sink-odd\r\n\r\n..dot\r\n.\r\n").unwrap();
    expect("250", &mut input);
    out.write_all(b"QUIT\r\n").unwrap();
    expect("221", &mut input);
    let got = s.wait_for(|m| m.data_contains(b"sink-odd"), Duration::from_secs(5)).unwrap();
    assert_eq!(got.from, "");
    assert_eq!(got.recipients, ["a@b", "c@d"]);
    assert_eq!(got.data, b"Subject: sink-odd\r\n\r\n.dot\r\n");

    // An endless line ends the session without hurting the sink.
    let mut flood = std::net::TcpStream::connect(s.addr).unwrap();
    let _ = flood.write_all(&vec![b'A'; 64 * 1024]);
    drop(flood);
    assert!(std::net::TcpStream::connect(s.addr).is_ok());
}

#[test]
fn literal_lengths_are_parsed_from_line_ends_only() {
    use common::client::literal_len;
    assert_eq!(literal_len(b"* 1 FETCH (BODY[] {123}\r\n"), Some(123));
    assert_eq!(literal_len(b"a LOGIN x {5+}\r\n"), Some(5));
    assert_eq!(literal_len(b"* OK {no}\r\n"), None);
    assert_eq!(literal_len(b"* OK {12} trailing\r\n"), None);
    assert_eq!(literal_len(b"* OK {12}"), None);
}

/// Dovecot delays the logins of an address after failures (its auth penalty, kept by
/// anvil); every test connects from 127.0.0.1, so the harness turns that off.
#[tokio::test]
async fn a_failed_login_does_not_delay_the_next_one() {
    let d = dovecot();
    d.add_user("penalty@example.com", "good");
    for (password, outcome) in [("bad", "a NO"), ("bad", "a NO"), ("good", "a OK")] {
        let mut c = client::connect_tls(d.imaps, &d.ca_file).await;
        expect_ok(&mut c, "greeting").await;
        c.send(format!("a LOGIN penalty@example.com {password}\r\n").as_bytes()).await;
        let lines = c.read_until_tagged("a").await;
        assert!(lines.last().unwrap().starts_with(outcome), "{lines:?}");
        let penalties = d.penalties();
        assert!(!penalties.contains("127.0.0.1"), "Dovecot penalises 127.0.0.1 after failed logins:\n{penalties}");
    }
}

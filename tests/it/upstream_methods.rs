//! How Postern logs in upstream, against a second Dovecot that offers only SASL LOGIN (IMAP
//! with `LOGINDISABLED`, POP3 refusing `PASS`, submission with `AUTH LOGIN` only, like Office
//! 365 for passwords) and trusts loopback, so a client address passed on is taken: the login
//! works over every protocol, Dovecot's log shows `method=LOGIN`, and its `rip=` is the
//! client's address only when `forward_client_address` is on.

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::client::{self, MailClient};
use common::dovecot::{Dovecot, dovecot_login_only};
use common::logs;
use common::mail::{b64, smtp_reply};
use common::proxy::{Options, Proxy};
use common::slapd;

/// The client's own address, different from the proxy's 127.0.0.1.
const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// A proxy in front of the LOGIN-only Dovecot, and a user `uid`@example.com whose upstream
/// password needs quoting and escaping in every form (quotes, backslash, UTF-8).
async fn proxy_for(uid: &str, forward: bool) -> (Proxy, String, String) {
    logs::capture();
    let mail = format!("{uid}@example.com");
    let profiles = format!("[[profile]]\nname = \"loopback\"\nallow = [\"127.0.0.0/8\"]\nusers = [{mail:?}]\n");
    let protocol_extra = if forward { "forward_client_address = true".to_owned() } else { String::new() };
    let proxy =
        Proxy::start(Options { profiles, dovecot: Some(dovecot_login_only()), protocol_extra, ..Options::default() })
            .await;
    let password = format!("pw-{uid}");
    let upstream_password = format!("up \"q\" \\ ü {uid}");
    slapd::slapd().add_user(uid, &mail, &password, &[]);
    proxy.dovecot.add_user(&mail, &upstream_password);
    proxy.set_upstream(&mail, &upstream_password);
    (proxy, mail, password)
}

async fn line(c: &mut MailClient, text: &str) -> String {
    c.send(format!("{text}\r\n").as_bytes()).await;
    c.read_line().await
}

async fn imap_login(addr: SocketAddr, ca: &std::path::Path, mail: &str, password: &str) {
    let mut c = client::connect_tls_from(CLIENT_IP, addr, ca).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.send(format!("a LOGIN {mail} {password}\r\n").as_bytes()).await;
    let answer = c.read_until_tagged("a").await;
    assert!(answer.last().is_some_and(|l| l.starts_with("a OK")), "{answer:?}");
    c.send(b"b SELECT INBOX\r\n").await;
    let answer = c.read_until_tagged("b").await;
    assert!(answer.last().is_some_and(|l| l.starts_with("b OK")), "the session works upstream: {answer:?}");
}

async fn pop3_login(addr: SocketAddr, ca: &std::path::Path, mail: &str, password: &str) {
    let mut c = client::connect_tls_from(CLIENT_IP, addr, ca).await;
    assert!(c.read_line().await.starts_with("+OK"));
    assert!(line(&mut c, &format!("USER {mail}")).await.starts_with("+OK"));
    let answer = line(&mut c, &format!("PASS {password}")).await;
    assert!(answer.starts_with("+OK"), "{answer}");
    assert!(line(&mut c, "STAT").await.starts_with("+OK"), "the session works upstream");
}

async fn smtp_login(addr: SocketAddr, ca: &std::path::Path, mail: &str, password: &str) {
    let mut c = client::connect_tls_from(CLIENT_IP, addr, ca).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO client.example\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{mail}\0{password}"))).as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    c.send(b"NOOP\r\n").await;
    smtp_reply(&mut c, "250").await;
}

/// Waits for Dovecot's `service` (`imap-login`, ...) login line for `mail`.
fn login_line(dovecot: &Dovecot, service: &str, mail: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(found) = dovecot.login_lines(mail).into_iter().find(|l| l.contains(&format!("{service}: "))) {
            return found;
        }
        assert!(Instant::now() < deadline, "no {service} login for {mail}:\n{}", dovecot.log_tail(30));
        std::thread::sleep(Duration::from_millis(25));
    }
}

async fn log_in_everywhere(uid: &str, forward: bool) -> (Proxy, String) {
    let (proxy, mail, password) = proxy_for(uid, forward).await;
    imap_login(proxy.imaps, &proxy.ca_file, &mail, &password).await;
    pop3_login(proxy.pop3s, &proxy.ca_file, &mail, &password).await;
    smtp_login(proxy.smtps, &proxy.ca_file, &mail, &password).await;
    (proxy, mail)
}

#[tokio::test]
async fn an_upstream_offering_only_sasl_login_is_logged_in_to_over_every_protocol() {
    let (proxy, mail) = log_in_everywhere("upm-login", false).await;
    for service in ["imap-login", "pop3-login", "submission-login"] {
        let line = login_line(proxy.dovecot, service, &mail);
        assert!(line.contains("method=LOGIN"), "{line}");
        // Forwarding is off: Dovecot sees the proxy, not the client.
        assert!(line.contains("rip=127.0.0.1,"), "{line}");
    }
    // What the upstream offered does not fit a PLAIN-only world: IMAP announced
    // LOGINDISABLED, and nothing tried PLAIN (Dovecot would log the unsupported mechanism).
    assert!(!proxy.dovecot.log_contains("Unsupported authentication mechanism"), "{}", proxy.dovecot.log_tail(30));
}

#[tokio::test]
async fn with_forwarding_on_the_upstream_sees_the_clients_address() {
    let (proxy, mail) = log_in_everywhere("upm-forward", true).await;
    for service in ["imap-login", "pop3-login", "submission-login"] {
        let line = login_line(proxy.dovecot, service, &mail);
        assert!(line.contains(&format!("rip={CLIENT_IP},")), "{line}");
        assert!(line.contains("method=LOGIN"), "{line}");
    }
}

//! IMAPS through the proxy, end to end, against real slapd and Dovecot.

use crate::common;

use std::net::IpAddr;
use std::process::Command;

use common::client::{self, MailClient};
use common::logs;
use common::proxy::{self, Dir, Options, Proxy, TestUser};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

fn message(marker: &str) -> Vec<u8> {
    common::mail::message(marker, 2_000)
}

async fn proxy_for(users: &[&str]) -> Proxy {
    logs::capture();
    let mails: Vec<String> = users.iter().map(|u| format!("{u}@example.com")).collect();
    let mails: Vec<&str> = mails.iter().map(String::as_str).collect();
    Proxy::start(Options { profiles: proxy::profile_for(&mails), ..Options::default() }).await
}

async fn connect(proxy: &Proxy) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
    c
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

async fn login_quoted(c: &mut MailClient, user: &TestUser) -> String {
    c.tagged("a1", &format!("LOGIN {} {}", quote(&user.mail), quote(&user.password))).await
}

async fn direct_fetch(user: &TestUser, seq: u32) -> Vec<u8> {
    let dovecot = common::dovecot::dovecot();
    let mut c = client::connect_tls(dovecot.imaps, &dovecot.ca_file).await;
    c.read_line().await;
    let ok = c.tagged("d1", &format!("LOGIN {} {}", quote(&user.mail), quote(&user.upstream_password))).await;
    assert!(ok.starts_with("d1 OK"), "direct login: {ok}");
    assert!(c.tagged("d2", "SELECT INBOX").await.starts_with("d2 OK"));
    c.imap_fetch_body("d3", seq).await
}

/// A message far larger than any buffer on the way (TLS records, the relay's burst and
/// stream buffers) arrives byte for byte as stored, twice on one session: the relay gives
/// its buffers back between bursts and grows them again.
#[tokio::test]
async fn a_large_fetch_through_the_proxy_is_byte_identical() {
    let proxy = proxy_for(&["fetch-large"]).await;
    let user = proxy::add_user(&proxy, "fetch-large", "directory-pw-large");
    let large = common::mail::message("fetch-large", 12 * 1024 * 1024 + 17);
    common::dovecot::dovecot().deliver(&user.mail, &large);
    let mut c = connect(&proxy).await;
    let ok = login_quoted(&mut c, &user).await;
    assert!(ok.starts_with("a1 OK"), "{ok}");
    assert!(c.tagged("a2", "SELECT INBOX").await.starts_with("a2 OK"));
    for tag in ["a3", "a4"] {
        let got = c.imap_fetch_body(tag, 1).await;
        assert_eq!(got.len(), large.len());
        assert!(got == large, "the message through the proxy differs from the one stored");
    }
    assert!(c.tagged("a5", "LOGOUT").await.starts_with("a5 OK"));
}

#[tokio::test]
async fn login_and_fetch_match_a_direct_session() {
    let proxy = proxy_for(&["fetch1"]).await;
    let user = proxy::add_user(&proxy, "fetch1", "directory-pw-1");
    common::dovecot::dovecot().deliver(&user.mail, &message("fetch1"));

    let mut c = connect(&proxy).await;
    let ok = login_quoted(&mut c, &user).await;
    assert!(ok.starts_with("a1 OK [CAPABILITY IMAP4rev1"), "login answer carries upstream capabilities: {ok}");
    assert!(c.tagged("a2", "SELECT INBOX").await.starts_with("a2 OK"));
    let through_proxy = c.imap_fetch_body("a3", 1).await;
    assert!(c.tagged("a4", "LOGOUT").await.starts_with("a4 OK"));

    assert_eq!(through_proxy, direct_fetch(&user, 1).await);
    assert_eq!(through_proxy, message("fetch1"));
    let audit = logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\""]).await;
    assert!(audit.contains("\"profile\":\"loopback (127.0.0.1/32)\""), "{audit}");
    assert!(audit.contains("\"bytes_down\":"), "{audit}");
}

#[tokio::test]
async fn login_with_synchronizing_and_non_synchronizing_literals() {
    let proxy = proxy_for(&["literal1"]).await;
    let user = proxy::add_user(&proxy, "literal1", "lit pw \"with\" \\ and ünïcode");

    let mut c = connect(&proxy).await;
    let password = user.password.as_bytes();
    c.send(format!("b1 LOGIN {{{}}}\r\n", user.mail.len()).as_bytes()).await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(format!("{} {{{}}}\r\n", user.mail, password.len()).as_bytes()).await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(password).await;
    c.send(b"\r\n").await;
    let ok = c.read_until_tagged("b1").await.pop().unwrap();
    assert!(ok.starts_with("b1 OK"), "{ok}");

    let mut c = connect(&proxy).await;
    let mut command = format!("b2 LOGIN {} {{{}+}}\r\n", user.mail, password.len()).into_bytes();
    command.extend_from_slice(password);
    command.extend_from_slice(b"\r\n");
    c.send(&command).await;
    let ok = c.read_until_tagged("b2").await.pop().unwrap();
    assert!(ok.starts_with("b2 OK"), "{ok}");
}

#[tokio::test]
async fn authenticate_plain_with_initial_response_and_with_continuation() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let proxy = proxy_for(&["plain1"]).await;
    let user = proxy::add_user(&proxy, "plain1", "plain \"pw\" \\ é");
    let response = b64(&format!("\0{}\0{}", user.mail, user.password));

    let mut c = connect(&proxy).await;
    let ok = c.tagged("c1", &format!("AUTHENTICATE PLAIN {response}")).await;
    assert!(ok.starts_with("c1 OK"), "{ok}");
    assert!(c.tagged("c2", "SELECT INBOX").await.starts_with("c2 OK"));

    let mut c = connect(&proxy).await;
    c.send(b"c3 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(format!("{response}\r\n").as_bytes()).await;
    let ok = c.read_until_tagged("c3").await.pop().unwrap();
    assert!(ok.starts_with("c3 OK"), "{ok}");

    let mut c = connect(&proxy).await;
    c.send(b"c4 AUTHENTICATE LOGIN\r\n").await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(format!("{}\r\n", b64(&user.mail)).as_bytes()).await;
    assert!(c.read_line().await.starts_with('+'));
    c.send(format!("{}\r\n", b64(&user.password)).as_bytes()).await;
    let ok = c.read_until_tagged("c4").await.pop().unwrap();
    assert!(ok.starts_with("c4 OK"), "{ok}");
}

#[tokio::test]
async fn commands_pipelined_after_login_reach_the_upstream() {
    let proxy = proxy_for(&["pipe1"]).await;
    let user = proxy::add_user(&proxy, "pipe1", "pipe-pw");
    let mut c = connect(&proxy).await;
    let batch = format!("p1 LOGIN {} {}\r\np2 SELECT INBOX\r\np3 NOOP\r\n", quote(&user.mail), quote(&user.password));
    c.send(batch.as_bytes()).await;
    assert!(c.read_until_tagged("p1").await.pop().unwrap().starts_with("p1 OK"));
    assert!(c.read_until_tagged("p2").await.pop().unwrap().starts_with("p2 OK"));
    assert!(c.read_until_tagged("p3").await.pop().unwrap().starts_with("p3 OK"));
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_denial() {
    let proxy = proxy_for(&["wrong1", "ghost1"]).await;
    let user = proxy::add_user(&proxy, "wrong1", "right-pw");
    let mut c = connect(&proxy).await;
    let answer = c.tagged("w1", &format!("LOGIN {} wrong-pw", user.mail)).await;
    assert_eq!(answer, format!("w1 {DENIAL}"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["\"reason\":\"wrong password\""]).await;

    let mut c = connect(&proxy).await;
    let answer = c.tagged("w2", "LOGIN ghost1@example.com whatever").await;
    assert_eq!(answer, format!("w2 {DENIAL}"));
    // The client may retry on the same connection after a refusal.
    let answer = login_quoted(&mut c, &user).await;
    assert!(answer.starts_with("a1 OK"), "{answer}");
    drop(c);
    logs::wait_for_audit("ghost1@example.com", &["\"reason\":\"unknown user\""]).await;
}

#[tokio::test]
async fn address_outside_the_profile_is_refused() {
    let proxy = proxy_for(&["ipcheck1"]).await;
    let user = proxy::add_user(&proxy, "ipcheck1", "ip-pw");
    let from: IpAddr = "127.0.0.2".parse().unwrap();
    let mut c = client::connect_tls_from(from, proxy.imaps, &proxy.ca_file).await;
    c.read_line().await;
    let answer = login_quoted(&mut c, &user).await;
    assert_eq!(answer, format!("a1 {DENIAL}"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client IP not in any profile\"", "127.0.0.2"]).await;

    // Once 127.0.0.2 is in some profile, the refusal names the user's own profiles.
    proxy.set_profiles(&format!(
        "{}\n[[profile]]\nname = \"other\"\nallow = [\"127.0.0.2\"]\nusers = [\"someone-else@example.com\"]\n",
        proxy::profile_for(&[&user.mail])
    ));
    let mut c = client::connect_tls_from(from, proxy.imaps, &proxy.ca_file).await;
    c.read_line().await;
    assert_eq!(login_quoted(&mut c, &user).await, format!("a1 {DENIAL}"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client IP not allowed by the user's profiles\""]).await;
}

#[tokio::test]
async fn user_without_a_profile_is_refused() {
    let proxy = proxy_for(&["someone-else"]).await;
    let user = proxy::add_user(&proxy, "noprofile1", "np-pw");
    let mut c = connect(&proxy).await;
    assert_eq!(login_quoted(&mut c, &user).await, format!("a1 {DENIAL}"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["\"reason\":\"no profile applies to the user\""]).await;
}

#[tokio::test]
async fn upstream_refusing_the_stored_credential_is_an_outage_not_a_denial() {
    let proxy = proxy_for(&["stale1"]).await;
    let user = proxy::add_user(&proxy, "stale1", "stale-pw");
    proxy.set_upstream(&user.mail, "changed-behind-our-back");
    let mut c = connect(&proxy).await;
    let answer = login_quoted(&mut c, &user).await;
    assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
    drop(c);
    let audit = logs::wait_for_audit(&user.mail, &["refused the stored credential"]).await;
    assert!(audit.contains("\"outcome\":\"unavailable\""), "{audit}");
}

#[tokio::test]
async fn no_stored_credential_is_refused() {
    let proxy = proxy_for(&["novault1"]).await;
    common::slapd::slapd().add_user("novault1", "novault1@example.com", "nv-pw", &[]);
    let mut c = connect(&proxy).await;
    assert_eq!(c.tagged("n1", "LOGIN novault1@example.com nv-pw").await, format!("n1 {DENIAL}"));
    drop(c);
    logs::wait_for_audit("novault1@example.com", &["no upstream credential"]).await;
}

#[tokio::test]
async fn directory_down_is_an_outage() {
    logs::capture();
    let proxy = Proxy::start(Options {
        directory: Dir::LdapDown,
        profiles: proxy::profile_for(&["ldapdown1@example.com"]),
        ..Options::default()
    })
    .await;
    let mut c = connect(&proxy).await;
    let answer = c.tagged("l1", "LOGIN ldapdown1@example.com some-pw").await;
    assert!(answer.starts_with("l1 NO [UNAVAILABLE]"), "{answer}");
    drop(c);
    logs::wait_for_audit("ldapdown1@example.com", &["\"outcome\":\"unavailable\"", "directory unavailable"]).await;
}

#[tokio::test]
async fn upstream_down_is_an_outage() {
    logs::capture();
    let proxy = Proxy::start(Options {
        upstream_down: true,
        profiles: proxy::profile_for(&["updown1@example.com"]),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&proxy, "updown1", "ud-pw");
    let mut c = connect(&proxy).await;
    let answer = login_quoted(&mut c, &user).await;
    assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
    drop(c);
    logs::wait_for_audit(&user.mail, &["\"outcome\":\"unavailable\"", "cannot connect"]).await;
}

#[tokio::test]
async fn file_directory_works_too() {
    logs::capture();
    let proxy = Proxy::start(Options {
        directory: Dir::File,
        profiles: proxy::profile_for(&["filedir1@example.com"]),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&proxy, "filedir1", "unused-ldap-pw");
    proxy.set_file_password(&user.mail, "file pw \"q\" \\").await;
    let mut c = connect(&proxy).await;
    let answer = c.tagged("f1", &format!("LOGIN {} {}", user.mail, quote("file pw \"q\" \\"))).await;
    assert!(answer.starts_with("f1 OK"), "{answer}");
}

fn python_imaplib(proxy: &Proxy, user: &TestUser) -> String {
    common::require_binary("python3", "python3");
    let script = r#"
import imaplib, ssl, sys
port, ca, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
m = imaplib.IMAP4_SSL("localhost", port, ssl_context=ctx)
m.login(user, password)
m.select("INBOX")
typ, data = m.fetch("1", "(BODY.PEEK[])")
sys.stdout.buffer.write(data[0][1])
m.logout()
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &proxy.imaps.port().to_string(),
            &proxy.ca_file.display().to_string(),
            &user.mail,
            &user.password,
        ])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "imaplib failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn python_imaplib_logs_in_and_fetches() {
    let proxy = proxy_for(&["pyimap1"]).await;
    // imaplib sends LOGIN arguments as ASCII; quotes, backslashes and spaces still need quoting.
    let user = proxy::add_user(&proxy, "pyimap1", "py \"pw\" \\ x");
    common::dovecot::dovecot().deliver(&user.mail, &message("pyimap1"));
    let body = tokio::task::spawn_blocking(move || python_imaplib(&proxy, &user)).await.unwrap();
    assert!(body.contains("Subject: pyimap1"), "{body}");
}

#[tokio::test]
async fn curl_logs_in_and_fetches() {
    common::require_binary("curl", "curl");
    let proxy = proxy_for(&["curlimap1"]).await;
    let user = proxy::add_user(&proxy, "curlimap1", "curl-pw");
    common::dovecot::dovecot().deliver(&user.mail, &message("curlimap1"));
    let url = format!("imaps://localhost:{}/INBOX;UID=1", proxy.imaps.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{}:127.0.0.1", proxy.imaps.port())])
        .args([
            "--cacert",
            &proxy.ca_file.display().to_string(),
            "--user",
            &format!("{}:{}", user.mail, user.password),
            &url,
        ])
        .output()
        .await
        .expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, message("curlimap1"));
}

/// SHA-256 (hex) of Dovecot's leaf certificate, as seen over TLS.
async fn dovecot_leaf_pin() -> String {
    let d = common::dovecot::dovecot();
    let tcp = tokio::net::TcpStream::connect(d.imaps).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = client::tls_connector(&d.ca_file).connect(name, tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, leaf.as_ref());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn upstream_certificate_pins_are_enforced() {
    logs::capture();
    let pin = dovecot_leaf_pin().await;
    let profiles = proxy::profile_for(&["pinned1@example.com", "pinned2@example.com"]);
    let good = Proxy::start(Options {
        profiles: profiles.clone(),
        imap_extra: format!("upstream_pin_sha256 = [{pin:?}]"),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&good, "pinned1", "pin-pw");
    let mut c = connect(&good).await;
    assert!(login_quoted(&mut c, &user).await.starts_with("a1 OK"));

    let bad = Proxy::start(Options {
        profiles,
        imap_extra: format!("upstream_pin_sha256 = [{:?}]", "00".repeat(32)),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&bad, "pinned2", "pin-pw");
    let mut c = connect(&bad).await;
    assert!(login_quoted(&mut c, &user).await.starts_with("a1 NO [UNAVAILABLE]"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["matches none of the configured pins"]).await;
}

#[tokio::test]
async fn untrusted_upstream_certificates_are_refused_unless_explicitly_insecure() {
    logs::capture();
    let profiles = proxy::profile_for(&["untrusted1@example.com", "insecure1@example.com"]);
    let strict = Proxy::start(Options { profiles: profiles.clone(), no_upstream_ca: true, ..Options::default() }).await;
    let user = proxy::add_user(&strict, "untrusted1", "ut-pw");
    let mut c = connect(&strict).await;
    assert!(login_quoted(&mut c, &user).await.starts_with("a1 NO [UNAVAILABLE]"));
    drop(c);
    logs::wait_for_audit(&user.mail, &["TLS with", "\"outcome\":\"unavailable\""]).await;

    let insecure = Proxy::start(Options {
        profiles,
        no_upstream_ca: true,
        imap_extra: "upstream_tls_insecure_no_verify = true".to_owned(),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&insecure, "insecure1", "in-pw");
    let mut c = connect(&insecure).await;
    assert!(login_quoted(&mut c, &user).await.starts_with("a1 OK"));
    assert!(logs::all().contains("upstream certificates are NOT verified"), "the insecure option is announced");
}

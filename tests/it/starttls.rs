//! STARTTLS listeners, end to end: real clients (curl, swaks, Python's imaplib, poplib and
//! smtplib) upgrade and log in through the proxy to Dovecot; logins before TLS are refused
//! without asking the directory; commands pipelined after STARTTLS are never executed.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::mail::{b64, message, smtp_reply};
use common::proxy::{self, Options, Proxy, TestUser};
use common::sink::sink;
use postern::metrics::{LoginResult, Outcome};

/// The audit and metrics reason of a login attempted before TLS.
const TLS_REASON: &str = "login attempted before STARTTLS";

async fn proxy_for(uid: &str) -> (Proxy, TestUser) {
    logs::capture();
    let mail = format!("{uid}@example.com");
    let proxy = Proxy::start(Options { profiles: proxy::profile_for(&[&mail]), ..Options::default() }).await;
    let user = proxy::add_user(&proxy, uid, &format!("{uid}-pw-Tq7"));
    (proxy, user)
}

/// How many times the proxy asked the directory (the directory latency histogram's count:
/// a login over TLS asks twice, the lookup and the password check).
fn directory_lookups(proxy: &Proxy) -> u64 {
    let text = proxy.server().metrics().render();
    let line = text.lines().find(|l| l.starts_with("postern_directory_seconds_count")).expect("directory histogram");
    line.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count")
}

fn tls_refusals(proxy: &Proxy) -> u64 {
    proxy.server().metrics().logins(LoginResult { outcome: Outcome::Denied, reason: TLS_REASON })
}

fn curl(port: u16) -> tokio::process::Command {
    common::require_binary("curl", "curl");
    let mut command = tokio::process::Command::new("curl");
    command.args(["-sS", "--max-time", "20", "--ssl-reqd", "--resolve", &format!("localhost:{port}:127.0.0.1")]);
    command
}

#[tokio::test]
async fn curl_lists_imap_mailboxes_and_pop3_messages_over_starttls() {
    let (proxy, user) = proxy_for("sttlscurl1").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("sttlscurl1", 2_000));
    let ca = proxy.ca_file.display().to_string();
    let credentials = format!("{}:{}", user.mail, user.password);

    let port = proxy.imap_starttls.port();
    let out = curl(port)
        .args(["--cacert", &ca, "--user", &credentials, &format!("imap://localhost:{port}/")])
        .output()
        .await
        .expect("run curl");
    assert!(out.status.success(), "curl imap: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("* LIST") && listing.contains("INBOX"), "{listing}");

    let port = proxy.pop3_starttls.port();
    let out = curl(port)
        .args(["--cacert", &ca, "--user", &credentials, &format!("pop3://localhost:{port}/")])
        .output()
        .await
        .expect("run curl");
    assert!(out.status.success(), "curl pop3: {}", String::from_utf8_lossy(&out.stderr));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.starts_with("1 "), "a one-message list: {listing}");

    logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", "\"protocol\":\"imap\""]).await;
    logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", "\"protocol\":\"pop3\""]).await;
}

#[tokio::test]
async fn curl_and_swaks_submit_over_starttls() {
    let (proxy, user) = proxy_for("sttlscurl2").await;
    let port = proxy.smtp_starttls.port();
    let msg = message("sttls-curl-smtp", 3_000);
    let mut child = curl(port)
        .args(["--cacert", &proxy.ca_file.display().to_string()])
        .args(["--user", &format!("{}:{}", user.mail, user.password)])
        .args(["--mail-from", &user.mail, "--mail-rcpt", "friend@example.net", "--upload-file", "-"])
        .arg(format!("smtp://localhost:{port}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run curl");
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(&msg).await.expect("message to curl");
    }
    let out = child.wait_with_output().await.expect("curl");
    assert!(out.status.success(), "curl smtp: {}", String::from_utf8_lossy(&out.stderr));
    sink()
        .wait_for_async(|m| m.data_contains(b"<sttls-curl-smtp@example.com>"), Duration::from_secs(10))
        .await
        .expect("curl's message reaches the sink");

    let swaks = common::require_binary("swaks", "swaks");
    let (ca, mail, password) = (proxy.ca_file.display().to_string(), user.mail.clone(), user.password.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(swaks)
            .args(["--server", "localhost", "--port", &port.to_string(), "-tls", "--tls-verify", "--tls-ca-path", &ca])
            .args(["--auth", "PLAIN", "--auth-user", &mail, "--auth-password", &password])
            .args(["--from", &mail, "--to", "friend@example.net", "--header", "Subject: sttls-swaks-marker"])
            .args(["--timeout", "20"])
            .output()
            .expect("run swaks")
    })
    .await
    .unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swaks: {transcript}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(transcript.contains("220 2.0.0 Ready to start TLS"), "{transcript}");
    assert!(transcript.contains("250 STARTTLS") && transcript.contains("250 AUTH PLAIN LOGIN"), "{transcript}");
    sink()
        .wait_for_async(|m| m.data_contains(b"Subject: sttls-swaks-marker"), Duration::from_secs(10))
        .await
        .expect("swaks's message reaches the sink");
}

#[tokio::test]
async fn python_clients_upgrade_and_log_in() {
    common::require_binary("python3", "python3");
    let (proxy, user) = proxy_for("sttlspy1").await;
    common::dovecot::dovecot().deliver(&user.mail, &message("sttlspy1", 2_000));
    let script = r#"
import imaplib, poplib, smtplib, ssl, sys
imap, pop3, smtp, ca, user, password = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
ctx = ssl.create_default_context(cafile=ca)

m = imaplib.IMAP4("localhost", imap)
assert "LOGINDISABLED" in m.capabilities and "STARTTLS" in m.capabilities, m.capabilities
m.starttls(ssl_context=ctx)
assert "LOGINDISABLED" not in m.capabilities and "AUTH=PLAIN" in m.capabilities, m.capabilities
m.login(user, password)
typ, data = m.select("INBOX")
assert typ == "OK" and data[0] == b"1", (typ, data)
m.logout()

p = poplib.POP3("localhost", pop3)
assert "STLS" in p.capa() and "USER" not in p.capa(), p.capa()
p.stls(context=ctx)
p.user(user)
p.pass_(password)
assert p.stat()[0] == 1, p.stat()
p.quit()

s = smtplib.SMTP("localhost", smtp)
s.ehlo("client.example")
assert s.has_extn("starttls") and not s.has_extn("auth"), s.esmtp_features
s.starttls(context=ctx)
s.ehlo("client.example")
assert s.has_extn("auth"), s.esmtp_features
s.login(user, password)
s.sendmail(user, ["friend@example.net"], "Subject: sttls-smtplib-marker\r\n\r\nhello\r\n")
s.quit()
print("all three ok")
"#;
    let args = [
        proxy.imap_starttls.port().to_string(),
        proxy.pop3_starttls.port().to_string(),
        proxy.smtp_starttls.port().to_string(),
        proxy.ca_file.display().to_string(),
        user.mail.clone(),
        user.password.clone(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").arg("-c").arg(script).args(&args).output().expect("run python3")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "all three ok");
    sink()
        .wait_for_async(|m| m.data_contains(b"Subject: sttls-smtplib-marker"), Duration::from_secs(10))
        .await
        .expect("smtplib's message reaches the sink");
    for protocol in ["imap", "pop3", "smtp"] {
        logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", &format!("\"protocol\":\"{protocol}\"")]).await;
    }
}

/// Connects in plaintext and reads the greeting (an SMTP one is checked for 220).
async fn connect(addr: SocketAddr, smtp: bool) -> MailClient {
    let mut c = client::connect_plain(addr).await;
    if smtp {
        smtp_reply(&mut c, "220").await;
    } else {
        c.read_line().await;
    }
    c
}

#[tokio::test]
async fn logins_before_tls_are_refused_without_asking_the_directory() {
    let (proxy, user) = proxy_for("sttlsearly1").await;
    let password = user.password.as_str();

    let mut imap = client::connect_plain(proxy.imap_starttls).await;
    let greeting = imap.read_line().await;
    assert_eq!(greeting, "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Postern ready.");
    imap.send(format!("a LOGIN {} {password}\r\n", user.mail).as_bytes()).await;
    assert_eq!(imap.read_line().await, "a NO [PRIVACYREQUIRED] Use STARTTLS first; no login before TLS");
    let plain = b64(format!("\0{}\0{password}", user.mail));
    imap.send(format!("b AUTHENTICATE PLAIN {plain}\r\n").as_bytes()).await;
    assert_eq!(imap.read_line().await, "b NO [PRIVACYREQUIRED] Use STARTTLS first; no login before TLS");
    let imap_port = imap.local_addr().port();
    drop(imap);

    let mut pop3 = connect(proxy.pop3_starttls, false).await;
    pop3.send(format!("USER {}\r\n", user.mail).as_bytes()).await;
    assert_eq!(pop3.read_line().await, "-ERR [AUTH] Use STLS first; no login before TLS");
    pop3.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await;
    assert_eq!(pop3.read_line().await, "-ERR [AUTH] Use STLS first; no login before TLS");
    drop(pop3);

    let mut smtp = connect(proxy.smtp_starttls, true).await;
    smtp.send(b"EHLO client.example\r\n").await;
    let ehlo = smtp_reply(&mut smtp, "250").await;
    assert_eq!(ehlo.last().map(String::as_str), Some("250 STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    smtp.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await;
    assert_eq!(smtp_reply(&mut smtp, "530").await, ["530 5.7.0 Must issue a STARTTLS command first"]);
    smtp.send(b"MAIL FROM:<a@example.com>\r\n").await;
    smtp_reply(&mut smtp, "530").await;
    smtp.send(b"QUIT\r\n").await;
    smtp_reply(&mut smtp, "221").await;

    assert_eq!(directory_lookups(&proxy), 0, "the directory was never asked");
    assert_eq!(tls_refusals(&proxy), 5, "each attempt counted as a refusal");
    let audit =
        logs::wait_for_line(&["\"target\":\"audit\"", TLS_REASON, "AUTHENTICATE", &format!(":{imap_port}\"")]).await;
    assert!(audit.contains("\"mechanism\":\"AUTHENTICATE\""), "{audit}");
    // Nothing the client sent with its attempts is kept: no user name, no password.
    let logged = logs::all();
    let early: Vec<&str> = logged.lines().filter(|l| l.contains(TLS_REASON)).collect();
    assert!(early.len() >= 5, "{early:?}");
    assert!(early.iter().all(|l| !l.contains(&user.mail)), "{early:?}");
    assert!(!logged.contains(password) && !logged.contains(&plain), "a password reached the logs");
}

#[tokio::test]
async fn commands_pipelined_with_starttls_are_never_executed() {
    let (proxy, user) = proxy_for("sttlsinject1").await;
    let ca = &proxy.ca_file;

    // IMAP: the LOGIN in the same packet as STARTTLS gets no answer, before or after TLS.
    let mut imap = connect(proxy.imap_starttls, false).await;
    imap.send(format!("a STARTTLS\r\nb LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    assert_eq!(imap.read_line().await, "a OK Begin TLS negotiation now");
    imap.start_tls(ca).await;
    imap.send(b"c NOOP\r\n").await;
    assert_eq!(imap.read_line().await, "c OK NOOP completed", "the first answer over TLS is to NOOP");
    imap.send(b"d CAPABILITY\r\n").await;
    let caps = imap.read_until_tagged("d").await;
    assert!(caps[0].contains("AUTH=PLAIN") && !caps[0].contains("STARTTLS"), "{caps:?}");
    assert_eq!(directory_lookups(&proxy), 0, "the injected LOGIN never ran");
    // The session goes on as on the implicit TLS port.
    imap.send(format!("e LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
    let ok = imap.read_until_tagged("e").await;
    assert!(ok.last().is_some_and(|l| l.starts_with("e OK")), "{ok:?}");
    let one_login = directory_lookups(&proxy);
    assert!(one_login > 0);
    drop(imap);

    // POP3: USER/PASS after STLS are dropped; CAPA over TLS is the first answer.
    let mut pop3 = connect(proxy.pop3_starttls, false).await;
    pop3.send(format!("STLS\r\nUSER {}\r\nPASS {}\r\n", user.mail, user.password).as_bytes()).await;
    assert_eq!(pop3.read_line().await, "+OK Begin TLS negotiation");
    pop3.start_tls(ca).await;
    pop3.send(b"PASS nothing\r\n").await;
    assert_eq!(pop3.read_line().await, "-ERR USER first", "the injected USER was not kept");
    pop3.send(b"CAPA\r\n").await;
    assert_eq!(pop3.read_line().await, "+OK Capability list follows");
    let capa = String::from_utf8_lossy(&pop3.pop3_multiline().await).into_owned();
    assert!(capa.contains("USER") && !capa.contains("STLS"), "{capa}");
    drop(pop3);

    // SMTP: the AUTH after STARTTLS is dropped, and the state starts over (EHLO first).
    let mut smtp = connect(proxy.smtp_starttls, true).await;
    smtp.send(b"EHLO client.example\r\n").await;
    smtp_reply(&mut smtp, "250").await;
    let plain = b64(format!("\0{}\0{}", user.mail, user.password));
    smtp.send(format!("STARTTLS\r\nAUTH PLAIN {plain}\r\n").as_bytes()).await;
    assert_eq!(smtp_reply(&mut smtp, "220").await, ["220 2.0.0 Ready to start TLS"]);
    smtp.start_tls(ca).await;
    smtp.send(format!("AUTH PLAIN {plain}\r\n").as_bytes()).await;
    assert_eq!(smtp_reply(&mut smtp, "503").await, ["503 5.5.1 Send EHLO first"], "no EHLO carried over TLS");
    smtp.send(b"EHLO client.example\r\n").await;
    let ehlo = smtp_reply(&mut smtp, "250").await;
    assert!(ehlo.iter().any(|l| l.contains("AUTH PLAIN LOGIN")) && !ehlo.iter().any(|l| l.contains("STARTTLS")));
    drop(smtp);

    assert_eq!(directory_lookups(&proxy), one_login, "only the login made over TLS asked the directory");
    assert_eq!(tls_refusals(&proxy), 0);
    let dropped = logs::wait_for_line(&["dropped plaintext sent after STARTTLS"]).await;
    assert!(!dropped.contains(&user.password), "{dropped}");
}

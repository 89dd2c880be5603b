//! No password, upstream secret or token ever appears in anything Postern logs, at the most
//! verbose level, whatever path a login takes.

use crate::common;

use common::client::{self, MailClient};
use common::logs;
use common::mail::{b64, smtp_reply};
use common::proxy::{self, Dir, Options, Proxy};

async fn imap(proxy: &Proxy) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    c.read_line().await;
    c
}

#[tokio::test]
async fn no_secret_reaches_the_logs() {
    logs::capture();
    let users = ["secret-a@example.com", "secret-b@example.com", "secret-c@example.com"];
    let proxy = Proxy::start(Options { profiles: proxy::profile_for(&users), ..Options::default() }).await;
    let mut secrets = Vec::new();

    // IMAP: LOGIN quoted and literal, AUTHENTICATE PLAIN, a wrong password, a stale upstream.
    let a = proxy::add_user(&proxy, "secret-a", "Sa-\"dir\" \\pw ü");
    let mut c = imap(&proxy).await;
    let pw = a.password.as_bytes();
    c.send(format!("1 LOGIN {} {{{}+}}\r\n", a.mail, pw.len()).as_bytes()).await;
    c.send(pw).await;
    c.send(b"\r\n").await;
    assert!(c.read_until_tagged("1").await.pop().unwrap().starts_with("1 OK"));
    c.send(b"2 LOGOUT\r\n").await;
    c.read_to_end_or_close().await;
    let wrong = "Wrong-Guess-7731";
    let mut c = imap(&proxy).await;
    c.send(format!("3 AUTHENTICATE PLAIN {}\r\n", b64(format!("\0{}\0{wrong}", a.mail))).as_bytes()).await;
    c.read_until_tagged("3").await;
    secrets.extend([a.password.clone(), a.upstream_password.clone(), wrong.to_owned()]);
    secrets.push(b64(format!("\0{}\0{}", a.mail, wrong)));

    let stale = "Stale-Upstream-5520";
    proxy.set_upstream(&a.mail, stale);
    let quoted = a.password.replace('\\', "\\\\").replace('"', "\\\"");
    c.send(format!("4 LOGIN {} \"{quoted}\"\r\n", a.mail).as_bytes()).await;
    assert!(c.read_until_tagged("4").await.pop().unwrap().starts_with("4 NO [UNAVAILABLE]"));
    secrets.push(stale.to_owned());
    drop(c);

    // POP3 USER/PASS and SMTP AUTH LOGIN.
    let b = proxy::add_user(&proxy, "secret-b", "Sb pop pw");
    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    c.read_line().await;
    c.send(format!("USER {}\r\nPASS {}\r\n", b.mail, b.password).as_bytes()).await;
    c.read_line().await;
    assert!(c.read_line().await.starts_with("+OK"));
    secrets.extend([b.password.clone(), b.upstream_password.clone()]);
    drop(c);

    let cu = proxy::add_user(&proxy, "secret-c", "Sc-smtp-pw");
    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO x\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH LOGIN\r\n{}\r\n{}\r\n", b64(&cu.mail), b64(&cu.password)).as_bytes()).await;
    smtp_reply(&mut c, "334").await;
    smtp_reply(&mut c, "334").await;
    smtp_reply(&mut c, "235").await;
    secrets.extend([cu.password.clone(), cu.upstream_password.clone(), b64(&cu.password)]);
    drop(c);

    // The directory down and the file directory paths.
    let down =
        Proxy::start(Options { directory: Dir::LdapDown, profiles: proxy::profile_for(&users), ..Options::default() })
            .await;
    let mut c = imap(&down).await;
    c.send(b"5 LOGIN secret-a@example.com Down-Dir-Pw-4411\r\n").await;
    c.read_until_tagged("5").await;
    secrets.push("Down-Dir-Pw-4411".to_owned());
    drop(c);

    // Give the sessions time to end and write their audit lines.
    logs::wait_for_audit(&cu.mail, &["\"outcome\":\"logged-in\""]).await;
    logs::wait_for_audit(&b.mail, &["\"outcome\":\"logged-in\""]).await;
    let all = logs::all();
    assert!(all.contains("\"target\":\"audit\""), "logs were captured");
    for secret in &secrets {
        assert!(!all.contains(secret.as_str()), "a secret appeared in the logs: {secret:?}");
        let escaped = serde_json_escape(secret);
        assert!(!all.contains(&escaped), "a secret appeared (JSON-escaped) in the logs: {secret:?}");
    }
}

/// How a JSON log line would spell `s`.
fn serde_json_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The base64 forms a secret travels in: SASL PLAIN (with and without an authorization
/// identity) and XOAUTH2.
fn encoded_forms(user: &str, secret: &str) -> Vec<String> {
    vec![
        postern::protocol::sasl::encode_plain(user, secret),
        b64(format!("{user}\0{user}\0{secret}")),
        postern::protocol::sasl::encode_xoauth2(user, secret),
    ]
}

#[tokio::test]
async fn no_secret_reaches_the_audit_file_or_the_daemons_stderr() {
    use crate::install::{Daemon, Install, profiles_for};
    let user = "secret-d@example.com";
    let dovecot = common::dovecot::dovecot();
    let smtp = format!(
        "[smtp]\nlisten = [\"127.0.0.1:0\"]\nupstream = \"localhost:{}\"\nupstream_ca_file = {:?}\n",
        dovecot.submissions.port(),
        dovecot.ca_file.display().to_string()
    );
    let install = Install::new(&profiles_for(&[user]), "", &format!("[lockout]\nfailure_delay_ms = 0\n{smtp}"));
    let directory_password = "Sd-dir \"pw\" \\ ü";
    install.add_user(user, directory_password);
    let upstream_password = format!("up-{user}-Qw7");
    let daemon = Daemon::start_logging(&install, "trace");
    let smtp_address = daemon
        .wait_for_log(&["\"listening\"", "\"protocol\":\"smtp\""])
        .split("\"address\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|a| a.parse().ok())
        .expect("the SMTP listener's address");

    // IMAP: a right and a wrong password; SMTP: AUTH PLAIN (the upstream login is PLAIN too).
    let wrong = "Wrong-Daemon-Guess-9043";
    for (tag, password) in [("1", directory_password), ("2", wrong)] {
        let mut c = client::connect_tls(daemon.imaps, &install.ca_file).await;
        c.read_line().await;
        let quoted = password.replace('\\', "\\\\").replace('"', "\\\"");
        c.send(format!("{tag} LOGIN {user} \"{quoted}\"\r\n").as_bytes()).await;
        c.read_until_tagged(tag).await;
        c.send(b"9 LOGOUT\r\n").await;
        c.read_to_end_or_close().await;
    }
    let mut c = client::connect_tls(smtp_address, &install.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO x\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{user}\0{directory_password}"))).as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    c.send(b"QUIT\r\n").await;
    c.read_to_end_or_close().await;

    // Every session has its audit line before anything is searched.
    let audit_path = install.path("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while crate::install::audit_lines(&audit_path).iter().filter(|l| l["event"] == "session").count() < 3 {
        assert!(std::time::Instant::now() < deadline, "three session lines in the audit file");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    let stderr = daemon.log();
    assert!(stderr.contains("TRACE") || stderr.contains("\"level\":\"TRACE\""), "the daemon logged at trace level");
    let mut secrets = vec![directory_password.to_owned(), upstream_password.clone(), wrong.to_owned()];
    for secret in [directory_password, upstream_password.as_str(), wrong] {
        secrets.extend(encoded_forms(user, secret));
    }
    for secret in &secrets {
        for (place, text) in [("audit file", &audit), ("daemon's stderr", &stderr)] {
            assert!(!text.contains(secret.as_str()), "a secret reached the {place}: {secret:?}");
            assert!(!text.contains(&serde_json_escape(secret)), "a secret reached the {place} (JSON-escaped)");
        }
    }
}

#[tokio::test]
async fn no_oauth2_token_reaches_the_logs_raw_or_encoded() {
    use common::oauth::{self, OAuthProxy, Source, token_server};
    logs::capture();
    let mail = oauth::add_user("secret-oauth", "dir-pw-so");
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    c.read_line().await;
    c.send(format!("1 LOGIN {mail} dir-pw-so\r\n").as_bytes()).await;
    assert!(c.read_until_tagged("1").await.pop().unwrap().starts_with("1 OK"));
    drop(c);
    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    c.read_line().await;
    c.send(format!("USER {mail}\r\nPASS dir-pw-so\r\n").as_bytes()).await;
    c.read_line().await;
    assert!(c.read_line().await.starts_with("+OK"));
    drop(c);
    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO x\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{mail}\0dir-pw-so"))).as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    drop(c);
    logs::wait_for_audit(&mail, &["\"protocol\":\"smtp\"", "\"outcome\":\"logged-in\""]).await;
    let all = logs::all();
    let secrets = token_server().secrets();
    assert!(!secrets.is_empty(), "tokens were issued");
    for secret in &secrets {
        assert!(!all.contains(secret.as_str()), "a token or OAuth2 secret reached the logs");
        for encoded in encoded_forms(&mail, secret) {
            assert!(!all.contains(&encoded), "an encoded token reached the logs");
        }
    }
    proxy.stop().await;
}

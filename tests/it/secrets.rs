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

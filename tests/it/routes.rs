//! Routes: users sent to different upstreams by mail domain, user or directory group, against
//! two real Dovecot instances (the shared one as the default, the LOGIN-only one as the
//! second provider). Each login lands on its own instance, a route without a protocol's
//! upstream refuses that protocol, a reload that moves a user closes their live session (and
//! only theirs), and `access explain` and `probe` name the route.

use crate::common;

use std::process::Command;

use common::client::{self, MailClient};
use common::dovecot::{Dovecot, dovecot, dovecot_login_only};
use common::logs;
use common::mail::{b64, smtp_reply};
use common::proxy::{self, Options, Proxy};
use common::slapd;

/// The route tables for the second Dovecot: `second.example` and the group `movers` go there
/// for IMAP and SMTP (no POP3).
fn routes(second: &Dovecot, group: &str) -> String {
    let ca = second.ca_file.display().to_string();
    format!(
        r#"
[[route]]
name = "second"
domains = ["second.example"]
[route.imap]
upstream = "localhost:{imap}"
upstream_ca_file = {ca:?}
[route.smtp]
upstream = "localhost:{smtp}"
upstream_ca_file = {ca:?}

[[route]]
name = "movers"
groups = [{group:?}]
[route.imap]
upstream = "localhost:{imap}"
upstream_ca_file = {ca:?}
"#,
        imap = second.imaps.port(),
        smtp = second.submissions.port(),
    )
}

/// A user in slapd (with `groups`), in `upstream` (Dovecot) and in the proxy's vault.
fn add_user(proxy: &Proxy, upstream: &Dovecot, uid: &str, mail: &str, groups: &[&str]) -> String {
    let password = format!("dir-{uid}");
    let upstream_password = format!("up-{uid}-Rt7");
    slapd::slapd().add_user(uid, mail, &password, groups);
    upstream.add_user(mail, &upstream_password);
    proxy.set_upstream(mail, &upstream_password);
    password
}

async fn start(users: &[&str], group: &str) -> Proxy {
    logs::capture();
    Proxy::start(Options {
        profiles: proxy::profile_for(users),
        config_extra: routes(dovecot_login_only(), group),
        ..Options::default()
    })
    .await
}

async fn imap_session(proxy: &Proxy, mail: &str, password: &str) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    let answer = c.tagged("a", &format!("LOGIN {mail} {password}")).await;
    assert!(answer.starts_with("a OK"), "{mail}: {answer}");
    c
}

/// Whether `dovecot` logged an IMAP or submission login of `mail`.
fn logged_in_at(dovecot: &Dovecot, mail: &str) -> bool {
    !dovecot.login_lines(mail).is_empty()
}

async fn audit_line(mail: &str, needle: &str) -> String {
    logs::wait_for_line(&["\"target\":\"audit\"", &format!("\"user\":\"{mail}\""), needle]).await
}

#[tokio::test]
async fn each_domain_and_group_reaches_its_own_upstream() {
    let (home, away, mover) = ("rt-home@example.com", "rt-away@second.example", "rt-mover@example.com");
    let proxy = start(&[home, away, mover], "rt-movers").await;
    let (first, second) = (dovecot(), dovecot_login_only());
    let home_pw = add_user(&proxy, first, "rt-home", home, &[]);
    let away_pw = add_user(&proxy, second, "rt-away", away, &[]);
    let mover_pw = add_user(&proxy, second, "rt-mover", mover, &["rt-movers"]);

    for (mail, password) in [(home, &home_pw), (away, &away_pw), (mover, &mover_pw)] {
        let mut c = imap_session(&proxy, mail, password).await;
        let answer = c.tagged("b", "SELECT INBOX").await;
        assert!(answer.starts_with("b OK"), "the session works upstream: {answer}");
    }
    assert!(logged_in_at(first, home) && !logged_in_at(second, home), "the default route: the protocol table's");
    assert!(logged_in_at(second, away) && !logged_in_at(first, away), "by domain");
    assert!(logged_in_at(second, mover) && !logged_in_at(first, mover), "by group");
    assert!(audit_line(home, "\"route\":\"default\"").await.contains(&first.imaps.port().to_string()));
    assert!(audit_line(away, "\"route\":\"second\"").await.contains(&second.imaps.port().to_string()));
    audit_line(mover, "\"route\":\"movers\"").await;

    // SMTP on the domain's route goes to its own submission server too.
    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO client.example\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{away}\0{away_pw}"))).as_bytes()).await;
    smtp_reply(&mut c, "235").await;
    assert!(second.login_lines(away).iter().any(|l| l.contains("submission-login")), "{}", second.log_tail(20));

    // The route has no POP3 upstream: the domain's users are refused POP3, with the reason.
    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send(format!("USER {away}\r\n").as_bytes()).await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send(format!("PASS {away_pw}\r\n").as_bytes()).await;
    let answer = c.read_line().await;
    assert!(answer.contains("You are not allowed to access this server"), "{answer}");
    audit_line(away, "the user's route has no upstream for the protocol").await;
}

#[tokio::test]
async fn a_reload_that_moves_a_user_closes_only_their_session_and_the_next_login_goes_to_the_new_upstream() {
    let (moving, staying) = ("rt-moving@example.com", "rt-staying@example.com");
    let mut proxy = start(&[moving, staying], "rt-nobody").await;
    let (first, second) = (dovecot(), dovecot_login_only());
    let moving_pw = add_user(&proxy, first, "rt-moving", moving, &[]);
    second.add_user(moving, "up-rt-moving-Rt7");
    let staying_pw = add_user(&proxy, first, "rt-staying", staying, &[]);
    let mut moving_session = imap_session(&proxy, moving, &moving_pw).await;
    let mut staying_session = imap_session(&proxy, staying, &staying_pw).await;
    assert!(logged_in_at(first, moving) && !logged_in_at(second, moving));

    // The admin moves one user to the second provider and reloads.
    let closed = proxy
        .reconfigure(|text| {
            text.replace(
                "domains = [\"second.example\"]",
                &format!("domains = [\"second.example\"]\nusers = [{moving:?}]"),
            )
        })
        .await;
    assert_eq!(closed, 1, "only the moved user's session is closed");
    moving_session.expect_closed().await;
    let line = audit_line(moving, "route changed").await;
    assert!(line.contains("from default") && line.contains("to second"), "{line}");
    let answer = staying_session.tagged("n", "NOOP").await;
    assert!(answer.starts_with("n OK"), "the other user's session lives on: {answer}");

    let mut again = imap_session(&proxy, moving, &moving_pw).await;
    assert!(again.tagged("s", "SELECT INBOX").await.starts_with("s OK"));
    assert!(logged_in_at(second, moving), "the next login goes to the new route's upstream");
}

#[tokio::test]
async fn explain_and_probe_name_the_route() {
    let away = "rt-probe@second.example";
    let proxy = start(&[away], "rt-nobody").await;
    add_user(&proxy, dovecot_login_only(), "rt-probe", away, &[]);
    let postern = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_postern"))
            .arg("--config")
            .arg(&proxy.config_path)
            .args(args)
            .output()
            .expect("run postern");
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{args:?}: {out}{}", String::from_utf8_lossy(&output.stderr));
        out
    };
    let port = dovecot_login_only().imaps.port();
    let explained = postern(&["access", "explain", away, "127.0.0.1"]);
    assert!(explained.contains(&format!("route: second: imap upstream localhost:{port} (password)")), "{explained}");
    let explained = postern(&["access", "explain", away, "127.0.0.1", "--protocol", "pop3"]);
    assert!(explained.contains("route: second: no upstream for pop3"), "{explained}");
    let probed = postern(&["probe", away]);
    assert!(probed.starts_with(&format!("OK: localhost:{port} accepted")), "{probed}");
    assert!(probed.trim_end().ends_with("(route second)"), "{probed}");
}

/// The shipped two-provider example passes `postern check` once the files it names exist.
#[test]
fn the_google_and_m365_example_passes_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (etc, var) = (dir.path().join("etc"), dir.path().join("var"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&var).unwrap();
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/google-and-m365.toml"))
        .expect("read the example");
    let text = example
        .replace("/etc/postern", etc.to_str().unwrap())
        .replace("/var/lib/postern", var.to_str().unwrap())
        .replace("0.0.0.0:10", "127.0.0.1:10");
    assert_ne!(text, example, "the example names /etc/postern and /var/lib/postern");
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    std::fs::write(etc.join("profiles.toml"), proxy::profile_for(&["someone@example.org"])).unwrap();
    let key = common::oauth::token_server().write_google_key(&etc, "https://oauth2.googleapis.com/token");
    std::fs::rename(key, etc.join("google-sa.json")).unwrap();
    common::oauth::write_private(&etc.join("m365-secret"), "not-a-real-secret\n");
    let output = Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("--config")
        .arg(&config)
        .arg("check")
        .output()
        .expect("run postern check");
    let (out, err) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{out}{err}");
    for line in [
        "route m365: domain example.org: imap -> outlook.office365.com:993 (xoauth2)",
        "smtp -> smtp.office365.com:587 (xoauth2)",
        "oauth source google: google-service-account",
        "oauth source m365: microsoft at https://login.microsoftonline.com/example.onmicrosoft.com/oauth2/v2.0/token",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
}

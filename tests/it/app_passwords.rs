//! Per-device app passwords end to end: the real `postern user app-password` commands, a
//! proxy against the shared slapd and Dovecot, and the `password` setting of profiles.

use crate::common;
use crate::install;

use std::process::Output;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::mail::{b64, smtp_reply};
use common::proxy::{self, Options, Proxy, TestUser};
use postern::stores::app_passwords::AppPasswords;

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

/// Runs the real binary against the proxy's config, off the test's runtime so the proxy
/// (and its control socket) keeps answering meanwhile.
async fn postern(proxy: &Proxy, args: &[&str]) -> Output {
    let mut command = std::process::Command::new(install::POSTERN);
    command.arg("--config").arg(&proxy.config_path).args(args).env("POSTERN_LOG", "warn");
    tokio::task::spawn_blocking(move || command.output().expect("run postern")).await.expect("postern ran")
}

/// `postern user app-password add USER --label LABEL`; the printed password, applied to
/// the running proxy.
async fn add(proxy: &Proxy, user: &str, label: &str) -> String {
    let out = postern(proxy, &["user", "app-password", "add", user, "--label", label]).await;
    let stdout = install::expect_code(&out, 0);
    proxy.server().reload_app_passwords().expect("reload app passwords");
    stdout.trim().to_owned()
}

/// A profile named `name` for `users` from 127.0.0.1 accepting `password`.
fn profile(name: &str, users: &[&str], password: &str) -> String {
    let users: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[profile]]\nname = {name:?}\nallow = [\"127.0.0.1/32\"]\nusers = [{}]\npassword = {password:?}\n",
        users.join(", ")
    )
}

async fn imap(proxy: &Proxy) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c
}

/// An IMAP LOGIN's tagged answer.
async fn imap_login(proxy: &Proxy, user: &str, password: &str) -> (MailClient, String) {
    let mut c = imap(proxy).await;
    let answer = c.tagged("l1", &format!("LOGIN {user} \"{password}\"")).await;
    (c, answer)
}

async fn pop3_login(proxy: &Proxy, user: &str, password: &str) -> String {
    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send(format!("USER {user}\r\nPASS {password}\r\n").as_bytes()).await;
    c.read_line().await;
    c.read_line().await
}

async fn smtp_login(proxy: &Proxy, user: &str, password: &str) -> String {
    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    smtp_reply(&mut c, "220").await;
    c.send(b"EHLO device.test\r\n").await;
    smtp_reply(&mut c, "250").await;
    c.send(format!("AUTH PLAIN {}\r\n", b64(format!("\0{user}\0{password}"))).as_bytes()).await;
    c.read_line().await
}

async fn start(profiles: String, lockout: &str) -> Proxy {
    logs::capture();
    Proxy::start(Options { profiles, lockout: lockout.to_owned(), ..Options::default() }).await
}

#[tokio::test]
async fn an_app_password_logs_in_over_imap_pop3_and_smtp_and_list_shows_its_last_use() {
    let mail = "app-all@example.com";
    let proxy = start(profile("devices", &[mail], "app"), "failure_delay_ms = 0").await;
    let user = proxy::add_user(&proxy, "app-all", "app-all-directory-pw");
    let listed = install::expect_code(&postern(&proxy, &["user", "app-password", "list", mail]).await, 0);
    assert!(listed.contains("has no app passwords"), "{listed}");
    let password = add(&proxy, mail, "phone").await;
    assert_eq!(password.len(), 19, "four groups of four: {password}");

    let (mut c, answer) = imap_login(&proxy, mail, &password).await;
    assert!(answer.starts_with("l1 OK"), "{answer}");
    assert!(c.tagged("l2", "SELECT INBOX").await.starts_with("l2 OK"));
    assert!(c.tagged("l3", "LOGOUT").await.starts_with("l3 OK"));
    let audit = logs::wait_for_audit(mail, &["\"outcome\":\"logged-in\"", "\"protocol\":\"imap\""]).await;
    assert!(audit.contains("\"app_password\":\"phone\""), "{audit}");

    // Typed on a phone: upper case, spaces instead of dashes.
    let typed = password.to_uppercase().replace('-', " ");
    assert!(pop3_login(&proxy, mail, &typed).await.starts_with("+OK"));
    assert!(smtp_login(&proxy, mail, &password).await.starts_with("235"));
    logs::wait_for_audit(mail, &["\"outcome\":\"logged-in\"", "\"protocol\":\"pop3\"", "\"app_password\":\"phone\""])
        .await;

    // The profile accepts app passwords only: the directory password is refused, with its reason.
    let (_, answer) = imap_login(&proxy, mail, &user.password).await;
    assert_eq!(answer, format!("l1 {DENIAL}"));
    logs::wait_for_audit(mail, &["login refused", "not an app password of the user"]).await;

    // The last use reaches the file off the login path, soon after.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = install::expect_code(&postern(&proxy, &["user", "app-password", "list", mail]).await, 0);
        let row = listed.lines().find(|l| l.starts_with("phone")).unwrap_or_else(|| panic!("{listed}"));
        if !row.trim_end().ends_with("never") {
            assert!(!listed.contains("argon2") && !listed.contains(&password), "{listed}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "last use never written: {listed}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn each_profile_kind_accepts_only_its_passwords() {
    let users = ["kind-dir@example.com", "kind-app@example.com", "kind-either@example.com"];
    let profiles = [
        profile("directory only", &users[..1], "directory"),
        profile("app only", &users[1..2], "app"),
        profile("either", &users[2..], "either"),
    ]
    .concat();
    let proxy = start(profiles, "failure_delay_ms = 0").await;
    let mut accounts: Vec<(TestUser, String)> = Vec::new();
    for mail in users {
        let uid = mail.split('@').next().unwrap();
        let user = proxy::add_user(&proxy, uid, &format!("{uid}-dir-pw"));
        let app = add(&proxy, mail, "laptop").await;
        accounts.push((user, app));
    }
    let ok = |answer: &str| answer.starts_with("l1 OK");
    let (dir, app, either) = (&accounts[0], &accounts[1], &accounts[2]);

    assert!(ok(&imap_login(&proxy, &dir.0.mail, &dir.0.password).await.1));
    assert_eq!(imap_login(&proxy, &dir.0.mail, &dir.1).await.1, format!("l1 {DENIAL}"));
    logs::wait_for_audit(&dir.0.mail, &["login refused", "app password given; the user's profiles accept only"]).await;

    assert!(ok(&imap_login(&proxy, &app.0.mail, &app.1).await.1));
    assert_eq!(imap_login(&proxy, &app.0.mail, &app.0.password).await.1, format!("l1 {DENIAL}"));
    logs::wait_for_audit(&app.0.mail, &["login refused", "not an app password of the user"]).await;

    assert!(ok(&imap_login(&proxy, &either.0.mail, &either.0.password).await.1));
    assert!(ok(&imap_login(&proxy, &either.0.mail, &either.1).await.1));
    assert_eq!(imap_login(&proxy, &either.0.mail, "neither-of-them").await.1, format!("l1 {DENIAL}"));
    logs::wait_for_audit(&either.0.mail, &["login refused", "\"reason\":\"wrong password\""]).await;

    // `access explain` names the password each profile accepts.
    let explained = install::expect_code(&postern(&proxy, &["access", "explain", &app.0.mail, "127.0.0.1"]).await, 0);
    assert!(explained.contains("password: app passwords only"), "{explained}");
    assert!(
        explained
            .contains("decision: allowed by profile \"app only\" (127.0.0.1/32) with an app password (\"laptop\")"),
        "{explained}"
    );
    assert!(explained.contains("and with the directory password: refused: not an app password"), "{explained}");
    let explained =
        install::expect_code(&postern(&proxy, &["access", "explain", &either.0.mail, "127.0.0.1"]).await, 0);
    assert!(explained.contains("password: directory or app password"), "{explained}");
    proxy.stop().await;
}

#[tokio::test]
async fn revoking_one_app_password_closes_that_devices_live_session_only() {
    let mail = "app-revoke@example.com";
    let proxy = start(profile("either", &[mail], "either"), "failure_delay_ms = 0").await;
    let user = proxy::add_user(&proxy, "app-revoke", "app-revoke-dir-pw");
    let phone = add(&proxy, mail, "phone").await;
    let laptop = add(&proxy, mail, "laptop").await;
    let tablet = add(&proxy, mail, "tablet").await;
    proxy.serve_control();

    let mut sessions = Vec::new();
    for password in [&phone, &laptop, &tablet, &user.password] {
        let (c, answer) = imap_login(&proxy, mail, password).await;
        assert!(answer.starts_with("l1 OK"), "{answer}");
        sessions.push(c);
    }
    let [on_phone, on_laptop, on_tablet, on_directory] = &mut sessions[..] else { unreachable!() };
    assert!(on_phone.tagged("n1", "NOOP").await.starts_with("n1 OK"));

    // Through the control socket: closed at once, with who asked.
    let out = postern(&proxy, &["user", "app-password", "revoke", mail, "Phone"]).await;
    let stdout = install::expect_code(&out, 0);
    assert!(stdout.contains("closed 1 live session(s)"), "{:?}", install::text(&out));
    on_phone.expect_closed().await;
    for (tag, other) in [("n2", &mut *on_laptop), ("n3", &mut *on_tablet), ("n4", &mut *on_directory)] {
        assert!(other.tagged(tag, "NOOP").await.starts_with(&format!("{tag} OK")), "other sessions stay");
    }
    let closed = logs::wait_for_audit(mail, &["\"app_password\":\"phone\"", "\"outcome\":\"logged-in\""]).await;
    assert!(closed.contains("closed: the app password \\\"phone\\\" was revoked by uid="), "{closed}");
    logs::wait_for_line(&["app password revoked", mail, "\"sessions_closed\":1"]).await;
    assert_eq!(imap_login(&proxy, mail, &phone).await.1, format!("l1 {DENIAL}"), "refused from now on");
    let out = postern(&proxy, &["user", "app-password", "revoke", mail, "phone"]).await;
    assert!(install::text(&out).1.contains("has no app password labelled"), "{:?}", install::text(&out));
    install::expect_code(&out, 1);

    // A change to the file the control socket never heard of: the daemon's watch closes it.
    let state_dir = proxy.state_dir();
    AppPasswords::update(&state_dir, |p| p.revoke(mail, "laptop")).expect("revoke in the file");
    on_laptop.expect_closed().await;
    logs::wait_for_audit(
        mail,
        &["\"app_password\":\"laptop\"", "closed: the app password \\\"laptop\\\" was revoked\""],
    )
    .await;

    // A profile that stops accepting app passwords closes the app password sessions on the re-check.
    proxy.set_profiles(&profile("either", &[mail], "directory"));
    postern::access::decision::revalidate(proxy.server()).await;
    on_tablet.expect_closed().await;
    let closed = logs::wait_for_audit(mail, &["\"app_password\":\"tablet\"", "\"outcome\":\"logged-in\""]).await;
    assert!(closed.contains("app password given; the user's profiles accept only the directory password"), "{closed}");
    assert!(on_directory.tagged("n5", "NOOP").await.starts_with("n5 OK"), "the directory password session stays");

    let listed = install::expect_code(&postern(&proxy, &["user", "app-password", "list", mail]).await, 0);
    assert!(listed.contains("tablet") && !listed.contains("phone") && !listed.contains("laptop"), "{listed}");
    proxy.stop().await;
}

#[tokio::test]
async fn wrong_app_passwords_count_toward_the_lockout() {
    let mail = "app-lock@example.com";
    let lockout = "failure_delay_ms = 0\nmax_failures = 3\nwindow_secs = 600\nlock_secs = 600";
    let proxy = start(profile("devices", &[mail], "app"), lockout).await;
    proxy::add_user(&proxy, "app-lock", "app-lock-dir-pw");
    let password = add(&proxy, mail, "tablet").await;
    for guess in ["aaaa-bbbb-cccc-dddd", "eeee-ffff-gggg-hhhh", "iiii-jjjj-kkkk-mmmm"] {
        assert_eq!(imap_login(&proxy, mail, guess).await.1, format!("l1 {DENIAL}"));
    }
    assert_eq!(imap_login(&proxy, mail, &password).await.1, format!("l1 {DENIAL}"), "locked: even the right one");
    logs::wait_for_audit(mail, &["login refused", "locked out after repeated password failures"]).await;
    let wrong = logs::all()
        .lines()
        .filter(|l| l.contains("login refused") && l.contains(mail) && l.contains("not an app password of the user"))
        .count();
    assert_eq!(wrong, 3);
    proxy.stop().await;
}

#[test]
fn a_revocation_without_the_daemon_holds_from_its_next_start_and_no_app_password_is_logged() {
    use install::{Daemon, Install, expect_code, text};
    use std::os::unix::fs::PermissionsExt;

    let mail = "app-offline@example.com";
    let profiles = profile("devices", &[mail], "either");
    let i = Install::new(&profiles, "", "[lockout]\nfailure_delay_ms = 0\n");
    i.add_user(mail, "offline-dir-pw");
    let add = i.run(&["user", "app-password", "add", mail, "--label", "car"], "");
    let password = expect_code(&add, 0).trim().to_owned();
    let file = i.path("state/app-passwords.toml");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(stored.contains("$argon2id$") && stored.contains("[users.\"app-offline@example.com\".car]"), "{stored}");
    let mut outputs = vec![text(&add).1];
    let checked = expect_code(&i.run(&["check"], ""), 0);
    assert!(checked.contains("app passwords:"), "{checked}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = i.run(&["check"], "");
    expect_code(&refused, 1);
    assert!(text(&refused).1.contains("app-passwords.toml"), "{:?}", text(&refused));
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let login = |daemon: &Daemon, password: &str| {
        runtime.block_on(async {
            let mut c = client::connect_tls(daemon.imaps, &i.ca_file).await;
            c.read_line().await;
            c.tagged("o1", &format!("LOGIN {mail} {password}")).await
        })
    };
    let daemon = Daemon::start_logging(&i, "trace");
    assert!(login(&daemon, &password).starts_with("o1 OK"));
    assert_eq!(login(&daemon, "zzzz-zzzz-zzzz-zzzz"), format!("o1 {DENIAL}"));
    daemon.wait_for_log(&["\"app_password\":\"car\"", "logged-in"]);
    outputs.push(daemon.log());
    drop(daemon);

    let revoke = i.run(&["user", "app-password", "revoke", mail, "car"], "");
    expect_code(&revoke, 0);
    assert!(
        text(&revoke).1.contains("no daemon answers") && text(&revoke).1.contains("next start"),
        "{:?}",
        text(&revoke)
    );
    let daemon = Daemon::start_logging(&i, "trace");
    assert_eq!(login(&daemon, &password), format!("o1 {DENIAL}"));
    daemon.wait_for_log(&["login refused", "wrong password"]);
    outputs.push(daemon.log());
    drop(daemon);

    let audit = std::fs::read_to_string(i.path("audit.jsonl")).unwrap();
    assert!(audit.contains("\"event\":\"app password added\"") && audit.contains("\"event\":\"app password revoked\""));
    assert!(audit.contains("\"operator\""), "who did it: {audit}");
    outputs.push(audit);
    outputs.push(std::fs::read_to_string(&file).unwrap());
    let canonical = password.replace('-', "");
    let forms = [password.clone(), canonical.clone(), b64(format!("\0{mail}\0{password}")), b64(&password)];
    for text in &outputs {
        for form in &forms {
            assert!(!text.contains(form.as_str()), "the app password appeared: {form:?} in\n{text}");
        }
    }
}

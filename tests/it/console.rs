//! The admin console in a real browser: headless Chromium driven by Selenium logs in as a
//! directory admin, edits a profile, sees the diff, saves, and the next IMAP login from the
//! newly allowed address gets through; a broken profile is refused with the error shown;
//! posts without the CSRF token and a directory user outside the admin groups are refused.

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use common::client;
use common::logs;
use common::proxy::{self, Options, Proxy};
use common::slapd;

const NEW_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Fails, naming what to install, when the browser, its driver or Selenium is missing.
fn require_browser() {
    common::require_binary("chromium", "chromium");
    common::require_binary("chromedriver", "chromium-driver");
    let selenium = Command::new("python3").args(["-c", "import selenium"]).status().expect("run python3");
    assert!(selenium.success(), "Selenium is missing: python3 -m pip install selenium (scripts/test installs it)");
}

async fn imap_login_from(proxy: &Proxy, ip: IpAddr, user: &proxy::TestUser) -> String {
    let mut c = client::connect_tls_from(ip, proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.tagged("a", &format!("LOGIN {} {}", user.mail, user.password)).await
}

#[tokio::test]
async fn an_admin_edits_a_profile_in_a_browser_and_the_newly_allowed_address_logs_in() {
    require_browser();
    logs::capture();
    let profiles = "# Edited by hand and in the console.\n[[profile]]\nname = \"office\"\nallow = [\"127.0.0.1/32\"]\nusers = [\"con-user@example.com\"]\n";
    let console =
        "[console]\nlisten = \"127.0.0.1:0\"\nadmin_groups = [\"postern-admins\"]\nallow = [\"127.0.0.0/8\"]\n";
    let proxy =
        Proxy::start(Options { profiles: profiles.to_owned(), config_extra: console.to_owned(), ..Options::default() })
            .await;
    let user = proxy::add_user(&proxy, "con-user", "user-Pw-1");
    slapd::slapd().add_user("con-admin", "con-admin@example.com", "admin-Pw-1", &["postern-admins"]);
    let answer = imap_login_from(&proxy, NEW_ADDRESS, &user).await;
    assert!(answer.contains("You are not allowed"), "not allowed from {NEW_ADDRESS} before the edit: {answer}");

    let shots = match std::env::var_os("POSTERN_CONSOLE_SCREENSHOTS") {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("postern-console-shots-{}", std::process::id())),
    };
    std::fs::create_dir_all(&shots).expect("screenshot folder");
    let base = format!("https://localhost:{}", proxy.console.expect("the console listens").port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/browser/console.py");
    let run = tokio::process::Command::new("python3")
        .args([script, &base, "con-admin@example.com", "admin-Pw-1", &user.mail, &user.password])
        .arg(NEW_ADDRESS.to_string())
        .arg(&shots)
        .arg(proxy.config_path.with_file_name("profiles.toml"))
        .output()
        .await
        .expect("run the browser test");
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    eprintln!("{out}{err}");
    assert!(run.status.success() && out.trim_end().ends_with("OK"), "the browser test failed:\n{out}\n{err}");

    let answer = imap_login_from(&proxy, NEW_ADDRESS, &user).await;
    assert!(answer.starts_with("a OK"), "allowed from {NEW_ADDRESS} after the edit: {answer}");
    let saved = std::fs::read_to_string(proxy.config_path.with_file_name("profiles.toml")).unwrap();
    assert!(saved.starts_with("# Edited by hand and in the console."), "comments kept: {saved}");
    assert!(!saved.contains("not-an-address"), "the broken edit was not written: {saved}");
    let line = logs::wait_for_line(&["console_profiles_saved", "con-admin@example.com"]).await;
    assert!(line.contains("profile office"), "{line}");
    logs::wait_for_line(&["console_login_refused", "con-user@example.com", "not in a console admin group"]).await;
    logs::wait_for_line(&["console_csrf_refused", "con-admin@example.com"]).await;
    logs::wait_for_line(&["console_app_password_added", "con-user@example.com", "label phone"]).await;
    logs::wait_for_line(&["console_reveal", "con-admin@example.com", "con-user@example.com"]).await;
    assert!(out.contains(&format!("revealed {} characters", user.upstream_password.len())), "{out}");
}

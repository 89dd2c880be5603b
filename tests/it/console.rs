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

/// `curl` to the console at `path` as `localhost`, keeping cookies in `jar`; `form` is
/// posted when given. The response body.
async fn console_curl(proxy: &Proxy, jar: &std::path::Path, path: &str, form: Option<&[(&str, &str)]>) -> String {
    common::require_binary("curl", "curl");
    let port = proxy.console.expect("the console listens").port();
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["--cacert", &proxy.ca_file.display().to_string()])
        .args(["-b", &jar.display().to_string(), "-c", &jar.display().to_string()]);
    for (name, value) in form.unwrap_or_default() {
        command.args(["--data-urlencode", &format!("{name}={value}")]);
    }
    let out = command.arg(format!("https://localhost:{port}{path}")).output().await.expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn a_directory_password_set_in_the_console_keeps_the_config_of_the_last_reload() {
    // The console keeps the config the daemon started with and reloads the daemon from it
    // after setting a directory password: whatever a reload (SIGHUP) put in force since —
    // here a new profiles file — silently goes back to the start.
    let user = "rev-user@example.com";
    let profiles = proxy::profile_for(&[user]);
    let console =
        "[console]\nlisten = \"127.0.0.1:0\"\nadmin_groups = [\"postern-admins\"]\nallow = [\"127.0.0.0/8\"]\n";
    let mut proxy = Proxy::start(Options {
        directory: proxy::Dir::File,
        profiles,
        config_extra: console.to_owned(),
        ..Options::default()
    })
    .await;
    let users = proxy.config_path.with_file_name("users.toml");
    let secret = |s: &str| postern::secret::Secret::new(s);
    postern::stores::directory::file::set_password(&users, "rev-admin@example.com", &secret("admin-Pw-1")).unwrap();
    postern::stores::directory::file::set_groups(&users, "rev-admin@example.com", &["postern-admins".to_owned()])
        .unwrap();
    postern::stores::directory::file::set_password(&users, "rev-other@example.com", &secret("other-Pw-1")).unwrap();
    proxy.set_file_password(user, "user-Pw-1").await;
    proxy.dovecot.add_user(user, "up-rev-user-Zq9x");
    proxy.set_upstream(user, "up-rev-user-Zq9x");
    let test_user = proxy::TestUser {
        mail: user.to_owned(),
        password: "user-Pw-1".to_owned(),
        upstream_password: "up-rev-user-Zq9x".to_owned(),
    };

    // The operator points [access] profiles at a new file allowing 127.0.0.2 and reloads.
    let widened = format!(
        "[[profile]]\nname = \"wider\"\nallow = [\"127.0.0.1/32\", \"{NEW_ADDRESS}/32\"]\nusers = [\"{user}\"]\n"
    );
    std::fs::write(proxy.config_path.with_file_name("profiles-wider.toml"), widened).unwrap();
    proxy.reconfigure(|text| text.replace("profiles = \"profiles.toml\"", "profiles = \"profiles-wider.toml\"")).await;
    let answer = imap_login_from(&proxy, NEW_ADDRESS, &test_user).await;
    assert!(answer.starts_with("a OK"), "allowed from {NEW_ADDRESS} after the reload: {answer}");

    // An admin sets another user's directory password in the console.
    let jar = tempfile::NamedTempFile::new().unwrap();
    let login = [("user", "rev-admin@example.com"), ("password", "admin-Pw-1")];
    console_curl(&proxy, jar.path(), "/login", Some(&login)).await;
    let page = console_curl(&proxy, jar.path(), "/users", None).await;
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("a CSRF token on the users page: {page}"))
        .to_owned();
    let action = [
        ("csrf", csrf.as_str()),
        ("op", "directory_password"),
        ("user", "rev-other@example.com"),
        ("secret", "other-Pw-2"),
    ];
    let done = console_curl(&proxy, jar.path(), "/users/action", Some(&action)).await;
    assert!(done.contains("Set the directory password of rev-other@example.com"), "{done}");

    let answer = imap_login_from(&proxy, NEW_ADDRESS, &test_user).await;
    assert!(
        answer.starts_with("a OK"),
        "the reloaded profiles file is still in force after the console's directory password change: {answer}"
    );
    proxy.stop().await;
}

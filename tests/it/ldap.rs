//! The LDAP directory against a real slapd: search and template modes, plain, StartTLS
//! and LDAPS, groups, wrong and odd passwords, filter injection, outages.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::slapd::{Slapd, slapd};
use postern::secret::Secret;
use postern::stores::directory::ldap::{LdapConfig, LdapDirectory};
use postern::stores::directory::{Directory, DirectoryConfig, DirectoryError};

/// Service-account search mode against `url`, plus `extra` TOML lines.
fn search_config(s: &Slapd, url: &str, extra: &str) -> LdapConfig {
    let text = format!(
        "url = {url:?}\nbase_dn = {:?}\nbind_dn = {:?}\nbind_password = {:?}\ntimeout_secs = 3\n{extra}",
        s.people_dn, s.service_dn, s.service_password
    );
    toml::from_str(&text).unwrap()
}

/// Template mode without a service account.
fn template_config(s: &Slapd, extra: &str) -> LdapConfig {
    let text =
        format!("url = {:?}\nbind_dn_template = \"uid={{user}},{}\"\ntimeout_secs = 3\n{extra}", s.url, s.people_dn);
    toml::from_str(&text).unwrap()
}

async fn open(config: &LdapConfig) -> LdapDirectory {
    LdapDirectory::open(config, Path::new("/")).await.unwrap()
}

fn ca_line(s: &Slapd) -> String {
    format!("ca_file = {:?}", s.ca_file.display().to_string())
}

/// Looks `user` up and verifies `password`, returning the groups.
async fn login(dir: &LdapDirectory, user: &str, password: &str) -> Result<Vec<String>, DirectoryError> {
    let entry = dir.lookup(user).await?;
    dir.verify(&entry, &Secret::new(password)).await
}

fn assert_member(groups: &[String], s: &Slapd, group: &str) {
    assert!(groups.iter().any(|g| g == group), "{group} missing from {groups:?}");
    let dn = s.group_dn(group).to_lowercase();
    assert!(groups.contains(&dn), "{dn} missing from {groups:?}");
}

#[tokio::test]
async fn search_mode_over_plain_ldap() {
    let s = slapd();
    s.add_user("plain", "plain@example.com", "plain-pw", &["mail-users", "staff"]);
    let dir = open(&search_config(s, &s.url, "")).await;

    let entry = dir.lookup("plain@example.com").await.unwrap();
    assert_eq!(entry.user, "plain@example.com");
    assert_eq!(entry.dn.as_deref(), Some(s.user_dn("plain").as_str()));
    let before = entry.groups.clone().expect("groups known before the password check");
    assert_member(&before, s, "mail-users");
    assert_member(&before, s, "staff");

    let groups = dir.verify(&entry, &Secret::new("plain-pw")).await.unwrap();
    assert_eq!(groups, before);
    assert!(matches!(dir.verify(&entry, &Secret::new("wrong")).await, Err(DirectoryError::WrongPassword)));
    // The backend itself refuses an empty password: it would be an anonymous bind.
    assert!(matches!(dir.verify(&entry, &Secret::new("")).await, Err(DirectoryError::WrongPassword)));
    assert!(matches!(dir.lookup("nobody@example.com").await, Err(DirectoryError::UnknownUser)));
}

#[tokio::test]
async fn search_mode_over_starttls() {
    let s = slapd();
    s.add_user("starttls", "starttls@example.com", "st-pw", &["mail-users"]);
    let dir = open(&search_config(s, &s.url, &format!("starttls = true\n{}", ca_line(s)))).await;
    let groups = login(&dir, "starttls@example.com", "st-pw").await.unwrap();
    assert_member(&groups, s, "mail-users");
    assert!(matches!(login(&dir, "starttls@example.com", "nope").await, Err(DirectoryError::WrongPassword)));
}

#[tokio::test]
async fn search_mode_over_ldaps() {
    let s = slapd();
    s.add_user("ldaps", "ldaps@example.com", "ls-pw", &["mail-users"]);
    let dir = open(&search_config(s, &s.ldaps_url, &ca_line(s))).await;
    let groups = login(&dir, "ldaps@example.com", "ls-pw").await.unwrap();
    assert_member(&groups, s, "mail-users");
    assert!(matches!(login(&dir, "ldaps@example.com", "nope").await, Err(DirectoryError::WrongPassword)));
}

#[tokio::test]
async fn template_mode_reads_groups_after_the_bind() {
    let s = slapd();
    s.add_user("tmpl@example.com", "tmpl@example.com", "tmpl-pw", &["mail-users"]);
    let dir = open(&template_config(s, "")).await;

    let entry = dir.lookup("tmpl@example.com").await.unwrap();
    assert_eq!(entry.dn.as_deref(), Some(s.user_dn("tmpl@example.com").as_str()));
    assert_eq!(entry.groups, None);
    let groups = dir.verify(&entry, &Secret::new("tmpl-pw")).await.unwrap();
    assert_member(&groups, s, "mail-users");
    assert!(matches!(dir.verify(&entry, &Secret::new("bad")).await, Err(DirectoryError::WrongPassword)));

    // Without a service account an unknown user only shows at the bind.
    let ghost = dir.lookup("ghost@example.com").await.unwrap();
    assert!(matches!(dir.verify(&ghost, &Secret::new("x")).await, Err(DirectoryError::WrongPassword)));
}

#[tokio::test]
async fn template_mode_with_service_account_knows_unknown_users() {
    let s = slapd();
    s.add_user("tsvc@example.com", "tsvc@example.com", "tsvc-pw", &["mail-users"]);
    let extra = format!("bind_dn = {:?}\nbind_password = {:?}", s.service_dn, s.service_password);
    let dir = open(&template_config(s, &extra)).await;
    let entry = dir.lookup("tsvc@example.com").await.unwrap();
    assert_member(entry.groups.as_deref().unwrap(), s, "mail-users");
    assert_member(&dir.verify(&entry, &Secret::new("tsvc-pw")).await.unwrap(), s, "mail-users");
    assert!(matches!(dir.lookup("ghost2@example.com").await, Err(DirectoryError::UnknownUser)));
}

#[tokio::test]
async fn groups_by_search_without_member_of() {
    let s = slapd();
    s.add_user("gsearch", "gsearch@example.com", "gs-pw", &["searched-group"]);
    let extra = format!("group_attribute = \"\"\ngroup_base_dn = {:?}", s.groups_dn);
    let dir = open(&search_config(s, &s.url, &extra)).await;
    let groups = login(&dir, "gsearch@example.com", "gs-pw").await.unwrap();
    assert_member(&groups, s, "searched-group");

    // Template mode runs the group search as the user.
    s.add_user("gs-tmpl@example.com", "gs-tmpl@example.com", "gt-pw", &["searched-group"]);
    let dir = open(&template_config(s, &extra)).await;
    let groups = login(&dir, "gs-tmpl@example.com", "gt-pw").await.unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    assert_member(&groups, s, "searched-group");
}

#[tokio::test]
async fn filter_metacharacters_in_user_names_match_nothing() {
    let s = slapd();
    s.add_user("inject", "inject-unique@example.com", "inj-pw", &["mail-users"]);
    let dir = open(&search_config(s, &s.url, "")).await;
    // Unescaped, this prefix wildcard would match exactly the one user above.
    for user in ["inject-uniq*", "*", "*)(uid=*", "*)(|(mail=*", "inject-unique@example.com)(mail=*", "\\2a", "a\0b"] {
        assert!(matches!(dir.lookup(user).await, Err(DirectoryError::UnknownUser)), "{user:?} was found");
    }
    assert!(dir.lookup("inject-unique@example.com").await.is_ok());
}

#[tokio::test]
async fn passwords_with_quotes_backslashes_spaces_and_utf8() {
    let s = slapd();
    let password = "a \"quoted\" back\\slash ünïcødé 🔑 ";
    s.add_user("oddpw", "oddpw@example.com", password, &["mail-users"]);
    let dir = open(&search_config(s, &s.url, "")).await;
    assert_member(&login(&dir, "oddpw@example.com", password).await.unwrap(), s, "mail-users");
    assert!(matches!(login(&dir, "oddpw@example.com", password.trim_end()).await, Err(DirectoryError::WrongPassword)));
}

#[tokio::test]
async fn concurrent_logins_share_connections() {
    let s = slapd();
    s.add_user("busy", "busy@example.com", "busy-pw", &["mail-users"]);
    let dir = std::sync::Arc::new(open(&search_config(s, &s.url, "pool_size = 2")).await);
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let dir = dir.clone();
            tokio::spawn(async move {
                let password = if i % 3 == 0 { "wrong" } else { "busy-pw" };
                (i, login(&dir, "busy@example.com", password).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        if i % 3 == 0 {
            assert!(matches!(result, Err(DirectoryError::WrongPassword)), "{i}: {result:?}");
        } else {
            assert!(result.is_ok(), "{i}: {result:?}");
        }
    }
}

/// A refused connection is reported at once, not after the timeout: with an hour's timeout,
/// the answer still comes within the test's deadline.
#[tokio::test]
async fn unreachable_server_is_unavailable_without_waiting_for_the_timeout() {
    let s = slapd();
    let closed = common::closed_port();
    let url = format!("ldap://127.0.0.1:{}", closed.port);
    let mut config = search_config(s, &url, "");
    config.timeout_secs = 3600;
    let dir = open(&config).await;
    let lookup = tokio::time::timeout(Duration::from_secs(30), dir.lookup("plain@example.com"))
        .await
        .expect("a refused connection does not wait for the hour's timeout");
    assert!(matches!(lookup, Err(DirectoryError::Unavailable(_))), "{lookup:?}");

    let mut config = with_url(template_config(s, ""), &url);
    config.timeout_secs = 3600;
    let dir = open(&config).await;
    let entry = dir.lookup("x@example.com").await.unwrap();
    let verify = tokio::time::timeout(Duration::from_secs(30), dir.verify(&entry, &Secret::new("never-shown-pw")))
        .await
        .expect("a refused connection does not wait for the hour's timeout");
    match verify {
        Err(DirectoryError::Unavailable(message)) => assert!(!message.contains("never-shown-pw")),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// The configured timeout ends a lookup on a server that accepts but never answers. Time is
/// tokio's paused clock, which jumps ahead whenever the test only waits, so the elapsed time
/// seen is the timeout the directory applied, however loaded the machine is.
#[tokio::test(start_paused = true)]
async fn silent_server_times_out_after_the_configured_timeout() {
    let s = slapd();
    // Accepts connections (the kernel completes the handshake) but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ldap://{}", listener.local_addr().unwrap());
    let mut config = search_config(s, &url, "");
    config.timeout_secs = 7;
    let dir = open(&config).await;
    let started = tokio::time::Instant::now();
    let lookup = dir.lookup("plain@example.com").await;
    let waited = started.elapsed();
    assert!(matches!(lookup, Err(DirectoryError::Unavailable(_))), "{lookup:?}");
    assert!(
        waited >= Duration::from_secs(7) && waited < Duration::from_secs(14),
        "gave up after {waited:?} of the directory's clock; the timeout is 7 s"
    );
    drop(listener);
}

#[tokio::test]
async fn untrusted_certificate_is_unavailable() {
    let s = slapd();
    s.add_user("untrusted", "untrusted@example.com", "ut-pw", &[]);
    let dir = open(&search_config(s, &s.ldaps_url, "")).await;
    match dir.lookup("untrusted@example.com").await {
        Err(DirectoryError::Unavailable(message)) => assert!(message.contains("certificate"), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    let dir = open(&with_url(template_config(s, ""), &s.ldaps_url)).await;
    let entry = dir.lookup("untrusted@example.com").await.unwrap();
    assert!(matches!(dir.verify(&entry, &Secret::new("ut-pw")).await, Err(DirectoryError::Unavailable(_))));
}

#[tokio::test]
async fn wrong_service_password_is_unavailable() {
    let s = slapd();
    let mut config = search_config(s, &s.url, "");
    config.bind_password = Some(Secret::new("not-the-service-pw"));
    let dir = open(&config).await;
    match dir.lookup("plain@example.com").await {
        Err(DirectoryError::Unavailable(message)) => assert!(!message.contains("not-the-service-pw")),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn opens_through_the_directory_config() {
    let s = slapd();
    s.add_user("viacfg", "viacfg@example.com", "vc-pw", &["mail-users"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("service.pw"), format!("{}\n", s.service_password)).unwrap();
    std::fs::set_permissions(dir.path().join("service.pw"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    std::fs::copy(&s.ca_file, dir.path().join("ca.pem")).unwrap();
    let text = format!(
        "kind = \"ldap\"\nurl = {:?}\nca_file = \"ca.pem\"\nbase_dn = {:?}\nbind_dn = {:?}\nbind_password_file = \"service.pw\"",
        s.ldaps_url, s.base_dn, s.service_dn
    );
    let config: DirectoryConfig = toml::from_str(&text).unwrap();
    let directory = Directory::open(&config, dir.path()).await.unwrap();
    let entry = directory.lookup("viacfg@example.com").await.unwrap();
    let groups = directory.verify(&entry, &Secret::new("vc-pw")).await.unwrap();
    assert_member(&groups, s, "mail-users");
}

#[tokio::test]
async fn bad_config_fails_to_open() {
    let s = slapd();
    let mut config = search_config(s, &s.ldaps_url, "starttls = true");
    assert!(matches!(LdapDirectory::open(&config, Path::new("/")).await, Err(DirectoryError::Config(_))));
    config.starttls = false;
    config.ca_file = Some("/nonexistent/ca.pem".into());
    assert!(matches!(LdapDirectory::open(&config, Path::new("/")).await, Err(DirectoryError::Config(_))));
}

/// `config` pointed at another server.
fn with_url(mut config: LdapConfig, url: &str) -> LdapConfig {
    config.url = url.to_owned();
    config
}

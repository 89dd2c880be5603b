//! The LDAP directory against a real slapd: search and template modes, plain, StartTLS
//! and LDAPS, groups and nested groups, wrong and odd passwords, filter injection, outages;
//! and against a slapd with the password policy overlay: accounts locked, expired or to be
//! changed in the directory, each refused for its own reason and never counted toward
//! Postern's lockout.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::client::{self, MailClient};
use common::logs;
use common::proxy::{Dir, Options, Proxy};
use common::slapd::{PPOLICY_MAX_FAILURES, Slapd, slapd, slapd_with_ppolicy};
use common::{dovecot, proxy};
use postern::secret::Secret;
use postern::stores::directory::ldap::{LdapConfig, LdapDirectory};
use postern::stores::directory::{AccountState, Directory, DirectoryConfig, DirectoryError};

/// What every refused IMAP login reads, whatever the reason.
const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";
/// `pwdAccountLockedTime` for "locked until an administrator unlocks".
const LOCKED_FOR_GOOD: &str = "000001010000Z";
/// A `pwdChangedTime` far older than the policy's maximum age.
const LONG_AGO: &str = "20000101000000Z";

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

/// Person `uid` in the ppolicy slapd, put into a state by setting `attr` to `value`.
fn policy_user(uid: &str, password: &str, state: Option<(&str, &str)>) -> String {
    let s = slapd_with_ppolicy();
    let mail = format!("{uid}@example.com");
    s.add_user(uid, &mail, password, &[]);
    if let Some((attr, value)) = state {
        s.set_policy_attribute(uid, attr, value);
    }
    mail
}

fn is_state(result: &Result<Vec<String>, DirectoryError>, state: AccountState) -> bool {
    matches!(result, Err(DirectoryError::Account(s)) if *s == state)
}

#[tokio::test]
async fn password_policy_states_are_account_states_not_wrong_passwords() {
    let s = slapd_with_ppolicy();
    let locked = policy_user("pp-locked", "pp-pw", Some(("pwdAccountLockedTime", LOCKED_FOR_GOOD)));
    let expired = policy_user("pp-expired", "pp-pw", Some(("pwdChangedTime", LONG_AGO)));
    let reset = policy_user("pp-reset", "pp-pw", Some(("pwdReset", "TRUE")));
    let fine = policy_user("pp-fine", "pp-pw", None);
    let dir = open(&search_config(s, &s.url, "")).await;

    // A lock refuses every password, right or wrong.
    for password in ["pp-pw", "wrong"] {
        let result = login(&dir, &locked, password).await;
        assert!(is_state(&result, AccountState::Locked), "{password}: {result:?}");
    }
    // Expiry and a pending change show only with the right password (the bind of a reset
    // password even succeeds, restricted to changing it).
    let result = login(&dir, &expired, "pp-pw").await;
    assert!(is_state(&result, AccountState::PasswordExpired), "{result:?}");
    let result = login(&dir, &reset, "pp-pw").await;
    assert!(is_state(&result, AccountState::PasswordMustChange), "{result:?}");
    for user in [&expired, &reset, &fine] {
        let result = login(&dir, user, "wrong").await;
        assert!(matches!(result, Err(DirectoryError::WrongPassword)), "{user}: {result:?}");
    }
    login(&dir, &fine, "pp-pw").await.expect("an account in good standing logs in");
}

#[tokio::test]
async fn the_directory_s_own_lockout_is_reported_as_locked_in_the_directory() {
    let s = slapd_with_ppolicy();
    let user = policy_user("pp-guessed", "pp-pw", None);
    let dir = open(&search_config(s, &s.url, "")).await;
    // Every guess up to the directory's limit is a wrong password (and so counts in Postern
    // too); the last one locks the account there, and from then on every password is
    // refused as locked.
    for i in 1..=PPOLICY_MAX_FAILURES {
        let result = login(&dir, &user, "wrong").await;
        assert!(matches!(result, Err(DirectoryError::WrongPassword)), "guess {i}: {result:?}");
    }
    for password in ["wrong", "pp-pw"] {
        let result = login(&dir, &user, password).await;
        assert!(is_state(&result, AccountState::Locked), "{password}: {result:?}");
    }
}

async fn imap_login(proxy: &Proxy, tag: &str, user: &str, password: &str) -> String {
    let mut c: MailClient = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.tagged(tag, &format!("LOGIN {user} {password}")).await
}

#[tokio::test]
async fn directory_account_states_are_audited_apart_and_never_lock_in_postern() {
    let locked = policy_user("px-locked", "px-pw", Some(("pwdAccountLockedTime", LOCKED_FOR_GOOD)));
    let expired = policy_user("px-expired", "px-pw", Some(("pwdChangedTime", LONG_AGO)));
    let reset = policy_user("px-reset", "px-pw", Some(("pwdReset", "TRUE")));
    let guesser = policy_user("px-guesser", "px-pw", None);
    let users = [locked.as_str(), expired.as_str(), reset.as_str(), guesser.as_str()];
    // One wrong password would lock a user in Postern.
    let lockout = "failure_delay_ms = 0\nmax_failures = 1\nwindow_secs = 600\nlock_secs = 600".to_owned();
    let proxy = Proxy::start(Options {
        directory: Dir::LdapPpolicy,
        profiles: proxy::profile_for(&users),
        lockout,
        ..Options::default()
    })
    .await;

    for (user, reason) in [
        (&locked, "account locked in the directory"),
        (&expired, "directory password expired"),
        (&reset, "directory password must be changed"),
    ] {
        for attempt in 0..2 {
            let tag = format!("a{attempt}");
            assert_eq!(imap_login(&proxy, &tag, user, "px-pw").await, format!("{tag} {DENIAL}"), "{user}");
        }
        let line = logs::wait_for_audit(user, &["login refused", &format!("\"reason\":\"{reason}\"")]).await;
        assert!(line.contains("\"outcome\":\"denied\""), "{line}");
    }
    let locked_in_postern = proxy.server().counters.locked_users().await.expect("memory store");
    assert!(locked_in_postern.is_empty(), "directory states counted as wrong passwords: {locked_in_postern:?}");

    // The same proxy does lock after one wrong password.
    assert_eq!(imap_login(&proxy, "w1", &guesser, "wrong").await, format!("w1 {DENIAL}"));
    logs::wait_for_audit(&guesser, &["\"reason\":\"wrong password\""]).await;
    let locked_in_postern = proxy.server().counters.locked_users().await.expect("memory store");
    assert_eq!(locked_in_postern.iter().map(|l| l.user.as_str()).collect::<Vec<_>>(), [guesser.as_str()]);
    proxy.stop().await;
}

#[tokio::test]
async fn nested_groups_are_followed_recursively_and_cycles_end() {
    let s = slapd();
    // nest-outer ∋ nest-inner ∋ user; nest-loop-a ∋ nest-loop-b ∋ nest-loop-a, and the
    // user is in nest-loop-b.
    // The uid is the mail address, so the bind-DN template finds the user too.
    s.add_user("nested@example.com", "nested@example.com", "nest-pw", &["nest-inner", "nest-loop-b"]);
    s.add_member("nest-outer", &s.group_dn("nest-inner"));
    s.add_member("nest-loop-a", &s.group_dn("nest-loop-b"));
    s.add_member("nest-loop-b", &s.group_dn("nest-loop-a"));

    let flat = open(&search_config(s, &s.url, "")).await;
    let groups = login(&flat, "nested@example.com", "nest-pw").await.unwrap();
    assert_member(&groups, s, "nest-inner");
    assert!(!groups.iter().any(|g| g == "nest-outer"), "nesting off, yet {groups:?}");

    let base = format!("group_base_dn = {:?}\nnested_groups = \"recursive\"", s.groups_dn);
    // Groups under base_dn (the whole tree), under group_base_dn, and found by the group
    // search after a bind without a service account.
    let mut whole_tree = search_config(s, &s.url, "nested_groups = \"recursive\"");
    whole_tree.base_dn = Some(s.base_dn.clone());
    for config in
        [whole_tree, search_config(s, &s.url, &base), template_config(s, &format!("group_attribute = \"\"\n{base}"))]
    {
        let dir = open(&config).await;
        let groups = tokio::time::timeout(Duration::from_secs(30), login(&dir, "nested@example.com", "nest-pw"))
            .await
            .expect("a cycle of groups ends")
            .unwrap();
        for group in ["nest-inner", "nest-outer", "nest-loop-a", "nest-loop-b"] {
            assert_member(&groups, s, group);
        }
        assert_eq!(groups.len(), 8, "each group once: {groups:?}");
    }
}

#[tokio::test]
async fn a_profile_naming_an_enclosing_group_admits_a_member_of_a_nested_group() {
    let s = slapd();
    let mail = "nestproxy@example.com";
    s.add_user("nestproxy", mail, "np-pw", &["np-team"]);
    s.add_member("np-department", &s.group_dn("np-team"));
    let profiles = "[[profile]]\nname = \"department\"\nallow = [\"127.0.0.1/32\"]\ngroups = [\"np-department\"]\n";
    let start = |nested: &str| Options {
        profiles: profiles.to_owned(),
        directory_extra: nested.to_owned(),
        ..Options::default()
    };

    let flat = Proxy::start(start("")).await;
    assert_eq!(imap_login(&flat, "f1", mail, "np-pw").await, format!("f1 {DENIAL}"));
    logs::wait_for_audit(mail, &["\"reason\":\"no profile applies to the user\""]).await;
    flat.stop().await;

    let nested = Proxy::start(start("nested_groups = \"recursive\"")).await;
    dovecot::dovecot().add_user(mail, "up-nestproxy-Zq9x");
    nested.set_upstream(mail, "up-nestproxy-Zq9x");
    let answer = imap_login(&nested, "n1", mail, "np-pw").await;
    assert!(answer.starts_with("n1 OK"), "{answer}");
    logs::wait_for_audit(mail, &["\"profile\":\"department"]).await;
    nested.stop().await;
}

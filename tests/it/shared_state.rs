//! Lockout and session counters shared by several instances through a real Redis, and
//! locks that survive a restart: two in-process proxies behind one Redis lock a user on
//! both, unlock on both, count sessions over both and, raced by parallel guesses, check
//! no more passwords than the limit; Redis stopped mid-run gives the configured behaviour
//! and the gauge, and its return is picked up. A real daemon with the memory backend
//! keeps a lock across a restart, and `lock_secs = 0` leaves a lock key without expiry.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::common::client::{self, MailClient};
use crate::common::join_all;
use crate::common::logs;
use crate::common::proxy::{self, Options, Proxy, TestUser};
use crate::common::redis::Redis;
use crate::install::{Daemon, Install, profiles_for};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";
const WAIT: Duration = Duration::from_secs(30);

fn shared(redis: &Redis, prefix: &str, extra: &str) -> String {
    format!("backend = \"redis\"\nurl = {:?}\nkey_prefix = {prefix:?}\n{extra}", redis.url())
}

/// A proxy sharing `redis` under `prefix`, allowing `mail` from 127.0.0.0/8.
async fn instance(redis: &Redis, prefix: &str, mail: &str, lockout: &str, limits: &str) -> Proxy {
    let profiles = format!("[[profile]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\nusers = [\"{mail}\"]\n");
    Proxy::start(Options {
        profiles,
        lockout: lockout.to_owned(),
        limits: limits.to_owned(),
        state: shared(redis, prefix, ""),
        ..Options::default()
    })
    .await
}

/// Two proxies sharing `redis` under `prefix`, with one user known to both.
async fn pair(redis: &Redis, prefix: &str, uid: &str, lockout: &str, limits: &str) -> (Proxy, Proxy, TestUser) {
    let mail = format!("{uid}@example.com");
    let a = instance(redis, prefix, &mail, lockout, limits).await;
    let b = instance(redis, prefix, &mail, lockout, limits).await;
    let user = proxy::add_user(&a, uid, &format!("{uid}-right-pw"));
    b.set_upstream(&user.mail, &user.upstream_password);
    (a, b, user)
}

async fn login_from(proxy: &Proxy, from: IpAddr, user: &str, password: &str) -> (MailClient, String) {
    let mut c = client::connect_tls_from(from, proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(format!("g1 LOGIN {user} {password}\r\n").as_bytes()).await;
    let answer = c.read_until_tagged("g1").await.pop().unwrap_or_default();
    (c, answer)
}

async fn login(proxy: &Proxy, user: &str, password: &str) -> String {
    login_from(proxy, IpAddr::from([127, 0, 0, 1]), user, password).await.1
}

/// Audit lines ("login refused") of `user` with `reason`.
fn refusals(user: &str, reason: &str) -> usize {
    let user_field = format!("\"user\":\"{user}\"");
    logs::all()
        .lines()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains(&user_field) && l.contains("login refused"))
        .filter(|l| l.contains(&format!("\"reason\":\"{reason}\"")))
        .count()
}

/// Waits until `proxy`'s metrics show the store `up` (1) or down (0).
async fn wait_for_gauge(proxy: &Proxy, up: bool) {
    let line = format!("postern_state_store_up {}", u8::from(up));
    let deadline = Instant::now() + WAIT;
    while !proxy.server().metrics().render().lines().any(|l| l == line) {
        assert!(Instant::now() < deadline, "no `{line}` in the metrics within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `login` until the answer starts with `prefix` (slots and in-flight entries are
/// given back in the background after a session ends).
async fn eventually(proxy: &Proxy, user: &TestUser, prefix: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = login(proxy, &user.mail, &user.password).await;
        if answer.starts_with(prefix) {
            return;
        }
        assert!(Instant::now() < deadline, "still `{answer}`, expected `{prefix}…`");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_over_two_instances_lock_on_both_and_one_unlock_frees_both() {
    logs::capture();
    let redis = Redis::start();
    let lockout = "failure_delay_ms = 0\nmax_failures = 3\nwindow_secs = 600\nlock_secs = 600";
    let (a, b, user) = pair(&redis, "t-lock", "shared-lock", lockout, "").await;
    for (i, proxy) in [&a, &b, &a].into_iter().enumerate() {
        assert!(login(proxy, &user.mail, &format!("wrong-{i}")).await.ends_with(DENIAL));
    }
    for proxy in [&a, &b] {
        assert!(login(proxy, &user.mail, &user.password).await.ends_with(DENIAL), "locked on both");
        let locked = proxy.server().counters.locked_users().await.expect("store up");
        assert!(locked.iter().any(|l| l.user == user.mail), "{locked:?}");
    }
    logs::wait_for_audit(&user.mail, &["locked out after repeated password failures"]).await;
    assert!(b.server().counters.unlock(&user.mail).await.expect("store up"), "was locked");
    assert!(login(&a, &user.mail, &user.password).await.starts_with("g1 OK"), "unlocked on the other instance");
    assert!(a.server().counters.locked_users().await.expect("store up").is_empty());
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_counts_sessions_on_both_instances() {
    logs::capture();
    let redis = Redis::start();
    let (a, b, user) = pair(&redis, "t-cap", "shared-cap", "failure_delay_ms = 0", "max_sessions_per_user = 2").await;
    let (first, answer) = login_from(&a, IpAddr::from([127, 0, 0, 1]), &user.mail, &user.password).await;
    assert!(answer.starts_with("g1 OK"), "{answer}");
    let (mut second, answer) = login_from(&b, IpAddr::from([127, 0, 0, 1]), &user.mail, &user.password).await;
    assert!(answer.starts_with("g1 OK"), "{answer}");
    for proxy in [&a, &b] {
        assert!(login(proxy, &user.mail, &user.password).await.starts_with("g1 NO [UNAVAILABLE]"), "two held");
    }
    logs::wait_for_audit(&user.mail, &["too many concurrent sessions for the user (limit 2)"]).await;
    second.send(b"x LOGOUT\r\n").await;
    second.read_to_end_or_close().await;
    drop(second);
    eventually(&a, &user, "g1 OK").await;
    drop(first);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_parallel_wrong_passwords_over_both_instances_get_at_most_max_failures_checks() {
    logs::capture();
    let redis = Redis::start();
    let lockout =
        "failure_delay_ms = 0\nmax_failures = 5\nmax_failures_per_ip = 50\nwindow_secs = 600\nlock_secs = 600";
    let (a, b, user) = pair(&redis, "t-race", "shared-race", lockout, "").await;
    let attempts: Vec<_> = (0..40u8)
        .map(|i| {
            let proxy = if i % 2 == 0 { &a } else { &b };
            let from = IpAddr::from([127, 0, 2, 10 + i]);
            let mail = user.mail.clone();
            async move { login_from(proxy, from, &mail, &format!("wrong-{i}")).await.1 }
        })
        .collect();
    let answers = join_all(attempts).await;
    assert!(answers.iter().all(|a| a.ends_with(DENIAL)), "{answers:?}");
    let checked = refusals(&user.mail, "wrong password");
    let locked = refusals(&user.mail, "locked out after repeated password failures");
    assert!(checked <= 5, "{checked} wrong passwords reached the directory over two instances (limit 5)");
    assert_eq!(checked + locked, 40, "every attempt is either checked or refused as locked");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_in_redis_survives_a_restart_of_the_instances() {
    logs::capture();
    let redis = Redis::start();
    let lockout = "failure_delay_ms = 0\nmax_failures = 2\nwindow_secs = 600\nlock_secs = 600";
    let (a, b, user) = pair(&redis, "t-restart", "shared-restart", lockout, "").await;
    for proxy in [&a, &b] {
        assert!(login(proxy, &user.mail, "wrong").await.ends_with(DENIAL));
    }
    a.stop().await;
    b.stop().await;
    let c = instance(&redis, "t-restart", &user.mail, lockout, "").await;
    c.set_upstream(&user.mail, &user.upstream_password);
    assert!(login(&c, &user.mail, &user.password).await.ends_with(DENIAL), "still locked after the restart");
    let locked = c.server().counters.locked_users().await.expect("store up");
    assert!(
        locked.iter().any(|l| l.user == user.mail && l.remaining.is_some_and(|r| r > Duration::from_secs(500))),
        "{locked:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_logins_fail_open_on_local_counters_and_the_store_comes_back() {
    logs::capture();
    let mut redis = Redis::start();
    let lockout = "failure_delay_ms = 0\nmax_failures = 2\nwindow_secs = 600\nlock_secs = 600";
    let (a, _b, user) = pair(&redis, "t-open", "shared-open", lockout, "").await;
    wait_for_gauge(&a, true).await;
    redis.stop();
    wait_for_gauge(&a, false).await;
    logs::wait_for_line(&["state store is down"]).await;
    assert_eq!(postern::daemon::health::Probe::probe(a.server()).await, Ok(()), "fail-open: still ready");
    assert!(login(&a, &user.mail, &user.password).await.starts_with("g1 OK"), "fail-open: logins go on");
    for _ in 0..2 {
        assert!(login(&a, &user.mail, "wrong").await.ends_with(DENIAL));
    }
    assert!(login(&a, &user.mail, &user.password).await.ends_with(DENIAL), "local counters still lock");
    assert!(a.server().counters.unlock(&user.mail).await.is_err(), "the shared unlock says the store is down");
    redis.restart();
    wait_for_gauge(&a, true).await;
    logs::wait_for_line(&["state store is back up"]).await;
    assert!(a.server().counters.unlock(&user.mail).await.expect("store back"), "the local lock is lifted too");
    eventually(&a, &user, "g1 OK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_and_on_store_down_closed_logins_are_unavailable_until_it_is_back() {
    logs::capture();
    let mut redis = Redis::start();
    let uid = "shared-closed";
    let mail = format!("{uid}@example.com");
    let a = Proxy::start(Options {
        profiles: proxy::profile_for(&[&mail]),
        state: shared(&redis, "t-closed", "on_store_down = \"closed\""),
        ..Options::default()
    })
    .await;
    let user = proxy::add_user(&a, uid, "closed-right-pw");
    assert!(login(&a, &user.mail, &user.password).await.starts_with("g1 OK"));
    redis.stop();
    wait_for_gauge(&a, false).await;
    // Balancers stop sending here: the readiness check names the store.
    let ready = postern::daemon::health::Probe::probe(a.server()).await;
    assert!(ready.as_ref().is_err_and(|why| why.contains("state store")), "{ready:?}");
    assert!(login(&a, &user.mail, &user.password).await.starts_with("g1 NO [UNAVAILABLE]"));
    logs::wait_for_audit(&user.mail, &["state store unavailable"]).await;
    let text = a.server().metrics().render();
    assert!(
        text.contains("postern_logins_total{outcome=\"unavailable\",reason=\"state store unavailable\"} 1"),
        "{text}"
    );
    redis.restart();
    wait_for_gauge(&a, true).await;
    assert_eq!(postern::daemon::health::Probe::probe(a.server()).await, Ok(()), "ready again");
    eventually(&a, &user, "g1 OK").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_survives_a_daemon_restart_with_the_memory_backend() {
    let lockout = "\n[lockout]\nmax_failures = 2\nfailure_delay_ms = 0\n";
    let install = Install::new(&profiles_for(&["keep1@example.com"]), "", lockout);
    install.add_user("keep1@example.com", "dir-pw");
    let mut daemon = Daemon::start(&install);
    let connect = |daemon: &Daemon| {
        let (address, ca) = (daemon.imaps, install.ca_file.clone());
        async move {
            let mut c = client::connect_tls(address, &ca).await;
            assert!(c.read_line().await.starts_with("* OK"));
            c
        }
    };
    let mut c = connect(&daemon).await;
    for tag in ["w1", "w2"] {
        c.send(format!("{tag} LOGIN keep1@example.com wrong\r\n").as_bytes()).await;
        assert!(c.read_until_tagged(tag).await.pop().unwrap_or_default().ends_with(DENIAL));
    }
    drop(c);
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "{}", daemon.log());
    let saved = std::fs::read_to_string(install.path("state/lockout.json")).expect("lockout.json saved");
    assert!(saved.contains("keep1@example.com"), "{saved}");

    let daemon = Daemon::start(&install);
    let mut c = connect(&daemon).await;
    c.send(b"l1 LOGIN keep1@example.com dir-pw\r\n").await;
    assert!(c.read_until_tagged("l1").await.pop().unwrap_or_default().ends_with(DENIAL), "still locked");
    let status = crate::install::expect_code(&install.run(&["status"], ""), 0);
    assert!(status.contains("keep1@example.com"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_secs_zero_a_lock_in_redis_has_no_expiry_until_unlocked() {
    logs::capture();
    let redis = Redis::start();
    let lockout = "failure_delay_ms = 0\nmax_failures = 2\nwindow_secs = 600\nlock_secs = 0";
    let (a, b, user) = pair(&redis, "t-forever", "shared-forever", lockout, "").await;
    for proxy in [&a, &b] {
        assert!(login(proxy, &user.mail, "wrong").await.ends_with(DENIAL));
    }
    let locked = b.server().counters.locked_users().await.expect("store up");
    assert!(locked.iter().any(|l| l.user == user.mail && l.remaining.is_none()), "no expiry: {locked:?}");
    assert!(login(&a, &user.mail, &user.password).await.ends_with(DENIAL));
    assert!(b.server().counters.unlock(&user.mail).await.expect("store up"));
    assert!(login(&a, &user.mail, &user.password).await.starts_with("g1 OK"), "unlocked on both");
}

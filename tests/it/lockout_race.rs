//! Lockout under concurrency: attempts already in flight count against the limits, so no
//! burst of parallel guesses gets more passwords checked than the limits allow.

use crate::common::logs;
use crate::common::proxy::{self, Options, Proxy};
use crate::common::{client, join_all};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

/// Audit lines ("login refused" events) of `user` with `reason`.
fn refusals(user: &str, reason: &str) -> usize {
    let user_field = format!("\"user\":\"{user}\"");
    logs::all()
        .lines()
        .filter(|l| l.contains("\"target\":\"audit\"") && l.contains(&user_field) && l.contains("login refused"))
        .filter(|l| l.contains(&format!("\"reason\":\"{reason}\"")))
        .count()
}

async fn guess(proxy: &Proxy, from: std::net::IpAddr, user: &str, password: &str) -> String {
    let mut c = client::connect_tls_from(from, proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(format!("g1 LOGIN {user} {password}\r\n").as_bytes()).await;
    c.read_until_tagged("g1").await.pop().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_parallel_guesses_from_forty_addresses_get_at_most_max_failures_checks() {
    logs::capture();
    let uid = "race-user";
    let mail = format!("{uid}@example.com");
    let profiles = format!("[[profile]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\nusers = [\"{mail}\"]\n");
    let lockout =
        "failure_delay_ms = 0\nmax_failures = 5\nmax_failures_per_ip = 50\nwindow_secs = 600\nlock_secs = 600";
    let proxy = Proxy::start(Options { profiles, lockout: lockout.to_owned(), ..Options::default() }).await;
    let user = proxy::add_user(&proxy, uid, "race-right-pw");
    let attempts = (0..41u8).map(|i| {
        let from = std::net::IpAddr::from([127, 0, 1, 10 + i]);
        let password = if i == 40 { user.password.clone() } else { format!("wrong-{i}") };
        let (proxy, mail) = (&proxy, &mail);
        async move { guess(proxy, from, mail, &password).await }
    });
    let answers = join_all(attempts).await;
    assert!(answers.iter().all(|a| a.ends_with(DENIAL) || a.starts_with("g1 OK")), "{answers:?}");
    // Every refusal has been audited once the answers are in.
    let checked = refusals(&mail, "wrong password");
    let locked = refusals(&mail, "locked out after repeated password failures");
    assert!(checked <= 5, "{checked} wrong passwords reached the directory (limit 5)");
    let accepted = answers.iter().filter(|a| a.starts_with("g1 OK")).count();
    assert_eq!(checked + locked + accepted, 41, "every attempt is either checked, refused as locked, or accepted");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_guesses_from_one_address_get_at_most_max_failures_per_ip_checks() {
    logs::capture();
    let users: Vec<String> = (0..12).map(|i| format!("race-ip{i}@example.com")).collect();
    let names: Vec<&str> = users.iter().map(String::as_str).collect();
    let lockout =
        "failure_delay_ms = 0\nmax_failures = 100\nmax_failures_per_ip = 6\nwindow_secs = 600\nlock_secs = 600";
    let proxy = Proxy::start(Options {
        profiles: proxy::profile_for(&names),
        lockout: lockout.to_owned(),
        ..Options::default()
    })
    .await;
    for i in 0..12 {
        proxy::add_user(&proxy, &format!("race-ip{i}"), &format!("race-ip{i}-pw"));
    }
    let from = std::net::IpAddr::from([127, 0, 0, 1]);
    let attempts = users.iter().map(|mail| {
        let proxy = &proxy;
        async move { guess(proxy, from, mail, "wrong").await }
    });
    let answers = join_all(attempts).await;
    assert!(answers.iter().all(|a| a.ends_with(DENIAL)), "{answers:?}");
    let checked: usize = users.iter().map(|u| refusals(u, "wrong password")).sum();
    let throttled: usize = users.iter().map(|u| refusals(u, "client IP throttled after repeated failed logins")).sum();
    assert!(checked <= 6, "{checked} passwords from one address were checked (limit 6)");
    assert_eq!(checked + throttled, 12, "the rest were throttled");
    proxy.stop().await;
}

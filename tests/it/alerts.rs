//! Alerts posted to HTTPS webhooks: a lock, an unlock over the control socket, one alert
//! (not two) for a stale stored upstream password, an expiring certificate at start and on
//! reload; webhooks that hang, are down or answer 500 do not hold up logins and move the
//! dropped and failed counters. And `lock_secs = 0`: locked across a restart until unlocked.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::client;
use crate::common::logs;
use crate::common::proxy::{self, Options, Proxy, TestUser};
use crate::common::webhook::{Hanging, Sink};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

async fn login(proxy: &Proxy, user: &str, password: &str) -> String {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(format!("a1 LOGIN {user} {password}\r\n").as_bytes()).await;
    c.read_until_tagged("a1").await.pop().unwrap_or_default()
}

/// An `[alerts]` table posting to `hooks` (inline webhook tables) with `extra` lines.
fn alerts(hooks: &[String], extra: &str) -> String {
    format!("{extra}\nwebhooks = [{}]\n", hooks.join(", "))
}

fn hook(url: &str, extra: &str) -> String {
    let ca = crate::common::pki::pki().ca_file.display().to_string();
    format!("{{ url = {url:?}, ca_file = {ca:?}{extra} }}")
}

async fn start(users: &[&str], lockout: &str, alerts: String) -> Proxy {
    Proxy::start(Options {
        profiles: proxy::profile_for(users),
        lockout: format!("failure_delay_ms = 0\n{lockout}"),
        alerts,
        ..Options::default()
    })
    .await
}

/// A metric's value in the proxy's exposition.
fn metric(proxy: &Proxy, series: &str) -> u64 {
    let text = proxy.server().metrics().render();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// No body carries a password of `users`.
fn assert_no_secrets(bodies: &[Value], users: &[&TestUser]) {
    let text = serde_json::to_string(bodies).unwrap();
    for user in users {
        assert!(!text.contains(&user.password) && !text.contains(&user.upstream_password), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_an_unlock_and_a_refused_upstream_credential_reach_the_webhook() {
    logs::capture();
    let sink = Sink::start(200).await;
    let (locked, stale) = ("alert-lock@example.com", "alert-stale@example.com");
    let lockout = "max_failures = 2\nwindow_secs = 600\nlock_secs = 600";
    let proxy = start(&[locked, stale], lockout, alerts(&[hook(&sink.url, "")], "")).await;
    let a = proxy::add_user(&proxy, "alert-lock", "Lock-pw-1");
    let b = proxy::add_user(&proxy, "alert-stale", "Stale-pw-1");

    for _ in 0..2 {
        assert!(login(&proxy, &a.mail, "wrong").await.ends_with(DENIAL));
    }
    let event = sink.wait_for("user_locked", 1).await.remove(0);
    assert_eq!((event["user"].as_str(), event["client"].as_str()), (Some(locked), Some("127.0.0.1")), "{event}");
    assert_eq!(event["failures"], 2);
    assert!(event["until"].as_str().is_some_and(|t| t.ends_with('Z')), "{event}");
    assert_eq!(event["host"], "proxy.test");
    assert!(event["time"].is_string());

    let socket = proxy.serve_control();
    let answer = postern::cli::control::request(&socket, &serde_json::json!({"command": "unlock", "user": locked}))
        .await
        .expect("unlock over the control socket");
    assert_eq!(answer["was_locked"], true, "{answer}");
    let event = sink.wait_for("user_unlocked", 1).await.remove(0);
    assert_eq!(event["user"], locked);
    assert!(event["by"].as_str().is_some_and(|by| by.starts_with("uid=")), "the socket's peer: {event}");
    assert!(login(&proxy, &a.mail, &a.password).await.starts_with("a1 OK"), "unlocked");

    // The upstream password changed behind the proxy's back: the stored one is refused.
    proxy.set_upstream(&b.mail, "an-old-upstream-password");
    for _ in 0..2 {
        let answer = login(&proxy, &b.mail, &b.password).await;
        assert!(!answer.starts_with("a1 OK"), "{answer}");
    }
    let event = sink.wait_for("upstream_refused", 1).await.remove(0);
    assert_eq!((event["user"].as_str(), event["protocol"].as_str()), (Some(stale), Some("imap")), "{event}");
    assert!(event["upstream"].as_str().is_some_and(|u| u.starts_with("localhost:")), "{event}");
    assert!(event["answer"].as_str().is_some_and(|a| !a.is_empty()), "{event}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.events("upstream_refused").len(), 1, "one alert per user and hour: {:?}", sink.all());
    assert!(sink.events("certificate_expiring").is_empty(), "the test certificate is valid for decades");
    assert!(!serde_json::to_string(&sink.all()).unwrap().contains("an-old-upstream-password"));
    assert_no_secrets(&sink.all(), &[&a, &b]);
    assert_eq!(metric(&proxy, "postern_alerts_sent_total{result=\"ok\"}"), 3);
    proxy.stop().await;
}

/// The date `days` from today (UTC), for a certificate's not-after.
fn day_in(days: u64) -> (i32, u8, u8) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let date = postern::audit::file::rfc3339(now + days * 86_400);
    let part = |range: std::ops::Range<usize>| date[range].parse::<u32>().unwrap();
    (part(0..4) as i32, part(5..7) as u8, part(8..10) as u8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_expiring_in_three_days_is_reported_at_start_and_on_reload() {
    logs::capture();
    let sink = Sink::start(200).await;
    let proxy = Proxy::start(Options {
        profiles: proxy::profile_for(&["nobody@example.com"]),
        alerts: alerts(&[hook(&sink.url, "")], ""),
        cert_not_after: Some(day_in(4)),
        ..Options::default()
    })
    .await;
    let event = sink.wait_for("certificate_expiring", 1).await.remove(0);
    assert_eq!(event["certificate"], "tls.cert", "{event}");
    assert_eq!(event["days_left"], 3, "{event}");
    assert!(event["path"].as_str().is_some_and(|p| p.ends_with("proxy.crt")), "{event}");
    assert!(event["subject"].as_str().is_some_and(|s| s.contains("proxy")), "{event}");
    let (y, m, d) = day_in(4);
    assert_eq!(event["not_after"], format!("{y:04}-{m:02}-{d:02}T00:00:00Z"));
    proxy.reload_all().await;
    sink.wait_for("certificate_expiring", 2).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_that_hang_are_down_or_fail_do_not_hold_up_logins() {
    logs::capture();
    let hanging = Hanging::start().await;
    let failing = Sink::start(500).await;
    let down = crate::common::closed_port();
    let users = ["alert-slow-1", "alert-slow-2", "alert-slow-3", "alert-slow-ok"];
    let mails: Vec<String> = users.iter().map(|u| format!("{u}@example.com")).collect();
    let hooks = [
        hook(&hanging.url, ", timeout_secs = 10, retries = 0"),
        hook(&format!("https://localhost:{}/hook", down.port), ", retries = 0"),
        hook(&failing.url, ", retries = 1"),
    ];
    let mail_refs: Vec<&str> = mails.iter().map(String::as_str).collect();
    let proxy =
        start(&mail_refs, "max_failures = 1\nwindow_secs = 600\nlock_secs = 600", alerts(&hooks, "queue_size = 1"))
            .await;
    let created: Vec<TestUser> = users.iter().map(|u| proxy::add_user(&proxy, u, "Slow-pw-1")).collect();

    for user in &created[..3] {
        assert!(login(&proxy, &user.mail, "wrong").await.ends_with(DENIAL), "one wrong password locks");
    }
    let started = Instant::now();
    let ok = &created[3];
    assert!(login(&proxy, &ok.mail, &ok.password).await.starts_with("a1 OK"), "a login right after goes through");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

    // The hanging webhook holds one alert in flight and one queued: the third is dropped.
    assert!(metric(&proxy, "postern_alerts_dropped_total") >= 1);
    // The failing one tries each alert twice, in order; the down one gives up at once.
    let tried = failing.wait_for("user_locked", 2).await;
    assert_eq!(tried[0], tried[1], "the first alert was tried again after a 500");
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&proxy, "postern_alerts_sent_total{result=\"failed\"}") < 2 {
        assert!(Instant::now() < deadline, "{}", proxy.server().metrics().render());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&proxy, "postern_alerts_sent_total{result=\"ok\"}"), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lock_secs_zero_a_user_stays_locked_across_a_restart_until_unlocked() {
    logs::capture();
    let sink = Sink::start(200).await;
    let mail = "alert-forever@example.com";
    let proxy =
        start(&[mail], "max_failures = 2\nwindow_secs = 600\nlock_secs = 0", alerts(&[hook(&sink.url, "")], "")).await;
    let user = proxy::add_user(&proxy, "alert-forever", "Forever-pw-1");
    for _ in 0..2 {
        assert!(login(&proxy, &user.mail, "wrong").await.ends_with(DENIAL));
    }
    let event = sink.wait_for("user_locked", 1).await.remove(0);
    assert!(event["until"].is_null(), "until an admin unlocks: {event}");
    let locked = proxy.server().counters.locked_users().await.expect("memory backend");
    assert_eq!(locked.len(), 1);
    assert_eq!((locked[0].user.as_str(), locked[0].remaining), (mail, None));

    let state_dir = proxy.state_dir();
    let proxy = proxy.restart().await;
    let saved = std::fs::read_to_string(state_dir.join("lockout.json")).expect("saved lockouts");
    assert!(saved.contains("\"locked_indefinitely\": true"), "{saved}");
    assert!(login(&proxy, &user.mail, &user.password).await.ends_with(DENIAL), "still locked after the restart");
    let locked = proxy.server().counters.locked_users().await.expect("memory backend");
    assert_eq!((locked[0].user.as_str(), locked[0].remaining), (mail, None));
    let socket = proxy.serve_control();
    let status = postern::cli::control::request(&socket, &serde_json::json!({"command": "status"})).await.unwrap();
    assert_eq!(status["locked"][0]["remaining_secs"], Value::Null, "{status}");

    assert!(proxy.server().counters.unlock(mail).await.expect("unlock"));
    assert!(login(&proxy, &user.mail, &user.password).await.starts_with("a1 OK"), "unlocked");
    proxy.stop().await;
}

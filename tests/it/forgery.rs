//! Log forging and spoofing: user names with bidirectional overrides, line separators or
//! zero-width characters never reach a log line or audit field as they were sent.

use crate::common::client;
use crate::common::logs;
use crate::common::proxy::{self, Options, Proxy};
use postern::metrics::{LoginResult, Outcome};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

#[tokio::test]
async fn invisible_characters_in_user_names_are_refused_and_never_logged_raw() {
    logs::capture();
    let proxy =
        Proxy::start(Options { profiles: proxy::profile_for(&["forge@example.com"]), ..Options::default() }).await;
    proxy::add_user(&proxy, "forge", "forge-pw");
    // Each would pass for (or disguise itself as) another name in a log viewer.
    let sneaky = ["forge\u{202E}moc.elpmaxe@evil", "forge@example.com\u{2028}outcome=ok", "for\u{200D}ge@example.com"];
    for (i, user) in sneaky.iter().enumerate() {
        let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
        assert!(c.read_line().await.starts_with("* OK"));
        c.send(format!("f{i} LOGIN \"{user}\" forge-pw\r\n").as_bytes()).await;
        assert_eq!(c.read_until_tagged(&format!("f{i}")).await.pop().unwrap(), format!("f{i} {DENIAL}"));
    }
    let invalid = LoginResult { outcome: Outcome::Denied, reason: "invalid user name" };
    assert_eq!(proxy.server().metrics().logins(invalid), 3, "each counted as an invalid user name");
    // Audited once the answers are out; no line anywhere holds the characters as sent.
    logs::wait_for_line(&["\"user\":\"(invalid)\"", "invalid user name"]).await;
    let all = logs::all();
    for c in ['\u{202E}', '\u{2028}', '\u{200D}'] {
        assert!(!all.contains(c), "U+{:04X} reached the log", u32::from(c));
    }
    still_logs_in(&proxy).await;
}

async fn still_logs_in(proxy: &Proxy) {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("* OK"));
    c.send(b"z1 LOGIN forge@example.com forge-pw\r\n").await;
    assert!(c.read_until_tagged("z1").await.pop().unwrap().starts_with("z1 OK"));
}

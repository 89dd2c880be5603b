//! Upstream logins with OAuth2 (SASL XOAUTH2), end to end: clients log in to the proxy with
//! their directory password (slapd); the proxy gets a token from the local HTTPS token
//! server and opens the upstream session on Dovecot, whose oauth2 passdb validates the token
//! at the token server's introspection endpoint.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::client::{self, MailClient};
use common::logs;
use common::oauth::{self, APP_SUBJECT, OAuthProxy, Source, token_server};

const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

async fn imap_connect(proxy: &OAuthProxy) -> MailClient {
    let mut c = client::connect_tls(proxy.imaps, &proxy.ca_file).await;
    let greeting = c.read_line().await;
    assert!(greeting.starts_with("* OK"), "greeting: {greeting}");
    c
}

/// Logs in over IMAP and returns the tagged answer.
async fn imap_login(proxy: &OAuthProxy, mail: &str, password: &str) -> String {
    let mut c = imap_connect(proxy).await;
    let answer = c.tagged("a1", &format!("LOGIN {mail} {password}")).await;
    if answer.starts_with("a1 OK") {
        assert!(c.tagged("a2", "SELECT INBOX").await.starts_with("a2 OK"));
        assert!(c.tagged("a3", "LOGOUT").await.starts_with("a3 OK"));
    }
    answer
}

async fn smtp_reply(c: &mut MailClient) -> (String, Vec<String>) {
    let mut lines = Vec::new();
    loop {
        let line = c.read_line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return (lines[0][..3].to_owned(), lines);
        }
    }
}

fn message(marker: &str) -> Vec<u8> {
    format!("From: a@example.com\r\nTo: b@example.net\r\nSubject: {marker}\r\nMessage-ID: <{marker}@example.com>\r\n\r\nHello {marker}.\r\n")
        .into_bytes()
}

/// Every secret the token server handed out or holds must be absent from the logs.
fn assert_no_secret_logged() {
    let logged = logs::all();
    for secret in token_server().secrets() {
        assert!(!logged.contains(&secret), "a secret ({}...) was logged", &secret[..6.min(secret.len())]);
    }
    for line in token_server().private_key_pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!logged.contains(line), "a private key line was logged");
    }
}

/// How many upstream sessions Dovecot logged for `mail` with XOAUTH2, waiting up to 30 s for
/// `expected` (Dovecot logs asynchronously).
fn dovecot_xoauth2_logins(mail: &str, expected: usize) -> usize {
    let dovecot = common::dovecot::dovecot();
    let count = || dovecot.login_lines(mail).iter().filter(|l| l.contains("method=XOAUTH2")).count();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while count() < expected && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = count();
    if n != expected {
        eprintln!(
            "Dovecot login lines for {mail}: {:#?}\nlog tail:\n{}",
            dovecot.login_lines(mail),
            dovecot.log_tail(30)
        );
    }
    n
}

#[tokio::test]
async fn google_service_account_imap_login_and_fetch() {
    logs::capture();
    let mail = oauth::add_user("g-imap1", "dir-pw-g1");
    common::dovecot::dovecot().deliver(&mail, &message("g-imap1"));
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;

    let mut c = imap_connect(&proxy).await;
    let ok = c.tagged("a1", &format!("LOGIN {mail} dir-pw-g1")).await;
    assert!(ok.starts_with("a1 OK [CAPABILITY IMAP4rev1"), "{ok}");
    assert!(c.tagged("a2", "SELECT INBOX").await.starts_with("a2 OK"));
    assert_eq!(c.imap_fetch_body("a3", 1).await, message("g-imap1"));
    assert!(c.tagged("a4", "LOGOUT").await.starts_with("a4 OK"));

    assert_eq!(token_server().grants(&mail), 1, "refusals: {:?}", token_server().refusals());
    assert_eq!(dovecot_xoauth2_logins(&mail, 1), 1);
    logs::wait_for_audit(&mail, &["\"outcome\":\"logged-in\""]).await;

    // A second session reuses the cached token.
    assert!(imap_login(&proxy, &mail, "dir-pw-g1").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(&mail), 1);
    let metrics = proxy.server.upstreams.routing().sources()[0].1.metrics().snapshot();
    eprintln!("token endpoint metrics: {metrics:?}");
    assert!(metrics.requests >= 1 && metrics.cache_hits >= 1 && metrics.mean_latency().is_some(), "{metrics:?}");
    let text = proxy.server.metrics().render();
    let hits = format!("postern_oauth_token_cache_hits_total {}", metrics.cache_hits);
    assert!(text.lines().any(|l| l == hits), "the exported counters are the token source's: {text}");
    // The directory password still decides.
    assert_eq!(imap_login(&proxy, &mail, "wrong-pw").await, format!("a1 {DENIAL}"));
    assert_no_secret_logged();
}

#[tokio::test]
async fn google_service_account_pop3_login_and_retr() {
    logs::capture();
    let mail = oauth::add_user("g-pop1", "dir-pw-p1");
    common::dovecot::dovecot().deliver(&mail, &message("g-pop1"));
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;

    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send(format!("USER {mail}\r\n").as_bytes()).await;
    assert!(c.read_line().await.starts_with("+OK"));
    c.send(b"PASS dir-pw-p1\r\n").await;
    let answer = c.read_line().await;
    assert!(answer.starts_with("+OK"), "{answer}");
    c.send(b"RETR 1\r\n").await;
    assert!(c.read_line().await.starts_with("+OK"));
    assert_eq!(c.pop3_multiline().await, message("g-pop1"));
    c.send(b"QUIT\r\n").await;
    assert!(c.read_line().await.starts_with("+OK"));

    assert_eq!(dovecot_xoauth2_logins(&mail, 1), 1);
    assert_eq!(token_server().grants(&mail), 1);
    assert_no_secret_logged();
}

#[tokio::test]
async fn google_service_account_smtp_submission() {
    logs::capture();
    let mail = oauth::add_user("g-smtp1", "dir-pw-s1");
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;

    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    assert_eq!(smtp_reply(&mut c).await.0, "220");
    c.send(b"EHLO client.example\r\n").await;
    assert_eq!(smtp_reply(&mut c).await.0, "250");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{mail}\0dir-pw-s1"));
    c.send(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await;
    let (code, lines) = smtp_reply(&mut c).await;
    assert_eq!(code, "235", "{lines:?}");
    c.send(format!("MAIL FROM:<{mail}>\r\n").as_bytes()).await;
    assert_eq!(smtp_reply(&mut c).await.0, "250");
    c.send(b"RCPT TO:<someone@example.net>\r\n").await;
    assert_eq!(smtp_reply(&mut c).await.0, "250");
    c.send(b"DATA\r\n").await;
    assert_eq!(smtp_reply(&mut c).await.0, "354");
    c.send(&message("g-smtp1-marker")).await;
    c.send(b".\r\n").await;
    assert_eq!(smtp_reply(&mut c).await.0, "250");
    c.send(b"QUIT\r\n").await;
    assert_eq!(smtp_reply(&mut c).await.0, "221");

    let got = common::sink::sink()
        .wait_for_async(|m| m.data_contains(b"<g-smtp1-marker@example.com>"), Duration::from_secs(10))
        .await;
    assert!(got.is_some(), "the message relayed through the XOAUTH2 submission session reached the sink");
    assert_eq!(dovecot_xoauth2_logins(&mail, 1), 1);
    assert_no_secret_logged();
}

#[tokio::test]
async fn microsoft_client_credentials_share_one_token_across_mailboxes() {
    logs::capture();
    let first = oauth::add_user("ms-imap1", "dir-pw-m1");
    let second = oauth::add_user("ms-imap2", "dir-pw-m2");
    let proxy = OAuthProxy::start(Source::Microsoft, &[&first, &second], "").await;
    let before = token_server().grants(APP_SUBJECT);

    assert!(imap_login(&proxy, &first, "dir-pw-m1").await.starts_with("a1 OK"));
    assert!(imap_login(&proxy, &second, "dir-pw-m2").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(APP_SUBJECT), before + 1, "refusals: {:?}", token_server().refusals());
    assert_eq!(dovecot_xoauth2_logins(&first, 1), 1);
    assert_eq!(dovecot_xoauth2_logins(&second, 1), 1);
    assert_no_secret_logged();
}

/// Google Workspace for the default route and Microsoft 365 for a route by user, each with
/// its own named token source: each user's token comes from their route's source.
#[tokio::test]
async fn each_route_takes_its_tokens_from_its_own_named_source() {
    logs::capture();
    let google_user = oauth::add_user("rt-g1", "dir-pw-rg1");
    let m365_user = oauth::add_user("rt-m1", "dir-pw-rm1");
    let proxy = OAuthProxy::start_edited(Source::Google { token_uri: None }, &[&google_user, &m365_user], "", |text, dir| {
        oauth::write_private(&dir.join("ms-secret"), &format!("{}\n", oauth::MS_CLIENT_SECRET));
        let tokens = token_server();
        let ca = common::pki::pki().ca_file.display().to_string();
        let imap = common::dovecot::dovecot().imaps.port();
        let text = text
            .replace("[oauth]\n", "[oauth.google]\n")
            .replace("upstream_auth = \"xoauth2\"", "upstream_auth = \"xoauth2\"\noauth_source = \"google\"");
        format!(
            "{text}\n[oauth.m365]\nsource = \"microsoft\"\ntenant = {tenant:?}\nclient_id = {id:?}\nclient_secret_file = \"ms-secret\"\ntoken_url = \"{base}/ms/{tenant}/oauth2/v2.0/token\"\nca_file = {ca:?}\n\n[[route]]\nname = \"m365\"\nusers = [{m365_user:?}]\n[route.imap]\nupstream = \"localhost:{imap}\"\nupstream_ca_file = {ca:?}\nupstream_auth = \"xoauth2\"\noauth_source = \"m365\"\n",
            tenant = oauth::TENANT,
            id = oauth::MS_CLIENT_ID,
            base = tokens.base_url,
        )
    })
    .await;
    let app_grants = token_server().grants(APP_SUBJECT);

    assert!(imap_login(&proxy, &google_user, "dir-pw-rg1").await.starts_with("a1 OK"));
    assert!(imap_login(&proxy, &m365_user, "dir-pw-rm1").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(&google_user), 1, "refusals: {:?}", token_server().refusals());
    assert_eq!(token_server().grants(&m365_user), 0, "not from the Google source");
    assert_eq!(token_server().grants(APP_SUBJECT), app_grants + 1, "from the Microsoft source");
    assert_eq!(dovecot_xoauth2_logins(&m365_user, 1), 1);
    logs::wait_for_audit(&m365_user, &["\"route\":\"m365\""]).await;
    logs::wait_for_audit(&google_user, &["\"route\":\"default\""]).await;
    let sources: Vec<String> = proxy.server.upstreams.routing().sources().into_iter().map(|(n, _)| n).collect();
    assert_eq!(sources, ["google", "m365"]);
    assert_no_secret_logged();
}

#[tokio::test]
async fn refresh_tokens_from_the_vault_are_traded_and_rotated_ones_written_back() {
    logs::capture();
    let mail = oauth::add_user("rt-imap1", "dir-pw-r1");
    let proxy = OAuthProxy::start(Source::Refresh, &[&mail], "").await;
    // No refresh token stored yet: the same denial as a missing password.
    assert_eq!(imap_login(&proxy, &mail, "dir-pw-r1").await, format!("a1 {DENIAL}"));
    logs::wait_for_audit(&mail, &["no upstream credential"]).await;

    let original = token_server().new_refresh_token(&mail, true);
    proxy.store_refresh_token(&mail, &original);
    assert!(imap_login(&proxy, &mail, "dir-pw-r1").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(&mail), 1);
    let rotated = proxy.stored_refresh_token(&mail);
    assert_ne!(rotated, original, "the rotated refresh token is stored");
    assert!(token_server().refresh_token_valid(&rotated) && !token_server().refresh_token_valid(&original));
    assert_eq!(dovecot_xoauth2_logins(&mail, 1), 1);

    // A revoked refresh token is an outage, not a wrong password.
    let fresh_proxy = OAuthProxy::start(Source::Refresh, &[&mail], "").await;
    fresh_proxy.store_refresh_token(&mail, "rt-revoked-long-ago");
    let answer = imap_login(&fresh_proxy, &mail, "dir-pw-r1").await;
    assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
    let audit = logs::wait_for_audit(&mail, &["\"outcome\":\"unavailable\"", "invalid_grant"]).await;
    assert!(!audit.contains("rt-revoked-long-ago"), "{audit}");
    assert_no_secret_logged();
}

/// The proxy's token cache keeps time with tokio's clock, which this test (on a
/// current-thread runtime) moves forward instead of waiting: no login races a deadline.
#[tokio::test]
async fn a_token_expiring_mid_run_is_renewed_once_for_concurrent_logins() {
    logs::capture();
    let mail = oauth::add_user("g-expiry1", "dir-pw-e1");
    // The token server hands out 10-minute tokens; the proxy renews them a minute early.
    token_server().set_lifetime(&mail, 600);
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "refresh_margin_secs = 60").await;

    assert!(imap_login(&proxy, &mail, "dir-pw-e1").await.starts_with("a1 OK"));
    assert!(imap_login(&proxy, &mail, "dir-pw-e1").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(&mail), 1, "the second login reuses the cached token");

    // The token's time runs out: the token server stops accepting it, and the proxy's clock
    // passes its renewal point (issue + 600 s - 60 s).
    token_server().expire_issued(&mail);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(541)).await;
    tokio::time::resume();

    // Five sessions log in at once: one renewal serves all.
    let logins: Vec<_> = (0..5)
        .map(|_| {
            let (imaps, ca, mail) = (proxy.imaps, proxy.ca_file.clone(), mail.clone());
            tokio::spawn(async move {
                let mut c = client::connect_tls(imaps, &ca).await;
                c.read_line().await;
                c.tagged("b1", &format!("LOGIN {mail} dir-pw-e1")).await
            })
        })
        .collect();
    for login in logins {
        let answer = login.await.unwrap();
        assert!(answer.starts_with("b1 OK"), "{answer}");
    }
    assert_eq!(token_server().grants(&mail), 2, "refusals: {:?}", token_server().refusals());
    assert_eq!(dovecot_xoauth2_logins(&mail, 7), 7);
    let retried = logs::all().lines().any(|l| l.contains("retrying with a new one") && l.contains(&mail));
    assert!(!retried, "the expired token was renewed before use, not after a refusal");
}

#[tokio::test]
async fn token_endpoint_outage_is_an_upstream_outage() {
    logs::capture();
    let mail = oauth::add_user("g-outage1", "dir-pw-o1");
    let closed_port = common::closed_port();
    let closed = format!("https://localhost:{}/google/token", closed_port.port);
    let proxy = OAuthProxy::start(Source::Google { token_uri: Some(closed) }, &[&mail], "").await;

    let answer = imap_login(&proxy, &mail, "dir-pw-o1").await;
    assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
    let audit =
        logs::wait_for_audit(&mail, &["\"outcome\":\"unavailable\"", "no OAuth2 token for", "unreachable"]).await;
    assert!(audit.contains("cannot connect"), "{audit}");
    let metrics = proxy.server.upstreams.routing().sources()[0].1.metrics().snapshot();
    assert_eq!((metrics.requests, metrics.failures), (1, 1));
    let text = proxy.server.metrics().render();
    assert!(text.contains("postern_oauth_token_requests_total{result=\"failed\"} 1"), "{text}");
    assert!(text.contains("postern_oauth_token_requests_total{result=\"ok\"} 0"), "{text}");
    assert_eq!(dovecot_xoauth2_logins(&mail, 0), 0);
}

#[tokio::test]
async fn a_revoked_cached_token_is_replaced_once() {
    logs::capture();
    let mail = oauth::add_user("g-revoke1", "dir-pw-v1");
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;
    assert!(imap_login(&proxy, &mail, "dir-pw-v1").await.starts_with("a1 OK"));
    token_server().revoke_issued(&mail);

    assert!(imap_login(&proxy, &mail, "dir-pw-v1").await.starts_with("a1 OK"));
    assert_eq!(token_server().grants(&mail), 2);
    assert_eq!(dovecot_xoauth2_logins(&mail, 2), 2);
}

#[tokio::test]
async fn an_upstream_refusing_the_token_is_reported_with_its_xoauth2_status() {
    logs::capture();
    let mail = oauth::add_user("g-blocked1", "dir-pw-b1");
    token_server().block(&mail);
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;

    let answer = imap_login(&proxy, &mail, "dir-pw-b1").await;
    assert!(answer.starts_with("a1 NO [UNAVAILABLE]"), "{answer}");
    let audit = logs::wait_for_audit(&mail, &["refused the stored credential", "XOAUTH2 status=401"]).await;
    assert!(audit.contains("\"outcome\":\"unavailable\""), "{audit}");

    // POP3 and SMTP report the same status.
    let mut c = client::connect_tls(proxy.pop3s, &proxy.ca_file).await;
    c.read_line().await;
    c.send(format!("USER {mail}\r\nPASS dir-pw-b1\r\n").as_bytes()).await;
    assert!(c.read_line().await.starts_with("+OK"));
    let answer = c.read_line().await;
    assert!(answer.starts_with("-ERR"), "{answer}");
    drop(c);
    logs::wait_for_audit(&mail, &["\"protocol\":\"pop3\"", "XOAUTH2 status=401"]).await;

    let mut c = client::connect_tls(proxy.smtps, &proxy.ca_file).await;
    smtp_reply(&mut c).await;
    c.send(b"EHLO client.example\r\n").await;
    smtp_reply(&mut c).await;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{mail}\0dir-pw-b1"));
    c.send(format!("AUTH PLAIN {auth}\r\n").as_bytes()).await;
    let (code, lines) = smtp_reply(&mut c).await;
    assert!(code.starts_with('4'), "{lines:?}");
    drop(c);
    logs::wait_for_audit(&mail, &["\"protocol\":\"smtp\"", "XOAUTH2 status=401"]).await;
    assert_eq!(dovecot_xoauth2_logins(&mail, 0), 0);
    assert_no_secret_logged();
}

#[tokio::test]
async fn readable_key_and_secret_files_stop_the_start() {
    use std::os::unix::fs::PermissionsExt;
    for source in [Source::Google { token_uri: None }, Source::Microsoft] {
        let dir = tempfile::tempdir().unwrap();
        let text = oauth::config_text(dir.path(), &source, "");
        let file = if matches!(source, Source::Microsoft) { "ms-secret" } else { "service-account.json" };
        std::fs::set_permissions(dir.path().join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("profiles.toml"), "").unwrap();
        let config = postern::config::Config::load(&path).unwrap();
        let err = match postern::state::State::from_config(&config).await {
            Ok(_) => panic!("{file} with mode 0644 was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(file) && err.contains("chmod 600"), "{err}");
    }
}

#[tokio::test]
async fn probe_logs_in_with_an_oauth2_token_when_upstream_auth_is_xoauth2() {
    let mail = oauth::add_user("g-probe1", "dir-pw-pr1");
    let proxy = OAuthProxy::start(Source::Google { token_uri: None }, &[&mail], "").await;
    let config = proxy.dir.path().join("proxy.toml");
    for (i, protocol) in ["imap", "pop3", "smtp"].into_iter().enumerate() {
        // The real command, as an admin runs it: no vault entry is needed for a service
        // account, so only a token can have logged it in.
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["--config", config.to_str().unwrap(), "probe", &mail, "--protocol", protocol])
            .output()
            .expect("run postern probe");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{protocol}: {stdout}{stderr}");
        assert!(stdout.starts_with("OK") && stdout.contains("xoauth2"), "{protocol}: {stdout}");
        // Each run is a new process with an empty token cache: one grant each.
        assert_eq!(token_server().grants(&mail), i as u32 + 1, "{protocol}: a token was fetched for the probe");
    }
    proxy.stop().await;
}

/// Runs `postern user authorize MAIL` against `proxy`'s config, approves or denies the code it
/// shows at the token server, and returns its exit status, standard output and error.
fn authorize(proxy: &OAuthProxy, mail: &str, approve: bool) -> (std::process::ExitStatus, String, String) {
    use std::io::{BufRead, Read};
    let config = proxy.dir.path().join("proxy.toml");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["--config", config.to_str().unwrap(), "user", "authorize", mail])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run postern user authorize");
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut shown = String::new();
    let code = loop {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the command ended before showing a code: {shown}");
        shown.push_str(&line);
        if let Some(code) = line.trim().strip_prefix("and enter the code ") {
            break code.to_owned();
        }
    };
    assert!(shown.contains("/device"), "the verification page is shown: {shown}");
    token_server().decide_device(&code, approve.then_some(mail));
    let status = child.wait().expect("wait");
    stdout.read_to_string(&mut shown).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, shown, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_is_enrolled_with_the_device_grant_then_used() {
    logs::capture();
    let mail = oauth::add_user("rt-device1", "dir-pw-d1");
    let extra = format!("device_authorization_url = \"{}/refresh/device\"", token_server().base_url);
    let proxy = OAuthProxy::start(Source::Refresh, &[&mail], &extra).await;
    // Denied at the page: nothing stored.
    let (status, _, stderr) = tokio::task::block_in_place(|| authorize(&proxy, &mail, false));
    assert!(!status.success() && stderr.contains("denied"), "{stderr}");
    assert_eq!(imap_login(&proxy, &mail, "dir-pw-d1").await, format!("a1 {DENIAL}"), "no credential yet");
    // Approved: the refresh token lands in the vault and logins trade it for access tokens.
    let (status, stdout, stderr) = tokio::task::block_in_place(|| authorize(&proxy, &mail, true));
    assert!(status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("stored the OAuth2 refresh token"), "{stdout}");
    let stored = proxy.stored_refresh_token(&mail);
    assert!(token_server().refresh_token_valid(&stored), "the stored token is the one the server issued");
    proxy.reload_vault();
    assert!(imap_login(&proxy, &mail, "dir-pw-d1").await.starts_with("a1 OK"));
    assert_no_secret_logged();
    proxy.stop().await;
}

/// The console's OAuth2 enrolment: an admin starts it from the users page, the page shows the
/// code, and once the mailbox's owner approves, the refresh token is in the vault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_enrols_a_refresh_token_from_the_console() {
    logs::capture();
    let mail = oauth::add_user("rt-console1", "dir-pw-c1");
    common::slapd::slapd().add_user("rt-console-admin", "rt-console-admin@example.com", "admin-pw-c1", &["rt-admins"]);
    let extra = format!("device_authorization_url = \"{}/refresh/device\"", token_server().base_url);
    let console = "\n[console]\nlisten = \"127.0.0.1:0\"\nadmin_groups = [\"rt-admins\"]\n";
    let proxy = OAuthProxy::start_edited(Source::Refresh, &[&mail], &extra, |text, _| {
        text.replace("\n[oauth]", &format!("{console}\n[oauth]"))
    })
    .await;
    let base = format!("https://127.0.0.1:{}", proxy.console.expect("the console listens").port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/browser/console_form.py");
    let run = tokio::process::Command::new("python3")
        .args([script, &base, "rt-console-admin@example.com", "admin-pw-c1", "/users/action", "op=authorize"])
        .arg(format!("user={mail}"))
        .output()
        .await
        .expect("run python3");
    let page = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(run.status.success(), "{page}{}", String::from_utf8_lossy(&run.stderr));
    let code = page
        .split("<pre class=\"secret\" id=\"secret\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .unwrap_or_else(|| panic!("no code on the page: {page}"))
        .to_owned();
    assert!(page.contains(&format!("/device?user_code={code}")), "the verification page is named: {page}");
    // A second enrolment of the same user while the first waits is refused.
    let again = tokio::process::Command::new("python3")
        .args([script, &base, "rt-console-admin@example.com", "admin-pw-c1", "/users/action", "op=authorize"])
        .arg(format!("user={mail}"))
        .output()
        .await
        .expect("run python3");
    let again = String::from_utf8_lossy(&again.stdout).into_owned();
    assert!(again.contains("already waiting for approval"), "{again}");
    token_server().decide_device(&code, Some(&mail));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let vault = postern::stores::vault::Vault::open(&proxy.state_dir()).expect("vault");
        if let Some(entry) = vault.get(&mail).expect("vault read") {
            break entry;
        }
        assert!(std::time::Instant::now() < deadline, "no refresh token stored within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(stored.kind, postern::stores::vault::SecretKind::RefreshToken);
    assert!(token_server().refresh_token_valid(stored.secret.expose()));
    logs::wait_for_line(&["console_authorize", &mail, "refresh token stored"]).await;
    assert!(imap_login(&proxy, &mail, "dir-pw-c1").await.starts_with("a1 OK"), "the console reloaded the vault");
    assert_no_secret_logged();
    proxy.stop().await;
}

//! Mail-client onboarding over real HTTPS: `curl` asks a running proxy the way Thunderbird,
//! Outlook and Safari do, and Python's own parsers (`xml.etree`, `plistlib`) read the answers.

use std::path::Path;

use serde_json::Value;

use crate::common::{self, logs, pki, proxy};
use proxy::{Options, Proxy};

/// A proxy (file directory) whose `[onboarding]` listener serves `domain`, with `extra` lines
/// in that table.
async fn proxy_serving(domain: &str, extra: &str) -> Proxy {
    let config_extra = format!(
        "[onboarding]\nlisten = \"127.0.0.1:0\"\nhost = \"mail-gw.example.com\"\ndomains = [{domain:?}]\n{extra}\n"
    );
    Proxy::start(Options { directory: proxy::Dir::File, config_extra, ..Options::default() }).await
}

/// An HTTP answer: status, headers (lower-case names) and body.
struct Answer {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `curl` over HTTPS to `path` on the proxy's onboarding listener (as `localhost`, which its
/// certificate names), with `args` before the URL; `body` is posted when given.
async fn curl(proxy: &Proxy, path: &str, args: &[&str], body: Option<&str>) -> Answer {
    common::require_binary("curl", "curl");
    let port = proxy.onboarding.expect("the proxy has an onboarding listener").port();
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "-i", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["--cacert", &proxy.ca_file.display().to_string()])
        .args(args);
    if let Some(body) = body {
        command.args(["-H", "Content-Type: text/xml", "--data-binary", body]);
    }
    let out = command.arg(format!("https://localhost:{port}{path}")).output().await.expect("run curl");
    assert!(out.status.success(), "curl failed: {}", String::from_utf8_lossy(&out.stderr));
    let split = out.stdout.windows(4).position(|w| w == b"\r\n\r\n").expect("a header block");
    let headers = String::from_utf8_lossy(&out.stdout[..split]).into_owned();
    let status = headers.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    Answer { status, headers, body: out.stdout[split + 4..].to_vec() }
}

/// Runs `script` under `python3` with `input` on stdin; its stdout as JSON.
async fn python_json(script: &str, input: &[u8]) -> Value {
    use tokio::io::AsyncWriteExt;
    common::require_binary("python3", "python3");
    let mut child = tokio::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run python3");
    child.stdin.take().expect("stdin").write_all(input).await.expect("write to python3");
    let out = child.wait_with_output().await.expect("python3 output");
    assert!(out.status.success(), "python3 could not parse it: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from python3")
}

/// The document parsed by Python's `xml.etree` as nested `{tag, ns, attrib, text, children}`.
async fn etree(body: &[u8]) -> Value {
    const SCRIPT: &str = r#"
import json, sys, xml.etree.ElementTree as ET
def conv(e):
    ns, _, tag = e.tag[1:].partition('}') if e.tag.startswith('{') else ('', '', e.tag)
    return {"tag": tag, "ns": ns, "attrib": e.attrib, "text": (e.text or "").strip(), "children": [conv(c) for c in e]}
print(json.dumps(conv(ET.fromstring(sys.stdin.buffer.read()))))
"#;
    python_json(SCRIPT, body).await
}

fn children<'a>(element: &'a Value, tag: &str) -> Vec<&'a Value> {
    element["children"].as_array().expect("children").iter().filter(|c| c["tag"] == tag).collect()
}

fn child<'a>(element: &'a Value, tag: &str) -> &'a Value {
    children(element, tag).into_iter().next().unwrap_or_else(|| panic!("no <{tag}> in {element}"))
}

fn text<'a>(element: &'a Value, tag: &str) -> &'a str {
    child(element, tag)["text"].as_str().expect("text")
}

#[tokio::test]
async fn autoconfig_names_the_bound_ports_and_socket_types_for_a_served_domain_only() {
    let proxy = proxy_serving("ac.example", "").await;
    let answer = curl(&proxy, "/mail/config-v1.1.xml?emailaddress=Alice%40AC.example", &[], None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(answer.header("content-type").unwrap().contains("xml"));
    let doc = etree(&answer.body).await;
    assert_eq!((doc["tag"].as_str(), doc["attrib"]["version"].as_str()), (Some("clientConfig"), Some("1.1")));
    let provider = child(&doc, "emailProvider");
    assert_eq!(provider["attrib"]["id"], "ac.example");
    assert_eq!(text(provider, "domain"), "ac.example");
    let listed = |element: &str| -> Vec<(String, u16, String)> {
        children(provider, element)
            .into_iter()
            .map(|s| {
                assert_eq!(text(s, "hostname"), "mail-gw.example.com");
                assert_eq!(text(s, "username"), "%EMAILADDRESS%");
                assert_eq!(text(s, "authentication"), "password-cleartext");
                let port = text(s, "port").parse().expect("a port number");
                (s["attrib"]["type"].as_str().unwrap().to_owned(), port, text(s, "socketType").to_owned())
            })
            .collect()
    };
    let entry = |kind: &str, port: u16, socket: &str| (kind.to_owned(), port, socket.to_owned());
    assert_eq!(
        listed("incomingServer"),
        [
            entry("imap", proxy.imaps.port(), "SSL"),
            entry("imap", proxy.imap_starttls.port(), "STARTTLS"),
            entry("pop3", proxy.pop3s.port(), "SSL"),
            entry("pop3", proxy.pop3_starttls.port(), "STARTTLS"),
        ]
    );
    assert_eq!(
        listed("outgoingServer"),
        [entry("smtp", proxy.smtps.port(), "SSL"), entry("smtp", proxy.smtp_starttls.port(), "STARTTLS")]
    );

    // Thunderbird's first try: no address, the domain from `autoconfig.<domain>`.
    let by_host = curl(&proxy, "/mail/config-v1.1.xml", &["-H", "Host: autoconfig.ac.example"], None).await;
    assert_eq!(by_host.status, 200, "{}", by_host.text());
    assert_eq!(child(&etree(&by_host.body).await, "emailProvider")["attrib"]["id"], "ac.example");
    let well_known = "/.well-known/autoconfig/mail/config-v1.1.xml?emailaddress=bob@ac.example";
    assert_eq!(curl(&proxy, well_known, &[], None).await.status, 200);

    // Any other domain gets nothing useful.
    for (path, args) in [
        ("/mail/config-v1.1.xml?emailaddress=alice@not-ac.example", &[][..]),
        ("/mail/config-v1.1.xml", &["-H", "Host: autoconfig.not-ac.example"][..]),
    ] {
        let other = curl(&proxy, path, args, None).await;
        assert_eq!(other.status, 404, "{path}");
        assert!(!other.text().contains("mail-gw") && !other.text().contains(&proxy.imaps.port().to_string()));
        assert!(other.text().contains("Ask your mail administrator"), "{}", other.text());
    }
    // Anything but a mail address is refused before use.
    let bad = curl(&proxy, "/mail/config-v1.1.xml?emailaddress=al%20ice%40ac.example", &[], None).await;
    assert_eq!(bad.status, 400);

    // Every request is logged with its domain and result, never the address.
    let line = logs::wait_for_line(&["onboarding request", "\"domain\":\"not-ac.example\"", "\"status\":404"]).await;
    assert!(line.contains("\"path\":\"/mail/config-v1.1.xml\"") && line.contains("127.0.0.1"), "{line}");
    let served = logs::wait_for_line(&["onboarding request", "\"domain\":\"ac.example\"", "\"status\":200"]).await;
    assert!(served.contains("\"result\":\"autoconfig\""), "{served}");
    let log = logs::all();
    let mut onboarding_lines = log.lines().filter(|l| l.contains("onboarding request"));
    assert!(onboarding_lines.all(|l| !l.contains("alice") && !l.contains("emailaddress")));
    proxy.stop().await;
}

fn pox_request(address: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\">\n<Request>\n<EMailAddress>{address}</EMailAddress>\n<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>\n</Request>\n</Autodiscover>\n"
    )
}

#[tokio::test]
async fn autodiscover_pox_gives_imap_pop3_and_smtp_ports_for_a_served_domain_and_an_error_for_others() {
    let proxy = proxy_serving("pox.example", "display_name = \"Pox & Co\"").await;
    for path in ["/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"] {
        let answer = curl(&proxy, path, &[], Some(&pox_request("carol@pox.example"))).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        let doc = etree(&answer.body).await;
        assert_eq!(doc["tag"], "Autodiscover");
        let response = child(&doc, "Response");
        assert_eq!(response["ns"], "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a");
        let account = child(response, "Account");
        assert_eq!((text(account, "AccountType"), text(account, "Action")), ("email", "settings"));
        let blocks: Vec<(String, u16, String, String)> = children(account, "Protocol")
            .into_iter()
            .map(|p| {
                assert_eq!(text(p, "Server"), "mail-gw.example.com");
                assert_eq!(text(p, "LoginName"), "carol@pox.example");
                assert_eq!((text(p, "SPA"), text(p, "AuthRequired")), ("off", "on"));
                let port = text(p, "Port").parse().expect("a port number");
                (text(p, "Type").to_owned(), port, text(p, "SSL").to_owned(), text(p, "Encryption").to_owned())
            })
            .collect();
        let block = |t: &str, port: u16| (t.to_owned(), port, "on".to_owned(), "SSL".to_owned());
        assert_eq!(
            blocks,
            [block("IMAP", proxy.imaps.port()), block("POP3", proxy.pop3s.port()), block("SMTP", proxy.smtps.port())]
        );
    }

    let other = curl(&proxy, "/autodiscover/autodiscover.xml", &[], Some(&pox_request("carol@not-pox.example"))).await;
    assert_eq!(other.status, 200);
    let body = other.text();
    let doc = etree(&other.body).await;
    assert_eq!(text(child(child(&doc, "Response"), "Error"), "ErrorCode"), "500");
    for port in [proxy.imaps.port(), proxy.pop3s.port(), proxy.smtps.port()] {
        assert!(!body.contains(&port.to_string()), "{body}");
    }
    assert!(!body.contains("mail-gw") && !body.contains("Protocol") && !body.contains("Server"), "{body}");

    // Malformed, entity-laden and oversized requests get an error, never settings.
    let entity = "<!DOCTYPE a [<!ENTITY e \"carol@pox.example\">]><Autodiscover><Request><EMailAddress>&e;</EMailAddress></Request></Autodiscover>";
    let big = pox_request(&format!("{}@pox.example", "x".repeat(9000)));
    for (request, status) in [("not xml", 400), (entity, 400), (big.as_str(), 413)] {
        let refused = curl(&proxy, "/autodiscover/autodiscover.xml", &[], Some(request)).await;
        assert_eq!(refused.status, status, "{}", refused.text());
        assert!(refused.text().contains("<ErrorCode>600</ErrorCode>") && !refused.text().contains("mail-gw"));
    }
    let get = curl(&proxy, "/autodiscover/autodiscover.xml", &[], None).await;
    assert_eq!(get.status, 405, "Autodiscover is a POST");
    let logged = logs::wait_for_line(&["onboarding request", "\"domain\":\"not-pox.example\"", "unknown domain"]).await;
    assert!(logged.contains("\"method\":\"POST\"") && !logged.contains("carol"), "{logged}");
    proxy.stop().await;
}

#[tokio::test]
async fn the_apple_profile_parses_with_plistlib_and_has_the_mail_payload() {
    let proxy = proxy_serving("apple.example", "").await;
    let answer = curl(&proxy, "/apple/mobileconfig?emailaddress=dave%40apple.example", &[], None).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type").as_deref(), Some("application/x-apple-aspen-config"));
    assert!(answer.header("content-disposition").unwrap().contains("apple.example.mobileconfig"));
    let script = "import json, plistlib, sys; print(json.dumps(plistlib.loads(sys.stdin.buffer.read())))";
    let profile = python_json(script, &answer.body).await;
    assert_eq!(profile["PayloadType"], "Configuration");
    assert_eq!(profile["PayloadVersion"], 1);
    let payloads = profile["PayloadContent"].as_array().expect("PayloadContent");
    assert_eq!(payloads.len(), 1);
    let mail = &payloads[0];
    assert_eq!(mail["PayloadType"], "com.apple.mail.managed");
    assert_eq!(mail["EmailAccountType"], "EmailTypeIMAP");
    assert_eq!(mail["EmailAddress"], "dave@apple.example");
    assert_eq!(mail["IncomingMailServerHostName"], "mail-gw.example.com");
    assert_eq!(mail["IncomingMailServerPortNumber"], proxy.imaps.port());
    assert_eq!(mail["IncomingMailServerUseSSL"], true);
    assert_eq!(mail["IncomingMailServerUsername"], "dave@apple.example");
    assert_eq!(mail["OutgoingMailServerHostName"], "mail-gw.example.com");
    assert_eq!(mail["OutgoingMailServerPortNumber"], proxy.smtps.port());
    assert_eq!(mail["OutgoingMailServerUseSSL"], true);
    assert_eq!(mail["OutgoingMailServerUsername"], "dave@apple.example");
    assert!(mail.get("IncomingPassword").is_none() && mail.get("OutgoingPassword").is_none(), "no password");
    assert_ne!(profile["PayloadUUID"], mail["PayloadUUID"]);
    assert!(profile["PayloadIdentifier"].as_str().unwrap().starts_with("com.example.mail-gw."));

    assert_eq!(curl(&proxy, "/apple/mobileconfig?emailaddress=dave@not-apple.example", &[], None).await.status, 404);
    assert_eq!(curl(&proxy, "/apple/mobileconfig", &[], None).await.status, 400, "the address is needed");
    assert_eq!(curl(&proxy, "/apple/mobileconfig?emailaddress=%3Cdave%3E", &[], None).await.status, 400);
    let page = curl(&proxy, "/", &[], None).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("action=\"/apple/mobileconfig\"") && !page.text().contains("password\""));
    assert!(page.header("content-security-policy").unwrap().contains("default-src 'none'"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429_with_retry_after() {
    let proxy = proxy_serving("rate.example", "max_requests_per_minute = 3").await;
    let path = "/mail/config-v1.1.xml?emailaddress=erin@rate.example";
    for _ in 0..3 {
        assert_eq!(curl(&proxy, path, &[], None).await.status, 200);
    }
    let limited = curl(&proxy, path, &[], None).await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    let retry: u64 = limited.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert!(limited.text().contains("Try again in"), "{}", limited.text());
    let pox = curl(&proxy, "/autodiscover/autodiscover.xml", &[], Some(&pox_request("erin@rate.example"))).await;
    assert_eq!(pox.status, 429, "every path shares the address's budget");
    logs::wait_for_line(&["onboarding request", "\"status\":429", "rate limited"]).await;
    proxy.stop().await;
}

/// The common name of the certificate the onboarding listener shows now.
async fn served_name(proxy: &Proxy) -> String {
    let tcp = tokio::net::TcpStream::connect(proxy.onboarding.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = common::client::tls_connector(&proxy.ca_file).connect(name, tcp).await.expect("TLS handshake");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap().to_owned()
}

#[tokio::test]
async fn an_own_certificate_is_served_and_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let first = pki::pki().issue_in("onboarding-first", dir.path());
    let (cert, key) = (dir.path().join("web.crt"), dir.path().join("web.key"));
    let install = |from: &pki::Issued| {
        std::fs::copy(&from.cert_file, &cert).unwrap();
        std::fs::copy(&from.key_file, &key).unwrap();
    };
    install(&first);
    let extra = format!("cert = {:?}\nkey = {:?}", cert.display().to_string(), key.display().to_string());
    let proxy = proxy_serving("cert.example", &extra).await;
    assert_eq!(served_name(&proxy).await, "onboarding-first");
    install(&pki::pki().issue_in("onboarding-second", Path::new(dir.path())));
    proxy.reload_all().await;
    assert_eq!(served_name(&proxy).await, "onboarding-second", "the reload put the new certificate in force");
    proxy.stop().await;
}

#[test]
fn postern_check_reports_the_onboarding_listener_and_refuses_an_unusable_certificate() {
    use crate::install::{Install, expect_code, profiles_for, text};
    let table = "[onboarding]\nlisten = \"127.0.0.1:443\"\ndomains = [\"check.example\"]\n";
    let i = Install::new(&profiles_for(&["alice@example.com"]), "", table);
    let out = expect_code(&i.run(&["check"], ""), 0);
    assert!(
        out.contains("onboarding: https://127.0.0.1:443 for check.example -> clients told to use proxy.test"),
        "{out}"
    );
    assert!(out.contains("CAP_NET_BIND_SERVICE"), "{out}");
    let missing = Install::new(
        &profiles_for(&["alice@example.com"]),
        "",
        &format!("{table}cert = \"missing.pem\"\nkey = \"missing.key\"\n"),
    );
    let output = missing.run(&["check"], "");
    expect_code(&output, 1);
    let (_, stderr) = text(&output);
    assert!(stderr.contains("onboarding certificate") && stderr.contains("missing.pem"), "{stderr}");
}

#[tokio::test]
async fn one_client_holding_64_idle_connections_does_not_lock_others_out_of_onboarding() {
    // The public listener serves 64 connections at once, whoever holds them; a connection
    // that never starts TLS keeps its slot for the whole handshake deadline (10 s), and one
    // address can open them again and again. The rate limit counts requests, not connections.
    let proxy = proxy_serving("slots.example", "").await;
    let address = proxy.onboarding.unwrap();
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(tokio::net::TcpStream::connect(address).await.expect("connect"));
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    // Another client, from another address.
    let handshake = async {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().unwrap()).expect("bind 127.0.0.2");
        let tcp = socket.connect(address).await.expect("connect");
        common::client::tls_connector(&proxy.ca_file).connect(name, tcp).await
    };
    let answered = tokio::time::timeout(std::time::Duration::from_secs(3), handshake).await;
    assert!(
        matches!(answered, Ok(Ok(_))),
        "another client got no TLS handshake within 3 s while one client held 64 idle connections"
    );
    drop(idle);
    proxy.stop().await;
}

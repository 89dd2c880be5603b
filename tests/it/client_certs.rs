//! Client certificates end to end: `postern ca init` / `cert issue` / `cert revoke` run as
//! the admin would, curl and Python's `ssl` as the mail clients (with and without the
//! issued certificate, from an allowed address and from 127.0.0.2, which no profile
//! lists), real slapd and Dovecot behind; every refusal's audit reason is checked.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common;

use common::logs;
use common::proxy::{self, Options, Proxy, TestUser};

const ELSEWHERE: &str = "127.0.0.2";

/// A certificate and key in PEM files, as a mail client would use them.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// What `postern cert issue` printed and wrote.
struct Issued {
    p12: PathBuf,
    password: String,
    serial: String,
}

fn postern(proxy: &Proxy, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("--config")
        .arg(&proxy.config_path)
        .args(args)
        .output()
        .expect("run postern")
}

fn postern_ok(proxy: &Proxy, args: &[&str]) -> String {
    let out = postern(proxy, args);
    assert!(out.status.success(), "postern {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn scratch(proxy: &Proxy) -> PathBuf {
    proxy.config_path.parent().unwrap().to_owned()
}

/// `postern cert issue USER --out USER.p12`, with the password and serial read from its output.
fn issue(proxy: &Proxy, user: &str) -> Issued {
    let p12 = scratch(proxy).join(format!("{user}.p12"));
    let out = postern_ok(proxy, &["cert", "issue", user, "--out", p12.to_str().unwrap(), "--days", "30"]);
    let after = |prefix: &str| {
        out.lines()
            .find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.to_owned()))
            .unwrap_or_else(|| panic!("no {prefix:?} in {out}"))
    };
    let password = after("): ");
    let serial = after("serial ").split(',').next().unwrap().to_owned();
    Issued { p12, password, serial }
}

/// Unpacks a PKCS#12 file with `openssl pkcs12`, as an admin checking it would.
fn unpack(issued: &Issued) -> Pem {
    common::require_binary("openssl", "openssl");
    let cert = issued.p12.with_extension("crt.pem");
    let key = issued.p12.with_extension("key.pem");
    let pass = format!("pass:{}", issued.password);
    for (what, path) in [(&["-clcerts", "-nokeys"][..], &cert), (&["-nocerts", "-nodes"][..], &key)] {
        let out = Command::new("openssl")
            .args(["pkcs12", "-in", issued.p12.to_str().unwrap(), "-passin", &pass, "-out", path.to_str().unwrap()])
            .args(what)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl pkcs12 {what:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Pem { cert, key }
}

/// Writes a certificate the proxy's CA issued outside the admin command (e.g. one that has
/// already expired).
fn issue_with_library(state_dir: &Path, user: &str, from_days: i64, to_days: i64, dir: &Path) -> Pem {
    let mut ca = postern::stores::ca::Ca::open(state_dir).expect("open the CA");
    let now = time::OffsetDateTime::now_utc();
    let issued =
        ca.issue(user, now + time::Duration::days(from_days), now + time::Duration::days(to_days)).expect("issue");
    let (cert, key) = (dir.join(format!("{}.crt.pem", issued.serial)), dir.join(format!("{}.key.pem", issued.serial)));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    Pem { cert, key }
}

fn profiles(kind: &str, users: &[&str]) -> String {
    let users: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    format!(
        "[[profile]]\nname = \"office\"\nallow = [\"127.0.0.1/32\"]\nusers = [{}]\nclient_cert = \"{kind}\"\n",
        users.join(", ")
    )
}

async fn proxy_with(kind: &str, uids: &[&str]) -> Proxy {
    logs::capture();
    let mails: Vec<String> = uids.iter().map(|u| format!("{u}@example.com")).collect();
    let mails: Vec<&str> = mails.iter().map(String::as_str).collect();
    Proxy::start(Options { profiles: profiles(kind, &mails), client_certs: true, ..Options::default() }).await
}

/// curl against one of the proxy's implicit TLS ports; true when the transfer (login
/// included) succeeded.
async fn curl(proxy: &Proxy, scheme: &str, user: &TestUser, from: Option<&str>, pem: Option<&Pem>) -> bool {
    common::require_binary("curl", "curl");
    let port = match scheme {
        "imaps" => proxy.imaps.port(),
        "pop3s" => proxy.pop3s.port(),
        _ => proxy.smtps.port(),
    };
    let mut command = tokio::process::Command::new("curl");
    command
        .args(["-sS", "--max-time", "20", "--resolve", &format!("localhost:{port}:127.0.0.1")])
        .args(["--cacert", proxy.ca_file.to_str().unwrap()])
        .args(["--user", &format!("{}:{}", user.mail, user.password)]);
    if let Some(from) = from {
        command.args(["--interface", from]);
    }
    if let Some(pem) = pem {
        command.args(["--cert", pem.cert.to_str().unwrap(), "--key", pem.key.to_str().unwrap()]);
    }
    if scheme == "smtps" {
        let message = scratch(proxy).join(format!("{}.eml", user.mail));
        std::fs::write(&message, format!("From: {0}\r\nTo: {0}\r\nSubject: cert\r\n\r\nhello\r\n", user.mail)).unwrap();
        command
            .args(["--mail-from", &user.mail, "--mail-rcpt", &user.mail, "--upload-file"])
            .arg(&message)
            .arg(format!("smtps://localhost:{port}"));
    } else {
        command.arg(format!("{scheme}://localhost:{port}/"));
    }
    command.output().await.expect("run curl").status.success()
}

/// Python's `ssl` module as an IMAP client: TLS (with the certificate when given) from
/// `from`, one LOGIN; returns the tagged answer.
async fn python_login(proxy: &Proxy, user: &TestUser, from: &str, pem: Option<&Pem>) -> String {
    common::require_binary("python3", "python3");
    let script = r#"
import socket, ssl, sys
port, ca, source, user, password, cert, key = sys.argv[1:8]
ctx = ssl.create_default_context(cafile=ca)
if cert:
    ctx.load_cert_chain(cert, key)
raw = socket.create_connection(("127.0.0.1", int(port)), timeout=20, source_address=(source, 0))
tls = ctx.wrap_socket(raw, server_hostname="localhost")
f = tls.makefile("rwb")
f.readline()
f.write(b'a1 LOGIN "' + user.encode() + b'" "' + password.encode() + b'"\r\n')
f.flush()
while True:
    line = f.readline()
    if not line or line.startswith(b"a1 "):
        print(line.decode().strip() or "closed")
        break
"#;
    let (cert, key) = match pem {
        Some(p) => (p.cert.display().to_string(), p.key.display().to_string()),
        None => (String::new(), String::new()),
    };
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &proxy.imaps.port().to_string(), proxy.ca_file.to_str().unwrap(), from])
        .args([&user.mail, &user.password, &cert, &key])
        .output()
        .await
        .expect("run python3");
    assert!(out.status.success(), "python ssl client: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn required_needs_the_allowed_address_and_the_users_certificate() {
    let proxy = proxy_with("required", &["certreq1"]).await;
    let user = proxy::add_user(&proxy, "certreq1", "cert-req-pw");
    let issued = issue(&proxy, &user.mail);
    let pem = unpack(&issued);

    for scheme in ["imaps", "pop3s", "smtps"] {
        assert!(curl(&proxy, scheme, &user, None, Some(&pem)).await, "{scheme} with the certificate");
    }
    let audit = logs::wait_for_audit(&user.mail, &["\"outcome\":\"logged-in\"", &issued.serial]).await;
    assert!(audit.contains("\"profile\":\"office (127.0.0.1/32 + certificate)\""), "{audit}");
    assert!(audit.contains("\"certificate\":\"sha256="), "{audit}");

    assert!(!curl(&proxy, "imaps", &user, None, None).await, "no certificate");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client certificate missing\""]).await;
    assert!(!curl(&proxy, "imaps", &user, Some(ELSEWHERE), Some(&pem)).await, "certificate from elsewhere");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client IP not in any profile\"", ELSEWHERE]).await;
}

#[tokio::test]
async fn alternative_takes_the_certificate_from_anywhere_or_the_address_alone() {
    let proxy = proxy_with("alternative", &["certalt1"]).await;
    let user = proxy::add_user(&proxy, "certalt1", "cert-alt-pw");
    let issued = issue(&proxy, &user.mail);
    let pem = unpack(&issued);

    let answer = python_login(&proxy, &user, ELSEWHERE, Some(&pem)).await;
    assert!(answer.starts_with("a1 OK"), "certificate from an unlisted address: {answer}");
    let audit = logs::wait_for_audit(&user.mail, &["\"profile\":\"office (certificate)\"", &issued.serial]).await;
    assert!(audit.contains(ELSEWHERE), "{audit}");
    assert!(curl(&proxy, "imaps", &user, Some(ELSEWHERE), Some(&pem)).await, "curl, certificate from elsewhere");

    let answer = python_login(&proxy, &user, "127.0.0.1", None).await;
    assert!(answer.starts_with("a1 OK"), "no certificate from the listed address: {answer}");
    logs::wait_for_audit(&user.mail, &["\"profile\":\"office (127.0.0.1/32)\"", "\"certificate\":\"-\""]).await;

    let answer = python_login(&proxy, &user, ELSEWHERE, None).await;
    assert!(answer.contains("You are not allowed to access this server"), "{answer}");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client IP not in any profile\"", ELSEWHERE]).await;
}

#[tokio::test]
async fn a_certificate_for_alice_never_lets_bob_in() {
    let proxy = proxy_with("alternative", &["certalice1", "certbob1"]).await;
    let alice = proxy::add_user(&proxy, "certalice1", "alice-pw");
    let bob = proxy::add_user(&proxy, "certbob1", "bob-pw");
    let alices = unpack(&issue(&proxy, &alice.mail));

    let answer = python_login(&proxy, &bob, ELSEWHERE, Some(&alices)).await;
    assert!(answer.contains("You are not allowed to access this server"), "{answer}");
    logs::wait_for_audit(&bob.mail, &["\"reason\":\"client certificate names another user\""]).await;

    proxy.set_profiles(&profiles("required", &[&alice.mail, &bob.mail]));
    assert!(!curl(&proxy, "imaps", &bob, None, Some(&alices)).await);
    let audit =
        logs::wait_for_audit(&bob.mail, &["\"reason\":\"client certificate names another user\"", "127.0.0.1"]).await;
    assert!(audit.contains("\"certificate\":\"sha256="), "the refused certificate is named: {audit}");
    assert!(curl(&proxy, "imaps", &alice, None, Some(&alices)).await, "alice with her own");
}

#[tokio::test]
async fn revoked_expired_and_foreign_certificates_are_refused_with_their_reason() {
    let proxy = proxy_with("required", &["certrev1"]).await;
    let user = proxy::add_user(&proxy, "certrev1", "cert-rev-pw");
    let issued = issue(&proxy, &user.mail);
    let pem = unpack(&issued);
    assert!(curl(&proxy, "imaps", &user, None, Some(&pem)).await, "valid before the revocation");

    let out = postern_ok(&proxy, &["cert", "revoke", &issued.serial]);
    assert!(out.contains("revoked serial") && out.contains("reload"), "{out}");
    // The daemon watches the CRL file: the new one applies within a couple of seconds.
    logs::wait_for_line(&["applied the changed client CA or CRL"]).await;
    assert!(!curl(&proxy, "imaps", &user, None, Some(&pem)).await, "revoked");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client certificate revoked\"", &issued.serial]).await;
    proxy.reload_all().await;
    assert!(!curl(&proxy, "imaps", &user, None, Some(&pem)).await, "still revoked after a reload (SIGHUP)");
    let list = postern_ok(&proxy, &["cert", "list"]);
    assert!(list.lines().any(|l| l.contains(&issued.serial) && l.contains("revoked")), "{list}");

    // A broken CRL on reload keeps the one in force, and says which file is wrong.
    let crl = proxy.state_dir().join("ca/crl.pem");
    let good = std::fs::read(&crl).unwrap();
    std::fs::write(&crl, "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n").unwrap();
    let err = proxy.try_reload_all().await.expect_err("a broken CRL fails the reload").to_string();
    assert!(err.contains("crl.pem"), "{err}");
    assert!(!curl(&proxy, "imaps", &user, None, Some(&pem)).await, "still revoked after the failed reload");
    std::fs::write(&crl, good).unwrap();

    let dir = scratch(&proxy);
    let expired = issue_with_library(&proxy.state_dir(), &user.mail, -30, -1, &dir);
    assert!(!curl(&proxy, "imaps", &user, None, Some(&expired)).await, "expired");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client certificate expired\""]).await;

    let stranger_dir = tempfile::tempdir().unwrap();
    postern::stores::ca::Ca::init(stranger_dir.path(), "Test client CA", 30).unwrap();
    let foreign = issue_with_library(stranger_dir.path(), &user.mail, -1, 30, &dir);
    assert!(!curl(&proxy, "imaps", &user, None, Some(&foreign)).await, "same CA name, other key");
    logs::wait_for_audit(&user.mail, &["\"reason\":\"client certificate from an unknown CA or with a bad chain\""])
        .await;
}

async fn certificate_login(proxy: &Proxy, pem: &Pem, user: &TestUser) -> common::client::MailClient {
    let mut c = common::client::connect_tls_with_certificate(proxy.imaps, &proxy.ca_file, &pem.cert, &pem.key).await;
    assert!(c.read_line().await.starts_with("* OK"));
    let answer = c.tagged("a", &format!("LOGIN {} {}", user.mail, user.password)).await;
    assert!(answer.starts_with("a OK"), "{answer}");
    c
}

/// A session logged in with a certificate is closed when the certificate is revoked (the CRL
/// file changes, the daemon applies it and re-checks live sessions); another user's session
/// stays.
#[tokio::test]
async fn revoking_a_certificate_closes_the_live_session_it_opened() {
    let proxy = proxy_with("required", &["certlive1", "certlive2"]).await;
    let user = proxy::add_user(&proxy, "certlive1", "cert-live-pw");
    let other = proxy::add_user(&proxy, "certlive2", "cert-live-pw2");
    let (issued, other_issued) = (issue(&proxy, &user.mail), issue(&proxy, &other.mail));
    let (pem, other_pem) = (unpack(&issued), unpack(&other_issued));
    let mut revoked = certificate_login(&proxy, &pem, &user).await;
    let mut kept = certificate_login(&proxy, &other_pem, &other).await;
    postern_ok(&proxy, &["cert", "revoke", &issued.serial]);
    logs::wait_for_line(&["applied the changed client CA or CRL"]).await;
    revoked.expect_closed().await;
    logs::wait_for_audit(&user.mail, &["client certificate revoked", "closed"]).await;
    assert!(kept.tagged("n", "NOOP").await.starts_with("n OK"), "the other user's session stays");
}

#[tokio::test]
async fn the_pkcs12_file_is_private_and_opens_with_openssl_and_python() {
    use std::os::unix::fs::PermissionsExt;
    let proxy = proxy_with("alternative", &["certp12"]).await;
    let issued = issue(&proxy, "CertP12@Example.com");
    assert_eq!(std::fs::metadata(&issued.p12).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(issued.password.len() >= 20, "{}", issued.password);
    unpack(&issued);
    let wrong = Command::new("openssl")
        .args(["pkcs12", "-in", issued.p12.to_str().unwrap(), "-passin", "pass:wrong", "-nokeys"])
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "the password protects it");

    common::require_binary("python3", "python3");
    let script = r#"
import sys
try:
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography import x509
except ImportError:
    sys.exit("python3 cannot import cryptography: install the Debian package python3-cryptography")
key, cert, extra = pkcs12.load_key_and_certificates(open(sys.argv[1], "rb").read(), sys.argv[2].encode())
assert key.public_key().public_numbers() == cert.public_key().public_numbers()
san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
print(",".join(san.get_values_for_type(x509.RFC822Name)), format(cert.serial_number, "x"), len(extra))
"#;
    let out = Command::new("python3")
        .args(["-c", script, issued.p12.to_str().unwrap(), &issued.password])
        .output()
        .expect("run python3");
    assert!(out.status.success(), "python pkcs12: {}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        printed.trim(),
        format!("certp12@example.com {} 1", issued.serial),
        "email SAN, serial, CA in the chain"
    );

    let again = postern(&proxy, &["ca", "init"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));
    let out = postern(&proxy, &["cert", "issue", "certp12@example.com", "--out", issued.p12.to_str().unwrap()]);
    assert!(!out.status.success(), "an issued file is never overwritten");
    let logs = logs::all();
    assert!(!logs.contains(&issued.password), "the PKCS#12 password is never logged");
}

#[tokio::test]
async fn access_explain_names_each_profiles_certificate_requirement() {
    let proxy = proxy_with("alternative", &["certexplain1"]).await;
    let user = proxy::add_user(&proxy, "certexplain1", "explain-pw");
    let pem = unpack(&issue(&proxy, &user.mail));
    let out = postern_ok(&proxy, &["access", "explain", &user.mail, ELSEWHERE]);
    assert!(out.contains("client certificate alternative"), "{out}");
    assert!(out.contains("only a valid certificate naming the user gets past this"), "{out}");
    assert!(out.contains("decision without a certificate: refused: client IP not allowed"), "{out}");
    assert!(out.contains("decision with a valid certificate for certexplain1@example.com: allowed by profile \"office\" (certificate)"), "{out}");
    let out = postern_ok(&proxy, &["access", "explain", &user.mail, ELSEWHERE, "--cert", pem.cert.to_str().unwrap()]);
    assert!(out.contains("valid for certexplain1@example.com"), "{out}");
    assert!(out.contains("decision with this certificate: allowed by profile \"office\" (certificate)"), "{out}");
    let out = postern_ok(
        &proxy,
        &["access", "explain", "someone@example.com", ELSEWHERE, "--cert", pem.cert.to_str().unwrap()],
    );
    assert!(out.contains("refused: client certificate names another user"), "{out}");
}

//! A throw-away Postern installation for tests that run the real `postern` binary: a temp
//! folder with a config (file directory, IMAP to the shared Dovecot), certificate from the
//! test CA, profiles, vault and audit file, plus helpers to run commands and the daemon.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern::secret::Secret;
use postern::stores::vault::{UpstreamSecret, Vault};

use crate::common::{dovecot, pki};

/// The binary under test.
pub const POSTERN: &str = env!("CARGO_BIN_EXE_postern");

/// A temp folder holding a complete configuration.
pub struct Install {
    /// The folder.
    pub dir: tempfile::TempDir,
    /// `proxy.toml`.
    pub config: PathBuf,
    /// The CA clients must trust.
    pub ca_file: PathBuf,
}

/// A profiles file allowing `users` from 127.0.0.1.
pub fn profiles_for(users: &[&str]) -> String {
    let users: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    format!("[[profile]]\nname = \"loopback\"\nallow = [\"127.0.0.1/32\"]\nusers = [{}]\n", users.join(", "))
}

impl Install {
    /// Creates the installation; `extra` is appended to the config (e.g. `[metrics]`).
    pub fn new(profiles: &str, server_extra: &str, extra: &str) -> Install {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let issued = pki::pki().issue_in("proxy", d);
        let dovecot = dovecot::dovecot();
        let text = format!(
            r#"[server]
hostname = "proxy.test"
state_dir = "state"
{server_extra}

[tls]
cert = {cert:?}
key = {key:?}

[limits]
upstream_timeout_secs = 5

[directory]
kind = "file"
path = "users.toml"

[access]
profiles = "profiles.toml"

[audit]
format = "json"
file = "audit.jsonl"

[imap]
listen = ["127.0.0.1:0"]
upstream = "localhost:{port}"
upstream_ca_file = {ca:?}
{extra}
"#,
            cert = issued.cert_file.display().to_string(),
            key = issued.key_file.display().to_string(),
            port = dovecot.imaps.port(),
            ca = dovecot.ca_file.display().to_string(),
        );
        let config = d.join("proxy.toml");
        std::fs::write(&config, text).expect("write config");
        std::fs::set_permissions(&issued.key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod key");
        std::fs::write(d.join("profiles.toml"), profiles).expect("write profiles");
        std::fs::write(d.join("users.toml"), "").expect("write users");
        std::fs::set_permissions(d.join("users.toml"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod users");
        Vault::init(&d.join("state")).expect("vault init");
        Install { dir, config, ca_file: pki::pki().ca_file.clone() }
    }

    /// The config file's text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    /// A path inside the installation.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Creates `mail` with directory password `password` and a Dovecot account whose
    /// password is stored in the vault.
    pub fn add_user(&self, mail: &str, password: &str) {
        postern::stores::directory::file::set_password(&self.path("users.toml"), mail, &Secret::new(password))
            .expect("set password");
        let upstream = format!("up-{mail}-Qw7");
        dovecot::dovecot().add_user(mail, &upstream);
        self.set_upstream(mail, &upstream);
    }

    /// Stores `password` as `mail`'s upstream credential.
    pub fn set_upstream(&self, mail: &str, password: &str) {
        let mut vault = Vault::open(&self.path("state")).expect("vault");
        vault.set(mail, UpstreamSecret::password(Secret::new(password))).expect("vault set");
    }

    /// Runs `postern --config <config> args...` with `stdin`.
    pub fn run(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(POSTERN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env("POSTERN_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run postern");
        let mut input = child.stdin.take().expect("stdin");
        let _ = input.write_all(stdin.as_bytes());
        drop(input);
        child.wait_with_output().expect("postern output")
    }
}

/// Text of an output's stdout and stderr.
pub fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Asserts the exit code and returns stdout.
#[track_caller]
pub fn expect_code(output: &Output, code: i32) -> String {
    let (out, err) = text(output);
    assert_eq!(output.status.code(), Some(code), "stdout:\n{out}\nstderr:\n{err}");
    out
}

/// `postern serve` running as a child process, watched over `NOTIFY_SOCKET` and its log.
pub struct Daemon {
    child: Child,
    notify: UnixDatagram,
    log: Arc<Mutex<Vec<String>>>,
    /// The IMAPS address.
    pub imaps: SocketAddr,
    /// The metrics address, if configured.
    pub metrics: Option<SocketAddr>,
}

impl Daemon {
    /// Starts the daemon and waits for `READY=1`.
    pub fn start(install: &Install) -> Daemon {
        Daemon::start_logging(install, "info")
    }

    /// Like [`Daemon::start`], logging at `level` (`POSTERN_LOG`), e.g. `trace`.
    pub fn start_logging(install: &Install, level: &str) -> Daemon {
        let socket_path = install.path("notify.sock");
        let _ = std::fs::remove_file(&socket_path);
        let notify = UnixDatagram::bind(&socket_path).expect("bind notify socket");
        notify.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut child = Command::new(POSTERN)
            .arg("--config")
            .arg(&install.config)
            .arg("serve")
            .env("NOTIFY_SOCKET", &socket_path)
            .env("POSTERN_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postern serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut daemon = Daemon { child, notify, log, imaps: "0.0.0.0:0".parse().unwrap(), metrics: None };
        daemon.expect_notify("READY=1");
        let address = |line: String| -> Option<SocketAddr> {
            let v: serde_json::Value = serde_json::from_str(&line).ok()?;
            v["address"].as_str()?.parse().ok()
        };
        daemon.imaps = address(daemon.wait_for_log(&["\"listening\""])).expect("listening address logged");
        if install.config_text().contains("[metrics]") {
            daemon.metrics = address(daemon.wait_for_log(&["serving metrics"]));
        }
        daemon
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "HUP", "TERM").
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for a notification datagram containing `needle`; returns it.
    #[track_caller]
    pub fn expect_notify(&mut self, needle: &str) -> String {
        let mut buf = [0u8; 4096];
        loop {
            let n = match self.notify.recv(&mut buf) {
                Ok(n) => n,
                Err(e) => panic!("no `{needle}` notification: {e}; log:\n{}", self.log()),
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message.contains(needle) {
                return message;
            }
        }
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until the log has a line containing every one of `needles`.
    #[track_caller]
    pub fn wait_for_log(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.clone();
            }
            assert!(Instant::now() < deadline, "no log line with {needles:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (up to `timeout`) for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Scrapes `GET /metrics` with a plain HTTP/1.1 request.
pub fn scrape(address: SocketAddr) -> String {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(address).expect("connect metrics");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

/// Reads the audit file's lines.
pub fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

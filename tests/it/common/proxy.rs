//! Postern itself, started in-process for a test: its own temp folder, config, vault and
//! certificate from the test CA, listeners on free loopback ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use postern::config::Config;
use postern::daemon::{self, Running};
use postern::protocol::Protocol;
use postern::secret::Secret;
use postern::state::State;
use postern::stores::vault::{UpstreamSecret, Vault};

use super::{dovecot, pki, slapd};

/// Where the proxy checks passwords.
pub enum Dir {
    /// The shared test slapd, searched with the service account over plain LDAP.
    Ldap,
    /// An LDAP URL nothing listens on: the directory is down.
    LdapDown,
    /// The test slapd with the password policy overlay, like [`Dir::Ldap`].
    LdapPpolicy,
    /// The embedded users file (filled with [`Proxy::set_file_password`]).
    File,
}

/// How a test wants its proxy.
pub struct Options {
    /// The directory.
    pub directory: Dir,
    /// The profiles file's text.
    pub profiles: String,
    /// Point the upstreams at a closed port instead of Dovecot.
    pub upstream_down: bool,
    /// Use Dovecot's STARTTLS submission port for SMTP.
    pub smtp_starttls: bool,
    /// Extra `[limits]` lines.
    pub limits: String,
    /// The `[lockout]` table's lines; by default no refusal delay, so tests stay fast.
    pub lockout: String,
    /// Extra lines for the `[imap]` table.
    pub imap_extra: String,
    /// Leave out the test CA for the upstreams (system roots only).
    pub no_upstream_ca: bool,
    /// The `[state]` table's lines (empty: the memory backend).
    pub state: String,
    /// The upstream Dovecot (default: the shared one).
    pub dovecot: Option<&'static dovecot::Dovecot>,
    /// Extra lines for each of the `[imap]`, `[pop3]` and `[smtp]` tables.
    pub protocol_extra: String,
    /// Extra lines for the `[directory]` table.
    pub directory_extra: String,
    /// The `[alerts]` table's lines (empty: no webhooks).
    pub alerts: String,
    /// The proxy's certificate expires at midnight (UTC) starting this date (year, month,
    /// day); by default it is valid for decades.
    pub cert_not_after: Option<(i32, u8, u8)>,
    /// Lines appended at the end of the config (`[[route]]`, `[oauth.NAME]` tables).
    pub config_extra: String,
    /// Create a client CA with `postern ca init` in the state folder before starting, and
    /// point `[tls] client_ca` and `client_crl` at it.
    pub client_certs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            directory: Dir::Ldap,
            profiles: String::new(),
            upstream_down: false,
            smtp_starttls: false,
            limits: String::new(),
            lockout: "failure_delay_ms = 0".to_owned(),
            imap_extra: String::new(),
            no_upstream_ca: false,
            state: String::new(),
            dovecot: None,
            protocol_extra: String::new(),
            directory_extra: String::new(),
            alerts: String::new(),
            cert_not_after: None,
            config_extra: String::new(),
            client_certs: false,
        }
    }
}

/// A profiles file with one profile allowing `users` from 127.0.0.1 only.
pub fn profile_for(users: &[&str]) -> String {
    let users: Vec<String> = users.iter().map(|u| format!("{u:?}")).collect();
    format!("[[profile]]\nname = \"loopback\"\nallow = [\"127.0.0.1/32\"]\nusers = [{}]\n", users.join(", "))
}

/// A running proxy.
pub struct Proxy {
    /// Bound IMAPS address.
    pub imaps: SocketAddr,
    /// Bound POP3S address.
    pub pop3s: SocketAddr,
    /// Bound SMTPS address.
    pub smtps: SocketAddr,
    /// Bound IMAP STARTTLS address.
    pub imap_starttls: SocketAddr,
    /// Bound POP3 STLS address.
    pub pop3_starttls: SocketAddr,
    /// Bound SMTP submission STARTTLS address.
    pub smtp_starttls: SocketAddr,
    /// Bound onboarding (HTTPS) address, when the config has an `[onboarding]` table.
    pub onboarding: Option<SocketAddr>,
    /// The CA clients must trust.
    pub ca_file: PathBuf,
    /// The config file.
    pub config_path: PathBuf,
    /// The upstream Dovecot.
    pub dovecot: &'static dovecot::Dovecot,
    /// The admin console's address, when the config has a `[console]` table.
    pub console: Option<SocketAddr>,
    config: Config,
    server: Arc<State>,
    running: Option<Running>,
    /// Ports standing for a down directory or upstream, held while the proxy runs.
    _closed: Vec<super::ClosedPort>,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts a proxy as `options` say.
    pub async fn start(options: Options) -> Proxy {
        // Everything an in-process proxy logs is captured, so every test's logs are searched
        // by the secret checks.
        super::logs::capture();
        let dir = tempfile::tempdir().expect("proxy temp dir");
        let d = dir.path();
        let pki = pki::pki();
        let issued = pki.issue_until("proxy", d, options.cert_not_after);
        let dovecot = options.dovecot.unwrap_or_else(dovecot::dovecot);
        let mut closed = Vec::new();
        let mut closed_port = || {
            let port = super::closed_port();
            let number = port.port;
            closed.push(port);
            number
        };
        let directory = match options.directory {
            Dir::Ldap | Dir::LdapDown | Dir::LdapPpolicy => {
                let s = match options.directory {
                    Dir::LdapPpolicy => slapd::slapd_with_ppolicy(),
                    _ => slapd::slapd(),
                };
                let url = match options.directory {
                    Dir::LdapDown => format!("ldap://127.0.0.1:{}", closed_port()),
                    _ => s.url.clone(),
                };
                format!(
                    "kind = \"ldap\"\nurl = {url:?}\nbind_dn = {:?}\nbind_password = {:?}\nbase_dn = {:?}\nfilter = \"(mail={{user}})\"\ntimeout_secs = 3\n{}\n",
                    s.service_dn, s.service_password, s.base_dn, options.directory_extra
                )
            }
            Dir::File => "kind = \"file\"\npath = \"users.toml\"\n".to_owned(),
        };
        let mut upstream = |addr: SocketAddr| {
            if options.upstream_down {
                format!("127.0.0.1:{}", closed_port())
            } else {
                format!("localhost:{}", addr.port())
            }
        };
        let smtp_upstream = if options.smtp_starttls { dovecot.submission_starttls } else { dovecot.submissions };
        let smtp_tls = if options.smtp_starttls { "starttls" } else { "implicit" };
        let ca = if options.no_upstream_ca {
            String::new()
        } else {
            format!("upstream_ca_file = {:?}", dovecot.ca_file.display().to_string())
        };
        let text = format!(
            r#"
[server]
hostname = "proxy.test"
state_dir = "state"
shutdown_grace_secs = 2

[tls]
cert = {cert:?}
key = {key:?}
{client_ca}

[limits]
upstream_timeout_secs = 5
{limits}

[lockout]
{lockout}

[state]
{state}

[alerts]
{alerts}

[directory]
{directory}

[access]
profiles = "profiles.toml"

[imap]
listen = ["127.0.0.1:0"]
starttls_listen = ["127.0.0.1:0"]
upstream = "{imap}"
{ca}
{imap_extra}
{protocol_extra}

[pop3]
listen = ["127.0.0.1:0"]
starttls_listen = ["127.0.0.1:0"]
upstream = "{pop3}"
{ca}
{protocol_extra}

[smtp]
listen = ["127.0.0.1:0"]
starttls_listen = ["127.0.0.1:0"]
upstream = "{smtp}"
upstream_tls = "{smtp_tls}"
{ca}
{protocol_extra}

{config_extra}
"#,
            config_extra = options.config_extra,
            protocol_extra = options.protocol_extra,
            client_ca = if options.client_certs {
                "client_ca = \"state/ca/ca.pem\"\nclient_crl = \"state/ca/crl.pem\""
            } else {
                ""
            },
            cert = issued.cert_file.display().to_string(),
            key = issued.key_file.display().to_string(),
            limits = options.limits,
            lockout = options.lockout,
            state = options.state,
            alerts = options.alerts,
            imap_extra = options.imap_extra,
            imap = upstream(dovecot.imaps),
            pop3 = upstream(dovecot.pop3s),
            smtp = upstream(smtp_upstream),
        );
        let config_path = d.join("proxy.toml");
        std::fs::write(&config_path, &text).expect("write config");
        std::fs::write(d.join("profiles.toml"), &options.profiles).expect("write profiles");
        if options.client_certs {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
                .args(["--config", &config_path.display().to_string(), "ca", "init", "--name", "Test client CA"])
                .output()
                .expect("run postern ca init");
            assert!(out.status.success(), "postern ca init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let config = Config::load(&config_path).expect("test config is valid");
        let server = State::from_config(&config).await.expect("proxy starts");
        let running = daemon::start(server.clone(), &config, Duration::from_secs(2)).await.expect("proxy listens");
        let addr = |p: Protocol| running.addresses[&p][0];
        let starttls = |p: Protocol| running.starttls_addresses[&p][0];
        Proxy {
            imaps: addr(Protocol::Imap),
            pop3s: addr(Protocol::Pop3),
            smtps: addr(Protocol::Smtp),
            imap_starttls: starttls(Protocol::Imap),
            pop3_starttls: starttls(Protocol::Pop3),
            smtp_starttls: starttls(Protocol::Smtp),
            onboarding: running.onboarding_address,
            ca_file: pki.ca_file.clone(),
            config_path,
            dovecot,
            console: running.console_address,
            config,
            server,
            running: Some(running),
            _closed: closed,
            _dir: dir,
        }
    }

    /// The running server's shared state.
    pub fn server(&self) -> &State {
        &self.server
    }

    /// The proxy's state folder (vault).
    pub fn state_dir(&self) -> PathBuf {
        self.config.resolve(&self.config.server.state_dir)
    }

    /// Stores `password` as `user`'s upstream credential and reloads the proxy.
    pub fn set_upstream(&self, user: &str, password: &str) {
        let mut vault = Vault::open(&self.state_dir()).expect("vault");
        vault.set(user, UpstreamSecret::password(Secret::new(password))).expect("vault set");
        self.reload();
    }

    /// Sets `user`'s password in the file directory and reloads.
    pub async fn set_file_password(&self, user: &str, password: &str) {
        let path = self.config.base_dir.join("users.toml");
        postern::stores::directory::file::set_password(&path, user, &Secret::new(password)).expect("set password");
        self.server.reload(&self.config).await.expect("reload");
    }

    /// Replaces the profiles file and reloads.
    pub fn set_profiles(&self, text: &str) {
        std::fs::write(self.config.base_dir.join("profiles.toml"), text).expect("write profiles");
        self.reload();
    }

    /// Re-reads profiles and vault (what SIGHUP does, minus the directory).
    pub fn reload(&self) {
        let profiles =
            postern::access::profiles::Profiles::load(&self.config.base_dir.join("profiles.toml")).expect("profiles");
        self.server.set_profiles(profiles);
        self.server.upstreams.set_vault(Vault::open(&self.state_dir()).expect("vault"));
    }

    /// Re-reads everything reloadable, as SIGHUP does (profiles, vault, directory,
    /// certificates, audit file).
    pub async fn reload_all(&self) {
        self.running.as_ref().expect("running").reload(&self.config).await.expect("reload");
    }

    /// Rewrites the config file with `edit` and reloads it as SIGHUP does: everything
    /// reloadable, then the re-check of live sessions; returns how many were closed.
    pub async fn reconfigure(&mut self, edit: impl FnOnce(String) -> String) -> usize {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        std::fs::write(&self.config_path, edit(text)).expect("write config");
        self.config = Config::load(&self.config_path).expect("edited config is valid");
        self.server.reload(&self.config).await.expect("reload");
        postern::access::decision::revalidate(&self.server).await
    }

    /// Like [`Proxy::reload_all`], returning the error of a reload that fails (the old
    /// state stays in force).
    pub async fn try_reload_all(&self) -> Result<(), postern::state::LoadError> {
        self.server.reload(&self.config).await
    }

    /// Serves the control socket (`postern status`, `postern user unlock`) in the proxy's
    /// state folder, as the daemon does; returns its path.
    pub fn serve_control(&self) -> PathBuf {
        let path = self.config.control_socket();
        let listener = daemon::control::bind(&path).expect("bind the control socket");
        let (reload, _) = tokio::sync::mpsc::channel(1);
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(daemon::control::serve(listener, self.server.clone(), reload, stop));
        path
    }

    /// Stops the proxy as the daemon does at SIGTERM (saving its lockouts), then starts it
    /// again from the same config and state folder, on new ports.
    pub async fn restart(mut self) -> Proxy {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
        let server = State::from_config(&self.config).await.expect("proxy starts again");
        let running =
            daemon::start(server.clone(), &self.config, Duration::from_secs(2)).await.expect("proxy listens again");
        let addr = |p: Protocol| running.addresses[&p][0];
        (self.imaps, self.pop3s, self.smtps) = (addr(Protocol::Imap), addr(Protocol::Pop3), addr(Protocol::Smtp));
        self.onboarding = running.onboarding_address;
        self.server = server;
        self.running = Some(running);
        self
    }

    /// Stops the proxy (grace period 2 s).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// A user known to slapd and Dovecot, with a proxy profile: directory password
/// `password`, upstream password stored in the proxy's vault.
pub struct TestUser {
    /// Mail address.
    pub mail: String,
    /// Directory password.
    pub password: String,
    /// Upstream (Dovecot) password.
    pub upstream_password: String,
}

/// Creates `uid`@example.com in slapd (with `password`) and in the proxy's Dovecot (with a
/// generated upstream password), and stores the upstream password in `proxy`'s vault.
pub fn add_user(proxy: &Proxy, uid: &str, password: &str) -> TestUser {
    let mail = format!("{uid}@example.com");
    let upstream_password = format!("up-{uid}-Zq9x");
    slapd::slapd().add_user(uid, &mail, password, &[]);
    proxy.dovecot.add_user(&mail, &upstream_password);
    proxy.set_upstream(&mail, &upstream_password);
    TestUser { mail, password: password.to_owned(), upstream_password }
}

//! A real Dovecot (IMAP, POP3, submission) standing in for the upstream mail provider.
//!
//! Started once per test binary with a throw-away configuration in its own temporary folder:
//! TLS-only IMAPS/POP3S/submissions listeners plus a submission port offering STARTTLS, a
//! passwd-file of users added at run time, maildir mailboxes, and submission relaying to the
//! [`sink`](super::sink). Like Gmail, a POP3 login as `recent:<user>` reaches `<user>`'s mailbox.
//!
//! SASL XOAUTH2 and OAUTHBEARER logins are checked by two oauth2 passdbs against the
//! [`oauth`](super::oauth) test server's introspection endpoints (over HTTPS, trusting the
//! test CA): one for per-user tokens (the token's `email` must be the login name), one for
//! the Microsoft-style application token (only the domain must match). Password logins
//! never reach them.
//!
//! Dovecot runs under `sh`, which stops it (and removes the folder) when the test process
//! exits and closes the shell's stdin, although the static is never dropped.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;

/// How long Dovecot may take to open all its ports.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a new passwd-file entry may take to become visible to Dovecot's auth process.
const USER_VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Gmail's POP3 "recent mode" login prefix.
const RECENT_PREFIX: &str = "recent:";

/// The running Dovecot and how to reach it.
pub struct Dovecot {
    /// IMAP over implicit TLS.
    pub imaps: SocketAddr,
    /// POP3 over implicit TLS.
    pub pop3s: SocketAddr,
    /// Message submission over implicit TLS (port 465 style).
    pub submissions: SocketAddr,
    /// Message submission on plain TCP offering STARTTLS (port 587 style). Dovecot counts a
    /// connection from its own address as secure, so on loopback it also allows AUTH before
    /// STARTTLS; check [`Dovecot::login_lines`] for `TLS` to prove a client upgraded.
    pub submission_starttls: SocketAddr,
    /// Plaintext IMAP, only when started with [`Tuning::plain_imap`] (for a peer proxy whose
    /// upstream side has no TLS). Dovecot counts loopback as secure, so LOGIN works on it.
    pub imap: Option<SocketAddr>,
    /// CA certificate (PEM) that Dovecot's certificate chains to; its name is `localhost`.
    pub ca_file: PathBuf,
    /// Dovecot's log (logins appear as `Login: user=<name>`).
    pub log_file: PathBuf,
    dir: PathBuf,
    passwd_file: PathBuf,
    auth_socket: PathBuf,
    /// Owner for mailbox files when running as root (Dovecot refuses mail access as root).
    mail_owner: Option<(u32, u32)>,
    /// Only SASL LOGIN is on ([`Tuning::login_only`]).
    login_only: bool,
    /// Mailbox user -> passwd-file line, the source of every rewrite of the file.
    users: Mutex<BTreeMap<String, String>>,
    deliveries: AtomicU64,
    /// Closing this (at process exit) makes the wrapper shell stop Dovecot.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

static DOVECOT: OnceLock<Dovecot> = OnceLock::new();
static DOVECOT_LOGIN_ONLY: OnceLock<Dovecot> = OnceLock::new();
static DOVECOT_ONE_LOGIN_PROCESS: OnceLock<Dovecot> = OnceLock::new();

/// The shared Dovecot, started (blocking, a second or two) on first use.
pub fn dovecot() -> &'static Dovecot {
    DOVECOT.get_or_init(|| start(Tuning::default()))
}

/// A second Dovecot, started on first use, that offers only SASL LOGIN
/// ([`Tuning::login_only`]) and trusts loopback ([`Tuning::trust_loopback`]), like an upstream
/// that takes neither PLAIN nor the protocols' own password commands.
pub fn dovecot_login_only() -> &'static Dovecot {
    DOVECOT_LOGIN_ONLY.get_or_init(|| start(Tuning { login_only: true, trust_loopback: true, ..Tuning::default() }))
}

/// A third Dovecot, started on first use, whose IMAP connections are all served by one
/// long-lived login process ([`Tuning::one_login_process`]), so a TLS session ticket it
/// issues is good for the next connection: what resuming TLS sessions needs.
pub fn dovecot_one_login_process() -> &'static Dovecot {
    DOVECOT_ONE_LOGIN_PROCESS.get_or_init(|| start(Tuning { one_login_process: true, ..Tuning::default() }))
}

/// What a benchmark or test asks of Dovecot beyond the tests' defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// Also listen for plaintext IMAP ([`Dovecot::imap`]).
    pub plain_imap: bool,
    /// IMAP sessions to hold at once (login processes in high-performance mode, many clients
    /// per imap process, a higher file-descriptor limit); 0 keeps the test defaults.
    pub max_clients: u32,
    /// Offer only SASL LOGIN (`auth_mechanisms = login`, bearer tokens still checked for
    /// nothing): IMAP then announces `LOGINDISABLED`, and POP3 still lists `USER` but
    /// refuses `PASS` ("Unsupported authentication mechanism").
    pub login_only: bool,
    /// Trust loopback (`login_trusted_networks = 127.0.0.0/8`): a client address passed on
    /// with IMAP `ID` or POP3/SMTP `XCLIENT` from there is taken as the session's `rip`.
    pub trust_loopback: bool,
    /// One IMAP login process that serves every connection and lives on. By default each
    /// connection gets a new login process (Dovecot's high-security mode), with its own TLS
    /// ticket keys, so no TLS session can be resumed.
    pub one_login_process: bool,
}

/// The shared Dovecot started with `tuning`; if it already runs, the running one as it is.
pub fn dovecot_tuned(tuning: Tuning) -> &'static Dovecot {
    DOVECOT.get_or_init(|| start(tuning))
}

/// Who Dovecot's processes run as: as root, internal services stay root while login and mail
/// processes use `nobody` (Dovecot refuses root for them); otherwise everything is the caller.
struct Identity {
    /// User and group names for Dovecot's internal services.
    user: String,
    group: String,
    /// Owner of the mail processes and mailbox files.
    mail_uid: u32,
    mail_gid: u32,
    root: bool,
}

fn identity(dir: &Path) -> Identity {
    let meta = fs::metadata(dir).expect("stat dovecot temp dir");
    let (uid, gid) = (meta.uid(), meta.gid());
    if uid == 0 {
        let (mail_uid, mail_gid) = passwd_ids("nobody").unwrap_or((65534, 65534));
        Identity {
            user: "root".into(),
            group: group_name(0).unwrap_or_else(|| "root".into()),
            mail_uid,
            mail_gid,
            root: true,
        }
    } else {
        let user =
            user_name(uid).unwrap_or_else(|| panic!("uid {uid} has no /etc/passwd entry; Dovecot needs a user name"));
        let group =
            group_name(gid).unwrap_or_else(|| panic!("gid {gid} has no /etc/group entry; Dovecot needs a group name"));
        Identity { user, group, mail_uid: uid, mail_gid: gid, root: false }
    }
}

fn passwd_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
}

fn user_name(uid: u32) -> Option<String> {
    name_by_id("/etc/passwd", uid).or_else(|| std::env::var("USER").ok())
}

fn group_name(gid: u32) -> Option<String> {
    name_by_id("/etc/group", gid)
}

fn name_by_id(file: &str, id: u32) -> Option<String> {
    let text = fs::read_to_string(file).ok()?;
    text.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2].parse() == Ok(id))
        .map(|f| f[0].to_owned())
}

fn start(tuning: Tuning) -> Dovecot {
    let binary = super::require_binary("dovecot", "dovecot-imapd dovecot-pop3d dovecot-submissiond");
    let sink = super::sink::sink();
    let dir = tempfile::Builder::new().prefix("postern-dovecot-").tempdir().expect("dovecot temp dir").keep();
    // Mail processes run unprivileged and must reach the homes below.
    set_mode(&dir, 0o755);
    let id = identity(&dir);
    for sub in ["run", "state", "mail"] {
        fs::create_dir(dir.join(sub)).expect("dovecot sub dir");
    }
    let issued = super::pki::pki().issue_in("dovecot", &dir);
    // The token server must be up before its URLs go into the config.
    let tokens = super::oauth::token_server();
    for (name, app) in [("oauth2-user.conf.ext", false), ("oauth2-app.conf.ext", true)] {
        fs::write(dir.join(name), oauth2_args(&tokens.introspection_url(app), app)).expect("write oauth2 passdb args");
    }
    let passwd_file = dir.join("passwd");
    fs::write(&passwd_file, "").expect("empty passwd-file");
    let log_file = dir.join("dovecot.log");
    let conf = dir.join("dovecot.conf");
    let mail_owner = id.root.then_some((id.mail_uid, id.mail_gid));
    if let Some((uid, gid)) = mail_owner {
        std::os::unix::fs::chown(dir.join("mail"), Some(uid), Some(gid)).expect("chown mail dir");
    }

    // Kept while starting, so a failed attempt leaves the folder for the next one.
    let keep_marker = dir.join(".keep");
    fs::write(&keep_marker, "").expect("keep marker");
    let mut failures = Vec::new();
    for _attempt in 0..3 {
        let ports = [super::free_port(), super::free_port(), super::free_port(), super::free_port()];
        let addrs = ports.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        let plain = tuning.plain_imap.then(|| SocketAddr::from(([127, 0, 0, 1], super::free_port())));
        let mut text = config(&dir, &id, &issued, &passwd_file, &log_file, ports, sink.addr);
        if let Some(plain) = plain {
            text = text.replace(
                "  inet_listener imap {\n    port = 0\n",
                &format!("  inet_listener imap {{\n    port = {}\n", plain.port()),
            );
        }
        if tuning.max_clients > 0 {
            text.push_str(&scale_config(tuning.max_clients));
        }
        if tuning.login_only {
            text = text.replace("auth_mechanisms = plain login xoauth2 oauthbearer\n", "auth_mechanisms = login\n");
        }
        if tuning.trust_loopback {
            text.push_str("login_trusted_networks = 127.0.0.0/8\n");
        }
        if tuning.one_login_process {
            text.push_str(
                "service imap-login {\n  service_count = 0\n  process_min_avail = 1\n  process_limit = 1\n}\n",
            );
        }
        fs::write(&conf, text).expect("write dovecot.conf");
        let stderr_file = dir.join("stderr.log");
        let stderr = fs::File::create(&stderr_file).expect("dovecot stderr file");
        // Dovecot is stopped when our end of the shell's stdin closes, i.e. when we exit; the
        // folder goes too unless it holds a `.keep` file.
        let script = r#""$0" -F -c "$1" & p=$!; cat >/dev/null; kill $p; wait; [ -e "$2/.keep" ] || rm -rf "$2""#;
        // Many sessions need many descriptors; root may raise its own hard limit.
        let script = if tuning.max_clients > 0 {
            format!("ulimit -n {} 2>/dev/null; {script}", nofile(tuning.max_clients))
        } else {
            script.to_owned()
        };
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(&binary)
            .arg(&conf)
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn dovecot");
        let stdin = child.stdin.take().expect("dovecot wrapper stdin");
        let wanted: Vec<SocketAddr> = addrs.iter().copied().chain(plain).collect();
        match wait_for_ports(&mut child, &wanted) {
            Ok(()) => {
                if std::env::var_os("POSTERN_KEEP_TEST_DIRS").is_none() {
                    let _ = fs::remove_file(&keep_marker);
                }
                return Dovecot {
                    imaps: addrs[0],
                    pop3s: addrs[1],
                    submissions: addrs[2],
                    submission_starttls: addrs[3],
                    imap: plain,
                    ca_file: super::pki::pki().ca_file.clone(),
                    log_file,
                    auth_socket: dir.join("run").join("auth-client"),
                    passwd_file,
                    mail_owner,
                    login_only: tuning.login_only,
                    dir,
                    users: Mutex::new(BTreeMap::new()),
                    deliveries: AtomicU64::new(0),
                    _stdin: Mutex::new(stdin),
                    _child: Mutex::new(child),
                };
            }
            Err(why) => {
                drop(stdin);
                let _ = child.wait();
                let stderr_text = fs::read_to_string(&stderr_file).unwrap_or_default();
                failures.push(format!("{why}\nstderr:\n{stderr_text}\nlog tail:\n{}", tail(&log_file, 30)));
            }
        }
    }
    panic!("Dovecot failed to start (3 attempts; files kept in {}):\n{}", dir.display(), failures.join("\n---\n"));
}

/// File descriptors Dovecot's processes need for `clients` sessions (two or three each in the
/// login process that holds TLS, plus the mail processes).
fn nofile(clients: u32) -> u32 {
    (clients * 3 + 1024).max(65_536)
}

/// Settings appended for [`Tuning::max_clients`]: login and imap processes that each serve
/// many clients and live on (Dovecot's high-performance mode), up to 1,000 per imap process.
fn scale_config(clients: u32) -> String {
    let per_imap = 1000;
    let imap_processes = clients / per_imap + 20;
    let nofile = nofile(clients);
    format!(
        r#"
# Scaled for {clients} concurrent sessions.
mail_max_userip_connections = {clients}
default_client_limit = {nofile}
default_vsz_limit = 2G
service imap-login {{
  service_count = 0
  process_min_avail = 2
  client_limit = {nofile}
}}
service imap {{
  service_count = 0
  process_min_avail = 2
  client_limit = {per_imap}
  process_limit = {imap_processes}
}}
service anvil {{
  client_limit = {nofile}
}}
"#
    )
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

fn config(
    dir: &Path,
    id: &Identity,
    issued: &super::pki::Issued,
    passwd: &Path,
    log: &Path,
    [imaps, pop3s, submissions, submission]: [u16; 4],
    relay: SocketAddr,
) -> String {
    let d = dir.display();
    let passwd = passwd.display();
    let (user, group, uid, gid) = (&id.user, &id.group, id.mail_uid, id.mail_gid);
    // Without root nothing can chroot; Dovecot then runs everything as the current user.
    let no_chroot = if id.root {
        String::new()
    } else {
        ["imap-login", "pop3-login", "submission-login", "anvil"]
            .map(|s| format!("service {s} {{\n  chroot =\n}}\n"))
            .concat()
    };
    let login_user = if id.root { "nobody" } else { user.as_str() };
    format!(
        r#"# Throw-away Dovecot for Postern's integration tests.
base_dir = {d}/run
state_dir = {d}/state
log_path = {log}
auth_verbose = yes
# Failed logins still answer after about half a second (Dovecot's flush interval).
auth_failure_delay = 0
auth_mechanisms = plain login xoauth2 oauthbearer
auth_username_chars =
login_log_format_elements = user=<%u> orig_user=<%{{orig_user}}> method=%m rip=%r lip=%l mpid=%e %c session=<%{{session}}>
protocols = imap pop3 submission
listen = 127.0.0.1
hostname = localhost
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
default_internal_user = {user}
default_internal_group = {group}
default_login_user = {login_user}
default_process_limit = 200
default_client_limit = 2000
mail_uid = {uid}
mail_gid = {gid}
first_valid_uid = 0
first_valid_gid = 0
mail_location = maildir:~/Maildir
mail_fsync = never
mail_max_userip_connections = 1000
submission_relay_host = {relay_ip}
submission_relay_port = {relay_port}
submission_relay_ssl = no
submission_max_mail_size = 0

# Users as added by the tests.
passdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
# Gmail-style POP3 "recent:" logins reach the same account.
passdb {{
  driver = passwd-file
  args = username_format=%{prefix_len}.u {passwd}
  username_filter = recent:*
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}
# Bearer tokens, for XOAUTH2 and OAUTHBEARER only: per-user tokens, then application tokens.
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2-user.conf.ext
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {d}/oauth2-app.conf.ext
}}
# (userdbs take no username_filter in 2.3; other names just are not found here.)
userdb {{
  driver = passwd-file
  args = username_format=%{prefix_len}.u {passwd}
}}

# No auth penalty (a growing delay per source IP after failures): every test connects from
# 127.0.0.1, and one test's failed login must not slow down the others.
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = {pop3s}
    ssl = yes
  }}
}}
service submission-login {{
  inet_listener submission {{
    port = {submission}
  }}
  inet_listener submissions {{
    port = {submissions}
    ssl = yes
  }}
}}
{no_chroot}"#,
        log = log.display(),
        cert = issued.cert_file.display(),
        key = issued.key_file.display(),
        relay_ip = relay.ip(),
        relay_port = relay.port(),
        prefix_len = RECENT_PREFIX.len(),
    )
}

/// The oauth2 passdb settings for introspection at `url`. Application tokens are valid for a
/// whole domain, so only the domain part of the login name is compared for them.
fn oauth2_args(url: &str, app: bool) -> String {
    let username_format = if app { "%d" } else { "%Lu" };
    format!(
        "introspection_mode = post\nintrospection_url = {url}\nusername_attribute = email\nusername_format = {username_format}\nactive_attribute = active\nactive_value = true\ntls_ca_cert_file = {}\n",
        super::pki::pki().ca_file.display()
    )
}

/// Waits until every address accepts a connection, or reports why not.
fn wait_for_ports(child: &mut Child, addrs: &[SocketAddr]) -> Result<(), String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut pending: Vec<SocketAddr> = addrs.to_vec();
    while !pending.is_empty() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("dovecot exited early ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!("ports {pending:?} not accepting after {START_TIMEOUT:?}"));
        }
        pending.retain(|a| TcpStream::connect_timeout(a, Duration::from_millis(200)).is_err());
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// The last `lines` lines of a text file (empty if unreadable).
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Dovecot {
    /// Adds (or re-passwords) a mailbox user such as `alice@example.com`, also reachable as
    /// `recent:alice@example.com`, and returns once Dovecot accepts the password.
    ///
    /// The password may contain any character except NUL (it is stored hex-encoded); the user
    /// name must not contain `:`, `/`, NUL, CR or LF, nor start with `recent:`.
    pub fn add_user(&self, user: &str, password: &str) {
        self.add_users(&[(user, password)]);
    }

    /// [`Dovecot::add_user`] for many users at once: one passwd-file write and one wait for
    /// Dovecot to see it, instead of up to a second per user.
    pub fn add_users(&self, users: &[(&str, &str)]) {
        for &(user, password) in users {
            self.prepare_user(user, password);
        }
        self.write_passwd_file();
        let deadline = Instant::now() + USER_VISIBLE_TIMEOUT;
        for &(user, password) in users {
            self.wait_until_visible(user, password, deadline);
        }
    }

    fn prepare_user(&self, user: &str, password: &str) {
        assert!(
            !user.is_empty() && user != "." && user != ".." && !user.contains([':', '/', '\0', '\r', '\n', '\t']),
            "test user name {user:?} cannot go into a passwd-file"
        );
        assert!(!password.contains('\0'), "test password must not contain NUL");
        let home = self.home(user);
        let maildir = home.join("Maildir");
        for sub in ["", "cur", "new", "tmp"] {
            let path = maildir.join(sub);
            fs::create_dir_all(&path).expect("create maildir");
            self.own(&path);
        }
        self.own(&home);
        let hex: String = password.bytes().map(|b| format!("{b:02x}")).collect();
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        users.insert(user.to_owned(), format!("{user}:{{PLAIN.HEX}}{hex}::::{}::\n", home.display()));
    }

    fn write_passwd_file(&self) {
        let users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let text: String = users.values().map(String::as_str).collect();
        let tmp = self.dir.join("passwd.tmp");
        fs::write(&tmp, text).expect("write passwd-file");
        fs::rename(&tmp, &self.passwd_file).expect("replace passwd-file");
    }

    /// Dovecot checks the file at most once a second: retries until it has the new version.
    /// Its passdbs and userdbs share one cache of the file, so a passdb check covers both.
    fn wait_until_visible(&self, user: &str, password: &str, deadline: Instant) {
        for name in [user.to_owned(), format!("{RECENT_PREFIX}{user}")] {
            loop {
                match self.auth_test(&name, password) {
                    Ok(true) => break,
                    Ok(false) | Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                    outcome => panic!(
                        "Dovecot does not accept the new user {name}: {outcome:?}\nlog tail:\n{}",
                        tail(&self.log_file, 20)
                    ),
                }
            }
        }
    }

    /// Asks Dovecot's auth service directly whether `user`/`password` log in (PLAIN, or LOGIN
    /// where only that is on).
    pub fn auth_test(&self, user: &str, password: &str) -> std::io::Result<bool> {
        let mut socket = UnixStream::connect(&self.auth_socket)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(socket.try_clone()?);
        socket.write_all(format!("VERSION\t1\t2\nCPID\t{}\n", std::process::id()).as_bytes())?;
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            if line.trim_end() == "DONE" {
                break;
            }
        }
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        if self.login_only {
            socket.write_all(b"AUTH\t1\tLOGIN\tservice=imap\tsecured\tno-penalty\n")?;
            for field in [user, password] {
                line.clear();
                reader.read_line(&mut line)?;
                if !line.starts_with("CONT\t1") {
                    return Ok(false);
                }
                socket.write_all(format!("CONT\t1\t{}\n", b64(field.as_bytes())).as_bytes())?;
            }
        } else {
            let mut plain = Vec::new();
            plain.push(0);
            plain.extend_from_slice(user.as_bytes());
            plain.push(0);
            plain.extend_from_slice(password.as_bytes());
            let resp = b64(&plain);
            socket.write_all(format!("AUTH\t1\tPLAIN\tservice=imap\tsecured\tno-penalty\tresp={resp}\n").as_bytes())?;
        }
        line.clear();
        reader.read_line(&mut line)?;
        Ok(line.starts_with("OK\t1"))
    }

    /// Puts `message` into `user`'s INBOX as a new maildir file, as a delivery agent would.
    /// Write it with CRLF line endings to get it back byte-identical from FETCH or RETR. A
    /// session that already selected INBOX sees it after its next sync (e.g. `NOOP`).
    pub fn deliver(&self, user: &str, message: &[u8]) {
        assert!(
            self.users.lock().unwrap_or_else(|e| e.into_inner()).contains_key(user),
            "deliver to {user}, who was never added with add_user"
        );
        let maildir = self.home(user).join("Maildir");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let n = self.deliveries.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}.M{}P{}Q{n}.localhost", now.as_secs(), now.subsec_micros(), std::process::id());
        let tmp = maildir.join("tmp").join(&name);
        let mut file = fs::File::create(&tmp).expect("create maildir tmp file");
        file.write_all(message).expect("write message");
        drop(file);
        self.own(&tmp);
        fs::rename(&tmp, maildir.join("new").join(&name)).expect("move message to new/");
    }

    /// Whether Dovecot's log contains `needle` right now.
    pub fn log_contains(&self, needle: &str) -> bool {
        self.log().contains(needle)
    }

    /// Waits up to `timeout` for `needle` to appear in the log (Dovecot logs asynchronously).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The whole log so far (lossy UTF-8).
    pub fn log(&self) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut f) = fs::File::open(&self.log_file) {
            let _ = f.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The log's `Login:` lines for `user` (as the client named it, e.g. `recent:...`). Each ends
    /// in the connection state: `TLS` when the session was encrypted (implicit or STARTTLS),
    /// `secured` for a plaintext loopback session.
    pub fn login_lines(&self, user: &str) -> Vec<String> {
        let needle = format!("Login: user=<{user}>");
        self.log().lines().filter(|l| l.contains(&needle)).map(str::to_owned).collect()
    }

    /// Dovecot's auth penalties (`doveadm penalty`: a source address whose logins Dovecot
    /// delays after failures), one line per address after a header.
    pub fn penalties(&self) -> String {
        let doveadm = super::require_binary("doveadm", "dovecot-core");
        let out = Command::new(doveadm)
            .arg("-c")
            .arg(self.dir.join("dovecot.conf"))
            .arg("penalty")
            .output()
            .expect("run doveadm penalty");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "doveadm penalty failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        text
    }

    /// The last `lines` lines of the log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file, lines)
    }

    fn home(&self, user: &str) -> PathBuf {
        self.dir.join("mail").join(user)
    }

    /// Hands a file or folder to the mail user when we run as root.
    fn own(&self, path: &Path) {
        if let Some((uid, gid)) = self.mail_owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown to mail user");
        }
    }
}

//! The proxies under test, each a separate process on loopback so its memory is its own:
//! Postern (the release binary), HAProxy TLS-to-TLS (no authentication, the splice limit),
//! nginx's mail proxy (TLS to clients, plaintext to Dovecot, `auth_http` answered here) and
//! HAProxy in TCP mode balancing over several Postern instances with the PROXY protocol.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{dovecot::Dovecot, pki::Issued, slapd::Slapd};
use crate::{Env, Users, free_addr};

/// File-descriptor limit given to every proxy: two sockets per session and room to spare.
pub const NOFILE: u32 = 65_536;

/// A process this bench started; stopped when dropped.
pub struct Process {
    child: Child,
    name: &'static str,
    log: PathBuf,
}

impl Process {
    /// Runs `program args` under `sh` with the raised descriptor limit, output to `log`.
    fn spawn(name: &'static str, program: &Path, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Process {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("ulimit -n {NOFILE} 2>/dev/null || ulimit -n $(ulimit -Hn); exec \"$@\""))
            .arg("sh")
            .arg(program)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Process { child, name, log }
    }

    /// The process id (the shell `exec`s, so it is the proxy's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections; panics with the log if the process exits.
    fn wait_for(&mut self, addr: SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) at start:\n{}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{} did not listen on {addr} within 120 s", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

/// Resident memory of `pid` and its children, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    family(pid).iter().map(|p| status_field(*p, "VmRSS:")).sum()
}

/// CPU time (user + system) used so far by `pid` and its children, seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let ticks: u64 = family(pid)
        .iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the command: state is field 3, utime 14 and stime 15.
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

/// Connections to `port` on loopback that a process still holds on the listening side:
/// established, or closed by the client and not yet by the server (`/proc/net/tcp`, IPv4).
pub fn open_connections(port: u16) -> usize {
    const ESTABLISHED: &str = "01";
    const CLOSE_WAIT: &str = "08";
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            // sl local_address rem_address st ...; an address is HEXIP:HEXPORT.
            let mut fields = line.split_whitespace().skip(1);
            let local_port = fields.next().and_then(|a| u16::from_str_radix(a.rsplit_once(':')?.1, 16).ok());
            let state = fields.nth(1);
            local_port == Some(port) && matches!(state, Some(ESTABLISHED | CLOSE_WAIT))
        })
        .count()
}

/// `pid` and its direct children (nginx's workers).
fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // pid (comm) state ppid ...; comm may hold spaces, so split after the last ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// The release binary, built first when missing or older than the sources.
pub fn postern_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = root.join("target/release/postern");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified()).ok();
    let newest_source = newest_mtime(&root.join("src")).max(newest_mtime(&root.join("Cargo.toml")));
    if built.is_none_or(|b| newest_source.is_some_and(|s| s > b)) {
        eprintln!("building target/release/postern ...");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--bin", "postern"])
            .current_dir(root)
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build --release --bin postern failed");
    }
    binary
}

fn newest_mtime(path: &Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path).ok()?.flatten().filter_map(|e| newest_mtime(&e.path())).max()
}

/// The proxies of the side-by-side comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// This tree's release build.
    Postern,
    /// HAProxy TLS-to-TLS.
    Haproxy,
    /// nginx's mail proxy.
    Nginx,
}

impl Proxy {
    /// Starts one in `dir` (created here); `None` when it is not installed.
    pub async fn start(self, dir: &Path, env: &Env<'_>) -> Option<(Process, SocketAddr)> {
        std::fs::create_dir_all(dir).expect("target dir");
        match self {
            Proxy::Postern => Some(postern(dir, env.issued, env.slapd, env.dovecot, env.users)),
            Proxy::Haproxy => haproxy(dir, env.issued, env.dovecot),
            Proxy::Nginx => nginx(dir, env.issued, env.dovecot, env.users).await,
        }
    }

    /// A short name, for folders.
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Postern => "postern",
            Proxy::Haproxy => "haproxy",
            Proxy::Nginx => "nginx",
        }
    }

    /// What to install when [`Proxy::start`] finds nothing.
    pub fn install_hint(self) -> &'static str {
        match self {
            Proxy::Postern => "",
            Proxy::Haproxy => "haproxy is not installed (apt-get install haproxy)",
            Proxy::Nginx => "nginx's mail module is not installed (apt-get install nginx libnginx-mod-mail)",
        }
    }
}

/// Starts Postern with an LDAP directory (slapd), the bench users' profile and vault, and
/// Dovecot's IMAPS as upstream.
pub fn postern(dir: &Path, issued: &Issued, slapd: &Slapd, dovecot: &Dovecot, users: &Users) -> (Process, SocketAddr) {
    postern_with(dir, issued, slapd, dovecot, users, &Extra::default())
}

/// Configuration added to the bench's Postern configuration.
#[derive(Default)]
pub struct Extra {
    /// Lines appended to the `[imap]` table (e.g. `proxy_protocol = true`).
    pub imap: String,
    /// Whole tables appended to the file (e.g. `[state]`).
    pub tables: String,
    /// Lines appended to the `[lockout]` table (e.g. `max_failures = 5`).
    pub lockout: String,
    /// The bench profile's `allow` list, as TOML (default `["127.0.0.0/8"]`).
    pub allow: Option<String>,
    /// Another `postern` binary than this tree's release build.
    pub binary: Option<PathBuf>,
    /// Run under `valgrind --tool=TOOL` (`callgrind`, `massif`), its output in this folder
    /// (`TOOL.out`).
    pub valgrind: Option<(&'static str, PathBuf)>,
}

/// Like [`postern`], with `extra` configuration.
pub fn postern_with(
    dir: &Path,
    issued: &Issued,
    slapd: &Slapd,
    dovecot: &Dovecot,
    users: &Users,
    extra: &Extra,
) -> (Process, SocketAddr) {
    use postern::secret::Secret;
    use postern::stores::vault::{UpstreamSecret, Vault};
    let addr = free_addr();
    let state = dir.join("state");
    Vault::init(&state).expect("vault init");
    let mut vault = Vault::open(&state).expect("vault open");
    for user in &users.list {
        vault.set(&user.mail, UpstreamSecret::password(Secret::new(&user.upstream_password))).expect("vault set");
    }
    let names: Vec<String> = users.list.iter().map(|u| format!("{:?}", u.mail)).collect();
    std::fs::write(
        dir.join("profiles.toml"),
        format!(
            "[[profile]]\nname = \"bench\"\nallow = {}\nusers = [{}]\n",
            extra.allow.as_deref().unwrap_or("[\"127.0.0.0/8\"]"),
            names.join(", ")
        ),
    )
    .expect("profiles");
    let config = format!(
        r#"[server]
hostname = "proxy.bench"
state_dir = "state"
watch_profiles = false

[tls]
cert = {cert:?}
key = {key:?}

[limits]
handshake_timeout_secs = 60
preauth_timeout_secs = 120
upstream_timeout_secs = 60
max_connections = 50000
max_sessions_per_user = 100000
max_connections_per_ip = 100000
max_handshakes_per_ip = 100000

[lockout]
failure_delay_ms = 0
# Every bench client is 127.0.0.1, with up to 64 logins in flight: not a spraying address.
max_failures_per_ip = 0
{lockout_extra}
[directory]
kind = "ldap"
url = {url:?}
bind_dn = {bind_dn:?}
bind_password = {bind_pw:?}
base_dn = {base:?}
filter = "(mail={{user}})"
timeout_secs = 10

[access]
profiles = "profiles.toml"

[imap]
listen = ["{addr}"]
upstream = "localhost:{port}"
upstream_ca_file = {ca:?}
{imap_extra}
{tables}"#,
        cert = issued.cert_file.display().to_string(),
        key = issued.key_file.display().to_string(),
        url = slapd.url,
        bind_dn = slapd.service_dn,
        bind_pw = slapd.service_password,
        base = slapd.base_dn,
        port = dovecot.imaps.port(),
        ca = dovecot.ca_file.display().to_string(),
        imap_extra = extra.imap,
        lockout_extra = extra.lockout,
        tables = extra.tables,
    );
    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, config).expect("proxy.toml");
    let binary = extra.binary.clone().unwrap_or_else(postern_binary);
    let serve = ["serve", "--config", config_path.to_str().expect("utf-8 path")];
    let mut process = match &extra.valgrind {
        None => Process::spawn("postern", &binary, &serve, dir, &[("POSTERN_LOG", "info")]),
        Some((tool, out)) => {
            let valgrind = which("valgrind").expect("valgrind is not installed (apt-get install valgrind)");
            let tool_arg = format!("--tool={tool}");
            let out_file = format!("--{tool}-out-file={}", out.join(format!("{tool}.out")).display());
            let mut args = vec![tool_arg.as_str(), "--trace-children=no", out_file.as_str()];
            if *tool == "callgrind" {
                // Full names at every call site, for counting the allocator's calls.
                args.extend(["--compress-strings=no", "--compress-pos=no"]);
            }
            args.push(binary.to_str().expect("utf-8 path"));
            args.extend(serve);
            Process::spawn("postern", &valgrind, &args, dir, &[("POSTERN_LOG", "info")])
        }
    };
    process.wait_for(addr);
    (process, addr)
}

/// Starts HAProxy in TCP mode: TLS from clients with the same certificate as Postern, TLS to
/// Dovecot verified against the test CA.
pub fn haproxy(dir: &Path, issued: &Issued, dovecot: &Dovecot) -> Option<(Process, SocketAddr)> {
    let binary = which("haproxy")?;
    let addr = free_addr();
    let combined = dir.join("haproxy.pem");
    let pem = std::fs::read_to_string(&issued.cert_file).expect("cert")
        + &std::fs::read_to_string(&issued.key_file).expect("key");
    std::fs::write(&combined, pem).expect("combined pem");
    let config = format!(
        r#"global
    maxconn 9500
    nbthread 2

defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend imaps
    bind {addr} ssl crt {combined}
    default_backend dovecot

backend dovecot
    server dovecot {upstream} ssl verify required ca-file {ca} verifyhost localhost sni str(localhost)
"#,
        combined = combined.display(),
        upstream = dovecot.imaps,
        ca = dovecot.ca_file.display(),
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy.cfg");
    let mut process = Process::spawn("haproxy", &binary, &["-f", path.to_str()?, "-db"], dir, &[]);
    process.wait_for(addr);
    Some((process, addr))
}

/// Starts HAProxy as a TCP load balancer on loopback: round robin over `backends`, each
/// connection opened with a PROXY protocol v2 header (`send-proxy-v2`), no TLS of its own.
pub fn haproxy_balancer(dir: &Path, backends: &[SocketAddr]) -> Option<(Process, SocketAddr)> {
    let binary = which("haproxy")?;
    let addr = free_addr();
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, backend)| format!("    server postern{i} {backend} send-proxy-v2\n"))
        .collect();
    let config = format!(
        r#"global
    maxconn 9500
    nbthread 2

defaults
    mode tcp
    timeout connect 10s
    timeout client 1h
    timeout server 1h

frontend imaps
    bind {addr}
    default_backend postern

backend postern
    balance roundrobin
{servers}"#
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy.cfg");
    let mut process = Process::spawn("haproxy", &binary, &["-f", path.to_str()?, "-db"], dir, &[]);
    process.wait_for(addr);
    Some((process, addr))
}

/// nginx's mail module, when installed (Debian: libnginx-mod-mail).
const NGINX_MAIL_MODULE: &str = "/usr/lib/nginx/modules/ngx_mail_module.so";

/// Starts nginx's IMAP proxy: TLS from clients, plaintext LOGIN to Dovecot's plain listener
/// with the upstream password that the `auth_http` responder (started here) hands out.
pub async fn nginx(dir: &Path, issued: &Issued, dovecot: &Dovecot, users: &Users) -> Option<(Process, SocketAddr)> {
    let binary = which("nginx")?;
    if !Path::new(NGINX_MAIL_MODULE).exists() {
        return None;
    }
    let upstream = dovecot.imap?;
    let auth = auth_http(upstream, users).await;
    let addr = free_addr();
    let config = format!(
        r#"load_module {NGINX_MAIL_MODULE};
worker_processes 2;
worker_rlimit_nofile {NOFILE};
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{
    worker_connections 40000;
}}
mail {{
    server_name localhost;
    auth_http {auth}/auth;
    proxy_pass_error_message on;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen {addr} ssl;
        protocol imap;
    }}
}}
"#,
        dir = dir.display(),
        cert = issued.cert_file.display(),
        key = issued.key_file.display(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).expect("nginx.conf");
    let mut process =
        Process::spawn("nginx", &binary, &["-p", dir.to_str()?, "-c", path.to_str()?, "-g", "daemon off;"], dir, &[]);
    process.wait_for(addr);
    Some((process, addr))
}

/// A minimal `auth_http` endpoint: every known user is sent to `upstream` with their stored
/// upstream password (nginx checks nothing itself; this responder stands in for the check).
async fn auth_http(upstream: SocketAddr, users: &Users) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind auth_http");
    let addr = listener.local_addr().expect("auth_http address");
    let passwords: HashMap<String, String> =
        users.list.iter().map(|u| (u.mail.clone(), u.upstream_password.clone())).collect();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let passwords = passwords.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut chunk = [0u8; 2048];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request);
                let user = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Auth-User: "))
                    .map(|u| u.trim().to_owned())
                    .unwrap_or_default();
                let answer = match passwords.get(&user) {
                    Some(pw) => format!(
                        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: {}\r\nAuth-Port: {}\r\nAuth-Pass: {pw}\r\n\r\n",
                        upstream.ip(),
                        upstream.port()
                    ),
                    None => "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login\r\n\r\n".to_owned(),
                };
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// `name` on PATH or in the sbin folders.
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// One-line version of a tool, for the conditions section.
pub fn version(command: &str, arg: &str) -> String {
    Command::new(command)
        .arg(arg)
        .output()
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|| "not installed".into())
}

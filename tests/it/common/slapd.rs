//! A real OpenLDAP `slapd`, started once per test binary on free loopback ports.
//!
//! The server listens on `ldap://` (StartTLS offered) and `ldaps://` with a certificate
//! from the shared test CA. The tree is:
//!
//! ```text
//! dc=example,dc=com
//! ├── ou=people    uid=<uid>  inetOrgPerson with mail and userPassword
//! ├── ou=groups    cn=<name>  groupOfNames (memberOf kept by the memberof overlay)
//! └── ou=services  cn=postern service account that may read people and groups
//! ```
//!
//! Anonymous clients may only bind; users may read their own entry and the groups.
//!
//! A second server, [`slapd_with_ppolicy`], has the same tree plus the password policy
//! overlay with a default policy (`ou=policies`) for every entry: lockout after
//! [`PPOLICY_MAX_FAILURES`] wrong passwords, maximum password age, change after reset; and
//! it tells a bind that asks why it is refused (`ppolicy_use_lockout`). Its own instance,
//! so the directory's lockout never touches the other tests' users.

use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

const BASE_DN: &str = "dc=example,dc=com";
const ROOT_DN: &str = "cn=admin,dc=example,dc=com";
const ROOT_PW: &str = "root-secret";
const SERVICE_DN: &str = "cn=postern,ou=services,dc=example,dc=com";
const SERVICE_PW: &str = "service-secret";
const POLICY_DN: &str = "cn=default,ou=policies,dc=example,dc=com";
/// Wrong passwords after which the ppolicy server locks an account itself.
pub const PPOLICY_MAX_FAILURES: u32 = 3;

/// Which server.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// memberof only.
    Plain,
    /// memberof and ppolicy.
    Ppolicy,
}

/// The shared slapd and what a client needs to reach it.
pub struct Slapd {
    _dir: tempfile::TempDir,
    _child: Child,
    /// Kept open so the wrapper shell kills slapd when this process exits.
    _stdin: Mutex<ChildStdin>,
    /// Serializes `add_user`, whose group creation is check-then-act.
    writes: Mutex<()>,
    /// `ldap://127.0.0.1:<port>` (StartTLS available).
    pub url: String,
    /// `ldaps://127.0.0.1:<port>`.
    pub ldaps_url: String,
    /// `dc=example,dc=com`.
    pub base_dn: String,
    /// `ou=people,dc=example,dc=com`.
    pub people_dn: String,
    /// `ou=groups,dc=example,dc=com`.
    pub groups_dn: String,
    /// The service account allowed to search people and groups.
    pub service_dn: String,
    /// The service account's password.
    pub service_password: String,
    /// The CA that issued slapd's certificate, in PEM.
    pub ca_file: PathBuf,
}

static SLAPD: OnceLock<Slapd> = OnceLock::new();
static PPOLICY_SLAPD: OnceLock<Slapd> = OnceLock::new();

/// The shared slapd, started on first use; blocks until it accepts connections.
pub fn slapd() -> &'static Slapd {
    SLAPD.get_or_init(|| start(Flavor::Plain))
}

/// The shared slapd with the password policy overlay, started on first use.
pub fn slapd_with_ppolicy() -> &'static Slapd {
    PPOLICY_SLAPD.get_or_init(|| start(Flavor::Ppolicy))
}

fn start(flavor: Flavor) -> Slapd {
    let slapd_bin = super::require_binary("slapd", "slapd ldap-utils");
    super::require_binary("ldapadd", "slapd ldap-utils");
    let dir = tempfile::tempdir().expect("temp dir for slapd");
    let db = dir.path().join("db");
    std::fs::create_dir(&db).expect("slapd db dir");
    let pki = super::pki::pki();
    let issued = pki.issue_in("slapd", dir.path());
    let conf = dir.path().join("slapd.conf");
    std::fs::write(&conf, config(dir.path(), &db, &issued.cert_file, &issued.key_file, flavor))
        .expect("write slapd.conf");

    // The ports are picked free but only taken when slapd binds them, so another process may
    // win one in between: slapd then exits, and it is started again on new ports.
    let log = dir.path().join("slapd.log");
    let mut failures = Vec::new();
    let (child, stdin, url, ldaps_url) = loop {
        if failures.len() == 3 {
            panic!("slapd did not start (3 attempts):\n{}", failures.join("\n---\n"));
        }
        let (port, tls_port) = (super::free_port(), super::free_port());
        let url = format!("ldap://127.0.0.1:{port}");
        let ldaps_url = format!("ldaps://127.0.0.1:{tls_port}");
        let log_file = std::fs::File::create(&log).expect("slapd log");
        // slapd runs in the background of a shell that waits for its stdin to close: the pipe
        // closes when this test process exits however it exits, and the shell then stops slapd.
        let script = r#"slapd="$1"; shift; "$slapd" "$@" & p=$!; cat >/dev/null; kill $p; wait $p"#;
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&slapd_bin)
            .arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(format!("{url}/ {ldaps_url}/"))
            .arg("-d")
            .arg("none")
            .stdin(Stdio::piped())
            .stdout(log_file.try_clone().expect("slapd log"))
            .stderr(log_file)
            .spawn()
            .expect("start slapd");
        let stdin = child.stdin.take().expect("slapd wrapper stdin");
        let addrs = [format!("127.0.0.1:{port}"), format!("127.0.0.1:{tls_port}")];
        match wait_until_listening(&log, &addrs) {
            Ok(()) => break (child, stdin, url, ldaps_url),
            Err(why) => {
                drop(stdin);
                let _ = child.wait();
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                if !output.contains("Address already in use") {
                    panic!("{why}; its output:\n{output}");
                }
                failures.push(format!("{why}; its output:\n{output}"));
            }
        }
    };

    let slapd = Slapd {
        _dir: dir,
        _child: child,
        _stdin: Mutex::new(stdin),
        writes: Mutex::new(()),
        url,
        ldaps_url,
        base_dn: BASE_DN.to_owned(),
        people_dn: format!("ou=people,{BASE_DN}"),
        groups_dn: format!("ou=groups,{BASE_DN}"),
        service_dn: SERVICE_DN.to_owned(),
        service_password: SERVICE_PW.to_owned(),
        ca_file: pki.ca_file.clone(),
    };
    slapd.populate(flavor);
    slapd
}

/// Waits until slapd accepts connections on every one of `addrs`, or reports that it stopped
/// (its log says so) or did not listen within 20 s.
fn wait_until_listening(log: &Path, addrs: &[String]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Checked first: a port held by someone else would accept while slapd has exited.
        if std::fs::read_to_string(log).unwrap_or_default().contains("slapd stopped") {
            return Err("slapd exited at startup".to_owned());
        }
        if addrs.iter().all(|a| TcpStream::connect(a).is_ok()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("slapd did not start listening on {addrs:?} within 20 s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(dir: &Path, db: &Path, cert: &Path, key: &Path, flavor: Flavor) -> String {
    let schema = "/etc/ldap/schema";
    let dir = dir.display();
    let db = db.display();
    let cert = cert.display();
    let key = key.display();
    let (ppolicy_module, ppolicy_overlay) = match flavor {
        Flavor::Plain => ("", String::new()),
        Flavor::Ppolicy => {
            ("moduleload ppolicy\n", format!("overlay ppolicy\nppolicy_default \"{POLICY_DN}\"\nppolicy_use_lockout\n"))
        }
    };
    format!(
        r#"include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/inetorgperson.schema
include {schema}/nis.schema

pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
{ppolicy_module}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}

database mdb
maxsize 67108864
suffix "{BASE_DN}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PW}
directory {db}

overlay memberof
{ppolicy_overlay}
access to attrs=userPassword
    by anonymous auth
    by self auth
    by * none
access to dn.base="{BASE_DN}"
    by dn.exact="{SERVICE_DN}" read
    by * none
access to dn.subtree="ou=people,{BASE_DN}"
    by dn.exact="{SERVICE_DN}" read
    by self read
    by * none
access to dn.subtree="ou=groups,{BASE_DN}"
    by dn.exact="{SERVICE_DN}" read
    by users read
    by * none
access to *
    by * none
"#
    )
}

/// An LDIF line `attr:: <base64>`, safe for any value.
fn b64_line(attr: &str, value: &str) -> String {
    format!("{attr}:: {}\n", B64.encode(value))
}

impl Slapd {
    fn populate(&self, flavor: Flavor) {
        let mut ldif = format!(
            "dn: {BASE_DN}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n\n\
             dn: ou=people,{BASE_DN}\nobjectClass: organizationalUnit\nou: people\n\n\
             dn: ou=groups,{BASE_DN}\nobjectClass: organizationalUnit\nou: groups\n\n\
             dn: ou=services,{BASE_DN}\nobjectClass: organizationalUnit\nou: services\n\n\
             dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: postern\n{}",
            b64_line("userPassword", SERVICE_PW)
        );
        if flavor == Flavor::Ppolicy {
            // No grace logins after expiry; a day's maximum age, so only entries made old on
            // purpose are expired.
            ldif.push_str(&format!(
                "\ndn: ou=policies,{BASE_DN}\nobjectClass: organizationalUnit\nou: policies\n\n\
                 dn: {POLICY_DN}\nobjectClass: organizationalRole\nobjectClass: pwdPolicy\ncn: default\n\
                 pwdAttribute: userPassword\npwdLockout: TRUE\npwdMaxFailure: {PPOLICY_MAX_FAILURES}\n\
                 pwdLockoutDuration: 0\npwdMaxAge: 86400\npwdGraceAuthNLimit: 0\npwdMustChange: TRUE\n"
            ));
        }
        let code = self.ldap_tool("ldapadd", &ldif);
        assert_eq!(code, 0, "ldapadd of the base entries failed");
    }

    /// Runs `tool` (ldapadd / ldapmodify) as the root DN with `ldif` on stdin; returns its
    /// exit status, which is the LDAP result code.
    fn ldap_tool(&self, tool: &str, ldif: &str) -> i32 {
        self.ldap_tool_with(tool, &[], ldif)
    }

    /// [`Self::ldap_tool`] with `extra` arguments.
    fn ldap_tool_with(&self, tool: &str, extra: &[&str], ldif: &str) -> i32 {
        let mut child = Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ROOT_DN, "-w", ROOT_PW])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        child.stdin.take().expect("stdin").write_all(ldif.as_bytes()).expect("write LDIF");
        let out = child.wait_with_output().expect("wait for ldap tool");
        let code = out.status.code().unwrap_or(-1);
        if code != 0 && code != 32 {
            eprintln!("{tool} exited with {code}: {}", String::from_utf8_lossy(&out.stderr));
        }
        code
    }

    /// The DN of person `uid`.
    pub fn user_dn(&self, uid: &str) -> String {
        format!("uid={uid},{}", self.people_dn)
    }

    /// The DN of group `name`.
    pub fn group_dn(&self, name: &str) -> String {
        format!("cn={name},{}", self.groups_dn)
    }

    /// Creates person `uid` with `mail` and `password` and makes them a member of `groups`
    /// (created as needed). `uid` and group names must be plain DN-safe words.
    pub fn add_user(&self, uid: &str, mail: &str, password: &str, groups: &[&str]) {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let dn = self.user_dn(uid);
        let user = format!(
            "dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n{}{}",
            b64_line("mail", mail),
            b64_line("userPassword", password)
        );
        assert_eq!(self.ldap_tool("ldapadd", &user), 0, "adding user {uid} failed");
        for group in groups {
            self.add_member_locked(group, &dn);
        }
    }

    /// Makes the entry `member_dn` (a person or a group) a member of `group` (created as
    /// needed); group names must be plain DN-safe words.
    pub fn add_member(&self, group: &str, member_dn: &str) {
        let _guard = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.add_member_locked(group, member_dn);
    }

    fn add_member_locked(&self, group: &str, member_dn: &str) {
        let gdn = self.group_dn(group);
        let add_member = format!("dn: {gdn}\nchangetype: modify\nadd: member\nmember: {member_dn}\n");
        match self.ldap_tool("ldapmodify", &add_member) {
            0 => {}
            32 => {
                let create = format!("dn: {gdn}\nobjectClass: groupOfNames\ncn: {group}\nmember: {member_dn}\n");
                assert_eq!(self.ldap_tool("ldapadd", &create), 0, "creating group {group} failed");
            }
            code => panic!("adding {member_dn} to group {group} failed with {code}"),
        }
    }

    /// Sets the password policy attribute `attr` of person `uid` to `value` (with the relax
    /// control: the policy's own attributes are not for clients to write).
    pub fn set_policy_attribute(&self, uid: &str, attr: &str, value: &str) {
        let ldif = format!("dn: {}\nchangetype: modify\nreplace: {attr}\n{attr}: {value}\n", self.user_dn(uid));
        assert_eq!(self.ldap_tool_with("ldapmodify", &["-e", "relax"], &ldif), 0, "setting {attr} of {uid} failed");
    }
}

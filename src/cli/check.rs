//! `postern check`: the config, every file it names (present, parseable, and private where
//! it holds secrets), the directory and the upstream TLS settings.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::protocol::Protocol;
use anyhow::{Context, bail};

use crate::config::Config;
use crate::stores::directory::DirectoryConfig;

/// How a named file is judged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Secrecy {
    /// Holds a secret the daemon reads with [`crate::secret::read_secret_file`]: judged by
    /// that reader's own policy, so `check` refuses exactly what `serve` and reload refuse.
    Secret,
    /// Like [`Secrecy::Secret`], but a missing file is fine (the users file: missing is
    /// an empty directory).
    SecretOrMissing,
    /// Public (certificates, profiles): must only exist.
    Public,
}

/// Checks `path` as `secrecy` says. Returns a problem description, or `None`.
fn file_problem(what: &str, path: &Path, secrecy: Secrecy) -> Option<String> {
    match secrecy {
        Secrecy::Secret => crate::secret::check_secret_file(path).err().map(|e| format!("{what} {e}")),
        Secrecy::SecretOrMissing => match crate::secret::check_secret_file(path) {
            Err(e) if !e.is_missing() => Some(format!("{what} {e}")),
            _ => None,
        },
        Secrecy::Public => {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) => return Some(format!("{what} {}: {e}", path.display())),
            };
            let mode = meta.permissions().mode() & 0o777;
            if !meta.is_file() {
                return Some(format!("{what} {}: not a regular file", path.display()));
            }
            if mode & 0o002 != 0 {
                return Some(format!("{what} {}: world-writable (mode {mode:04o}); chmod o-w", path.display()));
            }
            None
        }
    }
}

/// The files `config` names, with how each is judged.
fn named_files(config: &Config) -> Vec<(String, PathBuf, Secrecy)> {
    let mut files = Vec::new();
    let generated = config.tls.generate_self_signed
        && !config.resolve(&config.tls.cert).exists()
        && !config.resolve(&config.tls.key).exists();
    if !generated {
        files.push(("tls.cert".into(), config.resolve(&config.tls.cert), Secrecy::Public));
        files.push(("tls.key".into(), config.resolve(&config.tls.key), Secrecy::Secret));
    }
    files.push(("access.profiles".into(), config.resolve(&config.access.profiles), Secrecy::Public));
    match &config.directory {
        DirectoryConfig::File(file) => {
            files.push(("directory.path".into(), config.resolve(&file.path), Secrecy::SecretOrMissing));
        }
        DirectoryConfig::Ldap(ldap) => {
            if let Some(f) = &ldap.bind_password_file {
                files.push(("directory.bind_password_file".into(), config.resolve(f), Secrecy::Secret));
            }
            if let Some(f) = &ldap.ca_file {
                files.push(("directory.ca_file".into(), config.resolve(f), Secrecy::Public));
            }
        }
    }
    for (key, _, upstream) in config.upstreams() {
        if let Some(f) = &upstream.upstream_ca_file {
            files.push((format!("{key}.upstream_ca_file"), config.resolve(f), Secrecy::Public));
        }
    }
    for (name, oauth) in config.oauth.iter() {
        let key = config.oauth.key(name);
        if let Some(f) = &oauth.service_account_key {
            files.push((format!("{key}.service_account_key"), config.resolve(f), Secrecy::Secret));
        }
        if let Some(f) = &oauth.client_secret_file {
            files.push((format!("{key}.client_secret_file"), config.resolve(f), Secrecy::Secret));
        }
    }
    let state_dir = config.resolve(&config.server.state_dir);
    for name in [crate::stores::vault::KEY_FILE, crate::stores::vault::VAULT_FILE] {
        let path = state_dir.join(name);
        if path.exists() {
            files.push((format!("vault {name}"), path, Secrecy::Secret));
        }
    }
    let app_passwords = state_dir.join(crate::stores::app_passwords::FILE);
    if app_passwords.exists() {
        files.push(("app passwords".into(), app_passwords, Secrecy::Secret));
    }
    files
}

/// The problems with the files `config` names, after printing each file that passed.
fn file_problems(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, file, secrecy) in named_files(config) {
        match file_problem(&format!("`{key}`"), &file, secrecy) {
            Some(problem) => problems.push(problem),
            None if secrecy == Secrecy::SecretOrMissing && !file.exists() => {
                println!("{key}: {} does not exist yet (an empty directory)", file.display());
            }
            None => println!("{key}: {} OK", file.display()),
        }
    }
    problems
}

/// Validates the config and everything it refers to, printing what was checked.
pub async fn check(path: &Path) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    if let DirectoryConfig::Ldap(ldap) = &config.directory
        && ldap.bind_password.is_some()
        && std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o007 != 0)
    {
        // `serve` reads the config whatever its mode, so this is a warning, not a problem.
        eprintln!(
            "warning: {} holds directory.bind_password and everyone may read it: run `chmod o-rwx {}`, or move the password to bind_password_file",
            path.display(),
            path.display()
        );
    }
    let problems = file_problems(&config);
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("problem: {problem}");
        }
        bail!("{} file problem(s); fix them and run check again", problems.len());
    }
    let profiles = crate::access::profiles::Profiles::load(&config.resolve(&config.access.profiles))?;
    let cert = config.resolve(&config.tls.cert);
    let key = config.resolve(&config.tls.key);
    if cert.exists() || !config.tls.generate_self_signed {
        crate::tls::server_config(&cert, &key, config.tls.min_version, None)?;
    }
    if let Some(ca) = &config.tls.client_ca {
        let crl = config.tls.client_crl.as_ref().map(|p| config.resolve(p));
        let client_ca = crate::access::certificate::ClientCa::load(&config.resolve(ca), crl.as_deref())?;
        println!(
            "client certificates: CA {} ({} CRL(s) loaded)",
            config.resolve(ca).display(),
            client_ca.revocation_lists()
        );
    } else if profiles.any_asks_for_certificates() {
        println!(
            "warning: profiles set client_cert but [tls] client_ca is not set, so no certificate counts (see `postern ca init`)"
        );
    }
    crate::stores::directory::Directory::open(&config.directory, &config.base_dir).await?;
    let state_dir = config.resolve(&config.server.state_dir);
    if state_dir.join(crate::stores::vault::KEY_FILE).exists() {
        let vault = crate::stores::vault::Vault::open(&state_dir)?;
        println!("vault: {} credential(s) in {}", vault.list().len(), vault.path().display());
    }
    // `serve` refuses an unreadable or corrupt app password file.
    let app_passwords = crate::stores::app_passwords::AppPasswords::load(&state_dir)?;
    if !app_passwords.is_empty() {
        println!("app passwords: {}", app_passwords.path().display());
    }
    let routing = crate::upstream::route::Routing::from_config(&config, None, &Default::default())
        .context("setting up the upstreams and OAuth2 token sources")?;
    for (protocol, p) in config.protocols() {
        let listen: Vec<String> = p.listeners().map(|(a, tls)| format!("{a} ({})", tls.name())).collect();
        println!("{protocol}: listen {} -> upstream {}", listen.join(", "), p.upstream.address);
        if p.listeners().any(|(a, _)| a.port() != 0 && a.port() < 1024) {
            println!("{protocol}: a port below 1024 needs CAP_NET_BIND_SERVICE (see the systemd unit's comments)");
        }
    }
    for route in &config.route {
        let targets: Vec<String> = Protocol::ALL
            .into_iter()
            .filter_map(|p| route.upstream(p).map(|u| format!("{p} -> {} ({})", u.address, u.upstream_auth.as_str())))
            .collect();
        let mut who: Vec<String> = route.domains.iter().map(|d| format!("domain {d}")).collect();
        who.extend(route.users.iter().map(|u| format!("user {u}")));
        who.extend(route.groups.iter().map(|g| format!("group {g}")));
        println!("route {}: {}: {}", route.name, who.join(", "), targets.join("; "));
    }
    for (name, source) in routing.sources() {
        println!("oauth source {name}: {} at {}", source.source().name(), source.token_url());
    }
    if let Some(metrics) = config.metrics.listen {
        println!("metrics: http://{metrics}/metrics");
    }
    if let Some(onboarding) = &config.onboarding {
        crate::web::onboarding::Certificate::prepare(&config).context("loading the onboarding certificate")?;
        println!(
            "onboarding: https://{} for {} -> clients told to use {}",
            onboarding.listen,
            onboarding.domains.join(", "),
            onboarding.host(&config.server.hostname)
        );
        if onboarding.listen.port() != 0 && onboarding.listen.port() < 1024 {
            println!("onboarding: a port below 1024 needs CAP_NET_BIND_SERVICE (see the systemd unit's comments)");
        }
    }
    println!("profiles: {} loaded from {}", profiles.len(), config.resolve(&config.access.profiles).display());
    println!("{}: OK", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::{self, Permissions};

    use super::*;

    #[test]
    fn the_tls_key_is_a_secret_file_and_missing_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        crate::tls::generate_self_signed("proxy.test", &cert, &key).unwrap();
        let load = || crate::tls::server_config(&cert, &key, crate::tls::TlsVersion::Tls12, None);
        assert!(load().is_ok());
        for mode in [0o644, 0o640, 0o604] {
            fs::set_permissions(&key, Permissions::from_mode(mode)).unwrap();
            assert!(file_problem("key", &key, Secrecy::Secret).unwrap().contains("chmod 600"), "{mode:o}");
            let refused = load().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(refused.contains("chmod 600"), "serve refuses what check refuses ({mode:o}): {refused}");
        }
        assert!(file_problem("cert", &key, Secrecy::Public).is_none());
        fs::set_permissions(&key, Permissions::from_mode(0o600)).unwrap();
        assert!(file_problem("key", &key, Secrecy::Secret).is_none());
        assert!(file_problem("key", &dir.path().join("missing"), Secrecy::Public).is_some());
        assert!(file_problem("key", &dir.path().join("missing"), Secrecy::Secret).is_some());
        assert!(file_problem("users", &dir.path().join("missing"), Secrecy::SecretOrMissing).is_none());
    }

    /// A config with an LDAP directory whose service password is in `service.pw`.
    fn ldap_config(dir: &Path) -> Config {
        let text = r#"[server]
hostname = "proxy.test"
state_dir = "state"

[tls]
cert = "c.pem"
key = "k.pem"

[directory]
kind = "ldap"
url = "ldap://127.0.0.1:1"
base_dn = "dc=example,dc=com"
bind_dn = "cn=service,dc=example,dc=com"
bind_password_file = "service.pw"
timeout_secs = 1

[access]
profiles = "profiles.toml"

[imap]
listen = ["127.0.0.1:0"]
upstream = "localhost:993"
"#;
        let path = dir.join("proxy.toml");
        fs::write(&path, text).unwrap();
        Config::parse(text, &path, dir.to_owned()).unwrap()
    }

    #[tokio::test]
    async fn check_and_loading_agree_on_the_bind_password_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = ldap_config(dir.path());
        let pw = dir.path().join("service.pw");
        fs::write(&pw, "service-secret\n").unwrap();
        let load = || crate::stores::directory::Directory::open(&config.directory, &config.base_dir);
        let check = || {
            named_files(&config)
                .into_iter()
                .find(|(key, ..)| key == "directory.bind_password_file")
                .and_then(|(key, file, secrecy)| file_problem(&key, &file, secrecy))
        };

        for mode in [0o640, 0o604, 0o660] {
            fs::set_permissions(&pw, Permissions::from_mode(mode)).unwrap();
            let checked = check().unwrap_or_else(|| panic!("check passed a {mode:o} bind password file"));
            let loaded = match load().await {
                Ok(_) => panic!("loading accepted a {mode:o} bind password file"),
                Err(e) => e.to_string(),
            };
            let fix = format!("chmod 600 {}", pw.display());
            assert!(checked.contains(&fix) && loaded.contains(&fix), "{checked} / {loaded}");
            assert!(!checked.contains("service-secret") && !loaded.contains("service-secret"));
        }
        for mode in [0o600, 0o400] {
            fs::set_permissions(&pw, Permissions::from_mode(mode)).unwrap();
            assert_eq!(check(), None, "{mode:o}");
            load().await.unwrap_or_else(|e| panic!("{mode:o}: {e}"));
        }
    }
}

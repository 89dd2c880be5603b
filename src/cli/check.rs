//! `postern check`: the config, every file it names (present, parseable, and private where
//! it holds secrets), the directory and the upstream TLS settings.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::stores::directory::DirectoryConfig;

/// How private a file must be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    /// Holds a secret: not readable by others (group is fine, for `root:postern 0640`).
    Secret,
    /// Public (certificates, profiles): must only exist.
    Public,
}

/// Checks that `path` exists and, for secrets, is not world-readable or world-writable.
/// Returns a problem description, or `None`.
fn file_problem(what: &str, path: &Path, secrecy: Secrecy) -> Option<String> {
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
    if secrecy == Secrecy::Secret && mode & 0o004 != 0 {
        return Some(format!("{what} {}: readable by everyone (mode {mode:04o}); chmod o-rwx", path.display()));
    }
    None
}

/// The files `config` names, with how private each must be.
fn named_files(config: &Config) -> Vec<(String, std::path::PathBuf, Secrecy)> {
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
            files.push(("directory.path".into(), config.resolve(&file.path), Secrecy::Secret));
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
    for (protocol, p) in config.protocols() {
        if let Some(f) = &p.upstream_ca_file {
            files.push((format!("{protocol}.upstream_ca_file"), config.resolve(f), Secrecy::Public));
        }
    }
    let state_dir = config.resolve(&config.server.state_dir);
    for name in [crate::stores::vault::KEY_FILE, crate::stores::vault::VAULT_FILE] {
        let path = state_dir.join(name);
        if path.exists() {
            files.push((format!("vault {name}"), path, Secrecy::Secret));
        }
    }
    files
}

/// Validates the config and everything it refers to, printing what was checked.
pub async fn check(path: &Path) -> anyhow::Result<()> {
    let config = super::load_config(path)?;
    let mut problems = Vec::new();
    if let DirectoryConfig::Ldap(ldap) = &config.directory {
        if ldap.bind_password.is_some() {
            if let Some(p) = file_problem("config file (holds directory.bind_password)", path, Secrecy::Secret) {
                problems.push(p);
            }
        }
    }
    for (key, file, secrecy) in named_files(&config) {
        match file_problem(&format!("`{key}`"), &file, secrecy) {
            Some(problem) => problems.push(problem),
            None => println!("{key}: {} OK", file.display()),
        }
    }
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
        crate::tls::server_config(&cert, &key, config.tls.min_version)?;
    }
    crate::stores::directory::Directory::open(&config.directory, &config.base_dir).await?;
    let state_dir = config.resolve(&config.server.state_dir);
    if state_dir.join(crate::stores::vault::KEY_FILE).exists() {
        let vault = crate::stores::vault::Vault::open(&state_dir)?;
        println!("vault: {} credential(s) in {}", vault.list().len(), vault.path().display());
    }
    for (protocol, p) in config.protocols() {
        let ca = p.upstream_ca_file.as_ref().map(|f| config.resolve(f));
        crate::upstream::Upstream::new(
            protocol,
            p,
            ca.as_deref(),
            &config.server.hostname,
            config.limits.upstream_timeout(),
        )
        .with_context(|| format!("[{protocol}] upstream"))?;
        let listen: Vec<String> = p.listen.iter().map(ToString::to_string).collect();
        println!("{protocol}: listen {} -> upstream {}", listen.join(", "), p.upstream);
        if p.listen.iter().any(|a| a.port() != 0 && a.port() < 1024) {
            println!("{protocol}: a port below 1024 needs CAP_NET_BIND_SERVICE (see the systemd unit's comments)");
        }
    }
    if crate::stores::oauth::TokenSource::from_config(&config).context("[oauth]")?.is_some() {
        println!("oauth: token source set up");
    }
    if let Some(metrics) = config.metrics.listen {
        println!("metrics: http://{metrics}/metrics");
    }
    println!("profiles: {} loaded from {}", profiles.len(), config.resolve(&config.access.profiles).display());
    println!("{}: OK", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_secrets_and_missing_files_are_problems() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "x").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(file_problem("key", &key, Secrecy::Secret).unwrap().contains("readable by everyone"));
        assert!(file_problem("cert", &key, Secrecy::Public).is_none());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(file_problem("key", &key, Secrecy::Secret).is_none());
        assert!(file_problem("key", &dir.path().join("missing"), Secrecy::Public).is_some());
    }
}

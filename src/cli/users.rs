//! `postern user ...`: upstream credentials one at a time and in bulk. Secrets are printed
//! only when generated (once) or when `--reveal` asks, and every reveal leaves an audit line.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};

use super::{SecretSource, load_config, normalized, read_secret};
use crate::config::Config;
use crate::stores::credentials_csv;
use crate::stores::directory::DirectoryConfig;
use crate::stores::vault::{self, Vault};

fn open_vault(config: &Config) -> anyhow::Result<Vault> {
    let state_dir = config.resolve(&config.server.state_dir);
    Ok(Vault::open(&state_dir)?)
}

/// Who runs the command, for audit lines: the process's real user (uid and the name
/// `/etc/passwd` gives it), and the login uid the kernel keeps across `sudo` and `su` where
/// it is set. Environment variables can be set by anyone, so `SUDO_USER` is only recorded as
/// a claim, under its own name.
fn operator() -> serde_json::Value {
    let uid = rustix::process::getuid().as_raw();
    let name = user_name_of(uid).unwrap_or_else(|| "-".into());
    let login_uid = std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|&id| id != u32::MAX);
    let mut operator = serde_json::json!({"uid": uid, "name": name});
    if let Some(login_uid) = login_uid {
        operator["login_uid"] = login_uid.into();
        operator["login_name"] = user_name_of(login_uid).unwrap_or_else(|| "-".into()).into();
    }
    if let Some(claim) = std::env::var("SUDO_USER").ok().filter(|v| !v.is_empty()) {
        operator["sudo_user_claimed"] = crate::user::escape(&claim).into_owned().into();
    }
    operator
}

/// The account name of `uid` in `/etc/passwd`.
fn user_name_of(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Records that secrets were shown: on the `audit` log target, and in the audit file when
/// one is configured.
fn audit_reveal(config: &Config, what: &str, users: &[String]) -> anyhow::Result<()> {
    let operator = operator();
    for user in users {
        tracing::warn!(target: "audit", event = "reveal", user = %user, operator = %operator, what, "upstream secret revealed");
    }
    if let Some(file) = &config.audit.file {
        let file = config.resolve(file);
        for user in users {
            let event = serde_json::json!({"event": "reveal", "user": user, "operator": operator, "what": what});
            crate::audit::file::append(&file, event)
                .context("the secret was not shown because the reveal cannot be audited")?;
        }
    }
    Ok(())
}

/// Records an admin's change to `user` (e.g. `app password added`), with who made it and
/// `details`: on the `audit` log target, and in the audit file when one is configured. The
/// change is made already, so a failure to write the file is only warned about.
pub(super) fn audit_admin(config: &Config, event: &str, user: &str, details: serde_json::Value) {
    let operator = operator();
    tracing::info!(target: "audit", event, user = %user, operator = %operator, details = %details, "admin change");
    if let Some(file) = &config.audit.file {
        let line = serde_json::json!({"event": event, "user": user, "operator": operator, "details": details});
        if let Err(e) = crate::audit::file::append(&config.resolve(file), line) {
            eprintln!("warning: the change is made, but the audit file did not get its line: {e}");
        }
    }
}

fn date(unix: u64) -> String {
    crate::audit::file::rfc3339(unix)
}

/// Replaces `user`'s upstream secret, keeping the old one as "previous"; or, with
/// `confirm`, forgets the previous one once the new secret works upstream.
pub fn rotate(path: &Path, user: &str, source: SecretSource, confirm: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let state_dir = config.resolve(&config.server.state_dir);
    if confirm {
        if !Vault::update(&state_dir, |vault| vault.confirm(&user))? {
            bail!("{user} has no previous upstream secret waiting for confirmation");
        }
        println!("confirmed the new upstream secret of {user}; the previous one is forgotten");
        return Ok(());
    }
    if !Vault::open(&state_dir)?.contains(&user) {
        bail!("{user} has no upstream secret to rotate; use `postern user set-upstream`");
    }
    let secret = match source {
        SecretSource::Generate => vault::generate_password(),
        SecretSource::Stdin | SecretSource::RefreshToken => read_secret("New upstream secret")?,
    };
    // Kind and upstream login come from the entry as it is under the lock.
    Vault::update(&state_dir, |vault| {
        if !vault.rotate_secret(&user, secret.clone())? {
            bail!("{user} has no upstream secret to rotate (it was removed meanwhile); nothing was changed");
        }
        Ok(())
    })?;
    if matches!(source, SecretSource::Generate) {
        println!("{}", secret.expose());
        eprintln!("set the password above on the upstream account now (it is not shown again)");
    }
    eprintln!(
        "rotated the upstream secret of {user}; the previous one is kept until `postern user rotate {user} --confirm`"
    );
    eprintln!("a running postern picks it up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Removes `user`'s upstream credential, and their entry in the file directory if any.
pub fn remove(path: &Path, user: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let removed = crate::stores::remove_user(&config, &user)?;
    if removed.is_empty() {
        bail!("{user} is not known: no upstream credential and no directory entry");
    }
    println!("removed {user}: {}", removed.join(" and "));
    eprintln!("a running postern applies it on reload and closes the user's live sessions");
    Ok(())
}

/// Lists users: whether an upstream credential is stored and when it last changed.
pub fn list(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let vault = open_vault(&config)?;
    let mut users: std::collections::BTreeMap<String, Option<vault::VaultListing>> =
        vault.list().into_iter().map(|l| (l.user.clone(), Some(l))).collect();
    if let DirectoryConfig::File(file) = &config.directory {
        let directory = crate::stores::directory::file::FileDirectory::open(file, &config.base_dir)?;
        for (user, _) in directory.users() {
            users.entry(user.to_owned()).or_insert(None);
        }
    }
    println!("{:<40} {:<10} {:<14} {:<21} upstream user", "user", "credential", "kind", "last changed");
    for (user, listing) in users {
        match listing {
            Some(l) => println!(
                "{:<40} {:<10} {:<14} {:<21} {}",
                user,
                if l.has_previous { "yes (+old)" } else { "yes" },
                l.kind.as_str(),
                date(l.changed),
                l.upstream_user.as_deref().unwrap_or("-")
            ),
            None => println!("{user:<40} {:<10} {:<14} {:<21} -", "no", "-", "-"),
        }
    }
    Ok(())
}

/// Shows what is stored for `user`; the secret itself only with `reveal`, audited.
pub fn show_upstream(path: &Path, user: &str, reveal: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let vault = open_vault(&config)?;
    let Some(stored) = vault.get(&user)? else {
        bail!("no upstream credential is stored for {user}");
    };
    println!("user: {user}");
    println!("upstream user: {}", stored.upstream_user.as_deref().unwrap_or(&user));
    println!("kind: {}", stored.kind);
    println!("changed: {}", date(stored.changed));
    let previous = vault.previous(&user)?;
    if let Some(p) = &previous {
        println!("previous (until confirmed): set {}", date(p.changed));
    }
    if !reveal {
        eprintln!("the secret is not shown; add --reveal (the reveal is audited)");
        return Ok(());
    }
    audit_reveal(&config, "show-upstream", std::slice::from_ref(&user))?;
    println!("secret: {}", stored.secret.expose());
    if let Some(p) = previous {
        println!("previous secret: {}", p.secret.expose());
    }
    Ok(())
}

/// Draws a progress bar on standard error when it is a terminal.
struct Progress {
    total: usize,
    visible: bool,
}

impl Progress {
    fn new(total: usize) -> Self {
        Self { total, visible: std::io::stderr().is_terminal() && total > 0 }
    }

    fn show(&self, done: usize) {
        if !self.visible {
            return;
        }
        const WIDTH: usize = 30;
        let filled = WIDTH * done / self.total.max(1);
        let bar = format!("{}{}", "#".repeat(filled), "-".repeat(WIDTH - filled));
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r[{bar}] {done}/{}", self.total);
        if done == self.total {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}

/// Imports upstream credentials from a CSV file (`user,password[,upstream_user]` with a
/// header line). Every row is validated first; nothing is written if any row is bad,
/// unless `skip_invalid`.
pub fn import(path: &Path, file: &Path, skip_invalid: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (accepted, rejected) = credentials_csv::validate(&text).with_context(|| format!("{}", file.display()))?;
    for message in &rejected {
        eprintln!("rejected: {message}");
    }
    if !rejected.is_empty() && !skip_invalid {
        bail!(
            "{} row(s) valid, {} rejected; nothing was written (fix the rows, or pass --skip-invalid)",
            accepted.len(),
            rejected.len()
        );
    }
    let state_dir = config.resolve(&config.server.state_dir);
    Vault::init(&state_dir)?;
    let progress = Progress::new(accepted.len());
    Vault::update(&state_dir, |vault| {
        credentials_csv::store(vault, &accepted, |i| progress.show(i))
            .map_err(|(user, e)| anyhow::Error::from(e).context(format!("storing {user} (rows before it are stored)")))
    })?;
    println!("imported {} row(s); rejected {}", accepted.len(), rejected.len());
    eprintln!("a running postern picks them up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Writes every stored credential as CSV to `output` (or standard output); secrets only with
/// `reveal`, audited, and then the file is created with mode 0600.
pub fn export(path: &Path, output: Option<&Path>, reveal: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let vault = open_vault(&config)?;
    let listings = vault.list();
    if reveal {
        let users: Vec<String> = listings.iter().map(|l| l.user.clone()).collect();
        audit_reveal(&config, "export", &users)?;
    }
    let text = credentials_csv::export(&vault, reveal)?;
    match output {
        Some(file) => {
            crate::fsutil::write_private_atomic(file, text.expose().as_bytes())
                .with_context(|| format!("writing {}", file.display()))?;
            eprintln!("exported {} user(s) to {}", listings.len(), file.display());
        }
        None => print!("{}", text.expose()),
    }
    Ok(())
}

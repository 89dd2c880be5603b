//! `postern user ...`: upstream credentials one at a time and in bulk. Secrets are printed
//! only when generated (once) or when `--reveal` asks, and every reveal leaves an audit line.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{Context, bail};

use super::{SecretSource, load_config, normalized, read_secret};
use crate::config::Config;
use crate::csv;
use crate::secret::Secret;
use crate::stores::directory::DirectoryConfig;
use crate::stores::vault::{self, UpstreamSecret, Vault};

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

/// A row of an import file that passed validation.
struct ImportRow {
    user: String,
    secret: Secret,
    upstream_user: Option<String>,
}

/// Validates every row of an import file; returns the good rows and one message per bad row.
fn validate_import(text: &str) -> anyhow::Result<(Vec<ImportRow>, Vec<String>)> {
    let records = csv::parse(text)?;
    let Some((header, rows)) = records.split_first() else {
        bail!("the file is empty; expected a header line `user,password[,upstream_user]`");
    };
    let column = |name: &str| header.fields.iter().position(|f| f.trim().eq_ignore_ascii_case(name));
    let (Some(user_col), Some(secret_col)) = (column("user"), column("password")) else {
        bail!("the header line must name the columns `user` and `password` (and optionally `upstream_user`)");
    };
    let upstream_col = column("upstream_user");
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    for record in rows {
        let cell = |i: usize| record.fields.get(i).map(String::as_str).unwrap_or("");
        let user = match normalized(cell(user_col)) {
            Ok(user) => user,
            Err(_) => {
                rejected.push(format!("line {}: `{}` is not a usable user name", record.line, cell(user_col)));
                continue;
            }
        };
        if !seen.insert(user.clone()) {
            rejected.push(format!("line {}: {user} appears more than once", record.line));
            continue;
        }
        let secret = cell(secret_col);
        if secret.is_empty() {
            rejected.push(format!("line {}: {user} has an empty password", record.line));
            continue;
        }
        if secret.chars().any(char::is_control) {
            rejected.push(format!("line {}: {user}'s password contains control characters", record.line));
            continue;
        }
        let upstream_user = upstream_col.map(cell).map(str::trim).filter(|u| !u.is_empty());
        if upstream_user.is_some_and(|u| u.chars().any(|c| c.is_control() || c.is_whitespace())) {
            rejected
                .push(format!("line {}: {user}'s upstream_user contains spaces or control characters", record.line));
            continue;
        }
        accepted.push(ImportRow { user, secret: Secret::new(secret), upstream_user: upstream_user.map(str::to_owned) });
    }
    Ok((accepted, rejected))
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
    let (accepted, rejected) = validate_import(&text).with_context(|| format!("{}", file.display()))?;
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
        for (i, row) in accepted.iter().enumerate() {
            let mut entry = UpstreamSecret::password(row.secret.clone());
            entry.upstream_user = row.upstream_user.clone();
            vault.set(&row.user, entry).with_context(|| format!("storing {} (rows before it are stored)", row.user))?;
            progress.show(i + 1);
        }
        anyhow::Ok(())
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
    let mut text = String::new();
    let mut header = vec!["user", "upstream_user", "kind", "changed", "previous_pending"];
    if reveal {
        header.push("password");
        let users: Vec<String> = listings.iter().map(|l| l.user.clone()).collect();
        audit_reveal(&config, "export", &users)?;
    }
    text.push_str(&csv::line(&header));
    for l in &listings {
        let changed = date(l.changed);
        let pending = if l.has_previous { "yes" } else { "no" };
        let mut row =
            vec![l.user.as_str(), l.upstream_user.as_deref().unwrap_or(""), l.kind.as_str(), &changed, pending];
        let secret = if reveal { vault.get(&l.user)?.map(|s| s.secret) } else { None };
        if let Some(secret) = &secret {
            row.push(secret.expose());
        }
        text.push_str(&csv::line(&row));
    }
    let text = Secret::new(text);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_validation_reports_each_bad_row() {
        let text = "user,password,upstream_user\r\nA@x.org,pw1,\r\nbad user,pw2\r\na@x.org,pw3\r\nb@x.org,\r\nc@x.org,pw,\"has space\"\r\nd@x.org,\"p,w\",d@gmail.com\r\n";
        let (ok, bad) = validate_import(text).unwrap();
        let users: Vec<&str> = ok.iter().map(|r| r.user.as_str()).collect();
        assert_eq!(users, ["a@x.org", "d@x.org"]);
        assert_eq!(ok[1].secret.expose(), "p,w");
        assert_eq!(ok[1].upstream_user.as_deref(), Some("d@gmail.com"));
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad[0].starts_with("line 3") && bad[1].contains("more than once") && bad[2].contains("empty"));
        assert!(validate_import("name,secret\n").is_err());
        assert!(validate_import("").is_err());
    }
}

//! What the command line does: serving, checks, users, the vault, and questions to the
//! running daemon. These run at the binary's edge, so errors are `anyhow` with context that
//! tells the admin what to do.

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::secret::Secret;
use crate::stores::directory::DirectoryConfig;
use crate::stores::vault::{self, UpstreamSecret, Vault};

pub mod app_passwords;
mod certs;
mod check;
pub mod control;
pub mod explain;
mod probe;
mod users;

pub use certs::{ca_init, cert_issue, cert_list, cert_revoke};
pub use check::check;
pub use explain::explain;
pub use probe::probe;
pub use users::{export, import, list, remove, rotate, show_upstream};

/// Loads the config file, with a hint when it is missing.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("loading {} (use --config to name another file)", path.display()))
}

/// Asks the running daemon for its status (and one user's last upstream result).
pub async fn status(path: &Path, user: Option<&str>) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let socket = config.control_socket();
    let answer = control::request(&socket, &serde_json::json!({"command": "status"})).await?;
    let get = |key: &str| answer.get(key).cloned().unwrap_or_default();
    println!("uptime: {}s", get("uptime_secs"));
    match get("last_reload").as_u64() {
        Some(t) => println!("last reload: {}", crate::audit::file::rfc3339(t)),
        None => println!("last reload: never"),
    }
    println!("profiles: {}", get("profiles"));
    println!("logged-in sessions: {}", get("logged_in"));
    if let Some(sessions) = answer.get("sessions").and_then(|s| s.as_object()) {
        for (protocol, counts) in sessions {
            println!("{protocol}: {} active, {} since start", counts["active"], counts["total"]);
        }
    }
    let locked = answer.get("locked").and_then(|l| l.as_array()).cloned().unwrap_or_default();
    println!("locked users: {}", locked.len());
    for entry in locked {
        let left = match entry["remaining_secs"].as_u64() {
            Some(secs) => format!("{secs}s left"),
            None => "until unlocked".to_owned(),
        };
        println!("  {} ({left}; `postern user unlock` lifts it)", entry["user"].as_str().unwrap_or("-"));
    }
    if let Some(user) = user {
        let user = normalized(user)?;
        let answer = control::request(&socket, &serde_json::json!({"command": "user", "user": user})).await?;
        match answer.get("last_result").filter(|r| !r.is_null()) {
            Some(r) => println!(
                "{user}: last upstream login {} over {}: {}",
                r["at"].as_u64().map(crate::audit::file::rfc3339).unwrap_or_default(),
                r["protocol"].as_str().unwrap_or("-"),
                r["message"].as_str().unwrap_or("-")
            ),
            None => println!("{user}: no upstream login since the daemon started"),
        }
    }
    Ok(())
}

/// Lifts a user's lockout in the running daemon.
pub async fn unlock(path: &Path, user: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let answer =
        control::request(&config.control_socket(), &serde_json::json!({"command": "unlock", "user": user})).await?;
    if answer["ok"] != serde_json::Value::Bool(true) {
        anyhow::bail!("the daemon refused: {}", answer["error"].as_str().unwrap_or("no reason given"));
    }
    if answer["was_locked"] == serde_json::Value::Bool(true) {
        println!("{user} unlocked");
    } else {
        println!("{user} was not locked; nothing changed");
    }
    Ok(())
}

/// Prints the audit file's lines for `user` since `since` ago (e.g. `1h`).
pub fn audit(path: &Path, file: Option<&Path>, user: Option<&str>, since: Option<&str>) -> anyhow::Result<()> {
    let file = match file {
        Some(file) => file.to_owned(),
        None => {
            let config = load_config(path)?;
            let Some(file) = &config.audit.file else {
                bail!("no audit file: set [audit] file in {} or pass --file", path.display());
            };
            config.resolve(file)
        }
    };
    let since = match since {
        Some(text) => {
            let back = crate::audit::file::parse_since(text)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            Some(now.saturating_sub(back).as_secs())
        }
        None => None,
    };
    let user = user.map(normalized).transpose()?;
    let filter = crate::audit::file::Filter { user, since, ..Default::default() };
    for event in crate::audit::file::read(&file, &filter)? {
        println!("{event}");
    }
    Ok(())
}

/// Creates the vault key and file under the state directory if they do not exist.
pub fn vault_init(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let state_dir = config.resolve(&config.server.state_dir);
    if Vault::init(&state_dir)? {
        println!("created a new vault key in {}", state_dir.display());
    } else {
        println!("the vault in {} already exists; nothing changed", state_dir.display());
    }
    Ok(())
}

/// Sets a user's directory password in the file directory.
pub fn set_password(path: &Path, user: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let DirectoryConfig::File(file) = &config.directory else {
        bail!("the directory is LDAP: change the password in the directory itself");
    };
    let user = normalized(user)?;
    let password = read_secret("New directory password")?;
    let users = config.resolve(&file.path);
    crate::stores::directory::file::set_password(&users, &user, &password)?;
    println!("password set for {user} in {}", users.display());
    eprintln!("a running postern picks it up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Where `set-upstream` takes the secret from.
#[derive(Debug, Clone, Copy)]
pub enum SecretSource {
    /// Generate a random password and print it once.
    Generate,
    /// Read it from standard input (e.g. an app password).
    Stdin,
    /// Read an OAuth2 refresh token from standard input (`[oauth] source = "refresh-token"`).
    RefreshToken,
}

/// Stores the upstream credential of `user` in the vault.
pub fn set_upstream(
    path: &Path,
    user: &str,
    source: SecretSource,
    upstream_user: Option<String>,
) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let state_dir = config.resolve(&config.server.state_dir);
    Vault::init(&state_dir)?;
    // Fail on an unusable vault before asking for the secret; the write re-reads it.
    Vault::open(&state_dir)?;
    let secret = match source {
        SecretSource::Generate => vault::generate_password(),
        SecretSource::Stdin => read_secret("Upstream password")?,
        SecretSource::RefreshToken => read_secret("OAuth2 refresh token")?,
    };
    let mut entry = match source {
        SecretSource::RefreshToken => UpstreamSecret::refresh_token(secret.clone()),
        _ => UpstreamSecret::password(secret.clone()),
    };
    if let Some(name) = upstream_user {
        entry = entry.with_upstream_user(name);
    }
    Vault::update(&state_dir, |vault| vault.set(&user, entry))?;
    match source {
        SecretSource::Generate => {
            println!("{}", secret.expose());
            eprintln!(
                "stored a new upstream password for {user}; set the password above on the upstream account now (it is not shown again)"
            );
        }
        SecretSource::Stdin => eprintln!("stored the upstream password for {user}"),
        SecretSource::RefreshToken => eprintln!("stored the OAuth2 refresh token for {user}"),
    }
    eprintln!("a running postern picks it up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Enrols `user`'s OAuth2 refresh token with the device authorization grant (RFC 8628) of
/// a refresh-token source (`source` names one of several `[oauth.NAME]` tables), and stores
/// it in the vault (keeping the user's upstream login name, if one is stored).
pub async fn authorize(path: &Path, user: &str, source: Option<&str>) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let source = crate::stores::oauth::TokenSource::chosen(&config, source)
        .with_context(|| format!("device enrolment needs a refresh-token source in {}", path.display()))?;
    let state_dir = config.resolve(&config.server.state_dir);
    Vault::init(&state_dir)?;
    let refresh_token = source
        .authorize_device(|codes| {
            println!("To let Postern read {user}'s mail, open {}", codes.verification_uri);
            println!("and enter the code {}", codes.user_code);
            if let Some(complete) = &codes.verification_uri_complete {
                println!("(or open {complete})");
            }
            eprintln!("waiting for the approval (the code is valid for {} s)...", codes.expires_in.as_secs());
        })
        .await?;
    let stored = user.clone();
    tokio::task::spawn_blocking(move || {
        Vault::update(&state_dir, |vault| vault.set_refresh_token(&stored, refresh_token))
    })
    .await
    .context("storing the refresh token")??;
    println!("stored the OAuth2 refresh token for {user}");
    eprintln!("a running postern picks it up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Writes a self-signed certificate and key.
pub fn cert_generate(hostname: &str, cert: &Path, key: &Path) -> anyhow::Result<()> {
    crate::tls::generate_self_signed(hostname, cert, key)?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}

pub(crate) fn normalized(user: &str) -> anyhow::Result<String> {
    Ok(crate::user::normalize(user)?)
}

/// Reads a secret: hidden prompt (asked twice) on a terminal, else one line of stdin.
pub(crate) fn read_secret(prompt: &str) -> anyhow::Result<Secret> {
    let secret = if std::io::stdin().is_terminal() {
        let first = Secret::new(rpassword::prompt_password(format!("{prompt}: "))?);
        let again = Secret::new(rpassword::prompt_password(format!("{prompt} (again): "))?);
        if first != again {
            bail!("the two entries differ; nothing was changed");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).context("reading the secret from standard input")?;
        let trimmed = line.trim_end_matches(['\r', '\n']).to_owned();
        zeroize::Zeroize::zeroize(&mut line);
        Secret::new(trimmed)
    };
    if secret.is_empty() {
        bail!("empty secret; nothing was changed");
    }
    Ok(secret)
}

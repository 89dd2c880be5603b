//! What the command line does besides serving: checks, users, the vault. These run at the
//! binary's edge, so errors are `anyhow` with context that tells the admin what to do.

use std::io::{BufRead, IsTerminal};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::directory::DirectoryConfig;
use crate::secret::Secret;
use crate::server::{self, Server};
use crate::vault::{self, UpstreamSecret, Vault};

/// Loads the config file, with a hint when it is missing.
pub fn load_config(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).with_context(|| format!("loading {} (use --config to name another file)", path.display()))
}

/// Validates the config and everything it refers to, printing what was checked.
pub async fn check(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let profiles = crate::access::Profiles::load(&config.resolve(&config.access.profiles))?;
    let cert = config.resolve(&config.tls.cert);
    let key = config.resolve(&config.tls.key);
    if cert.exists() || !config.tls.generate_self_signed {
        crate::tls::server_config(&cert, &key, config.tls.min_version)?;
    }
    crate::directory::Directory::open(&config.directory, &config.base_dir).await?;
    for (protocol, p) in config.protocols() {
        let ca = p.upstream_ca_file.as_ref().map(|f| config.resolve(f));
        crate::upstream::Upstream::new(protocol, p, ca.as_deref(), &config.server.hostname, config.limits.upstream_timeout())
            .with_context(|| format!("[{protocol}] upstream"))?;
        let listen: Vec<String> = p.listen.iter().map(ToString::to_string).collect();
        println!("{protocol}: listen {} -> upstream {}", listen.join(", "), p.upstream);
    }
    println!("profiles: {} loaded from {}", profiles.len(), config.resolve(&config.access.profiles).display());
    println!("{}: OK", path.display());
    Ok(())
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads profiles and the vault.
pub async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let server = Server::from_config(&config).await?;
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let running = server::start(server.clone(), &config, grace).await?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                let reloaded = match load_config(path) {
                    Ok(config) => server.reload(&config).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = reloaded {
                    tracing::error!(error = format!("{e:#}"), "reload failed; the previous profiles, vault and directory stay in force");
                }
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!(grace_secs = grace.as_secs(), "stopping: no new connections; sessions get the grace period");
    running.stop().await;
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
    crate::directory::file::set_password(&users, &user, &password)?;
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
}

/// Stores the upstream credential of `user` in the vault.
pub fn set_upstream(path: &Path, user: &str, source: SecretSource, upstream_user: Option<String>) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    let state_dir = config.resolve(&config.server.state_dir);
    Vault::init(&state_dir)?;
    let mut vault = Vault::open(&state_dir)?;
    let secret = match source {
        SecretSource::Generate => vault::generate_password(),
        SecretSource::Stdin => read_secret("Upstream password")?,
    };
    let mut entry = UpstreamSecret::password(secret.clone());
    if let Some(name) = upstream_user {
        entry = entry.with_upstream_user(name);
    }
    vault.set(&user, entry)?;
    match source {
        SecretSource::Generate => {
            println!("{}", secret.expose());
            eprintln!("stored a new upstream password for {user}; set the password above on the upstream account now (it is not shown again)");
        }
        SecretSource::Stdin => eprintln!("stored the upstream password for {user}"),
    }
    eprintln!("a running postern picks it up on reload (systemctl reload postern, or SIGHUP)");
    Ok(())
}

/// Writes a self-signed certificate and key.
pub fn cert_generate(hostname: &str, cert: &Path, key: &Path) -> anyhow::Result<()> {
    crate::tls::generate_self_signed(hostname, cert, key)?;
    println!("wrote {} and {}", cert.display(), key.display());
    Ok(())
}

fn normalized(user: &str) -> anyhow::Result<String> {
    crate::session::login::normalize_user(user)
        .map_err(|_| anyhow::anyhow!("`{user}` is not a usable user name: give the full mail address, without spaces"))
}

/// Reads a secret: hidden prompt (asked twice) on a terminal, else one line of stdin.
fn read_secret(prompt: &str) -> anyhow::Result<Secret> {
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

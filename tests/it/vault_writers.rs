//! The vault has one writer at a time across processes: admin commands run as separate
//! processes and the daemon writes rotated refresh tokens, and no write may be lost.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use postern::config::Config;
use postern::secret::Secret;
use postern::stores::oauth::TokenSource;
use postern::stores::vault::{UpstreamSecret, Vault};

const POSTERN: &str = env!("CARGO_BIN_EXE_postern");

/// How long the children get to load the config and reach the point where they wait for
/// the secret on standard input.
const SETTLE: Duration = Duration::from_millis(800);

/// A folder with a config (file directory, refresh-token OAuth2) and an initialised vault.
struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    state_dir: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("proxy.toml");
        std::fs::write(
            &config,
            r#"[server]
hostname = "proxy.test"
state_dir = "state"

[tls]
cert = "proxy.crt"
key = "proxy.key"

[directory]
kind = "file"
path = "users.toml"

[access]
profiles = "profiles.toml"

[imap]
listen = ["127.0.0.1:0"]
upstream = "localhost:993"
upstream_auth = "xoauth2"

[oauth]
source = "refresh-token"
token_url = "https://127.0.0.1:1/token"
client_id = "postern-test"
"#,
        )
        .expect("write config");
        let state_dir = dir.path().join("state");
        Vault::init(&state_dir).expect("vault init");
        Self { _dir: dir, config, state_dir }
    }

    /// Starts `postern user set-upstream USER --stdin`; it waits for the secret on stdin.
    fn start_set_upstream(&self, user: &str) -> Child {
        Command::new(POSTERN)
            .arg("--config")
            .arg(&self.config)
            .args(["user", "set-upstream", user, "--stdin"])
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run postern")
    }

    fn vault(&self) -> Vault {
        Vault::open(&self.state_dir).expect("open vault")
    }
}

/// Sends `secret` to a waiting child and checks that it succeeded.
fn finish(mut child: Child, secret: &str) {
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{secret}").expect("write secret");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for postern");
    assert!(output.status.success(), "postern failed: {}", String::from_utf8_lossy(&output.stderr));
}

fn upstream_secret(vault: &Vault, user: &str) -> Option<String> {
    vault.get(user).expect("vault get").map(|s| s.secret.expose().to_owned())
}

#[test]
fn concurrent_admin_commands_each_keep_their_user() {
    let setup = Setup::new();
    let users: Vec<String> = (0..12).map(|i| format!("writer{i}@example.com")).collect();
    let children: Vec<Child> = users.iter().map(|u| setup.start_set_upstream(u)).collect();
    std::thread::sleep(SETTLE);
    // Release all of them at once.
    let handles: Vec<_> = children
        .into_iter()
        .zip(&users)
        .map(|(child, user)| {
            let secret = format!("pw-of-{user}");
            std::thread::spawn(move || finish(child, &secret))
        })
        .collect();
    for handle in handles {
        handle.join().expect("writer thread");
    }
    let vault = setup.vault();
    let missing: Vec<&String> = users.iter().filter(|u| !vault.contains(u)).collect();
    assert!(missing.is_empty(), "writes lost for {missing:?}");
    for user in &users {
        assert_eq!(upstream_secret(&vault, user).as_deref(), Some(format!("pw-of-{user}").as_str()));
    }
}

fn token_source(config: &Path) -> TokenSource {
    let config = Config::load(config).expect("load config");
    TokenSource::chosen(&config, None).expect("the [oauth] token source")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_rotation_and_admin_set_upstream_both_survive() {
    let setup = Setup::new();
    let rotating = "rotating@example.com";
    let mut vault = setup.vault();
    vault.set(rotating, UpstreamSecret::refresh_token(Secret::new("token-0"))).expect("store token");
    drop(vault);
    let tokens = token_source(&setup.config);

    for round in 0..3 {
        let admin_user = format!("admin{round}@example.com");
        let child = setup.start_set_upstream(&admin_user);
        tokio::time::sleep(SETTLE).await;
        let used = Secret::new(format!("token-{round}"));
        let rotated = Secret::new(format!("token-{}", round + 1));
        let (stored, ()) = tokio::join!(tokens.store_rotated_refresh_token(rotating, &used, rotated), async {
            let secret = format!("pw-of-{admin_user}");
            tokio::task::spawn_blocking(move || finish(child, &secret)).await.expect("admin command");
        });
        assert!(stored.expect("rotation written").is_some(), "round {round}: rotation not applied");

        let vault = setup.vault();
        assert_eq!(
            upstream_secret(&vault, rotating).as_deref(),
            Some(format!("token-{}", round + 1).as_str()),
            "round {round}: the rotated refresh token was lost"
        );
        for r in 0..=round {
            let user = format!("admin{r}@example.com");
            assert_eq!(
                upstream_secret(&vault, &user).as_deref(),
                Some(format!("pw-of-{user}").as_str()),
                "round {round}: the admin's write for {user} was lost"
            );
        }
    }
}

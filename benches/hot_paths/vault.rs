//! Vault lookups: decrypting one user's upstream credential out of 10,000.
//!
//! `Vault::set` rewrites the whole file on every call, so filling one vault with 10,000
//! entries through it is quadratic. Instead, 100 vaults sharing one key are each filled
//! with 100 entries through `Vault::set`, and their `users` tables are merged into one
//! file that `Vault::open` then loads: every entry is a real sealed secret, bound to its
//! own user name, exactly as `set` wrote it.

use std::fs;
use std::hint::black_box;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use criterion::Criterion;
use postern::secret::Secret;
use postern::stores::vault::{UpstreamSecret, Vault};
use tempfile::TempDir;

const USERS: usize = 10_000;
const BATCH: usize = 100;
const VAULT_FILE: &str = "vault.toml";
const KEY_FILE: &str = "vault.key";

fn user(i: usize) -> String {
    format!("user{i:05}@example.com")
}

fn password(i: usize) -> String {
    format!("upstream-app-password-{i:05}")
}

/// A scratch directory, in memory when the system has `/dev/shm`, so the fsync on every
/// `set` costs nothing.
fn scratch() -> TempDir {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
    dir.expect("scratch directory")
}

/// Builds the 10,000-user vault under `root/state` and opens it.
fn build(root: &Path) -> Vault {
    let state = root.join("state");
    Vault::init(&state).expect("vault init");
    let mut users = toml::Table::new();
    for batch in 0..USERS / BATCH {
        let dir = root.join(format!("batch{batch}"));
        fs::create_dir(&dir).expect("batch dir");
        fs::copy(state.join(KEY_FILE), dir.join(KEY_FILE)).expect("copy key");
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o600)).expect("key mode");
        let mut vault = Vault::open(&dir).expect("batch vault");
        for i in batch * BATCH..(batch + 1) * BATCH {
            let secret = UpstreamSecret::password(Secret::new(password(i)));
            vault.set(&user(i), secret).expect("vault set");
        }
        let mut file = read_table(&dir.join(VAULT_FILE));
        if let Some(toml::Value::Table(batch_users)) = file.remove("users") {
            users.extend(batch_users);
        }
        fs::remove_dir_all(&dir).expect("remove batch dir");
    }
    let path = state.join(VAULT_FILE);
    let mut file = read_table(&path);
    file.insert("users".into(), toml::Value::Table(users));
    fs::write(&path, toml::to_string(&file).expect("vault toml")).expect("write merged vault");
    Vault::open(&state).expect("open merged vault")
}

fn read_table(path: &Path) -> toml::Table {
    let text = fs::read_to_string(path).expect("vault file");
    text.parse().expect("vault toml")
}

/// Benchmarks `Vault::get` of a stored and of a missing user among 10,000, and
/// `Vault::open` of the whole file (what a reload costs).
pub fn bench(c: &mut Criterion) {
    let scratch = scratch();
    let vault = build(scratch.path());
    assert_eq!(vault.list().len(), USERS);
    let target = user(USERS * 7 / 10);
    let found = vault.get(&target).expect("decrypt").expect("stored");
    assert_eq!(found.secret.expose(), password(USERS * 7 / 10));
    assert!(vault.get("nobody@example.com").expect("lookup").is_none());

    let mut group = c.benchmark_group("vault");
    group.bench_function("get_1_of_10000", |b| b.iter(|| vault.get(black_box(&target))));
    group.bench_function("get_missing_of_10000", |b| b.iter(|| vault.get(black_box("nobody@example.com"))));
    group.sample_size(10);
    group.bench_function("open_10000", |b| b.iter(|| Vault::open(black_box(scratch.path().join("state").as_path()))));
    group.finish();
}

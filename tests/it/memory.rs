//! Directory passwords do not linger in the daemon's memory: after logins, a scan of the
//! process's writable memory (`/proc/PID/mem`, as root or the same user) counts the copies
//! of a password that is used nowhere else, and finds none once the sessions are over
//! (freed memory is wiped by the allocator; no connection that carried a password is kept).

use std::io::{Read, Seek, SeekFrom};

use crate::common::client;
use crate::install::{Daemon, Install, profiles_for};

/// Occurrences of `needle` in the writable mappings of process `pid`.
fn copies_in_memory(pid: u32, needle: &[u8]) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open the daemon's memory (run as root)");
    let mut count = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) else { continue };
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        count += region.windows(needle.len()).filter(|w| *w == needle).count();
    }
    count
}

/// Logs in five times with the right password and five times with a wrong one, then
/// counts the copies of each left in the daemon's memory.
async fn scan_after_logins(install: &Install, user: &str, password: &str, wrong: &str) -> (usize, usize) {
    let daemon = Daemon::start(install);
    for round in 0..5 {
        for (tag, pw) in [("a", password), ("b", wrong)] {
            let mut c = client::connect_tls(daemon.imaps, &install.ca_file).await;
            c.read_line().await;
            c.send(format!("{tag}{round} LOGIN {user} {pw}\r\n").as_bytes()).await;
            c.read_until_tagged(&format!("{tag}{round}")).await;
            c.send(format!("z{round} LOGOUT\r\n").as_bytes()).await;
            c.read_to_end_or_close().await;
        }
    }
    // Sessions have ended once their audit lines are written.
    let audit = install.path("audit.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while crate::install::audit_lines(&audit).iter().filter(|l| l["event"] == "session").count() < 10 {
        assert!(std::time::Instant::now() < deadline, "ten sessions audited");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (copies_in_memory(daemon.pid(), password.as_bytes()), copies_in_memory(daemon.pid(), wrong.as_bytes()))
}

#[tokio::test]
async fn directory_passwords_do_not_linger_in_the_daemons_memory_file_directory() {
    let user = "memory-file@example.com";
    let install = Install::new(&profiles_for(&[user]), "", "[lockout]\nfailure_delay_ms = 0\nmax_failures = 0\n");
    let password = "Mem-File-Directory-Password-63021";
    install.add_user(user, password);
    let (right, guessed) = scan_after_logins(&install, user, password, "Mem-File-Wrong-Guess-50077").await;
    eprintln!(
        "file directory, after 5 right and 5 wrong logins: {right} copies of the password, {guessed} of the wrong one"
    );
    assert_eq!((right, guessed), (0, 0), "copies of directory passwords remain in the daemon's memory");
}

#[tokio::test]
async fn directory_passwords_do_not_linger_in_the_daemons_memory_ldap() {
    let (uid, user) = ("memory-ldap", "memory-ldap@example.com");
    let install = Install::new(&profiles_for(&[user]), "", "[lockout]\nfailure_delay_ms = 0\nmax_failures = 0\n");
    let s = crate::common::slapd::slapd();
    let ldap = format!(
        "kind = \"ldap\"\nurl = {:?}\nbind_dn = {:?}\nbind_password = {:?}\nbase_dn = {:?}\nfilter = \"(mail={{user}})\"\n",
        s.url, s.service_dn, s.service_password, s.base_dn
    );
    let config = install.config_text().replace("kind = \"file\"\npath = \"users.toml\"\n", &ldap);
    std::fs::write(&install.config, config).unwrap();
    let password = "Mem-Ldap-Directory-Password-41187";
    install.add_user(user, "unused-file-password");
    s.add_user(uid, user, password, &[]);
    let (right, guessed) = scan_after_logins(&install, user, password, "Mem-Ldap-Wrong-Guess-72290").await;
    eprintln!("LDAP, after 5 right and 5 wrong logins: {right} copies of the password, {guessed} of the wrong one");
    assert_eq!((right, guessed), (0, 0), "copies of directory passwords remain in the daemon's memory");
}

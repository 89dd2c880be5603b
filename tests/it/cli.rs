//! The admin commands of the real binary, each with its error paths and exit codes
//! (0 done, 1 operational failure, 2 usage error).

use crate::install;

use std::os::unix::fs::PermissionsExt;

use install::{Install, expect_code, profiles_for, text};

fn install() -> Install {
    Install::new(&profiles_for(&["alice@example.com"]), "", "")
}

#[test]
fn usage_errors_exit_2_and_help_is_everywhere() {
    let i = install();
    expect_code(&i.run(&["user", "rotate"], ""), 2);
    expect_code(&i.run(&["access", "explain", "a@x", "not-an-ip"], ""), 2);
    expect_code(&i.run(&["probe", "a@x", "--protocol", "gopher"], ""), 2);
    expect_code(&i.run(&["user", "set-upstream", "a@x"], ""), 2);
    for args in [&["--help"][..], &["user", "import", "--help"], &["access", "explain", "--help"], &["audit", "--help"]]
    {
        let out = expect_code(&i.run(args, ""), 0);
        assert!(out.contains("Usage:"), "{out}");
    }
}

#[test]
fn cert_generate_writes_a_private_key_and_reports_unwritable_places() {
    let i = install();
    let cert = i.path("gen/c.pem");
    let key = i.path("gen/k.pem");
    std::fs::create_dir(i.path("gen")).unwrap();
    let args = [
        "cert",
        "generate",
        "--hostname",
        "mail.test",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    expect_code(&i.run(&args, ""), 0);
    assert!(std::fs::read_to_string(&cert).unwrap().contains("BEGIN CERTIFICATE"));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o077, 0);
    let under_a_file = i.path("proxy.toml").join("c.pem");
    let args = ["cert", "generate", "--cert", under_a_file.to_str().unwrap(), "--key", under_a_file.to_str().unwrap()];
    expect_code(&i.run(&args, ""), 1);
}

#[test]
fn check_passes_then_flags_a_world_readable_key_and_a_missing_config() {
    let i = install();
    let out = expect_code(&i.run(&["check"], ""), 0);
    assert!(out.contains("tls.key") && out.contains(": OK"), "{out}");
    let key = i.path("proxy.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = i.run(&["check"], "");
    expect_code(&output, 1);
    assert!(text(&output).1.contains("readable by everyone"), "{:?}", text(&output));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::remove_file(i.path("profiles.toml")).unwrap();
    let output = i.run(&["check"], "");
    expect_code(&output, 1);
    assert!(text(&output).1.contains("profiles.toml"));
    let missing = std::process::Command::new(install::POSTERN)
        .args(["--config", "/nonexistent/proxy.toml", "check"])
        .output()
        .unwrap();
    expect_code(&missing, 1);
}

#[test]
fn upstream_credentials_set_list_show_rotate_and_remove() {
    let i = install();
    let user = "carol@example.com";
    let generated = expect_code(&i.run(&["user", "set-upstream", user, "--generate"], ""), 0);
    let generated = generated.trim().to_owned();
    assert_eq!(generated.len(), 24);
    expect_code(&i.run(&["user", "set-upstream", "dave@example.com", "--stdin"], "dave-app-pw\n"), 0);
    expect_code(&i.run(&["user", "set-upstream", "erin@example.com", "--stdin"], "\n"), 1);
    expect_code(&i.run(&["user", "set-upstream", "erin@example.com", "--refresh-token"], "tok\n"), 2);
    expect_code(
        &i.run(&["user", "set-upstream", "erin@example.com", "--stdin", "--refresh-token"], "1//refresh-tok\n"),
        0,
    );
    let listed = expect_code(&i.run(&["user", "list"], ""), 0);
    assert!(listed.contains("erin@example.com") && listed.contains("refresh-token"), "{listed}");

    let list = expect_code(&i.run(&["user", "list"], ""), 0);
    assert!(list.contains(user) && list.contains("dave@example.com") && list.contains("password"), "{list}");
    assert!(!list.contains(&generated) && !list.contains("dave-app-pw"), "{list}");

    let shown = expect_code(&i.run(&["user", "show-upstream", user], ""), 0);
    assert!(shown.contains("kind: password") && !shown.contains(&generated), "{shown}");
    let revealed = expect_code(&i.run(&["user", "show-upstream", user, "--reveal"], ""), 0);
    assert!(revealed.contains(&generated), "{revealed}");
    let audit = install::audit_lines(&i.path("audit.jsonl"));
    assert!(audit.iter().any(|e| e["event"] == "reveal" && e["user"] == user), "{audit:?}");
    expect_code(&i.run(&["user", "show-upstream", "nobody@example.com"], ""), 1);

    let rotated = expect_code(&i.run(&["user", "rotate", user], ""), 0).trim().to_owned();
    assert!(rotated.len() == 24 && rotated != generated);
    let list = expect_code(&i.run(&["user", "list"], ""), 0);
    assert!(list.contains("yes (+old)"), "{list}");
    let revealed = expect_code(&i.run(&["user", "show-upstream", user, "--reveal"], ""), 0);
    assert!(
        revealed.contains(&format!("secret: {rotated}")) && revealed.contains(&format!("previous secret: {generated}"))
    );
    expect_code(&i.run(&["user", "rotate", user, "--confirm"], ""), 0);
    expect_code(&i.run(&["user", "rotate", user, "--confirm"], ""), 1);
    expect_code(&i.run(&["user", "rotate", "nobody@example.com"], ""), 1);
    expect_code(&i.run(&["user", "rotate", user, "--stdin"], "typed-new-pw\n"), 0);

    expect_code(&i.run(&["user", "remove", user], ""), 0);
    expect_code(&i.run(&["user", "remove", user], ""), 1);
    expect_code(&i.run(&["user", "remove", "not a user"], ""), 1);
    assert!(!expect_code(&i.run(&["user", "list"], ""), 0).contains(user));
}

#[test]
fn import_validates_every_row_first_and_export_hides_secrets() {
    let i = install();
    let bad = i.path("bad.csv");
    std::fs::write(
        &bad,
        "user,password,upstream_user\nf1@example.com,pw-f1,\nbroken user,pw\nf2@example.com,\"pw,f2\",f2@gmail.com\n",
    )
    .unwrap();
    let output = i.run(&["user", "import", bad.to_str().unwrap()], "");
    expect_code(&output, 1);
    let (_, err) = text(&output);
    assert!(err.contains("rejected: line 3") && err.contains("2 row(s) valid, 1 rejected"), "{err}");
    assert!(!expect_code(&i.run(&["user", "list"], ""), 0).contains("f1@example.com"), "nothing written");

    let out = expect_code(&i.run(&["user", "import", bad.to_str().unwrap(), "--skip-invalid"], ""), 0);
    assert!(out.contains("imported 2 row(s); rejected 1"), "{out}");
    expect_code(&i.run(&["user", "import", i.path("missing.csv").to_str().unwrap()], ""), 1);
    let headerless = i.path("headerless.csv");
    std::fs::write(&headerless, "g@example.com,pw\n").unwrap();
    expect_code(&i.run(&["user", "import", headerless.to_str().unwrap()], ""), 1);

    let export = expect_code(&i.run(&["user", "export"], ""), 0);
    assert!(export.contains("f2@example.com,f2@gmail.com,password"), "{export}");
    assert!(!export.contains("pw-f1") && !export.contains("pw,f2"), "{export}");
    let file = i.path("export.csv");
    expect_code(&i.run(&["user", "export", "--reveal", "--output", file.to_str().unwrap()], ""), 0);
    let revealed = std::fs::read_to_string(&file).unwrap();
    assert!(revealed.contains("pw-f1") && revealed.contains("\"pw,f2\""), "{revealed}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    let fresh = install();
    let out = expect_code(&fresh.run(&["user", "import", file.to_str().unwrap()], ""), 0);
    assert!(out.contains("imported 2 row(s)"), "an export with secrets imports again: {out}");
}

#[test]
fn access_explain_names_the_profile_or_the_reason() {
    let i = install();
    postern::stores::directory::file::set_password(
        &i.path("users.toml"),
        "alice@example.com",
        &postern::secret::Secret::new("pw"),
    )
    .unwrap();
    let out = expect_code(&i.run(&["access", "explain", "alice@example.com", "127.0.0.1"], ""), 0);
    assert!(
        out.contains("allow entry 127.0.0.1/32 matches") && out.contains("decision: allowed by profile \"loopback\""),
        "{out}"
    );
    assert!(out.contains("upstream credential: missing"), "{out}");
    let out =
        expect_code(&i.run(&["access", "explain", "alice@example.com", "192.0.2.7", "--protocol", "pop3"], ""), 0);
    assert!(
        out.contains("no allow entry matches 192.0.2.7") && out.contains("refused: client IP not allowed"),
        "{out}"
    );
    let out = expect_code(&i.run(&["access", "explain", "zed@example.com", "127.0.0.1"], ""), 0);
    assert!(out.contains("unknown user"), "{out}");
    std::fs::write(i.path("profiles.toml"), "[[profile]]\nname = 1\n").unwrap();
    expect_code(&i.run(&["access", "explain", "alice@example.com", "127.0.0.1"], ""), 1);
}

#[test]
fn probe_prints_ok_or_the_upstream_answer() {
    let i = install();
    i.add_user("probe1@example.com", "dir-pw");
    let out = expect_code(&i.run(&["probe", "probe1@example.com"], ""), 0);
    assert!(out.starts_with("OK"), "{out}");
    i.set_upstream("probe1@example.com", "wrong-upstream-pw");
    let output = i.run(&["probe", "probe1@example.com", "--protocol", "imap"], "");
    let out = expect_code(&output, 1);
    assert!(out.contains("NO") && out.to_lowercase().contains("auth"), "the upstream's own answer: {out}");
    expect_code(&i.run(&["probe", "nobody@example.com"], ""), 1);
    expect_code(&i.run(&["probe", "probe1@example.com", "--protocol", "pop3"], ""), 1);
}

#[test]
fn probe_of_an_unreachable_upstream_says_it_cannot_connect_not_that_the_credential_was_refused() {
    let i = install();
    i.add_user("probe2@example.com", "dir-pw");
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = i.config_text();
    let upstream = config.lines().find(|l| l.starts_with("upstream = ")).expect("an upstream line").to_owned();
    std::fs::write(i.path("proxy.toml"), config.replacen(&upstream, &format!("upstream = \"127.0.0.1:{closed}\""), 1))
        .unwrap();
    let output = i.run(&["probe", "probe2@example.com", "--protocol", "imap"], "");
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("cannot log in to") && stderr.contains("cannot connect"), "{stderr}");
    assert!(!stderr.contains("refused the"), "a connection failure is not a refusal: {stderr}");
}

#[test]
fn audit_filters_by_user_and_time_and_status_needs_a_daemon() {
    let i = install();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let lines = format!(
        "{{\"time\":\"x\",\"unix\":{},\"event\":\"session\",\"user\":\"old@example.com\"}}\n{{\"time\":\"x\",\"unix\":{now},\"event\":\"session\",\"user\":\"new@example.com\"}}\n{{\"time\":\"x\",\"unix\":{now},\"event\":\"session\",\"user\":\"other@example.com\"}}\n",
        now - 7200
    );
    std::fs::write(i.path("audit.jsonl"), lines).unwrap();
    let out = expect_code(&i.run(&["audit", "--since", "1h"], ""), 0);
    assert_eq!(out.lines().count(), 2, "{out}");
    let out = expect_code(&i.run(&["audit", "--user", "NEW@example.com", "--since", "1h"], ""), 0);
    assert!(out.lines().count() == 1 && out.contains("new@example.com"), "{out}");
    let out = expect_code(&i.run(&["audit", "--user", "old@example.com"], ""), 0);
    assert_eq!(out.lines().count(), 1, "{out}");
    expect_code(&i.run(&["audit", "--since", "soon"], ""), 1);
    expect_code(&i.run(&["audit", "--file", i.path("none.jsonl").to_str().unwrap()], ""), 1);

    let output = i.run(&["status"], "");
    expect_code(&output, 1);
    assert!(text(&output).1.contains("is postern running"), "{:?}", text(&output));
}

#[test]
fn a_reveal_is_audited_under_the_real_user_not_what_the_environment_claims() {
    let i = install();
    i.add_user("reveal1@example.com", "dir-pw");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(["--config", i.config.to_str().unwrap(), "user", "show-upstream", "reveal1@example.com", "--reveal"])
        .env("SUDO_USER", "innocent-intern")
        .env("USER", "innocent-intern")
        .env("LOGNAME", "innocent-intern")
        .output()
        .expect("run postern");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let audit = install::audit_lines(&i.path("audit.jsonl"));
    let reveal = audit.iter().find(|e| e["event"] == "reveal").expect("the reveal is audited");
    let uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:").map(|ids| ids.split_whitespace().next().unwrap().parse::<u64>().unwrap()))
        .unwrap();
    assert_eq!(reveal["operator"]["uid"], uid, "the real uid of the process: {reveal}");
    assert_ne!(reveal["operator"]["name"], "innocent-intern", "{reveal}");
    assert_eq!(reveal["operator"]["sudo_user_claimed"], "innocent-intern", "kept as a labelled claim: {reveal}");
}

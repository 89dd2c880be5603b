//! TLS toward the upstream: a second login to the same Dovecot resumes the first one's TLS
//! 1.3 session (no certificate, no signature), and the session uses X25519 with
//! AES-128-GCM, the cheapest choices both sides support. The Dovecot here serves every
//! connection from one login process: in its default mode each connection has a process of
//! its own, with its own ticket keys, and nothing can be resumed.

use std::path::Path;
use std::time::Duration;

use postern::config::Config;
use postern::protocol::Protocol;
use postern::secret::Secret;
use postern::upstream::{Upstream, UpstreamAuth};
use rustls::{CipherSuite, HandshakeKind, NamedGroup};

use crate::common::dovecot;

/// The library's IMAP upstream for the harness's Dovecot, as the daemon builds it.
fn imap_upstream(dir: &Path) -> Upstream {
    let d = dovecot::dovecot_one_login_process();
    let text = format!(
        "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[directory]\nkind = \"file\"\npath = \"users.toml\"\n\
         [access]\nprofiles = \"profiles.toml\"\n[imap]\nlisten = [\"127.0.0.1:0\"]\n\
         upstream = \"localhost:{}\"\nupstream_ca_file = {:?}\n",
        d.imaps.port(),
        d.ca_file.display().to_string()
    );
    let config = Config::parse(&text, &dir.join("proxy.toml"), dir.to_owned()).expect("config");
    let imap = config.imap.as_ref().expect("imap table");
    Upstream::new(Protocol::Imap, &imap.upstream, Some(&d.ca_file), "proxy.test", Duration::from_secs(30))
        .expect("upstream")
}

#[tokio::test]
async fn the_second_upstream_login_resumes_the_tls_session() {
    let d = dovecot::dovecot_one_login_process();
    let user = "resume-upstream@example.com";
    d.add_user(user, "resume-up-pw");
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = imap_upstream(dir.path());
    let auth = UpstreamAuth::Password { user: user.to_owned(), password: Secret::new("resume-up-pw") };
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let logged_in = upstream.login(&auth, None, None).await.expect("upstream login");
        let tls = logged_in.stream.tls();
        assert_eq!(tls.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(
            tls.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_128_GCM_SHA256),
            "AES-128-GCM is preferred toward the upstream"
        );
        if tls.handshake_kind() != Some(HandshakeKind::Resumed) {
            assert_eq!(tls.negotiated_key_exchange_group().map(|g| g.name()), Some(NamedGroup::X25519));
        }
        kinds.push(tls.handshake_kind());
    }
    eprintln!("upstream handshakes: {kinds:?}");
    assert_eq!(kinds[0], Some(HandshakeKind::Full), "the first login is a full handshake");
    assert_eq!(
        &kinds[1..],
        &[Some(HandshakeKind::Resumed), Some(HandshakeKind::Resumed)],
        "later logins resume the upstream TLS session"
    );
}

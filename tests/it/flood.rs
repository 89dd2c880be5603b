//! Floods before the TLS handshake: one address holding silent TCP connections must not
//! keep other addresses from being served.

use std::time::Duration;

use crate::common::client;
use crate::common::logs;
use crate::common::proxy::{self, Options};

#[tokio::test]
async fn silent_connections_from_one_address_do_not_starve_another() {
    logs::capture();
    let mail = "flood-victim@example.com";
    let profiles = format!("[[profile]]\nname = \"lab\"\nallow = [\"127.0.0.0/8\"]\nusers = [\"{mail}\"]\n");
    let limits = "max_connections = 40\nhandshake_timeout_secs = 30\npreauth_timeout_secs = 30".to_owned();
    let proxy = proxy::Proxy::start(Options { profiles, limits, ..Options::default() }).await;
    let user = proxy::add_user(&proxy, "flood-victim", "flood-victim-pw");
    // The attacker: as many silent TCP connections as the proxy has connection permits,
    // from one address, never starting TLS.
    let attacker: std::net::IpAddr = "127.0.2.1".parse().unwrap();
    let mut silent = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(attacker, 0)).unwrap();
        silent.push(socket.connect(proxy.imaps).await.expect("tcp connect"));
    }
    // Another address logs in while the flood holds on (the handshake timeout is 30 s, so
    // only a proxy that refuses the excess early gets here in time).
    let login = async {
        let mut c = client::connect_tls_from("127.0.2.2".parse().unwrap(), proxy.imaps, &proxy.ca_file).await;
        assert!(c.read_line().await.starts_with("* OK"));
        c.send(format!("v1 LOGIN {} {}\r\n", user.mail, user.password).as_bytes()).await;
        c.read_until_tagged("v1").await.pop().unwrap_or_default()
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), login).await.expect("served during the flood");
    assert!(answer.starts_with("v1 OK"), "{answer}");
    drop(silent);
    proxy.stop().await;
}

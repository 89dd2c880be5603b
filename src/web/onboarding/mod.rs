//! Mail clients set themselves up: the public HTTPS listener (`[onboarding]`) answers
//! Mozilla autoconfig (Thunderbird and others), Microsoft Autodiscover POX (Outlook) and
//! hands out Apple configuration profiles (iPhone, iPad, macOS Mail), each describing
//! Postern's host, listener ports and TLS for the mail domains it serves.
//!
//! Nothing secret is in any answer and no password is asked for; every request is
//! rate-limited per client address and logged (never its body). The documents are built by
//! pure functions ([`autoconfig`], [`autodiscover`], [`mobileconfig`]) from a [`Site`];
//! [`routes`] serves them.

pub mod autoconfig;
pub mod autodiscover;
pub mod mobileconfig;
pub mod rate;
pub mod routes;
mod xml;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::{ClientTls, Config, OnboardingConfig};
use crate::protocol::Protocol;
use crate::state::State;
use crate::tls::TlsError;

/// Why the onboarding listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The listen address could not be bound.
    #[error("cannot listen on {address} for onboarding: {source} (is another process using the port?)")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// `[onboarding] cert`/`key` cannot be used.
    #[error("onboarding certificate: {0}")]
    Certificate(#[from] TlsError),
}

/// One listener mail clients can be told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Server {
    /// The protocol.
    pub protocol: Protocol,
    /// The port clients connect to.
    pub port: u16,
    /// Implicit TLS (`SSL` in the documents) or STARTTLS.
    pub tls: ClientTls,
}

/// What the documents describe: the public host, the domains answered and the listeners.
#[derive(Debug, Clone)]
pub struct Site {
    host: String,
    display_name: Option<String>,
    domains: Vec<String>,
    servers: Vec<Server>,
}

impl Site {
    /// The site for `config`, telling clients about the `listeners` as bound (only their
    /// ports matter: a listener on `0.0.0.0` or `[::]` is reached through `host`). Per
    /// protocol and kind of TLS the first listener's port is published.
    pub fn new(
        config: &OnboardingConfig,
        server_hostname: &str,
        listeners: impl IntoIterator<Item = (Protocol, ClientTls, SocketAddr)>,
    ) -> Self {
        let mut servers: Vec<Server> = Vec::new();
        for (protocol, tls, address) in listeners {
            if !servers.iter().any(|s| s.protocol == protocol && s.tls == tls) {
                servers.push(Server { protocol, port: address.port(), tls });
            }
        }
        let rank = |s: &Server| {
            let p = Protocol::ALL.iter().position(|&p| p == s.protocol).unwrap_or(usize::MAX);
            (p, s.tls == ClientTls::Starttls)
        };
        servers.sort_by_key(rank);
        Self {
            host: config.host(server_hostname).to_ascii_lowercase(),
            display_name: config.display_name.clone(),
            domains: config.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            servers,
        }
    }

    /// The host name clients connect to.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `domain` (lower case) is one of the mail domains answered.
    pub fn serves(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }

    /// The provider name clients show for `domain`.
    pub fn display_name<'a>(&'a self, domain: &'a str) -> &'a str {
        self.display_name.as_deref().unwrap_or(domain)
    }

    /// `protocol`'s listeners: implicit TLS first, then STARTTLS.
    pub fn servers(&self, protocol: Protocol) -> impl Iterator<Item = &Server> {
        self.servers.iter().filter(move |s| s.protocol == protocol)
    }

    /// The one listener of `protocol` to name where a format has room for one: implicit TLS
    /// when there is such a listener, else STARTTLS.
    pub fn preferred(&self, protocol: Protocol) -> Option<&Server> {
        self.servers(protocol).next()
    }
}

/// A client's mail address, checked with the one user-name rule ([`crate::user::normalize`])
/// and split at its last `@`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailAddress {
    address: String,
    at: usize,
}

/// A string that is not a usable mail address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a mail address: give it as name@example.com")]
pub struct BadAddress;

impl MailAddress {
    /// `raw` normalized (trimmed, lower-cased, refused with spaces or invisible
    /// characters), with a local part and a DNS domain.
    pub fn parse(raw: &str) -> Result<Self, BadAddress> {
        let address = crate::user::normalize(raw).map_err(|_| BadAddress)?;
        let at = address.rfind('@').ok_or(BadAddress)?;
        let domain = address[at + 1..].trim_end_matches('.');
        if at == 0 || !crate::config::is_domain_name(domain) {
            return Err(BadAddress);
        }
        let address = format!("{}@{domain}", &address[..at]);
        Ok(Self { address, at })
    }

    /// The whole address.
    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The domain part.
    pub fn domain(&self) -> &str {
        &self.address[self.at + 1..]
    }
}

/// The certificate the onboarding listener shows: its own (`[onboarding] cert`/`key`) or,
/// without one, `[tls]`'s; either is re-read on reload.
pub struct Certificate {
    own: ArcSwapOption<TlsAcceptor>,
    main: Arc<State>,
}

/// A certificate read for a reload, put in force by [`Certificate::apply`].
pub enum NextCertificate {
    /// `[onboarding]` is gone from the config; the listener keeps what it has until a restart.
    Unchanged,
    /// `[tls]`'s certificate.
    Main,
    /// The onboarding listener's own certificate.
    Own(TlsAcceptor),
}

impl Certificate {
    /// Reads the onboarding certificate `config` names, if any.
    pub fn new(config: &Config, main: Arc<State>) -> Result<Self, TlsError> {
        let own = match Self::prepare(config)? {
            NextCertificate::Own(acceptor) => Some(Arc::new(acceptor)),
            NextCertificate::Main | NextCertificate::Unchanged => None,
        };
        Ok(Self { own: ArcSwapOption::new(own), main })
    }

    /// Reads the certificate `config` names, without putting it in force.
    pub fn prepare(config: &Config) -> Result<NextCertificate, TlsError> {
        let Some(onboarding) = &config.onboarding else { return Ok(NextCertificate::Unchanged) };
        match (&onboarding.cert, &onboarding.key) {
            (Some(cert), Some(key)) => {
                let (cert, key) = (config.resolve(cert), config.resolve(key));
                let server_config = crate::tls::server_config(&cert, &key, config.tls.min_version, None)?;
                Ok(NextCertificate::Own(TlsAcceptor::from(server_config)))
            }
            _ => Ok(NextCertificate::Main),
        }
    }

    /// Puts a prepared certificate in force for new connections.
    pub fn apply(&self, next: NextCertificate) {
        match next {
            NextCertificate::Unchanged => {}
            NextCertificate::Main => self.own.store(None),
            NextCertificate::Own(acceptor) => self.own.store(Some(Arc::new(acceptor))),
        }
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        match &*self.own.load() {
            Some(own) => TlsAcceptor::clone(own),
            None => self.main.web_tls(),
        }
    }
}

/// A started onboarding listener.
pub struct Started {
    /// The bound address (useful when the config asked for port 0).
    pub address: SocketAddr,
    /// The certificate it shows, for reloads.
    pub certificate: Arc<Certificate>,
}

/// Binds `[onboarding] listen` and serves until `stop` is cancelled, describing
/// `listeners` (the mail listeners as bound).
pub async fn start(
    config: &Config,
    onboarding: &OnboardingConfig,
    server: Arc<State>,
    listeners: Vec<(Protocol, ClientTls, SocketAddr)>,
    stop: CancellationToken,
) -> Result<Started, StartError> {
    let certificate = Arc::new(Certificate::new(config, server)?);
    let address = onboarding.listen;
    let listener =
        tokio::net::TcpListener::bind(address).await.map_err(|source| StartError::Bind { address, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Bind { address, source })?;
    let site = Site::new(onboarding, &config.server.hostname, listeners);
    tracing::info!(
        address = %local,
        host = site.host(),
        domains = onboarding.domains.join(","),
        own_certificate = onboarding.cert.is_some(),
        "serving mail client onboarding (autoconfig, Autodiscover, Apple profiles)"
    );
    let limiter = rate::RateLimiter::new(onboarding.max_requests_per_minute);
    let router = routes::router(Arc::new(site), Arc::new(limiter));
    let tls = {
        let certificate = certificate.clone();
        Arc::new(move || certificate.acceptor())
    };
    tokio::spawn(crate::web::serve("onboarding", listener, tls, router, stop, crate::web::Limits::default()));
    Ok(Started { address: local, certificate })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A site for `example.com` and `example.org` at `mail-gw.example.com`, with IMAP and
    /// SMTP on both kinds of listener and POP3 on implicit TLS only.
    pub(crate) fn site(display_name: Option<&str>) -> Site {
        let config = OnboardingConfig {
            listen: "0.0.0.0:443".parse().unwrap(),
            cert: None,
            key: None,
            host: Some("Mail-GW.example.com".to_owned()),
            domains: vec!["Example.com".to_owned(), "example.org".to_owned()],
            display_name: display_name.map(str::to_owned),
            max_requests_per_minute: 30,
        };
        let at = |port: u16| -> SocketAddr { format!("0.0.0.0:{port}").parse().unwrap() };
        let listeners = [
            (Protocol::Smtp, ClientTls::Starttls, at(10587)),
            (Protocol::Imap, ClientTls::Implicit, at(10993)),
            (Protocol::Imap, ClientTls::Implicit, "[::]:10993".parse().unwrap()),
            (Protocol::Imap, ClientTls::Starttls, at(10143)),
            (Protocol::Pop3, ClientTls::Implicit, at(10995)),
            (Protocol::Smtp, ClientTls::Implicit, at(10465)),
        ];
        Site::new(&config, "ignored.example.net", listeners)
    }

    #[test]
    fn the_site_lists_each_protocols_listeners_implicit_first_with_their_ports() {
        let site = site(None);
        assert_eq!(site.host(), "mail-gw.example.com");
        let ports = |p| site.servers(p).map(|s| (s.port, s.tls)).collect::<Vec<_>>();
        assert_eq!(ports(Protocol::Imap), [(10993, ClientTls::Implicit), (10143, ClientTls::Starttls)]);
        assert_eq!(ports(Protocol::Pop3), [(10995, ClientTls::Implicit)]);
        assert_eq!(ports(Protocol::Smtp), [(10465, ClientTls::Implicit), (10587, ClientTls::Starttls)]);
        assert_eq!(site.preferred(Protocol::Smtp).map(|s| s.port), Some(10465));
        assert!(site.serves("example.com") && site.serves("example.org") && !site.serves("example.net"));
        assert_eq!(site.display_name("example.org"), "example.org");
    }

    #[test]
    fn addresses_follow_the_user_name_rule_and_need_a_domain() {
        let a = MailAddress::parse(" Alice@Example.COM ").unwrap();
        assert_eq!((a.as_str(), a.domain()), ("alice@example.com", "example.com"));
        let b = MailAddress::parse("a&b\"c@example.com.").unwrap();
        assert_eq!((b.as_str(), b.domain()), ("a&b\"c@example.com", "example.com"));
        for bad in [
            "",
            "alice",
            "@example.com",
            "alice@",
            "alice@exa mple.com",
            "alice@exa_mple.com",
            "al ice@example.com",
            "al\u{202E}ice@example.com",
            "alice@example.com\r\nX-Evil: 1",
        ] {
            assert_eq!(MailAddress::parse(bad), Err(BadAddress), "{bad:?}");
        }
        assert!(MailAddress::parse(&format!("{}@example.com", "a".repeat(300))).is_err());
    }
}

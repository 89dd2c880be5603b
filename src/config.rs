//! The configuration file: parsed strictly (unknown keys are errors), then validated with
//! messages that name the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::Protocol;
use crate::stores::directory::DirectoryConfig;
pub use crate::tls::TlsVersion;

mod console;
mod onboarding;
mod upstream;

pub use console::ConsoleConfig;
pub use onboarding::{DEFAULT_MAX_REQUESTS_PER_MINUTE, OnboardingConfig, is_domain_name};
pub use upstream::{DEFAULT_OAUTH_SOURCE, OAuthSources, RouteConfig, UpstreamConfig};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The config file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's explanation, with line, column and key.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// Dotted path of the key, e.g. `imap.listen`.
        key: String,
        /// What is wrong and what to do.
        message: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: names and folders.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[tls]`: the certificate clients see.
    pub tls: TlsConfig,
    /// `[limits]`: timeouts and sizes.
    #[serde(default)]
    pub limits: Limits,
    /// `[directory]`: where users' passwords are checked.
    pub directory: DirectoryConfig,
    /// `[access]`: security profiles.
    pub access: AccessConfig,
    /// `[lockout]`: brute-force defences.
    #[serde(default)]
    pub lockout: crate::access::lockout::LockoutConfig,
    /// `[state]`: where lockout and session counters live (memory or a shared Redis).
    #[serde(default)]
    pub state: crate::access::store::StateConfig,
    /// `[imap]`: the IMAPS listener and its upstream.
    pub imap: Option<ProtocolConfig>,
    /// `[pop3]`: the POP3S listener and its upstream.
    pub pop3: Option<ProtocolConfig>,
    /// `[smtp]`: the SMTPS submission listener and its upstream.
    pub smtp: Option<ProtocolConfig>,
    /// `[audit]`: the audit log.
    #[serde(default)]
    pub audit: AuditConfig,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[oauth]` or `[oauth.NAME]`: where OAuth2 access tokens for `upstream_auth =
    /// "xoauth2"` come from.
    #[serde(default)]
    pub oauth: OAuthSources,
    /// `[console]`: the admin web console; off when absent.
    pub console: Option<ConsoleConfig>,
    /// `[[route]]`: users sent to other upstreams than the protocol tables', by mail domain,
    /// user or directory group; the first matching route wins.
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// `[alerts]`: webhooks that hear about locks, unlocks, refused upstream credentials and
    /// expiring certificates.
    #[serde(default)]
    pub alerts: crate::alerts::AlertsConfig,
    /// `[onboarding]`: the HTTPS listener mail clients ask for their settings; off when
    /// absent.
    pub onboarding: Option<OnboardingConfig>,
    /// Folder relative paths are resolved against: the config file's folder.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Name announced in greetings and put in generated certificates.
    pub hostname: String,
    /// Folder for the vault and other state (systemd's `StateDirectory`).
    pub state_dir: PathBuf,
    /// Seconds logged-in sessions may keep running after a stop is requested.
    pub shutdown_grace_secs: u64,
    /// The control socket `postern status` talks to; `state_dir/control.sock` when absent.
    pub control_socket: Option<PathBuf>,
    /// Apply edits of the profiles file, and of `[tls] client_ca` and `client_crl`, without a
    /// reload (checked every second).
    pub watch_profiles: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hostname: "localhost".to_owned(),
            state_dir: PathBuf::from("/var/lib/postern"),
            shutdown_grace_secs: 30,
            control_socket: None,
            watch_profiles: true,
        }
    }
}

/// `[tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Generate a self-signed certificate for `server.hostname` when both files are missing.
    #[serde(default)]
    pub generate_self_signed: bool,
    /// Lowest TLS version accepted: `"1.2"` (default) or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// PEM bundle of the CA(s) that issue client certificates; when set, clients are asked
    /// for a certificate (never required at the handshake) and profiles may use
    /// `client_cert`.
    pub client_ca: Option<PathBuf>,
    /// Revocation list (PEM or DER) of client certificates; needs `client_ca`.
    pub client_crl: Option<PathBuf>,
}

/// `[limits]`: every timer and size that bounds a connection.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Seconds a client has to complete the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds a client has from connecting to being logged in.
    pub preauth_timeout_secs: u64,
    /// Seconds allowed to connect and log in upstream.
    pub upstream_timeout_secs: u64,
    /// Seconds without a byte in either direction before a logged-in session is closed.
    /// Longer than IMAP IDLE's 29 minutes by default.
    pub idle_timeout_secs: u64,
    /// Longest command line before login, in bytes.
    pub max_line: usize,
    /// Largest IMAP literal before login, in bytes.
    pub max_literal: usize,
    /// Bytes all connections together may buffer before login (literals, and command
    /// lines beyond a small allowance each). Literals beyond it are refused, and a
    /// connection whose line needs more is closed.
    pub preauth_buffer_budget: usize,
    /// Most connections open at once, all protocols together.
    pub max_connections: usize,
    /// Most logged-in sessions one user may hold at once, all protocols together.
    pub max_sessions_per_user: usize,
    /// Most connections one client address may hold at once (offices behind NAT share one),
    /// counted from `accept`, before the TLS handshake.
    pub max_connections_per_ip: usize,
    /// Most unfinished TLS handshakes one client address may have at once; connections
    /// beyond it are closed at `accept`, so silent connections from one address cannot hold
    /// the connection permits everyone shares.
    pub max_handshakes_per_ip: usize,
    /// Seconds a trusted balancer has to send the PROXY protocol header, on listeners with
    /// `proxy_protocol = true`.
    pub proxy_header_timeout_secs: u64,
    /// Most PROXY protocol headers being read at once from one balancer address; a
    /// balancer carries every client, so this is counted apart from the per-client caps.
    pub max_proxy_headers_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout_secs: 10,
            preauth_timeout_secs: 60,
            upstream_timeout_secs: 20,
            idle_timeout_secs: 35 * 60,
            max_line: crate::protocol::limits::DEFAULT_MAX_LINE,
            max_literal: crate::protocol::limits::DEFAULT_MAX_LITERAL,
            preauth_buffer_budget: crate::protocol::limits::DEFAULT_PREAUTH_BUFFER_BUDGET,
            max_connections: 20_000,
            max_sessions_per_user: 30,
            max_connections_per_ip: 500,
            max_handshakes_per_ip: 16,
            proxy_header_timeout_secs: 5,
            max_proxy_headers_per_ip: 256,
        }
    }
}

impl Limits {
    /// See [`Limits::handshake_timeout_secs`].
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    /// See [`Limits::preauth_timeout_secs`].
    pub fn preauth_timeout(&self) -> Duration {
        Duration::from_secs(self.preauth_timeout_secs)
    }
    /// See [`Limits::upstream_timeout_secs`].
    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream_timeout_secs)
    }
    /// See [`Limits::idle_timeout_secs`].
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// See [`Limits::proxy_header_timeout_secs`].
    pub fn proxy_header_timeout(&self) -> Duration {
        Duration::from_secs(self.proxy_header_timeout_secs)
    }
}

/// `[access]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// The security profiles file admins edit.
    pub profiles: PathBuf,
}

/// How Postern's connection to an upstream is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// TLS from the first byte (IMAPS 993, POP3S 995, SMTPS 465).
    #[default]
    Implicit,
    /// Plain connection upgraded with STARTTLS (SMTP submission on 587).
    Starttls,
}

/// How clients secure their connection to one of Postern's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientTls {
    /// TLS from the first byte (IMAPS, POP3S, SMTPS): the `listen` addresses.
    Implicit,
    /// Plaintext until the client's STARTTLS (IMAP `STARTTLS`, POP3 `STLS`, SMTP
    /// `STARTTLS`), with no login possible before it: the `starttls_listen` addresses.
    Starttls,
}

impl ClientTls {
    /// The name used in logs and in `postern check`.
    pub fn name(self) -> &'static str {
        match self {
            ClientTls::Implicit => "implicit",
            ClientTls::Starttls => "starttls",
        }
    }
}

/// `[imap]`, `[pop3]`, `[smtp]`: one protocol's listeners and its default upstream (for
/// users no `[[route]]` matches). The listener keys apply at start; the upstream keys
/// ([`UpstreamConfig`]) on reload too.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolConfig {
    /// Addresses to listen on with implicit TLS, e.g. `["0.0.0.0:10993", "[::]:10993"]`.
    pub listen: Vec<SocketAddr>,
    /// Addresses to listen on with STARTTLS: plaintext until the client upgrades, no login
    /// before that, e.g. `["0.0.0.0:10143"]`. A protocol may have both kinds, or only one.
    pub starttls_listen: Vec<SocketAddr>,
    /// SMTP: the message size limit advertised to clients before login (`SIZE`).
    pub max_message_size: Option<u64>,
    /// Connections come through a load balancer that sends a PROXY protocol header (version
    /// 1 or 2) before the TLS handshake; the client address is taken from it. Needs
    /// `trusted_proxies`.
    pub proxy_protocol: bool,
    /// The balancers allowed to send the header, as CIDR blocks or single addresses
    /// (e.g. `["10.0.0.0/24"]`); connections from anywhere else are closed.
    pub trusted_proxies: Vec<String>,
    /// The default upstream: the table's other keys.
    pub upstream: UpstreamConfig,
}

/// The listener keys of a protocol table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenerKeys {
    #[serde(default)]
    listen: Vec<SocketAddr>,
    #[serde(default)]
    starttls_listen: Vec<SocketAddr>,
    max_message_size: Option<u64>,
    #[serde(default)]
    proxy_protocol: bool,
    #[serde(default)]
    trusted_proxies: Vec<String>,
}

impl<'de> Deserialize<'de> for ProtocolConfig {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(deserializer)?;
        let mut listener = toml::Table::new();
        for key in ["listen", "starttls_listen", "max_message_size", "proxy_protocol", "trusted_proxies"] {
            if let Some(value) = table.remove(key) {
                listener.insert(key.to_owned(), value);
            }
        }
        let keys: ListenerKeys = toml::Value::Table(listener).try_into().map_err(D::Error::custom)?;
        let upstream: UpstreamConfig = toml::Value::Table(table).try_into().map_err(D::Error::custom)?;
        Ok(Self {
            listen: keys.listen,
            starttls_listen: keys.starttls_listen,
            max_message_size: keys.max_message_size,
            proxy_protocol: keys.proxy_protocol,
            trusted_proxies: keys.trusted_proxies,
            upstream,
        })
    }
}

/// A `trusted_proxies` or `console.allow` entry as a network: a CIDR block or a single
/// address.
fn parse_network(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    let net = text.parse::<ipnet::IpNet>().ok().or_else(|| text.parse::<std::net::IpAddr>().ok().map(Into::into))?;
    // Peers are compared as canonical addresses (IPv4 rather than IPv4-mapped IPv6).
    Some(match net {
        ipnet::IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok()?.into(),
            None => net,
        },
        other => other,
    })
}

/// How Postern proves itself to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuthMode {
    /// The password or app password stored in the vault (IMAP `LOGIN`, SASL PLAIN or LOGIN,
    /// POP3 `USER`/`PASS`, whichever the upstream offers).
    #[default]
    Password,
    /// An access token from the `[oauth]` source, sent with SASL `XOAUTH2`.
    Xoauth2,
}

impl UpstreamAuthMode {
    /// The value as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamAuthMode::Password => "password",
            UpstreamAuthMode::Xoauth2 => "xoauth2",
        }
    }
}

/// Where access tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OAuthSource {
    /// A Google service account with domain-wide delegation: a signed JWT per user,
    /// exchanged with the JWT-bearer grant (RFC 7523).
    GoogleServiceAccount,
    /// A Microsoft Entra (Azure AD) application: the client-credentials grant, one token
    /// for every mailbox the application may open.
    Microsoft,
    /// A refresh token per user, stored in the vault, traded at `token_url`.
    RefreshToken,
}

impl OAuthSource {
    /// The name used in the config file.
    pub fn name(self) -> &'static str {
        match self {
            OAuthSource::GoogleServiceAccount => "google-service-account",
            OAuthSource::Microsoft => "microsoft",
            OAuthSource::RefreshToken => "refresh-token",
        }
    }
}

/// `[oauth]`: one token source shared by every protocol whose `upstream_auth` is `"xoauth2"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthConfig {
    /// `"google-service-account"`, `"microsoft"` or `"refresh-token"`.
    pub source: OAuthSource,
    /// Google: the service account's JSON key file (mode 0600 or stricter).
    pub service_account_key: Option<PathBuf>,
    /// Microsoft: the directory (tenant) id or domain.
    pub tenant: Option<String>,
    /// Microsoft and refresh-token: the application's client id.
    pub client_id: Option<String>,
    /// Microsoft and refresh-token: a file holding the client secret (mode 0600 or stricter).
    pub client_secret_file: Option<PathBuf>,
    /// The token endpoint. Google: defaults to the key file's `token_uri`; Microsoft:
    /// defaults to `https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`;
    /// refresh-token: required.
    pub token_url: Option<String>,
    /// Refresh-token source: the authorization server's device authorization endpoint
    /// (RFC 8628), for `postern user authorize USER`.
    pub device_authorization_url: Option<String>,
    /// The scope asked for. Defaults: `https://mail.google.com/` (Google),
    /// `https://outlook.office365.com/.default` (Microsoft), none (refresh-token).
    pub scope: Option<String>,
    /// Extra PEM CA certificates trusted for the token endpoint, besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Seconds one token request may take, connection included.
    #[serde(default = "default_oauth_timeout")]
    pub timeout_secs: u64,
    /// A cached token is renewed when fewer than this many seconds (or half its
    /// lifetime, whichever is less) remain.
    #[serde(default = "default_refresh_margin")]
    pub refresh_margin_secs: u64,
}

fn default_oauth_timeout() -> u64 {
    10
}

fn default_refresh_margin() -> u64 {
    60
}

impl OAuthConfig {
    /// Checks the source's keys; `at` is its table, `oauth` or `oauth.NAME`.
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid { key: format!("{at}.{key}"), message };
        let source = self.source.name();
        let require = |key: &str, present: bool| {
            if present { Ok(()) } else { Err(invalid(key, format!("required with source = \"{source}\""))) }
        };
        let forbid = |key: &str, present: bool| {
            if present { Err(invalid(key, format!("not used with source = \"{source}\"; remove it"))) } else { Ok(()) }
        };
        match self.source {
            OAuthSource::GoogleServiceAccount => {
                require("service_account_key", self.service_account_key.is_some())?;
                forbid("tenant", self.tenant.is_some())?;
                forbid("client_id", self.client_id.is_some())?;
                forbid("client_secret_file", self.client_secret_file.is_some())?;
            }
            OAuthSource::Microsoft => {
                require("tenant", self.tenant.is_some() || self.token_url.is_some())?;
                require("client_id", self.client_id.is_some())?;
                require("client_secret_file", self.client_secret_file.is_some())?;
                forbid("service_account_key", self.service_account_key.is_some())?;
            }
            OAuthSource::RefreshToken => {
                require("token_url", self.token_url.is_some())?;
                require("client_id", self.client_id.is_some())?;
                forbid("service_account_key", self.service_account_key.is_some())?;
                forbid("tenant", self.tenant.is_some())?;
            }
        }
        if self.source != OAuthSource::RefreshToken {
            forbid("device_authorization_url", self.device_authorization_url.is_some())?;
        }
        if self.device_authorization_url.as_deref().is_some_and(|u| !u.starts_with("https://")) {
            return Err(invalid(
                "device_authorization_url",
                "must be an https:// URL: device codes only travel over verified TLS".into(),
            ));
        }
        if let Some(tenant) = &self.tenant
            && (tenant.is_empty() || !tenant.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
        {
            return Err(invalid(
                "tenant",
                "expected a tenant id (a GUID) or domain, e.g. \"example.onmicrosoft.com\"".into(),
            ));
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.chars().any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(invalid("client_id", "must be a non-empty id without spaces".into()));
        }
        if let Some(url) = &self.token_url
            && !url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://"))
        {
            return Err(invalid("token_url", "must be an https:// URL: tokens only travel over verified TLS".into()));
        }
        if let Some(scope) = &self.scope
            && (scope.trim().is_empty() || scope.chars().any(char::is_control))
        {
            return Err(invalid("scope", "must be a non-empty, space-separated list of scopes".into()));
        }
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return Err(invalid("timeout_secs", "must be between 1 and 300 seconds".into()));
        }
        if self.refresh_margin_secs > 3000 {
            return Err(invalid(
                "refresh_margin_secs",
                "must be at most 3000 seconds (tokens usually live an hour)".into(),
            ));
        }
        Ok(())
    }

    /// See [`OAuthConfig::timeout_secs`].
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// See [`OAuthConfig::refresh_margin_secs`].
    pub fn refresh_margin(&self) -> Duration {
        Duration::from_secs(self.refresh_margin_secs)
    }
}

impl ProtocolConfig {
    /// Every listen address with how clients secure it: `listen`, then `starttls_listen`.
    pub fn listeners(&self) -> impl Iterator<Item = (SocketAddr, ClientTls)> + '_ {
        let implicit = self.listen.iter().map(|&a| (a, ClientTls::Implicit));
        implicit.chain(self.starttls_listen.iter().map(|&a| (a, ClientTls::Starttls)))
    }

    /// The parsed `trusted_proxies` (validated when the config was loaded), truncated to
    /// their networks.
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies.iter().filter_map(|t| parse_network(t)).map(|n| n.trunc()).collect()
    }
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Log format for the whole process, audit lines included.
    pub format: LogFormat,
    /// Also append one JSON line per session to this file (mode 0600), for `postern audit`.
    pub file: Option<PathBuf>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g. `127.0.0.1:9425`; off when absent.
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        Self::parse(&text, path, base_dir)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path, base_dir: PathBuf) -> Result<Self, ConfigError> {
        let mut config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        config.base_dir = base_dir;
        config.validate()?;
        Ok(config)
    }

    /// `path` made absolute against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// The control socket's path.
    pub fn control_socket(&self) -> PathBuf {
        match &self.server.control_socket {
            Some(path) => self.resolve(path),
            None => self.resolve(&self.server.state_dir).join("control.sock"),
        }
    }

    /// Every upstream table: each protocol's default (`imap`, ...) and each route's
    /// (`route.NAME.imap`, ...), with its config key.
    pub fn upstreams(&self) -> impl Iterator<Item = (String, Protocol, &UpstreamConfig)> {
        let defaults = self.protocols().map(|(p, c)| (p.name().to_owned(), p, &c.upstream));
        let routes = self.route.iter().flat_map(|r| {
            Protocol::ALL
                .into_iter()
                .filter_map(move |p| r.upstream(p).map(|u| (format!("route.{}.{p}", r.name), p, u)))
        });
        defaults.chain(routes)
    }

    /// The configured protocols, in a fixed order.
    pub fn protocols(&self) -> impl Iterator<Item = (Protocol, &ProtocolConfig)> {
        [(Protocol::Imap, &self.imap), (Protocol::Pop3, &self.pop3), (Protocol::Smtp, &self.smtp)]
            .into_iter()
            .filter_map(|(p, c)| c.as_ref().map(|c| (p, c)))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &str, message: &str| ConfigError::Invalid { key: key.to_owned(), message: message.to_owned() };
        if self.protocols().next().is_none() {
            return Err(invalid("imap", "no protocol is configured: add an [imap], [pop3] or [smtp] table"));
        }
        if self.tls.client_crl.is_some() && self.tls.client_ca.is_none() {
            return Err(invalid(
                "tls.client_crl",
                "a CRL needs the CA it belongs to: set tls.client_ca too (e.g. the ca.pem `postern ca init` wrote)",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (protocol, p) in self.protocols() {
            let name = protocol.name();
            if p.listen.is_empty() && p.starttls_listen.is_empty() {
                return Err(invalid(
                    &format!("{name}.listen"),
                    "give at least one address, e.g. \"0.0.0.0:10993\" (or starttls_listen for STARTTLS)",
                ));
            }
            for (addr, tls) in p.listeners() {
                let key = match tls {
                    ClientTls::Implicit => format!("{name}.listen"),
                    ClientTls::Starttls => format!("{name}.starttls_listen"),
                };
                if addr.port() != 0 && !seen.insert(addr) {
                    return Err(invalid(&key, &format!("{addr} is used twice")));
                }
            }
            p.upstream.validate(name, protocol, &self.oauth)?;
            if p.max_message_size.is_some() && protocol != Protocol::Smtp {
                return Err(invalid(&format!("{name}.max_message_size"), "only applies to [smtp]"));
            }
            if p.proxy_protocol && p.trusted_proxies.is_empty() {
                return Err(invalid(
                    &format!("{name}.trusted_proxies"),
                    "proxy_protocol = true needs the balancers' addresses, e.g. [\"10.0.0.0/24\"]",
                ));
            }
            if !p.proxy_protocol && !p.trusted_proxies.is_empty() {
                return Err(invalid(
                    &format!("{name}.trusted_proxies"),
                    "only used with proxy_protocol = true; set it or remove this key",
                ));
            }
            if let Some(bad) = p.trusted_proxies.iter().find(|t| parse_network(t).is_none()) {
                return Err(invalid(
                    &format!("{name}.trusted_proxies"),
                    &format!("`{bad}` is not a CIDR block or address, e.g. \"10.0.0.0/24\" or \"2001:db8::/64\""),
                ));
            }
        }
        let configured: Vec<Protocol> = self.protocols().map(|(p, _)| p).collect();
        let mut names = std::collections::HashSet::new();
        for (index, route) in self.route.iter().enumerate() {
            route.validate(index, &configured, &self.oauth)?;
            if !names.insert(route.name.as_str()) {
                return Err(invalid(&format!("route.{}", route.name), "the name is used by two routes"));
            }
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.preauth_timeout_secs", l.preauth_timeout_secs),
            ("limits.upstream_timeout_secs", l.upstream_timeout_secs),
            ("limits.idle_timeout_secs", l.idle_timeout_secs),
            ("limits.proxy_header_timeout_secs", l.proxy_header_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1 second"));
            }
        }
        if l.proxy_header_timeout_secs > 60 {
            return Err(invalid(
                "limits.proxy_header_timeout_secs",
                "must be at most 60 seconds: a balancer sends the header at once",
            ));
        }
        if l.max_line < 512 || l.max_line > 1024 * 1024 {
            return Err(invalid("limits.max_line", "must be between 512 and 1048576 bytes"));
        }
        if l.max_literal == 0 || l.max_literal > 16 * 1024 * 1024 {
            return Err(invalid("limits.max_literal", "must be between 1 and 16777216 bytes"));
        }
        for (key, value) in [
            ("limits.preauth_buffer_budget", l.preauth_buffer_budget),
            ("limits.max_connections", l.max_connections),
            ("limits.max_sessions_per_user", l.max_sessions_per_user),
            ("limits.max_connections_per_ip", l.max_connections_per_ip),
            ("limits.max_handshakes_per_ip", l.max_handshakes_per_ip),
            ("limits.max_proxy_headers_per_ip", l.max_proxy_headers_per_ip),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        self.state.validate().map_err(|(key, message)| invalid(key, &message))?;
        let lockout = &self.lockout;
        if lockout.window_secs == 0 {
            return Err(invalid("lockout.window_secs", "must be at least 1 second"));
        }
        // lock_secs = 0 locks until an admin unlocks the user (`postern user unlock`).
        if lockout.max_failure_delay_ms > 60_000 {
            return Err(invalid(
                "lockout.max_failure_delay_ms",
                "must be at most 60000: longer holds connections for nothing",
            ));
        }
        if let Some(metrics) = self.metrics.listen {
            if metrics.port() != 0 && seen.contains(&metrics) {
                return Err(invalid("metrics.listen", &format!("{metrics} is also a mail listener")));
            }
        }
        if let Some(onboarding) = &self.onboarding {
            let listen = onboarding.listen;
            if listen.port() != 0 && (seen.contains(&listen) || self.metrics.listen == Some(listen)) {
                return Err(invalid("onboarding.listen", &format!("{listen} is also a mail or metrics listener")));
            }
            onboarding.validate(&self.server.hostname).map_err(|(key, message)| invalid(&key, &message))?;
        }
        if self.server.control_socket.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid(
                "server.control_socket",
                "must be a file path; leave it out for state_dir/control.sock",
            ));
        }
        if self.audit.file.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid("audit.file", "must be a file path; leave it out to log to the journal only"));
        }
        if self.server.hostname.is_empty() || self.server.hostname.contains(char::is_whitespace) {
            return Err(invalid("server.hostname", "must be a host name without spaces"));
        }
        self.oauth.validate()?;
        if let Some(console) = &self.console {
            console.validate()?;
            let taken = seen.contains(&console.listen) || self.metrics.listen == Some(console.listen);
            if console.listen.port() != 0 && taken {
                return Err(invalid("console.listen", &format!("{} is also another listener", console.listen)));
            }
        }
        self.alerts.validate().map_err(|(key, message)| ConfigError::Invalid { key, message })?;
        Ok(())
    }
}

/// The smallest valid config, for the tests of the modules that take one: certificate
/// `c.pem`/`k.pem`, file directory `users.toml`, profiles `profiles.toml`, one IMAP listener.
/// Tables that come before it in the text (`[server]`, `[limits]`, ...) add to it.
#[cfg(test)]
pub(crate) const MINIMAL: &str = r#"
    [tls]
    cert = "c.pem"
    key = "k.pem"
    [directory]
    kind = "file"
    path = "users.toml"
    [access]
    profiles = "profiles.toml"
    [imap]
    listen = ["127.0.0.1:10993"]
    upstream = "imap.gmail.com:993"
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), PathBuf::from("/etc/postern"))
    }

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.limits.idle_timeout_secs, 2100);
        assert_eq!(c.imap.as_ref().unwrap().upstream.upstream_host(), "imap.gmail.com");
        assert_eq!(c.resolve(Path::new("users.toml")), PathBuf::from("/etc/postern/users.toml"));
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = parse(&format!("{MINIMAL}\nsurprise = 1\n")).unwrap_err().to_string();
        assert!(err.contains("surprise"), "{err}");
        let err = parse(&MINIMAL.replace("[imap]", "[imap]\nlisten_port = 1")).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = parse(&MINIMAL.replace("imap.gmail.com:993", "imap.gmail.com")).unwrap_err().to_string();
        assert!(err.contains("imap.upstream"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[limits]\npreauth_timeout_secs = 0\n")).unwrap_err().to_string();
        assert!(err.contains("limits.preauth_timeout_secs"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[limits]\npreauth_buffer_budget = 0\n")).unwrap_err().to_string();
        assert!(err.contains("limits.preauth_buffer_budget"), "{err}");
        let err = parse(&MINIMAL.replace(
            "upstream = \"imap.gmail.com:993\"",
            "upstream = \"imap.gmail.com:993\"\nupstream_tls = \"starttls\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("imap.upstream_tls"), "{err}");
        let err = parse(&MINIMAL.replace("key = \"k.pem\"", "key = \"k.pem\"\nclient_crl = \"crl.pem\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls.client_crl") && err.contains("client_ca"), "{err}");
        let both =
            MINIMAL.replace("key = \"k.pem\"", "key = \"k.pem\"\nclient_ca = \"ca.pem\"\nclient_crl = \"crl.pem\"");
        assert_eq!(parse(&both).unwrap().tls.client_ca, Some(PathBuf::from("ca.pem")));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let c = parse(include_str!("../proxy.toml.example")).unwrap();
        assert_eq!(c.protocols().count(), 3);
        for (protocol, p) in c.protocols() {
            let kinds: Vec<ClientTls> = p.listeners().map(|(_, tls)| tls).collect();
            assert_eq!(kinds, [ClientTls::Implicit, ClientTls::Starttls], "{protocol}");
        }
        crate::access::profiles::Profiles::parse(include_str!("../profiles.toml.example")).unwrap();
    }

    /// The Debian package's config (packaging/deb/proxy.toml) is the example with packaged
    /// paths; nothing else may drift. After editing the example, apply the same edit there.
    #[test]
    fn the_packaged_config_is_the_example_with_packaged_paths() {
        let packaged = include_str!("../packaging/deb/proxy.toml");
        let mut expected = include_str!("../proxy.toml.example").to_owned();
        for (example, package) in [
            (
                r#"# Postern example configuration. Runs as is for a first try:
#   cargo run --release -- serve --config proxy.toml.example
# Relative paths are resolved against the folder of this file.
"#,
                r#"# Postern configuration, as the Debian package installs it: /etc/postern/proxy.toml.
# Edit hostname and upstreams, then `systemctl restart postern`. Made from
# proxy.toml.example; only the paths differ (a unit test keeps the two in step).
"#,
            ),
            (
                r#"# Vault of upstream credentials and other state. Under systemd: /var/lib/postern.
state_dir = "state"
"#,
                r#"# Vault of upstream credentials and other state: the unit's StateDirectory.
state_dir = "/var/lib/postern"
"#,
            ),
            (
                r#"# Certificate chain (leaf first) and private key clients see, PEM. See certs/README.md.
cert = "certs/postern.pem"
key = "certs/postern.key"
# Generate a self-signed certificate when both files are missing (first runs only;
# clients will warn until a real certificate is installed).
generate_self_signed = true
"#,
                r#"# Certificate chain (leaf first) and private key clients see, PEM. The package generated a
# self-signed pair at install (clients warn until a real certificate replaces it); the key
# belongs to postern, mode 0600. `systemctl reload postern` picks up new files.
cert = "/etc/postern/postern.pem"
key = "/etc/postern/postern.key"
# The service may not write to /etc/postern, so it cannot generate a pair itself.
generate_self_signed = false
"#,
            ),
            (
                r#"#client_ca = "state/ca/ca.pem"
"#,
                r#"#client_ca = "/var/lib/postern/ca/ca.pem"
"#,
            ),
            (
                r#"#client_crl = "state/ca/crl.pem"
"#,
                r#"#client_crl = "/var/lib/postern/ca/crl.pem"
"#,
            ),
            (
                r#"path = "state/users.toml"
"#,
                r#"path = "/var/lib/postern/users.toml"
"#,
            ),
            (
                r#"profiles = "profiles.toml.example"
"#,
                r#"profiles = "/etc/postern/profiles.toml"
"#,
            ),
            (
                r#"# Relative to this file's folder; a packaged install uses e.g. "/var/log/postern/audit.jsonl".
file = "state/audit.jsonl"
"#,
                r#"# In the unit's LogsDirectory.
file = "/var/log/postern/audit.jsonl"
"#,
            ),
        ] {
            assert_eq!(expected.matches(example).count(), 1, "the example lost or repeats:\n{example}");
            expected = expected.replacen(example, package, 1);
        }
        let first_difference = packaged.lines().zip(expected.lines()).position(|(p, e)| p != e);
        if let Some(n) = first_difference.or((packaged != expected).then_some(expected.lines().count())) {
            panic!(
                "packaging/deb/proxy.toml line {} differs from proxy.toml.example with packaged paths; expected:\n{}",
                n + 1,
                expected.lines().nth(n).unwrap_or("(end of file)")
            );
        }
        let c = parse(packaged).unwrap();
        assert_eq!(c.server.state_dir, Path::new("/var/lib/postern"));
        assert_eq!(c.audit.file.as_deref(), Some(Path::new("/var/log/postern/audit.jsonl")));
    }

    #[test]
    fn bad_pins_name_their_key() {
        let text = MINIMAL.replace(
            "upstream = \"imap.gmail.com:993\"",
            "upstream = \"imap.gmail.com:993\"\nupstream_pin_sha256 = [\"nope\"]",
        );
        assert!(parse(&text).unwrap_err().to_string().contains("imap.upstream_pin_sha256"));
    }

    #[test]
    fn service_keys_parse_and_are_validated() {
        let text = format!("{MINIMAL}\n[metrics]\nlisten = \"127.0.0.1:9425\"\n");
        let c = parse(&text.replace("[tls]", "[audit]\nfile = \"audit.jsonl\"\n[tls]")).unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9425".parse().unwrap()));
        assert_eq!(c.audit.file.as_deref(), Some(Path::new("audit.jsonl")));
        assert_eq!(c.control_socket(), PathBuf::from("/var/lib/postern/control.sock"));
        assert!(c.server.watch_profiles);
        let err = parse(&format!("{MINIMAL}\n[metrics]\nlisten = \"127.0.0.1:10993\"\n")).unwrap_err().to_string();
        assert!(err.contains("metrics.listen"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[metrics]\nport = 1\n")).unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn onboarding_keys_parse_default_and_are_validated_by_name() {
        assert!(parse(MINIMAL).unwrap().onboarding.is_none(), "off when absent");
        let table = "[onboarding]\nlisten = \"0.0.0.0:443\"\ndomains = [\"example.com\"]\n";
        let c = parse(&format!("{MINIMAL}\n{table}")).unwrap();
        let o = c.onboarding.as_ref().unwrap();
        assert_eq!(o.host(&c.server.hostname), "localhost");
        assert_eq!(o.max_requests_per_minute, DEFAULT_MAX_REQUESTS_PER_MINUTE);
        assert_eq!((o.cert.as_ref(), o.display_name.as_ref()), (None, None));
        let full = format!(
            "{MINIMAL}\n{table}host = \"mail-gw.example.com\"\ndisplay_name = \"Example mail\"\ncert = \"o.pem\"\nkey = \"o.key\"\nmax_requests_per_minute = 5\n"
        );
        let c = parse(&full).unwrap();
        let o = c.onboarding.as_ref().unwrap();
        assert_eq!((o.host(&c.server.hostname), o.max_requests_per_minute), ("mail-gw.example.com", 5));
        for (edit, key) in [
            ("domains = []", "onboarding.domains"),
            ("domains = [\"exa mple.com\"]", "onboarding.domains"),
            ("domains = [\"example.com\", \"EXAMPLE.com\"]", "onboarding.domains"),
            ("domains = [\"example.com\"]\nhost = \"mail gw\"", "onboarding.host"),
            ("domains = [\"example.com\"]\ncert = \"o.pem\"", "onboarding.key"),
            ("domains = [\"example.com\"]\nkey = \"o.key\"", "onboarding.cert"),
            ("domains = [\"example.com\"]\ndisplay_name = \"a\u{202E}b\"", "onboarding.display_name"),
            ("domains = [\"example.com\"]\ndisplay_name = \" \"", "onboarding.display_name"),
            ("domains = [\"example.com\"]\nmax_requests_per_minute = 0", "onboarding.max_requests_per_minute"),
        ] {
            let text = format!("{MINIMAL}\n{}", table.replace("domains = [\"example.com\"]", edit));
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{edit}: {err}");
        }
        let clash = format!("{MINIMAL}\n{}", table.replace("0.0.0.0:443", "127.0.0.1:10993"));
        assert!(parse(&clash).unwrap_err().to_string().contains("onboarding.listen"));
        let bad_hostname = format!("[server]\nhostname = \"mail_gw\"\n{MINIMAL}\n{table}");
        let err = parse(&bad_hostname).unwrap_err().to_string();
        assert!(err.contains("onboarding.host") && err.contains("server.hostname"), "{err}");
        let err = parse(&format!("{MINIMAL}\n{table}password = \"x\"\n")).unwrap_err().to_string();
        assert!(err.contains("password"), "unknown keys are errors: {err}");
    }

    #[test]
    fn the_examples_onboarding_table_parses_when_uncommented() {
        let example = include_str!("../proxy.toml.example");
        let start = example.find("# [onboarding]\n").expect("the example documents [onboarding]");
        let block = example[start..].split("\n\n").next().unwrap_or_default();
        let keys: Vec<&str> = block
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| *l == "[onboarding]" || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')))
            .collect();
        assert_eq!(keys.len(), 8, "{keys:?}");
        let c = parse(&format!("{MINIMAL}\n{}\n", keys.join("\n"))).unwrap();
        let o = c.onboarding.unwrap();
        assert_eq!(
            (o.host.as_deref(), o.domains.len(), o.max_requests_per_minute),
            (Some("mail-gw.example.com"), 1, 30)
        );
        assert!(o.cert.is_some() && o.key.is_some() && o.display_name.is_some());
    }

    #[test]
    fn xoauth2_needs_an_oauth_table() {
        let text = MINIMAL.replace(
            "upstream = \"imap.gmail.com:993\"",
            "upstream = \"imap.gmail.com:993\"\nupstream_auth = \"xoauth2\"",
        );
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("imap.upstream_auth") && err.contains("[oauth]"), "{err}");
        let google =
            format!("{text}\n[oauth]\nsource = \"google-service-account\"\nservice_account_key = \"sa.json\"\n");
        let c = parse(&google).unwrap();
        assert_eq!(c.imap.as_ref().unwrap().upstream.upstream_auth, UpstreamAuthMode::Xoauth2);
        assert_eq!(c.oauth.get(DEFAULT_OAUTH_SOURCE).unwrap().refresh_margin(), Duration::from_secs(60));
        assert_eq!(parse(MINIMAL).unwrap().imap.unwrap().upstream.upstream_auth, UpstreamAuthMode::Password);
    }

    #[test]
    fn forwarding_the_client_address_is_off_unless_asked() {
        assert!(!parse(MINIMAL).unwrap().imap.unwrap().upstream.forward_client_address);
        let text = MINIMAL.replace(
            "upstream = \"imap.gmail.com:993\"",
            "upstream = \"imap.gmail.com:993\"\nforward_client_address = true",
        );
        assert!(parse(&text).unwrap().imap.unwrap().upstream.forward_client_address);
        let text = MINIMAL.replace(
            "upstream = \"imap.gmail.com:993\"",
            "upstream = \"imap.gmail.com:993\"\nforward_client_address = \"yes\"",
        );
        assert!(parse(&text).unwrap_err().to_string().contains("forward_client_address"));
    }

    #[test]
    fn oauth_keys_are_checked_per_source() {
        let with =
            |table: &str| parse(&format!("{MINIMAL}\n[oauth]\n{table}\n")).map(|_| ()).map_err(|e| e.to_string());
        let err = with("source = \"google-service-account\"").unwrap_err();
        assert!(err.contains("oauth.service_account_key") && err.contains("required"), "{err}");
        let err = with("source = \"microsoft\"\ntenant = \"t\"\nclient_id = \"c\"").unwrap_err();
        assert!(err.contains("oauth.client_secret_file"), "{err}");
        let err = with("source = \"microsoft\"\ntenant = \"a/b\"\nclient_id = \"c\"\nclient_secret_file = \"s\"")
            .unwrap_err();
        assert!(err.contains("oauth.tenant"), "{err}");
        let err = with("source = \"refresh-token\"\nclient_id = \"c\"\ntoken_url = \"http://x/token\"").unwrap_err();
        assert!(err.contains("oauth.token_url") && err.contains("https"), "{err}");
        let err = with("source = \"refresh-token\"\nclient_id = \"c\"\ntoken_url = \"https://x/t\"\ntenant = \"t\"")
            .unwrap_err();
        assert!(err.contains("oauth.tenant") && err.contains("not used"), "{err}");
        let err =
            with("source = \"google-service-account\"\nservice_account_key = \"k\"\ntimeout_secs = 0").unwrap_err();
        assert!(err.contains("oauth.timeout_secs"), "{err}");
        let err = with("source = \"google\"").unwrap_err();
        assert!(err.contains("source"), "{err}");
        with("source = \"microsoft\"\ntenant = \"example.onmicrosoft.com\"\nclient_id = \"c\"\nclient_secret_file = \"s\"").unwrap();
    }

    #[test]
    fn proxy_protocol_needs_valid_trusted_proxies() {
        let with =
            |lines: &str| parse(&MINIMAL.replace("[imap]", &format!("[imap]\n{lines}"))).map_err(|e| e.to_string());
        let err = with("proxy_protocol = true").unwrap_err();
        assert!(err.contains("imap.trusted_proxies") && err.contains("needs"), "{err}");
        let err = with("proxy_protocol = true\ntrusted_proxies = []").unwrap_err();
        assert!(err.contains("imap.trusted_proxies"), "{err}");
        let err = with("trusted_proxies = [\"10.0.0.1\"]").unwrap_err();
        assert!(err.contains("imap.trusted_proxies") && err.contains("only used"), "{err}");
        for bad in ["10.0.0.0/33", "10.0.0", "example.com", "", "10.0.0.0/8/8"] {
            let err = with(&format!("proxy_protocol = true\ntrusted_proxies = [\"10.0.0.1\", {bad:?}]")).unwrap_err();
            assert!(err.contains("imap.trusted_proxies") && err.contains("not a CIDR"), "{bad}: {err}");
        }
        let c = with("proxy_protocol = true\ntrusted_proxies = [\"10.1.2.3/8\", \"192.0.2.9\", \"::ffff:198.51.100.0/120\", \"2001:db8::/64\"]")
            .unwrap();
        let nets: Vec<String> = c.imap.unwrap().trusted_proxies().iter().map(ToString::to_string).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.9/32", "198.51.100.0/24", "2001:db8::/64"]);
        let err = parse(&format!("{MINIMAL}\n[limits]\nproxy_header_timeout_secs = 0\n")).unwrap_err().to_string();
        assert!(err.contains("limits.proxy_header_timeout_secs"), "{err}");
        assert_eq!(parse(MINIMAL).unwrap().limits.proxy_header_timeout(), Duration::from_secs(5));
    }

    #[test]
    fn starttls_listeners_sit_beside_or_instead_of_implicit_ones() {
        let with = |listen: &str| {
            let text = MINIMAL.replace("listen = [\"127.0.0.1:10993\"]", listen);
            parse(&text).map_err(|e| e.to_string())
        };
        let both =
            with("listen = [\"127.0.0.1:10993\"]\nstarttls_listen = [\"127.0.0.1:10143\", \"[::1]:10143\"]").unwrap();
        let listeners: Vec<_> = both.imap.unwrap().listeners().collect();
        assert_eq!(
            listeners,
            [
                ("127.0.0.1:10993".parse().unwrap(), ClientTls::Implicit),
                ("127.0.0.1:10143".parse().unwrap(), ClientTls::Starttls),
                ("[::1]:10143".parse().unwrap(), ClientTls::Starttls),
            ]
        );
        let only = with("starttls_listen = [\"127.0.0.1:10143\"]").unwrap().imap.unwrap();
        assert!(only.listen.is_empty());
        assert_eq!(only.listeners().next().unwrap().1, ClientTls::Starttls);
        let err = with("listen = []\nstarttls_listen = []").unwrap_err();
        assert!(err.contains("imap.listen") && err.contains("starttls_listen"), "{err}");
        let err = with("listen = [\"127.0.0.1:10993\"]\nstarttls_listen = [\"127.0.0.1:10993\"]").unwrap_err();
        assert!(err.contains("imap.starttls_listen") && err.contains("used twice"), "{err}");
        let err = with("starttls_listen = \"127.0.0.1:10143\"").unwrap_err();
        assert!(err.contains("starttls_listen"), "{err}");
        let err = with("starttls_listen = [\"127.0.0.1:10143\"]\ntls = \"starttls\"").unwrap_err();
        assert!(err.contains("tls"), "{err}");
        // Port 0 (any free port) may repeat, as for `listen`.
        with("listen = [\"127.0.0.1:0\"]\nstarttls_listen = [\"127.0.0.1:0\"]").unwrap();
    }

    #[test]
    fn alert_webhooks_parse_and_name_bad_keys() {
        let table =
            "[alerts]\nwebhooks = [{ url = \"https://hooks.example/p\", ca_file = \"ca.pem\", timeout_secs = 3 }]\n";
        let c = parse(&format!("{MINIMAL}\n{table}")).unwrap();
        assert_eq!(c.alerts.webhooks[0].retries, 3);
        assert_eq!(c.alerts.webhooks[0].ca_file.as_deref(), Some(Path::new("ca.pem")));
        let err = parse(&format!("{MINIMAL}\n{}", table.replace("https", "http"))).unwrap_err().to_string();
        assert!(err.contains("alerts.webhooks[0].url"), "{err}");
        let err = parse(&format!("{MINIMAL}\n[alerts]\nwebhook = []\n")).unwrap_err().to_string();
        assert!(err.contains("webhook"), "{err}");
    }

    #[test]
    fn lock_secs_zero_is_allowed_and_means_until_unlocked() {
        let c = parse(&format!("{MINIMAL}\n[lockout]\nlock_secs = 0\n")).unwrap();
        assert_eq!((c.lockout.max_failures, c.lockout.lock_secs), (5, 0));
    }

    #[test]
    fn no_protocol_is_an_error() {
        let text =
            MINIMAL.replace("[imap]\n    listen = [\"127.0.0.1:10993\"]\n    upstream = \"imap.gmail.com:993\"", "");
        assert!(parse(&text).unwrap_err().to_string().contains("no protocol"));
    }
}

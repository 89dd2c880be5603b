//! The upstream half of the config: the upstream keys of a protocol table (its default
//! upstream), `[[route]]` tables that send some users elsewhere, and the named OAuth2 token
//! sources they use.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, OAuthConfig, UpstreamAuthMode, UpstreamTls};
use crate::protocol::Protocol;

/// Where and how Postern logs in upstream for one protocol: the upstream keys of `[imap]`,
/// `[pop3]` and `[smtp]` (the default for users no route matches), and of a route's
/// `[route.imap]`, `[route.pop3]` and `[route.smtp]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Upstream `host:port`, e.g. `imap.gmail.com:993` (the key is `upstream`).
    #[serde(rename = "upstream")]
    pub address: String,
    /// `"implicit"` (default) or `"starttls"` (SMTP only).
    #[serde(default)]
    pub upstream_tls: UpstreamTls,
    /// Name to verify the upstream certificate against; defaults to the host of `upstream`.
    pub upstream_server_name: Option<String>,
    /// Extra PEM CA certificates trusted for the upstream, besides the system roots.
    pub upstream_ca_file: Option<PathBuf>,
    /// SHA-256 pins (hex or base64) of the upstream's certificate or public key; when set,
    /// the verified certificate must also match one of them.
    #[serde(default)]
    pub upstream_pin_sha256: Vec<String>,
    /// Accept any upstream certificate. Never in production: a warning is logged at start.
    #[serde(default)]
    pub upstream_tls_insecure_no_verify: bool,
    /// How Postern logs in upstream: a stored password (default) or an OAuth2 token.
    #[serde(default)]
    pub upstream_auth: UpstreamAuthMode,
    /// With `upstream_auth = "xoauth2"`: the name of the `[oauth.NAME]` source the tokens come
    /// from. May be left out when there is only one source.
    pub oauth_source: Option<String>,
    /// Pass the client's address and port to the upstream before logging in: IMAP `ID`
    /// (`x-originating-ip`, `x-originating-port`), POP3 and SMTP `XCLIENT`, each only when the
    /// upstream advertises it. Upstreams honour it only from networks they trust (Dovecot:
    /// `login_trusted_networks`). Off by default.
    #[serde(default)]
    pub forward_client_address: bool,
}

impl UpstreamConfig {
    /// The upstream trust settings, pins parsed (validation has checked them).
    pub fn upstream_trust(&self) -> crate::tls::UpstreamTrust {
        crate::tls::UpstreamTrust {
            pins: self.upstream_pin_sha256.iter().filter_map(|p| crate::tls::parse_pin(p)).collect(),
            insecure_no_verify: self.upstream_tls_insecure_no_verify,
        }
    }

    /// The host part of `upstream`.
    pub fn upstream_host(&self) -> &str {
        match self.address.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => &self.address,
        }
    }

    /// Checks the keys of the table at `at` (e.g. `imap` or `route.m365.smtp`); `oauth` are
    /// the configured token sources.
    pub(super) fn validate(&self, at: &str, protocol: Protocol, oauth: &OAuthSources) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid { key: format!("{at}.{key}"), message };
        match self.address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
            _ => return Err(invalid("upstream", "expected host:port, e.g. \"imap.gmail.com:993\"".into())),
        }
        if self.upstream_tls == UpstreamTls::Starttls && protocol != Protocol::Smtp {
            return Err(invalid("upstream_tls", "\"starttls\" is only supported for smtp; use \"implicit\"".into()));
        }
        if let Some(bad) = self.upstream_pin_sha256.iter().find(|pin| crate::tls::parse_pin(pin).is_none()) {
            return Err(invalid(
                "upstream_pin_sha256",
                format!("`{bad}` is not a SHA-256 digest in hex (64 digits) or base64"),
            ));
        }
        if self.upstream_tls_insecure_no_verify && !self.upstream_pin_sha256.is_empty() {
            return Err(invalid(
                "upstream_tls_insecure_no_verify",
                "cannot be combined with upstream_pin_sha256; remove one".into(),
            ));
        }
        match (self.upstream_auth, &self.oauth_source) {
            (UpstreamAuthMode::Password, Some(_)) => {
                Err(invalid("oauth_source", "only used with upstream_auth = \"xoauth2\"; remove it".into()))
            }
            (UpstreamAuthMode::Password, None) => Ok(()),
            (UpstreamAuthMode::Xoauth2, _) if oauth.is_empty() => Err(invalid(
                "upstream_auth",
                "\"xoauth2\" needs an [oauth] table saying where access tokens come from".into(),
            )),
            (UpstreamAuthMode::Xoauth2, Some(name)) if oauth.get(name).is_none() => Err(invalid(
                "oauth_source",
                format!("no [oauth.{name}] table; the sources are: {}", oauth.names().collect::<Vec<_>>().join(", ")),
            )),
            (UpstreamAuthMode::Xoauth2, None) if oauth.len() > 1 => Err(invalid(
                "oauth_source",
                format!(
                    "several OAuth2 sources are configured; name one of: {}",
                    oauth.names().collect::<Vec<_>>().join(", ")
                ),
            )),
            (UpstreamAuthMode::Xoauth2, _) => Ok(()),
        }
    }
}

/// `[[route]]`: the users it matches (by mail domain, user or directory group; any one
/// suffices) log in to its upstreams instead of the protocol tables'. Routes are tried in
/// file order; the first that matches wins.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name, shown in audit lines, `access explain` and `probe`.
    pub name: String,
    /// Mail domains, e.g. `["m365.example.com"]`.
    #[serde(default)]
    pub domains: Vec<String>,
    /// Mail addresses.
    #[serde(default)]
    pub users: Vec<String>,
    /// Directory groups (compared without regard to case, like the profiles' groups).
    #[serde(default)]
    pub groups: Vec<String>,
    /// The IMAP upstream of the route's users; without it they cannot use IMAP.
    pub imap: Option<UpstreamConfig>,
    /// The POP3 upstream of the route's users; without it they cannot use POP3.
    pub pop3: Option<UpstreamConfig>,
    /// The SMTP upstream of the route's users; without it they cannot use SMTP.
    pub smtp: Option<UpstreamConfig>,
}

impl RouteConfig {
    /// The route's upstream for `protocol`, if it has one.
    pub fn upstream(&self, protocol: Protocol) -> Option<&UpstreamConfig> {
        match protocol {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
            Protocol::Smtp => self.smtp.as_ref(),
        }
    }

    pub(super) fn validate(
        &self,
        index: usize,
        configured: &[Protocol],
        oauth: &OAuthSources,
    ) -> Result<(), ConfigError> {
        let at = format!("route.{}", self.name);
        let invalid = |key: &str, message: String| ConfigError::Invalid { key: format!("{at}.{key}"), message };
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
            return Err(ConfigError::Invalid {
                key: format!("route #{}.name", index + 1),
                message: "must be a non-empty name of letters, digits, - and _".into(),
            });
        }
        if self.domains.is_empty() && self.users.is_empty() && self.groups.is_empty() {
            return Err(invalid("domains", "a route needs domains, users or groups to match".into()));
        }
        for domain in &self.domains {
            // A domain is valid when it makes a valid address.
            if domain.contains('@') || crate::user::normalize(&format!("user@{domain}")).is_err() {
                return Err(invalid("domains", format!("`{domain}` is not a mail domain, e.g. \"example.com\"")));
            }
        }
        for user in &self.users {
            crate::user::normalize(user).map_err(|e| invalid("users", format!("`{user}`: {e}")))?;
        }
        if let Some(group) = self.groups.iter().find(|g| g.trim().is_empty()) {
            return Err(invalid("groups", format!("`{group}` is empty")));
        }
        let mut any = false;
        for protocol in Protocol::ALL {
            if let Some(upstream) = self.upstream(protocol) {
                if !configured.contains(&protocol) {
                    return Err(invalid(
                        protocol.name(),
                        format!("there is no [{protocol}] listener; remove this table or add one"),
                    ));
                }
                upstream.validate(&format!("{at}.{protocol}"), protocol, oauth)?;
                any = true;
            }
        }
        if !any {
            return Err(invalid(
                "imap",
                "a route needs an upstream table: [route.imap], [route.pop3] or [route.smtp]".into(),
            ));
        }
        Ok(())
    }
}

/// The `[oauth]` token sources by name. The config may give one source directly in `[oauth]`
/// (named `default`) or several named ones (`[oauth.google]`, `[oauth.m365]`, ...).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OAuthSources(BTreeMap<String, OAuthConfig>);

/// The name of the one source given directly in `[oauth]`.
pub const DEFAULT_OAUTH_SOURCE: &str = "default";

impl OAuthSources {
    /// The source called `name`.
    pub fn get(&self, name: &str) -> Option<&OAuthConfig> {
        self.0.get(name)
    }

    /// Every source, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &OAuthConfig)> {
        self.0.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// The sources' names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// How many sources there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no source is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The source an upstream with `oauth_source = name` uses: the named one, or the only
    /// one when no name is given.
    pub fn choose(&self, name: Option<&str>) -> Option<(&str, &OAuthConfig)> {
        match name {
            Some(name) => self.0.get_key_value(name).map(|(n, c)| (n.as_str(), c)),
            None if self.0.len() == 1 => self.iter().next(),
            None => None,
        }
    }

    /// The config key of the source `name`, for messages: `oauth` or `oauth.NAME`.
    pub fn key(&self, name: &str) -> String {
        if name == DEFAULT_OAUTH_SOURCE && self.0.len() == 1 { "oauth".into() } else { format!("oauth.{name}") }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (name, source) in self.iter() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
                return Err(ConfigError::Invalid {
                    key: format!("oauth.{name}"),
                    message: "source names are letters, digits, - and _".into(),
                });
            }
            source.validate(&self.key(name))?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for OAuthSources {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let table = toml::Table::deserialize(deserializer)?;
        let mut sources = BTreeMap::new();
        if table.contains_key("source") {
            let one = toml::Value::Table(table)
                .try_into::<OAuthConfig>()
                .map_err(|e| D::Error::custom(format!("[oauth]: {e}")))?;
            sources.insert(DEFAULT_OAUTH_SOURCE.to_owned(), one);
        } else {
            for (name, value) in table {
                let toml::Value::Table(table) = value else {
                    return Err(D::Error::custom(format!(
                        "[oauth]: `{name}` must be a table: either give `source = ...` in [oauth], or name each source as [oauth.NAME]"
                    )));
                };
                let source = toml::Value::Table(table)
                    .try_into::<OAuthConfig>()
                    .map_err(|e| D::Error::custom(format!("[oauth.{name}]: {e}")))?;
                sources.insert(name, source);
            }
        }
        Ok(Self(sources))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_oauth_table_is_the_default_source_and_named_tables_are_sources() {
        let one: OAuthSources =
            toml::from_str("source = \"refresh-token\"\ntoken_url = \"https://t\"\nclient_id = \"c\"").unwrap();
        assert_eq!(one.names().collect::<Vec<_>>(), [DEFAULT_OAUTH_SOURCE]);
        assert_eq!(one.choose(None).unwrap().0, DEFAULT_OAUTH_SOURCE);
        assert_eq!(one.key(DEFAULT_OAUTH_SOURCE), "oauth");
        let two: OAuthSources = toml::from_str(
            "[google]\nsource = \"google-service-account\"\nservice_account_key = \"sa.json\"\n\
             [m365]\nsource = \"microsoft\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_file = \"s\"\n",
        )
        .unwrap();
        assert_eq!(two.names().collect::<Vec<_>>(), ["google", "m365"]);
        assert!(two.choose(None).is_none(), "no name, several sources: none is guessed");
        assert_eq!(two.choose(Some("m365")).unwrap().1.source, crate::config::OAuthSource::Microsoft);
        assert_eq!(two.key("google"), "oauth.google");
        let err = toml::from_str::<OAuthSources>("[m365]\nsource = \"microsoft\"\nsurprise = 1\n").unwrap_err();
        assert!(err.to_string().contains("[oauth.m365]") && err.to_string().contains("surprise"), "{err}");
        let err = toml::from_str::<OAuthSources>("google = 1\n").unwrap_err();
        assert!(err.to_string().contains("must be a table"), "{err}");
    }

    fn parse(extra: &str) -> Result<crate::config::Config, String> {
        let text = format!("{}\n{extra}", crate::config::MINIMAL);
        crate::config::Config::parse(&text, std::path::Path::new("proxy.toml"), "/etc/postern".into())
            .map_err(|e| e.to_string())
    }

    const TWO_SOURCES: &str = r#"
        [oauth.google]
        source = "google-service-account"
        service_account_key = "sa.json"
        [oauth.m365]
        source = "microsoft"
        tenant = "example.onmicrosoft.com"
        client_id = "c"
        client_secret_file = "s"
    "#;

    #[test]
    fn routes_and_their_sources_are_checked_with_the_key_at_fault() {
        let route = |body: &str| format!("[[route]]\nname = \"m365\"\n{body}");
        let ok = parse(&format!(
            "{}\n{TWO_SOURCES}",
            route("domains = [\"b.example\"]\n[route.imap]\nupstream = \"o.example:993\"\nupstream_auth = \"xoauth2\"\noauth_source = \"m365\"")
        ))
        .unwrap();
        assert_eq!(ok.route[0].imap.as_ref().unwrap().oauth_source.as_deref(), Some("m365"));
        for (body, key, says) in [
            ("[route.imap]\nupstream = \"o.example:993\"", "route.m365.domains", "domains, users or groups"),
            ("domains = [\"b.example\"]", "route.m365.imap", "needs an upstream table"),
            ("domains = [\"@b\"]\n[route.imap]\nupstream = \"o:993\"", "route.m365.domains", "not a mail domain"),
            ("users = [\"a b\"]\n[route.imap]\nupstream = \"o:993\"", "route.m365.users", "a b"),
            ("domains = [\"b.example\"]\n[route.pop3]\nupstream = \"o:995\"", "route.m365.pop3", "no [pop3] listener"),
            ("domains = [\"b.example\"]\n[route.imap]\nupstream = \"o\"", "route.m365.imap.upstream", "host:port"),
            (
                "domains = [\"b.example\"]\n[route.imap]\nupstream = \"o:993\"\nupstream_auth = \"xoauth2\"",
                "route.m365.imap.oauth_source",
                "google, m365",
            ),
            (
                "domains = [\"b.example\"]\n[route.imap]\nupstream = \"o:993\"\nupstream_auth = \"xoauth2\"\noauth_source = \"gmail\"",
                "route.m365.imap.oauth_source",
                "no [oauth.gmail]",
            ),
            (
                "domains = [\"b.example\"]\n[route.imap]\nupstream = \"o:993\"\noauth_source = \"m365\"",
                "route.m365.imap.oauth_source",
                "only used with",
            ),
        ] {
            let err = parse(&format!("{}\n{TWO_SOURCES}", route(body))).unwrap_err();
            assert!(err.contains(key) && err.contains(says), "{body}: {err}");
        }
        let twice = format!(
            "{0}\n[route.imap]\nupstream = \"o:993\"\n{0}\n[route.imap]\nupstream = \"o:993\"",
            route("domains = [\"b.example\"]")
        );
        assert!(parse(&twice).unwrap_err().contains("used by two routes"));
        let unknown =
            parse(&route("domains = [\"b.example\"]\n[route.imap]\nupstream = \"o:993\"\nsurprise = 1")).unwrap_err();
        assert!(unknown.contains("surprise"), "{unknown}");
        let err = parse(&format!("{TWO_SOURCES}\n[oauth.m365.extra]\nx = 1")).unwrap_err();
        assert!(err.contains("oauth.m365"), "{err}");
    }

    #[test]
    fn a_protocol_table_keeps_strict_keys_after_the_split() {
        let err = crate::config::Config::parse(
            &crate::config::MINIMAL
                .replace("upstream = \"imap.gmail.com:993\"", "upstream = \"imap.gmail.com:993\"\nlisten_too = 1"),
            std::path::Path::new("proxy.toml"),
            "/etc/postern".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen_too"), "{err}");
    }
}
